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
        let answer = harness.engine.query(&Query::Districts).expect("districts");
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
            let answer = harness.engine.query(&Query::District(d)).expect("district");
            assert_eq!(
                answer.body,
                AnswerBody::District(expected_counts.get(&d).copied().unwrap_or_default()),
                "district {d}, {context}"
            );
        }
    }
    let counters = harness.engine.counters();
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
