//! [`JobDefinition`]: what a job name means to a worker (how to perform it,
//! how often to retry it, how long it may take, whether its jobs keep their
//! order), and [`Perform`], the closures that do the work.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use serde_json::Value;

use crate::error::BoxError;
use crate::settings::Backoff;

/// A job's future, as a worker runs it.
pub type JobFuture = Pin<Box<dyn Future<Output = Result<Value, BoxError>> + Send + 'static>>;

/// What performs a job: any `Fn(A) -> impl Future<Output = Result<R, E>>`
/// where `R` serializes (the job's result) and `E` is an error. `A` is the
/// [`Job`](super::Job) itself for [`JobQueue::register`](super::JobQueue::register),
/// or the arguments' type for
/// [`JobQueue::register_typed`](super::JobQueue::register_typed).
///
/// ```
/// use kafka_batch::jobs::{Job, JobDefinition};
///
/// let definition = JobDefinition::new("ping", async |job: Job| {
///     anyhow::Ok(format!("pong {}", job.id))
/// });
/// assert_eq!(definition.name, "ping");
/// ```
pub trait Perform<A>: Send + Sync + 'static {
    /// Starts the job.
    fn perform(&self, input: A) -> JobFuture;
}

impl<A, F, Fut, R, E> Perform<A> for F
where
    F: Fn(A) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<R, E>> + Send + 'static,
    R: Serialize,
    E: Into<BoxError>,
{
    fn perform(&self, input: A) -> JobFuture {
        let future = self(input);
        Box::pin(async move {
            let value = future.await.map_err(Into::into)?;
            serde_json::to_value(value)
                .map_err(|e| format!("the job's result cannot be written as JSON: {e}").into())
        })
    }
}

/// The retries a definition gets unless it says otherwise.
pub const DEFAULT_RETRIES: u32 = 5;

/// The backoff a definition gets unless it says otherwise: 1 s, then 4 s,
/// 16 s, 64 s, 256 s (at most an hour), each moved by up to a quarter at
/// random so that jobs failed together do not come back together.
pub const DEFAULT_BACKOFF: Backoff = Backoff {
    initial: Duration::from_secs(1),
    multiplier: 4.0,
    max: Duration::from_secs(3600),
    jitter: 0.25,
};

/// What a job name means to the workers that registered it.
///
/// `A` is what `perform` takes: the [`Job`](super::Job) (the default), or
/// the arguments' type for [`JobQueue::register_typed`](super::JobQueue::register_typed).
///
/// ```
/// use std::time::Duration;
/// use kafka_batch::jobs::{JobDefinition, Job};
/// use serde::Deserialize;
///
/// #[derive(Deserialize)]
/// struct Add { a: i64, b: i64 }
///
/// let add = JobDefinition::new("add", async |add: Add| anyhow::Ok(add.a + add.b))
///     .retries(3)
///     .timeout(Duration::from_secs(30));
/// let mail = JobDefinition::new("mail", async |job: Job| anyhow::Ok(()))
///     .fifo(true);
/// assert!(mail.fifo && !add.fifo);
/// ```
pub struct JobDefinition<A = super::Job> {
    /// The job name it runs.
    pub name: String,
    /// How many times a failed job is tried again (through the delayed
    /// topic) before it goes to the dead topic: `retries + 1` runs at most.
    pub retries: u32,
    /// The wait before each retry: `backoff.wait(n)` before the n-th.
    pub backoff: Backoff,
    /// A run that takes longer fails (and is retried like any failure).
    pub timeout: Option<Duration>,
    /// Documents that this job's order matters: enqueue its jobs with a
    /// key (a job without one is keyed by this name), and they run one at
    /// a time per key, in enqueue order. Every job with a key keeps that
    /// order; see the [module docs](super) for what retries do to it.
    pub fifo: bool,
    /// Runs a job.
    pub perform: Arc<dyn Perform<A>>,
}

impl<A> JobDefinition<A> {
    /// A definition with [`DEFAULT_RETRIES`], [`DEFAULT_BACKOFF`], no
    /// timeout, not FIFO.
    pub fn new(name: impl Into<String>, perform: impl Perform<A>) -> JobDefinition<A> {
        JobDefinition {
            name: name.into(),
            retries: DEFAULT_RETRIES,
            backoff: DEFAULT_BACKOFF,
            timeout: None,
            fifo: false,
            perform: Arc::new(perform),
        }
    }

    /// Sets [`JobDefinition::retries`].
    pub fn retries(mut self, retries: u32) -> Self {
        self.retries = retries;
        self
    }

    /// Sets [`JobDefinition::backoff`].
    pub fn backoff(mut self, backoff: Backoff) -> Self {
        self.backoff = backoff;
        self
    }

    /// Sets [`JobDefinition::timeout`].
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// Sets [`JobDefinition::fifo`].
    pub fn fifo(mut self, fifo: bool) -> Self {
        self.fifo = fifo;
        self
    }
}

impl<A> std::fmt::Debug for JobDefinition<A> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JobDefinition")
            .field("name", &self.name)
            .field("retries", &self.retries)
            .field("backoff", &self.backoff)
            .field("timeout", &self.timeout)
            .field("fifo", &self.fifo)
            .finish_non_exhaustive()
    }
}

/// Why a run did not produce a value.
pub(crate) enum RunFailure {
    /// The job failed (an error, a panic, the timeout): it may be retried.
    Failed(String),
    /// Its arguments do not fit the definition's type: retrying cannot help.
    BadArgs(String),
}

/// A definition with its argument type erased, as the worker keeps it.
pub(crate) struct Registered {
    pub retries: u32,
    pub backoff: Backoff,
    pub timeout: Option<Duration>,
    pub fifo: bool,
    start: Box<dyn Fn(super::Job) -> Result<JobFuture, String> + Send + Sync>,
}

impl Registered {
    /// A definition that takes the job itself.
    pub fn untyped(definition: JobDefinition<super::Job>) -> Registered {
        let perform = Arc::clone(&definition.perform);
        Registered::with_start(definition, move |job| Ok(perform.perform(job)))
    }

    /// A definition that takes the job's arguments as `A`.
    pub fn typed<A: serde::de::DeserializeOwned + 'static>(
        definition: JobDefinition<A>,
    ) -> Registered {
        let perform = Arc::clone(&definition.perform);
        Registered::with_start(definition, move |job| {
            let args = A::deserialize(job.args).map_err(|e| {
                format!(
                    "the arguments of job {:?} do not fit {}: {e}",
                    job.id,
                    std::any::type_name::<A>()
                )
            })?;
            Ok(perform.perform(args))
        })
    }

    fn with_start<A>(
        definition: JobDefinition<A>,
        start: impl Fn(super::Job) -> Result<JobFuture, String> + Send + Sync + 'static,
    ) -> Registered {
        Registered {
            retries: definition.retries,
            backoff: definition.backoff,
            timeout: definition.timeout,
            fifo: definition.fifo,
            start: Box::new(start),
        }
    }

    /// Runs the job to its end: its value, or why not. A panic in the job
    /// is a failure of that job, not of the worker.
    pub async fn run(&self, job: super::Job) -> Result<Value, RunFailure> {
        use futures_util::FutureExt as _;
        let future = (self.start)(job).map_err(RunFailure::BadArgs)?;
        let guarded = std::panic::AssertUnwindSafe(future).catch_unwind();
        let outcome = match self.timeout {
            Some(limit) => match tokio::time::timeout(limit, guarded).await {
                Ok(outcome) => outcome,
                Err(_) => {
                    return Err(RunFailure::Failed(format!(
                        "timed out after {} ms",
                        limit.as_millis()
                    )))
                }
            },
            None => guarded.await,
        };
        match outcome {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(error)) => Err(RunFailure::Failed(crate::failure::error_text(
                error.as_ref(),
            ))),
            Err(panic) => Err(RunFailure::Failed(format!(
                "panicked: {}",
                crate::consumer::panic_message(panic.as_ref())
            ))),
        }
    }
}
