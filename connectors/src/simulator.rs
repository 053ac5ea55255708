//! A seeded generator of realistic Seoul rider and delivery traffic.
//!
//! The model, in simulated time (ms since the Unix epoch, starting at [`SimConfig::start_ts`]):
//!
//! - **Geography.** Seoul is the box lat 37.43–37.70, lon 126.76–127.18. Orders and riders gather
//!   around 19 weighted hotspots (강남역, 홍대입구, 잠실, ...). Every coordinate stays inside the box and
//!   is rounded to 1e-6 degrees (about 0.1 m), so that it survives a JSON round trip bit for bit.
//! - **Riders** (mostly `CONNECT` on motorcycles, some `DEDICATED`, a few `WALKER`s on foot) alternate
//!   off shift (10–60 min) and on shift (1–4 h); at the start 85% of the first shifts begin within 60 s,
//!   the rest within the hour. A shift starts about a km from a random hotspot (`SHIFT_STARTED`, the
//!   only event with `rider_type`), then the rider pings (`ON_SHIFT`, with location) every 3–5 s while
//!   driving and every 4–5 s otherwise: an idle rider potters about with direction persistence and stays
//!   near its hotspot, a rider on a delivery drives straight to the pickup, waits for the order, drives
//!   straight to the drop-off, then heads back to the order's hotspot. A rider with a delivery ends its
//!   shift (`SHIFT_ENDED`, with location) only after delivering it.
//! - **Deliveries** arrive at about one per on-shift rider per 7 min (fewer while many orders wait for
//!   a rider, so that a thin fleet is not swamped), picked up near a hotspot chosen by weight and dropped
//!   off 0.5–3 km away. `CREATED` (with type, pickup, drop-off) → `WAITING` (1–3 s) → `ASSIGNED` (5–60 s;
//!   with `rider_id` and `vehicle`; to the fastest-to-deliver of up to 8 idle riders sampled from the
//!   pickup's hotspot, else the next nearest; only riders within a search radius that widens the longer
//!   the order waits; retried every 5–15 s) → `DISPATCHED` (1–5 s) → `PICKED_UP` (5–45 s after the rider
//!   reached the pickup) → `DELIVERED` (5–20 s after it reached the drop-off). About 5% of waiting
//!   deliveries are `CANCELLED` by the customer, and so is one nobody took in 15 min; about 3% of
//!   assignments are handed to another rider by a second `ASSIGNED` (the first rider is free again).
//!   Events after `CREATED` carry only what changed (`PICKED_UP` sometimes repeats `rider_id`).
//!
//! In steady state about 94% of the events are `ON_SHIFT` pings: a rider pings about 14 times a minute
//! and its deliveries produce about one event a minute.
//!
//! Events come out in non-decreasing `ts` order from a min-heap of scheduled actions (ties broken by
//! scheduling order), and the same [`SimConfig`] always yields the same sequence. `riders = 0` is taken
//! as 1 (and more than 2^24 as 2^24), so that the stream never stalls.

use std::cmp::Ordering;
use std::collections::BinaryHeap;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use crate::events::{
    self, Coord, DeliveryEvent, DeliveryStatus, Id, Millis, RiderEvent, RiderStatus,
};
use crate::Label;

/// Southern edge of the Seoul box.
pub const LAT_MIN: f64 = 37.43;
/// Northern edge of the Seoul box.
pub const LAT_MAX: f64 = 37.70;
/// Western edge of the Seoul box.
pub const LON_MIN: f64 = 126.76;
/// Eastern edge of the Seoul box.
pub const LON_MAX: f64 = 127.18;

/// Metres per degree of latitude.
const M_PER_LAT: f64 = 111_320.0;
/// Metres per degree of longitude at Seoul's latitude (cos 37.56° ≈ 0.7925).
const M_PER_LON: f64 = 88_220.0;

/// A place where orders and riders gather.
struct Hotspot {
    lat: f64,
    lon: f64,
    weight: u32,
}

const fn spot(lat: f64, lon: f64, weight: u32) -> Hotspot {
    Hotspot { lat, lon, weight }
}

/// The hotspots, with approximate real coordinates and a relative weight of demand (and riders).
const HOTSPOTS: [Hotspot; 19] = [
    spot(37.4979, 127.0276, 10), // 강남역
    spot(37.5007, 127.0365, 7),  // 역삼
    spot(37.5572, 126.9245, 9),  // 홍대입구
    spot(37.5551, 126.9368, 6),  // 신촌
    spot(37.5133, 127.1001, 8),  // 잠실
    spot(37.5219, 126.9245, 6),  // 여의도
    spot(37.5704, 126.9920, 5),  // 종로3가
    spot(37.5404, 127.0692, 6),  // 건대입구
    spot(37.5446, 127.0557, 6),  // 성수
    spot(37.4842, 126.9297, 6),  // 신림
    spot(37.6551, 127.0613, 5),  // 노원
    spot(37.5264, 126.8750, 5),  // 목동
    spot(37.4852, 126.9015, 5),  // 구로디지털단지
    spot(37.5612, 127.0371, 4),  // 왕십리
    spot(37.5345, 126.9946, 5),  // 이태원
    spot(37.5386, 127.1236, 4),  // 천호
    spot(37.6190, 126.9210, 3),  // 연신내
    spot(37.5602, 126.8254, 3),  // 마곡
    spot(37.6380, 127.0257, 3),  // 수유
];

/// A kind of rider: its `rider_type`, its `vehicle` and its speed range in m/s.
struct Profile {
    rider_type: &'static str,
    vehicle: &'static str,
    min_speed: f64,
    max_speed: f64,
    weight: u32,
}

const fn profile(
    rider_type: &'static str,
    vehicle: &'static str,
    min_speed: f64,
    max_speed: f64,
    weight: u32,
) -> Profile {
    Profile {
        rider_type,
        vehicle,
        min_speed,
        max_speed,
        weight,
    }
}

/// The kinds of riders and their weights. Walkers get work only when they are the fastest to deliver.
const PROFILES: [Profile; 5] = [
    profile("CONNECT", "MOTORCYCLE", 7.0, 10.0, 50),
    profile("CONNECT", "BICYCLE", 4.5, 6.5, 12),
    profile("CONNECT", "CAR", 6.0, 9.0, 5),
    profile("DEDICATED", "MOTORCYCLE", 7.5, 10.0, 28),
    profile("WALKER", "WALK", 1.4, 2.0, 5),
];

/// Delivery types and their weights.
const DELIVERY_TYPES: [(&str, u32); 3] = [("FOOD", 75), ("MART", 15), ("ERRAND", 10)];

const SECOND: Millis = 1_000;
const MINUTE: Millis = 60 * SECOND;
const HOUR: Millis = 60 * MINUTE;

/// Mean time between deliveries per on-shift rider. A rider pings about 14 times a minute and a
/// delivery makes 6 events: at one delivery per 8 min pings would be above 95% of the events.
const DEMAND_PERIOD_MS: f64 = 7.0 * 60_000.0;
/// Demand slows down when more than this many orders per on-shift rider wait for a rider...
const BALK_FROM: f64 = 0.2;
/// ... by this factor per excess order per rider.
const BALK: f64 = 10.0;
/// Share of waiting deliveries that the customer cancels.
const CANCEL_P: f64 = 0.05;
/// Share of assignments the platform tries to hand over to another rider; when no other idle rider is
/// near enough the first one keeps it, so that about 3% are reassigned.
const REASSIGN_P: f64 = 0.04;
/// A delivery nobody could take for this long is cancelled.
const GIVE_UP: Millis = 15 * MINUTE;
/// How many idle riders the dispatcher compares.
const SAMPLE: usize = 8;
/// How much further (m) than its search radius the dispatcher looks for other hotspots' idle riders
/// (shops and idle riders scatter around their hotspots).
const ZONE_REACH_M: f64 = 2_000.0;
/// An idle rider further than this (m) from its hotspot heads back.
const LEASH_M: f64 = 800.0;
/// Scatter (standard deviation per axis, m) of shift starts around a hotspot.
const START_SCATTER_M: f64 = 1_000.0;
/// Scatter (standard deviation per axis, m) of pickups (shops) around a hotspot.
const PICKUP_SCATTER_M: f64 = 700.0;
/// Share of riders whose first shift starts within the first minute.
const EARLY_P: f64 = 0.85;

const NONE: u32 = u32::MAX;

/// What the simulator generates.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SimConfig {
    /// Number of riders (`0` is taken as 1, more than 2^24 as 2^24).
    pub riders: usize,
    /// Seed of the random generator: the same config gives the same events.
    pub seed: u64,
    /// Simulated time of the start, ms since the Unix epoch.
    pub start_ts: Millis,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            riders: 1000,
            seed: 1,
            start_ts: 1_764_000_000_000,
        }
    }
}

/// One generated event, for the rider or the delivery topic.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SimEvent {
    /// For the `rider-events` topic.
    Rider(RiderEvent),
    /// For the `delivery-events` topic.
    Delivery(DeliveryEvent),
}

impl SimEvent {
    /// Event time.
    pub fn ts(&self) -> Millis {
        match self {
            SimEvent::Rider(e) => e.ts,
            SimEvent::Delivery(e) => e.ts,
        }
    }

    /// The Kafka key: the rider or delivery id.
    pub fn key(&self) -> &str {
        match self {
            SimEvent::Rider(e) => &e.rider_id,
            SimEvent::Delivery(e) => &e.delivery_id,
        }
    }

    /// The JSON value of CONTRACT section 2.
    pub fn encode(&self) -> Vec<u8> {
        match self {
            SimEvent::Rider(e) => events::encode_rider(e),
            SimEvent::Delivery(e) => events::encode_delivery(e),
        }
    }
}

/// Where a rider is in its day.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Off shift.
    Off,
    /// On shift, free.
    Idle,
    /// Assigned a delivery, not yet dispatched: waits where it is.
    Assigned,
    /// Driving to the pickup.
    ToPickup,
    /// Waiting for the order at the pickup.
    AtPickup,
    /// Driving to the drop-off.
    ToDropoff,
    /// Handing the order over at the drop-off.
    AtDropoff,
}

struct Rider {
    id: Id,
    profile: u8,
    phase: Phase,
    /// Hotspot it hangs around when idle, and whose idle pool it is in.
    zone: u16,
    /// Index in `pools[zone]`, or `NONE`.
    idle_slot: u32,
    /// Slot of its delivery, or `NONE`.
    delivery: u32,
    speed: f64,
    lat: f64,
    lon: f64,
    /// Direction of travel when wandering, radians from east.
    heading: f64,
    target_lat: f64,
    target_lon: f64,
    /// Time up to which its position is computed.
    moved_at: Millis,
    shift_end: Millis,
}

struct Delivery {
    id: Id,
    /// The one step scheduled for it: an action for any other step (there is none) is ignored.
    pending: Step,
    live: bool,
    zone: u16,
    rider: u32,
    created: Millis,
    pickup: Coord,
    dropoff: Coord,
}

/// The step of a delivery an action performs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Step {
    Waiting,
    TryAssign,
    Reassign,
    Dispatch,
    PickedUp,
    Delivered,
    Cancel,
}

impl Step {
    const ALL: [Step; 7] = [
        Step::Waiting,
        Step::TryAssign,
        Step::Reassign,
        Step::Dispatch,
        Step::PickedUp,
        Step::Delivered,
        Step::Cancel,
    ];
}

/// What a scheduled action does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Action {
    /// The rider's next shift start, ping or shift end.
    Rider(u32),
    /// The next delivery is created.
    Create,
    /// A step of the delivery in a slot.
    Delivery(u32, Step),
}

/// At most this many riders (so that an action packs into 32 bits).
const MAX_RIDERS: usize = 1 << 24;
const SLOT_BITS: u32 = 27;

impl Action {
    /// Two tag bits, then the rider, or the step (3 bits) and the delivery slot (27 bits).
    fn pack(self) -> u32 {
        match self {
            Action::Rider(r) => r,
            Action::Create => 1 << 30,
            Action::Delivery(slot, step) => 2 << 30 | (step as u32) << SLOT_BITS | slot,
        }
    }

    fn unpack(x: u32) -> Action {
        match x >> 30 {
            0 => Action::Rider(x),
            1 => Action::Create,
            _ => {
                let step = Step::ALL[((x >> SLOT_BITS) & 7) as usize % Step::ALL.len()];
                Action::Delivery(x & ((1 << SLOT_BITS) - 1), step)
            }
        }
    }
}

/// A scheduled action, 16 bytes so that the heap stays small.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Entry {
    at: Millis,
    /// Scheduling counter (wrapping): among actions at the same ms, the first scheduled goes first.
    seq: u32,
    action: u32,
}

impl Ord for Entry {
    /// Reversed, so that `BinaryHeap` pops the earliest (then first scheduled) entry.
    fn cmp(&self, other: &Self) -> Ordering {
        other.at.cmp(&self.at).then(other.seq.cmp(&self.seq))
    }
}

impl PartialOrd for Entry {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

/// The generator. See the module documentation for the model.
pub struct Simulator {
    rng: SmallRng,
    heap: BinaryHeap<Entry>,
    seq: u32,
    now: Millis,
    riders: Vec<Rider>,
    /// Idle on-shift riders per hotspot.
    pools: Vec<Vec<u32>>,
    /// Per hotspot, every hotspot and its distance (m), nearest first (itself first).
    near: Vec<Vec<(u16, f64)>>,
    deliveries: Vec<Delivery>,
    free_slots: Vec<u32>,
    next_delivery: u64,
    /// Fractional time of the next delivery creation.
    create_clock: f64,
    on_shift: usize,
    /// Deliveries not (yet) assigned to a rider.
    unassigned: usize,
    hotspot_total: u32,
}

impl Simulator {
    /// A simulator at `cfg.start_ts` with every rider off shift; first shifts start within the first minute
    /// (a few later).
    pub fn new(cfg: SimConfig) -> Simulator {
        let n = cfg.riders.clamp(1, MAX_RIDERS);
        let mut rng = SmallRng::seed_from_u64(cfg.seed);
        let profile_total = PROFILES.iter().map(|p| p.weight).sum();
        let hotspot_total = HOTSPOTS.iter().map(|h| h.weight).sum();
        let mut riders = Vec::with_capacity(n);
        let mut heap = BinaryHeap::with_capacity(n + n / 2 + 16);
        let mut seq = 0;
        for i in 0..n {
            let profile = pick_weighted(&mut rng, profile_total, PROFILES.iter().map(|p| p.weight));
            let p = &PROFILES[profile];
            let speed = rng.random_range(p.min_speed..p.max_speed);
            let first = if rng.random_bool(EARLY_P) {
                rng.random_range(0..MINUTE)
            } else {
                rng.random_range(MINUTE..HOUR)
            };
            riders.push(Rider {
                id: ecow::eco_format!("r-{}", i + 1),
                profile: profile as u8,
                phase: Phase::Off,
                zone: 0,
                idle_slot: NONE,
                delivery: NONE,
                speed,
                lat: HOTSPOTS[0].lat,
                lon: HOTSPOTS[0].lon,
                heading: 0.0,
                target_lat: HOTSPOTS[0].lat,
                target_lon: HOTSPOTS[0].lon,
                moved_at: cfg.start_ts,
                shift_end: cfg.start_ts,
            });
            heap.push(Entry {
                at: cfg.start_ts + first,
                seq,
                action: Action::Rider(i as u32).pack(),
            });
            seq += 1;
        }
        heap.push(Entry {
            at: cfg.start_ts + SECOND,
            seq,
            action: Action::Create.pack(),
        });
        seq += 1;
        let near = HOTSPOTS
            .iter()
            .map(|a| {
                let mut v: Vec<(u16, f64)> = HOTSPOTS
                    .iter()
                    .enumerate()
                    .map(|(j, b)| (j as u16, dist_m(a.lat, a.lon, b.lat, b.lon)))
                    .collect();
                v.sort_by(|x, y| x.1.total_cmp(&y.1).then(x.0.cmp(&y.0)));
                v
            })
            .collect();
        Simulator {
            rng,
            heap,
            seq,
            now: cfg.start_ts,
            riders,
            pools: vec![Vec::new(); HOTSPOTS.len()],
            near,
            deliveries: Vec::new(),
            free_slots: Vec::new(),
            next_delivery: 1,
            create_clock: (cfg.start_ts + SECOND) as f64,
            on_shift: 0,
            unassigned: 0,
            hotspot_total,
        }
    }

    /// The simulated clock: the `ts` of the last event (`start_ts` before the first).
    pub fn now(&self) -> Millis {
        self.now
    }

    /// How many riders are on shift now.
    pub fn riders_on_shift(&self) -> usize {
        self.on_shift
    }

    /// How many deliveries are neither delivered nor cancelled.
    pub fn open_deliveries(&self) -> usize {
        self.deliveries.len() - self.free_slots.len()
    }

    /// The next event, in non-decreasing `ts` order. Never ends.
    pub fn next_event(&mut self) -> SimEvent {
        loop {
            let Some(entry) = self.heap.pop() else {
                // Cannot happen (creation always reschedules itself), but never stall.
                let at = self.now + SECOND;
                self.create_clock = at as f64;
                self.schedule(at, Action::Create);
                continue;
            };
            let now = entry.at;
            let event = match Action::unpack(entry.action) {
                Action::Rider(r) => Some(self.rider_tick(r as usize, now)),
                Action::Create => self.create(now),
                Action::Delivery(slot, step) => self.delivery_step(slot, step, now),
            };
            if let Some(e) = event {
                self.now = now;
                return e;
            }
        }
    }

    fn schedule(&mut self, at: Millis, action: Action) {
        self.heap.push(Entry {
            at,
            seq: self.seq,
            action: action.pack(),
        });
        self.seq = self.seq.wrapping_add(1);
    }

    fn schedule_step(&mut self, at: Millis, slot: u32, step: Step) {
        self.deliveries[slot as usize].pending = step;
        self.schedule(at, Action::Delivery(slot, step));
    }

    // ---- riders ----

    fn rider_tick(&mut self, r: usize, now: Millis) -> SimEvent {
        let phase = self.riders[r].phase;
        if phase == Phase::Off {
            return self.start_shift(r, now);
        }
        if phase == Phase::Idle && now >= self.riders[r].shift_end {
            return self.end_shift(r, now);
        }
        self.advance(r, now);
        // The app reports every 3–5 s while driving, every 4–5 s otherwise.
        let gap = match self.riders[r].phase {
            Phase::ToPickup | Phase::ToDropoff => self.rng.random_range(3 * SECOND..=5 * SECOND),
            _ => self.rng.random_range(4 * SECOND..=5 * SECOND),
        };
        self.schedule(now + gap, Action::Rider(r as u32));
        let rider = &self.riders[r];
        SimEvent::Rider(RiderEvent {
            rider_id: rider.id.clone(),
            status: RiderStatus::OnShift,
            rider_type: None,
            location: Some(coord(rider.lat, rider.lon)),
            ts: now,
        })
    }

    fn start_shift(&mut self, r: usize, now: Millis) -> SimEvent {
        let zone = pick_weighted(
            &mut self.rng,
            self.hotspot_total,
            HOTSPOTS.iter().map(|h| h.weight),
        );
        let (lat, lon) = scatter(
            &mut self.rng,
            HOTSPOTS[zone].lat,
            HOTSPOTS[zone].lon,
            START_SCATTER_M,
        );
        let shift = self.rng.random_range(HOUR..=4 * HOUR);
        let heading = self.rng.random_range(0.0..std::f64::consts::TAU);
        let rider = &mut self.riders[r];
        rider.phase = Phase::Idle;
        rider.zone = zone as u16;
        rider.lat = lat;
        rider.lon = lon;
        rider.heading = heading;
        rider.moved_at = now;
        rider.shift_end = now + shift;
        self.on_shift += 1;
        self.pool_add(r);
        let next = now + self.rng.random_range(3 * SECOND..=5 * SECOND);
        self.schedule(next, Action::Rider(r as u32));
        let rider = &self.riders[r];
        SimEvent::Rider(RiderEvent {
            rider_id: rider.id.clone(),
            status: RiderStatus::ShiftStarted,
            rider_type: Some(Label::new(PROFILES[rider.profile as usize].rider_type)),
            location: Some(coord(rider.lat, rider.lon)),
            ts: now,
        })
    }

    fn end_shift(&mut self, r: usize, now: Millis) -> SimEvent {
        self.pool_remove(r);
        self.on_shift -= 1;
        let off = self.rng.random_range(10 * MINUTE..=60 * MINUTE);
        self.schedule(now + off, Action::Rider(r as u32));
        let rider = &mut self.riders[r];
        rider.phase = Phase::Off;
        SimEvent::Rider(RiderEvent {
            rider_id: rider.id.clone(),
            status: RiderStatus::ShiftEnded,
            rider_type: None,
            location: Some(coord(rider.lat, rider.lon)),
            ts: now,
        })
    }

    /// Moves rider `r` up to `now`; on reaching the pickup or drop-off, schedules the next step of its
    /// delivery.
    fn advance(&mut self, r: usize, now: Millis) {
        let rng = &mut self.rng;
        let rider = &mut self.riders[r];
        let dt = now.saturating_sub(rider.moved_at) as f64 / 1000.0;
        rider.moved_at = now;
        let arrived = match rider.phase {
            Phase::Off | Phase::AtPickup | Phase::AtDropoff => return,
            Phase::Idle | Phase::Assigned => {
                let home = &HOTSPOTS[rider.zone as usize];
                if dist_m(rider.lat, rider.lon, home.lat, home.lon) > LEASH_M {
                    let back = ((home.lat - rider.lat) * M_PER_LAT)
                        .atan2((home.lon - rider.lon) * M_PER_LON);
                    rider.heading = back + rng.random_range(-0.4..0.4);
                } else {
                    rider.heading += rng.random_range(-0.5..0.5);
                }
                // Idle riders potter about slowly.
                let step = rider.speed * dt * rng.random_range(0.1..0.5);
                let (sin, cos) = rider.heading.sin_cos();
                let lat = rider.lat + step * sin / M_PER_LAT;
                let lon = rider.lon + step * cos / M_PER_LON;
                rider.lat = lat.clamp(LAT_MIN, LAT_MAX);
                rider.lon = lon.clamp(LON_MIN, LON_MAX);
                if rider.lat != lat || rider.lon != lon {
                    rider.heading += std::f64::consts::PI;
                }
                return;
            }
            Phase::ToPickup | Phase::ToDropoff => {
                let dy = (rider.target_lat - rider.lat) * M_PER_LAT;
                let dx = (rider.target_lon - rider.lon) * M_PER_LON;
                let dist = (dx * dx + dy * dy).sqrt();
                let step = rider.speed * dt * rng.random_range(0.8..1.2);
                if step >= dist {
                    rider.lat = rider.target_lat;
                    rider.lon = rider.target_lon;
                    true
                } else {
                    rider.lat += dy * step / dist / M_PER_LAT;
                    rider.lon += dx * step / dist / M_PER_LON;
                    false
                }
            }
        };
        if arrived {
            let slot = rider.delivery;
            let (phase, step, wait) = if rider.phase == Phase::ToPickup {
                (
                    Phase::AtPickup,
                    Step::PickedUp,
                    rng.random_range(5 * SECOND..=45 * SECOND),
                )
            } else {
                (
                    Phase::AtDropoff,
                    Step::Delivered,
                    rng.random_range(5 * SECOND..=20 * SECOND),
                )
            };
            rider.phase = phase;
            if slot != NONE {
                self.schedule_step(now + wait, slot, step);
            }
        }
    }

    fn pool_add(&mut self, r: usize) {
        let rider = &mut self.riders[r];
        let pool = &mut self.pools[rider.zone as usize];
        rider.idle_slot = pool.len() as u32;
        pool.push(r as u32);
    }

    fn pool_remove(&mut self, r: usize) {
        let (zone, i) = (self.riders[r].zone as usize, self.riders[r].idle_slot);
        if i == NONE {
            return;
        }
        let pool = &mut self.pools[zone];
        pool.swap_remove(i as usize);
        if let Some(&moved) = pool.get(i as usize) {
            self.riders[moved as usize].idle_slot = i;
        }
        self.riders[r].idle_slot = NONE;
    }

    /// Takes the idle rider that would complete the trip from `pickup` to `dropoff` first, of up to
    /// `SAMPLE` sampled from the pool of `zone` or, failing that, of the next nearest hotspots, among
    /// the riders at most `radius` metres from the pickup.
    fn take_rider(
        &mut self,
        zone: u16,
        pickup: Coord,
        dropoff: Coord,
        radius: f64,
    ) -> Option<usize> {
        let trip = dist_m(pickup.lat, pickup.lon, dropoff.lat, dropoff.lon);
        let mut best = (f64::INFINITY, NONE);
        for &(z, zone_dist) in &self.near[zone as usize] {
            if zone_dist > radius + ZONE_REACH_M {
                break;
            }
            let pool = &self.pools[z as usize];
            let samples = pool.len().min(SAMPLE);
            for k in 0..samples {
                let r = if pool.len() <= SAMPLE {
                    pool[k]
                } else {
                    pool[self.rng.random_range(0..pool.len())]
                };
                let rider = &self.riders[r as usize];
                let d = dist_m(rider.lat, rider.lon, pickup.lat, pickup.lon);
                let eta = (d + trip) / rider.speed;
                if d <= radius && eta < best.0 {
                    best = (eta, r);
                }
            }
            if best.1 != NONE {
                let r = best.1 as usize;
                self.pool_remove(r);
                return Some(r);
            }
        }
        None
    }

    /// How far (m) the dispatcher looks for a rider for an order that has waited `waited` ms: from
    /// 1.2 km, widening by 0.5 km a minute.
    fn search_radius(waited: Millis) -> f64 {
        1_200.0 + waited as f64 * (500.0 / 60_000.0)
    }

    /// Rider `r` has no delivery any more: idle again, heading back to the hotspot `zone` where its
    /// order came from (riders go where the orders are).
    fn release(&mut self, r: usize, zone: u16, now: Millis) {
        let rider = &mut self.riders[r];
        rider.phase = Phase::Idle;
        rider.delivery = NONE;
        rider.moved_at = rider.moved_at.max(now);
        rider.zone = zone;
        // A rider past the end of its shift is not offered new work; its next tick ends the shift.
        if now < rider.shift_end {
            self.pool_add(r);
        }
    }

    // ---- deliveries ----

    fn create(&mut self, now: Millis) -> Option<SimEvent> {
        if self.on_shift == 0 {
            self.create_clock = (now + SECOND) as f64;
            self.schedule(now + SECOND, Action::Create);
            return None;
        }
        // Demand is damped when many orders wait for a rider (shops stop taking orders, customers
        // balk at the delivery time), so that a thin fleet is not swamped.
        let backlog = self.unassigned as f64 / self.on_shift as f64;
        let damping = 1.0 + BALK * (backlog - BALK_FROM).max(0.0);
        let u: f64 = 1.0 - self.rng.random::<f64>();
        self.create_clock += -u.ln() * DEMAND_PERIOD_MS * damping / self.on_shift as f64;
        let next = (self.create_clock as Millis).max(now);
        self.schedule(next, Action::Create);
        if self.free_slots.is_empty() && self.deliveries.len() >= 1 << SLOT_BITS {
            // More open deliveries than an action can address: cannot happen with MAX_RIDERS.
            return None;
        }
        self.unassigned += 1;

        let zone = pick_weighted(
            &mut self.rng,
            self.hotspot_total,
            HOTSPOTS.iter().map(|h| h.weight),
        );
        let (plat, plon) = scatter(
            &mut self.rng,
            HOTSPOTS[zone].lat,
            HOTSPOTS[zone].lon,
            PICKUP_SCATTER_M,
        );
        // 0.5–3 km, short trips more likely (mean about 1.3 km).
        let d = 500.0 + 2500.0 * self.rng.random::<f64>().powi(2);
        let (sin, cos) = self.rng.random_range(0.0..std::f64::consts::TAU).sin_cos();
        let dlat = (plat + d * sin / M_PER_LAT).clamp(LAT_MIN, LAT_MAX);
        let dlon = (plon + d * cos / M_PER_LON).clamp(LON_MIN, LON_MAX);
        let kind = pick_weighted(&mut self.rng, 100, DELIVERY_TYPES.iter().map(|t| t.1));
        let n = self.next_delivery;
        self.next_delivery += 1;
        let delivery = Delivery {
            id: ecow::eco_format!("d-{}", n),
            pending: Step::Waiting,
            live: true,
            zone: zone as u16,
            rider: NONE,
            created: now,
            pickup: coord(plat, plon),
            dropoff: coord(dlat, dlon),
        };
        let slot = match self.free_slots.pop() {
            Some(slot) => {
                self.deliveries[slot as usize] = delivery;
                slot
            }
            None => {
                self.deliveries.push(delivery);
                (self.deliveries.len() - 1) as u32
            }
        };
        let wait = self.rng.random_range(SECOND..=3 * SECOND);
        self.schedule_step(now + wait, slot, Step::Waiting);
        let d = &self.deliveries[slot as usize];
        Some(SimEvent::Delivery(DeliveryEvent {
            delivery_id: d.id.clone(),
            status: DeliveryStatus::Created,
            delivery_type: Some(Label::new(DELIVERY_TYPES[kind].0)),
            pickup: Some(d.pickup),
            dropoff: Some(d.dropoff),
            rider_id: None,
            vehicle: None,
            ts: now,
        }))
    }

    fn free(&mut self, slot: u32) {
        let d = &mut self.deliveries[slot as usize];
        if d.rider == NONE {
            self.unassigned -= 1;
        }
        d.live = false;
        d.rider = NONE;
        self.free_slots.push(slot);
    }

    /// A delivery event with only the id, status and time.
    fn bare(&self, slot: u32, status: DeliveryStatus, now: Millis) -> DeliveryEvent {
        DeliveryEvent::bare(self.deliveries[slot as usize].id.clone(), status, now)
    }

    /// An `ASSIGNED` event for the delivery's rider.
    fn assigned(&self, slot: u32, now: Millis) -> SimEvent {
        let rider = &self.riders[self.deliveries[slot as usize].rider as usize];
        SimEvent::Delivery(DeliveryEvent {
            rider_id: Some(rider.id.clone()),
            vehicle: Some(Label::new(PROFILES[rider.profile as usize].vehicle)),
            ..self.bare(slot, DeliveryStatus::Assigned, now)
        })
    }

    fn delivery_step(&mut self, slot: u32, step: Step, now: Millis) -> Option<SimEvent> {
        let d = self.deliveries.get(slot as usize)?;
        if !d.live || d.pending != step {
            return None;
        }
        let (zone, pickup, dropoff, rider) = (d.zone, d.pickup, d.dropoff, d.rider as usize);
        let radius = Self::search_radius(now.saturating_sub(d.created));
        match step {
            Step::Waiting => {
                if self.rng.random_bool(CANCEL_P) {
                    let at = now + self.rng.random_range(10 * SECOND..=120 * SECOND);
                    self.schedule_step(at, slot, Step::Cancel);
                } else {
                    let at = now + self.rng.random_range(5 * SECOND..=60 * SECOND);
                    self.schedule_step(at, slot, Step::TryAssign);
                }
                Some(SimEvent::Delivery(self.bare(
                    slot,
                    DeliveryStatus::Waiting,
                    now,
                )))
            }
            Step::TryAssign => match self.take_rider(zone, pickup, dropoff, radius) {
                Some(r) => {
                    self.riders[r].phase = Phase::Assigned;
                    self.riders[r].delivery = slot;
                    self.deliveries[slot as usize].rider = r as u32;
                    self.unassigned -= 1;
                    if self.rng.random_bool(REASSIGN_P) {
                        let at = now + self.rng.random_range(10 * SECOND..=40 * SECOND);
                        self.schedule_step(at, slot, Step::Reassign);
                    } else {
                        let at = now + self.rng.random_range(SECOND..=5 * SECOND);
                        self.schedule_step(at, slot, Step::Dispatch);
                    }
                    Some(self.assigned(slot, now))
                }
                None if now.saturating_sub(self.deliveries[slot as usize].created) >= GIVE_UP => {
                    self.free(slot);
                    Some(SimEvent::Delivery(self.bare(
                        slot,
                        DeliveryStatus::Cancelled,
                        now,
                    )))
                }
                None => {
                    let at = now + self.rng.random_range(5 * SECOND..=15 * SECOND);
                    self.schedule_step(at, slot, Step::TryAssign);
                    None
                }
            },
            Step::Reassign => {
                let at = now + self.rng.random_range(SECOND..=5 * SECOND);
                self.schedule_step(at, slot, Step::Dispatch);
                let r2 = self.take_rider(zone, pickup, dropoff, radius)?;
                self.riders[r2].phase = Phase::Assigned;
                self.riders[r2].delivery = slot;
                self.deliveries[slot as usize].rider = r2 as u32;
                self.release(rider, zone, now);
                Some(self.assigned(slot, now))
            }
            Step::Dispatch => {
                let r = &mut self.riders[rider];
                r.phase = Phase::ToPickup;
                r.target_lat = pickup.lat;
                r.target_lon = pickup.lon;
                r.moved_at = now;
                Some(SimEvent::Delivery(self.bare(
                    slot,
                    DeliveryStatus::Dispatched,
                    now,
                )))
            }
            Step::PickedUp => {
                let r = &mut self.riders[rider];
                r.phase = Phase::ToDropoff;
                r.target_lat = dropoff.lat;
                r.target_lon = dropoff.lon;
                r.moved_at = now;
                let mut e = self.bare(slot, DeliveryStatus::PickedUp, now);
                if self.rng.random_bool(0.5) {
                    e.rider_id = Some(self.riders[rider].id.clone());
                }
                Some(SimEvent::Delivery(e))
            }
            Step::Delivered => {
                self.release(rider, zone, now);
                self.free(slot);
                Some(SimEvent::Delivery(self.bare(
                    slot,
                    DeliveryStatus::Delivered,
                    now,
                )))
            }
            Step::Cancel => {
                self.free(slot);
                Some(SimEvent::Delivery(self.bare(
                    slot,
                    DeliveryStatus::Cancelled,
                    now,
                )))
            }
        }
    }
}

impl Iterator for Simulator {
    type Item = SimEvent;

    fn next(&mut self) -> Option<SimEvent> {
        Some(self.next_event())
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (usize::MAX, None)
    }
}

/// A point rounded to 1e-6 degrees, which JSON carries exactly.
fn coord(lat: f64, lon: f64) -> Coord {
    Coord {
        lat: (lat * 1e6).round() / 1e6,
        lon: (lon * 1e6).round() / 1e6,
    }
}

/// Equirectangular distance in metres, good enough within a city.
fn dist_m(lat1: f64, lon1: f64, lat2: f64, lon2: f64) -> f64 {
    let dy = (lat2 - lat1) * M_PER_LAT;
    let dx = (lon2 - lon1) * M_PER_LON;
    (dx * dx + dy * dy).sqrt()
}

/// An index drawn with the given weights (`total` is their sum).
fn pick_weighted(rng: &mut SmallRng, total: u32, weights: impl Iterator<Item = u32>) -> usize {
    let mut x = rng.random_range(0..total.max(1));
    let mut last = 0;
    for (i, w) in weights.enumerate() {
        if x < w {
            return i;
        }
        x -= w;
        last = i;
    }
    last
}

/// A point scattered around (`lat`, `lon`) with a gaussian of `sigma_m` metres per axis, clamped to the
/// Seoul box.
fn scatter(rng: &mut SmallRng, lat: f64, lon: f64, sigma_m: f64) -> (f64, f64) {
    let u: f64 = 1.0 - rng.random::<f64>();
    let radius = (-2.0 * u.ln()).sqrt() * sigma_m;
    let (sin, cos) = rng.random_range(0.0..std::f64::consts::TAU).sin_cos();
    let lat = (lat + radius * sin / M_PER_LAT).clamp(LAT_MIN, LAT_MAX);
    let lon = (lon + radius * cos / M_PER_LON).clamp(LON_MIN, LON_MAX);
    (lat, lon)
}

/// A fixed state in its shortest history, for measuring memory and restarts: one `SHIFT_STARTED`
/// per rider (`r-0`, `r-1`, ...), spread over Seoul, then one `ASSIGNED` per delivery (`d-0`, ...),
/// every fifth rider taking one (round robin). `riders` riders end up on shift with `deliveries`
/// active deliveries among them.
pub fn fixed_state(riders: usize, deliveries: usize) -> impl Iterator<Item = SimEvent> + Send {
    const START: Millis = 1_764_000_000_000;
    let n = riders.max(1);
    let shifts = (0..riders).map(move |i| {
        let f = i as f64 / n as f64;
        SimEvent::Rider(RiderEvent {
            rider_id: ecow::eco_format!("r-{i}"),
            status: RiderStatus::ShiftStarted,
            rider_type: Some("CONNECT".into()),
            location: Some(Coord {
                lat: 37.45 + 0.2 * f,
                lon: 126.85 + 0.3 * ((i * 7919) % n) as f64 / n as f64,
            }),
            ts: START + i as Millis,
        })
    });
    let assigned = (0..deliveries).map(move |i| {
        let mut d = DeliveryEvent::bare(
            ecow::eco_format!("d-{i}"),
            DeliveryStatus::Assigned,
            START + i as Millis,
        );
        d.rider_id = Some(ecow::eco_format!("r-{}", (i * 5) % n));
        d.vehicle = Some("MOTORCYCLE".into());
        SimEvent::Delivery(d)
    });
    shifts.chain(assigned)
}

/// `n` ended deliveries (`e-0`, `e-1`, ...), each `CREATED` then `DELIVERED`, for measuring what a
/// remembered ended delivery costs: they count nowhere, yet each is remembered for the terminal ttl.
pub fn ended_deliveries(n: usize) -> impl Iterator<Item = SimEvent> + Send {
    const START: Millis = 1_764_000_000_000;
    (0..n).flat_map(|i| {
        let id = ecow::eco_format!("e-{i}");
        let ts = START + i as Millis;
        [DeliveryStatus::Created, DeliveryStatus::Delivered]
            .into_iter()
            .enumerate()
            .map(move |(k, status)| {
                SimEvent::Delivery(DeliveryEvent::bare(id.clone(), status, ts + k as Millis))
            })
    })
}
