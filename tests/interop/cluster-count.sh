#!/usr/bin/env bash
# Cluster-wide counting (issue 13): two sipwarden nodes sharing one redis-server, Kamailio as the
# registrar PBX with digest auth, tftpd-hpa as the provisioning server. An attacker spread over
# both nodes must meet the limits of one:
#   1. a password guesser alternating between the nodes (sipp, wrong password) is blocked after
#      register.hit_count failures in total (+-1), on both nodes;
#   2. an INVITE flood from one source split evenly across both nodes reaches the PBX at
#      invite.rate_limit in total (+-10%), counted from the PBX's answers over a fixed window;
#   3. a TFTP client alternating between the nodes is limited after tftp.hit_count requests in
#      total.
# Addresses (its own, so it never meets another suite): nodes SIP 127.0.0.81:5960 and
# 127.0.0.82:5960 (TFTP :6960), admin 127.0.0.1:8961/8962, redis 127.0.0.1:6392, PBX
# 127.0.0.80:5980 (TFTP server :6980), attackers 127.0.0.85-87. About a minute.
#
#   tests/interop/cluster-count.sh      # uses target/release/sipwarden (SIPWARDEN_BIN)
#   GUESS_GAP=0 tests/interop/cluster-count.sh   # guesses back to back (default 0.25 s apart)
#   FLOOD_SECS=5 KEEP_WORK=1 ...                  # a shorter flood; keep the logs
set -u

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
WORK=$(mktemp -d /tmp/sipwarden-cluster-count.XXXXXX)
export HERE REPO WORK
# shellcheck source=lib.sh
. "$HERE/lib.sh"

PBX_ADDR=127.0.0.80
PBX_PORT=5980
NODE_IP=(127.0.0.81 127.0.0.82)
NODE_API=(http://127.0.0.1:8961 http://127.0.0.1:8962)
SIP_PORT=5960
TFTP_PORT=6960
REDIS_PORT=6392
HIT_COUNT=5
RATE=10
BURST=10
FLOOD_SECS=${FLOOD_SECS:-20}
FLOOD_RATE=50 # per node: 100/s offered in total
TFTP_HIT=20
TFTP_LIMITED=2

cleanup() {
	stop_all_bg
	if [[ ${KEEP_WORK:-0} == 1 ]]; then echo "kept $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

for tool in sipp kamailio redis-server redis-cli jq curl in.tftpd python3; do
	if ! command -v "$tool" >/dev/null; then
		fail prerequisites "$tool not installed"
		echo "$PASSED passed, $FAILED failed"
		exit 1
	fi
done
[[ -x $SIPWARDEN_BIN ]] || {
	fail prerequisites "no release binary at $SIPWARDEN_BIN (cargo build --release)"
	echo "$PASSED passed, $FAILED failed"
	exit 1
}

# --- peers ------------------------------------------------------------------------------------

redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly no \
	>"$WORK/redis.log" 2>&1 &
BG_PID[redis]=$!
for _ in $(seq 1 50); do
	redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1 && break
	sleep 0.1
done

sed -e "s/127\.0\.0\.10:5080/$PBX_ADDR:$PBX_PORT/g" "$HERE/kamailio-pbx.cfg" >"$WORK/kamailio.cfg"
KAMAILIO_CFG=$WORK/kamailio.cfg start_kamailio || {
	fail prerequisites "Kamailio did not answer on $PBX_ADDR:$PBX_PORT" "$WORK/kamailio/kamailio.log"
	echo "$PASSED passed, $FAILED failed"
	exit 1
}

mkdir -p "$WORK/tftproot"
head -c 3000 /dev/urandom | base64 >"$WORK/tftproot/phone.cfg"
chmod -R a+rX "$WORK" "$WORK/tftproot"
in.tftpd -L -s -u nobody -a "$PBX_ADDR:6980" "$WORK/tftproot" >"$WORK/tftpd.log" 2>&1 &
BG_PID[tftpd]=$!

# start_node N: node N (0 or 1) with its own state file and admin port
start_node() {
	local n=$1 ip=${NODE_IP[$1]} d=$WORK/node$1
	mkdir -p "$d"
	cat >"$d/proxy.toml" <<TOML
[sip]
listen_udp = ["$ip:$SIP_PORT"]
listen_tcp = ["$ip:$SIP_PORT"]

[upstream]
address = "$PBX_ADDR:$PBX_PORT"

[register]
hit_count = $HIT_COUNT
monit_period = "60s"
block_time = "60s"
block_threshold = 0

[invite]
rate_limit = $RATE
burst = $BURST
action = "reject"

[flood]
packets_per_second = 500

[tftp]
enabled = true
listen = "$ip:$TFTP_PORT"
upstream = "$PBX_ADDR:6980"
hit_count = $TFTP_HIT
limited_rate = $TFTP_LIMITED

[admin]
listen = "${NODE_API[$n]#http://}"

[state]
path = "$d/sipwarden.db"

[cluster]
redis_url = "redis://127.0.0.1:$REDIS_PORT/"
count_interval = "100ms"
peer_timeout = "10s"
TOML
	NO_COLOR=1 "$SIPWARDEN_BIN" run -c "$d/proxy.toml" >"$d/sipwarden.log" 2>&1 &
	BG_PID[node$n]=$!
	local i
	for i in $(seq 1 100); do
		[[ $(curl -sS --max-time 1 "${NODE_API[$n]}/healthz" 2>/dev/null) == ok* ]] && return 0
		kill -0 "${BG_PID[node$n]}" 2>/dev/null || break
		sleep 0.1
	done
	return 1
}

for n in 0 1; do
	start_node "$n" || {
		fail "node$n-up" "sipwarden node $n did not start" "$WORK/node$n/sipwarden.log"
		echo "$PASSED passed, $FAILED failed"
		exit 1
	}
done

metric() { # NODE NAME: a metric's value from node N's /metrics
	curl -sS --max-time 2 "${NODE_API[$1]}/metrics" 2>/dev/null | awk -v m="$2" '$1 == m { print $2 }'
}
node_blocked() { # NODE IP TYPE
	curl -sS --max-time 2 "${NODE_API[$1]}/api/blocks" 2>/dev/null |
		jq -e --arg ip "$2" --arg t "$3" '[.[] | select(.ip == $ip and .type == $t)] | length > 0' \
			>/dev/null 2>&1
}
wait_node_block() { # NODE IP TYPE SECONDS
	local i
	for i in $(seq 1 $(($4 * 5))); do
		node_blocked "$1" "$2" "$3" && return 0
		sleep 0.2
	done
	return 1
}

# Both nodes hear each other (each publishes a round only when it counted something, so wait
# for the first exchange below instead of for the peers gauge).
log "nodes up: ${NODE_IP[0]}:$SIP_PORT, ${NODE_IP[1]}:$SIP_PORT; redis 127.0.0.1:$REDIS_PORT; PBX $PBX_ADDR:$PBX_PORT"

# --- 1. password guesser alternating between the nodes ----------------------------------------

ATT1=127.0.0.85
guesses=0
failures=0
for i in $(seq 1 $((3 * HIT_COUNT))); do
	n=$(((i - 1) % 2))
	sipp_fg "guess-$i" 10 "${NODE_IP[$n]}:$SIP_PORT" -sf "$SCEN/guess.xml" -s 1004 -au 1004 \
		-ap "wrong$i" -i "$ATT1" -p 5085 -m 1 -nr -timeout 5s
	guesses=$i
	got=$(sipp_count "guess-$i" _403_Recv)
	failures=$((failures + got))
	# A new password each time: the same wrong password under the same nonce (Kamailio's
	# change once a second) is the same request, which sipwarden rightly counts once.
	# Once blocked, the guess goes unanswered; stop after two in a row.
	if ((got == 0)) && [[ ${last_got:-1} == 0 ]]; then break; fi
	last_got=$got
	sleep "${GUESS_GAP:-0.25}"
done
log "guesser: $failures wrong passwords answered 403 by the PBX over $guesses attempts alternating between the nodes (hit_count $HIT_COUNT; per-node counting would allow $((2 * HIT_COUNT)))"
check register-cluster-wide "(( failures >= HIT_COUNT - 1 && failures <= HIT_COUNT + 1 ))" \
	"blocked after $failures failures in total (hit_count $HIT_COUNT, +-1)" \
	"$WORK/node0/sipwarden.log" "$WORK/node1/sipwarden.log"
both=0
wait_node_block 0 "$ATT1" REGISTER 5 && wait_node_block 1 "$ATT1" REGISTER 5 && both=1
check register-blocked-on-both "[[ $both == 1 ]]" "$ATT1 blocked (REGISTER) on both nodes"

# --- 2. INVITE flood split across both nodes --------------------------------------------------

ATT2=127.0.0.86
m=$((FLOOD_RATE * FLOOD_SECS))
sipp_bg flood-0 "${NODE_IP[0]}:$SIP_PORT" -sf "$SCEN/flood-invite.xml" -key caller 1008 -s 1002 \
	-i "$ATT2" -p 5086 -m "$m" -r "$FLOOD_RATE" -nr -timeout $((FLOOD_SECS + 15))s
sipp_bg flood-1 "${NODE_IP[1]}:$SIP_PORT" -sf "$SCEN/flood-invite.xml" -key caller 1008 -s 1002 \
	-i "$ATT2" -p 5087 -m "$m" -r "$FLOOD_RATE" -nr -timeout $((FLOOD_SECS + 15))s
wait_bg flood-0 $((FLOOD_SECS + 20))
wait_bg flood-1 5
sent0=$(sipp_count flood-0 _INVITE_Sent)
sent1=$(sipp_count flood-1 _INVITE_Sent)
pbx0=$(sipp_count flood-0 _407_Recv)
pbx1=$(sipp_count flood-1 _407_Recv)
rej=$(($(sipp_count flood-0 _503_Recv) + $(sipp_count flood-1 _503_Recv)))
pbx=$((pbx0 + pbx1))
# The exact figure: rate x time, plus one burst (the cluster's bucket starts full).
exact=$((RATE * FLOOD_SECS + BURST))
log "INVITE flood: sent $sent0 + $sent1 over ${FLOOD_SECS}s, reached the PBX $pbx0 + $pbx1 = $pbx, rejected 503 $rej; exact $exact (rate $RATE/s x ${FLOOD_SECS}s + burst $BURST); per-node limits would let $((2 * exact)) through"
check invite-flood-sent "(( sent0 + sent1 >= 2 * m * 9 / 10 ))" "the flood ran: $((sent0 + sent1)) of $((2 * m)) INVITEs sent" \
	"$WORK/flood-0" "$WORK/flood-1"
check invite-cluster-wide "(( pbx * 10 >= exact * 9 && pbx * 10 <= exact * 11 ))" \
	"$pbx INVITEs reached the PBX, $exact exact (+-10%)" "$WORK/flood-0" "$WORK/node0/sipwarden.log"
check invite-both-nodes-share "(( pbx0 > 0 && pbx1 > 0 ))" "each node let part through ($pbx0 / $pbx1)"

# --- 3. TFTP requests alternating between the nodes -------------------------------------------

ATT3=127.0.0.87
served=0
asked=$((2 * TFTP_HIT + 10))
for i in $(seq 1 "$asked"); do
	n=$(((i - 1) % 2))
	if python3 "$HERE/tftp_client.py" get "${NODE_IP[$n]}" "$TFTP_PORT" phone.cfg "$WORK/got.cfg" \
		--bind "$ATT3" --timeout 0.3 >/dev/null 2>&1; then
		served=$((served + 1))
	fi
	sleep 0.1
done
# hit_count in total, then limited_rate a minute on each node.
tftp_exact=$((TFTP_HIT + 2 * TFTP_LIMITED))
log "TFTP: $served of $asked requests served alternating between the nodes; exact $tftp_exact (hit_count $TFTP_HIT in total + limited_rate $TFTP_LIMITED per node); per-node counting would serve $((2 * (TFTP_HIT + TFTP_LIMITED)))"
check tftp-cluster-wide "(( served >= tftp_exact - 1 && served <= tftp_exact + 1 ))" \
	"$served served, $tftp_exact exact (+-1)" "$WORK/node0/sipwarden.log" "$WORK/tftpd.log"

# --- the link's own figures -------------------------------------------------------------------

for n in 0 1; do
	r=$(metric "$n" sipwarden_cluster_count_rounds_total)
	s=$(metric "$n" sipwarden_cluster_count_entries_sent_total)
	g=$(metric "$n" sipwarden_cluster_count_entries_received_total)
	o=$(metric "$n" sipwarden_cluster_count_overflow_total)
	p=$(metric "$n" sipwarden_cluster_count_peers)
	log "node$n: rounds ${r:-?}, entries sent ${s:-?}, received ${g:-?}, overflow ${o:-?}, peers ${p:-?}"
	check "count-metrics-node$n" "(( ${r:-0} > 0 && ${g:-0} > 0 && ${p:-0} == 1 ))" \
		"node$n published rounds and heard its peer"
done

echo "$PASSED passed, $FAILED failed"
((FAILED == 0))
