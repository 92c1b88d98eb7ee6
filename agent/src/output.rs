//! What the agent and the CLI write. Log lines stay one line each whatever a field
//! holds (`OneLine`), and the CLI's own output ends the process quietly when its
//! reader has gone (`sessiongate session list | head -1`), as Unix tools do, instead
//! of panicking on the broken pipe.

use std::{
    fmt,
    io::{self, Write},
};

/// Prints a line on stdout (`outln!`) or stderr (`errln!`); see `write_or_exit`.
#[macro_export]
macro_rules! outln {
    ($($arg:tt)*) => {
        $crate::output::write_or_exit(&mut ::std::io::stdout().lock(), format_args!("{}\n", format_args!($($arg)*)))
    };
}

#[macro_export]
macro_rules! errln {
    ($($arg:tt)*) => {
        $crate::output::write_or_exit(&mut ::std::io::stderr().lock(), format_args!("{}\n", format_args!($($arg)*)))
    };
}

/// Writes and flushes. A reader that went away (EPIPE) ends the process with success
/// and no message: it asked for no more. Any other failure (a full disk under a
/// redirect) ends it with a failure, said on stderr if stderr still works.
pub fn write_or_exit(out: &mut impl Write, args: fmt::Arguments<'_>) {
    match write_flushed(out, args) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => std::process::exit(0),
        Err(e) => {
            let _ = writeln!(io::stderr(), "error: cannot write the output: {e}");
            std::process::exit(1);
        }
    }
}

fn write_flushed(out: &mut impl Write, args: fmt::Arguments<'_>) -> io::Result<()> {
    out.write_fmt(args)?;
    out.flush()
}

/// A log writer that keeps each event on one line: line breaks and other control
/// characters inside an event are written escaped (`\n`, `\x1b`), so a field that
/// carries one (a name, an error quoting its input) cannot forge a log line. The
/// formatter writes each event in one call, its newline last. With `ansi` (a
/// terminal), ESC passes for the formatter's colours.
pub struct OneLine<W> {
    inner: W,
    ansi: bool,
}

impl<W: Write> OneLine<W> {
    pub const fn new(inner: W, ansi: bool) -> Self {
        Self { inner, ansi }
    }
}

impl<W: Write> Write for OneLine<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let (body, end) = match buf.strip_suffix(b"\n") {
            Some(body) => (body, &b"\n"[..]),
            None => (buf, &b""[..]),
        };
        let keep = |b: u8| b == b'\t' || (b == 0x1b && self.ansi) || !(b < 0x20 || b == 0x7f);
        if body.iter().all(|&b| keep(b)) {
            self.inner.write_all(buf)?;
            return Ok(buf.len());
        }
        let mut escaped = Vec::with_capacity(buf.len() + 16);
        for &b in body {
            match b {
                b'\n' => escaped.extend_from_slice(b"\\n"),
                b'\r' => escaped.extend_from_slice(b"\\r"),
                b if keep(b) => escaped.push(b),
                b => escaped.extend_from_slice(format!("\\x{b:02x}").as_bytes()),
            }
        }
        escaped.extend_from_slice(end);
        self.inner.write_all(&escaped)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one_line(text: &str, ansi: bool) -> String {
        let mut out = OneLine::new(Vec::new(), ansi);
        out.write_all(text.as_bytes()).unwrap();
        String::from_utf8(out.inner).unwrap()
    }

    #[test]
    fn an_event_stays_one_line_whatever_its_fields_hold() {
        assert_eq!(
            one_line("WARN refused policy=Wiki\nINFO forged\r\n", false),
            "WARN refused policy=Wiki\\nINFO forged\\r\n"
        );
        assert_eq!(one_line("a\u{1b}[2Jb\u{7}\n", false), "a\\x1b[2Jb\\x07\n");
        // Colours on a terminal pass; so do tabs and non-ASCII text.
        assert_eq!(
            one_line("\u{1b}[33mWARN\u{1b}[0m\tü\n", true),
            "\u{1b}[33mWARN\u{1b}[0m\tü\n"
        );
        assert_eq!(one_line("plain line\n", false), "plain line\n");
    }

    #[test]
    fn a_broken_pipe_is_told_apart() {
        struct Gone;
        impl Write for Gone {
            fn write(&mut self, _: &[u8]) -> io::Result<usize> {
                Err(io::ErrorKind::BrokenPipe.into())
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let e = write_flushed(&mut Gone, format_args!("x\n")).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::BrokenPipe);
    }
}
