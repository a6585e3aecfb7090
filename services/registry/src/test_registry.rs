//! A registry served in-process on 127.0.0.1 over mutual TLS with the development PKI, for
//! the tests that call it as its partner, operators and processor do. Each configures the
//! same callers (partner `crm`, operator `ops`, the processor [`PROCESSOR`], the transfer
//! recipient [`RECIPIENT`]) and adds what it needs through [`Setup`].

use std::path::{Path, PathBuf};
use std::sync::Arc;

use dsrelay_proto::v1::acknowledgement_service_client::AcknowledgementServiceClient;
use dsrelay_proto::v1::processor_service_server::{ProcessorService, ProcessorServiceServer};
use dsrelay_proto::v1::request_service_client::RequestServiceClient;
use dsrelay_proto::v1::{
    AcknowledgeRequest, AcknowledgeResponse, Acknowledgement, GetRequest, IdentityEncoding,
    IdentityType, RequestKind, RequestParameters, SubjectIdentity, SubmitRequest, TaskState,
};
use dsrelay_runtime::pki::{dev_identity, DevPki};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tonic::service::Routes;
use tonic::transport::Channel;

use crate::packages::{Packages, BUILD_HOOK};
use crate::{App, Config};

/// The one processor.
pub(crate) const PROCESSOR: &str = "payroll-bureau";
/// The one configured transfer recipient (whose endpoint nobody answers).
pub(crate) const RECIPIENT: &str = "new-bookkeeper";

/// What a test's registry has besides the callers every one of them configures.
pub(crate) struct Setup {
    /// Names the configuration file and the audit trail's folder, so that replicas started
    /// on one folder and database share only the package folder and the records.
    pub(crate) replica: &'static str,
    /// TOML keys added to the processor's `[[processors]]` table (its `public_key`, say).
    pub(crate) processor_keys: String,
    /// TOML tables added to the configuration (`[delivery]`, `[packages]`, …).
    pub(crate) tables: String,
    /// The processor, served here with the processor's certificate ([`Setup::answered_by`]);
    /// without it nobody answers at the processor's endpoint: its deliveries wait, and it
    /// may still call the registry.
    pub(crate) processor: Option<Routes>,
    /// What the registry's build does to its packages ([`BUILD_HOOK`]).
    pub(crate) packages: Option<Arc<dyn Fn(Packages) -> Packages + Send + Sync>>,
    /// Serve the admin port too ([`Registry::scrape`]).
    pub(crate) admin: bool,
    /// TOML keys added to the recipient's `[[recipients]]` table (its `public_key`, say).
    pub(crate) recipient_keys: String,
    /// The recipient's name in `[[recipients]]` (default [`RECIPIENT`]).
    pub(crate) recipient_name: &'static str,
    /// Partners configured besides `crm`, each with the development PKI's identity of that
    /// name (`webform` has a certificate there: `partner-webform`).
    pub(crate) more_partners: &'static [&'static str],
}

impl Default for Setup {
    fn default() -> Self {
        Self {
            replica: "registry",
            processor_keys: String::new(),
            tables: String::new(),
            processor: None,
            packages: None,
            admin: false,
            recipient_keys: String::new(),
            recipient_name: RECIPIENT,
            more_partners: &[],
        }
    }
}

impl Setup {
    /// This setup with `service` served as the processor.
    pub(crate) fn answered_by(self, service: impl ProcessorService) -> Self {
        Self {
            processor: Some(Routes::new(ProcessorServiceServer::new(service))),
            ..self
        }
    }
}

/// A running registry (and its processor, when the test serves one), stopped by
/// [`Registry::stop`].
pub(crate) struct Registry {
    port: u16,
    admin: Option<std::net::SocketAddr>,
    pki: DevPki,
    package_dir: PathBuf,
    stop: oneshot::Sender<()>,
    served: tokio::task::JoinHandle<anyhow::Result<()>>,
    stop_processor: Option<oneshot::Sender<()>>,
}

impl Registry {
    /// Serves a registry on `database_url`, its files under `dir`, as `setup` says.
    pub(crate) async fn start(dir: &Path, database_url: &str, setup: Setup) -> Self {
        let Setup {
            replica,
            processor_keys,
            tables,
            processor,
            packages,
            admin,
            recipient_keys,
            recipient_name,
            more_partners,
        } = setup;
        let more_partners: String = more_partners
            .iter()
            .map(|name| {
                format!(
                    "[[identities]]\nidentity = {:?}\nrole = \"partner\"\nname = {name:?}\n",
                    dev_identity("partner", name)
                )
            })
            .collect();
        let pki = DevPki::ensure(&dir.join("pki")).expect("dev pki");
        let (endpoint, stop_processor) = match processor {
            Some(routes) => {
                let (port, stop) = serve_processor(&pki, routes).await;
                (format!("https://localhost:{port}"), Some(stop))
            }
            None => ("https://localhost:1".to_string(), None),
        };
        let tls = pki.files("registry");
        let package_dir = dir.join("packages");
        let text = format!(
            "listen = \"127.0.0.1:0\"\ndatabase_url = {database_url:?}\n\
             identity_hash_key = \"k\"\npackage_dir = {package_dir:?}\n\
             [tls]\nca = {:?}\ncert = {:?}\nkey = {:?}\n\
             [audit]\ncheckpoint_key = {:?}\ncheckpoint_file = {:?}\n{tables}\
             [[identities]]\nidentity = {:?}\nrole = \"partner\"\nname = \"crm\"\n\
             [[identities]]\nidentity = {:?}\nrole = \"operator\"\nname = \"ops\"\n\
             {more_partners}\
             [[processors]]\nname = \"{PROCESSOR}\"\nendpoint = \"{endpoint}\"\n\
             identity = {:?}\ncategories = [\"contact\"]\n{processor_keys}\
             [[recipients]]\nname = \"{recipient_name}\"\nendpoint = \"https://localhost:1\"\n\
             identity = {:?}\n{recipient_keys}",
            tls.ca,
            tls.cert,
            tls.key,
            pki.signing_key("registry"),
            dir.join(format!("audit-{replica}/checkpoints.jsonl")),
            dev_identity("partner", "crm"),
            dev_identity("operator", "ops"),
            dev_identity("processor", PROCESSOR),
            dev_identity("recipient", "example"),
        );
        let file = dir.join(format!("{replica}.toml"));
        std::fs::write(&file, text).expect("config file");
        let config = Config::load_from(Some(&file), Vec::new()).expect("config");
        let app = match packages {
            Some(hook) => BUILD_HOOK.scope(hook, App::build(config)).await,
            None => App::build(config).await,
        }
        .expect("app");
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let admin = match admin {
            true => Some(TcpListener::bind("127.0.0.1:0").await.expect("bind admin")),
            false => None,
        };
        let admin_addr = admin.as_ref().map(|a| a.local_addr().expect("admin addr"));
        let (stop, stopped) = oneshot::channel::<()>();
        let served = tokio::spawn(app.run_with_admin(listener, admin, async {
            let _ = stopped.await;
        }));
        Self {
            port,
            admin: admin_addr,
            pki,
            package_dir,
            stop,
            served,
            stop_processor,
        }
    }

    /// The admin port's `/metrics`, read over a plain HTTP/1.0 request (with
    /// [`Setup::admin`]).
    pub(crate) async fn scrape(&self) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let admin = self.admin.expect("a registry started with its admin port");
        let mut stream = tokio::net::TcpStream::connect(admin)
            .await
            .expect("admin connect");
        stream
            .write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
            .await
            .expect("admin write");
        let mut text = String::new();
        stream.read_to_string(&mut text).await.expect("admin read");
        text
    }

    /// The registry's package folder.
    pub(crate) fn package_dir(&self) -> &Path {
        &self.package_dir
    }

    /// A channel to the registry with the certificate of the PKI's party `stem`.
    pub(crate) fn channel(&self, stem: &str) -> Channel {
        let tls = self.pki.files(stem).client_config().expect("client tls");
        dsrelay_runtime::tls::channel(
            &format!("https://localhost:{}", self.port),
            Some(dev_identity("registry", "controller")),
            &tls,
        )
        .expect("channel")
    }

    /// Submits, as partner-crm, a request of `kind` about maija@example.fi (a TRANSFER to
    /// [`RECIPIENT`]) under idempotency key `key`; its id.
    pub(crate) async fn submit(&self, kind: RequestKind, key: &str) -> String {
        let parameters = (kind == RequestKind::Transfer).then(|| RequestParameters {
            transfer_recipient: RECIPIENT.into(),
            ..Default::default()
        });
        RequestServiceClient::new(self.channel("partner-crm"))
            .submit(SubmitRequest {
                kind: kind as i32,
                identities: vec![SubjectIdentity {
                    r#type: IdentityType::Email as i32,
                    encoding: IdentityEncoding::Raw as i32,
                    value: "maija@example.fi".into(),
                    label: String::new(),
                }],
                parameters,
                idempotency_key: key.into(),
                ..Default::default()
            })
            .await
            .expect("submit")
            .into_inner()
            .request_id
    }

    /// Request `id` as partner-crm reads it.
    pub(crate) async fn get(&self, id: &str) -> dsrelay_proto::v1::Request {
        RequestServiceClient::new(self.channel("partner-crm"))
            .get(GetRequest {
                request_id: id.into(),
            })
            .await
            .expect("get")
            .into_inner()
    }

    /// Sends `acks` as the processor; the answer.
    pub(crate) async fn acknowledge(&self, acks: Vec<Acknowledgement>) -> AcknowledgeResponse {
        AcknowledgementServiceClient::new(self.channel("processor"))
            .acknowledge(AcknowledgeRequest {
                acknowledgements: acks,
            })
            .await
            .expect("acknowledge")
            .into_inner()
    }

    /// The processor reports its task of `subprocessor` on request `id` IN_PROGRESS, so
    /// that the registry takes the task's part.
    pub(crate) async fn in_progress(&self, id: &str, subprocessor: &str) {
        let answer = self
            .acknowledge(vec![Acknowledgement {
                request_id: id.into(),
                subprocessor: subprocessor.into(),
                sequence: 1,
                state: TaskState::InProgress as i32,
                ..Default::default()
            }])
            .await;
        assert_eq!(answer.applied, 1, "{answer:?}");
    }

    /// Stops the registry, waits for it to have stopped serving, then stops its processor.
    pub(crate) async fn stop(self) {
        let _ = self.stop.send(());
        self.served.await.expect("joined").expect("served");
        if let Some(stop) = self.stop_processor {
            let _ = stop.send(());
        }
    }
}

/// Serves `routes` on a port of 127.0.0.1 with the processor's certificate: the port, and
/// what stops it.
async fn serve_processor(pki: &DevPki, routes: Routes) -> (u16, oneshot::Sender<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let router = dsrelay_runtime::server::builder(
        pki.files("processor").server_config().expect("server tls"),
    )
    .expect("server")
    .add_routes(routes);
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(dsrelay_runtime::server::serve(router, listener, async {
        let _ = stopped.await;
    }));
    (port, stop)
}
