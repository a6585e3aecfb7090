//! Who may call the registry: the certificate identities of partners and operators (from
//! `identities`) and of processors (from `processors`), each with its configured name. The
//! mapping itself is [`dsrelay_runtime::grpc::Authorizer`].

use dsrelay_runtime::grpc;

use crate::config::{Config, Role};

/// What a caller of the registry is, and so what it may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Party {
    /// An integration partner; sees its own requests only.
    Partner,
    /// An operator; sees everything, extends due dates, reads the audit trail.
    Operator,
    /// A processor; may acknowledge tasks of requests delivered to it.
    Processor,
}

/// A configured caller of the registry.
pub(crate) type Caller = grpc::Caller<Party>;

/// Certificate identity → caller of the registry.
pub(crate) type Authorizer = grpc::Authorizer<Party>;

/// The registry's callers, from the configuration.
pub(crate) fn authorizer(config: &Config) -> Authorizer {
    let people = config.identities.iter().map(|r| {
        let party = match r.role {
            Role::Partner => Party::Partner,
            Role::Operator => Party::Operator,
        };
        (r.identity.clone(), party, r.name.clone())
    });
    let processors = config
        .processors
        .iter()
        .map(|p| (p.identity.clone(), Party::Processor, p.name.clone()));
    Authorizer::new(
        people.chain(processors),
        "is not configured for this registry",
    )
}
