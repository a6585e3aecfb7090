//! Bounded resources per caller: what one caller may hold open answers RESOURCE_EXHAUSTED
//! past its limit, naming the limit, and the slot comes back when the caller lets go.

use dsrelay_proto::v1::WatchRequest;
use tonic::Code;

use crate::harness::{erasure, spawn_pair, PairOptions};

/// `watch.streams_per_caller` when the configuration leaves it out.
const STREAMS_PER_CALLER: usize = 32;

#[tokio::test]
async fn a_caller_holds_at_most_its_share_of_watch_streams() {
    let Some(pair) = spawn_pair(PairOptions {
        // A request that never finishes keeps every stream open.
        with_absent_processor: true,
        ..Default::default()
    })
    .await
    else {
        return;
    };
    let id = pair
        .crm()
        .submit(erasure("watch.limit@example.fi"))
        .await
        .expect("submit")
        .into_inner()
        .request_id;
    let watch = || WatchRequest {
        request_id: id.clone(),
        ..Default::default()
    };
    let mut open = Vec::new();
    for _ in 0..STREAMS_PER_CALLER {
        open.push(
            pair.crm()
                .watch(watch())
                .await
                .expect("a watch within the limit"),
        );
    }
    let refused = pair
        .crm()
        .watch(watch())
        .await
        .expect_err("one watch past the limit");
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(
        refused.message().contains("watch.streams_per_caller"),
        "the answer names the limit: {}",
        refused.message()
    );

    // The limit is per caller: the operator still watches.
    pair.operator()
        .watch(watch())
        .await
        .expect("another caller's watch");

    // Closing a stream gives its slot back (the server notices the reset asynchronously).
    drop(open.pop());
    let mut again = None;
    for _ in 0..100 {
        match pair.crm().watch(watch()).await {
            Ok(s) => {
                again = Some(s);
                break;
            }
            Err(s) if s.code() == Code::ResourceExhausted => {
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
            Err(s) => panic!("unexpected answer: {s:?}"),
        }
    }
    assert!(
        again.is_some(),
        "a closed stream's slot was never given back"
    );
    pair.stop().await;
}

#[tokio::test]
async fn an_open_watch_does_not_hold_the_registry_open_at_shutdown() {
    let Some(mut pair) = spawn_pair(PairOptions {
        with_absent_processor: true,
        ..Default::default()
    })
    .await
    else {
        return;
    };
    let id = pair
        .crm()
        .submit(erasure("watch.shutdown@example.fi"))
        .await
        .expect("submit")
        .into_inner()
        .request_id;
    let mut stream = pair
        .crm()
        .watch(WatchRequest {
            request_id: id,
            ..Default::default()
        })
        .await
        .expect("watch")
        .into_inner();
    // The request never finishes: without shutdown the stream would stay open.
    let first = stream.message().await.expect("the first event");
    assert!(first.is_some());

    let began = std::time::Instant::now();
    pair.registry.stop().await;
    // The harness gives up waiting after 15 s; the registry must be well inside that.
    assert!(
        began.elapsed() < std::time::Duration::from_secs(10),
        "stopping took {:?} with a Watch open",
        began.elapsed()
    );
    let ended = loop {
        match stream.message().await {
            Ok(Some(_)) => continue,
            other => break other,
        }
    };
    let status = ended.expect_err("the stream ends with a status saying why");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(
        status.message().contains("shutting down") && status.message().contains("after_event_id"),
        "the answer says why and how to resume: {}",
        status.message()
    );
}
