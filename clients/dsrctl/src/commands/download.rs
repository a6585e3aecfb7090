//! `dsrctl package` and `dsrctl download`: return-of-data packages.

use std::future::Future;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::pin::Pin;

use anyhow::anyhow;
use dsrelay_sdk::proto::PackageInfo;
use dsrelay_sdk::DownloadEvent;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Serialize;
use sha2::{Digest, Sha256};
use tokio_stream::{Stream, StreamExt};

use crate::cli::{DownloadArgs, PackageArgs};
use crate::commands::{Hint, Io, Registry};
use crate::output::{emit, Render, Time};
use crate::table::{clean, Table};
use crate::unpack::{
    check_folder_files, finished_download, mismatches, DirSink, FileOutcome, Leftovers, Sink, Stop,
    Unpacker, ZipSink, MANIFEST_NAME, STAGING_NAME, STOPPED,
};
use crate::{Failure, EXIT_FAILURE};

/// Packages at least this large get a progress bar (when stderr is a terminal).
const PROGRESS_FROM_BYTES: u64 = 16 * 1024 * 1024;

/// Where `download` writes.
#[derive(Clone)]
pub(crate) enum Target {
    /// A folder, new or empty, or holding what an interrupted run of the same download left.
    Dir(PathBuf),
    /// A zip file that does not exist yet.
    Zip(PathBuf),
}

/// A folder that holds this download, finished: its `manifest.json` names the request, and
/// every file it lists is there with its size and SHA-256.
pub(crate) struct Finished {
    dir: PathBuf,
    /// Its `manifest.json`.
    manifest: Vec<u8>,
    /// Every file the manifest lists, checked.
    outcomes: Vec<FileOutcome>,
    /// Whether the staging folder a run killed while removing it left is still there.
    staging_left: bool,
}

impl Target {
    /// Takes the destination from the arguments and refuses one that would mix with or
    /// replace existing files, before anything is asked of the registry. A folder that holds
    /// this download finished is taken as it is: [`run`] compares it with the registry's
    /// package before it checks its files, and writes nothing when it is still that one.
    pub(crate) fn check(args: &DownloadArgs) -> Result<Target, Failure> {
        match (&args.out, &args.zip) {
            (Some(dir), None) => {
                if finished_download(dir, &args.id).is_none() {
                    DirSink::check_target(dir, &args.id).map_err(Failure::Usage)?;
                }
                Ok(Self::Dir(dir.clone()))
            }
            (None, Some(zip)) => {
                ZipSink::check_target(zip, &args.id).map_err(Failure::Usage)?;
                Ok(Self::Zip(zip.clone()))
            }
            // clap's group makes them exclusive and one required.
            _ => Err(Failure::Usage(
                "give one of --out DIR and --zip FILE".into(),
            )),
        }
    }

    /// Checks the destination for `info`'s package (its manifest paths already checked),
    /// writing nothing: hashes the files an interrupted run left, so it can take long
    /// (stopping once `stop` is set).
    fn prepare(&self, info: &PackageInfo, stop: &Stop) -> Result<Leftovers, Failure> {
        match self {
            Self::Dir(dir) => DirSink::check_leftovers(dir, info, stop).map_err(Failure::Usage),
            Self::Zip(zip) => ZipSink::check_target(zip, &info.request_id)
                .map(|()| Leftovers::default())
                .map_err(Failure::Usage),
        }
    }

    /// Opens the destination [`Self::prepare`] checked, creating it.
    fn open(
        &self,
        info: &PackageInfo,
        leftovers: Leftovers,
        stop: &Stop,
    ) -> Result<Box<dyn Sink>, Failure> {
        Ok(match self {
            Self::Dir(dir) => Box::new(
                DirSink::create(dir, &info.request_id, leftovers, stop)
                    .map_err(Failure::Package)?,
            ),
            Self::Zip(zip) => {
                Box::new(ZipSink::create(zip, &info.request_id, stop).map_err(Failure::Package)?)
            }
        })
    }
}

/// `download` into a folder that holds that download finished already, of the package as
/// the registry has it ([`finished_folder`]): says so, with the check of its files; exit 0.
fn finished_already(done: Finished, hint: &Hint, io: &mut Io<'_>) -> Result<u8, Failure> {
    let mut view = DownloadView::of(
        crate::unpack::manifest_request_id(&done.manifest).unwrap_or_default(),
        Some(&done.dir),
        None,
        &done.manifest,
        done.outcomes,
    );
    view.finished_already = true;
    view.hint = hint.clone();
    if done.staging_left {
        let left = done.dir.join(STAGING_NAME);
        let note = format!(
            "note: {} is left over from it and can be deleted",
            left.display()
        );
        let _ = writeln!(io.err, "{}", clean(&note));
    }
    super::verdict(emit(io.out, io.format, &view, false), 0)
}

/// The holders `manifest_json` names as having ended without their part (its
/// `not_returned`), as `processor/subprocessor (STATE)`; none when it names none or cannot
/// be read (the files' own check reports an unreadable manifest).
fn not_returned(manifest_json: &[u8]) -> Vec<String> {
    #[derive(serde::Deserialize)]
    struct Listing {
        #[serde(default)]
        not_returned: Vec<Holder>,
    }
    #[derive(serde::Deserialize)]
    struct Holder {
        processor: String,
        subprocessor: String,
        state: String,
    }
    serde_json::from_slice::<Listing>(manifest_json)
        .map(|l| l.not_returned)
        .unwrap_or_default()
        .into_iter()
        .map(|h| format!("{}/{} ({})", h.processor, h.subprocessor, h.state))
        .collect()
}

/// The line a package lacking the data of `not_returned` holders gets, in `package` and
/// `download`; `get` is the command that shows the request. A FAILED or REFUSED task may be
/// retried by the processor's operator; a CANCELLED one never is.
fn lacking(not_returned: &[String], get: &str) -> String {
    let (cancelled, stopped): (Vec<&String>, Vec<&String>) =
        (not_returned.iter()).partition(|holder| holder.ends_with(" (CANCELLED)"));
    let (its, it) = if not_returned.len() == 1 {
        ("its data", "it")
    } else {
        ("their data", "they")
    };
    let when = match (cancelled.is_empty(), stopped.is_empty()) {
        (true, _) => {
            format!("{it} will not send it unless the processor's operator retries the task")
        }
        (false, true) => format!("{it} will not send it: the task was cancelled"),
        (false, false) => "the cancelled tasks' will not be sent, the others' only if the \
                           processor's operator retries the task"
            .to_string(),
    };
    format!(
        "{}: {its} is not in the package, and {when} (`{get}` says why)",
        not_returned.join(", ")
    )
}

/// The `complete` row of `package`: the proto's `complete` means no more parts are coming,
/// which a package lacking a holder's data is too, so "yes" alone would read as all of it.
fn complete_cell(complete: bool, not_returned: &[String]) -> String {
    match (complete, not_returned.len()) {
        (false, _) => "no".into(),
        (true, 0) => "yes".into(),
        (true, n) => format!(
            "no more parts coming; {n} {} not returned ({})",
            if n == 1 {
                "subprocessor"
            } else {
                "subprocessors"
            },
            holders(not_returned)
        ),
    }
}

/// `payroll/crm, FAILED; payroll/hr, REFUSED` from `payroll/crm (FAILED)`, ...
fn holders(not_returned: &[String]) -> String {
    (not_returned.iter())
        .map(
            |h| match h.strip_suffix(')').and_then(|h| h.rsplit_once(" (")) {
                Some((holder, state)) => format!("{holder}, {state}"),
                None => h.clone(),
            },
        )
        .collect::<Vec<_>>()
        .join("; ")
}

/// A package's digest: the SHA-256 of its `manifest.json` (none when there is none).
fn package_digest(manifest_json: &[u8]) -> Option<String> {
    (!manifest_json.is_empty()).then(|| hex::encode(Sha256::digest(manifest_json)))
}

/// The sum of file sizes from a manifest. The registry's numbers are not trusted to add up
/// within a u64: saturating, a nonsensical manifest shows an impossible total (its files
/// then fail their checks) instead of panicking or wrapping to a small one.
fn total_bytes(sizes: impl Iterator<Item = u64>) -> u64 {
    sizes.fold(0, u64::saturating_add)
}

/// The bytes `info`'s manifest announces, in all.
fn manifest_bytes(info: &PackageInfo) -> u64 {
    total_bytes(info.files.iter().map(|f| f.size))
}

/// One file as `package` shows it.
#[derive(Debug, Serialize)]
struct ManifestFileView {
    path: String,
    processor: String,
    subprocessor: String,
    categories: Vec<String>,
    media_type: String,
    size: u64,
    sha256: String,
}

/// What `package` prints.
#[derive(Debug, Serialize)]
pub(crate) struct PackageView {
    request_id: String,
    complete: bool,
    /// `<processor>/<subprocessor>` parts not arrived yet.
    missing: Vec<String>,
    /// `<processor>/<subprocessor> (STATE)` whose task ended FAILED, REFUSED or CANCELLED
    /// without its part, from the manifest, as `download` shows them.
    not_returned: Vec<String>,
    /// Processors the request was cancelled before they accepted it: never asked for the
    /// data, so the package never completes.
    never_asked: Vec<String>,
    expires_at: Option<Time>,
    /// SHA-256 of manifest.json once the package is complete: before, the manifest lists
    /// only the files stored so far, and its digest is not the package's.
    package_sha256: Option<String>,
    files: Vec<ManifestFileView>,
    #[serde(skip)]
    hint: Hint,
}

impl PackageView {
    /// The command that shows the request, and why a holder sent nothing.
    fn get(&self) -> String {
        self.hint.command(&["get", &self.request_id])
    }
}

impl From<&PackageInfo> for PackageView {
    fn from(info: &PackageInfo) -> Self {
        Self {
            request_id: info.request_id.clone(),
            complete: info.complete,
            missing: info.missing.clone(),
            not_returned: not_returned(&info.manifest_json),
            never_asked: info.never_asked.clone(),
            expires_at: Time::from_proto(info.expires_at.as_ref()),
            package_sha256: package_digest(&info.manifest_json).filter(|_| info.complete),
            files: info
                .files
                .iter()
                .map(|f| ManifestFileView {
                    path: f.path.clone(),
                    processor: f.processor.clone(),
                    subprocessor: f.subprocessor.clone(),
                    categories: f.categories.clone(),
                    media_type: f.media_type.clone(),
                    size: f.size,
                    sha256: f.sha256.clone(),
                })
                .collect(),
            hint: Hint::default(),
        }
    }
}

impl Render for PackageView {
    fn to_table(&self) -> String {
        let mut head = Table::headless();
        head.row(["request", self.request_id.as_str()]);
        let complete = if self.never_asked.is_empty() {
            complete_cell(self.complete, &self.not_returned)
        } else {
            // "no" alone would read as parts still coming.
            "never: the request was cancelled before a processor was asked".to_string()
        };
        head.row(["complete".to_string(), clean(&complete)]);
        if !self.never_asked.is_empty() {
            head.row([
                "never asked".to_string(),
                clean(&self.never_asked.join(", ")),
            ]);
        }
        if !self.missing.is_empty() {
            head.row(["missing".to_string(), clean(&self.missing.join(", "))]);
        }
        if !self.not_returned.is_empty() {
            head.row([
                "not returned".to_string(),
                clean(&lacking(&self.not_returned, &self.get())),
            ]);
        }
        if let Some(t) = self.expires_at {
            head.row(["expires".to_string(), t.to_string()]);
        }
        if let Some(digest) = &self.package_sha256 {
            head.row(["package sha256", digest.as_str()]);
        }
        let mut out = head.render();
        if !self.files.is_empty() {
            let mut t = Table::new(["PATH", "SIZE", "MEDIA TYPE", "CATEGORIES", "SHA256"]);
            for f in &self.files {
                t.row([
                    clean(&f.path),
                    f.size.to_string(),
                    clean(&f.media_type),
                    clean(&f.categories.join(", ")),
                    clean(&f.sha256),
                ]);
            }
            out.push('\n');
            out.push_str(&t.render());
        }
        out
    }
}

/// `dsrctl package ID`.
pub(crate) async fn package(
    registry: &Registry,
    args: &PackageArgs,
    io: &mut Io<'_>,
) -> Result<u8, Failure> {
    let info = registry
        .client
        .get_package(args.id.as_str())
        .await
        .map_err(|s| registry.failed(s))?;
    let mut view = PackageView::from(&info);
    view.hint = registry.hint.clone();
    emit(io.out, io.format, &view, false)?;
    Ok(0)
}

/// One downloaded file, as `download` reports it.
#[derive(Debug, Serialize)]
struct DownloadedFileView {
    path: String,
    size: u64,
    sha256: String,
    verified: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

/// What `download` prints.
#[derive(Debug, Serialize)]
pub(crate) struct DownloadView {
    request_id: String,
    /// The folder written, with `--out`.
    #[serde(skip_serializing_if = "Option::is_none")]
    out: Option<String>,
    /// The zip file written, with `--zip`.
    #[serde(skip_serializing_if = "Option::is_none")]
    zip: Option<String>,
    /// SHA-256 of manifest.json.
    package_sha256: Option<String>,
    /// How many files the manifest lists.
    file_count: usize,
    /// Their bytes in all.
    bytes: u64,
    /// How many matched the manifest's size and SHA-256.
    digests_verified: usize,
    /// Every file matched.
    verified: bool,
    /// The folder held the download finished already: nothing was downloaded, the files
    /// were checked where they are.
    finished_already: bool,
    /// The holders the manifest names as having ended without their part, as
    /// `processor/subprocessor (STATE)`.
    not_returned: Vec<String>,
    files: Vec<DownloadedFileView>,
    #[serde(skip)]
    hint: Hint,
}

impl DownloadView {
    /// The command that shows the request, and why a holder sent nothing.
    fn get(&self) -> String {
        self.hint.command(&["get", &self.request_id])
    }

    fn new(info: &PackageInfo, target: &Target, outcomes: Vec<FileOutcome>) -> Self {
        let (out, zip) = match target {
            Target::Dir(dir) => (Some(dir.as_path()), None),
            Target::Zip(zip) => (None, Some(zip.as_path())),
        };
        Self::of(
            info.request_id.clone(),
            out,
            zip,
            &info.manifest_json,
            outcomes,
        )
    }

    /// The view of a download of `request_id`'s package, whose `manifest.json` is
    /// `manifest_json`.
    fn of(
        request_id: String,
        out: Option<&Path>,
        zip: Option<&Path>,
        manifest_json: &[u8],
        outcomes: Vec<FileOutcome>,
    ) -> Self {
        let digests_verified = outcomes.iter().filter(|o| o.error.is_none()).count();
        Self {
            request_id,
            out: out.map(|p| p.display().to_string()),
            zip: zip.map(|p| p.display().to_string()),
            package_sha256: package_digest(manifest_json),
            file_count: outcomes.len(),
            bytes: total_bytes(outcomes.iter().map(|o| o.size)),
            digests_verified,
            verified: digests_verified == outcomes.len(),
            finished_already: false,
            not_returned: not_returned(manifest_json),
            files: outcomes
                .into_iter()
                .map(|o| DownloadedFileView {
                    verified: o.error.is_none(),
                    path: o.path,
                    size: o.size,
                    sha256: o.sha256,
                    error: o.error,
                })
                .collect(),
            hint: Hint::default(),
        }
    }
}

impl Render for DownloadView {
    fn to_table(&self) -> String {
        let mut out = String::new();
        if self.finished_already {
            out = format!(
                "download finished already: {} holds the package of {}, every file as its \
                 {MANIFEST_NAME} lists it\n\n",
                clean(self.out.as_deref().unwrap_or_default()),
                clean(&self.request_id)
            );
        }
        let mut head = Table::headless();
        head.row(["request", self.request_id.as_str()]);
        if let Some(dir) = &self.out {
            head.row(["folder".to_string(), clean(dir)]);
        }
        if let Some(zip) = &self.zip {
            head.row(["zip".to_string(), clean(zip)]);
        }
        if let Some(digest) = &self.package_sha256 {
            head.row(["package sha256", digest.as_str()]);
        }
        head.row([
            "files".to_string(),
            format!(
                "{} ({} bytes), {} of {} verified",
                self.file_count, self.bytes, self.digests_verified, self.file_count
            ),
        ]);
        if !self.not_returned.is_empty() {
            head.row([
                "not returned".to_string(),
                clean(&lacking(&self.not_returned, &self.get())),
            ]);
        }
        out.push_str(&head.render());
        // The files verified are summed up above (`package` lists them, `--output json` has
        // each); those that did not are what the user must act on.
        let failed: Vec<_> = self.files.iter().filter(|f| !f.verified).collect();
        if !failed.is_empty() {
            let mut t = Table::new(["PATH", "SIZE", "SHA256", "CHECK"]);
            for f in failed {
                let error = f.error.as_deref().unwrap_or_default();
                t.row([
                    clean(&f.path),
                    f.size.to_string(),
                    clean(&f.sha256),
                    format!("FAILED: {}", clean(error)),
                ]);
            }
            out.push('\n');
            out.push_str(&t.render());
        }
        // Last, as what a reader takes away: the files verified are not all of the data.
        if !self.not_returned.is_empty() {
            let n = self.not_returned.len();
            out.push_str(&format!(
                "\nthis package lacks the data of {n} {} ({}): {} not returned, so the \
                 download is not all of the data\n",
                if n == 1 {
                    "subprocessor"
                } else {
                    "subprocessors"
                },
                clean(&holders(&self.not_returned)),
                if n == 1 { "it was" } else { "they were" }
            ));
        }
        out
    }
}

/// A progress bar on stderr for a large package, when stderr is a terminal; hidden
/// otherwise, so pipes and tests see no control characters.
fn progress_bar(total: u64) -> ProgressBar {
    if total < PROGRESS_FROM_BYTES || !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
    if let Ok(style) =
        ProgressStyle::with_template("{wide_bar} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}")
    {
        bar.set_style(style);
    }
    bar
}

/// A FAILED_PRECONDITION from DownloadPackage usually means parts are missing: asks
/// GetPackage which, and names in the error those the registry's message does not.
async fn explain_refusal(registry: &Registry, id: &str, status: tonic::Status) -> Failure {
    if status.code() != tonic::Code::FailedPrecondition {
        return registry.broke(status);
    }
    let missing = match registry.client.get_package(id).await {
        Ok(info) => info
            .missing
            .into_iter()
            .filter(|part| !status.message().contains(part.as_str()))
            .collect::<Vec<_>>(),
        // Expired or of a kind without a package: the first answer says so already.
        Err(_) => vec![],
    };
    if missing.is_empty() {
        return registry.failed(status);
    }
    registry.failed(tonic::Status::new(
        status.code(),
        format!(
            "{}; parts still missing: {}",
            status.message(),
            missing.join(", ")
        ),
    ))
}

/// The failure of a download cut short by Ctrl-C.
fn interrupted() -> Failure {
    Failure::Package(anyhow!("interrupted (Ctrl-C)"))
}

/// Whether `failure` is work saying it stopped for Ctrl-C, rather than failing of itself.
fn stopped(failure: &Failure) -> bool {
    match failure {
        Failure::Usage(message) => message == STOPPED,
        Failure::Package(err) => err.root_cause().to_string() == STOPPED,
        _ => false,
    }
}

/// The failure for work that ended with `failure` after Ctrl-C was `caught`: its own,
/// unless it only says it stopped.
fn failed_after(failure: Failure, caught: bool) -> Failure {
    if caught && stopped(&failure) {
        interrupted()
    } else {
        failure
    }
}

/// The events of a package download.
type Events = Pin<Box<dyn Stream<Item = Result<DownloadEvent, tonic::Status>>>>;

/// What `download` asks of the registry: [`Registry`], or a stand-in in the tests of the
/// order of the asking.
trait Source {
    /// GetPackage.
    async fn package(&self, id: &str) -> Result<PackageInfo, Failure>;
    /// DownloadPackage, opened when the stream is first polled.
    fn download(&self, id: &str) -> Events;
    /// The failure for DownloadPackage's refusal `status`, explained (which can ask more).
    async fn refused(&self, id: &str, status: tonic::Status) -> Failure;
    /// The failure for `status`, which ended a download under way, or refused one whose
    /// explanation Ctrl-C cut short.
    fn broke(&self, status: tonic::Status) -> Failure;
}

impl Source for Registry {
    async fn package(&self, id: &str) -> Result<PackageInfo, Failure> {
        self.client
            .get_package(id)
            .await
            .map_err(|s| Registry::failed(self, s))
    }

    fn download(&self, id: &str) -> Events {
        Box::pin(self.client.download_package(id))
    }

    async fn refused(&self, id: &str, status: tonic::Status) -> Failure {
        explain_refusal(self, id, status).await
    }

    fn broke(&self, status: tonic::Status) -> Failure {
        if !dsrelay_sdk::is_lost_stream(&status) {
            return Registry::failed(self, status);
        }
        // The SDK's words tell a program to call download_package again and drop what it
        // received; this command keeps the files it verified, and the note printed before
        // this says to run it again.
        let cause = std::error::Error::source(&status)
            .map(|cause| format!(": {cause}"))
            .unwrap_or_default();
        Failure::Package(anyhow!(
            "UNAVAILABLE: the connection to the registry at {} was lost during the download \
             (the registry was stopped, or the network failed){cause}",
            self.endpoint
        ))
    }
}

/// Ctrl-C, caught while `download` runs so that it ends the download cleanly.
struct CtrlC<F> {
    signal: Pin<Box<F>>,
    /// Cleared once Ctrl-C was caught (the signal is then spent), or when no handler could
    /// be installed (Ctrl-C then ends the process as usual).
    catching: bool,
}

impl<F: Future<Output = std::io::Result<()>>> CtrlC<F> {
    fn new(signal: F) -> Self {
        Self {
            signal: Box::pin(signal),
            catching: true,
        }
    }

    /// Resolves when Ctrl-C is caught; never once it was, or when it cannot be. Dropped
    /// unresolved, it loses nothing: the signal is kept here.
    async fn caught(&mut self) {
        if self.catching {
            let caught = self.signal.as_mut().await;
            // Spent either way: the signal must not be polled again.
            self.catching = false;
            if caught.is_ok() {
                return;
            }
        }
        std::future::pending().await
    }
}

/// Runs `work` on a blocking thread so that Ctrl-C is caught meanwhile: it sets `stop`,
/// which the work checks between its steps, and then waits for the work to end. Returns
/// the work's outcome and whether Ctrl-C came.
async fn blocking<T, F>(
    ctrl_c: &mut CtrlC<F>,
    stop: &Stop,
    work: impl FnOnce() -> Result<T, Failure> + Send + 'static,
) -> (Result<T, Failure>, bool)
where
    T: Send + 'static,
    F: Future<Output = std::io::Result<()>>,
{
    let mut task = tokio::task::spawn_blocking(work);
    let (joined, caught) = tokio::select! {
        biased;
        () = ctrl_c.caught() => {
            stop.set();
            ((&mut task).await, true)
        }
        joined = &mut task => (joined, false),
    };
    let outcome = joined.unwrap_or_else(|e| {
        Err(Failure::Package(anyhow!(
            "the download's work on its own thread failed: {e}"
        )))
    });
    (outcome, caught)
}

/// Says on stderr what a download that stopped early left.
fn note_left(io: &mut Io<'_>, stopped: &str, left: &str) {
    // The failure follows on the next line; this note must not replace it.
    let _ = writeln!(io.err, "{}", clean(&format!("{stopped}: {left}")));
}

/// Whether DownloadPackage's manifest `sent` is the one `checked` that GetPackage gave.
fn same_package(sent: &PackageInfo, checked: &PackageInfo) -> bool {
    sent.request_id == checked.request_id
        && sent.complete == checked.complete
        && sent.files == checked.files
        && sent.manifest_json == checked.manifest_json
}

/// What to do when the package changed between GetPackage and DownloadPackage, nothing
/// having been written; `earlier`, how many files an earlier run left in the folder.
fn changed(id: &str, target: &Target, earlier: usize) -> Failure {
    let mut message = format!(
        "the package of {id} changed between the registry's two answers, and nothing was \
         written: run the same command again"
    );
    if let (Target::Dir(dir), 1..) = (target, earlier) {
        message.push_str(&format!(
            " (it checks the {earlier} files an earlier run left in {} against the package \
             as it is then, and refuses any that no longer match: download into a new \
             folder then)",
            dir.display()
        ));
    }
    Failure::Package(anyhow!(message))
}

/// DownloadPackage's manifest, which must be `checked`, the one GetPackage gave; and the rest
/// of the stream. `earlier`, how many files an earlier run left in the folder, for the
/// message when the package changed.
async fn download_manifest<S: Source, F: Future<Output = std::io::Result<()>>>(
    source: &S,
    checked: &PackageInfo,
    target: &Target,
    earlier: usize,
    ctrl_c: &mut CtrlC<F>,
) -> Result<(PackageInfo, Events), Failure> {
    let id = checked.request_id.as_str();
    let mut events = source.download(id);
    let first = tokio::select! {
        biased;
        () = ctrl_c.caught() => return Err(interrupted()),
        event = events.next() => event,
    };
    match first {
        Some(Ok(DownloadEvent::Manifest(info))) if same_package(&info, checked) => {
            Ok((info, events))
        }
        Some(Ok(DownloadEvent::Manifest(_))) => Err(changed(id, target, earlier)),
        Some(Err(status)) => {
            // Explaining asks the registry again: Ctrl-C gives the refusal as it came.
            let plain = status.clone();
            Err(tokio::select! {
                biased;
                () = ctrl_c.caught() => source.broke(plain),
                failure = source.refused(id, status) => failure,
            })
        }
        Some(Ok(DownloadEvent::Chunk(_))) | None => Err(Failure::Package(anyhow!(
            "the registry sent no manifest for {id}"
        ))),
    }
}

/// A download's start: the manifest from GetPackage, the destination checked for it (the
/// files an interrupted run left hashed, on a blocking thread), then DownloadPackage, whose
/// manifest must be the one checked, and only then the destination created. The registry
/// stops a download that reads nothing for its call limit, which hashing many gigabytes
/// outlasts; a refused download writes nothing. Returns the manifest, the unpacker and the
/// rest of the stream.
async fn start<S: Source, F: Future<Output = std::io::Result<()>>>(
    source: &S,
    id: &str,
    target: &Target,
    stop: &Stop,
    ctrl_c: &mut CtrlC<F>,
    io: &mut Io<'_>,
) -> Result<(PackageInfo, Unpacker, Events), Failure> {
    // Polled from the start, so Ctrl-C is caught (not fatal) before anything is written.
    let checked = tokio::select! {
        biased;
        () = ctrl_c.caught() => return Err(interrupted()),
        info = source.package(id) => info?,
    };
    if checked.request_id != id {
        return Err(Failure::Package(anyhow!(
            "asked for the package of {id}, the registry sent that of {}",
            checked.request_id
        )));
    }
    if !checked.complete {
        // Nothing is checked: DownloadPackage refuses, naming the parts missing. A package
        // completed since is another manifest (refused as changed); the same one, still
        // incomplete, is nothing to download.
        let _stream = download_manifest(source, &checked, target, 0, ctrl_c).await?;
        return Err(Failure::BadAnswer(format!(
            "the registry sent the package of {id} for download while it is not complete, \
             and nothing was written"
        )));
    }
    Unpacker::check_manifest(&checked).map_err(Failure::Package)?;
    let (dest, info, stopping) = (target.clone(), checked.clone(), stop.clone());
    let (found, caught) = blocking(ctrl_c, stop, move || dest.prepare(&info, &stopping)).await;
    let leftovers = match found {
        Ok(_) if caught => return Err(interrupted()),
        Ok(found) => found,
        Err(failure) => return Err(failed_after(failure, caught)),
    };
    let (info, events) =
        download_manifest(source, &checked, target, leftovers.count(), ctrl_c).await?;
    let (dest, opening, stopping) = (target.clone(), info.clone(), stop.clone());
    let (opened, caught) = blocking(ctrl_c, stop, move || {
        dest.open(&opening, leftovers, &stopping)
    })
    .await;
    let sink = match opened {
        Ok(sink) if caught => {
            note_left(io, "the download stopped", &sink.abort());
            return Err(interrupted());
        }
        Ok(sink) => sink,
        Err(failure) => return Err(failed_after(failure, caught)),
    };
    let unpacker = Unpacker::new(&info, sink).map_err(Failure::Package)?;
    Ok((info, unpacker, events))
}

/// `download` into `dir`, which holds the finished download `done` of `id`: the package
/// the registry has now is asked for (GetPackage), and the folder must hold that one, its
/// `manifest.json` the same bytes (so the same digest). The package changes when a part
/// comes after the folder was written (a task retried after it failed): the folder then
/// holds an older version, which is refused, naming a new folder, rather than reported
/// finished; its files are not checked then, nor is anything written. The same package is
/// checked file by file (SHA-256) where it is ([`finished_already`]).
async fn finished_folder<S: Source>(
    source: &S,
    id: &str,
    dir: &Path,
    done: crate::unpack::FinishedFolder,
    hint: &Hint,
    io: &mut Io<'_>,
) -> Result<u8, Failure> {
    let info = match source.package(id).await {
        Ok(info) => info,
        Err(failure) => {
            // The failure follows on the next line; this note must not replace it.
            let note = format!(
                "note: {} holds a finished download of {id}, but the registry could not be \
                 asked whether its package is still that one",
                dir.display()
            );
            let _ = writeln!(io.err, "{}", clean(&note));
            return Err(failure);
        }
    };
    let here = package_digest(&done.manifest).unwrap_or_default();
    let now = package_digest(&info.manifest_json).unwrap_or_default();
    if info.request_id != id || here != now {
        let when = if info.complete {
            String::new()
        } else {
            let package = hint.command(&["package", id]);
            format!(" once it is complete (`{package}` says what it waits for)")
        };
        return Err(Failure::Package(anyhow!(
            "--out {} holds an older version of the package of {id}: its {MANIFEST_NAME} has \
             SHA-256 {here}, the registry's package now {now}, and what it lists (or lists as \
             not returned) may have changed since; download into a new folder{when} ({}) and \
             use that one",
            dir.display(),
            hint.command(&["download", id, "--out", "NEW_DIR"]),
        )));
    }
    // A package that does not match its manifest, as in a download.
    let outcomes = check_folder_files(dir, &done.manifest)
        .map_err(|e| Failure::Package(anyhow!("--out {}: {e}", dir.display())))?;
    if let Some(problems) = mismatches(&outcomes) {
        return Err(Failure::Package(anyhow!(
            "--out {} holds a download of request {id} that no longer matches its \
             {MANIFEST_NAME} ({problems}): download into a new folder",
            dir.display(),
        )));
    }
    let done = Finished {
        dir: dir.to_path_buf(),
        manifest: done.manifest,
        outcomes,
        staging_left: done.staging_left,
    };
    finished_already(done, hint, io)
}

/// `dsrctl download ID (--out DIR | --zip FILE)`: 0 when every file matched the manifest,
/// 1 naming each file that did not. Cut short (an error, the connection lost, Ctrl-C), it
/// removes what it had not verified and says on stderr which file it was receiving and what
/// is left; the same command run again then finishes the download. Into a folder that holds
/// the download finished, it writes nothing ([`finished_folder`]).
pub(crate) async fn run(
    registry: &Registry,
    args: &DownloadArgs,
    target: Target,
    io: &mut Io<'_>,
) -> Result<u8, Failure> {
    if let Target::Dir(dir) = &target {
        if let Some(done) = finished_download(dir, &args.id) {
            return finished_folder(registry, &args.id, dir, done, &registry.hint, io).await;
        }
    }
    let mut ctrl_c = CtrlC::new(tokio::signal::ctrl_c());
    let stop = Stop::default();
    let (info, mut unpacker, mut events) =
        start(registry, &args.id, &target, &stop, &mut ctrl_c, io).await?;
    let progress = progress_bar(manifest_bytes(&info));
    loop {
        // Err(None): Ctrl-C.
        let event = tokio::select! {
            event = events.next() => event.map(|e| e.map_err(Some)),
            () = ctrl_c.caught() => Some(Err(None)),
        };
        let step = match event {
            None => break,
            Some(Ok(DownloadEvent::Chunk(chunk))) => unpacker
                .chunk(&chunk)
                .map(|()| chunk.data.len() as u64)
                .map_err(Failure::Package),
            Some(Ok(DownloadEvent::Manifest(_))) => Err(Failure::Package(anyhow!(
                "the registry sent a second manifest"
            ))),
            Some(Err(Some(status))) => Err(registry.broke(status)),
            Some(Err(None)) => Err(interrupted()),
        };
        match step {
            Ok(bytes) => progress.inc(bytes),
            Err(failure) => {
                progress.finish_and_clear();
                let stopped = match unpacker.receiving() {
                    Some(path) => format!("the download stopped while receiving {path}"),
                    None => "the download stopped".to_string(),
                };
                let left = unpacker.abort();
                note_left(io, &stopped, &left);
                return Err(failure);
            }
        }
    }
    progress.finish_and_clear();
    // Syncing and sealing can take long: on a blocking thread, so Ctrl-C stops them.
    let (finished, caught) = blocking(&mut ctrl_c, &stop, move || Ok(unpacker.finish())).await;
    let (outcomes, note) = match finished? {
        // Ctrl-C that came too late to stop the work: the outcome is what it is.
        Ok(done) => done,
        Err(err) if caught => {
            note_left(
                io,
                "the download stopped while finishing",
                &format!("{err:#}"),
            );
            return Err(interrupted());
        }
        Err(err) => return Err(Failure::Package(err)),
    };
    let mut view = DownloadView::new(&info, &target, outcomes);
    view.hint = registry.hint.clone();
    let printed = emit(io.out, io.format, &view, false);
    if view.verified {
        return super::verdict(printed, 0);
    }
    // The verdict stands whatever becomes of these notes: failing to write them exits 1 too.
    for file in view.files.iter().filter(|f| !f.verified) {
        let _ = writeln!(
            io.err,
            "error: {}: {}",
            clean(&file.path),
            clean(file.error.as_deref().unwrap_or_default())
        );
    }
    if let Some(note) = note {
        let _ = writeln!(io.err, "{}", clean(&note));
    }
    super::verdict(printed, EXIT_FAILURE)
}

#[cfg(test)]
mod tests {
    use std::cell::{Cell, RefCell};
    use std::path::Path;

    use dsrelay_sdk::proto::ManifestFile;

    use super::*;
    use crate::cli::OutputFormat;

    /// A registry holding one package, noting when DownloadPackage is opened.
    struct Stand {
        /// What GetPackage answers.
        checked: PackageInfo,
        /// The manifest DownloadPackage sends (no chunks follow), or its refusal.
        sent: Result<PackageInfo, tonic::Status>,
        /// The folder downloaded into.
        out: PathBuf,
        /// Set when DownloadPackage opened: whether the folder's staging folder was there.
        staged_at_open: Cell<Option<bool>>,
        /// Fired when GetPackage is asked.
        asked: RefCell<Option<tokio::sync::oneshot::Sender<()>>>,
        /// Fired when DownloadPackage's first answer is taken.
        answered: RefCell<Option<tokio::sync::oneshot::Sender<()>>>,
    }

    impl Stand {
        fn new(out: &Path, sent: PackageInfo) -> Self {
            Self {
                checked: package_info(),
                sent: Ok(sent),
                out: out.to_path_buf(),
                staged_at_open: Cell::new(None),
                asked: RefCell::new(None),
                answered: RefCell::new(None),
            }
        }
    }

    impl Source for Stand {
        async fn package(&self, _id: &str) -> Result<PackageInfo, Failure> {
            if let Some(asked) = self.asked.borrow_mut().take() {
                let _ = asked.send(());
            }
            Ok(self.checked.clone())
        }

        fn download(&self, _id: &str) -> Events {
            let staged = self.out.join(crate::unpack::STAGING_NAME).exists();
            self.staged_at_open.set(Some(staged));
            let mut answered = self.answered.borrow_mut().take();
            let sent = self.sent.clone().map(DownloadEvent::Manifest);
            Box::pin(tokio_stream::iter([sent]).map(move |event| {
                if let Some(answered) = answered.take() {
                    let _ = answered.send(());
                }
                event
            }))
        }

        async fn refused(&self, _id: &str, status: tonic::Status) -> Failure {
            Failure::Package(anyhow!("{}", status.message()))
        }

        fn broke(&self, status: tonic::Status) -> Failure {
            Failure::Package(anyhow!("broke: {}", status.message()))
        }
    }

    const CONTENT: &[u8] = b"hello";

    fn package_info() -> PackageInfo {
        PackageInfo {
            request_id: "r-1".into(),
            complete: true,
            files: vec![ManifestFile {
                path: "p/a.json".into(),
                size: CONTENT.len() as u64,
                sha256: hex::encode(Sha256::digest(CONTENT)),
                ..Default::default()
            }],
            manifest_json: b"{}".to_vec(),
            ..Default::default()
        }
    }

    fn message(failure: &Failure) -> String {
        match failure {
            Failure::Usage(m) => m.clone(),
            Failure::Package(e) => format!("{e:#}"),
            Failure::BadAnswer(m) => format!("bad answer: {m}"),
            _ => "another failure".into(),
        }
    }

    /// `start` against `stand` into its folder, with `ctrl_c` as Ctrl-C; the failure's
    /// message and stderr.
    async fn started<F: Future<Output = std::io::Result<()>>>(
        stand: &Stand,
        ctrl_c: F,
    ) -> (Result<(), String>, String) {
        started_into(stand, &Target::Dir(stand.out.clone()), ctrl_c).await
    }

    /// [`started`] into `target`.
    async fn started_into<F: Future<Output = std::io::Result<()>>>(
        stand: &Stand,
        target: &Target,
        ctrl_c: F,
    ) -> (Result<(), String>, String) {
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let mut io = Io {
            out: &mut out,
            err: &mut err,
            format: OutputFormat::Table,
        };
        let mut ctrl_c = CtrlC::new(ctrl_c);
        let result = start(stand, "r-1", target, &Stop::default(), &mut ctrl_c, &mut io).await;
        let result = result.map(drop).map_err(|f| message(&f));
        (result, String::from_utf8(err).unwrap())
    }

    #[tokio::test]
    async fn leftovers_are_checked_before_the_download_stream_opens() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("pkg");
        let stand = Stand::new(&out, package_info());
        let (result, _) = started(&stand, std::future::pending()).await;
        assert_eq!(result, Ok(()));
        // Created only once the registry agreed to the download.
        assert_eq!(stand.staged_at_open.get(), Some(false));
        assert!(out.join(crate::unpack::STAGING_NAME).exists());

        // A leftover that does not match is refused without asking for the download.
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("pkg");
        std::fs::create_dir_all(out.join("p")).unwrap();
        std::fs::create_dir(out.join(crate::unpack::STAGING_NAME)).unwrap();
        std::fs::write(out.join(crate::unpack::STAGING_NAME).join("request"), "r-1").unwrap();
        std::fs::write(out.join("p/a.json"), b"hellx").unwrap();
        let stand = Stand::new(&out, package_info());
        let (result, _) = started(&stand, std::future::pending()).await;
        let err = result.unwrap_err();
        assert!(err.contains("does not match the manifest"), "{err}");
        assert_eq!(stand.staged_at_open.get(), None);
    }

    #[tokio::test]
    async fn a_package_that_changed_between_the_answers_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("pkg");
        let mut sent = package_info();
        sent.files[0].sha256 = hex::encode(Sha256::digest(b"other"));
        let stand = Stand::new(&out, sent);
        let (result, stderr) = started(&stand, std::future::pending()).await;
        let err = result.unwrap_err();
        assert!(
            err.contains("changed between the registry's two answers, and nothing was written"),
            "{err}"
        );
        assert!(!err.contains("checked"), "{err}");
        assert_eq!(stderr, "");
        assert!(!out.exists());

        // With files an earlier run left, it says what the run again does with them.
        std::fs::create_dir_all(out.join("p")).unwrap();
        std::fs::create_dir(out.join(crate::unpack::STAGING_NAME)).unwrap();
        std::fs::write(out.join(crate::unpack::STAGING_NAME).join("request"), "r-1").unwrap();
        std::fs::write(out.join("p/a.json"), CONTENT).unwrap();
        let (result, _) = started(&stand, std::future::pending()).await;
        let err = result.unwrap_err();
        assert!(
            err.contains("checks the 1 files an earlier run left") && err.contains("new folder"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn an_incomplete_package_sent_for_download_is_a_bad_answer() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("pkg");
        let mut incomplete = package_info();
        incomplete.complete = false;
        let mut stand = Stand::new(&out, incomplete.clone());
        stand.checked = incomplete;
        let (result, stderr) = started(&stand, std::future::pending()).await;
        assert_eq!(
            result.unwrap_err(),
            "bad answer: the registry sent the package of r-1 for download while it is not \
             complete, and nothing was written"
        );
        assert_eq!(stderr, "");
        assert!(!out.exists());

        // Completed between the two answers: another manifest, refused as changed.
        stand.sent = Ok(package_info());
        let (result, _) = started(&stand, std::future::pending()).await;
        let err = result.unwrap_err();
        assert!(
            err.contains("changed between the registry's two answers"),
            "{err}"
        );
        assert!(!out.exists());
    }

    #[tokio::test]
    async fn a_refused_download_writes_nothing_and_suggests_no_run_again() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("pkg");
        let mut stand = Stand::new(&out, package_info());
        stand.sent = Err(tonic::Status::failed_precondition("the package expired"));
        let (result, stderr) = started(&stand, std::future::pending()).await;
        assert_eq!(result.unwrap_err(), "the package expired");
        assert_eq!(stderr, "");
        assert!(!out.exists());

        let zip = tmp.path().join("pkg.zip");
        let (result, stderr) =
            started_into(&stand, &Target::Zip(zip.clone()), std::future::pending()).await;
        assert_eq!(result.unwrap_err(), "the package expired");
        assert_eq!(stderr, "");
        assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 0);
    }

    #[tokio::test]
    async fn ctrl_c_while_the_explanation_of_a_refusal_is_asked_gives_the_refusal() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("pkg");
        let mut stand = Stand::new(&out, package_info());
        stand.sent = Err(tonic::Status::failed_precondition("the package expired"));
        let (answered, ctrl_c) = tokio::sync::oneshot::channel();
        *stand.answered.borrow_mut() = Some(answered);
        let (result, _) = started(&stand, async move {
            let _ = ctrl_c.await;
            Ok(())
        })
        .await;
        assert_eq!(result.unwrap_err(), "broke: the package expired");
    }

    #[tokio::test]
    async fn ctrl_c_while_leftovers_are_checked_keeps_the_real_failure() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("pkg");
        std::fs::create_dir_all(out.join(crate::unpack::STAGING_NAME)).unwrap();
        std::fs::write(out.join(crate::unpack::STAGING_NAME).join("notes.txt"), "").unwrap();
        let stand = Stand::new(&out, package_info());
        let (asked, ctrl_c) = tokio::sync::oneshot::channel();
        *stand.asked.borrow_mut() = Some(asked);
        let (result, _) = started(&stand, async move {
            let _ = ctrl_c.await;
            Ok(())
        })
        .await;
        let err = result.unwrap_err();
        assert!(
            err.contains("not what an interrupted dsrctl download"),
            "{err}"
        );
        assert_eq!(stand.staged_at_open.get(), None);
    }

    #[tokio::test]
    async fn ctrl_c_while_the_leftovers_are_checked_stops_before_the_download() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("pkg");
        let stand = Stand::new(&out, package_info());
        // Ctrl-C once GetPackage answered: while the folder is looked at.
        let (asked, ctrl_c) = tokio::sync::oneshot::channel();
        *stand.asked.borrow_mut() = Some(asked);
        let (result, _) = started(&stand, async move {
            let _ = ctrl_c.await;
            Ok(())
        })
        .await;
        assert_eq!(result.unwrap_err(), "interrupted (Ctrl-C)");
        assert_eq!(stand.staged_at_open.get(), None);
        assert!(!out.join("p").exists());
    }

    #[tokio::test]
    async fn ctrl_c_during_blocking_work_asks_it_to_stop() {
        let stop = Stop::default();
        let mut ctrl_c = CtrlC::new(std::future::ready(Ok(())));
        let seen = stop.clone();
        let (outcome, caught) = blocking(&mut ctrl_c, &stop, move || Ok(seen.is_set())).await;
        assert!(caught && stop.is_set());
        assert!(outcome.is_ok());
    }

    fn outcome(path: &str, size: u64) -> FileOutcome {
        FileOutcome {
            path: path.into(),
            size,
            sha256: String::new(),
            error: Some("ended at 0 bytes".into()),
        }
    }

    /// A package whose request was cancelled before a processor accepted it says it never
    /// completes and names the processors never asked, where "no" alone would read as parts
    /// still coming.
    #[test]
    fn a_package_never_asked_of_a_processor_says_so() {
        let info = PackageInfo {
            request_id: "r-1".into(),
            never_asked: vec!["payroll-bureau".into()],
            manifest_json: br#"{"files": []}"#.to_vec(),
            ..Default::default()
        };
        let view = PackageView::from(&info);
        let text = view.to_table();
        assert!(
            text.contains(
                "complete     never: the request was cancelled before a processor was asked"
            ),
            "{text}"
        );
        assert!(text.contains("never asked  payroll-bureau"), "{text}");
        let json = serde_json::to_value(&view).unwrap();
        assert_eq!(json["never_asked"][0], "payroll-bureau", "{json:#}");
        assert_eq!(json["complete"], false, "{json:#}");
    }

    #[test]
    fn sizes_beyond_a_u64_saturate_instead_of_overflowing() {
        let info = PackageInfo {
            request_id: "r-1".into(),
            files: [u64::MAX, 1, 2]
                .into_iter()
                .map(|size| ManifestFile {
                    size,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        };
        assert_eq!(manifest_bytes(&info), u64::MAX);
        let outcomes = vec![outcome("a", u64::MAX), outcome("b", 1)];
        let view = DownloadView::new(&info, &Target::Dir("out".into()), outcomes);
        assert_eq!(view.bytes, u64::MAX);
        assert!(!view.verified);
    }

    /// A verified download is summed up (where, files, bytes, verified); the files are
    /// listed only when some did not verify, and then only those.
    #[test]
    fn a_download_prints_a_summary_and_only_the_files_that_failed() {
        let info = PackageInfo {
            request_id: "r-1".into(),
            manifest_json: b"{}".to_vec(),
            ..Default::default()
        };
        let file = |path: &str, error: Option<&str>| FileOutcome {
            path: path.into(),
            size: 10,
            sha256: format!("{path}-digest"),
            error: error.map(String::from),
        };
        let files = || vec![file("a/x.json", None), file("b/y.csv", None)];
        let view = DownloadView::new(&info, &Target::Dir("maija".into()), files());
        let text = view.to_table();
        let digest = hex::encode(Sha256::digest(b"{}"));
        assert_eq!(
            text,
            format!(
                "request         r-1\n\
                 folder          maija\n\
                 package sha256  {digest}\n\
                 files           2 (20 bytes), 2 of 2 verified\n"
            )
        );
        let zip = DownloadView::new(&info, &Target::Zip("maija.zip".into()), files());
        assert!(zip.to_table().contains("\nzip             maija.zip\n"));

        let mut some = files();
        some.push(file("c/z.txt", Some("ended at 3 of 10 bytes")));
        let text = DownloadView::new(&info, &Target::Dir("maija".into()), some).to_table();
        assert!(text.contains("3 (30 bytes), 2 of 3 verified\n"), "{text}");
        assert!(
            text.ends_with(
                "\nPATH     SIZE  SHA256          CHECK\n\
                 c/z.txt  10    c/z.txt-digest  FAILED: ended at 3 of 10 bytes\n"
            ),
            "{text}"
        );
        assert!(!text.contains("a/x.json"), "{text}");
        // JSON keeps every file.
        let json = serde_json::to_value(DownloadView::new(
            &info,
            &Target::Dir("maija".into()),
            files(),
        ))
        .unwrap();
        assert_eq!(json["files"].as_array().unwrap().len(), 2, "{json:#}");
    }

    /// A package lacking a holder's data says so, in `package` and after a download (read
    /// from manifest.json, so also for a folder that holds the download finished already).
    /// Before, a FAILED return of data downloaded as an empty package, verified, with no word
    /// of the holder whose data it lacks.
    #[test]
    fn a_package_lacking_a_holders_data_says_whose() {
        let manifest = br#"{"request_id": "r-1", "files": [], "not_returned": [
            {"processor": "payroll", "subprocessor": "crm", "state": "FAILED"}]}"#;
        let info = PackageInfo {
            request_id: "r-1".into(),
            complete: true,
            manifest_json: manifest.to_vec(),
            not_returned: vec!["payroll/crm".into()],
            ..Default::default()
        };
        // The command it names runs as printed: with the request's id, and the registry's
        // --endpoint where the user gave one.
        let line = "not returned    payroll/crm (FAILED): its data is not in the package, and it \
                    will not send it unless the processor's operator retries the task (`dsrctl \
                    get r-1 --endpoint https://registry.example:50051` says why)\n";
        let hint = Hint::new(&crate::cli::ConnectionArgs {
            endpoint: Some("https://registry.example:50051".into()),
            ..Default::default()
        });
        let mut view = DownloadView::new(&info, &Target::Dir("maija".into()), vec![]);
        view.hint = hint.clone();
        let text = view.to_table();
        assert!(text.contains(line), "{text}");
        let mut view = PackageView::from(&info);
        view.hint = hint;
        let text = view.to_table();
        assert!(text.contains(line), "{text}");
        let text = PackageView::from(&info).to_table();
        assert!(text.contains("(`dsrctl get r-1` says why)"), "{text}");
        let json = serde_json::to_value(PackageView::from(&info)).unwrap();
        assert_eq!(
            json["not_returned"],
            serde_json::json!(["payroll/crm (FAILED)"])
        );
        // A manifest naming none, or two.
        assert!(not_returned(b"{}").is_empty());
        let two = br#"{"not_returned": [{"processor": "p", "subprocessor": "a", "state": "FAILED"},
            {"processor": "p", "subprocessor": "b", "state": "REFUSED"}]}"#;
        let two = not_returned(two);
        assert_eq!(two, ["p/a (FAILED)", "p/b (REFUSED)"]);
        assert!(lacking(&two, "").contains("their data is not in the package, and they"));
    }

    /// A complete package lacking a holder's data does not say "complete yes", and a download
    /// of it ends saying the files are not all of the data. Before, `package` printed
    /// "complete yes" beside "not returned", and `download` ended on the files verified.
    #[test]
    fn a_complete_package_lacking_a_holder_is_not_called_complete_alone() {
        let manifest = br#"{"request_id": "r-1", "files": [], "not_returned": [
            {"processor": "payroll", "subprocessor": "accounting", "state": "FAILED"}]}"#;
        let info = PackageInfo {
            request_id: "r-1".into(),
            complete: true,
            manifest_json: manifest.to_vec(),
            not_returned: vec!["payroll/accounting".into()],
            ..Default::default()
        };
        let text = PackageView::from(&info).to_table();
        let row = "complete        no more parts coming; 1 subprocessor not returned \
                   (payroll/accounting, FAILED)\n";
        assert!(text.contains(row), "{text}");
        assert!(!text.contains("yes"), "{text}");
        // The field keeps the proto's meaning: no more parts are coming.
        let json = serde_json::to_value(PackageView::from(&info)).unwrap();
        assert_eq!(json["complete"], true);
        let text = DownloadView::new(&info, &Target::Dir("maija".into()), vec![]).to_table();
        let last = "\nthis package lacks the data of 1 subprocessor (payroll/accounting, FAILED): \
                    it was not returned, so the download is not all of the data\n";
        assert!(text.ends_with(last), "{text}");
        // One returned whole is complete, and a download of it says nothing of a lack.
        let whole = PackageInfo {
            manifest_json: br#"{"request_id": "r-1", "files": []}"#.to_vec(),
            not_returned: vec![],
            ..info
        };
        assert!(PackageView::from(&whole)
            .to_table()
            .contains("complete        yes\n"));
        let text = DownloadView::new(&whole, &Target::Dir("maija".into()), vec![]).to_table();
        assert!(!text.contains("lacks"), "{text}");
        let two = ["p/a (FAILED)".to_string(), "p/b (REFUSED)".to_string()];
        assert_eq!(
            complete_cell(true, &two),
            "no more parts coming; 2 subprocessors not returned (p/a, FAILED; p/b, REFUSED)"
        );
        assert_eq!(complete_cell(false, &two), "no");
    }

    /// A part cancelled is not said to come on a retry: a cancelled task is never retried.
    #[test]
    fn a_cancelled_holder_is_not_said_to_send_on_a_retry() {
        let one = ["p/a (CANCELLED)".to_string()];
        let line = lacking(&one, "dsrctl get r-1");
        assert!(
            line.contains("it will not send it: the task was cancelled") && !line.contains("retr"),
            "{line}"
        );
        let two = ["p/a (CANCELLED)".to_string(), "p/b (FAILED)".to_string()];
        let line = lacking(&two, "dsrctl get r-1");
        assert!(
            line.contains("the cancelled tasks' will not be sent, the others' only if"),
            "{line}"
        );
    }

    /// `dir` holding the finished download of `r-1` whose `manifest.json` is `manifest`,
    /// with [`package_info`]'s file.
    fn finished(dir: &Path, manifest: &[u8]) -> crate::unpack::FinishedFolder {
        std::fs::create_dir_all(dir.join("p")).unwrap();
        std::fs::write(dir.join("p/a.json"), CONTENT).unwrap();
        std::fs::write(dir.join(MANIFEST_NAME), manifest).unwrap();
        finished_download(dir, "r-1").expect("a finished download")
    }

    /// A manifest of `r-1` listing [`package_info`]'s file, and `holder` as not returned.
    fn manifest_of(not_returned: &str) -> Vec<u8> {
        format!(
            r#"{{"request_id": "r-1", "files": [{{"path": "p/a.json", "size": {}, "sha256": "{}"}}],
            "not_returned": [{not_returned}]}}"#,
            CONTENT.len(),
            hex::encode(Sha256::digest(CONTENT))
        )
        .into_bytes()
    }

    /// [`finished_folder`] into `dir` against `stand`: its exit code or failure's message,
    /// and stdout.
    async fn run_finished(
        stand: &Stand,
        dir: &Path,
        manifest: &[u8],
    ) -> (Result<u8, String>, String) {
        let done = finished(dir, manifest);
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let mut io = Io {
            out: &mut out,
            err: &mut err,
            format: OutputFormat::Table,
        };
        let result = finished_folder(stand, "r-1", dir, done, &Hint::default(), &mut io)
            .await
            .map_err(|f| message(&f));
        (result, String::from_utf8(out).unwrap())
    }

    /// A folder holding a finished download of an older version of the package (a part
    /// came after it was written, its holder listed there as not returned) is refused,
    /// naming a new folder: it was reported finished, exit 0, its stale manifest kept.
    #[tokio::test]
    async fn a_folder_holding_an_older_version_of_the_package_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("pkg");
        let old = manifest_of(r#"{"processor": "p", "subprocessor": "b", "state": "FAILED"}"#);
        let mut stand = Stand::new(&dir, package_info());
        stand.checked.manifest_json = manifest_of("");
        let (result, out) = run_finished(&stand, &dir, &old).await;
        let message = result.expect_err("an older version taken as finished");
        for words in [
            "holds an older version of the package of r-1",
            "download into a new folder (dsrctl download r-1 --out NEW_DIR)",
        ] {
            assert!(message.contains(words), "{words:?} in {message}");
        }
        assert!(out.is_empty(), "{out}");
        assert_eq!(std::fs::read(dir.join(MANIFEST_NAME)).unwrap(), old);
        assert_eq!(stand.staged_at_open.get(), None, "nothing downloaded");

        // Not complete yet: downloaded once it is.
        stand.checked.complete = false;
        let (result, _) = run_finished(&stand, &dir, &old).await;
        let message = result.expect_err("an older version taken as finished");
        assert!(
            message.contains("into a new folder once it is complete (`dsrctl package r-1`"),
            "{message}"
        );

        // The same package: finished already, exit 0.
        stand.checked.complete = true;
        stand.checked.manifest_json = old.clone();
        let (result, out) = run_finished(&stand, &dir, &old).await;
        assert_eq!(result, Ok(0));
        assert!(out.starts_with("download finished already"), "{out}");
    }

    #[test]
    fn sizes_add_up() {
        assert_eq!(total_bytes([1, 2, 3].into_iter()), 6);
        assert_eq!(total_bytes(std::iter::empty()), 0);
    }
}
