//! The assertions: the promise judged from outside, from the recorder's
//! calls, the watcher's commits and the topics as they are at the end.
//!
//! Every check here can fail: each compares what the library did with what
//! the scenario and the recorded calls say it may do.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Instant;

use kafka_batch::replay::DeadLetter;
use kafka_batch::settings::FailurePolicy::{DeadLetter as Dead, Fail, Retry, RetryTopic, Skip};
use kafka_batch::settings::HandlingOrder;

use super::drive::Run;
use super::recorder::{Call, Log, Outcome};
use super::scenario::{Kind, Scenario};

#[derive(Debug)]
pub struct Violation {
    pub property: &'static str,
    pub detail: String,
}

/// The records a scenario lost: committed past while not dealt with, or
/// never dealt with by the end (each counted once).
pub fn lost(violations: &[Violation]) -> usize {
    violations
        .iter()
        .filter(|v| v.property == LOST)
        .map(|v| &v.detail)
        .collect::<BTreeSet<_>>()
        .len()
}

/// The property name of the one-line-per-record loss entries.
const LOST: &str = "lost record";

/// When a record was dealt with: `Always` (by something the log shows,
/// such as its copy in the retry or dead-letter topic), or from an instant.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Dealt {
    Never,
    Always,
    At(Instant),
}

impl Dealt {
    fn or(self, other: Dealt) -> Dealt {
        match (self, other) {
            (Dealt::Always, _) | (_, Dealt::Always) => Dealt::Always,
            (Dealt::At(a), Dealt::At(b)) => Dealt::At(a.min(b)),
            (Dealt::Never, x) | (x, Dealt::Never) => x,
        }
    }

    fn by(self, t: Instant) -> bool {
        match self {
            Dealt::Never => false,
            Dealt::Always => true,
            Dealt::At(at) => at <= t,
        }
    }
}

/// What a source record is, read from the log at the end.
#[derive(Clone, Debug, PartialEq)]
enum Is {
    Tombstone,
    Good(String),
    Garbage,
}

type Coord = (String, i32, i64);

struct Index<'r> {
    by_origin: BTreeMap<Coord, Vec<&'r Call>>,
    by_id: BTreeMap<&'r str, Vec<&'r Call>>,
    dead_by_source: BTreeMap<Coord, Vec<&'r DeadLetter>>,
    /// (source, retries) -> retry records at (partition, offset).
    retries: BTreeMap<(Coord, u32), Vec<(i32, i64)>>,
}

fn source_of(d: &DeadLetter) -> Option<Coord> {
    d.info.source().map(|(t, p, o)| (t.to_owned(), p, o))
}

fn classify(sc: &Scenario, r: &DeadLetter) -> Is {
    if r.value.as_deref().is_none_or(<[u8]>::is_empty) {
        return Is::Tombstone;
    }
    let key = r.key.as_deref().and_then(|k| std::str::from_utf8(k).ok());
    match key.and_then(|k| sc.index_of(k).map(|i| (k, i))) {
        Some((k, i)) if matches!(sc.records[i].kind, Kind::Good(_)) => Is::Good(k.to_owned()),
        _ => Is::Garbage,
    }
}

fn describe(calls: Option<&Vec<&Call>>) -> String {
    let Some(calls) = calls else {
        return "never handed to the handler".into();
    };
    let parts: Vec<String> = calls
        .iter()
        .map(|c| {
            format!(
                "call {} instance {} attempt {} {:?}{}",
                c.call,
                c.instance,
                c.attempt,
                c.outcome,
                if c.returned.is_some() {
                    ""
                } else {
                    " (never returned)"
                }
            )
        })
        .collect();
    parts.join("; ")
}

/// The n-th returned failed call (from 1) of `calls`, if there were n.
fn nth_failed(calls: Option<&Vec<&Call>>, n: u32) -> Dealt {
    calls
        .and_then(|cs| {
            cs.iter()
                .filter(|c| c.outcome.failed())
                .filter_map(|c| c.returned)
                .nth(n.saturating_sub(1) as usize)
        })
        .map_or(Dealt::Never, Dealt::At)
}

fn first_ok(calls: Option<&Vec<&Call>>) -> Dealt {
    calls
        .and_then(|cs| {
            cs.iter()
                .filter(|c| c.outcome == Outcome::Ok)
                .filter_map(|c| c.returned)
                .min()
        })
        .map_or(Dealt::Never, Dealt::At)
}

pub fn check(sc: &Scenario, run: &Run) -> Vec<Violation> {
    let log = run.recorder.lock();
    let mut out = Vec::new();
    let mut v = |property: &'static str, detail: String| out.push(Violation { property, detail });
    let retry_topic = sc.retry_topic_name();

    let mut ix = Index {
        by_origin: BTreeMap::new(),
        by_id: BTreeMap::new(),
        dead_by_source: BTreeMap::new(),
        retries: BTreeMap::new(),
    };
    for c in &log.calls {
        ix.by_origin
            .entry((c.topic.clone(), c.partition, c.offset))
            .or_default()
            .push(c);
        ix.by_id.entry(c.id.as_str()).or_default().push(c);
    }
    for d in &run.dead {
        match source_of(d) {
            Some(src) => ix.dead_by_source.entry(src).or_default().push(d),
            None => v(
                "3 attempts",
                format!(
                    "dead letter {}:{} has no source headers",
                    d.partition, d.offset
                ),
            ),
        }
    }
    for ((t, q), records) in &run.logs {
        if *t != retry_topic {
            continue;
        }
        for r in records {
            match source_of(r) {
                Some(src) => ix
                    .retries
                    .entry((src, r.info.retries))
                    .or_default()
                    .push((*q, r.offset)),
                None => v(
                    "1 no gap",
                    format!("retry record {t}:{q}:{} has no source headers", r.offset),
                ),
            }
        }
    }

    // When each record of each watched partition was dealt with.
    let mut dealt: BTreeMap<(String, i32), Vec<Dealt>> = BTreeMap::new();
    let mut what: BTreeMap<Coord, String> = BTreeMap::new();
    for ((t, p), records) in &run.logs {
        let mut times = Vec::with_capacity(records.len());
        for (expected, r) in records.iter().enumerate() {
            if r.offset != expected as i64 {
                v(
                    "2 settled",
                    format!(
                        "{t}:{p} holds offset {} where {expected} was expected",
                        r.offset
                    ),
                );
            }
            let here: Coord = (t.clone(), *p, r.offset);
            let calls = ix.by_origin.get(&here);
            let d = if *t == retry_topic {
                what.insert(
                    here.clone(),
                    format!(
                        "retry record {:?} retries {} attempts {}",
                        r.info.source(),
                        r.info.retries,
                        r.info.attempts
                    ),
                );
                let Some(src) = source_of(r) else {
                    times.push(Dealt::Never);
                    continue;
                };
                let n = r.info.retries;
                let successor = ix
                    .retries
                    .get(&(src.clone(), n + 1))
                    .is_some_and(|at| at.iter().any(|(q, o)| *q != *p || *o > r.offset));
                let mut d = first_ok(calls);
                if successor || ix.dead_by_source.contains_key(&src) {
                    d = d.or(Dealt::Always);
                }
                if sc.ends_with() == Skip && n >= sc.retry_topic.retries {
                    d = d.or(nth_failed(calls, 1));
                }
                d
            } else {
                let is = classify(sc, r);
                what.insert(here.clone(), format!("{is:?}"));
                match is {
                    Is::Tombstone => Dealt::Always,
                    Is::Garbage => match sc.ends_with() {
                        Skip => Dealt::Always,
                        Dead if ix.dead_by_source.contains_key(&here) => Dealt::Always,
                        _ => Dealt::Never,
                    },
                    Is::Good(_) => {
                        let mut d = first_ok(calls);
                        if ix.retries.contains_key(&(here.clone(), 1))
                            || ix.dead_by_source.contains_key(&here)
                        {
                            d = d.or(Dealt::Always);
                        }
                        if sc.ends_with() == Skip && !sc.has(RetryTopic) {
                            d = d.or(nth_failed(calls, sc.in_place_budget()));
                        }
                        d
                    }
                }
            };
            times.push(d);
        }
        dealt.insert((t.clone(), *p), times);
    }

    // 1. No committed offset ever past an undealt record.
    let mut lost_records: BTreeSet<Coord> = BTreeSet::new();
    let mut reported: BTreeSet<(String, i32)> = BTreeSet::new();
    for (seen, t, p, c) in &log.commits {
        let key = (t.clone(), *p);
        if reported.contains(&key) {
            continue;
        }
        let times = dealt.get(&key).map_or(&[][..], Vec::as_slice);
        if *c as usize > times.len() {
            v(
                "1 no gap",
                format!("{t}:{p} committed {c}, past its log end {}", times.len()),
            );
            reported.insert(key);
            continue;
        }
        let undealt: Vec<usize> = (0..*c as usize).filter(|o| !times[*o].by(*seen)).collect();
        for o in &undealt {
            lost_records.insert((t.clone(), *p, *o as i64));
        }
        if !undealt.is_empty() {
            let first: Vec<String> = undealt
                .iter()
                .take(5)
                .map(|o| {
                    let here = (t.clone(), *p, *o as i64);
                    format!(
                        "{t}:{p}:{o} ({}; {}; dealt {:?})",
                        what.get(&here).map_or("?", String::as_str),
                        describe(ix.by_origin.get(&here)),
                        times[*o]
                    )
                })
                .collect();
            v(
                "1 no gap",
                format!(
                    "commit {t}:{p}={c} seen at {:?} into the run is past {} record(s) not dealt with by then, first: {}",
                    seen.duration_since(run.started),
                    undealt.len(),
                    first.join(" | ")
                ),
            );
            reported.insert(key);
        }
    }

    // 2. At the end every record settled, every commit at its log end.
    if let Some(why) = &run.unsettled {
        v("2 settled", format!("the run did not settle: {why}"));
    }
    let mut last: BTreeMap<(String, i32), i64> = BTreeMap::new();
    for (_, t, p, c) in &log.commits {
        last.insert((t.clone(), *p), *c);
    }
    for ((t, p), times) in &dealt {
        let end = times.len() as i64;
        let tail_at = run
            .tail
            .as_ref()
            .filter(|((tt, tp, _), _, _)| tt == t && tp == p)
            .map(|((_, _, o), _, _)| *o);
        let want = tail_at.unwrap_or(end);
        let got = last.get(&(t.clone(), *p)).copied().unwrap_or(0);
        if got != want {
            v(
                "2 settled",
                format!("{t}:{p} ends committed at {got}, expected {want} (log end {end})"),
            );
        }
        let never: Vec<usize> = (0..times.len())
            .filter(|o| times[*o] == Dealt::Never && Some(*o as i64) != tail_at)
            .collect();
        for o in &never {
            lost_records.insert((t.clone(), *p, *o as i64));
        }
        if !never.is_empty() {
            let first: Vec<String> = never
                .iter()
                .take(5)
                .map(|o| {
                    let here = (t.clone(), *p, *o as i64);
                    format!(
                        "{t}:{p}:{o} ({}; {})",
                        what.get(&here).map_or("?", String::as_str),
                        describe(ix.by_origin.get(&here))
                    )
                })
                .collect();
            v(
                "2 settled",
                format!(
                    "{} record(s) of {t}:{p} were never dealt with, first: {}",
                    never.len(),
                    first.join(" | ")
                ),
            );
        }
    }
    let in_logs: BTreeSet<String> = run
        .logs
        .iter()
        .filter(|((t, _), _)| *t != retry_topic)
        .flat_map(|(_, rs)| rs.iter())
        .filter_map(|r| {
            r.key
                .as_deref()
                .and_then(|k| std::str::from_utf8(k).ok())
                .map(str::to_owned)
        })
        .collect();
    for (i, rec) in sc.records.iter().enumerate() {
        if matches!(rec.kind, Kind::Good(_)) && !in_logs.contains(&sc.id(i)) {
            v(
                "2 settled",
                format!(
                    "{} was produced but is not in its topic (the test producer lost it)",
                    sc.id(i)
                ),
            );
        }
    }

    for (t, p, o) in &lost_records {
        v(LOST, format!("{t}:{p}:{o}"));
    }
    check_attempts(sc, run, &log, &ix, &mut v);
    match sc.ordering {
        HandlingOrder::Partition => check_order(&log, false, &mut v),
        HandlingOrder::Key => check_order(&log, true, &mut v),
        _ => {}
    }
    check_exits(sc, run, &log, &mut v);
    for note in &log.notes {
        v("5 contract", note.clone());
    }
    out
}

fn failed_calls(ix: &Index<'_>, id: &str) -> u32 {
    ix.by_id.get(id).map_or(0, |cs| {
        cs.iter()
            .filter(|c| c.outcome.failed() && c.returned.is_some())
            .count() as u32
    })
}

/// 3. Attempts match the chain.
fn check_attempts(
    sc: &Scenario,
    run: &Run,
    log: &Log,
    ix: &Index<'_>,
    v: &mut impl FnMut(&'static str, String),
) {
    let budget = sc.budget();
    for d in &run.dead {
        let Some(src) = source_of(d) else { continue };
        let original = run
            .logs
            .get(&(src.0.clone(), src.1))
            .and_then(|rs| rs.get(src.2 as usize));
        let is = original.map(|r| classify(sc, r));
        match is {
            Some(Is::Good(id)) => {
                if d.info.attempts != budget {
                    v("3 attempts", format!("{id} dead-lettered with attempts {} but the chain's budget is {budget}", d.info.attempts));
                }
                let failed = failed_calls(ix, &id);
                if failed < budget {
                    v("3 attempts", format!("{id} dead-lettered after {failed} failed handler call(s), budget {budget}: {}", describe(ix.by_id.get(id.as_str()))));
                }
            }
            Some(Is::Garbage) => {
                if d.info.attempts != 0 || d.info.reason.as_deref() == Some("handler") {
                    v(
                        "3 attempts",
                        format!(
                            "undecodable {src:?} dead-lettered with attempts {} reason {:?}",
                            d.info.attempts, d.info.reason
                        ),
                    );
                }
            }
            _ => v(
                "3 attempts",
                format!("dead letter names {src:?}, which is no good or undecodable record"),
            ),
        }
    }
    for ((t, q), records) in &run.logs {
        if *t != sc.retry_topic_name() {
            continue;
        }
        for r in records {
            let key = r
                .key
                .as_deref()
                .and_then(|k| std::str::from_utf8(k).ok())
                .unwrap_or("");
            let n = r.info.retries;
            let want = sc.in_place_budget() + n.saturating_sub(1);
            if n == 0 || n > sc.retry_topic.retries || r.info.attempts != want {
                v("3 attempts", format!("retry record {t}:{q}:{} ({key}) has retries {n} attempts {}, expected retries 1..={} and attempts {want}", r.offset, r.info.attempts, sc.retry_topic.retries));
            }
            let failed = failed_calls(ix, key);
            if failed < r.info.attempts {
                v("3 attempts", format!("retry record {t}:{q}:{} ({key}) counts {} attempts but only {failed} handler call(s) failed: {}", r.offset, r.info.attempts, describe(ix.by_id.get(key))));
            }
        }
    }
    // Without anything that re-reads, each record is handed exactly as its
    // fate and the chain say: failures until the first Ok, then never again.
    // (Unordered, a retry in place re-reads its partition, and batches of
    // it that ran meanwhile are handed again: allowed duplicates.)
    // Several clients in one instance are several members: their joins
    // are rebalances, and a rebalance may re-read what was not committed.
    let rereads = (sc.ordering == HandlingOrder::Unordered && sc.has(Retry)) || sc.clients > 1;
    if sc.calm() && !rereads && !log.disturbed && log.exits.iter().all(|e| e.asked == "shutdown") {
        for (id, calls) in &ix.by_id {
            let failed = calls.iter().filter(|c| c.outcome.failed()).count() as u32;
            let ok_at = calls.iter().position(|c| c.outcome == Outcome::Ok);
            let exact = match ok_at {
                Some(i) => i + 1 == calls.len() && failed < budget,
                None => failed == budget && matches!(sc.ends_with(), Skip | Dead),
            };
            if !exact {
                v("3 attempts", format!("calm run: {id} was handed {} time(s), which its fate and the chain do not explain: {}", calls.len(), describe(Some(calls))));
            }
        }
    }
}

/// Order (property 4): per partition, within one instance and one
/// assignment, offsets increase except where a failed record is delivered again.
///
/// `by_key`: the lanes are a partition's keys (`ordering = "key"`), so only
/// a key's offsets must increase.
fn check_order(log: &Log, by_key: bool, v: &mut impl FnMut(&'static str, String)) {
    // (instance, topic, partition, key) -> (rebalances, highest offset,
    // last outcome per offset, seeks already allowed for)
    type State = (u64, i64, BTreeMap<i64, Outcome>, usize);
    let mut state: BTreeMap<(u32, String, i32, String), State> = BTreeMap::new();
    let mut reported = BTreeSet::new();
    let mut i = 0;
    while i < log.calls.len() {
        let call = log.calls[i].call;
        let mut j = i;
        let mut in_call: BTreeMap<(String, i32, String), i64> = BTreeMap::new();
        while j < log.calls.len() && log.calls[j].call == call {
            let c = &log.calls[j];
            let lane = if by_key { c.id.clone() } else { String::new() };
            let key = (c.instance, c.topic.clone(), c.partition, lane.clone());
            if let Some(prev) = in_call.get(&(c.topic.clone(), c.partition, lane.clone())) {
                if c.offset <= *prev && reported.insert(key.clone()) {
                    v(
                        "4 order",
                        format!(
                            "call {call}: {}:{} offset {} after {prev} in the same batch",
                            c.topic, c.partition, c.offset
                        ),
                    );
                }
            }
            in_call.insert((c.topic.clone(), c.partition, lane), c.offset);
            let st = state
                .entry(key.clone())
                .or_insert((c.rebalances, -1, BTreeMap::new(), 0));
            if st.0 != c.rebalances {
                *st = (c.rebalances, -1, BTreeMap::new(), st.3);
            }
            // A seek back of this partition, asked before this call began,
            // lets its lane go back once: the records read again from the
            // target (a batch read before the seek may still be handled
            // after it was asked, never after the records read again). The
            // allowance is spent only on a step back that needs it: a
            // failed record delivered again is fine anyway (seed 3113 spent
            // it on a retry that started as the seek was asked, and then
            // reported the seek's own re-read as a duplicate).
            let seeks = log
                .seeks
                .iter()
                .filter(|(i, t, p, at)| {
                    *i == c.instance && *t == c.topic && *p == c.partition && *at < c.started
                })
                .count();
            let failed_before = st.2.get(&c.offset).is_none_or(|o| o.failed());
            if c.offset <= st.1 && !failed_before && st.3 < seeks {
                *st = (c.rebalances, -1, BTreeMap::new(), st.3 + 1);
            }
            // Going back is fine for a record that failed here (a retry in
            // place) or was never handed here (the seek back to a retry
            // record not yet due); it is a duplicate for one handled Ok.
            let again_ok = st.2.get(&c.offset).is_none_or(|o| o.failed());
            if c.offset <= st.1 && !again_ok && reported.insert(key.clone()) {
                v("4 order", format!(
                    "instance {}: {}:{} offset {} handed at call {call} after offset {} with no rebalance between, and it had not failed (last outcome here {:?}; {})",
                    c.instance, c.topic, c.partition, c.offset, st.1, st.2.get(&c.offset),
                    handings(log, c)
                ));
            }
            st.1 = st.1.max(c.offset);
            st.2.insert(c.offset, c.outcome);
            j += 1;
        }
        i = j;
    }
}

/// Each handing of `c`'s record and each seek of its partition, in ms since
/// the run's first call: what a duplicate's report needs to be explained.
fn handings(log: &Log, c: &Call) -> String {
    let Some(t0) = log.calls.first().map(|f| f.started) else {
        return String::new();
    };
    let ms = |at: std::time::Instant| at.saturating_duration_since(t0).as_millis();
    let handed: Vec<String> = log
        .calls
        .iter()
        .filter(|d| d.topic == c.topic && d.partition == c.partition && d.offset == c.offset)
        .map(|d| {
            format!(
                "call {} instance {} {:?} at {} ms",
                d.call,
                d.instance,
                d.outcome,
                ms(d.started)
            )
        })
        .collect();
    let seeks: Vec<String> = log
        .seeks
        .iter()
        .filter(|(_, t, p, _)| *t == c.topic && *p == c.partition)
        .map(|(i, _, _, at)| format!("instance {i} at {} ms", ms(*at)))
        .collect();
    format!(
        "handed: {}; seeks asked: [{}]",
        handed.join(", "),
        seeks.join(", ")
    )
}

/// 5. `process` returns what the contract says.
fn check_exits(sc: &Scenario, run: &Run, log: &Log, v: &mut impl FnMut(&'static str, String)) {
    let exits: Vec<(u32, &'static str, Result<(), String>, &'static str)> = log
        .exits
        .iter()
        .map(|e| (e.instance, e.asked, e.result.clone(), e.variant))
        .collect();
    if let Some((coord, result, name)) = &run.tail {
        let want = format!("{}:{}:{}", coord.0, coord.1, coord.2);
        match result {
            Err(text) if *name == "Decode" && text.contains(&want) => {}
            other => v("5 contract", format!("the undecodable tail record {want} under `fail`: process returned {name} {other:?}, expected a Decode error naming it")),
        }
    }
    for (instance, asked, result, name) in exits {
        let calls: Vec<&Call> = log
            .calls
            .iter()
            .filter(|c| c.instance == instance)
            .collect();
        // The call that stopped the instance: its last one when batches run
        // one at a time; with several at once, any of them (others started
        // before the stop and finish after it).
        let last_call = calls.last().map(|c| c.call);
        let stopped_by = |c: &&&Call| sc.concurrency > 1 || Some(c.call) == last_call;
        let last: Vec<&&Call> = calls.iter().filter(stopped_by).collect();
        let panicked = last.iter().any(|c| c.outcome == Outcome::Panicked);
        let failed = last.iter().any(|c| c.outcome.failed());
        match (&result, name) {
            (_, "dropped") if asked == "crash" => {}
            (Ok(()), _) if asked == "shutdown" && !panicked => {}
            (Ok(()), _) => v("5 contract", format!("instance {instance}: process returned Ok{}", if panicked { " although its handler panicked" } else { " without a shutdown" })),
            (Err(text), "panic") => v("5 contract", format!(
                "instance {instance}: the handler's panic unwound out of process ({text}); expected process to return an error whose Display contains \"panicked\""
            )),
            (Err(text), _) if panicked => {
                // With batches at once, another batch's failure may have
                // stopped the instance first.
                let other_first = sc.concurrency > 1 && name == "Handler" && failed;
                if !text.contains("panicked") && !other_first {
                    v("5 contract", format!("instance {instance}: after a handler panic process returned {name} {text:?}, which does not say \"panicked\""));
                }
            }
            (Err(text), "Handler") => {
                // Some failed call's records are all named by the error.
                let mut by_call: BTreeMap<u64, Vec<&&&Call>> = BTreeMap::new();
                for c in &last {
                    by_call.entry(c.call).or_default().push(c);
                }
                let named = by_call.values().any(|cs| {
                    cs.iter().any(|c| c.outcome.failed())
                        && cs.iter().all(|c| text.contains(&format!("{}[", c.topic)) && text.contains(&format!("{}=", c.partition)))
                });
                if !(failed && sc.ends_with() == Fail) {
                    v("5 contract", format!("instance {instance}: process returned a handler error although the chain {:?} {} it: {text}", sc.chain, if failed { "absorbs" } else { "saw no failure to stop on" }));
                } else if !named {
                    v("5 contract", format!("instance {instance}: the handler error does not name the failed batch: {text}"));
                }
            }
            (Err(_), "Commit" | "FailureTopic" | "Kafka") if log.faults > 0 => {}
            (Err(text), _) => v("5 contract", format!("instance {instance}: process returned {name}: {text}")),
        }
    }
}
