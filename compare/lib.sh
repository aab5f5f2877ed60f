# Shared by zmq/run.sh and nats/run.sh (sourced, not run). The caller defines
# start_subs N RUN DIR and start_pub N RUN DIR, which start processes with `launch`;
# `run_workloads NAME` runs every N in $SUBS $RUNS times and prints the table.
#
# Settings (environment): RUNS (5), COUNT (1000000), SIZE (64), SUBS ("1 5"),
# TIMEOUT (120 s: the most any one process may take; it is then killed).

RUNS=${RUNS:-5}
COUNT=${COUNT:-1000000}
SIZE=${SIZE:-64}
SUBS=${SUBS:-"1 5"}
TIMEOUT=${TIMEOUT:-120}

COMPARE_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
TARGET_DIR=$COMPARE_DIR/target
WORK=$(mktemp -d "${TMPDIR:-/tmp}/compare.XXXXXX")
PIDS=()        # processes of the current run, each waited for or killed
EXTRA_PIDS=()  # longer-lived processes of the caller (e.g. nats-server)

cleanup() {
    local p
    for p in "${PIDS[@]}" "${EXTRA_PIDS[@]}"; do
        kill "$p" 2>/dev/null || true
    done
    for p in "${PIDS[@]}" "${EXTRA_PIDS[@]}"; do
        wait "$p" 2>/dev/null || true
    done
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# launch OUT ERR CMD...: start CMD in the background under `timeout`, record its pid.
launch() {
    local out=$1 err=$2
    shift 2
    timeout --kill-after=5 "$TIMEOUT" "$@" >"$out" 2>"$err" &
    PIDS+=($!)
}

# free_ports K: K distinct ports the kernel reports free on 127.0.0.1 (bound to port
# 0 at once, then released).
free_ports() {
    python3 -c '
import socket, sys
socks = [socket.socket() for _ in range(int(sys.argv[1]))]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))
for s in socks:
    s.close()' "$1"
}

# wait_all: wait for every process of the run; failures are reported, not fatal.
wait_all() {
    local p rc
    for p in "${PIDS[@]}"; do
        rc=0
        wait "$p" || rc=$?
        if [ "$rc" -ne 0 ]; then
            echo "  (a process exited with status $rc; 124 = timed out)" >&2
        fi
    done
    PIDS=()
}

# run_workloads NAME: every N in $SUBS, $RUNS runs each; one result line per
# subscriber in $WORK/results, then the table.
run_workloads() {
    local name=$1 n run i dir line
    : >"$WORK/results"
    for n in $SUBS; do
        for ((run = 1; run <= RUNS; run++)); do
            dir=$WORK/n$n.r$run
            mkdir -p "$dir"
            echo "$name: $n subscriber(s), run $run of $RUNS" >&2
            start_subs "$n" "$run" "$dir"
            start_pub "$n" "$run" "$dir"
            wait_all
            for ((i = 1; i <= n; i++)); do
                line=$(grep -m1 '^received=' "$dir/sub$i.out" || true)
                if [ -z "$line" ]; then
                    echo "  subscriber $i printed no result:" >&2
                    sed 's/^/    /' "$dir/sub$i.err" >&2 || true
                    line="received=0 expected=$COUNT secs=0 rate=0"
                fi
                echo "$n $run $line" >>"$WORK/results"
            done
            sed 's/^/  pub: /' "$dir/pub.err" >&2 || true
        done
    done
    python3 "$COMPARE_DIR/summarize.py" "$name" "$SIZE" "$COUNT" <"$WORK/results"
}
