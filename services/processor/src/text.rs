//! Fits the texts of a task step (reason, evidence note, legal basis) to the limits of the
//! protocol (`Acknowledgement` in `proto/dsrelay/v1/common.proto`), so the registry never
//! rejects an acknowledgement for its texts. Texts are put together from pieces of any length
//! (an operator's note of the full 4096 bytes with a suffix, a prefix before an error already
//! cut), so the last step, the one that records the task and queues its acknowledgement
//! ([`crate::store`]), fits every text of every transition in one place.

use std::borrow::Cow;

/// `Acknowledgement.reason`: at most this many bytes.
pub const MAX_REASON: usize = 4096;
/// `Evidence.note`: at most this many bytes.
pub const MAX_NOTE: usize = 4096;
/// `Acknowledgement.legal_basis`: at most this many bytes.
pub const MAX_LEGAL_BASIS: usize = 1024;
/// Ends a text that was cut, so a reader knows there was more.
pub const CUT_MARKER: &str = "…[cut]";

/// `text` within `max` bytes: cut on a character boundary and ended with [`CUT_MARKER`]
/// (the marker counted inside `max`) when it is longer; control characters other than tab and
/// line breaks, and the Unicode format characters the registry refuses in texts
/// ([`dsrelay_runtime::identity::refused_in_text`]), replaced by U+FFFD, so that a holder's
/// words never make an acknowledgement the registry refuses.
pub fn fit(text: &str, max: usize) -> Cow<'_, str> {
    let clean: Cow<'_, str> = if text.chars().any(refused) {
        Cow::Owned(
            text.chars()
                .map(|c| if refused(c) { '\u{fffd}' } else { c })
                .collect(),
        )
    } else {
        Cow::Borrowed(text)
    };
    if clean.len() <= max {
        return clean;
    }
    if max < CUT_MARKER.len() {
        return Cow::Owned(cut(&clean, max).to_string());
    }
    let head = cut(&clean, max - CUT_MARKER.len());
    Cow::Owned(format!("{head}{CUT_MARKER}"))
}

/// The longest prefix of `s` of at most `max` bytes that ends on a character boundary.
fn cut(s: &str, max: usize) -> &str {
    let mut end = max.min(s.len());
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

fn refused(c: char) -> bool {
    (c.is_control() && !matches!(c, '\t' | '\n' | '\r'))
        || dsrelay_runtime::identity::refused_in_text(c)
}

#[cfg(test)]
mod tests {
    use super::*;
    use dsrelay_runtime::identity::text_violation;

    #[test]
    fn short_texts_are_kept_as_they_are() {
        assert!(matches!(fit("deleted 3 rows", MAX_NOTE), Cow::Borrowed(_)));
        let exact = "x".repeat(MAX_NOTE);
        assert_eq!(fit(&exact, MAX_NOTE), exact);
        assert_eq!(fit("", MAX_LEGAL_BASIS), "");
    }

    #[test]
    fn long_texts_are_cut_with_the_marker_inside_the_limit() {
        let long = "y".repeat(MAX_NOTE + 1);
        let f = fit(&long, MAX_NOTE);
        assert_eq!(f.len(), MAX_NOTE);
        assert!(f.ends_with(CUT_MARKER), "{f}");
        assert!(f.starts_with("yyy"));
    }

    #[test]
    fn the_cut_never_splits_a_multibyte_character() {
        // Every alignment of 2-, 3- and 4-byte characters against the cut.
        for c in ['ä', '€', '😀'] {
            for pad in 0..4 {
                let s = format!("{}{}", "a".repeat(pad), c.to_string().repeat(3000));
                for max in [MAX_LEGAL_BASIS, MAX_NOTE] {
                    let f = fit(&s, max);
                    assert!(f.len() <= max, "{c} {pad} {max}: {}", f.len());
                    assert!(f.len() > max - 4 - CUT_MARKER.len(), "cut too much");
                    assert!(f.ends_with(CUT_MARKER));
                    assert_eq!(text_violation("t", &f, max, false), None);
                }
            }
        }
    }

    #[test]
    fn a_prefix_before_an_already_cut_text_still_fits() {
        let note = "ö".repeat(MAX_NOTE); // 8192 bytes, typed by an operator
        let once = fit(&note, MAX_NOTE);
        assert_eq!(text_violation("note", &once, MAX_NOTE, false), None);
        let prefixed = format!("confirmed by operator maija: {once}");
        assert!(prefixed.len() > MAX_NOTE);
        let twice = fit(&prefixed, MAX_NOTE);
        assert!(twice.len() <= MAX_NOTE);
        assert!(twice.starts_with("confirmed by operator maija: öö"));
        assert_eq!(
            twice.matches(CUT_MARKER).count(),
            1,
            "one marker, at the end"
        );
        assert!(twice.ends_with(CUT_MARKER));
        // A full 4096-byte note with a suffix.
        let suffixed = format!("{}; retrying", "n".repeat(MAX_NOTE));
        assert_eq!(fit(&suffixed, MAX_REASON).len(), MAX_REASON);
    }

    #[test]
    fn control_characters_the_registry_refuses_are_replaced() {
        let f = fit("bad\0byte\u{1b}[31m\tand\nlines\r", MAX_REASON);
        assert_eq!(f, "bad\u{fffd}byte\u{fffd}[31m\tand\nlines\r");
        assert_eq!(text_violation("reason", &f, MAX_REASON, false), None);
        // Replacing makes the text longer (1 byte to 3); the result still fits.
        let nul = "\0".repeat(MAX_LEGAL_BASIS);
        let f = fit(&nul, MAX_LEGAL_BASIS);
        assert!(f.len() <= MAX_LEGAL_BASIS);
        assert_eq!(
            text_violation("legal_basis", &f, MAX_LEGAL_BASIS, false),
            None
        );
    }

    /// A holder's error text with a right-to-left override or a zero width space would make
    /// an acknowledgement the registry refuses (retried, then dead-lettered): they are
    /// replaced; the joiners a Persian name needs stay.
    #[test]
    fn format_characters_the_registry_refuses_are_replaced() {
        let f = fit(
            "user \u{202E}nimda\u{200B} is locked; \u{0645}\u{200C}\u{06CC}",
            MAX_REASON,
        );
        assert_eq!(
            f,
            "user \u{fffd}nimda\u{fffd} is locked; \u{0645}\u{200C}\u{06CC}"
        );
        assert_eq!(text_violation("reason", &f, MAX_REASON, false), None);
        assert!(text_violation("reason", "a\u{202E}b", MAX_REASON, false).is_some());
    }

    #[test]
    fn a_limit_below_the_marker_still_holds() {
        assert_eq!(fit("€€€", 4), "€");
    }
}
