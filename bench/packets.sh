#!/usr/bin/env bash
# Packet-path benchmark: CPU per packet for a blocked source vs bare UDP receive loops (blocking,
# and on sipwarden's own socket setup), and for clean traffic with vs without the protection
# pipeline. Then, when valgrind is installed: instructions per blocked packet under callgrind,
# before and after (BEFORE_BIN, default /work/bin/sipwarden-r3 if present, against this build),
# and instructions per clean forwarded packet (REGISTER, INVITE, 200 OK, ACK through
# `Shared::handle` in process, bench/forward_cg.rs). Loopback only, bounded, a few minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --bin sipwarden --example packet_bench 2>&1 | tail -1
SIPWARDEN_BIN=target/release/sipwarden timeout 300 target/release/examples/packet_bench
before="${BEFORE_BIN:-/work/bin/sipwarden-r3}"
if command -v valgrind >/dev/null && [ -x "$before" ]; then
    timeout 600 target/release/examples/packet_bench callgrind "$before" target/release/sipwarden
elif command -v valgrind >/dev/null; then
    timeout 300 target/release/examples/packet_bench callgrind target/release/sipwarden
fi
if command -v valgrind >/dev/null; then
    timeout 300 target/release/examples/packet_bench forward-cg
fi
