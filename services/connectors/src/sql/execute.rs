//! Running planned statements: each request in one transaction, reading the rows it needs,
//! and sorting database errors into worth-retrying or not.

use std::borrow::Cow;

#[cfg(test)]
use dsrelay_proto::v1::SubjectIdentity;
use dsrelay_runtime::store::{run_each, Backend, Ran};
use futures::TryStreamExt;
use sqlx::any::{AnyRow, AnyTypeInfoKind};
use sqlx::{Any, FromRow as _, Row, Transaction, ValueRef as _};

use super::plan::{
    corrected_identity, plan_erasure, plan_export, plan_flag, plan_held_counts,
    plan_identity_taken, plan_rectify, Corrections, ErasureStep, Identity, Scope, Statement,
};
use super::receipt;
use super::retention::{assess, day_of, kept_until, DatedRow};
use super::rules::{Action, Retention, TableRule, MATCH_KEYS};
use super::schema::Compare;
use super::Scoped;
use crate::export::{csv_text, push_json_str, CsvWriter, ExportSink, JsonArrayWriter, CSV, JSON};
use crate::{ConnectorError, ErasedCount, ExportedFile};

/// What an erasure did in one database; stored as JSON in the task's erasure receipt.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct ErasureReport {
    /// How many rows were erased or anonymized: deleted, or anonymized by the table's
    /// action. Kept rows stripped of what their obligation does not need are not among them
    /// (they are counted when a later run erases them), so that the processor, which adds up
    /// every run's count, counts each row once.
    pub(crate) records_affected: i64,
    /// A human-readable account of the work, safe to store and show: it never contains the
    /// subject's identity values.
    pub(crate) note: String,
    /// False when the database holds no data on the subject.
    pub(crate) found: bool,
    /// Set when rows are kept under a legal obligation.
    pub(crate) retained: Option<RetentionReport>,
    /// Rows erased per table and action (the table's `deleted` or `anonymized`), in the
    /// order the tables were handled; rows kept under an obligation are listed apart, never
    /// as erased: those stripped now of what it does not need as
    /// [`Action::KEPT_AND_STRIPPED`], the others (nothing to clear, or cleared by an earlier
    /// run) as [`Action::KEPT`]. Receipts stored before stripped rows were listed apart
    /// listed them as `anonymized` and counted them in `records_affected`, and those stored
    /// before [`Action::KEPT`] was listed lack it; a replay answers them as stored.
    pub(crate) counts: Vec<ErasedCount>,
    /// When the subject's rows are only in `keep` tables (nothing deleted, anonymized or
    /// kept under `retain`): those tables with their rows. Nothing was erased, and the
    /// answer must say so, on a replay from the receipt too. Receipts stored before it
    /// existed lack it and read as empty, their answer as it was then.
    #[serde(default)]
    pub(crate) only_kept: Vec<KeptRows>,
}

/// The subject's rows in one `keep` table.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct KeptRows {
    pub(crate) table: String,
    pub(crate) rows: i64,
}

/// What an erasure keeps under `retain` rules.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct RetentionReport {
    /// The bases of the rules that keep rows, children first as the tables are handled,
    /// joined with `"; "`.
    pub(crate) legal_basis: String,
    /// When the next kept row is released (ms since the epoch): the moment to erase again.
    pub(crate) until_ms: i64,
    /// How many rows the rules keep (matched rows kept for them not counted).
    pub(crate) rows: i64,
}

/// What an export, rectification, restriction or objection did; a rectification's is
/// stored as JSON in its task's receipt.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub(crate) struct WorkReport {
    /// Rows exported or changed: a row that already held what a restriction, objection or
    /// rectification writes is found, not changed, and not counted.
    pub(crate) records_affected: i64,
    /// A human-readable account of the work, without identity or corrected values.
    pub(crate) note: String,
    /// Whether a table the request acts on holds the subject's rows (exported, changed, or
    /// already as asked). Receipts stored before it existed lack it and read as false,
    /// their answer as it was then (nothing changed: not found).
    #[serde(default)]
    pub(crate) found: bool,
    /// Why the request is refused, nothing having changed: the subject's rows are only in
    /// tables no rule lets the request act on ([`Untouched`]), or a correction would give
    /// the subject's identity to another row. Stored in a rectification's receipt only for
    /// the first, so that its repeated call answers as it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) refusal: Option<String>,
    /// For exports: the files written, two per table with the subject's rows. Never in a
    /// receipt: only rectifications store one, and they write no files.
    #[serde(skip)]
    pub(crate) files: Vec<ExportedFile>,
}

impl<'a> Scoped<'a> {
    /// The subject known by `raw` within this controller's data.
    pub(super) fn subject<'b>(&self, raw: &'b [Identity]) -> Scope<'b>
    where
        'a: 'b,
    {
        Scope {
            subject: Some(raw),
            condition: self.condition,
            batch: None,
            types: Some(self.types),
            returned: None,
        }
    }

    pub(super) async fn begin(&self) -> Result<Transaction<'static, Any>, ConnectorError> {
        const DOING: &str = "starting a transaction";
        match self.db.pool.begin().await {
            Ok(tx) => Ok(tx),
            Err(e) => Err(classify_pooled(&self.db.pool, DOING, &e).await),
        }
    }

    /// Erases the subject's rows in every configured table as of `now_ms`, in one
    /// transaction: rows no obligation keeps get the table's action; kept rows lose the
    /// personal data the obligation does not need (see the module documentation). Only RAW
    /// identities of a type some table matches are used; at least one must be given.
    ///
    /// Running it again finds only what is still kept, and answers `found: false` once
    /// nothing is left.
    #[cfg(test)]
    pub(crate) async fn erase(
        &self,
        identities: &[SubjectIdentity],
        now_ms: i64,
    ) -> Result<ErasureReport, ConnectorError> {
        Ok(self
            .erase_once(&self.matched(identities), now_ms, None)
            .await?
            .0)
    }

    /// `identities` as the steps take them ([`super::plan::matched_identities`]), for tests
    /// that call a step without `run`, which refuses a task without any.
    #[cfg(test)]
    pub(crate) fn matched(&self, identities: &[SubjectIdentity]) -> Vec<Identity> {
        super::plan::matched_identities(self.config, identities)
            .expect("a test gives a matchable identity")
    }

    /// The erasure of the subject known by `raw` as of `now_ms` (what the tests' `erase`
    /// runs) under the receipt of `task_key`, when given: the erasure stores its report under
    /// the key in the receipt table, in its own transaction. When an earlier
    /// call committed under the key, this call's work is rolled back and the earlier report
    /// is returned, with `true`. On SQLite the erasure shares a transaction with those
    /// queued beside it ([`super::writer`]), in a savepoint of its own; on PostgreSQL it has
    /// a transaction of its own.
    pub(crate) async fn erase_once(
        &self,
        raw: &[Identity],
        now_ms: i64,
        task_key: Option<&str>,
    ) -> Result<(ErasureReport, bool), ConnectorError> {
        if let Some(writer) = self.writer {
            return writer
                .erase(
                    raw,
                    now_ms,
                    task_key,
                    self.condition,
                    self.narrowed.cloned(),
                )
                .await;
        }
        let mut tx = self.begin().await?;
        let erased = self.erase_in(&mut tx, raw, now_ms, task_key).await;
        self.settle(tx, erased, task_key, "erasure").await
    }

    /// Ends the transaction of a receipted piece of work (`what`: "erasure",
    /// "rectification"): committed when it did the work; rolled back when its receipt says
    /// an earlier call did (`true`: the answer is that call's); rolled back when it failed,
    /// and then the receipt of an earlier call that committed under `task_key` is the
    /// answer, if there is one.
    async fn settle<R: serde::de::DeserializeOwned>(
        &self,
        tx: Transaction<'static, Any>,
        done: Result<(R, bool), ConnectorError>,
        task_key: Option<&str>,
        what: &str,
    ) -> Result<(R, bool), ConnectorError> {
        let done = match done {
            Ok(done) => done,
            Err(e) => {
                drop(tx);
                let receipts = self.config.receipts_table();
                return receipt::or_earlier(&self.db.pool, receipts, task_key, e).await;
            }
        };
        if done.1 {
            // An earlier call did the work: this one's is undone, its answer is that call's.
            tx.rollback()
                .await
                .map_err(|e| classify(&format!("undoing a repeated {what}"), &e))?;
        } else {
            tx.commit()
                .await
                .map_err(|e| classify(&format!("committing the {what}"), &e))?;
        }
        Ok(done)
    }

    /// The work of [`Scoped::erase_once`] in `tx`, which the caller commits (or rolls back
    /// when this fails). When the receipt says an earlier call did the work, it answers that
    /// call's report with `true`, and the caller must roll back what this call wrote.
    pub(super) async fn erase_in(
        &self,
        tx: &mut Transaction<'static, Any>,
        raw: &[Identity],
        now_ms: i64,
        task_key: Option<&str>,
    ) -> Result<(ErasureReport, bool), ConnectorError> {
        let mut plan = plan_erasure(self.config, self.subject(raw), now_ms);
        // An out-of-scope parent only leads to its in-scope children: its rows are not the
        // erasure's to count or report.
        if let Some(n) = self.narrowed {
            plan.retain(|step| !n.lookup_only.contains(&step.rule.table));
        }
        let statements = erasure_statements(&plan);
        let (ran, sent) = run_erasure(tx, self.db.backend, &statements, now_ms).await?;
        tracing::debug!(
            sent,
            planned = statements.len(),
            "sql erasure statements run"
        );
        // Each statement's result with its label, for what reading the result may report.
        let mut results = statements.iter().map(|s| s.label.as_str()).zip(ran);
        let mut total: i64 = 0;
        let mut found = false;
        let mut notes = Vec::with_capacity(plan.len());
        let mut kept_rows: i64 = 0;
        let mut next_release: Option<i64> = None;
        let mut bases: Vec<&str> = Vec::new();
        let mut counts = Vec::new();
        let mut in_keep_tables = Vec::new();
        // Whether any rule but `keep` found the subject's rows, erasing or retaining them.
        let mut handled = false;
        for step in &plan {
            let rule = step.rule;
            let table = rule.table.as_str();
            let Some(work) = &step.work else {
                notes.push(format!(
                    "{table}: skipped (no identity of a type it matches)"
                ));
                continue;
            };
            let mut next = || results.next().unwrap_or_default();
            if rule.action == Action::Keep {
                let (label, ran) = next();
                let rows = match ran.rows.first() {
                    Some(row) => row.try_get::<i64, _>(0).map_err(|e| classify(label, &e))?,
                    None => 0,
                };
                found |= rows > 0;
                if rows > 0 {
                    in_keep_tables.push(KeptRows {
                        table: table.to_string(),
                        rows,
                    });
                }
                notes.push(format!("{table}: kept {rows} (action keep)"));
                continue;
            }
            let retained = match (&work.probe, &rule.retain) {
                (Some(_), Some(retain)) => {
                    let (label, ran) = next();
                    let rows = ran
                        .rows
                        .iter()
                        .map(DatedRow::from_row)
                        .collect::<Result<Vec<_>, _>>()
                        .map_err(|e| classify(label, &e))?;
                    Some(assess(table, retain, &rows, now_ms)?)
                }
                _ => None,
            };
            let kept = match &work.count_kept {
                Some(_) => {
                    let (label, ran) = next();
                    match ran.rows.first() {
                        Some(row) => row.try_get::<i64, _>(0).map_err(|e| classify(label, &e))?,
                        None => 0,
                    }
                }
                None => 0,
            };
            let stripped = match &work.anonymize_kept {
                Some(_) => rows_changed(&next().1),
                None => 0,
            };
            let done = rows_changed(&next().1);
            // Stripped rows are still held: they are counted when a later run erases them.
            total = total.saturating_add(done);
            found |= done > 0 || kept > 0;
            handled |= done > 0 || kept > 0 || stripped > 0;
            counts.push(ErasedCount {
                target: table.to_string(),
                action: rule.action.done().to_string(),
                count: done,
            });
            if stripped > 0 {
                counts.push(ErasedCount {
                    target: table.to_string(),
                    action: Action::KEPT_AND_STRIPPED.to_string(),
                    count: stripped,
                });
            }
            // The note that also says so is emptied when the request's identities are
            // forgotten; the certificate must still say that the table keeps these rows.
            let whole = kept.saturating_sub(stripped).max(0);
            if whole > 0 {
                counts.push(ErasedCount {
                    target: table.to_string(),
                    action: Action::KEPT.to_string(),
                    count: whole,
                });
            }
            tracing::debug!(
                table,
                action = rule.action.done(),
                rows = done,
                kept,
                stripped,
                "sql rule applied"
            );

            let mut note = format!("{table}: {} {done}", rule.action.done());
            if kept > 0 {
                note.push_str(&format!(", kept {kept}"));
                if let Some(k) = &retained {
                    if let Some(day) = k.last_day {
                        note.push_str(&kept_until(k.first_day, day));
                    }
                    if k.by_condition > 0 {
                        note.push_str(&format!(
                            " ({} while its retain condition holds, checked again on {})",
                            k.by_condition,
                            day_of(k.recheck_at_ms)
                        ));
                    }
                }
                if retained.as_ref().is_none_or(|k| k.rows == 0) && !work.held_for.is_empty() {
                    note.push_str(&format!(
                        " for the kept rows of {}",
                        work.held_for.join(", ")
                    ));
                }
                if work.anonymize_kept.is_some() {
                    note.push_str(&format!(
                        " ({stripped} stripped now of what the obligation does not need)"
                    ));
                }
            }
            notes.push(note);
            if let Some(k) = retained {
                kept_rows += k.rows;
                if let Some(at) = k.next_release_ms {
                    next_release = Some(next_release.map_or(at, |n| n.min(at)));
                }
                for basis in k.bases {
                    if !bases.contains(&basis) {
                        bases.push(basis);
                    }
                }
            }
        }
        let report = ErasureReport {
            records_affected: total,
            note: notes.join("; "),
            found,
            counts,
            retained: (kept_rows > 0).then(|| RetentionReport {
                legal_basis: bases.join("; "),
                until_ms: next_release.unwrap_or(now_ms),
                rows: kept_rows,
            }),
            only_kept: match handled {
                true => Vec::new(),
                false => in_keep_tables,
            },
        };
        if let Some(key) = task_key {
            let receipts = self.config.receipts_table();
            if let Some(earlier) = receipt::store(tx, receipts, key, &report, now_ms).await? {
                return Ok((earlier, true));
            }
        }
        Ok((report, false))
    }

    /// Writes the subject's rows of every table with `export` columns into `sink`, read in
    /// one transaction with a cursor: per table a JSON file (`<table>.json`, an array of
    /// objects of the `export` columns) and a CSV file (`<table>.csv`, a header row of the
    /// column names and one record per row), both fed row by row as the database yields
    /// them, in the order the database reads them ([`plan_export`]). A table without the
    /// subject's rows gets no files. A SQLite file is read on a connection of its own
    /// ([`super::direct`]).
    pub(crate) async fn export(
        &self,
        raw: &[Identity],
        sink: &ExportSink,
    ) -> Result<WorkReport, ConnectorError> {
        let tables: Vec<(TableRule, Option<Statement>)> = self
            .config
            .tables
            .iter()
            .filter(|t| !t.export.is_empty())
            .map(|rule| {
                let select = plan_export(self.config, rule, self.subject(raw));
                (rule.clone(), select)
            })
            .collect();
        self.read_export(sink, Vec::new(), SubjectExport { tables })
            .await
    }

    /// Runs `job` in one read transaction, so that every table and count it reads comes
    /// from one snapshot: on a SQLite file on a connection of its own, on the blocking pool
    /// ([`super::direct`]); otherwise in a transaction of the pool, on PostgreSQL at
    /// REPEATABLE READ (READ COMMITTED, its default, gives each statement a snapshot of its
    /// own: a row deleted between a contract end's count and its read would be counted and
    /// never returned). A SQLite transaction sees one snapshot at any level.
    ///
    /// `writes` (a contract end's record of the rows it returns, [`plan_record_returned`])
    /// run first in the same transaction, so that they see the snapshot the reads see: on
    /// PostgreSQL it is then REPEATABLE READ READ WRITE; a SQLite file's export writes them
    /// into a TEMP table, which takes no lock on the file, and copies them into the file's
    /// table in a short write transaction after the read ([`super::direct::read`]).
    ///
    /// [`plan_record_returned`]: super::plan::plan_record_returned
    pub(super) async fn read_export<J: ExportJob>(
        &self,
        sink: &ExportSink,
        writes: Vec<Statement>,
        job: J,
    ) -> Result<J::Output, ConnectorError> {
        match &self.db.sqlite_file {
            Some(path) => {
                let sink = sink.clone();
                let keys_table = self.config.returned_table();
                super::direct::read(path, &keys_table, writes, move |reading| {
                    let handle = tokio::runtime::Handle::current();
                    handle.block_on(job.run(reading, &sink))
                })
                .await
            }
            None => {
                let mut tx = self.begin().await?;
                if self.db.backend == Backend::Postgres {
                    let level = match writes.is_empty() {
                        true => "SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY",
                        false => "SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ WRITE",
                    };
                    sqlx::query(level)
                        .execute(&mut *tx)
                        .await
                        .map_err(|e| classify("starting the export's read", &e))?;
                }
                for write in &writes {
                    write
                        .query()
                        .execute(&mut *tx)
                        .await
                        .map_err(|e| classify("recording what the export returns", &e))?;
                }
                let out = job.run(&mut tx, sink).await?;
                tx.commit()
                    .await
                    .map_err(|e| classify("finishing the export", &e))?;
                Ok(out)
            }
        }
    }

    /// Writes the corrected values into the columns the `rectify` maps name, in every table
    /// that maps the field, in one transaction; `corrections` are those
    /// [`super::plan::check_corrections`] accepted, and the note names the fields no table
    /// maps. A value the column's type cannot hold (PostgreSQL) is a permanent error and
    /// nothing is changed, the error naming the field and the type, not the value. The value
    /// of an identity (a field named by a match key, or written into a match column) is
    /// trimmed, as the request's identities are. Only rows not already holding the values
    /// are written and counted; a value another row of the table already holds in a match
    /// column is refused before anything is written (`identity_taken`), and the tables
    /// mapping none of the fields are counted and named ([`Untouched`]).
    ///
    /// With `task_key`, the report is stored under it in the receipt table, in the same
    /// transaction: a correction of the column the subject is matched by (the e-mail)
    /// leaves a repeated call nothing to find, so when an earlier call committed under the
    /// key, this call's work is rolled back and the earlier report is returned, with
    /// `true`.
    pub(super) async fn rectify(
        &self,
        raw: &[Identity],
        corrections: &Corrections<'_>,
        now_ms: i64,
        task_key: Option<&str>,
    ) -> Result<(WorkReport, bool), ConnectorError> {
        let mut tx = self.begin().await?;
        let rectified = self
            .rectify_in(&mut tx, raw, corrections, now_ms, task_key)
            .await;
        self.settle(tx, rectified, task_key, "rectification").await
    }

    /// The work of [`Scoped::rectify`] in `tx`, which the caller commits, or rolls back when
    /// this fails or answers `true` (an earlier call's report, from the receipt).
    async fn rectify_in(
        &self,
        tx: &mut Transaction<'static, Any>,
        raw: &[Identity],
        corrections: &Corrections<'_>,
        now_ms: i64,
        task_key: Option<&str>,
    ) -> Result<(WorkReport, bool), ConnectorError> {
        let Corrections {
            mapped: corrections,
            unmapped,
        } = corrections;
        let backend = self.db.backend;
        let mut unconfigured = Vec::new();
        let mut notes = Vec::new();
        // Every check before the first write, so that a refusal leaves nothing changed.
        for rule in self.config.children_first() {
            let applicable: Vec<(&str, &String, &str)> = corrections
                .iter()
                .filter_map(|(field, value)| Some((*field, rule.rectify.get(*field)?, *value)))
                .collect();
            if applicable.is_empty() {
                unconfigured.push(rule);
                continue;
            }
            let fields: Vec<&str> = applicable.iter().map(|(f, _, _)| *f).collect();
            let columns: Vec<(&String, &str)> = applicable
                .iter()
                .map(|(field, column, value)| (*column, corrected(rule, field, column, value)))
                .collect();
            let subject = self.subject(raw);
            let Some(update) = plan_rectify(self.config, rule, subject, backend, &columns) else {
                notes.push((skipped(rule), None));
                continue;
            };
            for ((field, _, _), (column, value)) in applicable.iter().zip(&columns) {
                self.check_value(tx, rule, field, column, value).await?;
                if let Some(reason) = self
                    .identity_taken(tx, rule, raw, field, column, value)
                    .await?
                {
                    // An earlier call that committed wrote the value into the subject's own
                    // rows, which the request's identities may no longer find.
                    if let Some(key) = task_key {
                        let receipts = self.config.receipts_table();
                        if let Some(earlier) = receipt::find(&mut **tx, receipts, key).await? {
                            return Ok((earlier, true));
                        }
                    }
                    let report = WorkReport {
                        records_affected: 0,
                        note: String::new(),
                        found: false,
                        refusal: Some(reason),
                        files: Vec::new(),
                    };
                    return Ok((report, false));
                }
            }
            notes.push((String::new(), Some((rule, fields, update))));
        }
        let mut total: i64 = 0;
        let mut found = false;
        let mut done_notes = Vec::with_capacity(notes.len());
        for (note, planned) in notes {
            let Some((rule, fields, update)) = planned else {
                done_notes.push(note);
                continue;
            };
            let done = execute(tx, &update)
                .await
                .map_err(|e| classify(&format!("rectifying {}", rule.table), &e))?;
            total = total.saturating_add(done);
            found |= done > 0;
            let fields = fields.join(", ");
            done_notes.push(match done {
                0 => match self.held_unchanged(tx, rule, raw).await? {
                    0 => format!("{}: updated 0 ({fields})", rule.table),
                    held => {
                        found = true;
                        format!(
                            "{}: updated 0 ({fields}), {held} already held the corrected \
                             values",
                            rule.table
                        )
                    }
                },
                done => format!("{}: updated {done} ({fields})", rule.table),
            });
        }
        let held = self.held_in(tx, raw, &unconfigured).await?;
        let fields: Vec<&str> = corrections.iter().map(|(f, _)| *f).collect();
        let untouched = Untouched {
            done: "corrected",
            why: format!("no rectify for {}", fields.join(", ")),
            request: "a rectification of these fields",
        };
        let mut report = untouched.report(total, found, done_notes, &held);
        if let Some(unmapped) = unmapped {
            report.note = match report.note.is_empty() {
                true => unmapped.clone(),
                false => format!("{}; {unmapped}", report.note),
            };
        }
        if let Some(key) = task_key {
            let receipts = self.config.receipts_table();
            if let Some(earlier) = receipt::store(tx, receipts, key, &report, now_ms).await? {
                return Ok((earlier, true));
            }
        }
        Ok((report, false))
    }

    /// Why writing the corrected `value` of `field` into `rule`'s `column` must not happen,
    /// when the column is one the subject is matched by and a row of the table other than
    /// the subject's already holds the value there (compared as the match compares): the
    /// request's identity would then find both rows, and the next erasure, export or
    /// restriction of either person would take the other's too. The reason names the field
    /// and the table, never the value.
    async fn identity_taken(
        &self,
        tx: &mut Transaction<'static, Any>,
        rule: &TableRule,
        raw: &[Identity],
        field: &str,
        column: &str,
        value: &str,
    ) -> Result<Option<String>, ConnectorError> {
        for (key, _) in rule.match_columns.iter().filter(|(_, c)| *c == column) {
            let Some(identity) = corrected_identity(key, value) else {
                continue;
            };
            let subject = self.subject(raw);
            let Some(probe) =
                plan_identity_taken(self.config, rule, subject, (key, column), &identity)
            else {
                continue;
            };
            let doing = format!(
                "checking that no other row of {} holds the corrected {field}",
                rule.table
            );
            if tx.count(&probe, &doing).await? > 0 {
                return Ok(Some(format!(
                    "the corrected {field:?} is already held in {}.{column} by a row that is \
                     not the subject's, and the subject's rows are found by that column: \
                     writing it would make one person's request find the other's data too; \
                     nothing was changed",
                    rule.table
                )));
            }
        }
        Ok(None)
    }

    /// Fails with a permanent error naming `field` when `value` is not one of the type of
    /// `rule`'s `column`, which a rectification casts it to
    /// ([`super::schema::ColumnType::written`]). Checked
    /// alone, so that the error says which field it was and never carries the value, as the
    /// database's own message would.
    async fn check_value(
        &self,
        tx: &mut Transaction<'static, Any>,
        rule: &TableRule,
        field: &str,
        column: &str,
        value: &str,
    ) -> Result<(), ConnectorError> {
        let ty = self.types.of(&rule.table, column);
        if ty.compare == Compare::AsIs {
            return Ok(());
        }
        let cast = Statement {
            sql: format!("SELECT {} IS NULL", ty.written("$1")),
            binds: vec![value.to_string()],
        };
        match execute(tx, &cast).await {
            Ok(_) => Ok(()),
            // Class 22 (data exception: invalid text, out of range) and 23 (a domain's
            // constraint): the value, not the database, is at fault.
            Err(e) if sqlstate(&e).is_some_and(|c| c.starts_with("22") || c.starts_with("23")) => {
                Err(ConnectorError::Permanent(format!(
                    "the corrected value of field {field:?} is not a valid {} for {}.{column}; \
                     nothing was changed",
                    ty.declared, rule.table
                )))
            }
            Err(e) => Err(classify(&format!("checking the corrected {field}"), &e)),
        }
    }

    /// Sets (`lift: false`) or lifts a restriction of processing: the `restrict_column` of the
    /// subject's rows becomes 1 or 0.
    pub(crate) async fn restrict(
        &self,
        raw: &[Identity],
        lift: bool,
    ) -> Result<WorkReport, ConnectorError> {
        let (value, verb) = if lift {
            (0, "restriction lifted")
        } else {
            (1, "restricted")
        };
        let untouched = Untouched {
            done: if lift { "lifted" } else { "restricted" },
            why: "no restrict_column".into(),
            request: if lift {
                "the lifting of a restriction"
            } else {
                "a restriction"
            },
        };
        self.set_flag(raw, |t| t.restrict_column.as_ref(), value, verb, untouched)
            .await
    }

    /// Records an objection to direct marketing: the `suppress_column` of the subject's rows
    /// becomes 1.
    pub(crate) async fn suppress(&self, raw: &[Identity]) -> Result<WorkReport, ConnectorError> {
        let untouched = Untouched {
            done: "opted out",
            why: "no suppress_column".into(),
            request: "an objection",
        };
        self.set_flag(
            raw,
            |t| t.suppress_column.as_ref(),
            1,
            "opted out",
            untouched,
        )
        .await
    }

    /// Writes `value` into the flag `column_of` names of the subject's rows, in one
    /// transaction, counting the rows it changed: a row already holding the value is found,
    /// not changed. The tables the flag is not configured for are counted in one statement
    /// and named in the note when they hold the subject's rows; when only they do, the
    /// report carries the refusal ([`Untouched`]).
    async fn set_flag(
        &self,
        raw: &[Identity],
        column_of: fn(&TableRule) -> Option<&String>,
        value: u8,
        verb: &str,
        untouched: Untouched<'_>,
    ) -> Result<WorkReport, ConnectorError> {
        let mut tx = self.begin().await?;
        let mut total: i64 = 0;
        let mut found = false;
        let mut notes = Vec::new();
        let mut unconfigured = Vec::new();
        for rule in self.config.children_first() {
            let Some(column) = column_of(rule) else {
                unconfigured.push(rule);
                continue;
            };
            let subject = self.subject(raw);
            let backend = self.db.backend;
            let Some(update) = plan_flag(self.config, rule, subject, backend, column, value) else {
                notes.push(skipped(rule));
                continue;
            };
            let done = execute(&mut tx, &update)
                .await
                .map_err(|e| classify(&format!("updating {}.{column}", rule.table), &e))?;
            total = total.saturating_add(done);
            found |= done > 0;
            notes.push(match done {
                0 => match self.held_unchanged(&mut tx, rule, raw).await? {
                    0 => format!("{}: {verb} 0", rule.table),
                    held => {
                        found = true;
                        format!("{}: {verb} 0, {held} already were", rule.table)
                    }
                },
                done => format!("{}: {verb} {done}", rule.table),
            });
        }
        let held = self.held_in(&mut tx, raw, &unconfigured).await?;
        tx.commit()
            .await
            .map_err(|e| classify("committing the change", &e))?;
        Ok(untouched.report(total, found, notes, &held))
    }

    /// How many of the subject's rows `rule`'s table holds, for a table whose update
    /// changed none: rows there already as asked are the subject's data all the same.
    async fn held_unchanged(
        &self,
        tx: &mut Transaction<'static, Any>,
        rule: &TableRule,
        raw: &[Identity],
    ) -> Result<i64, ConnectorError> {
        let Some((count, _)) = plan_held_counts(self.config, &[rule], self.subject(raw), false)
        else {
            return Ok(0);
        };
        tx.count(
            &count,
            &format!("counting the subject's rows in {}", rule.table),
        )
        .await
    }

    /// The subject's rows in `tables` (those the request's kind is not configured for),
    /// counted in one statement: the tables holding any, with their rows. Only the tables
    /// the subject is matched in are counted, those with `match` columns of their own and
    /// the children of a parent the scope only reads through: a child found only through
    /// its parent holds the subject's rows only when the parent does, which is counted or
    /// acted on itself. A table the scope only reads through (an out-of-scope parent) is
    /// not counted.
    async fn held_in(
        &self,
        tx: &mut Transaction<'static, Any>,
        raw: &[Identity],
        tables: &[&TableRule],
    ) -> Result<Vec<KeptRows>, ConnectorError> {
        let lookup_only =
            |table: &str| self.narrowed.is_some_and(|n| n.lookup_only.contains(table));
        let tables: Vec<&TableRule> = (tables.iter().copied())
            .filter(|t| !lookup_only(&t.table))
            .filter(|t| {
                !t.match_columns.is_empty()
                    || t.parent.as_ref().is_some_and(|p| lookup_only(&p.table))
            })
            .collect();
        let Some((count, counted)) =
            plan_held_counts(self.config, &tables, self.subject(raw), true)
        else {
            return Ok(Vec::new());
        };
        let doing = "counting the subject's rows in the tables this request leaves as they are";
        let row = count
            .query()
            .fetch_one(&mut **tx)
            .await
            .map_err(|e| classify(doing, &e))?;
        let mut held = Vec::new();
        for (i, rule) in counted.iter().enumerate() {
            let rows: Option<i64> = row.try_get(i).map_err(|e| classify(doing, &e))?;
            if let Some(rows) = rows.filter(|r| *r > 0) {
                held.push(KeptRows {
                    table: rule.table.clone(),
                    rows,
                });
            }
        }
        Ok(held)
    }
}

/// How a restriction, an objection or a rectification names the tables it is not
/// configured for, which it leaves as they are: in the note beside what it did, or, when
/// only they hold the subject's rows, in the reason it is refused for. Such rows are the
/// subject's data, so the answer is not NOT_FOUND; nothing was done, so it is not COMPLETED.
pub(super) struct Untouched<'a> {
    /// What the request does to a row, as a past participle: `restricted`.
    pub(super) done: &'a str,
    /// Why a table is left as it is: `no restrict_column`.
    pub(super) why: String,
    /// The request, as the subject of a sentence: `a restriction`.
    pub(super) request: &'a str,
}

impl Untouched<'_> {
    /// The report of a request that changed `total` rows, found the subject's rows in a
    /// table configured for it when `found`, and found `held` in the tables it is not
    /// configured for.
    fn report(
        &self,
        total: i64,
        found: bool,
        mut notes: Vec<String>,
        held: &[KeptRows],
    ) -> WorkReport {
        let Untouched { done, why, request } = self;
        for h in held {
            notes.push(format!("{}: holds {}, not {done} ({why})", h.table, h.rows));
        }
        let refusal = (!found && !held.is_empty()).then(|| {
            let tables: Vec<String> = (held.iter())
                .map(|h| format!("{}: {}", h.table, h.rows))
                .collect();
            format!(
                "nothing {done}: the subject's rows are only in tables that no rule lets \
                 {request} act on ({why}): {}",
                tables.join(", ")
            )
        });
        WorkReport {
            records_affected: total,
            note: notes.join("; "),
            found,
            refusal,
            files: Vec::new(),
        }
    }
}

/// Work done in an export's read transaction ([`Scoped::read_export`]); owned, because on a
/// SQLite file it runs on a thread of the blocking pool.
pub(super) trait ExportJob: Send + 'static {
    type Output: Send + 'static;

    /// Reads through `tx` and writes the files into `sink`.
    async fn run(
        self,
        tx: &mut impl ReadTx,
        sink: &ExportSink,
    ) -> Result<Self::Output, ConnectorError>;
}

/// One subject's export: each table with `export` columns and the select of the subject's
/// rows, `None` where no identity of the request applies.
struct SubjectExport {
    tables: Vec<(TableRule, Option<Statement>)>,
}

impl ExportJob for SubjectExport {
    type Output = WorkReport;

    async fn run(
        self,
        tx: &mut impl ReadTx,
        sink: &ExportSink,
    ) -> Result<WorkReport, ConnectorError> {
        let mut total: i64 = 0;
        let mut notes = Vec::new();
        let mut files = Vec::new();
        for (rule, select) in &self.tables {
            let Some(select) = select else {
                notes.push(skipped(rule));
                continue;
            };
            let (exported, written) = tx.rows(rule, select, sink, &mut |_| {}).await?;
            files.extend(written);
            notes.push(format!("{}: exported {exported}", rule.table));
            total = total.saturating_add(i64::try_from(exported).unwrap_or(i64::MAX));
        }
        Ok(WorkReport {
            records_affected: total,
            note: notes.join("; "),
            found: total > 0,
            refusal: None,
            files,
        })
    }
}

/// A read transaction of an export: what an export asks of the database.
pub(super) trait ReadTx {
    /// The first column of the first row `s` yields, as an integer; 0 without a row.
    /// `doing` says what it is for, in an error.
    async fn count(&mut self, s: &Statement, doing: &str) -> Result<i64, ConnectorError>;

    /// Streams the rows `select` yields (the `export` columns of `rule`) into
    /// `<table>.json` and `<table>.csv` in `sink`, calling `on_row` with the count so far
    /// after each row. The files are opened at the first row, so a table without rows adds
    /// nothing to the package.
    async fn rows(
        &mut self,
        rule: &TableRule,
        select: &Statement,
        sink: &ExportSink,
        on_row: &mut (dyn FnMut(u64) + Send),
    ) -> Result<(u64, Vec<ExportedFile>), ConnectorError>;
}

impl ReadTx for Transaction<'_, Any> {
    async fn count(&mut self, s: &Statement, doing: &str) -> Result<i64, ConnectorError> {
        let n: Option<i64> = s
            .query_scalar()
            .fetch_optional(&mut **self)
            .await
            .map_err(|e| classify(doing, &e))?;
        Ok(n.unwrap_or(0))
    }

    async fn rows(
        &mut self,
        rule: &TableRule,
        select: &Statement,
        sink: &ExportSink,
        on_row: &mut (dyn FnMut(u64) + Send),
    ) -> Result<(u64, Vec<ExportedFile>), ConnectorError> {
        let table = rule.table.as_str();
        let mut files = TableFiles::new(rule, sink);
        let mut rows = select.query().fetch(&mut **self);
        while let Some(row) = rows
            .try_next()
            .await
            .map_err(|e| classify(&format!("exporting {table}"), &e))?
        {
            // Text is borrowed from the row: a value is encoded twice and copied never.
            let values = rule
                .export
                .iter()
                .enumerate()
                .map(|(i, column)| {
                    cell(&row, i).map_err(|e| classify(&format!("exporting {table}.{column}"), &e))
                })
                .collect::<Result<Vec<_>, _>>()?;
            files.push(&values).await?;
            on_row(files.count());
        }
        drop(rows);
        files.finish().await
    }
}

/// A table's two export files, `<table>.json` and `<table>.csv`, opened at its first row.
pub(super) struct TableFiles<'a> {
    rule: &'a TableRule,
    /// The task's sink, labelling this table's files with the table's `categories` when it
    /// names them.
    sink: ExportSink,
    open: Option<(JsonArrayWriter, CsvWriter)>,
    count: u64,
    /// Each column's key as it opens its member of a row's JSON object: `{"id":`, then
    /// `,"name":`, ...; encoded once per table, not once per row.
    keys: Vec<Vec<u8>>,
    /// The current row's JSON object, reused so that a row costs no allocation.
    element: Vec<u8>,
}

impl<'a> TableFiles<'a> {
    pub(super) fn new(rule: &'a TableRule, sink: &'a ExportSink) -> Self {
        let keys = (rule.export.iter().enumerate())
            .map(|(i, column)| {
                let mut key = vec![if i == 0 { b'{' } else { b',' }];
                push_json_str(&mut key, column);
                key.push(b':');
                key
            })
            .collect();
        let sink = match &rule.categories {
            Some(categories) => sink.narrowed_to(categories),
            None => sink.clone(),
        };
        Self {
            rule,
            sink,
            open: None,
            count: 0,
            keys,
            element: Vec::new(),
        }
    }

    /// Appends one row, `values` in the order of the rule's `export` columns: to the JSON
    /// file an object of the columns in that order, to the CSV file a record.
    pub(super) async fn push(&mut self, values: &[Cell<'_>]) -> Result<(), ConnectorError> {
        let (rule, sink) = (self.rule, &self.sink);
        let (json, csv) = match &mut self.open {
            Some(w) => w,
            None => {
                let table = rule.table.as_str();
                let json = sink.file(&format!("{table}.json"), JSON).await?;
                let csv = sink.file(&format!("{table}.csv"), CSV).await?;
                self.open.insert((
                    JsonArrayWriter::new(json).await?,
                    CsvWriter::new(csv, &rule.export).await?,
                ))
            }
        };
        self.element.clear();
        if self.keys.is_empty() {
            self.element.push(b'{');
        }
        for (key, value) in self.keys.iter().zip(values) {
            self.element.extend_from_slice(key);
            push_json_value(&mut self.element, value);
        }
        self.element.push(b'}');
        json.push_json(&self.element).await?;
        csv.push(values.iter().map(csv_field)).await?;
        self.count += 1;
        Ok(())
    }

    /// Rows pushed so far.
    pub(super) fn count(&self) -> u64 {
        self.count
    }

    /// Closes the files: the rows written and the files, none when no row came.
    pub(super) async fn finish(self) -> Result<(u64, Vec<ExportedFile>), ConnectorError> {
        let files = match self.open {
            Some((json, csv)) => vec![json.finish().await?, csv.finish().await?],
            None => Vec::new(),
        };
        Ok((self.count, files))
    }
}

/// The value written for `field` into `rule`'s `column`: trimmed when it is an identity the
/// subject is found by, which the request's own identities are too.
fn corrected<'v>(rule: &TableRule, field: &str, column: &str, value: &'v str) -> &'v str {
    let identity = MATCH_KEYS.iter().any(|(key, _)| *key == field)
        || rule.match_columns.values().any(|c| c == column);
    match identity {
        true => value.trim(),
        false => value,
    }
}

/// The SQLSTATE of a database error.
fn sqlstate(err: &sqlx::Error) -> Option<String> {
    err.as_database_error()
        .and_then(|e| e.code())
        .map(|c| c.into_owned())
}

/// The note of a table no identity of the request applies to.
fn skipped(rule: &TableRule) -> String {
    format!("{}: skipped (no identity of a type it matches)", rule.table)
}

/// The rows `ran` changed, as the reports count them.
fn rows_changed(ran: &Ran) -> i64 {
    i64::try_from(ran.changed).unwrap_or(i64::MAX)
}

/// One statement of a subject's erasure, in the order they run.
pub(super) struct PlannedStatement<'p> {
    /// What it does, for error messages.
    pub(super) label: String,
    pub(super) statement: &'p Statement,
    /// For a `retain` table's probe: the table and its rule, to tell from the rows it read
    /// whether any of them is kept.
    probe: Option<(&'p str, &'p Retention)>,
    /// For a statement that only counts or anonymizes kept rows: the probes (indices into
    /// the statements) that read every row it could find kept. When none of them found a
    /// kept row, it would count 0 and change nothing.
    about_kept: Option<Vec<usize>>,
}

/// The statements of `plan`, in order: per table its probe, the count and anonymization of
/// its kept rows, then its action.
pub(super) fn erasure_statements<'p>(plan: &'p [ErasureStep<'_>]) -> Vec<PlannedStatement<'p>> {
    let mut statements: Vec<PlannedStatement<'p>> = Vec::new();
    // The probe of each table handled so far: children come first, so a parent finds its
    // retained children's here.
    let mut probes: Vec<(&str, usize)> = Vec::new();
    for step in plan {
        let (table, Some(work)) = (step.rule.table.as_str(), &step.work) else {
            continue;
        };
        let mut own = None;
        if let (Some(probe), Some(retain)) = (&work.probe, &step.rule.retain) {
            own = Some(statements.len());
            probes.push((table, statements.len()));
            statements.push(PlannedStatement {
                label: format!("reading the dates of {table}"),
                statement: probe,
                probe: Some((table, retain)),
                about_kept: None,
            });
        }
        // A row is kept by the table's own rule or through a kept child row; each needs its
        // probe for the kept statements to be known idle. A child without one (none is
        // expected) keeps them running.
        let children: Option<Vec<usize>> = work
            .held_for
            .iter()
            .map(|child| probes.iter().find(|(t, _)| t == child).map(|(_, i)| *i))
            .collect();
        let about_kept = match (step.rule.retain.is_some(), own, children) {
            (true, None, _) | (_, _, None) => None,
            (_, own, Some(children)) => Some(own.into_iter().chain(children).collect::<Vec<_>>()),
        }
        // No probe at all proves nothing.
        .filter(|probes| !probes.is_empty());
        if let Some(count) = &work.count_kept {
            statements.push(PlannedStatement {
                label: format!("counting the kept rows of {table}"),
                statement: count,
                probe: None,
                about_kept: about_kept.clone(),
            });
        }
        if let Some(update) = &work.anonymize_kept {
            statements.push(PlannedStatement {
                label: format!("anonymizing {table}"),
                statement: update,
                probe: None,
                about_kept: about_kept.clone(),
            });
        }
        statements.push(PlannedStatement {
            label: format!("{} {table}", step.rule.action.doing()),
            statement: &work.main,
            probe: None,
            about_kept: None,
        });
    }
    statements
}

/// Runs an erasure's `statements` in `tx` and answers each one's rows and changed rows, in
/// order, with how many were sent to the database.
///
/// On SQLite they all go as one text ([`run_each`]), as one more statement there costs less
/// than a second call. On PostgreSQL each is a round trip and a share of the server's CPU,
/// so they go one by one, and a statement about kept rows is left out when the probes
/// before it found every row past its period with no `while` holding (the common case of
/// an old customer): it would count 0 and change nothing, and its answer is that. The
/// probes and the kept statements read the same rows in the same transaction; a row a
/// concurrent transaction adds for the subject meanwhile is one the erasure was not asked
/// about, as it would be a moment after the commit.
pub(super) async fn run_erasure(
    tx: &mut Transaction<'static, Any>,
    backend: Backend,
    statements: &[PlannedStatement<'_>],
    now_ms: i64,
) -> Result<(Vec<Ran>, usize), ConnectorError> {
    if backend == Backend::Sqlite {
        return Ok((
            run_in_order(tx, backend, statements).await?,
            statements.len(),
        ));
    }
    let mut ran: Vec<Ran> = Vec::with_capacity(statements.len());
    // Per statement: whether it is a probe that found no kept row.
    let mut nothing_kept = vec![false; statements.len()];
    let mut sent = 0;
    for (i, s) in statements.iter().enumerate() {
        if s.about_kept
            .as_ref()
            .is_some_and(|probes| probes.iter().all(|p| nothing_kept[*p]))
        {
            ran.push(Ran::default());
            continue;
        }
        let mut one = run_in_order(tx, backend, std::slice::from_ref(s)).await?;
        sent += 1;
        let result = one.pop().unwrap_or_default();
        if let Some((table, retain)) = s.probe {
            // An unreadable row (no date, no YYYY-MM-DD) leaves the kept statements to
            // run; reading the results stops the erasure on it.
            let rows: Result<Vec<DatedRow>, _> =
                result.rows.iter().map(DatedRow::from_row).collect();
            nothing_kept[i] = rows
                .ok()
                .and_then(|rows| assess(table, retain, &rows, now_ms).ok())
                .is_some_and(|kept| kept.rows == 0);
        }
        ran.push(result);
    }
    Ok((ran, sent))
}

/// Runs `s`; the rows it changed.
async fn execute(tx: &mut Transaction<'static, Any>, s: &Statement) -> Result<i64, sqlx::Error> {
    let done = s.query().execute(&mut **tx).await?;
    Ok(i64::try_from(done.rows_affected()).unwrap_or(i64::MAX))
}

/// Runs `statements` one after the other in `tx` ([`run_each`]: on SQLite as one text in one
/// call, which spares the erasure's dozen statements a hand-off each to sqlx's connection
/// thread while its transaction holds the database's only writer) and answers each one's
/// rows and changed rows, in order; an error names what the failing statement was doing (its
/// label).
async fn run_in_order(
    tx: &mut Transaction<'static, Any>,
    backend: Backend,
    statements: &[PlannedStatement<'_>],
) -> Result<Vec<Ran>, ConnectorError> {
    run_each(
        tx,
        backend,
        statements,
        |s| (s.statement.sql.as_str(), s.statement.binds.len()),
        |query, s| {
            s.statement
                .binds
                .iter()
                .fold(query, |q, v| q.bind(v.as_str()))
        },
    )
    .await
    .map_err(|failed| {
        let label = statements
            .get(failed.run)
            .map_or("running the erasure", |s| s.label.as_str());
        classify(label, &failed.error)
    })
}

/// Column `i` of `row` as JSON, by the type the database reports.
#[cfg(test)]
pub(super) fn json_value(row: &AnyRow, i: usize) -> Result<serde_json::Value, sqlx::Error> {
    Ok(serde_json::to_value(cell(row, i)?).unwrap_or(serde_json::Value::Null))
}

/// One exported value, its text borrowed from the row it was read from.
#[derive(Debug, Clone, Copy)]
pub(super) enum Cell<'r> {
    Null,
    Bool(bool),
    Int(i64),
    /// A finite number (JSON has no others; they export as null).
    Float(f64),
    Text(&'r str),
    /// Bytes, exported as lowercase hex.
    Blob(&'r [u8]),
}

/// Column `i` of `row`, by the type the database reports. The export columns are whatever
/// the rules name, so the row has no fixed shape to read into a struct.
pub(super) fn cell(row: &AnyRow, i: usize) -> Result<Cell<'_>, sqlx::Error> {
    let raw = row.try_get_raw(i)?;
    if raw.is_null() {
        return Ok(Cell::Null);
    }
    let kind = raw.type_info().kind();
    Ok(match kind {
        AnyTypeInfoKind::Null => Cell::Null,
        AnyTypeInfoKind::Bool => Cell::Bool(row.try_get(i)?),
        AnyTypeInfoKind::SmallInt | AnyTypeInfoKind::Integer | AnyTypeInfoKind::BigInt => {
            Cell::Int(row.try_get(i)?)
        }
        AnyTypeInfoKind::Real | AnyTypeInfoKind::Double => {
            let f: f64 = row.try_get(i)?;
            if f.is_finite() {
                Cell::Float(f)
            } else {
                Cell::Null
            }
        }
        AnyTypeInfoKind::Text => Cell::Text(row.try_get(i)?),
        AnyTypeInfoKind::Blob => Cell::Blob(row.try_get(i)?),
    })
}

impl serde::Serialize for Cell<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match *self {
            Cell::Null => serializer.serialize_unit(),
            Cell::Bool(b) => serializer.serialize_bool(b),
            Cell::Int(n) => serializer.serialize_i64(n),
            Cell::Float(f) => serializer.serialize_f64(f),
            Cell::Text(t) => serializer.serialize_str(t),
            Cell::Blob(b) => serializer.serialize_str(&hex::encode(b)),
        }
    }
}

/// A value as a CSV field: NULL is empty, text as it is but for a formula's first character
/// ([`csv_text`]), numbers and booleans as in JSON.
fn csv_field<'a>(value: &Cell<'a>) -> Cow<'a, [u8]> {
    match *value {
        Cell::Null => Cow::Borrowed(b""),
        Cell::Text(t) => csv_text(t),
        Cell::Blob(b) => Cow::Owned(hex::encode(b).into_bytes()),
        other => Cow::Owned(serde_json::to_vec(&other).unwrap_or_default()),
    }
}

/// Appends `value` as JSON: text through [`push_json_str`], the rest as serde_json writes it.
fn push_json_value(out: &mut Vec<u8>, value: &Cell<'_>) {
    match *value {
        Cell::Text(t) => push_json_str(out, t),
        // Writing into a Vec cannot fail, and a Cell always encodes.
        other => {
            let _ = serde_json::to_writer(&mut *out, &other);
        }
    }
}

/// How long [`pool_timed_out`] waits for its one connection's answer.
const PROBE_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// The transient error for a pool that gave no connection in time, `context` saying what was
/// being done. sqlx's pool keeps trying to connect while the server answers "too many
/// connections" (53300) or "starting up" (57P03), or refuses the TCP connection, and then
/// reports only that it timed out, which hides why. One connection opened directly with the
/// pool's settings gets the server's answer, which then is the reason; when it connects,
/// the pool's connections were all busy, and the reason says so.
async fn pool_timed_out(pool: &sqlx::AnyPool, context: &str) -> ConnectorError {
    use sqlx::{ConnectOptions as _, Connection as _};
    let message = match tokio::time::timeout(PROBE_WAIT, pool.connect_options().connect()).await {
        Ok(Err(e)) => format!("{context}: no connection could be opened: {e}"),
        Ok(Ok(conn)) => {
            // Only the answer was wanted; a failed goodbye changes nothing.
            let _ = conn.close().await;
            format!(
                "{context}: {}, with all {} of its connections in use",
                sqlx::Error::PoolTimedOut,
                pool.size()
            )
        }
        Err(_) => format!(
            "{context}: {}, and the database did not answer a new connection within {} s",
            sqlx::Error::PoolTimedOut,
            PROBE_WAIT.as_secs()
        ),
    };
    ConnectorError::Transient(message)
}

/// [`classify`] for a statement run on the pool itself, or a transaction's start: a pool
/// that gave no connection in time gets the server's answer as its reason
/// ([`pool_timed_out`]).
pub(super) async fn classify_pooled(
    pool: &sqlx::AnyPool,
    context: &str,
    err: &sqlx::Error,
) -> ConnectorError {
    match err {
        sqlx::Error::PoolTimedOut => pool_timed_out(pool, context).await,
        other => classify(context, other),
    }
}

/// What SQLite says of every error of its SQLITE_READONLY family (primary code 8, whatever
/// the extended code): the connection cannot write the database. [`says_read_only`] looks
/// for it.
const SQLITE_READ_ONLY_TEXT: &str = "attempt to write a readonly database";

/// What the operator is told beside a SQLite read-only error. A connection that SQLite
/// opened read-only stays so, and the connector closes it after such an error
/// (`SqlConnector`'s `close_read_only_writer`), so that a retry after the fix succeeds.
pub(super) const READ_ONLY_ADVICE: &str = "SQLite has the holder's file open read-only: check \
     that the processor's user can write the file, the -wal and -shm files beside it and \
     their folder (permissions and ownership, an immutable attribute, a read-only mount), \
     then retry; the connector opens the file again for the next attempt";

/// SQLite's primary result code of `err` (the low byte of the extended code it reports), or
/// `None` when no SQLite database error it is. A PostgreSQL SQLSTATE is a number too, so
/// which backend spoke is checked first.
pub(super) fn sqlite_primary_code(err: &sqlx::Error) -> Option<u32> {
    let db = err.as_database_error()?;
    db.try_downcast_ref::<sqlx::sqlite::SqliteError>()?;
    let code = db.code()?.parse::<u32>().ok()?;
    Some(code & 0xff)
}

/// Whether `err` is SQLite's SQLITE_READONLY (8) with any extended code: the connection
/// cannot write the file (opened read-only, or its -wal or -shm file not writable).
pub(super) fn is_sqlite_read_only(err: &sqlx::Error) -> bool {
    sqlite_primary_code(err) == Some(8)
}

/// Whether `error` reports a SQLite read-only error, as [`classify`] words it or as SQLite's
/// own text carried in another message.
pub(super) fn says_read_only(error: &ConnectorError) -> bool {
    error.to_string().contains(SQLITE_READ_ONLY_TEXT)
}

/// Sorts a database error into worth-retrying or not; `context` says what was being done.
/// A SQLite read-only error stays permanent (the task fails at once and the operator retries
/// it after the fix), its message followed by [`READ_ONLY_ADVICE`].
pub(super) fn classify(context: &str, err: &sqlx::Error) -> ConnectorError {
    let message = if is_sqlite_read_only(err) {
        format!("{context}: {err}; {READ_ONLY_ADVICE}")
    } else {
        format!("{context}: {err}")
    };
    if is_transient(err) {
        ConnectorError::Transient(message)
    } else {
        ConnectorError::Permanent(message)
    }
}

fn is_transient(err: &sqlx::Error) -> bool {
    match err {
        sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::Io(_)
        | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Database(db) => {
            let message = db.message().to_ascii_lowercase();
            let code = db.code().map(|c| c.into_owned()).unwrap_or_default();
            // Which backend spoke decides how its code reads: a SQLSTATE such as 22021 or
            // 42501 is a number too, whose low byte reads as SQLITE_BUSY.
            let sqlite = db.try_downcast_ref::<sqlx::sqlite::SqliteError>().is_some();
            // SQLite reports extended result codes; the low byte is the primary one, and
            // SQLITE_BUSY (5) and SQLITE_LOCKED (6) mean another writer holds the database.
            let sqlite_busy = matches!(sqlite_primary_code(err), Some(5 | 6));
            // PostgreSQL: connection exceptions (08), serialization failures and deadlocks,
            // insufficient resources (53), shutdown or start-up (57P0x), lock not available,
            // and a cancelled statement (57014): statement_timeout raises it on a busy
            // server, and the same statement may well finish on a later try.
            // A refused login too (class 28: a role without LOGIN, a password changed at
            // the holder before the processor's configuration): the operator fixes it at
            // the holder or in the configuration while the due date runs, and each task then
            // completes on a later try, instead of every task in flight failing for good and
            // waiting for a retry by hand. Meanwhile the holder is marked unreachable with
            // this error as the reason. PostgreSQL's only: SQLite's code 2826 starts alike.
            let postgres_transient = code.starts_with("08")
                || (!sqlite && code.starts_with("28"))
                || code.starts_with("53")
                || matches!(
                    code.as_str(),
                    "40001" | "40P01" | "55P03" | "57014" | "57P01" | "57P02" | "57P03"
                );
            sqlite_busy
                || postgres_transient
                || message.contains("database is locked")
                || message.contains("database table is locked")
        }
        other => {
            let text = other.to_string().to_ascii_lowercase();
            text.contains("connection refused")
                || text.contains("connection reset")
                || text.contains("timed out")
        }
    }
}

#[cfg(test)]
mod tests {
    use dsrelay_runtime::store::Db;

    use super::*;
    use crate::sql::tests::{email, fresh_postgres_database, now, sample, PostgresTestDb, MAIJA};

    /// Every kind of value reads the same in both files as it did when values were copied
    /// into JSON first: numbers and booleans as in JSON, bytes as lowercase hex, NULL as
    /// null in JSON and an empty CSV field, text as it is (escaped only in JSON; in CSV a
    /// formula gets a `'` in front).
    #[test]
    fn cells_encode_as_json_values_did() {
        let cells = [
            (Cell::Null, serde_json::Value::Null, ""),
            (Cell::Bool(true), serde_json::json!(true), "true"),
            (Cell::Int(-42), serde_json::json!(-42), "-42"),
            (Cell::Float(1.5e20), serde_json::json!(1.5e20), "1.5e+20"),
            (Cell::Float(0.1), serde_json::json!(0.1), "0.1"),
            (
                Cell::Text("a \"b\"\n"),
                serde_json::json!("a \"b\"\n"),
                "a \"b\"\n",
            ),
            (
                Cell::Blob(&[0x00, 0xab, 0x10]),
                serde_json::json!("00ab10"),
                "00ab10",
            ),
            // A formula is defused in CSV only; a number's sign is no formula.
            (Cell::Text("=1+1"), serde_json::json!("=1+1"), "'=1+1"),
            (Cell::Int(-7), serde_json::json!(-7), "-7"),
        ];
        for (cell, json, csv) in cells {
            assert_eq!(serde_json::to_value(cell).unwrap(), json, "{cell:?}");
            assert_eq!(
                serde_json::to_string(&cell).unwrap(),
                json.to_string(),
                "{cell:?}"
            );
            assert_eq!(&*csv_field(&cell), csv.as_bytes(), "{cell:?}");
            let mut pushed = Vec::new();
            push_json_value(&mut pushed, &cell);
            assert_eq!(pushed, json.to_string().into_bytes(), "{cell:?}");
        }
    }

    #[test]
    fn classifies_sqlx_errors() {
        let refused = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        assert!(classify("x", &sqlx::Error::Io(refused)).is_transient());
        assert!(classify("x", &sqlx::Error::PoolTimedOut).is_transient());
        assert!(!classify("x", &sqlx::Error::RowNotFound).is_transient());
        let err = classify("deleting from t", &sqlx::Error::ColumnNotFound("c".into()));
        assert_eq!(
            err,
            ConnectorError::Permanent("deleting from t: no column found for name: c".into())
        );
    }

    #[tokio::test]
    async fn locked_sqlite_database_is_transient() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}/accounting.db", dir.path().display());
        let (connector, _) = sample(&url).await;
        let other = Db::connect(&url).await.unwrap();
        let mut writer = other.pool.acquire().await.unwrap();
        sqlx::query("BEGIN IMMEDIATE")
            .execute(&mut *writer)
            .await
            .unwrap();
        // Waits out the 5 s busy timeout Db sets, then gives up.
        let err = connector
            .scope("acme")
            .unwrap()
            .erase(&[email(MAIJA)], now())
            .await
            .unwrap_err();
        assert!(err.is_transient(), "{err:?}");
        assert!(err.to_string().contains("database is locked"), "{err}");
        sqlx::query("ROLLBACK").execute(&mut *writer).await.unwrap();
    }

    /// A statement cut off by `statement_timeout` (SQLSTATE 57014) is worth retrying: the
    /// timeout says the server was slow, not that the statement is wrong.
    #[tokio::test]
    async fn postgres_statement_timeout_is_transient() {
        let Some(db) = fresh_postgres_database("postgres_statement_timeout_is_transient").await
        else {
            return;
        };
        let conn = Db::connect(&db.url).await.unwrap();
        let mut one = conn.pool.acquire().await.unwrap();
        sqlx::query("SET statement_timeout = '50ms'")
            .execute(&mut *one)
            .await
            .unwrap();
        let raw = sqlx::query("SELECT pg_sleep(5)")
            .execute(&mut *one)
            .await
            .unwrap_err();
        drop(one);
        conn.pool.close().await;
        db.drop_database().await;
        let code = raw.as_database_error().and_then(|e| e.code());
        assert_eq!(code.as_deref(), Some("57014"), "{raw}");
        let err = classify("reading the kept rows of invoices", &raw);
        assert!(err.is_transient(), "{err:?}");
    }

    /// A PostgreSQL error whose SQLSTATE's low byte reads as SQLITE_BUSY (22021: a NUL in
    /// text, 22021 & 0xff = 5) is permanent: retrying sends the same bytes again.
    #[tokio::test]
    async fn postgres_codes_are_not_read_as_sqlite_busy() {
        let Some(db) = fresh_postgres_database("postgres_codes_are_not_read_as_sqlite_busy").await
        else {
            return;
        };
        let conn = Db::connect(&db.url).await.unwrap();
        let raw = sqlx::query("SELECT CAST($1 AS TEXT)")
            .bind("a\0b")
            .execute(&conn.pool)
            .await
            .unwrap_err();
        conn.pool.close().await;
        db.drop_database().await;
        let code = raw.as_database_error().and_then(|e| e.code());
        assert_eq!(code.as_deref(), Some("22021"), "{raw}");
        let err = classify("matching customers", &raw);
        assert!(!err.is_transient(), "{err:?}");
    }

    /// A sample holder on a database of its own owned by a role of its own (a superuser
    /// would pass a database's connection limit), for a test that turns the role or the
    /// database away; `None` without a test server.
    struct OwnRole {
        admin: Db,
        role: String,
        name: String,
        db: PostgresTestDb,
        connector: super::super::SqlConnector,
    }

    impl OwnRole {
        async fn new(test: &str) -> Option<Self> {
            let db = fresh_postgres_database(test).await?;
            let admin = Db::connect(&std::env::var("DSRELAY_TEST_POSTGRES_URL").unwrap())
                .await
                .unwrap();
            let role = format!("r_{:016x}", fastrand::u64(..));
            let password = format!("{:016x}", fastrand::u64(..));
            let (server, query) = db.url.split_once('?').unwrap_or((&db.url, ""));
            let (scheme, rest) = server.split_once("://").unwrap();
            let host_and_name = rest.rsplit_once('@').map_or(rest, |(_, h)| h);
            let name = host_and_name.rsplit_once('/').unwrap().1.to_string();
            for sql in [
                format!("CREATE ROLE \"{role}\" LOGIN PASSWORD '{password}'"),
                format!("ALTER DATABASE \"{name}\" OWNER TO \"{role}\""),
            ] {
                sqlx::query(&sql).execute(&admin.pool).await.unwrap();
            }
            let mut url = format!("{scheme}://{role}:{password}@{host_and_name}");
            if !query.is_empty() {
                url = format!("{url}?{query}");
            }
            let (connector, check) = sample(&url).await;
            check.pool.close().await;
            Some(Self {
                admin,
                role,
                name,
                db,
                connector,
            })
        }

        /// Runs `turn_away` as the server's superuser, ends the role's sessions, and then
        /// erases a subject through the connector's scope, which has to connect anew.
        async fn erase_after(&self, turn_away: &str) -> ConnectorError {
            self.turn_away(turn_away).await;
            let scoped = self.connector.scope("acme").unwrap();
            scoped.erase(&[email(MAIJA)], now()).await.unwrap_err()
        }

        /// Runs `turn_away` as the server's superuser and ends the role's sessions, with the
        /// connector's pool left empty, so that its next statement has to connect anew.
        async fn turn_away(&self, turn_away: &str) {
            let scoped = self.connector.scope("acme").unwrap();
            // The pool's open connections, held so that none is handed out again after its
            // session ended; closed below, so that the erasure has to open one.
            let pool = &scoped.db.pool;
            // A connection dropped a moment ago goes back to the pool on a task of its own.
            while pool.num_idle() != pool.size() as usize {
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
            let mut held = Vec::new();
            for _ in 0..pool.num_idle() {
                held.push(pool.acquire().await.unwrap());
            }
            let turn_away = turn_away
                .replace("{role}", &self.role)
                .replace("{name}", &self.name);
            sqlx::query(&turn_away)
                .execute(&self.admin.pool)
                .await
                .unwrap();
            sqlx::query(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = $1",
            )
            .bind(&self.role)
            .execute(&self.admin.pool)
            .await
            .unwrap();
            for conn in held {
                // Its session is gone; only the pool's count of it matters.
                let _ = conn.close().await;
            }
            assert_eq!(pool.size(), 0);
        }

        async fn remove(self) {
            drop(self.connector);
            self.db.drop_database().await;
            sqlx::query(&format!("DROP ROLE \"{}\"", self.role))
                .execute(&self.admin.pool)
                .await
                .unwrap();
            self.admin.pool.close().await;
        }
    }

    /// A role the holder no longer lets log in (SQLSTATE 28000) makes the erasure wait and
    /// try again, not fail: the operator fixes the role or the configuration, and the reason
    /// names the refusal.
    #[tokio::test]
    async fn postgres_login_refused_is_transient_and_named() {
        let Some(holder) = OwnRole::new("postgres_login_refused_is_transient_and_named").await
        else {
            return;
        };
        let err = holder.erase_after("ALTER ROLE \"{role}\" NOLOGIN").await;
        holder.remove().await;
        assert!(err.is_transient(), "{err:?}");
        let reason = err.to_string();
        assert!(reason.contains("is not permitted to log in"), "{reason}");
        assert!(reason.starts_with("starting a transaction: "), "{reason}");
    }

    /// A database that takes no more connections makes the erasure wait with the server's
    /// answer as its reason, not the pool's timeout that hid it.
    #[tokio::test]
    async fn postgres_connection_limit_names_the_servers_answer() {
        let Some(holder) = OwnRole::new("postgres_connection_limit_names_the_servers_answer").await
        else {
            return;
        };
        let err = holder
            .erase_after("ALTER DATABASE \"{name}\" CONNECTION LIMIT 0")
            .await;
        holder.remove().await;
        assert!(err.is_transient(), "{err:?}");
        let reason = err.to_string();
        assert!(reason.contains("too many connections"), "{reason}");
        assert!(!reason.contains("pool timed out"), "{reason}");
    }

    /// What a contract end's export recorded as returned is discarded by statements on the
    /// pool itself, outside any transaction: a database that takes no more connections names
    /// the server's answer there too, not the pool's timeout.
    #[tokio::test]
    async fn postgres_connection_limit_names_the_servers_answer_outside_a_transaction() {
        let test = "postgres_connection_limit_names_the_servers_answer_outside_a_transaction";
        let Some(holder) = OwnRole::new(test).await else {
            return;
        };
        holder
            .turn_away("ALTER DATABASE \"{name}\" CONNECTION LIMIT 0")
            .await;
        let scoped = holder.connector.scope("acme").unwrap();
        let err = scoped
            .discard_returned("acme/ce-1/accounting", 10)
            .await
            .unwrap_err();
        holder.remove().await;
        assert!(err.is_transient(), "{err:?}");
        let reason = err.to_string();
        assert!(reason.contains("too many connections"), "{reason}");
        assert!(!reason.contains("pool timed out"), "{reason}");
        assert!(
            reason.starts_with("discarding what a contract end's export recorded as returned: "),
            "{reason}"
        );
    }
}
