//! `kafka-batch broker`: the embedded broker as a dev server.

use kafka_batch::testing::EmbeddedBroker;

use crate::client::{note, runtime, runtime_for_async, Failure, Out};

/// Runs librdkafka's mock cluster on loopback until SIGINT or SIGTERM.
///
/// The first line of standard output is the bootstrap address alone
/// (`127.0.0.1:PORT`), so a script can read it; everything else goes to
/// standard error. Topics not created here are made on first use with the
/// mock cluster's default partition count. The mock cluster keeps about
/// 5 MiB per partition and silently drops older data.
#[derive(clap::Args)]
#[command(after_help = concat!(
    "Example:\n  kafka-batch broker events:4 events.dead:1 > addr &\n  \
    kafka-batch --bootstrap-servers \"$(head -1 addr)\" tail events --follow\n\n",
    exit_codes!()
))]
pub struct Args {
    /// Topics to create, as NAME:PARTITIONS (e.g. events:16).
    #[arg(value_name = "TOPIC:PARTITIONS", value_parser = parse_topic)]
    topics: Vec<(String, i32)>,
    /// Number of brokers in the cluster (ids 1 to N).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(i32).range(1..=16))]
    brokers: i32,
}

fn parse_topic(arg: &str) -> Result<(String, i32), String> {
    let (name, partitions) = arg
        .rsplit_once(':')
        .ok_or_else(|| format!("{arg:?}: write topics as NAME:PARTITIONS"))?;
    let partitions: i32 = partitions
        .parse()
        .map_err(|_| format!("{arg:?}: the partition count must be a number"))?;
    if name.is_empty() || partitions < 1 {
        return Err(format!(
            "{arg:?}: a topic needs a name and at least one partition"
        ));
    }
    Ok((name.to_owned(), partitions))
}

pub fn run(args: &Args) -> Result<(), Failure> {
    let broker = EmbeddedBroker::start_with_brokers(args.brokers)
        .map_err(|e| runtime("cannot start the embedded broker", e))?;
    for (topic, partitions) in &args.topics {
        broker
            .create_topic(topic, *partitions)
            .map_err(|e| runtime(format!("cannot create topic {topic:?}"), e))?;
        note(format_args!(
            "created topic {topic} with {partitions} partitions"
        ));
    }
    let rt = runtime_for_async()?;
    rt.block_on(async {
        use tokio::signal::unix::{signal, SignalKind};
        // Handlers first, address second: a script may signal as soon as it
        // has read the address, and must not meet the default action.
        let mut interrupt =
            signal(SignalKind::interrupt()).map_err(|e| runtime("cannot wait for SIGINT", e))?;
        let mut terminate =
            signal(SignalKind::terminate()).map_err(|e| runtime("cannot wait for SIGTERM", e))?;
        let mut out = Out::new();
        out.line(broker.bootstrap_servers())?;
        out.flush()?;
        note("serving until Ctrl-C or SIGTERM");
        tokio::select! {
            _ = interrupt.recv() => {}
            _ = terminate.recv() => {}
        }
        Ok::<(), Failure>(())
    })?;
    note("stopping the embedded broker");
    drop(broker);
    Ok(())
}
