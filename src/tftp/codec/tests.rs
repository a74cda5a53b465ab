//! Codec tests: round trips of every packet type, real client bytes, malformed input.
#![allow(clippy::indexing_slicing)]

use super::*;

fn opts<'a>(pairs: &[(&'a [u8], &'a [u8])]) -> Options<'a> {
    let mut o = Options::new();
    for (n, v) in pairs {
        o.push(n, v).unwrap();
    }
    o
}

fn round_trip(p: &Packet<'_>) {
    let bytes = p.to_vec().unwrap();
    let back = Packet::decode(&bytes).unwrap();
    assert_eq!(&back, p);
    assert_eq!(back.to_vec().unwrap(), bytes);
}

#[test]
fn round_trip_every_packet_type() {
    let req = Request {
        filename: b"SEP001122334455.cnf.xml",
        mode: Mode::Octet,
        options: opts(&[(b"blksize", b"1428"), (b"tsize", b"0"), (b"timeout", b"3")]),
    };
    round_trip(&Packet::Rrq(req.clone()));
    round_trip(&Packet::Wrq(Request {
        mode: Mode::Netascii,
        options: Options::new(),
        ..req
    }));
    round_trip(&Packet::Data {
        block: 65535,
        data: &[0xAB; 512],
    });
    round_trip(&Packet::Data {
        block: 7,
        data: b"",
    });
    round_trip(&Packet::Ack { block: 0 });
    round_trip(&Packet::Error {
        code: error_code::FILE_NOT_FOUND,
        message: b"File not found",
    });
    round_trip(&Packet::Error {
        code: 0,
        message: b"",
    });
    round_trip(&Packet::Oack(opts(&[
        (b"blksize", b"1428"),
        (b"tsize", b"4194304"),
        (b"windowsize", b"16"),
    ])));
}

#[test]
fn decodes_real_client_bytes() {
    // atftp --option "blksize 1428" --option "tsize 0"
    let b = b"\x00\x01cfg001122334455.xml\x00OCTET\x00BLKSIZE\x001428\x00tsize\x000\x00";
    let Packet::Rrq(r) = Packet::decode(b).unwrap() else {
        panic!("not an RRQ");
    };
    assert_eq!(r.filename, b"cfg001122334455.xml");
    assert_eq!(r.mode, Mode::Octet);
    assert_eq!(r.options.blksize(), Some(1428));
    assert_eq!(r.options.tsize(), Some(0));
    assert_eq!(r.options.timeout(), None);
    // Unknown options are carried, not judged.
    let b = b"\x00\x01a\x00octet\x00utimeout\x00whatever\x00";
    let Packet::Rrq(r) = Packet::decode(b).unwrap() else {
        panic!("not an RRQ");
    };
    assert_eq!(r.options.get(b"UTIMEOUT"), Some(&b"whatever"[..]));
}

#[test]
fn truncated_and_unterminated() {
    use DecodeError::*;
    assert_eq!(Packet::decode(b""), Err(Truncated));
    assert_eq!(Packet::decode(b"\x00"), Err(Truncated));
    assert_eq!(Packet::decode(b"\x00\x03\x00"), Err(Truncated));
    assert_eq!(Packet::decode(b"\x00\x04"), Err(Truncated));
    assert_eq!(Packet::decode(b"\x00\x05\x00"), Err(Truncated));
    assert_eq!(
        Packet::decode(b"\x00\x01file"),
        Err(Unterminated(Field::Filename))
    );
    assert_eq!(
        Packet::decode(b"\x00\x01file\x00octet"),
        Err(Unterminated(Field::Mode))
    );
    assert_eq!(
        Packet::decode(b"\x00\x01file\x00octet\x00blksize"),
        Err(Unterminated(Field::OptionName))
    );
    assert_eq!(
        Packet::decode(b"\x00\x01file\x00octet\x00blksize\x00512"),
        Err(Unterminated(Field::OptionValue))
    );
    assert_eq!(
        Packet::decode(b"\x00\x05\x00\x01File not found"),
        Err(Unterminated(Field::ErrorMessage))
    );
    assert_eq!(Packet::decode(b"\x00\x06"), Err(EmptyOack));
    assert_eq!(Packet::decode(b"\x00\x04\x00\x01\x00"), Err(TrailingBytes));
    assert_eq!(
        Packet::decode(b"\x00\x05\x00\x01x\x00y"),
        Err(TrailingBytes)
    );
}

#[test]
fn bad_opcode_mode_and_filename() {
    use DecodeError::*;
    assert_eq!(Packet::decode(b"\x00\x00abc"), Err(BadOpcode(0)));
    assert_eq!(Packet::decode(b"\x00\x07abc"), Err(BadOpcode(7)));
    assert_eq!(
        Packet::decode(b"GET / HTTP/1.0\r\n"),
        Err(BadOpcode(0x4745))
    );
    assert_eq!(Packet::decode(b"\x00\x01f\x00binary\x00"), Err(BadMode));
    assert_eq!(Packet::decode(b"\x00\x01f\x00\x00"), Err(BadMode));
    assert_eq!(Packet::decode(b"\x00\x02\x00octet\x00"), Err(EmptyFilename));
    assert!(Packet::decode(b"\x00\x01f\x00NetAscii\x00").is_ok());
    assert!(Packet::decode(b"\x00\x01f\x00mail\x00").is_ok());
}

#[test]
fn absurd_options_and_sizes() {
    use DecodeError::*;
    let rrq = |opts: &[u8]| {
        let mut b = b"\x00\x01f\x00octet\x00".to_vec();
        b.extend_from_slice(opts);
        Packet::decode(&b).map(|_| ())
    };
    assert_eq!(
        rrq(b"blksize\x000\x00"),
        Err(BadOptionValue(KnownOption::Blksize))
    );
    assert_eq!(
        rrq(b"blksize\x007\x00"),
        Err(BadOptionValue(KnownOption::Blksize))
    );
    assert_eq!(
        rrq(b"blksize\x0065465\x00"),
        Err(BadOptionValue(KnownOption::Blksize))
    );
    assert_eq!(
        rrq(b"blksize\x00-1\x00"),
        Err(BadOptionValue(KnownOption::Blksize))
    );
    assert_eq!(
        rrq(b"blksize\x00 512\x00"),
        Err(BadOptionValue(KnownOption::Blksize))
    );
    assert_eq!(
        rrq(b"blksize\x00\x00"),
        Err(BadOptionValue(KnownOption::Blksize))
    );
    assert_eq!(
        rrq(b"blksize\x0099999999999999999999999\x00"),
        Err(BadOptionValue(KnownOption::Blksize))
    );
    assert_eq!(
        rrq(b"timeout\x000\x00"),
        Err(BadOptionValue(KnownOption::Timeout))
    );
    assert_eq!(
        rrq(b"timeout\x00256\x00"),
        Err(BadOptionValue(KnownOption::Timeout))
    );
    assert_eq!(
        rrq(b"tsize\x0018446744073709551616\x00"),
        Err(BadOptionValue(KnownOption::Tsize))
    );
    assert_eq!(rrq(b"tsize\x0018446744073709551615\x00"), Ok(()));
    assert_eq!(
        rrq(b"windowsize\x0065536\x00"),
        Err(BadOptionValue(KnownOption::Windowsize))
    );
    assert_eq!(
        rrq(b"blksize\x00512\x00BLKSIZE\x001024\x00"),
        Err(DuplicateOption)
    );
    assert_eq!(rrq(b"\x00512\x00"), Err(BadOptionName));
    let long = [b"x".repeat(33), b"\x001\x00".to_vec()].concat();
    assert_eq!(rrq(&long), Err(BadOptionName));
    let many: Vec<u8> = (0..9)
        .flat_map(|i| format!("o{i}\x00v\x00").into_bytes())
        .collect();
    assert_eq!(rrq(&many), Err(TooManyOptions));
    // Requests over 512 bytes and datagrams over the largest block.
    let mut big = b"\x00\x01".to_vec();
    big.extend_from_slice(&[b'a'; 600]);
    big.extend_from_slice(b"\x00octet\x00");
    assert_eq!(Packet::decode(&big), Err(RequestTooLarge(big.len())));
    let mut data = b"\x00\x03\x00\x01".to_vec();
    data.resize(MAX_DATAGRAM, 0);
    assert!(Packet::decode(&data).is_ok());
    data.push(0);
    assert_eq!(Packet::decode(&data), Err(DataTooLarge(MAX_DATAGRAM + 1)));
}

#[test]
fn encode_rejects_what_decode_would() {
    let p = Packet::Error {
        code: 1,
        message: b"a\0b",
    };
    assert_eq!(p.to_vec(), Err(EncodeError::Nul(Field::ErrorMessage)));
    let p = Packet::Rrq(Request {
        filename: b"",
        mode: Mode::Octet,
        options: Options::new(),
    });
    assert!(p.to_vec().is_err());
    assert!(Packet::Oack(Options::new()).to_vec().is_err());
}

#[test]
fn never_panics_on_any_short_input() {
    // Every 0..=3-byte input and every prefix of valid packets.
    for a in 0..=255u8 {
        for b in 0..=255u8 {
            let _ = Packet::decode(&[a, b]);
            let _ = Packet::decode(&[a, b, 0]);
            let _ = Packet::decode(&[a]);
        }
    }
    let full = b"\x00\x01SEP0011.cnf.xml\x00octet\x00blksize\x001428\x00tsize\x000\x00";
    for n in 0..full.len() {
        let _ = Packet::decode(&full[..n]);
    }
    let oack = b"\x00\x06blksize\x001428\x00";
    for n in 0..oack.len() {
        let _ = Packet::decode(&oack[..n]);
    }
}
