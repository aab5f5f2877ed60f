"""Table of compare/*/run.sh results (stdin: "N RUN received=R expected=C secs=S rate=M"
per subscriber). Per run: the median and the minimum of the subscribers' rates; per N:
the medians of those over the runs (as `ipcbus bench` reports them) and the fraction
of all expected messages that arrived."""
import sys
from collections import defaultdict


def median(v):
    v = sorted(v)
    n = len(v)
    if n == 0:
        return 0.0
    return v[n // 2] if n % 2 else (v[n // 2 - 1] + v[n // 2]) / 2


def human(x):
    return f"{round(x):,}".replace(",", " ")


name, size, count = sys.argv[1], sys.argv[2], sys.argv[3]
runs = defaultdict(lambda: defaultdict(list))  # n -> run -> [fields]
for line in sys.stdin:
    parts = line.split()
    if len(parts) < 3:
        continue
    fields = dict(p.split("=", 1) for p in parts[2:])
    runs[int(parts[0])][int(parts[1])].append(fields)

nruns = max((len(r) for r in runs.values()), default=0)
print(f"{name}: {size} B payloads, {count} messages, medians of {nruns} run(s)")
print(f"{'subs':>5}  {'recv median msgs/s':>18}  {'recv min msgs/s':>15}  {'delivered':>9}")
for n in sorted(runs):
    medians, mins, got, want = [], [], 0, 0
    for subs in runs[n].values():
        rates = [float(s["rate"]) for s in subs]
        medians.append(median(rates))
        mins.append(min(rates))
        got += sum(int(s["received"]) for s in subs)
        want += sum(int(s["expected"]) for s in subs)
    frac = 100.0 * got / want if want else 0.0
    print(f"{n:>5}  {human(median(medians)):>18}  {human(median(mins)):>15}  {frac:>8.2f}%")
