//! Per-event decisions: where each copy of an event is stored, or why it goes to the
//! dead letters. Everything here is decided from the event, the routing and the
//! streams before anything of the event is published, so a replay decides the same
//! way, the read-back knows which stream each message went to, and an
//! `all_or_nothing` fan-out can be refused as a whole.
//!
//! Order of the decisions for one event ([`Placement::place`]): route (the
//! [`Router`]); a refused row (unmappable, an invalid logical message) dead-letters
//! every copy; a copy over the server's `max_payload` is dead-lettered; each copy's
//! stream, or a dead letter when no stream captures its subject or its stream cannot
//! hold a delayed copy's schedule definition; `best_effort` fallbacks replace
//! unpublishable copies; `all_or_nothing` dead-letters every copy when one fails.
//! What the server refuses *after* publishing is the sink's (`Sink::settle_refused`).

use std::time::Duration;

use async_nats::jetstream;

use crate::config::RoutingConfig;
use crate::decode::OutboxEvent;
use crate::error::{Error, Result};
use crate::route::{Envelope, FallbackRole, Router};
use crate::sink::schedule;
use crate::sink::streams::StreamIndex;

/// The reason `env` cannot be published when it is larger than `max_payload`: payload
/// plus a generous allowance for headers, NATS counts both (a row can make the headers
/// the large part: a metadata value or a column of several MB).
fn too_large(env: &Envelope, max_payload: usize) -> Option<String> {
    let headers: usize = env
        .headers
        .iter()
        .map(|(k, vs)| {
            vs.iter()
                .map(|v| AsRef::<str>::as_ref(k).len() + v.as_str().len() + 4)
                .sum::<usize>()
        })
        .sum::<usize>()
        + 16;
    (env.payload.len() + headers > max_payload).then(|| {
        format!(
            "message of {} bytes (payload {}, headers {headers}) exceeds the server's max_payload of {max_payload} bytes",
            env.payload.len() + headers,
            env.payload.len(),
        )
    })
}

/// The reason an `all_or_nothing` fan-out must go to the dead-letter subject as a
/// whole: the first of its copies that would be dead-lettered.
fn all_or_nothing_failure(envs: &[Envelope]) -> Option<String> {
    envs.iter()
        .filter(|e| e.all_or_nothing)
        .find_map(|e| e.dead_letter.clone())
        .filter(|_| {
            envs.iter()
                .any(|e| e.all_or_nothing && e.dead_letter.is_none())
        })
}

/// What the decisions for one event need: the routing, the streams, the server.
pub struct Placement<'a> {
    pub routing: &'a RoutingConfig,
    pub router: &'a Router,
    pub index: &'a mut StreamIndex,
    pub js: &'a jetstream::Context,
    /// This source's `Outbox-Origin` (names schedule definitions).
    pub origin: &'a str,
    /// The server's `max_payload`.
    pub max_payload: usize,
}

impl Placement<'_> {
    /// The copies of `event` to publish, in position order, each with its stream and,
    /// when it cannot be published as routed, its dead-letter reason. `index` is the
    /// event's position in its transaction (advanced by one per copy); `refused`
    /// dead-letters every copy with that reason.
    pub async fn place(
        &mut self,
        event: &OutboxEvent,
        commit_lsn: u64,
        index: &mut u32,
        committed_at_us: i64,
        refused: Option<String>,
    ) -> Result<Vec<Envelope>> {
        let mut envs = self.router.route(event, commit_lsn, index);
        for env in envs.iter_mut() {
            env.committed_at_us = committed_at_us;
            if let Some(reason) = &refused {
                env.dead_letter = Some(reason.clone());
            }
            if env.dead_letter.is_none() {
                env.dead_letter = too_large(env, self.max_payload);
            }
            env.stream = self.destination(env).await?;
        }
        let mut envs = self.take_fallbacks(event, envs).await?;
        if let Some(reason) = all_or_nothing_failure(&envs) {
            for env in envs.iter_mut().filter(|e| e.dead_letter.is_none()) {
                env.dead_letter = Some(format!(
                    "all_or_nothing: another target of the event failed: {reason}"
                ));
                env.stream = self.destination(env).await?;
            }
        }
        Ok(envs)
    }

    /// The stream `env` will be stored in. A subject no stream captures is turned into a
    /// dead letter here, before publishing, so a replay decides the same way and the
    /// stream's order is the position order; so is a delayed copy whose stream cannot
    /// hold its schedule definition. A dead-letter subject without a stream is
    /// transient: the event waits (nothing is dropped) until an operator adds one.
    async fn destination(&mut self, env: &mut Envelope) -> Result<String> {
        if env.dead_letter.is_none() {
            match self
                .index
                .resolve(self.js, &env.subject, Duration::from_secs(5))
                .await?
            {
                Some(s) if env.delay_seconds == 0 => return Ok(s),
                Some(s) => match self.schedule_subject(env, &s) {
                    Ok(definition) => {
                        env.schedule = Some(definition);
                        return Ok(s);
                    }
                    Err(reason) => env.dead_letter = Some(reason),
                },
                None => {
                    env.dead_letter = Some(format!("no stream captures subject {}", env.subject))
                }
            }
        }
        env.schedule = None;
        let dlq = format!("{}.{}", self.routing.dead_letter_prefix, env.subject);
        let found = self
            .index
            .resolve(self.js, &dlq, Duration::from_secs(1))
            .await?;
        found.ok_or_else(|| {
            Error::transient(format!("dead-letter subject {dlq} is not captured by any stream")).hint(format!(
                "create a stream for \"{}.>\" (or add it to [[streams]]); the event is retried until it can be stored",
                self.routing.dead_letter_prefix
            ))
        })
    }

    /// The schedule definition subject of delayed `env` in `stream`, or why that stream
    /// cannot hold it (a dead-letter reason).
    fn schedule_subject(
        &self,
        env: &Envelope,
        stream: &str,
    ) -> std::result::Result<String, String> {
        let prefix = &self.routing.schedule_prefix;
        if self.index.holds_schedules(stream, prefix) {
            return match self.index.schedule_limit(stream, env.delay_seconds) {
                Some(limit) => Err(format!("delay_seconds: {limit}")),
                None => Ok(schedule::definition_subject(
                    prefix,
                    stream,
                    self.origin,
                    env.pos,
                )),
            };
        }
        Err(format!(
            "delay_seconds: stream {stream} (subject {}) cannot hold schedule definitions: it needs \
             allow_msg_schedules and the subjects {}; declare it in [[streams]] and the relay sets both",
            env.subject,
            schedule::stream_filter(prefix, stream)
        ))
    }

    /// Under `best_effort`, a copy found unpublishable here (no stream captures its
    /// subject, over `max_payload`) is replaced by its route's fallback, as a copy whose
    /// subject could not be rendered already was by the router; copies that fall back
    /// share one fallback copy, and a fallback that cannot be published either leaves
    /// the copy to be dead-lettered. Decided from the event and the streams alone, so a
    /// replay decides the same.
    async fn take_fallbacks(
        &mut self,
        event: &OutboxEvent,
        envs: Vec<Envelope>,
    ) -> Result<Vec<Envelope>> {
        // The common case, nothing refused that could fall back: no new vector.
        let refused = |e: &Envelope| {
            matches!(e.fallback, FallbackRole::Available(_)) && e.dead_letter.is_some()
        };
        if !envs.iter().any(refused) {
            return Ok(envs);
        }
        let fan_out = envs.len() > 1;
        let mut taken = envs
            .iter()
            .any(|e| e.fallback == FallbackRole::Copy && e.dead_letter.is_none());
        let mut out = Vec::with_capacity(envs.len());
        for env in envs {
            let FallbackRole::Available(route) = env.fallback else {
                out.push(env);
                continue;
            };
            let fb = match env.dead_letter {
                Some(_) => self.router.fallback_for(event, route, env.pos, fan_out),
                None => None,
            };
            let Some(mut fb) = fb else {
                out.push(env);
                continue;
            };
            if taken {
                // One fallback copy per event; this copy's position stays unused.
                continue;
            }
            fb.committed_at_us = env.committed_at_us;
            fb.dead_letter = too_large(&fb, self.max_payload);
            fb.stream = self.destination(&mut fb).await?;
            if fb.dead_letter.is_some() {
                out.push(env);
                continue;
            }
            tracing::debug!(subject = %env.subject, fallback = %fb.subject, reason = env.dead_letter.as_deref().unwrap_or(""), "target unpublishable: its route's fallback takes it");
            taken = true;
            out.push(fb);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_or_nothing_fails_as_a_whole_only_when_one_copy_fails() {
        let env = |aon: bool, dead: Option<&str>| Envelope {
            pos: Default::default(),
            subject: "s".into(),
            headers: Default::default(),
            payload: Default::default(),
            dead_letter: dead.map(str::to_string),
            all_or_nothing: aon,
            ..Envelope::default()
        };
        assert_eq!(
            all_or_nothing_failure(&[env(true, None), env(true, Some("no stream"))]),
            Some("no stream".to_string())
        );
        assert_eq!(
            all_or_nothing_failure(&[env(true, None), env(true, None)]),
            None
        );
        assert_eq!(
            all_or_nothing_failure(&[env(false, None), env(false, Some("x"))]),
            None,
            "best effort: only the failing copy is dead-lettered"
        );
    }
}
