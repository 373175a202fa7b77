//! The coordinator process shell: open the log, recover, serve gRPC until told to stop.
//!
//! Shaped like mini-redis's server: [`run`] takes an already bound listener (tests bind
//! port 0) and a shutdown future; it returns once the server stopped and the runtime task
//! drained. What is not finished at shutdown is recovered at the next start.
//!
//! Beside `tandem.v1.Coordinator` and the operators' `tandem.v1.Admin`, the server carries two
//! standard services, so that ordinary gRPC tools work against the daemon:
//! - gRPC health checking (`grpc.health.v1.Health`, from `tonic-health`): `""` (the whole
//!   server), `tandem.v1.Coordinator` and `tandem.v1.Admin` answer SERVING from the first
//!   accepted connection on, since recovery has run before the listener is served. Once
//!   shutdown begins all answer NOT_SERVING; [`HEALTH_WATCH_END_MS`] later the statuses are withdrawn, which ends every
//!   `Watch` stream (after it delivered NOT_SERVING), so that no watcher holds the graceful
//!   shutdown open. A `Check` after that answers NOT_FOUND.
//! - gRPC server reflection (`grpc.reflection.v1` and the older `v1alpha`, from
//!   `tonic-reflection`), serving the contract's descriptors
//!   ([`tandem_proto::FILE_DESCRIPTOR_SET`]) and the health service's.
//!
//! Metrics: the log's flusher reports every flush to the configuration's
//! [`crate::metrics::Metrics`], which also reads the log's size on disk at each scrape.
//! Serving them over HTTP is the caller's choice ([`crate::metrics::serve`]).
//!
//! [`run_with_security`] adds TLS (optionally mutual), the bearer-token layer of
//! [`crate::security`] in front of every service, and how the coordinator calls participants
//! ([`ParticipantSecurity`]); [`run`] is plaintext without tokens. Which listen addresses may
//! go without TLS is the binary's decision (docs/operations.md).

use std::future::Future;
use std::path::Path;
use std::sync::Arc;

use std::time::Duration;

use tokio::net::TcpListener;
use tonic::transport::server::TcpIncoming;
use tonic_health::server::HealthReporter;
use tonic_health::ServingStatus;

use crate::config::CoordinatorConfig;
use crate::error::CoordinatorError;
use crate::log::sled_log::SledLog;
use crate::log::TxnLog;
use crate::runtime;
use crate::security::{AccessPolicy, AuthLayer};
use crate::server::admin::AdminService;
use crate::server::CoordinatorService;
use crate::transport::{GrpcTransport, ParticipantSecurity};

/// Why the daemon could not run.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Coordinator(#[from] CoordinatorError),
    #[error("gRPC server failed: {0}")]
    Server(#[from] tonic::transport::Error),
    #[error("gRPC server task failed: {0}")]
    Task(String),
    /// The contract's file descriptor set could not be served by reflection (a build fault).
    #[error("gRPC reflection service: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
}

/// How long after shutdown begins the health statuses are withdrawn, ending `Watch` streams,
/// in ms. Until then a `Check` on a connection still open answers NOT_SERVING.
pub const HEALTH_WATCH_END_MS: u64 = 1_000;

/// The names the health service answers for: the whole server, the coordinator service and
/// the admin service.
fn health_service_names() -> [&'static str; 3] {
    [
        "",
        tandem_proto::v1::coordinator_server::SERVICE_NAME,
        tandem_proto::v1::admin_server::SERVICE_NAME,
    ]
}

/// Marks every health name NOT_SERVING now, and withdraws them [`HEALTH_WATCH_END_MS`] later.
async fn health_shutting_down(reporter: HealthReporter) {
    for name in health_service_names() {
        reporter
            .set_service_status(name, ServingStatus::NotServing)
            .await;
    }
    tracing::info!("shutting down: health is NOT_SERVING");
    // Detached: if no connection is left the server stops at once and this task dies with
    // the process; otherwise it ends the health watchers that would keep a connection open.
    tokio::spawn(async move {
        let mut reporter = reporter;
        tokio::time::sleep(Duration::from_millis(HEALTH_WATCH_END_MS)).await;
        for name in health_service_names() {
            reporter.clear_service_status(name).await;
        }
    });
}

/// How the daemon is secured; the default is plaintext, no tokens.
#[derive(Debug, Clone, Default)]
pub struct DaemonSecurity {
    /// TLS of the server (with a client CA: mutual TLS). `None`: plaintext.
    pub server_tls: Option<tonic::transport::ServerTlsConfig>,
    /// Which bearer tokens calls must carry.
    pub access: AccessPolicy,
    /// How the coordinator calls participants.
    pub participants: ParticipantSecurity,
}

/// Serves the coordinator on `listener` with its log in `data_dir` until `shutdown`
/// resolves: plaintext, no tokens.
pub async fn run(
    listener: TcpListener,
    data_dir: &Path,
    config: CoordinatorConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), DaemonError> {
    run_with_security(
        listener,
        data_dir,
        config,
        DaemonSecurity::default(),
        shutdown,
    )
    .await
}

/// [`run`] with TLS, tokens and participant security as `security` says.
pub async fn run_with_security(
    listener: TcpListener,
    data_dir: &Path,
    config: CoordinatorConfig,
    security: DaemonSecurity,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), DaemonError> {
    // TLS settings are checked before the log is opened: a bad certificate stops the start
    // without touching stored data.
    let mut builder = tonic::transport::Server::builder();
    let tls = security.server_tls.is_some();
    if let Some(server_tls) = security.server_tls {
        builder = builder.tls_config(server_tls)?;
    }
    let log = Arc::new(SledLog::open(data_dir).map_err(CoordinatorError::from)?);
    log.flusher().set_observer(config.metrics.clone());
    config.metrics.watch_log(log.clone());
    let transport = GrpcTransport::with_security(security.participants);
    let (handle, runtime_task) = runtime::start(log.clone(), Arc::new(transport), config.clone())?;
    let grace = config.shutdown_grace;
    let admin = AdminService::new(handle.clone());
    let service = CoordinatorService::new(handle, config);
    // Recovery ran in `runtime::start`: the coordinator is ready before the first connection.
    let (health, health_service) = tonic_health::server::health_reporter();
    for name in health_service_names() {
        health
            .set_service_status(name, ServingStatus::Serving)
            .await;
    }
    // Only the services this server carries are listed (the contract's descriptors also hold
    // `tandem.v1.Participant`, which participants serve, not the coordinator); every symbol
    // of the registered files can still be described.
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(tandem_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .with_service_name(tandem_proto::v1::coordinator_server::SERVICE_NAME)
            .with_service_name(tandem_proto::v1::admin_server::SERVICE_NAME)
            .with_service_name(tonic_health::pb::health_server::SERVICE_NAME)
            .with_service_name(tonic_reflection::pb::v1::server_reflection_server::SERVICE_NAME)
            .with_service_name(
                tonic_reflection::pb::v1alpha::server_reflection_server::SERVICE_NAME,
            )
    };
    let reflection_v1 = reflection().build_v1()?;
    let reflection_v1alpha = reflection().build_v1alpha()?;
    // Once shutdown begins, the server stops accepting and lets calls in progress finish;
    // `stopping` starts the grace period after which the rest are cut off.
    let (stopping_tx, stopping) = tokio::sync::oneshot::channel::<()>();
    let shutdown = async move {
        shutdown.await;
        let _ = stopping_tx.send(());
        health_shutting_down(health).await;
    };
    tracing::info!(
        listen = ?listener.local_addr().ok(),
        data_dir = %data_dir.display(),
        tls,
        tokens = security.access.is_enforced(),
        "coordinator serving"
    );
    // Accepted sockets get TCP_NODELAY here: `Server::tcp_nodelay` only reaches sockets tonic
    // binds itself, and without it Nagle meets delayed ACKs (40 ms per call).
    let server = builder
        .layer(AuthLayer::new(security.access))
        .add_service(
            service
                .into_server()
                .max_decoding_message_size(crate::config::REQUEST_BYTES_MAX),
        )
        .add_service(admin.into_server())
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .serve_with_incoming_shutdown(
            TcpIncoming::from(listener).with_nodelay(Some(true)),
            shutdown,
        );
    // Spawned, so the server runs on the runtime's workers rather than on the thread that
    // awaits `run` (under `#[tokio::main]`, the main thread, which is no worker).
    let mut server = tokio::spawn(server);
    let grace_over = async move {
        if stopping.await.is_err() {
            return std::future::pending().await; // the server ended without a shutdown
        }
        tokio::time::sleep(grace).await;
    };
    tokio::select! {
        served = &mut server => served.map_err(|e| DaemonError::Task(e.to_string()))??,
        () = grace_over => {
            // Calls still open (a long prepare, a watch) are cut off: their clients see
            // UNAVAILABLE and learn the outcome by retrying with the same id, after the
            // next start has recovered what is unfinished.
            tracing::warn!(grace_ms = grace.as_millis() as u64, "shutdown grace period over; closing the calls still open");
            server.abort();
            let _ = server.await;
        }
    }
    // Calls cut off above may still be parked in connection tasks holding handles: the
    // runtime is stopped rather than left to notice the last handle go, which answers them
    // (UNAVAILABLE). Then the log is flushed, so that even what was written lazily survives.
    runtime_task.stop().await;
    log.sync_history();
    if let Err(e) = log.flush().await {
        tracing::error!(error = %e, "flushing the log at shutdown failed");
    }
    tracing::info!("coordinator stopped");
    Ok(())
}
