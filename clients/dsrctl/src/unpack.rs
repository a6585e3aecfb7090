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
//! Neither gives a file its real name before it is whole and verified (a file is written in
//! the folder's staging folder, a zip under a hidden name beside it), so a download cut short
//! can be run again into the same place. [`check_folder`] checks such a folder again.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{anyhow, bail, Context};
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

/// Set on Ctrl-C while work that can take long (hashing files an earlier run left, syncing,
/// sealing the package) runs on a blocking thread: the work checks it between steps and
/// stops at the first check after it was set, leaving nothing partial under a real name.
#[derive(Debug, Clone, Default)]
pub(crate) struct Stop(Arc<AtomicBool>);

/// How work stopped by [`Stop`] says so.
pub(crate) const STOPPED: &str = "stopped by Ctrl-C";

impl Stop {
    /// Asks the work to stop.
    pub(crate) fn set(&self) {
        self.0.store(true, Ordering::SeqCst);
    }

    pub(crate) fn is_set(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }

    /// `Err` once the work was asked to stop.
    fn check(&self) -> anyhow::Result<()> {
        if self.is_set() {
            bail!(STOPPED);
        }
        Ok(())
    }
}

/// What `check_folder` reads of `manifest.json`.
#[derive(Deserialize)]
struct Listing {
    #[serde(default)]
    request_id: String,
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
    match mismatches(&check_folder_files(root, manifest_json)?) {
        None => Ok(()),
        Some(problems) => Err(problems),
    }
}

/// The files of `outcomes` that failed their check, as `path: why; path: why`; `None` when
/// every one matched.
pub(crate) fn mismatches(outcomes: &[FileOutcome]) -> Option<String> {
    let problems: Vec<String> = (outcomes.iter())
        .filter_map(|o| Some(format!("{}: {}", o.path, o.error.as_ref()?)))
        .collect();
    (!problems.is_empty()).then(|| problems.join("; "))
}

/// The request whose package `manifest_json` describes, when it names one.
pub(crate) fn manifest_request_id(manifest_json: &[u8]) -> Option<String> {
    serde_json::from_slice::<Listing>(manifest_json)
        .ok()
        .map(|l| l.request_id)
        .filter(|id| !id.is_empty())
}

/// [`check_folder`]'s check, file by file: each file the manifest lists, with why it is
/// missing or differs. `Err` says why the manifest lists none.
pub(crate) fn check_folder_files(
    root: &Path,
    manifest_json: &[u8],
) -> Result<Vec<FileOutcome>, String> {
    let listing: Listing = serde_json::from_slice(manifest_json)
        .map_err(|e| format!("its {MANIFEST_NAME} is not a package's manifest ({e})"))?;
    Ok(listing
        .files
        .into_iter()
        .map(|f| {
            let verdict = check_path(&f.path)
                .map_err(|reason| format!("the path {reason}"))
                .and_then(|()| {
                    check_file(&root.join(&f.path), f.size, &f.sha256, &Stop::default())
                });
            FileOutcome {
                error: verdict.err(),
                path: f.path,
                size: f.size,
                sha256: f.sha256,
            }
        })
        .collect())
}

/// Checks the file at `path` against its manifest entry's size and SHA-256; gives up,
/// saying [`STOPPED`], once `stop` is set.
fn check_file(path: &Path, size: u64, sha256: &str, stop: &Stop) -> Result<(), String> {
    let mut file = match File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err("missing".into()),
        Err(e) => return Err(e.to_string()),
    };
    let mut check = FileCheck::new(&ManifestFile {
        size,
        sha256: sha256.to_string(),
        ..Default::default()
    });
    let mut buf = vec![0; 64 * 1024];
    let mut offset = 0;
    loop {
        if stop.is_set() {
            return Err(STOPPED.into());
        }
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

/// How [`rename_no_replace`] failed.
#[derive(Debug)]
enum RenameFailure {
    /// `to` did not get the file (`AlreadyExists`: `to` was taken, and is untouched).
    NotRenamed(std::io::Error),
    /// `to` got the file, but `from` could not be removed: the file has both names.
    FromKept(std::io::Error),
}

impl RenameFailure {
    fn kind(&self) -> std::io::ErrorKind {
        match self {
            Self::NotRenamed(e) | Self::FromKept(e) => e.kind(),
        }
    }
}

impl std::fmt::Display for RenameFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::NotRenamed(e) => e.fmt(f),
            Self::FromKept(e) => write!(f, "the new name was made, the old one stays ({e})"),
        }
    }
}

impl std::error::Error for RenameFailure {}

/// Renames `from` to `to` unless `to` exists (an `AlreadyExists` error then, `to` untouched).
/// A hard link fails on an existing name atomically, where a check followed by a rename would
/// replace a file created between the two; the staged name then goes. A file system without
/// hard links gets the check and the rename, with their gap.
fn rename_no_replace(from: &Path, to: &Path) -> Result<(), RenameFailure> {
    match std::fs::hard_link(from, to) {
        Ok(()) => {
            #[cfg(test)]
            tests::linked(to).map_err(RenameFailure::FromKept)?;
            std::fs::remove_file(from).map_err(RenameFailure::FromKept)
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            Err(RenameFailure::NotRenamed(e))
        }
        Err(_) => match std::fs::symlink_metadata(to) {
            Ok(_) => Err(RenameFailure::NotRenamed(
                std::io::ErrorKind::AlreadyExists.into(),
            )),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                std::fs::rename(from, to).map_err(RenameFailure::NotRenamed)
            }
            Err(e) => Err(RenameFailure::NotRenamed(e)),
        },
    }
}

/// Creates the file `path` for writing, removing whatever name was there first: a new file,
/// never one reached through a symbolic link planted at `path`.
fn create_replacing(path: &Path) -> anyhow::Result<File> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(e).with_context(|| format!("deleting {}", path.display()));
        }
        _ => {}
    }
    File::options()
        .write(true)
        .create_new(true)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))
}

/// Why a run is refused `place`, which another run is writing; `other`, what to use instead.
fn busy(place: &Path, other: &str) -> String {
    format!(
        "another dsrctl download is writing {}; wait for it or use another {other}",
        place.display()
    )
}

/// Whether the name `path` is `file` (not a link to it, nor another file since).
#[cfg(unix)]
fn same_file(file: &File, path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (file.metadata(), std::fs::symlink_metadata(path)) {
        (Ok(held), Ok(named)) => held.dev() == named.dev() && held.ino() == named.ino(),
        _ => false,
    }
}

/// Whether the name `path` is `file`: without inode numbers, whether it is a file.
#[cfg(not(unix))]
fn same_file(_file: &File, path: &Path) -> bool {
    std::fs::symlink_metadata(path).is_ok_and(|m| m.is_file())
}

/// An exclusive lock on the file at `path`, held while this lives (and by nothing once the
/// process ends, killed or not): two runs writing into the same place would delete and
/// rename each other's files.
#[derive(Debug)]
struct Lock {
    file: File,
    path: PathBuf,
    /// This run made the file.
    made: bool,
}

impl Lock {
    /// Takes the lock of the file at `path`, making the file when it is not there; `None`
    /// when another run holds it.
    fn take(path: &Path) -> anyhow::Result<Option<Self>> {
        // A run that ends removes the file's name: a lock taken on the file after that is
        // one no other run can find, so the name is opened again.
        for _ in 0..3 {
            let opened = File::options()
                .read(true)
                .write(true)
                .create_new(true)
                .open(path);
            let (file, made) = match opened {
                Ok(file) => (file, true),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    let meta = match std::fs::symlink_metadata(path) {
                        Ok(meta) => meta,
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                        Err(e) => {
                            return Err(e).with_context(|| format!("reading {}", path.display()))
                        }
                    };
                    if !meta.is_file() {
                        bail!("{} is not dsrctl's: remove it", path.display());
                    }
                    match File::options().read(true).write(true).open(path) {
                        Ok(file) => (file, false),
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                        Err(e) => {
                            return Err(e).with_context(|| format!("opening {}", path.display()))
                        }
                    }
                }
                Err(e) => {
                    return Err(e).with_context(|| format!("creating {}", path.display()));
                }
            };
            match file.try_lock() {
                Ok(()) => {}
                Err(std::fs::TryLockError::WouldBlock) => return Ok(None),
                Err(std::fs::TryLockError::Error(e)) => {
                    return Err(e).with_context(|| format!("locking {}", path.display()));
                }
            }
            // Opened through a link swapped in after the check above, or renamed away:
            // not the file other runs lock.
            if same_file(&file, path) {
                return Ok(Some(Self {
                    file,
                    path: path.to_path_buf(),
                    made,
                }));
            }
        }
        Ok(None)
    }

    /// Removes the file's name (while it is still this lock's), then lets go.
    fn release(self) {
        // Left, it only costs the next run a lock taken again.
        if same_file(&self.file, &self.path) {
            let _ = std::fs::remove_file(&self.path);
        }
    }

    /// Lets go, removing the file's name only if this run made it: for a run refused after
    /// it took the lock, leaving what was there.
    fn give_back(self) {
        if self.made {
            self.release();
        }
    }
}

/// Removes `root`'s `manifest.json`.
fn remove_manifest(root: &Path) -> std::io::Result<()> {
    #[cfg(test)]
    tests::removing_manifest()?;
    std::fs::remove_file(root.join(MANIFEST_NAME))
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
/// `end` per file, then `finish` or `abort`. `Send`: `finish` runs on a blocking thread.
pub(crate) trait Sink: Send {
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
    /// this returns `Ok`; on `Err`, the error says what was left.
    fn finish(self: Box<Self>, verified: bool) -> anyhow::Result<Option<String>>;
    /// Gives up after an error: removes what cannot be trusted, and says what is left.
    fn abort(self: Box<Self>) -> String;
}

/// The hidden folder inside `--out` where [`DirSink`] writes each file until it verifies,
/// so that nothing partial ever carries a manifest path.
pub(crate) const STAGING_NAME: &str = ".dsrctl-download";
/// In the staging folder: the id of the request whose package is written there, so a later
/// run of the same download knows the folder for its own. It stays until the package is
/// whole, also when a run stops early.
const OWNER_NAME: &str = "request";
/// In the staging folder: a new owner file while it is written, renamed to [`OWNER_NAME`]
/// once durable, so the owner file is never half written.
const OWNER_TEMP_NAME: &str = "request.new";
/// In the staging folder: the file a run holds an exclusive lock on while it writes there
/// ([`Lock`]). A run removes it when it ends; a killed run leaves it, unlocked.
const LOCK_NAME: &str = "lock";
/// The ending of every file written in the staging folder.
const PARTIAL_SUFFIX: &str = ".partial";

/// The files and folders of an `--out` folder, outside the staging folder: paths relative
/// to it, `/`-separated.
#[derive(Debug, Default)]
struct Survey {
    files: Vec<String>,
    folders: Vec<String>,
    /// The folder has the staging folder of a run of the same download.
    ours: bool,
}

/// Why `what`, found in the `--out` folder `root`, stops the download.
fn in_the_way(root: &Path, what: &str, why: &str) -> String {
    format!(
        "--out {} holds {what}, {why}: give a new or empty folder, or move that away",
        root.display()
    )
}

/// Lists what the folder `root` holds, refusing what no download of `request_id` leaves:
/// a symbolic link (a write through one could land outside the folder), anything but files
/// and folders, a name that is not UTF-8, or a staging folder of another request.
fn survey(root: &Path, request_id: &str) -> Result<Survey, String> {
    let mut found = Survey::default();
    let mut pending = vec![String::new()];
    while let Some(rel) = pending.pop() {
        let folder = root.join(&rel);
        let unreadable = |e: std::io::Error| format!("--out: reading {}: {e}", folder.display());
        for entry in std::fs::read_dir(&folder).map_err(unreadable)? {
            let entry = entry.map_err(unreadable)?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else {
                let shown = folder.join(&name).display().to_string();
                return Err(in_the_way(root, &shown, "a name no package file has"));
            };
            let path = if rel.is_empty() {
                name.to_string()
            } else {
                format!("{rel}/{name}")
            };
            // file_type does not follow a symbolic link: it is seen as one.
            let kind = entry.file_type().map_err(unreadable)?;
            if path == STAGING_NAME {
                found.ours = check_staging(root, request_id)?;
                continue;
            }
            if kind.is_dir() {
                pending.push(path.clone());
                found.folders.push(path);
            } else if kind.is_file() {
                found.files.push(path);
            } else {
                return Err(in_the_way(
                    root,
                    &path,
                    "which is neither a file nor a folder (dsrctl writes through no \
                     symbolic link)",
                ));
            }
        }
    }
    Ok(found)
}

/// Accepts the staging folder in `root` when a run of the download of `request_id` left it
/// (`Ok(true)`), or when it is empty (`Ok(false)`: made by a run stopped right then).
fn check_staging(root: &Path, request_id: &str) -> Result<bool, String> {
    let staging = root.join(STAGING_NAME);
    let not_ours = || {
        in_the_way(
            root,
            STAGING_NAME,
            "which is not what an interrupted dsrctl download leaves",
        )
    };
    let is_folder = std::fs::symlink_metadata(&staging).map(|m| m.is_dir());
    if !matches!(is_folder, Ok(true)) {
        return Err(not_ours());
    }
    let unreadable = |e: std::io::Error| format!("--out: reading {}: {e}", staging.display());
    let mut owner = None;
    let mut partials = 0;
    for entry in std::fs::read_dir(&staging).map_err(unreadable)? {
        let entry = entry.map_err(unreadable)?;
        if !entry.file_type().map_err(unreadable)?.is_file() {
            return Err(not_ours());
        }
        let name = entry.file_name();
        match name.to_str() {
            Some(OWNER_NAME) => {
                let id = read_owner(&entry.path()).map_err(unreadable)?;
                owner = Some(String::from_utf8_lossy(&id).into_owned());
            }
            Some(name) if name.ends_with(PARTIAL_SUFFIX) => partials += 1,
            // An owner file a killed run had not renamed yet: the next run replaces it.
            // A lock file: a live run holds it, which the next run finds out.
            Some(OWNER_TEMP_NAME | LOCK_NAME) => {}
            _ => return Err(not_ours()),
        }
    }
    match owner {
        Some(id) if id == request_id => Ok(true),
        None if partials == 0 => Ok(false),
        Some(id) => Err(in_the_way(
            root,
            STAGING_NAME,
            &format!(
                "what an interrupted download of request {id:?} left (run that download \
                 again to finish it)"
            ),
        )),
        None => Err(not_ours()),
    }
}

/// Removes every file in the staging folder (only files: [`check_staging`] accepted no
/// other) but the one naming the request and the lock file, and then, unless `keep_owner`,
/// the one naming the request: while anything else is left, the folder stays known as this
/// download's. Leaves the folder and the lock file ([`Lock::release`] removes that).
fn empty_staging(staging: &Path, keep_owner: bool) -> anyhow::Result<()> {
    let context = || format!("emptying {}", staging.display());
    for entry in std::fs::read_dir(staging).with_context(context)? {
        let entry = entry.with_context(context)?;
        if !entry.file_type().with_context(context)?.is_file() {
            bail!("{} is not dsrctl's: remove it", entry.path().display());
        }
        if entry.file_name() == OWNER_NAME || entry.file_name() == LOCK_NAME {
            continue;
        }
        // Removes a name, never what a link points to.
        std::fs::remove_file(entry.path())
            .with_context(|| format!("deleting {}", entry.path().display()))?;
    }
    if keep_owner {
        return Ok(());
    }
    let owner = staging.join(OWNER_NAME);
    match std::fs::remove_file(&owner) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("deleting {}", owner.display()))
        }
        _ => Ok(()),
    }
}

/// The request id an owner file holds (its first 1024 bytes: an id is far shorter, and a
/// file that is not one must not be read whole).
fn read_owner(path: &Path) -> std::io::Result<Vec<u8>> {
    let mut id = Vec::new();
    File::open(path)?.take(1024).read_to_end(&mut id)?;
    Ok(id)
}

/// Makes the owner file in `staging` name `request_id`, unless it does already. A new one
/// is written under a temporary name, synced, then renamed: a kill leaves the old owner
/// file or the new one, never half of one.
fn write_owner(staging: &Path, request_id: &str) -> anyhow::Result<()> {
    let owner = staging.join(OWNER_NAME);
    if read_owner(&owner).is_ok_and(|id| id == request_id.as_bytes()) {
        return Ok(());
    }
    let temp = staging.join(OWNER_TEMP_NAME);
    write_synced(&temp, request_id.as_bytes())?;
    std::fs::rename(&temp, &owner)
        .with_context(|| format!("renaming {} to {}", temp.display(), owner.display()))?;
    sync_folders([staging])
}

/// Writes `bytes` to a new file at `path` (whatever had that name removed first, never
/// written through) and syncs it.
fn write_synced(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let mut file = create_replacing(path)?;
    file.write_all(bytes)
        .with_context(|| format!("writing {}", path.display()))?;
    sync_file(&file, path)
}

/// A folder that holds a finished download ([`finished_download`]).
pub(crate) struct FinishedFolder {
    /// Its `manifest.json`.
    pub(crate) manifest: Vec<u8>,
    /// Whether the staging folder is still there (a run killed while removing it).
    pub(crate) staging_left: bool,
}

/// Whether a run of the download of `request_id` into `root` finished: its `manifest.json`
/// names the request, and the staging folder is gone, empty or holds only the lock file (a
/// run killed while removing it). The file naming the request is what tells a finished
/// run: sealing removes it only once `manifest.json` is in place, and a run that fails after
/// writing `manifest.json` writes it again. Whether the files are still as the manifest
/// lists them is for the caller to check.
pub(crate) fn finished_download(root: &Path, request_id: &str) -> Option<FinishedFolder> {
    let manifest = root.join(MANIFEST_NAME);
    if !std::fs::symlink_metadata(&manifest).is_ok_and(|m| m.is_file()) {
        return None;
    }
    let json = std::fs::read(&manifest).ok()?;
    let listing = serde_json::from_slice::<Listing>(&json).ok()?;
    if listing.request_id != request_id {
        return None;
    }
    let staging = root.join(STAGING_NAME);
    let staging_left = match std::fs::symlink_metadata(&staging) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
        Ok(meta) if meta.is_dir() => {
            for entry in std::fs::read_dir(&staging).ok()? {
                let lock = entry.is_ok_and(|e| {
                    e.file_type().is_ok_and(|t| t.is_file()) && e.file_name() == LOCK_NAME
                });
                if !lock {
                    return None;
                }
            }
            true
        }
        _ => return None,
    };
    Some(FinishedFolder {
        manifest: json,
        staging_left,
    })
}

/// Whether the file at `path` is a `manifest.json` naming `request_id`.
fn names(path: &Path, request_id: &str) -> bool {
    let Ok(json) = std::fs::read(path) else {
        return false;
    };
    serde_json::from_slice::<serde_json::Value>(&json)
        .is_ok_and(|v| v.get("request_id").and_then(|id| id.as_str()) == Some(request_id))
}

/// Whether every file `manifest_json` lists is in `root` as a file of the listed size (not
/// hashed: [`DirSink::check_target`] runs before anything else, with no progress shown).
fn sizes_match(root: &Path, manifest_json: &[u8]) -> bool {
    let Ok(listing) = serde_json::from_slice::<Listing>(manifest_json) else {
        return false;
    };
    listing.files.iter().all(|f| {
        check_path(&f.path).is_ok()
            && std::fs::symlink_metadata(root.join(&f.path))
                .is_ok_and(|m| m.is_file() && m.len() == f.size)
    })
}

/// What an earlier, interrupted run of the same download left in the `--out` folder: the
/// files at their manifest paths, each matching the manifest's size and SHA-256.
#[derive(Debug, Default)]
pub(crate) struct Leftovers {
    in_place: HashSet<String>,
}

impl Leftovers {
    /// How many files an earlier run left.
    pub(crate) fn count(&self) -> usize {
        self.in_place.len()
    }
}

/// Writes a package into a folder. Each file is written in the staging folder, synced, and
/// renamed to its manifest path only once it verified; a file that fails its check is
/// deleted. `manifest.json` is written last, only when every file verified, and the staging
/// folder is then removed.
///
/// A folder an interrupted run of the same download left (verified files at their paths,
/// a staging folder of the same request) is taken up again: the protocol has every file
/// sent again, but those already in place are only checked as they stream, not rewritten.
pub(crate) struct DirSink {
    root: PathBuf,
    staging: PathBuf,
    request_id: String,
    /// `manifest.json`, kept back until every file verified.
    manifest: Option<Vec<u8>>,
    /// Files an earlier run left verified at their paths.
    in_place: HashSet<String>,
    /// Every folder whose entries the download changed: each is synced before success.
    folders: BTreeSet<PathBuf>,
    current: Option<Writing>,
    /// Files begun in the staging folder, for their names there.
    staged: usize,
    /// Files verified at their paths: renamed there by this run, or left by an earlier one.
    verified: usize,
    /// Files left in place by an earlier run whose bytes failed their check in this one.
    kept_despite: Vec<String>,
    stop: Stop,
    /// Held from before anything in the folder is changed until the run ends.
    lock: Option<Lock>,
}

/// The file being received by a [`DirSink`].
enum Writing {
    /// Written at `staged`, to be renamed to `target` once it verifies.
    Staged {
        target: String,
        staged: PathBuf,
        file: BufWriter<File>,
    },
    /// Already verified at `target`: its bytes only go through the check.
    InPlace { target: String },
}

impl DirSink {
    /// Refuses, before anything is asked of the registry, a folder that is not empty and
    /// not one a run of the download of `request_id` left (it has that run's staging
    /// folder), one that holds what no download leaves (see [`survey`]), or a whole package
    /// already (its `manifest.json`; saying so when it is this download's, finished). A
    /// folder that passes is checked file by file against the manifest by
    /// [`Self::check_leftovers`].
    pub(crate) fn check_target(root: &Path, request_id: &str) -> Result<(), String> {
        let entries = match std::fs::read_dir(root) {
            Ok(entries) => entries,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(err) => return Err(format!("--out {}: {err}", root.display())),
        };
        let (mut staging, mut others, mut manifest) = (false, false, false);
        for entry in entries {
            let entry = entry.map_err(|err| format!("--out {}: {err}", root.display()))?;
            if entry.file_name() == STAGING_NAME {
                staging = true;
            } else {
                others = true;
                manifest |= entry.file_name() == MANIFEST_NAME;
            }
        }
        let finished = (manifest
            .then(|| finished_download(root, request_id))
            .flatten())
        .filter(|f| sizes_match(root, &f.manifest));
        if let Some(finished) = finished {
            let left = if finished.staging_left {
                format!(
                    "; {} is left over from it and can be deleted",
                    root.join(STAGING_NAME).display()
                )
            } else {
                String::new()
            };
            return Err(format!(
                "--out {} holds the finished download of request {request_id} (its \
                 {MANIFEST_NAME} and every file it lists, of the listed sizes): download \
                 finished already{left}",
                root.display()
            ));
        }
        let ours = staging && check_staging(root, request_id)?;
        if others && !ours {
            return Err(format!("--out {} is not empty", root.display()));
        }
        let found = survey(root, request_id)?;
        if found.files.iter().any(|f| f == MANIFEST_NAME) {
            if ours && names(&root.join(MANIFEST_NAME), request_id) {
                // Sealing writes the file naming the request again when it fails after
                // placing manifest.json and cannot remove it.
                return Err(format!(
                    "--out {} holds {MANIFEST_NAME} of a run of this download that failed \
                     after writing it, so the download did not finish: delete {} and run \
                     the same command again",
                    root.display(),
                    root.join(MANIFEST_NAME).display()
                ));
            }
            return Err(in_the_way(
                root,
                MANIFEST_NAME,
                "so a package whose download finished",
            ));
        }
        Ok(())
    }

    /// Accepts the folder for `info`'s package when it holds nothing but what an interrupted
    /// run of the same download left: folders on the way to manifest paths, files at
    /// manifest paths that match the manifest's size and SHA-256, and the staging folder.
    /// Refuses a package with a path inside the staging folder. Says [`STOPPED`] once `stop`
    /// is set.
    pub(crate) fn check_leftovers(
        root: &Path,
        info: &PackageInfo,
        stop: &Stop,
    ) -> Result<Leftovers, String> {
        if let Some(file) = info
            .files
            .iter()
            .find(|f| f.path.split('/').next() == Some(STAGING_NAME))
        {
            return Err(format!(
                "the package holds {:?}, inside the folder where dsrctl writes files until \
                 they verify: download it with --zip instead",
                file.path
            ));
        }
        let mut leftovers = Leftovers::default();
        if !root.exists() {
            return Ok(leftovers);
        }
        let found = survey(root, &info.request_id)?;
        // check_target looked, but the folder may have changed while the registry answered.
        let empty = found.files.is_empty() && found.folders.is_empty();
        if !found.ours && !empty {
            return Err(format!("--out {} is not empty", root.display()));
        }
        let listed: HashMap<&str, &ManifestFile> =
            info.files.iter().map(|f| (f.path.as_str(), f)).collect();
        let on_the_way: HashSet<&str> = info
            .files
            .iter()
            .flat_map(|f| f.path.match_indices('/').map(|(at, _)| &f.path[..at]))
            .collect();
        if let Some(folder) = found
            .folders
            .iter()
            .find(|f| !on_the_way.contains(f.as_str()))
        {
            return Err(in_the_way(
                root,
                folder,
                "a folder no file of this package is in",
            ));
        }
        for path in found.files {
            let Some(file) = listed.get(path.as_str()) else {
                let why = if path == MANIFEST_NAME {
                    "so a package whose download finished"
                } else {
                    "which is not a file of this package"
                };
                return Err(in_the_way(root, &path, why));
            };
            if let Err(reason) = check_file(&root.join(&path), file.size, &file.sha256, stop) {
                if stop.is_set() {
                    return Err(STOPPED.into());
                }
                return Err(in_the_way(
                    root,
                    &path,
                    &format!(
                        "which does not match the manifest ({reason}), so it is no file of \
                         this package as the registry has it now"
                    ),
                ));
            }
            leftovers.in_place.insert(path);
        }
        Ok(leftovers)
    }

    /// Creates the folder (and its parents) and its staging folder, takes the lock there,
    /// checks the folder again (names only: nothing but `leftovers` may be at a manifest
    /// path, and the staging folder must still be this download's), empties it of an
    /// earlier run's partial files, and makes durable what an earlier run left verified.
    /// Refuses, changing nothing, a folder another run holds the lock of. Stops between
    /// files once `stop` is set, and the finished package's `manifest.json` is not written
    /// after that.
    pub(crate) fn create(
        root: &Path,
        request_id: &str,
        leftovers: Leftovers,
        stop: &Stop,
    ) -> anyhow::Result<Self> {
        // The folders made here, and the one that was there, gain entries.
        let mut folders = BTreeSet::new();
        for folder in root.ancestors() {
            folders.insert(folder.to_path_buf());
            if folder.exists() {
                break;
            }
        }
        std::fs::create_dir_all(root).with_context(|| format!("creating {}", root.display()))?;
        let staging = root.join(STAGING_NAME);
        let made = match std::fs::create_dir(&staging) {
            Ok(()) => true,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => false,
            Err(e) => {
                return Err(e).with_context(|| format!("creating {}", staging.display()));
            }
        };
        let Some(lock) = Lock::take(&staging.join(LOCK_NAME))? else {
            bail!(busy(root, "folder"));
        };
        // check_target and check_leftovers looked before the registry answered: a run
        // that held the lock meanwhile may have written here, or finished.
        if let Err(why) = Self::recheck(root, request_id, &leftovers) {
            lock.give_back();
            if made {
                let _ = std::fs::remove_dir(&staging);
            }
            bail!(why);
        }
        // An interrupted run's, of this request. Its owner file stays: killed before a new
        // one is written, the folder must still be ours.
        if !made {
            empty_staging(&staging, true)?;
        }
        folders.insert(staging.clone());
        write_owner(&staging, request_id)?;
        for path in &leftovers.in_place {
            stop.check()?;
            // An earlier run synced the file before naming it; not necessarily its folders.
            let full = root.join(path);
            let file = File::open(&full).with_context(|| format!("opening {}", full.display()))?;
            sync_file(&file, &full)?;
            for folder in full.ancestors().skip(1).take_while(|f| *f != root) {
                folders.insert(folder.to_path_buf());
            }
        }
        Ok(Self {
            root: root.to_path_buf(),
            staging,
            request_id: request_id.to_string(),
            manifest: None,
            verified: leftovers.in_place.len(),
            in_place: leftovers.in_place,
            folders,
            current: None,
            staged: 0,
            kept_despite: Vec::new(),
            stop: stop.clone(),
            lock: Some(lock),
        })
    }

    /// Checks, with the lock held, that the folder is still as [`Self::check_leftovers`]
    /// found it for `request_id`, by names only: a staging folder that is this download's
    /// or empty ([`survey`]), and no file but `leftovers`.
    fn recheck(root: &Path, request_id: &str, leftovers: &Leftovers) -> Result<(), String> {
        let found = survey(root, request_id)?;
        match found
            .files
            .iter()
            .find(|f| !leftovers.in_place.contains(*f))
        {
            Some(path) => Err(in_the_way(
                root,
                path,
                "which appeared while the registry answered",
            )),
            None => Ok(()),
        }
    }

    /// Lets go of the lock, removing the lock file.
    fn unlock(&mut self) {
        if let Some(lock) = self.lock.take() {
            lock.release();
        }
    }

    /// A new file in the staging folder.
    fn stage(&mut self) -> anyhow::Result<(PathBuf, BufWriter<File>)> {
        let staged = self
            .staging
            .join(format!("{}{PARTIAL_SUFFIX}", self.staged));
        self.staged += 1;
        let file = File::options()
            .write(true)
            .create_new(true)
            .open(&staged)
            .with_context(|| format!("creating {}", staged.display()))?;
        Ok((staged, BufWriter::with_capacity(64 * 1024, file)))
    }

    /// Gives the verified, durable file at `staged` its name `target` in the folder.
    fn place(&mut self, staged: &Path, target: &str) -> anyhow::Result<()> {
        let full = self.root.join(target);
        if let Some(parent) = full.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("creating {}", parent.display()))?;
            for folder in parent.ancestors().take_while(|f| *f != self.root) {
                self.folders.insert(folder.to_path_buf());
            }
        }
        // Paths are unique in the manifest and the folder was surveyed: whatever is there
        // now came from elsewhere during the download, and is not replaced.
        match rename_no_replace(staged, &full) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => bail!(
                "{} appeared while the download ran; it was left as it is",
                full.display()
            ),
            Err(e) => Err(e)
                .with_context(|| format!("renaming {} to {}", staged.display(), full.display())),
        }
    }

    fn sync_all_folders(&self) -> anyhow::Result<()> {
        sync_folders(self.folders.iter().rev().map(PathBuf::as_path))
    }

    /// Makes every file's name durable, then writes `manifest.json`, removes the staging
    /// folder and makes that durable. Failing once `manifest.json` may have its name, it
    /// removes it and writes the file naming the request again; [`Self::give_up`] says what
    /// of that failed.
    fn seal(&mut self) -> anyhow::Result<()> {
        // The manifest vouches for the files: their names must outlast a crash first.
        self.sync_all_folders()?;
        self.stop.check()?;
        let Some(json) = self.manifest.take() else {
            bail!("no {MANIFEST_NAME} to write");
        };
        let (staged, mut file) = self.stage()?;
        file.write_all(&json)
            .with_context(|| format!("writing {}", staged.display()))?;
        close_durably(file, &staged)?;
        // Placing can fail with the manifest linked under its name already.
        let sealed = self
            .place(&staged, MANIFEST_NAME)
            .and_then(|()| self.remove_staging())
            .and_then(|()| sync_folders([self.root.as_path()]));
        if sealed.is_err() {
            // Not durable, so it must not vouch for the folder. give_up says if it stays.
            let _ = remove_manifest(&self.root);
            // The file naming the request may be gone already: without it, the same
            // command run again would refuse the folder. give_up says if this fails.
            let _ = self.restore_owner();
        }
        sealed
    }

    /// Makes the staging folder, and the file in it naming the request, again.
    fn restore_owner(&self) -> anyhow::Result<()> {
        match std::fs::create_dir(&self.staging) {
            Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => {
                return Err(e).with_context(|| format!("creating {}", self.staging.display()));
            }
            _ => {}
        }
        write_owner(&self.staging, &self.request_id)?;
        sync_folders([self.root.as_path()])
    }

    /// Removes the staging folder, emptied, the lock file last.
    fn remove_staging(&mut self) -> anyhow::Result<()> {
        if let Some(Writing::Staged { file, .. }) = self.current.take() {
            drop(file);
        }
        empty_staging(&self.staging, false)?;
        self.unlock();
        #[cfg(test)]
        tests::emptied(&self.staging);
        std::fs::remove_dir(&self.staging)
            .with_context(|| format!("deleting {}", self.staging.display()))
    }

    /// Removes the partial files from the staging folder, keeping the file that names the
    /// request: by it the same command run again knows the folder for its own.
    fn remove_partials(&mut self) -> anyhow::Result<()> {
        if let Some(Writing::Staged { file, .. }) = self.current.take() {
            drop(file);
        }
        empty_staging(&self.staging, true)
    }

    /// After an error: removes the partial files and says what the folder holds, and what
    /// the same command run again does with it (the check it starts with, run now).
    fn give_up(&mut self) -> String {
        let partials = match self.remove_partials() {
            Ok(()) => "nothing partial was left".to_string(),
            // Gone with the staging folder (sealing removed it, and could not make it again).
            Err(_) if !self.staging.exists() => "nothing partial was left".to_string(),
            Err(err) => format!(
                "removing the partial files from {} failed ({err:#})",
                self.staging.display()
            ),
        };
        self.unlock();
        let manifest = if std::fs::symlink_metadata(self.root.join(MANIFEST_NAME)).is_ok() {
            format!(
                "and {MANIFEST_NAME}, though the download failed after writing it and \
                 removing it failed"
            )
        } else {
            format!("and no {MANIFEST_NAME}")
        };
        let next = match Self::check_target(&self.root, &self.request_id) {
            Ok(()) => "run the same command again to finish".to_string(),
            Err(refusal) => format!("the same command run again refuses it: {refusal}"),
        };
        format!(
            "{partials}; {} keeps the files verified so far ({}) {manifest}; {next}",
            self.root.display(),
            self.verified,
        )
    }
}

impl Sink for DirSink {
    fn manifest(&mut self, json: &[u8]) -> anyhow::Result<()> {
        self.manifest = Some(json.to_vec());
        Ok(())
    }

    fn begin(&mut self, path: &str, _size: u64) -> anyhow::Result<()> {
        self.current = Some(if self.in_place.contains(path) {
            Writing::InPlace {
                target: path.to_string(),
            }
        } else {
            let (staged, file) = self.stage()?;
            Writing::Staged {
                target: path.to_string(),
                staged,
                file,
            }
        });
        Ok(())
    }

    fn write(&mut self, data: &[u8]) -> anyhow::Result<()> {
        match &mut self.current {
            Some(Writing::Staged { staged, file, .. }) => file
                .write_all(data)
                .with_context(|| format!("writing {}", staged.display())),
            Some(Writing::InPlace { .. }) => Ok(()),
            None => bail!("write outside a file"),
        }
    }

    fn end(&mut self, verified: bool) -> anyhow::Result<()> {
        match self.current.take() {
            Some(Writing::Staged {
                target,
                staged,
                file,
            }) => {
                if verified {
                    close_durably(file, &staged)?;
                    self.stop.check()?;
                    self.place(&staged, &target)?;
                    self.verified += 1;
                    return Ok(());
                }
                drop(file);
                std::fs::remove_file(&staged)
                    .with_context(|| format!("deleting {}", staged.display()))
            }
            Some(Writing::InPlace { target }) => {
                // The copy in place matched the manifest; this run's bytes did not.
                if !verified {
                    self.kept_despite.push(target);
                }
                Ok(())
            }
            None => bail!("end outside a file"),
        }
    }

    fn finish(mut self: Box<Self>, verified: bool) -> anyhow::Result<Option<String>> {
        let done = if verified {
            self.seal()
        } else {
            // The verified files are kept (and durable); without the others, no manifest.
            self.remove_partials()
                .and_then(|()| self.sync_all_folders())
        };
        if let Err(err) = done {
            return Err(anyhow!("{err:#}; {}", self.give_up()));
        }
        self.unlock();
        if verified {
            return Ok(None);
        }
        let mut note = format!(
            "the files that failed were not written to {}; the {} others are verified \
             there, and the folder has no {MANIFEST_NAME}, as it is not the whole package \
             (the same command run again takes it up)",
            self.root.display(),
            self.verified - self.kept_despite.len(),
        );
        if !self.kept_despite.is_empty() {
            note.push_str(&format!(
                " ({} failed in this run but stay as an earlier run wrote them, matching \
                 the manifest)",
                self.kept_despite.join(", ")
            ));
        }
        Ok(Some(note))
    }

    fn abort(mut self: Box<Self>) -> String {
        self.give_up()
    }
}

/// Writes a package into a zip file (deflate), `manifest.json` first. The zip is written
/// beside its place under a hidden name, and renamed to it only once every file verified
/// and the zip is durable: a zip cut short, or with a failed file, never takes the name.
/// Beside the partial zip, a file named like it with `.request` added holds the request's
/// id: by it a later run knows the partial zip for one it may replace. One with `.lock`
/// added is the run's [`Lock`], so that no other run replaces the partial zip meanwhile.
pub(crate) struct ZipSink {
    path: PathBuf,
    /// Where the zip is written until it is whole.
    partial: PathBuf,
    zip: ZipWriter<BufWriter<File>>,
    stop: Stop,
    lock: Lock,
}

impl ZipSink {
    /// The hidden name beside `path` the zip is written under.
    fn partial_path(path: &Path) -> Result<PathBuf, String> {
        let Some(name) = path.file_name() else {
            return Err(format!("--zip {} names no file", path.display()));
        };
        let mut partial = std::ffi::OsString::from(".");
        partial.push(name);
        partial.push(".dsrctl-partial");
        Ok(path.with_file_name(partial))
    }

    /// The file beside the partial zip `partial` naming the request it holds.
    fn owner_path(partial: &Path) -> PathBuf {
        Self::beside(partial, ".request")
    }

    /// The lock file beside the partial zip `partial`.
    fn lock_path(partial: &Path) -> PathBuf {
        Self::beside(partial, ".lock")
    }

    /// `partial`'s name with `suffix` added.
    fn beside(partial: &Path, suffix: &str) -> PathBuf {
        let mut name = partial.as_os_str().to_owned();
        name.push(suffix);
        PathBuf::from(name)
    }

    /// The folder the zip `path` is written in.
    fn folder(path: &Path) -> &Path {
        match path.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => parent,
            _ => Path::new("."),
        }
    }

    /// Refuses to replace an existing file, or, in the place of the partial zip, anything
    /// but what an interrupted download of `request_id` left (a file, with the file beside
    /// it naming the request).
    pub(crate) fn check_target(path: &Path, request_id: &str) -> Result<(), String> {
        // A zip is never replaced, nor opened to see what it holds.
        if std::fs::symlink_metadata(path).is_ok() {
            return Err(format!(
                "--zip {} already exists: name a new file, or move that one away and run the \
                 command again",
                path.display()
            ));
        }
        let partial = Self::partial_path(path)?;
        let in_the_way = |why: &str| {
            format!(
                "--zip {}: {} is in the way of the zip being written, {why}: move it away",
                path.display(),
                partial.display()
            )
        };
        match std::fs::symlink_metadata(&partial) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(format!("--zip {}: {e}", partial.display())),
            Ok(meta) if !meta.is_file() => return Err(in_the_way("and is not a file")),
            Ok(_) => {}
        }
        let owner = Self::owner_path(&partial);
        match read_owner(&owner) {
            Ok(id) if id == request_id.as_bytes() => Ok(()),
            Ok(id) => Err(in_the_way(&format!(
                "what an interrupted download of request {:?} left (run that download again \
                 to finish it)",
                String::from_utf8_lossy(&id)
            ))),
            Err(_) => Err(in_the_way(&format!(
                "and no {} says a dsrctl download left it",
                owner.display()
            ))),
        }
    }

    /// Takes the lock beside the partial zip (refusing, changing nothing, when another run
    /// holds it) and creates the partial zip of `request_id`'s package, replacing one an
    /// interrupted run of the same download left ([`Self::check_target`] again, with the
    /// lock held: the folder may have changed since); its owner file is durable before the
    /// partial zip exists.
    pub(crate) fn create(path: &Path, request_id: &str, stop: &Stop) -> anyhow::Result<Self> {
        let partial = Self::partial_path(path).map_err(|e| anyhow!(e))?;
        let Some(lock) = Lock::take(&Self::lock_path(&partial))? else {
            bail!(busy(path, "--zip file"));
        };
        if let Err(why) = Self::check_target(path, request_id) {
            lock.give_back();
            bail!(why);
        }
        match std::fs::remove_file(&partial) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(e).with_context(|| format!("deleting {}", partial.display()));
            }
            _ => {}
        }
        let owner = Self::owner_path(&partial);
        // No partial zip is there now: a kill amid this write leaves nothing that counts.
        write_synced(&owner, request_id.as_bytes())?;
        sync_folders([Self::folder(path)])?;
        let file = File::options()
            .write(true)
            .create_new(true)
            .open(&partial)
            .with_context(|| format!("creating {}", partial.display()))?;
        Ok(Self {
            path: path.to_path_buf(),
            partial,
            zip: ZipWriter::new(BufWriter::with_capacity(64 * 1024, file)),
            stop: stop.clone(),
            lock,
        })
    }

    fn options(size: u64) -> SimpleFileOptions {
        SimpleFileOptions::default()
            .compression_method(CompressionMethod::Deflated)
            // ZIP64 headers are needed from 4 GiB on, and must be chosen before writing.
            .large_file(size >= u64::from(u32::MAX))
    }

    fn context(&self) -> String {
        format!("writing {}", self.partial.display())
    }

    /// Removes the partial zip (its owner file after it) and says so.
    fn remove_partial(partial: &Path) -> String {
        match std::fs::remove_file(partial) {
            Ok(()) => {
                // Alone, it is replaced by the next run.
                let _ = std::fs::remove_file(Self::owner_path(partial));
                format!("its partial copy {} was removed", partial.display())
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => "nothing was left".into(),
            Err(e) => format!(
                "its partial copy {} stays ({e}); the next run of the same command \
                 replaces it",
                partial.display()
            ),
        }
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
        let Self {
            path,
            partial,
            zip,
            stop,
            lock,
        } = *self;
        // Every way out below is done with the partial zip.
        let lock = Released(Some(lock));
        if !verified {
            drop(zip);
            let removed = Self::remove_partial(&partial);
            return Ok(Some(format!("{} was not kept; {removed}", path.display())));
        }
        let mut renamed = false;
        let written = zip
            .finish()
            .with_context(|| format!("writing {}", partial.display()))
            .and_then(|out| close_durably(out, &partial))
            .and_then(|()| stop.check())
            .and_then(|()| {
                // Nothing was there when the download began; something that came since is
                // not replaced.
                match rename_no_replace(&partial, &path) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                        bail!("{} appeared while the download ran", path.display())
                    }
                    Err(e) => {
                        renamed = matches!(e, RenameFailure::FromKept(_));
                        return Err(e).with_context(|| {
                            format!("renaming {} to {}", partial.display(), path.display())
                        });
                    }
                }
                renamed = true;
                sync_folders([Self::folder(&path)])
            });
        if let Err(err) = written {
            // Not known to be whole and durable: no zip, as for a failed file.
            if !renamed {
                return Err(anyhow!(
                    "{err:#}; {} was not written, {}",
                    path.display(),
                    Self::remove_partial(&partial)
                ));
            }
            let mut left = match std::fs::remove_file(&path) {
                Ok(()) => format!("{} was not kept: it was removed", path.display()),
                Err(e) => format!(
                    "{} is there but not known to be durable, and removing it failed ({e}): \
                     delete it",
                    path.display()
                ),
            };
            // The owner file stays with it: the next run knows it for its own.
            if std::fs::symlink_metadata(&partial).is_ok() {
                left.push_str(&format!(
                    "; its partial copy {} stays, and the next run of the same command \
                     replaces it",
                    partial.display()
                ));
            }
            return Err(anyhow!("{err:#}; {left}"));
        }
        // Alone, it is replaced by the next run.
        let _ = std::fs::remove_file(Self::owner_path(&partial));
        drop(lock);
        Ok(None)
    }

    fn abort(self: Box<Self>) -> String {
        let Self {
            path,
            partial,
            zip,
            lock,
            ..
        } = *self;
        drop(zip);
        let removed = Self::remove_partial(&partial);
        lock.release();
        format!(
            "{} was not written, {removed}: run the same command again",
            path.display(),
        )
    }
}

/// A [`Lock`] released when this is dropped.
struct Released(Option<Lock>);

impl Drop for Released {
    fn drop(&mut self) {
        if let Some(lock) = self.0.take() {
            lock.release();
        }
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
    /// Refuses a manifest with a path that is not safe ([`check_path`]) or listed twice.
    pub(crate) fn check_manifest(info: &PackageInfo) -> anyhow::Result<()> {
        let mut seen = HashSet::new();
        for file in &info.files {
            if let Err(reason) = check_path(&file.path) {
                bail!(
                    "refusing the package: manifest path {:?} {reason}",
                    file.path
                );
            }
            if !seen.insert(file.path.as_str()) {
                bail!("refusing the package: manifest lists {:?} twice", file.path);
            }
        }
        Ok(())
    }

    /// Checks the manifest ([`Self::check_manifest`]) and stores `manifest.json`.
    pub(crate) fn new(info: &PackageInfo, mut sink: Box<dyn Sink>) -> anyhow::Result<Self> {
        let stored = Self::check_manifest(info).and_then(|()| sink.manifest(&info.manifest_json));
        if let Err(err) = stored {
            let left = sink.abort();
            return Err(anyhow!("{err:#}; {left}"));
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
                    "the registry sent a chunk of {:?}, which is not a file still to come in \
                     the manifest",
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

    /// The manifest path of the file being received, if any.
    pub(crate) fn receiving(&self) -> Option<&str> {
        let current = self.current.as_ref()?;
        Some(self.files[current.index].path.as_str())
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
            let left = self.sink.abort();
            return Err(anyhow!("{err:#}; {left}"));
        }
        let verified = self.outcomes.iter().all(|o| o.error.is_none());
        let note = self.sink.finish(verified)?;
        Ok((self.outcomes, note))
    }

    /// Gives up after an error: the sink removes what cannot be trusted, and the answer
    /// says what is left.
    pub(crate) fn abort(self) -> String {
        self.sink.abort()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;

    #[test]
    fn mismatches_name_each_file_that_failed_and_why() {
        let outcome = |path: &str, error: Option<&str>| FileOutcome {
            path: path.into(),
            size: 1,
            sha256: String::new(),
            error: error.map(String::from),
        };
        assert_eq!(mismatches(&[outcome("a", None)]), None);
        assert_eq!(mismatches(&[]), None);
        let outcomes = [
            outcome("a", Some("missing")),
            outcome("b", None),
            outcome("c/d", Some("ended at 0 of 1 bytes")),
        ];
        assert_eq!(
            mismatches(&outcomes).as_deref(),
            Some("a: missing; c/d: ended at 0 of 1 bytes")
        );
    }

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

    /// What a test has put into the staging folder once it was emptied, before it is
    /// removed, as if something wrote there meanwhile.
    #[derive(Clone, Copy)]
    enum Stray {
        File(&'static str),
        Folder(&'static str),
    }

    thread_local! {
        /// Set by a test: what the staging folder emptied next gets.
        static STRAY: RefCell<Option<Stray>> = const { RefCell::new(None) };
        /// Set by a test: the next file given this second name (a file name) keeps its
        /// first one, as when removing that fails.
        static KEEP_FROM: RefCell<Option<&'static str>> = const { RefCell::new(None) };
        /// Set by a test: removing `manifest.json` fails.
        static MANIFEST_STAYS: RefCell<bool> = const { RefCell::new(false) };
    }

    /// Called once `staging` was emptied, before it is removed.
    pub(super) fn emptied(staging: &Path) {
        match STRAY.with(RefCell::take) {
            Some(Stray::File(name)) => std::fs::write(staging.join(name), b"stray").unwrap(),
            Some(Stray::Folder(name)) => std::fs::create_dir(staging.join(name)).unwrap(),
            None => {}
        }
    }

    /// Called once a file got its second name `to`, before its first one is removed: `Err`
    /// keeps that.
    pub(super) fn linked(to: &Path) -> std::io::Result<()> {
        let kept = KEEP_FROM.with(|k| {
            let mut k = k.borrow_mut();
            let hit = k.is_some_and(|name| to.file_name() == Some(name.as_ref()));
            if hit {
                *k = None;
            }
            hit
        });
        if kept {
            return Err(std::io::Error::other("the test keeps the first name"));
        }
        Ok(())
    }

    /// Called before `manifest.json` is removed: `Err` fails that.
    pub(super) fn removing_manifest() -> std::io::Result<()> {
        if MANIFEST_STAYS.with(|m| *m.borrow()) {
            return Err(std::io::Error::other("the test keeps manifest.json"));
        }
        Ok(())
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
            manifest_json: MANIFEST.to_vec(),
            ..Default::default()
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

    /// The folder sink as `download` opens it for `info`: the folder checked before and
    /// after the manifest arrived.
    fn dir_sink(root: &Path, info: &PackageInfo) -> Box<dyn Sink> {
        stoppable_dir_sink(root, info, &Stop::default())
    }

    /// [`dir_sink`], stopping once `stop` is set.
    fn stoppable_dir_sink(root: &Path, info: &PackageInfo, stop: &Stop) -> Box<dyn Sink> {
        DirSink::check_target(root, &info.request_id).unwrap();
        let leftovers = DirSink::check_leftovers(root, info, stop).unwrap();
        Box::new(DirSink::create(root, &info.request_id, leftovers, stop).unwrap())
    }

    /// Takes the first `n` chunks, then stops as a killed process does: nothing cleaned up.
    fn killed_after(
        info: &PackageInfo,
        chunks: &[PackageFileChunk],
        n: usize,
        sink: Box<dyn Sink>,
    ) {
        let mut unpacker = Unpacker::new(info, sink).unwrap();
        for c in &chunks[..n] {
            unpacker.chunk(c).unwrap();
        }
        drop(unpacker);
    }

    /// Asserts that every file in `root` outside the staging folder (`manifest.json` aside)
    /// is a file of `info`'s package, whole and as its manifest lists it; returns how many
    /// there are.
    fn assert_nothing_partial_is_named(root: &Path, info: &PackageInfo) -> usize {
        let mut found = survey(root, &info.request_id).unwrap();
        found.files.retain(|f| f != MANIFEST_NAME);
        for path in &found.files {
            let file = info
                .files
                .iter()
                .find(|f| &f.path == path)
                .unwrap_or_else(|| panic!("{path} is not in the package"));
            assert_eq!(
                check_file(&root.join(path), file.size, &file.sha256, &Stop::default()),
                Ok(()),
                "{path}"
            );
        }
        found.files.len()
    }

    /// The names in `root`'s staging folder, sorted.
    fn staged_names(root: &Path) -> Vec<String> {
        let mut names: Vec<_> = std::fs::read_dir(root.join(STAGING_NAME))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        names
    }

    /// A sink whose disk fills up at its `writes_left + 1`th write.
    struct FailingDisk {
        inner: Box<dyn Sink>,
        writes_left: usize,
    }

    impl Sink for FailingDisk {
        fn manifest(&mut self, json: &[u8]) -> anyhow::Result<()> {
            self.inner.manifest(json)
        }
        fn begin(&mut self, path: &str, size: u64) -> anyhow::Result<()> {
            self.inner.begin(path, size)
        }
        fn write(&mut self, data: &[u8]) -> anyhow::Result<()> {
            if self.writes_left == 0 {
                bail!("No space left on device");
            }
            self.writes_left -= 1;
            self.inner.write(data)
        }
        fn end(&mut self, verified: bool) -> anyhow::Result<()> {
            self.inner.end(verified)
        }
        fn finish(self: Box<Self>, verified: bool) -> anyhow::Result<Option<String>> {
            self.inner.finish(verified)
        }
        fn abort(self: Box<Self>) -> String {
            self.inner.abort()
        }
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
        let (outcomes, note) = unpack(&info, &chunks, dir_sink(&out, &info));
        assert_eq!(note, None);
        assert_eq!(outcomes.len(), 3);
        assert!(outcomes.iter().all(|o| o.error.is_none()), "{outcomes:?}");
        assert_eq!(std::fs::read(out.join(MANIFEST_NAME)).unwrap(), MANIFEST);
        for (path, content) in FILES {
            assert_eq!(&std::fs::read(out.join(path)).unwrap(), content, "{path}");
        }
        assert!(
            !out.join(STAGING_NAME).exists(),
            "the staging folder is removed"
        );
    }

    #[test]
    fn a_folder_is_durable_before_it_is_reported_verified() {
        let tmp = tempfile::tempdir().unwrap();
        // Two folders to create above the package's own.
        let out = tmp.path().join("a/b/pkg");
        let staging = out.join(STAGING_NAME);
        let (info, chunks) = package(FILES, 7);
        take_synced();
        let (_, note) = unpack(&info, &chunks, dir_sink(&out, &info));
        assert_eq!(note, None);
        let staged = |n: usize| staging.join(format!("{n}{PARTIAL_SUFFIX}"));
        assert_eq!(
            take_synced(),
            [
                // The file naming the request, then the folder it was renamed in.
                staging.join(OWNER_TEMP_NAME),
                staging.clone(),
                // Each file before it is renamed to its path.
                staged(0),
                staged(1),
                staged(2),
                // Every folder that gained an entry, deepest first, before the manifest
                // vouches for the files in them.
                out.join("p/adapter"),
                out.join("p/accounting"),
                out.join("p"),
                staging.clone(),
                out.clone(),
                tmp.path().join("a/b"),
                tmp.path().join("a"),
                tmp.path().to_path_buf(),
                // The manifest, then the folder it was renamed into.
                staged(3),
                out.clone(),
            ]
        );
    }

    #[test]
    fn a_zip_is_durable_before_it_is_reported_verified() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("pkg.zip");
        let (info, chunks) = package(FILES, 4);
        take_synced();
        let sink = Box::new(ZipSink::create(&path, "r-1", &Stop::default()).unwrap());
        let (_, note) = unpack(&info, &chunks, sink);
        assert_eq!(note, None);
        // The file naming the request, and its folder, before the partial zip exists; the
        // zip under its partial name, then the folder it was renamed in.
        let partial = tmp.path().join(".pkg.zip.dsrctl-partial");
        let owner = tmp.path().join(".pkg.zip.dsrctl-partial.request");
        assert_eq!(
            take_synced(),
            [
                owner.clone(),
                tmp.path().to_path_buf(),
                partial.clone(),
                tmp.path().to_path_buf()
            ]
        );
        assert!(path.exists() && !partial.exists() && !owner.exists());
    }

    #[test]
    fn a_corrupted_file_is_caught_and_deleted() {
        let tmp = tempfile::tempdir().unwrap();
        let (info, mut chunks) = package(FILES, 7);
        // One byte flipped in the last file: same size, other digest.
        let last = chunks.last_mut().unwrap();
        last.data[0] ^= 0x20;
        let (outcomes, note) = unpack(&info, &chunks, dir_sink(tmp.path(), &info));
        let bad: Vec<_> = outcomes.iter().filter(|o| o.error.is_some()).collect();
        assert_eq!(bad.len(), 1);
        assert_eq!(bad[0].path, "p/adapter/orders.csv");
        assert!(bad[0].error.as_ref().unwrap().starts_with("SHA-256 is "));
        let note = note.unwrap();
        assert!(
            note.contains("were not written") && note.contains("the 2 others"),
            "{note}"
        );
        assert!(!tmp.path().join("p/adapter/orders.csv").exists());
        assert!(tmp.path().join("p/accounting/customer.json").exists());
        assert_eq!(staged_names(tmp.path()), [OWNER_NAME]);
        // Without every file, the folder is no package: nothing to confirm a return with.
        assert!(!tmp.path().join(MANIFEST_NAME).exists());
        assert_eq!(assert_nothing_partial_is_named(tmp.path(), &info), 2);

        // Sent right the next time, the same command finishes the package in that folder.
        let (info, chunks) = package(FILES, 7);
        let (outcomes, note) = unpack(&info, &chunks, dir_sink(tmp.path(), &info));
        assert_eq!(note, None);
        assert!(outcomes.iter().all(|o| o.error.is_none()), "{outcomes:?}");
        assert_eq!(assert_nothing_partial_is_named(tmp.path(), &info), 3);
        assert!(tmp.path().join(MANIFEST_NAME).exists());
    }

    #[test]
    fn a_missing_chunk_or_file_fails_that_file() {
        let tmp = tempfile::tempdir().unwrap();
        let (info, mut chunks) = package(FILES, 7);
        // The second chunk of the first file is lost: the third starts at the wrong offset.
        chunks.remove(1);
        // The last file never arrives.
        chunks.retain(|c| c.path != "p/adapter/orders.csv");
        let (outcomes, _) = unpack(&info, &chunks, dir_sink(tmp.path(), &info));
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
        let mut unpacker = Unpacker::new(&info, dir_sink(tmp.path(), &info)).unwrap();
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
        let left = unpacker.abort();
        assert!(left.contains("nothing partial was left"), "{left}");
        // The partial file is gone; the empty one before it was complete and stays.
        assert!(!tmp.path().join("p/adapter/orders.csv").exists());
        assert!(tmp.path().join("p/accounting/empty.csv").exists());
        assert!(!tmp.path().join(MANIFEST_NAME).exists());
        assert_eq!(staged_names(tmp.path()), [OWNER_NAME]);
    }

    #[test]
    fn an_unsafe_or_repeated_manifest_path_refuses_the_package() {
        let tmp = tempfile::tempdir().unwrap();
        let (mut info, _) = package(FILES, 7);
        info.files[1].path = "../outside".into();
        let sink = dir_sink(tmp.path(), &info);
        let err = Unpacker::new(&info, sink).err().unwrap();
        assert!(err.to_string().contains("\"../outside\""), "{err}");

        let (mut info, _) = package(FILES, 7);
        info.files[2].path = info.files[0].path.clone();
        let sink = dir_sink(tmp.path(), &info);
        let err = Unpacker::new(&info, sink).err().unwrap();
        assert!(err.to_string().contains("twice"), "{err}");
    }

    #[test]
    fn a_target_folder_must_be_new_empty_or_this_downloads_leftovers() {
        let tmp = tempfile::tempdir().unwrap();
        assert_eq!(
            DirSink::check_target(&tmp.path().join("new"), "r-1"),
            Ok(())
        );
        assert_eq!(DirSink::check_target(tmp.path(), "r-1"), Ok(()));
        std::fs::write(tmp.path().join("x"), b"").unwrap();
        assert!(ZipSink::check_target(&tmp.path().join("x"), "r-1")
            .unwrap_err()
            .contains("already exists"));
        // Without the staging folder of a run of this download, before connecting.
        assert_eq!(
            DirSink::check_target(tmp.path(), "r-1").unwrap_err(),
            format!("--out {} is not empty", tmp.path().display())
        );

        // With it, what else the folder holds must be what that run left.
        let (info, _) = package(FILES, 7);
        let refused = |setup: &dyn Fn(&Path), expected: &str| {
            let tmp = tempfile::tempdir().unwrap();
            let root = tmp.path();
            std::fs::create_dir(root.join(STAGING_NAME)).unwrap();
            std::fs::write(root.join(STAGING_NAME).join(OWNER_NAME), b"r-1").unwrap();
            setup(root);
            let err = DirSink::check_target(root, "r-1")
                .and_then(|()| DirSink::check_leftovers(root, &info, &Stop::default()).map(drop))
                .unwrap_err();
            assert!(err.contains(expected), "{expected:?} in {err:?}");
            assert!(err.contains("give a new or empty folder"), "{err}");
        };
        let mkdir = |path: PathBuf| std::fs::create_dir_all(path).unwrap();
        let write = |path: PathBuf, data: &[u8]| std::fs::write(path, data).unwrap();
        refused(
            &|root| write(root.join("notes.txt"), b"mine"),
            "holds notes.txt, which is not a file of this package",
        );
        refused(
            &|root| mkdir(root.join("p/old")),
            "holds p/old, a folder no file of this package is in",
        );
        // A file at a package path that is not whole: not what this download leaves.
        refused(
            &|root| {
                mkdir(root.join("p/accounting"));
                write(root.join("p/accounting/customer.json"), b"{\"name\":");
            },
            "holds p/accounting/customer.json, which does not match the manifest (ended at \
             8 of 16 bytes)",
        );
        refused(
            &|root| write(root.join(MANIFEST_NAME), b"{\"request_id\":\"r-2\"}"),
            "so a package whose download finished",
        );
        #[cfg(unix)]
        refused(
            &|root| std::os::unix::fs::symlink("/tmp", root.join("p")).unwrap(),
            "holds p, which is neither a file nor a folder",
        );
        refused(
            &|root| {
                write(root.join(STAGING_NAME).join(OWNER_NAME), b"r-2");
                write(root.join(STAGING_NAME).join("0.partial"), b"{");
            },
            "what an interrupted download of request \"r-2\" left",
        );
        refused(
            &|root| write(root.join(STAGING_NAME).join("notes.txt"), b""),
            "which is not what an interrupted dsrctl download leaves",
        );

        // A package with a file where the staging folder is cannot go into a folder.
        let (mut info, _) = package(FILES, 7);
        info.files[0].path = format!("{STAGING_NAME}/x");
        let err = DirSink::check_leftovers(tmp.path(), &info, &Stop::default())
            .map(drop)
            .unwrap_err();
        assert!(err.contains("download it with --zip"), "{err}");
    }

    #[test]
    fn a_killed_folder_download_names_nothing_partial_and_runs_again() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("pkg");
        let (info, chunks) = package(FILES, 7);
        // Killed after the first two chunks of orders.csv: customer.json and empty.csv are
        // verified, orders.csv is half written.
        killed_after(&info, &chunks, 5, dir_sink(&out, &info));
        assert!(!out.join("p/adapter/orders.csv").exists());
        assert!(!out.join(MANIFEST_NAME).exists());
        assert_eq!(assert_nothing_partial_is_named(&out, &info), 2);
        // The file naming the request, orders.csv's part, and the lock file, unlocked.
        assert_eq!(
            staged_names(&out),
            [format!("2{PARTIAL_SUFFIX}").as_str(), LOCK_NAME, OWNER_NAME]
        );

        // The same command again takes the folder up and finishes it.
        let leftovers = DirSink::check_leftovers(&out, &info, &Stop::default()).unwrap();
        assert_eq!(leftovers.in_place.len(), 2, "{leftovers:?}");
        let (outcomes, note) = unpack(&info, &chunks, dir_sink(&out, &info));
        assert_eq!(note, None);
        assert!(outcomes.iter().all(|o| o.error.is_none()), "{outcomes:?}");
        assert_eq!(std::fs::read(out.join(MANIFEST_NAME)).unwrap(), MANIFEST);
        assert_eq!(assert_nothing_partial_is_named(&out, &info), 3);
        assert!(!out.join(STAGING_NAME).exists());
        // A folder with a finished package is not written again.
        let err = DirSink::check_target(&out, "r-1").unwrap_err();
        assert!(err.contains("is not empty"), "{err}");
    }

    #[test]
    fn a_disk_failing_mid_file_names_the_file_and_removes_the_part() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("pkg");
        let (info, chunks) = package(FILES, 7);
        let sink = Box::new(FailingDisk {
            inner: dir_sink(&out, &info),
            writes_left: 4,
        });
        let mut unpacker = Unpacker::new(&info, sink).unwrap();
        let failed = chunks.iter().find_map(|c| unpacker.chunk(c).err()).unwrap();
        assert!(failed.to_string().contains("No space left"), "{failed}");
        assert_eq!(unpacker.receiving(), Some("p/adapter/orders.csv"));
        let left = unpacker.abort();
        assert!(
            left.contains("nothing partial was left")
                && left.contains("the files verified so far (2)"),
            "{left}"
        );
        assert_eq!(staged_names(&out), [OWNER_NAME]);
        assert_eq!(assert_nothing_partial_is_named(&out, &info), 2);

        let (outcomes, note) = unpack(&info, &chunks, dir_sink(&out, &info));
        assert_eq!(note, None);
        assert!(outcomes.iter().all(|o| o.error.is_none()), "{outcomes:?}");
        assert_eq!(assert_nothing_partial_is_named(&out, &info), 3);
        assert!(out.join(MANIFEST_NAME).exists());
    }

    #[test]
    fn a_killed_or_failed_zip_download_never_takes_the_name_and_runs_again() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("pkg.zip");
        let partial = tmp.path().join(".pkg.zip.dsrctl-partial");
        let (info, chunks) = package(FILES, 4);
        killed_after(
            &info,
            &chunks,
            5,
            Box::new(ZipSink::create(&path, "r-1", &Stop::default()).unwrap()),
        );
        assert!(!path.exists());
        assert!(partial.exists());

        // The disk fills up in the next run: the partial zip is removed.
        ZipSink::check_target(&path, "r-1").unwrap();
        let sink = Box::new(FailingDisk {
            inner: Box::new(ZipSink::create(&path, "r-1", &Stop::default()).unwrap()),
            writes_left: 4,
        });
        let mut unpacker = Unpacker::new(&info, sink).unwrap();
        assert!(chunks
            .iter()
            .find_map(|c| unpacker.chunk(c).err())
            .is_some());
        let left = unpacker.abort();
        assert!(left.contains("was not written, its partial copy"), "{left}");
        assert!(!path.exists() && !partial.exists());

        ZipSink::check_target(&path, "r-1").unwrap();
        let sink = Box::new(ZipSink::create(&path, "r-1", &Stop::default()).unwrap());
        let (outcomes, note) = unpack(&info, &chunks, sink);
        assert_eq!(note, None);
        assert!(outcomes.iter().all(|o| o.error.is_none()), "{outcomes:?}");
        let zip = zip::ZipArchive::new(File::open(&path).unwrap()).unwrap();
        assert_eq!(zip.len(), FILES.len() + 1);
        assert!(!partial.exists());

        // Only a file may stand where the partial zip goes.
        std::fs::create_dir(tmp.path().join(".other.zip.dsrctl-partial")).unwrap();
        let err = ZipSink::check_target(&tmp.path().join("other.zip"), "r-1").unwrap_err();
        assert!(err.contains("is in the way"), "{err}");
    }

    #[test]
    fn a_zip_reads_back_with_every_file_deflated() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("pkg.zip");
        let (info, chunks) = package(FILES, 4);
        let sink = Box::new(ZipSink::create(&path, "r-1", &Stop::default()).unwrap());
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
        let sink = Box::new(ZipSink::create(&path, "r-1", &Stop::default()).unwrap());
        let (outcomes, note) = unpack(&info, &chunks, sink);
        assert!(outcomes[0].error.is_some());
        assert!(note.unwrap().contains("was not kept"));
        assert!(!path.exists());
        assert!(!tmp.path().join(".pkg.zip.dsrctl-partial").exists());
    }

    #[test]
    fn a_run_taking_a_folder_up_keeps_the_file_naming_the_request() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("pkg");
        let staging = out.join(STAGING_NAME);
        let (info, chunks) = package(FILES, 7);
        killed_after(&info, &chunks, 5, dir_sink(&out, &info));
        #[cfg(unix)]
        let inode = |path: &Path| {
            use std::os::unix::fs::MetadataExt;
            std::fs::metadata(path).unwrap().ino()
        };
        #[cfg(unix)]
        let before = inode(&staging.join(OWNER_NAME));

        // The next run empties the staging folder but for the file naming the request,
        // which it does not write again: killed at any moment, the folder stays its own.
        take_synced();
        let sink = dir_sink(&out, &info);
        let synced = take_synced();
        for name in [OWNER_NAME, OWNER_TEMP_NAME] {
            assert!(!synced.contains(&staging.join(name)), "{synced:?}");
        }
        #[cfg(unix)]
        assert_eq!(inode(&staging.join(OWNER_NAME)), before);
        assert_eq!(staged_names(&out), [LOCK_NAME, OWNER_NAME]);
        drop(sink);
        DirSink::check_target(&out, "r-1").unwrap();

        // Killed while a new file naming the request was written: only its temporary name
        // can be half written, and the next run replaces it.
        for leftover in [&[][..], b"r-"] {
            let tmp = tempfile::tempdir().unwrap();
            let out = tmp.path().join("pkg");
            std::fs::create_dir_all(out.join(STAGING_NAME)).unwrap();
            std::fs::write(out.join(STAGING_NAME).join(OWNER_TEMP_NAME), leftover).unwrap();
            let (outcomes, note) = unpack(&info, &chunks, dir_sink(&out, &info));
            assert_eq!(note, None);
            assert!(outcomes.iter().all(|o| o.error.is_none()), "{outcomes:?}");
            assert!(!out.join(STAGING_NAME).exists());
        }
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("pkg");
        killed_after(&info, &chunks, 5, dir_sink(&out, &info));
        std::fs::write(out.join(STAGING_NAME).join(OWNER_TEMP_NAME), b"r-").unwrap();
        let sink = dir_sink(&out, &info);
        assert_eq!(staged_names(&out), [LOCK_NAME, OWNER_NAME]);
        assert_eq!(
            std::fs::read(out.join(STAGING_NAME).join(OWNER_NAME)).unwrap(),
            b"r-1"
        );
        drop(sink);
    }

    #[test]
    fn a_partial_zip_no_run_of_this_download_left_is_not_deleted() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("pkg.zip");
        let partial = tmp.path().join(".pkg.zip.dsrctl-partial");
        let owner = tmp.path().join(".pkg.zip.dsrctl-partial.request");
        std::fs::write(&partial, b"mine").unwrap();
        let refused = |expected: &str| {
            let err = ZipSink::check_target(&path, "r-1").unwrap_err();
            assert!(
                err.contains(expected) && err.contains("move it away"),
                "{err}"
            );
            let err = ZipSink::create(&path, "r-1", &Stop::default())
                .err()
                .unwrap();
            assert!(err.to_string().contains(expected), "{err}");
            assert_eq!(std::fs::read(&partial).unwrap(), b"mine");
        };
        refused("says a dsrctl download left it");
        std::fs::write(&owner, b"r-2").unwrap();
        refused("what an interrupted download of request \"r-2\" left");

        // One of this download's is replaced, and its owner file goes with it.
        std::fs::write(&owner, b"r-1").unwrap();
        ZipSink::check_target(&path, "r-1").unwrap();
        let (info, chunks) = package(FILES, 4);
        let sink = Box::new(ZipSink::create(&path, "r-1", &Stop::default()).unwrap());
        let (outcomes, _) = unpack(&info, &chunks, sink);
        assert!(outcomes.iter().all(|o| o.error.is_none()), "{outcomes:?}");
        assert!(path.exists() && !partial.exists() && !owner.exists());
    }

    #[test]
    fn ctrl_c_stops_the_check_of_leftovers_and_the_sealing() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("pkg");
        let (info, chunks) = package(FILES, 7);
        killed_after(&info, &chunks, 5, dir_sink(&out, &info));
        let stop = Stop::default();
        stop.set();
        let err = DirSink::check_leftovers(&out, &info, &stop).unwrap_err();
        assert_eq!(err, STOPPED);

        // Every chunk in, then Ctrl-C: no manifest.json, nothing partial named.
        let stop = Stop::default();
        let mut unpacker = Unpacker::new(&info, stoppable_dir_sink(&out, &info, &stop)).unwrap();
        for c in &chunks {
            unpacker.chunk(c).unwrap();
        }
        stop.set();
        let err = unpacker.finish().err().unwrap().to_string();
        assert!(
            err.contains(STOPPED) && err.contains("nothing partial was left"),
            "{err}"
        );
        assert!(!out.join(MANIFEST_NAME).exists());
        assert_eq!(staged_names(&out), [OWNER_NAME]);
        assert_eq!(assert_nothing_partial_is_named(&out, &info), 2);
        let (outcomes, note) = unpack(&info, &chunks, dir_sink(&out, &info));
        assert_eq!(note, None);
        assert!(outcomes.iter().all(|o| o.error.is_none()), "{outcomes:?}");

        // A zip stopped before it was renamed is not kept.
        let path = tmp.path().join("pkg.zip");
        let stop = Stop::default();
        let sink = Box::new(ZipSink::create(&path, "r-1", &stop).unwrap());
        let mut unpacker = Unpacker::new(&info, sink).unwrap();
        for c in &chunks {
            unpacker.chunk(c).unwrap();
        }
        stop.set();
        let err = unpacker.finish().err().unwrap().to_string();
        assert!(err.contains(STOPPED), "{err}");
        assert!(!path.exists());
        assert!(!tmp.path().join(".pkg.zip.dsrctl-partial").exists());
    }

    /// `info` with a `manifest.json` as the registry writes it: naming the request, listing
    /// the files.
    fn with_real_manifest(mut info: PackageInfo) -> PackageInfo {
        let files: Vec<_> = info
            .files
            .iter()
            .map(|f| serde_json::json!({"path": f.path, "size": f.size, "sha256": f.sha256}))
            .collect();
        let manifest = serde_json::json!({"request_id": info.request_id, "files": files});
        info.manifest_json = serde_json::to_vec(&manifest).unwrap();
        info
    }

    #[test]
    fn a_sealing_that_fails_keeps_the_folder_this_downloads() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("pkg");
        let (info, chunks) = package(FILES, 7);
        let info = with_real_manifest(info);
        // Something writes into the staging folder as it is removed: removing it fails
        // after the file naming the request is gone.
        STRAY.with(|s| *s.borrow_mut() = Some(Stray::File("stray")));
        let mut unpacker = Unpacker::new(&info, dir_sink(&out, &info)).unwrap();
        for c in &chunks {
            unpacker.chunk(c).unwrap();
        }
        let err = unpacker.finish().err().unwrap().to_string();
        assert!(
            err.contains("and no manifest.json; run the same command again to finish"),
            "{err}"
        );
        assert!(!out.join(MANIFEST_NAME).exists());
        // Giving up emptied the staging folder but for that file, written again: the same
        // command takes the folder up.
        assert_eq!(staged_names(&out), [OWNER_NAME]);
        let (outcomes, note) = unpack(&info, &chunks, dir_sink(&out, &info));
        assert_eq!(note, None);
        assert!(outcomes.iter().all(|o| o.error.is_none()), "{outcomes:?}");
        assert!(out.join(MANIFEST_NAME).exists() && !out.join(STAGING_NAME).exists());
    }

    #[test]
    fn a_finished_download_is_named_so() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("pkg");
        let (info, chunks) = package(FILES, 7);
        let info = with_real_manifest(info);
        unpack(&info, &chunks, dir_sink(&out, &info));
        let finished = |out: &Path| {
            let err = DirSink::check_target(out, "r-1").unwrap_err();
            assert!(err.contains("download finished already"), "{err}");
            err
        };
        assert!(!finished(&out).contains("left over"));
        // Killed while the staging folder was removed: empty, or with the lock file left.
        let staging = out.join(STAGING_NAME);
        std::fs::create_dir(&staging).unwrap();
        assert!(finished(&out).contains("can be deleted"));
        std::fs::write(staging.join(LOCK_NAME), b"").unwrap();
        assert!(finished(&out).contains("can be deleted"));
        // The file naming the request is there again when the run failed after writing
        // manifest.json and could not remove it: not finished, and what to do is said.
        std::fs::write(staging.join(OWNER_NAME), b"r-1").unwrap();
        let err = DirSink::check_target(&out, "r-1").unwrap_err();
        assert!(
            !err.contains("finished already") && err.contains("failed after writing it"),
            "{err}"
        );
        std::fs::remove_file(staging.join(OWNER_NAME)).unwrap();
        // Sizes are checked, not digests: hashing a large package would run unseen.
        std::fs::write(out.join(&info.files[0].path), b"{\"name\":\"Teemo\"}").unwrap();
        assert!(finished(&out).contains("of the listed sizes"));
        // Another request's folder, or one whose files no longer match, is not finished.
        assert!(DirSink::check_target(&out, "r-2").is_err_and(|e| !e.contains("finished")));
        std::fs::write(out.join(&info.files[0].path), b"changed").unwrap();
        let err = DirSink::check_target(&out, "r-1").unwrap_err();
        assert!(!err.contains("finished already"), "{err}");
    }

    #[cfg(unix)]
    #[test]
    fn a_link_where_the_zips_owner_file_goes_is_replaced_not_followed() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("pkg.zip");
        let victim = tmp.path().join("victim");
        std::fs::write(&victim, b"precious").unwrap();
        let owner = tmp.path().join(".pkg.zip.dsrctl-partial.request");
        std::os::unix::fs::symlink(&victim, &owner).unwrap();
        let sink = ZipSink::create(&path, "r-1", &Stop::default()).unwrap();
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
        assert!(!std::fs::symlink_metadata(&owner).unwrap().is_symlink());
        assert_eq!(std::fs::read(&owner).unwrap(), b"r-1");
        drop(sink);
    }

    #[test]
    fn a_zip_named_whose_partial_name_stays_is_said_so() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("pkg.zip");
        let partial = tmp.path().join(".pkg.zip.dsrctl-partial");
        let (info, chunks) = package(FILES, 4);
        let sink = Box::new(ZipSink::create(&path, "r-1", &Stop::default()).unwrap());
        let mut unpacker = Unpacker::new(&info, sink).unwrap();
        for c in &chunks {
            unpacker.chunk(c).unwrap();
        }
        KEEP_FROM.with(|k| *k.borrow_mut() = Some("pkg.zip"));
        let err = unpacker.finish().err().unwrap().to_string();
        assert!(
            err.contains("was not kept: it was removed")
                && err.contains(&format!(
                    "its partial copy {} stays, and the next run of the same command \
                     replaces it",
                    partial.display()
                )),
            "{err}"
        );
        assert!(!err.contains("was not written"), "{err}");
        assert!(!path.exists());
        // As said: the partial zip stays a file, with the file naming the request beside
        // it, and the same command run again replaces it.
        assert!(std::fs::symlink_metadata(&partial).unwrap().is_file());
        ZipSink::check_target(&path, "r-1").unwrap();
        let sink = Box::new(ZipSink::create(&path, "r-1", &Stop::default()).unwrap());
        let (outcomes, note) = unpack(&info, &chunks, sink);
        assert_eq!(note, None);
        assert!(outcomes.iter().all(|o| o.error.is_none()), "{outcomes:?}");
        assert!(path.exists() && !partial.exists());
    }

    #[test]
    fn a_second_run_into_the_same_place_is_refused_while_the_first_writes() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("pkg");
        let (info, chunks) = package(FILES, 7);
        // The first run is writing orders.csv in the staging folder.
        let mut first = Unpacker::new(&info, dir_sink(&out, &info)).unwrap();
        for c in &chunks[..5] {
            first.chunk(c).unwrap();
        }
        let staged = out.join(STAGING_NAME).join(format!("2{PARTIAL_SUFFIX}"));
        let before = std::fs::read(&staged).unwrap();
        let names = staged_names(&out);
        // The second passed the checks made before the registry answered.
        DirSink::check_target(&out, "r-1").unwrap();
        let leftovers = DirSink::check_leftovers(&out, &info, &Stop::default()).unwrap();
        let err = DirSink::create(&out, "r-1", leftovers, &Stop::default())
            .err()
            .unwrap()
            .to_string();
        assert_eq!(
            err,
            format!(
                "another dsrctl download is writing {}; wait for it or use another folder",
                out.display()
            )
        );
        assert_eq!(staged_names(&out), names);
        assert_eq!(std::fs::read(&staged).unwrap(), before);
        for c in &chunks[5..] {
            first.chunk(c).unwrap();
        }
        let (outcomes, note) = first.finish().unwrap();
        assert_eq!(note, None);
        assert!(outcomes.iter().all(|o| o.error.is_none()), "{outcomes:?}");
        assert_eq!(assert_nothing_partial_is_named(&out, &info), 3);
        assert!(!out.join(STAGING_NAME).exists());

        // A zip likewise.
        let path = tmp.path().join("pkg.zip");
        let partial = tmp.path().join(".pkg.zip.dsrctl-partial");
        let sink = Box::new(ZipSink::create(&path, "r-1", &Stop::default()).unwrap());
        let mut first = Unpacker::new(&info, sink).unwrap();
        for c in &chunks[..5] {
            first.chunk(c).unwrap();
        }
        let size = std::fs::metadata(&partial).unwrap().len();
        ZipSink::check_target(&path, "r-1").unwrap();
        let err = ZipSink::create(&path, "r-1", &Stop::default())
            .err()
            .unwrap()
            .to_string();
        assert_eq!(
            err,
            format!(
                "another dsrctl download is writing {}; wait for it or use another --zip file",
                path.display()
            )
        );
        assert_eq!(std::fs::metadata(&partial).unwrap().len(), size);
        for c in &chunks[5..] {
            first.chunk(c).unwrap();
        }
        let (outcomes, note) = first.finish().unwrap();
        assert_eq!(note, None);
        assert!(outcomes.iter().all(|o| o.error.is_none()), "{outcomes:?}");
        let zip = zip::ZipArchive::new(File::open(&path).unwrap()).unwrap();
        assert_eq!(zip.len(), FILES.len() + 1);
        // Nothing of the runs stays beside the zip.
        assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 2);
    }

    #[test]
    fn a_run_taking_the_lock_checks_the_folder_again() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("pkg");
        let (info, chunks) = package(FILES, 7);
        // Checked while the folder was empty; another run finished the download since.
        DirSink::check_target(&out, "r-1").unwrap();
        let leftovers = DirSink::check_leftovers(&out, &info, &Stop::default()).unwrap();
        unpack(&info, &chunks, dir_sink(&out, &info));
        let err = DirSink::create(&out, "r-1", leftovers, &Stop::default())
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("which appeared while the registry answered"),
            "{err}"
        );
        // What the refused run made is gone again.
        assert!(!out.join(STAGING_NAME).exists());
        assert_eq!(std::fs::read(out.join(MANIFEST_NAME)).unwrap(), MANIFEST);

        // A staging folder another request's run took meanwhile is not emptied.
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("pkg");
        killed_after(&info, &chunks, 5, dir_sink(&out, &info));
        let leftovers = DirSink::check_leftovers(&out, &info, &Stop::default()).unwrap();
        std::fs::write(out.join(STAGING_NAME).join(OWNER_NAME), b"r-2").unwrap();
        let names = staged_names(&out);
        let err = DirSink::create(&out, "r-1", leftovers, &Stop::default())
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("request \"r-2\""), "{err}");
        assert_eq!(staged_names(&out), names);
    }

    #[test]
    fn a_manifest_named_whose_staged_name_stays_is_removed() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("pkg");
        let (info, chunks) = package(FILES, 7);
        let info = with_real_manifest(info);
        KEEP_FROM.with(|k| *k.borrow_mut() = Some(MANIFEST_NAME));
        let mut unpacker = Unpacker::new(&info, dir_sink(&out, &info)).unwrap();
        for c in &chunks {
            unpacker.chunk(c).unwrap();
        }
        let err = unpacker.finish().err().unwrap().to_string();
        assert!(
            err.contains("nothing partial was left")
                && err.contains("and no manifest.json; run the same command again to finish"),
            "{err}"
        );
        assert!(!out.join(MANIFEST_NAME).exists());
        let (outcomes, note) = unpack(&info, &chunks, dir_sink(&out, &info));
        assert_eq!(note, None);
        assert!(outcomes.iter().all(|o| o.error.is_none()), "{outcomes:?}");
        assert!(out.join(MANIFEST_NAME).exists() && !out.join(STAGING_NAME).exists());
    }

    #[test]
    fn a_manifest_that_cannot_be_removed_is_said_to_be_there() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("pkg");
        let (info, chunks) = package(FILES, 7);
        let info = with_real_manifest(info);
        STRAY.with(|s| *s.borrow_mut() = Some(Stray::File("stray")));
        MANIFEST_STAYS.with(|m| *m.borrow_mut() = true);
        let mut unpacker = Unpacker::new(&info, dir_sink(&out, &info)).unwrap();
        for c in &chunks {
            unpacker.chunk(c).unwrap();
        }
        let err = unpacker.finish().err().unwrap().to_string();
        MANIFEST_STAYS.with(|m| *m.borrow_mut() = false);
        assert!(out.join(MANIFEST_NAME).exists());
        let next = DirSink::check_target(&out, "r-1").unwrap_err();
        assert!(
            err.contains("and manifest.json, though the download failed after writing it")
                && err.contains(&format!("the same command run again refuses it: {next}")),
            "{err}"
        );
        assert!(!err.contains("no manifest.json"), "{err}");
    }

    #[test]
    fn a_staging_folder_left_holding_a_folder_is_said_to_be_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("pkg");
        let (info, chunks) = package(FILES, 7);
        let info = with_real_manifest(info);
        STRAY.with(|s| *s.borrow_mut() = Some(Stray::Folder("stray")));
        let mut unpacker = Unpacker::new(&info, dir_sink(&out, &info)).unwrap();
        for c in &chunks {
            unpacker.chunk(c).unwrap();
        }
        let err = unpacker.finish().err().unwrap().to_string();
        let next = DirSink::check_target(&out, "r-1").unwrap_err();
        assert!(
            err.contains("removing the partial files from")
                && err.contains(&format!("the same command run again refuses it: {next}")),
            "{err}"
        );
        assert!(
            !err.contains("run the same command again to finish"),
            "{err}"
        );
        assert!(!err.contains("next run"), "{err}");
    }

    /// A name taken, even by a dangling symbolic link, is never replaced and the staged file
    /// stays; a free name gets the file and the staged name goes.
    #[test]
    fn a_rename_never_replaces_what_is_there() {
        let dir = tempfile::tempdir().unwrap();
        let from = dir.path().join("staged");
        let to = dir.path().join("taken");
        std::fs::write(&from, b"new").unwrap();
        std::fs::write(&to, b"theirs").unwrap();
        let err = rename_no_replace(&from, &to).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::AlreadyExists);
        assert_eq!(std::fs::read(&to).unwrap(), b"theirs");
        assert_eq!(std::fs::read(&from).unwrap(), b"new");
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(dir.path().join("nowhere"), &link).unwrap();
        let err = rename_no_replace(&from, &link).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::AlreadyExists);
        assert!(std::fs::symlink_metadata(&link)
            .unwrap()
            .file_type()
            .is_symlink());
        let free = dir.path().join("free");
        rename_no_replace(&from, &free).unwrap();
        assert_eq!(std::fs::read(&free).unwrap(), b"new");
        assert!(!from.exists());
    }
}
