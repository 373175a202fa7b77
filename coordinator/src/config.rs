//! The coordinator's configuration and the limits on everything that comes from outside.
//!
//! Every limit is a named constant or a field with its unit in the name; docs/protocol.md
//! lists them with the status a violation gets.
//!
//! ## Which participants the coordinator may call
//!
//! A client names the participant of every branch, saga step and saga callback by address.
//! Left unchecked, that would let any client use the coordinator to open connections to any
//! host it can reach (a server-side request forgery). So the coordinator calls only hosts its
//! allow-list, [`CoordinatorConfig::participant_hosts_allowed`], admits; by default that is
//! [`HostPattern::Loopback`]. The edge checks every address of a request against the list
//! right after normalising it, and refuses the whole request with `PERMISSION_DENIED`
//! ([`crate::CoordinatorError::ParticipantNotAllowed`]) before anything is written or any
//! connection is made.
//!
//! An entry ([`HostPattern`], parsed by [`parse_host_patterns`] from
//! `tandem serve --allow-participants`) is one of:
//! - `loopback`: 127.0.0.0/8, `::1` and the name `localhost`;
//! - an IP address (`10.1.2.3`, `::1` or `[::1]`) or an IP network in CIDR form
//!   (`10.0.0.0/8`, `fd00::/8`); the address of a network must have its host bits clear;
//! - a host name (`bank.internal`), matched literally, ignoring ASCII case;
//! - `*.` and a domain (`*.bank.internal`): every name with at least one more label in front.
//!
//! Host names are never resolved at the edge. Resolving a name to check its addresses would
//! not bind the connection made later: the name may resolve elsewhere by then (DNS
//! rebinding). A name is therefore allowed only if it, or its domain, is listed. The flip side:
//! listing a name trusts whoever controls its DNS records. An IPv4-mapped IPv6 address
//! (`::ffff:10.1.2.3`) is checked as the IPv4 address it reaches.
//!
//! Limitations: the check is made when a transaction or saga is admitted. Work accepted under
//! an earlier configuration (recovered from the log after a restart) keeps calling the
//! participants it named, since refusing to deliver a decision or a compensation would leave
//! participants in doubt for good. Ports are not restricted.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;
use std::time::Duration;

use tandem_common::Backoff;

use crate::engine::saga::{RetryPolicy, STUCK_AFTER_FAILURES_DEFAULT};

/// Most branches one transaction may have.
pub const BRANCHES_MAX: usize = 64;
/// Largest payload of one branch, in bytes.
pub const PAYLOAD_BYTES_MAX: usize = 64 * 1024;
/// Longest resource name, in bytes.
pub const RESOURCE_NAME_LEN_MAX: usize = 64;
/// Longest participant address, in bytes.
pub const PARTICIPANT_ADDR_LEN_MAX: usize = 256;
/// Largest request the coordinator decodes, in bytes: the largest valid transaction (every
/// branch at the payload limit) with room for its framing. tonic's default (4 MiB) would
/// refuse valid requests with OUT_OF_RANGE before they reach validation.
pub const REQUEST_BYTES_MAX: usize = BRANCHES_MAX * (PAYLOAD_BYTES_MAX + 1024) + 64 * 1024;
/// Most steps one saga may have.
pub const SAGA_STEPS_MAX: usize = 32;
/// Largest total of a saga's action and compensation payloads, in bytes (the accepted saga is
/// stored as one record, which must stay under `tandem_common::RECORD_BYTES_MAX`).
pub const SAGA_PAYLOAD_BYTES_TOTAL_MAX: usize = 64 * 1024;
/// Longest step name, in bytes.
pub const STEP_NAME_LEN_MAX: usize = 64;
/// Most attempts a step's retry policy may allow.
pub const STEP_ATTEMPTS_MAX: u32 = 1_000;
/// Longest delay a retry policy may ask for, in ms.
pub const RETRY_DELAY_MS_MAX: u64 = 3_600_000;
/// Largest growth factor of a retry policy.
pub const RETRY_MULTIPLIER_MAX: f64 = 10.0;
/// Longest a `WaitSaga` may wait, in ms.
pub const SAGA_WAIT_MS_MAX: u64 = 300_000;
/// Most entries in the participant allow-list.
pub const PARTICIPANT_HOST_PATTERNS_MAX: usize = 256;
/// Longest host name in the participant allow-list, in bytes (DNS's limit).
pub const HOST_NAME_LEN_MAX: usize = 253;
/// Longest label of a host name, in bytes (DNS's limit).
const HOST_LABEL_LEN_MAX: usize = 63;

#[derive(Debug, Clone)]
pub struct CoordinatorConfig {
    /// The address participants use to reach this coordinator (sent with every prepare).
    pub advertise: String,
    /// Prepare deadline when the client sets none.
    pub prepare_timeout_ms_default: u64,
    /// Largest prepare deadline a client may ask for.
    pub prepare_timeout_ms_max: u64,
    /// Timeout of one commit/abort delivery call.
    pub decision_call_timeout_ms: u64,
    /// Backoff between deliveries of a decision that was not acknowledged.
    pub redelivery_backoff: Backoff,
    /// Most transactions in flight; beyond it new ones get RESOURCE_EXHAUSTED.
    pub txn_in_flight_max: usize,
    /// Ids older than this are refused, so that an id can never name two transactions even
    /// once old records are pruned. Records are kept at least this long.
    pub txn_id_age_ms_max: u64,
    /// Ids dated further in the future than this are refused (clock skew allowance).
    pub txn_id_future_ms_max: u64,
    /// Seed of the engine's jitter; fixed seeds make runs replayable.
    pub rng_seed: u64,
    /// Retry policy of a saga step's action when the saga sets none.
    pub saga_retry_default: RetryPolicy,
    /// Bound of one action call when the step sets none, and the largest it may set.
    pub step_timeout_ms_default: u64,
    pub step_timeout_ms_max: u64,
    /// Backoff between attempts of a compensation (retried without limit).
    pub saga_compensation_backoff: Backoff,
    /// Consecutive failures of a compensation after which the saga is flagged stuck.
    pub saga_stuck_after_failures: u32,
    /// Backoff between deliveries of a completion callback (retried without limit).
    pub saga_callback_backoff: Backoff,
    /// Most sagas in flight; beyond it new ones get RESOURCE_EXHAUSTED.
    pub saga_in_flight_max: usize,
    /// Start with saga execution held (see `Runtime::set_saga_hold`): sagas accepted, and
    /// recovered ones that had not started, wait for an operator to resume them.
    pub hold_sagas: bool,
    /// Most requests queued for the runtime; beyond it new ones get RESOURCE_EXHAUSTED at
    /// once rather than waiting.
    pub request_queue_max: usize,
    /// The retry hint (`google.rpc.RetryInfo`) given with RESOURCE_EXHAUSTED.
    pub overload_retry_after_ms: u64,
    /// Once shutdown begins, how long calls in progress may take to finish before the
    /// daemon cuts them off (what is unfinished resumes at the next start).
    pub shutdown_grace: Duration,
    /// The hosts the coordinator may call as participants (branches, saga steps, saga
    /// callbacks); a request naming any other is refused with PERMISSION_DENIED. An empty
    /// list allows nothing. Default: `[HostPattern::Loopback]`. See the module docs.
    pub participant_hosts_allowed: Vec<HostPattern>,
    /// How long a terminal transaction or saga stays in the log (for `GetTransaction`,
    /// `GetSaga` and retries) before the retention pass removes it; `None` keeps everything.
    /// Must be at least `txn_id_age_ms_max` ([`CoordinatorConfig::check_retention`]).
    /// Default: [`TERMINAL_RETENTION_MS_DEFAULT`]. See `crate::runtime::retention`.
    pub terminal_retention_ms: Option<u64>,
    /// Where the runtime and the log's flusher report what they do (served on `/metrics`
    /// when `tandem serve --metrics-listen` is given). Default: a fresh, unserved registry.
    pub metrics: std::sync::Arc<crate::metrics::Metrics>,
    /// Whether the coordinator calls participants over TLS (`tandem serve --participant-ca`):
    /// participant addresses must then be `https://`, and otherwise `http://` (or bare
    /// `host:port`). A request naming the other scheme is refused with INVALID_ARGUMENT.
    pub participant_tls: bool,
}

/// Default of [`CoordinatorConfig::terminal_retention_ms`]: 7 days, the default id-age limit.
pub const TERMINAL_RETENTION_MS_DEFAULT: u64 = 7 * 24 * 3600 * 1000;

impl CoordinatorConfig {
    pub fn new(advertise: impl Into<String>) -> Self {
        CoordinatorConfig {
            advertise: advertise.into(),
            prepare_timeout_ms_default: 10_000,
            prepare_timeout_ms_max: 300_000,
            decision_call_timeout_ms: 5_000,
            redelivery_backoff: Backoff::default(),
            txn_in_flight_max: 10_000,
            txn_id_age_ms_max: 7 * 24 * 3600 * 1000,
            txn_id_future_ms_max: 5 * 60 * 1000,
            rng_seed: tandem_common::unix_now_ms(),
            saga_retry_default: RetryPolicy::default(),
            step_timeout_ms_default: 10_000,
            step_timeout_ms_max: 300_000,
            saga_compensation_backoff: Backoff {
                initial_ms: 100,
                multiplier: 2.0,
                max_ms: 10_000,
            },
            saga_stuck_after_failures: STUCK_AFTER_FAILURES_DEFAULT,
            saga_callback_backoff: Backoff::default(),
            saga_in_flight_max: 10_000,
            hold_sagas: false,
            request_queue_max: 4_096,
            overload_retry_after_ms: 100,
            shutdown_grace: Duration::from_secs(10),
            participant_hosts_allowed: vec![HostPattern::Loopback],
            terminal_retention_ms: Some(TERMINAL_RETENTION_MS_DEFAULT),
            metrics: std::sync::Arc::default(),
            participant_tls: false,
        }
    }

    /// Checks that forgetting a terminal transaction is safe: its id must be refused by then.
    /// A transaction is removed `terminal_retention_ms` after it ended, and its id is at least
    /// that old; if ids that old were still accepted, a client's late retry of a forgotten id
    /// would run the transaction a second time.
    pub fn check_retention(&self) -> Result<(), String> {
        match self.terminal_retention_ms {
            Some(0) => Err("the retention must be positive (or absent: keep everything)".into()),
            Some(retention_ms) if retention_ms < self.txn_id_age_ms_max => Err(format!(
                "the retention ({retention_ms} ms) is shorter than the id-age limit ({} ms): \
                 a transaction forgotten after {retention_ms} ms could be run again by a client \
                 retrying its id, which is accepted until it is {} ms old; make the retention \
                 at least the id-age limit (tandem serve --retention >= --txn-id-age-max)",
                self.txn_id_age_ms_max, self.txn_id_age_ms_max
            )),
            Some(_) | None => Ok(()),
        }
    }

    pub fn decision_call_timeout(&self) -> Duration {
        Duration::from_millis(self.decision_call_timeout_ms)
    }
}

/// One entry of the participant allow-list. See the module docs for the syntax.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostPattern {
    /// `loopback`: every address in 127.0.0.0/8, `::1`, and the name `localhost`.
    Loopback,
    /// An IP network: `addr` with its host bits clear and the length of its prefix in bits
    /// (at most 32 for IPv4, 128 for IPv6). A single address is a /32 or /128 network.
    Network { addr: IpAddr, prefix_len: u8 },
    /// One host name, lowercase, matched literally: no DNS resolution.
    Name(String),
    /// `*.domain`: every host name that ends in `.domain` (the domain itself excluded).
    /// Holds the domain, lowercase, without the `*.`.
    Subdomains(String),
}

/// A participant's host as the allow-list sees it: an IP address or a name, never resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ParticipantHost {
    /// An IP literal, IPv4-mapped IPv6 addresses turned into the IPv4 address they reach.
    Ip(IpAddr),
    /// A host name, lowercase.
    Name(String),
}

impl ParticipantHost {
    /// The host part of a URI authority (`10.1.2.3`, `[::1]`, `Bank.Internal`).
    pub fn parse(host: &str) -> ParticipantHost {
        let bare = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host);
        match bare.parse::<IpAddr>() {
            Ok(ip) => ParticipantHost::Ip(ip.to_canonical()),
            Err(_) => ParticipantHost::Name(host.to_ascii_lowercase()),
        }
    }
}

impl fmt::Display for ParticipantHost {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ParticipantHost::Ip(ip) => write!(f, "{ip}"),
            ParticipantHost::Name(name) => f.write_str(name),
        }
    }
}

/// Why an allow-list was refused. Each message names the entry at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AllowListError {
    #[error("the participant allow-list is empty: no participant could ever be called")]
    Empty,
    #[error(
        "participant allow-list entry #{index} is empty (two commas in a row, or one at an end?)"
    )]
    EmptyEntry { index: usize },
    #[error("the participant allow-list has {count} entries; at most {PARTICIPANT_HOST_PATTERNS_MAX} are allowed")]
    TooMany { count: usize },
    #[error("participant allow-list entry {entry:?} is not usable: {why} (expected `loopback`, an IP address, a CIDR network such as 10.0.0.0/8, a host name, or `*.` and a domain)")]
    BadEntry { entry: String, why: String },
}

impl HostPattern {
    /// Whether this entry admits `host`.
    pub fn matches(&self, host: &ParticipantHost) -> bool {
        match (self, host) {
            (HostPattern::Loopback, ParticipantHost::Ip(ip)) => ip.is_loopback(),
            (HostPattern::Loopback, ParticipantHost::Name(name)) => name == "localhost",
            (HostPattern::Network { addr, prefix_len }, ParticipantHost::Ip(ip)) => {
                in_network(*ip, *addr, *prefix_len)
            }
            (HostPattern::Name(allowed), ParticipantHost::Name(name)) => allowed == name,
            (HostPattern::Subdomains(domain), ParticipantHost::Name(name)) => name
                .strip_suffix(domain.as_str())
                .and_then(|front| front.strip_suffix('.'))
                .is_some_and(|front| !front.is_empty()),
            (HostPattern::Network { .. }, ParticipantHost::Name(_))
            | (HostPattern::Name(_), ParticipantHost::Ip(_))
            | (HostPattern::Subdomains(_), ParticipantHost::Ip(_)) => false,
        }
    }
}

/// Whether `list` admits `host`.
pub fn host_allowed(list: &[HostPattern], host: &ParticipantHost) -> bool {
    list.iter().any(|pattern| pattern.matches(host))
}

fn in_network(ip: IpAddr, network: IpAddr, prefix_len: u8) -> bool {
    match (ip, network) {
        (IpAddr::V4(ip), IpAddr::V4(network)) => {
            let mask = v4_mask(prefix_len);
            u32::from(ip) & mask == u32::from(network) & mask
        }
        (IpAddr::V6(ip), IpAddr::V6(network)) => {
            let mask = v6_mask(prefix_len);
            u128::from(ip) & mask == u128::from(network) & mask
        }
        (IpAddr::V4(_), IpAddr::V6(_)) | (IpAddr::V6(_), IpAddr::V4(_)) => false,
    }
}

fn v4_mask(prefix_len: u8) -> u32 {
    assert!(prefix_len <= 32, "IPv4 prefix /{prefix_len}");
    u32::MAX
        .checked_shl(32 - u32::from(prefix_len))
        .unwrap_or(0)
}

fn v6_mask(prefix_len: u8) -> u128 {
    assert!(prefix_len <= 128, "IPv6 prefix /{prefix_len}");
    u128::MAX
        .checked_shl(128 - u32::from(prefix_len))
        .unwrap_or(0)
}

/// A host name: labels of 1 to 63 bytes from `[A-Za-z0-9_-]` (no `-` at either end), at most
/// 253 bytes in all, and a last label that is not all digits (so that `10.1` or `300.1.1.1`
/// is never taken for a name).
fn validate_host_name(name: &str) -> Result<(), String> {
    if name.len() > HOST_NAME_LEN_MAX {
        return Err(format!(
            "a host name is at most {HOST_NAME_LEN_MAX} bytes long (this one is {})",
            name.len()
        ));
    }
    for label in name.split('.') {
        if label.is_empty() || label.len() > HOST_LABEL_LEN_MAX {
            return Err(format!(
                "each dot-separated label of a host name is 1 to {HOST_LABEL_LEN_MAX} bytes long"
            ));
        }
        if !label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(format!(
                "{label:?} holds a character other than [A-Za-z0-9_-]"
            ));
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err(format!("{label:?} starts or ends with '-'"));
        }
    }
    let last = name.rsplit('.').next().unwrap_or(name);
    if last.bytes().all(|b| b.is_ascii_digit()) {
        return Err("not a valid IP address, and a host name cannot end in a number".into());
    }
    Ok(())
}

fn parse_ip(text: &str) -> Option<IpAddr> {
    let bare = text
        .strip_prefix('[')
        .and_then(|t| t.strip_suffix(']'))
        .unwrap_or(text);
    bare.parse().ok()
}

impl FromStr for HostPattern {
    type Err = AllowListError;

    /// Parses one entry (surrounding whitespace ignored).
    fn from_str(entry: &str) -> Result<Self, Self::Err> {
        let entry = entry.trim();
        let bad = |why: String| AllowListError::BadEntry {
            entry: entry.to_string(),
            why,
        };
        if entry.eq_ignore_ascii_case("loopback") {
            return Ok(HostPattern::Loopback);
        }
        let no_mapped = |addr: IpAddr| match addr {
            IpAddr::V6(v6) if v6.to_ipv4_mapped().is_some() => Err(bad(
                "an IPv4-mapped IPv6 address is checked as its IPv4 address; write that instead"
                    .into(),
            )),
            IpAddr::V4(_) | IpAddr::V6(_) => Ok(addr),
        };
        if let Some((addr, prefix)) = entry.split_once('/') {
            let addr = parse_ip(addr)
                .ok_or_else(|| bad(format!("{addr:?} before the '/' is not an IP address")))?;
            let addr = no_mapped(addr)?;
            let bits = match addr {
                IpAddr::V4(_) => 32,
                IpAddr::V6(_) => 128,
            };
            let prefix_len = match prefix.parse::<u8>() {
                Ok(len) if len <= bits && prefix.bytes().all(|b| b.is_ascii_digit()) => len,
                Ok(_) | Err(_) => {
                    return Err(bad(format!(
                        "the prefix length {prefix:?} is not a number from 0 to {bits}"
                    )))
                }
            };
            let network = match addr {
                IpAddr::V4(v4) => IpAddr::V4(Ipv4Addr::from(u32::from(v4) & v4_mask(prefix_len))),
                IpAddr::V6(v6) => IpAddr::V6(Ipv6Addr::from(u128::from(v6) & v6_mask(prefix_len))),
            };
            if network != addr {
                return Err(bad(format!(
                    "the address has bits set beyond the /{prefix_len} prefix (the network is {network}/{prefix_len})"
                )));
            }
            return Ok(HostPattern::Network {
                addr: network,
                prefix_len,
            });
        }
        if let Some(addr) = parse_ip(entry) {
            let addr = no_mapped(addr)?;
            let prefix_len = match addr {
                IpAddr::V4(_) => 32,
                IpAddr::V6(_) => 128,
            };
            return Ok(HostPattern::Network { addr, prefix_len });
        }
        if let Some(domain) = entry.strip_prefix("*.") {
            validate_host_name(domain).map_err(bad)?;
            return Ok(HostPattern::Subdomains(domain.to_ascii_lowercase()));
        }
        if entry.is_empty() {
            return Err(bad("the entry is empty".into()));
        }
        validate_host_name(entry).map_err(bad)?;
        Ok(HostPattern::Name(entry.to_ascii_lowercase()))
    }
}

impl fmt::Display for HostPattern {
    /// The entry as [`HostPattern::from_str`] reads it back.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HostPattern::Loopback => f.write_str("loopback"),
            HostPattern::Network {
                addr: IpAddr::V4(v4),
                prefix_len: 32,
            } => write!(f, "{v4}"),
            HostPattern::Network {
                addr: IpAddr::V6(v6),
                prefix_len: 128,
            } => write!(f, "{v6}"),
            HostPattern::Network { addr, prefix_len } => write!(f, "{addr}/{prefix_len}"),
            HostPattern::Name(name) => f.write_str(name),
            HostPattern::Subdomains(domain) => write!(f, "*.{domain}"),
        }
    }
}

/// Parses a comma-separated allow-list (`loopback,10.0.0.0/8,bank.internal`), as
/// `tandem serve --allow-participants` takes it. Refuses an empty list, an empty entry, more
/// than [`PARTICIPANT_HOST_PATTERNS_MAX`] entries, and any entry that is not one of the forms
/// in the module docs; the error names the entry.
pub fn parse_host_patterns(list: &str) -> Result<Vec<HostPattern>, AllowListError> {
    if list.trim().is_empty() {
        return Err(AllowListError::Empty);
    }
    let entries: Vec<&str> = list.split(',').collect();
    if entries.len() > PARTICIPANT_HOST_PATTERNS_MAX {
        return Err(AllowListError::TooMany {
            count: entries.len(),
        });
    }
    entries
        .into_iter()
        .enumerate()
        .map(|(index, entry)| {
            if entry.trim().is_empty() {
                Err(AllowListError::EmptyEntry { index })
            } else {
                entry.parse()
            }
        })
        .collect()
}

/// The list as `--allow-participants` takes it (the inverse of [`parse_host_patterns`]).
pub fn format_host_patterns(list: &[HostPattern]) -> String {
    list.iter()
        .map(HostPattern::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(text: &str) -> ParticipantHost {
        ParticipantHost::parse(text)
    }

    fn allowed(list: &str, h: &str) -> bool {
        host_allowed(&parse_host_patterns(list).unwrap(), &host(h))
    }

    #[test]
    fn default_allow_list_is_loopback_only() {
        let config = CoordinatorConfig::new("http://127.0.0.1:7400");
        assert_eq!(
            config.participant_hosts_allowed,
            vec![HostPattern::Loopback]
        );
        let list = &config.participant_hosts_allowed;
        for yes in [
            "127.0.0.1",
            "127.255.255.254",
            "127.0.0.0",
            "[::1]",
            "localhost",
            "LocalHost",
            "[::ffff:127.0.0.1]",
        ] {
            assert!(host_allowed(list, &host(yes)), "{yes} was refused");
        }
        for no in [
            "128.0.0.1",
            "126.255.255.255",
            "10.1.2.3",
            "0.0.0.0",
            "[::]",
            "[::2]",
            "[::ffff:10.1.2.3]",
            "localhost.evil.example",
            "mylocalhost",
            "2130706433",
            "bank.internal",
        ] {
            assert!(!host_allowed(list, &host(no)), "{no} was allowed");
        }
    }

    #[test]
    fn cidr_networks_match_up_to_their_edges() {
        assert!(allowed("10.0.0.0/8", "10.0.0.0"));
        assert!(allowed("10.0.0.0/8", "10.255.255.255"));
        assert!(!allowed("10.0.0.0/8", "9.255.255.255"));
        assert!(!allowed("10.0.0.0/8", "11.0.0.0"));
        assert!(allowed("192.168.1.128/25", "192.168.1.128"));
        assert!(allowed("192.168.1.128/25", "192.168.1.255"));
        assert!(!allowed("192.168.1.128/25", "192.168.1.127"));
        assert!(allowed("10.1.2.3/32", "10.1.2.3"));
        assert!(!allowed("10.1.2.3/32", "10.1.2.4"));
        assert!(allowed("10.1.2.3", "10.1.2.3"));
        assert!(allowed("0.0.0.0/0", "203.0.113.9"));
        assert!(
            !allowed("0.0.0.0/0", "[2001:db8::1]"),
            "an IPv4 network admits no IPv6"
        );
        assert!(allowed("fd00::/8", "[fd12:3456::1]"));
        assert!(allowed(
            "fd00::/8",
            "[fdff:ffff:ffff:ffff:ffff:ffff:ffff:ffff]"
        ));
        assert!(!allowed("fd00::/8", "[fe00::]"));
        assert!(!allowed(
            "fd00::/8",
            "[fcff:ffff:ffff:ffff:ffff:ffff:ffff:ffff]"
        ));
        assert!(allowed("::/0", "[2001:db8::1]"));
        assert!(!allowed("::/0", "10.1.2.3"));
        assert!(allowed("2001:db8::/127", "[2001:db8::1]"));
        assert!(!allowed("2001:db8::/127", "[2001:db8::2]"));
        // An IPv4-mapped address is checked as the IPv4 address it reaches.
        assert!(allowed("10.0.0.0/8", "[::ffff:10.1.2.3]"));
        assert!(!allowed("::/0", "[::ffff:10.1.2.3]"));
    }

    #[test]
    fn ipv6_loopback_is_one_address() {
        assert!(allowed("loopback", "[::1]"));
        assert!(allowed("::1", "[::1]"));
        assert!(allowed("[::1]", "[0:0:0:0:0:0:0:1]"));
        assert!(!allowed("loopback", "[::2]"));
        assert!(!allowed("::1", "127.0.0.1"));
        assert!(!allowed("127.0.0.1", "[::1]"));
        assert!(!allowed("127.0.0.1", "localhost"), "names are not resolved");
    }

    #[test]
    fn names_match_literally_and_domains_match_their_subdomains_only() {
        assert!(allowed("bank.internal", "bank.internal"));
        assert!(allowed("Bank.Internal", "BANK.internal"));
        assert!(!allowed("bank.internal", "bank.internal.evil.example"));
        assert!(!allowed("bank.internal", "a.bank.internal"));
        assert!(!allowed("bank.internal", "bank.internal."));
        assert!(!allowed("bank.internal", "10.1.2.3"));
        assert!(allowed("*.bank.internal", "a.bank.internal"));
        assert!(allowed("*.bank.internal", "x.y.bank.internal"));
        assert!(!allowed("*.bank.internal", "bank.internal"));
        assert!(!allowed("*.bank.internal", "evilbank.internal"));
        assert!(!allowed("*.bank.internal", ".bank.internal"));
        assert!(allowed("localhost", "localhost"));
        assert!(!allowed("localhost", "127.0.0.1"));
        assert!(allowed("bank-a,10.0.0.0/8", "10.9.9.9"));
        assert!(allowed("bank-a,10.0.0.0/8", "bank-a"));
        assert!(!allowed("bank-a,10.0.0.0/8", "bank-b"));
    }

    #[test]
    fn entries_parse_into_patterns_and_print_back() {
        let list = parse_host_patterns(
            " loopback , 10.0.0.0/8,10.1.2.3,[::1],fd00::/8,Bank.Internal,*.svc.local",
        )
        .unwrap();
        assert_eq!(
            list,
            vec![
                HostPattern::Loopback,
                HostPattern::Network {
                    addr: "10.0.0.0".parse().unwrap(),
                    prefix_len: 8
                },
                HostPattern::Network {
                    addr: "10.1.2.3".parse().unwrap(),
                    prefix_len: 32
                },
                HostPattern::Network {
                    addr: "::1".parse().unwrap(),
                    prefix_len: 128
                },
                HostPattern::Network {
                    addr: "fd00::".parse().unwrap(),
                    prefix_len: 8
                },
                HostPattern::Name("bank.internal".into()),
                HostPattern::Subdomains("svc.local".into()),
            ]
        );
        let printed = format_host_patterns(&list);
        assert_eq!(
            printed,
            "loopback,10.0.0.0/8,10.1.2.3,::1,fd00::/8,bank.internal,*.svc.local"
        );
        assert_eq!(parse_host_patterns(&printed).unwrap(), list);
        assert_eq!(
            parse_host_patterns("LOOPBACK").unwrap(),
            vec![HostPattern::Loopback]
        );
    }

    #[test]
    fn bad_entries_are_refused_with_the_entry_named() {
        let refused = |list: &str| match parse_host_patterns(list) {
            Err(e) => e.to_string(),
            Ok(patterns) => panic!("{list:?} was accepted as {patterns:?}"),
        };
        for (list, entry, why) in [
            ("10.0.0.0/33", "10.0.0.0/33", "from 0 to 32"),
            ("::/129", "::/129", "from 0 to 128"),
            ("10.0.0.0/-1", "10.0.0.0/-1", "prefix length"),
            ("10.0.0.0/+8", "10.0.0.0/+8", "prefix length"),
            ("10.0.0.0/", "10.0.0.0/", "prefix length"),
            ("10.1.2.3/8", "10.1.2.3/8", "the network is 10.0.0.0/8"),
            ("fd00::1/8", "fd00::1/8", "the network is fd00::/8"),
            ("bank/8", "bank/8", "not an IP address"),
            ("300.1.1.1", "300.1.1.1", "cannot end in a number"),
            ("10.1", "10.1", "cannot end in a number"),
            ("010.1.2.3", "010.1.2.3", "cannot end in a number"),
            ("::ffff:10.1.2.3", "::ffff:10.1.2.3", "IPv4-mapped"),
            ("bank..internal", "bank..internal", "label"),
            ("-bank.internal", "-bank.internal", "'-'"),
            ("bank internal", "bank internal", "character"),
            ("http://bank:1", "http://bank:1", "not an IP address"),
            ("bank:7401", "bank:7401", "character"),
            ("*", "*", "character"),
            ("*.", "*.", "label"),
            ("a.*.internal", "a.*.internal", "character"),
            ("loopback,10.0.0.0/99", "10.0.0.0/99", "from 0 to 32"),
        ] {
            let message = refused(list);
            assert!(
                message.contains(&format!("{entry:?}")) && message.contains(why),
                "{list:?}: {message}"
            );
        }
        assert_eq!(
            parse_host_patterns(" "),
            Err(AllowListError::Empty),
            "an empty list would allow nothing"
        );
        assert_eq!(
            parse_host_patterns("loopback,,10.0.0.0/8"),
            Err(AllowListError::EmptyEntry { index: 1 })
        );
        assert_eq!(
            parse_host_patterns("loopback,"),
            Err(AllowListError::EmptyEntry { index: 1 })
        );
        let too_many = vec!["loopback"; PARTICIPANT_HOST_PATTERNS_MAX + 1].join(",");
        assert_eq!(
            parse_host_patterns(&too_many),
            Err(AllowListError::TooMany {
                count: PARTICIPANT_HOST_PATTERNS_MAX + 1
            })
        );
        let long_name = format!("{}.internal", "a".repeat(HOST_NAME_LEN_MAX));
        assert!(refused(&long_name).contains("at most 253 bytes"));
        let long_label = format!("{}.internal", "a".repeat(64));
        assert!(refused(&long_label).contains("1 to 63 bytes"));
    }
}
