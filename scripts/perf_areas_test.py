"""Tests of perf_areas.py: python3 -m unittest discover -s scripts -p '*_test.py'"""

import unittest

from perf_areas import areas

REPORT = """# Samples: 1K of event 'cpu-clock'
    17.49%  [kernel.kallsyms]  [k] finish_task_switch.isra.0
     4.97%  [kernel.kallsyms]  [k] iowrite16
     1.40%  [kernel.kallsyms]  [k] tcp_ack
     0.91%  [kernel.kallsyms]  [k] do_epoll_wait
     2.73%  libc.so.6          [.] __memmove_avx512_unaligned_erms
     0.73%  keel-sidecar       [.] rustls::record_layer::RecordLayer::decrypt_incoming
     0.91%  keel-sidecar       [.] h2::proto::connection::Connection<T,P,B>::poll
     1.28%  keel-sidecar       [.] keel_sidecar::cuts::Cuts::feed
     1.48%  keel-journal       [.] _mi_page_malloc_zero
     3.39%  redis-check-rdb    [.] dictFind
     0.66%  keel-journal       [.] openraft::replication::ReplicationCore<C,N,LS>::next_append_request::{{closure}}
     0.10%  something          [.] unknown_thing
"""


class Areas(unittest.TestCase):
    def test_each_line_goes_to_one_area(self):
        got = dict(areas(REPORT.splitlines()))
        self.assertAlmostEqual(sum(got.values()), 17.49 + 4.97 + 1.40 + 0.91 + 2.73 + 0.73 + 0.91 + 1.28 + 1.48 + 3.39 + 0.66 + 0.10)
        self.assertAlmostEqual(got["kernel: scheduler, wake-ups"], 17.49)
        self.assertAlmostEqual(got["kernel: disk, fsync"], 4.97)
        self.assertAlmostEqual(got["kernel: network (loopback TCP)"], 1.40)
        self.assertAlmostEqual(got["kernel: epoll, syscalls, other"], 0.91)
        self.assertAlmostEqual(got["TLS (rustls, ring, aws-lc)"], 0.73)
        self.assertAlmostEqual(got["HTTP/2, gRPC (h2, hyper, tonic, prost)"], 0.91)
        self.assertAlmostEqual(got["keel sidecar/journal code"], 1.28)
        self.assertAlmostEqual(got["allocator (jemalloc, mimalloc, malloc)"], 1.48)
        self.assertAlmostEqual(got["Raft (openraft), log (raft-log, chunked_wal)"], 0.66)
        self.assertAlmostEqual(got["redis-server (commands, networking, dict)"], 3.39)
        self.assertAlmostEqual(got["other"], 0.10)

    def test_largest_first(self):
        got = areas(REPORT.splitlines())
        self.assertEqual(got[0][0], "kernel: scheduler, wake-ups")
        self.assertEqual([p for _, p in got], sorted((p for _, p in got), reverse=True))


if __name__ == "__main__":
    unittest.main()
