//! Who may talk to the coordinator, and how it proves who it is: TLS and bearer tokens.
//!
//! ## TLS
//!
//! [`server_tls`] loads the coordinator's certificate and key (`tandem serve --tls-cert
//! --tls-key`) and, for mutual TLS, the CA whose signature every client and participant
//! certificate must carry (`--tls-client-ca`): a peer without such a certificate fails the
//! handshake, before any request. [`client_tls`] loads what the coordinator needs to call
//! participants over TLS (`--participant-ca`, and for participants that require mutual TLS
//! `--participant-client-cert --participant-client-key`). Errors name the file at fault.
//!
//! ## Tokens
//!
//! [`AuthLayer`] is a tower layer in front of every service of the server. It sorts each call
//! by its gRPC path ([`Access::of_path`]) and checks the `authorization: Bearer <token>`
//! header against the [`AccessPolicy`]:
//! - health checking (`/grpc.health.v1.Health/`) and reflection (`/grpc.reflection.*`) stay
//!   open: load balancers and `grpcurl` must reach them, and they reveal nothing stored;
//! - `/tandem.v1.Admin/` calls need the admin token. A valid client token there is refused
//!   with PERMISSION_DENIED (the caller is known but not allowed); a missing or unknown token
//!   with UNAUTHENTICATED. With client tokens but no admin token configured, every admin call
//!   is refused with PERMISSION_DENIED: the admin API is never opened by accident;
//! - every other path (`tandem.v1.Coordinator`, and any service added later) needs a client
//!   token or the admin token; a missing or unknown one is refused with UNAUTHENTICATED.
//!
//! The layer sorts by path alone, so it protects a service whether or not this build has it.
//! With no token configured at all the layer lets everything through (local development, or
//! a deployment that relies on mutual TLS alone). A refused call never reaches a service, so
//! it cannot change stored data. Tokens are never logged: refusals log the path and which
//! rule refused, and an accepted call's token name only at debug level.
//!
//! Limitation: under mutual TLS without tokens, any certificate the CA signed may call the
//! admin API; give an admin token to keep it apart.

use std::path::Path;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures::future::Either;
use tandem_common::credentials::{self, PemFile, TlsFilesError, TokenSet};
use tonic::body::Body;
use tonic::codegen::http;
use tonic::transport::{ClientTlsConfig, ServerTlsConfig};

/// The coordinator's own TLS settings as a server: its certificate and key (`--tls-cert`,
/// `--tls-key`) and, for mutual TLS, the CA every peer's certificate must carry
/// (`--tls-client-ca`). Errors name the flag and the file.
pub fn server_tls(
    cert: &Path,
    key: &Path,
    client_ca: Option<&Path>,
) -> Result<ServerTlsConfig, TlsFilesError> {
    let file = |path, setting| PemFile { path, setting };
    credentials::server_tls_from_files(
        file(cert, "--tls-cert"),
        file(key, "--tls-key"),
        client_ca.map(|ca| file(ca, "--tls-client-ca")),
    )
}

/// The coordinator's TLS settings as a client of participants: the CA that signed their
/// certificates (`--participant-ca`), and optionally the certificate and key it presents to
/// those that require mutual TLS (`--participant-client-cert`, `--participant-client-key`;
/// it should name the identity participants check, see `tandem certs`).
pub fn client_tls(
    ca: &Path,
    identity: Option<(&Path, &Path)>,
) -> Result<ClientTlsConfig, TlsFilesError> {
    let file = |path, setting| PemFile { path, setting };
    credentials::client_tls_from_files(
        file(ca, "--participant-ca"),
        identity.map(|(cert, key)| {
            (
                file(cert, "--participant-client-cert"),
                file(key, "--participant-client-key"),
            )
        }),
    )
}

/// Which tokens the coordinator accepts. Both `None`: no token is checked.
#[derive(Debug, Clone, Default)]
pub struct AccessPolicy {
    /// Tokens of clients (and of participants asking for outcomes).
    pub client_tokens: Option<TokenSet>,
    /// The admin credential: accepted everywhere, and the only one `tandem.v1.Admin` takes.
    pub admin_tokens: Option<TokenSet>,
}

/// What a gRPC path needs (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Health checking and reflection.
    Open,
    /// `tandem.v1.Admin`.
    Admin,
    /// Everything else.
    Client,
}

/// Paths that stay open whatever the policy.
const OPEN_PREFIXES: [&str; 3] = [
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1.ServerReflection/",
    "/grpc.reflection.v1alpha.ServerReflection/",
];
/// The admin API's path prefix.
pub const ADMIN_PATH_PREFIX: &str = "/tandem.v1.Admin/";

impl Access {
    pub fn of_path(path: &str) -> Access {
        if OPEN_PREFIXES.iter().any(|p| path.starts_with(p)) {
            Access::Open
        } else if path.starts_with(ADMIN_PATH_PREFIX) {
            Access::Admin
        } else {
            Access::Client
        }
    }
}

/// Why a call was refused (before any service saw it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// No bearer token, or one the policy does not know: UNAUTHENTICATED.
    Unauthenticated(&'static str),
    /// A known token that may not make this call: PERMISSION_DENIED.
    PermissionDenied(&'static str),
}

impl Refusal {
    pub fn to_status(&self) -> tonic::Status {
        match self {
            Refusal::Unauthenticated(why) => tonic::Status::unauthenticated(*why),
            Refusal::PermissionDenied(why) => tonic::Status::permission_denied(*why),
        }
    }
}

/// Who presented a token the policy knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Caller<'a> {
    Admin(&'a str),
    Client(&'a str),
    Unknown,
}

impl AccessPolicy {
    /// Whether any token is checked at all.
    pub fn is_enforced(&self) -> bool {
        self.client_tokens.is_some() || self.admin_tokens.is_some()
    }

    fn caller(&self, token: Option<&str>) -> Caller<'_> {
        let Some(token) = token else {
            return Caller::Unknown;
        };
        // Both sets are always checked, so the time taken does not tell which one matched.
        let admin = self.admin_tokens.as_ref().and_then(|s| s.check(token));
        let client = self.client_tokens.as_ref().and_then(|s| s.check(token));
        match (admin, client) {
            (Some(name), _) => Caller::Admin(name),
            (None, Some(name)) => Caller::Client(name),
            (None, None) => Caller::Unknown,
        }
    }

    /// Decides a call to `path` whose `authorization` header is `header`. `Ok` carries the
    /// accepted token's name, if a token was needed.
    pub fn decide(&self, path: &str, header: Option<&str>) -> Result<Option<String>, Refusal> {
        if !self.is_enforced() {
            return Ok(None);
        }
        let access = Access::of_path(path);
        if access == Access::Open {
            return Ok(None);
        }
        let token = header.and_then(credentials::bearer_token);
        let caller = self.caller(token);
        match (access, caller) {
            (Access::Open, _) => Ok(None),
            (Access::Admin | Access::Client, Caller::Admin(name)) => Ok(Some(name.to_string())),
            (Access::Client, Caller::Client(name)) => Ok(Some(name.to_string())),
            (Access::Client, Caller::Unknown) if self.client_tokens.is_none() => Ok(None),
            (Access::Admin, Caller::Client(_)) => Err(Refusal::PermissionDenied(
                "the admin API needs the admin credential; a client token is not enough",
            )),
            (Access::Admin, Caller::Unknown) if self.admin_tokens.is_none() => {
                Err(Refusal::PermissionDenied(
                    "the admin API is closed: this coordinator has no admin credential configured",
                ))
            }
            (Access::Admin | Access::Client, Caller::Unknown) => {
                Err(Refusal::Unauthenticated(if token.is_none() {
                    "this call needs an `authorization: Bearer <token>` header"
                } else {
                    "the bearer token is not one this coordinator accepts"
                }))
            }
        }
    }
}

/// The tower layer that applies an [`AccessPolicy`] to every call (see the module docs).
#[derive(Debug, Clone)]
pub struct AuthLayer {
    policy: Arc<AccessPolicy>,
}

impl AuthLayer {
    pub fn new(policy: AccessPolicy) -> Self {
        AuthLayer {
            policy: Arc::new(policy),
        }
    }
}

impl<S> tower_layer::Layer<S> for AuthLayer {
    type Service = AuthService<S>;

    fn layer(&self, inner: S) -> AuthService<S> {
        AuthService {
            inner,
            policy: self.policy.clone(),
        }
    }
}

/// [`AuthLayer`]'s service: refuses a call with its status before `inner` sees it.
#[derive(Debug, Clone)]
pub struct AuthService<S> {
    inner: S,
    policy: Arc<AccessPolicy>,
}

impl<S> tower_service::Service<http::Request<Body>> for AuthService<S>
where
    S: tower_service::Service<http::Request<Body>, Response = http::Response<Body>>,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = Either<S::Future, std::future::Ready<Result<http::Response<Body>, S::Error>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let header = request
            .headers()
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        match self.policy.decide(request.uri().path(), header) {
            Ok(name) => {
                if let Some(name) = name {
                    tracing::debug!(path = request.uri().path(), token = %name, "call authorised");
                }
                Either::Left(self.inner.call(request))
            }
            Err(refusal) => {
                tracing::warn!(path = request.uri().path(), ?refusal, "call refused");
                Either::Right(std::future::ready(Ok(refusal.to_status().into_http())))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tandem_common::credentials::Token;

    const CLIENT: &str = "client-token-0123456789";
    const ADMIN: &str = "admin-token-0123456789";
    const COORDINATOR: &str = "/tandem.v1.Coordinator/Execute2pc";
    const ADMIN_CALL: &str = "/tandem.v1.Admin/ListTransactions";

    fn set(name: &str, token: &str) -> Option<TokenSet> {
        Some(TokenSet::single(name, &Token::parse(token).unwrap()))
    }

    fn bearer(token: &str) -> String {
        format!("Bearer {token}")
    }

    fn code(policy: &AccessPolicy, path: &str, header: Option<&str>) -> Option<tonic::Code> {
        policy
            .decide(path, header)
            .err()
            .map(|r| r.to_status().code())
    }

    #[test]
    fn paths_sort_into_open_admin_and_client() {
        assert_eq!(
            Access::of_path("/grpc.health.v1.Health/Check"),
            Access::Open
        );
        assert_eq!(
            Access::of_path("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"),
            Access::Open
        );
        assert_eq!(Access::of_path(ADMIN_CALL), Access::Admin);
        assert_eq!(Access::of_path(COORDINATOR), Access::Client);
        assert_eq!(Access::of_path("/tandem.v1.Other/X"), Access::Client);
        assert_eq!(
            Access::of_path("/grpc.health.v1.HealthX/Check"),
            Access::Client
        );
    }

    #[test]
    fn no_token_configured_lets_everything_through() {
        let open = AccessPolicy::default();
        for path in [COORDINATOR, ADMIN_CALL, "/grpc.health.v1.Health/Check"] {
            assert_eq!(code(&open, path, None), None, "{path}");
        }
    }

    #[test]
    fn client_tokens_guard_every_path_but_health_and_reflection() {
        let policy = AccessPolicy {
            client_tokens: set("billing", CLIENT),
            admin_tokens: set("admin", ADMIN),
        };
        use tonic::Code::{PermissionDenied, Unauthenticated};
        let cases: [(&str, Option<String>, Option<tonic::Code>); 11] = [
            (COORDINATOR, Some(bearer(CLIENT)), None),
            (COORDINATOR, Some(bearer(ADMIN)), None),
            (COORDINATOR, None, Some(Unauthenticated)),
            (
                COORDINATOR,
                Some(bearer("wrong-token-0123456789")),
                Some(Unauthenticated),
            ),
            (COORDINATOR, Some(CLIENT.to_string()), Some(Unauthenticated)),
            (
                COORDINATOR,
                Some(format!("Basic {CLIENT}")),
                Some(Unauthenticated),
            ),
            (ADMIN_CALL, Some(bearer(ADMIN)), None),
            (ADMIN_CALL, Some(bearer(CLIENT)), Some(PermissionDenied)),
            (ADMIN_CALL, None, Some(Unauthenticated)),
            ("/grpc.health.v1.Health/Check", None, None),
            ("/tandem.v1.NotYetWritten/X", None, Some(Unauthenticated)),
        ];
        for (path, header, expected) in cases {
            assert_eq!(
                code(&policy, path, header.as_deref()),
                expected,
                "{path} with {header:?}"
            );
        }
        assert_eq!(
            policy.decide(COORDINATOR, Some(&bearer(CLIENT))),
            Ok(Some("billing".to_string()))
        );
    }

    #[test]
    fn client_tokens_without_an_admin_token_close_the_admin_api() {
        let policy = AccessPolicy {
            client_tokens: set("billing", CLIENT),
            admin_tokens: None,
        };
        assert_eq!(
            code(&policy, ADMIN_CALL, Some(&bearer(CLIENT))),
            Some(tonic::Code::PermissionDenied)
        );
        assert_eq!(
            code(&policy, ADMIN_CALL, None),
            Some(tonic::Code::PermissionDenied)
        );
    }

    #[test]
    fn an_admin_token_alone_guards_only_the_admin_api() {
        let policy = AccessPolicy {
            client_tokens: None,
            admin_tokens: set("admin", ADMIN),
        };
        assert_eq!(code(&policy, COORDINATOR, None), None);
        assert_eq!(
            code(&policy, ADMIN_CALL, None),
            Some(tonic::Code::Unauthenticated)
        );
        assert_eq!(code(&policy, ADMIN_CALL, Some(&bearer(ADMIN))), None);
    }
}
