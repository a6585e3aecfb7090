//! Each processor's last reported subprocessor list, or why asking for it failed, and why
//! the last status check of a request there failed.

use anyhow::Result;

use super::{ChainRow, Store};

/// What asking a processor for its subprocessors (ListSubprocessors) gave.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChainReport {
    /// It answered with this encoded SubprocessorList.
    Listed(Vec<u8>),
    /// Asking failed, for this reason; the last list it gave is kept.
    Unanswered(String),
}

impl Store {
    /// Records a processor's answer to ListSubprocessors (or why asking failed, keeping the
    /// last good answer).
    pub async fn record_chain(&self, processor: &str, report: ChainReport, now: i64) -> Result<()> {
        match report {
            ChainReport::Listed(list) => {
                sqlx::query(
                    "INSERT INTO processor_chain (processor, subprocessors, reported_at, \
                     last_error, checked_at) VALUES ($1, $2, $3, NULL, $3) \
                     ON CONFLICT (processor) DO UPDATE SET subprocessors = excluded.subprocessors, \
                     reported_at = excluded.reported_at, last_error = NULL, \
                     checked_at = excluded.checked_at",
                )
                .bind(processor)
                .bind(list)
                .bind(now)
                .execute(&self.db.pool)
                .await?;
            }
            ChainReport::Unanswered(error) => {
                sqlx::query(
                    "INSERT INTO processor_chain (processor, last_error, checked_at) \
                     VALUES ($1, $2, $3) ON CONFLICT (processor) DO UPDATE SET \
                     last_error = excluded.last_error, checked_at = excluded.checked_at",
                )
                .bind(processor)
                .bind(error)
                .bind(now)
                .execute(&self.db.pool)
                .await?;
            }
        }
        Ok(())
    }

    /// Records why a status check (GetStatus) of a quiet request at `processor` failed
    /// (`error`, in full), or with `None` that one answered, clearing what was kept: GetChain
    /// shows operators the last failure, which the reconciler's log line withholds.
    pub async fn record_status_check(
        &self,
        processor: &str,
        error: Option<&str>,
        now: i64,
    ) -> Result<()> {
        match error {
            Some(error) => {
                sqlx::query(
                    "INSERT INTO processor_chain (processor, status_error, status_error_at, \
                     checked_at) VALUES ($1, $2, $3, $3) ON CONFLICT (processor) DO UPDATE \
                     SET status_error = excluded.status_error, \
                     status_error_at = excluded.status_error_at",
                )
                .bind(processor)
                .bind(error)
                .bind(now)
                .execute(&self.db.pool)
                .await?;
            }
            None => {
                sqlx::query(
                    "UPDATE processor_chain SET status_error = NULL, status_error_at = NULL \
                     WHERE processor = $1 AND status_error IS NOT NULL",
                )
                .bind(processor)
                .execute(&self.db.pool)
                .await?;
            }
        }
        Ok(())
    }

    /// Why the last status check at `processor` failed, and when (ms), if the last one
    /// recorded ([`Store::record_status_check`]) did.
    pub async fn status_check_error(&self, processor: &str) -> Result<Option<(String, i64)>> {
        let row: Option<(Option<String>, Option<i64>)> = sqlx::query_as(
            "SELECT status_error, status_error_at FROM processor_chain WHERE processor = $1",
        )
        .bind(processor)
        .fetch_optional(&self.db.reader)
        .await?;
        Ok(match row {
            Some((Some(error), Some(at))) => Some((error, at)),
            _ => None,
        })
    }

    /// The last reported chain entry of a processor.
    pub async fn chain(&self, processor: &str) -> Result<ChainRow> {
        let row: Option<ChainRow> = sqlx::query_as(
            "SELECT subprocessors, reported_at, last_error FROM processor_chain \
             WHERE processor = $1",
        )
        .bind(processor)
        .fetch_optional(&self.db.reader)
        .await?;
        Ok(row.unwrap_or_default())
    }
}
