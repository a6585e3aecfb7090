//! Removing personal data and the API key from text the API sent back before it becomes part
//! of a task's reason, which is stored and shown to operators and the controller.

use crate::Task;

/// The values one task must not leak: its identities, corrected values and the API key.
pub(super) struct Scrubber {
    secrets: Vec<String>,
}

impl Scrubber {
    pub(super) fn for_task(task: &Task, api_key: &str) -> Self {
        let mut secrets: Vec<String> = std::iter::once(api_key.to_string())
            .chain(task.identities.iter().map(|id| id.value.trim().to_string()))
            .chain(
                task.parameters
                    .corrections
                    .iter()
                    .map(|c| c.new_value.trim().to_string()),
            )
            // Very short values ("Al") would blank out ordinary words, and leak little.
            .filter(|s| s.chars().count() >= 3)
            .collect();
        // Longest first, so that a value containing another is removed whole.
        secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
        Self { secrets }
    }

    /// For work on a whole audience, which carries no identities: the key, and addresses.
    pub(super) fn for_key(api_key: &str) -> Self {
        Self {
            secrets: vec![api_key.to_string()],
        }
    }

    /// A scrubber that knows no values; it still hides addresses.
    #[cfg(test)]
    pub(super) fn nothing() -> Self {
        Self {
            secrets: Vec::new(),
        }
    }

    pub(super) fn apply(&self, text: &str) -> String {
        let mut out = text.to_string();
        for secret in &self.secrets {
            out = replace_ascii_case_insensitive(&out, secret, "[redacted]");
        }
        // Addresses the request did not carry (e.g. the one a correction collides with) are
        // still personal data.
        out.split(' ')
            .map(|word| if word.contains('@') { "[e-mail]" } else { word })
            .collect::<Vec<_>>()
            .join(" ")
    }
}

/// `haystack` with every ASCII-case-insensitive occurrence of `needle` replaced. ASCII
/// lowercasing keeps byte offsets, so positions found in the lowered copy are valid in the
/// original.
fn replace_ascii_case_insensitive(haystack: &str, needle: &str, with: &str) -> String {
    let lower_hay = haystack.to_ascii_lowercase();
    let lower_needle = needle.to_ascii_lowercase();
    let mut out = String::with_capacity(haystack.len());
    let mut last = 0;
    for (at, _) in lower_hay.match_indices(&lower_needle) {
        out.push_str(&haystack[last..at]);
        out.push_str(with);
        last = at + needle.len();
    }
    out.push_str(&haystack[last..]);
    out
}

#[cfg(test)]
mod tests {
    use dsrelay_proto::v1::RequestKind;

    use super::*;
    use crate::mailchimp::tests::{corrections, email, task, KEY, MAIJA};

    #[test]
    fn scrubbing_removes_secrets_in_any_case_and_addresses() {
        let mut t = task(RequestKind::Rectification, vec![email(MAIJA)]);
        t.parameters = corrections(&[("last_name", "Virtanen")]);
        let scrub = Scrubber::for_task(&t, KEY);
        let out = scrub.apply(&format!(
            "MAIJA.MEIKALAINEN@EXAMPLE.FI and x@y.z, key {KEY}, name virtanen"
        ));
        assert_eq!(
            out,
            "[redacted] and [e-mail] key [redacted], name [redacted]"
        );
    }
}
