//! The history checkers on hand-built and simulated histories: valid
//! histories must pass (no false alarms, including with unknown outcomes),
//! and each kind of violation Keel must never show (a lost acknowledged
//! append, a read of an aborted write, a dependency cycle, a stale register
//! read) must be flagged. Pure code: no Redis.

use std::collections::HashMap;
use std::time::Instant;

use keel_tests::checker::acked_appends;
use keel_tests::checker::check_list_append;
use keel_tests::checker::check_registers;
use keel_tests::checker::check_registers_with_budget;
use keel_tests::checker::lost_writes;
use keel_tests::checker::LostWrite;
use keel_tests::checker::Verdict;
use keel_tests::history::parse_history;
use keel_tests::history::Action;
use keel_tests::history::Elem;
use keel_tests::history::HistoryWriter;
use keel_tests::history::Kind;
use keel_tests::history::MicroOp;
use keel_tests::history::Op;

/// Builds a history line by line; completions reuse the process's pending
/// invocation.
#[derive(Default)]
struct H {
    ops: Vec<Op>,
    pending: HashMap<u64, Op>,
}

impl H {
    fn invoke(&mut self, p: u64, action: Action) -> &mut H {
        let op = Op::invoke(p, blank_reads(action));
        self.pending.insert(p, op.clone());
        self.ops.push(op);
        self
    }

    fn ok(&mut self, p: u64, action: Action) -> &mut H {
        let inv = self.pending.remove(&p).expect("invoked");
        self.ops.push(inv.complete(Kind::Ok, action));
        self
    }

    fn fail(&mut self, p: u64) -> &mut H {
        let inv = self.pending.remove(&p).expect("invoked");
        self.ops.push(inv.complete(Kind::Fail, inv.action.clone()).with_error("EXECABORT"));
        self
    }

    fn info(&mut self, p: u64) -> &mut H {
        let inv = self.pending.remove(&p).expect("invoked");
        self.ops.push(inv.complete(Kind::Info, inv.action.clone()).with_error("KEEL_UNCONFIRMED"));
        self
    }

    /// Invokes and completes `ok` at once.
    fn run(&mut self, p: u64, action: Action) -> &mut H {
        self.invoke(p, action.clone()).ok(p, action)
    }
}

/// The invocation form of an action: results not known yet.
fn blank_reads(action: Action) -> Action {
    match action {
        Action::Txn(mops) => Action::Txn(
            mops.into_iter()
                .map(|m| match m {
                    MicroOp::Read { key, .. } => MicroOp::Read { key, value: None },
                    other => other,
                })
                .collect(),
        ),
        Action::Read { key, .. } => Action::Read { key, value: None },
        Action::Incr { key, .. } => Action::Incr { key, value: None },
        w => w,
    }
}

fn ap(k: &str, v: Elem) -> MicroOp {
    MicroOp::append(k, v)
}

fn r(k: &str, xs: &[Elem]) -> MicroOp {
    MicroOp::read(k, Some(xs.to_vec()))
}

fn txn(mops: Vec<MicroOp>) -> Action {
    Action::Txn(mops)
}

fn w(k: &str, v: Elem) -> Action {
    Action::write(k, v)
}

fn get(k: &str, v: Option<Elem>) -> Action {
    Action::read(k, v)
}

fn incr(k: &str, v: Elem) -> Action {
    Action::incr(k, Some(v))
}

#[test]
fn valid_serial_list_append_history_passes() {
    let mut h = H::default();
    h.run(1, txn(vec![ap("x", 1), r("x", &[1])]))
        .run(2, txn(vec![r("x", &[1]), ap("y", 1)]))
        .run(3, txn(vec![r("y", &[1]), ap("x", 2), ap("y", 2)]))
        .run(1, txn(vec![r("x", &[1, 2]), r("y", &[1, 2])]));
    let report = check_list_append(&h.ops);
    println!("{report}");
    assert_eq!(report.verdict, Verdict::Valid, "{report}");
    assert_eq!((report.ops_total, report.ok, report.fail, report.info), (4, 4, 0, 0));
    assert_eq!(report.lost_acknowledged_writes, Some(vec![]));
}

#[test]
fn lost_append_is_flagged() {
    let mut h = H::default();
    h.run(1, txn(vec![ap("x", 1)])).run(2, txn(vec![ap("x", 2)])).run(3, txn(vec![r("x", &[2])]));
    let report = check_list_append(&h.ops);
    println!("{report}");
    assert_eq!(report.verdict, Verdict::Invalid, "{report}");
    assert_eq!(report.count("lost-append"), 1, "{report}");
    assert_eq!(
        report.lost_acknowledged_writes,
        Some(vec![LostWrite { key: "x".into(), value: 1, acked_at_line: Some(2), missing_from_line: Some(6) }])
    );
    // adya sees it too: the read is ordered after the append by real time and
    // before it by what it did not observe.
    assert!(report.anomalies.keys().any(|k| k.starts_with("G-single")), "{report}");
    assert!(report.to_string().contains("append of 1 to key \"x\""), "{report}");
}

#[test]
fn lost_append_is_found_in_the_final_state() {
    let mut h = H::default();
    h.run(1, txn(vec![ap("x", 1), ap("y", 1)])).run(2, txn(vec![ap("x", 2)]));
    h.invoke(3, txn(vec![ap("x", 3)])).info(3);
    h.invoke(4, txn(vec![ap("y", 2)])).fail(4);
    let acked = acked_appends(&h.ops);
    assert_eq!(acked, vec![("x".into(), 1), ("y".into(), 1), ("x".into(), 2)]);
    let healed: HashMap<String, Vec<Elem>> = HashMap::from([("x".into(), vec![1, 3])]);
    let lost = lost_writes(&acked, &healed);
    let lost: Vec<(&str, Elem)> = lost.iter().map(|l| (l.key.as_str(), l.value)).collect();
    assert_eq!(lost, vec![("y", 1), ("x", 2)]);
    let all: HashMap<String, Vec<Elem>> = HashMap::from([("x".into(), vec![1, 2]), ("y".into(), vec![1])]);
    assert!(lost_writes(&acked, &all).is_empty());
}

#[test]
fn read_of_aborted_append_is_flagged() {
    let mut h = H::default();
    h.run(1, txn(vec![ap("x", 1)]));
    h.invoke(2, txn(vec![ap("x", 2)])).fail(2);
    h.run(3, txn(vec![r("x", &[1, 2])]));
    let report = check_list_append(&h.ops);
    println!("{report}");
    assert_eq!(report.verdict, Verdict::Invalid, "{report}");
    assert_eq!(report.count("G1a"), 1, "{report}");
}

#[test]
fn g1c_cycle_is_flagged() {
    // Each transaction observed the other's append: circular information flow.
    let mut h = H::default();
    h.invoke(1, txn(vec![ap("x", 1), r("y", &[])])).invoke(2, txn(vec![ap("y", 1), r("x", &[])]));
    h.ok(1, txn(vec![ap("x", 1), r("y", &[1])])).ok(2, txn(vec![ap("y", 1), r("x", &[1])]));
    let report = check_list_append(&h.ops);
    println!("{report}");
    assert_eq!(report.verdict, Verdict::Invalid, "{report}");
    assert_eq!(report.count("G1c"), 1, "{report}");
}

#[test]
fn g2_write_skew_is_flagged() {
    let mut h = H::default();
    h.invoke(1, txn(vec![r("x", &[]), r("y", &[]), ap("x", 1)]))
        .invoke(2, txn(vec![r("x", &[]), r("y", &[]), ap("y", 1)]))
        .ok(1, txn(vec![r("x", &[]), r("y", &[]), ap("x", 1)]))
        .ok(2, txn(vec![r("x", &[]), r("y", &[]), ap("y", 1)]));
    let report = check_list_append(&h.ops);
    println!("{report}");
    assert_eq!(report.verdict, Verdict::Invalid, "{report}");
    assert_eq!(report.count("G2-item"), 1, "{report}");
    assert!(report.not.contains(&"repeatable-read".to_string()), "{report}");
}

#[test]
fn info_append_may_or_may_not_have_happened() {
    // Seen by a later read: fine.
    let mut h = H::default();
    h.run(1, txn(vec![ap("x", 1)]));
    h.invoke(2, txn(vec![ap("x", 2)])).info(2);
    h.run(3, txn(vec![r("x", &[1, 2])]));
    let report = check_list_append(&h.ops);
    assert_eq!(report.verdict, Verdict::Valid, "{report}");
    assert_eq!(report.info, 1);

    // Never seen: fine too.
    let mut h = H::default();
    h.run(1, txn(vec![ap("x", 1)]));
    h.invoke(2, txn(vec![ap("x", 2)])).info(2);
    h.run(3, txn(vec![r("x", &[1])]));
    assert_eq!(check_list_append(&h.ops).verdict, Verdict::Valid);

    // Seen, then unseen: it cannot un-happen.
    h.run(4, txn(vec![r("x", &[1, 2])])).run(5, txn(vec![r("x", &[1])]));
    let report = check_list_append(&h.ops);
    println!("{report}");
    assert_eq!(report.verdict, Verdict::Invalid, "{report}");
}

#[test]
fn malformed_history_is_inconclusive() {
    let mut h = H::default();
    h.run(1, txn(vec![ap("x", 1)])).run(2, txn(vec![r("x", &[1])]));
    h.ops.push(Op::invoke(9, txn(vec![ap("x", 5)])).complete(Kind::Ok, txn(vec![ap("x", 5)])));
    let report = check_list_append(&h.ops);
    println!("{report}");
    assert_eq!(report.verdict, Verdict::Unknown, "{report}");
    assert_eq!(report.count("malformed-history"), 1, "{report}");
    assert!(report.anomalies["malformed-history"].examples[0].contains("line 5"), "{report}");
}

#[test]
fn duplicate_appends_are_inconclusive() {
    let mut h = H::default();
    h.run(1, txn(vec![ap("x", 1)])).run(2, txn(vec![ap("x", 1)])).run(3, txn(vec![r("x", &[1, 1])]));
    let report = check_list_append(&h.ops);
    assert_ne!(report.verdict, Verdict::Valid, "{report}");
    assert_eq!(report.count("duplicate-appends"), 1, "{report}");
}

#[test]
fn linearizable_register_history_passes() {
    let mut h = H::default();
    h.run(1, get("a", None))
        .run(1, w("a", 5))
        .run(2, get("a", Some(5)))
        .run(2, incr("a", 6))
        .run(3, incr("b", 1))
        .run(3, get("b", Some(1)));
    // A read concurrent with a write may see either value.
    h.invoke(1, w("a", 7)).run(2, get("a", Some(6))).run(3, get("a", Some(7))).ok(1, w("a", 7));
    let report = check_registers(&h.ops);
    println!("{report}");
    assert_eq!(report.verdict, Verdict::Valid, "{report}");
    assert_eq!(report.ops_total, 9);
    assert_eq!(report.lost_acknowledged_writes, None);
}

#[test]
fn stale_register_read_is_flagged() {
    let mut h = H::default();
    h.run(1, w("a", 1)).run(1, w("a", 2)).run(2, get("a", Some(1)));
    h.run(1, w("b", 1)).run(2, get("b", Some(1)));
    let report = check_registers(&h.ops);
    println!("{report}");
    assert_eq!(report.verdict, Verdict::Invalid, "{report}");
    assert_eq!(report.count("nonlinearizable-key"), 1, "{report}");
    let example = &report.anomalies["nonlinearizable-key"].examples[0];
    assert!(example.contains("key \"a\"") && example.contains("line 6") && example.contains("read -> 1"), "{example}");
}

#[test]
fn wrong_incr_is_flagged() {
    let mut h = H::default();
    h.run(1, incr("c", 1)).run(2, incr("c", 1));
    let report = check_registers(&h.ops);
    assert_eq!(report.verdict, Verdict::Invalid, "{report}");
}

#[test]
fn info_write_makes_a_later_read_of_its_value_acceptable() {
    let mut h = H::default();
    h.run(1, w("a", 1));
    h.invoke(2, w("a", 2)).info(2);
    h.run(3, get("a", Some(1))).run(3, get("a", Some(2)));
    let report = check_registers(&h.ops);
    println!("{report}");
    assert_eq!(report.verdict, Verdict::Valid, "{report}");
    assert_eq!((report.ok, report.info), (3, 1));

    // Once observed it has happened: reading the old value again is stale.
    h.run(3, get("a", Some(1)));
    assert_eq!(check_registers(&h.ops).verdict, Verdict::Invalid);

    // A failed write never happened.
    let mut h = H::default();
    h.run(1, w("a", 1));
    h.invoke(2, w("a", 2)).fail(2);
    h.run(3, get("a", Some(2)));
    assert_eq!(check_registers(&h.ops).verdict, Verdict::Invalid);
}

#[test]
fn info_incr_and_unfinished_ops_are_unknown() {
    let mut h = H::default();
    h.run(1, w("a", 10));
    h.invoke(2, Action::incr("a", None)).info(2);
    h.run(3, get("a", Some(11))).run(3, incr("a", 12));
    // Still in flight when the history ended: may have happened.
    h.invoke(4, w("a", 99));
    h.run(3, get("a", Some(99)));
    let report = check_registers(&h.ops);
    println!("{report}");
    assert_eq!(report.verdict, Verdict::Valid, "{report}");
    assert_eq!((report.ops_total, report.ok, report.info), (6, 4, 2));
}

#[test]
fn histories_round_trip_through_the_writer_into_the_checker() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("history.jsonl");
    let writer = HistoryWriter::create(&path).unwrap();
    let mut h = H::default();
    h.run(1, w("a", 1)).run(2, get("a", Some(1)));
    for op in &h.ops {
        writer.record(op.clone()).unwrap();
    }
    let ops = keel_tests::history::read_history(&path).unwrap();
    assert_eq!(ops.len(), 4);
    assert!(check_registers(&ops).is_valid());
    let text = std::fs::read(&path).unwrap();
    assert_eq!(parse_history(&text).unwrap(), ops);
}

/// splitmix64: a small deterministic generator for simulations.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

/// A client's op in a simulation: invoked, maybe applied (with its result).
struct InFlight<T> {
    invoke: Op,
    result: Option<T>,
}

/// Simulates `n` register ops on `keys` keys from `procs` concurrent clients
/// against an atomic store: each op takes effect at one instant between its
/// invocation and completion; `info_percent` of them time out, and of those
/// some take effect later (or never). The result is linearizable.
fn simulate_registers(seed: u64, n: usize, keys: u64, procs: u64, info_percent: u64) -> Vec<Op> {
    let mut rng = Rng(seed);
    let mut store: HashMap<String, Option<Elem>> = HashMap::new();
    let apply = |store: &mut HashMap<String, Option<Elem>>, a: &Action| -> Action {
        match a {
            Action::Write { key, value } => {
                store.insert(key.clone(), Some(*value));
                a.clone()
            }
            Action::Read { key, .. } => Action::read(key.as_str(), store.get(key).copied().flatten()),
            Action::Incr { key, .. } => {
                let v = store.get(key).copied().flatten().unwrap_or(0) + 1;
                store.insert(key.clone(), Some(v));
                Action::incr(key.as_str(), Some(v))
            }
            Action::Txn(_) => unreachable!(),
        }
    };
    let mut ops = Vec::new();
    let mut slots: Vec<(u64, Option<InFlight<Action>>)> = (0..procs).map(|p| (p, None)).collect();
    let mut next_process = procs;
    let mut zombies: Vec<Action> = Vec::new();
    let mut invoked = 0;
    let mut next_value = 1000;
    while invoked < n || slots.iter().any(|s| s.1.is_some()) {
        if !zombies.is_empty() && rng.chance(5) {
            let z = zombies.swap_remove(rng.below(zombies.len() as u64) as usize);
            apply(&mut store, &z);
        }
        let slot = rng.below(procs) as usize;
        let (process, state) = &mut slots[slot];
        match state {
            None if invoked < n => {
                let key = format!("r{}", rng.below(keys));
                let action = match rng.below(3) {
                    0 => {
                        next_value += 1_000_000;
                        Action::write(key, next_value)
                    }
                    1 => Action::read(key, None),
                    _ => Action::incr(key, None),
                };
                let op = Op::invoke(*process, action);
                ops.push(op.clone());
                *state = Some(InFlight { invoke: op, result: None });
                invoked += 1;
            }
            None => {}
            Some(f) if f.result.is_none() => {
                if rng.chance(info_percent) {
                    // Timed out before taking effect; it may still do so.
                    if rng.chance(50) {
                        zombies.push(f.invoke.action.clone());
                    }
                    ops.push(f.invoke.complete(Kind::Info, f.invoke.action.clone()).with_error("timeout"));
                    *state = None;
                    *process = next_process;
                    next_process += 1;
                } else {
                    f.result = Some(apply(&mut store, &f.invoke.action));
                }
            }
            Some(f) => {
                if rng.chance(info_percent) {
                    ops.push(f.invoke.complete(Kind::Info, f.invoke.action.clone()).with_error("connection lost"));
                    *process = next_process;
                    next_process += 1;
                } else {
                    ops.push(f.invoke.complete(Kind::Ok, f.result.take().unwrap()));
                }
                *state = None;
            }
        }
    }
    ops
}

#[test]
fn simulated_register_histories_pass_and_a_stale_read_fails() {
    for seed in 0..20 {
        let ops = simulate_registers(seed, 300, 2, 5, 5);
        let report = check_registers(&ops);
        assert_eq!(report.verdict, Verdict::Valid, "seed {seed}:\n{report}");
        // Make the last ok read of a key that was overwritten since return an older value.
        let mut bad = ops.clone();
        let last_read = bad.iter().rposition(|op| {
            op.kind == Kind::Ok && matches!(op.action, Action::Read { value: Some(v), .. } if v > 1000)
        });
        if let Some(i) = last_read {
            if let Action::Read { value: Some(v), .. } = &mut bad[i].action {
                *v = -1;
            }
            let report = check_registers(&bad);
            assert_eq!(report.verdict, Verdict::Invalid, "seed {seed}:\n{report}");
            assert!(report.anomalies["nonlinearizable-key"].examples[0].contains(&format!("line {}", i + 1)));
        }
    }
}

#[test]
fn exhausted_search_budget_is_inconclusive() {
    // Many unknown INCRs overlapping a stale read at the end: proving that no
    // linearization exists takes more steps than this budget allows.
    let mut ops = simulate_registers(7, 2_000, 5, 10, 10);
    let i = ops
        .iter()
        .rposition(|op| op.kind == Kind::Ok && matches!(op.action, Action::Read { value: Some(v), .. } if v > 1000))
        .unwrap();
    if let Action::Read { value: Some(v), .. } = &mut ops[i].action {
        *v = -1;
    }
    let report = check_registers_with_budget(&ops, 10_000);
    println!("{report}");
    assert_eq!(report.verdict, Verdict::Unknown, "{report}");
    assert!(report.count("search-gave-up") >= 1, "{report}");
    assert_eq!(report.count("nonlinearizable-key"), 0, "{report}");
}

#[test]
fn five_thousand_register_ops_check_quickly() {
    let ops = simulate_registers(42, 5_000, 5, 10, 2);
    let started = Instant::now();
    let report = check_registers(&ops);
    let took = started.elapsed();
    println!("{report}");
    println!("checked {} register ops ({} records) in {took:?}", report.ops_total, ops.len());
    assert_eq!(report.verdict, Verdict::Valid, "{report}");
    assert_eq!(report.ops_total, 5_000);
}

/// Simulates list-append transactions against an atomic store: each commits
/// at one instant between invocation and completion, or aborts (`fail`), or
/// times out (`info`, committed or not). With `lose_acked`, one acknowledged
/// append is dropped from the store right after its acknowledgement.
fn simulate_list_append(seed: u64, n: usize, keys: u64, procs: u64, lose_acked: bool) -> Vec<Op> {
    let mut rng = Rng(seed);
    let mut store: HashMap<String, Vec<Elem>> = HashMap::new();
    let mut next_elem: HashMap<String, Elem> = HashMap::new();
    let mut ops = Vec::new();
    let mut slots: Vec<(u64, Option<InFlight<Option<Action>>>)> = (0..procs).map(|p| (p, None)).collect();
    let mut next_process = procs;
    let mut invoked = 0;
    let mut lost_one = false;
    while invoked < n || slots.iter().any(|s| s.1.is_some()) {
        let slot = rng.below(procs) as usize;
        let (process, state) = &mut slots[slot];
        match state {
            None if invoked < n => {
                let mops = (0..1 + rng.below(4))
                    .map(|_| {
                        let key = format!("l{}", rng.below(keys));
                        if rng.chance(50) {
                            let e = next_elem.entry(key.clone()).or_insert(0);
                            *e += 1;
                            MicroOp::append(key, *e)
                        } else {
                            MicroOp::read(key, None)
                        }
                    })
                    .collect();
                let op = Op::invoke(*process, Action::Txn(mops));
                ops.push(op.clone());
                *state = Some(InFlight { invoke: op, result: None });
                invoked += 1;
            }
            None => {}
            Some(f) if f.result.is_none() => {
                // Commit (or abort) now.
                if rng.chance(10) {
                    f.result = Some(None);
                } else {
                    let Action::Txn(mops) = &f.invoke.action else { unreachable!() };
                    let done = mops
                        .iter()
                        .map(|m| match m {
                            MicroOp::Append { key, value } => {
                                store.entry(key.clone()).or_default().push(*value);
                                m.clone()
                            }
                            MicroOp::Read { key, .. } => {
                                MicroOp::read(key.as_str(), Some(store.get(key).cloned().unwrap_or_default()))
                            }
                        })
                        .collect();
                    f.result = Some(Some(Action::Txn(done)));
                }
            }
            Some(f) => {
                let action = f.invoke.action.clone();
                match f.result.take().unwrap() {
                    None => ops.push(f.invoke.complete(Kind::Fail, action).with_error("EXECABORT")),
                    Some(_) if rng.chance(3) => {
                        ops.push(f.invoke.complete(Kind::Info, action).with_error("KEEL_UNCONFIRMED"));
                        *process = next_process;
                        next_process += 1;
                    }
                    Some(done) => {
                        if lose_acked && !lost_one && invoked > n / 2 {
                            if let Action::Txn(mops) = &done {
                                if let Some(MicroOp::Append { key, value }) =
                                    mops.iter().find(|m| matches!(m, MicroOp::Append { .. }))
                                {
                                    store.get_mut(key).unwrap().retain(|x| x != value);
                                    lost_one = true;
                                }
                            }
                        }
                        ops.push(f.invoke.complete(Kind::Ok, done));
                    }
                }
                *state = None;
            }
        }
    }
    // A final read of every key, after everything completed.
    let p = next_process;
    let mops: Vec<MicroOp> = (0..keys).map(|k| MicroOp::read(format!("l{k}"), None)).collect();
    let inv = Op::invoke(p, Action::Txn(mops.clone()));
    let done =
        mops.iter().map(|m| MicroOp::read(m.key(), Some(store.get(m.key()).cloned().unwrap_or_default()))).collect();
    ops.push(inv.clone());
    ops.push(inv.complete(Kind::Ok, Action::Txn(done)));
    ops
}

#[test]
fn simulated_list_append_histories_pass_and_a_lost_append_fails() {
    for seed in 0..10 {
        let ops = simulate_list_append(seed, 1_000, 5, 5, false);
        let started = Instant::now();
        let report = check_list_append(&ops);
        if seed == 0 {
            println!("{report}");
            println!("checked {} list-append txns in {:?}", report.ops_total, started.elapsed());
        }
        assert_eq!(report.verdict, Verdict::Valid, "seed {seed}:\n{report}");
        assert!(report.fail > 0 && report.info > 0, "{report}");

        let ops = simulate_list_append(seed, 1_000, 5, 5, true);
        let report = check_list_append(&ops);
        if seed == 0 {
            println!("{report}");
        }
        assert_eq!(report.verdict, Verdict::Invalid, "seed {seed}:\n{report}");
        assert_eq!(report.lost_acknowledged_writes.as_ref().map(Vec::len), Some(1), "seed {seed}:\n{report}");
        let lines = report.to_string().lines().count();
        assert!(lines <= 40, "report is {lines} lines:\n{report}");
    }
}
