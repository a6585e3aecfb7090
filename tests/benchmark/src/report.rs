//! Figures, the table they are printed in, the machine they were taken on, and the document
//! written to `docs/`.

use std::fmt::Write as _;

/// A measured figure, or why there is none.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Value {
    /// Measured.
    Num(f64),
    /// Could not be measured (the reason).
    Missing(String),
}

/// What a figure should reach.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Target {
    /// Nothing; the figure is for reference.
    None,
    /// value / baseline ≥ this.
    RatioAtLeast(f64),
    /// value / baseline ≤ this.
    RatioAtMost(f64),
    /// value < this (in the row's unit).
    Below(f64),
    /// value ≤ this (in the row's unit).
    AtMost(f64),
    /// value ≥ this (in the row's unit).
    AtLeast(f64),
}

/// One line of the table.
#[derive(Debug, Clone)]
pub(crate) struct Row {
    /// What was measured.
    pub(crate) figure: String,
    /// The figure.
    pub(crate) value: Value,
    /// Its unit.
    pub(crate) unit: String,
    /// What it is compared with: a name and a figure in the same unit.
    pub(crate) baseline: Option<(String, f64)>,
    /// What it should reach.
    pub(crate) target: Target,
}

impl Row {
    /// A row without baseline or target.
    pub(crate) fn plain(figure: impl Into<String>, value: Value, unit: &str) -> Self {
        Self {
            figure: figure.into(),
            value,
            unit: unit.into(),
            baseline: None,
            target: Target::None,
        }
    }

    /// Compared with `baseline`.
    pub(crate) fn against(mut self, name: impl Into<String>, baseline: f64) -> Self {
        self.baseline = Some((name.into(), baseline));
        self
    }

    /// To reach `target`.
    pub(crate) fn target(mut self, target: Target) -> Self {
        self.target = target;
        self
    }

    /// value / baseline, when both are there.
    pub(crate) fn ratio(&self) -> Option<f64> {
        match (&self.value, &self.baseline) {
            (Value::Num(v), Some((_, b))) if *b > 0.0 => Some(v / b),
            _ => None,
        }
    }

    /// Whether the target is met; `None` without a target or a figure.
    pub(crate) fn met(&self) -> Option<bool> {
        match (self.target, &self.value) {
            (Target::None, _) => None,
            (Target::Below(max), Value::Num(v)) => Some(*v < max),
            (Target::AtMost(max), Value::Num(v)) => Some(*v <= max),
            (Target::AtLeast(min), Value::Num(v)) => Some(*v >= min),
            (Target::RatioAtLeast(min), _) => self.ratio().map(|r| r >= min),
            (Target::RatioAtMost(max), _) => self.ratio().map(|r| r <= max),
            (_, _) => None,
        }
    }

    fn cells(&self) -> [String; 7] {
        let value = match &self.value {
            Value::Num(v) => number(*v),
            Value::Missing(why) => format!("n/a ({why})"),
        };
        let baseline = match &self.baseline {
            Some((name, b)) => format!("{} ({name})", number(*b)),
            None => String::new(),
        };
        let ratio = self.ratio().map(|r| format!("{r:.2}×")).unwrap_or_default();
        let target = match self.target {
            Target::None => String::new(),
            Target::RatioAtLeast(x) => format!("≥ {}× baseline", number(x)),
            Target::RatioAtMost(x) => format!("≤ {}× baseline", number(x)),
            Target::Below(x) => format!("< {} {}", number(x), self.unit),
            Target::AtMost(x) => format!("≤ {} {}", number(x), self.unit),
            Target::AtLeast(x) => format!("≥ {} {}", number(x), self.unit),
        };
        let met = match self.met() {
            Some(true) => "yes".into(),
            Some(false) => "NO".into(),
            None if self.target != Target::None => "—".into(),
            None => String::new(),
        };
        [
            self.figure.clone(),
            value,
            self.unit.clone(),
            baseline,
            ratio,
            target,
            met,
        ]
    }
}

/// A figure with as many decimals as it deserves.
pub(crate) fn number(v: f64) -> String {
    let a = v.abs();
    if a >= 100.0 || v == v.trunc() {
        format!("{v:.0}")
    } else if a >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// The rows as a Markdown table with padded columns, readable as plain text too.
pub(crate) fn render_table(rows: &[Row]) -> String {
    const HEAD: [&str; 7] = [
        "figure", "value", "unit", "baseline", "ratio", "target", "met?",
    ];
    let cells: Vec<[String; 7]> = rows.iter().map(Row::cells).collect();
    let mut width: [usize; 7] = HEAD.map(|h| h.chars().count());
    for row in &cells {
        for (w, c) in width.iter_mut().zip(row) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |items: &[String]| {
        let mut s = String::from("|");
        for (c, w) in items.iter().zip(width) {
            let pad = w - c.chars().count();
            let _ = write!(s, " {c}{} |", " ".repeat(pad));
        }
        s.push('\n');
        s
    };
    let mut out = line(&HEAD.map(String::from));
    out.push_str(&line(&width.map(|w| "-".repeat(w))));
    for row in &cells {
        out.push_str(&line(row));
    }
    out
}

/// The `p`-th percentile (0 < p ≤ 100) of `sorted` by the nearest-rank method: the smallest
/// value such that at least `p` % of the values are at most it.
pub(crate) fn percentile(sorted: &[f64], p: f64) -> Option<f64> {
    if sorted.is_empty() || !(p > 0.0 && p <= 100.0) {
        return None;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

/// The machine and the software the figures were taken with.
#[derive(Debug, Clone)]
pub(crate) struct Machine {
    /// (what, description) pairs, in order.
    pub(crate) facts: Vec<(String, String)>,
}

impl Machine {
    /// Reads /proc and asks `rustc` for its version; `store` names the backend.
    pub(crate) fn describe(store: &str, data_dir: &std::path::Path) -> Self {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu = cpuinfo
            .lines()
            .find(|l| l.starts_with("model name"))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_string())
            .unwrap_or_else(|| "unknown".into());
        let cores = std::thread::available_parallelism()
            .map(|n| n.to_string())
            .unwrap_or_else(|_| "unknown".into());
        let memory = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|m| {
                let line = m.lines().find(|l| l.starts_with("MemTotal:"))?.to_string();
                let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
                Some(format!("{:.1} GiB", kb / 1024.0 / 1024.0))
            })
            .unwrap_or_else(|| "unknown".into());
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|s| format!("Linux {}", s.trim()))
            .unwrap_or_else(|_| "unknown".into());
        let rustc = std::process::Command::new(std::env::var("RUSTC").unwrap_or("rustc".into()))
            .arg("--version")
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_else(|| "unknown".into());
        let filesystem = filesystem_of(data_dir).unwrap_or_else(|| "unknown".into());
        let revision = git_revision().unwrap_or_else(|| "unknown (not a git checkout)".into());
        let date = chrono::Utc::now().format("%Y-%m-%d %H:%M UTC").to_string();
        let facts = [
            ("CPU", cpu),
            ("cores", cores),
            ("memory", memory),
            ("kernel", kernel),
            ("rustc", rustc),
            ("dsrelay revision", revision),
            ("store", store.to_string()),
            ("filesystem of the data folder", filesystem),
            ("date", date),
        ];
        Self {
            facts: facts.into_iter().map(|(k, v)| (k.to_string(), v)).collect(),
        }
    }
}

/// The commit the working directory is at, and whether tracked files differ from it.
fn git_revision() -> Option<String> {
    let git = |args: &[&str]| {
        std::process::Command::new("git")
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    let commit = git(&["rev-parse", "--short", "HEAD"])?;
    let dirty =
        git(&["status", "--porcelain", "--untracked-files=no"]).is_some_and(|s| !s.is_empty());
    Some(if dirty {
        format!("{commit} with uncommitted changes")
    } else {
        commit
    })
}

/// The type and device of the mount `path` lives on, from /proc/mounts.
fn filesystem_of(path: &std::path::Path) -> Option<String> {
    let path = path.canonicalize().ok()?;
    let mounts = std::fs::read_to_string("/proc/mounts").ok()?;
    mounts
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (dev, at, kind) = (f.next()?, f.next()?, f.next()?);
            path.starts_with(at)
                .then(|| (at.len(), format!("{kind} ({dev} on {at})")))
        })
        .max_by_key(|(len, _)| *len)
        .map(|(_, d)| d)
}

/// Everything the document says besides the table.
#[derive(Debug, Clone)]
pub(crate) struct Document {
    /// Title of the document.
    pub(crate) title: String,
    /// The command that produced it.
    pub(crate) command: String,
    /// The machine.
    pub(crate) machine: Machine,
    /// Load and relay settings, one per line.
    pub(crate) settings: Vec<String>,
    /// The figures.
    pub(crate) rows: Vec<Row>,
    /// What the figures say about the targets, one per line.
    pub(crate) notes: Vec<String>,
    /// The statement count's lists, one Markdown block per service (empty when not run).
    pub(crate) statements: Vec<String>,
}

/// What the heading of a section written by hand says; [`keep_hand_written`] keeps such
/// sections when a run rewrites the file.
pub(crate) const HAND_WRITTEN: &str = "(written by hand";

/// `rendered` followed by the sections written by hand of `previous` (the file the run
/// replaces): everything from the first `## ` heading that says [`HAND_WRITTEN`] on. Those
/// sections hold each session's measurements and explanations, which a run cannot
/// regenerate.
pub(crate) fn keep_hand_written(rendered: &str, previous: Option<&str>) -> String {
    let mut out = rendered.trim_end().to_string();
    out.push('\n');
    let Some(previous) = previous else {
        return out;
    };
    let mut at = 0;
    for line in previous.split_inclusive('\n') {
        if line.starts_with("## ") && line.contains(HAND_WRITTEN) {
            out.push('\n');
            out.push_str(&previous[at..]);
            return out;
        }
        at += line.len();
    }
    out
}

impl Document {
    /// The Markdown text.
    pub(crate) fn render(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "# {}\n", self.title);
        let _ = writeln!(
            s,
            "Written by `{}` (the `dsrelay-bench` binary of `tests/benchmark`); running it again \
             replaces everything above the first section written by hand (its heading says \
             \"{HAND_WRITTEN}\"), which it keeps. Figures from a shared or busy machine are \
             noisy: compare ratios to the baselines, which were taken in the same run, rather \
             than absolute figures.\n",
            self.command
        );
        let _ = writeln!(s, "## Machine\n");
        for (k, v) in &self.machine.facts {
            let _ = writeln!(s, "- {k}: {v}");
        }
        let _ = writeln!(s, "\n## Settings\n");
        for line in &self.settings {
            let _ = writeln!(s, "- {line}");
        }
        let _ = writeln!(s, "\n## Figures\n");
        s.push_str(&render_table(&self.rows));
        if !self.notes.is_empty() {
            let _ = writeln!(s, "\n## Notes\n");
            for n in &self.notes {
                let _ = writeln!(s, "- {n}");
            }
        }
        if !self.statements.is_empty() {
            let _ = writeln!(
                s,
                "\n## Statements per erasure\n\nEvery statement the services ran for the \
                 statement count, with its calls per erasure (PostgreSQL's `pg_stat_statements`; \
                 constants shown as `$n`; fewer than 0.005 per erasure left out).\n"
            );
            for block in &self.statements {
                let _ = writeln!(s, "{block}");
            }
        }
        let _ = writeln!(s, "\n## How each figure is measured\n");
        s.push_str(METHOD);
        s
    }
}

const METHOD: &str = "\
- **bare echo**: a tonic server built with `dsrelay_runtime::server::builder` (the services' \
TLS and limits) serving only `grpc.health.v1.Health`, through `dsrelay_runtime::server::serve` \
(TCP_NODELAY), in a process of its own; the same callers as the Submit load call `Check` \
(a trivial unary call) over `dsrelay_runtime::tls::channel` mTLS channels for the fixed \
duration.
- **bare INSERT**: one single-row `INSERT` per durable commit into a fresh table through \
`dsrelay_runtime::store::Db` (SQLite: WAL, `synchronous=FULL`, one connection, in the same \
folder as the services' files; PostgreSQL: the services' pool of 16, a fresh database on the \
same server), by the same number of concurrent callers for the fixed duration.
- **accepted Submits/s**: closed loop, the same callers send `RequestService.Submit` \
(an erasure with one e-mail identity, a unique idempotency key) to the registry for the fixed \
duration; the propagation of what they submit runs at the same time, on the same cores \
(with `delivery.yield_to_intake_ms` set, as the settings say, while Submits queue, four or \
more waiting for their commit, the registry's dispatcher claims at most once per that \
interval, so most of it runs after the load). The two rows after it say how much: the \
load's requests finished when it ended, and the time from its end until all of them were \
finished (read every 100 ms; the wait gives up after 10 s without one \
finishing, or 600 s, and the row then says NOT all finished and how many had).
- **completed propagations/s**: a batch is submitted by the same callers, and the figure is \
the batch size over the time from the first Submit to the last request reaching COMPLETED \
(`finished_at` in the registry's `requests` table); requests still unfinished when nothing \
has finished for 10 s are left out and reported in the notes. Each request goes to two processors, \
each with three `noop` subprocessors (delay 0): 6 tasks, 12 acknowledgements.
- **single-request latency on an idle pair**: after the warm-up and before any load, one \
caller submits one erasure at a time and submits the next once the registry's table shows \
the one before finished (read every 2 ms); per request `finished_at - received_at` as for the \
latency below; p50 and max by nearest rank.
- **latency**: open loop at half the completed rate for the latency duration; per request \
`finished_at - received_at` from the registry's table (received at the registry to the \
acknowledgement that completed it, ms); a request that has not finished when the wait ends \
(nothing finished for 10 s, or 60 s in all) counts with its age then, a lower bound; p50/p99 \
by nearest rank.
- **resident memory**: `VmRSS` of each service process from `/proc/<pid>/status`; idle is \
after start-up and before any request, peak is the highest of samples taken every 100 ms \
from the warm-up to the end of the load. The baseline is the bare echo server's, idle and \
under its own load.
- **machine CPU busy**: the share of all cores' time not idle and not waiting for I/O, from \
`/proc/stat`, over each load: the whole machine, other processes included (figures taken \
while something else runs are not comparable); \"of which\" is the share the measured \
processes used (`/proc/<pid>/stat`): the echo server and this process for the bare echo, \
this process (which runs SQLite, or talks to PostgreSQL) for the bare INSERTs, the three \
services for the relay; on PostgreSQL, when the server runs on this machine, its processes \
(the postmaster and its backends) are also counted, separately.
- **CPU per completed propagation**: each service's CPU time over the batch (from the \
first Submit to the last completion) divided by the requests completed (with the database \
server's on PostgreSQL); its baseline is the CPU time per bare INSERT commit of this process \
(and of the database server on PostgreSQL).
- **one hop** (`--onehop-customers`, `--onehop-erasures`): a registry and one processor \
(the release binaries, the relay's poll settings) whose only subprocessor is the `sql` \
connector with the sample rules, on the sample accounting schema filled with that many \
customers (each with a contact, a paid invoice and a ledger entry from 2010, past every \
retention period); the holder's database is a SQLite file, or on PostgreSQL a fresh database \
on the same server as the services' stores. Each erasure names one existing customer by \
customer number (matched through the schema's UNIQUE index on `customer_no`) and no customer \
twice, so each one deletes a customer, a contact and an invoice and anonymizes a ledger \
entry at the holder. After a warm-up, a batch of `--onehop-erasures` is submitted by \
`--onehop-concurrency` callers (default 64, more than the relay's 16: at 16 each caller's wait \
for its Submit's commit, not the relay, set the batch's pace); completed erasures/s is the batch over the time from the first Submit to the last \
request COMPLETED at the registry; latency is `finished_at - received_at` of an open loop at \
half that rate for the latency duration (fewer when the customers run out; p50/p99 by \
nearest rank); CPU per completed erasure is each service's CPU time over the batch divided by \
the erasures completed (the database server's apart, on PostgreSQL; on SQLite the holder's \
database runs inside the processor). Its baseline is the bare INSERT rate; its target is an \
absolute 1,500/s. Afterwards the services are stopped and every row of the holder's database \
is checked: the customers of the registry's requests (all of which must be COMPLETED) gone \
with their contact and invoice, their ledger entry anonymized, every other row as filled; \
any difference fails the run.
- **statements and commits per erasure**: the relay (same configurations) started again on a \
PostgreSQL server the run starts in a folder of its own with `pg_stat_statements` loaded, \
each service on a database of its own; a batch of erasures submitted by the same callers. Per \
statement text, its calls from after a warm-up to one second after the last erasure \
completed, less what a 3 s idle window just before (the workers' polls that found nothing) \
comes to over as long a time, divided by the erasures completed. Statements are all but \
BEGIN, COMMIT and ROLLBACK; writes are INSERT, UPDATE and DELETE (and WITH statements holding \
one), their rows those the extension counts as affected; commits are COMMIT statements of \
explicit transactions (a statement run outside one commits alone and is listed, not counted \
as a commit). The server's time executing them is `total_exec_time`, taken out of the idle \
window and divided alike: the executor's time alone (the extension times a COMMIT at about \
0, its WAL flush outside; parsing, the protocol and waiting on the client are in none), so \
it is a part of the server's CPU, which the relay figures above give whole. The \
benchmark's own reads are left out. Both stores run the same statements \
except for the audit trail: on PostgreSQL each transaction queues its entries in \
`audit_pending` and the service's chainer chains them in batches (advisory lock, head, \
pending rows, INSERT, DELETE); SQLite chains them in the transaction.
";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_run_keeps_the_sections_written_by_hand() {
        let previous = "# Benchmarks\n\n## Figures\n\n| old | 1 |\n\n## Notes\n\n- old note\n\n\
                        ## Session 9: a cut (written by hand)\n\nkept text\n\n\
                        ## Figures again\n\nalso kept\n";
        let rendered = "# Benchmarks\n\n## Figures\n\n| new | 2 |\n\n";
        assert_eq!(
            keep_hand_written(rendered, Some(previous)),
            "# Benchmarks\n\n## Figures\n\n| new | 2 |\n\n\
             ## Session 9: a cut (written by hand)\n\nkept text\n\n## Figures again\n\nalso kept\n"
        );
        // Nothing by hand, or no file yet: the run's text alone.
        assert_eq!(
            keep_hand_written(
                rendered,
                Some("# Benchmarks\n\n## Figures\n\n| old | 1 |\n")
            ),
            "# Benchmarks\n\n## Figures\n\n| new | 2 |\n"
        );
        assert_eq!(
            keep_hand_written(rendered, None),
            "# Benchmarks\n\n## Figures\n\n| new | 2 |\n"
        );
        // A mention in the text is no heading.
        assert_eq!(
            keep_hand_written(
                rendered,
                Some("## Notes\n\n- see (written by hand) below\n")
            ),
            "# Benchmarks\n\n## Figures\n\n| new | 2 |\n"
        );
    }

    #[test]
    fn nearest_rank_percentiles() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), Some(50.0));
        assert_eq!(percentile(&v, 99.0), Some(99.0));
        assert_eq!(percentile(&v, 100.0), Some(100.0));
        assert_eq!(percentile(&v, 0.1), Some(1.0));
        let small = [3.0, 7.0, 9.0];
        assert_eq!(percentile(&small, 50.0), Some(7.0));
        assert_eq!(percentile(&small, 99.0), Some(9.0));
        assert_eq!(percentile(&[42.0], 99.0), Some(42.0));
        assert_eq!(percentile(&[], 50.0), None);
        assert_eq!(percentile(&v, 0.0), None);
        assert_eq!(percentile(&v, 101.0), None);
    }

    #[test]
    fn ratios_and_targets() {
        let r = Row::plain("accepted Submits", Value::Num(300.0), "/s")
            .against("bare INSERT", 600.0)
            .target(Target::RatioAtLeast(1.0));
        assert_eq!(r.ratio(), Some(0.5));
        assert_eq!(r.met(), Some(false));
        let m = Row::plain("idle", Value::Num(12.5), "MiB").target(Target::Below(30.0));
        assert_eq!(m.met(), Some(true));
        let at = |v| Row::plain("p50", Value::Num(v), "ms").target(Target::AtMost(10.0));
        assert_eq!(at(10.0).met(), Some(true));
        assert_eq!(at(10.5).met(), Some(false));
        let rate = |v: f64| {
            Row::plain("one hop", Value::Num(v), "/s")
                .against("bare INSERT", 3000.0)
                .target(Target::AtLeast(1500.0))
        };
        assert_eq!(rate(1499.0).met(), Some(false));
        assert_eq!(rate(1500.0).met(), Some(true));
        assert!(rate(1500.0).cells()[5] == "≥ 1500 /s");
        let p = Row::plain("p99", Value::Num(40.0), "ms")
            .against("p50", 5.0)
            .target(Target::RatioAtMost(10.0));
        assert_eq!(p.met(), Some(true));
        let n = Row::plain("export", Value::Missing("not run".into()), "MB/s")
            .target(Target::RatioAtLeast(1.0));
        assert_eq!(n.met(), None);
    }

    #[test]
    fn table_is_aligned_markdown() {
        let rows = vec![
            Row::plain("bare INSERT commits", Value::Num(612.4), "/s"),
            Row::plain("accepted Submits", Value::Num(305.0), "/s")
                .against("bare INSERT", 612.4)
                .target(Target::RatioAtLeast(1.0)),
            Row::plain("export streaming", Value::Missing("not run".into()), "MB/s"),
        ];
        let t = render_table(&rows);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 5);
        assert!(lines[0].starts_with("| figure "));
        assert!(lines[1].starts_with("| ---"));
        let widths: Vec<usize> = lines.iter().map(|l| l.chars().count()).collect();
        assert!(widths.iter().all(|w| *w == widths[0]), "{t}");
        assert!(lines[2].contains("| 612 "));
        assert!(lines[3].contains("0.50×"));
        assert!(lines[3].contains("≥ 1× baseline"));
        assert!(lines[3].trim_end().ends_with("| NO   |"), "{}", lines[3]);
        assert!(lines[4].contains("n/a (not run)"));
    }

    #[test]
    fn numbers_keep_sensible_precision() {
        assert_eq!(number(1234.56), "1235");
        assert_eq!(number(12.345), "12.3");
        assert_eq!(number(1.2345), "1.23");
        assert_eq!(number(10.0), "10");
        assert_eq!(number(0.25), "0.25");
    }
}
