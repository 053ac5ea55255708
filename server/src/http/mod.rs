//! The HTTP API of CONTRACT section 6, served with hyper.
//!
//! Every request is answered at one consistent `as_of` from the process's serving view
//! ([`crate::view`]): a read of the version of the maps current when the request came, on the
//! connection's own task. A query never waits for the workers or stalls them, and a slow or
//! vanished client holds nothing but its own copy of that version. Request bodies are never read.

use std::convert::Infallible;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use dongflow_connectors::kafka::KafkaMetrics;
use dongflow_dataflow::districts::DistrictId;
use dongflow_dataflow::types::{DistrictCounts, Time};

use crate::recovery::WriteStatus;
use crate::view::StaleView;
use dongflow_dataflow::districts::DistrictIndex;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE, WWW_AUTHENTICATE};
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use percent_encoding::percent_decode_str;
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;

pub mod auth;
mod canned;
mod feed;
mod metrics;
pub mod tls;

pub use auth::{TokenFileError, Tokens};
use metrics::HttpMetrics;
pub use tls::TlsError;

use crate::changelog::ClearingProgress;
use crate::engine::EngineHandle;
use crate::query::{Answer, AnswerBody, Query, QueryError};
use crate::render::{DistrictView, DistrictsView, RiderView, RidersView, Stamped};

const JSON: &str = "application/json; charset=utf-8";
const OPENAPI: &str = include_str!("../../openapi.json");

/// The live map page (`GET /`): its HTML with the script inlined, so the page is one request and needs
/// nothing from outside the binary. `map.js` stays a file of its own for node's test runner.
static INDEX_PAGE: std::sync::LazyLock<Bytes> = std::sync::LazyLock::new(|| {
    Bytes::from(include_str!("../page/index.html").replacen(
        "/*MAP_JS*/",
        include_str!("../page/map.js"),
        1,
    ))
});

/// What the HTTP side needs: the engine, the map, and the request metrics.
pub struct App {
    engine: EngineHandle,
    index: Arc<DistrictIndex>,
    geojson: Bytes,
    /// The last all-districts answer rendered, by `(as_of, stale)`: one version of the view has
    /// one answer, so it is rendered once however many ask for it.
    districts_body: Mutex<Option<(Time, bool, Bytes)>>,
    metrics: HttpMetrics,
    kafka: Option<Arc<KafkaMetrics>>,
    stale: Option<Arc<StaleView>>,
    checkpoints: Option<WriteStatus>,
    changelog: Option<Arc<ClearingProgress>>,
    feeds: feed::FeedMetrics,
    feed_events: feed::Rendered,
    /// Where feed tasks run: a runtime of their own, so that a thousand feeds waking at each
    /// version do not queue ahead of a point query (set by [`HttpServer`]; else the caller's).
    feed_runtime: std::sync::OnceLock<tokio::runtime::Handle>,
}

/// A response body: a whole answer, or a push feed's events as they come.
type Body = http_body_util::Either<Full<Bytes>, feed::FeedBody>;

impl std::fmt::Debug for App {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("App").field("engine", &self.engine).finish()
    }
}

impl App {
    /// The HTTP application over a running engine and its district map.
    pub fn new(engine: EngineHandle, index: Arc<DistrictIndex>) -> Arc<Self> {
        let geojson = Bytes::from(index.to_geojson().to_string());
        Arc::new(Self {
            engine,
            index,
            geojson,
            districts_body: Mutex::default(),
            metrics: HttpMetrics::default(),
            kafka: None,
            stale: None,
            checkpoints: None,
            changelog: None,
            feeds: feed::FeedMetrics::default(),
            feed_events: feed::Rendered::default(),
            feed_runtime: std::sync::OnceLock::new(),
        })
    }

    /// The HTTP application of an engine that reads from and writes to Kafka: `/metrics` also
    /// shows the Kafka counters and consumer lag, the checkpoint writes and the changelog's
    /// reconciling, and until the live state is ready, answers come with `"stale": true` from the
    /// stale view (the checkpoint and the changelog read back).
    pub fn with_kafka(
        engine: EngineHandle,
        index: Arc<DistrictIndex>,
        pipeline: PipelineStatus,
    ) -> Arc<Self> {
        let geojson = Bytes::from(index.to_geojson().to_string());
        Arc::new(Self {
            engine,
            index,
            geojson,
            districts_body: Mutex::default(),
            metrics: HttpMetrics::default(),
            kafka: Some(pipeline.kafka),
            stale: pipeline.stale,
            checkpoints: pipeline.checkpoints,
            changelog: pipeline.changelog,
            feeds: feed::FeedMetrics::default(),
            feed_events: feed::Rendered::default(),
            feed_runtime: std::sync::OnceLock::new(),
        })
    }
}

/// What the HTTP side shows of a pipeline over Kafka.
#[derive(Clone, Debug)]
pub struct PipelineStatus {
    /// The Kafka counters and lag.
    pub kafka: Arc<KafkaMetrics>,
    /// The stale view, answering until the live state is ready.
    pub stale: Option<Arc<StaleView>>,
    /// How checkpoint writes go (`None` without a state dir).
    pub checkpoints: Option<WriteStatus>,
    /// How far the changelog is reconciled with the state.
    pub changelog: Option<Arc<ClearingProgress>>,
}

/// Who may ask, and over what: bearer tokens (`--http-token-file`) and TLS (`--http-tls-cert`).
#[derive(Clone, Default)]
pub struct HttpSecurity {
    /// When set, every route but `/healthz` and `/readyz` needs one of these tokens.
    pub tokens: Option<Arc<Tokens>>,
    /// When set, connections speak TLS.
    pub tls: Option<Arc<rustls::ServerConfig>>,
}

impl std::fmt::Debug for HttpSecurity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpSecurity")
            .field("tokens", &self.tokens.as_ref().map(|t| t.path().to_owned()))
            .field("tls", &self.tls.is_some())
            .finish()
    }
}

/// How long a client has to finish its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves `app` on `listener` until `shutdown` completes; connections already open finish their
/// requests on their own.
pub async fn serve(
    listener: TcpListener,
    app: Arc<App>,
    security: HttpSecurity,
    shutdown: impl Future<Output = ()>,
) {
    let acceptor = security.tls.clone().map(tokio_rustls::TlsAcceptor::from);
    tokio::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = &mut shutdown => return,
        };
        let (stream, _) = match accepted {
            Ok(conn) => conn,
            Err(e) => {
                // Out of file descriptors and the like: wait a little instead of spinning.
                tracing::warn!("accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        // Answers are small; send them without waiting for more to coalesce.
        let _ = stream.set_nodelay(true);
        let (app, tokens, acceptor) = (app.clone(), security.tokens.clone(), acceptor.clone());
        tokio::spawn(async move {
            let Some(acceptor) = acceptor else {
                // A plain connection that asks for a feed is served on the feeds' runtime: its
                // events are written there, not among the answers to point queries.
                if let Some(feeds) = app.feed_runtime.get().cloned() {
                    if asks_for_a_feed(&stream).await {
                        feeds.spawn(connection(stream, app, tokens));
                        return;
                    }
                }
                return connection(stream, app, tokens).await;
            };
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                Ok(Ok(tls)) => connection(tls, app, tokens).await,
                Ok(Err(e)) => tracing::debug!("TLS handshake failed: {e}"),
                Err(_) => tracing::debug!("TLS handshake timed out"),
            }
        });
    }
}

/// Whether a plain connection's first request is for a push feed (`GET /v1/.../changes`), read
/// without taking it from the connection. A client that sends nothing within the header timeout
/// is left to the server's own handling of it.
async fn asks_for_a_feed(stream: &tokio::net::TcpStream) -> bool {
    let mut buf = [0u8; 256];
    let peeked = tokio::time::timeout(Duration::from_secs(10), stream.peek(&mut buf)).await;
    let Ok(Ok(n)) = peeked else {
        return false;
    };
    let line = &buf[..n];
    let Some(rest) = line.strip_prefix(b"GET ") else {
        return false;
    };
    let path_end = rest
        .iter()
        .position(|b| *b == b' ' || *b == b'?')
        .unwrap_or(rest.len());
    let path = &rest[..path_end];
    path.starts_with(b"/v1/") && path.ends_with(b"/changes")
}

/// Serves the requests of one connection, plain or TLS.
async fn connection(
    io: impl AsyncRead + AsyncWrite + Unpin + Send + 'static,
    app: Arc<App>,
    tokens: Option<Arc<Tokens>>,
) {
    let service = service_fn(move |req| handle(app.clone(), tokens.clone(), req));
    let conn = hyper::server::conn::http1::Builder::new()
        // A client that sends headers too slowly is dropped rather than kept forever.
        .header_read_timeout(Duration::from_secs(10))
        .timer(hyper_util::rt::TokioTimer::new())
        .serve_connection(TokioIo::new(canned::JsonErrors::new(io)), service);
    if let Err(e) = conn.await {
        tracing::debug!("connection ended: {e}");
    }
}

async fn handle(
    app: Arc<App>,
    tokens: Option<Arc<Tokens>>,
    req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let started = Instant::now();
    // A request that cannot be authenticated is answered here and never reaches the view.
    let (route, response) = match tokens.filter(|_| needs_token(req.uri().path())) {
        Some(t) if !t.admits(req.headers().get(AUTHORIZATION).map(HeaderValue::as_bytes)) => {
            let (route, response) = unauthorized(&req);
            (route, response.map(Body::Left))
        }
        _ => match feed_route(&app, &req) {
            Some(feed) => feed,
            None => {
                let (route, response) = route(&app, &req).await;
                (route, response.map(Body::Left))
            }
        },
    };
    app.metrics
        .observe(route, response.status(), started.elapsed());
    Ok(response)
}

/// The push feeds' routes: the feed's response, or `None` for any other route.
fn feed_route(app: &Arc<App>, req: &Request<Incoming>) -> Option<(&'static str, Response<Body>)> {
    let parts: Vec<&str> = req
        .uri()
        .path()
        .trim_start_matches('/')
        .split('/')
        .collect();
    let (route, of) = match parts.as_slice() {
        ["v1", "districts", "changes"] => (routes::DISTRICT_CHANGES, feed::FeedOf::Districts),
        ["v1", "riders", id, "changes"] => {
            let of = match segment(id) {
                Some(id) if !id.is_empty() => feed::FeedOf::Rider(id.into()),
                _ => {
                    let e = error(StatusCode::BAD_REQUEST, "rider id is not valid UTF-8");
                    return Some((routes::RIDER_CHANGES, e.map(Body::Left)));
                }
            };
            (routes::RIDER_CHANGES, of)
        }
        _ => return None,
    };
    if req.method() != Method::GET {
        let mut response = error(StatusCode::METHOD_NOT_ALLOWED, "only GET is supported");
        response
            .headers_mut()
            .insert(hyper::header::ALLOW, HeaderValue::from_static("GET"));
        return Some((route, response.map(Body::Left)));
    }
    let last_event_id = req
        .headers()
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse().ok());
    Some((
        route,
        feed::respond(app, of, last_event_id).map(Body::Right),
    ))
}

/// Whether a path needs a token when tokens are configured: all but the probes (CONTRACT section 6).
fn needs_token(path: &str) -> bool {
    !matches!(path, routes::HEALTHZ | routes::READYZ)
}

/// The 401 answer. A browser asking for the map page gets the page itself with the 401: it holds
/// no data, and it asks for the token and sends it with every request it makes.
fn unauthorized(req: &Request<Incoming>) -> (&'static str, Response<Full<Bytes>>) {
    let wants_html = req
        .headers()
        .get(hyper::header::ACCEPT)
        .and_then(|a| a.to_str().ok())
        .is_some_and(|a| a.contains("text/html"));
    let (route, mut response) = if req.uri().path() == routes::INDEX && wants_html {
        let page = respond(
            StatusCode::UNAUTHORIZED,
            "text/html; charset=utf-8",
            INDEX_PAGE.clone(),
        );
        (routes::INDEX, page)
    } else {
        let message = match req.headers().get(AUTHORIZATION) {
            None => "a bearer token is required (Authorization: Bearer TOKEN)",
            Some(_) => "the bearer token is not valid",
        };
        (
            routes::UNAUTHORIZED,
            error(StatusCode::UNAUTHORIZED, message),
        )
    };
    response.headers_mut().insert(
        WWW_AUTHENTICATE,
        HeaderValue::from_static("Bearer realm=\"dongflow\""),
    );
    (route, response)
}

/// A response with a body and content type.
fn respond(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

fn json(status: StatusCode, value: &impl Serialize) -> Response<Full<Bytes>> {
    match serde_json::to_vec(value) {
        Ok(body) => respond(status, JSON, body),
        Err(e) => cannot_encode(&e),
    }
}

/// The 500 answer for an answer that cannot be encoded.
fn cannot_encode(e: &serde_json::Error) -> Response<Full<Bytes>> {
    error(
        StatusCode::INTERNAL_SERVER_ERROR,
        &format!("cannot encode answer: {e}"),
    )
}

fn error(status: StatusCode, message: &str) -> Response<Full<Bytes>> {
    let body = serde_json::json!({ "error": message }).to_string();
    respond(status, JSON, body)
}

fn query_error(e: QueryError) -> Response<Full<Bytes>> {
    error(StatusCode::SERVICE_UNAVAILABLE, &e.to_string())
}

/// The routes, as labels for metrics.
mod routes {
    pub const DISTRICTS: &str = "/v1/districts";
    pub const DISTRICT: &str = "/v1/districts/{code}";
    pub const DISTRICT_RIDERS: &str = "/v1/districts/{code}/riders";
    pub const RIDER: &str = "/v1/riders/{rider_id}";
    pub const DISTRICT_CHANGES: &str = "/v1/districts/changes";
    pub const RIDER_CHANGES: &str = "/v1/riders/{rider_id}/changes";
    pub const GEOJSON: &str = "/v1/districts.geojson";
    pub const METRICS: &str = "/metrics";
    pub const HEALTHZ: &str = "/healthz";
    pub const READYZ: &str = "/readyz";
    pub const OPENAPI: &str = "/openapi.json";
    pub const INDEX: &str = "/";
    pub const OTHER: &str = "other";
    /// Requests refused for want of a valid token, whatever their route.
    pub const UNAUTHORIZED: &str = "unauthorized";
}

/// Decodes one path segment; `None` when it is not valid percent-encoded UTF-8.
fn segment(raw: &str) -> Option<String> {
    percent_decode_str(raw)
        .decode_utf8()
        .ok()
        .map(|s| s.into_owned())
}

async fn route(app: &Arc<App>, req: &Request<Incoming>) -> (&'static str, Response<Full<Bytes>>) {
    let path = req.uri().path();
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let route = match parts.as_slice() {
        ["v1", "districts"] => routes::DISTRICTS,
        ["v1", "districts.geojson"] => routes::GEOJSON,
        ["v1", "districts", _] => routes::DISTRICT,
        ["v1", "districts", _, "riders"] => routes::DISTRICT_RIDERS,
        ["v1", "riders", _] => routes::RIDER,
        ["metrics"] => routes::METRICS,
        ["healthz"] => routes::HEALTHZ,
        ["readyz"] => routes::READYZ,
        ["openapi.json"] => routes::OPENAPI,
        [""] => routes::INDEX,
        _ => {
            return (
                routes::OTHER,
                error(StatusCode::NOT_FOUND, &format!("no route {}", short(path))),
            )
        }
    };
    if req.method() != Method::GET && req.method() != Method::HEAD {
        // RFC 9110 section 15.5.6: a 405 says which methods the route takes.
        let mut response = error(StatusCode::METHOD_NOT_ALLOWED, "only GET is supported");
        response
            .headers_mut()
            .insert(hyper::header::ALLOW, HeaderValue::from_static("GET, HEAD"));
        return (route, response);
    }
    let response = match route {
        routes::DISTRICTS => districts(app).await,
        routes::DISTRICT | routes::DISTRICT_RIDERS => match segment(parts[2]) {
            None => error(StatusCode::BAD_REQUEST, "district code is not valid UTF-8"),
            Some(code) if route == routes::DISTRICT => district(app, &code).await,
            Some(code) => district_riders(app, &code).await,
        },
        routes::RIDER => match segment(parts[2]) {
            None => error(StatusCode::BAD_REQUEST, "rider id is not valid UTF-8"),
            Some(id) if id.is_empty() => error(StatusCode::BAD_REQUEST, "empty rider id"),
            Some(id) => rider(app, &id).await,
        },
        routes::GEOJSON => respond(
            StatusCode::OK,
            "application/geo+json; charset=utf-8",
            app.geojson.clone(),
        ),
        routes::METRICS => {
            let app = app.clone();
            match tokio::task::spawn_blocking(move || metrics::text(&app)).await {
                Ok(Ok(text)) => respond(StatusCode::OK, metrics::CONTENT_TYPE, text),
                Ok(Err(e)) => error(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    &format!("cannot encode metrics: {e}"),
                ),
                Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
            }
        }
        routes::HEALTHZ => json(StatusCode::OK, &serde_json::json!({"status": "ok"})),
        routes::READYZ => readyz(app),
        routes::OPENAPI => respond(StatusCode::OK, JSON, OPENAPI),
        _ => respond(
            StatusCode::OK,
            "text/html; charset=utf-8",
            INDEX_PAGE.clone(),
        ),
    };
    (route, response)
}

/// At most 100 characters of a path, for error messages.
fn short(path: &str) -> String {
    path.chars().take(100).collect()
}

/// Answers a query from the live view once it is ready, else from the stale view: a read of one
/// version of in-memory maps, done right here on the connection's task. Never `stale: false`
/// before ready (CONTRACT section 7): a live state still catching up is not shown as if it were
/// current; without a stale answer the answer is 503.
async fn ask(app: &Arc<App>, query: Query) -> Result<Answer, QueryError> {
    if live_ready(app) {
        if let Some(stale) = &app.stale {
            stale.release();
        }
        return app.engine.query(&query);
    }
    app.stale
        .as_ref()
        .and_then(|s| s.answer(&query))
        .ok_or(QueryError::CatchingUp)
}

/// The 404 answer for a district code the map does not have.
fn unknown_district(code: &str) -> Response<Full<Bytes>> {
    error(
        StatusCode::NOT_FOUND,
        &format!("unknown district code {}", short(code)),
    )
}

/// Asks `query` and renders its answer with `render`, or answers the error.
async fn answered(
    app: &Arc<App>,
    query: Query,
    render: impl FnOnce(Answer) -> Option<Response<Full<Bytes>>>,
) -> Response<Full<Bytes>> {
    match ask(app, query).await {
        Ok(answer) => render(answer)
            .unwrap_or_else(|| error(StatusCode::INTERNAL_SERVER_ERROR, "unexpected answer")),
        Err(e) => query_error(e),
    }
}

/// Whether the live state has caught up with the inputs it found at start (as `/readyz` says).
fn live_ready(app: &App) -> bool {
    app.engine.ready()
}

async fn districts(app: &Arc<App>) -> Response<Full<Bytes>> {
    answered(app, Query::Districts, |a| match a.body {
        AnswerBody::Districts(counts) => Some(districts_body(app, a.as_of, a.stale, &counts)),
        _ => None,
    })
    .await
}

/// The all-districts answer of one version of the view, rendered once per version.
fn districts_body(
    app: &App,
    as_of: Time,
    stale: bool,
    counts: &[(DistrictId, DistrictCounts)],
) -> Response<Full<Bytes>> {
    let cached = app
        .districts_body
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .as_ref()
        .filter(|(t, s, _)| (*t, *s) == (as_of, stale))
        .map(|(_, _, body)| body.clone());
    if let Some(body) = cached {
        return respond(StatusCode::OK, JSON, body);
    }
    match serde_json::to_vec(&DistrictsView::new(&app.index, as_of, stale, counts)) {
        Ok(body) => {
            let body = Bytes::from(body);
            *app.districts_body.lock().unwrap_or_else(|e| e.into_inner()) =
                Some((as_of, stale, body.clone()));
            respond(StatusCode::OK, JSON, body)
        }
        Err(e) => cannot_encode(&e),
    }
}

async fn district(app: &Arc<App>, code: &str) -> Response<Full<Bytes>> {
    let Some(id) = app.index.id_of(code) else {
        return unknown_district(code);
    };
    answered(app, Query::District(id), |a| match a.body {
        AnswerBody::District(counts) => {
            let value = DistrictView::new(&app.index, id, &counts);
            Some(json(
                StatusCode::OK,
                &Stamped {
                    value,
                    as_of: a.as_of,
                    stale: a.stale,
                },
            ))
        }
        _ => None,
    })
    .await
}

async fn district_riders(app: &Arc<App>, code: &str) -> Response<Full<Bytes>> {
    let Some(id) = app.index.id_of(code) else {
        return unknown_district(code);
    };
    answered(app, Query::RidersOf(id), |a| match a.body {
        AnswerBody::Riders(riders) => {
            let riders = riders
                .iter()
                .map(|(id, s)| RiderView::new(&app.index, id, s))
                .collect();
            Some(json(
                StatusCode::OK,
                &RidersView {
                    as_of: a.as_of,
                    stale: a.stale,
                    riders,
                },
            ))
        }
        _ => None,
    })
    .await
}

async fn rider(app: &Arc<App>, id: &str) -> Response<Full<Bytes>> {
    answered(app, Query::Rider(id.into()), |a| match a.body {
        AnswerBody::Rider(Some(snapshot)) => {
            let value = RiderView::new(&app.index, id, &snapshot);
            Some(json(
                StatusCode::OK,
                &Stamped {
                    value,
                    as_of: a.as_of,
                    stale: a.stale,
                },
            ))
        }
        AnswerBody::Rider(None) => Some(unknown_rider(id, a.stale)),
        _ => None,
    })
    .await
}

/// The 404 answer for a rider the view does not hold. From a stale view it says `stale: true`: the
/// rider may be on shift in input the live state has not caught up with (CONTRACT section 7).
fn unknown_rider(id: &str, stale: bool) -> Response<Full<Bytes>> {
    let message = format!("unknown rider {}", short(id));
    if stale {
        json(
            StatusCode::NOT_FOUND,
            &serde_json::json!({ "error": message, "stale": true }),
        )
    } else {
        error(StatusCode::NOT_FOUND, &message)
    }
}

/// Ready once the live state exists and has taken in what its sources had when they started.
fn readyz(app: &Arc<App>) -> Response<Full<Bytes>> {
    let as_of = app.engine.as_of();
    if ready(app) {
        json(
            StatusCode::OK,
            &serde_json::json!({"status": "ready", "as_of": as_of}),
        )
    } else {
        json(
            StatusCode::SERVICE_UNAVAILABLE,
            &serde_json::json!({"error": "live state is not ready", "as_of": as_of}),
        )
    }
}

/// What `/readyz` says: the live state is ready, the changelog producer has not failed for good
/// (it writes nothing more while the process exits), and no cluster peer is lost.
fn ready(app: &App) -> bool {
    let producing = app.kafka.as_ref().is_none_or(|k| k.fatal_error().is_none());
    let whole = crate::failstop::failure().is_none();
    producing && whole && app.engine.ready()
}

/// An HTTP server running on its own tokio runtime.
pub struct HttpServer {
    addr: std::net::SocketAddr,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl std::fmt::Debug for HttpServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpServer")
            .field("addr", &self.addr)
            .finish()
    }
}

impl HttpServer {
    /// Binds `addr` (port 0 picks a free port) and serves `app` on `threads` runtime threads.
    pub fn start(addr: &str, app: Arc<App>, threads: usize) -> std::io::Result<Self> {
        let listener = std::net::TcpListener::bind(addr)?;
        Self::start_on(listener, app, threads, HttpSecurity::default())
    }

    /// Serves `app` on a bound `listener` on `threads` runtime threads, with `security`. With
    /// tokens, SIGHUP re-reads the token file.
    pub fn start_on(
        listener: std::net::TcpListener,
        app: Arc<App>,
        threads: usize,
        security: HttpSecurity,
    ) -> std::io::Result<Self> {
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads.max(1))
            .thread_name("dongflow-http")
            .enable_all()
            .build()?;
        let feeds = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("dongflow-feeds")
            // Pushing changes is background work beside a point query, as the workers are.
            .on_thread_start(crate::priority::yield_to_queries)
            .enable_all()
            .build()?;
        let _ = app.feed_runtime.set(feeds.handle().clone());
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        if let Some(tokens) = &security.tokens {
            // Registered here, before the server answers, so that a SIGHUP from then on re-reads
            // the tokens instead of ending the process (SIGHUP's default).
            let hangups = {
                let _runtime = runtime.enter();
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?
            };
            runtime.spawn(reload_on_hangup(tokens.clone(), hangups));
        }
        let thread = std::thread::Builder::new()
            .name("dongflow-http-main".into())
            .spawn(move || {
                runtime.block_on(async move {
                    match TcpListener::from_std(listener) {
                        Ok(listener) => {
                            serve(listener, app, security, async move {
                                let _ = rx.await;
                            })
                            .await
                        }
                        Err(e) => tracing::error!("cannot serve HTTP: {e}"),
                    }
                });
                // Requests still running get a moment to finish; feeds end with their clients.
                runtime.shutdown_timeout(Duration::from_secs(2));
                feeds.shutdown_timeout(Duration::from_millis(100));
            })?;
        Ok(Self {
            addr,
            shutdown: Some(tx),
            thread: Some(thread),
        })
    }

    /// The address served.
    pub fn addr(&self) -> std::net::SocketAddr {
        self.addr
    }

    /// Stops accepting, lets running requests finish, and waits.
    pub fn stop(mut self) {
        self.shutdown_now();
    }

    fn shutdown_now(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Re-reads the token file at every SIGHUP; a file that cannot be used keeps the tokens it had.
async fn reload_on_hangup(tokens: Arc<Tokens>, mut hangups: tokio::signal::unix::Signal) {
    while hangups.recv().await.is_some() {
        match tokens.reload() {
            Ok(n) => tracing::info!(
                "SIGHUP: {n} token(s) accepted from {}",
                tokens.path().display()
            ),
            Err(e) => tracing::error!("SIGHUP: {e}; the tokens accepted so far stay"),
        }
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        self.shutdown_now();
    }
}

#[cfg(test)]
mod tests {
    use super::INDEX_PAGE;

    #[test]
    fn the_page_carries_its_script_inline() {
        let page = std::str::from_utf8(&INDEX_PAGE).expect("utf-8");
        assert!(
            !page.contains("/*MAP_JS*/"),
            "the placeholder was not replaced"
        );
        assert!(page.contains("function projection(bbox, width)"));
        assert!(
            !page.contains("src=\"http"),
            "the page must not load anything from outside"
        );
    }
}
