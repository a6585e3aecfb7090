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

#[tokio::test]
async fn a_list_page_ends_early_rather_than_outgrow_one_answer() {
    use dsrelay_proto::v1::{FieldCorrection, ListRequestsRequest, RequestKind, RequestParameters};
    use std::collections::BTreeSet;

    let Some(pair) = spawn_pair(PairOptions {
        with_absent_processor: true,
        ..Default::default()
    })
    .await
    else {
        return;
    };
    // About 34 KB of corrections each: 150 of them are more than one 4 MiB answer holds.
    const REQUESTS: usize = 150;
    let mut crm = pair.crm();
    for i in 0..REQUESTS {
        let mut req = erasure(&format!("big.page.{i}@example.fi"));
        req.kind = RequestKind::Rectification as i32;
        req.parameters = Some(RequestParameters {
            corrections: (0..32)
                .map(|f| FieldCorrection {
                    field: format!("field_{f}"),
                    new_value: "x".repeat(1024),
                })
                .collect(),
            ..Default::default()
        });
        crm.submit(req).await.expect("submit");
    }
    let mut seen = BTreeSet::new();
    let mut pages = 0;
    let mut token = String::new();
    loop {
        let page = crm
            .list(ListRequestsRequest {
                page_size: 500,
                page_token: token.clone(),
                ..Default::default()
            })
            .await
            .expect("a page that fits in one answer")
            .into_inner();
        pages += 1;
        assert!(!page.requests.is_empty(), "page {pages} is empty");
        for r in &page.requests {
            assert!(
                seen.insert(r.request_id.clone()),
                "{} listed twice",
                r.request_id
            );
        }
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(seen.len(), REQUESTS, "every request listed once");
    assert!(pages >= 2, "150 requests of 34 KB fit one answer?");
    pair.stop().await;
}

/// A Watch stream lives at most `watch.max_stream_ms`, read or not: a caller that opens one
/// and never reads it gets its slot back when the lifetime is over, and the stream, once
/// read, holds the events queued before it ended, then UNAVAILABLE naming the last of them
/// as the `after_event_id` to watch again from.
#[tokio::test]
async fn a_watch_stream_ends_at_its_maximum_lifetime() {
    const LIFETIME_MS: u64 = 1_500;
    let Some(pair) = spawn_pair(PairOptions {
        // A request that never finishes keeps the stream open.
        with_absent_processor: true,
        watch: Some(dsrelay_registry::config::WatchConfig {
            streams_per_caller: 1,
            max_stream_ms: LIFETIME_MS,
            ..Default::default()
        }),
        ..Default::default()
    })
    .await
    else {
        return;
    };
    let id = pair
        .crm()
        .submit(erasure("watch.lifetime@example.fi"))
        .await
        .expect("submit")
        .into_inner()
        .request_id;
    let watch = |after_event_id| WatchRequest {
        request_id: id.clone(),
        after_event_id,
        ..Default::default()
    };
    let opened = std::time::Instant::now();
    let mut unread = pair
        .crm()
        .watch(watch(0))
        .await
        .expect("a watch")
        .into_inner();
    let refused = pair
        .crm()
        .watch(watch(0))
        .await
        .expect_err("the only slot is taken");
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    // Never read, never closed: the slot still comes back once the lifetime is over.
    let mut again = None;
    while opened.elapsed() < std::time::Duration::from_secs(10) {
        match pair.crm().watch(watch(0)).await {
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
    assert!(again.is_some(), "the unread stream's slot never came back");
    assert!(
        opened.elapsed() >= std::time::Duration::from_millis(LIFETIME_MS),
        "not before its lifetime: {:?}",
        opened.elapsed()
    );
    let mut last = 0;
    let ended = loop {
        match unread.message().await {
            Ok(Some(event)) => last = event.event_id,
            Ok(None) => panic!("the stream ended without saying why"),
            Err(status) => break status,
        }
    };
    assert!(last > 0, "the events queued before the end were delivered");
    assert_eq!(ended.code(), Code::Unavailable, "{ended:?}");
    assert!(
        ended.message().contains("watch.max_stream_ms")
            && ended.message().contains(&format!("after_event_id {last} ")),
        "{ended:?}"
    );
    pair.stop().await;
}
