//! Where package bytes live: one trait, [`PackageStore`], and its folder implementation,
//! [`FolderStore`]. Keys are `/`-separated relative paths whose components the caller has
//! made safe ([`dsrelay_runtime::export_files::path_component`]); a store never interprets
//! them beyond that.
//!
//! The trait speaks of appends and streamed reads only, so an S3-compatible store can
//! implement it too (appends as the parts of a multipart upload, reads as a ranged GET).
//!
//! The folder store writes and reads with `O_DIRECT` where the filesystem allows it (see
//! [`super::direct`]), through the page cache elsewhere.
//!
//! Durability: appends go through an [`Appender`], which is made durable by
//! [`Appender::sync`] (once per upload stream, before its answer, and before each checkpoint
//! of the upload's digest, every 64 MiB; not per chunk: a sync per 1 MiB chunk made the
//! upload wait on the disk a thousand times per GiB), and
//! [`PackageStore::stored_len`] syncs what it counts, so no byte is ever reported stored
//! before it is durable.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncSeekExt, AsyncWriteExt};
use tokio::task::JoinHandle;

/// A place package files are written to and read from.
// `tonic::async_trait` (the `async-trait` crate tonic re-exports): the registry holds the store
// as `Arc<dyn PackageStore>` so the implementation is chosen by configuration, and native
// async trait methods are not object safe.
#[tonic::async_trait]
pub trait PackageStore: Send + Sync + 'static {
    /// How many bytes are stored under `key` (0 when nothing is), made durable first: an
    /// upload that broke off may have appended bytes it did not sync.
    async fn stored_len(&self, key: &str) -> io::Result<u64>;
    /// Opens `key` for appending after what is stored (created when absent). `size` is the
    /// file's whole length when known (`None` for a file whose size comes at its end): an
    /// appender that buffers keeps no larger a buffer than the file needs.
    async fn appender(&self, key: &str, size: Option<u64>) -> io::Result<Box<dyn Appender>>;
    /// Reads what is stored under `key`, from the start, as a stream of bytes.
    async fn open(&self, key: &str) -> io::Result<Box<dyn AsyncRead + Send + Unpin>> {
        self.open_at(key, 0).await
    }
    /// Reads what is stored under `key` from byte `offset` on (nothing when it holds no
    /// more), without reading the bytes before it: a resumed upload hashes only its tail.
    async fn open_at(
        &self,
        key: &str,
        offset: u64,
    ) -> io::Result<Box<dyn AsyncRead + Send + Unpin>>;
    /// Drops what is stored under `key` (nothing stored is fine).
    async fn remove(&self, key: &str) -> io::Result<()>;
    /// Drops everything under `prefix/` (nothing stored is fine).
    async fn remove_all(&self, prefix: &str) -> io::Result<()>;
}

/// Appends to one stored file; see the module documentation.
#[tonic::async_trait]
pub trait Appender: Send {
    /// Appends `data`; durable only after [`Appender::sync`].
    async fn append(&mut self, data: &[u8]) -> io::Result<()>;
    /// Makes everything appended so far durable.
    async fn sync(&mut self) -> io::Result<()>;
    /// The length of the file this appender writes, read through its own handle (not by
    /// name, which another call may have given a new file since), counting what it
    /// appended, durable or not.
    async fn file_len(&mut self) -> io::Result<u64>;
}

/// Packages as files in a folder: key `a/b/c` is the file `<root>/a/b/c`.
#[derive(Debug, Clone)]
pub struct FolderStore {
    root: PathBuf,
    /// Whether to try `O_DIRECT` first ([`super::direct`]).
    direct: bool,
}

impl FolderStore {
    /// Opens `path` (its folder exists) for appending, with `O_DIRECT` where it works, for a
    /// file of `size` bytes when known ([`PackageStore::appender`]).
    async fn open_appender(&self, path: &Path, size: Option<u64>) -> io::Result<Box<dyn Appender>> {
        if self.direct {
            let path = path.to_path_buf();
            if let Some(direct) = tokio::task::spawn_blocking(move || {
                super::direct::DirectAppender::open(&path, size)
            })
            .await
            .map_err(io::Error::other)??
            {
                return Ok(Box::new(direct));
            }
        }
        let file = tokio::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .await?;
        let syncer = file.try_clone().await?.into_std().await;
        Ok(Box::new(FileAppender {
            file,
            syncer: Arc::new(syncer),
            writeback: None,
            since_writeback: 0,
        }))
    }

    /// A store under `root`, created when the first file is written.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self {
            root: root.into(),
            direct: true,
        }
    }

    /// A store under `root` that always goes through the page cache, as [`FolderStore::new`]
    /// does on a filesystem without `O_DIRECT`.
    #[cfg(test)]
    fn page_cache(root: impl Into<PathBuf>) -> Self {
        Self {
            root: root.into(),
            direct: false,
        }
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
        let file = match tokio::fs::OpenOptions::new()
            .append(true)
            .open(self.path(key)?)
            .await
        {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(e),
        };
        // The length tells a sender where to resume: what it counts must survive a crash.
        file.sync_data().await?;
        Ok(file.metadata().await?.len())
    }

    async fn appender(&self, key: &str, size: Option<u64>) -> io::Result<Box<dyn Appender>> {
        let path = self.path(key)?;
        if let Some(dir) = path.parent() {
            tokio::fs::create_dir_all(dir).await?;
        }
        let appender = self.open_appender(&path, size).await?;
        // The file's name and the folders created for it must survive a power loss like its
        // bytes do ([`Appender::sync`], `stored_len`), or a part recorded as stored could
        // point at a file that is gone: every folder from the file's up to the one holding
        // the store's root is synced once the file exists.
        let root_parent = self.root.parent().map(Path::to_path_buf);
        let file_dir = path.parent().map(Path::to_path_buf);
        tokio::task::spawn_blocking(move || {
            let Some(file_dir) = file_dir else {
                return Ok(());
            };
            let up_to_root_parent = file_dir
                .ancestors()
                .position(|a| Some(a) == root_parent.as_deref())
                .map_or(usize::MAX, |i| i + 1);
            dsrelay_runtime::direct_io::sync_folders(file_dir.ancestors().take(up_to_root_parent))
        })
        .await
        .map_err(io::Error::other)??;
        Ok(appender)
    }

    async fn open_at(
        &self,
        key: &str,
        offset: u64,
    ) -> io::Result<Box<dyn AsyncRead + Send + Unpin>> {
        let path = self.path(key)?;
        if self.direct {
            let path = path.clone();
            if let Some(direct) =
                tokio::task::spawn_blocking(move || super::direct::reader(&path, offset))
                    .await
                    .map_err(io::Error::other)??
            {
                return Ok(Box::new(direct));
            }
        }
        let mut file = tokio::fs::File::open(path).await?;
        if offset > 0 {
            file.seek(io::SeekFrom::Start(offset)).await?;
        }
        Ok(Box::new(file))
    }

    async fn remove(&self, key: &str) -> io::Result<()> {
        ignore_missing(tokio::fs::remove_file(self.path(key)?).await)
    }

    async fn remove_all(&self, prefix: &str) -> io::Result<()> {
        ignore_missing(tokio::fs::remove_dir_all(self.path(prefix)?).await)
    }
}

/// Bytes appended between two early writebacks: a sync started in the background while the
/// upload goes on, so that the disk works alongside it and [`Appender::sync`] has only the
/// last few MiB left to write.
const WRITEBACK_EVERY: u64 = 32 * 1024 * 1024;

/// [`FolderStore`]'s [`Appender`]: one open file.
struct FileAppender {
    file: tokio::fs::File,
    /// The same file, synced in the background (see [`WRITEBACK_EVERY`]).
    syncer: Arc<std::fs::File>,
    /// The early writeback running, if any.
    writeback: Option<JoinHandle<io::Result<()>>>,
    /// Bytes appended since the last early writeback started.
    since_writeback: u64,
}

impl FileAppender {
    async fn wait_for_writeback(&mut self) -> io::Result<()> {
        match self.writeback.take() {
            Some(running) => running.await.map_err(io::Error::other)?,
            None => Ok(()),
        }
    }
}

#[tonic::async_trait]
impl Appender for FileAppender {
    async fn append(&mut self, data: &[u8]) -> io::Result<()> {
        self.file.write_all(data).await?;
        // tokio's File finishes its last write in the background, and dropping the File does
        // not wait for it: an appender dropped unsynced (an upload cut off) would leave a
        // write that lands after a sender was told the stored length, and its resumed bytes
        // would then follow that write. Waiting here leaves nothing behind.
        self.file.flush().await?;
        self.since_writeback += data.len() as u64;
        if self.since_writeback >= WRITEBACK_EVERY
            && self.writeback.as_ref().is_none_or(JoinHandle::is_finished)
        {
            self.wait_for_writeback().await?;
            let file = Arc::clone(&self.syncer);
            self.writeback = Some(tokio::task::spawn_blocking(move || file.sync_data()));
            self.since_writeback = 0;
        }
        Ok(())
    }

    async fn sync(&mut self) -> io::Result<()> {
        self.wait_for_writeback().await?;
        self.file.sync_data().await
    }

    async fn file_len(&mut self) -> io::Result<u64> {
        // `append` flushed every write, so the handle's metadata counts them all.
        Ok(self.file.metadata().await?.len())
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

    /// Both ways of the folder store: directly where the filesystem allows it (the temporary
    /// folder of these tests must, or the direct code goes untested: checked below), and
    /// through the page cache.
    fn both_stores(root: &std::path::Path) -> [FolderStore; 2] {
        [FolderStore::new(root), FolderStore::page_cache(root)]
    }

    #[tokio::test]
    async fn appends_read_back_and_removal_is_idempotent() {
        for store in both_stores(tempfile::tempdir().unwrap().path()) {
            appends_read_back_and_removal_is_idempotent_in(store).await;
        }
    }

    async fn appends_read_back_and_removal_is_idempotent_in(store: FolderStore) {
        assert_eq!(store.stored_len("r/p/s/a.json").await.unwrap(), 0);
        let mut a = store.appender("r/p/s/a.json", None).await.unwrap();
        a.append(b"hello ").await.unwrap();
        a.sync().await.unwrap();
        drop(a);
        // A new appender continues after what is stored. One dropped without a sync leaves
        // what it synced and maybe more (the page cache keeps unsynced bytes, which
        // stored_len syncs before counting; a direct appender still held them).
        let mut a = store.appender("r/p/s/a.json", None).await.unwrap();
        a.append(b"world").await.unwrap();
        a.sync().await.unwrap();
        assert_eq!(store.stored_len("r/p/s/a.json").await.unwrap(), 11);
        a.append(b"!").await.unwrap();
        drop(a);
        let stored = store.stored_len("r/p/s/a.json").await.unwrap();
        assert!(stored == 11 || stored == 12, "{stored}");
        let mut read = String::new();
        let mut r = store.open("r/p/s/a.json").await.unwrap();
        r.read_to_string(&mut read).await.unwrap();
        assert_eq!(read, &"hello world!"[..stored as usize]);
        store.remove("r/p/s/a.json").await.unwrap();
        store.remove("r/p/s/a.json").await.unwrap();
        let mut b = store.appender("r/p/s/b.json", None).await.unwrap();
        b.append(b"x").await.unwrap();
        b.sync().await.unwrap();
        store.remove_all("r").await.unwrap();
        store.remove_all("r").await.unwrap();
        assert_eq!(store.stored_len("r/p/s/b.json").await.unwrap(), 0);
    }

    async fn read_all(store: &FolderStore, key: &str) -> Vec<u8> {
        let mut read = Vec::new();
        let mut r = store.open(key).await.unwrap();
        r.read_to_end(&mut read).await.unwrap();
        read
    }

    /// Appends of every size across block boundaries, syncs between them, appenders
    /// reopened at unaligned lengths and dropped without a sync: the file always holds a
    /// prefix of what was appended, everything synced, and reads back the same either way.
    #[tokio::test]
    async fn direct_appends_keep_a_prefix_and_read_back_whole() {
        let dir = tempfile::tempdir().unwrap();
        let probe = dir.path().join("probe");
        std::fs::write(&probe, b"").unwrap();
        assert!(
            super::super::direct::reader(&probe, 0).unwrap().is_some(),
            "the temporary folder refuses O_DIRECT, so the direct code would go untested"
        );
        const MIB: usize = 1 << 20;
        let data: Vec<u8> = (0..3 * MIB + 12_345).map(|i| (i * 7 % 251) as u8).collect();
        // Sizes: odd, a block and a bit, the alignment, such that syncs and drops fall at
        // unaligned lengths.
        let pieces = [1, 4095, 4097, MIB + 3, 100, 4096 * 3, MIB - 7];
        for store in both_stores(dir.path()) {
            let key = "r/p/s/big.json";
            store.remove(key).await.unwrap();
            let (mut at, mut synced) = (0usize, 0usize);
            let mut a = store.appender(key, None).await.unwrap();
            for (i, size) in pieces.iter().cycle().enumerate() {
                let end = (at + size).min(data.len());
                a.append(&data[at..end]).await.unwrap();
                at = end;
                if i % 3 == 2 || at == data.len() {
                    a.sync().await.unwrap();
                    synced = at;
                    assert_eq!(store.stored_len(key).await.unwrap() as usize, synced);
                }
                if i % 4 == 3 {
                    // Dropped unsynced: what is stored is a prefix, at least what was synced.
                    drop(a);
                    let stored = store.stored_len(key).await.unwrap() as usize;
                    assert!(
                        (synced..=at).contains(&stored),
                        "{synced} <= {stored} <= {at}"
                    );
                    assert!(
                        read_all(&store, key).await == data[..stored],
                        "{stored} bytes"
                    );
                    at = stored;
                    a = store.appender(key, None).await.unwrap();
                }
                if at == data.len() {
                    break;
                }
            }
            drop(a);
            assert_eq!(store.stored_len(key).await.unwrap() as usize, data.len());
            let read = read_all(&store, key).await;
            assert!(
                read == data,
                "{} bytes read, {} written",
                read.len(),
                data.len()
            );
            // Files of zero bytes and of exactly a block read back too.
            for len in [0, MIB, 4096] {
                let key = format!("r/p/s/{len}.bin");
                store.remove(&key).await.unwrap();
                let mut a = store.appender(&key, None).await.unwrap();
                a.append(&data[..len]).await.unwrap();
                a.sync().await.unwrap();
                assert!(read_all(&store, &key).await == data[..len], "{len} bytes");
            }
        }
    }

    /// A read from an offset (inside a block, on its edge, past the end) gives the bytes
    /// from there on, either way.
    #[tokio::test]
    async fn reads_from_an_offset_give_the_rest() {
        const MIB: u64 = 1 << 20;
        let dir = tempfile::tempdir().unwrap();
        let data: Vec<u8> = (0..2 * MIB + 5000).map(|i| (i * 13 % 251) as u8).collect();
        let len = data.len() as u64;
        for store in both_stores(dir.path()) {
            let key = "r/p/s/ranged.bin";
            store.remove(key).await.unwrap();
            let mut a = store.appender(key, None).await.unwrap();
            a.append(&data).await.unwrap();
            a.sync().await.unwrap();
            for offset in [
                0,
                1,
                4095,
                4096,
                4097,
                MIB - 1,
                MIB,
                MIB + 7,
                len - 1,
                len,
                len + 9,
            ] {
                let mut read = Vec::new();
                let mut r = store.open_at(key, offset).await.unwrap();
                r.read_to_end(&mut read).await.unwrap();
                let from = offset.min(len) as usize;
                assert!(read == data[from..], "{offset}: {} bytes read", read.len());
            }
        }
    }

    /// Files opened with their size known (each smaller than a direct block, so their
    /// appenders buffer less: `direct::buffer_len`) take appends and syncs across their
    /// smaller buffer's edge, reopened at unaligned lengths, and read back whole either way.
    #[tokio::test]
    async fn appenders_of_known_sizes_read_back_whole() {
        let dir = tempfile::tempdir().unwrap();
        let data: Vec<u8> = (0..(1 << 20) - 3).map(|i| (i * 11 % 251) as u8).collect();
        for store in both_stores(dir.path()) {
            for len in [0, 1, 4095, 4096, 4097, 5000, 12_289, data.len()] {
                let key = format!("r/p/s/sized-{len}.bin");
                store.remove(&key).await.unwrap();
                let size = Some(len as u64);
                let mut a = store.appender(&key, size).await.unwrap();
                let half = len / 2;
                a.append(&data[..half]).await.unwrap();
                a.sync().await.unwrap();
                drop(a);
                let mut a = store.appender(&key, size).await.unwrap();
                for piece in data[half..len].chunks(3000) {
                    a.append(piece).await.unwrap();
                }
                a.sync().await.unwrap();
                assert_eq!(store.stored_len(&key).await.unwrap() as usize, len);
                assert!(read_all(&store, &key).await == data[..len], "{len} bytes");
            }
        }
    }

    #[tokio::test]
    async fn keys_cannot_leave_the_root() {
        let store = FolderStore::new("/tmp/nowhere");
        for key in ["", "../x", "a/../../x", "a//b", "/abs", "a\\b"] {
            assert!(store.appender(key, None).await.is_err(), "{key:?}");
            assert!(store.stored_len(key).await.is_err(), "{key:?}");
        }
    }
}
