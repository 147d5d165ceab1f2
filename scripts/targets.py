"""Issue 18's performance targets, each a ratio (or a difference) of two
figures measured in one run of scripts/bench: which were met, as one line.

Pure: `verdicts(m)` takes a dict of measured figures (keys below; a figure
that was not measured is absent or None) and answers one `Verdict` per
target it can judge; `summary_line(m)` formats them. scripts/bench prints
the line and writes it into docs/benchmarks.md. Tested by targets_test.py
(`python3 -m unittest discover -s scripts -p '*_test.py'`).

Figures (all from the same run; 3-node journal, 50 clients unless said):
  aof_redis_us      redis-server CPU µs per SET, appendfsync always
  stock_redis_us    redis-server CPU µs per SET, no persistence
  keel_box_us       Keel's primary box (redis-server + sidecar) CPU µs per SET
  keel_journal_us   Keel's journal, all nodes, CPU µs per SET
  keel_set1_p50_ms  Keel's SET p50 at 1 client
  journal_p50_ms    the journal alone (same nodes, 1 client, streamed) append p50
  fdatasync_p50_ms  this disk's fdatasync p50
  keel_peer_sets    Keel's SET/s under keel-load (closed loop)
  peer_sets         Valkey + replica, appendfsync always, WAITAOF 1 1 0, same tool
  keel_peer_p99_ms, peer_p99_ms   the p99 of those two runs
  keel_get, stock_get             GET/s, the two servers alternating
Restated targets (what this one machine can measure fairly):
  keel_box_load_us, peer_primary_us   CPU µs per SET of Keel's primary box and of
                                      the peer's primary, in those keel-load runs
  keel_journal_append_us   the journal's CPU µs per append (all nodes)
  stock_50_sets_us         50 × stock_redis_us (an append carrying every client's write)
"""

from dataclasses import dataclass


@dataclass(frozen=True)
class Target:
    name: str
    # "ratio": value = num / den; "plus_ms": value = num - den (ms).
    kind: str
    num: str
    den: str
    # "max": met when value <= bound; "min": met when value >= bound.
    sense: str
    bound: float


TARGETS = [
    Target("primary-box CPU/SET vs always", "ratio", "keel_box_us", "aof_redis_us", "max", 1.25),
    Target("journal CPU/SET vs stock", "ratio", "keel_journal_us", "stock_redis_us", "max", 1.0),
    Target("1-client SET p50 over journal", "plus_ms", "keel_set1_p50_ms", "journal_p50_ms", "max", 0.10),
    Target("journal p50 vs fdatasync", "ratio", "journal_p50_ms", "fdatasync_p50_ms", "max", 2.3),
    Target("SET/s vs peer", "ratio", "keel_peer_sets", "peer_sets", "min", 1.0),
    Target("p99 vs peer", "ratio", "keel_peer_p99_ms", "peer_p99_ms", "max", 1.0),
    Target("GET vs stock", "ratio", "keel_get", "stock_get", "min", 0.95),
    # Restated for one machine (docs/benchmarks.md, "Per role"): the same
    # promise's primary, and the journal's cost per append at full batching.
    Target("(restated) primary-box vs peer's primary", "ratio", "keel_box_load_us", "peer_primary_us", "max", 1.25),
    Target("(restated) journal CPU/append vs 50 stock SETs", "ratio", "keel_journal_append_us", "stock_50_sets_us", "max", 1.0),
]


@dataclass(frozen=True)
class Verdict:
    target: Target
    value: float
    met: bool

    def text(self) -> str:
        t = self.target
        op = "≤" if t.sense == "max" else "≥"
        if t.kind == "ratio":
            shown = f"{self.value:.2f}x/{op}{t.bound:g}"
        else:
            shown = f"{self.value:+.3f}ms/{op}+{t.bound:g}"
        return f"{t.name} {shown} {'met' if self.met else 'MISSED'}"


def verdicts(m: dict) -> list:
    out = []
    for t in TARGETS:
        a, b = m.get(t.num), m.get(t.den)
        if a is None or b is None:
            continue
        if t.kind == "ratio":
            if b <= 0:
                continue
            value = a / b
        else:
            value = a - b
        # Judged on the value as printed, so the line never contradicts itself.
        shown = round(value, 2 if t.kind == "ratio" else 3)
        met = shown <= t.bound if t.sense == "max" else shown >= t.bound
        out.append(Verdict(t, value, met))
    return out


def summary_line(m: dict) -> str:
    vs = verdicts(m)
    if not vs:
        return "targets: none measured"
    met = sum(v.met for v in vs)
    return f"targets ({met} of {len(vs)} met): " + "; ".join(v.text() for v in vs)


if __name__ == "__main__":
    import json
    import sys

    print(summary_line(json.load(open(sys.argv[1]) if len(sys.argv) > 1 else sys.stdin)))
