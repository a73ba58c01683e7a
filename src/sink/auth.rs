//! How the relay proves who it is to NATS, and how it checks the server: token,
//! user/password, NKey, `.creds` (JWT + NKey), from the config keys or the URL; TLS
//! with a custom CA and a client certificate.
//!
//! The credentials are handed to async-nats through an auth callback (see
//! [`super::connect`]: the callback also refuses reconnects), so signing the server's
//! nonce for NKey and JWT authentication happens here.

use std::path::PathBuf;

use async_nats::{Auth, AuthError, ConnectOptions};
use nkeys::KeyPair;

use crate::config::{Config, Secret, bad_key};
use crate::error::Result;

/// One authentication method.
pub enum Credentials {
    None,
    Token(Secret),
    UserPassword(String, Secret),
    NKey(KeyPair),
    /// User JWT and the seed that signs for it.
    Jwt(Secret, KeyPair),
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Credentials::None => "none",
            Credentials::Token(_) => "token",
            Credentials::UserPassword(..) => "user and password",
            Credentials::NKey(_) => "nkey",
            Credentials::Jwt(..) => "creds (jwt)",
        })
    }
}

impl Credentials {
    /// From the config keys (reading the seed or creds file), else the URL. Two
    /// methods configured at once is an error naming both keys: the server would
    /// accept only one, and guessing which is how a relay ends up with more access
    /// than intended.
    pub fn load(cfg: &Config) -> Result<Credentials> {
        let n = &cfg.nats;
        let mut set: Vec<&str> = Vec::new();
        if !n.creds_file.is_empty() {
            set.push("nats.creds_file");
        }
        if !n.nkey_seed_file.is_empty() {
            set.push("nats.nkey_seed_file");
        }
        if !n.user.is_empty() || n.password.is_set() {
            set.push("nats.user/nats.password");
        }
        if n.token.is_set() {
            set.push("nats.token");
        }
        if set.len() > 1 {
            return Err(bad_key(
                set[0],
                format!(
                    "several nats authentication methods are set: {}",
                    set.join(", ")
                ),
                "keep exactly one",
            ));
        }
        if !n.creds_file.is_empty() {
            let text = read("nats.creds_file", &n.creds_file)?;
            let (jwt, seed) = parse_creds(&text).ok_or_else(|| {
                bad_key(
                    "nats.creds_file",
                    "not a .creds file (expected a NATS USER JWT and a USER NKEY SEED block)",
                    "give the file `nsc generate creds` wrote",
                )
            })?;
            let key = key_pair("nats.creds_file", &seed)?;
            return Ok(Credentials::Jwt(Secret::new(jwt), key));
        }
        if !n.nkey_seed_file.is_empty() {
            let text = read("nats.nkey_seed_file", &n.nkey_seed_file)?;
            return Ok(Credentials::NKey(key_pair(
                "nats.nkey_seed_file",
                text.trim(),
            )?));
        }
        if !n.user.is_empty() || n.password.is_set() {
            if n.user.is_empty() {
                return Err(bad_key(
                    "nats.user",
                    "nats.password is set without a user",
                    "set nats.user too",
                ));
            }
            return Ok(Credentials::UserPassword(
                n.user.clone(),
                n.password.clone(),
            ));
        }
        if n.token.is_set() {
            return Ok(Credentials::Token(n.token.clone()));
        }
        Ok(from_url(cfg.nats.url.expose()))
    }

    /// The CONNECT fields answering the server's `nonce`.
    pub fn auth(&self, nonce: &[u8]) -> std::result::Result<Auth, AuthError> {
        let mut auth = Auth::new();
        let sign = |key: &KeyPair| {
            key.sign(nonce)
                .map_err(|e| AuthError::new(format!("cannot sign the server's nonce: {e}")))
        };
        match self {
            Credentials::None => {}
            Credentials::Token(t) => auth.token = t.expose().map(str::to_string),
            Credentials::UserPassword(u, p) => {
                auth.username = Some(u.clone());
                auth.password = p.expose().map(str::to_string);
            }
            Credentials::NKey(key) => {
                auth.nkey = Some(key.public_key());
                auth.signature = Some(sign(key)?);
            }
            Credentials::Jwt(jwt, key) => {
                auth.jwt = jwt.expose().map(str::to_string);
                auth.signature = Some(sign(key)?);
            }
        }
        Ok(auth)
    }
}

fn read(key: &str, path: &str) -> Result<String> {
    std::fs::read_to_string(path).map_err(|e| {
        bad_key(
            key,
            format!("cannot read {path}: {e}"),
            "give a file readable by the relay",
        )
    })
}

fn key_pair(key: &str, seed: &str) -> Result<KeyPair> {
    // The nkeys error never contains the seed.
    KeyPair::from_seed(seed).map_err(|e| {
        bad_key(
            key,
            format!("not a valid nkey seed ({e})"),
            "a user seed starts with SU (`nk -gen user`, or nsc)",
        )
    })
}

/// `(jwt, seed)` from a `.creds` file: the first line after each `-----BEGIN …-----`
/// marker of the user JWT and the user seed.
fn parse_creds(text: &str) -> Option<(String, String)> {
    let block = |marker: &str| {
        let mut lines = text.lines().skip_while(|l| !l.contains(marker));
        lines.next()?;
        lines
            .map(str::trim)
            .find(|l| !l.is_empty())
            .filter(|l| !l.starts_with("---"))
            .map(str::to_string)
    };
    Some((
        block("BEGIN NATS USER JWT")?,
        block("BEGIN USER NKEY SEED")?,
    ))
}

/// Credentials in the URL (`nats://user:pass@host`, or `nats://token@host`), which
/// async-nats does not read from the address itself.
fn from_url(url: &str) -> Credentials {
    // In a list (a cluster), the first URL's credentials stand for all.
    let first = url.split(',').next().unwrap_or(url).trim();
    let Ok(u) = url::Url::parse(first) else {
        return Credentials::None;
    };
    let decode = |s: &str| {
        percent_encoding::percent_decode_str(s)
            .decode_utf8_lossy()
            .into_owned()
    };
    let user = decode(u.username());
    match u.password() {
        Some(pass) if !user.is_empty() => {
            Credentials::UserPassword(user, Secret::new(decode(pass)))
        }
        _ if !user.is_empty() => Credentials::Token(Secret::new(user)),
        _ => Credentials::None,
    }
}

/// TLS options: CA, client certificate, and whether TLS is required (a CA or a client
/// certificate only make sense over TLS, so either one requires it too).
pub fn apply_tls(mut opts: ConnectOptions, cfg: &Config) -> Result<ConnectOptions> {
    let n = &cfg.nats;
    let file = |key: &str, path: &str| -> Result<PathBuf> {
        std::fs::metadata(path).map_err(|e| {
            bad_key(
                key,
                format!("cannot read {path}: {e}"),
                "give a PEM file readable by the relay",
            )
        })?;
        Ok(PathBuf::from(path))
    };
    let mut required = n.tls_required;
    if !n.tls_ca_file.is_empty() {
        opts = opts.add_root_certificates(file("nats.tls_ca_file", &n.tls_ca_file)?);
        required = true;
    }
    match (n.tls_cert_file.is_empty(), n.tls_key_file.is_empty()) {
        (true, true) => {}
        (false, false) => {
            opts = opts.add_client_certificate(
                file("nats.tls_cert_file", &n.tls_cert_file)?,
                file("nats.tls_key_file", &n.tls_key_file)?,
            );
            required = true;
        }
        _ => {
            return Err(bad_key(
                "nats.tls_cert_file",
                "a client certificate needs both nats.tls_cert_file and nats.tls_key_file",
                "set both, or neither",
            ));
        }
    }
    Ok(opts.require_tls(required))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> Config {
        Config::default()
    }

    #[test]
    fn url_credentials_become_auth() {
        let a = from_url("nats://relay:p%40ss@127.0.0.1:4222")
            .auth(b"")
            .unwrap();
        assert_eq!(a.username.as_deref(), Some("relay"));
        assert_eq!(a.password.as_deref(), Some("p@ss"));
        assert!(a.token.is_none());
        let t = from_url("nats://s3cr3t@127.0.0.1:4222").auth(b"").unwrap();
        assert_eq!(t.token.as_deref(), Some("s3cr3t"));
        assert!(t.username.is_none());
        let none = from_url("nats://127.0.0.1:4222").auth(b"").unwrap();
        assert!(none.username.is_none() && none.token.is_none());
    }

    #[test]
    fn keys_win_over_the_url_and_conflicts_are_named() {
        let mut c = cfg();
        c.nats.url = crate::config::SecretUrl::new("nats://urltoken@127.0.0.1:4222");
        c.nats.token = Secret::new("keytoken");
        let a = Credentials::load(&c).unwrap().auth(b"").unwrap();
        assert_eq!(a.token.as_deref(), Some("keytoken"));
        c.nats.user = "relay".into();
        let e = Credentials::load(&c).unwrap_err();
        assert!(
            e.message.contains("nats.user/nats.password") && e.message.contains("nats.token"),
            "{e}"
        );
        let mut c = cfg();
        c.nats.password = Secret::new("pw");
        assert!(
            Credentials::load(&c)
                .unwrap_err()
                .message
                .contains("nats.user")
        );
    }

    #[test]
    fn nkey_and_creds_sign_the_nonce() {
        let dir = tempfile::tempdir().unwrap();
        let user = KeyPair::new_user();
        let seed = user.seed().unwrap();
        let seed_file = dir.path().join("relay.nk");
        std::fs::write(&seed_file, format!("{seed}\n")).unwrap();
        let mut c = cfg();
        c.nats.nkey_seed_file = seed_file.to_string_lossy().into_owned();
        let creds = Credentials::load(&c).unwrap();
        assert_eq!(format!("{creds:?}"), "nkey");
        let a = creds.auth(b"nonce-1").unwrap();
        assert_eq!(a.nkey.as_deref(), Some(user.public_key().as_str()));
        let public = KeyPair::from_public_key(&user.public_key()).unwrap();
        public
            .verify(b"nonce-1", a.signature.as_deref().unwrap())
            .unwrap();

        let creds_file = dir.path().join("relay.creds");
        std::fs::write(
            &creds_file,
            format!(
                "-----BEGIN NATS USER JWT-----\neyJhbGciOi.fake.jwt\n------END NATS USER JWT------\n\n\
                 ************************* IMPORTANT *************************\n\n\
                 -----BEGIN USER NKEY SEED-----\n{seed}\n------END USER NKEY SEED------\n"
            ),
        )
        .unwrap();
        let mut c = cfg();
        c.nats.creds_file = creds_file.to_string_lossy().into_owned();
        let a = Credentials::load(&c).unwrap().auth(b"nonce-2").unwrap();
        assert_eq!(a.jwt.as_deref(), Some("eyJhbGciOi.fake.jwt"));
        public
            .verify(b"nonce-2", a.signature.as_deref().unwrap())
            .unwrap();

        std::fs::write(&creds_file, "garbage").unwrap();
        let e = Credentials::load(&c).unwrap_err();
        assert!(e.message.contains("nats.creds_file"), "{e}");
        std::fs::write(&seed_file, "SUNOTASEED").unwrap();
        let mut c = cfg();
        c.nats.nkey_seed_file = seed_file.to_string_lossy().into_owned();
        let e = Credentials::load(&c).unwrap_err();
        assert!(
            e.message.contains("nats.nkey_seed_file") && !e.message.contains("SUNOTASEED"),
            "{e}"
        );
    }

    #[test]
    fn half_a_client_certificate_is_refused() {
        let mut c = cfg();
        c.nats.tls_cert_file = "/etc/hostname".into();
        let e = apply_tls(ConnectOptions::new(), &c).err().unwrap();
        assert!(e.message.contains("nats.tls_cert_file"), "{e}");
        let mut c = cfg();
        c.nats.tls_ca_file = "/nonexistent/ca.pem".into();
        let e = apply_tls(ConnectOptions::new(), &c).err().unwrap();
        assert!(e.message.contains("nats.tls_ca_file"), "{e}");
    }
}
