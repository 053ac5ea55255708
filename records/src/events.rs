//! The input events of CONTRACT section 2 as typed records, and their JSON decoding.
//!
//! Decoding is pure: bytes in, a typed event or a typed [`DecodeError`] out. Every bad input of
//! CONTRACT section 4 has its own error variant, so that the caller can dead-letter the record with a
//! precise reason and count it under a stable label.

use std::borrow::Cow;
use std::cmp::Ordering;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::error::DecodeError;
use crate::label::Label;

/// A rider or delivery id: 16 bytes, where each of the maps that key a rider by its id (the rider
/// upsert, the serving view, its district lists) holds one. An id of up to 15 bytes is stored
/// inline, without a heap allocation; a longer one is one reference-counted allocation, which the
/// id's copies in those maps share.
pub type Id = ecow::EcoString;

/// Event time or ingest time, in milliseconds since the Unix epoch.
pub type Millis = u64;

/// Wall-clock time in ms since the Unix epoch (0 on a clock set before it).
pub fn now_ms() -> Millis {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as Millis)
}

/// A WGS84 point. Ordered by the IEEE total order of its fields so that it can live in arrangements.
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
pub struct Coord {
    /// Latitude in degrees, -90 to 90.
    pub lat: f64,
    /// Longitude in degrees, -180 to 180.
    pub lon: f64,
}

impl PartialEq for Coord {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for Coord {}
impl PartialOrd for Coord {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Coord {
    fn cmp(&self, other: &Self) -> Ordering {
        self.lat
            .total_cmp(&other.lat)
            .then(self.lon.total_cmp(&other.lon))
    }
}
impl std::hash::Hash for Coord {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.lat.to_bits().hash(state);
        self.lon.to_bits().hash(state);
    }
}

/// Status of a rider event (운행 시작 / 운행 중 / 운행 종료).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum RiderStatus {
    /// 운행 시작: the shift starts.
    ShiftStarted,
    /// 운행 중: a periodic position update during the shift.
    OnShift,
    /// 운행 종료: the shift ends.
    ShiftEnded,
}

impl RiderStatus {
    /// Every status, in contract order.
    pub const ALL: [RiderStatus; 3] = [Self::ShiftStarted, Self::OnShift, Self::ShiftEnded];

    /// The wire name, as in CONTRACT section 2.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ShiftStarted => "SHIFT_STARTED",
            Self::OnShift => "ON_SHIFT",
            Self::ShiftEnded => "SHIFT_ENDED",
        }
    }

    /// Parses a wire name.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|x| x.as_str() == s)
    }

    /// A rider is on shift when its latest status is `SHIFT_STARTED` or `ON_SHIFT`.
    pub fn on_shift(self) -> bool {
        !matches!(self, Self::ShiftEnded)
    }
}

/// Status of a delivery event (배달 생성 → 대기 중 → 배차 확정 → 배차 완료 → 픽업 완료 → 배달 완료).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum DeliveryStatus {
    /// 배달 생성.
    Created,
    /// 대기 중.
    Waiting,
    /// 배차 확정.
    Assigned,
    /// 배차 완료.
    Dispatched,
    /// 픽업 완료.
    PickedUp,
    /// 배달 완료 (terminal).
    Delivered,
    /// Cancelled (terminal).
    Cancelled,
}

impl DeliveryStatus {
    /// Every status, in contract order.
    pub const ALL: [DeliveryStatus; 7] = [
        Self::Created,
        Self::Waiting,
        Self::Assigned,
        Self::Dispatched,
        Self::PickedUp,
        Self::Delivered,
        Self::Cancelled,
    ];

    /// The wire name, as in CONTRACT section 2.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Created => "CREATED",
            Self::Waiting => "WAITING",
            Self::Assigned => "ASSIGNED",
            Self::Dispatched => "DISPATCHED",
            Self::PickedUp => "PICKED_UP",
            Self::Delivered => "DELIVERED",
            Self::Cancelled => "CANCELLED",
        }
    }

    /// Parses a wire name.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|x| x.as_str() == s)
    }

    /// `DELIVERED` and `CANCELLED` end a delivery for good.
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Delivered | Self::Cancelled)
    }

    /// `ASSIGNED`, `DISPATCHED` and `PICKED_UP` (with a rider) make a delivery active.
    pub fn is_active(self) -> bool {
        matches!(self, Self::Assigned | Self::Dispatched | Self::PickedUp)
    }

    /// `CREATED` and `WAITING` make a delivery waiting.
    pub fn is_waiting(self) -> bool {
        matches!(self, Self::Created | Self::Waiting)
    }
}

/// A rider event: shift start, position ping or shift end.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct RiderEvent {
    /// The rider; the truth, whatever the Kafka key says.
    pub rider_id: Id,
    /// What happened.
    pub status: RiderStatus,
    /// Free-form rider type (e.g. `CONNECT`); missing means "unchanged".
    pub rider_type: Option<Label>,
    /// Position; missing means "unchanged".
    pub location: Option<Coord>,
    /// Event time.
    pub ts: Millis,
}

/// A delivery event.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct DeliveryEvent {
    /// The delivery; the truth, whatever the Kafka key says.
    pub delivery_id: Id,
    /// What happened.
    pub status: DeliveryStatus,
    /// Free-form delivery type (e.g. `FOOD`); missing means "unchanged".
    pub delivery_type: Option<Label>,
    /// Pickup point; missing means "unchanged". The address text is not kept.
    pub pickup: Option<Coord>,
    /// Drop-off point; missing means "unchanged".
    pub dropoff: Option<Coord>,
    /// Assigned rider; a new one replaces the old (reassignment), missing means "unchanged".
    pub rider_id: Option<Id>,
    /// Free-form vehicle (e.g. `MOTORCYCLE`); missing means "unchanged".
    pub vehicle: Option<Label>,
    /// Event time.
    pub ts: Millis,
}

impl DeliveryEvent {
    /// An event that carries only its id, status and time (every other field "unchanged").
    pub fn bare(delivery_id: Id, status: DeliveryStatus, ts: Millis) -> Self {
        Self {
            delivery_id,
            status,
            delivery_type: None,
            pickup: None,
            dropoff: None,
            rider_id: None,
            vehicle: None,
            ts,
        }
    }
}

/// The fields of a rider event as found in the JSON object, before their types are checked.
#[derive(Deserialize)]
struct RawRider<'a> {
    #[serde(borrow)]
    rider_id: Option<&'a RawValue>,
    #[serde(borrow)]
    status: Option<&'a RawValue>,
    #[serde(borrow)]
    rider_type: Option<&'a RawValue>,
    #[serde(borrow)]
    location: Option<&'a RawValue>,
    #[serde(borrow)]
    ts: Option<&'a RawValue>,
}

/// The fields of a delivery event as found in the JSON object, before their types are checked.
#[derive(Deserialize)]
struct RawDelivery<'a> {
    #[serde(borrow)]
    delivery_id: Option<&'a RawValue>,
    #[serde(borrow)]
    status: Option<&'a RawValue>,
    #[serde(borrow)]
    delivery_type: Option<&'a RawValue>,
    #[serde(borrow)]
    pickup: Option<&'a RawValue>,
    #[serde(borrow)]
    dropoff: Option<&'a RawValue>,
    #[serde(borrow)]
    rider_id: Option<&'a RawValue>,
    #[serde(borrow)]
    vehicle: Option<&'a RawValue>,
    #[serde(borrow)]
    ts: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct RawPoint<'a> {
    #[serde(borrow)]
    lat: Option<&'a RawValue>,
    #[serde(borrow)]
    lon: Option<&'a RawValue>,
}

fn is_null(raw: Option<&RawValue>) -> bool {
    raw.is_none_or(|r| r.get() == "null")
}

fn required<'a>(
    raw: Option<&'a RawValue>,
    field: &'static str,
) -> Result<&'a RawValue, DecodeError> {
    match raw {
        Some(r) if r.get() != "null" => Ok(r),
        _ => Err(DecodeError::MissingField(field)),
    }
}

fn string<'a>(raw: &'a RawValue, field: &'static str) -> Result<Cow<'a, str>, DecodeError> {
    serde_json::from_str::<Cow<'a, str>>(raw.get()).map_err(|_| DecodeError::WrongType(field))
}

fn id(raw: Option<&RawValue>, field: &'static str) -> Result<Id, DecodeError> {
    let s = string(required(raw, field)?, field)?;
    if s.is_empty() {
        return Err(DecodeError::EmptyId(field));
    }
    Ok(Id::from(s.as_ref()))
}

fn optional_label(
    raw: Option<&RawValue>,
    field: &'static str,
) -> Result<Option<Label>, DecodeError> {
    if is_null(raw) {
        return Ok(None);
    }
    let s = string(required(raw, field)?, field)?;
    Ok(Some(Label::new(s.as_ref())))
}

/// An optional id: missing or null is `None`, the empty string is an error.
fn optional_id(raw: Option<&RawValue>, field: &'static str) -> Result<Option<Id>, DecodeError> {
    if is_null(raw) {
        return Ok(None);
    }
    id(raw, field).map(Some)
}

fn ts(raw: Option<&RawValue>) -> Result<Millis, DecodeError> {
    serde_json::from_str::<u64>(required(raw, "ts")?.get())
        .map_err(|_| DecodeError::WrongType("ts"))
}

fn degrees(raw: Option<&RawValue>, field: &'static str, limit: f64) -> Result<f64, DecodeError> {
    let value: f64 = serde_json::from_str(required(raw, field)?.get())
        .map_err(|_| DecodeError::WrongType(field))?;
    if !(-limit..=limit).contains(&value) {
        return Err(DecodeError::OutOfRange { field, value });
    }
    Ok(value)
}

fn point(raw: Option<&RawValue>, field: &'static str) -> Result<Option<Coord>, DecodeError> {
    if is_null(raw) {
        return Ok(None);
    }
    let raw = required(raw, field)?;
    if !raw.get().starts_with('{') {
        return Err(DecodeError::WrongType(field));
    }
    let p: RawPoint = serde_json::from_str(raw.get()).map_err(|_| DecodeError::WrongType(field))?;
    let (lat_name, lon_name) = match field {
        "pickup" => ("pickup.lat", "pickup.lon"),
        "dropoff" => ("dropoff.lat", "dropoff.lon"),
        _ => ("location.lat", "location.lon"),
    };
    Ok(Some(Coord {
        lat: degrees(p.lat, lat_name, 90.0)?,
        lon: degrees(p.lon, lon_name, 180.0)?,
    }))
}

fn malformed(e: serde_json::Error) -> DecodeError {
    DecodeError::Malformed(e.to_string())
}

/// Checks that the input is UTF-8 text holding a JSON object (serde would also take an array of
/// field values, and skips unknown fields without checking their text).
fn object_text(bytes: &[u8]) -> Result<&str, DecodeError> {
    let text = std::str::from_utf8(bytes)
        .map_err(|e| DecodeError::Malformed(format!("not UTF-8: {e}")))?;
    if text.trim().is_empty() {
        return Err(DecodeError::Malformed(
            "empty input (EOF while parsing a value)".into(),
        ));
    }
    if !text.trim_start().starts_with('{') {
        return Err(DecodeError::Malformed("expected a JSON object".into()));
    }
    Ok(text)
}

/// Decodes a rider event from its JSON bytes.
///
/// ```
/// use dongflow_records::events::{decode_rider, RiderStatus};
/// let e = decode_rider(br#"{"rider_id":"r-1","status":"ON_SHIFT","ts":5,"extra":true}"#).unwrap();
/// assert_eq!((e.rider_id.as_str(), e.status, e.ts), ("r-1", RiderStatus::OnShift, 5));
/// assert!(decode_rider(br#"{"rider_id":"r-1","status":"NAPPING","ts":5}"#).is_err());
/// ```
pub fn decode_rider(bytes: &[u8]) -> Result<RiderEvent, DecodeError> {
    let raw: RawRider = serde_json::from_str(object_text(bytes)?).map_err(malformed)?;
    let rider_id = id(raw.rider_id, "rider_id")?;
    let status = string(required(raw.status, "status")?, "status")?;
    let status = RiderStatus::parse(&status)
        .ok_or_else(|| DecodeError::UnknownStatus(status.into_owned()))?;
    Ok(RiderEvent {
        rider_id,
        status,
        rider_type: optional_label(raw.rider_type, "rider_type")?,
        location: point(raw.location, "location")?,
        ts: ts(raw.ts)?,
    })
}

/// Decodes a delivery event from its JSON bytes.
///
/// ```
/// use dongflow_records::events::{decode_delivery, DeliveryStatus};
/// let e = decode_delivery(br#"{"delivery_id":"d-9","status":"ASSIGNED","rider_id":"r-17","ts":7}"#).unwrap();
/// assert_eq!(e.status, DeliveryStatus::Assigned);
/// assert_eq!(e.rider_id.as_deref(), Some("r-17"));
/// ```
pub fn decode_delivery(bytes: &[u8]) -> Result<DeliveryEvent, DecodeError> {
    let raw: RawDelivery = serde_json::from_str(object_text(bytes)?).map_err(malformed)?;
    let delivery_id = id(raw.delivery_id, "delivery_id")?;
    let status = string(required(raw.status, "status")?, "status")?;
    let status = DeliveryStatus::parse(&status)
        .ok_or_else(|| DecodeError::UnknownStatus(status.into_owned()))?;
    Ok(DeliveryEvent {
        delivery_id,
        status,
        delivery_type: optional_label(raw.delivery_type, "delivery_type")?,
        pickup: point(raw.pickup, "pickup")?,
        dropoff: point(raw.dropoff, "dropoff")?,
        rider_id: optional_id(raw.rider_id, "rider_id")?,
        vehicle: optional_label(raw.vehicle, "vehicle")?,
        ts: ts(raw.ts)?,
    })
}

/// Encodes a rider event as the JSON of CONTRACT section 2 (fields that are `None` are left out).
pub fn encode_rider(e: &RiderEvent) -> Vec<u8> {
    let mut obj = serde_json::Map::new();
    obj.insert("rider_id".into(), e.rider_id.as_str().into());
    obj.insert("status".into(), e.status.as_str().into());
    if let Some(t) = &e.rider_type {
        obj.insert("rider_type".into(), (*t.text()).into());
    }
    if let Some(c) = e.location {
        obj.insert(
            "location".into(),
            serde_json::json!({"lat": c.lat, "lon": c.lon}),
        );
    }
    obj.insert("ts".into(), e.ts.into());
    serde_json::Value::Object(obj).to_string().into_bytes()
}

/// Encodes a delivery event as the JSON of CONTRACT section 2 (fields that are `None` are left out).
pub fn encode_delivery(e: &DeliveryEvent) -> Vec<u8> {
    let mut obj = serde_json::Map::new();
    obj.insert("delivery_id".into(), e.delivery_id.as_str().into());
    obj.insert("status".into(), e.status.as_str().into());
    let (delivery_type, vehicle) = (
        e.delivery_type.as_ref().map(Label::text),
        e.vehicle.as_ref().map(Label::text),
    );
    let labels = [
        ("delivery_type", delivery_type.as_deref()),
        ("rider_id", e.rider_id.as_deref()),
        ("vehicle", vehicle.as_deref()),
    ];
    for (name, value) in labels {
        if let Some(v) = value {
            obj.insert(name.into(), v.into());
        }
    }
    for (name, value) in [("pickup", e.pickup), ("dropoff", e.dropoff)] {
        if let Some(c) = value {
            obj.insert(name.into(), serde_json::json!({"lat": c.lat, "lon": c.lon}));
        }
    }
    obj.insert("ts".into(), e.ts.into());
    serde_json::Value::Object(obj).to_string().into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An id is 16 bytes; short and long ids decode, compare and
    /// serialize by their text (bincode, as checkpoints and cluster exchange take them).
    #[test]
    fn ids_are_small_and_long_ones_keep_their_text() {
        assert_eq!(std::mem::size_of::<Id>(), 16);
        let long = "r-1-6f1c2a9e-3b7d-4c55-9a0e-12ab34cd56ef";
        for id in ["r-1", "fifteen-bytes-x", long] {
            let json = format!(r#"{{"rider_id": "{id}", "status": "SHIFT_STARTED", "ts": 1}}"#);
            let event = decode_rider(json.as_bytes()).expect("decodes");
            assert_eq!(event.rider_id.as_str(), id);
            let bytes = bincode::serialize(&event.rider_id).expect("encodes");
            let back: Id = bincode::deserialize(&bytes).expect("decodes");
            assert_eq!(back, event.rider_id);
            assert_eq!(back.cmp(&Id::from(id)), std::cmp::Ordering::Equal);
        }
        let sorted = [Id::from("r-1"), Id::from(long), Id::from("r-2")];
        assert!(sorted.is_sorted(), "ordered by text: {sorted:?}");
    }
}
