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

/// `1 event`, `2 events`: a count and its noun, in the right number.
pub fn plural(n: u64, noun: &str) -> String {
    if n == 1 {
        format!("1 {noun}")
    } else {
        format!("{n} {noun}s")
    }
}

/// Writes `line` to stderr; errors there are ignored (nowhere left to report them).
pub fn note(line: impl AsRef<str>) {
    let mut err = std::io::stderr().lock();
    let _ = writeln!(err, "{}", line.as_ref());
}

#[cfg(test)]
mod tests {
    #[test]
    fn plurals() {
        assert_eq!(super::plural(0, "event"), "0 events");
        assert_eq!(super::plural(1, "event"), "1 event");
        assert_eq!(super::plural(2, "receiver"), "2 receivers");
    }
}
