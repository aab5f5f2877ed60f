//! Reading the events of `ipcbus send` from stdin or a file, never more than one
//! maximal event at a time: lines (LF, CR LF), all of stdin, or a whole file.

use super::*;

/// The error for an event over the maximum, worded like the library's
/// `SendError::TooLarge` (`len` is `None` when reading stopped past the maximum).
pub(super) fn too_large(what: &str, len: Option<usize>, max: usize) -> String {
    match len {
        Some(len) => {
            format!("cannot send {what}: payload of {len} bytes exceeds the maximum of {max}")
        }
        None => format!(
            "cannot send {what}: payload of more than {max} bytes exceeds the maximum of {max}"
        ),
    }
}

/// Reads a --file, at most `max` + 1 bytes of it.
pub(super) fn read_file(path: &std::path::Path, max: usize) -> anyhow::Result<Bytes> {
    let what = format!("file {}", path.display());
    let f = std::fs::File::open(path)
        .map_err(|e| config_error(format!("cannot read file {}: {e}", path.display())))?;
    let size = f.metadata().ok().filter(|m| m.is_file()).map(|m| m.len());
    if let Some(size) = size {
        if size > max as u64 {
            anyhow::bail!(too_large(
                &what,
                Some(usize::try_from(size).unwrap_or(usize::MAX)),
                max
            ));
        }
    }
    let mut buf = Vec::with_capacity(size.map_or(0, |s| s as usize));
    // An unreadable file (a directory, say) is a configuration error, like a
    // missing one.
    f.take(max as u64 + 1)
        .read_to_end(&mut buf)
        .map_err(|e| config_error(format!("cannot read file {}: {e}", path.display())))?;
    if buf.len() > max {
        anyhow::bail!(too_large(&what, None, max));
    }
    Ok(Bytes::from(buf))
}

/// Hands `event` to the sender `count` times, holding read-ahead for its size; false
/// when the sender is gone.
pub(super) fn hand_over(
    tx: &mpsc::Sender<Input>,
    budget: &Arc<Semaphore>,
    event: Bytes,
    count: u64,
) -> bool {
    // READ_AHEAD fits u32 (it is a few MiB).
    let n = u32::try_from(event.len().min(READ_AHEAD)).unwrap_or(u32::MAX);
    let Ok(permit) = futures::executor::block_on(budget.clone().acquire_many_owned(n)) else {
        return false;
    };
    let mut permit = Some(permit);
    for i in 0..count {
        // The last copy keeps the read-ahead until the sender has taken it.
        let p = if i + 1 == count { permit.take() } else { None };
        if tx.blocking_send(Input::Event(event.clone(), p)).is_err() {
            return false;
        }
    }
    true
}

/// One line of input, read by [`read_line`].
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Line {
    /// A line (without its LF, or CR LF) is in the buffer.
    Read,
    /// The line is longer than the maximum; reading stopped there.
    TooLong,
    /// No more input.
    Eof,
}

/// Reads one line into `buf`, never more than `max` + 1 bytes of it (room for a CR).
pub(super) fn read_line(
    r: &mut impl BufRead,
    buf: &mut Vec<u8>,
    max: usize,
) -> std::io::Result<Line> {
    buf.clear();
    let mut any = false;
    loop {
        let avail = match r.fill_buf() {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if avail.is_empty() {
            if !any {
                return Ok(Line::Eof);
            }
            break;
        }
        any = true;
        let nl = avail.iter().position(|&b| b == b'\n');
        let part = &avail[..nl.unwrap_or(avail.len())];
        if buf.len() + part.len() > max + 1 {
            return Ok(Line::TooLong);
        }
        buf.extend_from_slice(part);
        let used = nl.map_or(avail.len(), |i| i + 1);
        r.consume(used);
        if nl.is_some() {
            break;
        }
    }
    if buf.last() == Some(&b'\r') {
        buf.pop();
    }
    Ok(if buf.len() > max {
        Line::TooLong
    } else {
        Line::Read
    })
}

/// Sends each line of `r` as an event (see [`read_line`]), until the end of input, an
/// error (sent as [`Input::Error`]) or the sender going away.
pub(super) fn read_lines(
    mut r: impl BufRead,
    tx: &mpsc::Sender<Input>,
    budget: &Arc<Semaphore>,
    count: u64,
    max: usize,
) {
    let mut buf = Vec::new();
    let mut n = 0u64;
    loop {
        n += 1;
        let event = match read_line(&mut r, &mut buf, max) {
            Ok(Line::Eof) => return,
            Ok(Line::Read) if buf.len() >= MOVE_LINE => Bytes::from(std::mem::take(&mut buf)),
            Ok(Line::Read) => Bytes::copy_from_slice(&buf),
            Ok(Line::TooLong) => {
                let e = anyhow::anyhow!(too_large(&format!("line {n} of stdin"), None, max));
                let _ = tx.blocking_send(Input::Error(e));
                return;
            }
            Err(e) => {
                let e = anyhow::Error::new(e).context(format!("cannot read line {n} of stdin"));
                let _ = tx.blocking_send(Input::Error(e));
                return;
            }
        };
        if !hand_over(tx, budget, event, count) {
            return;
        }
    }
}

/// Sends all of `r` as one event, or an [`Input::Error`] when it is over `max` bytes.
pub(super) fn read_whole(
    r: impl Read,
    tx: &mpsc::Sender<Input>,
    budget: &Arc<Semaphore>,
    count: u64,
    max: usize,
) {
    let mut buf = Vec::new();
    let e = match r.take(max as u64 + 1).read_to_end(&mut buf) {
        Ok(_) if buf.len() <= max => {
            hand_over(tx, budget, Bytes::from(buf), count);
            return;
        }
        Ok(_) => anyhow::anyhow!(too_large("stdin", None, max)),
        Err(e) => anyhow::Error::new(e).context("cannot read stdin"),
    };
    let _ = tx.blocking_send(Input::Error(e));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(input: &[u8], max: usize) -> Vec<Result<Vec<u8>, Line>> {
        // A tiny buffer so lines span several fills.
        let mut r = std::io::BufReader::with_capacity(3, input);
        let mut buf = Vec::new();
        let mut out = Vec::new();
        for _ in 0..100 {
            match read_line(&mut r, &mut buf, max).expect("in-memory read") {
                Line::Read => out.push(Ok(buf.clone())),
                Line::Eof => break,
                Line::TooLong => {
                    out.push(Err(Line::TooLong));
                    break;
                }
            }
        }
        out
    }

    #[test]
    fn line_splitting() {
        let ok = |s: &[u8]| Ok(s.to_vec());
        assert_eq!(
            lines(b"a\r\n\r\n\nbc\rd\nlast", 10),
            vec![ok(b"a"), ok(b""), ok(b""), ok(b"bc\rd"), ok(b"last")]
        );
        assert_eq!(lines(b"", 10), vec![]);
        // Exactly the maximum, with LF, CR LF or nothing after it.
        assert_eq!(lines(b"12345\n", 5), vec![ok(b"12345")]);
        assert_eq!(lines(b"12345\r\n", 5), vec![ok(b"12345")]);
        assert_eq!(lines(b"12345", 5), vec![ok(b"12345")]);
        assert_eq!(lines(b"123456\n", 5), vec![Err(Line::TooLong)]);
        assert_eq!(lines(b"12345\r", 5), vec![ok(b"12345")]);
        assert_eq!(
            lines(b"ab\n1234567890", 5),
            vec![ok(b"ab"), Err(Line::TooLong)]
        );
    }
}
