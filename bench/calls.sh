#!/usr/bin/env bash
# Calls-per-second benchmark (issue #2): the highest rate of complete calls
# (INVITE 100 180 200 ACK BYE 200, sipp -sn uac against sipp -sn uas, UDP, loopback) with under
# 1% failed calls, for
#   direct     sipp UAC -> sipp UAS                                   (the ceiling)
#   sipwarden  sipp UAC -> sipwarden (bench/proxy-bench.toml) -> UAS
#   kamailio   sipp UAC -> Kamailio 5.6 (bench/kamailio-secproxy.cfg) -> UAS
# Search: rates in steps until the first failing step, then bisection between the last good and
# the first bad rate; every run is STEP_SECS seconds of calls, bounded by -m and timeout.
# Prints each maximum and the ratios sipwarden/direct and sipwarden/kamailio.
#
# usage: bench/calls.sh [direct|sipwarden|kamailio ...]      (default: all three)
# env:   SIPWARDEN_BIN (default target/release/sipwarden, built if missing), STEP_SECS (3),
#        GRACE_SECS (2: time after the last call's start by which calls must be complete),
#        MAX_RATE (60000), KEEP=1 keeps the work dir.
set -uo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
SIPWARDEN_BIN=${SIPWARDEN_BIN:-$REPO/target/release/sipwarden}
STEP_SECS=${STEP_SECS:-3}
GRACE_SECS=${GRACE_SECS:-2}
MAX_RATE=${MAX_RATE:-60000}
BISECT=${BISECT:-3}
STEPS=(500 1000 2000 3000 4000 5000 6000 8000 10000 12000 14000 17000 20000 25000 30000 35000 40000 45000 50000 60000)

UAS_IP=127.0.0.30 UAS_PORT=5090
UAC_IP=127.0.0.31 UAC_PORT=5091
SW_SIP=127.0.0.1:5160 SW_ADMIN=127.0.0.1:8180
KAM_SIP=127.0.0.10:5070

declare -A BG=()
WORK=""

cleanup() {
	local n
	for n in "${!BG[@]}"; do stop "$n"; done
	if [[ -n $WORK ]]; then
		if [[ ${KEEP:-0} == 1 ]]; then echo "work dir kept: $WORK"; else rm -rf "$WORK"; fi
	fi
}

stop() {
	local pid=${BG[$1]:-} i
	[[ -n $pid ]] || return 0
	kill "$pid" 2>/dev/null
	for i in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
	kill -9 "$pid" 2>/dev/null
	wait "$pid" 2>/dev/null
	unset "BG[$1]"
}

# stat FILE COLUMN: last value of a sipp -trace_stat column
stat_col() {
	awk -F';' -v col="$2" 'NR==1 { for (i = 1; i <= NF; i++) if ($i == col) c = i; next }
		c && $c != "" { v = $c } END { print v }' "$1"
}

start_uas() {
	local d=$WORK/uas
	rm -rf "$d" && mkdir -p "$d"
	(cd "$d" && exec sipp -sn uas -i "$UAS_IP" -p "$UAS_PORT" -nostdin -bind_local \
		-buff_size 4194304 -max_recv_loops 10000 -max_sched_loops 10000 >"$d/screen.txt" 2>&1) &
	BG[uas]=$!
	sleep 0.3
}

# one_run TARGET RATE: prints "ok ACHIEVED" or "fail REASON"
one_run() {
	local target=$1 rate=$2 n d t0 t1 ok failed elapsed wall achieved
	n=$((rate * STEP_SECS))
	d=$WORK/$target-$rate
	rm -rf "$d" && mkdir -p "$d"
	start_uas
	t0=$(date +%s.%N)
	# sipp stops GRACE_SECS after the last call should have started: whatever is not complete by
	# then (lost packets waiting for retransmission, a backlog) counts as failed.
	(cd "$d" && timeout -k 3 $((STEP_SECS + GRACE_SECS + 10)) sipp "$target_addr" -sn uac \
		-i "$UAC_IP" -p "$UAC_PORT" -r "$rate" -m "$n" -l $((rate * 4 + 100)) -nostdin \
		-buff_size 4194304 -max_recv_loops 10000 -max_sched_loops 10000 \
		-default_behaviors all,-abortunexp -timeout $((STEP_SECS + GRACE_SECS))s -trace_stat -stf "$d/stat.csv" -fd 1 \
		>"$d/screen.txt" 2>&1)
	t1=$(date +%s.%N)
	stop uas
	ok=$(stat_col "$d/stat.csv" 'SuccessfulCall(C)')
	failed=$(stat_col "$d/stat.csv" 'FailedCall(C)')
	ok=${ok:-0} failed=${failed:-0}
	wall=$(awk -v a="$t0" -v b="$t1" 'BEGIN { print b - a }')
	# achieved rate: complete calls over the time sipp needed, never more than asked for
	achieved=$(awk -v n="$ok" -v w="$wall" -v s="$STEP_SECS" -v r="$rate" \
		'BEGIN { if (w < s) w = s; a = n / w; if (a > r) a = r; print a }')
	# pass: under 1% of the calls failed or unfinished within the time
	if ((ok * 100 < n * 99)); then
		printf 'fail %d/%d calls complete in %.1f s, %d failed\n' "$ok" "$n" "$wall" "$failed"
	else
		printf 'ok %.0f calls/s achieved (%d/%d calls in %.1f s)\n' "$achieved" "$ok" "$n" "$wall"
	fi
}

# search TARGET: the highest achieved rate of a passing run
search() {
	local target=$1 good=0 bad=0 best=0 rate res i
	trap 'stop uas' EXIT # runs in a $(...) subshell: its UAS dies with it
	step() {
		res=$(one_run "$target" "$rate")
		printf '  %-9s asked %6d calls/s: %s\n' "$target" "$rate" "$res" >&2
		if [[ $res == ok* ]]; then
			good=$rate
			set -- $res
			(($2 > best)) && best=$2
			return 0
		fi
		bad=$rate
		return 1
	}
	for rate in "${STEPS[@]}"; do
		((rate > MAX_RATE)) && break
		step || break
	done
	if ((bad > 0 && good > 0)); then
		for i in $(seq 1 "$BISECT"); do
			((bad - good < good / 20 + 50)) && break
			rate=$(((good + bad) / 2))
			step
		done
	fi
	echo "$best"
}

start_sipwarden() {
	local d=$WORK/sipwarden i
	mkdir -p "$d"
	sed "s|^path = .*|path = \"$d/sipwarden.db\"|" "$HERE/proxy-bench.toml" >"$d/proxy.toml"
	RUST_LOG=${RUST_LOG:-warn} "$SIPWARDEN_BIN" run -c "$d/proxy.toml" >"$d/sipwarden.log" 2>&1 &
	BG[sipwarden]=$!
	for i in $(seq 1 100); do
		[[ $(curl -s --max-time 1 "http://$SW_ADMIN/healthz") == ok* ]] && return 0
		kill -0 "${BG[sipwarden]}" 2>/dev/null || break
		sleep 0.1
	done
	echo "sipwarden did not start:" >&2
	tail -20 "$d/sipwarden.log" >&2
	return 1
}

start_kamailio() {
	local d=$WORK/kamailio
	mkdir -p "$d"
	kamailio -f "$HERE/kamailio-secproxy.cfg" -DD -E -Y "$d" -P "$d/kamailio.pid" -m 256 -M 16 \
		>"$d/kamailio.log" 2>&1 &
	BG[kamailio]=$!
	sleep 1.5
	kill -0 "${BG[kamailio]}" 2>/dev/null || { tail -20 "$d/kamailio.log" >&2; return 1; }
}

main() {
	local targets=("$@") t
	((${#targets[@]})) || targets=(direct sipwarden kamailio)
	for t in sipp kamailio curl timeout; do
		command -v "$t" >/dev/null || { echo "missing: $t" >&2; exit 2; }
	done
	if [[ " ${targets[*]} " == *" sipwarden "* && ! -x $SIPWARDEN_BIN ]]; then
		echo "building $SIPWARDEN_BIN"
		(cd "$REPO" && cargo build --release) || exit 2
	fi
	WORK=$(mktemp -d "${TMPDIR:-/tmp}/sipwarden-bench.XXXXXX")
	trap cleanup EXIT
	trap 'exit 130' INT TERM
	echo "calls/s with <1% failed calls, ${STEP_SECS} s per step, $(nproc) CPUs"

	declare -A MAX=()
	for t in "${targets[@]}"; do
		case $t in
		direct) target_addr=$UAS_IP:$UAS_PORT ;;
		sipwarden) start_sipwarden || { MAX[$t]=0; continue; }; target_addr=$SW_SIP ;;
		kamailio) start_kamailio || { MAX[$t]=0; continue; }; target_addr=$KAM_SIP ;;
		*) echo "unknown target $t" >&2; exit 2 ;;
		esac
		MAX[$t]=$(search "$t")
		if [[ $t == sipwarden ]]; then
			# proof that the load went through sipwarden and nothing was blocked or limited
			curl -s --max-time 2 "http://$SW_ADMIN/api/stats" |
				jq -c '{forwarded, dropped_total, active_blocks: .active_blocks.total}' 2>/dev/null |
				sed 's/^/  sipwarden stats: /'
		fi
		[[ $t == sipwarden || $t == kamailio ]] && stop "$t"
		printf '%-9s max %6d calls/s\n' "$t" "${MAX[$t]}"
	done

	echo "---"
	for t in "${targets[@]}"; do printf '%-9s %6d calls/s\n' "$t" "${MAX[$t]}"; done
	if [[ -n ${MAX[sipwarden]:-} && -n ${MAX[direct]:-} && ${MAX[direct]} -gt 0 ]]; then
		awk -v a="${MAX[sipwarden]}" -v b="${MAX[direct]}" 'BEGIN { printf "sipwarden/direct   %.2f\n", a / b }'
	fi
	if [[ -n ${MAX[sipwarden]:-} && -n ${MAX[kamailio]:-} && ${MAX[kamailio]} -gt 0 ]]; then
		awk -v a="${MAX[sipwarden]}" -v b="${MAX[kamailio]}" 'BEGIN { printf "sipwarden/kamailio %.2f\n", a / b }'
	fi
}

main "$@"
