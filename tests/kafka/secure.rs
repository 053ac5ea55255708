//! Secure connections (CONTRACT sections 1, 6 and 8): bearer tokens and HTTPS in front of the API,
//! Kafka over SASL_SSL (tansu with SCRAM behind a TLS endpoint), changelog keys partitioned as
//! Kafka's Java clients do, and a broker that goes away and comes back.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dongflow_connectors::kafka::{ClientSettings, TopicSpec};

use super::*;

/// A fresh temporary folder of this test.
fn temp_dir(test: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("dongflow-{test}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

/// Status, `WWW-Authenticate` and body of a GET with an optional `Authorization` header.
fn get(base: &str, path: &str, authorization: Option<&str>) -> (u16, Option<String>, String) {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    let mut request = agent.get(&format!("{base}{path}"));
    if let Some(a) = authorization {
        request = request.header("Authorization", a);
    }
    let mut response = request.call().expect("request goes through");
    let challenge = response
        .headers()
        .get("www-authenticate")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let body = response.body_mut().read_to_string().expect("body");
    (response.status().as_u16(), challenge, body)
}

/// Every route but the probes answers 401 with a JSON error and a Bearer challenge without a valid
/// token, and as usual with one; SIGHUP re-reads the file, so a removed token stops working and a
/// new one starts, without a restart.
#[test]
fn bearer_tokens_guard_every_route_but_the_probes_and_rotate_on_sighup() {
    let dir = temp_dir("tokens");
    let tokens = dir.join("tokens");
    std::fs::write(&tokens, "# the ops team\nalpha-7f3a\nbeta-19c2\n").expect("token file");
    let state = dir.join("state");
    let dongflow = Dongflow::run(&[
        "--http-token-file",
        &tokens.to_string_lossy(),
        "--state-dir",
        &state.to_string_lossy(),
    ]);
    let base = dongflow.http.clone();
    assert_eq!(get(&base, "/healthz", None).0, 200);
    assert_ne!(get(&base, "/readyz", None).0, 401);
    let guarded = [
        "/v1/districts",
        "/v1/districts/1168000000",
        "/v1/districts/1168000000/riders",
        "/v1/riders/r-1",
        "/v1/districts/changes",
        "/v1/riders/r-1/changes",
        "/v1/districts.geojson",
        "/metrics",
        "/openapi.json",
        "/",
        "/no/such/route",
    ];
    for path in guarded {
        for auth in [
            None,
            Some("Bearer wrong"),
            Some("Basic YWxwaGEtN2YzYQ=="),
            Some("Bearer alpha-7f3"),
        ] {
            let (status, challenge, body) = get(&base, path, auth);
            assert_eq!(status, 401, "{path} with {auth:?}: {body}");
            assert_eq!(
                challenge.as_deref(),
                Some("Bearer realm=\"dongflow\""),
                "{path}"
            );
            let error: Value = serde_json::from_str(&body).expect("a JSON error");
            assert!(error["error"].is_string(), "{path}: {body}");
        }
    }
    eventually(
        Duration::from_secs(60),
        "ready (the probe needs no token)",
        || (get(&base, "/readyz", None).0 == 200).then_some(()),
    );
    for path in ["/v1/districts", "/v1/districts.geojson", "/metrics", "/"] {
        let (status, _, body) = get(&base, path, Some("Bearer alpha-7f3a"));
        assert_eq!(status, 200, "{path}: {body}");
    }
    assert_eq!(
        get(&base, "/v1/riders/r-1", Some("bearer beta-19c2")).0,
        404
    );

    // Rotate: alpha revoked, gamma added.
    std::fs::write(&tokens, "beta-19c2\ngamma-44d0\n").expect("token file");
    let status = Command::new("/usr/bin/kill")
        .args(["-HUP", &dongflow.pid().to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
    eventually(
        Duration::from_secs(10),
        "the rotated tokens in force",
        || {
            let revoked = get(&base, "/v1/districts", Some("Bearer alpha-7f3a")).0 == 401;
            let added = get(&base, "/v1/districts", Some("Bearer gamma-44d0")).0 == 200;
            (revoked && added).then_some(())
        },
    );
    assert_eq!(get(&base, "/v1/districts", Some("Bearer beta-19c2")).0, 200);
    // A token file that becomes unusable keeps the tokens in force, with a line in the log.
    std::fs::write(&tokens, "\n").expect("token file");
    Command::new("/usr/bin/kill")
        .args(["-HUP", &dongflow.pid().to_string()])
        .status()
        .expect("kill");
    eventually(Duration::from_secs(10), "the refused reload logged", || {
        dongflow.log().contains("lists no token").then_some(())
    });
    assert_eq!(
        get(&base, "/v1/districts", Some("Bearer gamma-44d0")).0,
        200
    );
    assert!(
        !dongflow.log().contains("gamma-44d0"),
        "tokens are never logged"
    );
    assert_eq!(dongflow.terminate(), Some(0));
}

/// A self-signed certificate for 127.0.0.1 and localhost: (certificate PEM, key PEM, DER).
fn self_signed() -> (String, String, Vec<u8>) {
    let rcgen::CertifiedKey { cert, key_pair } =
        rcgen::generate_simple_self_signed(vec!["127.0.0.1".into(), "localhost".into()])
            .expect("certificate");
    (cert.pem(), key_pair.serialize_pem(), cert.der().to_vec())
}

/// One HTTP/1.1 GET over TLS to `addr`, trusting only `root` (DER): the status line and body.
fn https_get(addr: &str, root: &[u8], path: &str) -> Result<(String, String), String> {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(rustls::pki_types::CertificateDer::from(root.to_vec()))
        .map_err(|e| e.to_string())?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").map_err(|e| e.to_string())?;
    let mut conn =
        rustls::ClientConnection::new(Arc::new(config), name).map_err(|e| e.to_string())?;
    let mut sock = std::net::TcpStream::connect(addr).map_err(|e| e.to_string())?;
    sock.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    let mut tls = rustls::Stream::new(&mut conn, &mut sock);
    write!(
        tls,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| e.to_string())?;
    let mut response = Vec::new();
    match tls.read_to_end(&mut response) {
        Ok(_) => {}
        // Some servers close without a TLS close_notify once the response is sent.
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && !response.is_empty() => {}
        Err(e) => return Err(e.to_string()),
    }
    let text = String::from_utf8_lossy(&response).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").ok_or("no header end")?;
    let status = head.lines().next().unwrap_or_default().to_owned();
    Ok((status, body.to_owned()))
}

/// `--http-tls-cert`/`--http-tls-key` serve HTTPS with a certificate made here; a client that
/// trusts it gets answers, and plain HTTP on the same port gets none.
#[test]
fn https_serves_the_api_with_a_certificate_made_here() {
    let dir = temp_dir("https");
    let (cert, key, der) = self_signed();
    std::fs::write(dir.join("cert.pem"), cert).expect("cert");
    std::fs::write(dir.join("key.pem"), key).expect("key");
    let state = dir.join("state");
    let dongflow = Dongflow::run(&[
        "--http-tls-cert",
        &dir.join("cert.pem").to_string_lossy(),
        "--http-tls-key",
        &dir.join("key.pem").to_string_lossy(),
        "--state-dir",
        &state.to_string_lossy(),
    ]);
    let addr = dongflow
        .http
        .strip_prefix("https://")
        .expect("an https URL is printed")
        .to_owned();
    let (status, body) = https_get(&addr, &der, "/healthz").expect("HTTPS works");
    assert_eq!(status, "HTTP/1.1 200 OK", "{body}");
    eventually(Duration::from_secs(60), "districts over HTTPS", || {
        let (status, body) = https_get(&addr, &der, "/v1/districts").ok()?;
        let v: Value = serde_json::from_str(&body).ok()?;
        (status == "HTTP/1.1 200 OK" && v["districts"].is_array()).then_some(())
    });
    // A client that does not trust the certificate cannot talk to it.
    let (_, _, other) = self_signed();
    assert!(https_get(&addr, &other, "/healthz").is_err());
    // Plain HTTP to the TLS port gets no HTTP answer.
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(5)))
        .build()
        .into();
    assert!(agent.get(&format!("http://{addr}/healthz")).call().is_err());
    assert_eq!(dongflow.terminate(), Some(0));
}

/// Kafka's Java `Utils.murmur2`, written from its definition.
fn murmur2(data: &[u8]) -> i32 {
    const M: u32 = 0x5bd1_e995;
    let mut h: u32 = 0x9747_b28c ^ data.len() as u32;
    let chunks = data.chunks_exact(4);
    let tail = chunks.remainder();
    for c in chunks {
        let mut k = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> 24;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M) ^ k;
    }
    if tail.len() == 3 {
        h ^= u32::from(tail[2]) << 16;
    }
    if tail.len() >= 2 {
        h ^= u32::from(tail[1]) << 8;
    }
    if !tail.is_empty() {
        h ^= u32::from(tail[0]);
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    h as i32
}

/// The partition Kafka's Java producer gives `key` among `partitions`.
pub fn java_partition(key: &[u8], partitions: i32) -> i32 {
    (murmur2(key) & 0x7fff_ffff) % partitions
}

#[test]
fn murmur2_matches_kafkas_own_test_vectors() {
    let cases: [(&[u8], i32); 6] = [
        (b"21", -973_932_308),
        (b"foobar", -790_332_482),
        (b"a-little-bit-long-string", -985_981_536),
        (b"a-little-bit-longer-string", -1_486_304_829),
        (
            b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8",
            -58_897_971,
        ),
        (b"abc", 479_470_107),
    ];
    for (key, hash) in cases {
        assert_eq!(murmur2(key), hash, "{}", String::from_utf8_lossy(key));
    }
}

/// Every keyed record of `records` sits in the partition Kafka's Java clients would give its key.
pub fn check_java_partitioning(records: &[Record], partitions: i32) {
    let keyed: Vec<&Record> = records.iter().filter(|r| r.key.is_some()).collect();
    assert!(!keyed.is_empty(), "no keyed records to check");
    for r in keyed {
        let key = r.key.as_deref().unwrap_or_default();
        assert_eq!(
            r.partition,
            java_partition(key, partitions),
            "{} key {} is not where murmur2 puts it",
            r.topic,
            String::from_utf8_lossy(key)
        );
    }
}

/// A CA and a server certificate for 127.0.0.1 signed by it: (CA PEM, server PEM, server key PEM).
fn ca_and_server() -> (String, String, String) {
    let ca_key = rcgen::KeyPair::generate().expect("key");
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(rcgen::DnType::CommonName, "dongflow test CA");
    let ca_cert = ca.self_signed(&ca_key).expect("CA");
    let server_key = rcgen::KeyPair::generate().expect("key");
    let server =
        rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])
            .expect("params");
    let server_cert = server
        .signed_by(&server_key, &ca_cert, &ca_key)
        .expect("server certificate");
    (ca_cert.pem(), server_cert.pem(), server_key.serialize_pem())
}

/// socat terminating TLS on `listen` and forwarding to `target` in the clear; killed on drop.
struct TlsEndpoint(Child);

impl TlsEndpoint {
    fn start(listen: u16, target: u16, cert: &Path, key: &Path) -> TlsEndpoint {
        let child = Command::new("socat")
            .arg(format!(
                "OPENSSL-LISTEN:{listen},bind=127.0.0.1,reuseaddr,fork,cert={},key={},verify=0",
                cert.display(),
                key.display()
            ))
            .arg(format!("TCP:127.0.0.1:{target}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("socat starts (apt-get install socat)");
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", listen)).is_err() {
            assert!(
                Instant::now() < deadline,
                "socat did not listen on {listen}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        TlsEndpoint(child)
    }
}

impl Drop for TlsEndpoint {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The client properties of a SASL_SSL connection, as a user would write them.
fn client_properties(ca: &Path, password: &str) -> String {
    format!(
        "# a production-like client\nsecurity.protocol=SASL_SSL\nsasl.mechanism=SCRAM-SHA-512\n\
         sasl.username=dongflow\nsasl.password={password}\nssl.ca.location={}\n",
        ca.display()
    )
}

/// `dongflow run` against tansu with SASL SCRAM-SHA-512 behind a TLS endpoint, configured from a
/// properties file, ends equal to the model; with a wrong password it says so in one kind of line,
/// never shows the password, keeps running and is not ready.
#[test]
fn sasl_ssl_from_a_config_file_ends_equal_to_the_model() {
    let Some(binary) = common::kafka::tansu_binary() else {
        return;
    };
    let dir = temp_dir("sasl-ssl");
    let (ca, cert, key) = ca_and_server();
    for (name, pem) in [
        ("ca.pem", &ca),
        ("server.pem", &cert),
        ("server-key.pem", &key),
    ] {
        std::fs::write(dir.join(name), pem).expect("pem");
    }
    let (plain, tls) = (free_port(), free_port());
    let mut tansu = Tansu::start(binary, plain);
    tansu.create_user("dongflow", "correct-horse-battery");
    tansu.down();
    tansu.advertised = Some(tls);
    tansu.authentication = true;
    tansu.up();
    let _endpoint = TlsEndpoint::start(
        tls,
        plain,
        &dir.join("server.pem"),
        &dir.join("server-key.pem"),
    );
    let bootstrap = format!("127.0.0.1:{tls}");
    let good = dir.join("client.properties");
    std::fs::write(
        &good,
        client_properties(&dir.join("ca.pem"), "correct-horse-battery"),
    )
    .expect("properties");
    let settings = ClientSettings::load(bootstrap.as_str(), Some(&good), &[]).expect("settings");

    let index = builtin();
    let t = Topics::new("sasl-ssl");
    let input = scenario(&t, &index, 23, 2_000);
    let specs: Vec<TopicSpec> = [&t.riders, &t.deliveries]
        .iter()
        .map(|n| TopicSpec::new(n, PARTITIONS))
        .collect();
    dongflow_connectors::kafka::create_topics(&settings, &specs, Duration::from_secs(30))
        .expect("topics created over SASL_SSL");
    common::kafka::produce_via(&settings, &input.records);

    // A wrong password first: an error that says what is wrong, not ready, still running.
    let wrong = dir.join("wrong.properties");
    std::fs::write(
        &wrong,
        client_properties(&dir.join("ca.pem"), "tr0ub4dor-wrong"),
    )
    .expect("properties");
    let state = dir.join("state").to_string_lossy().into_owned();
    let mut args = t.args(&bootstrap, &state);
    args.extend(["--kafka-config-file", wrong.to_str().expect("utf-8 path")]);
    let refused = Dongflow::run(&args);
    eventually(
        Duration::from_secs(30),
        "an authentication error in the log",
        || {
            let log = refused.log().to_lowercase();
            (log.contains("authentication") || log.contains("sasl")).then_some(())
        },
    );
    let client = common::Client::at(refused.http.clone());
    assert_eq!(client.json("/healthz").0, 200);
    assert_eq!(client.json("/readyz").0, 503);
    let log = refused.log();
    assert!(
        !log.contains("tr0ub4dor-wrong"),
        "the password is never printed"
    );
    assert!(!log.contains("panicked"), "{log}");
    assert_eq!(
        refused.terminate(),
        Some(0),
        "a refused login is not a crash"
    );

    let mut args = t.args(&bootstrap, &state);
    args.extend(["--kafka-config-file", good.to_str().expect("utf-8 path")]);
    let dongflow = Dongflow::run(&args);
    let mut outputs = Outputs {
        districts: Reader::via(&settings, &t.districts, PARTITIONS),
        riders: Reader::via(&settings, &t.snapshots, PARTITIONS),
        dlq: Reader::via(&settings, &t.dlq, PARTITIONS),
    };
    outputs.wait_for(&input);
    check_http_matches(&dongflow.http, &outputs);
    assert!(!dongflow.log().contains("correct-horse-battery"));
    assert_eq!(dongflow.terminate(), Some(0));
}

/// Records read so far, from `/metrics`.
fn read_so_far(http: &str) -> f64 {
    let (_, _, text) = common::Client::at(http.to_owned()).get("/metrics");
    common::sample(&text, "dongflow_kafka_records_read_total").unwrap_or(0.0)
}

/// A broker that goes away for a few seconds while input arrives loses nothing and stops nothing:
/// `/healthz` stays 200, the engine reads again within 2 s of the broker's return, and the final
/// state equals the model (CONTRACT section 7).
#[test]
fn a_broker_outage_loses_nothing_and_reading_resumes_within_2_s() {
    let Some(binary) = common::kafka::tansu_binary() else {
        return;
    };
    let index = builtin();
    let t = Topics::new("outage");
    let input = scenario(&t, &index, 29, 3_000);
    let mut tansu = Tansu::start(binary, free_port());
    let bootstrap = tansu.bootstrap();
    tansu_create(&bootstrap, &t);
    let (before, after) = input.records.split_at(input.records.len() / 2);
    produce(&bootstrap, before);
    let state = temp_dir("outage-state");
    let dongflow = Dongflow::run(&t.args(&bootstrap, &state.to_string_lossy()));
    let client = common::Client::at(dongflow.http.clone());
    eventually(Duration::from_secs(60), "the first half read", || {
        (read_so_far(&dongflow.http) >= before.len() as f64).then_some(())
    });
    tansu.down();
    eventually(
        Duration::from_secs(30),
        "the engine seeing the broker gone",
        || {
            let (_, _, text) = client.get("/metrics");
            (common::sample(&text, "dongflow_kafka_brokers_reachable") == Some(0.0)).then_some(())
        },
    );
    assert_eq!(client.json("/healthz").0, 200, "an outage is not a crash");
    // The outage shows per partition: no partition is read while the broker is away.
    eventually(
        Duration::from_secs(30),
        "every partition's read age growing",
        || {
            let ages = read_ages(&client);
            (ages.len() == 2 * PARTITIONS as usize && ages.iter().all(|a| *a >= 2.0)).then_some(())
        },
    );
    let read_before = read_so_far(&dongflow.http);
    tansu.up();
    // The clock starts when the broker accepts connections again, and includes the time this
    // test's own producer takes to hand it the first new record.
    let back = Instant::now();
    let (first, rest) = after.split_at(1);
    produce(&bootstrap, first);
    eventually(Duration::from_secs(30), "the engine reading again", || {
        (read_so_far(&dongflow.http) > read_before).then_some(())
    });
    let resumed = back.elapsed();
    eprintln!("reading again {resumed:?} after the broker came back");
    assert!(
        resumed <= Duration::from_secs(2),
        "read again only after {resumed:?}"
    );
    produce(&bootstrap, rest);
    let mut outputs = Outputs::new(&bootstrap, &t);
    outputs.wait_for(&input);
    assert_eq!(client.json("/healthz").0, 200);
    // Caught up again, and idle: every partition is read (its end offset seen reached).
    eventually(
        Duration::from_secs(30),
        "every partition read again",
        || {
            let ages = read_ages(&client);
            (ages.len() == 2 * PARTITIONS as usize && ages.iter().all(|a| *a < 2.0)).then_some(())
        },
    );
    assert_eq!(dongflow.terminate(), Some(0));
}

/// `dongflow_input_read_age_seconds` of every input partition.
fn read_ages(client: &common::Client) -> Vec<f64> {
    let (_, _, text) = client.get("/metrics");
    text.lines()
        .filter(|l| l.starts_with("dongflow_input_read_age_seconds{"))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse().ok())
        .collect()
}

/// Creates the input topics of `t` on a broker with the admin API.
fn tansu_create(bootstrap: &str, t: &Topics) {
    common::kafka::create_on(bootstrap, &[&t.riders, &t.deliveries], PARTITIONS);
}
