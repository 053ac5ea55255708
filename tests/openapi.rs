//! The OpenAPI document kept in the repository (`server/openapi.json`, served at /openapi.json)
//! describes the real answers: every route's response, fetched from a running engine, validates
//! against the schema the document gives for its status.

mod common;

use common::{builtin, serve, Client, Harness, Scenario};
use dongflow::EngineConfig;
use serde_json::Value;

/// Resolves a local `$ref` (`#/components/...`).
fn resolve<'a>(doc: &'a Value, v: &'a Value) -> &'a Value {
    match v.get("$ref").and_then(Value::as_str) {
        Some(r) => {
            let path = r
                .strip_prefix("#/")
                .unwrap_or_else(|| panic!("only local refs: {r}"));
            let target = path.split('/').fold(doc, |node, key| &node[key]);
            assert!(!target.is_null(), "dangling ref {r}");
            resolve(doc, target)
        }
        None => v,
    }
}

/// Checks `value` against an OpenAPI 3.0 schema (the subset the document uses: type, nullable,
/// required, properties, items, enum, minimum, maximum, minLength, allOf, $ref).
fn validate(doc: &Value, schema: &Value, value: &Value, at: &str) {
    let schema = resolve(doc, schema);
    if value.is_null() && schema.get("nullable") == Some(&Value::Bool(true)) {
        return;
    }
    if let Some(all) = schema.get("allOf").and_then(Value::as_array) {
        for part in all {
            validate(doc, part, value, at);
        }
    }
    if let Some(kind) = schema.get("type").and_then(Value::as_str) {
        let ok = match kind {
            "object" => value.is_object(),
            "array" => value.is_array(),
            "string" => value.is_string(),
            "integer" => value.is_u64() || value.is_i64(),
            "number" => value.is_number(),
            "boolean" => value.is_boolean(),
            other => panic!("unknown type {other} in the document"),
        };
        assert!(ok, "{at}: expected {kind}, got {value}");
    }
    if let Some(values) = schema.get("enum").and_then(Value::as_array) {
        assert!(values.contains(value), "{at}: {value} not in {values:?}");
    }
    if let (Some(min), Some(x)) = (
        schema.get("minimum").and_then(Value::as_f64),
        value.as_f64(),
    ) {
        assert!(x >= min, "{at}: {x} < {min}");
    }
    if let (Some(max), Some(x)) = (
        schema.get("maximum").and_then(Value::as_f64),
        value.as_f64(),
    ) {
        assert!(x <= max, "{at}: {x} > {max}");
    }
    if let (Some(min), Some(s)) = (
        schema.get("minLength").and_then(Value::as_u64),
        value.as_str(),
    ) {
        assert!(s.chars().count() as u64 >= min, "{at}: too short");
    }
    if let Some(obj) = value.as_object() {
        for field in schema
            .get("required")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let field = field.as_str().expect("field name");
            assert!(
                obj.contains_key(field),
                "{at}: missing `{field}` in {value}"
            );
        }
        if let Some(props) = schema.get("properties").and_then(Value::as_object) {
            for (name, sub) in props {
                if let Some(v) = obj.get(name) {
                    validate(doc, sub, v, &format!("{at}.{name}"));
                }
            }
        }
    }
    if let (Some(items), Some(array)) = (schema.get("items"), value.as_array()) {
        for (i, v) in array.iter().enumerate() {
            validate(doc, items, v, &format!("{at}[{i}]"));
        }
    }
}

/// A push feed's first event (`snapshot`) validates against the schema the document gives it.
fn check_feed(doc: &Value, client: &Client, route: &str, path: &str) {
    use std::io::BufRead;
    let response = client
        .agent
        .get(&format!("{}{path}", client.base))
        .call()
        .expect("the feed answers");
    assert_eq!(response.status().as_u16(), 200, "{path}");
    let spec = &doc["paths"][route]["get"]["responses"]["200"];
    assert!(spec["content"]["text/event-stream"].is_object(), "{route}");
    let content_type = response
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    assert_eq!(content_type, "text/event-stream", "{path}");
    let reader = std::io::BufReader::new(response.into_body().into_reader());
    let mut event = String::new();
    for line in reader.lines().map_while(Result::ok) {
        if let Some(kind) = line.strip_prefix("event: ") {
            event = kind.to_owned();
        }
        if let Some(data) = line.strip_prefix("data: ") {
            assert_eq!(event, "snapshot", "{path}: the first event");
            let value: Value = serde_json::from_str(data).expect("json data");
            let schema = &spec["x-dongflow-events"]["snapshot"];
            assert!(schema.is_object(), "{route}: the snapshot's schema");
            validate(doc, schema, &value, path);
            return;
        }
    }
    panic!("{path}: no event");
}

#[test]
fn every_route_answers_as_documented() {
    let index = builtin();
    let harness = Harness::start(EngineConfig::new(2, index.clone()), 2);
    let server = serve(&harness, &index);
    let mut scenario = Scenario::new(21, &index, 12, 30);
    harness.send(&(0..400).map(|_| scenario.next_event()).collect::<Vec<_>>());
    harness.sync();

    let doc: Value =
        serde_json::from_str(include_str!("../server/openapi.json")).expect("document parses");
    let client = Client::new(&server);
    let get = |path: &str| client.get(path);

    // The served document is the one in the repository.
    let (_, _, served) = get("/openapi.json");
    assert_eq!(serde_json::from_str::<Value>(&served).expect("json"), doc);

    // A rider that is on shift and one district with riders, to reach the 200 answers.
    let (_, _, all) = get("/v1/districts");
    let all: Value = serde_json::from_str(&all).expect("json");
    let busy = all["districts"]
        .as_array()
        .and_then(|d| d.iter().find(|d| d["riders_on_shift"].as_u64() > Some(0)))
        .expect("a busy district");
    let code = busy["code"].as_str().expect("code").to_string();
    let (_, _, riders) = get(&format!("/v1/districts/{code}/riders"));
    let riders: Value = serde_json::from_str(&riders).expect("json");
    let rider = riders["riders"][0]["rider_id"]
        .as_str()
        .expect("a rider")
        .to_string();

    let requests = [
        ("/v1/districts", "/v1/districts".to_string(), 200),
        ("/v1/districts/{code}", format!("/v1/districts/{code}"), 200),
        ("/v1/districts/{code}", "/v1/districts/404".to_string(), 404),
        ("/v1/districts/{code}", "/v1/districts/%FF".to_string(), 400),
        (
            "/v1/districts/{code}/riders",
            format!("/v1/districts/{code}/riders"),
            200,
        ),
        (
            "/v1/districts/{code}/riders",
            "/v1/districts/404/riders".to_string(),
            404,
        ),
        ("/v1/riders/{rider_id}", format!("/v1/riders/{rider}"), 200),
        (
            "/v1/riders/{rider_id}/changes",
            format!("/v1/riders/{rider}/changes"),
            200,
        ),
        (
            "/v1/districts/changes",
            "/v1/districts/changes".to_string(),
            200,
        ),
        (
            "/v1/riders/{rider_id}",
            "/v1/riders/nobody".to_string(),
            404,
        ),
        (
            "/v1/districts.geojson",
            "/v1/districts.geojson".to_string(),
            200,
        ),
        ("/metrics", "/metrics".to_string(), 200),
        ("/healthz", "/healthz".to_string(), 200),
        ("/readyz", "/readyz".to_string(), 200),
        ("/openapi.json", "/openapi.json".to_string(), 200),
        ("/", "/".to_string(), 200),
    ];
    let documented: Vec<&str> = doc["paths"]
        .as_object()
        .expect("paths")
        .keys()
        .map(String::as_str)
        .collect();
    for route in &documented {
        assert!(
            requests.iter().any(|(r, _, _)| r == route),
            "route {route} is documented but not checked"
        );
    }
    for (route, path, status) in requests {
        if route.ends_with("/changes") {
            check_feed(&doc, &client, route, &path);
            continue;
        }
        let (got, content_type, body) = get(&path);
        assert_eq!(got, status, "{path}: {body}");
        let response = resolve(
            &doc,
            &doc["paths"][route]["get"]["responses"][status.to_string()],
        );
        let content = response["content"]
            .as_object()
            .unwrap_or_else(|| panic!("{route} {status} undocumented"));
        let (media, spec) = content.iter().next().expect("one media type");
        assert!(
            content_type.starts_with(media.as_str()),
            "{path}: {content_type} is not {media}"
        );
        if media.ends_with("json") {
            let value: Value = serde_json::from_str(&body).expect("json body");
            validate(&doc, &spec["schema"], &value, &path);
        } else {
            assert!(!body.is_empty());
        }
    }
    server.stop();
}
