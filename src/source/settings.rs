//! Connection settings shared by the SQL and the replication connection: address,
//! password source and TLS, with libpq's `sslmode` meanings.
//!
//! Both connections are built from one [`PgSettings`], so they can never disagree on
//! where they connect or how carefully they check the server. The TLS settings come
//! from the URL's query (`?sslmode=verify-full&sslrootcert=/ca.pem`, as libpq users
//! write them) or from the `postgres.ssl*` keys, which win. The password comes from
//! `postgres.password` (usually `OUTBOX_RELAY_POSTGRES_PASSWORD`), else
//! `postgres.password_file`, else the URL.

use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};

use crate::config::{Config, bad_key};
use crate::error::{Error, Result};

/// libpq's `sslmode`, less `allow` (which only matters to servers that require TLS
/// from some clients and not others).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    Disable,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl FromStr for SslMode {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        Ok(match s {
            "disable" => SslMode::Disable,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            other => {
                return Err(format!(
                    "unknown sslmode {other:?}: use disable, prefer, require, verify-ca or verify-full"
                ));
            }
        })
    }
}

/// How to secure the connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsSettings {
    pub mode: SslMode,
    /// Trusted CA certificates (PEM); none: the Mozilla roots (`webpki-roots`).
    pub root_cert: Option<PathBuf>,
    /// Client certificate chain and key (PEM), for servers that ask for one.
    pub client_cert: Option<(PathBuf, PathBuf)>,
}

/// Everything needed to open either connection. `Debug` never shows the password:
/// tokio-postgres redacts it.
#[derive(Debug, Clone)]
pub struct PgSettings {
    pub pg: tokio_postgres::Config,
    pub tls: TlsSettings,
}

/// URL query parameters that libpq understands and tokio-postgres does not: taken out
/// before the URL is parsed, and applied here.
const TLS_PARAMS: [&str; 4] = ["sslmode", "sslrootcert", "sslcert", "sslkey"];

impl PgSettings {
    /// Parse without I/O (the password file is not read): for `Config::validate`.
    pub fn parse(cfg: &Config) -> Result<PgSettings> {
        let mut url = url::Url::parse(cfg.postgres.url.expose()).map_err(|e| {
            bad_key(
                "postgres.url",
                format!("not a url ({e})"),
                "use postgres://user:password@host:5432/database",
            )
        })?;
        let mut from_url = std::collections::BTreeMap::new();
        let kept: Vec<(String, String)> = url
            .query_pairs()
            .filter_map(|(k, v)| {
                if TLS_PARAMS.contains(&k.as_ref()) {
                    from_url.insert(k.into_owned(), v.into_owned());
                    None
                } else {
                    Some((k.into_owned(), v.into_owned()))
                }
            })
            .collect();
        url.set_query(None);
        if !kept.is_empty() {
            url.query_pairs_mut().extend_pairs(kept);
        }
        let mut pg = tokio_postgres::Config::from_str(url.as_str()).map_err(|e| {
            bad_key(
                "postgres.url",
                e,
                "use postgres://user:password@host:5432/database",
            )
        })?;
        pg.application_name("outbox-relay");
        pg.connect_timeout(std::time::Duration::from_secs(10));
        if let Some(pw) = cfg.postgres.password.expose() {
            pg.password(pw);
        }

        let p = &cfg.postgres;
        // A key in the config wins over the URL's parameter of the same name.
        let pick = |key: &str, value: &str| -> Option<String> {
            if value.is_empty() {
                from_url.get(key).filter(|v| !v.is_empty()).cloned()
            } else {
                Some(value.to_string())
            }
        };
        let mode_key = if p.sslmode.is_empty() {
            "postgres.url (sslmode)"
        } else {
            "postgres.sslmode"
        };
        let mode = match pick("sslmode", &p.sslmode) {
            Some(m) => m.parse().map_err(|e: String| {
                bad_key(
                    mode_key,
                    e,
                    "libpq's meanings: https://www.postgresql.org/docs/current/libpq-ssl.html",
                )
            })?,
            None => SslMode::Prefer,
        };
        let root_cert = pick("sslrootcert", &p.sslrootcert).map(PathBuf::from);
        let cert = pick("sslcert", &p.sslcert).map(PathBuf::from);
        let key = pick("sslkey", &p.sslkey).map(PathBuf::from);
        let client_cert = match (cert, key) {
            (Some(c), Some(k)) => Some((c, k)),
            (None, None) => None,
            _ => {
                return Err(bad_key(
                    "postgres.sslcert",
                    "a client certificate needs both sslcert and sslkey",
                    "set both postgres.sslcert and postgres.sslkey, or neither",
                ));
            }
        };
        // libpq: `require` with a root certificate given verifies the chain.
        let mode = if mode == SslMode::Require && root_cert.is_some() {
            SslMode::VerifyCa
        } else {
            mode
        };
        pg.ssl_mode(match mode {
            SslMode::Disable => tokio_postgres::config::SslMode::Disable,
            SslMode::Prefer => tokio_postgres::config::SslMode::Prefer,
            _ => tokio_postgres::config::SslMode::Require,
        });
        Ok(PgSettings {
            pg,
            tls: TlsSettings {
                mode,
                root_cert,
                client_cert,
            },
        })
    }

    /// [`PgSettings::parse`], then the password file (when the password is not given
    /// otherwise) is read.
    pub fn load(cfg: &Config) -> Result<PgSettings> {
        let mut s = Self::parse(cfg)?;
        let file = &cfg.postgres.password_file;
        if !cfg.postgres.password.is_set() && !file.is_empty() {
            let text = std::fs::read_to_string(file).map_err(|e| {
                bad_key(
                    "postgres.password_file",
                    format!("cannot read {file}: {e}"),
                    "give a readable file holding only the password",
                )
            })?;
            s.pg.password(text.trim_end_matches(['\r', '\n']));
        }
        Ok(s)
    }

    /// Host for the replication connection (a Unix socket directory is a path).
    pub fn host(&self) -> String {
        match self.pg.get_hosts().first() {
            Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
            #[cfg(unix)]
            Some(tokio_postgres::config::Host::Unix(p)) => p.to_string_lossy().into_owned(),
            None => "127.0.0.1".to_string(),
        }
    }

    /// TLS for the replication connection (`pgwire-replication` implements the same
    /// sslmode meanings).
    pub fn replication_tls(&self) -> pgwire_replication::TlsConfig {
        use pgwire_replication::SslMode as R;
        let t = &self.tls;
        let mut c = pgwire_replication::TlsConfig::disabled();
        c.mode = match t.mode {
            SslMode::Disable => R::Disable,
            SslMode::Prefer => R::Prefer,
            SslMode::Require => R::Require,
            SslMode::VerifyCa => R::VerifyCa,
            SslMode::VerifyFull => R::VerifyFull,
        };
        c.ca_pem_path = t.root_cert.clone();
        if let Some((cert, key)) = &t.client_cert {
            c.client_cert_pem_path = Some(cert.clone());
            c.client_key_pem_path = Some(key.clone());
        }
        // The server name checked under verify-full is the host, also when it is an
        // IP address (the transport refuses an IP without an explicit name).
        c.sni_hostname = Some(self.host());
        c
    }

    /// TLS connector for the SQL connection (tokio-postgres).
    pub fn sql_tls(&self) -> Result<tokio_postgres_rustls::MakeRustlsConnect> {
        Ok(tokio_postgres_rustls::MakeRustlsConnect::new(
            client_config(&self.tls)?,
        ))
    }
}

fn tls_error(key: &str, msg: String) -> Error {
    bad_key(
        key,
        msg,
        "give PEM files readable by the relay (see docs/security.md)",
    )
}

/// The one crypto provider of the process: `ring`, as for NATS and the replication
/// transport.
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn client_config(t: &TlsSettings) -> Result<rustls::ClientConfig> {
    let provider = provider();
    let mut roots = RootCertStore::empty();
    match &t.root_cert {
        Some(path) => {
            let certs = CertificateDer::pem_file_iter(path)
                .and_then(|it| it.collect::<std::result::Result<Vec<_>, _>>())
                .map_err(|e| {
                    tls_error(
                        "postgres.sslrootcert",
                        format!("cannot read {}: {e}", path.display()),
                    )
                })?;
            let (added, _) = roots.add_parsable_certificates(certs);
            if added == 0 {
                return Err(tls_error(
                    "postgres.sslrootcert",
                    format!("no certificate in {}", path.display()),
                ));
            }
        }
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    let roots = Arc::new(roots);
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::fatal(format!("tls setup: {e}")))?
        .with_root_certificates(roots.clone());
    let mut config = match &t.client_cert {
        Some((cert, key)) => {
            let chain = CertificateDer::pem_file_iter(cert)
                .and_then(|it| it.collect::<std::result::Result<Vec<_>, _>>())
                .map_err(|e| {
                    tls_error(
                        "postgres.sslcert",
                        format!("cannot read {}: {e}", cert.display()),
                    )
                })?;
            let key_der = PrivateKeyDer::from_pem_file(key).map_err(|e| {
                tls_error(
                    "postgres.sslkey",
                    format!("cannot read {}: {e}", key.display()),
                )
            })?;
            builder.with_client_auth_cert(chain, key_der).map_err(|e| {
                tls_error(
                    "postgres.sslcert",
                    format!("unusable client certificate: {e}"),
                )
            })?
        }
        None => builder.with_no_client_auth(),
    };
    if t.mode != SslMode::VerifyFull {
        let chain = rustls::client::WebPkiServerVerifier::builder_with_provider(roots, provider)
            .build()
            .map_err(|e| Error::fatal(format!("tls setup: {e}")))?;
        config
            .dangerous()
            .set_certificate_verifier(Arc::new(Lenient {
                chain,
                check_chain: t.mode == SslMode::VerifyCa,
            }));
    }
    Ok(config)
}

/// The server checks below `verify-full` (libpq's meanings): `prefer`/`require`
/// encrypt without authenticating the server; `verify-ca` checks the chain but not the
/// name. Handshake signatures are always verified.
#[derive(Debug)]
struct Lenient {
    chain: Arc<rustls::client::WebPkiServerVerifier>,
    check_chain: bool,
}

impl ServerCertVerifier for Lenient {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        if !self.check_chain {
            return Ok(ServerCertVerified::assertion());
        }
        match self
            .chain
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
        {
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::NotValidForName
                | rustls::CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        self.chain.verify_tls12_signature(message, cert, dss)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        self.chain.verify_tls13_signature(message, cert, dss)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.chain.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(url: &str) -> Config {
        let mut c = Config::default();
        c.postgres.url = crate::config::SecretUrl::new(url);
        c
    }

    #[test]
    fn libpq_parameters_are_taken_from_the_url() {
        let s = PgSettings::parse(&cfg(
            "postgres://u@db.example:5433/app?sslmode=verify-full&sslrootcert=/ca.pem&application_name=x",
        ))
        .unwrap();
        assert_eq!(s.tls.mode, SslMode::VerifyFull);
        assert_eq!(s.tls.root_cert, Some(PathBuf::from("/ca.pem")));
        assert_eq!(s.host(), "db.example");
        assert_eq!(s.pg.get_ports(), &[5433]);
        assert_eq!(
            s.pg.get_ssl_mode(),
            tokio_postgres::config::SslMode::Require
        );
        assert_eq!(
            s.replication_tls().mode,
            pgwire_replication::SslMode::VerifyFull
        );
    }

    #[test]
    fn keys_win_over_the_url_and_defaults_are_libpq_s() {
        let s = PgSettings::parse(&cfg("postgres://u@h/app")).unwrap();
        assert_eq!(s.tls.mode, SslMode::Prefer);
        let mut c = cfg("postgres://u@h/app?sslmode=disable");
        c.postgres.sslmode = "require".into();
        assert_eq!(PgSettings::parse(&c).unwrap().tls.mode, SslMode::Require);
        // require + a root certificate verifies the chain, as libpq does.
        c.postgres.sslrootcert = "/ca.pem".into();
        assert_eq!(PgSettings::parse(&c).unwrap().tls.mode, SslMode::VerifyCa);
    }

    #[test]
    fn bad_values_name_the_key() {
        let e = PgSettings::parse(&cfg("postgres://u@h/app?sslmode=sometimes")).unwrap_err();
        assert!(e.message.contains("postgres.url (sslmode)"), "{e}");
        let mut c = cfg("postgres://u@h/app");
        c.postgres.sslmode = "verify".into();
        assert!(
            PgSettings::parse(&c)
                .unwrap_err()
                .message
                .contains("postgres.sslmode")
        );
        let mut c = cfg("postgres://u@h/app");
        c.postgres.sslcert = "/c.pem".into();
        assert!(
            PgSettings::parse(&c)
                .unwrap_err()
                .message
                .contains("postgres.sslcert")
        );
    }

    #[test]
    fn password_sources_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("pw");
        std::fs::write(&file, "from-file\n").unwrap();
        let mut c = cfg("postgres://u:from-url@h/app");
        assert_eq!(
            PgSettings::load(&c).unwrap().pg.get_password(),
            Some(&b"from-url"[..])
        );
        c.postgres.password_file = file.to_string_lossy().into_owned();
        assert_eq!(
            PgSettings::load(&c).unwrap().pg.get_password(),
            Some(&b"from-file"[..])
        );
        c.postgres.password = crate::config::Secret::new("from-env");
        assert_eq!(
            PgSettings::load(&c).unwrap().pg.get_password(),
            Some(&b"from-env"[..])
        );
        let mut c = cfg("postgres://u@h/app");
        c.postgres.password_file = "/nonexistent/pw".into();
        let e = PgSettings::load(&c).unwrap_err();
        assert!(e.message.contains("postgres.password_file"), "{e}");
    }

    #[test]
    fn missing_pem_files_name_the_key() {
        let mut c = cfg("postgres://u@h/app?sslmode=verify-ca&sslrootcert=/nonexistent/ca.pem");
        let e = PgSettings::load(&c).unwrap().sql_tls().err().unwrap();
        assert!(e.message.contains("postgres.sslrootcert"), "{e}");
        c.postgres.url = crate::config::SecretUrl::new("postgres://u@h/app?sslmode=require");
        assert!(PgSettings::load(&c).unwrap().sql_tls().is_ok());
    }
}
