//! `dsrctl pki init`.

use dsrelay_sdk::runtime::pki::{dev_identity, DevPki, DEV_PARTIES};

use crate::cli::PkiInitArgs;
use crate::commands::Io;
use crate::output::{emit, PkiInstalledView, PkiPartyView, PkiSigningKeyView, PkiView};
use crate::settings::Environment;
use crate::Failure;

/// Creates the development PKI unless it is there, and prints its files and identities.
pub(crate) fn init(args: &PkiInitArgs, env: &Environment, io: &mut Io<'_>) -> Result<u8, Failure> {
    let dir = env.cwd().join(&args.dir);
    // `ensure` keeps an existing set; say which happened so nobody expects fresh keys.
    let existed = dir.join("ca.pem").exists();
    let pki = DevPki::ensure_with_dns_names(&dir, &args.dns_names).map_err(Failure::Setup)?;
    let mut installed = Vec::new();
    for (stem, target) in &args.install {
        let target = env.cwd().join(target);
        let set = pki.install(stem, &target).map_err(Failure::Setup)?;
        installed.push(PkiInstalledView {
            party: stem.clone(),
            dir: set.dir.display().to_string(),
        });
    }
    let view = PkiView {
        dir: pki.dir.display().to_string(),
        created: !existed,
        ca: pki.ca().display().to_string(),
        parties: DEV_PARTIES
            .iter()
            .map(|(stem, role, name)| PkiPartyView {
                party: stem.to_string(),
                identity: dev_identity(role, name),
                cert: pki.cert(stem).display().to_string(),
                key: pki.key(stem).display().to_string(),
            })
            .collect(),
        signing_keys: DEV_PARTIES
            .iter()
            .filter(|(stem, _, _)| pki.signing_key(stem).exists())
            .map(|(stem, _, _)| PkiSigningKeyView {
                party: stem.to_string(),
                key: pki.signing_key(stem).display().to_string(),
                public_key: pki.signing_public_key(stem).display().to_string(),
            })
            .collect(),
        installed,
    };
    emit(io.out, io.format, &view, false)?;
    Ok(0)
}
