//! Target streams: create or update the `[[streams]]` of the config, and find which
//! subjects no stream captures.

use async_nats::jetstream::{self, stream};

use crate::config::{Config, StreamConfig};
use crate::error::{Error, Result};

/// Create or update every declared stream. Existing streams not declared are used as
/// they are.
pub async fn ensure(js: &jetstream::Context, cfg: &Config) -> Result<()> {
    for s in &cfg.streams {
        let want = stream_config(s);
        match js.get_stream(&s.name).await {
            Ok(mut existing) => {
                let info = existing
                    .info()
                    .await
                    .map_err(|e| Error::transient(format!("stream {}: {e}", s.name)))?;
                let have = &info.config;
                let differs = have.subjects != want.subjects
                    || have.num_replicas != want.num_replicas
                    || have.duplicate_window != want.duplicate_window;
                if have.storage != want.storage {
                    return Err(Error::fatal(format!(
                        "stream {}: storage is {:?} on the server but {} in [[streams]]",
                        s.name, have.storage, s.storage
                    ))
                    .hint("JetStream cannot change a stream's storage; fix [[streams]] storage or recreate the stream"));
                }
                if differs {
                    let mut merged = have.clone();
                    merged.subjects = want.subjects.clone();
                    merged.num_replicas = want.num_replicas;
                    merged.duplicate_window = want.duplicate_window;
                    js.update_stream(merged).await.map_err(|e| {
                        Error::fatal(format!("update stream {}: {e}", s.name))
                            .hint("check that no other stream captures the same subjects")
                    })?;
                    tracing::info!(stream = %s.name, "stream updated from [[streams]]");
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    jetstream::context::GetStreamErrorKind::JetStream(_)
                ) =>
            {
                js.create_stream(want).await.map_err(|e| {
                    Error::fatal(format!("create stream {}: {e}", s.name))
                        .hint("check that no other stream captures the same subjects and JetStream has room")
                })?;
                tracing::info!(stream = %s.name, "stream created from [[streams]]");
            }
            Err(e) => {
                return Err(Error::transient(format!("look up stream {}: {e}", s.name))
                    .hint("check that nats-server runs with JetStream enabled (-js)"));
            }
        }
    }
    Ok(())
}

fn stream_config(s: &StreamConfig) -> stream::Config {
    stream::Config {
        name: s.name.clone(),
        subjects: s.subjects.clone(),
        storage: if s.storage == "memory" {
            stream::StorageType::Memory
        } else {
            stream::StorageType::File
        },
        num_replicas: s.replicas,
        duplicate_window: s.duplicate_window,
        ..Default::default()
    }
}

/// A concrete subject standing for everything a template can produce.
pub fn probe_subject(template: &str) -> String {
    let mut out = String::new();
    let mut in_field = false;
    for c in template.chars() {
        match c {
            '{' => in_field = true,
            '}' => {
                in_field = false;
                out.push_str("probe");
            }
            c if !in_field => out.push(c),
            _ => {}
        }
    }
    out
}

/// Which stream captures `subject`, if any.
pub async fn stream_for(js: &jetstream::Context, subject: &str) -> Result<Option<String>> {
    match js.stream_by_subject(subject).await {
        Ok(name) => Ok(Some(name)),
        Err(e) => {
            let text = e.to_string();
            if text.contains("not found") || text.contains("no stream") {
                Ok(None)
            } else {
                Err(Error::transient(format!(
                    "look up stream for {subject}: {e}"
                )))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn probe_replaces_fields() {
        assert_eq!(
            super::probe_subject("outbox.{aggregate_type}.{event_topic}"),
            "outbox.probe.probe"
        );
    }
}
