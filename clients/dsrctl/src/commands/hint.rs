//! The `dsrctl` commands that messages suggest running next.

use std::path::Path;
use std::sync::OnceLock;

use crate::cli::ConnectionArgs;

/// How this run's hints start dsrctl, when [`name_program`] set it: `dsrctl` until then.
static PROGRAM: OnceLock<String> = OnceLock::new();

/// Names the program the hints start, as `dev up`'s printed commands do: `cargo run -q -p
/// dsrctl --` for a dsrctl cargo built in the workspace the command runs in, `dsrctl` when
/// PATH finds this very binary by that name, else its path. Set once, by [`crate::run`];
/// later calls change nothing.
pub(crate) fn name_program(program: String) {
    let _ = PROGRAM.set(program);
}

/// Prints a suggested `dsrctl` command so that it works as printed: started as this run was
/// ([`name_program`]), with the connection flags the user gave on the command line, without
/// which it would ask another registry (or find no certificate). What the environment or a
/// config file set needs no repeating: the same shell has it. None of these flags carries a
/// secret: `--key` names a file.
#[derive(Debug, Clone)]
pub(crate) struct Hint {
    /// How the command starts dsrctl, as shell words ([`name_program`]).
    program: String,
    /// ` --flag value` for each connection flag given, quoted for a POSIX shell.
    flags: String,
}

/// The hint for a run given no connection flags.
impl Default for Hint {
    fn default() -> Self {
        Self {
            program: PROGRAM.get().map_or("dsrctl", String::as_str).to_string(),
            flags: String::new(),
        }
    }
}

impl Hint {
    /// The hint for a run with these connection flags.
    pub(crate) fn new(connection: &ConnectionArgs) -> Self {
        let c = connection;
        let path = |p: Option<&Path>| p.map(|p| p.to_string_lossy().into_owned());
        let given = [
            ("--endpoint", c.endpoint.clone()),
            ("--config", path(c.config.as_deref())),
            ("--ca", path(c.ca.as_deref())),
            ("--cert", path(c.cert.as_deref())),
            ("--key", path(c.key.as_deref())),
            ("--crl", path(c.crl.as_deref())),
            ("--server-identity", c.server_identity.clone()),
        ];
        let mut flags = String::new();
        for (flag, value) in given {
            if let Some(value) = value {
                flags.push_str(&format!(" {flag} {}", shell_word(&value)));
            }
        }
        Self {
            flags,
            ..Self::default()
        }
    }

    /// The program ([`name_program`]) with `words` (quoted where a shell needs it) and the
    /// connection flags.
    pub(crate) fn command(&self, words: &[&str]) -> String {
        let mut out = self.program.clone();
        for word in words {
            out.push(' ');
            out.push_str(&shell_word(word));
        }
        out.push_str(&self.flags);
        out
    }
}

/// `word` as a POSIX shell reads it back: as it is when it holds nothing the shell would
/// act on, else in single quotes.
pub(crate) fn shell_word(word: &str) -> String {
    let plain = |c: char| c.is_ascii_alphanumeric() || "-_./:=@%+,".contains(c);
    if !word.is_empty() && word.chars().all(plain) {
        return word.to_string();
    }
    format!("'{}'", word.replace('\'', r"'\''"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::Cli;
    use clap::Parser;

    fn hint(argv: &[&str]) -> Hint {
        Hint::new(&Cli::try_parse_from(argv).unwrap().connection)
    }

    #[test]
    fn a_hint_repeats_the_connection_flags_given_and_quotes_what_a_shell_would_split() {
        let none = hint(&["dsrctl", "get", "r-1"]);
        assert_eq!(none.command(&["get", "r-1"]), "dsrctl get r-1");
        let all = hint(&[
            "dsrctl",
            "--endpoint",
            "https://registry.example:50051",
            "watch",
            "r-1",
            "--ca",
            "my pki/ca.pem",
            "--cert",
            "op.pem",
            "--key",
            "op.key",
            "--crl",
            "crl.pem",
            "--server-identity",
            "spiffe://dsrelay.dev/registry/controller",
            "--config",
            "it's.toml",
            "--output",
            "json",
        ]);
        assert_eq!(
            all.command(&["download", "c 1", "--out", "DIR"]),
            "dsrctl download 'c 1' --out DIR --endpoint https://registry.example:50051 \
             --config 'it'\\''s.toml' --ca 'my pki/ca.pem' --cert op.pem --key op.key \
             --crl crl.pem --server-identity spiffe://dsrelay.dev/registry/controller"
        );
        // Started by its path (not found by name on PATH): the path leads, as one word.
        let by_path = Hint {
            program: shell_word("/opt/dsr tools/dsrctl"),
            ..hint(&["dsrctl", "--endpoint", "https://r:1", "get", "r-1"])
        };
        assert_eq!(
            by_path.command(&["get", "r-1"]),
            "'/opt/dsr tools/dsrctl' get r-1 --endpoint https://r:1"
        );
        assert_eq!(shell_word(""), "''");
        assert_eq!(shell_word("a;b"), "'a;b'");
    }
}
