"""Tests of targets.py: python3 -m unittest discover -s scripts -p '*_test.py'"""

import unittest

from targets import TARGETS, summary_line, verdicts

ALL = {
    "aof_redis_us": 12.0, "stock_redis_us": 10.0, "keel_box_us": 27.2, "keel_journal_us": 42.6,
    "keel_set1_p50_ms": 0.983, "journal_p50_ms": 0.761, "fdatasync_p50_ms": 0.207,
    "keel_peer_sets": 18666.0, "peer_sets": 18681.0, "keel_peer_p99_ms": 5.28, "peer_p99_ms": 4.59,
    "keel_get": 88339.0, "stock_get": 87977.0,
    "keel_box_load_us": 21.0, "peer_primary_us": 18.0, "keel_journal_append_us": 1312.0, "stock_50_sets_us": 400.0,
}


class Targets(unittest.TestCase):
    def test_every_target_is_judged_when_every_figure_is_there(self):
        self.assertEqual(len(verdicts(ALL)), len(TARGETS))

    def test_ratios_and_differences(self):
        v = {x.target.name: x for x in verdicts(ALL)}
        self.assertAlmostEqual(v["primary-box CPU/SET vs always"].value, 27.2 / 12.0)
        self.assertFalse(v["primary-box CPU/SET vs always"].met)
        self.assertAlmostEqual(v["1-client SET p50 over journal"].value, 0.983 - 0.761)
        self.assertFalse(v["1-client SET p50 over journal"].met)
        self.assertTrue(v["GET vs stock"].met)
        self.assertTrue(v["SET/s vs peer"].met)  # 0.9992 prints as 1.00 and is judged so

    def test_judged_as_printed(self):
        # A value that prints as the bound meets it; one that prints below does not.
        m = {"keel_peer_sets": 9999.0, "peer_sets": 10000.0}
        (v,) = verdicts(m)
        self.assertTrue(v.met)
        self.assertEqual(v.text(), "SET/s vs peer 1.00x/≥1 met")
        (v,) = verdicts({"keel_peer_sets": 9949.0, "peer_sets": 10000.0})
        self.assertEqual(v.text(), "SET/s vs peer 0.99x/≥1 MISSED")

    def test_bounds_are_inclusive_both_ways(self):
        m = {"keel_box_us": 12.5, "aof_redis_us": 10.0, "keel_get": 95.0, "stock_get": 100.0,
             "keel_set1_p50_ms": 0.6, "journal_p50_ms": 0.5}
        self.assertTrue(all(v.met for v in verdicts(m)))
        m = {"keel_box_us": 12.6, "aof_redis_us": 10.0, "keel_get": 94.0, "stock_get": 100.0,
             "keel_set1_p50_ms": 0.602, "journal_p50_ms": 0.5}
        self.assertFalse(any(v.met for v in verdicts(m)))

    def test_unmeasured_figures_are_left_out(self):
        self.assertEqual(summary_line({}), "targets: none measured")
        m = {"keel_get": 90.0, "stock_get": 100.0, "peer_sets": None, "keel_peer_sets": 5.0}
        self.assertEqual(summary_line(m), "targets (0 of 1 met): GET vs stock 0.90x/≥0.95 MISSED")

    def test_a_zero_denominator_is_not_judged(self):
        self.assertEqual(verdicts({"keel_journal_us": 3.0, "stock_redis_us": 0.0}), [])

    def test_the_line(self):
        line = summary_line(ALL)
        self.assertTrue(line.startswith("targets (3 of 9 met): primary-box CPU/SET vs always 2.27x/≤1.25 MISSED; "))
        self.assertTrue(line.endswith("; (restated) primary-box vs peer's primary 1.17x/≤1.25 met; "
                                      "(restated) journal CPU/append vs 50 stock SETs 3.28x/≤1 MISSED"))
        self.assertIn("1-client SET p50 over journal +0.222ms/≤+0.1 MISSED", line)
        self.assertIn("journal p50 vs fdatasync 3.68x/≤2.3 MISSED", line)
        self.assertEqual(line.count(";"), len(TARGETS) - 1)


if __name__ == "__main__":
    unittest.main()
