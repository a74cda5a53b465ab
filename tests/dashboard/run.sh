#!/usr/bin/env bash
# Dashboard browser test, end to end: start target/release/sipwarden with a throw-away config
# (SIP and admin on 127.0.0.1 high ports, state in a temp dir, the test GeoIP database), attack it
# (a SIP scanner from 127.0.0.7, one with a hostile User-Agent from 127.0.0.8, a REGISTER password
# guesser from 127.0.0.9 that a small fake PBX answers 403), make a manual block through the API,
# then run dashboard.test.mjs in headless Debian chromium (it checks the block's packet ladder).
#
#   cargo build --release && tests/dashboard/run.sh
#
# Needs: python3, node 20+, npm (for playwright-core, installed on first run), /usr/bin/chromium.
# Screenshots land in artifacts/ at the repository root; the node's log in artifacts/ too.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
bin=${SIPWARDEN_BIN:-$root/target/release/sipwarden}
artifacts=${ARTIFACTS:-$root/artifacts}
token=dashboard-test-token

if [ ! -x "$bin" ]; then
    echo "run.sh: $bin not found: cargo build --release first" >&2
    exit 2
fi
mkdir -p "$artifacts"
tmp=$(mktemp -d)
pid=
pbx_pid=
cleanup() {
    for p in $pid $pbx_pid; do
        kill "$p" 2>/dev/null || true
        wait "$p" 2>/dev/null || true
    done
    cp "$tmp/sipwarden.log" "$artifacts/dashboard-sipwarden.log" 2>/dev/null || true
    rm -rf "$tmp"
}
trap cleanup EXIT

# Three free ports: SIP, the (fake) PBX, admin.
read -r sip pbx admin < <(python3 - <<'EOF'
import socket
ports, keep = [], []
while len(ports) < 3:
    t = socket.socket()
    t.bind(("127.0.0.1", 0))
    p = t.getsockname()[1]
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        u.bind(("127.0.0.1", p))
    except OSError:
        t.close()
        continue
    keep += [t, u]
    ports.append(p)
print(*ports)
EOF
)

cat > "$tmp/proxy.toml" <<EOF
[sip]
listen_udp = ["127.0.0.1:$sip"]
listen_tcp = ["127.0.0.1:$sip"]

[upstream]
address = "127.0.0.1:$pbx"

[admin]
listen = "127.0.0.1:$admin"
token = "$token"

[state]
path = "$tmp/state.db"

[geoip]
database = "$here/test-country.mmdb"
EOF

# The fake PBX: answers every REGISTER 403 (a wrong password), for at most 120 s.
python3 - "$pbx" >"$tmp/pbx.log" 2>&1 <<'EOF' &
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("127.0.0.1", int(sys.argv[1])))
s.settimeout(1.0)
end = time.time() + 120
while time.time() < end:
    try:
        data, peer = s.recvfrom(65535)
    except socket.timeout:
        continue
    lines = data.decode(errors="replace").split("\r\n")
    if not lines[0].startswith("REGISTER "):
        continue
    keep = [l for l in lines[1:] if l.split(":", 1)[0].strip().lower() in ("via", "v", "from", "f", "call-id", "i", "cseq")]
    to = [l for l in lines[1:] if l.split(":", 1)[0].strip().lower() in ("to", "t")]
    out = ["SIP/2.0 403 Forbidden"] + keep + [t + ";tag=pbx1" for t in to] + ["Server: fake-pbx", "Content-Length: 0", "", ""]
    s.sendto("\r\n".join(out).encode(), peer)
EOF
pbx_pid=$!

"$bin" run -c "$tmp/proxy.toml" >"$tmp/sipwarden.log" 2>&1 &
pid=$!
url="http://127.0.0.1:$admin"
for _ in $(seq 100); do
    curl -sf "$url/healthz" >/dev/null 2>&1 && break
    if ! kill -0 "$pid" 2>/dev/null; then
        echo "run.sh: sipwarden exited:" >&2
        cat "$tmp/sipwarden.log" >&2
        exit 1
    fi
    sleep 0.1
done
curl -sf "$url/healthz" >/dev/null || { echo "run.sh: admin API not up at $url" >&2; exit 1; }

# The scripted attack: SIP OPTIONS over UDP, sent from other loopback addresses.
python3 - "$sip" <<'EOF'
import socket, sys
port = int(sys.argv[1])
def options(src, ua):
    msg = (
        f"OPTIONS sip:100@127.0.0.1:{port} SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP {src}:5070;branch=z9hG4bK-{src.replace('.', '')}\r\n"
        "Max-Forwards: 70\r\n"
        f"From: \"sipvicious\" <sip:100@{src}>;tag=1234\r\n"
        f"To: <sip:100@127.0.0.1>\r\n"
        f"Call-ID: scan-{src}\r\n"
        "CSeq: 1 OPTIONS\r\n"
        f"Contact: <sip:100@{src}:5070>\r\n"
        f"User-Agent: {ua}\r\n"
        "Accept: application/sdp\r\n"
        "Content-Length: 0\r\n\r\n"
    )
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((src, 0))
    s.sendto(msg.encode(), ("127.0.0.1", port))
    s.close()
options("127.0.0.7", "friendly-scanner")
options("127.0.0.8", "friendly-scanner <img src=x onerror=window.__xss=1>")
EOF

# A password guesser that does not say what it is: REGISTER with a new password each time, from
# 127.0.0.9; the fake PBX answers 403, and register.hit_count (5) failures make a REGISTER block.
python3 - "$sip" <<'EOF'
import socket, sys, time
port = int(sys.argv[1])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("127.0.0.9", 0))
s.settimeout(1.0)
me = s.getsockname()[1]
for n in range(1, 6):
    msg = (
        f"REGISTER sip:127.0.0.1:{port} SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP 127.0.0.9:{me};rport;branch=z9hG4bK-guess{n}\r\n"
        "Max-Forwards: 70\r\n"
        f"From: <sip:1001@127.0.0.1>;tag=g{n}\r\n"
        "To: <sip:1001@127.0.0.1>\r\n"
        "Call-ID: guess-1001@127.0.0.9\r\n"
        f"CSeq: {n} REGISTER\r\n"
        f"Contact: <sip:1001@127.0.0.9:{me}>\r\n"
        f'Authorization: Digest username="1001", realm="pbx", nonce="n", uri="sip:127.0.0.1", response="{n:032x}"\r\n'
        "User-Agent: Yealink SIP-T46S\r\n"
        "Content-Length: 0\r\n\r\n"
    )
    s.sendto(msg.encode(), ("127.0.0.1", port))
    try:
        s.recvfrom(65535)
    except socket.timeout:
        print(f"register attack: no answer to attempt {n}", file=sys.stderr)
    time.sleep(0.2)  # a guess every 200 ms: the ladder's times then show the pace
EOF

auth=(-H "Authorization: Bearer $token")
curl -sf "${auth[@]}" -H 'Content-Type: application/json' \
    -d '{"ip":"192.0.2.10","duration":"1h","reason":"manual block from run.sh"}' \
    "$url/api/blocks" >/dev/null

for _ in $(seq 50); do
    curl -sf "${auth[@]}" "$url/api/blocks" | grep -q '"127.0.0.8"' && break
    sleep 0.1
done
for _ in $(seq 50); do
    curl -sf "${auth[@]}" "$url/api/blocks" | grep -q '"127.0.0.9"' && break
    sleep 0.1
done
if ! curl -sf "${auth[@]}" "$url/api/blocks" | grep -q '"127.0.0.9"'; then
    echo "run.sh: the REGISTER guesser from 127.0.0.9 was not blocked" >&2
    cat "$tmp/sipwarden.log" "$tmp/pbx.log" >&2
    exit 1
fi
if ! curl -sf "${auth[@]}" "$url/api/blocks" | grep -q '"127.0.0.7"'; then
    echo "run.sh: the scanner from 127.0.0.7 was not blocked" >&2
    cat "$tmp/sipwarden.log" >&2
    exit 1
fi

cd "$here"
if [ ! -d node_modules/playwright-core ]; then
    npm ci --no-audit --no-fund --loglevel=error
fi
SIPWARDEN_URL="$url" SIPWARDEN_TOKEN="$token" ARTIFACTS="$artifacts" EXPECT_COUNTRY=Loopbackia \
    SIP_LISTEN="127.0.0.1:$sip" PBX_ADDR="127.0.0.1:$pbx" \
    node dashboard.test.mjs
