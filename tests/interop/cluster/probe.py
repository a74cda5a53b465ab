#!/usr/bin/env python3
"""Measurements for tests/interop/cluster.sh, against the nodes' admin APIs (loopback only).

  probe.py propagate KIND N SRC DST...   make N changes on SRC, time until every DST shows each
                                         (KIND: block | unblock | list); prints p50/p99 in ms
  probe.py wait-count URL N SECS         wait until /api/stats counts N active blocks (or more)
  probe.py has URL KIND ITEM...          exit 0 when every block IP / blacklist CIDR is there
  probe.py lacks URL ITEM...             exit 0 when none of these block IPs is there
  probe.py cluster URL FIELD             print one counter of /api/cluster (or link_up, nodes)
  probe.py gen-blocks N                  RESP commands for redis-cli --pipe: N blocks in the set
Every wait is bounded (each change: 5 s).
"""
import json
import sys
import time
import urllib.parse
import urllib.request


def req(method, url, body=None):
    data = json.dumps(body).encode() if body is not None else None
    r = urllib.request.Request(url, data=data, method=method,
                               headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(r, timeout=5) as resp:
        raw = resp.read()
    return json.loads(raw) if raw and raw[:1] in (b"[", b"{") else raw


def blocks(url):
    return {b["ip"] for b in req("GET", url + "/api/blocks")}


def blacklist(url):
    return {b["cidr"] for b in req("GET", url + "/api/blacklist")}


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def propagate(kind, n, src, dsts):
    times = []
    for i in range(n):
        ip = f"203.0.113.{i + 1}"
        cidr = f"198.51.100.{i + 1}/32"
        t0 = time.monotonic()
        if kind == "block":
            req("POST", src + "/api/blocks", {"ip": ip, "duration": "1h", "reason": "propagation"})
            done = lambda u: ip in blocks(u)
        elif kind == "unblock":
            req("DELETE", src + "/api/blocks/" + ip)
            done = lambda u: ip not in blocks(u)
        else:
            req("POST", src + "/api/blacklist", {"cidr": cidr, "comment": "propagation"})
            done = lambda u: cidr in blacklist(u)
        pending = set(dsts)
        deadline = t0 + 5
        while pending and time.monotonic() < deadline:
            pending = {u for u in pending if not done(u)}
            if pending:
                time.sleep(0.002)
        if pending:
            print(f"{kind} {i}: not seen on {sorted(pending)} after 5 s")
            return 1
        times.append((time.monotonic() - t0) * 1000)
    print(f"{kind}: n={n} p50={pct(times, 50):.1f}ms p99={pct(times, 99):.1f}ms max={max(times):.1f}ms")
    return 0 if pct(times, 99) <= 200 else 2


def active(url):
    return req("GET", url + "/api/stats")["active_blocks"]["total"]


def main(a):
    cmd = a[0]
    if cmd == "propagate":
        return propagate(a[1], int(a[2]), a[3], a[4:])
    if cmd == "wait-count":
        url, n, secs = a[1], int(a[2]), float(a[3])
        t0 = time.monotonic()
        while time.monotonic() - t0 < secs:
            try:
                if active(url) >= n:
                    print(f"{n} blocks on {url} after {time.monotonic() - t0:.2f}s")
                    return 0
            except OSError:
                pass
            time.sleep(0.05)
        print(f"{url}: {active(url)} active blocks, wanted {n}")
        return 1
    if cmd == "has":
        url, kind, items = a[1], a[2], set(a[3:])
        have = blocks(url) if kind == "block" else blacklist(url)
        missing = items - have
        if missing:
            print(f"{url}: missing {sorted(missing)[:10]} ({len(missing)})")
        return 1 if missing else 0
    if cmd == "lacks":
        url, items = a[1], set(a[2:])
        there = items & blocks(url)
        if there:
            print(f"{url}: still holds {sorted(there)[:10]}")
        return 1 if there else 0
    if cmd == "cluster":
        v = req("GET", a[1] + "/api/cluster")
        f = a[2]
        if f == "link_up":
            print(int(v["link_up"]))
        elif f == "nodes":
            print(" ".join(sorted(n["name"] for n in v["nodes"])))
        else:
            print(v["counters"][f])
        return 0
    if cmd == "gen-blocks":
        n = int(a[1])
        now = int(time.time() * 1000)
        out = sys.stdout.buffer
        for i in range(n):
            ip = f"100.{64 + (i >> 16)}.{(i >> 8) & 255}.{i & 255}"
            b = {"key": {"net": f"{ip}/32", "port": None}, "kind": "MANUAL", "device": "",
                 "reason": "bulk", "blocked_at": now, "expires_at": now + 3600_000, "strikes": 1,
                 "hits": 0, "evidence": [], "enforced": True}
            v = json.dumps(b, separators=(",", ":")).encode()
            parts = [b"HSET", b"sipwarden:blocks", ip.encode(), v]
            out.write(b"*%d\r\n" % len(parts))
            for p in parts:
                out.write(b"$%d\r\n%s\r\n" % (len(p), p))
            parts = [b"ZADD", b"sipwarden:blocks:exp", str(now + 3600_000).encode(), ip.encode()]
            out.write(b"*%d\r\n" % len(parts))
            for p in parts:
                out.write(b"$%d\r\n%s\r\n" % (len(p), p))
        return 0
    print(__doc__)
    return 64


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
