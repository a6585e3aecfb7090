//! Logging set-up: `RUST_LOG` levels, human-readable or JSON lines.

use tracing_subscriber::{fmt, prelude::*, EnvFilter};

/// Installs the global subscriber. `json` switches to one JSON object per line. Calling it
/// twice is harmless (the second call does nothing), so tests and the CLI may both call it.
pub fn init(json: bool) {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,sqlx=warn,h2=warn,hyper=warn,tower=warn"));
    let registry = tracing_subscriber::registry().with(filter);
    let _ = if json {
        registry
            .with(fmt::layer().json().with_current_span(true))
            .try_init()
    } else {
        registry.with(fmt::layer().with_target(false)).try_init()
    };
}
