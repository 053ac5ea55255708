//! District index tests on the real maps: Seoul's dongs as shipped in the binary, and the national
//! map in ../shared/data/districts (path overridable with DONGFLOW_DISTRICTS_DIR); and on the
//! built-in coarse map.
//!
//! A fresh clone without ../shared skips the real-map tests with a note; with DONGFLOW_REQUIRE_DATA=1
//! (as CI sets) a missing folder fails them instead.

use std::collections::HashMap;
use std::path::PathBuf;

use dongflow_dataflow::districts::{
    District, DistrictId, DistrictIndex, MAX_DISTRICTS, UNASSIGNED, UNASSIGNED_CODE,
};
use dongflow_dataflow::DistrictError;
use dongflow_records::Coord;
use geo::Intersects;

fn data_file(name: &str) -> Option<PathBuf> {
    let dir = std::env::var_os("DONGFLOW_DISTRICTS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/data/districts")
        });
    let path = dir.join(name);
    if path.exists() {
        return Some(path);
    }
    assert!(
        std::env::var_os("DONGFLOW_REQUIRE_DATA").is_none(),
        "{} is missing and DONGFLOW_REQUIRE_DATA is set",
        path.display()
    );
    eprintln!(
        "skipping: {} not found (set DONGFLOW_DISTRICTS_DIR)",
        path.display()
    );
    None
}

/// Seoul's dongs: the map shipped in the binary, which is the data folder's file (checked below),
/// so these tests run on a plain clone too.
fn seoul() -> Option<DistrictIndex> {
    Some(DistrictIndex::seoul_dongs().expect("the shipped Seoul map loads"))
}

/// The shipped map is the data folder's `seoul-admdong.geojson`, byte for byte.
#[test]
fn the_shipped_seoul_map_is_the_data_file() {
    let Some(path) = data_file("seoul-admdong.geojson") else {
        return;
    };
    let file = std::fs::read(&path).expect("readable");
    let shipped = dongflow_dataflow::seoul_map::seoul_geojson().expect("decompresses");
    assert_eq!(shipped.len(), file.len());
    assert!(
        shipped == file,
        "the shipped map differs from {}",
        path.display()
    );
}

fn at(lat: f64, lon: f64) -> Coord {
    Coord { lat, lon }
}

#[test]
fn seoul_has_425_dongs() {
    let Some(index) = seoul() else { return };
    assert_eq!(index.len(), 425);
    assert_eq!(
        index.name(index.id_of("1168064000").expect("역삼1동 code")),
        "서울특별시 강남구 역삼1동"
    );
}

#[test]
fn seoul_known_points() {
    let Some(index) = seoul() else { return };
    let cases = [
        (at(37.5007, 127.0363), "서울특별시 강남구 역삼1동"), // 역삼역
        (at(37.5251, 126.9246), "서울특별시 영등포구 여의동"), // 여의도
        (at(37.5572, 126.9245), "서울특별시 마포구 서교동"),  // 홍대입구역
    ];
    for (point, name) in cases {
        assert_eq!(index.name(index.lookup(point)), name, "{point:?}");
    }
}

#[test]
fn points_outside_seoul_are_unassigned() {
    let Some(index) = seoul() else { return };
    for point in [
        at(35.1796, 129.0756),
        at(37.4602, 126.4407),
        at(0.0, 0.0),
        at(-89.0, -179.0),
    ] {
        assert_eq!(index.lookup(point), UNASSIGNED, "{point:?}");
    }
    assert_eq!(index.code(UNASSIGNED), UNASSIGNED_CODE);
    assert_eq!(index.id_of(UNASSIGNED_CODE), Some(UNASSIGNED));
}

#[test]
fn every_seoul_interior_point_maps_to_its_own_dong() {
    let Some(index) = seoul() else { return };
    for id in 0..index.len() as DistrictId {
        let p = index.interior_point(id).expect("interior point");
        assert_eq!(index.code(index.lookup(p)), index.code(id));
    }
}

/// Vertices shared by several dongs lie exactly on their common boundary: each must go to the
/// lowest code among the dongs whose closed polygon holds it, every time.
#[test]
fn shared_edges_go_to_the_lowest_code_always() {
    let Some(index) = seoul() else { return };
    let mut owners: HashMap<(u64, u64), Vec<DistrictId>> = HashMap::new();
    for (id, d) in index.districts().iter().enumerate() {
        for polygon in &d.shape.0 {
            for c in &polygon.exterior().0 {
                let v = owners.entry((c.x.to_bits(), c.y.to_bits())).or_default();
                if !v.contains(&(id as DistrictId)) {
                    v.push(id as DistrictId);
                }
            }
        }
    }
    let shared: Vec<_> = owners.iter().filter(|(_, ids)| ids.len() >= 2).collect();
    assert!(
        shared.len() > 1000,
        "expected many shared vertices, found {}",
        shared.len()
    );
    for ((x, y), ids) in shared {
        let point = at(f64::from_bits(*y), f64::from_bits(*x));
        let got = index.lookup(point);
        let holders: Vec<DistrictId> = (0..index.len() as DistrictId)
            .filter(|&d| {
                index.districts()[d as usize].shape.intersects(&geo::Coord {
                    x: point.lon,
                    y: point.lat,
                })
            })
            .collect();
        assert!(
            ids.iter().all(|i| holders.contains(i)),
            "a vertex owner does not hold its own vertex"
        );
        assert_eq!(Some(&got), holders.iter().min(), "{point:?}");
        assert_eq!(index.lookup(point), got, "same point, same district");
    }
}

#[test]
fn national_map_loads_and_places_interior_points() {
    let Some(path) = data_file("korea-admdong.geojson") else {
        return;
    };
    let index =
        DistrictIndex::from_geojson_file(&path, "code", "name").expect("national map loads");
    assert_eq!(index.len(), 3504);
    let mut elsewhere = 0;
    for id in (0..index.len() as DistrictId).step_by(7) {
        let p = index.interior_point(id).expect("interior point");
        let got = index.lookup(p);
        if got != id {
            // The national file has slight overlaps between neighbours: the lower code may win there.
            assert!(got < id, "{} placed in {}", index.code(id), index.code(got));
            elsewhere += 1;
        }
    }
    assert!(
        elsewhere <= 5,
        "{elsewhere} interior points placed elsewhere"
    );
    // 부산 서면 lies in Busan, KOSTAT sido code 21.
    assert!(index
        .code(index.lookup(at(35.1578, 129.0600)))
        .starts_with("21"));
}

#[test]
fn builtin_map_covers_seoul_with_real_gu() {
    let index = DistrictIndex::builtin_seoul();
    assert_eq!(index.len(), 25);
    let cases = [
        (at(37.5089, 127.0631), "서울특별시 강남구"), // 코엑스
        (at(37.5663, 126.9779), "서울특별시 중구"),   // 서울시청
        (at(37.5133, 127.1001), "서울특별시 송파구"), // 잠실역
        (at(37.6542, 127.0568), "서울특별시 노원구"), // 노원역
        (at(37.5662, 126.9019), "서울특별시 마포구"), // 마포구청
    ];
    for (point, name) in cases {
        assert_eq!(index.name(index.lookup(point)), name, "{point:?}");
    }
    for id in 0..25 {
        let p = index.interior_point(id).expect("interior point");
        assert_eq!(index.lookup(p), id);
    }
    assert_eq!(index.lookup(at(35.1796, 129.0756)), UNASSIGNED);
    // The cells tile the outline: points well inside Seoul always land in some gu.
    for i in 0..50 {
        for j in 0..50 {
            let p = at(
                37.48 + 0.14 * f64::from(i) / 50.0,
                126.92 + 0.18 * f64::from(j) / 50.0,
            );
            assert_ne!(index.lookup(p), UNASSIGNED, "{p:?}");
        }
    }
    let geojson = index.to_geojson();
    assert_eq!(geojson["features"].as_array().map(Vec::len), Some(25));
}

#[test]
fn polygons_with_holes_exclude_the_hole() {
    let doc = br#"{"type":"FeatureCollection","features":[
      {"type":"Feature","properties":{"adm_cd2":"A","adm_nm":"ring"},"geometry":{"type":"Polygon","coordinates":[
        [[0,0],[10,0],[10,10],[0,10],[0,0]], [[4,4],[6,4],[6,6],[4,6],[4,4]]]}},
      {"type":"Feature","properties":{"adm_cd2":"B","adm_nm":"island"},"geometry":{"type":"MultiPolygon","coordinates":[
        [[[4.5,4.5],[5.5,4.5],[5.5,5.5],[4.5,5.5],[4.5,4.5]]], [[[20,20],[21,20],[21,21],[20,21],[20,20]]]]}}]}"#;
    let index = DistrictIndex::from_geojson(doc, "adm_cd2", "adm_nm").expect("loads");
    assert_eq!(index.code(index.lookup(at(1.0, 1.0))), "A");
    assert_eq!(index.code(index.lookup(at(5.0, 5.0))), "B");
    assert_eq!(
        index.lookup(at(4.2, 4.2)),
        UNASSIGNED,
        "inside the hole, outside the island"
    );
    assert_eq!(index.code(index.lookup(at(20.5, 20.5))), "B");
    // On the hole's edge: only A's closed polygon holds it.
    assert_eq!(index.code(index.lookup(at(4.0, 5.0))), "A");
}

fn load(doc: &str) -> Result<DistrictIndex, DistrictError> {
    DistrictIndex::from_geojson(doc.as_bytes(), "adm_cd2", "adm_nm")
}

#[test]
fn bad_district_files_give_clear_errors() {
    let missing =
        DistrictIndex::from_geojson_file(std::path::Path::new("/no/such/file.geojson"), "c", "n");
    assert!(
        matches!(&missing, Err(DistrictError::Io { path, .. }) if path == "/no/such/file.geojson")
    );
    assert!(matches!(load("{not json"), Err(DistrictError::Json(_))));
    assert!(matches!(
        load(r#"{"type":"Feature"}"#),
        Err(DistrictError::NotFeatureCollection)
    ));
    assert!(matches!(
        load(r#"{"type":"FeatureCollection","features":[]}"#),
        Err(DistrictError::Empty)
    ));
    let square = r#"{"type":"Polygon","coordinates":[[[0,0],[1,0],[1,1],[0,0]]]}"#;
    let no_code = format!(
        r#"{{"type":"FeatureCollection","features":[{{"type":"Feature","properties":{{"x":1}},"geometry":{square}}}]}}"#
    );
    let err = load(&no_code).expect_err("no code");
    assert_eq!(
        err,
        DistrictError::MissingProperty {
            feature: 0,
            property: "adm_cd2".into()
        }
    );
    assert!(err.to_string().contains("--district-code-prop"), "{err}");
    let point = r#"{"type":"FeatureCollection","features":[{"type":"Feature","properties":{"adm_cd2":"1"},"geometry":{"type":"Point","coordinates":[0,0]}}]}"#;
    assert_eq!(
        load(point).expect_err("point").to_string(),
        "feature 0 has a Point geometry; only Polygon and MultiPolygon are supported"
    );
    let bad = r#"{"type":"FeatureCollection","features":[{"type":"Feature","properties":{"adm_cd2":"1"},"geometry":{"type":"Polygon","coordinates":[[[0,0],["x",1]]]}}]}"#;
    assert_eq!(
        load(bad).expect_err("bad coords"),
        DistrictError::BadCoordinates { feature: 0 }
    );
    let twice = format!(
        r#"{{"type":"FeatureCollection","features":[{{"type":"Feature","properties":{{"adm_cd2":"7"}},"geometry":{square}}},{{"type":"Feature","properties":{{"adm_cd2":7}},"geometry":{square}}}]}}"#
    );
    assert_eq!(
        load(&twice).expect_err("duplicate"),
        DistrictError::DuplicateCode("7".into())
    );
}

/// The built-in coarse map should agree with the real boundaries for most of Seoul: the gu of each
/// real dong's interior point (its code's first five digits) against the built-in cell it falls in.
#[test]
fn builtin_map_agrees_with_real_gu_mostly() {
    let Some(real) = seoul() else { return };
    let builtin = DistrictIndex::builtin_seoul();
    let mut agree = 0;
    for id in 0..real.len() as DistrictId {
        let p = real.interior_point(id).expect("interior point");
        let gu = builtin.code(builtin.lookup(p));
        agree += usize::from(gu[..5] == real.code(id)[..5]);
    }
    let share = agree as f64 / real.len() as f64;
    assert!(
        share >= 0.7,
        "built-in map agrees on only {:.0}% of dongs",
        share * 100.0
    );
    eprintln!(
        "built-in map places {:.0}% of real dongs in their own gu",
        share * 100.0
    );
}

/// The grid in front of the R-tree must never change an answer: random points, every vertex and
/// every edge midpoint give the same district with and without it.
#[test]
fn grid_answers_equal_exact_answers() {
    use rand::{Rng, SeedableRng};
    let mut maps = vec![DistrictIndex::builtin_seoul()];
    maps.extend(seoul());
    for index in &maps {
        let mut rng = rand::rngs::SmallRng::seed_from_u64(5);
        let mut points: Vec<Coord> = (0..200_000)
            .map(|_| {
                at(
                    rng.random_range(37.40..37.73),
                    rng.random_range(126.73..127.21),
                )
            })
            .collect();
        for d in index.districts() {
            for polygon in &d.shape.0 {
                for seg in polygon.exterior().lines() {
                    points.push(at(seg.start.y, seg.start.x));
                    points.push(at(
                        (seg.start.y + seg.end.y) / 2.0,
                        (seg.start.x + seg.end.x) / 2.0,
                    ));
                }
            }
        }
        for p in points {
            assert_eq!(index.lookup(p), index.lookup_exact(p), "{p:?}");
        }
    }
}

#[test]
fn a_map_with_more_districts_than_numbers_is_refused_clearly() {
    let tiny = |i: usize| {
        let (x, y) = ((i % 1000) as f64 * 0.001, (i / 1000) as f64 * 0.001);
        District {
            code: format!("{i:08}"),
            name: format!("d{i}"),
            shape: geo::MultiPolygon(vec![geo::Polygon::new(
                geo::LineString::from(vec![
                    (x, y),
                    (x + 0.0005, y),
                    (x + 0.0005, y + 0.0005),
                    (x, y),
                ]),
                vec![],
            )]),
        }
    };
    let err =
        DistrictIndex::new((0..MAX_DISTRICTS + 1).map(tiny).collect()).expect_err("one too many");
    assert_eq!(err, DistrictError::TooMany(MAX_DISTRICTS + 1));
    assert_eq!(
        err.to_string(),
        format!(
            "{} districts, more than the {MAX_DISTRICTS} a map may have",
            MAX_DISTRICTS + 1
        )
    );
}

#[test]
fn district_numbers_keep_their_four_byte_form_in_checkpoints() {
    use dongflow_dataflow::districts::wire::{narrow, widen};
    assert_eq!(widen(UNASSIGNED), u32::MAX);
    assert_eq!(narrow(u32::MAX), Some(UNASSIGNED));
    assert_eq!(narrow(widen(424)), Some(424));
    assert_eq!(
        narrow(70_000),
        None,
        "past every number: refused, not wrapped"
    );
    assert_eq!(
        narrow(u32::from(UNASSIGNED)),
        None,
        "not a district's number"
    );
}
