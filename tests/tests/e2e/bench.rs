//! The measuring run of `dsrelay-bench` in a short form, so that a broken scenario fails here
//! rather than at the next `scripts/bench.sh`: baselines and the relay for a second each, the
//! one-hop scenario with 200 customers and 50 erasures (whose end check reads every row of
//! the holder's database and fails the run on any difference), the other scenarios skipped.
//! Its figures mean nothing (debug binaries, beside other tests); that it ends well does.

use std::process::Output;
use std::time::Duration;

use crate::harness::{binary, postgres_server};

/// The longest a short run may take: a guard against a hang, not a performance goal.
const BOUND: Duration = Duration::from_secs(150);

/// Runs the short form with `extra` arguments; returns the report it wrote.
async fn short_bench_run(extra: &[&str]) -> String {
    let dir = tempfile::tempdir().expect("a temporary folder");
    let out = dir.path().join("report.md");
    let mut command = tokio::process::Command::new(binary("dsrelay-bench"));
    command
        .args([
            "--duration-secs",
            "1",
            "--latency-secs",
            "1",
            "--concurrency",
            "4",
            "--channels",
            "2",
            "--batch",
            "50",
            "--export-mib",
            "0",
            "--contract-subjects",
            "0",
            "--count-erasures",
            "0",
            "--onehop-customers",
            "200",
            "--onehop-erasures",
            "50",
            "--onehop-concurrency",
            "4",
            "--out",
        ])
        .arg(&out)
        .args(extra)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    let child = command.spawn().expect("starting dsrelay-bench");
    let pid = child.id().expect("its process id");
    let output: Output = match tokio::time::timeout(BOUND, child.wait_with_output()).await {
        Ok(output) => output.expect("running dsrelay-bench"),
        Err(_) => {
            // SIGINT lets the run kill the services it started before it exits.
            let _ = std::process::Command::new("kill")
                .args(["-INT", &pid.to_string()])
                .status();
            tokio::time::sleep(Duration::from_secs(5)).await;
            panic!(
                "the short benchmark run took longer than {} s",
                BOUND.as_secs()
            );
        }
    };
    let explain = format!(
        "--- stdout ---\n{}\n--- stderr ---\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        output.status.success(),
        "the short benchmark run failed\n{explain}"
    );
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("customers checked erased"),
        "the one-hop scenario did not check the holder's database\n{explain}"
    );
    std::fs::read_to_string(&out).expect("the report")
}

/// The report's one-hop rows: the completed-erasures figure is a number, with its target.
fn assert_onehop_rows(report: &str) {
    let row = report
        .lines()
        .find(|l| l.starts_with("| one hop: completed erasures"))
        .unwrap_or_else(|| panic!("no one-hop row in the report:\n{report}"));
    // Every accepted erasure must have completed (the run checks it); a Submit refused on a
    // saturated machine (a call past its limit) must be named in the notes.
    let n: u32 = row
        .split("n = ")
        .nth(1)
        .and_then(|r| r.split(')').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no n in `{row}`"));
    assert!(n > 0, "{row}\n{report}");
    assert!(
        n == 50 || report.contains("one hop, batch: "),
        "{n} of 50 erasures completed, and no note says why:\n{report}"
    );
    assert!(!row.contains("n/a"), "{row}\n{report}");
    assert!(row.contains("≥ 1500 /s"), "{row}\n{report}");
    for figure in [
        "| one hop: latency p50",
        "| one hop: latency p99",
        "| one hop: CPU per completed erasure: the registry and the processor",
    ] {
        assert!(
            report
                .lines()
                .any(|l| l.starts_with(figure) && !l.contains("n/a")),
            "no figure for `{figure}` in the report:\n{report}"
        );
    }
    assert!(
        report.contains("- **one hop**"),
        "the report does not say how the one hop is measured:\n{report}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_short_run_with_the_one_hop_on_sqlite() {
    assert_onehop_rows(&short_bench_run(&[]).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_short_run_with_the_one_hop_on_postgres() {
    let Some(server) = postgres_server() else {
        return;
    };
    let report = short_bench_run(&["--postgres-url", &server]).await;
    assert!(
        report.starts_with("# Benchmarks (PostgreSQL)"),
        "not a PostgreSQL run:\n{report}"
    );
    assert_onehop_rows(&report);
}
