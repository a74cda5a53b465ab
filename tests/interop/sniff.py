#!/usr/bin/python3
"""Capture SIP on the loopback interface as text (and optionally pcap) for failure evidence.

No tcpdump/tshark needed: a raw AF_PACKET socket on "lo" (root).  Prints every UDP datagram and
TCP segment payload to/from the given ports that looks like SIP, with addresses and a timestamp:

    21:32:14.268390 UDP 127.0.0.1:5060 -> 127.0.0.10:5080 (656 bytes)
    BYE sip:1002@127.0.0.3:5063;transport=TCP SIP/2.0
    ...

usage: sniff.py [--pcap FILE] [--ports 5060,5080] [--seconds N] > trace.txt
tests/interop/run.sh runs it with SNIFF=1 (trace in the work dir, printed under failures).
"""
import argparse
import datetime
import signal
import socket
import struct
import sys
import time

ETH_P_ALL = 0x0003


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--pcap")
    ap.add_argument("--ports", default="5060,5080")
    ap.add_argument("--seconds", type=float, default=3600)
    a = ap.parse_args()
    ports = {int(p) for p in a.ports.split(",") if p}

    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.ntohs(ETH_P_ALL))
    s.bind(("lo", 0))
    s.settimeout(0.5)
    pcap = None
    if a.pcap:
        pcap = open(a.pcap, "wb")
        pcap.write(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1))  # LINKTYPE_ETHERNET

    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    signal.signal(signal.SIGINT, lambda *_: stop.append(1))
    deadline = time.time() + a.seconds
    out = sys.stdout
    while not stop and time.time() < deadline:
        try:
            frame, addr = s.recvfrom(65535)
        except socket.timeout:
            continue
        except InterruptedError:
            continue
        # on lo every packet is seen twice (outgoing + incoming): keep the incoming copy
        if addr[2] == socket.PACKET_OUTGOING:
            continue
        now = time.time()
        if len(frame) < 34 or frame[12:14] != b"\x08\x00":
            continue
        ip = frame[14:]
        ihl = (ip[0] & 0x0F) * 4
        proto = ip[9]
        src = socket.inet_ntoa(ip[12:16])
        dst = socket.inet_ntoa(ip[16:20])
        l4 = ip[ihl:]
        if proto == 17 and len(l4) >= 8:
            sport, dport = struct.unpack("!HH", l4[:4])
            payload, kind = l4[8:], "UDP"
        elif proto == 6 and len(l4) >= 20:
            sport, dport = struct.unpack("!HH", l4[:4])
            payload, kind = l4[(l4[12] >> 4) * 4:], "TCP"
        else:
            continue
        if sport not in ports and dport not in ports:
            continue
        if not payload:
            continue
        if pcap:
            sec = int(now)
            pcap.write(struct.pack("<IIII", sec, int((now - sec) * 1e6), len(frame), len(frame)))
            pcap.write(frame)
            pcap.flush()
        ts = datetime.datetime.fromtimestamp(now).strftime("%H:%M:%S.%f")
        text = payload.decode("utf-8", "replace")
        out.write(f"{ts} {kind} {src}:{sport} -> {dst}:{dport} ({len(payload)} bytes)\n")
        out.write(text.replace("\r\n", "\n"))
        if not text.endswith("\r\n\r\n") and not text.endswith("\n"):
            out.write("\n")
        out.write("\n")
        out.flush()
    if pcap:
        pcap.close()


if __name__ == "__main__":
    main()
