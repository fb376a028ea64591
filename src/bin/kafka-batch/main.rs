//! `kafka-batch`: the operator command for topics of kafka-batch envelopes.
//!
//! Reads the same settings as the library (`Settings::load()`: the TOML file,
//! then `KAFKA_BATCH_*` variables), with `--bootstrap-servers` over them.
//! Each subcommand lives in a file of its own; `client.rs` holds what they share.

/// The exit codes, shown under every `--help` (a macro, so that `concat!`
/// can join it to a subcommand's examples).
macro_rules! exit_codes {
    () => {
        "Exit codes:
  0  success (also when standard output is closed early, as by `| head`)
  1  runtime failure (a read, a write or a delivery failed)
  2  usage error: bad arguments, or settings that cannot work
  3  cannot reach the brokers within --timeout
  4  the topic or partition does not exist"
    };
}

mod broker;
mod client;
mod dead;
mod lag;
mod produce;
mod tail;

use std::io::Write;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use client::{Env, Failure};

/// Inspect and feed topics of kafka-batch envelopes: tail them, see a group's
/// lag, list and replay dead letters, produce JSON lines, or run a dev broker.
///
/// Settings come from the library's settings file (config/kafka-batch.toml,
/// or the file named by KAFKA_BATCH_CONFIG) and KAFKA_BATCH_* variables;
/// --bootstrap-servers overrides the brokers they name.
#[derive(Parser)]
#[command(name = "kafka-batch", version, after_help = exit_codes!())]
struct Cli {
    /// Brokers to talk to (overrides bootstrap_servers from the settings).
    #[arg(long, global = true, value_name = "HOST:PORT[,HOST:PORT...]")]
    bootstrap_servers: Option<String>,
    /// How long to wait for the brokers to answer (seconds).
    #[arg(long, global = true, value_name = "SECS", default_value_t = 10)]
    timeout: u64,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the embedded broker (librdkafka's mock cluster) as a dev server.
    Broker(broker::Args),
    /// Print a topic's records, decoded from the envelope, one line each.
    Tail(tail::Args),
    /// Show a consumer group's committed offsets, log ends and lag.
    Lag(lag::Args),
    /// List or replay the records of a dead-letter topic.
    #[command(subcommand, after_help = exit_codes!())]
    Dead(dead::Command),
    /// Produce JSON lines from standard input, each packed into an envelope.
    Produce(produce::Args),
}

fn main() -> ExitCode {
    // Usage errors exit 2 here, with clap's message; --help and --version exit 0.
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) | Err(Failure::Closed) => ExitCode::SUCCESS,
        Err(failure) => {
            // Not eprintln!: it panics when standard error is closed.
            let _ = writeln!(std::io::stderr(), "kafka-batch: {failure}");
            ExitCode::from(failure.code())
        }
    }
}

fn run(cli: Cli) -> Result<(), Failure> {
    let env = || Env::load(cli.bootstrap_servers.as_deref(), cli.timeout);
    match &cli.command {
        // The dev broker needs no settings: it is what the settings would point at.
        Command::Broker(args) => broker::run(args),
        Command::Tail(args) => tail::run(&env()?, args),
        Command::Lag(args) => lag::run(&env()?, args),
        Command::Dead(command) => dead::run(&env()?, command),
        Command::Produce(args) => produce::run(&env()?, args),
    }
}
