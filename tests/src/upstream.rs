//! An in-process upstream app for precise streaming edge cases.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Path, Query, Request, State};
use axum::http::{header, HeaderMap, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post};
use axum::Router;
use bytes::Bytes;
use futures_util::StreamExt as _;
use http_body::{Frame, SizeHint};
use sha2::{Digest as _, Sha256};
use tokio::sync::watch;

use crate::pattern::{PatternReader, CHUNK_SIZE};
use crate::Netns;

/// Where to run an [`Upstream`].
#[derive(Clone, Debug)]
pub struct UpstreamOptions {
    /// Address to bind, port 0; default 127.0.0.1.
    pub bind_ip: IpAddr,
    /// Network namespace the listening socket lives in (the server still runs in this process);
    /// default the test's own.
    pub netns: Option<String>,
}

impl Default for UpstreamOptions {
    fn default() -> Self {
        UpstreamOptions {
            bind_ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
            netns: None,
        }
    }
}

/// One request the upstream received (recorded before it is handled).
#[derive(Clone, Debug)]
pub struct RecordedRequest {
    pub method: Method,
    /// Path without the query, e.g. `/bytes/1024`.
    pub path: String,
    /// Raw query string, without `?`.
    pub query: Option<String>,
    pub headers: HeaderMap,
    pub received_at: Instant,
}

/// An HTTP/1.1 server on a port-0 socket with these routes:
///
/// | route | answer |
/// | --- | --- |
/// | `GET /bytes/{n}?seed=S` | `pattern_bytes(n, S)` ([`pattern`](crate::pattern)) in 64 KiB chunks, with `Content-Length: n` |
/// | `GET /stream/{n}?seed=S` | the same bytes, chunked (no `Content-Length`) |
/// | `POST /sha256` | reads the body as a stream; `{"sha256": hex, "len": n, "chunked": bool, "content_length": n\|null}` |
/// | `GET /slow-chunks?count=N&interval_ms=M` | N chunks `chunk {i}\n`, the first at once, then one every M ms (defaults 5, 100) |
/// | `GET /hang` | headers, then a 1-byte chunk every 100 ms forever; records start and cancellation |
/// | `ANY /status/{code}` | that status with a one-line body |
///
/// `seed` defaults to 0. Every request is counted per path and recorded with its headers.
/// The server task is aborted when the `Upstream` is dropped.
#[derive(Debug)]
pub struct Upstream {
    /// Bound address.
    pub addr: SocketAddr,
    /// Base URL without a trailing slash, e.g. `http://127.0.0.1:40126`.
    pub url: String,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

#[derive(Debug)]
struct Shared {
    inner: Mutex<Inner>,
    /// Bumped after every change of `inner`, to wake waiters.
    changed: watch::Sender<u64>,
}

#[derive(Debug, Default)]
struct Inner {
    counts: HashMap<String, u64>,
    requests: Vec<RecordedRequest>,
    hang_started: Vec<Instant>,
    hang_cancelled: Vec<Instant>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave `Inner` inconsistent (plain pushes).
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn update(&self, f: impl FnOnce(&mut Inner)) {
        f(&mut self.lock());
        self.changed.send_modify(|n| *n += 1);
    }
}

impl Upstream {
    /// Starts the upstream on 127.0.0.1, port 0.
    ///
    /// # Errors
    ///
    /// When binding fails.
    pub async fn start() -> anyhow::Result<Upstream> {
        Upstream::start_with(UpstreamOptions::default()).await
    }

    /// Starts the upstream with its socket bound per `options`.
    ///
    /// # Errors
    ///
    /// When binding (or entering the namespace) fails.
    pub async fn start_with(options: UpstreamOptions) -> anyhow::Result<Upstream> {
        let listener = Netns::bind_in(
            options.netns.as_deref(),
            SocketAddr::new(options.bind_ip, 0),
        )
        .await?;
        let listener = tokio::net::TcpListener::from_std(listener)?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            inner: Mutex::new(Inner::default()),
            changed: watch::channel(0).0,
        });
        let app = router(shared.clone());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(Upstream {
            addr,
            url: format!("http://{addr}"),
            shared,
            task,
        })
    }

    /// `{url}{path}`, `path` starting with `/`.
    pub fn url_for(&self, path: &str) -> String {
        format!("{}{path}", self.url)
    }

    /// How many requests arrived for exactly `path` (without query), e.g. `/hang`.
    pub fn requests(&self, path: &str) -> u64 {
        self.shared.lock().counts.get(path).copied().unwrap_or(0)
    }

    /// How many requests arrived in all.
    pub fn total_requests(&self) -> u64 {
        self.shared.lock().requests.len() as u64
    }

    /// Every request received so far, oldest first.
    pub fn recorded(&self) -> Vec<RecordedRequest> {
        self.shared.lock().requests.clone()
    }

    /// The most recent request for `path`.
    pub fn last_request(&self, path: &str) -> Option<RecordedRequest> {
        self.shared
            .lock()
            .requests
            .iter()
            .rev()
            .find(|r| r.path == path)
            .cloned()
    }

    /// When each `/hang` response started streaming.
    pub fn hang_started(&self) -> Vec<Instant> {
        self.shared.lock().hang_started.clone()
    }

    /// When each `/hang` response body was dropped, i.e. its request was cancelled (the client
    /// or the proxy in front went away).
    pub fn hang_cancelled(&self) -> Vec<Instant> {
        self.shared.lock().hang_cancelled.clone()
    }

    /// Waits until at least `n` requests for `path` arrived; false on timeout.
    pub async fn wait_requests(&self, path: &str, n: u64, timeout: Duration) -> bool {
        self.wait(timeout, |inner| {
            (inner.counts.get(path).copied().unwrap_or(0) >= n).then_some(())
        })
        .await
        .is_some()
    }

    /// Waits for the first `/hang` cancellation and returns when it happened; `None` on timeout.
    ///
    /// Assert "the upstream saw its request cancelled within 1 s" as
    /// `upstream.wait_hang_cancelled(t).await.unwrap() - client_gone_at < Duration::from_secs(1)`.
    pub async fn wait_hang_cancelled(&self, timeout: Duration) -> Option<Instant> {
        self.wait(timeout, |inner| inner.hang_cancelled.first().copied())
            .await
    }

    async fn wait<T>(
        &self,
        timeout: Duration,
        mut check: impl FnMut(&Inner) -> Option<T>,
    ) -> Option<T> {
        let mut changed = self.shared.changed.subscribe();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(value) = check(&self.shared.lock()) {
                return Some(value);
            }
            match tokio::time::timeout_at(deadline, changed.changed()).await {
                Ok(Ok(())) => {}
                // The sender lives in `self`, so it cannot be gone; treat it as a timeout.
                Ok(Err(_)) | Err(_) => return check(&self.shared.lock()),
            }
        }
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/bytes/{n}", get(bytes_sized))
        .route("/stream/{n}", get(bytes_chunked))
        .route("/sha256", post(sha256))
        .route("/slow-chunks", get(slow_chunks))
        .route("/hang", get(hang))
        .route("/status/{code}", any(status))
        .layer(axum::middleware::from_fn_with_state(shared.clone(), record))
        .with_state(shared)
}

async fn record(State(shared): State<Arc<Shared>>, request: Request, next: Next) -> Response {
    let recorded = RecordedRequest {
        method: request.method().clone(),
        path: request.uri().path().to_owned(),
        query: request.uri().query().map(str::to_owned),
        headers: request.headers().clone(),
        received_at: Instant::now(),
    };
    shared.update(|inner| {
        *inner.counts.entry(recorded.path.clone()).or_default() += 1;
        inner.requests.push(recorded);
    });
    next.run(request).await
}

/// The `seed` query parameter: 0 when absent, `None` when not a u64.
fn seed(query: &HashMap<String, String>) -> Option<u64> {
    query.get("seed").map_or(Some(0), |s| s.parse().ok())
}

async fn bytes_sized(Path(n): Path<u64>, Query(query): Query<HashMap<String, String>>) -> Response {
    pattern_response(n, query, true)
}

async fn bytes_chunked(
    Path(n): Path<u64>,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    pattern_response(n, query, false)
}

fn pattern_response(n: u64, query: HashMap<String, String>, sized: bool) -> Response {
    let Some(seed) = seed(&query) else {
        return (StatusCode::BAD_REQUEST, "seed must be a u64\n").into_response();
    };
    let body = PatternBody {
        reader: PatternReader::new(seed),
        remaining: n,
        sized,
    };
    (
        [(header::CONTENT_TYPE, "application/octet-stream")],
        Body::new(body),
    )
        .into_response()
}

/// `n` pattern bytes; with `sized` the exact size hint makes hyper send `Content-Length`,
/// without it hyper uses chunked transfer coding.
struct PatternBody {
    reader: PatternReader,
    remaining: u64,
    sized: bool,
}

impl http_body::Body for PatternBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.remaining == 0 {
            return Poll::Ready(None);
        }
        let n = usize::try_from(self.remaining).map_or(CHUNK_SIZE, |r| r.min(CHUNK_SIZE));
        let chunk = self.reader.take(n);
        self.remaining -= n as u64;
        Poll::Ready(Some(Ok(Frame::data(chunk))))
    }

    fn is_end_stream(&self) -> bool {
        self.sized && self.remaining == 0
    }

    fn size_hint(&self) -> SizeHint {
        if self.sized {
            SizeHint::with_exact(self.remaining)
        } else {
            SizeHint::default()
        }
    }
}

async fn sha256(headers: HeaderMap, body: Body) -> Response {
    let chunked = headers.get_all(header::TRANSFER_ENCODING).iter().any(|v| {
        v.to_str()
            .is_ok_and(|v| v.to_ascii_lowercase().contains("chunked"))
    });
    let content_length = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let mut hasher = Sha256::new();
    let mut len: u64 = 0;
    let mut stream = body.into_data_stream();
    while let Some(chunk) = stream.next().await {
        match chunk {
            Ok(chunk) => {
                hasher.update(&chunk);
                len += chunk.len() as u64;
            }
            Err(error) => {
                return (
                    StatusCode::BAD_REQUEST,
                    format!("reading the body failed: {error}\n"),
                )
                    .into_response()
            }
        }
    }
    axum::Json(serde_json::json!({
        "sha256": hex::encode(hasher.finalize()),
        "len": len,
        "chunked": chunked,
        "content_length": content_length,
    }))
    .into_response()
}

async fn slow_chunks(Query(query): Query<HashMap<String, String>>) -> Response {
    let count: u64 = query.get("count").and_then(|v| v.parse().ok()).unwrap_or(5);
    let interval = Duration::from_millis(
        query
            .get("interval_ms")
            .and_then(|v| v.parse().ok())
            .unwrap_or(100),
    );
    let chunks = futures_util::stream::unfold(0u64, move |i| async move {
        if i >= count {
            return None;
        }
        if i > 0 {
            tokio::time::sleep(interval).await;
        }
        Some((
            Ok::<_, Infallible>(Bytes::from(format!("chunk {i}\n"))),
            i + 1,
        ))
    });
    (
        [(header::CONTENT_TYPE, "text/plain")],
        Body::from_stream(chunks),
    )
        .into_response()
}

async fn hang(State(shared): State<Arc<Shared>>) -> Response {
    shared.update(|inner| inner.hang_started.push(Instant::now()));
    let body = HangBody {
        interval: tokio::time::interval(Duration::from_millis(100)),
        _guard: CancelGuard(shared),
    };
    ([(header::CONTENT_TYPE, "text/plain")], Body::new(body)).into_response()
}

/// One `.` every 100 ms, forever; dropping it records a cancellation.
struct HangBody {
    interval: tokio::time::Interval,
    _guard: CancelGuard,
}

struct CancelGuard(Arc<Shared>);

impl Drop for CancelGuard {
    fn drop(&mut self) {
        self.0
            .update(|inner| inner.hang_cancelled.push(Instant::now()));
    }
}

impl http_body::Body for HangBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        ready!(self.interval.poll_tick(cx));
        Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(b".")))))
    }
}

async fn status(Path(code): Path<u16>) -> Response {
    match StatusCode::from_u16(code) {
        Ok(status) => (status, format!("status {code}\n")).into_response(),
        Err(_) => (StatusCode::BAD_REQUEST, "not a status code\n").into_response(),
    }
}
