#!/usr/bin/env bash
# NATS core through a local nats-server on loopback: 1 publisher process, N
# subscriber processes, per-subscriber msgs/s and the fraction delivered. Builds
# nats_pubsub (this crate) into compare/target/; installs nats-server if missing.
#   compare/nats/run.sh                       # 5 runs of 1 000 000 x 64 B, N = 1 and 5
#   RUNS=1 COUNT=200000 compare/nats/run.sh   # a quick check
# Settings: see compare/lib.sh.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
. "$HERE/../lib.sh"

if ! command -v nats-server >/dev/null; then
    apt-get update -qq >&2 && apt-get install -y nats-server >&2
fi
CARGO_TARGET_DIR=$TARGET_DIR cargo build --release --locked --quiet \
    --manifest-path "$HERE/Cargo.toml"
BIN=$TARGET_DIR/release/nats_pubsub

# The server, on a port the kernel says is free; killed by pid on exit (lib.sh).
read -r PORT < <(free_ports 1)
nats-server -a 127.0.0.1 -p "$PORT" >"$WORK/nats-server.log" 2>&1 &
EXTRA_PIDS+=($!)
for ((i = 0; i < 100; i++)); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null; then
        break
    fi
    if ! kill -0 "${EXTRA_PIDS[0]}" 2>/dev/null || [ "$i" -eq 99 ]; then
        echo "nats-server did not start:" >&2
        cat "$WORK/nats-server.log" >&2
        exit 1
    fi
    sleep 0.05
done
SERVER=nats://127.0.0.1:$PORT

start_subs() {
    local n=$1 run=$2 dir=$3 i
    for ((i = 1; i <= n; i++)); do
        launch "$dir/sub$i.out" "$dir/sub$i.err" "$BIN" sub --server "$SERVER" \
            --subject "bench.n$n.r$run" --count "$COUNT" --timeout "$TIMEOUT"
    done
}

start_pub() {
    local n=$1 run=$2 dir=$3
    launch "$dir/pub.out" "$dir/pub.err" "$BIN" pub --server "$SERVER" --subs "$n" \
        --subject "bench.n$n.r$run" --count "$COUNT" --size "$SIZE" --timeout "$TIMEOUT"
}

run_workloads "NATS core ($(nats-server --version), async-nats 0.51), 127.0.0.1"
if grep -qi 'slow consumer' "$WORK/nats-server.log"; then
    echo "nats-server reported slow consumers:" >&2
    grep -i 'slow consumer' "$WORK/nats-server.log" | head -5 >&2
fi
