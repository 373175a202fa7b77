//! Tandem servers as child processes, for benchmarks and end-to-end tests.
//!
//! Every Tandem server (`tandem serve`, `tandem-bank serve`) prints one line
//! `... listening on <addr>` on stdout once it has bound its listener. [`ChildServer::spawn`]
//! starts the command, waits (bounded) for that line and returns the bound address, so
//! callers can pass `--listen 127.0.0.1:0` and never pick ports themselves. Lines printed
//! before it (such as `tandem metrics serving on <addr>`) are kept in
//! [`ChildServer::preamble`]. The child is killed when the handle is dropped.

use std::net::SocketAddr;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// The marker a server prints before its bound address.
pub const LISTENING_MARKER: &str = "listening on ";
/// Most lines kept from before the listening line.
pub const PREAMBLE_LINES_MAX: usize = 64;

/// A running server process.
pub struct ChildServer {
    pub name: String,
    pub addr: SocketAddr,
    /// The lines the server printed before its listening line (at most
    /// [`PREAMBLE_LINES_MAX`]).
    pub preamble: Vec<String>,
    child: Child,
}

impl ChildServer {
    /// Starts `command` and waits up to `timeout` for its "listening on" line.
    pub async fn spawn(
        mut command: Command,
        name: &str,
        timeout: Duration,
    ) -> std::io::Result<Self> {
        command
            .stdout(Stdio::piped())
            .stdin(Stdio::null())
            .kill_on_drop(true);
        let mut child = command.spawn()?;
        let stdout = child.stdout.take().expect("stdout was piped");
        let mut lines = BufReader::new(stdout).lines();
        let mut preamble = Vec::new();
        let found = tokio::time::timeout(timeout, async {
            while let Some(line) = lines.next_line().await? {
                if let Some((_, addr)) = line.split_once(LISTENING_MARKER) {
                    return addr.trim().parse::<SocketAddr>().map_err(|e| {
                        std::io::Error::other(format!("{name}: bad address in {line:?}: {e}"))
                    });
                }
                if preamble.len() < PREAMBLE_LINES_MAX {
                    preamble.push(line);
                }
            }
            Err(std::io::Error::other(format!(
                "{name} exited before it was listening"
            )))
        })
        .await;
        let addr = match found {
            Ok(Ok(addr)) => addr,
            Ok(Err(e)) => {
                let _ = child.kill().await;
                return Err(e);
            }
            Err(_) => {
                let _ = child.kill().await;
                return Err(std::io::Error::other(format!(
                    "{name} was not listening after {timeout:?}"
                )));
            }
        };
        // Keep draining stdout so the child never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Ok(ChildServer {
            name: name.to_string(),
            addr,
            preamble,
            child,
        })
    }

    /// `host:port` of the server.
    pub fn address(&self) -> String {
        self.addr.to_string()
    }

    /// The process id, while the process has not been reaped.
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Kills the process at once (SIGKILL) and waits for it.
    pub async fn kill(&mut self) {
        let _ = self.child.kill().await;
    }

    /// Asks the process to stop (SIGTERM) and waits up to `timeout` for it to exit.
    pub async fn terminate(&mut self, timeout: Duration) -> Option<ExitStatus> {
        if let Some(pid) = self.child.id() {
            // SAFETY: sending a signal to our own child, whose pid we hold and have not reaped.
            unsafe {
                libc::kill(pid as i32, libc::SIGTERM);
            }
        }
        self.wait(timeout).await
    }

    /// Waits up to `timeout` for the process to exit by itself (for example at a crash point).
    pub async fn wait(&mut self, timeout: Duration) -> Option<ExitStatus> {
        tokio::time::timeout(timeout, self.child.wait())
            .await
            .ok()
            .and_then(Result::ok)
    }
}
