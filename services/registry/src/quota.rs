//! Per-partner Submit quotas (`[submit_quota]`): a token bucket per partner name, kept in
//! this process's memory.
//!
//! Each registry process keeps its own buckets: behind a load balancer spreading a partner
//! over `n` replicas, the partner may submit up to `n` times the configured rate (and burst).
//! Buckets start full and are not kept across restarts, so a restart hands every partner a
//! fresh burst.
//!
//! Every Submit a partner makes takes a token before anything is read or stored: an accepted
//! one, a retry of an accepted idempotency key and an invalid one alike, so that a flood of
//! any of them is refused at the same cost. Operators' calls are not limited.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::config::{Config, Role, SubmitQuotaConfig};

/// Refusals of one partner are logged at most once per this long; the others are counted
/// into the next log line (and every one into the metric).
pub(crate) const WARN_EVERY: Duration = Duration::from_secs(1);

/// A shortfall of tokens this small is rounding, not a Submit too many.
const TOKEN_DUST: f64 = 1e-9;

/// One partner's limits and the keys that set them, for the refusal's message.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Limits {
    /// Tokens added per second.
    pub per_second: f64,
    /// The most tokens the bucket holds: the most Submits at once after a quiet spell.
    pub burst: u32,
    /// The key `per_second` came from (`submit_quota.per_second`, or the partner's own).
    pub per_second_key: String,
    /// The key `burst` came from.
    pub burst_key: String,
}

/// Why a Submit was refused, and what to tell the caller and the log.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Refusal {
    /// The partner's limits.
    pub limits: Limits,
    /// How long until the bucket holds a token.
    pub retry_after: Duration,
    /// `Some(refusals)` when this refusal is to be logged: the refusals of this partner since
    /// the last one logged, this one included. `None` within [`WARN_EVERY`] of the last.
    pub log: Option<u64>,
}

/// A partner's bucket, and its refusals' log state.
#[derive(Debug)]
struct Bucket {
    tokens: f64,
    /// When `tokens` was last brought up to date.
    at: Instant,
    /// When a refusal was last logged.
    warned_at: Option<Instant>,
    /// Refusals not logged since.
    unlogged: u64,
}

/// The Submit quotas of every partner that has one.
#[derive(Debug)]
pub(crate) struct SubmitQuotas {
    /// By partner name: its limits and its bucket. Only configured partners can call, so the
    /// map is made once and never grows; each bucket has its own lock, so partners do not
    /// wait on each other.
    partners: HashMap<String, (Limits, Mutex<Bucket>)>,
}

impl SubmitQuotas {
    /// The quotas `config` sets for its partners (by name), with full buckets as of `now`.
    pub(crate) fn new(config: &Config, now: Instant) -> Self {
        let partners = config
            .identities
            .iter()
            .filter(|i| i.role == Role::Partner)
            .filter_map(|i| {
                let limits = limits_of(&config.submit_quota, &i.name)?;
                let bucket = Bucket {
                    tokens: f64::from(limits.burst),
                    at: now,
                    warned_at: None,
                    unlogged: 0,
                };
                Some((i.name.clone(), (limits, Mutex::new(bucket))))
            })
            .collect();
        Self { partners }
    }

    /// Takes a token of `partner`'s bucket at `now`, or says why not (and then takes none).
    /// A partner without a quota always passes.
    pub(crate) fn take(&self, partner: &str, now: Instant) -> Result<(), Refusal> {
        let Some((limits, bucket)) = self.partners.get(partner) else {
            return Ok(());
        };
        // A panic while the lock was held cannot leave the bucket half-updated: each field
        // is written whole. Keep serving rather than refuse every Submit after one.
        let mut b = bucket.lock().unwrap_or_else(|e| e.into_inner());
        let burst = f64::from(limits.burst);
        // `now` before `at` (calls racing for the lock) adds nothing rather than panicking.
        let elapsed = now.saturating_duration_since(b.at).as_secs_f64();
        b.tokens = (b.tokens + elapsed * limits.per_second).min(burst);
        b.at = b.at.max(now);
        // Refilled in many small steps, the tokens fall short of a whole one by float dust
        // (0.9999999999) at the time the last refusal named: that much is forgiven.
        if b.tokens + TOKEN_DUST >= 1.0 {
            b.tokens = (b.tokens - 1.0).max(0.0);
            return Ok(());
        }
        let retry_after = {
            let seconds = (1.0 - b.tokens) / limits.per_second;
            // To the microsecond first, so that float noise (60.000000001 ms) does not add a
            // millisecond; then up to the millisecond, so that a retry after it finds the
            // token there. At most 10^4 s (one token at the slowest rate): no overflow.
            let micros = (seconds * 1_000_000.0).round() as u64;
            Duration::from_millis(micros.div_ceil(1000).max(1))
        };
        b.unlogged += 1;
        let log = match b.warned_at {
            Some(at) if now.saturating_duration_since(at) < WARN_EVERY => None,
            _ => {
                b.warned_at = Some(now);
                Some(std::mem::take(&mut b.unlogged))
            }
        };
        Err(Refusal {
            limits: limits.clone(),
            retry_after,
            log,
        })
    }
}

impl SubmitQuotas {
    /// Whether no partner has a quota (nothing to refuse, nothing to log).
    pub(crate) fn is_empty(&self) -> bool {
        self.partners.is_empty()
    }

    /// The refusals not logged yet of each partner whose last line is at least [`WARN_EVERY`]
    /// old at `now`, taken as if logged now: what a flood's last second leaves when no
    /// refusal follows to carry it into a line.
    pub(crate) fn take_unlogged(&self, now: Instant) -> Vec<(&str, u64)> {
        let mut late = Vec::new();
        for (partner, (_, bucket)) in &self.partners {
            let mut b = bucket.lock().unwrap_or_else(|e| e.into_inner());
            let quiet = b
                .warned_at
                .is_none_or(|at| now.saturating_duration_since(at) >= WARN_EVERY);
            if b.unlogged > 0 && quiet {
                b.warned_at = Some(now);
                late.push((partner.as_str(), std::mem::take(&mut b.unlogged)));
            }
        }
        late
    }
}

/// Logs, every [`WARN_EVERY`] until `stop`, the refusals a flood left unlogged
/// ([`SubmitQuotas::take_unlogged`]), so that a log line follows every refusal within about
/// two seconds even when no refusal comes after it.
pub(crate) async fn log_late_refusals(
    shared: std::sync::Arc<crate::app::Shared>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            _ = stop.changed() => {}
            _ = tokio::time::sleep(WARN_EVERY) => {}
        }
        for (partner, refused) in shared.submit_quotas.take_unlogged(Instant::now()) {
            tracing::warn!(
                partner,
                refused,
                "Submit refused: the partner's Submit quota is used up"
            );
        }
        if *stop.borrow() {
            return;
        }
    }
}

/// The partners `config` sets a Submit quota for.
pub(crate) fn limited_partners(config: &Config) -> impl Iterator<Item = &str> {
    config
        .identities
        .iter()
        .filter(|i| i.role == Role::Partner && limits_of(&config.submit_quota, &i.name).is_some())
        .map(|i| i.name.as_str())
}

/// `partner`'s limits: its own entry in `submit_quota.partners`, each key it leaves out
/// taken from the table's; `None` when neither sets both.
fn limits_of(quota: &SubmitQuotaConfig, partner: &str) -> Option<Limits> {
    let own = quota.partners.get(partner);
    let own_key = |key: &str| format!("submit_quota.partners.{partner}.{key}");
    let (per_second, per_second_key) = match own.and_then(|o| o.per_second) {
        Some(v) => (v, own_key("per_second")),
        None => (quota.per_second?, "submit_quota.per_second".to_string()),
    };
    let (burst, burst_key) = match own.and_then(|o| o.burst) {
        Some(v) => (v, own_key("burst")),
        None => (quota.burst?, "submit_quota.burst".to_string()),
    };
    Some(Limits {
        per_second,
        burst,
        per_second_key,
        burst_key,
    })
}

/// `d` for a message: seconds to the millisecond under a minute, else rounded up to whole
/// seconds with minutes and hours.
pub(crate) fn describe(d: Duration) -> String {
    if d < Duration::from_secs(60) {
        return format!("{:.3} s", d.as_secs_f64());
    }
    let s = d.as_secs() + u64::from(d.subsec_nanos() > 0);
    match (s / 3600, s % 3600 / 60, s % 60) {
        (0, m, s) => format!("{m} min {s} s"),
        (h, m, s) => format!("{h} h {m} min {s} s"),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::config::{IdentityRole, PartnerSubmitQuota};

    fn config(quota: SubmitQuotaConfig) -> Config {
        let mut c: Config = toml::from_str(
            "identity_hash_key = \"k\"\n\
             [tls]\nca = \"ca.pem\"\ncert = \"r.pem\"\nkey = \"r.key\"\n",
        )
        .unwrap();
        let who = |name: &str, role| IdentityRole {
            identity: format!("spiffe://x/{name}"),
            role,
            name: name.into(),
        };
        c.identities = vec![
            who("crm", Role::Partner),
            who("webform", Role::Partner),
            who("ops", Role::Operator),
        ];
        c.submit_quota = quota;
        c
    }

    fn quota(per_second: f64, burst: u32) -> SubmitQuotaConfig {
        SubmitQuotaConfig {
            per_second: Some(per_second),
            burst: Some(burst),
            partners: BTreeMap::new(),
        }
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn a_full_bucket_takes_a_burst_then_refills_at_the_rate() {
        let t0 = Instant::now();
        let q = SubmitQuotas::new(&config(quota(10.0, 3)), t0);
        for _ in 0..3 {
            q.take("crm", t0).unwrap();
        }
        let refused = q.take("crm", t0).unwrap_err();
        // One token every 100 ms.
        assert_eq!(refused.retry_after, ms(100));
        assert_eq!(refused.limits.burst, 3);
        assert_eq!(refused.limits.burst_key, "submit_quota.burst");
        // 40 ms later 0.4 of a token is there: 60 ms to go.
        let refused = q.take("crm", t0 + ms(40)).unwrap_err();
        assert_eq!(refused.retry_after, ms(60));
        q.take("crm", t0 + ms(100)).unwrap();
        q.take("crm", t0 + ms(100)).unwrap_err();
        // A long quiet spell fills the bucket to its burst, no further.
        let later = t0 + Duration::from_secs(3600);
        for _ in 0..3 {
            q.take("crm", later).unwrap();
        }
        assert!(q.take("crm", later).is_err());
    }

    #[test]
    fn a_refusal_takes_no_token() {
        let t0 = Instant::now();
        let q = SubmitQuotas::new(&config(quota(10.0, 1)), t0);
        q.take("crm", t0).unwrap();
        // Refused again and again, it still gets its token when the first comes.
        for i in 0..10 {
            assert!(q.take("crm", t0 + ms(i * 9)).is_err());
        }
        q.take("crm", t0 + ms(100)).unwrap();
    }

    #[test]
    fn partners_have_buckets_of_their_own_and_operators_none() {
        let t0 = Instant::now();
        let q = SubmitQuotas::new(&config(quota(0.001, 1)), t0);
        q.take("crm", t0).unwrap();
        assert!(q.take("crm", t0).is_err());
        q.take("webform", t0).unwrap();
        for _ in 0..100 {
            q.take("ops", t0).unwrap();
        }
        let mut names: Vec<_> = q.partners.keys().map(String::as_str).collect();
        names.sort();
        assert_eq!(names, ["crm", "webform"]);
    }

    #[test]
    fn without_a_quota_nobody_is_limited() {
        let t0 = Instant::now();
        let q = SubmitQuotas::new(&config(SubmitQuotaConfig::default()), t0);
        assert_eq!(q.partners.len(), 0);
        for _ in 0..1000 {
            q.take("crm", t0).unwrap();
        }
    }

    #[test]
    fn a_partner_s_own_limits_replace_the_table_s_key_by_key() {
        let mut c = quota(1.0, 5);
        c.partners.insert(
            "crm".into(),
            PartnerSubmitQuota {
                per_second: None,
                burst: Some(2),
            },
        );
        let t0 = Instant::now();
        let q = SubmitQuotas::new(&config(c), t0);
        for _ in 0..2 {
            q.take("crm", t0).unwrap();
        }
        let refused = q.take("crm", t0).unwrap_err();
        assert_eq!(refused.limits.burst_key, "submit_quota.partners.crm.burst");
        assert_eq!(refused.limits.per_second_key, "submit_quota.per_second");
        assert_eq!(refused.retry_after, ms(1000));
        for _ in 0..5 {
            q.take("webform", t0).unwrap();
        }

        // Without the table's limits only the partner that sets both has a quota.
        let mut c = SubmitQuotaConfig::default();
        c.partners.insert(
            "webform".into(),
            PartnerSubmitQuota {
                per_second: Some(2.0),
                burst: Some(1),
            },
        );
        let q = SubmitQuotas::new(&config(c), t0);
        assert_eq!(q.partners.keys().collect::<Vec<_>>(), ["webform"]);
    }

    #[test]
    fn refusals_are_logged_at_most_once_a_second_with_those_left_out_counted() {
        let t0 = Instant::now();
        let q = SubmitQuotas::new(&config(quota(0.001, 1)), t0);
        q.take("crm", t0).unwrap();
        q.take("webform", t0).unwrap();
        let logged = |at: Duration| q.take("crm", t0 + at).unwrap_err().log;
        assert_eq!(logged(ms(0)), Some(1));
        assert_eq!(logged(ms(10)), None);
        assert_eq!(logged(ms(999)), None);
        assert_eq!(logged(ms(1000)), Some(3));
        assert_eq!(logged(ms(1001)), None);
        // Another partner's refusals are logged on their own.
        assert_eq!(q.take("webform", t0 + ms(1001)).unwrap_err().log, Some(1));
        assert_eq!(logged(ms(5000)), Some(2));
    }

    #[test]
    fn refusals_left_unlogged_are_taken_once_their_partner_s_line_is_a_second_old() {
        let t0 = Instant::now();
        let q = SubmitQuotas::new(&config(quota(0.001, 1)), t0);
        q.take("crm", t0).unwrap();
        q.take("webform", t0).unwrap();
        assert!(q.take_unlogged(t0).is_empty());
        // Logged at once, then two within the second: those two wait for a line.
        for at in [0, 10, 20] {
            q.take("crm", t0 + ms(at)).unwrap_err();
        }
        assert!(q.take_unlogged(t0 + ms(999)).is_empty());
        assert_eq!(q.take_unlogged(t0 + ms(1000)), [("crm", 2)]);
        assert!(q.take_unlogged(t0 + ms(5000)).is_empty());
        // Taken counts as a line: the next refusal within the second waits again, and a
        // refusal logged as it came leaves nothing behind.
        assert_eq!(q.take("crm", t0 + ms(1500)).unwrap_err().log, None);
        assert_eq!(q.take("webform", t0 + ms(1500)).unwrap_err().log, Some(1));
        assert_eq!(q.take_unlogged(t0 + ms(2000)), [("crm", 1)]);
    }

    #[test]
    fn a_clock_reading_older_than_the_last_adds_nothing() {
        let t0 = Instant::now() + Duration::from_secs(10);
        let q = SubmitQuotas::new(&config(quota(10.0, 1)), t0);
        q.take("crm", t0).unwrap();
        let refused = q.take("crm", t0 - ms(50)).unwrap_err();
        assert_eq!(refused.retry_after, ms(100));
    }

    #[test]
    fn durations_are_described_for_people() {
        assert_eq!(describe(ms(1)), "0.001 s");
        assert_eq!(describe(ms(59_999)), "59.999 s");
        assert_eq!(describe(ms(60_000)), "1 min 0 s");
        assert_eq!(describe(ms(3_599_001)), "1 h 0 min 0 s");
        assert_eq!(describe(ms(3_661_000)), "1 h 1 min 1 s");
    }
}
