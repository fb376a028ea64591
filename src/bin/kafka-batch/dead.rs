//! `kafka-batch dead list` and `dead replay`: a dead-letter topic's records
//! with their failure headers, and replaying them, through the library's
//! `kafka_batch::replay::Replay`.

use kafka_batch::failure::FailureInfo;
use kafka_batch::replay::{DeadLetter, Replay};

use crate::client::{
    escape_bytes, metadata, partitions, runtime, runtime_for_async, select_partition, Env, Failure,
    Out,
};

#[derive(clap::Subcommand)]
pub enum Command {
    /// One line per record: its coordinates, key, and what its failure
    /// headers say (source topic:partition:offset, attempts, reason,
    /// failed-at time, error).
    #[command(after_help = concat!(
        "Example:\n  kafka-batch dead list events.dead --partition 0 --from 100 --until 200\n\n",
        exit_codes!()
    ))]
    List(Select),
    /// Produce the records back to the topic each came from (its
    /// source-topic header) or to --to, unchanged but without kafka-batch's
    /// failure headers. Replaying twice produces the records twice.
    #[command(after_help = concat!(
        "Examples:\n  kafka-batch dead replay events.dead --dry-run\n  \
        kafka-batch dead replay events.dead --partition 0 --from 100 --until 200 --to events\n\n",
        exit_codes!()
    ))]
    Replay {
        #[command(flatten)]
        select: Select,
        /// Produce every record to this topic instead of its source topic.
        #[arg(long, value_name = "TOPIC")]
        to: Option<String>,
        /// List what would be replayed, and where to; write nothing.
        #[arg(long)]
        dry_run: bool,
    },
}

/// Which records of the dead-letter topic.
#[derive(clap::Args)]
pub struct Select {
    /// The dead-letter topic.
    topic: String,
    /// Only this partition of it.
    #[arg(long, value_name = "P")]
    partition: Option<i32>,
    /// From this offset (in the dead-letter topic) on.
    #[arg(long, value_name = "OFFSET", default_value_t = 0)]
    from: i64,
    /// Up to this offset, not included (default: the end it has now).
    #[arg(long, value_name = "OFFSET")]
    until: Option<i64>,
}

pub fn run(env: &Env, command: &Command) -> Result<(), Failure> {
    match command {
        Command::List(select) => {
            let replay = replay_of(env, select, None)?;
            let letters = replay
                .read()
                .map_err(|e| runtime(format!("cannot read {:?}", select.topic), e))?;
            let mut out = Out::new();
            for letter in &letters {
                out.line(describe(&select.topic, letter))?;
            }
            crate::client::note(format_args!("{} dead letters", letters.len()));
            Ok(())
        }
        Command::Replay {
            select,
            to,
            dry_run: true,
        } => {
            let replay = replay_of(env, select, to.as_deref())?;
            let letters = replay
                .read()
                .map_err(|e| runtime(format!("cannot read {:?}", select.topic), e))?;
            let mut out = Out::new();
            let mut would = 0;
            for letter in &letters {
                match to.as_deref().or(letter.info.source_topic.as_deref()) {
                    Some(destination) => {
                        would += 1;
                        out.line(format_args!(
                            "would replay to {destination}: {}",
                            describe(&select.topic, letter)
                        ))?;
                    }
                    None => out.line(format_args!(
                        "would leave out (no source-topic header, give --to): {}",
                        describe(&select.topic, letter)
                    ))?,
                }
            }
            crate::client::note(format_args!(
                "dry run: would replay {would} of {} records; nothing was written",
                letters.len()
            ));
            Ok(())
        }
        Command::Replay {
            select,
            to,
            dry_run: false,
        } => {
            let replay = replay_of(env, select, to.as_deref())?;
            let report = runtime_for_async()?
                .block_on(replay.run())
                .map_err(|e| runtime(format!("replaying {:?}", select.topic), e))?;
            let mut out = Out::new();
            let by_topic: Vec<String> = report
                .by_topic
                .iter()
                .map(|(topic, n)| format!("{topic}={n}"))
                .collect();
            out.line(format_args!(
                "replayed {} records ({})",
                report.replayed,
                by_topic.join(", ")
            ))?;
            if report.without_source > 0 {
                out.line(format_args!(
                    "left out {} records without a source-topic header (give --to)",
                    report.without_source
                ))?;
            }
            let next: Vec<String> = report
                .next_offsets
                .iter()
                .map(|(p, o)| format!("{p}={o}"))
                .collect();
            out.line(format_args!(
                "next offsets (--from for a later replay): {}",
                next.join(", ")
            ))
        }
    }
}

/// The library's Replay for this selection, after checking up front that
/// the brokers answer and that the topic and partition exist.
fn replay_of(env: &Env, select: &Select, to: Option<&str>) -> Result<Replay, Failure> {
    if let Some(until) = select.until.filter(|until| *until <= select.from) {
        return Err(Failure::Usage(format!(
            "--until ({until}) must be above --from ({})",
            select.from
        )));
    }
    let client = env.consumer("kafka-batch-dead", false)?;
    let metadata = metadata(env, &client)?;
    let all = partitions(env, &metadata, &select.topic)?;
    select_partition(&select.topic, all, select.partition)?;
    if let Some(to) = to {
        // Replaying into a topic that does not exist would create it on a
        // broker that auto-creates topics, or fail record by record.
        partitions(env, &metadata, to)?;
    }
    let mut replay = Replay::new(&env.bootstrap, &select.topic)
        .kafka(&env.settings.kafka)
        .offsets(select.from..select.until.unwrap_or(i64::MAX));
    if let Some(p) = select.partition {
        replay = replay.partition(p);
    }
    if let Some(to) = to {
        replay = replay.to_topic(to);
    }
    Ok(replay)
}

/// `dead:partition:offset key=".." source=t:p:o attempts=N reason=.. failed_at=.. error=".."`
fn describe(topic: &str, letter: &DeadLetter) -> String {
    let info: &FailureInfo = &letter.info;
    let source = match info.source() {
        Some((t, p, o)) => format!("{t}:{p}:{o}"),
        None => "-".into(),
    };
    format!(
        "{topic}:{}:{} key={} source={source} attempts={} reason={} failed_at={} error={}",
        letter.partition,
        letter.offset,
        escape_bytes(letter.key.as_deref()),
        info.attempts,
        info.reason.as_deref().unwrap_or("-"),
        info.failed_at.as_deref().unwrap_or("-"),
        info.error
            .as_deref()
            .map_or_else(|| "-".to_owned(), |e| format!("{e:?}")),
    )
}
