//! A connector for holders without an API (paper archives, a legacy system someone must
//! open by hand): the task waits for an operator, who confirms it with evidence or refuses
//! it through the processor's operator API (`dsrctl tasks`). A contract end's bulk step waits
//! for an operator the same way, with instructions naming the controller. It counts nothing,
//! so the erasure that follows a return ([`crate::BulkJob::returned`]) is not checked here:
//! its instructions tell the operator to delete only what was returned.
//!
//! Every task's note opens with a built-in lead for its kind of work, saying what to do and
//! what not to do (a rectification deletes nothing), followed by the configured text of that
//! kind only ([`ManualInstructions`]): an erasure's text ("shred the folder") must never
//! reach an operator who was asked to correct a phone number.

use std::fmt;

use dsrelay_proto::v1::RequestKind;
use serde::de::{self, MapAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::{kind_label, BoxFuture, BulkJob, BulkOp, Connector, ConnectorError, Outcome, Task};

/// Settings of the manual connector.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ManualConfig {
    /// What the operator should do here, per kind of work, shown after the kind's built-in
    /// lead (e.g. `erasure = "customer folders are in cabinet B2, sorted by customer number;
    /// shred the folder and note its id"`).
    #[serde(default, skip_serializing_if = "ManualInstructions::is_empty")]
    pub instructions: ManualInstructions,
    /// The controllers whose data the operator handles here, when the processor serves
    /// several; each task and contract end tells the operator its controller. Absent:
    /// unscoped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub controllers: Option<Vec<String>>,
}

/// The keys of the `instructions` table, one per kind of work.
pub const INSTRUCTION_KEYS: &[&str] = &[
    "erasure",
    "return_of_data",
    "transfer",
    "rectification",
    "restriction",
    "objection",
    "contract_end_return",
    "contract_end_erasure",
];

/// The configured `instructions`: a table with a text per kind of work, or the single text
/// of older configurations.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ManualInstructions {
    /// `instructions = "..."`, the form of older configurations, read as what the operator
    /// does to erase here: it is shown with ERASURE tasks and a contract end's deletion step
    /// only; every other kind shows its built-in lead alone.
    Single(String),
    /// `[instructions]` with a key per kind ([`INSTRUCTION_KEYS`]).
    PerKind(KindInstructions),
}

impl Default for ManualInstructions {
    fn default() -> Self {
        Self::PerKind(KindInstructions::default())
    }
}

impl From<&str> for ManualInstructions {
    /// The single form: an erasure's text.
    fn from(text: &str) -> Self {
        Self::Single(text.to_owned())
    }
}

impl ManualInstructions {
    /// Whether no text is configured for any kind.
    pub fn is_empty(&self) -> bool {
        match self {
            Self::Single(text) => text.is_empty(),
            Self::PerKind(k) => *k == KindInstructions::default(),
        }
    }

    /// The warning to log at start when the single form is used, or `None`.
    pub fn single_form_warning(&self) -> Option<String> {
        match self {
            Self::Single(text) if !text.is_empty() => Some(format!(
                "manual connector: `instructions` is a single text; it is shown with ERASURE \
                 tasks and a contract end's deletion step only, every other kind shows its \
                 built-in lead alone. Write it as `instructions.erasure` (the table \
                 [subprocessors.connector.instructions], keys {}) instead",
                INSTRUCTION_KEYS.join(", ")
            )),
            _ => None,
        }
    }

    /// The table's texts; the single form's text is the erasures'.
    fn per_kind(&self) -> KindInstructions {
        match self {
            Self::Single(text) => KindInstructions {
                erasure: text.clone(),
                contract_end_erasure: text.clone(),
                ..KindInstructions::default()
            },
            Self::PerKind(k) => k.clone(),
        }
    }
}

impl Serialize for ManualInstructions {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Self::Single(text) => s.serialize_str(text),
            Self::PerKind(k) => k.serialize(s),
        }
    }
}

impl<'de> Deserialize<'de> for ManualInstructions {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // Not `#[serde(untagged)]`: its error says no variant matched, where the table's own
        // names the unknown key and lists the known ones.
        struct Either;
        impl<'de> Visitor<'de> for Either {
            type Value = ManualInstructions;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a table with a text per kind of work (or a string, ERASURE's)")
            }
            fn visit_str<E: de::Error>(self, text: &str) -> Result<Self::Value, E> {
                Ok(ManualInstructions::Single(text.to_owned()))
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
                let table = de::value::MapAccessDeserializer::new(map);
                KindInstructions::deserialize(table).map(ManualInstructions::PerKind)
            }
        }
        d.deserialize_any(Either)
    }
}

/// The `instructions` table: what the operator does here for each kind of work, shown after
/// the kind's built-in lead. A kind left out (or empty) shows its lead alone; no kind falls
/// back to another's text.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KindInstructions {
    /// ERASURE.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub erasure: String,
    /// RETURN_OF_DATA.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub return_of_data: String,
    /// TRANSFER.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub transfer: String,
    /// RECTIFICATION.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub rectification: String,
    /// RESTRICTION, set and lifted.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub restriction: String,
    /// OBJECTION.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub objection: String,
    /// A contract end's return of all of a controller's data.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub contract_end_return: String,
    /// A contract end's deletion of all of a controller's data.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub contract_end_erasure: String,
}

/// See the module documentation.
#[derive(Debug, Clone)]
pub(crate) struct ManualConnector {
    instructions: KindInstructions,
    controllers: Option<Vec<String>>,
}

impl ManualConnector {
    /// A connector handing every task to an operator; logs a warning when `config` uses the
    /// single form of `instructions`.
    pub(crate) fn new(config: &ManualConfig) -> Self {
        if let Some(warning) = config.instructions.single_form_warning() {
            tracing::warn!("{warning}");
        }
        Self {
            instructions: config.instructions.per_kind(),
            controllers: config.controllers.clone(),
        }
    }

    /// The note of `task`: its kind's lead, then that kind's configured text.
    fn note(&self, task: &Task) -> String {
        let i = &self.instructions;
        let (lead, text): (String, &str) = match task.kind {
            RequestKind::Erasure => (
                "ERASURE: delete the subject's data held here (keep only what a legal \
                 obligation requires, and say so), then confirm with what was deleted"
                    .to_string(),
                i.erasure.as_str(),
            ),
            RequestKind::ReturnOfData => (
                "RETURN_OF_DATA: copy the subject's data held here and hand the copy to the \
                 controller, then confirm saying what was handed over and how; do not delete \
                 or change anything"
                    .to_string(),
                i.return_of_data.as_str(),
            ),
            RequestKind::Transfer => (
                format!(
                    "TRANSFER: copy the subject's data held here and send the copy to the \
                     recipient {:?}, then confirm saying what was sent and how; do not delete \
                     or change anything",
                    task.parameters.transfer_recipient
                ),
                i.transfer.as_str(),
            ),
            RequestKind::Rectification => (
                "RECTIFICATION: change the listed fields to the corrected values, then \
                 confirm; do not delete anything"
                    .to_string(),
                i.rectification.as_str(),
            ),
            RequestKind::Restriction if task.parameters.lift_restriction => (
                "RESTRICTION (lift): remove the restriction set earlier on the subject's \
                 data, so that it is processed again, then confirm; do not delete or change \
                 the data"
                    .to_string(),
                i.restriction.as_str(),
            ),
            RequestKind::Restriction => (
                "RESTRICTION: mark the subject's data as restricted (kept, but used for \
                 nothing else until the restriction is lifted), then confirm; do not delete \
                 or change the data"
                    .to_string(),
                i.restriction.as_str(),
            ),
            RequestKind::Objection => (
                "OBJECTION: stop direct marketing to the subject (mark them as not to be \
                 contacted), then confirm; do not delete anything, or the mark goes too"
                    .to_string(),
                i.objection.as_str(),
            ),
            // A contract end comes through `run_bulk`; nothing else is delivered.
            other => (
                format!(
                    "{}: do by hand what the task asks, then confirm; do not delete anything \
                     it does not ask for",
                    kind_label(other)
                ),
                "",
            ),
        };
        with_text(lead, text)
    }
}

/// `lead`, followed by the configured `text` when there is one.
fn with_text(lead: String, text: &str) -> String {
    if text.is_empty() {
        lead
    } else {
        format!("{lead}. Here: {text}")
    }
}

impl Connector for ManualConnector {
    fn kind_name(&self) -> &'static str {
        "manual"
    }

    fn supports(&self, kind: RequestKind) -> bool {
        kind != RequestKind::Unspecified
    }

    fn scoped_controllers(&self) -> Option<Vec<String>> {
        self.controllers.clone()
    }

    fn run<'a>(&'a self, task: &'a Task) -> BoxFuture<'a, Result<Outcome, ConnectorError>> {
        Box::pin(async move {
            let note = self.note(task);
            Ok(Outcome::WaitingForOperator { note })
        })
    }

    fn run_bulk<'a>(&'a self, job: &'a BulkJob) -> BoxFuture<'a, Result<Outcome, ConnectorError>> {
        Box::pin(async move {
            let what = match job.op {
                BulkOp::Export => format!(
                    "CONTRACT_END (return): return ALL of controller {}'s data held here to the \
                     controller, then confirm; do not delete anything: it is deleted only \
                     after the controller confirms receipt",
                    job.controller
                ),
                BulkOp::Erase => format!(
                    "CONTRACT_END (deletion): delete ALL of controller {}'s data held here \
                     (keep only what a legal obligation requires), then confirm with what was \
                     deleted",
                    job.controller
                ),
            };
            // No count to check here: the person who deletes is told what to check.
            let what = match (job.op, &job.returned) {
                (BulkOp::Erase, Some(_)) => format!(
                    "{what}. It was returned first: delete only what was returned; if data \
                     came here after the return, delete nothing and refuse the task saying \
                     so, and the controller can end the contract again to have it returned"
                ),
                _ => what,
            };
            let text = match job.op {
                BulkOp::Export => &self.instructions.contract_end_return,
                BulkOp::Erase => &self.instructions.contract_end_erasure,
            };
            let note = with_text(what, text);
            Ok(Outcome::WaitingForOperator { note })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Phase, ProgressReporter};

    fn job(op: BulkOp) -> BulkJob {
        BulkJob {
            job_id: "acme/r-1/archive".into(),
            request_id: "r-1".into(),
            controller: "acme".into(),
            op,
            phase: Phase::Start,
            due_at_ms: 0,
            now_ms: 0,
            interrupted: false,
            recorded_progress: Default::default(),
            export: None,
            progress: ProgressReporter::new().0,
            returned: None,
            returned_since_ms: None,
        }
    }

    #[tokio::test]
    async fn a_contract_end_waits_for_an_operator_told_whose_data_and_what_to_do() {
        let c = ManualConnector::new(&ManualConfig {
            controllers: None,
            instructions: ManualInstructions::PerKind(KindInstructions {
                contract_end_return: "box it for the courier".into(),
                contract_end_erasure: "shred cabinet B2".into(),
                ..Default::default()
            }),
        });
        for (op, verb, text) in [
            (BulkOp::Erase, "delete ALL", "shred cabinet B2"),
            (BulkOp::Export, "return ALL", "box it for the courier"),
        ] {
            let note = waiting(c.run_bulk(&job(op)).await);
            assert!(note.contains(verb), "{note}");
            assert!(note.contains("controller acme"), "{note}");
            assert!(note.ends_with(&format!(". Here: {text}")), "{note}");
        }
    }

    #[tokio::test]
    async fn an_erasure_after_a_return_tells_the_operator_to_delete_only_what_was_returned() {
        let c = ManualConnector::new(&ManualConfig::default());
        let after_return = BulkJob {
            returned: Some(Default::default()),
            ..job(BulkOp::Erase)
        };
        for (job, told) in [(after_return, true), (job(BulkOp::Erase), false)] {
            match c.run_bulk(&job).await.unwrap() {
                Outcome::WaitingForOperator { note } => assert_eq!(
                    note.contains("delete only what was returned"),
                    told,
                    "{note}"
                ),
                other => panic!("{other:?}"),
            }
        }
    }

    const SHRED: &str = "Find the subject's folder in cabinet B and shred it";

    fn waiting(outcome: Result<Outcome, ConnectorError>) -> String {
        match outcome.unwrap() {
            Outcome::WaitingForOperator { note } => note,
            other => panic!("{other:?}"),
        }
    }

    fn task(kind: RequestKind) -> Task {
        Task {
            task_id: "t-1".into(),
            request_id: "r-1".into(),
            controller: "acme".into(),
            kind,
            identities: Vec::new(),
            categories: Vec::new(),
            parameters: Default::default(),
            due_at_ms: 0,
            now_ms: 0,
            phase: Phase::Start,
            interrupted: false,
            export: None,
        }
    }

    /// Every kind a task can have, with the key of its text and how its note opens.
    fn kinds() -> Vec<(Task, &'static str, &'static str)> {
        let lift = Task {
            parameters: dsrelay_proto::v1::RequestParameters {
                lift_restriction: true,
                ..Default::default()
            },
            ..task(RequestKind::Restriction)
        };
        vec![
            (task(RequestKind::Erasure), "erasure", "ERASURE: delete "),
            (
                task(RequestKind::ReturnOfData),
                "return_of_data",
                "RETURN_OF_DATA: copy ",
            ),
            (task(RequestKind::Transfer), "transfer", "TRANSFER: copy "),
            (
                task(RequestKind::Rectification),
                "rectification",
                "RECTIFICATION: change the listed fields",
            ),
            (
                task(RequestKind::Restriction),
                "restriction",
                "RESTRICTION: mark ",
            ),
            (lift, "restriction", "RESTRICTION (lift): remove "),
            (
                task(RequestKind::Objection),
                "objection",
                "OBJECTION: stop ",
            ),
        ]
    }

    /// A configuration whose `[instructions]` table holds `texts` (key, text).
    fn table(texts: &[(&str, &str)]) -> ManualConfig {
        let body: String = (texts.iter())
            .map(|(k, v)| format!("{k} = {v:?}\n"))
            .collect();
        toml::from_str(&format!("[instructions]\n{body}")).unwrap()
    }

    #[tokio::test]
    async fn each_kind_shows_its_lead_and_its_own_text_from_the_table() {
        let keys = ["erasure", "return_of_data", "transfer", "rectification"];
        let keys = [&keys[..], &["restriction", "objection"]].concat();
        let texts: Vec<(&str, String)> = (keys.iter()).map(|k| (*k, format!("{k} text"))).collect();
        let pairs: Vec<(&str, &str)> = (texts.iter()).map(|(k, v)| (*k, v.as_str())).collect();
        let c = ManualConnector::new(&table(&pairs));
        for (t, key, lead) in kinds() {
            let note = waiting(c.run(&t).await);
            assert!(note.starts_with(lead), "{key}: {note}");
            assert!(note.ends_with(&format!(". Here: {key} text")), "{note}");
            let others = (keys.iter()).filter(|k| **k != key);
            for other in others {
                assert!(!note.contains(&format!("{other} text")), "{key}: {note}");
            }
        }
    }

    #[tokio::test]
    async fn a_kind_left_out_of_the_table_shows_its_lead_alone() {
        let c = ManualConnector::new(&table(&[("erasure", SHRED)]));
        for (t, key, lead) in kinds() {
            let note = waiting(c.run(&t).await);
            assert!(note.starts_with(lead), "{key}: {note}");
            assert_eq!(note.contains(SHRED), key == "erasure", "{key}: {note}");
            assert_eq!(note.contains(". Here: "), key == "erasure", "{key}: {note}");
        }
        // Nor does a contract end's deletion step take the erasures' text.
        let note = waiting(c.run_bulk(&job(BulkOp::Erase)).await);
        assert!(!note.contains(SHRED), "{note}");
    }

    #[tokio::test]
    async fn the_single_text_is_shown_with_erasures_only() {
        let config: ManualConfig = toml::from_str(&format!("instructions = {SHRED:?}")).unwrap();
        assert_eq!(
            config.instructions,
            ManualInstructions::Single(SHRED.into())
        );
        let c = ManualConnector::new(&config);
        for (t, key, lead) in kinds() {
            let note = waiting(c.run(&t).await);
            assert!(note.starts_with(lead), "{key}: {note}");
            assert_eq!(note.contains(SHRED), key == "erasure", "{key}: {note}");
        }
        for (op, shown) in [(BulkOp::Erase, true), (BulkOp::Export, false)] {
            let note = waiting(c.run_bulk(&job(op)).await);
            assert_eq!(note.contains(SHRED), shown, "{op:?}: {note}");
        }
    }

    /// The operator correcting a phone number is never told to shred the folder.
    #[tokio::test]
    async fn a_rectification_never_shows_the_erasure_text() {
        let single = ManualConfig {
            instructions: SHRED.into(),
            controllers: None,
        };
        for config in [single, table(&[("erasure", SHRED)])] {
            let note = waiting(
                ManualConnector::new(&config)
                    .run(&task(RequestKind::Rectification))
                    .await,
            );
            assert_eq!(
                note,
                "RECTIFICATION: change the listed fields to the corrected values, then \
                 confirm; do not delete anything"
            );
        }
    }

    #[test]
    fn a_transfer_names_its_recipient() {
        let t = Task {
            parameters: dsrelay_proto::v1::RequestParameters {
                transfer_recipient: "successor-oy".into(),
                ..Default::default()
            },
            ..task(RequestKind::Transfer)
        };
        let note = ManualConnector::new(&ManualConfig::default()).note(&t);
        assert!(note.contains("to the recipient \"successor-oy\""), "{note}");
    }

    #[test]
    fn the_single_form_is_warned_about_naming_the_key_to_use() {
        let warning = ManualInstructions::from(SHRED)
            .single_form_warning()
            .unwrap();
        assert!(warning.contains("`instructions.erasure`"), "{warning}");
        assert!(
            warning.contains("[subprocessors.connector.instructions]"),
            "{warning}"
        );
        for form in [
            ManualInstructions::default(),
            ManualInstructions::from(""),
            table(&[("erasure", SHRED)]).instructions,
        ] {
            assert_eq!(form.single_form_warning(), None, "{form:?}");
        }
    }

    #[test]
    fn both_forms_are_written_as_they_are_read() {
        for config in [
            ManualConfig {
                instructions: SHRED.into(),
                controllers: Some(vec!["acme".into()]),
            },
            table(&[("erasure", SHRED), ("contract_end_return", "box it")]),
            ManualConfig::default(),
        ] {
            let text = toml::to_string(&config).unwrap();
            assert_eq!(
                toml::from_str::<ManualConfig>(&text).unwrap(),
                config,
                "{text}"
            );
        }
    }

    /// An unknown kind key is refused at loading, as other unknown keys are (exit 64),
    /// named with its path and the known keys.
    #[test]
    fn an_unknown_kind_key_is_refused_naming_it() {
        #[derive(Debug, Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Service {
            #[allow(dead_code)]
            subprocessors: Vec<Subprocessor>,
        }
        #[derive(Debug, Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Subprocessor {
            #[allow(dead_code)]
            connector: crate::ConnectorConfig,
        }
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("processor.toml");
        for unknown in ["access", "shred", "erasures"] {
            std::fs::write(
                &file,
                format!(
                    "[[subprocessors]]\n[subprocessors.connector]\ntype = \"manual\"\n\
                     [subprocessors.connector.instructions]\nerasure = \"x\"\n\
                     {unknown} = \"y\"\n"
                ),
            )
            .unwrap();
            let no_env: [(String, String); 0] = [];
            let err =
                dsrelay_runtime::config::load::<Service>(Some(&file), "APP", no_env).unwrap_err();
            assert_eq!(
                err.0,
                [format!(
                    "{}: key subprocessors.0.connector.instructions.{unknown}: unknown key; \
                     known here: {}",
                    file.display(),
                    INSTRUCTION_KEYS.join(", ")
                )]
            );
        }
    }
}
