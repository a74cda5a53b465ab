#!/usr/bin/env python3
"""Attack and probe tools for tests/interop/hardening.sh (loopback only, every loop bounded).

Subcommands (each prints one JSON object on stdout as its last line):
  send      raw SIP messages from a file ({n} = 1..count, {bind}/{port} = our address,
            {rnd} = 16 random hex digits, {proto} = UDP or TCP), UDP or
            one TCP connection each; records the answers
  guess     digest password guesser for any method: answers each 401/407 with a new wrong
            password (--const keeps Call-ID and CSeq constant); stops when unanswered
  register  one authenticated REGISTER (right password) with a chosen Contact; prints the code
  udplisten record every datagram reaching an address for some seconds
  tcpphone  a TCP phone: connects from an address, sends a REGISTER, records all it receives
  tcphold   open N TCP connections from an address, say how many sipwarden closed at once
  tcpflood  P TCP peers that each send N OPTIONS and never read (--max-forwards 0: sipwarden
            answers each itself, 483)
  scanners  one friendly-scanner OPTIONS from each of N distinct source addresses
"""

import argparse
import hashlib
import json
import random
import re
import socket
import sys
import threading
import time

SW = ("127.0.0.1", 5160)
REALM = "sipwarden.test"


def addr(s, default_port=0):
    host, _, port = s.rpartition(":")
    if not host:
        return (s, default_port)
    return (host, int(port))


def rnd():
    return "%016x" % random.getrandbits(64)


def status(data):
    m = re.match(rb"SIP/2\.0 (\d{3})", data)
    return int(m.group(1)) if m else 0


def header(data, name):
    m = re.search(rb"\r\n" + name.encode() + rb":\s*([^\r\n]*)", data, re.I)
    return m.group(1).decode("utf-8", "replace") if m else ""


def digest(user, password, method, uri, chal):
    def p(k):
        m = re.search(k + r'="?([^",]*)"?', chal)
        return m.group(1) if m else ""

    realm, nonce, qop = p("realm"), p("nonce"), p("qop")
    ha1 = hashlib.md5(f"{user}:{realm}:{password}".encode()).hexdigest()
    ha2 = hashlib.md5(f"{method}:{uri}".encode()).hexdigest()
    if "auth" in qop.split(","):
        nc, cnonce = "00000001", rnd()[:8]
        resp = hashlib.md5(f"{ha1}:{nonce}:{nc}:{cnonce}:auth:{ha2}".encode()).hexdigest()
        extra = f", qop=auth, nc={nc}, cnonce=\"{cnonce}\""
    else:
        resp = hashlib.md5(f"{ha1}:{nonce}:{ha2}".encode()).hexdigest()
        extra = ""
    return (f'Digest username="{user}", realm="{realm}", nonce="{nonce}", uri="{uri}", '
            f'response="{resp}", algorithm=MD5{extra}')


class Udp:
    def __init__(self, bind):
        self.s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.s.bind(bind)
        self.local = self.s.getsockname()

    def send(self, data, to=SW):
        self.s.sendto(data, to)

    def recv(self, timeout):
        """The next final (>= 200) answer, or None after timeout seconds."""
        end = time.time() + timeout
        while True:
            left = end - time.time()
            if left <= 0:
                return None
            self.s.settimeout(left)
            try:
                data, _ = self.s.recvfrom(65535)
            except (socket.timeout, OSError):
                return None
            if status(data) >= 200:
                return data


def request(method, ruri, user, local, proto, call_id, cseq, auth=None, contact=None,
            ua="hardening-guesser", extra=""):
    host, port = local
    lines = [
        f"{method} {ruri} SIP/2.0",
        f"Via: SIP/2.0/{proto} {host}:{port};branch=z9hG4bK{rnd()};rport",
        "Max-Forwards: 70",
        f"From: <sip:{user}@{REALM}>;tag={rnd()[:10]}",
        f"To: <sip:{user if method == 'REGISTER' else '1002'}@{REALM}>",
        f"Call-ID: {call_id}",
        f"CSeq: {cseq} {method}",
        f"Contact: {contact or f'<sip:{user}@{host}:{port}>'}",
        f"User-Agent: {ua}",
    ]
    if method == "REGISTER":
        lines.append("Expires: 60")
    if method in ("NOTIFY",):
        lines += ["Event: presence", "Subscription-State: active"]
    if method == "REFER":
        lines.append(f"Refer-To: <sip:1003@{REALM}>")
    if method == "PUBLISH":
        lines.append("Event: presence")
    if auth:
        name = "Authorization" if method == "REGISTER" else "Proxy-Authorization"
        lines.append(f"{name}: {auth}")
    if extra:
        lines.append(extra)
    lines += ["Content-Length: 0", "", ""]
    return "\r\n".join(lines).encode()


def cmd_guess(a):
    u = Udp(addr(a.bind))
    ruri = f"sip:{REALM}" if a.method == "REGISTER" else f"sip:1002@{REALM}"
    call_id, cseq = rnd() + "@guess", 1
    codes, attempts, chal, stopped = {}, 0, None, "max"
    # first request without credentials: the challenge
    u.send(request(a.method, ruri, a.user, u.local, "UDP", call_id, cseq))
    r = u.recv(2)
    if r is None:
        print(json.dumps({"attempts": 0, "codes": {}, "stopped": "no challenge"}))
        return
    codes[status(r)] = codes.get(status(r), 0) + 1
    chal = header(r, "WWW-Authenticate") or header(r, "Proxy-Authenticate")
    if not chal:
        print(json.dumps({"attempts": 0, "codes": codes, "stopped": f"answer {status(r)}"}))
        return
    for i in range(a.max):
        if not a.const:
            cseq += 1
            call_id = call_id if a.method == "REGISTER" else rnd() + "@guess"
        auth = digest(a.user, f"wrong{i}{rnd()[:4]}", a.method, ruri, chal)
        u.send(request(a.method, ruri, a.user, u.local, "UDP", call_id, cseq, auth=auth))
        attempts += 1
        r = u.recv(a.timeout)
        if r is None:
            stopped = f"unanswered at attempt {attempts}"
            break
        c = status(r)
        codes[c] = codes.get(c, 0) + 1
        new = header(r, "WWW-Authenticate") or header(r, "Proxy-Authenticate")
        chal = new or chal
        time.sleep(a.gap)
    fails = sum(n for c, n in codes.items() if c in (401, 403, 407)) - 1
    print(json.dumps({"attempts": attempts, "failures_seen": fails, "codes": codes,
                      "stopped": stopped}))


def cmd_register(a):
    u = Udp(addr(a.bind))
    ruri = f"sip:{REALM}"
    call_id = rnd() + "@reg"
    u.send(request("REGISTER", ruri, a.user, u.local, "UDP", call_id, 1, contact=a.contact,
                   ua="hardening-phone"))
    r = u.recv(3)
    code = status(r) if r else 0
    if code == 401:
        auth = digest(a.user, a.password, "REGISTER", ruri, header(r, "WWW-Authenticate"))
        u.send(request("REGISTER", ruri, a.user, u.local, "UDP", call_id, 2, auth=auth,
                       contact=a.contact, ua="hardening-phone"))
        r = u.recv(3)
        code = status(r) if r else 0
    print(json.dumps({"code": code, "contact": header(r, "Contact") if r else ""}))


def render(tmpl, n, local, proto):
    return (tmpl.replace("{n}", str(n)).replace("{proto}", proto.upper()).replace("{bind}", local[0])
            .replace("{port}", str(local[1])).replace("{rnd}", rnd())
            .replace("\r\n", "\n").replace("\n", "\r\n").encode())


def cmd_send(a):
    tmpl = open(a.file, encoding="utf-8").read()
    to = addr(a.to)
    answers = []
    if a.proto == "udp":
        u = Udp(addr(a.bind))
        for n in range(1, a.count + 1):
            u.send(render(tmpl, n, u.local, a.proto), to)
            time.sleep(a.gap)
        end = time.time() + a.wait
        while time.time() < end:
            r = u.recv(max(0.01, end - time.time()))
            if r:
                answers.append(status(r))
    else:
        for n in range(1, a.count + 1):
            s = socket.socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(addr(a.bind))
            s.settimeout(2)
            try:
                s.connect(to)
                s.sendall(render(tmpl, n, s.getsockname(), a.proto))
                s.settimeout(a.wait)
                data = s.recv(65535)
                answers.append(status(data) if data else -1)  # -1: closed by sipwarden
            except socket.timeout:
                pass
            except OSError as e:
                answers.append(f"error {e.errno}")
            finally:
                s.close()
            time.sleep(a.gap)
    print(json.dumps({"sent": a.count, "answers": answers}))


def cmd_udplisten(a):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(addr(a.bind))
    got = []
    end = time.time() + a.seconds
    with open(a.out, "w", encoding="utf-8") as f:
        while time.time() < end:
            s.settimeout(max(0.01, end - time.time()))
            try:
                data, src = s.recvfrom(65535)
            except socket.timeout:
                continue
            got.append(src)
            f.write(f"--- from {src[0]}:{src[1]}\n{data.decode('utf-8', 'replace')}\n")
            f.flush()
    print(json.dumps({"datagrams": len(got)}))


def cmd_tcpphone(a):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(addr(a.bind))
    s.settimeout(2)
    s.connect(SW)
    local = s.getsockname()
    s.sendall(request("REGISTER", f"sip:{REALM}", a.user, local, "TCP", rnd() + "@tcpphone", 1,
                      contact=f"<sip:{a.user}@{local[0]}:{local[1]};transport=tcp>",
                      ua="hardening-phone"))
    total = b""
    end = time.time() + a.seconds
    with open(a.out, "wb") as f:
        while time.time() < end:
            s.settimeout(max(0.01, end - time.time()))
            try:
                data = s.recv(65535)
            except socket.timeout:
                continue
            if not data:
                break
            total += data
            f.write(data)
            f.flush()
    print(json.dumps({"bytes": len(total), "responses": len(re.findall(rb"SIP/2\.0 \d{3}", total))}))


def cmd_tcphold(a):
    socks, closed, refused = [], 0, 0
    for _ in range(a.count):
        s = socket.socket()
        s.bind((a.bind, 0))
        s.settimeout(2)
        try:
            s.connect(SW)
        except OSError:
            refused += 1
            s.close()
            continue
        socks.append(s)
    time.sleep(a.wait)
    for s in socks:
        s.setblocking(False)
        try:
            data = s.recv(1)
            if data == b"":
                closed += 1
        except BlockingIOError:
            pass
        except OSError:
            closed += 1
        s.close()
    print(json.dumps({"opened": len(socks), "refused": refused, "closed_by_peer": closed,
                      "kept_open": len(socks) - closed}))


def cmd_tcpflood(a):
    pad = "x" * a.pad
    results = [None] * a.peers

    def peer(i):
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.bind((f"{a.base}.{i + 1}", 0))
        s.settimeout(5)
        sent = 0
        try:
            s.connect(SW)
            host, port = s.getsockname()
            for n in range(a.count):
                msg = (f"OPTIONS sip:127.0.0.1:5160 SIP/2.0\r\n"
                       f"Via: SIP/2.0/TCP {host}:{port};branch=z9hG4bK{i}x{n}x{rnd()};rport\r\n"
                       f"Max-Forwards: {a.max_forwards}\r\nFrom: \"{pad}\" <sip:flood{i}@{REALM}>;tag={n}\r\n"
                       f"To: <sip:{REALM}>\r\nCall-ID: flood{i}-{n}@{host}\r\n"
                       f"CSeq: {n + 1} OPTIONS\r\nUser-Agent: hardening-tcp-peer\r\n"
                       f"Content-Length: 0\r\n\r\n").encode()
                s.sendall(msg)
                sent += 1
            results[i] = {"sent": sent}
        except OSError as e:
            results[i] = {"sent": sent, "error": str(e)}
        # never read; keep the connection until the deadline
        time.sleep(max(0, deadline - time.time()))
        s.close()

    deadline = time.time() + a.hold
    ts = [threading.Thread(target=peer, args=(i,)) for i in range(a.peers)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(a.hold + 30)
    print(json.dumps({"peers": results}))


def cmd_scanners(a):
    sent = 0
    for i in range(a.count):
        ip = f"{a.base}.{i // 250}.{i % 250 + 1}"
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            s.bind((ip, a.port))
            msg = request("OPTIONS", "sip:100@127.0.0.1:5160", "100", (ip, a.port), "UDP",
                          rnd() + "@scan", 1, ua="friendly-scanner")
            s.sendto(msg, SW)
            sent += 1
        finally:
            s.close()
        if a.gap:
            time.sleep(a.gap)
    print(json.dumps({"sent": sent}))


def main():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("guess")
    g.add_argument("--bind", required=True)
    g.add_argument("--method", default="REGISTER")
    g.add_argument("--user", default="1001")
    g.add_argument("--max", type=int, default=30)
    g.add_argument("--const", action="store_true")
    g.add_argument("--timeout", type=float, default=1.5)
    g.add_argument("--gap", type=float, default=0.05)
    r = sub.add_parser("register")
    r.add_argument("--bind", required=True)
    r.add_argument("--user", required=True)
    r.add_argument("--password", required=True)
    r.add_argument("--contact", required=True)
    s = sub.add_parser("send")
    s.add_argument("--bind", required=True)
    s.add_argument("--to", default="127.0.0.1:5160")
    s.add_argument("--proto", choices=["udp", "tcp"], default="udp")
    s.add_argument("--file", required=True)
    s.add_argument("--count", type=int, default=1)
    s.add_argument("--wait", type=float, default=1.0)
    s.add_argument("--gap", type=float, default=0.02)
    u = sub.add_parser("udplisten")
    u.add_argument("--bind", required=True)
    u.add_argument("--seconds", type=float, required=True)
    u.add_argument("--out", required=True)
    t = sub.add_parser("tcpphone")
    t.add_argument("--bind", required=True)
    t.add_argument("--user", default="1004")
    t.add_argument("--seconds", type=float, required=True)
    t.add_argument("--out", required=True)
    h = sub.add_parser("tcphold")
    h.add_argument("--bind", required=True)
    h.add_argument("--count", type=int, default=4)
    h.add_argument("--wait", type=float, default=1.0)
    f = sub.add_parser("tcpflood")
    f.add_argument("--base", default="127.0.4")
    f.add_argument("--peers", type=int, default=16)
    f.add_argument("--count", type=int, default=3000)
    f.add_argument("--pad", type=int, default=1000)
    f.add_argument("--hold", type=float, default=30)
    f.add_argument("--max-forwards", type=int, default=70)
    c = sub.add_parser("scanners")
    c.add_argument("--base", default="127.3")
    c.add_argument("--count", type=int, default=200)
    c.add_argument("--port", type=int, default=6170)
    c.add_argument("--gap", type=float, default=0.002)
    a = p.parse_args()
    {"guess": cmd_guess, "register": cmd_register, "send": cmd_send, "udplisten": cmd_udplisten,
     "tcpphone": cmd_tcpphone, "tcphold": cmd_tcphold, "tcpflood": cmd_tcpflood,
     "scanners": cmd_scanners}[a.cmd](a)


if __name__ == "__main__":
    sys.exit(main())
