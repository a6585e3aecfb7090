//! Continuing the caller's trace: one tower layer, installed by
//! [`crate::server::builder`], reads the W3C trace context from every call's headers.
//!
//! While the handler runs, the caller's context is the current OpenTelemetry context, so the
//! first span the handler opens (`#[tracing::instrument(name = "intake", ...)]`) is a child
//! of the caller's span: tracing-opentelemetry parents a span that has no tracing parent on
//! the current context. The caller's `traceparent` itself is left in the request's
//! extensions as a [`CallerTrace`], for handlers that name the trace even when nothing is
//! exported (logs carry the trace id either way).

use std::task::{Context as TaskContext, Poll};

use opentelemetry::context::{FutureExt, WithContext};
use tower::{Layer, Service};

use crate::trace_context;

/// The caller's W3C trace context, when it sent a well-formed one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallerTrace {
    traceparent: String,
    trace_id: String,
}

impl CallerTrace {
    fn from_headers(headers: &http::HeaderMap) -> Option<Self> {
        let traceparent = headers.get("traceparent")?.to_str().ok()?;
        let trace_id = trace_context::trace_id_from_traceparent(traceparent)?;
        Some(Self {
            traceparent: traceparent.to_string(),
            trace_id,
        })
    }

    /// What the caller of `request` sent, as [`TraceContextLayer`] found it.
    pub fn of<T>(request: &tonic::Request<T>) -> Option<&Self> {
        request.extensions().get()
    }

    /// The `traceparent` header as sent.
    pub fn traceparent(&self) -> &str {
        &self.traceparent
    }

    /// The trace id (32 lowercase hex digits).
    pub fn trace_id(&self) -> &str {
        &self.trace_id
    }
}

/// Makes the caller's trace context current while a call is handled; see the module docs.
#[derive(Debug, Clone, Copy, Default)]
pub struct TraceContextLayer;

impl<S> Layer<S> for TraceContextLayer {
    type Service = TraceContextService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        TraceContextService { inner }
    }
}

/// The service [`TraceContextLayer`] wraps around the router.
#[derive(Debug, Clone)]
pub struct TraceContextService<S> {
    inner: S,
}

impl<S, B> Service<http::Request<B>> for TraceContextService<S>
where
    S: Service<http::Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = WithContext<S::Future>;

    fn poll_ready(&mut self, cx: &mut TaskContext<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        let parent = trace_context::extract(request.headers());
        if let Some(caller) = CallerTrace::from_headers(request.headers()) {
            request.extensions_mut().insert(caller);
        }
        // The inner service may start work in `call`, before its future is first polled.
        let _attached = parent.clone().attach();
        self.inner.call(request).with_context(parent)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(traceparent: &str) -> http::HeaderMap {
        let mut h = http::HeaderMap::new();
        h.insert("traceparent", traceparent.parse().expect("header"));
        h
    }

    #[test]
    fn reads_a_well_formed_traceparent() {
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let caller = CallerTrace::from_headers(&headers(tp)).expect("caller trace");
        assert_eq!(caller.traceparent(), tp);
        assert_eq!(caller.trace_id(), "4bf92f3577b34da6a3ce929d0e0e4736");
    }

    #[test]
    fn ignores_a_malformed_or_empty_one() {
        for tp in [
            "garbage",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
        ] {
            assert_eq!(CallerTrace::from_headers(&headers(tp)), None, "{tp}");
        }
        assert_eq!(CallerTrace::from_headers(&http::HeaderMap::new()), None);
    }

    #[tokio::test]
    async fn handlers_see_the_caller_trace() {
        let svc = tower::service_fn(|req: http::Request<()>| async move {
            let req = tonic::Request::from_http(req);
            Ok::<_, std::convert::Infallible>(CallerTrace::of(&req).cloned())
        });
        let mut svc = TraceContextLayer.layer(svc);
        let mut req = http::Request::new(());
        *req.headers_mut() = headers("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01");
        let seen = svc.call(req).await.expect("infallible");
        assert_eq!(
            seen.map(|c| c.trace_id().to_string()).as_deref(),
            Some("4bf92f3577b34da6a3ce929d0e0e4736")
        );
    }
}
