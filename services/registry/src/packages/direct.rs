//! Package files written and read with `O_DIRECT`, past the page cache.
//!
//! Why: a package is written once and read a few times at most, so caching it only pushes the
//! stores' hot pages out; and on the virtual machines the benchmark runs on, copying into page
//! cache pages the guest has not touched yet costs several times a memory copy (`dd` of 1 GiB
//! with `fdatasync`: about 0.4–0.55 GB/s through the page cache, 1.9–2.0 GB/s with
//! `oflag=direct`; an upload profile spent 56 % of the registry's samples in that copy).
//!
//! Direct I/O needs the buffer's address, the length and the file offset to be multiples of
//! the device's logical block size; [`ALIGN`] is a multiple of every size Linux uses. An
//! appender therefore writes whole blocks directly and keeps the last partial block in its
//! buffer; [`Appender::sync`] writes that tail through the page cache (a direct write would
//! have to pad it, and a crash between writing the padding and cutting it off would leave
//! the padding counted as stored), then syncs the file. The next direct write rewrites the
//! tail's block with what follows it. A filesystem that refuses `O_DIRECT` (`EINVAL` at
//! open) gets the page-cache implementations of [`super::store`] instead.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, ReadBuf};
use tokio::sync::mpsc;

use dsrelay_runtime::direct_io::ALIGN;
use dsrelay_runtime::direct_io::{open_direct, AlignedBuf};

use super::store::Appender;

/// Bytes per direct write or read: an appender's buffer, unless its file is known to be
/// smaller ([`buffer_len`]).
const BLOCK: usize = 1 << 20;
/// Blocks a reader reads ahead of its consumer.
const READ_AHEAD: usize = 2;

/// What a [`DirectAppender`] whose buffer went with a failed write answers from then on.
fn failed_before() -> io::Error {
    io::Error::other("an earlier write to this package file failed")
}

/// The appender of one file; see the module documentation.
pub(super) struct DirectAppender {
    /// Opened with `O_DIRECT`: whole blocks.
    direct: Arc<File>,
    /// The same file through the page cache: reading and writing the tail, and syncing.
    plain: Arc<File>,
    /// The bytes from `base` on not yet written directly; `None` only while a write runs
    /// (or after it failed: the appender is then unusable).
    buf: Option<AlignedBuf>,
    /// Bytes held in `buf`.
    len: usize,
    /// The file offset of `buf`'s first byte, a multiple of [`ALIGN`].
    base: u64,
}

/// The buffer of an appender of a file of `size` bytes (`None`: not known, the file grows
/// until its end): [`BLOCK`], or for a smaller file its size rounded up to [`ALIGN`] (at
/// least one `ALIGN`), so that an upload stream held open costs no more than its file.
/// Always a multiple of `ALIGN`, since a full buffer is written directly at an aligned
/// offset; and at least `ALIGN`, which any unaligned tail read back at the open fits in.
fn buffer_len(size: Option<u64>) -> usize {
    match size {
        Some(size) if size < BLOCK as u64 => (size as usize).div_ceil(ALIGN).max(1) * ALIGN,
        _ => BLOCK,
    }
}

impl DirectAppender {
    /// Opens (creating) `path` to append after what it holds, for a file of `size` bytes
    /// when known ([`buffer_len`]); `None` when the filesystem refuses `O_DIRECT`. Blocking.
    pub(super) fn open(path: &Path, size: Option<u64>) -> io::Result<Option<Self>> {
        let plain = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(path)?;
        let Some(direct) = open_direct(path, OpenOptions::new().write(true))? else {
            return Ok(None);
        };
        let stored = plain.metadata()?.len();
        let tail = (stored % ALIGN as u64) as usize;
        let base = stored - tail as u64;
        let mut buf = AlignedBuf::new(buffer_len(size));
        plain.read_exact_at(&mut buf.bytes_mut()[..tail], base)?;
        Ok(Some(Self {
            direct: Arc::new(direct),
            plain: Arc::new(plain),
            buf: Some(buf),
            len: tail,
            base,
        }))
    }

    fn take_buf(&mut self) -> io::Result<AlignedBuf> {
        self.buf.take().ok_or_else(failed_before)
    }

    /// Writes the first `n` bytes of the buffer (a multiple of [`ALIGN`]) directly at
    /// `base`, then moves what follows them to the buffer's front.
    async fn write_direct(&mut self, n: usize) -> io::Result<()> {
        let buf = self.take_buf()?;
        let (file, at) = (Arc::clone(&self.direct), self.base);
        let (mut buf, written) = tokio::task::spawn_blocking(move || {
            let written = file.write_all_at(&buf.bytes()[..n], at);
            (buf, written)
        })
        .await
        .map_err(io::Error::other)?;
        written?;
        buf.bytes_mut().copy_within(n..self.len, 0);
        self.len -= n;
        self.base += n as u64;
        self.buf = Some(buf);
        Ok(())
    }
}

#[tonic::async_trait]
impl Appender for DirectAppender {
    async fn append(&mut self, mut data: &[u8]) -> io::Result<()> {
        while !data.is_empty() {
            let len = self.len;
            let buf = self.buf.as_mut().ok_or_else(failed_before)?;
            let block = buf.bytes().len();
            let n = (block - len).min(data.len());
            buf.bytes_mut()[len..len + n].copy_from_slice(&data[..n]);
            self.len += n;
            data = &data[n..];
            if self.len == block {
                self.write_direct(block).await?;
            }
        }
        Ok(())
    }

    async fn sync(&mut self) -> io::Result<()> {
        let whole = self.len / ALIGN * ALIGN;
        if whole > 0 {
            self.write_direct(whole).await?;
        }
        let buf = self.take_buf()?;
        let (file, at, len) = (Arc::clone(&self.plain), self.base, self.len);
        let (buf, synced) = tokio::task::spawn_blocking(move || {
            let synced = file
                .write_all_at(&buf.bytes()[..len], at)
                .and_then(|()| file.sync_data());
            (buf, synced)
        })
        .await
        .map_err(io::Error::other)?;
        synced?;
        // The tail stays in the buffer: the next direct write starts at its block.
        self.buf = Some(buf);
        Ok(())
    }

    async fn file_len(&mut self) -> io::Result<u64> {
        // The file holds everything before `base`, and the buffered tail once synced; more
        // than that only if another writer appended to the same file.
        let plain = Arc::clone(&self.plain);
        let on_disk = tokio::task::spawn_blocking(move || plain.metadata())
            .await
            .map_err(io::Error::other)??
            .len();
        Ok(on_disk.max(self.base + self.len as u64))
    }
}

/// Reads `path` from byte `offset` on with `O_DIRECT`, [`READ_AHEAD`] blocks ahead of the
/// consumer; `None` when the filesystem refuses `O_DIRECT`. The consumer reads straight from
/// the aligned buffers the disk filled and hands each back once it has read it, so a file's
/// reading reuses a few buffers and copies nothing on the way. The reading starts at the
/// block boundary below `offset` (direct reads are aligned) and skips the bytes before it.
pub(super) fn reader(path: &Path, offset: u64) -> io::Result<Option<DirectReader>> {
    let Some(file) = open_direct(path, OpenOptions::new().read(true))? else {
        return Ok(None);
    };
    let (tx, rx) = mpsc::channel(READ_AHEAD);
    let (spare_tx, spare_rx) = std::sync::mpsc::channel::<AlignedBuf>();
    let start = offset / ALIGN as u64 * ALIGN as u64;
    let skip = (offset - start) as usize;
    tokio::task::spawn_blocking(move || {
        let mut at = start;
        loop {
            let mut buf = spare_rx
                .try_recv()
                .unwrap_or_else(|_| AlignedBuf::new(BLOCK));
            let read = file.read_at(buf.bytes_mut(), at);
            let last = !matches!(read, Ok(n) if n > 0 && n % ALIGN == 0);
            let block = read.map(|n| {
                at += n as u64;
                (buf, n)
            });
            // A consumer that went away stops the reading.
            if tx.blocking_send(block).is_err() || last {
                return;
            }
        }
    });
    Ok(Some(DirectReader {
        blocks: rx,
        block: None,
        len: 0,
        pos: 0,
        skip,
        spares: spare_tx,
    }))
}

/// The consuming end of [`reader`]: an [`AsyncRead`] over the blocks it reads.
pub(super) struct DirectReader {
    blocks: mpsc::Receiver<io::Result<(AlignedBuf, usize)>>,
    /// The block being read, its first `len` bytes the file's.
    block: Option<AlignedBuf>,
    len: usize,
    pos: usize,
    /// Bytes of the first block before the offset asked for.
    skip: usize,
    /// Where read blocks go back to the reading thread.
    spares: std::sync::mpsc::Sender<AlignedBuf>,
}

impl AsyncRead for DirectReader {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            if let Some(block) = &self.block {
                if self.pos < self.len {
                    let n = (self.len - self.pos).min(out.remaining());
                    out.put_slice(&block.bytes()[self.pos..self.pos + n]);
                    self.pos += n;
                    return Poll::Ready(Ok(()));
                }
            }
            if let Some(read) = self.block.take() {
                // The reading thread may have ended (the file's last block): then it is dropped.
                let _ = self.spares.send(read);
            }
            match ready!(self.blocks.poll_recv(cx)) {
                Some(Ok((block, len))) => {
                    self.block = Some(block);
                    self.len = len;
                    self.pos = std::mem::take(&mut self.skip).min(len);
                }
                Some(Err(e)) => return Poll::Ready(Err(e)),
                // The reading ended after the file's last block.
                None => return Poll::Ready(Ok(())),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A file whose size is known and below a block gets a buffer of its size rounded up to
    /// the alignment, so an upload held open with little sent costs little; a growing file,
    /// or one of a block or more, gets a whole block.
    #[test]
    fn a_buffer_is_no_larger_than_its_file_needs() {
        for (size, len) in [
            (Some(0), ALIGN),
            (Some(1), ALIGN),
            (Some(ALIGN as u64), ALIGN),
            (Some(ALIGN as u64 + 1), 2 * ALIGN),
            (Some(BLOCK as u64 - 1), BLOCK),
            (Some(BLOCK as u64), BLOCK),
            (Some(u64::MAX), BLOCK),
            (None, BLOCK),
        ] {
            assert_eq!(buffer_len(size), len, "{size:?}");
            assert_eq!(len % ALIGN, 0);
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("small");
        std::fs::write(&path, [7u8; 5]).unwrap();
        let opened = DirectAppender::open(&path, Some(10))
            .unwrap()
            .expect("the temporary folder takes O_DIRECT");
        let buf = opened.buf.as_ref().expect("a buffer");
        assert_eq!(buf.bytes().len(), ALIGN);
        assert_eq!(&buf.bytes()[..opened.len], &[7u8; 5]);
    }
}
