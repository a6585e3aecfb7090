//! Who is calling: certificate identity → role, from the configuration.

use std::collections::HashMap;

use crate::config::{Config, Role};
use crate::error::ApiError;

/// A caller whose certificate identity is configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// An integration partner, by name; sees its own requests only.
    Partner(String),
    /// An operator, by name; sees everything.
    Operator(String),
    /// A processor, by name; may acknowledge tasks of requests delivered to it.
    Processor(String),
}

impl Caller {
    /// The caller's configured name.
    pub fn name(&self) -> &str {
        match self {
            Self::Partner(n) | Self::Operator(n) | Self::Processor(n) => n,
        }
    }
}

/// Maps verified certificate identities to callers.
#[derive(Debug, Clone)]
pub struct Authorizer {
    by_identity: HashMap<String, Caller>,
}

impl Authorizer {
    /// Builds the map from the configuration.
    pub fn new(config: &Config) -> Self {
        let mut by_identity = HashMap::new();
        for r in &config.identities {
            let caller = match r.role {
                Role::Partner => Caller::Partner(r.name.clone()),
                Role::Operator => Caller::Operator(r.name.clone()),
            };
            by_identity.insert(r.identity.clone(), caller);
        }
        for p in &config.processors {
            by_identity.insert(p.identity.clone(), Caller::Processor(p.name.clone()));
        }
        Self { by_identity }
    }

    /// The caller of `request`. A request without a verified certificate, or whose
    /// certificate identity is not configured, is refused.
    pub fn caller<T>(&self, request: &tonic::Request<T>) -> Result<Caller, ApiError> {
        let identity = dsrelay_runtime::tls::peer_identity(request).ok_or_else(|| {
            ApiError::PermissionDenied(
                "no client certificate with a URI or DNS SAN was presented".into(),
            )
        })?;
        self.by_identity.get(&identity).cloned().ok_or_else(|| {
            ApiError::PermissionDenied(format!(
                "certificate identity {identity} is not configured for this registry"
            ))
        })
    }
}
