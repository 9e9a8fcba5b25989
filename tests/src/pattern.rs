//! Deterministic pseudo-random bodies of any length, and their SHA-256 without materialising
//! them.
//!
//! The byte stream for a seed is the little-endian encoding of successive SplitMix64 outputs,
//! so byte *i* depends only on the seed and *i*: a 4 GiB body can be produced, streamed and
//! checked in constant memory. [`Upstream`](crate::Upstream)'s `/bytes/{n}?seed=S` and
//! `/stream/{n}?seed=S` serve exactly `pattern_bytes(n, S)`.

use bytes::Bytes;
use futures_util::Stream;
use sha2::{Digest as _, Sha256};

/// Size of the chunks [`pattern_stream`] yields and the upstream writes: 64 KiB.
pub const CHUNK_SIZE: usize = 64 * 1024;

/// The generator behind the pattern: yields the byte stream for one seed, in any slice sizes.
#[derive(Clone, Debug)]
pub struct PatternReader {
    state: u64,
    word: [u8; 8],
    /// Bytes of `word` already handed out (8 = none left).
    used: usize,
}

impl PatternReader {
    /// The stream for `seed`, from its first byte.
    pub fn new(seed: u64) -> PatternReader {
        PatternReader {
            state: seed,
            word: [0; 8],
            used: 8,
        }
    }

    fn next_word(&mut self) -> [u8; 8] {
        // SplitMix64 (Steele, Lea, Flood 2014).
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        (z ^ (z >> 31)).to_le_bytes()
    }

    /// Fills `out` with the next `out.len()` bytes of the stream.
    pub fn fill(&mut self, out: &mut [u8]) {
        let mut out = out;
        // Finish a partly used word first.
        while self.used < 8 && !out.is_empty() {
            out[0] = self.word[self.used];
            self.used += 1;
            out = &mut out[1..];
        }
        let mut words = out.chunks_exact_mut(8);
        for chunk in &mut words {
            chunk.copy_from_slice(&self.next_word());
        }
        let rest = words.into_remainder();
        if !rest.is_empty() {
            self.word = self.next_word();
            let n = rest.len();
            rest.copy_from_slice(&self.word[..n]);
            self.used = n;
        }
    }

    /// The next `len` bytes as one buffer.
    pub fn take(&mut self, len: usize) -> Bytes {
        let mut buf = vec![0; len];
        self.fill(&mut buf);
        Bytes::from(buf)
    }
}

/// The first `len` bytes for `seed` in one buffer (for small bodies).
pub fn pattern_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut buf = vec![0; len];
    PatternReader::new(seed).fill(&mut buf);
    buf
}

/// Lowercase hex SHA-256 of `pattern_bytes(len, seed)`, computed in [`CHUNK_SIZE`] pieces.
pub fn pattern_sha256(len: u64, seed: u64) -> String {
    let mut reader = PatternReader::new(seed);
    let mut hasher = Sha256::new();
    let mut buf = vec![0; CHUNK_SIZE];
    let mut remaining = len;
    while remaining > 0 {
        let n = usize::try_from(remaining).map_or(CHUNK_SIZE, |r| r.min(CHUNK_SIZE));
        reader.fill(&mut buf[..n]);
        hasher.update(&buf[..n]);
        remaining -= n as u64;
    }
    hex::encode(hasher.finalize())
}

/// `pattern_bytes(len, seed)` as a stream of [`CHUNK_SIZE`] chunks, e.g. for an upload:
/// `reqwest::Body::wrap_stream(pattern_stream(n, seed))` (sent chunked, no Content-Length).
pub fn pattern_stream(
    len: u64,
    seed: u64,
) -> impl Stream<Item = Result<Bytes, std::io::Error>> + Send + Sync + 'static {
    futures_util::stream::unfold(
        (PatternReader::new(seed), len),
        |(mut reader, remaining)| async move {
            if remaining == 0 {
                return None;
            }
            let n = usize::try_from(remaining).map_or(CHUNK_SIZE, |r| r.min(CHUNK_SIZE));
            let chunk = reader.take(n);
            Some((Ok(chunk), (reader, remaining - n as u64)))
        },
    )
}

/// Lowercase hex SHA-256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::StreamExt as _;

    #[test]
    fn any_slicing_gives_the_same_bytes() {
        let whole = pattern_bytes(1000, 7);
        let mut reader = PatternReader::new(7);
        let mut pieces = Vec::new();
        for size in [1, 3, 8, 13, 64, 5, 906] {
            pieces.extend_from_slice(&reader.take(size));
        }
        assert_eq!(pieces, whole);
        assert_ne!(pattern_bytes(1000, 8), whole);
    }

    #[test]
    fn sha256_helper_matches_materialised_bytes() {
        for len in [0, 1, 7, 65_536, 65_537, 300_001] {
            assert_eq!(
                pattern_sha256(len, 42),
                sha256_hex(&pattern_bytes(len as usize, 42))
            );
        }
    }

    #[tokio::test]
    async fn stream_yields_the_pattern_in_chunks() {
        let chunks: Vec<Bytes> = pattern_stream(150_000, 3)
            .map(|c| c.unwrap())
            .collect()
            .await;
        assert_eq!(
            chunks.iter().map(Bytes::len).collect::<Vec<_>>(),
            [65_536, 65_536, 18_928]
        );
        assert_eq!(chunks.concat(), pattern_bytes(150_000, 3));
    }
}
