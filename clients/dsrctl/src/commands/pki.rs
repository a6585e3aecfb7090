//! `dsrctl pki init` and `dsrctl pki revoke`.

use std::time::{Duration, SystemTime};

use dsrelay_sdk::runtime::pki::{dev_identity, DevPki, DEV_PARTIES};

use crate::cli::{PkiInitArgs, PkiRevokeArgs};
use crate::commands::Io;
use crate::output::{emit, CrlView, PkiInstalledView, PkiPartyView, PkiSigningKeyView, PkiView};
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

/// Adds the named parties' and files' certificates to the development CA's revocation list
/// and prints every entry of the new list.
pub(crate) fn revoke(
    args: &PkiRevokeArgs,
    env: &Environment,
    io: &mut Io<'_>,
) -> Result<u8, Failure> {
    let pki = DevPki {
        dir: env.cwd().join(&args.dir),
    };
    let mut certs = Vec::new();
    for party in &args.parties {
        if !DEV_PARTIES.iter().any(|(stem, _, _)| stem == party) {
            let known: Vec<&str> = DEV_PARTIES.iter().map(|(s, _, _)| *s).collect();
            return Err(Failure::Setup(anyhow::anyhow!(
                "{party:?} is not a party of the development PKI ({}); name other \
                 certificates with --file",
                known.join(", ")
            )));
        }
        certs.push(pki.cert(party));
    }
    certs.extend(args.certs.iter().map(|c| env.cwd().join(c)));
    let valid_for = Duration::from_secs(u64::from(args.days) * 86_400);
    let next_update = SystemTime::now() + valid_for;
    let revoked = pki.revoke(&certs, valid_for).map_err(Failure::Setup)?;
    let view = CrlView {
        crl: pki.crl().display().to_string(),
        next_update: chrono::DateTime::<chrono::Utc>::from(next_update)
            .to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        revoked: revoked.iter().map(|r| hex::encode(&r.serial)).collect(),
    };
    emit(io.out, io.format, &view, false)?;
    Ok(0)
}
