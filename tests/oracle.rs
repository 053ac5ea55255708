//! Oracle test: random event sequences through the dataflow on 1 and 4 workers, compared at several
//! times with the plain `HashMap` model of the contract.

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;

use common::{builtin, Harness, Model, Scenario};
use dongflow::{AnswerBody, EngineConfig, Query};
use dongflow_connectors::Id;

/// Runs one scenario; returns how many rounds had an active delivery (so that the join was exercised).
fn run(seed: u64, workers: usize, rounds: usize, per_round: usize) -> usize {
    run_with(seed, workers, rounds, per_round, 12, 30)
}

fn run_with(
    seed: u64,
    workers: usize,
    rounds: usize,
    per_round: usize,
    riders: usize,
    deliveries: usize,
) -> usize {
    let index = builtin();
    let harness = Harness::start(EngineConfig::new(workers, index.clone()), 4);
    let mut scenario = Scenario::new(seed, &index, riders, deliveries);
    let mut model = Model::default();
    let mut rounds_with_active = 0;
    for round in 0..rounds {
        let events: Vec<_> = (0..per_round).map(|_| scenario.next_event()).collect();
        for e in &events {
            model.apply(&index, e);
        }
        harness.send(&events);
        harness.sync();
        let context = format!("seed {seed}, {workers} workers, round {round}");

        let expected_counts = model.counts();
        rounds_with_active +=
            usize::from(expected_counts.values().any(|c| c.active_deliveries > 0));
        let answer = harness
            .engine
            .handle()
            .query(&Query::Districts)
            .expect("districts");
        let AnswerBody::Districts(counts) = answer.body else {
            panic!("wrong answer kind")
        };
        assert_eq!(
            counts.into_iter().collect::<BTreeMap<_, _>>(),
            expected_counts,
            "counts, {context}"
        );

        let expected = model.snapshots();
        for r in 0..riders {
            let id = Id::from(format!("r-{r}"));
            let answer = harness
                .engine
                .handle()
                .query(&Query::Rider(id.clone()))
                .expect("rider");
            let AnswerBody::Rider(snapshot) = answer.body else {
                panic!("wrong answer kind")
            };
            assert_eq!(
                snapshot.as_ref(),
                expected.get(&id),
                "rider {id}, {context}"
            );
        }
        for d in expected_counts.keys().copied().chain([0, 3]) {
            let answer = harness
                .engine
                .handle()
                .query(&Query::RidersOf(d))
                .expect("riders of district");
            let AnswerBody::Riders(riders) = answer.body else {
                panic!("wrong answer kind")
            };
            let want: Vec<_> = expected
                .iter()
                .filter(|(_, s)| s.rider.district == d)
                .map(|(id, s)| (id.clone(), s.clone()))
                .collect();
            assert_eq!(riders, want, "riders of {d}, {context}");
            let answer = harness
                .engine
                .handle()
                .query(&Query::District(d))
                .expect("district");
            assert_eq!(
                answer.body,
                AnswerBody::District(expected_counts.get(&d).copied().unwrap_or_default()),
                "district {d}, {context}"
            );
        }
    }
    let handle = harness.engine.handle();
    let counters = handle.counters();
    let stale = counters.riders.stale.load(Ordering::Relaxed)
        + counters.deliveries.stale.load(Ordering::Relaxed);
    assert_eq!(stale, model.stale, "stale events, seed {seed}");
    assert_eq!(
        counters.deliveries.after_terminal.load(Ordering::Relaxed),
        model.after_terminal,
        "after terminal, seed {seed}"
    );
    rounds_with_active
}

#[test]
fn oracle_one_worker() {
    let active: usize = (0..12).map(|seed| run(seed, 1, 8, 60)).sum();
    assert!(
        active > 12,
        "the scenarios rarely had active deliveries ({active} rounds)"
    );
}

#[test]
fn oracle_four_workers() {
    let active: usize = (100..112).map(|seed| run(seed, 4, 8, 60)).sum();
    assert!(
        active > 12,
        "the scenarios rarely had active deliveries ({active} rounds)"
    );
}

#[test]
fn oracle_long_sequence() {
    assert!(run_with(7, 2, 4, 2_000, 40, 800) > 0);
}

/// A checkpoint of random states seeds a stale view (the dataflow's rules applied to the restored
/// upsert state, `ServingView::seed`) whose answers equal the live view's, on 1 and 3 workers.
#[test]
fn a_checkpoint_seeds_a_stale_view_that_answers_as_the_live_one() {
    use dongflow::engine::CheckpointSettings;
    use dongflow::recovery::{load_latest, Writer};
    use dongflow::view::ServingView;
    for (seed, workers) in [(61, 1), (62, 3), (63, 3)] {
        let index = builtin();
        let dir = std::env::temp_dir().join(format!("dongflow-seed-{seed}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let writer = Writer::start(dir.clone(), 0, 1, workers).expect("writer");
        let mut config = EngineConfig::new(workers, index.clone());
        config.checkpoint = Some(CheckpointSettings {
            // Only the clean stop's checkpoint: the state it seeds is the live one at the end.
            interval: 3_600_000,
            parts: writer.sender(),
        });
        let harness = Harness::start(config, 4);
        let mut scenario = Scenario::new(seed, &index, 40, 90);
        let events: Vec<_> = (0..300).map(|_| scenario.next_event()).collect();
        harness.send(&events);
        harness.sync();
        let mut queries = vec![Query::Districts];
        queries.extend((0..40).map(|r| Query::Rider(Id::from(format!("r-{r}")))));
        queries
            .extend((0..index.len() as u16).flat_map(|d| [Query::District(d), Query::RidersOf(d)]));
        let live: Vec<AnswerBody> = queries
            .iter()
            .map(|q| harness.engine.handle().query(q).expect("live answer").body)
            .collect();
        assert!(
            live.iter()
                .any(|a| matches!(a, AnswerBody::Rider(Some(s)) if !s.deliveries.is_empty())),
            "seed {seed}: some rider has an active delivery"
        );
        assert!(harness.engine.stop(), "every worker ends normally");
        writer.finish().expect("the clean stop's checkpoint");
        let restored = std::sync::Arc::new(load_latest(&dir).expect("a checkpoint"));
        let stale = ServingView::new_stale();
        stale.seed(&restored);
        stale.advance([], restored.time);
        for (query, live) in queries.iter().zip(&live) {
            let answer = stale.answer(query).expect("a stale answer");
            assert!(answer.stale);
            assert_eq!(
                &answer.body, live,
                "{query:?}, seed {seed}, {workers} workers"
            );
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
