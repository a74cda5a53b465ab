#!/usr/bin/env python3
"""A TLS handshake flood from one address: connections that never send a byte (held open) and
connections that send garbage instead of a ClientHello. Bounded in count and time."""
import argparse
import socket
import time

ap = argparse.ArgumentParser()
ap.add_argument("--src", required=True)
ap.add_argument("--to", required=True)  # host:port
ap.add_argument("--silent", type=int, default=20)
ap.add_argument("--garbage", type=int, default=30)
ap.add_argument("--hold", type=float, default=6.0)
a = ap.parse_args()
host, port = a.to.rsplit(":", 1)
port = int(port)
held, refused, sent = [], 0, 0


def conn():
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(2)
    s.bind((a.src, 0))
    s.connect((host, port))
    return s


def garbage(n):
    global sent, refused
    for _ in range(n):
        try:
            s = conn()
            s.sendall(b"OPTIONS sip:x SIP/2.0\r\n\r\n" + b"\x16\x03\x01\x00\x05hello")
            sent += 1
            try:
                s.recv(64)
            except OSError:
                pass
            s.close()
        except OSError:
            refused += 1


# A few that fail, then the silent ones (over the in-handshake cap), then the rest failing.
garbage(min(3, a.garbage))
for _ in range(a.silent):
    try:
        held.append(conn())
    except OSError:
        refused += 1
garbage(a.garbage - min(3, a.garbage))
time.sleep(a.hold)
for s in held:
    s.close()
print(f"held {len(held)} silent, sent garbage on {sent}, refused {refused}")
