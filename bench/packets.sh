#!/usr/bin/env bash
# Packet-path benchmark: CPU per packet for a blocked source vs a bare UDP receive loop, and for
# clean traffic with vs without the protection pipeline. Loopback only, bounded, ~1 minute.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --bin sipwarden --example packet_bench 2>&1 | tail -1
SIPWARDEN_BIN=target/release/sipwarden timeout 300 target/release/examples/packet_bench
