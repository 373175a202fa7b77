//! End-to-end checks of Tandem's connection security, with real processes on loopback and
//! certificates made by `tandem certs` (docs/operations.md, "TLS and tokens"):
//!
//! - a 2PC transfer and a saga transfer complete with everything on: mutual TLS between
//!   clients, coordinator and participants, client tokens, and the coordinator's token at the
//!   participants;
//! - a client that trusts another CA cannot connect; under mutual TLS a client without a
//!   certificate, or with one another CA signed, is refused;
//! - a participant refuses prepare and action calls from a caller whose certificate does not
//!   name the coordinator, or that lacks the coordinator's token;
//! - a missing or wrong client token is UNAUTHENTICATED; a `/tandem.v1.Admin/` call without the
//!   admin credential is refused (a client token gets PERMISSION_DENIED), while health stays
//!   open;
//! - a participant address outside the allow-list is PERMISSION_DENIED, one whose scheme does
//!   not match the coordinator's participant TLS is INVALID_ARGUMENT (the plain allow-list
//!   cases are in `operations.rs`);
//! - a non-loopback listen address without TLS, or an unreadable certificate, stops the
//!   daemon and the bank at start with a message naming the flag.
//!
//! Every refusal is followed by a look at the stored data with valid credentials: the refused
//! transaction is unknown to the coordinator, and the banks' balances (and prepared branches)
//! are what the accepted calls alone explain.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tandem_participant::{
    bank, ConnectOptions, Error, Outcome, Saga, SagaOutcome, TandemClient, Token, TxnId,
};
use tandem_proto::v1 as pb;
use tandem_tests::*;
use tonic::codegen::http::uri::PathAndQuery;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};
use tonic::Code;

const BANK_A: &str = "alice=100";
const BANK_B: &str = "bob=50";
const COORDINATOR_NAME: &str = "tandem-coordinator";
const CLIENT_TOKEN: &str = "client-token-for-tests-0001";
const BANK_CLIENT_TOKEN: &str = "bank-client-token-for-tests-01";
const ADMIN_TOKEN: &str = "admin-token-for-tests-000001";
const PARTICIPANT_TOKEN: &str = "participant-token-for-tests-1";
const WRONG_TOKEN: &str = "not-a-token-anyone-issued-0001";
/// A path of the admin API no build serves, so that a call which passes the token check is
/// answered UNIMPLEMENTED whether or not this build has `tandem.v1.Admin`.
const ADMIN_PROBE: &str = "/tandem.v1.Admin/SecurityProbeNoSuchMethod";

/// Runs a `tandem` or `tandem-bank` command to its end (at most 30 s); returns its exit code
/// and standard error.
async fn run_to_end(program: &Path, args: &[&str]) -> (Option<i32>, String) {
    let output = tokio::time::timeout(
        Duration::from_secs(30),
        tokio::process::Command::new(program)
            .args(args)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .unwrap_or_else(|_| panic!("{} {args:?} did not end within 30 s", program.display()))
    .unwrap_or_else(|e| panic!("running {}: {e}", program.display()));
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// Certificates made by `tandem certs` (CA, coordinator, bank-a, bank-b, client) and the
/// token files, in one folder.
struct Pki {
    dir: PathBuf,
}

impl Pki {
    async fn make(dir: &Path) -> Pki {
        let out = dir.to_str().unwrap();
        let (code, stderr) = run_to_end(
            &binaries().tandem,
            &[
                "certs",
                "--out",
                out,
                "--coordinator-name",
                COORDINATOR_NAME,
                "--participant-name",
                "bank-a",
                "--participant-name",
                "bank-b",
            ],
        )
        .await;
        assert_eq!(code, Some(0), "tandem certs failed: {stderr}");
        let write = |name: &str, text: String| std::fs::write(dir.join(name), text).unwrap();
        write(
            "client-tokens",
            format!("# clients\nbilling:{CLIENT_TOKEN}\nbanks:{BANK_CLIENT_TOKEN}\n"),
        );
        write("bank-client-token", format!("{BANK_CLIENT_TOKEN}\n"));
        write("admin-token", format!("{ADMIN_TOKEN}\n"));
        write("participant-token", format!("{PARTICIPANT_TOKEN}\n"));
        Pki {
            dir: dir.to_path_buf(),
        }
    }

    fn path(&self, file: &str) -> String {
        self.dir.join(file).to_str().unwrap().to_string()
    }

    fn pem(&self, file: &str) -> PathBuf {
        self.dir.join(file)
    }

    /// TLS settings trusting this CA, presenting `identity` (`"client"`, `"coordinator"`,
    /// `"bank-b"`, ...) if given.
    fn client_tls(&self, identity: Option<&str>) -> ClientTlsConfig {
        let cert = identity.map(|name| {
            (
                self.pem(&format!("{name}.pem")),
                self.pem(&format!("{name}.key")),
            )
        });
        ConnectOptions::tls_from_files(
            &self.pem("ca.pem"),
            cert.as_ref().map(|(c, k)| (c.as_path(), k.as_path())),
        )
        .unwrap()
    }

    /// `tandem serve` arguments: TLS with this CA for clients (mutual TLS if `mutual`).
    fn serve_tls(&self, mutual: bool) -> Vec<String> {
        let mut args = vec![
            "--tls-cert".to_string(),
            self.path("coordinator.pem"),
            "--tls-key".into(),
            self.path("coordinator.key"),
        ];
        if mutual {
            args.extend(["--tls-client-ca".to_string(), self.path("ca.pem")]);
        }
        args
    }

    /// `tandem serve` arguments: participants called over TLS (mutual TLS as the coordinator).
    fn participant_tls(&self) -> Vec<String> {
        vec![
            "--participant-ca".into(),
            self.path("ca.pem"),
            "--participant-client-cert".into(),
            self.path("coordinator.pem"),
            "--participant-client-key".into(),
            self.path("coordinator.key"),
        ]
    }

    /// `tandem serve` arguments: client and admin tokens.
    fn tokens(&self) -> Vec<String> {
        vec![
            "--client-tokens-file".into(),
            self.path("client-tokens"),
            "--admin-token-file".into(),
            self.path("admin-token"),
        ]
    }

    /// `tandem-bank serve` arguments for bank `name`: TLS; with `strict`, mutual TLS that
    /// admits only the coordinator's certificate and token, and TLS and a token towards the
    /// coordinator's outcome queries.
    fn bank(&self, name: &str, strict: bool) -> Vec<String> {
        let mut args = vec![
            "--tls-cert".to_string(),
            self.path(&format!("{name}.pem")),
            "--tls-key".into(),
            self.path(&format!("{name}.key")),
        ];
        if strict {
            args.extend([
                "--tls-client-ca".to_string(),
                self.path("ca.pem"),
                "--coordinator-name".into(),
                COORDINATOR_NAME.into(),
                "--coordinator-token-file".into(),
                self.path("participant-token"),
                "--coordinator-ca".into(),
                self.path("ca.pem"),
                "--client-cert".into(),
                self.path(&format!("{name}.pem")),
                "--client-key".into(),
                self.path(&format!("{name}.key")),
                "--client-token-file".into(),
                self.path("bank-client-token"),
            ]);
        }
        args
    }
}

fn strs(args: &[String]) -> Vec<&str> {
    args.iter().map(String::as_str).collect()
}

fn token(text: &str) -> Option<Token> {
    Some(Token::parse(text).unwrap())
}

/// Starts bank `name` (`bank-a` holds alice's 100, `bank-b` bob's 50) in `root/name` with
/// `tandem-bank serve` arguments `args`.
async fn start_bank(root: &Path, name: &str, args: &[String], crash_at: Option<&str>) -> Node {
    let accounts = if name == "bank-a" { BANK_A } else { BANK_B };
    Node::bank_with_args(name, &root.join(name), accounts, &strs(args), crash_at).await
}

/// A coordinator and two banks with the given arguments, in one temp folder beside the PKI.
struct Cluster {
    dir: tempfile::TempDir,
    pki: Pki,
    coordinator: Node,
    a: Node,
    b: Node,
    /// The scheme the banks serve (`http` or `https`).
    scheme: &'static str,
}

impl Cluster {
    async fn start(
        coordinator_args: impl Fn(&Pki) -> Vec<String>,
        bank_args: impl Fn(&Pki, &str) -> Vec<String>,
    ) -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::make(&dir.path().join("pki")).await;
        let args = coordinator_args(&pki);
        let coordinator =
            Node::coordinator_with_args(&dir.path().join("coordinator"), &strs(&args), None).await;
        let a_args = bank_args(&pki, "bank-a");
        let b_args = bank_args(&pki, "bank-b");
        let scheme = if a_args.iter().any(|a| a == "--tls-cert") {
            "https"
        } else {
            "http"
        };
        let a = start_bank(dir.path(), "bank-a", &a_args, None).await;
        let b = start_bank(dir.path(), "bank-b", &b_args, None).await;
        Cluster {
            dir,
            pki,
            coordinator,
            a,
            b,
            scheme,
        }
    }

    fn bank_addr(&self, bank: &Node) -> String {
        format!("{}://{}", self.scheme, bank.addr())
    }

    /// A 2PC transfer from alice (bank a) to bob (bank b).
    fn transfer(&self, amount: i64) -> Vec<tandem_participant::Branch> {
        bank::transfer_branches(
            (&self.bank_addr(&self.a), "alice"),
            (&self.bank_addr(&self.b), "bob"),
            amount,
        )
    }

    /// Transfers 10 from alice to bob with `client`, asserts it committed (and finished),
    /// and returns its id.
    async fn commit_transfer(&self, client: &mut TandemClient, what: &str) -> TxnId {
        let txn = TandemClient::new_txn_id();
        let outcome = client
            .execute_2pc_with(&txn, self.transfer(10), None)
            .await
            .unwrap_or_else(|e| panic!("{what}: transfer {txn}: {e}"));
        assert_eq!(outcome, Outcome::Committed, "{what}: transfer {txn}");
        assert_eq!(wait_finished(client, &txn).await, Outcome::Committed);
        txn
    }

    /// A client of the coordinator; `https` when `tls` is given.
    async fn client(&self, options: ConnectOptions) -> Result<TandemClient, Error> {
        let scheme = if options.tls.is_some() {
            "https"
        } else {
            "http"
        };
        let address = format!("{scheme}://{}", self.coordinator.addr());
        TandemClient::connect_with(&address, options).await
    }

    /// Stops the banks and returns their committed balances.
    async fn balances(&mut self) -> (BTreeMap<String, i64>, BTreeMap<String, i64>) {
        self.a.stop().await;
        self.b.stop().await;
        (self.a.balances(), self.b.balances())
    }
}

fn balances(alice: i64, bob: i64) -> (BTreeMap<String, i64>, BTreeMap<String, i64>) {
    (
        BTreeMap::from([("alice".to_string(), alice)]),
        BTreeMap::from([("bob".to_string(), bob)]),
    )
}

/// Asserts the coordinator has no record of `txn` (asked with valid credentials).
async fn assert_unknown(client: &mut TandemClient, txn: &TxnId) {
    match client.get(txn).await {
        Err(Error::Coordinator {
            code: Code::NotFound,
            ..
        }) => {}
        other => panic!("transaction {txn} should be unknown to the coordinator: {other:?}"),
    }
}

/// The gRPC code of an error from the SDK client.
fn code_of(error: &Error) -> Option<Code> {
    match error {
        Error::Coordinator { code, .. } => Some(*code),
        _ => None,
    }
}

#[tokio::test]
async fn two_pc_and_saga_transfers_complete_over_mutual_tls_with_tokens() {
    let mut cluster = Cluster::start(
        |pki| {
            [
                pki.serve_tls(true),
                pki.participant_tls(),
                pki.tokens(),
                vec![
                    "--participant-token-file".into(),
                    pki.path("participant-token"),
                ],
            ]
            .concat()
        },
        |pki, name| pki.bank(name, true),
    )
    .await;
    let options = ConnectOptions {
        tls: Some(cluster.pki.client_tls(Some("client"))),
        token: token(CLIENT_TOKEN),
    };
    let mut client = cluster
        .client(options)
        .await
        .expect("a trusted client connects");
    cluster.commit_transfer(&mut client, "2PC over TLS").await;

    let saga = Saga::sequence(bank::transfer_saga_steps(
        (&cluster.bank_addr(&cluster.a), "alice"),
        (&cluster.bank_addr(&cluster.b), "bob"),
        5,
    ));
    let id = client
        .submit_saga(saga)
        .await
        .expect("saga accepted over TLS");
    let state = client
        .wait(&id, Duration::from_secs(30))
        .await
        .unwrap_or_else(|e| panic!("waiting for saga {id}: {e}"));
    assert_eq!(
        state.outcome(),
        Some(SagaOutcome::Completed),
        "saga {id}: {state:?}"
    );
    assert_eq!(cluster.balances().await, balances(85, 65));
}

#[tokio::test]
async fn a_client_that_trusts_another_ca_cannot_connect() {
    let mut cluster = Cluster::start(|pki| pki.serve_tls(false), |_, _| Vec::new()).await;
    let other = Pki::make(&cluster.dir.path().join("other-pki")).await;
    let refused = cluster
        .client(ConnectOptions {
            tls: Some(other.client_tls(None)),
            token: None,
        })
        .await;
    match refused {
        Err(Error::Unavailable(message)) => assert!(
            message.contains("certificate") || message.contains("UnknownIssuer"),
            "the error should say the certificate is not trusted: {message}"
        ),
        Err(e) => panic!("expected UNAVAILABLE for an untrusted server certificate, got {e}"),
        Ok(_) => panic!("a client trusting another CA connected"),
    }
    // A plaintext client gets no answer from a TLS server either.
    let txn = TandemClient::new_txn_id();
    if let Ok(mut plain) = cluster.client(ConnectOptions::default()).await {
        let answer = plain
            .execute_2pc_with(&txn, cluster.transfer(7), None)
            .await;
        assert!(
            answer.is_err(),
            "a plaintext call to a TLS server was answered: {answer:?}"
        );
    }
    let mut trusted = cluster
        .client(ConnectOptions {
            tls: Some(cluster.pki.client_tls(None)),
            token: None,
        })
        .await
        .expect("a client trusting the right CA connects");
    assert_unknown(&mut trusted, &txn).await;
    assert_eq!(cluster.balances().await, balances(100, 50));
}

#[tokio::test]
async fn mutual_tls_refuses_clients_without_a_certificate_the_ca_signed() {
    let mut cluster = Cluster::start(|pki| pki.serve_tls(true), |_, _| Vec::new()).await;
    let other = Pki::make(&cluster.dir.path().join("other-pki")).await;
    let attempts = [
        ("no client certificate", cluster.pki.client_tls(None)),
        (
            "a client certificate another CA signed",
            ConnectOptions::tls_from_files(
                &cluster.pki.pem("ca.pem"),
                Some((&other.pem("client.pem"), &other.pem("client.key"))),
            )
            .unwrap(),
        ),
    ];
    let mut refused = Vec::new();
    for (what, tls) in attempts {
        let txn = TandemClient::new_txn_id();
        // Under TLS 1.3 the server may refuse the certificate only after the client finished
        // its side of the handshake, so the refusal shows at connect or at the first call.
        let answer = match cluster
            .client(ConnectOptions {
                tls: Some(tls),
                token: None,
            })
            .await
        {
            Err(e) => Err(e),
            Ok(mut client) => {
                client
                    .execute_2pc_with(&txn, cluster.transfer(7), None)
                    .await
            }
        };
        match answer {
            Err(e) => eprintln!("{what}: refused as expected: {e}"),
            Ok(outcome) => panic!("{what}: transaction {txn} was run: {outcome:?}"),
        }
        refused.push(txn);
    }
    let mut client = cluster
        .client(ConnectOptions {
            tls: Some(cluster.pki.client_tls(Some("client"))),
            token: None,
        })
        .await
        .expect("a client with the CA's certificate connects");
    for txn in &refused {
        assert_unknown(&mut client, txn).await;
    }
    cluster
        .commit_transfer(&mut client, "the trusted client")
        .await;
    assert_eq!(cluster.balances().await, balances(90, 60));
}

/// A client of bank `addr`'s participant endpoint over TLS, presenting `identity`.
async fn participant_client(
    pki: &Pki,
    addr: &str,
    identity: Option<&str>,
) -> Result<pb::participant_client::ParticipantClient<Channel>, tonic::transport::Error> {
    let channel = Endpoint::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config(pki.client_tls(identity))?
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await?;
    Ok(pb::participant_client::ParticipantClient::new(channel))
}

fn with_token<T>(message: T, token: Option<&str>) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    if let Some(token) = token {
        request
            .metadata_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
    }
    request
}

#[tokio::test]
async fn a_participant_refuses_callers_that_are_not_the_coordinator() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::make(&dir.path().join("pki")).await;
    let bank_dir = dir.path().join("bank-a");
    let mut bank_a = start_bank(dir.path(), "bank-a", &pki.bank("bank-a", true), None).await;
    let addr = bank_a.addr();
    let https = format!("https://{addr}");
    let debit = |amount| {
        bank::transfer_saga_steps((&https, "alice"), ("https://127.0.0.1:1", "bob"), amount)
            .remove(0)
    };
    let prepare_payload =
        bank::transfer_branches((&https, "alice"), ("https://127.0.0.1:1", "bob"), 10)
            .remove(0)
            .payload;
    let saga = |suffix: &str| format!("{}-{suffix}", tandem_common::unix_now_ms());
    let act = |saga_id: String, amount| pb::StepRequest {
        saga_id,
        step: 0,
        resource: bank::SAGA_STEP.into(),
        payload: debit(amount).action,
        step_name: "debit".into(),
        traceparent: String::new(),
    };
    let act_batch = |saga_id: String, amount| pb::StepBatchRequest {
        steps: vec![act(saga_id, amount)],
    };
    let prepare = |txn_id: String| pb::PrepareRequest {
        txn_id,
        branch: 0,
        resource: bank::RESOURCE.into(),
        payload: prepare_payload.clone(),
        coordinator: "https://127.0.0.1:1".into(),
    };

    // Certificates the CA signed that do not name the coordinator: PERMISSION_DENIED.
    for identity in ["client", "bank-b"] {
        let mut caller = participant_client(&pki, &addr, Some(identity))
            .await
            .unwrap();
        let token = Some(PARTICIPANT_TOKEN);
        let status = caller
            .act(with_token(act(saga(identity), 10), token))
            .await
            .expect_err("an action from a caller that is not the coordinator");
        assert_eq!(
            status.code(),
            Code::PermissionDenied,
            "{identity}: {status:?}"
        );
        let status = caller
            .act_batch(with_token(act_batch(saga(identity), 10), token))
            .await
            .expect_err("a step batch from a caller that is not the coordinator");
        assert_eq!(
            status.code(),
            Code::PermissionDenied,
            "{identity}: {status:?}"
        );
        let status = caller
            .prepare(with_token(prepare(saga(identity)), token))
            .await
            .expect_err("a prepare from a caller that is not the coordinator");
        assert_eq!(
            status.code(),
            Code::PermissionDenied,
            "{identity}: {status:?}"
        );
    }
    // No client certificate at all: the handshake (or the first call) fails.
    match participant_client(&pki, &addr, None).await {
        Err(e) => eprintln!("no certificate: refused at connect: {e}"),
        Ok(mut caller) => {
            let status = caller
                .act(with_token(
                    act(saga("anonymous"), 10),
                    Some(PARTICIPANT_TOKEN),
                ))
                .await
                .expect_err("an action from a caller without a certificate");
            eprintln!("no certificate: refused at the call: {status:?}");
        }
    }
    // The coordinator's certificate without the coordinator's token: UNAUTHENTICATED.
    let mut coordinator = participant_client(&pki, &addr, Some("coordinator"))
        .await
        .unwrap();
    for token in [None, Some(WRONG_TOKEN), Some(CLIENT_TOKEN)] {
        let status = coordinator
            .act(with_token(act(saga("tokenless"), 10), token))
            .await
            .expect_err("an action without the coordinator's token");
        assert_eq!(
            status.code(),
            Code::Unauthenticated,
            "token {token:?}: {status:?}"
        );
        let status = coordinator
            .compensate_batch(with_token(act_batch(saga("tokenless"), 10), token))
            .await
            .expect_err("a compensation batch without the coordinator's token");
        assert_eq!(
            status.code(),
            Code::Unauthenticated,
            "token {token:?}: {status:?}"
        );
    }
    // Ping touches nothing and stays open.
    coordinator.ping(pb::PingRequest {}).await.unwrap();
    // The coordinator itself, with its token, is served: the one change to the balances.
    let answer = coordinator
        .act(with_token(act(saga("allowed"), 1), Some(PARTICIPANT_TOKEN)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        answer.result,
        pb::StepResult::Succeeded as i32,
        "{answer:?}"
    );

    bank_a.stop().await;
    assert_eq!(
        bank_a.balances(),
        BTreeMap::from([("alice".to_string(), 99)]),
        "only the coordinator's action took effect"
    );
    let participant = bank::open(&bank_dir).unwrap();
    assert!(
        participant.prepared_branches().unwrap().is_empty(),
        "a refused prepare left a prepared branch"
    );
}

/// Calls `path` on the coordinator with an empty message, as a raw unary call, and returns
/// the status code.
async fn raw_call(channel: Channel, path: &'static str, token: Option<&str>) -> Code {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    let codec = tonic_prost::ProstCodec::<pb::PingRequest, pb::PingResponse>::default();
    match grpc
        .unary(
            with_token(pb::PingRequest {}, token),
            PathAndQuery::from_static(path),
            codec,
        )
        .await
    {
        Ok(_) => Code::Ok,
        Err(status) => status.code(),
    }
}

#[tokio::test]
async fn missing_or_wrong_client_tokens_are_unauthenticated() {
    let mut cluster = Cluster::start(|pki| pki.tokens(), |_, _| Vec::new()).await;
    let mut refused = Vec::new();
    for presented in [None, Some(WRONG_TOKEN)] {
        let mut client = cluster
            .client(ConnectOptions {
                tls: None,
                token: presented.and_then(token),
            })
            .await
            .unwrap();
        let txn = TandemClient::new_txn_id();
        let error = client
            .execute_2pc_with(&txn, cluster.transfer(7), None)
            .await
            .expect_err("a transfer without a valid token");
        assert_eq!(
            code_of(&error),
            Some(Code::Unauthenticated),
            "{presented:?}: {error}"
        );
        let saga = Saga::sequence(bank::transfer_saga_steps(
            (&cluster.bank_addr(&cluster.a), "alice"),
            (&cluster.bank_addr(&cluster.b), "bob"),
            3,
        ));
        let saga_id = TandemClient::new_txn_id();
        let error = client
            .submit_saga(saga.id(saga_id.clone()))
            .await
            .expect_err("a saga without a valid token");
        assert_eq!(
            code_of(&error),
            Some(Code::Unauthenticated),
            "{presented:?}: {error}"
        );
        refused.extend([txn, saga_id]);
    }
    let mut client = cluster
        .client(ConnectOptions::default())
        .await
        .unwrap()
        .with_token(Token::parse(CLIENT_TOKEN).unwrap());
    for txn in &refused[..1] {
        assert_unknown(&mut client, txn).await;
    }
    let unknown_saga = client.get_saga(&refused[1]).await;
    assert!(
        matches!(&unknown_saga, Err(e) if code_of(e) == Some(Code::NotFound)),
        "a refused saga should be unknown: {unknown_saga:?}"
    );
    let txn = cluster
        .commit_transfer(&mut client, "with a client token")
        .await;
    // The admin credential is accepted for client calls too.
    let mut admin = cluster
        .client(ConnectOptions {
            tls: None,
            token: token(ADMIN_TOKEN),
        })
        .await
        .unwrap();
    assert_eq!(wait_finished(&mut admin, &txn).await, Outcome::Committed);
    assert_eq!(cluster.balances().await, balances(90, 60));
}

#[tokio::test]
async fn admin_calls_without_the_admin_credential_are_refused() {
    let mut cluster = Cluster::start(|pki| pki.tokens(), |_, _| Vec::new()).await;
    let mut client = cluster
        .client(ConnectOptions {
            tls: None,
            token: token(CLIENT_TOKEN),
        })
        .await
        .unwrap();
    let txn = cluster
        .commit_transfer(&mut client, "before the probes")
        .await;

    let channel = Endpoint::from_shared(format!("http://{}", cluster.coordinator.addr()))
        .unwrap()
        .connect()
        .await
        .unwrap();
    for (token, expected) in [
        (None, Code::Unauthenticated),
        (Some(WRONG_TOKEN), Code::Unauthenticated),
        (Some(CLIENT_TOKEN), Code::PermissionDenied),
    ] {
        assert_eq!(
            raw_call(channel.clone(), ADMIN_PROBE, token).await,
            expected,
            "{ADMIN_PROBE} with token {token:?}"
        );
    }
    // The admin credential passes the check; no service answers this path.
    assert_eq!(
        raw_call(channel.clone(), ADMIN_PROBE, Some(ADMIN_TOKEN)).await,
        Code::Unimplemented
    );
    // Without a token, the coordinator's own calls are refused, but health stays open.
    assert_eq!(
        raw_call(channel.clone(), "/tandem.v1.Coordinator/Ping", None).await,
        Code::Unauthenticated
    );
    let health = tonic_health::pb::health_client::HealthClient::new(channel)
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .expect("health checking needs no token")
        .into_inner();
    assert_eq!(
        health.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
    // Nothing the refused calls could reach changed.
    assert_eq!(wait_finished(&mut client, &txn).await, Outcome::Committed);
    assert_eq!(cluster.balances().await, balances(90, 60));
}

#[tokio::test]
async fn participant_addresses_outside_the_allow_list_or_of_the_wrong_scheme_are_refused() {
    let mut cluster = Cluster::start(
        |pki| vec!["--participant-ca".into(), pki.path("ca.pem")],
        |pki, name| pki.bank(name, false),
    )
    .await;
    let mut client = cluster.client(ConnectOptions::default()).await.unwrap();
    // 0.0.0.0 reaches this machine's bank on Linux, so a broken check would move money.
    let outside = bank::transfer_branches(
        (
            &format!(
                "https://0.0.0.0:{}",
                cluster.a.addr().rsplit(':').next().unwrap()
            ),
            "alice",
        ),
        (&cluster.bank_addr(&cluster.b), "bob"),
        7,
    );
    let plaintext = bank::transfer_branches(
        (&format!("http://{}", cluster.a.addr()), "alice"),
        (&format!("http://{}", cluster.b.addr()), "bob"),
        7,
    );
    let mut refused = Vec::new();
    for (what, branches, expected) in [
        (
            "a host outside the allow-list",
            outside,
            Code::PermissionDenied,
        ),
        (
            "plaintext http to TLS participants",
            plaintext,
            Code::InvalidArgument,
        ),
    ] {
        let txn = TandemClient::new_txn_id();
        let error = client
            .execute_2pc_with(&txn, branches, None)
            .await
            .expect_err(what);
        let code = match &error {
            Error::InvalidArgument(_) => Some(Code::InvalidArgument),
            other => code_of(other),
        };
        assert_eq!(code, Some(expected), "{what}: {error}");
        refused.push(txn);
    }
    for txn in &refused {
        assert_unknown(&mut client, txn).await;
    }
    // The same banks over https: the coordinator calls them over TLS.
    cluster
        .commit_transfer(&mut client, "https participants")
        .await;
    assert_eq!(cluster.balances().await, balances(90, 60));
}

/// Runs `program serve --listen LISTEN --data-dir DATA` with `extra` arguments, expects it to
/// refuse to start (exit code 2) and returns its standard error.
async fn refused_start(program: &Path, listen: &str, data: &Path, extra: &[&str]) -> String {
    let mut args = vec![
        "serve",
        "--listen",
        listen,
        "--data-dir",
        data.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let (code, stderr) = run_to_end(program, &args).await;
    assert_eq!(
        code,
        Some(2),
        "{} {args:?} should refuse to start: {stderr}",
        program.display()
    );
    stderr
}

#[tokio::test]
async fn insecure_or_broken_settings_stop_the_servers_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::make(&dir.path().join("pki")).await;
    let data = dir.path().join("data");
    let bins = binaries();
    // A non-loopback address literal without TLS is refused before anything is bound.
    let stderr = refused_start(&bins.tandem, "0.0.0.0:0", &data, &[]).await;
    assert!(
        stderr.contains("not a loopback address")
            && stderr.contains("--plaintext")
            && stderr.contains("--tls-cert"),
        "the message should name the flags: {stderr}"
    );
    let stderr = refused_start(&bins.bank, "0.0.0.0:0", &data, &["--accounts", "alice=1"]).await;
    assert!(stderr.contains("--plaintext"), "{stderr}");
    // A certificate file that cannot be read is named with its flag.
    let missing = dir.path().join("missing-cert.pem");
    let missing = missing.to_str().unwrap();
    let stderr = refused_start(
        &bins.tandem,
        "127.0.0.1:0",
        &data,
        &["--tls-cert", missing, "--tls-key", missing],
    )
    .await;
    assert!(
        stderr.contains("--tls-cert") && stderr.contains("missing-cert.pem"),
        "{stderr}"
    );
    // A key that is not the certificate's.
    let (cert, key) = (pki.path("coordinator.pem"), pki.path("bank-a.key"));
    let stderr = refused_start(
        &bins.tandem,
        "127.0.0.1:0",
        &data,
        &["--tls-cert", &cert, "--tls-key", &key],
    )
    .await;
    assert!(
        stderr.contains("--tls-cert/--tls-key") && stderr.contains("KeyMismatch"),
        "{stderr}"
    );
    // A token list that is too weak is refused without showing the token.
    let tokens = dir.path().join("tokens");
    std::fs::write(&tokens, "billing:tiny-tok-9\n").unwrap();
    let stderr = refused_start(
        &bins.tandem,
        "127.0.0.1:0",
        &data,
        &["--client-tokens-file", tokens.to_str().unwrap()],
    )
    .await;
    assert!(
        stderr.contains("--client-tokens-file") && stderr.contains("16 to 512 bytes"),
        "{stderr}"
    );
    assert!(!stderr.contains("tiny-tok-9"), "the token leaked: {stderr}");
    assert!(!data.exists(), "a refused start created its data folder");
}

#[tokio::test]
async fn a_participant_resolves_a_branch_in_doubt_by_asking_the_coordinator_over_mutual_tls() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::make(&dir.path().join("pki")).await;
    let coordinator_args = [
        pki.serve_tls(true),
        pki.participant_tls(),
        pki.tokens(),
        vec![
            "--participant-token-file".into(),
            pki.path("participant-token"),
        ],
    ]
    .concat();
    let coordinator = Node::coordinator_with_args(
        &dir.path().join("coordinator"),
        &strs(&coordinator_args),
        None,
    )
    .await;
    let a_args = pki.bank("bank-a", true);
    let a_dir = dir.path().join("bank-a");
    let crash_at = Some("participant.after_prepare_persisted");
    let mut crashing = start_bank(dir.path(), "bank-a", &a_args, crash_at).await;
    let mut b = start_bank(dir.path(), "bank-b", &pki.bank("bank-b", true), None).await;
    let options = ConnectOptions {
        tls: Some(pki.client_tls(Some("client"))),
        token: token(CLIENT_TOKEN),
    };
    let address = format!("https://{}", coordinator.addr());
    let mut client = TandemClient::connect_with(&address, options.clone())
        .await
        .unwrap();
    let b_addr = format!("https://{}", b.addr());
    let txn = TandemClient::new_txn_id();
    let branches = bank::transfer_branches(
        (&format!("https://{}", crashing.addr()), "alice"),
        (&b_addr, "bob"),
        10,
    );
    // Bank a holds alice's 10 prepared and dies before it votes: the coordinator aborts.
    let outcome = client.execute_2pc_with(&txn, branches, None).await.unwrap();
    assert!(
        matches!(outcome, Outcome::Aborted { .. }),
        "{txn}: {outcome:?}"
    );
    crashing
        .expect_crash("participant.after_prepare_persisted")
        .await;
    // Back on another port, where the coordinator's redeliveries never arrive: only its own
    // outcome query, over mutual TLS with its client token, can release the hold.
    let mut a = start_bank(dir.path(), "bank-a", &a_args, None).await;
    let a_addr = format!("https://{}", a.addr());
    // A debit of alice's whole 100 commits only once the 10 held in doubt are released.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let mut attempts = Vec::new();
    loop {
        let txn = TandemClient::new_txn_id();
        let all = bank::transfer_branches((&a_addr, "alice"), (&b_addr, "bob"), 100);
        let outcome = client.execute_2pc_with(&txn, all, None).await.unwrap();
        attempts.push(format!("{txn}: {outcome:?}"));
        if outcome == Outcome::Committed {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the branch in doubt was never resolved; attempts: {attempts:#?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    a.stop().await;
    b.stop().await;
    assert_eq!(
        (a.balances(), b.balances()),
        balances(0, 150),
        "attempts: {attempts:#?}"
    );
    assert!(bank::open(&a_dir)
        .unwrap()
        .prepared_branches()
        .unwrap()
        .is_empty());
}
