//! Data-subject requests in accounting and ERP databases (SQLite or PostgreSQL), carried out by
//! declarative table rules.
//!
//! Each rule names a table and says, for that table:
//! - how the subject's rows are found: directly, by matching identity values against columns
//!   (`match`, see Matching below), or through a parent table's matched rows (`parent`). Only
//!   raw values of a matched type are searched by (the forms ListSubprocessors reports); the
//!   outcome's note names the identities left out (a hashed e-mail, a type no table
//!   matches), never their values, and a task with none to search by is
//!   [`Outcome::Refused`], its reason naming the types the match columns take;
//! - what erasure does with them (`action`): delete them, anonymize some columns
//!   (`anonymize`: `null`, or `redacted`, the text `[erased]`; the connector refuses at
//!   connect `redacted` on a column whose declared type takes no text, PostgreSQL's not of
//!   the string category or too short, SQLite's only in a STRICT table, and `null` on a NOT
//!   NULL one, counting only the columns the erasure writes, see `schema`), or `keep` them
//!   untouched. Kept rows are counted in the note (`kept 2 (action keep)`) beside what is
//!   erased. An erasure that finds the subject's rows only in `keep` tables erases
//!   nothing, so it is [`Outcome::Refused`], the reason saying so with
//!   the rows per table: neither [`Outcome::Completed`], which promises erasure, nor
//!   [`Outcome::NotFound`], since the data is there (a [`Phase::RetentionExpired`] run,
//!   whose first run erased, still completes with nothing left to erase);
//! - whether a legal obligation keeps them for a while (`retain`, see below);
//! - which columns a RETURN_OF_DATA or TRANSFER export contains (`export`): the subject's
//!   rows of each such table are written, as a cursor yields them (unsorted: in the order
//!   the database reads them), to `<table>.json` and `<table>.csv` in the task's export
//!   folder. Values go as the database gives them: numbers as numbers (a non-finite real
//!   as null), text as text, blobs as lowercase hex, NULL as null (an empty CSV field).
//!   SQLite has no boolean type, so a column declared BOOLEAN there exports its 0 and 1;
//!   PostgreSQL's exports `true` and `false`. A PostgreSQL column of any type but boolean,
//!   the integers, real, double precision, text, varchar and bytea (DATE, TIMESTAMPTZ,
//!   NUMERIC, UUID, CHAR(n), JSONB, a domain, ...) is exported as the database writes it as
//!   text (`CAST(col AS TEXT)`: `2024-03-02`, `12.50`, a TIMESTAMPTZ in the connection's
//!   time zone). In the CSV file only, a text beginning with `=`, `+`, `-`, `@`, a tab or a
//!   carriage return gets a `'` in front, so that a spreadsheet shows it instead of running
//!   it as a formula; the JSON file has it as stored;
//! - which column a RECTIFICATION of a logical field (`email`, `name`, ...) changes
//!   (`rectify`). A field no table maps is left out and named in the note (`not corrected:
//!   "last_name" (...)`), the others corrected; a request none of whose fields is mapped
//!   is REFUSED, naming them, whether or not the subject is here. The corrected value of an
//!   identity (a field named like a match key, or one written into a match column) is
//!   trimmed first. On PostgreSQL a value for a column of another type than text is cast to
//!   it (`CAST($1 AS date)`); one the type cannot hold fails the request with a permanent
//!   error naming the field, and nothing is changed. A value written into a match column
//!   that a row of the table other than the subject's (of the controller's data) already
//!   holds there, compared as the match compares (see Matching: an e-mail trimmed and
//!   lowercased, a phone number without separators), is [`Outcome::Refused`] before
//!   anything is written, the reason naming the field and the table, never the value: the
//!   subject's identity would then find the other person's rows too;
//! - which 0/1 column a RESTRICTION sets or lifts (`restrict_column`) and which one an
//!   OBJECTION to direct marketing sets (`suppress_column`): 1 or 0, TRUE or FALSE into a
//!   PostgreSQL boolean; a PostgreSQL column of another type than boolean, number or text
//!   is refused at connect.
//!
//! The connector supports a request kind when some table is configured for it (ERASURE and
//! CONTRACT_END when some table is not `keep`; a contract end's return exports the tables
//! with `export` and writes no files when there are none).
//!
//! A RESTRICTION, OBJECTION or RECTIFICATION writes only the rows that do not hold the value
//! yet (`IS DISTINCT FROM` on PostgreSQL, `IS NOT` on SQLite: a NULL is changed) and counts
//! only those: when the subject's rows of a table all held it already, that table is
//! counted again (one statement) and the note says so (`customers: restricted 0, 1 already
//! were`), and the request is [`Outcome::Completed`] with 0 records, the data being there.
//! The tables the subject is matched in (with `match` columns of their own) that the kind
//! is not configured for (no `restrict_column`, no `suppress_column`, no `rectify` for the
//! request's fields) are counted too, in one statement: when a configured table holds the
//! subject's rows, the note names those holding some (`contacts: holds 1, not restricted
//! (no restrict_column)`); when only they hold them, nothing was done and the request is
//! [`Outcome::Refused`], the reason naming them with their rows. Only when no table holds
//! the subject's rows is it [`Outcome::NotFound`].
//!
//! # Matching
//!
//! A matched table's rows are those whose `match` columns equal one of the request's raw
//! identity values (bound as parameters; one term per identity, ORed):
//! - a customer number or national id: the column as it is, `"customer_no" = $1`. On
//!   PostgreSQL, whose columns the connector learns the types of when it connects, a column
//!   of an integer type is compared with the value cast, `"customer_no" = CAST($1 AS
//!   BIGINT)`, which its index serves; a value that is no integer is left out of that
//!   table's match (the note names it, as it names unsearched identities), since its cast
//!   would fail the request's other identities too. A column of another type than text
//!   (UUID, NUMERIC, ...) is compared as text, `CAST("ref" AS TEXT) = $1`, which only an
//!   index on that expression serves. An e-mail or phone column not of a text type is cast
//!   to text the same way in the forms below;
//! - an e-mail: stored addresses keep the case they were typed in, and `lower()` lowers only
//!   ASCII letters on SQLite and on PostgreSQL under the C collation. The stored address is
//!   trimmed of spaces, as the request's is, and `lower(trim("email"))` is compared with
//!   the request's address through the same `lower()` and, when the address has a
//!   non-ASCII letter, also with its non-ASCII letters in lower case and in capitals (each
//!   through `lower()` too: `lower(trim("email")) IN (lower($1), lower($2), lower($3))`).
//!   A stored address that differs from the request's in letter case is found when its
//!   non-ASCII letters are all in lower case, all capitals, or cased as in the request's
//!   ('äiti@x.fi', 'ÄITI@X.FI', 'Äiti@X.FI' for 'Äiti@x.fi'); one that mixes them otherwise
//!   ('Äiti.öljy@x.fi' for 'äiti.Öljy@x.fi') is found only where `lower()` is Unicode-aware
//!   (PostgreSQL under a libc or ICU locale other than C). An index on the expression
//!   serves the match: `CREATE INDEX customers_email_lower ON customers
//!   (lower(trim("email")))`; one on `lower("email")` does not;
//! - a phone number: the request's number is reduced to its digits and '+', and the column
//!   loses in SQL the separators people type (space, '-', '(', ')', '.', '/'), so that a
//!   stored '+358 40 123 4567' is found. An index on the bare column cannot serve that, and
//!   the phone term, ORed with the other identities', makes every statement of the request
//!   read the whole table (on PostgreSQL a full scan where a BitmapOr of indexes was): the
//!   probe, the counts, the anonymization and the deletion, and the child tables'
//!   subqueries. No form of the match is served by an index on the column: the stored
//!   separators are known only once the row is read.
//!
//! On a large table, index the exact expression the match uses, here for the match column
//! `phone` of `customers` (for another, the same with its names, the column double-quoted):
//!
//! ```sql
//! CREATE INDEX customers_phone_digits ON customers ((
//!     REPLACE(REPLACE(REPLACE(REPLACE(REPLACE(REPLACE("phone",
//!     ' ', ''), '-', ''), '(', ''), ')', ''), '.', ''), '/', '')
//! ));
//! ```
//!
//! Both databases use an index on an expression only for a query with the same expression
//! (a test holds this text to the code's). With it and an index on each other match column,
//! a request's statements read by index again.
//!
//! # Controllers
//!
//! A processor may serve several controllers from one holder. Without `controllers` the
//! data is not scoped: all of it belongs to whichever controller asks. With it, every task
//! and bulk job works only on its controller's data, and a controller not listed is refused
//! ([`Outcome::Refused`] naming it). Per controller, either:
//! - `condition`: a SQL condition over the columns of the matched (top-level) tables, ANDed
//!   into their selection (`tenant = 'acme'`); child tables are reached through their
//!   parent's selected rows, so the condition needs only the top-level tables' columns
//!   (every top-level table must have those it names). It must select the same rows after
//!   an erasure as before, so it must not name `anonymize` columns. Like `retain.while` it is
//!   spliced as written: trusted operator configuration, never user input;
//! - `url`: a database of the controller's own, with the configured tables; every row there
//!   is the controller's. Connected when the connector starts, as `url` is; the top-level
//!   `url` is not opened when every controller has a database of its own.
//!
//! # Data categories
//!
//! A table rule may name the data categories the table holds (`categories`, each one of the
//! subprocessor's, which the processor checks at start); a table without them holds every
//! category of its subprocessor, so a configuration naming none behaves as if there were no
//! categories. A task whose request is scoped to categories ([`Task::categories`]; empty
//! means all) sees only the tables holding one of them, for every kind of request (ERASURE
//! and its [`Phase::RetentionExpired`] runs, RETURN_OF_DATA, TRANSFER, RECTIFICATION,
//! RESTRICTION, OBJECTION): the others' rows are neither changed, nor exported, nor
//! counted, and the answer's note, or its refusal's reason, ends by naming them (`left out
//! by the request's categories (marketing): customers, invoices`). A child table in scope
//! is still found through its out-of-scope `parent`, whose matched rows are then only read.
//! A corrected field mapped only in out-of-scope tables is not corrected, and named as
//! mapped only outside the request's categories (a RECTIFICATION naming no other field is
//! refused so). A scope no table holds is [`Outcome::Refused`], naming the scope and each
//! table's categories, as is one whose tables are not configured for the request's kind
//! (an erasure there is neither completed nor answered not found: the holder never looked).
//!
//! A scoped request that would change rows of an out-of-scope table is refused before it
//! touches anything, its reason naming the tables (and columns):
//! - an erasure that deletes from a table that an out-of-scope table's rule hangs off
//!   (`parent`; the delete would leave those rows pointing at nothing, or fail on their
//!   foreign key), or from which a foreign key's own `ON DELETE CASCADE`, `SET NULL` or
//!   `SET DEFAULT` reaches an out-of-scope table (followed through cascades, also through
//!   tables the rules do not name);
//! - a request that updates a column an out-of-scope table's foreign key references with
//!   `ON UPDATE CASCADE`, `SET NULL` or `SET DEFAULT` (followed through the columns each
//!   such action changes, also in tables the rules do not name): the columns an erasure
//!   anonymizes (an `anonymize` table's, and those a `delete` table's kept rows are
//!   stripped of), a RECTIFICATION's `rectify` columns of the fields it corrects, a
//!   RESTRICTION's `restrict_column`, an OBJECTION's `suppress_column`. Only the columns a
//!   key references count: a key referencing `id` does not stop a correction of `email`.
//!
//! The foreign keys are read from the catalog at each such request; the refusal is decided
//! from the rules and the catalog, not from the subject's rows: a request of the categories
//! together, or of all, carries it out. Database triggers are not followed: a trigger that
//! changes another table's rows when a table in scope changes is invisible here, so tables
//! that triggers link must be given the same categories. An ON DELETE `SET NULL` or
//! `SET DEFAULT` into a table in scope is not followed on into that table's own `ON UPDATE`
//! keys either.
//!
//! A table's export files are labelled with its categories; for a scoped request, with its
//! categories met with the request's, whether or not some other table is out of scope (and
//! never with a category the processor does not label with). A table's configured `export`
//! columns all go out whichever of its categories were asked, as the rules do not say which
//! column holds which category. A table without categories keeps the label the processor
//! gives every file (every category the subprocessor holds). A contract end is not scoped:
//! it works on every table, its files labelled with each table's categories.
//!
//! A retention-expired re-run of a scoped erasure narrows under the configuration current
//! when it runs: changing a table's `categories` between the first run and the re-run
//! changes which tables the re-run erases.
//!
//! # Contract ends
//!
//! [`Connector::run_bulk`] works on all of the controller's rows: the top-level tables' rows
//! in scope, and the child rows linked to them (a child row linked to no parent row belongs
//! to no subject, as in a single request). It counts first (subjects: top-level rows;
//! records: rows of the tables the step handles) and reports [`crate::BulkProgress`] as it
//! goes.
//! - Export: each table with `export` columns, and each table the erasure deletes or
//!   anonymizes (with all of its columns when it has no `export` columns), is read with a
//!   cursor into `<table>.json` and `<table>.csv`, as a subject's export is. The counts and
//!   the reads are one transaction, one snapshot (REPEATABLE READ on PostgreSQL);
//!   subjects are the rows of the returned top-level tables, and the step's done counts are
//!   the rows it wrote. A connector that erases also records, first in that transaction,
//!   the key of every row it writes of the tables its erasure deletes or anonymizes (its
//!   primary key as text, see below) and a mark of the job (even for no rows), under the
//!   step's job id, in its table beside the receipts (`<receipts_table>_returned`, created
//!   by the first such export, which fails saying what to grant when it cannot), replacing
//!   what an earlier run of the step recorded. On PostgreSQL the transaction is then READ
//!   WRITE; a SQLite file's export writes the keys into a TEMP table, which takes no lock on
//!   the file, and copies them into the file's table in a short write transaction after the
//!   read. When such a table has no key (a view: no primary key, no `rowid` or `ctid`),
//!   nothing is recorded, the export's note says why, and the erasure after it compares
//!   totals.
//! - Erase: each top-level table with the tables found through it, in batches of about
//!   10,000 of its rows (more where rows share a batch key, and the last batch also takes
//!   the rows without one; ranges of the column the children link to, or of a match column
//!   for a table without children; the key is compared in its own type and order, its
//!   collation included, so that a batch reads its range from the key's index: the bounds
//!   are bound as text and cast to the declared type on PostgreSQL (`"id" > CAST($1 AS
//!   uuid)`, for text, integer, NUMERIC, UUID, DATE and TIMESTAMP keys) and converted by the
//!   column's affinity on SQLite; a PostgreSQL key of another type, and a SQLite column
//!   without affinity, are compared as text, which no index on the column serves; a SQLite
//!   key column found holding a BLOB when the step starts is compared by the hex of its
//!   bytes, which no index serves either; a batch whose end does not move past its start
//!   stops the step with a permanent error naming the table and key), one
//!   transaction per batch, children first. A batch runs the statements of a single
//!   erasure over all of its rows (a few per table, never one per subject), so retention
//!   applies exactly as for one subject: released rows get the table's action, kept rows
//!   lose what the obligation does not need, a parent row stays while a child kept through
//!   it does. Then one aggregate
//!   per `retain` table finds what is kept and the next release, and the step answers
//!   [`Outcome::Retained`] (the processor runs it again with [`Phase::RetentionExpired`]) or
//!   [`Outcome::Completed`]. Progress ends at the totals: every counted row was erased or
//!   is kept. Before the first batch, a `retain` table with a row of the controller whose
//!   date is missing or not `YYYY-MM-DD` (month 01–12, day 01–31) stops the step with a
//!   permanent error, as it stops a subject's erasure. A value that passes and is still no
//!   date (`2024-02-31`) is found when the batches are done, and stops the step then.
//! - Erase after a return ([`crate::BulkJob::returned`]), whose job id is the export's plus
//!   `#erase`: when the export recorded its rows' keys, the step checks and erases rows,
//!   not totals. Its first call counts, per table the erasure deletes or anonymizes (a
//!   `keep` table is not looked at: nothing erases a row added there), the controller's
//!   rows whose key was not recorded (in an anonymized table, those not yet anonymized,
//!   except in a child that holds its parent back, below, where every one counts):
//!   any stops the step with a permanent error naming how many per table, before anything
//!   is erased. Every Start call that finds the recorded keys (the first, and one resuming
//!   an erasure that recorded progress) confines each statement of the batches to recorded rows (a correlated `EXISTS` on
//!   the keys' primary key), and leaves a top-level row as it is while a child row of it
//!   that was not recorded is there, so that a row arriving while the batches run is
//!   neither erased nor anonymized, nor orphaned. After the batches, rows the erasure would
//!   have taken but for that confinement (arrivals) stop the step with a permanent error
//!   saying how many, where, what was erased and what was kept. Each batch deletes, in its
//!   transaction, the keys of the rows a table's DELETE took (returned by the DELETE), and
//!   the keys of the rows of erased tables that its `ON DELETE CASCADE` took (read before
//!   it through the rows it deletes, by the foreign keys the catalog lists between
//!   configured tables, directly or through one another, but not a table's key on itself;
//!   on PostgreSQL the rows it deletes and those the cascades reach are locked before the
//!   keys are read, so that no row is added under them until the batch commits (a row held
//!   back then, whose unrecorded row goes before the DELETE, is deleted without its
//!   cascaded rows' keys being read: those stay); those rows are counted as deleted in
//!   their table); the job's mark and the keys of returned rows
//!   still held (kept under an obligation, anonymized, left) stay, so that
//!   a call repeated after the end (the processor lost the answer) is bounded as the first
//!   was; in a table keyed by `ctid`, an anonymizing UPDATE moves its rows, so the batch
//!   replaces their keys with the new ones (read before it, returned by it). The keys of
//!   rows deleted outside the connector (by hand, or by a cascade through a table the rules
//!   do not list) cannot be seen this way and stay. The keys of a contract end that will
//!   not go on (cancelled after its export began, or failed for good and forgotten) go when
//!   the processor calls [`Connector::discard_bulk`] with its export's job id: every row of
//!   that `job` is deleted, 10,000 per statement, and other jobs' rows stay; the processor
//!   keeps calling until that succeeds (an export run again under the job's id replaces
//!   them too).
//!   Under a top-level row, an unrecorded
//!   child row is an arrival that holds the parent back whatever its columns hold (one
//!   already anonymized too), except in a child keyed by `ctid` (PostgreSQL, no primary
//!   key), where the erasure's anonymizing update gives rows new keys: there only an
//!   unrecorded row its statements would take is one. Alike, a row whose DELETE would take
//!   through those cascades an unrecorded row of an erased table (any, in a table keyed by
//!   `ctid` too) stays, and so does the top-level row it belongs to; that row is an
//!   arrival, counted in its table, when the table's own filter takes it. One the filter
//!   does not take (a NULL in its matched column), which no export returns, does not stop
//!   the first call: after the batches the step ends with a permanent error naming it apart
//!   from arrivals, the rows it hangs from kept, to be removed by hand or by ending the
//!   contract with DELETE. Limits: a row
//!   changed, not added, after the export keeps its key and is erased in its new form; a
//!   row whose key is NULL (SQLite allows one in a primary key other than INTEGER PRIMARY
//!   KEY; PostgreSQL never) is keyed by its `rowid`, so that it is recorded and erased as
//!   any returned row (only where declared columns named `rowid`, `oid` and `_rowid_`
//!   hide the row id is such a row never recorded, and then it stops every erasure after a
//!   return as an arrival); a key used again makes
//!   a new row read as the returned one it replaced, which is then erased unreturned
//!   (SQLite's INTEGER PRIMARY KEY without AUTOINCREMENT after the highest row was deleted,
//!   a natural key given again, a `rowid` or `ctid` freed and reused, VACUUM renumbering
//!   the `rowid`s of a table without an INTEGER PRIMARY KEY, which the rows whose key is
//!   NULL are keyed by); an update gives a row keyed
//!   by `ctid` a new key, so it reads as an arrival; a table's `ON DELETE CASCADE` onto
//!   itself is not followed, so the rows it takes are erased even if unrecorded, and their
//!   keys stay (a cascade onto rows the rules keep is refused when the connector
//!   connects); and a child inserted while its
//!   parent's batch deletes the parent can still be taken by an `ON DELETE CASCADE` (or
//!   fail the batch on another foreign key). Without recorded keys
//!   (an export from before they were, a return done by hand), the first call takes the
//!   export's own counts again instead: more subjects or records than were returned stop
//!   the step with a permanent error before anything is erased; this compares totals only,
//!   so rows that arrived after the export pass it when as many were deleted meanwhile,
//!   and rows that arrive after it, while the batches run, are erased though never
//!   returned. Either way, past the check the erasure's totals are recorded with the
//!   processor ([`crate::ProgressReporter::record_now`]) before the first batch. The keys
//!   are looked up only by a first call with the return's counts or a call resuming an
//!   erasure that recorded progress, so a DELETE's erasure does no more work than before.
//!
//! A crash or error between batches leaves the committed batches done and the rest
//! untouched; the processor's retry runs the step again, which finds only what is left
//! (erased rows are gone, anonymized rows no longer match the "not yet anonymized"
//! conditions) and reports the counts of that run.
//!
//! # Receipts
//!
//! A subject's erasure ([`Phase::Start`]) stores its report (the counts, the note, what is
//! kept and until when; no identity values) under its task's key ([`Task::task_id`]:
//! controller, request and subprocessor), each of its [`Phase::RetentionExpired`] runs under
//! the key and the run's `until_ms`, in the connector's receipt table
//! (`receipts_table`, default [`DEFAULT_RECEIPTS_TABLE`]), at the end of the transaction of
//! the erasure. A later call of the same task, when the processor never recorded the first
//! one's answer, finds the key taken (or, when its own run fails on data changed since,
//! looks the key up): it rolls back what it did (which, the work being done, is at most
//! what changed since) and answers with the stored report
//! ([`Outcome::Completed`] or [`Outcome::Retained`], the note saying that an earlier attempt
//! did the work; the refusal of one that found rows only in `keep` tables), where reading
//! the holder could not tell "erased by me" from "never there" and would answer
//! [`Outcome::NotFound`]. A concurrent call of the same task waits on the
//! key and then finds the receipt, or stores its own if the other rolled back. The table is
//! created with `CREATE TABLE IF NOT EXISTS` when the connector connects, in every database
//! it erases or rectifies in, unless it can already be read; a database user without the
//! right to create it gets an error at connect naming the table and the grant. Without its
//! own receipt a retention run's retry would report 0 records for rows it deleted, and the
//! processor adds up the records of every run. A rectification stores its report (counts
//! and the note: fields, never values) under its task's key the same way, at the end of its
//! transaction: a correction of the column the subject is matched by (the e-mail) leaves a
//! repeated call nothing to find, and the stored report answers it instead, the note saying
//! that an earlier attempt corrected. Contract ends' bulk steps write no receipts: their
//! retry reports the counts of what it finds left.
//!
//! # Legal retention
//!
//! A `retain` rule keeps the table's rows until the end of the fiscal year that contains the
//! date in `from_column`, plus `years` years (the Finnish Accounting Act: books ten years,
//! vouchers six), and also as long as the SQL condition `while` holds for a row (an open
//! invoice, a debt in collection). An erasure then:
//! - applies the table's action at once to the rows whose period is over;
//! - anonymizes in the kept rows the `anonymize` columns the obligation does not need (all
//!   but `keep_columns`, and never the columns the rows are found by: a child table's own
//!   match columns only in the rows its parent's matched rows also reach, which the parent
//!   row finds again);
//! - keeps a matched (parent) row as long as a child row found through it is kept, so that the
//!   rest can be found again; meanwhile its `anonymize` columns are cleared too, except the
//!   match columns the request's identities use;
//! - lists every kept row in its counts by table (the outcome's `erased`), never as erased
//!   nor in `records_affected`: as `kept and stripped` when the run cleared columns in it,
//!   as `kept` when it cleared none (nothing to clear, or cleared by an earlier run). Those
//!   counts outlive the note, which forgetting the request empties. A contract end lists
//!   the controller's kept rows the same way, and a `keep` table's rows as `kept`;
//! - answers [`Outcome::Retained`] with the bases of the rules that keep rows and the moment the
//!   next kept row is released. The processor runs the task again then
//!   ([`Phase::RetentionExpired`]), which erases what was released and answers
//!   [`Outcome::Retained`] again while anything is kept, or [`Outcome::Completed`].
//!
//! Each part is thus erased as soon as its own obligation ends, not when the longest one does.
//! Rows kept only by `while` are checked again `recheck_days` after each run. Dates are read in
//! Rust from the rows (as `YYYY-MM-DD`, also from a PostgreSQL `DATE` column), never from the
//! system clock: "now" is [`Task::now_ms`], in UTC.
//!
//! # Safety
//!
//! A request runs in one transaction: child tables first, so that they are still reachable
//! through their parent's rows, then the matched tables (a contract end's erasure: one
//! transaction per batch, see above). On SQLite, erasures that arrive together share a
//! transaction, each in a savepoint of its own that a failure rolls back alone (`writer`).
//! Identifiers come only from the validated configuration and are quoted; the connector
//! refuses to start, naming them, when a database lacks a table or column they name (SQLite
//! would read a misspelt quoted column as a string and silently match nothing). Identity
//! values, corrected values, dates and batch bounds are always bound as parameters. The only
//! SQL text taken from the configuration is `retain.while` and a controller's `condition`,
//! spliced as written: trusted operator configuration, never user input.
//!
//! # Layout
//! - `rules`: the configuration ([`SqlConnectorConfig`], [`TableRule`], [`Action`],
//!   [`Retention`], ...) and its validation.
//! - `categories`: a request's category scope: the tables it acts on, those it only reads,
//!   and the requests it refuses (see Data categories).
//! - `retention`: the retention calendar: when a dated row is released, in Rust and as a date
//!   SQL compares, and what a table keeps of the subject's rows.
//! - `plan`: the statements a request runs, built from the rules and the identities (pure).
//! - `execute`: running them in one transaction, reading rows, classifying database errors.
//! - `writer`: on SQLite, erasures queued together erased in one transaction (group commit).
//! - `direct`: an export's read of a SQLite file, on a connection of its own (rusqlite) on
//!   the blocking pool; PostgreSQL and in-memory SQLite are read through sqlx.
//! - `receipt`: the receipts of erasures, retention runs and rectifications: the table,
//!   storing a task's report under its key; and the table of what contract ends returned.
//! - `schema`: the check at connect that the database has every table and column the rules
//!   name (SQLite would read a misspelt quoted column as a string and match nothing) and
//!   that each takes what the rules write into it, and their types, by which statements
//!   compare, read and write them; each table's row key (its primary key as text).
//! - `bulk`: contract ends: counting, the export, the erasure in batches, what is kept.
//! - `lazy`: the connector as the processor builds it, which starts unconnected when a
//!   PostgreSQL database cannot be reached at start for a reason that may pass, and
//!   connects on its first task.
//! - `sample`: the sample accounting database and its rules ([`sample_config`],
//!   [`create_sample_accounting_db`]).
//! - here: the connector, which connects, finds the controller's scope, dispatches a task by
//!   kind and phase and turns the reports into an [`Outcome`].

use std::collections::BTreeMap;
use std::sync::Arc;

use anyhow::Context as _;

use dsrelay_proto::v1::{IdentityEncoding, IdentityType, RequestKind};
use dsrelay_runtime::store::{Backend, Db};
use writer::ErasureWriter;

use crate::{BoxFuture, BulkJob, Connector, ConnectorError, Outcome, Phase, Task};

mod bulk;
mod cascades;
mod categories;
#[cfg(test)]
mod category_tests;
mod direct;
#[cfg(test)]
mod discard_tests;
mod execute;
#[cfg(test)]
mod held_tests;
mod lazy;
mod plan;
#[cfg(test)]
mod read_only_tests;
mod receipt;
mod retention;
mod rules;
mod sample;
mod schema;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod typed_tests;
mod writer;

/// Opening a holder's database creates nothing.
#[cfg(test)]
mod open_tests {
    use super::*;

    /// The operator's report: a URL into a folder that does not exist made the connector
    /// create the folder and an empty file, then say the first table was missing.
    #[tokio::test]
    async fn a_missing_sqlite_file_is_not_created_and_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let in_missing_folder = dir.path().join("some/missing/dir/archive.db");
        let in_existing_folder = dir.path().join("archive.db");
        for file in [&in_missing_folder, &in_existing_folder] {
            let url = format!("sqlite://{}", file.display());
            let err = format!(
                "{:#}",
                SqlConnector::connect(sample_config(&url))
                    .await
                    .unwrap_err()
            );
            assert!(
                err.contains(&format!("holder database {} not found", file.display())),
                "{err}"
            );
            // A controller's own database is opened the same way (the top-level url is then
            // not opened at all), options or not.
            let mut config = sample_config(&url);
            config.controllers.insert(
                "acme".into(),
                ControllerScope {
                    condition: None,
                    url: Some(format!("{url}?cache=private")),
                },
            );
            let err = format!("{:#}", SqlConnector::connect(config).await.unwrap_err());
            assert!(
                err.contains("controller \"acme\"") && err.contains("not found"),
                "{err}"
            );
        }
        assert!(!dir.path().join("some").exists());
        assert!(!in_existing_folder.exists());
    }
}

use categories::Narrowed;
use execute::{ErasureReport, WorkReport};
pub(crate) use lazy::LazySqlConnector;
pub use receipt::DEFAULT_RECEIPTS_TABLE;
pub use rules::{
    Action, AnonymizeWith, ControllerScope, ParentLink, Retention, SqlConnectorConfig, TableRule,
    DEFAULT_RECHECK_DAYS, REDACTED,
};
pub use sample::{
    create_sample_accounting_db, sample_config, SAMPLE_ACCOUNTING_RULES, SAMPLE_ACCOUNTING_SQL,
};
use schema::ColumnTypes;

/// Carries out data-subject requests in one SQL database according to a
/// [`SqlConnectorConfig`].
#[derive(Debug, Clone)]
pub(crate) struct SqlConnector {
    config: Arc<SqlConnectorConfig>,
    /// The database at `config.url`; `None` when every controller has a database of its own,
    /// so that an unused URL is never opened (or, for SQLite, created).
    db: Option<Database>,
    /// The databases of the controllers scoped by `url`.
    own: BTreeMap<String, Database>,
    /// Top-level rows per transaction of a bulk job.
    batch_subjects: u64,
}

/// A connected database and, when it is SQLite, the queue its erasures share transactions
/// through.
#[derive(Debug, Clone)]
struct Database {
    db: Db,
    writer: Option<Arc<ErasureWriter>>,
    /// The types of the columns the rules name, learned when it was connected.
    types: Arc<ColumnTypes>,
}

/// One controller's part of the holder: the database its rows are in and the condition that
/// selects them there. Every statement of a task or bulk job runs through one.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Scoped<'a> {
    config: &'a SqlConnectorConfig,
    db: &'a Db,
    condition: Option<&'a str>,
    /// Where its erasures queue to share a transaction (SQLite); `None`: each has its own.
    writer: Option<&'a Arc<ErasureWriter>>,
    /// The types of the columns the rules name in `db`.
    types: &'a ColumnTypes,
    /// For a request scoped to categories that leave tables out: the rules it sees, of
    /// which `config` is the configuration, and the tables it only reads.
    narrowed: Option<&'a Arc<Narrowed>>,
}

/// Opens the holder's database at `url`. [`Db::connect`] creates a missing SQLite file and
/// its folders, as a service's own store needs; a holder's database is the subprocessor's
/// data, so a missing file is a wrong `url` (a mistyped path, a volume not mounted), reported
/// as such rather than opened empty and then found to lack every table. Without a `mode` of
/// its own the file is opened `mode=rw`, so that it is not created should it go between the
/// check and the opening.
async fn open_holder_db(url: &str) -> anyhow::Result<Db> {
    check_holder_file(url)?;
    let memory = url.contains(":memory:") || url.contains("mode=memory");
    if Backend::of_url(url)? != Backend::Sqlite || memory {
        return Db::connect(url).await;
    }
    let query = url.split_once('?').map(|(_, q)| q);
    let url = match query {
        Some(q) if q.split('&').any(|p| p.starts_with("mode=")) => url.to_string(),
        Some(_) => format!("{url}&mode=rw"),
        None => format!("{url}?mode=rw"),
    };
    Db::connect(&url).await
}

/// Fails when `url` names a SQLite file that is missing or is no file, as
/// [`open_holder_db`] does before it opens one; `Ok` for any other URL that parses.
fn check_holder_file(url: &str) -> anyhow::Result<()> {
    let memory = url.contains(":memory:") || url.contains("mode=memory");
    if Backend::of_url(url)? != Backend::Sqlite || memory {
        return Ok(());
    }
    let file = std::path::Path::new(dsrelay_runtime::store::sqlite_path(url));
    match std::fs::metadata(file) {
        Ok(meta) if meta.is_file() => {}
        Ok(_) => anyhow::bail!("holder database {} is not a file", file.display()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => anyhow::bail!(
            "holder database {} not found: the sql connector opens the subprocessor's \
             existing database and never creates one; check url",
            std::path::absolute(file)
                .unwrap_or_else(|_| file.to_path_buf())
                .display()
        ),
        // Unreadable for another reason: the connection says why.
        Err(_) => {}
    }
    Ok(())
}

/// The request kinds whose work writes into the holder's database (a contract end's erasure
/// is supported exactly when an erasure is).
const WRITING_KINDS: [RequestKind; 4] = [
    RequestKind::Erasure,
    RequestKind::Rectification,
    RequestKind::Restriction,
    RequestKind::Objection,
];

/// Fails when `db` is a SQLite file that its writer connection cannot write. SQLite opens a
/// file it cannot open for writing read-only without a word (an immutable attribute, a
/// read-only mount, no write permission, `mode=ro` in the url), and then every write fails
/// with "attempt to write a readonly database"; only a write tells. So one is tried on the
/// pool's connection, the one every write goes through: the file's `user_version` set to
/// the value it has, in a transaction rolled back. A file that another writer holds locked
/// cannot be tried; the start goes on then (without waiting the connection's busy timeout),
/// and a read-only connection shows at the first write instead
/// ([`SqlConnector::close_read_only_writer`]). Anything else the try hits fails the start.
async fn check_writable(db: &Db) -> anyhow::Result<()> {
    let Some(file) = &db.sqlite_file else {
        return Ok(());
    };
    let shown = std::path::absolute(file).unwrap_or_else(|_| file.clone());
    let mut conn = (db.pool.acquire().await).with_context(|| {
        format!(
            "checking that holder database {} can be written",
            shown.display()
        )
    })?;
    let probed = write_probe(&mut conn).await;
    // Never given back: a failed ROLLBACK or busy_timeout restore would leave the pool's one
    // connection inside the probe's transaction or failing every write under contention at
    // once; the next use opens the file again.
    let _ = conn.close().await;
    let error = match probed {
        Ok(()) => return Ok(()),
        Err(e) if matches!(execute::sqlite_primary_code(&e), Some(5 | 6)) => {
            tracing::info!(
                database = %shown.display(),
                "holder database locked by another writer at start; whether it can be \
                 written shows at the first write"
            );
            return Ok(());
        }
        Err(e) => e,
    };
    if execute::is_sqlite_read_only(&error) {
        anyhow::bail!(
            "holder database {} is open read-only: SQLite could not open it for writing, and \
             this connector writes to it (it is configured for erasure, rectification, \
             restriction or objection); check that the processor's user can write the file, \
             the -wal and -shm files beside it and their folder (permissions and ownership, an \
             immutable attribute, a read-only mount) and that the url has no mode=ro, then \
             start the processor again ({error})",
            shown.display()
        );
    }
    anyhow::bail!(
        "checking that holder database {} can be written: {error}",
        shown.display()
    )
}

/// The write [`check_writable`] tries, without waiting for a lock another writer holds; the
/// connection's busy timeout is put back after it.
async fn write_probe(conn: &mut sqlx::AnyConnection) -> Result<(), sqlx::Error> {
    let wait: i64 = sqlx::query_scalar("PRAGMA busy_timeout")
        .fetch_one(&mut *conn)
        .await?;
    sqlx::query("PRAGMA busy_timeout = 0")
        .execute(&mut *conn)
        .await?;
    let written = rolled_back_write(conn).await;
    let restored = sqlx::query(&format!("PRAGMA busy_timeout = {wait}"))
        .execute(&mut *conn)
        .await;
    written?;
    restored.map(drop)
}

/// Takes the write lock (`BEGIN IMMEDIATE`, which succeeds on a read-only WAL file, so a
/// page is written too: the header's `user_version`, set to the value it has) and rolls
/// back.
async fn rolled_back_write(conn: &mut sqlx::AnyConnection) -> Result<(), sqlx::Error> {
    sqlx::query("BEGIN IMMEDIATE").execute(&mut *conn).await?;
    let written = async {
        let version: i64 = sqlx::query_scalar("PRAGMA user_version")
            .fetch_one(&mut *conn)
            .await?;
        sqlx::query(&format!("PRAGMA user_version = {version}"))
            .execute(&mut *conn)
            .await
    }
    .await;
    let undone = sqlx::query("ROLLBACK").execute(&mut *conn).await;
    written?;
    undone.map(drop)
}

/// Whether the connector opens the top-level `url`: not when every controller has a
/// database of its own.
fn opens_shared_url(config: &SqlConnectorConfig) -> bool {
    config.controllers.is_empty() || config.controllers.values().any(|c| c.condition.is_some())
}

impl SqlConnector {
    /// Validates `config` and connects to its databases: `url` unless every controller has
    /// its own, and each controller's own.
    pub(crate) async fn connect(config: SqlConnectorConfig) -> anyhow::Result<Self> {
        let problems = config.validate();
        if !problems.is_empty() {
            anyhow::bail!(
                "invalid sql connector configuration: {}",
                problems.join("; ")
            );
        }
        let db = match opens_shared_url(&config) {
            true => Some(open_holder_db(&config.url).await?),
            false => None,
        };
        let mut own = BTreeMap::new();
        for (name, scope) in &config.controllers {
            if let Some(url) = &scope.url {
                let db = open_holder_db(url).await.map_err(|e| {
                    e.context(format!("connecting to the database of controller {name:?}"))
                })?;
                own.insert(name.clone(), db);
            }
        }
        let db = match db {
            Some(db) => {
                let types = schema::check_columns(&db, &config).await?;
                Some((db, types))
            }
            None => None,
        };
        let mut checked = BTreeMap::new();
        for (name, db) in own {
            let types = schema::check_columns(&db, &config)
                .await
                .map_err(|e| e.context(format!("checking the database of controller {name:?}")))?;
            checked.insert(name, (db, types));
        }
        let own = checked;
        // A connector that writes must be able to: a file SQLite opened read-only would
        // otherwise fail every task, and go on failing after the fix.
        if WRITING_KINDS.iter().any(|kind| config.supports(*kind)) {
            for (db, _) in db.iter().chain(own.values()) {
                check_writable(db).await?;
            }
        }
        // Only a connector that erases or rectifies writes receipts; a read-only holder gets
        // no table.
        if config.supports(RequestKind::Erasure) || config.supports(RequestKind::Rectification) {
            let table = config.receipts_table();
            for (db, _) in db.iter().chain(own.values()) {
                receipt::ensure_table(db, table).await?;
            }
        }
        let config = Arc::new(config);
        let database = |db: Db, types: ColumnTypes| {
            let types = Arc::new(types);
            Database {
                writer: (db.backend == Backend::Sqlite)
                    .then(|| ErasureWriter::new(config.clone(), db.clone(), types.clone())),
                db,
                types,
            }
        };
        let db = db.map(|(db, types)| database(db, types));
        let own = own
            .into_iter()
            .map(|(name, (db, types))| (name, database(db, types)))
            .collect();
        Ok(Self {
            config,
            db,
            own,
            batch_subjects: bulk::BATCH_SUBJECTS,
        })
    }

    /// Where `controller`'s data is; the reason to refuse when this holder has none of it.
    pub(crate) fn scope<'a>(&'a self, controller: &str) -> Result<Scoped<'a>, String> {
        let config = &*self.config;
        let scoped = |database: Option<&'a Database>, condition: Option<&'a str>| {
            database
                .map(|d| Scoped {
                    config,
                    db: &d.db,
                    condition,
                    writer: d.writer.as_ref(),
                    types: &d.types,
                    narrowed: None,
                })
                .ok_or_else(|| format!("no database is connected for controller {controller:?}"))
        };
        if self.config.controllers.is_empty() {
            return scoped(self.db.as_ref(), None);
        }
        match self.config.controllers.get(controller) {
            None => {
                let known: Vec<&str> = self.config.controllers.keys().map(String::as_str).collect();
                Err(format!(
                    "the sql connector holds no data of controller {controller:?}; its \
                     configuration scopes data to {}",
                    known.join(", ")
                ))
            }
            Some(ControllerScope {
                condition: Some(condition),
                ..
            }) => scoped(self.db.as_ref(), Some(condition.as_str())),
            Some(_) => scoped(self.own.get(controller), None),
        }
    }

    /// After `error` on `db`: when it says that SQLite has the file open read-only, closes
    /// the pool's connection (a SQLite file's pool has one, which every write goes through,
    /// the erasure writer's shared transactions too), so that the next attempt opens the file
    /// again and finds it writable once the cause is fixed. A connection is never reopened
    /// otherwise, and would fail every attempt until the processor restarts. The file is
    /// logged, never the error, which may quote the holder's data.
    async fn close_read_only_writer(db: &Db, error: &ConnectorError) {
        let Some(file) = db.sqlite_file.as_deref() else {
            return;
        };
        if !execute::says_read_only(error) {
            return;
        }
        match db.pool.acquire().await {
            Ok(conn) => {
                // Closing is all that is wanted; a failed goodbye leaves it closed too.
                let _ = conn.close().await;
                tracing::warn!(
                    database = %file.display(),
                    "holder database open read-only; its connection is closed so that the \
                     next attempt opens the file again"
                );
            }
            // Nothing to close now; the next read-only error tries again.
            Err(_) => tracing::warn!(
                database = %file.display(),
                "holder database open read-only; its connection could not be taken to be \
                 closed"
            ),
        }
    }

    /// [`Connector::run`] once the controller's database and the request's category scope
    /// are known (`scope.config` is what the scope sees): the scope's refusals, then the
    /// request itself. The caller adds the scope's note.
    async fn run_in(&self, task: &Task, scope: Scoped<'_>) -> Result<Outcome, ConnectorError> {
        let kind = task.kind;
        let config = scope.config;
        if let Some(n) = scope.narrowed {
            if !config.supports(kind) {
                return Ok(Outcome::Refused {
                    reason: format!(
                        "the sql connector is not configured for {} in the tables of the \
                         request's categories ({}): {}",
                        crate::kind_label(kind),
                        n.requested.join(", "),
                        (config.tables.iter())
                            .filter(|t| !n.lookup_only.contains(&t.table))
                            .map(|t| t.table.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                });
            }
            // Decided from the rules and the catalog before anything is written. A
            // rectification's columns depend on its fields, checked below.
            let refusal = match kind {
                RequestKind::Erasure if !n.left_out.is_empty() => {
                    let read = |e: sqlx::Error| {
                        execute::classify("reading the database's foreign keys", &e)
                    };
                    let keys = cascades::ForeignKeys::read(scope.db).await.map_err(read)?;
                    categories::erasure_conflicts(
                        scope.db.backend,
                        &self.config,
                        n,
                        &keys.delete_actions(),
                        &keys.update_actions(),
                    )
                }
                RequestKind::Restriction | RequestKind::Objection => {
                    update_refusal(&scope, kind, &[]).await?
                }
                _ => None,
            };
            if let Some(reason) = refusal {
                return Ok(Outcome::Refused { reason });
            }
        }
        let ids = &task.identities;
        // Worked out once and handed to every step, which searches by these alone. Without
        // an identity its match columns take there is nothing to search by, and only the
        // partner can give one: the holder refuses the input, which no operator here
        // could fix.
        let raw = match plan::matched_identities(config, ids) {
            Ok(raw) => raw,
            Err(reason) => {
                let reason = match plan::unsearched(config, scope.types, ids) {
                    Some(extra) => format!("{reason}; {extra}"),
                    None => reason,
                };
                return Ok(Outcome::Refused { reason });
            }
        };
        let outcome = match (&task.phase, kind) {
            (Phase::Confirm { .. }, _) => Err(ConnectorError::Permanent(
                "the sql connector finishes its work in one run; there is nothing to confirm"
                    .into(),
            )),
            (Phase::Start | Phase::RetentionExpired { .. }, RequestKind::Erasure) => {
                // Each run at a retain-until date erases what that date released; its
                // retry would find it gone and report 0 records for the run, which the
                // processor adds to the task's count.
                let key = match task.phase {
                    Phase::RetentionExpired { until_ms } => {
                        receipt::retention_key(&task.task_id, until_ms)
                    }
                    _ => task.task_id.clone(),
                };
                let (mut report, earlier) = scope.erase_once(&raw, task.now_ms, Some(&key)).await?;
                if earlier {
                    report.note = format!(
                        "erased by an earlier attempt of this task whose answer was lost: {}",
                        report.note
                    );
                }
                Ok(erasure_outcome(report, &task.phase))
            }
            (Phase::RetentionExpired { .. }, _) => Err(ConnectorError::Permanent(format!(
                "only erasures keep data under retention, not {}",
                crate::kind_label(kind)
            ))),
            (Phase::Start, RequestKind::ReturnOfData | RequestKind::Transfer) => {
                Ok(work_outcome(scope.export(&raw, task.export_sink()?).await?))
            }
            (Phase::Start, RequestKind::Rectification) => {
                // The fields a holder has are a matter of its configuration, decided
                // before the subject is looked up: a request naming none of them is
                // refused whether or not the subject is here.
                let corrections = &task.parameters.corrections;
                let left_out = (scope.narrowed)
                    .filter(|n| !n.left_out.is_empty())
                    .map(|n| (&*self.config, n.requested.as_slice()));
                match plan::check_corrections(config, corrections, left_out)? {
                    Err(reason) => Ok(Outcome::Refused { reason }),
                    Ok(corrections) => {
                        let fields: Vec<&str> =
                            corrections.mapped.iter().map(|(f, _)| *f).collect();
                        if let Some(reason) = update_refusal(&scope, kind, &fields).await? {
                            return Ok(Outcome::Refused { reason });
                        }
                        let (mut report, earlier) = scope
                            .rectify(&raw, &corrections, task.now_ms, Some(&task.task_id))
                            .await?;
                        if earlier {
                            report.note = format!(
                                "corrected by an earlier attempt of this task whose \
                                 answer was lost: {}",
                                report.note
                            );
                        }
                        Ok(work_outcome(report))
                    }
                }
            }
            (Phase::Start, RequestKind::Restriction) => Ok(work_outcome(
                scope
                    .restrict(&raw, task.parameters.lift_restriction)
                    .await?,
            )),
            (Phase::Start, RequestKind::Objection) => Ok(work_outcome(scope.suppress(&raw).await?)),
            (Phase::Start, RequestKind::ContractEnd) => Ok(Outcome::Refused {
                reason: "a contract end is not a task of one subject".into(),
            }),
            (Phase::Start, RequestKind::Unspecified) => Ok(Outcome::Refused {
                reason: "the request kind is unspecified".into(),
            }),
        };
        // An answer about the subject says what it did not search by; a refusal for rows
        // only in tables the request does not act on is one.
        let outcome = match (plan::unsearched(config, scope.types, ids), outcome?) {
            (Some(extra), Outcome::Refused { reason })
                if matches!(
                    kind,
                    RequestKind::Erasure
                        | RequestKind::Restriction
                        | RequestKind::Objection
                        | RequestKind::Rectification
                ) =>
            {
                Outcome::Refused {
                    reason: format!("{reason}; {extra}"),
                }
            }
            (Some(extra), outcome) => outcome.with_note_added(&extra),
            (None, outcome) => outcome,
        };
        Ok(outcome)
    }
}

/// Why a scoped request of `kind` writing the columns [`categories::written_columns`] names
/// (a rectification's for its `corrected` fields) must not run, when it must not: it would
/// change an out-of-scope table's rows through a foreign key's `ON UPDATE` action. `None`
/// without a scope leaving tables out, or when nothing is written.
async fn update_refusal(
    scope: &Scoped<'_>,
    kind: RequestKind,
    corrected: &[&str],
) -> Result<Option<String>, ConnectorError> {
    let Some(n) = scope.narrowed.filter(|n| !n.left_out.is_empty()) else {
        return Ok(None);
    };
    let written = categories::written_columns(n, kind, corrected);
    if written.is_empty() {
        return Ok(None);
    }
    let actions = (cascades::ForeignKeys::read(scope.db).await)
        .map_err(|e| execute::classify("reading the database's foreign keys", &e))?
        .update_actions();
    let what = match kind {
        RequestKind::Rectification => ("a rectification", "rectification"),
        RequestKind::Restriction => ("a restriction", "restriction"),
        RequestKind::Objection => ("an objection", "objection"),
        _ => ("an erasure", "erasure"),
    };
    Ok(categories::update_conflicts(
        scope.db.backend,
        n,
        &written,
        &actions,
        what,
    ))
}

impl Connector for SqlConnector {
    fn kind_name(&self) -> &'static str {
        "sql"
    }

    fn supports(&self, kind: RequestKind) -> bool {
        self.config.supports(kind)
    }

    fn run<'a>(&'a self, task: &'a Task) -> BoxFuture<'a, Result<Outcome, ConnectorError>> {
        Box::pin(async move {
            let kind = task.kind;
            if !self.config.supports(kind) {
                return Ok(Outcome::Refused {
                    reason: format!(
                        "the sql connector is not configured for {}",
                        crate::kind_label(kind)
                    ),
                });
            }
            let scope = match self.scope(&task.controller) {
                Ok(scope) => scope,
                Err(reason) => return Ok(Outcome::Refused { reason }),
            };
            let narrowed = match categories::narrow(&self.config, &task.categories) {
                Ok(narrowed) => narrowed.map(Arc::new),
                Err(reason) => return Ok(Outcome::Refused { reason }),
            };
            let scope = match &narrowed {
                Some(n) => Scoped {
                    config: &n.config,
                    narrowed: Some(n),
                    ..scope
                },
                None => scope,
            };
            let outcome = self.run_in(task, scope).await;
            if let Err(e) = &outcome {
                Self::close_read_only_writer(scope.db, e).await;
            }
            let outcome = outcome?;
            // What the scope left out is said beside what was done, and beside a refusal,
            // so that a reader of the certificate knows which tables were not looked at.
            Ok(match narrowed.as_ref().and_then(|n| n.note()) {
                Some(left_out) => match outcome {
                    Outcome::Refused { reason } => Outcome::Refused {
                        reason: format!("{reason}; {left_out}"),
                    },
                    outcome => outcome.with_note_added(&left_out),
                },
                None => outcome,
            })
        })
    }

    fn matchable_identities(&self) -> Vec<(IdentityType, IdentityEncoding)> {
        plan::matchable(&self.config)
    }

    // The rules' tables, whatever the controller: a controller's scope narrows the rows
    // of each table, never which tables there are.
    fn held_tables(&self) -> Vec<crate::HeldTable> {
        (self.config.tables.iter())
            .map(|t| crate::HeldTable {
                name: t.table.clone(),
                categories: t.categories.clone(),
            })
            .collect()
    }

    fn scoped_controllers(&self) -> Option<Vec<String>> {
        (!self.config.controllers.is_empty())
            .then(|| self.config.controllers.keys().cloned().collect())
    }

    fn run_bulk<'a>(&'a self, job: &'a BulkJob) -> BoxFuture<'a, Result<Outcome, ConnectorError>> {
        Box::pin(async move {
            match self.scope(&job.controller) {
                Ok(scope) => {
                    let outcome = scope.bulk(job, self.batch_subjects).await;
                    if let Err(e) = &outcome {
                        Self::close_read_only_writer(scope.db, e).await;
                    }
                    outcome
                }
                Err(reason) => Ok(Outcome::Refused { reason }),
            }
        })
    }

    fn discard_bulk<'a>(
        &'a self,
        controller: &'a str,
        job_id: &'a str,
    ) -> BoxFuture<'a, Result<(), ConnectorError>> {
        Box::pin(async move {
            // A controller no longer configured here may have left keys in a database the
            // connector cannot name any more: an operator is told, not answered done.
            let scope = self.scope(controller).map_err(|reason| {
                ConnectorError::Permanent(format!(
                    "discarding what contract end {job_id} recorded: {reason}"
                ))
            })?;
            let discarded = scope.discard_returned(job_id, bulk::DISCARD_BATCH).await;
            if let Err(e) = &discarded {
                Self::close_read_only_writer(scope.db, e).await;
            }
            discarded?;
            Ok(())
        })
    }
}

fn erasure_outcome(report: ErasureReport, phase: &Phase) -> Outcome {
    match report.retained {
        // COMPLETED would promise an erasure that did not happen; NOT_FOUND would deny data
        // that is there. A later phase's first run erased, so there it is only what is left.
        None if !report.only_kept.is_empty() && !phase.is_retention_expired() => {
            let tables: Vec<String> = report
                .only_kept
                .iter()
                .map(|k| format!("{}: {}", k.table, k.rows))
                .collect();
            Outcome::Refused {
                reason: format!(
                    "nothing erased: the subject's rows are only in tables this connector \
                     keeps on erasure (action keep): {}",
                    tables.join(", ")
                ),
            }
        }
        Some(kept) => Outcome::Retained {
            legal_basis: kept.legal_basis,
            until_ms: kept.until_ms,
            records_affected: report.records_affected,
            note: report.note,
            erased: report.counts,
        },
        // The first run found the subject; finding nothing later means nothing is left.
        None if report.found || phase.is_retention_expired() => Outcome::Completed {
            records_affected: report.records_affected,
            note: if report.found && report.only_kept.is_empty() {
                report.note
            } else {
                format!("nothing left to erase: {}", report.note)
            },
            files: Vec::new(),
            erased: report.counts,
        },
        None => Outcome::NotFound { note: report.note },
    }
}

/// A restriction's, objection's, rectification's or export's answer: refused when the report
/// says why; completed when a table the request acts on holds the subject's rows, changed
/// or already as asked (0 records then: the data is there); not found only when no table
/// does.
fn work_outcome(report: WorkReport) -> Outcome {
    if let Some(reason) = report.refusal {
        Outcome::Refused { reason }
    } else if report.records_affected > 0 || report.found {
        Outcome::Completed {
            records_affected: report.records_affected,
            note: report.note,
            files: report.files,
            erased: Vec::new(),
        }
    } else {
        Outcome::NotFound { note: report.note }
    }
}
