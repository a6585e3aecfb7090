//! Where an export goes: files in one folder, written a piece at a time, each counted and
//! hashed as it is written.
//!
//! The processor gives every RETURN_OF_DATA and TRANSFER task an [`ExportSink`] over a folder
//! of its own and empties that folder before each run, so a re-run replaces the files instead
//! of adding to them. A connector opens one file at a time ([`ExportSink::file`]), feeds it
//! ([`ExportWriter::write`], or row by row through [`JsonArrayWriter`] and [`CsvWriter`]),
//! and closes it ([`ExportWriter::finish`]), which answers the file's [`ExportedFile`]: the
//! metadata a package manifest needs. What a connector holds in memory is what it has
//! read and not yet written: the SQL connector one row, the Mailchimp connector one page of
//! a member's list, the adapter connector one page of its adapter's export (or the one
//! message of at most 16 MiB an adapter that answers inline sends).
//!
//! A sink may be watched ([`ExportSink::watched`]): every file it opens is then announced as
//! a [`GrowingFile`], which is handed each [`Block`] of the file as it goes to the file
//! system and whose [`Growth`] tells how far the file is written and, once it is finished,
//! its size and digest, so that the processor sends the file while the connector still
//! writes it.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use bytes::Bytes;
use dsrelay_runtime::direct_io::{open_direct, AlignedBuf, ALIGN};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::ConnectorError;

/// The media type of JSON files.
pub const JSON: &str = "application/json";

/// The media type of CSV files (RFC 4180, with a header row).
pub const CSV: &str = "text/csv";

/// Longest file name accepted (bytes), within what every common file system allows.
const MAX_NAME: usize = 200;

/// Bytes gathered before they go to the file: every write is a hop to the blocking pool, so
/// rows (a few hundred bytes to a few KiB) are written in blocks of this size, not one by
/// one. A watcher's uploads send a block as one chunk, so it is the protocol's largest.
pub const WRITE_BUFFER: usize = 1024 * 1024;

/// How long a block waits for room in its watcher's channel before the writer stops handing
/// blocks to that watcher, which then reads the rest from the file. Waiting, rather than
/// letting a lagging watcher read blocks back, keeps the export at the upload's pace without
/// a second pass over the bytes (and the file is written past the page cache, so reading it
/// back is a disk read); the limit keeps a stalled upload from stalling the export.
pub const WATCHER_PATIENCE: std::time::Duration = std::time::Duration::from_secs(1);

// A full block is written directly, so its length must be a multiple of ALIGN.
const _: () = assert!(WRITE_BUFFER.is_multiple_of(ALIGN));

/// Blocks a watcher may hold (see [`GrowingFile`]): in the channel, and as many again taken
/// out of it and not yet sent. A writer that finds the channel full waits for room.
pub const BLOCKS_AHEAD: usize = 4;

/// Bytes written between two early writebacks: a sync started in the background while
/// writing goes on, so that the disk works alongside the connector and the sync that
/// [`ExportWriter::finish`] waits for has only the last few MiB left to write.
const WRITEBACK_EVERY: u64 = 32 * 1024 * 1024;

/// One file a connector wrote: what a package manifest says of it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExportedFile {
    /// The file's name inside the task's folder (no directories).
    pub name: String,
    /// Its media type ([`JSON`], [`CSV`]).
    pub media_type: String,
    /// The data categories its content belongs to.
    pub categories: Vec<String>,
    /// Its size in bytes.
    pub size: u64,
    /// The SHA-256 of its content, lowercase hex.
    pub sha256: String,
}

/// The folder one task's export is written to. See the module documentation.
#[derive(Debug, Clone)]
pub struct ExportSink {
    dir: PathBuf,
    /// The data categories every file is labelled with: the processor knows which categories
    /// the subprocessor holds and the request concerns; the connectors do not.
    categories: Vec<String>,
    /// Where the files it opens are announced, when it is watched.
    watcher: Option<mpsc::UnboundedSender<GrowingFile>>,
}

/// A file of a watched sink, announced when it is opened.
#[derive(Debug)]
pub struct GrowingFile {
    /// Where it is written.
    pub path: PathBuf,
    /// Its name, media type and categories (size and digest not known yet).
    pub meta: ExportedFile,
    /// How far it is written. The sender's end is dropped without [`Growth::end`] when the
    /// file is abandoned (the export failed).
    pub growth: watch::Receiver<Growth>,
    /// Its blocks as they go to the file, so the watcher need not read them back. The
    /// writer waits for room here (the watcher's pace sets the export's), but only
    /// [`WATCHER_PATIENCE`] for a block: past that it sends the watcher no more blocks and the
    /// watcher reads the rest from the file, where `growth` says it is.
    pub blocks: mpsc::Receiver<Block>,
}

/// How far a file of a watched sink is written.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Growth {
    /// Bytes written to the file so far, there for a reader to read.
    pub written: u64,
    /// The finished file, flushed and synced: its size and SHA-256.
    pub end: Option<ExportedFile>,
}

impl ExportSink {
    /// A sink writing into `dir` files of `categories`; nothing is touched until
    /// [`ExportSink::reset`] or [`ExportSink::file`].
    pub fn new(dir: impl Into<PathBuf>, categories: Vec<String>) -> Self {
        Self {
            dir: dir.into(),
            categories,
            watcher: None,
        }
    }

    /// This sink, announcing to `watcher` every file it opens from now on (see the module
    /// documentation). The channel closes when the sink and its copies are dropped.
    pub fn watched(mut self, watcher: mpsc::UnboundedSender<GrowingFile>) -> Self {
        self.watcher = Some(watcher);
        self
    }

    /// The folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The data categories its files are labelled with.
    pub fn categories(&self) -> &[String] {
        &self.categories
    }

    /// This sink, its files labelled with those of `categories` it labels with: for a
    /// connector that knows which categories each file holds (a SQL table's `categories`),
    /// so that a file names only what it holds, never a category the processor did not give.
    /// The folder and the watcher are the same.
    pub fn narrowed_to(&self, categories: &[String]) -> Self {
        Self {
            dir: self.dir.clone(),
            categories: (self.categories.iter())
                .filter(|c| categories.contains(c))
                .cloned()
                .collect(),
            watcher: self.watcher.clone(),
        }
    }

    /// Removes whatever an earlier run left in the folder and creates it empty, so that a
    /// re-run of a task replaces its files rather than adding to them.
    pub async fn reset(&self) -> std::io::Result<()> {
        match tokio::fs::remove_dir_all(&self.dir).await {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        tokio::fs::create_dir_all(&self.dir).await
    }

    /// Opens a new file `name` of `media_type`. The name must
    /// be a plain file name (no separators, not hidden) not used before in this run: a
    /// connector that writes the same name twice has a bug, which is reported, not hidden
    /// by overwriting.
    pub async fn file(&self, name: &str, media_type: &str) -> Result<ExportWriter, ConnectorError> {
        check_name(name)?;
        tokio::fs::create_dir_all(&self.dir)
            .await
            .map_err(|e| io_error(&format!("creating the export folder for {name}"), &e))?;
        let path = self.dir.join(name);
        let (file, direct) = tokio::task::spawn_blocking(move || open_export_file(&path))
            .await
            .map_err(|e| {
                io_error(
                    &format!("creating export file {name}"),
                    &std::io::Error::other(e),
                )
            })?
            .map_err(|e| io_error(&format!("creating export file {name}"), &e))?;
        let meta = ExportedFile {
            name: name.to_string(),
            media_type: media_type.to_string(),
            categories: self.categories.clone(),
            size: 0,
            sha256: String::new(),
        };
        let watched = self.watcher.as_ref().and_then(|w| {
            let (growth_tx, growth) = watch::channel(Growth::default());
            let (blocks_tx, blocks) = mpsc::channel(BLOCKS_AHEAD);
            // A watcher that stopped listening only loses the early start of its sending.
            w.send(GrowingFile {
                path: self.dir.join(name),
                meta: meta.clone(),
                growth,
                blocks,
            })
            .ok()
            .map(|()| (growth_tx, blocks_tx))
        });
        let (growth, blocks) = watched.unzip();
        Ok(ExportWriter {
            file: Arc::new(file),
            direct: direct.map(Arc::new),
            block: AlignedBlock::new(),
            spares: Arc::default(),
            handed: 0,
            writing: None,
            hash: Sha256::new(),
            writeback: None,
            writeback_at: 0,
            meta,
            dir: self.dir.clone(),
            growth,
            blocks,
        })
    }
}

/// Creates `path` for writing, and opens it a second time with `O_DIRECT` where the
/// filesystem allows that (`None` where it answers `EINVAL`, as tmpfs does).
fn open_export_file(path: &Path) -> std::io::Result<(std::fs::File, Option<std::fs::File>)> {
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)?;
    let direct = open_direct(path, std::fs::OpenOptions::new().write(true))?;
    Ok((file, direct))
}

/// One block's buffer ([`WRITE_BUFFER`] bytes at an aligned address, so that a full block can
/// be written directly) and how much of it is filled.
#[derive(Debug)]
struct AlignedBlock {
    buf: AlignedBuf,
    len: usize,
}

impl AlignedBlock {
    fn new() -> Self {
        Self {
            buf: AlignedBuf::new(WRITE_BUFFER),
            len: 0,
        }
    }

    fn len(&self) -> usize {
        self.len
    }

    /// Appends as much of `bytes` as there is room for; answers how much that was.
    fn fill(&mut self, bytes: &[u8]) -> usize {
        let take = (WRITE_BUFFER - self.len).min(bytes.len());
        self.buf.bytes_mut()[self.len..self.len + take].copy_from_slice(&bytes[..take]);
        self.len += take;
        take
    }
}

impl AsRef<[u8]> for AlignedBlock {
    fn as_ref(&self) -> &[u8] {
        &self.buf.bytes()[..self.len]
    }
}

/// Emptied block buffers of one file, for its next blocks.
type Spares = Arc<Mutex<Vec<AlignedBlock>>>;

/// Spares kept at most: the writer fills one block while another is written.
const MAX_SPARES: usize = 2;

/// A block handed out as [`Bytes`]: when the last holder (the write, the watcher) drops it,
/// its buffer goes back to the file's spares, so a file's blocks reuse a few buffers instead
/// of mapping and zeroing fresh memory for every MiB.
struct Lent {
    block: Option<AlignedBlock>,
    spares: Weak<Mutex<Vec<AlignedBlock>>>,
}

impl AsRef<[u8]> for Lent {
    fn as_ref(&self) -> &[u8] {
        self.block.as_ref().map_or(&[], AlignedBlock::as_ref)
    }
}

impl Drop for Lent {
    fn drop(&mut self) {
        let (Some(mut block), Some(spares)) = (self.block.take(), self.spares.upgrade()) else {
            return;
        };
        block.len = 0;
        let mut spares = spares.lock().unwrap_or_else(|p| p.into_inner());
        if spares.len() < MAX_SPARES {
            spares.push(block);
        }
    }
}

/// Writes `data` at `offset` of the file: directly when it is a whole aligned block and the
/// file has a direct handle, through the page cache otherwise. Answers whether the direct
/// handle is still worth trying: a filesystem may accept `O_DIRECT` at open and refuse the
/// write (`EINVAL`), and the block then goes through the page cache.
fn write_block(
    plain: &std::fs::File,
    direct: Option<&std::fs::File>,
    data: &[u8],
    offset: u64,
) -> std::io::Result<bool> {
    let aligned = data.len().is_multiple_of(ALIGN)
        && offset.is_multiple_of(ALIGN as u64)
        && (data.as_ptr() as usize).is_multiple_of(ALIGN);
    if let (Some(direct), true) = (direct, aligned) {
        match direct.write_all_at(data, offset) {
            Ok(()) => return Ok(true),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                plain.write_all_at(data, offset)?;
                return Ok(false);
            }
            Err(e) => return Err(e),
        }
    }
    plain.write_all_at(data, offset)?;
    Ok(direct.is_some())
}

/// A block of a file as it goes to the file system, shared with a watcher without a copy.
#[derive(Debug, Clone)]
pub struct Block {
    /// Where it starts in the file.
    pub offset: u64,
    /// Its bytes: [`WRITE_BUFFER`] of them, but for a file's last block.
    pub data: Bytes,
}

/// A file being written; see [`ExportSink::file`].
///
/// Bytes are gathered into blocks of [`WRITE_BUFFER`]; each full block is hashed and
/// written on the blocking pool while the connector fills the next one, so the connector's
/// task does neither (one block in flight at a time keeps the file's bytes in order).
///
/// Whole blocks are written with `O_DIRECT` where the filesystem allows it, past the page
/// cache, as the registry writes package files (`packages/direct.rs` there says why: on the
/// virtual machines measured, copying into page cache pages costs several times a memory
/// copy); the last, partial block goes through the page cache. A block's buffer comes back
/// for the next blocks once the write and the watcher are done with it (`Lent`).
#[derive(Debug)]
pub struct ExportWriter {
    /// The file through the page cache: the last block, and the syncs.
    file: Arc<std::fs::File>,
    /// The same file opened with `O_DIRECT`, while the filesystem takes direct writes.
    direct: Option<Arc<std::fs::File>>,
    /// The block being filled.
    block: AlignedBlock,
    /// Buffers of blocks written and sent, for the next blocks.
    spares: Spares,
    /// Bytes handed to the blocking pool so far (the blocks before `block`).
    handed: u64,
    /// The block being hashed and written, which hands back the hash and whether direct
    /// writes still work.
    writing: Option<JoinHandle<std::io::Result<Written>>>,
    /// The hash of every block written. While a block is in flight the hash travels with
    /// it, and this is an empty stand-in until [`ExportWriter::written`] puts it back.
    hash: Sha256,
    /// The early writeback running, if any.
    writeback: Option<JoinHandle<std::io::Result<()>>>,
    /// The size when the last early writeback started.
    writeback_at: u64,
    meta: ExportedFile,
    /// The folder it is in.
    dir: PathBuf,
    /// Told how far the file is written, when the sink is watched.
    growth: Option<watch::Sender<Growth>>,
    /// Given each block as it goes to the file, when the sink is watched.
    blocks: Option<mpsc::Sender<Block>>,
}

/// What the blocking pool hands back for a block it hashed and wrote.
#[derive(Debug)]
struct Written {
    hash: Sha256,
    direct_works: bool,
}

impl ExportWriter {
    /// Appends `bytes`, counting them; they are hashed and written block by block.
    pub async fn write(&mut self, mut bytes: &[u8]) -> Result<(), ConnectorError> {
        self.meta.size += bytes.len() as u64;
        while !bytes.is_empty() {
            let took = self.block.fill(bytes);
            bytes = &bytes[took..];
            if self.block.len() == WRITE_BUFFER {
                self.hand_over().await?;
            }
        }
        Ok(())
    }

    /// Sends the block being filled to be hashed and written, once the one before it is
    /// written; offers it to the watcher, if any.
    async fn hand_over(&mut self) -> Result<(), ConnectorError> {
        let spare = self.spares.lock().unwrap_or_else(|p| p.into_inner()).pop();
        let block = std::mem::replace(&mut self.block, spare.unwrap_or_else(AlignedBlock::new));
        let data = Bytes::from_owner(Lent {
            block: Some(block),
            spares: Arc::downgrade(&self.spares),
        });
        if data.is_empty() {
            return Ok(());
        }
        if let Some(blocks) = &self.blocks {
            let block = Block {
                offset: self.handed,
                data: data.clone(),
            };
            if tokio::time::timeout(WATCHER_PATIENCE, blocks.send(block))
                .await
                .map_or(true, |sent| sent.is_err())
            {
                // A watcher that stalls, or has gone, reads what follows from the file.
                self.blocks = None;
            }
        }
        self.written().await?;
        let mut hash = std::mem::take(&mut self.hash);
        let file = Arc::clone(&self.file);
        let direct = self.direct.clone();
        let offset = self.handed;
        self.handed += data.len() as u64;
        self.writing = Some(tokio::task::spawn_blocking(move || {
            hash.update(&data);
            let direct_works = write_block(&file, direct.as_deref(), &data, offset)?;
            Ok(Written { hash, direct_works })
        }));
        if self.handed - self.writeback_at >= WRITEBACK_EVERY
            && self.writeback.as_ref().is_none_or(JoinHandle::is_finished)
        {
            self.wait_for_writeback().await?;
            let file = Arc::clone(&self.file);
            self.writeback = Some(tokio::task::spawn_blocking(move || file.sync_data()));
            self.writeback_at = self.handed;
        }
        Ok(())
    }

    /// Waits for the block in flight, if any, to be written, takes its hash back (the hash
    /// of everything written), and tells the watcher.
    async fn written(&mut self) -> Result<(), ConnectorError> {
        let Some(writing) = self.writing.take() else {
            return Ok(());
        };
        let context = format!("writing export file {}", self.meta.name);
        let written = writing
            .await
            .map_err(|e| io_error(&context, &std::io::Error::other(e)))?
            .map_err(|e| io_error(&context, &e))?;
        self.hash = written.hash;
        if !written.direct_works {
            self.direct = None;
        }
        if let Some(growth) = &self.growth {
            growth.send_modify(|g| g.written = self.handed);
        }
        Ok(())
    }

    /// Waits for the early writeback running, if any, and reports its failure.
    async fn wait_for_writeback(&mut self) -> Result<(), ConnectorError> {
        let Some(running) = self.writeback.take() else {
            return Ok(());
        };
        let context = format!("syncing export file {}", self.meta.name);
        running
            .await
            .map_err(|e| io_error(&context, &std::io::Error::other(e)))?
            .map_err(|e| io_error(&context, &e))
    }

    /// Bytes written so far.
    pub fn size(&self) -> u64 {
        self.meta.size
    }

    /// Writes the last block and syncs the file to disk (the processor records the file list
    /// only after this), and answers what it holds.
    pub async fn finish(mut self) -> Result<ExportedFile, ConnectorError> {
        self.hand_over().await?;
        self.written().await?;
        self.wait_for_writeback().await?;
        let context = format!("closing export file {}", self.meta.name);
        let file = Arc::clone(&self.file);
        let dir = self.dir.clone();
        // The file's name, and the names of the folders created for it, must survive a power
        // loss too, or the recorded list would point at a file that is gone: its folder and
        // the folders above it up to the processor's data folder
        // (`exports/<controller>/<request>/<subprocessor>`) are synced as well.
        tokio::task::spawn_blocking(move || {
            file.sync_all()?;
            dsrelay_runtime::direct_io::sync_folders(dir.ancestors().take(5))
        })
        .await
        .map_err(|e| io_error(&context, &std::io::Error::other(e)))?
        .map_err(|e| io_error(&context, &e))?;
        self.meta.sha256 = hex::encode(self.hash.finalize());
        if let Some(growth) = &self.growth {
            growth.send_replace(Growth {
                written: self.meta.size,
                end: Some(self.meta.clone()),
            });
        }
        Ok(self.meta)
    }
}

/// Writes a JSON array one element at a time: `[`, the elements separated by commas, `]`.
#[derive(Debug)]
pub struct JsonArrayWriter {
    out: ExportWriter,
    count: u64,
    /// The current element, encoded; reused so that a row costs no allocation.
    element: Vec<u8>,
}

impl JsonArrayWriter {
    /// Opens the array in `out`.
    pub async fn new(mut out: ExportWriter) -> Result<Self, ConnectorError> {
        out.write(b"[").await?;
        Ok(Self {
            out,
            count: 0,
            element: Vec::new(),
        })
    }

    /// Appends one element.
    pub async fn push<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), ConnectorError> {
        self.element.clear();
        if self.count > 0 {
            self.element.push(b',');
        }
        serde_json::to_writer(&mut self.element, value).map_err(|e| {
            ConnectorError::Permanent(format!("encoding export file {}: {e}", self.out.meta.name))
        })?;
        self.out.write(&self.element).await?;
        self.count += 1;
        Ok(())
    }

    /// Appends one element already encoded as JSON; the caller has checked that `json` is
    /// one JSON value.
    pub async fn push_json(&mut self, json: &[u8]) -> Result<(), ConnectorError> {
        if self.count > 0 {
            self.out.write(b",").await?;
        }
        self.out.write(json).await?;
        self.count += 1;
        Ok(())
    }

    /// Bytes written so far.
    pub fn size(&self) -> u64 {
        self.out.size()
    }

    /// Elements written so far.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// Closes the array and the file.
    pub async fn finish(mut self) -> Result<ExportedFile, ConnectorError> {
        self.out.write(b"]").await?;
        self.out.finish().await
    }
}

/// Writes CSV (RFC 4180: quoted where needed, CRLF line ends) one record at a time: the
/// `csv` crate encodes each record into a buffer that is then appended to the file. Fields
/// go as given: a text a spreadsheet could read as a formula goes through [`csv_text`]
/// first (the writer cannot tell a number's `-` from a text's).
#[derive(Debug)]
pub struct CsvWriter {
    out: ExportWriter,
    /// One encoder for the whole file: making one per record allocated and zeroed its 8 KiB
    /// buffer for every row.
    encoder: csv::Writer<RecordBytes>,
}

/// The bytes of the record being encoded. The encoder lends only `&` to what it writes
/// into, so the bytes are taken out through the cell.
#[derive(Debug, Default)]
struct RecordBytes(std::cell::RefCell<Vec<u8>>);

impl std::io::Write for RecordBytes {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.get_mut().extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl CsvWriter {
    /// Starts the file with its `header` row.
    pub async fn new<I, F>(out: ExportWriter, header: I) -> Result<Self, ConnectorError>
    where
        I: IntoIterator<Item = F>,
        F: AsRef<[u8]>,
    {
        // Flexible: a record's fields are not counted against the header's; the quick path
        // in `push` does not count them either.
        let encoder = csv::WriterBuilder::new()
            .terminator(csv::Terminator::CRLF)
            .flexible(true)
            .from_writer(RecordBytes::default());
        let mut w = Self { out, encoder };
        w.push(header).await?;
        Ok(w)
    }

    /// Appends one record.
    pub async fn push<I, F>(&mut self, record: I) -> Result<(), ConnectorError>
    where
        I: IntoIterator<Item = F>,
        F: AsRef<[u8]>,
    {
        let fields: Vec<F> = record.into_iter().collect();
        let mut bytes = self.encoder.get_ref().0.take();
        // A record of fields that need no quotes is written as it is, the encoder's output
        // byte for byte; its scanning was a tenth of an export's CPU. A lone empty field is
        // quoted (`""`), so that the record is not an empty line.
        let lone_empty = fields.len() <= 1 && fields.iter().all(|f| f.as_ref().is_empty());
        if !lone_empty && fields.iter().all(|f| csv_plain(f.as_ref())) {
            for (i, field) in fields.iter().enumerate() {
                if i > 0 {
                    bytes.push(b',');
                }
                bytes.extend_from_slice(field.as_ref());
            }
            bytes.extend_from_slice(b"\r\n");
        } else {
            self.encoder.get_ref().0.replace(bytes);
            let name = &self.out.meta.name;
            let encode = |e: &dyn std::fmt::Display| {
                ConnectorError::Permanent(format!("encoding export file {name}: {e}"))
            };
            self.encoder.write_record(&fields).map_err(|e| encode(&e))?;
            // Flushing hands the encoder's buffer, exactly this record, to `RecordBytes`.
            self.encoder.flush().map_err(|e| encode(&e))?;
            bytes = self.encoder.get_ref().0.take();
        }
        let written = self.out.write(&bytes).await;
        bytes.clear();
        self.encoder.get_ref().0.replace(bytes);
        written
    }

    /// Closes the file.
    pub async fn finish(self) -> Result<ExportedFile, ConnectorError> {
        self.out.finish().await
    }
}

/// The first characters that make a spreadsheet read a cell as a formula (OWASP's CSV
/// injection guidance): `=`, `+`, `-`, `@`, a tab and a carriage return.
const FORMULA_STARTS: [u8; 6] = [b'=', b'+', b'-', b'@', b'\t', b'\r'];

/// `text` as a CSV field, with a `'` before it when it begins with one of
/// `FORMULA_STARTS`: a package's CSV files are meant to be opened in a spreadsheet, which
/// would otherwise run `=HYPERLINK(...)` typed into a name field by whoever filled it in. The
/// spreadsheet shows the text without the quote; a program reading the file sees it. A
/// signed plain number (`-12.50`, `+358401234567`) is left as it is: a spreadsheet reads it
/// as the number it is and nothing more, and a negative amount stays a number. Only CSV:
/// the JSON files carry the text as stored.
pub fn csv_text(text: &str) -> std::borrow::Cow<'_, [u8]> {
    let bytes = text.as_bytes();
    let formula = bytes
        .first()
        .is_some_and(|first| FORMULA_STARTS.contains(first));
    if !formula || signed_number(bytes) {
        return std::borrow::Cow::Borrowed(bytes);
    }
    let mut field = Vec::with_capacity(bytes.len() + 1);
    field.push(b'\'');
    field.extend_from_slice(bytes);
    std::borrow::Cow::Owned(field)
}

/// Whether `bytes` is `+` or `-`, digits, and at most one `.` with digits after it.
fn signed_number(bytes: &[u8]) -> bool {
    let Some((b'+' | b'-', rest)) = bytes.split_first() else {
        return false;
    };
    let (whole, fraction) = match rest.iter().position(|&b| b == b'.') {
        Some(dot) => (&rest[..dot], Some(&rest[dot + 1..])),
        None => (rest, None),
    };
    let digits = |d: &[u8]| !d.is_empty() && d.iter().all(u8::is_ascii_digit);
    digits(whole) && fraction.is_none_or(digits)
}

/// Whether any byte of `bytes` is `special`. Checked 32 bytes at a time with no early exit
/// inside them, so that the compiler turns each check into a few vector instructions (about
/// 15 times faster here than a check that may stop at every byte).
#[inline(always)]
fn any_byte(bytes: &[u8], special: impl Fn(u8) -> bool + Copy) -> bool {
    let mut chunks = bytes.chunks_exact(32);
    for chunk in &mut chunks {
        let mut hit = 0u8;
        for &b in chunk {
            hit |= u8::from(special(b));
        }
        if hit != 0 {
            return true;
        }
    }
    chunks.remainder().iter().any(|&b| special(b))
}

/// Whether `field` goes into CSV without quotes: no comma, quote, CR or LF (the bytes the
/// `csv` crate quotes for, as configured here).
fn csv_plain(field: &[u8]) -> bool {
    !any_byte(field, |b| {
        (b == b',') | (b == b'"') | (b == b'\r') | (b == b'\n')
    })
}

/// Appends `text` as a JSON string, byte for byte as serde_json writes it.
pub fn push_json_str(out: &mut Vec<u8>, text: &str) {
    // serde_json escapes quotes, backslashes and control characters and nothing else; a text
    // without them (almost every one) is copied between quotes, where serde_json looks up
    // every byte (a tenth of an export's CPU).
    let plain = !any_byte(text.as_bytes(), |b| (b < 0x20) | (b == b'"') | (b == b'\\'));
    if plain {
        out.reserve(text.len() + 2);
        out.push(b'"');
        out.extend_from_slice(text.as_bytes());
        out.push(b'"');
    } else {
        // Writing into a Vec cannot fail, and a str always encodes.
        let _ = serde_json::to_writer(&mut *out, text);
    }
}

/// A plain file name: no separators, not `.`-led, printable, at most [`MAX_NAME`] bytes.
fn check_name(name: &str) -> Result<(), ConnectorError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME
        && !name.starts_with('.')
        && !name
            .chars()
            .any(|c| c == '/' || c == '\\' || c.is_control());
    if ok {
        Ok(())
    } else {
        Err(ConnectorError::Permanent(format!(
            "export file name {name:?} is not a plain file name"
        )))
    }
}

/// File system errors are not expected to pass by themselves (a full disk, a missing
/// permission): an operator must look.
fn io_error(context: &str, e: &std::io::Error) -> ConnectorError {
    ConnectorError::Permanent(format!("{context}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sha256_hex(bytes: &[u8]) -> String {
        hex::encode(Sha256::digest(bytes))
    }

    #[tokio::test]
    async fn files_are_counted_hashed_and_replaced_on_reset() {
        let dir = tempfile::tempdir().unwrap();
        let sink = ExportSink::new(dir.path().join("task"), vec!["contact".to_string()]);
        sink.reset().await.unwrap();
        let cats = vec!["contact".to_string()];

        let mut json = JsonArrayWriter::new(sink.file("t.json", JSON).await.unwrap())
            .await
            .unwrap();
        json.push(&serde_json::json!({"a": 1})).await.unwrap();
        json.push(&serde_json::json!({"a": "x,\"y\""}))
            .await
            .unwrap();
        let meta = json.finish().await.unwrap();
        let written = std::fs::read(sink.dir().join("t.json")).unwrap();
        assert_eq!(written, br#"[{"a":1},{"a":"x,\"y\""}]"#);
        assert_eq!(meta.size, written.len() as u64);
        assert_eq!(meta.sha256, sha256_hex(&written));
        assert_eq!(
            (meta.media_type.as_str(), meta.categories),
            (JSON, cats.clone())
        );

        let mut csv = CsvWriter::new(sink.file("t.csv", CSV).await.unwrap(), ["a", "b"])
            .await
            .unwrap();
        csv.push(["1", "x,\"y\"\nz"]).await.unwrap();
        let meta = csv.finish().await.unwrap();
        let written = std::fs::read(sink.dir().join("t.csv")).unwrap();
        assert_eq!(written, b"a,b\r\n1,\"x,\"\"y\"\"\nz\"\r\n");
        assert_eq!(meta.sha256, sha256_hex(&written));

        // The same name twice in one run is a connector bug, not a silent overwrite.
        let err = sink.file("t.csv", CSV).await.unwrap_err();
        assert!(err.to_string().contains("t.csv"), "{err}");
        // A re-run starts from an empty folder.
        sink.reset().await.unwrap();
        assert_eq!(std::fs::read_dir(sink.dir()).unwrap().count(), 0);
        sink.file("t.csv", CSV).await.unwrap();
    }

    /// Texts and records with every byte the encoders treat specially, at the start, the
    /// end, across the 32-byte chunks the quick checks read and in what is left after them.
    fn awkward_texts() -> Vec<String> {
        let mut texts: Vec<String> = ["", "plain", "Ääkköset ja €", "\u{2028}", "\u{7f}", "a/b"]
            .map(String::from)
            .into();
        for special in (0u8..0x20).chain([b'"', b'\\', b',']) {
            let c = char::from(special);
            for at in [0, 1, 31, 32, 33, 63, 64, 65, 191, 192, 200] {
                let mut text = "x".repeat(201);
                text.replace_range(at..=at, &c.to_string());
                texts.push(text);
            }
            texts.push(c.to_string());
        }
        texts
    }

    /// A text a spreadsheet would run as a formula gets a `'` in front in CSV (OWASP's CSV
    /// injection guidance); other text, and a signed plain number, goes as it is.
    #[test]
    fn csv_text_defuses_formulas() {
        for (text, field) in [
            (
                "=HYPERLINK(\"http://x.example\",\"x\")",
                "'=HYPERLINK(\"http://x.example\",\"x\")",
            ),
            ("+cmd|' /C calc'!A0", "'+cmd|' /C calc'!A0"),
            ("-2+3", "'-2+3"),
            ("@SUM(A1:A2)", "'@SUM(A1:A2)"),
            ("\t=1", "'\t=1"),
            ("\r=1", "'\r=1"),
            ("-", "'-"),
            ("+1.", "'+1."),
            ("-1e5", "'-1e5"),
            ("-12.50", "-12.50"),
            ("+358401234567", "+358401234567"),
            ("Maija = M", "Maija = M"),
            ("'quoted", "'quoted"),
            ("", ""),
        ] {
            assert_eq!(&*csv_text(text), field.as_bytes(), "{text:?}");
        }
    }

    /// The quick paths write exactly what serde_json and the `csv` crate write: a file's
    /// digest must not depend on which path a value took.
    #[tokio::test]
    async fn quick_paths_write_what_serde_json_and_csv_write() {
        for text in awkward_texts() {
            let mut quick = Vec::new();
            push_json_str(&mut quick, &text);
            assert_eq!(quick, serde_json::to_vec(&text).unwrap(), "{text:?}");
        }

        let dir = tempfile::tempdir().unwrap();
        let sink = ExportSink::new(dir.path().join("task"), Vec::new());
        sink.reset().await.unwrap();
        let texts = awkward_texts();
        let mut records: Vec<Vec<&str>> = vec![vec![""], vec!["", ""], vec!["a", ""]];
        for (i, text) in texts.iter().enumerate() {
            records.push(vec![text.as_str()]);
            records.push(vec![
                text.as_str(),
                texts[(i + 7) % texts.len()].as_str(),
                "1",
            ]);
        }
        let mut expected = csv::WriterBuilder::new()
            .terminator(csv::Terminator::CRLF)
            .flexible(true)
            .from_writer(Vec::new());
        let mut ours = CsvWriter::new(sink.file("t.csv", CSV).await.unwrap(), ["h"])
            .await
            .unwrap();
        expected.write_record(["h"]).unwrap();
        for record in &records {
            expected.write_record(record).unwrap();
            ours.push(record).await.unwrap();
        }
        ours.finish().await.unwrap();
        let expected = expected.into_inner().unwrap();
        let written = std::fs::read(sink.dir().join("t.csv")).unwrap();
        assert_eq!(
            String::from_utf8_lossy(&written),
            String::from_utf8_lossy(&expected)
        );
    }

    /// Whole blocks go past the page cache from aligned buffers that are reused, the last
    /// partial block through it, and the file holds every byte in order either way.
    #[tokio::test]
    async fn blocks_are_written_whole_and_their_buffers_reused() {
        let dir = tempfile::tempdir().unwrap();
        let sink = ExportSink::new(dir.path().join("task"), vec![]);
        sink.reset().await.unwrap();
        let mut w = sink.file("big.json", JSON).await.unwrap();
        let direct_at_open = w.direct.is_some();
        let content: Vec<u8> = (0..WRITE_BUFFER * 6 + 777)
            .map(|i| (i * 7 % 251) as u8)
            .collect();
        let mut buffers = std::collections::BTreeSet::new();
        for piece in content.chunks(WRITE_BUFFER / 2 + 3) {
            w.write(piece).await.unwrap();
            let at = w.block.as_ref().as_ptr();
            assert_eq!(at.align_offset(ALIGN), 0, "unaligned block");
            buffers.insert(at as usize);
        }
        // The block being filled, the one being written, and one spare.
        assert!(buffers.len() <= 3, "{} buffers for 7 blocks", buffers.len());
        assert_eq!(
            w.direct.is_some(),
            direct_at_open,
            "a filesystem that opened the file with O_DIRECT refused a direct write"
        );
        let meta = w.finish().await.unwrap();
        let written = std::fs::read(sink.dir().join("big.json")).unwrap();
        assert!(written == content, "the file differs from what was written");
        assert_eq!(meta.size, content.len() as u64);
        assert_eq!(meta.sha256, sha256_hex(&content));
    }

    /// A watcher slower than the writer still gets every block: the writer waits for room
    /// in the channel instead of leaving blocks to be read back from the file.
    #[tokio::test]
    async fn a_slow_watcher_gets_every_block() {
        let dir = tempfile::tempdir().unwrap();
        let (tx, mut announced) = mpsc::unbounded_channel();
        let sink = ExportSink::new(dir.path().join("task"), vec![]).watched(tx);
        sink.reset().await.unwrap();
        let mut w = sink
            .file("slow.bin", "application/octet-stream")
            .await
            .unwrap();
        let mut file = announced.try_recv().expect("announced when opened");
        let blocks = 3 * BLOCKS_AHEAD;
        let watcher = tokio::spawn(async move {
            let mut offsets = Vec::new();
            while let Some(b) = file.blocks.recv().await {
                offsets.push(b.offset);
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
            offsets
        });
        for i in 0..blocks {
            w.write(&vec![i as u8; WRITE_BUFFER]).await.unwrap();
        }
        w.finish().await.unwrap();
        let offsets = watcher.await.unwrap();
        let expected: Vec<u64> = (0..blocks).map(|i| (i * WRITE_BUFFER) as u64).collect();
        assert_eq!(
            offsets, expected,
            "blocks left to be read back from the file"
        );
    }

    /// A watched sink announces each file at its opening and hands over each block as it
    /// goes to the file (none while the first is still filling; a watcher that leaves
    /// BLOCKS_AHEAD waiting for WATCHER_PATIENCE gets no more and reads the rest from the
    /// file); its growth says
    /// how far the file is written and ends with the finished file's size and digest. A
    /// file abandoned unfinished closes its growth without an end.
    /// A narrowed sink labels its files with the categories both it and its origin name,
    /// in the origin's order, in the same folder; the origin keeps its own labels.
    #[tokio::test]
    async fn a_narrowed_sink_labels_only_what_both_name() {
        let dir = tempfile::tempdir().unwrap();
        let all = vec!["billing".to_string(), "contact".into(), "marketing".into()];
        let sink = ExportSink::new(dir.path().join("task"), all.clone());
        sink.reset().await.unwrap();
        let asked = ["marketing".to_string(), "health".into(), "billing".into()];
        let narrowed = sink.narrowed_to(&asked);
        assert_eq!(narrowed.categories(), ["billing", "marketing"]);
        assert_eq!(narrowed.dir(), sink.dir());
        let file = narrowed.file("t.json", JSON).await.unwrap().finish().await;
        assert_eq!(file.unwrap().categories, ["billing", "marketing"]);
        assert_eq!(sink.categories(), all);
        assert!(sink.narrowed_to(&["health".into()]).categories().is_empty());
    }

    #[tokio::test]
    async fn a_watched_sink_hands_over_its_blocks_and_reports_the_end() {
        let dir = tempfile::tempdir().unwrap();
        let (tx, mut announced) = mpsc::unbounded_channel();
        let sink = ExportSink::new(dir.path().join("task"), vec!["contact".into()]).watched(tx);
        sink.reset().await.unwrap();

        let mut w = sink
            .file("big.bin", "application/octet-stream")
            .await
            .unwrap();
        let mut file = announced.try_recv().expect("announced when opened");
        assert_eq!(file.path, sink.dir().join("big.bin"));
        assert_eq!(file.meta.name, "big.bin");
        assert_eq!(file.meta.categories, ["contact".to_string()]);
        let content: Vec<u8> = (0..WRITE_BUFFER * 10 + 1234)
            .map(|i| (i % 251) as u8)
            .collect();
        let third = 300 * 1024;
        w.write(&content[..3 * third]).await.unwrap();
        assert!(
            file.blocks.try_recv().is_err(),
            "the first block is still filling"
        );
        assert_eq!(file.growth.borrow().written, 0);
        w.write(&content[3 * third..]).await.unwrap();
        let meta = w.finish().await.unwrap();
        let mut blocks = Vec::new();
        while let Ok(b) = file.blocks.try_recv() {
            blocks.push(b);
        }
        assert_eq!(blocks.len(), BLOCKS_AHEAD, "no room for more");
        for (i, b) in blocks.iter().enumerate() {
            let at = i * WRITE_BUFFER;
            assert_eq!(b.offset, at as u64);
            assert_eq!(&b.data[..], &content[at..at + WRITE_BUFFER]);
        }
        let g = file.growth.borrow_and_update().clone();
        assert_eq!(g.written, content.len() as u64);
        assert_eq!(g.end, Some(meta.clone()));
        assert_eq!(meta.sha256, sha256_hex(&content));
        assert_eq!(std::fs::read(&file.path).unwrap(), content);

        let mut w = sink
            .file("cut.bin", "application/octet-stream")
            .await
            .unwrap();
        let mut cut = announced.try_recv().expect("announced");
        w.write(b"partial").await.unwrap();
        drop(w);
        assert!(cut.growth.changed().await.is_err(), "closed");
        assert_eq!(cut.growth.borrow().end, None);
        drop(sink);
        assert!(announced.recv().await.is_none(), "no more files");
    }

    #[tokio::test]
    async fn names_must_be_plain() {
        let dir = tempfile::tempdir().unwrap();
        let sink = ExportSink::new(dir.path(), Vec::new());
        for bad in ["", "../x", "a/b", "a\\b", ".hidden", "a\nb"] {
            assert!(sink.file(bad, JSON).await.is_err(), "{bad:?}");
        }
    }
}
