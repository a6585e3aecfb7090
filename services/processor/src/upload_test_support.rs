//! What the upload and transfer tests share: a processor's configuration with one `noop`
//! subprocessor, a party served over mutual TLS with its development certificate, and export
//! files written as a connector leaves them.

use dsrelay_connectors::ExportedFile;
use dsrelay_runtime::pki::DevPki;
use sha2::{Digest, Sha256};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tonic::service::Routes;

use crate::app::Shared;
use crate::store::TaskKey;
use crate::Config;

/// A processor's configuration in `dir` on `database_url`, with one `noop` subprocessor
/// `crm` and one controller `acme` whose registry is at `registry_endpoint`; `uploads` is the
/// body of its `[uploads]` table (TOML lines, may be empty).
pub(crate) fn config(
    dir: &std::path::Path,
    database_url: &str,
    registry_endpoint: &str,
    uploads: &str,
) -> Config {
    let pki = DevPki::ensure(&dir.join("pki")).expect("dev pki");
    let checkpoint_key = pki.signing_key("processor");
    let checkpoint_file = dir.join("audit/checkpoints.jsonl");
    let tls = pki.files("processor");
    let text = format!(
        "database_url = {database_url:?}\ndata_dir = {:?}\nidentity_hash_key = \"k\"\n\
         [tls]\nca = {:?}\ncert = {:?}\nkey = {:?}\n\
         [audit]\ncheckpoint_key = {checkpoint_key:?}\ncheckpoint_file = {checkpoint_file:?}\n\
         [uploads]\n{uploads}\n\
         [[subprocessors]]\nname = \"crm\"\ncategories = [\"contact\"]\n\
         connector = {{ type = \"noop\" }}\n\
         [[controllers]]\nname = \"acme\"\n\
         identity = \"spiffe://dsrelay.dev/registry/controller\"\n\
         registry_endpoint = {registry_endpoint:?}\n",
        dir.join("data"),
        tls.ca,
        tls.cert,
        tls.key,
    );
    let file = dir.join("processor.toml");
    std::fs::write(&file, text).expect("config file");
    Config::load_from(Some(&file), Vec::new()).expect("config")
}

/// Serves `routes` on a port of 127.0.0.1 with the development PKI's certificate of
/// `party` (`registry`, `recipient`): the port, and what stops it.
pub(crate) async fn serve(
    dir: &std::path::Path,
    party: &str,
    routes: Routes,
) -> (u16, oneshot::Sender<()>) {
    let pki = DevPki::ensure(&dir.join("pki")).expect("dev pki");
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let tls = pki.files(party).server_config().expect("server tls");
    let router = dsrelay_runtime::server::builder(tls)
        .expect("server")
        .add_routes(routes);
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(dsrelay_runtime::server::serve(router, listener, async {
        let _ = stopped.await;
    }));
    (port, stop)
}

/// Writes the file `name` of `size` bytes into `key`'s export folder; answers its record.
pub(crate) fn write_file(shared: &Shared, key: &TaskKey, name: &str, size: u64) -> ExportedFile {
    let dir = crate::exports::task_dir(&shared.config.data_dir, key);
    std::fs::create_dir_all(&dir).expect("export folder");
    let content = vec![b'x'; usize::try_from(size).expect("a test file's size")];
    std::fs::write(dir.join(name), &content).expect("export file");
    ExportedFile {
        name: name.into(),
        media_type: "application/json".into(),
        categories: vec!["contact".into()],
        size,
        sha256: hex::encode(Sha256::digest(&content)),
    }
}
