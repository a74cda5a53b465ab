//! Zero-copy scan of one SIP message: the start line and every header become byte ranges into
//! the caller's buffer; nothing is copied or allocated for a message of up to
//! [`INLINE_HEADERS`] headers.

use smallvec::SmallVec;

use super::header::HeaderName;
use super::{at, sub, tail, trim, Span};

/// Headers kept inline before the list spills to the heap; typical phone traffic has 10–20.
pub const INLINE_HEADERS: usize = 32;
/// More headers than this in one message is an attack, not a phone.
pub const MAX_HEADERS: usize = 200;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Method {
    Invite,
    Ack,
    Bye,
    Cancel,
    Register,
    Options,
    Info,
    Update,
    Prack,
    Subscribe,
    Notify,
    Refer,
    Message,
    Publish,
    Other,
}

impl Method {
    pub fn parse(b: &[u8]) -> Method {
        use Method::*;
        match b {
            b"INVITE" => Invite,
            b"ACK" => Ack,
            b"BYE" => Bye,
            b"CANCEL" => Cancel,
            b"REGISTER" => Register,
            b"OPTIONS" => Options,
            b"INFO" => Info,
            b"UPDATE" => Update,
            b"PRACK" => Prack,
            b"SUBSCRIBE" => Subscribe,
            b"NOTIFY" => Notify,
            b"REFER" => Refer,
            b"MESSAGE" => Message,
            b"PUBLISH" => Publish,
            _ => Other,
        }
    }

    /// Requests that may create a dialog, and so get a Record-Route.
    pub fn creates_dialog(self) -> bool {
        matches!(
            self,
            Method::Invite | Method::Subscribe | Method::Refer | Method::Notify
        )
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartLine {
    Request {
        method: Method,
        method_span: Span,
        uri: Span,
    },
    Response {
        code: u16,
        reason: Span,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub name: HeaderName,
    /// The whole header, from the name to the end of its last (folded) line, CRLF included.
    pub line: Span,
    /// The value, trimmed; may contain folded line breaks.
    pub value: Span,
}

/// Why a buffer is not a SIP message we accept. Each maps to an anomaly the engine scores.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("empty message")]
    Empty,
    #[error("not SIP")]
    NotSip,
    #[error("malformed start line")]
    BadStartLine,
    #[error("malformed header line")]
    BadHeader,
    #[error("too many headers")]
    TooManyHeaders,
    #[error("no end of headers")]
    NoHeaderEnd,
    #[error("bad Content-Length")]
    BadContentLength,
    #[error("body shorter than Content-Length")]
    Truncated,
    #[error("message larger than the limit")]
    Oversized,
}

#[derive(Debug, Clone)]
pub struct Message<'a> {
    pub buf: &'a [u8],
    pub start: StartLine,
    /// Start line range, CRLF included.
    pub start_line: Span,
    pub headers: SmallVec<[Header; INLINE_HEADERS]>,
    /// Offset of the blank line that ends the headers (where a new header may be inserted).
    pub headers_end: usize,
    pub body: Span,
    /// Content-Length as sent, when present.
    pub content_length: Option<usize>,
}

/// How a message was framed: a datagram is whole, a stream message was cut by Content-Length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    Datagram,
    /// A message already cut from a stream: Content-Length is mandatory and exact.
    Stream,
    /// Only the header block is present (the stream framer learning Content-Length).
    HeadersOnly,
}

fn line_end(buf: &[u8], from: usize) -> Option<(usize, usize)> {
    // Returns (end of line content, start of next line). Accepts CRLF and bare LF.
    let i = memchr::memchr(b'\n', tail(buf, from))? + from;
    let content_end = if i > from && at(buf, i - 1) == b'\r' {
        i - 1
    } else {
        i
    };
    Some((content_end, i + 1))
}

/// RFC 3261 `token` characters.
pub fn is_token(b: u8) -> bool {
    TOKEN.get(usize::from(b)).copied().unwrap_or(false)
}

/// [`is_token`] as a table: it is asked of nearly every byte of header names and parameters.
#[allow(clippy::indexing_slicing)] // i < 256, in a constant
const TOKEN: [bool; 256] = {
    let mut t = [false; 256];
    let mut i = 0;
    while i < 256 {
        let b = i as u8;
        t[i] = b.is_ascii_alphanumeric()
            || matches!(
                b,
                b'-' | b'.' | b'!' | b'%' | b'*' | b'_' | b'+' | b'`' | b'\'' | b'~'
            );
        i += 1;
    }
    t
};

/// Scan one message. For a datagram, bytes after Content-Length are ignored (RFC 3261 §18.3);
/// a body shorter than Content-Length is rejected.
pub fn parse(buf: &[u8], framing: Framing) -> Result<Message<'_>, ParseError> {
    let mut pos = 0;
    while pos < buf.len() && (at(buf, pos) == b'\r' || at(buf, pos) == b'\n') {
        pos += 1;
    }
    if pos >= buf.len() {
        return Err(ParseError::Empty);
    }
    let (sl_end, mut next) = line_end(buf, pos).ok_or(ParseError::NoHeaderEnd)?;
    let start = parse_start_line(buf, pos, sl_end)?;
    let start_line = Span::new(pos, next);

    let mut headers: SmallVec<[Header; INLINE_HEADERS]> = SmallVec::new();
    let headers_end;
    loop {
        if next >= buf.len() {
            return Err(ParseError::NoHeaderEnd);
        }
        let (end, after) = line_end(buf, next).ok_or(ParseError::NoHeaderEnd)?;
        if end == next {
            headers_end = next;
            next = after;
            break;
        }
        let first = at(buf, next);
        if first == b' ' || first == b'\t' {
            // Folded continuation of the previous header (RFC 3261 §7.3.1).
            let h = headers.last_mut().ok_or(ParseError::BadHeader)?;
            h.line.end = after as u32;
            let (s, e) = trim(buf, next, end);
            if e > s {
                h.value.end = e as u32;
                if h.value.start == h.value.end {
                    h.value.start = s as u32;
                }
            }
        } else {
            if headers.len() >= MAX_HEADERS {
                return Err(ParseError::TooManyHeaders);
            }
            let colon =
                memchr::memchr(b':', sub(buf, next, end)).ok_or(ParseError::BadHeader)? + next;
            let (ns, ne) = trim(buf, next, colon);
            if ns == ne || !sub(buf, ns, ne).iter().all(|&b| is_token(b)) {
                return Err(ParseError::BadHeader);
            }
            let (vs, ve) = trim(buf, colon + 1, end);
            headers.push(Header {
                name: HeaderName::parse(sub(buf, ns, ne)),
                line: Span::new(next, after),
                value: Span::new(vs, ve),
            });
        }
        next = after;
    }

    let mut content_length = None;
    for h in headers
        .iter()
        .filter(|h| h.name == HeaderName::ContentLength)
    {
        let v = h.value.of(buf);
        if v.is_empty() || v.len() > 9 || !v.iter().all(u8::is_ascii_digit) {
            return Err(ParseError::BadContentLength);
        }
        let n = v.iter().fold(0usize, |a, d| a * 10 + (d - b'0') as usize);
        if content_length.is_some_and(|c| c != n) {
            return Err(ParseError::BadContentLength);
        }
        content_length = Some(n);
    }
    let available = buf.len() - next;
    let body_len = match (content_length, framing) {
        (_, Framing::HeadersOnly) => 0,
        (Some(n), _) if n > available => return Err(ParseError::Truncated),
        (Some(n), _) => n,
        (None, Framing::Datagram) => available,
        (None, Framing::Stream) => 0,
    };
    Ok(Message {
        buf,
        start,
        start_line,
        headers,
        headers_end,
        body: Span::new(next, next + body_len),
        content_length,
    })
}

fn parse_start_line(buf: &[u8], s: usize, e: usize) -> Result<StartLine, ParseError> {
    let line = sub(buf, s, e);
    if let Some(rest) = line.strip_prefix(b"SIP/2.0 ") {
        if rest.len() < 3 || !sub(rest, 0, 3).iter().all(u8::is_ascii_digit) {
            return Err(ParseError::BadStartLine);
        }
        if rest.len() > 3 && at(rest, 3) != b' ' {
            return Err(ParseError::BadStartLine);
        }
        let code = sub(rest, 0, 3)
            .iter()
            .fold(0u16, |a, d| a * 10 + (d - b'0') as u16);
        if !(100..=699).contains(&code) {
            return Err(ParseError::BadStartLine);
        }
        let rs = (s + 8 + 4).min(e);
        return Ok(StartLine::Response {
            code,
            reason: Span::new(rs, e),
        });
    }
    let sp1 = memchr::memchr(b' ', line).ok_or(ParseError::NotSip)?;
    let method = sub(line, 0, sp1);
    if method.is_empty() || !method.iter().all(|&b| is_token(b)) {
        return Err(ParseError::NotSip);
    }
    let sp2 = memchr::memrchr(b' ', line).ok_or(ParseError::BadStartLine)?;
    if sp2 <= sp1 + 1 {
        return Err(ParseError::BadStartLine);
    }
    let version = tail(line, sp2 + 1);
    if !version.eq_ignore_ascii_case(b"SIP/2.0") {
        return Err(
            if version.starts_with(b"SIP/") || version.starts_with(b"sip/") {
                ParseError::BadStartLine
            } else {
                ParseError::NotSip
            },
        );
    }
    let uri = sub(line, sp1 + 1, sp2);
    if uri.contains(&b' ') || !is_absolute_uri(uri) {
        return Err(ParseError::BadStartLine);
    }
    Ok(StartLine::Request {
        method: Method::parse(method),
        method_span: Span::new(s, s + sp1),
        uri: Span::new(s + sp1 + 1, s + sp2),
    })
}

/// A Request-URI starts with a scheme: `ALPHA *( ALPHA / DIGIT / "+" / "-" / "." ) ":"`
/// (RFC 3261 §25.1). This rejects `<sip:...>` (RFC 4475 §3.1.2.7) and other non-URIs.
fn is_absolute_uri(uri: &[u8]) -> bool {
    let Some(colon) = memchr::memchr(b':', uri) else {
        return false;
    };
    let scheme = sub(uri, 0, colon);
    scheme.first().is_some_and(u8::is_ascii_alphabetic)
        && scheme
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'-' | b'.'))
}

impl<'a> Message<'a> {
    pub fn is_request(&self) -> bool {
        matches!(self.start, StartLine::Request { .. })
    }

    pub fn method(&self) -> Option<Method> {
        match self.start {
            StartLine::Request { method, .. } => Some(method),
            StartLine::Response { .. } => None,
        }
    }

    pub fn method_bytes(&self) -> &'a [u8] {
        match self.start {
            StartLine::Request { method_span, .. } => method_span.of(self.buf),
            StartLine::Response { .. } => b"",
        }
    }

    pub fn status(&self) -> Option<u16> {
        match self.start {
            StartLine::Response { code, .. } => Some(code),
            StartLine::Request { .. } => None,
        }
    }

    pub fn request_uri(&self) -> Option<Span> {
        match self.start {
            StartLine::Request { uri, .. } => Some(uri),
            StartLine::Response { .. } => None,
        }
    }

    pub fn header(&self, name: HeaderName) -> Option<&Header> {
        self.headers.iter().find(|h| h.name == name)
    }

    pub fn value(&self, name: HeaderName) -> Option<&'a [u8]> {
        self.header(name).map(|h| h.value.of(self.buf))
    }

    pub fn all(&self, name: HeaderName) -> impl Iterator<Item = &Header> {
        self.headers.iter().filter(move |h| h.name == name)
    }

    pub fn has(&self, name: HeaderName) -> bool {
        self.header(name).is_some()
    }

    pub fn call_id(&self) -> &'a [u8] {
        self.value(HeaderName::CallId).unwrap_or(b"")
    }

    /// CSeq number and method bytes, when well formed.
    pub fn cseq(&self) -> Option<(u32, &'a [u8])> {
        let v = self.value(HeaderName::CSeq)?;
        // LWS, folded line breaks included, separates the two (RFC 4475 §3.1.1.1 folds it).
        let mut it = v.split(|b| super::is_lws(*b)).filter(|p| !p.is_empty());
        let num = it.next()?;
        let method = it.next()?;
        if it.next().is_some() || num.len() > 10 || !num.iter().all(u8::is_ascii_digit) {
            return None;
        }
        let n = num.iter().fold(0u64, |a, d| a * 10 + (d - b'0') as u64);
        u32::try_from(n).ok().map(|n| (n, method))
    }

    /// Max-Forwards as sent: `None` when absent, `Err` when not a number 0..=255. Leading zeros
    /// are allowed (`0068`, RFC 4475 §3.1.1.1).
    pub fn max_forwards(&self) -> Option<Result<u8, ()>> {
        let v = self.value(HeaderName::MaxForwards)?;
        if v.is_empty() || !v.iter().all(u8::is_ascii_digit) {
            return Some(Err(()));
        }
        let zeros = v
            .iter()
            .take_while(|d| **d == b'0')
            .count()
            .min(v.len() - 1);
        let v = tail(v, zeros);
        if v.len() > 3 {
            return Some(Err(()));
        }
        let n = v.iter().fold(0u32, |a, d| a * 10 + (d - b'0') as u32);
        Some(u8::try_from(n).map_err(|_| ()))
    }

    pub fn user_agent(&self) -> &'a [u8] {
        self.value(HeaderName::UserAgent).unwrap_or(b"")
    }

    pub fn has_credentials(&self) -> bool {
        self.has(HeaderName::Authorization) || self.has(HeaderName::ProxyAuthorization)
    }

    /// The whole message as framed (trailing bytes after the body excluded).
    pub fn framed(&self) -> &'a [u8] {
        sub(self.buf, 0, self.body.end as usize)
    }
}

#[cfg(test)]
mod tests;
