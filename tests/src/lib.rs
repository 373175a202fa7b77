//! Harness for Tandem's end-to-end suites: real `tandem` and `tandem-bank` processes on
//! loopback, each on its own temp folder, killed and restarted at will.
//!
//! - [`binaries`] builds the two binaries once per test process (same profile and target
//!   folder as the tests) and returns their paths, so `cargo test --workspace` alone suffices;
//! - [`Node`] is one server process: started on port 0 (the OS picks the port), restarted on
//!   the same port (peers stored its address in their logs), optionally armed with a
//!   `TANDEM_CRASH_AT` crash point;
//! - [`Cluster`]: a coordinator and two banks, each in its own folder of one temp folder;
//! - helpers to run transfers, wait for a transaction to finish, and read balances from a
//!   stopped bank's folder.
//!
//! Every wait here is bounded; a test never hangs on a dead process.

pub mod chaos;
pub mod scripted_participant;
pub mod sim;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use tandem_common::child::ChildServer;
use tandem_participant::{bank, Branch, Outcome, TandemClient, TxnId};
use tandem_proto::v1 as pb;

/// How long a server may take to start listening.
pub const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a test waits for a transaction to finish after its faults healed.
pub const SETTLE_TIMEOUT: Duration = Duration::from_secs(60);

pub struct Binaries {
    pub tandem: PathBuf,
    pub bank: PathBuf,
}

/// Builds `tandem` and `tandem-bank` (once per process) and returns their paths.
pub fn binaries() -> &'static Binaries {
    static BINARIES: OnceLock<Binaries> = OnceLock::new();
    BINARIES.get_or_init(|| {
        let exe = std::env::current_exe().expect("test executable path");
        // <target>/<profile>/deps/<test binary>, or <target>/<profile>/<binary> for the
        // binaries of this crate (the chaos run).
        let mut profile_dir = exe
            .parent()
            .expect("folder of the executable")
            .to_path_buf();
        if profile_dir.file_name().is_some_and(|n| n == "deps") {
            profile_dir = profile_dir
                .parent()
                .expect("target/<profile> folder")
                .to_path_buf();
        }
        let target_dir = profile_dir.parent().expect("target folder").to_path_buf();
        let release = profile_dir.file_name().is_some_and(|n| n == "release");
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut build = std::process::Command::new(cargo);
        build
            .args([
                "build",
                "--quiet",
                "-p",
                "tandem-coordinator",
                "--bin",
                "tandem",
                "-p",
                "tandem-participant",
                "--bin",
                "tandem-bank",
            ])
            .arg("--target-dir")
            .arg(&target_dir)
            .current_dir(env!("CARGO_MANIFEST_DIR"));
        // Cargo gives this test process the package's variables (CARGO_PKG_NAME, ...). Build
        // scripts that declare `rerun-if-env-changed` on them (ring's does) would see them
        // changed and rebuild ring, rustls and tonic on every test run, so the nested build
        // gets the environment an ordinary `cargo build` has.
        for (name, _) in std::env::vars_os() {
            let name = name.to_string_lossy();
            if name.starts_with("CARGO_PKG_")
                || name.starts_with("CARGO_MANIFEST_")
                || matches!(
                    name.as_ref(),
                    "CARGO_CRATE_NAME"
                        | "CARGO_PRIMARY_PACKAGE"
                        | "CARGO_TARGET_TMPDIR"
                        | "OUT_DIR"
                )
            {
                build.env_remove(name.as_ref());
            }
        }
        if release {
            build.arg("--release");
        }
        let status = build
            .status()
            .expect("running cargo build for the binaries");
        assert!(
            status.success(),
            "building tandem and tandem-bank failed: {status}"
        );
        let binaries = Binaries {
            tandem: profile_dir.join("tandem"),
            bank: profile_dir.join("tandem-bank"),
        };
        assert!(
            binaries.tandem.exists() && binaries.bank.exists(),
            "binaries missing in {}",
            profile_dir.display()
        );
        binaries
    })
}

#[derive(Debug, Clone)]
enum Kind {
    /// A coordinator, with extra `tandem serve` arguments.
    Coordinator { args: Vec<String> },
    Bank {
        accounts: String,
        /// Extra `tandem-bank serve` arguments.
        args: Vec<String>,
    },
}

/// One server process and its data folder.
pub struct Node {
    kind: Kind,
    pub name: String,
    pub dir: PathBuf,
    port: u16,
    server: Option<ChildServer>,
}

impl Node {
    /// A coordinator on a fresh port with its log in `dir`.
    pub async fn coordinator(dir: &Path, crash_at: Option<&str>) -> Node {
        Node::coordinator_with_args(dir, &[], crash_at).await
    }

    /// A coordinator on a fresh port with its log in `dir` and extra `tandem serve` arguments
    /// (for example `["--allow-participants", "127.0.0.1"]`), kept across restarts.
    pub async fn coordinator_with_args(dir: &Path, args: &[&str], crash_at: Option<&str>) -> Node {
        let mut node = Node {
            kind: Kind::Coordinator {
                args: args.iter().map(|a| a.to_string()).collect(),
            },
            name: "coordinator".into(),
            dir: dir.to_path_buf(),
            port: 0,
            server: None,
        };
        node.start(crash_at).await;
        node
    }

    /// A bank on a fresh port with `accounts` (e.g. "alice=100,bob=50") in `dir`.
    pub async fn bank(name: &str, dir: &Path, accounts: &str, crash_at: Option<&str>) -> Node {
        Node::bank_with_args(name, dir, accounts, &[], crash_at).await
    }

    /// A bank as [`Node::bank`] makes it, with extra `tandem-bank serve` arguments (for
    /// example `["--retention", "1s"]` or TLS files), kept across restarts.
    pub async fn bank_with_args(
        name: &str,
        dir: &Path,
        accounts: &str,
        args: &[&str],
        crash_at: Option<&str>,
    ) -> Node {
        let mut node = Node {
            kind: Kind::Bank {
                accounts: accounts.into(),
                args: args.iter().map(|a| a.to_string()).collect(),
            },
            name: name.into(),
            dir: dir.to_path_buf(),
            port: 0,
            server: None,
        };
        node.start(crash_at).await;
        node
    }

    /// A bank as [`Node::bank`], with the accounts named in `closed` (e.g. "carol,dave")
    /// marked closed: they refuse credits.
    pub async fn bank_with_closed(
        name: &str,
        dir: &Path,
        accounts: &str,
        closed: &str,
        crash_at: Option<&str>,
    ) -> Node {
        let args: &[&str] = if closed.is_empty() {
            &[]
        } else {
            &["--closed", closed]
        };
        Node::bank_with_args(name, dir, accounts, args, crash_at).await
    }

    /// Starts the process (again), on the port it had, optionally armed with a crash point.
    pub async fn start(&mut self, crash_at: Option<&str>) {
        assert!(self.server.is_none(), "{} is already running", self.name);
        let bins = binaries();
        let listen = format!("127.0.0.1:{}", self.port);
        let mut command = match &self.kind {
            Kind::Coordinator { args } => {
                let mut c = tokio::process::Command::new(&bins.tandem);
                c.args(["serve", "--listen", &listen, "--data-dir"])
                    .arg(&self.dir)
                    .args(args);
                c
            }
            Kind::Bank { accounts, args } => {
                let mut c = tokio::process::Command::new(&bins.bank);
                c.args([
                    "serve",
                    "--listen",
                    &listen,
                    "--accounts",
                    accounts,
                    "--data-dir",
                ])
                .arg(&self.dir)
                .args(args);
                c
            }
        };
        command.env_remove(tandem_common::crash::CRASH_AT_ENV);
        if let Some(point) = crash_at {
            command.env(tandem_common::crash::CRASH_AT_ENV, point);
        }
        let server = ChildServer::spawn(command, &self.name, START_TIMEOUT)
            .await
            .unwrap_or_else(|e| panic!("starting {} on {listen}: {e}", self.name));
        self.port = server.addr.port();
        self.server = Some(server);
    }

    /// Starts the process (again) on a port the OS picks, for peers that reach it through
    /// a proxy and so never stored its address (the chaos run).
    pub async fn start_on_fresh_port(&mut self, crash_at: Option<&str>) {
        self.port = 0;
        self.start(crash_at).await;
    }

    /// Whether the process is running (started and not killed or stopped since).
    pub fn is_running(&self) -> bool {
        self.server.is_some()
    }

    /// `127.0.0.1:port`.
    pub fn addr(&self) -> String {
        assert_ne!(self.port, 0, "{} never started", self.name);
        format!("127.0.0.1:{}", self.port)
    }

    /// The resident memory of the running process, in KiB (from `/proc/<pid>/status`).
    pub fn resident_kib(&self) -> u64 {
        let pid = self
            .server
            .as_ref()
            .and_then(ChildServer::pid)
            .unwrap_or_else(|| panic!("{} is not running", self.name));
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
            .unwrap_or_else(|e| panic!("reading /proc/{pid}/status of {}: {e}", self.name));
        status
            .lines()
            .find_map(|line| line.strip_prefix("VmRSS:"))
            .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or_else(|| panic!("no VmRSS line for {} in {status}", self.name))
    }

    /// Kills the process at once (SIGKILL).
    pub async fn kill(&mut self) {
        if let Some(mut server) = self.server.take() {
            server.kill().await;
        }
    }

    /// Stops the process gracefully (SIGTERM), killing it if it does not exit in 10 s.
    pub async fn stop(&mut self) {
        if let Some(mut server) = self.server.take() {
            if server.terminate(Duration::from_secs(10)).await.is_none() {
                server.kill().await;
            }
        }
    }

    /// Stops the process gracefully (SIGTERM) and returns how it exited, or `None` if it did
    /// not exit within `timeout` (it is then killed).
    pub async fn terminate(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let mut server = self.server.take()?;
        let status = server.terminate(timeout).await;
        if status.is_none() {
            server.kill().await;
        }
        status
    }

    /// Waits for the process to die at its crash point; panics if it does not.
    pub async fn expect_crash(&mut self, point: &str) -> ExitStatus {
        let mut server = self
            .server
            .take()
            .unwrap_or_else(|| panic!("{} is not running", self.name));
        let status = server
            .wait(Duration::from_secs(30))
            .await
            .unwrap_or_else(|| panic!("{} did not crash at {point} within 30 s", self.name));
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(
            status.signal(),
            Some(libc_sigabrt()),
            "{} exited with {status}, not at crash point {point}",
            self.name
        );
        status
    }

    /// Committed balances of a stopped bank, read from its folder.
    pub fn balances(&self) -> BTreeMap<String, i64> {
        assert!(
            self.server.is_none(),
            "stop {} before reading its folder",
            self.name
        );
        bank::balances_in(&self.dir)
            .unwrap_or_else(|e| panic!("reading {}'s balances: {e}", self.name))
    }
}

fn libc_sigabrt() -> i32 {
    6
}

/// A client of the coordinator at `addr`, retrying the connection for a while (the
/// coordinator may be starting).
pub async fn client(addr: &str) -> TandemClient {
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        match TandemClient::connect(addr).await {
            Ok(client) => return client,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("cannot connect to the coordinator at {addr}: {e}"),
        }
    }
}

/// The branches of a transfer of `amount` from `from`'s account to `to`'s account.
pub fn transfer(from: (&Node, &str), to: (&Node, &str), amount: i64) -> Vec<Branch> {
    bank::transfer_branches((&from.0.addr(), from.1), (&to.0.addr(), to.1), amount)
}

/// Waits until the coordinator reports `txn` finished (every participant acknowledged) and
/// returns its outcome.
pub async fn wait_finished(client: &mut TandemClient, txn: &TxnId) -> Outcome {
    let deadline = Instant::now() + SETTLE_TIMEOUT;
    let mut last = String::new();
    while Instant::now() < deadline {
        match client.get(txn).await {
            Ok(status) => {
                match pb::TxnPhase::try_from(status.phase) {
                    Ok(pb::TxnPhase::Committed) => return Outcome::Committed,
                    Ok(pb::TxnPhase::Aborted) => {
                        return Outcome::Aborted {
                            reason: status.reason,
                        }
                    }
                    _ => {}
                }
                last = format!("{status:?}");
            }
            Err(e) => last = e.to_string(),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("transaction {txn} did not finish within {SETTLE_TIMEOUT:?}; last seen: {last}");
}

/// Retries `execute_2pc_with` with the same id until the coordinator answers (it may be
/// restarting), and returns the outcome.
pub async fn execute_until_answered(addr: &str, txn: &TxnId, branches: Vec<Branch>) -> Outcome {
    let deadline = Instant::now() + SETTLE_TIMEOUT;
    loop {
        let mut c = client(addr).await;
        match c.execute_2pc_with(txn, branches.clone(), None).await {
            Ok(outcome) => return outcome,
            Err(e) if e.is_retryable() && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("transaction {txn}: {e}"),
        }
    }
}

/// A bare gRPC client of the coordinator at `addr` (no retries, every status as it comes).
pub async fn raw_coordinator(
    addr: &str,
) -> pb::coordinator_client::CoordinatorClient<tonic::transport::Channel> {
    pb::coordinator_client::CoordinatorClient::connect(format!("http://{addr}"))
        .await
        .unwrap_or_else(|e| panic!("connecting to the coordinator at {addr}: {e}"))
}

/// A new, well-formed transaction or saga id.
pub fn fresh_id() -> String {
    TxnId::generate(tandem_common::unix_now_ms()).to_string()
}

/// The total of a set of balances.
pub fn total(balances: &[&BTreeMap<String, i64>]) -> i64 {
    balances.iter().flat_map(|b| b.values()).sum()
}

/// A coordinator (with extra `tandem serve` arguments) and two banks, `a` and `b`, each in its
/// own folder of one temp folder that lives as long as the cluster.
pub struct Cluster {
    _dir: tempfile::TempDir,
    pub coordinator: Node,
    pub a: Node,
    pub b: Node,
}

impl Cluster {
    /// Starts the coordinator with `coordinator_args`, then bank `a` with `accounts_a` and
    /// bank `b` with `accounts_b` (e.g. "alice=100,bob=50").
    pub async fn start(coordinator_args: &[&str], accounts_a: &str, accounts_b: &str) -> Cluster {
        let dir = tempfile::tempdir().expect("a temp folder");
        let coordinator =
            Node::coordinator_with_args(&dir.path().join("coordinator"), coordinator_args, None)
                .await;
        let a = Node::bank("bank-a", &dir.path().join("bank-a"), accounts_a, None).await;
        let b = Node::bank("bank-b", &dir.path().join("bank-b"), accounts_b, None).await;
        Cluster {
            _dir: dir,
            coordinator,
            a,
            b,
        }
    }

    /// Stops both banks and returns their committed balances (a's, then b's).
    pub async fn stop_banks(&mut self) -> (BTreeMap<String, i64>, BTreeMap<String, i64>) {
        self.a.stop().await;
        self.b.stop().await;
        (self.a.balances(), self.b.balances())
    }
}
