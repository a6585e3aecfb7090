//! Arbitrary TOML for property tests of a service's configuration parser: known keys with
//! values of any type and content, unknown keys, arrays of tables with known and unknown
//! fields, or no TOML at all. Both services' tests use it (feature `arbitrary-config`).

use proptest::prelude::*;

/// A TOML basic string holding `s`, whatever it contains.
fn quoted(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => out.push_str(&format!("\\u{:04X}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn lines(kv: Vec<(String, String)>) -> String {
    kv.into_iter()
        .map(|(k, v)| format!("{k} = {v}\n"))
        .collect()
}

/// Any value: strings of any content, numbers at and past the limits of the
/// fields' types, booleans, floats, arrays and inline tables of those.
fn value() -> impl Strategy<Value = String> {
    let leaf = prop_oneof![
        any::<String>().prop_map(|s| quoted(&s)),
        "[a-z0-9:/._ -]{0,24}".prop_map(|s| quoted(&s)),
        any::<i64>().prop_map(|n| n.to_string()),
        prop::sample::select(vec![0i64, -1, 1, i64::from(u32::MAX) + 1, i64::MAX])
            .prop_map(|n| n.to_string()),
        any::<bool>().prop_map(|b| b.to_string()),
        any::<f64>().prop_map(|f| format!("{f:?}")),
    ];
    leaf.prop_recursive(2, 12, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(|v| format!("[{}]", v.join(", "))),
            prop::collection::vec(("[a-z_]{1,10}".prop_map(String::from), inner), 0..4).prop_map(
                |kv| {
                    let kv: Vec<String> =
                        kv.into_iter().map(|(k, v)| format!("{k} = {v}")).collect();
                    format!("{{ {} }}", kv.join(", "))
                }
            ),
        ]
    })
}

/// A document setting `keys` (dotted paths) and adding entries to `arrays` (name,
/// fields), or any text.
pub fn document(
    keys: &'static [&'static str],
    arrays: &'static [(&'static str, &'static [&'static str])],
) -> impl Strategy<Value = String> {
    let key = prop_oneof![
        4 => prop::sample::select(keys).prop_map(String::from),
        1 => "[a-z_]{1,12}".prop_map(String::from),
    ];
    let top = prop::collection::vec((key, value()), 0..12).prop_map(lines);
    let entry = prop::sample::select(arrays).prop_flat_map(|(name, fields)| {
        let field = prop_oneof![
            4 => prop::sample::select(fields).prop_map(String::from),
            1 => "[a-z_.]{1,12}".prop_map(String::from),
        ];
        prop::collection::vec((field, value()), 0..8)
            .prop_map(move |kv| format!("[[{name}]]\n{}", lines(kv)))
    });
    let structured = (top, prop::collection::vec(entry, 0..4))
        .prop_map(|(top, entries)| format!("{top}{}", entries.concat()));
    prop_oneof![4 => structured, 1 => any::<String>()]
}

/// `PREFIX__KEY` overrides of known keys with any text.
pub fn overrides(
    prefix: &'static str,
    keys: &'static [&'static str],
) -> impl Strategy<Value = Vec<(String, String)>> {
    prop::collection::vec((prop::sample::select(keys), any::<String>()), 0..4).prop_map(move |kv| {
        kv.into_iter()
            .map(|(k, v)| {
                let k = k.replace('.', "__").to_uppercase();
                (format!("{prefix}__{k}"), v)
            })
            .collect()
    })
}
