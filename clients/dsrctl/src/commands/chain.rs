//! `dsrctl chain`: the controller's processing chain as a tree.

use dsrelay_sdk::proto::subprocessor::MatchableIdentity;
use dsrelay_sdk::proto::{Chain, GetChainRequest, TransferMechanism};
use serde::Serialize;

use crate::commands::{Io, Registry};
use crate::output::{emit, identity_encoding_name, identity_type_name, kind_name, Render, Time};
use crate::table::{clean, Table};
use crate::Failure;

/// The chain, for printing.
#[derive(Debug, Serialize)]
pub(crate) struct ChainView {
    processors: Vec<ProcessorView>,
}

#[derive(Debug, Serialize)]
struct ProcessorView {
    name: String,
    endpoint: String,
    data_categories: Vec<String>,
    reported_at: Option<Time>,
    last_error: Option<String>,
    /// Why the last status check of a request there failed, while none answered since.
    status_check_error: Option<String>,
    status_check_failed_at: Option<Time>,
    subprocessors: Vec<SubprocessorView>,
}

#[derive(Debug, Serialize)]
struct SubprocessorView {
    name: String,
    country: String,
    transfer_mechanism: String,
    data_categories: Vec<String>,
    connector: String,
    supported_kinds: Vec<String>,
    description: String,
    /// The forms of identity it can find a subject by (`EMAIL/RAW`); empty when the holder
    /// is given every identity and decides.
    matchable_identities: Vec<String>,
}

/// `EMAIL/MD5`.
fn form(m: &MatchableIdentity) -> String {
    format!(
        "{}/{}",
        identity_type_name(m.r#type),
        identity_encoding_name(m.encoding)
    )
}

fn mechanism(v: i32) -> String {
    match TransferMechanism::try_from(v) {
        Ok(TransferMechanism::None) => "in EU/EEA".into(),
        Ok(TransferMechanism::AdequacyDecision) => "adequacy decision".into(),
        Ok(TransferMechanism::StandardContractualClauses) => "standard contractual clauses".into(),
        Ok(TransferMechanism::BindingCorporateRules) => "binding corporate rules".into(),
        _ => format!("UNKNOWN({v})"),
    }
}

impl From<&Chain> for ChainView {
    fn from(c: &Chain) -> Self {
        Self {
            processors: c
                .processors
                .iter()
                .map(|p| ProcessorView {
                    name: p.name.clone(),
                    endpoint: p.endpoint.clone(),
                    data_categories: p.data_categories.clone(),
                    reported_at: Time::from_proto(p.reported_at.as_ref()),
                    last_error: (!p.last_error.is_empty()).then(|| p.last_error.clone()),
                    status_check_error: (!p.status_check_error.is_empty())
                        .then(|| p.status_check_error.clone()),
                    status_check_failed_at: Time::from_proto(p.status_check_failed_at.as_ref()),
                    subprocessors: p
                        .subprocessors
                        .iter()
                        .map(|s| SubprocessorView {
                            name: s.name.clone(),
                            country: s.country.clone(),
                            transfer_mechanism: mechanism(s.transfer_mechanism),
                            data_categories: s.data_categories.clone(),
                            connector: s.connector.clone(),
                            supported_kinds: s
                                .supported_kinds
                                .iter()
                                .map(|k| kind_name(*k))
                                .collect(),
                            description: s.description.clone(),
                            matchable_identities: s.matchable_identities.iter().map(form).collect(),
                        })
                        .collect(),
                })
                .collect(),
        }
    }
}

impl Render for ChainView {
    fn to_table(&self) -> String {
        let mut out = String::from("controller (this registry)\n");
        for p in &self.processors {
            let reported = match (&p.reported_at, &p.last_error) {
                (Some(t), None) => format!("reported {t}"),
                (Some(t), Some(e)) => format!("reported {t}; last check failed: {}", clean(e)),
                (None, Some(e)) => format!("never reported: {}", clean(e)),
                (None, None) => "not asked yet".into(),
            };
            out.push_str(&format!(
                "└─ {}  {}  categories: {}  ({reported})\n",
                clean(&p.name),
                clean(&p.endpoint),
                clean(&p.data_categories.join(", "))
            ));
            if let Some(e) = &p.status_check_error {
                let at = p
                    .status_check_failed_at
                    .as_ref()
                    .map_or_else(String::new, |t| format!(" at {t}"));
                out.push_str(&format!("   last status check failed{at}: {}\n", clean(e)));
            }
            let mut t = Table::headless();
            for s in &p.subprocessors {
                let all = s.supported_kinds.len() == 6;
                t.row([
                    format!("   └─ {}", clean(&s.name)),
                    clean(&s.country),
                    s.transfer_mechanism.clone(),
                    clean(&s.connector),
                    clean(&s.data_categories.join(", ")),
                    if all {
                        "all kinds".into()
                    } else {
                        s.supported_kinds.join(", ")
                    },
                    if s.matchable_identities.is_empty() {
                        "any identity (the holder decides)".into()
                    } else {
                        format!("matches {}", s.matchable_identities.join(", "))
                    },
                ]);
            }
            out.push_str(&t.render());
        }
        out
    }
}

/// Prints the chain.
pub(crate) async fn run(registry: &Registry, io: &mut Io<'_>) -> Result<u8, Failure> {
    let chain = registry
        .client
        .raw()
        .get_chain(GetChainRequest {})
        .await
        .map_err(|s| registry.failed(s))?
        .into_inner();
    emit(io.out, io.format, &ChainView::from(&chain), false)?;
    Ok(0)
}

#[cfg(test)]
mod tests {
    use dsrelay_sdk::proto::{ChainProcessor, IdentityEncoding, IdentityType, Subprocessor};

    use super::*;

    #[test]
    fn each_subprocessor_shows_what_it_can_match() {
        let matches = |forms: &[(IdentityType, IdentityEncoding)]| {
            (forms.iter())
                .map(|(ty, encoding)| MatchableIdentity {
                    r#type: *ty as i32,
                    encoding: *encoding as i32,
                })
                .collect()
        };
        let email = IdentityType::Email;
        let chain = Chain {
            processors: vec![ChainProcessor {
                name: "bureau".into(),
                status_check_error: "request r-1: Unavailable: restarting".into(),
                subprocessors: vec![
                    Subprocessor {
                        name: "mail-marketing".into(),
                        matchable_identities: matches(&[
                            (email, IdentityEncoding::Raw),
                            (email, IdentityEncoding::Md5),
                        ]),
                        ..Default::default()
                    },
                    Subprocessor {
                        name: "paper-archive".into(),
                        ..Default::default()
                    },
                ],
                ..Default::default()
            }],
        };
        let view = ChainView::from(&chain);
        let subs = &view.processors[0].subprocessors;
        assert_eq!(subs[0].matchable_identities, ["EMAIL/RAW", "EMAIL/MD5"]);
        assert!(subs[1].matchable_identities.is_empty());
        let table = view.to_table();
        assert!(table.contains("matches EMAIL/RAW, EMAIL/MD5"), "{table}");
        assert!(
            table.contains("any identity (the holder decides)"),
            "{table}"
        );
        assert!(
            table.contains("last status check failed: request r-1: Unavailable: restarting"),
            "{table}"
        );
    }
}
