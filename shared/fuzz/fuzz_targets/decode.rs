//! Fuzzes `airlock_shared::proto::decode` with arbitrary peer bytes.
//!
//! Properties:
//! - `decode` never panics, whatever the bytes;
//! - a frame it accepts re-encodes, and the re-encoding decodes to the same frame;
//! - the re-encoding is no longer than the input (bincode's varint encoding is canonical,
//!   so a re-encoding can only drop non-canonical padding, never add bytes).
#![no_main]

use airlock_shared::proto::{decode, encode, MAX_FRAME_SIZE_LIMIT};
use bytes::Bytes;
use libfuzzer_sys::fuzz_target;

/// The limit the relay applies before the handshake; seeds and inputs stay well under it.
const MAX: usize = 64 * 1024;

fuzz_target!(|data: &[u8]| {
    let input = Bytes::copy_from_slice(data);
    let Ok(frame) = decode(&input, MAX) else {
        return;
    };
    let again = encode(&frame, MAX_FRAME_SIZE_LIMIT)
        .unwrap_or_else(|e| panic!("decoded {} frame does not re-encode: {e}", frame.kind()));
    assert!(
        again.len() <= data.len(),
        "re-encoding of a {} frame is longer than its input: {} > {} bytes",
        frame.kind(),
        again.len(),
        data.len()
    );
    let back = decode(&again, MAX_FRAME_SIZE_LIMIT)
        .unwrap_or_else(|e| panic!("re-encoded {} frame does not decode: {e}", frame.kind()));
    assert_eq!(back, frame, "round trip changed a {} frame", frame.kind());
});
