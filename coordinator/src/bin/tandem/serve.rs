//! `tandem serve`: the daemon's configuration and start-up.
//!
//! The effective configuration is layered, each layer overriding the one before it:
//! built-in defaults, the TOML file named by `--config` (or `TANDEM_CONFIG`), environment
//! variables `TANDEM_<KEY>` (the key upper-cased: `TANDEM_TXN_IN_FLIGHT_MAX=500`), then the
//! command line's flags (`--txn-in-flight-max 500`). Every key has all three spellings, and
//! [`ServeConfig`]'s fields are the list (docs/operations.md is the reference).
//! `--print-config` shows the result as TOML and exits.
//!
//! The layering is figment's; what is ours is the refusal: an unknown key in the file, a
//! value of the wrong type, or a value outside its range stops the daemon before it opens
//! anything, with a message naming the key (and where the value came from). Environment
//! variables are read only for known keys, since `TANDEM_` also prefixes variables that are
//! not configuration (`TANDEM_CRASH_AT`).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use figment::providers::{Env, Format, Serialized, Toml};
use figment::Figment;
use serde::{Deserialize, Serialize};
use tandem_common::credentials::{Token, TokenSet};
use tandem_common::duration::{millis, parse_duration, parse_retention};
use tandem_coordinator::config::{format_host_patterns, parse_host_patterns, RETRY_DELAY_MS_MAX};
use tandem_coordinator::security::{self, AccessPolicy};
use tandem_coordinator::transport::ParticipantSecurity;
use tandem_coordinator::{daemon, metrics, CoordinatorConfig};

/// The daemon's configuration: one field per key, with the defaults of [`Default`].
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ServeConfig {
    /// Address to listen on (port 0 picks a free port; the bound address is printed).
    pub listen: String,
    /// Folder of the coordinator's transaction log (sled).
    pub data_dir: PathBuf,
    /// Address participants use to reach this coordinator (default: the bound address).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub advertise: Option<String>,
    /// Prepare deadline when a client sets none, in ms.
    pub prepare_timeout_ms_default: u64,
    /// Largest prepare deadline a client may ask for, in ms.
    pub prepare_timeout_ms_max: u64,
    /// Timeout of one commit/abort delivery call to a participant, in ms.
    pub decision_call_timeout_ms: u64,
    /// Bound of one saga action call when the step sets none, in ms.
    pub step_timeout_ms_default: u64,
    /// Largest action timeout a saga step may set, in ms.
    pub step_timeout_ms_max: u64,
    /// Consecutive failures of a compensation after which a saga is flagged stuck.
    pub saga_stuck_after_failures: u32,
    /// First delay before a failed saga compensation is sent again, in ms.
    pub saga_compensation_backoff_initial_ms: u64,
    /// Longest delay between attempts of a failing saga compensation, in ms (`tandem txn
    /// retry` sends a waiting one at once).
    pub saga_compensation_backoff_max_ms: u64,
    /// Most 2PC transactions in flight before new ones get RESOURCE_EXHAUSTED.
    pub txn_in_flight_max: usize,
    /// Most sagas in flight before new ones get RESOURCE_EXHAUSTED.
    pub saga_in_flight_max: usize,
    /// Start with saga execution held: sagas are accepted but start no step until an
    /// operator resumes them (`tandem txn resume-sagas`).
    pub hold_sagas: bool,
    /// Most requests queued for the coordinator's loop before new ones get
    /// RESOURCE_EXHAUSTED at once.
    pub request_queue_max: usize,
    /// The retry hint sent with RESOURCE_EXHAUSTED, in ms.
    pub overload_retry_after_ms: u64,
    /// After SIGTERM/SIGINT, how long calls in progress may take to finish before they are
    /// cut off, in ms. What is unfinished then resumes at the next start.
    pub shutdown_grace_ms: u64,
    /// Hosts the coordinator may call as participants, comma-separated (see
    /// `tandem serve --help`).
    pub allow_participants: String,
    /// How long finished transactions and sagas stay in the log before they are removed: a
    /// duration (`24h`, `7d`) or `forever`. At least `txn_id_age_max`.
    pub retention: String,
    /// Transaction and saga ids older than this are refused, so that an id is never reused.
    pub txn_id_age_max: String,
    /// Where to serve Prometheus metrics (`http://ADDR/metrics`); none by default.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metrics_listen: Option<String>,
    /// Where to export spans over OTLP/gRPC (builds with feature `otel` only); none by
    /// default.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub otel_endpoint: Option<String>,
    /// The server's TLS certificate chain (PEM); with `tls_key`, clients and participants
    /// must connect over TLS.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_cert: Option<PathBuf>,
    /// The private key of `tls_cert` (PEM).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_key: Option<PathBuf>,
    /// Mutual TLS: accept only clients and participants whose certificate this CA signed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_client_ca: Option<PathBuf>,
    /// Serve without TLS on an address that is not loopback (otherwise refused).
    pub plaintext: bool,
    /// Client tokens, one per line, optionally `name:token` (else $TANDEM_CLIENT_TOKENS).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_tokens_file: Option<PathBuf>,
    /// The admin credential(s), same format (else $TANDEM_ADMIN_TOKEN).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub admin_token_file: Option<PathBuf>,
    /// The CA that signed participants' certificates: participants are then called over TLS.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub participant_ca: Option<PathBuf>,
    /// The certificate presented to participants that require mutual TLS.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub participant_client_cert: Option<PathBuf>,
    /// The private key of `participant_client_cert`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub participant_client_key: Option<PathBuf>,
    /// The token sent to participants with every call (else $TANDEM_PARTICIPANT_TOKEN).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub participant_token_file: Option<PathBuf>,
}

impl Default for ServeConfig {
    fn default() -> Self {
        let engine = CoordinatorConfig::new(String::new());
        ServeConfig {
            listen: "127.0.0.1:7400".into(),
            data_dir: "./tandem-data".into(),
            advertise: None,
            prepare_timeout_ms_default: engine.prepare_timeout_ms_default,
            prepare_timeout_ms_max: engine.prepare_timeout_ms_max,
            decision_call_timeout_ms: engine.decision_call_timeout_ms,
            step_timeout_ms_default: engine.step_timeout_ms_default,
            step_timeout_ms_max: engine.step_timeout_ms_max,
            saga_stuck_after_failures: engine.saga_stuck_after_failures,
            saga_compensation_backoff_initial_ms: engine.saga_compensation_backoff.initial_ms,
            saga_compensation_backoff_max_ms: engine.saga_compensation_backoff.max_ms,
            txn_in_flight_max: engine.txn_in_flight_max,
            saga_in_flight_max: engine.saga_in_flight_max,
            hold_sagas: engine.hold_sagas,
            request_queue_max: engine.request_queue_max,
            overload_retry_after_ms: engine.overload_retry_after_ms,
            shutdown_grace_ms: 10_000,
            allow_participants: format_host_patterns(&engine.participant_hosts_allowed),
            retention: "7d".into(),
            txn_id_age_max: "7d".into(),
            metrics_listen: None,
            otel_endpoint: None,
            tls_cert: None,
            tls_key: None,
            tls_client_ca: None,
            plaintext: false,
            client_tokens_file: None,
            admin_token_file: None,
            participant_ca: None,
            participant_client_cert: None,
            participant_client_key: None,
            participant_token_file: None,
        }
    }
}

/// `tandem serve`'s command line. Every setting is optional here: a flag that is given
/// overrides the file and the environment, one that is not leaves them alone.
#[derive(clap::Args, Debug, Clone, Default, Serialize)]
pub struct ServeArgs {
    /// TOML configuration file (keys as in --print-config); env TANDEM_CONFIG.
    #[arg(long, env = "TANDEM_CONFIG", value_name = "FILE")]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// Print the effective configuration (defaults, file, environment, flags) as TOML and
    /// exit.
    #[arg(long)]
    #[serde(skip)]
    pub print_config: bool,
    /// Address to listen on [default: 127.0.0.1:7400] (port 0 picks a free port).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listen: Option<String>,
    /// Folder of the coordinator's transaction log (sled) [default: ./tandem-data].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data_dir: Option<PathBuf>,
    /// Address participants use to reach this coordinator (default: the bound address).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub advertise: Option<String>,
    /// Prepare deadline when a client sets none, in ms [default: 10000].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prepare_timeout_ms_default: Option<u64>,
    /// Largest prepare deadline a client may ask for, in ms [default: 300000].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prepare_timeout_ms_max: Option<u64>,
    /// Timeout of one commit/abort delivery call, in ms [default: 5000].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub decision_call_timeout_ms: Option<u64>,
    /// Bound of one saga action call when the step sets none, in ms [default: 10000].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub step_timeout_ms_default: Option<u64>,
    /// Largest action timeout a saga step may set, in ms [default: 300000].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub step_timeout_ms_max: Option<u64>,
    /// Consecutive compensation failures after which a saga is flagged stuck [default: 5].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub saga_stuck_after_failures: Option<u32>,
    /// First delay before a failed saga compensation is sent again, in ms [default: 100].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub saga_compensation_backoff_initial_ms: Option<u64>,
    /// Longest delay between attempts of a failing saga compensation, in ms
    /// [default: 10000] (`tandem txn retry` sends a waiting one at once).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub saga_compensation_backoff_max_ms: Option<u64>,
    /// Most transactions in flight before new ones are refused (RESOURCE_EXHAUSTED)
    /// [default: 10000].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub txn_in_flight_max: Option<usize>,
    /// Most sagas in flight before new ones are refused (RESOURCE_EXHAUSTED)
    /// [default: 10000].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub saga_in_flight_max: Option<usize>,
    /// Start with saga execution held: sagas are accepted (and answered) but start no step
    /// until `tandem txn resume-sagas`; sagas already running go on.
    #[arg(long)]
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub hold_sagas: bool,
    /// Most requests queued for the coordinator's loop before new ones are refused at once
    /// (RESOURCE_EXHAUSTED) [default: 4096].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_queue_max: Option<usize>,
    /// Retry hint sent with RESOURCE_EXHAUSTED, in ms [default: 100].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub overload_retry_after_ms: Option<u64>,
    /// After SIGTERM/SIGINT, how long calls in progress may take to finish, in ms
    /// [default: 10000].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shutdown_grace_ms: Option<u64>,
    /// Hosts the coordinator may call as participants, comma-separated [default: loopback]
    ///
    /// Every participant address a client names (2PC branches, saga steps, saga callbacks)
    /// must be on one of these hosts; a request naming any other is refused with
    /// PERMISSION_DENIED before anything is written or any connection is made.
    /// Each entry is one of:
    ///   loopback          127.0.0.0/8, ::1 and the name localhost (the default)
    ///   10.1.2.3, ::1     one IP address (IPv6 with or without brackets)
    ///   10.0.0.0/8        an IP network in CIDR form (host bits must be clear)
    ///   bank.internal     a host name, matched literally (case aside)
    ///   *.bank.internal   every name under that domain (not the domain itself)
    /// Host names are never resolved to be checked: a name is allowed only if it is
    /// listed, since a resolved address could change before the connection is made.
    /// Example: --allow-participants loopback,10.0.0.0/8,*.bank.internal
    #[arg(long, value_name = "LIST", verbatim_doc_comment)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allow_participants: Option<String>,
    /// How long finished transactions and sagas stay in the log (for `GetTransaction`,
    /// `GetSaga`, `tandem txn show` and retries) before they are removed: a duration like
    /// 24h or 7d, or `forever` to keep everything [default: 7d]. At least --txn-id-age-max.
    #[arg(long, value_name = "DURATION")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retention: Option<String>,
    /// Transaction and saga ids older than this are refused, so that an id is never reused
    /// (a duration like 1h or 7d) [default: 7d]. At most --retention.
    #[arg(long, value_name = "DURATION")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub txn_id_age_max: Option<String>,
    /// Serve Prometheus metrics at http://ADDR/metrics (port 0 picks a free port; the bound
    /// address is printed as `tandem metrics serving on ADDR`). Off by default.
    #[arg(long, value_name = "ADDR")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metrics_listen: Option<String>,
    /// Export spans over OTLP/gRPC to this endpoint (e.g. http://127.0.0.1:4317); only in a
    /// build with the `otel` feature. Off by default.
    #[arg(long, value_name = "URL")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub otel_endpoint: Option<String>,
    /// The server's TLS certificate chain (PEM); with --tls-key, clients and participants
    /// must connect over TLS (https://).
    #[arg(long, value_name = "PEM")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(long, value_name = "PEM")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_key: Option<PathBuf>,
    /// Mutual TLS: accept only clients and participants whose certificate this CA signed
    /// (PEM). Others fail the TLS handshake.
    #[arg(long, value_name = "PEM")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_client_ca: Option<PathBuf>,
    /// Serve without TLS on an address that is not loopback. Without TLS, only a loopback
    /// --listen is accepted (local development); this says plaintext is meant.
    #[arg(long)]
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub plaintext: bool,
    /// Client tokens, one per line, optionally `name:token` (default: $TANDEM_CLIENT_TOKENS,
    /// entries separated by newlines or commas). Every call to tandem.v1.Coordinator must then
    /// carry `authorization: Bearer <token>`, or is refused with UNAUTHENTICATED.
    #[arg(long, value_name = "FILE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_tokens_file: Option<PathBuf>,
    /// The admin credential(s), in the same format (default: $TANDEM_ADMIN_TOKEN). Calls to
    /// tandem.v1.Admin need it; a client token there is refused with PERMISSION_DENIED.
    #[arg(long, value_name = "FILE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub admin_token_file: Option<PathBuf>,
    /// The CA that signed participants' certificates (PEM): participants are then called over
    /// TLS, and their addresses must be https://.
    #[arg(long, value_name = "PEM")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub participant_ca: Option<PathBuf>,
    /// The certificate (PEM) presented to participants that require mutual TLS; it should
    /// name the identity they check (`tandem certs` makes coordinator.pem for this).
    #[arg(long, value_name = "PEM")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub participant_client_cert: Option<PathBuf>,
    /// The private key of --participant-client-cert (PEM).
    #[arg(long, value_name = "PEM")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub participant_client_key: Option<PathBuf>,
    /// A file holding the token sent to participants with every call (default:
    /// $TANDEM_PARTICIPANT_TOKEN), for participants started with a coordinator token.
    #[arg(long, value_name = "FILE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub participant_token_file: Option<PathBuf>,
}

/// The names of every configuration key, from the defaults' own serialisation (so the list
/// cannot drift from the struct).
fn config_keys() -> Vec<String> {
    let defaults = ServeConfig {
        advertise: Some(String::new()), // skipped when absent; a key all the same
        ..ServeConfig::default()
    };
    match toml::Value::try_from(&defaults) {
        Ok(toml::Value::Table(table)) => table.keys().cloned().collect(),
        other => unreachable!("ServeConfig serialises as a table, not {other:?}"),
    }
}

/// The effective configuration: defaults, then the file, then the environment, then flags.
pub fn load(args: &ServeArgs) -> anyhow::Result<ServeConfig> {
    let keys = config_keys();
    let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
    let mut figment = Figment::from(Serialized::defaults(ServeConfig::default()));
    if let Some(path) = &args.config {
        if !path.is_file() {
            bail!("--config {}: no such file", path.display());
        }
        figment = figment.merge(Toml::file_exact(path));
    }
    let config: ServeConfig = figment
        .merge(Env::prefixed("TANDEM_").only(&keys))
        .merge(Serialized::defaults(args))
        .extract()
        .map_err(|e| anyhow::anyhow!(describe_error(e)))?;
    validate(&config)?;
    Ok(config)
}

/// figment's errors, one per line, each naming the key and where its value came from.
fn describe_error(error: figment::Error) -> String {
    let mut lines = Vec::new();
    for e in error {
        let key = e.path.join(".");
        let source = e
            .metadata
            .as_ref()
            .map(|m| match &m.source {
                Some(source) => format!("{} {source}", m.name),
                // The only provider without a source is the environment.
                None => format!("environment variable TANDEM_{}", key.to_uppercase()),
            })
            .unwrap_or_else(|| "configuration".into());
        let what = match &e.kind {
            figment::error::Kind::UnknownField(field, _) => {
                format!("unknown key `{field}` (see tandem serve --print-config for the keys)")
            }
            kind => kind.to_string(),
        };
        if key.is_empty() {
            lines.push(format!("invalid configuration in {source}: {what}"));
        } else {
            lines.push(format!("configuration key `{key}` (from {source}): {what}"));
        }
    }
    lines.join("\n")
}

/// A key in its three spellings, for errors: the value may have come from any layer.
fn key_spellings(key: &str) -> String {
    format!(
        "configuration key `{key}` (--{}, TANDEM_{})",
        key.replace('_', "-"),
        key.to_uppercase()
    )
}

/// Range checks that types cannot express; each error names its key.
fn validate(c: &ServeConfig) -> anyhow::Result<()> {
    fn refuse(key: &str, why: impl std::fmt::Display) -> anyhow::Result<()> {
        bail!("{}: {why}", key_spellings(key))
    }
    if c.prepare_timeout_ms_default == 0 || c.prepare_timeout_ms_default > c.prepare_timeout_ms_max
    {
        refuse(
            "prepare_timeout_ms_default",
            format_args!(
                "{} must be in 1..=prepare_timeout_ms_max ({})",
                c.prepare_timeout_ms_default, c.prepare_timeout_ms_max
            ),
        )?;
    }
    if c.step_timeout_ms_default == 0 || c.step_timeout_ms_default > c.step_timeout_ms_max {
        refuse(
            "step_timeout_ms_default",
            format_args!(
                "{} must be in 1..=step_timeout_ms_max ({})",
                c.step_timeout_ms_default, c.step_timeout_ms_max
            ),
        )?;
    }
    if c.saga_compensation_backoff_initial_ms == 0
        || c.saga_compensation_backoff_initial_ms > c.saga_compensation_backoff_max_ms
    {
        refuse(
            "saga_compensation_backoff_initial_ms",
            format_args!(
                "{} must be in 1..=saga_compensation_backoff_max_ms ({})",
                c.saga_compensation_backoff_initial_ms, c.saga_compensation_backoff_max_ms
            ),
        )?;
    }
    if c.saga_compensation_backoff_max_ms > RETRY_DELAY_MS_MAX {
        refuse(
            "saga_compensation_backoff_max_ms",
            format_args!("must be at most {RETRY_DELAY_MS_MAX}"),
        )?;
    }
    for (key, value) in [
        ("decision_call_timeout_ms", c.decision_call_timeout_ms),
        ("txn_in_flight_max", c.txn_in_flight_max as u64),
        ("saga_in_flight_max", c.saga_in_flight_max as u64),
        ("request_queue_max", c.request_queue_max as u64),
        ("overload_retry_after_ms", c.overload_retry_after_ms),
        (
            "saga_stuck_after_failures",
            u64::from(c.saga_stuck_after_failures),
        ),
    ] {
        if value == 0 {
            refuse(key, "must be at least 1")?;
        }
    }
    if let Err(e) = parse_host_patterns(&c.allow_participants) {
        refuse("allow_participants", e)?;
    }
    if c.otel_endpoint.is_some() && !cfg!(feature = "otel") {
        refuse(
            "otel_endpoint",
            "this build has no OpenTelemetry export (build tandem with --features otel)",
        )?;
    }
    // Settings that only make sense together.
    let requires = [
        (
            "tls_cert",
            c.tls_cert.is_some(),
            "tls_key",
            c.tls_key.is_some(),
        ),
        (
            "tls_key",
            c.tls_key.is_some(),
            "tls_cert",
            c.tls_cert.is_some(),
        ),
        (
            "tls_client_ca",
            c.tls_client_ca.is_some(),
            "tls_cert",
            c.tls_cert.is_some(),
        ),
        (
            "participant_client_cert",
            c.participant_client_cert.is_some(),
            "participant_client_key",
            c.participant_client_key.is_some(),
        ),
        (
            "participant_client_key",
            c.participant_client_key.is_some(),
            "participant_client_cert",
            c.participant_client_cert.is_some(),
        ),
        (
            "participant_client_cert",
            c.participant_client_cert.is_some(),
            "participant_ca",
            c.participant_ca.is_some(),
        ),
    ];
    for (key, set, needed, needed_set) in requires {
        if set && !needed_set {
            refuse(
                key,
                format_args!("requires `{needed}` (--{})", needed.replace('_', "-")),
            )?;
        }
    }
    if c.plaintext && c.tls_cert.is_some() {
        refuse(
            "plaintext",
            "contradicts `tls_cert` (--tls-cert): give one or the other",
        )?;
    }
    let (retention, id_age_max) = retention_and_id_age(c)?;
    let mut engine = CoordinatorConfig::new(String::new());
    engine.terminal_retention_ms = retention;
    engine.txn_id_age_ms_max = id_age_max;
    if let Err(e) = engine.check_retention() {
        refuse("retention", e)?;
    }
    Ok(())
}

/// `retention` (`None`: forever) and `txn_id_age_max`, in ms.
fn retention_and_id_age(c: &ServeConfig) -> anyhow::Result<(Option<u64>, u64)> {
    let retention = parse_retention(&c.retention)
        .map_err(|e| anyhow::anyhow!("{}: {e}", key_spellings("retention")))?;
    let id_age_max = parse_duration(&c.txn_id_age_max)
        .map_err(|e| anyhow::anyhow!("{}: {e}", key_spellings("txn_id_age_max")))?;
    if id_age_max.is_zero() {
        bail!("{}: must be positive", key_spellings("txn_id_age_max"));
    }
    Ok((retention.map(millis), millis(id_age_max)))
}

/// The configuration as `--print-config` shows it.
pub fn to_toml(config: &ServeConfig) -> String {
    toml::to_string(config).expect("the configuration serialises as TOML")
}

pub async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("installing a SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

const CLIENT_TOKENS_ENV: &str = "TANDEM_CLIENT_TOKENS";
const ADMIN_TOKEN_ENV: &str = "TANDEM_ADMIN_TOKEN";
const PARTICIPANT_TOKEN_ENV: &str = "TANDEM_PARTICIPANT_TOKEN";

/// TLS, tokens and how participants are called, read from the files `settings` names (each
/// error names its file); checked before anything is bound or opened.
fn daemon_security(settings: &ServeConfig) -> anyhow::Result<daemon::DaemonSecurity> {
    let server_tls = match (&settings.tls_cert, &settings.tls_key) {
        (Some(cert), Some(key)) => Some(security::server_tls(
            cert,
            key,
            settings.tls_client_ca.as_deref(),
        )?),
        _ => None,
    };
    let access = AccessPolicy {
        client_tokens: TokenSet::from_file_or_env(
            settings.client_tokens_file.as_deref(),
            CLIENT_TOKENS_ENV,
        )
        .with_context(|| key_spellings("client_tokens_file"))?,
        admin_tokens: TokenSet::from_file_or_env(
            settings.admin_token_file.as_deref(),
            ADMIN_TOKEN_ENV,
        )
        .with_context(|| key_spellings("admin_token_file"))?,
    };
    let tls = match &settings.participant_ca {
        Some(ca) => Some(security::client_tls(
            ca,
            settings
                .participant_client_cert
                .as_deref()
                .zip(settings.participant_client_key.as_deref()),
        )?),
        None => None,
    };
    let token = Token::from_file_or_env(
        settings.participant_token_file.as_deref(),
        PARTICIPANT_TOKEN_ENV,
    )
    .with_context(|| key_spellings("participant_token_file"))?;
    Ok(daemon::DaemonSecurity {
        server_tls,
        access,
        participants: ParticipantSecurity { tls, token },
    })
}

/// Plaintext is for local development: a non-loopback address without TLS is refused unless
/// `plaintext` says it is meant.
fn check_plaintext(settings: &ServeConfig, ip: std::net::IpAddr, tls: bool) -> anyhow::Result<()> {
    if tls || ip.is_loopback() {
        return Ok(());
    }
    if !settings.plaintext {
        bail!(
            "--listen {}: {ip} is not a loopback address, and serving there without TLS would send transactions and tokens over the network in the clear; give --tls-cert and --tls-key (keys `tls_cert`, `tls_key`), or --plaintext (key `plaintext`) to serve plaintext anyway",
            settings.listen
        );
    }
    tracing::warn!(listen = %settings.listen, "serving plaintext on a non-loopback address (plaintext)");
    Ok(())
}

/// Runs the daemon with `settings` (from [`load`]) until SIGTERM/SIGINT.
pub async fn serve(args: ServeArgs, settings: ServeConfig) -> anyhow::Result<()> {
    if args.print_config {
        print!("{}", to_toml(&settings));
        return Ok(());
    }
    let participant_hosts_allowed =
        parse_host_patterns(&settings.allow_participants).context("allow_participants")?;
    let security = daemon_security(&settings)?;
    let tls = security.server_tls.is_some();
    // An address literal is checked before anything is bound; a name once it resolved.
    if let Ok(addr) = settings.listen.parse::<std::net::SocketAddr>() {
        check_plaintext(&settings, addr.ip(), tls)?;
    }
    let listener = tokio::net::TcpListener::bind(&settings.listen)
        .await
        .with_context(|| format!("listen {}: cannot bind", settings.listen))?;
    let bound = listener.local_addr()?;
    check_plaintext(&settings, bound.ip(), tls)?;
    let advertise = match &settings.advertise {
        Some(a) => a.clone(),
        None if bound.ip().is_unspecified() => {
            bail!(
                "listen {} binds every interface; set `advertise` (--advertise) to the address participants should use",
                settings.listen
            )
        }
        None => bound.to_string(),
    };
    let scheme = if tls { "https" } else { "http" };
    let mut config = CoordinatorConfig::new(format!("{scheme}://{advertise}"));
    if advertise.contains("://") {
        config.advertise = advertise;
    }
    config.prepare_timeout_ms_default = settings.prepare_timeout_ms_default;
    config.prepare_timeout_ms_max = settings.prepare_timeout_ms_max;
    config.decision_call_timeout_ms = settings.decision_call_timeout_ms;
    config.step_timeout_ms_default = settings.step_timeout_ms_default;
    config.step_timeout_ms_max = settings.step_timeout_ms_max;
    config.saga_stuck_after_failures = settings.saga_stuck_after_failures;
    config.saga_compensation_backoff.initial_ms = settings.saga_compensation_backoff_initial_ms;
    config.saga_compensation_backoff.max_ms = settings.saga_compensation_backoff_max_ms;
    config.txn_in_flight_max = settings.txn_in_flight_max;
    config.saga_in_flight_max = settings.saga_in_flight_max;
    config.hold_sagas = settings.hold_sagas;
    config.request_queue_max = settings.request_queue_max;
    config.overload_retry_after_ms = settings.overload_retry_after_ms;
    config.shutdown_grace = Duration::from_millis(settings.shutdown_grace_ms);
    (config.terminal_retention_ms, config.txn_id_age_ms_max) = retention_and_id_age(&settings)?;
    tracing::info!(
        allowed = %format_host_patterns(&participant_hosts_allowed),
        "participant hosts allowed"
    );
    config.participant_hosts_allowed = participant_hosts_allowed;
    config.participant_tls = security.participants.tls.is_some();
    // Closed (dropped) once the daemon has stopped, which stops the metrics endpoint too.
    let (_metrics_stop, metrics_stopped) = tokio::sync::oneshot::channel::<()>();
    if let Some(metrics_listen) = &settings.metrics_listen {
        let metrics_listener = tokio::net::TcpListener::bind(metrics_listen)
            .await
            .with_context(|| format!("metrics_listen {metrics_listen}: cannot bind"))?;
        // Printed before the "listening on" line, which tells readers that start-up is over.
        println!(
            "tandem metrics serving on {}",
            metrics_listener.local_addr()?
        );
        let registry = config.metrics.clone();
        tokio::spawn(async move {
            let stopped = async {
                let _ = metrics_stopped.await;
            };
            if let Err(e) = metrics::serve(metrics_listener, registry, stopped).await {
                tracing::error!(error = %e, "metrics endpoint stopped");
            }
        });
    }
    // Tests and scripts read this line to learn the port.
    println!("tandem coordinator listening on {bound}");
    daemon::run_with_security(
        listener,
        &settings.data_dir,
        config,
        security,
        shutdown_signal(),
    )
    .await
    .with_context(|| format!("coordinator with data in {}", settings.data_dir.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use figment::Jail;

    /// Loads with `args` inside a figment jail: the file and the environment variables live
    /// only for the closure, serialised with every other jail (tests run in parallel).
    #[allow(clippy::result_large_err)] // figment's `Jail` closures return its error type
    fn load_in_jail(
        file: Option<&str>,
        env: &[(&str, &str)],
        mut args: ServeArgs,
    ) -> anyhow::Result<ServeConfig> {
        let mut result = None;
        Jail::expect_with(|jail| {
            if let Some(text) = file {
                jail.create_file("tandem.toml", text)?;
                args.config = Some(jail.directory().join("tandem.toml"));
            }
            for (key, value) in env {
                jail.set_env(key, value);
            }
            result = Some(load(&args));
            Ok(())
        });
        result.expect("the jail ran")
    }

    #[test]
    fn flags_override_the_environment_which_overrides_the_file_which_overrides_defaults() {
        let c = load_in_jail(
            Some("txn_in_flight_max = 11\nsaga_in_flight_max = 12\nrequest_queue_max = 13\n"),
            &[
                ("TANDEM_TXN_IN_FLIGHT_MAX", "21"),
                ("TANDEM_SAGA_IN_FLIGHT_MAX", "22"),
                // Not a configuration key: ignored, not refused.
                ("TANDEM_CRASH_AT", "nowhere"),
            ],
            ServeArgs {
                txn_in_flight_max: Some(31),
                ..ServeArgs::default()
            },
        )
        .unwrap();
        assert_eq!(c.txn_in_flight_max, 31, "the flag wins");
        assert_eq!(c.saga_in_flight_max, 22, "the environment beats the file");
        assert_eq!(c.request_queue_max, 13, "the file beats the default");
        assert_eq!(c.overload_retry_after_ms, 100, "the default stays");
    }

    #[test]
    fn an_unknown_key_a_wrong_type_or_a_value_out_of_range_is_refused_naming_the_key() {
        let cases = [
            ("txn_in_flight_mx = 5\n", "unknown key `txn_in_flight_mx`"),
            ("txn_in_flight_max = \"many\"\n", "`txn_in_flight_max`"),
            (
                "txn_in_flight_max = 0\n",
                "`txn_in_flight_max` (--txn-in-flight-max, TANDEM_TXN_IN_FLIGHT_MAX): must be at least 1",
            ),
            (
                "prepare_timeout_ms_default = 9\nprepare_timeout_ms_max = 8\n",
                "9 must be in 1..=prepare_timeout_ms_max (8)",
            ),
            (
                "allow_participants = \"10.0.0.1/8\"\n",
                "`allow_participants`",
            ),
            ("listen = [1, 2]\n", "`listen`"),
            ("retention = \"1h\"\n", "`retention` (--retention, TANDEM_RETENTION): the retention"),
            ("txn_id_age_max = \"soon\"\n", "`txn_id_age_max`"),
            ("listen = \n", "tandem.toml"),
        ];
        for (text, expected) in cases {
            let error = load_in_jail(Some(text), &[], ServeArgs::default())
                .expect_err(text)
                .to_string();
            assert!(
                error.contains(expected),
                "file {text:?}: expected the error to contain {expected:?}, got {error:?}"
            );
        }
        let error = load_in_jail(
            None,
            &[("TANDEM_SAGA_IN_FLIGHT_MAX", "lots")],
            ServeArgs::default(),
        )
        .unwrap_err()
        .to_string();
        assert!(
            error.contains("`saga_in_flight_max`") && error.contains("TANDEM_SAGA_IN_FLIGHT_MAX"),
            "the error names the key and the variable: {error}"
        );
    }

    #[test]
    fn the_printed_configuration_reads_back_as_the_same_configuration() {
        let args = ServeArgs {
            txn_in_flight_max: Some(77),
            advertise: Some("10.0.0.5:7400".into()),
            ..ServeArgs::default()
        };
        let printed = to_toml(&load_in_jail(None, &[], args).unwrap());
        let again = load_in_jail(Some(&printed), &[], ServeArgs::default()).unwrap();
        assert_eq!(again.txn_in_flight_max, 77);
        assert_eq!(again.advertise.as_deref(), Some("10.0.0.5:7400"));
        assert_eq!(to_toml(&again), printed);
    }

    #[test]
    fn a_missing_config_file_is_refused_naming_it() {
        let args = ServeArgs {
            config: Some("/nonexistent/tandem.toml".into()),
            ..ServeArgs::default()
        };
        let error = load(&args).unwrap_err();
        assert_eq!(
            error.to_string(),
            "--config /nonexistent/tandem.toml: no such file"
        );
    }
}
