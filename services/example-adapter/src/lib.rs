//! An example subprocessor adapter: a small newsletter service (subscribers with e-mail, name,
//! phone, subscription and restriction flags) behind the `dsrelay.v1.SubprocessorAdapter` API,
//! over mutual TLS. It shows how a holder of data — in any language — plugs into a processor's
//! `adapter` connector, and serves the end-to-end tests.
//!
//! Behaviour:
//! - Only the certificate identities in `allowed_identities` may call it (PERMISSION_DENIED
//!   otherwise).
//! - Execute is idempotent per `task_id`: the first answer is stored and repeated; the work is
//!   done once. A FAILED answer is not repeated: the call after it (an operator's retry once
//!   the cause was fixed) is done again, as ExecuteBulk does with a FAILED job. A `task_id`
//!   names one task: reusing it for another request, kind or caller is ALREADY_EXISTS.
//! - Inputs are validated; violations are INVALID_ARGUMENT naming their fields.
//! - A RECTIFICATION corrects a subscriber's `email`, `name` and `phone` and names the other
//!   fields in its note. One that corrects none of these is REFUSED, naming its fields and
//!   those the newsletter can correct, before anyone is looked up: the same answer whether
//!   or not the subject is here.
//! - With `confirm_delay_ms > 0` an erasure is answered ACCEPTED and carried out and confirmed
//!   (COMPLETED, or RETAINED as below, in GetTaskStatus) once the delay has passed, like
//!   systems that accept a deletion and finish it later.
//! - Subscribers of the paid edition have billing records that the law keeps after an erasure:
//!   invoices six years after the year they were booked in (Kirjanpitolaki 2:10 §), and
//!   sales to consumers in other member states ten years after the year of the sale (VAT
//!   One-Stop Shop, Directive 2006/112/EC art. 369(2)). An erasure deletes everything else
//!   and answers RETAINED until the first record is released, naming the bases of all it
//!   keeps. The processor's run at that date (a new task id, `<task id>#retention-expired-<date
//!   in ms>`) deletes, among the records that answer kept, the released ones and answers
//!   RETAINED until the next date, or COMPLETED once nothing is kept. Such a run is done at
//!   once, whatever `confirm_delay_ms`, and judges "released" by the later of the adapter's
//!   clock and the date it names, provided the adapter gave that date for the same request;
//!   any other key is an erasure like the first, judged by the clock alone. The seed bills
//!   nobody; `dsrelay-example-adapter --demo-billing` bills the seeded Erik Lindqvist at
//!   start, and tests and tools add records with `Store::add_billing_record`.
//! - A kept record is still data on the subject. A later request finds it by the buyer's
//!   e-mail address as billed, which the record keeps (given raw or hashed): an export
//!   returns it, a later erasure answers RETAINED for it (releasing it when due; at once,
//!   whatever `confirm_delay_ms`, when it is all that is left), and rectification,
//!   restriction and objection leave it as billed (COMPLETED, no record changed, when it is
//!   all the newsletter holds on the subject). Only while that address can name no one
//!   else (see `newsletter`): not a record billed at an address its subscriber had changed
//!   by the erasure, nor one whose address a later subscriber holds or held, nor one that a
//!   contract end or a version before migration 0006 detached.
//! - Exports (RETURN_OF_DATA, TRANSFER) are answered COMPLETED with `export_paged`, and read
//!   with GetExportPage page by page from the live rows (subscribers, then their deliveries,
//!   then the billing records linked to them or kept after the subject's erasure); the task
//!   keeps only which subscribers and kept records it covers, never the data.
//! - Every subscriber belongs to one controller (the processor's name for it). Execute looks
//!   only among the subscribers of the controller the request names; a request naming none
//!   (older processors) means `default_controller`, which also owns the subscribers stored
//!   without a controller (given to it at start, with their billing records).
//! - ExecuteBulk ends a contract with one controller: EXPORT answers COMPLETED with
//!   `export_paged` and the pages read all of the controller's subscribers, deliveries and
//!   billing records (those an erasure kept included) that it counted: every row gets an
//!   arrival marker when inserted (migration 0007), and the export keeps the marker it
//!   counted up to; ERASE deletes the subscribers, their
//!   deliveries and the controller's released billing records with set-based statements,
//!   reports the counts, and keeps and releases the other billing records in stages as an
//!   erasure does (RETAINED). Both answer at once (never ACCEPTED),
//!   idempotently per `job_id`; GetBulkStatus repeats the answer. Their progress counts as
//!   subjects the subscribers and, for the billing records an erasure kept and detached
//!   from their subscriber, one per buyer as billed (name and address): such a record
//!   keeps no other trace of whom it was billed to, so one subject's records billed under
//!   two names or addresses count as two. An ERASE that follows a
//!   return (`returned`) first looks up the export under its key less `#erase`: any of the
//!   controller's rows inserted after that export counted (a sign-up, a delivery, a billing
//!   record, or a row given to it at start) is FAILED_PRECONDITION, naming how many of
//!   each, nothing erased or stored under the job id; the check holds off inserts until the
//!   erasure commits, so it erases only rows the export returned, in their current form (a
//!   row changed since, such as a corrected name, is no arrival).
//!   Without that export here (one from before migration 0007, or a return made another
//!   way) it counts as the export does: more subscribers or records than were returned are
//!   refused the same way, and an arrival offset by a deletion passes.
//!
//! # Layout
//! - [`config`]: the TOML file plus `DSRELAY_ADAPTER__*` environment overrides.
//! - [`store`]: subscribers and task outcomes in SQLite or PostgreSQL; idempotency, delayed
//!   confirmation, and the answer a retention run follows.
//! - `newsletter`: what each request kind does to the subscribers.
//! - [`retention`]: the billing records the law keeps after an erasure, their periods and
//!   legal bases, their release in stages, and how a retention run's key is read.
//! - `export`: paged exports: page tokens and the keyset reads behind GetExportPage.
//! - `api`: the gRPC handlers: caller check, input validation, errors to statuses.
//! - `app`: [`App::build`] and [`App::run`] (the service and its confirmation sweeper on the
//!   runtime's host, with health, reflection and an admin port).

mod api;
mod app;
pub mod config;
mod export;
mod newsletter;
pub mod retention;
pub mod store;

pub use app::App;
pub use config::Config;
