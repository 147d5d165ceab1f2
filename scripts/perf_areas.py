"""Groups a `perf report --stdio --sort dso,sym` listing (on standard input)
into areas of work, by symbol and object name, and prints each area's share
of the samples, largest first. Used by scripts/bench-profile; the rules are
coarse on purpose (the first that matches wins) and the rest is "other".
Tested by perf_areas_test.py."""

import re
import sys

# (area, pattern over "dso symbol"), first match wins.
AREAS = [
    ("kernel: scheduler, wake-ups", r"\[kernel\.kallsyms\].*(finish_task_switch|_raw_spin_unlock_irq|schedule|futex|try_to_wake_up|enqueue|dequeue|select_task|pick_next|update_curr|__switch_to)"),
    ("kernel: disk, fsync", r"\[kernel\.kallsyms\].*(iowrite|blk_|bio_|ext4|jbd2|nvme|virtblk|submit_bio|filemap|file_write|fdatasync|fsync|writeback|page_cache)"),
    ("kernel: network (loopback TCP)", r"\[kernel\.kallsyms\].*(tcp|inet|skb|sock|net_|ip_|__dev_queue|loopback|softirq|napi|sk_|ip6)"),
    ("kernel: epoll, syscalls, other", r"\[kernel\.kallsyms\]"),
    ("TLS (rustls, ring, aws-lc)", r"(rustls|ring::|aws_lc|aes|gcm|chacha|ghash|sha2|_sha256)"),
    ("HTTP/2, gRPC (h2, hyper, tonic, prost)", r"(h2::|hyper|tonic|prost|http_body|http::|tower)"),
    ("Raft (openraft), log (raft-log, chunked_wal)", r"(openraft|raft_log|chunked_wal)"),
    ("serialization (serde, rmp)", r"(serde|rmp_)"),
    ("async runtime (tokio, mio, futures)", r"(tokio|mio::|futures|parking_lot|crossbeam)"),
    ("allocator (jemalloc, mimalloc, malloc)", r"(jemalloc|\bmi_|_mi_|malloc|free\b|je_|zfree|zmalloc|realloc)"),
    ("memcpy/memmove (libc)", r"(memmove|memcpy|memset|memcmp)"),
    ("keel module", r"libkeel_module"),
    ("keel sidecar/journal code", r"keel_(sidecar|journal)"),
    ("redis-server (commands, networking, dict)", r"(redis-check-rdb|redis-server|valkey)"),
]


def areas(lines):
    """[(area, percent)] largest first, from perf report lines."""
    totals = {}
    for line in lines:
        m = re.match(r"\s*([\d.]+)%\s+(.*)", line)
        if not m:
            continue
        pct, rest = float(m.group(1)), m.group(2)
        area = next((a for a, pat in AREAS if re.search(pat, rest)), "other")
        totals[area] = totals.get(area, 0.0) + pct
    return sorted(totals.items(), key=lambda kv: -kv[1])


if __name__ == "__main__":
    for area, pct in areas(sys.stdin):
        if pct >= 0.5:
            print(f"    {pct:6.2f}%  {area}")
