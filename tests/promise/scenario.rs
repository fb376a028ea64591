//! The scenario generator: everything a run does, drawn from one seed.
//!
//! A scenario is a pure function of its seed (and of whether panics are
//! switched on): the brokers, topics, failure chain, every record and its
//! fate, the production waves and the timeline of members, faults,
//! shutdowns and crashes. How the run then interleaves is up to the
//! machine; the checker judges whatever interleaving happened.

use std::fmt;
use std::ops::Range;

use kafka_batch::settings::FailurePolicy::{self, *};
use kafka_batch::settings::HandlingOrder;
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};

use super::rng::Rng;

/// What the handler does with a good record, by how often it was seen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fate {
    Ok,
    /// Fails on its first `k` attempts (as counted by the checker), then Ok.
    FailFirst(u32),
    /// Fails every time: only where the chain ends in skip or dead_letter.
    AlwaysFail,
    /// Panics on its first attempt, then Ok (Ok throughout when panics are off).
    PanicFirst,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Good(Fate),
    /// A value that is not JSON.
    NotJson,
    /// JSON without `item`.
    NoItem,
    /// A good envelope with a null key.
    NullKey,
    /// A null value: always skipped, never handed to the handler.
    Tombstone,
}

#[derive(Clone, Copy, Debug)]
pub struct Rec {
    pub topic: usize,
    pub partition: i32,
    pub kind: Kind,
}

#[derive(Clone, Debug)]
pub enum Event {
    JoinSecond,
    LeaveSecond,
    Errors(RDKafkaApiKey, Vec<RDKafkaRespErr>),
    /// Broker `id` down for `ms` milliseconds.
    BrokerDown(i32, u64),
    Shutdown,
    Crash,
    /// The primary seeks one of its partitions back to this many records
    /// before its committed offset (`ConsumerHandle::seek`).
    SeekBack(i64),
}

/// A backoff as the settings take it.
#[derive(Clone, Copy, Debug)]
pub struct Retries {
    pub retries: u32,
    pub backoff_ms: u64,
    pub multiplier: f64,
    pub jitter: f64,
}

#[derive(Clone, Debug)]
pub struct Scenario {
    pub seed: u64,
    pub panics: bool,
    pub brokers: i32,
    /// Source topics and their partition counts.
    pub topics: Vec<(String, i32)>,
    pub retry_partitions: i32,
    pub chain: Vec<FailurePolicy>,
    pub retry: Retries,
    pub retry_topic: Retries,
    pub batch_size: usize,
    pub batch_timeout_ms: u64,
    pub cooperative: bool,
    /// The source topics start from a commit at 0 made before the group
    /// first runs, with the library's default `auto.offset.reset` (latest)
    /// left alone; otherwise `auto.offset.reset=earliest` for every topic.
    pub precommit_start: bool,
    /// The shape that finds back-to-back not-due retry records.
    pub storm: bool,
    pub records: Vec<Rec>,
    /// Production waves: (milliseconds after the start, record indexes);
    /// the first is produced before any consumer starts.
    pub waves: Vec<(u64, Range<usize>)>,
    pub events: Vec<(u64, Event)>,
    /// Handler call numbers (counted over the whole scenario, from 1) that
    /// return a whole-batch error instead of the records' fates.
    pub whole_batch_calls: Vec<u64>,
    /// Every n-th call sleeps this many milliseconds.
    pub slow: Option<(u64, u64)>,
    /// For chains ending in fail: one undecodable record produced once all
    /// else is settled; `process` must return a Decode error naming it.
    pub tail_garbage: bool,
    /// `consumer.concurrency`, `consumer.ordering` and, when drawn,
    /// `consumer.max_in_flight_records` (else the default).
    pub concurrency: usize,
    pub ordering: HandlingOrder,
    pub max_in_flight: Option<usize>,
    /// `consumer.clients`: group members in one instance.
    pub clients: usize,
    /// `consumer.commit_interval_ms`: 0 commits at once, whenever a
    /// watermark moves; otherwise librdkafka commits what was stored.
    pub commit_interval_ms: u64,
    /// Consumed through `Consumer::stream`, each batch settled by a task of
    /// its own, instead of `process` (never with panics: a panicking task
    /// drops its batch, which the stream fails through the chain, where
    /// `process` stops).
    pub stream: bool,
}

const ERRORS: &[RDKafkaRespErr] = &[
    RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_LEADER_FOR_PARTITION,
    RDKafkaRespErr::RD_KAFKA_RESP_ERR_REQUEST_TIMED_OUT,
    RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_COORDINATOR,
    RDKafkaRespErr::RD_KAFKA_RESP_ERR_REBALANCE_IN_PROGRESS,
];
const APIS: &[RDKafkaApiKey] = &[
    RDKafkaApiKey::Fetch,
    RDKafkaApiKey::OffsetCommit,
    RDKafkaApiKey::Heartbeat,
    RDKafkaApiKey::Produce,
];

/// Every chain the settings accept, in a fixed order.
const CHAINS: &[&[FailurePolicy]] = &[
    &[Fail],
    &[Retry],
    &[Retry, Fail],
    &[Skip],
    &[Retry, Skip],
    &[DeadLetter],
    &[Retry, DeadLetter],
    &[RetryTopic],
    &[RetryTopic, Fail],
    &[RetryTopic, Skip],
    &[RetryTopic, DeadLetter],
    &[Retry, RetryTopic],
    &[Retry, RetryTopic, Skip],
    &[Retry, RetryTopic, DeadLetter],
];

impl Scenario {
    pub fn generate(seed: u64, panics: bool) -> Scenario {
        let mut r = Rng::derived(seed, 1);
        let storm = r.chance(0.25);
        let brokers = r.between(1, 3) as i32;
        let chain: Vec<FailurePolicy> = if storm {
            r.pick(&[&[RetryTopic, DeadLetter][..], &[RetryTopic, Skip][..]])
                .to_vec()
        } else {
            r.pick(CHAINS).to_vec()
        };
        let mut topics = vec![(format!("src{seed}a"), r.between(1, 4) as i32)];
        if !storm && r.chance(0.2) {
            topics.push((format!("src{seed}b"), r.between(1, 3) as i32));
        }
        if storm {
            topics[0].1 = 4;
        }
        let retry = Retries {
            retries: r.between(1, 3) as u32,
            backoff_ms: r.between(10, 80),
            multiplier: r.pick(&[1.0, 2.0]),
            jitter: r.pick(&[0.0, 0.2]),
        };
        let retry_topic = if storm {
            Retries {
                retries: r.between(1, 2) as u32,
                backoff_ms: r.between(1500, 2500),
                multiplier: 1.0,
                jitter: 0.0,
            }
        } else {
            Retries {
                retries: r.between(1, 3) as u32,
                backoff_ms: r.between(50, 400),
                multiplier: r.pick(&[1.0, 2.0]),
                jitter: r.pick(&[0.0, 0.1]),
            }
        };
        let ends = *chain.last().expect("a chain is never empty");
        let absorbs = matches!(ends, Skip | DeadLetter);
        let has_rt = chain.contains(&RetryTopic);
        let mut sc = Scenario {
            seed,
            panics,
            brokers,
            topics,
            retry_partitions: if storm { 1 } else { r.between(1, 2) as i32 },
            chain,
            retry,
            retry_topic,
            batch_size: if storm {
                r.between(100, 200) as usize
            } else {
                r.between(10, 200) as usize
            },
            batch_timeout_ms: r.between(20, 200),
            cooperative: r.chance(0.3),
            // Not in a storm: a storm's losses should have one cause only
            // (the back-to-back seeks), not also the retry topic's reset.
            precommit_start: r.chance(if has_rt { 0.5 } else { 0.2 }) && !storm,
            storm,
            records: Vec::new(),
            waves: Vec::new(),
            events: Vec::new(),
            whole_batch_calls: Vec::new(),
            slow: None,
            tail_garbage: !absorbs && r.chance(0.4),
            concurrency: 1,
            ordering: HandlingOrder::Partition,
            max_in_flight: None,
            clients: 1,
            commit_interval_ms: 1000,
            stream: false,
        };

        // Records and their fates.
        let mut r = Rng::derived(seed, 2);
        let total = if storm {
            r.between(1500, 2000)
        } else {
            r.between(200, 2000)
        } as usize;
        let fail_rate = if storm {
            0.0
        } else {
            r.between(2, 10) as f64 / 100.0
        };
        let storm_every = r.between(15, 50) as usize;
        // A chain ending in fail restarts the consumer for every record that
        // uses its budget up: a few such records, not a hundred.
        let mut fail_budget = if absorbs {
            usize::MAX
        } else {
            r.between(0, 4) as usize
        };
        let garbage_rate = if absorbs {
            r.between(0, 3) as f64 / 100.0
        } else {
            0.0
        };
        let tombstone_rate = r.between(0, 3) as f64 / 100.0;
        // A panic stops the instance (a restart, some seconds): a few at most.
        let mut panics = if r.chance(0.3) { r.between(1, 2) } else { 0 };
        for i in 0..total {
            let topic = r.below(sc.topics.len() as u64) as usize;
            let partition = r.below(sc.topics[topic].1 as u64) as i32;
            let kind = if r.chance(tombstone_rate) {
                Kind::Tombstone
            } else if r.chance(garbage_rate) {
                r.pick(&[Kind::NotJson, Kind::NoItem, Kind::NullKey])
            } else if storm {
                Kind::Good(if i % storm_every == storm_every - 1 {
                    Fate::FailFirst(1)
                } else {
                    Fate::Ok
                })
            } else if panics > 0 && r.chance(0.005) {
                panics -= 1;
                Kind::Good(Fate::PanicFirst)
            } else if fail_budget > 0 && r.chance(fail_rate) {
                fail_budget = fail_budget.saturating_sub(1);
                if absorbs && r.chance(0.3) {
                    Kind::Good(Fate::AlwaysFail)
                } else {
                    Kind::Good(Fate::FailFirst(r.between(1, 3) as u32))
                }
            } else {
                Kind::Good(Fate::Ok)
            };
            sc.records.push(Rec {
                topic,
                partition,
                kind,
            });
        }

        // Production waves: a first part before the consumer starts, the
        // rest while it runs.
        let mut r = Rng::derived(seed, 3);
        let first = if storm {
            total * 9 / 10
        } else {
            total * r.between(0, 80) as usize / 100
        };
        sc.waves.push((0, 0..first));
        let more = r.between(1, 4) as usize;
        let mut at = 0;
        let mut start = first;
        for w in 0..more {
            at += r.between(200, 1500);
            let end = if w + 1 == more {
                total
            } else {
                start + (total - start) / (more - w)
            };
            sc.waves.push((at, start..end));
            start = end;
        }

        // The timeline.
        let mut r = Rng::derived(seed, 4);
        let span = r.between(1000, 6000);
        if r.chance(0.4) {
            let join = r.below(span);
            sc.events.push((join, Event::JoinSecond));
            if r.chance(0.7) {
                sc.events
                    .push((join + r.between(500, 3000), Event::LeaveSecond));
            }
        }
        if r.chance(0.5) {
            for _ in 0..r.between(1, 3) {
                let errors = (0..r.between(1, 3)).map(|_| r.pick(ERRORS)).collect();
                sc.events
                    .push((r.below(span), Event::Errors(r.pick(APIS), errors)));
            }
        }
        if brokers >= 2 && r.chance(0.3) {
            let id = r.between(1, brokers as u64) as i32;
            sc.events
                .push((r.below(span), Event::BrokerDown(id, r.between(300, 1500))));
        }
        if r.chance(0.35) {
            sc.events.push((r.below(span), Event::Shutdown));
        }
        if r.chance(0.3) {
            sc.events.push((r.below(span), Event::Crash));
        }
        sc.events.sort_by_key(|(at, _)| *at);

        let mut r = Rng::derived(seed, 5);
        if r.chance(0.25) {
            let n = if absorbs { r.between(1, 3) } else { 1 };
            sc.whole_batch_calls = (0..n).map(|_| r.between(2, 40)).collect();
            sc.whole_batch_calls.sort_unstable();
            sc.whole_batch_calls.dedup();
        }
        if r.chance(0.3) {
            sc.slow = Some((r.between(3, 10), r.between(20, 80)));
        }

        // Lanes: drawn from a stream of their own, so that the draws above
        // (and the scenarios of seeds found before lanes) stay the same.
        let mut r = Rng::derived(seed, 6);
        sc.concurrency = r.pick(&[1, 1, 2, 4, 8, 16]);
        if sc.concurrency > 1 {
            sc.ordering = r.pick(&[
                HandlingOrder::Partition,
                HandlingOrder::Partition,
                HandlingOrder::Key,
                HandlingOrder::Key,
                HandlingOrder::Unordered,
            ]);
        }
        if r.chance(0.4) {
            sc.max_in_flight = Some(sc.batch_size * r.between(1, 3) as usize);
        }
        sc.clients = r.pick(&[1, 1, 1, 2, 3]);

        // Commits: their own stream too, for the same reason.
        let mut r = Rng::derived(seed, 7);
        sc.commit_interval_ms = r.pick(&[0, 0, 50, 300, 1000, 1000]);

        // The stream: its own stream of draws as well.
        let mut r = Rng::derived(seed, 8);
        let panics = sc
            .records
            .iter()
            .any(|rec| sc.panics && rec.kind == Kind::Good(Fate::PanicFirst));
        sc.stream = !panics && r.chance(0.35);

        // Seeks back, in either mode: a stream of their own too.
        let mut r = Rng::derived(seed, 9);
        if r.chance(0.3) {
            for _ in 0..r.between(1, 3) {
                let at = r.below(6000);
                sc.events.push((at, Event::SeekBack(r.pick(&[0, 5, 50]))));
            }
            sc.events.sort_by_key(|(at, _)| *at);
        }
        sc
    }

    /// The last step: what a record that used every retry meets.
    pub fn ends_with(&self) -> FailurePolicy {
        match self.chain.last() {
            Some(p) if p.is_terminal() => *p,
            _ => Fail,
        }
    }

    pub fn has(&self, policy: FailurePolicy) -> bool {
        self.chain.contains(&policy)
    }

    /// Deliveries in place a record gets before it leaves its partition.
    pub fn in_place_budget(&self) -> u32 {
        1 + if self.has(Retry) {
            self.retry.retries
        } else {
            0
        }
    }

    /// Handler deliveries a record gets before the chain's last step (as
    /// src/consumer/policy.rs counts them).
    pub fn budget(&self) -> u32 {
        self.in_place_budget()
            + if self.has(RetryTopic) {
                self.retry_topic.retries
            } else {
                0
            }
    }

    pub fn retry_topic_name(&self) -> String {
        format!("src{}.retry", self.seed)
    }

    pub fn dead_topic_name(&self) -> String {
        format!("src{}.dead", self.seed)
    }

    pub fn group(&self) -> String {
        format!("promise-{}", self.seed)
    }

    pub fn id(&self, index: usize) -> String {
        format!("s{}-{index}", self.seed)
    }

    /// The record index an id names, if it is one of this scenario's.
    pub fn index_of(&self, id: &str) -> Option<usize> {
        let rest = id.strip_prefix(&format!("s{}-", self.seed))?;
        rest.parse().ok().filter(|i| *i < self.records.len())
    }

    pub fn fate_of(&self, id: &str) -> Option<Fate> {
        match self.records.get(self.index_of(id)?)?.kind {
            Kind::Good(Fate::PanicFirst) if !self.panics => Some(Fate::Ok),
            Kind::Good(fate) => Some(fate),
            _ => None,
        }
    }

    /// True when the timeline has nothing that may make a record be seen again.
    pub fn calm(&self) -> bool {
        self.events.is_empty()
    }
}

impl fmt::Display for Scenario {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let chain: Vec<&str> = self.chain.iter().map(|p| p.name()).collect();
        writeln!(
            f,
            "scenario seed {}{}{}: {} broker(s), topics {:?}, chain {:?}, group {}",
            self.seed,
            if self.storm { " (retry storm)" } else { "" },
            if self.panics { "" } else { " (panics off)" },
            self.brokers,
            self.topics,
            chain,
            self.group()
        )?;
        writeln!(
            f,
            "  retry {:?}; retry_topic {:?} on {} partition(s); budget {} ({} in place)",
            self.retry,
            self.retry_topic,
            self.retry_partitions,
            self.budget(),
            self.in_place_budget()
        )?;
        writeln!(
            f,
            "  batch_size {}, batch_timeout_ms {}, cooperative {}, start {}, whole-batch errors at calls {:?}, slow {:?}, tail garbage {}",
            self.batch_size,
            self.batch_timeout_ms,
            self.cooperative,
            if self.precommit_start { "from a commit at 0 (reset latest)" } else { "reset earliest" },
            self.whole_batch_calls,
            self.slow,
            self.tail_garbage
        )?;
        let waves: Vec<String> = self
            .waves
            .iter()
            .map(|(at, r)| format!("{}..{} at {at}ms", r.start, r.end))
            .collect();
        writeln!(
            f,
            "  {}, clients {}, concurrency {}, ordering {:?}, max_in_flight_records {}, commit_interval_ms {}",
            if self.stream { "Consumer::stream" } else { "Consumer::process" },
            self.clients,
            self.concurrency,
            self.ordering,
            self.max_in_flight
                .map_or("default".to_string(), |n| n.to_string()),
            self.commit_interval_ms
        )?;
        writeln!(
            f,
            "  {} records in waves {}",
            self.records.len(),
            waves.join(", ")
        )?;
        let events: Vec<String> = self
            .events
            .iter()
            .map(|(at, e)| format!("{at}ms {e:?}"))
            .collect();
        writeln!(f, "  events: {}", events.join(", "))?;
        let special: Vec<String> = self
            .records
            .iter()
            .enumerate()
            .filter(|(_, r)| r.kind != Kind::Good(Fate::Ok))
            .map(|(i, r)| {
                format!(
                    "{} {}:{} {:?}",
                    self.id(i),
                    self.topics[r.topic].0,
                    r.partition,
                    r.kind
                )
            })
            .collect();
        write!(f, "  records not plainly Ok: {}", special.join(", "))
    }
}
