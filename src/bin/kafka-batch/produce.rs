//! `kafka-batch produce`: JSON lines from standard input, each packed into
//! an envelope by the library's `Producer` and confirmed delivered.

use std::io::BufRead;
use std::time::SystemTime;

use kafka_batch::{Error, Message, Producer};
use serde_json::Value;
use tokio::sync::mpsc;

use crate::client::{metadata, note, partitions, runtime, runtime_for_async, Env, Failure};

/// At most this many lines go into one `produce_batch` call.
const BATCH: usize = 1000;

/// Each line of standard input is one JSON value, the payload of one message
/// (blank lines are skipped). Lines are produced in batches of what has
/// arrived, each batch confirmed delivered before the next, so a slow
/// writer's lines go out as they come.
///
/// A line that is not JSON stops the command: the lines before it are
/// produced and confirmed, nothing from it on is, and the error names its
/// line number (exit 1). The summary (`delivered N records to TOPIC`) goes to
/// standard error.
#[derive(clap::Args)]
#[command(after_help = concat!(
    "Examples:\n  echo '{\"id\": \"e1\", \"title\": \"Concert\"}' | kafka-batch produce events --id-field id\n  \
    kafka-batch produce events --service loader < events.jsonl\n\n",
    exit_codes!()
))]
pub struct Args {
    /// The topic to produce to (it must exist).
    topic: String,
    /// Take each message's id from this field of the JSON object (a string
    /// or a number); a line without it gets a fresh id.
    #[arg(long, value_name = "NAME")]
    id_field: Option<String>,
    /// The service name written as hist.svc (default: the settings' `service`).
    #[arg(long, value_name = "NAME")]
    service: Option<String>,
}

/// One line read from standard input.
enum Line {
    Json(Value),
    /// Why the line (numbered from 1) cannot be produced.
    Bad(String),
}

pub fn run(env: &Env, args: &Args) -> Result<(), Failure> {
    // Up front: the brokers answer and the topic exists (a producer would
    // otherwise retry quietly, or auto-create a mistyped topic).
    {
        let client = env.consumer("kafka-batch-produce", false)?;
        let metadata = metadata(env, &client)?;
        partitions(env, &metadata, &args.topic)?;
    }
    let mut settings = env.settings.producer.clone();
    if let Some(service) = &args.service {
        settings.service.clone_from(service);
    }
    let producer =
        Producer::new(&settings).map_err(|e| Failure::Usage(format!("cannot produce: {e}")))?;
    let rt = runtime_for_async()?;
    let mut ids = FreshIds::new();
    let mut delivered = 0usize;
    let result = rt.block_on(async {
        let (tx, mut rx) = mpsc::channel::<Line>(BATCH);
        // Reading standard input blocks; a thread of its own keeps it off the runtime.
        std::thread::spawn(move || read_lines(&tx));
        while let Some(first) = rx.recv().await {
            let mut lines = vec![first];
            while lines.len() < BATCH {
                match rx.try_recv() {
                    Ok(line) => lines.push(line),
                    Err(_) => break,
                }
            }
            let mut batch: Vec<Message<Value>> = Vec::with_capacity(lines.len());
            let mut stop = None;
            for line in lines {
                match line {
                    Line::Json(value) => {
                        let id =
                            id_of(&value, args.id_field.as_deref()).unwrap_or_else(|| ids.next());
                        batch.push(Message::new(id, value));
                    }
                    Line::Bad(why) => {
                        stop = Some(Failure::Runtime(why));
                        break;
                    }
                }
            }
            if !batch.is_empty() {
                match producer.produce_batch(&args.topic, &batch).await {
                    Ok(_) => delivered += batch.len(),
                    Err(e) => {
                        if let Error::Produce(p) = &e {
                            delivered += p.deliveries.iter().flatten().count();
                        }
                        return Err(runtime(format!("producing to {:?}", args.topic), e));
                    }
                }
            }
            if let Some(stop) = stop {
                return Err(stop);
            }
        }
        producer
            .close()
            .await
            .map_err(|e| runtime("flushing the producer", e))
    });
    note(format_args!(
        "delivered {delivered} records to {}",
        args.topic
    ));
    result
}

/// Sends each non-blank line of standard input, parsed, then stops at the
/// first line that cannot be read or parsed.
fn read_lines(tx: &mpsc::Sender<Line>) {
    let mut stdin = std::io::stdin().lock();
    let mut buffer = Vec::new();
    let mut number = 0u64;
    loop {
        buffer.clear();
        number += 1;
        let line = match stdin.read_until(b'\n', &mut buffer) {
            Ok(0) => return,
            Ok(_) => match std::str::from_utf8(&buffer) {
                Ok(text) if text.trim().is_empty() => continue,
                Ok(text) => match serde_json::from_str::<Value>(text) {
                    Ok(value) => Line::Json(value),
                    Err(e) => Line::Bad(format!("line {number} is not JSON: {e}")),
                },
                Err(_) => Line::Bad(format!("line {number} is not UTF-8 text")),
            },
            Err(e) => Line::Bad(format!("cannot read standard input at line {number}: {e}")),
        };
        let stop = matches!(line, Line::Bad(_));
        // A closed channel means the producer stopped: nothing more to read.
        if tx.blocking_send(line).is_err() || stop {
            return;
        }
    }
}

/// The id from `field` of a JSON object: a non-empty string, or a number as
/// written. Anything else (missing, null, an object) gets a fresh id.
fn id_of(value: &Value, field: Option<&str>) -> Option<String> {
    match value.get(field?)? {
        Value::String(s) if !s.is_empty() => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// Fresh ids, unique across runs without a UUID dependency: the start time in
/// nanoseconds and the process id, then a counter (`18f3a9c0b2d4e000-1f2a-7`).
struct FreshIds {
    prefix: String,
    next: u64,
}

impl FreshIds {
    fn new() -> FreshIds {
        let nanos = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        FreshIds {
            prefix: format!("{nanos:x}-{:x}", std::process::id()),
            next: 0,
        }
    }

    fn next(&mut self) -> String {
        self.next += 1;
        format!("{}-{}", self.prefix, self.next)
    }
}
