//! Tunnel frames and their codec: what crosses the relay ⇄ agent WebSocket.
//!
//! Every WebSocket *binary* message (RFC 6455 §5.6) carries exactly one [`Frame`], encoded with
//! bincode 2 in serde mode with the standard configuration (varint integers, little endian).
//! bincode is not self-describing: the order of [`Frame`]'s variants, of [`ResetCode`]'s variants
//! and of every struct's fields *is* the wire format. Append only; the golden-bytes tests in this
//! module pin it.
//!
//! This module has no sockets, no tasks and no clock: bytes in, frames out.

use bytes::{BufMut, Bytes, BytesMut};
use serde::{Deserialize, Serialize};

/// The protocol version this build speaks best. Sent in [`Hello::versions`].
pub const PROTOCOL_VERSION: u16 = 1;

/// Every protocol version this build can speak, newest first. A relay picks the highest version
/// both sides support, so an agent one version behind keeps working.
pub const SUPPORTED_VERSIONS: &[u16] = &[1];

/// Largest frame accepted before the handshake completed: 64 KiB. `Hello`, `Welcome` and
/// `Reject` are small; anything larger is a protocol error, never an allocation.
pub const HANDSHAKE_MAX_FRAME_SIZE: usize = 64 * 1024;

/// Hard ceiling for any negotiated maximum frame size: 16 MiB. Also the bincode decode limit, so a
/// length prefix inside a frame can never make the decoder allocate more than this.
pub const MAX_FRAME_SIZE_LIMIT: usize = 16 * 1024 * 1024;

/// Default negotiated maximum frame size: 1 MiB (bytes of one encoded frame).
pub const DEFAULT_MAX_FRAME_SIZE: u32 = 1024 * 1024;

/// Largest body chunk one `Data` frame carries: 64 KiB, so one large body cannot starve the
/// other streams sharing the connection.
pub const MAX_DATA_CHUNK: usize = 64 * 1024;

/// Identifies one stream (one HTTP exchange) within a tunnel connection.
///
/// Streams opened by the relay have odd ids (1, 3, 5, …); ids opened by the agent are even and
/// reserved. Id 0 is never a stream: in [`Frame::Credit`] it names the whole connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct StreamId(pub u32);

impl StreamId {
    /// The connection itself, used by connection-level [`Frame::Credit`].
    pub const CONNECTION: StreamId = StreamId(0);

    /// True for ids the relay opens (odd).
    pub fn is_relay_opened(self) -> bool {
        self.0 % 2 == 1
    }
}

impl std::fmt::Display for StreamId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// One protocol unit. One frame per WebSocket binary message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Frame {
    /// Agent → relay, first frame of a connection.
    Hello(Hello),
    /// Relay → agent: the handshake succeeded, with the negotiated parameters.
    Welcome(Welcome),
    /// Relay → agent: the handshake failed; the relay closes the connection after it.
    Reject(Reject),
    /// Opens a stream: the HTTP request head and the connection definition to execute it with.
    Open(Open),
    /// The HTTP response head of a stream (agent → relay).
    Response(Response),
    /// A chunk of a stream's body (at most [`MAX_DATA_CHUNK`] bytes), subject to flow control.
    Data {
        /// The stream the bytes belong to.
        stream: StreamId,
        /// Body bytes, in order.
        data: Bytes,
    },
    /// The sender's half of the stream is complete: no more `Data` follows.
    End {
        /// The stream whose body ended.
        stream: StreamId,
    },
    /// Aborts a stream in both directions.
    Reset(Reset),
    /// Flow-control credit: the receiver consumed `bytes` more bytes of `stream`'s body (or of the
    /// whole connection when `stream` is [`StreamId::CONNECTION`]). Modelled on HTTP/2
    /// WINDOW_UPDATE (RFC 9113 §6.9).
    Credit {
        /// The stream, or [`StreamId::CONNECTION`].
        stream: StreamId,
        /// Bytes of window returned to the sender.
        bytes: u32,
    },
    /// The sender is draining: it accepts no new streams; streams in flight finish.
    GoAway {
        /// Why, for logs.
        reason: String,
    },
}

/// First frame an agent sends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// Protocol versions the agent can speak, any order.
    pub versions: Vec<u16>,
    /// The agent's software version (e.g. `0.1.0`).
    pub agent_version: String,
    /// Identifies this agent process (random per start); the relay knows the enrolled agent from
    /// its token.
    pub agent_id: String,
    /// The host the agent runs on, for operators.
    pub hostname: String,
}

/// The relay's answer to a good [`Hello`]. Values apply to both directions.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Welcome {
    /// The protocol version both sides now speak.
    pub version: u16,
    /// Identifies this tunnel connection at the relay, for logs.
    pub session_id: String,
    /// Interval between WebSocket pings, in milliseconds. A peer silent for three intervals is
    /// considered gone.
    pub heartbeat_ms: u32,
    /// Initial per-stream flow-control window, in bytes.
    pub initial_window: u32,
    /// Connection-level flow-control window, in bytes.
    pub connection_window: u32,
    /// Largest encoded frame either side may send, in bytes.
    pub max_frame_size: u32,
    /// Most streams either side may have open at once.
    pub max_concurrent_streams: u32,
}

/// The relay's refusal of a [`Hello`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reject {
    /// Why, in words an operator can act on.
    pub reason: String,
}

/// How a message body is framed (RFC 9112 §6): its framing is preserved end to end.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum BodyKind {
    /// No body at all.
    Empty,
    /// Exactly this many bytes (`Content-Length`).
    Length(u64),
    /// Length unknown in advance (chunked transfer coding).
    Streamed,
}

/// A header field: lower-case name and raw value bytes (RFC 9110 §5).
pub type HeaderField = (String, Bytes);

/// The request head of an [`Open`] frame.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestHead {
    /// Request method (RFC 9110 §9), e.g. `GET`.
    pub method: String,
    /// Path and query relative to the connection's base URL, starting with `/`.
    pub target: String,
    /// End-to-end header fields from the client (hop-by-hop fields already removed).
    pub headers: Vec<HeaderField>,
    /// How the request body is framed.
    pub body: BodyKind,
}

/// Opens a stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Open {
    /// The new stream's id (odd when the relay opens it).
    pub stream: StreamId,
    /// The HTTP request to make.
    pub head: RequestHead,
    /// The connection definition to execute it with, as JSON ([`crate::model::ConnectionSpec`]).
    /// JSON, not bincode, so the connection model can grow without a protocol version.
    pub spec: Bytes,
}

/// A stream's response head.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Response {
    /// The stream answered.
    pub stream: StreamId,
    /// Status code (RFC 9110 §15).
    pub status: u16,
    /// End-to-end header fields from the upstream.
    pub headers: Vec<HeaderField>,
    /// How the response body is framed.
    pub body: BodyKind,
}

/// Aborts a stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reset {
    /// The stream aborted.
    pub stream: StreamId,
    /// Why, as a stable code.
    pub code: ResetCode,
    /// Human detail; never contains secrets.
    pub message: String,
}

/// Why a stream was reset. Variant order is wire format: append only.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ResetCode {
    /// The other side no longer wants the stream (the client went away).
    Cancel,
    /// The receiver refused the stream before doing anything (draining, or too many streams);
    /// safe to retry elsewhere.
    Refused,
    /// An internal error at the sender.
    Internal,
    /// The peer broke flow control or stream rules for this stream.
    ProtocolError,
    /// The destination is not on the agent's allow-list (or not allowed for the relay).
    DestinationNotAllowed,
    /// The upstream host name did not resolve.
    Dns,
    /// The TCP connection to the upstream failed.
    Connect,
    /// The TLS handshake with the upstream failed.
    Tls,
    /// The upstream did not answer in time.
    Timeout,
    /// The upstream broke HTTP (malformed response, connection dropped mid-body).
    UpstreamProtocol,
    /// The request or connection definition could not be executed as given.
    InvalidRequest,
    /// The tunnel connection was lost while the stream was in flight.
    ConnectionLost,
    /// The request body could not be read from the client.
    RequestBody,
}

impl ResetCode {
    /// Stable snake_case name, used as the problem `type` suffix and in logs.
    pub fn as_str(self) -> &'static str {
        match self {
            ResetCode::Cancel => "cancelled",
            ResetCode::Refused => "refused",
            ResetCode::Internal => "internal",
            ResetCode::ProtocolError => "protocol_error",
            ResetCode::DestinationNotAllowed => "destination_not_allowed",
            ResetCode::Dns => "dns",
            ResetCode::Connect => "connect",
            ResetCode::Tls => "tls",
            ResetCode::Timeout => "timeout",
            ResetCode::UpstreamProtocol => "upstream_protocol",
            ResetCode::InvalidRequest => "invalid_request",
            ResetCode::ConnectionLost => "connection_lost",
            ResetCode::RequestBody => "request_body",
        }
    }
}

impl Frame {
    /// The stream a frame belongs to, if it is a stream frame.
    pub fn stream(&self) -> Option<StreamId> {
        match self {
            Frame::Open(o) => Some(o.stream),
            Frame::Response(r) => Some(r.stream),
            Frame::Data { stream, .. } | Frame::End { stream } | Frame::Credit { stream, .. } => {
                Some(*stream)
            }
            Frame::Reset(r) => Some(r.stream),
            Frame::Hello(_) | Frame::Welcome(_) | Frame::Reject(_) | Frame::GoAway { .. } => None,
        }
    }

    /// Short name of the variant, for logs and errors.
    pub fn kind(&self) -> &'static str {
        match self {
            Frame::Hello(_) => "Hello",
            Frame::Welcome(_) => "Welcome",
            Frame::Reject(_) => "Reject",
            Frame::Open(_) => "Open",
            Frame::Response(_) => "Response",
            Frame::Data { .. } => "Data",
            Frame::End { .. } => "End",
            Frame::Reset(_) => "Reset",
            Frame::Credit { .. } => "Credit",
            Frame::GoAway { .. } => "GoAway",
        }
    }
}

/// Why bytes could not be decoded into a [`Frame`]. Always the peer's fault.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    /// The message is larger than the negotiated maximum frame size (RFC 6455 close 1009).
    #[error("frame of {size} bytes exceeds the maximum frame size of {max} bytes")]
    TooLarge {
        /// Bytes received.
        size: usize,
        /// Bytes allowed.
        max: usize,
    },
    /// The bytes are not a valid frame (RFC 6455 close 1002).
    #[error("malformed frame: {0}")]
    Malformed(String),
    /// Bytes were left after one complete frame (RFC 6455 close 1002).
    #[error("malformed frame: {0} trailing bytes after the frame")]
    TrailingBytes(usize),
}

/// Why a frame could not be encoded. Only a local bug or an oversized frame.
#[derive(Debug, thiserror::Error)]
pub enum EncodeError {
    /// The encoded frame would exceed the maximum frame size.
    #[error("frame of {size} bytes exceeds the maximum frame size of {max} bytes")]
    TooLarge {
        /// Encoded bytes.
        size: usize,
        /// Bytes allowed.
        max: usize,
    },
    /// bincode refused the value.
    #[error("frame could not be encoded: {0}")]
    Bincode(String),
}

type Config = bincode::config::Configuration<
    bincode::config::LittleEndian,
    bincode::config::Varint,
    bincode::config::Limit<MAX_FRAME_SIZE_LIMIT>,
>;

fn config() -> Config {
    bincode::config::standard().with_limit::<MAX_FRAME_SIZE_LIMIT>()
}

/// Variant index of [`Frame::Data`] on the wire (its position in the enum).
const DATA_VARIANT: u32 = 5;

/// Encodes one frame into the bytes of one WebSocket binary message.
///
/// `Data` frames take a fast path that writes the same bytes bincode would (variant, stream id,
/// length, payload) with one exact allocation.
///
/// # Errors
/// [`EncodeError::TooLarge`] when the result exceeds `max_frame_size` bytes.
pub fn encode(frame: &Frame, max_frame_size: usize) -> Result<Bytes, EncodeError> {
    let bytes = match frame {
        Frame::Data { stream, data } => {
            let mut header = [0u8; 16];
            let n = bincode::serde::encode_into_slice(
                (DATA_VARIANT, stream.0, data.len() as u64),
                &mut header,
                config(),
            )
            .map_err(|e| EncodeError::Bincode(e.to_string()))?;
            let mut buf = BytesMut::with_capacity(n + data.len());
            buf.put_slice(&header[..n]);
            buf.put_slice(data);
            buf.freeze()
        }
        other => {
            // Sized up front: growing from empty cost several reallocations per head frame.
            let mut buf = Vec::with_capacity(encoded_size_hint(other));
            bincode::serde::encode_into_std_write(other, &mut buf, config())
                .map_err(|e| EncodeError::Bincode(e.to_string()))?;
            Bytes::from(buf)
        }
    };
    if bytes.len() > max_frame_size {
        return Err(EncodeError::TooLarge {
            size: bytes.len(),
            max: max_frame_size,
        });
    }
    Ok(bytes)
}

/// An upper estimate of a frame's encoded size, bytes: its variable-length parts plus 10 bytes
/// per length prefix or integer (a varint is at most 9 bytes for a `u64`) and a fixed margin.
fn encoded_size_hint(frame: &Frame) -> usize {
    fn fields(h: &[HeaderField]) -> usize {
        h.iter().map(|(n, v)| n.len() + v.len() + 20).sum::<usize>() + 10
    }
    64 + match frame {
        Frame::Open(o) => {
            o.head.method.len() + o.head.target.len() + fields(&o.head.headers) + o.spec.len() + 40
        }
        Frame::Response(r) => fields(&r.headers),
        Frame::Reset(r) => r.message.len(),
        Frame::GoAway { reason } => reason.len(),
        _ => 64,
    }
}

/// Decodes the bytes of one WebSocket binary message into a frame.
///
/// The size is checked before any decoding, and bincode runs under a
/// [`MAX_FRAME_SIZE_LIMIT`] limit, so a lying length prefix is an error, not an allocation.
/// `Data` payloads are slices of `bytes` (no copy).
///
/// # Errors
/// [`DecodeError::TooLarge`] when `bytes` exceeds `max_frame_size`; [`DecodeError::Malformed`]
/// or [`DecodeError::TrailingBytes`] when they are not exactly one valid frame.
pub fn decode(bytes: &Bytes, max_frame_size: usize) -> Result<Frame, DecodeError> {
    if bytes.len() > max_frame_size {
        return Err(DecodeError::TooLarge {
            size: bytes.len(),
            max: max_frame_size,
        });
    }
    // One dispatch on the variant. Head frames are decoded borrowing from `bytes`, so header
    // values and the spec become slices of the message instead of one copy each; `Data` takes
    // the fast path; every other frame the generic decoder.
    let variant = bincode::serde::decode_from_slice::<u32, _>(bytes, config()).map(|(v, _)| v);
    match variant {
        Ok(OPEN_VARIANT) => {
            let ((_, open), used) =
                bincode::serde::borrow_decode_from_slice::<(u32, OpenRef<'_>), _>(bytes, config())
                    .map_err(|e| DecodeError::Malformed(e.to_string()))?;
            check_used(bytes, used)?;
            return Ok(Frame::Open(Open {
                stream: open.stream,
                head: RequestHead {
                    method: open.head.method.to_string(),
                    target: open.head.target.to_string(),
                    headers: owned_fields(bytes, &open.head.headers),
                    body: open.head.body,
                },
                spec: bytes.slice_ref(open.spec),
            }));
        }
        Ok(RESPONSE_VARIANT) => {
            let ((_, resp), used) = bincode::serde::borrow_decode_from_slice::<
                (u32, ResponseRef<'_>),
                _,
            >(bytes, config())
            .map_err(|e| DecodeError::Malformed(e.to_string()))?;
            check_used(bytes, used)?;
            return Ok(Frame::Response(Response {
                stream: resp.stream,
                status: resp.status,
                headers: owned_fields(bytes, &resp.headers),
                body: resp.body,
            }));
        }
        // Fast path for the hot frame: read the header with bincode, slice the payload.
        Ok(DATA_VARIANT) => {
            if let Ok(((_, stream, len), header)) =
                bincode::serde::decode_from_slice::<(u32, u32, u64), _>(bytes, config())
            {
                let rest = bytes.len() - header;
                let len = usize::try_from(len).unwrap_or(usize::MAX);
                if len > rest {
                    return Err(DecodeError::Malformed(format!(
                        "Data frame declares {len} bytes but carries {rest}"
                    )));
                }
                if len < rest {
                    return Err(DecodeError::TrailingBytes(rest - len));
                }
                return Ok(Frame::Data {
                    stream: StreamId(stream),
                    data: bytes.slice(header..),
                });
            }
        }
        _ => {}
    }
    let (frame, used) = bincode::serde::decode_from_slice::<Frame, _>(bytes, config())
        .map_err(|e| DecodeError::Malformed(e.to_string()))?;
    check_used(bytes, used)?;
    Ok(frame)
}

fn check_used(bytes: &Bytes, used: usize) -> Result<(), DecodeError> {
    if used != bytes.len() {
        return Err(DecodeError::TrailingBytes(bytes.len() - used));
    }
    Ok(())
}

/// Variant indexes of [`Frame::Open`] and [`Frame::Response`] on the wire.
const OPEN_VARIANT: u32 = 3;
const RESPONSE_VARIANT: u32 = 4;

/// [`RequestHead`] as it lies in a message: the same fields in the same order, borrowed.
#[derive(Deserialize)]
struct RequestHeadRef<'a> {
    method: &'a str,
    target: &'a str,
    #[serde(borrow)]
    headers: Vec<(&'a str, &'a [u8])>,
    body: BodyKind,
}

/// [`Open`], borrowed.
#[derive(Deserialize)]
struct OpenRef<'a> {
    stream: StreamId,
    #[serde(borrow)]
    head: RequestHeadRef<'a>,
    spec: &'a [u8],
}

/// [`Response`], borrowed.
#[derive(Deserialize)]
struct ResponseRef<'a> {
    stream: StreamId,
    status: u16,
    #[serde(borrow)]
    headers: Vec<(&'a str, &'a [u8])>,
    body: BodyKind,
}

/// Header fields whose values are slices of `bytes` (which `fields` borrow from).
fn owned_fields(bytes: &Bytes, fields: &[(&str, &[u8])]) -> Vec<HeaderField> {
    fields
        .iter()
        .map(|(n, v)| ((*n).to_string(), bytes.slice_ref(v)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn roundtrip(frame: &Frame) -> Frame {
        let bytes = encode(frame, MAX_FRAME_SIZE_LIMIT).expect("encode");
        decode(&bytes, MAX_FRAME_SIZE_LIMIT).expect("decode")
    }

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Pins the wire format. If one of these changes, old agents break: add a protocol version.
    #[test]
    fn golden_bytes() {
        let cases: Vec<(Frame, &str)> = vec![
            (
                Frame::Hello(Hello {
                    versions: vec![1],
                    agent_version: "0.1.0".into(),
                    agent_id: "a".into(),
                    hostname: "h".into(),
                }),
                "00010105302e312e3001610168",
            ),
            (
                Frame::Welcome(Welcome {
                    version: 1,
                    session_id: "s".into(),
                    heartbeat_ms: 15000,
                    initial_window: 1 << 20,
                    connection_window: 1 << 24,
                    max_frame_size: 1 << 20,
                    max_concurrent_streams: 512,
                }),
                "01010173fb983afc00001000fc00000001fc00001000fb0002",
            ),
            (
                Frame::Reject(Reject {
                    reason: "no".into(),
                }),
                "02026e6f",
            ),
            (
                Frame::Open(Open {
                    stream: StreamId(1),
                    head: RequestHead {
                        method: "GET".into(),
                        target: "/x?y=1".into(),
                        headers: vec![("accept".into(), Bytes::from_static(b"*/*"))],
                        body: BodyKind::Empty,
                    },
                    spec: Bytes::from_static(b"{}"),
                }),
                "030103474554062f783f793d310106616363657074032a2f2a00027b7d",
            ),
            (
                Frame::Response(Response {
                    stream: StreamId(1),
                    status: 200,
                    headers: vec![],
                    body: BodyKind::Length(5),
                }),
                "0401c8000105",
            ),
            (
                Frame::Data {
                    stream: StreamId(3),
                    data: Bytes::from_static(b"hi"),
                },
                "0503026869",
            ),
            (
                Frame::End {
                    stream: StreamId(3),
                },
                "0603",
            ),
            (
                Frame::Reset(Reset {
                    stream: StreamId(3),
                    code: ResetCode::Timeout,
                    message: "t".into(),
                }),
                "0703080174",
            ),
            (
                Frame::Credit {
                    stream: StreamId(0),
                    bytes: 65536,
                },
                "0800fc00000100",
            ),
            (
                Frame::GoAway {
                    reason: "bye".into(),
                },
                "0903627965",
            ),
        ];
        for (frame, golden) in cases {
            let bytes = encode(&frame, MAX_FRAME_SIZE_LIMIT).unwrap();
            assert_eq!(hex(&bytes), golden, "wire bytes of {}", frame.kind());
            assert_eq!(roundtrip(&frame), frame);
        }
    }

    #[test]
    fn data_fast_path_matches_bincode() {
        let frame = Frame::Data {
            stream: StreamId(300),
            data: Bytes::from(vec![7u8; 70_000]),
        };
        let fast = encode(&frame, MAX_FRAME_SIZE_LIMIT).unwrap();
        let generic = bincode::serde::encode_to_vec(&frame, config()).unwrap();
        assert_eq!(&fast[..], &generic[..]);
        // And the generic decoder agrees with the fast one.
        let (slow, _) = bincode::serde::decode_from_slice::<Frame, _>(&fast, config()).unwrap();
        assert_eq!(slow, decode(&fast, MAX_FRAME_SIZE_LIMIT).unwrap());
    }

    #[test]
    fn oversized_is_refused_before_decoding() {
        let bytes = Bytes::from(vec![0u8; 1025]);
        assert_eq!(
            decode(&bytes, 1024),
            Err(DecodeError::TooLarge {
                size: 1025,
                max: 1024
            })
        );
        let frame = Frame::Data {
            stream: StreamId(1),
            data: Bytes::from(vec![0u8; 2000]),
        };
        assert!(matches!(
            encode(&frame, 1024),
            Err(EncodeError::TooLarge { .. })
        ));
    }

    #[test]
    fn lying_length_prefix_is_an_error_not_an_allocation() {
        // Hello whose versions Vec claims u64::MAX / 2 elements.
        let mut bytes = vec![0x00, 0xfd];
        bytes.extend_from_slice(&(u64::MAX / 2).to_le_bytes());
        let err = decode(&Bytes::from(bytes), MAX_FRAME_SIZE_LIMIT).unwrap_err();
        assert!(matches!(err, DecodeError::Malformed(_)), "{err:?}");
        // Data frame claiming more payload than it carries.
        let bytes = Bytes::from_static(&[0x05, 0x01, 0xfb, 0x00, 0x10, b'x']);
        assert!(matches!(
            decode(&bytes, MAX_FRAME_SIZE_LIMIT),
            Err(DecodeError::Malformed(_))
        ));
    }

    #[test]
    fn unknown_variant_trailing_and_empty_are_malformed() {
        assert!(matches!(
            decode(&Bytes::from_static(&[0x7f]), 1024),
            Err(DecodeError::Malformed(_))
        ));
        assert!(matches!(
            decode(&Bytes::new(), 1024),
            Err(DecodeError::Malformed(_))
        ));
        assert_eq!(
            decode(&Bytes::from_static(&[0x06, 0x03, 0x00]), 1024),
            Err(DecodeError::TrailingBytes(1))
        );
        assert_eq!(
            decode(&Bytes::from_static(&[0x05, 0x03, 0x01, b'a', b'b']), 1024),
            Err(DecodeError::TrailingBytes(1))
        );
    }

    fn arb_bytes() -> impl Strategy<Value = Bytes> {
        proptest::collection::vec(any::<u8>(), 0..300).prop_map(Bytes::from)
    }

    fn arb_headers() -> impl Strategy<Value = Vec<HeaderField>> {
        proptest::collection::vec((".{0,20}", arb_bytes()), 0..5)
    }

    fn arb_body() -> impl Strategy<Value = BodyKind> {
        prop_oneof![
            Just(BodyKind::Empty),
            any::<u64>().prop_map(BodyKind::Length),
            Just(BodyKind::Streamed),
        ]
    }

    fn arb_code() -> impl Strategy<Value = ResetCode> {
        prop_oneof![
            Just(ResetCode::Cancel),
            Just(ResetCode::Refused),
            Just(ResetCode::Internal),
            Just(ResetCode::ProtocolError),
            Just(ResetCode::DestinationNotAllowed),
            Just(ResetCode::Dns),
            Just(ResetCode::Connect),
            Just(ResetCode::Tls),
            Just(ResetCode::Timeout),
            Just(ResetCode::UpstreamProtocol),
            Just(ResetCode::InvalidRequest),
            Just(ResetCode::ConnectionLost),
            Just(ResetCode::RequestBody),
        ]
    }

    fn arb_frame() -> impl Strategy<Value = Frame> {
        let id = any::<u32>().prop_map(StreamId);
        prop_oneof![
            (
                proptest::collection::vec(any::<u16>(), 0..4),
                ".*",
                ".*",
                ".*"
            )
                .prop_map(|(versions, agent_version, agent_id, hostname)| {
                    Frame::Hello(Hello {
                        versions,
                        agent_version,
                        agent_id,
                        hostname,
                    })
                }),
            (any::<u16>(), ".*", any::<(u32, u32, u32, u32, u32)>()).prop_map(
                |(version, session_id, (a, b, c, d, e))| {
                    Frame::Welcome(Welcome {
                        version,
                        session_id,
                        heartbeat_ms: a,
                        initial_window: b,
                        connection_window: c,
                        max_frame_size: d,
                        max_concurrent_streams: e,
                    })
                }
            ),
            ".*".prop_map(|reason| Frame::Reject(Reject { reason })),
            (
                id.clone(),
                ".*",
                ".*",
                arb_headers(),
                arb_body(),
                arb_bytes()
            )
                .prop_map(|(stream, method, target, headers, body, spec)| {
                    Frame::Open(Open {
                        stream,
                        head: RequestHead {
                            method,
                            target,
                            headers,
                            body,
                        },
                        spec,
                    })
                }),
            (id.clone(), any::<u16>(), arb_headers(), arb_body()).prop_map(
                |(stream, status, headers, body)| {
                    Frame::Response(Response {
                        stream,
                        status,
                        headers,
                        body,
                    })
                }
            ),
            (id.clone(), arb_bytes()).prop_map(|(stream, data)| Frame::Data { stream, data }),
            id.clone().prop_map(|stream| Frame::End { stream }),
            (id.clone(), arb_code(), ".*").prop_map(|(stream, code, message)| {
                Frame::Reset(Reset {
                    stream,
                    code,
                    message,
                })
            }),
            (id, any::<u32>()).prop_map(|(stream, bytes)| Frame::Credit { stream, bytes }),
            ".*".prop_map(|reason| Frame::GoAway { reason }),
        ]
    }

    proptest! {
        #[test]
        fn every_frame_roundtrips(frame in arb_frame()) {
            prop_assert_eq!(roundtrip(&frame), frame);
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode(&Bytes::from(bytes), 4096);
        }

        #[test]
        fn truncated_frames_are_errors(frame in arb_frame(), cut in 1usize..64) {
            let bytes = encode(&frame, MAX_FRAME_SIZE_LIMIT).unwrap();
            if cut < bytes.len() {
                let short = bytes.slice(..bytes.len() - cut);
                prop_assert!(decode(&short, MAX_FRAME_SIZE_LIMIT).is_err());
            }
        }
    }
}
