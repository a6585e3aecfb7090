//! The event stream behind Watch: a request's events as they are recorded, until the request
//! is finished (or for as long as the caller listens, if it asks to follow on). A cancelled
//! request is finished once its tasks are settled and no Deliver it withdrew is in flight:
//! until then what its processors report may still show the cancellation stopped nothing.
//!
//! Each open stream holds a task and reads the store whenever its request changes in this
//! process, and at least every `watch.poll_interval_ms`: a change written through another
//! replica sharing the database (an acknowledgement the processor sent there, a Cancel a
//! partner made there) wakes nobody here, so the interval bounds how late its watchers hear
//! of it. One caller may hold at most `watch.streams_per_caller` streams ([`Slots`]), each
//! for at most `watch.max_stream_ms`: then the task ends, even while waiting for a caller
//! that does not read, and the stream ends, after the events already queued, with
//! UNAVAILABLE naming the `after_event_id` to watch again from.

use std::collections::BTreeSet;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use dsrelay_proto::v1::{RequestEvent, RequestState, WatchRequest};
use dsrelay_runtime::identity::FieldViolation;
use dsrelay_runtime::slots::{KeyedSlot, KeyedSlots};
use futures::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;

use crate::app::Shared;
use crate::error::ApiError;
use crate::fold::request_is_terminal;

use super::views;

/// What Watch answers with.
pub(crate) type EventStream =
    Pin<Box<dyn tokio_stream::Stream<Item = Result<RequestEvent, Status>> + Send>>;

/// How many streams of one kind (Watch, DownloadPackage) each caller holds open.
#[derive(Debug, Default)]
pub(crate) struct Slots(KeyedSlots);

/// One open stream of one caller; dropping it frees the slot.
pub(crate) type Slot = KeyedSlot;

impl Slots {
    /// Takes a slot for `caller`, or RESOURCE_EXHAUSTED when it holds `limit` of them:
    /// `rpc` names the streams and `setting` the key that sets the limit.
    pub(crate) fn take(
        &self,
        caller: &str,
        limit: u32,
        rpc: &str,
        setting: &str,
    ) -> Result<Slot, ApiError> {
        self.0.take(caller, limit).map_err(|open| {
            ApiError::resource_exhausted(format!(
                "{caller} already has {open} {rpc} streams open, the most the registry allows \
                 one caller ({setting} = {limit}); let one end before opening another"
            ))
        })
    }
}

/// `watch.after_event_id` as an event id, or INVALID_ARGUMENT: ids are stored as i64, so a
/// larger one names no event, and cast to i64 it would be negative (in the filter, and in the
/// `after_event_id` the stream's last message tells the caller to watch again from).
fn after_event_id(watch: &WatchRequest) -> Result<i64, ApiError> {
    i64::try_from(watch.after_event_id).map_err(|_| {
        ApiError::invalid([FieldViolation::new(
            "after_event_id",
            format!("must be at most {} (an event id)", i64::MAX),
        )])
    })
}

/// Streams the events of request `id` (already checked to be visible to `caller`) after
/// `watch.after_event_id`; INVALID_ARGUMENT when that is no event id, RESOURCE_EXHAUSTED when
/// `caller` holds as many streams as it may.
pub(crate) fn events(
    shared: Arc<Shared>,
    caller: &crate::auth::Caller,
    id: String,
    watch: WatchRequest,
) -> Result<EventStream, ApiError> {
    let after = after_event_id(&watch)?;
    let slot = shared.watchers.take(
        &caller.name,
        shared.config.watch.streams_per_caller,
        "Watch",
        "watch.streams_per_caller",
    )?;
    let reader = views::Reader::of(caller);
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    // How the stream ends when the task ends it: queued after the events, whatever their
    // number, so it is never lost to a full channel.
    let (end_tx, end_rx) = tokio::sync::oneshot::channel::<Status>();
    let max_stream_ms = shared.config.watch.max_stream_ms;
    let end_of_life = tokio::time::Instant::now() + Duration::from_millis(max_stream_ms);
    let over = move |last: i64| {
        Status::unavailable(format!(
            "this watch stream reached its maximum lifetime (watch.max_stream_ms = \
             {max_stream_ms}); watch again with after_event_id {last} to continue where this \
             stream ended"
        ))
    };
    let mut wake = shared.events.subscribe();
    let mut stopping = shared.stopping.subscribe();
    let poll = Duration::from_millis(shared.config.watch.poll_interval_ms);
    tokio::spawn(async move {
        let _slot = slot;
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
            for e in events.iter().filter(|e| e.id > after) {
                if !sent.insert(e.id) {
                    continue;
                }
                match tokio::time::timeout_at(
                    end_of_life,
                    tx.send(Ok(views::event_for(reader, &id, e))),
                )
                .await
                {
                    Ok(Ok(())) => {}
                    Ok(Err(_)) => return,
                    Err(_) => {
                        // The caller stopped reading: this event is not queued.
                        sent.remove(&e.id);
                        let last = sent.last().copied().unwrap_or(after);
                        let _ = end_tx.send(over(last));
                        return;
                    }
                }
            }
            let last_state = events.last().map(|last| {
                RequestState::try_from(last.request_state).unwrap_or(RequestState::Unspecified)
            });
            if !watch.follow_after_terminal && last_state.is_some_and(request_is_terminal) {
                // A cancelled request may still give way to what its tasks report: the
                // stream ends once nothing can change it any more.
                let settled = if last_state == Some(RequestState::Cancelled) {
                    match shared.store.cancellation_settled(&id).await {
                        Ok(settled) => settled,
                        Err(e) => {
                            let _ = tx.send(Err(ApiError::from(e).into())).await;
                            return;
                        }
                    }
                } else {
                    true
                };
                if settled {
                    return;
                }
            }
            let own_change = crate::app::changed(&mut wake, &id);
            tokio::select! {
                _ = tx.closed() => return,
                _ = stopping.changed() => {
                    let last = sent.last().copied().unwrap_or(after);
                    let _ = tx
                        .send(Err(Status::unavailable(format!(
                            "the registry is shutting down; watch again with after_event_id \
                             {last} to continue where this stream ended"
                        ))))
                        .await;
                    return;
                }
                _ = tokio::time::sleep_until(end_of_life) => {
                    let last = sent.last().copied().unwrap_or(after);
                    let _ = end_tx.send(over(last));
                    return;
                }
                _ = own_change => {}
                // Changes made through another replica.
                _ = tokio::time::sleep(poll) => {}
            }
        }
    });
    let end = futures::stream::once(end_rx).filter_map(|end| std::future::ready(end.ok().map(Err)));
    Ok(Box::pin(ReceiverStream::new(rx).chain(end)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn after(id: u64) -> Result<i64, Status> {
        after_event_id(&WatchRequest {
            after_event_id: id,
            ..Default::default()
        })
        .map_err(Status::from)
    }

    #[test]
    fn an_after_event_id_beyond_the_stored_ids_is_refused_not_wrapped() {
        assert_eq!(after(0).unwrap(), 0);
        assert_eq!(after(i64::MAX as u64).unwrap(), i64::MAX);
        for id in [i64::MAX as u64 + 1, u64::MAX] {
            let s = after(id).unwrap_err();
            assert_eq!(s.code(), tonic::Code::InvalidArgument, "{id}");
            assert!(s.message().contains("after_event_id"), "{}", s.message());
        }
    }
}
