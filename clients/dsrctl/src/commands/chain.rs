//! `dsrctl chain`: the controller's processing chain as a tree; with a category scope,
//! what a request scoped to those categories reaches: the registry sends it to a processor
//! holding one of them, the processor to each subprocessor holding one, and a `sql` holder
//! acts on the tables holding one (a table naming no categories holds all of its
//! subprocessor's).

use dsrelay_sdk::proto::subprocessor::{HeldTable, MatchableIdentity};
use dsrelay_sdk::proto::{Chain, GetChainRequest, TransferMechanism};
use serde::Serialize;

use crate::cli::ChainArgs;
use crate::commands::{Io, Registry};
use crate::output::{emit, identity_encoding_name, identity_type_name, kind_name, Render, Time};
use crate::table::{clean, clipped, Table};
use crate::Failure;

/// The chain, for printing.
#[derive(Debug, Serialize)]
pub(crate) struct ChainView {
    /// The categories whose reach is shown; absent when none were asked for.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    scope: Vec<String>,
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
    /// With a scope: whether the registry sends a request of that scope here.
    #[serde(skip_serializing_if = "Option::is_none")]
    reached: Option<bool>,
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
    /// With a scope: whether the processor gives a request of that scope a task here.
    #[serde(skip_serializing_if = "Option::is_none")]
    reached: Option<bool>,
    /// The tables of a tabular holder (`sql`); empty for the others, and for a reader who
    /// is not an operator (the registry shows table names to operators only).
    tables: Vec<TableView>,
}

#[derive(Debug, Serialize)]
struct TableView {
    name: String,
    data_categories: Vec<String>,
    /// The table's rule names no categories: it holds all of its subprocessor's.
    inherited: bool,
    /// With a scope: whether a request of that scope acts on it (else it is left out).
    #[serde(skip_serializing_if = "Option::is_none")]
    reached: Option<bool>,
}

/// Whether `held` names one of the scope's categories; `None` without a scope.
fn meets(held: &[String], scope: &[String]) -> Option<bool> {
    (!scope.is_empty()).then(|| held.iter().any(|c| scope.contains(c)))
}

fn table_view(t: &HeldTable, sub_reached: Option<bool>, scope: &[String]) -> TableView {
    TableView {
        name: t.name.clone(),
        data_categories: t.data_categories.clone(),
        inherited: t.inherited,
        // An inherited table holds its subprocessor's categories: reached with it.
        reached: sub_reached
            .map(|r| r && (t.inherited || meets(&t.data_categories, scope) == Some(true))),
    }
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
        Self::scoped(c, &[])
    }
}

impl ChainView {
    /// The chain with what a request scoped to `scope` reaches (nothing extra when empty).
    fn scoped(c: &Chain, scope: &[String]) -> Self {
        Self {
            scope: scope.to_vec(),
            processors: c
                .processors
                .iter()
                .map(|p| (p, meets(&p.data_categories, scope)))
                .map(|(p, p_reached)| ProcessorView {
                    name: p.name.clone(),
                    endpoint: p.endpoint.clone(),
                    data_categories: p.data_categories.clone(),
                    reported_at: Time::from_proto(p.reported_at.as_ref()),
                    last_error: (!p.last_error.is_empty()).then(|| p.last_error.clone()),
                    status_check_error: (!p.status_check_error.is_empty())
                        .then(|| p.status_check_error.clone()),
                    status_check_failed_at: Time::from_proto(p.status_check_failed_at.as_ref()),
                    reached: p_reached,
                    subprocessors: p
                        .subprocessors
                        .iter()
                        .map(|s| {
                            let reached = p_reached
                                .map(|r| r && meets(&s.data_categories, scope) == Some(true));
                            (s, reached)
                        })
                        .map(|(s, reached)| SubprocessorView {
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
                            reached,
                            tables: (s.tables.iter())
                                .map(|t| table_view(t, reached, scope))
                                .collect(),
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
            if let Some(reached) = p.reached {
                out.push_str(&format!(
                    "{indent}scope {}: {}\n",
                    clean(&self.scope.join(", ")),
                    if reached {
                        "reaches this processor"
                    } else {
                        "does not reach this processor (it holds none of these categories)"
                    }
                ));
            }
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
            // Lines under each subprocessor's row, kept out of the table so that they do not
            // widen its columns.
            let mut under = Vec::new();
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
                under.push(self.lines_under(
                    s,
                    &format!("{indent}{}", if j + 1 == m { "   " } else { "│  " }),
                ));
            }
            for (row, lines) in t.render().lines().zip(&under) {
                out.push_str(row);
                out.push('\n');
                out.push_str(lines);
            }
        }
        out
    }
}

impl ChainView {
    /// What is shown under subprocessor `s`'s row, each line starting with `prefix`: the
    /// scope's reach, then each table with its categories (and, with a scope, whether the
    /// request acts on it).
    fn lines_under(&self, s: &SubprocessorView, prefix: &str) -> String {
        let mut out = String::new();
        match s.reached {
            Some(true) => out.push_str(&format!("{prefix}   scope reaches it\n")),
            Some(false) => out.push_str(&format!(
                "{prefix}   scope does not reach it (no task: it holds none of these categories)\n"
            )),
            None => {}
        }
        if s.reached == Some(true)
            && !s.tables.is_empty()
            && !s.tables.iter().any(|t| t.reached == Some(true))
        {
            out.push_str(&format!(
                "{prefix}   no table holds these categories: the holder refuses the request\n"
            ));
        }
        for t in &s.tables {
            // Not a table cell, so cleaned here: the names are another organisation's.
            let categories = clean(&clipped(&t.data_categories.join(", "), 120));
            let whose = if t.inherited {
                " (all of the subprocessor's)"
            } else {
                ""
            };
            let reach = match t.reached {
                Some(true) => "  reached",
                Some(false) => "  left out",
                None => "",
            };
            out.push_str(&format!(
                "{prefix}   table {}: {categories}{whose}{reach}\n",
                clean(&clipped(&t.name, 80))
            ));
        }
        out
    }
}

/// Prints the chain.
pub(crate) async fn run(
    registry: &Registry,
    args: &ChainArgs,
    io: &mut Io<'_>,
) -> Result<u8, Failure> {
    let chain = registry
        .client
        .raw()
        .get_chain(GetChainRequest {})
        .await
        .map_err(|s| registry.failed(s))?
        .into_inner();
    emit(
        io.out,
        io.format,
        &ChainView::scoped(&chain, &args.categories),
        false,
    )?;
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

    fn held(name: &str, categories: &[&str], inherited: bool) -> HeldTable {
        HeldTable {
            name: name.into(),
            data_categories: categories.iter().map(|c| c.to_string()).collect(),
            inherited,
        }
    }

    /// A processor holding `contact` and `invoicing` whose `sql` holder keeps them in three
    /// tables, one naming no categories, beside a mail holder of `marketing`.
    fn tabular_chain() -> Chain {
        let strings = |v: &[&str]| v.iter().map(|c| c.to_string()).collect::<Vec<_>>();
        Chain {
            processors: vec![
                ChainProcessor {
                    name: "bureau".into(),
                    data_categories: strings(&["contact", "invoicing", "marketing"]),
                    subprocessors: vec![
                        Subprocessor {
                            name: "accounting".into(),
                            connector: "sql".into(),
                            data_categories: strings(&["contact", "invoicing"]),
                            tables: vec![
                                held("customers", &["contact"], false),
                                held("invoices\u{1b}[31m", &["invoicing"], false),
                                held("notes", &["contact", "invoicing"], true),
                            ],
                            ..Default::default()
                        },
                        Subprocessor {
                            name: "mail".into(),
                            connector: "noop".into(),
                            data_categories: strings(&["marketing"]),
                            ..Default::default()
                        },
                    ],
                    ..Default::default()
                },
                ChainProcessor {
                    name: "archive".into(),
                    data_categories: strings(&["archive"]),
                    subprocessors: vec![Subprocessor {
                        name: "paper".into(),
                        data_categories: strings(&["archive"]),
                        ..Default::default()
                    }],
                    ..Default::default()
                },
            ],
        }
    }

    /// Each table of a `sql` holder is shown under it with its categories, its name made
    /// safe for the terminal; the rows of the subprocessors keep their columns.
    #[test]
    fn a_tabular_holder_shows_its_tables_under_it() {
        let chain = tabular_chain();
        let view = ChainView::from(&chain);
        let table = view.to_table();
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 9, "{table}");
        assert!(lines[2].starts_with("│  ├─ accounting  "), "{table}");
        assert_eq!(lines[3], "│  │     table customers: contact", "{table}");
        assert_eq!(
            lines[4], "│  │     table invoices [31m: invoicing",
            "{table}"
        );
        assert_eq!(
            lines[5], "│  │     table notes: contact, invoicing (all of the subprocessor's)",
            "{table}"
        );
        assert!(lines[6].starts_with("│  └─ mail        "), "{table}");
        assert!(!table.contains('\u{1b}'), "{table}");
        assert!(!table.contains("scope"), "{table}");
        let json = serde_json::to_value(&view).expect("json");
        assert!(json.get("scope").is_none(), "{json:#}");
        let accounting = &json["processors"][0]["subprocessors"][0];
        assert!(accounting.get("reached").is_none(), "{json:#}");
        assert_eq!(accounting["tables"][2]["name"], "notes");
        assert_eq!(accounting["tables"][2]["inherited"], true);
        assert_eq!(
            accounting["tables"][0]["data_categories"],
            serde_json::json!(["contact"])
        );
        assert!(accounting["tables"][0].get("reached").is_none(), "{json:#}");
        assert_eq!(
            json["processors"][0]["subprocessors"][1]["tables"],
            serde_json::json!([])
        );
    }

    /// With a scope, each processor and subprocessor says whether a request of that scope
    /// reaches it, and a `sql` holder which tables it acts on and which it leaves out.
    #[test]
    fn a_scope_shows_what_it_reaches() {
        let chain = tabular_chain();
        let view = ChainView::scoped(&chain, &["contact".to_string()]);
        let table = view.to_table();
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(
            lines[2], "│  scope contact: reaches this processor",
            "{table}"
        );
        assert!(lines[3].starts_with("│  ├─ accounting  "), "{table}");
        assert_eq!(lines[4], "│  │     scope reaches it", "{table}");
        assert_eq!(
            lines[5], "│  │     table customers: contact  reached",
            "{table}"
        );
        assert_eq!(
            lines[6], "│  │     table invoices [31m: invoicing  left out",
            "{table}"
        );
        assert_eq!(
            lines[7],
            "│  │     table notes: contact, invoicing (all of the subprocessor's)  reached",
            "{table}"
        );
        assert!(lines[8].starts_with("│  └─ mail  "), "{table}");
        assert_eq!(
            lines[9],
            "│        scope does not reach it (no task: it holds none of these categories)",
            "{table}"
        );
        assert_eq!(
            lines[11],
            "   scope contact: does not reach this processor (it holds none of these categories)",
            "{table}"
        );
        let json = serde_json::to_value(&view).expect("json");
        assert_eq!(json["scope"], serde_json::json!(["contact"]));
        let bureau = &json["processors"][0];
        assert_eq!(bureau["reached"], true);
        assert_eq!(bureau["subprocessors"][0]["reached"], true);
        let reached: Vec<bool> = (bureau["subprocessors"][0]["tables"].as_array())
            .expect("tables")
            .iter()
            .map(|t| t["reached"].as_bool().expect("reached"))
            .collect();
        assert_eq!(reached, [true, false, true]);
        assert_eq!(bureau["subprocessors"][1]["reached"], false);
        assert_eq!(json["processors"][1]["reached"], false);
        assert_eq!(json["processors"][1]["subprocessors"][0]["reached"], false);

        // A scope the processor holds but no table of the holder does: the holder is
        // reached and refuses.
        let mut chain = tabular_chain();
        chain.processors[0].subprocessors[0].tables.pop();
        chain.processors[0].data_categories.push("payroll".into());
        chain.processors[0].subprocessors[0]
            .data_categories
            .push("payroll".into());
        let table = ChainView::scoped(&chain, &["payroll".to_string()]).to_table();
        assert!(
            table.contains(
                "│  │     no table holds these categories: the holder refuses the request\n"
            ),
            "{table}"
        );
    }
}
