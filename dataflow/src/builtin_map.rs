//! A small built-in map: Seoul's 25 gu as coarse polygons (`--districts builtin:seoul-gu`, the
//! default of `dongflow run`; tests and examples use it for its size).
//!
//! Each gu is the cell of points nearer to its centre than to any other gu's centre (a Voronoi cell,
//! distances measured with longitude scaled by cos 37.55° so that cells are not stretched), clipped
//! to a coarse outline of Seoul. The names and 10-digit codes (행정기관코드) are the real ones; the
//! shapes are approximations, good for a city-wide picture. The real boundaries of Seoul's dongs
//! are shipped too ([`crate::seoul_map`]); other maps come in through `--districts FILE`.

use geo::{Coord, LineString, MultiPolygon, Polygon};

use crate::districts::{District, DistrictIndex};

/// (code, name, centre latitude, centre longitude) of each gu.
const GU: [(&str, &str, f64, f64); 25] = [
    ("1111000000", "서울특별시 종로구", 37.5940, 126.9770),
    ("1114000000", "서울특별시 중구", 37.5600, 126.9960),
    ("1117000000", "서울특별시 용산구", 37.5310, 126.9800),
    ("1120000000", "서울특별시 성동구", 37.5510, 127.0410),
    ("1121500000", "서울특별시 광진구", 37.5460, 127.0860),
    ("1123000000", "서울특별시 동대문구", 37.5820, 127.0550),
    ("1126000000", "서울특별시 중랑구", 37.5990, 127.0930),
    ("1129000000", "서울특별시 성북구", 37.6050, 127.0180),
    ("1130500000", "서울특별시 강북구", 37.6430, 127.0110),
    ("1132000000", "서울특별시 도봉구", 37.6690, 127.0320),
    ("1135000000", "서울특별시 노원구", 37.6520, 127.0750),
    ("1138000000", "서울특별시 은평구", 37.6190, 126.9270),
    ("1141000000", "서울특별시 서대문구", 37.5770, 126.9390),
    ("1144000000", "서울특별시 마포구", 37.5590, 126.9080),
    ("1147000000", "서울특별시 양천구", 37.5240, 126.8560),
    ("1150000000", "서울특별시 강서구", 37.5610, 126.8220),
    ("1153000000", "서울특별시 구로구", 37.4950, 126.8580),
    ("1154500000", "서울특별시 금천구", 37.4600, 126.9000),
    ("1156000000", "서울특별시 영등포구", 37.5200, 126.9100),
    ("1159000000", "서울특별시 동작구", 37.4990, 126.9520),
    ("1162000000", "서울특별시 관악구", 37.4670, 126.9450),
    ("1165000000", "서울특별시 서초구", 37.4730, 127.0310),
    ("1168000000", "서울특별시 강남구", 37.4960, 127.0630),
    ("1171000000", "서울특별시 송파구", 37.5050, 127.1150),
    ("1174000000", "서울특별시 강동구", 37.5500, 127.1470),
];

/// A coarse outline of Seoul, (lat, lon), counter-clockwise.
const OUTLINE: [(f64, f64); 16] = [
    (37.7010, 127.0450),
    (37.6900, 126.9900),
    (37.6500, 126.9500),
    (37.6300, 126.9000),
    (37.5950, 126.8000),
    (37.5600, 126.7650),
    (37.5150, 126.8200),
    (37.4800, 126.8150),
    (37.4350, 126.8900),
    (37.4300, 126.9900),
    (37.4450, 127.0800),
    (37.4700, 127.1300),
    (37.5200, 127.1800),
    (37.5700, 127.1800),
    (37.6250, 127.1150),
    (37.6900, 127.0950),
];

/// Longitude is scaled by this before distances are compared (cos of Seoul's latitude).
const LON_SCALE: f64 = 0.7922;

/// Keeps the part of `ring` (x = scaled lon, y = lat) nearer to `a` than to `b`: one
/// Sutherland-Hodgman step against the perpendicular bisector of `a` and `b`.
fn clip_nearer(ring: &[(f64, f64)], a: (f64, f64), b: (f64, f64)) -> Vec<(f64, f64)> {
    // Points p with (p - m) . (b - a) <= 0 are nearer to a, m the midpoint.
    let (nx, ny) = (b.0 - a.0, b.1 - a.1);
    let (mx, my) = ((a.0 + b.0) / 2.0, (a.1 + b.1) / 2.0);
    let side = |p: (f64, f64)| (p.0 - mx) * nx + (p.1 - my) * ny;
    let mut out = Vec::with_capacity(ring.len() + 2);
    for i in 0..ring.len() {
        let (p, q) = (ring[i], ring[(i + 1) % ring.len()]);
        let (sp, sq) = (side(p), side(q));
        if sp <= 0.0 {
            out.push(p);
        }
        if (sp < 0.0 && sq > 0.0) || (sp > 0.0 && sq < 0.0) {
            let t = sp / (sp - sq);
            out.push((p.0 + t * (q.0 - p.0), p.1 + t * (q.1 - p.1)));
        }
    }
    out
}

/// The 25 gu as [`District`]s.
pub fn seoul_gu() -> Vec<District> {
    let scaled = |lat: f64, lon: f64| (lon * LON_SCALE, lat);
    let outline: Vec<(f64, f64)> = OUTLINE.iter().map(|&(lat, lon)| scaled(lat, lon)).collect();
    GU.iter()
        .enumerate()
        .map(|(i, &(code, name, lat, lon))| {
            let me = scaled(lat, lon);
            let mut cell = outline.clone();
            for (j, &(_, _, olat, olon)) in GU.iter().enumerate() {
                if i != j {
                    cell = clip_nearer(&cell, me, scaled(olat, olon));
                }
            }
            let ring: Vec<Coord<f64>> = cell
                .iter()
                .map(|&(x, y)| Coord {
                    x: x / LON_SCALE,
                    y,
                })
                .collect();
            let polygon = Polygon::new(LineString::new(ring), vec![]);
            District {
                code: code.to_string(),
                name: name.to_string(),
                shape: MultiPolygon::new(vec![polygon]),
            }
        })
        .collect()
}

impl DistrictIndex {
    /// The built-in coarse map of Seoul's 25 gu.
    ///
    /// ```
    /// let index = dongflow_dataflow::districts::DistrictIndex::builtin_seoul();
    /// assert_eq!(index.len(), 25);
    /// ```
    pub fn builtin_seoul() -> Self {
        match Self::new(seoul_gu()) {
            Ok(index) => index,
            // The table above has 25 distinct codes: building cannot fail.
            Err(e) => unreachable!("built-in map is valid: {e}"),
        }
    }
}
