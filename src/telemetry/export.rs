//! The exporter task: batches finished spans from the queue and POSTs them as OTLP
//! protobuf (`application/x-protobuf`) to `telemetry.endpoint`.
//!
//! One request at a time, each bounded by `telemetry.export_timeout` from connect to
//! the last byte of the answer; a failed or timed-out batch is counted
//! (`outbox_relay_telemetry_spans_failed_total`) and not retried: while the endpoint
//! is down, the queue fills and further spans are dropped at the session (counted
//! there), which is what keeps delivery independent of the exporter. Each request
//! opens its own connection (HTTP/1.1 via hyper, TLS via rustls with `ring` for
//! `https://`): at most one request per batch of up to 512 spans.

use std::sync::Arc;
use std::time::Duration;

use axum::http::{self, HeaderName, HeaderValue, Request};
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

use super::Ended;
use super::MAX_BATCH;
use super::otlp::{self, Value};
use crate::config::TelemetryConfig;
use crate::error::{Error, Result};
use crate::metrics::Health;

/// How long the task waits for more spans to fill a batch once it has one.
const BATCH_DELAY: Duration = Duration::from_millis(200);
/// Most bytes of an answer read (OTLP answers are tiny; a hostile endpoint is not).
const MAX_ANSWER: usize = 64 << 10;

pub struct Client {
    url: url::Url,
    host: String,
    port: u16,
    /// `host[:port]` for the `Host` header.
    authority: String,
    path: String,
    tls: Option<tokio_rustls::TlsConnector>,
    headers: Vec<(HeaderName, HeaderValue)>,
    timeout: Duration,
}

impl Client {
    pub fn new(cfg: &TelemetryConfig) -> Result<Client> {
        let url = cfg.traces_url()?;
        let host = url
            .host_str()
            .unwrap_or_default()
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let port = url.port_or_known_default().unwrap_or(80);
        let authority = match url.port() {
            Some(p) => format!("{}:{p}", url.host_str().unwrap_or_default()),
            None => url.host_str().unwrap_or_default().to_string(),
        };
        let path = match url.query() {
            Some(q) => format!("{}?{q}", url.path()),
            None => url.path().to_string(),
        };
        let tls = if url.scheme() == "https" {
            Some(tls_connector()?)
        } else {
            None
        };
        let mut headers = Vec::new();
        for (name, value) in cfg.header_pairs()? {
            let bad = || {
                crate::config::bad_key(
                    "telemetry.headers",
                    format!("header {name} is not a valid http header"),
                    "name=value pairs separated by commas",
                )
            };
            let n = HeaderName::from_bytes(name.as_bytes()).map_err(|_| bad())?;
            let mut v = HeaderValue::from_str(&value).map_err(|_| bad())?;
            v.set_sensitive(true);
            headers.push((n, v));
        }
        Ok(Client {
            url,
            host,
            port,
            authority,
            path,
            tls,
            headers,
            timeout: cfg.export_timeout,
        })
    }

    /// The endpoint for logs: without its query, which could hold a key (credentials
    /// in the user part are refused by validation).
    pub fn redacted_url(&self) -> String {
        let mut u = self.url.clone();
        if u.query().is_some() {
            u.set_query(Some("***"));
        }
        u.to_string()
    }

    /// A TCP connection to the endpoint.
    pub async fn connect_tcp(&self) -> std::result::Result<TcpStream, String> {
        TcpStream::connect((self.host.as_str(), self.port))
            .await
            .map_err(|e| format!("connect: {}", e.to_string().to_lowercase()))
    }

    /// POST one request body; `Err` says why it was not accepted.
    async fn post(&self, body: Vec<u8>) -> std::result::Result<(), String> {
        let tcp = self.connect_tcp().await?;
        let _ = tcp.set_nodelay(true);
        let req = self.request(body)?;
        match &self.tls {
            None => send(tcp, req).await,
            Some(tls) => {
                let name = rustls::pki_types::ServerName::try_from(self.host.clone())
                    .map_err(|e| format!("tls server name: {e}"))?;
                let stream = tls
                    .connect(name, tcp)
                    .await
                    .map_err(|e| format!("tls: {e}"))?;
                send(stream, req).await
            }
        }
    }

    fn request(&self, body: Vec<u8>) -> std::result::Result<Request<Full<Bytes>>, String> {
        let mut req = Request::post(self.path.as_str())
            .header(http::header::HOST, self.authority.as_str())
            .header(http::header::CONTENT_TYPE, "application/x-protobuf")
            .header(
                http::header::USER_AGENT,
                concat!("outbox-relay/", env!("CARGO_PKG_VERSION")),
            )
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| format!("request: {e}"))?;
        for (n, v) in &self.headers {
            req.headers_mut().insert(n.clone(), v.clone());
        }
        Ok(req)
    }
}

/// One HTTP/1.1 exchange on `io`; the connection is driven beside the request and
/// closed when this returns (or is dropped by the timeout).
async fn send<IO>(io: IO, req: Request<Full<Bytes>>) -> std::result::Result<(), String>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .map_err(|e| format!("http: {e}"))?;
    let exchange = async move {
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| format!("http: {e}"))?;
        let status = resp.status();
        let body = Limited::new(resp.into_body(), MAX_ANSWER)
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        if status.is_success() {
            Ok(())
        } else {
            let text = String::from_utf8_lossy(&body[..body.len().min(200)]).to_lowercase();
            Err(format!("http status {status}: {text}"))
        }
    };
    tokio::pin!(conn);
    tokio::select! {
        r = exchange => r,
        c = &mut conn => Err(match c {
            Ok(()) => "the endpoint closed the connection before answering".to_string(),
            Err(e) => format!("http: {e}"),
        }),
    }
}

/// TLS for `https://` endpoints: the Mozilla roots, the `ring` provider (the process's
/// one TLS stack).
fn tls_connector() -> Result<tokio_rustls::TlsConnector> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| Error::fatal(format!("telemetry tls setup: {e}")))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
}

/// The task: until the queue closes, take a batch, export it within the timeout,
/// count the outcome. Failures are logged once per change of state, not per batch.
pub async fn run(
    mut rx: mpsc::Receiver<Ended>,
    client: Client,
    resource: Vec<(&'static str, Value)>,
    health: Arc<Health>,
) {
    let mut failing: Option<String> = None;
    let mut batch = Vec::with_capacity(MAX_BATCH);
    loop {
        batch.clear();
        if rx.recv_many(&mut batch, MAX_BATCH).await == 0 {
            return;
        }
        let deadline = tokio::time::Instant::now() + BATCH_DELAY;
        while batch.len() < MAX_BATCH {
            let room = MAX_BATCH - batch.len();
            match tokio::time::timeout_at(deadline, rx.recv_many(&mut batch, room)).await {
                Ok(n) if n > 0 => {}
                _ => break,
            }
        }
        let spans: Vec<_> = batch.drain(..).map(Ended::into_span).collect();
        let body = otlp::export_request(&resource, &spans);
        let n = spans.len() as u64;
        let outcome = match tokio::time::timeout(client.timeout, client.post(body)).await {
            Ok(r) => r,
            Err(_) => Err(format!("no answer within {:?}", client.timeout)),
        };
        match outcome {
            Ok(()) => {
                health.telemetry_spans_exported.inc_by(n);
                if failing.take().is_some() {
                    tracing::info!(endpoint = %client.redacted_url(), "telemetry: exporting again");
                }
            }
            Err(e) => {
                health.telemetry_spans_failed.inc_by(n);
                if failing.as_deref() != Some(e.as_str()) {
                    tracing::warn!(
                        endpoint = %client.redacted_url(),
                        error = %e,
                        hint = "check that an otlp/http collector listens at telemetry.endpoint; delivery is not affected, spans are dropped and counted",
                        "telemetry: export failed"
                    );
                    failing = Some(e);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client(endpoint: &str, headers: &str) -> Client {
        let cfg = TelemetryConfig {
            endpoint: endpoint.into(),
            headers: crate::config::Secret::new(headers),
            ..TelemetryConfig::default()
        };
        Client::new(&cfg).unwrap()
    }

    #[test]
    fn request_target_host_and_headers() {
        let c = client("http://collector:4318", "authorization=Bearer s3cret");
        assert_eq!((c.host.as_str(), c.port), ("collector", 4318));
        assert_eq!(c.authority, "collector:4318");
        assert_eq!(c.path, "/v1/traces");
        assert!(c.tls.is_none());
        let req = c.request(vec![1, 2]).unwrap();
        assert_eq!(req.method(), http::Method::POST);
        assert_eq!(req.uri(), "/v1/traces");
        assert_eq!(req.headers()["host"], "collector:4318");
        assert_eq!(req.headers()["content-type"], "application/x-protobuf");
        assert_eq!(req.headers()["authorization"], "Bearer s3cret");
        assert!(req.headers()["authorization"].is_sensitive());
        let c = client("https://otel.example.com/api/traces?key=s3cret", "");
        assert_eq!((c.host.as_str(), c.port), ("otel.example.com", 443));
        assert_eq!(c.authority, "otel.example.com");
        assert_eq!(c.path, "/api/traces?key=s3cret");
        assert!(c.tls.is_some());
        assert!(!c.redacted_url().contains("s3cret"), "{}", c.redacted_url());
        let c = client("http://[::1]:4318/v1/traces", "");
        assert_eq!(
            (c.host.as_str(), c.authority.as_str()),
            ("::1", "[::1]:4318")
        );
    }
}
