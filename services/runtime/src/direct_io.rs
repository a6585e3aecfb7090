//! Files written or read with `O_DIRECT`, past the page cache: the registry's package files
//! and the processor's export files.
//!
//! Direct I/O needs the buffer's address, the length and the file offset to be multiples of
//! the device's logical block size; [`ALIGN`] is a multiple of every size Linux uses.
//! [`AlignedBuf`] gives a buffer whose address is aligned; the callers keep lengths and
//! offsets aligned, and write what is not through the page cache.
//!
//! A synced file is not yet durable under its name: [`sync_folders`] makes the entries of the
//! folders that hold it durable too.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// Offsets, lengths and buffer addresses of direct I/O are multiples of this.
pub const ALIGN: usize = 4096;

/// Opens `path` with `O_DIRECT` as `options` says; `None` when the filesystem refuses it
/// (`EINVAL`, as tmpfs answers).
pub fn open_direct(path: &Path, options: &mut OpenOptions) -> io::Result<Option<File>> {
    match options.custom_flags(libc::O_DIRECT).open(path) {
        Ok(f) => Ok(Some(f)),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok(None),
        Err(e) => Err(e),
    }
}

/// A fixed number of bytes at an [`ALIGN`]-aligned address, carved out of a vector that is
/// never resized, so the address never moves.
#[derive(Debug)]
pub struct AlignedBuf {
    vec: Vec<u8>,
    start: usize,
    size: usize,
}

impl AlignedBuf {
    /// `size` zeroed bytes.
    pub fn new(size: usize) -> Self {
        let vec = vec![0u8; size + ALIGN];
        // Always below ALIGN for a byte pointer; clamped so that a surprise makes a direct
        // call fail with EINVAL rather than slice out of bounds.
        let start = vec.as_ptr().align_offset(ALIGN).min(ALIGN);
        Self { vec, start, size }
    }

    /// All of its bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.vec[self.start..self.start + self.size]
    }

    /// All of its bytes, to fill.
    pub fn bytes_mut(&mut self) -> &mut [u8] {
        &mut self.vec[self.start..self.start + self.size]
    }
}

/// Syncs each of `folders` (blocking), so that the entries created in them (a file's name, a
/// folder made for it) survive a power loss; an empty path, the last ancestor of a relative
/// one, is the working directory.
pub fn sync_folders<'a>(folders: impl IntoIterator<Item = &'a Path>) -> io::Result<()> {
    for folder in folders {
        let folder = if folder.as_os_str().is_empty() {
            Path::new(".")
        } else {
            folder
        };
        File::open(folder)?.sync_all()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {

    #[test]
    fn folders_of_absolute_and_relative_paths_are_synced() {
        let dir = tempfile::tempdir().expect("tempdir");
        let deep = dir.path().join("a").join("b");
        std::fs::create_dir_all(&deep).expect("folders");
        sync_folders(deep.ancestors().take(3)).expect("absolute");
        sync_folders(Path::new("src").ancestors())
            .expect("relative, ending at the working directory");
        assert!(sync_folders([dir.path().join("missing").as_path()]).is_err());
    }
    use super::*;

    #[test]
    fn a_buffer_is_aligned_and_of_its_size() {
        for size in [ALIGN, 1 << 20, 3 * ALIGN] {
            let mut b = AlignedBuf::new(size);
            assert_eq!(b.bytes().len(), size);
            assert_eq!(b.bytes_mut().as_ptr().align_offset(ALIGN), 0);
        }
    }
}
