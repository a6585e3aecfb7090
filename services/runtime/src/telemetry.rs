//! Logging and tracing set-up: `RUST_LOG` levels, human-readable or JSON lines, and
//! OpenTelemetry traces exported over OTLP/gRPC when the standard variables ask for it.
//!
//! Tracing is off unless `OTEL_EXPORTER_OTLP_ENDPOINT` or
//! `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` is set; `OTEL_SDK_DISABLED=true` or
//! `OTEL_TRACES_EXPORTER=none` turn it off again. `OTEL_SERVICE_NAME` names the service
//! (default: the binary's name), and the exporter reads the other `OTEL_EXPORTER_OTLP_*`
//! and `OTEL_BSP_*` variables itself. W3C trace context is injected into gRPC metadata only
//! while a tracer is installed (see [`crate::trace_context`]); without one the registry's
//! calls to processors still name the request's trace in a `traceparent` of their own, and
//! other calls (a processor's to its adapters) carry none.
//!
//! Whatever `RUST_LOG` says, sqlx's events other than its statement log and pool timings
//! are dropped, as they may quote a database (see `shown`).

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{SdkTracerProvider, SpanData, SpanExporter};
use tracing_subscriber::filter::{filter_fn, FilterFn};
use tracing_subscriber::{fmt, prelude::*, EnvFilter, Layer};

/// The standard OpenTelemetry variables the services read (directly or through the
/// exporter), for documentation and the docker-compose check.
pub const OTEL_VARIABLES: &[&str] = &[
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_EXPORTER_OTLP_PROTOCOL",
    "OTEL_EXPORTER_OTLP_HEADERS",
    "OTEL_EXPORTER_OTLP_TIMEOUT",
    "OTEL_SERVICE_NAME",
    "OTEL_RESOURCE_ATTRIBUTES",
    "OTEL_SDK_DISABLED",
    "OTEL_TRACES_EXPORTER",
    "OTEL_BSP_SCHEDULE_DELAY",
    "OTEL_BSP_MAX_EXPORT_BATCH_SIZE",
];

/// Keeps the trace exporter alive; [`Telemetry::shutdown`] flushes it.
#[derive(Debug, Default)]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Whether spans are exported.
    pub fn exporting(&self) -> bool {
        self.provider.is_some()
    }

    /// Sends what is buffered and stops the exporter.
    pub async fn shutdown(self) {
        if let Some(p) = self.provider {
            // The SDK blocks while it flushes; keep that off the async workers.
            let _ = tokio::task::spawn_blocking(move || p.shutdown()).await;
        }
    }
}

fn env_true(name: &str) -> bool {
    std::env::var(name).is_ok_and(|v| v.trim().eq_ignore_ascii_case("true"))
}

/// The collector traces go to, as the exporter resolves it (the traces variable first),
/// with any password hidden; `None` when no endpoint is set or a variable turns tracing off.
/// Read once at start: the same value decides whether to export and is what the logs name.
fn otlp_endpoint() -> Option<String> {
    let exporter_off =
        std::env::var("OTEL_TRACES_EXPORTER").is_ok_and(|v| v.trim().eq_ignore_ascii_case("none"));
    if env_true("OTEL_SDK_DISABLED") || exporter_off {
        return None;
    }
    [
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
        "OTEL_EXPORTER_OTLP_ENDPOINT",
    ]
    .iter()
    .filter_map(|n| std::env::var(n).ok())
    .map(|v| v.trim().to_string())
    .find(|v| !v.is_empty())
    // Logged: a password in the address stays out of the logs.
    .map(|v| crate::store::redact(&v))
}

/// A span exporter that reports its failures once: a WARN at the first failed export,
/// nothing more while exports keep failing, an INFO when one succeeds again. The SDK's batch
/// processor would log an ERROR for every failed batch, every few seconds while a collector
/// is down, so the failure is not handed on to it; the spans of a failed batch are dropped
/// either way.
#[derive(Debug)]
struct ReportingExporter<E> {
    inner: E,
    endpoint: String,
    failing: AtomicBool,
}

impl<E> ReportingExporter<E> {
    fn new(inner: E, endpoint: String) -> Self {
        Self {
            inner,
            endpoint,
            failing: AtomicBool::new(false),
        }
    }
}

impl<E: SpanExporter> SpanExporter for ReportingExporter<E> {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        match self.inner.export(batch).await {
            Ok(()) => {
                if self.failing.swap(false, Ordering::Relaxed) {
                    tracing::info!(endpoint = %self.endpoint, "traces are exported again");
                }
            }
            Err(e) => {
                if !self.failing.swap(true, Ordering::Relaxed) {
                    tracing::warn!(
                        endpoint = %self.endpoint,
                        "traces could not be exported, and are dropped until an export \
                         succeeds (not logged again until then): {e}"
                    );
                }
            }
        }
        Ok(())
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &opentelemetry_sdk::Resource) {
        self.inner.set_resource(resource);
    }
}

fn tracer_provider(service_name: &str, endpoint: String) -> anyhow::Result<SdkTracerProvider> {
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .build()?;
    let exporter = ReportingExporter::new(exporter, endpoint);
    let mut resource = opentelemetry_sdk::Resource::builder();
    if std::env::var("OTEL_SERVICE_NAME").is_err() {
        resource = resource.with_service_name(service_name.to_string());
    }
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource.build())
        .build())
}

/// The targets of sqlx's events that may reach the logs: its statement log (`sqlx::query`:
/// the statement's SQL, which the services write and which binds every value as a
/// parameter, with row counts and timings; at TRACE, and at WARN once slower than a second)
/// and its pool's acquire timings (`sqlx::pool::acquire`: numbers only).
const SQLX_SHOWN: &[&str] = &["sqlx::query", "sqlx::pool::acquire"];

/// Whether an event or span on `target` may be logged or traced at all. sqlx's other events
/// (targets `sqlx_core::…`, `sqlx_postgres::…`, `sqlx_sqlite::…`, `sqlx::postgres::notice`,
/// `sqlx::explain`, and whatever a later sqlx adds) carry a database's own words: its
/// errors (the pool's WARN "error from `before_acquire`" quotes the server), a PostgreSQL
/// server's notices (a holder's trigger may put a value in one), a query plan. Such text may
/// quote a subject's data, and the logs show outside text only withheld; the services' own
/// code logs every database failure that matters, withheld. So those events are dropped
/// whatever `RUST_LOG` asks for.
fn shown(target: &str) -> bool {
    let sqlx = target
        .split("::")
        .next()
        .is_some_and(|krate| krate == "sqlx" || krate.starts_with("sqlx_"));
    !sqlx
        || SQLX_SHOWN.iter().any(|shown| {
            target
                .strip_prefix(shown)
                .is_some_and(|rest| rest.is_empty() || rest.starts_with("::"))
        })
}

/// `env` (the levels `RUST_LOG` sets), then [`shown`]: a filter for the whole subscriber, so
/// that neither a log line nor an exported span carries what [`shown`] drops.
fn log_filter<S: tracing::Subscriber>(env: EnvFilter) -> impl Layer<S> + Send + Sync + 'static {
    let sqlx_held_back: FilterFn<_> = filter_fn(|meta| shown(meta.target()));
    env.and_then(sqlx_held_back)
}

/// Installs the global subscriber. `json` switches to one JSON object per line. Calling it
/// twice is harmless (the second call changes nothing), so tests and the CLI may both call
/// it. Must run inside a Tokio runtime (the OTLP exporter needs one).
pub fn init(json: bool, service_name: &str) -> Telemetry {
    opentelemetry::global::set_text_map_propagator(
        opentelemetry_sdk::propagation::TraceContextPropagator::new(),
    );
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,sqlx=warn,h2=warn,hyper=warn,tower=warn"));
    let endpoint = otlp_endpoint();
    let provider = match endpoint.clone().map(|e| tracer_provider(service_name, e)) {
        Some(Ok(p)) => Some(p),
        Some(Err(e)) => {
            eprintln!("tracing: the OTLP exporter could not be set up, traces are off: {e}");
            None
        }
        None => None,
    };
    let otel = provider
        .as_ref()
        .map(|p| tracing_opentelemetry::layer().with_tracer(p.tracer(service_name.to_string())));
    let registry = tracing_subscriber::registry()
        .with(log_filter(filter))
        .with(otel);
    let installed = if json {
        registry
            .with(
                fmt::layer()
                    .json()
                    .with_current_span(true)
                    .with_span_list(true),
            )
            .try_init()
    } else {
        registry.with(fmt::layer().with_target(false)).try_init()
    };
    if installed.is_err() {
        return Telemetry::default();
    }
    if let (Some(p), Some(endpoint)) = (&provider, &endpoint) {
        opentelemetry::global::set_tracer_provider(p.clone());
        tracing::info!(endpoint = %endpoint, "traces are exported over OTLP/gRPC");
    }
    Telemetry { provider }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::sync::{Arc, Mutex};

    use opentelemetry_sdk::error::OTelSdkError;

    use super::*;

    /// An exporter whose exports succeed or fail as scripted.
    #[derive(Debug)]
    struct Scripted(Mutex<VecDeque<bool>>);

    impl SpanExporter for Scripted {
        async fn export(&self, _batch: Vec<SpanData>) -> OTelSdkResult {
            match self.0.lock().unwrap().pop_front() {
                Some(true) => Ok(()),
                _ => Err(OTelSdkError::InternalFailure("Connection refused".into())),
            }
        }
    }

    #[derive(Clone, Default)]
    struct Lines(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Lines {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// A database's words in sqlx's own events never reach the log, even at `RUST_LOG=trace`;
    /// the services' own events and sqlx's statement log do.
    #[test]
    fn sqlx_events_that_quote_a_database_are_not_logged() {
        let lines = Lines::default();
        let writer = lines.clone();
        let subscriber = tracing_subscriber::registry()
            .with(log_filter(EnvFilter::new("trace")))
            .with(
                fmt::layer()
                    .with_writer(move || writer.clone())
                    .with_ansi(false),
            );
        let quoted = "terminating connection due to administrator command";
        tracing::subscriber::with_default(subscriber, || {
            tracing::warn!(
                target: "sqlx_core::pool::inner",
                error = quoted,
                "error from `before_acquire`"
            );
            tracing::warn!(target: "sqlx_postgres::connection", "{quoted}");
            tracing::info!(target: "sqlx::postgres::notice", message = quoted);
            tracing::trace!(target: "sqlx::explain", "{quoted}");
            tracing::warn!(target: "sqlxother", "from a crate named alike");
            tracing::warn!(
                target: "dsrelay_processor::runner",
                "subprocessor unreachable, 52 bytes withheld"
            );
            tracing::trace!(target: "sqlx::query", summary = "select 1", "statement");
            tracing::warn!(target: "sqlx::query::slow", "slow statement");
        });
        let text = String::from_utf8(lines.0.lock().unwrap().clone()).unwrap();
        assert!(!text.contains(quoted), "{text}");
        assert!(!text.contains("before_acquire"), "{text}");
        for shown in [
            "subprocessor unreachable, 52 bytes withheld",
            "from a crate named alike",
            "summary=\"select 1\"",
            "slow statement",
        ] {
            assert!(text.contains(shown), "{shown}: {text}");
        }
        assert_eq!(text.lines().count(), 4, "{text}");
    }

    #[tokio::test]
    async fn a_failing_collector_is_reported_once_per_outage() {
        let lines = Lines::default();
        let writer = lines.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .finish();
        let _guard = tracing::subscriber::set_default(subscriber);
        let script = [false, false, false, true, true, false, false];
        let exporter = ReportingExporter::new(
            Scripted(Mutex::new(script.into())),
            "http://127.0.0.1:4317".to_string(),
        );
        for _ in script {
            assert!(exporter.export(Vec::new()).await.is_ok());
        }
        let text = String::from_utf8(lines.0.lock().unwrap().clone()).unwrap();
        let logged: Vec<&str> = text.lines().collect();
        assert_eq!(logged.len(), 3, "{text}");
        for (line, level, what) in [
            (logged[0], "WARN", "traces could not be exported"),
            (logged[1], "INFO", "traces are exported again"),
            (logged[2], "WARN", "traces could not be exported"),
        ] {
            assert!(line.contains(level) && line.contains(what), "{text}");
            assert!(line.contains("endpoint=http://127.0.0.1:4317"), "{text}");
        }
        assert!(logged[0].contains("Connection refused"), "{text}");
    }
}
