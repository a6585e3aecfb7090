//! The chaos test in its short form: `dsrelay-bench chaos` (the real binaries, SIGKILLs of
//! the registry, the processor and, on PostgreSQL, of a database server the run starts
//! itself) with 300 erasures and 6 kills, which must end in PASS: every accepted Submit
//! final, none lost, none duplicated, every holder's row deleted exactly once, no other row
//! touched, no task reporting COMPLETED over a row still there.
//! `scripts/bench.sh --chaos` runs the full form (2,000 erasures, 20 kills).
//!
//! The replicated form runs two registry and three processor replicas on one PostgreSQL
//! database, each service behind a load balancer, with 200 erasures and 6 kills of single
//! replicas or of the database server; besides the above it must show connector calls
//! within what the kills explain and every acknowledgement received and applied once.
//!
//! No false outcome is tolerated: a task whose first connector attempt deleted the row but
//! whose outcome was never stored (the processor or its database killed in between) answers
//! from the SQL connector's erasure receipt on its retry, not NOT_FOUND (issue 12 point 3).

use std::process::Output;
use std::time::Duration;

use crate::harness::binary;

/// The longest a short run may take before the test stops it and fails: a guard against a
/// hang, not a performance goal (a run took 50 to 80 s on a loaded 2-core machine; nextest
/// gives each chaos test the machine to itself, see `.config/nextest.toml`).
const BOUND: Duration = Duration::from_secs(150);
/// The same for the replicated run: five services and their database on a shared machine
/// took 50 to 80 s.
const REPLICATED_BOUND: Duration = Duration::from_secs(200);

/// Runs `dsrelay-bench chaos` with the short form's numbers, `requests` erasures and
/// `extra`, and fails unless it passed having made every kill within `bound`.
async fn short_chaos_run(requests: u32, extra: &[&str], bound: Duration) {
    let mut command = tokio::process::Command::new(binary("dsrelay-bench"));
    command
        .args([
            "chaos",
            "--requests",
            &requests.to_string(),
            "--kills",
            "6",
            // 10 s of Submits, so that most kills fall while they arrive.
            "--rate",
            "30",
            "--kill-gap-ms",
            "1000",
            "--max-pause-ms",
            "500",
            "--drain-secs",
            "60",
        ])
        .args(extra)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    let child = command.spawn().expect("starting dsrelay-bench chaos");
    let pid = child.id().expect("its process id");
    let out: Output = match tokio::time::timeout(bound, child.wait_with_output()).await {
        Ok(out) => out.expect("running dsrelay-bench chaos"),
        Err(_) => {
            // SIGINT lets the run kill the processes it started before it exits.
            let _ = std::process::Command::new("kill")
                .args(["-INT", &pid.to_string()])
                .status();
            tokio::time::sleep(Duration::from_secs(5)).await;
            panic!("the chaos run took longer than {} s", bound.as_secs());
        }
    };
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let explain = format!("--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}");
    assert!(out.status.success(), "the chaos run failed\n{explain}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.last().copied(), Some("PASS"), "{explain}");
    assert!(
        lines.iter().any(|l| l.starts_with("kills: 6 SIGKILLs")),
        "not every kill was made\n{explain}"
    );
    for line in [
        "lost: 0",
        "duplicated: 0",
        "effects applied twice: 0",
        "acknowledgements lost: 0",
        "acknowledgements applied twice: 0",
    ] {
        assert!(lines.contains(&line), "no `{line}`\n{explain}");
    }
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with(&format!("requests: {requests} asked, {requests} accepted"))),
        "{explain}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_short_run_on_sqlite_passes() {
    short_chaos_run(300, &[], BOUND).await;
}

/// Whether the PostgreSQL server binaries the chaos run starts its own server from are
/// installed; in CI they must be.
fn postgres_installed() -> bool {
    let installed = std::fs::read_dir("/usr/lib/postgresql")
        .map(|d| d.flatten().any(|e| e.path().join("bin/postgres").exists()))
        .unwrap_or(false);
    if !installed {
        let ci = std::env::var("CI").is_ok_and(|v| v.eq_ignore_ascii_case("true"));
        assert!(
            !ci,
            "the PostgreSQL server binaries are required in CI (/usr/lib/postgresql/*/bin)"
        );
        eprintln!(
            "SKIPPED on PostgreSQL: no server binaries under /usr/lib/postgresql/*/bin \
             (in CI this is a failure)"
        );
    }
    installed
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_short_run_on_postgres_passes() {
    if postgres_installed() {
        short_chaos_run(300, &["--postgres"], BOUND).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_short_run_with_replicas_on_postgres_passes() {
    if postgres_installed() {
        short_chaos_run(
            200,
            &["--postgres", "--registries", "2", "--processors", "3"],
            REPLICATED_BOUND,
        )
        .await;
    }
}
