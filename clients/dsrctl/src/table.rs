//! A minimal aligned plain-text table.
//!
//! Columns are separated by two spaces and padded to their widest cell, counted in characters
//! (good enough for the mostly-ASCII ids, states and names shown here). The last column is
//! not padded, so lines carry no trailing spaces.

/// Rows of cells under an optional header.
#[derive(Debug, Clone, Default)]
pub struct Table {
    header: Option<Vec<String>>,
    rows: Vec<Vec<String>>,
}

/// What an empty cell prints as, so columns stay visible and parseable with `awk`.
const EMPTY: &str = "-";

impl Table {
    /// A table with a header row.
    pub fn new<I, S>(header: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Self {
            header: Some(header.into_iter().map(Into::into).collect()),
            rows: Vec::new(),
        }
    }

    /// A table without a header, e.g. for `key  value` lists.
    pub fn headless() -> Self {
        Self::default()
    }

    /// Appends a row.
    pub fn row<I, S>(&mut self, cells: I) -> &mut Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.rows
            .push(cells.into_iter().map(|c| clean(&c.into())).collect());
        self
    }

    /// True when no row was added.
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// The table as lines, each ending in `\n`.
    pub fn render(&self) -> String {
        let lines: Vec<&Vec<String>> = self.header.iter().chain(&self.rows).collect();
        let columns = lines.iter().map(|l| l.len()).max().unwrap_or(0);
        let mut widths = vec![0; columns];
        for line in &lines {
            for (i, cell) in line.iter().enumerate() {
                widths[i] = widths[i].max(display(cell).chars().count());
            }
        }
        let mut out = String::new();
        for line in lines {
            let mut text = String::new();
            for (i, width) in widths.iter().enumerate() {
                let cell = display(line.get(i).map(String::as_str).unwrap_or(""));
                if i > 0 {
                    text.push_str("  ");
                }
                text.push_str(cell);
                if i + 1 < columns {
                    let pad = width - cell.chars().count();
                    text.extend(std::iter::repeat_n(' ', pad));
                }
            }
            out.push_str(text.trim_end());
            out.push('\n');
        }
        out
    }
}

fn display(cell: &str) -> &str {
    if cell.is_empty() {
        EMPTY
    } else {
        cell
    }
}

/// Text from a server made safe for a terminal: control characters (newlines, tabs, escape
/// sequences) become spaces, so that it neither breaks the layout nor drives the terminal;
/// invisible format characters (`is_hidden`) are shown as their code point (`<U+202E>`),
/// so that they cannot reorder or hide what is shown.
pub fn clean(text: &str) -> String {
    let flat: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    show_hidden(&flat)
}

/// `text` with every invisible format character (`is_hidden`) shown as its code point,
/// its line breaks kept: what a whole rendered table or block passes through before it is
/// printed, so that text that reached it without [`clean`] is shown as safely.
pub fn show_hidden(text: &str) -> String {
    if !text.chars().any(is_hidden) {
        return text.to_string();
    }
    let mut out = String::with_capacity(text.len() + 16);
    for c in text.chars() {
        if is_hidden(c) {
            out.push_str(&format!("<U+{:04X}>", u32::from(c)));
        } else {
            out.push(c);
        }
    }
    out
}

/// Characters a terminal does not show as themselves but that change what is shown around
/// them: every Unicode format character ([`dsrelay_runtime::unicode::is_format_character`]:
/// bidirectional overrides, embeddings, isolates and marks, zero width spaces, invisible
/// operators, the byte order mark, interlinear annotation marks, tag characters), and the
/// line and paragraph separators. Unlike free text ([`dsrelay_runtime::identity::refused_in_text`])
/// a table shows the joiners too: in a cell they can only hide that two values differ. The
/// separators are not format characters, but a terminal may break a line at them, and a
/// cell must stay on its line. U+2065 and the tag block's unassigned code points are not
/// format characters yet either, but a terminal draws them as nothing, so two cells holding
/// them would look the same.
fn is_hidden(c: char) -> bool {
    dsrelay_runtime::unicode::is_format_character(c)
        || matches!(
            c,
            '\u{2028}' | '\u{2029}' | '\u{2065}' | '\u{E0000}'..='\u{E007F}'
        )
}

/// `text` cut to at most `max` characters for a table cell, saying where the rest is (long
/// free text, a reason or an error, is whole in `--output json`).
pub fn clipped(text: &str, max: usize) -> String {
    match text.char_indices().nth(max) {
        Some((end, _)) => format!("{}… (--output json has it whole)", &text[..end]),
        None => text.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligns_columns_without_trailing_spaces() {
        let mut t = Table::new(["ID", "STATE", "NOTE"]);
        t.row(["r-1", "COMPLETED", "ok"]);
        t.row(["request-22", "FAILED", ""]);
        assert_eq!(
            t.render(),
            "ID          STATE      NOTE\n\
             r-1         COMPLETED  ok\n\
             request-22  FAILED     -\n"
        );
    }

    #[test]
    fn headless_short_rows_and_control_characters() {
        let mut t = Table::headless();
        t.row(["state", "IN_PROGRESS"]);
        t.row(["message", "two\nlines\x1b[31m"]);
        t.row(["alone"]);
        assert_eq!(
            t.render(),
            "state    IN_PROGRESS\nmessage  two lines [31m\nalone    -\n"
        );
        assert!(!t.is_empty());
        assert_eq!(Table::new(["A"]).render(), "A\n");
    }

    #[test]
    fn format_characters_are_shown_by_their_code_point() {
        // A right-to-left override would show "invoice\u{202E}fdp.exe" as "invoiceexe.pdf".
        assert_eq!(clean("invoice\u{202E}fdp.exe"), "invoice<U+202E>fdp.exe");
        for (c, shown) in [
            ('\u{200B}', "<U+200B>"),
            ('\u{200F}', "<U+200F>"),
            ('\u{2060}', "<U+2060>"),
            ('\u{2064}', "<U+2064>"),
            ('\u{2066}', "<U+2066>"),
            ('\u{2069}', "<U+2069>"),
            ('\u{202A}', "<U+202A>"),
            ('\u{FEFF}', "<U+FEFF>"),
            ('\u{E0041}', "<U+E0041>"),
        ] {
            assert_eq!(clean(&format!("a{c}b")), format!("a{shown}b"));
        }
        assert_eq!(show_hidden("a\n\u{202E}b\n"), "a\n<U+202E>b\n");
        // Letters of any script, and a tab, are not format characters.
        assert_eq!(clean("Käyttäjä שלום\tx"), "Käyttäjä שלום x");
        let mut t = Table::new(["NOTE", "X"]);
        t.row(["\u{2066}ok\u{2069}", "1"]);
        assert_eq!(t.render(), "NOTE                X\n<U+2066>ok<U+2069>  1\n");
    }

    /// The terminal's set is the runtime's format characters, the joiners free text allows
    /// among them, and the line and paragraph separators.
    #[test]
    fn the_terminal_shows_every_format_character_and_the_separators() {
        for c in [
            '\u{200C}',
            '\u{200D}',
            '\u{2028}',
            '\u{2029}',
            '\u{0600}',
            '\u{E0001}',
            '\u{2065}',
            '\u{E0000}',
            '\u{E007F}',
        ] {
            assert_eq!(
                clean(&format!("a{c}b")),
                format!("a<U+{:04X}>b", u32::from(c))
            );
        }
        for u in 0..=u32::from(char::MAX) {
            let Some(c) = char::from_u32(u) else { continue };
            if dsrelay_runtime::unicode::is_format_character(c) {
                assert!(is_hidden(c), "U+{u:04X}");
            }
        }
        // Next to the separators, and a character that shows nothing but is no format one.
        for c in ['\u{2027}', '\u{202F}', '\u{3164}'] {
            assert_eq!(clean(&format!("a{c}b")), format!("a{c}b"));
        }
    }

    #[test]
    fn counts_characters_not_bytes() {
        let mut t = Table::new(["NAME", "X"]);
        t.row(["Käyttäjä", "1"]);
        assert_eq!(t.render(), "NAME      X\nKäyttäjä  1\n");
    }
}
