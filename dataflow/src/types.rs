//! The records that flow through the dataflow, defined once.

use dongflow_records::{Coord, DeliveryStatus, Id, Label, Millis, RiderStatus};
use serde::{Deserialize, Serialize};

use crate::districts::DistrictId;

/// Dataflow time: the ingest time of a batch, in ms since the Unix epoch.
pub type Time = u64;

/// Multiplicity of an update.
pub type Diff = isize;

/// A rider's latest state, the result of applying its events in `ts` order.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct RiderRow {
    /// Latest status.
    pub status: RiderStatus,
    /// Last known rider type.
    pub rider_type: Option<Label>,
    /// Last known location.
    pub location: OptionalPoint,
    /// The district of `location` ([`crate::districts::UNASSIGNED`] without one).
    #[serde(with = "crate::districts::wire")]
    pub district: DistrictId,
    /// `ts` of the latest applied event.
    pub ts: Millis,
}

/// A point that may be absent, in the 16 bytes of a point, where an `Option<Coord>` takes 24: a
/// latitude that is not a number, which no event can carry (JSON has none, and decoding checks
/// the range), stands for none. It is an `Option<Coord>` everywhere outside the process:
/// serialized as one, and compared, ordered and hashed as one (none first).
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
#[serde(from = "Option<Coord>", into = "Option<Coord>")]
pub struct OptionalPoint(Coord);

impl OptionalPoint {
    /// No point.
    pub const NONE: OptionalPoint = OptionalPoint(Coord {
        lat: f64::NAN,
        lon: f64::NAN,
    });

    /// The point, if there is one.
    pub fn get(&self) -> Option<Coord> {
        Some(self.0).filter(|p| !p.lat.is_nan())
    }
}

impl From<OptionalPoint> for Option<Coord> {
    fn from(point: OptionalPoint) -> Self {
        point.get()
    }
}

impl Default for OptionalPoint {
    fn default() -> Self {
        Self::NONE
    }
}

impl From<Option<Coord>> for OptionalPoint {
    fn from(point: Option<Coord>) -> Self {
        point.map_or(Self::NONE, Self)
    }
}

impl PartialEq for OptionalPoint {
    fn eq(&self, other: &Self) -> bool {
        self.get() == other.get()
    }
}

impl Eq for OptionalPoint {}

impl PartialOrd for OptionalPoint {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for OptionalPoint {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.get().cmp(&other.get())
    }
}

impl std::hash::Hash for OptionalPoint {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.get().hash(state);
    }
}

/// An id that may be absent, in the 16 bytes of an id, where an `Option<Id>` takes 24 (an id has no
/// spare value for `None`): the empty id, which no event can carry (decoding refuses it), stands
/// for none. It is an `Option<Id>` everywhere outside the process: serialized as one, and ordered
/// as one (none first).
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(from = "Option<Id>", into = "Option<Id>")]
pub struct OptionalId(Id);

impl OptionalId {
    /// The id, if there is one.
    pub fn get(&self) -> Option<&Id> {
        Some(&self.0).filter(|id| !id.is_empty())
    }
}

impl From<Option<Id>> for OptionalId {
    fn from(id: Option<Id>) -> Self {
        Self(id.unwrap_or_default())
    }
}

impl From<OptionalId> for Option<Id> {
    fn from(id: OptionalId) -> Self {
        id.get().is_some().then_some(id.0)
    }
}

/// A delivery's latest state while it is not terminal: what an answer or a count can show of it.
/// The event's `delivery_type`, `pickup` point and `dropoff` point are not kept: no answer shows
/// them (CONTRACT section 3), and the pickup counts only through its district, decided when the
/// point arrives. Left out, they take 56 bytes off every delivery held.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct DeliveryRow {
    /// Latest status (never terminal here).
    pub status: DeliveryStatus,
    /// The district of the last known pickup point ([`crate::districts::UNASSIGNED`] without
    /// one, or outside every district).
    #[serde(with = "crate::districts::wire")]
    pub pickup_district: DistrictId,
    /// Last assigned rider.
    pub rider_id: OptionalId,
    /// Last known vehicle.
    pub vehicle: Option<Label>,
    /// `ts` of the latest applied event.
    pub ts: Millis,
}

impl DeliveryRow {
    /// Active: `ASSIGNED`, `DISPATCHED` or `PICKED_UP`, with a rider.
    pub fn is_active(&self) -> bool {
        self.active_for().is_some()
    }

    /// Waiting: `CREATED` or `WAITING`.
    pub fn is_waiting(&self) -> bool {
        self.status.is_waiting()
    }

    /// The rider this delivery is active for (CONTRACT section 3): it joins that rider's snapshot.
    pub fn active_for(&self) -> Option<&Id> {
        self.rider_id.get().filter(|_| self.status.is_active())
    }

    /// The district whose waiting deliveries this one counts in, if waiting.
    pub fn waiting_in(&self) -> Option<DistrictId> {
        self.is_waiting().then_some(self.pickup_district)
    }

    /// What a delivery shows in its rider's snapshot.
    pub fn brief(&self, delivery_id: Id) -> DeliveryBrief {
        DeliveryBrief {
            delivery_id,
            status: self.status,
            vehicle: self.vehicle.clone(),
            ts: self.ts,
        }
    }
}

/// What a rider snapshot shows of one active delivery.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct DeliveryBrief {
    /// The delivery.
    pub delivery_id: Id,
    /// Its status (active).
    pub status: DeliveryStatus,
    /// Its vehicle, if known.
    pub vehicle: Option<Label>,
    /// `ts` of its latest applied event.
    pub ts: Millis,
}

/// A rider on shift joined with its active deliveries (sorted by delivery id): the rider snapshot
/// of CONTRACT section 3.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Snapshot {
    /// The rider's state.
    pub rider: RiderRow,
    /// Its active deliveries, sorted by id. A boxed slice, not a `Vec`: exactly as long as it
    /// holds, where a `Vec` that grew by pushes keeps room for four.
    pub deliveries: Box<[DeliveryBrief]>,
}

impl Snapshot {
    /// What the rider counts in: its district, and its number of active deliveries.
    pub fn counted(&self) -> (DistrictId, usize) {
        (self.rider.district, self.deliveries.len())
    }

    /// The latest `ts` among the rider's event and its active deliveries' events.
    pub fn updated_ts(&self) -> Millis {
        self.deliveries
            .iter()
            .map(|d| d.ts)
            .fold(self.rider.ts, Millis::max)
    }
}

/// What one record adds to its district's counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Contribution {
    /// A rider on shift.
    OnShift,
    /// A rider on shift with at least one active delivery.
    Delivering,
    /// An active delivery of a rider on shift.
    Active,
    /// A waiting delivery picked up here.
    Waiting,
}

impl Contribution {
    /// What a rider on shift in `district` with `active` active deliveries adds to its counts:
    /// each kind with how many it adds (kinds it adds none of are left out).
    pub fn of_rider(
        district: DistrictId,
        active: usize,
    ) -> impl Iterator<Item = ((DistrictId, Contribution), u64)> {
        let active = active as u64;
        [
            (Contribution::OnShift, 1),
            (Contribution::Delivering, u64::from(active > 0)),
            (Contribution::Active, active),
        ]
        .into_iter()
        .filter(|(_, n)| *n > 0)
        .map(move |(kind, n)| ((district, kind), n))
    }
}

/// The counts of one district (CONTRACT section 3); `riders_idle` and `pressure` are derived.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct DistrictCounts {
    /// Riders on shift whose district is this one.
    pub riders_on_shift: u64,
    /// Of those, riders with at least one active delivery.
    pub riders_delivering: u64,
    /// Active deliveries whose rider is on shift here.
    pub active_deliveries: u64,
    /// Waiting deliveries whose pickup is here.
    pub waiting_deliveries: u64,
}

impl DistrictCounts {
    /// `riders_on_shift - riders_delivering`.
    pub fn riders_idle(&self) -> u64 {
        self.riders_on_shift.saturating_sub(self.riders_delivering)
    }

    /// `waiting_deliveries / max(riders_idle, 1)`.
    pub fn pressure(&self) -> f64 {
        self.waiting_deliveries as f64 / self.riders_idle().max(1) as f64
    }

    /// Whether every count is zero.
    pub fn is_zero(&self) -> bool {
        *self == Self::default()
    }

    /// Counts `n` contributions of one kind.
    pub fn add(&mut self, kind: Contribution, n: u64) {
        match kind {
            Contribution::OnShift => self.riders_on_shift += n,
            Contribution::Delivering => self.riders_delivering += n,
            Contribution::Active => self.active_deliveries += n,
            Contribution::Waiting => self.waiting_deliveries += n,
        }
    }
}

/// One changelog record: the final value of `key` after `time`, or `None` when the key went away
/// (a tombstone). At most one per key and time.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Change<K, V> {
    /// The key.
    pub key: K,
    /// Its value after `time`; `None` when it has none any more.
    pub value: Option<V>,
    /// The dataflow time of the change (`as_of` of the record).
    pub time: Time,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An optional id is an `Option<Id>` to everything outside the process, in 16 bytes.
    #[test]
    fn an_optional_id_is_an_option_in_16_bytes() {
        assert_eq!(std::mem::size_of::<OptionalId>(), 16);
        for id in [None, Some(Id::from("r-1"))] {
            let optional = OptionalId::from(id.clone());
            assert_eq!(optional.get(), id.as_ref());
            let json = serde_json::to_string(&optional).expect("serializes");
            assert_eq!(json, serde_json::to_string(&id).expect("serializes"));
            let back: OptionalId = serde_json::from_str(&json).expect("deserializes");
            assert_eq!((Option::<Id>::from(back.clone()), back), (id, optional));
        }
        assert!(OptionalId::from(None) < OptionalId::from(Some("a".into())));
    }

    /// An optional point is an `Option<Coord>` to everything outside the process, in 16 bytes.
    #[test]
    fn an_optional_point_is_an_option_in_16_bytes() {
        assert_eq!(std::mem::size_of::<OptionalPoint>(), 16);
        assert_eq!(std::mem::size_of::<RiderRow>(), 32);
        let seoul = Coord {
            lat: 37.5,
            lon: 127.0,
        };
        for point in [None, Some(seoul)] {
            let optional = OptionalPoint::from(point);
            assert_eq!(optional.get(), point);
            let json = serde_json::to_string(&optional).expect("serializes");
            assert_eq!(json, serde_json::to_string(&point).expect("serializes"));
            let back: OptionalPoint = serde_json::from_str(&json).expect("deserializes");
            assert_eq!(back, optional);
        }
        assert_eq!(OptionalPoint::NONE, OptionalPoint::from(None));
        assert!(OptionalPoint::NONE < OptionalPoint::from(Some(seoul)));
    }
}
