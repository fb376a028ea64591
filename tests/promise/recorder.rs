//! The recorder: every handler call, written down before the handler
//! returns, and a commit watcher that reads the group's committed offsets
//! with a client of its own while the run goes on.
//!
//! Reusable by any test that drives a consumer: the job queue and stream
//! faces record their settlements here the same way.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

/// What the handler answered for one record of a call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Not named as failed: handled.
    Ok,
    /// Named in the handler's `Failures`.
    Failed,
    /// Part of a batch the handler failed as a whole.
    WholeBatch,
    /// Part of a batch whose handler panicked.
    Panicked,
}

impl Outcome {
    /// True when the failure chain should see this delivery as failed.
    pub fn failed(self) -> bool {
        matches!(self, Outcome::Failed | Outcome::WholeBatch)
    }
}

/// One record of one handler call.
#[derive(Clone, Debug)]
pub struct Call {
    /// Handler calls over the whole scenario, from 1.
    pub call: u64,
    /// Which consumer instance (member and restart) ran it.
    pub instance: u32,
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub id: String,
    /// The n-th time the checker saw this id handed to a handler, from 1.
    pub attempt: u32,
    pub outcome: Outcome,
    /// The instance's assigned + revoked count as the call started: a
    /// change between two calls means a rebalance came between them.
    pub rebalances: u64,
    pub started: Instant,
    /// When the handler was about to return (or panic): `None` if it never
    /// got there (the call was dropped by a crash).
    pub returned: Option<Instant>,
}

/// Why an instance ended, as its supervisor saw it.
#[derive(Clone, Debug)]
pub struct Exit {
    pub instance: u32,
    /// What the supervisor did to it: "shutdown", "crash", or "" (nothing).
    pub asked: &'static str,
    /// `Ok`, the error's Display, or "PANIC: ..." when a panic escaped `process`.
    pub result: Result<(), String>,
    /// The error's variant, for the contract check.
    pub variant: &'static str,
    pub at: Instant,
}

#[derive(Default)]
pub struct Log {
    pub calls: Vec<Call>,
    pub exits: Vec<Exit>,
    /// (seen at, topic, partition, committed offset), each change once.
    pub commits: Vec<(Instant, String, i32, i64)>,
    /// Attempts per id so far.
    pub attempts: BTreeMap<String, u32>,
    pub next_call: u64,
    /// Things the run itself noticed (a panic that escaped, a contract breach).
    pub notes: Vec<String>,
    /// Faults injected and restarts made, for the report line.
    pub faults: u64,
    pub restarts: u64,
    /// Instances that saw a rebalance, restarts, crashes: the run was not calm.
    pub disturbed: bool,
    /// Seeks back asked for: (instance, topic, partition, when asked).
    pub seeks: Vec<(u32, String, i32, Instant)>,
    /// Of those, the seeks the consumer made (the others found the
    /// partition gone, or not fetched yet).
    pub seeks_made: usize,
}

/// Shared by every member, the watcher and the checker.
#[derive(Clone, Default)]
pub struct Recorder {
    log: Arc<Mutex<Log>>,
}

impl Recorder {
    pub fn lock(&self) -> MutexGuard<'_, Log> {
        // A handler that panicked while holding the lock is itself under
        // test; what it wrote is still worth reading.
        self.log.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Marks calls `from..` as returned now.
    pub fn returned(&self, from: usize, to: usize) {
        let now = Instant::now();
        let mut log = self.lock();
        for c in &mut log.calls[from..to] {
            c.returned = Some(now);
        }
    }

    pub fn note(&self, text: String) {
        self.lock().notes.push(text);
    }

    pub fn calls(&self) -> Vec<Call> {
        self.lock().calls.clone()
    }
}

/// The group's committed offsets, read every `every` on a blocking thread
/// until `stop` is set; each change is written to the recorder.
pub struct CommitWatcher {
    bootstrap: String,
    group: String,
    topics: Vec<String>,
    last: BTreeMap<(String, i32), i64>,
}

impl CommitWatcher {
    pub fn new(bootstrap: &str, group: &str, topics: Vec<String>) -> CommitWatcher {
        CommitWatcher {
            bootstrap: bootstrap.to_owned(),
            group: group.to_owned(),
            topics,
            last: BTreeMap::new(),
        }
    }

    /// Reads once; returns the latest offsets known (blocking).
    pub fn read_once(&mut self, recorder: &Recorder) -> BTreeMap<(String, i32), i64> {
        for topic in &self.topics {
            // A broker fault may make a read fail; the next one will see it.
            let Ok(offsets) =
                kafka_batch::testing::committed_offsets(&self.bootstrap, &self.group, topic)
            else {
                continue;
            };
            // The offsets are read after the commit was made: stamping them
            // now errs on the side of a later time, never an earlier one.
            let at = Instant::now();
            for (partition, offset) in offsets {
                let key = (topic.clone(), partition);
                if self.last.get(&key) != Some(&offset) {
                    self.last.insert(key, offset);
                    recorder
                        .lock()
                        .commits
                        .push((at, topic.clone(), partition, offset));
                }
            }
        }
        self.last.clone()
    }

    /// Runs on a blocking thread until `stop` says so, then reads once more.
    pub fn spawn(
        mut self,
        recorder: Recorder,
        every: Duration,
        stop: Arc<std::sync::atomic::AtomicBool>,
        latest: Arc<Mutex<BTreeMap<(String, i32), i64>>>,
    ) -> tokio::task::JoinHandle<CommitWatcher> {
        tokio::task::spawn_blocking(move || {
            use std::sync::atomic::Ordering;
            while !stop.load(Ordering::Acquire) {
                let now = self.read_once(&recorder);
                *latest.lock().unwrap_or_else(PoisonError::into_inner) = now;
                std::thread::sleep(every);
            }
            let now = self.read_once(&recorder);
            *latest.lock().unwrap_or_else(PoisonError::into_inner) = now;
            self
        })
    }
}
