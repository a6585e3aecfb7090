//! Which characters are Unicode format characters and which are default ignorable: the one
//! table of each that the checks of free text and identities ([`crate::identity`]), the
//! processor's cleaning of a holder's words and dsrctl's terminal output all take them from.
//! Each of those says next to its own rule where its set differs from these and why.

/// A format character: Unicode general category Cf, as of Unicode 15.1. These shape how the
/// characters around them show and stand for nothing on their own: the soft hyphen, the
/// bidirectional marks, embeddings, overrides and isolates (a right-to-left override shows
/// `exe.txt` as `txt.exe`), the zero width space, non-joiner, joiner and word joiner, the
/// invisible mathematical operators, the byte order mark, the interlinear annotation
/// characters, the tag characters, the marks Arabic, Syriac and Kaithi write before a number,
/// and the Egyptian hieroglyph, shorthand and musical format controls.
pub fn is_format_character(c: char) -> bool {
    matches!(
        c,
        '\u{00AD}'
            | '\u{0600}'..='\u{0605}'
            | '\u{061C}'
            | '\u{06DD}'
            | '\u{070F}'
            | '\u{0890}'..='\u{0891}'
            | '\u{08E2}'
            | '\u{180E}'
            | '\u{200B}'..='\u{200F}'
            | '\u{202A}'..='\u{202E}'
            | '\u{2060}'..='\u{2064}'
            | '\u{2066}'..='\u{206F}'
            | '\u{FEFF}'
            | '\u{FFF9}'..='\u{FFFB}'
            | '\u{110BD}'
            | '\u{110CD}'
            | '\u{13430}'..='\u{1343F}'
            | '\u{1BCA0}'..='\u{1BCA3}'
            | '\u{1D173}'..='\u{1D17A}'
            | '\u{E0001}'
            | '\u{E0020}'..='\u{E007F}'
    )
}

/// A character that shows nothing: Unicode's default ignorable code points (a text shows
/// them only where it has to, and no font draws them), such as the soft hyphen, the zero
/// width spaces, joiners and the word joiner, the left-to-right and right-to-left marks,
/// embeddings and isolates, the invisible mathematical operators, the byte order mark, the
/// Hangul fillers, the variation selectors and the tag characters, with the code points
/// Unicode keeps for more of them. Most are format characters ([`is_format_character`]);
/// the fillers, the variation selectors and the combining grapheme joiner are letters or
/// marks that show nothing all the same.
pub fn is_default_ignorable(c: char) -> bool {
    matches!(
        c,
        '\u{00AD}'
            | '\u{034F}'
            | '\u{061C}'
            | '\u{115F}'..='\u{1160}'
            | '\u{17B4}'..='\u{17B5}'
            | '\u{180B}'..='\u{180F}'
            | '\u{200B}'..='\u{200F}'
            | '\u{202A}'..='\u{202E}'
            | '\u{2060}'..='\u{206F}'
            | '\u{3164}'
            | '\u{FE00}'..='\u{FE0F}'
            | '\u{FEFF}'
            | '\u{FFA0}'
            | '\u{FFF0}'..='\u{FFF8}'
            | '\u{1BCA0}'..='\u{1BCA3}'
            | '\u{1D173}'..='\u{1D17A}'
            | '\u{E0000}'..='\u{E0FFF}'
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every code point in `spec` (hex, single or `first-last`, space-separated) and no other.
    fn set(spec: &str) -> Vec<(u32, u32)> {
        spec.split_whitespace()
            .map(|part| {
                let (first, last) = part.split_once('-').unwrap_or((part, part));
                let hex = |h: &str| u32::from_str_radix(h, 16).expect("hex in the test's spec");
                (hex(first), hex(last))
            })
            .collect()
    }

    /// Compares `is` with `spec` over every char, and checks `neighbours` (next to a range,
    /// or text that must pass) stay out, so that a failure names them plainly.
    fn pin(is: fn(char) -> bool, spec: &str, neighbours: &[char]) {
        let ranges = set(spec);
        let listed = |u: u32| ranges.iter().any(|&(a, b)| (a..=b).contains(&u));
        let wrong: Vec<String> = (0..=u32::from(char::MAX))
            .filter_map(char::from_u32)
            .filter(|&c| is(c) != listed(u32::from(c)))
            .map(|c| format!("U+{:04X}", u32::from(c)))
            .collect();
        assert!(wrong.is_empty(), "differ from the pinned set: {wrong:?}");
        for &c in neighbours {
            assert!(!is(c), "U+{:04X} is allowed", u32::from(c));
        }
    }

    /// The general category Cf of Unicode 15.1, character by character, with the neighbours
    /// a longer range would take in: letters, digits, spaces and separators stay allowed.
    #[test]
    fn format_characters_are_category_cf_of_unicode_15_1() {
        pin(
            is_format_character,
            "00AD 0600-0605 061C 06DD 070F 0890-0891 08E2 180E 200B-200F 202A-202E \
             2060-2064 2066-206F FEFF FFF9-FFFB 110BD 110CD 13430-1343F 1BCA0-1BCA3 \
             1D173-1D17A E0001 E0020-E007F",
            &[
                'a',
                '0',
                ' ',
                '\u{00AC}',
                '\u{00AE}',
                '\u{0606}',
                '\u{200A}',
                '\u{2028}',
                '\u{2029}',
                '\u{202F}',
                '\u{2065}',
                '\u{FEFE}',
                '\u{FFFC}',
                '\u{E0000}',
                '\u{E0080}',
                'ä',
                'ש',
                '\u{0645}',
            ],
        );
    }

    /// Unicode's default ignorable code points, character by character.
    #[test]
    fn default_ignorables_are_pinned() {
        pin(
            is_default_ignorable,
            "00AD 034F 061C 115F-1160 17B4-17B5 180B-180F 200B-200F 202A-202E 2060-206F \
             3164 FE00-FE0F FEFF FFA0 FFF0-FFF8 1BCA0-1BCA3 1D173-1D17A E0000-E0FFF",
            &[
                'a', ' ', '\u{034E}', '\u{0600}', '\u{2028}', '\u{3163}', '\u{FFF9}',
            ],
        );
    }
}
