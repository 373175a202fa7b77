//! The coordinator process shell: open the log, recover, serve gRPC until told to stop.
//!
//! Shaped like mini-redis's server: [`run`] takes an already bound listener (tests bind
//! port 0) and a shutdown future; it returns once the server stopped and the runtime task
//! drained. What is not finished at shutdown is recovered at the next start.

use std::future::Future;
use std::path::Path;
use std::sync::Arc;

use tokio::net::TcpListener;
use tonic::transport::server::TcpIncoming;

use crate::config::CoordinatorConfig;
use crate::error::CoordinatorError;
use crate::log::sled_log::SledLog;
use crate::runtime;
use crate::server::CoordinatorService;
use crate::transport::GrpcTransport;

/// Why the daemon could not run.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Coordinator(#[from] CoordinatorError),
    #[error("gRPC server failed: {0}")]
    Server(#[from] tonic::transport::Error),
    #[error("gRPC server task failed: {0}")]
    Task(String),
}

/// Serves the coordinator on `listener` with its log in `data_dir` until `shutdown`
/// resolves.
pub async fn run(
    listener: TcpListener,
    data_dir: &Path,
    config: CoordinatorConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), DaemonError> {
    let log = Arc::new(SledLog::open(data_dir).map_err(CoordinatorError::from)?);
    let (handle, runtime_task) =
        runtime::start(log, Arc::new(GrpcTransport::new()), config.clone())?;
    let service = CoordinatorService::new(handle, config);
    tracing::info!(listen = ?listener.local_addr().ok(), data_dir = %data_dir.display(), "coordinator serving");
    // Accepted sockets get TCP_NODELAY here: `Server::tcp_nodelay` only reaches sockets tonic
    // binds itself, and without it Nagle meets delayed ACKs (40 ms per call).
    let server = tonic::transport::Server::builder()
        .add_service(
            service
                .into_server()
                .max_decoding_message_size(crate::config::REQUEST_BYTES_MAX),
        )
        .serve_with_incoming_shutdown(
            TcpIncoming::from(listener).with_nodelay(Some(true)),
            shutdown,
        );
    // Spawned, so the server runs on the runtime's workers rather than on the thread that
    // awaits `run` (under `#[tokio::main]`, the main thread, which is no worker).
    tokio::spawn(server)
        .await
        .map_err(|e| DaemonError::Task(e.to_string()))??;
    // The service (and its handle) are dropped with the server; the runtime then drains.
    let _ = runtime_task.await;
    tracing::info!("coordinator stopped");
    Ok(())
}
