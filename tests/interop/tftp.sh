#!/usr/bin/env bash
# TFTP provisioning guard against real programs: tftpd-hpa (in.tftpd) as the provisioning
# server, sipwarden's relay in front of it, the tftp-hpa and atftp clients and a small python
# client (tftp_client.py, which can bind 127.0.0.2 and use short timeouts).
#
#   tests/interop/tftp.sh                     # relay = examples/tftp_relay (built if needed)
#   TFTP_RELAY=binary tests/interop/tftp.sh   # relay = target/release/sipwarden -c <config>
#
# Everything is on loopback and on its own ports (the tftpd-hpa system service on port 69 is
# neither used nor disturbed). Prints PASS/FAIL lines and ends with "N passed, M failed".
set -u

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
RELAY_KIND=${TFTP_RELAY:-binary}
SIPWARDEN_BIN=${SIPWARDEN_BIN:-$REPO/target/release/sipwarden}
EXAMPLE_BIN=$REPO/target/release/examples/tftp_relay
SERVER_IP=${TFTP_SERVER_IP:-127.0.0.31}
SERVER_PORT=${TFTP_SERVER_PORT:-6969}
RELAY_PORT=${TFTP_RELAY_PORT:-6900}
ADMIN_PORT=${TFTP_ADMIN_PORT:-18089}
RELAY=127.0.0.1
CLIENT=$HERE/tftp_client.py

PASSED=0
FAILED=0
PIDS=()
WORK=$(mktemp -d /tmp/sipwarden-tftp.XXXXXX)

cleanup() {
	local p
	for p in "${PIDS[@]}"; do
		kill "$p" 2>/dev/null
	done
	for p in "${PIDS[@]}"; do
		wait "$p" 2>/dev/null
	done
	rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

pass() {
	PASSED=$((PASSED + 1))
	echo "PASS $1${2:+ - $2}"
}
fail() {
	FAILED=$((FAILED + 1))
	echo "FAIL $1${2:+ - $2}"
}
check() { # NAME CONDITION DETAIL
	if eval "$2"; then pass "$1" "$3"; else fail "$1" "$3"; fi
}
sha() { sha256sum "$1" 2>/dev/null | cut -d' ' -f1; }
same_file() { [ -f "$2" ] && [ "$(sha "$1")" = "$(sha "$2")" ]; }
wait_until() { # SECONDS COMMAND
	local end=$((SECONDS + $1))
	while [ $SECONDS -lt $end ]; do
		eval "$2" && return 0
		sleep 0.1
	done
	return 1
}

for tool in in.tftpd tftp atftp python3 sha256sum; do
	if ! command -v "$tool" >/dev/null; then
		fail "prerequisites" "$tool not installed"
		echo "$PASSED passed, $FAILED failed"
		exit 1
	fi
done

port_in_use() { ss -lun | awk '{print $4}' | grep -qx "$1"; }
for addr in "$SERVER_IP:$SERVER_PORT" "$RELAY:$RELAY_PORT"; do
	if port_in_use "$addr"; then
		fail "ports free" "$addr is already in use (another run? set TFTP_SERVER_PORT / TFTP_RELAY_PORT)"
		echo "$PASSED passed, $FAILED failed"
		exit 1
	fi
done

# --- the provisioning server ----------------------------------------------------------------
ROOT=$WORK/tftproot
mkdir -p "$ROOT"
printf '<device><sipProfile><user>1001</user><password>s3cret</password></sipProfile></device>\n' \
	>"$ROOT/SEP001122334455.cnf.xml"
head -c 300 /dev/urandom | base64 >"$ROOT/small.cfg"
head -c 1024 /dev/urandom >"$ROOT/exact1024.bin"     # a multiple of 512: ends with an empty DATA
head -c $((6 * 1024 * 1024 + 123)) /dev/urandom >"$ROOT/firmware.bin"
chmod 755 "$WORK" "$ROOT"
chmod 644 "$ROOT"/*

in.tftpd -L -s -u nobody -a "$SERVER_IP:$SERVER_PORT" "$ROOT" >"$WORK/tftpd.log" 2>&1 &
PIDS+=($!)
if wait_until 5 'port_in_use "$SERVER_IP:$SERVER_PORT"'; then
	pass "tftpd-hpa starts" "$SERVER_IP:$SERVER_PORT"
else
	fail "tftpd-hpa starts" "$(cat "$WORK/tftpd.log")"
	echo "$PASSED passed, $FAILED failed"
	exit 1
fi
timeout 20 python3 "$CLIENT" get "$SERVER_IP" "$SERVER_PORT" small.cfg "$WORK/direct.cfg" --timeout 2 >/dev/null 2>&1
check "tftpd-hpa serves directly" 'same_file "$ROOT/small.cfg" "$WORK/direct.cfg"' "sanity check of the server"

# --- sipwarden --------------------------------------------------------------------------------
# hit_count < not_found_limit <= hit_count + limited_rate + guesses dropped: a guesser is first
# limited, then blocked once the names it did not get reach not_found_limit.
CFG=$WORK/proxy.toml
cat >"$CFG" <<EOF
[sip]
listen_udp = ["127.0.0.1:15061"]
listen_tcp = ["127.0.0.1:15061"]

[upstream]
# Not 127.0.0.1: the SIP upstream's address is trusted (never limited or blocked), on TFTP too.
address = "127.0.0.41:15081"

[admin]
listen = "127.0.0.1:$ADMIN_PORT"

[state]
path = "$WORK/state.db"

[tftp]
enabled = true
listen = "$RELAY:$RELAY_PORT"
upstream = "$SERVER_IP:$SERVER_PORT"
hit_count = 30
limited_rate = 5
not_found_limit = 60
block_time = "10m"
max_transfers_per_ip = 8
max_transfers = 64
EOF

LOG=$WORK/relay.log
if [ "$RELAY_KIND" = binary ]; then
	RELAY_CMD=("$SIPWARDEN_BIN" -c "$CFG")
else
	if [ "${TFTP_NO_BUILD:-0}" != 1 ]; then
		(cd "$REPO" && cargo build -q --release --example tftp_relay) || {
			fail "build examples/tftp_relay"
			echo "$PASSED passed, $FAILED failed"
			exit 1
		}
	fi
	RELAY_CMD=("$EXAMPLE_BIN" -c "$CFG")
fi
RUST_LOG=${RUST_LOG:-info} "${RELAY_CMD[@]}" >"$LOG" 2>&1 &
PIDS+=($!)
if wait_until 15 'port_in_use "$RELAY:$RELAY_PORT"'; then
	pass "sipwarden TFTP relay starts" "$RELAY_KIND on $RELAY:$RELAY_PORT"
else
	fail "sipwarden TFTP relay starts" "$(tail -5 "$LOG")"
	echo "$PASSED passed, $FAILED failed"
	exit 1
fi

# Counters: the example prints STATS lines; the binary serves /metrics.
counter() { # NAME (requests|transfers|limited|dropped|malformed)
	if [ "$RELAY_KIND" = binary ]; then
		curl -s "http://127.0.0.1:$ADMIN_PORT/metrics" | awk -v m="sipwarden_tftp_$1" '$1 == m || $1 == m"_total" {print $2}' | head -1
	else
		grep '^STATS' "$LOG" | tail -1 | tr ' ' '\n' | awk -F= -v k="$1" '$1 == k {print $2}'
	fi
}
blocks_json() { curl -s "http://127.0.0.1:$ADMIN_PORT/api/blocks"; }
blocked_for_tftp() { # IP
	if [ "$RELAY_KIND" = binary ]; then
		blocks_json | python3 -c 'import json,sys; ip=sys.argv[1]; sys.exit(0 if any(b.get("ip")==ip and b.get("type")=="TFTP" for b in json.load(sys.stdin)) else 1)' "$1"
	else
		grep -q "^BLOCK $1 TFTP " "$LOG"
	fi
}
block_evidence() {
	if [ "$RELAY_KIND" = binary ]; then
		blocks_json | python3 -c 'import json,sys; [print(e) for b in json.load(sys.stdin) for e in b.get("evidence",[])]' 2>/dev/null
	else
		grep "^BLOCK " "$LOG"
	fi
}

# --- real clients through the relay ---------------------------------------------------------------
cd "$WORK" || exit 1
elapsed() { printf '%.3f' "$(echo "$2 - $1" | bc)"; }
t0=$(date +%s.%N)
timeout 120 tftp -m octet "$SERVER_IP" "$SERVER_PORT" -c get firmware.bin direct-firmware.bin >/dev/null 2>&1
t1=$(date +%s.%N)
echo "  .. reference: tftp-hpa get firmware.bin directly from tftpd-hpa: $(elapsed "$t0" "$t1") s"
for f in small.cfg firmware.bin; do
	rm -f "hpa-$f"
	t0=$(date +%s.%N)
	timeout 120 tftp -m octet "$RELAY" "$RELAY_PORT" -c get "$f" "hpa-$f" >/dev/null 2>&1
	t1=$(date +%s.%N)
	check "tftp-hpa get $f" 'same_file "$ROOT/$f" "hpa-$f"' "sha256 match, $(du -b "$ROOT/$f" | cut -f1) bytes in $(elapsed "$t0" "$t1") s"
done
for opt in "" "blksize 1428" "tsize 0"; do
	for f in small.cfg firmware.bin exact1024.bin; do
		out="atftp-${opt// /_}-$f"
		rm -f "$out"
		args=()
		[ -n "$opt" ] && args=(--option "$opt")
		t0=$(date +%s.%N)
		timeout 120 atftp "${args[@]}" -g -r "$f" -l "$out" "$RELAY" "$RELAY_PORT" >/dev/null 2>&1
		t1=$(date +%s.%N)
		check "atftp ${opt:-no option} get $f" 'same_file "$ROOT/$f" "$out"' "sha256 match in $(elapsed "$t0" "$t1") s"
	done
done
timeout 60 python3 "$CLIENT" get "$RELAY" "$RELAY_PORT" firmware.bin py-big.bin --bind 127.0.0.2 --blksize 8192 >/dev/null 2>&1
check "python client (127.0.0.2, blksize 8192) get firmware.bin" 'same_file "$ROOT/firmware.bin" py-big.bin' "sha256 match"
timeout 20 python3 "$CLIENT" get "$RELAY" "$RELAY_PORT" nonexistent.cfg x.out --bind 127.0.0.2 >"$WORK/nf.txt" 2>&1
check "server's file-not-found reaches the client" 'grep -q "^ERROR 1" "$WORK/nf.txt"' "$(head -1 "$WORK/nf.txt")"

# --- malformed packets --------------------------------------------------------------------------------
before=$(counter malformed)
timeout 10 python3 "$CLIENT" junk "$RELAY" "$RELAY_PORT" --bind 127.0.0.3
wait_until 5 '[ "$(counter malformed)" -ge $((${before:-0} + 6)) ]'
check "malformed requests dropped and counted" '[ "$(counter malformed)" -ge $((${before:-0} + 6)) ]' "tftp_malformed $before -> $(counter malformed)"
rm -f py-small.cfg
timeout 20 python3 "$CLIENT" get "$RELAY" "$RELAY_PORT" small.cfg py-small.cfg --bind 127.0.0.3 >/dev/null 2>&1
check "relay still serves the same source after garbage" 'same_file "$ROOT/small.cfg" py-small.cfg' "127.0.0.3"

# --- file-name guessing from 127.0.0.1 ---------------------------------------------------------
t0=$SECONDS
guess=$(timeout 120 python3 "$CLIENT" guess "$RELAY" "$RELAY_PORT" --bind 127.0.0.1 --count 300 --timeout 0.1)
echo "  .. guessing loop (300 MAC file names, $((SECONDS - t0)) s): $guess"
nf=$(echo "$guess" | sed -n 's/.*not_found=\([0-9]*\).*/\1/p')
silent=$(echo "$guess" | sed -n 's/.*silent=\([0-9]*\) .*/\1/p')
check "guesser gets only its first requests answered" '[ "${nf:-0}" -ge 10 ] && [ "${nf:-999}" -lt 60 ] && [ "${silent:-0}" -ge 200 ]' "not_found=$nf silent=$silent"
wait_until 5 '[ "$(counter limited)" -gt 0 ]'
check "guesser limited (hit_count 30/min, then 5/min)" '[ "$(counter limited)" -gt 0 ]' "tftp_limited=$(counter limited)"
check "limiting logged once per episode" '[ "$(grep -c "limiting the source" "$LOG")" -eq 1 ]' "$(grep -c "limiting the source" "$LOG") log line(s)"
wait_until 5 'blocked_for_tftp 127.0.0.1'
check "guesser blocked with type TFTP" 'blocked_for_tftp 127.0.0.1' "$(block_evidence | head -1 | cut -c1-160)"
check "block evidence names the guessed files" 'block_evidence | grep -Eq "(SEP|cfg)?[0-9a-fA-F]{12}"' ""
rm -f blocked.cfg
timeout 20 python3 "$CLIENT" get "$RELAY" "$RELAY_PORT" small.cfg blocked.cfg --bind 127.0.0.1 --timeout 1 >/dev/null 2>&1
rc=$?
check "blocked source gets nothing, not even an existing file" '[ $rc -eq 3 ] && [ ! -f blocked.cfg ]' "exit $rc"
rm -f other.xml
timeout 20 python3 "$CLIENT" get "$RELAY" "$RELAY_PORT" SEP001122334455.cnf.xml other.xml --bind 127.0.0.2 >/dev/null 2>&1
check "another source (127.0.0.2) still fetches its config" 'same_file "$ROOT/SEP001122334455.cnf.xml" other.xml' ""
echo "  .. counters: requests=$(counter requests) transfers=$(counter transfers) limited=$(counter limited) dropped=$(counter dropped) malformed=$(counter malformed)"

echo "$PASSED passed, $FAILED failed"
[ "$FAILED" -eq 0 ]
