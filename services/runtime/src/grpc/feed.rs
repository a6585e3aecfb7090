//! A server stream fed by a producer task, which gives up when its caller stops reading.
//!
//! A server-streaming handler (the registry's DownloadPackage) returns at once and leaves a
//! task to produce the messages. When the caller stops reading but keeps its connection,
//! HTTP/2 flow control stops taking messages, the channel fills, and the task would wait
//! forever with its files open. [`Feed::send`] waits at most `idle` (the service's
//! `call_limit_ms`) for room; then the producer stops, and the caller, should it read again,
//! gets what was queued and then DEADLINE_EXCEEDED naming the limit, never a stream that
//! ends as if complete.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio_stream::Stream;
use tonic::Status;

/// The producer's end: sends messages, and notices a caller that took nothing for `idle`.
#[derive(Debug)]
pub struct Feed<T> {
    tx: mpsc::Sender<Result<T, Status>>,
    idle: Duration,
    stalled: Option<oneshot::Sender<Status>>,
}

/// The caller's end, the handler's answer: the messages, then DEADLINE_EXCEEDED if the
/// producer gave up on the caller.
#[derive(Debug)]
pub struct FedStream<T> {
    rx: mpsc::Receiver<Result<T, Status>>,
    stalled: Option<oneshot::Receiver<Status>>,
}

/// A feed with room for `capacity` messages and its stream.
pub fn channel<T>(capacity: usize, idle: Duration) -> (Feed<T>, FedStream<T>) {
    let (tx, rx) = mpsc::channel(capacity);
    let (stalled_tx, stalled_rx) = oneshot::channel();
    (
        Feed {
            tx,
            idle,
            stalled: Some(stalled_tx),
        },
        FedStream {
            rx,
            stalled: Some(stalled_rx),
        },
    )
}

impl<T> Feed<T> {
    /// Queues `item`; false when the producer should stop: the caller went away, or took
    /// nothing for `idle` (then the stream ends with DEADLINE_EXCEEDED after what is queued).
    pub async fn send(&mut self, item: Result<T, Status>) -> bool {
        match self.tx.send_timeout(item, self.idle).await {
            Ok(()) => true,
            Err(mpsc::error::SendTimeoutError::Closed(_)) => false,
            Err(mpsc::error::SendTimeoutError::Timeout(_)) => {
                if let Some(stalled) = self.stalled.take() {
                    let _ = stalled.send(Status::deadline_exceeded(format!(
                        "this stream's reader took nothing for {} ms (call_limit_ms), so the \
                         server stopped it; call again to start over",
                        self.idle.as_millis()
                    )));
                }
                false
            }
        }
    }
}

impl<T> Stream for FedStream<T> {
    type Item = Result<T, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        match self.rx.poll_recv(cx) {
            Poll::Ready(None) => {}
            other => return other,
        }
        // Every sender is gone, so the feed is too: its stall status was sent or dropped.
        let Some(stalled) = self.stalled.as_mut() else {
            return Poll::Ready(None);
        };
        let answer = match Pin::new(stalled).poll(cx) {
            Poll::Ready(Ok(status)) => Some(Err(status)),
            Poll::Ready(Err(_)) => None,
            Poll::Pending => return Poll::Pending,
        };
        self.stalled = None;
        Poll::Ready(answer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio_stream::StreamExt;

    #[tokio::test]
    async fn a_stream_read_to_its_end_ends_cleanly() {
        let (mut feed, stream) = channel(2, Duration::from_secs(5));
        let producer = tokio::spawn(async move {
            for i in 0..5 {
                assert!(feed.send(Ok(i)).await);
            }
        });
        let got: Vec<_> = stream.collect().await;
        producer.await.unwrap();
        assert_eq!(
            got.into_iter().map(|r| r.unwrap()).collect::<Vec<_>>(),
            vec![0, 1, 2, 3, 4]
        );
    }

    #[tokio::test]
    async fn a_reader_that_stops_reading_stops_the_producer_and_learns_why() {
        let (mut feed, mut stream) = channel(2, Duration::from_millis(100));
        let producer = tokio::spawn(async move {
            let mut sent = 0;
            while feed.send(Ok(sent)).await {
                sent += 1;
            }
            sent
        });
        // Nothing is read: the producer fills the channel and gives up after the idle limit.
        let sent = tokio::time::timeout(Duration::from_secs(5), producer)
            .await
            .expect("the producer stops on its own")
            .unwrap();
        assert_eq!(sent, 2, "only what fit in the channel");
        assert_eq!(stream.next().await.unwrap().unwrap(), 0);
        assert_eq!(stream.next().await.unwrap().unwrap(), 1);
        let status = stream.next().await.unwrap().expect_err("not a clean end");
        assert_eq!(status.code(), tonic::Code::DeadlineExceeded);
        assert!(status.message().contains("100 ms"), "{status:?}");
        assert!(stream.next().await.is_none());
    }

    #[tokio::test]
    async fn a_reader_that_goes_away_stops_the_producer_quietly() {
        let (mut feed, stream) = channel::<u32>(1, Duration::from_secs(60));
        drop(stream);
        assert!(!feed.send(Ok(1)).await);
    }
}
