//! Runs the `dsrctl` binary against a stand-in registry served in this process on
//! 127.0.0.1, over mutual TLS with a development PKI, whose answers each test sets: what a
//! real registry does not do on demand (a package with a corrupted file, pages that do not
//! advance, no signed checkpoints), to check the verdict dsrctl gives on it.
//!
//! The real registry and processor are in the workspace's end-to-end suite (`tests/`).

use std::pin::Pin;
use std::process::Stdio;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use dsrelay_proto::v1::contract_service_server::{ContractService, ContractServiceServer};
use dsrelay_proto::v1::package_chunk::Item;
use dsrelay_proto::v1::package_service_server::{PackageService, PackageServiceServer};
use dsrelay_proto::v1::request_service_server::{RequestService, RequestServiceServer};
use dsrelay_proto::v1::{
    AuditCheckpoint, AuditCheckpoints, AuditEntries, AuditEntry, CancelRequest, Chain,
    ChooseContractEndRequest, ConfirmReturnRequest, Contract, ContractEnd, ContractEndChoice,
    ContractList, DeadLetteredDeliveries, DownloadPackageRequest, EndContractRequest, EventList,
    ExtendDeadlineRequest, GetChainRequest, GetContractRequest, GetPackageRequest, GetRequest,
    ListAuditCheckpointsRequest, ListAuditEntriesRequest, ListContractsRequest,
    ListDeadLetteredDeliveriesRequest, ListEventsRequest, ListRequestsRequest,
    ListRequestsResponse, ManifestFile, PackageChunk, PackageFileChunk, PackageInfo, Request,
    RequestEvent, RequestState, RequeueDeliveryRequest, SubmitRequest, SubmitResponse,
    WatchRequest,
};
use dsrelay_runtime::audit::checkpoint::Checkpoint;
use dsrelay_runtime::audit::{Entry, GENESIS_HASH};
use dsrelay_runtime::pki::DevPki;
use dsrelay_runtime::signing::SigningKey;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncBufReadExt, BufReader, Lines};
use tokio::net::{TcpListener, TcpStream};
use tokio::process::{Child, ChildStdout};
use tokio::task::AbortHandle;
use tonic::{Request as Call, Response, Status};

/// Entries per page of the stand-in's trail and checkpoints, so that a short trail spans
/// several pages.
const PAGE: usize = 2;

/// What the stand-in answers, and what it was asked.
#[derive(Default)]
struct Answers {
    /// The audit trail.
    entries: Vec<AuditEntry>,
    /// Answer every page after the first with `next_after_seq` equal to the `after_seq`
    /// asked for: pages that do not advance.
    entries_stuck: bool,
    /// The signed checkpoints.
    checkpoints: Vec<AuditCheckpoint>,
    /// As `entries_stuck`, for the checkpoints.
    checkpoints_stuck: bool,
    /// The package every request has: its manifest, then these chunks.
    package: Option<(PackageInfo, Vec<PackageFileChunk>)>,
    /// A download sends this many chunks and then nothing more, its stream staying open, as
    /// a registry's does when it is killed in the middle.
    download_stalls_after: Option<usize>,
    /// The states GetContract answers first, one per call.
    contract_states_first: Vec<RequestState>,
    /// The state GetContract answers after those.
    contract_state: RequestState,
    /// The terms GetContract answers.
    contract_terms: Option<ContractEnd>,
    /// The digest of every ConfirmReturn received.
    confirmed: Vec<String>,
    /// What Submit answers: an error of this code (UNIMPLEMENTED when unset).
    submit_error: Option<tonic::Code>,
    /// List answers its empty page as the last one, instead of naming the next page.
    list_ends: bool,
    /// The events of every request Watch is asked for. A stream sends those after the one
    /// asked for and stays open, as the registry's does, unless one of them ended the
    /// request (COMPLETED, FAILED or CANCELLED).
    events: Vec<RequestEvent>,
    /// The `after_event_id` of every Watch received.
    watched_after: Vec<u64>,
    /// Watch answers PERMISSION_DENIED.
    watch_refused: bool,
    /// GetContract answers NOT_FOUND.
    contract_gone: bool,
    /// What GetChain answers (UNIMPLEMENTED when unset).
    chain: Option<Chain>,
}

#[derive(Clone, Default)]
struct StandIn(Arc<Mutex<Answers>>);

impl StandIn {
    fn answers(&self) -> MutexGuard<'_, Answers> {
        self.0.lock().expect("answers")
    }
}

/// Up to [`PAGE`] of `items` with a seq above `after`, and the seq to ask after next: the
/// last one given while more follow, else 0 (or, `stuck`, past the first page, `after`).
fn page<T: Clone>(items: &[T], seq: impl Fn(&T) -> u64, after: u64, stuck: bool) -> (Vec<T>, u64) {
    if stuck && after > 0 {
        return (vec![], after);
    }
    let rest: Vec<T> = items.iter().filter(|i| seq(i) > after).cloned().collect();
    let page: Vec<T> = rest.iter().take(PAGE).cloned().collect();
    let next = if rest.len() > PAGE {
        page.last().map_or(0, &seq)
    } else {
        0
    };
    (page, next)
}

fn unanswered<T>() -> Result<Response<T>, Status> {
    Err(Status::unimplemented("not in this stand-in"))
}

type Events = Pin<Box<dyn tokio_stream::Stream<Item = Result<RequestEvent, Status>> + Send>>;

#[tonic::async_trait]
impl RequestService for StandIn {
    async fn submit(&self, _: Call<SubmitRequest>) -> Result<Response<SubmitResponse>, Status> {
        match self.answers().submit_error {
            Some(code) => Err(Status::new(code, "the stand-in's answer")),
            None => unanswered(),
        }
    }
    async fn get(&self, _: Call<GetRequest>) -> Result<Response<Request>, Status> {
        unanswered()
    }
    /// No request matches; unless `list_ends`, every page names the same next page: a
    /// registry that would page forever.
    async fn list(
        &self,
        _: Call<ListRequestsRequest>,
    ) -> Result<Response<ListRequestsResponse>, Status> {
        let next = if self.answers().list_ends { "" } else { "p-1" };
        Ok(Response::new(ListRequestsResponse {
            requests: vec![],
            next_page_token: next.into(),
        }))
    }
    type WatchStream = Events;
    async fn watch(&self, call: Call<WatchRequest>) -> Result<Response<Self::WatchStream>, Status> {
        use tokio_stream::StreamExt as _;
        let after = call.into_inner().after_event_id;
        let mut answers = self.answers();
        answers.watched_after.push(after);
        if answers.watch_refused {
            return Err(Status::permission_denied("the stand-in's answer"));
        }
        let events: Vec<_> = (answers.events.iter())
            .filter(|e| e.event_id > after)
            .cloned()
            .collect();
        let ended = events.iter().any(|e| {
            matches!(
                RequestState::try_from(e.request_state),
                Ok(RequestState::Completed | RequestState::Failed | RequestState::Cancelled)
            )
        });
        let open = tokio_stream::pending().take(usize::from(!ended));
        Ok(Response::new(Box::pin(
            tokio_stream::iter(events.into_iter().map(Ok)).chain(open),
        )))
    }
    async fn cancel(&self, _: Call<CancelRequest>) -> Result<Response<Request>, Status> {
        unanswered()
    }
    async fn extend_deadline(
        &self,
        _: Call<ExtendDeadlineRequest>,
    ) -> Result<Response<Request>, Status> {
        unanswered()
    }
    async fn get_chain(&self, _: Call<GetChainRequest>) -> Result<Response<Chain>, Status> {
        match self.answers().chain.clone() {
            Some(chain) => Ok(Response::new(chain)),
            None => unanswered(),
        }
    }
    async fn list_events(&self, _: Call<ListEventsRequest>) -> Result<Response<EventList>, Status> {
        unanswered()
    }
    async fn list_audit_entries(
        &self,
        call: Call<ListAuditEntriesRequest>,
    ) -> Result<Response<AuditEntries>, Status> {
        let answers = self.answers();
        let after = call.into_inner().after_seq;
        let (entries, next_after_seq) =
            page(&answers.entries, |e| e.seq, after, answers.entries_stuck);
        Ok(Response::new(AuditEntries {
            entries,
            next_after_seq,
        }))
    }
    async fn list_audit_checkpoints(
        &self,
        call: Call<ListAuditCheckpointsRequest>,
    ) -> Result<Response<AuditCheckpoints>, Status> {
        let answers = self.answers();
        let after = call.into_inner().after_seq;
        let seq =
            |c: &AuditCheckpoint| serde_json::from_str::<Checkpoint>(&c.body).map_or(0, |c| c.seq);
        let (checkpoints, next_after_seq) =
            page(&answers.checkpoints, seq, after, answers.checkpoints_stuck);
        Ok(Response::new(AuditCheckpoints {
            checkpoints,
            next_after_seq,
            ..Default::default()
        }))
    }
    async fn list_dead_lettered_deliveries(
        &self,
        _: Call<ListDeadLetteredDeliveriesRequest>,
    ) -> Result<Response<DeadLetteredDeliveries>, Status> {
        unanswered()
    }
    async fn requeue_delivery(
        &self,
        _: Call<RequeueDeliveryRequest>,
    ) -> Result<Response<Request>, Status> {
        unanswered()
    }
}

#[tonic::async_trait]
impl PackageService for StandIn {
    async fn get_package(
        &self,
        _: Call<GetPackageRequest>,
    ) -> Result<Response<PackageInfo>, Status> {
        match &self.answers().package {
            Some((info, _)) => Ok(Response::new(info.clone())),
            None => Err(Status::not_found("no package")),
        }
    }
    type DownloadPackageStream =
        Pin<Box<dyn tokio_stream::Stream<Item = Result<PackageChunk, Status>> + Send>>;
    async fn download_package(
        &self,
        _: Call<DownloadPackageRequest>,
    ) -> Result<Response<Self::DownloadPackageStream>, Status> {
        let answers = self.answers();
        let Some((info, chunks)) = answers.package.clone() else {
            return Err(Status::not_found("no package"));
        };
        use tokio_stream::StreamExt as _;
        let sent = answers.download_stalls_after.unwrap_or(chunks.len());
        let items = std::iter::once(Item::Info(info))
            .chain(chunks.into_iter().take(sent).map(Item::File))
            .map(|item| Ok(PackageChunk { item: Some(item) }));
        let items = tokio_stream::iter(items.collect::<Vec<_>>());
        Ok(Response::new(match answers.download_stalls_after {
            Some(_) => Box::pin(items.chain(tokio_stream::pending())),
            None => Box::pin(items),
        }))
    }
}

#[tonic::async_trait]
impl ContractService for StandIn {
    async fn end_contract(
        &self,
        _: Call<EndContractRequest>,
    ) -> Result<Response<Contract>, Status> {
        unanswered()
    }
    async fn get_contract(
        &self,
        call: Call<GetContractRequest>,
    ) -> Result<Response<Contract>, Status> {
        let state = {
            let mut answers = self.answers();
            if answers.contract_gone {
                return Err(Status::not_found("the stand-in's answer"));
            }
            if answers.contract_states_first.is_empty() {
                answers.contract_state
            } else {
                answers.contract_states_first.remove(0)
            }
        };
        Ok(Response::new(Contract {
            contract_id: call.into_inner().contract_id,
            state: state as i32,
            contract_end: self.answers().contract_terms.clone(),
            ..Default::default()
        }))
    }
    async fn list_contracts(
        &self,
        _: Call<ListContractsRequest>,
    ) -> Result<Response<ContractList>, Status> {
        unanswered()
    }
    async fn choose_contract_end(
        &self,
        _: Call<ChooseContractEndRequest>,
    ) -> Result<Response<Contract>, Status> {
        unanswered()
    }
    async fn confirm_return(
        &self,
        call: Call<ConfirmReturnRequest>,
    ) -> Result<Response<Contract>, Status> {
        let call = call.into_inner();
        // As the registry refuses a digest for a return to a transfer recipient.
        let terms = self.answers().contract_terms.clone().unwrap_or_default();
        if !terms.transfer_recipient.is_empty() && !call.manifest_sha256.is_empty() {
            return Err(Status::invalid_argument(format!(
                "manifest_sha256: must be empty: contract end {} returns the data to {}, \
                 whose receipts are the proof; there is no package",
                call.contract_id, terms.transfer_recipient
            )));
        }
        self.answers().confirmed.push(call.manifest_sha256);
        Ok(Response::new(Contract {
            contract_id: call.contract_id,
            state: RequestState::InProgress as i32,
            contract_end: Some(ContractEnd {
                return_confirmed: true,
                ..Default::default()
            }),
            ..Default::default()
        }))
    }
}

/// A TCP relay on 127.0.0.1 to the stand-in's port, which dsrctl is pointed at: killed, it
/// does what the death of a registry process does to its clients (its connections closed
/// mid-stream, its port refusing connections) until it starts again on the same port.
struct Relay {
    port: u16,
    target: u16,
    /// The accepting task and one task per connection.
    tasks: Arc<Mutex<Vec<AbortHandle>>>,
}

impl Relay {
    async fn start(target: u16) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let relay = Self {
            port: listener.local_addr().expect("address").port(),
            target,
            tasks: Arc::default(),
        };
        relay.serve(listener);
        relay
    }

    fn serve(&self, listener: TcpListener) {
        let (tasks, target) = (Arc::clone(&self.tasks), self.target);
        let accepting = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let connection = tokio::spawn(async move {
                    if let Ok(mut outbound) = TcpStream::connect(("127.0.0.1", target)).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
                tasks.lock().expect("tasks").push(connection.abort_handle());
            }
        });
        self.tasks
            .lock()
            .expect("tasks")
            .push(accepting.abort_handle());
    }

    /// Closes every connection and the port, as the kernel does for a process killed.
    fn kill(&self) {
        for task in self.tasks.lock().expect("tasks").drain(..) {
            task.abort();
        }
    }

    /// Listens on the same port again, once the one killed has let it go.
    async fn restart(&self) {
        for _ in 0..50 {
            if let Ok(listener) = TcpListener::bind(("127.0.0.1", self.port)).await {
                return self.serve(listener);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("port {} stayed taken", self.port);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The stand-in, serving until dropped, and a folder holding the development PKI dsrctl
/// finds in its working directory (as the operator).
struct Registry {
    dir: tempfile::TempDir,
    endpoint: String,
    stand_in: StandIn,
    /// What dsrctl connects to.
    relay: Relay,
    _stop: tokio::sync::oneshot::Sender<()>,
}

/// How a run of dsrctl ended.
#[derive(Debug)]
struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Registry {
    async fn start(answers: Answers) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let pki = DevPki::ensure(&dir.path().join(".dsrelay/pki")).expect("dev pki");
        let tls = pki.files("registry").server_config().expect("registry tls");
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("address").port();
        let answers = StandIn(Arc::new(Mutex::new(answers)));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = dsrelay_runtime::server::builder(tls)
            .expect("server")
            .add_service(RequestServiceServer::new(answers.clone()))
            .add_service(PackageServiceServer::new(answers.clone()))
            .add_service(ContractServiceServer::new(answers.clone()))
            .serve_with_incoming_shutdown(
                tonic::transport::server::TcpIncoming::from(listener),
                async {
                    let _ = stopped.await;
                },
            );
        tokio::spawn(server);
        let relay = Relay::start(port).await;
        Self {
            dir,
            endpoint: format!("https://localhost:{}", relay.port),
            stand_in: answers,
            relay,
            _stop: stop,
        }
    }

    fn answers(&self) -> MutexGuard<'_, Answers> {
        self.stand_in.answers()
    }

    fn path(&self, name: &str) -> String {
        self.dir.path().join(name).display().to_string()
    }

    fn command(&self, args: &[&str]) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_dsrctl"));
        cmd.current_dir(self.dir.path())
            .args(args)
            .args(["--endpoint", &self.endpoint])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (name, _) in std::env::vars() {
            if name.starts_with("DSRCTL_") {
                cmd.env_remove(name);
            }
        }
        // Installed: PATH finds this binary by its name, so the commands it suggests start
        // with `dsrctl` (without, they start with its path: see
        // `a_hint_starts_dsrctl_by_its_path_where_path_does_not_find_it`).
        let exe = std::path::Path::new(env!("CARGO_BIN_EXE_dsrctl"));
        let folder = exe.parent().expect("the binary's folder").to_path_buf();
        let path = std::env::var_os("PATH").unwrap_or_default();
        let path =
            std::env::join_paths(std::iter::once(folder).chain(std::env::split_paths(&path)))
                .expect("PATH");
        cmd.env("PATH", path);
        cmd
    }

    /// Runs dsrctl with `args` against the stand-in.
    async fn dsrctl(&self, args: &[&str]) -> Run {
        let out = self.command(args).output().await.expect("running dsrctl");
        Run {
            code: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// Runs dsrctl with `args` as `dsrctl ARGS | true` does: whatever reads its output has
    /// gone by the time it prints.
    async fn dsrctl_unread(&self, args: &[&str]) -> Run {
        let mut child = self.command(args).spawn().expect("running dsrctl");
        drop(child.stdout.take());
        let out = child.wait_with_output().await.expect("dsrctl ends");
        Run {
            code: out.status.code(),
            stdout: String::new(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }
}

/// A trail of `n` entries, chained as the registry chains them.
fn trail(n: u64) -> Vec<AuditEntry> {
    let mut prev = GENESIS_HASH.to_string();
    (1..=n)
        .map(|seq| {
            let mut e = Entry {
                seq,
                occurred_at: 1_800_000_000_000 + seq as i64 * 1000,
                request_id: format!("r-{seq}"),
                event_type: 1,
                actor: "partner-crm".into(),
                detail: format!("event {seq}"),
                prev_hash: prev.clone(),
                hash: String::new(),
            };
            e.hash = e.compute_hash();
            prev = e.hash.clone();
            AuditEntry {
                seq,
                occurred_at: Some(dsrelay_proto::timestamp_from_millis(e.occurred_at)),
                request_id: e.request_id,
                event_type: e.event_type,
                actor: e.actor,
                detail: e.detail,
                prev_hash: e.prev_hash,
                hash: e.hash,
            }
        })
        .collect()
}

/// Checkpoints over entries `seqs` of `entries`, signed with `key`.
fn checkpoints(entries: &[AuditEntry], seqs: &[u64], key: &SigningKey) -> Vec<AuditCheckpoint> {
    seqs.iter()
        .map(|&seq| {
            let entry = &entries[seq as usize - 1];
            let (_, signed) =
                Checkpoint::sign("registry", seq, &entry.hash, 1_800_000_100_000, key)
                    .expect("signing");
            AuditCheckpoint {
                body: String::from_utf8(signed.body).expect("utf-8"),
                signature: signed.signature,
                key_id: signed.key_id,
            }
        })
        .collect()
}

fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// The files of the stand-in's package: path and content.
const FILES: &[(&str, &[u8])] = &[
    (
        "payroll-bureau/accounting/customers.csv",
        b"id,name\n1,Maija\n",
    ),
    (
        "payroll-bureau/accounting/invoices.json",
        b"[{\"id\":7,\"total\":\"12.50\"}]",
    ),
    (
        "payroll-bureau/newsletter/export.json",
        b"{\"subscribed\":true}",
    ),
];

/// A package of [`FILES`] whose manifest says what they hold, and the chunks that send them:
/// `corrupt` names a file whose bytes are sent with one changed, as a package store
/// with a damaged file sends them.
fn package(id: &str, corrupt: Option<&str>) -> (PackageInfo, Vec<PackageFileChunk>) {
    let files: Vec<ManifestFile> = FILES
        .iter()
        .map(|(path, data)| ManifestFile {
            path: path.to_string(),
            size: data.len() as u64,
            sha256: sha256_hex(data),
            ..Default::default()
        })
        .collect();
    let listed: Vec<serde_json::Value> = files
        .iter()
        .map(|f| serde_json::json!({"path": f.path, "size": f.size, "sha256": f.sha256}))
        .collect();
    let manifest = serde_json::json!({"request_id": id, "kind": "CONTRACT_END", "files": listed});
    let info = PackageInfo {
        request_id: id.into(),
        complete: true,
        files,
        manifest_json: serde_json::to_vec_pretty(&manifest).expect("json"),
        ..Default::default()
    };
    let chunks = FILES
        .iter()
        .map(|(path, data)| {
            let mut data = data.to_vec();
            if corrupt == Some(*path) {
                data[0] ^= 0x20;
            }
            PackageFileChunk {
                path: path.to_string(),
                offset: 0,
                data,
            }
        })
        .collect();
    (info, chunks)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_download_that_failed_its_checks_cannot_confirm_a_return() {
    let bad = FILES[1].0;
    let registry = Registry::start(Answers {
        package: Some(package("c-1", Some(bad))),
        ..Default::default()
    })
    .await;

    let run = registry.dsrctl(&["download", "c-1", "--out", "pkg"]).await;
    assert_eq!(run.code, Some(1), "{run:?}");
    assert!(run.stderr.contains(bad), "{run:?}");
    let pkg = registry.dir.path().join("pkg");
    assert!(!pkg.join(bad).exists(), "the bad file is deleted");
    assert!(pkg.join(FILES[0].0).is_file(), "the verified ones stay");

    let run = registry
        .dsrctl(&["contracts", "confirm", "c-1", "--package", "pkg"])
        .await;
    // Its manifest.json missing is a file of the package missing: exit 1, as for any other.
    assert_eq!(run.code, Some(1), "{run:?}");
    assert!(run.stderr.contains("--package pkg"), "{run:?}");
    assert!(registry.answers().confirmed.is_empty(), "{run:?}");
    // Only a folder whose every file verified holds a manifest.
    assert!(!pkg.join("manifest.json").exists());
}

/// A registry killed in the middle of a download: dsrctl keeps the files it verified and says
/// to run the same command again (not the SDK's advice to a program, to call download_package
/// again and drop what was received), and the command run again finishes the download.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_download_cut_by_a_killed_registry_is_finished_by_the_same_command() {
    let registry = Registry::start(Answers {
        package: Some(package("c-1", None)),
        // The second chunk begins the second file, which ends (and places) the first.
        download_stalls_after: Some(2),
        ..Default::default()
    })
    .await;
    let download = registry
        .command(&["download", "c-1", "--out", "pkg"])
        .kill_on_drop(true)
        .spawn()
        .expect("running dsrctl");
    let pkg = registry.dir.path().join("pkg");
    let first = pkg.join(FILES[0].0);
    let waited = tokio::time::timeout(GUARD, async {
        while !first.is_file() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(waited.is_ok(), "the first file was never verified");
    registry.relay.kill();
    let out = tokio::time::timeout(GUARD, download.wait_with_output())
        .await
        .expect("a hang guard")
        .expect("dsrctl ends");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("run the same command again to finish"),
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!(
            "error: UNAVAILABLE: the connection to the registry at {} was lost during the \
             download",
            registry.endpoint
        )),
        "{stderr}"
    );
    assert!(!stderr.contains("download_package"), "{stderr}");
    assert!(!stderr.contains("drop what"), "{stderr}");
    assert!(first.is_file(), "the verified file stays: {stderr}");

    registry.answers().download_stalls_after = None;
    registry.relay.restart().await;
    let run = registry.dsrctl(&["download", "c-1", "--out", "pkg"]).await;
    assert_eq!(run.code, Some(0), "{run:?}");
    for (path, data) in FILES {
        assert_eq!(std::fs::read(pkg.join(path)).expect(path), *data, "{path}");
    }
    assert!(pkg.join("manifest.json").is_file(), "{run:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn confirm_checks_every_file_of_the_package_folder_again() {
    let registry = Registry::start(Answers {
        package: Some(package("c-1", None)),
        ..Default::default()
    })
    .await;
    let run = registry.dsrctl(&["download", "c-1", "--out", "pkg"]).await;
    assert_eq!(run.code, Some(0), "{run:?}");
    let pkg = registry.dir.path().join("pkg");

    // Changed after the download, or gone: named, and nothing is confirmed.
    let (changed, gone) = (FILES[0].0, FILES[2].0);
    std::fs::write(pkg.join(changed), b"id,name\n").expect("changing a file");
    std::fs::remove_file(pkg.join(gone)).expect("removing a file");
    let run = registry
        .dsrctl(&["contracts", "confirm", "c-1", "--package", "pkg"])
        .await;
    assert_eq!(run.code, Some(1), "{run:?}");
    for (path, why) in [(changed, "ended at 8 of 16 bytes"), (gone, "missing")] {
        assert!(
            run.stderr.contains(&format!("{path}: {why}")),
            "{path} in {run:?}"
        );
    }
    assert!(!run.stderr.contains(FILES[1].0), "{run:?}");
    assert!(registry.answers().confirmed.is_empty(), "{run:?}");

    // Put back as downloaded, the folder confirms the return with its manifest's digest.
    std::fs::write(pkg.join(changed), FILES[0].1).expect("restoring");
    std::fs::write(pkg.join(gone), FILES[2].1).expect("restoring");
    let run = registry
        .dsrctl(&["contracts", "confirm", "c-1", "--package", "pkg"])
        .await;
    assert_eq!(run.code, Some(0), "{run:?}");
    let manifest = std::fs::read(pkg.join("manifest.json")).expect("manifest.json");
    assert_eq!(registry.answers().confirmed, [sha256_hex(&manifest)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_verdict_stays_failed_when_nobody_reads_the_output() {
    let mut entries = trail(5);
    entries[2].detail = "event 3, changed".into();
    let registry = Registry::start(Answers {
        entries,
        package: Some(package("c-1", Some(FILES[0].0))),
        contract_state: RequestState::Failed,
        ..Default::default()
    })
    .await;

    let run = registry.dsrctl(&["audit", "verify"]).await;
    assert_eq!(run.code, Some(1), "{run:?}");
    assert!(run.stdout.contains("broken at entry 3"), "{run:?}");
    let cases = [
        &["audit", "verify"][..],
        &["audit", "verify", "--output", "json"],
        &["download", "c-1", "--out", "unread"],
        &["contracts", "show", "c-1", "--watch"],
    ];
    let mut runs = Vec::new();
    for args in cases {
        runs.push((args, registry.dsrctl_unread(args).await));
    }
    assert!(runs.iter().all(|(_, run)| run.code == Some(1)), "{runs:#?}");
    // The notes on stderr still name the file that failed.
    assert!(runs[2].1.stderr.contains(FILES[0].0), "{runs:#?}");
}

/// `audit checkpoints --output json` prints the checkpoint file's lines, which `audit verify
/// --checkpoints` reads back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkpoints_printed_as_json_are_a_checkpoint_file() {
    let key = SigningKey::generate();
    let public = key.public_key().to_base64();
    let entries = trail(5);
    let registry = Registry::start(Answers {
        checkpoints: checkpoints(&entries, &[2, 4], &key),
        entries,
        ..Default::default()
    })
    .await;
    let table = registry.dsrctl(&["audit", "checkpoints"]).await;
    assert_eq!(table.code, Some(0), "{table:?}");
    let json = registry
        .dsrctl(&["audit", "checkpoints", "--output", "json"])
        .await;
    assert_eq!(json.code, Some(0), "{json:?}");
    assert_eq!(json.stdout, table.stdout);
    assert_eq!(json.stdout.lines().count(), 2, "{json:?}");
    std::fs::write(registry.path("kept.jsonl"), &json.stdout).expect("the file");
    let run = registry
        .dsrctl(&[
            "audit",
            "verify",
            "--checkpoints",
            "kept.jsonl",
            "--checkpoint-key",
            &public,
        ])
        .await;
    assert_eq!(run.code, Some(0), "{run:?}");
    assert!(run.stdout.contains("2 signed checkpoints kept"), "{run:?}");
}

/// Checkpoints of another service's trail, named with --checkpoints, are a usage error that
/// says so, rather than a trail that reads as rewritten.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checkpoint_file_of_another_service_is_a_usage_error() {
    let key = SigningKey::generate();
    let public = key.public_key().to_base64();
    let entries = trail(5);
    let lines: String = [2, 4]
        .iter()
        .map(|&seq: &u64| {
            let hash = &entries[seq as usize - 1].hash;
            let (_, signed) =
                Checkpoint::sign("processor", seq, hash, 1_800_000_100_000, &key).expect("signing");
            signed.to_json_line().expect("a line") + "\n"
        })
        .collect();
    let registry = Registry::start(Answers {
        entries,
        ..Default::default()
    })
    .await;
    std::fs::write(registry.path("processor.jsonl"), lines).expect("the file");
    let run = registry
        .dsrctl(&[
            "audit",
            "verify",
            "--checkpoints",
            "processor.jsonl",
            "--checkpoint-key",
            &public,
        ])
        .await;
    assert_eq!(run.code, Some(2), "{run:?}");
    assert!(
        run.stderr
            .starts_with("error: checkpoint 1 is the processor's, not this registry's trail"),
        "{run:?}"
    );
    assert!(run.stdout.is_empty(), "{run:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkpoints_asked_for_and_none_there_fail_the_verification() {
    let key = SigningKey::generate();
    let public = key.public_key().to_base64();
    let registry = Registry::start(Answers {
        entries: trail(5),
        ..Default::default()
    })
    .await;
    std::fs::write(registry.path("kept.jsonl"), "").expect("an empty file");
    let mut runs = Vec::new();
    for source in [
        &["--fetch-checkpoints"][..],
        &["--checkpoints", "kept.jsonl"],
    ] {
        let args = [
            &["audit", "verify", "--checkpoint-key", &public][..],
            source,
        ]
        .concat();
        runs.push((source, registry.dsrctl(&args).await));
        let json = registry
            .dsrctl(&[&args[..], &["--output", "json"]].concat())
            .await;
        runs.push((source, json));
    }
    for (source, run) in &runs {
        assert_eq!(run.code, Some(1), "{source:?}: {runs:#?}");
        assert!(
            run.stdout.contains("no signed checkpoint"),
            "{source:?}: {run:?}"
        );
    }
    let doc: serde_json::Value = serde_json::from_str(&runs[1].1.stdout).expect("json");
    assert_eq!(doc["intact"], false, "{doc}");

    // With some, the same trail passes.
    let entries = trail(5);
    registry.answers().checkpoints = checkpoints(&entries, &[2, 4], &key);
    let run = registry
        .dsrctl(&[
            "audit",
            "verify",
            "--fetch-checkpoints",
            "--checkpoint-key",
            &public,
        ])
        .await;
    assert_eq!(run.code, Some(0), "{run:?}");
    assert!(run.stdout.contains("2 signed checkpoints kept"), "{run:?}");
}

/// After the registry's checkpoint key was rotated, its checkpoints are signed by two keys:
/// they verify with both given (`--checkpoint-key` twice), the summary says which signed
/// how many, and with one key alone the first checkpoint of the other fails naming it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkpoints_across_a_key_rotation_verify_with_both_keys() {
    let (old, new) = (SigningKey::generate(), SigningKey::generate());
    let (old_id, new_id) = (old.public_key().key_id(), new.public_key().key_id());
    let entries = trail(9);
    let mut signed = checkpoints(&entries, &[2, 4, 5], &old);
    signed.extend(checkpoints(&entries, &[7, 9], &new));
    let registry = Registry::start(Answers {
        checkpoints: signed,
        entries,
        ..Default::default()
    })
    .await;
    for (name, key) in [("old.pub.pem", &old), ("new.pub.pem", &new)] {
        let pem = key.public_key().to_pem().expect("pem");
        std::fs::write(registry.path(name), pem).expect("the key file");
    }
    let verify = |keys: &[&'static str]| {
        let mut args = vec!["audit", "verify", "--fetch-checkpoints"];
        for key in keys {
            args.extend(["--checkpoint-key", key]);
        }
        args
    };

    let run = registry
        .dsrctl(&verify(&["new.pub.pem", "old.pub.pem"]))
        .await;
    assert_eq!(run.code, Some(0), "{run:?}");
    assert!(
        run.stdout.contains(&format!(
            "5 signed checkpoints kept (3 signed with key {old_id}, 2 with key {new_id})"
        )),
        "{run:?}"
    );
    let json = registry
        .dsrctl(
            &[
                &verify(&["old.pub.pem", "new.pub.pem"])[..],
                &["--output", "json"],
            ]
            .concat(),
        )
        .await;
    assert_eq!(json.code, Some(0), "{json:?}");
    let doc: serde_json::Value = serde_json::from_str(&json.stdout).expect("json");
    assert_eq!(doc["checkpoints"], 5, "{doc}");
    assert_eq!(
        doc["checkpoint_keys"],
        serde_json::json!([
            {"key_id": old_id, "checkpoints": 3},
            {"key_id": new_id, "checkpoints": 2},
        ]),
        "{doc}"
    );

    // One key alone: the first checkpoint of the other fails, naming that key.
    let run = registry.dsrctl(&verify(&["new.pub.pem"])).await;
    assert_eq!(run.code, Some(1), "{run:?}");
    assert!(
        run.stdout.starts_with(&format!(
            "checkpoints do not verify: checkpoint 1 bad signature: signed with key {old_id}, \
             not with the expected key {new_id}; if the registry's checkpoint key was rotated"
        )),
        "{run:?}"
    );
    let run = registry.dsrctl(&verify(&["old.pub.pem"])).await;
    assert_eq!(run.code, Some(1), "{run:?}");
    assert!(
        run.stdout.contains(&format!(
            "checkpoint 4 bad signature: signed with key {new_id}, not with the expected key \
             {old_id}"
        )),
        "{run:?}"
    );
    // The same key twice is refused, naming both places.
    let run = registry
        .dsrctl(&verify(&["new.pub.pem", "new.pub.pem"]))
        .await;
    assert_eq!(run.code, Some(2), "{run:?}");
    assert!(
        run.stderr
            .contains("--checkpoint-key 2 (new.pub.pem) is --checkpoint-key 1 (new.pub.pem) again"),
        "{run:?}"
    );

    // `audit checkpoints` says which key signed how many.
    let run = registry.dsrctl(&["audit", "checkpoints"]).await;
    assert_eq!(run.code, Some(0), "{run:?}");
    assert!(
        run.stderr.starts_with(&format!(
            "5 checkpoints, 3 signed with key {old_id}, 2 with key {new_id}:"
        )),
        "{run:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_entry_pages_that_do_not_advance_are_a_bad_answer() {
    let registry = Registry::start(Answers {
        entries: trail(7),
        entries_stuck: true,
        ..Default::default()
    })
    .await;
    let run = registry.dsrctl(&["audit", "verify"]).await;
    assert_eq!(run.code, Some(1), "{run:?}");
    assert!(
        run.stderr.contains("entries after seq 2") && !run.stdout.contains("intact"),
        "{run:?}"
    );
    // Pages that advance, then end with 0: the whole trail.
    registry.answers().entries_stuck = false;
    let run = registry.dsrctl(&["audit", "verify"]).await;
    assert_eq!(run.code, Some(0), "{run:?}");
    assert!(run.stdout.contains("intact: 7 entries"), "{run:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkpoint_pages_that_do_not_advance_are_a_bad_answer() {
    let key = SigningKey::generate();
    let public = key.public_key().to_base64();
    let entries = trail(7);
    let registry = Registry::start(Answers {
        checkpoints: checkpoints(&entries, &[1, 3, 5, 7], &key),
        entries,
        checkpoints_stuck: true,
        ..Default::default()
    })
    .await;
    let verify = [
        "audit",
        "verify",
        "--fetch-checkpoints",
        "--checkpoint-key",
        &public,
    ];
    let mut runs = Vec::new();
    for args in [&verify[..], &["audit", "checkpoints"]] {
        runs.push((args, registry.dsrctl(args).await));
    }
    for (args, run) in &runs {
        assert_eq!(run.code, Some(1), "{args:?}: {runs:#?}");
        assert!(
            run.stderr.contains("checkpoints after seq 3"),
            "{args:?}: {run:?}"
        );
    }
    registry.answers().checkpoints_stuck = false;
    let run = registry.dsrctl(&verify).await;
    assert_eq!(run.code, Some(0), "{run:?}");
    assert!(run.stdout.contains("4 signed checkpoints kept"), "{run:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_listing_that_names_a_page_again_is_a_bad_answer() {
    let registry = Registry::start(Answers::default()).await;
    let run = registry.dsrctl(&["list", "--all"]).await;
    assert_eq!(run.code, Some(1), "{run:?}");
    assert!(
        run.stderr.contains("\"p-1\"")
            && run.stderr.contains("already followed")
            && !run.stderr.contains("INTERNAL"),
        "{run:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listing_that_matches_nothing_says_so_naming_the_filters() {
    let registry = Registry::start(Answers {
        list_ends: true,
        ..Default::default()
    })
    .await;
    let run = registry
        .dsrctl(&["list", "--overdue", "--state", "failed"])
        .await;
    assert_eq!(run.code, Some(0), "{run:?}");
    assert_eq!(
        run.stdout, "no request matched --state failed --overdue\n",
        "{run:?}"
    );
    let run = registry
        .dsrctl(&["list", "--overdue", "--output", "json"])
        .await;
    assert_eq!(run.code, Some(0), "{run:?}");
    let json: serde_json::Value = serde_json::from_str(&run.stdout).expect("json");
    assert_eq!(json["requests"], serde_json::json!([]), "{run:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_list_prints_a_page_of_the_trail_and_names_the_next() {
    let mut entries = trail(3);
    entries[1].detail = format!("a long detail {}", "x".repeat(100));
    let registry = Registry::start(Answers {
        entries: entries.clone(),
        ..Default::default()
    })
    .await;

    let run = registry.dsrctl(&["audit", "list"]).await;
    assert_eq!(run.code, Some(0), "{run:?}");
    let lines: Vec<&str> = run.stdout.lines().collect();
    assert_eq!(lines.len(), 4, "header, a page of 2, next page: {run:?}");
    for column in ["SEQ", "TIME", "EVENT", "REQUEST", "ACTOR", "DETAIL"] {
        assert!(lines[0].contains(column), "{run:?}");
    }
    assert!(
        lines[1].starts_with("1  ")
            && lines[1].contains("2027-01-15T08:00:01Z")
            && lines[1].contains("SUBMITTED")
            && lines[1].contains("r-1")
            && lines[1].contains("partner-crm")
            && lines[1].ends_with("event 1"),
        "{run:?}"
    );
    assert!(
        lines[2].ends_with('…') && !lines[2].contains(&"x".repeat(60)),
        "{run:?}"
    );
    assert_eq!(lines[3], "next page: --after-seq 2", "{run:?}");

    let run = registry
        .dsrctl(&["audit", "list", "--after-seq", "2"])
        .await;
    assert_eq!(run.code, Some(0), "{run:?}");
    assert!(
        run.stdout
            .lines()
            .nth(1)
            .unwrap_or_default()
            .starts_with("3  "),
        "{run:?}"
    );
    assert!(!run.stdout.contains("next page"), "{run:?}");

    let run = registry.dsrctl(&["audit", "list", "--after", "3"]).await;
    assert_eq!(run.code, Some(0), "{run:?}");
    assert_eq!(run.stdout, "no audit entry after seq 3\n", "{run:?}");

    let run = registry
        .dsrctl(&["audit", "list", "--output", "json"])
        .await;
    assert_eq!(run.code, Some(0), "{run:?}");
    let json: serde_json::Value = serde_json::from_str(&run.stdout).expect("json");
    assert_eq!(json["trail"], "registry", "{run:?}");
    assert_eq!(json["next_after_seq"], 2, "{run:?}");
    let second = &json["entries"][1];
    assert_eq!(second["seq"], 2, "{run:?}");
    assert_eq!(
        second["detail"],
        entries[1].detail.as_str(),
        "whole in JSON"
    );
    assert_eq!(second["hash"], entries[1].hash.as_str(), "{run:?}");
    assert_eq!(second["prev_hash"], entries[0].hash.as_str(), "{run:?}");

    let run = registry.dsrctl(&["audit", "list", "--limit", "0"]).await;
    assert_eq!(run.code, Some(2), "{run:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_list_of_an_empty_trail_says_so() {
    let registry = Registry::start(Answers::default()).await;
    let run = registry.dsrctl(&["audit", "list"]).await;
    assert_eq!(run.code, Some(0), "{run:?}");
    assert_eq!(
        run.stdout, "the registry's audit trail has no entries\n",
        "{run:?}"
    );
}

/// A package given for a return to a transfer recipient is refused before ConfirmReturn is
/// sent, saying what to do in plain words rather than by the name of a field; one left out for
/// a return as a package likewise.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn confirm_says_in_plain_words_how_the_return_is_confirmed() {
    let registry = Registry::start(Answers {
        package: Some(package("c-1", None)),
        contract_terms: Some(ContractEnd {
            choice: ContractEndChoice::ReturnThenDelete as i32,
            transfer_recipient: "successor".into(),
            ..Default::default()
        }),
        ..Default::default()
    })
    .await;
    let run = registry.dsrctl(&["download", "c-1", "--out", "pkg"]).await;
    assert_eq!(run.code, Some(0), "{run:?}");
    for given in [["--package", "pkg"], ["--manifest-sha256", &"0".repeat(64)]] {
        let mut args = vec!["contracts", "confirm", "c-1"];
        args.extend(given);
        let run = registry.dsrctl(&args).await;
        assert_eq!(run.code, Some(2), "{run:?}");
        assert!(!run.stderr.contains("manifest_sha256"), "{run:?}");
        // The command it suggests names the registry asked, as this run did.
        let alone = format!(
            "`dsrctl contracts confirm c-1 --endpoint {}` alone",
            registry.endpoint
        );
        for words in [
            "returns the data to the transfer recipient successor",
            &alone,
        ] {
            assert!(run.stderr.contains(words), "{words} in {run:?}");
        }
    }
    assert!(registry.answers().confirmed.is_empty());
    let run = registry.dsrctl(&["contracts", "confirm", "c-1"]).await;
    assert_eq!(run.code, Some(0), "{run:?}");
    assert_eq!(registry.answers().confirmed, [""]);

    registry.answers().contract_terms = Some(ContractEnd {
        choice: ContractEndChoice::ReturnThenDelete as i32,
        ..Default::default()
    });
    let run = registry.dsrctl(&["contracts", "confirm", "c-1"]).await;
    assert_eq!(run.code, Some(2), "{run:?}");
    assert!(
        run.stderr.contains("--package DIR") && !run.stderr.contains("manifest_sha256"),
        "{run:?}"
    );
    assert_eq!(registry.answers().confirmed, [""]);
}

/// `contracts show --watch` with no terminal to draw its bars on prints, as a table, a
/// contract end that has not finished at once, and again only when it changes: a contract
/// end may take its grace period, and a watch that prints nothing looks hung. With --output
/// json it prints one document, the last view, for a script to read. A PARTIALLY_COMPLETED
/// one has finished (its holders keep only what the law makes them keep, for years): the
/// watch ends there, exit 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_without_a_terminal_prints_the_contract_end_at_once() {
    let registry = Registry::start(Answers {
        contract_states_first: vec![RequestState::InProgress; 2],
        contract_state: RequestState::Completed,
        ..Default::default()
    })
    .await;
    let run = registry
        .dsrctl(&["contracts", "show", "c-1", "--watch"])
        .await;
    assert_eq!(run.code, Some(0), "{run:?}");
    let states: Vec<&str> = (run.stdout.lines())
        .filter_map(|line| line.strip_prefix("state"))
        .map(str::trim)
        .collect();
    assert_eq!(states, ["IN_PROGRESS", "COMPLETED"], "{run:?}");

    registry.answers().contract_states_first = vec![RequestState::InProgress; 2];
    let run = registry
        .dsrctl(&["contracts", "show", "c-1", "--watch", "--output", "json"])
        .await;
    assert_eq!(run.code, Some(0), "{run:?}");
    let view: serde_json::Value = serde_json::from_str(&run.stdout).expect("one JSON document");
    assert_eq!(view["state"], "COMPLETED", "{run:?}");

    registry.answers().contract_states_first = vec![RequestState::InProgress; 2];
    registry.answers().contract_state = RequestState::PartiallyCompleted;
    let run = registry
        .dsrctl(&["contracts", "show", "c-1", "--watch", "--output", "json"])
        .await;
    assert_eq!(run.code, Some(0), "{run:?}");
    let view: serde_json::Value = serde_json::from_str(&run.stdout).expect("one JSON document");
    assert_eq!(view["state"], "PARTIALLY_COMPLETED", "{run:?}");

    // Its reader gone, a watch of one that does not finish ends, not finished: exit 1.
    registry.answers().contract_state = RequestState::InProgress;
    let run = registry
        .dsrctl_unread(&["contracts", "show", "c-1", "--watch"])
        .await;
    assert_eq!(run.code, Some(1), "{run:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_finished_download_run_again_says_so_and_succeeds() {
    let registry = Registry::start(Answers {
        package: Some(package("c-1", None)),
        ..Default::default()
    })
    .await;
    let run = registry.dsrctl(&["download", "c-1", "--out", "pkg"]).await;
    assert_eq!(run.code, Some(0), "{run:?}");
    let pkg = registry.dir.path().join("pkg");
    let manifest = std::fs::read(pkg.join("manifest.json")).unwrap();
    let download_json = ["download", "c-1", "--out", "pkg", "--output", "json"];

    let run = registry.dsrctl(&["download", "c-1", "--out", "pkg"]).await;
    assert_eq!(run.code, Some(0), "{run:?}");
    assert!(
        run.stdout
            .starts_with("download finished already: pkg holds the package of c-1"),
        "{run:?}"
    );
    let verified = format!("{n} of {n} verified", n = FILES.len());
    assert!(run.stdout.contains(&verified), "{run:?}");
    // The same document as a download's, from the check just made.
    let run = registry.dsrctl(&download_json).await;
    assert_eq!(run.code, Some(0), "{run:?}");
    let doc: serde_json::Value = serde_json::from_str(&run.stdout).expect("json");
    assert_eq!(doc["finished_already"], true, "{run:?}");
    assert_eq!(doc["package_sha256"], sha256_hex(&manifest), "{run:?}");
    assert_eq!(doc["verified"], true, "{run:?}");
    assert_eq!(doc["file_count"], FILES.len(), "{run:?}");
    assert_eq!(doc["digests_verified"], FILES.len(), "{run:?}");
    let files = doc["files"].as_array().expect("files");
    for (file, (path, content)) in files.iter().zip(FILES) {
        assert_eq!(file["path"], *path, "{run:?}");
        assert_eq!(file["sha256"], sha256_hex(content), "{run:?}");
        assert_eq!(file["verified"], true, "{run:?}");
    }
    assert!(!run.stderr.contains("left over"), "{run:?}");

    // The staging folder a run killed while removing it left, with its lock file: still
    // finished, and the folder can go.
    let staging = pkg.join(".dsrctl-download");
    std::fs::create_dir(&staging).unwrap();
    std::fs::write(staging.join("lock"), b"").unwrap();
    let run = registry.dsrctl(&["download", "c-1", "--out", "pkg"]).await;
    assert_eq!(run.code, Some(0), "{run:?}");
    assert!(
        run.stderr
            .contains(".dsrctl-download is left over from it and can be deleted"),
        "{run:?}"
    );

    // The file naming the request there again: a run failed after writing manifest.json,
    // so the download did not finish, and the refusal says what to do.
    std::fs::write(staging.join("request"), b"c-1").unwrap();
    let run = registry.dsrctl(&["download", "c-1", "--out", "pkg"]).await;
    assert_eq!(run.code, Some(2), "{run:?}");
    assert!(
        run.stderr.contains("failed after writing it") && !run.stdout.contains("finished"),
        "{run:?}"
    );
    std::fs::remove_dir_all(&staging).unwrap();

    // A file changed since, to other bytes of the same size that only its SHA-256 tells
    // apart: no longer finished, and said so.
    let changed = pkg.join(FILES[1].0);
    let mut bytes = FILES[1].1.to_vec();
    bytes[0] ^= 1;
    std::fs::write(&changed, &bytes).unwrap();
    // A package problem, as a file that fails its check in a download: exit 1.
    let run = registry.dsrctl(&["download", "c-1", "--out", "pkg"]).await;
    assert_eq!(run.code, Some(1), "{run:?}");
    assert!(run.stderr.contains("no longer matches"), "{run:?}");
    assert!(run.stderr.contains(FILES[1].0), "{run:?}");
    // A change of size, too.
    std::fs::write(&changed, b"[]").unwrap();
    let run = registry.dsrctl(&["download", "c-1", "--out", "pkg"]).await;
    assert_eq!(run.code, Some(1), "{run:?}");
    assert!(
        run.stderr.contains("no longer matches") && run.stderr.contains(FILES[1].0),
        "{run:?}"
    );
}

/// A folder holding a finished download of the package as it was before a holder's part
/// came (a task retried after it failed) is not reported finished: its manifest still lists
/// that holder as not returned, and its digest is not the package's, so a confirmation
/// with it is refused. The run exits 1 naming a new folder, and writes nothing; the new
/// folder gets the package as it is now.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_folder_holding_an_older_version_of_the_package_is_refused() {
    let (mut info, chunks) = package("c-1", None);
    let mut manifest: serde_json::Value = serde_json::from_slice(&info.manifest_json).unwrap();
    let current = info.manifest_json.clone();
    manifest["not_returned"] = serde_json::json!([
        {"processor": "payroll-bureau", "subprocessor": "accounting", "state": "FAILED"}
    ]);
    info.manifest_json = serde_json::to_vec_pretty(&manifest).unwrap();
    let older = info.manifest_json.clone();
    let registry = Registry::start(Answers {
        package: Some((info, chunks)),
        ..Default::default()
    })
    .await;
    let run = registry.dsrctl(&["download", "c-1", "--out", "pkg"]).await;
    assert_eq!(run.code, Some(0), "{run:?}");
    assert!(run.stdout.contains("not returned"), "{run:?}");
    let pkg = registry.dir.path().join("pkg");

    registry.answers().package = Some(package("c-1", None));
    let run = registry.dsrctl(&["download", "c-1", "--out", "pkg"]).await;
    assert_eq!(run.code, Some(1), "{run:?}");
    assert!(!run.stdout.contains("finished already"), "{run:?}");
    for words in [
        "--out pkg holds an older version of the package of c-1",
        &format!("its manifest.json has SHA-256 {}", sha256_hex(&older)),
        &format!("the registry's package now {}", sha256_hex(&current)),
        "download into a new folder (dsrctl download c-1 --out NEW_DIR",
    ] {
        assert!(run.stderr.contains(words), "{words:?} in {run:?}");
    }
    assert_eq!(std::fs::read(pkg.join("manifest.json")).unwrap(), older);

    let run = registry.dsrctl(&["download", "c-1", "--out", "new"]).await;
    assert_eq!(run.code, Some(0), "{run:?}");
    assert!(!run.stdout.contains("not returned"), "{run:?}");
    let new = std::fs::read(registry.dir.path().join("new/manifest.json")).unwrap();
    assert_eq!(new, current);

    // The registry cannot say which package it has: not reported finished either.
    registry.answers().package = None;
    let run = registry.dsrctl(&["download", "c-1", "--out", "new"]).await;
    assert_ne!(run.code, Some(0), "{run:?}");
    assert!(
        run.stderr
            .contains("holds a finished download of c-1, but the registry could not"),
        "{run:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_incomplete_package_shows_no_package_digest() {
    let (mut info, chunks) = package("c-1", None);
    info.complete = false;
    info.missing = vec!["payroll-bureau/mail-marketing".into()];
    let registry = Registry::start(Answers {
        package: Some((info, chunks)),
        ..Default::default()
    })
    .await;
    let run = registry.dsrctl(&["package", "c-1"]).await;
    assert_eq!(run.code, Some(0), "{run:?}");
    assert!(!run.stdout.contains("package sha256"), "{run:?}");
    assert!(run.stdout.contains("mail-marketing"), "{run:?}");
    let run = registry
        .dsrctl(&["package", "c-1", "--output", "json"])
        .await;
    let doc: serde_json::Value = serde_json::from_str(&run.stdout).expect("json");
    assert_eq!(doc["package_sha256"], serde_json::Value::Null, "{run:?}");
    assert_eq!(doc["files"].as_array().map(Vec::len), Some(FILES.len()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_retry_note_comes_only_when_the_submit_may_have_been_stored() {
    let submit = ["submit", "--kind", "erasure", "--email", "a@example.fi"];
    for (code, note) in [
        (tonic::Code::InvalidArgument, false),
        (tonic::Code::PermissionDenied, false),
        (tonic::Code::AlreadyExists, false),
        (tonic::Code::Unavailable, true),
        (tonic::Code::DeadlineExceeded, true),
    ] {
        let registry = Registry::start(Answers {
            submit_error: Some(code),
            ..Default::default()
        })
        .await;
        let run = registry.dsrctl(&submit).await;
        assert_ne!(run.code, Some(0), "{run:?}");
        assert_eq!(
            run.stderr.contains("note: idempotency key was "),
            note,
            "{code:?}: {run:?}"
        );
        assert!(run.stderr.contains("the stand-in's answer"), "{run:?}");
    }
}

/// How long a test waits for a running dsrctl to print or to end: a guard against a hang,
/// not a measure.
const GUARD: Duration = Duration::from_secs(60);

/// A dsrctl still running, its output read line by line.
struct Running {
    child: Child,
    lines: Lines<BufReader<ChildStdout>>,
    read: Vec<String>,
}

impl Registry {
    /// Starts dsrctl with `args` against the stand-in, killed if the test ends first.
    fn spawn(&self, args: &[&str]) -> Running {
        let mut child = (self.command(args).kill_on_drop(true).spawn()).expect("running dsrctl");
        let stdout = child.stdout.take().expect("stdout");
        Running {
            child,
            lines: BufReader::new(stdout).lines(),
            read: Vec::new(),
        }
    }
}

impl Running {
    /// Reads lines of its output until one for which `wanted` holds.
    async fn read_until(&mut self, wanted: impl Fn(&str) -> bool) {
        loop {
            let next = tokio::time::timeout(GUARD, self.lines.next_line()).await;
            let line = (next
                .expect("a hang guard")
                .expect("reading dsrctl's output"))
            .unwrap_or_else(|| panic!("dsrctl ended having printed {:?}", self.read));
            let done = wanted(&line);
            self.read.push(line);
            if done {
                return;
            }
        }
    }

    /// Reads the rest of its output and waits for it to end.
    async fn end(mut self) -> Run {
        use tokio::io::AsyncReadExt as _;
        let mut stderr = String::new();
        let mut err = self.child.stderr.take().expect("stderr");
        let rest = async {
            while let Some(line) = self.lines.next_line().await.expect("reading") {
                self.read.push(line);
            }
            err.read_to_string(&mut stderr).await.expect("reading");
            self.child.wait().await.expect("dsrctl ends")
        };
        let status = tokio::time::timeout(GUARD, rest)
            .await
            .unwrap_or_else(|_| panic!("dsrctl did not end (a hang guard): {:?}", self.read));
        Run {
            code: status.code(),
            stdout: self.read.join("\n"),
            stderr,
        }
    }
}

fn event(event_id: u64, state: RequestState) -> RequestEvent {
    RequestEvent {
        event_id,
        request_id: "r-1".into(),
        request_state: state as i32,
        ..Default::default()
    }
}

/// A registry killed (no UNAVAILABLE to end the stream: its connection just closes) and
/// started again: `watch` watches again after the last event it printed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_goes_on_after_the_registry_is_killed_and_started_again() {
    let registry = Registry::start(Answers {
        events: vec![
            event(1, RequestState::Received),
            event(2, RequestState::InProgress),
        ],
        ..Default::default()
    })
    .await;
    let mut watch = registry.spawn(&["watch", "r-1"]);
    watch.read_until(|line| line.contains("IN_PROGRESS")).await;
    registry.relay.kill();
    // Long enough for dsrctl to find the registry gone, and try again at least once.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    registry
        .answers()
        .events
        .push(event(3, RequestState::Completed));
    registry.relay.restart().await;
    let run = watch.end().await;
    assert_eq!(run.code, Some(0), "{run:?}");
    let printed: Vec<&str> = run.stdout.lines().collect();
    assert_eq!(printed.len(), 3, "{run:?}");
    assert!(printed[2].contains("COMPLETED"), "{run:?}");
    assert!(
        run.stderr.contains("request r-1 ended COMPLETED"),
        "{run:?}"
    );
    let watched_after = registry.answers().watched_after.clone();
    assert_eq!(watched_after.first(), Some(&0), "{watched_after:?}");
    assert_eq!(watched_after.last(), Some(&2), "{watched_after:?}");
}

/// A watch that cannot go on after events were printed says where to continue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_that_cannot_go_on_says_where_to_continue() {
    let registry = Registry::start(Answers {
        events: vec![
            event(1, RequestState::Received),
            event(2, RequestState::InProgress),
        ],
        ..Default::default()
    })
    .await;
    let mut watch = registry.spawn(&["watch", "r-1"]);
    watch.read_until(|line| line.contains("IN_PROGRESS")).await;
    registry.answers().watch_refused = true;
    registry.relay.kill();
    registry.relay.restart().await;
    let run = watch.end().await;
    assert_eq!(run.code, Some(2), "{run:?}");
    // With the --endpoint this watch was given: without it, the watch suggested would ask
    // the default registry.
    let resume = format!(
        "`dsrctl watch r-1 --after 2 --endpoint {}` continues after the last event printed",
        registry.endpoint
    );
    assert!(run.stderr.contains(&resume), "{run:?}");
    assert!(run.stderr.contains("PERMISSION_DENIED"), "{run:?}");
}

/// A registry restarted during a contract end (whose grace period may last months):
/// `contracts show --watch` asks again until it answers, saying so, rather than ending.
/// Other errors still end it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_contract_watch_outlasts_a_registry_restart() {
    let registry = Registry::start(Answers {
        contract_state: RequestState::InProgress,
        ..Default::default()
    })
    .await;
    let watch_args = ["contracts", "show", "c-1", "--watch"];
    let mut watch = registry.spawn(&watch_args);
    watch.read_until(|line| line.starts_with("state")).await;
    registry.relay.kill();
    // Long enough for two polls to fail.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    registry.answers().contract_state = RequestState::Completed;
    registry.relay.restart().await;
    let run = watch.end().await;
    assert_eq!(run.code, Some(0), "{run:?}");
    for note in [
        "cannot reach the registry",
        "asking again in 1 s",
        "asking again in 2 s",
        "note: the registry answers again",
    ] {
        assert!(run.stderr.contains(note), "{note} in {run:?}");
    }
    let states: Vec<&str> = (run.stdout.lines())
        .filter_map(|line| line.strip_prefix("state"))
        .map(str::trim)
        .collect();
    assert_eq!(states, ["IN_PROGRESS", "COMPLETED"], "{run:?}");

    registry.answers().contract_state = RequestState::InProgress;
    let mut watch = registry.spawn(&watch_args);
    watch.read_until(|line| line.starts_with("state")).await;
    registry.answers().contract_gone = true;
    let run = watch.end().await;
    assert_eq!(run.code, Some(2), "{run:?}");
    assert!(run.stderr.contains("NOT_FOUND"), "{run:?}");
    assert!(!run.stderr.contains("asking again"), "{run:?}");
}

/// A dsrctl that PATH does not find by its name suggests commands that start with its
/// path, which run as printed; before, they started with `dsrctl`, which that shell could
/// not find.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hint_starts_dsrctl_by_its_path_where_path_does_not_find_it() {
    let registry = Registry::start(Answers {
        events: vec![
            event(1, RequestState::Received),
            event(2, RequestState::Failed),
        ],
        ..Default::default()
    })
    .await;
    let mut cmd = registry.command(&["watch", "r-1"]);
    cmd.env("PATH", "/nonexistent");
    let out = cmd.output().await.expect("running dsrctl");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let exe = std::fs::canonicalize(env!("CARGO_BIN_EXE_dsrctl")).expect("the binary");
    let exe = exe.display().to_string();
    assert!(
        !exe.contains(' ') && !exe.contains('\''),
        "a path a shell takes as it is: {exe}"
    );
    for words in [
        format!("`{exe} get r-1 "),
        format!("`{exe} watch r-1 --follow "),
    ] {
        assert!(stderr.contains(&words), "{words:?} in {stderr}");
    }
}

/// A watch that ends at FAILED says what to read, who retries the task and how to follow
/// the retry, as one that ends answered says how to follow the erasure to come; before, it
/// said "ended FAILED" and no more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_that_ends_failed_says_what_an_operator_does_next() {
    let registry = Registry::start(Answers {
        events: vec![
            event(1, RequestState::Received),
            event(2, RequestState::Failed),
        ],
        ..Default::default()
    })
    .await;
    let run = registry.dsrctl(&["watch", "r-1"]).await;
    assert_eq!(run.code, Some(1), "{run:?}");
    assert!(
        run.stderr
            .starts_with("request r-1 ended FAILED: a task failed, and an operator must act"),
        "{run:?}"
    );
    for words in [
        "`dsrctl get r-1 ",
        "`dsrctl tasks retry`",
        "`dsrctl watch r-1 --follow ",
    ] {
        assert!(run.stderr.contains(words), "{words:?} in {run:?}");
    }
}

/// `dsrctl chain` shows a `sql` holder's tables under it, in text and JSON, and with
/// `--category` what a request of that scope reaches: the holder, and which of its tables
/// it acts on and leaves out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_chain_shows_a_holders_tables_and_what_a_scope_reaches() {
    use dsrelay_proto::v1::subprocessor::HeldTable;
    use dsrelay_proto::v1::{ChainProcessor, Subprocessor};
    let strings = |v: &[&str]| v.iter().map(|c| c.to_string()).collect::<Vec<_>>();
    let table = |name: &str, categories: &[&str], inherited: bool| HeldTable {
        name: name.into(),
        data_categories: strings(categories),
        inherited,
    };
    let registry = Registry::start(Answers {
        chain: Some(Chain {
            processors: vec![ChainProcessor {
                name: "bureau".into(),
                data_categories: strings(&["contact", "invoicing"]),
                subprocessors: vec![Subprocessor {
                    name: "accounting".into(),
                    connector: "sql".into(),
                    data_categories: strings(&["contact", "invoicing"]),
                    tables: vec![
                        table("customers", &["contact"], false),
                        table("invoices", &["invoicing"], false),
                        table("notes", &["contact", "invoicing"], true),
                    ],
                    ..Default::default()
                }],
                ..Default::default()
            }],
        }),
        ..Default::default()
    })
    .await;
    let run = registry.dsrctl(&["chain"]).await;
    assert_eq!(run.code, Some(0), "{run:?}");
    assert!(
        run.stdout.contains("      table customers: contact\n"),
        "{run:?}"
    );
    assert!(
        run.stdout
            .contains("      table notes: contact, invoicing (all of the subprocessor's)\n"),
        "{run:?}"
    );
    assert!(!run.stdout.contains("scope"), "{run:?}");
    let run = registry.dsrctl(&["--output", "json", "chain"]).await;
    assert_eq!(run.code, Some(0), "{run:?}");
    let json: serde_json::Value = serde_json::from_str(&run.stdout).expect("json");
    let tables = &json["processors"][0]["subprocessors"][0]["tables"];
    assert_eq!(tables[1]["name"], "invoices", "{json:#}");
    assert!(tables[1].get("reached").is_none(), "{json:#}");

    let run = registry.dsrctl(&["chain", "--category", "contact"]).await;
    assert_eq!(run.code, Some(0), "{run:?}");
    assert!(
        run.stdout
            .contains("   scope contact: reaches this processor\n"),
        "{run:?}"
    );
    assert!(
        run.stdout
            .contains("      table customers: contact  reached\n"),
        "{run:?}"
    );
    assert!(
        run.stdout
            .contains("      table invoices: invoicing  left out\n"),
        "{run:?}"
    );
    let run = (registry.dsrctl(&["--output", "json", "chain", "--category", "invoicing"])).await;
    assert_eq!(run.code, Some(0), "{run:?}");
    let json: serde_json::Value = serde_json::from_str(&run.stdout).expect("json");
    assert_eq!(json["scope"], serde_json::json!(["invoicing"]));
    let tables = &json["processors"][0]["subprocessors"][0]["tables"];
    let reached: Vec<bool> = (tables.as_array().expect("tables").iter())
        .map(|t| t["reached"].as_bool().expect("reached"))
        .collect();
    assert_eq!(reached, [false, true, true], "{json:#}");
}
