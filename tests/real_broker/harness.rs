//! What the real-broker tests share: the broker's address, topics and
//! records, group member processes (`examples/group_member.rs`), and the
//! checker that compares what the members wrote down with what the group
//! committed.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::{BufRead, BufReader, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use kafka_batch::{Message, Producer, ProducerSettings};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer as _};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::ClientConfig;
use serde_json::json;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

/// The broker's address: `REAL_BROKER_BOOTSTRAP`. `None` (after saying the
/// test is skipped, where `cargo test` shows it) when it is not set.
pub fn real_broker(test: &str) -> Option<String> {
    match std::env::var("REAL_BROKER_BOOTSTRAP") {
        Ok(address) if !address.is_empty() => Some(address),
        _ => {
            // Straight to stderr: libtest captures only the print macros.
            let _ = writeln!(
                std::io::stderr(),
                "SKIPPED real_broker::{test}: REAL_BROKER_BOOTSTRAP is not set \
                 (scripts/test.sh starts tansu and sets it)"
            );
            None
        }
    }
}

/// A name no earlier run used, so runs against a long-lived broker never see
/// each other's records or commits.
pub fn unique(name: &str) -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!("{name}-{}-{}", std::process::id(), nanos % 1_000_000_000)
}

/// Creates `topic` with `partitions` partitions (replication 1) on the broker.
pub async fn create_topic(bootstrap: &str, topic: &str, partitions: i32) {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()
        .expect("admin client");
    let results = admin
        .create_topics(
            &[NewTopic::new(topic, partitions, TopicReplication::Fixed(1))],
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(30))),
        )
        .await
        .expect("CreateTopics answered");
    for result in results {
        match result {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((name, code)) => panic!("cannot create topic {name}: {code}"),
        }
    }
}

/// The id of record number `i`.
pub fn id_of(i: usize) -> String {
    format!("r{i:07}")
}

/// Produces records `range` (ids [`id_of`], about 200 bytes each) and waits
/// for every delivery report.
pub async fn produce(bootstrap: &str, topic: &str, range: std::ops::Range<usize>) {
    produce_keyed(bootstrap, topic, range, None).await
}

/// Like [`produce`]; with `keys`, record `i` has the key `k{i % keys}` (the
/// key is the message id) and carries its identity [`id_of`] as `id` in its
/// payload, which the members write down.
pub async fn produce_keyed(
    bootstrap: &str,
    topic: &str,
    range: std::ops::Range<usize>,
    keys: Option<usize>,
) {
    let mut settings = ProducerSettings::new(bootstrap);
    settings.service = "reliability-origin".into();
    // One record per record batch: tansu 0.6.0 answers a fetch from an
    // offset inside a stored batch with the *next* batch, skipping the rest
    // of the one holding that offset (its dynostore fetch keeps the batches
    // whose base offset is >= the one asked for). With single-record batches
    // every offset starts a batch, so the broker returns what it is asked
    // for and these tests measure kafka-batch, not that bug. See
    // RELIABILITY.md and `tansu_fetch_inside_a_batch_skips_records`.
    settings.kafka.set("batch.num.messages", "1");
    let producer = Producer::new(&settings).expect("producer");
    let mut start = range.start;
    while start < range.end {
        let end = (start + 20_000).min(range.end);
        let batch: Vec<Message> = (start..end)
            .map(|i| {
                let key = keys.map_or_else(|| id_of(i), |k| format!("k{}", i % k));
                Message::new(
                    key,
                    json!({ "n": i, "id": id_of(i), "title": "a record of the reliability run", "pad": "x".repeat(64) }),
                )
            })
            .collect();
        producer
            .produce_batch(topic, &batch)
            .await
            .expect("every record delivered");
        start = end;
    }
    producer.close().await.expect("producer flushed");
}

/// Low and high watermark (log start and log end) of each partition.
pub fn watermarks(bootstrap: &str, topic: &str, partitions: i32) -> BTreeMap<i32, (i64, i64)> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()
        .expect("metadata client");
    (0..partitions)
        .map(|p| {
            let marks = consumer
                .fetch_watermarks(topic, p, Duration::from_secs(10))
                .expect("watermarks");
            (p, marks)
        })
        .collect()
}

/// The group's committed offsets by partition (partitions without a commit
/// are left out).
pub fn committed(bootstrap: &str, group: &str, topic: &str) -> BTreeMap<i32, i64> {
    kafka_batch::testing::committed_offsets(bootstrap, group, topic).expect("committed offsets")
}

/// One run: a topic, a group, and a folder for the members' logs.
pub struct Run {
    pub bootstrap: String,
    pub topic: String,
    pub group: String,
    pub partitions: i32,
    pub dir: PathBuf,
    member_bin: PathBuf,
    /// `KAFKA_BATCH_*` settings every member of this run gets.
    pub settings: Vec<(String, String)>,
    members_started: usize,
}

impl Run {
    /// A fresh topic with `partitions` partitions and a fresh group.
    pub async fn new(bootstrap: &str, name: &str, partitions: i32) -> Run {
        let member_bin = std::env::var_os("REAL_BROKER_MEMBER_BIN")
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                Path::new(env!("CARGO_MANIFEST_DIR")).join("target/release/examples/group_member")
            });
        assert!(
            member_bin.is_file(),
            "{} is missing: build it with `cargo build --release --example group_member` \
             or point REAL_BROKER_MEMBER_BIN at it",
            member_bin.display()
        );
        let topic = unique(name);
        create_topic(bootstrap, &topic, partitions).await;
        let dir = std::env::temp_dir().join(unique(&format!("kafka-batch-{name}")));
        std::fs::create_dir_all(&dir).expect("run folder");
        let group = format!("{topic}-group");
        let settings = [
            ("KAFKA_BATCH_SERVICE", "reliability-member"),
            ("KAFKA_BATCH_BOOTSTRAP_SERVERS", bootstrap),
            ("KAFKA_BATCH_CONSUMER__GROUP_ID", &group),
            ("KAFKA_BATCH_CONSUMER__TOPICS", &topic),
            ("KAFKA_BATCH_CONSUMER__KAFKA__AUTO_OFFSET_RESET", "earliest"),
            // A killed member's partitions move on after 6 s, not 10.
            ("KAFKA_BATCH_CONSUMER__KAFKA__SESSION_TIMEOUT_MS", "6000"),
            ("KAFKA_BATCH_CONSUMER__KAFKA__HEARTBEAT_INTERVAL_MS", "1000"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        Run {
            bootstrap: bootstrap.into(),
            topic,
            group,
            partitions,
            dir,
            member_bin,
            settings,
            members_started: 0,
        }
    }

    /// Sets (or replaces) a setting for the members started from now on.
    pub fn set(&mut self, name: &str, value: impl ToString) {
        self.settings.retain(|(k, _)| k != name);
        self.settings.push((name.into(), value.to_string()));
    }

    /// Starts a member process with this run's settings and `extra` variables.
    pub fn start_member(&mut self, extra: &[(&str, String)]) -> Member {
        self.members_started += 1;
        let name = format!("member-{}", self.members_started);
        let log = self.dir.join(format!("{name}.log"));
        let stderr = std::fs::File::create(self.dir.join(format!("{name}.stderr")))
            .expect("member stderr file");
        let mut command = Command::new(&self.member_bin);
        command
            .env_clear()
            .current_dir(&self.dir)
            .envs(self.settings.iter().map(|(k, v)| (k, v)))
            .envs(extra.iter().map(|(k, v)| (k, v)))
            .env("MEMBER_LOG", &log)
            .envs(
                std::env::var("REAL_BROKER_MEMBER_DEBUG")
                    .ok()
                    .map(|d| ("KAFKA_BATCH_CONSUMER__KAFKA__DEBUG", d)),
            )
            .env(
                "RUST_LOG",
                // The rebalance lines are what `Run::ownership` reads.
                format!(
                    "{},kafka_batch::consumer::rebalance=info",
                    std::env::var("RUST_LOG").unwrap_or_else(|_| "kafka_batch=info".into())
                ),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr);
        let mut child = command.spawn().expect("member process starts");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let stdout = child.stdout.take().expect("member stdout is piped");
        let sink = Arc::clone(&lines);
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                sink.lock().expect("lines lock").push(line);
            }
        });
        Member {
            name,
            child,
            lines,
            reader: Some(reader),
            exited: None,
        }
    }

    /// Everything the members wrote down so far.
    pub fn handled(&self) -> Handled {
        Handled::read(&self.dir)
    }

    /// When each member held which partitions, from the `partitions
    /// assigned` and `partitions revoked` lines it logged. A member in
    /// `killed_at` held its last partitions until then; one still running
    /// holds them still.
    pub fn ownership(&self, killed_at: &HashMap<String, OffsetDateTime>) -> Ownership {
        Ownership::read(&self.dir, killed_at)
    }

    /// The group's committed offsets now.
    pub fn committed(&self) -> BTreeMap<i32, i64> {
        committed(&self.bootstrap, &self.group, &self.topic)
    }

    /// How many members the broker counts in the group now (DescribeGroups).
    pub fn group_members(&self) -> usize {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &self.bootstrap)
            .create()
            .expect("admin consumer");
        let groups = consumer
            .fetch_group_list(Some(&self.group), Duration::from_secs(10))
            .expect("DescribeGroups answered");
        groups
            .groups()
            .iter()
            .filter(|g| g.name() == self.group)
            .map(|g| g.members().len())
            .sum()
    }

    /// Log start and end of each partition now.
    pub fn watermarks(&self) -> BTreeMap<i32, (i64, i64)> {
        watermarks(&self.bootstrap, &self.topic, self.partitions)
    }

    /// Waits until the group's commits reach the log end of every partition.
    pub async fn wait_all_committed(&self, limit: Duration) {
        let ends = self.watermarks();
        wait_until(
            "the group committed every partition to its log end",
            limit,
            || {
                let committed = self.committed();
                ends.iter()
                    .all(|(p, (_, end))| committed.get(p).copied().unwrap_or(0) >= *end)
            },
        )
        .await;
    }
}

/// A running group member process.
pub struct Member {
    pub name: String,
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
    /// Reads the member's stdout until the process closes it.
    reader: Option<std::thread::JoinHandle<()>>,
    exited: Option<ExitStatus>,
}

impl Member {
    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether the member printed a line starting with `prefix`.
    pub fn said(&self, prefix: &str) -> bool {
        self.lines
            .lock()
            .expect("lines lock")
            .iter()
            .any(|l| l.starts_with(prefix))
    }

    /// The last line starting with `prefix`, if any.
    pub fn last_said(&self, prefix: &str) -> Option<String> {
        self.lines
            .lock()
            .expect("lines lock")
            .iter()
            .rev()
            .find(|l| l.starts_with(prefix))
            .cloned()
    }

    /// The member's `stats {...}` line, once it has exited.
    pub fn stats(&self) -> serde_json::Value {
        let line = self
            .last_said("stats ")
            .expect("the member printed its stats");
        serde_json::from_str(&line["stats ".len()..]).expect("stats are JSON")
    }

    /// Sends SIGTERM (finish the batch in hand, commit, leave).
    pub fn terminate(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status()
            .expect("kill runs");
        assert!(status.success(), "SIGTERM sent to {}", self.name);
    }

    /// Stops the member as an operator would: SIGTERM, then it must exit 0
    /// within a minute (having finished and committed the batch in hand).
    pub async fn stop(&mut self) {
        self.terminate();
        let status = self.wait_exit(Duration::from_secs(60)).await;
        assert!(
            status.success(),
            "{} exits 0 on SIGTERM, got {status}",
            self.name
        );
    }

    /// Sends SIGKILL and reaps the process.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        self.exited = self.child.wait().ok();
        self.read_to_end();
    }

    /// Waits until every line the member printed has been read.
    fn read_to_end(&mut self) {
        if let Some(reader) = self.reader.take() {
            let _ = tokio::task::block_in_place(|| reader.join());
        }
    }

    /// Waits for the process to exit; panics after `limit`.
    pub async fn wait_exit(&mut self, limit: Duration) -> ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.exited {
                return status;
            }
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                self.exited = Some(status);
                self.read_to_end();
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "{} did not exit within {limit:?}",
                self.name
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Peak resident memory so far, in KiB (VmHWM), while it runs.
    pub fn peak_rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .expect("the member is running");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmHWM in /proc status")
    }
}

impl Drop for Member {
    /// A failed test must not leave members running.
    fn drop(&mut self) {
        if self.exited.is_none() && matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Each member's file in `dir` with this extension (`member-3.log`): the
/// member's name and the file's text.
fn member_files(dir: &Path, extension: &str) -> Vec<(String, String)> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).expect("run folder").flatten() {
        let path = entry.path();
        if path.extension().is_none_or(|e| e != extension) {
            continue;
        }
        let name = path
            .file_stem()
            .map_or_else(String::new, |s| s.to_string_lossy().into());
        let text = std::fs::read_to_string(&path).expect("member file");
        files.push((name, text));
    }
    files
}

/// One member's holding of one partition, from an assignment to the end of
/// its revoke (or its kill; `None`: still held).
struct Held {
    member: String,
    partition: i32,
    since: OffsetDateTime,
    until: Option<OffsetDateTime>,
}

/// Who held which partition when (see [`Run::ownership`]).
pub struct Ownership {
    held: Vec<Held>,
}

impl Ownership {
    /// Reads the `*.stderr` logs of the members in `dir` (see [`Run::ownership`]).
    fn read(dir: &Path, killed_at: &HashMap<String, OffsetDateTime>) -> Ownership {
        let mut held = Vec::new();
        for (member, text) in member_files(dir, "stderr") {
            // Partition -> since when, for what the member holds now.
            let mut holding: BTreeMap<i32, OffsetDateTime> = BTreeMap::new();
            for line in text.lines().map(without_colours) {
                let Some((at, assigned, partitions)) = rebalance_line(&line) else {
                    continue;
                };
                for partition in partitions {
                    if assigned {
                        holding.insert(partition, at);
                    } else if let Some(since) = holding.remove(&partition) {
                        held.push(Held {
                            member: member.clone(),
                            partition,
                            since,
                            until: Some(at),
                        });
                    }
                }
            }
            let until = killed_at.get(&member).copied();
            for (partition, since) in holding {
                held.push(Held {
                    member: member.clone(),
                    partition,
                    since,
                    until,
                });
            }
        }
        Ownership { held }
    }

    /// The partitions some member still running holds now (killed members
    /// held theirs only until their kill).
    pub fn held_now(&self) -> BTreeSet<i32> {
        self.held
            .iter()
            .filter(|h| h.until.is_none())
            .map(|h| h.partition)
            .collect()
    }

    /// True when members `a` and `b` both held `partition` at one moment:
    /// the broker gave it to one before the other's revoke had finished.
    /// (A broker that follows the eager protocol hands out the partitions of
    /// a rebalance only once every member has revoked its own.)
    pub fn overlapped<'a>(&self, a: &'a str, b: &'a str, partition: i32) -> bool {
        let now = OffsetDateTime::now_utc();
        let of = |m: &'a str| {
            self.held
                .iter()
                .filter(move |h| h.member == m && h.partition == partition)
        };
        of(a).any(|x| {
            of(b).any(|y| x.since < y.until.unwrap_or(now) && y.since < x.until.unwrap_or(now))
        })
    }
}

/// A line with its terminal colour codes taken out.
fn without_colours(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // `ESC [ ... m`
            for c in chars.by_ref() {
                if c == 'm' {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// `(when, assigned (or revoked), partition numbers)` of a line the
/// consumer logs on a rebalance: `TIME  INFO ...: partitions assigned
/// partitions=topic[3],topic[4]`.
fn rebalance_line(line: &str) -> Option<(OffsetDateTime, bool, Vec<i32>)> {
    let assigned = if line.contains("partitions assigned") {
        true
    } else if line.contains("partitions revoked") {
        false
    } else {
        return None;
    };
    let time = line.split_whitespace().next()?;
    let at = OffsetDateTime::parse(time, &Rfc3339).ok()?;
    let list = line.rsplit_once("partitions=")?.1;
    let partitions = list
        .split(',')
        .filter_map(|tp| {
            tp.trim()
                .rsplit_once('[')?
                .1
                .strip_suffix(']')?
                .parse()
                .ok()
        })
        .collect();
    Some((at, assigned, partitions))
}

/// What the members wrote down: for each member log, `(partition, offset, id)`.
pub struct Handled {
    pub by_member: BTreeMap<String, Vec<(i32, i64, String)>>,
    /// The key of each record handled, by (partition, offset).
    pub key_of: HashMap<(i32, i64), String>,
}

impl Handled {
    fn read(dir: &Path) -> Handled {
        let mut by_member = BTreeMap::new();
        let mut key_of = HashMap::new();
        for (name, text) in member_files(dir, "log") {
            // A line cut short by SIGKILL in the middle of a write was never
            // handled (the handler had not returned): only whole lines count.
            let whole = text.rsplit_once('\n').map_or("", |(lines, _)| lines);
            let records = whole
                .lines()
                .map(|line| {
                    let mut parts = line.splitn(4, ' ');
                    let mut field = || parts.next().expect("partition offset id key");
                    let partition = field().parse().expect("partition");
                    let offset = field().parse().expect("offset");
                    let id = field().to_string();
                    key_of.insert((partition, offset), field().to_string());
                    (partition, offset, id)
                })
                .collect();
            by_member.insert(name, records);
        }
        Handled { by_member, key_of }
    }

    /// How many handlings in all (duplicates included).
    pub fn total(&self) -> usize {
        self.by_member.values().map(Vec::len).sum()
    }

    /// How many times each id was handled.
    pub fn counts(&self) -> HashMap<&str, usize> {
        let mut counts = HashMap::new();
        for (_, _, id) in self.by_member.values().flatten() {
            *counts.entry(id.as_str()).or_insert(0) += 1;
        }
        counts
    }

    /// Handlings beyond the first of each id.
    pub fn duplicates(&self) -> usize {
        self.total() - self.counts().len()
    }

    /// Each id handled more than once: by which members, of which partition.
    pub fn repeated(&self) -> Vec<Vec<(&str, i32)>> {
        let mut by_id: HashMap<&str, Vec<(&str, i32)>> = HashMap::new();
        for (member, records) in &self.by_member {
            for (partition, _, id) in records {
                by_id
                    .entry(id.as_str())
                    .or_default()
                    .push((member.as_str(), *partition));
            }
        }
        by_id.into_values().filter(|h| h.len() > 1).collect()
    }

    /// The ids of `0..count` that no member handled.
    pub fn missing(&self, count: usize) -> Vec<String> {
        let counts = self.counts();
        (0..count)
            .map(id_of)
            .filter(|id| !counts.contains_key(id.as_str()))
            .collect()
    }

    /// For each partition, the end of the run of offsets from `start`
    /// that were all handled by someone.
    pub fn contiguous_end(&self, starts: &BTreeMap<i32, i64>) -> BTreeMap<i32, i64> {
        let mut offsets: BTreeMap<i32, Vec<i64>> = BTreeMap::new();
        for (p, o, _) in self.by_member.values().flatten() {
            offsets.entry(*p).or_default().push(*o);
        }
        starts
            .iter()
            .map(|(p, start)| {
                let mut end = *start;
                if let Some(list) = offsets.get_mut(p) {
                    list.sort_unstable();
                    list.dedup();
                    for o in list.iter().filter(|o| **o >= *start) {
                        if *o != end {
                            break;
                        }
                        end += 1;
                    }
                }
                (*p, end)
            })
            .collect()
    }

    /// Records `member` handled at or past the committed offset of their
    /// partition: handled, not committed, so the next owner reads them again.
    pub fn uncommitted_of(&self, member: &str, committed: &BTreeMap<i32, i64>) -> usize {
        self.by_member.get(member).map_or(0, |records| {
            records
                .iter()
                .filter(|(p, o, _)| *o >= committed.get(p).copied().unwrap_or(0))
                .count()
        })
    }
}

/// Panics unless no partition's committed offset is past a record that no
/// member handled: the promise, checked at any moment.
pub fn assert_no_commit_ahead(run: &Run, when: &str) {
    let committed = run.committed();
    let starts: BTreeMap<i32, i64> = run
        .watermarks()
        .iter()
        .map(|(p, (low, _))| (*p, *low))
        .collect();
    let handled_to = run.handled().contiguous_end(&starts);
    for (p, c) in &committed {
        let end = handled_to.get(p).copied().unwrap_or(0);
        assert!(
            *c <= end,
            "{when}: partition {p} committed up to {c} but records were handled only up to {end}: a record was committed unhandled"
        );
    }
}

/// Waits until `condition` holds, checking every 100 ms; panics after `limit`.
pub async fn wait_until(what: &str, limit: Duration, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !tokio::task::block_in_place(&mut condition) {
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?} waiting until {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A small deterministic random source (xorshift), seeded per run and
/// reported, so a failing kill schedule can be replayed with
/// `REAL_BROKER_SEED`.
pub struct Rng(u64);

impl Rng {
    pub fn from_env_or_time() -> Rng {
        let seed = std::env::var("REAL_BROKER_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map_or(1, |d| d.as_nanos() as u64)
            })
            | 1;
        Rng(seed)
    }

    pub fn seed(&self) -> u64 {
        self.0
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Lines as a member logs them (with colour codes), from a crash run in
    /// which tansu gave partition 3 to member-6 60 ms before member-9 had
    /// revoked it.
    const MEMBER_9: &str = "\u{1b}[2m2026-11-24T13:19:33.389923Z\u{1b}[0m \u{1b}[32m INFO\u{1b}[0m \u{1b}[2mkafka_batch::consumer::rebalance\u{1b}[0m\u{1b}[2m:\u{1b}[0m partitions assigned \u{1b}[3mpartitions\u{1b}[0m\u{1b}[2m=\u{1b}[0mrb-crash[3],rb-crash[4],rb-crash[5]
\u{1b}[2m2026-11-24T13:19:39.739492Z\u{1b}[0m \u{1b}[32m INFO\u{1b}[0m \u{1b}[2mkafka_batch::consumer::rebalance\u{1b}[0m\u{1b}[2m:\u{1b}[0m partitions revoked \u{1b}[3mpartitions\u{1b}[0m\u{1b}[2m=\u{1b}[0mrb-crash[3],rb-crash[4],rb-crash[5]
2026-11-24T13:19:49.293653Z  INFO kafka_batch::consumer::rebalance: partitions assigned partitions=rb-crash[3],rb-crash[4],rb-crash[5]
";
    const MEMBER_6: &str = "2026-11-24T13:19:27.963744Z  INFO kafka_batch::consumer::rebalance: partitions assigned partitions=rb-crash[0],rb-crash[1],rb-crash[2]
2026-11-24T13:19:39.677999Z  INFO kafka_batch::consumer::rebalance: partitions revoked partitions=rb-crash[0],rb-crash[1],rb-crash[2]
2026-11-24T13:19:39.679017Z  INFO kafka_batch::consumer::rebalance: partitions assigned partitions=rb-crash[3],rb-crash[4],rb-crash[5]
2026-11-24T13:19:46.062384Z  INFO kafka_batch::consumer::rebalance: partitions revoked partitions=rb-crash[3],rb-crash[4],rb-crash[5]
";
    const MEMBER_13: &str = "2026-11-24T13:19:58.000000Z  INFO kafka_batch::consumer::rebalance: partitions assigned partitions=rb-crash[3]
";

    #[test]
    fn ownership_overlaps_only_where_two_members_held_a_partition_at_once() {
        let dir = std::env::temp_dir().join(unique("kafka-batch-ownership"));
        std::fs::create_dir_all(&dir).expect("folder");
        for (name, text) in [
            ("member-9", MEMBER_9),
            ("member-6", MEMBER_6),
            ("member-13", MEMBER_13),
        ] {
            std::fs::write(dir.join(format!("{name}.stderr")), text).expect("log");
        }
        let kill = OffsetDateTime::parse("2026-11-24T13:19:50Z", &Rfc3339).expect("time");
        let ownership = Ownership::read(&dir, &[("member-9".to_string(), kill)].into());
        // member-6 was given 3 at 39.679, member-9 revoked it at 39.739.
        assert!(ownership.overlapped("member-6", "member-9", 3));
        assert!(ownership.overlapped("member-9", "member-6", 4));
        // member-6 held 0 to 2 alone; member-9's last holding of 3 ended at
        // its kill, before member-13 was given 3.
        assert!(!ownership.overlapped("member-6", "member-9", 0));
        assert!(!ownership.overlapped("member-9", "member-13", 3));
        assert!(!ownership.overlapped("member-6", "member-13", 3));
        std::fs::remove_dir_all(&dir).expect("clean up");
    }

    /// From the CI run of 2026-12-01 (trimmed) in which tansu gave
    /// partitions 0 and 1 to member-9, killed while it rejoined: the last
    /// assignments of the running members leave them out.
    const ORPHANED: [(&str, &str); 3] = [
        ("member-8", "2026-12-01T18:00:27.732786Z  INFO kafka_batch::consumer::revoke: partitions revoked partitions=rb-crash[6],rb-crash[7]
2026-12-01T18:00:30.737144Z  INFO kafka_batch::consumer::rebalance: partitions assigned partitions=rb-crash[4],rb-crash[5]
"),
        ("member-9", "2026-12-01T18:00:18.112429Z  INFO kafka_batch::consumer::rebalance: partitions assigned partitions=rb-crash[3],rb-crash[4],rb-crash[5]
2026-12-01T18:00:23.800515Z  INFO kafka_batch::consumer::revoke: partitions revoked partitions=rb-crash[3],rb-crash[4],rb-crash[5]
"),
        ("member-12", "2026-12-01T18:00:26.132984Z  INFO kafka_batch::consumer::rebalance: partitions assigned partitions=rb-crash[0],rb-crash[1],rb-crash[2],rb-crash[3]
2026-12-01T18:00:28.517447Z  INFO kafka_batch::consumer::revoke: partitions revoked partitions=rb-crash[0],rb-crash[1],rb-crash[2],rb-crash[3]
2026-12-01T18:00:28.518868Z  INFO kafka_batch::consumer::rebalance: partitions assigned partitions=rb-crash[2],rb-crash[3]
"),
    ];

    #[test]
    fn partitions_held_now_are_the_running_members_last_assignments() {
        let dir = std::env::temp_dir().join(unique("kafka-batch-held-now"));
        std::fs::create_dir_all(&dir).expect("folder");
        for (name, text) in ORPHANED {
            std::fs::write(dir.join(format!("{name}.stderr")), text).expect("log");
        }
        let kill = OffsetDateTime::parse("2026-12-01T18:00:25Z", &Rfc3339).expect("time");
        let ownership = Ownership::read(&dir, &[("member-9".to_string(), kill)].into());
        assert_eq!(ownership.held_now(), BTreeSet::from([2, 3, 4, 5]));
        std::fs::remove_dir_all(&dir).expect("clean up");
    }
}
