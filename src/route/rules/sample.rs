//! The sampling point of an event for one target: a fixed hash, so a replay samples alike.

/// Where in `0.0..1.0` an event falls for the sampling of target `target` of route
/// `route`: `sampling_rate` r keeps the event when the point is below r. A fixed hash
/// (FNV-1a 64 of the id, route name and target index, then the murmur3 finaliser), never
/// seeded: the same event gets the same point in every process, so a replay routes
/// identically. Changing this function changes which events past replays selected.
pub fn sample_point(event_id: &[u8], route: &str, target: usize) -> f64 {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    fn fnv(mut h: u64, bytes: &[u8]) -> u64 {
        for b in bytes {
            h ^= u64::from(*b);
            h = h.wrapping_mul(PRIME);
        }
        h
    }
    let mut h = fnv(OFFSET, event_id);
    h = fnv(h, &[0xff]);
    h = fnv(h, route.as_bytes());
    h = fnv(h, &[0xff]);
    h = fnv(h, &(target as u64).to_le_bytes());
    // fmix64: spreads FNV's weak high bits so near-identical ids land far apart.
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^= h >> 33;
    (h >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::sample_point;
    use crate::route::rules::testkit::{PAYLOAD, b, event, one_target, rules};

    #[test]
    fn sample_point_is_fixed() {
        // Pinned (and checked against an independent Python FNV-1a + fmix64): a change
        // would sample every replayed event differently.
        let p = sample_point(b"0b0c9d2e-0000-4000-8000-000000000001", "r", 0);
        assert_eq!(
            p,
            sample_point(b"0b0c9d2e-0000-4000-8000-000000000001", "r", 0)
        );
        assert!((0.0..1.0).contains(&p));
        assert_ne!(
            p,
            sample_point(b"0b0c9d2e-0000-4000-8000-000000000001", "r", 1)
        );
        assert_ne!(
            p,
            sample_point(b"0b0c9d2e-0000-4000-8000-000000000001", "q", 0)
        );
        assert_eq!(
            format!("{:.12}", sample_point(b"evt-1", "analytics", 0)),
            PINNED_POINT
        );
    }

    const PINNED_POINT: &str = "0.439537833255";

    #[test]
    fn sampling_rate_is_roughly_kept_and_deterministic() {
        let text = r#"
[[route]]
name = "analytics"
[[route.targets]]
subject = "analytics.events"
sampling_rate = 0.3
[[route.targets]]
subject = "never"
sampling_rate = 0.0
[[route.targets]]
subject = "always"
sampling_rate = 1.0
"#;
        let (r1, r2) = (rules(text), rules(text));
        let mut kept = 0;
        let mut ev = event(PAYLOAD);
        for i in 0..10_000 {
            ev.id = b(&format!("evt-{i}"));
            let out = r1.evaluate(&ev);
            assert_eq!(out, r2.evaluate(&ev), "replay differs for evt-{i}");
            let subjects: Vec<_> = out.iter().map(|t| t.subject.clone().unwrap()).collect();
            assert!(!subjects.contains(&"never".to_string()));
            assert!(subjects.contains(&"always".to_string()));
            if subjects.contains(&"analytics.events".to_string()) {
                kept += 1;
            }
        }
        assert!((2500..=3500).contains(&kept), "kept {kept} of 10000 at 0.3");
    }

    #[test]
    fn sampling_independent_of_conditions_and_uses_uuid_ids() {
        // UUID-like ids that differ in one position still spread.
        let r = one_target("sampling_rate = 0.5");
        let mut ev = event(PAYLOAD);
        let mut kept = 0;
        for i in 0..2000 {
            ev.id = b(&format!("0b0c9d2e-0000-4000-8000-{i:012}"));
            kept += r.evaluate(&ev).len();
        }
        assert!((800..=1200).contains(&kept), "kept {kept} of 2000 at 0.5");
    }
}
