#!/usr/bin/env bash
# TLS benchmark (issue 12): full TLS handshakes per second and memory per idle TLS connection,
# sipwarden's sip.listen_tls against a bare tokio-rustls acceptor (same certificate, same crypto)
# and openssl s_server, measured in the same run.  Loopback only; every phase bounded in time.
#   handshakes/s       wall-clock rate with C concurrent clients (bench/tls_bench.rs, no resumption)
#   per server CPU-s   handshakes per second of the server process's own CPU time (utime+stime):
#                      the per-core figure, independent of the client sharing the machine
#   kB per idle conn   (RSS with N idle TLS connections - RSS before) / N
# Goals: >= 2,000 handshakes per second per core, <= 32 kB per idle connection.
# usage: bench/tls.sh [SECONDS (5)] [CONCURRENCY (16)] [IDLE (1000)]
# needs: cargo build --release --bin sipwarden --example tls_bench; openssl.
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${1:-5}
CONC=${2:-16}
IDLE=${3:-1000}
BIN=${SIPWARDEN_BIN:-target/release/sipwarden}
TB=target/release/examples/tls_bench
[[ -x $BIN && -x $TB ]] || { echo "build first: cargo build --release --bin sipwarden --example tls_bench" >&2; exit 2; }
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
W=$(mktemp -d "${TMPDIR:-/tmp}/sipwarden-tlsbench.XXXXXX")
PIDS=()
cleanup() {
	local p
	for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
	wait 2>/dev/null || true
	rm -rf "$W"
}
trap cleanup EXIT

# ECDSA P-256: what a TLS deployment that cares about handshake cost uses.
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout "$W/key.pem" \
	-subj "/CN=sip.bench.test" -addext "subjectAltName=DNS:sip.bench.test" -days 1 -out "$W/cert.pem" 2>/dev/null

cat >"$W/proxy.toml" <<EOT
[sip]
listen_udp = ["127.0.0.1:5760"]
listen_tcp = []
listen_tls = ["127.0.0.1:5761"]
max_connections = 8192
max_connections_per_ip = 8192
[upstream]
address = "127.0.0.1:5799"
[lists]
whitelist = ["127.0.0.1/32"]
[admin]
listen = "127.0.0.1:8780"
[state]
path = "$W/sw.db"
[log]
level = "warn"
[tls]
certificate = "$W/cert.pem"
private_key = "$W/key.pem"
max_handshakes_per_ip = 1024
EOT
"$BIN" run -c "$W/proxy.toml" >"$W/sw.log" 2>&1 &
SW=$!
PIDS+=("$SW")
"$TB" server 127.0.0.1:5762 "$W/cert.pem" "$W/key.pem" >"$W/rustls.log" 2>&1 &
RL=$!
PIDS+=("$RL")
openssl s_server -accept 127.0.0.1:5763 -cert "$W/cert.pem" -key "$W/key.pem" -quiet -naccept 1000000 \
	</dev/null >"$W/openssl.log" 2>&1 &
OS=$!
PIDS+=("$OS")
for _ in $(seq 1 100); do
	[[ $(curl -sS --max-time 1 http://127.0.0.1:8780/healthz 2>/dev/null) == ok* ]] && break
	sleep 0.1
done
sleep 0.5

cpu() { awk '{ print $14 + $15 }' "/proc/$1/stat"; } # clock ticks
rss_kb() { awk '/^VmRSS/ { print $2 }' "/proc/$1/status"; }
TICK=$(getconf CLK_TCK)

# rate NAME PID ADDR: prints "NAME rate per_cpu"
declare -A RATE PERCPU KB
rate() {
	local name=$1 pid=$2 addr=$3 c0 c1 out n r
	c0=$(cpu "$pid")
	out=$(timeout $((SECS + 30)) "$TB" handshakes "$addr" "$SECS" "$CONC")
	c1=$(cpu "$pid")
	n=$(awk '{ print $2 }' <<<"$out")
	r=$(awk '{ print $NF }' <<<"$out")
	RATE[$name]=$r
	PERCPU[$name]=$(awk -v n="$n" -v t=$((c1 - c0)) -v hz="$TICK" 'BEGIN { printf "%.0f", (t > 0 ? n / (t / hz) : 0) }')
	printf '%-10s %8s handshakes/s  %8s per server CPU-second   (%s)\n' "$name" "$r" "${PERCPU[$name]}" "$out"
}

idle_mem() {
	local name=$1 pid=$2 addr=$3 before after
	before=$(rss_kb "$pid")
	timeout $((IDLE / 50 + 60)) "$TB" idle "$addr" "$IDLE" 6 >"$W/idle-$name.txt" &
	local cl=$!
	local i
	for i in $(seq 1 300); do
		grep -q idle_open "$W/idle-$name.txt" 2>/dev/null && break
		sleep 0.1
	done
	sleep 2
	after=$(rss_kb "$pid")
	wait "$cl" || true
	KB[$name]=$(awk -v a="$after" -v b="$before" -v n="$IDLE" 'BEGIN { printf "%.1f", (a - b) / n }')
	printf '%-10s RSS %6d kB -> %6d kB with %s: %s kB per idle TLS connection\n' "$name" "$before" "$after" \
		"$(cat "$W/idle-$name.txt")" "${KB[$name]}"
}

echo "== full TLS handshakes (TLS 1.3, ECDSA P-256, X25519), ${SECS}s, $CONC concurrent clients, $(nproc) cores shared with the client"
rate sipwarden "$SW" 127.0.0.1:5761
rate rustls "$RL" 127.0.0.1:5762
rate openssl "$OS" 127.0.0.1:5763
echo "== memory per idle TLS connection, $IDLE connections"
idle_mem sipwarden "$SW" 127.0.0.1:5761
idle_mem rustls "$RL" 127.0.0.1:5762
awk -v a="${RATE[sipwarden]}" -v b="${RATE[rustls]}" -v c="${RATE[openssl]}" \
	-v pa="${PERCPU[sipwarden]}" -v pb="${PERCPU[rustls]}" -v ka="${KB[sipwarden]}" -v kb="${KB[rustls]}" 'BEGIN {
	printf "== ratio sipwarden / bare rustls: handshakes/s %.2f, per CPU-second %.2f; sipwarden / openssl s_server: %.2f\n",
		(b > 0 ? a / b : 0), (pb > 0 ? pa / pb : 0), (c > 0 ? a / c : 0)
	printf "== goals: >= 2000 handshakes per core-second: %s (%d); <= 32 kB per idle connection: %s (%.1f kB; bare rustls %.1f kB)\n",
		(pa >= 2000 ? "met" : "NOT met"), pa, (ka <= 32 ? "met" : "NOT met"), ka, kb
}'
