//! Push feeds (CONTRACT section 6): `GET /v1/districts/changes` and `GET /v1/riders/{id}/changes`
//! as Server-Sent Events. A `snapshot` event, then one `changes` event per version of the serving
//! view that changed anything the feed shows, each with `id:` its `as_of`.
//!
//! - **One fan-out per process.** Every feed reads the versions its view holds ([`ServingView::since`]):
//!   nothing is queued per client but the one event being written. A client that reads slowly is
//!   simply asked less often; when it reads again it gets everything after its last `as_of` folded
//!   into one event (each key's latest value), or a fresh `snapshot` once the view no longer holds
//!   all of it. Either way the client's state is then the view's.
//! - **Through a restart.** The feed follows the stale view (`stale: true`) until the live state is
//!   ready, then sends a fresh `snapshot` of the live view; `as_of` never goes back within one
//!   connection (a view behind what was sent is waited for).
//! - **Resumption.** `Last-Event-ID: AS_OF` resumes with the changes after it when the view holds
//!   them, else starts with a snapshot.
//! - **Paced.** At most one event per 20 ms per feed; versions in between are folded into the
//!   next event. Feed tasks run on a runtime thread of their own, beside the one answering queries.
//! - A comment line every 15 s keeps an idle connection open through proxies.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use dongflow_connectors::Id;
use dongflow_dataflow::types::Time;
use hyper::body::Frame;
use hyper::header::{HeaderValue, CACHE_CONTROL, CONTENT_TYPE};
use hyper::{Response, StatusCode};
use serde::Serialize;

use super::App;
use crate::render::{DistrictView, DistrictsView, RiderView, Stamped};
use crate::view::history::Version;
use crate::view::ServingView;
use crate::AnswerBody;
use crate::Query;

/// How often an idle feed sends a comment line.
const KEEP_ALIVE: Duration = Duration::from_secs(15);
/// The least time between two events of one feed: versions in between are folded into the next
/// event (each key's latest value), so a feed costs the engine at most 50 events a second however
/// fast versions come, and a change still reaches a client within a few tens of milliseconds.
const PACE: Duration = Duration::from_millis(20);

/// How often a waiting feed looks again whether another view should answer (the live state became
/// ready), besides every new version.
const RECHECK: Duration = Duration::from_secs(1);

/// What a feed shows.
#[derive(Clone, Debug)]
pub enum FeedOf {
    /// Every district.
    Districts,
    /// One rider.
    Rider(Id),
}

/// The feeds' counters, for `/metrics`.
#[derive(Debug, Default)]
pub struct FeedMetrics {
    /// Feed connections open now.
    pub open: AtomicI64,
    /// Events sent, by kind: snapshots, changes.
    pub snapshots: AtomicU64,
    /// `changes` events sent.
    pub changes: AtomicU64,
    /// Versions folded into a later event for a client that fell behind.
    pub folded: AtomicU64,
    /// Snapshots sent because the view no longer held what a client had not read.
    pub resnapshots: AtomicU64,
}

/// The district feed's last events, rendered once for every client at the same place: clients
/// that keep up ask for the same event, and it is rendered once, not once per client.
#[derive(Debug, Default)]
pub struct Rendered {
    /// `(stale, as_of)` and the snapshot event.
    snapshot: Mutex<Option<((bool, Time), Bytes)>>,
    /// `(stale, from, to)` and the changes event of the versions after `from` up to `to`.
    changes: Mutex<Option<(ChangesKey, Option<Bytes>)>>,
}

/// Which changes event: from the stale view or not, after which `as_of`, up to which.
type ChangesKey = (bool, Time, Time);

/// The body of a feed response: the events its task writes, one at a time.
pub struct FeedBody(tokio::sync::mpsc::Receiver<Bytes>);

impl hyper::body::Body for FeedBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0
            .poll_recv(cx)
            .map(|next| next.map(|b| Ok(Frame::data(b))))
    }
}

/// Which view a feed follows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Source {
    Stale,
    Live,
}

/// The view that answers now, as the plain routes choose it.
fn current(app: &App) -> Option<(Source, Arc<ServingView>)> {
    if super::live_ready(app) {
        return Some((Source::Live, app.engine.view()));
    }
    let stale = app.stale.as_ref()?.serving()?;
    Some((Source::Stale, stale))
}

/// Starts a feed's task and answers with its event stream.
pub fn respond(app: &Arc<App>, of: FeedOf, last_event_id: Option<Time>) -> Response<FeedBody> {
    // One event waits at most: a slow client holds back its own task, nothing else.
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    let app = app.clone();
    let runtime = app
        .feed_runtime
        .get()
        .cloned()
        .unwrap_or_else(tokio::runtime::Handle::current);
    runtime.spawn(async move {
        app.feeds.open.fetch_add(1, Ordering::Relaxed);
        run(&app, &of, last_event_id, &tx).await;
        app.feeds.open.fetch_sub(1, Ordering::Relaxed);
    });
    let mut response = Response::new(FeedBody(rx));
    *response.status_mut() = StatusCode::OK;
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

/// What a feed has sent: from which view, up to which `as_of`.
#[derive(Clone, Copy, Debug)]
struct Position {
    source: Source,
    as_of: Time,
}

/// Writes events until the client goes away.
async fn run(
    app: &App,
    of: &FeedOf,
    mut resume: Option<Time>,
    tx: &tokio::sync::mpsc::Sender<Bytes>,
) {
    let mut sent: Option<Position> = None;
    let mut live = app.engine.view().subscribe();
    let mut stale = app
        .stale
        .as_ref()
        .and_then(|s| s.serving())
        .map(|v| v.subscribe());
    let mut quiet_since = tokio::time::Instant::now();
    loop {
        if let Some((source, view)) = current(app) {
            let event = next_event(app, of, &view, source, &mut sent, resume.take());
            if let Some(event) = event {
                if tx.send(event).await.is_err() {
                    return;
                }
                quiet_since = tokio::time::Instant::now();
                tokio::time::sleep_until(quiet_since + PACE).await;
                continue;
            }
        }
        if stale.is_none() {
            stale = app
                .stale
                .as_ref()
                .and_then(|s| s.serving())
                .map(|v| v.subscribe());
        }
        let keep_alive = quiet_since + KEEP_ALIVE;
        tokio::select! {
            // A view whose sender is gone never wakes the feed again (no busy loop).
            _ = async {
                if live.changed().await.is_err() {
                    std::future::pending::<()>().await;
                }
            } => {}
            _ = async {
                let woke = match &mut stale {
                    Some(rx) => rx.changed().await.is_ok(),
                    None => false,
                };
                if !woke {
                    std::future::pending::<()>().await;
                }
            } => {}
            () = tokio::time::sleep(RECHECK) => {}
            () = tokio::time::sleep_until(keep_alive) => {
                if tx.send(Bytes::from_static(b": keep-alive\n\n")).await.is_err() {
                    return;
                }
                quiet_since = tokio::time::Instant::now();
            }
            () = tx.closed() => return,
        }
    }
}

/// The next event a feed at `sent` should send from `view`, if any; moves `sent` past it.
fn next_event(
    app: &App,
    of: &FeedOf,
    view: &ServingView,
    source: Source,
    sent: &mut Option<Position>,
    resume: Option<Time>,
) -> Option<Bytes> {
    let at = view.as_of();
    if at == 0 {
        return None;
    }
    let position = match (*sent, resume) {
        (Some(p), _) if p.source == source => p,
        // A resumption the view can serve: go on from there.
        (None, Some(id)) if id <= at && view.since(id).is_some() => {
            let p = Position { source, as_of: id };
            *sent = Some(p);
            p
        }
        // A first event, or another view: a snapshot, unless it is behind what was sent.
        (before, _) => {
            if before.is_some_and(|b| at < b.as_of) {
                return None;
            }
            return snapshot(app, of, view, source, sent);
        }
    };
    let Some(versions) = view.since(position.as_of) else {
        app.feeds.resnapshots.fetch_add(1, Ordering::Relaxed);
        return snapshot(app, of, view, source, sent);
    };
    let last = versions.last()?.as_of;
    if versions.len() > 1 {
        app.feeds
            .folded
            .fetch_add(versions.len() as u64 - 1, Ordering::Relaxed);
    }
    *sent = Some(Position {
        source,
        as_of: last,
    });
    let stale = source == Source::Stale;
    let render = || {
        let folded = match versions.len() {
            1 => None,
            _ => Some(Version::fold(&versions)),
        };
        let version = folded.as_ref().unwrap_or(&versions[0]);
        let data = changes(app, of, version, stale)?;
        Some(event("changes", last, &data))
    };
    let rendered = match of {
        FeedOf::Districts => {
            let key = (stale, position.as_of, last);
            let mut cache = app
                .feed_events
                .changes
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            match cache.as_ref().filter(|(k, _)| *k == key) {
                Some((_, event)) => event.clone(),
                None => {
                    let event = render();
                    *cache = Some((key, event.clone()));
                    event
                }
            }
        }
        FeedOf::Rider(_) => render(),
    }?;
    app.feeds.changes.fetch_add(1, Ordering::Relaxed);
    Some(rendered)
}

/// The snapshot event of `view` now.
fn snapshot(
    app: &App,
    of: &FeedOf,
    view: &ServingView,
    source: Source,
    sent: &mut Option<Position>,
) -> Option<Bytes> {
    let query = match of {
        FeedOf::Districts => Query::Districts,
        FeedOf::Rider(id) => Query::Rider(id.clone()),
    };
    let key = (view.stale(), view.as_of());
    if let FeedOf::Districts = of {
        let cache = app
            .feed_events
            .snapshot
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some((_, event)) = cache.as_ref().filter(|(k, _)| *k == key) {
            *sent = Some(Position {
                source,
                as_of: key.1,
            });
            app.feeds.snapshots.fetch_add(1, Ordering::Relaxed);
            return Some(event.clone());
        }
    }
    let answer = view.answer(&query)?;
    let data = match (&answer.body, of) {
        (AnswerBody::Districts(counts), _) => serde_json::to_vec(&DistrictsView::new(
            &app.index,
            answer.as_of,
            answer.stale,
            counts,
        )),
        (AnswerBody::Rider(snapshot), FeedOf::Rider(id)) => {
            rider_json(app, id, snapshot.as_ref(), answer.as_of, answer.stale)
        }
        _ => return None,
    }
    .ok()?;
    *sent = Some(Position {
        source,
        as_of: answer.as_of,
    });
    app.feeds.snapshots.fetch_add(1, Ordering::Relaxed);
    let event = event("snapshot", answer.as_of, &data);
    if let FeedOf::Districts = of {
        let key = (answer.stale, answer.as_of);
        *app.feed_events
            .snapshot
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some((key, event.clone()));
    }
    Some(event)
}

/// A rider as a feed shows it: its snapshot, or that it is gone.
fn rider_json(
    app: &App,
    id: &str,
    snapshot: Option<&dongflow_dataflow::types::Snapshot>,
    as_of: Time,
    stale: bool,
) -> serde_json::Result<Vec<u8>> {
    match snapshot {
        Some(s) => serde_json::to_vec(&Stamped {
            value: RiderView::new(&app.index, id, s),
            as_of,
            stale,
        }),
        None => serde_json::to_vec(&serde_json::json!({
            "rider_id": id, "removed": true, "as_of": as_of, "stale": stale,
        })),
    }
}

/// `{"as_of", "stale", "districts": [...], "removed": [...]}`.
#[derive(Serialize)]
struct DistrictChanges<'a> {
    as_of: Time,
    stale: bool,
    districts: Vec<DistrictView<'a>>,
    removed: Vec<&'a str>,
}

/// The data of a `changes` event for `of`; `None` when the version changed nothing it shows.
fn changes(app: &App, of: &FeedOf, version: &Version, stale: bool) -> Option<Vec<u8>> {
    match of {
        FeedOf::Districts => {
            if version.districts.is_empty() {
                return None;
            }
            let mut districts = Vec::new();
            let mut removed = Vec::new();
            for (id, counts) in &version.districts {
                match counts {
                    Some(c) => districts.push(DistrictView::new(&app.index, *id, c)),
                    None => removed.push(app.index.code(*id)),
                }
            }
            districts.sort_by(|a, b| a.code.cmp(b.code));
            removed.sort_unstable();
            serde_json::to_vec(&DistrictChanges {
                as_of: version.as_of,
                stale,
                districts,
                removed,
            })
            .ok()
        }
        FeedOf::Rider(id) => {
            let (_, snapshot) = version.riders.iter().find(|(r, _)| r == id)?;
            rider_json(app, id, snapshot.as_deref(), version.as_of, stale).ok()
        }
    }
}

/// One Server-Sent Event.
fn event(kind: &str, id: Time, data: &[u8]) -> Bytes {
    let mut out = Vec::with_capacity(data.len() + 40);
    out.extend_from_slice(format!("event: {kind}\nid: {id}\ndata: ").as_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(b"\n\n");
    Bytes::from(out)
}
