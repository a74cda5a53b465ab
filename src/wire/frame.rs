//! TCP framing (RFC 3261 §18.3): a message ends `Content-Length` bytes after the blank line;
//! bare CRLFs between messages are keep-alives (RFC 5626 §3.5.1).

use super::scan::{parse, Framing, ParseError};
use super::sub;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Frame {
    /// Need more bytes.
    Incomplete,
    /// A double-CRLF keep-alive ping of this many bytes: answer with a single CRLF.
    Ping(usize),
    /// Leading CRLF bytes to skip (a pong, or line noise between messages).
    Skip(usize),
    /// A whole message of this many bytes.
    Message(usize),
}

/// Find the next frame at the start of `buf`. `max` bounds a message's size: a peer that sends
/// more headers than that without a blank line is an error, not a reason to buffer forever.
pub fn next_frame(buf: &[u8], max: usize) -> Result<Frame, ParseError> {
    if buf.starts_with(b"\r\n\r\n") {
        return Ok(Frame::Ping(4));
    }
    let lead = buf
        .iter()
        .take_while(|b| **b == b'\r' || **b == b'\n')
        .count();
    if lead > 0 {
        if lead == buf.len() && buf.ends_with(b"\r\n\r") {
            return Ok(Frame::Incomplete);
        }
        return Ok(Frame::Skip(lead));
    }
    let Some(body_start) = body_start(buf) else {
        if buf.len() > max {
            return Err(ParseError::Oversized);
        }
        return Ok(Frame::Incomplete);
    };
    if body_start > max {
        return Err(ParseError::Oversized);
    }
    // Scan only the header part to learn Content-Length; on a stream it is mandatory.
    let msg = parse(sub(buf, 0, body_start), Framing::HeadersOnly)?;
    let cl = msg.content_length.ok_or(ParseError::BadContentLength)?;
    let total = body_start + cl;
    if total > max {
        return Err(ParseError::Oversized);
    }
    if buf.len() < total {
        return Ok(Frame::Incomplete);
    }
    Ok(Frame::Message(total))
}

/// Where the body starts: after the first empty line, by the scanner's rule that a line ends
/// at LF with or without CR. Searching for CRLFCRLF alone would cut a message with bare-LF
/// lines elsewhere than the scanner reads it, and the bytes in between would vanish unseen.
fn body_start(buf: &[u8]) -> Option<usize> {
    memchr::memchr_iter(b'\n', buf).find_map(|i| match buf.get(i + 1..) {
        Some([b'\n', ..]) => Some(i + 2),
        Some([b'\r', b'\n', ..]) => Some(i + 3),
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const MSG: &[u8] = b"OPTIONS sip:a@b SIP/2.0\r\nVia: SIP/2.0/TCP h;branch=z9hG4bK1\r\nContent-Length: 4\r\n\r\nbody";

    #[test]
    fn frames_by_content_length() {
        let mut two = MSG.to_vec();
        two.extend_from_slice(MSG);
        assert_eq!(next_frame(&two, 4096), Ok(Frame::Message(MSG.len())));
        assert_eq!(
            next_frame(sub(MSG, 0, MSG.len() - 1), 4096),
            Ok(Frame::Incomplete)
        );
        assert_eq!(next_frame(sub(MSG, 0, 20), 4096), Ok(Frame::Incomplete));
    }

    #[test]
    fn keepalives_and_limits() {
        assert_eq!(next_frame(b"\r\n\r\n", 4096), Ok(Frame::Ping(4)));
        assert_eq!(next_frame(b"\r\nOPT", 4096), Ok(Frame::Skip(2)));
        assert_eq!(next_frame(b"\r\n\r", 4096), Ok(Frame::Incomplete));
        assert_eq!(next_frame(&[b'A'; 5000], 4096), Err(ParseError::Oversized));
        let no_cl = b"OPTIONS sip:a@b SIP/2.0\r\nVia: x\r\n\r\n";
        assert_eq!(next_frame(no_cl, 4096), Err(ParseError::BadContentLength));
    }

    #[test]
    fn bare_lf_headers_end_where_the_scanner_ends_them() {
        let lf = b"OPTIONS sip:a@b SIP/2.0\nl: 0\n\nINVITE sip:x SIP/2.0\r\nl: 0\r\n\r\n";
        let first = b"OPTIONS sip:a@b SIP/2.0\nl: 0\n\n".len();
        assert_eq!(next_frame(lf, 4096), Ok(Frame::Message(first)));
        assert_eq!(
            next_frame(crate::wire::tail(lf, first), 4096),
            Ok(Frame::Message(lf.len() - first))
        );
    }
}
