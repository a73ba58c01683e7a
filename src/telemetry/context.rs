//! W3C Trace Context: parsing a carried `traceparent`, the relay's own span id, and the
//! sampling decision. Pure: no I/O, no clock, no randomness.

/// A parsed `traceparent` (<https://www.w3.org/TR/trace-context/#traceparent-header>).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceParent {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    pub flags: u8,
}

/// The `sampled` bit of `trace-flags`.
pub const SAMPLED: u8 = 0x01;

impl TraceParent {
    /// Parse a `traceparent` value as the W3C recommendation says a receiver must:
    /// version `00` is exactly `00-<32 hex>-<16 hex>-<2 hex>`; a higher version (not
    /// `ff`) may append fields after a `-`, which are ignored; hex is lowercase; an
    /// all-zero trace id or parent id is invalid. `None` for anything else (the header
    /// is then passed on untouched and no span is made).
    pub fn parse(value: &str) -> Option<TraceParent> {
        let b = value.as_bytes();
        if b.len() < 55 {
            return None;
        }
        let version = hex_byte(&b[0..2])?;
        if version == 0xff {
            return None;
        }
        if version == 0 && b.len() != 55 {
            return None;
        }
        if b.len() > 55 && b[55] != b'-' {
            return None;
        }
        if b[2] != b'-' || b[35] != b'-' || b[52] != b'-' {
            return None;
        }
        let mut trace_id = [0u8; 16];
        for (i, out) in trace_id.iter_mut().enumerate() {
            *out = hex_byte(&b[3 + 2 * i..5 + 2 * i])?;
        }
        let mut span_id = [0u8; 8];
        for (i, out) in span_id.iter_mut().enumerate() {
            *out = hex_byte(&b[36 + 2 * i..38 + 2 * i])?;
        }
        let flags = hex_byte(&b[53..55])?;
        if trace_id == [0; 16] || span_id == [0; 8] {
            return None;
        }
        Some(TraceParent {
            trace_id,
            span_id,
            flags,
        })
    }

    pub fn sampled(&self) -> bool {
        self.flags & SAMPLED != 0
    }

    /// The trace id as 32 lowercase hex digits (as log fields carry it).
    pub fn trace_id_hex(&self) -> String {
        let mut s = String::with_capacity(32);
        push_hex(&mut s, &self.trace_id);
        s
    }

    /// The span id as 16 lowercase hex digits.
    pub fn span_id_hex(&self) -> String {
        let mut s = String::with_capacity(16);
        push_hex(&mut s, &self.span_id);
        s
    }

    /// The header value, always version `00` (the version this relay speaks).
    pub fn format(&self) -> String {
        let mut s = String::with_capacity(55);
        s.push_str("00-");
        push_hex(&mut s, &self.trace_id);
        s.push('-');
        push_hex(&mut s, &self.span_id);
        s.push('-');
        push_hex(&mut s, &[self.flags]);
        s
    }
}

/// Two lowercase hex digits (uppercase is invalid in `traceparent`).
fn hex_byte(two: &[u8]) -> Option<u8> {
    let digit = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    };
    Some(digit(two[0])? << 4 | digit(two[1])?)
}

pub fn push_hex(s: &mut String, bytes: &[u8]) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for b in bytes {
        s.push(HEX[(b >> 4) as usize] as char);
        s.push(HEX[(b & 0xf) as usize] as char);
    }
}

/// The relay's span id for the message `msg_id` published on `subject` in trace
/// `trace_id`.
///
/// Deterministic on purpose. Routing is deterministic (design.md, guarantee 6), so a
/// replay after a crash publishes byte-identical messages, and JetStream's
/// `Nats-Msg-Id` deduplication and the checkpoint's read-back both rely on "the same
/// row gives the same message". A random span id would make the replayed message's
/// `traceparent` header differ from the stored one's, and a consumer that saw both (a
/// duplicate window shorter than the outage, `replay --fill`) would see two parents for
/// one event. Derived from the message id (the event id, or `<id>:<subject>` for a
/// fan-out copy), the subject and the trace id, every copy gets its own id, and the
/// same copy always the same one. The cost: a replayed span is exported again with the
/// same ids, which collectors show as one span twice (rare: replays only follow faults).
///
/// The hash is FNV-1a (64-bit) over the three parts with separators, finished with the
/// SplitMix64 mixer so that ids of similar inputs spread over all bits; never zero
/// (an all-zero span id is invalid).
pub fn span_id(trace_id: &[u8; 16], msg_id: &str, subject: &str) -> [u8; 8] {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut h = OFFSET;
    let mut eat = |bytes: &[u8]| {
        for &b in bytes {
            h ^= u64::from(b);
            h = h.wrapping_mul(PRIME);
        }
    };
    eat(trace_id);
    eat(&[0xff]);
    eat(msg_id.as_bytes());
    eat(&[0xff]);
    eat(subject.as_bytes());
    let mut z = h.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^= z >> 31;
    if z == 0 { 1 } else { z }.to_be_bytes()
}

/// Is a span under `parent` recorded and exported? Parent-based: a parent that is not
/// sampled is never recorded (its trace is being dropped upstream); a sampled one is,
/// if its trace id falls under `ratio`. The trace-id test is OpenTelemetry's
/// `TraceIdRatioBased` (the low 8 bytes, shifted right once, below `ratio * 2^63`), so
/// every service using the same ratio keeps the same traces, and a replay decides as
/// the first publish did.
pub fn sampled(parent: &TraceParent, ratio: f64) -> bool {
    parent.sampled() && ratio_keeps(&parent.trace_id, ratio)
}

/// `TraceIdRatioBased` on `trace_id`.
pub fn ratio_keeps(trace_id: &[u8; 16], ratio: f64) -> bool {
    if ratio >= 1.0 {
        return true;
    }
    if ratio.is_nan() || ratio <= 0.0 {
        return false;
    }
    let bound = (ratio * (1u64 << 63) as f64) as u64;
    let mut low = [0u8; 8];
    low.copy_from_slice(&trace_id[8..]);
    (u64::from_be_bytes(low) >> 1) < bound
}

#[cfg(test)]
mod tests {
    use super::*;

    const TP: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn parses_the_spec_example_and_formats_it_back() {
        let tp = TraceParent::parse(TP).unwrap();
        assert_eq!(
            tp.trace_id,
            [
                0x4b, 0xf9, 0x2f, 0x35, 0x77, 0xb3, 0x4d, 0xa6, 0xa3, 0xce, 0x92, 0x9d, 0x0e, 0x0e,
                0x47, 0x36
            ]
        );
        assert_eq!(tp.span_id, [0x00, 0xf0, 0x67, 0xaa, 0x0b, 0xa9, 0x02, 0xb7]);
        assert!(tp.sampled());
        assert_eq!(tp.format(), TP);
        assert_eq!(tp.trace_id_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(tp.span_id_hex(), "00f067aa0ba902b7");
        let unsampled =
            TraceParent::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00").unwrap();
        assert!(!unsampled.sampled());
    }

    #[test]
    fn refuses_malformed_values() {
        for bad in [
            "",
            "00-1",
            "00-abc-def-01",
            // All-zero trace id / parent id.
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            // Version ff is forbidden.
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            // Uppercase hex.
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            // Version 00 allows nothing after the flags.
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            // Wrong separators, non-hex, short fields.
            "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b-701",
            "0x-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            // A higher version's extra fields must follow a dash.
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01x",
            " 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ] {
            assert_eq!(TraceParent::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn accepts_a_future_version_and_speaks_00() {
        for v in [
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-what-the-future-holds",
        ] {
            let tp = TraceParent::parse(v).unwrap();
            assert_eq!(tp.format(), TP, "{v}");
        }
    }

    #[test]
    fn span_id_is_deterministic_and_distinct() {
        let t = TraceParent::parse(TP).unwrap().trace_id;
        let a = span_id(
            &t,
            "0b0c9d2e-0000-4000-8000-000000000001",
            "outbox.order.created",
        );
        assert_eq!(
            a,
            span_id(
                &t,
                "0b0c9d2e-0000-4000-8000-000000000001",
                "outbox.order.created"
            )
        );
        let mut seen = std::collections::HashSet::new();
        for i in 0..10_000 {
            let id = format!("0b0c9d2e-0000-4000-8000-{i:012}");
            assert!(seen.insert(span_id(&t, &id, "outbox.order.created")));
            assert!(seen.insert(span_id(&t, &id, "outbox.order.shipped")));
        }
        let mut other = t;
        other[0] ^= 1;
        assert_ne!(
            a,
            span_id(
                &other,
                "0b0c9d2e-0000-4000-8000-000000000001",
                "outbox.order.created"
            )
        );
        assert!(seen.iter().all(|s| *s != [0; 8]));
    }

    /// Pinned: a change of the function would change the `traceparent` of a message
    /// replayed after an upgrade against the copy stored before it.
    #[test]
    fn span_id_value_is_stable() {
        let t = TraceParent::parse(TP).unwrap().trace_id;
        let mut s = String::new();
        push_hex(&mut s, &span_id(&t, "id-1", "a.b"));
        assert_eq!(s, STABLE_SPAN_ID);
    }

    /// The span id of `("id-1", "a.b")` in the spec example's trace, computed once.
    const STABLE_SPAN_ID: &str = "982f9a405873ce83";

    #[test]
    fn sampling_is_parent_based_then_by_trace_id() {
        let mut tp = TraceParent::parse(TP).unwrap();
        assert!(sampled(&tp, 1.0));
        assert!(!sampled(&tp, 0.0));
        tp.flags = 0;
        assert!(!sampled(&tp, 1.0), "an unsampled parent is never recorded");
        // The ratio keeps about that share of traces, the same ones every time.
        let kept = (0u64..20_000)
            .filter(|i| {
                let mut id = [0u8; 16];
                id[8..].copy_from_slice(&i.wrapping_mul(0x9e37_79b9_7f4a_7c15).to_be_bytes());
                ratio_keeps(&id, 0.25)
            })
            .count();
        assert!((4_500..5_500).contains(&kept), "{kept}");
        let mut low = [0u8; 16];
        low[15] = 1;
        assert!(ratio_keeps(&low, 0.01));
        assert!(!ratio_keeps(&[0xff; 16], 0.99));
        assert!(!ratio_keeps(&low, f64::NAN));
    }
}
