//! The submitters: one erasure per subject, paced, each Submit retried with its idempotency
//! key until an answer comes back.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dsrelay_proto::v1::request_service_client::RequestServiceClient;
use tonic::transport::Channel;

use super::holders::subject_key;
use super::ChaosArgs;
use crate::relay::erasure;

/// What one submitter learned of one subject's erasure.
#[derive(Debug, Clone)]
pub(crate) struct Submitted {
    /// The subject's number.
    pub(crate) n: u64,
    /// The idempotency key (also the subject's address before the `@`).
    pub(crate) key: String,
    /// The request id the registry answered, if any answer came back.
    pub(crate) id: Option<String>,
    /// Submit calls made, the first included.
    pub(crate) calls: u32,
    /// Whether the answer said the key was seen before (an earlier call's answer was lost).
    pub(crate) deduplicated: bool,
    /// The last error, when no answer came back.
    pub(crate) last_error: Option<String>,
}

/// Submits one erasure per subject `0..requests` from `clients` (one submitter each), paced
/// to `rate` per second; each Submit is retried with its idempotency key until an answer
/// comes back or `submit_timeout_secs` pass.
pub(super) async fn submit_all(
    args: &ChaosArgs,
    clients: Vec<RequestServiceClient<Channel>>,
) -> Vec<Submitted> {
    let next = Arc::new(AtomicU64::new(0));
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for client in clients {
        let next = next.clone();
        let requests = args.requests;
        let rate = args.rate;
        let timeout = Duration::from_secs(args.submit_timeout_secs);
        tasks.push(tokio::spawn(async move {
            let mut out = Vec::new();
            loop {
                let n = next.fetch_add(1, Ordering::SeqCst);
                if n >= requests {
                    break out;
                }
                let slot = t0 + Duration::from_secs_f64(n as f64 / rate as f64);
                tokio::time::sleep_until(slot.into()).await;
                out.push(submit_one(client.clone(), n, timeout).await);
            }
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        // A submitter only panics on a bug here; its subjects then count as not submitted.
        if let Ok(v) = t.await {
            all.extend(v);
        }
    }
    all.sort_by_key(|s| s.n);
    all
}

async fn submit_one(
    mut client: RequestServiceClient<Channel>,
    n: u64,
    timeout: Duration,
) -> Submitted {
    let key = subject_key(n);
    let deadline = Instant::now() + timeout;
    let mut s = Submitted {
        n,
        key: key.clone(),
        id: None,
        calls: 0,
        deduplicated: false,
        last_error: None,
    };
    loop {
        s.calls += 1;
        let mut request = tonic::Request::new(erasure(key.clone()));
        request.set_timeout(Duration::from_secs(5));
        match client.submit(request).await {
            Ok(r) => {
                let r = r.into_inner();
                s.id = Some(r.request_id);
                s.deduplicated = r.deduplicated;
                s.last_error = None;
                return s;
            }
            Err(e) => {
                s.last_error = Some(format!("{:?}: {}", e.code(), e.message()));
                if Instant::now() > deadline {
                    return s;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}
