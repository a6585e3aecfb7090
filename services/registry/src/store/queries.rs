//! Reads for the API and the operator: one request, filtered lists, a request's deliveries,
//! tasks and events, and pages of the audit trail.

use anyhow::Result;
use dsrelay_proto::v1::{RequestKind, TaskState, TaskStatus};
use dsrelay_runtime::audit;

use super::rows::{TaskRow, REQUEST_COLUMNS, TASK_COLUMNS};
use super::{placeholders, DeliveryRow, EventRow, Operation, RequestRow, Store};
use dsrelay_runtime::store::Backend;

/// Filters for listing.
#[derive(Debug, Default)]
pub struct ListFilter {
    /// Only this partner's requests.
    pub partner: Option<String>,
    /// Only these states (proto enum values).
    pub states: Vec<i32>,
    /// Only this kind (proto enum value).
    pub kind: Option<i32>,
    /// Only overdue ones: open and due before the `now` the list is read at.
    pub overdue_only: bool,
    /// Only open ones due before this instant (milliseconds since the epoch), found through
    /// `requests_open_by_due` (migration 0022): one range of due dates per open state.
    pub due_before: Option<i64>,
    /// Only those older than this (received_at, id) position.
    pub before: Option<(i64, String)>,
    /// At most this many.
    pub limit: i64,
}

/// A value bound to a placeholder of a query built at run time.
enum Bind {
    I64(i64),
    Text(String),
}

impl Store {
    /// One request, if it exists.
    pub async fn request(&self, id: &str) -> Result<Option<RequestRow>> {
        read_request(&self.db.reader, id).await
    }

    /// The request `id` if `partner` submitted it (`None`: whoever did): another partner's
    /// is `None`, read by the same one keyed statement as one that does not exist.
    pub async fn request_of(&self, id: &str, partner: Option<&str>) -> Result<Option<RequestRow>> {
        read_request_of(&self.db.reader, id, partner).await
    }

    /// The request `partner` stored under `idempotency_key`, with its body hash, if any.
    pub async fn request_by_key(
        &self,
        partner: &str,
        idempotency_key: &str,
    ) -> Result<Option<(String, String)>> {
        Ok(sqlx::query_as(
            "SELECT id, body_hash FROM requests WHERE partner = $1 AND idempotency_key = $2",
        )
        .bind(partner)
        .bind(idempotency_key)
        .fetch_optional(&self.db.pool)
        .await?)
    }

    /// The request `id` with its deliveries and tasks, read from one snapshot of the store,
    /// so the request's state agrees with its tasks' (read one after the other, an
    /// acknowledgement applied in between showed a task COMPLETED under a request still
    /// DISPATCHED).
    pub async fn request_with_tasks(
        &self,
        id: &str,
    ) -> Result<Option<(RequestRow, Vec<DeliveryRow>, Vec<TaskStatus>)>> {
        self.request_of_with_tasks(id, None).await
    }

    /// [`Store::request_with_tasks`] for a reader who may only see `partner`'s requests
    /// (`None`: every request). Another partner's request is `None` as one that does not
    /// exist is, read by the same one keyed statement, and nothing else of it is read: what
    /// a reader is refused takes no longer to refuse whatever the request holds.
    pub async fn request_of_with_tasks(
        &self,
        id: &str,
        partner: Option<&str>,
    ) -> Result<Option<(RequestRow, Vec<DeliveryRow>, Vec<TaskStatus>)>> {
        let mut tx = self.snapshot().await?;
        let Some(row) = read_request_of(&mut *tx, id, partner).await? else {
            return Ok(None);
        };
        let deliveries = read_deliveries(&mut *tx, id).await?;
        let tasks = read_tasks(&mut *tx, id).await?;
        tx.commit().await?;
        Ok(Some((row, deliveries, tasks)))
    }

    /// A read-only transaction whose reads all see one snapshot of the store, so that what
    /// they return agrees (a request's state with its tasks'). Commit it when done.
    pub(super) async fn snapshot(&self) -> Result<sqlx::Transaction<'static, sqlx::Any>> {
        let mut tx = self.db.reader.begin().await?;
        // SQLite's deferred transaction reads one snapshot from its first read on (WAL);
        // PostgreSQL needs REPEATABLE READ for that, READ COMMITTED reads anew per statement.
        if self.db.backend == dsrelay_runtime::store::Backend::Postgres {
            sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
                .execute(&mut *tx)
                .await?;
        }
        Ok(tx)
    }

    /// The kinds of those of `ids` that were delivered to `processor`: those this registry
    /// remembers (`routes`) without a read, the rest in one query. The
    /// others are left out whether they exist or not, so that what a processor is told
    /// about a request never depends on whether another processor's request of that id
    /// exists.
    pub async fn kinds_delivered_to(
        &self,
        processor: &str,
        ids: &[&str],
    ) -> Result<std::collections::HashMap<String, RequestKind>> {
        let (mut out, ids) = self.routes.lookup(processor, ids);
        // Driven by the deliveries' key (request, processor, operation), one lookup per id.
        // The form `requests WHERE id IN (...) AND EXISTS (deliveries ...)` let PostgreSQL,
        // on tables not yet analyzed, scan every delivery and test each against the whole
        // list (0.8 s for 170 ids among 3,400 requests).
        for chunk in ids.chunks(500) {
            let sql = format!(
                "SELECT r.id, r.kind FROM deliveries d JOIN requests r ON r.id = d.request_id \
                 WHERE d.request_id IN ({}) AND d.processor = $1 AND d.op = $2",
                placeholders(3, chunk.len())
            );
            let sql = self.db.backend.numbered(&sql);
            let mut q = sqlx::query_as::<_, (String, i64)>(&sql)
                .bind(processor)
                .bind(Operation::Deliver.as_str());
            for id in chunk {
                q = q.bind(*id);
            }
            let read: Vec<(String, RequestKind)> = q
                .fetch_all(&self.db.reader)
                .await?
                .into_iter()
                .map(|(id, kind)| {
                    let kind = i32::try_from(kind)
                        .ok()
                        .and_then(|k| RequestKind::try_from(k).ok())
                        .unwrap_or(RequestKind::Unspecified);
                    (id, kind)
                })
                .collect();
            self.routes.remember(
                read.iter()
                    .map(|(id, kind)| (processor, id.as_str(), *kind)),
            );
            out.extend(read);
        }
        Ok(out)
    }

    /// A request's deliveries (not the calls that follow them), by processor name.
    pub async fn deliveries(&self, id: &str) -> Result<Vec<DeliveryRow>> {
        let mut rows = read_deliveries(&self.db.reader, id).await?;
        rows.retain(|d| d.op == Operation::Deliver);
        Ok(rows)
    }

    /// A request's deliveries and the calls that follow them, by processor name, each
    /// processor's Deliver first.
    pub async fn deliveries_with_follow_ups(&self, id: &str) -> Result<Vec<DeliveryRow>> {
        read_deliveries(&self.db.reader, id).await
    }

    /// The deliveries of each of `ids` (at most a page of them) and the calls that follow
    /// them, by request id: one query for the whole page.
    pub async fn deliveries_of(
        &self,
        ids: &[String],
    ) -> Result<std::collections::HashMap<String, Vec<DeliveryRow>>> {
        #[derive(sqlx::FromRow)]
        struct Keyed {
            request_id: String,
            #[sqlx(flatten)]
            row: DeliveryRow,
        }
        let mut out = std::collections::HashMap::new();
        if ids.is_empty() {
            return Ok(out);
        }
        let sql = format!(
            "SELECT request_id, {DELIVERY_COLUMNS} FROM deliveries WHERE request_id IN ({}) \
             ORDER BY request_id, processor, {}",
            placeholders(1, ids.len()),
            deliver_first()
        );
        let sql = self.db.backend.numbered(&sql);
        let mut q = sqlx::query_as::<_, Keyed>(&sql);
        for id in ids {
            q = q.bind(id);
        }
        for k in q.fetch_all(&self.db.reader).await? {
            out.entry(k.request_id).or_insert_with(Vec::new).push(k.row);
        }
        Ok(out)
    }

    /// The tasks of each of `ids` (at most a page of them), by request id: one query for the
    /// whole page.
    pub async fn tasks_of(
        &self,
        ids: &[String],
    ) -> Result<std::collections::HashMap<String, Vec<TaskStatus>>> {
        read_tasks_of(&self.db.reader, self.db.backend, ids).await
    }

    /// A request's tasks.
    pub async fn tasks(&self, id: &str) -> Result<Vec<TaskStatus>> {
        read_tasks(&self.db.reader, id).await
    }

    /// Requests matching `f`, newest first.
    pub async fn list(&self, f: &ListFilter, now: i64) -> Result<Vec<RequestRow>> {
        self.list_about(f, &[], now).await
    }

    /// Requests matching `f` that hold one of `identity_hashes` (keyed identity hashes, as
    /// `requests.identity_hashes` holds them), newest first; with none given, every request
    /// matching `f`. The hashes are looked up in `request_identity_hashes` (migration 0021),
    /// which holds each request's, so a subject's few requests are read by key, not found by
    /// reading every request (or every one of a partner's).
    pub async fn list_about(
        &self,
        f: &ListFilter,
        identity_hashes: &[String],
        now: i64,
    ) -> Result<Vec<RequestRow>> {
        let (sql, binds) = list_statement(f, identity_hashes, now);
        let mut q = sqlx::query_as(&sql);
        for b in binds {
            q = match b {
                Bind::I64(v) => q.bind(v),
                Bind::Text(v) => q.bind(v),
            };
        }
        Ok(q.fetch_all(&self.db.reader).await?)
    }

    /// Every event of a request, oldest first.
    pub async fn events(&self, id: &str) -> Result<Vec<EventRow>> {
        Ok(sqlx::query_as(
            "SELECT id, type, occurred_at, request_state, processor, subprocessor, task_state, \
             sequence, attempt, message, trace_id, span_id, progress FROM events \
             WHERE request_id = $1 \
             ORDER BY id",
        )
        .bind(id)
        .fetch_all(&self.db.reader)
        .await?)
    }

    /// At most `limit` events of a request with an id above `after`, oldest first: one page
    /// of ListEvents, read without loading the others.
    pub async fn events_page(&self, id: &str, after: i64, limit: i64) -> Result<Vec<EventRow>> {
        Ok(sqlx::query_as(
            "SELECT id, type, occurred_at, request_state, processor, subprocessor, task_state, \
             sequence, attempt, message, trace_id, span_id, progress FROM events \
             WHERE request_id = $1 AND id > $2 \
             ORDER BY id LIMIT $3",
        )
        .bind(id)
        .bind(after)
        .bind(limit)
        .fetch_all(&self.db.reader)
        .await?)
    }

    /// Whether a cancelled request's state can no longer change by itself: no task
    /// is unsettled (a holder already called may still finish, and a cancellation that
    /// stopped nothing gives way to what the tasks report, see
    /// `crate::fold::fold_request`), and no Deliver the cancellation withdrew is still in
    /// flight (claimed, its lease running: its processor may yet accept it, and its answer
    /// then counts, see [`Store::deliveries_succeeded`]).
    pub async fn cancellation_settled(&self, id: &str) -> Result<bool> {
        // Leases are set and read on the database's clock.
        let db_now = self.db.backend.now_ms();
        let settled = [
            TaskState::Completed,
            TaskState::NotFound,
            TaskState::Refused,
            TaskState::Failed,
            TaskState::Cancelled,
            TaskState::Retained,
        ];
        debug_assert!(settled.iter().all(|s| crate::fold::task_is_settled(*s)));
        let settled = settled
            .iter()
            .map(|s| (*s as i32).to_string())
            .collect::<Vec<_>>()
            .join(", ");
        let open: i64 = sqlx::query_scalar(&format!(
            "SELECT (SELECT COUNT(*) FROM deliveries WHERE request_id = $1 AND op = $2 \
             AND withdrawn_at IS NOT NULL AND lease_until > {db_now}) + \
             (SELECT COUNT(*) FROM tasks WHERE request_id = $1 AND state NOT IN ({settled}))"
        ))
        .bind(id)
        .bind(Operation::Deliver.as_str())
        .fetch_one(&self.db.reader)
        .await?;
        Ok(open == 0)
    }

    /// Up to `limit` audit trail entries after `after_seq`, oldest first, once the entries
    /// committed before the call are chained.
    pub async fn audit_entries(&self, after_seq: u64, limit: i64) -> Result<Vec<audit::Entry>> {
        self.chain_audit().await?;
        audit::table::entries(&self.db.reader, after_seq, limit).await
    }
}

/// The statement of [`Store::list_about`] and the values of its placeholders, in order.
fn list_statement(f: &ListFilter, identity_hashes: &[String], now: i64) -> (String, Vec<Bind>) {
    // Built by hand rather than with sqlx's QueryBuilder: through the `Any` driver that
    // writes `?` placeholders, which PostgreSQL does not accept.
    let mut binds = Vec::new();
    let param = |b: Bind, binds: &mut Vec<Bind>| {
        binds.push(b);
        format!("${}", binds.len())
    };
    // The page's ids first, the columns of those rows after: `REQUEST_COLUMNS` holds a
    // subquery (`answered_at`) that SQLite, sorting, would otherwise compute for every
    // matching row before applying the LIMIT.
    let mut sql = if identity_hashes.is_empty() {
        "SELECT requests.id FROM requests WHERE 1 = 1".to_string()
    } else {
        let list: Vec<String> = identity_hashes
            .iter()
            .map(|h| param(Bind::Text(h.clone()), &mut binds))
            .collect();
        // The subject's few requests found by the hashes' key, then read by id. SQLite,
        // whose tables are never analyzed, otherwise walks the index of a partner or of
        // states and tests every request it finds against the hashes; its CROSS JOIN
        // keeps the hashes the outer loop (PostgreSQL plans the join by its own costs).
        format!(
            "SELECT requests.id FROM (SELECT DISTINCT request_id \
             FROM request_identity_hashes WHERE hash IN ({})) AS about \
             CROSS JOIN requests WHERE requests.id = about.request_id",
            list.join(", ")
        )
    };
    if let Some(p) = &f.partner {
        let n = param(Bind::Text(p.clone()), &mut binds);
        sql.push_str(&format!(" AND partner = {n}"));
    }
    if !f.states.is_empty() {
        let list: Vec<String> = f
            .states
            .iter()
            .map(|s| param(Bind::I64(i64::from(*s)), &mut binds))
            .collect();
        sql.push_str(&format!(" AND state IN ({})", list.join(", ")));
    }
    if let Some(k) = f.kind {
        let n = param(Bind::I64(i64::from(k)), &mut binds);
        sql.push_str(&format!(" AND kind = {n}"));
    }
    let open = crate::fold::OPEN_STATES
        .map(|s| (s as i32).to_string())
        .join(", ");
    // Overdue is due before `now`; with `due_before` as well, the smaller bound holds both.
    let due_bound = match (f.overdue_only.then_some(now), f.due_before) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    };
    if let Some(bound) = due_bound {
        let n = param(Bind::I64(bound), &mut binds);
        sql.push_str(&format!(" AND due_at < {n} AND state IN ({open})"));
    }
    if let Some((at, id)) = &f.before {
        let a = param(Bind::I64(*at), &mut binds);
        let a2 = param(Bind::I64(*at), &mut binds);
        let i = param(Bind::Text(id.clone()), &mut binds);
        sql.push_str(&format!(
            " AND (received_at < {a} OR (received_at = {a2} AND id < {i}))"
        ));
    }
    let n = param(Bind::I64(f.limit), &mut binds);
    sql.push_str(&format!(" ORDER BY received_at DESC, id DESC LIMIT {n}"));
    let sql = format!(
        "SELECT {REQUEST_COLUMNS} FROM requests WHERE id IN ({sql}) \
         ORDER BY received_at DESC, id DESC"
    );
    (sql, binds)
}

/// One request, if it exists, through `db` (the pool, or a snapshot's transaction).
async fn read_request<'e>(
    db: impl sqlx::Executor<'e, Database = sqlx::Any>,
    id: &str,
) -> Result<Option<RequestRow>> {
    Ok(sqlx::query_as(&format!(
        "SELECT {REQUEST_COLUMNS} FROM requests WHERE id = $1"
    ))
    .bind(id)
    .fetch_optional(db)
    .await?)
}

/// [`Store::request_of`] through `db`: the partner is part of the key looked up, so another
/// partner's request is never read.
async fn read_request_of<'e>(
    db: impl sqlx::Executor<'e, Database = sqlx::Any>,
    id: &str,
    partner: Option<&str>,
) -> Result<Option<RequestRow>> {
    let Some(partner) = partner else {
        return read_request(db, id).await;
    };
    Ok(sqlx::query_as(&format!(
        "SELECT {REQUEST_COLUMNS} FROM requests WHERE id = $1 AND partner = $2"
    ))
    .bind(id)
    .bind(partner)
    .fetch_optional(db)
    .await?)
}

/// The columns of a [`DeliveryRow`].
const DELIVERY_COLUMNS: &str = "processor, op, attempts, next_attempt_at, last_error, done_at, \
     dead_lettered_at, withdrawn_at";

/// An ORDER BY term putting a processor's Deliver before the calls that follow it, which come
/// in the order of their names.
fn deliver_first() -> String {
    format!(
        "CASE WHEN op = '{}' THEN 0 ELSE 1 END, op",
        Operation::Deliver
    )
}

/// [`Store::deliveries_with_follow_ups`] through `db` (the pool, or a snapshot's
/// transaction).
pub(super) async fn read_deliveries<'e>(
    db: impl sqlx::Executor<'e, Database = sqlx::Any>,
    id: &str,
) -> Result<Vec<DeliveryRow>> {
    Ok(sqlx::query_as(&format!(
        "SELECT {DELIVERY_COLUMNS} FROM deliveries WHERE request_id = $1 \
         ORDER BY processor, {}",
        deliver_first()
    ))
    .bind(id)
    .fetch_all(db)
    .await?)
}

/// A request's tasks, through `db`.
pub(super) async fn read_tasks<'e>(
    db: impl sqlx::Executor<'e, Database = sqlx::Any>,
    id: &str,
) -> Result<Vec<TaskStatus>> {
    let rows: Vec<TaskRow> = sqlx::query_as(&format!(
        "SELECT {TASK_COLUMNS} FROM tasks WHERE request_id = $1 \
         ORDER BY processor, subprocessor"
    ))
    .bind(id)
    .fetch_all(db)
    .await?;
    Ok(rows.into_iter().map(TaskStatus::from).collect())
}

/// [`Store::tasks_of`] through `db` (the pool, or a snapshot's transaction).
pub(super) async fn read_tasks_of<'e>(
    db: impl sqlx::Executor<'e, Database = sqlx::Any>,
    backend: Backend,
    ids: &[String],
) -> Result<std::collections::HashMap<String, Vec<TaskStatus>>> {
    #[derive(sqlx::FromRow)]
    struct Keyed {
        request_id: String,
        #[sqlx(flatten)]
        row: TaskRow,
    }
    let mut out = std::collections::HashMap::new();
    if ids.is_empty() {
        return Ok(out);
    }
    let sql = format!(
        "SELECT request_id, {TASK_COLUMNS} FROM tasks WHERE request_id IN ({}) \
         ORDER BY request_id, processor, subprocessor",
        placeholders(1, ids.len())
    );
    let sql = backend.numbered(&sql);
    let mut q = sqlx::query_as::<_, Keyed>(&sql);
    for id in ids {
        q = q.bind(id);
    }
    for k in q.fetch_all(db).await? {
        out.entry(k.request_id)
            .or_insert_with(Vec::new)
            .push(TaskStatus::from(k.row));
    }
    Ok(out)
}

#[cfg(test)]
mod due_plan_tests {
    //! List by due date reads the open requests' due dates through their index (migration
    //! 0022), not every request: checked on the plan each database makes for its statement.

    use dsrelay_proto::v1::RequestKind;
    use dsrelay_runtime::store::{Backend, Db};
    use sqlx::Row;

    use super::{list_statement, Bind, ListFilter};
    use crate::store::{NewRequest, Store, POSTGRES_MIGRATIONS, SQLITE_MIGRATIONS};
    use crate::test_postgres::on_postgres;

    /// Requests stored besides the seed, one in 500 of them open.
    const MANY: i64 = 5_000;

    /// The plan's lines for List with `due_before` over [`MANY`] requests, most of them
    /// answered long ago.
    async fn due_plan(url: &str) -> String {
        let db = Db::connect(url).await.expect("connect");
        db.migrate(&SQLITE_MIGRATIONS, &POSTGRES_MIGRATIONS)
            .await
            .expect("migrate");
        let store = Store::new(db, b"test key");
        store
            .insert_request(&NewRequest {
                id: "seed".into(),
                partner: "crm".into(),
                idempotency_key: "seed".into(),
                body_hash: "hash".into(),
                body: Vec::new(),
                identity_hashes: "[\"h\"]".into(),
                kind: RequestKind::Erasure as i32,
                received_at: 0,
                due_at: 1,
                trace_id: "0".repeat(32),
                traceparent: None,
                processors: Vec::new(),
            })
            .await
            .expect("the seed request");
        let db = &store.db;
        let (columns, series) = match db.backend {
            Backend::Sqlite => (
                "SELECT name FROM pragma_table_info('requests')",
                format!(
                    "(WITH RECURSIVE s(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM s \
                     WHERE n < {MANY}) SELECT n FROM s) AS g"
                ),
            ),
            Backend::Postgres => (
                "SELECT CAST(column_name AS TEXT) FROM information_schema.columns \
                 WHERE table_name = 'requests' AND table_schema = current_schema()",
                format!("generate_series(1, {MANY}) AS g(n)"),
            ),
        };
        let columns: Vec<String> = sqlx::query_scalar(columns)
            .fetch_all(&db.pool)
            .await
            .expect("the columns of requests");
        let values: Vec<String> = columns
            .iter()
            .map(|c| match c.as_str() {
                "id" => "'r' || g.n".to_string(),
                "idempotency_key" => "'k' || g.n".to_string(),
                "received_at" => "g.n".to_string(),
                "due_at" => "g.n * 1000".to_string(),
                "state" => "CASE WHEN g.n % 500 = 0 THEN 1 ELSE 4 END".to_string(),
                other => format!("requests.{other}"),
            })
            .collect();
        sqlx::query(&format!(
            "INSERT INTO requests ({}) SELECT {} FROM requests, {series} \
             WHERE requests.id = 'seed'",
            columns.join(", "),
            values.join(", ")
        ))
        .execute(&db.pool)
        .await
        .expect("many requests");
        let explain = match db.backend {
            // As the registry runs it: SQLite's tables are never analyzed.
            Backend::Sqlite => "EXPLAIN QUERY PLAN",
            Backend::Postgres => {
                sqlx::query("ANALYZE requests")
                    .execute(&db.pool)
                    .await
                    .expect("analyze");
                "EXPLAIN"
            }
        };
        let filter = ListFilter {
            limit: 51,
            due_before: Some(MANY * 500),
            ..Default::default()
        };
        let (sql, binds) = list_statement(&filter, &[], MANY * 1000);
        let explained = format!("{explain} {sql}");
        let mut q = sqlx::query(&explained);
        for b in binds {
            q = match b {
                Bind::I64(v) => q.bind(v),
                Bind::Text(v) => q.bind(v),
            };
        }
        let rows = q.fetch_all(&db.pool).await.expect("the plan");
        let column = match db.backend {
            Backend::Sqlite => "detail",
            Backend::Postgres => "QUERY PLAN",
        };
        rows.iter()
            .map(|r| r.try_get::<String, _>(column).expect("a plan line"))
            .collect::<Vec<_>>()
            .join("\n")
    }

    #[tokio::test]
    async fn due_before_reads_the_open_requests_index_on_sqlite() {
        let dir = tempfile::tempdir().expect("tempdir");
        let url = format!("sqlite://{}/registry.db", dir.path().display());
        let plan = due_plan(&url).await;
        assert!(plan.contains("requests_open_by_due"), "{plan}");
    }

    #[tokio::test]
    async fn due_before_reads_the_open_requests_index_on_postgres() {
        on_postgres(|url, _| async move {
            let plan = due_plan(&url).await;
            assert!(plan.contains("requests_open_by_due"), "{plan}");
            assert!(!plan.contains("Seq Scan on requests"), "{plan}");
        })
        .await;
    }
}

#[cfg(test)]
mod due_filter_tests {
    //! `overdue_only` and `due_before` together: the requests both select, through the one
    //! clause holding the smaller bound.

    use dsrelay_proto::v1::RequestKind;
    use dsrelay_runtime::store::Db;

    use super::{list_statement, ListFilter};
    use crate::store::{CancelOutcome, NewRequest, Store, POSTGRES_MIGRATIONS, SQLITE_MIGRATIONS};
    use crate::test_postgres::on_postgres;

    /// The ids `f` lists at `now`, sorted.
    async fn ids(store: &Store, f: &ListFilter, now: i64) -> Vec<String> {
        let mut ids: Vec<String> = store
            .list(f, now)
            .await
            .expect("list")
            .into_iter()
            .map(|r| r.id)
            .collect();
        ids.sort();
        ids
    }

    async fn both_filters_list_the_intersection(url: &str) {
        let db = Db::connect(url).await.expect("connect");
        db.migrate(&SQLITE_MIGRATIONS, &POSTGRES_MIGRATIONS)
            .await
            .expect("migrate");
        let store = Store::new(db, b"test key");
        for (id, due_at) in [("a", 100), ("b", 200), ("c", 300), ("d", 400), ("x", 50)] {
            store
                .insert_request(&NewRequest {
                    id: id.into(),
                    partner: "crm".into(),
                    idempotency_key: id.into(),
                    body_hash: "hash".into(),
                    body: Vec::new(),
                    identity_hashes: "[\"h\"]".into(),
                    kind: RequestKind::Erasure as i32,
                    received_at: 0,
                    due_at,
                    trace_id: "0".repeat(32),
                    traceparent: None,
                    // A delivery not yet accepted, which a cancellation stops.
                    processors: vec!["p1".into()],
                })
                .await
                .expect("a request");
        }
        // Due earliest but no longer open: neither filter lists it.
        assert!(matches!(
            store.cancel("x", "withdrawn", 10).await.expect("cancel"),
            CancelOutcome::Cancelled
        ));
        let filter = |overdue_only: bool, due_before: Option<i64>| ListFilter {
            overdue_only,
            due_before,
            limit: 10,
            ..Default::default()
        };
        // Each bound the smaller in turn, and both equal.
        for (now, due_before, expected) in [
            (350, 250, &["a", "b"][..]),
            (250, 350, &["a", "b"][..]),
            (150, 350, &["a"][..]),
            (300, 300, &["a", "b"][..]),
            (450, 90, &[][..]),
        ] {
            let overdue = ids(&store, &filter(true, None), now).await;
            let due = ids(&store, &filter(false, Some(due_before)), now).await;
            let both = ids(&store, &filter(true, Some(due_before)), now).await;
            let intersection: Vec<String> = overdue
                .iter()
                .filter(|id| due.contains(id))
                .cloned()
                .collect();
            assert_eq!(both, intersection, "now {now}, due_before {due_before}");
            assert_eq!(both, expected, "now {now}, due_before {due_before}");
            let (sql, _) = list_statement(&filter(true, Some(due_before)), &[], now);
            assert_eq!(sql.matches("due_at <").count(), 1, "{sql}");
        }
    }

    #[tokio::test]
    async fn overdue_and_due_before_list_the_intersection_on_sqlite() {
        let dir = tempfile::tempdir().expect("tempdir");
        let url = format!("sqlite://{}/registry.db", dir.path().display());
        both_filters_list_the_intersection(&url).await;
    }

    #[tokio::test]
    async fn overdue_and_due_before_list_the_intersection_on_postgres() {
        on_postgres(|url, _| async move {
            both_filters_list_the_intersection(&url).await;
        })
        .await;
    }
}
