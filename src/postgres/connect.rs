//! Where the PostgreSQL store connects, with what TLS, and what its errors mean.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio_postgres::config::SslMode;
use tokio_postgres::error::SqlState;
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::config::redact_url;
use crate::error::{Error, Result};

/// How the connection is encrypted, as libpq's `sslmode` says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Tls {
    /// `disable`: plain TCP (or a Unix socket).
    Disable,
    /// `prefer` (the default, as in libpq) and `require`: encrypted when the server offers it
    /// (`prefer`) or always (`require`), without checking the server's certificate, as libpq
    /// does for these modes.
    Unverified { required: bool },
    /// `verify-ca` and `verify-full`: encrypted, with the certificate checked against
    /// `sslrootcert` (or the Mozilla roots) and the host name checked too (for `verify-ca`
    /// as well: stricter than libpq, never weaker).
    Verified,
}

/// A parsed `postgres://` URL.
#[derive(Clone)]
pub(crate) struct Target {
    pub(crate) config: tokio_postgres::Config,
    pub(crate) tls: Tls,
    pub(crate) root_cert: Option<PathBuf>,
    /// The URL without its password, for messages.
    pub(crate) shown: String,
}

impl fmt::Debug for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.shown)
    }
}

/// Whether `url` names a PostgreSQL database.
pub(crate) fn is_postgres_url(url: &str) -> bool {
    let url = url.trim();
    url.starts_with("postgres://") || url.starts_with("postgresql://")
}

impl Target {
    /// Parses a `postgres://` or `postgresql://` URL. `sslmode` takes libpq's values
    /// (`disable`, `prefer`, `require`, `verify-ca`, `verify-full`) and `sslrootcert` a PEM
    /// file of trusted certificates; every other parameter is tokio-postgres's.
    pub(crate) fn parse(url: &str) -> Result<Target> {
        let url = url.trim();
        let invalid = |reason: String| Error::InvalidConfig { reason };
        if !is_postgres_url(url) {
            return Err(invalid(format!(
                "`{}` is not a PostgreSQL URL (postgres://user@host/database)",
                redact_url(url)
            )));
        }
        let (base, query) = match url.split_once('?') {
            Some((b, q)) => (b, q),
            None => (url, ""),
        };
        let mut tls = Tls::Unverified { required: false };
        let mut root_cert = None;
        let mut kept = Vec::new();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            match k {
                "sslmode" => {
                    tls = match percent_decode(v).as_str() {
                        "disable" => Tls::Disable,
                        "allow" | "prefer" => Tls::Unverified { required: false },
                        "require" => Tls::Unverified { required: true },
                        "verify-ca" | "verify-full" => Tls::Verified,
                        other => {
                            return Err(invalid(format!(
                                "sslmode={other} is not one of disable, prefer, require, verify-ca, verify-full"
                            )));
                        }
                    }
                }
                "sslrootcert" => root_cert = Some(PathBuf::from(percent_decode(v))),
                _ => kept.push(pair),
            }
        }
        let rebuilt = if kept.is_empty() {
            base.to_owned()
        } else {
            format!("{base}?{}", kept.join("&"))
        };
        let mut config = tokio_postgres::Config::from_str(&rebuilt).map_err(|e| {
            invalid(format!(
                "`{}` is not a usable PostgreSQL URL: {e}",
                redact_url(url)
            ))
        })?;
        config.ssl_mode(match tls {
            Tls::Disable => SslMode::Disable,
            Tls::Unverified { required: false } => SslMode::Prefer,
            _ => SslMode::Require,
        });
        if config.get_user().is_none() {
            config.user(std::env::var("USER").unwrap_or_else(|_| "postgres".into()));
        }
        Ok(Target {
            config,
            tls,
            root_cert,
            shown: redact_url(url),
        })
    }

    /// The rustls connector for this target's `sslmode`.
    pub(crate) fn connector(&self) -> Result<MakeRustlsConnect> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| Error::InvalidConfig {
                reason: format!("TLS: {e}"),
            })?;
        let config = match self.tls {
            Tls::Verified => {
                let mut roots = RootCertStore::empty();
                match &self.root_cert {
                    Some(path) => {
                        let certs = CertificateDer::pem_file_iter(path)
                            .and_then(|it| it.collect::<Result<Vec<_>, _>>())
                            .map_err(|e| Error::InvalidConfig {
                                reason: format!(
                                    "sslrootcert {}: cannot read PEM certificates: {e}",
                                    path.display()
                                ),
                            })?;
                        let (added, _) = roots.add_parsable_certificates(certs);
                        if added == 0 {
                            return Err(Error::InvalidConfig {
                                reason: format!(
                                    "sslrootcert {} holds no usable certificate",
                                    path.display()
                                ),
                            });
                        }
                    }
                    None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
                }
                builder.with_root_certificates(roots).with_no_client_auth()
            }
            _ => builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(Unverified(
                    provider.signature_verification_algorithms,
                )))
                .with_no_client_auth(),
        };
        Ok(MakeRustlsConnect::new(config))
    }

    /// Connect timeout.
    pub(crate) fn set_connect_timeout(&mut self, timeout: Duration) {
        self.config.connect_timeout(timeout);
    }
}

/// `sslmode=prefer`/`require`: the channel is encrypted but the server is not authenticated
/// (libpq's meaning of these modes). The handshake's signatures are still checked.
#[derive(Debug)]
struct Unverified(WebPkiSupportedAlgorithms);

impl ServerCertVerifier for Unverified {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_schemes()
    }
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && i + 2 < b.len()
            && s.is_char_boundary(i + 3)
            && let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16)
        {
            out.push(v);
            i += 3;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// What a PostgreSQL error means to the engine's callers.
pub(crate) fn pg_error(e: tokio_postgres::Error, target: &str) -> Error {
    let Some(code) = e.code() else {
        // No SQLSTATE: the connection (refused, reset, closed, timed out) or TLS.
        return Error::Unavailable {
            detail: format!("{target}: {}", error_chain(&e)),
        };
    };
    let refused = |what: &str| Error::Refused {
        detail: format!("{target}: {what}: {}", error_chain(&e)),
    };
    match code {
        c if *c == SqlState::INVALID_PASSWORD
            || *c == SqlState::INVALID_AUTHORIZATION_SPECIFICATION =>
        {
            refused("authentication failed")
        }
        c if *c == SqlState::INVALID_CATALOG_NAME => refused("the database does not exist"),
        c if *c == SqlState::INSUFFICIENT_PRIVILEGE => {
            refused("permission denied (see the README's PostgreSQL grants)")
        }
        c if *c == SqlState::READ_ONLY_SQL_TRANSACTION => {
            refused("the server only accepts reads (a standby, or default_transaction_read_only)")
        }
        c if *c == SqlState::DISK_FULL => Error::DiskFull,
        c if *c == SqlState::PROGRAM_LIMIT_EXCEEDED => Error::TooLarge {
            detail: error_chain(&e),
        },
        c if *c == SqlState::T_R_DEADLOCK_DETECTED
            || *c == SqlState::T_R_SERIALIZATION_FAILURE
            || *c == SqlState::LOCK_NOT_AVAILABLE =>
        {
            Error::Busy
        }
        c if c.code().starts_with("08")
            || c.code().starts_with("57")
            || c.code().starts_with("53") =>
        {
            // Connection exceptions, operator intervention (shutdown, cancel, statement
            // timeout), insufficient resources (too many connections, out of memory or shared
            // memory): the server is there but cannot serve now.
            Error::Unavailable {
                detail: format!("{target}: {}", error_chain(&e)),
            }
        }
        _ => Error::Storage(Arc::new(e)),
    }
}

/// An error with its sources, one line.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        let text = inner.to_string();
        if !s.contains(&text) {
            s.push_str(": ");
            s.push_str(&text);
        }
        source = inner.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse_with_libpq_ssl_modes() {
        let t =
            Target::parse("postgres://app:secret@db.internal:5433/payments?sslmode=verify-full")
                .unwrap();
        assert_eq!(t.tls, Tls::Verified);
        assert_eq!(
            t.shown,
            "postgres://app:***@db.internal:5433/payments?sslmode=verify-full"
        );
        assert_eq!(t.config.get_dbname(), Some("payments"));
        let t = Target::parse("postgresql://app@db/x?sslmode=require&sslrootcert=%2Fetc%2Fca.pem")
            .unwrap();
        assert_eq!(t.tls, Tls::Unverified { required: true });
        assert_eq!(t.root_cert, Some(PathBuf::from("/etc/ca.pem")));
        assert_eq!(
            Target::parse("postgres://u@h/d").unwrap().tls,
            Tls::Unverified { required: false }
        );
        assert!(Target::parse("postgres://u@h/d?sslmode=bogus").is_err());
        assert!(Target::parse("mysql://u@h/d").is_err());
        let socket = Target::parse("postgres://postgres@%2Ftmp%2Fpg:5999/test").unwrap();
        assert_eq!(socket.config.get_dbname(), Some("test"));
    }

    #[test]
    fn passwords_never_reach_messages() {
        assert_eq!(redact_url("postgres://u:p@h/d"), "postgres://u:***@h/d");
        assert_eq!(redact_url("postgres://u@h/d"), "postgres://u@h/d");
        assert_eq!(redact_url("postgres://h/d"), "postgres://h/d");
        // tokio-postgres takes the credentials up to the first `@`, slashes included.
        assert_eq!(redact_url("postgres://u:p/w@h/d"), "postgres://u:***@h/d");
        assert_eq!(
            redact_url("postgres://u@h/d?sslmode=require&password=secret&x=1"),
            "postgres://u@h/d?sslmode=require&password=***&x=1"
        );
        assert_eq!(
            redact_url("postgress://u:secret@h/d"),
            "postgress://u:***@h/d"
        );
        assert_eq!(redact_url("host=h password=secret"), "host=h password=***");
    }
}
