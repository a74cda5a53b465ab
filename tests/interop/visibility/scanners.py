#!/usr/bin/env python3
"""Send one OPTIONS with `User-Agent: friendly-scanner` from each of N spoofed loopback
sources 127.3.x.y (Linux routes all of 127/8 to lo) to TARGET. Bounded: N <= 2000, no waits.

usage: scanners.py TARGET_HOST:PORT N [FIRST]"""
import socket
import sys


def main():
    host, port = sys.argv[1].rsplit(":", 1)
    n = min(int(sys.argv[2]), 2000)
    first = int(sys.argv[3]) if len(sys.argv) > 3 else 0
    for i in range(first, first + n):
        src = "127.3.%d.%d" % (i // 250, i % 250 + 1)
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind((src, 0))
        lport = s.getsockname()[1]
        msg = (
            "OPTIONS sip:100@%s SIP/2.0\r\n"
            "Via: SIP/2.0/UDP %s:%d;branch=z9hG4bK-scan-%d\r\n"
            "Max-Forwards: 70\r\n"
            "From: <sip:100@%s>;tag=s%d\r\n"
            "To: <sip:100@%s>\r\n"
            "Call-ID: scan-%d@%s\r\n"
            "CSeq: 1 OPTIONS\r\n"
            "User-Agent: friendly-scanner\r\n"
            "Content-Length: 0\r\n\r\n"
        ) % (host, src, lport, i, src, i, host, i, src)
        s.sendto(msg.encode(), (host, int(port)))
        s.close()


if __name__ == "__main__":
    main()
