//! TFTP codec round trip: whatever decodes must encode (the codec never accepts what it cannot
//! write), and decoding the encoding gives the same packet; encoding is then a fixed point.

#![no_main]

use libfuzzer_sys::fuzz_target;
use sipwarden::tftp::Packet;

fuzz_target!(|data: &[u8]| {
    let Ok(p) = Packet::decode(data) else {
        return;
    };
    let wire = match p.to_vec() {
        Ok(w) => w,
        Err(e) => panic!("decoded {} does not encode: {e}", p.name()),
    };
    let q = match Packet::decode(&wire) {
        Ok(q) => q,
        Err(e) => panic!("encoded {} does not decode: {e}", p.name()),
    };
    assert_eq!(p, q, "round trip changed the packet");
    assert_eq!(q.to_vec().ok(), Some(wire), "encoding is not a fixed point");
});
