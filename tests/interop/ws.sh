#!/usr/bin/env bash
# SIP over WebSocket interop suite (issue 12): JsSIP in headless Debian chromium (playwright-core)
# registers through sipwarden over WS and WSS to Kamailio on UDP and answers calls placed by sipp
# through sipwarden.  Loopback only, a layout of its own so it can run beside the other suites:
#
#   JsSIP 1001  ws://127.0.0.1:5765   --\
#   JsSIP 1002  wss://127.0.0.1:5766  ---> sipwarden SIP 127.0.0.1:5760 udp+tcp, WS 5765,
#   sipp caller 1003  127.0.0.61      --/     TLS+WSS on one port 5766, admin 127.0.0.1:8780
#   upgrade flood 127.0.0.62, no-subprotocol client 127.0.0.63
#   Kamailio (a copy of kamailio-pbx.cfg)  127.0.0.60:5780 udp  <-- upstream
#   test page (node http in jssip.test.mjs)  127.0.0.1:8790
#
# Cases: register-ws, register-wss (JsSIP registered, REGISTER with digest through sipwarden),
# call-ws, call-wss (sipp calls the JsSIP phone with a WebRTC offer: answered, ACKed and hung up
# with BYE, all through sipwarden), tls-shared-port (SIP over TLS still answered on the WSS port),
# no-subprotocol (a client that does not offer "sip" gets HTTP 400, counted in /metrics),
# oversized (a 70000-byte frame closes the connection, counted), flood (upgrade attempts
# without "sip" from one address: it is blocked, its next connection gets no answer, and JsSIP
# 1001 keeps registering and answering meanwhile).
#
# usage: tests/interop/ws.sh        env: SIPWARDEN_BIN (default target/release/sipwarden; never
#        built here), KEEP=1 keeps the work dir (always kept on failure).
# Needs: kamailio, sipp, sipsak, curl, jq, openssl, node 20+, npm (jssip, playwright-core and
# esbuild from tests/interop/ws/package-lock.json, installed on first run), /usr/bin/chromium.
set -uo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
# shellcheck source=tests/interop/lib.sh
source "$HERE/lib.sh"
W=$HERE/ws

PBX_ADDR=127.0.0.60
PBX_PORT=5780
SW_SIP=127.0.0.1:5760
WS_URL=ws://127.0.0.1:5765
WSS_URL=wss://127.0.0.1:5766
API=http://127.0.0.1:8780
CALLER_IP=127.0.0.61
FLOOD_IP=127.0.0.62
NOPROTO_IP=127.0.0.63

WORK=$(mktemp -d /tmp/sipwarden-ws.XXXXXX)
BROWSER_OUT=$WORK/browser/out.txt

cleanup() {
	touch "$WORK/done"
	sleep 0.5
	stop_all_bg
	if ((FAILED == 0)) && [[ ${KEEP:-0} != 1 ]]; then
		rm -rf "$WORK"
	else
		echo "work dir kept: $WORK"
	fi
}
trap cleanup EXIT

# browser_lines PATTERN: how many lines of the browser's output match (grep -E)
browser_lines() { grep -cE -- "$1" "$BROWSER_OUT" 2>/dev/null || true; }

# wait_browser PATTERN MIN SECONDS
wait_browser() {
	local i
	for i in $(seq 1 $(($3 * 10))); do
		(($(browser_lines "$1") >= $2)) && return 0
		kill -0 "${BG_PID[browser]:-0}" 2>/dev/null || return 1
		sleep 0.1
	done
	return 1
}

# metric NAME-REGEX: the value of the first /metrics line matching
metric() {
	curl -sS --max-time 2 "$API/metrics" 2>/dev/null | grep -E "^$1 " | head -1 | awk '{ print $2 }'
}

# upgrade IP PROTOCOL: a WebSocket upgrade request with curl from IP (empty PROTOCOL: none
# offered); prints the HTTP status (000: no answer), the body lands in $WORK/upgrade.body
upgrade() {
	local ip=$1 proto=$2 extra=()
	[[ -n $proto ]] && extra=(-H "Sec-WebSocket-Protocol: $proto")
	curl -sS --max-time 3 --interface "$ip" -o "$WORK/upgrade.body" -w '%{http_code}' \
		-H 'Connection: Upgrade' -H 'Upgrade: websocket' -H 'Sec-WebSocket-Version: 13' \
		-H 'Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==' "${extra[@]}" \
		"http://127.0.0.1:5765/" 2>/dev/null || true
}

# call NAME CALLEE: one sipp call (WebRTC offer) from 1003 to CALLEE through sipwarden
call() {
	sipp_fg "$1" 45 "$SW_SIP" -sf "$W/call-webrtc.xml" -key caller 1003 -s "$2" \
		-au 1003 -ap secret1003 -i "$CALLER_IP" -p 5781 -m 1 \
		-recv_timeout 15000 -timeout 40s -default_behaviors all,-abortunexp
	[[ $(sipp_stat "$1" 'SuccessfulCall(C)') == 1 ]]
}

setup() {
	for t in kamailio sipp sipsak curl jq openssl node npm; do
		command -v "$t" >/dev/null || { fail setup "$t not installed"; return 1; }
	done
	[[ -x $SIPWARDEN_BIN ]] || { fail setup "$SIPWARDEN_BIN not found: cargo build --release first"; return 1; }
	if [[ ! -d $W/node_modules/jssip || ! -d $W/node_modules/playwright-core ]]; then
		log "npm ci in $W"
		(cd "$W" && timeout 300 npm ci --no-audit --no-fund >"$WORK/npm.log" 2>&1) ||
			{ fail setup "npm ci failed" "$WORK/npm.log"; return 1; }
	fi
	# JsSIP ships CommonJS only: one browser bundle, made at test time.
	(cd "$W" && timeout 60 npx esbuild node_modules/jssip/lib-es5/JsSIP.js --bundle --format=iife \
		--global-name=JsSIP --outfile="$WORK/jssip.bundle.js" >"$WORK/esbuild.log" 2>&1) ||
		{ fail setup "esbuild bundle of jssip failed" "$WORK/esbuild.log"; return 1; }
	# A self-signed certificate for the TLS+WSS port (the browser runs with
	# --ignore-certificate-errors).
	openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj /CN=localhost \
		-addext "subjectAltName=IP:127.0.0.1,DNS:localhost" \
		-keyout "$WORK/key.pem" -out "$WORK/cert.pem" >"$WORK/openssl.log" 2>&1 ||
		{ fail setup "openssl req failed" "$WORK/openssl.log"; return 1; }

	sed -e "s/127\.0\.0\.10:5080/$PBX_ADDR:$PBX_PORT/g" "$HERE/kamailio-pbx.cfg" >"$WORK/kamailio-pbx.cfg"
	KAMAILIO_CFG=$WORK/kamailio-pbx.cfg start_kamailio ||
		{ fail setup "Kamailio did not start" "$WORK/kamailio/kamailio.log"; return 1; }

	mkdir -p "$WORK/sipwarden"
	cat >"$WORK/sipwarden/proxy.toml" <<-EOF
		# generated by tests/interop/ws.sh
		[sip]
		listen_udp = ["$SW_SIP"]
		listen_tcp = ["$SW_SIP"]
		listen_ws = ["127.0.0.1:5765"]
		listen_tls = ["127.0.0.1:5766"]
		listen_wss = ["127.0.0.1:5766"]
		[tls]
		certificate = "$WORK/cert.pem"
		private_key = "$WORK/key.pem"
		[upstream]
		address = "$PBX_ADDR:$PBX_PORT"
		transport = "udp"
		incoming = "path"
		[admin]
		listen = "127.0.0.1:8780"
		[state]
		path = "$WORK/sipwarden/state.db"
	EOF
	NO_COLOR=1 RUST_LOG=${RUST_LOG:-debug} "$SIPWARDEN_BIN" run -c "$WORK/sipwarden/proxy.toml" \
		>"$WORK/sipwarden/sipwarden.log" 2>&1 &
	BG_PID[sipwarden]=$!
	SW_LOG=$WORK/sipwarden/sipwarden.log
	local i up=0
	for i in $(seq 1 100); do
		if [[ $(curl -sS --max-time 1 "$API/healthz" 2>/dev/null) == ok* ]]; then up=1; break; fi
		kill -0 "${BG_PID[sipwarden]}" 2>/dev/null || break
		sleep 0.1
	done
	((up)) || { fail setup "sipwarden did not start" "$SW_LOG"; return 1; }
	log "sipwarden up, log $SW_LOG"

	tool_bg browser 175 env JSSIP_BUNDLE="$WORK/jssip.bundle.js" DONE_FILE="$WORK/done" \
		OVERSIZE_FILE="$WORK/oversize" USER_DATA_DIR="$WORK/chromium" MAX_SECONDS=170 \
		node "$W/jssip.test.mjs" "ws,$WS_URL,1001,secret1001" "wss,$WSS_URL,1002,secret1002"
}

main() {
	echo "== ws interop (work dir $WORK)"
	setup || return 1

	if wait_browser '^ws REGISTERED' 1 30; then
		pass register-ws "JsSIP 1001 registered over $WS_URL"
	else
		fail register-ws "JsSIP 1001 not registered over WS" "$BROWSER_OUT" "$SW_LOG"
	fi
	if wait_browser '^wss REGISTERED' 1 30; then
		pass register-wss "JsSIP 1002 registered over $WSS_URL (TLS and WSS on one port)"
	else
		fail register-wss "JsSIP 1002 not registered over WSS" "$BROWSER_OUT" "$SW_LOG"
	fi

	local name user
	for name in ws wss; do
		[[ $name == ws ]] && user=1001 || user=1002
		if call "call-$name" "$user" && wait_browser "^$name ENDED" 1 10 &&
			(($(browser_lines "^$name CONFIRMED") >= 1)); then
			pass "call-$name" "sipp called $user, JsSIP answered over ${name^^}, ACK and BYE through sipwarden"
		else
			fail "call-$name" "the call to JsSIP $user over ${name^^} did not complete" \
				"$WORK/call-$name" "$BROWSER_OUT"
		fi
	done

	# SIP over TLS on the shared port: an OPTIONS answered by the PBX.
	local opt resp
	opt=$'OPTIONS sip:127.0.0.60:5780 SIP/2.0\r\nVia: SIP/2.0/TLS 127.0.0.1:5099;branch=z9hG4bKwstls1;rport\r\nMax-Forwards: 70\r\nFrom: <sip:probe@sipwarden.test>;tag=t1\r\nTo: <sip:127.0.0.60:5780>\r\nCall-ID: ws-tls-shared-1\r\nCSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n'
	resp=$({ printf '%s' "$opt"; sleep 2; } | timeout 6 openssl s_client -quiet -connect 127.0.0.1:5766 2>/dev/null | head -1)
	check tls-shared-port '[[ $resp == "SIP/2.0 200"* ]]' \
		"SIP over TLS on the WSS port answered: ${resp%$'\r'}" "$SW_LOG"

	# A client offering no "sip" subprotocol.
	local code
	code=$(upgrade "$NOPROTO_IP" "")
	check no-subprotocol '[[ $code == 400 ]] && grep -q subprotocol "$WORK/upgrade.body" &&
		(( $(metric "sipwarden_ws_upgrades(_total)?\\{outcome=\"no_subprotocol\"\\}" | cut -d. -f1) >= 1 ))' \
		"HTTP $code: $(head -c 120 "$WORK/upgrade.body" 2>/dev/null | tr -d '\n'); counted in /metrics" "$SW_LOG"

	# An oversized frame (70000 bytes > websocket.max_frame_bytes 65536) from the browser.
	touch "$WORK/oversize"
	if wait_browser '^ws OVERSIZED_CLOSED' 1 10 &&
		(($(metric 'sipwarden_ws_oversized(_total)?' | cut -d. -f1) >= 1)); then
		pass oversized "$(grep -m1 OVERSIZED_CLOSED "$BROWSER_OUT"); sipwarden_ws_oversized counted"
	else
		fail oversized "the oversized frame did not close the connection" "$BROWSER_OUT" "$SW_LOG"
	fi

	# An upgrade flood from one address: blocked; JsSIP keeps working.
	local _ codes=""
	for _ in $(seq 1 30); do
		codes+="$(upgrade "$FLOOD_IP" chat) "
		has_block "$FLOOD_IP" ANOMALY && break
	done
	if wait_block "$FLOOD_IP" ANOMALY 5 2>/dev/null || has_block "$FLOOD_IP" ANOMALY; then
		code=$(upgrade "$FLOOD_IP" sip)
		check flood-blocked '[[ $code == 000 ]]' \
			"$FLOOD_IP blocked (ANOMALY) after answers: $codes; its next upgrade gets no answer ($code)" api
	else
		fail flood-blocked "$FLOOD_IP not blocked after 30 refused upgrades ($codes)" api "$SW_LOG"
	fi
	if call call-ws-after-flood 1001 && wait_browser '^ws ENDED' 2 10 &&
		(($(browser_lines '^ws DISCONNECTED') == 0)); then
		pass flood-jssip-unaffected "JsSIP 1001 still connected and answering after the flood"
	else
		fail flood-jssip-unaffected "JsSIP 1001 affected by the flood" "$WORK/call-ws-after-flood" "$BROWSER_OUT"
	fi

	echo "open ws connections: $(metric 'sipwarden_ws_connections_open'); upgrades ok: $(metric 'sipwarden_ws_upgrades(_total)?\{outcome="ok"\}')"
}

main
echo "$PASSED passed, $FAILED failed"
((FAILED == 0))
