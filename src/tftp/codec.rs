//! The TFTP wire format: RFC 1350 packets (RRQ, WRQ, DATA, ACK, ERROR), RFC 2347 option
//! negotiation (OACK) and the blksize, timeout, tsize and windowsize options (RFC 2348, 2349,
//! 7440). Decoding borrows the input and never panics; anything a well-behaved peer would not
//! send is a typed [`DecodeError`], so the relay can drop and count it.

use thiserror::Error;

pub const OP_RRQ: u16 = 1;
pub const OP_WRQ: u16 = 2;
pub const OP_DATA: u16 = 3;
pub const OP_ACK: u16 = 4;
pub const OP_ERROR: u16 = 5;
pub const OP_OACK: u16 = 6;

/// Largest request (RRQ/WRQ with options) a peer may send: RFC 2347 §"Packet Formats" limits
/// request packets to 512 octets. Checked before parsing, so an attacker's jumbo request costs
/// one length comparison.
pub const MAX_REQUEST: usize = 512;
/// The block size range of RFC 2348.
pub const MIN_BLKSIZE: u16 = 8;
pub const MAX_BLKSIZE: u16 = 65464;
/// Block size without a negotiated `blksize` option.
pub const DEFAULT_BLKSIZE: u16 = 512;
/// Largest valid datagram: a DATA packet with a full maximum block.
pub const MAX_DATAGRAM: usize = 4 + MAX_BLKSIZE as usize;
/// Options per packet. Real clients send at most four or five (tftpd-hpa knows seven names);
/// more is a probe or garbage.
pub const MAX_OPTIONS: usize = 8;
/// Longest option name (the longest standard one, "windowsize", is 10 bytes).
pub const MAX_OPTION_NAME: usize = 32;

/// TFTP error codes (RFC 1350 §5, RFC 2347 for 8).
pub mod error_code {
    pub const NOT_DEFINED: u16 = 0;
    pub const FILE_NOT_FOUND: u16 = 1;
    pub const ACCESS_VIOLATION: u16 = 2;
    pub const DISK_FULL: u16 = 3;
    pub const ILLEGAL_OPERATION: u16 = 4;
    pub const UNKNOWN_TID: u16 = 5;
    pub const FILE_EXISTS: u16 = 6;
    pub const NO_SUCH_USER: u16 = 7;
    pub const OPTION_REFUSED: u16 = 8;
}

/// A field that must end with a NUL byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Field {
    Filename,
    Mode,
    OptionName,
    OptionValue,
    ErrorMessage,
}

/// An option whose value this codec checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KnownOption {
    Blksize,
    Timeout,
    Tsize,
    Windowsize,
}

impl KnownOption {
    fn of(name: &[u8]) -> Option<KnownOption> {
        [
            (&b"blksize"[..], KnownOption::Blksize),
            (b"timeout", KnownOption::Timeout),
            (b"tsize", KnownOption::Tsize),
            (b"windowsize", KnownOption::Windowsize),
        ]
        .into_iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, k)| k)
    }

    /// The valid value range: blksize RFC 2348, timeout RFC 2349 (seconds), tsize RFC 2349
    /// (bytes), windowsize RFC 7440.
    fn range(self) -> (u64, u64) {
        match self {
            KnownOption::Blksize => (MIN_BLKSIZE as u64, MAX_BLKSIZE as u64),
            KnownOption::Timeout => (1, 255),
            KnownOption::Tsize => (0, u64::MAX),
            KnownOption::Windowsize => (1, 65535),
        }
    }
}

/// Why a datagram is not a TFTP packet we accept. All of these are the sender's fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum DecodeError {
    #[error("truncated packet")]
    Truncated,
    #[error("unknown opcode {0}")]
    BadOpcode(u16),
    #[error("{0:?} not terminated by NUL")]
    Unterminated(Field),
    #[error("empty file name")]
    EmptyFilename,
    #[error("unknown transfer mode")]
    BadMode,
    #[error("request of {0} bytes exceeds {MAX_REQUEST}")]
    RequestTooLarge(usize),
    #[error("datagram of {0} bytes exceeds {MAX_DATAGRAM}")]
    DataTooLarge(usize),
    #[error("more than {MAX_OPTIONS} options")]
    TooManyOptions,
    #[error("option given twice")]
    DuplicateOption,
    #[error("empty or over-long option name")]
    BadOptionName,
    #[error("invalid {0:?} value")]
    BadOptionValue(KnownOption),
    #[error("OACK without options")]
    EmptyOack,
    #[error("bytes after the end of the packet")]
    TrailingBytes,
}

/// Why a packet cannot be encoded (a caller's bug, never attacker input).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum EncodeError {
    #[error("{0:?} contains a NUL byte")]
    Nul(Field),
    #[error("data block too large")]
    DataTooLarge,
    #[error("invalid option: {0}")]
    Option(DecodeError),
}

/// Transfer mode (RFC 1350 §5; matched case-insensitively).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Netascii,
    Octet,
    Mail,
}

impl Mode {
    fn parse(b: &[u8]) -> Option<Mode> {
        if b.eq_ignore_ascii_case(b"octet") {
            Some(Mode::Octet)
        } else if b.eq_ignore_ascii_case(b"netascii") {
            Some(Mode::Netascii)
        } else if b.eq_ignore_ascii_case(b"mail") {
            Some(Mode::Mail)
        } else {
            None
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Netascii => "netascii",
            Mode::Octet => "octet",
            Mode::Mail => "mail",
        }
    }
}

/// Option name/value pairs in the order sent, borrowed from the packet. Built only through
/// [`Options::push`], so every instance is valid: at most [`MAX_OPTIONS`], no duplicates
/// (names compare case-insensitively), known options within their RFC ranges. A fixed array,
/// not a vector: decoding never allocates.
#[derive(Debug, Clone, Copy)]
pub struct Options<'a> {
    pairs: [(&'a [u8], &'a [u8]); MAX_OPTIONS],
    len: usize,
}

impl Default for Options<'_> {
    fn default() -> Self {
        Options {
            pairs: [(&[], &[]); MAX_OPTIONS],
            len: 0,
        }
    }
}

impl PartialEq for Options<'_> {
    fn eq(&self, other: &Self) -> bool {
        self.as_slice() == other.as_slice()
    }
}

impl Eq for Options<'_> {}

impl<'a> Options<'a> {
    pub fn new() -> Self {
        Self::default()
    }

    /// Add one option after checking it.
    pub fn push(&mut self, name: &'a [u8], value: &'a [u8]) -> Result<(), DecodeError> {
        if name.is_empty() || name.len() > MAX_OPTION_NAME {
            return Err(DecodeError::BadOptionName);
        }
        if self.len >= MAX_OPTIONS {
            return Err(DecodeError::TooManyOptions);
        }
        if self.get(name).is_some() {
            return Err(DecodeError::DuplicateOption);
        }
        if let Some(k) = KnownOption::of(name) {
            let (lo, hi) = k.range();
            match parse_decimal(value) {
                Some(v) if (lo..=hi).contains(&v) => {}
                _ => return Err(DecodeError::BadOptionValue(k)),
            }
        }
        let slot = self
            .pairs
            .get_mut(self.len)
            .ok_or(DecodeError::TooManyOptions)?;
        *slot = (name, value);
        self.len += 1;
        Ok(())
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn len(&self) -> usize {
        self.len
    }

    fn as_slice(&self) -> &[(&'a [u8], &'a [u8])] {
        self.pairs.get(..self.len).unwrap_or(&self.pairs)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&'a [u8], &'a [u8])> + '_ {
        self.as_slice().iter().copied()
    }

    /// The value of option `name` (case-insensitive).
    pub fn get(&self, name: &[u8]) -> Option<&'a [u8]> {
        self.as_slice()
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| *v)
    }

    /// A numeric option's value (any name; `None` when absent or not a decimal number).
    pub fn number(&self, name: &[u8]) -> Option<u64> {
        self.get(name).and_then(parse_decimal)
    }

    pub fn blksize(&self) -> Option<u16> {
        self.number(b"blksize").and_then(|v| u16::try_from(v).ok())
    }

    pub fn timeout(&self) -> Option<u8> {
        self.number(b"timeout").and_then(|v| u8::try_from(v).ok())
    }

    pub fn tsize(&self) -> Option<u64> {
        self.number(b"tsize")
    }

    pub fn windowsize(&self) -> Option<u16> {
        self.number(b"windowsize")
            .and_then(|v| u16::try_from(v).ok())
    }

    fn encode(&self, out: &mut Vec<u8>) -> Result<(), EncodeError> {
        for (n, v) in self.iter() {
            put_str(out, n, Field::OptionName)?;
            put_str(out, v, Field::OptionValue)?;
        }
        Ok(())
    }
}

/// A read or write request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request<'a> {
    pub filename: &'a [u8],
    pub mode: Mode,
    pub options: Options<'a>,
}

/// One TFTP packet, borrowing the datagram it was decoded from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Packet<'a> {
    Rrq(Request<'a>),
    Wrq(Request<'a>),
    Data { block: u16, data: &'a [u8] },
    Ack { block: u16 },
    Error { code: u16, message: &'a [u8] },
    Oack(Options<'a>),
}

/// The opcode of a datagram, without decoding the rest.
pub fn opcode(buf: &[u8]) -> Option<u16> {
    Some(u16::from_be_bytes([*buf.first()?, *buf.get(1)?]))
}

impl<'a> Packet<'a> {
    pub fn opcode(&self) -> u16 {
        match self {
            Packet::Rrq(_) => OP_RRQ,
            Packet::Wrq(_) => OP_WRQ,
            Packet::Data { .. } => OP_DATA,
            Packet::Ack { .. } => OP_ACK,
            Packet::Error { .. } => OP_ERROR,
            Packet::Oack(_) => OP_OACK,
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Packet::Rrq(_) => "RRQ",
            Packet::Wrq(_) => "WRQ",
            Packet::Data { .. } => "DATA",
            Packet::Ack { .. } => "ACK",
            Packet::Error { .. } => "ERROR",
            Packet::Oack(_) => "OACK",
        }
    }

    pub fn decode(buf: &'a [u8]) -> Result<Packet<'a>, DecodeError> {
        if buf.len() > MAX_DATAGRAM {
            return Err(DecodeError::DataTooLarge(buf.len()));
        }
        let op = opcode(buf).ok_or(DecodeError::Truncated)?;
        let body = buf.get(2..).ok_or(DecodeError::Truncated)?;
        match op {
            OP_RRQ | OP_WRQ => {
                if buf.len() > MAX_REQUEST {
                    return Err(DecodeError::RequestTooLarge(buf.len()));
                }
                let req = decode_request(body)?;
                Ok(if op == OP_RRQ {
                    Packet::Rrq(req)
                } else {
                    Packet::Wrq(req)
                })
            }
            OP_DATA => {
                let block = be16(body).ok_or(DecodeError::Truncated)?;
                Ok(Packet::Data {
                    block,
                    data: body.get(2..).unwrap_or_default(),
                })
            }
            OP_ACK => {
                let block = be16(body).ok_or(DecodeError::Truncated)?;
                if body.len() > 2 {
                    return Err(DecodeError::TrailingBytes);
                }
                Ok(Packet::Ack { block })
            }
            OP_ERROR => {
                let code = be16(body).ok_or(DecodeError::Truncated)?;
                let (message, rest) =
                    take_str(body.get(2..).unwrap_or_default(), Field::ErrorMessage)?;
                if !rest.is_empty() {
                    return Err(DecodeError::TrailingBytes);
                }
                Ok(Packet::Error { code, message })
            }
            OP_OACK => {
                let options = decode_options(body)?;
                if options.is_empty() {
                    return Err(DecodeError::EmptyOack);
                }
                Ok(Packet::Oack(options))
            }
            other => Err(DecodeError::BadOpcode(other)),
        }
    }

    /// Append the wire form to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) -> Result<(), EncodeError> {
        out.extend_from_slice(&self.opcode().to_be_bytes());
        match self {
            Packet::Rrq(r) | Packet::Wrq(r) => {
                if r.filename.is_empty() {
                    return Err(EncodeError::Option(DecodeError::EmptyFilename));
                }
                put_str(out, r.filename, Field::Filename)?;
                put_str(out, r.mode.as_str().as_bytes(), Field::Mode)?;
                r.options.encode(out)?;
            }
            Packet::Data { block, data } => {
                if data.len() > MAX_BLKSIZE as usize {
                    return Err(EncodeError::DataTooLarge);
                }
                out.extend_from_slice(&block.to_be_bytes());
                out.extend_from_slice(data);
            }
            Packet::Ack { block } => out.extend_from_slice(&block.to_be_bytes()),
            Packet::Error { code, message } => {
                out.extend_from_slice(&code.to_be_bytes());
                put_str(out, message, Field::ErrorMessage)?;
            }
            Packet::Oack(o) => {
                if o.is_empty() {
                    return Err(EncodeError::Option(DecodeError::EmptyOack));
                }
                o.encode(out)?;
            }
        }
        Ok(())
    }

    pub fn to_vec(&self) -> Result<Vec<u8>, EncodeError> {
        let mut v = Vec::with_capacity(64);
        self.encode(&mut v)?;
        Ok(v)
    }
}

fn decode_request(body: &[u8]) -> Result<Request<'_>, DecodeError> {
    let (filename, rest) = take_str(body, Field::Filename)?;
    if filename.is_empty() {
        return Err(DecodeError::EmptyFilename);
    }
    let (mode, rest) = take_str(rest, Field::Mode)?;
    let mode = Mode::parse(mode).ok_or(DecodeError::BadMode)?;
    Ok(Request {
        filename,
        mode,
        options: decode_options(rest)?,
    })
}

fn decode_options(mut rest: &[u8]) -> Result<Options<'_>, DecodeError> {
    let mut options = Options::new();
    while !rest.is_empty() {
        let (name, r) = take_str(rest, Field::OptionName)?;
        let (value, r) = take_str(r, Field::OptionValue)?;
        options.push(name, value)?;
        rest = r;
    }
    Ok(options)
}

/// A NUL-terminated string and what follows it.
fn take_str(buf: &[u8], field: Field) -> Result<(&[u8], &[u8]), DecodeError> {
    let end = memchr::memchr(0, buf).ok_or(DecodeError::Unterminated(field))?;
    // `end` is the index of a byte of `buf`: both halves exist.
    let (s, rest) = buf
        .split_at_checked(end)
        .ok_or(DecodeError::Unterminated(field))?;
    Ok((s, rest.get(1..).unwrap_or_default()))
}

fn put_str(out: &mut Vec<u8>, s: &[u8], field: Field) -> Result<(), EncodeError> {
    if memchr::memchr(0, s).is_some() {
        return Err(EncodeError::Nul(field));
    }
    out.extend_from_slice(s);
    out.push(0);
    Ok(())
}

fn be16(b: &[u8]) -> Option<u16> {
    Some(u16::from_be_bytes([*b.first()?, *b.get(1)?]))
}

/// ASCII decimal digits only (no sign, no spaces), at most 20 of them, fitting a u64.
fn parse_decimal(b: &[u8]) -> Option<u64> {
    if b.is_empty() || b.len() > 20 || !b.iter().all(u8::is_ascii_digit) {
        return None;
    }
    b.iter().try_fold(0u64, |acc, d| {
        acc.checked_mul(10)?.checked_add(u64::from(d - b'0'))
    })
}

#[cfg(test)]
mod tests;
