//! Connecting to the registry and calling its partner API.

use std::collections::HashSet;
use std::time::Duration;

use anyhow::Context;
use dsrelay_proto::v1::certificate_service_client::CertificateServiceClient;
use dsrelay_proto::v1::contract_service_client::ContractServiceClient;
use dsrelay_proto::v1::package_service_client::PackageServiceClient;
use dsrelay_proto::v1::request_service_client::RequestServiceClient;
use dsrelay_proto::v1::{
    CancelRequest, ExtendDeadlineRequest, GetRequest, ListRequestsRequest, ListRequestsResponse,
    Request, RequestEvent, SubmitRequest, SubmitResponse, WatchRequest,
};
use dsrelay_proto::v1::{ListCertificatesRequest, StoredCertificate};
use dsrelay_runtime::tls::{self, TlsFiles};
use futures::{Stream, StreamExt};
use serde::{Deserialize, Serialize};
use tonic::transport::Channel;
use tonic::Status;

/// How long a unary call may take unless [`RegistryClient::with_timeout`] says otherwise.
///
/// Sent to the server as `grpc-timeout` too, so it stops working on an answer nobody waits
/// for. A call that gets no answer in time fails with DEADLINE_EXCEEDED, which
/// [`crate::timed_out`] recognises and [`crate::is_connection_error`] does not: the call may
/// have been done all the same, so repeat it (a Submit with the same idempotency key) rather
/// than assume it was not. Streams ([`RegistryClient::watch`], [`RegistryClient::download_package`]) have no deadline
/// of ours: a download lasts as long as it takes, a watch until the request ends or the
/// registry ends the stream (see [`RegistryClient::watch`]).
pub const DEFAULT_CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// Where the registry is and how to prove who we are to it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ConnectionSettings {
    /// The registry's address, `https://host:port`.
    pub endpoint: String,
    /// Our CA bundle, certificate and key for mutual TLS, and the revocation lists
    /// (`tls.crls`) the registry's certificate is checked against. Read once, in
    /// [`RegistryClient::connect`].
    pub tls: TlsFiles,
    /// The certificate identity the registry must present (e.g.
    /// `spiffe://dsrelay.dev/registry/controller`). Required: any party the CA certified (a
    /// processor, another partner) could otherwise pose as the registry and read what is
    /// submitted.
    pub server_identity: String,
}

/// A client of the registry's partner API: `RequestService`, and `PackageService` for
/// return-of-data packages (in [`crate::package`]).
///
/// Cheap to clone; clones share one HTTP/2 connection. Methods take `&self` so one client can
/// serve concurrent calls.
#[derive(Debug, Clone)]
pub struct RegistryClient {
    inner: RequestServiceClient<Channel>,
    /// The same channel, for downloading packages.
    pub(crate) packages: PackageServiceClient<Channel>,
    /// The same channel, for deletion certificates.
    certificates: CertificateServiceClient<Channel>,
    /// The same channel, for contract ends (in [`crate::contracts`]).
    pub(crate) contracts: ContractServiceClient<Channel>,
    timeout: Option<Duration>,
}

impl RegistryClient {
    /// Reads the TLS files and prepares a channel to the registry.
    ///
    /// The connection itself is made on the first call (and re-made after it drops), so an
    /// unreachable registry shows up as an `UNAVAILABLE` status of that call, which
    /// [`crate::is_connection_error`] recognises. Fails here only on unreadable or invalid
    /// TLS files, a malformed endpoint or an empty `server_identity`.
    pub fn connect(settings: &ConnectionSettings) -> anyhow::Result<Self> {
        if settings.server_identity.trim().is_empty() {
            anyhow::bail!(
                "server_identity is empty: set it to the certificate identity the registry \
                 presents (e.g. spiffe://dsrelay.dev/registry/controller), or any party the \
                 CA certified could pose as the registry"
            );
        }
        let config = settings
            .tls
            .client_config()
            .context("loading the TLS files")?;
        let channel = tls::channel(
            &settings.endpoint,
            Some(settings.server_identity.clone()),
            &config,
        )?;
        Ok(Self::from_channel(channel))
    }

    /// Wraps an existing channel, e.g. one to an in-process server in tests.
    pub fn from_channel(channel: Channel) -> Self {
        Self {
            inner: RequestServiceClient::new(channel.clone()),
            packages: PackageServiceClient::new(channel.clone()),
            certificates: CertificateServiceClient::new(channel.clone()),
            contracts: ContractServiceClient::new(channel),
            timeout: Some(DEFAULT_CALL_TIMEOUT),
        }
    }

    /// Sets the deadline of unary calls; `None` waits indefinitely.
    pub fn with_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.timeout = timeout;
        self
    }

    /// The generated client, for calls this wrapper does not cover.
    pub fn raw(&self) -> RequestServiceClient<Channel> {
        self.inner.clone()
    }

    /// The generated `PackageService` client, for calls this wrapper does not cover.
    pub fn raw_packages(&self) -> PackageServiceClient<Channel> {
        self.packages.clone()
    }

    /// The deletion certificates of a request, oldest first, each with the registry's
    /// verdict; `processor` and `subprocessor` narrow them when not empty. NOT_FOUND when
    /// none matches or the request is not the caller's.
    pub async fn list_certificates(
        &self,
        request_id: impl Into<String>,
        processor: impl Into<String>,
        subprocessor: impl Into<String>,
    ) -> Result<Vec<StoredCertificate>, Status> {
        let request = self.request(ListCertificatesRequest {
            request_id: request_id.into(),
            processor: processor.into(),
            subprocessor: subprocessor.into(),
        });
        Ok(self
            .certificates
            .clone()
            .list_certificates(request)
            .await
            .map_err(|status| self.failed(status))?
            .into_inner()
            .certificates)
    }

    /// The status a unary call fails with, given tonic's ([`crate::status`] says which
    /// failures it explains).
    pub(crate) fn failed(&self, status: Status) -> Status {
        crate::status::unary_failure(status, self.timeout)
    }

    pub(crate) fn request<T>(&self, body: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(body);
        if let Some(timeout) = self.timeout {
            request.set_timeout(timeout);
        }
        request
    }

    /// Submits a data-subject request. Resubmitting the same body with the same idempotency
    /// key returns the first request with `deduplicated = true`, so retrying is safe.
    pub async fn submit(&self, request: SubmitRequest) -> Result<SubmitResponse, Status> {
        let request = self.request(request);
        Ok(self
            .inner
            .clone()
            .submit(request)
            .await
            .map_err(|status| self.failed(status))?
            .into_inner())
    }

    /// Reads one request with its deliveries and tasks.
    pub async fn get(&self, request_id: impl Into<String>) -> Result<Request, Status> {
        let request = self.request(GetRequest {
            request_id: request_id.into(),
        });
        Ok(self
            .inner
            .clone()
            .get(request)
            .await
            .map_err(|status| self.failed(status))?
            .into_inner())
    }

    /// Reads one page of requests, newest first.
    pub async fn list(&self, request: ListRequestsRequest) -> Result<ListRequestsResponse, Status> {
        let request = self.request(request);
        Ok(self
            .inner
            .clone()
            .list(request)
            .await
            .map_err(|status| self.failed(status))?
            .into_inner())
    }

    /// Every page of a listing, starting at `request.page_token`, ending after the page
    /// without a `next_page_token` or at the first error. A `next_page_token` already seen
    /// in this listing ends it, since following it would page forever, with an error made
    /// here, not by the registry: INTERNAL, which [`crate::is_bad_answer`] recognises.
    pub fn list_pages(
        &self,
        request: ListRequestsRequest,
    ) -> impl Stream<Item = Result<ListRequestsResponse, Status>> + Send + 'static {
        let client = self.clone();
        pages(request, move |request| {
            let client = client.clone();
            async move { client.list(request).await }
        })
    }

    /// Streams a request's events after `after_event_id` (0 for all), then live ones, ending
    /// after the event that puts the request in a terminal state (COMPLETED, FAILED or
    /// CANCELLED; a PARTIALLY_COMPLETED request goes on until its retained tasks complete).
    /// A CANCELLED request's stream goes on until nothing can change its state any more
    /// (its tasks settled, no delivery the cancellation withdrew in flight): a cancellation
    /// that turns out to have stopped nothing gives way to the state the holders' reports
    /// give, and the stream shows it.
    ///
    /// The registry also ends every stream after its `watch.max_stream_ms` (default one
    /// hour), and when it shuts down, with an UNAVAILABLE error item. A connection lost
    /// under the stream (the registry killed, the network down) ends it with an UNAVAILABLE
    /// item too, made here, which [`crate::is_connection_error`] recognises. To follow on,
    /// call `watch` again with `after_event_id` the largest `event_id` received (the error's
    /// message names it too), after a short pause; events are not repeated.
    ///
    /// A failure to open the stream arrives as its first (and only) item; a connection the
    /// registry closed before it answered is UNAVAILABLE saying what to check, as for the
    /// unary calls (see [`crate::closed_by_peer`]).
    pub fn watch(
        &self,
        request_id: impl Into<String>,
        after_event_id: u64,
    ) -> impl Stream<Item = Result<RequestEvent, Status>> + Send + 'static {
        self.watch_with(WatchRequest {
            request_id: request_id.into(),
            after_event_id,
            follow_after_terminal: false,
        })
    }

    /// [`Self::watch`] with every option of the RPC, e.g. `follow_after_terminal`.
    pub fn watch_with(
        &self,
        request: WatchRequest,
    ) -> impl Stream<Item = Result<RequestEvent, Status>> + Send + 'static {
        let mut inner = self.inner.clone();
        let after = request.after_event_id;
        futures::stream::once(async move { inner.watch(request).await })
            .map(move |opened| match opened {
                Ok(response) => follow_events(response.into_inner(), after).left_stream(),
                Err(status) => {
                    let status = crate::status::opening_failure(
                        status,
                        "watch",
                        &format!(
                            "call watch again with after_event_id {after}, after a short pause"
                        ),
                    );
                    futures::stream::iter([Err(status)]).right_stream()
                }
            })
            .flatten()
    }

    /// Cancels a request that is still open (RECEIVED, DISPATCHED or IN_PROGRESS) while a
    /// cancellation can stop something (a delivery or a task not yet ended; else
    /// FAILED_PRECONDITION); returns it as it is afterwards.
    pub async fn cancel(
        &self,
        request_id: impl Into<String>,
        reason: impl Into<String>,
    ) -> Result<Request, Status> {
        let request = self.request(CancelRequest {
            request_id: request_id.into(),
            reason: reason.into(),
        });
        Ok(self
            .inner
            .clone()
            .cancel(request)
            .await
            .map_err(|status| self.failed(status))?
            .into_inner())
    }

    /// Extends a request's due date by `months` (operators only; two months in all at most).
    pub async fn extend_deadline(
        &self,
        request_id: impl Into<String>,
        months: u32,
        reason: impl Into<String>,
    ) -> Result<Request, Status> {
        let request = self.request(ExtendDeadlineRequest {
            request_id: request_id.into(),
            months,
            reason: reason.into(),
        });
        Ok(self
            .inner
            .clone()
            .extend_deadline(request)
            .await
            .map_err(|status| self.failed(status))?
            .into_inner())
    }
}

/// The events of an opened watch, whose `after_event_id` was `after`, with a lost connection
/// told as [`RegistryClient::watch`] says, naming the largest `event_id` received. Nothing
/// follows an error: tonic's stream may go on yielding the broken connection's errors.
fn follow_events(
    events: impl Stream<Item = Result<RequestEvent, Status>> + Send + 'static,
    after: u64,
) -> impl Stream<Item = Result<RequestEvent, Status>> + Send + 'static {
    events.scan(Some(after), |last, item| {
        let item = match (*last, item) {
            (None, _) => None,
            (Some(previous), Ok(event)) => {
                *last = Some(previous.max(event.event_id));
                Some(Ok(event))
            }
            (Some(previous), Err(status)) => {
                *last = None;
                Some(Err(crate::status::stream_failure(
                    status,
                    "watch",
                    &format!(
                        "call watch again with after_event_id {previous} (the largest \
                         event_id received), after a short pause; events are not repeated"
                    ),
                )))
            }
        };
        futures::future::ready(item)
    })
}

/// The pages [`RegistryClient::list_pages`] yields, each asked for with `list`.
fn pages<F, Fut>(
    request: ListRequestsRequest,
    list: F,
) -> impl Stream<Item = Result<ListRequestsResponse, Status>> + Send + 'static
where
    F: Fn(ListRequestsRequest) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<ListRequestsResponse, Status>> + Send + 'static,
{
    // Every token given so far: a server handing back any of them (not only the last, as in
    // A, B, A) would page forever.
    let mut seen = HashSet::new();
    if !request.page_token.is_empty() {
        seen.insert(request.page_token.clone());
    }
    futures::stream::unfold(Some((request, seen)), move |state| {
        let call = state.map(|(request, seen)| (list(request.clone()), request, seen));
        async move {
            let (page, request, mut seen) = call?;
            match page.await {
                Err(status) => Some((Err(status), None)),
                Ok(page) if page.next_page_token.is_empty() => Some((Ok(page), None)),
                Ok(page) if !seen.insert(page.next_page_token.clone()) => Some((
                    Err(crate::status::bad_answer(format!(
                        "the registry returned page token {:?}, which this listing had \
                         already followed; stopping, as following it again would page forever",
                        page.next_page_token
                    ))),
                    None,
                )),
                Ok(page) => {
                    let next = ListRequestsRequest {
                        page_token: page.next_page_token.clone(),
                        ..request
                    };
                    Some((Ok(page), Some((next, seen))))
                }
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unreachable_client() -> RegistryClient {
        // Port 1 on localhost: nothing listens there, so the connection is refused at once.
        let channel = Channel::from_static("http://127.0.0.1:1").connect_lazy();
        RegistryClient::from_channel(channel).with_timeout(Some(Duration::from_secs(5)))
    }

    #[tokio::test]
    async fn unreachable_server_is_a_connection_error() {
        let status = unreachable_client().get("r-1").await.unwrap_err();
        assert!(crate::is_connection_error(&status), "{status:?}");
    }

    #[tokio::test]
    async fn watch_reports_an_open_failure_as_its_only_item() {
        let items: Vec<_> = unreachable_client().watch("r-1", 0).collect().await;
        assert_eq!(items.len(), 1);
        let status = items.into_iter().next().unwrap().unwrap_err();
        assert!(crate::is_connection_error(&status), "{status:?}");
    }

    #[tokio::test]
    async fn list_pages_stops_at_the_first_error() {
        let pages: Vec<_> = unreachable_client()
            .list_pages(ListRequestsRequest::default())
            .collect()
            .await;
        assert_eq!(pages.len(), 1);
        assert!(pages[0].is_err());
    }

    /// The pages a server yields that answers token `t` with `next(t)` as the next token;
    /// at most 6, so a listing that would not end does not hang the test.
    async fn pages_from(
        start: &str,
        next: fn(&str) -> &'static str,
    ) -> Vec<Result<ListRequestsResponse, Status>> {
        let request = ListRequestsRequest {
            page_token: start.into(),
            ..Default::default()
        };
        pages(request, move |r| {
            std::future::ready(Ok(ListRequestsResponse {
                next_page_token: next(&r.page_token).into(),
                ..Default::default()
            }))
        })
        .take(6)
        .collect()
        .await
    }

    fn tokens(pages: &[Result<ListRequestsResponse, Status>]) -> Vec<Result<&str, String>> {
        pages
            .iter()
            .map(|p| match p {
                Ok(page) => Ok(page.next_page_token.as_str()),
                Err(s) => Err(format!("{:?}: {}", s.code(), s.message())),
            })
            .collect()
    }

    #[tokio::test]
    async fn list_pages_follows_tokens_to_the_end() {
        let pages = pages_from("", |t| match t {
            "" => "A",
            "A" => "B",
            _ => "",
        })
        .await;
        assert_eq!(tokens(&pages), [Ok("A"), Ok("B"), Ok("")]);
    }

    #[tokio::test]
    async fn list_pages_refuses_any_token_seen_before() {
        // A cycle A, B, A.
        let pages = pages_from("", |t| match t {
            "" | "B" => "A",
            _ => "B",
        })
        .await;
        let tokens = tokens(&pages);
        assert_eq!(tokens.len(), 3, "{tokens:?}");
        assert_eq!(tokens[..2], [Ok("A"), Ok("B")]);
        let err = tokens[2].as_ref().unwrap_err();
        assert!(
            err.starts_with("Internal: ") && err.contains("\"A\"") && err.contains("already"),
            "{err}"
        );
        let made_here = pages[2].as_ref().unwrap_err();
        assert!(crate::is_bad_answer(made_here), "{made_here:?}");
        // The same token again, and a return to the token the listing started at.
        let again = pages_from("", |_| "A").await;
        assert_eq!(again.len(), 2);
        assert!(again[1].is_err());
        let back = pages_from("S", |t| if t == "S" { "A" } else { "S" }).await;
        assert_eq!(back.len(), 2);
        assert!(back[1].is_err());
    }

    #[tokio::test]
    async fn connect_refuses_an_empty_server_identity() {
        let dir = tempfile::tempdir().unwrap();
        let pki = dsrelay_runtime::pki::DevPki::ensure(dir.path()).unwrap();
        let settings = |server_identity: &str| ConnectionSettings {
            endpoint: "https://127.0.0.1:50051".into(),
            tls: pki.files("partner-crm"),
            server_identity: server_identity.into(),
        };
        for empty in ["", " \t"] {
            let err = RegistryClient::connect(&settings(empty)).unwrap_err();
            assert!(format!("{err:#}").contains("server_identity"), "{err:#}");
        }
        RegistryClient::connect(&settings("spiffe://dsrelay.dev/registry/controller"))
            .expect("a server identity is all that was missing");
    }

    #[test]
    fn connect_reports_missing_tls_files() {
        let settings = ConnectionSettings {
            endpoint: "https://127.0.0.1:50051".into(),
            tls: TlsFiles::new(
                "/nonexistent/ca.pem",
                "/nonexistent/c.pem",
                "/nonexistent/c.key",
            ),
            server_identity: "spiffe://dsrelay.dev/registry/controller".into(),
        };
        let err = RegistryClient::connect(&settings).unwrap_err();
        assert!(
            format!("{err:#}").contains("/nonexistent/ca.pem"),
            "{err:#}"
        );
    }
}
