#!/usr/bin/env bash
# ZeroMQ PUB/SUB over tcp:// on loopback: 1 publisher process, N subscriber
# processes, per-subscriber msgs/s. Builds zmq_pubsub into compare/target/.
#   compare/zmq/run.sh                       # 5 runs of 1 000 000 x 64 B, N = 1 and 5
#   RUNS=1 COUNT=200000 compare/zmq/run.sh   # a quick check
# Settings: see compare/lib.sh. Needs gcc and libzmq3-dev.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
. "$HERE/../lib.sh"

if [ ! -e /usr/include/zmq.h ]; then
    echo "zmq.h not found: apt-get install -y libzmq3-dev" >&2
    exit 1
fi
mkdir -p "$TARGET_DIR"
BIN=$TARGET_DIR/zmq_pubsub
gcc -O2 -Wall -Wextra -o "$BIN" "$HERE/zmq_pubsub.c" -lzmq

PORT= SYNC_PORT=

start_subs() {
    local n=$1 dir=$3 i
    read -r PORT SYNC_PORT < <(free_ports 2)
    for ((i = 1; i <= n; i++)); do
        launch "$dir/sub$i.out" "$dir/sub$i.err" "$BIN" sub \
            --connect "tcp://127.0.0.1:$PORT" --sync "tcp://127.0.0.1:$SYNC_PORT" \
            --count "$COUNT" --timeout "$TIMEOUT"
    done
}

start_pub() {
    local n=$1 dir=$3
    launch "$dir/pub.out" "$dir/pub.err" "$BIN" pub --subs "$n" --count "$COUNT" \
        --size "$SIZE" --port "$PORT" --sync-port "$SYNC_PORT" --timeout "$TIMEOUT"
}

run_workloads "ZeroMQ $(pkg-config --modversion libzmq 2>/dev/null || echo '') PUB/SUB, tcp://127.0.0.1"
