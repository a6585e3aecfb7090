//! Return-of-data packages (`dsrelay.v1.PackageService`): what a package holds, and
//! downloading it as a stream of [`DownloadEvent`]s.
//!
//! The client checks only the order of the stream (the manifest first, then file chunks);
//! checking every file against the manifest's size and SHA-256 is the receiver's job, since
//! only it sees the bytes as they are written (`dsrctl download` does it).

use dsrelay_proto::v1::package_chunk::Item;
use dsrelay_proto::v1::{
    DownloadPackageRequest, GetPackageRequest, PackageChunk, PackageFileChunk, PackageInfo,
};
use futures::{Stream, StreamExt};
use tonic::Status;

use crate::status::bad_answer;
use crate::RegistryClient;

/// One item of a package download, in the order the registry sends them.
#[derive(Debug, Clone, PartialEq)]
pub enum DownloadEvent {
    /// The first item: the package's manifest (its files in the order they follow, and
    /// `manifest_json` exactly as the package holds it).
    Manifest(PackageInfo),
    /// Then: a chunk of one file, at most 1 MiB, with its offset in the file.
    Chunk(PackageFileChunk),
}

impl RegistryClient {
    /// What a request's package holds so far: its files and the parts still missing.
    ///
    /// NOT_FOUND for another partner's request; FAILED_PRECONDITION for a kind without a
    /// package, or once the package has expired.
    pub async fn get_package(&self, request_id: impl Into<String>) -> Result<PackageInfo, Status> {
        let request = self.request(GetPackageRequest {
            request_id: request_id.into(),
        });
        Ok(self
            .packages
            .clone()
            .get_package(request)
            .await
            .map_err(|status| self.failed(status))?
            .into_inner())
    }

    /// Streams a request's package: [`DownloadEvent::Manifest`] first, then the chunks of
    /// every file in manifest order. The stream ends after the last chunk, or after its
    /// first error (a failure to open it included, as for [`Self::watch`]).
    ///
    /// FAILED_PRECONDITION while parts are missing ([`Self::get_package`] says which). A
    /// stream out of order (a chunk before the manifest, a second manifest) ends with a
    /// status made here ([`crate::is_bad_answer`]). No deadline: a large package takes as long
    /// as it takes.
    ///
    /// A connection lost under the download (the registry killed or shut down, the network
    /// down) ends the stream with UNAVAILABLE, made here, which [`crate::is_connection_error`]
    /// recognises: to follow on, call `download_package` again after a short pause; a
    /// download starts over with the manifest, so what this one received is to be dropped.
    /// A connection the registry closed before it answered is UNAVAILABLE saying what to
    /// check, as for the unary calls (see [`crate::closed_by_peer`]).
    pub fn download_package(
        &self,
        request_id: impl Into<String>,
    ) -> impl Stream<Item = Result<DownloadEvent, Status>> + Send + 'static {
        let mut inner = self.packages.clone();
        let request = DownloadPackageRequest {
            request_id: request_id.into(),
        };
        futures::stream::once(async move { inner.download_package(request).await })
            .map(|opened| match opened {
                Ok(response) => events(response.into_inner()).left_stream(),
                Err(status) => {
                    let status = crate::status::opening_failure(status, "download", FOLLOW_ON);
                    futures::stream::iter([Err(status)]).right_stream()
                }
            })
            .flatten()
    }
}

/// How to follow on after a download's connection was lost.
const FOLLOW_ON: &str = "call download_package again after a short pause: a download \
                         starts over with the manifest, so drop what this one received";

/// Where a download stream stands.
#[derive(Debug, Default)]
struct Order {
    /// The manifest has arrived.
    manifest_seen: bool,
    /// An error was passed on; nothing after it is.
    ended: bool,
}

/// Turns the registry's messages into events, refusing a stream out of order (with a status
/// [`crate::is_bad_answer`] recognises): a receiver that cannot tell which file a chunk
/// belongs to must not write it anywhere.
fn events(
    raw: impl Stream<Item = Result<PackageChunk, Status>> + Send + 'static,
) -> impl Stream<Item = Result<DownloadEvent, Status>> + Send + 'static {
    raw.scan(Order::default(), |order, message| {
        let event = if order.ended {
            None
        } else {
            let event = match message.map(|m| m.item) {
                Err(status) => Err(crate::status::stream_failure(status, "download", FOLLOW_ON)),
                Ok(Some(Item::Info(info))) if !order.manifest_seen => {
                    order.manifest_seen = true;
                    Ok(DownloadEvent::Manifest(info))
                }
                Ok(Some(Item::Info(_))) => Err(bad_answer(
                    "the registry sent a second manifest in one download",
                )),
                Ok(Some(Item::File(chunk))) if order.manifest_seen => {
                    Ok(DownloadEvent::Chunk(chunk))
                }
                Ok(Some(Item::File(chunk))) => Err(bad_answer(format!(
                    "the registry sent a chunk of {:?} before the manifest",
                    chunk.path
                ))),
                Ok(None) => Err(bad_answer(
                    "the registry sent a package message with neither manifest nor chunk",
                )),
            };
            order.ended = event.is_err();
            Some(event)
        };
        futures::future::ready(event)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info() -> PackageChunk {
        PackageChunk {
            item: Some(Item::Info(PackageInfo {
                request_id: "r-1".into(),
                complete: true,
                ..Default::default()
            })),
        }
    }

    fn chunk(path: &str) -> PackageChunk {
        PackageChunk {
            item: Some(Item::File(PackageFileChunk {
                path: path.into(),
                offset: 0,
                data: b"x".to_vec(),
            })),
        }
    }

    async fn collect(
        messages: Vec<Result<PackageChunk, Status>>,
    ) -> Vec<Result<DownloadEvent, Status>> {
        events(futures::stream::iter(messages)).collect().await
    }

    #[tokio::test]
    async fn manifest_then_chunks() {
        let out = collect(vec![Ok(info()), Ok(chunk("a")), Ok(chunk("b"))]).await;
        assert_eq!(out.len(), 3);
        assert!(matches!(out[0], Ok(DownloadEvent::Manifest(_))));
        assert!(matches!(&out[2], Ok(DownloadEvent::Chunk(c)) if c.path == "b"));
    }

    #[tokio::test]
    async fn a_chunk_before_the_manifest_ends_the_stream() {
        let out = collect(vec![Ok(chunk("a")), Ok(info()), Ok(chunk("a"))]).await;
        assert_eq!(out.len(), 1);
        let status = out[0].as_ref().unwrap_err();
        assert!(
            status.message().contains("before the manifest"),
            "{status:?}"
        );
        assert!(crate::is_bad_answer(status), "{status:?}");
    }

    #[tokio::test]
    async fn a_second_manifest_or_an_empty_message_is_refused() {
        let out = collect(vec![Ok(info()), Ok(info()), Ok(chunk("a"))]).await;
        assert_eq!(out.len(), 2);
        assert!(out[1].is_err());
        let out = collect(vec![Ok(info()), Ok(PackageChunk { item: None })]).await;
        assert!(out[1].is_err());
    }

    #[tokio::test]
    async fn nothing_follows_an_error() {
        let out = collect(vec![
            Ok(info()),
            Err(Status::data_loss("disk")),
            Ok(chunk("a")),
        ])
        .await;
        assert_eq!(out.len(), 2);
        assert_eq!(out[1].as_ref().unwrap_err().code(), tonic::Code::DataLoss);
    }
}
