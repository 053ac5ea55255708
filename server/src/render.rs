//! The JSON of CONTRACT section 6: district objects and rider snapshots, as HTTP answers and
//! changelog values show them, and changelog values read back ([`decode_rider`],
//! [`decode_district`]) into what renders them again.

use dongflow_connectors::{Coord, Label};
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
    pub vehicle: Option<&'a Label>,
}

/// A rider snapshot.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RiderView<'a> {
    /// The rider.
    pub rider_id: &'a str,
    /// Its latest status.
    pub status: &'static str,
    /// Its rider type, `null` when never given.
    pub rider_type: Option<&'a Label>,
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
            rider_type: s.rider.rider_type.as_ref(),
            location: s.rider.location.get().map(PointView::from),
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
                    vehicle: d.vehicle.as_ref(),
                })
                .collect(),
            updated_ts: s.updated_ts(),
        }
    }
}

/// A hash of what a changelog value renders, `as_of` aside: two values with the same fingerprint
/// render the same record (up to a 64-bit hash collision), so a run that finds the changelog
/// holding a value's fingerprint need not write it again.
pub trait Fingerprint {
    /// The hash of the rendered fields.
    fn fingerprint(&self) -> u64;
}

fn hashed(f: impl FnOnce(&mut std::collections::hash_map::DefaultHasher)) -> u64 {
    use std::hash::Hasher;
    // Fixed keys: the same value hashes the same in every thread of the process.
    let mut h = std::collections::hash_map::DefaultHasher::new();
    f(&mut h);
    h.finish()
}

impl Fingerprint for DistrictCounts {
    fn fingerprint(&self) -> u64 {
        // The derived fields (`riders_idle`, `pressure`) follow from these.
        hashed(|h| std::hash::Hash::hash(self, h))
    }
}

impl Fingerprint for Snapshot {
    /// Exactly the fields [`RiderView`] renders: a delivery's own `ts` only through `updated_ts`.
    fn fingerprint(&self) -> u64 {
        use std::hash::Hash;
        hashed(|h| {
            let r = &self.rider;
            (r.status, &r.rider_type, r.district, self.updated_ts()).hash(h);
            r.location
                .get()
                .map(|c| (c.lat.to_bits(), c.lon.to_bits()))
                .hash(h);
            for d in &self.deliveries {
                (&d.delivery_id, d.status, &d.vehicle).hash(h);
            }
        })
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
    /// Whether the answer comes from the stale view (the checkpoint and the changelog).
    pub stale: bool,
}

/// `GET /v1/districts`: districts sorted by code.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct DistrictsView<'a> {
    /// The dataflow time of the answer.
    pub as_of: Time,
    /// Whether the answer comes from the stale view.
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
    /// Whether the answer comes from the stale view.
    pub stale: bool,
    /// Snapshots of the riders on shift there, by id.
    pub riders: Vec<RiderView<'a>>,
}

/// Why a changelog value cannot be read back into the view.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// Not the JSON of a district object or rider snapshot.
    #[error("not a changelog value: {0}")]
    Json(#[from] serde_json::Error),
    /// A district code this process's map does not have.
    #[error("unknown district code {0}")]
    UnknownDistrict(String),
    /// A status name CONTRACT section 2 does not have.
    #[error("unknown status {0}")]
    UnknownStatus(String),
}

/// A district changelog value, as [`DistrictView`] wrote it.
#[derive(serde::Deserialize)]
struct DistrictRecord {
    riders_on_shift: u64,
    riders_delivering: u64,
    active_deliveries: u64,
    waiting_deliveries: u64,
    as_of: Time,
}

/// A rider changelog value, as [`RiderView`] wrote it.
#[derive(serde::Deserialize)]
struct RiderRecord {
    status: String,
    rider_type: Option<String>,
    location: Option<PointRecord>,
    district: DistrictRefRecord,
    deliveries: Vec<DeliveryRecord>,
    updated_ts: u64,
    as_of: Time,
}

#[derive(serde::Deserialize)]
struct PointRecord {
    lat: f64,
    lon: f64,
}

#[derive(serde::Deserialize)]
struct DistrictRefRecord {
    code: String,
}

#[derive(serde::Deserialize)]
struct DeliveryRecord {
    delivery_id: String,
    status: String,
    vehicle: Option<String>,
}

fn district_id(index: &DistrictIndex, code: &str) -> Result<DistrictId, DecodeError> {
    index
        .id_of(code)
        .ok_or_else(|| DecodeError::UnknownDistrict(code.to_owned()))
}

/// A district changelog value read back: its counts and `as_of`.
pub fn decode_district(value: &[u8]) -> Result<(DistrictCounts, Time), DecodeError> {
    let r: DistrictRecord = serde_json::from_slice(value)?;
    let counts = DistrictCounts {
        riders_on_shift: r.riders_on_shift,
        riders_delivering: r.riders_delivering,
        active_deliveries: r.active_deliveries,
        waiting_deliveries: r.waiting_deliveries,
    };
    Ok((counts, r.as_of))
}

/// A district changelog key read back.
pub fn decode_district_key(index: &DistrictIndex, code: &str) -> Result<DistrictId, DecodeError> {
    district_id(index, code)
}

/// A rider changelog value read back: a snapshot that [`RiderView`] renders exactly as it was
/// written (the record has one `updated_ts`, kept as the rider's own), and `as_of`.
pub fn decode_rider(index: &DistrictIndex, value: &[u8]) -> Result<(Snapshot, Time), DecodeError> {
    use dongflow_connectors::{DeliveryStatus, RiderStatus};
    use dongflow_dataflow::types::{DeliveryBrief, RiderRow};
    let r: RiderRecord = serde_json::from_slice(value)?;
    let status = RiderStatus::parse(&r.status).ok_or(DecodeError::UnknownStatus(r.status))?;
    let deliveries = r
        .deliveries
        .into_iter()
        .map(|d| {
            Ok(DeliveryBrief {
                delivery_id: d.delivery_id.into(),
                status: DeliveryStatus::parse(&d.status)
                    .ok_or(DecodeError::UnknownStatus(d.status))?,
                vehicle: d.vehicle.as_deref().map(Label::new),
                ts: 0,
            })
        })
        .collect::<Result<Vec<_>, DecodeError>>()?;
    let rider = RiderRow {
        status,
        rider_type: r.rider_type.as_deref().map(Label::new),
        location: r
            .location
            .map(|p| Coord {
                lat: p.lat,
                lon: p.lon,
            })
            .into(),
        district: district_id(index, &r.district.code)?,
        ts: r.updated_ts,
    };
    Ok((
        Snapshot {
            rider,
            deliveries: deliveries.into(),
        },
        r.as_of,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::changelog::Changelogged;
    use dongflow_connectors::{DeliveryStatus, RiderStatus};
    use dongflow_dataflow::types::{DeliveryBrief, RiderRow};

    /// What the changelog writes reads back into values that render the same bytes.
    #[test]
    fn changelog_values_read_back_into_what_renders_them() {
        let index = DistrictIndex::new(dongflow_dataflow::builtin_map::seoul_gu()).expect("map");
        let snapshot = Snapshot {
            rider: RiderRow {
                status: RiderStatus::OnShift,
                rider_type: Some("CONNECT".into()),
                location: Some(Coord {
                    lat: 37.4979,
                    lon: 127.0276,
                })
                .into(),
                district: 3,
                ts: 1_000,
            },
            deliveries: vec![DeliveryBrief {
                delivery_id: "d-9".into(),
                status: DeliveryStatus::PickedUp,
                vehicle: Some("MOTORCYCLE".into()),
                ts: 2_000,
            }]
            .into(),
        };
        let written = serde_json::to_vec(&Changelogged {
            value: RiderView::new(&index, "r-17", &snapshot),
            as_of: 77,
        })
        .expect("rendered");
        let (back, as_of) = decode_rider(&index, &written).expect("read back");
        assert_eq!(as_of, 77);
        assert_eq!(
            back.fingerprint(),
            snapshot.fingerprint(),
            "renders the same"
        );
        let mut moved = snapshot.clone();
        moved.rider.location = Some(Coord {
            lat: 37.5,
            lon: 127.0276,
        })
        .into();
        assert_ne!(
            moved.fingerprint(),
            snapshot.fingerprint(),
            "a rendered field"
        );
        let mut earlier = snapshot.clone();
        earlier.rider.ts = 900;
        assert_eq!(
            earlier.fingerprint(),
            snapshot.fingerprint(),
            "the rider's own ts shows only through updated_ts (2,000 either way)"
        );
        let again = serde_json::to_vec(&Changelogged {
            value: RiderView::new(&index, "r-17", &back),
            as_of,
        })
        .expect("rendered");
        assert_eq!(
            String::from_utf8_lossy(&again),
            String::from_utf8_lossy(&written)
        );

        let counts = DistrictCounts {
            riders_on_shift: 4,
            riders_delivering: 1,
            active_deliveries: 2,
            waiting_deliveries: 3,
        };
        let written = serde_json::to_vec(&Changelogged {
            value: DistrictView::new(&index, 3, &counts),
            as_of: 78,
        })
        .expect("rendered");
        assert_eq!(decode_district(&written).expect("read back"), (counts, 78));
        assert_eq!(
            decode_district_key(&index, index.code(3)).expect("known"),
            3
        );
        assert!(matches!(
            decode_district_key(&index, "0000000000"),
            Err(DecodeError::UnknownDistrict(_))
        ));
        assert!(matches!(
            decode_rider(&index, b"{\"status\": 1}"),
            Err(DecodeError::Json(_))
        ));
    }
}
