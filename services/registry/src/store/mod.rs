//! The registry's durable state: requests, the delivery outbox, tasks, acknowledgements,
//! events and the audit trail (one hash-chained entry per event, see
//! [`dsrelay_runtime::audit`]). Every change that must be seen together is written in one
//! transaction.
//!
//! # Layout
//! - this module: the [`Store`] handle, the migrations, and `Tx`, a transaction that knows
//!   its [`Backend`] so every dialect decision goes through [`Backend`]'s methods.
//! - `rows`: row types as read from the tables, and [`Operation`] (what an outbox row asks).
//! - `intake`: inserting submitted requests with their outbox rows and first event.
//! - `outbox`: claiming deliveries, recording their success or failure, and finding quiet
//!   requests for reconciliation.
//! - `acknowledgements`: applying acknowledgement batches (concurrent Acknowledge calls
//!   share one transaction, a group commit) and reconciled task lists, and refolding a
//!   request's state through `crate::fold`.
//! - `requests`: cancelling a request and extending its due date.
//! - `contracts`: contract ends' terms, the operator's choice and confirmation, and the one
//!   `update` outbox row each change re-arms.
//! - `chain`: each processor's last reported subprocessor list.
//! - `certificates`: deletion certificates received with acknowledgements, and their
//!   verdicts.
//! - `events`: events and the audit-trail append.
//! - `failed`: what turned FAILED in a transaction, logged at WARN once it commits.
//! - `packages`: files and parts of return-of-data packages as stored, and their expiry.
//! - `forget`: removing a finished request's raw identities, body and free text after its
//!   dispute window.
//! - `queries`: reads for the API (a request, lists, tasks, deliveries, events, audit entries).
//!
//! # Concurrency
//! On PostgreSQL transactions run side by side: replicas share the database, and within one
//! the intake writer, the dispatcher's recorder, the reconciler and the API's handlers each
//! write. (Recording events takes no common lock: see [`dsrelay_runtime::audit::table`].) A
//! write that depends on what the transaction read is guarded by the database, never by
//! taking turns: the request row is locked first (`lock_states`, or `Tx::request_state` with
//! its lock) by every transaction that decides on a request's state and also changes its
//! deliveries or tasks, so all lock in the same order; several rows are locked in byte order
//! of their keys (`Backend::bytewise`, whatever the database's collation) and an
//! acknowledgement batch records its keys sorted, so two transactions never wait for each
//! other in a cycle; outbox rows are claimed with SKIP LOCKED and written back only while
//! their lease token still matches; idempotency keys and acknowledgement keys are unique,
//! and a lost race on one is retried. On SQLite the one writer connection holds every
//! transaction apart.

use std::collections::HashMap;
use std::sync::Arc;

use anyhow::Result;
use dsrelay_proto::v1::RequestState;
use dsrelay_runtime::signing::KeyRing;
use dsrelay_runtime::store::{placeholders, values_row, Backend, Db};
use sqlx::{Any, AnyConnection, Transaction};

mod acknowledgements;
mod certificates;
mod chain;
mod contracts;
mod events;
mod failed;
mod forget;
mod intake;
mod outbox;
mod packages;
mod queries;
mod requests;
mod routes;
mod rows;

pub use acknowledgements::{AckOutcome, RejectedAck, TaskUpdate};
pub use certificates::{CertificateRow, ReceivedCertificate};
pub use chain::ChainReport;
pub use contracts::{ContractChange, ContractRow};
pub use forget::ForgetPosition;
pub use intake::{Inserted, Intaken, NewContract, NewRequest};
pub use outbox::{DeadLetterCursor, DeadLetteredRow, FailureRecorded, RequeueOutcome};
pub use packages::{FileBegin, FileDrop, PackageFile, PackageRecord, PartOutcome, UploadTarget};
pub use queries::ListFilter;
pub use requests::CancelOutcome;
pub use rows::{
    ChainRow, ContractTerms, DeliveryJob, DeliveryRow, EventRow, Operation, RequestRow,
    UnknownOperation,
};

/// The migrations for each backend, embedded at build time.
pub static SQLITE_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");
/// See [`SQLITE_MIGRATIONS`].
pub static POSTGRES_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");

/// [`Operation::Deliver`] as stored, for SQL written outside the store (metrics).
pub const OP_DELIVER: &str = Operation::Deliver.as_str();
/// [`Operation::Cancel`] as stored, for SQL written outside the store (metrics).
pub const OP_CANCEL: &str = Operation::Cancel.as_str();
/// [`Operation::Update`] as stored, for SQL written outside the store (metrics).
pub const OP_UPDATE: &str = Operation::Update.as_str();
/// [`Operation::Extend`] as stored, for SQL written outside the store (metrics).
pub const OP_EXTEND: &str = Operation::Extend.as_str();

/// The registry store.
#[derive(Clone)]
pub struct Store {
    db: Db,
    /// The key of the keyed hashes that stand in the audit trail for free text (reasons,
    /// notes, errors): the registry's `identity_hash_key`.
    text_key: Arc<[u8]>,
    /// Acknowledge calls waiting to share a commit (`acknowledgements`).
    acks: Arc<acknowledgements::AckQueue>,
    /// Routes known without a read (`routes`).
    routes: Arc<routes::Routes>,
    /// The transfer recipients `[[recipients]]` lists, with the keys of those whose receipts
    /// must be signed (`acknowledgements::unproven_completions`).
    receipt_keys: Arc<ReceiptKeys>,
    /// The certificate identities of the processors `[[processors]]` lists, which the
    /// receipts in their answers must name as sender (`acknowledgements::unproven_completions`).
    processor_identities: Arc<ProcessorIdentities>,
}

/// The transfer recipients the registry lists, by name, each with the keys it signs its
/// receipts with when `[[recipients]]` gives them. A store never told (a unit test's) checks
/// neither names nor signatures.
#[derive(Debug, Default)]
struct ReceiptKeys(Option<HashMap<String, Option<KeyRing>>>);

impl ReceiptKeys {
    /// The keys of `recipient`'s receipts, if it is listed with keys.
    fn of(&self, recipient: &str) -> Option<&KeyRing> {
        self.0.as_ref()?.get(recipient)?.as_ref()
    }

    /// Whether the registry was told its recipients and `recipient` is not among them.
    fn unlisted(&self, recipient: &str) -> bool {
        self.0.as_ref().is_some_and(|m| !m.contains_key(recipient))
    }
}

/// The certificate identity of each processor the registry lists, by name. A store never
/// told (a unit test's) checks no receipt's sender.
#[derive(Debug, Default)]
struct ProcessorIdentities(Option<HashMap<String, String>>);

impl ProcessorIdentities {
    /// Whether `receipt`, in `processor`'s answer, names a sender other than `processor`'s
    /// identity, by the rule Acknowledge applies too
    /// ([`dsrelay_runtime::transfer_receipt::names_other_sender`]): an empty one names none
    /// and passes; a processor the registry was told of no identity for may name none.
    fn other_sender(&self, processor: &str, receipt: &dsrelay_proto::v1::TransferReceipt) -> bool {
        let Some(identities) = &self.0 else {
            return false;
        };
        let identity = identities.get(processor).map(String::as_str);
        dsrelay_runtime::transfer_receipt::names_other_sender(receipt, identity)
    }
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        f.debug_struct("Store")
            .field("db", &self.db)
            .finish_non_exhaustive()
    }
}

impl Store {
    /// Wraps a migrated database; `text_key` keys the hashes that stand in the audit trail
    /// for free text (see the `events` module).
    pub fn new(db: Db, text_key: &[u8]) -> Self {
        Self {
            db,
            text_key: text_key.into(),
            acks: Arc::default(),
            routes: Arc::default(),
            receipt_keys: Arc::default(),
            processor_identities: Arc::default(),
        }
    }

    /// The store, taking receipts only of the recipients in `recipients` (by their names in
    /// `[[recipients]]`), and checking the signatures of those listed with keys.
    pub fn with_receipt_keys(self, recipients: HashMap<String, Option<KeyRing>>) -> Self {
        Self {
            receipt_keys: Arc::new(ReceiptKeys(Some(recipients))),
            ..self
        }
    }

    /// The store, taking in a processor's answer only receipts that name no sender or the
    /// certificate identity `identities` gives that processor (by its name in `[[processors]]`).
    pub fn with_processor_identities(self, identities: HashMap<String, String>) -> Self {
        Self {
            processor_identities: Arc::new(ProcessorIdentities(Some(identities))),
            ..self
        }
    }

    /// Why `receipt`, received at `received_at_ms` (the registry's clock), does not carry
    /// the signature of the recipient it names, when that recipient's keys are known
    /// ([`Store::with_receipt_keys`]); `None` when it does, or when no key is configured for
    /// it.
    pub fn receipt_signature_problem(
        &self,
        receipt: &dsrelay_proto::v1::TransferReceipt,
        received_at_ms: i64,
    ) -> Option<String> {
        signature_problem(&self.receipt_keys, receipt, received_at_ms)
    }

    /// Whether `recipient` is not among the recipients the store was given
    /// ([`Store::with_receipt_keys`]): nothing here could check its receipts.
    pub fn recipient_unlisted(&self, recipient: &str) -> bool {
        self.receipt_keys.unlisted(recipient)
    }

    /// The keys the recipient named `name` signs its receipts with, when configured, with
    /// their revocations ([`KeyRing::as_of`] gives those still in use at a time).
    pub fn receipt_keys(&self, name: &str) -> Option<&KeyRing> {
        self.receipt_keys.of(name)
    }

    /// The database handle.
    pub fn db(&self) -> &Db {
        &self.db
    }

    /// A transaction: what it records with events goes to the audit trail with it.
    async fn begin(&self) -> Result<Tx> {
        Ok(Tx {
            tx: self.db.pool.begin().await?,
            backend: self.db.backend,
            text_key: self.text_key.clone(),
            receipt_keys: self.receipt_keys.clone(),
            processor_identities: self.processor_identities.clone(),
            failed: Vec::new(),
        })
    }
}

/// [`Store::receipt_signature_problem`] under the recipients' keys `keys`: the check the
/// API makes of an acknowledgement's receipt and a transaction of a processor's answer's.
/// A key revoked at or before `received_at_ms` verifies nothing, whatever the receipt's
/// own `received_at` says (the key holder could write any).
fn signature_problem(
    keys: &ReceiptKeys,
    receipt: &dsrelay_proto::v1::TransferReceipt,
    received_at_ms: i64,
) -> Option<String> {
    let keys = keys.of(&receipt.recipient)?;
    if let Some(e) = keys.revoked_error(&receipt.key_id, received_at_ms) {
        return Some(format!("is {e}"));
    }
    dsrelay_runtime::transfer_receipt::verify(receipt, &keys.as_of(received_at_ms)).err()
}

/// A transaction and the backend it runs on, so that helpers given only the transaction can
/// still choose the dialect's text.
struct Tx {
    tx: Transaction<'static, Any>,
    backend: Backend,
    /// See [`Store`]'s field.
    text_key: Arc<[u8]>,
    /// See [`Store`]'s field.
    receipt_keys: Arc<ReceiptKeys>,
    /// See [`Store`]'s field.
    processor_identities: Arc<ProcessorIdentities>,
    /// What turned FAILED in it, logged once it commits (`failed`).
    failed: Vec<failed::Failed>,
}

impl Tx {
    /// The connection to run statements on.
    fn conn(&mut self) -> &mut AnyConnection {
        &mut self.tx
    }

    async fn commit(self) -> Result<()> {
        self.tx.commit().await?;
        failed::log(&self.failed, &self.text_key);
        Ok(())
    }

    async fn rollback(self) -> Result<()> {
        self.tx.rollback().await?;
        Ok(())
    }

    /// A request's state, or `None` if it does not exist. With `lock`, the request row stays
    /// locked until the transaction ends (PostgreSQL; SQLite has one writer).
    async fn request_state(&mut self, id: &str, lock: bool) -> Result<Option<RequestState>> {
        let lock = if lock { self.backend.lock_rows() } else { "" };
        let state: Option<i32> =
            sqlx::query_scalar(&format!("SELECT state FROM requests WHERE id = $1{lock}"))
                .bind(id)
                .fetch_optional(self.conn())
                .await?;
        Ok(state.map(rows::request_state))
    }

    /// A request's state, `UNSPECIFIED` if it does not exist, for the events that record it.
    async fn current_state(&mut self, id: &str) -> Result<RequestState> {
        Ok(self
            .request_state(id, false)
            .await?
            .unwrap_or(RequestState::Unspecified))
    }
}
