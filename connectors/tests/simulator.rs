//! The event simulator: determinism, order, wire round trip and the shape of the traffic.

use std::collections::{HashMap, HashSet};

use dongflow_connectors::events::{decode_delivery, decode_rider, encode_delivery, encode_rider};
use dongflow_connectors::simulator::{
    SimConfig, SimEvent, Simulator, LAT_MAX, LAT_MIN, LON_MAX, LON_MIN,
};
use dongflow_connectors::{Coord, DeliveryStatus, Millis, RiderStatus};

fn run(cfg: SimConfig, n: usize) -> Vec<SimEvent> {
    Simulator::new(cfg).take(n).collect()
}

fn in_seoul(c: Coord) -> bool {
    (LAT_MIN..=LAT_MAX).contains(&c.lat) && (LON_MIN..=LON_MAX).contains(&c.lon)
}

#[test]
fn same_seed_same_events() {
    let cfg = SimConfig {
        riders: 500,
        seed: 42,
        ..SimConfig::default()
    };
    let a = run(cfg.clone(), 10_000);
    let b = run(cfg, 10_000);
    assert_eq!(a, b);
}

#[test]
fn different_seeds_differ() {
    let a = run(
        SimConfig {
            seed: 1,
            ..SimConfig::default()
        },
        10_000,
    );
    let b = run(
        SimConfig {
            seed: 2,
            ..SimConfig::default()
        },
        10_000,
    );
    assert_ne!(a, b);
}

#[test]
fn default_config() {
    let cfg = SimConfig::default();
    assert_eq!(
        (cfg.riders, cfg.seed, cfg.start_ts),
        (1000, 1, 1_764_000_000_000)
    );
}

#[test]
fn zero_riders_is_one_rider() {
    let mut sim = Simulator::new(SimConfig {
        riders: 0,
        ..SimConfig::default()
    });
    let events: Vec<SimEvent> = sim.by_ref().take(2_000).collect();
    let riders: HashSet<&str> = events
        .iter()
        .filter_map(|e| match e {
            SimEvent::Rider(r) => Some(r.rider_id.as_str()),
            SimEvent::Delivery(_) => None,
        })
        .collect();
    assert_eq!(riders, HashSet::from(["r-1"]));
    assert_eq!(sim.now(), events[events.len() - 1].ts());
}

#[test]
fn clock_starts_at_start_ts() {
    let cfg = SimConfig {
        riders: 10,
        seed: 3,
        start_ts: 1_000_000,
    };
    let mut sim = Simulator::new(cfg);
    assert_eq!(sim.now(), 1_000_000);
    let first = sim.next_event();
    assert!(first.ts() >= 1_000_000 && first.ts() < 1_000_000 + 3_600_000);
    assert_eq!(sim.now(), first.ts());
}

/// Checks every event of one run against the contract and the model, and counts what it saw.
#[derive(Default)]
struct Checker {
    events: usize,
    last_ts: Millis,
    riders: HashMap<RiderStatus, usize>,
    deliveries: HashMap<DeliveryStatus, usize>,
    /// Rider id -> (on shift, ts of its last SHIFT_STARTED or ON_SHIFT).
    rider_state: HashMap<String, (bool, Millis)>,
    /// Rider id -> the delivery it is on.
    busy: HashMap<String, String>,
    /// Delivery id -> (last status, riders it was ASSIGNED to, in order).
    delivery_state: HashMap<String, (DeliveryStatus, Vec<String>)>,
    min_gap: Millis,
    max_gap: Millis,
    /// Whether to check the JSON round trip of every event (slow in a debug build).
    roundtrip: bool,
}

impl Checker {
    fn new(start: Millis) -> Checker {
        Checker {
            last_ts: start,
            min_gap: Millis::MAX,
            roundtrip: true,
            ..Checker::default()
        }
    }

    fn reassigned(&self) -> usize {
        self.delivery_state
            .values()
            .filter(|d| d.1.len() >= 2)
            .count()
    }

    fn pings(&self) -> usize {
        self.riders.get(&RiderStatus::OnShift).copied().unwrap_or(0)
    }

    fn check(&mut self, event: &SimEvent) {
        self.events += 1;
        assert!(
            event.ts() >= self.last_ts,
            "ts went back: {} after {}",
            event.ts(),
            self.last_ts
        );
        self.last_ts = event.ts();
        match event {
            SimEvent::Rider(e) => {
                if self.roundtrip {
                    assert_eq!(decode_rider(&encode_rider(e)).as_ref(), Ok(e), "round trip");
                }
                assert!(e.rider_id.starts_with("r-"));
                if let Some(c) = e.location {
                    assert!(in_seoul(c), "{e:?} outside Seoul");
                }
                *self.riders.entry(e.status).or_default() += 1;
                let id = e.rider_id.to_string();
                let state = self.rider_state.entry(id.clone()).or_insert((false, 0));
                match e.status {
                    RiderStatus::ShiftStarted => {
                        assert!(!state.0, "{e:?}: shift started twice");
                        assert!(e.rider_type.is_some() && e.location.is_some(), "{e:?}");
                        *state = (true, e.ts);
                    }
                    RiderStatus::OnShift => {
                        assert!(state.0, "{e:?}: ping off shift");
                        assert!(e.rider_type.is_none() && e.location.is_some(), "{e:?}");
                        let gap = e.ts - state.1;
                        self.min_gap = self.min_gap.min(gap);
                        self.max_gap = self.max_gap.max(gap);
                        assert!(
                            (2_500..=6_000).contains(&gap),
                            "{e:?}: {gap} ms after the previous ping"
                        );
                        state.1 = e.ts;
                    }
                    RiderStatus::ShiftEnded => {
                        assert!(state.0, "{e:?}: shift ended off shift");
                        assert!(e.rider_type.is_none() && e.location.is_some(), "{e:?}");
                        state.0 = false;
                        assert!(
                            !self.busy.contains_key(&id),
                            "{e:?} with delivery {:?}",
                            self.busy.get(&id)
                        );
                    }
                }
            }
            SimEvent::Delivery(e) => {
                if self.roundtrip {
                    let back = decode_delivery(&encode_delivery(e));
                    assert_eq!(back.as_ref(), Ok(e), "round trip");
                }
                assert!(e.delivery_id.starts_with("d-"));
                for c in [e.pickup, e.dropoff].into_iter().flatten() {
                    assert!(in_seoul(c), "{e:?} outside Seoul");
                }
                *self.deliveries.entry(e.status).or_default() += 1;
                let id = e.delivery_id.to_string();
                let prev = self.delivery_state.get(&id).map(|d| d.0);
                if let Some(p) = prev {
                    assert!(!p.is_terminal(), "{e:?} after {p:?}");
                }
                use DeliveryStatus::*;
                let allowed = match e.status {
                    Created => prev.is_none(),
                    Waiting => prev == Some(Created),
                    Assigned => matches!(prev, Some(Waiting | Assigned)),
                    Dispatched => prev == Some(Assigned),
                    PickedUp => prev == Some(Dispatched),
                    Delivered => prev == Some(PickedUp),
                    Cancelled => prev == Some(Waiting),
                };
                assert!(allowed, "{e:?} after {prev:?}");
                if e.status == Created {
                    assert!(
                        e.delivery_type.is_some() && e.pickup.is_some() && e.dropoff.is_some(),
                        "{e:?}"
                    );
                }
                let entry = self
                    .delivery_state
                    .entry(id.clone())
                    .or_insert((Created, Vec::new()));
                entry.0 = e.status;
                match e.status {
                    Assigned => {
                        let rider = e
                            .rider_id
                            .as_deref()
                            .expect("ASSIGNED carries rider_id")
                            .to_string();
                        assert!(e.vehicle.is_some(), "{e:?}");
                        assert!(
                            self.rider_state.get(&rider).is_some_and(|s| s.0),
                            "{e:?}: rider not on shift"
                        );
                        assert!(
                            !entry.1.contains(&rider),
                            "{e:?}: reassigned to the same rider"
                        );
                        assert!(!self.busy.contains_key(&rider), "{e:?}: rider already busy");
                        if let Some(old) = entry.1.last() {
                            self.busy.remove(old);
                        }
                        self.busy.insert(rider.clone(), id);
                        entry.1.push(rider);
                    }
                    Delivered => {
                        let rider = entry.1.last().expect("delivered by someone");
                        assert_eq!(self.busy.remove(rider).as_ref(), Some(&id));
                    }
                    _ => {}
                }
                if let Some(r) = &e.rider_id {
                    assert_eq!(
                        entry.1.last().map(String::as_str),
                        Some(r.as_str()),
                        "{e:?}"
                    );
                }
            }
        }
    }
}

/// 200k events of 2000 riders (about 500 simulated seconds), every property checked.
#[test]
fn traffic_shape() {
    let cfg = SimConfig {
        riders: 2000,
        seed: 7,
        ..SimConfig::default()
    };
    let start = cfg.start_ts;
    let mut sim = Simulator::new(cfg);
    let mut check = Checker::new(start);
    for _ in 0..200_000 {
        let e = sim.next_event();
        check.check(&e);
        assert_eq!(sim.now(), e.ts());
    }
    let share = check.pings() as f64 / check.events as f64;
    println!(
        "simulated {:.0} s; ping share {share:.3}; ping gaps {}..{} ms; riders {:?}; deliveries {:?}; reassigned {}",
        (check.last_ts - start) as f64 / 1000.0,
        check.min_gap,
        check.max_gap,
        check.riders,
        check.deliveries,
        check.reassigned(),
    );
    assert!((0.6..=0.95).contains(&share), "ON_SHIFT share {share}");
    for s in DeliveryStatus::ALL {
        assert!(
            check.deliveries.get(&s).copied().unwrap_or(0) > 0,
            "no {s:?} in {:?}",
            check.deliveries
        );
    }
    assert!(check.reassigned() > 0, "no reassignment");
}

/// Hours of traffic through whole shifts: the same checks (but the round trip), and a steady state
/// with the intended mix.
#[test]
fn steady_state() {
    let riders = 800;
    let cfg = SimConfig {
        riders,
        seed: 11,
        ..SimConfig::default()
    };
    let start = cfg.start_ts;
    let mut sim = Simulator::new(cfg);
    let mut check = Checker {
        roundtrip: false,
        ..Checker::new(start)
    };
    let mut steady: HashMap<&'static str, usize> = HashMap::new();
    let mut total = 0usize;
    let mut max_open = 0;
    while sim.now() < start + 4 * 3_600_000 {
        let e = sim.next_event();
        check.check(&e);
        // Count from the second hour on, past the start-up.
        if e.ts() < start + 3_600_000 {
            continue;
        }
        total += 1;
        let key = match &e {
            SimEvent::Rider(r) => r.status.as_str(),
            SimEvent::Delivery(d) => d.status.as_str(),
        };
        *steady.entry(key).or_default() += 1;
        max_open = max_open.max(sim.open_deliveries());
    }
    let get = |k: &str| steady.get(k).copied().unwrap_or(0) as f64;
    let ping_share = get("ON_SHIFT") / total as f64;
    let cancel_share = get("CANCELLED") / get("CREATED");
    let reassign_share = (get("ASSIGNED") - get("DISPATCHED")) / get("DISPATCHED");
    println!(
        "steady state: {total} events; ping share {ping_share:.3}; cancelled {cancel_share:.3}; \
         reassigned {reassign_share:.3}; max open deliveries {max_open}; on shift now {}; {steady:?}",
        sim.riders_on_shift()
    );
    for s in RiderStatus::ALL {
        assert!(
            check.riders.get(&s).copied().unwrap_or(0) > 0,
            "no {s:?} in {:?}",
            check.riders
        );
    }
    assert!(
        (0.6..=0.95).contains(&ping_share),
        "ping share {ping_share}"
    );
    assert!(
        (0.03..=0.08).contains(&cancel_share),
        "cancel share {cancel_share}"
    );
    assert!(
        (0.015..=0.045).contains(&reassign_share),
        "reassign share {reassign_share}"
    );
    assert!(
        max_open < riders,
        "backlog grows: {max_open} open deliveries for {riders} riders"
    );
}

/// A thin fleet is not swamped: demand backs off instead of piling up orders nobody can take.
#[test]
fn thin_fleet() {
    let cfg = SimConfig {
        riders: 60,
        seed: 5,
        ..SimConfig::default()
    };
    let start = cfg.start_ts;
    let mut sim = Simulator::new(cfg);
    let mut check = Checker::new(start);
    let mut max_open = 0;
    while sim.now() < start + 6 * 3_600_000 {
        let e = sim.next_event();
        check.check(&e);
        max_open = max_open.max(sim.open_deliveries());
    }
    let count = |s| check.deliveries.get(&s).copied().unwrap_or(0) as f64;
    let cancel_share = count(DeliveryStatus::Cancelled) / count(DeliveryStatus::Created);
    println!(
        "thin fleet: cancelled {cancel_share:.3}; max open {max_open}; {:?}",
        check.deliveries
    );
    assert!(cancel_share < 0.12, "cancel share {cancel_share}");
    assert!(max_open < 100, "{max_open} open deliveries for 60 riders");
}

/// Throughput; run with `cargo test --release -p dongflow-connectors --test simulator -- --ignored --nocapture`.
#[test]
#[ignore]
fn speed() {
    for riders in [1_000, 10_000, 100_000] {
        let mut sim = Simulator::new(SimConfig {
            riders,
            ..SimConfig::default()
        });
        // Warm up past the start-up burst.
        for _ in 0..1_000_000 {
            std::hint::black_box(sim.next_event());
        }
        let n = 10_000_000;
        let t = std::time::Instant::now();
        for _ in 0..n {
            std::hint::black_box(sim.next_event());
        }
        let secs = t.elapsed().as_secs_f64();
        println!(
            "{riders} riders: {n} events in {secs:.3} s = {:.2} M events/s",
            n as f64 / secs / 1e6
        );
    }
}
