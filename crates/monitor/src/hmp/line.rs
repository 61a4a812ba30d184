//! Turns a byte stream into monitor lines: bounded length (an over-long line is reported once
//! and skipped up to its end), `\n`, `\r` and `\r\n` all end a line, and, for a raw terminal
//! (the stdio mux), echo with backspace editing while ignoring escape sequences (arrow keys).

/// Default bound on one line (1 MiB).
pub const MAX_LINE: usize = 1 << 20;

/// What feeding a byte produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LineEvent {
    /// A complete line (without its terminator; invalid UTF-8 replaced).
    Line(String),
    /// The current line passed the length bound; its remainder will be discarded.
    TooLong,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Esc {
    None,
    /// Got ESC.
    Start,
    /// Inside `ESC [` or `ESC O` ... until a final byte.
    Csi,
}

/// Line assembler with optional terminal echo.
#[derive(Debug)]
pub struct LineEditor {
    buf: Vec<u8>,
    max: usize,
    echo: bool,
    discarding: bool,
    last_cr: bool,
    esc: Esc,
}

impl LineEditor {
    pub fn new(max: usize, echo: bool) -> Self {
        LineEditor {
            buf: Vec::new(),
            max: max.max(1),
            echo,
            discarding: false,
            last_cr: false,
            esc: Esc::None,
        }
    }

    /// Feeds bytes; complete lines and errors go to `events`, echo bytes to `echo_out`.
    pub fn feed(&mut self, bytes: &[u8], events: &mut Vec<LineEvent>, echo_out: &mut Vec<u8>) {
        for &b in bytes {
            self.feed_byte(b, events, echo_out);
        }
    }

    fn feed_byte(&mut self, b: u8, events: &mut Vec<LineEvent>, echo_out: &mut Vec<u8>) {
        let was_cr = std::mem::replace(&mut self.last_cr, b == b'\r');
        if b == b'\n' && was_cr {
            return; // second half of \r\n
        }
        if self.echo {
            match (self.esc, b) {
                (Esc::None, 0x1b) => {
                    self.esc = Esc::Start;
                    return;
                }
                (Esc::Start, b'[' | b'O') => {
                    self.esc = Esc::Csi;
                    return;
                }
                (Esc::Start, _) => {
                    self.esc = Esc::None;
                    return;
                }
                (Esc::Csi, 0x40..=0x7e) => {
                    self.esc = Esc::None;
                    return;
                }
                (Esc::Csi, _) => return,
                (Esc::None, _) => {}
            }
        }
        match b {
            b'\n' | b'\r' => {
                if self.echo {
                    echo_out.extend_from_slice(b"\r\n");
                }
                if self.discarding {
                    self.discarding = false;
                } else {
                    events.push(LineEvent::Line(
                        String::from_utf8_lossy(&self.buf).into_owned(),
                    ));
                }
                self.buf.clear();
            }
            0x08 | 0x7f if self.echo => {
                if !self.discarding && self.buf.pop().is_some() {
                    // Drop any UTF-8 continuation bytes of the erased character too.
                    while matches!(self.buf.last(), Some(c) if (c & 0xc0) == 0x80) {
                        self.buf.pop();
                    }
                    echo_out.extend_from_slice(b"\x08 \x08");
                }
            }
            _ if self.discarding => {}
            _ => {
                if self.echo && b < 0x20 && b != b'\t' {
                    return; // other control keys do nothing on a terminal
                }
                if self.buf.len() >= self.max {
                    self.buf.clear();
                    self.discarding = true;
                    events.push(LineEvent::TooLong);
                    return;
                }
                self.buf.push(b);
                if self.echo {
                    echo_out.push(b);
                }
            }
        }
    }

    /// Bytes of the line typed so far (for redrawing after other output).
    pub fn pending(&self) -> &[u8] {
        &self.buf
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(ed: &mut LineEditor, input: &[u8]) -> (Vec<LineEvent>, Vec<u8>) {
        let (mut ev, mut echo) = (Vec::new(), Vec::new());
        ed.feed(input, &mut ev, &mut echo);
        (ev, echo)
    }

    #[test]
    fn splits_on_every_line_ending() {
        let mut ed = LineEditor::new(100, false);
        let (ev, echo) = run(&mut ed, b"a\nb\r\nc\rd");
        assert_eq!(
            ev,
            [
                LineEvent::Line("a".into()),
                LineEvent::Line("b".into()),
                LineEvent::Line("c".into())
            ]
        );
        assert!(echo.is_empty());
        let (ev, _) = run(&mut ed, b"\n");
        assert_eq!(ev, [LineEvent::Line("d".into())]);
    }

    #[test]
    fn too_long_lines_are_reported_once_and_skipped() {
        let mut ed = LineEditor::new(4, false);
        let (ev, _) = run(&mut ed, b"abcdefgh\nok\n");
        assert_eq!(ev, [LineEvent::TooLong, LineEvent::Line("ok".into())]);
    }

    #[test]
    fn terminal_editing_echoes_and_ignores_escape_sequences() {
        let mut ed = LineEditor::new(100, true);
        let (ev, echo) = run(&mut ed, b"inf\x1b[Dx\x7fo\r");
        assert_eq!(ev, [LineEvent::Line("info".into())]);
        assert_eq!(echo, b"infx\x08 \x08o\r\n");
    }
}
