//! Decoding of the input events (CONTRACT sections 2 and 4): every bad input gives its own typed
//! error with a stable reason label and a `Display` that names the field or the problem; good inputs
//! decode to the expected structs; encode→decode is the identity; no input ever panics.
//!
//! Each bad-input test runs against both the rider and the delivery decoder.

use std::panic::{catch_unwind, AssertUnwindSafe};

use dongflow_records::events::{decode_delivery, decode_rider, encode_delivery, encode_rider};
use dongflow_records::{
    Coord, DecodeError, DeliveryEvent, DeliveryStatus, Id, Label, RiderEvent, RiderStatus,
};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Map, Value};

/// The rider example of CONTRACT section 2.
const RIDER_EXAMPLE: &str = r#"{"rider_id": "r-17", "status": "SHIFT_STARTED", "rider_type": "CONNECT",
 "location": {"lat": 37.4979, "lon": 127.0276}, "ts": 1764000000000}"#;

/// The delivery example of CONTRACT section 2.
const DELIVERY_EXAMPLE: &str = r#"{"delivery_id": "d-9", "status": "ASSIGNED", "delivery_type": "FOOD",
 "pickup":  {"lat": 37.50, "lon": 127.03, "address": "..."},
 "dropoff": {"lat": 37.51, "lon": 127.04, "address": "..."},
 "rider_id": "r-17", "vehicle": "MOTORCYCLE", "ts": 1764000005000}"#;

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq)]
enum Kind {
    Rider,
    Delivery,
}

const KINDS: [Kind; 2] = [Kind::Rider, Kind::Delivery];

impl Kind {
    fn example(self) -> &'static str {
        match self {
            Kind::Rider => RIDER_EXAMPLE,
            Kind::Delivery => DELIVERY_EXAMPLE,
        }
    }

    fn id_field(self) -> &'static str {
        match self {
            Kind::Rider => "rider_id",
            Kind::Delivery => "delivery_id",
        }
    }

    /// The fields holding a `{"lat", "lon"}` point.
    fn point_fields(self) -> &'static [&'static str] {
        match self {
            Kind::Rider => &["location"],
            Kind::Delivery => &["pickup", "dropoff"],
        }
    }

    /// A valid status of the other kind of event: unknown to this one.
    fn foreign_status(self) -> &'static str {
        match self {
            Kind::Rider => "ASSIGNED",
            Kind::Delivery => "ON_SHIFT",
        }
    }

    /// A valid status written in lower case: unknown (statuses are case-sensitive).
    fn lower_case_status(self) -> &'static str {
        match self {
            Kind::Rider => "on_shift",
            Kind::Delivery => "assigned",
        }
    }
}

/// Decodes with the decoder of `kind`; an accepted event comes back as its `Debug` text.
fn decode(kind: Kind, bytes: &[u8]) -> Result<String, DecodeError> {
    match kind {
        Kind::Rider => decode_rider(bytes).map(|e| format!("{e:?}")),
        Kind::Delivery => decode_delivery(bytes).map(|e| format!("{e:?}")),
    }
}

fn lossy(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Asserts that `input` is rejected by the decoder of `kind` with exactly `expected` (for
/// `Malformed`, whatever its message), under the label `reason`, and that the error's `Display`
/// contains every one of `shows`.
#[track_caller]
fn rejects(kind: Kind, input: &[u8], expected: &DecodeError, reason: &str, shows: &[&str]) {
    let err = match decode(kind, input) {
        Ok(event) => panic!(
            "{kind:?} decoder accepted {:?} as {event}; expected {expected:?}",
            lossy(input)
        ),
        Err(e) => e,
    };
    match expected {
        DecodeError::Malformed(_) => assert!(
            matches!(err, DecodeError::Malformed(_)),
            "{kind:?} decoder on {:?}: got {err:?}, expected Malformed",
            lossy(input)
        ),
        _ => assert_eq!(&err, expected, "{kind:?} decoder on {:?}", lossy(input)),
    }
    assert_eq!(
        err.reason(),
        reason,
        "{kind:?} decoder on {:?}: reason label of {err:?}",
        lossy(input)
    );
    assert!(
        DecodeError::REASONS.contains(&err.reason()),
        "{err:?}: label not in REASONS"
    );
    let text = err.to_string();
    for s in shows {
        assert!(
            text.contains(s),
            "{kind:?} decoder on {:?}: Display {text:?} does not mention {s:?}",
            lossy(input)
        );
    }
}

fn malformed() -> DecodeError {
    DecodeError::Malformed(String::new())
}

/// The example event of `kind` as a JSON object.
fn example_object(kind: Kind) -> Map<String, Value> {
    match serde_json::from_str(kind.example()) {
        Ok(Value::Object(m)) => m,
        other => panic!("example of {kind:?} is not an object: {other:?}"),
    }
}

/// The object holding the last segment of a dotted `path` (e.g. `pickup.lat`), and that segment.
fn parent<'a>(
    obj: &'a mut Map<String, Value>,
    path: &'a str,
) -> (&'a mut Map<String, Value>, &'a str) {
    match path.split_once('.') {
        None => (obj, path),
        Some((head, rest)) => match obj.get_mut(head) {
            Some(Value::Object(inner)) => parent(inner, rest),
            other => panic!("no object at {head}: {other:?}"),
        },
    }
}

/// The example event of `kind` with `path` set to `value`.
fn with(kind: Kind, path: &str, value: Value) -> Vec<u8> {
    let mut obj = example_object(kind);
    let (p, key) = parent(&mut obj, path);
    p.insert(key.to_owned(), value);
    Value::Object(obj).to_string().into_bytes()
}

/// The example event of `kind` without `path`.
fn without(kind: Kind, path: &str) -> Vec<u8> {
    let mut obj = example_object(kind);
    let (p, key) = parent(&mut obj, path);
    assert!(p.remove(key).is_some(), "{kind:?} example has no {path}");
    Value::Object(obj).to_string().into_bytes()
}

/// The example event of `kind` with `path` set to the raw JSON text `raw` (for texts that a
/// `serde_json::Value` cannot hold, such as invalid UTF-8).
fn with_raw(kind: Kind, path: &str, raw: &[u8]) -> Vec<u8> {
    const MARK: &str = "\u{1}MARK\u{1}";
    let text = String::from_utf8(with(kind, path, json!(MARK))).expect("valid UTF-8");
    let quoted = serde_json::to_string(MARK).expect("a string serializes");
    let (before, after) = text.split_once(&quoted).expect("mark present");
    [before.as_bytes(), raw, after.as_bytes()].concat()
}

fn coord(lat: f64, lon: f64) -> Coord {
    Coord { lat, lon }
}

fn rider_ok(input: &[u8]) -> RiderEvent {
    match decode_rider(input) {
        Ok(e) => e,
        Err(e) => panic!("rider decoder rejected {:?}: {e:?}", lossy(input)),
    }
}

fn delivery_ok(input: &[u8]) -> DeliveryEvent {
    match decode_delivery(input) {
        Ok(e) => e,
        Err(e) => panic!("delivery decoder rejected {:?}: {e:?}", lossy(input)),
    }
}

// ---------------------------------------------------------------------------------------------
// Malformed JSON
// ---------------------------------------------------------------------------------------------

#[test]
fn malformed_truncated_object() {
    for kind in KINDS {
        let full = kind.example().as_bytes();
        // Every proper prefix of an object is incomplete JSON.
        for end in 0..full.len() {
            rejects(
                kind,
                &full[..end],
                &malformed(),
                "malformed_json",
                &["malformed JSON"],
            );
        }
        // Missing only its closing brace: the message says the input ended early.
        rejects(
            kind,
            &full[..full.len() - 1],
            &malformed(),
            "malformed_json",
            &["malformed JSON", "EOF"],
        );
        rejects(
            kind,
            format!(r#"{{"{}": "x", "status": "#, kind.id_field()).as_bytes(),
            &malformed(),
            "malformed_json",
            &["malformed JSON", "EOF"],
        );
    }
}

#[test]
fn malformed_not_an_object() {
    for kind in KINDS {
        for input in [
            "[1,2]", "[]", r#""str""#, "null", "42", "-1.5", "true", "false",
        ] {
            rejects(
                kind,
                input.as_bytes(),
                &malformed(),
                "malformed_json",
                &["malformed JSON"],
            );
        }
    }
}

#[test]
fn malformed_empty_input() {
    for kind in KINDS {
        for input in ["", " ", "\n", "\r\n\t "] {
            rejects(
                kind,
                input.as_bytes(),
                &malformed(),
                "malformed_json",
                &["malformed JSON", "EOF"],
            );
        }
    }
}

#[test]
fn malformed_invalid_utf8() {
    let bad: [&[u8]; 5] = [
        b"\xff",         // never valid in UTF-8
        b"\x80",         // lone continuation byte
        b"\xc0\xaf",     // overlong encoding of '/'
        b"\xed\xa0\x80", // UTF-8-encoded surrogate
        b"\xea\xb0",     // truncated 3-byte sequence (first two bytes of '가')
    ];
    for kind in KINDS {
        for b in bad {
            // A bare invalid byte where a value belongs, or before the object.
            rejects(
                kind,
                &with_raw(kind, kind.id_field(), b),
                &malformed(),
                "malformed_json",
                &["malformed JSON"],
            );
            rejects(
                kind,
                &[b, kind.example().as_bytes()].concat(),
                &malformed(),
                "malformed_json",
                &["malformed JSON"],
            );
            // Invalid bytes inside the strings of the id, the status and an optional label.
            let quoted = [b"\"r-".as_slice(), b, b"\""].concat();
            let label = match kind {
                Kind::Rider => "rider_type",
                Kind::Delivery => "vehicle",
            };
            for path in [kind.id_field(), "status", label] {
                rejects(
                    kind,
                    &with_raw(kind, path, &quoted),
                    &malformed(),
                    "malformed_json",
                    &["malformed JSON"],
                );
            }
        }
    }
}

#[test]
fn malformed_trailing_content() {
    for kind in KINDS {
        let ex = kind.example();
        for input in [
            format!("{ex} x"),
            format!("{ex}{ex}"),
            format!("{ex},"),
            format!("{ex}}}"),
        ] {
            rejects(
                kind,
                input.as_bytes(),
                &malformed(),
                "malformed_json",
                &["malformed JSON", "trailing"],
            );
        }
    }
}

#[test]
fn malformed_duplicate_id_field() {
    for kind in KINDS {
        let id = kind.id_field();
        let input = kind
            .example()
            .replacen('{', &format!(r#"{{"{id}": "other", "#), 1);
        rejects(
            kind,
            input.as_bytes(),
            &malformed(),
            "malformed_json",
            &["malformed JSON", "duplicate", id],
        );
    }
}

/// CONTRACT section 2: events are JSON objects. A JSON array holding the field values in
/// declaration order is not one, but the decoder accepts it (serde's derived `Deserialize` of a
/// struct also takes a sequence).
#[test]
fn malformed_top_level_array_of_field_values() {
    rejects(
        Kind::Rider,
        br#"["r-1","ON_SHIFT",null,null,5]"#,
        &malformed(),
        "malformed_json",
        &["malformed JSON"],
    );
    rejects(
        Kind::Delivery,
        br#"["d-1","ASSIGNED",null,null,null,"r-1",null,5]"#,
        &malformed(),
        "malformed_json",
        &["malformed JSON"],
    );
}

/// CONTRACT section 2: input is UTF-8 JSON. Invalid UTF-8 inside the string value of an unknown
/// (ignored) field is accepted: serde_json skips ignored strings without validating them.
#[test]
fn malformed_invalid_utf8_in_unknown_field() {
    for kind in KINDS {
        rejects(
            kind,
            &with_raw(kind, "comment", b"\"\xff\""),
            &malformed(),
            "malformed_json",
            &["malformed JSON"],
        );
    }
}

// ---------------------------------------------------------------------------------------------
// The id
// ---------------------------------------------------------------------------------------------

#[test]
fn missing_id() {
    for kind in KINDS {
        let id = kind.id_field();
        rejects(
            kind,
            &without(kind, id),
            &DecodeError::MissingField(id),
            "missing_field",
            &["missing", id],
        );
    }
}

#[test]
fn null_id() {
    for kind in KINDS {
        let id = kind.id_field();
        rejects(
            kind,
            &with(kind, id, Value::Null),
            &DecodeError::MissingField(id),
            "missing_field",
            &["missing", id],
        );
    }
}

#[test]
fn id_of_wrong_type() {
    for kind in KINDS {
        let id = kind.id_field();
        for v in [
            json!(17),
            json!(-1.5),
            json!({"id": "r-17"}),
            json!(["r-17"]),
            json!(true),
        ] {
            rejects(
                kind,
                &with(kind, id, v),
                &DecodeError::WrongType(id),
                "wrong_type",
                &["wrong type", id],
            );
        }
    }
}

#[test]
fn empty_string_id() {
    for kind in KINDS {
        let id = kind.id_field();
        rejects(
            kind,
            &with(kind, id, json!("")),
            &DecodeError::EmptyId(id),
            "empty_id",
            &["empty", id],
        );
    }
}

// ---------------------------------------------------------------------------------------------
// The status
// ---------------------------------------------------------------------------------------------

#[test]
fn missing_status() {
    for kind in KINDS {
        rejects(
            kind,
            &without(kind, "status"),
            &DecodeError::MissingField("status"),
            "missing_field",
            &["missing", "status"],
        );
    }
}

#[test]
fn null_status() {
    for kind in KINDS {
        rejects(
            kind,
            &with(kind, "status", Value::Null),
            &DecodeError::MissingField("status"),
            "missing_field",
            &["missing", "status"],
        );
    }
}

#[test]
fn status_of_wrong_type() {
    for kind in KINDS {
        for v in [json!(1), json!({}), json!(["ON_SHIFT"]), json!(true)] {
            rejects(
                kind,
                &with(kind, "status", v),
                &DecodeError::WrongType("status"),
                "wrong_type",
                &["wrong type", "status"],
            );
        }
    }
}

#[test]
fn unknown_status() {
    for kind in KINDS {
        for s in [
            "NAPPING",
            kind.lower_case_status(),
            kind.foreign_status(),
            "",
            // No trimming: surrounding spaces make a status unknown.
            " ON_SHIFT",
            "ASSIGNED ",
        ] {
            rejects(
                kind,
                &with(kind, "status", json!(s)),
                &DecodeError::UnknownStatus(s.to_owned()),
                "unknown_status",
                &["unknown status", s],
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The event time
// ---------------------------------------------------------------------------------------------

#[test]
fn missing_ts() {
    for kind in KINDS {
        rejects(
            kind,
            &without(kind, "ts"),
            &DecodeError::MissingField("ts"),
            "missing_field",
            &["missing", "ts"],
        );
    }
}

#[test]
fn null_ts() {
    for kind in KINDS {
        rejects(
            kind,
            &with(kind, "ts", Value::Null),
            &DecodeError::MissingField("ts"),
            "missing_field",
            &["missing", "ts"],
        );
    }
}

#[test]
fn ts_as_string() {
    for kind in KINDS {
        for v in [json!("1764000000000"), json!("")] {
            rejects(
                kind,
                &with(kind, "ts", v),
                &DecodeError::WrongType("ts"),
                "wrong_type",
                &["wrong type", "ts"],
            );
        }
    }
}

#[test]
fn ts_negative() {
    for kind in KINDS {
        for v in [json!(-1), json!(-1764000000000_i64)] {
            rejects(
                kind,
                &with(kind, "ts", v),
                &DecodeError::WrongType("ts"),
                "wrong_type",
                &["wrong type", "ts"],
            );
        }
    }
}

#[test]
fn ts_float() {
    for kind in KINDS {
        for v in [json!(1.5), json!(1764000000000.5)] {
            rejects(
                kind,
                &with(kind, "ts", v),
                &DecodeError::WrongType("ts"),
                "wrong_type",
                &["wrong type", "ts"],
            );
        }
    }
}

#[test]
fn ts_of_other_wrong_types() {
    for kind in KINDS {
        for v in [json!(true), json!([1]), json!({"ms": 1})] {
            rejects(
                kind,
                &with(kind, "ts", v),
                &DecodeError::WrongType("ts"),
                "wrong_type",
                &["wrong type", "ts"],
            );
        }
        // One more than u64::MAX.
        rejects(
            kind,
            &with_raw(kind, "ts", b"18446744073709551616"),
            &DecodeError::WrongType("ts"),
            "wrong_type",
            &["wrong type", "ts"],
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Coordinates: rider location, delivery pickup and dropoff
// ---------------------------------------------------------------------------------------------

fn leak(s: String) -> &'static str {
    Box::leak(s.into_boxed_str())
}

#[test]
fn lat_out_of_range() {
    for kind in KINDS {
        for point in kind.point_fields() {
            let field = leak(format!("{point}.lat"));
            for value in [90.0001, -90.5, 1e300] {
                rejects(
                    kind,
                    &with(kind, field, json!(value)),
                    &DecodeError::OutOfRange { field, value },
                    "out_of_range",
                    &["out of range", field, &format!("{value}")],
                );
            }
        }
    }
}

#[test]
fn lon_out_of_range() {
    for kind in KINDS {
        for point in kind.point_fields() {
            let field = leak(format!("{point}.lon"));
            for value in [180.5, -181.0, 180.000_000_1] {
                rejects(
                    kind,
                    &with(kind, field, json!(value)),
                    &DecodeError::OutOfRange { field, value },
                    "out_of_range",
                    &["out of range", field, &format!("{value}")],
                );
            }
            // Written as a JSON integer.
            rejects(
                kind,
                &with(kind, field, json!(-181)),
                &DecodeError::OutOfRange {
                    field,
                    value: -181.0,
                },
                "out_of_range",
                &["out of range", field, "-181"],
            );
        }
    }
}

#[test]
fn location_not_an_object() {
    for kind in KINDS {
        for point in kind.point_fields() {
            for v in [
                json!("37.5,127.0"),
                json!(5),
                json!(true),
                json!([]),
                json!([37.5]),
                json!([37.5, 127.0, 3.0]),
            ] {
                rejects(
                    kind,
                    &with(kind, point, v),
                    &DecodeError::WrongType(point),
                    "wrong_type",
                    &["wrong type", point],
                );
            }
        }
    }
}

/// A `[lat, lon]` pair is not the `{"lat", "lon"}` object of CONTRACT section 2, but the decoder
/// accepts it (serde's derived `Deserialize` of the point struct also takes a sequence).
#[test]
fn location_as_lat_lon_array() {
    for kind in KINDS {
        for point in kind.point_fields() {
            rejects(
                kind,
                &with(kind, point, json!([37.5, 127.0])),
                &DecodeError::WrongType(point),
                "wrong_type",
                &["wrong type", point],
            );
        }
    }
}

#[test]
fn location_missing_lat_or_lon() {
    for kind in KINDS {
        for point in kind.point_fields() {
            for part in ["lat", "lon"] {
                let field = leak(format!("{point}.{part}"));
                rejects(
                    kind,
                    &without(kind, field),
                    &DecodeError::MissingField(field),
                    "missing_field",
                    &["missing", field],
                );
                rejects(
                    kind,
                    &with(kind, field, Value::Null),
                    &DecodeError::MissingField(field),
                    "missing_field",
                    &["missing", field],
                );
            }
            let lat = leak(format!("{point}.lat"));
            rejects(
                kind,
                &with(kind, point, json!({})),
                &DecodeError::MissingField(lat),
                "missing_field",
                &["missing", lat],
            );
        }
    }
}

#[test]
fn location_lat_or_lon_of_wrong_type() {
    for kind in KINDS {
        for point in kind.point_fields() {
            for part in ["lat", "lon"] {
                let field = leak(format!("{point}.{part}"));
                for v in [
                    json!("37.5"),
                    json!(true),
                    json!([37.5]),
                    json!({"deg": 37.5}),
                ] {
                    rejects(
                        kind,
                        &with(kind, field, v),
                        &DecodeError::WrongType(field),
                        "wrong_type",
                        &["wrong type", field],
                    );
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Wrong-typed optional fields
// ---------------------------------------------------------------------------------------------

#[test]
fn optional_fields_of_wrong_type() {
    let cases: [(Kind, &str, Value); 9] = [
        (Kind::Rider, "rider_type", json!(5)),
        (Kind::Rider, "rider_type", json!(true)),
        (Kind::Rider, "rider_type", json!({"name": "CONNECT"})),
        (Kind::Delivery, "vehicle", json!([])),
        (Kind::Delivery, "vehicle", json!(2)),
        (Kind::Delivery, "delivery_type", json!(5)),
        (Kind::Delivery, "delivery_type", json!(["FOOD"])),
        (Kind::Delivery, "rider_id", json!(17)),
        (Kind::Delivery, "rider_id", json!({"id": "r-17"})),
    ];
    for (kind, field, v) in cases {
        rejects(
            kind,
            &with(kind, field, v),
            &DecodeError::WrongType(field),
            "wrong_type",
            &["wrong type", field],
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Good input
// ---------------------------------------------------------------------------------------------

#[test]
fn contract_rider_example_decodes() {
    assert_eq!(
        rider_ok(RIDER_EXAMPLE.as_bytes()),
        RiderEvent {
            rider_id: Id::from("r-17"),
            status: RiderStatus::ShiftStarted,
            rider_type: Some(Label::new("CONNECT")),
            location: Some(coord(37.4979, 127.0276)),
            ts: 1_764_000_000_000,
        }
    );
}

#[test]
fn contract_delivery_example_decodes() {
    assert_eq!(
        delivery_ok(DELIVERY_EXAMPLE.as_bytes()),
        DeliveryEvent {
            delivery_id: Id::from("d-9"),
            status: DeliveryStatus::Assigned,
            delivery_type: Some(Label::new("FOOD")),
            pickup: Some(coord(37.50, 127.03)),
            dropoff: Some(coord(37.51, 127.04)),
            rider_id: Some(Id::from("r-17")),
            vehicle: Some(Label::new("MOTORCYCLE")),
            ts: 1_764_000_005_000,
        }
    );
}

#[test]
fn every_status_decodes() {
    for s in RiderStatus::ALL {
        let e = rider_ok(&with(Kind::Rider, "status", json!(s.as_str())));
        assert_eq!(e.status, s);
    }
    for s in DeliveryStatus::ALL {
        let e = delivery_ok(&with(Kind::Delivery, "status", json!(s.as_str())));
        assert_eq!(e.status, s);
    }
}

#[test]
fn unknown_fields_are_ignored() {
    let extra = json!({
        "nested": {"a": [1, {"b": null, "c": [true, false]}], "d": "x", "lat": 1000},
        "array": [[], {}, [[["deep"]]], "s", 1.5e10, -3],
        "status_text": "NAPPING",
        "ts_str": "not a number",
        "n": null,
    });
    let extra = match extra {
        Value::Object(m) => m,
        _ => unreachable!(),
    };
    for kind in KINDS {
        let mut obj = example_object(kind);
        for (k, v) in &extra {
            obj.insert(k.clone(), v.clone());
        }
        for point in kind.point_fields() {
            if let Some(Value::Object(p)) = obj.get_mut(*point) {
                p.insert("accuracy".into(), json!({"m": 5, "src": ["gps", "wifi"]}));
                p.insert("alt".into(), json!([1, 2, 3]));
            }
        }
        let input = Value::Object(obj).to_string();
        let plain = decode(kind, kind.example().as_bytes());
        assert_eq!(decode(kind, input.as_bytes()), plain, "{input}");
        assert!(plain.is_ok());
    }
}

#[test]
fn optional_fields_missing_or_null_give_none() {
    let minimal_rider = RiderEvent {
        rider_id: Id::from("r-17"),
        status: RiderStatus::OnShift,
        rider_type: None,
        location: None,
        ts: 5,
    };
    assert_eq!(
        rider_ok(br#"{"rider_id":"r-17","status":"ON_SHIFT","ts":5}"#),
        minimal_rider
    );
    assert_eq!(
        rider_ok(
            br#"{"rider_id":"r-17","status":"ON_SHIFT","rider_type":null,"location":null,"ts":5}"#
        ),
        minimal_rider
    );

    let minimal_delivery = DeliveryEvent {
        delivery_id: Id::from("d-9"),
        status: DeliveryStatus::Created,
        delivery_type: None,
        pickup: None,
        dropoff: None,
        rider_id: None,
        vehicle: None,
        ts: 7,
    };
    assert_eq!(
        delivery_ok(br#"{"delivery_id":"d-9","status":"CREATED","ts":7}"#),
        minimal_delivery
    );
    assert_eq!(
        delivery_ok(
            br#"{"delivery_id":"d-9","status":"CREATED","delivery_type":null,"pickup":null,
                 "dropoff":null,"rider_id":null,"vehicle":null,"ts":7}"#
        ),
        minimal_delivery
    );

    // Each optional field alone missing or null.
    for field in ["rider_type", "location"] {
        for input in [
            without(Kind::Rider, field),
            with(Kind::Rider, field, Value::Null),
        ] {
            let e = rider_ok(&input);
            match field {
                "rider_type" => assert_eq!((e.rider_type, e.location.is_some()), (None, true)),
                _ => assert_eq!((e.location, e.rider_type.is_some()), (None, true)),
            }
        }
    }
    for field in ["delivery_type", "pickup", "dropoff", "rider_id", "vehicle"] {
        for input in [
            without(Kind::Delivery, field),
            with(Kind::Delivery, field, Value::Null),
        ] {
            let e = delivery_ok(&input);
            let none = match field {
                "delivery_type" => e.delivery_type.is_none(),
                "pickup" => e.pickup.is_none(),
                "dropoff" => e.dropoff.is_none(),
                "rider_id" => e.rider_id.is_none(),
                _ => e.vehicle.is_none(),
            };
            assert!(none, "{field} should be None in {e:?}");
            let somes = [
                e.delivery_type.is_some(),
                e.pickup.is_some(),
                e.dropoff.is_some(),
                e.rider_id.is_some(),
                e.vehicle.is_some(),
            ];
            assert_eq!(somes.iter().filter(|x| **x).count(), 4, "{e:?}");
        }
    }
}

#[test]
fn coordinates_at_the_limits_are_accepted() {
    let corners = [
        (90.0, 180.0),
        (-90.0, -180.0),
        (90.0, -180.0),
        (-90.0, 180.0),
        (0.0, 0.0),
    ];
    for (lat, lon) in corners {
        let c = coord(lat, lon);
        let p = json!({"lat": lat, "lon": lon});
        assert_eq!(
            rider_ok(&with(Kind::Rider, "location", p.clone())).location,
            Some(c)
        );
        let d = delivery_ok(&with(Kind::Delivery, "pickup", p.clone()));
        assert_eq!(d.pickup, Some(c));
        let d = delivery_ok(&with(Kind::Delivery, "dropoff", p));
        assert_eq!(d.dropoff, Some(c));
    }
    // The same limits written as JSON integers.
    let e = rider_ok(
        br#"{"rider_id":"r","status":"ON_SHIFT","location":{"lat":-90,"lon":180},"ts":1}"#,
    );
    assert_eq!(e.location, Some(coord(-90.0, 180.0)));
}

#[test]
fn integer_valued_coordinates_are_accepted() {
    let e =
        rider_ok(br#"{"rider_id":"r","status":"ON_SHIFT","location":{"lat":37,"lon":127},"ts":1}"#);
    assert_eq!(e.location, Some(coord(37.0, 127.0)));
    let e = delivery_ok(
        br#"{"delivery_id":"d","status":"WAITING","pickup":{"lat":37,"lon":127},
             "dropoff":{"lat":-37,"lon":-127},"ts":1}"#,
    );
    assert_eq!(e.pickup, Some(coord(37.0, 127.0)));
    assert_eq!(e.dropoff, Some(coord(-37.0, -127.0)));
    // Exponent notation is a number too.
    let e = rider_ok(
        br#"{"rider_id":"r","status":"ON_SHIFT","location":{"lat":3.75e1,"lon":1.27E2},"ts":1}"#,
    );
    assert_eq!(e.location, Some(coord(37.5, 127.0)));
}

#[test]
fn hangul_and_unicode_escapes_decode() {
    // Raw Hangul.
    let e = rider_ok(
        r#"{"rider_id":"라이더-17","status":"ON_SHIFT","rider_type":"커넥트","ts":1}"#.as_bytes(),
    );
    assert_eq!(e.rider_id, "라이더-17");
    assert_eq!(
        e.rider_type.as_ref().map(ToString::to_string).as_deref(),
        Some("커넥트")
    );

    // The same, as \uXXXX escapes, plus a surrogate pair (🛵) and escaped ASCII.
    let e = rider_ok(
        br#"{"rider_id":"\ub77c\uc774\ub354-17","status":"ON\u005fSHIFT","rider_type":"\ucee4\ub125\ud2b8 \ud83d\udef5 \"q\"\\","ts":1}"#,
    );
    assert_eq!(e.rider_id, "라이더-17");
    assert_eq!(e.status, RiderStatus::OnShift);
    assert_eq!(
        e.rider_type.as_ref().map(ToString::to_string).as_deref(),
        Some("커넥트 🛵 \"q\"\\")
    );

    let e = delivery_ok(
        r#"{"delivery_id":"\ubc30\ub2ec-9","status":"PICKED_UP","delivery_type":"음식",
            "pickup":{"lat":37.5,"lon":127.03,"address":"서울특별시 강남구 \uc5ed\uc0bc\ub3d9 \"1층\" \ud83c\udf5c"},
            "dropoff":{"lat":37.51,"lon":127.04,"address":"서울특별시 강남구 역삼동 123-4\n101호"},
            "rider_id":"라이더-17","vehicle":"\uc624\ud1a0\ubc14\uc774","ts":2}"#
            .as_bytes(),
    );
    assert_eq!(e.delivery_id, "배달-9");
    assert_eq!(
        e.delivery_type.as_ref().map(ToString::to_string).as_deref(),
        Some("음식")
    );
    assert_eq!(e.rider_id.as_deref(), Some("라이더-17"));
    assert_eq!(
        e.vehicle.as_ref().map(ToString::to_string).as_deref(),
        Some("오토바이")
    );
    assert_eq!(e.pickup, Some(coord(37.5, 127.03)));
    assert_eq!(e.dropoff, Some(coord(37.51, 127.04)));
}

#[test]
fn whitespace_and_field_order_do_not_matter() {
    let pretty = r#"
        {
            "ts" : 1764000000000 ,
            "location" : { "lon" : 127.0276 , "lat" : 37.4979 } ,
            "rider_type" : "CONNECT" ,
            "status" : "SHIFT_STARTED" ,
            "rider_id" : "r-17"
        }
    "#;
    assert_eq!(
        rider_ok(pretty.as_bytes()),
        rider_ok(RIDER_EXAMPLE.as_bytes())
    );
}

// ---------------------------------------------------------------------------------------------
// Round trip
// ---------------------------------------------------------------------------------------------

fn random_char(rng: &mut SmallRng) -> char {
    const SPECIAL: [char; 12] = [
        '"', '\\', '/', '\n', '\t', '\u{0}', '\u{1f}', '\u{7f}', '\u{2028}', '🛵', 'é', ' ',
    ];
    match rng.random_range(0..10) {
        0..=4 => {
            const ASCII: &[u8] =
                b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.:";
            char::from(ASCII[rng.random_range(0..ASCII.len())])
        }
        5..=7 => char::from_u32(rng.random_range(0xAC00..=0xD7A3)).unwrap_or('가'),
        8 => SPECIAL[rng.random_range(0..SPECIAL.len())],
        _ => rng.random::<char>(),
    }
}

fn random_text(rng: &mut SmallRng, min_len: usize) -> Id {
    let len = rng.random_range(min_len..=30);
    Id::from((0..len).map(|_| random_char(rng)).collect::<String>())
}

fn random_degrees(rng: &mut SmallRng, limit: f64) -> f64 {
    match rng.random_range(0..12) {
        0 => limit,
        1 => -limit,
        2 => 0.0,
        3 => -0.0,
        4 => f64::from(rng.random_range(-(limit as i32)..=limit as i32)),
        5 => f64::MIN_POSITIVE * rng.random_range(-3.0..3.0),
        _ => rng.random_range(-limit..=limit),
    }
}

fn random_coord(rng: &mut SmallRng) -> Option<Coord> {
    rng.random_bool(0.8).then(|| Coord {
        lat: random_degrees(rng, 90.0),
        lon: random_degrees(rng, 180.0),
    })
}

fn random_ts(rng: &mut SmallRng) -> u64 {
    match rng.random_range(0..6) {
        0 => 0,
        1 => u64::MAX,
        2 => rng.random(),
        _ => rng.random_range(1_700_000_000_000..1_800_000_000_000),
    }
}

fn random_rider(rng: &mut SmallRng) -> RiderEvent {
    RiderEvent {
        rider_id: random_text(rng, 1),
        status: RiderStatus::ALL[rng.random_range(0..RiderStatus::ALL.len())],
        rider_type: rng
            .random_bool(0.7)
            .then(|| Label::new(&random_text(rng, 0))),
        location: random_coord(rng),
        ts: random_ts(rng),
    }
}

fn random_delivery(rng: &mut SmallRng) -> DeliveryEvent {
    DeliveryEvent {
        delivery_id: random_text(rng, 1),
        status: DeliveryStatus::ALL[rng.random_range(0..DeliveryStatus::ALL.len())],
        delivery_type: rng
            .random_bool(0.7)
            .then(|| Label::new(&random_text(rng, 0))),
        pickup: random_coord(rng),
        dropoff: random_coord(rng),
        rider_id: rng.random_bool(0.7).then(|| random_text(rng, 1)),
        vehicle: rng
            .random_bool(0.7)
            .then(|| Label::new(&random_text(rng, 0))),
        ts: random_ts(rng),
    }
}

/// The distance between two floats in units in the last place (`u64::MAX` across signs).
fn ulps(a: f64, b: f64) -> u64 {
    if a.to_bits() == b.to_bits() {
        0
    } else if a.is_sign_negative() != b.is_sign_negative() {
        u64::MAX
    } else {
        a.to_bits().abs_diff(b.to_bits())
    }
}

/// Whether two optional points are equal up to `max_ulps` in each of lat and lon.
fn near(a: Option<Coord>, b: Option<Coord>, max_ulps: u64) -> bool {
    match (a, b) {
        (None, None) => true,
        (Some(a), Some(b)) => ulps(a.lat, b.lat) <= max_ulps && ulps(a.lon, b.lon) <= max_ulps,
        _ => false,
    }
}

/// Asserts that `e` encodes to bytes that decode back to `e`: every field exactly, and the
/// coordinates bit-exactly or (unless `exact`) within one unit in the last place.
#[track_caller]
fn assert_rider_round_trip(e: &RiderEvent, exact: bool) {
    let bytes = encode_rider(e);
    let mut back = rider_ok(&bytes);
    let tolerance = if exact { 0 } else { 1 };
    assert!(
        near(back.location, e.location, tolerance),
        "rider coordinates changed in the round trip of {}: {:?} became {:?}",
        lossy(&bytes),
        e.location,
        back.location
    );
    back.location = e.location;
    assert_eq!(&back, e, "round trip of {}", lossy(&bytes));
}

/// As [`assert_rider_round_trip`], for a delivery.
#[track_caller]
fn assert_delivery_round_trip(e: &DeliveryEvent, exact: bool) {
    let bytes = encode_delivery(e);
    let mut back = delivery_ok(&bytes);
    let tolerance = if exact { 0 } else { 1 };
    for (name, was, now) in [
        ("pickup", e.pickup, back.pickup),
        ("dropoff", e.dropoff, back.dropoff),
    ] {
        assert!(
            near(now, was, tolerance),
            "delivery {name} changed in the round trip of {}: {was:?} became {now:?}",
            lossy(&bytes)
        );
    }
    back.pickup = e.pickup;
    back.dropoff = e.dropoff;
    assert_eq!(&back, e, "round trip of {}", lossy(&bytes));
}

/// encode→decode gives the same event, with coordinates equal up to one unit in the last place
/// (see `round_trip_random_events_bit_exact` for the exact property).
#[test]
fn round_trip_random_events() {
    let mut rng = SmallRng::seed_from_u64(0x5eed_d0e5);
    for _ in 0..500 {
        assert_rider_round_trip(&random_rider(&mut rng), false);
        assert_delivery_round_trip(&random_delivery(&mut rng), false);
    }
}

/// encode→decode gives the bit-identical event. `encode_*` writes the shortest decimal that
/// reads back as the same f64, but serde_json without its `float_roundtrip` feature parses long
/// decimals with an error of up to one ULP: `122.54938649545619` decodes as `122.5493864954562`.
/// About one random coordinate in eight is changed.
#[test]
fn round_trip_random_events_bit_exact() {
    let e = RiderEvent {
        rider_id: Id::from("r-17"),
        status: RiderStatus::OnShift,
        rider_type: None,
        location: Some(coord(39.0, 122.549_386_495_456_19)),
        ts: 1,
    };
    assert_rider_round_trip(&e, true);
    let mut rng = SmallRng::seed_from_u64(0x5eed_d0e5);
    for _ in 0..500 {
        assert_rider_round_trip(&random_rider(&mut rng), true);
        assert_delivery_round_trip(&random_delivery(&mut rng), true);
    }
}

#[test]
fn round_trip_contract_examples() {
    let r = rider_ok(RIDER_EXAMPLE.as_bytes());
    assert_eq!(decode_rider(&encode_rider(&r)), Ok(r));
    let d = delivery_ok(DELIVERY_EXAMPLE.as_bytes());
    assert_eq!(decode_delivery(&encode_delivery(&d)), Ok(d));
}

// ---------------------------------------------------------------------------------------------
// Robustness: no input panics
// ---------------------------------------------------------------------------------------------

/// Feeds `input` to both decoders: neither may panic; an error has a known label and a message; an
/// accepted event re-encodes to bytes that decode to the same event (coordinates up to one ULP).
fn never_panics(input: &[u8]) {
    let outcome = catch_unwind(AssertUnwindSafe(|| {
        match decode_rider(input) {
            Ok(e) => assert_rider_round_trip(&e, false),
            Err(err) => {
                assert!(DecodeError::REASONS.contains(&err.reason()));
                assert!(!err.to_string().is_empty());
            }
        }
        match decode_delivery(input) {
            Ok(e) => assert_delivery_round_trip(&e, false),
            Err(err) => {
                assert!(DecodeError::REASONS.contains(&err.reason()));
                assert!(!err.to_string().is_empty());
            }
        }
    }));
    if outcome.is_err() {
        panic!(
            "decoding panicked or misbehaved on {input:?} ({:?})",
            lossy(input)
        );
    }
}

const TOKENS: [&str; 24] = [
    "{",
    "}",
    "[",
    "]",
    ":",
    ",",
    "\"",
    "\\",
    "\\u",
    "null",
    "true",
    "false",
    "-",
    "0",
    "1.5",
    "e9",
    "\"rider_id\"",
    "\"delivery_id\"",
    "\"status\"",
    "\"ts\"",
    "\"location\"",
    "\"lat\"",
    "\"ON_SHIFT\"",
    "\"ASSIGNED\"",
];

fn random_bytes(rng: &mut SmallRng) -> Vec<u8> {
    let len = rng.random_range(0..80);
    if rng.random_bool(0.5) {
        (0..len).map(|_| rng.random::<u8>()).collect()
    } else {
        let mut out = Vec::new();
        for _ in 0..len / 3 {
            if rng.random_bool(0.8) {
                out.extend_from_slice(TOKENS[rng.random_range(0..TOKENS.len())].as_bytes());
            } else {
                out.push(rng.random());
            }
        }
        out
    }
}

#[test]
fn random_bytes_never_panic() {
    let mut rng = SmallRng::seed_from_u64(20_000);
    for _ in 0..20_000 {
        never_panics(&random_bytes(&mut rng));
    }
}

fn mutate(rng: &mut SmallRng, mut bytes: Vec<u8>) -> Vec<u8> {
    for _ in 0..rng.random_range(1..=4) {
        let n = bytes.len();
        match rng.random_range(0..6) {
            // Flip some bits of one byte.
            0 if n > 0 => {
                let i = rng.random_range(0..n);
                bytes[i] ^= rng.random_range(1..=255u8);
            }
            // Truncate.
            1 => bytes.truncate(rng.random_range(0..=n)),
            // Insert a random byte.
            2 => {
                let i = rng.random_range(0..=n);
                bytes.insert(i, rng.random());
            }
            // Insert a JSON-ish token.
            3 => {
                let i = rng.random_range(0..=n);
                let t = TOKENS[rng.random_range(0..TOKENS.len())].as_bytes();
                bytes.splice(i..i, t.iter().copied());
            }
            // Delete a byte.
            4 if n > 0 => {
                bytes.remove(rng.random_range(0..n));
            }
            // Duplicate a slice in place.
            _ if n > 0 => {
                let a = rng.random_range(0..n);
                let b = rng.random_range(a..=n);
                let copy = bytes[a..b].to_vec();
                bytes.splice(b..b, copy);
            }
            _ => {}
        }
    }
    bytes
}

#[test]
fn mutated_events_never_panic() {
    let mut rng = SmallRng::seed_from_u64(40_000);
    let mut valid: Vec<Vec<u8>> = vec![
        RIDER_EXAMPLE.as_bytes().to_vec(),
        DELIVERY_EXAMPLE.as_bytes().to_vec(),
    ];
    for _ in 0..50 {
        valid.push(encode_rider(&random_rider(&mut rng)));
        valid.push(encode_delivery(&random_delivery(&mut rng)));
    }
    for _ in 0..20_000 {
        let base = valid[rng.random_range(0..valid.len())].clone();
        never_panics(&mutate(&mut rng, base));
    }
}
