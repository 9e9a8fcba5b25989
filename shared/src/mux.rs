//! The stream multiplexer: many concurrent HTTP exchanges over one WebSocket.
//!
//! One [`Mux`] per tunnel connection. Its [`Driver`] owns the WebSocket and runs until the
//! connection ends; everything else talks to [`SendStream`] / [`RecvStream`] handles, so business
//! logic never touches the socket and tests can drive it over an in-memory duplex.
//!
//! ## Flow control
//! Credit-based, per stream and per connection, as HTTP/2 (RFC 9113 §5.2, §6.9): a sender may
//! have at most `initial_window` unacknowledged body bytes in flight on one stream and at most
//! `connection_window` on the whole connection. The receiver returns [`Frame::Credit`] as its
//! consumer *takes* body chunks, so a slow client slows the upstream read instead of filling
//! memory: buffered bytes per connection never exceed `connection_window`. A peer that sends more
//! than its credit is a protocol error (close 1002).
//!
//! ## Stream lifecycle
//! A stream is open until both halves ended (`End` sent and `End` received) or until either side
//! resets it. Dropping a [`SendStream`] before [`SendStream::finish`] resets the stream (a body cut
//! short must never look complete). Dropping a [`RecvStream`] before its `End`: when the local half
//! already ended, the stream is reset (`Cancel`: the peer stops its work); otherwise incoming data
//! is discarded with its credit returned at once, so the peer never stalls.
//!
//! ## Liveness and shutdown
//! Each side pings every heartbeat interval; a peer silent for three intervals is gone. On any
//! end of the connection every open stream fails with [`ResetCode::ConnectionLost`].
//! [`Mux::go_away`] drains: the peer may open no new streams, streams in flight finish.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;
use tokio::time::Instant;

use bytes::Bytes;
use futures_util::{Sink, SinkExt, Stream, StreamExt};
use tokio::sync::{mpsc, watch, Notify, Semaphore};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tracing::{debug, trace, warn};

use crate::proto::{
    self, DecodeError, Frame, Open, RequestHead, Reset, ResetCode, Response, StreamId, Welcome,
    MAX_DATA_CHUNK,
};

/// Which end of the tunnel this multiplexer is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The relay: opens streams with odd ids, refuses streams the agent opens.
    Relay,
    /// The agent: accepts the relay's streams.
    Agent,
}

/// Multiplexer parameters, normally those of the [`Welcome`] frame.
#[derive(Debug, Clone)]
pub struct MuxConfig {
    /// This side's role.
    pub role: Role,
    /// Per-stream flow-control window, bytes. At least [`MAX_DATA_CHUNK`].
    pub initial_window: u32,
    /// Connection flow-control window, bytes. At least [`MAX_DATA_CHUNK`].
    pub connection_window: u32,
    /// Largest encoded frame either side may send, bytes.
    pub max_frame_size: u32,
    /// Most streams open at once.
    pub max_concurrent_streams: u32,
    /// Ping interval; silence for three intervals ends the connection.
    pub heartbeat: Duration,
}

impl MuxConfig {
    /// Defaults the relay offers: 1 MiB stream window, 16 MiB connection window, 1 MiB frames,
    /// 1024 streams, 15 s heartbeat.
    pub fn relay_default() -> Self {
        MuxConfig {
            role: Role::Relay,
            initial_window: 1024 * 1024,
            connection_window: 16 * 1024 * 1024,
            max_frame_size: proto::DEFAULT_MAX_FRAME_SIZE,
            max_concurrent_streams: 1024,
            heartbeat: Duration::from_secs(15),
        }
    }

    /// The configuration a [`Welcome`] announces, for `role`.
    ///
    /// # Errors
    /// [`MuxError::Protocol`] when the values are unusable (window below one chunk, frame size
    /// below one chunk or above [`proto::MAX_FRAME_SIZE_LIMIT`], heartbeat of 0 ms).
    pub fn from_welcome(role: Role, w: &Welcome) -> Result<Self, MuxError> {
        let chunk = MAX_DATA_CHUNK as u32;
        if w.initial_window < chunk
            || w.connection_window < chunk
            || w.max_frame_size < chunk + 64
            || w.max_frame_size as usize > proto::MAX_FRAME_SIZE_LIMIT
            || w.heartbeat_ms == 0
            || w.max_concurrent_streams == 0
        {
            return Err(MuxError::Protocol(format!(
                "unusable Welcome parameters: window {}, connection window {}, frame size {}, heartbeat {} ms, streams {}",
                w.initial_window, w.connection_window, w.max_frame_size, w.heartbeat_ms, w.max_concurrent_streams
            )));
        }
        Ok(MuxConfig {
            role,
            initial_window: w.initial_window,
            connection_window: w.connection_window,
            max_frame_size: w.max_frame_size,
            max_concurrent_streams: w.max_concurrent_streams,
            heartbeat: Duration::from_millis(u64::from(w.heartbeat_ms)),
        })
    }
}

/// Errors of multiplexer operations.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum MuxError {
    /// The connection is closed or closing; nothing more can be sent.
    #[error("tunnel connection closed")]
    Closed,
    /// The peer is draining (sent `GoAway`) or this side is: no new streams.
    #[error("tunnel connection is draining")]
    GoingAway,
    /// As many streams are open as the connection allows.
    #[error("too many concurrent streams ({0})")]
    TooManyStreams(u32),
    /// Every stream id of this connection has been used; open a new connection.
    #[error("stream ids exhausted")]
    StreamIdsExhausted,
    /// The stream was reset, by the peer or locally.
    #[error("stream reset: {code:?}: {message}")]
    Reset {
        /// Why.
        code: ResetCode,
        /// Detail.
        message: String,
    },
    /// A frame could not be encoded or the peer broke the protocol.
    #[error("protocol error: {0}")]
    Protocol(String),
}

/// How a tunnel connection ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CloseReason {
    /// The peer sent a WebSocket close frame (RFC 6455 §5.5.1).
    PeerClosed {
        /// Close code received (1000 normal, 1001 going away, …).
        code: u16,
        /// Close reason received.
        reason: String,
    },
    /// This side closed with this code and reason.
    LocalClose {
        /// Close code sent.
        code: u16,
        /// Close reason sent.
        reason: String,
    },
    /// The peer broke the protocol; closed with 1002 (or 1009 for a too-large frame).
    ProtocolViolation {
        /// Close code sent.
        code: u16,
        /// What the peer did.
        reason: String,
    },
    /// No message from the peer for three heartbeat intervals.
    HeartbeatTimeout,
    /// The transport failed (TCP reset, TLS error, EOF without close frame).
    Transport(String),
}

impl std::fmt::Display for CloseReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CloseReason::PeerClosed { code, reason } => write!(f, "peer closed ({code}: {reason})"),
            CloseReason::LocalClose { code, reason } => write!(f, "closed ({code}: {reason})"),
            CloseReason::ProtocolViolation { code, reason } => {
                write!(f, "protocol violation, closed with {code}: {reason}")
            }
            CloseReason::HeartbeatTimeout => f.write_str("peer missed its heartbeats"),
            CloseReason::Transport(e) => write!(f, "transport failed: {e}"),
        }
    }
}

/// What a [`RecvStream`] yields, in order: for the relay a `Response` first, then `Data`* and
/// `End`; for the agent `Data`* and `End` (the request head came in [`IncomingStream`]). `Reset`
/// may come at any point and is always last.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Inbound {
    /// Response head.
    Response(Response),
    /// A body chunk.
    Data(Bytes),
    /// The body is complete.
    End,
    /// The stream was aborted.
    Reset {
        /// Why.
        code: ResetCode,
        /// Detail.
        message: String,
    },
}

enum Out {
    Frame(Frame),
    Ping,
    Close(u16, String),
}

struct Entry {
    /// Delivers to the stream's [`RecvStream`]; `None` once the receiver is gone. Dropping it
    /// tells the receiver that nothing more comes.
    inbound: Option<InboxSender>,
    /// Send credit, the cancellation signal and the inbound queue, shared with the stream's
    /// [`SendStream`] and [`RecvStream`].
    signal: Arc<StreamSignal>,
    /// Bytes the peer may still send on this stream before we return credit.
    recv_remaining: i64,
    local_done: bool,
    remote_done: bool,
}

/// Per-stream state shared by the driver, the [`SendStream`] and the [`RecvStream`]: the send
/// credit, the end-of-stream signal and the inbound queue. One allocation per stream (a channel
/// per stream cost two more, one of them over 1 KiB, which pushed glibc's malloc into
/// consolidating its free lists on every request under load).
struct StreamSignal {
    /// Bytes this side may still send on the stream; closed when the stream ends.
    credit: Semaphore,
    /// Set once when the stream is removed; `notify` wakes every waiter.
    cancelled: AtomicBool,
    notify: Notify,
    /// What the peer sent on this stream, not yet taken by the [`RecvStream`].
    inbox: Mutex<Inbox>,
}

#[derive(Default)]
struct Inbox {
    items: VecDeque<Inbound>,
    /// The sending side is gone: after `items`, nothing more comes.
    closed: bool,
    /// The [`RecvStream`] is gone: deliveries are refused.
    receiver_gone: bool,
    waker: Option<Waker>,
}

impl StreamSignal {
    fn inbox(&self) -> std::sync::MutexGuard<'_, Inbox> {
        self.inbox.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The driver's end of a stream's inbox (what an unbounded channel's sender was).
struct InboxSender(Arc<StreamSignal>);

impl InboxSender {
    /// Queues `item` for the receiver and wakes it.
    ///
    /// # Errors
    /// The item back when the receiver is gone.
    fn send(&self, item: Inbound) -> Result<(), Inbound> {
        let mut inbox = self.0.inbox();
        if inbox.receiver_gone {
            return Err(item);
        }
        inbox.items.push_back(item);
        let waker = inbox.waker.take();
        drop(inbox);
        if let Some(w) = waker {
            w.wake();
        }
        Ok(())
    }
}

impl Drop for InboxSender {
    fn drop(&mut self) {
        let mut inbox = self.0.inbox();
        inbox.closed = true;
        let waker = inbox.waker.take();
        drop(inbox);
        if let Some(w) = waker {
            w.wake();
        }
    }
}

impl StreamSignal {
    fn cancel(&self) {
        self.credit.close();
        self.cancelled.store(true, Ordering::Release);
        self.notify.notify_waiters();
    }

    async fn cancelled(&self) {
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            // Registered before the check, so a cancel between the check and the await is seen.
            notified.as_mut().enable();
            if self.cancelled.load(Ordering::Acquire) {
                return;
            }
            notified.await;
        }
    }
}

#[derive(Default)]
struct State {
    streams: HashMap<u32, Entry>,
    next_local_id: u32,
    last_peer_id: u32,
    local_going_away: bool,
    peer_going_away: bool,
    closed: bool,
}

struct Shared {
    config: MuxConfig,
    state: Mutex<State>,
    /// Ordered frames: Open, Response, Data, End, Reset.
    out: mpsc::UnboundedSender<Out>,
    /// Priority frames that may overtake data: Credit, GoAway, refusals of the peer's streams,
    /// pings, close.
    ctrl: mpsc::UnboundedSender<Out>,
    conn_credit: Semaphore,
    /// Bytes the peer may still send on the connection before we return credit.
    conn_recv_remaining: AtomicI64,
    /// Consumed bytes not yet returned with a connection-level Credit.
    conn_unreturned: AtomicU64,
    active: AtomicUsize,
    /// Notified when the number of open streams drops to zero.
    idle: Notify,
    closed_tx: watch::Sender<bool>,
    last_seen_ms: AtomicU64,
    started: Instant,
    peer_away: AtomicBool,
}

/// Registers stream `id` and returns its two halves. Called under the state lock.
trait InsertStream {
    fn insert_stream(&self, st: &mut State, id: StreamId) -> (SendStream, RecvStream);
}

/// Streams opened or accepted by every multiplexer in this process since it started.
static STREAMS_STARTED: AtomicU64 = AtomicU64::new(0);

/// How many streams every [`Mux`] in this process has opened or accepted since it started: a
/// cheap activity signal (one relaxed atomic add per stream), read by
/// [`crate::runtime::spawn_idle_heap_trim`] to tell busy from idle.
pub fn streams_started() -> u64 {
    STREAMS_STARTED.load(Ordering::Relaxed)
}

impl InsertStream for Arc<Shared> {
    fn insert_stream(&self, st: &mut State, id: StreamId) -> (SendStream, RecvStream) {
        STREAMS_STARTED.fetch_add(1, Ordering::Relaxed);
        let signal = Arc::new(StreamSignal {
            credit: Semaphore::new(self.config.initial_window as usize),
            cancelled: AtomicBool::new(false),
            notify: Notify::new(),
            inbox: Mutex::new(Inbox::default()),
        });
        st.streams.insert(
            id.0,
            Entry {
                inbound: Some(InboxSender(signal.clone())),
                signal: signal.clone(),
                recv_remaining: i64::from(self.config.initial_window),
                local_done: false,
                remote_done: false,
            },
        );
        self.update_active(st);
        (
            SendStream {
                id,
                shared: self.clone(),
                signal: signal.clone(),
                done: false,
            },
            RecvStream {
                id,
                shared: self.clone(),
                signal,
                unreturned: 0,
                finished: false,
            },
        )
    }
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding the lock would be a bug in this module; the state stays
        // consistent enough to keep failing streams, so recover the guard.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn send_ctrl(&self, frame: Frame) {
        let _ = self.ctrl.send(Out::Frame(frame));
    }

    fn send_ordered(&self, frame: Frame) -> Result<(), MuxError> {
        self.out
            .send(Out::Frame(frame))
            .map_err(|_| MuxError::Closed)
    }

    fn update_active(&self, st: &State) {
        let n = st.streams.len();
        self.active.store(n, Ordering::Release);
        if n == 0 {
            self.idle.notify_waiters();
        }
    }

    /// Removes a stream, waking anything waiting on its credit or cancellation.
    fn remove(&self, st: &mut State, id: u32) -> Option<Entry> {
        let entry = st.streams.remove(&id)?;
        entry.signal.cancel();
        self.update_active(st);
        Some(entry)
    }

    /// Returns `n` consumed bytes of connection window to the peer, batched.
    fn release_connection(&self, n: usize) {
        if n == 0 {
            return;
        }
        let total = self.conn_unreturned.fetch_add(n as u64, Ordering::AcqRel) + n as u64;
        let threshold = u64::from(self.config.connection_window / 4);
        if total >= threshold {
            let amount = self.conn_unreturned.swap(0, Ordering::AcqRel);
            if amount > 0 {
                self.conn_recv_remaining
                    .fetch_add(amount as i64, Ordering::AcqRel);
                self.send_ctrl(Frame::Credit {
                    stream: StreamId::CONNECTION,
                    bytes: amount as u32,
                });
            }
        }
    }

    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }
}

/// Handle to one tunnel connection's multiplexer. Cheap to clone.
#[derive(Clone)]
pub struct Mux {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Mux {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mux")
            .field("role", &self.shared.config.role)
            .field("active_streams", &self.active_streams())
            .finish()
    }
}

/// Owns the WebSocket; run it with [`Driver::run`] until the connection ends.
pub struct Driver<S> {
    ws: S,
    shared: Arc<Shared>,
    out_rx: mpsc::UnboundedReceiver<Out>,
    ctrl_rx: mpsc::UnboundedReceiver<Out>,
    incoming_tx: Option<mpsc::UnboundedSender<IncomingStream>>,
}

/// Streams the peer opens (the agent's side). Ends when the connection ends.
pub struct Incoming {
    rx: mpsc::UnboundedReceiver<IncomingStream>,
}

impl Incoming {
    /// The next stream the peer opened, or `None` once the connection has ended.
    ///
    /// # Cancel safety
    /// Cancel safe: no stream is lost if the future is dropped.
    pub async fn accept(&mut self) -> Option<IncomingStream> {
        self.rx.recv().await
    }
}

/// A stream opened by the peer: its request head and connection definition, and the two halves.
pub struct IncomingStream {
    /// The stream's id.
    pub id: StreamId,
    /// The request head.
    pub head: RequestHead,
    /// The connection definition (JSON of [`crate::model::ConnectionSpec`]).
    pub spec: Bytes,
    /// Sends the response head and body.
    pub send: SendStream,
    /// Yields the request body.
    pub recv: RecvStream,
}

impl Mux {
    /// Creates a multiplexer over `ws`, whose handshake is already done.
    ///
    /// Returns the handle, the driver to run (spawn `driver.run()`), and, for [`Role::Agent`],
    /// the streams the relay opens.
    pub fn new<S>(ws: S, config: MuxConfig) -> (Mux, Driver<S>, Incoming)
    where
        S: Stream<Item = Result<Message, WsError>> + Sink<Message, Error = WsError> + Unpin,
    {
        let (out, out_rx) = mpsc::unbounded_channel();
        let (ctrl, ctrl_rx) = mpsc::unbounded_channel();
        let (incoming_tx, incoming_rx) = mpsc::unbounded_channel();
        let (closed_tx, _) = watch::channel(false);
        let first_id = match config.role {
            Role::Relay => 1,
            Role::Agent => 2,
        };
        let shared = Arc::new(Shared {
            conn_credit: Semaphore::new(config.connection_window as usize),
            conn_recv_remaining: AtomicI64::new(i64::from(config.connection_window)),
            conn_unreturned: AtomicU64::new(0),
            state: Mutex::new(State {
                next_local_id: first_id,
                ..State::default()
            }),
            config,
            out,
            ctrl,
            active: AtomicUsize::new(0),
            idle: Notify::new(),
            closed_tx,
            last_seen_ms: AtomicU64::new(0),
            started: Instant::now(),
            peer_away: AtomicBool::new(false),
        });
        let driver = Driver {
            ws,
            shared: shared.clone(),
            out_rx,
            ctrl_rx,
            incoming_tx: Some(incoming_tx),
        };
        (Mux { shared }, driver, Incoming { rx: incoming_rx })
    }

    /// Opens a stream carrying `head`, executed with the connection definition `spec` (JSON).
    ///
    /// Returns the half that sends the request body and the half that yields the response.
    ///
    /// # Errors
    /// [`MuxError::Closed`], [`MuxError::GoingAway`] (either side draining),
    /// [`MuxError::TooManyStreams`], [`MuxError::StreamIdsExhausted`].
    pub fn open(
        &self,
        head: RequestHead,
        spec: Bytes,
    ) -> Result<(SendStream, RecvStream), MuxError> {
        self.try_open(head, spec).map_err(|(e, _)| e)
    }

    /// Like [`Mux::open`], but a refusal hands `head` back, so the caller can try another
    /// connection without having copied it.
    ///
    /// # Errors
    /// As [`Mux::open`], with the head.
    pub fn try_open(
        &self,
        head: RequestHead,
        spec: Bytes,
    ) -> Result<(SendStream, RecvStream), (MuxError, RequestHead)> {
        let shared = &self.shared;
        let mut st = shared.lock();
        if st.closed {
            return Err((MuxError::Closed, head));
        }
        if st.local_going_away || st.peer_going_away {
            return Err((MuxError::GoingAway, head));
        }
        if st.streams.len() >= shared.config.max_concurrent_streams as usize {
            return Err((
                MuxError::TooManyStreams(shared.config.max_concurrent_streams),
                head,
            ));
        }
        let id = st.next_local_id;
        if id > u32::MAX - 2 {
            return Err((MuxError::StreamIdsExhausted, head));
        }
        // Sent under the lock so Open frames leave in id order.
        let open = Out::Frame(Frame::Open(Open {
            stream: StreamId(id),
            head,
            spec,
        }));
        if let Err(mpsc::error::SendError(open)) = shared.out.send(open) {
            let Out::Frame(Frame::Open(open)) = open else {
                unreachable!("the value sent is handed back unchanged")
            };
            return Err((MuxError::Closed, open.head));
        }
        st.next_local_id += 2;
        Ok(shared.insert_stream(&mut st, StreamId(id)))
    }

    /// Streams currently open on this connection.
    pub fn active_streams(&self) -> usize {
        self.shared.active.load(Ordering::Relaxed)
    }

    /// True once the connection has ended.
    pub fn is_closed(&self) -> bool {
        self.shared.lock().closed
    }

    /// True when the peer sent `GoAway`: open no new streams here.
    pub fn peer_going_away(&self) -> bool {
        self.shared.peer_away.load(Ordering::Relaxed)
    }

    /// Starts draining: sends `GoAway`, refuses streams the peer opens from now on, and makes
    /// [`Mux::open`] fail with [`MuxError::GoingAway`]. Streams in flight continue.
    pub fn go_away(&self, reason: &str) {
        let mut st = self.shared.lock();
        if st.local_going_away || st.closed {
            return;
        }
        st.local_going_away = true;
        drop(st);
        self.shared.send_ctrl(Frame::GoAway {
            reason: reason.to_string(),
        });
    }

    /// Waits until no stream is open, or the connection ended.
    ///
    /// # Cancel safety
    /// Cancel safe.
    pub async fn drained(&self) {
        let mut closed = self.shared.closed_tx.subscribe();
        loop {
            let idle = self.shared.idle.notified();
            tokio::pin!(idle);
            // Registered before the check, so the last stream ending in between is seen.
            idle.as_mut().enable();
            if self.shared.active.load(Ordering::Acquire) == 0 || *closed.borrow_and_update() {
                return;
            }
            tokio::select! {
                () = &mut idle => {},
                r = closed.changed() => if r.is_err() { return },
            }
        }
    }

    /// Waits until the connection has ended.
    ///
    /// # Cancel safety
    /// Cancel safe.
    pub async fn closed(&self) {
        let mut closed = self.shared.closed_tx.subscribe();
        let _ = closed.wait_for(|c| *c).await;
    }

    /// Closes the connection with a WebSocket close code (RFC 6455 §7.4.1: 1000 normal, 1001
    /// going away, 1008 policy violation) and reason. Open streams fail with `ConnectionLost`.
    pub fn close(&self, code: u16, reason: &str) {
        // Ordered: frames queued before the close (a stream's last Data and End) still leave.
        let _ = self.shared.out.send(Out::Close(code, reason.to_string()));
    }
}

/// The sending half of a stream.
pub struct SendStream {
    id: StreamId,
    shared: Arc<Shared>,
    signal: Arc<StreamSignal>,
    done: bool,
}

impl SendStream {
    /// The stream's id.
    pub fn id(&self) -> StreamId {
        self.id
    }

    fn reset_error(&self) -> MuxError {
        if self.shared.lock().closed {
            MuxError::Reset {
                code: ResetCode::ConnectionLost,
                message: "tunnel connection lost".into(),
            }
        } else {
            MuxError::Reset {
                code: ResetCode::Cancel,
                message: "stream reset by peer".into(),
            }
        }
    }

    /// Sends the response head (agent side).
    ///
    /// # Errors
    /// [`MuxError::Reset`] when the stream is gone; [`MuxError::Closed`].
    pub fn send_response(
        &mut self,
        status: u16,
        headers: Vec<proto::HeaderField>,
        body: proto::BodyKind,
    ) -> Result<(), MuxError> {
        if self.signal.credit.is_closed() {
            return Err(self.reset_error());
        }
        self.shared.send_ordered(Frame::Response(Response {
            stream: self.id,
            status,
            headers,
            body,
        }))
    }

    /// Sends body bytes, split into chunks of at most [`MAX_DATA_CHUNK`], waiting for flow-control
    /// credit as needed.
    ///
    /// # Errors
    /// [`MuxError::Reset`] when the stream was reset or the connection lost.
    ///
    /// # Cancel safety
    /// Not cancel safe: if the future is dropped, a prefix of `data` may have been sent. No
    /// credit is lost.
    pub async fn send_data(&mut self, mut data: Bytes) -> Result<(), MuxError> {
        while !data.is_empty() {
            let n = data.len().min(MAX_DATA_CHUNK);
            let stream_permit = self
                .signal
                .credit
                .acquire_many(n as u32)
                .await
                .map_err(|_| self.reset_error())?;
            let conn_permit = self
                .shared
                .conn_credit
                .acquire_many(n as u32)
                .await
                .map_err(|_| self.reset_error())?;
            let chunk = data.split_to(n);
            // No await between here and the send: the credit is spent exactly when the frame
            // is queued.
            stream_permit.forget();
            conn_permit.forget();
            self.shared
                .send_ordered(Frame::Data {
                    stream: self.id,
                    data: chunk,
                })
                .map_err(|_| self.reset_error())?;
        }
        Ok(())
    }

    /// Ends this half: no more data follows.
    ///
    /// # Errors
    /// [`MuxError::Reset`] when the stream was already reset.
    pub fn finish(mut self) -> Result<(), MuxError> {
        self.done = true;
        let mut st = self.shared.lock();
        let Some(entry) = st.streams.get_mut(&self.id.0) else {
            drop(st);
            return Err(self.reset_error());
        };
        entry.local_done = true;
        let remove = entry.remote_done;
        // Under the lock so End cannot overtake a Reset decision made concurrently.
        let sent = self.shared.send_ordered(Frame::End { stream: self.id });
        if remove {
            self.shared.remove(&mut st, self.id.0);
        }
        sent
    }

    /// Aborts the stream in both directions with `code` and `message` (no secrets).
    pub fn reset(mut self, code: ResetCode, message: &str) {
        self.done = true;
        reset_stream(&self.shared, self.id, code, message);
    }

    /// Resolves when the stream has been reset (by the peer or locally) or the connection lost.
    ///
    /// # Cancel safety
    /// Cancel safe.
    pub async fn cancelled(&mut self) {
        self.signal.cancelled().await;
    }

    /// Like [`SendStream::cancelled`], but independent of this handle, so it can be awaited
    /// while the handle is busy sending.
    pub fn cancellation(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let signal = self.signal.clone();
        async move { signal.cancelled().await }
    }
}

impl Drop for SendStream {
    fn drop(&mut self) {
        if !self.done {
            reset_stream(
                &self.shared,
                self.id,
                ResetCode::Cancel,
                "sender went away before the end of the body",
            );
        }
    }
}

fn reset_stream(shared: &Shared, id: StreamId, code: ResetCode, message: &str) {
    let mut st = shared.lock();
    if let Some(entry) = shared.remove(&mut st, id.0) {
        if let Some(tx) = entry.inbound {
            let _ = tx.send(Inbound::Reset {
                code,
                message: message.to_string(),
            });
        }
        drop(st);
        // Ordered, so a Reset never overtakes the stream's own Open.
        let _ = shared.send_ordered(Frame::Reset(Reset {
            stream: id,
            code,
            message: message.to_string(),
        }));
    }
}

/// The receiving half of a stream. See [`Inbound`] for what it yields.
pub struct RecvStream {
    id: StreamId,
    shared: Arc<Shared>,
    signal: Arc<StreamSignal>,
    unreturned: u32,
    finished: bool,
}

impl RecvStream {
    /// The stream's id.
    pub fn id(&self) -> StreamId {
        self.id
    }

    /// Polls for the next inbound item; `None` after `End` or `Reset` has been yielded.
    /// Taking a `Data` chunk returns its flow-control credit to the peer.
    pub fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Option<Inbound>> {
        if self.finished {
            return Poll::Ready(None);
        }
        let item = {
            let mut inbox = self.signal.inbox();
            match inbox.items.pop_front() {
                Some(item) => item,
                None if inbox.closed => {
                    drop(inbox);
                    self.finished = true;
                    // The entry was removed without a message: only on connection loss.
                    return Poll::Ready(Some(Inbound::Reset {
                        code: ResetCode::ConnectionLost,
                        message: "tunnel connection lost".into(),
                    }));
                }
                None => {
                    if !inbox
                        .waker
                        .as_ref()
                        .is_some_and(|w| w.will_wake(cx.waker()))
                    {
                        inbox.waker = Some(cx.waker().clone());
                    }
                    return Poll::Pending;
                }
            }
        };
        match &item {
            Inbound::Data(data) => self.release(data.len()),
            Inbound::End | Inbound::Reset { .. } => self.finished = true,
            Inbound::Response(_) => {}
        }
        Poll::Ready(Some(item))
    }

    /// The next inbound item; `None` after `End` or `Reset`.
    ///
    /// # Cancel safety
    /// Cancel safe.
    pub async fn recv(&mut self) -> Option<Inbound> {
        std::future::poll_fn(|cx| self.poll_recv(cx)).await
    }

    fn release(&mut self, n: usize) {
        self.shared.release_connection(n);
        self.unreturned += n as u32;
        if self.unreturned >= self.shared.config.initial_window / 2 {
            let amount = std::mem::take(&mut self.unreturned);
            let mut st = self.shared.lock();
            if let Some(entry) = st.streams.get_mut(&self.id.0) {
                if !entry.remote_done {
                    entry.recv_remaining += i64::from(amount);
                    drop(st);
                    self.shared.send_ctrl(Frame::Credit {
                        stream: self.id,
                        bytes: amount,
                    });
                }
            }
        }
    }
}

impl Drop for RecvStream {
    fn drop(&mut self) {
        // Refuse further deliveries (the driver then returns their credit itself), and return
        // the connection credit of whatever was delivered but never taken.
        let buffered: usize = {
            let mut inbox = self.signal.inbox();
            inbox.receiver_gone = true;
            inbox.waker = None;
            std::mem::take(&mut inbox.items)
                .into_iter()
                .map(|item| match item {
                    Inbound::Data(d) => d.len(),
                    _ => 0,
                })
                .sum()
        };
        self.shared.release_connection(buffered);
        if self.finished {
            return;
        }
        let mut st = self.shared.lock();
        let Some(entry) = st.streams.get_mut(&self.id.0) else {
            return;
        };
        if entry.local_done {
            drop(st);
            reset_stream(
                &self.shared,
                self.id,
                ResetCode::Cancel,
                "receiver went away before the end of the body",
            );
        } else {
            // Keep sending; discard what the peer still sends (credit returned on arrival).
            entry.inbound = None;
            // Give back the stream window held by what was delivered but never read, and by what
            // was read but not yet returned: otherwise a sender with a full window would wait
            // forever for credit nobody is left to return.
            let owed = buffered as u64 + u64::from(self.unreturned);
            if owed > 0 && !entry.remote_done {
                let owed = owed.min(u64::from(u32::MAX)) as u32;
                entry.recv_remaining += i64::from(owed);
                drop(st);
                self.shared.send_ctrl(Frame::Credit {
                    stream: self.id,
                    bytes: owed,
                });
            }
        }
    }
}

/// WebSocket settings for a tunnel: messages and frames up to `max_frame_size` bytes (larger is
/// close 1009, never an allocation), writes batched up to 256 KiB, and a 16 KiB read buffer.
///
/// 256 KiB batches, with the agent's TLS buffer of `TUNNEL_TLS_BUFFER_LIMIT` (512 KiB), send a
/// body as one `writev` per 256 KiB. Against 128 KiB, 6 alternating pairs of proxied 1 MiB GETs
/// at c4: agent CPU per request −7 %, relay −12 % (medians); 100 MiB downloads −6 % / −3 %.
/// The batch buffer keeps its capacity, so a tunnel that carried a large body holds about
/// 320 KiB for it afterwards.
///
/// The read buffer is small on purpose: tungstenite zero-fills its spare read capacity before
/// every read, and `Data` payloads are zero-copy slices of that buffer that keep it alive, so a
/// large buffer costs a large allocation and memset per message. Frames larger than the buffer
/// still arrive in one read once their header announced their length.
pub fn websocket_config(
    max_frame_size: usize,
) -> tokio_tungstenite::tungstenite::protocol::WebSocketConfig {
    tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
        .max_message_size(Some(max_frame_size))
        .max_frame_size(Some(max_frame_size))
        .write_buffer_size(256 * 1024)
        .read_buffer_size(16 * 1024)
}

/// Sends a frame during the handshake (before a [`Mux`] exists).
///
/// # Errors
/// The WebSocket error, or [`WsError::Io`] for an unencodable frame.
pub async fn send_frame<S>(ws: &mut S, frame: &Frame) -> Result<(), WsError>
where
    S: Sink<Message, Error = WsError> + Unpin,
{
    let bytes = proto::encode(frame, proto::HANDSHAKE_MAX_FRAME_SIZE)
        .map_err(|e| WsError::Io(std::io::Error::other(e.to_string())))?;
    ws.send(Message::Binary(bytes)).await
}

/// Why a handshake frame could not be read.
#[derive(Debug, thiserror::Error)]
pub enum RecvFrameError {
    /// The transport failed.
    #[error("websocket: {0}")]
    Ws(#[from] WsError),
    /// The peer closed the connection.
    #[error("connection closed by peer{}", .0.as_ref().map(|(c, r)| format!(" ({c}: {r})")).unwrap_or_default())]
    Closed(Option<(u16, String)>),
    /// A text message, which the protocol forbids.
    #[error("text message where a binary frame was expected")]
    Text,
    /// The frame did not decode.
    #[error(transparent)]
    Decode(#[from] DecodeError),
    /// Nothing arrived in time.
    #[error("timed out waiting for the peer")]
    Timeout,
}

impl RecvFrameError {
    /// The RFC 6455 close code to answer this error with, if any: 1002 for protocol errors,
    /// 1009 for a too-large frame.
    pub fn close_code(&self) -> Option<u16> {
        match self {
            RecvFrameError::Text | RecvFrameError::Decode(DecodeError::Malformed(_)) => Some(1002),
            RecvFrameError::Decode(DecodeError::TrailingBytes(_)) => Some(1002),
            RecvFrameError::Decode(DecodeError::TooLarge { .. }) => Some(1009),
            RecvFrameError::Ws(WsError::Capacity(_)) => Some(1009),
            _ => None,
        }
    }
}

/// Reads one frame during the handshake, skipping pings and pongs, within `timeout`.
///
/// # Errors
/// [`RecvFrameError`].
pub async fn recv_frame<S>(ws: &mut S, timeout: Duration) -> Result<Frame, RecvFrameError>
where
    S: Stream<Item = Result<Message, WsError>> + Unpin,
{
    let read = async {
        loop {
            match ws.next().await {
                None => return Err(RecvFrameError::Closed(None)),
                Some(Err(e)) => return Err(e.into()),
                Some(Ok(Message::Binary(b))) => {
                    return Ok(proto::decode(&b, proto::HANDSHAKE_MAX_FRAME_SIZE)?)
                }
                Some(Ok(Message::Text(_))) => return Err(RecvFrameError::Text),
                Some(Ok(Message::Close(c))) => {
                    return Err(RecvFrameError::Closed(
                        c.map(|c| (u16::from(c.code), c.reason.to_string())),
                    ))
                }
                Some(Ok(_)) => continue,
            }
        }
    };
    tokio::time::timeout(timeout, read)
        .await
        .map_err(|_| RecvFrameError::Timeout)?
}

/// Sends a WebSocket close frame and flushes, ignoring errors (best effort on a failing
/// connection).
pub async fn send_close<S>(ws: &mut S, code: u16, reason: &str)
where
    S: Sink<Message, Error = WsError> + Unpin,
{
    let frame = CloseFrame {
        code: CloseCode::from(code),
        reason: truncate_reason(reason).into(),
    };
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        let _ = ws.send(Message::Close(Some(frame))).await;
        let _ = ws.close().await;
    })
    .await;
}

/// Close reasons are limited to 123 bytes (RFC 6455 §5.5: 125-byte control payload).
fn truncate_reason(reason: &str) -> String {
    let mut end = reason.len().min(123);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    reason[..end].to_string()
}

enum ReadExit {
    PeerClosed(u16, String),
    Protocol(u16, String),
    Transport(String),
}

impl<S> Driver<S>
where
    S: Stream<Item = Result<Message, WsError>> + Sink<Message, Error = WsError> + Unpin,
{
    /// Runs the connection until it ends, then fails every open stream with
    /// [`ResetCode::ConnectionLost`] and returns why it ended.
    pub async fn run(self) -> CloseReason {
        let Driver {
            ws,
            shared,
            mut out_rx,
            mut ctrl_rx,
            incoming_tx,
        } = self;
        shared
            .last_seen_ms
            .store(shared.now_ms(), Ordering::Relaxed);
        let (mut sink, mut stream) = ws.split();
        enum First {
            Read(ReadExit),
            Write(CloseReason),
        }
        let first = {
            let reader = read_loop(&mut stream, &shared, incoming_tx);
            let writer = write_loop(&mut sink, &shared, &mut out_rx, &mut ctrl_rx);
            tokio::pin!(reader, writer);
            tokio::select! {
                exit = &mut reader => First::Read(exit),
                exit = &mut writer => {
                    // Give the peer a moment to answer our close frame.
                    if matches!(exit, CloseReason::LocalClose { .. }) {
                        let _ = tokio::time::timeout(Duration::from_secs(1), &mut reader).await;
                    }
                    First::Write(exit)
                }
            }
        };
        let reason = match first {
            First::Write(reason) => reason,
            First::Read(ReadExit::PeerClosed(code, reason)) => {
                // tungstenite queued the close reply; flush it.
                let _ = tokio::time::timeout(Duration::from_secs(1), sink.close()).await;
                CloseReason::PeerClosed { code, reason }
            }
            First::Read(ReadExit::Protocol(code, reason)) => {
                warn!(code, %reason, "peer broke the tunnel protocol; closing");
                let frame = CloseFrame {
                    code: CloseCode::from(code),
                    reason: truncate_reason(&reason).into(),
                };
                let _ = tokio::time::timeout(Duration::from_secs(1), async {
                    let _ = sink.send(Message::Close(Some(frame))).await;
                    let _ = sink.close().await;
                })
                .await;
                CloseReason::ProtocolViolation { code, reason }
            }
            First::Read(ReadExit::Transport(e)) => CloseReason::Transport(e),
        };
        fail_all(&shared);
        debug!(%reason, "tunnel connection ended");
        reason
    }
}

fn fail_all(shared: &Shared) {
    let mut st = shared.lock();
    st.closed = true;
    let ids: Vec<u32> = st.streams.keys().copied().collect();
    for id in ids {
        if let Some(entry) = shared.remove(&mut st, id) {
            if let Some(tx) = entry.inbound {
                let _ = tx.send(Inbound::Reset {
                    code: ResetCode::ConnectionLost,
                    message: "tunnel connection lost".into(),
                });
            }
        }
    }
    drop(st);
    shared.conn_credit.close();
    shared.closed_tx.send_replace(true);
}

async fn write_loop<W>(
    sink: &mut W,
    shared: &Shared,
    out_rx: &mut mpsc::UnboundedReceiver<Out>,
    ctrl_rx: &mut mpsc::UnboundedReceiver<Out>,
) -> CloseReason
where
    W: Sink<Message, Error = WsError> + Unpin,
{
    let heartbeat = shared.config.heartbeat;
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + heartbeat, heartbeat);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let max = shared.config.max_frame_size as usize;
    loop {
        let first = tokio::select! {
            biased;
            Some(o) = ctrl_rx.recv() => o,
            Some(o) = out_rx.recv() => o,
            _ = tick.tick() => {
                let silent = shared.now_ms().saturating_sub(shared.last_seen_ms.load(Ordering::Relaxed));
                if silent > 3 * heartbeat.as_millis() as u64 {
                    warn!(silent_ms = silent, "no message from the peer for three heartbeats");
                    let frame = CloseFrame { code: CloseCode::Away, reason: "heartbeat timeout".into() };
                    let _ = tokio::time::timeout(Duration::from_secs(1), sink.send(Message::Close(Some(frame)))).await;
                    return CloseReason::HeartbeatTimeout;
                }
                Out::Ping
            }
        };
        let mut next = Some(first);
        let mut batched = 0;
        while let Some(item) = next.take() {
            let msg = match item {
                Out::Frame(frame) => match proto::encode(&frame, max) {
                    Ok(bytes) => Message::Binary(bytes),
                    Err(e) => {
                        // A local bug (e.g. headers too large for a frame): fail that stream only.
                        warn!(error = %e, kind = frame.kind(), "frame not sent");
                        if let Some(id) = frame.stream() {
                            reset_stream(shared, id, ResetCode::Internal, "frame too large");
                        }
                        continue;
                    }
                },
                Out::Ping => Message::Ping(Bytes::new()),
                Out::Close(code, reason) => {
                    let frame = CloseFrame {
                        code: CloseCode::from(code),
                        reason: truncate_reason(&reason).into(),
                    };
                    let _ = tokio::time::timeout(Duration::from_secs(1), async {
                        let _ = sink.send(Message::Close(Some(frame))).await;
                        let _ = sink.flush().await;
                    })
                    .await;
                    return CloseReason::LocalClose { code, reason };
                }
            };
            if let Err(e) = sink.feed(msg).await {
                return CloseReason::Transport(e.to_string());
            }
            batched += 1;
            if batched < 256 {
                next = ctrl_rx.try_recv().ok().or_else(|| out_rx.try_recv().ok());
            }
        }
        trace!(batched, "flush");
        if let Err(e) = sink.flush().await {
            return CloseReason::Transport(e.to_string());
        }
    }
}

async fn read_loop<R>(
    stream: &mut R,
    shared: &Arc<Shared>,
    incoming_tx: Option<mpsc::UnboundedSender<IncomingStream>>,
) -> ReadExit
where
    R: Stream<Item = Result<Message, WsError>> + Unpin,
{
    let max = shared.config.max_frame_size as usize;
    loop {
        let msg = match stream.next().await {
            None => return ReadExit::Transport("connection closed without a close frame".into()),
            Some(Err(WsError::Capacity(e))) => return ReadExit::Protocol(1009, e.to_string()),
            Some(Err(WsError::Protocol(e))) => return ReadExit::Protocol(1002, e.to_string()),
            Some(Err(e)) => return ReadExit::Transport(e.to_string()),
            Some(Ok(m)) => m,
        };
        shared
            .last_seen_ms
            .store(shared.now_ms(), Ordering::Relaxed);
        let bytes = match msg {
            Message::Binary(b) => b,
            Message::Text(_) => {
                return ReadExit::Protocol(
                    1002,
                    "text messages are not part of the protocol".into(),
                )
            }
            Message::Close(c) => {
                let (code, reason) = c
                    .map(|c| (u16::from(c.code), c.reason.to_string()))
                    .unwrap_or((1005, String::new()));
                return ReadExit::PeerClosed(code, reason);
            }
            Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => continue,
        };
        let frame = match proto::decode(&bytes, max) {
            Ok(f) => f,
            Err(e @ DecodeError::TooLarge { .. }) => {
                return ReadExit::Protocol(1009, e.to_string())
            }
            Err(e) => return ReadExit::Protocol(1002, e.to_string()),
        };
        if let Err(reason) = dispatch(shared, frame, incoming_tx.as_ref()) {
            return ReadExit::Protocol(1002, reason);
        }
    }
}

fn guard_credit(available: usize, add: u32) -> Result<(), String> {
    if available as u64 + u64::from(add) > i32::MAX as u64 {
        return Err("flow-control window exceeds 2^31-1 (RFC 9113 section 6.9.1)".into());
    }
    Ok(())
}

fn dispatch(
    shared: &Arc<Shared>,
    frame: Frame,
    incoming_tx: Option<&mpsc::UnboundedSender<IncomingStream>>,
) -> Result<(), String> {
    match frame {
        Frame::Data { stream, data } => {
            let n = data.len();
            let left = shared
                .conn_recv_remaining
                .fetch_sub(n as i64, Ordering::AcqRel)
                - n as i64;
            if left < 0 {
                return Err("peer exceeded the connection flow-control window".into());
            }
            let mut st = shared.lock();
            let Some(entry) = st.streams.get_mut(&stream.0) else {
                // Stream already gone (reset raced with data): return the credit at once.
                drop(st);
                shared.release_connection(n);
                return Ok(());
            };
            if entry.remote_done {
                return Err(format!("Data on stream {stream} after its End"));
            }
            entry.recv_remaining -= n as i64;
            if entry.recv_remaining < 0 {
                return Err(format!(
                    "peer exceeded the flow-control window of stream {stream}"
                ));
            }
            let delivered = match &entry.inbound {
                Some(tx) => tx.send(Inbound::Data(data)).is_ok(),
                None => false,
            };
            if !delivered {
                // Receiver gone: discard, return stream and connection credit at once.
                entry.recv_remaining += n as i64;
                drop(st);
                shared.release_connection(n);
                if n > 0 {
                    shared.send_ctrl(Frame::Credit {
                        stream,
                        bytes: n as u32,
                    });
                }
            }
            Ok(())
        }
        Frame::Open(open) => {
            let id = open.stream.0;
            let peer_opens_odd = shared.config.role == Role::Agent;
            if id == 0 || (id % 2 == 1) != peer_opens_odd {
                return Err(format!("peer opened stream {id} with the wrong parity"));
            }
            let mut st = shared.lock();
            if id <= st.last_peer_id {
                return Err(format!("stream id {id} reused or out of order"));
            }
            st.last_peer_id = id;
            let refuse = |reason: &str| {
                shared.send_ctrl(Frame::Reset(Reset {
                    stream: open.stream,
                    code: ResetCode::Refused,
                    message: reason.into(),
                }))
            };
            let Some(incoming_tx) = incoming_tx.filter(|_| shared.config.role == Role::Agent)
            else {
                refuse("this side does not accept streams");
                return Ok(());
            };
            if st.local_going_away {
                refuse("draining");
                return Ok(());
            }
            if st.streams.len() >= shared.config.max_concurrent_streams as usize {
                refuse("too many concurrent streams");
                return Ok(());
            }
            let (send, recv) = shared.insert_stream(&mut st, open.stream);
            drop(st);
            let incoming = IncomingStream {
                id: open.stream,
                head: open.head,
                spec: open.spec,
                send,
                recv,
            };
            // If nobody accepts any more, dropping `incoming` resets the stream.
            let _ = incoming_tx.send(incoming);
            Ok(())
        }
        Frame::Response(resp) => {
            let st = shared.lock();
            if let Some(entry) = st.streams.get(&resp.stream.0) {
                if let Some(tx) = &entry.inbound {
                    let _ = tx.send(Inbound::Response(resp));
                }
            }
            Ok(())
        }
        Frame::End { stream } => {
            let mut st = shared.lock();
            let Some(entry) = st.streams.get_mut(&stream.0) else {
                return Ok(());
            };
            if entry.remote_done {
                return Err(format!("second End on stream {stream}"));
            }
            entry.remote_done = true;
            if let Some(tx) = &entry.inbound {
                let _ = tx.send(Inbound::End);
            }
            if entry.local_done {
                shared.remove(&mut st, stream.0);
            }
            Ok(())
        }
        Frame::Reset(reset) => {
            let mut st = shared.lock();
            if let Some(entry) = shared.remove(&mut st, reset.stream.0) {
                debug!(stream = %reset.stream, code = reset.code.as_str(), "stream reset by peer");
                if let Some(tx) = entry.inbound {
                    let _ = tx.send(Inbound::Reset {
                        code: reset.code,
                        message: reset.message,
                    });
                }
            }
            Ok(())
        }
        Frame::Credit { stream, bytes } => {
            if stream == StreamId::CONNECTION {
                guard_credit(shared.conn_credit.available_permits(), bytes)?;
                shared.conn_credit.add_permits(bytes as usize);
            } else {
                let st = shared.lock();
                if let Some(entry) = st.streams.get(&stream.0) {
                    if !entry.signal.credit.is_closed() {
                        guard_credit(entry.signal.credit.available_permits(), bytes)?;
                        entry.signal.credit.add_permits(bytes as usize);
                    }
                }
            }
            Ok(())
        }
        Frame::GoAway { reason } => {
            debug!(%reason, "peer is draining");
            shared.lock().peer_going_away = true;
            shared.peer_away.store(true, Ordering::Relaxed);
            Ok(())
        }
        Frame::Hello(_) | Frame::Welcome(_) | Frame::Reject(_) => Err(format!(
            "unexpected {} frame after the handshake",
            frame.kind()
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::BodyKind;
    use tokio::io::DuplexStream;
    use tokio_tungstenite::tungstenite::protocol::{Role as WsRole, WebSocketConfig};
    use tokio_tungstenite::WebSocketStream;

    type Ws = WebSocketStream<DuplexStream>;

    async fn ws_pair() -> (Ws, Ws) {
        // A small duplex buffer so backpressure shows up quickly.
        let (a, b) = tokio::io::duplex(16 * 1024);
        let cfg = WebSocketConfig::default();
        (
            WebSocketStream::from_raw_socket(a, WsRole::Server, Some(cfg)).await,
            WebSocketStream::from_raw_socket(b, WsRole::Client, Some(cfg)).await,
        )
    }

    fn config(role: Role) -> MuxConfig {
        MuxConfig {
            role,
            initial_window: 128 * 1024,
            connection_window: 256 * 1024,
            max_frame_size: 256 * 1024,
            max_concurrent_streams: 512,
            heartbeat: Duration::from_secs(5),
        }
    }

    struct Pair {
        relay: Mux,
        agent: Mux,
        incoming: Incoming,
        relay_done: tokio::task::JoinHandle<CloseReason>,
        agent_done: tokio::task::JoinHandle<CloseReason>,
    }

    /// Opens a stream with an empty request body at `path` and answers it with a streamed 200:
    /// the relay's reader and the agent's side of the stream.
    async fn answered_stream(p: &mut Pair, path: &str) -> (RecvStream, IncomingStream) {
        let (send, recv) = p.relay.open(head(path), Bytes::new()).unwrap();
        send.finish().unwrap();
        let mut s = p.incoming.accept().await.unwrap();
        s.send
            .send_response(200, vec![], BodyKind::Streamed)
            .unwrap();
        (recv, s)
    }

    async fn pair() -> Pair {
        let (r, a) = ws_pair().await;
        let (relay, rd, _) = Mux::new(r, config(Role::Relay));
        let (agent, ad, incoming) = Mux::new(a, config(Role::Agent));
        Pair {
            relay,
            agent,
            incoming,
            relay_done: tokio::spawn(rd.run()),
            agent_done: tokio::spawn(ad.run()),
        }
    }

    fn head(target: &str) -> RequestHead {
        RequestHead {
            method: "GET".into(),
            target: target.into(),
            headers: vec![],
            body: BodyKind::Empty,
        }
    }

    /// Echo server on the agent side: answers every stream with its request body.
    fn spawn_echo(mut incoming: Incoming) {
        tokio::spawn(async move {
            while let Some(mut s) = incoming.accept().await {
                tokio::spawn(async move {
                    s.send
                        .send_response(200, vec![], BodyKind::Streamed)
                        .unwrap();
                    while let Some(item) = s.recv.recv().await {
                        match item {
                            Inbound::Data(d) => {
                                if s.send.send_data(d).await.is_err() {
                                    return;
                                }
                            }
                            Inbound::End => break,
                            other => panic!("unexpected {other:?}"),
                        }
                    }
                    let _ = s.send.finish();
                });
            }
        });
    }

    async fn read_body(recv: &mut RecvStream) -> Result<Vec<u8>, (ResetCode, String)> {
        let mut body = Vec::new();
        while let Some(item) = recv.recv().await {
            match item {
                Inbound::Response(_) => {}
                Inbound::Data(d) => body.extend_from_slice(&d),
                Inbound::End => return Ok(body),
                Inbound::Reset { code, message } => return Err((code, message)),
            }
        }
        panic!("stream ended without End or Reset")
    }

    #[tokio::test]
    async fn request_and_response_bodies_round_trip() {
        let p = pair().await;
        spawn_echo(p.incoming);
        let body: Vec<u8> = (0..1_000_000u32).map(|i| (i % 251) as u8).collect();
        let (mut send, mut recv) = p.relay.open(head("/echo"), Bytes::new()).unwrap();
        let b = Bytes::from(body.clone());
        let writer = tokio::spawn(async move {
            send.send_data(b).await.unwrap();
            send.finish().unwrap();
        });
        let got = read_body(&mut recv).await.unwrap();
        writer.await.unwrap();
        assert_eq!(got, body);
        drop(recv);
        tokio::time::timeout(Duration::from_secs(2), p.relay.drained())
            .await
            .unwrap();
        tokio::time::timeout(Duration::from_secs(2), p.agent.drained())
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn many_concurrent_streams() {
        let p = pair().await;
        spawn_echo(p.incoming);
        let mut tasks = Vec::new();
        for i in 0..200u32 {
            let relay = p.relay.clone();
            tasks.push(tokio::spawn(async move {
                let payload = Bytes::from(format!("stream {i} ").repeat(1000));
                let (mut send, mut recv) = relay.open(head("/"), Bytes::new()).unwrap();
                let p2 = payload.clone();
                tokio::spawn(async move {
                    send.send_data(p2).await.unwrap();
                    send.finish().unwrap();
                });
                assert_eq!(read_body(&mut recv).await.unwrap(), payload.to_vec());
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(p.relay.active_streams(), 0);
    }

    #[tokio::test]
    async fn sender_stops_at_the_window_until_the_receiver_reads() {
        let mut p = pair().await;
        let (mut recv, s) = answered_stream(&mut p, "/").await;
        // The window is 128 KiB: 1 MiB cannot be sent while nobody reads.
        let big = Bytes::from(vec![1u8; 1024 * 1024]);
        let mut agent_send = s.send;
        let sender = tokio::spawn(async move {
            agent_send.send_data(big).await.unwrap();
            agent_send.finish().unwrap();
        });
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(!sender.is_finished(), "sender ignored flow control");
        let got = read_body(&mut recv).await.unwrap();
        assert_eq!(got.len(), 1024 * 1024);
        sender.await.unwrap();
    }

    #[tokio::test]
    async fn dropping_the_response_reader_cancels_the_agent_stream() {
        let mut p = pair().await;
        let (mut recv, mut s) = answered_stream(&mut p, "/").await;
        s.send.send_data(Bytes::from_static(b"x")).await.unwrap();
        assert!(matches!(recv.recv().await, Some(Inbound::Response(_))));
        drop(recv);
        tokio::time::timeout(Duration::from_secs(2), s.send.cancelled())
            .await
            .expect("agent saw the reset");
        assert!(s.send.send_data(Bytes::from_static(b"y")).await.is_err());
        drop(s);
        tokio::time::timeout(Duration::from_secs(2), p.agent.drained())
            .await
            .unwrap();
        assert_eq!(p.relay.active_streams(), 0);
    }

    #[tokio::test]
    async fn a_dropped_reader_gives_back_the_connection_window() {
        let mut p = pair().await;
        // The relay keeps its request half open, so dropping its reader does not reset the
        // stream: what the agent still sends is discarded and its credit returned.
        let (_send_a, recv_a) = p.relay.open(head("/a"), Bytes::new()).unwrap();
        let mut a = p.incoming.accept().await.unwrap();
        a.send
            .send_response(200, vec![], BodyKind::Streamed)
            .unwrap();
        // A full stream window (128 KiB) delivered and never read...
        a.send
            .send_data(Bytes::from(vec![7u8; 128 * 1024]))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        drop(recv_a);
        // ...then 1 MiB more, 4x the connection window: only possible if both come back.
        tokio::time::timeout(
            Duration::from_secs(5),
            a.send.send_data(Bytes::from(vec![7u8; 1024 * 1024])),
        )
        .await
        .expect("credit of discarded data was returned")
        .unwrap();
        // A second stream can still use the whole connection window.
        let (mut recv_b, mut b) = answered_stream(&mut p, "/b").await;
        let writer = tokio::spawn(async move {
            b.send
                .send_data(Bytes::from(vec![9u8; 512 * 1024]))
                .await
                .unwrap();
            b.send.finish().unwrap();
        });
        let got = tokio::time::timeout(Duration::from_secs(5), read_body(&mut recv_b))
            .await
            .expect("second stream not starved")
            .unwrap();
        assert_eq!(got.len(), 512 * 1024);
        writer.await.unwrap();
    }

    #[tokio::test]
    async fn dropped_sender_resets_instead_of_ending() {
        let mut p = pair().await;
        let (send, _recv) = p.relay.open(head("/"), Bytes::new()).unwrap();
        drop(send);
        let mut s = p.incoming.accept().await.unwrap();
        match s.recv.recv().await {
            Some(Inbound::Reset { code, .. }) => assert_eq!(code, ResetCode::Cancel),
            other => panic!("expected a reset, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn connection_loss_fails_every_stream() {
        let mut p = pair().await;
        let (_send, mut recv) = p.relay.open(head("/"), Bytes::new()).unwrap();
        let _s = p.incoming.accept().await.unwrap();
        p.agent_done.abort();
        drop(p.agent);
        match tokio::time::timeout(Duration::from_secs(5), recv.recv())
            .await
            .unwrap()
        {
            Some(Inbound::Reset { code, .. }) => assert_eq!(code, ResetCode::ConnectionLost),
            other => panic!("expected ConnectionLost, got {other:?}"),
        }
        assert!(matches!(
            p.relay.open(head("/"), Bytes::new()),
            Err(MuxError::Closed)
        ));
        let _ = p.relay_done.await;
    }

    #[tokio::test]
    async fn go_away_refuses_new_streams_and_lets_old_ones_finish() {
        let mut p = pair().await;
        let (send, mut recv) = p.relay.open(head("/"), Bytes::new()).unwrap();
        send.finish().unwrap();
        let mut s = p.incoming.accept().await.unwrap();
        p.agent.go_away("shutting down");
        // Wait until the relay has seen the GoAway.
        tokio::time::timeout(Duration::from_secs(2), async {
            while !p.relay.peer_going_away() {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .unwrap();
        assert_eq!(
            p.relay.open(head("/"), Bytes::new()).err(),
            Some(MuxError::GoingAway)
        );
        s.send
            .send_response(200, vec![], BodyKind::Length(2))
            .unwrap();
        s.send.send_data(Bytes::from_static(b"ok")).await.unwrap();
        s.send.finish().unwrap();
        assert_eq!(read_body(&mut recv).await.unwrap(), b"ok");
    }

    #[tokio::test]
    async fn close_codes_for_bad_peers() {
        async fn case(msg: Message) -> CloseReason {
            let (r, mut raw) = ws_pair().await;
            let (_relay, rd, _) = Mux::new(r, config(Role::Relay));
            let done = tokio::spawn(rd.run());
            raw.send(msg).await.unwrap();
            // Read until the close frame arrives.
            let mut close = None;
            while let Some(Ok(m)) = raw.next().await {
                if let Message::Close(c) = m {
                    close = c;
                    break;
                }
            }
            let close = close.expect("close frame");
            let reason = done.await.unwrap();
            match &reason {
                CloseReason::ProtocolViolation { code, .. } => {
                    assert_eq!(*code, u16::from(close.code))
                }
                other => panic!("expected a protocol violation, got {other:?}"),
            }
            reason
        }
        let code = |r: CloseReason| match r {
            CloseReason::ProtocolViolation { code, .. } => code,
            _ => 0,
        };
        assert_eq!(code(case(Message::Text("hi".into())).await), 1002);
        assert_eq!(
            code(case(Message::Binary(Bytes::from_static(&[0x7f, 0x00]))).await),
            1002
        );
        let huge = Bytes::from(vec![0u8; 300 * 1024]);
        assert_eq!(code(case(Message::Binary(huge)).await), 1009);
        let hello =
            proto::encode(&Frame::Reject(proto::Reject { reason: "x".into() }), 1024).unwrap();
        assert_eq!(code(case(Message::Binary(hello)).await), 1002);
        // Data beyond the stream's window.
        let (a, mut raw) = ws_pair().await;
        let (_agent, ad, _incoming) = Mux::new(a, config(Role::Agent));
        let done = tokio::spawn(ad.run());
        let open = Frame::Open(Open {
            stream: StreamId(1),
            head: head("/"),
            spec: Bytes::new(),
        });
        raw.send(Message::Binary(proto::encode(&open, 1024).unwrap()))
            .await
            .unwrap();
        let flood = Frame::Data {
            stream: StreamId(1),
            data: Bytes::from(vec![0u8; 200 * 1024]),
        };
        raw.send(Message::Binary(proto::encode(&flood, 256 * 1024).unwrap()))
            .await
            .unwrap();
        assert!(matches!(
            done.await.unwrap(),
            CloseReason::ProtocolViolation { code: 1002, .. }
        ));
    }

    #[tokio::test]
    async fn wrong_parity_open_is_a_protocol_error() {
        let (a, mut raw) = ws_pair().await;
        let (_agent, ad, _incoming) = Mux::new(a, config(Role::Agent));
        let done = tokio::spawn(ad.run());
        let open = proto::encode(
            &Frame::Open(Open {
                stream: StreamId(2),
                head: head("/"),
                spec: Bytes::new(),
            }),
            1024,
        )
        .unwrap();
        raw.send(Message::Binary(open)).await.unwrap();
        assert!(matches!(
            done.await.unwrap(),
            CloseReason::ProtocolViolation { code: 1002, .. }
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn silent_peer_is_dropped_after_three_heartbeats() {
        let (r, raw) = ws_pair().await;
        let (relay, rd, _) = Mux::new(r, config(Role::Relay));
        let done = tokio::spawn(rd.run());
        // `raw` never reads, so it never answers pings.
        let reason = done.await.unwrap();
        assert_eq!(reason, CloseReason::HeartbeatTimeout);
        assert!(relay.is_closed());
        drop(raw);
    }

    #[tokio::test]
    async fn local_close_sends_the_code() {
        let (r, mut raw) = ws_pair().await;
        let (relay, rd, _) = Mux::new(r, config(Role::Relay));
        let done = tokio::spawn(rd.run());
        relay.close(1008, "agent revoked");
        let mut code = None;
        while let Some(Ok(m)) = raw.next().await {
            if let Message::Close(Some(c)) = m {
                code = Some(u16::from(c.code));
                break;
            }
        }
        assert_eq!(code, Some(1008));
        assert!(matches!(
            done.await.unwrap(),
            CloseReason::LocalClose { code: 1008, .. }
        ));
    }
}
