#!/usr/bin/env bash
# sipwarden interop suite: real SIP programs (sipp, sipsak, baresip, sipvicious) against the
# real binary, with Kamailio as the PBX behind it.  Loopback only:
#
#   phones (sipp, sipsak, baresip) 127.0.0.2 .. 127.0.0.7   --\
#   attackers: sipvicious 127.0.0.1, sipp 127.0.0.4-6          >-- sipwarden 127.0.0.1:5060 udp+tcp
#                                                            --/     admin 127.0.0.1:8080
#   Kamailio (registrar + proxy, digest auth) 127.0.0.10:5080  <-- upstream
#
# usage: tests/interop/run.sh [all|core|attacks|TEST...]      (TEST: a name listed by --list)
# env:   DIRECT=1 runs the core tests straight against Kamailio (no sipwarden): a self-test of
#        the suite and the PBX config.
#        SNIFF=0 turns off the loopback SIP capture ($WORK/sip-trace.txt, root only) whose
#        messages of the first failed call are printed under a FAIL.
#        SIPWARDEN_BIN (default target/release/sipwarden, built if missing), KEEP=1 keeps the
#        work dir (it is always kept when a check fails).
# Prints one PASS/FAIL line per check and ends with "N passed, M failed"; exit 1 on failures.
set -uo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
# shellcheck source=tests/interop/lib.sh
source "$HERE/lib.sh"

CORE_TESTS=(core_udp core_tcp core_pbx_answers core_sipsak core_baresip core_upstream_tcp
	core_contact_udp core_contact_tcp)
ATTACK_TESTS=(attack_svmap attack_svwar attack_svwar_fake_ua attack_svcrack attack_register_guess
	attack_nat attack_invite_flood)

CALLS=20       # calls per core call test
CALL_RATE=4    # calls/s: 2 INVITEs per call (407 challenge), under invite.rate_limit = 10/s
HIT_COUNT=5    # [register] hit_count in proxy.toml
BLOCK_TIME=20  # [register] / [scanners] block_time in proxy.toml, seconds

# --- the legitimate phones --------------------------------------------------------------------

# calls_test NAME SIPP-TRANSPORT-ARGS...: 1002 registers (re-registering every 2 s) and answers,
# 1001 makes $CALLS authenticated calls to it, all through sipwarden.  Checks NAME-register
# (every registration of 1002 answered 200) and NAME-calls (every call completed).
calls_test() {
	local name=$1
	shift
	if ! start_callee "$name-callee" "$@"; then
		stop_bg "$name-callee" USR1
		fail "$name-register" "1002 did not register through sipwarden within 10 s" \
			"$WORK/$name-callee" "$SW_LOG"
		fail "$name-calls" "not run: the callee is not registered"
		return
	fi
	sipp_fg "$name-calls" 90 "$SW_SIP" "$@" -sf "$SCEN/call-uac.xml" -key caller 1001 -s 1002 \
		-au 1001 -ap secret1001 -i 127.0.0.2 -p 5062 -m "$CALLS" -r "$CALL_RATE" \
		-recv_timeout 8000 -timeout 80s -default_behaviors all,-abortunexp
	local rc=$? ok failed
	ok=$(sipp_stat "$name-calls" 'SuccessfulCall(C)')
	failed=$(sipp_stat "$name-calls" 'FailedCall(C)')
	check "$name-calls" "[[ $rc == 0 && $ok == $CALLS && $failed == 0 ]]" \
		"$ok/$CALLS calls completed, $failed failed (sipp exit $rc)" \
		"$WORK/$name-calls" "$WORK/$name-callee" "$SW_LOG"
	stop_bg "$name-callee" USR1
	if [[ ${DIRECT:-0} != 1 ]]; then
		# the PBX must not reach the phone directly: its INVITEs arrive with sipwarden's Via on top
		local total via_sw
		read -r total via_sw < <(awk '/^INVITE sip:/ { inv = 1; next }
			inv && /^Via:/ { n++; if (index($0, " 127.0.0.1:5060")) sw++; inv = 0 }
			END { print n + 0, sw + 0 }' "$WORK/$name-callee/messages.log" 2>/dev/null)
		check "$name-through-sipwarden" "[[ $total -ge 1 && $via_sw == $total ]]" \
			"$via_sw of the $total INVITEs reaching the callee came through sipwarden" \
			"$WORK/$name-callee"
	fi
	ok=$(sipp_log "$name-callee" UAS-OK)
	failed=$(sipp_log "$name-callee" UAS-FAILED)
	check "$name-answered" "[[ $ok == $CALLS && $failed == 0 ]]" \
		"the callee saw $ok/$CALLS calls through to the BYE (INVITE, ACK, BYE), $failed broken" \
		"$WORK/$name-callee" "$SW_LOG"
	ok=$(sipp_stat "$name-callee" 'SuccessfulCall(C)')
	failed=$(sipp_stat "$name-callee" 'FailedCall(C)')
	check "$name-register" "[[ $ok -ge 1 && $failed == 0 ]]" \
		"1002 registered $ok times with digest auth, $failed failed" "$WORK/$name-callee" "$SW_LOG"
}

# legit_start TAG: background traffic during an attack.  1002 (127.0.0.3) re-registers every
# 2 s and answers, 1001 re-registers every second from 127.0.0.2:5072 and calls 1002 twice a
# second from 127.0.0.2:5062.
legit_start() {
	local tag=$1
	start_callee "$tag-callee" || return 1
	sipp_bg "$tag-register" "$SW_SIP" -sf "$SCEN/register.xml" -s 1001 -au 1001 -ap secret1001 \
		-i 127.0.0.2 -p 5072 -m 400 -r 1 -rp 1000 -recv_timeout 8000 -timeout 400s
	sipp_bg "$tag-caller" "$SW_SIP" -sf "$SCEN/call-uac.xml" -key caller 1001 -s 1002 \
		-au 1001 -ap secret1001 -i 127.0.0.2 -p 5062 -m 800 -r 2 -recv_timeout 8000 \
		-timeout 400s -default_behaviors all,-abortunexp
	sleep 2
}

# legit_check TAG: stop the background phones (caller first, it finishes its calls) and check
# that nothing legitimate failed while the attack ran.
legit_check() {
	local tag=$1 calls cfail regs rfail cregs crfail
	stop_bg "$tag-caller" USR1
	stop_bg "$tag-register" USR1
	stop_bg "$tag-callee" USR1
	calls=$(sipp_stat "$tag-caller" 'SuccessfulCall(C)')
	# a call fails if the caller says so or the callee missed its ACK or BYE
	cfail=$(($(sipp_stat "$tag-caller" 'FailedCall(C)') + $(sipp_log "$tag-callee" UAS-FAILED)))
	regs=$(sipp_stat "$tag-register" 'SuccessfulCall(C)')
	rfail=$(sipp_stat "$tag-register" 'FailedCall(C)')
	cregs=$(sipp_stat "$tag-callee" 'SuccessfulCall(C)')
	crfail=$(sipp_stat "$tag-callee" 'FailedCall(C)')
	check "$tag-legit-phones" \
		"[[ $calls -ge 3 && $cfail == 0 && $regs -ge 3 && $rfail == 0 && $cregs -ge 1 && $crfail == 0 ]]" \
		"meanwhile: $calls calls ok/$cfail failures (caller or callee side), $((regs + cregs)) registrations ok/$((rfail + crfail)) failed" \
		"$WORK/$tag-caller" "$WORK/$tag-register" "$WORK/$tag-callee" api "$SW_LOG"
}

# attack_begin TAG: a fresh sipwarden (no strikes left from an earlier test) with the phones on
attack_begin() {
	stop_sipwarden
	if ! start_sipwarden path udp; then
		fail "$1" "sipwarden did not start (no 'ok' from $API/healthz)" "$SW_LOG"
		return 1
	fi
	if ! legit_start "$1"; then
		fail "$1" "the legitimate phone 1002 did not register through sipwarden" \
			"$WORK/$1-callee" "$SW_LOG"
		stop_all_bg_phones "$1"
		return 1
	fi
}

stop_all_bg_phones() {
	stop_bg "$1-caller" USR1
	stop_bg "$1-register" USR1
	stop_bg "$1-callee" USR1
}

# run_tool NAME SECONDS command...: a non-sipp program, output in $WORK/NAME/out.txt
run_tool() {
	local name=$1 secs=$2
	shift 2
	local d=$WORK/$name
	rm -rf "$d" && mkdir -p "$d"
	echo "$*" >"$d/cmd"
	(cd "$d" && timeout -k 5 "$secs" "$@" </dev/null >"$d/out.txt" 2>&1)
	local rc=$?
	echo "$rc" >"$d/rc"
	return "$rc"
}

# --- phase 1: the proxy core (issue #2) -------------------------------------------------------

core_udp() {
	ensure_sipwarden core-udp path udp || return
	calls_test core-udp
}

core_tcp() {
	ensure_sipwarden core-tcp path udp || return
	calls_test core-tcp -t t1
}

# The PBX's refusals reach the phone: 403 for a wrong password, 404 for an unknown user.
core_pbx_answers() {
	ensure_sipwarden core-pbx-answers path udp || return
	sipp_fg core-wrong-password 20 "$SW_SIP" -sf "$SCEN/guess.xml" -s 1004 -au 1004 -ap wrong \
		-i 127.0.0.4 -p 5064 -m 1 -nr -timeout 15s
	local n
	n=$(sipp_count core-wrong-password _403_Recv)
	check core-wrong-password "[[ $n == 1 ]]" "the PBX's 403 to a wrong password came back ($n)" \
		"$WORK/core-wrong-password" "$SW_LOG"
	sipp_fg core-unknown-user 20 "$SW_SIP" -sf "$SCEN/guess.xml" -s 2001 -au 2001 -ap x \
		-i 127.0.0.4 -p 5064 -m 1 -nr -timeout 15s
	n=$(sipp_count core-unknown-user _404_Recv)
	check core-unknown-user "[[ $n == 1 ]]" "the PBX's 404 to an unknown user came back ($n)" \
		"$WORK/core-unknown-user" "$SW_LOG"
}

core_sipsak() {
	ensure_sipwarden core-sipsak path udp || return
	run_tool core-sipsak 30 sipsak -U -C sip:1003@127.0.0.1:5073 -s "sip:1003@$SW_SIP" \
		-u 1003 -a secret1003 -x 120 -S -l 5073 -vvv
	local rc=$?
	check core-sipsak "[[ $rc == 0 ]] && grep -q 'SIP/2.0 200 OK' '$WORK/core-sipsak/out.txt'" \
		"sipsak registered 1003 with digest auth through sipwarden (exit $rc)" \
		"$WORK/core-sipsak" "$SW_LOG"
}

# baresip 1007 registers with sipwarden as its outbound proxy and auto-answers; sipp 1001 calls it.
core_baresip() {
	ensure_sipwarden core-baresip path udp || return
	local d=$WORK/core-baresip
	rm -rf "$d" && mkdir -p "$d/conf"
	cat >"$d/conf/config" <<-EOF
		poll_method		epoll
		sip_listen		127.0.0.7:5067
		net_interface		127.0.0.7
		audio_player		aufile,/dev/null
		audio_source		ausine,440
		audio_alert		aufile,/dev/null
		ausrc_srate		48000
		auplay_srate		48000
		ausrc_channels		2
		auplay_channels		2
		module_path		/usr/lib/baresip/modules
		module			g711.so
		module			ausine.so
		module			aufile.so
		module_app		account.so
		module_app		menu.so
	EOF
	echo "<sip:1007@sipwarden.test>;auth_pass=secret1007;outbound=\"sip:$SW_SIP\";regint=60;answermode=auto" \
		>"$d/conf/accounts"
	echo "baresip -f $d/conf -s" >"$d/cmd"
	baresip -f "$d/conf" -t 60 -s </dev/null >"$d/out.txt" 2>&1 &
	BG_PID[core-baresip]=$!
	local i registered=0
	for i in $(seq 1 50); do
		if grep -q '1007@sipwarden.test: .*200 OK' "$d/out.txt"; then registered=1; break; fi
		sleep 0.2
	done
	check core-baresip-register "[[ $registered == 1 ]]" \
		"baresip registered 1007 with digest auth via outbound proxy sipwarden" "$d" "$SW_LOG"
	if [[ $registered == 1 ]]; then
		sipp_fg core-baresip-calls 60 "$SW_SIP" -sf "$SCEN/call-uac.xml" -key caller 1001 -s 1007 \
			-au 1001 -ap secret1001 -i 127.0.0.2 -p 5062 -m 3 -r 1 -recv_timeout 8000 \
			-timeout 50s -default_behaviors all,-abortunexp
		local rc=$? ok
		ok=$(sipp_stat core-baresip-calls 'SuccessfulCall(C)')
		check core-baresip-calls "[[ $rc == 0 && $ok == 3 ]]" \
			"sipp 1001 -> baresip 1007 through sipwarden: $ok/3 calls (sipp exit $rc)" \
			"$WORK/core-baresip-calls" "$d" "$SW_LOG"
	else
		fail core-baresip-calls "not run: baresip did not register"
	fi
	stop_bg core-baresip TERM
}

core_upstream_tcp() {
	ensure_sipwarden core-upstream-tcp path tcp || return
	calls_test core-upstream-tcp-udp
	calls_test core-upstream-tcp-tcp -t t1
}

core_contact_udp() {
	ensure_sipwarden core-contact-udp contact udp || return
	calls_test core-contact-udp
}

core_contact_tcp() {
	ensure_sipwarden core-contact-tcp contact udp || return
	calls_test core-contact-tcp -t t1
}

# --- phase 2: the protection engine (issue #3) ------------------------------------------------

# After each attack: "blocked" is checked while the attack still runs (poll the API), the
# outcome ("stopped") once it has ended.

# svmap's OPTIONS (User-Agent friendly-scanner): immediate SCANNER block, no answer.
attack_svmap() {
	attack_begin attack-svmap || return
	tool_bg attack-svmap 60 svmap -p 5060 127.0.0.1
	check attack-svmap-blocked "wait_block 127.0.0.1 SCANNER 15" \
		"svmap's source 127.0.0.1 is blocked as SCANNER" api "$WORK/attack-svmap" "$SW_LOG"
	wait_bg attack-svmap 60
	check attack-svmap-no-answer "! grep -q '^| 127.0.0.1:5060' '$WORK/attack-svmap/out.txt'" \
		"svmap found no SIP device behind sipwarden" "$WORK/attack-svmap"
	legit_check attack-svmap
}

# svwar enumerating extensions: the unknown ones (2000-2199, answered 404) come first, the 10
# real ones (1001-1010) last; a block must stop it before it gets there.
attack_svwar() {
	attack_begin attack-svwar || return
	tool_bg attack-svwar 90 svwar -e2000-2199,1000-1010 -m REGISTER -p 5060 127.0.0.1
	check attack-svwar-blocked "wait_block 127.0.0.1 SCAN,SCANNER 15" \
		"svwar's source 127.0.0.1 is blocked (SCAN or SCANNER)" api "$WORK/attack-svwar" "$SW_LOG"
	wait_bg attack-svwar 90
	local found
	found=$(grep -cE '^\| 10(0[1-9]|10) ' "$WORK/attack-svwar/out.txt")
	check attack-svwar-stopped "[[ $found -lt 10 ]]" \
		"svwar enumerated $found of the 10 extensions" "$WORK/attack-svwar"
	legit_check attack-svwar
}

# the same enumeration with a User-Agent that is not on any list: only the pattern detector
# (many distinct users answered 404 from one source) can catch it.
attack_svwar_fake_ua() {
	attack_begin attack-svwar-fake-ua || return
	tool_bg attack-svwar-fake-ua 90 /usr/bin/python3 "$HERE/sv-fake-ua.py" svwar \
		"Zoiper rv2.10.20.3" -e2000-2199,1000-1010 -m REGISTER -p 5060 127.0.0.1
	check attack-svwar-fake-ua-blocked "wait_block 127.0.0.1 SCAN 20" \
		"svwar with a fake User-Agent: 127.0.0.1 blocked as SCAN" api \
		"$WORK/attack-svwar-fake-ua" "$SW_LOG"
	wait_bg attack-svwar-fake-ua 90
	local found
	found=$(grep -cE '^\| 10(0[1-9]|10) ' "$WORK/attack-svwar-fake-ua/out.txt")
	check attack-svwar-fake-ua-stopped "[[ $found -lt 10 ]]" \
		"svwar (fake User-Agent) enumerated $found of the 10 extensions" "$WORK/attack-svwar-fake-ua"
	legit_check attack-svwar-fake-ua
}

# unblock_check NAME IP WAS-BLOCKED: the block on IP goes away by itself after block_time
unblock_check() {
	if [[ $3 != 1 ]]; then
		fail "$1" "not tested: $2 was never blocked"
		return
	fi
	check "$1" "wait_unblock $2 $((BLOCK_TIME + 20))" \
		"$2 unblocked by itself within block_time ${BLOCK_TIME}s (+20 s)" api "$SW_LOG"
}

# svcrack guessing 1001's password from a list that ends with the right one: blocked before it
# gets there, and unblocked by itself after block_time.
attack_svcrack() {
	attack_begin attack-svcrack || return
	local words=$WORK/words.txt i blocked=0
	: >"$words"
	for i in $(seq 1 40); do echo "guess$i" >>"$words"; done
	echo secret1001 >>"$words"
	tool_bg attack-svcrack 90 svcrack -u 1001 -d "$words" -p 5060 127.0.0.1
	wait_block 127.0.0.1 REGISTER,SCANNER 15 && blocked=1
	check attack-svcrack-blocked "[[ $blocked == 1 ]]" \
		"svcrack's source 127.0.0.1 is blocked (REGISTER or SCANNER)" api \
		"$WORK/attack-svcrack" "$SW_LOG"
	wait_bg attack-svcrack 90
	check attack-svcrack-no-password "! grep -q secret1001 '$WORK/attack-svcrack/out.txt'" \
		"svcrack did not find the password" "$WORK/attack-svcrack"
	legit_check attack-svcrack
	unblock_check attack-svcrack-unblock 127.0.0.1 "$blocked"
}

# sipp_guesser NAME IP PORT USER: wrong-password REGISTERs, 5/s, 40 at most, in the background
sipp_guesser() {
	sipp_bg "$1" "$SW_SIP" -sf "$SCEN/guess.xml" -s "$4" -au "$4" -ap wrong -i "$2" -p "$3" \
		-m 40 -r 5 -nr -timeout 40s
}

# a guesser with a normal User-Agent: the REGISTER brute-force detector (hit_count failures)
attack_register_guess() {
	attack_begin attack-register-guess || return
	local n blocked=0
	sipp_guesser attack-register-guess 127.0.0.4 5064 1004
	wait_block 127.0.0.4 REGISTER 15 && blocked=1
	check attack-register-guess-blocked "[[ $blocked == 1 ]]" \
		"the guesser 127.0.0.4 is blocked as REGISTER" api "$WORK/attack-register-guess" "$SW_LOG"
	wait_bg attack-register-guess 30
	n=$(sipp_count attack-register-guess _403_Recv)
	# the block comes with the hit_count-th failure; that 403 itself may or may not be relayed
	check attack-register-guess-limited "[[ $n -ge $((HIT_COUNT - 1)) && $n -le $((HIT_COUNT + 2)) ]]" \
		"$n wrong-password answers came back (hit_count $HIT_COUNT)" "$WORK/attack-register-guess"
	legit_check attack-register-guess
	unblock_check attack-register-guess-unblock 127.0.0.4 "$blocked"
	sipp_fg attack-register-guess-after 20 "$SW_SIP" -sf "$SCEN/register.xml" -s 1004 \
		-au 1004 -ap secret1004 -i 127.0.0.4 -p 5064 -m 1 -recv_timeout 5000 -timeout 15s
	local rc=$?
	check attack-register-guess-after "[[ $rc == 0 ]]" \
		"after the unblock 1004 registers from 127.0.0.4 again (sipp exit $rc)" \
		"$WORK/attack-register-guess-after" "$SW_LOG"
}

# NAT: a good phone (1005) and a bad device (1006, wrong password) behind one address
# 127.0.0.5.  Only the bad (address, port) may be blocked.
attack_nat() {
	attack_begin attack-nat || return
	sipp_bg attack-nat-good-register "$SW_SIP" -sf "$SCEN/register.xml" -s 1005 -au 1005 \
		-ap secret1005 -i 127.0.0.5 -p 5065 -m 400 -r 1 -rp 1000 -recv_timeout 8000 -timeout 400s
	sipp_bg attack-nat-good-caller "$SW_SIP" -sf "$SCEN/call-uac.xml" -key caller 1005 -s 1002 \
		-au 1005 -ap secret1005 -i 127.0.0.5 -p 5075 -m 800 -r 1 -recv_timeout 8000 \
		-timeout 400s -default_behaviors all,-abortunexp
	sleep 3
	sipp_guesser attack-nat-bad 127.0.0.5 5066 1006
	check attack-nat-port-blocked "wait_block 127.0.0.5 REGISTER,SCAN 15 5066" \
		"the guessing device's (127.0.0.5, 5066) is blocked" api "$WORK/attack-nat-bad" "$SW_LOG"
	check attack-nat-address-free "! has_block 127.0.0.5 '*' addr" \
		"the address 127.0.0.5 as a whole is not blocked" api
	wait_bg attack-nat-bad 30
	check attack-nat-address-free-after "! has_block 127.0.0.5 '*' addr" \
		"the address 127.0.0.5 as a whole is still not blocked after the guesser's $(sipp_count attack-nat-bad _REGISTER_Sent) REGISTERs" api
	stop_bg attack-nat-good-caller USR1
	stop_bg attack-nat-good-register USR1
	local calls cfail regs rfail
	calls=$(sipp_stat attack-nat-good-caller 'SuccessfulCall(C)')
	cfail=$(sipp_stat attack-nat-good-caller 'FailedCall(C)')
	regs=$(sipp_stat attack-nat-good-register 'SuccessfulCall(C)')
	rfail=$(sipp_stat attack-nat-good-register 'FailedCall(C)')
	check attack-nat-good-phone "[[ $calls -ge 3 && $cfail == 0 && $regs -ge 3 && $rfail == 0 ]]" \
		"the good phone behind the same address: $calls calls ok/$cfail failed, $regs registrations ok/$rfail failed" \
		"$WORK/attack-nat-good-caller" "$WORK/attack-nat-good-register" api "$SW_LOG"
	legit_check attack-nat
}

# an INVITE flood from 127.0.0.6 at 100/s (1000 INVITEs): invite.rate_limit 10/s, burst 20
attack_invite_flood() {
	attack_begin attack-invite-flood || return
	sipp_fg attack-invite-flood 60 "$SW_SIP" -sf "$SCEN/flood-invite.xml" -key caller 1008 \
		-s 1002 -i 127.0.0.6 -p 5068 -m 1000 -r 100 -nr -timeout 40s
	local sent passed rejected
	sent=$(sipp_count attack-invite-flood _INVITE_Sent)
	passed=$(sipp_count attack-invite-flood _407_Recv)
	rejected=$(sipp_count attack-invite-flood _503_Recv)
	check attack-invite-flood-limited "[[ $sent -ge 900 && $passed -le $((sent / 4)) ]]" \
		"$passed of $sent flood INVITEs reached the PBX (407), $rejected answered 503" \
		"$WORK/attack-invite-flood" api "$SW_LOG"
	check attack-invite-flood-503 "[[ $rejected -gt 0 ]]" \
		"excess INVITEs rejected with 503 (invite.action = reject): $rejected" \
		"$WORK/attack-invite-flood"
	legit_check attack-invite-flood
}

# --- main -------------------------------------------------------------------------------------

cleanup() {
	local name
	for name in "${!BG_PID[@]}"; do
		[[ $name == kamailio || $name == sipwarden || $name == sniffer ]] && continue
		stop_bg "$name"
	done
	stop_sipwarden
	[[ -n ${BG_PID[kamailio]:-} ]] && stop_bg kamailio TERM
	[[ -n ${BG_PID[sniffer]:-} ]] && stop_bg sniffer TERM
	if [[ ${KEEP:-0} == 1 || $FAILED -gt 0 ]]; then
		echo "work dir kept: $WORK"
	else
		rm -rf "$WORK"
	fi
}

usage() {
	echo "usage: $0 [all|core|attacks|TEST...]"
	echo "tests: ${CORE_TESTS[*]//_/-} ${ATTACK_TESTS[*]//_/-}"
}

main() {
	local selected=() arg
	[[ $# == 0 ]] && set -- all
	for arg in "$@"; do
		case $arg in
		all) selected+=("${CORE_TESTS[@]}" "${ATTACK_TESTS[@]}") ;;
		core) selected+=("${CORE_TESTS[@]}") ;;
		attacks) selected+=("${ATTACK_TESTS[@]}") ;;
		-h | --help | --list) usage; exit 0 ;;
		*)
			arg=${arg//-/_}
			if [[ " ${CORE_TESTS[*]} ${ATTACK_TESTS[*]} " == *" $arg "* ]]; then
				selected+=("$arg")
			else
				usage >&2
				exit 2
			fi
			;;
		esac
	done

	local tool missing=()
	for tool in sipp kamailio sipsak baresip svmap svwar svcrack curl jq timeout; do
		command -v "$tool" >/dev/null || missing+=("$tool")
	done
	if ((${#missing[@]})); then
		echo "missing programs: ${missing[*]}" >&2
		exit 2
	fi
	local busy
	busy=$(ss -Hlnptu 2>/dev/null | awk '$5 ~ /^(127\.0\.0\.1:(5060|8080)|127\.0\.0\.10:5080|0\.0\.0\.0:(5060|8080|5080)|\*:(5060|8080|5080))$/')
	if [[ -n $busy ]]; then
		echo "ports needed by the suite are in use:" >&2
		echo "$busy" >&2
		exit 2
	fi
	if [[ ${DIRECT:-0} != 1 && ! -x $SIPWARDEN_BIN ]]; then
		echo "building $SIPWARDEN_BIN (cargo build --release)"
		(cd "$REPO" && cargo build --release) || exit 2
	fi

	if [[ ${DIRECT:-0} == 1 ]]; then
		SW_SIP=$PBX_ADDR:$PBX_PORT
		echo "DIRECT=1: phones talk to Kamailio at $SW_SIP, no sipwarden"
	fi
	WORK=$(mktemp -d "${TMPDIR:-/tmp}/sipwarden-interop.XXXXXX")
	trap cleanup EXIT
	trap 'exit 130' INT TERM
	echo "sipwarden interop suite: $SIPWARDEN_BIN, work dir $WORK"

	start_sniffer
	if ! start_kamailio; then
		fail kamailio-start "Kamailio (the PBX) did not start on $PBX_ADDR:$PBX_PORT" \
			"$WORK/kamailio/kamailio.log"
	else
		local t started=$SECONDS
		for t in "${selected[@]}"; do
			log "${t//_/-}"
			"$t"
		done
		log "done in $((SECONDS - started)) s"
	fi
	if ((FAILED)); then echo "failed: ${FAILED_NAMES[*]}"; fi
	echo "$PASSED passed, $FAILED failed"
	((FAILED == 0))
}

main "$@"
