//! `tandem certs`: a private CA and the certificates a Tandem deployment needs, made with
//! rcgen (no openssl needed).
//!
//! Writes into `--out`:
//! - `ca.pem`, `ca.key`: the CA every other certificate is signed by (what `--tls-client-ca`,
//!   `--participant-ca` and `--coordinator-ca` name);
//! - `coordinator.pem`, `coordinator.key`: the coordinator's certificate, for its server
//!   (`--tls-cert`) and as its client identity towards participants
//!   (`--participant-client-cert`). Its first DNS name is `--coordinator-name`, the identity
//!   participants check (`tandem-bank serve --coordinator-name`);
//! - `<name>.pem`, `<name>.key` for each `--participant-name`: a participant's certificate,
//!   for its server and as its client identity towards the coordinator (outcome queries);
//! - `client.pem`, `client.key`: a client certificate (`--client-name`), for clients under
//!   mutual TLS. It cannot serve, and it does not name the coordinator, so participants
//!   refuse it as a caller.
//!
//! Server certificates also name every `--host` (by default `localhost`, `127.0.0.1` and
//! `::1`), the addresses clients dial. Keys are written readable by their owner only. Existing
//! files are never overwritten unless `--force` is given.
//!
//! Meant for tests, development and small deployments; a deployment with its own PKI uses its
//! own certificates with the same flags.

use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

/// Longest validity `--days` may ask for.
const DAYS_MAX: u32 = 3_650;
/// Most participant certificates one run makes.
const PARTICIPANTS_MAX: usize = 64;
/// Most extra host names or addresses.
const HOSTS_MAX: usize = 32;

#[derive(clap::Args, Debug, Clone)]
pub struct CertsArgs {
    /// Folder to write the PEM files into (created if missing).
    #[arg(long)]
    out: PathBuf,
    /// The coordinator's identity: the first DNS name of its certificate, which participants
    /// check with `tandem-bank serve --coordinator-name`.
    #[arg(long, default_value = "tandem-coordinator")]
    coordinator_name: String,
    /// A participant to make a certificate for (repeat for each); its files are NAME.pem and
    /// NAME.key.
    #[arg(long = "participant-name", value_name = "NAME")]
    participant_names: Vec<String>,
    /// The name in the client certificate.
    #[arg(long, default_value = "tandem-client")]
    client_name: String,
    /// Host names and IP addresses every server certificate also names (repeat for each).
    #[arg(long = "host", value_name = "HOST", default_values_t = ["localhost".to_string(), "127.0.0.1".to_string(), "::1".to_string()])]
    hosts: Vec<String>,
    /// Days the certificates are valid from now.
    #[arg(long, default_value_t = 365)]
    days: u32,
    /// Overwrite files that exist.
    #[arg(long)]
    force: bool,
}

/// A DNS name usable both in a certificate and as a file name.
fn validate_name(flag: &str, name: &str) -> anyhow::Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        });
    if !ok {
        bail!("{flag} {name:?} is not a DNS name (labels of [A-Za-z0-9-], separated by dots)");
    }
    Ok(())
}

/// What one certificate is for.
enum Role {
    Server,
    Client,
}

fn leaf_params(
    names: Vec<String>,
    role: Role,
    not_before: time::OffsetDateTime,
    not_after: time::OffsetDateTime,
) -> anyhow::Result<CertificateParams> {
    let common_name = names.first().cloned().unwrap_or_default();
    let mut params = CertificateParams::new(names).context("a certificate name is not usable")?;
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    params.use_authority_key_identifier_extension = true;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = match role {
        // A server certificate also serves as the same process's client identity (the
        // coordinator calling participants, a participant asking the coordinator).
        Role::Server => vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ],
        Role::Client => vec![ExtendedKeyUsagePurpose::ClientAuth],
    };
    params.not_before = not_before;
    params.not_after = not_after;
    Ok(params)
}

fn write_file(path: &Path, contents: &str, secret: bool, force: bool) -> anyhow::Result<()> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true);
    if force {
        options.create(true).truncate(true);
    } else {
        options.create_new(true);
    }
    if secret {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(path).with_context(|| {
        if path.exists() && !force {
            format!("{} exists; give --force to overwrite it", path.display())
        } else {
            format!("cannot create {}", path.display())
        }
    })?;
    file.write_all(contents.as_bytes())
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

pub fn run(args: CertsArgs) -> anyhow::Result<()> {
    validate_name("--coordinator-name", &args.coordinator_name)?;
    validate_name("--client-name", &args.client_name)?;
    if args.participant_names.len() > PARTICIPANTS_MAX {
        bail!("at most {PARTICIPANTS_MAX} --participant-name");
    }
    if args.hosts.len() > HOSTS_MAX {
        bail!("at most {HOSTS_MAX} --host");
    }
    if args.days == 0 || args.days > DAYS_MAX {
        bail!("--days {} is out of range 1..={DAYS_MAX}", args.days);
    }
    let mut files = BTreeSet::from([
        "ca".to_string(),
        "coordinator".to_string(),
        "client".to_string(),
    ]);
    for name in &args.participant_names {
        validate_name("--participant-name", name)?;
        if !files.insert(name.clone()) {
            bail!("--participant-name {name:?} is given twice, or collides with ca, coordinator or client");
        }
    }
    for host in &args.hosts {
        if host.parse::<std::net::IpAddr>().is_err() {
            validate_name("--host", host)?;
        }
    }
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("cannot create {}", args.out.display()))?;

    // Valid from a day ago, so that a clock a little behind still accepts them.
    let now = time::OffsetDateTime::now_utc();
    let not_before = now - time::Duration::days(1);
    let not_after = now + time::Duration::days(i64::from(args.days));

    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "Tandem CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    ca_params.not_before = not_before;
    ca_params.not_after = not_after;
    let ca_key = KeyPair::generate()?;
    let ca_cert = ca_params.self_signed(&ca_key)?;
    let out = &args.out;
    write_file(&out.join("ca.pem"), &ca_cert.pem(), false, args.force)?;
    write_file(
        &out.join("ca.key"),
        &ca_key.serialize_pem(),
        true,
        args.force,
    )?;
    let issuer = Issuer::new(ca_params, ca_key);

    let server_names = |name: &str| {
        let mut names = vec![name.to_string()];
        names.extend(args.hosts.iter().filter(|h| *h != name).cloned());
        names
    };
    let mut leaves = vec![(
        "coordinator".to_string(),
        server_names(&args.coordinator_name),
        Role::Server,
    )];
    for name in &args.participant_names {
        leaves.push((name.clone(), server_names(name), Role::Server));
    }
    leaves.push((
        "client".to_string(),
        vec![args.client_name.clone()],
        Role::Client,
    ));
    for (file, names, role) in leaves {
        let key = KeyPair::generate()?;
        let cert =
            leaf_params(names.clone(), role, not_before, not_after)?.signed_by(&key, &issuer)?;
        write_file(
            &out.join(format!("{file}.pem")),
            &cert.pem(),
            false,
            args.force,
        )?;
        write_file(
            &out.join(format!("{file}.key")),
            &key.serialize_pem(),
            true,
            args.force,
        )?;
        println!("{file}.pem: {}", names.join(", "));
    }
    println!("ca.pem: Tandem CA; files in {}", out.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(out: &Path) -> CertsArgs {
        CertsArgs {
            out: out.to_path_buf(),
            coordinator_name: "tandem-coordinator".into(),
            participant_names: vec!["bank-a".into()],
            client_name: "tandem-client".into(),
            hosts: vec!["localhost".into(), "127.0.0.1".into()],
            days: 30,
            force: false,
        }
    }

    #[test]
    fn certs_are_written_with_private_keys_and_never_overwritten_by_accident() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        run(args(dir.path())).unwrap();
        for name in ["ca", "coordinator", "bank-a", "client"] {
            let pem = std::fs::read_to_string(dir.path().join(format!("{name}.pem"))).unwrap();
            assert!(pem.starts_with("-----BEGIN CERTIFICATE-----"), "{name}.pem");
            let key = dir.path().join(format!("{name}.key"));
            let mode = std::fs::metadata(&key).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{name}.key is readable by others");
            tandem_common::credentials::read_pem_key(&key).unwrap();
        }
        let before = std::fs::read(dir.path().join("ca.pem")).unwrap();
        let error = format!("{:#}", run(args(dir.path())).unwrap_err());
        assert!(
            error.contains("ca.pem exists") && error.contains("--force"),
            "{error}"
        );
        assert_eq!(std::fs::read(dir.path().join("ca.pem")).unwrap(), before);
        run(CertsArgs {
            force: true,
            ..args(dir.path())
        })
        .unwrap();
        assert_ne!(std::fs::read(dir.path().join("ca.pem")).unwrap(), before);
        let clash = CertsArgs {
            participant_names: vec!["client".into()],
            ..args(dir.path())
        };
        assert!(run(clash).unwrap_err().to_string().contains("collides"));
    }

    #[test]
    fn names_must_be_dns_names() {
        for good in ["bank-a", "tandem-coordinator", "a.b.example", "x1"] {
            validate_name("--x", good).unwrap();
        }
        for bad in ["", "-a", "a-", "a..b", "a b", "a/b", "../etc", "a_b"] {
            let error = validate_name("--x", bad).unwrap_err().to_string();
            assert!(
                error.contains("--x") && error.contains("DNS name"),
                "{bad:?}: {error}"
            );
        }
    }
}
