//! The Tandem coordinator.
//!
//! - [`engine`]: the sans-I/O protocol core (2PC state machines: events in, effects out);
//! - [`log`]: the durable transaction log (a storage trait; sled is the embedded default);
//! - [`runtime`]: the one task that owns the engine and carries out its effects (persist,
//!   flush, send, timers, replies) and runs recovery at start;
//! - [`transport`]: how the runtime reaches participants (a trait; gRPC is the default);
//! - [`server`]: the `tandem.v1.Coordinator` gRPC service: validation at the edge and the
//!   conversion of prost messages into engine types;
//! - [`daemon`]: `run(listener, config, shutdown)`, the process shell the `tandem` binary uses;
//! - [`config`]: the configuration and every limit on input from outside;
//! - [`metrics`]: the Prometheus registry the runtime and the log's flusher update, and its
//!   `/metrics` endpoint;
//! - [`otel`]: OpenTelemetry span export (feature `otel`) and the link of spans to a
//!   transaction's trace.
//! - [`security`]: TLS settings and the bearer-token layer in front of every service.

pub mod config;
pub mod daemon;
pub mod engine;
pub mod error;
pub mod log;
pub mod metrics;
pub mod otel;
pub mod runtime;
pub mod security;
pub mod server;
pub mod transport;

pub use config::CoordinatorConfig;
pub use error::CoordinatorError;
