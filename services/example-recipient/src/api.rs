//! The TransferReceiver handlers: who may call, what a valid header is, the chunk rules of
//! `proto/dsrelay/v1/transfer.proto`, and the recipient's errors as statuses.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dsrelay_proto::timestamp_from_millis;
use dsrelay_proto::v1::transfer_receiver_server::TransferReceiver;
use dsrelay_proto::v1::{
    CompleteTransferRequest, ExportFileHeader, GetUploadStateRequest, TransferReceipt,
    UploadFileChunk, UploadState,
};
use dsrelay_runtime::export_files::{
    file_name_violation, is_sha256, part_files_violations, MAX_CATEGORIES, MAX_LABEL,
};
use dsrelay_runtime::grpc::{self, Authorizer, ServiceName};
use dsrelay_runtime::identity::{request_id_violation, FieldViolation};
use dsrelay_runtime::resumable_hash::ResumableSha256;
use dsrelay_runtime::server::next_message_within;
use dsrelay_runtime::signing::SigningKey;
use tonic::{Request, Response, Status, Streaming};

use crate::folder::{FileState, Folder, FolderError, Receipt};
use crate::refusals::{Reason, Refusals};

/// Bytes of a file in one message at most.
pub(crate) const MAX_CHUNK: usize = 1024 * 1024;

/// Names the recipient in its answers.
#[derive(Debug)]
pub enum Recipient {}

impl ServiceName for Recipient {
    const NAME: &'static str = "recipient";
}

/// What can go wrong in a recipient call.
pub(crate) type ApiError = grpc::ApiError<Recipient>;

impl From<FolderError> for ApiError {
    fn from(e: FolderError) -> Self {
        match e {
            FolderError::Conflict(m) => Self::failed_precondition(m),
            FolderError::DigestMismatch(m) => Self::data_loss(m),
            FolderError::Missing(names) => Self::failed_precondition(format!(
                "the part is not stored complete: send {} first",
                names.join(", ")
            )),
            // The step and the local path go to the log only: the sender is another
            // organisation, and the shared mapping tells it just that the recipient failed.
            e @ FolderError::Io { .. } => Self::unexpected(e),
        }
    }
}

/// The TransferReceiver implementation.
#[derive(Debug, Clone)]
pub(crate) struct Api {
    folder: Folder,
    /// The recipient's name, put in every receipt.
    name: String,
    /// The key every receipt answered is signed with; `None`: receipts go unsigned.
    signing_key: Option<Arc<SigningKey>>,
    /// The senders allowed, by certificate identity.
    allowed: Arc<Authorizer<()>>,
    /// The calls writing to the folder right now ([`InProgress`]).
    in_progress: Arc<Mutex<InProgress>>,
    /// The refusals' log state, shared with the worker that logs those left out.
    refusals: Arc<Refusals>,
    chunk_delay: Duration,
    /// How long a transfer stream may send nothing before it is ended (`call_limit_ms`).
    idle: Duration,
}

/// What is being written right now, by where it is stored. Two streams appending to one
/// file would interleave their bytes, so the second is turned away until the first ends (two
/// senders' files of the same name are stored apart and go side by side); so is a state call
/// on the file, which may check it or drop it under the stream. A part closed
/// while one of its files is received or restarted would come to hold a file its receipt
/// does not cover, and two closings of one part would each clear the other's files, so a
/// part is closed only while no other call is on it, and no call goes on it while it is.
#[derive(Debug, Default)]
struct InProgress {
    /// The names of the files being received or asked about (SendFile, GetTransferState),
    /// by the folder of their part (a file is stored as `<part's folder>/<name>`); a part
    /// with none is not listed.
    parts: HashMap<PathBuf, BTreeSet<String>>,
    /// Parts being closed (CompleteTransfer), by folder.
    closing: HashSet<PathBuf>,
}

/// Holds a call's entries in [`InProgress`] until dropped.
struct Claim {
    in_progress: Arc<Mutex<InProgress>>,
    part: PathBuf,
    on: ClaimOn,
}

/// What a [`Claim`] holds of its part.
enum ClaimOn {
    /// The part, to close it.
    Closing,
    /// One file of it, by name.
    File(String),
}

impl Drop for Claim {
    fn drop(&mut self) {
        let mut now = self.in_progress.lock().unwrap_or_else(|e| e.into_inner());
        let ClaimOn::File(name) = &self.on else {
            now.closing.remove(&self.part);
            return;
        };
        if let Some(names) = now.parts.get_mut(&self.part) {
            names.remove(name);
            if names.is_empty() {
                now.parts.remove(&self.part);
            }
        }
    }
}

impl Api {
    /// Handlers writing to `folder`, for the senders in `allowed`, signing receipts with
    /// `signing_key` when given.
    pub(crate) fn new(
        folder: Folder,
        name: String,
        signing_key: Option<Arc<SigningKey>>,
        allowed: &[String],
        chunk_delay_ms: u64,
        idle: Duration,
    ) -> Self {
        let allowed = Authorizer::new(
            allowed.iter().map(|id| (id.clone(), (), id.clone())),
            "may not send transfers to this recipient",
        );
        Self {
            folder,
            name,
            signing_key,
            allowed: Arc::new(allowed),
            in_progress: Arc::default(),
            refusals: Arc::default(),
            chunk_delay: Duration::from_millis(chunk_delay_ms),
            idle,
        }
    }

    /// The refusals' log state, for the worker that logs those left out of its lines.
    pub(crate) fn refusals(&self) -> Arc<Refusals> {
        self.refusals.clone()
    }

    /// The caller's certificate identity, or PERMISSION_DENIED, logged: the refused
    /// processor cannot add itself, and the recipient's operator, who can, learns of it only
    /// from this log.
    fn caller<T>(&self, req: &Request<T>) -> Result<String, ApiError> {
        match self.allowed.caller(req) {
            Ok(caller) => Ok(caller.name),
            Err(refused) => {
                let sender = dsrelay_runtime::tls::peer_identity(req)
                    .unwrap_or_else(|_| "(no certificate identity)".into());
                let why = refused.to_string();
                self.refusals.refused(&sender, Reason::NotAllowed, &why);
                Err(refused.into())
            }
        }
    }

    /// `e` as answered to `sender`; a file dropped for its digest is logged, as the sender
    /// sends it again from its first byte and a recurring mismatch is for an operator to see.
    fn folder_error(&self, sender: &str, e: FolderError) -> ApiError {
        if let FolderError::DigestMismatch(why) = &e {
            self.refusals.refused(sender, Reason::DigestMismatch, why);
        }
        e.into()
    }

    /// Claims the file `h` announces, to receive it (`receive`) or to answer its state;
    /// ABORTED while its part is being closed, or while another call receives the file or
    /// answers its state.
    fn claim_file(
        &self,
        sender: &str,
        h: &ExportFileHeader,
        receive: bool,
    ) -> Result<Claim, ApiError> {
        let part = self.folder.part_dir(sender, &h.request_id, &h.subprocessor);
        let mut now = self.in_progress.lock().unwrap_or_else(|e| e.into_inner());
        if now.closing.contains(&part) {
            return Err(ApiError::aborted(format!(
                "the part of {} is being closed; ask GetTransferState for file {} again once \
                 CompleteTransfer has answered",
                h.subprocessor, h.name
            )));
        }
        if !now
            .parts
            .entry(part.clone())
            .or_default()
            .insert(h.name.clone())
        {
            let then = if receive {
                "once it has answered, ask GetTransferState and resume"
            } else {
                "ask again once it has answered"
            };
            return Err(ApiError::aborted(format!(
                "another call on file {} is in progress (a transfer of it, or GetTransferState); \
                 {then}",
                h.name
            )));
        }
        Ok(Claim {
            in_progress: self.in_progress.clone(),
            part,
            on: ClaimOn::File(h.name.clone()),
        })
    }

    /// Claims a part to close it; ABORTED while a call is on one of its files or another
    /// closes it.
    fn claim_part(
        &self,
        sender: &str,
        request_id: &str,
        subprocessor: &str,
    ) -> Result<Claim, ApiError> {
        let part = self.folder.part_dir(sender, request_id, subprocessor);
        let mut now = self.in_progress.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(names) = now.parts.get(&part) {
            let names: Vec<&str> = names.iter().map(String::as_str).collect();
            return Err(ApiError::aborted(format!(
                "the part of {subprocessor} cannot be closed while files of it are received or \
                 asked about ({}); close it once those calls have answered",
                names.join(", ")
            )));
        }
        if !now.closing.insert(part.clone()) {
            return Err(ApiError::aborted(format!(
                "the part of {subprocessor} is being closed by another call; close it again \
                 once that call has answered"
            )));
        }
        Ok(Claim {
            in_progress: self.in_progress.clone(),
            part,
            on: ClaimOn::Closing,
        })
    }

    /// Stores one chunk after checking its offset, size and CRC-32; a refused chunk leaves
    /// nothing behind. The bytes are not synced yet (see [`Folder::sync_partial`]).
    /// `checkpoint` is the file's checkpoint as the stream's last chunk left it
    /// ([`Folder::append`]; `None` before its first).
    async fn store_chunk(
        &self,
        sender: &str,
        h: &ExportFileHeader,
        state: FileState,
        checkpoint: &mut Option<ResumableSha256>,
        chunk: &UploadFileChunk,
    ) -> Result<FileState, ApiError> {
        if chunk.data.is_empty() {
            return Ok(state);
        }
        if state.complete {
            return Err(ApiError::failed_precondition(format!(
                "file {} is already stored complete",
                h.name
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
                "chunk at offset {} of {} refused: {} bytes are stored, so the next chunk \
                 must start at offset {}",
                chunk.offset, h.name, state.offset, state.offset
            )));
        }
        let len = chunk.data.len() as u64;
        if state.offset + len > h.size {
            return Err(ApiError::invalid([FieldViolation::new(
                "data",
                format!("runs past the file's size of {} bytes", h.size),
            )]));
        }
        if let Some(why) =
            dsrelay_runtime::export_files::chunk_crc32_mismatch(&chunk.data, chunk.chunk_crc32)
        {
            return Err(ApiError::data_loss(format!(
                "chunk at offset {} of {} refused: {why}; nothing of it was stored, send it again",
                chunk.offset, h.name
            )));
        }
        *checkpoint = self
            .folder
            .append(sender, h, &chunk.data, checkpoint.take())
            .await?;
        if !self.chunk_delay.is_zero() {
            tokio::time::sleep(self.chunk_delay).await;
        }
        let offset = state.offset + len;
        if offset == h.size {
            return (self.folder.finish(sender, h).await).map_err(|e| self.folder_error(sender, e));
        }
        Ok(FileState {
            offset,
            complete: false,
        })
    }
}

fn state(s: FileState) -> UploadState {
    UploadState {
        offset: s.offset,
        complete: s.complete,
    }
}

/// The receipt `r` as answered, naming the sender whose part it is (the certificate identity
/// its files came under, so the signed body is version 2) and signed with `key` when there
/// is one. The signature is made anew for every answer rather than stored: Ed25519 signs the
/// same fields alike, and a repeated close after a key rotation answers under the key the
/// recipient holds now.
fn receipt(r: Receipt, key: Option<&SigningKey>) -> Result<TransferReceipt, ApiError> {
    let unsigned = TransferReceipt {
        request_id: r.request_id,
        subprocessor: r.subprocessor,
        manifest_sha256: r.manifest_sha256,
        bytes: r.bytes,
        files: r.files,
        received_at: Some(timestamp_from_millis(r.received_at_ms)),
        recipient: r.recipient,
        signature: Vec::new(),
        key_id: String::new(),
        sender: r.sender,
    };
    match key {
        Some(key) => dsrelay_runtime::transfer_receipt::sign(unsigned, key)
            .map_err(|e| ApiError::unexpected(e.context("signing the receipt"))),
        None => Ok(unsigned),
    }
}

#[tonic::async_trait]
impl TransferReceiver for Api {
    #[tracing::instrument(skip_all, fields(sender, request_id))]
    async fn get_transfer_state(
        &self,
        req: Request<GetUploadStateRequest>,
    ) -> Result<Response<UploadState>, Status> {
        let sender = self.caller(&req)?;
        let header = req.into_inner().header.unwrap_or_default();
        ApiError::ensure_valid(header_violations("header", &header))?;
        tracing::Span::current()
            .record("sender", sender.as_str())
            .record("request_id", header.request_id.as_str());
        let _claim = self.claim_file(&sender, &header, false)?;
        let s = self
            .folder
            .begin(&sender, &header)
            .await
            .map_err(|e| self.folder_error(&sender, e))?;
        Ok(Response::new(state(s)))
    }

    #[tracing::instrument(skip_all, fields(sender, request_id, file))]
    async fn send_file(
        &self,
        req: Request<Streaming<UploadFileChunk>>,
    ) -> Result<Response<UploadState>, Status> {
        let sender = self.caller(&req)?;
        let mut stream = req.into_inner();
        let Some(first) = next_message_within(&mut stream, self.idle).await? else {
            return Err(ApiError::invalid([FieldViolation::new(
                "header",
                "is required in the first message",
            )])
            .into());
        };
        refuse_growing(&first)?;
        let header = first.header.clone().unwrap_or_default();
        ApiError::ensure_valid(header_violations("header", &header))?;
        tracing::Span::current()
            .record("sender", sender.as_str())
            .record("request_id", header.request_id.as_str())
            .record("file", header.name.as_str());
        let _claim = self.claim_file(&sender, &header, true)?;
        let mut s = self
            .folder
            .begin(&sender, &header)
            .await
            .map_err(|e| self.folder_error(&sender, e))?;
        // An operator (and the tests) see from this line whether a sender resumed a file.
        tracing::info!(
            from_offset = first.offset,
            stored = s.offset,
            size = header.size,
            "receiving a file"
        );
        let from = s.offset;
        let mut next = Some(first);
        let mut checkpoint = None;
        let received = async {
            while let Some(chunk) = next {
                refuse_growing(&chunk)?;
                s = self
                    .store_chunk(&sender, &header, s, &mut checkpoint, &chunk)
                    .await?;
                next = next_message_within(&mut stream, self.idle).await?;
            }
            Ok::<(), Status>(())
        }
        .await;
        // The answer, an error too, tells the sender how many bytes are stored, and it resumes
        // after them: they are synced once here rather than per chunk (a complete file was
        // synced when it got its name).
        if s.offset > from && !s.complete {
            self.folder
                .sync_partial(&sender, &header)
                .await
                .map_err(ApiError::from)?;
        }
        received?;
        tracing::debug!(
            offset = s.offset,
            complete = s.complete,
            "transfer stream ended"
        );
        Ok(Response::new(state(s)))
    }

    #[tracing::instrument(skip_all, fields(sender, request_id, subprocessor))]
    async fn complete_transfer(
        &self,
        req: Request<CompleteTransferRequest>,
    ) -> Result<Response<TransferReceipt>, Status> {
        let sender = self.caller(&req)?;
        let part = req.into_inner();
        ApiError::ensure_valid(part_violations(&part))?;
        tracing::Span::current()
            .record("sender", sender.as_str())
            .record("request_id", part.request_id.as_str())
            .record("subprocessor", part.subprocessor.as_str());
        let _claim = self.claim_part(&sender, &part.request_id, &part.subprocessor)?;
        let r = self
            .folder
            .complete_part(
                &sender,
                &part.request_id,
                &part.subprocessor,
                &part.files,
                &self.name,
                dsrelay_runtime::store::now_ms(),
            )
            .await
            .map_err(ApiError::from)?;
        tracing::info!(
            files = r.files,
            bytes = r.bytes,
            manifest_sha256 = %r.manifest_sha256,
            "transfer received"
        );
        let answered = receipt(r, self.signing_key.as_deref())?;
        // Written before the answer, so the file is never behind what the sender holds: a
        // write that failed is answered as an error, and the sender's retried close writes it.
        if !answered.signature.is_empty() {
            self.folder
                .keep_signed_receipt(&sender, &answered)
                .await
                .map_err(ApiError::from)?;
        }
        Ok(Response::new(answered))
    }
}

/// Every rule a file header breaks, each naming its field under `prefix`.
fn header_violations(prefix: &str, h: &ExportFileHeader) -> Vec<FieldViolation> {
    let mut out = Vec::new();
    let request_id = format!("{prefix}.request_id");
    out.extend(
        request_id_violation(&request_id, &h.request_id)
            .or_else(|| file_name_violation(&request_id, &h.request_id)),
    );
    out.extend(file_name_violation(
        &format!("{prefix}.subprocessor"),
        &h.subprocessor,
    ));
    out.extend(file_name_violation(&format!("{prefix}.name"), &h.name));
    if h.name.ends_with(".partial") {
        out.push(FieldViolation::new(
            format!("{prefix}.name"),
            "must not end with .partial",
        ));
    }
    if h.media_type.is_empty() || h.media_type.len() > MAX_LABEL {
        out.push(FieldViolation::new(
            format!("{prefix}.media_type"),
            format!("must be 1 to {MAX_LABEL} bytes"),
        ));
    }
    if h.categories.len() > MAX_CATEGORIES {
        out.push(FieldViolation::new(
            format!("{prefix}.categories"),
            format!("at most {MAX_CATEGORIES}"),
        ));
    }
    for (i, c) in h.categories.iter().enumerate().take(MAX_CATEGORIES) {
        if c.is_empty() || c.len() > MAX_LABEL {
            out.push(FieldViolation::new(
                format!("{prefix}.categories[{i}]"),
                format!("must be 1 to {MAX_LABEL} bytes"),
            ));
        }
    }
    if !is_sha256(&h.sha256) {
        out.push(FieldViolation::new(
            format!("{prefix}.sha256"),
            "must be 64 lowercase hex digits",
        ));
    }
    out
}

/// Every rule a CompleteTransfer breaks.
fn part_violations(p: &CompleteTransferRequest) -> Vec<FieldViolation> {
    let mut out = Vec::new();
    out.extend(
        request_id_violation("request_id", &p.request_id)
            .or_else(|| file_name_violation("request_id", &p.request_id)),
    );
    out.extend(file_name_violation("subprocessor", &p.subprocessor));
    out.extend(part_files_violations(
        &p.request_id,
        &p.subprocessor,
        &p.files,
        header_violations,
    ));
    out
}

/// Refuses the fields of a file streamed while it is written (the registry takes those; a
/// recipient takes files whose size and digest are known at the start).
fn refuse_growing(chunk: &UploadFileChunk) -> Result<(), ApiError> {
    let field = if chunk.end.is_some() {
        "end"
    } else if chunk.size_follows {
        "size_follows"
    } else {
        return Ok(());
    };
    Err(ApiError::invalid([FieldViolation::new(
        field,
        "is not taken by SendFile: send a file once it is written, with its size and SHA-256 \
         in the header",
    )]))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> ExportFileHeader {
        ExportFileHeader {
            request_id: "0190-ab".into(),
            subprocessor: "crm".into(),
            name: "export.json".into(),
            media_type: "application/json".into(),
            categories: vec!["contact".into()],
            size: 3,
            sha256: "a".repeat(64),
        }
    }

    #[test]
    fn headers_name_every_broken_field() {
        assert!(header_violations("header", &header()).is_empty());
        let bad = ExportFileHeader {
            request_id: "../etc".into(),
            subprocessor: ".hidden".into(),
            name: "x.partial".into(),
            media_type: String::new(),
            categories: vec![String::new()],
            size: 1,
            sha256: "A".repeat(64),
        };
        let fields: Vec<String> = header_violations("header", &bad)
            .into_iter()
            .map(|v| v.field)
            .collect();
        assert_eq!(
            fields,
            [
                "header.request_id",
                "header.subprocessor",
                "header.name",
                "header.media_type",
                "header.categories[0]",
                "header.sha256",
            ]
        );
    }

    #[test]
    fn a_part_lists_only_its_own_files_once() {
        let mut other = header();
        other.subprocessor = "mail".into();
        other.name = "other.json".into();
        let p = CompleteTransferRequest {
            request_id: "0190-ab".into(),
            subprocessor: "crm".into(),
            files: vec![header(), header(), other],
        };
        let fields: Vec<String> = part_violations(&p).into_iter().map(|v| v.field).collect();
        assert_eq!(fields, ["files[1].name", "files[2]"]);
    }

    /// GetTransferState (`receive` false) and SendFile (true) keep each other off one file,
    /// either of which may check or drop it: the second call is ABORTED, naming the file,
    /// while other files and the file once the first call ended are free. Before, a state
    /// call went beside a transfer of its file, and could drop the partial file under it.
    #[test]
    fn a_file_takes_one_call_at_a_time() {
        let root = tempfile::tempdir().expect("tempdir");
        let folder = Folder::new(root.path().to_path_buf());
        let api = Api::new(folder, "r".into(), None, &[], 0, Duration::from_secs(1));
        let h = header();
        let other = ExportFileHeader {
            name: "other.json".into(),
            ..header()
        };
        for (first, second) in [(true, false), (false, true), (false, false), (true, true)] {
            let held = api.claim_file("p", &h, first).map_err(Status::from);
            let Ok(held) = held else {
                panic!("{first}: {held:?}", held = held.err());
            };
            let busy = match api.claim_file("p", &h, second) {
                Ok(_) => panic!("a second call on the file ({first}, {second}) was let in"),
                Err(e) => Status::from(e),
            };
            assert_eq!(busy.code(), tonic::Code::Aborted, "{busy:?}");
            assert!(busy.message().contains("export.json"), "{busy:?}");
            assert!(api.claim_file("p", &other, second).is_ok(), "another file");
            drop(held);
            assert!(api.claim_file("p", &h, second).is_ok(), "free again");
        }
    }

    /// A part is not closed while a call is on one of its files (the answer names them, in
    /// order), and no call goes on a file of it while it is being closed.
    #[test]
    fn a_part_is_closed_only_while_no_call_is_on_it() {
        let root = tempfile::tempdir().expect("tempdir");
        let folder = Folder::new(root.path().to_path_buf());
        let api = Api::new(folder, "r".into(), None, &[], 0, Duration::from_secs(1));
        let h = header();
        let other = ExportFileHeader {
            name: "a.json".into(),
            ..header()
        };
        let close = || api.claim_part("p", &h.request_id, &h.subprocessor);
        let first = api.claim_file("p", &h, true).map_err(Status::from);
        let second = api.claim_file("p", &other, false).map_err(Status::from);
        let (Ok(first), Ok(second)) = (first, second) else {
            panic!("two files of a part are claimed side by side");
        };
        let busy = Status::from(close().err().expect("files of the part are claimed"));
        assert_eq!(busy.code(), tonic::Code::Aborted, "{busy:?}");
        assert!(busy.message().contains("(a.json, export.json)"), "{busy:?}");
        drop(second);
        let busy = Status::from(close().err().expect("a file of the part is claimed"));
        assert!(busy.message().contains("(export.json);"), "{busy:?}");
        drop(first);
        let closing = close()
            .map_err(Status::from)
            .expect("no call is on the part");
        let busy = Status::from(close().err().expect("the part is being closed"));
        assert!(busy.message().contains("by another call"), "{busy:?}");
        let busy = Status::from(api.claim_file("p", &h, true).err().expect("closing"));
        assert!(busy.message().contains("is being closed"), "{busy:?}");
        drop(closing);
        assert!(api.claim_file("p", &h, true).is_ok(), "free again");
    }
}
