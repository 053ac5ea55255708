//! The HTTP API against a running engine: every answer equals the model's, errors are clear JSON
//! with the right status, and /metrics is well-formed Prometheus text.

mod common;

use std::collections::BTreeMap;

use common::{builtin, serve, Client, Harness, Model, Scenario};
use dongflow::EngineConfig;
use dongflow_connectors::Id;
use dongflow_dataflow::districts::{DistrictId, DistrictIndex};
use dongflow_dataflow::types::{DistrictCounts, Snapshot};
use serde_json::{json, Value};

fn district_json(index: &DistrictIndex, id: DistrictId, c: &DistrictCounts) -> Value {
    let idle = c.riders_on_shift - c.riders_delivering;
    json!({
        "code": index.code(id), "name": index.name(id),
        "riders_on_shift": c.riders_on_shift, "riders_delivering": c.riders_delivering, "riders_idle": idle,
        "active_deliveries": c.active_deliveries, "waiting_deliveries": c.waiting_deliveries,
        "pressure": c.waiting_deliveries as f64 / idle.max(1) as f64,
    })
}

fn rider_json(index: &DistrictIndex, id: &Id, s: &Snapshot) -> Value {
    let updated = s.deliveries.iter().map(|d| d.ts).chain([s.rider.ts]).max();
    json!({
        "rider_id": id.as_str(),
        "status": s.rider.status.as_str(),
        "rider_type": s.rider.rider_type.as_ref().map(|t| t.to_string()),
        "location": s.rider.location.get().map(|l| json!({"lat": l.lat, "lon": l.lon})),
        "district": {"code": index.code(s.rider.district), "name": index.name(s.rider.district)},
        "deliveries": s.deliveries.iter().map(|d| json!({
            "delivery_id": d.delivery_id.as_str(), "status": d.status.as_str(), "vehicle": d.vehicle.as_ref().map(|v| v.to_string()),
        })).collect::<Vec<_>>(),
        "updated_ts": updated,
    })
}

/// Takes `as_of` and `stale` out of an answer, checking them.
fn unstamp(mut v: Value, last_as_of: &mut u64) -> Value {
    let obj = v.as_object_mut().expect("object");
    let as_of = obj.remove("as_of").and_then(|a| a.as_u64()).expect("as_of");
    assert_eq!(obj.remove("stale"), Some(Value::Bool(false)));
    assert!(
        as_of >= *last_as_of,
        "as_of went back from {last_as_of} to {as_of}"
    );
    *last_as_of = as_of;
    v
}

#[test]
fn answers_equal_the_model() {
    let index = builtin();
    let harness = Harness::start(EngineConfig::new(2, index.clone()), 4);
    let server = serve(&harness, &index);
    let client = Client::new(&server);
    let mut scenario = Scenario::new(11, &index, 15, 60);
    let mut model = Model::default();
    let mut last_as_of = 0;
    for _round in 0..5 {
        let events: Vec<_> = (0..150).map(|_| scenario.next_event()).collect();
        events.iter().for_each(|e| model.apply(&index, e));
        harness.send(&events);
        harness.sync();

        let counts: BTreeMap<_, _> = model.counts();
        let (status, body) = client.json("/v1/districts");
        assert_eq!(status, 200);
        let mut expected: Vec<Value> = counts
            .iter()
            .map(|(d, c)| district_json(&index, *d, c))
            .collect();
        expected.sort_by(|a, b| a["code"].as_str().cmp(&b["code"].as_str()));
        assert_eq!(
            unstamp(body, &mut last_as_of),
            json!({ "districts": expected })
        );

        for id in 0..index.len() as DistrictId {
            let code = index.code(id);
            let (status, body) = client.json(&format!("/v1/districts/{code}"));
            assert_eq!(status, 200);
            let zero = DistrictCounts::default();
            assert_eq!(
                unstamp(body, &mut last_as_of),
                district_json(&index, id, counts.get(&id).unwrap_or(&zero))
            );
        }

        let snapshots = model.snapshots();
        for r in 0..15 {
            let id = Id::from(format!("r-{r}"));
            let (status, body) = client.json(&format!("/v1/riders/{id}"));
            match snapshots.get(&id) {
                Some(s) => {
                    assert_eq!(status, 200, "{id}");
                    assert_eq!(unstamp(body, &mut last_as_of), rider_json(&index, &id, s));
                }
                None => {
                    assert_eq!(status, 404, "{id}: {body}");
                    assert!(body["error"]
                        .as_str()
                        .is_some_and(|e| e.contains(id.as_str())));
                }
            }
        }
        for d in counts.keys() {
            let code = index.code(*d);
            let (status, body) = client.json(&format!("/v1/districts/{code}/riders"));
            assert_eq!(status, 200);
            let want: Vec<Value> = snapshots
                .iter()
                .filter(|(_, s)| s.rider.district == *d)
                .map(|(id, s)| rider_json(&index, id, s))
                .collect();
            assert_eq!(
                unstamp(body, &mut last_as_of),
                json!({ "riders": want }),
                "riders of {code}"
            );
        }
    }
    server.stop();
}

/// Sends `request` on a connection of its own and reads the whole answer: status, content type and
/// body (the server closes the connection after an answer to a request it could not parse).
fn raw_exchange(addr: &str, request: &str) -> (u16, String, String) {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).expect("connect");
    stream
        .set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .expect("timeout");
    // The server may answer and close before it has read the whole of a long request.
    let _ = stream.write_all(request.as_bytes());
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    let answer = String::from_utf8_lossy(&answer).into_owned();
    let (head, body) = answer.split_once("\r\n\r\n").expect("a head and a body");
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("a status");
    let content_type = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-type: ")
                .map(str::to_owned)
        })
        .unwrap_or_default();
    (status, content_type, body.to_owned())
}

#[test]
fn errors_are_clear_json() {
    let index = builtin();
    let harness = Harness::start(EngineConfig::new(1, index.clone()), 1);
    let server = serve(&harness, &index);
    let client = Client::new(&server);
    harness.sync();
    let cases = [
        (
            "/v1/districts/0000000000",
            404,
            "unknown district code 0000000000",
        ),
        (
            "/v1/districts/0000000000/riders",
            404,
            "unknown district code",
        ),
        ("/v1/riders/nobody", 404, "unknown rider nobody"),
        ("/v1/riders/%FF%FE", 400, "not valid UTF-8"),
        ("/v1/districts/%C3%28", 400, "not valid UTF-8"),
        ("/v1/nothing", 404, "no route"),
        ("/v1/districts/1168000000/riders/extra", 404, "no route"),
    ];
    for (path, status, message) in cases {
        let (got, body) = client.json(path);
        assert_eq!(got, status, "{path}: {body}");
        assert!(
            body["error"].as_str().is_some_and(|e| e.contains(message)),
            "{path}: {body}"
        );
    }
    // The answers the HTTP library writes by itself, for requests it cannot parse, are JSON too,
    // and the server goes on answering.
    let addr = client.base.trim_start_matches("http://").to_owned();
    let many_headers: String = (0..150).map(|i| format!("x-h{i}: v\r\n")).collect();
    let raw_cases = [
        (
            "GET / HTTP/1.1\r\nhost: x\r\nbad header line\r\n\r\n".to_owned(),
            400,
            "not valid HTTP/1.1",
        ),
        (
            format!("GET /v1/districts HTTP/1.1\r\nhost: x\r\n{many_headers}\r\n"),
            431,
            "header fields are too large",
        ),
        (
            format!("GET /{} HTTP/1.1\r\nhost: x\r\n\r\n", "x".repeat(70_000)),
            414,
            "target is too long",
        ),
    ];
    for (request, status, message) in raw_cases {
        let (got, content_type, body) = raw_exchange(&addr, &request);
        assert_eq!(got, status, "{body}");
        assert!(
            content_type.starts_with("application/json"),
            "{content_type}"
        );
        let v: Value = serde_json::from_str(&body).expect("a JSON body");
        assert!(
            v["error"].as_str().is_some_and(|e| e.contains(message)),
            "{body}"
        );
    }
    assert_eq!(client.json("/healthz").0, 200);
    // A huge path and a huge query string are refused or answered, never a server error.
    let long = "x".repeat(20_000);
    let (status, _, _) = client.get(&format!("/v1/riders/{long}"));
    assert!(status == 404 || status == 414 || status == 431, "{status}");
    let (status, body) = client.json(&format!("/v1/districts?{}", "a=1&".repeat(2_000)));
    assert_eq!((status, body["districts"].is_array()), (200, true));
    // Other methods.
    let response = client
        .agent
        .post(&format!("{}/v1/districts", client.base))
        .send("{}")
        .expect("request goes through");
    assert_eq!(response.status().as_u16(), 405);
    assert_eq!(
        response
            .headers()
            .get("allow")
            .and_then(|v| v.to_str().ok()),
        Some("GET, HEAD")
    );
    // Unassigned is a known code: zeros.
    let (status, body) = client.json("/v1/districts/unassigned");
    assert_eq!((status, body["riders_on_shift"].as_u64()), (200, Some(0)));
    // Health and readiness.
    assert_eq!(client.json("/healthz"), (200, json!({"status": "ok"})));
    let (status, body) = client.json("/readyz");
    assert_eq!((status, body["status"].as_str()), (200, Some("ready")));
    server.stop();
}

#[test]
fn map_page_openapi_and_metrics() {
    let index = builtin();
    let harness = Harness::start(EngineConfig::new(1, index.clone()), 1);
    let server = serve(&harness, &index);
    let client = Client::new(&server);
    let mut scenario = Scenario::new(3, &index, 10, 20);
    harness.send(&(0..200).map(|_| scenario.next_event()).collect::<Vec<_>>());
    harness.sync();

    let (status, content_type, body) = client.get("/v1/districts.geojson");
    assert_eq!(
        (status, content_type.as_str()),
        (200, "application/geo+json; charset=utf-8")
    );
    let geojson: Value = serde_json::from_str(&body).expect("geojson");
    let features = geojson["features"].as_array().expect("features");
    assert_eq!(features.len(), 25);
    assert!(features
        .iter()
        .all(|f| f["properties"]["code"].is_string() && f["properties"]["name"].is_string()));

    let (status, body) = client.json("/openapi.json");
    assert_eq!((status, body["openapi"].as_str()), (200, Some("3.0.3")));
    let (status, content_type, page) = client.get("/");
    assert_eq!(
        (status, content_type.as_str()),
        (200, "text/html; charset=utf-8")
    );
    assert!(page.contains("/v1/districts"));

    // Ready now, so ready in the metrics below too (readiness does not go back).
    assert_eq!(client.json("/readyz").0, 200);
    let (status, content_type, text) = client.get("/metrics");
    assert_eq!(
        (status, content_type.as_str()),
        (200, "text/plain; version=0.0.4; charset=utf-8")
    );
    common::check_prometheus_text(&text);
    let value = |line_start: &str| -> f64 {
        text.lines()
            .find(|l| l.starts_with(line_start))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(-1.0)
    };
    assert_eq!(value("dongflow_events_consumed_total "), 200.0);
    assert!(value("dongflow_frontier_age_seconds ") >= 0.0);
    // Seconds since the epoch, not milliseconds.
    let as_of = value("dongflow_as_of_seconds ");
    assert!((1.7e9..1.0e10).contains(&as_of), "{as_of}");
    assert_eq!(value("dongflow_ready "), 1.0, "ready, as /readyz says");
    assert!(value("dongflow_process_resident_memory_bytes ") > 1e6);
    assert!(value("dongflow_process_cpu_seconds_total ") > 0.0);
    assert!(value("dongflow_process_start_time_seconds ") > 1.7e9);
    assert_eq!(
        value(&format!(
            "dongflow_build_info{{version=\"{}\"}} ",
            env!("CARGO_PKG_VERSION")
        )),
        1.0
    );
    assert!(
        value("dongflow_http_requests_total{route=\"/v1/districts.geojson\",status=\"200\"}")
            >= 1.0
    );
    server.stop();
}
