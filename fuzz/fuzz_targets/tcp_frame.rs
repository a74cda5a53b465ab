//! TCP framing does not depend on how the stream is cut: feeding the same bytes in arbitrary
//! chunks, as the connection loop does (append, frame everything buffered, read again), yields
//! the same messages, the same error at the same place and the same unframed rest as feeding them at
//! once. Every message frame is exactly one message to the scanner.
//! (Keep-alive pings excepted: see the end.)
//!
//! Input: 8 bytes seeding the chunk sizes (and the size limit), then the stream.

#![no_main]

use libfuzzer_sys::fuzz_target;
use sipwarden::wire::frame::{next_frame, Frame};
use sipwarden::wire::{parse, Framing, ParseError};

#[derive(Debug, PartialEq, Eq)]
struct Run {
    messages: Vec<Vec<u8>>,
    pings: usize,
    error: Option<(ParseError, usize)>,
    /// Bytes framed (messages, pings, skips) before the stream ended or the error.
    consumed: usize,
}

fn run<'a>(chunks: impl Iterator<Item = &'a [u8]>, max: usize) -> Run {
    let mut r = Run {
        messages: Vec::new(),
        pings: 0,
        error: None,
        consumed: 0,
    };
    let (mut buf, mut consumed) = (Vec::new(), 0usize);
    'stream: for chunk in chunks {
        buf.extend_from_slice(chunk);
        loop {
            match next_frame(&buf, max) {
                Ok(Frame::Incomplete) => break,
                Ok(Frame::Ping(n)) => {
                    r.pings += 1;
                    buf.drain(..n);
                    consumed += n;
                }
                Ok(Frame::Skip(n)) => {
                    buf.drain(..n);
                    consumed += n;
                }
                Ok(Frame::Message(n)) => {
                    assert!(n > 0 && n <= buf.len() && n <= max);
                    let m: Vec<u8> = buf.drain(..n).collect();
                    consumed += n;
                    match parse(&m, Framing::Stream) {
                        Ok(p) => assert_eq!(p.framed().len(), n, "frame and message differ"),
                        Err(e) => panic!("a frame that does not parse: {e}"),
                    }
                    r.messages.push(m);
                }
                Err(e) => {
                    r.error = Some((e, consumed));
                    break 'stream;
                }
            }
        }
    }
    if r.error.is_none() {
        // CR/LF left over at the end is keep-alive noise either way; whether the framer has
        // skipped it yet or waits to see if it becomes a ping depends on the cut.
        consumed += buf
            .iter()
            .take_while(|b| matches!(b, b'\r' | b'\n'))
            .count();
    }
    r.consumed = consumed;
    r
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 8 {
        return;
    }
    let (seed, stream) = data.split_at(8);
    let mut x = u64::from_le_bytes([
        seed[0], seed[1], seed[2], seed[3], seed[4], seed[5], seed[6], seed[7],
    ]) | 1;
    let max = 64 + (x as usize % 4096);
    let whole = run(std::iter::once(stream), max);
    // Chunks of 1..=64 bytes from an xorshift sequence.
    let mut chunks = Vec::new();
    let mut pos = 0;
    while pos < stream.len() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let n = (1 + (x % 64) as usize).min(stream.len() - pos);
        chunks.push(&stream[pos..pos + n]);
        pos += n;
    }
    let cut = run(chunks.into_iter(), max);
    assert_eq!(cut.messages, whole.messages, "messages differ");
    assert_eq!(cut.error, whole.error, "errors differ");
    assert_eq!(cut.consumed, whole.consumed, "framed bytes differ");
    // Pings are not compared: CRLFs between messages are keep-alive noise, and how a run of
    // them splits into pings (answered) and skips (not) depends on where the stream was cut —
    // a double CRLF cut in two is two skips. Phones send the ping in one segment.
    let _ = (cut.pings, whole.pings);
});
