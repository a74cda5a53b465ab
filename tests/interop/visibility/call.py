#!/usr/bin/env python3
"""A fake PBX and a phone on loopback for the HEP interop: the phone makes one call
(INVITE, 100/180/200, ACK, BYE, 200) through sipwarden; the PBX answers. With "noise" the
phone first sends a REGISTER and an OPTIONS (Call-IDs noise-reg-/noise-opt-CALL_ID), each
answered 200 by the PBX. Bounded: every receive has a timeout, the whole call at most a few
seconds.

usage: call.py PROXY_HOST:PORT PBX_HOST:PORT PHONE_HOST:PORT CALL_ID [noise]
"""
import socket
import sys
import threading


def addr(s):
    h, p = s.rsplit(":", 1)
    return h, int(p)


proxy, pbx, phone, call_id = addr(sys.argv[1]), addr(sys.argv[2]), addr(sys.argv[3]), sys.argv[4]
noise = sys.argv[5:6] == ["noise"]


def headers(msg):
    out = {}
    for line in msg.split("\r\n")[1:]:
        if not line:
            break
        k, _, v = line.partition(":")
        out.setdefault(k.strip().lower(), []).append(v.strip())
    return out


def pbx_loop(sock, stop):
    sock.settimeout(0.2)
    while not stop.is_set():
        try:
            data, src = sock.recvfrom(65535)
        except socket.timeout:
            continue
        msg = data.decode(errors="replace")
        first = msg.split("\r\n", 1)[0]
        method = first.split(" ", 1)[0]
        if method in ("ACK",) or first.startswith("SIP/2.0"):
            continue
        h = headers(msg)
        base = "".join(f"Via: {v}\r\n" for v in h.get("via", []))
        base += "".join(f"Record-Route: {v}\r\n" for v in h.get("record-route", []))
        base += f"From: {h['from'][0]}\r\nTo: {h['to'][0]};tag=pbx1\r\nCall-ID: {h['call-id'][0]}\r\nCSeq: {h['cseq'][0]}\r\n"
        codes = [(100, "Trying"), (180, "Ringing"), (200, "OK")] if method == "INVITE" else [(200, "OK")]
        for code, reason in codes:
            extra = f"Contact: <sip:100@{pbx[0]}:{pbx[1]}>\r\n" if code == 200 and method == "INVITE" else ""
            resp = f"SIP/2.0 {code} {reason}\r\n{base}{extra}Content-Length: 0\r\n\r\n"
            sock.sendto(resp.encode(), src)


def main():
    ps = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    ps.bind(pbx)
    stop = threading.Event()
    t = threading.Thread(target=pbx_loop, args=(ps, stop), daemon=True)
    t.start()
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(phone)
    s.settimeout(3)
    ph = f"{phone[0]}:{phone[1]}"
    px = f"{proxy[0]}:{proxy[1]}"

    def req(method, cseq, branch, to_tag="", route=""):
        return (f"{method} sip:100@{px} SIP/2.0\r\nVia: SIP/2.0/UDP {ph};branch=z9hG4bK{branch};rport\r\n"
                f"Max-Forwards: 70\r\n{route}From: <sip:200@{px}>;tag=ph1\r\nTo: <sip:100@{px}>{to_tag}\r\n"
                f"Call-ID: {call_id}\r\nCSeq: {cseq} {method}\r\nContact: <sip:200@{ph}>\r\n"
                f"User-Agent: visibility-test\r\nContent-Length: 0\r\n\r\n").encode()

    if noise:
        for method, cid in (("REGISTER", "noise-reg-"), ("OPTIONS", "noise-opt-")):
            m = req(method, 1, method.lower()).replace(f"Call-ID: {call_id}".encode(), f"Call-ID: {cid}{call_id}".encode())
            s.sendto(m, proxy)
            while True:
                data, _ = s.recvfrom(65535)
                if data.startswith(b"SIP/2.0 200") and method.encode() in data:
                    break
    s.sendto(req("INVITE", 1, "inv1"), proxy)
    rr = []
    while True:
        data, _ = s.recvfrom(65535)
        msg = data.decode(errors="replace")
        if msg.startswith("SIP/2.0 200"):
            rr = headers(msg).get("record-route", [])
            break
    route = "".join(f"Route: {v}\r\n" for v in rr)
    s.sendto(req("ACK", 1, "ack1", ";tag=pbx1", route), proxy)
    s.sendto(req("BYE", 2, "bye1", ";tag=pbx1", route), proxy)
    while True:
        data, _ = s.recvfrom(65535)
        if data.startswith(b"SIP/2.0 200") and b"BYE" in data:
            break
    stop.set()
    t.join(1)
    print("call done")


main()
