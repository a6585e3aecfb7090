//! `dsrctl package` and `dsrctl download`: return-of-data packages.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::pin::pin;

use anyhow::anyhow;
use dsrelay_sdk::proto::PackageInfo;
use dsrelay_sdk::DownloadEvent;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Serialize;
use sha2::{Digest, Sha256};
use tokio_stream::StreamExt;

use crate::cli::{DownloadArgs, PackageArgs};
use crate::commands::{Io, Registry};
use crate::output::{emit, Render, Time};
use crate::table::{clean, Table};
use crate::unpack::{DirSink, FileOutcome, Sink, Unpacker, ZipSink};
use crate::{Failure, EXIT_FAILURE};

/// Packages at least this large get a progress bar (when stderr is a terminal).
const PROGRESS_FROM_BYTES: u64 = 16 * 1024 * 1024;

/// Where `download` writes.
pub(crate) enum Target {
    /// A folder, new or empty, or holding what an interrupted run of the same download left.
    Dir(PathBuf),
    /// A zip file that does not exist yet.
    Zip(PathBuf),
}

impl Target {
    /// Takes the destination from the arguments and refuses one that would mix with or
    /// replace existing files, before anything is asked of the registry.
    pub(crate) fn check(args: &DownloadArgs) -> Result<Self, Failure> {
        match (&args.out, &args.zip) {
            (Some(dir), None) => {
                DirSink::check_target(dir, &args.id).map_err(Failure::Usage)?;
                Ok(Self::Dir(dir.clone()))
            }
            (None, Some(zip)) => {
                ZipSink::check_target(zip).map_err(Failure::Usage)?;
                Ok(Self::Zip(zip.clone()))
            }
            // clap's group makes them exclusive and one required.
            _ => Err(Failure::Usage(
                "give one of --out DIR and --zip FILE".into(),
            )),
        }
    }

    /// Opens the destination for `info`'s package (its manifest paths already checked).
    fn open(&self, info: &PackageInfo) -> Result<Box<dyn Sink>, Failure> {
        Ok(match self {
            Self::Dir(dir) => {
                let leftovers = DirSink::check_leftovers(dir, info).map_err(Failure::Usage)?;
                Box::new(
                    DirSink::create(dir, &info.request_id, leftovers).map_err(Failure::Package)?,
                )
            }
            Self::Zip(zip) => Box::new(ZipSink::create(zip).map_err(Failure::Package)?),
        })
    }
}

/// A package's digest: the SHA-256 of its `manifest.json`.
fn package_digest(info: &PackageInfo) -> Option<String> {
    (!info.manifest_json.is_empty()).then(|| hex::encode(Sha256::digest(&info.manifest_json)))
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
    expires_at: Option<Time>,
    /// SHA-256 of manifest.json, once there is one.
    package_sha256: Option<String>,
    files: Vec<ManifestFileView>,
}

impl From<&PackageInfo> for PackageView {
    fn from(info: &PackageInfo) -> Self {
        Self {
            request_id: info.request_id.clone(),
            complete: info.complete,
            missing: info.missing.clone(),
            expires_at: Time::from_proto(info.expires_at.as_ref()),
            package_sha256: package_digest(info),
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
        }
    }
}

impl Render for PackageView {
    fn to_table(&self) -> String {
        let mut head = Table::headless();
        head.row(["request", self.request_id.as_str()]);
        head.row(["complete", if self.complete { "yes" } else { "no" }]);
        if !self.missing.is_empty() {
            head.row(["missing".to_string(), clean(&self.missing.join(", "))]);
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
    emit(io.out, io.format, &PackageView::from(&info), false)?;
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
    files: Vec<DownloadedFileView>,
}

impl DownloadView {
    fn new(info: &PackageInfo, target: &Target, outcomes: Vec<FileOutcome>) -> Self {
        let (out, zip) = match target {
            Target::Dir(dir) => (Some(dir.display().to_string()), None),
            Target::Zip(zip) => (None, Some(zip.display().to_string())),
        };
        let digests_verified = outcomes.iter().filter(|o| o.error.is_none()).count();
        Self {
            request_id: info.request_id.clone(),
            out,
            zip,
            package_sha256: package_digest(info),
            file_count: outcomes.len(),
            bytes: total_bytes(outcomes.iter().map(|o| o.size)),
            digests_verified,
            verified: digests_verified == outcomes.len(),
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
        }
    }
}

impl Render for DownloadView {
    fn to_table(&self) -> String {
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
        let mut out = head.render();
        if !self.files.is_empty() {
            let mut t = Table::new(["PATH", "SIZE", "SHA256", "CHECK"]);
            for f in &self.files {
                t.row([
                    clean(&f.path),
                    f.size.to_string(),
                    clean(&f.sha256),
                    match &f.error {
                        None => "ok".to_string(),
                        Some(e) => format!("FAILED: {}", clean(e)),
                    },
                ]);
            }
            out.push('\n');
            out.push_str(&t.render());
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
        return registry.failed(status);
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

/// `dsrctl download ID (--out DIR | --zip FILE)`: 0 when every file matched the manifest,
/// 1 naming each file that did not. Cut short (an error, the connection lost, Ctrl-C), it
/// removes what it had not verified and says on stderr which file it was receiving and what
/// is left; the same command run again then finishes the download.
pub(crate) async fn run(
    registry: &Registry,
    args: &DownloadArgs,
    target: Target,
    io: &mut Io<'_>,
) -> Result<u8, Failure> {
    let mut events = pin!(registry.client.download_package(args.id.as_str()));
    // Polled from the start, so Ctrl-C is caught (not fatal) before anything is written.
    let ctrl_c = tokio::signal::ctrl_c();
    let mut ctrl_c = pin!(ctrl_c);
    // Cleared when no handler could be installed: Ctrl-C then ends the process as usual.
    let mut catching = true;
    let first = loop {
        tokio::select! {
            event = events.next() => break event,
            caught = &mut ctrl_c, if catching => match caught {
                Ok(()) => return Err(interrupted()),
                Err(_) => catching = false,
            },
        }
    };
    let info = match first {
        Some(Ok(DownloadEvent::Manifest(info))) => info,
        Some(Err(status)) => return Err(explain_refusal(registry, &args.id, status).await),
        Some(Ok(DownloadEvent::Chunk(_))) | None => {
            return Err(Failure::Package(anyhow!(
                "the registry sent no manifest for {}",
                args.id
            )))
        }
    };
    if info.request_id != args.id {
        return Err(Failure::Package(anyhow!(
            "asked for the package of {}, the registry sent that of {}",
            args.id,
            info.request_id
        )));
    }
    Unpacker::check_manifest(&info).map_err(Failure::Package)?;
    let mut unpacker = Unpacker::new(&info, target.open(&info)?).map_err(Failure::Package)?;
    let progress = progress_bar(manifest_bytes(&info));
    loop {
        // Err(None): Ctrl-C.
        let event = tokio::select! {
            event = events.next() => event.map(|e| e.map_err(Some)),
            caught = &mut ctrl_c, if catching => match caught {
                Ok(()) => Some(Err(None)),
                Err(_) => {
                    catching = false;
                    continue;
                }
            },
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
            Some(Err(Some(status))) => Err(registry.failed(status)),
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
                // The failure follows on the next line; this note must not replace it.
                let _ = writeln!(io.err, "{}", clean(&format!("{stopped}: {left}")));
                return Err(failure);
            }
        }
    }
    progress.finish_and_clear();
    let (outcomes, note) = unpacker.finish().map_err(Failure::Package)?;
    let view = DownloadView::new(&info, &target, outcomes);
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
    use dsrelay_sdk::proto::ManifestFile;

    use super::*;

    fn outcome(path: &str, size: u64) -> FileOutcome {
        FileOutcome {
            path: path.into(),
            size,
            sha256: String::new(),
            error: Some("ended at 0 bytes".into()),
        }
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

    #[test]
    fn sizes_add_up() {
        assert_eq!(total_bytes([1, 2, 3].into_iter()), 6);
        assert_eq!(total_bytes(std::iter::empty()), 0);
    }
}
