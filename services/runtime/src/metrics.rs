//! Metrics in the Prometheus text exposition format (version 0.0.4), served on a plain-HTTP
//! admin port together with a liveness probe.
//!
//! Counters and histograms live in the process ([`CounterVec`], [`HistogramVec`]: label sets
//! to atomics or to a small locked record), and start from zero at every start, as
//! Prometheus expects of counters. Gauges that describe the store (requests by state, queue
//! depths) are computed when scraped, by a callback each service supplies
//! ([`GaugeFamily`]), so they are right after a restart and agree between replicas sharing a
//! database.
//!
//! [`serve`] answers `GET /metrics` and `GET /healthz` on a listener the caller bound. The
//! admin port has neither TLS nor authentication and carries no personal data (labels are
//! kinds, states and configured names): bind it to loopback or a private network.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};

use anyhow::{Context, Result};
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tokio::net::TcpListener;
use tokio::sync::watch;

/// The media type of the text exposition format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Histogram buckets (seconds) for latencies from milliseconds (a local database) to an hour
/// (a registry that was down).
pub const LATENCY_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0,
];

/// A counter with labels: one monotonically increasing value per label set.
#[derive(Debug)]
pub struct CounterVec {
    name: &'static str,
    help: &'static str,
    labels: &'static [&'static str],
    values: RwLock<BTreeMap<Vec<String>, Arc<AtomicU64>>>,
}

impl CounterVec {
    /// A counter named `name` (ending in `_total`) with these label names.
    pub fn new(name: &'static str, help: &'static str, labels: &'static [&'static str]) -> Self {
        Self {
            name,
            help,
            labels,
            values: RwLock::new(BTreeMap::new()),
        }
    }

    /// Adds one to the series with these label values (in the order of the label names).
    pub fn inc(&self, values: &[&str]) {
        self.inc_by(values, 1);
    }

    /// Adds `n`; `inc_by(values, 0)` makes the series appear with 0 before anything happens.
    pub fn inc_by(&self, values: &[&str], n: u64) {
        debug_assert_eq!(
            values.len(),
            self.labels.len(),
            "{}: label count",
            self.name
        );
        let key: Vec<String> = values.iter().map(|v| v.to_string()).collect();
        let found = self
            .values
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&key)
            .cloned();
        let counter = match found {
            Some(c) => c,
            None => self
                .values
                .write()
                .unwrap_or_else(PoisonError::into_inner)
                .entry(key)
                .or_default()
                .clone(),
        };
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// The current value of one series (0 if it never appeared).
    pub fn get(&self, values: &[&str]) -> u64 {
        let key: Vec<String> = values.iter().map(|v| v.to_string()).collect();
        self.values
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&key)
            .map_or(0, |c| c.load(Ordering::Relaxed))
    }

    /// Appends the family in the text format.
    pub fn encode(&self, out: &mut String) {
        write_header(out, self.name, self.help, "counter");
        let values = self.values.read().unwrap_or_else(PoisonError::into_inner);
        for (key, value) in values.iter() {
            let labels: Vec<(&str, &str)> = self
                .labels
                .iter()
                .copied()
                .zip(key.iter().map(String::as_str))
                .collect();
            write_sample(
                out,
                self.name,
                &labels,
                &value.load(Ordering::Relaxed).to_string(),
            );
        }
    }
}

#[derive(Debug, Clone, Default)]
struct HistogramData {
    /// Observations per bucket (not cumulative); the last slot is above every bound.
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

/// A histogram with labels: cumulative bucket counts, sum and count per label set.
#[derive(Debug)]
pub struct HistogramVec {
    name: &'static str,
    help: &'static str,
    labels: &'static [&'static str],
    bounds: Vec<f64>,
    series: Mutex<BTreeMap<Vec<String>, HistogramData>>,
}

/// A snapshot of one histogram series.
#[derive(Debug, Clone, PartialEq)]
pub struct HistogramSnapshot {
    /// `(upper bound, cumulative count)` per bucket, the last with bound +Inf.
    pub buckets: Vec<(f64, u64)>,
    /// Sum of the observed values.
    pub sum: f64,
    /// Number of observations.
    pub count: u64,
}

impl HistogramVec {
    /// A histogram named `name` with these label names and bucket upper bounds (ascending;
    /// +Inf is implied).
    pub fn new(
        name: &'static str,
        help: &'static str,
        labels: &'static [&'static str],
        bounds: &[f64],
    ) -> Self {
        let mut bounds: Vec<f64> = bounds.iter().copied().filter(|b| b.is_finite()).collect();
        bounds.sort_by(f64::total_cmp);
        bounds.dedup();
        Self {
            name,
            help,
            labels,
            bounds,
            series: Mutex::new(BTreeMap::new()),
        }
    }

    /// Records one observation in the series with these label values. NaN is ignored.
    pub fn observe(&self, values: &[&str], v: f64) {
        debug_assert_eq!(
            values.len(),
            self.labels.len(),
            "{}: label count",
            self.name
        );
        if v.is_nan() {
            return;
        }
        let key: Vec<String> = values.iter().map(|v| v.to_string()).collect();
        let slot = self
            .bounds
            .iter()
            .position(|b| v <= *b)
            .unwrap_or(self.bounds.len());
        let mut series = self.series.lock().unwrap_or_else(PoisonError::into_inner);
        let data = series.entry(key).or_insert_with(|| HistogramData {
            counts: vec![0; self.bounds.len() + 1],
            ..Default::default()
        });
        data.counts[slot] += 1;
        data.sum += v;
        data.count += 1;
    }

    /// Makes the series appear with zero observations.
    pub fn touch(&self, values: &[&str]) {
        let key: Vec<String> = values.iter().map(|v| v.to_string()).collect();
        self.series
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(key)
            .or_insert_with(|| HistogramData {
                counts: vec![0; self.bounds.len() + 1],
                ..Default::default()
            });
    }

    /// One series as it stands, if it appeared.
    pub fn snapshot(&self, values: &[&str]) -> Option<HistogramSnapshot> {
        let key: Vec<String> = values.iter().map(|v| v.to_string()).collect();
        let series = self.series.lock().unwrap_or_else(PoisonError::into_inner);
        series.get(&key).map(|d| self.snapshot_of(d))
    }

    fn snapshot_of(&self, d: &HistogramData) -> HistogramSnapshot {
        let mut cumulative = 0;
        let buckets = self
            .bounds
            .iter()
            .copied()
            .chain(std::iter::once(f64::INFINITY))
            .zip(&d.counts)
            .map(|(bound, n)| {
                cumulative += n;
                (bound, cumulative)
            })
            .collect();
        HistogramSnapshot {
            buckets,
            sum: d.sum,
            count: d.count,
        }
    }

    /// Appends the family in the text format.
    pub fn encode(&self, out: &mut String) {
        write_header(out, self.name, self.help, "histogram");
        let series = self.series.lock().unwrap_or_else(PoisonError::into_inner);
        let bucket_name = format!("{}_bucket", self.name);
        for (key, data) in series.iter() {
            let labels: Vec<(&str, &str)> = self
                .labels
                .iter()
                .copied()
                .zip(key.iter().map(String::as_str))
                .collect();
            let snap = self.snapshot_of(data);
            for (bound, n) in &snap.buckets {
                let le = format_value(*bound);
                let mut with_le = labels.clone();
                with_le.push(("le", &le));
                write_sample(out, &bucket_name, &with_le, &n.to_string());
            }
            write_sample(
                out,
                &format!("{}_sum", self.name),
                &labels,
                &format_value(snap.sum),
            );
            write_sample(
                out,
                &format!("{}_count", self.name),
                &labels,
                &snap.count.to_string(),
            );
        }
    }
}

/// A gauge family computed at scrape time.
#[derive(Debug, Clone)]
pub struct GaugeFamily {
    name: &'static str,
    help: &'static str,
    samples: BTreeMap<Vec<(String, String)>, f64>,
}

impl GaugeFamily {
    /// An empty family.
    pub fn new(name: &'static str, help: &'static str) -> Self {
        Self {
            name,
            help,
            samples: BTreeMap::new(),
        }
    }

    /// Sets the sample with these labels (replacing an earlier value).
    pub fn set(&mut self, labels: &[(&str, &str)], value: f64) -> &mut Self {
        let key = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        self.samples.insert(key, value);
        self
    }

    /// Appends the family in the text format.
    pub fn encode(&self, out: &mut String) {
        write_header(out, self.name, self.help, "gauge");
        for (labels, value) in &self.samples {
            let labels: Vec<(&str, &str)> = labels
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect();
            write_sample(out, self.name, &labels, &format_value(*value));
        }
    }
}

/// Escapes a label value: backslash, double quote and line feed.
pub fn escape_label_value(v: &str) -> String {
    let mut s = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => s.push_str("\\\\"),
            '"' => s.push_str("\\\""),
            '\n' => s.push_str("\\n"),
            c => s.push(c),
        }
    }
    s
}

/// Escapes HELP text: backslash and line feed.
fn escape_help(v: &str) -> String {
    v.replace('\\', "\\\\").replace('\n', "\\n")
}

/// A sample value as the text format writes it: `+Inf`, `-Inf`, `NaN`, integers without a
/// fraction, others in the shortest form that reads back exactly.
pub fn format_value(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v == f64::INFINITY {
        "+Inf".into()
    } else if v == f64::NEG_INFINITY {
        "-Inf".into()
    } else if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{}", v as i64)
    } else {
        format!("{v}")
    }
}

fn write_header(out: &mut String, name: &str, help: &str, kind: &str) {
    let _ = writeln!(out, "# HELP {name} {}", escape_help(help));
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

fn write_sample(out: &mut String, name: &str, labels: &[(&str, &str)], value: &str) {
    out.push_str(name);
    if !labels.is_empty() {
        out.push('{');
        for (i, (k, v)) in labels.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            let _ = write!(out, "{k}=\"{}\"", escape_label_value(v));
        }
        out.push('}');
    }
    out.push(' ');
    out.push_str(value);
    out.push('\n');
}

/// What a scrape runs: the whole exposition, or why it could not be collected.
pub type RenderFuture = Pin<Box<dyn Future<Output = Result<String>> + Send>>;

/// The callback a service supplies to [`serve`].
pub type Render = Arc<dyn Fn() -> RenderFuture + Send + Sync>;

/// Serves `GET /metrics` (the text from `render`, or 500 with the error when it fails) and
/// `GET /healthz` (`ok`) on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    render: Render,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let app = axum::Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .with_state(render);
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
        .context("serving the admin port")
}

async fn metrics(State(render): State<Render>) -> Response {
    match render().await {
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
    mut stop: watch::Receiver<bool>,
) -> Option<tokio::task::JoinHandle<()>> {
    let listener = listener?;
    let addr = listener.local_addr().ok();
    tracing::info!(?addr, "admin port serving /metrics and /healthz");
    Some(tokio::spawn(async move {
        let shutdown = async move {
            let _ = stop.wait_for(|s| *s).await;
        };
        if let Err(e) = serve(listener, render, shutdown).await {
            tracing::error!(error = format!("{e:#}"), "admin port failed");
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape_label_value(r#"a\b"c"#), r#"a\\b\"c"#);
        assert_eq!(escape_label_value("two\nlines"), "two\\nlines");
        assert_eq!(escape_label_value("päivä ok"), "päivä ok");
        let c = CounterVec::new("x_total", "Help with \\ and\nnewline.", &["name"]);
        c.inc(&["say \"hi\"\\\n"]);
        let mut out = String::new();
        c.encode(&mut out);
        assert_eq!(
            out,
            "# HELP x_total Help with \\\\ and\\nnewline.\n\
             # TYPE x_total counter\n\
             x_total{name=\"say \\\"hi\\\"\\\\\\n\"} 1\n"
        );
    }

    #[test]
    fn counters_add_per_label_set() {
        let c = CounterVec::new("d_total", "Deliveries.", &["processor", "op"]);
        c.inc(&["b", "deliver"]);
        c.inc(&["a", "deliver"]);
        c.inc_by(&["a", "deliver"], 4);
        c.inc_by(&["a", "cancel"], 0);
        assert_eq!(c.get(&["a", "deliver"]), 5);
        assert_eq!(c.get(&["z", "deliver"]), 0);
        let mut out = String::new();
        c.encode(&mut out);
        assert_eq!(
            out,
            "# HELP d_total Deliveries.\n\
             # TYPE d_total counter\n\
             d_total{processor=\"a\",op=\"cancel\"} 0\n\
             d_total{processor=\"a\",op=\"deliver\"} 5\n\
             d_total{processor=\"b\",op=\"deliver\"} 1\n"
        );
    }

    #[test]
    fn histogram_buckets_are_cumulative_with_sum_and_count() {
        let h = HistogramVec::new("lat_seconds", "Latency.", &["p"], &[1.0, 0.1, 0.5]);
        for v in [0.05, 0.1, 0.3, 2.0, f64::NAN] {
            h.observe(&["x"], v);
        }
        let s = h.snapshot(&["x"]).unwrap();
        assert_eq!(
            s.buckets,
            vec![(0.1, 2), (0.5, 3), (1.0, 3), (f64::INFINITY, 4)]
        );
        assert_eq!(s.count, 4);
        assert!((s.sum - 2.45).abs() < 1e-9);
        h.touch(&["y"]);
        let mut out = String::new();
        h.encode(&mut out);
        assert_eq!(
            out,
            "# HELP lat_seconds Latency.\n\
             # TYPE lat_seconds histogram\n\
             lat_seconds_bucket{p=\"x\",le=\"0.1\"} 2\n\
             lat_seconds_bucket{p=\"x\",le=\"0.5\"} 3\n\
             lat_seconds_bucket{p=\"x\",le=\"1\"} 3\n\
             lat_seconds_bucket{p=\"x\",le=\"+Inf\"} 4\n\
             lat_seconds_sum{p=\"x\"} 2.45\n\
             lat_seconds_count{p=\"x\"} 4\n\
             lat_seconds_bucket{p=\"y\",le=\"0.1\"} 0\n\
             lat_seconds_bucket{p=\"y\",le=\"0.5\"} 0\n\
             lat_seconds_bucket{p=\"y\",le=\"1\"} 0\n\
             lat_seconds_bucket{p=\"y\",le=\"+Inf\"} 0\n\
             lat_seconds_sum{p=\"y\"} 0\n\
             lat_seconds_count{p=\"y\"} 0\n"
        );
    }

    #[test]
    fn unlabelled_histogram_and_gauges() {
        let h = HistogramVec::new("h", "H.", &[], &[1.0]);
        h.observe(&[], 1.0);
        let mut out = String::new();
        h.encode(&mut out);
        assert!(out.contains("h_bucket{le=\"1\"} 1\nh_bucket{le=\"+Inf\"} 1\nh_sum 1\nh_count 1\n"));

        let mut g = GaugeFamily::new("depth", "Depth.");
        g.set(&[("op", "deliver")], 3.0)
            .set(&[("op", "cancel")], 0.5)
            .set(&[("op", "deliver")], 2.0);
        let mut out = String::new();
        g.encode(&mut out);
        assert_eq!(
            out,
            "# HELP depth Depth.\n# TYPE depth gauge\ndepth{op=\"cancel\"} 0.5\ndepth{op=\"deliver\"} 2\n"
        );
        let mut g = GaugeFamily::new("one", "One.");
        g.set(&[], 7.0);
        let mut out = String::new();
        g.encode(&mut out);
        assert!(out.ends_with("\none 7\n"));
    }

    #[test]
    fn values_are_formatted_for_prometheus() {
        assert_eq!(format_value(3.0), "3");
        assert_eq!(format_value(-2.0), "-2");
        assert_eq!(format_value(0.25), "0.25");
        assert_eq!(format_value(f64::INFINITY), "+Inf");
        assert_eq!(format_value(f64::NEG_INFINITY), "-Inf");
        assert_eq!(format_value(f64::NAN), "NaN");
        assert_eq!(format_value(1e20), "100000000000000000000");
    }

    #[tokio::test]
    async fn serves_metrics_and_health() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let render: Render = Arc::new(|| Box::pin(async { Ok("x 1\n".to_string()) }));
        let (stop_tx, stop_rx) = watch::channel(false);
        let task = spawn(Some(listener), render, stop_rx).unwrap();
        let get = |path: &'static str| async move {
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            s.write_all(
                format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
            )
            .await
            .unwrap();
            let mut text = String::new();
            s.read_to_string(&mut text).await.unwrap();
            text
        };
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
}
