//! The chaos run's cluster: a coordinator and the banks as real processes (the harness's
//! [`Node`]), each behind its own fault-injecting [`Proxy`], and the execution of the fault
//! schedule against them.
//!
//! The proxies start first, so that the coordinator can be told (`--advertise`) to name its
//! proxy in every prepare: a bank's in-doubt queries then cross the proxy too. Branches and
//! saga steps name the banks' proxies. No process ever learns another's real port, so a
//! restart uses a fresh one ([`Node::start_on_fresh_port`]) and the proxy is pointed at it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::Node;

use super::proxy::Proxy;
use super::schedule::{bank_name, Fault, FaultKind, Target};
use super::workload::bank_accounts;
use super::ChaosError;

/// One server: its process and its proxy.
pub struct Server {
    pub target: Target,
    /// Locked while the process is killed, restarted or stopped.
    pub node: tokio::sync::Mutex<Node>,
    pub proxy: Proxy,
}

impl Server {
    /// SIGKILL; the proxy refuses connections until the restart.
    pub async fn kill(&self) {
        let mut node = self.node.lock().await;
        self.proxy.set_backend(None);
        node.kill().await;
    }

    /// Starts the process again on its data folder (if it is not running) and points the
    /// proxy at it.
    pub async fn ensure_running(&self) {
        let mut node = self.node.lock().await;
        if !node.is_running() {
            node.start_on_fresh_port(None).await;
        }
        self.proxy.set_backend(Some(backend_addr(&node)));
    }

    /// Stops the process gracefully (SIGTERM), so its folder can be read.
    pub async fn stop(&self) {
        let mut node = self.node.lock().await;
        self.proxy.set_backend(None);
        node.stop().await;
    }

    pub async fn dir(&self) -> PathBuf {
        self.node.lock().await.dir.clone()
    }
}

fn backend_addr(node: &Node) -> std::net::SocketAddr {
    node.addr().parse().expect("a node's address is host:port")
}

/// Counts of the faults carried out, for the report and the progress line.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FaultCounts {
    /// SIGKILLs (each followed by a restart), by server name.
    pub kills: BTreeMap<String, u64>,
    pub partitions: u64,
    /// Reset faults, and the connections they reset.
    pub resets: u64,
    pub connections_reset: u64,
    pub latency_windows: u64,
}

impl FaultCounts {
    pub fn total_kills(&self) -> u64 {
        self.kills.values().sum()
    }

    /// `3 kills, 2 partitions, 4 resets (17 connections), 2 latency windows`.
    pub fn summary(&self) -> String {
        format!(
            "{} kills, {} partitions, {} resets ({} connections), {} latency windows",
            self.total_kills(),
            self.partitions,
            self.resets,
            self.connections_reset,
            self.latency_windows
        )
    }
}

/// The servers of one run.
pub struct Cluster {
    pub coordinator: Server,
    pub banks: Vec<Server>,
    pub faults: Mutex<FaultCounts>,
    /// One line per fault carried out, with the time it really started.
    pub fault_log: Mutex<Vec<String>>,
}

impl Cluster {
    /// Starts the proxies, the coordinator and `banks` banks, each in a folder under `dir`.
    pub async fn start(dir: &Path, banks: usize) -> Result<Cluster, ChaosError> {
        let coordinator_proxy = Proxy::start("coordinator", None).await?;
        let advertise = coordinator_proxy.addr().to_string();
        let node = Node::coordinator_with_args(
            &dir.join("coordinator"),
            &["--advertise", &advertise],
            None,
        )
        .await;
        coordinator_proxy.set_backend(Some(backend_addr(&node)));
        let coordinator = Server {
            target: Target::Coordinator,
            node: tokio::sync::Mutex::new(node),
            proxy: coordinator_proxy,
        };
        let mut servers = Vec::new();
        for bank in 0..banks {
            let name = bank_name(bank);
            let (accounts, closed) = bank_accounts(bank);
            let node =
                Node::bank_with_closed(&name, &dir.join(&name), &accounts, &closed, None).await;
            let proxy = Proxy::start(&name, Some(backend_addr(&node))).await?;
            servers.push(Server {
                target: Target::Bank(bank),
                node: tokio::sync::Mutex::new(node),
                proxy,
            });
        }
        Ok(Cluster {
            coordinator,
            banks: servers,
            faults: Mutex::new(FaultCounts::default()),
            fault_log: Mutex::new(Vec::new()),
        })
    }

    pub fn server(&self, target: Target) -> &Server {
        match target {
            Target::Coordinator => &self.coordinator,
            Target::Bank(i) => &self.banks[i],
        }
    }

    pub fn servers(&self) -> impl Iterator<Item = &Server> {
        std::iter::once(&self.coordinator).chain(self.banks.iter())
    }

    /// The coordinator's proxy address (what clients use).
    pub fn coordinator_addr(&self) -> String {
        self.coordinator.proxy.addr().to_string()
    }

    /// Each bank's proxy address (what branches and steps name).
    pub fn bank_addrs(&self) -> Vec<String> {
        self.banks
            .iter()
            .map(|b| b.proxy.addr().to_string())
            .collect()
    }

    pub fn fault_counts(&self) -> FaultCounts {
        self.faults.lock().expect("fault counts lock").clone()
    }

    fn count(&self, f: impl FnOnce(&mut FaultCounts)) {
        f(&mut self.faults.lock().expect("fault counts lock"));
    }

    /// Carries out `faults` (all on one server, in order), each at its time since `started`.
    pub async fn run_faults(&self, faults: Vec<Fault>, started: Instant) {
        for fault in faults {
            tokio::time::sleep_until((started + fault.at).into()).await;
            let server = self.server(fault.target);
            let late = started.elapsed().saturating_sub(fault.at);
            self.fault_log.lock().expect("fault log lock").push(format!(
                "{fault} (started {:.2}s)",
                (fault.at + late).as_secs_f64()
            ));
            match fault.kind {
                FaultKind::Kill { down } => {
                    server.kill().await;
                    self.count(|c| *c.kills.entry(fault.target.to_string()).or_default() += 1);
                    tokio::time::sleep(down).await;
                    server.ensure_running().await;
                }
                FaultKind::Partition { length } => {
                    server.proxy.blackhole();
                    self.count(|c| c.partitions += 1);
                    tokio::time::sleep(length).await;
                    server.proxy.heal();
                }
                FaultKind::ResetConnections => {
                    let n = server.proxy.reset_connections();
                    self.count(|c| {
                        c.resets += 1;
                        c.connections_reset += n;
                    });
                }
                FaultKind::Latency { latency, length } => {
                    server.proxy.set_latency(latency);
                    self.count(|c| c.latency_windows += 1);
                    tokio::time::sleep(length).await;
                    server.proxy.set_latency(Duration::ZERO);
                }
            }
        }
    }

    /// Ends every fault: heals every proxy and starts whatever is down.
    pub async fn heal_all(&self) {
        for server in self.servers() {
            server.proxy.heal();
            server.ensure_running().await;
        }
    }

    /// Stops every process gracefully.
    pub async fn stop_all(&self) {
        for server in self.servers() {
            server.stop().await;
        }
    }
}
