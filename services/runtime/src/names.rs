//! Names a caller gives of another party (a processor's at the registry, a controller's at a
//! processor), in the messages that answer a listing filtered by one.

/// The kind of party a listing is filtered by, which the message names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PartyKind {
    /// A processor the registry delivers to (the registry's ListContracts).
    Processor,
    /// A controller a processor takes requests from (a processor's ListContractEnds).
    Controller,
}

/// Why a listing filtered by the `kind` named `name` found nothing when that name is neither
/// configured (`configured`) nor that of a stored contract end: a misspelt name would
/// otherwise read as a party with no contract ends. `None` for no filter (an empty name) or a
/// configured name. The message names the configured ones, or says `none`.
pub fn unknown_name(kind: PartyKind, name: &str, configured: &[&str]) -> Option<String> {
    if name.is_empty() || configured.contains(&name) {
        return None;
    }
    let known = match configured {
        [] => "none".to_string(),
        names => names.join(", "),
    };
    Some(match kind {
        PartyKind::Processor => format!(
            "no processor named {name:?} is configured here, and no contract end was made \
             with one of that name; configured processors: {known}"
        ),
        PartyKind::Controller => format!(
            "no controller named {name:?} is configured here, and no contract end came \
             from one of that name; configured controllers: {known}"
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A filter naming no configured party says so when it finds nothing, naming the
    /// configured ones, in the words each service has always used.
    #[test]
    fn an_unknown_name_is_named_as_such() {
        assert_eq!(
            unknown_name(PartyKind::Processor, "nobody", &["payroll", "web"]).as_deref(),
            Some(
                "no processor named \"nobody\" is configured here, and no contract end was \
                 made with one of that name; configured processors: payroll, web"
            )
        );
        assert_eq!(
            unknown_name(PartyKind::Controller, "nobody", &["acme", "globex"]).as_deref(),
            Some(
                "no controller named \"nobody\" is configured here, and no contract end came \
                 from one of that name; configured controllers: acme, globex"
            )
        );
        for kind in [PartyKind::Processor, PartyKind::Controller] {
            assert!(unknown_name(kind, "nobody", &[]).is_some_and(|m| m.ends_with("s: none")));
            assert_eq!(unknown_name(kind, "acme", &["acme", "web"]), None);
            assert_eq!(unknown_name(kind, "", &["acme"]), None);
        }
    }
}
