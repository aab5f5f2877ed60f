//! Writing results: one line at a time to stdout, flushed, so pipes see each event as
//! it happens; write errors (a closed pipe) are returned, never panicked on.

use std::io::Write;

/// Writes `line` and a newline to stdout and flushes.
///
/// # Errors
/// The I/O error, e.g. `BrokenPipe` when the reader went away.
pub fn line(line: impl AsRef<str>) -> std::io::Result<()> {
    let mut out = std::io::stdout().lock();
    out.write_all(line.as_ref().as_bytes())?;
    out.write_all(b"\n")?;
    out.flush()
}

/// Writes `line` to stderr; errors there are ignored (nowhere left to report them).
pub fn note(line: impl AsRef<str>) {
    let mut err = std::io::stderr().lock();
    let _ = writeln!(err, "{}", line.as_ref());
}
