#!/usr/bin/env bash
# E-mail alert interop (issue 15): a local SMTP receiver (aiosmtpd, started here) takes the alert
# mails of a running sipwarden. A scripted scanner (User-Agent: friendly-scanner) must produce a
# mail naming the block's IP, type and reason; a flood of 1,000 blocks (spoofed scanner sources
# 127.3.x.y) must produce at most ceil(duration / digest) + 1 mails, together covering every block.
#
# Addresses (loopback only, none shared with the other suites): sipwarden 127.0.0.1:5560, admin
# 127.0.0.1:8580, SMTP 127.0.0.1:2525, upstream 127.0.0.50:5580 (never reached: scanners are
# blocked). Bounded: every wait has a deadline; under 60 seconds.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
BIN=${SIPWARDEN_BIN:-$REPO/target/release/sipwarden}
OUT=${VISIBILITY_OUT:-$REPO/artifacts/visibility}/email
DIGEST=3
rm -rf "$OUT"
mkdir -p "$OUT/mail"
WORK=$(mktemp -d)
PIDS=()
cleanup() {
	for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
	for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
	rm -rf "$WORK"
}
trap cleanup EXIT

python3 -c 'import aiosmtpd' 2>/dev/null || pip install -q aiosmtpd

cat >"$WORK/proxy.toml" <<TOML
[sip]
listen_udp = ["127.0.0.1:5560"]
listen_tcp = ["127.0.0.1:5560"]
[upstream]
address = "127.0.0.50:5580"
[admin]
listen = "127.0.0.1:8580"
[state]
path = "$WORK/state.db"
[protection]
aggregate_ipv4 = 0
[notify]
email_to = ["NOC <noc@example.com>"]
email_from = "sipwarden <sipwarden@example.com>"
smtp_url = "smtp://127.0.0.1:2525"
digest = "${DIGEST}s"
TOML

python3 "$HERE/visibility/smtp_sink.py" 127.0.0.1 2525 "$OUT/mail" >"$OUT/smtp.log" 2>&1 &
PIDS+=($!)
"$BIN" run -c "$WORK/proxy.toml" >"$OUT/sipwarden.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 100); do
	curl -fsS http://127.0.0.1:8580/healthz >/dev/null 2>&1 && grep -q listening "$OUT/smtp.log" && break
	sleep 0.1
done
curl -fsS http://127.0.0.1:8580/healthz >/dev/null

# 1. One scanner: one mail with its IP, type and reason.
python3 "$HERE/visibility/scanners.py" 127.0.0.1:5560 1 0
for _ in $(seq 100); do [ -e "$OUT/mail/0001.eml" ] && break; sleep 0.1; done
FIRST="$OUT/mail/0001.eml"
[ -e "$FIRST" ] || { echo "FAIL: no alert mail for the scanner"; exit 1; }
for want in "To: NOC <noc@example.com>" "127.3.0.1" "type SCANNER" "friendly-scanner" "New blocks (1):"; do
	grep -qF "$want" "$FIRST" || { echo "FAIL: mail lacks '$want'"; cat "$FIRST"; exit 1; }
done
echo "scanner mail: $(grep '^Subject:' "$FIRST")"

# 2. A flood of 1,000 blocks: a bounded number of digest mails covering all of them.
T0=$(date +%s.%N)
python3 "$HERE/visibility/scanners.py" 127.0.0.1:5560 1000 1
python3 - "$OUT/mail" "$T0" "$DIGEST" <<'PY'
import glob, math, re, sys, time
out, t0, digest = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
deadline = time.time() + 40
while True:
    mails = sorted(glob.glob(out + "/*.eml"))[1:]
    texts = [open(m, encoding="utf-8", errors="replace").read() for m in mails]
    # A listing longer than MAX_LINES says "... and N more", the header line has the count.
    n = sum(int(x) for t in texts for x in re.findall(r"^New blocks \((\d+)\):", t, re.M))
    if n >= 1000 or time.time() > deadline:
        break
    time.sleep(0.2)
last = max(float(t.split("\n", 1)[0]) for t in texts) if texts else t0
bound = math.ceil((last - t0) / digest) + 1
print("flood: %d blocks in %d mails over %.1fs (bound %d)" % (n, len(texts), last - t0, bound))
assert n == 1000, "mails cover %d of 1000 blocks" % n
assert len(texts) <= bound, "%d mails > bound %d" % (len(texts), bound)
assert all(len(t) < 200 * 1024 for t in texts), "a digest mail is too large"
PY
curl -fsS http://127.0.0.1:8580/metrics | grep -E '^sipwarden_notifications_total' | tee "$OUT/metrics.txt"
grep -q 'sipwarden_notifications_total{outcome="dropped"} 0' "$OUT/metrics.txt"
grep -q 'sipwarden_notifications_total{outcome="failed"} 0' "$OUT/metrics.txt"
echo "PASS visibility-email: scanner alert mailed; 1,000 blocks in a bounded number of digests"
