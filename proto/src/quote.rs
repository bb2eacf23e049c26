//! Client input quoted in error messages, bounded: a name or value of any
//! length comes back as at most [`MAX_QUOTED`] characters, so an error can
//! never grow past what gRPC lets a status carry.

/// Characters of client input an error message quotes at most.
pub const MAX_QUOTED: usize = 120;

/// `s` as a Rust string literal (escapes shown), cut to [`MAX_QUOTED`]
/// characters with its full length said when it was longer.
pub fn quoted(s: &str) -> String {
    let mut chars = s.char_indices();
    match chars.nth(MAX_QUOTED) {
        None => format!("{s:?}"),
        Some((cut, _)) => format!("{:?}... ({} bytes)", &s[..cut], s.len()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_input_is_quoted_whole() {
        assert_eq!(quoted("a\"b"), r#""a\"b""#);
        assert_eq!(quoted(""), r#""""#);
    }

    #[test]
    fn long_input_is_cut_and_its_length_said() {
        let long = "é".repeat(100_000);
        let q = quoted(&long);
        assert!(q.len() < 4 * MAX_QUOTED, "{}", q.len());
        assert!(q.ends_with("... (200000 bytes)"), "{q}");
        assert_eq!(
            quoted(&"x".repeat(MAX_QUOTED)),
            format!("{:?}", "x".repeat(MAX_QUOTED))
        );
    }
}
