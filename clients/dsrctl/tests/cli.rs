//! Runs the `dsrctl` binary for what needs no registry: `pki init`, help, usage errors and
//! connection settings that cannot work, checking output and exit status.
//!
//! The RPC commands (submit, get, list, watch, cancel, extend) are tested against the real
//! registry and processor in the workspace's end-to-end suite,
//! `tests/tests/e2e/dsrctl_cli.rs`; `package` and `download` in `tests/tests/e2e/download.rs`.

use std::path::Path;
use std::process::Output;

use dsrelay_runtime::pki::{dev_identity, DEV_PARTIES};

const ENV_NAMES: [&str; 7] = [
    "DSRCTL_CRL",
    "DSRCTL_ENDPOINT",
    "DSRCTL_CA",
    "DSRCTL_CERT",
    "DSRCTL_KEY",
    "DSRCTL_SERVER_IDENTITY",
    "DSRCTL_CONFIG",
];

/// Runs dsrctl in `cwd` with only the given `DSRCTL_*` variables set.
fn dsrctl(cwd: &Path, env: &[(&str, &str)], args: &[&str]) -> Output {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_dsrctl"));
    cmd.current_dir(cwd).args(args);
    for name in ENV_NAMES {
        cmd.env_remove(name);
    }
    cmd.envs(env.iter().copied());
    cmd.output().expect("running dsrctl")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn pki_init_creates_the_files_and_lists_identities() {
    let tmp = tempfile::tempdir().unwrap();
    let out = dsrctl(tmp.path(), &[], &["pki", "init", "--dir", "pki"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(stdout.starts_with("created a development PKI"), "{stdout}");
    for file in ["ca.pem", "ca.key"] {
        assert!(tmp.path().join("pki").join(file).is_file(), "{file}");
    }
    for (stem, role, name) in DEV_PARTIES {
        assert!(tmp.path().join(format!("pki/{stem}.pem")).is_file());
        assert!(tmp.path().join(format!("pki/{stem}.key")).is_file());
        assert!(stdout.contains(&dev_identity(role, name)), "{stdout}");
    }

    // A second run keeps the files; JSON output is one document.
    let ca_before = std::fs::read(tmp.path().join("pki/ca.pem")).unwrap();
    let out = dsrctl(
        tmp.path(),
        &[],
        &["pki", "init", "--dir", "pki", "--output", "json"],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["created"], false);
    assert_eq!(doc["parties"].as_array().unwrap().len(), DEV_PARTIES.len());
    // The processor's deletion-certificate key, and its public half for the registry; each
    // registry's audit checkpoint key, and its public half for verifiers.
    let keys = doc["signing_keys"].as_array().unwrap();
    let parties: Vec<&str> = keys.iter().map(|k| k["party"].as_str().unwrap()).collect();
    assert_eq!(parties, ["registry", "registry-retailer", "processor"]);
    for k in keys {
        for file in ["key", "public_key"] {
            let path = k[file].as_str().unwrap();
            assert!(std::path::Path::new(path).is_file(), "{path}");
        }
    }
    assert_eq!(
        std::fs::read(tmp.path().join("pki/ca.pem")).unwrap(),
        ca_before
    );
}

#[test]
fn pki_init_installs_a_party_s_own_files_apart() {
    let tmp = tempfile::tempdir().unwrap();
    let out = dsrctl(
        tmp.path(),
        &[],
        &[
            "pki",
            "init",
            "--dir",
            "pki",
            "--install",
            "processor=own",
            "--output",
            "json",
        ],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["installed"][0]["party"], "processor");
    let own = tmp.path().join("own");
    assert!(own.join("processor.key").is_file());
    assert!(own.join("processor-signing.key").is_file());
    assert!(
        !own.join("ca.key").exists(),
        "the CA key must stay in the full set"
    );
    assert!(!own.join("registry.key").exists());
    assert_eq!(
        std::fs::read(own.join("ca.pem")).unwrap(),
        std::fs::read(tmp.path().join("pki/ca.pem")).unwrap()
    );

    let out = dsrctl(tmp.path(), &[], &["pki", "init", "--install", "nobody=x"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stdout));
    assert!(
        text(&out.stderr).contains("not a party"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn pki_revoke_lists_certificates_in_the_ca_s_revocation_list() {
    let tmp = tempfile::tempdir().unwrap();
    let out = dsrctl(tmp.path(), &[], &["pki", "init", "--dir", "pki"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let serial = |stem: &str| {
        let pem = std::fs::read(tmp.path().join(format!("pki/{stem}.pem"))).unwrap();
        hex::encode(dsrelay_runtime::pki::serial_of(&pem).unwrap())
    };
    let out = dsrctl(
        tmp.path(),
        &[],
        &[
            "pki",
            "revoke",
            "--dir",
            "pki",
            "partner-crm",
            "--output",
            "json",
        ],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["revoked"], serde_json::json!([serial("partner-crm")]));
    // A certificate named by its file joins the entries already there.
    let out = dsrctl(
        tmp.path(),
        &[],
        &[
            "pki",
            "revoke",
            "--dir",
            "pki",
            "--file",
            "pki/operator.pem",
        ],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(stdout.contains(&serial("partner-crm")), "{stdout}");
    assert!(stdout.contains(&serial("operator")), "{stdout}");
    let crl = std::fs::read(tmp.path().join("pki/crl.pem")).unwrap();
    assert_eq!(
        dsrelay_runtime::pki::revoked_in(&crl).unwrap().len(),
        2,
        "{stdout}"
    );

    let out = dsrctl(tmp.path(), &[], &["pki", "revoke", "--dir", "pki", "ca"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stdout));
    assert!(
        text(&out.stderr).contains("not a party"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn help_names_the_commands_settings_and_exit_status() {
    let tmp = tempfile::tempdir().unwrap();
    let out = dsrctl(tmp.path(), &[], &["--help"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    for expected in [
        "submit",
        "get",
        "list",
        "watch",
        "cancel",
        "extend",
        "pki",
        "package",
        "download",
        "certificate",
        "--endpoint",
        "--config",
        "DSRCTL_ENDPOINT",
        "Exit status:",
    ] {
        assert!(stdout.contains(expected), "{expected:?} in\n{stdout}");
    }

    // Verifying needs the public key, and nothing else: no connection settings.
    let out = dsrctl(tmp.path(), &[], &["certificate", "verify", "cert.json"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("--key PUBKEY"),
        "{}",
        text(&out.stderr)
    );

    // No subcommand: clap's usage error.
    let out = dsrctl(tmp.path(), &[], &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("Usage:"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn usage_errors_exit_2() {
    // No PKI here either: usage errors come before any connection setting is needed.
    let tmp = tempfile::tempdir().unwrap();
    for args in [
        &["submit", "--kind", "erasure"][..],
        &["submit", "--kind", "transfer", "--email", "a@b.fi"],
        &["submit", "--kind", "rectification", "--email", "a@b.fi"],
        &["list", "--limit", "0"],
        &["extend", "r-1", "--months", "3", "--reason", "x"],
        &["get"],
        &["package"],
        &["download", "r-1"],
        &["download", "r-1", "--out", "d", "--zip", "p.zip"],
        &[
            "submit",
            "--kind",
            "erasure",
            "--email",
            "a@b.fi",
            "--idempotency-key",
            "",
        ],
        &[
            "submit",
            "--kind",
            "erasure",
            "--email",
            "a@b.fi",
            "--idempotency-key",
            "  ",
        ],
    ] {
        let out = dsrctl(tmp.path(), &[], args);
        assert_eq!(
            out.status.code(),
            Some(2),
            "{args:?}: {}",
            text(&out.stderr)
        );
        assert!(out.stdout.is_empty(), "{args:?}");
    }
    let out = dsrctl(
        tmp.path(),
        &[],
        &["submit", "--kind", "erasure", "--email", "a@b.fi", "--lift"],
    );
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(
        text(&out.stderr),
        "error: --lift is only for --kind restriction\n"
    );
}

#[test]
fn download_refuses_a_destination_with_files_before_connecting() {
    // No PKI here: the destination is checked before any connection setting is needed.
    let tmp = tempfile::tempdir().unwrap();
    std::fs::create_dir(tmp.path().join("full")).unwrap();
    std::fs::write(tmp.path().join("full/keep.txt"), b"mine").unwrap();
    std::fs::write(tmp.path().join("old.zip"), b"mine").unwrap();

    let out = dsrctl(tmp.path(), &[], &["download", "r-1", "--out", "full"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert_eq!(text(&out.stderr), "error: --out full is not empty\n");

    let out = dsrctl(tmp.path(), &[], &["download", "r-1", "--zip", "old.zip"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert_eq!(text(&out.stderr), "error: --zip old.zip already exists\n");

    assert_eq!(
        std::fs::read(tmp.path().join("full/keep.txt")).unwrap(),
        b"mine"
    );
    assert_eq!(std::fs::read(tmp.path().join("old.zip")).unwrap(), b"mine");

    // A new folder passes the check and the command goes on to need a connection.
    let out = dsrctl(tmp.path(), &[], &["download", "r-1", "--out", "new"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("dsrctl pki init"),
        "{}",
        text(&out.stderr)
    );
    assert!(!tmp.path().join("new").exists());
}

#[test]
fn settings_that_cannot_work_exit_1() {
    let tmp = tempfile::tempdir().unwrap();

    let out = dsrctl(
        tmp.path(),
        &[("DSRCTL_CONFIG", "missing.toml")],
        &["get", "r-1"],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).starts_with("error: reading config file"),
        "{}",
        text(&out.stderr)
    );

    std::fs::write(tmp.path().join("typo.toml"), "endpont = \"https://h:1\"\n").unwrap();
    let out = dsrctl(tmp.path(), &[], &["list", "--config", "typo.toml"]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    assert!(
        stderr.starts_with("error: parsing config file") && stderr.contains("endpont"),
        "{stderr}"
    );

    // No certificate anywhere and no dev PKI.
    let out = dsrctl(tmp.path(), &[], &["get", "r-1"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("dsrctl pki init"));

    // Only some of the TLS settings.
    let out = dsrctl(tmp.path(), &[("DSRCTL_CA", "ca.pem")], &["get", "r-1"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("cert, key missing"),
        "{}",
        text(&out.stderr)
    );

    // TLS files that are not there.
    let out = dsrctl(
        tmp.path(),
        &[],
        &[
            "get",
            "r-1",
            "--ca",
            "ca.pem",
            "--cert",
            "me.pem",
            "--key",
            "me.key",
            "--server-identity",
            "spiffe://dsrelay.dev/registry/controller",
        ],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).starts_with("error: loading the TLS files"),
        "{}",
        text(&out.stderr)
    );
}
