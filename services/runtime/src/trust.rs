//! Trust domains: every identity a service is configured to accept a call from must lie in
//! one trust domain and name the role it is configured with.
//!
//! Identities are SPIFFE IDs, `spiffe://<trust domain>/<role>/<name>`. A service matches a
//! caller's identity exactly against its configuration, so the check belongs where the
//! configuration is read: an identity from another trust domain, or whose path names another
//! role (a partner's certificate listed as an operator), is a configuration error reported
//! before the service starts, not a caller quietly given more than its certificate says.
//!
//! The trust domain is the top-level `trust_domain` key when set, else the one in the
//! service's own certificate. Parties called but never calling (a transfer recipient at another
//! organisation) are matched exactly and are not subject to the check.

use anyhow::{anyhow, Result};

/// The trust domain of a SPIFFE ID: the host part of `spiffe://<trust domain>/...`.
pub fn trust_domain_of(identity: &str) -> Option<&str> {
    let rest = identity.strip_prefix("spiffe://")?;
    let (domain, _) = rest.split_once('/')?;
    (!domain.is_empty()).then_some(domain)
}

/// The first path segment of a SPIFFE ID: the role it was issued for.
fn role_path_of(identity: &str) -> Option<&str> {
    let rest = identity.strip_prefix("spiffe://")?;
    let (_, path) = rest.split_once('/')?;
    path.split('/').next().filter(|s| !s.is_empty())
}

/// The trust domain a service checks its configured callers against: `configured` when set,
/// else the one of `own_identity` (the service's own certificate).
pub fn effective_trust_domain(configured: Option<&str>, own_identity: &str) -> Result<String> {
    if let Some(domain) = configured {
        if domain.is_empty() || domain.contains('/') || domain.contains(':') {
            return Err(anyhow!(
                "trust_domain: {domain:?} is not a trust domain (a host name such as \
                 example.org, without scheme or path)"
            ));
        }
        return Ok(domain.to_string());
    }
    trust_domain_of(own_identity)
        .map(str::to_string)
        .ok_or_else(|| {
            anyhow!(
                "this service's certificate identity {own_identity} is not a SPIFFE ID \
             (spiffe://<trust domain>/<role>/<name>); set the top-level trust_domain key"
            )
        })
}

/// A configured caller to check: where it is configured (for the message), its identity, and
/// the role path its identity must carry.
#[derive(Debug, Clone, Copy)]
pub struct ConfiguredCaller<'a> {
    /// The configuration key, e.g. `identities[2]`.
    pub key: &'a str,
    /// The identity as configured.
    pub identity: &'a str,
    /// The path segment the identity must start with, e.g. `partner`.
    pub role_path: &'a str,
}

/// Every configured caller that is outside `trust_domain` or whose path names another role,
/// as configuration errors naming the key, the identity and what was expected.
pub fn check_callers<'a>(
    trust_domain: &str,
    callers: impl IntoIterator<Item = ConfiguredCaller<'a>>,
) -> Vec<String> {
    let mut errors = Vec::new();
    for c in callers {
        match (trust_domain_of(c.identity), role_path_of(c.identity)) {
            (Some(domain), _) if domain != trust_domain => errors.push(format!(
                "{}: identity {} is in trust domain {domain}, not {trust_domain}; a caller from \
                 another trust domain is not accepted",
                c.key, c.identity
            )),
            (Some(_), Some(role)) if role == c.role_path => {}
            (Some(_), _) => errors.push(format!(
                "{}: identity {} must name its role in its path: expected \
                 spiffe://{trust_domain}/{}/<name>",
                c.key, c.identity, c.role_path
            )),
            (None, _) => errors.push(format!(
                "{}: identity {} is not a SPIFFE ID; expected spiffe://{trust_domain}/{}/<name>",
                c.key, c.identity, c.role_path
            )),
        }
    }
    errors
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caller<'a>(identity: &'a str, role_path: &'a str) -> ConfiguredCaller<'a> {
        ConfiguredCaller {
            key: "identities[0]",
            identity,
            role_path,
        }
    }

    #[test]
    fn the_trust_domain_is_the_host_of_the_spiffe_id() {
        assert_eq!(
            trust_domain_of("spiffe://dsrelay.dev/partner/crm"),
            Some("dsrelay.dev")
        );
        assert_eq!(trust_domain_of("spiffe://dsrelay.dev"), None);
        assert_eq!(trust_domain_of("spiffe:///partner/crm"), None);
        assert_eq!(trust_domain_of("https://dsrelay.dev/partner/crm"), None);
    }

    #[test]
    fn the_own_certificate_gives_the_trust_domain_unless_configured() {
        assert_eq!(
            effective_trust_domain(None, "spiffe://a.example/registry/x").unwrap(),
            "a.example"
        );
        assert_eq!(
            effective_trust_domain(Some("b.example"), "spiffe://a.example/registry/x").unwrap(),
            "b.example"
        );
        assert!(effective_trust_domain(Some("spiffe://b.example"), "spiffe://a/r/x").is_err());
        assert!(effective_trust_domain(None, "urn:x").is_err());
    }

    #[test]
    fn a_bad_trust_domain_is_reported_under_the_key_the_file_uses() {
        let bad = effective_trust_domain(Some("b.example/x"), "spiffe://a.example/r/x")
            .unwrap_err()
            .to_string();
        assert!(bad.starts_with("trust_domain: \"b.example/x\""), "{bad}");
        assert!(!bad.contains("service."), "{bad}");
        let not_spiffe = effective_trust_domain(None, "urn:x")
            .unwrap_err()
            .to_string();
        assert!(
            not_spiffe.contains("set the top-level trust_domain key"),
            "{not_spiffe}"
        );
        assert!(!not_spiffe.contains("service."), "{not_spiffe}");
    }

    #[test]
    fn callers_in_the_domain_with_their_role_pass() {
        let errors = check_callers(
            "dsrelay.dev",
            [
                caller("spiffe://dsrelay.dev/partner/crm", "partner"),
                caller("spiffe://dsrelay.dev/operator/ops/eu", "operator"),
            ],
        );
        assert!(errors.is_empty(), "{errors:?}");
    }

    #[test]
    fn another_domain_another_role_or_no_spiffe_id_is_refused_with_the_reason() {
        let errors = check_callers(
            "dsrelay.dev",
            [
                caller("spiffe://evil.example/partner/crm", "partner"),
                caller("spiffe://dsrelay.dev/partner/crm", "operator"),
                caller("spiffe://dsrelay.dev/crm", "partner"),
                caller("crm", "partner"),
            ],
        );
        assert_eq!(errors.len(), 4, "{errors:?}");
        assert!(errors[0].contains("trust domain evil.example, not dsrelay.dev"));
        assert!(errors[1].contains("expected spiffe://dsrelay.dev/operator/<name>"));
        assert!(errors[2].contains("expected spiffe://dsrelay.dev/partner/<name>"));
        assert!(errors[3].contains("not a SPIFFE ID"));
    }
}
