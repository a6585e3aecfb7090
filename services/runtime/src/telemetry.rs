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

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::{fmt, prelude::*, EnvFilter};

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

fn otlp_requested() -> bool {
    let set = |n: &str| std::env::var(n).is_ok_and(|v| !v.trim().is_empty());
    let exporter_off =
        std::env::var("OTEL_TRACES_EXPORTER").is_ok_and(|v| v.trim().eq_ignore_ascii_case("none"));
    !env_true("OTEL_SDK_DISABLED")
        && !exporter_off
        && (set("OTEL_EXPORTER_OTLP_ENDPOINT") || set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))
}

fn tracer_provider(service_name: &str) -> anyhow::Result<SdkTracerProvider> {
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .build()?;
    let mut resource = opentelemetry_sdk::Resource::builder();
    if std::env::var("OTEL_SERVICE_NAME").is_err() {
        resource = resource.with_service_name(service_name.to_string());
    }
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource.build())
        .build())
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
    let provider = if otlp_requested() {
        match tracer_provider(service_name) {
            Ok(p) => Some(p),
            Err(e) => {
                eprintln!("tracing: the OTLP exporter could not be set up, traces are off: {e}");
                None
            }
        }
    } else {
        None
    };
    let otel = provider
        .as_ref()
        .map(|p| tracing_opentelemetry::layer().with_tracer(p.tracer(service_name.to_string())));
    let registry = tracing_subscriber::registry().with(filter).with(otel);
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
    if let Some(p) = &provider {
        opentelemetry::global::set_tracer_provider(p.clone());
    }
    Telemetry { provider }
}
