//! Contract ends: all of one controller's rows, exported in one read or erased a batch of
//! top-level rows at a time.
//!
//! An erasure handles each matched (top-level) table with the tables found through it, in
//! batches of about [`BATCH_SUBJECTS`] of its rows (more where rows share a batch key, and
//! the last batch also takes the rows without one): ranges of a batch key, each range in one
//! transaction, children first, with the statements of a single erasure (the table's action
//! on the rows no obligation keeps, the kept rows stripped of what the obligation does not
//! need). A batch thus runs a few statements per table, whatever the number of subjects.
//! What is kept is assessed at the end with one aggregate per `retain` table.
//!
//! The export records the keys of the rows it returns, read in the transaction of its reads
//! ([`plan_record_returned`]; on a SQLite file copied into the table after the read); the erasure after the return refuses rows it did not record
//! and confines its statements to those it did ([`Scope::returned`]), see the module
//! documentation's "Contract ends".

use std::collections::{BTreeMap, BTreeSet};

use super::execute::{classify, classify_pooled, ExportJob, ReadTx};
use super::plan::{
    anonymize_pending, cascade_held_rows, cascade_paths, holds_parent_back, plan_cascaded_keys,
    plan_count_unhandled, plan_export, plan_record_marker, plan_record_returned,
    plan_table_erasure, quote, subject_filter, Batch, Binds, Cascade, ReturnedKeys, Scope,
    Statement,
};
use super::retention::{day_of, kept_until, parse_iso_date, DAY_MS};
use super::rules::{Action, Retention, TableRule};
use super::schema::KeyOrder;
use super::Scoped;
use crate::export::ExportSink;
use crate::{
    BulkJob, BulkOp, BulkProgress, ConnectorError, ErasedCount, Outcome, Phase, ProgressReporter,
};
use dsrelay_proto::v1::RequestKind;
use dsrelay_runtime::store::Backend;

/// Top-level rows (subjects) per batch of a bulk erasure: large enough that a batch's few
/// statements do real work, small enough that none holds the database for long.
pub(super) const BATCH_SUBJECTS: u64 = 10_000;

/// Recorded keys deleted per statement when a contract end that will not go on is discarded
/// ([`Scoped::discard_returned`]).
pub(super) const DISCARD_BATCH: u64 = 10_000;

/// Rows exported between two progress reports.
const EXPORT_REPORT_EVERY: u64 = 1_000;

/// What a `retain` table keeps of the controller's rows after an erasure, read in SQL.
#[derive(Debug, sqlx::FromRow)]
struct KeptRows {
    /// The earliest date among rows kept by their period.
    first_kept: Option<String>,
    /// The latest date among rows kept by their period.
    last_kept: Option<String>,
    /// Rows kept by their period.
    by_date: i64,
    /// Rows past their period kept because `while` holds.
    by_condition: i64,
}

impl Scoped<'_> {
    /// All of the controller's rows, nobody's identities.
    fn everything(&self) -> Scope<'_> {
        Scope {
            subject: None,
            condition: self.condition,
            batch: None,
            types: Some(self.types),
            returned: None,
        }
    }

    /// Takes one step of a contract end over all of the controller's rows.
    pub(super) async fn bulk(
        &self,
        job: &BulkJob,
        batch_subjects: u64,
    ) -> Result<Outcome, ConnectorError> {
        match (&job.phase, job.op) {
            (Phase::Confirm { .. }, _) => Err(ConnectorError::Permanent(
                "the sql connector finishes its work in one run; there is nothing to confirm"
                    .into(),
            )),
            (Phase::RetentionExpired { .. }, BulkOp::Export) => Err(ConnectorError::Permanent(
                "only erasures keep data under retention, not exports".into(),
            )),
            (Phase::Start, BulkOp::Export) => self.bulk_export(job).await,
            (Phase::Start | Phase::RetentionExpired { .. }, BulkOp::Erase) => {
                if !self
                    .config
                    .supports(dsrelay_proto::v1::RequestKind::ContractEnd)
                {
                    return Ok(Outcome::Refused {
                        reason: "the sql connector erases nothing here: every table is keep".into(),
                    });
                }
                self.bulk_erase(job, batch_subjects.max(1)).await
            }
        }
    }

    /// The statement counting the rows of `rule`'s table in `scope`, and what it is for.
    fn count_statement(&self, rule: &TableRule, scope: Scope<'_>) -> (String, Statement) {
        let mut b = Binds::default();
        let filter = subject_filter(self.config, rule, scope, &mut b).unwrap_or_default();
        let count = b.finish(format!(
            "SELECT CAST(COUNT(*) AS BIGINT) FROM {} WHERE {filter}",
            quote(&rule.table)
        ));
        (format!("counting the rows of {}", rule.table), count)
    }

    /// How many of the controller's rows `rule`'s table holds.
    async fn count_rows(
        &self,
        tx: &mut sqlx::Transaction<'static, sqlx::Any>,
        rule: &TableRule,
        scope: Scope<'_>,
    ) -> Result<u64, ConnectorError> {
        let (doing, count) = self.count_statement(rule, scope);
        Ok(u64::try_from(tx.count(&count, &doing).await?).unwrap_or(0))
    }

    /// The statements counting a job's totals: subjects are the rows of the top-level
    /// tables among `subjects`, records the rows of `records`.
    fn totals<'r>(
        &self,
        subjects: impl IntoIterator<Item = &'r TableRule>,
        records: &[&TableRule],
    ) -> Totals {
        let count = |rule: &TableRule| self.count_statement(rule, self.everything());
        Totals {
            subjects: (subjects.into_iter())
                .filter(|t| t.parent.is_none())
                .map(count)
                .collect(),
            records: records.iter().map(|rule| count(rule)).collect(),
        }
    }

    /// The statements counting what an erasure at `now_ms` has not handled yet
    /// ([`plan_count_unhandled`], with the rows it keeps as they are), as [`Self::totals`]
    /// counts every row: what a call resuming a cut-off one has left.
    fn unhandled_totals(&self, erased: &[&TableRule], now_ms: i64) -> Totals {
        let count = |rule: &TableRule| {
            let count = plan_count_unhandled(self.config, rule, self.everything(), now_ms, true);
            (
                format!("counting the rows of {} left to erase", rule.table),
                count,
            )
        };
        Totals {
            subjects: (self.config.tables.iter())
                .filter(|t| t.parent.is_none())
                .map(count)
                .collect(),
            records: erased.iter().map(|rule| count(rule)).collect(),
        }
    }

    /// The tables a contract end's export returns ([`returned_by_export`]), and the
    /// statements counting them as the export and the check of the erasure after a return
    /// both count them: subjects the rows of the returned top-level tables, records the rows
    /// of every returned table. A table the export does not return counts on neither side,
    /// so a row arriving there (an audit log's) never stops the erasure, which leaves it.
    fn returned_totals(&self) -> (Vec<&TableRule>, Totals) {
        let tables: Vec<&TableRule> = (self.config.tables.iter())
            .filter(|t| returned_by_export(t))
            .collect();
        let totals = self.totals(tables.iter().copied(), &tables);
        (tables, totals)
    }

    /// Writes every row of the controller in the tables with `export` columns, and in every
    /// table the erasure deletes or anonymizes, to `<table>.json` and `<table>.csv`, in one
    /// transaction with a cursor per table, which first records the keys of those rows when
    /// the connector erases. The erasure that follows a return removes
    /// what it returned, never more: a table without `export` columns that it erases is
    /// returned with all of its columns.
    async fn bulk_export(&self, job: &BulkJob) -> Result<Outcome, ConnectorError> {
        let sink = job.export.as_ref().ok_or_else(|| {
            ConnectorError::Permanent("no export folder was given for a contract end".into())
        })?;
        let (tables, totals) = self.returned_totals();
        // The export's own copy of each rule: the job outlives this borrow of the rules.
        let mut exported = Vec::with_capacity(tables.len());
        for t in &tables {
            let mut rule = (*t).clone();
            if rule.export.is_empty() {
                rule.export = self.types.all_columns(&t.table).to_vec();
            }
            if rule.export.is_empty() {
                return Err(ConnectorError::Permanent(format!(
                    "{}: its columns were not read when the connector connected, so the \
                     contract end cannot return what its erasure removes",
                    t.table
                )));
            }
            let select = plan_export(self.config, &rule, self.everything());
            exported.push((rule, select));
        }
        // The keys of what the erasure after the return would take (only a connector that
        // erases has one), recorded anew: an export is run again whole. A table the erasure
        // touches whose rows have no key (a view) leaves the whole job to the totals check.
        let mut writes = Vec::new();
        let mut note = None;
        if self.config.supports(RequestKind::ContractEnd) {
            let erased: Vec<&TableRule> = (tables.iter().copied())
                .filter(|t| t.action != Action::Keep)
                .collect();
            let unkeyed: Vec<&str> = (erased.iter())
                .filter(|t| self.types.row_key(&t.table).is_none())
                .map(|t| t.table.as_str())
                .collect();
            if unkeyed.is_empty() {
                let keys_table = self.config.returned_table();
                super::receipt::ensure_returned_table(self.db, &keys_table).await?;
                let returned = ReturnedKeys {
                    table: &keys_table,
                    job: &job.job_id,
                    cascades: &[],
                };
                writes.push(self.forget_statement(returned));
                writes.push(plan_record_marker(returned));
                writes.extend((erased.iter()).filter_map(|t| {
                    plan_record_returned(self.config, t, self.everything(), returned)
                }));
            } else {
                note = Some(format!(
                    "the keys of the returned rows were not recorded: {} has no primary key \
                     and no rowid or ctid (a view?), so its rows cannot be told apart and the \
                     erasure after the return compares totals only",
                    unkeyed.join(", ")
                ));
            }
        }
        let export = BulkExport {
            // The counts read no export columns, so the configured rules serve.
            totals,
            tables: exported,
            progress: job.progress.clone(),
            note,
        };
        self.read_export(sink, writes, export).await
    }

    /// Deletes the keys recorded under `returned`'s job.
    fn forget_statement(&self, returned: ReturnedKeys<'_>) -> Statement {
        let mut b = Binds::default();
        let job = b.add(returned.job);
        b.finish(format!(
            "DELETE FROM {} WHERE job = {job}",
            quote(returned.table)
        ))
    }

    /// The export whose recorded keys the erasure `job` follows: its job id, when `job` is
    /// the erasure after a return (its id is the export's plus `#erase`) and the export
    /// recorded keys. Looked up only at a first call that has the return's counts, or at a
    /// call resuming an erasure that recorded progress: a DELETE's erasure (the first call
    /// of which has no counts and no progress) pays nothing for it.
    async fn recorded_export<'j>(
        &self,
        job: &'j BulkJob,
        keys_table: &str,
    ) -> Result<Option<&'j str>, ConnectorError> {
        let Some(export) = job.job_id.strip_suffix("#erase") else {
            return Ok(None);
        };
        let resumed = job.recorded_progress != BulkProgress::default();
        if job.phase != Phase::Start || (job.returned.is_none() && !resumed) {
            return Ok(None);
        }
        let probe = format!(
            "SELECT CAST(COUNT(*) AS BIGINT) FROM (SELECT 1 FROM {} WHERE job = $1 LIMIT 1) \
             AS recorded",
            quote(keys_table)
        );
        let doing = "looking up what the contract end's export returned";
        let found: i64 = match sqlx::query_scalar(&probe)
            .bind(export)
            .fetch_one(&self.db.pool)
            .await
        {
            Ok(found) => found,
            Err(e) if matches!(e, sqlx::Error::PoolTimedOut) => {
                // No connection to ask about the table with either.
                return Err(classify_pooled(&self.db.pool, doing, &e).await);
            }
            Err(e) => {
                // The table is created by the first contract end's export: none has run.
                let exists: i64 = match sqlx::query_scalar(self.db.backend.table_exists())
                    .bind(keys_table)
                    .fetch_one(&self.db.pool)
                    .await
                {
                    Ok(exists) => exists,
                    Err(e) => return Err(classify_pooled(&self.db.pool, doing, &e).await),
                };
                if exists == 0 {
                    return Ok(None);
                }
                return Err(classify_pooled(&self.db.pool, doing, &e).await);
            }
        };
        Ok((found > 0).then_some(export))
    }

    /// Deletes what the contract end whose export ran under `export_job` recorded in the
    /// table of returned keys (its mark and the keys of its rows), at most `batch` rows per
    /// statement, each its own transaction, so that the table's writers are held off briefly
    /// however many rows were recorded (400,000 in one contract end); answers how many went.
    /// A table never created (no contract end's export ran here) holds nothing to delete.
    pub(super) async fn discard_returned(
        &self,
        export_job: &str,
        batch: u64,
    ) -> Result<u64, ConnectorError> {
        let table = self.config.returned_table();
        let delete = format!(
            "DELETE FROM {t} WHERE job = $1 AND (tbl, k) IN \
             (SELECT tbl, k FROM {t} WHERE job = $1 LIMIT $2)",
            t = quote(&table)
        );
        let batch = batch.max(1);
        let doing = "discarding what a contract end's export recorded as returned";
        let mut deleted = 0;
        loop {
            let done = match sqlx::query(&delete)
                .bind(export_job)
                .bind(i64::try_from(batch).unwrap_or(i64::MAX))
                .execute(&self.db.pool)
                .await
            {
                Ok(done) => done.rows_affected(),
                Err(e) if matches!(e, sqlx::Error::PoolTimedOut) => {
                    return Err(classify_pooled(&self.db.pool, doing, &e).await);
                }
                Err(e) => {
                    let exists: i64 = match sqlx::query_scalar(self.db.backend.table_exists())
                        .bind(&table)
                        .fetch_one(&self.db.pool)
                        .await
                    {
                        Ok(exists) => exists,
                        Err(e) => return Err(classify_pooled(&self.db.pool, doing, &e).await),
                    };
                    if exists == 0 {
                        return Ok(deleted);
                    }
                    return Err(classify_pooled(&self.db.pool, doing, &e).await);
                }
            };
            deleted += done;
            if done < batch {
                return Ok(deleted);
            }
        }
    }

    /// Erases every row of the controller that no obligation keeps, a batch of top-level
    /// rows per transaction; then reports what is kept and until when. After a return whose
    /// export recorded its rows, only those, and each batch deletes the keys of the rows it
    /// deletes ([`super::plan::ErasureWork::returns_keys`]).
    async fn bulk_erase(
        &self,
        job: &BulkJob,
        batch_subjects: u64,
    ) -> Result<Outcome, ConnectorError> {
        let keys_table = self.config.returned_table();
        let Some(export) = self.recorded_export(job, &keys_table).await? else {
            return self.erase_batches(job, batch_subjects, None).await;
        };
        let returned = ReturnedKeys {
            table: &keys_table,
            job: export,
            cascades: &[],
        };
        self.erase_batches(job, batch_subjects, Some(returned))
            .await
    }

    /// [`Self::bulk_erase`], confined to the rows `returned` records when given.
    async fn erase_batches(
        &self,
        job: &BulkJob,
        batch_subjects: u64,
        returned: Option<ReturnedKeys<'_>>,
    ) -> Result<Outcome, ConnectorError> {
        let erased_tables: Vec<&TableRule> = self
            .config
            .tables
            .iter()
            .filter(|t| t.action != Action::Keep)
            .collect();
        // Outside a transaction: SQLite's pool may have one connection.
        let cascades = match returned {
            Some(_) => self.cascades().await?,
            None => Vec::new(),
        };
        let returned = returned.map(|r| ReturnedKeys {
            cascades: &cascades,
            ..r
        });
        let mut tx = self.begin().await?;
        match returned {
            Some(keys) if job.returned.is_some() => {
                let arrived = self.unrecorded(&mut tx, keys, job.now_ms).await?;
                if !arrived.is_empty() {
                    return Err(self.arrived_before(&arrived, &job.controller));
                }
            }
            Some(_) => {}
            None => self.check_returned(&mut tx, job).await?,
        }
        // A call after an earlier one of this step (cut off, or failed) goes on from what that
        // call recorded, so that its reports, its count and a later resumption include it.
        let earlier = match job.phase {
            Phase::Start => job.recorded_progress.clone(),
            _ => BulkProgress::default(),
        };
        // Such a call counts only what is left to handle: the rows that call anonymized (or
        // kept and stripped) are still there, and its recorded done counts them already.
        let left = match earlier == BulkProgress::default() {
            true => self.totals(&self.config.tables, &erased_tables),
            false => self.unhandled_totals(&erased_tables, job.now_ms),
        };
        let left = left.count(&mut tx).await?;
        let mut progress = resumed(&earlier, &left);
        // As a subject's erasure refuses a subject with an undated row, before erasing
        // anything: without its date a row's retention cannot be known.
        for rule in &erased_tables {
            let Some(retain) = &rule.retain else {
                continue;
            };
            let undated: i64 = self
                .undated_query(rule, retain)
                .query_scalar()
                .fetch_one(&mut *tx)
                .await
                .map_err(|e| classify(&format!("reading the dates of {}", rule.table), &e))?;
            if undated > 0 {
                return Err(ConnectorError::Permanent(format!(
                    "{}: {undated} of the controller's rows have no date in {} (YYYY-MM-DD \
                     expected), so their retention cannot be computed; nothing was erased",
                    rule.table, retain.from_column
                )));
            }
        }
        tx.commit()
            .await
            .map_err(|e| classify("finishing the count", &e))?;
        // Recorded before a row goes: a call cut off before its first report was recorded
        // still leaves the totals the deletion began with, which a resumed call's count is
        // compared with; and, past the check of an erasure after a return, a retry or a
        // resumed call is not checked again against what this one erases.
        job.progress.record_now(progress.clone()).await?;

        // What this call erases: the processor adds what the earlier calls recorded by table
        // (`earlier.erased`, which this call's reports go on from) for the certificate.
        let mut counts: Vec<ErasedCount> = Vec::new();
        let mut notes = Vec::new();
        // The earlier call's records done are what its committed batches erased, anonymized
        // or kept and stripped: a batch reports only once committed, and its final report
        // (which counts kept rows as done) is made as it answers, so a call cut off never
        // recorded it. Its stripped rows are still held, so they are not among the rows it
        // erased (`records_affected`); a progress recorded before they were listed apart
        // cannot tell them from anonymized ones.
        let earlier_stripped: i64 = (earlier.erased.iter())
            .filter(|c| c.action == Action::KEPT_AND_STRIPPED)
            .map(|c| c.count)
            .fold(0, i64::saturating_add);
        let mut affected = i64::try_from(earlier.records_done)
            .unwrap_or(i64::MAX)
            .saturating_sub(earlier_stripped)
            .max(0);
        // Recorded without its counts by table (by a processor from before they were
        // recorded): listed as one entry, which the certificate's note explains.
        if earlier.records_done > 0 && earlier.erased.is_empty() {
            let tables: Vec<&str> = erased_tables.iter().map(|t| t.table.as_str()).collect();
            add_count(&mut counts, &tables.join(", "), EARLIER_CALL, affected);
        }
        for top in self.config.tables.iter().filter(|t| t.parent.is_none()) {
            let group: Vec<&TableRule> = self
                .config
                .children_first()
                .filter(|t| t.action != Action::Keep)
                .filter(|t| {
                    t.table == top.table || t.parent.as_ref().is_some_and(|p| p.table == top.table)
                })
                .collect();
            if group.is_empty() {
                continue;
            }
            let key = batch_key(self.config, top);
            // By the declared type: a value read to judge it may be of a type sqlx's Any
            // driver cannot decode (a UUID).
            let mut key_type = self.types.of(&top.table, &key);
            if self.holds_blobs(&top.table, &key).await? {
                key_type.key_order = KeyOrder::Hex;
            }
            let mut after: Option<String> = None;
            let mut batches = 0u64;
            loop {
                let mut batch = Batch {
                    table: top.table.clone(),
                    key: key.clone(),
                    after: after.clone(),
                    through: None,
                    key_type: key_type.clone(),
                };
                batch.through = self.batch_end(&batch, batch_subjects).await?;
                // The next batch would start after the same bound and end there again, for
                // ever: the key's text read back does not compare as the key does.
                if batch.through.is_some() && batch.through == batch.after {
                    return Err(ConnectorError::Permanent(format!(
                        "{t}: the contract end's batches do not move past a value of \
                         {t}.{key}: its text form does not compare as the values do, so \
                         the rows cannot be divided into batches; {batches} batch(es) ran \
                         before, the rest is untouched. Store the keys as text or integers",
                        t = top.table,
                    )));
                }
                let through = batch.through.clone();
                let scope = Scope {
                    batch: Some(&batch),
                    returned,
                    ..self.everything()
                };
                let mut tx = self.begin().await?;
                // The rows the batch takes, as the records are: those a cut-off call already
                // anonymized are in its recorded count, and those kept as they are in no
                // batch's but in the final report's.
                let taken = plan_count_unhandled(self.config, top, scope, job.now_ms, false);
                let doing = format!("counting the rows of {} the batch erases", top.table);
                let subjects = u64::try_from(tx.count(&taken, &doing).await?).unwrap_or(0);
                let mut records: u64 = 0;
                // Counted once the batch is committed, as its progress is.
                let mut batch_counts: Vec<ErasedCount> = Vec::new();
                for rule in &group {
                    let Some(work) = plan_table_erasure(self.config, rule, scope, job.now_ms)
                    else {
                        continue;
                    };
                    let table = rule.table.as_str();
                    let moves = work.moves_keys.as_ref().zip(returned);
                    let stripped = match &work.anonymize_kept {
                        Some(update) => {
                            let old = moves.and_then(|(m, keys)| m.kept.as_ref().zip(Some(keys)));
                            match old {
                                Some((old, keys)) => {
                                    update_moving(&mut tx, old, update, table, keys).await
                                }
                                None => run(&mut tx, update).await,
                            }
                            .map_err(|e| classify(&format!("anonymizing {table}"), &e))?
                        }
                        None => 0,
                    };
                    let cascaded = match work.deletes_where.as_ref().zip(returned) {
                        Some((deleted, _)) => {
                            self.cascaded_keys(&mut tx, deleted, table, &cascades)
                                .await?
                        }
                        None => Vec::new(),
                    };
                    let old = moves.and_then(|(m, keys)| m.main.as_ref().zip(Some(keys)));
                    let done = match (returned.filter(|_| work.returns_keys()), old) {
                        (_, Some((old, keys))) => {
                            update_moving(&mut tx, old, &work.main, table, keys).await
                        }
                        (Some(keys), None) => {
                            delete_forgetting(&mut tx, &work.main, table, keys).await
                        }
                        (None, None) => run(&mut tx, &work.main).await,
                    };
                    let done = done
                        .map_err(|e| classify(&format!("{} {table}", rule.action.doing()), &e))?;
                    for (child, keys) in cascaded {
                        let rows = i64::try_from(keys.len()).unwrap_or(i64::MAX);
                        if let Some(returned) = returned {
                            forget(&mut tx, keys, &child, returned).await.map_err(|e| {
                                let doing = format!(
                                    "forgetting the keys of the rows of {child} that deleting \
                                     from {table} deleted through ON DELETE CASCADE"
                                );
                                classify(&doing, &e)
                            })?;
                        }
                        add_count(&mut batch_counts, &child, Action::Delete.done(), rows);
                        affected = affected.saturating_add(rows);
                        records += u64::try_from(rows).unwrap_or(0);
                    }
                    add_count(&mut batch_counts, table, rule.action.done(), done);
                    if stripped > 0 {
                        add_count(
                            &mut batch_counts,
                            table,
                            Action::KEPT_AND_STRIPPED,
                            stripped,
                        );
                    }
                    // Stripped rows are handled (the progress counts them) but still held:
                    // they count as erased when a retention run deletes or anonymizes them.
                    affected = affected.saturating_add(done);
                    records += u64::try_from(done.saturating_add(stripped)).unwrap_or(0);
                }
                tx.commit()
                    .await
                    .map_err(|e| classify("committing a batch of the erasure", &e))?;
                batches += 1;
                for c in &batch_counts {
                    add_count(&mut counts, &c.target, &c.action, c.count);
                    add_count(&mut progress.erased, &c.target, &c.action, c.count);
                }
                progress = advanced(progress, subjects, records);
                job.progress.report(progress.clone());
                tracing::debug!(table = %top.table, batches, subjects, records, "sql bulk batch erased");
                match through {
                    Some(end) => after = Some(end),
                    None => break,
                }
            }
            notes.push(format!(
                "{} and the tables found through it: {batches} batch(es) of about \
                 {batch_subjects} rows",
                top.table
            ));
        }
        let done = counts
            .iter()
            .map(|c| format!("{}: {} {}", c.target, c.action, c.count))
            .collect::<Vec<_>>()
            .join(", ");
        let (arrived, cascaded) = match returned {
            Some(keys) => {
                self.arrived_meanwhile(&erased_tables, keys, job.now_ms)
                    .await?
            }
            None => (Vec::new(), Vec::new()),
        };
        notes.push(done.clone());
        // A resumed erasure needs no other care: it erases what a cut-off call left, and the
        // rows that call erased no longer match (those it anonymized or stripped, no
        // statement takes again), so it cannot fail or conclude wrongly on them. What that
        // call committed after its last recorded progress is in no count, which the
        // certificate must not pass off as everything: the processor marks it there, from
        // the totals (see `resumed`), and the note says it in words.
        notes.extend(earlier_note(job.interrupted, &earlier, &left));

        // What is kept, over all of the controller's rows now that the batches are done.
        let kept_from = notes.len();
        let mut tx = self.begin().await?;
        let mut bases: Vec<&str> = Vec::new();
        let mut next_release: Option<i64> = None;
        let mut kept_rows: i64 = 0;
        for rule in &erased_tables {
            let Some(retain) = &rule.retain else {
                continue;
            };
            let table = rule.table.as_str();
            let kept: KeptRows = self
                .kept_query(rule, retain, job.now_ms)
                .query_as()
                .fetch_one(&mut *tx)
                .await
                .map_err(|e| classify(&format!("reading the kept rows of {table}"), &e))?;
            if kept.by_date > 0 {
                let first = kept
                    .first_kept
                    .as_deref()
                    .and_then(parse_iso_date)
                    .ok_or_else(|| {
                        ConnectorError::Permanent(format!(
                            "{table}: a kept row has no date in {} (YYYY-MM-DD expected), so \
                             its retention cannot be computed",
                            retain.from_column
                        ))
                    })?;
                let at = retain.expires_at_ms(first);
                next_release = Some(next_release.map_or(at, |n| n.min(at)));
                if !bases.contains(&retain.basis.as_str()) {
                    bases.push(&retain.basis);
                }
                let last = kept.last_kept.as_deref().and_then(parse_iso_date);
                notes.push(format!(
                    "{table}: kept {}{}",
                    kept.by_date,
                    last.map(|d| kept_until(Some(retain.last_day(first)), retain.last_day(d)))
                        .unwrap_or_default()
                ));
            }
            if kept.by_condition > 0 {
                let at = job
                    .now_ms
                    .saturating_add(i64::from(retain.recheck_days) * DAY_MS);
                next_release = Some(next_release.map_or(at, |n| n.min(at)));
                let basis = retain.while_basis.as_deref().unwrap_or(&retain.basis);
                if !bases.contains(&basis) {
                    bases.push(basis);
                }
                notes.push(format!(
                    "{table}: kept {} while its retain condition holds, checked again on {}",
                    kept.by_condition,
                    day_of(at)
                ));
            }
            kept_rows += kept.by_date + kept.by_condition;
        }
        // Every row an obligation keeps is listed, as a subject's erasure lists them, so
        // that the certificate says so without the notes. Rows stripped by
        // this call or by the earlier one it goes on from are listed already (the processor
        // adds the earlier call's counts); the rest are kept as they are.
        let stripped: Vec<ErasedCount> = (earlier.erased.iter().chain(&counts))
            .filter(|c| c.action == Action::KEPT_AND_STRIPPED)
            .cloned()
            .collect();
        let stripped_by = |table: &str| {
            (stripped.iter())
                .filter(|c| c.target == table)
                .map(|c| c.count)
                .fold(0, i64::saturating_add)
        };
        for rule in self
            .config
            .children_first()
            .filter(|t| t.action != Action::Keep)
        {
            let table = rule.table.as_str();
            let count = plan_table_erasure(self.config, rule, self.everything(), job.now_ms)
                .and_then(|work| work.count_kept);
            let Some(count) = count else {
                continue;
            };
            let doing = format!("counting the kept rows of {table}");
            let whole = tx
                .count(&count, &doing)
                .await?
                .saturating_sub(stripped_by(table));
            if whole > 0 {
                add_count(&mut counts, table, Action::KEPT, whole);
            }
        }
        // `keep` tables are never erased: the controller's rows there stay, and the answer
        // and its certificate must say so rather than pass the erasure off as everything.
        for rule in self
            .config
            .tables
            .iter()
            .filter(|t| t.action == Action::Keep)
        {
            let rows = self.count_rows(&mut tx, rule, self.everything()).await?;
            if rows == 0 {
                continue;
            }
            let rows = i64::try_from(rows).unwrap_or(i64::MAX);
            add_count(&mut counts, &rule.table, Action::KEPT, rows);
            notes.push(format!(
                "{}: kept {rows} (action keep: the rules never erase this table)",
                rule.table
            ));
        }
        tx.commit()
            .await
            .map_err(|e| classify("finishing the erasure", &e))?;
        if !arrived.is_empty() || !cascaded.is_empty() {
            let kept = match notes[kept_from..].join("; ") {
                k if k.is_empty() => "nothing".to_string(),
                k => k,
            };
            let left = Left {
                arrived: &arrived,
                cascaded: &cascaded,
            };
            return Err(self.arrived_during(left, &job.controller, &done, &kept));
        }
        // Every row was handled: erased, or kept under an obligation.
        job.progress.report(finished(progress));
        let note = notes.join("; ");
        Ok(match next_release {
            Some(until_ms) if kept_rows > 0 => Outcome::Retained {
                legal_basis: bases.join("; "),
                until_ms,
                records_affected: affected,
                note,
                erased: counts,
            },
            _ => Outcome::Completed {
                records_affected: affected,
                note,
                files: Vec::new(),
                erased: counts,
            },
        })
    }

    /// Before a DELETE from `table` of the rows `deleted` selects, in its transaction: per
    /// erased table, the keys of the rows that its `ON DELETE CASCADE`s (`cascades`,
    /// directly or through other configured tables) take with them, which no statement of
    /// the erasure returns; the caller deletes them from what the export recorded after the
    /// DELETE, so that a row given one of those keys later does not read as returned. On
    /// PostgreSQL the rows to delete and those every chain reaches are locked first (FOR
    /// UPDATE, a chain before its longer ones): a row added under one of them meanwhile
    /// would hold it back ([`super::plan::ErasureWork::deletes_where`]) after the keys of
    /// the rows the chains reach were read, which would then be forgotten though the rows
    /// stay. Adding a row under a locked row waits for the lock (the foreign key's check
    /// locks its parent), and the keys are read after every lock is held, so the reads and
    /// the DELETE see the same rows under the locked ones. A row the DELETE takes that was
    /// held back when the rows were locked (its unrecorded row removed meanwhile) was not
    /// locked, and the keys of the rows its cascades take stay.
    async fn cascaded_keys(
        &self,
        tx: &mut sqlx::Transaction<'static, sqlx::Any>,
        deleted: &Statement,
        table: &str,
        cascades: &[Cascade],
    ) -> Result<Vec<(String, Vec<String>)>, ConnectorError> {
        let paths = cascade_paths(cascades, table);
        if paths.is_empty() {
            return Ok(Vec::new());
        }
        if self.db.backend == Backend::Postgres {
            let lock = Statement {
                sql: format!(
                    "SELECT 1 FROM {} WHERE {} FOR UPDATE",
                    quote(table),
                    deleted.sql
                ),
                binds: deleted.binds.clone(),
            };
            run(tx, &lock)
                .await
                .map_err(|e| classify(&format!("locking the rows to delete from {table}"), &e))?;
            // A `keep` table's rows too: a row of an erased table may be added under them.
            for path in &paths {
                let Some(rows) = plan_cascaded_keys(deleted, path, "1") else {
                    continue;
                };
                let lock = Statement {
                    sql: format!("{} FOR UPDATE", rows.sql),
                    binds: rows.binds,
                };
                run(tx, &lock).await.map_err(|e| {
                    let child = path.last().map_or(table, |c| c.child.as_str());
                    let doing = format!(
                        "locking the rows of {child} that deleting from {table} deletes \
                         through ON DELETE CASCADE"
                    );
                    classify(&doing, &e)
                })?;
            }
        }
        let mut cascaded: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for path in paths {
            let Some(child) = path.last().map(|c| c.child.as_str()) else {
                continue;
            };
            let erased =
                (self.config.tables.iter()).any(|t| t.table == child && t.action != Action::Keep);
            let Some(key) = self.types.row_key(child).filter(|_| erased) else {
                continue;
            };
            let Some(select) = plan_cascaded_keys(deleted, &path, key) else {
                continue;
            };
            let keys: Vec<Option<String>> = (select.query_scalar().fetch_all(&mut **tx).await)
                .map_err(|e| {
                    let doing = format!(
                        "reading the keys of the rows of {child} that deleting from {table} \
                         deletes through ON DELETE CASCADE"
                    );
                    classify(&doing, &e)
                })?;
            // A NULL key was never recorded. A row two chains reach is one row.
            (cascaded.entry(child.to_string()).or_default()).extend(keys.into_iter().flatten());
        }
        Ok((cascaded.into_iter())
            .filter(|(_, keys)| !keys.is_empty())
            .map(|(child, keys)| (child, keys.into_iter().collect()))
            .collect())
    }

    /// The foreign keys between two configured tables whose `ON DELETE CASCADE` deletes a
    /// child table's rows with its parent's, read from the database's catalog once per
    /// step of an erasure after a return ([`super::cascades::read`]). A foreign key of a
    /// table on itself is left out: its chain's statements would name the table twice,
    /// which they have no alias for. So such a cascade is not followed: the rows it takes
    /// go even if unrecorded, and their keys stay (the module documentation's Limits).
    async fn cascades(&self) -> Result<Vec<Cascade>, ConnectorError> {
        let doing = "reading the foreign keys of the configured tables";
        let all = match super::cascades::read(self.db).await {
            Ok(all) => all,
            Err(e) => return Err(classify_pooled(&self.db.pool, doing, &e).await),
        };
        Ok(super::cascades::between_configured(
            self.db.backend,
            self.config,
            all,
        ))
    }

    /// The last key of `batch`: the `size`-th key after its `after`, or `None` when at most
    /// `size` rows are left (the last batch, which also takes the rows without a key).
    async fn batch_end(&self, batch: &Batch, size: u64) -> Result<Option<String>, ConnectorError> {
        let keys: Vec<String> = match self
            .batch_end_query(batch, size)
            .query_scalar()
            .fetch_all(&self.db.pool)
            .await
        {
            Ok(keys) => keys,
            Err(e) => {
                let doing = format!("dividing {} into batches", batch.table);
                return Err(classify_pooled(&self.db.pool, &doing, &e).await);
            }
        };
        Ok((keys.len() == 2).then(|| keys[0].clone()))
    }

    /// Whether SQLite's `table` holds a BLOB in `key`, whose batches then compare it by its
    /// bytes' hex ([`KeyOrder::Hex`]). `>= X''` holds for blobs only, whatever the column's
    /// affinity (it converts text and numbers, never a blob), and an index on the key
    /// finds it. A PostgreSQL column holds one type.
    async fn holds_blobs(&self, table: &str, key: &str) -> Result<bool, ConnectorError> {
        if self.db.backend != Backend::Sqlite {
            return Ok(false);
        }
        let probe = format!(
            "SELECT CAST(COUNT(*) AS BIGINT) FROM (SELECT 1 FROM {t} WHERE {t}.{k} >= X'' \
             LIMIT 1)",
            t = quote(table),
            k = quote(key)
        );
        let found: i64 = match sqlx::query_scalar(&probe).fetch_one(&self.db.pool).await {
            Ok(found) => found,
            Err(e) => {
                let doing = format!("reading the keys of {table}");
                return Err(classify_pooled(&self.db.pool, &doing, &e).await);
            }
        };
        Ok(found > 0)
    }

    /// The query of [`Self::batch_end`]: it orders by the expression the batches compare.
    pub(super) fn batch_end_query(&self, batch: &Batch, size: u64) -> Statement {
        let key = batch.key_expr();
        // The bound as the batches read it back: a blob's hex is its key expression.
        let text = match batch.key_type.key_order {
            KeyOrder::Hex => key.clone(),
            _ => format!(
                "CAST({}.{} AS TEXT)",
                quote(&batch.table),
                quote(&batch.key)
            ),
        };
        let mut b = Binds::default();
        let mut terms = vec![format!("{key} IS NOT NULL")];
        if let Some(condition) = self.condition {
            terms.push(format!("({condition})"));
        }
        if let Some(after) = &batch.after {
            terms.push(format!("{key} > {}", batch.bound(after, &mut b)));
        }
        // Two keys: the batch's last, and whether another follows it. The numbers are
        // constants of the code, not request data. The key is ordered by its qualified
        // name: PostgreSQL reads a bare `ORDER BY "id"` as the selected text, which has the
        // column's name, and would order the batches as text while they compare as UUIDs.
        b.finish(format!(
            "SELECT {text} FROM {} WHERE {} ORDER BY {key} LIMIT 2 OFFSET {}",
            quote(&batch.table),
            terms.join(" AND "),
            size.saturating_sub(1)
        ))
    }

    /// Counts the controller's rows of `rule` whose date is missing or not `YYYY-MM-DD...`
    /// naming a day of the calendar (a month of 01–12, a day the month has, 29 February
    /// only in a leap year), by text comparisons only, as PostgreSQL may evaluate a cast of
    /// a malformed year before the checks that exclude it. Rows it lets through are the ones
    /// [`parse_iso_date`] reads, so the kept rows' dates read after the batches were
    /// committed cannot fail.
    ///
    /// The shape (four digits, a dash, a month's two digits, a dash, a day's two, no digit
    /// after) is one `GLOB` on SQLite, whose character ranges are by code point; on
    /// PostgreSQL, whose text comparisons follow the database's collation, it is a `SUBSTR`
    /// per character against the ASCII digits. On a million rows the `GLOB` took 0.5 s where
    /// the `SUBSTR`s took 1.2 s (of a contract end's 12 s). The calendar's exceptions are
    /// tested only for days 29 to 31.
    fn undated_query(&self, rule: &TableRule, retain: &Retention) -> Statement {
        let mut b = Binds::default();
        let filter =
            subject_filter(self.config, rule, self.everything(), &mut b).unwrap_or_default();
        let table = quote(&rule.table);
        let dated = format!("CAST({table}.{} AS TEXT)", quote(&retain.from_column));
        let shape = match self.db.backend {
            // Past the GLOB, month and day are two ASCII digits each, which compare as
            // bytes (SQLite's BINARY collation for a function's result).
            Backend::Sqlite => format!(
                "{dated} NOT GLOB '[0-9][0-9][0-9][0-9]-[01][0-9]-[0-3][0-9]*' \
                 OR {dated} GLOB '??????????[0-9]*' \
                 OR SUBSTR({dated}, 6, 2) NOT BETWEEN '01' AND '12' \
                 OR SUBSTR({dated}, 9, 2) NOT BETWEEN '01' AND '31'"
            ),
            Backend::Postgres => {
                let numbers = |from: u32, to: u32| {
                    (from..=to)
                        .map(|n| format!("'{n:02}'"))
                        .collect::<Vec<_>>()
                        .join(", ")
                };
                let digits = (0..=9)
                    .map(|n| format!("'{n}'"))
                    .collect::<Vec<_>>()
                    .join(", ");
                let year = (1..=4)
                    .map(|i| format!(" OR SUBSTR({dated}, {i}, 1) NOT IN ({digits})"))
                    .collect::<String>();
                format!(
                    "LENGTH({dated}) < 10 OR SUBSTR({dated}, 5, 1) <> '-' \
                     OR SUBSTR({dated}, 8, 1) <> '-'{year} \
                     OR SUBSTR({dated}, 6, 2) NOT IN ({months}) \
                     OR SUBSTR({dated}, 9, 2) NOT IN ({days}) \
                     OR SUBSTR({dated}, 11, 1) IN ({digits})",
                    months = numbers(1, 12),
                    days = numbers(1, 31),
                )
            }
        };
        b.finish(format!(
            "SELECT CAST(COUNT(*) AS BIGINT) FROM {table} WHERE {filter} AND ({dated} IS NULL \
             OR {shape} \
             OR (SUBSTR({dated}, 9, 2) IN ('29', '30', '31') AND ( \
               (SUBSTR({dated}, 9, 2) = '31' AND SUBSTR({dated}, 6, 2) IN ('02', '04', '06', '09', '11')) \
               OR (SUBSTR({dated}, 9, 2) = '30' AND SUBSTR({dated}, 6, 2) = '02') \
               OR (SUBSTR({dated}, 6, 5) = '02-29' AND NOT (SUBSTR({dated}, 3, 2) IN ({fourths}) \
                 OR (SUBSTR({dated}, 3, 2) = '00' AND SUBSTR({dated}, 1, 2) IN ({fourths}, '00')))))))",
            // The two-digit multiples of four but 00: a year ending in one is a leap year;
            // one ending in 00 is when its century is a multiple of four too.
            fourths = (1..=24)
                .map(|n| format!("'{:02}'", n * 4))
                .collect::<Vec<_>>()
                .join(", "),
        ))
    }

    /// Counts what `rule`'s `retain` keeps of the controller's rows at `now_ms`, by the same
    /// conditions as the erasure's statements.
    fn kept_query(&self, rule: &TableRule, retain: &Retention, now_ms: i64) -> Statement {
        let mut b = Binds::default();
        let filter =
            subject_filter(self.config, rule, self.everything(), &mut b).unwrap_or_default();
        let table = quote(&rule.table);
        let dated = format!("CAST({table}.{} AS TEXT)", quote(&retain.from_column));
        let by_date = format!("{dated} >= {}", b.add(retain.release_before(now_ms)));
        let held = retain
            .while_condition
            .as_deref()
            .map_or_else(|| "1 = 0".to_string(), |c| format!("({c})"));
        // A NULL date is not kept by date (as in the erasure's statements), but may be by
        // `while`: hence CASE rather than NOT.
        b.finish(format!(
            "SELECT MIN(CASE WHEN {by_date} THEN {dated} END) AS first_kept, \
             MAX(CASE WHEN {by_date} THEN {dated} END) AS last_kept, \
             CAST(COALESCE(SUM(CASE WHEN {by_date} THEN 1 ELSE 0 END), 0) AS BIGINT) AS by_date, \
             CAST(COALESCE(SUM(CASE WHEN {by_date} THEN 0 WHEN {held} THEN 1 ELSE 0 END), 0) \
             AS BIGINT) AS by_condition FROM {table} WHERE {filter}"
        ))
    }
}

impl Scoped<'_> {
    /// The check of an erasure that follows a return ([`BulkJob::returned`]) whose export
    /// recorded no keys ([`Self::unrecorded`] checks the others): the controller's rows now,
    /// counted by the export's own statements ([`Self::returned_totals`]: the returned
    /// tables, `keep` tables with `export` columns among them), against what the export
    /// wrote. A returned `keep` table's rows thus count on both sides: counted on the
    /// erasure's side alone, they would hide as many rows that arrived in an erased table.
    /// It compares totals only: it sees that more is held than was returned, not which rows
    /// arrived, so arrivals offset by as many deletions since the export (one customer
    /// erased, another signed up) pass it, and so do rows that arrive after it, while the
    /// batches run: the erasure removes those unreturned.
    async fn check_returned(
        &self,
        tx: &mut sqlx::Transaction<'static, sqlx::Any>,
        job: &BulkJob,
    ) -> Result<(), ConnectorError> {
        let Some(returned) = &job.returned else {
            return Ok(());
        };
        let (_, totals) = self.returned_totals();
        let held = totals.count(tx).await?;
        crate::check_returned(returned, &held, &self.returned_holder(), &job.controller)
    }
}

impl Scoped<'_> {
    /// The rows of each table the erasure deletes or anonymizes that the export did not
    /// record (an anonymized table's only while not yet anonymized, which its erasure would
    /// still take, but every one in a child that holds its parent back,
    /// [`holds_parent_back`]), and those of them a cascade would take with a row the erasure
    /// deletes ([`cascade_held_rows`]; not a row only the cascade reaches, which no export
    /// returns): those not among the rows it returned. A `keep` table is not looked at:
    /// nothing erases a row added there. Only tables with such rows.
    async fn unrecorded(
        &self,
        tx: &mut sqlx::Transaction<'static, sqlx::Any>,
        keys: ReturnedKeys<'_>,
        now_ms: i64,
    ) -> Result<Vec<Arrived>, ConnectorError> {
        let scope = Scope {
            returned: Some(keys),
            ..self.everything()
        };
        let mut arrived = Vec::new();
        for rule in self
            .config
            .tables
            .iter()
            .filter(|t| t.action != Action::Keep)
        {
            let mut b = Binds::default();
            let filter = subject_filter(self.config, rule, scope, &mut b).unwrap_or_default();
            let recorded = scope.recorded(&rule.table, &mut b).unwrap_or_default();
            let pending = match holds_parent_back(self.config, rule, scope) {
                true => None,
                false => anonymize_pending(rule, &mut b),
            };
            let pending = pending.map(|p| format!(" AND {p}")).unwrap_or_default();
            let own = format!("{filter} AND NOT ({recorded}){pending}");
            let rows = match cascade_held_rows(self.config, rule, scope, now_ms, true, &mut b) {
                None => own,
                Some(held) => format!("({own}) OR {held}"),
            };
            let count = b.finish(format!(
                "SELECT CAST(COUNT(*) AS BIGINT) FROM {} WHERE {rows}",
                quote(&rule.table)
            ));
            let doing = format!(
                "counting the rows of {} the export did not return",
                rule.table
            );
            let rows = u64::try_from(tx.count(&count, &doing).await?).unwrap_or(0);
            if rows > 0 {
                arrived.push(Arrived::new(rule, rows));
            }
        }
        Ok(arrived)
    }

    /// After the batches: the rows of each table the erasure handles that its statements
    /// would have taken but for their confinement to recorded rows (a row that was already
    /// anonymized, or that an obligation keeps as it is, is not one, but in a child not
    /// keyed by `ctid` every unrecorded row is, as it holds its parent back, and so is one
    /// of its rows that a cascade would have taken, [`cascade_held_rows`]): those that
    /// arrived while it ran. Apart from them, the unrecorded rows that a cascade would have
    /// taken though the table's own filter does not take them
    /// ([`super::plan::ErasureWork::cascaded_only`]), which held their parents back.
    async fn arrived_meanwhile(
        &self,
        erased_tables: &[&TableRule],
        keys: ReturnedKeys<'_>,
        now_ms: i64,
    ) -> Result<(Vec<Arrived>, Vec<Arrived>), ConnectorError> {
        let scope = Scope {
            returned: Some(keys),
            ..self.everything()
        };
        let (mut arrived, mut cascaded) = (Vec::new(), Vec::new());
        for rule in erased_tables {
            let Some(work) = plan_table_erasure(self.config, rule, scope, now_ms) else {
                continue;
            };
            let counts = [
                (work.unreturned, &mut arrived, "arrived in"),
                (
                    work.cascaded_only,
                    &mut cascaded,
                    "only a cascade reaches in",
                ),
            ];
            for (count, found, what) in counts {
                let Some(count) = count else {
                    continue;
                };
                let rows: i64 = match count.query_scalar().fetch_one(&self.db.pool).await {
                    Ok(rows) => rows,
                    Err(e) => {
                        let doing = format!("counting the rows that {what} {}", rule.table);
                        return Err(classify_pooled(&self.db.pool, &doing, &e).await);
                    }
                };
                let rows = u64::try_from(rows).unwrap_or(0);
                if rows > 0 {
                    found.push(Arrived::new(rule, rows));
                }
            }
        }
        Ok((arrived, cascaded))
    }

    /// The tables the export returns, as a message names the holder.
    fn returned_holder(&self) -> String {
        let names: Vec<&str> = (self.config.tables.iter())
            .filter(|t| returned_by_export(t))
            .map(|t| t.table.as_str())
            .collect();
        format!("sql tables {}", names.join(", "))
    }

    /// The refusal of an erasure after a return that finds rows the export did not record.
    fn arrived_before(&self, arrived: &[Arrived], controller: &str) -> ConnectorError {
        let (records, subjects, list) = Arrived::sum(arrived);
        ConnectorError::Permanent(format!(
            "{}: {records} record(s) ({subjects} subject(s)) of controller {controller} \
             are not among the rows the contract end's export returned (added, or updated in \
             a table keyed by ctid, or renumbered) ({list}); nothing was erased there. To \
             have them returned before they are deleted, the controller ends the contract \
             again with RETURN_THEN_DELETE; ending it with DELETE erases them without a \
             return",
            self.returned_holder()
        ))
    }

    /// The end of an erasure after a return that left rows which arrived while it ran, or
    /// rows only a cascade reaches, or both.
    fn arrived_during(
        &self,
        left: Left<'_>,
        controller: &str,
        done: &str,
        kept: &str,
    ) -> ConnectorError {
        let mut what = Vec::new();
        let mut remedies = Vec::new();
        if !left.arrived.is_empty() {
            let (records, subjects, list) = Arrived::sum(left.arrived);
            what.push(format!(
                "{records} record(s) ({subjects} subject(s)) of controller {controller} \
                 arrived while the contract end's erasure ran ({list}); they are still held, \
                 never returned, and the erasure left them as they are, with the rows they \
                 belong to"
            ));
            remedies.push(
                "To have the arrived records returned before they are deleted, the controller \
                 ends the contract again with RETURN_THEN_DELETE; ending it with DELETE erases \
                 them without a return",
            );
        }
        for rows in left.cascaded {
            what.push(format!(
                "{} row(s) of {t} belong to the subjects' rows only through ON DELETE CASCADE, \
                 which the return did not include, so the rows they hang from were kept; \
                 remove them by hand or end the contract with DELETE",
                rows.rows,
                t = rows.table
            ));
        }
        let remedies: String = remedies.iter().map(|r| format!(". {r}")).collect();
        ConnectorError::Permanent(format!(
            "{}: {}. Of the rest of what was returned it did: {done}; and kept: {kept}{remedies}",
            self.returned_holder(),
            what.join("; "),
        ))
    }
}

/// What an erasure after a return left that stops it: rows that arrived while it ran, and
/// rows only a cascade reaches (both per table).
struct Left<'a> {
    arrived: &'a [Arrived],
    cascaded: &'a [Arrived],
}

/// Rows of one table that the export after which an erasure runs did not record.
struct Arrived {
    table: String,
    rows: u64,
    /// A top-level table's: its rows are subjects.
    top_level: bool,
}

impl Arrived {
    fn new(rule: &TableRule, rows: u64) -> Self {
        Self {
            table: rule.table.clone(),
            rows,
            top_level: rule.parent.is_none(),
        }
    }

    /// The records, the subjects and the rows per table, as a message says them.
    fn sum(arrived: &[Self]) -> (u64, u64, String) {
        let records = arrived.iter().map(|a| a.rows).sum();
        let subjects = (arrived.iter().filter(|a| a.top_level))
            .map(|a| a.rows)
            .sum();
        let list = (arrived.iter())
            .map(|a| format!("{}: {}", a.table, a.rows))
            .collect::<Vec<_>>()
            .join(", ");
        (records, subjects, list)
    }
}

/// Whether a contract end's export returns `rule`'s table: it has `export` columns, or the
/// erasure deletes or anonymizes it. The one definition of the returned tables, which the
/// export and the check of the erasure after a return both use ([`Scoped::returned_totals`]).
fn returned_by_export(rule: &TableRule) -> bool {
    !rule.export.is_empty() || rule.action != Action::Keep
}

/// The column a top-level table's batches are ranges of: the column its children link to
/// (so a batch of parents is a batch of their children too), else a match column erasure
/// does not overwrite (so a row keeps its place), else any match column.
fn batch_key(config: &super::SqlConnectorConfig, top: &TableRule) -> String {
    config
        .tables
        .iter()
        .filter_map(|t| t.parent.as_ref())
        .find(|link| link.table == top.table)
        .map(|link| link.parent_column.clone())
        .or_else(|| {
            top.match_columns
                .values()
                .find(|c| !top.anonymize.contains_key(*c))
                .cloned()
        })
        .or_else(|| top.match_columns.values().next().cloned())
        .unwrap_or_default()
}

/// Runs `s`; the rows it changed.
async fn run(
    tx: &mut sqlx::Transaction<'static, sqlx::Any>,
    s: &Statement,
) -> Result<i64, sqlx::Error> {
    let done = s.query().execute(&mut **tx).await?;
    Ok(i64::try_from(done.rows_affected()).unwrap_or(i64::MAX))
}

/// How many keys one statement of [`delete_forgetting`] deletes: well below the bound
/// values either backend takes in one statement.
const FORGET_CHUNK: usize = 500;

/// Runs `delete`, which returns the key of each row it deletes
/// ([`super::plan::ErasureWork::returns_keys`]), and deletes those keys from what `returned`
/// records of `table`, in `tx`: the work is bounded by the rows of the batch. The count of
/// rows deleted.
async fn delete_forgetting(
    tx: &mut sqlx::Transaction<'static, sqlx::Any>,
    delete: &Statement,
    table: &str,
    returned: ReturnedKeys<'_>,
) -> Result<i64, sqlx::Error> {
    let keys: Vec<Option<String>> = delete.query_scalar().fetch_all(&mut **tx).await?;
    let done = i64::try_from(keys.len()).unwrap_or(i64::MAX);
    // A NULL key was never recorded.
    forget(tx, keys.into_iter().flatten().collect(), table, returned).await?;
    Ok(done)
}

/// Deletes `keys` from what `returned` records of `table`, in `tx`.
async fn forget(
    tx: &mut sqlx::Transaction<'static, sqlx::Any>,
    keys: Vec<String>,
    table: &str,
    returned: ReturnedKeys<'_>,
) -> Result<(), sqlx::Error> {
    let r = quote(returned.table);
    for chunk in keys.chunks(FORGET_CHUNK) {
        let mut b = Binds::default();
        let (job, tbl) = (b.add(returned.job), b.add(table));
        let list: Vec<String> = chunk.iter().map(|k| b.add(k.as_str())).collect();
        let forget = b.finish(format!(
            "DELETE FROM {r} WHERE job = {job} AND tbl = {tbl} AND k IN ({})",
            list.join(", ")
        ));
        forget.query().execute(&mut **tx).await?;
    }
    Ok(())
}

/// Runs `update`, which returns the new key of each row it moves, after `old`, which reads
/// (and locks) the keys of those rows ([`super::plan::ErasureWork::moves_keys`]), and
/// replaces the old keys with the new in what `returned` records of `table`, in `tx`. The
/// count of rows updated.
async fn update_moving(
    tx: &mut sqlx::Transaction<'static, sqlx::Any>,
    old: &Statement,
    update: &Statement,
    table: &str,
    returned: ReturnedKeys<'_>,
) -> Result<i64, sqlx::Error> {
    let old: Vec<Option<String>> = old.query_scalar().fetch_all(&mut **tx).await?;
    let new: Vec<Option<String>> = update.query_scalar().fetch_all(&mut **tx).await?;
    let done = i64::try_from(new.len()).unwrap_or(i64::MAX);
    forget(tx, old.into_iter().flatten().collect(), table, returned).await?;
    let new: Vec<String> = new.into_iter().flatten().collect();
    let r = quote(returned.table);
    for chunk in new.chunks(FORGET_CHUNK) {
        let mut b = Binds::default();
        let (job, tbl) = (b.add(returned.job), b.add(table));
        let rows: Vec<String> = (chunk.iter())
            .map(|k| format!("({job}, {tbl}, {})", b.add(k.as_str())))
            .collect();
        // A key recorded of a row removed another way may name a slot a row moved into.
        let record = b.finish(format!(
            "INSERT INTO {r} (job, tbl, k) VALUES {} ON CONFLICT DO NOTHING",
            rows.join(", ")
        ));
        record.query().execute(&mut **tx).await?;
    }
    Ok(done)
}

fn add_count(counts: &mut Vec<ErasedCount>, target: &str, action: &str, count: i64) {
    match counts
        .iter_mut()
        .find(|c| c.target == target && c.action == action)
    {
        Some(c) => c.count = c.count.saturating_add(count),
        None => counts.push(ErasedCount {
            target: target.to_string(),
            action: action.to_string(),
            count,
        }),
    }
}

/// The statements counting a bulk job's totals, each with what it is for.
struct Totals {
    /// Rows of the top-level tables.
    subjects: Vec<(String, Statement)>,
    /// Rows of the tables the job handles.
    records: Vec<(String, Statement)>,
}

impl Totals {
    /// The totals, counted through `tx`.
    async fn count(&self, tx: &mut impl ReadTx) -> Result<BulkProgress, ConnectorError> {
        let mut totals = BulkProgress::default();
        for (doing, count) in &self.subjects {
            totals.subjects_total += u64::try_from(tx.count(count, doing).await?).unwrap_or(0);
        }
        for (doing, count) in &self.records {
            totals.records_total += u64::try_from(tx.count(count, doing).await?).unwrap_or(0);
        }
        Ok(totals)
    }
}

/// A contract end's export: the totals its progress is measured against (records: rows of
/// the exported tables), then each exported table.
struct BulkExport {
    totals: Totals,
    tables: Vec<(TableRule, Option<Statement>)>,
    progress: ProgressReporter,
    /// Why the keys of the returned rows were not recorded, when they were not.
    note: Option<String>,
}

impl ExportJob for BulkExport {
    type Output = Outcome;

    async fn run(self, tx: &mut impl ReadTx, sink: &ExportSink) -> Result<Outcome, ConnectorError> {
        let mut progress = self.totals.count(tx).await?;
        self.progress.report(progress.clone());
        let mut files = Vec::new();
        let mut notes = Vec::new();
        let mut total: u64 = 0;
        let mut subjects_written: u64 = 0;
        for (rule, select) in &self.tables {
            let Some(select) = select else {
                continue;
            };
            let (base, top_level) = (&progress, rule.parent.is_none());
            let subjects = |n: u64| if top_level { n } else { 0 };
            let reporter = &self.progress;
            let (exported, written) = tx
                .rows(rule, select, sink, &mut |n| {
                    if n % EXPORT_REPORT_EVERY == 0 {
                        reporter.report(advanced(base.clone(), subjects(n), n));
                    }
                })
                .await?;
            progress = advanced(base.clone(), subjects(exported), exported);
            self.progress.report(progress.clone());
            files.extend(written);
            notes.push(format!("{}: exported {exported}", rule.table));
            total += exported;
            subjects_written += subjects(exported);
        }
        // Done is what was written, not what was counted: the erasure after a return is
        // checked against it ([`crate::BulkJob::returned`]). Both are read in one snapshot
        // ([`Scoped::read_export`]), so they agree; the totals grow to match should they not.
        self.progress.report(BulkProgress {
            subjects_done: subjects_written,
            subjects_total: progress.subjects_total.max(subjects_written),
            records_done: total,
            records_total: progress.records_total.max(total),
            erased: Vec::new(),
        });
        if self.tables.is_empty() {
            notes.push("no table has export columns".into());
        }
        notes.extend(self.note);
        Ok(Outcome::Completed {
            records_affected: i64::try_from(total).unwrap_or(i64::MAX),
            note: notes.join("; "),
            files,
            erased: Vec::new(),
        })
    }
}

/// `progress` moved on by `subjects` and `records`, never past the totals.
fn advanced(progress: BulkProgress, subjects: u64, records: u64) -> BulkProgress {
    BulkProgress {
        subjects_done: (progress.subjects_done + subjects).min(progress.subjects_total),
        records_done: (progress.records_done + records).min(progress.records_total),
        ..progress
    }
}

/// What [`ErasedCount::action`] says of the records an earlier call of the erasure erased
/// or anonymized as far as its progress was recorded (its tables are not told apart).
const EARLIER_CALL: &str = "erased or anonymized by an earlier call, as its progress recorded";

/// The progress of an erasure's call that goes on from `earlier`, the progress the processor
/// recorded of an earlier call of the step (all zero when there was none), with `left` the
/// totals counted now of what is left to handle ([`Scoped::unhandled_totals`]): what that
/// call recorded as done is done, and the totals are that plus what is left, never above
/// the ones it recorded (unless it recorded them unknown, 0), the ones the deletion began
/// with. Rows it erased after its last recorded progress are in neither, so the totals come
/// out below the ones it counted by as many (give or take rows others added or removed
/// meanwhile), which is how the processor tells that the count misses some.
fn resumed(earlier: &BulkProgress, left: &BulkProgress) -> BulkProgress {
    let total = |done: u64, recorded: u64, left: u64| {
        let total = done.saturating_add(left);
        match recorded {
            0 => total,
            recorded => total.min(recorded.max(done)),
        }
    };
    BulkProgress {
        subjects_done: earlier.subjects_done,
        subjects_total: total(
            earlier.subjects_done,
            earlier.subjects_total,
            left.subjects_total,
        ),
        records_done: earlier.records_done,
        records_total: total(
            earlier.records_done,
            earlier.records_total,
            left.records_total,
        ),
        erased: earlier.erased.clone(),
    }
}

/// The note on what an earlier call of the erasure did (`earlier`, its recorded progress;
/// `left`, the totals counted now), when there was one: whether it was cut off, what of it
/// is counted, and what its totals say the count misses.
fn earlier_note(interrupted: bool, earlier: &BulkProgress, left: &BulkProgress) -> Option<String> {
    let head = match interrupted {
        true => "an earlier call of this erasure was cut off before its answer was recorded",
        false => "an earlier call of this erasure failed",
    };
    if *earlier == BulkProgress::default() {
        return interrupted
            .then(|| format!("{head}, and recorded no progress: what it erased is not counted"));
    }
    let counted = match earlier.records_done {
        0 => "no progress of its erasure was recorded".to_string(),
        n => format!(
            "{n} record(s) of {} subject(s) it erased are counted, as far as its progress was \
             recorded",
            earlier.subjects_done
        ),
    };
    let missing = earlier
        .records_total
        .saturating_sub(resumed(earlier, left).records_total);
    Some(match missing {
        0 => format!("{head}; {counted}"),
        n => format!(
            "{head}; {counted}; {n} more record(s) are gone since it counted them, erased by it \
             after its last recorded progress or removed by others, and are not counted"
        ),
    })
}

/// A finished job's progress: everything counted at the start was handled.
fn finished(progress: BulkProgress) -> BulkProgress {
    BulkProgress {
        subjects_done: progress.subjects_total,
        records_done: progress.records_total,
        ..progress
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{bulk_job, now, run_bulk_watched, sample};
    use super::*;
    use crate::BulkOp;

    /// The records and the last progress of an outcome of a bulk erasure.
    fn affected(out: &Outcome) -> (i64, &str, &[ErasedCount]) {
        match out {
            Outcome::Completed {
                records_affected,
                note,
                erased,
                ..
            }
            | Outcome::Retained {
                records_affected,
                note,
                erased,
                ..
            } => (*records_affected, note, erased),
            other => panic!("expected an erasure, got {other:?}"),
        }
    }

    /// A call resumed after one cut off counts what that call recorded as done (in its
    /// records and its progress, so that one cut off in turn hands it on), says in its note
    /// how many more records its totals lost, and never counts more than was recorded.
    #[tokio::test]
    async fn a_resumed_erasure_counts_what_the_cut_off_call_recorded() {
        let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let url = |d: &tempfile::TempDir| format!("sqlite://{}/accounting.db", d.path().display());
        let (plain, _) = sample(&url(&dir_a)).await;
        let (job, rx) = bulk_job("acme", BulkOp::Erase, Phase::Start, now(), None);
        let (first, whole) = run_bulk_watched(&plain, job, rx).await;
        let (records, _, _) = affected(&first);

        // The same data, after a call that recorded 5 records of 2 subjects done, counted by
        // totals 7 records (3 subjects) above what the sample holds: that many are gone
        // since, 2 records (1 subject) beyond what it recorded as done.
        let (connector, _) = sample(&url(&dir_b)).await;
        let cut_off = BulkProgress {
            subjects_done: 2,
            subjects_total: whole.subjects_total + 3,
            records_done: 5,
            records_total: whole.records_total + 7,
            erased: Vec::new(),
        };
        let (job, rx) = bulk_job("acme", BulkOp::Erase, Phase::Start, now(), None);
        let job = BulkJob {
            interrupted: true,
            recorded_progress: cut_off,
            ..job
        };
        let (again, last) = run_bulk_watched(&connector, job, rx).await;
        let (resumed_records, note, erased) = affected(&again);
        assert_eq!(resumed_records, records + 5, "{again:?}");
        assert_eq!(
            last,
            BulkProgress {
                subjects_done: whole.subjects_total + 2,
                subjects_total: whole.subjects_total + 2,
                records_done: whole.records_total + 5,
                records_total: whole.records_total + 5,
                erased: whole.erased.clone(),
            }
        );
        assert!(
            note.contains(
                "an earlier call of this erasure was cut off before its answer was recorded; \
                 5 record(s) of 2 subject(s) it erased are counted, as far as its progress \
                 was recorded; 2 more record(s) are gone since it counted them"
            ),
            "{note}"
        );
        assert_eq!(
            erased
                .iter()
                .find(|e| e.action == EARLIER_CALL)
                .map(|e| e.count),
            Some(5),
            "{erased:?}"
        );
    }

    /// A call going on from progress recorded with its counts by table answers with what it
    /// erased itself, which the processor adds to those (no entry for the earlier call), while
    /// its reports go on from them, so that a call cut off in turn hands on the whole.
    #[tokio::test]
    async fn a_resumed_erasure_reports_on_from_the_recorded_counts_by_table() {
        let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let url = |d: &tempfile::TempDir| format!("sqlite://{}/accounting.db", d.path().display());
        let (plain, _) = sample(&url(&dir_a)).await;
        let (job, rx) = bulk_job("acme", BulkOp::Erase, Phase::Start, now(), None);
        let (first, whole) = run_bulk_watched(&plain, job, rx).await;
        let (records, _, counts) = affected(&first);
        let counts = counts.to_vec();

        let (connector, _) = sample(&url(&dir_b)).await;
        let count = |target: &str, action: &str, count| ErasedCount {
            target: target.into(),
            action: action.into(),
            count,
        };
        let earlier = vec![
            count("contacts", "deleted", 3),
            count("customers", "deleted", 2),
        ];
        let recorded = BulkProgress {
            subjects_done: 2,
            subjects_total: whole.subjects_total + 2,
            records_done: 5,
            records_total: whole.records_total + 5,
            erased: earlier.clone(),
        };
        let (job, rx) = bulk_job("acme", BulkOp::Erase, Phase::Start, now(), None);
        let job = BulkJob {
            recorded_progress: recorded,
            ..job
        };
        let (again, last) = run_bulk_watched(&connector, job, rx).await;
        let (resumed_records, _, erased) = affected(&again);
        assert_eq!(resumed_records, records + 5, "{again:?}");
        assert_eq!(erased, counts.as_slice(), "{again:?}");
        assert_eq!(last.erased, crate::sum_erased(&earlier, &whole.erased));
        assert_eq!(last.records_done, whole.records_total + 5);
    }

    /// A resumed call's totals are what was done plus what is left, never above those
    /// recorded when the deletion began; a total recorded as unknown (0) has nothing to
    /// bound them (the processor keeps it unknown).
    #[test]
    fn resumed_totals_stay_within_the_recorded_ones() {
        let earlier = BulkProgress::counts(2, 6, 11, 26);
        let left = |subjects, records| BulkProgress::counts(0, subjects, 0, records);
        assert_eq!(resumed(&earlier, &left(4, 15)), earlier);
        assert_eq!(resumed(&earlier, &left(6, 21)), earlier);
        assert_eq!(
            resumed(&earlier, &left(3, 12)),
            BulkProgress::counts(2, 5, 11, 23)
        );
        let unknown = BulkProgress::counts(2, 0, 11, 0);
        assert_eq!(
            resumed(&unknown, &left(4, 15)),
            BulkProgress::counts(2, 6, 11, 26)
        );
    }

    #[test]
    fn nothing_recorded_is_nothing_counted() {
        let left = BulkProgress {
            subjects_done: 0,
            subjects_total: 3,
            records_done: 0,
            records_total: 9,
            erased: Vec::new(),
        };
        assert_eq!(resumed(&BulkProgress::default(), &left), left);
        assert_eq!(earlier_note(false, &BulkProgress::default(), &left), None);
        let note = earlier_note(true, &BulkProgress::default(), &left).unwrap();
        assert!(note.ends_with("what it erased is not counted"), "{note}");
    }
}
