//! `dsrctl chain`: the controller's processing chain as a tree.

use dsrelay_sdk::proto::subprocessor::MatchableIdentity;
use dsrelay_sdk::proto::{Chain, GetChainRequest, TransferMechanism};
use serde::Serialize;

use crate::commands::{Io, Registry};
use crate::output::{emit, identity_encoding_name, identity_type_name, kind_name, Render, Time};
use crate::table::{clean, clipped, Table};
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
    /// Since when the processor had it marked unreachable when it last reported, if it did.
    unreachable_since: Option<Time>,
    /// The last error of that mark; `None` when not marked or the error is empty.
    unreachable_error: Option<String>,
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
                            unreachable_since: Time::from_proto(s.unreachable_since.as_ref()),
                            unreachable_error: (!s.unreachable_error.is_empty())
                                .then(|| s.unreachable_error.clone()),
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
        let n = self.processors.len();
        for (i, p) in self.processors.iter().enumerate() {
            // Lines under a processor that is not the last carry the line down to the next.
            let (branch, indent) = if i + 1 == n {
                ("└─", "   ")
            } else {
                ("├─", "│  ")
            };
            let reported = match (&p.reported_at, &p.last_error) {
                (Some(t), None) => format!("reported {t}"),
                (Some(t), Some(e)) => format!("reported {t}; last check failed: {}", clean(e)),
                (None, Some(e)) => format!("never reported: {}", clean(e)),
                (None, None) => "not asked yet".into(),
            };
            out.push_str(&format!(
                "{branch} {}  {}  categories: {}  ({reported})\n",
                clean(&p.name),
                clean(&p.endpoint),
                clean(&p.data_categories.join(", "))
            ));
            if let Some(e) = &p.status_check_error {
                let at = p
                    .status_check_failed_at
                    .as_ref()
                    .map_or_else(String::new, |t| format!(" at {t}"));
                out.push_str(&format!(
                    "{indent}last status check failed{at}: {}\n",
                    clean(e)
                ));
            }
            let mut t = Table::headless();
            let m = p.subprocessors.len();
            for (j, s) in p.subprocessors.iter().enumerate() {
                let all = s.supported_kinds.len() == 6;
                let branch = if j + 1 == m { "└─" } else { "├─" };
                let mut row = vec![
                    format!("{indent}{branch} {}", clean(&s.name)),
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
                ];
                // A column of its own, so that a holder that is down is found by grep on
                // its line; the others' is "-" when one of their processor's is.
                if s.unreachable_since.is_some() || s.unreachable_error.is_some() {
                    let since = s
                        .unreachable_since
                        .map_or_else(String::new, |t| format!(" since {t}"));
                    row.push(match s.unreachable_error.as_deref().unwrap_or("") {
                        "" => format!("unreachable{since}"),
                        e => format!("unreachable{since} ({})", clipped(e, 80)),
                    });
                }
                t.row(row);
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

    /// Only the last processor and the last subprocessor of each get `└─`, the others
    /// `├─`, and the lines under a processor that is not the last carry `│` down; a
    /// subprocessor the processor had marked unreachable says since when and why. Before,
    /// every line was drawn `└─` and a holder that was down looked like the others.
    #[test]
    fn the_tree_branches_and_shows_an_unreachable_subprocessor() {
        let sub = |name: &str| Subprocessor {
            name: name.into(),
            ..Default::default()
        };
        let since = dsrelay_proto::prost_types::Timestamp {
            seconds: 1_767_261_600,
            nanos: 0,
        };
        let chain = Chain {
            processors: vec![
                ChainProcessor {
                    name: "bureau".into(),
                    status_check_error: "restarting".into(),
                    subprocessors: vec![
                        Subprocessor {
                            unreachable_since: Some(since),
                            unreachable_error: "connection refused".into(),
                            ..sub("adapter")
                        },
                        sub("accounting"),
                    ],
                    ..Default::default()
                },
                ChainProcessor {
                    name: "archive".into(),
                    subprocessors: vec![sub("paper")],
                    ..Default::default()
                },
            ],
        };
        let view = ChainView::from(&chain);
        let table = view.to_table();
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 7, "{table}");
        assert!(lines[1].starts_with("├─ bureau  "), "{table}");
        assert_eq!(
            lines[2], "│  last status check failed: restarting",
            "{table}"
        );
        assert!(lines[3].starts_with("│  ├─ adapter  "), "{table}");
        assert!(
            lines[3].ends_with("  unreachable since 2026-01-01T10:00:00Z (connection refused)"),
            "{table}"
        );
        assert!(lines[4].starts_with("│  └─ accounting  "), "{table}");
        assert!(lines[4].ends_with("  -"), "{table}");
        assert!(lines[5].starts_with("└─ archive  "), "{table}");
        assert!(lines[6].starts_with("   └─ paper  "), "{table}");
        assert!(!lines[6].contains("unreachable"), "{table}");
        let json = serde_json::to_value(&view).expect("json");
        let adapter = &json["processors"][0]["subprocessors"][0];
        assert_eq!(adapter["unreachable_since"], "2026-01-01T10:00:00Z");
        assert_eq!(adapter["unreachable_error"], "connection refused");
        let accounting = &json["processors"][0]["subprocessors"][1];
        assert!(accounting["unreachable_since"].is_null(), "{json:#}");
    }
}
