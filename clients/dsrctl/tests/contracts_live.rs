//! Runs the `dsrctl` binary's contract commands against the real registry and processor that
//! `dsrctl dev up` starts (the sample accounting database as a subprocessor): the answer to a
//! name nobody configured, what `contracts choose` prints, and what a part that kept records
//! shows once done, at the registry and at the processor.

use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

mod support;
use support::{clear_settings, free_port, text, DevUp};

/// How long the contract end may take to reach a state the test waits for.
const PATIENCE: Duration = Duration::from_secs(90);

/// The pair dev up runs, and how dsrctl reaches it as the operator.
struct Pair {
    _dev: DevUp,
    _tmp: tempfile::TempDir,
    cwd: PathBuf,
    config: String,
    registry: String,
    processor: String,
}

impl Pair {
    fn start() -> Self {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("dev");
        let (registry, processor) = (free_port(), free_port());
        let ports = [registry.to_string(), processor.to_string()];
        let (dev, _) = support::dev_up(
            tmp.path(),
            &[
                "--dir",
                dir.to_str().expect("utf-8"),
                "--registry-port",
                &ports[0],
                "--processor-port",
                &ports[1],
            ],
        );
        Self {
            _dev: dev,
            cwd: tmp.path().to_path_buf(),
            config: dir.join("dsrctl.toml").display().to_string(),
            _tmp: tmp,
            registry: format!("https://localhost:{registry}"),
            processor: format!("https://localhost:{processor}"),
        }
    }

    fn run(&self, args: &[&str], endpoint: [&str; 2]) -> Output {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_dsrctl"));
        cmd.current_dir(&self.cwd)
            .args(args)
            .args(["--config", &self.config])
            .args(endpoint)
            .stdin(Stdio::null());
        clear_settings(&mut cmd);
        support::as_installed(&mut cmd);
        cmd.output().expect("running dsrctl")
    }

    /// dsrctl `args` against the registry.
    fn registry(&self, args: &[&str]) -> Output {
        self.run(args, ["--endpoint", &self.registry])
    }

    /// dsrctl `args` against the processor's operator API.
    fn processor(&self, args: &[&str]) -> Output {
        self.run(args, ["--processor", &self.processor])
    }

    /// `contracts show ID --output json`, asked until `done` holds of it, which it returns.
    fn show_until(
        &self,
        id: &str,
        what: &str,
        done: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let out = self.registry(&["contracts", "show", id, "--output", "json"]);
            assert!(out.status.success(), "{}", text(&out.stderr));
            let view: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
            if done(&view) {
                return view;
            }
            assert!(
                Instant::now() < deadline,
                "{what} within {PATIENCE:?}: {view}"
            );
            std::thread::sleep(Duration::from_millis(300));
        }
    }
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    text(&out.stdout)
}

#[test]
fn contract_views_say_what_is_true() {
    let pair = Pair::start();

    // A name nobody configured is not a processor or a controller without contract ends.
    let out = pair.registry(&["contracts", "list", "--processor", "nobody"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let stderr = text(&out.stderr);
    for words in [
        "no processor named \"nobody\" is configured",
        "configured processors: payroll-bureau",
    ] {
        assert!(stderr.contains(words), "{words} in {stderr}");
    }
    let out = pair.processor(&["contracts", "scheduled", "--controller", "nobody"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let stderr = text(&out.stderr);
    for words in [
        "no controller named \"nobody\" is configured",
        "configured controllers: controller",
    ] {
        assert!(stderr.contains(words), "{words} in {stderr}");
    }
    // A configured name without any is answered as before.
    let none = ok(&pair.registry(&["contracts", "list", "--processor", "payroll-bureau"]));
    assert_eq!(none, "no contract ends\n");

    let ended = ok(&pair.registry(&[
        "contracts",
        "end",
        "--processor",
        "payroll-bureau",
        "--choice",
        "none",
        "--now",
        "--output",
        "json",
    ]));
    let ended: serde_json::Value = serde_json::from_str(&ended).expect("json");
    let id = ended["contract_id"].as_str().expect("id").to_string();
    let grace_ends = ended["grace_ends_at"]
        .as_str()
        .expect("grace end")
        .to_string();
    // The processor has scheduled every part for the end of the grace period.
    pair.show_until(&id, "the parts scheduled", |v| {
        let tasks = v["tasks"].as_array().cloned().unwrap_or_default();
        !tasks.is_empty()
            && tasks
                .iter()
                .all(|t| t["scheduled_at"].as_str() == Some(grace_ends.as_str()))
    });

    // The choice moves the start; what the registry holds of the parts is from before it.
    let chosen = ok(&pair.registry(&["contracts", "choose", &id, "--choice", "delete"]));
    assert!(chosen
        .lines()
        .any(|l| l.starts_with("choice") && l.contains("DELETE")));
    // The grace end as the table writes a date: no part is shown scheduled then.
    let grace_line = (chosen.lines())
        .find(|l| l.starts_with("grace ends"))
        .expect("the grace end");
    let date = grace_line["grace ends".len()..].trim();
    assert!(!date.is_empty(), "{chosen}");
    let dated: Vec<&str> = chosen.lines().filter(|l| l.contains(date)).collect();
    assert_eq!(dated, [grace_line], "{chosen}");
    assert!(
        chosen.contains(&format!(
            "once it has the choice, or refuses it for a part already started; dsrctl \
             contracts show {id}"
        )),
        "{chosen}"
    );

    // Done: the sample keeps invoices and ledger entries under the accounting act.
    let view = pair.show_until(&id, "the contract end finished", |v| {
        v["state"] == "PARTIALLY_COMPLETED"
    });
    let part = (view["tasks"].as_array().expect("tasks").iter())
        .find(|t| t["subprocessor"] == "accounting")
        .expect("the accounting part")
        .clone();
    assert_eq!(
        (&part["state"], &part["phase"]),
        (&"RETAINED".into(), &"DONE".into())
    );
    // Every record handled, the kept ones too: counted as handled, never as erased.
    let (done, total) = (
        part["records_done"].as_u64().expect("records done"),
        part["records_total"].as_u64().expect("records total"),
    );
    assert!(done > 0 && done == total, "{view}");
    let cell = format!("{done}/{total} handled, some kept");
    let table = ok(&pair.registry(&["contracts", "show", &id]));
    let row = (table.lines())
        .find(|l| l.starts_with("accounting"))
        .expect("the accounting row");
    assert!(row.contains(&cell), "{table}");
    // The processor's own view says the same.
    let scheduled = ok(&pair.processor(&["contracts", "scheduled"]));
    let row = (scheduled.lines())
        .find(|l| l.contains("accounting"))
        .expect("the accounting row");
    assert!(row.contains(&cell), "{scheduled}");
}
