#!/usr/bin/env bash
# The docker-compose stack (issue 13): docker/compose.yaml brought up for real, two sipwarden
# nodes sharing blocks through Redis in front of Kamailio, phones (sipp) and a scanner (svmap) on
# loopback.  Host networking for every service; the addresses are the stack's own:
#
#   node 1  SIP 127.0.0.91:5060 udp+tcp, admin 127.0.0.91:8990     PBX (Kamailio)  127.0.0.90:5080
#   node 2  SIP 127.0.0.92:5060 udp+tcp, admin 127.0.0.92:8990     Redis           127.0.0.1:6393
#   phones  127.0.0.95 (caller 1001), .96 (1002 via node 1), .97 (1003 via node 2), .99 (svmap)
#
# Phases (each one's time printed):
#   dockerd  `docker info`; if it fails, start dockerd --bridge=none --iptables=false
#            [--ip6tables=false] (log in the work dir) and stop it at the end.  A daemon that does
#            not start FAILS the suite with its log.
#   base     sipwarden-base:bookworm: `debootstrap --variant=minbase bookworm` from the mirror apt
#            uses (sources.list one-line or deb822), tarred to target/compose/ (cached), imported.
#   image    tests/interop/compose/Dockerfile: base + kamailio + redis-server (apt, --network host)
#            + the release binary; every service of the stack runs from it (SIPWARDEN_IMAGE,
#            PBX_IMAGE, REDIS_IMAGE).
#   up       docker-compose up -d --no-build; all four services healthy (their own health checks).
#   calls    1002 registers via node 1, 1003 via node 2 (both answer calls); 1001 registers via
#            each node; 1001 calls 1003 via node 1 and 1002 via node 2, so every call crosses
#            both nodes (the PBX reaches each callee through the node in its Path).
#   scan     svmap from 127.0.0.99 against node 1: SCANNER block on node 1, and the same source
#            blocked on node 2 (GET /api/blocks on node 2's admin) through Redis.
#   down     docker-compose down: containers gone, the state volumes kept; up again on them: the
#            scanner is still blocked on both nodes; down, and the suite removes the volumes.
#
# usage: tests/interop/compose.sh        env: SIPWARDEN_BIN (default target/release/sipwarden,
#        never built here), KEEP=1 keeps the work dir (always kept on failure),
#        DOCKER_DATA_ROOT (dockerd's data root when the suite starts it; default /var/lib/docker),
#        DEBIAN_MIRROR (override the mirror found in apt's sources), APT_ETC (default /etc/apt).
set -uo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
# shellcheck source=tests/interop/lib.sh
source "$HERE/lib.sh"

N1=127.0.0.91
N2=127.0.0.92
API1=http://$N1:8990
API2=http://$N2:8990
PBX_ADDR=127.0.0.90
PBX_PORT=5080
REDIS_PORT=6393
CALLER_IP=127.0.0.95
SCANNER_IP=127.0.0.99
CALLS=5

PROJECT=sipwarden-stack-test
IMAGE=sipwarden-stack:test
BASE=sipwarden-base:bookworm
CACHE=$REPO/target/compose
ROOTFS_TAR=$CACHE/rootfs-bookworm.tar
COMPOSE_FILE=$REPO/docker/compose.yaml
# the daemon is Debian's docker.io; its own client avoids a newer client's BuildKit default
DOCKER=$(command -v /usr/bin/docker || command -v docker)
export DOCKER_BUILDKIT=0 COMPOSE_DOCKER_CLI_BUILD=0

DOCKERD_PID=""
STACK_UP=0

# --- phases -----------------------------------------------------------------------------------

PHASE=""
PHASE_T0=0
phase() {
	phase_end
	PHASE=$1
	PHASE_T0=$SECONDS
	log "phase $PHASE"
}
phase_end() {
	[[ -n $PHASE ]] && log "phase $PHASE took $((SECONDS - PHASE_T0)) s"
	PHASE=""
}

# compose ARGS...: docker-compose on the stack file, every service from the test image
compose() {
	SIPWARDEN_IMAGE=$IMAGE PBX_IMAGE=$IMAGE REDIS_IMAGE=$IMAGE \
		timeout 120 docker-compose -p "$PROJECT" -f "$COMPOSE_FILE" "$@"
}

# --- the Docker engine ------------------------------------------------------------------------

# dk ARGS...: the docker client, bounded (a wedged daemon must not hang the suite)
dk() { timeout 120 "$DOCKER" "$@"; }
docker_ok() { timeout 10 "$DOCKER" info >/dev/null 2>&1; }

# ensure_dockerd: use a running daemon, or start one without bridge and iptables (these machines
# have neither).  Returns 1 with the reason printed when no daemon answers.
ensure_dockerd() {
	if docker_ok; then
		log "using the running Docker daemon"
		return 0
	fi
	if ! command -v dockerd >/dev/null; then
		echo "dockerd is not installed (apt-get install docker.io)"
		return 1
	fi
	local args=(--bridge=none --iptables=false --data-root "${DOCKER_DATA_ROOT:-/var/lib/docker}")
	dockerd --help 2>&1 | grep -q -- '--ip6tables' && args+=(--ip6tables=false)
	log "starting dockerd ${args[*]} (log $WORK/dockerd.log)"
	dockerd "${args[@]}" >"$WORK/dockerd.log" 2>&1 &
	DOCKERD_PID=$!
	local _
	for _ in $(seq 1 60); do
		docker_ok && return 0
		kill -0 "$DOCKERD_PID" 2>/dev/null || break
		sleep 0.5
	done
	echo "dockerd did not start (not answering after 30 s, or exited); its log:"
	tail -25 "$WORK/dockerd.log" | sed 's/^/     | /'
	return 1
}

stop_dockerd() {
	[[ -n $DOCKERD_PID ]] || return 0
	kill -TERM "$DOCKERD_PID" 2>/dev/null
	local _
	for _ in $(seq 1 150); do
		kill -0 "$DOCKERD_PID" 2>/dev/null || break
		sleep 0.2
	done
	kill -0 "$DOCKERD_PID" 2>/dev/null && kill -9 "$DOCKERD_PID" 2>/dev/null
	wait "$DOCKERD_PID" 2>/dev/null
	log "dockerd (started by this suite) stopped"
	DOCKERD_PID=""
}

# --- the base image from Debian's archive -----------------------------------------------------

# debian_mirror: the URI apt uses for Debian bookworm main, from one-line sources.list entries
# ("deb [opts] URI SUITE COMPONENTS") or deb822 .sources stanzas (Types/URIs/Suites/Components).
debian_mirror() {
	if [[ -n ${DEBIAN_MIRROR:-} ]]; then
		echo "$DEBIAN_MIRROR"
		return
	fi
	local files=() f
	local etc=${APT_ETC:-/etc/apt}
	[[ -f $etc/sources.list ]] && files+=("$etc/sources.list")
	for f in "$etc"/sources.list.d/*.list "$etc"/sources.list.d/*.sources; do
		[[ -f $f ]] && files+=("$f")
	done
	local m=""
	if ((${#files[@]})); then
		m=$(awk '
			function take(uris, suites, types,   n, i, s) {
				if (found || types !~ /(^|[ \t])deb([ \t]|$)/) return
				n = split(suites, s, /[ \t]+/)
				for (i = 1; i <= n; i++) if (s[i] == "bookworm") { split(uris, u, /[ \t]+/); print u[1]; found = 1; return }
			}
			FNR == 1 { if (st_uris != "") take(st_uris, st_suites, st_types); st_uris = st_suites = st_types = "" }
			/^[ \t]*#/ { next }
			FILENAME ~ /\.sources$/ {
				if ($0 ~ /^[ \t]*$/) { take(st_uris, st_suites, st_types); st_uris = st_suites = st_types = ""; next }
				if (tolower($1) == "types:") { $1 = ""; st_types = $0 }
				else if (tolower($1) == "uris:") { $1 = ""; sub(/^[ \t]+/, ""); st_uris = $0 }
				else if (tolower($1) == "suites:") { $1 = ""; st_suites = $0 }
				next
			}
			$1 == "deb" {
				i = 2
				if ($2 ~ /^\[/) { while (i <= NF && $i !~ /\]$/) i++; i++ }
				take($i, $(i + 1), "deb")
			}
			END { if (st_uris != "") take(st_uris, st_suites, st_types) }' "${files[@]}" 2>/dev/null)
	fi
	echo "${m:-http://deb.debian.org/debian}"
}

# ensure_base: sipwarden-base:bookworm in the daemon, from the cached rootfs tarball or a fresh
# debootstrap (about a minute) that fills the cache.
ensure_base() {
	if dk image inspect "$BASE" >/dev/null 2>&1; then
		log "$BASE already in the daemon"
		return 0
	fi
	mkdir -p "$CACHE"
	if [[ ! -s $ROOTFS_TAR ]]; then
		if ! command -v debootstrap >/dev/null; then
			echo "debootstrap is not installed (apt-get install debootstrap)"
			return 1
		fi
		local mirror rootfs=$CACHE/rootfs.tmp
		mirror=$(debian_mirror)
		log "debootstrap --variant=minbase bookworm from $mirror (log $WORK/debootstrap.log)"
		rm -rf "$rootfs"
		if ! timeout 400 debootstrap --variant=minbase bookworm "$rootfs" "$mirror" \
			>"$WORK/debootstrap.log" 2>&1; then
			echo "debootstrap failed; its log:"
			tail -20 "$WORK/debootstrap.log" | sed 's/^/     | /'
			rm -rf "$rootfs"
			return 1
		fi
		rm -rf "$rootfs"/var/cache/apt/archives/*.deb
		tar -C "$rootfs" -cf "$ROOTFS_TAR.tmp" . && mv "$ROOTFS_TAR.tmp" "$ROOTFS_TAR"
		rm -rf "$rootfs"
	else
		log "rootfs from the cache $ROOTFS_TAR"
	fi
	if ! timeout 300 "$DOCKER" import - "$BASE" <"$ROOTFS_TAR" >/dev/null; then
		echo "docker import of $ROOTFS_TAR failed; the cached tarball is removed"
		rm -f "$ROOTFS_TAR"
		return 1
	fi
}

# build_image: the test image from tests/interop/compose/Dockerfile with the release binary
build_image() {
	local ctx=$WORK/image
	mkdir -p "$ctx"
	cp "$HERE/compose/Dockerfile" "$REPO/docker/healthcheck.sh" "$ctx/" &&
		cp "$SIPWARDEN_BIN" "$ctx/sipwarden" || return 1
	timeout 400 "$DOCKER" build --network host -t "$IMAGE" "$ctx" >"$WORK/build.log" 2>&1
	local rc=$?
	rm -f "$ctx/sipwarden"
	if ((rc != 0)); then
		echo "docker build failed (exit $rc); its log:"
		tail -25 "$WORK/build.log" | sed 's/^/     | /'
	fi
	return "$rc"
}

# --- the stack --------------------------------------------------------------------------------

SERVICES=(redis pbx sipwarden1 sipwarden2)

# health SERVICE: its container's health status (healthy, starting, unhealthy) or "missing"
health() {
	local id
	id=$(compose ps -q "$1" 2>/dev/null)
	[[ -n $id ]] || { echo missing; return; }
	dk inspect -f '{{if .State.Health}}{{.State.Health.Status}}{{else}}{{.State.Status}}{{end}}' \
		"$id" 2>/dev/null || echo missing
}

# wait_healthy SECONDS: every service healthy; prints the states it ended with
wait_healthy() {
	local _ s all states
	for _ in $(seq 1 $(($1 * 2))); do
		all=1
		states=""
		for s in "${SERVICES[@]}"; do
			local h
			h=$(health "$s")
			states+="$s=$h "
			[[ $h == healthy ]] || all=0
		done
		((all)) && { echo "$states"; return 0; }
		sleep 0.5
	done
	echo "$states"
	return 1
}

stack_logs() {
	compose logs --no-color --tail=30 >"$WORK/stack.log" 2>&1
	echo "$WORK/stack.log"
}

# blocks_on API: the block table of one node
blocks_on() { curl -sS --max-time 2 "$1/api/blocks" 2>/dev/null || echo '[]'; }

# wait_block_on API IP SECONDS: a block (any type) for IP appears in that node's table
wait_block_on() {
	local _
	for _ in $(seq 1 $(($3 * 5))); do
		blocks_on "$1" | jq -e --arg ip "$2" '[.[] | select(.ip == $ip)] | length > 0' \
			>/dev/null 2>&1 && return 0
		sleep 0.2
	done
	return 1
}

# callee NAME USER NODE IP: USER registers through NODE from IP:5063 every 2 s and answers calls
callee() {
	local name=$1 user=$2 node=$3 ip=$4
	sipp_bg "$name" "$node:5060" -sf "$SCEN/register.xml" -oocsf "$SCEN/call-uas.xml" \
		-s "$user" -au "$user" -ap "secret$user" -i "$ip" -p 5063 \
		-m 200 -r 1 -rp 2000 -recv_timeout 8000 -timeout 300s -default_behaviors all,-abortunexp
	wait_stat "$name" 'SuccessfulCall(C)' 1 15
}

# via_count NAME NODE: "total via_node" INVITEs the callee got, and how many had NODE's Via on top
via_count() {
	awk -v node=" $2:5060" '/^INVITE sip:/ { inv = 1; next }
		inv && /^Via:/ { n++; if (index($0, node)) sw++; inv = 0 }
		END { print n + 0, sw + 0 }' "$WORK/$1/messages.log" 2>/dev/null
}

test_calls() {
	local ok1 ok2
	callee callee-1002 1002 "$N1" 127.0.0.96
	ok1=$?
	callee callee-1003 1003 "$N2" 127.0.0.97
	ok2=$?
	check callee-1002-registered "[[ $ok1 == 0 ]]" "1002 registered with digest auth via node 1" \
		"$WORK/callee-1002" "$(stack_logs)"
	check callee-1003-registered "[[ $ok2 == 0 ]]" "1003 registered with digest auth via node 2" \
		"$WORK/callee-1003" "$(stack_logs)"

	local n node port
	for n in 1 2; do
		node=$N1 port=5072
		[[ $n == 2 ]] && node=$N2 port=5073
		sipp_fg "register-node$n" 30 "$node:5060" -sf "$SCEN/register.xml" -s 1001 -au 1001 \
			-ap secret1001 -i "$CALLER_IP" -p "$port" -m 3 -r 2 -recv_timeout 5000 -timeout 25s
		local rc=$? ok bad
		ok=$(sipp_stat "register-node$n" 'SuccessfulCall(C)')
		bad=$(sipp_stat "register-node$n" 'FailedCall(C)')
		check "register-node$n" "[[ $rc == 0 && $ok == 3 && $bad == 0 ]]" \
			"1001 registered $ok/3 times via node $n with digest auth, $bad failed (sipp exit $rc)" \
			"$WORK/register-node$n" "$(stack_logs)"
	done

	# via node 1 to 1003 (registered via node 2), via node 2 to 1002 (registered via node 1)
	local to
	for n in 1 2; do
		node=$N1 port=5062 to=1003
		[[ $n == 2 ]] && node=$N2 port=5064 to=1002
		sipp_fg "calls-node$n" 60 "$node:5060" -sf "$SCEN/call-uac.xml" -key caller 1001 -s "$to" \
			-au 1001 -ap secret1001 -i "$CALLER_IP" -p "$port" -m "$CALLS" -r 2 \
			-recv_timeout 8000 -timeout 50s -default_behaviors all,-abortunexp
		local rc=$? ok bad
		ok=$(sipp_stat "calls-node$n" 'SuccessfulCall(C)')
		bad=$(sipp_stat "calls-node$n" 'FailedCall(C)')
		check "calls-node$n" "[[ $rc == 0 && $ok == $CALLS && $bad == 0 ]]" \
			"1001 -> $to via node $n: $ok/$CALLS calls completed, $bad failed (sipp exit $rc)" \
			"$WORK/calls-node$n" "$WORK/callee-$to" "$(stack_logs)"
	done
	stop_bg callee-1002 USR1
	stop_bg callee-1003 USR1

	local total via name user
	for n in 1 2; do
		node=$N1 user=1002
		[[ $n == 2 ]] && node=$N2 user=1003
		name=callee-$user
		read -r total via < <(via_count "$name" "$node")
		ok=$(sipp_log "$name" UAS-OK)
		bad=$(sipp_log "$name" UAS-FAILED)
		check "$name-answered" "[[ $ok == $CALLS && $bad == 0 && $total -ge $CALLS && $via == $total ]]" \
			"$user answered $ok/$CALLS calls ($bad broken); $via of the $total INVITEs came from node $n, the one it registered through" \
			"$WORK/$name"
	done
}

test_scan() {
	tool_bg svmap 40 svmap -p 5060 -b "$SCANNER_IP" "$N1"
	check scan-blocked-node1 "wait_block_on $API1 $SCANNER_IP 15" \
		"svmap's source $SCANNER_IP is blocked on node 1" "$WORK/svmap" "$(stack_logs)"
	# svmap never sent anything to node 2: a block there came through Redis
	local t0=$SECONDS rc
	wait_block_on "$API2" "$SCANNER_IP" 10
	rc=$?
	check scan-blocked-node2 "[[ $rc == 0 ]]" \
		"and on node 2 (GET $API2/api/blocks), which svmap never probed, after $((SECONDS - t0)) s more (polled for 10 s)" \
		"$(stack_logs)"
	blocks_on "$API2" | jq -c --arg ip "$SCANNER_IP" '.[] | select(.ip == $ip)
		| {ip, port, type, device, reason}' 2>/dev/null | sed 's/^/     node 2: /'
	wait_bg svmap 40
	check scan-no-answer "! grep -q '^| $N1:5060' '$WORK/svmap/out.txt'" \
		"svmap found no SIP device behind node 1" "$WORK/svmap"
}

test_down() {
	compose down >"$WORK/down.log" 2>&1
	local rc=$? left vols
	STACK_UP=0
	left=$(dk ps -aq --filter "label=com.docker.compose.project=$PROJECT" | wc -l)
	vols=$(dk volume ls -q --filter "label=com.docker.compose.project=$PROJECT" | wc -l)
	check stack-down "[[ $rc == 0 && $left == 0 && $vols == 3 ]]" \
		"docker-compose down: exit $rc, $left containers left, $vols state volumes kept (3 expected)" \
		"$WORK/down.log"
	((vols == 3)) || return 0

	# the same volumes brought up again: the scanner's block is still in force on both nodes
	STACK_UP=1
	compose up -d --no-build >"$WORK/up2.log" 2>&1
	local states hrc t0=$SECONDS
	states=$(wait_healthy 60)
	hrc=$?
	check stack-up-again "[[ $hrc == 0 ]]" "up again on the kept volumes, healthy after $((SECONDS - t0)) s" \
		"$WORK/up2.log" "$(stack_logs)"
	check blocks-kept "wait_block_on $API1 $SCANNER_IP 5 && wait_block_on $API2 $SCANNER_IP 5" \
		"the block of $SCANNER_IP survived down/up on both nodes (state volumes, Redis append-only file)" \
		"$(stack_logs)"
	compose down >>"$WORK/down.log" 2>&1
	STACK_UP=0
}

remove_volumes() {
	local v
	for v in $(dk volume ls -q --filter "label=com.docker.compose.project=$PROJECT" 2>/dev/null); do
		dk volume rm "$v" >/dev/null 2>&1 || echo "could not remove volume $v"
	done
}

cleanup() {
	phase_end
	stop_all_bg
	if docker_ok; then
		((STACK_UP)) && compose down >/dev/null 2>&1
		remove_volumes
	fi
	stop_dockerd
	if ((FAILED)) || [[ ${KEEP:-0} == 1 ]]; then
		echo "work dir kept: $WORK"
	else
		rm -rf "$WORK"
	fi
}

main() {
	local tool missing=()
	for tool in docker-compose sipp svmap curl jq timeout; do
		command -v "$tool" >/dev/null || missing+=("$tool")
	done
	[[ -n $DOCKER ]] || missing+=(docker)
	if ((${#missing[@]})); then
		echo "missing programs: ${missing[*]} (apt-get install docker.io docker-compose debootstrap sip-tester sipvicious)"
		echo "0 passed, 1 failed"
		exit 1
	fi
	if [[ ! -x $SIPWARDEN_BIN ]]; then
		echo "no release binary at $SIPWARDEN_BIN (cargo build --release first)"
		echo "0 passed, 1 failed"
		exit 1
	fi
	local busy
	busy=$(ss -Hlnptu 2>/dev/null | awk -v redis="127.0.0.1:$REDIS_PORT" '$5 ~ /^127\.0\.0\.9[0-9]:/ || $5 == redis')
	if [[ -n $busy ]]; then
		echo "addresses needed by the suite are in use:"
		echo "$busy"
		echo "0 passed, 1 failed"
		exit 1
	fi

	WORK=$(mktemp -d "${TMPDIR:-/tmp}/sipwarden-compose.XXXXXX")
	trap cleanup EXIT
	trap 'exit 130' INT TERM
	echo "sipwarden compose stack: $COMPOSE_FILE, binary $SIPWARDEN_BIN, work dir $WORK"
	local started=$SECONDS

	phase dockerd
	if ! ensure_dockerd; then
		fail dockerd "no Docker daemon (see above)"
		phase_end
		echo "$PASSED passed, $FAILED failed"
		exit 1
	fi
	pass dockerd "Docker $(dk version -f '{{.Server.Version}}' 2>/dev/null)$([[ -n $DOCKERD_PID ]] && echo ', started by this suite')"

	phase base
	if ! ensure_base; then
		fail base-image "no $BASE (see above)"
	else
		pass base-image "$BASE from Debian bookworm ($(debian_mirror))"
		phase image
		if ! build_image; then
			fail image "docker build of $IMAGE failed (see above)" "$WORK/build.log"
		else
			pass image "$IMAGE: release binary + kamailio + redis-server"
			phase up
			STACK_UP=1
			compose up -d --no-build >"$WORK/up.log" 2>&1
			local rc=$? states hrc
			check stack-up "[[ $rc == 0 ]]" "docker-compose up -d (exit $rc)" "$WORK/up.log"
			states=$(wait_healthy 90)
			hrc=$?
			check stack-healthy "[[ $hrc == 0 ]]" "health after $((SECONDS - PHASE_T0)) s: $states" \
				"$(stack_logs)"
			if ((FAILED == 0)); then
				phase calls
				test_calls
				phase scan
				test_scan
			fi
			phase down
			test_down
			remove_volumes
		fi
	fi
	phase_end
	log "done in $((SECONDS - started)) s"
	if ((FAILED)); then echo "failed: ${FAILED_NAMES[*]}"; fi
	echo "$PASSED passed, $FAILED failed"
	((FAILED == 0))
}

main "$@"
