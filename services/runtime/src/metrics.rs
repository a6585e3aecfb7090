//! Metrics in the Prometheus text exposition format (version 0.0.4), kept and encoded by
//! [`prometheus_client`] and served on a plain-HTTP admin port together with a liveness probe.
//!
//! Counters and histograms live in the process, registered in a service's [`Registry`]
//! ([`CounterVec`], [`HistogramVec`]: families of series by label values, with the call
//! shapes the services use), and start from zero at every start, as Prometheus expects of
//! counters. Gauges that describe the store (requests by state, queue depths) are computed
//! when scraped, into a registry made for that scrape ([`GaugeFamily`]), so they are right
//! after a restart and agree between replicas sharing a database. [`encode`] writes
//! registries one after the other.
//!
//! [`serve`] answers `GET /metrics` and `GET /healthz` on a listener the caller bound. The
//! admin port has no TLS and carries no personal data (labels are kinds, states and
//! configured names). With an `admin_token` every `/metrics` request must carry
//! `Authorization: Bearer <token>` (`/healthz` says only whether the service is up, for
//! probes that carry no secret); a non-loopback address requires one. Bind it to loopback or a private network.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use anyhow::{Context, Result};
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use prometheus_client::encoding::prometheus_text;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::{Family, MetricConstructor};
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
pub use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::watch;

/// The media type of the text exposition format.
pub const CONTENT_TYPE: &str = prometheus_text::CONTENT_TYPE;

/// Histogram buckets (seconds) for latencies from milliseconds (a local database) to an hour
/// (a registry that was down).
pub const LATENCY_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0,
];

/// Label names paired with one series' values, in the order the names were declared.
type Labels = Vec<(&'static str, String)>;

fn labels(names: &'static [&'static str], values: &[&str]) -> Labels {
    debug_assert_eq!(values.len(), names.len(), "label count of {names:?}");
    names
        .iter()
        .copied()
        .zip(values.iter().map(|v| v.to_string()))
        .collect()
}

/// prometheus-client ends every help text with a full stop of its own; ours are sentences
/// that already end in one, and the exposition keeps them as written.
fn help_text(help: &str) -> &str {
    help.strip_suffix('.').unwrap_or(help)
}

/// A counter with labels: one monotonically increasing value per label set.
#[derive(Debug, Clone)]
pub struct CounterVec {
    labels: &'static [&'static str],
    family: Family<Labels, Counter>,
}

impl CounterVec {
    /// Registers a counter family in `registry`. `name` has no `_total`: the exposition
    /// appends it to the samples and the `# TYPE` line.
    pub fn register(
        registry: &mut Registry,
        name: &str,
        help: &str,
        labels: &'static [&'static str],
    ) -> Self {
        let family = Family::default();
        registry.register(name, help_text(help), family.clone());
        Self { labels, family }
    }

    /// Adds one to the series with these label values (in the order of the label names).
    pub fn inc(&self, values: &[&str]) {
        self.inc_by(values, 1);
    }

    /// Adds `n`; `inc_by(values, 0)` makes the series appear with 0 before anything happens.
    pub fn inc_by(&self, values: &[&str], n: u64) {
        self.family
            .get_or_create(&labels(self.labels, values))
            .inc_by(n);
    }

    /// The current value of one series (0 if it never appeared).
    pub fn get(&self, values: &[&str]) -> u64 {
        self.family
            .get(&labels(self.labels, values))
            .map_or(0, |c| c.get())
    }
}

/// Makes each new series of a [`HistogramVec`] with the family's buckets.
#[derive(Debug, Clone)]
struct Buckets(Arc<[f64]>);

impl MetricConstructor<Histogram> for Buckets {
    fn new_metric(&self) -> Histogram {
        Histogram::new(self.0.iter().copied())
    }
}

/// A histogram with labels: cumulative bucket counts, sum and count per label set.
#[derive(Debug, Clone)]
pub struct HistogramVec {
    labels: &'static [&'static str],
    family: Family<Labels, Histogram, Buckets>,
}

impl HistogramVec {
    /// Registers a histogram family in `registry` with these bucket upper bounds (in any
    /// order; +Inf is implied).
    pub fn register(
        registry: &mut Registry,
        name: &str,
        help: &str,
        labels: &'static [&'static str],
        bounds: &[f64],
    ) -> Self {
        let mut bounds = bounds.to_vec();
        bounds.sort_by(f64::total_cmp);
        bounds.dedup();
        let family = Family::new_with_constructor(Buckets(bounds.into()));
        registry.register(name, help_text(help), family.clone());
        Self { labels, family }
    }

    /// Records one observation in the series with these label values. NaN is ignored: it
    /// would turn the sum into NaN for good.
    pub fn observe(&self, values: &[&str], v: f64) {
        if !v.is_nan() {
            self.family
                .get_or_create(&labels(self.labels, values))
                .observe(v);
        }
    }

    /// Makes the series appear with zero observations.
    pub fn touch(&self, values: &[&str]) {
        let _ = self.family.get_or_create(&labels(self.labels, values));
    }
}

/// A gauge family computed at scrape time, registered in the registry of that scrape.
#[derive(Debug, Clone)]
pub struct GaugeFamily {
    family: Family<Vec<(String, String)>, Gauge<f64, AtomicU64>>,
}

impl GaugeFamily {
    /// Registers an empty family in `registry`.
    pub fn register(registry: &mut Registry, name: &str, help: &str) -> Self {
        let family = Family::default();
        registry.register(name, help_text(help), family.clone());
        Self { family }
    }

    /// Sets the sample with these labels (replacing an earlier value).
    pub fn set(&self, labels: &[(&str, &str)], value: f64) -> &Self {
        let key = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        self.family.get_or_create(&key).set(value);
        self
    }
}

/// The exposition of `registries`, one after the other.
pub fn encode(registries: &[&Registry]) -> Result<String> {
    let mut out = String::new();
    for registry in registries {
        prometheus_text::encode(&mut out, registry).context("encoding metrics")?;
    }
    Ok(out)
}

/// What a scrape runs: the whole exposition, or why it could not be collected.
pub type RenderFuture = Pin<Box<dyn Future<Output = Result<String>> + Send>>;

/// The callback a service supplies to [`serve`].
pub type Render = Arc<dyn Fn() -> RenderFuture + Send + Sync>;

/// Serves `GET /metrics` (the text from `render`, or 500 with the error when it fails) and
/// `GET /healthz` (`ok`) on `listener` until `shutdown` resolves. With a `token`, `/metrics`
/// answers 401 unless the request carries `Authorization: Bearer <token>`.
pub async fn serve(
    listener: TcpListener,
    render: Render,
    token: Option<String>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let app = axum::Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .with_state(Scrape {
            render,
            token: token.map(Arc::from),
        });
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
        .context("serving the admin port")
}

/// What `/metrics` needs: how to render, and the token it requires, if any.
#[derive(Clone)]
struct Scrape {
    render: Render,
    token: Option<Arc<str>>,
}

async fn metrics(State(scrape): State<Scrape>, headers: header::HeaderMap) -> Response {
    if let Some(token) = &scrape.token {
        let given = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or_default();
        // Their digests compared in constant time: the answer's timing says nothing about
        // the token, its length included.
        use sha2::{Digest, Sha256};
        let equal = Sha256::digest(given.as_bytes())
            .iter()
            .zip(Sha256::digest(token.as_bytes()).iter())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0;
        if !equal {
            return (
                StatusCode::UNAUTHORIZED,
                [(header::WWW_AUTHENTICATE, "Bearer")],
                "this admin port requires Authorization: Bearer <admin_token>\n",
            )
                .into_response();
        }
    }
    match (scrape.render)().await {
        Ok(body) => ([(header::CONTENT_TYPE, CONTENT_TYPE)], body).into_response(),
        Err(e) => {
            tracing::warn!(error = format!("{e:#}"), "collecting metrics failed");
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("collecting metrics failed: {e:#}\n"),
            )
                .into_response()
        }
    }
}

/// Binds `addr` (`host:port`) when given, or takes the listener handed down for it: the admin
/// port of a configuration.
pub async fn bind(addr: Option<&str>) -> Result<Option<TcpListener>> {
    match addr {
        Some(a) => Ok(Some(
            crate::listen::bind(a)
                .await
                .with_context(|| format!("binding the admin port {a}"))?,
        )),
        None => Ok(None),
    }
}

/// Runs [`serve`] in a task until `stop` turns true, when a listener is given; a failing
/// admin port is logged and does not stop the service.
pub fn spawn(
    listener: Option<TcpListener>,
    render: Render,
    token: Option<String>,
    mut stop: watch::Receiver<bool>,
) -> Option<tokio::task::JoinHandle<()>> {
    let listener = listener?;
    let addr = listener.local_addr().ok();
    tracing::info!(?addr, "admin port serving /metrics and /healthz");
    Some(tokio::spawn(async move {
        let shutdown = async move {
            let _ = stop.wait_for(|s| *s).await;
        };
        if let Err(e) = serve(listener, render, token, shutdown).await {
            tracing::error!(error = format!("{e:#}"), "admin port failed");
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The exposition as its `# HELP`/`# TYPE` header and its samples, sorted: the order of
    /// series within a family is not part of the format.
    fn encoded(registry: &Registry) -> (Vec<String>, Vec<String>) {
        let text = encode(&[registry]).unwrap();
        assert!(text.ends_with('\n'), "{text}");
        let (header, samples): (Vec<String>, Vec<String>) = text
            .lines()
            .map(str::to_string)
            .partition(|l| l.starts_with('#'));
        let mut samples = samples;
        samples.sort();
        (header, samples)
    }

    #[test]
    fn label_values_are_escaped() {
        let mut r = Registry::default();
        let c = CounterVec::register(&mut r, "x", "Help with \\ and\nnewline.", &["name"]);
        c.inc(&["say \"hi\"\\\n"]);
        c.inc(&["päivä ok"]);
        assert_eq!(
            encoded(&r),
            (
                vec![
                    "# HELP x_total Help with \\\\ and\\nnewline.".to_string(),
                    "# TYPE x_total counter".to_string(),
                ],
                vec![
                    "x_total{name=\"päivä ok\"} 1".to_string(),
                    "x_total{name=\"say \\\"hi\\\"\\\\\\n\"} 1".to_string(),
                ]
            )
        );
    }

    #[test]
    fn counters_add_per_label_set() {
        let mut r = Registry::default();
        let c = CounterVec::register(&mut r, "d", "Deliveries.", &["processor", "op"]);
        c.inc(&["b", "deliver"]);
        c.inc(&["a", "deliver"]);
        c.inc_by(&["a", "deliver"], 4);
        c.inc_by(&["a", "cancel"], 0);
        assert_eq!(c.get(&["a", "deliver"]), 5);
        assert_eq!(c.get(&["z", "deliver"]), 0);
        assert_eq!(
            encoded(&r),
            (
                vec![
                    "# HELP d_total Deliveries.".to_string(),
                    "# TYPE d_total counter".to_string(),
                ],
                vec![
                    "d_total{processor=\"a\",op=\"cancel\"} 0".to_string(),
                    "d_total{processor=\"a\",op=\"deliver\"} 5".to_string(),
                    "d_total{processor=\"b\",op=\"deliver\"} 1".to_string(),
                ]
            )
        );
    }

    #[test]
    fn histogram_buckets_are_cumulative_with_sum_and_count() {
        let mut r = Registry::default();
        let h = HistogramVec::register(&mut r, "lat_seconds", "Latency.", &["p"], &[1.0, 0.1, 0.5]);
        for v in [0.05, 0.1, 0.3, 2.0, f64::NAN] {
            h.observe(&["x"], v);
        }
        h.touch(&["y"]);
        let (header, samples) = encoded(&r);
        assert_eq!(
            header,
            [
                "# HELP lat_seconds Latency.",
                "# TYPE lat_seconds histogram"
            ]
        );
        let mut expected = vec![
            "lat_seconds_bucket{p=\"x\",le=\"0.1\"} 2",
            "lat_seconds_bucket{p=\"x\",le=\"0.5\"} 3",
            "lat_seconds_bucket{p=\"x\",le=\"1\"} 3",
            "lat_seconds_bucket{p=\"x\",le=\"+Inf\"} 4",
            "lat_seconds_sum{p=\"x\"} 2.45",
            "lat_seconds_count{p=\"x\"} 4",
            "lat_seconds_bucket{p=\"y\",le=\"0.1\"} 0",
            "lat_seconds_bucket{p=\"y\",le=\"0.5\"} 0",
            "lat_seconds_bucket{p=\"y\",le=\"1\"} 0",
            "lat_seconds_bucket{p=\"y\",le=\"+Inf\"} 0",
            "lat_seconds_sum{p=\"y\"} 0.0",
            "lat_seconds_count{p=\"y\"} 0",
        ];
        expected.sort_unstable();
        assert_eq!(samples, expected);
        // A family's lines stay together, each series' buckets in ascending order.
        let text = encode(&[&r]).unwrap();
        let x: Vec<&str> = text.lines().filter(|l| l.contains("p=\"x\"")).collect();
        assert!(
            x[0].contains("le=\"0.1\"") && x[3].contains("le=\"+Inf\""),
            "{text}"
        );
    }

    #[test]
    fn unlabelled_histogram_and_gauges() {
        let mut r = Registry::default();
        let h = HistogramVec::register(&mut r, "h", "H.", &[], &[1.0]);
        h.observe(&[], 1.0);
        let text = encode(&[&r]).unwrap();
        assert!(
            text.contains("h_bucket{le=\"1\"} 1\nh_bucket{le=\"+Inf\"} 1\nh_sum 1.0\nh_count 1\n"),
            "{text}"
        );

        let mut r = Registry::default();
        let g = GaugeFamily::register(&mut r, "depth", "Depth.");
        g.set(&[("op", "deliver")], 3.0)
            .set(&[("op", "cancel")], 0.5)
            .set(&[("op", "deliver")], 2.0);
        let one = GaugeFamily::register(&mut r, "one", "One.");
        one.set(&[], 7.0);
        let text = encode(&[&r]).unwrap();
        let (header, samples) = encoded(&r);
        assert_eq!(
            header,
            [
                "# HELP depth Depth.",
                "# TYPE depth gauge",
                "# HELP one One.",
                "# TYPE one gauge"
            ]
        );
        assert_eq!(
            samples,
            [
                "depth{op=\"cancel\"} 0.5",
                "depth{op=\"deliver\"} 2.0",
                "one 7.0"
            ]
        );
        assert!(text.ends_with("\none 7.0\n"), "{text}");
    }

    #[test]
    fn registries_are_encoded_in_turn() {
        let mut scrape = Registry::default();
        GaugeFamily::register(&mut scrape, "g", "G.").set(&[], 1.0);
        let mut process = Registry::default();
        CounterVec::register(&mut process, "c", "C.", &[]).inc(&[]);
        assert_eq!(
            encode(&[&scrape, &process]).unwrap(),
            "# HELP g G.\n# TYPE g gauge\ng 1.0\n# HELP c_total C.\n# TYPE c_total counter\nc_total 1\n"
        );
    }

    #[tokio::test]
    async fn serves_metrics_and_health() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let render: Render = Arc::new(|| Box::pin(async { Ok("x 1\n".to_string()) }));
        let (stop_tx, stop_rx) = watch::channel(false);
        let task = spawn(Some(listener), render, None, stop_rx).unwrap();
        let get = |path: &'static str| get(addr, path, "");
        let m = get("/metrics").await;
        assert!(m.starts_with("HTTP/1.1 200"), "{m}");
        assert!(
            m.to_ascii_lowercase()
                .contains("content-type: text/plain; version=0.0.4; charset=utf-8"),
            "{m}"
        );
        assert!(m.ends_with("\r\n\r\nx 1\n"), "{m}");
        let h = get("/healthz").await;
        assert!(h.starts_with("HTTP/1.1 200") && h.ends_with("ok\n"), "{h}");
        assert!(get("/nope").await.starts_with("HTTP/1.1 404"));
        stop_tx.send(true).unwrap();
        tokio::time::timeout(std::time::Duration::from_secs(5), task)
            .await
            .unwrap()
            .unwrap();
    }

    /// The answer to `GET path` on `addr`, with extra header lines.
    async fn get(addr: std::net::SocketAddr, path: &str, headers: &str) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: x\r\n{headers}Connection: close\r\n\r\n")
                .as_bytes(),
        )
        .await
        .unwrap();
        let mut text = String::new();
        s.read_to_string(&mut text).await.unwrap();
        text
    }

    #[tokio::test]
    async fn with_a_token_metrics_need_it_and_health_does_not() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let render: Render = Arc::new(|| Box::pin(async { Ok("x 1\n".to_string()) }));
        let (stop_tx, stop_rx) = watch::channel(false);
        let token = "a-long-enough-admin-token";
        let task = spawn(Some(listener), render, Some(token.into()), stop_rx).unwrap();
        for headers in [
            String::new(),
            "Authorization: Bearer wrong-token-of-the-same-len\r\n".into(),
            format!("Authorization: Bearer {token}x\r\n"),
            format!("Authorization: Basic {token}\r\n"),
        ] {
            let m = get(addr, "/metrics", &headers).await;
            assert!(m.starts_with("HTTP/1.1 401"), "{headers}: {m}");
            assert!(!m.contains("x 1"), "{m}");
        }
        let m = get(
            addr,
            "/metrics",
            &format!("Authorization: Bearer {token}\r\n"),
        )
        .await;
        assert!(m.starts_with("HTTP/1.1 200") && m.ends_with("x 1\n"), "{m}");
        let h = get(addr, "/healthz", "").await;
        assert!(h.starts_with("HTTP/1.1 200") && h.ends_with("ok\n"), "{h}");
        stop_tx.send(true).unwrap();
        tokio::time::timeout(std::time::Duration::from_secs(5), task)
            .await
            .unwrap()
            .unwrap();
    }
}
