#!/usr/bin/env bash
# Flood benchmark (issue 11): legitimate calls through sipwarden while 10,000 blocked sources
# flood it as fast as one core sends, with a block table of 100,000 entries, and the same again
# while an operator lists the whole table (GET /api/blocks) in a loop. Prints the calls'
# success, sipwarden's forwarding latency (its own histogram, receive to send) in each phase,
# and how long each listing took: listing must not stall forwarding.
#
#   sipp UAC 127.0.0.43 -> sipwarden 127.0.0.1:5260 -> sipp UAS 127.0.0.42:5290 (the PBX)
#   flood sources 127.3.0.0 + i (bench/flood.rs), admin 127.0.0.1:8280
#
# usage: bench/flood.sh     env: BLOCKS (100000), SOURCES (10000), SECS (10), CPS (200)
# Loopback only; every phase bounded in count and time.
set -uo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
cd "$REPO"
BLOCKS=${BLOCKS:-100000} SOURCES=${SOURCES:-10000} SECS=${SECS:-10} CPS=${CPS:-200}
SW=127.0.0.1:5260 API=http://127.0.0.1:8280 UAS=127.0.0.42:5290 UAC_IP=127.0.0.43
WORK=$(mktemp -d /tmp/sipwarden-flood.XXXXXX)
PIDS=()
cleanup() {
	local p
	for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; done
	sleep 0.3
	for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null; wait "$p" 2>/dev/null; done
	[[ ${KEEP:-0} == 1 ]] && echo "work dir kept: $WORK" || rm -rf "$WORK"
}
trap cleanup EXIT

cargo build --release --bin sipwarden --example flood 2>&1 | tail -1
FLOOD=target/release/examples/flood

sed -e "s/127.0.0.1:5160/$SW/g" -e "s/127.0.0.30:5090/$UAS/" -e "s/127.0.0.1:8180/127.0.0.1:8280/" \
	-e "s#/tmp/sipwarden-bench/sipwarden.db#$WORK/state.db#" bench/proxy-bench.toml >"$WORK/proxy.toml"

(cd "$WORK" && exec sipp -sn uas -i "${UAS%:*}" -p "${UAS#*:}" -nostdin -bind_local \
	-buff_size 4194304 >"$WORK/uas.txt" 2>&1) &
PIDS+=($!)
RUST_LOG=warn target/release/sipwarden run -c "$WORK/proxy.toml" >"$WORK/sipwarden.log" 2>&1 &
PIDS+=($!)
SW_PID=$!
for _ in $(seq 1 100); do curl -sf "$API/healthz" >/dev/null && break; sleep 0.1; done
curl -sf "$API/healthz" >/dev/null || { echo "sipwarden did not start"; cat "$WORK/sipwarden.log"; exit 1; }

total_blocks() {
	curl -s -D - -o /dev/null --max-time 30 "$API/api/blocks?limit=1" | tr -d '\r' |
		awk -F': ' 'tolower($1) == "x-total-count" { print $2 }'
}

echo "== seeding $BLOCKS blocks (one scanner packet from each source)"
t0=$SECONDS
$FLOOD seed "$SW" "$BLOCKS"
n=0
for _ in $(seq 1 60); do
	n=$(total_blocks)
	((${n:-0} >= BLOCKS * 95 / 100)) && break
	sleep 1
done
echo "   block table: ${n:-?} entries after $((SECONDS - t0)) s, sipwarden RSS $(awk '/VmRSS/ {print $2, $3}' /proc/$SW_PID/status)"

metrics() { curl -s --max-time 10 "$API/metrics" >"$1"; }

# phase NAME LISTING: SECS seconds of calls and flood, with or without a listing loop.
phase() {
	local name=$1 listing=$2 d=$WORK/$1 calls=$((CPS * SECS))
	mkdir -p "$d"
	metrics "$d/before.txt"
	$FLOOD blast "$SW" "$SOURCES" "$SECS" >"$d/blast.txt" &
	local blast=$!
	local lister=""
	if [[ $listing == 1 ]]; then
		(
			end=$((SECONDS + SECS))
			while ((SECONDS < end)); do
				curl -s -o /dev/null --max-time 30 -w '%{time_total} %{size_download}\n' "$API/api/blocks"
			done
		) >"$d/listings.txt" &
		lister=$!
	fi
	(cd "$d" && timeout -k 3 $((SECS + 20)) sipp "$SW" -sn uac -i "$UAC_IP" -p 5291 -r "$CPS" -m "$calls" \
		-nostdin -buff_size 4194304 -default_behaviors all,-abortunexp -timeout $((SECS + 15))s \
		-trace_stat -stf "$d/stat.csv" >"$d/screen.txt" 2>&1)
	wait "$blast"
	[[ -n $lister ]] && wait "$lister"
	metrics "$d/after.txt"
	local ok failed
	ok=$(awk -F';' 'NR==1 { for (i = 1; i <= NF; i++) if ($i == "SuccessfulCall(C)") c = i; next } c { v = $c } END { print v + 0 }' "$d/stat.csv")
	failed=$(awk -F';' 'NR==1 { for (i = 1; i <= NF; i++) if ($i == "FailedCall(C)") c = i; next } c { v = $c } END { print v + 0 }' "$d/stat.csv")
	echo "== phase: $name"
	echo "   flood: $(cat "$d/blast.txt")"
	echo "   calls: $ok of $calls successful, $failed failed ($(awk -v o="$ok" -v n="$calls" 'BEGIN { printf "%.2f", 100 * o / n }')%)"
	python3 - "$d/before.txt" "$d/after.txt" <<'PY'
import re, sys
def hist(path):
    b = {}
    for line in open(path):
        m = re.match(r'sipwarden_forward_latency(?:_seconds)?_bucket\{le="([^"]+)"\} (\d+)', line)
        if m:
            b[float(m.group(1))] = int(m.group(2))
    return b
a, z = hist(sys.argv[1]), hist(sys.argv[2])
d = sorted((le, z[le] - a.get(le, 0)) for le in z)
total = d[-1][1] if d else 0
def q(p):
    for le, c in d:
        if c >= p * total:
            return "<= %g us" % (le * 1e6) if le != float("inf") else "> 25 ms"
    return "?"
print("   forwarding latency (sipwarden's histogram): %d forwards, p50 %s, p99 %s, p99.9 %s" % (total, q(.5), q(.99), q(.999)))
print("   buckets (us: count): " + ", ".join("%s: %d" % ("inf" if le == float("inf") else "%g" % (le * 1e6), c - p) for (le, c), (_, p) in zip(d, [(0, 0)] + d[:-1])))
PY
	if [[ $listing == 1 ]]; then
		awk '{ n++; s += $1; if ($1 > m) m = $1; b = $2 } END { printf "   listings of the whole table: %d, mean %.2f s, max %.2f s, %.1f MB each\n", n, s / n, m, b / 1e6 }' "$d/listings.txt"
	fi
}

phase "flood + calls" 0
phase "flood + calls + GET /api/blocks in a loop" 1
echo "   sipwarden RSS at the end: $(awk '/VmRSS/ {print $2, $3}' /proc/$SW_PID/status)"
