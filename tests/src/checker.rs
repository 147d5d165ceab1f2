//! Checkers for histories recorded by the fault-injection harness (format in
//! `history`). They decide whether what clients saw is allowed by Keel's
//! promise of strong consistency:
//!
//! - list-append transactions must be strict serializable. The `adya` crate
//!   (an Elle-style checker) infers the dependency graph from the reads and
//!   looks for the cycles strict serializability forbids (G0, G1a/b/c,
//!   G-single, G2, their real-time variants, internal, dirty and lost
//!   updates, ...). On top of it, `lost-append` names every acknowledged
//!   append missing from a read that began after the append was
//!   acknowledged: the durability bug Keel exists to prevent.
//! - registers (SET / GET / INCR) must be linearizable per key, checked with
//!   the Wing–Gong–Lowe search of the `todc-utils` crate against a
//!   sequential register whose value is an i64 or nil, where INCR of nil
//!   gives 1. Unknown SETs that no result could have observed are dropped
//!   first (sound; see `prune_unobservable_writes`), and each key's search
//!   has a step budget (`REGISTER_SEARCH_STEPS`), past which the verdict is
//!   `Unknown` rather than a hang: the search is exponential in the number
//!   of overlapping unknown operations, so keep histories per key short.
//!
//! How outcomes are treated, in both checkers:
//! - `ok`: took effect exactly once, between its invocation and completion,
//!   with the result recorded;
//! - `fail`: never took effect, and is dropped (list-append keeps it to
//!   catch reads of aborted appends, G1a);
//! - `info`, or an invocation the history never completes: may have taken
//!   effect at any point after its invocation, or never. Its completion is
//!   placed after the end of the history, where taking effect last is
//!   indistinguishable from never taking effect. An unknown read is dropped.
//!
//! Real time is line order (see `history`). A history that breaks the
//! format's rules (a completion without an invocation, a completion that does
//! not match its invocation, a process with two operations in flight, a
//! repeated appended element) cannot be fully checked: it is reported as
//! `malformed-history` / `duplicate-appends` and the verdict is at best
//! `Unknown`. Each anomaly keeps its count and up to
//! `MAX_EXAMPLES_PER_ANOMALY` descriptions; in adya's descriptions `T<n>`
//! names the transaction completed at line `n`.

use std::cell::Cell;
use std::collections::BTreeMap;
use std::collections::HashMap;
use std::collections::HashSet;
use std::fmt;
use std::time::Duration;

use todc_utils::linearizability::history::Action as Step;
use todc_utils::linearizability::history::History as LinHistory;
use todc_utils::linearizability::WGLChecker;
use todc_utils::specifications::Specification;

use crate::history::Action;
use crate::history::Elem;
use crate::history::Key;
use crate::history::Kind;
use crate::history::MicroOp;
use crate::history::Op;

/// Budget of adya's cycle search per strongly connected component; when it
/// runs out the verdict is `Unknown` (anomaly `cycle-search-timeout`).
pub const CYCLE_SEARCH_TIMEOUT: Duration = Duration::from_secs(10);
/// Budget of the linearizability search for one key, in steps (attempts to
/// apply an operation). The search is exponential in the number of
/// operations with unknown outcome that overlap; past the budget the key is
/// reported as `search-gave-up` and the verdict is `Unknown`. A step costs
/// time linear in the length of the key's history (about 50 µs for 1,000
/// ops in a debug build), so keep per-key histories short. Finding the
/// first failing operation of a key that is not linearizable may take as
/// many steps again.
pub const REGISTER_SEARCH_STEPS: u64 = 300_000;
/// Descriptions kept per anomaly type.
pub const MAX_EXAMPLES_PER_ANOMALY: usize = 3;
/// Lines of one example, and characters of one line, that `Display` shows.
const DISPLAY_EXAMPLE_LINES: usize = 8;
const DISPLAY_LINE_CHARS: usize = 160;
/// Lost writes that `Display` lists.
const DISPLAY_LOST_WRITES: usize = 5;

/// Anomaly kinds that say the history could not be fully checked, rather
/// than that it shows a violation.
const INCONCLUSIVE: [&str; 6] = [
    "malformed-history",
    "search-gave-up",
    "duplicate-appends",
    "empty-transaction-graph",
    "cycle-search-timeout",
    "unexpected-txn-micro-op-types",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// No anomaly: the history is consistent with the model.
    Valid,
    /// At least one anomaly the model forbids.
    Invalid,
    /// No violation found, but the history could not be fully checked.
    Unknown,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Workload {
    ListAppend,
    Registers,
}

/// How often one anomaly type occurred, with a few descriptions.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AnomalySummary {
    pub count: usize,
    pub examples: Vec<String>,
}

/// An acknowledged append that a later read (or the final state) lacks.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct LostWrite {
    pub key: Key,
    pub value: Elem,
    /// Line of the `ok` completion, when found in a history.
    pub acked_at_line: Option<usize>,
    /// Line of the first `ok` read completion that should have shown it;
    /// `None` when the final state lacks it.
    pub missing_from_line: Option<usize>,
}

/// The outcome of a check.
#[derive(Debug, Clone)]
pub struct Report {
    pub workload: Workload,
    /// The consistency model checked.
    pub model: &'static str,
    pub verdict: Verdict,
    /// Operations of this workload (invocations).
    pub ops_total: usize,
    pub ok: usize,
    pub fail: usize,
    /// `info` completions plus invocations never completed.
    pub info: usize,
    /// Anomaly type -> count and examples.
    pub anomalies: BTreeMap<String, AnomalySummary>,
    /// The weakest models the anomalies rule out (list-append only).
    pub not: Vec<String>,
    /// Acknowledged appends missing from a later read (list-append). `None`
    /// for registers, where the search gives only a verdict per key; a lost
    /// register write shows up there as `nonlinearizable-key` once a later
    /// read misses it.
    pub lost_acknowledged_writes: Option<Vec<LostWrite>>,
}

impl Report {
    fn new(workload: Workload, model: &'static str) -> Report {
        Report {
            workload,
            model,
            verdict: Verdict::Valid,
            ops_total: 0,
            ok: 0,
            fail: 0,
            info: 0,
            anomalies: BTreeMap::new(),
            not: Vec::new(),
            lost_acknowledged_writes: None,
        }
    }

    pub fn is_valid(&self) -> bool {
        self.verdict == Verdict::Valid
    }

    /// Count of anomalies of type `kind`.
    pub fn count(&self, kind: &str) -> usize {
        self.anomalies.get(kind).map_or(0, |a| a.count)
    }

    fn add(&mut self, kind: &str, example: String) {
        self.add_many(kind, 1, std::iter::once(example));
    }

    fn add_many(&mut self, kind: &str, count: usize, examples: impl IntoIterator<Item = String>) {
        let entry = self.anomalies.entry(kind.to_string()).or_default();
        entry.count += count;
        let room = MAX_EXAMPLES_PER_ANOMALY.saturating_sub(entry.examples.len());
        entry.examples.extend(examples.into_iter().take(room));
        if INCONCLUSIVE.contains(&kind) {
            if self.verdict == Verdict::Valid {
                self.verdict = Verdict::Unknown;
            }
        } else {
            self.verdict = Verdict::Invalid;
        }
    }

    fn count_outcomes(&mut self, pairs: &[Pair]) {
        self.ops_total = pairs.len();
        for p in pairs {
            match p.outcome() {
                Kind::Ok => self.ok += 1,
                Kind::Fail => self.fail += 1,
                Kind::Info | Kind::Invoke => self.info += 1,
            }
        }
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let workload = match self.workload {
            Workload::ListAppend => "list-append",
            Workload::Registers => "registers",
        };
        let verdict = match self.verdict {
            Verdict::Valid => "VALID",
            Verdict::Invalid => "INVALID",
            Verdict::Unknown => "UNKNOWN",
        };
        writeln!(f, "{workload} history: {verdict} ({})", self.model)?;
        writeln!(f, "  ops: {} ({} ok, {} fail, {} info)", self.ops_total, self.ok, self.fail, self.info)?;
        if !self.not.is_empty() {
            writeln!(f, "  not: {}", self.not.join(", "))?;
        }
        for (kind, a) in &self.anomalies {
            writeln!(f, "  {kind}: {}", a.count)?;
            if let Some(example) = a.examples.first() {
                let lines: Vec<&str> = example.lines().collect();
                for line in lines.iter().take(DISPLAY_EXAMPLE_LINES) {
                    writeln!(f, "      {}", clip(line, DISPLAY_LINE_CHARS))?;
                }
                if lines.len() > DISPLAY_EXAMPLE_LINES {
                    writeln!(f, "      ... ({} more lines)", lines.len() - DISPLAY_EXAMPLE_LINES)?;
                }
            }
        }
        match &self.lost_acknowledged_writes {
            None => writeln!(f, "  lost acknowledged writes: not determined by this check")?,
            Some(lost) => {
                write!(f, "  lost acknowledged writes: {}", lost.len())?;
                for l in lost.iter().take(DISPLAY_LOST_WRITES) {
                    write!(f, "\n      {}", describe_lost(l))?;
                }
                if lost.len() > DISPLAY_LOST_WRITES {
                    write!(f, "\n      ... and {} more", lost.len() - DISPLAY_LOST_WRITES)?;
                }
                writeln!(f)?;
            }
        }
        Ok(())
    }
}

fn clip(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        return s.to_string();
    }
    let mut out: String = s.chars().take(max.saturating_sub(3)).collect();
    out.push_str("...");
    out
}

fn describe_lost(l: &LostWrite) -> String {
    let acked = l.acked_at_line.map_or(String::new(), |n| format!(", acknowledged at line {n}"));
    let missing = match l.missing_from_line {
        Some(n) => format!("missing from the read completed at line {n}"),
        None => "missing from the final state".to_string(),
    };
    format!("append of {} to key {:?}{acked}, {missing}", l.value, l.key)
}

/// An invocation and what became of it.
struct Pair<'a> {
    invoke: &'a Op,
    invoke_line: usize,
    /// The completion and its line; `None` if none arrived (or none that
    /// matched), which counts as `info`.
    done: Option<(&'a Op, usize)>,
    /// Its process invoked again before completing it: the completion, if
    /// any, cannot be told apart, so the op is left out where it could be.
    superseded: bool,
}

impl Pair<'_> {
    fn outcome(&self) -> Kind {
        self.done.map_or(Kind::Info, |(op, _)| op.kind)
    }

    /// The completion, if it was `ok`.
    fn ok(&self) -> Option<(&Op, usize)> {
        self.done.filter(|(op, _)| op.kind == Kind::Ok)
    }
}

/// Pairs each invocation of a selected action with the next completion on
/// its process, reporting records that break the format's rules.
fn pair_ops<'a>(ops: &'a [Op], select: impl Fn(&Action) -> bool, report: &mut Report) -> Vec<Pair<'a>> {
    let mut pairs: Vec<Pair> = Vec::new();
    let mut pending: HashMap<u64, usize> = HashMap::new();
    for (i, op) in ops.iter().enumerate() {
        if !select(&op.action) {
            continue;
        }
        let line = i + 1;
        if op.kind == Kind::Invoke {
            if let Some(prev) = pending.insert(op.process, pairs.len()) {
                pairs[prev].superseded = true;
                report.add(
                    "malformed-history",
                    format!(
                        "process {} invoked at line {line} while its op invoked at line {} was still in flight",
                        op.process, pairs[prev].invoke_line
                    ),
                );
            }
            pairs.push(Pair { invoke: op, invoke_line: line, done: None, superseded: false });
            continue;
        }
        let Some(p) = pending.remove(&op.process) else {
            report.add(
                "malformed-history",
                format!(
                    "line {line}: {} completion on process {} with no invocation in flight",
                    op.kind.as_str(),
                    op.process
                ),
            );
            continue;
        };
        match mismatch(&pairs[p].invoke.action, op) {
            None => pairs[p].done = Some((op, line)),
            Some(why) => report.add(
                "malformed-history",
                format!(
                    "line {line} does not complete the op invoked at line {}: {why}; treating that op as info",
                    pairs[p].invoke_line
                ),
            ),
        }
    }
    pairs
}

/// Why `done` cannot complete an invocation of `inv`, if it cannot.
fn mismatch(inv: &Action, done: &Op) -> Option<String> {
    let ok = done.kind == Kind::Ok;
    match (inv, &done.action) {
        (Action::Txn(a), Action::Txn(b)) => {
            if a.len() != b.len() {
                return Some(format!("{} micro-ops invoked, {} completed", a.len(), b.len()));
            }
            for (i, (x, y)) in a.iter().zip(b).enumerate() {
                let same = match (x, y) {
                    (MicroOp::Append { key: k1, value: v1 }, MicroOp::Append { key: k2, value: v2 }) => {
                        k1 == k2 && v1 == v2
                    }
                    (MicroOp::Read { key: k1, .. }, MicroOp::Read { key: k2, value }) => {
                        if ok && value.is_none() {
                            return Some(format!("micro-op {i} is an ok read without the list read"));
                        }
                        k1 == k2
                    }
                    _ => false,
                };
                if !same {
                    return Some(format!("micro-op {i} differs"));
                }
            }
            None
        }
        (Action::Write { key: k1, value: v1 }, Action::Write { key: k2, value: v2 }) => {
            (k1 != k2 || v1 != v2).then(|| "write of a different key or value".to_string())
        }
        (Action::Read { key: k1, .. }, Action::Read { key: k2, .. }) => {
            (k1 != k2).then(|| "read of a different key".to_string())
        }
        (Action::Incr { key: k1, .. }, Action::Incr { key: k2, value }) => {
            if k1 != k2 {
                Some("incr of a different key".to_string())
            } else if ok && value.is_none() {
                Some("ok incr without the new value".to_string())
            } else {
                None
            }
        }
        (a, b) => Some(format!("f {:?} completed as f {:?}", a.f(), b.f())),
    }
}

/// Checks a list-append history for strict serializability.
pub fn check_list_append(ops: &[Op]) -> Report {
    let mut report = Report::new(Workload::ListAppend, "strict-serializable");
    let pairs = pair_ops(ops, |a| matches!(a, Action::Txn(_)), &mut report);
    report.count_outcomes(&pairs);

    let mut appended: HashMap<(&str, Elem), usize> = HashMap::new();
    for p in &pairs {
        let Action::Txn(mops) = &p.invoke.action else { continue };
        for m in mops {
            if let MicroOp::Append { key, value } = m {
                if let Some(first) = appended.insert((key, *value), p.invoke_line) {
                    report.add(
                        "duplicate-appends",
                        format!(
                            "element {value} was appended to key {key:?} by the ops invoked at lines {first} and {}; \
                             appended elements must be unique per key",
                            p.invoke_line
                        ),
                    );
                }
            }
        }
    }

    let history = to_adya(ops.len(), &pairs);
    let opts =
        adya::Opts { models: vec!["strict-serializable".into()], timeout: CYCLE_SEARCH_TIMEOUT, ..Default::default() };
    let adya_report = adya::check(&history, adya::Workload::ListAppend, &opts);
    for (kind, list) in &adya_report.anomalies {
        report.add_many(kind, list.len(), list.iter().map(|a| a.explanation.trim_end().to_string()));
    }
    report.not = adya_report.not.clone();
    if adya_report.valid == adya::Valid::False && report.verdict != Verdict::Invalid {
        // adya said invalid through an anomaly kind listed as inconclusive.
        report.verdict = Verdict::Invalid;
    }

    let lost = lost_appends(&pairs);
    for l in &lost {
        report.add("lost-append", describe_lost(l));
    }
    report.lost_acknowledged_writes = Some(lost);
    report
}

/// Builds adya's history: every pair in line order, with its own
/// invocation's micro-ops (reads unknown) unless it completed `ok`.
fn to_adya(lines: usize, pairs: &[Pair]) -> adya::History {
    use adya::history::Mop;
    use adya::history::OpType;
    use adya::history::ReadValue;
    use adya::history::Scalar;

    let mut interner = adya::history::Interner::default();
    let mut mops = |action: &Action, with_reads: bool| -> Vec<Mop> {
        let Action::Txn(ms) = action else { return Vec::new() };
        ms.iter()
            .map(|m| match m {
                MicroOp::Append { key, value } => Mop::Append {
                    key: interner.intern(Scalar::Str(key.clone())),
                    value: interner.intern(Scalar::Int(*value)),
                },
                MicroOp::Read { key, value } => Mop::Read {
                    key: interner.intern(Scalar::Str(key.clone())),
                    value: match value {
                        Some(xs) if with_reads => {
                            ReadValue::List(xs.iter().map(|x| interner.intern(Scalar::Int(*x))).collect())
                        }
                        _ => ReadValue::Nil,
                    },
                },
            })
            .collect()
    };
    // (line, tie-break, op): completions never arriving sort after the end.
    let mut events: Vec<(usize, usize, adya::history::Op)> = Vec::new();
    let end = lines + 1;
    for (i, p) in pairs.iter().enumerate() {
        if p.superseded {
            continue;
        }
        let process = Some(p.invoke.process as i64);
        let time = |op: &Op| Some(op.time_ns as i64);
        let invoke_mops = mops(&p.invoke.action, false);
        events.push((
            p.invoke_line,
            0,
            adya::history::Op {
                index: p.invoke_line as u64,
                kind: OpType::Invoke,
                process,
                value: invoke_mops.clone(),
                time: time(p.invoke),
            },
        ));
        let (kind, value, line, t) = match p.done {
            Some((op, line)) if op.kind == Kind::Ok => (OpType::Ok, mops(&op.action, true), line, time(op)),
            Some((op, line)) if op.kind == Kind::Fail => (OpType::Fail, invoke_mops, line, time(op)),
            Some((op, line)) => (OpType::Info, invoke_mops, line, time(op)),
            None => (OpType::Info, invoke_mops, end, None),
        };
        events.push((line, i, adya::history::Op { index: line as u64, kind, process, value, time: t }));
    }
    events.sort_by_key(|(line, tie, _)| (*line, *tie));
    adya::History::from_ops(events.into_iter().map(|(_, _, op)| op).collect(), interner)
}

/// Acknowledged appends missing from an `ok` read of the same key invoked
/// after the append's completion. Strict serializability orders the append
/// before that read, and lists only grow, so the read must contain it.
fn lost_appends(pairs: &[Pair]) -> Vec<LostWrite> {
    // key -> acknowledged appends as (completion line, element), by line.
    let mut acked: HashMap<&str, Vec<(usize, Elem)>> = HashMap::new();
    for p in pairs {
        let Some((op, line)) = p.ok() else { continue };
        let Action::Txn(mops) = &op.action else { continue };
        for m in mops {
            if let MicroOp::Append { key, value } = m {
                acked.entry(key).or_default().push((line, *value));
            }
        }
    }
    for list in acked.values_mut() {
        list.sort_unstable();
    }
    let acked_line: HashMap<(&str, Elem), usize> =
        acked.iter().flat_map(|(k, list)| list.iter().map(move |&(line, v)| ((*k, v), line))).collect();

    let mut reads: Vec<(usize, usize, &str, &[Elem])> = Vec::new(); // (completion line, invoke line, key, list)
    for p in pairs {
        let Some((op, line)) = p.ok() else { continue };
        let Action::Txn(mops) = &op.action else { continue };
        for m in mops {
            if let MicroOp::Read { key, value: Some(xs) } = m {
                reads.push((line, p.invoke_line, key, xs));
            }
        }
    }
    reads.sort_unstable_by_key(|r| r.0);

    let mut lost: Vec<LostWrite> = Vec::new();
    let mut reported: HashSet<(&str, Elem)> = HashSet::new();
    for (read_line, invoke_line, key, xs) in reads {
        let Some(list) = acked.get(key) else { continue };
        let required = list.partition_point(|&(line, _)| line < invoke_line);
        if required == 0 {
            continue;
        }
        let seen: HashSet<Elem> =
            xs.iter().copied().filter(|x| acked_line.get(&(key, *x)).is_some_and(|&l| l < invoke_line)).collect();
        if seen.len() >= required {
            continue;
        }
        for &(line, v) in &list[..required] {
            if !seen.contains(&v) && reported.insert((key, v)) {
                lost.push(LostWrite {
                    key: key.to_string(),
                    value: v,
                    acked_at_line: Some(line),
                    missing_from_line: Some(read_line),
                });
            }
        }
    }
    lost
}

/// The `(key, element)` of every acknowledged (`ok`) append in `ops`, for
/// `lost_writes`.
pub fn acked_appends(ops: &[Op]) -> Vec<(Key, Elem)> {
    let mut out = Vec::new();
    for op in ops.iter().filter(|op| op.kind == Kind::Ok) {
        let Action::Txn(mops) = &op.action else { continue };
        for m in mops {
            if let MicroOp::Append { key, value } = m {
                out.push((key.clone(), *value));
            }
        }
    }
    out
}

/// Acknowledged appends absent from the final state: `final_state` maps each
/// key to its `LRANGE key 0 -1` read after the cluster healed (a key missing
/// from the map is read as empty). Every entry returned is a lost write.
pub fn lost_writes(acked: &[(Key, Elem)], final_state: &HashMap<Key, Vec<Elem>>) -> Vec<LostWrite> {
    let present: HashMap<&str, HashSet<Elem>> =
        final_state.iter().map(|(k, xs)| (k.as_str(), xs.iter().copied().collect())).collect();
    acked
        .iter()
        .filter(|(k, v)| !present.get(k.as_str()).is_some_and(|s| s.contains(v)))
        .map(|(k, v)| LostWrite { key: k.clone(), value: *v, acked_at_line: None, missing_from_line: None })
        .collect()
}

/// A register operation as the sequential specification sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
enum RegOp {
    /// SET; also an unknown SET, which is valid in any state.
    Write(Elem),
    /// GET returning this (nil = `None`).
    Read(Option<Elem>),
    /// INCR returning this.
    Incr(Elem),
    /// INCR whose reply never arrived.
    IncrUnknown,
}

/// A Redis string holding an i64, or nil.
struct RegisterSpec;

impl Specification for RegisterSpec {
    type State = Option<Elem>;
    type Operation = RegOp;

    fn init() -> Option<Elem> {
        None
    }

    fn apply(op: &RegOp, state: &Option<Elem>) -> (bool, Option<Elem>) {
        // Out of budget, nothing applies, so the search unwinds quickly;
        // `search` then knows its `false` means "gave up".
        let left = STEPS_LEFT.get();
        if left == 0 {
            return (false, *state);
        }
        STEPS_LEFT.set(left - 1);
        match op {
            RegOp::Write(v) => (true, Some(*v)),
            RegOp::Read(v) => (v == state, *state),
            RegOp::Incr(v) => match state.unwrap_or(0).checked_add(1) {
                Some(n) if n == *v => (true, Some(n)),
                _ => (false, *state),
            },
            // An INCR that would overflow fails in Redis and changes nothing.
            RegOp::IncrUnknown => (true, state.unwrap_or(0).checked_add(1).or(*state)),
        }
    }
}

thread_local! {
    /// Steps the current search on this thread may still take.
    static STEPS_LEFT: Cell<u64> = const { Cell::new(u64::MAX) };
}

/// What the search concluded about a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Search {
    Linearizable,
    NotLinearizable,
    GaveUp,
}

/// One register operation on a key, ready for the search.
struct KeyOp<'a> {
    op: RegOp,
    invoke_line: usize,
    /// Line of the `ok` completion; `None` if the outcome is unknown.
    done_line: Option<usize>,
    pair: &'a Pair<'a>,
}

/// Checks a register history for linearizability of each key.
pub fn check_registers(ops: &[Op]) -> Report {
    check_registers_with_budget(ops, REGISTER_SEARCH_STEPS)
}

/// `check_registers` with a search budget of `max_steps` per key.
pub fn check_registers_with_budget(ops: &[Op], max_steps: u64) -> Report {
    let mut report = Report::new(Workload::Registers, "linearizable (per key)");
    let pairs = pair_ops(ops, |a| a.register_key().is_some(), &mut report);
    report.count_outcomes(&pairs);

    for (key, key_ops) in &key_ops_by_key(&pairs) {
        let key_ops = prune_unobservable_writes(key_ops);
        match search(&key_ops, usize::MAX, max_steps).0 {
            Search::Linearizable => {}
            Search::NotLinearizable => {
                report.add("nonlinearizable-key", explain_nonlinearizable(key, &key_ops, max_steps))
            }
            Search::GaveUp => {
                let unknown = key_ops.iter().filter(|o| o.done_line.is_none()).count();
                report.add(
                    "search-gave-up",
                    format!(
                        "key {key:?}: no verdict within {max_steps} search steps ({} ops, {unknown} with unknown outcome); \
                         check fewer ops per key, or fewer unknown INCRs, or raise the budget",
                        key_ops.len()
                    ),
                );
            }
        }
    }
    report
}

/// Each key's operations as the search sees them: `fail` dropped, unknown
/// reads dropped, unknown writes and INCRs left without a completion.
fn key_ops_by_key<'a>(pairs: &'a [Pair<'a>]) -> BTreeMap<&'a str, Vec<KeyOp<'a>>> {
    let mut by_key: BTreeMap<&str, Vec<KeyOp>> = BTreeMap::new();
    for p in pairs {
        let Some(key) = p.invoke.action.register_key() else { continue };
        let known = p.ok().map(|(op, line)| (&op.action, line));
        let (op, done_line) = match (p.outcome(), known) {
            (Kind::Fail, _) => continue,
            (_, Some((Action::Write { value, .. }, line))) => (RegOp::Write(*value), Some(line)),
            (_, Some((Action::Read { value, .. }, line))) => (RegOp::Read(*value), Some(line)),
            (_, Some((Action::Incr { value: Some(v), .. }, line))) => (RegOp::Incr(*v), Some(line)),
            _ => match &p.invoke.action {
                Action::Write { value, .. } => (RegOp::Write(*value), None),
                Action::Incr { .. } => (RegOp::IncrUnknown, None),
                _ => continue,
            },
        };
        by_key.entry(key).or_default().push(KeyOp { op, invoke_line: p.invoke_line, done_line, pair: p });
    }
    by_key
}

/// Drops unknown SETs that no `ok` result could have observed, which keeps
/// the search small when faults leave many writes unknown. With `n` INCRs
/// on the key (of any outcome but `fail`), an unknown `SET v` is dropped if
/// no `ok` GET or INCR returned a value in `v..=v+n`.
///
/// Sound: suppose a linearization where that SET takes effect. Until the
/// next SET (or the end), the value is `v` plus the INCRs applied so far, so
/// every `ok` GET or INCR placed there would return a value in `v..=v+n`;
/// hence only unknown INCRs are placed there. Removing the SET and those
/// unknown INCRs (which may never have happened) leaves a valid
/// linearization, because the next SET overwrites the value. So the history
/// is linearizable with the SET if and only if it is without it.
/// A harness keeps this effective by spacing written values far apart.
fn prune_unobservable_writes<'a>(ops: &'a [KeyOp<'a>]) -> Vec<&'a KeyOp<'a>> {
    let incrs = ops.iter().filter(|o| matches!(o.op, RegOp::Incr(_) | RegOp::IncrUnknown)).count() as Elem;
    let mut observed: Vec<Elem> = ops
        .iter()
        .filter_map(|o| match o.op {
            RegOp::Read(Some(v)) | RegOp::Incr(v) => Some(v),
            _ => None,
        })
        .collect();
    observed.sort_unstable();
    let observable = |v: Elem| {
        let i = observed.partition_point(|&x| x < v);
        observed.get(i).is_some_and(|&x| x <= v.saturating_add(incrs))
    };
    ops.iter().filter(|o| o.done_line.is_some() || !matches!(o.op, RegOp::Write(v) if !observable(v))).collect()
}

/// Whether the key's history, cut just after line `cut`, is linearizable,
/// within `max_steps`; and the steps taken.
/// Operations not completed by the cut are unknown: their completion moves
/// past the end, an unknown GET is dropped, an unknown INCR returns anything.
fn search(ops: &[&KeyOp], cut: usize, max_steps: u64) -> (Search, u64) {
    // (position, tie-break, process, step); unknown completions sort last.
    let mut steps: Vec<(usize, usize, usize, Step<RegOp>)> = Vec::new();
    for (i, o) in ops.iter().enumerate() {
        if o.invoke_line > cut {
            continue;
        }
        let completed = o.done_line.filter(|&done| done <= cut);
        let op = match (completed, &o.op) {
            (Some(_), op) => op.clone(),
            (None, RegOp::Read(_)) => continue,
            (None, RegOp::Incr(_)) => RegOp::IncrUnknown,
            (None, op) => op.clone(),
        };
        steps.push((o.invoke_line, 0, i, Step::Call(op.clone())));
        match completed {
            Some(done) => steps.push((done, 0, i, Step::Response(op))),
            None => steps.push((usize::MAX, i, i, Step::Response(op))),
        }
    }
    if steps.is_empty() {
        return (Search::Linearizable, 0);
    }
    steps.sort_by_key(|s| (s.0, s.1));
    // Each op is its own process, so every call pairs with its own response
    // even when a process went on after an unknown outcome.
    let actions: Vec<(usize, Step<RegOp>)> = steps.into_iter().map(|(_, _, p, s)| (p, s)).collect();
    STEPS_LEFT.set(max_steps);
    let linearizable = WGLChecker::<RegisterSpec>::is_linearizable(LinHistory::from_actions(actions));
    let left = STEPS_LEFT.replace(u64::MAX);
    let verdict = match (linearizable, left == 0) {
        (true, _) => Search::Linearizable,
        (false, false) => Search::NotLinearizable,
        (false, true) => Search::GaveUp,
    };
    (verdict, max_steps - left)
}

/// Finds the first `ok` completion after which the key's history cannot be
/// linearized (prefixes of a linearizable history are linearizable, so a
/// binary search over completion lines finds it) and describes it. All the
/// searches together take at most `max_steps`.
fn explain_nonlinearizable(key: &str, ops: &[&KeyOp], max_steps: u64) -> String {
    let mut done: Vec<usize> = ops.iter().filter_map(|o| o.done_line).collect();
    done.sort_unstable();
    let (mut lo, mut hi) = (0, done.len());
    let mut budget = max_steps;
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        let (verdict, used) = search(ops, done[mid], budget);
        budget -= used;
        match verdict {
            Search::Linearizable => lo = mid + 1,
            Search::NotLinearizable => hi = mid,
            Search::GaveUp => {
                return format!(
                    "key {key:?}: no linearization of its {} operations exists \
                     (the first op that breaks it was not found within the search budget)",
                    ops.len()
                )
            }
        }
    }
    let Some(&line) = done.get(lo) else {
        return format!("key {key:?}: no linearization of its {} operations exists", ops.len());
    };
    let culprit = ops.iter().find(|o| o.done_line == Some(line)).expect("completion line belongs to an op");
    let what = match &culprit.op {
        RegOp::Write(v) => format!("write {v}"),
        RegOp::Read(None) => "read -> nil".to_string(),
        RegOp::Read(Some(v)) => format!("read -> {v}"),
        RegOp::Incr(v) => format!("incr -> {v}"),
        RegOp::IncrUnknown => "incr -> ?".to_string(),
    };
    let before = ops.iter().filter(|o| o.invoke_line <= line).count();
    let unknown = ops.iter().filter(|o| o.invoke_line <= line && o.done_line.is_none_or(|d| d > line)).count();
    format!(
        "key {key:?}: not linearizable once the op completed at line {line} is included (process {}: {what}, invoked at line {});\n\
         no order of the {before} ops invoked by then ({unknown} of them unknown or still running) explains every result",
        culprit.pair.invoke.process, culprit.invoke_line
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A register op as the definition of linearizability sees it.
    #[derive(Debug)]
    struct Spec {
        op: RegOp,
        invoke_line: usize,
        /// `None`: unknown, may take effect any time after invocation, or never.
        done_line: Option<usize>,
    }

    /// Linearizability by exhaustive search: some order of every `ok` op and
    /// any subset of the unknown ones, respecting real time, that the
    /// specification accepts.
    fn brute_force(ops: &[Spec]) -> bool {
        fn search(ops: &[Spec], placed: &mut [bool], state: Option<Elem>) -> bool {
            if ops.iter().zip(placed.iter()).all(|(o, &p)| p || o.done_line.is_none()) {
                return true;
            }
            for i in 0..ops.len() {
                let must_wait = ops
                    .iter()
                    .enumerate()
                    .any(|(j, o)| !placed[j] && j != i && o.done_line.is_some_and(|d| d < ops[i].invoke_line));
                if placed[i] || must_wait {
                    continue;
                }
                let (valid, next) = RegisterSpec::apply(&ops[i].op, &state);
                if valid {
                    placed[i] = true;
                    if search(ops, placed, next) {
                        return true;
                    }
                    placed[i] = false;
                }
            }
            false
        }
        search(ops, &mut vec![false; ops.len()], None)
    }

    /// A well-formed single-key history from random steps (each invokes on
    /// an idle process or completes its op with a random outcome and
    /// result; some ops never complete), and the same ops as `Spec`s.
    fn history(steps: Vec<(u64, u8, i64, u8, Option<i64>)>) -> (Vec<Op>, Vec<Spec>) {
        let mut pending: HashMap<u64, (Op, usize)> = HashMap::new();
        let mut ops = Vec::new();
        let mut spec = Vec::new();
        let unknown = |a: &Action, invoke_line| match a {
            Action::Write { value, .. } => Some(Spec { op: RegOp::Write(*value), invoke_line, done_line: None }),
            Action::Incr { .. } => Some(Spec { op: RegOp::IncrUnknown, invoke_line, done_line: None }),
            _ => None,
        };
        for (p, f, v, outcome, result) in steps {
            let line = ops.len() + 1;
            match pending.remove(&p) {
                None => {
                    let action = match f {
                        0 => Action::write("k", v),
                        1 => Action::read("k", None),
                        _ => Action::incr("k", None),
                    };
                    let op = Op::invoke(p, action);
                    pending.insert(p, (op.clone(), line));
                    ops.push(op);
                }
                Some((inv, invoke_line)) => {
                    let kind = match outcome {
                        0..=5 => Kind::Ok,
                        6 | 7 => Kind::Info,
                        _ => Kind::Fail,
                    };
                    let (action, op) = match (&inv.action, kind) {
                        (Action::Read { .. }, Kind::Ok) => (Action::read("k", result), RegOp::Read(result)),
                        (Action::Incr { .. }, Kind::Ok) => {
                            let r = result.unwrap_or(1);
                            (Action::incr("k", Some(r)), RegOp::Incr(r))
                        }
                        (Action::Write { value, .. }, Kind::Ok) => (inv.action.clone(), RegOp::Write(*value)),
                        (a, _) => (a.clone(), RegOp::IncrUnknown),
                    };
                    match kind {
                        Kind::Ok => spec.push(Spec { op, invoke_line, done_line: Some(line) }),
                        Kind::Info => spec.extend(unknown(&inv.action, invoke_line)),
                        _ => {}
                    }
                    ops.push(inv.complete(kind, action));
                }
            }
        }
        for (inv, invoke_line) in pending.values() {
            spec.extend(unknown(&inv.action, *invoke_line));
        }
        (ops, spec)
    }

    fn arb_history() -> impl Strategy<Value = (Vec<Op>, Vec<Spec>)> {
        proptest::collection::vec((0u64..3, 0u8..3, 0i64..3, 0u8..10, proptest::option::of(0i64..4)), 1..18)
            .prop_map(history)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        /// The whole register check (pairing, outcomes, the encoding for
        /// the WGL search, pruning, the culprit search) agrees with the
        /// definition.
        #[test]
        fn register_check_agrees_with_brute_force((ops, spec) in arb_history()) {
            let expected = brute_force(&spec);
            let report = check_registers(&ops);
            prop_assert_eq!(report.verdict == Verdict::Valid, expected, "{}", report);
            if !expected {
                let why = &report.anomalies["nonlinearizable-key"].examples[0];
                prop_assert!(why.contains("once the op completed at line"), "{}", why);
            }
        }
    }

    #[test]
    fn unknown_write_observed_through_incr_is_kept() {
        let w1 = Op::invoke(1, Action::write("k", 1));
        let w5 = Op::invoke(2, Action::write("k", 5));
        let inc = Op::invoke(3, Action::incr("k", None));
        let ops = vec![
            w1.clone(),
            w1.complete(Kind::Ok, Action::write("k", 1)),
            w5.clone(),
            w5.complete(Kind::Info, Action::write("k", 5)),
            inc.clone(),
            inc.complete(Kind::Ok, Action::incr("k", Some(6))),
        ];
        assert_eq!(check_registers(&ops).verdict, Verdict::Valid);
        let without_w5: Vec<Op> = ops.iter().filter(|o| o.action != Action::write("k", 5)).cloned().collect();
        assert_eq!(check_registers(&without_w5).verdict, Verdict::Invalid);
    }

    #[test]
    fn incr_of_nil_is_one_and_overflow_is_not_applied() {
        let (ok, s) = RegisterSpec::apply(&RegOp::Incr(1), &None);
        assert!(ok && s == Some(1));
        assert!(!RegisterSpec::apply(&RegOp::Incr(0), &None).0);
        assert_eq!(RegisterSpec::apply(&RegOp::IncrUnknown, &Some(5)), (true, Some(6)));
        assert_eq!(RegisterSpec::apply(&RegOp::IncrUnknown, &None), (true, Some(1)));
        assert_eq!(RegisterSpec::apply(&RegOp::IncrUnknown, &Some(Elem::MAX)), (true, Some(Elem::MAX)));
        assert!(!RegisterSpec::apply(&RegOp::Incr(Elem::MIN), &Some(Elem::MAX)).0);
    }
}
