# shellcheck shell=bash
# Helpers for tests/interop/run.sh: process control (every background process is recorded and
# killed on exit), sipp runs with their stats, sipwarden and Kamailio lifecycle, the admin API.
# Sourced, not executed.  Everything binds to loopback addresses only.

HERE=${HERE:-$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)}
REPO=${REPO:-$(cd "$HERE/../.." && pwd)}
SCEN=$HERE/scenarios
SIPWARDEN_BIN=${SIPWARDEN_BIN:-$REPO/target/release/sipwarden}
API=http://127.0.0.1:8080
SW_SIP=127.0.0.1:5060
PBX_ADDR=127.0.0.10
PBX_PORT=5080

PASSED=0
FAILED=0
FAILED_NAMES=()
declare -A BG_PID=()      # name -> pid of a background process we started
declare -A BG_SIG=()      # name -> the signal that stops it cleanly (sipp: USR1)
SW_PID=""
SW_LOG=""
SNIFF_FILE=""
SW_MODE=""
KAM_PID=""

log() { printf '  .. %s\n' "$*"; }

# --- results ----------------------------------------------------------------------------------

pass() {
	PASSED=$((PASSED + 1))
	printf 'PASS %s%s\n' "$1" "${2:+ - $2}"
}

# fail NAME REASON [evidence dirs or files...]
fail() {
	local name=$1 reason=$2
	shift 2
	FAILED=$((FAILED + 1))
	FAILED_NAMES+=("$name")
	printf 'FAIL %s - %s\n' "$name" "$reason"
	TRACED=0
	local e
	for e in "$@"; do evidence "$e"; done
}

# check NAME CONDITION-COMMAND REASON [evidence...]: PASS if the command succeeds
check() {
	local name=$1 cond=$2 reason=$3
	shift 3
	if eval "$cond"; then pass "$name" "$reason"; else fail "$name" "$reason" "$@"; fi
}

# Print what helps to understand a failure: a sipp run dir, a log file, or the block table.
evidence() {
	local e=$1
	[[ -n $e ]] || return 0
	echo "     ---- evidence: $e"
	if [[ $e == api ]]; then
		curl -sS --max-time 2 "$API/api/blocks" 2>&1 | head -c 3000 | sed 's/^/     | /'
		echo
	elif [[ -d $e ]]; then
		[[ -f $e/cmd ]] && sed 's/^/     | cmd: /' "$e/cmd"
		[[ -f $e/rc ]] && echo "     | exit code: $(cat "$e/rc")"
		if [[ -f $e/screen.txt ]]; then
			grep -E -- '---->|<----|Successful call|Failed call|Unable|rror' "$e/screen.txt" \
				| tail -40 | sed 's/^/     | /'
		fi
		[[ -f $e/errors.log ]] && grep -v 'out-of-call' "$e/errors.log" | head -12 | sed 's/^/     | err: /'
		[[ -f $e/actions.log ]] && grep FAILED "$e/actions.log" | head -10 | sed 's/^/     | /'
		local cid
		cid=$(failed_call_id "$e")
		if [[ -n $cid && -s ${SNIFF_FILE:-} && ${TRACED:-0} == 0 ]]; then
			TRACED=1
			echo "     | the first failed call on the wire ($cid), from $SNIFF_FILE:"
			trace_call "$cid" | awk '/^[0-9][0-9]:[0-9][0-9]:[0-9][0-9]\.[0-9]+ (UDP|TCP) / {
				t = $1 " " $2 " " $3 " " $4 " " $5; getline; print t "  " $0 }' | head -40 | sed 's/^/     |   /'
			echo "     | its last messages in full:"
			trace_call "$cid" | tail -45 | sed 's/^/     | /'
		elif [[ -f $e/messages.log ]]; then
			echo "     | last SIP messages (sipp -trace_msg):"
			tail -60 "$e/messages.log" | sed 's/^/     | /'
		fi
		[[ -f $e/out.txt ]] && tail -40 "$e/out.txt" | sed 's/^/     | /'
	elif [[ -f $e ]]; then
		tail -40 "$e" | sed -e 's/\x1b\[[0-9;]*m//g' -e 's/^/     | /'
	fi
}

# failed_call_id DIR: the Call-ID of the first failed call of a sipp run, if it says
failed_call_id() {
	local d=$1 cid=""
	[[ -f $d/actions.log ]] && cid=$(grep -m1 -o 'UAS-FAILED [^ ]*' "$d/actions.log" | cut -d' ' -f2)
	if [[ -z $cid && -f $d/errors.log ]]; then
		cid=$(grep -v 'out-of-call' "$d/errors.log" | grep -m1 -oE "Call-I[dD]:? '?[^ ',]+" |
			sed -E "s/Call-I[dD]:? '?//")
	fi
	echo "$cid"
}

# trace_call CALLID: every message of that call in the loopback capture (SNIFF=1)
trace_call() {
	awk -v cid="$1" '
		function flush() { if (blk != "" && index(blk, "Call-ID: " cid) ) printf "%s", blk; blk = "" }
		/^[0-9][0-9]:[0-9][0-9]:[0-9][0-9]\.[0-9]+ (UDP|TCP) / { flush() }
		{ blk = blk $0 "\n" }
		END { flush() }' "$SNIFF_FILE"
}

# start_sniffer: capture SIP to/from ports 5060 and 5080 on lo as text (needs root); optional
start_sniffer() {
	[[ ${SNIFF:-1} == 1 ]] || return 0
	SNIFF_FILE=$WORK/sip-trace.txt
	/usr/bin/python3 "$HERE/sniff.py" --ports 5060,5080 --seconds 1800 >"$SNIFF_FILE" \
		2>"$WORK/sniff.err" &
	BG_PID[sniffer]=$!
	sleep 0.5
	if ! kill -0 "${BG_PID[sniffer]}" 2>/dev/null; then
		echo "(no SIP capture: $(head -1 "$WORK/sniff.err"))"
		unset "BG_PID[sniffer]"
		SNIFF_FILE=""
	fi
}

# --- background processes ---------------------------------------------------------------------

# stop_bg NAME [signal]: ask politely (sipp quits gracefully on USR1), then kill.  Bounded.
stop_bg() {
	local name=$1 sig=${2:-${BG_SIG[$1]:-TERM}} pid=${BG_PID[$1]:-}
	[[ -n $pid ]] || return 0
	kill -s "$sig" "$pid" 2>/dev/null
	local i
	for i in $(seq 1 100); do
		kill -0 "$pid" 2>/dev/null || break
		sleep 0.1
	done
	if kill -0 "$pid" 2>/dev/null; then
		kill -9 "$pid" 2>/dev/null
	fi
	wait "$pid" 2>/dev/null
	local rc=$?
	[[ -d $WORK/$name ]] && echo "$rc" >"$WORK/$name/rc"
	unset "BG_PID[$name]" "BG_SIG[$name]"
	return 0
}

# wait_bg NAME SECONDS: let a background process finish by itself (bounded), then stop it
wait_bg() {
	local name=$1 pid=${BG_PID[$1]:-} i
	[[ -n $pid ]] || return 0
	for i in $(seq 1 $(($2 * 10))); do
		kill -0 "$pid" 2>/dev/null || break
		sleep 0.1
	done
	stop_bg "$name"
}

# tool_bg NAME SECONDS command...: a non-sipp program in the background, bounded by timeout,
# output in $WORK/NAME/out.txt
tool_bg() {
	local name=$1 secs=$2
	shift 2
	local d=$WORK/$name
	rm -rf "$d" && mkdir -p "$d"
	echo "$*" >"$d/cmd"
	(cd "$d" && exec timeout -k 5 "$secs" "$@" </dev/null >"$d/out.txt" 2>&1) &
	BG_PID[$name]=$!
}

stop_all_bg() {
	local name
	for name in "${!BG_PID[@]}"; do stop_bg "$name"; done
}

# --- sipp -------------------------------------------------------------------------------------

SIPP_COMMON=(-nostdin -trace_err -trace_stat -fd 1 -trace_counts -trace_msg -trace_logs)

# sipp_fg NAME SECONDS sipp-args...: run sipp in $WORK/NAME, bounded; returns sipp's exit code.
sipp_fg() {
	local name=$1 secs=$2
	shift 2
	local d=$WORK/$name
	rm -rf "$d" && mkdir -p "$d"
	echo "sipp $*" >"$d/cmd"
	(cd "$d" && timeout -k 5 "$secs" sipp "$@" "${SIPP_COMMON[@]}" \
		-error_file "$d/errors.log" -stf "$d/stat.csv" -message_file "$d/messages.log" \
		-log_file "$d/actions.log" >"$d/screen.txt" 2>&1)
	local rc=$?
	echo "$rc" >"$d/rc"
	return "$rc"
}

# sipp_bg NAME sipp-args...: start sipp in the background (stop with stop_bg NAME USR1).
sipp_bg() {
	local name=$1
	shift
	local d=$WORK/$name
	rm -rf "$d" && mkdir -p "$d"
	echo "sipp $*" >"$d/cmd"
	cd "$d" || return 1
	sipp "$@" "${SIPP_COMMON[@]}" -error_file "$d/errors.log" -stf "$d/stat.csv" \
		-message_file "$d/messages.log" -log_file "$d/actions.log" >"$d/screen.txt" 2>&1 &
	BG_PID[$name]=$!
	BG_SIG[$name]=USR1
	cd - >/dev/null || return 1
}

# sipp_stat NAME COLUMN: last value of a column of sipp's -trace_stat file (e.g. "SuccessfulCall(C)")
sipp_stat() {
	local f=$WORK/$1/stat.csv
	[[ -f $f ]] || { echo 0; return; }
	awk -F';' -v col="$2" 'NR==1 { for (i = 1; i <= NF; i++) if ($i == col) c = i; next }
		c && $c != "" { v = $c } END { print v + 0 }' "$f"
}

# sipp_log NAME WORD: how many lines of the scenario's <log> output (actions.log) hold WORD
sipp_log() {
	local f=$WORK/$1/actions.log
	[[ -f $f ]] || { echo 0; return; }
	grep -c -- "$2" "$f"
}

# sipp_count NAME SUFFIX: sum over the scenario's messages of a -trace_counts column, e.g. "_403_Recv"
sipp_count() {
	local f
	f=$(ls "$WORK/$1"/*_counts.csv 2>/dev/null | head -1)
	[[ -n $f ]] || { echo 0; return; }
	awk -F';' -v suf="$2" 'NR==1 { for (i = 1; i <= NF; i++) if (substr($i, length($i) - length(suf) + 1) == suf) c[i] = 1; next }
		{ last = $0 } END { n = split(last, v, ";"); s = 0; for (i in c) s += v[i]; print s }' "$f"
}

# wait_stat NAME COLUMN MIN SECONDS: wait until a stat reaches MIN
wait_stat() {
	local i
	for i in $(seq 1 $(($4 * 5))); do
		(($(sipp_stat "$1" "$2") >= $3)) && return 0
		sleep 0.2
	done
	return 1
}

# --- Kamailio (the PBX) -----------------------------------------------------------------------

start_kamailio() {
	local d=$WORK/kamailio
	mkdir -p "$d"
	kamailio -f "${KAMAILIO_CFG:-$HERE/kamailio-pbx.cfg}" -DD -E -Y "$d" -P "$d/kamailio.pid" -m 64 -M 8 \
		>"$d/kamailio.log" 2>&1 &
	KAM_PID=$!
	BG_PID[kamailio]=$KAM_PID
	local i
	for i in $(seq 1 50); do
		if sipsak -s "sip:$PBX_ADDR:$PBX_PORT" -l 5099 >/dev/null 2>&1; then return 0; fi
		kill -0 "$KAM_PID" 2>/dev/null || break
		sleep 0.2
	done
	return 1
}

# --- sipwarden --------------------------------------------------------------------------------

# start_sipwarden INCOMING TRANSPORT: a fresh sipwarden (new state file) with this upstream mode
start_sipwarden() {
	local incoming=${1:-path} transport=${2:-udp}
	stop_sipwarden
	SW_RUN=$((${SW_RUN:-0} + 1))
	local d=$WORK/sipwarden-$SW_RUN
	mkdir -p "$d"
	sed -e "s|^path = .*|path = \"$d/sipwarden.db\"|" \
		-e "s|^incoming = .*|incoming = \"$incoming\"|" \
		-e "s|^transport = .*|transport = \"$transport\"|" \
		"$HERE/proxy.toml" >"$d/proxy.toml"
	NO_COLOR=1 "$SIPWARDEN_BIN" run -c "$d/proxy.toml" >"$d/sipwarden.log" 2>&1 &
	SW_PID=$!
	BG_PID[sipwarden]=$SW_PID
	SW_LOG=$d/sipwarden.log
	SW_MODE="$incoming/$transport"
	local i
	for i in $(seq 1 100); do
		if [[ $(curl -sS --max-time 1 "$API/healthz" 2>/dev/null) == ok* ]]; then
			log "sipwarden #$SW_RUN up (incoming=$incoming, upstream transport=$transport), log $SW_LOG"
			return 0
		fi
		kill -0 "$SW_PID" 2>/dev/null || break
		sleep 0.1
	done
	SW_MODE=""
	return 1
}

stop_sipwarden() {
	[[ -n ${BG_PID[sipwarden]:-} ]] && stop_bg sipwarden TERM
	SW_PID=""
	SW_MODE=""
}

# ensure_sipwarden NAME INCOMING TRANSPORT: reuse a running sipwarden in that mode or start one;
# a failure to start is a FAIL of test NAME.
ensure_sipwarden() {
	[[ ${DIRECT:-0} == 1 ]] && return 0
	[[ $SW_MODE == "$2/$3" ]] && kill -0 "$SW_PID" 2>/dev/null && return 0
	start_sipwarden "$2" "$3" && return 0
	fail "$1" "sipwarden did not start (no 'ok' from $API/healthz)" "$SW_LOG"
	return 1
}

# --- admin API --------------------------------------------------------------------------------

blocks_json() { curl -sS --max-time 2 "$API/api/blocks" 2>/dev/null || echo '[]'; }

# has_block IP TYPES [PORTMODE]: a block for IP with a type in TYPES ("SCAN,SCANNER", "*" any);
# PORTMODE: any (default) | port (a non-null port) | addr (port null, the whole address) | N (port N)
has_block() {
	local ip=$1 types=$2 mode=${3:-any}
	blocks_json | jq -e --arg ip "$ip" --arg types "$types" --arg mode "$mode" '
		[ .[] | select(.ip == $ip)
		      | select($types == "*" or (.type as $t | ($types | split(",")) | index($t)))
		      | select($mode == "any" or ($mode == "port" and .port != null)
		                              or ($mode == "addr" and .port == null)
		                              or (($mode | test("^[0-9]+$")) and .port == ($mode | tonumber))) ]
		| length > 0' >/dev/null 2>&1
}

# any_block IP: some block (any type, any port) exists for IP
any_block() {
	blocks_json | jq -e --arg ip "$1" '[.[] | select(.ip == $ip)] | length > 0' >/dev/null 2>&1
}

# wait_block IP TYPES SECONDS [PORTMODE]
wait_block() {
	local i
	for i in $(seq 1 $(($3 * 5))); do
		has_block "$1" "$2" "${4:-any}" && return 0
		sleep 0.2
	done
	return 1
}

# wait_unblock IP SECONDS: until no block lists IP
wait_unblock() {
	local i
	for i in $(seq 1 $(($2 * 2))); do
		any_block "$1" || return 0
		sleep 0.5
	done
	return 1
}

# --- phones -----------------------------------------------------------------------------------

# start_callee NAME TRANSPORT-ARGS: 1002 on 127.0.0.3:5063 re-registers every 2 s and answers
# calls on the same socket / TCP connection (out-of-call scenario).  Waits for the first 200.
start_callee() {
	local name=$1
	shift
	sipp_bg "$name" "$SW_SIP" "$@" -sf "$SCEN/register.xml" -oocsf "$SCEN/call-uas.xml" \
		-s 1002 -au 1002 -ap secret1002 -i 127.0.0.3 -p 5063 \
		-m 300 -r 1 -rp 2000 -recv_timeout 8000 -timeout 400s -default_behaviors all,-abortunexp
	wait_stat "$name" 'SuccessfulCall(C)' 1 10
}
