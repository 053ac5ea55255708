//! A Server-Sent Events client for the push feeds' tests: a thread reads a feed's events as they
//! come, one at a time.

use std::collections::BTreeMap;
use std::io::BufRead;
use std::time::{Duration, Instant};

use super::Client;

use serde_json::Value;

/// One Server-Sent Event (or a comment line, with `kind` "comment").
#[derive(Clone, Debug)]
pub struct Event {
    pub kind: String,
    pub id: Option<u64>,
    pub data: Value,
}

/// A feed connection whose events a thread reads as they come.
pub struct Feed {
    pub events: crossbeam_channel::Receiver<Event>,
}

impl Feed {
    pub fn open(base: &str, path: &str, last_event_id: Option<u64>) -> Feed {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .build()
            .into();
        let mut request = agent.get(&format!("{base}{path}"));
        if let Some(id) = last_event_id {
            request = request.header("Last-Event-ID", &id.to_string());
        }
        let response = request.call().expect("the feed answers");
        assert_eq!(response.status().as_u16(), 200);
        let content_type = response
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        assert_eq!(content_type, "text/event-stream");
        let reader = std::io::BufReader::new(response.into_body().into_reader());
        // One event at a time: a test that stops taking events stops reading the socket, as a
        // slow client would.
        let (tx, rx) = crossbeam_channel::bounded(1);
        std::thread::spawn(move || {
            let (mut kind, mut id, mut data) = (String::new(), None, String::new());
            for line in reader.lines().map_while(Result::ok) {
                if let Some(comment) = line.strip_prefix(':') {
                    let _ = tx.send(Event {
                        kind: "comment".into(),
                        id: None,
                        data: Value::String(comment.trim().into()),
                    });
                } else if let Some(k) = line.strip_prefix("event: ") {
                    kind = k.to_owned();
                } else if let Some(i) = line.strip_prefix("id: ") {
                    id = i.parse().ok();
                } else if let Some(d) = line.strip_prefix("data: ") {
                    data.push_str(d);
                } else if line.is_empty() && !kind.is_empty() {
                    let json: Value = serde_json::from_str(&data).expect("event data is JSON");
                    data.clear();
                    let event = Event {
                        kind: std::mem::take(&mut kind),
                        id: id.take(),
                        data: json,
                    };
                    if tx.send(event).is_err() {
                        return;
                    }
                }
            }
        });
        Feed { events: rx }
    }

    /// The next event (comments skipped), within 30 s.
    pub fn next(&self) -> Event {
        loop {
            let e = self
                .events
                .recv_timeout(Duration::from_secs(30))
                .expect("an event within 30 s");
            if e.kind != "comment" {
                return e;
            }
        }
    }
}

/// Many feed connections read by one client thread (a tokio runtime of one thread, at the lowest
/// priority: the clients stand in for other machines, and a thread per client would outweigh the
/// engine's own threads on a small machine). Counts each connection's events.
pub struct ManyFeeds {
    pub events: Vec<std::sync::Arc<std::sync::atomic::AtomicU64>>,
    /// Connections that ended (the server closed them, or a read failed).
    pub ended: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl ManyFeeds {
    pub fn open(addr: std::net::SocketAddr, path: &str, clients: usize) -> ManyFeeds {
        use std::sync::atomic::{AtomicU64, Ordering};
        use std::sync::Arc;
        let events: Vec<Arc<AtomicU64>> = (0..clients).map(|_| Arc::default()).collect();
        let counters = events.clone();
        let ended = std::sync::Arc::new(AtomicU64::new(0));
        let ends = ended.clone();
        let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n");
        let (opened_tx, opened_rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let tid = rustix::thread::gettid();
            let _ = rustix::process::setpriority_process(Some(tid), 19);
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a client runtime");
            runtime.block_on(async move {
                use tokio::io::{AsyncReadExt, AsyncWriteExt};
                let mut tasks = Vec::new();
                for counter in counters {
                    let mut stream = tokio::net::TcpStream::connect(addr)
                        .await
                        .expect("connects");
                    stream.write_all(request.as_bytes()).await.expect("asks");
                    let ends = ends.clone();
                    tasks.push(tokio::spawn(async move {
                        let mut buf = vec![0u8; 64 * 1024];
                        let mut events = super::event_count::EventCounter::default();
                        loop {
                            let n = match stream.read(&mut buf).await {
                                Ok(0) | Err(_) => {
                                    ends.fetch_add(1, Ordering::Relaxed);
                                    return;
                                }
                                Ok(n) => n,
                            };
                            counter.fetch_add(events.count(&buf[..n]), Ordering::Relaxed);
                        }
                    }));
                }
                let _ = opened_tx.send(());
                for t in tasks {
                    let _ = t.await;
                }
            });
        });
        opened_rx
            .recv_timeout(Duration::from_secs(60))
            .expect("every client connected");
        ManyFeeds { events, ended }
    }
}

/// The districts a client holds from a district feed.
#[derive(Debug, Default)]
pub struct Districts {
    pub as_of: u64,
    pub by_code: BTreeMap<String, Value>,
}

impl Districts {
    /// Applies one event; checks `id` is its `as_of` and `as_of` never goes back.
    pub fn apply(&mut self, e: &Event) {
        let as_of = e.data["as_of"].as_u64().expect("as_of");
        assert_eq!(e.id, Some(as_of), "id: is the as_of");
        assert!(
            as_of >= self.as_of,
            "as_of went back: {} after {}",
            as_of,
            self.as_of
        );
        self.as_of = as_of;
        match e.kind.as_str() {
            "snapshot" => self.by_code = by_code(&e.data["districts"]),
            "changes" => {
                self.by_code.extend(by_code(&e.data["districts"]));
                for code in e.data["removed"].as_array().expect("removed") {
                    let code = code.as_str().expect("a code");
                    assert!(
                        self.by_code.remove(code).is_some(),
                        "{code} removed, not held"
                    );
                }
            }
            other => panic!("event {other}"),
        }
    }
}

pub fn by_code(list: &Value) -> BTreeMap<String, Value> {
    list.as_array()
        .expect("a list")
        .iter()
        .map(|d| (d["code"].as_str().expect("code").to_owned(), d.clone()))
        .collect()
}

/// Reads events into `state` until it equals the plain answer (which stays put once the input
/// stops); returns how many events that took.
pub fn follow_until_plain(feed: &Feed, state: &mut Districts, client: &Client) -> usize {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut n = 0;
    loop {
        let (_, plain) = client.json("/v1/districts");
        if by_code(&plain["districts"]) == state.by_code {
            assert!(state.as_of <= plain["as_of"].as_u64().expect("as_of"));
            return n;
        }
        assert!(Instant::now() < deadline, "the feed never reached {plain}");
        match feed.events.recv_timeout(Duration::from_millis(200)) {
            Ok(e) if e.kind == "comment" => {}
            Ok(e) => {
                state.apply(&e);
                n += 1;
            }
            Err(_) => {}
        }
    }
}
