//! Restoring a checkpoint: the live state is ready only once the restored state is in it.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use dongflow::checkpoint::Restored;
use dongflow::{AnswerBody, Engine, EngineConfig, Query};
use dongflow_connectors::simulator::fixed_state;
use dongflow_connectors::source::{EventSource, VecSource};
use dongflow_connectors::{Id, RiderStatus};
use dongflow_dataflow::districts::DistrictIndex;
use dongflow_dataflow::types::RiderRow;
use dongflow_dataflow::upsert::StateSnapshot;

/// Regression: after a restart from a checkpoint, the view's `as_of` passed zero (and the process
/// said it was ready) as soon as the dataflow's frontier reached the restore time, before the
/// restored state had gone through the dataflow: for a moment, ready and live answers were empty.
#[test]
fn ready_only_once_the_restored_state_is_in() {
    let riders = 200_000;
    let index = Arc::new(DistrictIndex::builtin_seoul());
    let entries: Vec<(Id, RiderRow)> = fixed_state(riders, 0)
        .map(|e| match e {
            dongflow_connectors::simulator::SimEvent::Rider(r) => {
                let district = r.location.map_or(u32::MAX, |p| index.lookup(p));
                let row = RiderRow {
                    status: RiderStatus::OnShift,
                    rider_type: r.rider_type,
                    location: r.location,
                    district,
                    ts: r.ts,
                };
                (r.rider_id, row)
            }
            other => panic!("only riders: {other:?}"),
        })
        .collect();
    let time = 1_000;
    let restored = Restored {
        time,
        riders: StateSnapshot {
            time,
            entries,
            expiry: Vec::new(),
        },
        deliveries: StateSnapshot::default(),
        offsets: HashMap::new(),
    };
    let mut config = EngineConfig::new(2, index);
    config.restore = Some(Arc::new(restored));
    let sources: Vec<Box<dyn EventSource>> = (0..2)
        .map(|_| Box::new(VecSource::new(Vec::new())) as Box<dyn EventSource>)
        .collect();
    let engine = Engine::start(config, sources).expect("engine starts");
    let deadline = Instant::now() + Duration::from_secs(60);
    while !(engine.as_of() > 0 && engine.caught_up()) {
        assert!(Instant::now() < deadline, "never ready");
        std::thread::sleep(Duration::from_micros(100));
    }
    let on_shift: u64 = match engine.query(&Query::Districts).map(|a| a.body) {
        Ok(AnswerBody::Districts(d)) => d.iter().map(|(_, c)| c.riders_on_shift).sum(),
        other => panic!("no districts: {other:?}"),
    };
    assert_eq!(
        on_shift, riders as u64,
        "ready before the restored state was in"
    );
    engine.stop();
}
