//! Where package bytes live: one trait, [`PackageStore`], and its folder implementation,
//! [`FolderStore`]. Keys are `/`-separated relative paths whose components the caller has
//! made safe ([`super::component`]); a store never interprets them beyond that.
//!
//! The trait speaks of appends and streamed reads only, so an S3-compatible store can
//! implement it too (appends as the parts of a multipart upload, reads as a ranged GET).

use std::io;
use std::path::PathBuf;

use tokio::io::{AsyncRead, AsyncWriteExt};

/// A place package files are written to and read from.
// `tonic::async_trait` (the `async-trait` crate tonic re-exports): the registry holds the store
// as `Arc<dyn PackageStore>` so the implementation is chosen by configuration, and native
// async trait methods are not object safe.
#[tonic::async_trait]
pub trait PackageStore: Send + Sync + 'static {
    /// How many bytes are stored under `key` (0 when nothing is).
    async fn stored_len(&self, key: &str) -> io::Result<u64>;
    /// Appends `data` to what is stored under `key`, durably, before answering.
    async fn append(&self, key: &str, data: &[u8]) -> io::Result<()>;
    /// Reads what is stored under `key`, from the start, as a stream of bytes.
    async fn open(&self, key: &str) -> io::Result<Box<dyn AsyncRead + Send + Unpin>>;
    /// Drops what is stored under `key` (nothing stored is fine).
    async fn remove(&self, key: &str) -> io::Result<()>;
    /// Drops everything under `prefix/` (nothing stored is fine).
    async fn remove_all(&self, prefix: &str) -> io::Result<()>;
}

/// Packages as files in a folder: key `a/b/c` is the file `<root>/a/b/c`.
#[derive(Debug, Clone)]
pub struct FolderStore {
    root: PathBuf,
}

impl FolderStore {
    /// A store under `root`, created when the first file is written.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// The path of `key`; a key that could leave the root is refused.
    fn path(&self, key: &str) -> io::Result<PathBuf> {
        let safe = !key.is_empty()
            && key
                .split('/')
                .all(|c| !c.is_empty() && c != "." && c != ".." && !c.contains('\\'));
        if !safe {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("package key {key:?} is not a relative path"),
            ));
        }
        Ok(self.root.join(key))
    }
}

#[tonic::async_trait]
impl PackageStore for FolderStore {
    async fn stored_len(&self, key: &str) -> io::Result<u64> {
        match tokio::fs::metadata(self.path(key)?).await {
            Ok(m) => Ok(m.len()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(0),
            Err(e) => Err(e),
        }
    }

    async fn append(&self, key: &str, data: &[u8]) -> io::Result<()> {
        let path = self.path(key)?;
        if let Some(dir) = path.parent() {
            tokio::fs::create_dir_all(dir).await?;
        }
        let mut file = tokio::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .await?;
        file.write_all(data).await?;
        // The answer tells the sender these bytes are kept: they must survive a crash.
        file.sync_data().await
    }

    async fn open(&self, key: &str) -> io::Result<Box<dyn AsyncRead + Send + Unpin>> {
        let file = tokio::fs::File::open(self.path(key)?).await?;
        Ok(Box::new(file))
    }

    async fn remove(&self, key: &str) -> io::Result<()> {
        ignore_missing(tokio::fs::remove_file(self.path(key)?).await)
    }

    async fn remove_all(&self, prefix: &str) -> io::Result<()> {
        ignore_missing(tokio::fs::remove_dir_all(self.path(prefix)?).await)
    }
}

fn ignore_missing(r: io::Result<()>) -> io::Result<()> {
    match r {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::AsyncReadExt;

    use super::*;

    #[tokio::test]
    async fn appends_read_back_and_removal_is_idempotent() {
        let dir = tempfile::tempdir().unwrap();
        let store = FolderStore::new(dir.path());
        assert_eq!(store.stored_len("r/p/s/a.json").await.unwrap(), 0);
        store.append("r/p/s/a.json", b"hello ").await.unwrap();
        store.append("r/p/s/a.json", b"world").await.unwrap();
        assert_eq!(store.stored_len("r/p/s/a.json").await.unwrap(), 11);
        let mut read = String::new();
        let mut r = store.open("r/p/s/a.json").await.unwrap();
        r.read_to_string(&mut read).await.unwrap();
        assert_eq!(read, "hello world");
        store.remove("r/p/s/a.json").await.unwrap();
        store.remove("r/p/s/a.json").await.unwrap();
        store.append("r/p/s/b.json", b"x").await.unwrap();
        store.remove_all("r").await.unwrap();
        store.remove_all("r").await.unwrap();
        assert_eq!(store.stored_len("r/p/s/b.json").await.unwrap(), 0);
    }

    #[tokio::test]
    async fn keys_cannot_leave_the_root() {
        let store = FolderStore::new("/tmp/nowhere");
        for key in ["", "../x", "a/../../x", "a//b", "/abs", "a\\b"] {
            assert!(store.append(key, b"x").await.is_err(), "{key:?}");
        }
    }
}
