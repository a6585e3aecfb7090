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

/// Replaces control characters (newlines, tabs, escape sequences) with spaces: cells hold
/// text from the server, which must neither break the layout nor drive the terminal.
pub fn clean(text: &str) -> String {
    text.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
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
    fn counts_characters_not_bytes() {
        let mut t = Table::new(["NAME", "X"]);
        t.row(["Käyttäjä", "1"]);
        assert_eq!(t.render(), "NAME      X\nKäyttäjä  1\n");
    }
}
