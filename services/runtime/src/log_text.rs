//! Text from outside a service in its log lines. Another party's words (a processor's, a
//! registry's or a recipient's status message, a holder's error, a reason or a note) may name
//! the data subject, and a log line is never forgotten with its request, so log lines never
//! show them: [`Withheld`] stands for such a text with its length and a keyed hash, and
//! [`Said`] keeps a failure's own words apart from the words it quotes, so that the record an
//! operator reads (a delivery's or a task's last error, the request's events; all removed
//! when the request is forgotten) holds both and a log line only the service's own.

use std::fmt;

use crate::identity::keyed_digest;

/// The context of the keyed hashes in log lines: none equals a hash made for another purpose
/// (an audit entry's of the same text, say), so a log line links to no other record.
const LOG_TEXT_DOMAIN: &[u8] = b"dsrelay.log-text.v1";

/// Hex digits of the keyed hash a log line shows: 64 bits tell texts apart, and the whole
/// hash would only make every such line longer.
const SHOWN_DIGITS: usize = 16;

/// A text from outside the service as a log line shows it (`57 bytes withheld, keyed hash
/// 3f2a9c0e1b7d4a55`; `none` for an empty one): lines about the same text can be told from
/// lines about another, and, the hash being keyed with the service's `identity_hash_key`,
/// nobody without the key can test it against a guessed address.
#[derive(Clone, Copy)]
pub struct Withheld<'a> {
    key: &'a [u8],
    text: &'a str,
}

/// `text` as a log line may show it, hashed under `key`.
pub fn withheld<'a>(key: &'a [u8], text: &'a str) -> Withheld<'a> {
    Withheld { key, text }
}

impl fmt::Display for Withheld<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.text.is_empty() {
            return f.write_str("none");
        }
        let hash = keyed_digest(self.key, LOG_TEXT_DOMAIN, self.text.as_bytes());
        write!(
            f,
            "{} bytes withheld, keyed hash {}",
            self.text.len(),
            &hash[..SHOWN_DIGITS]
        )
    }
}

// A log call's `?field` formats with Debug, which must withhold as much as Display.
impl fmt::Debug for Withheld<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// A failure in words: the service's own (what it was doing, the gRPC code) and, kept apart,
/// what another party said (a status's message). It has no `Display`, so that it cannot be
/// logged whole by mistake: [`Said::full`] is for records, [`Said::logged`] for log lines.
#[derive(Clone, PartialEq, Eq)]
pub struct Said {
    ours: String,
    theirs: Option<String>,
}

impl Said {
    /// Only the service's own words.
    pub fn ours(words: impl Into<String>) -> Self {
        Self {
            ours: words.into(),
            theirs: None,
        }
    }

    /// `ours`, quoting `theirs`: recorded as `<ours>: <theirs>`.
    pub fn quoting(ours: impl Into<String>, theirs: impl Into<String>) -> Self {
        Self {
            ours: ours.into(),
            theirs: Some(theirs.into()),
        }
    }

    /// Another service's answer: its code, quoting its message (`Unavailable: <message>`);
    /// or, for this service's own client failing, its code and why (see
    /// [`Said::about_status`]).
    pub fn status(status: &tonic::Status) -> Self {
        Self::about_status(format!("{:?}", status.code()), status)
    }

    /// `ours` (which names what failed and the code), quoting `status`'s message, unless
    /// the status is this service's own client failing to get an answer (no connection, a
    /// TLS handshake refused, a broken stream): tonic makes such a status out of a local
    /// error, which it keeps as the status's source, and words it from that error alone, so
    /// the message and the errors beneath it are this service's own words, which a log line
    /// may show. A status that came from the other party has no source; nor do its words
    /// reach one, but for an HTTP/2 error the peer sent (a GOAWAY's debug data is the peer's
    /// text), which is quoted with the rest.
    pub fn about_status(ours: impl Into<String>, status: &tonic::Status) -> Self {
        let ours = ours.into();
        // tonic words this service's own deadline "Timeout expired: transport error", which
        // reads as a network fault; the likely cause is the other side waiting on its own
        // database, whose log then says so.
        if crate::grpc::timed_out(status) {
            return Self::ours(format!(
                "{ours}: no answer within the call's deadline (call_timeout_ms); the other \
                 service may be busy or waiting on its database, which its log says"
            ));
        }
        let first = std::error::Error::source(status);
        let from_peer = std::iter::successors(first, |e| e.source()).any(|e| {
            e.downcast_ref::<h2::Error>()
                .is_some_and(h2::Error::is_remote)
        });
        match first {
            Some(_) if !from_peer => Self::ours(format!("{ours}: {}", status_text(status))),
            Some(_) => Self::quoting(ours, status_text(status)),
            None => Self::quoting(ours, status.message()),
        }
    }

    /// The whole text, for a record an operator reads and forgetting removes (never a log).
    pub fn full(&self) -> String {
        match &self.theirs {
            Some(theirs) => format!("{}: {theirs}", self.ours),
            None => self.ours.clone(),
        }
    }

    /// What a log line shows: the service's own words, and what they quote [`Withheld`]
    /// under `key`.
    pub fn logged<'a>(&'a self, key: &'a [u8]) -> Logged<'a> {
        Logged { said: self, key }
    }
}

// Derived, it would print what another party said wherever a containing type is logged with
// `?`; the length tells a reader enough.
impl fmt::Debug for Said {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Said")
            .field("ours", &self.ours)
            .field("theirs_bytes", &self.theirs.as_ref().map(String::len))
            .finish()
    }
}

/// A status's message with the errors beneath it: a status made on our side says only
/// "transport error" or "tcp connect error", and the cause is in its sources.
fn status_text(s: &tonic::Status) -> String {
    let mut text = s.message().to_string();
    for err in std::iter::successors(std::error::Error::source(s), |e| e.source()) {
        let part = err.to_string();
        if !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
    }
    text
}

/// A [`Said`] as a log line shows it ([`Said::logged`]).
#[derive(Clone, Copy)]
pub struct Logged<'a> {
    said: &'a Said,
    key: &'a [u8],
}

impl fmt::Display for Logged<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.said.theirs {
            Some(theirs) => write!(f, "{}: {}", self.said.ours, withheld(self.key, theirs)),
            None => f.write_str(&self.said.ours),
        }
    }
}

impl fmt::Debug for Logged<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ADDRESS: &str = "maija.meikalainen@example.fi";

    #[test]
    fn a_withheld_text_shows_its_length_and_a_keyed_hash_only() {
        let text = format!("no employee {ADDRESS}");
        let shown = withheld(b"k", &text).to_string();
        assert!(!shown.contains("maija"), "{shown}");
        assert!(
            shown.starts_with("40 bytes withheld, keyed hash "),
            "{shown}"
        );
        assert_eq!(format!("{:?}", withheld(b"k", &text)), shown);
        // The same text under the same key reads the same; another key or text does not.
        assert_eq!(withheld(b"k", &text).to_string(), shown);
        assert_ne!(withheld(b"other", &text).to_string(), shown);
        assert_ne!(withheld(b"k", ADDRESS).to_string(), shown);
        assert_eq!(withheld(b"k", "").to_string(), "none");
    }

    #[test]
    fn a_log_line_hash_is_not_an_audit_hash() {
        let audit = keyed_digest(b"k", b"dsrelay.audit-text.v1", ADDRESS.as_bytes());
        let shown = withheld(b"k", ADDRESS).to_string();
        assert!(!shown.contains(&audit[..SHOWN_DIGITS]), "{shown}");
    }

    #[test]
    fn a_record_holds_everything_said_and_a_log_line_only_our_words() {
        let status = tonic::Status::failed_precondition(format!("no employee {ADDRESS}"));
        let said = Said::status(&status);
        assert_eq!(
            said.full(),
            format!("FailedPrecondition: no employee {ADDRESS}")
        );
        let logged = said.logged(b"k").to_string();
        assert!(
            logged.starts_with("FailedPrecondition: 40 bytes withheld"),
            "{logged}"
        );
        assert!(!logged.contains("maija"), "{logged}");
        assert!(!format!("{said:?}").contains("maija"));
        // This service's own deadline: said as such, not as tonic's "transport error".
        let expired = tonic::Status::from_error(Box::new(tonic::TimeoutExpired(())));
        let said = Said::status(&expired);
        assert_eq!(
            said.full(),
            "Cancelled: no answer within the call's deadline (call_timeout_ms); the other \
             service may be busy or waiting on its database, which its log says"
        );
        assert_eq!(said.logged(b"k").to_string(), said.full());
        // An empty message is still quoted in the record, as statuses always were.
        let empty = Said::status(&tonic::Status::unavailable(""));
        assert_eq!(empty.full(), "Unavailable: ");
        assert_eq!(empty.logged(b"k").to_string(), "Unavailable: none");
        // A status the caller made for the answer never came, its source beneath it.
        let mut local = tonic::Status::unavailable("tcp connect error");
        local.set_source(std::sync::Arc::new(std::io::Error::from(
            std::io::ErrorKind::ConnectionRefused,
        )));
        let said = Said::about_status("Deliver to payroll-bureau: Unavailable", &local);
        assert_eq!(
            said.logged(b"k").to_string(),
            "Deliver to payroll-bureau: Unavailable: tcp connect error: connection refused"
        );
        assert_eq!(said.full(), said.logged(b"k").to_string());
        let ours = Said::ours("processor is no longer configured");
        assert_eq!(ours.full(), "processor is no longer configured");
        assert_eq!(
            ours.logged(b"k").to_string(),
            "processor is no longer configured"
        );
    }

    /// An HTTP/2 error the peer sent is the peer's: its debug data may be any text, so a log
    /// line withholds it like the peer's answer.
    #[tokio::test]
    async fn an_http2_error_the_peer_sent_is_withheld() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let peer = tokio::spawn(async move {
            let (socket, _) = listener.accept().await.unwrap();
            let mut connection = h2::server::handshake(socket).await.unwrap();
            // The request arrives; the peer resets its stream with an error.
            let (_request, mut respond) = connection.accept().await.unwrap().unwrap();
            respond.send_reset(h2::Reason::ENHANCE_YOUR_CALM);
            while connection.accept().await.is_some() {}
        });
        let channel = tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{port}"))
            .unwrap()
            .connect_lazy();
        let status = tonic_health::pb::health_client::HealthClient::new(channel)
            .check(tonic_health::pb::HealthCheckRequest::default())
            .await
            .unwrap_err();
        let said = Said::status(&status);
        let logged = said.logged(b"k").to_string();
        assert!(
            logged.contains(" bytes withheld, keyed hash "),
            "{logged} ({status:?})"
        );
        // The record keeps it whole.
        assert!(
            said.full()
                .contains("stream error received: detected excessive load"),
            "{}",
            said.full()
        );
        peer.abort();
    }

    /// A real client's failure to connect is this service's own: a log line shows why.
    #[tokio::test]
    async fn a_client_that_cannot_connect_logs_why() {
        let port = {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            listener.local_addr().unwrap().port()
        };
        let channel = tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{port}"))
            .unwrap()
            .connect_lazy();
        let status = tonic_health::pb::health_client::HealthClient::new(channel)
            .check(tonic_health::pb::HealthCheckRequest::default())
            .await
            .unwrap_err();
        let logged = Said::status(&status).logged(b"k").to_string();
        assert!(logged.starts_with("Unavailable: "), "{logged}");
        assert!(logged.to_lowercase().contains("refused"), "{logged}");
        assert!(!logged.contains("withheld"), "{logged}");
    }
}
