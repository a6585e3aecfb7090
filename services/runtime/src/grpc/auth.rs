//! Who is calling: the verified certificate identity of a request mapped to a configured
//! caller (a role and a name), and the refusals when there is none or the role may not do
//! what it asks.
//!
//! Every service builds one [`Authorizer`] per set of callers from its configuration; the
//! role type is the service's own (the registry's partners, operators and processors, the
//! processor's controllers).

use std::collections::HashMap;
use std::fmt;

use tonic::Status;

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
    pub fn require(self, roles: &[R], why: impl FnOnce(&Self) -> String) -> Result<Self, Refused> {
        if self.is(roles) {
            Ok(self)
        } else {
            Err(Refused(why(&self)))
        }
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
        let identity = crate::tls::peer_identity(request).map_err(Refused)?;
        self.by_identity
            .get(&identity)
            .cloned()
            .ok_or_else(|| Refused(format!("certificate identity {identity} {}", self.unknown)))
    }

    /// The caller of `request` when it has one of `roles`; refused otherwise, saying `why`.
    pub fn require<T>(
        &self,
        request: &tonic::Request<T>,
        roles: &[R],
        why: impl FnOnce(&Caller<R>) -> String,
    ) -> Result<Caller<R>, Refused> {
        self.caller(request)?.require(roles, why)
    }
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
