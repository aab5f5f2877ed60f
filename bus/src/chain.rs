//! Printing an error with its causes on one line.

/// An error and its causes (its `source()` chain) on one line, `: `-separated, each
/// said once: a cause whose text the line already holds is not repeated (some errors,
/// such as `std::io::Error` wrapped with context, show their source in their own
/// message too). This is how the `ipcbus` command line and `epm-service` print
/// errors; an application can print ipcbus errors the same way.
///
/// ```
/// let e = ipcbus::Credentials::builder()
///     .password_file(Some("/nonexistent/ipcbus-password"))
///     .env(|_| None)
///     .resolve()
///     .unwrap_err();
/// let line = ipcbus::error_chain(&e);
/// assert!(line.starts_with("cannot read the password file /nonexistent/ipcbus-password"));
/// assert_eq!(line.matches("No such file").count(), 1, "{line}");
/// ```
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = String::new();
    let mut cur = Some(e);
    while let Some(c) = cur {
        let s = c.to_string();
        if !s.is_empty() && !out.contains(&s) {
            if !out.is_empty() {
                out.push_str(": ");
            }
            out.push_str(&s);
        }
        cur = c.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("outer")]
    struct Outer(#[source] std::io::Error);

    #[derive(Debug, thiserror::Error)]
    #[error("wrapped: {0}")]
    struct Repeats(#[source] std::io::Error);

    #[test]
    fn each_cause_once() {
        let io = || std::io::Error::new(std::io::ErrorKind::NotFound, "gone");
        assert_eq!(error_chain(&Outer(io())), "outer: gone");
        assert_eq!(error_chain(&Repeats(io())), "wrapped: gone");
        assert_eq!(error_chain(&io()), "gone");
    }
}
