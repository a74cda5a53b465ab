#!/usr/bin/env bash
# Visibility interop (issue 15): Debian's sngrep listens for HEP from sipwarden and saves a
# pcap; a scripted call (tests/interop/visibility/call.py: a phone and a fake PBX) goes through
# sipwarden; the saved capture must hold every message of both legs with the Call-ID, with the
# right source and destination. Then /metrics must show the HEP export as sent, not dropped.
#
# Addresses (loopback only, none shared with the other suites): sipwarden 127.0.0.1:5460, admin
# 127.0.0.1:8480, fake PBX 127.0.0.40:5480, phone 127.0.0.41:5462, sngrep HEP 127.0.0.1:9060.
# Bounded: every wait has a deadline; under 30 seconds.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
BIN=${SIPWARDEN_BIN:-$REPO/target/release/sipwarden}
OUT=${VISIBILITY_OUT:-$REPO/artifacts/visibility}
mkdir -p "$OUT"
rm -f "$OUT"/hep.pcap
WORK=$(mktemp -d)
PIDS=()
cleanup() {
	for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
	for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
	rm -rf "$WORK"
}
trap cleanup EXIT

command -v sngrep >/dev/null || { echo "sngrep not installed (apt-get install -y sngrep)"; exit 1; }

cat >"$WORK/proxy.toml" <<TOML
[sip]
listen_udp = ["127.0.0.1:5460"]
listen_tcp = ["127.0.0.1:5460"]
[upstream]
address = "127.0.0.40:5480"
[admin]
listen = "127.0.0.1:8480"
[state]
path = "$WORK/state.db"
[hep]
address = "127.0.0.1:9060"
capture_id = 2001
TOML

# sngrep without its interface, HEP listener only (with -L alone it opens no device).
sngrep -N -q -F -L udp:127.0.0.1:9060 -O "$OUT/hep.pcap" >"$OUT/sngrep.log" 2>&1 &
PIDS+=($!)
"$BIN" run -c "$WORK/proxy.toml" >"$OUT/sipwarden.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 50); do
	curl -fsS http://127.0.0.1:8480/healthz >/dev/null 2>&1 && break
	sleep 0.1
done
curl -fsS http://127.0.0.1:8480/healthz >/dev/null

CALL_ID="hep-$(date +%s)-$$@visibility"
timeout 15 python3 "$HERE/visibility/call.py" 127.0.0.1:5460 127.0.0.40:5480 127.0.0.41:5462 "$CALL_ID"
sleep 1
curl -fsS http://127.0.0.1:8480/metrics | grep -E '^sipwarden_hep_' | tee "$OUT/hep-metrics.txt"
# Stop sngrep so it flushes the pcap.
kill "${PIDS[0]}"; wait "${PIDS[0]}" 2>/dev/null || true
python3 "$HERE/visibility/check_pcap.py" "$OUT/hep.pcap" "$CALL_ID" 127.0.0.41:5462 127.0.0.1:5460 127.0.0.40:5480 \
	| tee "$OUT/ladder.txt"
grep -q 'sipwarden_hep_packets_total{outcome="sent"} [1-9]' "$OUT/hep-metrics.txt"
grep -q 'sipwarden_hep_packets_total{outcome="dropped"} 0' "$OUT/hep-metrics.txt"
echo "PASS visibility: sngrep saw both legs of $CALL_ID over HEP"
