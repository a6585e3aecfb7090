//! Writing a downloaded package as its chunks arrive: checking the manifest's paths,
//! verifying every file's size and SHA-256, and writing to a folder or a zip file.
//!
//! [`Unpacker`] is the state machine (which file a chunk belongs to, what each file's check
//! says); a [`Sink`] is where the bytes go ([`DirSink`], [`ZipSink`]). Nothing holds more than
//! one chunk: each is hashed and written, then dropped.
//!
//! A folder with `manifest.json` vouches for the package (`dsrctl contracts confirm --package`
//! has the source delete the data on its word), so [`DirSink`] writes the manifest only once
//! every file verified, and both sinks make what they wrote durable before reporting success.
//! [`check_folder`] checks such a folder again.

use std::collections::{BTreeSet, HashSet};
use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use dsrelay_sdk::proto::{ManifestFile, PackageFileChunk, PackageInfo};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use zip::write::SimpleFileOptions;
use zip::{CompressionMethod, ZipWriter};

/// The manifest's name at the top of a package.
pub(crate) const MANIFEST_NAME: &str = "manifest.json";

/// Refuses a manifest path that could land outside the output: absolute, with `..`, `.` or
/// empty components, with backslashes (a separator on Windows), colons (a drive or an
/// alternate data stream on Windows) or NUL bytes, or one that would replace the manifest.
pub(crate) fn check_path(path: &str) -> Result<(), String> {
    if path.is_empty() {
        return Err("is empty".into());
    }
    if path.starts_with('/') {
        return Err("is absolute".into());
    }
    if path.contains('\\') {
        return Err("contains a backslash".into());
    }
    if path.contains(':') {
        return Err("contains a colon".into());
    }
    if path.contains('\0') {
        return Err("contains a NUL byte".into());
    }
    for component in path.split('/') {
        match component {
            "" => return Err("has an empty component".into()),
            "." | ".." => return Err(format!("has a {component:?} component")),
            _ => {}
        }
    }
    if path == MANIFEST_NAME {
        return Err(format!("would replace {MANIFEST_NAME}"));
    }
    Ok(())
}

/// Checks one file against its manifest entry as its chunks arrive.
#[derive(Debug)]
pub(crate) struct FileCheck {
    size: u64,
    sha256: String,
    received: u64,
    hasher: Sha256,
}

impl FileCheck {
    /// Expects `file`'s size and SHA-256.
    pub(crate) fn new(file: &ManifestFile) -> Self {
        Self {
            size: file.size,
            sha256: file.sha256.to_ascii_lowercase(),
            received: 0,
            hasher: Sha256::new(),
        }
    }

    /// Accepts the next chunk: it must start where the previous one ended and stay within
    /// the size; otherwise the file cannot be right and the reason says why.
    pub(crate) fn push(&mut self, offset: u64, data: &[u8]) -> Result<(), String> {
        if offset != self.received {
            return Err(format!(
                "chunk at offset {offset}, expected {}",
                self.received
            ));
        }
        let end = self.received + data.len() as u64;
        if end > self.size {
            return Err(format!("more than the {} bytes in the manifest", self.size));
        }
        self.hasher.update(data);
        self.received = end;
        Ok(())
    }

    /// Bytes accepted so far.
    #[cfg(test)]
    fn received(&self) -> u64 {
        self.received
    }

    /// The verdict once every chunk is in: the size and the SHA-256 must match.
    pub(crate) fn finish(self) -> Result<(), String> {
        if self.received != self.size {
            return Err(format!("ended at {} of {} bytes", self.received, self.size));
        }
        let digest = hex::encode(self.hasher.finalize());
        if digest != self.sha256 {
            return Err(format!(
                "SHA-256 is {digest}, the manifest says {}",
                self.sha256
            ));
        }
        Ok(())
    }
}

/// What `check_folder` reads of `manifest.json`.
#[derive(Deserialize)]
struct Listing {
    files: Vec<Listed>,
}

/// One file as `manifest.json` lists it.
#[derive(Deserialize)]
struct Listed {
    path: String,
    size: u64,
    sha256: String,
}

/// Checks a folder that `manifest_json` (its `manifest.json`) describes: every file the
/// manifest lists must be at its path with its size and SHA-256, as `download --out` left
/// them. `Err` names each file that is missing or differs, or why the manifest lists none.
pub(crate) fn check_folder(root: &Path, manifest_json: &[u8]) -> Result<(), String> {
    let listing: Listing = serde_json::from_slice(manifest_json)
        .map_err(|e| format!("its {MANIFEST_NAME} is not a package's manifest ({e})"))?;
    let problems: Vec<String> = listing
        .files
        .iter()
        .filter_map(|f| {
            let verdict = check_path(&f.path)
                .map_err(|reason| format!("the path {reason}"))
                .and_then(|()| check_file(&root.join(&f.path), f));
            verdict.err().map(|reason| format!("{}: {reason}", f.path))
        })
        .collect();
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.join("; "))
    }
}

/// Checks the file at `path` against its listing.
fn check_file(path: &Path, listed: &Listed) -> Result<(), String> {
    let mut file = match File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err("missing".into()),
        Err(e) => return Err(e.to_string()),
    };
    let mut check = FileCheck::new(&ManifestFile {
        path: listed.path.clone(),
        size: listed.size,
        sha256: listed.sha256.clone(),
        ..Default::default()
    });
    let mut buf = vec![0; 64 * 1024];
    let mut offset = 0;
    loop {
        let n = match file.read(&mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e.to_string()),
        };
        if n == 0 {
            return check.finish();
        }
        check.push(offset, &buf[..n])?;
        offset += n as u64;
    }
}

/// Makes `file`, written at `path`, durable.
fn sync_file(file: &File, path: &Path) -> anyhow::Result<()> {
    file.sync_all()
        .with_context(|| format!("syncing {}", path.display()))?;
    #[cfg(test)]
    tests::synced(path);
    Ok(())
}

/// Makes the entries of each of `folders` durable (a file's name, a folder made for it).
fn sync_folders<'a>(folders: impl IntoIterator<Item = &'a Path>) -> anyhow::Result<()> {
    for folder in folders {
        dsrelay_runtime::direct_io::sync_folders([folder])
            .with_context(|| format!("syncing the folder {}", folder.display()))?;
        #[cfg(test)]
        tests::synced(folder);
    }
    Ok(())
}

/// Flushes `writer` and makes its file, written at `path`, durable.
fn close_durably(writer: BufWriter<File>, path: &Path) -> anyhow::Result<()> {
    let file = writer
        .into_inner()
        .map_err(std::io::IntoInnerError::into_error)
        .with_context(|| format!("writing {}", path.display()))?;
    sync_file(&file, path)
}

/// Where a package's bytes go. Calls come in order: `manifest`, then `begin`, `write`s and
/// `end` per file, then `finish` or `abort`.
pub(crate) trait Sink {
    /// Takes `manifest.json`, to store with the files.
    fn manifest(&mut self, json: &[u8]) -> anyhow::Result<()>;
    /// Starts the file at `path` (already checked by [`check_path`]), of `size` bytes.
    fn begin(&mut self, path: &str, size: u64) -> anyhow::Result<()>;
    /// Appends to the current file.
    fn write(&mut self, data: &[u8]) -> anyhow::Result<()>;
    /// Ends the current file; `verified` false when it failed its check.
    fn end(&mut self, verified: bool) -> anyhow::Result<()>;
    /// Ends the package; `verified` false when some file failed. Returns what was done
    /// with the failures, for the user. With `verified`, what was written is durable once
    /// this returns `Ok`.
    fn finish(self: Box<Self>, verified: bool) -> anyhow::Result<Option<String>>;
    /// Gives up after an error: removes what cannot be trusted.
    fn abort(self: Box<Self>);
}

/// Writes a package into a folder, each file at its manifest path; a file that fails its
/// check is deleted. `manifest.json` is written last, only when every file verified.
pub(crate) struct DirSink {
    root: PathBuf,
    /// `manifest.json`, kept back until every file verified.
    manifest: Option<Vec<u8>>,
    /// Every folder whose entries the download changed: each is synced before success.
    folders: BTreeSet<PathBuf>,
    current: Option<(PathBuf, BufWriter<File>)>,
}

impl DirSink {
    /// Refuses a folder that exists and is not empty: a package written over other files
    /// could mix with them, and an existing symbolic link inside could redirect a write
    /// outside the folder.
    pub(crate) fn check_target(root: &Path) -> Result<(), String> {
        match std::fs::read_dir(root).map(|mut entries| entries.next().is_none()) {
            Ok(true) => Ok(()),
            Ok(false) => Err(format!("--out {} is not empty", root.display())),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(err) => Err(format!("--out {}: {err}", root.display())),
        }
    }

    /// Creates the folder (and its parents).
    pub(crate) fn create(root: &Path) -> anyhow::Result<Self> {
        // The folders made here, and the one that was there, gain entries.
        let mut folders = BTreeSet::new();
        for folder in root.ancestors() {
            folders.insert(folder.to_path_buf());
            if folder.exists() {
                break;
            }
        }
        std::fs::create_dir_all(root).with_context(|| format!("creating {}", root.display()))?;
        Ok(Self {
            root: root.to_path_buf(),
            manifest: None,
            folders,
            current: None,
        })
    }

    fn create_file(&mut self, path: &str) -> anyhow::Result<(PathBuf, BufWriter<File>)> {
        let full = self.root.join(path);
        if let Some(parent) = full.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("creating {}", parent.display()))?;
            for folder in parent.ancestors().take_while(|f| *f != self.root) {
                self.folders.insert(folder.to_path_buf());
            }
        }
        // create_new: a path given twice must not silently replace the first file.
        let file = File::options()
            .write(true)
            .create_new(true)
            .open(&full)
            .with_context(|| format!("creating {}", full.display()))?;
        Ok((full, BufWriter::with_capacity(64 * 1024, file)))
    }

    /// Writes `manifest.json` and makes the whole folder durable.
    fn seal(&mut self) -> anyhow::Result<()> {
        if let Some(json) = self.manifest.take() {
            let (full, mut file) = self.create_file(MANIFEST_NAME)?;
            let written = file
                .write_all(json.as_slice())
                .with_context(|| format!("writing {}", full.display()))
                .and_then(|()| close_durably(file, &full))
                .and_then(|()| sync_folders(self.folders.iter().rev().map(PathBuf::as_path)));
            if written.is_err() {
                // Not durable, so it must not vouch for the folder.
                let _ = std::fs::remove_file(&full);
            }
            return written;
        }
        sync_folders(self.folders.iter().rev().map(PathBuf::as_path))
    }
}

impl Sink for DirSink {
    fn manifest(&mut self, json: &[u8]) -> anyhow::Result<()> {
        self.manifest = Some(json.to_vec());
        Ok(())
    }

    fn begin(&mut self, path: &str, _size: u64) -> anyhow::Result<()> {
        self.current = Some(self.create_file(path)?);
        Ok(())
    }

    fn write(&mut self, data: &[u8]) -> anyhow::Result<()> {
        let Some((full, file)) = &mut self.current else {
            bail!("write outside a file");
        };
        file.write_all(data)
            .with_context(|| format!("writing {}", full.display()))
    }

    fn end(&mut self, verified: bool) -> anyhow::Result<()> {
        let Some((full, file)) = self.current.take() else {
            bail!("end outside a file");
        };
        if verified {
            return close_durably(file, &full);
        }
        drop(file);
        std::fs::remove_file(&full).with_context(|| format!("deleting {}", full.display()))
    }

    fn finish(mut self: Box<Self>, verified: bool) -> anyhow::Result<Option<String>> {
        if verified {
            self.seal()?;
            return Ok(None);
        }
        // The verified files are kept (and durable); without the others, no manifest.
        self.manifest = None;
        self.seal()?;
        Ok(Some(format!(
            "the files that failed were deleted from {}; the others are verified, and the \
             folder has no {MANIFEST_NAME}, as it is not the whole package",
            self.root.display()
        )))
    }

    fn abort(mut self: Box<Self>) {
        // The file being written is incomplete; the finished ones were verified and stay.
        // The manifest was never written.
        if let Some((full, file)) = self.current.take() {
            drop(file);
            let _ = std::fs::remove_file(full);
        }
    }
}

/// Writes a package into a zip file (deflate), `manifest.json` first. A zip entry cannot be
/// taken back, so a package with any failed file leaves no zip at all.
pub(crate) struct ZipSink {
    path: PathBuf,
    zip: ZipWriter<BufWriter<File>>,
}

impl ZipSink {
    /// Refuses to replace an existing file.
    pub(crate) fn check_target(path: &Path) -> Result<(), String> {
        match std::fs::symlink_metadata(path) {
            Ok(_) => Err(format!("--zip {} already exists", path.display())),
            Err(_) => Ok(()),
        }
    }

    /// Creates the zip file.
    pub(crate) fn create(path: &Path) -> anyhow::Result<Self> {
        let file = File::options()
            .write(true)
            .create_new(true)
            .open(path)
            .with_context(|| format!("creating {}", path.display()))?;
        Ok(Self {
            path: path.to_path_buf(),
            zip: ZipWriter::new(BufWriter::with_capacity(64 * 1024, file)),
        })
    }

    fn options(size: u64) -> SimpleFileOptions {
        SimpleFileOptions::default()
            .compression_method(CompressionMethod::Deflated)
            // ZIP64 headers are needed from 4 GiB on, and must be chosen before writing.
            .large_file(size >= u64::from(u32::MAX))
    }

    fn context(&self) -> String {
        format!("writing {}", self.path.display())
    }
}

impl Sink for ZipSink {
    fn manifest(&mut self, json: &[u8]) -> anyhow::Result<()> {
        let context = self.context();
        self.zip
            .start_file(MANIFEST_NAME, Self::options(json.len() as u64))
            .context(context.clone())?;
        self.zip.write_all(json).context(context)
    }

    fn begin(&mut self, path: &str, size: u64) -> anyhow::Result<()> {
        let context = self.context();
        self.zip
            .start_file(path, Self::options(size))
            .context(context)
    }

    fn write(&mut self, data: &[u8]) -> anyhow::Result<()> {
        let context = self.context();
        self.zip.write_all(data).context(context)
    }

    fn end(&mut self, _verified: bool) -> anyhow::Result<()> {
        // The entry is closed by the next start_file or by finish.
        Ok(())
    }

    fn finish(self: Box<Self>, verified: bool) -> anyhow::Result<Option<String>> {
        if !verified {
            let path = self.path.clone();
            self.abort();
            return Ok(Some(format!("{} was not kept", path.display())));
        }
        let path = self.path.clone();
        let written = self
            .zip
            .finish()
            .with_context(|| format!("writing {}", path.display()))
            .and_then(|out| close_durably(out, &path))
            .and_then(|()| sync_folders(path.parent()));
        if let Err(err) = written {
            // Not known to be whole and durable: no zip, as for a failed file.
            let _ = std::fs::remove_file(&path);
            return Err(err);
        }
        Ok(None)
    }

    fn abort(self: Box<Self>) {
        let Self { path, zip } = *self;
        drop(zip);
        let _ = std::fs::remove_file(path);
    }
}

/// How one file of the package turned out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct FileOutcome {
    /// Its path in the package.
    pub(crate) path: String,
    /// Size in bytes, as in the manifest.
    pub(crate) size: u64,
    /// SHA-256, as in the manifest.
    pub(crate) sha256: String,
    /// Why it failed its check; `None` when size and SHA-256 matched.
    pub(crate) error: Option<String>,
}

/// The file being received.
struct Current {
    index: usize,
    check: FileCheck,
    /// Set at the first bad chunk; later chunks of the file are not written.
    error: Option<String>,
}

/// Receives a package's chunks in manifest order and writes them to a [`Sink`], checking
/// every file.
pub(crate) struct Unpacker {
    sink: Box<dyn Sink>,
    files: Vec<ManifestFile>,
    /// The first file not begun yet.
    next: usize,
    current: Option<Current>,
    outcomes: Vec<FileOutcome>,
}

impl Unpacker {
    /// Checks the manifest (every path safe, none twice) and stores `manifest.json`.
    pub(crate) fn new(info: &PackageInfo, mut sink: Box<dyn Sink>) -> anyhow::Result<Self> {
        let mut seen = HashSet::new();
        for file in &info.files {
            if let Err(reason) = check_path(&file.path) {
                sink.abort();
                bail!(
                    "refusing the package: manifest path {:?} {reason}",
                    file.path
                );
            }
            if !seen.insert(file.path.as_str()) {
                sink.abort();
                bail!("refusing the package: manifest lists {:?} twice", file.path);
            }
        }
        if let Err(err) = sink.manifest(&info.manifest_json) {
            sink.abort();
            return Err(err);
        }
        Ok(Self {
            sink,
            files: info.files.clone(),
            next: 0,
            current: None,
            outcomes: Vec::with_capacity(info.files.len()),
        })
    }

    /// Takes one chunk. Fails (and the download must be aborted) when the chunk belongs to
    /// no file still to come, or on a write error; a chunk that does not fit its file only
    /// marks that file failed.
    pub(crate) fn chunk(&mut self, chunk: &PackageFileChunk) -> anyhow::Result<()> {
        let is_current = matches!(&self.current, Some(c) if self.files[c.index].path == chunk.path);
        if !is_current {
            let Some(skip) = self.files[self.next..]
                .iter()
                .position(|f| f.path == chunk.path)
            else {
                bail!(
                    "the registry sent a chunk of {:?}, which is not a file still to come in the manifest",
                    chunk.path
                );
            };
            self.end_current()?;
            // Files passed over got no chunk: right only for empty files, which the check
            // of each says.
            for _ in 0..skip {
                self.begin_next()?;
                self.end_current()?;
            }
            self.begin_next()?;
        }
        let Some(current) = &mut self.current else {
            bail!("no file begun");
        };
        if current.error.is_none() {
            match current.check.push(chunk.offset, &chunk.data) {
                Ok(()) => self.sink.write(&chunk.data)?,
                Err(reason) => current.error = Some(reason),
            }
        }
        Ok(())
    }

    /// Bytes of the current file accepted so far (for tests and progress).
    #[cfg(test)]
    fn received(&self) -> u64 {
        self.current.as_ref().map_or(0, |c| c.check.received())
    }

    fn begin_next(&mut self) -> anyhow::Result<()> {
        let file = &self.files[self.next];
        self.sink.begin(&file.path, file.size)?;
        self.current = Some(Current {
            index: self.next,
            check: FileCheck::new(file),
            error: None,
        });
        self.next += 1;
        Ok(())
    }

    fn end_current(&mut self) -> anyhow::Result<()> {
        let Some(current) = self.current.take() else {
            return Ok(());
        };
        let verdict = match current.error {
            Some(reason) => Err(reason),
            None => current.check.finish(),
        };
        self.sink.end(verdict.is_ok())?;
        let file = &self.files[current.index];
        self.outcomes.push(FileOutcome {
            path: file.path.clone(),
            size: file.size,
            sha256: file.sha256.clone(),
            error: verdict.err(),
        });
        Ok(())
    }

    /// The stream ended: checks the last file and any that never got a chunk, then closes
    /// the sink. Returns every file's outcome in manifest order and the sink's note on what
    /// it did with failures.
    pub(crate) fn finish(mut self) -> anyhow::Result<(Vec<FileOutcome>, Option<String>)> {
        let result = (|| {
            self.end_current()?;
            while self.next < self.files.len() {
                self.begin_next()?;
                self.end_current()?;
            }
            Ok::<_, anyhow::Error>(())
        })();
        if let Err(err) = result {
            self.sink.abort();
            return Err(err);
        }
        let verified = self.outcomes.iter().all(|o| o.error.is_none());
        let note = self.sink.finish(verified)?;
        Ok((self.outcomes, note))
    }

    /// Gives up after an error: the sink removes what cannot be trusted.
    pub(crate) fn abort(self) {
        self.sink.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;

    thread_local! {
        /// What this test's thread synced, in order.
        static SYNCED: RefCell<Vec<PathBuf>> = const { RefCell::new(Vec::new()) };
    }

    /// Notes that `path` was synced.
    pub(super) fn synced(path: &Path) {
        SYNCED.with(|s| s.borrow_mut().push(path.to_path_buf()));
    }

    fn take_synced() -> Vec<PathBuf> {
        SYNCED.with(RefCell::take)
    }

    fn sha(data: &[u8]) -> String {
        hex::encode(Sha256::digest(data))
    }

    fn manifest_file(path: &str, content: &[u8]) -> ManifestFile {
        ManifestFile {
            path: path.into(),
            processor: "payroll-bureau".into(),
            subprocessor: "accounting".into(),
            categories: vec!["contact".into()],
            media_type: "application/json".into(),
            size: content.len() as u64,
            sha256: sha(content),
        }
    }

    const MANIFEST: &[u8] = b"{\"request_id\":\"r-1\"}";

    /// A package of `files`, and the chunks a registry would send for it (`chunk` bytes each).
    fn package(files: &[(&str, &[u8])], chunk: usize) -> (PackageInfo, Vec<PackageFileChunk>) {
        let info = PackageInfo {
            request_id: "r-1".into(),
            complete: true,
            files: files.iter().map(|(p, c)| manifest_file(p, c)).collect(),
            missing: vec![],
            expires_at: None,
            manifest_json: MANIFEST.to_vec(),
        };
        let mut chunks = vec![];
        for (path, content) in files {
            for (i, part) in content.chunks(chunk).enumerate() {
                chunks.push(PackageFileChunk {
                    path: path.to_string(),
                    offset: (i * chunk) as u64,
                    data: part.to_vec(),
                });
            }
        }
        (info, chunks)
    }

    const FILES: &[(&str, &[u8])] = &[
        ("p/accounting/customer.json", b"{\"name\":\"Teemu\"}"),
        ("p/accounting/empty.csv", b""),
        ("p/adapter/orders.csv", b"id,total\n1,10.00\n2,12.50\n"),
    ];

    fn unpack(
        info: &PackageInfo,
        chunks: &[PackageFileChunk],
        sink: Box<dyn Sink>,
    ) -> (Vec<FileOutcome>, Option<String>) {
        let mut unpacker = Unpacker::new(info, sink).unwrap();
        for c in chunks {
            unpacker.chunk(c).unwrap();
        }
        unpacker.finish().unwrap()
    }

    #[test]
    fn paths_that_would_escape_are_refused() {
        for ok in ["p/s/file.json", "a", "p/s/.hidden", "p/s/a..b"] {
            assert_eq!(check_path(ok), Ok(()), "{ok}");
        }
        for bad in [
            "",
            "/etc/passwd",
            "../x",
            "p/../../x",
            "p/./x",
            "p//x",
            "p/x/",
            "p\\..\\x",
            "C:x",
            "p/a\0b",
            "manifest.json",
        ] {
            assert!(check_path(bad).is_err(), "{bad:?}");
        }
        assert_eq!(check_path("/x").unwrap_err(), "is absolute");
        assert_eq!(check_path("a/../b").unwrap_err(), "has a \"..\" component");
    }

    #[test]
    fn the_check_catches_size_digest_and_offset() {
        let file = manifest_file("f", b"hello world");
        let mut check = FileCheck::new(&file);
        check.push(0, b"hello ").unwrap();
        check.push(6, b"world").unwrap();
        assert_eq!(check.finish(), Ok(()));

        let mut check = FileCheck::new(&file);
        check.push(0, b"hello WORLD").unwrap();
        assert!(check.finish().unwrap_err().starts_with("SHA-256 is "));

        let mut check = FileCheck::new(&file);
        check.push(0, b"hello").unwrap();
        assert_eq!(check.finish().unwrap_err(), "ended at 5 of 11 bytes");

        let mut check = FileCheck::new(&file);
        assert_eq!(
            check.push(3, b"lo").unwrap_err(),
            "chunk at offset 3, expected 0"
        );
        assert!(check.push(0, b"hello world!").is_err());
    }

    #[test]
    fn a_folder_gets_the_manifest_and_every_file() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("pkg");
        let (info, chunks) = package(FILES, 7);
        let sink = Box::new(DirSink::create(&out).unwrap());
        let (outcomes, note) = unpack(&info, &chunks, sink);
        assert_eq!(note, None);
        assert_eq!(outcomes.len(), 3);
        assert!(outcomes.iter().all(|o| o.error.is_none()), "{outcomes:?}");
        assert_eq!(std::fs::read(out.join(MANIFEST_NAME)).unwrap(), MANIFEST);
        for (path, content) in FILES {
            assert_eq!(&std::fs::read(out.join(path)).unwrap(), content, "{path}");
        }
    }

    #[test]
    fn a_folder_is_durable_before_it_is_reported_verified() {
        let tmp = tempfile::tempdir().unwrap();
        // Two folders to create above the package's own.
        let out = tmp.path().join("a/b/pkg");
        let (info, chunks) = package(FILES, 7);
        take_synced();
        let sink = Box::new(DirSink::create(&out).unwrap());
        let (_, note) = unpack(&info, &chunks, sink);
        assert_eq!(note, None);
        let synced = take_synced();
        let at = |path: &Path| {
            synced
                .iter()
                .position(|p| p == path)
                .unwrap_or_else(|| panic!("{} not synced: {synced:?}", path.display()))
        };
        let manifest = at(&out.join(MANIFEST_NAME));
        for (path, _) in FILES {
            assert!(at(&out.join(path)) < manifest, "{path} before the manifest");
        }
        // Every folder that gained an entry, after the manifest was written into its own.
        for folder in [
            out.join("p/accounting"),
            out.join("p/adapter"),
            out.join("p"),
            out.clone(),
            tmp.path().join("a/b"),
            tmp.path().join("a"),
            tmp.path().to_path_buf(),
        ] {
            assert!(at(&folder) > manifest, "{}", folder.display());
        }
        assert_eq!(
            synced.len(),
            FILES.len() + 1 + 7,
            "nothing else: {synced:?}"
        );
    }

    #[test]
    fn a_zip_is_durable_before_it_is_reported_verified() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("pkg.zip");
        let (info, chunks) = package(FILES, 4);
        take_synced();
        let sink = Box::new(ZipSink::create(&path).unwrap());
        let (_, note) = unpack(&info, &chunks, sink);
        assert_eq!(note, None);
        assert_eq!(take_synced(), [path, tmp.path().to_path_buf()]);
    }

    #[test]
    fn a_corrupted_file_is_caught_and_deleted() {
        let tmp = tempfile::tempdir().unwrap();
        let (info, mut chunks) = package(FILES, 7);
        // One byte flipped in the last file: same size, other digest.
        let last = chunks.last_mut().unwrap();
        last.data[0] ^= 0x20;
        let sink = Box::new(DirSink::create(tmp.path()).unwrap());
        let (outcomes, note) = unpack(&info, &chunks, sink);
        let bad: Vec<_> = outcomes.iter().filter(|o| o.error.is_some()).collect();
        assert_eq!(bad.len(), 1);
        assert_eq!(bad[0].path, "p/adapter/orders.csv");
        assert!(bad[0].error.as_ref().unwrap().starts_with("SHA-256 is "));
        assert!(note.unwrap().contains("deleted"));
        assert!(!tmp.path().join("p/adapter/orders.csv").exists());
        assert!(tmp.path().join("p/accounting/customer.json").exists());
        // Without every file, the folder is no package: nothing to confirm a return with.
        assert!(!tmp.path().join(MANIFEST_NAME).exists());
    }

    #[test]
    fn a_missing_chunk_or_file_fails_that_file() {
        let tmp = tempfile::tempdir().unwrap();
        let (info, mut chunks) = package(FILES, 7);
        // The second chunk of the first file is lost: the third starts at the wrong offset.
        chunks.remove(1);
        // The last file never arrives.
        chunks.retain(|c| c.path != "p/adapter/orders.csv");
        let sink = Box::new(DirSink::create(tmp.path()).unwrap());
        let (outcomes, _) = unpack(&info, &chunks, sink);
        let errors: Vec<_> = outcomes.iter().map(|o| o.error.clone()).collect();
        assert_eq!(
            errors,
            vec![
                Some("chunk at offset 14, expected 7".to_string()),
                None,
                Some(format!("ended at 0 of {} bytes", FILES[2].1.len())),
            ]
        );
    }

    #[test]
    fn a_chunk_out_of_manifest_order_aborts() {
        let tmp = tempfile::tempdir().unwrap();
        let (info, chunks) = package(FILES, 7);
        let sink = Box::new(DirSink::create(tmp.path()).unwrap());
        let mut unpacker = Unpacker::new(&info, sink).unwrap();
        let orders = chunks
            .iter()
            .find(|c| c.path == "p/adapter/orders.csv" && c.offset == 0)
            .unwrap();
        unpacker.chunk(orders).unwrap();
        assert_eq!(unpacker.received(), 7);
        let err = unpacker.chunk(&chunks[0]).unwrap_err();
        assert!(
            err.to_string().contains("not a file still to come"),
            "{err}"
        );
        unpacker.abort();
        // The partial file is gone; the empty one before it was complete and stays.
        assert!(!tmp.path().join("p/adapter/orders.csv").exists());
        assert!(tmp.path().join("p/accounting/empty.csv").exists());
        assert!(!tmp.path().join(MANIFEST_NAME).exists());
    }

    #[test]
    fn an_unsafe_or_repeated_manifest_path_refuses_the_package() {
        let tmp = tempfile::tempdir().unwrap();
        let (mut info, _) = package(FILES, 7);
        info.files[1].path = "../outside".into();
        let sink = Box::new(DirSink::create(tmp.path()).unwrap());
        let err = Unpacker::new(&info, sink).err().unwrap();
        assert!(err.to_string().contains("\"../outside\""), "{err}");

        let (mut info, _) = package(FILES, 7);
        info.files[2].path = info.files[0].path.clone();
        let sink = Box::new(DirSink::create(tmp.path()).unwrap());
        let err = Unpacker::new(&info, sink).err().unwrap();
        assert!(err.to_string().contains("twice"), "{err}");
    }

    #[test]
    fn a_target_folder_must_be_new_or_empty() {
        let tmp = tempfile::tempdir().unwrap();
        assert_eq!(DirSink::check_target(&tmp.path().join("new")), Ok(()));
        assert_eq!(DirSink::check_target(tmp.path()), Ok(()));
        std::fs::write(tmp.path().join("x"), b"").unwrap();
        assert!(DirSink::check_target(tmp.path())
            .unwrap_err()
            .contains("is not empty"));
        assert!(ZipSink::check_target(&tmp.path().join("x"))
            .unwrap_err()
            .contains("already exists"));
    }

    #[test]
    fn a_zip_reads_back_with_every_file_deflated() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("pkg.zip");
        let (info, chunks) = package(FILES, 4);
        let sink = Box::new(ZipSink::create(&path).unwrap());
        let (outcomes, note) = unpack(&info, &chunks, sink);
        assert_eq!(note, None);
        assert!(outcomes.iter().all(|o| o.error.is_none()), "{outcomes:?}");

        let mut zip = zip::ZipArchive::new(File::open(&path).unwrap()).unwrap();
        let names: Vec<_> = zip
            .file_names()
            .map(|name| name.unwrap().into_owned())
            .collect();
        assert_eq!(names.len(), 4);
        assert!(names.contains(&MANIFEST_NAME.to_string()));
        let mut read = |name: &str| {
            let mut entry = zip.by_name(name).unwrap();
            assert_eq!(entry.compression(), CompressionMethod::Deflated, "{name}");
            let mut buf = vec![];
            entry.read_to_end(&mut buf).unwrap();
            buf
        };
        assert_eq!(read(MANIFEST_NAME), MANIFEST);
        for (name, content) in FILES {
            assert_eq!(&read(name), content, "{name}");
        }
    }

    #[test]
    fn a_zip_with_a_failed_file_is_not_kept() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("pkg.zip");
        let (mut info, chunks) = package(FILES, 4);
        info.files[0].sha256 = sha(b"something else");
        let sink = Box::new(ZipSink::create(&path).unwrap());
        let (outcomes, note) = unpack(&info, &chunks, sink);
        assert!(outcomes[0].error.is_some());
        assert!(note.unwrap().contains("was not kept"));
        assert!(!path.exists());
    }
}
