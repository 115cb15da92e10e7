//! Guards and error positions for YAML read from files an operator (or an
//! attacker who can write a ConfigMap) controls: intents and the daemon's
//! config file. The parser itself (libyaml via serde_norway) bounds alias
//! expansion and recursion; what it does not bound is checked here first.

pub mod locate;

/// serde_norway's message for `e` without its own "at line L column C"
/// (callers report the line up front, as `file:line:`).
pub fn error_message(e: &serde_norway::Error) -> String {
    let s = e.to_string();
    let mut out = String::with_capacity(s.len());
    let mut rest = s.as_str();
    // Drop every " at line N column M" (the line is reported up front).
    while let Some(i) = rest.find(" at line ") {
        out.push_str(&rest[..i]);
        let after = &rest[i + " at line ".len()..];
        let digits = |t: &str| t.bytes().take_while(u8::is_ascii_digit).count();
        let n = digits(after);
        let skip = match after[n..].strip_prefix(" column ") {
            Some(col) if n > 0 && digits(col) > 0 => {
                " at line ".len() + n + " column ".len() + digits(col)
            }
            _ => {
                out.push_str(" at line ");
                " at line ".len()
            }
        };
        rest = &rest[i + skip..];
    }
    out.push_str(rest);
    // Integers beyond 64 bits: say so plainly.
    if let (Some(a), Some(b)) = (out.find("invalid type: integer `"), out.find("` as ")) {
        if b > a && (out.ends_with("expected any YAML value")) {
            let n = &out[a + "invalid type: integer `".len()..b];
            out = format!("{}integer {n} is out of range", &out[..a]);
        }
    }
    escape_controls(&out)
}

/// `s` with control characters escaped (`\u{1b}`, `\n`): error messages echo
/// keys and values from the file, and must not carry terminal escapes or
/// line breaks of an attacker's choosing into a terminal or a log.
pub fn escape_controls(s: &str) -> String {
    if !s.chars().any(char::is_control) {
        return s.to_string();
    }
    s.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

/// Flow collections (`[`, `{`) nested deeper than this are rejected before
/// parsing: libyaml's scanner is quadratic in the nesting depth (100,000
/// levels take ~20 s); intents and the config file nest 4 levels deep.
pub const MAX_FLOW_DEPTH: usize = 64;

/// The line where flow nesting first exceeds [`MAX_FLOW_DEPTH`], if it does.
/// Brackets inside quotes and comments do not count; unbalanced closing
/// brackets are ignored (the parser reports those).
pub fn too_deep(text: &str) -> Option<usize> {
    let (mut depth, mut line) = (0usize, 1usize);
    let (mut single, mut double, mut comment, mut escaped) = (false, false, false, false);
    let mut prev = b'\n';
    for &b in text.as_bytes() {
        if b == b'\n' {
            line += 1;
            comment = false;
        } else if comment {
        } else if double {
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                double = false;
            }
        } else if single {
            if b == b'\'' {
                single = false;
            }
        } else {
            match b {
                b'#' if prev.is_ascii_whitespace() => comment = true,
                b'"' => double = true,
                b'\'' if depth > 0 || prev.is_ascii_whitespace() || prev == b':' => single = true,
                b'[' | b'{' => {
                    depth += 1;
                    if depth > MAX_FLOW_DEPTH {
                        return Some(line);
                    }
                }
                b']' | b'}' => depth = depth.saturating_sub(1),
                _ => {}
            }
        }
        prev = b;
    }
    None
}

/// Lines of `text` as the YAML parser counts them: it breaks lines at `\n`,
/// `\r\n`, a lone `\r`, NEL and the unicode line and paragraph separators.
pub fn line_count(text: &str) -> usize {
    let mut n = 1;
    let mut prev_cr = false;
    for c in text.chars() {
        match c {
            '\n' if prev_cr => {}
            '\n' | '\r' | '\u{85}' | '\u{2028}' | '\u{2029}' => n += 1,
            _ => {}
        }
        prev_cr = c == '\r';
    }
    n
}

/// An error line from the parser, kept inside the text: at the end of the
/// input libyaml reports the line after the last one.
pub fn clamp_line(text: &str, line: usize) -> usize {
    line.clamp(1, line_count(text))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_error_at_the_end_stays_on_the_last_line() {
        // Found by tests/hostile_input: "[" followed by two BOMs made the
        // parser report line 2 of a one-line text.
        let text = "[\u{feff}\u{feff}";
        let e = serde_norway::from_str::<serde_norway::Value>(text).unwrap_err();
        assert_eq!(e.location().map(|l| l.line()), Some(2));
        assert_eq!(clamp_line(text, 2), 1);
        assert_eq!(line_count("a\r\nb\rc\u{2028}d\n"), 5);
    }

    #[test]
    fn messages_carry_no_control_characters() {
        // Found by tests/hostile_input: a key with a NUL (or an ESC) was
        // echoed raw in `unknown variant` and field-path messages.
        let e = serde_norway::from_str::<std::collections::BTreeMap<String, u8>>(
            "\"k\\e[31m\\0\": x\n",
        )
        .unwrap_err();
        let m = error_message(&e);
        assert!(!m.chars().any(char::is_control), "{m:?}");
        assert!(m.starts_with("k\\u{1b}[31m\\u{0}: invalid type"), "{m}");
    }
}
