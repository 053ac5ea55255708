//! The JSON of CONTRACT section 6: district objects and rider snapshots, as HTTP answers and
//! changelog values show them.

use dongflow_connectors::Coord;
use dongflow_dataflow::districts::{DistrictId, DistrictIndex};
use dongflow_dataflow::types::{DistrictCounts, Snapshot, Time};
use serde::Serialize;

/// A district object.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct DistrictView<'a> {
    /// District code.
    pub code: &'a str,
    /// District name.
    pub name: &'a str,
    /// Riders on shift here.
    pub riders_on_shift: u64,
    /// Of those, riders with an active delivery.
    pub riders_delivering: u64,
    /// `riders_on_shift - riders_delivering`.
    pub riders_idle: u64,
    /// Active deliveries of riders on shift here.
    pub active_deliveries: u64,
    /// Waiting deliveries picked up here.
    pub waiting_deliveries: u64,
    /// `waiting_deliveries / max(riders_idle, 1)`.
    pub pressure: f64,
}

impl<'a> DistrictView<'a> {
    /// The view of district `id` with `counts`.
    pub fn new(index: &'a DistrictIndex, id: DistrictId, counts: &DistrictCounts) -> Self {
        Self {
            code: index.code(id),
            name: index.name(id),
            riders_on_shift: counts.riders_on_shift,
            riders_delivering: counts.riders_delivering,
            riders_idle: counts.riders_idle(),
            active_deliveries: counts.active_deliveries,
            waiting_deliveries: counts.waiting_deliveries,
            pressure: counts.pressure(),
        }
    }
}

/// A point as `{"lat", "lon"}`.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct PointView {
    /// Latitude.
    pub lat: f64,
    /// Longitude.
    pub lon: f64,
}

impl From<Coord> for PointView {
    fn from(c: Coord) -> Self {
        Self {
            lat: c.lat,
            lon: c.lon,
        }
    }
}

/// A district reference inside a rider snapshot.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct DistrictRef<'a> {
    /// District code.
    pub code: &'a str,
    /// District name.
    pub name: &'a str,
}

/// An active delivery inside a rider snapshot.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct DeliveryView<'a> {
    /// The delivery.
    pub delivery_id: &'a str,
    /// Its status.
    pub status: &'static str,
    /// Its vehicle, `null` when unknown.
    pub vehicle: Option<&'a str>,
}

/// A rider snapshot.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RiderView<'a> {
    /// The rider.
    pub rider_id: &'a str,
    /// Its latest status.
    pub status: &'static str,
    /// Its rider type, `null` when never given.
    pub rider_type: Option<&'a str>,
    /// Its location, `null` when never given.
    pub location: Option<PointView>,
    /// The district of its location.
    pub district: DistrictRef<'a>,
    /// Its active deliveries, by id.
    pub deliveries: Vec<DeliveryView<'a>>,
    /// The latest `ts` of the rider's and its active deliveries' events.
    pub updated_ts: u64,
}

impl<'a> RiderView<'a> {
    /// The view of rider `id`'s snapshot.
    pub fn new(index: &'a DistrictIndex, id: &'a str, s: &'a Snapshot) -> Self {
        Self {
            rider_id: id,
            status: s.rider.status.as_str(),
            rider_type: s.rider.rider_type.as_deref(),
            location: s.rider.location.map(PointView::from),
            district: DistrictRef {
                code: index.code(s.rider.district),
                name: index.name(s.rider.district),
            },
            deliveries: s
                .deliveries
                .iter()
                .map(|d| DeliveryView {
                    delivery_id: d.delivery_id.as_str(),
                    status: d.status.as_str(),
                    vehicle: d.vehicle.as_deref(),
                })
                .collect(),
            updated_ts: s.updated_ts(),
        }
    }
}

/// A value with `as_of` and `stale` beside its own fields.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Stamped<T> {
    /// The object's own fields.
    #[serde(flatten)]
    pub value: T,
    /// The dataflow time of the answer.
    pub as_of: Time,
    /// Whether the answer comes from the changelog-backed backup view.
    pub stale: bool,
}

/// `GET /v1/districts`: districts sorted by code.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct DistrictsView<'a> {
    /// The dataflow time of the answer.
    pub as_of: Time,
    /// Whether the answer comes from the backup view.
    pub stale: bool,
    /// Districts with any nonzero count, by code.
    pub districts: Vec<DistrictView<'a>>,
}

impl<'a> DistrictsView<'a> {
    /// The view of `counts`, sorted by code.
    pub fn new(
        index: &'a DistrictIndex,
        as_of: Time,
        stale: bool,
        counts: &[(DistrictId, DistrictCounts)],
    ) -> Self {
        let mut districts: Vec<_> = counts
            .iter()
            .map(|(d, c)| DistrictView::new(index, *d, c))
            .collect();
        districts.sort_by(|a, b| a.code.cmp(b.code));
        Self {
            as_of,
            stale,
            districts,
        }
    }
}

/// `GET /v1/districts/{code}/riders`: riders sorted by id.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RidersView<'a> {
    /// The dataflow time of the answer.
    pub as_of: Time,
    /// Whether the answer comes from the backup view.
    pub stale: bool,
    /// Snapshots of the riders on shift there, by id.
    pub riders: Vec<RiderView<'a>>,
}
