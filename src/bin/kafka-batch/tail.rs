//! `kafka-batch tail`: a topic's records, decoded from the envelope.
//!
//! A plain `BaseConsumer` with `assign`: no group is joined and nothing is
//! committed, so tailing never disturbs a service's group.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use kafka_batch::envelope::{stage_latencies, unpack, RawRecord};
use kafka_batch::{History, Message, Ref};
use rdkafka::consumer::Consumer as _;
use rdkafka::error::KafkaError;
use rdkafka::message::BorrowedMessage;
use rdkafka::{Message as _, Offset, TopicPartitionList};
use serde::Serialize;
use serde_json::Value;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use crate::client::{
    escape_bytes, metadata, partitions, runtime, select_partition, Client, Env, Failure, Out,
};

/// The name the last stage of `--provenance` latencies is given: from the
/// record's packing to the moment tail printed it.
const THIS_STAGE: &str = "tail";

/// Prints records as `topic:partition:offset id payload` (payload as compact
/// JSON). A record that is not an envelope (not JSON, no `item`, a null key,
/// a tombstone) is printed as `topic:partition:offset ! key=".." value=".."
/// error: ..`, its bytes escaped.
///
/// Without --follow, tail stops at the end each partition had when it started.
/// An id holding whitespace or control characters is printed quoted.
#[derive(clap::Args)]
#[command(after_help = concat!(
    "Examples:\n  kafka-batch tail events --from -10\n  \
    kafka-batch tail events --from @2026-11-22T09:00:00Z --partition 3 --json\n  \
    kafka-batch tail events --follow --provenance | head -20\n\n",
    exit_codes!()
))]
pub struct Args {
    /// The topic to read.
    topic: String,
    /// Where to start: beginning, end, -N (the last N records of each
    /// partition) or @TIME (the first record at or after an RFC 3339 time).
    #[arg(long, default_value = "beginning", allow_hyphen_values = true, value_parser = parse_from)]
    from: From,
    /// Only this partition.
    #[arg(long, value_name = "P")]
    partition: Option<i32>,
    /// Stop after N records.
    #[arg(long, value_name = "N")]
    count: Option<u64>,
    /// Keep waiting for new records (until interrupted or --count is reached).
    #[arg(long)]
    follow: bool,
    /// One JSON object per line: topic, partition, offset, id, payload, hist
    /// (raw records: key, value, error instead of id, payload, hist).
    #[arg(long)]
    json: bool,
    /// After each record, its ref chain (each hop's service, time and
    /// topic:partition:offset) and its stage latencies.
    #[arg(long)]
    provenance: bool,
}

/// Where tail starts in each partition.
#[derive(Clone, Debug)]
enum From {
    Beginning,
    End,
    Last(i64),
    Time(OffsetDateTime),
}

fn parse_from(text: &str) -> Result<From, String> {
    match text {
        "beginning" => Ok(From::Beginning),
        "end" => Ok(From::End),
        _ if text.starts_with('-') => match text[1..].parse::<i64>() {
            Ok(n) if n >= 0 => Ok(From::Last(n)),
            _ => Err(format!("{text:?}: -N needs a number of records, e.g. -10")),
        },
        _ if text.starts_with('@') => OffsetDateTime::parse(&text[1..], &Rfc3339)
            .map(From::Time)
            .map_err(|e| {
                format!("{text:?}: @TIME needs an RFC 3339 time, e.g. @2026-11-22T09:00:00Z ({e})")
            }),
        _ => Err(format!(
            "{text:?}: expected beginning, end, -N or @TIME (RFC 3339)"
        )),
    }
}

pub fn run(env: &Env, args: &Args) -> Result<(), Failure> {
    let client = env.consumer("kafka-batch-tail", !args.follow)?;
    let metadata = metadata(env, &client)?;
    let selected = select_partition(
        &args.topic,
        partitions(env, &metadata, &args.topic)?,
        args.partition,
    )?;
    let starts = start_offsets(env, &client, &args.topic, &selected, &args.from)?;

    // Without --follow, each partition is read up to the end it has now.
    let mut ends: BTreeMap<i32, i64> = BTreeMap::new();
    let mut tpl = TopicPartitionList::new();
    for (&partition, &(start, high)) in &starts {
        if args.follow || start < high {
            tpl.add_partition_offset(&args.topic, partition, Offset::Offset(start))
                .map_err(|e| runtime("cannot build the assignment", e))?;
            ends.insert(partition, high);
        }
    }
    if tpl.count() == 0 || args.count == Some(0) {
        return Ok(());
    }
    client
        .assign(&tpl)
        .map_err(|e| runtime(format!("cannot read topic {:?}", args.topic), e))?;

    let topic: Arc<str> = Arc::from(args.topic.as_str());
    let mut out = Out::new();
    let mut printed: u64 = 0;
    while args.follow || !ends.is_empty() {
        let message = match client.poll(Duration::from_millis(200)) {
            None => continue,
            Some(Err(KafkaError::PartitionEOF(partition))) => {
                // Everything there was when the fetch answered has been read.
                ends.remove(&partition);
                continue;
            }
            Some(Err(e)) => return Err(runtime(format!("reading topic {:?}", args.topic), e)),
            Some(Ok(message)) => message,
        };
        if !args.follow {
            let Some(&end) = ends.get(&message.partition()) else {
                continue;
            };
            if message.offset() + 1 >= end {
                ends.remove(&message.partition());
            }
            if message.offset() >= end {
                continue;
            }
        }
        print_record(&mut out, args, &topic, &message)?;
        printed += 1;
        if args.count.is_some_and(|n| printed >= n) {
            break;
        }
    }
    Ok(())
}

/// Per partition, the offset to start at and the high watermark now.
fn start_offsets(
    env: &Env,
    client: &Client,
    topic: &str,
    partitions: &[i32],
    from: &From,
) -> Result<BTreeMap<i32, (i64, i64)>, Failure> {
    let mut out = BTreeMap::new();
    for &partition in partitions {
        let (low, high) = client
            .fetch_watermarks(topic, partition, env.timeout)
            .map_err(|e| runtime(format!("cannot read the offsets of {topic}:{partition}"), e))?;
        let start = match from {
            From::Beginning | From::Time(_) => low,
            From::End => high,
            From::Last(n) => high.saturating_sub(*n).max(low),
        };
        out.insert(partition, (start, high));
    }
    if let From::Time(at) = from {
        let millis = i64::try_from(at.unix_timestamp_nanos() / 1_000_000).unwrap_or(i64::MAX);
        let mut query = TopicPartitionList::new();
        for &partition in partitions {
            query
                .add_partition_offset(topic, partition, Offset::Offset(millis))
                .map_err(|e| runtime("cannot build the time query", e))?;
        }
        let found = client
            .offsets_for_times(query, env.timeout)
            .map_err(|e| runtime(format!("cannot look up offsets by time in {topic:?}"), e))?;
        for element in found.elements() {
            if let Some(entry) = out.get_mut(&element.partition()) {
                // No record at or after the time: start at the end.
                entry.0 = match element.offset() {
                    Offset::Offset(o) if o >= 0 => o,
                    _ => entry.1,
                };
            }
        }
    }
    Ok(out)
}

/// One hop of a record's provenance: who packed a record, when, and where
/// that record was.
#[derive(Serialize)]
struct Hop {
    /// 0 for the record itself, 1 for its inputs, and so on.
    depth: usize,
    svc: Option<String>,
    dt: Option<String>,
    topic: String,
    partition: i32,
    offset: i64,
}

#[derive(Serialize)]
struct Provenance {
    hops: Vec<Hop>,
    /// (service, seconds) per stage, as `kafka_batch::envelope::stage_latencies` computes them.
    stages: Vec<(String, f64)>,
    total_seconds: f64,
    /// Why the stages could not be computed (a `dt` that is not RFC 3339).
    #[serde(skip_serializing_if = "Option::is_none")]
    stages_error: Option<String>,
}

#[derive(Serialize)]
struct RecordLine<'a> {
    topic: &'a str,
    partition: i32,
    offset: i64,
    id: &'a str,
    payload: &'a Value,
    hist: Option<&'a History>,
    #[serde(skip_serializing_if = "Option::is_none")]
    provenance: Option<Provenance>,
}

#[derive(Serialize)]
struct RawLine<'a> {
    topic: &'a str,
    partition: i32,
    offset: i64,
    /// Escaped as in the text form, or null.
    key: String,
    value: String,
    error: String,
}

fn print_record(
    out: &mut Out,
    args: &Args,
    topic: &Arc<str>,
    message: &BorrowedMessage<'_>,
) -> Result<(), Failure> {
    let raw = RawRecord {
        topic,
        partition: message.partition(),
        offset: message.offset(),
        key: message.key(),
        value: message.payload(),
    };
    let decoded: Message<Value> = match unpack(raw, topic) {
        Ok(Some(decoded)) => decoded,
        Ok(None) => return print_raw(out, args, raw, "tombstone (null or empty value)"),
        Err(e) => return print_raw(out, args, raw, &e.kind.to_string()),
    };
    let coordinates = format!("{}:{}:{}", topic, raw.partition, raw.offset);
    let source = decoded.source();
    let provenance = if args.provenance {
        source.map(provenance_of)
    } else {
        None
    };
    if args.json {
        let line = RecordLine {
            topic,
            partition: raw.partition,
            offset: raw.offset,
            id: &decoded.id,
            payload: &decoded.payload,
            hist: source.and_then(|r| r.hist.as_ref()),
            provenance,
        };
        let text = serde_json::to_string(&line)
            .map_err(|e| runtime(format!("cannot write record {coordinates} as JSON"), e))?;
        return out.line(text);
    }
    // serde_json::Value always serialises: its map keys are strings.
    let payload = serde_json::to_string(&decoded.payload).unwrap_or_default();
    out.line(format_args!(
        "{coordinates} {} {payload}",
        display_id(&decoded.id)
    ))?;
    if let Some(provenance) = provenance {
        for hop in &provenance.hops {
            let indent = "  ".repeat(hop.depth + 1);
            let arrow = if hop.depth == 0 { "" } else { "<- " };
            match (&hop.svc, &hop.dt) {
                (Some(svc), Some(dt)) => out.line(format_args!(
                    "{indent}{arrow}{svc} at {dt} {}:{}:{}",
                    hop.topic, hop.partition, hop.offset
                ))?,
                _ => out.line(format_args!(
                    "{indent}{arrow}(no history) {}:{}:{}",
                    hop.topic, hop.partition, hop.offset
                ))?,
            }
        }
        match &provenance.stages_error {
            Some(e) => out.line(format_args!("  stages: unavailable: {e}"))?,
            None => {
                let stages: Vec<String> = provenance
                    .stages
                    .iter()
                    .map(|(svc, s)| format!("{svc} {s:.3} s"))
                    .collect();
                out.line(format_args!(
                    "  stages: {}; total {:.3} s",
                    if stages.is_empty() {
                        "none".to_owned()
                    } else {
                        stages.join(", ")
                    },
                    provenance.total_seconds
                ))?;
            }
        }
    }
    Ok(())
}

fn print_raw(out: &mut Out, args: &Args, raw: RawRecord<'_>, error: &str) -> Result<(), Failure> {
    let key = escape_bytes(raw.key);
    let value = escape_bytes(raw.value);
    if args.json {
        let line = RawLine {
            topic: raw.topic,
            partition: raw.partition,
            offset: raw.offset,
            key,
            value,
            error: error.to_owned(),
        };
        // Only strings and numbers: serialising cannot fail.
        return out.line(serde_json::to_string(&line).unwrap_or_default());
    }
    out.line(format_args!(
        "{}:{}:{} ! key={key} value={value} error: {error}",
        raw.topic, raw.partition, raw.offset
    ))
}

/// The id as is, or quoted when it would break the line's fields.
fn display_id(id: &str) -> String {
    if id.is_empty() || id.chars().any(|c| c.is_whitespace() || c.is_control()) {
        format!("{id:?}")
    } else {
        id.to_owned()
    }
}

/// The record's ref tree, depth first, and its stage latencies.
fn provenance_of(source: &Ref) -> Provenance {
    let mut hops = Vec::new();
    // Depth is bounded: the library drops histories 100 levels deep or more.
    let mut stack: Vec<(usize, &Ref)> = vec![(0, source)];
    while let Some((depth, r)) = stack.pop() {
        let hist = r.hist.as_deref();
        hops.push(Hop {
            depth,
            svc: hist.map(|h| h.svc.clone()),
            dt: hist.map(|h| h.dt.clone()),
            topic: r.topic.to_string(),
            partition: r.partition,
            offset: r.offset,
        });
        if let Some(h) = hist {
            stack.extend(h.refs.iter().rev().map(|input| (depth + 1, input)));
        }
    }
    let (stages, total_seconds, stages_error) =
        match stage_latencies(THIS_STAGE, source, None, OffsetDateTime::now_utc()) {
            Ok(l) => (l.stages, l.total_seconds, None),
            Err(e) => (Vec::new(), 0.0, Some(e.to_string())),
        };
    Provenance {
        hops,
        stages,
        total_seconds,
        stages_error,
    }
}
