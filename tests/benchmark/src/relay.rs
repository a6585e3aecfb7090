//! The relay under test: one registry and two processors (three `noop` subprocessors each)
//! as real release processes over mTLS, the Submit loads, and what the registry's table says
//! about how they ended.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use dsrelay_proto::v1::request_service_client::RequestServiceClient;
use dsrelay_proto::v1::{
    IdentityEncoding, IdentityType, RequestKind, RequestState, SubjectIdentity, SubmitRequest,
    TaskState,
};
use dsrelay_registry::store::OP_DELIVER;
use dsrelay_runtime::pki::{dev_identity, DevCa, DevPki};
use dsrelay_runtime::store::Db;
use dsrelay_runtime::tls::TlsFiles;
use tonic::transport::Channel;

use crate::load::{CpuUsage, CpuWindow};
use crate::service::{channel, free_port, sibling_binary, Service};

/// The data categories every processor and subprocessor holds, so that every request goes
/// to both processors and to all three subprocessors of each.
const CATEGORIES: [&str; 3] = ["contact", "invoicing", "marketing"];
/// Subprocessors per processor.
pub(crate) const SUBPROCESSORS: usize = 3;
/// `RequestState::Completed`; every state from it on is final.
pub(crate) const COMPLETED: i64 = RequestState::Completed as i64;

/// Where each service keeps its data.
pub(crate) struct Databases {
    /// The registry's.
    pub(crate) registry: String,
    /// The first processor's.
    pub(crate) processor_a: String,
    /// The second processor's.
    pub(crate) processor_b: String,
    /// The export scenario's registry's (`None` on SQLite: a file in the scenario's folder).
    pub(crate) export_registry: Option<String>,
    /// The export scenario's processor's (likewise).
    pub(crate) export_processor: Option<String>,
    /// The contract-end scenario's registry's (likewise).
    pub(crate) contract_registry: Option<String>,
    /// The contract-end scenario's processor's (likewise).
    pub(crate) contract_processor: Option<String>,
    /// The one-hop scenario's registry's (likewise).
    pub(crate) onehop_registry: Option<String>,
    /// The one-hop scenario's processor's (likewise).
    pub(crate) onehop_processor: Option<String>,
    /// The one-hop scenario's holder's, the sample accounting database (likewise).
    pub(crate) onehop_holder: Option<String>,
}

/// The poll interval of every outbox and runner (ms). The defaults' 1 s only matters when a
/// wake-up is missed (a Submit wakes the dispatcher, a Deliver the task runner, a task step
/// the acknowledgement sender); everything else keeps its default.
pub(crate) const POLL_MS: u64 = 100;

/// The settings the relay runs with, described for the report.
pub(crate) fn settings_description(
    registry: &dsrelay_registry::Config,
    processor: &dsrelay_processor::Config,
) -> Vec<String> {
    let d = &registry.delivery;
    let r = &registry.reconcile;
    let t = &processor.tasks;
    let a = &processor.acks;
    vec![
        format!(
            "relay: one registry, two processors, each with {SUBPROCESSORS} `noop` \
             subprocessors (delay 0 ms) holding every category; every request goes to both \
             processors ({} tasks); every benchmark processor signs the deletion certificate \
             of each erasure task it completes, and the registry checks and stores each",
            2 * SUBPROCESSORS
        ),
        format!(
            "registry delivery: poll {} ms (a Submit also wakes the dispatcher), batch {}, \
             {} in flight, lease {} ms, {}; reconcile (defaults): every {} ms, after {} ms \
             without acknowledgement",
            d.poll_interval_ms,
            d.batch_size,
            d.concurrency,
            d.lease_ms,
            match d.yield_to_intake_ms {
                0 => "no giving way to queued Submits (`yield_to_intake_ms` 0)".to_string(),
                ms => format!(
                    "while Submits queue one claim per {ms} ms at most \
                               (`yield_to_intake_ms`)"
                ),
            },
            r.interval_ms,
            r.ack_timeout_ms
        ),
        format!(
            "processor tasks: poll {} ms (a Deliver also wakes the runner), batch {}, {} at once; \
             acknowledgements: poll {} ms (a task step also wakes the sender, but for the one \
             starting a holder's call), up to {} claimed per round; \
             everything else at its default",
            t.poll_interval_ms, t.batch_size, t.concurrency, a.poll_interval_ms, a.batch_size
        ),
        format!(
            "services: the release binaries, each a process of its own on {} async thread(s) \
             (`worker_threads`, the default), `RUST_LOG=warn` (logs to files in the temporary \
             folder)",
            dsrelay_runtime::settings::DEFAULT_WORKER_THREADS
        ),
    ]
}

/// How a wait for requests to finish ended.
pub(crate) struct Waited {
    /// Requests in a final state.
    pub(crate) finished: i64,
    /// Of those, COMPLETED.
    pub(crate) completed: i64,
    /// The CPU used up to the last request that finished.
    pub(crate) cpu: Option<CpuUsage>,
}

/// The running relay (also the one-hop scenario's pair, built by `onehop`).
pub(crate) struct Relay {
    /// The registry, then the processors (A and B here; the one-hop scenario's one).
    pub(crate) services: Vec<Service>,
    /// Partner-API clients, one per channel.
    pub(crate) clients: Vec<RequestServiceClient<Channel>>,
    /// Read-only use of the registry's database, to see how requests ended.
    pub(crate) registry_db: Db,
}

/// Issues the second processor's certificate into the dev PKI (the dev set has one).
fn issue_second_processor(pki: &DevPki) -> Result<TlsFiles> {
    let read = |p: PathBuf| {
        std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))
    };
    let ca = DevCa::load(&read(pki.ca())?, &read(pki.dir.join("ca.key"))?)?;
    let leaf = ca.issue(
        "dsrelay processor bench-b",
        &dev_identity("processor", "bench-b"),
    )?;
    std::fs::write(pki.cert("processor-b"), leaf.cert_pem)?;
    std::fs::write(pki.key("processor-b"), leaf.key_pem)?;
    Ok(pki.files("processor-b"))
}

pub(crate) fn write_file(path: &Path, text: &str) -> Result<()> {
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

/// A TOML string.
pub(crate) fn q(s: impl AsRef<str>) -> String {
    toml::Value::String(s.as_ref().to_string()).to_string()
}

/// The `[tls]` table of `files`.
pub(crate) fn tls_toml(files: &TlsFiles) -> String {
    format!(
        "[tls]\nca = {}\ncert = {}\nkey = {}\n",
        q(files.ca.to_string_lossy()),
        q(files.cert.to_string_lossy()),
        q(files.key.to_string_lossy())
    )
}

/// The registry's configuration file: what an operator would write, so that settings this
/// benchmark does not name keep their defaults.
pub(crate) fn registry_toml(
    pki: &DevPki,
    port: u16,
    db: &str,
    processors: &[(&str, u16)],
) -> String {
    let categories = CATEGORIES.map(q).join(", ");
    let mut s = format!(
        "listen = {}\ndatabase_url = {}\nidentity_hash_key = \"benchmark key\"\n\n",
        q(format!("127.0.0.1:{port}")),
        q(db)
    );
    s.push_str(&tls_toml(&pki.files("registry")));
    for (identity, role, name) in [
        (dev_identity("partner", "crm"), "partner", "crm"),
        (dev_identity("operator", "ops"), "operator", "ops"),
    ] {
        s.push_str(&format!(
            "\n[[identities]]\nidentity = {}\nrole = {}\nname = {}\n",
            q(identity),
            q(role),
            q(name)
        ));
    }
    for (name, port) in processors {
        s.push_str(&format!(
            "\n[[processors]]\nname = {}\nendpoint = {}\nidentity = {}\ncategories = [{categories}]\n\
             public_key = {}\n",
            q(name),
            q(format!("https://localhost:{port}")),
            q(dev_identity("processor", name)),
            q(pki.signing_public_key("processor").to_string_lossy())
        ));
    }
    // Audit checkpoints, as every registry signs them: the key from the development PKI,
    // the file beside it.
    s.push_str(&format!(
        "\n[audit]\ncheckpoint_key = {}\ncheckpoint_file = {}\n",
        q(pki.signing_key("registry").to_string_lossy()),
        q(pki
            .dir
            .with_file_name("registry-audit-checkpoints.jsonl")
            .to_string_lossy())
    ));
    // Last, so that a caller can add keys to [delivery] (the chaos run does).
    s.push_str(&format!("\n[delivery]\npoll_interval_ms = {POLL_MS}\n"));
    s
}

/// A processor's `signing_key` line, a top-level key: every benchmark processor signs the
/// deletion certificates of its erasures, as a production one should, so the figures include
/// that work (the statements in its step writer, the registry's check and storage of each).
/// All of them sign with the development PKI's processor key, which [`registry_toml`] names
/// as every processor's `public_key`.
pub(crate) fn processor_signing_toml(pki: &DevPki) -> String {
    format!(
        "signing_key = {}\n",
        q(pki.signing_key("processor").to_string_lossy())
    )
}

/// A processor's `[audit]` table, as every processor signs checkpoints of its audit trail:
/// the development PKI's processor key, and a checkpoint file of its own (by `name`) beside
/// the PKI.
pub(crate) fn processor_audit_toml(pki: &DevPki, name: &str) -> String {
    format!(
        "\n[audit]\ncheckpoint_key = {}\ncheckpoint_file = {}\n",
        q(pki.signing_key("processor").to_string_lossy()),
        q(pki
            .dir
            .with_file_name(format!("{name}-audit-checkpoints.jsonl"))
            .to_string_lossy())
    )
}

/// A processor's configuration file, its `[audit]` table `audit`
/// ([`processor_audit_toml`]).
fn processor_toml(
    pki: &DevPki,
    port: u16,
    tls: &TlsFiles,
    db: &str,
    registry_port: u16,
    audit: &str,
) -> String {
    let categories = CATEGORIES.map(q).join(", ");
    let mut s = format!(
        "listen = {}\ndatabase_url = {}\nidentity_hash_key = \"benchmark processor key\"\n{}\n",
        q(format!("127.0.0.1:{port}")),
        q(db),
        processor_signing_toml(pki)
    );
    s.push_str(&tls_toml(tls));
    s.push_str(audit);
    s.push_str(&format!(
        "\n[[controllers]]\nname = \"controller\"\nidentity = {}\nregistry_endpoint = {}\n",
        q(dev_identity("registry", "controller")),
        q(format!("https://localhost:{registry_port}"))
    ));
    for i in 1..=SUBPROCESSORS {
        s.push_str(&format!(
            "\n[[subprocessors]]\nname = \"noop-{i}\"\ncategories = [{categories}]\n\
             country = \"FI\"\nconnector = {{ type = \"noop\", delay_ms = 0 }}\n"
        ));
    }
    s.push_str(&format!(
        "\n[tasks]\npoll_interval_ms = {POLL_MS}\n\n[acks]\npoll_interval_ms = {POLL_MS}\n"
    ));
    s
}

impl Relay {
    /// Writes the configurations and starts the three services; returns once all answer
    /// health checks.
    pub(crate) async fn start(
        pki: &DevPki,
        work: &Path,
        dbs: &Databases,
        channels: usize,
    ) -> Result<(Self, Vec<String>)> {
        let processor_b_tls = issue_second_processor(pki)?;
        let registry_port = free_port()?;
        let ports = [free_port()?, free_port()?];
        let names = ["payroll-bureau", "bench-b"];
        let registry_text = registry_toml(
            pki,
            registry_port,
            &dbs.registry,
            &[(names[0], ports[0]), (names[1], ports[1])],
        );
        let registry: dsrelay_registry::Config =
            toml::from_str(&registry_text).context("the registry's benchmark configuration")?;
        registry.validate().map_err(|e| anyhow::anyhow!("{e}"))?;
        let processor_texts = [
            processor_toml(
                pki,
                ports[0],
                &pki.files("processor"),
                &dbs.processor_a,
                registry_port,
                &processor_audit_toml(pki, names[0]),
            ),
            processor_toml(
                pki,
                ports[1],
                &processor_b_tls,
                &dbs.processor_b,
                registry_port,
                &processor_audit_toml(pki, names[1]),
            ),
        ];
        let mut processors = Vec::new();
        for text in &processor_texts {
            let p: dsrelay_processor::Config =
                toml::from_str(text).context("a processor's benchmark configuration")?;
            p.validate().map_err(|e| anyhow::anyhow!("{e}"))?;
            processors.push(p);
        }
        let settings = settings_description(&registry, &processors[0]);

        let mut services = Vec::new();
        for (i, (text, stem)) in processor_texts
            .iter()
            .zip(["processor", "processor-b"])
            .enumerate()
        {
            let config = work.join(format!("processor-{i}.toml"));
            write_file(&config, text)?;
            let mut s = Service::spawn(
                &format!("processor {}", names[i]),
                &sibling_binary("dsrelay-processor")?,
                &["--config".as_ref(), config.as_os_str()],
                work.join(format!("processor-{i}.log")),
                "warn",
            )?;
            // Any certificate of the CA may ask for health.
            s.wait_serving(channel(pki, stem, ports[i], None)?).await?;
            services.push(s);
        }
        let config = work.join("registry.toml");
        write_file(&config, &registry_text)?;
        let mut r = Service::spawn(
            "registry",
            &sibling_binary("dsrelay-registry")?,
            &["--config".as_ref(), config.as_os_str()],
            work.join("registry.log"),
            "warn",
        )?;
        let expected = Some(dev_identity("registry", "controller"));
        r.wait_serving(channel(pki, "operator", registry_port, expected.clone())?)
            .await?;
        services.insert(0, r);
        let clients = (0..channels.max(1))
            .map(|_| {
                Ok(RequestServiceClient::new(channel(
                    pki,
                    "partner-crm",
                    registry_port,
                    expected.clone(),
                )?))
            })
            .collect::<Result<Vec<_>>>()?;
        let registry_db = Db::connect(&dbs.registry).await?;
        Ok((
            Self {
                services,
                clients,
                registry_db,
            },
            settings,
        ))
    }

    /// The process ids, in the order of `services`.
    pub(crate) fn pids(&self) -> Result<Vec<u32>> {
        self.services.iter().map(Service::pid).collect()
    }

    /// An error with the log of any service that has exited.
    pub(crate) fn check_alive(&mut self) -> Result<()> {
        self.services.iter_mut().try_for_each(Service::check_alive)
    }

    /// Requests under `prefix` in a final state.
    pub(crate) async fn count_finished(&self, prefix: &str) -> Result<i64> {
        self.count_from_state(prefix, COMPLETED, false).await
    }

    /// How many requests whose idempotency key starts with `prefix` are in a state at or
    /// past `state` (COMPLETED and every later state are final).
    async fn count_from_state(&self, prefix: &str, state: i64, exact: bool) -> Result<i64> {
        let op = if exact { "=" } else { ">=" };
        Ok(sqlx::query_scalar(&format!(
            "SELECT COUNT(*) FROM requests WHERE idempotency_key LIKE $1 AND state {op} $2"
        ))
        .bind(format!("{prefix}%"))
        .bind(state)
        .fetch_one(&self.registry_db.pool)
        .await?)
    }

    /// Waits until `expected` requests under `prefix` have finished (any final state), until
    /// none has finished for `stall`, or until `timeout`. `cpu`, when given, is read each
    /// time a request finishes, so that its figures end with the last one.
    pub(crate) async fn wait_finished(
        &mut self,
        prefix: &str,
        expected: u64,
        stall: Duration,
        timeout: Duration,
        cpu: Option<&CpuWindow>,
    ) -> Result<Waited> {
        let deadline = Instant::now() + timeout;
        let mut last = (-1, Instant::now());
        let mut usage = None;
        let finished = loop {
            self.check_alive()?;
            let finished = self.count_finished(prefix).await?;
            let now = Instant::now();
            if finished != last.0 {
                last = (finished, now);
                usage = cpu.map(CpuWindow::finish);
            }
            if finished >= expected as i64 || now > deadline || now - last.1 > stall {
                break finished;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let completed = self.count_from_state(prefix, COMPLETED, true).await?;
        Ok(Waited {
            finished,
            completed,
            cpu: usage,
        })
    }

    /// What the registry knows of up to `limit` unfinished requests under `prefix`: each
    /// one's state, its deliveries and its tasks (proto enum numbers).
    pub(crate) async fn describe_unfinished(&self, prefix: &str, limit: i64) -> String {
        let mut out = Vec::new();
        let rows: Vec<(String, i64)> = sqlx::query_as(
            "SELECT id, CAST(state AS BIGINT) FROM requests \
             WHERE idempotency_key LIKE $1 AND state < $2 ORDER BY received_at LIMIT $3",
        )
        .bind(format!("{prefix}%"))
        .bind(COMPLETED)
        .bind(limit)
        .fetch_all(&self.registry_db.pool)
        .await
        .unwrap_or_default();
        for (id, state) in rows {
            let delivered: Vec<(String, Option<i64>)> = sqlx::query_as(
                "SELECT processor, done_at FROM deliveries WHERE request_id = $1 AND op = $2 \
                 ORDER BY processor",
            )
            .bind(&id)
            .bind(OP_DELIVER)
            .fetch_all(&self.registry_db.pool)
            .await
            .unwrap_or_default();
            let tasks: Vec<(String, String, i64)> = sqlx::query_as(
                "SELECT processor, subprocessor, CAST(state AS BIGINT) FROM tasks \
                 WHERE request_id = $1 ORDER BY processor, subprocessor",
            )
            .bind(&id)
            .fetch_all(&self.registry_db.pool)
            .await
            .unwrap_or_default();
            let delivered = delivered
                .iter()
                .map(|(p, done)| {
                    format!(
                        "{p}: {}",
                        if done.is_some() {
                            "delivered"
                        } else {
                            "pending"
                        }
                    )
                })
                .collect::<Vec<_>>()
                .join(", ");
            let tasks = tasks
                .iter()
                .map(|(p, sub, st)| format!("{p}/{sub}: {}", task_state_name(*st)))
                .collect::<Vec<_>>()
                .join(", ");
            out.push(format!(
                "request {id} is {} (deliveries: {delivered}; tasks: {tasks})",
                request_state_name(state)
            ));
        }
        out.join("; ")
    }

    /// The end of every service's log.
    pub(crate) fn log_tails(&self) -> String {
        self.services
            .iter()
            .map(|s| format!("\n--- {} log (end) ---\n{}", s.name, s.log_tail()))
            .collect()
    }

    /// `now - received_at` (ms) of every request under `prefix` that has not finished: a
    /// lower bound of its latency.
    pub(crate) async fn unfinished_ages_ms(&self, prefix: &str, now: i64) -> Result<Vec<f64>> {
        let rows: Vec<i64> = sqlx::query_scalar(
            "SELECT received_at FROM requests WHERE idempotency_key LIKE $1 AND state < $2",
        )
        .bind(format!("{prefix}%"))
        .bind(COMPLETED)
        .fetch_all(&self.registry_db.pool)
        .await?;
        Ok(rows.into_iter().map(|r| (now - r) as f64).collect())
    }

    /// The latest `finished_at` (ms) of the COMPLETED requests under `prefix`.
    pub(crate) async fn last_finished_at(&self, prefix: &str) -> Result<Option<i64>> {
        Ok(sqlx::query_scalar(
            "SELECT MAX(finished_at) FROM requests WHERE idempotency_key LIKE $1 AND state = $2",
        )
        .bind(format!("{prefix}%"))
        .bind(COMPLETED)
        .fetch_one(&self.registry_db.pool)
        .await?)
    }

    /// Submits `n` requests under `prefix` one at a time, each once the one before has
    /// finished (the registry's table read every 2 ms, for at most 10 s each), and answers
    /// their [`Relay::latencies_ms`].
    pub(crate) async fn one_at_a_time(&mut self, prefix: &str, n: u64) -> Result<Vec<f64>> {
        for i in 0..n {
            let key = format!("{prefix}{i:06}");
            submit(self.clients[0].clone(), key.clone())
                .await
                .map_err(|e| anyhow::anyhow!("Submit of {key} failed: {e}"))?;
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                let finished: Option<Option<i64>> = sqlx::query_scalar(
                    "SELECT finished_at FROM requests WHERE idempotency_key = $1",
                )
                .bind(&key)
                .fetch_optional(&self.registry_db.pool)
                .await?;
                if matches!(finished, Some(Some(_))) {
                    break;
                }
                if Instant::now() > deadline {
                    anyhow::bail!(
                        "{key} did not finish within 10 s: {}{}",
                        self.describe_unfinished(prefix, 1).await,
                        self.log_tails()
                    );
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }
        self.latencies_ms(prefix).await
    }

    /// `finished_at - received_at` (ms) of every COMPLETED request under `prefix`, sorted.
    pub(crate) async fn latencies_ms(&self, prefix: &str) -> Result<Vec<f64>> {
        let rows: Vec<(i64, Option<i64>)> = sqlx::query_as(
            "SELECT received_at, finished_at FROM requests \
             WHERE idempotency_key LIKE $1 AND state = $2",
        )
        .bind(format!("{prefix}%"))
        .bind(COMPLETED)
        .fetch_all(&self.registry_db.pool)
        .await?;
        let mut v: Vec<f64> = rows
            .into_iter()
            .filter_map(|(r, f)| f.map(|f| (f - r) as f64))
            .collect();
        v.sort_by(f64::total_cmp);
        Ok(v)
    }

    /// Kills the services.
    pub(crate) async fn stop(self) {
        self.registry_db.pool.close().await;
        for s in self.services {
            s.kill().await;
        }
    }
}

/// An erasure of one e-mail identity under `key`.
pub(crate) fn erasure(key: String) -> SubmitRequest {
    SubmitRequest {
        kind: RequestKind::Erasure as i32,
        identities: vec![SubjectIdentity {
            r#type: IdentityType::Email as i32,
            encoding: IdentityEncoding::Raw as i32,
            value: format!("{key}@example.com"),
            label: String::new(),
        }],
        idempotency_key: key,
        ..Default::default()
    }
}

/// Submits `key` through `client`.
pub(crate) async fn submit(
    client: RequestServiceClient<Channel>,
    key: String,
) -> Result<(), String> {
    submit_request(client, erasure(key)).await
}

/// Submits `request` through `client`; a deduplicated answer is an error.
pub(crate) async fn submit_request(
    mut client: RequestServiceClient<Channel>,
    request: SubmitRequest,
) -> Result<(), String> {
    match client.submit(request).await {
        Ok(r) if !r.get_ref().deduplicated => Ok(()),
        Ok(_) => Err("deduplicated: the idempotency key was used before".into()),
        Err(s) => Err(format!("{:?}: {}", s.code(), s.message())),
    }
}

fn request_state_name(state: i64) -> String {
    RequestState::try_from(state as i32)
        .map(|s| {
            s.as_str_name()
                .trim_start_matches("REQUEST_STATE_")
                .to_string()
        })
        .unwrap_or_else(|_| state.to_string())
}

fn task_state_name(state: i64) -> String {
    TaskState::try_from(state as i32)
        .map(|s| {
            s.as_str_name()
                .trim_start_matches("TASK_STATE_")
                .to_string()
        })
        .unwrap_or_else(|_| state.to_string())
}
