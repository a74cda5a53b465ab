#!/usr/bin/env bash
# Visibility interop (issue 15): Debian's sngrep listens for HEP from sipwarden and saves a
# pcap; a scripted call (tests/interop/visibility/call.py: a phone and a fake PBX) goes through
# sipwarden; the saved capture must hold every message of both legs with the Call-ID, with the
# right source and destination. Then /metrics must show the HEP export as sent, not dropped.
# Run twice: with hep.only = "all" the phone's REGISTER and OPTIONS are in the capture too; with
# hep.only = "dialogs" they are not (and sipwarden_hep_filtered_total counts them), the call is.
#
# Addresses (loopback only, none shared with the other suites): sipwarden 127.0.0.1:5460, admin
# 127.0.0.1:8480, fake PBX 127.0.0.40:5480, phone 127.0.0.41:5462, sngrep HEP 127.0.0.1:9060.
# Bounded: every wait has a deadline; under a minute.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
BIN=${SIPWARDEN_BIN:-$REPO/target/release/sipwarden}
OUT=${VISIBILITY_OUT:-$REPO/artifacts/visibility}
mkdir -p "$OUT"
WORK=$(mktemp -d)
PIDS=()
cleanup() {
	for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
	for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
	rm -rf "$WORK"
}
trap cleanup EXIT

command -v sngrep >/dev/null || { echo "sngrep not installed (apt-get install -y sngrep)"; exit 1; }

# phase ONLY PCAP NOISE_CHECK: sipwarden with hep.only = ONLY, sngrep saving to PCAP, a call
# with REGISTER/OPTIONS noise, then the capture checked (NOISE_CHECK: noise | no-noise).
phase() {
	local only=$1 pcap=$2 check=$3
	rm -f "$pcap"
	cat >"$WORK/proxy.toml" <<TOML
[sip]
listen_udp = ["127.0.0.1:5460"]
listen_tcp = ["127.0.0.1:5460"]
[upstream]
address = "127.0.0.40:5480"
[admin]
listen = "127.0.0.1:8480"
[state]
path = "$WORK/state-$only.db"
[hep]
address = "127.0.0.1:9060"
capture_id = 2001
only = "$only"
TOML
	# sngrep without its interface, HEP listener only (with -L alone it opens no device).
	sngrep -N -q -F -L udp:127.0.0.1:9060 -O "$pcap" >"$OUT/sngrep-$only.log" 2>&1 &
	local sngrep_pid=$!
	PIDS+=($sngrep_pid)
	"$BIN" run -c "$WORK/proxy.toml" >"$OUT/sipwarden-$only.log" 2>&1 &
	local sw_pid=$!
	PIDS+=($sw_pid)
	for _ in $(seq 50); do
		curl -fsS http://127.0.0.1:8480/healthz >/dev/null 2>&1 && break
		sleep 0.1
	done
	curl -fsS http://127.0.0.1:8480/healthz >/dev/null

	local call_id="hep-$only-$(date +%s)-$$@visibility"
	timeout 15 python3 "$HERE/visibility/call.py" 127.0.0.1:5460 127.0.0.40:5480 127.0.0.41:5462 "$call_id" noise
	sleep 1
	curl -fsS http://127.0.0.1:8480/metrics | grep -E '^sipwarden_hep_' | tee "$OUT/hep-metrics-$only.txt"
	# Stop sngrep so it flushes the pcap, and this sipwarden (the next phase reuses its ports).
	kill "$sngrep_pid" "$sw_pid"
	wait "$sngrep_pid" 2>/dev/null || true
	wait "$sw_pid" 2>/dev/null || true
	PIDS=()
	python3 "$HERE/visibility/check_pcap.py" "$pcap" "$call_id" 127.0.0.41:5462 127.0.0.1:5460 127.0.0.40:5480 "$check" \
		| tee "$OUT/ladder-$only.txt"
	grep -q 'sipwarden_hep_packets_total{outcome="sent"} [1-9]' "$OUT/hep-metrics-$only.txt"
	grep -q 'sipwarden_hep_packets_total{outcome="dropped"} 0' "$OUT/hep-metrics-$only.txt"
}

phase all "$OUT/hep.pcap" noise
grep -q '^sipwarden_hep_filtered_total 0$' "$OUT/hep-metrics-all.txt"
echo "PASS visibility: sngrep saw both legs of the call, REGISTER and OPTIONS over HEP"

phase dialogs "$OUT/hep-dialogs.pcap" no-noise
# REGISTER, OPTIONS and their 200s, on both legs: 8 messages left out before the queue.
grep -q '^sipwarden_hep_filtered_total 8$' "$OUT/hep-metrics-dialogs.txt"
echo "PASS visibility: with hep.only = \"dialogs\" the call is whole and REGISTER/OPTIONS are left out"
