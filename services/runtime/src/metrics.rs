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
//! It serves at most [`MAX_ADMIN_CONNECTIONS`] connections at once and closes one that sends
//! no request for [`ADMIN_HEADER_TIMEOUT`], so that connections to it cannot take the file
//! descriptors the gRPC port needs.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

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
use tokio::time::Instant;

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

/// How many connections the admin port serves at once; one more is closed as soon as it is
/// accepted. Scrapers and probes use one or two each.
pub const MAX_ADMIN_CONNECTIONS: usize = 64;

/// How long a connection to the admin port may take to send a request's line and headers,
/// counted from when it opens and again from the end of each answer: a connection that sends
/// nothing, or part of a request, or stays idle between requests this long, is closed.
pub const ADMIN_HEADER_TIMEOUT: Duration = Duration::from_secs(5);

/// How long connections still open when the admin port stops may take to finish their
/// requests; then they are dropped.
const ADMIN_DRAIN: Duration = Duration::from_secs(5);

/// How often at most connections refused at [`MAX_ADMIN_CONNECTIONS`] are logged.
const ADMIN_REFUSALS_LOG_EVERY: Duration = Duration::from_secs(10);

/// The admin port's bounds; tests shrink them.
#[derive(Debug, Clone, Copy)]
struct AdminLimits {
    connections: usize,
    header_timeout: Duration,
}

impl AdminLimits {
    const DEFAULT: Self = Self {
        connections: MAX_ADMIN_CONNECTIONS,
        header_timeout: ADMIN_HEADER_TIMEOUT,
    };
}

/// Serves `GET /metrics` (the text from `render`, or 500 with the error when it fails) and
/// `GET /healthz` (`ok`) on `listener` until `shutdown` resolves, over HTTP/1.1, within
/// [`MAX_ADMIN_CONNECTIONS`] and [`ADMIN_HEADER_TIMEOUT`]. With a `token`, `/metrics`
/// answers 401 unless the request carries `Authorization: Bearer <token>`. Once `shutdown`
/// resolves, connections finish the request they are serving (at most 5 s) and close.
pub async fn serve(
    listener: TcpListener,
    render: Render,
    token: Option<String>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    serve_within(listener, render, token, shutdown, AdminLimits::DEFAULT).await
}

async fn serve_within(
    listener: TcpListener,
    render: Render,
    token: Option<String>,
    shutdown: impl Future<Output = ()> + Send + 'static,
    limits: AdminLimits,
) -> Result<()> {
    use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
    let app = axum::Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .with_state(Scrape {
            render,
            token: token.map(Arc::from),
        });
    let service = hyper_util::service::TowerToHyperService::new(app);
    // HTTP/1 only: the automatic builder would first wait, without a deadline, for enough
    // bytes to tell HTTP/2 from HTTP/1. hyper's header read timeout runs from when the
    // connection opens and again whenever it is idle between requests.
    let mut http = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new()).http1_only();
    http.http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout);
    let places = Arc::new(tokio::sync::Semaphore::new(limits.connections));
    let (stop, stopping) = watch::channel(false);
    let mut connections = tokio::task::JoinSet::new();
    let mut refusals = Refusals::default();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => {
                let tcp = match accepted {
                    Ok((tcp, _)) => tcp,
                    Err(e) => {
                        // Out of file descriptors, most likely: let connections close.
                        tracing::debug!(error = %e, "admin port: accepting a connection failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                // Accepted and closed at once rather than left in the backlog, where a flood's
                // connections would be served before any later client's.
                let Ok(place) = places.clone().try_acquire_owned() else {
                    drop(tcp);
                    refusals.refused(Instant::now(), limits.connections);
                    continue;
                };
                let (http, service) = (http.clone(), service.clone());
                let mut stopping = stopping.clone();
                connections.spawn(async move {
                    let _place = place;
                    let connection = http.serve_connection(TokioIo::new(tcp), service);
                    tokio::pin!(connection);
                    tokio::select! {
                        _ = connection.as_mut() => return,
                        _ = stopping.wait_for(|s| *s) => {}
                    }
                    connection.as_mut().graceful_shutdown();
                    let _ = connection.await;
                });
            }
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
    drop(listener);
    stop.send_replace(true);
    let drained = async { while connections.join_next().await.is_some() {} };
    // Dropping the set aborts those still open.
    let _ = tokio::time::timeout(ADMIN_DRAIN, drained).await;
    Ok(())
}

/// Connections refused at the cap, logged at most once per [`ADMIN_REFUSALS_LOG_EVERY`] with
/// how many were refused since the last line.
#[derive(Default)]
struct Refusals {
    next_line: Option<Instant>,
    unlogged: u64,
}

impl Refusals {
    fn refused(&mut self, now: Instant, max: usize) {
        self.unlogged += 1;
        if self.next_line.is_some_and(|at| now < at) {
            return;
        }
        tracing::warn!(
            refused = self.unlogged,
            max,
            "admin port: connections refused, as many as it serves are open"
        );
        self.unlogged = 0;
        self.next_line = Some(now + ADMIN_REFUSALS_LOG_EVERY);
    }
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
    // The address itself (`127.0.0.1:9464`), not the Option's debug text.
    let addr = listener.local_addr().ok().map(tracing::field::display);
    tracing::info!(addr, "admin port serving /metrics and /healthz");
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

    /// How long a test waits for what must happen before it fails instead of hanging.
    const GUARD: std::time::Duration = std::time::Duration::from_secs(20);

    /// Serves the admin port on 127.0.0.1 within `limits` until the test ends; its address.
    async fn serving(limits: AdminLimits) -> std::net::SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let render: Render = Arc::new(|| Box::pin(async { Ok("x 1\n".to_string()) }));
        tokio::spawn(serve_within(
            listener,
            render,
            None,
            std::future::pending(),
            limits,
        ));
        addr
    }

    /// Whether the server closed `tcp`: a read ends without an answer.
    async fn closed_by_server(tcp: &mut tokio::net::TcpStream) -> bool {
        use tokio::io::AsyncReadExt;
        let mut buf = [0u8; 1024];
        loop {
            match tokio::time::timeout(GUARD, tcp.read(&mut buf)).await {
                Ok(Ok(0) | Err(_)) => return true,
                // What answered an earlier request.
                Ok(Ok(_)) => continue,
                Err(_) => return false,
            }
        }
    }

    /// Whether `tcp` is still open: a read finds nothing to read for a moment.
    async fn still_open(tcp: &mut tokio::net::TcpStream) -> bool {
        use tokio::io::AsyncReadExt;
        let mut buf = [0u8; 64];
        tokio::time::timeout(std::time::Duration::from_millis(100), tcp.read(&mut buf))
            .await
            .is_err()
    }

    /// Whether `GET /healthz` on a new connection is answered `ok`.
    async fn healthy(addr: std::net::SocketAddr) -> bool {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let Ok(mut s) = tokio::net::TcpStream::connect(addr).await else {
            return false;
        };
        let request = b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
        if s.write_all(request).await.is_err() {
            return false;
        }
        let mut text = Vec::new();
        let _ = tokio::time::timeout(GUARD, s.read_to_end(&mut text)).await;
        let text = String::from_utf8_lossy(&text);
        text.starts_with("HTTP/1.1 200") && text.ends_with("ok\n")
    }

    /// Idle connections beyond the cap are closed as soon as they are accepted, those within
    /// it stay, and a place given back serves the next client.
    #[tokio::test]
    async fn connections_beyond_the_cap_are_closed_at_once() {
        use tokio::io::AsyncWriteExt;
        let cap = 3;
        let addr = serving(AdminLimits {
            connections: cap,
            header_timeout: std::time::Duration::from_secs(3600),
        })
        .await;
        // The listener takes them in the order they connected.
        let mut held = Vec::new();
        for _ in 0..cap {
            let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
            tcp.write_all(b"GET /hea").await.unwrap();
            held.push(tcp);
        }
        let mut beyond = Vec::new();
        for _ in 0..5 {
            beyond.push(tokio::net::TcpStream::connect(addr).await.unwrap());
        }
        for (i, tcp) in beyond.iter_mut().enumerate() {
            assert!(
                closed_by_server(tcp).await,
                "connection {i} beyond the cap is closed"
            );
        }
        for (i, tcp) in held.iter_mut().enumerate() {
            assert!(
                still_open(tcp).await,
                "connection {i} within the cap stays open"
            );
        }
        drop(held.pop());
        tokio::time::timeout(GUARD, async {
            while !healthy(addr).await {
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
        })
        .await
        .expect("a client is served once a connection closed");
    }

    /// A connection that sends nothing, one that sends part of a request line and one idle
    /// after its answer are all closed after the header timeout, and the port still answers.
    #[tokio::test]
    async fn idle_connections_are_closed_after_the_header_timeout() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let addr = serving(AdminLimits {
            connections: MAX_ADMIN_CONNECTIONS,
            header_timeout: std::time::Duration::from_millis(300),
        })
        .await;
        let mut silent = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut partial = tokio::net::TcpStream::connect(addr).await.unwrap();
        partial.write_all(b"GET /metr").await.unwrap();
        let mut kept_alive = tokio::net::TcpStream::connect(addr).await.unwrap();
        kept_alive
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut answer = [0u8; 256];
        let n = tokio::time::timeout(GUARD, kept_alive.read(&mut answer))
            .await
            .unwrap()
            .unwrap();
        assert!(answer[..n].starts_with(b"HTTP/1.1 200"));
        for (what, tcp) in [
            ("silent", &mut silent),
            ("partial", &mut partial),
            ("kept alive", &mut kept_alive),
        ] {
            assert!(
                closed_by_server(tcp).await,
                "the {what} connection is closed"
            );
        }
        assert!(healthy(addr).await);
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
