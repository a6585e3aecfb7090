//! The command line: global connection flags and one subcommand per operation.

use std::path::PathBuf;

use clap::{ArgGroup, Args, Parser, Subcommand, ValueEnum};
use dsrelay_sdk::proto::{RequestKind, RequestState};

/// Printed after `--help`: where connection settings come from, and what the exit status means.
const AFTER_HELP: &str = "\
Connection settings: each is taken from the first of
  1. its flag: --endpoint, --ca, --cert, --key, --crl, --server-identity
  2. the environment: DSRCTL_ENDPOINT, DSRCTL_CA, DSRCTL_CERT, DSRCTL_KEY, DSRCTL_CRL,
     DSRCTL_SERVER_IDENTITY (empty values count as unset)
  3. the config file named by --config or DSRCTL_CONFIG: TOML with the keys endpoint, ca,
     cert, key, crl, crl_if_present, server_identity; relative paths there are relative to
     the file's folder. crl_if_present is a revocation list used once the file exists, as
     the development PKI's crl.pem is (the dsrctl.toml `dsrctl dev up` writes names it);
     crl, which wins over it, must exist
  4. defaults: endpoint https://127.0.0.1:50051, no revocation list. When none of ca, cert
     and key is given anywhere and ./.dsrelay/pki/operator.pem exists, the development PKI
     in ./.dsrelay/pki is used (ca.pem, operator.pem, operator.key, and crl.pem once
     `dsrctl pki revoke` wrote it) and, unless a server identity is given, the registry
     must present spiffe://dsrelay.dev/registry/controller. The same holds for another
     party's certificate of that PKI given as cert without a ca, its key being the .key
     beside it unless given (for example --cert .dsrelay/pki/partner-crm.pem, a partner).
     `dsrctl pki init` creates that PKI. With ca, cert and key given, the server identity
     must be given too: the registry is never trusted on its CA alone.

Exit status: 0 on success, also when nothing reads the output any more (`dsrctl list |
head`); 1 for a configuration or connection problem, from `watch` when the request ended
other than COMPLETED (or, without --until-erased, answered PARTIALLY_COMPLETED) or when
nothing reads its output any more (it cannot tell how the request ended), from `contracts
show --watch` when the contract end ended FAILED or CANCELLED, from `audit verify` when the
trail is broken or the signed checkpoints asked for do not verify or are none, from
`download` when a file does not match the manifest or cannot be written (or a folder that
holds the download finished no longer matches its manifest), from `contracts confirm
--package` when a file of the folder (manifest.json included) is missing or not as its
manifest lists it, from `certificate verify` when the certificate does not verify
(`certificate get`: when the registry rejected it), from `receipt verify` when the transfer
receipt is unsigned or does not verify (`receipt get`: when the task has no signed
receipt), and when a server answers something that cannot be right (a listing whose pages
do not advance); these verdicts hold even when nothing reads the output; 2 for a usage
error (a party the development PKI does not have, a checkpoint file of another service's
trail) or an error answer from the registry (printed as `error: <CODE>: <message>`).";

/// Command-line client for the dsrelay registry: submit and follow data-subject requests.
#[derive(Debug, Parser)]
#[command(name = "dsrctl", version, after_help = AFTER_HELP)]
pub struct Cli {
    /// Where the registry is and which certificate to present.
    #[command(flatten)]
    pub connection: ConnectionArgs,

    /// How to print results: aligned columns, or one JSON document per result.
    #[arg(
        long,
        global = true,
        value_enum,
        default_value_t = OutputFormat::Table,
        help_heading = "Output"
    )]
    pub output: OutputFormat,

    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Connection flags. All are optional here: `settings::resolve` falls back to the
/// environment, the config file and the defaults, in that order.
// Serialize: [`ConnectionArgs::given`] finds the flags given by their clap ids, which are
// the field names.
#[derive(Debug, Clone, Default, Args, serde::Serialize)]
#[command(next_help_heading = "Connection")]
pub struct ConnectionArgs {
    /// Registry endpoint, https://host:port [env: DSRCTL_ENDPOINT] [default: https://127.0.0.1:50051]
    #[arg(long, global = true, value_name = "URL")]
    pub endpoint: Option<String>,

    /// CA bundle (PEM) the registry's certificate (a processor's, for the commands that call
    /// one) must chain to [env: DSRCTL_CA]
    #[arg(long, global = true, value_name = "FILE")]
    pub ca: Option<PathBuf>,

    /// Our certificate (PEM) [env: DSRCTL_CERT]
    #[arg(long, global = true, value_name = "FILE")]
    pub cert: Option<PathBuf>,

    /// Our private key (PEM) [env: DSRCTL_KEY]
    #[arg(long, global = true, value_name = "FILE")]
    pub key: Option<PathBuf>,

    /// Certificate revocation list (PEM) of the CA: a registry whose certificate is on it
    /// is refused [env: DSRCTL_CRL]
    #[arg(long, global = true, value_name = "FILE")]
    pub crl: Option<PathBuf>,

    /// Certificate identity the registry must present, e.g.
    /// spiffe://dsrelay.dev/registry/controller; required with --ca/--cert/--key (the
    /// development PKI sets it) [env: DSRCTL_SERVER_IDENTITY]
    #[arg(long, global = true, value_name = "URI")]
    pub server_identity: Option<String>,

    /// TOML file with endpoint, ca, cert, key, crl, crl_if_present, server_identity [env:
    /// DSRCTL_CONFIG]
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
}

/// How results are printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    /// Aligned plain-text columns.
    Table,
    /// One JSON document per result (one per line for `watch`).
    Json,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Submit a data-subject request; prints its id, state, due date, trace id and processors.
    // Boxed: by far the largest variant (clippy::large_enum_variant).
    Submit(Box<SubmitArgs>),
    /// Show one request with its deliveries and tasks.
    Get(GetArgs),
    /// List requests, newest first.
    List(ListArgs),
    /// Print a request's events until it ends COMPLETED, FAILED or CANCELLED, or is
    /// PARTIALLY_COMPLETED (answered; its holders keep some data by law until a date) and its
    /// events so far are printed (--until-erased follows it on); exits 0 if it ended
    /// COMPLETED or stopped at PARTIALLY_COMPLETED, 1 otherwise. A CANCELLED request is
    /// followed until nothing can change it any more (its tasks settled, no withdrawn
    /// delivery in flight): a cancellation that turns out to have stopped nothing gives way
    /// to what the holders did.
    ///
    /// The registry ends every watch after its `watch.max_stream_ms` (default one hour) and
    /// when it shuts down, with UNAVAILABLE; then, and when the connection drops (the
    /// registry killed, say), dsrctl watches again after the last event printed, 1 s later,
    /// and gives up once 30 attempts in a row fail to open the stream, naming the --after
    /// that continues.
    Watch(WatchArgs),
    /// Cancel a request, or a contract end by its id (a contract end is a request too), that
    /// is still open (RECEIVED, DISPATCHED or IN_PROGRESS) while a cancellation can stop
    /// something (a delivery or a task not yet ended; a contract end's deletion under way is
    /// not stopped).
    Cancel(CancelArgs),
    /// Extend a request's due date (operators only); the registry sends the new date to the
    /// processors, whose tasks then retry until it.
    Extend(ExtendArgs),
    /// Show what a return-of-data request's package holds: its files, and the parts still
    /// missing.
    Package(PackageArgs),
    /// Download a return-of-data package into a folder (--out) or a zip file (--zip),
    /// checking every file's size and SHA-256 against the manifest; exits 1 naming any
    /// file that fails (not written to the folder, which then gets no manifest.json; no zip
    /// is kept). Nothing takes its name before it verified; cut short, the same command
    /// run again finishes the download.
    Download(DownloadArgs),
    /// Development PKI.
    #[command(subcommand)]
    Pki(PkiCommand),
    /// Show the processing chain: every processor and its subprocessors, with countries and
    /// transfer mechanisms, as the processors last reported them (the registry asks at start
    /// and every reconcile.chain_interval_ms, 10 minutes by default; sooner again after an
    /// ask that failed). Under a `sql` holder, each of its tables with the categories it
    /// holds (shown to operators only). With --category, what a request scoped to those
    /// categories reaches: each processor and subprocessor, and each table it acts on or
    /// leaves out.
    Chain(ChainArgs),
    /// Draw a request's propagation from its stored events: registry → processors →
    /// subprocessors, with per-hop durations, states, retries and what is still pending.
    /// Times are when the registry recorded each event: a report that waited at a processor
    /// while the registry was down counts that wait in its hop.
    Trace(TraceArgs),
    /// Tasks at a processor: those that wait for an operator (manual connectors) or in
    /// other states, and acknowledgements its registry kept rejecting (dead letters). These
    /// commands talk to the processor, not the registry: --ca/--cert/--key are those of an
    /// operator of the processor, and no --server-identity is needed.
    #[command(subcommand)]
    Tasks(TasksCommand),
    /// Run the whole service pair on this machine for development.
    #[command(subcommand)]
    Dev(DevCommand),
    /// The registry's tamper-evident audit trail (operators only) and its signed checkpoints
    /// (partners too).
    #[command(subcommand)]
    Audit(AuditCommand),
    /// Deletion certificates: signed statements by a processor of what an erasure removed
    /// and what it retains, with the date of its next erasure run.
    #[command(subcommand)]
    Certificate(CertificateCommand),
    /// Transfer receipts: a recipient's signed statement of the part of a transfer it
    /// received (request, subprocessor, bytes, files, manifest SHA-256, when, and the
    /// processor that sent it when the recipient names it).
    #[command(subcommand)]
    Receipt(ReceiptCommand),
    /// Contract ends (operators only): end the contract with a processor, so that it deletes,
    /// or returns and then deletes, all of the controller's data at every subprocessor;
    /// follow it, make a deferred choice, confirm the returned package.
    #[command(subcommand)]
    Contracts(ContractsCommand),
    /// Deliveries the registry dead-lettered because their processor kept refusing them
    /// (operators only): list them, and requeue one once the cause is fixed.
    #[command(subcommand)]
    Deliveries(DeliveriesCommand),
    // New subcommands go here, with their arm in `commands::dispatch`; a subcommand that
    // needs no registry connection must not call `settings::resolve`.
}

/// Arguments of `dsrctl chain`.
#[derive(Debug, Clone, Args)]
pub struct ChainArgs {
    /// Show what a request scoped to this data category reaches (repeatable: a request
    /// scoped to any of them): the processors and subprocessors holding one, and the tables
    /// a `sql` holder acts on and leaves out.
    #[arg(long = "category", value_name = "NAME")]
    pub categories: Vec<String>,
}

/// Arguments of `dsrctl trace`.
#[derive(Debug, Clone, Args)]
pub struct TraceArgs {
    /// The request id.
    pub id: String,
}

/// Where the processor is, for `dsrctl tasks` and `dsrctl contracts scheduled`.
#[derive(Debug, Clone, Args)]
pub struct ProcessorArgs {
    /// The processor's endpoint. The call presents --cert/--key (an operator certificate of
    /// the processor) and checks the processor's certificate against --ca; --endpoint and
    /// --server-identity, the registry's, are not used.
    #[arg(long, default_value = "https://127.0.0.1:50061", value_name = "URL")]
    pub processor: String,
    /// The identity the processor's certificate must carry [default, only with the
    /// development PKI (its operator's certificate as dsrctl finds it in ./.dsrelay/pki, or
    /// the dsrctl.toml `dsrctl dev up` writes): spiffe://dsrelay.dev/processor/payroll-bureau,
    /// the processor `dsrctl dev up` runs; required otherwise].
    #[arg(long, value_name = "URI")]
    pub processor_identity: Option<String>,
}

/// Names one task at a processor.
#[derive(Debug, Clone, Args)]
pub struct TaskRefArgs {
    /// The controller, as the processor names it.
    pub controller: String,
    /// The request id.
    pub request_id: String,
    /// The subprocessor.
    pub subprocessor: String,
}

/// `dsrctl tasks ...`.
#[derive(Debug, Subcommand)]
pub enum TasksCommand {
    /// List tasks waiting for an operator, oldest first (with the subject's identities, which
    /// the operator needs to find the records, each with its encoding when hashed and its
    /// label when of type other; the scope, the data categories or all data; and the kind's
    /// parameters: the corrected values of a rectification, a restriction set or lifted, the
    /// transfer's recipient, a contract end's terms).
    List {
        /// Where the processor is.
        #[command(flatten)]
        processor: ProcessorArgs,
        /// Only this subprocessor's tasks.
        #[arg(long)]
        subprocessor: Option<String>,
        /// Tasks in this state instead of those waiting for an operator (repeatable): pending,
        /// in-progress, completed, not-found, retained, refused, failed, waiting-for-operator
        /// or cancelled; e.g. `--state failed --state refused` to see what could not be done
        /// and why, or `--state in-progress` for what a holder that keeps failing said last.
        #[arg(long = "state", value_name = "STATE")]
        states: Vec<String>,
    },
    /// Confirm a task done, with evidence.
    Complete {
        /// Where the processor is.
        #[command(flatten)]
        processor: ProcessorArgs,
        /// Which task.
        #[command(flatten)]
        task: TaskRefArgs,
        /// What was done, as proof (must not contain the subject's identities).
        #[arg(long)]
        evidence: String,
        /// How many records were erased or changed.
        #[arg(long, default_value_t = 0)]
        records: i64,
        /// The holder had no data on the subject.
        #[arg(long)]
        not_found: bool,
    },
    /// Refuse a task, with the reason.
    Refuse {
        /// Where the processor is.
        #[command(flatten)]
        processor: ProcessorArgs,
        /// Which task.
        #[command(flatten)]
        task: TaskRefArgs,
        /// Why.
        #[arg(long)]
        reason: String,
    },
    /// Run a FAILED task again once its cause is fixed: it becomes IN_PROGRESS, its reason
    /// `retried by <you>: <note>` (kept in the request's events at the registry), and the
    /// holder is called as for a new task (past the due date, once); a return of data or a
    /// transfer exports again and sends the new files. A contract end task resumes in the
    /// phase it failed in (a return exports again, an erasure goes on). Refused for a task
    /// that failed in a retention run, a cancelled or forgotten request, and a subprocessor
    /// no longer configured.
    Retry {
        /// Where the processor is.
        #[command(flatten)]
        processor: ProcessorArgs,
        /// Which task.
        #[command(flatten)]
        task: TaskRefArgs,
        /// What was fixed, for the controller (must not contain the subject's identities).
        #[arg(long)]
        note: String,
    },
    /// List every acknowledgement the registry kept rejecting, parked after `acks.max_rejections`
    /// rejections (dead letters), oldest first, each with its registry's last answer.
    DeadLetters {
        /// Where the processor is.
        #[command(flatten)]
        processor: ProcessorArgs,
    },
    /// Send a dead-lettered acknowledgement again, after whatever the registry objected to
    /// was fixed.
    Requeue {
        /// Where the processor is.
        #[command(flatten)]
        processor: ProcessorArgs,
        /// The dead letter's id (from `dsrctl tasks dead-letters`).
        id: i64,
    },
}

/// `dsrctl deliveries ...`.
#[derive(Debug, Subcommand)]
pub enum DeliveriesCommand {
    /// List dead-lettered deliveries, cancellations, contract-end updates and due-date
    /// extensions, oldest first, each with the processor's last answer.
    DeadLetters {
        /// At most this many, 1..=500 [default: the registry's, 100]
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=500))]
        limit: Option<u32>,
        /// Continue after an earlier page (the token it printed)
        #[arg(long, value_name = "TOKEN")]
        page_token: Option<String>,
    },
    /// Send a request's dead-lettered deliveries to one processor again, with a fresh refusal
    /// count; prints the request as it is afterwards.
    Requeue {
        /// The request id.
        id: String,
        /// The processor, as the registry names it.
        #[arg(long)]
        processor: String,
    },
}

/// What happens to the controller's data when a contract ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ContractChoiceArg {
    /// Delete all of it from the effective date.
    Delete,
    /// Return it as a package, and delete it once `dsrctl contracts confirm` was given, or
    /// when the grace period ends without a confirmation.
    ReturnThenDelete,
    /// Choose later (`dsrctl contracts choose`); without a choice the data is deleted when
    /// the grace period ends.
    None,
}

/// What `dsrctl contracts choose` makes of a contract end created with `--choice none`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ChosenArg {
    /// Delete all of it from the effective date.
    Delete,
    /// Return it as a package, and delete it once `dsrctl contracts confirm` was given, or
    /// when the grace period ends without a confirmation.
    ReturnThenDelete,
}

/// `dsrctl contracts ...`.
#[derive(Debug, Subcommand)]
pub enum ContractsCommand {
    /// End the contract with a processor; prints the contract end.
    // One of the two, named together when neither is given.
    #[command(group(clap::ArgGroup::new("when").required(true).args(["effective_at", "now"])))]
    End {
        /// The processor, as the registry names it.
        #[arg(long)]
        processor: String,
        /// What happens to the data.
        #[arg(long, value_enum)]
        choice: ContractChoiceArg,
        /// When the contract ends: RFC 3339, e.g. 2027-01-01T00:00:00Z or
        /// 2027-01-01T00:00:00+02:00, or a date alone, 2027-01-01, for 00:00 UTC that day
        /// (the contract ends as the day begins); not in the past.
        #[arg(long, value_name = "TIME", value_parser = parse_instant)]
        effective_at: Option<chrono::DateTime<chrono::Utc>>,
        /// End it now.
        #[arg(long)]
        now: bool,
        /// The key that makes retrying safe [default: a new random key, printed].
        #[arg(long, value_parser = parse_idempotency_key)]
        idempotency_key: Option<String>,
        /// Return the data to this transfer recipient (a name in the registry's
        /// `[[recipients]]`, e.g. the successor processor) instead of to the registry as a
        /// package; only with --choice return-then-delete.
        #[arg(long, value_name = "NAME")]
        transfer_recipient: Option<String>,
    },
    /// List contract ends, newest first, with each subprocessor's phase and progress.
    List {
        /// Only this processor's.
        #[arg(long)]
        processor: Option<String>,
    },
    /// Show one contract end with each subprocessor's phase and progress.
    Show {
        /// The contract end's id.
        id: String,
        /// Keep showing progress bars per subprocessor until it finishes (or Ctrl-C), then
        /// print it; table output without a terminal prints the view at once and again at
        /// each change, --output json one document at the end. It finishes COMPLETED,
        /// PARTIALLY_COMPLETED (holders keep only what the law makes them keep, until the
        /// next erasure run shown), FAILED or CANCELLED; exits 0 for the first two.
        #[arg(long)]
        watch: bool,
    },
    /// Make the choice a contract end was created without (--choice none), at any time
    /// until its grace period ends, before the effective date too (the processor then starts
    /// at the effective date); refused once a choice was made, once the contract end
    /// finished, or once the processor reported deleting.
    Choose {
        /// The contract end's id.
        id: String,
        /// What happens to the data (the choice made with --choice none is to choose later,
        /// which this replaces).
        #[arg(long, value_enum)]
        choice: ChosenArg,
        /// Return the data to this transfer recipient instead of to the registry; only with
        /// --choice return-then-delete.
        #[arg(long, value_name = "NAME")]
        transfer_recipient: Option<String>,
    },
    /// Confirm that the returned data arrived: the package was downloaded and verified, or,
    /// for a return to a transfer recipient (no digest given), every subprocessor's receipt
    /// is in (`contracts show`); the processor then deletes the data.
    Confirm {
        /// The contract end's id.
        id: String,
        /// SHA-256 (hex) of the package's manifest.json, as `dsrctl download` printed it.
        /// Leave out, with --package, for a return to a transfer recipient.
        #[arg(long, value_name = "HEX", conflicts_with = "package")]
        manifest_sha256: Option<String>,
        /// A folder `dsrctl download --out` wrote and verified: every file its manifest.json
        /// lists is checked again (there, with its size and SHA-256), then the manifest's
        /// SHA-256 is sent; exits 1 naming any file that is missing or differs.
        #[arg(long, value_name = "DIR")]
        package: Option<PathBuf>,
    },
    /// What a processor has scheduled for the contract ends it received, and when (asks the
    /// processor's operator API, like `dsrctl tasks`: --ca/--cert/--key are those of an
    /// operator of the processor, and no --server-identity is needed).
    Scheduled {
        /// Where the processor is.
        #[command(flatten)]
        processor: ProcessorArgs,
        /// Only this controller's (as the processor names it).
        #[arg(long)]
        controller: Option<String>,
    },
}

/// `dsrctl certificate ...`.
#[derive(Debug, Subcommand)]
pub enum CertificateCommand {
    /// Fetch a request's deletion certificate from the registry and write it to a file
    /// (JSON: body, the signed canonical JSON as text; signature, base64; key_id). With
    /// several tasks certified, name one with --processor and --subprocessor; a task with a
    /// follow-up gives its latest, unless --certificate-id names another (`certificate list`
    /// lists them). Exits 1 without writing when the registry rejected it.
    Get(CertificateGetArgs),
    /// List a request's deletion certificates as the registry holds them: each task's
    /// together, oldest first in the order its processor issued them, with the certificate
    /// id, processor, subprocessor, the task state it goes with, the certificate it follows,
    /// when it was issued, and the registry's verdict. A task whose retained data is erased
    /// later has several: each later one `follows` (names the certificate_id of) the one
    /// before it, so the first states what was kept and under which legal basis, and the
    /// last what the task ended with. The state, follows and issued_at columns are read
    /// from the body as stored, unchecked; `certificate get --certificate-id` fetches one
    /// and `certificate verify` checks it.
    List(CertificateListArgs),
    /// Check a certificate file offline against the processor's public key, given with
    /// --public-key PUBKEY (or --key PUBKEY: verify connects to nothing, so it names no TLS
    /// key here), and print what it certifies; exits 1 when any byte of it was changed,
    /// another key signed it, or the signed body is not a deletion certificate as
    /// proto/dsrelay/v1/certificate.proto defines it (exactly the keys of its version 1 or
    /// 2, each of its type and range). A revoked key (`revoked_public_keys`) is not checked here: the
    /// file does not hold when the registry received it, so revocations are applied by the
    /// registry only (`certificate get` refuses what it reads as rejected).
    Verify(CertificateVerifyArgs),
}

/// Arguments of `dsrctl certificate get`.
#[derive(Debug, Clone, Args)]
pub struct CertificateGetArgs {
    /// The request id.
    pub id: String,

    /// Only this processor's certificates (its name at the registry).
    #[arg(long)]
    pub processor: Option<String>,

    /// Only this subprocessor's certificates.
    #[arg(long)]
    pub subprocessor: Option<String>,

    /// The certificate with this id (as `certificate list` shows it), rather than the
    /// latest of its task: e.g. the first of a task whose retained data was erased later,
    /// which the latest names in `follows`.
    #[arg(long, value_name = "CERT_ID")]
    pub certificate_id: Option<String>,

    /// The file to write (replaced if it exists).
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,
}

/// Arguments of `dsrctl certificate list`.
#[derive(Debug, Clone, Args)]
pub struct CertificateListArgs {
    /// The request id.
    pub id: String,

    /// Only this processor's certificates (its name at the registry).
    #[arg(long)]
    pub processor: Option<String>,

    /// Only this subprocessor's certificates.
    #[arg(long)]
    pub subprocessor: Option<String>,
}

/// Arguments of `dsrctl certificate verify`.
#[derive(Debug, Clone, Args)]
pub struct CertificateVerifyArgs {
    /// The certificate file `dsrctl certificate get` wrote.
    pub file: PathBuf,

    /// The processor's public key: a file holding SPKI PEM or the base64 of the 32 key
    /// bytes, or that base64 itself (DSRCTL_KEY does not apply here)
    // Same id and type as the global `--key`, which clap then leaves out of this
    // subcommand: its help here describes this key, and the value still reaches
    // `ConnectionArgs::key`, which `commands::dispatch` hands to `certificate::verify`.
    #[arg(
        id = "key",
        long = "public-key",
        visible_alias = "key",
        value_name = "PUBKEY"
    )]
    pub key: Option<PathBuf>,
}

/// `dsrctl receipt ...`.
#[derive(Debug, Subcommand)]
pub enum ReceiptCommand {
    /// Fetch a transfer request's signed receipt for one task from the registry and write it
    /// to a file (JSON: every field the recipient signed, and its signature, base64, and
    /// key_id). With several tasks' receipts, name one with --processor and --subprocessor.
    /// Exits 1 without writing when the task has no receipt or an unsigned one.
    Get(ReceiptGetArgs),
    /// Check a receipt file offline against the recipient's public key, given with
    /// --public-key PUBKEY (or --key PUBKEY: verify connects to nothing, so it names no TLS
    /// key here), and print what it attests; exits 1 when the receipt is unsigned, any of
    /// its fields was changed or another key signed it (a receipt naming its sender is
    /// checked over the version 2 body, one naming none over version 1). Reads only the
    /// file `receipt get` writes. A revoked key (`revoked_public_keys`) is not checked here:
    /// the file does not hold when the registry received it, so revocations are applied by
    /// the registry only.
    Verify(ReceiptVerifyArgs),
}

/// Arguments of `dsrctl receipt get`.
#[derive(Debug, Clone, Args)]
pub struct ReceiptGetArgs {
    /// The request id.
    pub id: String,

    /// Only this processor's task (its name at the registry).
    #[arg(long)]
    pub processor: Option<String>,

    /// Only this subprocessor's task.
    #[arg(long)]
    pub subprocessor: Option<String>,

    /// The file to write (replaced if it exists).
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,
}

/// Arguments of `dsrctl receipt verify`.
#[derive(Debug, Clone, Args)]
pub struct ReceiptVerifyArgs {
    /// The receipt file `dsrctl receipt get` wrote.
    pub file: PathBuf,

    /// The recipient's public key: a file holding SPKI PEM or the base64 of the 32 key
    /// bytes, or that base64 itself (DSRCTL_KEY does not apply here)
    // As `CertificateVerifyArgs::key`: the global `--key`'s id, so the value reaches
    // `ConnectionArgs::key`, which `commands::dispatch` hands to `receipt::verify`.
    #[arg(
        id = "key",
        long = "public-key",
        visible_alias = "key",
        value_name = "PUBKEY"
    )]
    pub key: Option<PathBuf>,
}

/// `dsrctl audit ...`.
#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Read the whole audit trail and check its hash chain; exits 0 if it is intact and 1
    /// naming the first entry that was modified, removed, or (where the chain cannot tell
    /// which) modified, reordered or inserted. Keep the printed number
    /// of entries and last hash: entries are numbered from 1 without gaps, so that number is
    /// the last entry's SEQ (`last_seq` in --output json), and `--anchor SEQ:HASH` later also
    /// catches entries removed from the end and a trail rewritten up to that entry. With the
    /// registry's signed checkpoints (--checkpoints FILE or --fetch-checkpoints, and
    /// --checkpoint-key, once per key they were signed with), it also checks every
    /// checkpoint's signature and that the trail still
    /// holds every checkpointed entry, naming the checkpoint a rewritten or cut trail no
    /// longer matches; with none there to check against, it exits 1 without judging the
    /// trail. With --processor, the same for that processor's own trail and checkpoints
    /// (operators of the processor only).
    Verify(AuditVerifyArgs),
    /// Print the registry's signed audit checkpoints, one JSON line each, as its checkpoint
    /// file holds them (partners and operators), with --output json too: keep them where the
    /// registry's operators cannot change them, and verify against them later (`audit verify
    /// --checkpoints`). With --processor, that processor's checkpoints (its operators and
    /// controllers).
    Checkpoints(AuditCheckpointsArgs),
    /// Print one page of the registry's audit trail, oldest first (operators only): seq,
    /// time, event, request, actor and the detail (shortened in the table; whole, with both
    /// hashes, in --output json). The trail can only be paged by seq: --after-seq for where
    /// to start (the table ends naming the next page), --limit for how many. With
    /// --processor, that processor's own trail (operators of the processor only).
    List(AuditListArgs),
}

/// Whose audit trail: the registry's, unless a processor is named.
#[derive(Debug, Clone, Args)]
pub struct AuditTrailArgs {
    /// Read the trail of the processor at this endpoint (its operator API) instead of the
    /// registry's. The call presents --cert/--key (a certificate the processor accepts: its
    /// operator's, or a controller's for checkpoints) and checks the processor's certificate
    /// against --ca; --endpoint and --server-identity, the registry's, are not used.
    #[arg(long, value_name = "URL")]
    pub processor: Option<String>,
    /// The identity the processor's certificate must carry [default, only with the
    /// development PKI (its operator's certificate as dsrctl finds it in ./.dsrelay/pki, or
    /// the dsrctl.toml `dsrctl dev up` writes): spiffe://dsrelay.dev/processor/payroll-bureau,
    /// the processor `dsrctl dev up` runs; required otherwise].
    #[arg(long, value_name = "URI", requires = "processor")]
    pub processor_identity: Option<String>,
}

/// Arguments of `dsrctl audit verify`.
#[derive(Debug, Clone, Args)]
#[command(group = ArgGroup::new("checkpoint_source").args(["checkpoints", "fetch_checkpoints"]))]
pub struct AuditVerifyArgs {
    /// Whose trail.
    #[command(flatten)]
    pub trail: AuditTrailArgs,
    /// Require entry SEQ to have hash HASH, as an earlier verification printed them.
    #[arg(long, value_name = "SEQ:HASH", value_parser = parse_anchor)]
    pub anchor: Option<(u64, String)>,
    /// Check the trail against the signed checkpoints in FILE (JSON lines, as the service's
    /// checkpoint file or `dsrctl audit checkpoints` hold them); a file of another service's
    /// trail (the registry's for --processor, or the other way round) is a usage error.
    #[arg(
        long,
        value_name = "FILE",
        requires = "checkpoint_key",
        conflicts_with = "fetch_checkpoints"
    )]
    pub checkpoints: Option<PathBuf>,
    /// Check the trail against the signed checkpoints the service serves
    /// (ListAuditCheckpoints).
    #[arg(long, requires = "checkpoint_key")]
    pub fetch_checkpoints: bool,
    /// The public key that checks the checkpoints: the base64 of its 32 bytes, or a file
    /// holding it (SPKI PEM, as `dsrctl pki init` writes registry-signing.pub.pem and
    /// processor-signing.pub.pem). Get it from the service's operator another way than from
    /// the service itself. Give it once for each key the checkpoints were signed with (after
    /// the service's checkpoint key was rotated: the old key and the new one); each
    /// checkpoint is checked with the key its key id names, and one signed with a key not
    /// given fails. Needs --checkpoints or --fetch-checkpoints: alone it would check nothing.
    #[arg(long, value_name = "PUBKEY", requires = "checkpoint_source")]
    pub checkpoint_key: Vec<String>,
}

/// Arguments of `dsrctl audit checkpoints`.
#[derive(Debug, Clone, Args)]
pub struct AuditCheckpointsArgs {
    /// Whose checkpoints.
    #[command(flatten)]
    pub trail: AuditTrailArgs,
    /// Only checkpoints over a larger seq than this (to fetch what is new since the last
    /// one kept).
    #[arg(long, value_name = "SEQ", default_value_t = 0)]
    pub after_seq: u64,
}

/// Arguments of `dsrctl audit list`.
#[derive(Debug, Clone, Args)]
pub struct AuditListArgs {
    /// Whose trail.
    #[command(flatten)]
    pub trail: AuditTrailArgs,
    /// Only entries with a larger seq than this (as a page before named it).
    #[arg(long, visible_alias = "after", value_name = "SEQ", default_value_t = 0)]
    pub after_seq: u64,
    /// At most this many entries, 1..=1000 [default: the service's, 500]
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub limit: Option<u32>,
}

/// `SEQ:HASH` with a positive seq and a hex SHA-256.
fn parse_anchor(s: &str) -> Result<(u64, String), String> {
    let (seq, hash) = s
        .split_once(':')
        .ok_or_else(|| format!("expected SEQ:HASH, got {s:?}"))?;
    let seq = match seq.parse::<u64>() {
        Ok(n) if n > 0 => n,
        _ => return Err(format!("SEQ must be a positive number, got {seq:?}")),
    };
    Ok((seq, parse_sha256(hash)?))
}

/// `dsrctl dev ...`.
#[derive(Debug, Subcommand)]
pub enum DevCommand {
    /// Start the registry and a processor in this process on the embedded default: SQLite
    /// files and development certificates in --dir (created on first start), and the sample
    /// accounting database as the processor's subprocessor. Stops on Ctrl-C.
    Up(DevUpArgs),
}

/// Arguments of `dsrctl dev up`.
#[derive(Debug, Clone, Args)]
// The connection flags are global; given the same ids here, clap keeps the global ones out
// of `dev up`, whose help then lists them nowhere, and `dev::up` refuses them.
#[command(mut_args(hide_connection))]
pub struct DevUpArgs {
    /// Folder for certificates, configurations and databases.
    #[arg(long, default_value = ".dsrelay")]
    pub dir: PathBuf,
    /// Port of the registry (partner API). A new folder's files get 50051 without it; on a
    /// later start it replaces the port of the folder's registry.toml, and the registry
    /// endpoint of its processor.toml, for this start (the files stay as they are).
    #[arg(long)]
    pub registry_port: Option<u16>,
    /// Port of the processor. A new folder's files get 50061 without it; on a later start it
    /// replaces the port of the folder's processor.toml, and the processor's endpoint in its
    /// registry.toml, for this start. The example recipient's port moves with it (20 above).
    #[arg(long)]
    pub processor_port: Option<u16>,
    /// Connection flags given to `dev up`, which uses none of them.
    #[command(flatten)]
    pub connection: ConnectionArgs,
}

/// `arg` hidden from help when it is one of the connection flags.
fn hide_connection(arg: clap::Arg) -> clap::Arg {
    let hide = connection_flags().any(|a| a.get_id() == arg.get_id());
    arg.hide(hide)
}

/// The connection flags, as clap builds them from [`ConnectionArgs`].
fn connection_flags() -> impl Iterator<Item = clap::Arg> {
    let cmd = ConnectionArgs::augment_args(clap::Command::new("connection"));
    cmd.get_arguments().cloned().collect::<Vec<_>>().into_iter()
}

impl ConnectionArgs {
    /// The flags given (`--endpoint`), in the order [`ConnectionArgs`] defines them.
    pub fn given(&self) -> Vec<String> {
        let values = serde_json::to_value(self).unwrap_or_default();
        connection_flags()
            .filter(|a| {
                values
                    .get(a.get_id().as_str())
                    .is_some_and(|v| !v.is_null())
            })
            .filter_map(|a| a.get_long().map(|long| format!("--{long}")))
            .collect()
    }
}

/// What a data subject asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum KindArg {
    /// Erase the subject's data everywhere (art. 17).
    Erasure,
    /// Collect the subject's data (art. 15, 20).
    ReturnOfData,
    /// Send the subject's data to a recipient (art. 20(2)); needs --recipient.
    Transfer,
    /// Correct the subject's data (art. 16, 19); needs --correct.
    Rectification,
    /// Set (or with --lift, lift) a restriction of processing (art. 18).
    Restriction,
    /// Object to direct marketing (art. 21(2)).
    Objection,
}

impl From<KindArg> for RequestKind {
    fn from(kind: KindArg) -> Self {
        match kind {
            KindArg::Erasure => RequestKind::Erasure,
            KindArg::ReturnOfData => RequestKind::ReturnOfData,
            KindArg::Transfer => RequestKind::Transfer,
            KindArg::Rectification => RequestKind::Rectification,
            KindArg::Restriction => RequestKind::Restriction,
            KindArg::Objection => RequestKind::Objection,
        }
    }
}

/// A request state, for filtering.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum StateArg {
    /// Stored; deliveries queued.
    Received,
    /// Accepted by at least one processor.
    Dispatched,
    /// Processors are working on it.
    InProgress,
    /// Every holder confirmed.
    Completed,
    /// Done except data retained under a legal obligation.
    PartiallyCompleted,
    /// A task failed or was refused.
    Failed,
    /// Cancelled before it finished.
    Cancelled,
}

impl From<StateArg> for RequestState {
    fn from(state: StateArg) -> Self {
        match state {
            StateArg::Received => RequestState::Received,
            StateArg::Dispatched => RequestState::Dispatched,
            StateArg::InProgress => RequestState::InProgress,
            StateArg::Completed => RequestState::Completed,
            StateArg::PartiallyCompleted => RequestState::PartiallyCompleted,
            StateArg::Failed => RequestState::Failed,
            StateArg::Cancelled => RequestState::Cancelled,
        }
    }
}

/// Arguments of `dsrctl submit`. Give at least one identity; every identity flag repeats.
#[derive(Debug, Clone, Args)]
#[command(group = ArgGroup::new("identities").required(true).multiple(true))]
// clap's own usage line shows the identities as one choice among them.
#[command(
    override_usage = "dsrctl submit [OPTIONS] --kind <KIND> <IDENTITY>...\n       \
    IDENTITY: one or more of --email, --phone, --customer-number, --national-id, --other,\n       \
    --sha256-email, --md5-email, each repeatable"
)]
pub struct SubmitArgs {
    /// What the subject asked for.
    #[arg(long, value_enum)]
    pub kind: KindArg,

    /// The subject's e-mail address.
    #[arg(long, value_name = "ADDRESS", group = "identities")]
    pub email: Vec<String>,

    /// The subject's phone number, preferably E.164 (+358401234567).
    #[arg(long, value_name = "NUMBER", group = "identities")]
    pub phone: Vec<String>,

    /// The subject's customer number in the controller's systems.
    #[arg(long, value_name = "NUMBER", group = "identities")]
    pub customer_number: Vec<String>,

    /// The subject's national identification number.
    #[arg(long, value_name = "ID", group = "identities")]
    pub national_id: Vec<String>,

    /// Any other identity, e.g. --other loyalty-card=L-123.
    #[arg(long, value_name = "LABEL=VALUE", group = "identities", value_parser = parse_assignment)]
    pub other: Vec<(String, String)>,

    /// An e-mail address as hex SHA-256 of its trimmed, lowercased form.
    #[arg(long, value_name = "HEX", group = "identities", value_parser = parse_sha256)]
    pub sha256_email: Vec<String>,

    /// An e-mail address as hex MD5 of its trimmed, lowercased form.
    #[arg(long, value_name = "HEX", group = "identities", value_parser = parse_md5)]
    pub md5_email: Vec<String>,

    /// Limit the request to a data category (repeatable; none means all data). It chooses
    /// the holders: only those holding one of the categories get the request, and each of
    /// them acts on all it holds of the subject unless its connector scopes (the adapter is
    /// handed the categories, a manual task's work order shows them, a sql holder acts only
    /// on the tables configured with one of them).
    #[arg(long = "category", value_name = "CATEGORY")]
    pub categories: Vec<String>,

    /// Idempotency key; resubmitting with the same key does not create a second request
    /// [default: a fresh UUID v4, printed with the result]
    #[arg(long, value_name = "KEY", value_parser = parse_idempotency_key)]
    pub idempotency_key: Option<String>,

    /// Free text kept with the request (e.g. a ticket number); no identities in it.
    #[arg(long, value_name = "TEXT")]
    pub note: Option<String>,

    /// A corrected value for rectification, e.g. --correct phone=+358401234567 (repeatable).
    #[arg(
        long = "correct",
        value_name = "FIELD=VALUE",
        value_parser = parse_assignment,
        required_if_eq("kind", "rectification")
    )]
    pub corrections: Vec<(String, String)>,

    /// For restriction: lift a restriction set earlier instead of setting one.
    #[arg(long)]
    pub lift: bool,

    /// For transfer: the name of a recipient configured at the registry.
    #[arg(long, value_name = "NAME", required_if_eq("kind", "transfer"))]
    pub recipient: Option<String>,
}

/// Arguments of `dsrctl get`.
#[derive(Debug, Clone, Args)]
pub struct GetArgs {
    /// The request id.
    pub id: String,
}

/// Arguments of `dsrctl package`.
#[derive(Debug, Clone, Args)]
pub struct PackageArgs {
    /// The request id.
    pub id: String,
}

/// Arguments of `dsrctl download`.
#[derive(Debug, Clone, Args)]
#[command(group = ArgGroup::new("destination").required(true))]
pub struct DownloadArgs {
    /// The request id.
    pub id: String,

    /// Write every file under this folder, and manifest.json once every file verified. The
    /// folder must be new or empty, or hold only what a run of this same download cut short
    /// left (files that match the manifest, and its hidden .dsrctl-download folder, where
    /// each file is written until it verifies). A folder that holds this download finished
    /// is checked (each file's size and SHA-256) and reported, with nothing downloaded.
    #[arg(long, value_name = "DIR", group = "destination")]
    pub out: Option<PathBuf>,

    /// Write a zip file (deflate) holding manifest.json and every file; it must not exist.
    /// The zip is written beside it as .FILE.dsrctl-partial until whole and verified.
    #[arg(long, value_name = "FILE", group = "destination")]
    pub zip: Option<PathBuf>,
}

/// Arguments of `dsrctl list`.
#[derive(Debug, Clone, Args)]
pub struct ListArgs {
    /// Only requests in this state (repeatable; any of them).
    #[arg(long = "state", value_enum, value_name = "STATE")]
    pub states: Vec<StateArg>,

    /// Only requests of this kind.
    #[arg(long, value_enum)]
    pub kind: Option<KindArg>,

    /// Only requests past their due date and still open (RECEIVED, DISPATCHED, IN_PROGRESS
    /// or FAILED).
    #[arg(long)]
    pub overdue: bool,

    /// Only requests still open (RECEIVED, DISPATCHED, IN_PROGRESS or FAILED) that fall due
    /// within DURATION from now, overdue ones included: what on-call must act on before its
    /// due date passes. A number and a unit, s, m, h, d or w, e.g. 30m, 72h, 7d, or several,
    /// 1d12h. Sent as the instant now plus DURATION, which the next-page line prints as
    /// --due-before to page on with.
    #[arg(
        long,
        value_name = "DURATION",
        value_parser = parse_duration,
        conflicts_with_all = ["due_before", "page_token"]
    )]
    pub due_within: Option<chrono::Duration>,

    /// Only requests still open (RECEIVED, DISPATCHED, IN_PROGRESS or FAILED) due before
    /// TIME, overdue ones included: RFC 3339, e.g. 2027-01-01T00:00:00Z or
    /// 2027-01-01T00:00:00+02:00, or a date alone, 2027-01-01, for 00:00 UTC that day.
    #[arg(long, value_name = "TIME", value_parser = parse_instant)]
    pub due_before: Option<chrono::DateTime<chrono::Utc>>,

    /// Only requests about this e-mail address, in any case (repeatable; any of the
    /// identities given). Each identity flag matches a request submitted with the same flag.
    #[arg(long, value_name = "ADDRESS")]
    pub email: Vec<String>,

    /// Only requests about this phone number, however it is spaced (repeatable).
    #[arg(long, value_name = "NUMBER")]
    pub phone: Vec<String>,

    /// Only requests about this customer number (repeatable).
    #[arg(long, value_name = "NUMBER")]
    pub customer_number: Vec<String>,

    /// Only requests about this national identification number (repeatable).
    #[arg(long, value_name = "ID")]
    pub national_id: Vec<String>,

    /// Only requests about this other identity, e.g. --other loyalty-card=L-123 (repeatable;
    /// the label is not matched, only the value: L-123 under any label).
    #[arg(long, value_name = "LABEL=VALUE", value_parser = parse_assignment)]
    pub other: Vec<(String, String)>,

    /// Only requests about an e-mail address submitted as this hex SHA-256 (repeatable).
    #[arg(long, value_name = "HEX", value_parser = parse_sha256)]
    pub sha256_email: Vec<String>,

    /// Only requests about an e-mail address submitted as this hex MD5 (repeatable).
    #[arg(long, value_name = "HEX", value_parser = parse_md5)]
    pub md5_email: Vec<String>,

    /// Page size, 1..=500 [default: the registry's, 50]
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=500))]
    pub limit: Option<u32>,

    /// Continue from this page token (printed by an earlier `list`).
    #[arg(long, value_name = "TOKEN")]
    pub page_token: Option<String>,

    /// Fetch every page (each of --limit requests) and print them together.
    #[arg(long)]
    pub all: bool,
}

/// Arguments of `dsrctl watch`.
#[derive(Debug, Clone, Args)]
pub struct WatchArgs {
    /// The request id.
    pub id: String,

    /// Only events with a larger id (to resume an earlier watch).
    #[arg(long, value_name = "EVENT_ID", default_value_t = 0)]
    pub after: u64,

    /// Follow a PARTIALLY_COMPLETED request until its holders have erased the data they
    /// keep by law (at its date, years on for bookkeeping), and exit 0 only if it then ends
    /// COMPLETED. Without it, `watch` ends once such a request's events so far have been
    /// printed, exit 0: it was answered.
    #[arg(long)]
    pub until_erased: bool,

    /// Keep watching after the request ends, until interrupted (Ctrl-C): a FAILED request
    /// that an operator retries at the processor (`dsrctl tasks retry`) opens again, and
    /// its events are printed as they come.
    #[arg(long, conflicts_with = "until_erased")]
    pub follow: bool,
}

/// Arguments of `dsrctl cancel`.
#[derive(Debug, Clone, Args)]
pub struct CancelArgs {
    /// The request id, or a contract end's id.
    pub id: String,

    /// Why it is cancelled; kept with the request.
    #[arg(long, value_name = "TEXT")]
    pub reason: String,
}

/// Arguments of `dsrctl extend`.
#[derive(Debug, Clone, Args)]
pub struct ExtendArgs {
    /// The request id.
    pub id: String,

    /// Months to add to the due date; two in all at most (GDPR art. 12(3)).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=2))]
    pub months: u32,

    /// Why more time is needed; the subject must be told.
    #[arg(long, value_name = "TEXT")]
    pub reason: String,
}

/// `dsrctl pki ...`.
#[derive(Debug, Clone, Subcommand)]
pub enum PkiCommand {
    /// Create a development CA and certificates for every party (kept if already there).
    Init(PkiInitArgs),
    /// Add certificates to the development CA's revocation list (DIR/crl.pem), keeping the
    /// entries already there, or renew the list. Services that name the list in `tls.crls`
    /// refuse the revoked certificates once they reload it (within `tls.reload_interval_ms`,
    /// or at once on SIGHUP).
    Revoke(PkiRevokeArgs),
}

/// Arguments of `dsrctl pki revoke`.
#[derive(Debug, Clone, Args)]
pub struct PkiRevokeArgs {
    /// Folder of the PKI files (with the CA key).
    #[arg(long, value_name = "DIR", default_value = ".dsrelay/pki")]
    pub dir: PathBuf,

    /// A party whose certificate (DIR/PARTY.pem) is revoked (repeatable).
    #[arg(value_name = "PARTY")]
    pub parties: Vec<String>,

    /// A certificate file (PEM) to revoke (repeatable).
    #[arg(long = "file", value_name = "FILE")]
    pub certs: Vec<PathBuf>,

    /// Days until the list must be renewed: services refuse an expired list unless
    /// configured with `tls.allow_expired_crl`, so renew it before then (run this again).
    #[arg(long, value_name = "N", default_value_t = 30, value_parser = clap::value_parser!(u32).range(1..=3650))]
    pub days: u32,
}

/// Arguments of `dsrctl pki init`.

#[derive(Debug, Clone, Args)]
pub struct PkiInitArgs {
    /// Folder for the PKI files.
    #[arg(long, value_name = "DIR", default_value = ".dsrelay/pki")]
    pub dir: PathBuf,

    /// Another DNS name every certificate is valid for besides localhost (repeatable), e.g.
    /// the services' host names in docker-compose. Used only when the PKI is created.
    #[arg(long = "dns-name", value_name = "NAME")]
    pub dns_names: Vec<String>,

    /// Also copy into DIR only what party STEM (registry, processor, operator, ...) needs:
    /// the CA certificate (never the CA key), its certificate and key, a processor's, a
    /// registry's or the recipient's signing key (and its public key), a registry's
    /// processors' and recipient's public signing keys (repeatable). For containers that
    /// should each mount their own credentials only.
    #[arg(long = "install", value_name = "STEM=DIR", value_parser = parse_assignment)]
    pub install: Vec<(String, String)>,
}

/// `NAME=VALUE`, split at the first `=`; the name must not be empty.
fn parse_assignment(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((name, value)) if !name.trim().is_empty() => {
            Ok((name.trim().to_string(), value.to_string()))
        }
        _ => Err(format!("expected NAME=VALUE, got {s:?}")),
    }
}

/// A key given on purpose: an empty one would be replaced by a random key nobody sees, and a
/// retry after a lost answer would then make a second request.
fn parse_idempotency_key(s: &str) -> Result<String, String> {
    if s.trim().is_empty() {
        return Err(
            "must not be empty; leave the flag out for a fresh key, printed with the \
                    result"
                .into(),
        );
    }
    Ok(s.to_string())
}

/// An instant as every date/time flag takes it: RFC 3339, or a date alone for 00:00 UTC that
/// day. A bad one is refused naming the forms, as chrono's own words ("premature end of
/// input") do not say what was expected.
fn parse_instant(s: &str) -> Result<chrono::DateTime<chrono::Utc>, String> {
    let rfc3339 = match chrono::DateTime::parse_from_rfc3339(s) {
        Ok(at) => return Ok(at.to_utc()),
        Err(e) => e,
    };
    let date = match chrono::NaiveDate::parse_from_str(s, "%Y-%m-%d") {
        Ok(day) => return Ok(day.and_time(chrono::NaiveTime::MIN).and_utc()),
        Err(e) => e,
    };
    // With a time in it, the date and time was meant, and the date alone's complaint would
    // be about what follows the date.
    let why = if s.contains(['T', 't', ' ']) {
        rfc3339
    } else {
        date
    };
    Err(format!(
        "not a date and time ({why}): give RFC 3339, e.g. 2027-01-01T00:00:00Z or \
         2027-01-01T00:00:00+02:00, or a date alone, e.g. 2027-01-01, for 00:00 UTC that day"
    ))
}

/// A span of time as `--due-within` takes it: one or more numbers each followed by a unit,
/// `s`, `m`, `h`, `d` (24 hours) or `w` (7 days), e.g. `72h`, `7d`, `1d12h`; more than zero and
/// at most 100 years, so that now plus it is still a date the registry takes.
pub(crate) fn parse_duration(s: &str) -> Result<chrono::Duration, String> {
    const FORMS: &str = "give a number and a unit (s, m, h, d or w), e.g. 30m, 72h, 7d or 1d12h";
    let mut total: i64 = 0;
    let mut digits = String::new();
    for c in s.trim().chars() {
        if c.is_ascii_digit() {
            digits.push(c);
            continue;
        }
        let unit: i64 = match c {
            's' => 1,
            'm' => 60,
            'h' => 3_600,
            'd' => 86_400,
            'w' => 7 * 86_400,
            _ => return Err(format!("{c:?} is not a unit: {FORMS}")),
        };
        if digits.is_empty() {
            return Err(format!(
                "{s:?} has a unit without a number before it: {FORMS}"
            ));
        }
        let n: i64 = digits
            .parse()
            .map_err(|_| format!("{s:?} is too long: at most 100 years"))?;
        digits.clear();
        total = n
            .checked_mul(unit)
            .and_then(|v| total.checked_add(v))
            .ok_or_else(|| format!("{s:?} is too long: at most 100 years"))?;
    }
    if !digits.is_empty() {
        return Err(format!("{s:?} ends without a unit: {FORMS}"));
    }
    if total == 0 {
        return Err(format!("must be more than nothing: {FORMS}"));
    }
    const MAX_SECONDS: i64 = 100 * 366 * 86_400;
    if total > MAX_SECONDS {
        return Err(format!("{s:?} is too long: at most 100 years"));
    }
    Ok(chrono::Duration::seconds(total))
}

fn parse_sha256(s: &str) -> Result<String, String> {
    parse_hex_digest(s, 64)
}

fn parse_md5(s: &str) -> Result<String, String> {
    parse_hex_digest(s, 32)
}

/// Hex of the given length, lowercased: the registry only accepts lowercase, and tools such as
/// `shasum` print lowercase but others do not.
fn parse_hex_digest(s: &str, len: usize) -> Result<String, String> {
    if s.len() == len && s.bytes().all(|b| b.is_ascii_hexdigit()) {
        Ok(s.to_ascii_lowercase())
    } else {
        Err(format!(
            "expected {len} hex digits, got {} characters",
            s.chars().count()
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn clap_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    /// `watch` stops at PARTIALLY_COMPLETED, exit 0, unless --until-erased: its summary
    /// (also in `dsrctl --help`) says so rather than that it follows the request on.
    #[test]
    fn the_watch_summary_says_where_it_stops() {
        let mut cli = Cli::command();
        let watch = cli.find_subcommand_mut("watch").expect("watch");
        let about = watch.get_about().expect("a summary").to_string();
        assert!(
            !about.contains("until its retained tasks complete"),
            "{about}"
        );
        for words in ["or is PARTIALLY_COMPLETED", "--until-erased follows it on"] {
            assert!(about.contains(words), "{words} in {about}");
        }
        let help = watch.render_long_help().to_string();
        assert!(help.contains("naming the --after that continues"), "{help}");
    }

    #[test]
    fn global_flags_work_after_the_subcommand() {
        let cli = Cli::try_parse_from([
            "dsrctl",
            "get",
            "r-1",
            "--endpoint",
            "https://h:1",
            "--output",
            "json",
        ])
        .unwrap();
        assert_eq!(cli.connection.endpoint.as_deref(), Some("https://h:1"));
        assert_eq!(cli.output, OutputFormat::Json);
    }

    #[test]
    fn submit_needs_an_identity() {
        let err = Cli::try_parse_from(["dsrctl", "submit", "--kind", "erasure"]).unwrap_err();
        assert_eq!(err.kind(), clap::error::ErrorKind::MissingRequiredArgument);
    }

    #[test]
    fn kind_specific_requirements() {
        let transfer = [
            "dsrctl", "submit", "--kind", "transfer", "--email", "a@b.fi",
        ];
        assert!(Cli::try_parse_from(transfer).is_err());
        let rect = [
            "dsrctl",
            "submit",
            "--kind",
            "rectification",
            "--email",
            "a@b.fi",
        ];
        assert!(Cli::try_parse_from(rect).is_err());
    }

    #[test]
    fn value_parsers() {
        assert_eq!(
            parse_assignment("phone=+358 40=1").unwrap(),
            ("phone".to_string(), "+358 40=1".to_string())
        );
        assert!(parse_assignment("=x").is_err());
        assert!(parse_assignment("novalue").is_err());
        assert_eq!(parse_md5(&"AB".repeat(16)).unwrap(), "ab".repeat(16));
        assert!(parse_sha256(&"ab".repeat(16)).is_err());
        assert!(parse_sha256(&"zz".repeat(32)).is_err());
        let err = Cli::try_parse_from(["dsrctl", "extend", "r", "--months", "3", "--reason", "x"]);
        assert!(err.is_err());
        // A checkpoint key without checkpoints to check would be ignored: refused instead.
        let verify = |more: &[&str]| {
            let args = [
                &["dsrctl", "audit", "verify", "--checkpoint-key", "k"][..],
                more,
            ]
            .concat();
            Cli::try_parse_from(args)
        };
        let err = verify(&[]).unwrap_err();
        assert_eq!(
            err.kind(),
            clap::error::ErrorKind::MissingRequiredArgument,
            "{err}"
        );
        assert!(verify(&["--fetch-checkpoints"]).is_ok());
        assert!(verify(&["--checkpoints", "c.jsonl"]).is_ok());
        let hash = "AB".repeat(32);
        assert_eq!(
            parse_anchor(&format!("12:{hash}")).unwrap(),
            (12, "ab".repeat(32))
        );
        assert!(parse_anchor(&format!("0:{hash}")).is_err());
        assert!(parse_anchor(&hash).is_err());
        assert!(parse_anchor("3:abc").is_err());
    }

    #[test]
    fn effective_at_takes_rfc3339_or_a_date_and_says_so_when_neither() {
        let end = |at: &str| {
            let argv = [
                "dsrctl",
                "contracts",
                "end",
                "--processor",
                "p",
                "--choice",
                "delete",
            ];
            Cli::try_parse_from([&argv[..], &["--effective-at", at]].concat())
        };
        let at = |text: &str| match end(text).unwrap().command {
            Command::Contracts(ContractsCommand::End { effective_at, .. }) => {
                effective_at.unwrap().to_rfc3339()
            }
            other => panic!("{other:?}"),
        };
        assert_eq!(at("2027-01-01"), "2027-01-01T00:00:00+00:00");
        assert_eq!(at("2027-01-01T00:00:00+02:00"), "2026-12-31T22:00:00+00:00");
        assert_eq!(at("2027-01-01T12:30:00Z"), "2027-01-01T12:30:00+00:00");
        for (bad, why) in [
            ("2027-01", "premature end of input"),
            ("2027-13-01", "out of range"),
            ("2027-01-01T25:00:00Z", "out of range"),
            ("01.01.2027", "invalid"),
        ] {
            let err = end(bad).unwrap_err();
            assert_eq!(err.kind(), clap::error::ErrorKind::ValueValidation, "{bad}");
            let text = err.to_string();
            for words in [
                why,
                "RFC 3339, e.g. 2027-01-01T00:00:00Z",
                "2027-01-01, for 00:00 UTC",
            ] {
                assert!(text.contains(words), "{bad}: {words:?} in {text}");
            }
        }
        let help = Cli::command()
            .find_subcommand_mut("contracts")
            .and_then(|c| c.find_subcommand_mut("end"))
            .map(|c| c.render_long_help().to_string())
            .unwrap();
        let help = help.split_whitespace().collect::<Vec<_>>().join(" ");
        assert!(
            help.contains("a date alone, 2027-01-01, for 00:00 UTC that day"),
            "{help}"
        );
    }

    /// The registry takes a choice until the grace period ends, before the effective date
    /// too: the help says so rather than "during the grace period".
    #[test]
    fn choose_says_until_when_a_choice_is_taken() {
        let help = Cli::command()
            .find_subcommand_mut("contracts")
            .and_then(|c| c.find_subcommand_mut("choose"))
            .map(|c| c.render_long_help().to_string())
            .unwrap();
        let help = help.split_whitespace().collect::<Vec<_>>().join(" ");
        assert!(!help.contains("during"), "{help}");
        assert!(
            help.contains("at any time until its grace period ends, before the effective date too"),
            "{help}"
        );
    }

    #[test]
    fn an_idempotency_key_given_must_not_be_empty() {
        for key in ["", " ", "\t "] {
            for args in [
                &["submit", "--kind", "erasure", "--email", "a@b.fi"][..],
                &[
                    "contracts",
                    "end",
                    "--processor",
                    "p",
                    "--choice",
                    "delete",
                    "--now",
                ],
            ] {
                let argv = [&["dsrctl"][..], args, &["--idempotency-key", key]].concat();
                let err = Cli::try_parse_from(argv).unwrap_err();
                assert_eq!(
                    err.kind(),
                    clap::error::ErrorKind::ValueValidation,
                    "{args:?}"
                );
                assert!(err.to_string().contains("must not be empty"), "{err}");
            }
        }
        let argv = ["dsrctl", "submit", "--kind", "erasure", "--email", "a@b.fi"];
        let cli = Cli::try_parse_from([&argv[..], &["--idempotency-key", "k-1"]].concat());
        let Command::Submit(args) = cli.unwrap().command else {
            panic!("not a submit");
        };
        assert_eq!(args.idempotency_key.as_deref(), Some("k-1"));
    }

    #[test]
    fn download_needs_exactly_one_destination() {
        let parse = |args: &[&str]| Cli::try_parse_from([&["dsrctl", "download"], args].concat());
        let err = parse(&["r-1"]).unwrap_err();
        assert_eq!(err.kind(), clap::error::ErrorKind::MissingRequiredArgument);
        let err = parse(&["r-1", "--out", "d", "--zip", "z.zip"]).unwrap_err();
        assert_eq!(err.kind(), clap::error::ErrorKind::ArgumentConflict);
        let cli = parse(&["r-1", "--zip", "z.zip"]).unwrap();
        let Command::Download(args) = cli.command else {
            panic!("{cli:?}");
        };
        assert_eq!(args.zip, Some(PathBuf::from("z.zip")));
        assert_eq!(args.out, None);
    }
}
