//! Who is calling: the verified certificate identity of a request mapped to a configured
//! caller (a role and a name), and the refusals when there is none or the role may not do
//! what it asks.
//!
//! Every service builds one [`Authorizer`] per set of callers from its configuration; the
//! role type is the service's own (the registry's partners, operators and processors, the
//! processor's controllers).
//!
//! Every refusal is logged at warn with the caller's address, its certificate's identity,
//! subject and serial and the reason, at most one line per [`REFUSAL_LOG_EVERY`]; those in
//! between are counted by reason, and the counts are logged with the next refusal after it
//! ([`log_refusal`]), so that a flood of refused calls cannot fill the log.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tonic::Status;

use crate::tls::peer::PeerCertificate;

/// A caller whose certificate identity is configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller<R> {
    /// What the caller may do.
    pub role: R,
    /// Its configured name, used in logs, stored rows and answers instead of the identity.
    pub name: String,
}

impl<R: PartialEq> Caller<R> {
    /// Whether the caller has one of `roles`.
    pub fn is(&self, roles: &[R]) -> bool {
        roles.contains(&self.role)
    }

    /// The caller itself when it has one of `roles`, else a refusal saying `why` (given the
    /// caller, so the message can name it).
    /// The refusal is logged with the caller's name.
    pub fn require(self, roles: &[R], why: impl FnOnce(&Self) -> String) -> Result<Self, Refused> {
        if self.is(roles) {
            return Ok(self);
        }
        let refused = Refused(why(&self));
        log_refusal("role", || {
            tracing::warn!(caller = %self.name, reason = "role", "call refused: {refused}");
        });
        Err(refused)
    }
}

/// A request refused for who sent it: PERMISSION_DENIED with a message saying why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused(String);

impl Refused {
    /// A refusal saying `why`.
    pub fn new(why: impl Into<String>) -> Self {
        Self(why.into())
    }
}

impl fmt::Display for Refused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Refused {}

impl From<Refused> for Status {
    fn from(r: Refused) -> Self {
        Status::permission_denied(r.0)
    }
}

/// Maps verified certificate identities to configured callers.
#[derive(Debug, Clone)]
pub struct Authorizer<R> {
    by_identity: HashMap<String, Caller<R>>,
    /// Completes "certificate identity X ..." when X is not configured, saying what the
    /// identity is not ("is not a controller of this processor").
    unknown: String,
}

impl<R: Clone + PartialEq> Authorizer<R> {
    /// An authorizer over `(identity, role, name)` triples; a later triple for the same
    /// identity replaces an earlier one. `unknown` completes the refusal of an identity not
    /// among them: "certificate identity X {unknown}".
    pub fn new(
        callers: impl IntoIterator<Item = (String, R, String)>,
        unknown: impl Into<String>,
    ) -> Self {
        let by_identity = callers
            .into_iter()
            .map(|(identity, role, name)| (identity, Caller { role, name }))
            .collect();
        Self {
            by_identity,
            unknown: unknown.into(),
        }
    }

    /// The caller of `request`. A request without a verified certificate, or whose
    /// certificate identity is not configured, is refused.
    pub fn caller<T>(&self, request: &tonic::Request<T>) -> Result<Caller<R>, Refused> {
        let (reason, why) = match crate::tls::peer_identity(request) {
            Ok(identity) => match self.by_identity.get(&identity) {
                Some(caller) => return Ok(caller.clone()),
                None => (
                    "unknown identity",
                    format!("certificate identity {identity} {}", self.unknown),
                ),
            },
            Err(why) => ("no identity", why),
        };
        log_refused_call(request, reason, &why);
        Err(Refused(why))
    }

    /// The caller of `request` when it has one of `roles`; refused otherwise, saying `why`.
    pub fn require<T>(
        &self,
        request: &tonic::Request<T>,
        roles: &[R],
        why: impl FnOnce(&Caller<R>) -> String,
    ) -> Result<Caller<R>, Refused> {
        let caller = self.caller(request)?;
        if caller.is(roles) {
            return Ok(caller);
        }
        let why = why(&caller);
        log_refused_call(request, "role", &format!("{} ({why})", caller.name));
        Err(Refused(why))
    }
}

/// How often at most a refused call is logged as it comes.
pub const REFUSAL_LOG_EVERY: Duration = Duration::from_secs(10);

/// The refusals counted since the last one logged.
struct Refusals {
    /// Until when refusals are only counted.
    quiet_until: Option<Instant>,
    counted: BTreeMap<&'static str, u64>,
}

static REFUSALS: Mutex<Refusals> = Mutex::new(Refusals {
    quiet_until: None,
    counted: BTreeMap::new(),
});

/// Runs `line` (a warn line about one refused call) unless another was logged within
/// [`REFUSAL_LOG_EVERY`]; then the refusal is only counted under `reason`, and the counts by
/// reason are logged in one line before the next refusal that is logged. Shared by every
/// service in the process: the rate limit is on what the log can take, whoever refuses.
pub fn log_refusal(reason: &'static str, line: impl FnOnce()) {
    let now = Instant::now();
    let counted = {
        let mut refusals = REFUSALS.lock().unwrap_or_else(|e| e.into_inner());
        if refusals.quiet_until.is_some_and(|until| now < until) {
            *refusals.counted.entry(reason).or_default() += 1;
            return;
        }
        refusals.quiet_until = Some(now + REFUSAL_LOG_EVERY);
        std::mem::take(&mut refusals.counted)
    };
    if !counted.is_empty() {
        let refused: u64 = counted.values().sum();
        let reasons = counted
            .iter()
            .map(|(reason, n)| format!("{reason}: {n}"))
            .collect::<Vec<_>>()
            .join(", ");
        tracing::warn!(
            refused,
            reasons,
            "calls refused and not logged one by one since the last refused call logged"
        );
    }
    line();
}

/// Logs the refusal of `request` (rate-limited by [`log_refusal`]) with its peer and what
/// its certificate says of itself.
fn log_refused_call<T>(request: &tonic::Request<T>, reason: &'static str, why: &str) {
    log_refusal(reason, || {
        let peer = request.remote_addr().map(tracing::field::display);
        let cert = request.peer_certs().and_then(|certs| {
            certs
                .first()
                .and_then(|l| PeerCertificate::parse(l.as_ref()))
        });
        match cert {
            Some(cert) => tracing::warn!(
                peer,
                identity = cert.identity.as_deref().unwrap_or("(none)"),
                subject = %cert.subject,
                serial = %cert.serial_hex,
                reason,
                "call refused: {why}"
            ),
            None => tracing::warn!(peer, reason, "call refused: {why}"),
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum Role {
        Reader,
        Writer,
    }

    fn authorizer() -> Authorizer<Role> {
        Authorizer::new(
            [
                ("spiffe://a".to_string(), Role::Reader, "a".to_string()),
                ("spiffe://b".to_string(), Role::Writer, "b".to_string()),
            ],
            "is not configured here",
        )
    }

    #[test]
    fn a_request_without_a_certificate_is_refused() {
        let r = authorizer().caller(&tonic::Request::new(()));
        let status = Status::from(r.expect_err("refused"));
        assert_eq!(status.code(), tonic::Code::PermissionDenied);
        assert_eq!(status.message(), "no client certificate was presented");
    }

    /// Refusals within an interval after a logged one are counted by reason, and the counts
    /// are logged with the next refusal after the interval, before its own line.
    #[test]
    fn refusals_within_the_interval_are_counted_and_logged_with_the_next() {
        #[derive(Clone, Default)]
        struct Lines(std::sync::Arc<Mutex<Vec<u8>>>);
        impl std::io::Write for Lines {
            fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(buf);
                Ok(buf.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let lines = Lines::default();
        let writer = lines.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .finish();
        let _guard = tracing::subscriber::set_default(subscriber);
        let refuse = |reason: &'static str| {
            log_refusal(reason, || tracing::warn!(reason, "call refused: test"));
        };
        refuse("revoked");
        refuse("revoked");
        refuse("role");
        refuse("revoked");
        let text = || String::from_utf8(lines.0.lock().unwrap().clone()).unwrap();
        assert_eq!(text().lines().count(), 1, "{}", text());
        // The interval is over.
        REFUSALS.lock().unwrap().quiet_until = Some(Instant::now());
        refuse("expired");
        let all = text();
        let logged: Vec<&str> = all.lines().collect();
        assert_eq!(logged.len(), 3, "{all}");
        assert!(
            logged[1].contains("refused=3") && logged[1].contains("revoked: 2, role: 1"),
            "{all}"
        );
        assert!(logged[2].contains("reason=\"expired\""), "{all}");
    }

    #[test]
    fn roles_are_required() {
        let reader = Caller {
            role: Role::Reader,
            name: "a".to_string(),
        };
        assert!(reader.is(&[Role::Reader, Role::Writer]));
        let refused = reader
            .require(&[Role::Writer], |c| format!("{} may only read", c.name))
            .expect_err("refused");
        assert_eq!(refused.to_string(), "a may only read");
        assert_eq!(authorizer().unknown, "is not configured here");
    }
}
