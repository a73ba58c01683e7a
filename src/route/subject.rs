//! NATS subject rules. A subject is dot-separated tokens; a token may not be empty or
//! contain whitespace, `*` or `>` (wildcards are for subscribers, not publishers). A
//! leading `$` would reach system subjects (`$JS.API...`, `$SYS...`), so it is refused.

/// Longest subject accepted. NATS has no hard limit, but very long subjects cost every
/// subscriber's matching; 255 is what most clients and operators assume.
pub const MAX_SUBJECT_LEN: usize = 255;

pub fn validate_subject(s: &str) -> Result<(), String> {
    if s.is_empty() {
        return Err("subject is empty".into());
    }
    if s.len() > MAX_SUBJECT_LEN {
        return Err(format!("subject is longer than {MAX_SUBJECT_LEN} bytes"));
    }
    if s.starts_with('$') {
        return Err("subject starts with $ (reserved for system subjects)".into());
    }
    if plainly_valid(s) {
        return Ok(());
    }
    for token in s.split('.') {
        if token.is_empty() {
            return Err("subject has an empty token".into());
        }
        if token == "*" || token == ">" || token.contains(['*', '>']) {
            return Err("subject contains a wildcard (* or >)".into());
        }
        if token.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err("subject contains whitespace or a control character".into());
        }
    }
    Ok(())
}

/// One pass over the bytes that accepts what most subjects are (printable ASCII tokens
/// between dots); anything else (a space, a control or non-ASCII character, an empty
/// token, a wildcard) is left to the full check in [`validate_subject`], which says what
/// is wrong. Runs for every message.
fn plainly_valid(s: &str) -> bool {
    let mut empty_token = true;
    for &b in s.as_bytes() {
        match b {
            b'.' if empty_token => return false,
            b'.' => empty_token = true,
            b'*' | b'>' => return false,
            0x21..=0x7e => empty_token = false,
            _ => return false,
        }
    }
    !empty_token
}

/// Characters a field value cannot keep inside a subject token.
fn unsafe_in_token(c: char) -> bool {
    c == '*' || c == '>' || c.is_whitespace() || c.is_control()
}

/// Make a field value safe inside one subject token: wildcards, whitespace and control
/// characters become `_`. Dots are kept, so `order.created` adds a level, as users expect.
pub fn sanitize_token(value: &str) -> String {
    value
        .chars()
        .map(|c| if unsafe_in_token(c) { '_' } else { c })
        .collect()
}

/// `value` is exactly one subject token as written: no `.`, nothing to sanitise.
pub fn is_single_token(value: &str) -> bool {
    !value.chars().any(|c| c == '.' || unsafe_in_token(c))
}

#[cfg(test)]
mod tests {
    use super::*;

    proptest::proptest! {
        /// The fast path never accepts what the full check refuses.
        #[test]
        fn the_fast_path_accepts_only_valid_subjects(s in "[ -~\\t\u{a0}é]{0,12}") {
            if plainly_valid(&s) {
                let mut full = s.split('.').map(|t| {
                    !t.is_empty()
                        && !t.contains(['*', '>'])
                        && !t.chars().any(|c| c.is_whitespace() || c.is_control())
                });
                proptest::prop_assert!(full.all(|ok| ok), "{s:?}");
            }
        }
    }

    #[test]
    fn the_fast_path_takes_ordinary_subjects() {
        for s in ["outbox.order.created", "a", "orders.eu-1.X_y:z"] {
            assert!(plainly_valid(s), "{s}");
        }
        for s in ["", ".a", "a.", "a..b", "a.*", "a.>", "a b", "a\tb", "é.a"] {
            assert!(!plainly_valid(s), "{s}");
        }
    }
}
