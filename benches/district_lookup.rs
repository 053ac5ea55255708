//! District lookups per second: the built-in map, the real Seoul map (425 dongs) and the national
//! map (3,504 districts), over points spread across Seoul (where riders are) and, for the national
//! map, across Korea. Real maps come from ../shared/data/districts (or DONGFLOW_DISTRICTS_DIR) and
//! are skipped with a note when absent.

use std::hint::black_box;
use std::path::PathBuf;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use dongflow_connectors::Coord;
use dongflow_dataflow::districts::DistrictIndex;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

const POINTS: usize = 10_000;

fn points(seed: u64, lat: (f64, f64), lon: (f64, f64)) -> Vec<Coord> {
    let mut rng = SmallRng::seed_from_u64(seed);
    (0..POINTS)
        .map(|_| Coord {
            lat: rng.random_range(lat.0..lat.1),
            lon: rng.random_range(lon.0..lon.1),
        })
        .collect()
}

fn real_map(name: &str, code: &str, label: &str) -> Option<DistrictIndex> {
    let dir = std::env::var_os("DONGFLOW_DISTRICTS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/data/districts")
        });
    let path = dir.join(name);
    match DistrictIndex::from_geojson_file(&path, code, label) {
        Ok(index) => Some(index),
        Err(e) => {
            eprintln!("skipping {name}: {e}");
            None
        }
    }
}

fn bench_lookups(c: &mut Criterion) {
    let seoul_points = points(1, (37.43, 37.70), (126.76, 127.18));
    let korea_points = points(2, (33.1, 38.6), (124.6, 131.9));
    let mut group = c.benchmark_group("district_lookup");
    group.throughput(Throughput::Elements(POINTS as u64));
    let mut maps = vec![(
        "builtin_25_gu",
        DistrictIndex::builtin_seoul(),
        &seoul_points,
    )];
    if let Some(index) = real_map("seoul-admdong.geojson", "adm_cd2", "adm_nm") {
        maps.push(("seoul_425_dongs", index, &seoul_points));
    }
    if let Some(index) = real_map("korea-admdong.geojson", "code", "name") {
        // Borrowing the national index twice: Seoul points and points all over Korea.
        let national = std::sync::Arc::new(index);
        group.bench_function("korea_3504_seoul_points", |b| {
            b.iter(|| {
                seoul_points
                    .iter()
                    .map(|&p| national.lookup(black_box(p)))
                    .fold(0u64, |a, d| a ^ u64::from(d))
            })
        });
        group.bench_function("korea_3504_korea_points", |b| {
            b.iter(|| {
                korea_points
                    .iter()
                    .map(|&p| national.lookup(black_box(p)))
                    .fold(0u64, |a, d| a ^ u64::from(d))
            })
        });
    }
    for (name, index, pts) in maps.drain(..) {
        group.bench_function(name, |b| {
            b.iter(|| {
                pts.iter()
                    .map(|&p| index.lookup(black_box(p)))
                    .fold(0u64, |a, d| a ^ u64::from(d))
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench_lookups);
criterion_main!(benches);
