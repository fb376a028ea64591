//! `kafka-batch lag`: a group's committed offsets against the log ends.
//!
//! Asking for committed offsets is an OffsetFetch to the group coordinator;
//! it neither joins the group nor disturbs its members.

use std::time::Duration;

use rdkafka::consumer::Consumer as _;
use rdkafka::{Offset, TopicPartitionList};
use time::OffsetDateTime;

use crate::client::{metadata, partitions, runtime, Client, Env, Failure, Out};

/// Per partition: the committed offset, the log end (high watermark) and
/// the lag (log end minus committed), then the totals.
#[derive(clap::Args)]
#[command(after_help = concat!(r#"Without TOPIC, the topics are found by listing every topic of the cluster
(metadata, internal topics starting with "__" left out) and asking the group
coordinator for the group's committed offsets on all their partitions; the
topics where the group has committed at least one offset are shown.

A partition the group never committed shows `-` as its committed offset and
lag, and counts in no total (where the group would start there depends on its
auto.offset.reset).

Examples:
  kafka-batch lag enricher events
  kafka-batch lag enricher --watch --interval 5

"#,
    exit_codes!()
))]
pub struct Args {
    /// The consumer group.
    group: String,
    /// Only this topic (default: every topic the group has committed offsets for).
    topic: Option<String>,
    /// Print the table again every --interval seconds, until interrupted.
    #[arg(long)]
    watch: bool,
    /// Seconds between two tables with --watch.
    #[arg(long, value_name = "SECS", default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..))]
    interval: u64,
}

/// One partition's row.
struct Row {
    topic: String,
    partition: i32,
    committed: Option<i64>,
    log_end: i64,
}

pub fn run(env: &Env, args: &Args) -> Result<(), Failure> {
    // group.id is the group asked about; this client never subscribes, so it never joins it.
    let client = env.consumer(&args.group, false)?;
    let mut out = Out::new();
    loop {
        let rows = rows(env, &client, args)?;
        if args.watch {
            let now = OffsetDateTime::now_utc();
            out.line(format_args!(
                "# group {} at {}",
                args.group,
                kafka_batch::envelope::format_dt(now)
            ))?;
        }
        print_table(&mut out, &rows)?;
        if rows.iter().all(|r| r.committed.is_none()) {
            crate::client::note(format_args!(
                "group {:?} has no committed offsets{}",
                args.group,
                args.topic
                    .as_deref()
                    .map_or(String::new(), |t| format!(" on {t:?}"))
            ));
        }
        if !args.watch {
            return Ok(());
        }
        out.line("")?;
        std::thread::sleep(Duration::from_secs(args.interval));
    }
}

fn rows(env: &Env, client: &Client, args: &Args) -> Result<Vec<Row>, Failure> {
    let metadata = metadata(env, client)?;
    let topics: Vec<(String, Vec<i32>)> = match &args.topic {
        Some(topic) => vec![(topic.clone(), partitions(env, &metadata, topic)?)],
        None => metadata
            .topics()
            .iter()
            .filter(|t| !t.name().starts_with("__") && t.error().is_none())
            .map(|t| {
                let ids = t.partitions().iter().map(|p| p.id()).collect();
                (t.name().to_owned(), ids)
            })
            .collect(),
    };
    let mut tpl = TopicPartitionList::new();
    for (topic, partitions) in &topics {
        for &p in partitions {
            tpl.add_partition(topic, p);
        }
    }
    if tpl.count() == 0 {
        return Ok(Vec::new());
    }
    let committed = client.committed_offsets(tpl, env.timeout).map_err(|e| {
        runtime(
            format!("cannot read the commits of group {:?}", args.group),
            e,
        )
    })?;
    let mut rows = Vec::new();
    for (topic, partitions) in &topics {
        let offsets: Vec<(i32, Option<i64>)> = partitions
            .iter()
            .map(|&p| {
                let offset = committed
                    .find_partition(topic, p)
                    .and_then(|e| match e.offset() {
                        Offset::Offset(o) => Some(o),
                        _ => None,
                    });
                (p, offset)
            })
            .collect();
        // Without TOPIC, only topics the group has committed offsets for.
        if args.topic.is_none() && offsets.iter().all(|(_, o)| o.is_none()) {
            continue;
        }
        for (partition, committed) in offsets {
            let (_, log_end) = client
                .fetch_watermarks(topic, partition, env.timeout)
                .map_err(|e| {
                    runtime(format!("cannot read the log end of {topic}:{partition}"), e)
                })?;
            rows.push(Row {
                topic: topic.clone(),
                partition,
                committed,
                log_end,
            });
        }
    }
    rows.sort_by(|a, b| (&a.topic, a.partition).cmp(&(&b.topic, b.partition)));
    Ok(rows)
}

fn print_table(out: &mut Out, rows: &[Row]) -> Result<(), Failure> {
    let dash = || "-".to_owned();
    let mut table: Vec<[String; 5]> = vec![[
        "TOPIC".into(),
        "PARTITION".into(),
        "COMMITTED".into(),
        "LOG-END".into(),
        "LAG".into(),
    ]];
    let (mut committed_total, mut end_total, mut lag_total) = (0i64, 0i64, 0i64);
    for row in rows {
        let lag = row.committed.map(|c| (row.log_end - c).max(0));
        if let (Some(c), Some(l)) = (row.committed, lag) {
            committed_total += c;
            end_total += row.log_end;
            lag_total += l;
        }
        table.push([
            row.topic.clone(),
            row.partition.to_string(),
            row.committed.map_or_else(dash, |c| c.to_string()),
            row.log_end.to_string(),
            lag.map_or_else(dash, |l| l.to_string()),
        ]);
    }
    table.push([
        "TOTAL".into(),
        String::new(),
        committed_total.to_string(),
        end_total.to_string(),
        lag_total.to_string(),
    ]);
    let mut widths = [0usize; 5];
    for row in &table {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    for row in &table {
        let line: Vec<String> = row
            .iter()
            .zip(widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        out.line(line.join("  ").trim_end())?;
    }
    Ok(())
}
