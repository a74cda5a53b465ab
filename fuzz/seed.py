#!/usr/bin/env python3
"""Fill fuzz/corpus/<target>/ with seeds: the RFC 4475 torture messages
(tests/fixtures/rfc4475/*.dat, bit-exact) and the hand-written scanner, sipp and phone/PBX
messages in fuzz/seeds/sip/ (LF in the files, sent with CRLF and a correct Content-Length,
except files named lf-*, kept with bare LF), and fuzz/seeds/regressions/<target>/ (inputs that
once failed, as they were). Each target's input format is documented at the top
of its fuzz_targets/*.rs file.
"""

import hashlib
import os
import struct

FUZZ = os.path.dirname(os.path.abspath(__file__))
FIXTURES = os.path.join(FUZZ, "..", "tests", "fixtures", "rfc4475")
SEEDS = os.path.join(FUZZ, "seeds", "sip")

# sip_packet flag bits
PBX, TCP, CONTACT, ROUND = 1, 2, 4, 8


def wire(text: str, name: str) -> bytes:
    eol = "\n" if name.startswith("lf-") else "\r\n"
    head, _, body = text.partition("\n\n")
    body = body.replace("\n", eol) if body else ""
    lines = []
    for line in head.split("\n"):
        key = line.split(":", 1)[0].strip().lower()
        if key in ("content-length", "l"):
            line = f"{line.split(':', 1)[0]}: {len(body.encode())}"
        lines.append(line)
    return (eol.join(lines) + eol + eol + body).encode()


def put(target: str, data: bytes) -> None:
    d = os.path.join(FUZZ, "corpus", target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "seed-" + hashlib.sha1(data).hexdigest()[:16]), "wb") as f:
        f.write(data)


def messages():
    for f in sorted(os.listdir(FIXTURES)):
        if f.endswith(".dat"):
            with open(os.path.join(FIXTURES, f), "rb") as g:
                yield f, g.read()
    for f in sorted(os.listdir(SEEDS)):
        if f.endswith(".sip"):
            with open(os.path.join(SEEDS, f)) as g:
                yield f, wire(g.read(), f)


def tftp_seeds():
    def req(op, name, mode, *opts):
        b = struct.pack(">H", op) + name + b"\0" + mode + b"\0"
        for k, v in opts:
            b += k + b"\0" + v + b"\0"
        return b

    yield req(1, b"SEP001122334455.cnf.xml", b"octet", (b"blksize", b"1428"), (b"tsize", b"0"))
    yield req(1, b"y000000000044.cfg", b"OCTET", (b"timeout", b"5"), (b"windowsize", b"8"))
    yield req(2, b"upload.bin", b"netascii")
    yield req(1, b"../../etc/passwd", b"octet")
    yield struct.pack(">HH", 3, 1) + b"#!version:1.0.0.1\n" * 20
    yield struct.pack(">HH", 4, 7)
    yield struct.pack(">HH", 5, 1) + b"File not found\0"
    yield struct.pack(">H", 6) + b"blksize\x001428\x00tsize\x004096\x00"


def main() -> None:
    count = 0
    msgs = list(messages())
    for name, data in msgs:
        is_response = data.startswith(b"SIP/2.0 ")
        from_pbx = name.startswith("pbx-")
        base = PBX if from_pbx else 0
        for extra in (0, TCP, CONTACT):
            put("sip_packet", bytes([base | extra]) + data)
            count += 1
        if not from_pbx and not is_response:
            # Round trip: forwarded, then answered by the PBX from what it received.
            for extra in (ROUND, ROUND | CONTACT, ROUND | 0x10, ROUND | 0x20):
                put("sip_packet", bytes([extra]) + data)
                count += 1
        if is_response and not from_pbx:
            # The torture responses also as if the PBX sent them.
            put("sip_packet", bytes([PBX]) + data)
    # Streams: messages back to back with keep-alives between, cut by a few seeds.
    for i in range(0, len(msgs) - 1, 2):
        stream = b"\r\n\r\n" + msgs[i][1] + b"\r\n" + msgs[i + 1][1]
        for seed in (1, 0xDEADBEEF, 2**63 + 12345):
            put("tcp_frame", struct.pack("<Q", seed) + stream)
            count += 1
    # Inputs that once failed, kept so a regression shows at once.
    reg = os.path.join(FUZZ, "seeds", "regressions")
    for target in sorted(os.listdir(reg)) if os.path.isdir(reg) else []:
        for f in sorted(os.listdir(os.path.join(reg, target))):
            with open(os.path.join(reg, target, f), "rb") as g:
                put(target, g.read())
                count += 1
    for s in tftp_seeds():
        put("tftp_codec", s)
        count += 1
    print(f"{count} seeds")


if __name__ == "__main__":
    main()
