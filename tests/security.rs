//! Security through real servers: PostgreSQL accepting only TLS + SCRAM, nats-server
//! with TLS (client certificates verified) and per-user permissions, the relay under
//! the least-privilege role of `deploy/relay-role.sql`, certificate problems named,
//! permission errors reported, secrets never printed.

use std::path::Path;

use async_nats::jetstream;

use crate::harness::{DEADLINE, Env, STREAM, http_get, insert_tx, wait_count};
use crate::support::nats::Nats;
use crate::support::postgres::Postgres;
use crate::support::tls::{Ca, Issued};
use crate::support::wait_for;

const PG_PASSWORD: &str = "pg-Relay-Secret-31d7";
const PG_ADMIN_PASSWORD: &str = "pg-Admin-Secret-8c01";
const NATS_PASSWORD: &str = "nats-Relay-Secret-4e9a";
const NATS_ADMIN_PASSWORD: &str = "nats-Admin-Secret-0b5f";

/// TCP accepts only TLS with SCRAM; the Unix socket (the test's own admin path) trusts.
const HBA: &str = "local all all trust\n\
                   hostssl all all 127.0.0.1/32 scram-sha-256\n\
                   hostssl all all ::1/128 scram-sha-256\n";

struct Secure {
    env: Env,
    ca: Ca,
    client: Issued,
    _certs: tempfile::TempDir,
}

impl Secure {
    async fn start() -> Secure {
        let certs = tempfile::tempdir().expect("tempdir");
        let ca = Ca::new(certs.path(), "ca");
        let server = ca.issue(certs.path(), "server", &["localhost", "127.0.0.1"]);
        let client = ca.issue(certs.path(), "client", &["outbox-relay"]);
        let pg = Postgres::start_configured(
            &[
                ("ssl", "on"),
                ("ssl_cert_file", "server.crt"),
                ("ssl_key_file", "server.key"),
                ("password_encryption", "scram-sha-256"),
            ],
            &[
                ("pg_hba.conf", HBA.as_bytes()),
                ("server.crt", server.cert_pem.as_bytes()),
                ("server.key", server.key_pem.as_bytes()),
            ],
        );
        let q = |p: &Path| p.display().to_string();
        // The relay may publish where it routes and dead-letters, use the JetStream
        // API (streams, KV checkpoint) and receive replies; `outbox.denied.>` is
        // withheld to see a permission error reported.
        let nats = Nats::start_without_probe(&format!(
            r#"
tls {{
  cert_file: "{cert}"
  key_file: "{key}"
  ca_file: "{ca}"
  verify: true
}}
authorization {{
  users = [
    {{ user: relay, password: "{NATS_PASSWORD}", permissions: {{
        publish: {{ allow: ["outbox.>", "$JS.API.>", "$KV.outbox_relay.>"], deny: ["outbox.denied.>"] }}
        subscribe: {{ allow: ["_INBOX.>"] }}
    }} }}
    {{ user: admin, password: "{NATS_ADMIN_PASSWORD}" }}
  ]
}}
"#,
            cert = q(&server.cert),
            key = q(&server.key),
            ca = q(&ca.pem),
        ));
        let env = Env::start_with(pg, nats).await;
        let admin = env.sql().await;
        admin
            .batch_execute(&format!(
                "ALTER ROLE postgres PASSWORD '{PG_ADMIN_PASSWORD}'"
            ))
            .await
            .expect("admin password");
        Secure {
            env,
            ca,
            client,
            _certs: certs,
        }
    }

    /// The relay's config: TLS verified on both ends, credentials outside the URLs.
    fn write_config(&self, user: &str, pg_ca: &Path, nats_ca: &Path) {
        let env = &self.env;
        std::fs::write(env.dir.path().join("pgpass"), format!("{PG_PASSWORD}\n")).unwrap();
        env.write_raw_config(&format!(
            r#"[postgres]
url = "postgres://{user}@localhost:{pg_port}/app?sslmode=verify-full&sslrootcert={pg_ca}"
password_file = "{pgpass}"
status_interval = "100ms"

[nats]
url = "tls://127.0.0.1:{nats_port}"
user = "relay"
tls_ca_file = "{nats_ca}"
tls_cert_file = "{cert}"
tls_key_file = "{key}"
ack_timeout = "2s"

[http]
listen = "127.0.0.1:{http}"

[log]
level = "trace"

[[streams]]
name = "{STREAM}"
subjects = ["outbox.>"]
"#,
            pg_port = env.pg.port(),
            pg_ca = pg_ca.display(),
            pgpass = env.dir.path().join("pgpass").display(),
            nats_port = env.nats.port(),
            nats_ca = nats_ca.display(),
            cert = self.client.cert.display(),
            key = self.client.key.display(),
            http = env.http_port,
        ));
    }

    /// The test's own JetStream client (admin user, same CA and client certificate).
    async fn js(&self) -> jetstream::Context {
        outbox_relay::install_tls_provider();
        let client = async_nats::ConnectOptions::with_user_and_password(
            "admin".into(),
            NATS_ADMIN_PASSWORD.into(),
        )
        .add_root_certificates(self.ca.pem.clone())
        .add_client_certificate(self.client.cert.clone(), self.client.key.clone())
        .require_tls(true)
        .connect(format!("tls://127.0.0.1:{}", self.env.nats.port()))
        .await
        .expect("admin connects over tls");
        jetstream::new(client)
    }

    /// `deploy/relay-role.sql`, exactly as documented, through psql.
    fn create_relay_role(&self, role: &str) {
        let pg = &self.env.pg;
        let socket_dir = pg.data_dir().parent().expect("pg root");
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/relay-role.sql");
        let out = std::process::Command::new(pg.tool("psql"))
            .arg("-h")
            .arg(socket_dir)
            .args([
                "-p",
                &pg.port().to_string(),
                "-U",
                "postgres",
                "-d",
                "app",
                "-X",
                "-q",
            ])
            .args(["-v", &format!("relay_role={role}")])
            .args(["-v", &format!("relay_password={PG_PASSWORD}")])
            .args([
                "-v",
                "outbox_schema=public",
                "-v",
                "outbox_table=outbox_events",
            ])
            .arg("-f")
            .arg(&script)
            .output()
            .expect("run psql");
        assert!(
            out.status.success(),
            "relay-role.sql failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

const ENV_SECRETS: [(&str, &str); 1] = [("OUTBOX_RELAY_NATS_PASSWORD", NATS_PASSWORD)];

/// Migrate as the owner over TLS, run as the least-privilege role over TLS + SCRAM,
/// `check` names a missing grant, a denied subject is reported, no secret is printed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_scram_and_least_privilege_end_to_end() {
    let s = Secure::start().await;
    let env = &s.env;
    let mut seen = String::new();

    // `migrate` as the table owner (postgres), password from the environment.
    s.write_config("postgres", &s.ca.pem, &s.ca.pem);
    let out = env.cli_env(
        &["migrate"],
        &[
            ("OUTBOX_RELAY_POSTGRES_PASSWORD", PG_ADMIN_PASSWORD),
            ("OUTBOX_RELAY_NATS_PASSWORD", NATS_PASSWORD),
        ],
    );
    assert!(out.status.success(), "migrate over tls: {}", out.text());
    seen.push_str(&out.text());

    // The relay's role, from the documented SQL; then take one grant away and see
    // `check` name it with the statement that fixes it.
    s.create_relay_role("relay");
    s.write_config("relay", &s.ca.pem, &s.ca.pem);
    let sql = env.sql().await;
    sql.batch_execute("REVOKE SELECT ON public.outbox_events FROM relay")
        .await
        .unwrap();
    let out = env.cli_env(&["check"], &ENV_SECRETS);
    assert!(
        !out.status.success(),
        "check passed without SELECT: {}",
        out.text()
    );
    assert!(
        out.text()
            .contains("role relay has no SELECT on public.outbox_events")
            && out
                .text()
                .contains("GRANT SELECT ON \"public\".\"outbox_events\" TO \"relay\""),
        "{}",
        out.text()
    );
    seen.push_str(&out.text());
    sql.batch_execute("GRANT SELECT ON public.outbox_events TO relay")
        .await
        .unwrap();
    let out = env.cli_env(&["check"], &ENV_SECRETS);
    assert!(
        out.status.success(),
        "check under least privilege: {}",
        out.text()
    );
    seen.push_str(&out.text());

    // Stream over TLS + SCRAM (PostgreSQL) and TLS + client certificate + password (NATS).
    let mut relay = env.spawn_relay_env(&ENV_SECRETS);
    let js = s.js().await;
    let ids = insert_tx(&sql, 25, "secure").await;
    wait_count(&js, STREAM, 25).await;
    let got = crate::harness::read_all(&js, STREAM).await;
    assert_eq!(
        got.iter()
            .map(|m| m.msg_id().to_string())
            .collect::<Vec<_>>(),
        ids
    );
    let ssl_backends: i64 = sql
        .query_one(
            "SELECT count(*) FROM pg_stat_ssl JOIN pg_stat_activity USING (pid)
             WHERE usename = 'relay' AND ssl",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(ssl_backends >= 2, "sql and replication connections use tls");
    let plain: i64 = sql
        .query_one(
            "SELECT count(*) FROM pg_stat_ssl JOIN pg_stat_activity USING (pid)
             WHERE usename = 'relay' AND NOT ssl",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(plain, 0);
    relay.assert_running("while streaming over tls");

    // A subject the relay's NATS user may not publish to: said so, and retried.
    sql.batch_execute(
        "INSERT INTO outbox_events (event_topic, aggregate_type, payload)
         VALUES ('x', 'denied', '{}')",
    )
    .await
    .unwrap();
    wait_for("the permission error in the relay's status", DEADLINE, || async {
        env.cli_env(&["status", "--json"], &ENV_SECRETS)
            .stdout
            .contains("nats denied the relay: permissions violation for publish to \\\"outbox.denied.x\\\"")
    })
    .await;
    assert!(
        relay
            .log_text()
            .contains("Permissions Violation for Publish to \\\"outbox.denied.x\\\""),
        "{}",
        relay.log_text()
    );
    relay.assert_running("after a permission error (it retries)");

    for args in [&["status", "--json"][..], &["status"], &["check"]] {
        seen.push_str(&env.cli_env(args, &ENV_SECRETS).text());
    }
    let (_, metrics) = http_get(env.http_port, "/metrics").await.expect("/metrics");
    assert!(
        metrics.contains("outbox_relay_publish_errors_total{kind=\"permission_denied\"}"),
        "{metrics}"
    );
    seen.push_str(&metrics);
    if let Some((_, status)) = http_get(env.http_port, "/status").await {
        seen.push_str(&status);
    }
    relay.kill();
    seen.push_str(&relay.log_text());
    for secret in [
        PG_PASSWORD,
        PG_ADMIN_PASSWORD,
        NATS_PASSWORD,
        NATS_ADMIN_PASSWORD,
    ] {
        assert!(!seen.contains(secret), "secret {secret} printed:\n{seen}");
    }
    assert!(
        seen.contains("outbox.denied.x"),
        "the evidence was collected"
    );
}

/// A certificate that does not chain to the configured CA stops the relay at once,
/// with the certificate problem in the message, on either end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_ca_is_refused_naming_the_certificate() {
    let s = Secure::start().await;
    let env = &s.env;
    let other = Ca::new(env.dir.path(), "other-ca");
    let secrets = [
        ("OUTBOX_RELAY_POSTGRES_PASSWORD", PG_ADMIN_PASSWORD),
        ("OUTBOX_RELAY_NATS_PASSWORD", NATS_PASSWORD),
    ];

    s.write_config("postgres", &other.pem, &s.ca.pem);
    let out = env.cli_env(&["migrate"], &secrets);
    assert!(!out.status.success());
    assert!(
        out.stderr.contains("certificate") && out.stderr.to_lowercase().contains("unknownissuer"),
        "{}",
        out.text()
    );
    assert!(
        out.stderr.contains("postgres.sslrootcert"),
        "hint names the key: {}",
        out.text()
    );

    // `require` encrypts without authenticating the server (libpq's meaning): the
    // certificate is not checked against any CA.
    let text = std::fs::read_to_string(env.config_path()).unwrap().replace(
        &format!("sslmode=verify-full&sslrootcert={}", other.pem.display()),
        "sslmode=require",
    );
    env.write_raw_config(&text);
    let out = env.cli_env(&["migrate"], &secrets);
    assert!(out.status.success(), "sslmode=require: {}", out.text());

    s.write_config("postgres", &s.ca.pem, &s.ca.pem);
    assert!(env.cli_env(&["migrate"], &secrets).status.success());

    // `run` with the wrong NATS CA: fatal, not retried forever.
    s.write_config("postgres", &s.ca.pem, &other.pem);
    let mut relay = env.spawn_relay_env(&secrets);
    relay.wait_exit().await;
    let log = relay.log_text().to_lowercase();
    assert!(
        log.contains("tls") && log.contains("certificate") && log.contains("nats.tls_ca_file"),
        "{log}"
    );

    // The replication connection checks too: the right CA for SQL only would not do.
    // (Both connections are built from one setting, so a wrong CA fails both.)
    s.write_config("postgres", &other.pem, &s.ca.pem);
    let mut relay = env.spawn_relay_env(&secrets);
    relay.wait_exit().await;
    assert!(
        relay.log_text().to_lowercase().contains("unknownissuer"),
        "{}",
        relay.log_text()
    );
    for secret in [PG_ADMIN_PASSWORD, NATS_PASSWORD] {
        assert!(!relay.log_text().contains(secret));
    }
}

/// NKey authentication: the relay signs the server's nonce with its seed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nkey_authentication() {
    let user = nkeys::KeyPair::new_user();
    let nats = Nats::start_without_probe(&format!(
        "authorization {{ users = [ {{ nkey: {} }} ] }}",
        user.public_key()
    ));
    let env = Env::start_with(Postgres::start(), nats).await;
    let seed = env.dir.path().join("relay.nk");
    std::fs::write(&seed, user.seed().unwrap()).unwrap();
    let text = std::fs::read_to_string(env.config_path()).unwrap().replace(
        "ack_timeout = \"3s\"",
        &format!(
            "ack_timeout = \"3s\"\nnkey_seed_file = \"{}\"",
            seed.display()
        ),
    );
    env.write_raw_config(&text);
    let out = env.cli(&["migrate"]);
    assert!(out.status.success(), "{}", out.text());
    let _relay = env.spawn_relay();
    let client = async_nats::ConnectOptions::with_nkey(user.seed().unwrap())
        .connect(env.nats.url())
        .await
        .expect("nkey connect");
    let js = jetstream::new(client);
    insert_tx(&env.sql().await, 5, "nk").await;
    wait_count(&js, STREAM, 5).await;
}

/// A JWT as `nsc` would issue it: claims signed by `issuer` (ed25519 nkey).
fn jwt(issuer: &nkeys::KeyPair, subject: &str, nats: serde_json::Value) -> String {
    use base64::Engine;
    let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
    let header = b64(br#"{"typ":"JWT","alg":"ed25519-nkey"}"#);
    let claims = serde_json::json!({
        "jti": format!("test{}", subject),
        "iat": 1_700_000_000,
        "iss": issuer.public_key(),
        "name": "outbox-relay-test",
        "sub": subject,
        "nats": nats,
    });
    let payload = b64(claims.to_string().as_bytes());
    let signature = issuer
        .sign(format!("{header}.{payload}").as_bytes())
        .expect("sign jwt");
    format!("{header}.{payload}.{}", b64(&signature))
}

/// Operator (JWT) mode: the relay authenticates with a `.creds` file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn creds_file_in_operator_mode() {
    let operator = nkeys::KeyPair::new_operator();
    let account = nkeys::KeyPair::new_account();
    let user = nkeys::KeyPair::new_user();
    let operator_jwt = jwt(
        &operator,
        &operator.public_key(),
        serde_json::json!({"type": "operator", "version": 2}),
    );
    let account_jwt = jwt(
        &operator,
        &account.public_key(),
        serde_json::json!({"type": "account", "version": 2, "limits": {
            "subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1,
            "wildcards": true, "conn": -1, "leaf": -1,
            "mem_storage": -1, "disk_storage": -1, "streams": -1, "consumer": -1
        }}),
    );
    let user_jwt = jwt(
        &account,
        &user.public_key(),
        serde_json::json!({"type": "user", "version": 2, "pub": {}, "sub": {},
                           "subs": -1, "data": -1, "payload": -1}),
    );
    // JetStream needs a system account.
    let system = nkeys::KeyPair::new_account();
    let system_jwt = jwt(
        &operator,
        &system.public_key(),
        serde_json::json!({"type": "account", "version": 2}),
    );
    let nats = Nats::start_without_probe(&format!(
        "operator: \"{operator_jwt}\"\nsystem_account: {sys}\nresolver: MEMORY\n\
         resolver_preload: {{\n  {acc}: \"{account_jwt}\"\n  {sys}: \"{system_jwt}\"\n}}\n",
        acc = account.public_key(),
        sys = system.public_key(),
    ));
    let env = Env::start_with(Postgres::start(), nats).await;
    let creds = env.dir.path().join("relay.creds");
    std::fs::write(
        &creds,
        format!(
            "-----BEGIN NATS USER JWT-----\n{user_jwt}\n------END NATS USER JWT------\n\n\
             ************************* IMPORTANT *************************\n\
             NKEY Seed printed below can be used to sign and prove identity.\n\n\
             -----BEGIN USER NKEY SEED-----\n{}\n------END USER NKEY SEED------\n",
            user.seed().expect("seed")
        ),
    )
    .unwrap();
    let text = std::fs::read_to_string(env.config_path()).unwrap().replace(
        "ack_timeout = \"3s\"",
        &format!("ack_timeout = \"3s\"\ncreds_file = \"{}\"", creds.display()),
    );
    env.write_raw_config(&text);
    let out = env.cli(&["migrate"]);
    assert!(out.status.success(), "{}", out.text());
    let _relay = env.spawn_relay();
    let client = async_nats::ConnectOptions::with_credentials_file(creds.clone())
        .await
        .expect("read creds")
        .connect(env.nats.url())
        .await
        .expect("creds connect");
    let js = jetstream::new(client);
    insert_tx(&env.sql().await, 5, "jwt").await;
    wait_count(&js, STREAM, 5).await;
}
