//! The tamper-evident audit trail: entry hashing and chain verification, shared by the
//! registry and the processor (which each append entries to a trail of their own) and
//! `dsrctl audit verify` (which checks either), so all agree on every byte that is hashed.
//!
//! Entries are numbered 1, 2, 3, … without gaps (`seq`), and each carries the hash of its
//! predecessor (`prev_hash`; [`GENESIS_HASH`] for entry 1) and its own [`Entry::compute_hash`].
//! Changing, removing, moving or inserting an entry therefore breaks the chain at a point that
//! [`verify`] names, together with what the evidence there shows was done ([`BreakKind`]):
//! where it fits more than one kind of tampering, the kind names them all.
//!
//! What a chain alone cannot show: someone able to write the store can append a well-formed
//! entry at the end, drop entries from the end, or rewrite every entry from some point on with
//! fresh hashes. Anchors catch the last two: hashes of entries known from outside the store,
//! which the verifier requires the trail to keep. One is the hash of the last entry printed
//! by an earlier verification ([`Verifier::anchor`], `dsrctl audit verify --anchor`); the
//! others are the service's signed checkpoints ([`checkpoint`], [`Verifier::checkpoints`]),
//! which it writes to a file the database cannot change.
//!
//! # Layout
//!
//! - this module: entries, their hash, and the [`Verifier`] of a trail and its anchors.
//! - [`checkpoint`]: signed checkpoints over the trail's head, their file, and checking them.
//! - [`signer`]: the worker that signs a service's head into its checkpoint file, and its
//!   `[audit]` configuration, which both services use.
//! - [`table`]: the `audit_log` table both services keep: appending and reading entries.
//!
//! # Hash
//!
//! `hash` is the lowercase hex SHA-256 of [`HASH_DOMAIN`] followed by, in this order, `seq`,
//! `occurred_at`, `request_id`, `event_type`, `actor`, `detail` and `prev_hash`, each written
//! as its length in bytes (8-byte big-endian unsigned) and then its bytes. Integers are 8-byte
//! big-endian (`seq` unsigned; `occurred_at` and `event_type` two's complement); text is UTF-8
//! as stored; `prev_hash` is its lowercase hex text.

pub mod checkpoint;
pub mod signer;
pub mod table;

use std::collections::BTreeMap;
use std::fmt;

use sha2::{Digest, Sha256};

/// The `prev_hash` of the first entry: 64 zeros.
pub const GENESIS_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// Prefix of every hashed encoding, so an entry hash can never equal a hash made for
/// anything else.
pub const HASH_DOMAIN: &[u8] = b"dsrelay.audit.v1";

/// Removals of up to this many entries followed by renumbering the rest are named as
/// removals; beyond that the first renumbered entry is reported as modified.
const MAX_RENUMBERING: u64 = 1024;

/// One audit entry, as stored and as `ListAuditEntries` returns it.
#[derive(Debug, Clone, PartialEq, Eq, Default, sqlx::FromRow)]
pub struct Entry {
    /// Position in the trail: 1 for the first entry, then each one more than the last.
    #[sqlx(try_from = "i64")]
    pub seq: u64,
    /// When the audited event happened (milliseconds since the Unix epoch).
    pub occurred_at: i64,
    /// The request concerned.
    pub request_id: String,
    /// What happened: the `EventType` value in the registry's trail, the
    /// `ProcessorAuditEvent` value in the processor's.
    pub event_type: i32,
    /// Who acted, where known (the registry's partner or processor; the processor's
    /// controller or operator); otherwise empty.
    pub actor: String,
    /// What happened, in words. Never contains a subject's identities; free text from
    /// outside the service (reasons, notes, errors) appears only as its keyed hash,
    /// `text hmac-sha256:<hex>` under the service's `identity_hash_key`, because an entry
    /// can never be changed once written, not even to forget.
    pub detail: String,
    /// The hash of the entry before, or [`GENESIS_HASH`].
    pub prev_hash: String,
    /// This entry's hash as stored.
    pub hash: String,
}

impl Entry {
    /// The hash this entry's fields give (see the module documentation); `self.hash` is not
    /// part of it.
    pub fn compute_hash(&self) -> String {
        self.hash_with_seq(self.seq)
    }

    fn hash_with_seq(&self, seq: u64) -> String {
        let mut h = Sha256::new();
        h.update(HASH_DOMAIN);
        let mut field = |bytes: &[u8]| {
            h.update((bytes.len() as u64).to_be_bytes());
            h.update(bytes);
        };
        field(&seq.to_be_bytes());
        field(&self.occurred_at.to_be_bytes());
        field(self.request_id.as_bytes());
        field(&i64::from(self.event_type).to_be_bytes());
        field(self.actor.as_bytes());
        field(self.detail.as_bytes());
        field(self.prev_hash.as_bytes());
        hex::encode(h.finalize())
    }
}

/// What was done to the trail where it breaks, as far as the evidence shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakKind {
    /// The entry's content (or its hash) was changed.
    Modified,
    /// The entry is not the one the service wrote at its place, and the chain cannot tell
    /// whether it was changed, moved there from another place (two entries swapped, say) or
    /// put in between: the entry after it names the entry before it as its predecessor, or
    /// its seq repeats or goes back.
    Misplaced,
    /// The entry is missing.
    Removed,
    /// The trail was rewritten with fresh hashes somewhere from this entry on, up to an
    /// entry whose anchored hash it no longer has.
    Rewritten,
}

impl BreakKind {
    /// `modified`, `modified, reordered or inserted`, `removed` or `rewritten`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Modified => "modified",
            Self::Misplaced => "modified, reordered or inserted",
            Self::Removed => "removed",
            Self::Rewritten => "rewritten",
        }
    }
}

impl fmt::Display for BreakKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The first place where the trail is not what the service wrote.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("audit trail broken at entry {seq}: {kind}: {detail}")]
pub struct ChainBreak {
    /// The entry concerned: the changed or misplaced one, the first missing one, or the first
    /// one a rewrite may have begun at.
    pub seq: u64,
    /// What was done to it.
    pub kind: BreakKind,
    /// Why verification concluded that, in words.
    pub detail: String,
}

/// A trail that verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Intact {
    /// How many entries were checked.
    pub entries: u64,
    /// The last entry's seq (0 for an empty trail).
    pub last_seq: u64,
    /// The last entry's hash ([`GENESIS_HASH`] for an empty trail): an anchor for later checks.
    pub last_hash: String,
    /// How many anchors (checkpoints and `--anchor`) the trail was found to keep.
    pub anchors: u64,
}

/// Checks a whole trail, oldest first, from entry 1.
pub fn verify(entries: &[Entry]) -> Result<Intact, ChainBreak> {
    let mut v = Verifier::new();
    for e in entries {
        v.push(e.clone())?;
    }
    v.finish()
}

/// Checks a trail entry by entry, so a long one need not be held in memory: [`push`] the
/// entries oldest first from entry 1, then [`finish`].
///
/// [`push`]: Verifier::push
/// [`finish`]: Verifier::finish
#[derive(Debug, Clone)]
pub struct Verifier {
    /// The last checked entry's (seq, hash); (0, genesis) before the first.
    prev: (u64, String),
    /// The hash of the entry before `prev`; `None` while `prev` is the genesis.
    before_prev: Option<String>,
    /// The entry pushed last, checked once its successor (or the end) is known.
    pending: Option<Entry>,
    /// Hashes the trail must keep, by seq.
    anchors: BTreeMap<u64, Anchor>,
    /// The seq of the last anchor found kept (0 before any): a rewrite found at the next
    /// anchor began after it.
    kept: u64,
    checked: u64,
}

/// A hash known from outside the store.
#[derive(Debug, Clone)]
struct Anchor {
    hash: String,
    /// What it came from, in words: `anchor` or `checkpoint N`.
    source: String,
}

impl Default for Verifier {
    fn default() -> Self {
        Self::new()
    }
}

impl Verifier {
    /// A verifier expecting entry 1 first.
    pub fn new() -> Self {
        Self {
            prev: (0, GENESIS_HASH.to_string()),
            before_prev: None,
            pending: None,
            anchors: BTreeMap::new(),
            kept: 0,
            checked: 0,
        }
    }

    /// Also requires entry `seq` to exist with exactly `hash` (from an earlier verification),
    /// which catches entries removed from the end and a trail rewritten up to that entry.
    pub fn anchor(mut self, seq: u64, hash: impl Into<String>) -> Self {
        self.add_anchor(seq, hash.into(), "anchor".into());
        self
    }

    /// Also requires the trail to keep every checkpoint's hash, checked signatures first
    /// ([`checkpoint::check`]); breaks name the checkpoint by its number in `checkpoints`
    /// (from 1), as [`checkpoint::check`] does.
    pub fn checkpoints(mut self, checkpoints: &[checkpoint::Checkpoint]) -> Self {
        for (i, c) in checkpoints.iter().enumerate() {
            self.add_anchor(c.seq, c.hash.clone(), format!("checkpoint {}", i + 1));
        }
        self
    }

    fn add_anchor(&mut self, seq: u64, hash: String, source: String) {
        // Two anchors on one entry: each must hold, so a differing second one stands in for
        // the first, which then fails at once against the entry the second one matches.
        let hash = hash.to_ascii_lowercase();
        match self.anchors.get(&seq) {
            Some(a) if a.hash != hash => {
                self.anchors.insert(
                    seq,
                    Anchor {
                        hash: String::new(),
                        source: format!("{} and {source} (which disagree)", a.source),
                    },
                );
            }
            Some(_) => {}
            None => {
                self.anchors.insert(seq, Anchor { hash, source });
            }
        }
    }

    /// Takes the next entry; fails at the first break found.
    pub fn push(&mut self, entry: Entry) -> Result<(), ChainBreak> {
        if let Some(p) = self.pending.take() {
            self.check(&p, Some(&entry))?;
        }
        self.pending = Some(entry);
        Ok(())
    }

    /// Checks the last entry and the anchor.
    pub fn finish(mut self) -> Result<Intact, ChainBreak> {
        if let Some(p) = self.pending.take() {
            self.check(&p, None)?;
        }
        let (last_seq, last_hash) = self.prev;
        if let Some((seq, a)) = self.anchors.range(last_seq + 1..).next_back() {
            // Fewer entries than an anchor vouches for: some entry the service wrote is gone
            // either way. Only when the last entry itself kept an anchor is the rest known to
            // be as written, and the end was cut; otherwise entries after the last anchor kept
            // may have been removed and the later ones renumbered and hashed again, which
            // leaves a trail as well-formed as a cut one.
            let detail = if self.kept == last_seq {
                format!(
                    "trail truncated: {} at seq {seq} but the store ends at {last_seq}",
                    a.source
                )
            } else {
                let from = self.kept + 1;
                let start = if from == last_seq {
                    format!("seq {from}")
                } else {
                    format!("a seq between {from} and {last_seq}")
                };
                format!(
                    "the trail does not match {} at seq {seq}, as the store ends at \
                     {last_seq}: entries were cut off its end, or rewritten from {start} on \
                     with some removed",
                    a.source
                )
            };
            return Err(ChainBreak {
                seq: last_seq + 1,
                kind: BreakKind::Removed,
                detail,
            });
        }
        Ok(Intact {
            entries: self.checked,
            last_seq,
            last_hash,
            anchors: self.anchors.len() as u64,
        })
    }

    fn check(&mut self, e: &Entry, next: Option<&Entry>) -> Result<(), ChainBreak> {
        let (pseq, phash) = (self.prev.0, self.prev.1.as_str());
        let brk = |seq: u64, kind: BreakKind, detail: String| ChainBreak { seq, kind, detail };
        if e.seq <= pseq {
            return Err(brk(
                e.seq,
                BreakKind::Misplaced,
                format!(
                    "entry {} follows entry {pseq}: seq repeated or out of order",
                    e.seq
                ),
            ));
        }
        let self_ok = e.compute_hash() == e.hash;
        let link_ok = e.prev_hash == phash;
        if e.seq > pseq + 1 {
            if link_ok && !self_ok {
                return Err(brk(
                    e.seq,
                    BreakKind::Modified,
                    format!(
                        "it follows entry {pseq} directly but its seq was changed, so its \
                         hash no longer matches"
                    ),
                ));
            }
            let missing = if e.seq == pseq + 2 {
                format!("entry {} is missing", pseq + 1)
            } else {
                format!("entries {} to {} are missing", pseq + 1, e.seq - 1)
            };
            return Err(brk(pseq + 1, BreakKind::Removed, missing));
        }
        if !(link_ok && self_ok) {
            // The entry after this one names our predecessor as its own: this one took the
            // place of the entry written there, put in between, moved there or changed; the
            // chain does not say which, though two entries that swapped places show it.
            if let Some(n) = next.filter(|n| n.prev_hash == phash) {
                let before = if pseq == 0 {
                    "the genesis hash".to_string()
                } else {
                    format!("entry {pseq}")
                };
                let swapped = e.prev_hash == n.hash
                    && e.seq
                        .checked_add(1)
                        .is_some_and(|s| e.hash_with_seq(s) == e.hash)
                    && n.hash_with_seq(e.seq) == n.hash;
                let detail = if swapped {
                    format!(
                        "entry {} names {before} as its predecessor and entry {} names \
                         entry {}, each one's hash fitting the other's seq: the two are in \
                         each other's places",
                        n.seq, e.seq, n.seq
                    )
                } else {
                    format!(
                        "entry {} names {before} as its predecessor, so entry {} is not the one \
                         written there: it was changed, moved there or put in between",
                        n.seq, e.seq
                    )
                };
                return Err(brk(e.seq, BreakKind::Misplaced, detail));
            }
            if link_ok {
                return Err(brk(
                    e.seq,
                    BreakKind::Modified,
                    "its content no longer matches its hash".into(),
                ));
            }
            // A well-formed entry before this one that this one does not name.
            if self.before_prev.as_deref() == Some(e.prev_hash.as_str()) {
                return Err(brk(
                    pseq,
                    BreakKind::Misplaced,
                    format!(
                        "entry {} names entry {} as its predecessor, so entry {pseq} is not the \
                         one written there: it was changed and hashed again, moved there or \
                         put in between",
                        e.seq,
                        pseq - 1
                    ),
                ));
            }
            if self_ok {
                return Err(if pseq == 0 {
                    brk(
                        e.seq,
                        BreakKind::Modified,
                        "the first entry does not start from the genesis hash".into(),
                    )
                } else {
                    brk(
                        pseq,
                        BreakKind::Modified,
                        format!(
                            "its hash is not the one entry {} recorded for it: it was changed \
                             and hashed again",
                            e.seq
                        ),
                    )
                });
            }
            // Neither its hash nor its link fit: were entries removed before it and the
            // rest renumbered down? Then its hash fits a larger seq.
            if let Some(d) = (1..=MAX_RENUMBERING).find(|d| {
                e.seq
                    .checked_add(*d)
                    .is_some_and(|s| e.hash_with_seq(s) == e.hash)
            }) {
                // Removed from their place, that is: moved further on would look the same
                // until the verifier reached them.
                let what = if d == 1 {
                    format!("entry {} was removed (or moved further on)", e.seq)
                } else {
                    format!(
                        "entries {} to {} were removed (or moved further on)",
                        e.seq,
                        e.seq + d - 1
                    )
                };
                return Err(brk(
                    e.seq,
                    BreakKind::Removed,
                    format!(
                        "{what} and the later entries renumbered (the entry now numbered {} \
                         was written as {})",
                        e.seq,
                        e.seq + d
                    ),
                ));
            }
            return Err(brk(
                e.seq,
                BreakKind::Modified,
                format!(
                    "neither its content nor its predecessor's hash match (it does not name \
                     entry {pseq})"
                ),
            ));
        }
        if let Some(a) = self.anchors.get(&e.seq) {
            if a.hash != e.hash {
                // The chain up to here is intact, so it was rewritten whole from some entry
                // after the last anchor it kept.
                let from = self.kept + 1;
                let start = if from == e.seq {
                    format!("seq {from}")
                } else {
                    format!("a seq between {from} and {}", e.seq)
                };
                return Err(brk(
                    from,
                    BreakKind::Rewritten,
                    format!(
                        "entries rewritten from {start}: {} at seq {} says {}, store says {}",
                        a.source, e.seq, a.hash, e.hash
                    ),
                ));
            }
            self.kept = e.seq;
        }
        self.before_prev = Some(std::mem::replace(&mut self.prev.1, e.hash.clone()));
        self.prev.0 = e.seq;
        self.checked += 1;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A well-formed trail of `n` entries.
    fn trail(n: u64) -> Vec<Entry> {
        let mut out: Vec<Entry> = Vec::new();
        for seq in 1..=n {
            let prev_hash = out
                .last()
                .map(|e| e.hash.clone())
                .unwrap_or_else(|| GENESIS_HASH.to_string());
            out.push(sealed(Entry {
                seq,
                occurred_at: 1_700_000_000_000 + seq as i64,
                request_id: format!("r-{}", seq / 2),
                event_type: (seq % 7) as i32 + 1,
                actor: "payroll-bureau".into(),
                detail: format!("event {seq}"),
                prev_hash,
                hash: String::new(),
            }));
        }
        out
    }

    fn sealed(mut e: Entry) -> Entry {
        e.hash = e.compute_hash();
        e
    }

    /// Rehashes entries from index `from` on, as someone covering their tracks would.
    fn rechain(entries: &mut [Entry], from: usize) {
        for i in from..entries.len() {
            if i > 0 {
                entries[i].prev_hash = entries[i - 1].hash.clone();
            }
            entries[i].hash = entries[i].compute_hash();
        }
    }

    fn at(entries: &[Entry]) -> (u64, BreakKind) {
        let (seq, kind, _) = broken(entries);
        (seq, kind)
    }

    fn broken(entries: &[Entry]) -> (u64, BreakKind, String) {
        let b = verify(entries).expect_err("the trail should be broken");
        (b.seq, b.kind, b.detail)
    }

    #[test]
    fn intact_and_empty_trails_verify() {
        let empty = verify(&[]).unwrap();
        assert_eq!(
            empty,
            Intact {
                entries: 0,
                last_seq: 0,
                last_hash: GENESIS_HASH.into(),
                anchors: 0,
            }
        );
        let t = trail(6);
        let ok = verify(&t).unwrap();
        assert_eq!((ok.entries, ok.last_seq), (6, 6));
        assert_eq!(ok.last_hash, t[5].hash);
        assert_eq!(GENESIS_HASH.len(), 64);
    }

    #[test]
    fn the_hash_covers_every_field_and_is_unambiguous() {
        let e = trail(1).remove(0);
        assert_eq!(e.hash.len(), 64);
        let variants = [
            Entry {
                seq: 2,
                ..e.clone()
            },
            Entry {
                occurred_at: 1,
                ..e.clone()
            },
            Entry {
                request_id: "x".into(),
                ..e.clone()
            },
            Entry {
                event_type: 99,
                ..e.clone()
            },
            Entry {
                actor: "x".into(),
                ..e.clone()
            },
            Entry {
                detail: "x".into(),
                ..e.clone()
            },
            Entry {
                prev_hash: "1".repeat(64),
                ..e.clone()
            },
        ];
        for v in variants {
            assert_ne!(v.compute_hash(), e.hash, "{v:?}");
        }
        // Moving bytes between adjacent text fields changes the hash (length prefixes).
        let a = Entry {
            actor: "ab".into(),
            detail: "c".into(),
            ..e.clone()
        };
        let b = Entry {
            actor: "a".into(),
            detail: "bc".into(),
            ..e.clone()
        };
        assert_ne!(a.compute_hash(), b.compute_hash());
        // The stored hash is not part of what is hashed.
        assert_eq!(
            Entry {
                hash: "x".into(),
                ..e.clone()
            }
            .compute_hash(),
            e.hash
        );
    }

    #[test]
    fn a_changed_entry_is_named_modified() {
        let mut t = trail(6);
        t[2].detail = "nothing happened".into();
        let (seq, kind, _) = broken(&t);
        assert_eq!((seq, kind), (3, BreakKind::Modified));

        // Changed and hashed again: its successor still names the old hash.
        let mut t = trail(6);
        t[2].detail = "nothing happened".into();
        t[2].hash = t[2].compute_hash();
        let (seq, kind, detail) = broken(&t);
        assert_eq!((seq, kind), (3, BreakKind::Modified), "{detail}");
        assert!(detail.contains("entry 4 recorded"), "{detail}");

        // The first and the last entry too.
        let mut t = trail(4);
        t[0].actor = "someone".into();
        assert_eq!(broken(&t).0, 1);
        let mut t = trail(4);
        t[3].occurred_at += 1;
        assert_eq!(at(&t), (4, BreakKind::Modified));
    }

    #[test]
    fn a_removed_entry_is_named_by_its_seq() {
        let mut t = trail(6);
        t.remove(2);
        let (seq, kind, detail) = broken(&t);
        assert_eq!((seq, kind), (3, BreakKind::Removed));
        assert_eq!(detail, "entry 3 is missing");

        let mut t = trail(6);
        t.drain(1..4);
        let (seq, kind, detail) = broken(&t);
        assert_eq!((seq, kind), (2, BreakKind::Removed));
        assert_eq!(detail, "entries 2 to 4 are missing");

        let mut t = trail(3);
        t.remove(0);
        assert_eq!(at(&t), (1, BreakKind::Removed));

        // Removed, and the later entries renumbered to close the gap.
        for (from, count) in [(2usize, 1usize), (0, 1), (1, 3)] {
            let mut t = trail(7);
            t.drain(from..from + count);
            for e in &mut t[from..] {
                e.seq -= count as u64;
            }
            let (seq, kind, detail) = broken(&t);
            assert_eq!(
                (seq, kind),
                (from as u64 + 1, BreakKind::Removed),
                "{detail}"
            );
            assert!(detail.contains("renumbered"), "{detail}");
        }
    }

    /// An entry the next one skips, as an insertion leaves it, is not called inserted: a
    /// swap or a changed entry moved there leave the same evidence.
    #[test]
    fn an_inserted_entry_is_named_misplaced() {
        // Put in between with a correct hash, the later entries renumbered up.
        for at in [0usize, 2, 5] {
            let mut t = trail(6);
            let forged = sealed(Entry {
                seq: at as u64 + 1,
                detail: "forged".into(),
                prev_hash: if at == 0 {
                    GENESIS_HASH.into()
                } else {
                    t[at - 1].hash.clone()
                },
                ..t[at].clone()
            });
            t.insert(at, forged);
            for e in &mut t[at + 1..] {
                e.seq += 1;
            }
            let (seq, kind, detail) = broken(&t);
            assert_eq!(
                (seq, kind),
                (at as u64 + 1, BreakKind::Misplaced),
                "{detail}"
            );
            assert!(
                detail.ends_with("it was changed and hashed again, moved there or put in between")
                    || detail.ends_with("it was changed, moved there or put in between"),
                "{detail}"
            );
        }

        // Put in between with a made-up hash.
        let mut t = trail(6);
        let forged = Entry {
            seq: 3,
            detail: "forged".into(),
            prev_hash: "f".repeat(64),
            hash: "e".repeat(64),
            ..t[2].clone()
        };
        t.insert(2, forged);
        for e in &mut t[3..] {
            e.seq += 1;
        }
        assert_eq!(at(&t), (3, BreakKind::Misplaced));

        // A repeated or out-of-order seq.
        let mut t = trail(4);
        t.insert(2, t[1].clone());
        assert_eq!(at(&t), (2, BreakKind::Misplaced));
        let mut t = trail(4);
        t.swap(1, 2);
        assert!(verify(&t).is_err());
    }

    /// Two adjacent entries that swapped places (their seqs swapped with them, as a listing by
    /// seq shows them) are named as such, not as an insertion.
    #[test]
    fn swapped_entries_are_not_called_inserted() {
        for at in [0usize, 3, 4] {
            let mut t = trail(6);
            t.swap(at, at + 1);
            t[at].seq = at as u64 + 1;
            t[at + 1].seq = at as u64 + 2;
            let b = verify(&t).unwrap_err();
            assert_eq!(
                (b.seq, b.kind),
                (at as u64 + 1, BreakKind::Misplaced),
                "{b}"
            );
            let before = match at {
                0 => "the genesis hash".to_string(),
                at => format!("entry {at}"),
            };
            assert_eq!(
                b.to_string(),
                format!(
                    "audit trail broken at entry {s}: modified, reordered or inserted: entry {n} \
                     names {before} as its predecessor and entry {s} names entry {n}, each \
                     one's hash fitting the other's seq: the two are in each other's places",
                    s = at + 1,
                    n = at + 2
                )
            );
            assert!(!b.to_string().contains("put in between"), "{b}");
        }
    }

    #[test]
    fn anchors_catch_truncation_and_rewriting() {
        let t = trail(5);
        let last = t[4].hash.clone();
        let anchored = |entries: &[Entry], seq: u64, hash: &str| {
            let mut v = Verifier::new().anchor(seq, hash);
            for e in entries {
                v.push(e.clone())?;
            }
            v.finish()
        };
        assert!(anchored(&t, 5, &last).is_ok());
        assert!(anchored(&t, 5, &last.to_ascii_uppercase()).is_ok());

        // Dropping the last entry leaves a valid chain, but not the anchored one.
        let b = anchored(&t[..4], 5, &last).unwrap_err();
        assert_eq!((b.seq, b.kind), (5, BreakKind::Removed));

        // Rewriting everything from entry 2 on leaves a valid chain, but not the anchored one.
        let mut t2 = t.clone();
        t2[1].detail = "rewritten".into();
        rechain(&mut t2, 1);
        assert!(verify(&t2).is_ok());
        let b = anchored(&t2, 5, &last).unwrap_err();
        assert_eq!((b.seq, b.kind), (1, BreakKind::Rewritten));
        assert_eq!(
            b.detail,
            format!(
                "entries rewritten from a seq between 1 and 5: anchor at seq 5 says {last}, \
                 store says {}",
                t2[4].hash
            )
        );
    }

    #[test]
    fn the_break_reads_well() {
        let mut t = trail(3);
        t.remove(1);
        assert_eq!(
            verify(&t).unwrap_err().to_string(),
            "audit trail broken at entry 2: removed: entry 2 is missing"
        );
    }
}
