//! The event stream behind Watch: a request's events as they are recorded, until the request
//! is finished (or for as long as the caller listens, if it asks to follow on).

use std::collections::BTreeSet;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use dsrelay_proto::v1::{RequestEvent, RequestState, WatchRequest};
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;

use crate::app::Shared;
use crate::error::ApiError;
use crate::fold::request_is_terminal;

use super::views;

/// What Watch answers with.
pub(crate) type EventStream =
    Pin<Box<dyn tokio_stream::Stream<Item = Result<RequestEvent, Status>> + Send>>;

/// Streams the events of request `id` (already checked to be visible to the caller) after
/// `watch.after_event_id`.
pub(crate) fn events(shared: Arc<Shared>, id: String, watch: WatchRequest) -> EventStream {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let mut wake = shared.events.subscribe();
    tokio::spawn(async move {
        // Ids are not assumed to commit in order (PostgreSQL sequences don't), so every
        // poll reads the request's events and sends the ones not yet sent.
        let mut sent = BTreeSet::new();
        loop {
            let events = match shared.store.events(&id).await {
                Ok(e) => e,
                Err(e) => {
                    let _ = tx.send(Err(ApiError::from(e).into())).await;
                    return;
                }
            };
            for e in events.iter().filter(|e| e.id as u64 > watch.after_event_id) {
                if !sent.insert(e.id) {
                    continue;
                }
                if tx.send(Ok(views::event(&id, e))).await.is_err() {
                    return;
                }
            }
            let terminal = events.last().is_some_and(|last| {
                request_is_terminal(
                    RequestState::try_from(last.request_state).unwrap_or(RequestState::Unspecified),
                )
            });
            if terminal && !watch.follow_after_terminal {
                return;
            }
            tokio::select! {
                _ = tx.closed() => return,
                _ = wake.recv() => {}
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
    });
    Box::pin(ReceiverStream::new(rx))
}
