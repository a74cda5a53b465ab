#!/usr/bin/env python3
"""A small TFTP client for tests/interop/tftp.sh: the real clients (tftp-hpa, atftp) cannot
bind a source address, and a guessing loop needs short timeouts.

  tftp_client.py get HOST PORT NAME OUT [--bind IP] [--blksize N] [--timeout S]
      exit 0: file written; 2: the server answered ERROR (printed); 3: no answer
  tftp_client.py guess HOST PORT [--bind IP] [--count N] [--timeout S]
      sends N read requests for made-up phone config names, one at a time, waiting up to S for
      each answer; prints "answered=A not_found=F silent=S first_silent=I"
  tftp_client.py junk HOST PORT [--bind IP]
      sends malformed datagrams
"""
import argparse
import socket
import struct
import sys
import time


def rrq(name, blksize=None):
    pkt = struct.pack("!H", 1) + name.encode() + b"\0octet\0"
    if blksize:
        pkt += b"blksize\0" + str(blksize).encode() + b"\0"
    return pkt


def get(a):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((a.bind, 0))
    s.settimeout(a.timeout)
    s.sendto(rrq(a.name, a.blksize), (a.host, a.port))
    blk, expect, out, tid = 512, 1, bytearray(), None
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            data, peer = s.recvfrom(70000)
        except socket.timeout:
            print("no answer", file=sys.stderr)
            return 3
        if tid is None:
            tid = peer
        elif peer != tid:
            continue
        op = struct.unpack("!H", data[:2])[0]
        if op == 6:  # OACK
            opts = data[2:].split(b"\0")
            d = dict(zip(opts[0::2], opts[1::2]))
            blk = int(d.get(b"blksize", b"512"))
            s.sendto(struct.pack("!HH", 4, 0), tid)
        elif op == 3:
            block = struct.unpack("!H", data[2:4])[0]
            if block == expect:
                out += data[4:]
                expect = (expect + 1) % 65536
            s.sendto(struct.pack("!HH", 4, block), tid)
            if len(data) - 4 < blk:
                with open(a.out, "wb") as f:
                    f.write(out)
                return 0
        elif op == 5:
            code = struct.unpack("!H", data[2:4])[0]
            print("ERROR %d %s" % (code, data[4:].rstrip(b"\0").decode(errors="replace")))
            return 2
    return 3


def guess(a):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((a.bind, 0))
    s.settimeout(a.timeout)
    answered = not_found = silent = 0
    first_silent = -1
    patterns = ["SEP%012X.cnf.xml", "cfg%012x.xml", "%012x.cfg"]
    for i in range(a.count):
        mac = 0x001565000000 + i * 7919
        name = patterns[i % 3] % mac
        s.sendto(rrq(name), (a.host, a.port))
        try:
            data, _ = s.recvfrom(70000)
            answered += 1
            if data[:4] == b"\x00\x05\x00\x01":
                not_found += 1
        except socket.timeout:
            silent += 1
            if first_silent < 0:
                first_silent = i
    print("answered=%d not_found=%d silent=%d first_silent=%d" % (answered, not_found, silent, first_silent))
    return 0


def junk(a):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((a.bind, 0))
    for pkt in [
        b"\x00\x01no-terminator",
        b"\x00\x01f\x00binary\x00",
        b"\x00\x09xyz",
        b"\x00\x01f\x00octet\x00blksize\x00999999\x00",
        b"GET / HTTP/1.0\r\n\r\n",
        b"\x00\x01" + b"A" * 1400 + b"\x00octet\x00",
    ]:
        s.sendto(pkt, (a.host, a.port))
    return 0


def main():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("get", "guess", "junk"):
        c = sub.add_parser(name)
        c.add_argument("host")
        c.add_argument("port", type=int)
        if name == "get":
            c.add_argument("name")
            c.add_argument("out")
            c.add_argument("--blksize", type=int)
        if name == "guess":
            c.add_argument("--count", type=int, default=300)
        c.add_argument("--bind", default="127.0.0.1")
        c.add_argument("--timeout", type=float, default=2.0)
    a = p.parse_args()
    return {"get": get, "guess": guess, "junk": junk}[a.cmd](a)


if __name__ == "__main__":
    sys.exit(main())
