//! Values that must never print: passwords, tokens, URLs that may carry them.
//!
//! Architecture invariant: a secret reaches a log line, an error, `status` or
//! `/metrics` only as `***`. [`Secret`] holds its value in a [`secrecy::SecretString`]
//! (zeroed on drop, no `Display`), and its `Debug`, `Display` and `Serialize` all print
//! `***`. The one way to the value is `expose`, called only where a connection is made.

use std::fmt;

use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A password or token from the config or the environment. Empty means "not set".
#[derive(Clone, Default)]
pub struct Secret(Option<SecretString>);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        let value: String = value.into();
        if value.is_empty() {
            Self(None)
        } else {
            Self(Some(SecretString::from(value)))
        }
    }
    pub fn is_set(&self) -> bool {
        self.0.is_some()
    }
    /// The value, for the connection that needs it; `None` when not set.
    pub fn expose(&self) -> Option<&str> {
        self.0.as_ref().map(|s| s.expose_secret())
    }
}

impl PartialEq for Secret {
    fn eq(&self, other: &Self) -> bool {
        self.expose() == other.expose()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.is_set() { "\"***\"" } else { "\"\"" })
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.is_set() { "***" } else { "" })
    }
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d).map(Secret::new)
    }
}

/// Serialises as `***` (or empty): a config written back out never carries the value.
impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

/// A URL that may carry a password or token. Prints redacted; [`SecretUrl::expose`]
/// is the one way to the real value, used only to connect.
#[derive(Clone, Deserialize, PartialEq)]
#[serde(transparent)]
pub struct SecretUrl(String);

/// Serialises redacted, like [`Secret`].
impl Serialize for SecretUrl {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.redacted())
    }
}

impl SecretUrl {
    pub fn new(url: impl Into<String>) -> Self {
        Self(url.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
    /// Each URL of a comma-separated list (a NATS cluster) redacted.
    pub fn redacted(&self) -> String {
        self.0
            .split(',')
            .map(|u| redact_url(u.trim()))
            .collect::<Vec<_>>()
            .join(",")
    }
}

impl fmt::Debug for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.redacted())
    }
}

impl fmt::Display for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

/// Replace the password (or a lone token in the user part) of a URL with `***`, and
/// `password=` query parameters too. Unparseable input is reduced to its scheme.
pub fn redact_url(raw: &str) -> String {
    match url::Url::parse(raw) {
        Ok(mut u) => {
            if u.password().is_some() {
                let _ = u.set_password(Some("***"));
            } else if raw.starts_with("nats") && !u.username().is_empty() {
                // nats://TOKEN@host: the user part is the secret.
                let _ = u.set_username("***");
            }
            let pairs: Vec<(String, String)> = u
                .query_pairs()
                .map(|(k, v)| {
                    let secret = matches!(
                        k.as_ref(),
                        "password" | "pass" | "token" | "sslpassword" | "nkey" | "jwt"
                    );
                    let v = if secret {
                        "***".to_string()
                    } else {
                        v.into_owned()
                    };
                    (k.into_owned(), v)
                })
                .collect();
            if !pairs.is_empty() {
                u.query_pairs_mut().clear().extend_pairs(pairs);
            }
            u.to_string()
        }
        Err(_) => match raw.split_once("://") {
            Some((scheme, _)) => format!("{scheme}://***"),
            None => "***".into(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_redacted() {
        let u = SecretUrl::new("postgres://app:s3cret-pw@db:5432/app?sslmode=disable&password=x2");
        let shown = format!("{u} {u:?}");
        assert!(
            !shown.contains("s3cret-pw") && !shown.contains("x2"),
            "{shown}"
        );
        assert!(shown.contains("app:***@db"), "{shown}");
        let n = SecretUrl::new("nats://tok3n@127.0.0.1:4222");
        assert!(!n.to_string().contains("tok3n"));
        let n = SecretUrl::new("nats://user:pw9@127.0.0.1:4222");
        assert!(!format!("{n:?}").contains("pw9"));
    }

    #[test]
    fn each_url_of_a_list_is_redacted() {
        let u = SecretUrl::new("nats://a:pw1@n1:4222, nats://a:pw2@n2:4222");
        assert_eq!(u.redacted(), "nats://a:***@n1:4222,nats://a:***@n2:4222");
    }

    #[test]
    fn secret_never_prints_its_value() {
        let s = Secret::new("hunter2-token");
        let shown = format!("{s} {s:?} {}", serde_json::to_string(&s).unwrap());
        assert!(!shown.contains("hunter2"), "{shown}");
        assert_eq!(s.expose(), Some("hunter2-token"));
        assert!(!Secret::new("").is_set());
        let back: Secret = serde_json::from_str("\"abc\"").unwrap();
        assert_eq!(back.expose(), Some("abc"));
    }
}
