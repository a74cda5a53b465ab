#!/usr/bin/env bash
# Health interop (issue 15): the health metrics change as expected when the links fail.
# sipwarden runs with a Redis it shares blocks through (redis-server started here), a webhook
# receiver (python, local) and a state directory on a small tmpfs; scripted scanners make
# blocks. Then, asserting the rendered /metrics lines before and after each step:
#   1. Redis is stopped: sipwarden_cluster_connected goes 0, publish failures and lag grow;
#   2. the webhook receiver is stopped: notifications failed grows (after its retries);
#   3. the state directory becomes unwritable: state commit failures grow.
# Root ignores directory permissions and a tmpfs with files open for writing refuses
# `remount,ro`, so step 3 fills the tmpfs instead (ENOSPC, what a full or failing disk does);
# the script runs in a private mount namespace (unshare -m) so the mount vanishes with it.
#
# Addresses (loopback only): sipwarden 127.0.0.1:5560, admin 127.0.0.1:8580, Redis
# 127.0.0.1:6390, webhook 127.0.0.1:8599, upstream 127.0.0.50:5580 (never reached).
# Bounded: every wait has a deadline; under 90 seconds.
set -euo pipefail
if [ -z "${HEALTH_NS:-}" ]; then
	exec env HEALTH_NS=1 unshare -m --propagation private "$0" "$@"
fi
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
BIN=${SIPWARDEN_BIN:-$REPO/target/release/sipwarden}
OUT=${VISIBILITY_OUT:-$REPO/artifacts/visibility}/health
rm -rf "$OUT"
mkdir -p "$OUT"
WORK=$(mktemp -d)
PIDS=()
cleanup() {
	for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
	for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
	umount "$WORK/state" 2>/dev/null || true
	rm -rf "$WORK"
}
trap cleanup EXIT
command -v redis-server >/dev/null || { echo "redis-server not installed"; exit 1; }

mkdir -p "$WORK/state"
mount -t tmpfs -o size=16m tmpfs "$WORK/state"

cat >"$WORK/proxy.toml" <<TOML
[sip]
listen_udp = ["127.0.0.1:5560"]
listen_tcp = ["127.0.0.1:5560"]
[upstream]
address = "127.0.0.50:5580"
[admin]
listen = "127.0.0.1:8580"
[state]
path = "$WORK/state/state.db"
[protection]
aggregate_ipv4 = 0
[cluster]
redis_url = "redis://127.0.0.1:6390"
[notify]
webhook = "http://127.0.0.1:8599/hook"
TOML

redis-server --port 6390 --bind 127.0.0.1 --save "" --appendonly no >"$OUT/redis.log" 2>&1 &
REDIS=$!
PIDS+=($REDIS)
python3 - >"$OUT/webhook.log" 2>&1 <<'PY' &
import http.server
class H(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.send_response(200); self.end_headers()
        print("POST", flush=True)
http.server.HTTPServer(("127.0.0.1", 8599), H).serve_forever()
PY
HOOK=$!
PIDS+=($HOOK)
sleep 0.5
"$BIN" run -c "$WORK/proxy.toml" >"$OUT/sipwarden.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 100); do
	curl -fsS http://127.0.0.1:8580/healthz >/dev/null 2>&1 && break
	sleep 0.1
done

metrics() { curl -fsS http://127.0.0.1:8580/metrics | grep -E '^sipwarden_(cluster|notifications|state)_' ; }
# value NAME_WITH_LABELS: the sample's value (0 if absent).
value() { metrics | awk -v n="$1" '$1 == n { print $2; f = 1 } END { if (!f) print 0 }'; }
# wait_for DESCRIPTION SECONDS COMMAND...: poll until COMMAND succeeds.
wait_for() {
	local what=$1 secs=$2
	shift 2
	for _ in $(seq $((secs * 5))); do "$@" && return 0; sleep 0.2; done
	echo "FAIL: $what"; metrics; exit 1
}
gt() { awk -v a="$(value "$1")" -v b="$2" 'BEGIN { exit !(a > b) }'; }
eq() { awk -v a="$(value "$1")" -v b="$2" 'BEGIN { exit !(a == b) }'; }
snap() { metrics >"$OUT/metrics-$1.txt"; echo "--- $1"; cat "$OUT/metrics-$1.txt"; }

# 0. Healthy: a block is committed, shared through Redis and posted to the webhook.
wait_for "cluster connected" 10 eq sipwarden_cluster_connected 1
python3 "$HERE/visibility/scanners.py" 127.0.0.1:5560 1 0
wait_for "webhook sent" 10 gt 'sipwarden_notifications_total{outcome="sent"}' 0
wait_for "state committed" 10 gt sipwarden_state_commits_total 0
wait_for "block published" 10 gt sipwarden_cluster_published_total 0
eq sipwarden_cluster_publish_failures_total 0
eq sipwarden_state_commit_failures_total 0
snap healthy

# 1. Redis stops.
kill "$REDIS"; wait "$REDIS" 2>/dev/null || true
wait_for "cluster disconnected" 15 eq sipwarden_cluster_connected 0
python3 "$HERE/visibility/scanners.py" 127.0.0.1:5560 5 10
wait_for "publish failures grow" 20 gt sipwarden_cluster_publish_failures_total 0
wait_for "publish lag grows" 10 gt sipwarden_cluster_publish_lag_seconds 0
snap redis-down

# 2. The webhook receiver stops (the notifier retries 5 times over about 15 seconds).
kill "$HOOK"; wait "$HOOK" 2>/dev/null || true
FAILED=$(value 'sipwarden_notifications_total{outcome="failed"}')
python3 "$HERE/visibility/scanners.py" 127.0.0.1:5560 1 20
wait_for "notifications failed grows" 40 gt 'sipwarden_notifications_total{outcome="failed"}' "$FAILED"
snap webhook-down

# 3. The state directory becomes unwritable (full filesystem), then more blocks.
eq sipwarden_state_commit_failures_total 0
dd if=/dev/zero of="$WORK/state/fill" bs=1M 2>/dev/null || true
python3 "$HERE/visibility/scanners.py" 127.0.0.1:5560 500 100
wait_for "state commit failures grow" 20 gt sipwarden_state_commit_failures_total 0
snap state-unwritable
echo "PASS health: Redis down, webhook down and an unwritable state directory show in /metrics"
