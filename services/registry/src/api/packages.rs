//! Return-of-data packages over gRPC: processors upload each task's export files and declare
//! its part complete (`ExportUploadService`); the submitting partner, or an operator, reads
//! and downloads the package (`PackageService`). The rules of every chunk are in
//! `proto/dsrelay/v1/package.proto`.

use std::collections::HashSet;
use std::pin::Pin;
use std::sync::Mutex;
use std::time::Duration;

use chrono::{DateTime, SecondsFormat};
use dsrelay_proto::prost::Message;
use dsrelay_proto::timestamp_from_millis;
use dsrelay_proto::v1::export_upload_service_server::ExportUploadService;
use dsrelay_proto::v1::package_chunk::Item;
use dsrelay_proto::v1::package_service_server::PackageService;
use dsrelay_proto::v1::{
    CompletePartRequest, CompletePartResponse, ContractEndChoice, DownloadPackageRequest,
    ExportFileHeader, FileEnd, GetPackageRequest, GetUploadStateRequest, PackageChunk,
    PackageFileChunk, PackageInfo, RequestKind, TaskState, UploadFileChunk, UploadState,
};
use dsrelay_runtime::export_files::{
    file_name_violation, is_sha256, part_files_violations, MAX_CATEGORIES, MAX_LABEL,
};
use dsrelay_runtime::grpc::feed;
use dsrelay_runtime::identity::{request_id_violation, FieldViolation};
use dsrelay_runtime::resumable_hash::ResumableSha256;
use dsrelay_runtime::server::{next_message_within, MAX_MESSAGE_BYTES};
use dsrelay_runtime::slots::{KeyedSlot, KeyedSlots};
use tokio::io::AsyncReadExt;
use tokio::sync::broadcast;
use tonic::{Response, Status, Streaming};

use crate::app::Shared;
use crate::auth::Party;
use crate::error::ApiError;
use crate::packages::{file_key, manifest, package_key, Appender, MAX_CHUNK};
use crate::store::{
    FileBegin, FileDrop, PackageFile, PackageRecord, PartOutcome, RequestRow, UploadTarget,
};
use crate::validate::text_violation;

use super::watch::{Slot, Slots};
use super::Api;

/// How long an upload for a task the registry has not recorded yet waits for it to appear
/// ([`Api::check_target`]) before it is refused.
const UNKNOWN_TASK_PATIENCE: Duration = Duration::from_secs(2);

/// The most a package's description ([`PackageInfo`]) may take: the message limit less a
/// margin (see [`Api::ensure_describable`]).
const MAX_DESCRIPTION_BYTES: usize = MAX_MESSAGE_BYTES - 256 * 1024;

/// How many bytes a stream of a file written while it streams appends between two counts of
/// the rest of its part ([`Api::ensure_part_room`]).
const RECOUNT_EVERY: u64 = 64 << 20;

/// Files being uploaded to this registry right now, by store key: two streams appending to
/// one file would interleave their bytes, so the second is turned away until the first ends,
/// and so is GetUploadState, which may drop the file's bytes or store it. (Across replicas,
/// the processor's upload lease keeps one sender per export, and a stream checks the stored
/// length when it opens the file and before it records the file stored, and records nothing
/// once the file's registration changed: see [`FileUpload::generation`].)
///
/// Also counts the UploadFile streams each processor holds open, against
/// `packages.uploads_per_processor`: each open stream holds its file's buffer and two file
/// descriptors however slowly it sends, so streams left open without a bound would take the
/// registry's memory and descriptors.
#[derive(Debug, Default)]
pub(crate) struct Uploading {
    files: Mutex<HashSet<String>>,
    streams: KeyedSlots,
}

/// Holds a file's key in [`Uploading`] until dropped.
struct UploadGuard<'a> {
    set: &'a Uploading,
    key: String,
}

impl Uploading {
    /// Takes one of `processor`'s UploadFile stream slots, or RESOURCE_EXHAUSTED when it
    /// holds `limit` of them.
    fn take_stream(&self, processor: &str, limit: u32) -> Result<KeyedSlot, ApiError> {
        self.streams.take(processor, limit).map_err(|open| {
            ApiError::resource_exhausted(format!(
                "processor {processor} already has {open} UploadFile streams open, the most \
                 the registry allows one processor (packages.uploads_per_processor = {limit}); \
                 finish or end one of them (send its last chunk, or close it) before opening \
                 another, or have the registry's operator raise packages.uploads_per_processor"
            ))
        })
    }

    fn claim(&self, key: &str) -> Option<UploadGuard<'_>> {
        let mut set = self.files.lock().unwrap_or_else(|e| e.into_inner());
        set.insert(key.to_string()).then(|| UploadGuard {
            set: self,
            key: key.to_string(),
        })
    }
}

/// Takes one of `downloads` (open DownloadPackage streams by caller name) for `caller`, or
/// RESOURCE_EXHAUSTED when it holds `limit`.
fn take_download(downloads: &Slots, caller: &str, limit: u32) -> Result<Slot, ApiError> {
    downloads.take(
        caller,
        limit,
        "DownloadPackage",
        "packages.downloads_per_caller",
    )
}

impl Drop for UploadGuard<'_> {
    fn drop(&mut self) {
        let mut set = self.set.files.lock().unwrap_or_else(|e| e.into_inner());
        set.remove(&self.key);
    }
}

impl Api {
    /// The calling processor's name; anyone else is refused.
    fn uploader<T>(&self, req: &tonic::Request<T>) -> Result<String, ApiError> {
        Ok(self
            .shared
            .auth
            .require(req, &[Party::Processor], |c| {
                format!("{} is not a processor and may not upload exports", c.name)
            })?
            .name)
    }

    /// Refuses uploads to a request that does not exist, was not routed to `processor`, or
    /// has no package, and uploads for a `subprocessor` the processor has no task of on it
    /// (each subprocessor name opens a part, with files of its own).
    async fn check_target(
        &self,
        request_id: &str,
        processor: &str,
        subprocessor: &str,
    ) -> Result<(), ApiError> {
        match self
            .shared
            .store
            .upload_target(request_id, processor)
            .await?
        {
            // One answer for both, as Acknowledge gives: a processor cannot learn from it
            // whether a request it was not sent exists.
            UploadTarget::Unknown | UploadTarget::NotDelivered => Err(ApiError::permission_denied(
                format!("request {request_id} was not delivered to processor {processor}"),
            )),
            UploadTarget::Kind(k) => {
                if let Some(why) = no_package(&self.shared, request_id, k).await? {
                    return Err(ApiError::failed_precondition(why));
                }
                let store = &self.shared.store;
                // A processor streams an export's first file as soon as its connector opens
                // it, which can be before the registry has recorded the processor's answer
                // to the delivery: that race is given a moment rather than a refusal, which
                // would make the processor send the whole file again later. Subscribed
                // before the first look, so a task committed just after it still wakes us.
                let mut changes = self.shared.events.subscribe();
                let known =
                    await_change_until(&mut changes, request_id, UNKNOWN_TASK_PATIENCE, || {
                        store.task_exists(request_id, processor, subprocessor)
                    })
                    .await?;
                if known {
                    return Ok(());
                }
                // FAILED_PRECONDITION, which the processor tries again: its task may be one
                // the registry has not heard of yet (its answer to the delivery lost, its
                // acknowledgement not sent yet).
                Err(ApiError::failed_precondition(format!(
                    "processor {processor} has no task of subprocessor {subprocessor} on \
                     request {request_id} that the registry knows of (from the answer to its \
                     delivery or its acknowledgements): a part is taken only for a task; \
                     acknowledge the task, then upload"
                )))
            }
        }
    }

    /// The bytes stored so far of the files of `file`'s part, other than `file`, streamed
    /// while they are written: their records hold no size until their end.
    async fn streaming_bytes(&self, file: &PackageFile) -> Result<u64, ApiError> {
        let names = self.shared.store.streaming_besides(file).await?;
        let mut total = 0u64;
        for name in names {
            let mut other = file.clone();
            other.name = name;
            let stored = (self.shared.packages.store)
                .stored_len(&file_key(&other))
                .await
                .map_err(io_error)?;
            total = total.saturating_add(stored);
        }
        Ok(total)
    }

    /// Registers `file` within the part caps of `[packages]`
    /// ([`Store::begin_file`](crate::store::Store::begin_file)).
    async fn begin_file(&self, file: &PackageFile) -> Result<FileBegin, ApiError> {
        let streaming = self.streaming_bytes(file).await?;
        let limits = &self.shared.config.packages;
        let now = self.shared.clock.now_ms();
        Ok(self
            .shared
            .store
            .begin_file(file, now, limits, streaming)
            .await?)
    }

    /// The refusal of a file new to a part that has as many files as a part may.
    fn too_many_files(&self, file: &PackageFile) -> ApiError {
        ApiError::resource_exhausted(format!(
            "file {} refused: its part already has {} files, the most \
             packages.max_files_per_part allows",
            manifest::path(file),
            self.shared.config.packages.max_files_per_part
        ))
    }

    /// The refusal of a file with which its part would hold `bytes`, past the cap.
    fn part_too_large(&self, file: &PackageFile, bytes: u64) -> ApiError {
        ApiError::resource_exhausted(format!(
            "file {} refused: with it its part would hold {bytes} bytes (the sizes its files \
             announce, stored yet or not), more than packages.max_part_bytes ({}) allows",
            manifest::path(file),
            self.shared.config.packages.max_part_bytes
        ))
    }

    /// Refuses a part that would make its package's description too large to send:
    /// GetPackage answers the [`PackageInfo`], and DownloadPackage's first message carries
    /// it, each in one message of at most [`MAX_MESSAGE_BYTES`], and it lists every file
    /// twice (as a [`ManifestFile`](dsrelay_proto::v1::ManifestFile), and in
    /// `manifest.json`). Stored, such a part would complete a package nobody could read.
    /// Measured on the package as the part would leave it (its earlier files of this part
    /// replaced), so parts completing at the same moment could still pass together; the
    /// margin below the limit is for that and for the list of missing parts growing.
    async fn ensure_describable(
        &self,
        request_id: &str,
        processor: &str,
        subprocessor: &str,
        files: &[PackageFile],
    ) -> Result<(), ApiError> {
        let Some(row) = self.shared.store.request(request_id).await? else {
            return Ok(());
        };
        let record = self.shared.store.package(request_id).await?;
        let mut all: Vec<PackageFile> = (record.files.iter())
            .filter(|f| f.processor != processor || f.subprocessor != subprocessor)
            .cloned()
            .collect();
        all.extend_from_slice(files);
        let created_at = record.created_at.unwrap_or(row.received_at);
        let info = describe(&row, created_at, &all, &record, true, Some(created_at));
        let size = info.encoded_len();
        if size > MAX_DESCRIPTION_BYTES {
            return Err(ApiError::invalid([FieldViolation::new(
                "files",
                format!(
                    "this part's {} files would make the package's description {size} bytes \
                     ({} files in all, each listed and in manifest.json), where at most \
                     {MAX_DESCRIPTION_BYTES} can be sent: put the part's data in fewer files",
                    files.len(),
                    all.len()
                ),
            )]));
        }
        Ok(())
    }

    /// Registers the file `header` describes and answers where its upload stands, with,
    /// for a file partly stored, where the check of its digest takes up (its checkpoint, not
    /// yet caught up with the bytes stored after it). A partial file stored whole but not
    /// checked yet (the sender stopped after its last chunk) is checked now. Either way at
    /// most [`Packages::max_unchecked`](crate::packages::Packages::max_unchecked) bytes are
    /// read; a file with more stored past its checkpoint is dropped and sent again. Also
    /// answers the registration's generation, which a stream's records require.
    async fn register(
        &self,
        processor: &str,
        header: &ExportFileHeader,
    ) -> Result<(PackageFile, UploadState, Option<ResumableSha256>, i64), ApiError> {
        let file = package_file(processor, header);
        let key = file_key(&file);
        let packages = &self.shared.packages;
        let store = &packages.store;
        let (offset, checkpoint, mut generation) = match self.begin_file(&file).await? {
            FileBegin::Expired(at) => return Err(expired(&file.request_id, at)),
            FileBegin::TooManyFiles => return Err(self.too_many_files(&file)),
            FileBegin::TooManyBytes(bytes) => return Err(self.part_too_large(&file, bytes)),
            FileBegin::Conflict => {
                return Err(ApiError::failed_precondition(format!(
                    "file {} does not belong to its part as stored (another size or digest, \
                     or a file the stored part does not list); a stored part does not change",
                    manifest::path(&file)
                )))
            }
            FileBegin::Registered {
                complete: true,
                generation,
                ..
            } => {
                let state = UploadState {
                    offset: header.size,
                    complete: true,
                };
                return Ok((file, state, None, generation));
            }
            FileBegin::Restarted { generation } => {
                (0, None, self.drop_registered(&file, generation).await?)
            }
            FileBegin::Registered {
                complete: false,
                checkpoint,
                generation,
            } => {
                // The checkpoint was read (by begin_file) before the length: a checkpoint
                // counts only bytes durable when it was recorded, so it never passes the
                // length read after it; read after, it could count bytes an upload stream
                // running meanwhile appended since.
                let stored = store.stored_len(&key).await.map_err(io_error)?;
                (stored, checkpoint, generation)
            }
        };
        if offset > header.size {
            // More bytes than the header announces cannot be the file: start it again.
            let generation = self.drop_registered(&file, generation).await?;
            return Ok((file, UploadState::default(), None, generation));
        }
        if offset == 0 {
            if checkpoint.is_some() {
                // Left by bytes dropped since (a crash came between the two): the bytes sent
                // now must not be taken up from it.
                self.shared.store.clear_file_checkpoint(&file).await?;
            }
            let state = if header.size == 0 {
                let digest = hex::encode(ResumableSha256::new().finalize());
                self.finish(&file, generation, digest).await?
            } else {
                UploadState::default()
            };
            return Ok((file, state, None, generation));
        }
        let Some(from) = packages.resume_point(checkpoint, offset) else {
            tracing::info!(
                file = manifest::path(&file),
                stored = offset,
                "a partial file without a checkpoint near its end is dropped and sent again"
            );
            generation = self.drop_registered(&file, generation).await?;
            return Ok((file, UploadState::default(), None, generation));
        };
        if offset == header.size {
            let hasher = packages
                .hash_tail(&key, from, offset)
                .await
                .map_err(store_error)?;
            let digest = hex::encode(hasher.finalize());
            let state = self.finish(&file, generation, digest).await?;
            return Ok((file, state, None, generation));
        }
        let state = UploadState {
            offset,
            complete: false,
        };
        Ok((file, state, Some(from), generation))
    }

    /// Drops the bytes stored of `file` if it is still registered under `generation`, not
    /// stored whole and its part not stored, and answers the new generation; `None` when it
    /// is not (another call restarted, dropped or stored it since: the bytes are not this
    /// call's to drop, and nothing is removed). The drop is recorded (a new generation, no
    /// checkpoint: [`Store::file_dropped`](crate::store::Store::file_dropped)) before the
    /// bytes are removed, so that no other call records them stored in between. A crash
    /// between the two leaves the bytes without a checkpoint, which the next registration
    /// hashes again from the first, or drops if they are many.
    async fn drop_stored(
        &self,
        file: &PackageFile,
        generation: i64,
    ) -> Result<Option<i64>, ApiError> {
        match self.shared.store.file_dropped(file, generation).await? {
            FileDrop::Expired(at) => Err(expired(&file.request_id, at)),
            FileDrop::Superseded => Ok(None),
            FileDrop::Dropped(next) => {
                self.drop_file(&file_key(file)).await?;
                Ok(Some(next))
            }
        }
    }

    /// [`Api::drop_stored`] for a registration: one that another call overtook is refused,
    /// to be asked again.
    async fn drop_registered(&self, file: &PackageFile, generation: i64) -> Result<i64, ApiError> {
        self.drop_stored(file, generation).await?.ok_or_else(|| {
            ApiError::aborted(format!(
                "file {}: another call registered the file again, dropped or stored it while \
                 this one registered it; ask again",
                manifest::path(file)
            ))
        })
    }

    /// [`Api::drop_stored`] for a stream that found its bytes wrong: one whose registration
    /// another call changed meanwhile drops nothing and is answered [`Api::superseded`].
    async fn drop_own(&self, file: &PackageFile, generation: i64) -> Result<(), ApiError> {
        match self.drop_stored(file, generation).await? {
            Some(_) => Ok(()),
            None => Err(self.superseded(file).await),
        }
    }

    /// The answer for a stream whose file's registration changed before its end: expired
    /// when the package expired meanwhile (its files deleted), else DATA_LOSS. Nothing of
    /// the file was dropped by this stream.
    async fn superseded(&self, file: &PackageFile) -> ApiError {
        match self.shared.store.package_expired_at(&file.request_id).await {
            Ok(Some(at)) => expired(&file.request_id, at),
            Ok(None) => ApiError::data_loss(format!(
                "file {}: its bytes were received, but another call registered the file again, \
                 dropped or stored it meanwhile, so they were not recorded stored and nothing \
                 was dropped; ask GetUploadState and send from the offset it answers",
                manifest::path(file)
            )),
            Err(e) => e.into(),
        }
    }

    /// Registers a file about to be streamed while it is written (`size_follows`): its
    /// header stands with size 0 and an empty digest until its end, and whatever was stored
    /// of the file before is dropped, since such an upload always starts at offset 0.
    async fn register_growing(
        &self,
        processor: &str,
        header: &ExportFileHeader,
    ) -> Result<(PackageFile, UploadState, i64), ApiError> {
        let file = package_file(processor, header);
        match self.begin_file(&file).await? {
            FileBegin::Expired(at) => Err(expired(&file.request_id, at)),
            FileBegin::TooManyFiles => Err(self.too_many_files(&file)),
            FileBegin::TooManyBytes(bytes) => Err(self.part_too_large(&file, bytes)),
            FileBegin::Conflict => Err(ApiError::failed_precondition(format!(
                "file {} belongs to a part that is stored already",
                manifest::path(&file)
            ))),
            FileBegin::Registered { generation, .. } | FileBegin::Restarted { generation } => {
                let generation = self.drop_registered(&file, generation).await?;
                Ok((file, UploadState::default(), generation))
            }
        }
    }

    /// Ends a file streamed while it was written: every byte must be stored, and `end`
    /// must give their number and SHA-256; then the file is stored whole under that size
    /// and digest. Otherwise the file is dropped (if still this stream's registration:
    /// [`Api::drop_stored`]), so that the sender starts it again.
    async fn end_growing(&self, up: &mut FileUpload, end: &FileEnd) -> Result<(), ApiError> {
        let path = manifest::path(&up.file);
        ApiError::ensure_valid(size_and_digest_violations("end", end.size, &end.sha256))?;
        up.sync().await?;
        let digest = up
            .hasher
            .take()
            .map(|h| hex::encode(h.finalize()))
            .unwrap_or_default();
        if end.size != up.state.offset || digest != end.sha256 {
            self.drop_own(&up.file, up.generation).await?;
            return Err(ApiError::data_loss(format!(
                "file {path}: its end gives {} bytes with SHA-256 {}, but {} bytes with SHA-256 \
                 {digest} were received; they were dropped, send the file again",
                end.size, end.sha256, up.state.offset
            )));
        }
        if end.size == 0 {
            self.store_empty(&up.file).await?;
        }
        self.ensure_stored_whole(&up.file, up.generation, end.size)
            .await?;
        let mut file = up.file.clone();
        file.size = i64::try_from(end.size).unwrap_or(i64::MAX);
        file.sha256.clone_from(&end.sha256);
        if !self
            .shared
            .store
            .file_streamed(&file, up.generation, self.shared.clock.now_ms())
            .await?
        {
            return Err(ApiError::aborted(format!(
                "file {path} was registered again by another call while it streamed; ask \
                 GetUploadState and send it again"
            )));
        }
        up.file = file;
        up.state.complete = true;
        Ok(())
    }

    /// Removes the bytes stored under `key`, so that the file's sender starts it again.
    async fn drop_file(&self, key: &str) -> Result<(), ApiError> {
        self.shared
            .packages
            .store
            .remove(key)
            .await
            .map_err(io_error)
    }

    /// Checks a file whose every byte is stored (and durable) against its SHA-256: a match
    /// marks it stored; a mismatch drops it ([`Api::drop_stored`]), so the sender starts it
    /// again. `digest` is the SHA-256 of the stored bytes, hashed as they streamed and, for
    /// an upload that resumed, taken up from the file's checkpoint (the bytes stored past it
    /// read again): never by reading the whole file again. Only while `file` is registered
    /// under `generation`: a file restarted or dropped since holds another registration's
    /// bytes, which are neither recorded stored nor dropped.
    async fn finish(
        &self,
        file: &PackageFile,
        generation: i64,
        digest: String,
    ) -> Result<UploadState, ApiError> {
        if file.size == 0 {
            self.store_empty(file).await?;
        }
        if digest != file.sha256 {
            self.drop_own(file, generation).await?;
            return Err(ApiError::data_loss(format!(
                "file {}: the {} bytes received have SHA-256 {digest}, not {} as the header \
                 says; they were dropped, send the file again",
                manifest::path(file),
                file.size,
                file.sha256
            )));
        }
        self.ensure_stored_whole(file, generation, u64::try_from(file.size).unwrap_or(0))
            .await?;
        if !self
            .shared
            .store
            .file_stored(file, generation, self.shared.clock.now_ms())
            .await?
        {
            return Err(self.superseded(file).await);
        }
        Ok(UploadState {
            offset: u64::try_from(file.size).unwrap_or(0),
            complete: true,
        })
    }

    /// Refuses to record `file` stored unless the store holds its `size` bytes: `digest`
    /// was hashed from what a stream counted, and a call it was not kept apart from (on
    /// another replica) may have dropped or restarted the file since, leaving those bytes
    /// unlinked or at other offsets. The file is then dropped, to be sent again, unless it
    /// is no longer this registration's ([`Api::drop_stored`]).
    async fn ensure_stored_whole(
        &self,
        file: &PackageFile,
        generation: i64,
        size: u64,
    ) -> Result<(), ApiError> {
        let stored = self
            .shared
            .packages
            .store
            .stored_len(&file_key(file))
            .await
            .map_err(io_error)?;
        if stored == size {
            return Ok(());
        }
        self.drop_own(file, generation).await?;
        Err(ApiError::data_loss(format!(
            "file {}: {size} bytes were received, but the store holds {stored} (another call \
             dropped or restarted the file meanwhile); it was dropped, send the file again",
            manifest::path(file)
        )))
    }

    /// Creates `file`, of no bytes, durably: such a file gets no chunk, and a chunk is what
    /// creates a file, so without this its digest could not be read nor the package
    /// downloaded.
    async fn store_empty(&self, file: &PackageFile) -> Result<(), ApiError> {
        let mut appender = self.open_file(file, Some(0)).await?;
        appender.sync().await.map_err(io_error)
    }

    /// Opens `file` for appending, creating it (and its folders). An upload registered before
    /// its package expired may come here after the expiry deleted the package: the package
    /// is then deleted again and the upload refused, so that no file outlives the record
    /// that says it is gone. The check follows the creation, and the sweep deletes once more
    /// after recording the expiry, so whichever comes last removes what the other left.
    /// `size` is the file's whole length when its header gives it (`None` for a file
    /// streamed while written): the store keeps no larger a buffer than that needs.
    async fn open_file(
        &self,
        file: &PackageFile,
        size: Option<u64>,
    ) -> Result<Box<dyn Appender>, ApiError> {
        let store = &self.shared.packages.store;
        let appender = store
            .appender(&file_key(file), size)
            .await
            .map_err(io_error)?;
        if let Some(at) = self
            .shared
            .store
            .package_expired_at(&file.request_id)
            .await?
        {
            drop(appender);
            store
                .remove_all(&package_key(&file.request_id))
                .await
                .map_err(io_error)?;
            return Err(expired(&file.request_id, at));
        }
        Ok(appender)
    }

    /// Stores one chunk after checking its offset, size and CRC-32; a refused chunk appends
    /// nothing (a stream refused when it opens the file may leave it created empty, which
    /// counts as no bytes stored, as a missing file does). The chunk is durable only once
    /// [`FileUpload::sync`] has run, which happens before the file is checked, before any
    /// answer, and before a checkpoint counts it ([`Api::checkpoint`]): one is recorded before
    /// any chunk that would take the file more than the checkpoint interval past the last one.
    async fn store_chunk(
        &self,
        up: &mut FileUpload,
        chunk: &UploadFileChunk,
    ) -> Result<(), ApiError> {
        if chunk.data.is_empty() {
            return Ok(());
        }
        let file = &up.file;
        let state = &up.state;
        let path = manifest::path(file);
        if state.complete {
            return Err(ApiError::failed_precondition(format!(
                "file {path} is already stored complete"
            )));
        }
        if chunk.data.len() > MAX_CHUNK {
            return Err(ApiError::invalid([FieldViolation::new(
                "data",
                format!("must be at most {MAX_CHUNK} bytes"),
            )]));
        }
        if chunk.offset != state.offset {
            return Err(ApiError::failed_precondition(format!(
                "chunk at offset {} of {path} refused: {} bytes are stored, so the next chunk \
                 must start at offset {}",
                chunk.offset, state.offset, state.offset
            )));
        }
        let len = chunk.data.len() as u64;
        let size = u64::try_from(file.size).unwrap_or(0);
        if !up.growing && state.offset + len > size {
            return Err(ApiError::invalid([FieldViolation::new(
                "data",
                format!("runs past the file's size of {size} bytes"),
            )]));
        }
        if up.growing {
            self.ensure_part_room(up, len).await?;
        }
        if let Some(why) =
            dsrelay_runtime::export_files::chunk_crc32_mismatch(&chunk.data, chunk.chunk_crc32)
        {
            return Err(ApiError::data_loss(format!(
                "chunk at offset {} of {path} refused: {why}; nothing of it was stored, send it \
                 again",
                chunk.offset
            )));
        }
        if up.appender.is_none() {
            let size = (!up.growing).then_some(size);
            let mut opened = self.open_file(&up.file, size).await?;
            // The stream counts from the length registered; a call it was not kept apart from
            // (on another replica) may have dropped or restarted the file since, and its
            // bytes would land at other offsets than counted. The length is the opened
            // handle's, so it is of the file appended to (not of one created under its name
            // since); it is read before any checkpoint, which would record the stream's
            // digest for the file as it is now. A restart that left exactly this length is
            // told by the generation, read after the open: one later than that read is
            // caught when the stream records its progress.
            let stored = opened.file_len().await.map_err(io_error)?;
            if stored != up.state.offset {
                // Its digest describes bytes no longer stored: no checkpoint from it.
                up.hasher = None;
                return Err(ApiError::failed_precondition(format!(
                    "chunk at offset {} of {path} refused: this upload expected {} bytes \
                     stored, but {stored} are (another call dropped or restarted the file \
                     meanwhile); nothing was appended: ask GetUploadState and send from the \
                     offset it answers",
                    chunk.offset, up.state.offset
                )));
            }
            let current = self.shared.store.file_generation(&up.file).await?;
            if current != Some(up.generation) {
                up.hasher = None;
                return Err(ApiError::failed_precondition(format!(
                    "chunk at offset {} of {path} refused: another call registered the file \
                     again or dropped it after this upload registered it; nothing was \
                     appended: ask GetUploadState and send from the offset it answers",
                    chunk.offset
                )));
            }
            up.appender = Some(opened);
        }
        if !up.growing
            && up.state.offset > up.checkpointed
            && up.state.offset + len - up.checkpointed > self.shared.packages.checkpoint_every
        {
            self.checkpoint(up).await?;
        }
        let Some(appender) = up.appender.as_mut() else {
            return Err(ApiError::unexpected(anyhow::anyhow!(
                "file {path}: its upload has no file open to append to"
            )));
        };
        appender.append(&chunk.data).await.map_err(io_error)?;
        if let Some(h) = &mut up.hasher {
            h.update(&chunk.data);
        }
        up.state.offset += len;
        if !up.growing && up.state.offset == size {
            up.sync().await?;
            let Some(hasher) = up.hasher.take() else {
                return Err(ApiError::unexpected(anyhow::anyhow!(
                    "file {path}: its upload ended without a digest of its bytes"
                )));
            };
            let digest = hex::encode(hasher.finalize());
            up.state = self.finish(&up.file, up.generation, digest).await?;
        }
        Ok(())
    }

    /// Refuses a chunk of a file streamed while it is written (whose header announced no
    /// size for its registration to count) that would take its part past
    /// `packages.max_part_bytes`. The rest of the part is counted again every
    /// [`RECOUNT_EVERY`] bytes of the stream: other files of the part streaming at the same
    /// time each pass unseen by the others by at most that much.
    async fn ensure_part_room(&self, up: &mut FileUpload, len: u64) -> Result<(), ApiError> {
        let end = up.state.offset.saturating_add(len);
        if end > up.recount_at {
            let streaming = self.streaming_bytes(&up.file).await?;
            let announced = self.shared.store.announced_besides(&up.file).await?;
            up.others = announced.saturating_add(streaming);
            up.recount_at = end.saturating_add(RECOUNT_EVERY);
        }
        let bytes = up.others.saturating_add(end);
        if bytes > self.shared.config.packages.max_part_bytes {
            return Err(self.part_too_large(&up.file, bytes));
        }
        Ok(())
    }

    /// Makes what `up` appended durable, then records how far its digest went (unless the
    /// file is stored whole, or streams while written: such an upload never resumes), so that
    /// a resumed upload's check reads only what follows. Refused (FAILED_PRECONDITION, and no
    /// checkpoint from this stream after) when the file was registered again or dropped
    /// since the stream registered it: its digest is not of the bytes stored now.
    async fn checkpoint(&self, up: &mut FileUpload) -> Result<(), ApiError> {
        up.sync().await?;
        if up.growing || up.state.complete || up.state.offset <= up.checkpointed {
            return Ok(());
        }
        let Some(hasher) = &up.hasher else {
            return Ok(());
        };
        let recorded = self
            .shared
            .store
            .record_file_checkpoint(&up.file, up.generation, hasher.len(), &hasher.midstate())
            .await?;
        if !recorded {
            up.hasher = None;
            return Err(ApiError::failed_precondition(format!(
                "file {}: another call registered the file again or dropped it after this \
                 upload registered it, so what this upload sent (up to offset {}) is not counted \
                 stored; ask GetUploadState and send from the offset it answers",
                manifest::path(&up.file),
                up.state.offset
            )));
        }
        up.checkpointed = hasher.len();
        Ok(())
    }

    /// Claims the file `header` announces in [`Uploading`] for one call, or ABORTED while
    /// another call holds it, `then` telling the caller when to come back.
    fn claim_file(
        &self,
        processor: &str,
        header: &ExportFileHeader,
        then: &str,
    ) -> Result<UploadGuard<'_>, ApiError> {
        let key = file_key(&package_file(processor, header));
        self.shared.uploading.claim(&key).ok_or_else(|| {
            ApiError::aborted(format!(
                "an upload or an upload-state call of file {} is in progress; {then}",
                header.name
            ))
        })
    }

    /// The package of a request the caller may see, checked to have one that has not expired.
    async fn package_standing(
        &self,
        caller_req: &tonic::Request<impl Sized>,
        request_id: &str,
    ) -> Result<PackageStanding, ApiError> {
        let caller = self.partner_api_caller(caller_req)?;
        let row = self.visible(&caller, request_id).await?;
        package_standing(&self.shared, &row).await
    }
}

/// Looks with `look` until it answers true, for up to `patience`: again whenever `changes`
/// (subscribed to [`Shared::publish`] before the first look) carries `request_id`, or says
/// it missed some, and once more when `patience` has passed. A change committed through
/// another replica publishes nothing here, so that last look is what sees it.
async fn await_change_until<F, Fut, E>(
    changes: &mut broadcast::Receiver<String>,
    request_id: &str,
    patience: Duration,
    mut look: F,
) -> Result<bool, E>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<bool, E>>,
{
    let deadline = tokio::time::Instant::now() + patience;
    // Only a look that starts at the deadline or after it is the last: one that started
    // before, however long it took, is followed by another.
    let mut last = false;
    loop {
        if look().await? {
            return Ok(true);
        }
        if last {
            return Ok(false);
        }
        let own_change = crate::app::changed(changes, request_id);
        let timed_out = tokio::time::timeout_at(deadline, own_change).await.is_err();
        last = timed_out || tokio::time::Instant::now() >= deadline;
    }
}

/// Why request `id`, of `kind` (proto enum value), has no package, or `None` when it has
/// one: a return of data has one, and so has a contract end whose choice is
/// RETURN_THEN_DELETE to the registry. One returned to a transfer recipient has none (the
/// recipient's receipts are the proof), nor has one whose choice is DELETE or still NONE.
async fn no_package(shared: &Shared, id: &str, kind: i32) -> Result<Option<String>, ApiError> {
    if kind == RequestKind::ReturnOfData as i32 {
        return Ok(None);
    }
    if kind != RequestKind::ContractEnd as i32 {
        return Ok(Some(format!(
            "request {id} is {}; only RETURN_OF_DATA and CONTRACT_END requests have a package",
            kind_name(kind)
        )));
    }
    let Some(contract) = shared.store.contract(id).await? else {
        return Ok(Some(format!("contract end {id} has no terms stored")));
    };
    Ok(match contract.choice() {
        ContractEndChoice::ReturnThenDelete if contract.transfer_recipient.is_empty() => None,
        ContractEndChoice::ReturnThenDelete => Some(format!(
            "contract end {id} returns the data to transfer recipient {}, whose receipts are \
             the proof: it has no package",
            contract.transfer_recipient
        )),
        other => Some(format!(
            "contract end {id} is {}; only RETURN_THEN_DELETE returns a package",
            super::contracts::choice_name(other)
        )),
    })
}

/// A request's package as [`package_standing`] reads it.
pub(super) struct PackageStanding {
    /// What GetPackage answers.
    pub(super) info: PackageInfo,
    /// The files `info` lists, as stored: what DownloadPackage streams.
    pub(super) files: Vec<PackageFile>,
    /// The tasks that ended FAILED, REFUSED or CANCELLED without a part
    /// ([`PackageRecord::unreturned`](crate::store::PackageRecord::unreturned)).
    pub(super) unreturned: Vec<(String, String, TaskState)>,
    /// The processors that have not accepted the request's delivery
    /// ([`PackageRecord::undelivered`](crate::store::PackageRecord::undelivered)).
    pub(super) undelivered: Vec<String>,
    /// The processors whose delivery a cancellation withdrew before they accepted it
    /// ([`PackageRecord::never_asked`](crate::store::PackageRecord::never_asked)).
    pub(super) never_asked: Vec<String>,
}

impl PackageStanding {
    /// The returns that ended without their part, for people: `processor/subprocessor
    /// (STATE)`, comma-separated.
    pub(super) fn unreturned_named(&self) -> String {
        self.unreturned
            .iter()
            .map(|(p, s, state)| {
                let state = state.as_str_name().trim_start_matches("TASK_STATE_");
                format!("{p}/{s} ({state})")
            })
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// What an incomplete package waits for, for people; empty when nothing is named (a
    /// return of data whose request is still open, a contract end with no part stored).
    pub(super) fn waiting_for(&self) -> String {
        let mut waiting = Vec::new();
        // First: unlike what follows, nothing will change it.
        if !self.never_asked.is_empty() {
            waiting.push(format!(
                "the request was cancelled before processor(s) {} accepted its delivery, so \
                 they were never asked for the data and this package will never be complete \
                 (a new request asks them)",
                self.never_asked.join(", ")
            ));
        }
        if !self.undelivered.is_empty() {
            waiting.push(format!(
                "processor(s) {} have not accepted the request's delivery yet, so not all \
                 of their tasks are known",
                self.undelivered.join(", ")
            ));
        }
        if !self.info.missing.is_empty() {
            waiting.push(format!(
                "the parts of {} are not stored yet",
                self.info.missing.join(", ")
            ));
        }
        if !self.unreturned.is_empty() {
            let named = self.unreturned_named();
            let its = if self.unreturned.len() == 1 {
                "its part"
            } else {
                "their parts"
            };
            waiting.push(format!(
                "the return of {named} ended without {its}, and none will come (see why with \
                 dsrctl contracts show)"
            ));
        }
        waiting.join("; ")
    }
}

/// A request's package as PackageInfo, with what its completeness was judged on, or why it
/// has none. A contract end's package is complete once every subprocessor's part is stored,
/// before the request finishes: the controller downloads and verifies it, then confirms
/// (ContractService.ConfirmReturn), and only then does the processor delete the data and the
/// request finish. Its expiry, like any package's, counts from when the request finished, so
/// it never expires while the contract end waits for the confirmation.
///
/// No package is complete while a processor has not accepted the request's delivery: its
/// tasks are known only from its answer, so parts and acknowledgements that came in before
/// it (the answer lost, the delivery waiting for a retry) may be a few of its tasks, with
/// none missing among those known. A contract end confirmed then would have the processor
/// delete the others' data, never returned. (A return of data is complete only once its
/// request finished, which needs every delivery accepted; the rule holds for it all the
/// same.)
///
/// Nor is one complete whose request was cancelled before a processor accepted its
/// delivery (the row withdrawn): that processor was never asked, and a cancelled request
/// finishes at once, so without this rule its package would read complete and empty, as if
/// its holders had no data.
pub(super) async fn package_standing(
    shared: &Shared,
    row: &RequestRow,
) -> Result<PackageStanding, ApiError> {
    if let Some(why) = no_package(shared, &row.id, row.kind as i32).await? {
        return Err(ApiError::failed_precondition(why));
    }
    let record = shared.store.package(&row.id).await?;
    if let Some(at) = record.expired_at {
        return Err(expired(&row.id, at));
    }
    let expires_at = record.expiry_from.map(|f| shared.packages.expires_at(f));
    if let Some(at) = expires_at.filter(|at| *at <= shared.clock.now_ms()) {
        return Err(expired(&row.id, at));
    }
    let created_at = record.created_at.unwrap_or(row.received_at);
    let all_known =
        record.undelivered.is_empty() && record.never_asked.is_empty() && record.missing.is_empty();
    let complete = all_known
        && if row.kind == RequestKind::ContractEnd {
            record.parts > 0
        } else {
            record.finished_at.is_some()
        };
    let info = describe(
        row,
        created_at,
        &record.files,
        &record,
        complete,
        expires_at,
    );
    Ok(PackageStanding {
        info,
        files: record.files,
        unreturned: record.unreturned,
        undelivered: record.undelivered,
        never_asked: record.never_asked,
    })
}

/// The description of `row`'s package created at `created_at` and holding `files`, with the
/// parts still `missing` (as `(processor, subprocessor)`).
fn describe(
    row: &RequestRow,
    created_at: i64,
    files: &[PackageFile],
    record: &PackageRecord,
    complete: bool,
    expires_at: Option<i64>,
) -> PackageInfo {
    let (files, manifest_json) =
        manifest::build(&row.id, row.kind, created_at, files, &record.unreturned);
    let named = |p: &String, s: &String| format!("{p}/{s}");
    PackageInfo {
        request_id: row.id.clone(),
        complete,
        files,
        missing: record.missing.iter().map(|(p, s)| named(p, s)).collect(),
        expires_at: expires_at.map(timestamp_from_millis),
        manifest_json,
        not_returned: record
            .unreturned
            .iter()
            .map(|(p, s, _)| named(p, s))
            .collect(),
        never_asked: record.never_asked.clone(),
    }
}

#[tonic::async_trait]
impl ExportUploadService for Api {
    #[tracing::instrument(skip_all, fields(processor, request_id))]
    async fn get_upload_state(
        &self,
        req: tonic::Request<GetUploadStateRequest>,
    ) -> Result<Response<UploadState>, Status> {
        let processor = self.uploader(&req)?;
        let header = req.into_inner().header.unwrap_or_default();
        ApiError::ensure_valid(header_violations("header", &header))?;
        tracing::Span::current()
            .record("processor", processor.as_str())
            .record("request_id", header.request_id.as_str());
        self.check_target(&header.request_id, &processor, &header.subprocessor)
            .await?;
        // The answer may drop the stored bytes or check and store the file: under a live
        // upload stream of the file that would unlink what it appends to, or store the file
        // while the stream still writes it, so it waits for the stream to end.
        let _guard = self.claim_file(&processor, &header, "ask again when it ends")?;
        let (_, state, _, _) = self.register(&processor, &header).await?;
        Ok(Response::new(state))
    }

    #[tracing::instrument(skip_all, fields(processor, request_id, file))]
    async fn upload_file(
        &self,
        req: tonic::Request<Streaming<UploadFileChunk>>,
    ) -> Result<Response<UploadState>, Status> {
        let processor = self.uploader(&req)?;
        // Taken before the first message is read, so a processor over its limit costs no
        // buffer nor file; held (by `up`, or by this call until `up` exists) until the call
        // returns, however the stream ended: by its last message, an error, or a client gone.
        let limit = self.shared.config.packages.uploads_per_processor;
        let slot = self.shared.uploading.take_stream(&processor, limit)?;
        let idle = Duration::from_millis(self.shared.config.service.call_limit_ms);
        let mut stream = req.into_inner();
        let Some(first) = next_message_within(&mut stream, idle).await? else {
            return Err(ApiError::invalid([FieldViolation::new(
                "header",
                "is required in the first message",
            )])
            .into());
        };
        let header = first.header.clone().unwrap_or_default();
        let growing = first.size_follows;
        ApiError::ensure_valid(if growing {
            growing_header_violations("header", &header)
        } else {
            header_violations("header", &header)
        })?;
        let span = tracing::Span::current();
        span.record("processor", processor.as_str())
            .record("request_id", header.request_id.as_str())
            .record("file", header.name.as_str());
        self.check_target(&header.request_id, &processor, &header.subprocessor)
            .await?;
        let _guard = self.claim_file(
            &processor,
            &header,
            "once it ends, ask GetUploadState and resume",
        )?;
        let (file, state, resumed, generation) = if growing {
            let (file, state, generation) = self.register_growing(&processor, &header).await?;
            (file, state, None, generation)
        } else {
            self.register(&processor, &header).await?
        };
        let (hasher, checkpointed) = match resumed {
            // A resumed stream hashes the bytes stored after the checkpoint (at most one
            // interval of them), then its own as they come.
            Some(from) => {
                let checkpointed = from.len();
                let caught_up = self
                    .shared
                    .packages
                    .hash_tail(&file_key(&file), from, state.offset)
                    .await
                    .map_err(store_error)?;
                (Some(caught_up), checkpointed)
            }
            // A stream that starts the file sees all of it and hashes it as it goes.
            None => ((state.offset == 0).then(ResumableSha256::new), 0),
        };
        let mut up = FileUpload {
            _slot: slot,
            hasher,
            checkpointed,
            file,
            state,
            appender: None,
            growing,
            generation,
            others: 0,
            recount_at: 0,
        };
        let mut next = Some(first);
        let mut ended = false;
        let streamed: Result<(), Status> = async {
            while let Some(chunk) = next {
                if ended {
                    return Err(ApiError::invalid([FieldViolation::new(
                        "end",
                        "must be in the last message: no message may follow it",
                    )])
                    .into());
                }
                if chunk.end.is_some() && !growing {
                    return Err(ApiError::invalid([FieldViolation::new(
                        "end",
                        "is only for an upload whose first message set size_follows",
                    )])
                    .into());
                }
                self.store_chunk(&mut up, &chunk).await?;
                if let Some(end) = &chunk.end {
                    self.end_growing(&mut up, end).await?;
                    ended = true;
                }
                next = next_message_within(&mut stream, idle).await?;
            }
            Ok(())
        }
        .await;
        // However the stream ended, what it appended is made durable before any answer (this
        // one, or a later GetUploadState) counts it as stored, and then checkpointed.
        self.checkpoint(&mut up).await?;
        streamed?;
        tracing::debug!(
            offset = up.state.offset,
            complete = up.state.complete,
            "upload stream ended"
        );
        Ok(Response::new(up.state))
    }

    #[tracing::instrument(skip_all, fields(processor, request_id, subprocessor))]
    async fn complete_part(
        &self,
        req: tonic::Request<CompletePartRequest>,
    ) -> Result<Response<CompletePartResponse>, Status> {
        let processor = self.uploader(&req)?;
        let part = req.into_inner();
        ApiError::ensure_valid(part_violations(&part))?;
        tracing::Span::current()
            .record("processor", processor.as_str())
            .record("request_id", part.request_id.as_str())
            .record("subprocessor", part.subprocessor.as_str());
        self.check_target(&part.request_id, &processor, &part.subprocessor)
            .await?;
        let files: Vec<PackageFile> = part
            .files
            .iter()
            .map(|h| package_file(&processor, h))
            .collect();
        if let Err(refused) = self
            .ensure_describable(&part.request_id, &processor, &part.subprocessor, &files)
            .await
        {
            // The size rule is for completing a new part. One already stored (the processor
            // retrying after a lost answer, or a completion of it committed meanwhile) is
            // answered as stored below, whatever other parts completing at the same moment
            // grew the package to: refusing it would fail a task whose part the registry has.
            let key = (
                part.request_id.clone(),
                processor.clone(),
                part.subprocessor.clone(),
            );
            let stored = self
                .shared
                .store
                .parts_stored(&[part.request_id.as_str()])
                .await
                .map_err(ApiError::from)?;
            if !stored.contains(&key) {
                return Err(refused.into());
            }
        }
        let now = self.shared.clock.now_ms();
        let bytes = &self.shared.packages.store;
        let remove_bytes = |name: String| {
            let mut f = package_file(&processor, &ExportFileHeader::default());
            f.request_id.clone_from(&part.request_id);
            f.subprocessor.clone_from(&part.subprocessor);
            f.name = name;
            async move {
                bytes
                    .remove(&file_key(&f))
                    .await
                    .map_err(|e| anyhow::Error::new(e).context("package store"))
            }
        };
        let outcome = self
            .shared
            .store
            .complete_part(
                &part.request_id,
                &processor,
                &part.subprocessor,
                &files,
                now,
                remove_bytes,
            )
            .await
            .map_err(ApiError::from)?;
        match outcome {
            PartOutcome::Stored { stored_at, dropped } => {
                self.shared.publish(&part.request_id);
                tracing::info!(files = files.len(), dropped = dropped.len(), "part stored");
                Ok(Response::new(CompletePartResponse {
                    stored_at: Some(timestamp_from_millis(stored_at)),
                }))
            }
            PartOutcome::Missing(names) => Err(ApiError::failed_precondition(format!(
                "part of {} is not stored complete: upload {} first",
                part.subprocessor,
                a_few(&names)
            ))
            .into()),
            PartOutcome::Closed(names) => Err(ApiError::failed_precondition(format!(
                "part of {} was stored already with other files ({}); a stored part does not \
                 change",
                part.subprocessor,
                a_few(&names)
            ))
            .into()),
            PartOutcome::Expired(at) => Err(expired(&part.request_id, at).into()),
        }
    }
}

/// The first few of `names` and how many more: a few names say what is meant; thousands
/// would not fit in a status.
fn a_few(names: &[String]) -> String {
    const NAMED: usize = 5;
    let shown = names[..names.len().min(NAMED)].join(", ");
    match names.len().saturating_sub(NAMED) {
        0 => shown,
        n => format!("{shown} and {n} more"),
    }
}

/// What DownloadPackage answers with.
pub(crate) type ChunkStream =
    Pin<Box<dyn tokio_stream::Stream<Item = Result<PackageChunk, Status>> + Send>>;

#[tonic::async_trait]
impl PackageService for Api {
    #[tracing::instrument(skip_all, fields(request_id))]
    async fn get_package(
        &self,
        req: tonic::Request<GetPackageRequest>,
    ) -> Result<Response<PackageInfo>, Status> {
        let id = req.get_ref().request_id.clone();
        tracing::Span::current().record("request_id", id.as_str());
        Ok(Response::new(self.package_standing(&req, &id).await?.info))
    }

    type DownloadPackageStream = ChunkStream;

    #[tracing::instrument(skip_all, fields(request_id))]
    async fn download_package(
        &self,
        req: tonic::Request<DownloadPackageRequest>,
    ) -> Result<Response<Self::DownloadPackageStream>, Status> {
        let id = req.get_ref().request_id.clone();
        tracing::Span::current().record("request_id", id.as_str());
        let caller = self.partner_api_caller(&req)?;
        let limit = self.shared.config.packages.downloads_per_caller;
        // Taken before any read, so a caller over its limit costs none; held by the task
        // that reads the files, until it ends.
        let slot = take_download(&self.shared.downloads, &caller.name, limit)?;
        let row = self.visible(&caller, &id).await?;
        let standing = package_standing(&self.shared, &row).await?;
        if !standing.info.complete {
            let waiting = match standing.waiting_for() {
                w if w.is_empty() => "the request is still open".to_string(),
                w => w,
            };
            return Err(ApiError::failed_precondition(format!(
                "the package of request {id} is not complete: {waiting}"
            ))
            .into());
        }
        let info = standing.info;
        // From the read the description came from, so the files streamed are the ones the
        // description (the first message) lists.
        let mut files = standing.files;
        files.sort_by_key(manifest::path);
        // A reader that stops reading stops the reading of the files after call_limit_ms.
        let idle = Duration::from_millis(self.shared.config.service.call_limit_ms);
        let (mut tx, rx) = feed::channel(4, idle);
        let store = self.shared.packages.store.clone();
        tokio::spawn(async move {
            let _slot = slot;
            if !tx
                .send(Ok(PackageChunk {
                    item: Some(Item::Info(info)),
                }))
                .await
            {
                return;
            }
            for f in files {
                let path = manifest::path(&f);
                let mut reader = match store.open(&file_key(&f)).await {
                    Ok(r) => r,
                    Err(e) => {
                        let _ = tx.send(Err(io_error(e).into())).await;
                        return;
                    }
                };
                let mut offset = 0u64;
                loop {
                    let mut buf = Vec::with_capacity(MAX_CHUNK);
                    let n = match read_chunk(&mut reader, &mut buf, MAX_CHUNK).await {
                        Ok(n) => n,
                        Err(e) => {
                            let _ = tx.send(Err(io_error(e).into())).await;
                            return;
                        }
                    };
                    if n == 0 {
                        break;
                    }
                    let chunk = PackageChunk {
                        item: Some(Item::File(PackageFileChunk {
                            path: path.clone(),
                            offset,
                            data: buf,
                        })),
                    };
                    offset += n as u64;
                    if !tx.send(Ok(chunk)).await {
                        return;
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(rx)))
    }
}

/// One upload stream's file: where it stands, and what the stream keeps while it runs.
struct FileUpload {
    /// The stream's place among its processor's (`packages.uploads_per_processor`). Declared
    /// first: fields drop in declaration order, so the place is free by the time the file is
    /// closed (for a moment a new stream may then open while this one's buffer is freed).
    _slot: KeyedSlot,
    file: PackageFile,
    state: UploadState,
    /// Opened at the first chunk stored.
    appender: Option<Box<dyn Appender>>,
    /// The SHA-256 of the file's bytes so far: from the first when this stream started the
    /// file, from its checkpoint when it resumed; `None` once the file is checked.
    hasher: Option<ResumableSha256>,
    /// Bytes the file's recorded checkpoint covers.
    checkpointed: u64,
    /// Streamed while it is written: its size and digest come at the end.
    growing: bool,
    /// The generation of the file's registration this stream counts from: its checkpoints,
    /// its end and its drops of the file are recorded only while the file still has it.
    generation: i64,
    /// For a file streamed while written: the bytes of the rest of its part, as last
    /// counted ([`Api::ensure_part_room`]).
    others: u64,
    /// The offset past which a chunk has the rest of the part counted again; 0 before the
    /// first count.
    recount_at: u64,
}

impl FileUpload {
    /// Makes what this stream appended durable.
    async fn sync(&mut self) -> Result<(), ApiError> {
        match &mut self.appender {
            Some(a) => a.sync().await.map_err(io_error),
            None => Ok(()),
        }
    }
}

/// Reads up to `max` bytes into `buf` (empty, with room for them) as far as the reader goes,
/// so chunks are full-sized but the last; answers how many.
async fn read_chunk(
    reader: &mut (dyn tokio::io::AsyncRead + Send + Unpin),
    buf: &mut Vec<u8>,
    max: usize,
) -> std::io::Result<usize> {
    // Into the vector's spare room, which is not zeroed first (a chunk is 1 MiB).
    while buf.len() < max {
        let room = (max - buf.len()) as u64;
        if (&mut *reader).take(room).read_buf(buf).await? == 0 {
            break;
        }
    }
    Ok(buf.len())
}

/// The file a header describes, from `processor`.
fn package_file(processor: &str, h: &ExportFileHeader) -> PackageFile {
    PackageFile {
        request_id: h.request_id.clone(),
        processor: processor.to_string(),
        subprocessor: h.subprocessor.clone(),
        name: h.name.clone(),
        media_type: h.media_type.clone(),
        categories: serde_json::to_string(&h.categories).unwrap_or_else(|_| "[]".into()),
        size: i64::try_from(h.size).unwrap_or(i64::MAX),
        sha256: h.sha256.clone(),
    }
}

/// The answer for a package deleted (or due to be) at `at`.
fn expired(request_id: &str, at: i64) -> ApiError {
    let when = DateTime::from_timestamp_millis(at)
        .unwrap_or_default()
        .to_rfc3339_opts(SecondsFormat::Secs, true);
    ApiError::failed_precondition(format!(
        "the package of request {request_id} expired at {when} and its files were deleted"
    ))
}

/// The answer for a failure of the package store: [`store_error`].
fn io_error(e: std::io::Error) -> ApiError {
    store_error(anyhow::Error::new(e).context("package store"))
}

/// The answer for `error`, a failure of the package store or of a call that went through
/// it. A registry out of file descriptors (EMFILE, ENFILE: from any cause in the chain)
/// answers UNAVAILABLE, since the same call succeeds once other calls have closed their
/// files, where INTERNAL would read as a fault of the registry; it is logged here, with the
/// errno, as the status conversion logs only internal errors. Anything else is internal.
fn store_error(error: anyhow::Error) -> ApiError {
    let Some(errno) = out_of_files(&error) else {
        return ApiError::unexpected(error);
    };
    tracing::warn!(
        errno,
        error = format!("{error:#}"),
        "the registry is out of file descriptors; the call was answered UNAVAILABLE"
    );
    ApiError::unavailable(
        "the registry is out of open files (its file descriptors are all in use, by other \
         uploads and downloads), so it could not open or read a package file; try again \
         later",
    )
}

/// The errno of the first cause in `error`'s chain that says the process (EMFILE) or the
/// system (ENFILE) has no file descriptor left.
fn out_of_files(error: &anyhow::Error) -> Option<i32> {
    error
        .chain()
        .filter_map(|cause| cause.downcast_ref::<std::io::Error>())
        .filter_map(std::io::Error::raw_os_error)
        .find(|errno| [libc::EMFILE, libc::ENFILE].contains(errno))
}

/// A kind's name without its prefix (`RETURN_OF_DATA`).
pub(super) fn kind_name(kind: i32) -> &'static str {
    RequestKind::try_from(kind)
        .unwrap_or_default()
        .as_str_name()
        .trim_start_matches("REQUEST_KIND_")
}

/// Every rule a file header breaks, each naming its field under `prefix`.
fn header_violations(prefix: &str, h: &ExportFileHeader) -> Vec<FieldViolation> {
    let mut out = described_violations(prefix, h);
    out.extend(size_and_digest_violations(prefix, h.size, &h.sha256));
    out
}

/// Every rule a file's size and SHA-256 (in a header, or in the `end` of a file streamed
/// while it was written) break, each naming its field under `prefix`.
fn size_and_digest_violations(prefix: &str, size: u64, sha256: &str) -> Vec<FieldViolation> {
    let mut out = Vec::new();
    if i64::try_from(size).is_err() {
        out.push(FieldViolation::new(
            format!("{prefix}.size"),
            "must fit a signed 64-bit integer",
        ));
    }
    if !is_sha256(sha256) {
        out.push(FieldViolation::new(
            format!("{prefix}.sha256"),
            "must be 64 lowercase hex digits",
        ));
    }
    out
}

/// Every rule a header's description of its file (all but its size and digest) breaks.
fn described_violations(prefix: &str, h: &ExportFileHeader) -> Vec<FieldViolation> {
    let mut out = Vec::new();
    out.extend(request_id_violation(
        &format!("{prefix}.request_id"),
        &h.request_id,
    ));
    // The subprocessor names a folder of the package, on disk and in the download.
    out.extend(file_name_violation(
        &format!("{prefix}.subprocessor"),
        &h.subprocessor,
    ));
    out.extend(label_violation(
        &format!("{prefix}.media_type"),
        &h.media_type,
    ));
    out.extend(file_name_violation(&format!("{prefix}.name"), &h.name));
    if h.categories.len() > MAX_CATEGORIES {
        out.push(FieldViolation::new(
            format!("{prefix}.categories"),
            format!("at most {MAX_CATEGORIES}"),
        ));
    }
    for (i, c) in h.categories.iter().enumerate().take(MAX_CATEGORIES) {
        out.extend(label_violation(&format!("{prefix}.categories[{i}]"), c));
    }
    out
}

/// Every rule the header of a file streamed while it is written breaks: those of any
/// header, but for a size and digest that are not known yet and must be left empty.
fn growing_header_violations(prefix: &str, h: &ExportFileHeader) -> Vec<FieldViolation> {
    let mut out = described_violations(prefix, h);
    if h.size != 0 {
        out.push(FieldViolation::new(
            format!("{prefix}.size"),
            "must be 0 with size_follows: the size comes in `end`",
        ));
    }
    if !h.sha256.is_empty() {
        out.push(FieldViolation::new(
            format!("{prefix}.sha256"),
            "must be empty with size_follows: the digest comes in `end`",
        ));
    }
    out
}

/// Every rule a CompletePart breaks.
fn part_violations(p: &CompletePartRequest) -> Vec<FieldViolation> {
    let mut out = Vec::new();
    out.extend(request_id_violation("request_id", &p.request_id));
    out.extend(file_name_violation("subprocessor", &p.subprocessor));
    out.extend(part_files_violations(
        &p.request_id,
        &p.subprocessor,
        &p.files,
        header_violations,
    ));
    out
}

/// A required short label (media type, category).
fn label_violation(field: &str, value: &str) -> Option<FieldViolation> {
    text_violation(field, value, MAX_LABEL, true)
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    use super::*;

    fn header() -> ExportFileHeader {
        ExportFileHeader {
            request_id: "0190-ab".into(),
            subprocessor: "accounting".into(),
            name: "customers.csv".into(),
            media_type: "text/csv".into(),
            categories: vec!["contact".into()],
            size: 10,
            sha256: "0".repeat(64),
        }
    }

    #[test]
    fn headers_name_every_broken_field() {
        assert!(header_violations("header", &header()).is_empty());
        let bad = ExportFileHeader {
            request_id: String::new(),
            name: "../x".into(),
            sha256: "ABC".into(),
            categories: vec![String::new()],
            ..header()
        };
        let fields: Vec<String> = header_violations("header", &bad)
            .into_iter()
            .map(|v| v.field)
            .collect();
        assert_eq!(
            fields,
            [
                "header.request_id",
                "header.name",
                "header.categories[0]",
                "header.sha256"
            ]
        );
    }

    #[test]
    fn a_part_lists_only_its_own_files_once() {
        let part = CompletePartRequest {
            request_id: "0190-ab".into(),
            subprocessor: "accounting".into(),
            files: vec![
                header(),
                header(),
                ExportFileHeader {
                    subprocessor: "other".into(),
                    name: "b.json".into(),
                    ..header()
                },
            ],
        };
        let fields: Vec<String> = part_violations(&part)
            .into_iter()
            .map(|v| v.field)
            .collect();
        assert_eq!(fields, ["files[1].name", "files[2]"]);
    }

    #[test]
    fn downloads_are_counted_per_caller() {
        let d = Slots::default();
        let first = take_download(&d, "crm", 2).expect("free");
        let _second = take_download(&d, "crm", 2).expect("free");
        let refused = Status::from(take_download(&d, "crm", 2).expect_err("a third"));
        assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
        for words in ["crm already has 2", "packages.downloads_per_caller = 2"] {
            assert!(refused.message().contains(words), "{words} in {refused:?}");
        }
        assert!(
            take_download(&d, "ops", 2).is_ok(),
            "another caller's are its own"
        );
        drop(first);
        assert!(
            take_download(&d, "crm", 2).is_ok(),
            "a stream ended frees its slot"
        );
    }

    /// What [`await_change_until`] looks with in these tests: true from its `true_from`th look
    /// on, counting its looks in `looks`.
    fn looker(
        looks: &Arc<AtomicUsize>,
        true_from: usize,
    ) -> impl FnMut() -> std::future::Ready<Result<bool, ApiError>> {
        let looks = looks.clone();
        move || {
            let n = looks.fetch_add(1, Ordering::SeqCst) + 1;
            std::future::ready(Ok(n >= true_from))
        }
    }

    /// A wait for an unknown task looks again when its request changes (or its changes were
    /// too many to hear of one by one), not on a timer: with a day's patience it still ends
    /// at the change, which came before it began waiting, after it subscribed.
    #[tokio::test]
    async fn the_wait_for_a_task_looks_again_at_its_requests_change() {
        for lag in [false, true] {
            let (tx, mut changes) = broadcast::channel::<String>(1);
            if lag {
                for _ in 0..3 {
                    tx.send("r2".into()).expect("sent");
                }
            } else {
                tx.send("r1".into()).expect("sent");
            }
            let looks = Arc::new(AtomicUsize::new(0));
            let look = looker(&looks, 2);
            let found = await_change_until(&mut changes, "r1", Duration::from_secs(86_400), look)
                .await
                .expect("looked");
            assert!(found, "lag {lag}");
            assert_eq!(looks.load(Ordering::SeqCst), 2, "lag {lag}");
        }
    }

    /// Other requests' changes do not make the wait look again; it looks once more at its
    /// deadline, which is how a task recorded through another replica (which publishes
    /// nothing here) is found. Measured before: a look every 20 ms.
    #[tokio::test]
    async fn the_wait_for_a_task_looks_once_more_at_its_deadline() {
        for found_then in [false, true] {
            let (tx, mut changes) = broadcast::channel::<String>(64);
            for _ in 0..50 {
                tx.send("r2".into()).expect("sent");
            }
            let looks = Arc::new(AtomicUsize::new(0));
            let true_from = if found_then { 2 } else { usize::MAX };
            let look = looker(&looks, true_from);
            let found = await_change_until(&mut changes, "r1", Duration::from_millis(200), look)
                .await
                .expect("looked");
            let looks = looks.load(Ordering::SeqCst);
            assert_eq!(found, found_then);
            assert_eq!(looks, 2, "the first look and the one at the deadline");
        }
    }

    /// A package store out of file descriptors (EMFILE for the process, ENFILE for the
    /// system), however deep in the error's chain, answers UNAVAILABLE saying so and to try
    /// again later; any other failure stays internal.
    #[test]
    fn a_store_out_of_files_is_unavailable() {
        for errno in [libc::EMFILE, libc::ENFILE] {
            let direct = io_error(std::io::Error::from_raw_os_error(errno));
            let nested = store_error(
                anyhow::Error::new(std::io::Error::from_raw_os_error(errno))
                    .context("opening a stored file")
                    .context("checking the file"),
            );
            for e in [direct, nested] {
                let status = Status::from(e);
                assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
                for words in ["out of open files", "try again later"] {
                    assert!(status.message().contains(words), "{words} in {status:?}");
                }
            }
        }
        let other = Status::from(io_error(std::io::Error::from_raw_os_error(libc::EIO)));
        assert_eq!(other.code(), tonic::Code::Internal, "{other:?}");
        let other = Status::from(store_error(anyhow::anyhow!("a bug")));
        assert_eq!(other.code(), tonic::Code::Internal, "{other:?}");
    }

    #[test]
    fn uploads_are_counted_per_processor() {
        let u = Uploading::default();
        let first = u.take_stream("payroll", 2).expect("free");
        let _second = u.take_stream("payroll", 2).expect("free");
        let refused = Status::from(u.take_stream("payroll", 2).expect_err("a third"));
        assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
        for words in [
            "payroll already has 2",
            "packages.uploads_per_processor = 2",
            "finish or end one of them",
            "raise packages.uploads_per_processor",
        ] {
            assert!(refused.message().contains(words), "{words} in {refused:?}");
        }
        assert!(u.take_stream("other", 2).is_ok(), "another's are its own");
        drop(first);
        assert!(
            u.take_stream("payroll", 2).is_ok(),
            "a stream ended frees its slot"
        );
    }

    #[test]
    fn one_upload_of_a_file_at_a_time() {
        let u = Uploading::default();
        let first = u.claim("k").expect("free");
        assert!(u.claim("k").is_none());
        assert!(u.claim("other").is_some());
        drop(first);
        assert!(u.claim("k").is_some());
    }
}
