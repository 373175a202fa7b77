//! A fault-injecting TCP proxy, one in front of each server of the chaos run.
//!
//! Everyone reaches a server through its proxy: clients the coordinator, the coordinator the
//! banks, the banks the coordinator (its advertised address is its proxy's). The proxy
//! forwards to the server's *current* address ([`Proxy::set_backend`]), so a server restarted
//! on another port is reached at the same proxy address, and a server that is down looks like
//! a refused connection (the client's connection is reset at once).
//!
//! Faults, each switched by the chaos schedule:
//!
//! - **blackhole** ([`Proxy::blackhole`]): no byte moves in either direction, on open
//!   connections and on new ones (accepted, then silent), as in a network partition. Bytes
//!   already read are held, not lost: TCP would have retransmitted them once the partition
//!   healed. [`Proxy::heal`] lets them through again;
//! - **latency** ([`Proxy::set_latency`]): every chunk forwarded waits this long first;
//! - **reset** ([`Proxy::reset_connections`]): every open connection is closed with a TCP
//!   reset on both sides (`SO_LINGER` 0), as when a middlebox or a peer's kernel drops it.
//!
//! A connection ends the way its first side ended: a close is passed on as a close (FIN), a
//! reset or a failed read or write as a reset on both sides.
//!
//! Every connection's task watches one `watch` channel holding the link's state, so a fault
//! reaches connections already open, not only new ones. Dropping the proxy resets every
//! connection and stops accepting.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// Bound of the proxy's connect to its backend (a server on loopback answers at once or is
/// down).
const BACKEND_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Largest chunk forwarded in one piece, in bytes.
const CHUNK_BYTES_MAX: usize = 64 * 1024;

/// The state of the link through one proxy, as every connection sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
struct Link {
    blackholed: bool,
    latency: Duration,
    /// Bumped by each [`Proxy::reset_connections`]: a connection opened under an older value
    /// resets itself.
    resets: u64,
}

/// What a proxy has seen, for the report.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ProxyStats {
    /// Connections accepted from clients.
    pub accepted: u64,
    /// Connections reset at once because the backend was down or refused.
    pub refused: u64,
    /// Open connections reset by [`Proxy::reset_connections`].
    pub reset_by_fault: u64,
}

struct Shared {
    backend: Mutex<Option<SocketAddr>>,
    link: watch::Sender<Link>,
    accepted: AtomicU64,
    refused: AtomicU64,
    reset_by_fault: AtomicU64,
    /// Connections being forwarded right now.
    open: AtomicU64,
}

/// One proxy, listening on `127.0.0.1` on a port the OS picked.
pub struct Proxy {
    name: String,
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept: tokio::task::JoinHandle<()>,
}

impl Proxy {
    /// Starts a proxy forwarding to `backend` (`None` while the server is down).
    pub async fn start(name: &str, backend: Option<SocketAddr>) -> std::io::Result<Proxy> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (link, _) = watch::channel(Link::default());
        let shared = Arc::new(Shared {
            backend: Mutex::new(backend),
            link,
            accepted: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            reset_by_fault: AtomicU64::new(0),
            open: AtomicU64::new(0),
        });
        let accept = tokio::spawn(accept_loop(listener, shared.clone()));
        Ok(Proxy {
            name: name.to_string(),
            addr,
            shared,
            accept,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The address everyone uses for the server behind this proxy.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Where new connections go from now on (`None`: the server is down, refuse them).
    pub fn set_backend(&self, backend: Option<SocketAddr>) {
        *self.shared.backend.lock().expect("proxy backend lock") = backend;
    }

    /// Partitions the server: nothing moves through the proxy until [`Proxy::heal`].
    pub fn blackhole(&self) {
        self.shared.link.send_modify(|l| l.blackholed = true);
    }

    /// Adds `latency` before every chunk forwarded (zero for none).
    pub fn set_latency(&self, latency: Duration) {
        self.shared.link.send_modify(|l| l.latency = latency);
    }

    /// Ends every fault of the link: no blackhole, no latency.
    pub fn heal(&self) {
        self.shared.link.send_modify(|l| {
            l.blackholed = false;
            l.latency = Duration::ZERO;
        });
    }

    /// Resets every open connection; returns how many were open.
    pub fn reset_connections(&self) -> u64 {
        let open = self.shared.open.load(Ordering::Relaxed);
        self.shared.link.send_modify(|l| l.resets += 1);
        self.shared
            .reset_by_fault
            .fetch_add(open, Ordering::Relaxed);
        open
    }

    pub fn stats(&self) -> ProxyStats {
        ProxyStats {
            accepted: self.shared.accepted.load(Ordering::Relaxed),
            refused: self.shared.refused.load(Ordering::Relaxed),
            reset_by_fault: self.shared.reset_by_fault.load(Ordering::Relaxed),
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.shared.link.send_modify(|l| l.resets += 1);
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let client = match listener.accept().await {
            Ok((client, _)) => client,
            Err(e) => {
                // Out of file descriptors and the like: wait rather than spin.
                tracing::warn!(error = %e, "proxy accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        shared.accepted.fetch_add(1, Ordering::Relaxed);
        tokio::spawn(connection(client, shared.clone()));
    }
}

/// Resets a connection: `SO_LINGER` 0, then close.
fn reset(stream: TcpStream) {
    let _ = stream.set_zero_linger();
    drop(stream);
}

async fn connection(mut client: TcpStream, shared: Arc<Shared>) {
    let mut link = shared.link.subscribe();
    let resets = link.borrow().resets;
    let _ = client.set_nodelay(true);
    // A partitioned server is unreachable: the connection stays silent until the link heals
    // (or a reset fault ends it).
    let healed = link
        .wait_for(|l| !l.blackholed || l.resets != resets)
        .await
        .map(|l| l.resets == resets);
    if !matches!(healed, Ok(true)) {
        return reset(client);
    }
    let backend = *shared.backend.lock().expect("proxy backend lock");
    let upstream = match backend {
        Some(addr) => tokio::time::timeout(BACKEND_CONNECT_TIMEOUT, TcpStream::connect(addr))
            .await
            .ok()
            .and_then(Result::ok),
        None => None,
    };
    let Some(mut upstream) = upstream else {
        shared.refused.fetch_add(1, Ordering::Relaxed);
        return reset(client);
    };
    let _ = upstream.set_nodelay(true);
    shared.open.fetch_add(1, Ordering::Relaxed);
    let end = {
        let (mut client_read, mut client_write) = client.split();
        let (mut upstream_read, mut upstream_write) = upstream.split();
        let mut reset_signal = shared.link.subscribe();
        tokio::select! {
            end = pump(&mut client_read, &mut upstream_write, shared.link.subscribe(), resets) => end,
            end = pump(&mut upstream_read, &mut client_write, shared.link.subscribe(), resets) => end,
            _ = reset_signal.wait_for(|l| l.resets != resets) => End::Failed,
        }
    };
    shared.open.fetch_sub(1, Ordering::Relaxed);
    match end {
        // One side closed: close both, as the peers would have seen a close.
        End::Closed => {}
        // One side was reset (or a reset fault): reset both, as the peers would have seen.
        End::Failed => {
            reset(client);
            reset(upstream);
        }
    }
}

/// How one direction of a connection ended.
enum End {
    /// End of stream: the sender closed.
    Closed,
    /// A read or write failed (the peer reset), or the link is gone.
    Failed,
}

/// Forwards one direction until end of stream, an error, or a reset fault (the caller's
/// select sees that one first).
async fn pump<R, W>(from: &mut R, to: &mut W, mut link: watch::Receiver<Link>, resets: u64) -> End
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; CHUNK_BYTES_MAX];
    loop {
        if link
            .wait_for(|l| !l.blackholed || l.resets != resets)
            .await
            .is_err()
        {
            return End::Failed;
        }
        let n = match from.read(&mut buf).await {
            Ok(0) => return End::Closed,
            Err(_) => return End::Failed,
            Ok(n) => n,
        };
        let latency = link.borrow().latency;
        if !latency.is_zero() {
            tokio::time::sleep(latency).await;
        }
        // A partition that began while the chunk was in flight holds it.
        if link
            .wait_for(|l| !l.blackholed || l.resets != resets)
            .await
            .is_err()
        {
            return End::Failed;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return End::Failed;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An echo server on loopback; returns its address.
    async fn echo_server() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let (mut r, mut w) = s.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        addr
    }

    /// Sends `msg` and reads the echo, or `None` if nothing came back within `within`.
    async fn round_trip(s: &mut TcpStream, msg: &[u8], within: Duration) -> Option<Vec<u8>> {
        s.write_all(msg).await.ok()?;
        let mut buf = vec![0u8; msg.len()];
        match tokio::time::timeout(within, s.read_exact(&mut buf)).await {
            Ok(Ok(_)) => Some(buf),
            _ => None,
        }
    }

    const QUICK: Duration = Duration::from_secs(5);
    const SILENCE: Duration = Duration::from_millis(300);

    #[tokio::test]
    async fn blackhole_blocks_traffic_and_heal_restores_it() {
        let proxy = Proxy::start("echo", Some(echo_server().await))
            .await
            .unwrap();
        let mut open = TcpStream::connect(proxy.addr()).await.unwrap();
        assert_eq!(
            round_trip(&mut open, b"before", QUICK).await.as_deref(),
            Some(&b"before"[..]),
            "a healthy proxy forwards"
        );

        proxy.blackhole();
        assert_eq!(
            round_trip(&mut open, b"during", SILENCE).await,
            None,
            "an open connection is silent while blackholed"
        );
        let mut fresh = TcpStream::connect(proxy.addr()).await.unwrap();
        assert_eq!(
            round_trip(&mut fresh, b"new", SILENCE).await,
            None,
            "a new connection is silent while blackholed"
        );

        proxy.heal();
        // The bytes sent during the partition were held, not lost.
        let mut buf = [0u8; 6];
        tokio::time::timeout(QUICK, open.read_exact(&mut buf))
            .await
            .expect("held bytes arrive after heal")
            .unwrap();
        assert_eq!(&buf, b"during");
        let mut buf = [0u8; 3];
        tokio::time::timeout(QUICK, fresh.read_exact(&mut buf))
            .await
            .expect("the new connection goes through after heal")
            .unwrap();
        assert_eq!(&buf, b"new");
        assert_eq!(
            round_trip(&mut open, b"after", QUICK).await.as_deref(),
            Some(&b"after"[..])
        );
    }

    #[tokio::test]
    async fn reset_closes_open_connections_and_a_down_backend_refuses() {
        let backend = echo_server().await;
        let proxy = Proxy::start("echo", Some(backend)).await.unwrap();
        let mut open = TcpStream::connect(proxy.addr()).await.unwrap();
        assert!(round_trip(&mut open, b"x", QUICK).await.is_some());
        assert_eq!(proxy.reset_connections(), 1, "one connection was open");
        let mut buf = [0u8; 1];
        let read = tokio::time::timeout(QUICK, open.read(&mut buf))
            .await
            .expect("a reset connection ends at once");
        assert!(matches!(read, Ok(0) | Err(_)), "read after reset: {read:?}");
        assert_eq!(proxy.stats().reset_by_fault, 1);

        proxy.set_backend(None);
        let mut refused = TcpStream::connect(proxy.addr()).await.unwrap();
        let read = tokio::time::timeout(QUICK, refused.read(&mut buf))
            .await
            .expect("a connection to a down server ends at once");
        assert!(matches!(read, Ok(0) | Err(_)), "read: {read:?}");

        proxy.set_backend(Some(backend));
        let mut again = TcpStream::connect(proxy.addr()).await.unwrap();
        assert!(
            round_trip(&mut again, b"y", QUICK).await.is_some(),
            "the restarted backend is reached again"
        );
        assert_eq!(proxy.stats().refused, 1);
    }

    #[tokio::test]
    async fn latency_delays_every_chunk() {
        let proxy = Proxy::start("echo", Some(echo_server().await))
            .await
            .unwrap();
        let mut s = TcpStream::connect(proxy.addr()).await.unwrap();
        proxy.set_latency(Duration::from_millis(150));
        let started = std::time::Instant::now();
        assert!(round_trip(&mut s, b"slow", QUICK).await.is_some());
        // Once each way.
        assert!(
            started.elapsed() >= Duration::from_millis(300),
            "took {:?}",
            started.elapsed()
        );
    }
}
