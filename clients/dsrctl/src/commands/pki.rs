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
    // Before anything is created: a party the PKI does not have is a mistyped argument.
    if let Some((stem, _)) = args.install.iter().find(|(stem, _)| !is_party(stem)) {
        return Err(unknown_party(
            stem,
            "--install takes STEM=DIR for one of these",
        ));
    }
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
        if !is_party(party) {
            return Err(unknown_party(party, "name other certificates with --file"));
        }
        certs.push(pki.cert(party));
    }
    let listed_before = pki.crl().exists();
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
    if !listed_before {
        // Services load the lists their `tls.crls` name when they start, and `dev up` names
        // this one only when it is there then.
        writeln!(
            io.err,
            "a `dsrctl dev up` pair whose --dir holds this PKI checks {} from its next start: \
             restart one that runs now",
            pki.crl().display()
        )?;
    }
    Ok(0)
}

fn is_party(stem: &str) -> bool {
    DEV_PARTIES.iter().any(|(s, _, _)| *s == stem)
}

/// The usage error for `stem`, no party of the development PKI; `what_else` says how to go on.
fn unknown_party(stem: &str, what_else: &str) -> Failure {
    let known: Vec<&str> = DEV_PARTIES.iter().map(|(s, _, _)| *s).collect();
    Failure::Usage(format!(
        "{stem:?} is not a party of the development PKI ({}); {what_else}",
        known.join(", ")
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::OutputFormat;

    fn init_installing(root: &std::path::Path, install: &[(&str, &str)]) -> Result<u8, Failure> {
        let args = PkiInitArgs {
            dir: "pki".into(),
            dns_names: Vec::new(),
            install: install
                .iter()
                .map(|(stem, dir)| (stem.to_string(), dir.to_string()))
                .collect(),
        };
        let env = Environment::new(Vec::<(String, String)>::new(), root);
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let mut io = Io {
            out: &mut out,
            err: &mut err,
            format: OutputFormat::Json,
        };
        init(&args, &env, &mut io)
    }

    /// A registry installed apart checks the example recipient's signed receipts, as its
    /// `[[recipients]] public_key` in `dev up`'s registry.toml does: it needs that public key
    /// beside the processors', and never the recipient's private key.
    #[test]
    fn a_registry_installed_apart_gets_the_recipient_s_public_key() {
        let tmp = tempfile::tempdir().unwrap();
        let code = init_installing(tmp.path(), &[("registry", "own")]).map_err(|f| f.message());
        assert_eq!(code, Ok(0));
        let pki = DevPki {
            dir: tmp.path().join("pki"),
        };
        let own = DevPki {
            dir: tmp.path().join("own"),
        };
        for party in ["recipient", "processor", "registry"] {
            assert_eq!(
                std::fs::read_to_string(own.signing_public_key(party)).ok(),
                std::fs::read_to_string(pki.signing_public_key(party)).ok(),
                "{party}"
            );
        }
        assert!(!own.signing_key("recipient").exists());
        assert!(!own.key("recipient").exists());
        // A party that checks no receipts gets no recipient key.
        let code = init_installing(tmp.path(), &[("processor", "proc")]).map_err(|f| f.message());
        assert_eq!(code, Ok(0));
        let proc = DevPki {
            dir: tmp.path().join("proc"),
        };
        assert!(!proc.signing_public_key("recipient").exists());
        assert!(proc.signing_public_key("processor").exists());
    }
}
