//! Connecting to the registry and calling its partner API.

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
/// for. Streams ([`RegistryClient::watch`], [`RegistryClient::download_package`]) have no deadline:
/// they last as long as the request or the download.
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
    /// TLS files or a malformed endpoint.
    pub fn connect(settings: &ConnectionSettings) -> anyhow::Result<Self> {
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
            .await?
            .into_inner()
            .certificates)
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
        Ok(self.inner.clone().submit(request).await?.into_inner())
    }

    /// Reads one request with its deliveries and tasks.
    pub async fn get(&self, request_id: impl Into<String>) -> Result<Request, Status> {
        let request = self.request(GetRequest {
            request_id: request_id.into(),
        });
        Ok(self.inner.clone().get(request).await?.into_inner())
    }

    /// Reads one page of requests, newest first.
    pub async fn list(&self, request: ListRequestsRequest) -> Result<ListRequestsResponse, Status> {
        let request = self.request(request);
        Ok(self.inner.clone().list(request).await?.into_inner())
    }

    /// Every page of a listing, starting at `request.page_token`, ending after the page
    /// without a `next_page_token` or at the first error.
    pub fn list_pages(
        &self,
        request: ListRequestsRequest,
    ) -> impl Stream<Item = Result<ListRequestsResponse, Status>> + Send + 'static {
        let client = self.clone();
        futures::stream::unfold(Some(request), move |state| {
            let client = client.clone();
            async move {
                let request = state?;
                let token = request.page_token.clone();
                match client.list(request.clone()).await {
                    Err(status) => Some((Err(status), None)),
                    // A server handing back the token it was given would page forever.
                    Ok(page)
                        if !page.next_page_token.is_empty() && page.next_page_token == token =>
                    {
                        Some((
                            Err(Status::internal(format!(
                                "the registry returned page token {token:?} again; stopping"
                            ))),
                            None,
                        ))
                    }
                    Ok(page) => {
                        let next =
                            (!page.next_page_token.is_empty()).then(|| ListRequestsRequest {
                                page_token: page.next_page_token.clone(),
                                ..request
                            });
                        Some((Ok(page), next))
                    }
                }
            }
        })
    }

    /// Streams a request's events after `after_event_id` (0 for all), then live ones, ending
    /// after the event that puts the request in a terminal state.
    ///
    /// A failure to open the stream arrives as its first (and only) item.
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
        futures::stream::once(async move { inner.watch(request).await })
            .map(|opened| match opened {
                Ok(response) => response.into_inner().left_stream(),
                Err(status) => futures::stream::iter([Err(status)]).right_stream(),
            })
            .flatten()
    }

    /// Cancels a request that has not finished; returns it as it is afterwards.
    pub async fn cancel(
        &self,
        request_id: impl Into<String>,
        reason: impl Into<String>,
    ) -> Result<Request, Status> {
        let request = self.request(CancelRequest {
            request_id: request_id.into(),
            reason: reason.into(),
        });
        Ok(self.inner.clone().cancel(request).await?.into_inner())
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
            .await?
            .into_inner())
    }
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
