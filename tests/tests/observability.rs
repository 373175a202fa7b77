//! End-to-end checks of what an operator watches, with real processes on loopback:
//!
//! - Prometheus metrics (`tandem serve --metrics-listen`): after a known mix of 2PC transfers
//!   (committed and aborted) and saga transfers (completed and compensated), the counters say
//!   exactly that, the latency and flush histograms moved, nothing is left in flight, and the
//!   log's size is reported;
//! - JSON logs (`--log-format json` on the coordinator, `TANDEM_LOG_FORMAT=json` on the banks):
//!   every stderr line is a JSON object, every line that names a transaction or saga does so in
//!   a span's fields (`txn` or `saga`), and the trace id the client sent in `traceparent` is on
//!   the spans of the coordinator and of every participant that took part;
//! - a malformed `traceparent` is ignored, not refused.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde_json::Value;
use tandem_common::child::ChildServer;
use tandem_participant::{bank, Outcome, Saga, SagaOutcome, TandemClient, TraceContext, TxnId};
use tandem_tests::{binaries, client, START_TIMEOUT};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The coordinator's and the participants' own debug lines, without the libraries' chatter.
const LOG_FILTER: &str = "warn,tandem_coordinator=debug,tandem_participant=debug";
const WAIT: Duration = Duration::from_secs(20);

/// A coordinator with metrics and JSON logs and two banks with JSON logs, each process's
/// stderr in a file.
struct Cluster {
    dir: tempfile::TempDir,
    coordinator: ChildServer,
    metrics_addr: String,
    a: ChildServer,
    b: ChildServer,
}

fn stderr_file(dir: &Path, name: &str) -> Stdio {
    Stdio::from(std::fs::File::create(dir.join(format!("{name}.stderr"))).unwrap())
}

impl Cluster {
    async fn start() -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let bins = binaries();
        let mut coordinator = tokio::process::Command::new(&bins.tandem);
        coordinator
            .args(["--log-format", "json", "serve", "--listen", "127.0.0.1:0"])
            .args(["--metrics-listen", "127.0.0.1:0", "--data-dir"])
            .arg(dir.path().join("coordinator"))
            .env("RUST_LOG", LOG_FILTER)
            .env_remove(tandem_common::logging::LOG_FORMAT_ENV)
            .stderr(stderr_file(dir.path(), "coordinator"));
        let coordinator = ChildServer::spawn(coordinator, "coordinator", START_TIMEOUT)
            .await
            .unwrap();
        let metrics_addr = coordinator
            .preamble
            .iter()
            .find_map(|line| line.strip_prefix("tandem metrics serving on "))
            .unwrap_or_else(|| panic!("no metrics address in {:?}", coordinator.preamble))
            .to_string();
        let bank = |name: &str, accounts: &str, closed: &str| {
            let mut command = tokio::process::Command::new(&bins.bank);
            command
                .args(["serve", "--listen", "127.0.0.1:0", "--accounts", accounts])
                .args(["--closed", closed, "--data-dir"])
                .arg(dir.path().join(name))
                .env("RUST_LOG", LOG_FILTER)
                .env(tandem_common::logging::LOG_FORMAT_ENV, "json")
                .stderr(stderr_file(dir.path(), name));
            command
        };
        let a = ChildServer::spawn(bank("bank-a", "alice=1000", ""), "bank-a", START_TIMEOUT)
            .await
            .unwrap();
        let b = ChildServer::spawn(
            bank("bank-b", "bob=0,carol=0", "carol"),
            "bank-b",
            START_TIMEOUT,
        )
        .await
        .unwrap();
        Cluster {
            dir,
            coordinator,
            metrics_addr,
            a,
            b,
        }
    }

    async fn client(&self) -> TandemClient {
        client(&self.coordinator.address()).await
    }

    fn transfer(&self, to: &str, amount: i64) -> Vec<tandem_participant::Branch> {
        bank::transfer_branches(
            (&self.a.address(), "alice"),
            (&self.b.address(), to),
            amount,
        )
    }

    fn saga(&self, to: &str, amount: i64) -> Saga {
        Saga::sequence(bank::transfer_saga_steps(
            (&self.a.address(), "alice"),
            (&self.b.address(), to),
            amount,
        ))
    }

    /// Stops every process (so their logs are complete) and returns the stderr file paths.
    async fn stop(&mut self) -> [(String, PathBuf); 3] {
        for server in [&mut self.coordinator, &mut self.a, &mut self.b] {
            if server.terminate(Duration::from_secs(10)).await.is_none() {
                server.kill().await;
            }
        }
        ["coordinator", "bank-a", "bank-b"].map(|name| {
            (
                name.to_string(),
                self.dir.path().join(format!("{name}.stderr")),
            )
        })
    }
}

/// `GET /metrics` over a plain HTTP/1.1 connection; returns the body.
async fn scrape(addr: &str) -> String {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: tandem\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut answer = String::new();
    tokio::time::timeout(WAIT, stream.read_to_string(&mut answer))
        .await
        .expect("the metrics endpoint answered in time")
        .unwrap();
    let (head, body) = answer.split_once("\r\n\r\n").expect("an HTTP answer");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    body.to_string()
}

/// The value of one series (`name{labels}` exactly as rendered) in a scrape.
fn series(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no series {series} in:\n{text}"))
        .parse()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_each_outcome_and_show_latency_flushes_and_storage() {
    let mut cluster = Cluster::start().await;
    let mut client = cluster.client().await;
    // Three transfers commit; one aborts (alice cannot pay 10,000).
    for amount in [10, 20, 30, 10_000] {
        let outcome = client
            .execute_2pc(cluster.transfer("bob", amount))
            .await
            .unwrap();
        assert_eq!(
            matches!(outcome, Outcome::Committed),
            amount < 10_000,
            "transfer of {amount}: {outcome:?}"
        );
    }
    // One saga completes; one is compensated (carol's account is closed).
    for (to, completes) in [("bob", true), ("carol", false)] {
        let id = client.submit_saga(cluster.saga(to, 5)).await.unwrap();
        let state = client.wait(&id, WAIT).await.unwrap();
        assert_eq!(
            matches!(state.outcome(), Some(SagaOutcome::Completed)),
            completes,
            "saga to {to}: {state:?}"
        );
    }

    // Deliveries finish shortly after the clients are answered.
    let deadline = Instant::now() + WAIT;
    let text = loop {
        let text = scrape(&cluster.metrics_addr).await;
        let in_flight = series(&text, "tandem_transactions_in_flight{kind=\"2pc\"}")
            + series(&text, "tandem_transactions_in_flight{kind=\"saga\"}");
        if in_flight == 0.0 || Instant::now() > deadline {
            break text;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let v = |name: &str| series(&text, name);
    assert_eq!(
        v("tandem_transactions_in_flight{kind=\"2pc\"}"),
        0.0,
        "{text}"
    );
    assert_eq!(
        v("tandem_transactions_in_flight{kind=\"saga\"}"),
        0.0,
        "{text}"
    );
    assert_eq!(v("tandem_transactions_started_total{kind=\"2pc\"}"), 4.0);
    assert_eq!(
        v("tandem_transactions_finished_total{kind=\"2pc\",outcome=\"committed\"}"),
        3.0
    );
    assert_eq!(
        v("tandem_transactions_finished_total{kind=\"2pc\",outcome=\"aborted\"}"),
        1.0
    );
    assert_eq!(v("tandem_transactions_started_total{kind=\"saga\"}"), 2.0);
    assert_eq!(
        v("tandem_transactions_finished_total{kind=\"saga\",outcome=\"completed\"}"),
        1.0
    );
    assert_eq!(
        v("tandem_transactions_finished_total{kind=\"saga\",outcome=\"compensated\"}"),
        1.0
    );
    assert_eq!(
        v("tandem_transactions_finished_total{kind=\"saga\",outcome=\"aborted\"}"),
        0.0
    );
    assert_eq!(v("tandem_transactions_recovered_total{kind=\"2pc\"}"), 0.0);
    assert_eq!(
        v("tandem_transaction_duration_seconds_count{kind=\"2pc\"}"),
        4.0
    );
    assert_eq!(
        v("tandem_transaction_duration_seconds_count{kind=\"saga\"}"),
        2.0
    );
    assert!(v("tandem_transaction_duration_seconds_sum{kind=\"2pc\"}") > 0.0);
    assert_eq!(v("tandem_prepare_round_seconds_count"), 4.0);
    // Every 2PC decision and every saga's spec and outcome were forced.
    assert!(v("tandem_log_flush_seconds_count") >= 1.0, "{text}");
    assert!(v("tandem_log_flush_batch_size_count") >= 1.0, "{text}");
    assert!(
        v("tandem_log_flush_batch_size_sum") >= 4.0 + 2.0 * 2.0,
        "fewer forced writes than decisions, specs and saga outcomes:\n{text}"
    );
    assert_eq!(v("tandem_sagas_stuck"), 0.0);
    assert!(v("tandem_log_size_bytes") > 0.0, "{text}");
    assert_eq!(v("tandem_retries_total{kind=\"decision\"}"), 0.0);
    cluster.stop().await;
}

/// Every line of `path`, parsed; panics naming the line that is not a JSON object.
fn json_lines(name: &str, path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap();
    text.lines()
        .filter(|line| !line.trim().is_empty())
        .map(|line| {
            let value: Value = serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("{name}: a log line is not JSON ({e}): {line}"));
            assert!(value.is_object(), "{name}: {line}");
            value
        })
        .collect()
}

/// Whether one of the line's spans has `field` equal to `value`.
fn in_span_with(line: &Value, field: &str, value: &str) -> bool {
    line["spans"]
        .as_array()
        .is_some_and(|spans| spans.iter().any(|span| span[field] == value))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_name_the_transaction_on_spans_and_carry_the_clients_trace_id() {
    let mut cluster = Cluster::start().await;
    let mut client = cluster.client().await;
    let trace_2pc =
        TraceContext::parse("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01").unwrap();
    let trace_saga =
        TraceContext::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01").unwrap();
    let txn = TandemClient::new_txn_id();
    let outcome = client
        .execute_2pc_traced(&txn, cluster.transfer("bob", 7), None, Some(trace_2pc))
        .await
        .unwrap();
    assert_eq!(outcome, Outcome::Committed);
    let saga = client
        .submit_saga(cluster.saga("bob", 3).trace(trace_saga))
        .await
        .unwrap();
    let state = client.wait(&saga, WAIT).await.unwrap();
    assert!(
        matches!(state.outcome(), Some(SagaOutcome::Completed)),
        "{state:?}"
    );
    // A malformed traceparent is ignored: the transaction runs under a trace of its own.
    let mut raw = tandem_proto::v1::coordinator_client::CoordinatorClient::connect(format!(
        "http://{}",
        cluster.coordinator.address()
    ))
    .await
    .unwrap();
    let mut request = tonic::Request::new(tandem_proto::v1::Execute2pcRequest {
        txn_id: TandemClient::new_txn_id().to_string(),
        branches: cluster
            .transfer("bob", 1)
            .into_iter()
            .map(|b| tandem_proto::v1::Branch {
                participant: b.participant,
                resource: b.resource,
                payload: b.payload,
            })
            .collect(),
        timeout_ms: 0,
    });
    request
        .metadata_mut()
        .insert("traceparent", "ff-not-a-trace".parse().unwrap());
    let answer = raw.execute2pc(request).await.unwrap().into_inner();
    assert_eq!(answer.outcome, tandem_proto::v1::Outcome::Committed as i32);
    // Let the last acknowledgements land before stopping.
    wait_finished(&mut client, &txn).await;

    let files = cluster.stop().await;
    let (txn, saga) = (txn.to_string(), saga.to_string());
    let trace_ids = (
        trace_2pc.trace_id_hex().to_string(),
        trace_saga.trace_id_hex().to_string(),
    );
    for (name, path) in &files {
        let lines = json_lines(name, path);
        assert!(!lines.is_empty(), "{name} logged nothing at debug level");
        for (id, field, trace_id) in [(&txn, "txn", &trace_ids.0), (&saga, "saga", &trace_ids.1)] {
            let about: Vec<&Value> = lines
                .iter()
                .filter(|line| line.to_string().contains(id.as_str()))
                .collect();
            assert!(!about.is_empty(), "{name} logged nothing about {id}");
            for line in &about {
                assert!(
                    in_span_with(line, field, id),
                    "{name}: a line about {id} is not in a span with {field}={id}: {line}"
                );
            }
            assert!(
                about
                    .iter()
                    .any(|line| in_span_with(line, "trace_id", trace_id)),
                "{name}: no line about {id} carries the client's trace id {trace_id}:\n{}",
                about
                    .iter()
                    .map(|l| l.to_string())
                    .collect::<Vec<_>>()
                    .join("\n")
            );
        }
    }
}

/// Waits until the coordinator reports `txn` finished.
async fn wait_finished(client: &mut TandemClient, txn: &TxnId) {
    tokio::time::timeout(WAIT, tandem_tests::wait_finished(client, txn))
        .await
        .expect("the transaction finished in time");
}
