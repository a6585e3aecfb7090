//! Contract end at scale: all of a controller's data at one SQL subprocessor deleted through
//! the real registry and processor, against a bare bulk DELETE of the same rows on a copy of
//! the same database, measured in the same run.
//!
//! The data: the sample accounting schema (SQLite, a file in the temporary folder) emptied of
//! its sample rows and filled with `--contract-subjects` customers (`accounting::fill`), each
//! with one contact, one paid invoice and one ledger entry from 2010, so that no legal obligation keeps anything in
//! 2026 and the contract end deletes (ledger entries: anonymizes) every row, as the bare
//! statements do. The relay run is timed from `ContractService.EndContract` (choice DELETE,
//! effective now) to the contract end's request COMPLETED at the registry; the bare run is
//! the four statements the sample rules amount to, in one transaction, on a file copy of the
//! filled database. Everything it generated is deleted as soon as the figures are taken.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use dsrelay_proto::v1::contract_service_client::ContractServiceClient;
use dsrelay_proto::v1::{
    ContractEndChoice, EndContractRequest, GetContractRequest, RequestState, TaskState,
};
use dsrelay_runtime::pki::{dev_identity, DevPki};
use dsrelay_runtime::store::Db;

use crate::accounting;
use crate::export::start_pair;
use crate::load::RssSampler;
use crate::service::{channel, Service};

/// The longest the contract end may take before the run gives up.
const TIMEOUT: Duration = Duration::from_secs(60 * 60);

/// The contract-end scenario's figures.
pub(crate) struct ContractFigures {
    /// Customers (data subjects) of the controller.
    pub(crate) subjects: u64,
    /// Rows of the four tables.
    pub(crate) records: u64,
    /// EndContract to the contract end COMPLETED (s).
    pub(crate) relay_secs: f64,
    /// The bare statements on the copy (s).
    pub(crate) bare_secs: f64,
    /// Peak resident memory (KiB) of the registry and the processor during the run.
    pub(crate) peaks: [u64; 2],
}

/// Runs the scenario in `dir` (deleted at the end) with the services' stores at
/// `registry_db` and `processor_db`.
pub(crate) async fn run(
    pki: &DevPki,
    dir: &Path,
    subjects: u64,
    registry_db: &str,
    processor_db: &str,
) -> Result<ContractFigures> {
    std::fs::create_dir_all(dir)?;
    let result = scenario(pki, dir, subjects, registry_db, processor_db).await;
    let _ = std::fs::remove_dir_all(dir);
    result
}

async fn scenario(
    pki: &DevPki,
    dir: &Path,
    subjects: u64,
    registry_db: &str,
    processor_db: &str,
) -> Result<ContractFigures> {
    let accounting = dir.join("accounting.db");
    let accounting_url = format!("sqlite://{}", accounting.display());
    crate::progress(format!(
        "contract end: filling the sample accounting schema with {subjects} customers"
    ));
    let records = accounting::fill(&accounting_url, subjects).await?;
    let bare = dir.join("bare.db");
    std::fs::copy(&accounting, &bare).context("copying the filled database")?;
    crate::progress(format!(
        "  {records} rows; bare bulk DELETE on a copy of the same database"
    ));
    let bare_secs = bare_delete(&format!("sqlite://{}", bare.display()), subjects).await?;
    let _ = std::fs::remove_file(&bare);

    let (reg_service, proc_service, registry_port) =
        start_pair(pki, dir, registry_db, processor_db, &accounting_url).await?;
    let expected = Some(dev_identity("registry", "controller"));
    let operator = channel(pki, "operator", registry_port, expected)?;
    let processor = "payroll-bureau";
    let pids = [reg_service.pid()?, proc_service.pid()?];
    let mut services = [reg_service, proc_service];
    let result = measure(&mut services, pids, operator, processor).await;
    for s in services {
        s.kill().await;
    }
    let (relay_secs, peaks) = result?;
    let remaining = accounting::count_customers(&accounting_url).await?;
    if remaining != 0 {
        bail!("the contract end COMPLETED with {remaining} customers left in the database");
    }
    Ok(ContractFigures {
        subjects,
        records,
        relay_secs,
        bare_secs,
        peaks,
    })
}

async fn measure(
    services: &mut [Service; 2],
    pids: [u32; 2],
    operator: tonic::transport::Channel,
    processor: &str,
) -> Result<(f64, [u64; 2])> {
    let logs = |services: &[Service; 2]| -> String {
        services
            .iter()
            .map(|s| format!("\n--- {} log (end) ---\n{}", s.name, s.log_tail()))
            .collect()
    };
    let mut client = ContractServiceClient::new(operator);
    let sampler = RssSampler::start(pids.to_vec());
    crate::progress("  contract end: EndContract (DELETE, now) to COMPLETED");
    let t0 = Instant::now();
    let contract_id = client
        .end_contract(EndContractRequest {
            processor: processor.into(),
            choice: ContractEndChoice::Delete as i32,
            effective_at: None,
            effective_now: true,
            idempotency_key: "bench-contract-end".into(),
            transfer_recipient: String::new(),
        })
        .await
        .context("ending the contract")?
        .into_inner()
        .contract_id;
    let mut last_report = Instant::now();
    loop {
        for s in services.iter_mut() {
            s.check_alive()?;
        }
        let contract = client
            .get_contract(GetContractRequest {
                contract_id: contract_id.clone(),
            })
            .await
            .context("reading the contract end")?
            .into_inner();
        let state = RequestState::try_from(contract.state).unwrap_or(RequestState::Unspecified);
        match state {
            RequestState::Completed => break,
            RequestState::PartiallyCompleted | RequestState::Failed | RequestState::Cancelled => {
                let why: Vec<String> = contract
                    .tasks
                    .iter()
                    .map(|t| {
                        format!(
                            "{}: {:?} {}",
                            t.subprocessor,
                            TaskState::try_from(t.state).unwrap_or(TaskState::Unspecified),
                            t.reason
                        )
                    })
                    .collect();
                bail!(
                    "the contract end ended {state:?} ({}){}",
                    why.join("; "),
                    logs(services)
                );
            }
            _ => {}
        }
        if last_report.elapsed() > Duration::from_secs(10) {
            last_report = Instant::now();
            for t in &contract.tasks {
                if let Some(p) = &t.progress {
                    crate::progress(format!(
                        "    {}: {} of {} subjects, {} of {} records",
                        t.subprocessor,
                        p.subjects_done,
                        p.subjects_total,
                        p.records_done,
                        p.records_total
                    ));
                }
            }
        }
        if t0.elapsed() > TIMEOUT {
            bail!(
                "the contract end did not complete in {} s{}",
                TIMEOUT.as_secs(),
                logs(services)
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let secs = t0.elapsed().as_secs_f64();
    let peaks = sampler.finish().await;
    Ok((secs, [peaks[0], peaks[1]]))
}

/// What the sample rules do to every customer's rows, as bare statements in one transaction
/// (ledger entries are anonymized, the rest deleted). Returns the seconds.
async fn bare_delete(url: &str, subjects: u64) -> Result<f64> {
    let db = Db::connect(url).await?;
    let t0 = Instant::now();
    let mut tx = db.pool.begin().await?;
    let mut deleted = 0;
    for s in [
        "DELETE FROM contacts WHERE customer_id IN (SELECT id FROM customers)",
        "DELETE FROM invoices WHERE customer_id IN (SELECT id FROM customers)",
        "UPDATE ledger_entries SET customer_id = NULL, description = 'redacted' \
         WHERE customer_id IN (SELECT id FROM customers)",
        "DELETE FROM customers",
    ] {
        deleted += sqlx::query(s).execute(&mut *tx).await?.rows_affected();
    }
    tx.commit().await?;
    let secs = t0.elapsed().as_secs_f64();
    db.pool.close().await;
    if deleted != subjects * 4 {
        bail!(
            "the bare statements touched {deleted} rows, not {}",
            subjects * 4
        );
    }
    Ok(secs)
}
