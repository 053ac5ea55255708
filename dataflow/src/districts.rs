//! The district index: GPS point -> administrative district (행정동), by an R-tree over polygon
//! bounding boxes followed by an exact point-in-polygon test.
//!
//! Districts are numbered by [`DistrictId`] in ascending code order, so that "the lowest code wins"
//! is "the lowest id wins". A point on an edge shared by several districts (where geo's `Contains` is
//! false for all of them) goes to the one with the lowest code among those whose closed polygon holds
//! it, always the same one. Points outside every polygon go to [`UNASSIGNED`].
//!
//! In front of the R-tree sits a grid over the map's extent. A cell that no polygon edge touches lies
//! wholly inside one district (or wholly outside all of them), so its answer is stored and a point
//! there is answered with one array read. Points in cells that an edge touches take the exact path.

use std::collections::HashMap;
use std::path::Path;

use dongflow_records::Coord;
use geo::{
    BoundingRect, Coord as GeoCoord, InteriorPoint, Intersects, LineString, MultiPolygon, Polygon,
};
use rstar::primitives::{GeomWithData, Rectangle};
use rstar::RTree;
use serde_json::Value;

use crate::error::DistrictError;

/// A district's number in a [`DistrictIndex`]: its position in code order. Two bytes: Korea has
/// about 3,500 districts, and every rider and delivery row holds one.
pub type DistrictId = u16;

/// The district of points outside every polygon (and of riders with no known location).
pub const UNASSIGNED: DistrictId = u16::MAX;

/// The most districts a map may have: every number below [`MIXED`].
pub const MAX_DISTRICTS: usize = MIXED as usize;

/// A district id as checkpoints hold it, in 4 bytes ([`UNASSIGNED`] as `u32::MAX`): the layout
/// the rows had before ids took 2 bytes, so that those checkpoints still restore and the format
/// did not change.
pub mod wire {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    use super::{DistrictId, UNASSIGNED};

    /// The 4-byte form of `id`.
    pub fn widen(id: DistrictId) -> u32 {
        match id {
            UNASSIGNED => u32::MAX,
            id => u32::from(id),
        }
    }

    /// The id of a 4-byte form, if it is one.
    pub fn narrow(wide: u32) -> Option<DistrictId> {
        match wide {
            u32::MAX => Some(UNASSIGNED),
            wide => DistrictId::try_from(wide)
                .ok()
                .filter(|&id| id != UNASSIGNED),
        }
    }

    pub fn serialize<S: Serializer>(id: &DistrictId, serializer: S) -> Result<S::Ok, S::Error> {
        widen(*id).serialize(serializer)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<DistrictId, D::Error> {
        let wide = u32::deserialize(deserializer)?;
        narrow(wide).ok_or_else(|| {
            serde::de::Error::custom(format!("district number {wide} is out of range"))
        })
    }
}

/// The code and name reported for [`UNASSIGNED`].
pub const UNASSIGNED_CODE: &str = "unassigned";

/// One district: code, name and shape.
#[derive(Clone, Debug)]
pub struct District {
    /// The code, e.g. `1168064000`.
    pub code: String,
    /// The name, e.g. `서울특별시 강남구 역삼1동`.
    pub name: String,
    /// The boundary, WGS84 lon/lat.
    pub shape: MultiPolygon<f64>,
}

type Entry = GeomWithData<Rectangle<[f64; 2]>, (DistrictId, u32)>;

/// Point -> district lookups over a fixed set of districts.
pub struct DistrictIndex {
    districts: Vec<District>,
    by_code: HashMap<String, DistrictId>,
    tree: RTree<Entry>,
    grid: Grid,
}

/// A cell an edge touches: its points need the exact test.
const MIXED: DistrictId = u16::MAX - 1;

/// The most cells the grid may have (2 bytes each).
const MAX_CELLS: f64 = 4_000_000.0;

/// Margin, in degrees, by which edges are widened when marking the cells they touch, so that
/// rounding can never leave a boundary point in a cell taken for "wholly inside".
const EPS: f64 = 1e-9;

/// The grid of precomputed answers over the map's bounding box.
struct Grid {
    lon0: f64,
    lat0: f64,
    inv_w: f64,
    inv_h: f64,
    nx: usize,
    ny: usize,
    cells: Vec<DistrictId>,
}

impl Grid {
    fn cell(&self, lon: f64, lat: f64) -> Option<usize> {
        let x = (lon - self.lon0) * self.inv_w;
        let y = (lat - self.lat0) * self.inv_h;
        if x >= 0.0 && y >= 0.0 && (x as usize) < self.nx && (y as usize) < self.ny {
            Some(y as usize * self.nx + x as usize)
        } else {
            None
        }
    }
}

impl std::fmt::Debug for DistrictIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DistrictIndex({} districts)", self.districts.len())
    }
}

impl DistrictIndex {
    /// Builds the index. Fails on an empty list or a duplicate code.
    pub fn new(mut districts: Vec<District>) -> Result<Self, DistrictError> {
        if districts.is_empty() {
            return Err(DistrictError::Empty);
        }
        if districts.len() > MAX_DISTRICTS {
            return Err(DistrictError::TooMany(districts.len()));
        }
        districts.sort_by(|a, b| a.code.cmp(&b.code));
        let mut by_code = HashMap::with_capacity(districts.len());
        let mut entries = Vec::new();
        for (id, d) in districts.iter().enumerate() {
            if d.code == UNASSIGNED_CODE
                || by_code.insert(d.code.clone(), id as DistrictId).is_some()
            {
                return Err(DistrictError::DuplicateCode(d.code.clone()));
            }
            for (part, polygon) in d.shape.0.iter().enumerate() {
                if let Some(r) = polygon.bounding_rect() {
                    let rect =
                        Rectangle::from_corners([r.min().x, r.min().y], [r.max().x, r.max().y]);
                    entries.push(GeomWithData::new(rect, (id as DistrictId, part as u32)));
                }
            }
        }
        let empty = Grid {
            lon0: 0.0,
            lat0: 0.0,
            inv_w: 0.0,
            inv_h: 0.0,
            nx: 0,
            ny: 0,
            cells: Vec::new(),
        };
        let mut index = Self {
            districts,
            by_code,
            tree: RTree::bulk_load(entries),
            grid: empty,
        };
        index.grid = index.build_grid();
        Ok(index)
    }

    /// Builds the grid: marks every cell an edge touches as mixed, then gives each run of unmarked
    /// cells in a row the answer of one point in it (no edge separates cells of one run).
    fn build_grid(&self) -> Grid {
        let envelope = self.tree.root().envelope();
        let (lo, hi) = (envelope.lower(), envelope.upper());
        let (w, h) = ((hi[0] - lo[0]).max(1e-9), (hi[1] - lo[1]).max(1e-9));
        // Cells about square on the ground: a degree of longitude is cos(lat) of a degree of latitude.
        let aspect = (w * ((lo[1] + hi[1]) / 2.0).to_radians().cos()) / h;
        let ny = (MAX_CELLS / aspect.max(1e-6)).sqrt().clamp(1.0, 4096.0) as usize;
        let nx = ((ny as f64 * aspect) as usize).clamp(1, 4096);
        let mut grid = Grid {
            lon0: lo[0],
            lat0: lo[1],
            inv_w: nx as f64 / w,
            inv_h: ny as f64 / h,
            nx,
            ny,
            cells: vec![UNASSIGNED; nx * ny],
        };
        let mut mixed = vec![false; nx * ny];
        let to_x = |v: f64| ((v - grid.lon0) * grid.inv_w).max(0.0).min((nx - 1) as f64) as usize;
        let to_y = |v: f64| ((v - grid.lat0) * grid.inv_h).max(0.0).min((ny - 1) as f64) as usize;
        for d in &self.districts {
            for polygon in &d.shape.0 {
                for ring in std::iter::once(polygon.exterior()).chain(polygon.interiors()) {
                    for seg in ring.lines() {
                        let (cx0, cx1) = (
                            to_x(seg.start.x.min(seg.end.x) - EPS),
                            to_x(seg.start.x.max(seg.end.x) + EPS),
                        );
                        let (cy0, cy1) = (
                            to_y(seg.start.y.min(seg.end.y) - EPS),
                            to_y(seg.start.y.max(seg.end.y) + EPS),
                        );
                        for cy in cy0..=cy1 {
                            mixed[cy * nx + cx0..=cy * nx + cx1].fill(true);
                        }
                    }
                }
            }
        }
        for cy in 0..ny {
            let mut run_answer: Option<DistrictId> = None;
            for cx in 0..nx {
                let i = cy * nx + cx;
                if mixed[i] {
                    grid.cells[i] = MIXED;
                    run_answer = None;
                    continue;
                }
                let answer = *run_answer.get_or_insert_with(|| {
                    let lon = grid.lon0 + (cx as f64 + 0.5) / grid.inv_w;
                    let lat = grid.lat0 + (cy as f64 + 0.5) / grid.inv_h;
                    self.lookup_exact(Coord { lat, lon })
                });
                grid.cells[i] = answer;
            }
        }
        grid
    }

    /// Loads a GeoJSON FeatureCollection of Polygon and MultiPolygon features (holes respected),
    /// taking each district's code and name from the given properties.
    pub fn from_geojson_file(
        path: &Path,
        code_prop: &str,
        name_prop: &str,
    ) -> Result<Self, DistrictError> {
        let bytes = std::fs::read(path).map_err(|e| DistrictError::Io {
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
        Self::from_geojson(&bytes, code_prop, name_prop)
    }

    /// As [`DistrictIndex::from_geojson_file`], from bytes in memory.
    pub fn from_geojson(
        bytes: &[u8],
        code_prop: &str,
        name_prop: &str,
    ) -> Result<Self, DistrictError> {
        let doc: Value =
            serde_json::from_slice(bytes).map_err(|e| DistrictError::Json(e.to_string()))?;
        if doc.get("type").and_then(Value::as_str) != Some("FeatureCollection") {
            return Err(DistrictError::NotFeatureCollection);
        }
        let features = doc
            .get("features")
            .and_then(Value::as_array)
            .ok_or(DistrictError::NotFeatureCollection)?;
        let mut districts = Vec::with_capacity(features.len());
        for (i, feature) in features.iter().enumerate() {
            let props = feature.get("properties");
            let prop = |name: &str| match props.and_then(|p| p.get(name)) {
                Some(Value::String(s)) if !s.is_empty() => Some(s.clone()),
                Some(Value::Number(n)) => Some(n.to_string()),
                _ => None,
            };
            let code = prop(code_prop).ok_or_else(|| DistrictError::MissingProperty {
                feature: i,
                property: code_prop.to_string(),
            })?;
            let name = prop(name_prop).unwrap_or_else(|| code.clone());
            let shape = parse_geometry(feature.get("geometry"), i)?;
            districts.push(District { code, name, shape });
        }
        Self::new(districts)
    }

    /// The district holding `point`, or [`UNASSIGNED`].
    ///
    /// ```
    /// use dongflow_dataflow::districts::{DistrictIndex, UNASSIGNED};
    /// use dongflow_records::Coord;
    /// let index = DistrictIndex::builtin_seoul();
    /// let gangnam = index.lookup(Coord { lat: 37.5089, lon: 127.0631 }); // 코엑스
    /// assert_eq!(index.name(gangnam), "서울특별시 강남구");
    /// assert_eq!(index.lookup(Coord { lat: 35.1796, lon: 129.0756 }), UNASSIGNED); // Busan
    /// ```
    pub fn lookup(&self, point: Coord) -> DistrictId {
        match self
            .grid
            .cell(point.lon, point.lat)
            .map(|i| self.grid.cells[i])
        {
            // Outside the grid (or on its very edge): the R-tree answers, quickly for far points.
            None | Some(MIXED) => self.lookup_exact(point),
            Some(answer) => answer,
        }
    }

    /// The district holding `point` by the R-tree and the exact test alone, without the grid.
    pub fn lookup_exact(&self, point: Coord) -> DistrictId {
        let p = [point.lon, point.lat];
        let c = GeoCoord {
            x: point.lon,
            y: point.lat,
        };
        let mut best = UNASSIGNED;
        for entry in self.tree.locate_all_at_point(&p) {
            let (id, part) = entry.data;
            if id < best && self.districts[id as usize].shape.0[part as usize].intersects(&c) {
                best = id;
            }
        }
        best
    }

    /// The number of districts (not counting [`UNASSIGNED`]).
    pub fn len(&self) -> usize {
        self.districts.len()
    }

    /// Whether there are no districts (never true for a built index).
    pub fn is_empty(&self) -> bool {
        self.districts.is_empty()
    }

    /// The districts, in code order (`id` is the position).
    pub fn districts(&self) -> &[District] {
        &self.districts
    }

    /// The code of a district id; `unassigned` for [`UNASSIGNED`].
    pub fn code(&self, id: DistrictId) -> &str {
        self.districts
            .get(id as usize)
            .map_or(UNASSIGNED_CODE, |d| d.code.as_str())
    }

    /// The name of a district id; `unassigned` for [`UNASSIGNED`].
    pub fn name(&self, id: DistrictId) -> &str {
        self.districts
            .get(id as usize)
            .map_or(UNASSIGNED_CODE, |d| d.name.as_str())
    }

    /// The id of a code (`unassigned` included), or `None` for an unknown code.
    pub fn id_of(&self, code: &str) -> Option<DistrictId> {
        if code == UNASSIGNED_CODE {
            return Some(UNASSIGNED);
        }
        self.by_code.get(code).copied()
    }

    /// A point strictly inside the district's largest polygon, for tests and the simulator.
    pub fn interior_point(&self, id: DistrictId) -> Option<Coord> {
        let d = self.districts.get(id as usize)?;
        let p = d.shape.interior_point()?;
        Some(Coord {
            lat: p.y(),
            lon: p.x(),
        })
    }

    /// The map as a GeoJSON FeatureCollection with `code` and `name` properties.
    pub fn to_geojson(&self) -> Value {
        let ring = |r: &LineString<f64>| {
            Value::Array(r.0.iter().map(|c| serde_json::json!([c.x, c.y])).collect())
        };
        let features: Vec<Value> = self
            .districts
            .iter()
            .map(|d| {
                let polygons: Vec<Value> = d
                    .shape
                    .0
                    .iter()
                    .map(|p| {
                        let mut rings = vec![ring(p.exterior())];
                        rings.extend(p.interiors().iter().map(ring));
                        Value::Array(rings)
                    })
                    .collect();
                serde_json::json!({
                    "type": "Feature",
                    "properties": {"code": d.code, "name": d.name},
                    "geometry": {"type": "MultiPolygon", "coordinates": polygons},
                })
            })
            .collect();
        serde_json::json!({"type": "FeatureCollection", "features": features})
    }
}

fn parse_ring(v: &Value, feature: usize) -> Result<LineString<f64>, DistrictError> {
    let bad = || DistrictError::BadCoordinates { feature };
    let points = v.as_array().ok_or_else(bad)?;
    let mut coords = Vec::with_capacity(points.len());
    for p in points {
        let xy = p.as_array().ok_or_else(bad)?;
        let x = xy.first().and_then(Value::as_f64).ok_or_else(bad)?;
        let y = xy.get(1).and_then(Value::as_f64).ok_or_else(bad)?;
        coords.push(GeoCoord { x, y });
    }
    if coords.len() < 4 {
        return Err(bad());
    }
    Ok(LineString::new(coords))
}

fn parse_polygon(v: &Value, feature: usize) -> Result<Polygon<f64>, DistrictError> {
    let rings = v
        .as_array()
        .ok_or(DistrictError::BadCoordinates { feature })?;
    let mut rings = rings.iter().map(|r| parse_ring(r, feature));
    let exterior = rings
        .next()
        .ok_or(DistrictError::BadCoordinates { feature })??;
    Ok(Polygon::new(exterior, rings.collect::<Result<_, _>>()?))
}

fn parse_geometry(
    geometry: Option<&Value>,
    feature: usize,
) -> Result<MultiPolygon<f64>, DistrictError> {
    let kind = geometry
        .and_then(|g| g.get("type"))
        .and_then(Value::as_str)
        .unwrap_or("none");
    let coords = geometry.and_then(|g| g.get("coordinates"));
    match (kind, coords) {
        ("Polygon", Some(c)) => Ok(MultiPolygon::new(vec![parse_polygon(c, feature)?])),
        ("MultiPolygon", Some(Value::Array(ps))) => Ok(MultiPolygon::new(
            ps.iter()
                .map(|p| parse_polygon(p, feature))
                .collect::<Result<_, _>>()?,
        )),
        ("Polygon" | "MultiPolygon", _) => Err(DistrictError::BadCoordinates { feature }),
        (other, _) => Err(DistrictError::UnsupportedGeometry {
            feature,
            kind: other.to_string(),
        }),
    }
}
