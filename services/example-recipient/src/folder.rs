//! The data folder: each task's part in `<root>/<request_id>/<subprocessor>/`, a file as
//! `<name>.partial` until its SHA-256 matched and `<name>` after, the header it was announced
//! with in `.header.<name>.json` (file names never start with '.', so these never collide),
//! and a closed part's `.manifest.json` and `.receipt.json`. Files are hashed in chunks,
//! never read whole.
//!
//! The sender deletes its copy once it holds the receipt and resumes a file from the offset
//! it is told, so nothing is answered before what it confirms is on disk: a partial file's
//! bytes and name are synced before its offset is answered (not per chunk: nothing is
//! answered per chunk), a file's bytes before it is renamed complete, the JSON files are
//! written whole as `<name>.tmp`, synced and renamed, and a folder in which an entry was
//! created or renamed is synced before the answer that counts on it.

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
    /// The file system failed.
    #[error(transparent)]
    Io(#[from] std::io::Error),
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

    /// The folder of one task's part. Callers have checked that both names are safe path
    /// components.
    pub fn part_dir(&self, request_id: &str, subprocessor: &str) -> PathBuf {
        self.root.join(request_id).join(subprocessor)
    }

    fn paths(&self, h: &ExportFileHeader) -> (PathBuf, PathBuf, PathBuf) {
        let dir = self.part_dir(&h.request_id, &h.subprocessor);
        (
            dir.join(&h.name),
            dir.join(format!("{}.partial", h.name)),
            dir.join(format!(".header.{}.json", h.name)),
        )
    }

    /// Registers the file `h` announces and answers where it stands: a file announced with
    /// another header restarts (or, once complete, is a conflict); a partial file holding
    /// every byte is checked now.
    pub async fn begin(&self, h: &ExportFileHeader) -> Result<FileState, FolderError> {
        let (done, partial, meta) = self.paths(h);
        let announced = StoredHeader::from(h);
        let stored: Option<StoredHeader> = match tokio::fs::read(&meta).await {
            Ok(b) => serde_json::from_slice(&b).ok(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(e.into()),
        };
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
            create_part_dir(&self.part_dir(&h.request_id, &h.subprocessor)).await?;
            write_durably(&meta, &serde_json::to_vec(&announced).unwrap_or_default()).await?;
        }
        let offset = match tokio::fs::metadata(&partial).await {
            Ok(m) => m.len(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
            Err(e) => return Err(e.into()),
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
            return self.finish(h).await;
        }
        if offset > 0 {
            // A run that ended before syncing may have left bytes only in the page cache, and
            // the sender resumes after what is answered here.
            self.sync_partial(h).await?;
        }
        Ok(FileState {
            offset,
            complete: false,
        })
    }

    /// Appends checked bytes to the file's partial form. They are not synced here: the caller
    /// calls [`Folder::sync_partial`] before it answers the offset they reach.
    pub async fn append(&self, h: &ExportFileHeader, data: &[u8]) -> Result<(), FolderError> {
        let (_, partial, _) = self.paths(h);
        let mut f = tokio::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&partial)
            .await?;
        f.write_all(data).await?;
        f.flush().await?;
        Ok(())
    }

    /// Syncs the bytes and the name of the file's partial form, if there is one.
    pub async fn sync_partial(&self, h: &ExportFileHeader) -> Result<(), FolderError> {
        let (_, partial, _) = self.paths(h);
        match tokio::fs::File::open(&partial).await {
            Ok(f) => f.sync_data().await?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e.into()),
        }
        sync_dir(&self.part_dir(&h.request_id, &h.subprocessor)).await?;
        Ok(())
    }

    /// Checks a file holding every byte against its SHA-256: a match gives it its name; a
    /// mismatch drops it so the sender starts it again.
    pub async fn finish(&self, h: &ExportFileHeader) -> Result<FileState, FolderError> {
        let (done, partial, _) = self.paths(h);
        if h.size == 0 {
            // A file of no bytes gets no chunk, and a chunk is what creates the partial form.
            self.append(h, &[]).await?;
        }
        let digest = sha256_of(&partial).await?;
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
        tokio::fs::File::open(&partial).await?.sync_all().await?;
        tokio::fs::rename(&partial, &done).await?;
        sync_dir(&self.part_dir(&h.request_id, &h.subprocessor)).await?;
        Ok(FileState {
            offset: h.size,
            complete: true,
        })
    }

    /// Closes a part: every file listed must be stored complete as announced. Writes the
    /// canonical manifest and the receipt the first time; answers the stored receipt when the
    /// same part is closed again.
    pub async fn complete_part(
        &self,
        request_id: &str,
        subprocessor: &str,
        files: &[ExportFileHeader],
        recipient: &str,
        now_ms: i64,
    ) -> Result<Receipt, FolderError> {
        let manifest_sha256 =
            dsrelay_runtime::transfer_manifest::sha256(request_id, subprocessor, files);
        let dir = self.part_dir(request_id, subprocessor);
        let receipt_path = dir.join(".receipt.json");
        if let Ok(b) = tokio::fs::read(&receipt_path).await {
            if let Ok(r) = serde_json::from_slice::<Receipt>(&b) {
                if r.manifest_sha256 == manifest_sha256 {
                    // A run that renamed it may have ended before syncing the folder.
                    sync_dir(&dir).await?;
                    return Ok(r);
                }
                return Err(FolderError::Conflict(format!(
                    "the part of {subprocessor} was closed with other files (manifest \
                     SHA-256 {})",
                    r.manifest_sha256
                )));
            }
        }
        let mut missing = Vec::new();
        for h in files {
            let (done, _, meta) = self.paths(h);
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
        let receipt = Receipt {
            request_id: request_id.to_string(),
            subprocessor: subprocessor.to_string(),
            manifest_sha256,
            bytes: files.iter().map(|f| f.size).sum(),
            files: u32::try_from(files.len()).unwrap_or(u32::MAX),
            received_at_ms: now_ms,
            recipient: recipient.to_string(),
        };
        write_durably(
            &dir.join(".manifest.json"),
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

async fn exists(p: &Path) -> std::io::Result<bool> {
    tokio::fs::try_exists(p).await
}

/// Creates a part's folder `<root>/<request_id>/<subprocessor>` and syncs the two folders
/// above it, so its name and its request's survive a crash with the files in it.
async fn create_part_dir(dir: &Path) -> std::io::Result<()> {
    tokio::fs::create_dir_all(dir).await?;
    for above in dir.ancestors().skip(1).take(2) {
        sync_dir(above).await?;
    }
    Ok(())
}

/// Replaces the file at `p` with `bytes`, durably: a crash leaves the old file or the new one
/// whole (a temporary `<p>.tmp` synced, then renamed), and the folder is synced after.
async fn write_durably(p: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut tmp = p.as_os_str().to_owned();
    tmp.push(".tmp");
    let mut f = tokio::fs::File::create(&tmp).await?;
    f.write_all(bytes).await?;
    f.sync_all().await?;
    tokio::fs::rename(&tmp, p).await?;
    sync_dir(p.parent().unwrap_or(Path::new("."))).await
}

/// Syncs the folder `dir`, making the entries created, renamed or removed in it durable.
async fn sync_dir(dir: &Path) -> std::io::Result<()> {
    tokio::fs::File::open(dir).await?.sync_all().await
}

async fn remove(p: &Path) -> std::io::Result<()> {
    match tokio::fs::remove_file(p).await {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
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
        let state = folder.begin(&h).await.expect("an empty file");
        assert_eq!((state.offset, state.complete), (0, true));
        let stored = folder.part_dir("0190-r", "accounting").join("empty.csv");
        assert_eq!(std::fs::read(stored).expect("stored under its name"), b"");
        let again = folder.begin(&h).await.expect("announced again");
        assert!(again.complete);
    }
}
