//! The data folder: each task's part in `<root>/<sender>/<request_id>/<subprocessor>/`, a
//! file as `<name>.partial` until its SHA-256 matched and `<name>` after, the header it was
//! announced with in `.header.<name>.json` (file names never start with '.', so these never
//! collide), the checkpoint of a partial file's digest in `.hashed.<name>.json`, and a closed
//! part's `.manifest.json`, `.receipt.json` and, when receipts are signed,
//! `.receipt.signed.json` ([`Folder::keep_signed_receipt`]). Files are hashed in chunks,
//! never read whole, and a file's check reads only what follows its checkpoint. `<sender>` is
//! the sending processor's certificate identity as one path component
//! ([`sender_component`]): subprocessor names are unique only within a processor, so two
//! processors transferring for the same request must not share a part.
//!
//! The sender deletes its copy once it holds the receipt and resumes a file from the offset
//! it is told, so nothing is answered before what it confirms is on disk: a partial file's
//! bytes and name are synced before its offset is answered (not per chunk: nothing is
//! answered per chunk), a file's bytes before it is renamed complete, the JSON files are
//! written whole as `<name>.tmp`, synced and renamed, and a folder in which an entry was
//! created or renamed is synced before the answer that counts on it.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use dsrelay_proto::v1::{ExportFileHeader, TransferReceipt};
use dsrelay_runtime::resumable_hash::ResumableSha256;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};

/// Why the folder refused something.
#[derive(Debug, thiserror::Error)]
pub enum FolderError {
    /// The call contradicts what is stored (a file of a closed part that its manifest does
    /// not list as announced, a closed part closed with other files).
    #[error("{0}")]
    Conflict(String),
    /// The bytes stored do not hash to the announced SHA-256; they were dropped.
    #[error("{0}")]
    DigestMismatch(String),
    /// A part lists files that are not stored complete.
    #[error("not stored complete: {}", .0.join(", "))]
    Missing(Vec<String>),
    /// The file system failed. No `From<std::io::Error>`: an error without the step and the
    /// path leaves an operator guessing which file of which part to look at.
    #[error("{doing}")]
    Io {
        /// The step that failed and the path it failed on ("appending to `<path>`").
        doing: String,
        /// What the file system answered.
        #[source]
        source: std::io::Error,
    },
}

/// `source`, met while taking `step` on `path`.
fn failed(step: &str, path: &Path, source: std::io::Error) -> FolderError {
    FolderError::Io {
        doing: format!("{step} {}", path.display()),
        source,
    }
}

/// Names the step and the path of a file-system call's error ([`FolderError::Io`]).
trait Doing<T> {
    fn doing(self, step: &str, path: &Path) -> Result<T, FolderError>;
}

impl<T> Doing<T> for std::io::Result<T> {
    fn doing(self, step: &str, path: &Path) -> Result<T, FolderError> {
        self.map_err(|e| failed(step, path, e))
    }
}

/// Where the transfer of one file stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileState {
    /// Bytes stored; the next chunk starts here.
    pub offset: u64,
    /// Stored whole with its SHA-256 matched.
    pub complete: bool,
}

/// A file's header as stored next to it; a header announced differently restarts the file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct StoredHeader {
    media_type: String,
    categories: Vec<String>,
    size: u64,
    sha256: String,
}

impl From<&ExportFileHeader> for StoredHeader {
    fn from(h: &ExportFileHeader) -> Self {
        Self {
            media_type: h.media_type.clone(),
            categories: h.categories.clone(),
            size: h.size,
            sha256: h.sha256.clone(),
        }
    }
}

/// A closed part's receipt as written to `.receipt.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Receipt {
    /// The certificate identity of the processor that sent the part, answered as the
    /// `TransferReceipt`'s `sender`.
    pub sender: String,
    /// The registry's request id.
    pub request_id: String,
    /// The subprocessor whose part it is.
    pub subprocessor: String,
    /// SHA-256 of the part's canonical manifest ([`dsrelay_runtime::transfer_manifest`]).
    pub manifest_sha256: String,
    /// Total bytes of the part's files.
    pub bytes: u64,
    /// How many files the part holds.
    pub files: u32,
    /// When the part was first closed (ms since the Unix epoch).
    pub received_at_ms: i64,
    /// The recipient's name for itself.
    pub recipient: String,
}

/// The data folder.
#[derive(Debug, Clone)]
pub struct Folder {
    root: PathBuf,
    /// Bytes appended between two checkpoints of a partial file's digest
    /// ([`CHECKPOINT_EVERY`]; tests set less).
    checkpoint_every: u64,
}

impl Folder {
    /// The folder at `root` (which must exist).
    pub fn new(root: PathBuf) -> Self {
        Self {
            root,
            checkpoint_every: CHECKPOINT_EVERY,
        }
    }

    /// The folder of one task's part as `sender` sent it. Callers have checked that
    /// `request_id` and `subprocessor` are safe path components; `sender` is made one.
    pub fn part_dir(&self, sender: &str, request_id: &str, subprocessor: &str) -> PathBuf {
        self.root
            .join(sender_component(sender))
            .join(request_id)
            .join(subprocessor)
    }

    /// Where the file `h` announces, as `sender` sends it, is stored once complete.
    pub fn file_path(&self, sender: &str, h: &ExportFileHeader) -> PathBuf {
        self.paths(sender, h).0
    }

    fn paths(&self, sender: &str, h: &ExportFileHeader) -> (PathBuf, PathBuf, PathBuf) {
        let dir = self.part_dir(sender, &h.request_id, &h.subprocessor);
        (
            dir.join(&h.name),
            dir.join(format!("{}.partial", h.name)),
            dir.join(format!(".header.{}.json", h.name)),
        )
    }

    /// Registers the file `h` announces and answers where it stands: a file announced with
    /// another header restarts at offset 0, a complete one too (its bytes dropped) while its
    /// part has no receipt; a partial file holding every byte is checked now, and one whose
    /// check would read more than `Folder::max_unchecked` bytes is dropped and answered as
    /// not started. In a closed part nothing changes: a file its manifest lists as announced
    /// is complete, any other is a conflict.
    pub async fn begin(
        &self,
        sender: &str,
        h: &ExportFileHeader,
    ) -> Result<FileState, FolderError> {
        let (done, partial, meta) = self.paths(sender, h);
        let announced = StoredHeader::from(h);
        let stored: Option<StoredHeader> = match tokio::fs::read(&meta).await {
            Ok(b) => serde_json::from_slice(&b).ok(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(failed("reading the header", &meta, e)),
        };
        let dir = self.part_dir(sender, &h.request_id, &h.subprocessor);
        if let Some(r) = read_receipt(&dir).await? {
            // The receipt says the part is what its manifest lists: restarting or adding a
            // file would make the folder hold what the receipt does not cover.
            if manifest_lists(&dir, h).await? {
                return Ok(FileState {
                    offset: h.size,
                    complete: true,
                });
            }
            return Err(closed(
                &r,
                &format!(
                    "file {} with this size, digest, media type and categories is not one of \
                     its files",
                    h.name
                ),
            ));
        }
        if exists(&done).await? {
            if stored.as_ref() == Some(&announced) {
                return Ok(FileState {
                    offset: h.size,
                    complete: true,
                });
            }
            // No receipt covers it yet, and a sender announcing other bytes (a task retried
            // at the processor exports again) would otherwise never get them stored. Gone
            // durably before the new header is written: a crash between the two must not
            // leave the old bytes under the new header, taken as complete.
            remove(&done).await?;
            sync_dir(&dir).await?;
        }
        if stored.as_ref() != Some(&announced) {
            remove(&partial).await?;
            create_part_dir(&self.part_dir(sender, &h.request_id, &h.subprocessor)).await?;
            write_durably(&meta, &serde_json::to_vec(&announced).unwrap_or_default()).await?;
        }
        let offset = match tokio::fs::metadata(&partial).await {
            Ok(m) => m.len(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
            Err(e) => return Err(failed("reading the size of", &partial, e)),
        };
        if offset > h.size {
            // More bytes than announced cannot be the file: start it again.
            remove(&partial).await?;
            return Ok(FileState {
                offset: 0,
                complete: false,
            });
        }
        if offset == h.size {
            return self.finish(sender, h).await;
        }
        if offset > 0 {
            let checkpoint = self.checkpoint_path(sender, h);
            if self.resume_point(&checkpoint, offset).await?.is_none() {
                // Its check would read more than a call may (a partial file from before
                // checkpoints, or one whose checkpoint does not read): taken up, it would be
                // dropped only at its last byte, after the sender sent the rest. Dropped now
                // and answered as not started, as the registry does.
                remove(&partial).await?;
                forget_checkpoint(&checkpoint).await?;
                return Ok(FileState {
                    offset: 0,
                    complete: false,
                });
            }
            // A run that ended before syncing may have left bytes only in the page cache, and
            // the sender resumes after what is answered here.
            self.sync_partial(sender, h).await?;
        }
        Ok(FileState {
            offset,
            complete: false,
        })
    }

    /// Appends checked bytes to the file's partial form. They are not synced here (the caller
    /// calls [`Folder::sync_partial`] before it answers the offset they reach), but for a
    /// checkpoint of the file's digest they complete (`Folder::advance_checkpoint`), so
    /// that no more than `Folder::max_unchecked` bytes ever follow the last one.
    ///
    /// Answers the file's checkpoint as it now stands, for the caller to pass as `checkpoint`
    /// with its next chunk of the file; `None` passed (a stream's first append) reads it from
    /// disk and catches up with bytes a stopped run appended past it. The caller keeps every
    /// other call off the file meanwhile, so what it passes is what the disk holds. `None`
    /// answered means the file has no checkpoint that a check could take up from (see
    /// `Folder::resume_point`) and none is written.
    pub async fn append(
        &self,
        sender: &str,
        h: &ExportFileHeader,
        data: &[u8],
        checkpoint: Option<ResumableSha256>,
    ) -> Result<Option<ResumableSha256>, FolderError> {
        let (_, partial, _) = self.paths(sender, h);
        let mut f = tokio::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&partial)
            .await
            .doing("appending to", &partial)?;
        let before = f.metadata().await.doing("appending to", &partial)?.len();
        let from = if checkpoint.is_some() {
            // Passed on from this stream's previous append, which left it less than an
            // interval behind: nothing to catch up.
            checkpoint
        } else if before == 0 {
            // The file is written anew: a checkpoint left from bytes since dropped (another
            // header restarted the file) must not be taken for these.
            forget_checkpoint(&self.checkpoint_path(sender, h)).await?;
            Some(ResumableSha256::new())
        } else {
            match self
                .resume_point(&self.checkpoint_path(sender, h), before)
                .await?
            {
                // A run that stopped between an append and its checkpoint left up to an
                // interval and a chunk past it: caught up before more are added.
                Some(from) => Some(self.advance_checkpoint(sender, h, from, before).await?),
                None => None,
            }
        };
        f.write_all(data).await.doing("appending to", &partial)?;
        // tokio writes in the background: a write that failed shows only here.
        f.flush().await.doing("appending to", &partial)?;
        match from {
            Some(from) => Ok(Some(
                self.advance_checkpoint(sender, h, from, before + data.len() as u64)
                    .await?,
            )),
            None => Ok(None),
        }
    }

    /// Where the checkpoint of the file `h` announces is kept while it is partial.
    fn checkpoint_path(&self, sender: &str, h: &ExportFileHeader) -> PathBuf {
        self.part_dir(sender, &h.request_id, &h.subprocessor)
            .join(format!(".hashed.{}.json", h.name))
    }

    /// The most bytes past its checkpoint a partial file's check reads: one checkpoint
    /// interval, and the chunk that took it past it.
    fn max_unchecked(&self) -> u64 {
        self.checkpoint_every + crate::api::MAX_CHUNK as u64
    }

    /// Where the check of the partial file at `partial`, `len` bytes long, takes up: its
    /// checkpoint, or its first byte when it has none that fits; `None` when more than
    /// [`Folder::max_unchecked`] bytes would have to be read (a partial file from before
    /// checkpoints were written).
    async fn resume_point(
        &self,
        checkpoint: &Path,
        len: u64,
    ) -> Result<Option<ResumableSha256>, FolderError> {
        let from = read_checkpoint(checkpoint)
            .await?
            .filter(|c| c.len() <= len)
            .unwrap_or_default();
        Ok((len - from.len() <= self.max_unchecked()).then_some(from))
    }

    /// The checkpoint `from` of the partial file of `h`, moved to its end once the file, now
    /// `len` bytes long, holds a checkpoint interval past it: the file is synced, what follows
    /// `from` hashed (read back: at most an interval and a chunk) and the new checkpoint
    /// written durably, so that a checkpoint never counts a byte a crash could take back.
    async fn advance_checkpoint(
        &self,
        sender: &str,
        h: &ExportFileHeader,
        from: ResumableSha256,
        len: u64,
    ) -> Result<ResumableSha256, FolderError> {
        if len.saturating_sub(from.len()) < self.checkpoint_every {
            return Ok(from);
        }
        let (_, partial, _) = self.paths(sender, h);
        self.sync_partial(sender, h).await?;
        let hashed = hash_range(&partial, from, len)
            .await
            .doing("hashing", &partial)?;
        write_durably(&self.checkpoint_path(sender, h), &checkpoint_json(&hashed)).await?;
        Ok(hashed)
    }

    /// Syncs the bytes and the name of the file's partial form, if there is one.
    pub async fn sync_partial(
        &self,
        sender: &str,
        h: &ExportFileHeader,
    ) -> Result<(), FolderError> {
        let (_, partial, _) = self.paths(sender, h);
        match tokio::fs::File::open(&partial).await {
            Ok(f) => f.sync_data().await.doing("syncing", &partial)?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(failed("syncing", &partial, e)),
        }
        sync_dir(&self.part_dir(sender, &h.request_id, &h.subprocessor)).await?;
        Ok(())
    }

    /// Checks a file holding every byte against its SHA-256, hashing only what follows its
    /// checkpoint (at most `Folder::max_unchecked` bytes, whatever its size): a match gives
    /// it its name; a mismatch drops it so the sender starts it again. A partial file with
    /// more than that past its checkpoint (written before checkpoints were) is dropped too,
    /// and answered as not started: hashing it whole could outlast the call.
    pub async fn finish(
        &self,
        sender: &str,
        h: &ExportFileHeader,
    ) -> Result<FileState, FolderError> {
        let (done, partial, _) = self.paths(sender, h);
        let checkpoint = self.checkpoint_path(sender, h);
        if h.size == 0 {
            // A file of no bytes gets no chunk, and a chunk is what creates the partial form.
            self.append(sender, h, &[], None).await?;
        }
        let len = tokio::fs::metadata(&partial)
            .await
            .doing("reading the size of", &partial)?
            .len();
        let Some(from) = self.resume_point(&checkpoint, len).await? else {
            remove(&partial).await?;
            remove(&checkpoint).await?;
            return Ok(FileState {
                offset: 0,
                complete: false,
            });
        };
        let hashed = hash_range(&partial, from, len)
            .await
            .doing("hashing", &partial)?;
        let digest = hex::encode(hashed.finalize());
        if digest != h.sha256 {
            remove(&partial).await?;
            remove(&checkpoint).await?;
            return Err(FolderError::DigestMismatch(format!(
                "file {}: the {} bytes received have SHA-256 {digest}, not {} as the header \
                 says; they were dropped, send the file again",
                h.name, h.size, h.sha256
            )));
        }
        // A file under its final name is taken as received whole by every later call (and
        // counted in the receipt), so its bytes reach the disk first.
        tokio::fs::File::open(&partial)
            .await
            .doing("syncing", &partial)?
            .sync_all()
            .await
            .doing("syncing", &partial)?;
        tokio::fs::rename(&partial, &done)
            .await
            .doing(&format!("renaming {} to", partial.display()), &done)?;
        // After the renaming: a crash before it must find the checkpoint of the partial file.
        remove(&checkpoint).await?;
        sync_dir(&self.part_dir(sender, &h.request_id, &h.subprocessor)).await?;
        Ok(FileState {
            offset: h.size,
            complete: true,
        })
    }

    /// Closes a part: every file listed must be stored complete as announced. The first time
    /// it removes every other file of the part (an earlier attempt's files, partial files and
    /// headers), then writes the canonical manifest and the receipt; it answers the stored
    /// receipt when the same part is closed again. The caller keeps every other call off the
    /// part meanwhile.
    pub async fn complete_part(
        &self,
        sender: &str,
        request_id: &str,
        subprocessor: &str,
        files: &[ExportFileHeader],
        recipient: &str,
        now_ms: i64,
    ) -> Result<Receipt, FolderError> {
        let manifest_sha256 =
            dsrelay_runtime::transfer_manifest::sha256(request_id, subprocessor, files);
        let dir = self.part_dir(sender, request_id, subprocessor);
        let receipt_path = dir.join(RECEIPT);
        if let Some(r) = read_receipt(&dir).await? {
            if r.manifest_sha256 == manifest_sha256 {
                // A run that renamed it may have ended before syncing the folder.
                sync_dir(&dir).await?;
                return Ok(r);
            }
            return Err(closed(
                &r,
                "the files given are not the ones it was closed with; give those for its \
                 receipt",
            ));
        }
        let mut missing = Vec::new();
        for h in files {
            let (done, _, meta) = self.paths(sender, h);
            let stored: Option<StoredHeader> = tokio::fs::read(&meta)
                .await
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok());
            if !exists(&done).await? || stored.as_ref() != Some(&StoredHeader::from(h)) {
                missing.push(h.name.clone());
            }
        }
        if !missing.is_empty() {
            return Err(FolderError::Missing(missing));
        }
        create_part_dir(&dir).await?;
        remove_unlisted(&dir, files).await?;
        let receipt = Receipt {
            sender: sender.to_string(),
            request_id: request_id.to_string(),
            subprocessor: subprocessor.to_string(),
            manifest_sha256,
            bytes: files.iter().map(|f| f.size).sum(),
            files: u32::try_from(files.len()).unwrap_or(u32::MAX),
            received_at_ms: now_ms,
            recipient: recipient.to_string(),
        };
        write_durably(
            &dir.join(MANIFEST),
            &dsrelay_runtime::transfer_manifest::canonical_json(request_id, subprocessor, files),
        )
        .await?;
        // Written last: its presence means the part is closed. The files it counts had their
        // bytes synced before they got their names; syncing the folder after it covers those.
        write_durably(
            &receipt_path,
            &serde_json::to_vec_pretty(&receipt).unwrap_or_default(),
        )
        .await?;
        Ok(receipt)
    }
}

/// A closed part's receipt, written last: its presence means the part is closed.
const RECEIPT: &str = ".receipt.json";

/// The signed receipt last answered for a closed part ([`Folder::keep_signed_receipt`]).
const SIGNED_RECEIPT: &str = ".receipt.signed.json";

/// A signed receipt in the form `dsrctl receipt get` writes and `dsrctl receipt verify`
/// reads: the fields of the `TransferReceipt` the signature covers under their proto names,
/// in that order, `received_at` as RFC 3339 (null when unset) and the signature as base64.
/// `sender` is left out when empty, as `dsrctl receipt get` leaves out that of a receipt
/// signed over the version 1 body; this recipient always names it.
#[derive(Serialize)]
struct SignedReceiptFile<'a> {
    request_id: &'a str,
    subprocessor: &'a str,
    recipient: &'a str,
    #[serde(skip_serializing_if = "str::is_empty")]
    sender: &'a str,
    bytes: u64,
    files: u32,
    manifest_sha256: &'a str,
    received_at: Option<String>,
    key_id: &'a str,
    signature: String,
}

impl<'a> SignedReceiptFile<'a> {
    fn of(r: &'a TransferReceipt) -> Self {
        let received_at = r.received_at.as_ref().and_then(|t| {
            let nanos = u32::try_from(t.nanos).ok()?;
            let at = chrono::DateTime::from_timestamp(t.seconds, nanos)?;
            Some(at.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true))
        });
        Self {
            request_id: &r.request_id,
            subprocessor: &r.subprocessor,
            recipient: &r.recipient,
            sender: &r.sender,
            bytes: r.bytes,
            files: r.files,
            manifest_sha256: &r.manifest_sha256,
            received_at,
            key_id: &r.key_id,
            signature: BASE64.encode(&r.signature),
        }
    }
}

impl Folder {
    /// Writes `receipt`, as signed and answered to `sender` for its closed part, durably to
    /// the part's `.receipt.signed.json`, replacing the one answered before: the signature
    /// is made anew for every answer (under the key held then), so the file holds what the
    /// sender was last given, which `dsrctl receipt verify` checks against the recipient's
    /// public key. Written after `.receipt.json`, so the part is closed already.
    pub async fn keep_signed_receipt(
        &self,
        sender: &str,
        receipt: &TransferReceipt,
    ) -> Result<(), FolderError> {
        let dir = self.part_dir(sender, &receipt.request_id, &receipt.subprocessor);
        let text = serde_json::to_string_pretty(&SignedReceiptFile::of(receipt))
            .unwrap_or_default()
            + "\n";
        write_durably(&dir.join(SIGNED_RECEIPT), text.as_bytes()).await
    }
}

/// A closed part's canonical manifest.
const MANIFEST: &str = ".manifest.json";

/// The receipt of the part in `dir` if the part is closed. A receipt that does not parse is
/// an error, not an open part: it was written whole, so it was changed since, and the part
/// must take no changes until an operator looks.
async fn read_receipt(dir: &Path) -> Result<Option<Receipt>, FolderError> {
    let path = dir.join(RECEIPT);
    let bytes = match tokio::fs::read(&path).await {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(failed("reading the receipt", &path, e)),
    };
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|e| failed("reading the receipt", &path, e.into()))
}

/// A file as the canonical manifest lists it.
#[derive(Deserialize)]
struct Listed {
    name: String,
    #[serde(flatten)]
    header: StoredHeader,
}

/// The canonical manifest's files (the other keys name the part, which its folder does).
#[derive(Deserialize)]
struct StoredManifest {
    files: Vec<Listed>,
}

/// Whether the manifest of the closed part in `dir` lists the file `h` as `h` announces it.
async fn manifest_lists(dir: &Path, h: &ExportFileHeader) -> Result<bool, FolderError> {
    let path = dir.join(MANIFEST);
    let bytes = tokio::fs::read(&path)
        .await
        .doing("reading the manifest", &path)?;
    let m: StoredManifest = serde_json::from_slice(&bytes)
        .map_err(|e| failed("reading the manifest", &path, e.into()))?;
    let announced = StoredHeader::from(h);
    Ok(m.files
        .iter()
        .any(|f| f.name == h.name && f.header == announced))
}

/// The refusal of a change to the part closed with `r`, `why` saying what was asked.
fn closed(r: &Receipt, why: &str) -> FolderError {
    FolderError::Conflict(format!(
        "the part of {} in request {} was closed with manifest SHA-256 {} and takes no \
         changes: {why}",
        r.subprocessor, r.request_id, r.manifest_sha256
    ))
}

/// Removes, durably, every file in the part's folder `dir` but the ones `files` lists and
/// their headers (and the manifest, which closing replaces), so that the closed part holds
/// exactly what its receipt covers. Folders are left: none is ever made in a part's folder,
/// so one there is not a file of any attempt.
async fn remove_unlisted(dir: &Path, files: &[ExportFileHeader]) -> Result<(), FolderError> {
    let keep: HashSet<String> = files
        .iter()
        .flat_map(|h| [h.name.clone(), format!(".header.{}.json", h.name)])
        .chain([MANIFEST.to_string()])
        .collect();
    let mut entries = tokio::fs::read_dir(dir).await.doing("listing", dir)?;
    let mut removed = false;
    while let Some(e) = entries.next_entry().await.doing("listing", dir)? {
        if e.file_name().to_str().is_some_and(|n| keep.contains(n)) {
            continue;
        }
        let path = e.path();
        if e.file_type().await.doing("looking at", &path)?.is_dir() {
            continue;
        }
        remove(&path).await?;
        removed = true;
    }
    if removed {
        // The receipt written next must not survive a crash that brings these back.
        sync_dir(dir).await?;
    }
    Ok(())
}

/// The longest name of a folder entry most file systems take (bytes).
const MAX_COMPONENT: usize = 255;

/// `sender`, a certificate identity (`spiffe://example.org/processor/p`), as one path
/// component, escaped as the registry escapes its package keys
/// ([`path_component`](dsrelay_runtime::export_files::path_component)), so distinct senders
/// never share a folder and none can climb out (`/`, `..`) or hide (a leading `.`). An
/// escape is `%` and two uppercase hex digits, so the forms taken when escaping cannot work
/// (`%empty`; `%sha256-<hex>` for a name too long for the file system) never equal an
/// escaped identity.
pub fn sender_component(sender: &str) -> String {
    if sender.is_empty() {
        // An empty component would merge the root with the request folders.
        return "%empty".into();
    }
    let out = dsrelay_runtime::export_files::path_component(sender);
    if out.len() > MAX_COMPONENT {
        return format!("%sha256-{}", hex::encode(Sha256::digest(sender.as_bytes())));
    }
    out
}

async fn exists(p: &Path) -> Result<bool, FolderError> {
    tokio::fs::try_exists(p).await.doing("looking for", p)
}

/// Creates a part's folder `<root>/<sender>/<request_id>/<subprocessor>` and syncs the three
/// folders above it, so its name, its request's and its sender's survive a crash with the
/// files in it.
async fn create_part_dir(dir: &Path) -> Result<(), FolderError> {
    tokio::fs::create_dir_all(dir)
        .await
        .doing("creating the folder", dir)?;
    for above in dir.ancestors().skip(1).take(3) {
        sync_dir(above).await?;
    }
    Ok(())
}

/// Replaces the file at `p` with `bytes`, durably: a crash leaves the old file or the new one
/// whole (a temporary `<p>.tmp` synced, then renamed), and the folder is synced after.
async fn write_durably(p: &Path, bytes: &[u8]) -> Result<(), FolderError> {
    let mut tmp = p.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let mut f = tokio::fs::File::create(&tmp).await.doing("writing", &tmp)?;
    f.write_all(bytes).await.doing("writing", &tmp)?;
    f.sync_all().await.doing("syncing", &tmp)?;
    tokio::fs::rename(&tmp, p)
        .await
        .doing(&format!("renaming {} to", tmp.display()), p)?;
    sync_dir(p.parent().unwrap_or(Path::new("."))).await
}

/// Syncs the folder `dir`, making the entries created, renamed or removed in it durable.
async fn sync_dir(dir: &Path) -> Result<(), FolderError> {
    tokio::fs::File::open(dir)
        .await
        .doing("syncing the folder", dir)?
        .sync_all()
        .await
        .doing("syncing the folder", dir)
}

async fn remove(p: &Path) -> Result<(), FolderError> {
    match tokio::fs::remove_file(p).await {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(failed("removing", p, e)),
        _ => Ok(()),
    }
}

/// Bytes appended between two checkpoints of a partial file's digest (64 MiB): with a chunk,
/// the most a resumed file's check reads again, within the call that checks it.
const CHECKPOINT_EVERY: u64 = 64 * 1024 * 1024;

/// A partial file's checkpoint as `.hashed.<name>.json` holds it: the file's first `bytes`
/// bytes were synced before it was written, and `midstate` is their SHA-256 midstate
/// ([`ResumableSha256::midstate`], hex).
#[derive(Serialize, Deserialize)]
struct Checkpoint {
    bytes: u64,
    midstate: String,
}

fn checkpoint_json(hashed: &ResumableSha256) -> Vec<u8> {
    serde_json::to_vec(&Checkpoint {
        bytes: hashed.len(),
        midstate: hex::encode(hashed.midstate()),
    })
    .unwrap_or_default()
}

/// The digest so far that the checkpoint at `p` holds; `None` when there is none, or none
/// that reads whole (the check then takes up at the first byte).
async fn read_checkpoint(p: &Path) -> Result<Option<ResumableSha256>, FolderError> {
    let bytes = match tokio::fs::read(p).await {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(failed("reading the checkpoint", p, e)),
    };
    Ok(serde_json::from_slice::<Checkpoint>(&bytes)
        .ok()
        .and_then(|c| {
            let midstate = hex::decode(&c.midstate).ok()?;
            ResumableSha256::resume(&midstate).filter(|h| h.len() == c.bytes)
        }))
}

/// Removes the checkpoint at `p`, durably: a crash must not bring back one of bytes that
/// were dropped.
async fn forget_checkpoint(p: &Path) -> Result<(), FolderError> {
    match tokio::fs::remove_file(p).await {
        Ok(()) => sync_dir(p.parent().unwrap_or(Path::new("."))).await,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(failed("removing", p, e)),
    }
}

/// `from`, having hashed the bytes of the file at `p` from its length up to `to`, reading
/// only those.
async fn hash_range(
    p: &Path,
    mut from: ResumableSha256,
    to: u64,
) -> std::io::Result<ResumableSha256> {
    let mut f = tokio::fs::File::open(p).await?;
    f.seek(std::io::SeekFrom::Start(from.len())).await?;
    let mut f = f.take(to.saturating_sub(from.len()));
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = f.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        from.update(&buf[..n]);
    }
    if from.len() != to {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            format!("the file ended at byte {} of {to}", from.len()),
        ));
    }
    Ok(from)
}

#[cfg(test)]
mod tests {
    use sha2::Digest;

    use super::*;

    const SENDER: &str = "spiffe://dsrelay.dev/processor/payroll-bureau";

    #[test]
    fn senders_are_safe_and_distinct_path_components() {
        assert_eq!(
            sender_component(SENDER),
            "spiffe%3A%2F%2Fdsrelay.dev%2Fprocessor%2Fpayroll-bureau"
        );
        assert_eq!(sender_component(".."), "%2E.");
        assert_eq!(sender_component(""), "%empty");
        assert_ne!(sender_component("a b"), sender_component("a%20b"));
        let long = format!("spiffe://example.org/{}", "p".repeat(300));
        let hashed = sender_component(&long);
        assert!(hashed.starts_with("%sha256-") && hashed.len() <= MAX_COMPONENT);
        assert_ne!(hashed, sender_component(&format!("{long}q")));
    }

    #[tokio::test]
    async fn an_empty_file_is_received_whole_at_once() {
        let root = tempfile::tempdir().expect("tempdir");
        let folder = Folder::new(root.path().to_path_buf());
        let h = ExportFileHeader {
            request_id: "0190-r".into(),
            subprocessor: "accounting".into(),
            name: "empty.csv".into(),
            media_type: "text/csv".into(),
            categories: vec!["contact".into()],
            size: 0,
            sha256: hex::encode(sha2::Sha256::digest(b"")),
        };
        let state = folder.begin(SENDER, &h).await.expect("an empty file");
        assert_eq!((state.offset, state.complete), (0, true));
        let stored = folder
            .part_dir(SENDER, "0190-r", "accounting")
            .join("empty.csv");
        assert_eq!(std::fs::read(stored).expect("stored under its name"), b"");
        let again = folder.begin(SENDER, &h).await.expect("announced again");
        assert!(again.complete);
    }

    /// Writing a JSON file whole fails at one of several steps, on one of two paths, and a
    /// receipt that cannot be read stops a closing: the error says which.
    #[tokio::test]
    async fn a_failed_write_names_its_step_and_its_paths() {
        let root = tempfile::tempdir().expect("tempdir");
        let folder = Folder::new(root.path().to_path_buf());
        let dir = folder.part_dir(SENDER, "0190-r", "accounting");
        // Folders where files belong: root is not stopped by permission bits.
        let tmp = dir.join(".receipt.json.tmp");
        std::fs::create_dir_all(&tmp).expect("a folder in the way");
        let close = || folder.complete_part(SENDER, "0190-r", "accounting", &[], "r", 0);
        let err = close().await.expect_err("the temporary file is a folder");
        assert!(matches!(err, FolderError::Io { .. }), "{err:?}");
        assert_eq!(err.to_string(), format!("writing {}", tmp.display()));

        std::fs::remove_dir(&tmp).expect("clear the way");
        let manifest = dir.join(".manifest.json");
        let tmp = dir.join(".manifest.json.tmp");
        // The first try wrote the manifest before it failed on the receipt.
        std::fs::remove_file(&manifest).expect("the first try's manifest");
        std::fs::create_dir_all(manifest.join("taken")).expect("a folder in the way");
        let err = close().await.expect_err("the manifest is a folder");
        assert_eq!(
            err.to_string(),
            format!("renaming {} to {}", tmp.display(), manifest.display())
        );

        std::fs::remove_dir_all(&manifest).expect("clear the way");
        let receipt = dir.join(".receipt.json");
        std::fs::create_dir_all(&receipt).expect("a folder in the way");
        let err = close().await.expect_err("the receipt is a folder");
        assert_eq!(
            err.to_string(),
            format!("reading the receipt {}", receipt.display())
        );
    }

    /// The checkpoint interval of the tests below, and the chunk they append.
    const EVERY: u64 = 64 * 1024;
    const PIECE: usize = 16 * 1024;
    const NOT_STARTED: FileState = FileState {
        offset: 0,
        complete: false,
    };

    /// A folder at `root` checkpointing every [`EVERY`] bytes.
    fn checkpointed(root: &Path) -> Folder {
        Folder {
            root: root.to_path_buf(),
            checkpoint_every: EVERY,
        }
    }

    fn file_bytes(len: usize, seed: u64) -> Vec<u8> {
        (0..len as u64)
            .map(|i| {
                (i.wrapping_add(seed << 32)
                    .wrapping_mul(0x9e37_79b9_7f4a_7c15)
                    >> 56) as u8
            })
            .collect()
    }

    fn announced(name: &str, data: &[u8]) -> ExportFileHeader {
        ExportFileHeader {
            request_id: "0190-r".into(),
            subprocessor: "accounting".into(),
            name: name.into(),
            media_type: "application/octet-stream".into(),
            categories: vec!["contact".into()],
            size: data.len() as u64,
            sha256: hex::encode(sha2::Sha256::digest(data)),
        }
    }

    /// One stream as the API runs it: `begin`, then `data[from..to]` appended in chunks of
    /// [`PIECE`], the last byte of the file checked, and a stream that ends short synced.
    async fn stream(
        folder: &Folder,
        h: &ExportFileHeader,
        data: &[u8],
        from: usize,
        to: usize,
    ) -> Result<FileState, FolderError> {
        let begun = folder.begin(SENDER, h).await?;
        assert_eq!(begun.offset, from as u64, "{}", h.name);
        let mut at = from;
        let mut checkpoint = None;
        while at < to {
            let end = (at + PIECE).min(to);
            checkpoint = folder.append(SENDER, h, &data[at..end], checkpoint).await?;
            at = end;
            if at == data.len() {
                return folder.finish(SENDER, h).await;
            }
        }
        folder.sync_partial(SENDER, h).await?;
        Ok(FileState {
            offset: to as u64,
            complete: false,
        })
    }

    /// The bytes the checkpoint of `h` covers.
    fn checkpoint_of(folder: &Folder, h: &ExportFileHeader) -> u64 {
        let stored = std::fs::read(folder.checkpoint_path(SENDER, h)).expect("a checkpoint");
        serde_json::from_slice::<Checkpoint>(&stored)
            .expect("a checkpoint")
            .bytes
    }

    fn partial_of(folder: &Folder, h: &ExportFileHeader) -> PathBuf {
        folder.paths(SENDER, h).1
    }

    /// Appends `data` to the partial form of `h` behind the folder's back, durably: bytes
    /// a run appended and synced before it stopped short of its next checkpoint.
    fn append_behind(folder: &Folder, h: &ExportFileHeader, data: &[u8]) {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(partial_of(folder, h))
            .expect("the partial file");
        f.write_all(data).expect("appended");
        f.sync_all().expect("synced");
    }

    /// A file of 40 intervals, received in three streams by three runs of the recipient, is
    /// checked from its checkpoint: the bytes before it are not read again (damaged after
    /// it was written, as only a disk fault could, they go unnoticed), and at most an
    /// interval and a chunk follow it. Before, the whole file was read at its last byte.
    #[tokio::test]
    async fn a_file_is_checked_from_its_checkpoint() {
        let root = tempfile::tempdir().expect("tempdir");
        let data = file_bytes(40 * EVERY as usize + 999, 1);
        let h = announced("large.bin", &data);
        let last = data.len() - 100;
        for (from, to) in [(0, 300_001), (300_001, last)] {
            let state = stream(&checkpointed(root.path()), &h, &data, from, to)
                .await
                .expect("received");
            assert_eq!((state.offset, state.complete), (to as u64, false));
        }
        let folder = checkpointed(root.path());
        let checked = checkpoint_of(&folder, &h);
        assert!(checked > 0 && last as u64 - checked <= folder.max_unchecked());
        let partial = partial_of(&folder, &h);
        let mut stored = std::fs::read(&partial).expect("partial");
        stored[..checked as usize].fill(0);
        std::fs::write(&partial, &stored).expect("damaged before the checkpoint");
        let state = stream(&folder, &h, &data, last, data.len())
            .await
            .expect("checked from its checkpoint");
        assert!(state.complete);
        let done = folder.file_path(SENDER, &h);
        assert!(
            std::fs::read(done).expect("stored")[checked as usize..] == data[checked as usize..]
        );
        assert!(
            !folder.checkpoint_path(SENDER, &h).exists(),
            "its checkpoint went"
        );
    }

    /// Bytes a run appended after the last checkpoint (synced, but the run stopped before
    /// its next checkpoint: up to an interval and a chunk of them) are hashed again before
    /// more are appended: right ones pass the check, a damaged one is DigestMismatch, and
    /// the file and its checkpoint are dropped.
    #[tokio::test]
    async fn bytes_past_the_checkpoint_are_hashed_again() {
        let root = tempfile::tempdir().expect("tempdir");
        let folder = checkpointed(root.path());
        let data = file_bytes(40 * EVERY as usize + 5, 2);
        let cut = 5 * EVERY as usize + 3;
        let behind = cut + EVERY as usize + crate::api::MAX_CHUNK - 100;
        for damage in [false, true] {
            let h = announced(if damage { "torn.bin" } else { "cut.bin" }, &data);
            stream(&folder, &h, &data, 0, cut).await.expect("received");
            let mut tail = data[cut..behind].to_vec();
            if damage {
                tail[7] ^= 1;
            }
            append_behind(&folder, &h, &tail);
            assert!(checkpoint_of(&folder, &h) <= cut as u64);
            let checked = stream(&folder, &h, &data, behind, data.len()).await;
            if !damage {
                assert!(checked.expect("checked").complete);
                continue;
            }
            let err = checked.expect_err("a damaged byte");
            assert!(matches!(err, FolderError::DigestMismatch(_)), "{err:?}");
            assert!(!partial_of(&folder, &h).exists(), "the file was dropped");
            assert!(!folder.checkpoint_path(SENDER, &h).exists());
        }
    }

    /// A partial file without a checkpoint (one from before they were written) is hashed from
    /// its first byte while that is no more than a check reads; a larger one, or one whose
    /// checkpoint does not read, is dropped when it is announced (partial; before, it was
    /// taken up and dropped only at its last byte, sent twice) or checked (whole) and
    /// answered as not started, to be sent again.
    #[tokio::test]
    async fn a_partial_file_without_a_checkpoint() {
        let root = tempfile::tempdir().expect("tempdir");
        let folder = checkpointed(root.path());
        let small = file_bytes(300_000, 3);
        let h = announced("small.bin", &small);
        assert_eq!(folder.begin(SENDER, &h).await.expect("begun").offset, 0);
        append_behind(&folder, &h, &small[..100_000]);
        let state = stream(&folder, &h, &small, 100_000, small.len()).await;
        assert!(state.expect("checked").complete);

        let large = file_bytes(folder.max_unchecked() as usize + PIECE + 1, 4);
        let h = announced("large.bin", &large);
        assert_eq!(folder.begin(SENDER, &h).await.expect("begun").offset, 0);
        let stored = folder.max_unchecked() as usize + 1;
        append_behind(&folder, &h, &large[..stored]);
        assert_eq!(
            folder.begin(SENDER, &h).await.expect("dropped"),
            NOT_STARTED
        );
        assert!(!partial_of(&folder, &h).exists(), "the file was dropped");
        append_behind(&folder, &h, &large[..stored]);
        let checkpoint = folder.checkpoint_path(SENDER, &h);
        std::fs::write(&checkpoint, b"{\"bytes\": 3").expect("a checkpoint that does not read");
        assert_eq!(
            folder.begin(SENDER, &h).await.expect("dropped"),
            NOT_STARTED
        );
        assert!(!partial_of(&folder, &h).exists() && !checkpoint.exists());
        append_behind(&folder, &h, &large);
        let state = folder.begin(SENDER, &h).await.expect("dropped");
        assert_eq!(state, NOT_STARTED);
        let state = stream(&folder, &h, &large, 0, large.len()).await;
        assert!(state.expect("sent again").complete);
    }

    /// Within one stream the checkpoint is read from disk at the first chunk only, and
    /// passed on: a checkpoint path that could not be read (a folder in its place) is not
    /// met by the chunks after it. Before, every chunk read and decoded it again.
    #[tokio::test]
    async fn a_stream_reads_its_checkpoint_once() {
        let root = tempfile::tempdir().expect("tempdir");
        let folder = checkpointed(root.path());
        let data = file_bytes(3 * PIECE, 7);
        let h = announced("once.bin", &data);
        assert_eq!(folder.begin(SENDER, &h).await.expect("begun"), NOT_STARTED);
        let mut checkpoint = folder
            .append(SENDER, &h, &data[..PIECE], None)
            .await
            .expect("the first chunk");
        std::fs::create_dir(folder.checkpoint_path(SENDER, &h)).expect("a folder in the way");
        for piece in data[PIECE..].chunks(PIECE) {
            checkpoint = folder
                .append(SENDER, &h, piece, checkpoint)
                .await
                .expect("the checkpoint is not read again");
        }
        std::fs::remove_dir(folder.checkpoint_path(SENDER, &h)).expect("clear the way");
        let state = folder.finish(SENDER, &h).await.expect("checked");
        assert!(state.complete);
    }

    /// A file restarted under another header forgets the checkpoint of the bytes it dropped
    /// before it takes new ones: kept, it was taken for the new bytes at the next checkpoint
    /// and the file failed its check.
    #[tokio::test]
    async fn a_restarted_file_forgets_its_checkpoint() {
        let root = tempfile::tempdir().expect("tempdir");
        let folder = checkpointed(root.path());
        let first = file_bytes(200_000, 5);
        let before = announced("again.bin", &first);
        stream(&folder, &before, &first, 0, EVERY as usize + PIECE)
            .await
            .expect("received");
        assert_eq!(checkpoint_of(&folder, &before), EVERY);
        let data = file_bytes(200_000, 6);
        let h = announced("again.bin", &data);
        let state = stream(&folder, &h, &data, 0, data.len()).await;
        assert!(state.expect("checked").complete);
    }
}
