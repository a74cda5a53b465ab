#!/usr/bin/env bash
# Short fuzz run for CI: build the cargo-fuzz targets, seed their corpora (RFC 4475 messages,
# hand-written scanner/sipp/phone messages, TFTP packets) and run each for a share of the time.
# Exits non-zero when a target finds a crash or an oracle failure, and prints executions.
#
#   fuzz/run.sh [SECONDS]        total time, split across targets (default 60)
#
# Needs cargo-fuzz (`cargo install cargo-fuzz`) and a nightly toolchain; without one, stable is
# made to accept the nightly flags with RUSTC_BOOTSTRAP=1. FUZZ_SANITIZER=address (default none:
# the code under test is safe Rust, and without ASan a target runs several times faster).
# FUZZ_TARGETS="sip_packet tcp_frame" runs a subset, FUZZ_ARGS adds libFuzzer flags. Crashes land in fuzz/artifacts/<target>/;
# reproduce one with: cargo +nightly fuzz run -O -s none <target> <artifact>. sip.dict (our minted
# tokens, header names, parameters) is the dictionary of the SIP targets.
set -euo pipefail

total=${1:-60}
cd "$(dirname "$0")"
read -r -a targets <<<"${FUZZ_TARGETS:-sip_packet tcp_frame tftp_codec}"
per=$((total / ${#targets[@]}))
((per >= 1)) || per=1
san=${FUZZ_SANITIZER:-none}

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "cargo-fuzz is missing: cargo install cargo-fuzz" >&2
    exit 2
fi
tc=()
if cargo +nightly --version >/dev/null 2>&1; then
    tc=(+nightly)
else
    export RUSTC_BOOTSTRAP=1
fi

python3 seed.py
cargo "${tc[@]}" fuzz build -O -s "$san"

status=0
for t in "${targets[@]}"; do
    log=$(mktemp)
    rc=0
    mkdir -p "corpus/$t"
    dict=()
    case $t in
    sip_packet | tcp_frame) dict=(-dict=sip.dict) ;;
    esac
    # shellcheck disable=SC2086 # FUZZ_ARGS is a list of libFuzzer flags
    cargo "${tc[@]}" fuzz run -O -s "$san" "$t" "corpus/$t" -- \
        -max_total_time="$per" -max_len=16384 -print_final_stats=1 "${dict[@]}" ${FUZZ_ARGS:-} >"$log" 2>&1 || rc=$?
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1 || true)
    corpus=$(find "corpus/$t" -type f | wc -l || true)
    if ((rc == 0)); then
        echo "$t: ${execs:-?} executions in ${per}s, corpus $corpus, no crash"
    else
        echo "$t: CRASH after ${execs:-?} executions (exit $rc)"
        grep -a -E "panicked|SUMMARY|Test unit written|assertion|ERROR" "$log" | head -n 8 ||
            tail -n 30 "$log"
        status=1
    fi
    rm -f "$log"
done
exit "$status"
