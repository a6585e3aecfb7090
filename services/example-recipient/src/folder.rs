//! The data folder: each task's part in `<root>/<sender>/<request_id>/<subprocessor>/`, a
//! file as `<name>.partial` until its SHA-256 matched and `<name>` after, the header it was
//! announced with in `.header.<name>.json` (file names never start with '.', so these never
//! collide), and a closed part's `.manifest.json` and `.receipt.json`. Files are hashed in
//! chunks, never read whole. `<sender>` is the sending processor's certificate identity as
//! one path component ([`sender_component`]): subprocessor names are unique only within a
//! processor, so two processors transferring for the same request must not share a part.
//!
//! The sender deletes its copy once it holds the receipt and resumes a file from the offset
//! it is told, so nothing is answered before what it confirms is on disk: a partial file's
//! bytes and name are synced before its offset is answered (not per chunk: nothing is
//! answered per chunk), a file's bytes before it is renamed complete, the JSON files are
//! written whole as `<name>.tmp`, synced and renamed, and a folder in which an entry was
//! created or renamed is synced before the answer that counts on it.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use dsrelay_proto::v1::ExportFileHeader;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Why the folder refused something.
#[derive(Debug, thiserror::Error)]
pub enum FolderError {
    /// The call contradicts what is stored (a complete file announced differently, a closed
    /// part closed with other files).
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
        /// The step that failed and the path it failed on ("appending to <path>").
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
    /// The certificate identity of the processor that sent the part (not in the
    /// `TransferReceipt` answered, which has no field for it; the sender knows itself).
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
}

impl Folder {
    /// The folder at `root` (which must exist).
    pub fn new(root: PathBuf) -> Self {
        Self { root }
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
    /// another header restarts (or, once complete, is a conflict); a partial file holding
    /// every byte is checked now. In a closed part nothing changes: a file its manifest lists
    /// as announced is complete, any other is a conflict.
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
            return Err(FolderError::Conflict(format!(
                "file {} is already stored with another size, digest, media type or categories",
                h.name
            )));
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
            // A run that ended before syncing may have left bytes only in the page cache, and
            // the sender resumes after what is answered here.
            self.sync_partial(sender, h).await?;
        }
        Ok(FileState {
            offset,
            complete: false,
        })
    }

    /// Appends checked bytes to the file's partial form. They are not synced here: the caller
    /// calls [`Folder::sync_partial`] before it answers the offset they reach.
    pub async fn append(
        &self,
        sender: &str,
        h: &ExportFileHeader,
        data: &[u8],
    ) -> Result<(), FolderError> {
        let (_, partial, _) = self.paths(sender, h);
        let mut f = tokio::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&partial)
            .await
            .doing("appending to", &partial)?;
        f.write_all(data).await.doing("appending to", &partial)?;
        // tokio writes in the background: a write that failed shows only here.
        f.flush().await.doing("appending to", &partial)?;
        Ok(())
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

    /// Checks a file holding every byte against its SHA-256: a match gives it its name; a
    /// mismatch drops it so the sender starts it again.
    pub async fn finish(
        &self,
        sender: &str,
        h: &ExportFileHeader,
    ) -> Result<FileState, FolderError> {
        let (done, partial, _) = self.paths(sender, h);
        if h.size == 0 {
            // A file of no bytes gets no chunk, and a chunk is what creates the partial form.
            self.append(sender, h, &[]).await?;
        }
        let digest = sha256_of(&partial).await.doing("hashing", &partial)?;
        if digest != h.sha256 {
            remove(&partial).await?;
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

/// SHA-256 of the file at `p`, read in chunks.
pub async fn sha256_of(p: &Path) -> std::io::Result<String> {
    let mut f = tokio::fs::File::open(p).await?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = f.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex::encode(hasher.finalize()))
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
}
