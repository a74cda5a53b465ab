#!/usr/bin/env python3
"""Read the pcap sngrep saved from HEP and check that both legs of the call are there.

usage: check_pcap.py FILE CALL_ID PHONE PROXY PBX [noise|no-noise]   (addresses as host:port)
Prints one line per message (src -> dst first line) and exits 1 on a missing message. With
"noise" the REGISTER and OPTIONS call.py sent (and their 200s) must be there on both legs too;
with "no-noise" (hep.only = "dialogs") no REGISTER or OPTIONS message may be.
"""
import struct
import sys

path, call_id, phone, proxy, pbx = sys.argv[1:6]
noise = sys.argv[6] if len(sys.argv) > 6 else ""


def packets(data):
    magic = struct.unpack("<I", data[:4])[0]
    endian = "<" if magic in (0xA1B2C3D4, 0xA1B23C4D) else ">"
    linktype = struct.unpack(endian + "I", data[20:24])[0]
    off = 24
    while off + 16 <= len(data):
        _, _, incl, _ = struct.unpack(endian + "IIII", data[off:off + 16])
        off += 16
        yield linktype, data[off:off + incl]
        off += incl


def parse(link, frame):
    if link == 1:  # Ethernet
        frame = frame[14:]
    elif link == 113:  # Linux cooked
        frame = frame[16:]
    elif link == 276:  # Linux cooked v2
        frame = frame[20:]
    if not frame or frame[0] >> 4 != 4:
        return None
    ihl = (frame[0] & 15) * 4
    proto = frame[9]
    src = ".".join(map(str, frame[12:16]))
    dst = ".".join(map(str, frame[16:20]))
    l4 = frame[ihl:]
    sp, dp = struct.unpack(">HH", l4[:4])
    payload = l4[8:] if proto == 17 else l4[(l4[12] >> 4) * 4:]
    return f"{src}:{sp}", f"{dst}:{dp}", payload


msgs = []
with open(path, "rb") as f:
    for link, frame in packets(f.read()):
        p = parse(link, frame)
        if p:
            msgs.append(p)
CRLF = b"\r\n"
for s, d, pl in msgs:
    first_line = pl.split(CRLF, 1)[0].decode(errors="replace")
    print(f"{s} -> {d}  {first_line}")

want = []
for first in ("INVITE", "SIP/2.0 100", "SIP/2.0 180", "SIP/2.0 200", "ACK", "BYE"):
    if first.startswith("SIP/2.0"):
        legs = [(pbx, proxy), (proxy, phone)]
    else:
        legs = [(phone, proxy), (proxy, pbx)]
    for s, d in legs:
        want.append((s, d, first))
if noise == "noise":
    for method, cid in (("REGISTER", "noise-reg-"), ("OPTIONS", "noise-opt-")):
        for first, legs in ((method, [(phone, proxy), (proxy, pbx)]), ("SIP/2.0 200", [(pbx, proxy), (proxy, phone)])):
            for s, d in legs:
                want.append((s, d, first, cid + call_id))
want = [w if len(w) == 4 else (*w, call_id) for w in want]
missing = []
for s, d, first, cid in want:
    ok = any(ms == s and md == d and pl.startswith(first.encode()) and f"Call-ID: {cid}\r\n".encode() in pl
             for ms, md, pl in msgs)
    if not ok:
        missing.append(f"{first} {s} -> {d}")
if noise == "no-noise":
    for ms, md, pl in msgs:
        head = pl.split(CRLF + CRLF, 1)[0]
        if head.startswith((b"REGISTER", b"OPTIONS")) or b" REGISTER\r\n" in head or b" OPTIONS\r\n" in head:
            missing.append(f"UNEXPECTED (hep.only = dialogs): {ms} -> {md} {pl.split(CRLF, 1)[0].decode(errors='replace')}")
if missing:
    print("MISSING:", *missing, sep="\n  ")
    sys.exit(1)
print(f"ok: {len(want)} expected messages of both legs with Call-ID {call_id}")
