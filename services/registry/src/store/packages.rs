//! What the registry records of return-of-data packages: the files processors announced and
//! stored, the parts they declared complete, and packages deleted at expiry. The bytes live
//! in the package store ([`crate::packages::PackageStore`]); these rows say what they are.

use std::collections::BTreeSet;

use anyhow::Result;
use dsrelay_proto::v1::{EventType, TaskState};

use super::events::{insert_event, EventDetail};
use super::rows::task_state;
use super::{Operation, Store};
use crate::config::PackagesConfig;

/// One file of a part, as its processor described it.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct PackageFile {
    /// The request.
    pub request_id: String,
    /// The processor the part comes from.
    pub processor: String,
    /// The subprocessor whose export it is.
    pub subprocessor: String,
    /// The file's name within the part.
    pub name: String,
    /// Media type.
    pub media_type: String,
    /// Data categories, as a JSON array.
    pub categories: String,
    /// Size in bytes.
    pub size: i64,
    /// SHA-256, lowercase hex.
    pub sha256: String,
}

impl PackageFile {
    /// Whether `other` describes the same content (the same file sent again).
    fn same_content(&self, other: &Self) -> bool {
        self.size == other.size
            && self.sha256 == other.sha256
            && self.media_type == other.media_type
            && self.categories == other.categories
    }
}

/// Whether a processor may upload parts of a request.
#[derive(Debug, PartialEq, Eq)]
pub enum UploadTarget {
    /// No such request.
    Unknown,
    /// The request was not routed to this processor.
    NotDelivered,
    /// Routed to the processor; its kind (proto enum value).
    Kind(i32),
}

/// What [`Store::file_dropped`] found.
#[derive(Debug, PartialEq, Eq)]
pub enum FileDrop {
    /// The drop is recorded, under this new generation: the bytes may go.
    Dropped(i64),
    /// The package expired at this time (its files are deleted): nothing recorded.
    Expired(i64),
    /// The file was restarted, dropped or stored whole since, or its part stored: nothing
    /// recorded, and the bytes stored are not the caller's to drop.
    Superseded,
}

/// What registering a file header found.
#[derive(Debug, PartialEq, Eq)]
pub enum FileBegin {
    /// The file is (now) registered; `complete` when every byte is stored and checked.
    Registered {
        /// Stored whole already.
        complete: bool,
        /// How far its upload was hashed, if a checkpoint was recorded
        /// ([`Store::record_file_checkpoint`]): the number of its first bytes, durable when
        /// it was written, and the SHA-256 midstate after them. Read in the registration's
        /// transaction.
        checkpoint: Option<(u64, Vec<u8>)>,
        /// The registration's generation: what [`Store::record_file_checkpoint`] and
        /// [`Store::file_stored`] require, so that a stream records nothing once the file
        /// was restarted or dropped after it registered.
        generation: i64,
    },
    /// The header differs from the one registered before for a file whose part is not
    /// stored yet: the new header replaces it, and the bytes stored so far belong to the old
    /// one. (A file stored whole is replaced too: the processor exported again, after a
    /// crash or a retry, before it declared the part.)
    Restarted {
        /// The new registration's generation, which its drop of the old bytes requires
        /// ([`Store::file_dropped`]).
        generation: i64,
    },
    /// The file's part is stored, and this file is not one of it as declared (another name,
    /// or other content).
    Conflict,
    /// The package was deleted at expiry (ms).
    Expired(i64),
    /// The file is new to its part, which already has
    /// [`PackagesConfig::max_files_per_part`] files registered: nothing recorded.
    TooManyFiles,
    /// With the file the part would hold this many bytes, more than
    /// [`PackagesConfig::max_part_bytes`]: nothing recorded.
    TooManyBytes(u64),
}

/// What CompletePart found.
#[derive(Debug, PartialEq, Eq)]
pub enum PartOutcome {
    /// Stored now (or before) at this time (ms); `dropped` are files registered for the part
    /// but not listed in it, whose bytes and rows are gone.
    Stored {
        /// When the part was stored (ms).
        stored_at: i64,
        /// Names of files dropped from the part.
        dropped: Vec<String>,
    },
    /// These listed files are not stored complete with the digest given.
    Missing(Vec<String>),
    /// The part was stored before with other files (these): it is closed.
    Closed(Vec<String>),
    /// The package was deleted at expiry (ms).
    Expired(i64),
}

/// A package as the registry knows it.
#[derive(Debug, Default)]
pub struct PackageRecord {
    /// When its first file was registered (ms), if any was.
    pub created_at: Option<i64>,
    /// When it was deleted at expiry (ms).
    pub expired_at: Option<i64>,
    /// When its request finished (ms): no part is to come after that.
    pub finished_at: Option<i64>,
    /// When its time to expiry began (ms): its request finished, or, for a contract end,
    /// the controller confirmed the return, whichever came first (see
    /// [`Store::packages_to_expire`]).
    pub expiry_from: Option<i64>,
    /// Files of stored parts, stored complete.
    pub files: Vec<PackageFile>,
    /// Tasks still open with no part stored, as `(processor, subprocessor)`.
    pub missing: Vec<(String, String)>,
    /// Tasks that ended FAILED, REFUSED or CANCELLED with no part stored, as `(processor,
    /// subprocessor, state)`: their holders' data was not returned. (A CANCELLED task's
    /// part never comes: the files streamed for it are deleted by
    /// [`Store::drop_cancelled_part`].)
    pub unreturned: Vec<(String, String, TaskState)>,
    /// Parts stored.
    pub parts: i64,
    /// Processors the request was routed to that have not accepted its delivery
    /// ([`Store::undelivered`]): the registry does not know all of their tasks yet, so
    /// `missing` cannot name what they still owe.
    pub undelivered: Vec<String>,
    /// Processors whose delivery a cancellation withdrew (the request cancelled, or
    /// forgotten after that) before they accepted it: they were never asked for the data,
    /// so none of their parts will come, and which of their holders have any is not known.
    /// A processor that accepted the delivery all the same (its answer, or acknowledgements
    /// of its tasks, arriving after the cancellation) leaves this list with its tasks.
    pub never_asked: Vec<String>,
}

/// The parts stored for the requests `ids`, as (request id, processor, subprocessor): one
/// query per 500 requests. What proves a RETURN_OF_DATA task's COMPLETED, to Acknowledge and
/// to the processors' other reports alike.
pub(super) async fn parts_of(
    conn: &mut sqlx::AnyConnection,
    backend: dsrelay_runtime::store::Backend,
    ids: &[&str],
) -> Result<BTreeSet<(String, String, String)>> {
    let mut parts = BTreeSet::new();
    for chunk in ids.chunks(500) {
        let sql = format!(
            "SELECT request_id, processor, subprocessor FROM package_parts \
             WHERE request_id IN ({})",
            super::placeholders(1, chunk.len())
        );
        let sql = backend.numbered(&sql);
        let mut q = sqlx::query_as::<_, (String, String, String)>(&sql);
        for id in chunk {
            q = q.bind(*id);
        }
        parts.extend(q.fetch_all(&mut *conn).await?);
    }
    Ok(parts)
}

/// The processors whose delivery of request `request_id` is not accepted, through `db` (a
/// pool, or a snapshot's transaction), by name: as `(undelivered, never_asked)`, those whose
/// Deliver row is not done ([`Store::undelivered`]) and those whose row a cancellation
/// withdrew ([`PackageRecord::never_asked`]).
async fn read_unaccepted<'e>(
    db: impl sqlx::Executor<'e, Database = sqlx::Any>,
    request_id: &str,
) -> Result<(Vec<String>, Vec<String>)> {
    // A withdrawn row is done too: its `withdrawn_at` is what tells it from an accepted one.
    let rows: Vec<(String, Option<i64>)> = sqlx::query_as(
        "SELECT processor, withdrawn_at FROM deliveries WHERE request_id = $1 AND op = $2 \
         AND (done_at IS NULL OR withdrawn_at IS NOT NULL) ORDER BY processor",
    )
    .bind(request_id)
    .bind(Operation::Deliver.as_str())
    .fetch_all(db)
    .await?;
    let (withdrawn, undelivered): (Vec<_>, Vec<_>) =
        rows.into_iter().partition(|(_, at)| at.is_some());
    let names = |rows: Vec<(String, Option<i64>)>| rows.into_iter().map(|(p, _)| p).collect();
    Ok((names(undelivered), names(withdrawn)))
}

impl Store {
    /// The processors whose delivery of request `request_id` has not been accepted (its
    /// Deliver row is not done: waiting for a retry, or dead-lettered), by name. A Deliver's
    /// answer lists every task the processor made of the request, and is recorded in the
    /// transaction that marks the row done (withdrawn rows are done too, and not listed here: a
    /// cancelled request's processor that never got it makes no task, and
    /// [`PackageRecord::never_asked`] names it). Until then a processor's acknowledgements
    /// and parts may come in (its answer lost, say), and the tasks they name are not all of its
    /// tasks: a list of what is owed read before this is not final.
    pub async fn undelivered(&self, request_id: &str) -> Result<Vec<String>> {
        Ok(read_unaccepted(&self.db.reader, request_id).await?.0)
    }

    /// The parts stored for the requests `ids` (`parts_of`), read beside the writer.
    pub async fn parts_stored(&self, ids: &[&str]) -> Result<BTreeSet<(String, String, String)>> {
        let mut conn = self.db.reader.acquire().await?;
        parts_of(&mut conn, self.db.backend, ids).await
    }

    /// Whether `processor` may upload parts of request `request_id`, and its kind.
    pub async fn upload_target(&self, request_id: &str, processor: &str) -> Result<UploadTarget> {
        let kind: Option<i32> = sqlx::query_scalar("SELECT kind FROM requests WHERE id = $1")
            .bind(request_id)
            .fetch_optional(&self.db.pool)
            .await?;
        let Some(kind) = kind else {
            return Ok(UploadTarget::Unknown);
        };
        let routed = sqlx::query(
            "SELECT 1 AS one FROM deliveries WHERE request_id = $1 AND processor = $2 AND op = $3",
        )
        .bind(request_id)
        .bind(processor)
        .bind(Operation::Deliver.as_str())
        .fetch_optional(&self.db.pool)
        .await?
        .is_some();
        Ok(if routed {
            UploadTarget::Kind(kind)
        } else {
            UploadTarget::NotDelivered
        })
    }

    /// Whether `processor` has a task for `subprocessor` on request `request_id`: what its
    /// answer to the delivery or its acknowledgements told the registry.
    pub async fn task_exists(
        &self,
        request_id: &str,
        processor: &str,
        subprocessor: &str,
    ) -> Result<bool> {
        Ok(sqlx::query(
            "SELECT 1 AS one FROM tasks WHERE request_id = $1 AND processor = $2 \
             AND subprocessor = $3",
        )
        .bind(request_id)
        .bind(processor)
        .bind(subprocessor)
        .fetch_optional(&self.db.pool)
        .await?
        .is_some())
    }

    /// The names of the files of `f`'s part, other than `f`, that are streamed while they are
    /// written and not stored whole yet: registered with size 0 and no digest, their bytes
    /// so far counted only in the package store.
    pub async fn streaming_besides(&self, f: &PackageFile) -> Result<Vec<String>> {
        Ok(sqlx::query_scalar(
            "SELECT name FROM package_files WHERE request_id = $1 AND processor = $2 \
             AND subprocessor = $3 AND name <> $4 AND sha256 = '' AND stored_at IS NULL",
        )
        .bind(&f.request_id)
        .bind(&f.processor)
        .bind(&f.subprocessor)
        .bind(&f.name)
        .fetch_all(&self.db.reader)
        .await?)
    }

    /// The number of files of `f`'s part other than `f`, and the bytes their headers
    /// announce (0 for one streamed while written, until its end), through `db`.
    async fn part_besides<'e>(
        db: impl sqlx::Executor<'e, Database = sqlx::Any>,
        f: &PackageFile,
    ) -> Result<(u64, u64)> {
        let (files, bytes): (i64, i64) = sqlx::query_as(
            "SELECT CAST(COUNT(*) AS BIGINT), CAST(COALESCE(SUM(size), 0) AS BIGINT) \
             FROM package_files WHERE request_id = $1 AND processor = $2 \
             AND subprocessor = $3 AND name <> $4",
        )
        .bind(&f.request_id)
        .bind(&f.processor)
        .bind(&f.subprocessor)
        .bind(&f.name)
        .fetch_one(db)
        .await?;
        Ok((
            u64::try_from(files).unwrap_or(0),
            u64::try_from(bytes).unwrap_or(0),
        ))
    }

    /// The bytes the headers of `f`'s part announce besides `f` (0 for a file streamed while
    /// written, until its end: [`Store::streaming_besides`] names those).
    pub async fn announced_besides(&self, f: &PackageFile) -> Result<u64> {
        let (_, announced) = Self::part_besides(&self.db.reader, f).await?;
        Ok(announced)
    }

    /// Registers a file header (and the package, at its first file) within the caps of
    /// `limits`, so that a processor cannot fill the package folder before it declares a
    /// part (CompletePart checks the part's list, which comes last). A file new to its part,
    /// or registered again with another size, is refused when the part would pass them: at
    /// most `max_files_per_part` files, and `max_part_bytes` bytes, counting the sizes the
    /// headers announce whether their bytes came yet or not, and `streaming`, the bytes
    /// stored so far of the part's other files streamed while written (which the records do
    /// not hold: [`Store::streaming_besides`]). Counted under the package's lock, so
    /// registrations at the same moment do not pass the caps together.
    pub async fn begin_file(
        &self,
        f: &PackageFile,
        now: i64,
        limits: &PackagesConfig,
        streaming: u64,
    ) -> Result<FileBegin> {
        let mut tx = self.begin().await?;
        sqlx::query(
            "INSERT INTO packages (request_id, created_at) VALUES ($1, $2) ON CONFLICT DO NOTHING",
        )
        .bind(&f.request_id)
        .bind(now)
        .execute(tx.conn())
        .await?;
        // Locked, as CompletePart locks it: whether a stored file may still be replaced
        // depends on its part not being stored, so a completion of the part waits for this
        // registration, and this one for it.
        let expired: Option<i64> = sqlx::query_scalar(&format!(
            "SELECT expired_at FROM packages WHERE request_id = $1{}",
            tx.backend.lock_rows()
        ))
        .bind(&f.request_id)
        .fetch_one(tx.conn())
        .await?;
        if let Some(at) = expired {
            tx.rollback().await?;
            return Ok(FileBegin::Expired(at));
        }
        let existing: Option<FileWithCheckpoint> = sqlx::query_as(
            "SELECT request_id, processor, subprocessor, name, media_type, categories, size, \
             sha256, stored_at, checkpoint_bytes, checkpoint_state, generation \
             FROM package_files \
             WHERE request_id = $1 AND processor = $2 AND subprocessor = $3 AND name = $4",
        )
        .bind(&f.request_id)
        .bind(&f.processor)
        .bind(&f.subprocessor)
        .bind(&f.name)
        .fetch_optional(tx.conn())
        .await?;
        if let Some(old) = existing.as_ref().filter(|r| r.row.file().same_content(f)) {
            let outcome = FileBegin::Registered {
                complete: old.row.stored_at.is_some(),
                checkpoint: old.checkpoint(),
                generation: old.generation,
            };
            tx.commit().await?;
            return Ok(outcome);
        }
        // A stored part is closed: its files stay as they were declared (a package's
        // manifest, which a partner may have downloaded or a controller confirmed by digest,
        // does not change after), so only the same file again is taken.
        let part_stored = sqlx::query(
            "SELECT 1 AS one FROM package_parts WHERE request_id = $1 AND processor = $2 \
             AND subprocessor = $3",
        )
        .bind(&f.request_id)
        .bind(&f.processor)
        .bind(&f.subprocessor)
        .fetch_optional(tx.conn())
        .await?
        .is_some();
        if !part_stored {
            let (files, announced) = Self::part_besides(tx.conn(), f).await?;
            let bytes = announced
                .saturating_add(streaming)
                .saturating_add(u64::try_from(f.size).unwrap_or(0));
            let over = if existing.is_none() && files >= u64::from(limits.max_files_per_part) {
                Some(FileBegin::TooManyFiles)
            } else if bytes > limits.max_part_bytes {
                Some(FileBegin::TooManyBytes(bytes))
            } else {
                None
            };
            if let Some(over) = over {
                tx.rollback().await?;
                return Ok(over);
            }
        }
        let outcome = match existing {
            _ if part_stored => FileBegin::Conflict,
            None => {
                sqlx::query(
                    "INSERT INTO package_files (request_id, processor, subprocessor, name, \
                     media_type, categories, size, sha256) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
                )
                .bind(&f.request_id)
                .bind(&f.processor)
                .bind(&f.subprocessor)
                .bind(&f.name)
                .bind(&f.media_type)
                .bind(&f.categories)
                .bind(f.size)
                .bind(&f.sha256)
                .execute(tx.conn())
                .await?;
                FileBegin::Registered {
                    complete: false,
                    checkpoint: None,
                    generation: 0,
                }
            }
            Some(_) => {
                let generation: i64 = sqlx::query_scalar(
                    "UPDATE package_files SET media_type = $1, categories = $2, size = $3, \
                     sha256 = $4, stored_at = NULL, generation = generation + 1 \
                     WHERE request_id = $5 AND processor = $6 AND subprocessor = $7 \
                     AND name = $8 RETURNING generation",
                )
                .bind(&f.media_type)
                .bind(&f.categories)
                .bind(f.size)
                .bind(&f.sha256)
                .bind(&f.request_id)
                .bind(&f.processor)
                .bind(&f.subprocessor)
                .bind(&f.name)
                .fetch_one(tx.conn())
                .await?;
                FileBegin::Restarted { generation }
            }
        };
        tx.commit().await?;
        Ok(outcome)
    }

    /// Marks a file stored whole, its digest checked, if it is still registered under
    /// `generation`: false when it was restarted or dropped since (its bytes are another
    /// registration's). True when it was marked before.
    pub async fn file_stored(&self, f: &PackageFile, generation: i64, now: i64) -> Result<bool> {
        let current: Option<i64> = sqlx::query_scalar(
            "UPDATE package_files SET stored_at = COALESCE(stored_at, $1) WHERE \
             request_id = $2 AND processor = $3 AND subprocessor = $4 AND name = $5 \
             AND sha256 = $6 AND generation = $7 RETURNING generation",
        )
        .bind(now)
        .bind(&f.request_id)
        .bind(&f.processor)
        .bind(&f.subprocessor)
        .bind(&f.name)
        .bind(&f.sha256)
        .bind(generation)
        .fetch_optional(&self.db.pool)
        .await?;
        Ok(current.is_some())
    }

    /// Marks a file streamed while it was written (registered with size 0 and an empty
    /// SHA-256, standing for "not known yet") stored whole, with the size and digest its end
    /// gave and that were checked. False when that registration (`generation`) is gone:
    /// another upload of the file registered its header, or dropped its bytes, meanwhile.
    pub async fn file_streamed(&self, f: &PackageFile, generation: i64, now: i64) -> Result<bool> {
        let done = sqlx::query(
            "UPDATE package_files SET size = $1, sha256 = $2, stored_at = $3 WHERE \
             request_id = $4 AND processor = $5 AND subprocessor = $6 AND name = $7 \
             AND sha256 = '' AND stored_at IS NULL AND generation = $8",
        )
        .bind(f.size)
        .bind(&f.sha256)
        .bind(now)
        .bind(&f.request_id)
        .bind(&f.processor)
        .bind(&f.subprocessor)
        .bind(&f.name)
        .bind(generation)
        .execute(&self.db.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Records that the first `bytes` bytes of `f` are stored durably and that `midstate`
    /// is their SHA-256 midstate; only while `f` is registered under `generation` and not
    /// stored whole (a file restarted or dropped since holds other bytes): false otherwise.
    /// The caller syncs the bytes first: a checkpoint never counts a byte a crash could take
    /// back.
    pub async fn record_file_checkpoint(
        &self,
        f: &PackageFile,
        generation: i64,
        bytes: u64,
        midstate: &[u8],
    ) -> Result<bool> {
        let done = sqlx::query(
            "UPDATE package_files SET checkpoint_bytes = $1, checkpoint_state = $2 WHERE \
             request_id = $3 AND processor = $4 AND subprocessor = $5 AND name = $6 \
             AND generation = $7 AND stored_at IS NULL",
        )
        .bind(i64::try_from(bytes)?)
        .bind(midstate)
        .bind(&f.request_id)
        .bind(&f.processor)
        .bind(&f.subprocessor)
        .bind(&f.name)
        .bind(generation)
        .execute(&self.db.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// The generation `f` is registered under, if it is.
    pub async fn file_generation(&self, f: &PackageFile) -> Result<Option<i64>> {
        Ok(sqlx::query_scalar(
            "SELECT generation FROM package_files WHERE request_id = $1 AND processor = $2 \
             AND subprocessor = $3 AND name = $4",
        )
        .bind(&f.request_id)
        .bind(&f.processor)
        .bind(&f.subprocessor)
        .bind(&f.name)
        .fetch_optional(&self.db.pool)
        .await?)
    }

    /// Records that the bytes of `f` are about to be dropped, if `f` is still registered
    /// under `expected_generation`, not stored whole, and its part not stored: a new
    /// generation, no checkpoint, so that no stream registered before records anything for
    /// the bytes written after. The caller removes the bytes only on [`FileDrop::Dropped`]:
    /// otherwise they are another registration's (or a stored part's). The package row is
    /// locked, as [`Store::begin_file`] and [`Store::complete_part`] lock it, so that a
    /// restart or a completion of the part does not pass between the check and the bump.
    pub async fn file_dropped(
        &self,
        f: &PackageFile,
        expected_generation: i64,
    ) -> Result<FileDrop> {
        let mut tx = self.begin().await?;
        let expired: Option<Option<i64>> = sqlx::query_scalar(&format!(
            "SELECT expired_at FROM packages WHERE request_id = $1{}",
            tx.backend.lock_rows()
        ))
        .bind(&f.request_id)
        .fetch_optional(tx.conn())
        .await?;
        if let Some(Some(at)) = expired {
            tx.rollback().await?;
            return Ok(FileDrop::Expired(at));
        }
        let generation: Option<i64> = sqlx::query_scalar(
            "UPDATE package_files SET generation = generation + 1, checkpoint_bytes = NULL, \
             checkpoint_state = NULL WHERE request_id = $1 AND processor = $2 \
             AND subprocessor = $3 AND name = $4 AND generation = $5 AND stored_at IS NULL \
             AND NOT EXISTS (SELECT 1 FROM package_parts WHERE request_id = $6 \
             AND processor = $7 AND subprocessor = $8) RETURNING generation",
        )
        .bind(&f.request_id)
        .bind(&f.processor)
        .bind(&f.subprocessor)
        .bind(&f.name)
        .bind(expected_generation)
        .bind(&f.request_id)
        .bind(&f.processor)
        .bind(&f.subprocessor)
        .fetch_optional(tx.conn())
        .await?;
        tx.commit().await?;
        Ok(generation.map_or(FileDrop::Superseded, FileDrop::Dropped))
    }

    /// Forgets the checkpoint of `f`, whose bytes are about to be written anew from the
    /// first: one left from bytes since dropped would describe other bytes.
    pub async fn clear_file_checkpoint(&self, f: &PackageFile) -> Result<()> {
        sqlx::query(
            "UPDATE package_files SET checkpoint_bytes = NULL, checkpoint_state = NULL WHERE \
             request_id = $1 AND processor = $2 AND subprocessor = $3 AND name = $4 \
             AND checkpoint_bytes IS NOT NULL",
        )
        .bind(&f.request_id)
        .bind(&f.processor)
        .bind(&f.subprocessor)
        .bind(&f.name)
        .execute(&self.db.pool)
        .await?;
        Ok(())
    }

    /// Records a part complete when every file it lists is stored with the digest given,
    /// with a PART_STORED event; the same part again answers when it was stored. Files
    /// registered under the part but not listed in it (an earlier export's) are dropped:
    /// `remove_bytes` deletes each one's bytes before the transaction that deletes its row
    /// commits, so a crash in between leaves the row, and the retried completion drops it
    /// again, rather than bytes no row lists.
    pub async fn complete_part<F, Fut>(
        &self,
        request_id: &str,
        processor: &str,
        subprocessor: &str,
        files: &[PackageFile],
        now: i64,
        remove_bytes: F,
    ) -> Result<PartOutcome>
    where
        F: Fn(String) -> Fut,
        Fut: std::future::Future<Output = Result<()>>,
    {
        let mut tx = self.begin().await?;
        // Locked: the package's expiry (which deletes its files) and another completion of
        // the same part wait for this one, and this one for them.
        let expired: Option<Option<i64>> = sqlx::query_scalar(&format!(
            "SELECT expired_at FROM packages WHERE request_id = $1{}",
            tx.backend.lock_rows()
        ))
        .bind(request_id)
        .fetch_optional(tx.conn())
        .await?;
        if let Some(Some(at)) = expired {
            tx.rollback().await?;
            return Ok(PartOutcome::Expired(at));
        }
        let before: Option<i64> = sqlx::query_scalar(
            "SELECT stored_at FROM package_parts WHERE request_id = $1 AND processor = $2 \
             AND subprocessor = $3",
        )
        .bind(request_id)
        .bind(processor)
        .bind(subprocessor)
        .fetch_optional(tx.conn())
        .await?;
        let stored: Vec<FileWithState> = sqlx::query_as(
            "SELECT request_id, processor, subprocessor, name, media_type, categories, size, \
             sha256, stored_at FROM package_files WHERE request_id = $1 AND processor = $2 \
             AND subprocessor = $3",
        )
        .bind(request_id)
        .bind(processor)
        .bind(subprocessor)
        .fetch_all(tx.conn())
        .await?;
        if let Some(stored_at) = before {
            tx.rollback().await?;
            // The same declaration again (a lost answer) is answered as the first; another
            // one would change a closed part.
            let same = files.len() == stored.len()
                && files.iter().all(|f| {
                    stored
                        .iter()
                        .any(|s| s.name == f.name && s.file().same_content(f))
                });
            return Ok(if same {
                PartOutcome::Stored {
                    stored_at,
                    dropped: Vec::new(),
                }
            } else {
                PartOutcome::Closed(stored.into_iter().map(|s| s.name).collect())
            });
        }
        let missing: Vec<String> = files
            .iter()
            .filter(|f| {
                !stored
                    .iter()
                    .any(|s| s.stored_at.is_some() && s.file().same_content(f) && s.name == f.name)
            })
            .map(|f| f.name.clone())
            .collect();
        if !missing.is_empty() {
            tx.rollback().await?;
            return Ok(PartOutcome::Missing(missing));
        }
        let dropped: Vec<String> = stored
            .iter()
            .filter(|s| !files.iter().any(|f| f.name == s.name))
            .map(|s| s.name.clone())
            .collect();
        for name in &dropped {
            remove_bytes(name.clone()).await?;
            sqlx::query(
                "DELETE FROM package_files WHERE request_id = $1 AND processor = $2 \
                 AND subprocessor = $3 AND name = $4",
            )
            .bind(request_id)
            .bind(processor)
            .bind(subprocessor)
            .bind(name)
            .execute(tx.conn())
            .await?;
        }
        let bytes: i64 = files.iter().map(|f| f.size).sum();
        sqlx::query(
            "INSERT INTO package_parts (request_id, processor, subprocessor, files, bytes, \
             stored_at) VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(request_id)
        .bind(processor)
        .bind(subprocessor)
        .bind(files.len() as i64)
        .bind(bytes)
        .bind(now)
        .execute(tx.conn())
        .await?;
        let state = tx.current_state(request_id).await?;
        insert_event(
            &mut tx,
            request_id,
            EventType::PartStored,
            now,
            state,
            EventDetail {
                processor: processor.to_string(),
                subprocessor: subprocessor.to_string(),
                message: format!(
                    "part of {subprocessor} stored: {} file(s), {bytes} bytes",
                    files.len()
                ),
                ..Default::default()
            },
        )
        .await?;
        tx.commit().await?;
        Ok(PartOutcome::Stored {
            stored_at: now,
            dropped,
        })
    }

    /// When the package of `request_id` expired, if it did.
    pub async fn package_expired_at(&self, request_id: &str) -> Result<Option<i64>> {
        let at: Option<Option<i64>> =
            sqlx::query_scalar("SELECT expired_at FROM packages WHERE request_id = $1")
                .bind(request_id)
                .fetch_optional(&self.db.reader)
                .await?;
        Ok(at.flatten())
    }

    /// What the registry knows of a request's package, read from one snapshot of the store
    /// (one transaction, at REPEATABLE READ on PostgreSQL), so that its parts agree: read one
    /// statement after the other, a part stored in between could be counted stored (and so
    /// not missing) while its files were left out, and the package answered complete with a
    /// manifest that lacks them.
    pub async fn package(&self, request_id: &str) -> Result<PackageRecord> {
        self.package_between(request_id, |_| std::future::ready(()))
            .await
    }

    /// [`Store::package`], calling `between(n)` after its `n`th statement (from 1), so a
    /// test can commit a change between two of them and check that the later ones do not
    /// see it.
    async fn package_between<F, Fut>(
        &self,
        request_id: &str,
        mut between: F,
    ) -> Result<PackageRecord>
    where
        F: FnMut(usize) -> Fut,
        Fut: std::future::Future<Output = ()>,
    {
        let mut tx = self.snapshot().await?;
        // Its deliveries with its tasks: a delivery's acceptance commits with the tasks its
        // answer lists (and so does a withdrawn one's, which stops being withdrawn), so a
        // processor in neither list has all of its tasks below.
        let (undelivered, never_asked) = read_unaccepted(&mut *tx, request_id).await?;
        between(1).await;
        let dates: Option<(i64, Option<i64>)> =
            sqlx::query_as("SELECT created_at, expired_at FROM packages WHERE request_id = $1")
                .bind(request_id)
                .fetch_optional(&mut *tx)
                .await?;
        between(2).await;
        let (finished_at, expiry_from): (Option<i64>, Option<i64>) = sqlx::query_as(
            "SELECT r.finished_at, COALESCE(r.finished_at, c.updated_at) FROM requests r \
             LEFT JOIN contracts c ON c.request_id = r.id AND c.return_confirmed = 1 \
             WHERE r.id = $1",
        )
        .bind(request_id)
        .fetch_optional(&mut *tx)
        .await?
        .unwrap_or_default();
        between(3).await;
        let files: Vec<PackageFile> = sqlx::query_as(
            "SELECT f.request_id, f.processor, f.subprocessor, f.name, f.media_type, \
             f.categories, f.size, f.sha256 FROM package_files f JOIN package_parts p \
             ON p.request_id = f.request_id AND p.processor = f.processor \
             AND p.subprocessor = f.subprocessor \
             WHERE f.request_id = $1 AND f.stored_at IS NOT NULL",
        )
        .bind(request_id)
        .fetch_all(&mut *tx)
        .await?;
        between(4).await;
        let open: Vec<(String, String, i32)> = sqlx::query_as(
            "SELECT t.processor, t.subprocessor, t.state FROM tasks t WHERE t.request_id = $1 \
             AND NOT EXISTS (SELECT 1 FROM package_parts p WHERE p.request_id = t.request_id \
             AND p.processor = t.processor AND p.subprocessor = t.subprocessor) \
             ORDER BY t.processor, t.subprocessor",
        )
        .bind(request_id)
        .fetch_all(&mut *tx)
        .await?;
        between(5).await;
        let parts: i64 = sqlx::query_scalar(
            "SELECT CAST(COUNT(*) AS BIGINT) FROM package_parts WHERE request_id = $1",
        )
        .bind(request_id)
        .fetch_one(&mut *tx)
        .await?;
        tx.commit().await?;
        let mut missing = Vec::new();
        let mut unreturned = Vec::new();
        for (p, s, state) in open {
            match task_state(state) {
                TaskState::Pending | TaskState::InProgress | TaskState::WaitingForOperator => {
                    missing.push((p, s))
                }
                state @ (TaskState::Failed | TaskState::Refused | TaskState::Cancelled) => {
                    unreturned.push((p, s, state))
                }
                _ => {}
            }
        }
        Ok(PackageRecord {
            created_at: dates.map(|d| d.0),
            expired_at: dates.and_then(|d| d.1),
            finished_at,
            expiry_from,
            files,
            missing,
            unreturned,
            parts,
            undelivered,
            never_asked,
        })
    }

    /// Up to `limit` parts, as (request id, processor, subprocessor), that have files
    /// registered while their task ended CANCELLED without the part stored, in packages not
    /// expired: a cancelled task is never retried, so the part will never be declared and
    /// its files are in no manifest. What the package sweep deletes
    /// ([`Store::drop_cancelled_part`]); a deletion a crash cut short is found here again.
    pub async fn cancelled_parts(&self, limit: i64) -> Result<Vec<(String, String, String)>> {
        Ok(sqlx::query_as(
            "SELECT DISTINCT f.request_id, f.processor, f.subprocessor FROM package_files f \
             JOIN tasks t ON t.request_id = f.request_id AND t.processor = f.processor \
             AND t.subprocessor = f.subprocessor \
             JOIN packages p ON p.request_id = f.request_id \
             WHERE t.state = $1 AND p.expired_at IS NULL \
             AND NOT EXISTS (SELECT 1 FROM package_parts pp WHERE pp.request_id = f.request_id \
             AND pp.processor = f.processor AND pp.subprocessor = f.subprocessor) \
             ORDER BY f.request_id, f.processor, f.subprocessor LIMIT $2",
        )
        .bind(TaskState::Cancelled as i32)
        .bind(limit)
        .fetch_all(&self.db.reader)
        .await?)
    }

    /// Drops the files registered for a part whose task ended CANCELLED without the part
    /// stored ([`Store::cancelled_parts`]), and answers their names: none when the package
    /// expired (its expiry deletes them), the part was stored or the task is not CANCELLED.
    /// As [`Store::complete_part`] drops a file, `remove_bytes` deletes each one's bytes
    /// before the transaction that deletes its row commits, so a crash in between leaves the
    /// row for the next sweep rather than bytes no row lists. The package row is locked, as
    /// registrations and completions lock it.
    pub async fn drop_cancelled_part<F, Fut>(
        &self,
        request_id: &str,
        processor: &str,
        subprocessor: &str,
        remove_bytes: F,
    ) -> Result<Vec<String>>
    where
        F: Fn(String) -> Fut,
        Fut: std::future::Future<Output = Result<()>>,
    {
        let mut tx = self.begin().await?;
        let expired: Option<Option<i64>> = sqlx::query_scalar(&format!(
            "SELECT expired_at FROM packages WHERE request_id = $1{}",
            tx.backend.lock_rows()
        ))
        .bind(request_id)
        .fetch_optional(tx.conn())
        .await?;
        if !matches!(expired, Some(None)) {
            tx.rollback().await?;
            return Ok(Vec::new());
        }
        let names: Vec<String> = sqlx::query_scalar(
            "SELECT f.name FROM package_files f JOIN tasks t ON t.request_id = f.request_id \
             AND t.processor = f.processor AND t.subprocessor = f.subprocessor \
             WHERE f.request_id = $1 AND f.processor = $2 AND f.subprocessor = $3 \
             AND t.state = $4 AND NOT EXISTS (SELECT 1 FROM package_parts pp \
             WHERE pp.request_id = f.request_id AND pp.processor = f.processor \
             AND pp.subprocessor = f.subprocessor) ORDER BY f.name",
        )
        .bind(request_id)
        .bind(processor)
        .bind(subprocessor)
        .bind(TaskState::Cancelled as i32)
        .fetch_all(tx.conn())
        .await?;
        for name in &names {
            remove_bytes(name.clone()).await?;
            sqlx::query(
                "DELETE FROM package_files WHERE request_id = $1 AND processor = $2 \
                 AND subprocessor = $3 AND name = $4",
            )
            .bind(request_id)
            .bind(processor)
            .bind(subprocessor)
            .bind(name)
            .execute(tx.conn())
            .await?;
        }
        tx.commit().await?;
        Ok(names)
    }

    /// Packages whose request finished at or before `cutoff` (ms), or whose contract end's
    /// return the controller confirmed by then, and whose expiry has not run to its end: not
    /// recorded expired yet, or recorded without the last deletion of their files recorded
    /// after it (a crash in between). A contract end whose holders retain data by law ends
    /// PARTIALLY_COMPLETED and finishes only when the last of it is erased, years on; the
    /// controller has its data from the confirmation, and a copy of all of it must not wait
    /// here that long.
    pub async fn packages_to_expire(&self, cutoff: i64, limit: i64) -> Result<Vec<String>> {
        Ok(sqlx::query_scalar(
            "SELECT p.request_id FROM packages p JOIN requests r ON r.id = p.request_id \
             LEFT JOIN contracts c ON c.request_id = p.request_id AND c.return_confirmed = 1 \
             WHERE p.files_removed_at IS NULL \
             AND COALESCE(r.finished_at, c.updated_at) <= $1 \
             ORDER BY COALESCE(r.finished_at, c.updated_at) LIMIT $2",
        )
        .bind(cutoff)
        .bind(limit)
        .fetch_all(&self.db.pool)
        .await?)
    }

    /// Records that the expiry's last deletion of `request_id`'s package files ran.
    pub async fn package_files_removed(&self, request_id: &str, now: i64) -> Result<()> {
        sqlx::query(
            "UPDATE packages SET files_removed_at = $1 WHERE request_id = $2 \
             AND expired_at IS NOT NULL",
        )
        .bind(now)
        .bind(request_id)
        .execute(&self.db.pool)
        .await?;
        Ok(())
    }

    /// Records a package deleted at expiry, with a PACKAGE_EXPIRED event (once: a package
    /// recorded expired already is left as it is).
    pub async fn package_expired(&self, request_id: &str, now: i64, message: &str) -> Result<()> {
        let mut tx = self.begin().await?;
        let changed = sqlx::query(
            "UPDATE packages SET expired_at = $1 WHERE request_id = $2 AND expired_at IS NULL",
        )
        .bind(now)
        .bind(request_id)
        .execute(tx.conn())
        .await?
        .rows_affected();
        if changed == 0 {
            return tx.rollback().await;
        }
        let state = tx.current_state(request_id).await?;
        insert_event(
            &mut tx,
            request_id,
            EventType::PackageExpired,
            now,
            state,
            EventDetail {
                actor: "registry".into(),
                message: message.to_string(),
                ..Default::default()
            },
        )
        .await?;
        tx.commit().await
    }
}

/// A file row and whether it is stored whole.
#[derive(sqlx::FromRow)]
struct FileWithState {
    request_id: String,
    processor: String,
    subprocessor: String,
    name: String,
    media_type: String,
    categories: String,
    size: i64,
    sha256: String,
    stored_at: Option<i64>,
}

/// A file row, whether it is stored whole, and its checkpoint's columns.
#[derive(sqlx::FromRow)]
struct FileWithCheckpoint {
    #[sqlx(flatten)]
    row: FileWithState,
    checkpoint_bytes: Option<i64>,
    checkpoint_state: Option<Vec<u8>>,
    generation: i64,
}

impl FileWithCheckpoint {
    /// The checkpoint recorded, if both its columns are set.
    fn checkpoint(&self) -> Option<(u64, Vec<u8>)> {
        match (self.checkpoint_bytes, &self.checkpoint_state) {
            (Some(bytes), Some(state)) => u64::try_from(bytes).ok().map(|b| (b, state.clone())),
            _ => None,
        }
    }
}

impl FileWithState {
    fn file(&self) -> PackageFile {
        PackageFile {
            request_id: self.request_id.clone(),
            processor: self.processor.clone(),
            subprocessor: self.subprocessor.clone(),
            name: self.name.clone(),
            media_type: self.media_type.clone(),
            categories: self.categories.clone(),
            size: self.size,
            sha256: self.sha256.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use dsrelay_proto::v1::RequestKind;
    use dsrelay_runtime::store::Db;

    use super::super::{TaskUpdate, POSTGRES_MIGRATIONS, SQLITE_MIGRATIONS};
    use super::*;

    async fn store(url: &str) -> Store {
        let db = Db::connect(url).await.expect("database");
        db.migrate(&SQLITE_MIGRATIONS, &POSTGRES_MIGRATIONS)
            .await
            .expect("migrations");
        Store::new(db, b"test key")
    }

    /// The one file of `subprocessor`'s part of request `id`, from processor `p1`.
    fn file(id: &str, subprocessor: &str) -> PackageFile {
        PackageFile {
            request_id: id.into(),
            processor: "p1".into(),
            subprocessor: subprocessor.into(),
            name: format!("{subprocessor}.json"),
            media_type: "application/json".into(),
            categories: "[\"contact\"]".into(),
            size: 3,
            sha256: "a".repeat(64),
        }
    }

    /// Registers `subprocessor`'s file of request `id` and marks it stored whole.
    async fn store_file(store: &Store, id: &str, subprocessor: &str) {
        let f = file(id, subprocessor);
        let begun = store
            .begin_file(&f, 10, &PackagesConfig::default(), 0)
            .await
            .expect("begin file");
        assert_eq!(
            begun,
            FileBegin::Registered {
                complete: false,
                checkpoint: None,
                generation: 0,
            }
        );
        assert!(store.file_stored(&f, 0, 11).await.expect("file stored"));
    }

    /// Completes `subprocessor`'s part of request `id`, its file stored before.
    async fn complete(store: &Store, id: &str, subprocessor: &str) {
        let outcome = store
            .complete_part(
                id,
                "p1",
                subprocessor,
                &[file(id, subprocessor)],
                12,
                |_| async { Ok(()) },
            )
            .await
            .expect("complete part");
        assert!(matches!(outcome, PartOutcome::Stored { .. }), "{outcome:?}");
    }

    /// A return of data to processor `p1` whose tasks `a` and `b` are open, `a`'s part
    /// stored and `b`'s file stored whole, its part not completed yet.
    async fn half_returned(store: &Store, id: &str) {
        store
            .insert_request(&super::super::NewRequest {
                id: id.into(),
                partner: "crm".into(),
                idempotency_key: format!("key-{id}"),
                body_hash: format!("hash-{id}"),
                body: b"{}".to_vec(),
                identity_hashes: "[\"h\"]".into(),
                kind: RequestKind::ReturnOfData as i32,
                received_at: 0,
                due_at: 1_000_000,
                trace_id: "0".repeat(32),
                traceparent: None,
                processors: vec!["p1".into()],
            })
            .await
            .expect("request");
        let open = |subprocessor: &str| TaskUpdate {
            request_id: id.into(),
            subprocessor: subprocessor.into(),
            sequence: 1,
            state: TaskState::InProgress as i32,
            ..Default::default()
        };
        let routed = BTreeSet::from([id.to_string()]);
        let outcome = store
            .apply_routed_acks("p1", &[open("a"), open("b")], routed, 5)
            .await
            .expect("tasks");
        assert_eq!(outcome.applied, 2);
        store_file(store, id, "a").await;
        complete(store, id, "a").await;
        store_file(store, id, "b").await;
    }

    /// `b`'s task of [`half_returned`] acknowledged CANCELLED, its part not declared.
    async fn cancel_b(store: &Store, id: &str) {
        let cancelled = TaskUpdate {
            request_id: id.into(),
            subprocessor: "b".into(),
            sequence: 2,
            state: TaskState::Cancelled as i32,
            ..Default::default()
        };
        let routed = BTreeSet::from([id.to_string()]);
        let outcome = store
            .apply_routed_acks("p1", &[cancelled], routed, 20)
            .await
            .expect("cancelled");
        assert_eq!(outcome.applied, 1);
    }

    /// A part whose task was cancelled is not returned, and the files streamed for it are
    /// deleted by the sweep, bytes before rows: a removal that fails leaves the rows for the
    /// next sweep. The stored part and its files stay.
    async fn a_cancelled_part_is_not_returned_and_its_files_go(url: &str) {
        let store = store(url).await;
        half_returned(&store, "r1").await;
        cancel_b(&store, "r1").await;
        let record = store.package("r1").await.expect("package");
        assert_eq!(
            record.unreturned,
            [("p1".to_string(), "b".to_string(), TaskState::Cancelled)]
        );
        assert!(record.missing.is_empty(), "{:?}", record.missing);
        let part = ("r1".to_string(), "p1".to_string(), "b".to_string());
        assert_eq!(
            store.cancelled_parts(100).await.expect("parts"),
            std::slice::from_ref(&part)
        );

        let failed = store
            .drop_cancelled_part("r1", "p1", "b", |_| async {
                anyhow::bail!("the disk is gone")
            })
            .await;
        assert!(failed.is_err());
        assert_eq!(store.cancelled_parts(100).await.expect("parts"), [part]);

        let dir = tempfile::tempdir().expect("tempdir");
        let packages = crate::packages::Packages::new(
            std::sync::Arc::new(crate::packages::FolderStore::new(dir.path())),
            30,
        );
        let on_disk = |subprocessor: &str| {
            dir.path()
                .join(crate::packages::file_key(&file("r1", subprocessor)))
        };
        for subprocessor in ["a", "b"] {
            let path = on_disk(subprocessor);
            std::fs::create_dir_all(path.parent().expect("a folder")).expect("folder");
            std::fs::write(&path, b"abc").expect("bytes");
        }
        let dropped = crate::packages::drop_cancelled_parts(&store, &packages)
            .await
            .expect("sweep");
        assert_eq!(dropped, 1);
        assert!(!on_disk("b").exists());
        assert!(on_disk("a").exists());
        assert!(store.cancelled_parts(100).await.expect("parts").is_empty());
        let again = crate::packages::drop_cancelled_parts(&store, &packages)
            .await
            .expect("sweep");
        assert_eq!(again, 0);
        let record = store.package("r1").await.expect("package");
        let names: Vec<&str> = record.files.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(names, ["a.json"]);
        assert_eq!(record.unreturned.len(), 1, "{:?}", record.unreturned);
    }

    #[tokio::test]
    async fn a_cancelled_part_is_not_returned_and_its_files_go_on_sqlite() {
        let dir = tempfile::tempdir().expect("tempdir");
        let url = format!("sqlite://{}/registry.db", dir.path().display());
        a_cancelled_part_is_not_returned_and_its_files_go(&url).await;
    }

    #[tokio::test]
    async fn a_cancelled_part_is_not_returned_and_its_files_go_on_postgres() {
        crate::test_postgres::on_postgres(|url, _| async move {
            a_cancelled_part_is_not_returned_and_its_files_go(&url).await;
        })
        .await;
    }

    /// `b`'s part completed between any two statements of the package's read: the package
    /// is read as it stood before, `b` missing with none of its files, never `b` counted
    /// stored (and so not missing) while its files are left out.
    async fn a_package_is_read_from_one_snapshot(url: &str) {
        let store = store(url).await;
        for step in 1..=5 {
            let id = format!("r{step}");
            half_returned(&store, &id).await;
            let record = store
                .package_between(&id, |n| {
                    let (store, id) = (store.clone(), id.clone());
                    async move {
                        if n == step {
                            complete(&store, &id, "b").await;
                        }
                    }
                })
                .await
                .expect("package");
            let subprocessors: Vec<&str> = record
                .files
                .iter()
                .map(|f| f.subprocessor.as_str())
                .collect();
            assert_eq!(subprocessors, ["a"], "completed after statement {step}");
            assert_eq!(
                record.missing,
                [("p1".to_string(), "b".to_string())],
                "completed after statement {step}"
            );
            assert_eq!(record.parts, 1, "completed after statement {step}");
            let after = store.package(&id).await.expect("package");
            assert_eq!(after.files.len(), 2, "{:?}", after.files);
            assert!(after.missing.is_empty(), "{:?}", after.missing);
            assert_eq!(after.parts, 2);
        }
    }

    #[tokio::test]
    async fn a_package_is_read_from_one_snapshot_on_sqlite() {
        let dir = tempfile::tempdir().expect("tempdir");
        let url = format!("sqlite://{}/registry.db", dir.path().display());
        a_package_is_read_from_one_snapshot(&url).await;
    }

    #[tokio::test]
    async fn a_package_is_read_from_one_snapshot_on_postgres() {
        crate::test_postgres::on_postgres(|url, _| async move {
            a_package_is_read_from_one_snapshot(&url).await;
        })
        .await;
    }
}
