//! W3C trace context in gRPC metadata and in stored rows, so one trace follows a request
//! from the partner through the registry, the processor and its subprocessors, and back
//! with the acknowledgements.
//!
//! Everything here is a no-op when no tracer is installed: contexts are then empty and
//! nothing is injected. Servers read the caller's context in one place, the layer in
//! [`crate::grpc::trace`].

use opentelemetry::propagation::{Extractor, Injector};
use opentelemetry::trace::TraceContextExt;
use opentelemetry::Context;
use tonic::metadata::{MetadataKey, MetadataMap, MetadataValue};
use tracing_opentelemetry::OpenTelemetrySpanExt;

struct MetadataInjector<'a>(&'a mut MetadataMap);

impl Injector for MetadataInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(k), Ok(v)) = (
            MetadataKey::from_bytes(key.as_bytes()),
            MetadataValue::try_from(value.as_str()),
        ) {
            self.0.insert(k, v);
        }
    }
}

struct HeaderExtractor<'a>(&'a http::HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}

struct OneHeader<'a>(&'a str);

impl Extractor for OneHeader<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        (key == "traceparent").then_some(self.0)
    }

    fn keys(&self) -> Vec<&str> {
        vec!["traceparent"]
    }
}

/// The trace context a caller sent in the headers of a call (gRPC metadata are HTTP/2
/// headers). Only [`crate::grpc::trace`] reads it, once per call.
pub fn extract(headers: &http::HeaderMap) -> Context {
    opentelemetry::global::get_text_map_propagator(|p| p.extract(&HeaderExtractor(headers)))
}

/// The context a stored `traceparent` names.
pub fn from_traceparent(traceparent: &str) -> Context {
    opentelemetry::global::get_text_map_propagator(|p| p.extract(&OneHeader(traceparent)))
}

/// Makes `span` a child of `parent` when `parent` carries a valid span context. Must be
/// called before the span is first entered.
pub fn set_parent(span: &tracing::Span, parent: Context) {
    if parent.span().span_context().is_valid() {
        let _ = span.set_parent(parent);
    }
}

/// The `traceparent` of `span`, if it is being traced.
pub fn traceparent_of(span: &tracing::Span) -> Option<String> {
    let cx = span.context();
    let sc = cx.span().span_context().clone();
    sc.is_valid().then(|| {
        format!(
            "00-{}-{}-{:02x}",
            sc.trace_id(),
            sc.span_id(),
            sc.trace_flags().to_u8()
        )
    })
}

/// The trace id (32 hex digits) of `span`, if it is being traced.
pub fn trace_id_of(span: &tracing::Span) -> Option<String> {
    let cx = span.context();
    let sc = cx.span().span_context().clone();
    sc.is_valid().then(|| sc.trace_id().to_string())
}

/// Writes the current span's trace context into outgoing `metadata`; returns whether it did
/// (false when nothing is traced).
pub fn inject_current(metadata: &mut MetadataMap) -> bool {
    let cx = tracing::Span::current().context();
    if !cx.span().span_context().is_valid() {
        return false;
    }
    opentelemetry::global::get_text_map_propagator(|p| {
        p.inject_context(&cx, &mut MetadataInjector(metadata))
    });
    true
}

/// The trace id of a W3C `traceparent` value, if it is well-formed and not all zeros.
pub fn trace_id_from_traceparent(tp: &str) -> Option<String> {
    let mut parts = tp.split('-');
    let (_version, trace) = (parts.next()?, parts.next()?);
    let valid = trace.len() == 32
        && trace.bytes().all(|b| b.is_ascii_hexdigit())
        && trace.bytes().any(|b| b != b'0');
    valid.then(|| trace.to_ascii_lowercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_trace_ids() {
        assert_eq!(
            trace_id_from_traceparent("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
                .as_deref(),
            Some("4bf92f3577b34da6a3ce929d0e0e4736")
        );
        assert!(trace_id_from_traceparent(
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01"
        )
        .is_none());
        assert!(trace_id_from_traceparent("garbage").is_none());
    }

    #[test]
    fn nothing_is_injected_without_a_tracer() {
        let mut m = MetadataMap::new();
        assert!(!inject_current(&mut m));
        assert!(m.is_empty());
    }
}
