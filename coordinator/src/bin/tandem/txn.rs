//! `tandem txn`: the operator's command line over the coordinator's `tandem.v1.Admin` service.
//!
//! - `list [--state S] [--kind 2pc|saga] [--older-than DURATION] [--limit N]`: a table (or
//!   `--json`) of transactions and sagas, following the service's pages up to `--limit`;
//! - `show ID`: the summary, every branch or step with its attempts and last error, and every
//!   recorded state change with its time;
//! - `retry ID`: send now what waits for a retry timer;
//! - `abort ID [--reason TEXT]`: abort an undecided 2PC transaction or send a running saga
//!   into compensation;
//! - `hold-sagas` / `resume-sagas`: hold the execution of sagas accepted from now on (they
//!   are accepted and answered, and start no step), or start every held saga.
//!
//! Exit codes: 0 done; 1 the coordinator refused (the outcome is decided, unknown id, ...) or
//! could not be reached; 2 the command line is malformed (also when the coordinator answers
//! INVALID_ARGUMENT). With `--admin-token-file FILE` (or `TANDEM_ADMIN_TOKEN`) every call
//! carries `authorization: Bearer <token>`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use serde_json::{json, Value};
use tandem_common::{unix_now_ms, TxnId};
use tandem_proto::v1 as pb;
use tonic::metadata::MetadataValue;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Request, Status};

/// The environment variable holding the admin token when no file is named.
pub const ADMIN_TOKEN_ENV: &str = "TANDEM_ADMIN_TOKEN";
/// Most entries `list` prints.
const LIST_LIMIT_MAX: usize = 100_000;
/// Largest admin token file read, in bytes.
const TOKEN_FILE_BYTES_MAX: u64 = 4096;
/// How long one call may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(clap::Args, Debug)]
pub struct TxnArgs {
    /// The coordinator's address.
    #[arg(
        long,
        global = true,
        value_name = "URL",
        default_value = "http://127.0.0.1:7400"
    )]
    coordinator: String,
    /// File holding the admin token, sent as `authorization: Bearer <token>` (default: the
    /// TANDEM_ADMIN_TOKEN environment variable, if set).
    #[arg(long, global = true, value_name = "FILE")]
    admin_token_file: Option<PathBuf>,
    /// Print JSON instead of text.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: TxnCommand,
}

#[derive(clap::Subcommand, Debug)]
enum TxnCommand {
    /// List transactions and sagas in the coordinator's log, in id order.
    List {
        /// Only this state: preparing, committing, aborting, committed, aborted (2PC, or a
        /// saga aborted by an operator), running, compensating, completed, compensated.
        #[arg(long, value_parser = parse_state)]
        state: Option<pb::TxnState>,
        /// Only this kind: 2pc or saga.
        #[arg(long, value_parser = parse_kind)]
        kind: Option<pb::TxnKind>,
        /// Only those created longer ago than this, e.g. 90s, 10m, 2h, 1d.
        #[arg(long, value_name = "DURATION", value_parser = parse_duration_ms)]
        older_than: Option<u64>,
        /// Print at most this many.
        #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..=LIST_LIMIT_MAX as u64))]
        limit: u64,
    },
    /// Show one transaction or saga: branches or steps, and every state change with its time.
    Show { id: String },
    /// Send now whatever of a transaction or saga waits for a retry timer (a step's action or
    /// compensation, a callback, a decision delivery).
    Retry { id: String },
    /// Abort an undecided 2PC transaction, or send a running saga into compensation. Refused
    /// when the outcome is already decided.
    Abort {
        id: String,
        /// Why (recorded in the outcome); at most 256 bytes.
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Hold saga execution: sagas submitted from now on are accepted (durably, and answered)
    /// but start no step until `resume-sagas`; sagas already running go on. Lasts until
    /// resumed or the coordinator restarts.
    HoldSagas,
    /// Resume saga execution: every held saga starts, oldest first.
    ResumeSagas,
}

/// Why a command failed, and so its exit code.
enum Failure {
    /// The command line (or a value in it) is malformed: exit 2.
    Usage(String),
    /// The coordinator refused or could not be reached: exit 1.
    Refused(String),
}

fn parse_state(s: &str) -> Result<pb::TxnState, String> {
    let state = match s.to_ascii_lowercase().as_str() {
        "preparing" => pb::TxnState::Preparing,
        "committing" => pb::TxnState::Committing,
        "aborting" => pb::TxnState::Aborting,
        "committed" => pb::TxnState::Committed,
        "aborted" => pb::TxnState::Aborted,
        "running" => pb::TxnState::Running,
        "compensating" => pb::TxnState::Compensating,
        "completed" => pb::TxnState::Completed,
        "compensated" => pb::TxnState::Compensated,
        _ => {
            return Err(format!(
                "unknown state {s:?}; one of preparing, committing, aborting, committed, aborted, running, compensating, completed, compensated"
            ))
        }
    };
    Ok(state)
}

fn parse_kind(s: &str) -> Result<pb::TxnKind, String> {
    match s.to_ascii_lowercase().as_str() {
        "2pc" => Ok(pb::TxnKind::TwoPhase),
        "saga" => Ok(pb::TxnKind::Saga),
        _ => Err(format!("unknown kind {s:?}; 2pc or saga")),
    }
}

/// Parses `<number><unit>` with unit ms, s, m, h or d into milliseconds.
fn parse_duration_ms(s: &str) -> Result<u64, String> {
    let bad = || {
        format!(
            "{s:?} is not a duration; write a number and a unit (ms, s, m, h, d), e.g. 10m or 2h"
        )
    };
    let split = s.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
    let (number, unit) = s.split_at(split);
    let number: u64 = number.parse().map_err(|_| bad())?;
    let unit_ms: u64 = match unit {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => return Err(bad()),
    };
    let ms = number
        .checked_mul(unit_ms)
        .ok_or_else(|| format!("{s:?} is too long a duration"))?;
    if ms == 0 {
        return Err(format!("{s:?} is zero; give a positive duration"));
    }
    Ok(ms)
}

fn state_name(value: i32) -> &'static str {
    match pb::TxnState::try_from(value) {
        Ok(pb::TxnState::Preparing) => "preparing",
        Ok(pb::TxnState::Committing) => "committing",
        Ok(pb::TxnState::Aborting) => "aborting",
        Ok(pb::TxnState::Committed) => "committed",
        Ok(pb::TxnState::Aborted) => "aborted",
        Ok(pb::TxnState::Running) => "running",
        Ok(pb::TxnState::Compensating) => "compensating",
        Ok(pb::TxnState::Completed) => "completed",
        Ok(pb::TxnState::Compensated) => "compensated",
        Ok(pb::TxnState::Unspecified) | Err(_) => "unknown",
    }
}

fn kind_name(value: i32) -> &'static str {
    match pb::TxnKind::try_from(value) {
        Ok(pb::TxnKind::TwoPhase) => "2pc",
        Ok(pb::TxnKind::Saga) => "saga",
        Ok(pb::TxnKind::Unspecified) | Err(_) => "unknown",
    }
}

fn part_phase_name(part: &pb::TxnPart) -> &'static str {
    if let Ok(phase) = pb::BranchPhase::try_from(part.branch_phase) {
        match phase {
            pb::BranchPhase::Unspecified => {}
            pb::BranchPhase::Preparing => return "preparing",
            pb::BranchPhase::VotedYes => return "voted_yes",
            pb::BranchPhase::VotedNo => return "voted_no",
            pb::BranchPhase::Committed => return "committed",
            pb::BranchPhase::Aborted => return "aborted",
        }
    }
    match pb::StepPhase::try_from(part.step_phase) {
        Ok(pb::StepPhase::Pending) => "pending",
        Ok(pb::StepPhase::Running) => "running",
        Ok(pb::StepPhase::Succeeded) => "succeeded",
        Ok(pb::StepPhase::Failed) => "failed",
        Ok(pb::StepPhase::Compensating) => "compensating",
        Ok(pb::StepPhase::Compensated) => "compensated",
        Ok(pb::StepPhase::Skipped) => "skipped",
        Ok(pb::StepPhase::Unspecified) | Err(_) => "unknown",
    }
}

/// `ms` since the epoch as an RFC 3339 UTC time with milliseconds.
fn format_time(ms: u64) -> String {
    let secs = ms / 1000;
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        ms % 1000
    )
}

/// A short age: `42s`, `12m`, `3h`, `5d`.
fn format_age(created_ms: u64, now_ms: u64) -> String {
    let secs = now_ms.saturating_sub(created_ms) / 1000;
    match secs {
        0..=119 => format!("{secs}s"),
        120..=7_199 => format!("{}m", secs / 60),
        7_200..=172_799 => format!("{}h", secs / 3600),
        _ => format!("{}d", secs / 86_400),
    }
}

fn clip(text: &str, chars: usize) -> String {
    if text.chars().count() <= chars {
        text.to_string()
    } else {
        let cut: String = text.chars().take(chars.saturating_sub(1)).collect();
        format!("{cut}…")
    }
}

fn summary_json(s: &pb::TxnSummary) -> Value {
    json!({
        "id": s.id,
        "kind": kind_name(s.kind),
        "state": state_name(s.state),
        "created_ms": s.created_ms,
        "parts": s.parts,
        "stuck": s.stuck,
        "reason": s.reason,
        "in_flight": s.in_flight,
        "held": s.held,
    })
}

fn show_json(detail: &pb::ShowTransactionResponse) -> Value {
    json!({
        "summary": detail.summary.as_ref().map(summary_json),
        "parts": detail.parts.iter().map(|p| json!({
            "index": p.index,
            "name": p.name,
            "participant": p.participant,
            "resource": p.resource,
            "phase": part_phase_name(p),
            "attempts": p.attempts,
            "compensation_attempts": p.compensation_attempts,
            "last_error": p.last_error,
        })).collect::<Vec<_>>(),
        "changes": detail.changes.iter().map(|c| json!({
            "at_ms": c.at_ms,
            "at": format_time(c.at_ms),
            "kind": c.kind,
            "part": c.part,
            "attempt": c.attempt,
            "detail": c.detail,
        })).collect::<Vec<_>>(),
        "changes_truncated": detail.changes_truncated,
    })
}

fn print_list(items: &[pb::TxnSummary], now_ms: u64) {
    if items.is_empty() {
        println!("no transactions match");
        return;
    }
    let id_width = items.iter().map(|s| s.id.len()).max().unwrap_or(2).max(2);
    println!(
        "{:<id_width$}  {:<4}  {:<12}  {:>5}  {:>5}  NOTE",
        "ID", "KIND", "STATE", "AGE", "PARTS"
    );
    for s in items {
        let mut note = String::new();
        if s.stuck {
            note.push_str("STUCK ");
        }
        if s.held {
            note.push_str("HELD ");
        }
        note.push_str(&clip(&s.reason, 80));
        println!(
            "{:<id_width$}  {:<4}  {:<12}  {:>5}  {:>5}  {}",
            s.id,
            kind_name(s.kind),
            state_name(s.state),
            format_age(s.created_ms, now_ms),
            s.parts,
            note.trim_end()
        );
    }
}

fn print_show(detail: &pb::ShowTransactionResponse, now_ms: u64) {
    let Some(s) = &detail.summary else {
        println!("(no summary)");
        return;
    };
    let kind = kind_name(s.kind);
    println!(
        "{} {}",
        if kind == "saga" {
            "saga"
        } else {
            "transaction"
        },
        s.id
    );
    println!("kind:     {kind}");
    let where_ = if s.in_flight { "in flight" } else { "finished" };
    println!("state:    {} ({where_})", state_name(s.state));
    println!(
        "created:  {} ({} ago)",
        format_time(s.created_ms),
        format_age(s.created_ms, now_ms)
    );
    if s.stuck {
        println!("stuck:    yes (a compensation keeps failing; it is still retried)");
    }
    if s.held {
        println!("held:     yes (accepted while saga execution is held; `tandem txn resume-sagas` starts it)");
    }
    if !s.reason.is_empty() {
        println!("reason:   {}", s.reason);
    }
    println!();
    let part_width = detail
        .parts
        .iter()
        .map(|p| p.name.len())
        .max()
        .unwrap_or(4)
        .max(4);
    let target_width = detail
        .parts
        .iter()
        .map(|p| p.participant.len() + p.resource.len() + 1)
        .max()
        .unwrap_or(6)
        .max(6);
    let saga = kind == "saga";
    println!(
        "{:<part_width$}  {:<target_width$}  {:<12}  {:>8}  {}LAST ERROR",
        if saga { "STEP" } else { "BRANCH" },
        "TARGET",
        "PHASE",
        "ATTEMPTS",
        if saga { "COMP  " } else { "" }
    );
    for p in &detail.parts {
        let comp = if saga {
            format!("{:>4}  ", p.compensation_attempts)
        } else {
            String::new()
        };
        println!(
            "{:<part_width$}  {:<target_width$}  {:<12}  {:>8}  {comp}{}",
            p.name,
            format!("{}/{}", p.participant, p.resource),
            part_phase_name(p),
            p.attempts,
            p.last_error
        );
    }
    println!();
    if detail.changes.is_empty() {
        println!("no recorded state changes (finished before this coordinator recorded them)");
        return;
    }
    println!("CHANGES");
    if detail.changes_truncated {
        println!("(some changes between the first and the latest were dropped: the log keeps at most 128)");
    }
    for c in &detail.changes {
        let mut line = format!("{}  {:<20}", format_time(c.at_ms), c.kind);
        if !c.part.is_empty() {
            line.push_str(&format!("  {}", c.part));
        }
        if c.attempt > 0 {
            line.push_str(&format!(" #{}", c.attempt));
        }
        if !c.detail.is_empty() {
            line.push_str(&format!("  {}", c.detail));
        }
        println!("{}", line.trim_end());
    }
}

/// The admin token, from the file named or the environment; `None` if neither.
fn admin_token(file: Option<&PathBuf>) -> Result<Option<String>, Failure> {
    let token = match file {
        Some(path) => {
            let usage = |why: String| {
                Failure::Usage(format!("--admin-token-file {}: {why}", path.display()))
            };
            let len = std::fs::metadata(path)
                .map_err(|e| usage(e.to_string()))?
                .len();
            if len > TOKEN_FILE_BYTES_MAX {
                return Err(usage(format!(
                    "{len} bytes; an admin token file holds at most {TOKEN_FILE_BYTES_MAX}"
                )));
            }
            let text = std::fs::read_to_string(path).map_err(|e| usage(e.to_string()))?;
            let token = text.trim().to_string();
            if token.is_empty() {
                return Err(usage("the file is empty".into()));
            }
            token
        }
        None => match std::env::var(ADMIN_TOKEN_ENV) {
            Ok(token) if !token.trim().is_empty() => token.trim().to_string(),
            Ok(_) | Err(_) => return Ok(None),
        },
    };
    Ok(Some(token))
}

/// Sends admin calls with the bearer token, if any.
struct Admin {
    client: pb::admin_client::AdminClient<Channel>,
    authorization: Option<MetadataValue<tonic::metadata::Ascii>>,
}

impl Admin {
    async fn connect(args: &TxnArgs) -> Result<Admin, Failure> {
        let url = if args.coordinator.contains("://") {
            args.coordinator.clone()
        } else {
            format!("http://{}", args.coordinator)
        };
        let endpoint = Endpoint::from_shared(url.clone())
            .map_err(|e| {
                Failure::Usage(format!(
                    "--coordinator {}: not a usable URL: {e}",
                    args.coordinator
                ))
            })?
            .timeout(CALL_TIMEOUT)
            .connect_timeout(Duration::from_secs(5));
        let authorization = match admin_token(args.admin_token_file.as_ref())? {
            Some(token) => Some(format!("Bearer {token}").parse().map_err(|_| {
                Failure::Usage("the admin token may only hold visible ASCII characters".into())
            })?),
            None => None,
        };
        let channel = endpoint
            .connect()
            .await
            .map_err(|e| Failure::Refused(format!("cannot reach the coordinator at {url}: {e}")))?;
        Ok(Admin {
            client: pb::admin_client::AdminClient::new(channel),
            authorization,
        })
    }

    fn request<T>(&self, message: T) -> Request<T> {
        let mut request = Request::new(message);
        if let Some(value) = &self.authorization {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        request
    }
}

/// What a status from the coordinator means for the operator, and the exit code.
fn from_status(what: &str, status: Status) -> Failure {
    let message = format!("{what}: {} ({:?})", status.message(), status.code());
    match status.code() {
        Code::InvalidArgument => Failure::Usage(message),
        Code::Unauthenticated | Code::PermissionDenied => Failure::Refused(format!(
            "{message}; give the admin token with --admin-token-file or {ADMIN_TOKEN_ENV}"
        )),
        _ => Failure::Refused(message),
    }
}

fn parse_id(id: &str) -> Result<TxnId, Failure> {
    TxnId::parse(id)
        .map_err(|e| Failure::Usage(format!("{id:?} is not a transaction or saga id: {e}")))
}

async fn run_command(args: TxnArgs) -> Result<(), Failure> {
    // Ids are checked before connecting: a typo is a usage error, whatever the network does.
    match &args.command {
        TxnCommand::Show { id } | TxnCommand::Retry { id } | TxnCommand::Abort { id, .. } => {
            parse_id(id)?;
        }
        TxnCommand::List { .. } | TxnCommand::HoldSagas | TxnCommand::ResumeSagas => {}
    }
    let mut admin = Admin::connect(&args).await?;
    let now_ms = unix_now_ms();
    match &args.command {
        TxnCommand::List {
            state,
            kind,
            older_than,
            limit,
        } => {
            let limit = *limit as usize;
            let mut items = Vec::new();
            let mut page_token = String::new();
            loop {
                let page_limit = (limit - items.len()).min(1_000) as u32;
                let request = admin.request(pb::ListTransactionsRequest {
                    state: state.map_or(0, |s| s as i32),
                    kind: kind.map_or(0, |k| k as i32),
                    older_than_ms: older_than.unwrap_or(0),
                    limit: page_limit,
                    page_token: page_token.clone(),
                });
                let page = admin
                    .client
                    .list_transactions(request)
                    .await
                    .map_err(|s| from_status("list", s))?
                    .into_inner();
                items.extend(page.transactions);
                if page.next_page_token.is_empty() || items.len() >= limit {
                    break;
                }
                page_token = page.next_page_token;
            }
            if args.json {
                let json: Vec<Value> = items.iter().map(summary_json).collect();
                println!("{}", Value::Array(json));
            } else {
                print_list(&items, now_ms);
            }
        }
        TxnCommand::Show { id } => {
            let request = admin.request(pb::ShowTransactionRequest { id: id.clone() });
            let detail = admin
                .client
                .show_transaction(request)
                .await
                .map_err(|s| from_status(&format!("show {id}"), s))?
                .into_inner();
            if args.json {
                println!("{}", show_json(&detail));
            } else {
                print_show(&detail, now_ms);
            }
        }
        TxnCommand::Retry { id } => {
            let request = admin.request(pb::RetryTransactionRequest { id: id.clone() });
            let answer = admin
                .client
                .retry_transaction(request)
                .await
                .map_err(|s| from_status(&format!("retry {id}"), s))?
                .into_inner();
            if args.json {
                println!(
                    "{}",
                    json!({"id": id, "retried": answer.retried, "detail": answer.detail})
                );
            } else {
                println!("{id}: {}", answer.detail);
            }
        }
        TxnCommand::Abort { id, reason } => {
            let request = admin.request(pb::AbortTransactionRequest {
                id: id.clone(),
                reason: reason.clone(),
            });
            let answer = admin
                .client
                .abort_transaction(request)
                .await
                .map_err(|s| from_status(&format!("abort {id}"), s))?
                .into_inner();
            if args.json {
                println!(
                    "{}",
                    json!({"id": id, "state": state_name(answer.state), "detail": answer.detail})
                );
            } else {
                println!("{id}: {}: {}", state_name(answer.state), answer.detail);
            }
        }
        TxnCommand::HoldSagas | TxnCommand::ResumeSagas => {
            let hold = matches!(args.command, TxnCommand::HoldSagas);
            let request = admin.request(pb::HoldSagasRequest { hold });
            let answer = admin
                .client
                .hold_sagas(request)
                .await
                .map_err(|s| from_status(if hold { "hold-sagas" } else { "resume-sagas" }, s))?
                .into_inner();
            if args.json {
                println!(
                    "{}",
                    json!({"held": answer.held, "waiting": answer.waiting})
                );
            } else if answer.held {
                println!(
                    "saga execution held: new sagas are accepted and wait; {} waiting",
                    answer.waiting
                );
            } else {
                println!(
                    "saga execution resumed: {} held sagas are being started, oldest first",
                    answer.waiting
                );
            }
        }
    }
    Ok(())
}

/// Runs one `tandem txn` command and returns its exit code.
pub async fn run(args: TxnArgs) -> ExitCode {
    match run_command(args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Refused(message)) => {
            eprintln!("tandem txn: {message}");
            ExitCode::from(1)
        }
        Err(Failure::Usage(message)) => {
            eprintln!("tandem txn: {message}");
            ExitCode::from(2)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_take_a_unit_and_bad_ones_name_the_problem() {
        assert_eq!(parse_duration_ms("10m"), Ok(600_000));
        assert_eq!(parse_duration_ms("2h"), Ok(7_200_000));
        assert_eq!(parse_duration_ms("90s"), Ok(90_000));
        assert_eq!(parse_duration_ms("250ms"), Ok(250));
        assert_eq!(parse_duration_ms("1d"), Ok(86_400_000));
        for bad in ["10", "m", "ten m", "10 m", "10w", "-5m", ""] {
            let error = parse_duration_ms(bad).unwrap_err();
            assert!(error.contains("not a duration"), "{bad:?}: {error}");
        }
        assert!(parse_duration_ms("0s").unwrap_err().contains("zero"));
        assert!(parse_duration_ms("99999999999999999d")
            .unwrap_err()
            .contains("too long"));
    }

    #[test]
    fn times_are_rfc3339_utc_and_ages_are_short() {
        assert_eq!(format_time(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(format_time(1_763_850_000_123), "2025-11-22T22:20:00.123Z");
        assert_eq!(format_time(951_782_400_000), "2000-02-29T00:00:00.000Z");
        let now = 1_000_000_000;
        assert_eq!(format_age(now - 5_000, now), "5s");
        assert_eq!(format_age(now - 600_000, now), "10m");
        assert_eq!(format_age(now - 3 * 3_600_000, now), "3h");
        assert_eq!(format_age(now - 4 * 86_400_000, now), "4d");
    }

    #[test]
    fn states_and_kinds_parse_by_name_or_say_which_exist() {
        assert_eq!(parse_state("Compensating"), Ok(pb::TxnState::Compensating));
        assert_eq!(parse_kind("2pc"), Ok(pb::TxnKind::TwoPhase));
        assert!(parse_state("stuck")
            .unwrap_err()
            .contains("one of preparing"));
        assert!(parse_kind("xa").unwrap_err().contains("2pc or saga"));
    }
}
