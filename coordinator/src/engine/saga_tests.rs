//! Scenario tests of the saga engine, one per behaviour, and a seeded randomized run.
//!
//! Each scenario feeds [`SagaEngine::step`] the events the runtime would and asserts the
//! effects that come back, in order, as a transcript that reads like the protocol
//! ("action b #1", "notify StepFailed b #1: insufficient funds", "persist outcome (forced):
//! ..."); a few assert the effects' full values. Every effect is also checked where the
//! transcript is silent: each send carries the payload, target and timeout of its step, each
//! change the next `seq` and the current time, each progress record the last `seq`. The
//! engine's own `validate()` runs after every step. Every event and effect is printed, so a
//! failing scenario shows its transcript.
//!
//! The randomized test ([`Sim`]) plays the runtime and the participants (with a barrier: a
//! repeated call returns the recorded result, a compensation before its action is a recorded
//! no-op, and the action is then refused): business failures, transport failures, duplicated,
//! replayed and reordered answers, early timers, operator aborts, and coordinator crashes that
//! keep any prefix of the writes that includes the durable ones. It checks on every effect that
//! nothing leaves before the spec is durable, that an outcome is revealed only once durable
//! and never changes, and at the end that the saga terminated, that a completed saga ran every
//! step and undid none, and that a compensated one undid every step it attempted, each after
//! the steps that depend on it. Every message names the seed; to watch one step by step:
//! `TANDEM_SEED=<seed> cargo test -p tandem-coordinator --lib saga_replay_one_seed -- --ignored --nocapture`.

use std::collections::VecDeque;

use tandem_common::{Backoff, SplitMix64, TxnId};

use super::*;
use crate::engine::types::BranchTarget;
use crate::log::record::Fingerprint;

const T0_MS: u64 = 1_763_850_000_000;
const FINGERPRINT: Fingerprint = [9; 32];
const ENGINE_SEED: u64 = 42;
const TIMEOUT_MS: u64 = 2_000;
/// The action backoff of every scenario step: 100 ms, doubling, capped at 1 s.
const ACTION_BACKOFF: Backoff = Backoff {
    initial_ms: 100,
    multiplier: 2.0,
    max_ms: 1_000,
};
const REASON: &str = "insufficient funds";
const ERROR: &str = "connection refused";
const COMPENSATION_ERROR: &str = "disk full";
/// What a participant's barrier answers to an action that arrives after its compensation.
const REFUSED: &str = "refused: compensated before the action arrived";

// ----------------------------------------------------------------------------------------
// Names, specs, transcripts
// ----------------------------------------------------------------------------------------

fn saga_id(n: u64) -> TxnId {
    TxnId::parse(&format!("{T0_MS}-saga{n}")).expect("a well-formed id")
}

/// Steps are named a, b, c, ... after their index.
fn name(step: StepIdx) -> String {
    char::from(b'a' + step as u8).to_string()
}

fn target(step: StepIdx) -> BranchTarget {
    BranchTarget {
        participant: format!("http://p{step}:7000"),
        resource: "accounts".to_string(),
    }
}

fn callback_target() -> BranchTarget {
    BranchTarget {
        participant: "http://caller:7000".to_string(),
        resource: "saga-callback".to_string(),
    }
}

fn step_spec(step: StepIdx, after: &[StepIdx]) -> StepSpec {
    StepSpec {
        name: name(step),
        target: target(step),
        action: format!("do-{}", name(step)).into_bytes(),
        compensation: format!("undo-{}", name(step)).into_bytes(),
        after: after.to_vec(),
        retry: RetryPolicy {
            backoff: ACTION_BACKOFF,
            attempts_max: 3,
            deadline_ms: 0,
        },
        timeout_ms: TIMEOUT_MS,
    }
}

/// A saga whose step `i` waits for the steps `after[i]`.
fn graph(after: &[&[StepIdx]]) -> SagaSpec {
    SagaSpec {
        steps: after
            .iter()
            .enumerate()
            .map(|(i, after)| step_spec(i as StepIdx, after))
            .collect(),
        callback: None,
    }
}

/// `n` steps, each waiting for the one before it.
fn sequence(n: u32) -> SagaSpec {
    let after: Vec<Vec<StepIdx>> = (0..n)
        .map(|i| if i == 0 { vec![] } else { vec![i - 1] })
        .collect();
    let after: Vec<&[StepIdx]> = after.iter().map(|a| a.as_slice()).collect();
    graph(&after)
}

/// a, then b and c concurrently, then d once both succeeded.
fn diamond() -> SagaSpec {
    graph(&[&[], &[0], &[0], &[1, 2]])
}

fn with_callback(mut spec: SagaSpec) -> SagaSpec {
    spec.callback = Some(callback_target());
    spec
}

fn with_retry(mut spec: SagaSpec, attempts_max: u32, deadline_ms: u64) -> SagaSpec {
    for step in &mut spec.steps {
        step.retry.attempts_max = attempts_max;
        step.retry.deadline_ms = deadline_ms;
    }
    spec
}

fn compensated(step: StepIdx, reason: &str) -> SagaOutcome {
    SagaOutcome::Compensated {
        failed_step: name(step),
        reason: reason.to_string(),
    }
}

/// One effect as a line of transcript. What it leaves out (payloads, targets, `seq`, times,
/// progress contents) [`Scenario::check`] verifies on every effect.
fn render(effect: &SagaEffect) -> String {
    match effect {
        SagaEffect::PersistSpec { .. } => "persist spec (forced)".to_string(),
        SagaEffect::PersistOutcome { progress, .. } => {
            let outcome = progress
                .outcome
                .as_ref()
                .expect("a forced outcome write holds an outcome");
            format!("persist outcome (forced): {outcome}")
        }
        SagaEffect::PersistProgress { .. } => "persist progress".to_string(),
        SagaEffect::SendAction { step, attempt, .. } => {
            format!("action {} #{attempt}", name(*step))
        }
        SagaEffect::SendCompensation { step, attempt, .. } => {
            format!("compensate {} #{attempt}", name(*step))
        }
        SagaEffect::SendCallback {
            attempt, outcome, ..
        } => format!("callback #{attempt}: {outcome}"),
        SagaEffect::SetTimer { timer, .. } => match timer {
            SagaTimer::RetryAction { step, attempt } => {
                format!("timer retry action {} #{attempt}", name(*step))
            }
            SagaTimer::RetryCompensation { step, attempt } => {
                format!("timer retry compensation {} #{attempt}", name(*step))
            }
            SagaTimer::RetryCallback { attempt } => format!("timer retry callback #{attempt}"),
        },
        SagaEffect::ReplyAccepted { .. } => "reply accepted".to_string(),
        SagaEffect::Notify { change, .. } => {
            let mut line = format!("notify {:?}", change.kind);
            if let Some(step) = change.step {
                line.push_str(&format!(" {}", name(step)));
            }
            if change.attempt > 0 {
                line.push_str(&format!(" #{}", change.attempt));
            }
            if !change.detail.is_empty() {
                line.push_str(&format!(": {}", change.detail));
            }
            line
        }
        SagaEffect::Terminal { outcome, .. } => format!("terminal: {outcome}"),
        SagaEffect::Finished { .. } => "finished".to_string(),
    }
}

fn nothing() -> Vec<String> {
    Vec::new()
}

/// Asserts `effects` hold exactly one timer, `delay` after `now_ms` with `delay` within
/// [half, full] of `min(initial * 2^retry, max)`; returns when it is due.
fn assert_one_timer(effects: &[SagaEffect], now_ms: u64, backoff: &Backoff, retry: u32) -> u64 {
    let timers: Vec<u64> = effects
        .iter()
        .filter_map(|e| match e {
            SagaEffect::SetTimer { at_ms, .. } => Some(*at_ms),
            _ => None,
        })
        .collect();
    let [at_ms] = timers[..] else {
        panic!("retry {retry}: expected one timer in {effects:?}");
    };
    let full_ms = (backoff.initial_ms << retry.min(40)).min(backoff.max_ms);
    let delay_ms = at_ms - now_ms;
    assert!(
        (full_ms / 2..=full_ms).contains(&delay_ms),
        "retry {retry}: waits {delay_ms} ms, outside [{}, {full_ms}]",
        full_ms / 2
    );
    at_ms
}

// ----------------------------------------------------------------------------------------
// The scenario driver
// ----------------------------------------------------------------------------------------

/// One saga fed event by event, with every effect checked and rendered.
struct Scenario {
    engine: SagaEngine,
    config: SagaEngineConfig,
    id: TxnId,
    spec: SagaSpec,
    now_ms: u64,
    /// The `seq` of the last change seen.
    last_seq: u64,
    /// Every progress record written so far (lazy and forced), in order.
    records: Vec<SagaProgress>,
}

impl Scenario {
    fn new(spec: SagaSpec) -> Self {
        Scenario::with_config(spec, SagaEngineConfig::default())
    }

    fn with_config(spec: SagaSpec, config: SagaEngineConfig) -> Self {
        Scenario {
            engine: SagaEngine::new(config.clone(), ENGINE_SEED),
            config,
            id: saga_id(1),
            spec,
            now_ms: T0_MS,
            last_seq: 0,
            records: Vec::new(),
        }
    }

    /// Sets the time of the next events, in ms after `T0_MS`.
    fn at(&mut self, ms: u64) -> &mut Self {
        self.now_ms = T0_MS + ms;
        self
    }

    fn raw(&mut self, event: SagaEvent) -> Vec<SagaEffect> {
        println!("@{} -> {event:?}", self.now_ms - T0_MS);
        let effects = self.engine.step(self.now_ms, event);
        for effect in &effects {
            println!("        <- {}", render(effect));
        }
        self.check(&effects);
        effects
    }

    fn feed(&mut self, event: SagaEvent) -> Vec<String> {
        self.raw(event).iter().map(render).collect()
    }

    /// What the transcript leaves out.
    fn check(&mut self, effects: &[SagaEffect]) {
        for effect in effects {
            assert_eq!(effect.saga(), &self.id, "{effect:?}");
            match effect {
                SagaEffect::PersistSpec {
                    spec,
                    fingerprint,
                    accepted_ms,
                    ..
                } => {
                    assert_eq!(spec, &self.spec);
                    assert_eq!(fingerprint, &FINGERPRINT);
                    assert_eq!(*accepted_ms, self.now_ms);
                }
                SagaEffect::PersistOutcome { progress, .. }
                | SagaEffect::PersistProgress { progress, .. } => {
                    assert_eq!(progress.seq, self.last_seq, "a record misses a change");
                    assert_eq!(progress.steps.len(), self.spec.steps.len());
                    self.records.push(progress.clone());
                }
                SagaEffect::SendAction {
                    step,
                    target,
                    payload,
                    timeout_ms,
                    ..
                } => {
                    let spec = &self.spec.steps[*step as usize];
                    assert_eq!(
                        (target, payload, *timeout_ms),
                        (&spec.target, &spec.action, spec.timeout_ms)
                    );
                }
                SagaEffect::SendCompensation {
                    step,
                    target,
                    payload,
                    ..
                } => {
                    let spec = &self.spec.steps[*step as usize];
                    assert_eq!((target, payload), (&spec.target, &spec.compensation));
                }
                SagaEffect::SendCallback { target, .. } => {
                    assert_eq!(Some(target), self.spec.callback.as_ref());
                }
                SagaEffect::SetTimer { at_ms, .. } => assert!(*at_ms > self.now_ms),
                SagaEffect::Notify { change, .. } => {
                    assert_eq!(
                        change.seq,
                        self.last_seq + 1,
                        "changes are numbered in order"
                    );
                    self.last_seq = change.seq;
                    assert_eq!(change.at_ms, self.now_ms);
                    assert_eq!(
                        change.outcome.is_some(),
                        change.kind == ChangeKind::Finished,
                        "only Finished carries the outcome"
                    );
                }
                SagaEffect::ReplyAccepted { .. }
                | SagaEffect::Terminal { .. }
                | SagaEffect::Finished { .. } => {}
            }
        }
    }

    fn submit(&mut self) -> Vec<String> {
        self.feed(SagaEvent::Submit {
            saga: self.id.clone(),
            spec: self.spec.clone(),
            fingerprint: FINGERPRINT,
        })
    }

    fn accepted(&mut self) -> Vec<String> {
        self.feed(SagaEvent::Accepted {
            saga: self.id.clone(),
        })
    }

    fn durable(&mut self) -> Vec<String> {
        self.feed(SagaEvent::OutcomeDurable {
            saga: self.id.clone(),
        })
    }

    fn answer(&mut self, step: StepIdx, attempt: u32, answer: ActionAnswer) -> Vec<String> {
        self.feed(SagaEvent::ActionAnswered {
            saga: self.id.clone(),
            step,
            attempt,
            answer,
        })
    }

    fn succeed(&mut self, step: StepIdx, attempt: u32) -> Vec<String> {
        self.answer(step, attempt, ActionAnswer::Succeeded)
    }

    fn fail(&mut self, step: StepIdx, attempt: u32) -> Vec<String> {
        let reason = REASON.to_string();
        self.answer(step, attempt, ActionAnswer::Failed { reason })
    }

    fn unavailable(&mut self, step: StepIdx, attempt: u32) -> Vec<String> {
        let error = ERROR.to_string();
        self.answer(step, attempt, ActionAnswer::Unavailable { error })
    }

    fn compensation(&mut self, step: StepIdx, attempt: u32, ok: bool) -> Vec<String> {
        self.feed(SagaEvent::CompensationAnswered {
            saga: self.id.clone(),
            step,
            attempt,
            answer: if ok {
                Ok(())
            } else {
                Err(COMPENSATION_ERROR.to_string())
            },
        })
    }

    fn callback(&mut self, attempt: u32, ok: bool) -> Vec<String> {
        self.feed(SagaEvent::CallbackAnswered {
            saga: self.id.clone(),
            attempt,
            answer: if ok {
                Ok(())
            } else {
                Err("callback endpoint down".to_string())
            },
        })
    }

    fn fire(&mut self, timer: SagaTimer) -> Vec<String> {
        self.feed(SagaEvent::TimerFired {
            saga: self.id.clone(),
            timer,
        })
    }

    fn abort(&mut self, reason: &str) -> Vec<String> {
        self.feed(SagaEvent::OperatorAbort {
            saga: self.id.clone(),
            reason: reason.to_string(),
        })
    }

    /// Restarts the coordinator: a fresh engine recovers the saga from `progress`.
    fn recover(&mut self, progress: Option<SagaProgress>) -> Vec<String> {
        self.engine = SagaEngine::new(self.config.clone(), ENGINE_SEED + 1);
        self.last_seq = progress.as_ref().map_or(0, |p| p.seq);
        self.feed(SagaEvent::Recovered {
            saga: self.id.clone(),
            spec: self.spec.clone(),
            fingerprint: FINGERPRINT,
            accepted_ms: T0_MS,
            progress,
        })
    }

    /// Submits and accepts the saga: every step that waits for nothing starts.
    fn start(&mut self) {
        assert_eq!(self.submit(), ["persist spec (forced)"]);
        let mut expected = vec![
            "reply accepted".to_string(),
            format!("notify Accepted: {} steps", self.spec.steps.len()),
        ];
        for (i, step) in self.spec.steps.iter().enumerate() {
            if step.after.is_empty() {
                expected.push(format!("action {} #1", name(i as StepIdx)));
                expected.push(format!("notify StepStarted {} #1", name(i as StepIdx)));
            }
        }
        expected.push("persist progress".to_string());
        assert_eq!(self.accepted(), expected);
    }

    fn status(&self) -> SagaStatus {
        self.engine.status(&self.id).expect("the saga is in flight")
    }

    fn phases(&self) -> Vec<StepPhase> {
        self.status().steps.iter().map(|s| s.phase).collect()
    }

    fn last_record(&self) -> SagaProgress {
        self.records.last().cloned().expect("a record was written")
    }

    /// The outcome is made durable, then every compensation in `queue` succeeds at its first
    /// attempt, in that order; the saga ends with `outcome`.
    fn compensate_in_order(&mut self, queue: &[StepIdx], outcome: &SagaOutcome) {
        let why = match outcome {
            SagaOutcome::Compensated {
                failed_step,
                reason,
            } => format!("step {failed_step} failed: {reason}"),
            SagaOutcome::Aborted { reason } => format!("aborted by an operator: {reason}"),
            SagaOutcome::Completed => panic!("nothing to compensate"),
        };
        assert_eq!(self.status().outcome, None, "hidden until durable");
        assert_eq!(
            self.durable(),
            [
                format!("notify CompensationStarted: {why}"),
                format!("compensate {} #1", name(queue[0])),
                format!("notify CompensationStarted {} #1", name(queue[0])),
                "persist progress".to_string(),
            ]
        );
        assert_eq!(self.status().outcome.as_ref(), Some(outcome));
        for (k, &step) in queue.iter().enumerate() {
            let phases = self.phases();
            assert_eq!(phases[step as usize], StepPhase::Compensating);
            for &done in &queue[..k] {
                assert_eq!(phases[done as usize], StepPhase::Compensated);
            }
            let mut expected = vec![format!("notify StepCompensated {} #1", name(step))];
            match queue.get(k + 1) {
                Some(&next) => expected.extend([
                    format!("compensate {} #1", name(next)),
                    format!("notify CompensationStarted {} #1", name(next)),
                    "persist progress".to_string(),
                ]),
                None => {
                    expected.push(format!("notify Finished: {outcome}"));
                    expected.push(format!("terminal: {outcome}"));
                    if self.spec.callback.is_some() {
                        expected.push(format!("callback #1: {outcome}"));
                        expected.push("persist progress".to_string());
                    } else {
                        expected.push("persist progress".to_string());
                        expected.push("finished".to_string());
                    }
                }
            }
            assert_eq!(
                self.compensation(step, 1, true),
                expected,
                "compensating {}",
                name(step)
            );
        }
        let last = self.last_record();
        assert_eq!(last.outcome.as_ref(), Some(outcome));
        assert!(last.compensation_queue.is_empty());
    }
}

// ----------------------------------------------------------------------------------------
// Acceptance
// ----------------------------------------------------------------------------------------

#[test]
fn submit_forces_the_spec_and_nothing_leaves_before_it_is_durable() {
    let spec = sequence(2);
    let mut s = Scenario::new(spec.clone());
    let id = s.id.clone();
    assert_eq!(
        s.raw(SagaEvent::Submit {
            saga: id.clone(),
            spec: spec.clone(),
            fingerprint: FINGERPRINT,
        }),
        vec![SagaEffect::PersistSpec {
            saga: id.clone(),
            spec,
            fingerprint: FINGERPRINT,
            accepted_ms: T0_MS,
        }]
    );
    assert_eq!(
        s.status(),
        SagaStatus {
            phase: SagaPhase::Accepting,
            outcome: None,
            steps: vec![
                StepStatus {
                    phase: StepPhase::Pending,
                    action_attempts: 0,
                    compensation_attempts: 0,
                    last_error: None,
                };
                2
            ],
            stuck: false,
            callback_delivered: false,
            accepted_ms: T0_MS,
            held: false,
        }
    );
    assert_eq!(s.engine.fingerprint(&id), Some(&FINGERPRINT));
    assert_eq!(s.engine.in_flight(), 1);

    // Nothing was sent, so nothing can be answered; stray events change nothing.
    s.at(1);
    assert_eq!(s.succeed(0, 1), nothing());
    assert_eq!(s.unavailable(0, 1), nothing());
    assert_eq!(s.durable(), nothing());
    assert_eq!(
        s.abort("too early"),
        nothing(),
        "only an accepted saga is aborted"
    );
    assert_eq!(
        s.fire(SagaTimer::RetryAction {
            step: 0,
            attempt: 2
        }),
        nothing()
    );
    assert_eq!(s.callback(1, true), nothing());
    assert_eq!(s.status().phase, SagaPhase::Accepting);

    // Durable: the submitter hears, and the first step starts.
    s.at(2);
    let effects = s.raw(SagaEvent::Accepted { saga: id.clone() });
    let progress = SagaProgress {
        seq: 2,
        phase: SagaPhase::Running,
        outcome: None,
        steps: vec![
            StepProgress {
                phase: StepPhase::Running,
                action_attempts: 1,
                compensation_attempts: 0,
                compensation_failures: 0,
                last_error: None,
                first_sent_ms: Some(T0_MS + 2),
            },
            StepProgress::new(),
        ],
        started_order: vec![0],
        succeeded_order: vec![],
        compensation_queue: vec![],
        stuck: false,
        recovered: false,
        callback_attempts: 0,
        callback_delivered: false,
    };
    let change = |seq, kind, step, attempt, detail: &str| SagaEffect::Notify {
        saga: id.clone(),
        change: SagaChange {
            seq,
            at_ms: T0_MS + 2,
            kind,
            step,
            attempt,
            detail: detail.to_string(),
            outcome: None,
        },
    };
    assert_eq!(
        effects,
        vec![
            SagaEffect::ReplyAccepted { saga: id.clone() },
            change(1, ChangeKind::Accepted, None, 0, "2 steps"),
            SagaEffect::SendAction {
                saga: id.clone(),
                step: 0,
                attempt: 1,
                target: target(0),
                payload: b"do-a".to_vec(),
                timeout_ms: TIMEOUT_MS,
            },
            change(2, ChangeKind::StepStarted, Some(0), 1, ""),
            SagaEffect::PersistProgress {
                saga: id.clone(),
                progress,
            },
        ]
    );
    assert_eq!(
        s.engine.changes_so_far(&id).map(|c| c.len()),
        Some(2),
        "late watchers can catch up"
    );

    assert_eq!(s.accepted(), nothing(), "a duplicate flush changes nothing");
    assert_eq!(s.status().phase, SagaPhase::Running);
}

// ----------------------------------------------------------------------------------------
// Sequences and graphs that complete
// ----------------------------------------------------------------------------------------

#[test]
fn sequence_runs_one_step_at_a_time_and_completes() {
    let mut s = Scenario::new(sequence(3));
    s.start();
    assert_eq!(
        s.succeed(0, 1),
        [
            "notify StepSucceeded a #1",
            "action b #1",
            "notify StepStarted b #1",
            "persist progress"
        ]
    );
    use StepPhase::*;
    assert_eq!(s.phases(), [Succeeded, Running, Pending]);
    assert_eq!(
        s.succeed(1, 1),
        [
            "notify StepSucceeded b #1",
            "action c #1",
            "notify StepStarted c #1",
            "persist progress"
        ]
    );
    // The last success decides: the outcome is forced and revealed to nobody yet.
    assert_eq!(
        s.succeed(2, 1),
        [
            "notify StepSucceeded c #1",
            "persist outcome (forced): completed"
        ]
    );
    let status = s.status();
    assert_eq!(status.phase, SagaPhase::Completed);
    assert_eq!(status.outcome, None, "not reported before it is durable");
    assert_eq!(s.engine.outcome_durable(&s.id), Some(false), "nor that way");
    assert_eq!(s.abort("late"), nothing(), "no abort once completed");
    // The outcome record already holds everything: a completed saga without a callback
    // writes nothing more.
    assert_eq!(
        s.durable(),
        [
            "notify Finished: completed",
            "terminal: completed",
            "finished"
        ]
    );
    assert_eq!(
        s.engine.status(&s.id),
        None,
        "a finished saga leaves the engine"
    );
    assert_eq!(s.engine.in_flight(), 0);
    let last = s.last_record();
    assert_eq!(last.succeeded_order, [0, 1, 2]);
    assert_eq!(last.outcome, Some(SagaOutcome::Completed));
    assert!(last.is_finished(&s.spec));
    assert_eq!(last.status(T0_MS).phase, SagaPhase::Completed);
}

#[test]
fn diamond_runs_the_middle_steps_concurrently_and_joins_on_both() {
    let mut s = Scenario::new(diamond());
    s.start();
    assert_eq!(
        s.succeed(0, 1),
        [
            "notify StepSucceeded a #1",
            "action b #1",
            "notify StepStarted b #1",
            "action c #1",
            "notify StepStarted c #1",
            "persist progress"
        ]
    );
    use StepPhase::*;
    assert_eq!(s.phases(), [Succeeded, Running, Running, Pending]);
    // c answers first: d still waits for b.
    assert_eq!(
        s.succeed(2, 1),
        ["notify StepSucceeded c #1", "persist progress"]
    );
    assert_eq!(s.phases(), [Succeeded, Running, Succeeded, Pending]);
    assert_eq!(
        s.succeed(1, 1),
        [
            "notify StepSucceeded b #1",
            "action d #1",
            "notify StepStarted d #1",
            "persist progress"
        ]
    );
    assert_eq!(
        s.succeed(3, 1),
        [
            "notify StepSucceeded d #1",
            "persist outcome (forced): completed"
        ]
    );
    assert_eq!(s.last_record().succeeded_order, [0, 2, 1, 3]);
    assert_eq!(
        s.durable(),
        [
            "notify Finished: completed",
            "terminal: completed",
            "finished"
        ]
    );
}

#[test]
fn independent_steps_all_start_when_the_saga_is_accepted() {
    let mut s = Scenario::new(graph(&[&[], &[], &[0, 1]]));
    s.start(); // asserts a and b start together
    assert_eq!(
        s.succeed(1, 1),
        ["notify StepSucceeded b #1", "persist progress"]
    );
    assert_eq!(
        s.succeed(0, 1),
        [
            "notify StepSucceeded a #1",
            "action c #1",
            "notify StepStarted c #1",
            "persist progress"
        ]
    );
}

#[test]
fn a_lone_step_completes_and_its_callback_is_sent_once_durable() {
    let mut s = Scenario::new(with_callback(sequence(1)));
    s.start();
    assert_eq!(
        s.succeed(0, 1),
        [
            "notify StepSucceeded a #1",
            "persist outcome (forced): completed"
        ]
    );
    assert_eq!(
        s.durable(),
        [
            "notify Finished: completed",
            "terminal: completed",
            "callback #1: completed",
            "persist progress"
        ]
    );
    let status = s.status();
    assert_eq!(status.outcome, Some(SagaOutcome::Completed));
    assert_eq!(s.engine.outcome_durable(&s.id), Some(true));
    assert!(!status.callback_delivered);
    assert_eq!(s.callback(1, true), ["persist progress", "finished"]);
    assert_eq!(s.engine.outcome_durable(&s.id), None, "no longer in flight");
    assert!(s.last_record().callback_delivered);
    assert_eq!(s.engine.in_flight(), 0);
}

// ----------------------------------------------------------------------------------------
// Business failures
// ----------------------------------------------------------------------------------------

/// A three-step sequence whose step `failing` meets a business failure: the steps before it
/// and itself are compensated, newest first; the steps after it are skipped.
fn assert_business_failure_in_a_sequence(failing: StepIdx) {
    let mut s = Scenario::new(sequence(3));
    s.start();
    for i in 0..failing {
        s.succeed(i, 1);
    }
    let outcome = compensated(failing, REASON);
    assert_eq!(
        s.fail(failing, 1),
        [
            format!("notify StepFailed {} #1: {REASON}", name(failing)),
            format!("persist outcome (forced): {outcome}"),
        ]
    );
    let status = s.status();
    assert_eq!(status.phase, SagaPhase::Compensating);
    assert_eq!(status.outcome, None);
    let expected: Vec<StepPhase> = (0..3)
        .map(|i| match i.cmp(&failing) {
            std::cmp::Ordering::Less => StepPhase::Succeeded,
            std::cmp::Ordering::Equal => StepPhase::Failed,
            std::cmp::Ordering::Greater => StepPhase::Skipped,
        })
        .collect();
    assert_eq!(s.phases(), expected, "failing {}", name(failing));
    assert_eq!(
        status.steps[failing as usize].last_error.as_deref(),
        Some(REASON)
    );
    let queue: Vec<StepIdx> = (0..=failing).rev().collect();
    assert_eq!(s.last_record().compensation_queue, queue);
    s.compensate_in_order(&queue, &outcome);
    let last = s.last_record();
    for i in failing + 1..3 {
        assert_eq!(last.steps[i as usize].phase, StepPhase::Skipped);
    }
    assert_eq!(s.engine.in_flight(), 0);
}

#[test]
fn business_failure_of_the_first_step_compensates_only_it() {
    assert_business_failure_in_a_sequence(0);
}

#[test]
fn business_failure_of_the_middle_step_compensates_it_then_the_first() {
    assert_business_failure_in_a_sequence(1);
}

#[test]
fn business_failure_of_the_last_step_compensates_every_step_newest_first() {
    assert_business_failure_in_a_sequence(2);
}

#[test]
fn failure_in_a_graph_compensates_the_sibling_still_in_flight_first() {
    let mut s = Scenario::new(diamond());
    s.start();
    s.succeed(0, 1); // b and c start, b first
    let outcome = compensated(1, REASON);
    assert_eq!(
        s.fail(1, 1),
        [
            format!("notify StepFailed b #1: {REASON}"),
            format!("persist outcome (forced): {outcome}"),
        ]
    );
    use StepPhase::*;
    assert_eq!(s.phases(), [Succeeded, Failed, Running, Skipped]);
    // c was sent after b, so it goes first; then b; then a.
    assert_eq!(s.last_record().compensation_queue, [2, 1, 0]);
    // c's answer arrives now: too late to matter, whatever it says.
    assert_eq!(s.succeed(2, 1), nothing());
    assert_eq!(s.unavailable(2, 1), nothing());
    s.compensate_in_order(&[2, 1, 0], &outcome);
}

#[test]
fn failure_in_a_graph_compensates_a_succeeded_sibling_after_the_failed_step() {
    let mut s = Scenario::new(diamond());
    s.start();
    s.succeed(0, 1);
    s.succeed(2, 1);
    let outcome = compensated(1, REASON);
    s.fail(1, 1);
    use StepPhase::*;
    assert_eq!(s.phases(), [Succeeded, Failed, Succeeded, Skipped]);
    // b never succeeded: first. Then c and a in reverse order of completion.
    s.compensate_in_order(&[1, 2, 0], &outcome);
}

#[test]
fn reordered_answers_in_a_graph_give_the_same_outcome_and_queue() {
    // b succeeds then c fails, or c fails while b is in flight: the same saga either way.
    for b_first in [true, false] {
        let mut s = Scenario::new(diamond());
        s.start();
        s.succeed(0, 1);
        if b_first {
            s.succeed(1, 1);
        }
        s.fail(2, 1);
        if !b_first {
            assert_eq!(s.succeed(1, 1), nothing(), "b answers after the decision");
        }
        assert_eq!(
            s.last_record().compensation_queue,
            [2, 1, 0],
            "b first: {b_first}"
        );
        s.compensate_in_order(&[2, 1, 0], &compensated(2, REASON));
    }
}

// ----------------------------------------------------------------------------------------
// Retries of actions
// ----------------------------------------------------------------------------------------

#[test]
fn unavailable_action_is_retried_with_jittered_backoff_until_it_succeeds() {
    let mut s = Scenario::new(with_retry(sequence(1), 0, 0));
    s.start();
    let mut delays_ms = Vec::new();
    for retry in 0..8u32 {
        let attempt = retry + 1;
        let now_ms = s.now_ms;
        let effects = s.raw(SagaEvent::ActionAnswered {
            saga: s.id.clone(),
            step: 0,
            attempt,
            answer: ActionAnswer::Unavailable {
                error: ERROR.to_string(),
            },
        });
        let at_ms = assert_one_timer(&effects, now_ms, &ACTION_BACKOFF, retry);
        let delay_ms = at_ms - now_ms;
        delays_ms.push(delay_ms);
        assert_eq!(
            effects.iter().map(render).collect::<Vec<_>>(),
            [
                format!("timer retry action a #{}", attempt + 1),
                format!(
                    "notify StepRetried a #{attempt}: {ERROR}; attempt {} in {delay_ms} ms",
                    attempt + 1
                ),
                "persist progress".to_string(),
            ]
        );
        let status = s.status();
        assert_eq!(status.steps[0].action_attempts, attempt);
        assert_eq!(status.steps[0].last_error.as_deref(), Some(ERROR));
        assert_eq!(status.steps[0].phase, StepPhase::Running);
        // A duplicate of that failure arms nothing more.
        assert_eq!(s.unavailable(0, attempt), nothing());
        s.now_ms = at_ms;
        assert_eq!(
            s.fire(SagaTimer::RetryAction {
                step: 0,
                attempt: attempt + 1
            }),
            [
                format!("action a #{}", attempt + 1),
                format!("notify StepStarted a #{}", attempt + 1),
                "persist progress".to_string(),
            ]
        );
    }
    let capped_ms = &delays_ms[4..];
    assert!(
        capped_ms.iter().any(|&d| d != capped_ms[0]),
        "no jitter in {delays_ms:?}"
    );
    assert_eq!(
        s.succeed(0, 9),
        [
            "notify StepSucceeded a #9",
            "persist outcome (forced): completed"
        ]
    );
}

#[test]
fn retries_exhausted_by_count_fail_the_step_and_the_saga_compensates() {
    let mut s = Scenario::new(with_retry(sequence(2), 3, 0));
    s.start();
    s.succeed(0, 1);
    for attempt in 1..3 {
        let now_ms = s.now_ms;
        let effects = s.raw(SagaEvent::ActionAnswered {
            saga: s.id.clone(),
            step: 1,
            attempt,
            answer: ActionAnswer::Unavailable {
                error: ERROR.to_string(),
            },
        });
        s.now_ms = assert_one_timer(&effects, now_ms, &ACTION_BACKOFF, attempt - 1);
        s.fire(SagaTimer::RetryAction {
            step: 1,
            attempt: attempt + 1,
        });
    }
    let reason = format!("retries exhausted after 3 attempts (attempts_max 3): {ERROR}");
    let outcome = compensated(1, &reason);
    assert_eq!(
        s.unavailable(1, 3),
        [
            format!("notify StepFailed b #3: {reason}"),
            format!("persist outcome (forced): {outcome}"),
        ]
    );
    let status = s.status();
    assert_eq!(status.steps[1].phase, StepPhase::Failed);
    assert_eq!(status.steps[1].action_attempts, 3);
    assert_eq!(status.steps[1].last_error.as_deref(), Some(reason.as_str()));
    s.compensate_in_order(&[1, 0], &outcome);
}

#[test]
fn retries_exhausted_by_deadline_fail_the_step_at_the_answer_or_at_the_timer() {
    // The failure comes after the deadline: no new attempt, the step fails at once.
    let mut s = Scenario::new(with_retry(sequence(1), 0, 1_000));
    s.start();
    s.at(10);
    let effects = s.raw(SagaEvent::ActionAnswered {
        saga: s.id.clone(),
        step: 0,
        attempt: 1,
        answer: ActionAnswer::Unavailable {
            error: ERROR.to_string(),
        },
    });
    s.now_ms = assert_one_timer(&effects, T0_MS + 10, &ACTION_BACKOFF, 0);
    s.fire(SagaTimer::RetryAction {
        step: 0,
        attempt: 2,
    });
    s.at(1_000);
    let reason =
        format!("retries exhausted after 2 attempts (deadline of 1000 ms passed): {ERROR}");
    assert_eq!(
        s.unavailable(0, 2),
        [
            format!("notify StepFailed a #2: {reason}"),
            format!("persist outcome (forced): {}", compensated(0, &reason)),
        ]
    );
    s.compensate_in_order(&[0], &compensated(0, &reason));

    // The failure comes before the deadline but the retry would start after it: the step
    // fails when the timer fires, without sending.
    let mut s = Scenario::new(with_retry(sequence(1), 0, 1_000));
    s.start();
    s.at(990);
    let effects = s.raw(SagaEvent::ActionAnswered {
        saga: s.id.clone(),
        step: 0,
        attempt: 1,
        answer: ActionAnswer::Unavailable {
            error: ERROR.to_string(),
        },
    });
    s.now_ms = assert_one_timer(&effects, T0_MS + 990, &ACTION_BACKOFF, 0);
    let reason = format!("retries exhausted after 1 attempt (deadline of 1000 ms passed): {ERROR}");
    assert_eq!(
        s.fire(SagaTimer::RetryAction {
            step: 0,
            attempt: 2
        }),
        [
            format!("notify StepFailed a #1: {reason}"),
            format!("persist outcome (forced): {}", compensated(0, &reason)),
        ]
    );
}

// ----------------------------------------------------------------------------------------
// Compensation retries and the stuck flag
// ----------------------------------------------------------------------------------------

#[test]
fn failing_compensation_is_retried_without_limit_with_capped_backoff_then_succeeds() {
    let config = SagaEngineConfig {
        stuck_after_failures: 0,
        ..SagaEngineConfig::default()
    };
    let backoff = config.compensation_backoff;
    assert_eq!(
        (backoff.initial_ms, backoff.multiplier, backoff.max_ms),
        (50, 2.0, 5_000)
    );
    let mut s = Scenario::with_config(sequence(1), config);
    s.start();
    s.fail(0, 1);
    s.durable();
    let mut delays_ms = Vec::new();
    for retry in 0..14u32 {
        let attempt = retry + 1;
        let now_ms = s.now_ms;
        let effects = s.raw(SagaEvent::CompensationAnswered {
            saga: s.id.clone(),
            step: 0,
            attempt,
            answer: Err(COMPENSATION_ERROR.to_string()),
        });
        let at_ms = assert_one_timer(&effects, now_ms, &backoff, retry);
        let delay_ms = at_ms - now_ms;
        delays_ms.push(delay_ms);
        assert_eq!(
            effects.iter().map(render).collect::<Vec<_>>(),
            [
                format!("timer retry compensation a #{}", attempt + 1),
                format!(
                    "notify CompensationRetried a #{attempt}: {COMPENSATION_ERROR}; attempt {} in {delay_ms} ms",
                    attempt + 1
                ),
                "persist progress".to_string(),
            ]
        );
        assert_eq!(
            s.compensation(0, attempt, false),
            nothing(),
            "duplicate failure"
        );
        let status = s.status();
        assert!(!status.stuck, "stuck_after_failures 0 never flags");
        assert_eq!(status.steps[0].compensation_attempts, attempt);
        assert_eq!(
            status.steps[0].last_error.as_deref(),
            Some(COMPENSATION_ERROR)
        );
        s.now_ms = at_ms;
        assert_eq!(
            s.fire(SagaTimer::RetryCompensation {
                step: 0,
                attempt: attempt + 1
            }),
            [
                format!("compensate a #{}", attempt + 1),
                format!("notify CompensationStarted a #{}", attempt + 1),
                "persist progress".to_string(),
            ]
        );
    }
    let capped_ms = &delays_ms[7..];
    assert!(capped_ms.iter().all(|&d| d <= 5_000));
    assert!(
        capped_ms.iter().any(|&d| d != capped_ms[0]),
        "no jitter in {delays_ms:?}"
    );
    let outcome = compensated(0, REASON);
    assert_eq!(
        s.compensation(0, 15, true),
        [
            "notify StepCompensated a #15".to_string(),
            format!("notify Finished: {outcome}"),
            format!("terminal: {outcome}"),
            "persist progress".to_string(),
            "finished".to_string(),
        ]
    );
}

#[test]
fn stuck_is_flagged_once_after_n_failures_in_a_row_and_cleared_by_success() {
    let config = SagaEngineConfig {
        stuck_after_failures: 3,
        ..SagaEngineConfig::default()
    };
    let mut s = Scenario::with_config(sequence(2), config);
    s.start();
    s.succeed(0, 1);
    s.fail(1, 1);
    s.durable(); // compensating b #1
    let fail_and_retry = |s: &mut Scenario, step: StepIdx, attempt: u32| -> Vec<String> {
        let lines = s.compensation(step, attempt, false);
        s.now_ms += 10_000;
        s.fire(SagaTimer::RetryCompensation {
            step,
            attempt: attempt + 1,
        });
        lines
    };
    for attempt in 1..3 {
        let lines = fail_and_retry(&mut s, 1, attempt);
        assert!(!lines.iter().any(|l| l.contains("Stuck")), "{lines:?}");
        assert!(!s.status().stuck);
    }
    let lines = fail_and_retry(&mut s, 1, 3);
    assert_eq!(
        lines[2],
        format!(
            "notify Stuck b #3: the compensation of step b failed 3 times in a row; last error: {COMPENSATION_ERROR}"
        )
    );
    assert_eq!(lines[3], "persist progress");
    let status = s.status();
    assert!(status.stuck);
    assert_eq!(
        status.steps[1].last_error.as_deref(),
        Some(COMPENSATION_ERROR)
    );
    assert!(s.last_record().stuck, "the flag survives a restart");
    // Still failing: still retried, flagged once only.
    let lines = fail_and_retry(&mut s, 1, 4);
    assert_eq!(lines.len(), 3, "no second Stuck: {lines:?}");
    assert!(s.status().stuck);
    // Success clears it; the next compensation counts its own failures from zero.
    assert_eq!(
        s.compensation(1, 5, true),
        [
            "notify StepCompensated b #5",
            "compensate a #1",
            "notify CompensationStarted a #1",
            "persist progress"
        ]
    );
    assert!(!s.status().stuck);
    for attempt in 1..3 {
        fail_and_retry(&mut s, 0, attempt);
        assert!(
            !s.status().stuck,
            "two failures of a are not three in a row"
        );
    }
    let lines = s.compensation(0, 3, true);
    assert_eq!(lines[0], "notify StepCompensated a #3");
    assert_eq!(s.engine.in_flight(), 0);
}

// ----------------------------------------------------------------------------------------
// Duplicates, stragglers, stale timers, unknown sagas
// ----------------------------------------------------------------------------------------

#[test]
fn duplicate_answers_and_flushes_change_nothing() {
    let mut s = Scenario::new(with_callback(sequence(2)));
    s.start();
    assert_eq!(s.accepted(), nothing());
    assert_eq!(s.succeed(0, 1).len(), 4);
    assert_eq!(s.succeed(0, 1), nothing(), "a duplicate success");
    assert_eq!(s.unavailable(1, 1).len(), 3);
    assert_eq!(
        s.unavailable(1, 1),
        nothing(),
        "a duplicate failure arms no second timer"
    );
    let retry = SagaTimer::RetryAction {
        step: 1,
        attempt: 2,
    };
    assert_eq!(s.fire(retry).len(), 3);
    assert_eq!(s.fire(retry), nothing(), "a duplicate timer");
    assert_eq!(s.fail(1, 2).len(), 2);
    assert_eq!(s.fail(1, 2), nothing(), "a duplicate business failure");
    assert_eq!(s.durable().len(), 4);
    assert_eq!(s.durable(), nothing(), "a duplicate flush");
    assert_eq!(s.compensation(1, 1, false).len(), 3);
    assert_eq!(
        s.compensation(1, 1, false),
        nothing(),
        "a duplicate failure"
    );
    s.fire(SagaTimer::RetryCompensation {
        step: 1,
        attempt: 2,
    });
    assert_eq!(s.compensation(1, 2, true).len(), 4);
    assert_eq!(s.compensation(1, 2, true), nothing(), "a duplicate success");
    let outcome = compensated(1, REASON);
    assert_eq!(
        s.compensation(0, 1, true),
        [
            "notify StepCompensated a #1".to_string(),
            format!("notify Finished: {outcome}"),
            format!("terminal: {outcome}"),
            format!("callback #1: {outcome}"),
            "persist progress".to_string(),
        ]
    );
    assert_eq!(s.compensation(0, 1, true), nothing());
    assert_eq!(s.callback(1, false).len(), 1);
    assert_eq!(
        s.callback(1, false),
        nothing(),
        "a duplicate callback failure"
    );
    s.fire(SagaTimer::RetryCallback { attempt: 2 });
    assert_eq!(s.callback(2, true), ["persist progress", "finished"]);
    assert_eq!(s.callback(2, true), nothing(), "after finishing");
}

#[test]
fn answers_for_another_attempt_or_step_are_ignored() {
    let mut s = Scenario::new(sequence(2));
    s.start();
    for attempt in [0, 2, 7] {
        assert_eq!(s.succeed(0, attempt), nothing(), "attempt {attempt}");
        assert_eq!(s.fail(0, attempt), nothing(), "attempt {attempt}");
        assert_eq!(s.unavailable(0, attempt), nothing(), "attempt {attempt}");
    }
    assert_eq!(s.succeed(1, 1), nothing(), "b was never sent");
    assert_eq!(s.succeed(99, 1), nothing(), "no such step");
    assert_eq!(
        s.compensation(0, 1, true),
        nothing(),
        "nothing is compensating"
    );
    assert_eq!(s.callback(1, true), nothing(), "no callback");
    s.unavailable(0, 1);
    s.fire(SagaTimer::RetryAction {
        step: 0,
        attempt: 2,
    });
    assert_eq!(s.succeed(0, 1), nothing(), "attempt 1 is superseded by 2");
    s.succeed(0, 2);
    s.fail(1, 1);
    assert_eq!(
        s.compensation(1, 1, true),
        nothing(),
        "before the outcome is durable"
    );
    s.durable(); // compensate b #1
    assert_eq!(
        s.compensation(0, 1, true),
        nothing(),
        "a is not at the head"
    );
    assert_eq!(
        s.compensation(1, 2, true),
        nothing(),
        "attempt 2 was never sent"
    );
    assert_eq!(s.compensation(1, 1, true).len(), 4);
    use StepPhase::*;
    assert_eq!(s.phases(), [Compensating, Compensated]);
}

#[test]
fn stale_timers_are_ignored() {
    let mut s = Scenario::new(with_callback(diamond()));
    s.start();
    s.unavailable(0, 1);
    let stale = [
        SagaTimer::RetryAction {
            step: 0,
            attempt: 3,
        },
        SagaTimer::RetryAction {
            step: 0,
            attempt: 1,
        },
        SagaTimer::RetryAction {
            step: 1,
            attempt: 2,
        },
        SagaTimer::RetryAction {
            step: 99,
            attempt: 2,
        },
        SagaTimer::RetryCompensation {
            step: 0,
            attempt: 2,
        },
        SagaTimer::RetryCallback { attempt: 2 },
    ];
    for timer in stale {
        assert_eq!(s.fire(timer), nothing(), "{timer:?}");
    }
    // a succeeds while its retry is armed: the definite answer wins, the timer is stale.
    s.succeed(0, 1);
    assert_eq!(
        s.fire(SagaTimer::RetryAction {
            step: 0,
            attempt: 2
        }),
        nothing()
    );
    // b waits to retry when c fails: compensation is decided, b's timer is stale.
    s.unavailable(1, 1);
    s.fail(2, 1);
    assert_eq!(
        s.fire(SagaTimer::RetryAction {
            step: 1,
            attempt: 2
        }),
        nothing()
    );
    s.durable(); // queue: c, b, a
    assert_eq!(
        s.fire(SagaTimer::RetryCompensation {
            step: 2,
            attempt: 2
        }),
        nothing(),
        "no failure armed it"
    );
    for step in [2, 1, 0] {
        s.compensation(step, 1, true);
    }
    assert_eq!(s.fire(SagaTimer::RetryCallback { attempt: 2 }), nothing());
    s.callback(1, true);
    assert_eq!(s.engine.in_flight(), 0);
    assert_eq!(
        s.fire(SagaTimer::RetryCallback { attempt: 2 }),
        nothing(),
        "after finishing"
    );
}

#[test]
fn events_for_an_unknown_saga_emit_nothing() {
    let mut s = Scenario::new(sequence(1));
    let events = [
        SagaEvent::Accepted { saga: s.id.clone() },
        SagaEvent::OutcomeDurable { saga: s.id.clone() },
        SagaEvent::ActionAnswered {
            saga: s.id.clone(),
            step: 0,
            attempt: 1,
            answer: ActionAnswer::Succeeded,
        },
        SagaEvent::CompensationAnswered {
            saga: s.id.clone(),
            step: 0,
            attempt: 1,
            answer: Ok(()),
        },
        SagaEvent::CallbackAnswered {
            saga: s.id.clone(),
            attempt: 1,
            answer: Ok(()),
        },
        SagaEvent::TimerFired {
            saga: s.id.clone(),
            timer: SagaTimer::RetryCallback { attempt: 2 },
        },
        SagaEvent::OperatorAbort {
            saga: s.id.clone(),
            reason: "whatever".to_string(),
        },
    ];
    for event in events {
        assert_eq!(s.feed(event.clone()), nothing(), "{event:?}");
    }
    assert_eq!(s.engine.in_flight(), 0);
    assert_eq!(s.engine.status(&s.id), None);
    assert_eq!(s.engine.fingerprint(&s.id), None);
    assert_eq!(s.engine.changes_so_far(&s.id), None);
}

#[test]
#[should_panic(expected = "in flight")]
fn submit_for_a_saga_in_flight_stops_the_engine() {
    let mut s = Scenario::new(sequence(1));
    s.submit();
    s.submit();
}

#[test]
#[should_panic(expected = "invalid spec")]
fn a_spec_with_a_cycle_stops_the_engine() {
    let mut s = Scenario::new(graph(&[&[1], &[0]]));
    s.submit();
}

#[test]
fn validate_graph_refuses_what_the_engine_cannot_run() {
    assert_eq!(sequence(3).validate_graph(), Ok(()));
    assert_eq!(diamond().validate_graph(), Ok(()));
    let cases: Vec<(SagaSpec, &str)> = vec![
        (graph(&[]), "a saga needs at least one step"),
        (
            graph(&[&[], &[3]]),
            "step \"b\" waits for step #3, but the saga has 2 steps",
        ),
        (graph(&[&[0]]), "step \"a\" waits for itself"),
        (
            graph(&[&[], &[0, 0]]),
            "step \"b\" waits for step \"a\" twice",
        ),
        (
            graph(&[&[2], &[0], &[1]]),
            "the steps' dependencies form a cycle",
        ),
        (
            {
                let mut spec = sequence(2);
                spec.steps[1].name = "a".to_string();
                spec
            },
            "step #1: the name \"a\" is used twice",
        ),
    ];
    for (spec, error) in cases {
        assert_eq!(spec.validate_graph(), Err(error.to_string()));
    }
}

// ----------------------------------------------------------------------------------------
// Operator abort
// ----------------------------------------------------------------------------------------

#[test]
fn operator_abort_compensates_every_attempted_step_and_ends_aborted() {
    let mut s = Scenario::new(with_callback(diamond()));
    s.start();
    s.succeed(0, 1); // b and c in flight
    let outcome = SagaOutcome::Aborted {
        reason: "wrong amount".to_string(),
    };
    assert_eq!(
        s.abort("wrong amount"),
        ["persist outcome (forced): aborted by an operator: wrong amount"]
    );
    use StepPhase::*;
    assert_eq!(s.phases(), [Succeeded, Running, Running, Skipped]);
    assert_eq!(s.status().phase, SagaPhase::Compensating);
    assert_eq!(s.abort("again"), nothing(), "already compensating");
    assert_eq!(s.succeed(1, 1), nothing(), "b's answer comes too late");
    s.compensate_in_order(&[2, 1, 0], &outcome);
    assert_eq!(s.abort("after the end"), nothing());
    assert_eq!(s.callback(1, true), ["persist progress", "finished"]);
}

#[test]
fn operator_abort_of_a_saga_that_is_not_running_does_nothing() {
    // Compensating after a business failure: the outcome stays Compensated.
    let mut s = Scenario::new(sequence(2));
    s.start();
    s.fail(0, 1);
    assert_eq!(s.abort("too late"), nothing(), "deciding");
    s.durable();
    assert_eq!(s.abort("too late"), nothing(), "compensating");
    let outcome = compensated(0, REASON);
    assert_eq!(
        s.compensation(0, 1, true),
        [
            "notify StepCompensated a #1".to_string(),
            format!("notify Finished: {outcome}"),
            format!("terminal: {outcome}"),
            "persist progress".to_string(),
            "finished".to_string(),
        ]
    );
}

#[test]
fn operator_retry_sends_a_waiting_action_now_and_its_timer_goes_stale() {
    let mut s = Scenario::new(with_retry(sequence(2), 0, 0));
    s.start();
    assert_eq!(
        s.feed(SagaEvent::OperatorRetry { saga: s.id.clone() }),
        nothing(),
        "the first attempt is in flight"
    );
    let effects = s.raw(SagaEvent::ActionAnswered {
        saga: s.id.clone(),
        step: 0,
        attempt: 1,
        answer: ActionAnswer::Unavailable {
            error: ERROR.to_string(),
        },
    });
    let at_ms = assert_one_timer(&effects, s.now_ms, &ACTION_BACKOFF, 0);
    assert_eq!(
        s.engine.retries_due(&s.id),
        Some(vec![(
            SagaTimer::RetryAction {
                step: 0,
                attempt: 2
            },
            at_ms
        )])
    );
    assert_eq!(
        s.feed(SagaEvent::OperatorRetry { saga: s.id.clone() }),
        ["action a #2", "notify StepStarted a #2", "persist progress"]
    );
    assert_eq!(s.engine.retries_due(&s.id), Some(vec![]));
    s.now_ms = at_ms;
    assert_eq!(
        s.fire(SagaTimer::RetryAction {
            step: 0,
            attempt: 2
        }),
        nothing(),
        "the timer of the attempt sent early is stale"
    );
    assert_eq!(
        s.succeed(0, 2),
        [
            "notify StepSucceeded a #2",
            "action b #1",
            "notify StepStarted b #1",
            "persist progress"
        ]
    );
}

#[test]
fn operator_retry_sends_a_failing_compensation_now_and_the_saga_finishes() {
    let mut s = Scenario::new(sequence(1));
    s.start();
    s.fail(0, 1);
    assert_eq!(
        s.feed(SagaEvent::OperatorRetry { saga: s.id.clone() }),
        nothing(),
        "the outcome is being forced"
    );
    s.durable();
    let effects = s.raw(SagaEvent::CompensationAnswered {
        saga: s.id.clone(),
        step: 0,
        attempt: 1,
        answer: Err(COMPENSATION_ERROR.to_string()),
    });
    let at_ms = assert_one_timer(&effects, s.now_ms, &s.config.compensation_backoff, 0);
    assert_eq!(
        s.feed(SagaEvent::OperatorRetry { saga: s.id.clone() }),
        [
            "compensate a #2",
            "notify CompensationStarted a #2",
            "persist progress"
        ]
    );
    let outcome = compensated(0, REASON);
    assert_eq!(
        s.compensation(0, 2, true),
        [
            "notify StepCompensated a #2".to_string(),
            format!("notify Finished: {outcome}"),
            format!("terminal: {outcome}"),
            "persist progress".to_string(),
            "finished".to_string(),
        ]
    );
    s.now_ms = at_ms;
    assert_eq!(
        s.fire(SagaTimer::RetryCompensation {
            step: 0,
            attempt: 2
        }),
        nothing(),
        "finished: the old timer is stale"
    );
}

// ----------------------------------------------------------------------------------------
// Callback
// ----------------------------------------------------------------------------------------

#[test]
fn callback_is_retried_with_backoff_until_acknowledged_then_finished() {
    let mut s = Scenario::new(with_callback(sequence(1)));
    s.start();
    s.fail(0, 1);
    let outcome = compensated(0, REASON);
    s.durable();
    assert_eq!(
        s.compensation(0, 1, true),
        [
            "notify StepCompensated a #1".to_string(),
            format!("notify Finished: {outcome}"),
            format!("terminal: {outcome}"),
            format!("callback #1: {outcome}"),
            "persist progress".to_string(),
        ]
    );
    let backoff = SagaEngineConfig::default().callback_backoff;
    for retry in 0..10u32 {
        let attempt = retry + 1;
        let now_ms = s.now_ms;
        let effects = s.raw(SagaEvent::CallbackAnswered {
            saga: s.id.clone(),
            attempt,
            answer: Err("callback endpoint down".to_string()),
        });
        let at_ms = assert_one_timer(&effects, now_ms, &backoff, retry);
        assert_eq!(
            effects.iter().map(render).collect::<Vec<_>>(),
            [format!("timer retry callback #{}", attempt + 1)],
            "a callback failure is not a change of the saga"
        );
        s.now_ms = at_ms;
        assert_eq!(
            s.fire(SagaTimer::RetryCallback {
                attempt: attempt + 1
            }),
            [format!("callback #{}: {outcome}", attempt + 1)]
        );
        assert!(!s.status().callback_delivered);
    }
    assert_eq!(s.callback(11, true), ["persist progress", "finished"]);
    let last = s.last_record();
    assert!(last.callback_delivered);
    assert!(last.is_finished(&s.spec));
    assert_eq!(s.engine.in_flight(), 0);
}

// ----------------------------------------------------------------------------------------
// Recovery
// ----------------------------------------------------------------------------------------

#[test]
fn recovered_without_progress_starts_as_if_just_accepted() {
    let mut s = Scenario::new(diamond());
    s.at(100);
    assert_eq!(
        s.recover(None),
        [
            "reply accepted",
            "notify Accepted: 4 steps",
            "action a #1",
            "notify StepStarted a #1",
            "persist progress"
        ]
    );
    let record = s.last_record();
    assert!(record.recovered);
    assert_eq!(s.status().accepted_ms, T0_MS);
    s.succeed(0, 1);
    s.succeed(1, 1);
    s.succeed(2, 1);
    s.succeed(3, 1);
    s.durable();
    assert_eq!(s.engine.in_flight(), 0);
}

#[test]
fn recovered_running_steps_are_sent_again_under_a_new_attempt() {
    let mut s = Scenario::new(diamond());
    s.start();
    s.succeed(0, 1);
    s.unavailable(1, 1); // b waits to retry, c in flight
    let record = s.last_record();
    s.at(5_000);
    assert_eq!(
        s.recover(Some(record)),
        [
            "action b #2",
            "notify StepStarted b #2: re-sent after a coordinator restart",
            "action c #2",
            "notify StepStarted c #2: re-sent after a coordinator restart",
            "persist progress"
        ]
    );
    assert!(s.last_record().recovered);
    // Answers of the old incarnation's attempts change nothing.
    assert_eq!(s.succeed(2, 1), nothing());
    assert_eq!(
        s.fire(SagaTimer::RetryAction {
            step: 1,
            attempt: 2
        }),
        nothing()
    );
    s.succeed(1, 2);
    s.succeed(2, 2);
    s.succeed(3, 1);
    assert_eq!(
        s.durable(),
        [
            "notify Finished: completed",
            "terminal: completed",
            "finished"
        ]
    );
}

#[test]
fn recovered_compensation_in_progress_is_sent_again() {
    let mut s = Scenario::new(sequence(3));
    s.start();
    s.succeed(0, 1);
    s.succeed(1, 1);
    s.fail(2, 1);
    let decided = s.last_record();
    s.durable();
    s.compensation(2, 1, true); // b #1 in flight
    let midway = s.last_record();
    let outcome = compensated(2, REASON);

    // From the record written while b's compensation was in flight.
    assert_eq!(
        s.recover(Some(midway)),
        [
            "compensate b #2",
            "notify CompensationStarted b #2: re-sent after a coordinator restart",
            "persist progress"
        ]
    );
    assert_eq!(
        s.status().outcome.as_ref(),
        Some(&outcome),
        "durable already"
    );
    assert_eq!(
        s.compensation(1, 1, true),
        nothing(),
        "the old incarnation's attempt"
    );
    s.compensation(1, 2, true);
    assert_eq!(s.compensation(0, 1, true)[0], "notify StepCompensated a #1");
    assert_eq!(s.engine.in_flight(), 0);

    // From the forced outcome alone: compensation starts from the beginning.
    assert_eq!(
        s.recover(Some(decided)),
        [
            format!("notify CompensationStarted: step c failed: {REASON}"),
            "compensate c #1".to_string(),
            "notify CompensationStarted c #1".to_string(),
            "persist progress".to_string(),
        ]
    );
    s.compensation(2, 1, true);
    s.compensation(1, 1, true);
    s.compensation(0, 1, true);
    assert_eq!(s.engine.in_flight(), 0);
}

#[test]
fn recovered_terminal_saga_sends_its_undelivered_callback_again() {
    let mut s = Scenario::new(with_callback(sequence(1)));
    s.start();
    s.succeed(0, 1);
    s.durable(); // callback #1 sent
    let record = s.last_record();
    assert_eq!(s.recover(Some(record)), ["callback #2: completed"]);
    assert_eq!(s.status().outcome, Some(SagaOutcome::Completed));
    assert_eq!(s.callback(2, true), ["persist progress", "finished"]);

    // From the forced outcome alone (the crash came before its flush was reported).
    let decided = s.records.iter().find(|r| r.outcome.is_some()).cloned();
    assert_eq!(s.recover(decided), ["callback #1: completed"]);
}

#[test]
fn recovered_finished_saga_produces_nothing() {
    let mut s = Scenario::new(sequence(1));
    s.start();
    s.succeed(0, 1);
    let completed = s.last_record();
    assert_eq!(s.recover(Some(completed)), nothing());
    assert_eq!(s.engine.in_flight(), 0);

    let mut s = Scenario::new(with_callback(sequence(1)));
    s.start();
    s.succeed(0, 1);
    s.durable();
    s.callback(1, true);
    assert_eq!(s.recover(Some(s.last_record())), nothing());
    assert_eq!(s.engine.in_flight(), 0);
}

#[test]
fn recovered_saga_also_compensates_pending_steps_an_earlier_run_may_have_started() {
    let mut s = Scenario::new(sequence(3));
    s.start();
    let early = s.last_record(); // a in flight; b and c pending
    s.recover(Some(early)); // a #2
    let outcome = compensated(0, REASON);
    assert_eq!(
        s.fail(0, 2),
        [
            format!("notify StepFailed a #2: {REASON}"),
            format!("persist outcome (forced): {outcome}"),
        ]
    );
    use StepPhase::*;
    assert_eq!(s.phases(), [Failed, Pending, Pending], "nothing is skipped");
    // c and b may have run before the crash: undone first, dependents first.
    s.compensate_in_order(&[2, 1, 0], &outcome);
    let last = s.last_record();
    assert_eq!(last.steps[2].action_attempts, 0);
    assert_eq!(last.steps[2].phase, Compensated);
}

/// The participants of the deterministic driver and the randomized runs, each with a barrier:
/// a repeated call returns the recorded result; a compensation that comes first is recorded
/// as a no-op and the action is then refused.
#[derive(Debug, Clone)]
struct World {
    /// Per step: the business failure its action meets, if any.
    business: Vec<Option<String>>,
    /// Per step: no call gets through (the deterministic driver only).
    unreachable: Vec<bool>,
    /// Per step: what the barrier recorded for the action.
    actions: Vec<Option<ActionRecord>>,
    /// Per step: the compensation ran; `true` if it undid an applied action.
    compensations: Vec<Option<bool>>,
    /// Outcomes handed to the callback's handler (the barrier lets only the first through).
    callbacks: Vec<SagaOutcome>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum ActionRecord {
    Succeeded,
    Failed(String),
    Refused,
}

impl World {
    fn new(business: Vec<Option<String>>) -> Self {
        let n = business.len();
        World {
            business,
            unreachable: vec![false; n],
            actions: vec![None; n],
            compensations: vec![None; n],
            callbacks: Vec::new(),
        }
    }

    fn run_action(&mut self, step: StepIdx) -> ActionAnswer {
        let i = step as usize;
        if self.actions[i].is_none() {
            self.actions[i] = Some(if self.compensations[i].is_some() {
                ActionRecord::Refused
            } else {
                match &self.business[i] {
                    Some(reason) => ActionRecord::Failed(reason.clone()),
                    None => ActionRecord::Succeeded,
                }
            });
        }
        match self.actions[i].clone().expect("recorded above") {
            ActionRecord::Succeeded => ActionAnswer::Succeeded,
            ActionRecord::Failed(reason) => ActionAnswer::Failed { reason },
            ActionRecord::Refused => ActionAnswer::Failed {
                reason: REFUSED.to_string(),
            },
        }
    }

    fn run_compensation(&mut self, step: StepIdx) {
        let i = step as usize;
        if self.compensations[i].is_none() {
            self.compensations[i] = Some(self.actions[i] == Some(ActionRecord::Succeeded));
        }
    }

    fn deliver_callback(&mut self, outcome: &SagaOutcome) {
        if self.callbacks.is_empty() {
            self.callbacks.push(outcome.clone());
        }
    }

    /// Steps whose action is in effect: applied and not undone.
    fn in_effect(&self) -> Vec<StepIdx> {
        (0..self.actions.len())
            .filter(|&i| {
                self.actions[i] == Some(ActionRecord::Succeeded) && self.compensations[i].is_none()
            })
            .map(|i| i as StepIdx)
            .collect()
    }

    /// Checks the participants against the outcome the saga ended with.
    fn check_outcome(&self, outcome: &SagaOutcome, context: &str) {
        let n = self.actions.len() as StepIdx;
        match outcome {
            SagaOutcome::Completed => {
                assert_eq!(
                    self.in_effect(),
                    (0..n).collect::<Vec<_>>(),
                    "{context}: completed, but not every step is in effect: {self:?}"
                );
            }
            SagaOutcome::Compensated { .. } | SagaOutcome::Aborted { .. } => {
                assert_eq!(
                    self.in_effect(),
                    Vec::<StepIdx>::new(),
                    "{context}: compensated, but some steps are still in effect: {self:?}"
                );
                for i in 0..n as usize {
                    if self.actions[i].is_some() {
                        assert!(
                            self.compensations[i].is_some(),
                            "{context}: step {} was attempted and not compensated",
                            name(i as StepIdx)
                        );
                    }
                }
            }
        }
    }
}

/// Plays the runtime and the participants in order, without faults (but for steps marked
/// unreachable): answers and flushes in the order they were caused, timers when nothing else
/// is left. Counts the events it feeds, so a run can be cut after any of them.
struct Driver {
    engine: SagaEngine,
    id: TxnId,
    spec: SagaSpec,
    now_ms: u64,
    queue: VecDeque<SagaEvent>,
    timers: Vec<(u64, SagaTimer)>,
    fed: usize,
    /// The spec's forced write: written, and reported durable.
    spec_written: bool,
    spec_durable: bool,
    /// Every progress record written, and how many of them are known durable.
    records: Vec<SagaProgress>,
    durable_records: usize,
    outcome_flush: Option<usize>,
    revealed: Option<SagaOutcome>,
    finished: bool,
}

impl Driver {
    fn new(spec: SagaSpec, seed: u64) -> Self {
        let id = saga_id(7);
        let mut queue = VecDeque::new();
        queue.push_back(SagaEvent::Submit {
            saga: id.clone(),
            spec: spec.clone(),
            fingerprint: FINGERPRINT,
        });
        Driver {
            engine: SagaEngine::new(SagaEngineConfig::default(), seed),
            id,
            spec,
            now_ms: T0_MS,
            queue,
            timers: Vec::new(),
            fed: 0,
            spec_written: false,
            spec_durable: false,
            records: Vec::new(),
            durable_records: 0,
            outcome_flush: None,
            revealed: None,
            finished: false,
        }
    }

    /// Feeds events until nothing is left or `limit` events were fed in all.
    fn run(&mut self, world: &mut World, limit: usize) {
        while self.fed < limit {
            let event = match self.queue.pop_front() {
                Some(event) => event,
                None => {
                    let Some(k) = (0..self.timers.len()).min_by_key(|&k| self.timers[k]) else {
                        return;
                    };
                    let (at_ms, timer) = self.timers.swap_remove(k);
                    self.now_ms = self.now_ms.max(at_ms);
                    SagaEvent::TimerFired {
                        saga: self.id.clone(),
                        timer,
                    }
                }
            };
            self.now_ms += 1;
            self.fed += 1;
            match &event {
                SagaEvent::Accepted { .. } => self.spec_durable = true,
                SagaEvent::OutcomeDurable { .. } => {
                    let flushed = self
                        .outcome_flush
                        .take()
                        .expect("a forced write was pending");
                    self.durable_records = self.durable_records.max(flushed);
                }
                _ => {}
            }
            let effects = self.engine.step(self.now_ms, event);
            for effect in effects {
                self.carry_out(world, effect);
            }
        }
    }

    fn carry_out(&mut self, world: &mut World, effect: SagaEffect) {
        let saga = self.id.clone();
        match effect {
            SagaEffect::PersistSpec { .. } => {
                self.spec_written = true;
                self.queue.push_back(SagaEvent::Accepted { saga });
            }
            SagaEffect::PersistOutcome { progress, .. } => {
                self.records.push(progress);
                self.outcome_flush = Some(self.records.len());
                self.queue.push_back(SagaEvent::OutcomeDurable { saga });
            }
            SagaEffect::PersistProgress { progress, .. } => self.records.push(progress),
            SagaEffect::SendAction { step, attempt, .. } => {
                let answer = if world.unreachable[step as usize] {
                    ActionAnswer::Unavailable {
                        error: "unreachable".to_string(),
                    }
                } else {
                    world.run_action(step)
                };
                self.queue.push_back(SagaEvent::ActionAnswered {
                    saga,
                    step,
                    attempt,
                    answer,
                });
            }
            SagaEffect::SendCompensation { step, attempt, .. } => {
                world.run_compensation(step);
                self.queue.push_back(SagaEvent::CompensationAnswered {
                    saga,
                    step,
                    attempt,
                    answer: Ok(()),
                });
            }
            SagaEffect::SendCallback {
                attempt, outcome, ..
            } => {
                self.reveal(&outcome);
                world.deliver_callback(&outcome);
                self.queue.push_back(SagaEvent::CallbackAnswered {
                    saga,
                    attempt,
                    answer: Ok(()),
                });
            }
            SagaEffect::SetTimer { timer, at_ms, .. } => self.timers.push((at_ms, timer)),
            SagaEffect::Terminal { outcome, .. } => self.reveal(&outcome),
            SagaEffect::Finished { .. } => self.finished = true,
            SagaEffect::ReplyAccepted { .. } | SagaEffect::Notify { .. } => {}
        }
    }

    fn reveal(&mut self, outcome: &SagaOutcome) {
        if let Some(revealed) = &self.revealed {
            assert_eq!(revealed, outcome, "a second outcome revealed");
        }
        self.revealed = Some(outcome.clone());
    }

    /// The coordinator crashes: a fresh engine recovers from what the log kept, either every
    /// write (`lazy_kept`) or only the durable ones. `false` if the saga was never accepted.
    fn crash(&mut self, world: &mut World, lazy_kept: bool, seed: u64) -> bool {
        let spec_kept = self.spec_durable || (lazy_kept && self.spec_written);
        let kept = if lazy_kept {
            self.records.len()
        } else {
            self.durable_records
        };
        self.records.truncate(kept);
        self.durable_records = kept;
        self.queue.clear();
        self.timers.clear();
        self.outcome_flush = None;
        self.engine = SagaEngine::new(SagaEngineConfig::default(), seed);
        if !spec_kept {
            assert!(self.records.is_empty(), "progress without an accepted spec");
            return false;
        }
        self.spec_durable = true;
        let effects = self.engine.step(
            self.now_ms,
            SagaEvent::Recovered {
                saga: self.id.clone(),
                spec: self.spec.clone(),
                fingerprint: FINGERPRINT,
                accepted_ms: T0_MS,
                progress: self.records.last().cloned(),
            },
        );
        self.finished = false;
        if self
            .records
            .last()
            .is_some_and(|p| p.is_finished(&self.spec))
        {
            assert_eq!(effects, vec![], "a finished saga recovers to nothing");
            self.finished = true;
        }
        for effect in effects {
            self.carry_out(world, effect);
        }
        true
    }
}

/// A saga the deterministic driver runs, with what its participants answer.
struct Case {
    what: &'static str,
    spec: SagaSpec,
    business: Vec<Option<String>>,
    unreachable: Vec<StepIdx>,
}

fn cases() -> Vec<Case> {
    let fails_at = |n: usize, at: usize| -> Vec<Option<String>> {
        (0..n)
            .map(|i| (i == at).then(|| REASON.to_string()))
            .collect()
    };
    let mut cases = vec![
        Case {
            what: "a sequence that completes",
            spec: with_callback(sequence(3)),
            business: vec![None; 3],
            unreachable: vec![],
        },
        Case {
            what: "a diamond that completes",
            spec: diamond(),
            business: vec![None; 4],
            unreachable: vec![],
        },
        Case {
            what: "a diamond whose c fails",
            spec: with_callback(diamond()),
            business: fails_at(4, 2),
            unreachable: vec![],
        },
        Case {
            what: "a sequence whose b is unreachable",
            spec: sequence(3),
            business: vec![None; 3],
            unreachable: vec![1],
        },
    ];
    for at in 0..3 {
        cases.push(Case {
            what: "a sequence with a business failure",
            spec: with_callback(sequence(3)),
            business: fails_at(3, at),
            unreachable: vec![],
        });
    }
    cases
}

#[test]
fn recovery_from_every_progress_point_ends_with_the_same_outcome() {
    for (c, case) in cases().into_iter().enumerate() {
        let world_of = |case: &Case| {
            let mut world = World::new(case.business.clone());
            for &i in &case.unreachable {
                world.unreachable[i as usize] = true;
            }
            world
        };
        // The run without a crash.
        let mut world = world_of(&case);
        let mut plain = Driver::new(case.spec.clone(), ENGINE_SEED);
        plain.run(&mut world, usize::MAX);
        assert!(plain.finished, "case {c} ({}) does not finish", case.what);
        let outcome = plain.revealed.clone().expect("finished with an outcome");
        world.check_outcome(&outcome, case.what);
        let events = plain.fed;

        // The same run cut after every event, resumed from the log by a fresh engine.
        for cut in 0..=events {
            for lazy_kept in [true, false] {
                let context = format!(
                    "case {c} ({}), crash after event {cut}, lazy writes kept: {lazy_kept}",
                    case.what
                );
                let mut world = world_of(&case);
                let mut driver = Driver::new(case.spec.clone(), ENGINE_SEED);
                driver.run(&mut world, cut);
                let revealed_before = driver.revealed.clone();
                if !driver.crash(&mut world, lazy_kept, ENGINE_SEED + cut as u64) {
                    assert_eq!(revealed_before, None, "{context}");
                    assert!(
                        world.actions.iter().all(|a| a.is_none()),
                        "{context}: an action ran for a saga never accepted"
                    );
                    continue;
                }
                driver.run(&mut world, usize::MAX);
                assert!(driver.finished, "{context}: does not finish");
                let recovered_outcome = match (&driver.revealed, &revealed_before) {
                    (Some(o), _) => o.clone(),
                    // Finished before the crash, and nothing left to announce after it.
                    (None, Some(before)) => before.clone(),
                    (None, None) => driver
                        .records
                        .last()
                        .and_then(|p| p.outcome.clone())
                        .unwrap_or_else(|| panic!("{context}: finished without an outcome")),
                };
                if let Some(before) = &revealed_before {
                    assert_eq!(
                        &recovered_outcome, before,
                        "{context}: an announced outcome changed"
                    );
                }
                world.check_outcome(&recovered_outcome, &context);
                if case.unreachable.is_empty() {
                    assert_eq!(recovered_outcome, outcome, "{context}");
                } else {
                    // Retries counted across a crash may differ by the re-sent attempt; the
                    // step that failed may not.
                    let failed = |o: &SagaOutcome| match o {
                        SagaOutcome::Compensated { failed_step, .. } => failed_step.clone(),
                        other => panic!("{context}: {other:?}"),
                    };
                    assert_eq!(failed(&recovered_outcome), failed(&outcome), "{context}");
                }
            }
        }
    }
}

#[test]
fn progress_records_are_small_and_round_trip_through_the_codec() {
    let n = 64;
    let after: Vec<Vec<StepIdx>> = (0..n)
        .map(|i| if i == 0 { vec![] } else { vec![i - 1] })
        .collect();
    let after: Vec<&[StepIdx]> = after.iter().map(|a| a.as_slice()).collect();
    let mut spec = graph(&after[..26]);
    spec.steps.extend((26..n).map(|i| {
        let mut step = step_spec(0, &[i - 1]);
        step.name = format!("step-{i}");
        step
    }));
    assert_eq!(spec.validate_graph(), Ok(()));
    let mut s = Scenario::new(spec);
    s.start();
    for i in 0..n - 1 {
        s.unavailable(i, 1);
        s.fire(SagaTimer::RetryAction {
            step: i,
            attempt: 2,
        });
        s.succeed(i, 2);
    }
    let long_reason = "x".repeat(10_000);
    s.answer(
        n - 1,
        1,
        ActionAnswer::Failed {
            reason: long_reason,
        },
    );
    let record = s.last_record();
    let bytes = tandem_common::codec::encode(&record).expect("encodes");
    let back: SagaProgress = tandem_common::codec::decode(&bytes).expect("decodes");
    assert_eq!(back, record);
    println!("a 64-step record after retries: {} bytes", bytes.len());
    assert!(bytes.len() < tandem_common::RECORD_BYTES_MAX / 4);
    let Some(SagaOutcome::Compensated { reason, .. }) = &record.outcome else {
        panic!("compensating")
    };
    assert!(
        reason.len() <= OUTCOME_REASON_BYTES_MAX,
        "long reasons are cut"
    );
}

// ----------------------------------------------------------------------------------------
// Determinism
// ----------------------------------------------------------------------------------------

/// A fixed script over three sagas, with retries of actions, compensations and callbacks.
fn scripted_run(seed: u64) -> Vec<SagaEffect> {
    let mut engine = SagaEngine::new(SagaEngineConfig::default(), seed);
    let (x, y, z) = (saga_id(1), saga_id(2), saga_id(3));
    let submit = |id: &TxnId, spec: SagaSpec| SagaEvent::Submit {
        saga: id.clone(),
        spec,
        fingerprint: FINGERPRINT,
    };
    let answer = |id: &TxnId, step, attempt, answer| SagaEvent::ActionAnswered {
        saga: id.clone(),
        step,
        attempt,
        answer,
    };
    let down = || ActionAnswer::Unavailable {
        error: ERROR.to_string(),
    };
    let fire = |id: &TxnId, timer| SagaEvent::TimerFired {
        saga: id.clone(),
        timer,
    };
    let compensation = |id: &TxnId, step, attempt, ok: bool| SagaEvent::CompensationAnswered {
        saga: id.clone(),
        step,
        attempt,
        answer: if ok { Ok(()) } else { Err("down".to_string()) },
    };
    let accepted = |id: &TxnId| SagaEvent::Accepted { saga: id.clone() };
    let durable = |id: &TxnId| SagaEvent::OutcomeDurable { saga: id.clone() };
    let mut events = vec![
        submit(&x, with_callback(sequence(2))),
        submit(&y, diamond()),
        submit(&z, with_retry(sequence(1), 0, 0)),
        accepted(&y),
        accepted(&x),
        accepted(&z),
    ];
    for attempt in 1..6 {
        events.push(answer(&z, 0, attempt, down()));
        events.push(fire(
            &z,
            SagaTimer::RetryAction {
                step: 0,
                attempt: attempt + 1,
            },
        ));
    }
    events.extend([
        answer(&z, 0, 6, ActionAnswer::Succeeded),
        durable(&z),
        answer(&x, 0, 1, ActionAnswer::Succeeded),
        answer(&y, 0, 1, ActionAnswer::Succeeded),
        answer(&y, 2, 1, down()),
        answer(
            &y,
            1,
            1,
            ActionAnswer::Failed {
                reason: REASON.to_string(),
            },
        ),
        durable(&y),
        answer(&x, 1, 1, ActionAnswer::Succeeded),
        durable(&x),
    ]);
    for attempt in 1..5 {
        events.push(compensation(&y, 2, attempt, false));
        events.push(fire(
            &y,
            SagaTimer::RetryCompensation {
                step: 2,
                attempt: attempt + 1,
            },
        ));
        events.push(SagaEvent::CallbackAnswered {
            saga: x.clone(),
            attempt,
            answer: Err("down".to_string()),
        });
        events.push(fire(
            &x,
            SagaTimer::RetryCallback {
                attempt: attempt + 1,
            },
        ));
    }
    events.extend([
        compensation(&y, 2, 5, true),
        compensation(&y, 1, 1, true),
        compensation(&y, 0, 1, true),
        SagaEvent::CallbackAnswered {
            saga: x.clone(),
            attempt: 5,
            answer: Ok(()),
        },
    ]);
    let mut effects = Vec::new();
    for (k, event) in events.into_iter().enumerate() {
        effects.extend(engine.step(T0_MS + 10 * k as u64, event));
    }
    assert_eq!(engine.in_flight(), 0, "the script finishes every saga");
    effects
}

#[test]
fn same_seed_and_same_events_give_identical_effects() {
    assert_eq!(scripted_run(7), scripted_run(7));
}

#[test]
fn the_seed_reaches_only_the_retry_delays() {
    let (one, other) = (scripted_run(7), scripted_run(8));
    assert_eq!(one.len(), other.len());
    assert_ne!(one, other, "different seeds, different jitter");
    let mut timers = 0;
    for (x, y) in one.iter().zip(&other) {
        match (x, y) {
            (
                SagaEffect::SetTimer {
                    saga: s1,
                    timer: t1,
                    ..
                },
                SagaEffect::SetTimer {
                    saga: s2,
                    timer: t2,
                    ..
                },
            ) => {
                assert_eq!((s1, t1), (s2, t2));
                timers += 1;
            }
            // Retry notices name the delay; progress records carry the change's detail only
            // through `seq`, so they are equal.
            (SagaEffect::Notify { change: c1, .. }, SagaEffect::Notify { change: c2, .. })
                if matches!(
                    c1.kind,
                    ChangeKind::StepRetried | ChangeKind::CompensationRetried
                ) =>
            {
                assert_eq!(
                    (c1.seq, c1.kind, c1.step, c1.attempt),
                    (c2.seq, c2.kind, c2.step, c2.attempt)
                );
            }
            _ => assert_eq!(x, y),
        }
    }
    assert_eq!(
        timers, 14,
        "5 action, 1 action in y, 4 compensation, 4 callback retries"
    );
}

// ----------------------------------------------------------------------------------------
// Randomized runs
// ----------------------------------------------------------------------------------------

const SEEDS: u64 = 2_000;
const SIM_STEPS_MAX: u64 = 200_000;
/// Faults (transport failures, duplicates, replays, early timers, crashes, aborts) stop after
/// a random number of steps below this; the saga must then terminate.
const FAULT_STEPS_MAX: u64 = 80;
/// Chance that a call fails in transport (half of them after the call took effect).
const TRANSPORT_FAILURE_PCT: u64 = 25;
/// Chance that an answer arrives twice.
const ANSWER_DUPLICATE_PCT: u64 = 10;
/// Chance, per step, that an event already fed arrives again.
const REPLAY_PCT: u64 = 8;
/// Chance, per step, that the next event is picked regardless of when it is due.
const EARLY_PCT: u64 = 10;
/// Chance, per step, that the coordinator crashes (at most `CRASHES_MAX` times a run).
const CRASH_PCT: u64 = 2;
const CRASHES_MAX: u32 = 3;
/// Chance, per step, that the log flushes every write so far.
const LAZY_FLUSH_PCT: u64 = 20;
/// Chance, per run, that an operator aborts the saga, within its first `ABORT_STEP_MAX` steps.
const ABORT_PCT: u64 = 10;
const ABORT_STEP_MAX: u64 = 30;
/// Share of sims whose engine holds execution: each acceptance waits for a release.
const HOLD_PCT: u64 = 20;
/// Longest a call takes to answer, ms.
const LATENCY_MS_MAX: u64 = 30;

fn chance(rng: &mut SplitMix64, pct: u64) -> bool {
    rng.next_u64() % 100 < pct
}

fn pick(rng: &mut SplitMix64, len: usize) -> usize {
    (rng.next_u64() % len as u64) as usize
}

/// The runtime, the participants and the log of one randomized saga.
struct Sim {
    seed: u64,
    trace: bool,
    /// The engine holds execution (in every incarnation): an accepted saga waits for a
    /// `Release`, which the sim sends after a while.
    hold: bool,
    aborted_held: bool,
    rng: SplitMix64,
    config: SagaEngineConfig,
    engine: SagaEngine,
    id: TxnId,
    spec: SagaSpec,
    world: World,
    now_ms: u64,
    steps: u64,
    fault_steps: u64,
    abort_at: Option<u64>,
    /// What the runtime has yet to feed, with when: answers, flushes, timers.
    pending: Vec<(u64, SagaEvent)>,
    /// Answers and timers already fed, which may arrive again (also after a crash).
    history: Vec<SagaEvent>,
    crashes: u32,
    // The log.
    spec_written: bool,
    spec_durable: bool,
    /// Every progress record written, in order; the first `durable_records` are durable.
    records: Vec<SagaProgress>,
    durable_records: usize,
    /// The forced outcome write waiting for its flush: the number of records it completes.
    outcome_flush: Option<usize>,
    // This incarnation.
    accepted: bool,
    decided: bool,
    last_seq: u64,
    // Across incarnations.
    revealed: Option<SagaOutcome>,
    abort_reason: Option<String>,
    /// Steps whose action was sent, in order of first send.
    actions_sent: Vec<StepIdx>,
    /// Steps whose compensation was sent, in order of first send.
    compensations_sent: Vec<StepIdx>,
    /// Successes seen (in a run without a crash), in order.
    successes: Vec<StepIdx>,
    /// The queue a run without a crash must follow, computed from what the driver saw.
    expected_queue: Option<Vec<StepIdx>>,
    finished: bool,
    forgotten: bool,
    stuck_seen: bool,
}

/// What one randomized run went through, to check that the seeds cover every path.
#[derive(Debug)]
struct Summary {
    steps: u64,
    crashes: u32,
    /// `None`: forgotten (the spec never became durable).
    outcome: Option<SagaOutcome>,
    stuck: bool,
    recovered_pending_compensated: bool,
    held: bool,
    /// An operator aborted the saga while it was held (nothing to compensate).
    aborted_held: bool,
}

impl Sim {
    fn new(seed: u64, trace: bool) -> Self {
        let mut rng = SplitMix64::new(seed);
        let n = 1 + pick(&mut rng, 6) as StepIdx;
        let sequential = chance(&mut rng, 30);
        let steps = (0..n)
            .map(|i| {
                let after: Vec<StepIdx> = if sequential {
                    if i == 0 {
                        vec![]
                    } else {
                        vec![i - 1]
                    }
                } else {
                    (0..i).filter(|_| chance(&mut rng, 40)).collect()
                };
                let mut step = step_spec(i, &after);
                step.retry = RetryPolicy {
                    backoff: Backoff {
                        initial_ms: 10 + pick(&mut rng, 40) as u64,
                        multiplier: 2.0,
                        max_ms: 500,
                    },
                    attempts_max: [0, 2, 3, 5][pick(&mut rng, 4)],
                    deadline_ms: [0, 0, 300, 2_000][pick(&mut rng, 4)],
                };
                step
            })
            .collect();
        let spec = SagaSpec {
            steps,
            callback: chance(&mut rng, 50).then(callback_target),
        };
        let all_succeed = chance(&mut rng, 40);
        let business = (0..n)
            .map(|i| {
                (!all_succeed && chance(&mut rng, 20)).then(|| format!("{REASON} at {}", name(i)))
            })
            .collect();
        let fault_steps = pick(&mut rng, FAULT_STEPS_MAX as usize) as u64;
        let abort_at = (chance(&mut rng, ABORT_PCT) && fault_steps > 0)
            .then(|| 1 + pick(&mut rng, fault_steps.min(ABORT_STEP_MAX) as usize) as u64);
        let config = SagaEngineConfig {
            compensation_backoff: Backoff {
                initial_ms: 20,
                multiplier: 2.0,
                max_ms: 400,
            },
            stuck_after_failures: 3,
            callback_backoff: Backoff {
                initial_ms: 20,
                multiplier: 2.0,
                max_ms: 400,
            },
        };
        let hold = chance(&mut rng, HOLD_PCT);
        let mut engine = SagaEngine::new(config.clone(), seed);
        engine.set_hold(hold);
        Sim {
            seed,
            trace,
            hold,
            rng,
            engine,
            config,
            id: saga_id(seed),
            spec,
            world: World::new(business),
            now_ms: T0_MS,
            steps: 0,
            fault_steps,
            abort_at,
            pending: Vec::new(),
            history: Vec::new(),
            crashes: 0,
            spec_written: false,
            spec_durable: false,
            records: Vec::new(),
            durable_records: 0,
            outcome_flush: None,
            accepted: false,
            decided: false,
            last_seq: 0,
            revealed: None,
            abort_reason: None,
            actions_sent: Vec::new(),
            compensations_sent: Vec::new(),
            successes: Vec::new(),
            expected_queue: None,
            finished: false,
            forgotten: false,
            stuck_seen: false,
            aborted_held: false,
        }
    }

    fn faults(&self) -> bool {
        self.steps <= self.fault_steps
    }

    fn run(mut self) -> Summary {
        if self.trace {
            println!(
                "seed {}: {:?}\n  business failures {:?}, faults for {} steps, abort at {:?}",
                self.seed, self.spec, self.world.business, self.fault_steps, self.abort_at
            );
        }
        self.feed(SagaEvent::Submit {
            saga: self.id.clone(),
            spec: self.spec.clone(),
            fingerprint: FINGERPRINT,
        });
        while !self.pending.is_empty() {
            self.steps += 1;
            assert!(
                self.steps <= SIM_STEPS_MAX,
                "seed {}: no end after {} steps: {:?}",
                self.seed,
                self.steps,
                self.engine.status(&self.id)
            );
            if self.faults() && self.crashes < CRASHES_MAX && chance(&mut self.rng, CRASH_PCT) {
                self.crash();
                continue;
            }
            if self.abort_at == Some(self.steps) {
                let reason = format!("operator at step {}", self.steps);
                self.feed(SagaEvent::OperatorAbort {
                    saga: self.id.clone(),
                    reason,
                });
                continue;
            }
            if self.faults() && !self.history.is_empty() && chance(&mut self.rng, REPLAY_PCT) {
                let event = self.history[pick(&mut self.rng, self.history.len())].clone();
                self.feed(event);
                continue;
            }
            if chance(&mut self.rng, LAZY_FLUSH_PCT) {
                self.durable_records = self.records.len();
            }
            let (due_ms, event) = self.next_pending();
            self.now_ms = self.now_ms.max(due_ms) + 1;
            self.feed(event);
        }
        self.check_end();
        Summary {
            steps: self.steps,
            crashes: self.crashes,
            outcome: if self.forgotten {
                None
            } else {
                self.records.last().and_then(|r| r.outcome.clone())
            },
            stuck: self.stuck_seen,
            recovered_pending_compensated: self.records.last().is_some_and(|r| {
                r.steps
                    .iter()
                    .any(|s| s.phase == StepPhase::Compensated && s.action_attempts == 0)
            }),
            held: self.hold,
            aborted_held: self.aborted_held,
        }
    }

    fn feed(&mut self, event: SagaEvent) {
        let seed = self.seed;
        match &event {
            SagaEvent::Accepted { .. } => {
                self.spec_durable = true;
                self.accepted = true;
            }
            SagaEvent::OutcomeDurable { .. } => {
                let flushed = self
                    .outcome_flush
                    .take()
                    .expect("a forced write was pending");
                self.durable_records = self.durable_records.max(flushed);
            }
            SagaEvent::Recovered { .. } => self.accepted = true,
            _ => {}
        }
        if self.trace {
            println!("@{} -> {event:?}", self.now_ms - T0_MS);
        }
        let was_held = self.engine.is_held(&self.id);
        let effects = self.engine.step(self.now_ms, event.clone());
        let mut decided_now = false;
        for effect in &effects {
            if self.trace {
                println!("        <- {}", render(effect));
            }
            if let SagaEffect::PersistOutcome { .. } = effect {
                decided_now = true;
            }
            self.carry_out(&event, effect);
        }
        if matches!(
            event,
            SagaEvent::Accepted { .. } | SagaEvent::Recovered { .. }
        ) && self.engine.is_held(&self.id)
        {
            assert!(self.hold, "seed {seed}: held without a hold");
            assert!(
                effects
                    .iter()
                    .all(|e| !matches!(e, SagaEffect::SendAction { .. })),
                "seed {seed}: a held saga sent an action"
            );
            // Released later, sometimes twice.
            let delay = 1 + pick(&mut self.rng, 200) as u64;
            let release = SagaEvent::Release {
                saga: self.id.clone(),
            };
            self.push_answer(delay, release);
        }
        if let SagaEvent::OperatorAbort { reason, .. } = &event {
            if decided_now {
                self.abort_reason = Some(reason.clone());
                self.aborted_held |= was_held;
            }
        }
        match &event {
            SagaEvent::ActionAnswered { .. }
            | SagaEvent::CompensationAnswered { .. }
            | SagaEvent::CallbackAnswered { .. }
            | SagaEvent::TimerFired { .. } => self.history.push(event.clone()),
            _ => {}
        }
        // What the engine reports agrees with what the driver saw.
        match self.engine.status(&self.id) {
            Some(status) => {
                assert!(
                    !self.finished,
                    "seed {seed}: still in flight after Finished"
                );
                if let Some(outcome) = status.outcome {
                    self.reveal(&outcome, "status");
                }
                assert_eq!(status.steps.len(), self.spec.steps.len(), "seed {seed}");
            }
            None => assert!(
                self.finished || self.forgotten,
                "seed {seed}: the engine dropped an unfinished saga"
            ),
        }
    }

    fn carry_out(&mut self, event: &SagaEvent, effect: &SagaEffect) {
        let seed = self.seed;
        assert_eq!(effect.saga(), &self.id, "seed {seed}: {effect:?}");
        if !matches!(effect, SagaEffect::PersistSpec { .. }) {
            assert!(
                self.accepted,
                "seed {seed}: {effect:?} before the spec was durable"
            );
        }
        let latency = pick(&mut self.rng, LATENCY_MS_MAX as usize) as u64;
        let faults = self.faults();
        match effect.clone() {
            SagaEffect::PersistSpec { spec, .. } => {
                assert!(matches!(event, SagaEvent::Submit { .. }), "seed {seed}");
                assert_eq!(spec, self.spec, "seed {seed}");
                self.spec_written = true;
                self.pending.push((
                    self.now_ms + latency,
                    SagaEvent::Accepted {
                        saga: self.id.clone(),
                    },
                ));
            }
            SagaEffect::PersistOutcome { progress, .. } => {
                assert_eq!(
                    progress.seq, self.last_seq,
                    "seed {seed}: record misses a change"
                );
                assert!(
                    !self.decided,
                    "seed {seed}: decided twice in one incarnation"
                );
                assert!(
                    self.outcome_flush.is_none(),
                    "seed {seed}: two forced writes"
                );
                self.decided = true;
                if self.crashes == 0 && progress.phase == SagaPhase::Compensating {
                    // Attempted but not succeeded, most recently sent first; then the
                    // successes, newest first.
                    let mut queue: Vec<StepIdx> = self
                        .actions_sent
                        .iter()
                        .rev()
                        .copied()
                        .filter(|i| !self.successes.contains(i))
                        .collect();
                    queue.extend(self.successes.iter().rev());
                    assert_eq!(progress.compensation_queue, queue, "seed {seed}");
                    self.expected_queue = Some(queue);
                }
                self.records.push(progress);
                self.outcome_flush = Some(self.records.len());
                self.pending.push((
                    self.now_ms + latency,
                    SagaEvent::OutcomeDurable {
                        saga: self.id.clone(),
                    },
                ));
            }
            SagaEffect::PersistProgress { progress, .. } => {
                assert_eq!(
                    progress.seq, self.last_seq,
                    "seed {seed}: record misses a change"
                );
                assert!(
                    self.outcome_flush.is_none()
                        || progress.outcome == self.records.last().and_then(|r| r.outcome.clone()),
                    "seed {seed}: progress written over a pending outcome"
                );
                self.records.push(progress);
            }
            SagaEffect::SendAction {
                step,
                attempt,
                target: to,
                ..
            } => {
                assert!(
                    !self.decided,
                    "seed {seed}: {effect:?} after the outcome was decided"
                );
                assert_eq!(to, target(step), "seed {seed}");
                if !self.actions_sent.contains(&step) {
                    self.actions_sent.push(step);
                }
                let answer = if faults && chance(&mut self.rng, TRANSPORT_FAILURE_PCT) {
                    if chance(&mut self.rng, 50) {
                        self.world.run_action(step); // took effect; the answer is lost
                    }
                    ActionAnswer::Unavailable {
                        error: "deadline exceeded".to_string(),
                    }
                } else {
                    self.world.run_action(step)
                };
                self.push_answer(
                    latency,
                    SagaEvent::ActionAnswered {
                        saga: self.id.clone(),
                        step,
                        attempt,
                        answer,
                    },
                );
            }
            SagaEffect::SendCompensation {
                step,
                attempt,
                target: to,
                ..
            } => {
                assert!(self.decided, "seed {seed}: compensating undecided");
                let durable = self.records[..self.durable_records]
                    .iter()
                    .any(|r| r.outcome.is_some());
                assert!(
                    durable,
                    "seed {seed}: compensating before the outcome is durable"
                );
                assert_eq!(to, target(step), "seed {seed}");
                if !self.compensations_sent.contains(&step) {
                    self.compensations_sent.push(step);
                }
                let answer = if faults && chance(&mut self.rng, TRANSPORT_FAILURE_PCT) {
                    if chance(&mut self.rng, 50) {
                        self.compensate(step);
                    }
                    Err("unavailable".to_string())
                } else {
                    self.compensate(step);
                    Ok(())
                };
                self.push_answer(
                    latency,
                    SagaEvent::CompensationAnswered {
                        saga: self.id.clone(),
                        step,
                        attempt,
                        answer,
                    },
                );
            }
            SagaEffect::SendCallback {
                attempt,
                target: to,
                outcome,
                ..
            } => {
                assert_eq!(Some(to), self.spec.callback, "seed {seed}");
                self.reveal(&outcome, "callback");
                let answer = if faults && chance(&mut self.rng, TRANSPORT_FAILURE_PCT) {
                    if chance(&mut self.rng, 50) {
                        self.world.deliver_callback(&outcome);
                    }
                    Err("unavailable".to_string())
                } else {
                    self.world.deliver_callback(&outcome);
                    Ok(())
                };
                self.push_answer(
                    latency,
                    SagaEvent::CallbackAnswered {
                        saga: self.id.clone(),
                        attempt,
                        answer,
                    },
                );
            }
            SagaEffect::SetTimer { timer, at_ms, .. } => {
                let cap_ms = match timer {
                    SagaTimer::RetryAction { step, .. } => {
                        self.spec.steps[step as usize].retry.backoff.max_ms
                    }
                    SagaTimer::RetryCompensation { .. } => self.config.compensation_backoff.max_ms,
                    SagaTimer::RetryCallback { .. } => self.config.callback_backoff.max_ms,
                };
                let delay_ms = at_ms - self.now_ms;
                assert!(
                    (1..=cap_ms).contains(&delay_ms),
                    "seed {seed}: {timer:?} in {delay_ms} ms"
                );
                self.pending.push((
                    at_ms,
                    SagaEvent::TimerFired {
                        saga: self.id.clone(),
                        timer,
                    },
                ));
            }
            SagaEffect::ReplyAccepted { .. } => {
                let on_acceptance = matches!(
                    event,
                    SagaEvent::Accepted { .. } | SagaEvent::Recovered { progress: None, .. }
                );
                assert!(on_acceptance, "seed {seed}: {effect:?} on {event:?}");
            }
            SagaEffect::Notify { change, .. } => {
                assert_eq!(change.seq, self.last_seq + 1, "seed {seed}: {change:?}");
                self.last_seq = change.seq;
                assert_eq!(change.at_ms, self.now_ms, "seed {seed}");
                if change.kind == ChangeKind::Finished {
                    let outcome = change.outcome.expect("Finished carries the outcome");
                    self.reveal(&outcome, "watchers");
                }
                if change.kind == ChangeKind::Stuck {
                    self.stuck_seen = true;
                }
                if change.kind == ChangeKind::StepSucceeded && self.crashes == 0 {
                    let step = change.step.expect("a step succeeded");
                    self.successes.push(step);
                }
            }
            SagaEffect::Terminal { outcome, .. } => self.reveal(&outcome, "waiters"),
            SagaEffect::Finished { .. } => {
                let last = self.records.last().expect("finished with a record");
                assert!(
                    last.is_finished(&self.spec),
                    "seed {seed}: finished, but the last record is not: {last:?}"
                );
                self.finished = true;
            }
        }
    }

    /// Runs a compensation at its participant, checking that every step that waits for this
    /// one and took effect was undone first.
    fn compensate(&mut self, step: StepIdx) {
        if self.world.compensations[step as usize].is_none() {
            for (x, spec) in self.spec.steps.iter().enumerate() {
                if spec.after.contains(&step)
                    && self.world.actions[x] == Some(ActionRecord::Succeeded)
                {
                    assert!(
                        self.world.compensations[x].is_some(),
                        "seed {}: {} undone before {}, which waits for it",
                        self.seed,
                        name(step),
                        name(x as StepIdx)
                    );
                }
            }
        }
        self.world.run_compensation(step);
    }

    /// An outcome leaves the engine: it must be durable, and never differ from one revealed
    /// before (in any incarnation).
    fn reveal(&mut self, outcome: &SagaOutcome, to: &str) {
        let seed = self.seed;
        let durable = self.records[..self.durable_records]
            .iter()
            .any(|r| r.outcome.as_ref() == Some(outcome));
        assert!(
            durable,
            "seed {seed}: {outcome:?} told to {to} before it was durable"
        );
        if let Some(revealed) = &self.revealed {
            assert_eq!(revealed, outcome, "seed {seed}: the outcome changed ({to})");
        }
        self.revealed = Some(outcome.clone());
    }

    /// The coordinator stops. The log keeps a prefix of its writes that includes every
    /// durable one; a new engine recovers the saga from it.
    fn crash(&mut self) {
        let seed = self.seed;
        self.crashes += 1;
        let lost = self.records.len() - self.durable_records;
        let kept = self.durable_records + pick(&mut self.rng, lost + 1);
        self.records.truncate(kept);
        self.durable_records = kept;
        let spec_kept = self.spec_durable || (self.spec_written && chance(&mut self.rng, 50));
        if self.trace {
            println!(
                "@{} crash #{}: the log keeps the spec: {spec_kept}, progress: {:?}",
                self.now_ms - T0_MS,
                self.crashes,
                self.records.last()
            );
        }
        self.pending.clear();
        self.outcome_flush = None;
        self.engine = SagaEngine::new(self.config.clone(), seed ^ (u64::from(self.crashes) << 32));
        self.engine.set_hold(self.hold);
        self.accepted = false;
        self.decided = false;
        self.finished = false;
        if !spec_kept {
            assert!(
                self.records.is_empty(),
                "seed {seed}: progress without a spec"
            );
            assert!(
                self.actions_sent.is_empty(),
                "seed {seed}: a saga never accepted sent actions"
            );
            self.forgotten = true;
            return;
        }
        self.spec_durable = true;
        let progress = self.records.last().cloned();
        self.last_seq = progress.as_ref().map_or(0, |p| p.seq);
        if let Some(p) = &progress {
            self.decided = p.outcome.is_some();
            if p.is_finished(&self.spec) {
                self.finished = true;
            }
        }
        self.feed(SagaEvent::Recovered {
            saga: self.id.clone(),
            spec: self.spec.clone(),
            fingerprint: FINGERPRINT,
            accepted_ms: T0_MS,
            progress,
        });
    }

    fn check_end(&self) {
        let seed = self.seed;
        if self.forgotten {
            assert_eq!(
                self.revealed, None,
                "seed {seed}: forgotten after an outcome"
            );
            return;
        }
        assert!(
            self.finished,
            "seed {seed}: nothing left to feed but not finished: {:?}",
            self.engine.status(&self.id)
        );
        assert_eq!(self.engine.in_flight(), 0, "seed {seed}");
        let last = self.records.last().expect("a finished saga left records");
        let outcome = last
            .outcome
            .clone()
            .expect("a finished record holds the outcome");
        if let Some(revealed) = &self.revealed {
            assert_eq!(revealed, &outcome, "seed {seed}");
        }
        let context = format!("seed {seed}");
        self.world.check_outcome(&outcome, &context);
        for &step in &self.actions_sent {
            if outcome != SagaOutcome::Completed {
                assert!(
                    self.compensations_sent.contains(&step),
                    "seed {seed}: {} was attempted but never compensated",
                    name(step)
                );
            }
        }
        match &outcome {
            SagaOutcome::Completed => {
                assert!(
                    self.compensations_sent.is_empty(),
                    "seed {seed}: completed after compensating"
                );
                assert!(
                    last.steps.iter().all(|s| s.phase == StepPhase::Succeeded),
                    "seed {seed}"
                );
            }
            SagaOutcome::Compensated {
                failed_step,
                reason,
            } => {
                let i = self
                    .spec
                    .steps
                    .iter()
                    .position(|s| &s.name == failed_step)
                    .expect("the failed step is in the spec");
                let business = self.world.actions[i] == Some(ActionRecord::Failed(reason.clone()));
                assert!(
                    business || reason.starts_with("retries exhausted"),
                    "seed {seed}: {failed_step} failed for {reason:?}, recorded {:?}",
                    self.world.actions[i]
                );
            }
            SagaOutcome::Aborted { reason } => {
                assert_eq!(Some(reason), self.abort_reason.as_ref(), "seed {seed}");
            }
        }
        if self.crashes == 0 {
            if let Some(queue) = &self.expected_queue {
                assert_eq!(
                    &self.compensations_sent, queue,
                    "seed {seed}: compensation order"
                );
            }
            let mut attempted = self.actions_sent.clone();
            attempted.sort_unstable();
            let mut undone = self.compensations_sent.clone();
            undone.sort_unstable();
            if outcome != SagaOutcome::Completed {
                assert_eq!(
                    undone, attempted,
                    "seed {seed}: compensated exactly the attempted steps"
                );
            }
        }
        match &self.spec.callback {
            Some(_) => assert_eq!(
                self.world.callbacks,
                vec![outcome],
                "seed {seed}: the callback's handler saw the outcome once"
            ),
            None => assert!(self.world.callbacks.is_empty(), "seed {seed}"),
        }
    }

    /// Mostly something already due; during faults sometimes anything, so that timers
    /// overtake answers; when nothing is due, the earliest.
    fn next_pending(&mut self) -> (u64, SagaEvent) {
        let due: Vec<usize> = (0..self.pending.len())
            .filter(|&i| self.pending[i].0 <= self.now_ms)
            .collect();
        let i = if self.faults() && chance(&mut self.rng, EARLY_PCT) {
            pick(&mut self.rng, self.pending.len())
        } else if !due.is_empty() {
            due[pick(&mut self.rng, due.len())]
        } else {
            (0..self.pending.len())
                .min_by_key(|&i| self.pending[i].0)
                .expect("pending is not empty")
        };
        self.pending.swap_remove(i)
    }

    fn push_answer(&mut self, latency_ms: u64, event: SagaEvent) {
        if self.faults() && chance(&mut self.rng, ANSWER_DUPLICATE_PCT) {
            self.pending
                .push((self.now_ms + latency_ms + 5, event.clone()));
        }
        self.pending.push((self.now_ms + latency_ms, event));
    }
}

#[test]
fn randomized_runs_terminate_with_one_durable_outcome_and_undo_every_attempted_step() {
    let summaries: Vec<Summary> = (0..SEEDS).map(|seed| Sim::new(seed, false).run()).collect();
    let count = |f: &dyn Fn(&Summary) -> bool| summaries.iter().filter(|s| f(s)).count();
    let completed = count(&|s| s.outcome == Some(SagaOutcome::Completed));
    let compensated = count(&|s| matches!(s.outcome, Some(SagaOutcome::Compensated { .. })));
    let exhausted = count(
        &|s| matches!(&s.outcome, Some(SagaOutcome::Compensated { reason, .. }) if reason.starts_with("retries exhausted")),
    );
    let aborted = count(&|s| matches!(s.outcome, Some(SagaOutcome::Aborted { .. })));
    let forgotten = count(&|s| s.outcome.is_none());
    let crashed = count(&|s| s.crashes > 0);
    let stuck = count(&|s| s.stuck);
    let pending_undone = count(&|s| s.recovered_pending_compensated);
    let held = count(&|s| s.held);
    let aborted_held = count(&|s| s.aborted_held);
    let steps: u64 = summaries.iter().map(|s| s.steps).sum();
    println!(
        "{SEEDS} runs, {steps} steps: {completed} completed, {compensated} compensated ({exhausted} \
         after retries ran out), {aborted} aborted, {forgotten} forgotten; {crashed} crashed, \
         {stuck} stuck, {pending_undone} undid steps an earlier incarnation may have started; \
         {held} held ({aborted_held} aborted while held)"
    );
    for (what, n) in [
        ("completed", completed),
        ("compensated", compensated),
        ("exhausted", exhausted),
        ("aborted", aborted),
        ("crashed", crashed),
        ("stuck", stuck),
        ("pending undone", pending_undone),
        ("held", held),
        ("aborted while held", aborted_held),
    ] {
        assert!(n > 0, "no run was {what}: the seeds do not cover it");
    }
}

/// Replays one seed of the randomized test with every event and effect printed.
#[test]
#[ignore = "run by hand with TANDEM_SEED=<seed> and --nocapture"]
fn saga_replay_one_seed() {
    let seed = std::env::var("TANDEM_SEED").expect("TANDEM_SEED=<seed>");
    Sim::new(seed.parse().expect("a number"), true).run();
}

// ---- Holding execution ------------------------------------------------------------------

impl Scenario {
    fn release(&mut self) -> Vec<String> {
        self.feed(SagaEvent::Release {
            saga: self.id.clone(),
        })
    }
}

#[test]
fn a_saga_accepted_while_held_answers_and_starts_nothing_until_released() {
    let mut s = Scenario::new(diamond());
    s.engine.set_hold(true);
    assert_eq!(s.submit(), ["persist spec (forced)"]);
    assert_eq!(
        s.accepted(),
        ["reply accepted", "notify Accepted: 4 steps"],
        "answered and watched as usual; no action, and no progress write (recovery rebuilds \
         'nothing started' from the spec alone)"
    );
    assert!(s.engine.is_held(&s.id));
    let status = s.status();
    assert!(status.held, "the status says why nothing runs");
    assert_eq!(status.phase, SagaPhase::Running);
    use StepPhase::*;
    assert_eq!(s.phases(), [Pending, Pending, Pending, Pending]);
    assert_eq!(
        s.feed(SagaEvent::OperatorRetry { saga: s.id.clone() }),
        nothing(),
        "a held saga has no retry waiting"
    );
    // Resuming the engine does not start sagas already held: each waits for its release.
    s.engine.set_hold(false);
    assert!(s.engine.is_held(&s.id));
    assert_eq!(
        s.release(),
        ["action a #1", "notify StepStarted a #1", "persist progress"]
    );
    assert!(!s.engine.is_held(&s.id));
    assert!(!s.status().held);
    assert_eq!(s.release(), nothing(), "a second release is ignored");
    // From here on it is an ordinary saga.
    s.succeed(0, 1);
    assert_eq!(s.phases(), [Succeeded, Running, Running, Pending]);
}

#[test]
fn sagas_accepted_after_the_hold_is_lifted_start_at_once() {
    let mut s = Scenario::new(sequence(2));
    s.engine.set_hold(true);
    s.engine.set_hold(false);
    s.start(); // asserts the ordinary acceptance: first action sent
    assert!(!s.status().held);
    assert_eq!(s.release(), nothing(), "a running saga ignores a release");
}

#[test]
fn an_operator_abort_ends_a_held_saga_aborted_with_nothing_to_compensate() {
    let mut s = Scenario::new(with_callback(sequence(3)));
    s.engine.set_hold(true);
    s.submit();
    s.accepted();
    assert_eq!(
        s.abort("not needed after all"),
        ["persist outcome (forced): aborted by an operator: not needed after all"]
    );
    use StepPhase::*;
    assert_eq!(
        s.phases(),
        [Skipped, Skipped, Skipped],
        "no step was attempted"
    );
    assert!(!s.status().held);
    let outcome = SagaOutcome::Aborted {
        reason: "not needed after all".to_string(),
    };
    assert_eq!(
        s.durable(),
        [
            format!("notify Finished: {outcome}"),
            format!("terminal: {outcome}"),
            format!("callback #1: {outcome}"),
            "persist progress".to_string(),
        ],
        "no compensation is sent: nothing ran"
    );
    assert_eq!(s.release(), nothing(), "released after the abort: ignored");
    assert_eq!(s.callback(1, true), ["persist progress", "finished"]);
}

#[test]
fn a_recovered_saga_that_had_not_started_is_held_if_the_engine_holds_at_recovery() {
    let mut s = Scenario::new(sequence(2));
    s.submit();
    s.accepted();
    // Restart with the hold on: the saga had written no progress.
    s.engine = SagaEngine::new(s.config.clone(), ENGINE_SEED + 1);
    s.engine.set_hold(true);
    s.last_seq = 0;
    assert_eq!(
        s.feed(SagaEvent::Recovered {
            saga: s.id.clone(),
            spec: s.spec.clone(),
            fingerprint: FINGERPRINT,
            accepted_ms: T0_MS,
            progress: None,
        }),
        ["reply accepted", "notify Accepted: 2 steps"]
    );
    assert!(s.engine.is_held(&s.id));
    // A saga with progress resumes whatever the hold says: it has started.
    let record = SagaProgress::new(2);
    assert!(record.steps.iter().all(|p| p.phase == StepPhase::Pending));
    assert_eq!(
        s.release(),
        ["action a #1", "notify StepStarted a #1", "persist progress"]
    );
    let mut started = Scenario::new(sequence(2));
    started.start();
    let progress = started.last_record();
    started.engine.set_hold(true);
    started.recover(Some(progress));
    assert!(
        !started.engine.is_held(&started.id),
        "a saga that had started resumes"
    );
}
