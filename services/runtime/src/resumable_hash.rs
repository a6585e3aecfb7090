//! SHA-256 that can stop and go on later, in another process: [`ResumableSha256`] serialises
//! its midstate (the eight state words, the number of bytes hashed and the bytes of the block
//! begun) to at most [`MAX_MIDSTATE`] bytes. A receiver of a file sent in chunks records it
//! beside what it stored, and after a break hashes only the bytes stored since, instead of
//! reading the whole file again within a call's time limit.
//!
//! Built on the compression function of the `sha2` crate ([`sha2::compress256`]), so it hashes
//! as fast as [`sha2::Sha256`] on the same machine; the padding is FIPS 180-4's.

use sha2::digest::generic_array::GenericArray;
use sha2::digest::typenum::U64;

/// Bytes of one SHA-256 block.
const BLOCK: usize = 64;
/// Blocks copied into aligned form per call of the compression function: its multi-block
/// loop keeps the state in registers, and the copy of 4 KiB costs little beside hashing it.
const BATCH: usize = 64;
/// The initial hash value (FIPS 180-4, 5.3.3).
const H0: [u32; 8] = [
    0x6a09_e667,
    0xbb67_ae85,
    0x3c6e_f372,
    0xa54f_f53a,
    0x510e_527f,
    0x9b05_688c,
    0x1f83_d9ab,
    0x5be0_cd19,
];
/// Version byte leading a serialised midstate.
const VERSION: u8 = 1;
/// Version, state words and byte count: what every serialised midstate holds before the
/// bytes of the block begun.
const FIXED: usize = 1 + 32 + 8;
/// The longest serialised midstate ([`ResumableSha256::midstate`]).
pub const MAX_MIDSTATE: usize = FIXED + BLOCK - 1;

/// A SHA-256 computation whose progress can be saved ([`ResumableSha256::midstate`]) and taken
/// up again ([`ResumableSha256::resume`]).
#[derive(Clone)]
pub struct ResumableSha256 {
    state: [u32; 8],
    /// Bytes hashed in all, those waiting in `pending` included.
    len: u64,
    /// The block begun: its first `len % 64` bytes.
    pending: [u8; BLOCK],
}

impl Default for ResumableSha256 {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for ResumableSha256 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResumableSha256")
            .field("len", &self.len)
            .finish_non_exhaustive()
    }
}

impl ResumableSha256 {
    /// A computation over no bytes yet.
    pub fn new() -> Self {
        Self {
            state: H0,
            len: 0,
            pending: [0; BLOCK],
        }
    }

    /// How many bytes were hashed.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether no byte was hashed.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Hashes `data` after what was hashed.
    pub fn update(&mut self, mut data: &[u8]) {
        let have = self.pending_len();
        // Wrapping: 2^64 bytes are beyond any file, and SHA-256 counts only 2^61.
        self.len = self.len.wrapping_add(data.len() as u64);
        if have > 0 {
            let take = (BLOCK - have).min(data.len());
            self.pending[have..have + take].copy_from_slice(&data[..take]);
            data = &data[take..];
            if have + take < BLOCK {
                return;
            }
            sha2::compress256(
                &mut self.state,
                &[GenericArray::clone_from_slice(&self.pending)],
            );
        }
        let whole = data.len() / BLOCK * BLOCK;
        let (blocks, rest) = data.split_at(whole);
        let mut batch = [GenericArray::<u8, U64>::default(); BATCH];
        for group in blocks.chunks(BATCH * BLOCK) {
            let n = group.len() / BLOCK;
            for (to, from) in batch.iter_mut().zip(group.chunks_exact(BLOCK)) {
                to.copy_from_slice(from);
            }
            sha2::compress256(&mut self.state, &batch[..n]);
        }
        self.pending[..rest.len()].copy_from_slice(rest);
    }

    /// The digest of everything hashed.
    pub fn finalize(mut self) -> [u8; 32] {
        let have = self.pending_len();
        let bits = self.len.wrapping_mul(8);
        self.pending[have] = 0x80;
        self.pending[have + 1..].fill(0);
        if have + 1 > BLOCK - 8 {
            sha2::compress256(
                &mut self.state,
                &[GenericArray::clone_from_slice(&self.pending)],
            );
            self.pending = [0; BLOCK];
        }
        self.pending[BLOCK - 8..].copy_from_slice(&bits.to_be_bytes());
        sha2::compress256(
            &mut self.state,
            &[GenericArray::clone_from_slice(&self.pending)],
        );
        let mut out = [0u8; 32];
        for (o, w) in out.chunks_exact_mut(4).zip(self.state) {
            o.copy_from_slice(&w.to_be_bytes());
        }
        out
    }

    /// The progress so far, serialised: a version byte, the state words and the byte count
    /// (big-endian), then the bytes of the block begun; 41 to [`MAX_MIDSTATE`] bytes.
    pub fn midstate(&self) -> Vec<u8> {
        let have = self.pending_len();
        let mut out = Vec::with_capacity(FIXED + have);
        out.push(VERSION);
        for w in self.state {
            out.extend_from_slice(&w.to_be_bytes());
        }
        out.extend_from_slice(&self.len.to_be_bytes());
        out.extend_from_slice(&self.pending[..have]);
        out
    }

    /// Takes up the computation [`ResumableSha256::midstate`] saved; `None` for bytes that are
    /// not one (another version, a length that disagrees with its byte count).
    pub fn resume(midstate: &[u8]) -> Option<Self> {
        let (&version, rest) = midstate.split_first()?;
        if version != VERSION || rest.len() < FIXED - 1 {
            return None;
        }
        let (words, rest) = rest.split_at(32);
        let (len, pending) = rest.split_at(8);
        let len = u64::from_be_bytes(len.try_into().ok()?);
        if pending.len() as u64 != len % BLOCK as u64 {
            return None;
        }
        let mut state = [0u32; 8];
        for (s, w) in state.iter_mut().zip(words.chunks_exact(4)) {
            *s = u32::from_be_bytes(w.try_into().ok()?);
        }
        let mut hasher = Self {
            state,
            len,
            pending: [0; BLOCK],
        };
        hasher.pending[..pending.len()].copy_from_slice(pending);
        Some(hasher)
    }

    fn pending_len(&self) -> usize {
        (self.len % BLOCK as u64) as usize
    }
}

#[cfg(test)]
mod tests {
    use sha2::{Digest, Sha256};

    use super::*;

    fn data(len: usize, seed: u64) -> Vec<u8> {
        let mut rng = fastrand::Rng::with_seed(seed);
        (0..len).map(|_| rng.u8(..)).collect()
    }

    #[test]
    fn known_answers() {
        let hex = |d: &[u8]| {
            let mut h = ResumableSha256::new();
            h.update(d);
            hex::encode(h.finalize())
        };
        assert_eq!(
            hex(b""),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert_eq!(
            hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(
            hex(b"abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq"),
            "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1"
        );
    }

    /// Every length around the padding's edges (55, 56, 63, 64 bytes into a block), hashed
    /// in one piece, equals `sha2`'s digest.
    #[test]
    fn every_length_near_a_block_matches_sha2() {
        let all = data(3 * BLOCK + 1, 1);
        for len in 0..all.len() {
            let mut h = ResumableSha256::new();
            h.update(&all[..len]);
            assert_eq!(h.len(), len as u64);
            assert_eq!(
                h.finalize(),
                <[u8; 32]>::from(Sha256::digest(&all[..len])),
                "{len}"
            );
        }
    }

    /// Random files cut into random pieces (single bytes to several batches), saved and taken
    /// up again at random points, digest as `sha2` does, and a midstate is never longer than
    /// [`MAX_MIDSTATE`].
    #[test]
    fn random_splits_and_resumptions_match_sha2() {
        let mut rng = fastrand::Rng::with_seed(0x5eed);
        for round in 0..300 {
            let len = match round % 3 {
                0 => rng.usize(..200),
                1 => rng.usize(..5_000),
                _ => rng.usize(..3 * BATCH * BLOCK + 100),
            };
            let all = data(len, round);
            let mut h = ResumableSha256::new();
            let mut at = 0;
            while at < len {
                let piece = match rng.u8(..4) {
                    0 => rng.usize(1..=2),
                    1 => rng.usize(1..=BLOCK + 1),
                    2 => rng.usize(1..=1_000),
                    _ => rng.usize(1..=2 * BATCH * BLOCK),
                };
                let end = (at + piece).min(len);
                h.update(&all[at..end]);
                at = end;
                if rng.bool() {
                    let saved = h.midstate();
                    assert!(saved.len() <= MAX_MIDSTATE, "{}", saved.len());
                    h = ResumableSha256::resume(&saved).expect("a midstate it wrote");
                    assert_eq!(h.len(), at as u64);
                }
            }
            let expected = <[u8; 32]>::from(Sha256::digest(&all));
            assert_eq!(h.finalize(), expected, "round {round}, {len} bytes");
        }
    }

    #[test]
    fn bytes_that_are_no_midstate_are_refused() {
        let mut h = ResumableSha256::new();
        h.update(b"hello");
        let saved = h.midstate();
        assert_eq!(saved.len(), FIXED + 5);
        assert!(ResumableSha256::resume(&saved).is_some());
        assert!(ResumableSha256::resume(&saved[..saved.len() - 1]).is_none());
        assert!(ResumableSha256::resume(&[saved.as_slice(), b"x"].concat()).is_none());
        let mut other = saved.clone();
        other[0] = 2;
        assert!(ResumableSha256::resume(&other).is_none());
        assert!(ResumableSha256::resume(&[]).is_none());
        assert!(ResumableSha256::resume(&saved[..FIXED - 1]).is_none());
    }
}
