//! Signed checkpoints: what a service's audit trail looked like at a moment, signed with a
//! key the database never holds, and kept in a file the database cannot change.
//!
//! Someone who can write the store can drop its triggers and rewrite the trail from any entry
//! on with fresh, valid hashes; the chain alone then still verifies. A checkpoint names the
//! head of the trail (`seq` and that entry's `hash`) when it was signed, so a trail rewritten
//! or cut at or before a checkpoint no longer matches it ([`super::Verifier::checkpoints`]).
//!
//! # Form
//!
//! A checkpoint is the canonical JSON (see [`crate::signing`]) of
//! `{"at": <ms>, "hash": "<hex>", "key_id": "sha256:<hex>", "seq": N, "service": "<name>"}`,
//! signed with Ed25519. The checkpoint file holds one [`Signed`] per line in its one-line
//! file form ([`Signed::to_json_line`]): `{"body": "<that JSON text>", "key_id": …,
//! "signature": "<base64>"}`. Lines are only ever appended, each made durable (fsync) before
//! the next is written; seqs strictly increase from line to line.
//!
//! # Key rotation
//!
//! Each checkpoint names the key that signed it (`key_id`), so a file whose service changed
//! its checkpoint key holds checkpoints of the old key followed by those of the new one.
//! [`check`] takes every key the checkpoints may have been signed with and checks each one
//! with the key its `key_id` names; [`signers`] says how many each key signed.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::signing::{to_canonical_json, PublicKey, Signed, SigningKey, VerifyError};

/// What a checkpoint states, as signed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Checkpoint {
    /// Whose trail: `registry` or `processor`.
    pub service: String,
    /// The last entry of the trail when it was signed.
    pub seq: u64,
    /// That entry's hash.
    pub hash: String,
    /// When it was signed (ms since the Unix epoch).
    pub at: i64,
    /// The id of the key that signed it, so a verifier holding several keys (after a
    /// rotation) knows which one checks it.
    pub key_id: String,
}

impl Checkpoint {
    /// Signs the head `(seq, hash)` of `service`'s trail at `at`.
    pub fn sign(
        service: &str,
        seq: u64,
        hash: &str,
        at: i64,
        key: &SigningKey,
    ) -> Result<(Self, Signed)> {
        let checkpoint = Self {
            service: service.to_string(),
            seq,
            hash: hash.to_string(),
            at,
            key_id: key.public_key().key_id(),
        };
        let signed = key.sign(to_canonical_json(&checkpoint)?);
        Ok((checkpoint, signed))
    }

    /// What `signed` states, without checking its signature: for the service reading back
    /// its own file, never for a verifier.
    pub fn read_unchecked(signed: &Signed) -> Result<Self> {
        serde_json::from_slice(&signed.body).context("not a checkpoint")
    }
}

/// Why a list of checkpoints was not accepted; each names the checkpoint by its line in the
/// file (or its place in the list), from 1.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CheckpointError {
    /// The line is not a signed document.
    #[error("checkpoint {0} unreadable: {1}")]
    Unreadable(usize, String),
    /// The signature does not check out with the key given.
    #[error("checkpoint {0} bad signature: {1}")]
    BadSignature(usize, VerifyError),
    /// Signed with a key none of the several keys given is: with one key given, this is
    /// [`CheckpointError::BadSignature`] with [`VerifyError::WrongKey`] instead.
    #[error(
        "checkpoint {index} bad signature: signed with key {found}, which is none of the keys \
         given ({})",
        given.join(", ")
    )]
    UnknownKey {
        /// The checkpoint's number.
        index: usize,
        /// The key id the checkpoint names.
        found: String,
        /// The ids of the keys given, in the order given.
        given: Vec<String>,
    },
    /// Signed, but not a checkpoint of this form.
    #[error("checkpoint {0} is signed but not a checkpoint: {1}")]
    NotACheckpoint(usize, String),
    /// Signed, but over another service's trail (`service` says whose), which would read
    /// as a rewritten trail if checked against this one.
    #[error("checkpoint {index} is the {service}'s, not this {expected}'s trail")]
    OtherService {
        /// The checkpoint's number.
        index: usize,
        /// The service it names.
        service: String,
        /// The service whose trail it was to check.
        expected: String,
    },
    /// Its seq does not come after the one before it: checkpoints were reordered, or one
    /// was taken from another trail.
    #[error("checkpoint {index} at seq {seq} does not follow checkpoint {} at seq {previous}", index - 1)]
    OutOfOrder {
        /// The checkpoint's number.
        index: usize,
        /// Its seq.
        seq: u64,
        /// The seq of the checkpoint before it.
        previous: u64,
    },
}

/// Checks every checkpoint's signature with the one of `keys` its key id names (the keys a
/// service signed its checkpoints with across its key rotations, each once), that each is
/// over `service`'s trail and that their seqs increase; returns what they state, in order,
/// to pass to [`super::Verifier::checkpoints`]. A checkpoint signed with a key not in `keys`
/// fails naming its key id and, with several keys, the ids of all of them.
pub fn check(
    signed: &[Signed],
    keys: &[PublicKey],
    service: &str,
) -> Result<Vec<Checkpoint>, CheckpointError> {
    let ids: Vec<String> = keys.iter().map(PublicKey::key_id).collect();
    let mut out: Vec<Checkpoint> = Vec::with_capacity(signed.len());
    for (i, doc) in signed.iter().enumerate() {
        let index = i + 1;
        let key = match (ids.iter().position(|id| *id == doc.key_id), keys) {
            (Some(k), _) => &keys[k],
            // One key: its own verdict, which names the key expected, as before rotations
            // were provided for.
            (None, [only]) => only,
            (None, _) => {
                return Err(CheckpointError::UnknownKey {
                    index,
                    found: doc.key_id.clone(),
                    given: ids,
                })
            }
        };
        let value = key
            .verify(doc)
            .map_err(|e| CheckpointError::BadSignature(index, e))?;
        let c: Checkpoint = serde_json::from_value(value)
            .map_err(|e| CheckpointError::NotACheckpoint(index, e.to_string()))?;
        if c.key_id != doc.key_id {
            return Err(CheckpointError::NotACheckpoint(
                index,
                format!(
                    "it names key {} but was signed with {}",
                    c.key_id, doc.key_id
                ),
            ));
        }
        if c.service != service {
            return Err(CheckpointError::OtherService {
                index,
                service: c.service,
                expected: service.to_string(),
            });
        }
        if let Some(prev) = out.last() {
            if c.seq <= prev.seq {
                return Err(CheckpointError::OutOfOrder {
                    index,
                    seq: c.seq,
                    previous: prev.seq,
                });
            }
        }
        out.push(c);
    }
    Ok(out)
}

/// How many checkpoints each key signed, given the key id of each checkpoint in order
/// (checked ones' or a file's lines'): its key id and the count, in the order the keys first
/// sign one (so, in a file, the key before a rotation comes first).
pub fn signers<'a>(key_ids: impl IntoIterator<Item = &'a str>) -> Vec<(String, u64)> {
    let mut out: Vec<(String, u64)> = Vec::new();
    for key_id in key_ids {
        match out.iter_mut().find(|(id, _)| id == key_id) {
            Some((_, n)) => *n += 1,
            None => out.push((key_id.to_string(), 1)),
        }
    }
    out
}

/// Reads the lines of a checkpoint file's text (empty lines skipped).
pub fn parse_lines(text: &str) -> Result<Vec<Signed>, CheckpointError> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .enumerate()
        .map(|(i, line)| {
            Signed::from_file_json(line)
                .map_err(|e| CheckpointError::Unreadable(i + 1, format!("{e:#}")))
        })
        .collect()
}

/// The append-only file a service writes its checkpoints to.
#[derive(Debug, Clone)]
pub struct CheckpointFile {
    path: PathBuf,
}

impl CheckpointFile {
    /// The file at `path` (created on the first append).
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self { path: path.into() }
    }

    /// Where it is.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends one checkpoint and waits until it is on disk. Blocks: call it off the async
    /// threads.
    pub fn append(&self, signed: &Signed) -> Result<()> {
        let line = signed.to_json_line()?;
        let created = !self.path.exists();
        if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .read(true)
            .open(&self.path)
            .with_context(|| format!("opening {}", self.path.display()))?;
        // A line cut short by a crash is left alone on a line of its own, not merged with
        // the next checkpoint.
        let mut text = String::new();
        if !created && !ends_with_newline(&mut file)? {
            text.push('\n');
        }
        text.push_str(&line);
        text.push('\n');
        file.write_all(text.as_bytes())
            .and_then(|()| file.sync_data())
            .with_context(|| format!("writing {}", self.path.display()))?;
        if created {
            // The new file's name must survive a crash too.
            if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::File::open(dir)
                    .and_then(|d| d.sync_all())
                    .with_context(|| format!("syncing {}", dir.display()))?;
            }
        }
        Ok(())
    }

    /// Every checkpoint in the file, in order; none when there is no file yet. Blocks.
    pub fn read(&self) -> Result<Vec<Signed>> {
        let text = match std::fs::read_to_string(&self.path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e).with_context(|| format!("reading {}", self.path.display())),
        };
        parse_lines(&text).with_context(|| format!("reading {}", self.path.display()))
    }

    /// Up to `limit` checkpoints over a seq after `after_seq`, in order, and whether more
    /// follow; read line by line, so a long file is never held whole. Blocks.
    pub fn page(&self, after_seq: u64, limit: usize) -> Result<(Vec<Signed>, bool)> {
        use std::io::BufRead as _;
        let file = match std::fs::File::open(&self.path) {
            Ok(file) => file,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((Vec::new(), false)),
            Err(e) => return Err(e).with_context(|| format!("reading {}", self.path.display())),
        };
        let mut page = Vec::new();
        let mut index = 0;
        for line in std::io::BufReader::new(file).lines() {
            let line = line.with_context(|| format!("reading {}", self.path.display()))?;
            if line.trim().is_empty() {
                continue;
            }
            index += 1;
            let signed = Signed::from_file_json(&line)
                .map_err(|e| CheckpointError::Unreadable(index, format!("{e:#}")))?;
            let seq = Checkpoint::read_unchecked(&signed)
                .map_err(|e| CheckpointError::NotACheckpoint(index, format!("{e:#}")))?
                .seq;
            if seq <= after_seq {
                continue;
            }
            if page.len() == limit {
                return Ok((page, true));
            }
            page.push(signed);
        }
        Ok((page, false))
    }

    /// What the last readable checkpoint in the file states, unchecked: a line a crash cut
    /// short after it is passed over, so the service goes on signing after it (readers of
    /// the file still see the cut line and name it). Blocks.
    pub fn last(&self) -> Result<Option<Checkpoint>> {
        let text = match std::fs::read_to_string(&self.path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).with_context(|| format!("reading {}", self.path.display())),
        };
        Ok(text.lines().rev().find_map(|line| {
            Signed::from_file_json(line)
                .ok()
                .and_then(|s| Checkpoint::read_unchecked(&s).ok())
        }))
    }
}

fn ends_with_newline(file: &mut std::fs::File) -> Result<bool> {
    use std::io::{Read as _, Seek as _, SeekFrom};
    let len = file.metadata()?.len();
    if len == 0 {
        return Ok(true);
    }
    file.seek(SeekFrom::Start(len - 1))?;
    let mut last = [0u8; 1];
    file.read_exact(&mut last)?;
    Ok(last[0] == b'\n')
}

/// Whether the service should sign a checkpoint over `head` after `last`: only when the
/// head moved on. A head that did not move needs none (the last one still covers it); a
/// head behind or beside the last checkpoint means the trail was cut or rewritten, which a
/// new checkpoint must not make look right.
pub fn due(last: Option<&Checkpoint>, head: Option<(u64, &str)>) -> Due {
    match (last, head) {
        (None, None) => Due::No,
        (None, Some(_)) => Due::Yes,
        (Some(_), None) => Due::Diverged,
        (Some(l), Some((seq, hash))) => {
            if seq > l.seq {
                Due::Yes
            } else if seq == l.seq && hash == l.hash {
                Due::No
            } else {
                Due::Diverged
            }
        }
    }
}

/// What [`due`] decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Due {
    /// Sign one.
    Yes,
    /// Nothing new to sign.
    No,
    /// The trail no longer contains the last checkpoint's head: sign nothing, raise alarm.
    Diverged,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::{verify, BreakKind, Entry, Verifier, GENESIS_HASH};

    fn trail(n: u64) -> Vec<Entry> {
        let mut out: Vec<Entry> = Vec::new();
        for seq in 1..=n {
            let mut e = Entry {
                seq,
                occurred_at: 1_700_000_000_000 + seq as i64,
                request_id: format!("r-{seq}"),
                event_type: 1,
                actor: "crm".into(),
                detail: format!("event {seq}"),
                prev_hash: out
                    .last()
                    .map_or_else(|| GENESIS_HASH.to_string(), |e| e.hash.clone()),
                hash: String::new(),
            };
            e.hash = e.compute_hash();
            out.push(e);
        }
        out
    }

    fn signed_at(t: &[Entry], seqs: &[u64], key: &SigningKey) -> Vec<Signed> {
        seqs.iter()
            .map(|s| {
                let e = &t[*s as usize - 1];
                Checkpoint::sign("registry", e.seq, &e.hash, 1000 + *s as i64, key)
                    .unwrap()
                    .1
            })
            .collect()
    }

    fn verified(
        entries: &[Entry],
        checkpoints: &[Checkpoint],
    ) -> Result<u64, (u64, BreakKind, String)> {
        let mut v = Verifier::new().checkpoints(checkpoints);
        for e in entries {
            v.push(e.clone()).map_err(|b| (b.seq, b.kind, b.detail))?;
        }
        v.finish()
            .map(|i| i.anchors)
            .map_err(|b| (b.seq, b.kind, b.detail))
    }

    #[test]
    fn a_checkpoint_is_canonical_json_of_the_head_signed() {
        let key = SigningKey::generate();
        let (c, signed) = Checkpoint::sign("registry", 7, &"ab".repeat(32), 1234, &key).unwrap();
        let body = String::from_utf8(signed.body.clone()).unwrap();
        assert_eq!(
            body,
            format!(
                r#"{{"at":1234,"hash":"{}","key_id":"{}","seq":7,"service":"registry"}}"#,
                "ab".repeat(32),
                key.public_key().key_id()
            )
        );
        assert_eq!(
            check(
                std::slice::from_ref(&signed),
                &[key.public_key()],
                "registry"
            )
            .unwrap(),
            [c]
        );
        // One line in the file, read back the same.
        let line = signed.to_json_line().unwrap();
        assert!(!line.contains('\n'));
        assert_eq!(parse_lines(&format!("{line}\n\n")).unwrap(), [signed]);
    }

    #[test]
    fn a_checkpoint_changed_in_one_byte_fails_its_signature() {
        let key = SigningKey::generate();
        let t = trail(5);
        let mut signed = signed_at(&t, &[2, 4], &key);
        let line = signed[1].to_json_line().unwrap();
        // The seq in the body: 4 → 3.
        let forged = line.replacen(r#"\"seq\":4"#, r#"\"seq\":3"#, 1);
        assert_ne!(forged, line);
        assert_eq!(forged.len(), line.len());
        signed[1] = parse_lines(&forged).unwrap().remove(0);
        let err = check(&signed, &[key.public_key()], "registry").unwrap_err();
        assert_eq!(
            err.to_string(),
            "checkpoint 2 bad signature: the signature does not match the document"
        );
        // Another key's checkpoints are refused by name.
        let other = SigningKey::generate();
        let err = check(
            &signed_at(&t, &[1], &other),
            &[key.public_key()],
            "registry",
        )
        .unwrap_err();
        assert!(matches!(
            err,
            CheckpointError::BadSignature(1, VerifyError::WrongKey { .. })
        ));
        assert!(matches!(
            parse_lines("{\"body\": 1}").unwrap_err(),
            CheckpointError::Unreadable(1, _)
        ));
    }

    /// After a key rotation the file holds checkpoints of both keys: each is checked with
    /// the key its key id names, and one signed with a key not given names that key.
    #[test]
    fn checkpoints_across_a_key_rotation_verify_with_both_keys() {
        let (old, new) = (SigningKey::generate(), SigningKey::generate());
        let (old_id, new_id) = (old.public_key().key_id(), new.public_key().key_id());
        let t = trail(8);
        let mut signed = signed_at(&t, &[2, 4, 5], &old);
        signed.extend(signed_at(&t, &[6, 8], &new));
        let both = [new.public_key(), old.public_key()];
        let cps = check(&signed, &both, "registry").unwrap();
        assert_eq!(
            cps.iter().map(|c| c.seq).collect::<Vec<_>>(),
            [2, 4, 5, 6, 8]
        );
        assert_eq!(
            signers(cps.iter().map(|c| c.key_id.as_str())),
            [(old_id.clone(), 3), (new_id.clone(), 2)]
        );
        assert_eq!(verified(&t, &cps), Ok(5));

        // The new key alone: the first checkpoint fails naming the old key.
        let err = check(&signed, &[new.public_key()], "registry").unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "checkpoint 1 bad signature: signed with key {old_id}, not with the expected \
                 key {new_id}"
            )
        );
        // The old key alone: the first of the new key's.
        let err = check(&signed, &[old.public_key()], "registry").unwrap_err();
        assert!(
            matches!(&err, CheckpointError::BadSignature(4, VerifyError::WrongKey { found, .. }) if *found == new_id),
            "{err}"
        );
        // Two keys, neither the one that signed: both given keys are named.
        let other = SigningKey::generate();
        let err = check(&signed, &[other.public_key(), new.public_key()], "registry").unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "checkpoint 1 bad signature: signed with key {old_id}, which is none of the \
                 keys given ({}, {new_id})",
                other.public_key().key_id()
            )
        );
        // The right key id is no pass: a signature by another key that names it fails.
        let mut forged = signed.clone();
        forged[4] = other.sign(signed[4].body.clone());
        forged[4].key_id = new_id.clone();
        let err = check(&forged, &both, "registry").unwrap_err();
        assert_eq!(
            err,
            CheckpointError::BadSignature(5, VerifyError::BadSignature)
        );
    }

    #[test]
    fn another_service_s_checkpoints_are_refused_by_name() {
        let key = SigningKey::generate();
        let t = trail(3);
        let err = check(
            &signed_at(&t, &[1, 2], &key),
            &[key.public_key()],
            "processor",
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "checkpoint 1 is the registry's, not this processor's trail"
        );
        assert!(matches!(
            err,
            CheckpointError::OtherService { index: 1, .. }
        ));
    }

    #[test]
    fn checkpoints_must_move_forward() {
        let key = SigningKey::generate();
        let t = trail(5);
        let err = check(
            &signed_at(&t, &[2, 4, 4], &key),
            &[key.public_key()],
            "registry",
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "checkpoint 3 at seq 4 does not follow checkpoint 2 at seq 4"
        );
    }

    #[test]
    fn checkpoints_catch_a_rewritten_trail_and_name_where_it_began() {
        let key = SigningKey::generate();
        let t = trail(10);
        let cps = check(
            &signed_at(&t, &[3, 6, 9], &key),
            &[key.public_key()],
            "registry",
        )
        .unwrap();
        assert_eq!(verified(&t, &cps), Ok(3));

        // Rewritten from entry 5 on with fresh hashes: the chain alone is intact.
        let mut forged = t.clone();
        forged[4].detail = "nothing happened".into();
        for i in 4..forged.len() {
            forged[i].prev_hash = forged[i - 1].hash.clone();
            forged[i].hash = forged[i].compute_hash();
        }
        assert!(verify(&forged).is_ok());
        let (seq, kind, detail) = verified(&forged, &cps).unwrap_err();
        assert_eq!((seq, kind), (4, BreakKind::Rewritten));
        assert_eq!(
            detail,
            format!(
                "entries rewritten from a seq between 4 and 6: checkpoint 2 at seq 6 says {}, \
                 store says {}",
                t[5].hash, forged[5].hash
            )
        );
        // A checkpoint on every entry names the very entry.
        let every = check(
            &signed_at(&t, &(1..=10).collect::<Vec<_>>(), &key),
            &[key.public_key()],
            "registry",
        )
        .unwrap();
        let (seq, _, detail) = verified(&forged, &every).unwrap_err();
        assert_eq!(seq, 5);
        assert!(
            detail.starts_with("entries rewritten from seq 5: checkpoint 5 at seq 5"),
            "{detail}"
        );
    }

    #[test]
    fn checkpoints_catch_truncation() {
        let key = SigningKey::generate();
        let t = trail(10);
        let cps = check(
            &signed_at(&t, &[3, 7, 9], &key),
            &[key.public_key()],
            "registry",
        )
        .unwrap();
        // The store's last entry kept its checkpoint: all before it is as written, so the
        // end was cut.
        let (seq, kind, detail) = verified(&t[..7], &cps).unwrap_err();
        assert_eq!((seq, kind), (8, BreakKind::Removed));
        assert_eq!(
            detail,
            "trail truncated: checkpoint 3 at seq 9 but the store ends at 7"
        );
        // Entries after the last checkpoint may be missing: nothing vouches for them yet.
        assert_eq!(verified(&t[..9], &cps), Ok(3));
    }

    /// An entry removed and the later ones renumbered and hashed again leaves a trail as
    /// well-formed as a cut one, only shorter than the last checkpoint: the break says it
    /// does not match, not that the end was cut.
    #[test]
    fn a_shorter_trail_is_called_truncated_only_when_it_is_known_to_be() {
        let key = SigningKey::generate();
        let t = trail(10);
        let cps = check(
            &signed_at(&t, &[3, 10], &key),
            &[key.public_key()],
            "registry",
        )
        .unwrap();
        let mut forged = t.clone();
        forged.remove(5);
        for (i, e) in forged.iter_mut().enumerate().skip(5) {
            e.seq = i as u64 + 1;
        }
        for i in 5..forged.len() {
            forged[i].prev_hash = forged[i - 1].hash.clone();
            forged[i].hash = forged[i].compute_hash();
        }
        assert!(verify(&forged).is_ok());
        let (seq, kind, detail) = verified(&forged, &cps).unwrap_err();
        assert_eq!((seq, kind), (10, BreakKind::Removed));
        assert_eq!(
            detail,
            "the trail does not match checkpoint 2 at seq 10, as the store ends at 9: entries \
             were cut off its end, or rewritten from a seq between 4 and 9 on with some removed"
        );
        assert!(!detail.contains("truncated"), "{detail}");
        // The same for a cut end that no checkpoint pins down, as the verifier cannot tell
        // the two apart; a checkpoint on the last entry left shows it was cut.
        let (_, _, cut) = verified(&t[..9], &cps).unwrap_err();
        assert_eq!(cut, detail);
        let only_last =
            check(&signed_at(&t, &[10], &key), &[key.public_key()], "registry").unwrap();
        let (_, _, detail) = verified(&t[..9], &only_last).unwrap_err();
        assert!(
            detail.ends_with("or rewritten from a seq between 1 and 9 on with some removed"),
            "{detail}"
        );
        let (_, _, detail) = verified(&t[..3], &cps).unwrap_err();
        assert_eq!(
            detail,
            "trail truncated: checkpoint 2 at seq 10 but the store ends at 3"
        );
    }

    #[test]
    fn a_checkpoint_is_due_only_when_the_head_moved_on() {
        let c = Checkpoint {
            service: "registry".into(),
            seq: 5,
            hash: "a".repeat(64),
            at: 0,
            key_id: String::new(),
        };
        let (same, other) = ("a".repeat(64), "b".repeat(64));
        assert_eq!(due(None, None), Due::No);
        assert_eq!(due(None, Some((1, &same))), Due::Yes);
        assert_eq!(due(Some(&c), Some((5, &same))), Due::No);
        assert_eq!(due(Some(&c), Some((6, &other))), Due::Yes);
        assert_eq!(due(Some(&c), Some((5, &other))), Due::Diverged);
        assert_eq!(due(Some(&c), Some((4, &other))), Due::Diverged);
        assert_eq!(due(Some(&c), None), Due::Diverged);
    }

    #[test]
    fn the_file_is_appended_line_by_line_and_survives_a_cut_line() {
        let dir = tempfile::tempdir().unwrap();
        let file = CheckpointFile::new(dir.path().join("audit/checkpoints.jsonl"));
        assert!(file.read().unwrap().is_empty());
        assert_eq!(file.last().unwrap(), None);
        let key = SigningKey::generate();
        let t = trail(4);
        let signed = signed_at(&t, &[1, 2, 4], &key);
        file.append(&signed[0]).unwrap();
        file.append(&signed[1]).unwrap();
        assert_eq!(file.read().unwrap(), signed[..2]);
        assert_eq!(file.last().unwrap().map(|c| c.seq), Some(2));
        assert_eq!(file.page(0, 1).unwrap(), (signed[..1].to_vec(), true));
        assert_eq!(file.page(1, 1).unwrap(), (signed[1..2].to_vec(), false));
        assert_eq!(file.page(2, 10).unwrap(), (vec![], false));
        // A crash cut the next line short: the writer goes on from the last whole checkpoint,
        // the one after it still gets a line of its own, and readers name the cut line
        // rather than pass over it.
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(file.path())
            .unwrap();
        f.write_all(b"{\"body\":\"{\\\"at").unwrap();
        assert_eq!(file.last().unwrap().map(|c| c.seq), Some(2));
        file.append(&signed[2]).unwrap();
        let text = std::fs::read_to_string(file.path()).unwrap();
        assert_eq!(text.lines().count(), 4);
        assert_eq!(
            parse_lines(text.lines().last().unwrap()).unwrap(),
            [signed[2].clone()]
        );
        assert!(file.read().is_err());
        assert!(file.page(0, 10).is_err());
    }
}
