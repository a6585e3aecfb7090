//! Runs the `dsrctl` binary for what needs no registry: `pki init`, help, usage errors and
//! connection settings that cannot work, checking output and exit status.
//!
//! The RPC commands (submit, get, list, watch, cancel, extend) are tested against the real
//! registry and processor in the workspace's end-to-end suite,
//! `tests/tests/e2e/dsrctl_cli.rs`; `package` and `download` in `tests/tests/e2e/download.rs`.

use std::path::Path;
use std::process::Output;

use dsrelay_runtime::pki::{dev_identity, DEV_PARTIES};

mod support;
use support::{clear_settings, free_port, text};

/// Runs dsrctl in `cwd` with only the given `DSRCTL_*` variables set.
fn dsrctl(cwd: &Path, env: &[(&str, &str)], args: &[&str]) -> Output {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_dsrctl"));
    cmd.current_dir(cwd).args(args);
    clear_settings(&mut cmd);
    cmd.envs(env.iter().copied());
    cmd.output().expect("running dsrctl")
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
    // registry's audit checkpoint key, and its public half for verifiers; the example
    // recipient's receipt key, and its public half for the registry.
    let keys = doc["signing_keys"].as_array().unwrap();
    let parties: Vec<&str> = keys.iter().map(|k| k["party"].as_str().unwrap()).collect();
    assert_eq!(
        parties,
        ["registry", "registry-retailer", "processor", "recipient"]
    );
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
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stdout));
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
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stdout));
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

    // --output is no connection setting: it has a heading of its own, in every command.
    for args in [&["--help"][..], &["get", "--help"]] {
        let out = dsrctl(tmp.path(), &[], args);
        let help = text(&out.stdout);
        let output = help.find("Output:\n").expect("an Output heading");
        let flag = help.find("--output").expect("--output");
        let connection = help.find("Connection:\n").expect("a Connection heading");
        assert!(connection < output && output < flag, "{help}");
    }

    // A contract end needs a date or --now: the refusal names both.
    let out = dsrctl(
        tmp.path(),
        &[],
        &["contracts", "end", "--processor", "p", "--choice", "delete"],
    );
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    let said = text(&out.stderr);
    assert!(
        said.contains("--effective-at") && said.contains("--now"),
        "{said}"
    );

    // An operator's work list says it carries what the task is about.
    let out = dsrctl(tmp.path(), &[], &["tasks", "list", "--help"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let help = text(&out.stdout)
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ");
    assert!(
        help.contains("the scope") && help.contains("corrected values"),
        "{help}"
    );

    // Verifying needs the public key, and nothing else: no connection settings.
    let out = dsrctl(tmp.path(), &[], &["certificate", "verify", "cert.json"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("--public-key PUBKEY"),
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
        // Parties the development PKI does not have.
        &["pki", "init", "--install", "nosuch=x"],
        &["pki", "revoke", "nosuch"],
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
    // Refused before any file is written.
    assert!(!tmp.path().join(".dsrelay").exists());
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

/// A download into a folder that holds it finished asks the registry whether its package is
/// still that one, so it needs the connection settings (none here): it is not reported
/// finished without.
#[test]
fn a_finished_download_is_compared_with_the_registrys_package() {
    use sha2::Digest;
    let tmp = tempfile::tempdir().unwrap();
    let pkg = tmp.path().join("pkg");
    std::fs::create_dir_all(pkg.join("p/accounting")).unwrap();
    let data = b"id,name\n1,Maija\n";
    std::fs::write(pkg.join("p/accounting/a.csv"), data).unwrap();
    let manifest = serde_json::json!({
        "request_id": "r-1",
        "files": [{
            "path": "p/accounting/a.csv",
            "size": data.len(),
            "sha256": hex::encode(sha2::Sha256::digest(data)),
        }],
    });
    std::fs::write(pkg.join("manifest.json"), manifest.to_string()).unwrap();
    let out = dsrctl(tmp.path(), &[], &["download", "r-1", "--out", "pkg"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    assert!(out.stdout.is_empty(), "{}", text(&out.stdout));
}

/// `contracts choose` replaces the choice `none` (choose later): its help does not offer
/// it, and it is refused before any connection setting is needed (none here).
#[test]
fn contracts_choose_takes_no_none() {
    let tmp = tempfile::tempdir().unwrap();
    let out = dsrctl(tmp.path(), &[], &["contracts", "choose", "--help"]);
    assert_eq!(out.status.code(), Some(0));
    let help = text(&out.stdout);
    assert!(
        !help.contains("none:") && !help.contains("Choose later"),
        "{help}"
    );
    assert!(help.contains("return-then-delete"), "{help}");

    let choose = ["contracts", "choose", "c-1", "--choice", "none"];
    let out = dsrctl(tmp.path(), &[], &choose);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    let err = text(&out.stderr);
    assert!(
        err.contains("'none'") && err.contains("delete, return-then-delete"),
        "{err}"
    );

    // `contracts end` still takes it.
    let out = dsrctl(tmp.path(), &[], &["contracts", "end", "--help"]);
    assert!(text(&out.stdout).contains("Choose later"));
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
    assert_eq!(
        text(&out.stderr),
        "error: --zip old.zip already exists: name a new file, or move that one away and \
         run the command again\n"
    );

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

/// Starts `dsrctl dev up` in `cwd` on ports the system picks and returns what it printed up
/// to its last line, once both services listen.
fn dev_up(cwd: &Path, args: &[&str]) -> (support::DevUp, Vec<String>) {
    let ports = ["--registry-port", "0", "--processor-port", "0"];
    support::dev_up(cwd, &[&ports[..], args].concat())
}

/// The dsrctl under test, as its printed commands start it: outside the source tree, by its
/// path (which needs no quoting here).
fn program() -> String {
    let exe = std::fs::canonicalize(env!("CARGO_BIN_EXE_dsrctl")).unwrap();
    exe.to_str().unwrap().to_string()
}

/// The dsrctl arguments of every line printed that runs this dsrctl, with `<request id>`
/// replaced by `id`.
fn printed_commands(lines: &[String], id: &str) -> Vec<Vec<String>> {
    let prefix = format!("{} ", program());
    lines
        .iter()
        .filter_map(|l| l.trim_start().strip_prefix(&prefix))
        .map(|rest| {
            let rest = rest.replace("<request id>", id);
            rest.split_whitespace().map(String::from).collect()
        })
        .collect()
}

/// Whether a printed command calls the processor rather than the registry.
fn calls_the_processor(command: &[String]) -> bool {
    matches!(
        command.get(..2),
        Some([a, b]) if a == "tasks" || (a == "contracts" && b == "scheduled")
    )
}

/// Runs the printed commands from `cwd` as printed, `<request id>` being a request the
/// printed submit made, and the printed partner flags added to one of them; those that call
/// the processor reach it.
fn run_printed_commands(cwd: &Path, lines: &[String]) {
    let commands = printed_commands(lines, "");
    assert_eq!(commands.len(), 7, "{lines:#?}");
    let at_processor: Vec<_> = commands.iter().filter(|c| calls_the_processor(c)).collect();
    assert_eq!(at_processor.len(), 2, "{lines:#?}");
    let run = |args: &[String]| {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        dsrctl(cwd, &[], &args)
    };
    let mut submit = commands[0].clone();
    submit.extend(["--output".into(), "json".into()]);
    let out = run(&submit);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{submit:?}: {}",
        text(&out.stderr)
    );
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let id = doc["request_id"].as_str().expect("request id").to_string();
    // `watch` follows the request until it ends: the pair, on ports the system picked,
    // reaches itself and finishes it.
    for args in &printed_commands(lines, &id)[1..4] {
        let out = run(args);
        assert_eq!(
            out.status.code(),
            Some(0),
            "{args:?}: {}",
            text(&out.stderr)
        );
    }
    // The pair's processor is on a port the system picked, not dsrctl's default.
    for args in at_processor {
        assert!(args.contains(&"--processor".to_string()), "{args:?}");
        let out = run(args);
        assert_eq!(
            out.status.code(),
            Some(0),
            "{args:?}: {}",
            text(&out.stderr)
        );
    }
    let partner = lines
        .iter()
        .find_map(|l| l.strip_prefix("As a partner: add "))
        .expect("the partner's flags");
    let mut args = commands[3].clone();
    args.extend(partner.split_whitespace().map(String::from));
    let out = run(&args);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{args:?}: {}",
        text(&out.stderr)
    );
}

#[test]
fn dev_up_prints_commands_that_work_as_printed() {
    // Its folder elsewhere than ./.dsrelay, and a registry port other than dsrctl's default.
    let tmp = tempfile::tempdir().unwrap();
    let (cwd, dir) = (tmp.path().join("work"), tmp.path().join("dev"));
    std::fs::create_dir(&cwd).unwrap();
    let (_dev, lines) = dev_up(&cwd, &["--dir", dir.to_str().unwrap()]);
    let all = lines.join("\n");
    assert!(!all.contains("by default"), "{all}");
    // Started outside the source tree, where `cargo run` finds no dsrctl: this binary.
    assert!(!all.contains("cargo run -q -p dsrctl"), "{all}");
    run_printed_commands(&cwd, &lines);

    // The recipient's file names this folder's PKI, relative to the file.
    let recipient = std::fs::read_to_string(dir.join("recipient.toml")).unwrap();
    let recipient: toml::Value = toml::from_str(&recipient).unwrap();
    for file in ["ca", "cert", "key"] {
        let path = dir.join(recipient["tls"][file].as_str().unwrap());
        assert!(path.is_file(), "{}", path.display());
    }
    // dev up prints its folder's canonical path (a temporary folder may be under a link).
    let canonical = std::fs::canonicalize(&dir).unwrap();
    assert!(
        all.contains(&format!("--config {}/recipient.toml", canonical.display())),
        "{all}"
    );
}

/// The services dev up runs log to its standard output from threads of their own (each
/// SQLite connection's worker logs its statements, at trace level): dev up held standard
/// output locked for its whole run, so the first such line stopped that thread, and the
/// service waiting on it, for good (the migrations, before it ever listened).
#[test]
fn dev_up_serves_while_its_services_log_from_other_threads() {
    let tmp = tempfile::tempdir().unwrap();
    let ports = ["--registry-port", "0", "--processor-port", "0"];
    let env = [("RUST_LOG", "info,sqlx::query=trace")];
    let (_dev, lines) = support::dev_up_with(tmp.path(), &ports, &env);
    let mut submit = printed_commands(&lines, "")[0].clone();
    submit.extend(["--output".into(), "json".into()]);
    let args: Vec<&str> = submit.iter().map(String::as_str).collect();
    let out = dsrctl(tmp.path(), &[], &args);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
}

#[test]
fn dev_up_in_its_default_folder_prints_only_the_endpoint_it_needs() {
    let tmp = tempfile::tempdir().unwrap();
    let (_dev, lines) = dev_up(tmp.path(), &[]);
    let commands = printed_commands(&lines, "r-1");
    assert!(
        commands
            .iter()
            .all(|c| !c.contains(&"--config".to_string())),
        "{lines:#?}"
    );
    // The registry's endpoint on those that call it, the processor's on the others.
    for c in &commands {
        let needed = if calls_the_processor(c) {
            "--processor"
        } else {
            "--endpoint"
        };
        assert!(c.contains(&needed.to_string()), "{c:?}: {lines:#?}");
    }
    run_printed_commands(tmp.path(), &lines);
}

/// The port of the `listen` address in the folder's recipient.toml.
fn recipient_listen_port(dir: &Path) -> u16 {
    let file = std::fs::read_to_string(dir.join("recipient.toml")).unwrap();
    let file: toml::Value = toml::from_str(&file).unwrap();
    let listen = file["listen"].as_str().unwrap();
    listen.rsplit_once(':').unwrap().1.parse().unwrap()
}

/// dev up's mail-marketing stand-in answers an erasure NOT_FOUND, holding nothing, and gets
/// no deletion certificate; the example recipient moves with the processor's port, and the
/// registry's file, the recipient's file and the printed command agree on it.
#[test]
fn dev_up_s_stand_in_holds_nothing_and_its_recipient_moves_with_the_processor() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join(".dsrelay");
    let (registry, processor) = (free_port(), free_port());
    let ports = [registry.to_string(), processor.to_string()];
    let (dev, lines) = support::dev_up(
        tmp.path(),
        &["--registry-port", &ports[0], "--processor-port", &ports[1]],
    );
    let recipient = processor + 20;
    let endpoint = format!("https://localhost:{recipient}");
    let all = lines.join("\n");
    assert!(
        all.contains(&format!("example-recipient ({endpoint})")),
        "{all}"
    );
    assert!(!all.contains("DSRELAY_RECIPIENT__LISTEN"), "{all}");
    assert_eq!(recipient_listen_port(&dir), recipient);
    let file = std::fs::read_to_string(dir.join("registry.toml")).unwrap();
    let file: toml::Value = toml::from_str(&file).unwrap();
    assert_eq!(file["recipients"][0]["endpoint"].as_str(), Some(&*endpoint));

    let registry_endpoint = format!("https://localhost:{registry}");
    let run = |args: &[&str]| {
        let mut all = args.to_vec();
        all.extend(["--endpoint", &registry_endpoint]);
        dsrctl(tmp.path(), &[], &all)
    };
    let out = run(&[
        "submit",
        "--kind",
        "erasure",
        "--email",
        "maija.meikalainen@example.fi",
        "--output",
        "json",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let id = doc["request_id"].as_str().unwrap().to_string();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(90);
    let mail = loop {
        let out = run(&["get", &id, "--output", "json"]);
        assert!(out.status.success(), "{}", text(&out.stderr));
        let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let tasks = doc["tasks"].as_array().cloned().unwrap_or_default();
        let mail = tasks.iter().find(|t| t["subprocessor"] == "mail-marketing");
        if let Some(mail) = mail.filter(|t| t["state"] != "PENDING" && t["state"] != "IN_PROGRESS")
        {
            break mail.clone();
        }
        assert!(std::time::Instant::now() < deadline, "{doc:#}");
        std::thread::sleep(std::time::Duration::from_millis(200));
    };
    assert_eq!(mail["state"], "NOT_FOUND", "{mail:#}");
    assert_eq!(mail["records_affected"], 0, "{mail:#}");
    let note = mail["evidence_note"].as_str().unwrap();
    assert!(
        note.contains("stand-in") && note.contains("holds no data"),
        "{note}"
    );
    // No certificate claims an erasure at mail-marketing.
    let cert = tmp.path().join("mail.json");
    let out = run(&[
        "certificate",
        "get",
        &id,
        "--subprocessor",
        "mail-marketing",
        "--out",
        cert.to_str().unwrap(),
    ]);
    assert!(!out.status.success(), "{}", text(&out.stdout));
    assert!(!cert.exists());
    drop(dev);

    // A later start on another processor port: the registry sends to the recipient 20 above
    // it, and the printed command starts the recipient there, whatever its file says.
    let processor = free_port();
    let port = processor.to_string();
    let (_dev, lines) = support::dev_up(tmp.path(), &["--processor-port", &port]);
    let all = lines.join("\n");
    let moved = processor + 20;
    assert!(
        all.contains(&format!("example-recipient (https://localhost:{moved})")),
        "{all}"
    );
    // The recipient beside this dsrctl, or cargo's when it was not built.
    let beside = Path::new(&program()).with_file_name("dsrelay-example-recipient");
    let recipient = if beside.is_file() {
        beside.to_str().unwrap().to_string()
    } else {
        "cargo run -q -p dsrelay-example-recipient --".to_string()
    };
    let listen = format!("DSRELAY_RECIPIENT__LISTEN=127.0.0.1:{moved} {recipient} --config");
    assert!(all.contains(&listen), "{all}");
}

#[test]
fn dev_up_takes_no_connection_flags_and_hides_them() {
    let tmp = tempfile::tempdir().unwrap();
    // A file for its folder: a dev up that went ahead would fail at once, with exit 1.
    std::fs::write(tmp.path().join("file"), b"").unwrap();
    for (flag, value) in [
        ("--endpoint", "https://h:1"),
        ("--crl", "crl.pem"),
        ("--server-identity", "spiffe://x/y"),
        ("--config", "c.toml"),
    ] {
        let args = ["dev", "up", "--dir", "file", flag, value];
        let out = dsrctl(tmp.path(), &[], &args);
        assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
        assert!(
            text(&out.stderr).starts_with(&format!("error: dev up takes no {flag}:")),
            "{}",
            text(&out.stderr)
        );
    }

    // Nor --output: it prints no result.
    let out = dsrctl(
        tmp.path(),
        &[],
        &["--output", "json", "dev", "up", "--dir", "file"],
    );
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).starts_with("error: dev up takes no --output"),
        "{}",
        text(&out.stderr)
    );

    let out = dsrctl(tmp.path(), &[], &["dev", "up", "--help"]);
    assert_eq!(out.status.code(), Some(0));
    let help = text(&out.stdout);
    for flag in ["--endpoint", "--ca", "--cert", "--key", "--config"] {
        assert!(!help.contains(flag), "{flag} in\n{help}");
    }
    assert!(help.contains("--registry-port"), "{help}");
}

/// A partner certificate `dsrctl pki revoke` listed before `dev up` started is refused by
/// its registry.
#[test]
fn a_dev_up_pair_checks_the_revocation_list_pki_revoke_wrote() {
    let tmp = tempfile::tempdir().unwrap();
    let out = dsrctl(tmp.path(), &[], &["pki", "init"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let out = dsrctl(tmp.path(), &[], &["pki", "revoke", "partner-webform"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("dsrctl dev up"),
        "{}",
        text(&out.stderr)
    );
    let (_dev, lines) = dev_up(tmp.path(), &[]);
    let commands = printed_commands(&lines, "r-1");
    let list = commands
        .iter()
        .find(|c| c[..2] == ["list", "--overdue"])
        .expect("a list command");
    let run = |extra: &[&str]| {
        let mut args: Vec<&str> = list.iter().map(String::as_str).collect();
        args.extend(extra);
        dsrctl(tmp.path(), &[], &args)
    };
    let pki = ".dsrelay/pki";
    let partner = |stem: &str| {
        let (cert, key) = (format!("{pki}/{stem}.pem"), format!("{pki}/{stem}.key"));
        run(&["--cert", &cert, "--key", &key])
    };
    assert_eq!(run(&[]).status.code(), Some(0));
    let out = partner("partner-crm");
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let out = partner("partner-webform");
    assert_ne!(out.status.code(), Some(0), "a revoked partner got in");
}

/// The processor's operator reaches the processor with TLS files given outright and its
/// identity, without the registry's.
#[test]
fn processor_calls_need_no_registry_identity() {
    let tmp = tempfile::tempdir().unwrap();
    let (_dev, lines) = dev_up(tmp.path(), &[]);
    let commands = printed_commands(&lines, "r-1");
    let pki = ".dsrelay/pki";
    let tasks = commands
        .iter()
        .find(|c| c[..2] == ["tasks", "list"])
        .expect("a tasks command");
    let mut args: Vec<&str> = tasks.iter().map(String::as_str).collect();
    let files = [
        ("--ca", format!("{pki}/ca.pem")),
        ("--cert", format!("{pki}/operator.pem")),
        ("--key", format!("{pki}/operator.key")),
    ];
    for (flag, file) in &files {
        args.extend([*flag, file.as_str()]);
    }
    let out = dsrctl(tmp.path(), &[], &args);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).starts_with("error: no processor identity"),
        "{}",
        text(&out.stderr)
    );
    let identity = [
        "--processor-identity",
        "spiffe://dsrelay.dev/processor/payroll-bureau",
    ];
    args.extend(identity);
    let out = dsrctl(tmp.path(), &[], &args);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    // The processor's own audit trail, the same way.
    let at = tasks
        .windows(2)
        .find(|w| w[0] == "--processor")
        .expect("--processor");
    let mut args = vec!["audit", "verify", "--processor", at[1].as_str()];
    for (flag, file) in &files {
        args.extend([*flag, file.as_str()]);
    }
    args.extend(identity);
    let out = dsrctl(tmp.path(), &[], &args);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).starts_with("audit trail intact"),
        "{}",
        text(&out.stdout)
    );
}

#[test]
fn certificate_verify_s_help_names_a_public_key() {
    let tmp = tempfile::tempdir().unwrap();
    let out = dsrctl(tmp.path(), &[], &["certificate", "verify", "--help"]);
    assert_eq!(out.status.code(), Some(0));
    let help = text(&out.stdout);
    assert!(help.contains("--public-key <PUBKEY>"), "{help}");
    assert!(!help.contains("private key"), "{help}");
    assert!(!help.contains("DSRCTL_KEY]"), "{help}");
    // Both spellings reach the key: a missing file is read, whichever named it.
    for flag in ["--public-key", "--key"] {
        let out = dsrctl(
            tmp.path(),
            &[],
            &["certificate", "verify", "cert.json", flag, "nosuch.pem"],
        );
        assert_eq!(out.status.code(), Some(1), "{flag}");
        assert!(
            text(&out.stderr).contains("nosuch.pem"),
            "{flag}: {}",
            text(&out.stderr)
        );
    }
}
