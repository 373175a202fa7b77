//! A participant whose timing the test decides: it speaks `tandem.v1.Participant` in the
//! test's own process, holds each prepare or action for a set time, always votes YES and
//! succeeds, and records every call it receives.
//!
//! The bank (a real `tandem-bank` process) answers in microseconds, which leaves nothing in
//! flight to observe; tests of admission control and shutdown need calls that stay open for
//! as long as they choose. This participant keeps no durable state: it is a probe of what
//! the coordinator sends, not a service (the barrier is proven against the bank).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tandem_proto::v1 as pb;
use tokio::sync::oneshot;
use tonic::{Request, Response, Status};

/// What the participant received, by kind of call, keyed by transaction or saga id.
#[derive(Debug, Default, Clone)]
pub struct Received {
    pub prepares: BTreeMap<String, u32>,
    pub commits: BTreeMap<String, u32>,
    pub aborts: BTreeMap<String, u32>,
    pub acts: BTreeMap<String, u32>,
    pub compensations: BTreeMap<String, u32>,
}

#[derive(Clone)]
struct Scripted {
    hold: Duration,
    received: Arc<Mutex<Received>>,
}

impl Scripted {
    fn record(&self, pick: impl FnOnce(&mut Received) -> &mut BTreeMap<String, u32>, id: &str) {
        let mut received = self.received.lock().expect("received lock");
        *pick(&mut received).entry(id.to_string()).or_default() += 1;
    }
}

#[tonic::async_trait]
impl pb::participant_server::Participant for Scripted {
    async fn prepare(
        &self,
        request: Request<pb::PrepareRequest>,
    ) -> Result<Response<pb::PrepareResponse>, Status> {
        let request = request.into_inner();
        self.record(|r| &mut r.prepares, &request.txn_id);
        tokio::time::sleep(self.hold).await;
        Ok(Response::new(pb::PrepareResponse {
            vote: pb::Vote::Yes as i32,
            reason: String::new(),
        }))
    }

    async fn commit(
        &self,
        request: Request<pb::DecisionRequest>,
    ) -> Result<Response<pb::DecisionResponse>, Status> {
        self.record(|r| &mut r.commits, &request.into_inner().txn_id);
        Ok(Response::new(pb::DecisionResponse {}))
    }

    async fn abort(
        &self,
        request: Request<pb::DecisionRequest>,
    ) -> Result<Response<pb::DecisionResponse>, Status> {
        self.record(|r| &mut r.aborts, &request.into_inner().txn_id);
        Ok(Response::new(pb::DecisionResponse {}))
    }

    async fn ping(
        &self,
        _request: Request<pb::PingRequest>,
    ) -> Result<Response<pb::PingResponse>, Status> {
        Ok(Response::new(pb::PingResponse {}))
    }

    async fn act(
        &self,
        request: Request<pb::StepRequest>,
    ) -> Result<Response<pb::ActResponse>, Status> {
        self.record(|r| &mut r.acts, &request.into_inner().saga_id);
        tokio::time::sleep(self.hold).await;
        Ok(Response::new(pb::ActResponse {
            result: pb::StepResult::Succeeded as i32,
            reason: String::new(),
        }))
    }

    async fn compensate(
        &self,
        request: Request<pb::StepRequest>,
    ) -> Result<Response<pb::CompensateResponse>, Status> {
        self.record(|r| &mut r.compensations, &request.into_inner().saga_id);
        Ok(Response::new(pb::CompensateResponse {}))
    }

    async fn saga_finished(
        &self,
        _request: Request<pb::SagaFinishedRequest>,
    ) -> Result<Response<pb::SagaFinishedResponse>, Status> {
        Ok(Response::new(pb::SagaFinishedResponse {}))
    }
}

/// A running scripted participant; it stops when dropped.
pub struct ScriptedParticipant {
    pub addr: SocketAddr,
    received: Arc<Mutex<Received>>,
    _stop: oneshot::Sender<()>,
}

impl ScriptedParticipant {
    /// Serves on a free loopback port; every prepare and action is held for `hold`.
    pub async fn start(hold: Duration) -> ScriptedParticipant {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("binding a loopback port for the scripted participant");
        let addr = listener.local_addr().expect("bound address");
        let received = Arc::new(Mutex::new(Received::default()));
        let service = Scripted {
            hold,
            received: received.clone(),
        };
        let (stop, stopped) = oneshot::channel::<()>();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(pb::participant_server::ParticipantServer::new(service))
                .serve_with_incoming_shutdown(
                    tonic::transport::server::TcpIncoming::from(listener),
                    async {
                        let _ = stopped.await;
                    },
                ),
        );
        ScriptedParticipant {
            addr,
            received,
            _stop: stop,
        }
    }

    /// `127.0.0.1:port`.
    pub fn address(&self) -> String {
        self.addr.to_string()
    }

    /// A 2PC transaction `txn` with one branch here.
    pub fn execute_request(&self, txn: &str) -> pb::Execute2pcRequest {
        pb::Execute2pcRequest {
            txn_id: txn.into(),
            branches: vec![pb::Branch {
                participant: self.address(),
                resource: "scripted".into(),
                payload: b"work".to_vec(),
            }],
            timeout_ms: 60_000,
        }
    }

    /// A saga `saga` (empty: the coordinator names it) of one step `step` here.
    pub fn one_step_saga(&self, saga: &str, step: &str) -> pb::SubmitSagaRequest {
        pb::SubmitSagaRequest {
            saga_id: saga.into(),
            steps: vec![pb::SagaStep {
                name: step.into(),
                participant: self.address(),
                resource: "scripted".into(),
                action: b"act".to_vec(),
                compensation: b"undo".to_vec(),
                ..Default::default()
            }],
            sequential: true,
            ..Default::default()
        }
    }

    /// A copy of what it received so far.
    pub fn received(&self) -> Received {
        self.received.lock().expect("received lock").clone()
    }
}
