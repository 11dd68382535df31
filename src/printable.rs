//! Text from outside made safe to print: step output, container logs, file names, engine and git
//! messages. A terminal obeys control characters (OSC 52 writes the viewer's clipboard, CSI
//! clears the screen, a carriage return or a newline forges a line), so wherever such text is
//! printed or kept, its control characters are shown escaped instead: `\x1b`, `\r`, `\u{202e}`.
//! Newline and tab stay in multi-line text (a log); a value that is one field of a line (a file
//! name, a message) escapes its newlines too.
//!
//! Pure functions; the JSON forms need none of this, as JSON escapes for itself.

use std::borrow::Cow;
use std::fmt::Write as _;

/// Whether `c` is shown escaped: controls (C0, DEL, C1) and the bidirectional overrides and
/// isolates that reorder what a reader sees.
fn dangerous(c: char, keep_newlines: bool) -> bool {
    match c {
        '\t' => false,
        '\n' => !keep_newlines,
        '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}' => true,
        c => c.is_control(),
    }
}

fn escape(text: &str, keep_newlines: bool) -> Cow<'_, str> {
    if !text.chars().any(|c| dangerous(c, keep_newlines)) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        match c {
            c if !dangerous(c, keep_newlines) => out.push(c),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            c if (c as u32) < 0x80 => write!(out, "\\x{:02x}", c as u32).expect("to a string"),
            c => write!(out, "\\u{{{:x}}}", c as u32).expect("to a string"),
        }
    }
    Cow::Owned(out)
}

/// `text` of many lines (a log) with every control character but newline and tab escaped.
pub fn text(text: &str) -> Cow<'_, str> {
    escape(text, true)
}

/// `text` that is one field of a line (a file name, a message) with every control character
/// but tab escaped, newlines too: it can never start a line of its own.
pub fn field(text: &str) -> Cow<'_, str> {
    escape(text, false)
}

/// One formatted line of berth's text log: controls escaped but its final newline and, when
/// `colours`, the colour sequences (`ESC[…m`) the formatter itself wrote. A colour sequence in a
/// logged value is allowed through too, but it can only colour, never move the cursor, clear or
/// write the clipboard.
pub fn log_line(line: &str, colours: bool) -> Cow<'_, str> {
    let body = line.strip_suffix('\n').unwrap_or(line);
    let ended = body.len() != line.len();
    if !body.chars().any(|c| dangerous(c, false)) {
        return Cow::Borrowed(line);
    }
    let mut out = String::with_capacity(line.len() + 8);
    let mut rest = body;
    while let Some(at) = rest.find('\u{1b}') {
        out.push_str(&field(&rest[..at]));
        let after = &rest[at + 1..];
        let sgr = after
            .strip_prefix('[')
            .and_then(|s| s.find('m').map(|end| &s[..end]))
            .filter(|params| params.bytes().all(|b| b.is_ascii_digit() || b == b';'));
        match (colours, sgr) {
            (true, Some(params)) => {
                out.push('\u{1b}');
                out.push('[');
                out.push_str(params);
                out.push('m');
                rest = &after[1 + params.len() + 1..];
            }
            _ => {
                out.push_str("\\x1b");
                rest = after;
            }
        }
    }
    out.push_str(&field(rest));
    if ended {
        out.push('\n');
    }
    Cow::Owned(out)
}

/// Output that arrives in pieces (a followed log), escaped as it comes: a character split between
/// two pieces waits for its other bytes rather than turning into a replacement character.
#[derive(Debug, Default)]
pub struct TextStream {
    pending: Vec<u8>,
}

impl TextStream {
    /// The escaped text of what `piece` completes.
    pub fn push(&mut self, piece: &[u8]) -> String {
        self.pending.extend_from_slice(piece);
        let complete = match std::str::from_utf8(&self.pending) {
            Ok(_) => self.pending.len(),
            // Only an incomplete character at the very end waits; invalid bytes are shown as
            // replacement characters now.
            Err(error) if error.error_len().is_none() => error.valid_up_to(),
            Err(_) => self.pending.len(),
        };
        let ready: Vec<u8> = self.pending.drain(..complete).collect();
        text(&String::from_utf8_lossy(&ready)).into_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What attackers print: OSC 52 (the clipboard), clear screen, a carriage return over a
    /// line, C1's CSI, a right-to-left override.
    #[test]
    fn controls_are_shown_escaped_and_the_rest_is_kept() {
        assert_eq!(
            text("\u{1b}]52;c;ZXZpbA==\u{7}ok\n\u{1b}[2J\tdone\r\n"),
            "\\x1b]52;c;ZXZpbA==\\x07ok\n\\x1b[2J\tdone\\r\n"
        );
        assert_eq!(
            text("a\u{9b}2Jb\u{202e}c\u{7f}"),
            "a\\u{9b}2Jb\\u{202e}c\\x7f"
        );
        assert!(matches!(
            text("plain\nlines\tand ünïcode"),
            Cow::Borrowed(_)
        ));
    }

    /// A newline in a file name or a message cannot forge a line.
    #[test]
    fn a_field_escapes_its_newlines() {
        assert_eq!(
            field("x.yaml\n== step build exited with code 0"),
            "x.yaml\\n== step build exited with code 0"
        );
    }

    #[test]
    fn a_stream_keeps_characters_split_between_pieces() {
        let mut stream = TextStream::default();
        let bytes = "é\u{1b}[2J".as_bytes();
        assert_eq!(stream.push(&bytes[..1]), "");
        assert_eq!(stream.push(&bytes[1..]), "é\\x1b[2J");
    }

    #[test]
    fn a_log_line_keeps_its_colours_and_its_end_only() {
        let line = "\u{1b}[32m INFO\u{1b}[0m pass: file=\"a\nb\u{1b}]52;c;x\u{7}\u{1b}[2J\"\n";
        assert_eq!(
            log_line(line, true),
            "\u{1b}[32m INFO\u{1b}[0m pass: file=\"a\\nb\\x1b]52;c;x\\x07\\x1b[2J\"\n"
        );
        assert_eq!(
            log_line(line, false),
            "\\x1b[32m INFO\\x1b[0m pass: file=\"a\\nb\\x1b]52;c;x\\x07\\x1b[2J\"\n"
        );
        assert!(matches!(log_line("plain\n", true), Cow::Borrowed(_)));
    }
}
