//! OpenTelemetry export of the coordinator's spans (feature `otel`; `tandem serve
//! --otel-endpoint URL`).
//!
//! The `tracing` spans the coordinator already opens are exported over OTLP/gRPC by
//! `tracing-opentelemetry`. [`link`] makes a span a child of the transaction's W3C trace
//! context, so that what the coordinator exports for one transaction lands in the client's
//! trace. Without the feature [`link`] does nothing, and the trace id still reaches the logs as
//! the spans' `trace_id` field.
//!
//! Known limitation: the `traceparent` sent to participants names a span id of Tandem's own
//! ([`tandem_common::TraceContext::child`]), not the exported span of the call, so a tracing
//! back end shows participant spans (if the participant exports any) under the transaction's
//! trace but not under the exact call.

use tandem_common::TraceContext;

#[cfg(feature = "otel")]
pub use enabled::*;

#[cfg(feature = "otel")]
mod enabled {
    use opentelemetry::trace::{SpanContext, TraceContextExt, TracerProvider as _};
    use opentelemetry::trace::{SpanId, TraceFlags, TraceId, TraceState};
    use tandem_common::logging::ExtraLayer;
    use tandem_common::TraceContext;
    use tracing_opentelemetry::OpenTelemetrySpanExt;

    /// The exporter's provider; [`Exporter::shutdown`] flushes what is still buffered.
    pub struct Exporter {
        provider: opentelemetry_sdk::trace::SdkTracerProvider,
    }

    /// Why the exporter could not be set up.
    #[derive(Debug, thiserror::Error)]
    #[error("OpenTelemetry exporter: {0}")]
    pub struct OtelError(String);

    /// Builds the OTLP/gRPC exporter for `endpoint` (e.g. `http://127.0.0.1:4317`) and the
    /// tracing layer that feeds it. Must run inside a tokio runtime.
    pub fn layer(endpoint: &str) -> Result<(ExtraLayer, Exporter), OtelError> {
        use opentelemetry_otlp::WithExportConfig;
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint)
            .build()
            .map_err(|e| OtelError(e.to_string()))?;
        let resource = opentelemetry_sdk::Resource::builder()
            .with_service_name("tandem-coordinator")
            .build();
        let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(resource)
            .build();
        let tracer = provider.tracer("tandem");
        let layer = tracing_opentelemetry::layer().with_tracer(tracer);
        Ok((Box::new(layer), Exporter { provider }))
    }

    impl Exporter {
        /// Exports what is buffered and stops.
        pub fn shutdown(self) {
            if let Err(e) = self.provider.shutdown() {
                tracing::warn!(error = %e, "OpenTelemetry exporter shutdown");
            }
        }
    }

    pub(super) fn set_parent(span: &tracing::Span, trace: &TraceContext) {
        let remote = SpanContext::new(
            TraceId::from_bytes(trace.trace_id),
            SpanId::from_bytes(trace.parent_id),
            TraceFlags::new(trace.flags),
            true,
            TraceState::default(),
        );
        let context = opentelemetry::Context::new().with_remote_span_context(remote);
        // Fails only when no OpenTelemetry layer is installed: nothing to link then.
        let _ = span.set_parent(context);
    }
}

/// Makes `span` a child of `trace` in what is exported (a no-op without feature `otel`).
pub fn link(span: &tracing::Span, trace: &TraceContext) {
    #[cfg(feature = "otel")]
    enabled::set_parent(span, trace);
    #[cfg(not(feature = "otel"))]
    let _ = (span, trace);
}

#[cfg(all(test, feature = "otel"))]
mod tests {
    use std::sync::{Arc, Mutex};

    use opentelemetry::trace::TracerProvider as _;
    use opentelemetry_sdk::error::OTelSdkResult;
    use opentelemetry_sdk::trace::{SdkTracerProvider, SpanData, SpanExporter};
    use tracing_subscriber::layer::SubscriberExt;

    use super::*;

    /// Keeps what it is asked to export.
    #[derive(Debug, Clone, Default)]
    struct Kept(Arc<Mutex<Vec<SpanData>>>);

    impl SpanExporter for Kept {
        async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
            self.0.lock().unwrap().extend(batch);
            Ok(())
        }
    }

    #[test]
    fn a_linked_span_is_exported_as_a_child_of_the_transactions_trace() {
        let kept = Kept::default();
        let provider = SdkTracerProvider::builder()
            .with_simple_exporter(kept.clone())
            .build();
        let subscriber = tracing_subscriber::registry()
            .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
        let trace =
            TraceContext::parse("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01").unwrap();
        tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!("execute_2pc");
            link(&span, &trace);
            span.in_scope(|| tracing::info!("inside"));
        });
        provider.force_flush().unwrap();
        let spans = kept.0.lock().unwrap();
        let exported = spans
            .iter()
            .find(|s| s.name == "execute_2pc")
            .unwrap_or_else(|| panic!("execute_2pc was not exported: {spans:?}"));
        assert_eq!(
            exported.span_context.trace_id().to_bytes(),
            trace.trace_id,
            "exported under another trace"
        );
        assert_eq!(exported.parent_span_id.to_bytes(), trace.parent_id);
    }
}
