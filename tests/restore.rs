//! Restoring a checkpoint: the live state is ready only once the restored state is in it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dongflow::changelog::{ChangelogOutputs, ChangelogSink};
use dongflow::recovery::Restored;
use dongflow::{AnswerBody, Engine, EngineConfig, Query};
use dongflow_connectors::simulator::fixed_state;
use dongflow_connectors::source::{EventSource, VecSource};
use dongflow_connectors::{Id, RiderStatus};
use dongflow_dataflow::districts::{DistrictIndex, UNASSIGNED};
use dongflow_dataflow::types::RiderRow;
use dongflow_dataflow::upsert::StateSnapshot;

/// Counts the changelog records the engine writes.
#[derive(Debug, Default)]
struct Counting {
    riders: AtomicU64,
}

impl ChangelogSink for Counting {
    fn district(&self, _code: &str, _value: Option<&[u8]>, _as_of: u64) {}
    fn rider(&self, _rider_id: &str, _value: Option<&[u8]>, _as_of: u64) {
        self.riders.fetch_add(1, Ordering::Relaxed);
    }
}

/// Regression: after a restart from a checkpoint, the view's `as_of` passed zero (and the process
/// said it was ready) as soon as the dataflow's frontier reached the restore time, before the
/// restored state had gone through the dataflow: for a moment, ready and live answers were empty.
#[test]
fn ready_only_once_the_restored_state_is_in() {
    ready_once_in(false);
}

/// The same when the changelog holds the restored state already: it is then shown at the
/// checkpoint's own time, and the view is ready at that `as_of` with all of it.
#[test]
fn ready_only_once_the_restored_state_is_in_at_the_checkpoint_time() {
    ready_once_in(true);
}

fn ready_once_in(published: bool) {
    let riders = 200_000;
    let index = Arc::new(DistrictIndex::builtin_seoul());
    let entries: Vec<(Id, RiderRow)> = fixed_state(riders, 0)
        .map(|e| match e {
            dongflow_connectors::simulator::SimEvent::Rider(r) => {
                let district = r.location.map_or(UNASSIGNED, |p| index.lookup(p));
                let row = RiderRow {
                    status: RiderStatus::OnShift,
                    rider_type: r.rider_type,
                    location: r.location.into(),
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
            ..StateSnapshot::default()
        },
        deliveries: StateSnapshot::default(),
        offsets: HashMap::new(),
        published: None,
        cut: None,
        partial: false,
    };
    let mut config = EngineConfig::new(2, index);
    let restored = Arc::new(restored);
    let checkpoint = Arc::downgrade(&restored);
    config.restore = Some(restored);
    config.restore_published = published;
    let sink = Arc::new(Counting::default());
    config.outputs = Some(Arc::new(ChangelogOutputs {
        sink: sink.clone(),
        index: config.districts.clone(),
        held: None,
        progress: Arc::default(),
        handed: Arc::default(),
    }));
    let sources: Vec<Box<dyn EventSource>> = (0..2)
        .map(|_| Box::new(VecSource::new(Vec::new())) as Box<dyn EventSource>)
        .collect();
    let engine = Engine::start(config, sources).expect("engine starts");
    let deadline = Instant::now() + Duration::from_secs(60);
    while !(engine.handle().as_of() > 0 && engine.handle().caught_up()) {
        assert!(Instant::now() < deadline, "never ready");
        std::thread::sleep(Duration::from_micros(100));
    }
    let on_shift: u64 = match engine.handle().query(&Query::Districts).map(|a| a.body) {
        Ok(AnswerBody::Districts(d)) => d.iter().map(|(_, c)| c.riders_on_shift).sum(),
        other => panic!("no districts: {other:?}"),
    };
    assert_eq!(
        on_shift, riders as u64,
        "ready before the restored state was in"
    );
    assert_eq!(
        checkpoint.strong_count(),
        0,
        "the checkpoint let go once every worker has given its share"
    );
    // Everything has gone through the changelog's sink once the engine has stopped.
    assert!(engine.stop(), "every worker ends normally");
    let written = sink.riders.load(Ordering::Relaxed);
    match published {
        true => assert_eq!(written, 0, "the changelog holds them: not published again"),
        false => assert_eq!(written, riders as u64, "published again"),
    }
}
