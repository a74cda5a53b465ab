#!/usr/bin/env bash
# Soak: does sipwarden stay within bounded memory, cut slow-loris connections and keep serving a
# real phone while
#   (a) a million IPv4 sources (127.16.0.1 up, any 127/8 address binds on loopback) and
#       SOURCES6 IPv6 sources (one /64 each under 2001:db8::/32) send one packet each: OPTIONS,
#       REGISTER (401), REGISTER with credentials (403), INVITE (404), scanner User-Agent (block),
#       non-SIP bytes and a header-less request (anomalies) — every kind leaves per-source state;
#   (b) SLOW_IPS addresses open SLOW_PER_IP TCP connections each, dripping headers a byte at a
#       time, idling, or sending CRLF keep-alives — cut by sip.max_connections_per_ip,
#       sip.tcp_message_timeout and sip.tcp_idle_timeout;
#   (c) a phone on UDP and one on TCP register (401, 200) and call (INVITE 200, ACK, BYE 200) all
#       along, through sipwarden to a sink PBX (bench/soak.rs does all the talking).
# Prints sipwarden's resident memory per phase and its peak (VmHWM) against the configured caps,
# and exits non-zero if a phone failed, sipwarden died, or the peak exceeded MAX_RSS_MB.
#
# Runs in a network namespace of its own (needs root), so the IPv6 /32 can be made local
# (`ip -6 route add local ...`) and nothing touches the host's network; the namespace and every
# process started here are removed on exit. Whole run: about 2–4 minutes after the build.
#
# env: SOURCES4 (1000000), SOURCES6 (200000), RATE (packets/s per flood, 25000), SLOW_IPS (10),
#      SLOW_PER_IP (100), MAX_RSS_MB (1024), TRACKED (protection.tracked_sources, 100000),
#      MAX_BLOCKS (protection.max_blocks, 100000), KEEP=1 keeps the work dir.
set -uo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
BIN=$REPO/target/release/sipwarden
SOAK=$REPO/target/release/examples/soak

if [[ -z ${SOAK_IN_NS:-} ]]; then
	[[ $(id -u) == 0 ]] || { echo "soak.sh needs root for its network namespace" >&2; exit 2; }
	for t in ip curl timeout; do
		command -v "$t" >/dev/null || { echo "missing: $t" >&2; exit 2; }
	done
	echo "building (release)..."
	(cd "$REPO" && cargo build --release --bin sipwarden --example soak 2>&1 | tail -n 1) || exit 2
	NS=sipwarden-soak-$$
	ip netns add "$NS" || exit 2
	trap 'ip netns del "$NS" 2>/dev/null' EXIT
	ip -n "$NS" link set lo up
	ip netns exec "$NS" sysctl -qw net.ipv6.ip_nonlocal_bind=1
	ip -n "$NS" -6 addr add 2001:db8::1/128 dev lo nodad
	ip -n "$NS" -6 route add local 2001:db8::/32 dev lo
	# UDP floods at RATE must not overflow the listener's socket buffer (namespace-local knobs).
	ip netns exec "$NS" sysctl -qw net.core.rmem_default=4194304 2>/dev/null
	SOAK_IN_NS=1 timeout -k 5 600 ip netns exec "$NS" "$0" "$@"
	exit $?
fi

# ---- inside the namespace ----------------------------------------------------------------
SOURCES4=${SOURCES4:-1000000}
SOURCES6=${SOURCES6:-200000}
RATE=${RATE:-25000}
SLOW_IPS=${SLOW_IPS:-10}
SLOW_PER_IP=${SLOW_PER_IP:-100}
MAX_RSS_MB=${MAX_RSS_MB:-1024}
TRACKED=${TRACKED:-100000}
MAX_BLOCKS=${MAX_BLOCKS:-100000}
PER_IP_CAP=64 MSG_TIMEOUT=5 IDLE_TIMEOUT=10

WORK=$(mktemp -d "${TMPDIR:-/tmp}/sipwarden-soak.XXXXXX")
PIDS=()
cleanup() {
	touch "$WORK/stop"
	for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; done
	wait 2>/dev/null
	[[ -n ${KEEP:-} ]] && echo "work dir: $WORK" || rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

cat >"$WORK/proxy.toml" <<EOF
[sip]
listen_udp = ["127.0.0.1:5060", "[2001:db8::1]:5060"]
listen_tcp = ["127.0.0.1:5060"]
max_connections = 4096
max_connections_per_ip = $PER_IP_CAP
tcp_message_timeout = "${MSG_TIMEOUT}s"
tcp_idle_timeout = "${IDLE_TIMEOUT}s"

[upstream]
address = "127.0.0.1:5080"

[protection]
tracked_sources = $TRACKED
max_blocks = $MAX_BLOCKS

[admin]
listen = "127.0.0.1:8080"

[state]
path = "$WORK/sipwarden.db"

[log]
level = "warn"
EOF

"$SOAK" sink 127.0.0.1:5080 "$WORK/stop" >"$WORK/sink.out" 2>&1 &
PIDS+=($!)
"$BIN" run -c "$WORK/proxy.toml" >"$WORK/sipwarden.log" 2>&1 &
SW=$!
PIDS+=($SW)
for _ in $(seq 1 100); do
	[[ $(curl -s --max-time 1 http://127.0.0.1:8080/healthz) == ok* ]] && break
	sleep 0.1
done
kill -0 "$SW" 2>/dev/null || { echo "sipwarden did not start:"; tail "$WORK/sipwarden.log"; exit 1; }

rss() { awk '/^VmRSS/ { print int($2 / 1024) }' "/proc/$SW/status" 2>/dev/null; }
hwm() { awk '/^VmHWM/ { print int($2 / 1024) }' "/proc/$SW/status" 2>/dev/null; }
declare -A AT=()
mark() { AT[$1]=$(rss); printf '  %-34s RSS %5s MiB\n' "$1" "${AT[$1]}"; }

# Sample RSS twice a second for the curve.
(while kill -0 "$SW" 2>/dev/null && [[ ! -e $WORK/stop ]]; do
	echo "$(date +%s.%N) $(rss)"
	sleep 0.5
done >"$WORK/rss.log") &
PIDS+=($!)

"$SOAK" phone udp 127.0.0.1:5060 127.0.0.2 "$WORK/stop" >"$WORK/phone-udp.out" 2>&1 &
PHONES=($!)
"$SOAK" phone tcp 127.0.0.1:5060 127.0.0.3 "$WORK/stop" >"$WORK/phone-tcp.out" 2>&1 &
PHONES+=($!)
PIDS+=("${PHONES[@]}")

echo "sipwarden soak: tracked_sources=$TRACKED max_blocks=$MAX_BLOCKS, $(nproc) CPUs"
sleep 3
mark "baseline (phones calling)"

echo "(a) $SOURCES4 IPv4 sources at $RATE/s"
"$SOAK" flood 4 127.0.0.1:5060 "$SOURCES4" "$RATE" | while read -r line; do
	echo "    $line"
	[[ $line == *progress* ]] && printf '      RSS %s MiB\n' "$(rss)"
done
mark "after the IPv4 sources"

echo "(a) $SOURCES6 IPv6 sources, (b) slow-loris from $SLOW_IPS addresses x $SLOW_PER_IP"
"$SOAK" slowloris 127.0.0.1:5060 "$SLOW_IPS" "$SLOW_PER_IP" $((IDLE_TIMEOUT * 3)) >"$WORK/slow.out" 2>&1 &
SLOW=$!
PIDS+=($SLOW)
"$SOAK" flood 6 "[2001:db8::1]:5060" "$SOURCES6" "$RATE" | grep -v progress | sed 's/^/    /'
mark "after the IPv6 sources"
wait "$SLOW"
sed 's/^/    /' "$WORK/slow.out"
mark "after slow-loris"

sleep 2
touch "$WORK/stop"
wait "${PHONES[@]}" 2>/dev/null
STATS=$(curl -s --max-time 5 http://127.0.0.1:8080/api/stats)
alive=yes
kill -0 "$SW" 2>/dev/null || alive=no
PEAK=$(hwm)
ANON=$(awk '/^Anonymous:/ { print int($2 / 1024) }' "/proc/$SW/smaps_rollup" 2>/dev/null)

echo "---"
cat "$WORK/phone-udp.out" "$WORK/phone-tcp.out" | sed 's/^/  /'
echo "  (phone times are seconds since the phones started, 3 s before the floods)"
sed 's/^/  /' "$WORK/sink.out" 2>/dev/null
if command -v jq >/dev/null && [[ -n $STATS ]]; then
	jq -r '"  sipwarden stats: packets in \(.packets_in.total), forwarded \(.forwarded.requests) requests / \(.forwarded.responses) responses, replies \(.replies_sent)",
		"    dropped \(.dropped_total): \(.dropped | to_entries | map(select(.value > 0) | "\(.key) \(.value)") | join(", "))",
		"    active blocks \(.active_blocks.total), tcp connections now \(.tcp.connections), tcp refused (caps) \(.tcp.rejected), events dropped \(.events_dropped)"' <<<"$STATS" 2>/dev/null
fi
echo "  sipwarden alive at the end: $alive"
echo "  at the end: RSS $(rss) MiB (anonymous ${ANON:-?} MiB), state file $(du -m "$WORK/sipwarden.db" | cut -f1) MiB, log $(du -m "$WORK/sipwarden.log" | cut -f1) MiB"
echo "  peak RSS (VmHWM) ${PEAK:-?} MiB for tracked_sources=$TRACKED, max_blocks=$MAX_BLOCKS (limit $MAX_RSS_MB MiB)"

fail=0
[[ $alive == yes ]] || fail=1
grep -q ' 0 failed' "$WORK/phone-udp.out" || fail=1
grep -q ' 0 failed' "$WORK/phone-tcp.out" || fail=1
grep -q ' 0 calls ok' "$WORK/phone-udp.out" "$WORK/phone-tcp.out" && fail=1
((${PEAK:-999999} <= MAX_RSS_MB)) || fail=1
((fail == 0)) && echo "soak: PASS" || echo "soak: FAIL"
exit $fail
