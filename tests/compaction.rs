//! Compaction keeps memory flat: with a steady set of live riders pinging over and over and moving
//! between districts, the counts arrangement holds about as many updates as there are districts,
//! and the rider stage one entry per rider, not one per update.

mod common;

use common::{builtin, Harness};
use dongflow::EngineConfig;
use dongflow_connectors::simulator::SimEvent;
use dongflow_connectors::{Coord, RiderEvent, RiderStatus};

#[test]
fn steady_riders_keep_traces_bounded() {
    let index = builtin();
    let harness = Harness::start(EngineConfig::new(2, index.clone()), 4);
    let riders = 500;
    let points: Vec<Coord> = (0..6).filter_map(|d| index.interior_point(d)).collect();
    let mut sizes = Vec::new();
    for round in 0..60u64 {
        let events: Vec<SimEvent> = (0..riders)
            .map(|r| {
                SimEvent::Rider(RiderEvent {
                    rider_id: format!("r-{r}").into(),
                    status: if round == 0 {
                        RiderStatus::ShiftStarted
                    } else {
                        RiderStatus::OnShift
                    },
                    rider_type: None,
                    location: Some(points[(r + round as usize) % points.len()]),
                    ts: 1_000 + round,
                })
            })
            .collect();
        harness.send(&events);
        harness.sync();
        sizes.push(harness.engine.handle().sizes().expect("sizes"));
    }
    let last = sizes.last().expect("60 rounds");
    assert_eq!(last.riders, riders);
    // 60 rounds of 500 riders moving between districts would leave thousands of count updates
    // without compaction; with it, the recent unmerged batches hold a few per district.
    for (round, s) in sizes.iter().enumerate().skip(10) {
        assert!(
            s.snapshot_riders <= riders,
            "round {round}: the rider stage holds {} riders",
            s.snapshot_riders
        );
        assert!(
            s.count_updates <= 8 * points.len(),
            "round {round}: counts hold {}",
            s.count_updates
        );
    }
    eprintln!("final sizes: {last:?}");
}
