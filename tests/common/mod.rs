//! Shared test helpers: the plain `HashMap` model of CONTRACT section 3, random scenarios, and an
//! engine fed through channels partitioned like Kafka topics.

#![allow(dead_code)]

pub mod event_count;
pub mod sse;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::Sender;
use dongflow::demo::partition_of;
use dongflow::engine::now_ms;
use dongflow::http::{App, HttpServer};
use dongflow::{Engine, EngineConfig};
use dongflow_connectors::simulator::SimEvent;
use dongflow_connectors::source::{ChannelSource, EventSource};
use dongflow_connectors::{
    Coord, DeliveryEvent, DeliveryStatus, Id, Label, RiderEvent, RiderStatus,
};
use dongflow_dataflow::districts::{DistrictId, DistrictIndex, UNASSIGNED};
use dongflow_dataflow::types::{DeliveryBrief, DistrictCounts, RiderRow, Snapshot};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

/// The contract, written as plainly as possible.
#[derive(Default, Debug)]
pub struct Model {
    pub riders: HashMap<Id, RiderRow>,
    pub deliveries: HashMap<Id, ModelDelivery>,
    pub stale: u64,
    pub after_terminal: u64,
}

#[derive(Clone, Debug)]
pub enum ModelDelivery {
    Ended,
    Live {
        status: DeliveryStatus,
        pickup_district: DistrictId,
        rider_id: Option<Id>,
        vehicle: Option<Label>,
        ts: u64,
    },
}

impl Model {
    pub fn apply_rider(&mut self, index: &DistrictIndex, e: &RiderEvent) {
        let old = self.riders.get(&e.rider_id);
        if let Some(old) = old {
            if e.ts < old.ts {
                self.stale += 1;
                return;
            }
        }
        let location = e.location.or(old.and_then(|o| o.location.get()));
        let row = RiderRow {
            status: e.status,
            rider_type: e
                .rider_type
                .clone()
                .or(old.and_then(|o| o.rider_type.clone())),
            location: location.into(),
            district: location.map_or(UNASSIGNED, |l| index.lookup(l)),
            ts: e.ts,
        };
        self.riders.insert(e.rider_id.clone(), row);
    }

    pub fn apply_delivery(&mut self, index: &DistrictIndex, e: &DeliveryEvent) {
        let old = self.deliveries.get(&e.delivery_id).cloned();
        let (old_district, old_rider, old_vehicle) = match old {
            Some(ModelDelivery::Ended) => {
                self.after_terminal += 1;
                return;
            }
            Some(ModelDelivery::Live { ts, .. }) if e.ts < ts => {
                self.stale += 1;
                return;
            }
            Some(ModelDelivery::Live {
                pickup_district,
                rider_id,
                vehicle,
                ..
            }) => (Some(pickup_district), rider_id, vehicle),
            None => (None, None, None),
        };
        let new = if matches!(
            e.status,
            DeliveryStatus::Delivered | DeliveryStatus::Cancelled
        ) {
            ModelDelivery::Ended
        } else {
            ModelDelivery::Live {
                status: e.status,
                pickup_district: e
                    .pickup
                    .map(|p| index.lookup(p))
                    .or(old_district)
                    .unwrap_or(UNASSIGNED),
                rider_id: e.rider_id.clone().or(old_rider),
                vehicle: e.vehicle.clone().or(old_vehicle),
                ts: e.ts,
            }
        };
        self.deliveries.insert(e.delivery_id.clone(), new);
    }

    pub fn apply(&mut self, index: &DistrictIndex, e: &SimEvent) {
        match e {
            SimEvent::Rider(r) => self.apply_rider(index, r),
            SimEvent::Delivery(d) => self.apply_delivery(index, d),
        }
    }

    /// Every rider on shift with its active deliveries.
    pub fn snapshots(&self) -> BTreeMap<Id, Snapshot> {
        let mut active: HashMap<&Id, Vec<DeliveryBrief>> = HashMap::new();
        for (id, d) in &self.deliveries {
            if let ModelDelivery::Live {
                status,
                rider_id: Some(rider),
                vehicle,
                ts,
                ..
            } = d
            {
                if matches!(
                    status,
                    DeliveryStatus::Assigned
                        | DeliveryStatus::Dispatched
                        | DeliveryStatus::PickedUp
                ) {
                    active.entry(rider).or_default().push(DeliveryBrief {
                        delivery_id: id.clone(),
                        status: *status,
                        vehicle: vehicle.clone(),
                        ts: *ts,
                    });
                }
            }
        }
        self.riders
            .iter()
            .filter(|(_, r)| matches!(r.status, RiderStatus::ShiftStarted | RiderStatus::OnShift))
            .map(|(id, r)| {
                let mut deliveries = active.remove(id).unwrap_or_default();
                deliveries.sort_by(|a, b| a.delivery_id.cmp(&b.delivery_id));
                (
                    id.clone(),
                    Snapshot {
                        rider: r.clone(),
                        deliveries: deliveries.into(),
                    },
                )
            })
            .collect()
    }

    /// Counts of every district with any nonzero count.
    pub fn counts(&self) -> BTreeMap<DistrictId, DistrictCounts> {
        let mut counts: BTreeMap<DistrictId, DistrictCounts> = BTreeMap::new();
        for s in self.snapshots().values() {
            let c = counts.entry(s.rider.district).or_default();
            c.riders_on_shift += 1;
            c.riders_delivering += u64::from(!s.deliveries.is_empty());
            c.active_deliveries += s.deliveries.len() as u64;
        }
        for d in self.deliveries.values() {
            if let ModelDelivery::Live {
                status: DeliveryStatus::Created | DeliveryStatus::Waiting,
                pickup_district,
                ..
            } = d
            {
                counts
                    .entry(*pickup_district)
                    .or_default()
                    .waiting_deliveries += 1;
            }
        }
        counts
    }
}

/// Random events over small id pools, with stale, duplicate, out-of-order, missing-field,
/// reassignment and late-after-terminal events.
pub struct Scenario {
    rng: SmallRng,
    points: Vec<Option<Coord>>,
    riders: usize,
    deliveries: usize,
    clock: u64,
    recent: Vec<SimEvent>,
}

impl Scenario {
    pub fn new(seed: u64, index: &DistrictIndex, riders: usize, deliveries: usize) -> Self {
        let mut points: Vec<Option<Coord>> = (0..index.len().min(8) as u16)
            .filter_map(|d| index.interior_point(d))
            .map(Some)
            .collect();
        points.push(Some(Coord {
            lat: 35.1796,
            lon: 129.0756,
        })); // Busan: unassigned
        points.push(None);
        Self {
            rng: SmallRng::seed_from_u64(seed),
            points,
            riders,
            deliveries,
            clock: 1_764_000_000_000,
            recent: Vec::new(),
        }
    }

    fn point(&mut self) -> Option<Coord> {
        let i = self.rng.random_range(0..self.points.len());
        self.points[i]
    }

    fn label(&mut self, options: &[&str]) -> Option<Label> {
        let i = self.rng.random_range(0..=options.len());
        options.get(i).map(|s| Label::new(s))
    }

    fn ts(&mut self) -> u64 {
        // Mostly moving forward; sometimes the same ts, sometimes older (out of order, stale).
        match self.rng.random_range(0..10) {
            0 => self.clock.saturating_sub(self.rng.random_range(1..5_000)),
            1 => self.clock,
            _ => {
                self.clock += self.rng.random_range(1..1_000);
                self.clock
            }
        }
    }

    pub fn next_event(&mut self) -> SimEvent {
        // Duplicates: replay a recent event unchanged.
        if !self.recent.is_empty() && self.rng.random_range(0..12) == 0 {
            let i = self.rng.random_range(0..self.recent.len());
            return self.recent[i].clone();
        }
        let event = if self.rng.random_bool(0.5) {
            let rider_id = Id::from(format!("r-{}", self.rng.random_range(0..self.riders)));
            let status = RiderStatus::ALL[[0, 1, 1, 1, 2][self.rng.random_range(0..5)]];
            let rider_type = self.label(&["CONNECT", "DEDICATED"]);
            let location = self.point();
            SimEvent::Rider(RiderEvent {
                rider_id,
                status,
                rider_type,
                location,
                ts: self.ts(),
            })
        } else {
            let delivery_id = Id::from(format!("d-{}", self.rng.random_range(0..self.deliveries)));
            let status = DeliveryStatus::ALL[self.rng.random_range(0..DeliveryStatus::ALL.len())];
            let rider_id = if self.rng.random_bool(0.7) {
                Some(Id::from(format!(
                    "r-{}",
                    self.rng.random_range(0..self.riders)
                )))
            } else {
                None
            };
            SimEvent::Delivery(DeliveryEvent {
                delivery_id,
                status,
                delivery_type: self.label(&["FOOD", "MART"]),
                pickup: self.point(),
                dropoff: self.point(),
                rider_id,
                vehicle: self.label(&["MOTORCYCLE", "BICYCLE"]),
                ts: self.ts(),
            })
        };
        if self.recent.len() == 64 {
            let i = self.rng.random_range(0..64);
            self.recent[i] = event.clone();
        } else {
            self.recent.push(event.clone());
        }
        event
    }
}

/// An engine whose workers read channels that stand for Kafka partitions: events go to partition
/// `hash(id) % partitions`, partition `p` is read by worker `p % workers`.
pub struct Harness {
    pub engine: Engine,
    partitions: Vec<Sender<Vec<SimEvent>>>,
    workers: usize,
}

impl Harness {
    pub fn start(config: EngineConfig, partitions: usize) -> Self {
        let workers = config.workers;
        let mut senders = Vec::new();
        let mut receivers: Vec<Vec<_>> = (0..workers).map(|_| Vec::new()).collect();
        for p in 0..partitions {
            let (tx, rx) = crossbeam_channel::unbounded();
            senders.push(tx);
            receivers[p % workers].push(rx);
        }
        let sources: Vec<Box<dyn EventSource>> = receivers
            .into_iter()
            .map(|rxs| {
                Box::new(MultiSource(
                    rxs.into_iter().map(ChannelSource::new).collect(),
                )) as Box<dyn EventSource>
            })
            .collect();
        let engine = Engine::start(config, sources).expect("engine starts");
        Self {
            engine,
            partitions: senders,
            workers,
        }
    }

    /// Sends events to their partitions, in order.
    pub fn send(&self, events: &[SimEvent]) {
        let mut batches: Vec<Vec<SimEvent>> = vec![Vec::new(); self.partitions.len()];
        for e in events {
            let p = partition_of(e, self.partitions.len());
            batches[p].push(e.clone());
        }
        for (p, batch) in batches.into_iter().enumerate() {
            if !batch.is_empty() {
                self.partitions[p].send(batch).expect("worker alive");
            }
        }
    }

    /// Whether the workers have taken everything sent so far.
    pub fn taken(&self) -> bool {
        self.partitions.iter().all(|p| p.is_empty())
    }

    /// Waits until everything sent has been taken in and is reflected at the engine's `as_of`, and
    /// the engine is ready (before that, answers are 503: never `stale: false` before ready).
    pub fn sync(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.partitions.iter().any(|p| !p.is_empty()) {
            assert!(
                Instant::now() < deadline,
                "workers did not take their input"
            );
            std::thread::sleep(Duration::from_micros(200));
        }
        let taken = now_ms();
        while self.engine.handle().as_of() < taken {
            assert!(Instant::now() < deadline, "as_of did not reach {taken}");
            std::thread::sleep(Duration::from_micros(200));
        }
        while !self.engine.handle().ready() {
            assert!(Instant::now() < deadline, "the engine did not become ready");
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    pub fn workers(&self) -> usize {
        self.workers
    }
}

/// Several channel sources behind one worker.
pub struct MultiSource(pub Vec<ChannelSource>);

impl EventSource for MultiSource {
    fn poll(
        &mut self,
        max: usize,
        riders: &mut Vec<RiderEvent>,
        deliveries: &mut Vec<DeliveryEvent>,
    ) -> dongflow_connectors::source::Polled {
        use dongflow_connectors::source::Polled;
        let mut result = Polled::Ended;
        for s in &mut self.0 {
            match s.poll(max, riders, deliveries) {
                Polled::Data => result = Polled::Data,
                Polled::Idle if result == Polled::Ended => result = Polled::Idle,
                _ => {}
            }
        }
        result
    }
}

pub fn builtin() -> Arc<DistrictIndex> {
    Arc::new(DistrictIndex::builtin_seoul())
}

/// Serves the harness's engine over HTTP on a free loopback port.
pub fn serve(harness: &Harness, index: &Arc<DistrictIndex>) -> HttpServer {
    HttpServer::start(
        "127.0.0.1:0",
        App::new(harness.engine.handle(), index.clone()),
        1,
    )
    .expect("binds")
}

/// A plain HTTP client for one server; statuses are data, not errors.
pub struct Client {
    pub agent: ureq::Agent,
    pub base: String,
}

impl Client {
    pub fn new(server: &HttpServer) -> Self {
        Self::at(format!("http://{}", server.addr()))
    }

    /// A client for the server at `base` (`http://host:port`).
    pub fn at(base: String) -> Self {
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .build()
            .into();
        Self { agent, base }
    }

    /// Status, content type and body of a GET.
    pub fn get(&self, path: &str) -> (u16, String, String) {
        let mut response = self
            .agent
            .get(&format!("{}{path}", self.base))
            .call()
            .expect("request goes through");
        let status = response.status().as_u16();
        let content_type = response
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        let body = response.body_mut().read_to_string().expect("body");
        (status, content_type, body)
    }

    pub fn json(&self, path: &str) -> (u16, serde_json::Value) {
        let (status, content_type, body) = self.get(path);
        assert_eq!(content_type, "application/json; charset=utf-8", "{path}");
        (
            status,
            serde_json::from_str(&body).unwrap_or_else(|e| panic!("{path}: {e}: {body}")),
        )
    }
}

/// The text format's rules that a scraper relies on: HELP and TYPE before samples, names with the
/// `dongflow_` prefix, one sample per line with a float value, histogram buckets cumulative and
/// ending at `+Inf` equal to `_count`.
pub fn check_prometheus_text(text: &str) {
    let mut typed: BTreeMap<String, String> = BTreeMap::new();
    let mut buckets: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect("TYPE name kind");
            assert!(["counter", "gauge", "histogram"].contains(&kind), "{line}");
            assert!(
                typed.insert(name.to_string(), kind.to_string()).is_none(),
                "family typed twice: {name}"
            );
            continue;
        }
        if line.starts_with("# HELP ") || line.is_empty() {
            continue;
        }
        let (series, value) = line.rsplit_once(' ').expect("sample has a value");
        let value: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("bad value in {line}"));
        let name = series.split('{').next().expect("name");
        assert!(name.starts_with("dongflow_"), "{line}");
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .filter(|f| typed.get(*f).is_some_and(|k| k == "histogram"))
            .unwrap_or(name);
        assert!(typed.contains_key(family), "sample before its TYPE: {line}");
        if name.ends_with("_bucket") {
            let labels = series.split_once('{').map(|(_, l)| l).unwrap_or_default();
            let route = labels.split(",le=").next().unwrap_or_default().to_string();
            buckets.entry(route).or_default().push(value);
        }
    }
    for (route, values) in buckets {
        assert!(
            values.windows(2).all(|w| w[0] <= w[1]),
            "buckets not cumulative for {route}: {values:?}"
        );
    }
    promtool_check_metrics(text);
}

/// `promtool check metrics` (Prometheus' own linter) finds nothing in `text`. Skipped without
/// promtool unless `DONGFLOW_REQUIRE_PROMTOOL` is set (as `.ci/run` does, having installed it).
fn promtool_check_metrics(text: &str) {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(child) => child,
        Err(e) if std::env::var_os("DONGFLOW_REQUIRE_PROMTOOL").is_none() => {
            eprintln!("skipping promtool check metrics: {e}");
            return;
        }
        Err(e) => panic!("promtool is required (DONGFLOW_REQUIRE_PROMTOOL) but: {e}"),
    };
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("promtool reads the metrics");
    let out = child.wait_with_output().expect("promtool ends");
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The value of one sample (`name` with its labels, exactly as printed) in Prometheus text.
pub fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

pub mod heap;
pub mod kafka;
pub mod netns;
