//! Credentials that come from outside: bearer tokens and PEM files.
//!
//! Both sides of Tandem read them (the coordinator's `tandem serve`, the participant's
//! `tandem-bank serve`, and the clients), so reading and checking them lives here once.
//!
//! ## Tokens
//!
//! A [`Token`] is a secret string sent as `authorization: Bearer <token>`. Its characters are
//! those RFC 6750 allows in a bearer token (`[A-Za-z0-9._~+/=-]`), so it fits in a header as
//! is and never holds the `:` that separates a name from a token in a token file. It is
//! between [`TOKEN_LEN_MIN`] and [`TOKEN_LEN_MAX`] bytes long: a short token could be guessed.
//!
//! A server keeps the tokens it accepts as a [`TokenSet`]: each token's SHA-256 digest and a
//! name for the logs, never the token itself. A presented token is hashed and compared with
//! every digest in constant time ([`subtle`]), so neither the time an answer takes nor the
//! order of the set tells how much of a guess was right, nor the length of the tokens.
//!
//! Tokens are read from a file or from the environment, never from the command line (which
//! every user of the machine can read in `/proc`). Neither [`Token`] nor [`TokenSet`] ever
//! prints a token: their `Debug` shows `<redacted>` and the names.
//!
//! A token file holds one token per line, optionally named as `name:token`; blank lines and
//! lines starting with `#` are skipped. The same list may come from an environment variable,
//! entries separated by newlines or commas.
//!
//! A client sends its token with [`BearerInterceptor`] on every call.
//!
//! ## PEM files
//!
//! [`read_pem_certs`] and [`read_pem_key`] read a certificate chain or a private key and check
//! that it parses before tonic sees it, so that a wrong or empty file is reported with its
//! path rather than as a TLS failure at the first connection. [`server_tls_from_files`] and
//! [`client_tls_from_files`] build a server's or a client's TLS settings from such files and
//! try them once, so that a key that is not the certificate's is reported at start too; every
//! server and client of Tandem builds its TLS settings through them. Their errors name the
//! setting each file came from ([`PemFile::setting`], e.g. a flag) as well as the file.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

/// Shortest token accepted, in bytes.
pub const TOKEN_LEN_MIN: usize = 16;
/// Longest token accepted, in bytes.
pub const TOKEN_LEN_MAX: usize = 512;
/// Longest token name, in bytes.
pub const TOKEN_NAME_LEN_MAX: usize = 64;
/// Most tokens one set may hold.
pub const TOKENS_MAX: usize = 1_024;
/// Largest credential file (tokens or PEM) read, in bytes.
pub const CREDENTIAL_FILE_BYTES_MAX: u64 = 1024 * 1024;

/// Why a credential could not be read. Every message names where it came from (a file path
/// or an environment variable) and never holds a token.
#[derive(Debug, thiserror::Error)]
pub enum CredentialError {
    #[error("{}: cannot read: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: {size} bytes; a credential file is at most {CREDENTIAL_FILE_BYTES_MAX} bytes", path.display())]
    TooLarge { path: PathBuf, size: u64 },
    /// `origin` is a file path or an environment variable, with a line or entry number.
    #[error("{origin}: {why}")]
    Invalid { origin: String, why: String },
}

fn invalid(origin: impl Into<String>, why: impl Into<String>) -> CredentialError {
    CredentialError::Invalid {
        origin: origin.into(),
        why: why.into(),
    }
}

/// Reads a whole credential file, refusing one larger than [`CREDENTIAL_FILE_BYTES_MAX`].
fn read_file(path: &Path) -> Result<Vec<u8>, CredentialError> {
    let read_error = |source| CredentialError::Read {
        path: path.to_path_buf(),
        source,
    };
    let size = std::fs::metadata(path).map_err(read_error)?.len();
    if size > CREDENTIAL_FILE_BYTES_MAX {
        return Err(CredentialError::TooLarge {
            path: path.to_path_buf(),
            size,
        });
    }
    std::fs::read(path).map_err(read_error)
}

/// A bearer token: secret, never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Token(String);

impl Token {
    /// Checks a token's length and characters (see the module docs); the error says why,
    /// without the token.
    pub fn parse(text: &str) -> Result<Token, String> {
        if text.len() < TOKEN_LEN_MIN || text.len() > TOKEN_LEN_MAX {
            return Err(format!(
                "a token is {TOKEN_LEN_MIN} to {TOKEN_LEN_MAX} bytes long (this one is {})",
                text.len()
            ));
        }
        if let Some(bad) = text.chars().find(|c| !is_token_char(*c)) {
            let shown = if bad.is_ascii_graphic() {
                format!("{bad:?}")
            } else {
                format!("U+{:04X}", u32::from(bad))
            };
            return Err(format!(
                "a token holds only [A-Za-z0-9._~+/=-]; this one holds {shown}"
            ));
        }
        Ok(Token(text.to_string()))
    }

    /// Reads a file holding one token (surrounding whitespace ignored).
    pub fn from_file(path: &Path) -> Result<Token, CredentialError> {
        let text = read_file(path)?;
        let text = std::str::from_utf8(&text)
            .map_err(|_| invalid(path.display().to_string(), "not UTF-8 text"))?;
        Token::parse(text.trim()).map_err(|why| invalid(path.display().to_string(), why))
    }

    /// The token in environment variable `var`, if it is set.
    pub fn from_env(var: &str) -> Result<Option<Token>, CredentialError> {
        read_env(var)?
            .map(|text| Token::parse(text.trim()).map_err(|why| invalid(format!("${var}"), why)))
            .transpose()
    }

    /// The token from `file` if given, else from environment variable `var`, else none.
    pub fn from_file_or_env(
        file: Option<&Path>,
        var: &str,
    ) -> Result<Option<Token>, CredentialError> {
        match file {
            Some(path) => Token::from_file(path).map(Some),
            None => Token::from_env(var),
        }
    }

    /// The token itself, to send it. Never log what this returns.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The `authorization` header's value: `Bearer <token>`.
    pub fn bearer_header(&self) -> String {
        format!("Bearer {}", self.0)
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}

fn is_token_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_' | '~' | '+' | '/' | '=')
}

fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_')
}

/// Adds a bearer token, if there is one, to every call of a tonic client
/// (`XClient::with_interceptor(channel, BearerInterceptor::new(token))`).
#[derive(Clone, Default)]
pub struct BearerInterceptor(Option<tonic::metadata::AsciiMetadataValue>);

impl BearerInterceptor {
    pub fn new(token: Option<&Token>) -> Self {
        // A parsed token holds only header-safe characters, so this cannot fail.
        BearerInterceptor(token.map(|t| {
            t.bearer_header()
                .parse()
                .expect("a parsed token is a valid header value")
        }))
    }
}

impl fmt::Debug for BearerInterceptor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("BearerInterceptor(<redacted>)")
    }
}

impl tonic::service::Interceptor for BearerInterceptor {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

/// The text of environment variable `var`, if it is set.
fn read_env(var: &str) -> Result<Option<String>, CredentialError> {
    match std::env::var(var) {
        Ok(text) => Ok(Some(text)),
        Err(std::env::VarError::NotPresent) => Ok(None),
        Err(std::env::VarError::NotUnicode(_)) => Err(invalid(format!("${var}"), "not UTF-8 text")),
    }
}

/// The token an `authorization` header's value carries (`Bearer <token>`, the scheme's case
/// ignored), or `None` if it is not a bearer credential.
pub fn bearer_token(header: &str) -> Option<&str> {
    let (scheme, token) = header.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

/// The tokens a server accepts: digests and names, never the tokens.
#[derive(Clone)]
pub struct TokenSet {
    entries: Vec<TokenEntry>,
}

#[derive(Clone)]
struct TokenEntry {
    name: String,
    digest: [u8; 32],
}

fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

impl TokenSet {
    /// A set of one token, named `name`.
    pub fn single(name: &str, token: &Token) -> TokenSet {
        TokenSet {
            entries: vec![TokenEntry {
                name: name.to_string(),
                digest: digest(token.expose()),
            }],
        }
    }

    /// Parses a token list: entries `token` or `name:token`, one per line (or, for
    /// `separators` that include `,`, also separated by commas); blank entries and lines
    /// starting with `#` are skipped. `origin` names the source in errors. An unnamed token
    /// is named `token-<n>` after its entry number (from 1). Refuses an empty list, a repeated
    /// name or token, and more than [`TOKENS_MAX`] tokens.
    pub fn parse(
        text: &str,
        origin: &str,
        separators: &[char],
    ) -> Result<TokenSet, CredentialError> {
        let mut entries: Vec<TokenEntry> = Vec::new();
        for (index, entry) in text.split(separators).enumerate() {
            let entry = entry.trim();
            if entry.is_empty() || entry.starts_with('#') {
                continue;
            }
            let at = format!("{origin}: entry {}", index + 1);
            if entries.len() == TOKENS_MAX {
                return Err(invalid(at, format!("more than {TOKENS_MAX} tokens")));
            }
            let (name, token) = match entry.split_once(':') {
                Some((name, token)) => {
                    let name = name.trim();
                    if name.is_empty()
                        || name.len() > TOKEN_NAME_LEN_MAX
                        || !name.chars().all(is_name_char)
                    {
                        return Err(invalid(
                            at,
                            format!("a token's name is 1 to {TOKEN_NAME_LEN_MAX} of [A-Za-z0-9_.-] before the ':'"),
                        ));
                    }
                    (name.to_string(), token.trim())
                }
                None => (format!("token-{}", index + 1), entry),
            };
            let token = Token::parse(token).map_err(|why| invalid(at.clone(), why))?;
            let digest = digest(token.expose());
            if entries.iter().any(|e| e.name == name) {
                return Err(invalid(at, format!("the name {name:?} is used twice")));
            }
            if entries.iter().any(|e| e.digest == digest) {
                return Err(invalid(at, "the same token is listed twice"));
            }
            entries.push(TokenEntry { name, digest });
        }
        if entries.is_empty() {
            return Err(invalid(origin, "no token in the list"));
        }
        Ok(TokenSet { entries })
    }

    /// Reads a token file (one entry per line; see [`TokenSet::parse`]).
    pub fn from_file(path: &Path) -> Result<TokenSet, CredentialError> {
        let text = read_file(path)?;
        let origin = path.display().to_string();
        let text = std::str::from_utf8(&text).map_err(|_| invalid(&origin, "not UTF-8 text"))?;
        TokenSet::parse(text, &origin, &['\n'])
    }

    /// The list in environment variable `var` (entries separated by newlines or commas), if
    /// it is set.
    pub fn from_env(var: &str) -> Result<Option<TokenSet>, CredentialError> {
        read_env(var)?
            .map(|text| TokenSet::parse(&text, &format!("${var}"), &['\n', ',']))
            .transpose()
    }

    /// The set from `file` if given, else from environment variable `var`, else none.
    pub fn from_file_or_env(
        file: Option<&Path>,
        var: &str,
    ) -> Result<Option<TokenSet>, CredentialError> {
        match file {
            Some(path) => TokenSet::from_file(path).map(Some),
            None => TokenSet::from_env(var),
        }
    }

    /// The name of the token `presented` is, if it is one of the set. Every entry is compared,
    /// in constant time, whatever matches.
    pub fn check(&self, presented: &str) -> Option<&str> {
        let presented = digest(presented);
        let mut found = None;
        for entry in &self.entries {
            if bool::from(entry.digest.ct_eq(&presented)) {
                found = Some(entry.name.as_str());
            }
        }
        found
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

impl fmt::Debug for TokenSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenSet")
            .field(
                "names",
                &self.entries.iter().map(|e| &e.name).collect::<Vec<_>>(),
            )
            .field("tokens", &"<redacted>")
            .finish()
    }
}

/// Reads a PEM file of one or more certificates (a chain, or the CAs to trust) and checks
/// that each parses; returns the file's bytes.
pub fn read_pem_certs(path: &Path) -> Result<Vec<u8>, CredentialError> {
    let pem = read_file(path)?;
    let origin = || path.display().to_string();
    let mut count = 0;
    for cert in CertificateDer::pem_slice_iter(&pem) {
        cert.map_err(|e| invalid(origin(), format!("not a usable PEM certificate: {e}")))?;
        count += 1;
    }
    if count == 0 {
        return Err(invalid(
            origin(),
            "holds no PEM certificate (-----BEGIN CERTIFICATE-----)",
        ));
    }
    Ok(pem)
}

/// Reads a PEM file holding a private key (PKCS#8, PKCS#1 or SEC1) and checks that it parses;
/// returns the file's bytes.
pub fn read_pem_key(path: &Path) -> Result<Vec<u8>, CredentialError> {
    let pem = read_file(path)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| {
        invalid(
            path.display().to_string(),
            format!("holds no usable PEM private key: {e}"),
        )
    })?;
    Ok(pem)
}

/// Longest a peer may take over its TLS handshake with a Tandem server, in ms; a slower one is
/// dropped.
pub const TLS_HANDSHAKE_TIMEOUT_MS: u64 = 10_000;

/// A PEM file a TLS setting is read from, and the name of that setting (a flag such as
/// `--tls-cert`, or a description), which errors name with the file.
#[derive(Debug, Clone, Copy)]
pub struct PemFile<'a> {
    pub path: &'a Path,
    pub setting: &'static str,
}

/// Why TLS settings could not be built from files.
#[derive(Debug, thiserror::Error)]
pub enum TlsFilesError {
    /// A file could not be read, or does not hold what the setting needs.
    #[error("{setting}: {source}")]
    File {
        setting: &'static str,
        source: CredentialError,
    },
    /// The files parse but do not make usable TLS settings (for example a key that is not
    /// the certificate's). `settings` names them all, separated by `/`.
    #[error("{settings}: not usable for TLS: {why}")]
    Unusable { settings: String, why: String },
}

fn certs_of(file: PemFile<'_>) -> Result<Vec<u8>, TlsFilesError> {
    read_pem_certs(file.path).map_err(|source| TlsFilesError::File {
        setting: file.setting,
        source,
    })
}

fn key_of(file: PemFile<'_>) -> Result<Vec<u8>, TlsFilesError> {
    read_pem_key(file.path).map_err(|source| TlsFilesError::File {
        setting: file.setting,
        source,
    })
}

fn unusable(files: &[PemFile<'_>], error: &dyn std::error::Error) -> TlsFilesError {
    let settings: Vec<&str> = files.iter().map(|file| file.setting).collect();
    TlsFilesError::Unusable {
        settings: settings.join("/"),
        why: crate::error_chain(error),
    }
}

/// A server's TLS settings: its certificate chain and key, and for mutual TLS the CA that must
/// have signed every caller's certificate (a caller without one fails the handshake, before
/// any request). Handshakes are bounded by [`TLS_HANDSHAKE_TIMEOUT_MS`].
pub fn server_tls_from_files(
    cert: PemFile<'_>,
    key: PemFile<'_>,
    client_ca: Option<PemFile<'_>>,
) -> Result<ServerTlsConfig, TlsFilesError> {
    let mut config = ServerTlsConfig::new()
        .identity(Identity::from_pem(certs_of(cert)?, key_of(key)?))
        .timeout(Duration::from_millis(TLS_HANDSHAKE_TIMEOUT_MS));
    if let Some(ca) = client_ca {
        config = config.client_ca_root(Certificate::from_pem(certs_of(ca)?));
    }
    // Built once here so that a key that is not the certificate's is reported now.
    tonic::transport::Server::builder()
        .tls_config(config.clone())
        .map_err(|e| unusable(&[cert, key], &e))?;
    Ok(config)
}

/// A client's TLS settings: the CA that signed the server's certificate, and optionally the
/// certificate and key it presents to a server that requires mutual TLS.
pub fn client_tls_from_files(
    ca: PemFile<'_>,
    identity: Option<(PemFile<'_>, PemFile<'_>)>,
) -> Result<ClientTlsConfig, TlsFilesError> {
    let mut config = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(certs_of(ca)?));
    let mut files = vec![ca];
    if let Some((cert, key)) = identity {
        config = config.identity(Identity::from_pem(certs_of(cert)?, key_of(key)?));
        files.extend([cert, key]);
    }
    // Built once here (for any https address) so that unusable files are reported now.
    tonic::transport::Endpoint::from_static("https://server.invalid")
        .tls_config(config.clone())
        .map_err(|e| unusable(&files, &e))?;
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "aaaaaaaaaaaaaaaa-one";
    const B: &str = "bbbbbbbbbbbbbbbb-two";

    #[test]
    fn a_token_set_matches_only_its_tokens_and_names_them() {
        let set = TokenSet::parse(
            &format!("# clients\n\nbilling:{A}\n  {B}  \n"),
            "tokens.txt",
            &['\n'],
        )
        .unwrap();
        assert_eq!(set.len(), 2);
        assert_eq!(set.check(A), Some("billing"));
        assert_eq!(set.check(B), Some("token-4"));
        assert_eq!(set.check("aaaaaaaaaaaaaaaa-on"), None);
        assert_eq!(set.check(&format!("{A}x")), None);
        assert_eq!(set.check(""), None);
    }

    #[test]
    fn environment_lists_take_commas_too() {
        let set = TokenSet::parse(&format!("a:{A}, b:{B}"), "$X", &['\n', ',']).unwrap();
        assert_eq!(set.check(B), Some("b"));
    }

    #[test]
    fn bad_lists_are_refused_with_the_entry_named_and_no_token_shown() {
        for (text, why) in [
            ("", "no token in the list"),
            ("# only a comment\n", "no token in the list"),
            ("short", "16 to 512 bytes"),
            ("has space inside the token", "U+0020"),
            ("bad name:aaaaaaaaaaaaaaaaaaa", "name"),
            (":aaaaaaaaaaaaaaaaaaaa", "name"),
            ("x:aaaaaaaaaaaaaaaa\u{e9}aa", "U+00E9"),
            (
                "x:aaaaaaaaaaaaaaaaaaaa\nx:bbbbbbbbbbbbbbbbbbbb",
                "used twice",
            ),
            (
                "x:aaaaaaaaaaaaaaaaaaaa\ny:aaaaaaaaaaaaaaaaaaaa",
                "listed twice",
            ),
        ] {
            let error = TokenSet::parse(text, "tokens.txt", &['\n'])
                .unwrap_err()
                .to_string();
            assert!(error.starts_with("tokens.txt"), "{text:?}: {error}");
            assert!(error.contains(why), "{text:?}: {error}");
            assert!(
                !error.contains("aaaaaaaa"),
                "{text:?}: the token leaked: {error}"
            );
        }
        let too_many: Vec<String> = (0..=TOKENS_MAX).map(|i| format!("{A}{i}")).collect();
        let error = TokenSet::parse(&too_many.join("\n"), "t", &['\n']).unwrap_err();
        assert!(error.to_string().contains("more than 1024"), "{error}");
    }

    #[test]
    fn tokens_never_print() {
        let token = Token::parse(A).unwrap();
        assert_eq!(format!("{token:?}"), "Token(<redacted>)");
        let set = TokenSet::single("coordinator", &token);
        let shown = format!("{set:?}");
        assert!(
            shown.contains("coordinator") && !shown.contains(A),
            "{shown}"
        );
        assert_eq!(token.bearer_header(), format!("Bearer {A}"));
    }

    #[test]
    fn bearer_headers_parse_with_any_scheme_case() {
        assert_eq!(bearer_token(&format!("Bearer {A}")), Some(A));
        assert_eq!(bearer_token(&format!("bearer {A}")), Some(A));
        assert_eq!(bearer_token(&format!("Basic {A}")), None);
        assert_eq!(bearer_token("Bearer "), None);
        assert_eq!(bearer_token(A), None);
    }

    #[test]
    fn credential_files_are_checked_and_named_in_errors() {
        let dir = tempfile::tempdir().unwrap();
        let token_file = dir.path().join("token");
        std::fs::write(&token_file, format!("  {A}\n")).unwrap();
        assert_eq!(Token::from_file(&token_file).unwrap().expose(), A);
        let missing = dir.path().join("missing.pem");
        let error = read_pem_certs(&missing).unwrap_err().to_string();
        assert!(
            error.contains("missing.pem") && error.contains("cannot read"),
            "{error}"
        );
        let not_pem = dir.path().join("not.pem");
        std::fs::write(&not_pem, "hello").unwrap();
        let error = read_pem_certs(&not_pem).unwrap_err().to_string();
        assert!(
            error.contains("not.pem") && error.contains("no PEM certificate"),
            "{error}"
        );
        let error = read_pem_key(&not_pem).unwrap_err().to_string();
        assert!(
            error.contains("not.pem") && error.contains("private key"),
            "{error}"
        );
        let big = dir.path().join("big");
        std::fs::write(&big, vec![b'a'; CREDENTIAL_FILE_BYTES_MAX as usize + 1]).unwrap();
        assert!(matches!(
            Token::from_file(&big),
            Err(CredentialError::TooLarge { .. })
        ));
    }

    #[test]
    fn tls_settings_from_files_name_the_setting_and_the_file_at_fault() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.pem");
        let file = |setting| PemFile {
            path: &missing,
            setting,
        };
        let error = server_tls_from_files(file("--tls-cert"), file("--tls-key"), None)
            .unwrap_err()
            .to_string();
        assert!(
            error.starts_with("--tls-cert: ") && error.contains("missing.pem"),
            "{error}"
        );
        let error = client_tls_from_files(file("--ca"), None)
            .unwrap_err()
            .to_string();
        assert!(
            error.starts_with("--ca: ") && error.contains("missing.pem"),
            "{error}"
        );
    }
}
