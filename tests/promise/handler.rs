//! The handler the scenarios run: each record's fate decides the call's
//! outcome, and the call is written down before the handler returns.

use std::sync::Arc;
use std::time::{Duration, Instant};

use kafka_batch::{BoxError, Consumer, ConsumerHandle, Error, Failures, Message};
use serde_json::Value;

use super::drive::Ctx;
use super::recorder::{Call, Outcome};
use super::scenario::Fate;

/// A boxed handler future, owning all it needs (so it is `Send` and `'static`).
type HandlerFuture =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), BoxError>> + Send>>;

/// The handler of one instance: looks up each record's fate, writes the
/// call down, returns (or panics) as the fates say.
struct Handler {
    ctx: Arc<Ctx>,
    instance: u32,
    handle: ConsumerHandle,
}

impl Handler {
    fn call(&self, batch: Vec<Message<Value>>) -> HandlerFuture {
        let (ctx, instance) = (Arc::clone(&self.ctx), self.instance);
        let handle = self.handle.clone();
        Box::pin(async move {
            let stats = handle.stats();
            let rebalances = stats.assigned + stats.revoked;
            let sc = &ctx.sc;
            let (call, from, to) = {
                let mut log = ctx.recorder.lock();
                log.next_call += 1;
                let call = log.next_call;
                let from = log.calls.len();
                let mut outcomes = Vec::with_capacity(batch.len());
                let mut panic = false;
                for m in &batch {
                    let id = m.id.to_string();
                    let attempt = {
                        let a = log.attempts.entry(id.clone()).or_insert(0);
                        *a += 1;
                        *a
                    };
                    let outcome = match sc.fate_of(&id) {
                        Some(Fate::Ok) => Outcome::Ok,
                        Some(Fate::FailFirst(k)) if attempt <= k => Outcome::Failed,
                        Some(Fate::FailFirst(_)) => Outcome::Ok,
                        Some(Fate::AlwaysFail) => Outcome::Failed,
                        Some(Fate::PanicFirst) if attempt == 1 => {
                            panic = true;
                            Outcome::Panicked
                        }
                        Some(Fate::PanicFirst) => Outcome::Ok,
                        None => {
                            log.notes.push(format!(
                                "the handler got record {id:?} ({:?}), which no good record of the scenario has",
                                m.origin()
                            ));
                            Outcome::Ok
                        }
                    };
                    outcomes.push((id, attempt, outcome));
                }
                let whole = sc.whole_batch_calls.contains(&call);
                for (m, (id, attempt, outcome)) in batch.iter().zip(outcomes) {
                    let origin = m.origin().expect("a consumed message has its origin");
                    let outcome = if panic {
                        Outcome::Panicked
                    } else if whole {
                        Outcome::WholeBatch
                    } else {
                        outcome
                    };
                    log.calls.push(Call {
                        call,
                        instance,
                        topic: origin.topic.to_string(),
                        partition: origin.partition,
                        offset: origin.offset,
                        id,
                        attempt,
                        outcome,
                        rebalances,
                        started: Instant::now(),
                        returned: None,
                    });
                }
                (call, from, log.calls.len())
            };
            if let Some((every, ms)) = sc.slow {
                if call % every == 0 {
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                }
            }
            ctx.recorder.returned(from, to);
            let outcomes: Vec<Outcome> = ctx.recorder.lock().calls[from..to]
                .iter()
                .map(|c| c.outcome)
                .collect();
            if outcomes.contains(&Outcome::Panicked) {
                panic!("promise checker: the handler panics on purpose (call {call})");
            }
            if outcomes.contains(&Outcome::WholeBatch) {
                return Err(format!("call {call}: the whole batch failed").into());
            }
            let mut failed = Failures::new();
            for (i, (m, o)) in batch.iter().zip(&outcomes).enumerate() {
                if *o == Outcome::Failed {
                    // Both ways of naming a failure, by call parity.
                    if call % 2 == 0 {
                        failed.add(i, format!("{} failed at call {call}", m.id));
                    } else {
                        failed.add_id(&m.id, format!("{} failed at call {call}", m.id));
                    }
                }
            }
            failed.into_result().map_err(|f| Box::new(f) as BoxError)
        })
    }
}

/// `process` for one instance, with its handler (or, when the scenario
/// says so, `stream` with the same handler deciding each batch's verdict).
pub async fn process(ctx: Arc<Ctx>, instance: u32, consumer: Consumer) -> Result<(), Error> {
    let stream = ctx.sc.stream;
    let h = Handler {
        ctx,
        instance,
        handle: consumer.handle(),
    };
    if stream {
        return through_stream(Arc::new(h), consumer).await;
    }
    consumer
        .process(async move |batch: Vec<Message<Value>>| h.call(batch).await)
        .await
}

/// The consumer as a stream: each batch goes to a task of its own, which
/// runs the handler and settles the batch with what it returned, after a
/// short wait of its own (so batches in flight together settle in an order
/// of their own). A batch failed as a whole is dropped unsettled every
/// other time, which the stream counts as that failure.
async fn through_stream(h: Arc<Handler>, consumer: Consumer) -> Result<(), Error> {
    let mut batches = consumer.stream::<Value>();
    let mut handed = 0u64;
    while let Some(batch) = batches.next().await {
        let batch = batch?;
        let h = Arc::clone(&h);
        handed += 1;
        let (wait, drop_it) = (handed * 7_919 % 6, handed % 2 == 0);
        tokio::spawn(async move {
            let verdict = h.call(batch.messages().to_vec()).await;
            tokio::time::sleep(Duration::from_millis(wait)).await;
            match verdict {
                Ok(()) => {
                    batch.ack();
                }
                Err(e) => match e.downcast::<Failures>() {
                    Ok(failures) => {
                        batch.fail_some(*failures);
                    }
                    Err(_) if drop_it => drop(batch),
                    Err(e) => {
                        batch.fail(e);
                    }
                },
            }
        });
    }
    Ok(())
}
