//! Deletion certificates as received with acknowledgements, with the registry's verdict,
//! written in the acknowledgement's transaction together with their event.

use anyhow::Result;
use dsrelay_proto::v1::{EventType, RequestState};
use dsrelay_runtime::store::values_row;

use super::acknowledgements::TaskUpdate;
use super::events::{EventDetail, NewEvent};
use super::{Store, Tx};

/// A certificate as it arrived, and what checking it found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReceivedCertificate {
    /// The signed body, as sent.
    pub body: Vec<u8>,
    /// The signature, as sent.
    pub signature: Vec<u8>,
    /// The key id it names.
    pub key_id: String,
    /// The certificate's id, from the body (empty when unreadable).
    pub certificate_id: String,
    /// Whether it passed every check.
    pub verified: bool,
    /// Why it did not.
    pub rejection: String,
}

/// A stored certificate.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct CertificateRow {
    /// The processor that sent it.
    pub processor: String,
    /// The subprocessor of its task.
    pub subprocessor: String,
    /// The acknowledgement it came with.
    pub sequence: i64,
    /// Its id, from the body.
    pub certificate_id: String,
    /// The signed body.
    pub body: Vec<u8>,
    /// The signature.
    pub signature: Vec<u8>,
    /// The key id it names.
    pub key_id: String,
    /// 1 when verified.
    pub verified: i64,
    /// Why it was rejected.
    pub rejection: String,
}

/// Stores the certificates that came with acknowledgements, each `(processor, ack,
/// certificate)`, in one statement per [`rows_per_statement`] of them (a certificate already
/// stored for the same acknowledgement stays as it was).
///
/// [`rows_per_statement`]: dsrelay_runtime::store::Backend::rows_per_statement
pub(super) async fn record_all(
    tx: &mut Tx,
    received: &[(&str, &TaskUpdate, &ReceivedCertificate)],
    now: i64,
) -> Result<()> {
    const PARAMS: usize = 11;
    for chunk in received.chunks(tx.backend.rows_per_statement(PARAMS)) {
        let rows: Vec<String> = (0..chunk.len())
            .map(|r| values_row(PARAMS * r + 1..=PARAMS * r + PARAMS))
            .collect();
        let sql = format!(
            "INSERT INTO certificates (request_id, processor, subprocessor, sequence, \
             certificate_id, body, signature, key_id, verified, rejection, received_at) \
             VALUES {} ON CONFLICT DO NOTHING",
            rows.join(", ")
        );
        let sql = tx.backend.numbered(&sql);
        let mut q = sqlx::query(&sql);
        for (processor, ack, c) in chunk {
            q = q
                .bind(ack.request_id.as_str())
                .bind(*processor)
                .bind(ack.subprocessor.as_str())
                .bind(ack.sequence)
                .bind(c.certificate_id.as_str())
                .bind(c.body.clone())
                .bind(c.signature.clone())
                .bind(c.key_id.as_str())
                .bind(i64::from(c.verified))
                .bind(c.rejection.as_str())
                .bind(now);
        }
        q.execute(tx.conn()).await?;
    }
    Ok(())
}

/// The event that records whether the certificate `c` that came with `ack` was verified,
/// for the caller to write with its batch's events (its request state is left UNSPECIFIED
/// for the caller to set).
pub(super) fn recorded_event(
    processor: &str,
    ack: &TaskUpdate,
    c: &ReceivedCertificate,
    now: i64,
) -> NewEvent {
    let (event, message) = if c.verified {
        (
            EventType::CertificateStored,
            format!(
                "deletion certificate {} of {} verified and stored",
                c.certificate_id, ack.subprocessor
            ),
        )
    } else {
        (
            EventType::CertificateRejected,
            format!(
                "deletion certificate of {} rejected: {}",
                ack.subprocessor, c.rejection
            ),
        )
    };
    NewEvent {
        request_id: ack.request_id.clone(),
        event_type: event,
        at: now,
        request_state: RequestState::Unspecified,
        detail: EventDetail {
            processor: processor.to_string(),
            subprocessor: ack.subprocessor.clone(),
            task_state: ack.state,
            sequence: ack.sequence,
            message,
            ..Default::default()
        },
    }
}

impl Store {
    /// A request's certificates, oldest first; `processor` and `subprocessor` narrow them
    /// when not empty.
    pub async fn certificates(
        &self,
        request_id: &str,
        processor: &str,
        subprocessor: &str,
    ) -> Result<Vec<CertificateRow>> {
        Ok(sqlx::query_as(
            "SELECT processor, subprocessor, sequence, certificate_id, body, signature, key_id, \
             verified, rejection FROM certificates WHERE request_id = $1 \
             AND ($2 = '' OR processor = $2) AND ($3 = '' OR subprocessor = $3) ORDER BY id",
        )
        .bind(request_id)
        .bind(processor)
        .bind(subprocessor)
        .fetch_all(&self.db.reader)
        .await?)
    }
}
