#!/usr/bin/python3
"""A scripted SIP phone and caller for tests/interop/routing.sh (loopback only, bounded in time).

  sipua.py phone --user 1003 --password secret1003 --local 127.0.4.2:6202 --proxy 127.0.0.1:5260
                 [--transport udp|tcp] [--contact URI] [--via HOST:PORT] [--ring-only]
                 [--register-only] [--reregister SECS] [--reconnect-when FILE] --log FILE
      Registers with digest auth (401), answers INVITEs (100, 180, 200; --ring-only: 100, 180 and
      then 200 + 487 on CANCEL), takes ACK, BYE, CANCEL, OPTIONS.  Over TCP it opens ONE
      connection and receives its calls on it; when the connection drops it logs CONN-LOST and,
      once FILE.N exists (--reconnect-when FILE; N counts the losses), opens a new one and registers again.
  sipua.py call --user 1001 --password secret1001 --local 127.0.4.1:6201 --proxy 127.0.0.1:5260
                --to 1003 [--hold SECS | --hold-until FILE] --log FILE
      One authenticated call (INVITE, 407, ACK, INVITE with credentials); on 200: ACK, hold,
      BYE.  On a final non-2xx: ACK and exit.  Exit code 0 only for a call completed with BYE 200.

The log has one event a line, "<unix time> EVENT args": REGISTERED, REGISTER-FAILED, RECV (every
message received: method or status, Call-ID, CSeq), CONNECTED, CONN-LOST, ANSWERED, ACK, BYE,
CANCEL, FINAL <code> <seconds since the authenticated INVITE>, BYE-RESULT <code>.  Full messages
go to the log file + ".msgs".
"""
import argparse
import hashlib
import os
import random
import re
import select
import socket
import sys
import time

COMPACT = {"v": "via", "f": "from", "t": "to", "i": "call-id", "m": "contact", "l": "content-length",
           "c": "content-type", "k": "supported"}
SDP = ("v=0\r\no=- 1 1 IN IP4 {ip}\r\ns=-\r\nc=IN IP4 {ip}\r\nt=0 0\r\n"
       "m=audio 40000 RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\n")
MAX_MSG = 65536  # a peer can not make us buffer more than this on the TCP connection


class Msg:
    def __init__(self, raw):
        self.raw = raw
        text = raw.decode("utf-8", "replace")
        head, _, self.body = text.partition("\r\n\r\n")
        lines = head.split("\r\n")
        self.first = lines[0]
        self.headers = []  # (lowercase full name, original line, value)
        for ln in lines[1:]:
            if ":" not in ln:
                continue
            name, _, val = ln.partition(":")
            n = name.strip().lower()
            self.headers.append((COMPACT.get(n, n), ln, val.strip()))
        parts = self.first.split(" ", 2)
        self.is_response = parts[0].startswith("SIP/")
        self.code = int(parts[1]) if self.is_response and len(parts) > 1 and parts[1].isdigit() else 0
        self.method = None if self.is_response else parts[0]
        self.ruri = None if self.is_response or len(parts) < 2 else parts[1]

    def get(self, name):
        for n, _, v in self.headers:
            if n == name:
                return v
        return ""

    def lines(self, name):
        return [ln for n, ln, _ in self.headers if n == name]

    def values(self, name):
        return [v for n, _, v in self.headers if n == name]

    def cseq(self):
        c = self.get("cseq").split()
        return (int(c[0]) if c and c[0].isdigit() else 0, c[1] if len(c) > 1 else "")

    def branch(self):
        m = re.search(r";\s*branch=([^;,\s]+)", self.get("via"))
        return m.group(1) if m else ""


def frame(buf):
    """Split one message off a TCP stream buffer: (message or None, rest)."""
    while buf.startswith(b"\r\n"):
        buf = buf[2:]
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        return None, buf
    m = re.search(rb"\r\n(?:content-length|l)[ \t]*:[ \t]*(\d+)", buf[:end + 2], re.I)
    n = int(m.group(1)) if m else 0
    total = end + 4 + n
    if len(buf) < total:
        return None, buf
    return buf[:total], buf[total:]


def rand(n=10):
    return "".join(random.choice("0123456789abcdef") for _ in range(n))


def digest(chal, user, password, method, uri):
    p = dict(re.findall(r'(\w+)="?([^",]*)"?', chal))
    ha1 = hashlib.md5(f"{user}:{p.get('realm', '')}:{password}".encode()).hexdigest()
    ha2 = hashlib.md5(f"{method}:{uri}".encode()).hexdigest()
    nonce = p.get("nonce", "")
    s = f'Digest username="{user}", realm="{p.get("realm", "")}", nonce="{nonce}", uri="{uri}"'
    if "auth" in p.get("qop", "").split(","):
        cn, nc = rand(8), "00000001"
        r = hashlib.md5(f"{ha1}:{nonce}:{nc}:{cn}:auth:{ha2}".encode()).hexdigest()
        s += f', qop=auth, nc={nc}, cnonce="{cn}"'
    else:
        r = hashlib.md5(f"{ha1}:{nonce}:{ha2}".encode()).hexdigest()
    s += f', response="{r}", algorithm=MD5'
    if "opaque" in p:
        s += f', opaque="{p["opaque"]}"'
    return s


class Endpoint:
    def __init__(self, a):
        self.a = a
        self.log_f = open(a.log, "a", buffering=1)
        self.msgs_f = open(a.log + ".msgs", "a", buffering=1)
        self.lip, lport = a.local.rsplit(":", 1)
        self.lport = int(lport)
        ph, pp = a.proxy.rsplit(":", 1)
        self.proxy = (ph, int(pp))
        self.tcp = a.transport == "tcp"
        self.sock = None
        self.buf = b""
        self.deadline = time.time() + a.seconds
        self.timers = []  # [due, interval, count, data, key]

    def log(self, *words):
        self.log_f.write("%.3f %s\n" % (time.time(), " ".join(str(w) for w in words)))

    def open(self, port=None):
        port = self.lport if port is None else port
        if self.tcp:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((self.lip, port))
            s.settimeout(3)
            s.connect(self.proxy)
            s.settimeout(None)
        else:
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.bind((self.lip, port))
        self.sock = s
        self.buf = b""
        self.lport = s.getsockname()[1]
        self.log("CONNECTED" if self.tcp else "BOUND", "%s:%d" % (self.lip, self.lport))

    @property
    def proto(self):
        return "TCP" if self.tcp else "UDP"

    def send(self, data, to=None):
        self.msgs_f.write(">>> %.3f sent\n%s\n" % (time.time(), data.replace("\r\n", "\n")))
        raw = data.encode()
        try:
            if self.tcp:
                self.sock.sendall(raw)
            else:
                self.sock.sendto(raw, to or self.proxy)
        except OSError as e:
            self.log("SEND-ERROR", e)

    def retransmit(self, key, data, to=None):
        """Send and, over UDP, retransmit (T1 = 0.5 s doubling to 4 s) until cancel(key)."""
        self.send(data, to)
        if not self.tcp:
            self.timers.append([time.time() + 0.5, 0.5, 8, data, key, to])

    def cancel(self, key):
        self.timers = [t for t in self.timers if t[4] != key]

    def tick(self):
        now = time.time()
        for t in list(self.timers):
            if t[0] <= now:
                self.send(t[3], t[5])
                t[1], t[2] = min(t[1] * 2, 4), t[2] - 1
                t[0] = now + t[1]
                if t[2] <= 0:
                    self.timers.remove(t)

    def recv(self, timeout):
        """One message (Msg, source) or (None, None) on timeout; raises ConnectionError on EOF."""
        if self.tcp:
            m, self.buf = frame(self.buf)
            if m is not None:
                return self.got(m, self.proxy)
        r, _, _ = select.select([self.sock], [], [], max(0.0, timeout))
        if not r:
            return None, None
        if self.tcp:
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("closed")
            self.buf += data
            if len(self.buf) > MAX_MSG:
                raise ConnectionError("oversized message")
            m, self.buf = frame(self.buf)
            return self.got(m, self.proxy) if m is not None else (None, None)
        data, src = self.sock.recvfrom(65536)
        return self.got(data, src)

    def got(self, raw, src):
        m = Msg(raw)
        self.msgs_f.write("<<< %.3f from %s:%d\n%s\n" % (time.time(), src[0], src[1],
                                                        raw.decode("utf-8", "replace").replace("\r\n", "\n")))
        what = m.code if m.is_response else m.method
        self.log("RECV", what, m.get("call-id"), m.get("cseq").replace(" ", "/"))
        return m, src

    def via(self, branch):
        host = self.a.via or "%s:%d" % (self.lip, self.lport)
        return f"Via: SIP/2.0/{self.proto} {host};branch={branch};rport"

    def contact(self):
        if self.a.contact:
            return self.a.contact
        t = ";transport=tcp" if self.tcp else ""
        return f"sip:{self.a.user}@{self.lip}:{self.lport}{t}"


def response(req, code, reason, totag=None, extra="", body=""):
    lines = [f"SIP/2.0 {code} {reason}"]
    lines += req.lines("via")
    lines += req.lines("from")
    to = req.lines("to")[0] if req.lines("to") else "To: <sip:unknown@invalid>"
    if totag and ";tag=" not in to:
        to += f";tag={totag}"
    lines.append(to)
    lines += req.lines("call-id") + req.lines("cseq")
    if extra:
        lines.append(extra.rstrip("\r\n"))
    if body:
        lines.append("Content-Type: application/sdp")
    lines.append(f"Content-Length: {len(body.encode())}")
    return "\r\n".join(lines) + "\r\n\r\n" + body


class Phone(Endpoint):
    def __init__(self, a):
        super().__init__(a)
        self.reg_callid = rand(16) + "@reg"
        self.reg_tag = rand(8)
        self.cseq = 0
        self.registered = 0
        self.sent_auth = False
        self.losses = 0
        self.last_reg = 0
        self.calls = {}  # call-id -> {"tag", "invite", "last", "state"}

    def register(self, auth=None):
        self.cseq += 1
        self.last_reg = time.time()
        branch = "z9hG4bK" + rand(16)
        uri = "sip:%s:%d" % self.proxy
        msg = [f"REGISTER {uri} SIP/2.0", self.via(branch), "Max-Forwards: 70",
               f"From: <sip:{self.a.user}@sipwarden.test>;tag={self.reg_tag}",
               f"To: <sip:{self.a.user}@sipwarden.test>", f"Call-ID: {self.reg_callid}",
               f"CSeq: {self.cseq} REGISTER", f"Contact: <{self.contact()}>",
               f"Expires: {self.a.expires}", "User-Agent: sipwarden-routing-phone"]
        if auth:
            msg.append("Authorization: " + digest(auth, self.a.user, self.a.password, "REGISTER", uri))
        msg.append("Content-Length: 0")
        self.sent_auth = auth is not None
        self.cancel("reg")
        self.retransmit("reg", "\r\n".join(msg) + "\r\n\r\n")

    def on_response(self, m):
        n, meth = m.cseq()
        if meth != "REGISTER" or m.get("call-id") != self.reg_callid or n != self.cseq:
            return
        if m.code < 200:
            return
        self.cancel("reg")
        if m.code == 401 and not self.sent_auth:
            self.register(m.get("www-authenticate"))
        elif m.code == 200:
            self.registered += 1
            self.log("REGISTERED", self.registered, "contact", self.contact())
        else:
            self.log("REGISTER-FAILED", m.code)

    def on_request(self, m, src):
        cid = m.get("call-id")
        meth = m.method
        c = self.calls.get(cid)
        if meth == "INVITE":
            if c and c["branch"] == m.branch():
                if c["last"]:
                    self.send(c["last"], src)  # a retransmission: our last answer again
                return
            tag = rand(8)
            c = self.calls[cid] = {"tag": tag, "invite": m, "last": None, "branch": m.branch(),
                                   "state": "ringing", "src": src}
            self.log("INVITE", cid)
            self.send(response(m, 100, "Trying"), src)
            rr = "\r\n".join(m.lines("record-route"))
            ctc = f"Contact: <{self.contact()}>"
            self.send(response(m, 180, "Ringing", tag, "\r\n".join(x for x in (rr, ctc) if x)), src)
            if not self.a.ring_only:
                body = SDP.format(ip=self.lip)
                c["last"] = response(m, 200, "OK", tag, "\r\n".join(x for x in (rr, ctc) if x), body)
                c["state"] = "answered"
                self.log("ANSWERED", cid)
                self.retransmit("inv:" + cid, c["last"], src)
        elif meth == "ACK":
            self.log("ACK", cid, "for", c["state"] if c else "unknown-call")
            self.cancel("inv:" + cid)
        elif meth == "CANCEL":
            self.log("CANCEL", cid)
            self.send(response(m, 200, "OK", c["tag"] if c else rand(8)), src)
            if c and c["state"] == "ringing":
                c["state"] = "cancelled"
                c["last"] = response(c["invite"], 487, "Request Terminated", c["tag"])
                self.retransmit("inv:" + cid, c["last"], src)
        elif meth == "BYE":
            self.log("BYE", cid)
            self.send(response(m, 200, "OK"), src)
        else:
            self.send(response(m, 200 if meth == "OPTIONS" else 405,
                               "OK" if meth == "OPTIONS" else "Method Not Allowed"), src)

    def run(self):
        self.open()
        self.register()
        while time.time() < self.deadline:
            if self.a.register_only and self.registered:
                return 0
            if self.a.reregister and self.registered and time.time() - self.last_reg > self.a.reregister:
                self.register()
            try:
                m, src = self.recv(0.1)
            except (ConnectionError, OSError) as e:
                self.log("CONN-LOST", e)
                self.sock.close()
                self.timers = []
                if not self.reconnect():
                    return 1
                continue
            self.tick()
            if m is None:
                continue
            if m.is_response:
                self.on_response(m)
            else:
                self.on_request(m, src)
        return 0

    def reconnect(self):
        """A phone whose TCP connection dropped: a new connection, a new registration."""
        self.losses += 1
        gate = "%s.%d" % (self.a.reconnect_when, self.losses) if self.a.reconnect_when else None
        while gate and not os.path.exists(gate):
            if time.time() > self.deadline:
                return False
            time.sleep(0.05)
        while time.time() < self.deadline:
            try:
                self.open(0)  # a new connection from a new source port, as a phone's would be
                self.register()
                return True
            except OSError as e:
                self.log("CONNECT-ERROR", e)
                time.sleep(0.3)
        return False


class Caller(Endpoint):
    def run(self):
        self.open()
        a = self.a
        cid = rand(16) + "@caller"
        self.log("CALL", cid)
        ftag = rand(8)
        ruri = f"sip:{a.to}@sipwarden.test"
        frm = f"From: <sip:{a.user}@sipwarden.test>;tag={ftag}"
        to = f"To: <sip:{a.to}@sipwarden.test>"

        def invite(cseq, branch, auth=None):
            body = SDP.format(ip=self.lip)
            h = [f"INVITE {ruri} SIP/2.0", self.via(branch), "Max-Forwards: 70", frm, to,
                 f"Call-ID: {cid}", f"CSeq: {cseq} INVITE", f"Contact: <{self.contact()}>",
                 "User-Agent: sipwarden-routing-caller", "Content-Type: application/sdp"]
            if auth:
                h.append("Proxy-Authorization: " + digest(auth, a.user, a.password, "INVITE", ruri))
            h.append(f"Content-Length: {len(body)}")
            return "\r\n".join(h) + "\r\n\r\n" + body

        def ack_non2xx(cseq, branch, resp):
            h = [f"ACK {ruri} SIP/2.0", self.via(branch), "Max-Forwards: 70", frm,
                 resp.lines("to")[0], f"Call-ID: {cid}", f"CSeq: {cseq} ACK", "Content-Length: 0"]
            self.send("\r\n".join(h) + "\r\n\r\n")

        def final(cseq, limit):
            end = time.time() + limit
            while time.time() < end:
                m, _ = self.recv(0.05)
                self.tick()
                if m is not None and m.is_response and m.cseq() == (cseq, "INVITE") and m.code >= 200:
                    self.cancel("inv")
                    return m
            self.cancel("inv")
            return None

        b1 = "z9hG4bK" + rand(16)
        self.retransmit("inv", invite(1, b1), None)
        m = final(1, 8)
        if m is None:
            self.log("FINAL", "none", "to-first-invite")
            return 2
        ack_non2xx(1, b1, m)
        auth = m.get("proxy-authenticate") if m.code == 407 else None
        if not auth:
            self.log("FINAL", m.code, 0)
            return 2
        b2 = "z9hG4bK" + rand(16)
        t0 = time.time()
        self.retransmit("inv", invite(2, b2, auth), None)
        m = final(2, a.timeout)
        if m is None:
            self.log("FINAL", "none", "%.2f" % (time.time() - t0))
            return 2
        self.log("FINAL", m.code, "%.2f" % (time.time() - t0))
        if m.code >= 300:
            ack_non2xx(2, b2, m)
            time.sleep(0.3)
            return 1
        # the dialog: route set from Record-Route (reversed for a UAC), target from Contact
        routes = []
        for v in reversed(m.values("record-route")):
            routes += [r.strip() for r in v.split(",")][::-1]
        mc = re.search(r"<([^>]+)>", m.get("contact"))
        target = mc.group(1) if mc else ruri
        rto = m.lines("to")[0]
        route_hdr = ("Route: " + ", ".join(routes)) if routes else ""

        def indialog(meth, cseq, branch):
            h = [f"{meth} {target} SIP/2.0", self.via(branch), "Max-Forwards: 70"]
            if route_hdr:
                h.append(route_hdr)
            h += [frm, rto, f"Call-ID: {cid}", f"CSeq: {cseq} {meth}", "Content-Length: 0"]
            return "\r\n".join(h) + "\r\n\r\n"

        ack = indialog("ACK", 2, "z9hG4bK" + rand(16))
        self.send(ack)
        self.log("ACKED", cid)
        end = time.time() + (a.hold if not a.hold_until else a.timeout + 60)
        while time.time() < end:
            if a.hold_until and os.path.exists(a.hold_until):
                break
            m2, _ = self.recv(0.05)
            if m2 is not None and m2.is_response and m2.code == 200 and m2.cseq() == (2, "INVITE"):
                self.send(ack)  # a retransmitted 200: ACK it again
        self.retransmit("bye", indialog("BYE", 3, "z9hG4bK" + rand(16)), None)
        end = time.time() + 8
        while time.time() < end:
            m2, _ = self.recv(0.05)
            self.tick()
            if m2 is not None and m2.is_response and m2.cseq() == (3, "BYE") and m2.code >= 200:
                self.cancel("bye")
                self.log("BYE-RESULT", m2.code)
                return 0 if m2.code == 200 else 1
        self.cancel("bye")
        self.log("BYE-RESULT", "none")
        return 1


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["phone", "call"])
    ap.add_argument("--user", required=True)
    ap.add_argument("--password", required=True)
    ap.add_argument("--local", required=True)
    ap.add_argument("--proxy", required=True)
    ap.add_argument("--transport", default="udp", choices=["udp", "tcp"])
    ap.add_argument("--contact")
    ap.add_argument("--via", help="Via sent-by host:port (a NAT phone puts its private address)")
    ap.add_argument("--expires", type=int, default=3600)
    ap.add_argument("--reregister", type=float, default=0)
    ap.add_argument("--register-only", action="store_true")
    ap.add_argument("--ring-only", action="store_true")
    ap.add_argument("--reconnect-when")
    ap.add_argument("--to")
    ap.add_argument("--hold", type=float, default=0.2)
    ap.add_argument("--hold-until")
    ap.add_argument("--timeout", type=float, default=10)
    ap.add_argument("--seconds", type=float, default=170, help="lifetime bound")
    ap.add_argument("--log", required=True)
    a = ap.parse_args()
    ep = Phone(a) if a.mode == "phone" else Caller(a)
    try:
        sys.exit(ep.run())
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
