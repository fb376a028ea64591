//! What every subcommand shares: the settings, a quiet rdkafka client, the
//! up-front reachability check, topic lookup, the errors and their exit codes,
//! and writing to a standard output that may be closed.

use std::fmt;
use std::io::Write;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use kafka_batch::Settings;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{BaseConsumer, ConsumerContext};
use rdkafka::error::KafkaError;
use rdkafka::metadata::Metadata;
use rdkafka::{ClientConfig, ClientContext};

/// Exit code of a runtime failure.
pub const EXIT_FAILURE: u8 = 1;
/// Exit code of a usage error (clap's own) or settings that cannot work.
pub const EXIT_USAGE: u8 = 2;
/// Exit code when the brokers cannot be reached.
pub const EXIT_UNREACHABLE: u8 = 3;
/// Exit code when a topic or partition does not exist.
pub const EXIT_NOT_FOUND: u8 = 4;

/// Why a subcommand stopped before finishing its work.
#[derive(Debug)]
pub enum Failure {
    /// Bad arguments or settings: running again unchanged cannot help.
    Usage(String),
    /// Anything that went wrong at run time.
    Runtime(String),
    /// The brokers did not answer within the timeout.
    Unreachable(String),
    /// A topic or partition that does not exist.
    NotFound(String),
    /// Standard output was closed (`| head`): stop quietly, it is not an error.
    Closed,
}

impl Failure {
    /// The process exit code documented in `--help` and the README.
    pub fn code(&self) -> u8 {
        match self {
            Failure::Usage(_) => EXIT_USAGE,
            Failure::Runtime(_) => EXIT_FAILURE,
            Failure::Unreachable(_) => EXIT_UNREACHABLE,
            Failure::NotFound(_) => EXIT_NOT_FOUND,
            Failure::Closed => 0,
        }
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::Usage(m)
            | Failure::Runtime(m)
            | Failure::Unreachable(m)
            | Failure::NotFound(m) => f.write_str(m),
            Failure::Closed => f.write_str("standard output was closed"),
        }
    }
}

/// A runtime failure: `what` failed because of `error`.
pub fn runtime(what: impl fmt::Display, error: impl fmt::Display) -> Failure {
    Failure::Runtime(format!("{what}: {error}"))
}

/// The settings, resolved for this run.
pub struct Env {
    /// `Settings::load()` with `--bootstrap-servers` over it.
    pub settings: Settings,
    /// The brokers every client of this run talks to.
    pub bootstrap: String,
    /// How long to wait for the brokers to answer a request.
    pub timeout: Duration,
}

impl Env {
    /// Loads the library's settings (TOML file, `KAFKA_BATCH_*` env), with
    /// `bootstrap` (from `--bootstrap-servers`) over every bootstrap setting.
    pub fn load(bootstrap: Option<&str>, timeout_secs: u64) -> Result<Env, Failure> {
        let mut figment = Settings::figment();
        if let Some(servers) = bootstrap {
            // All three: a file may name separate brokers for each client,
            // and the command line must win over all of them.
            figment = figment
                .merge(("bootstrap_servers", servers))
                .merge(("consumer.bootstrap_servers", servers))
                .merge(("producer.bootstrap_servers", servers));
        }
        let settings = Settings::from_figment(figment)
            .map_err(|e| Failure::Usage(format!("invalid settings: {e}")))?;
        let servers = settings.consumer.bootstrap_servers.trim().to_owned();
        if servers.is_empty() {
            return Err(Failure::Usage(
                "no brokers: give --bootstrap-servers HOST:PORT, set KAFKA_BATCH_BOOTSTRAP_SERVERS, \
                 or set bootstrap_servers in the settings file"
                    .into(),
            ));
        }
        Ok(Env {
            settings,
            bootstrap: servers,
            timeout: Duration::from_secs(timeout_secs.max(1)),
        })
    }

    /// A consumer outside any group subscription (only `assign`, committed
    /// offsets and metadata are used), with `group_id` for offset lookups.
    pub fn consumer(&self, group_id: &str, partition_eof: bool) -> Result<Client, Failure> {
        let mut config = ClientConfig::new();
        for (k, v) in self.settings.consumer.kafka.iter() {
            config.set(k, v);
        }
        config
            .set("bootstrap.servers", &self.bootstrap)
            .set("group.id", group_id)
            // Never commit: these commands only look.
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set(
                "enable.partition.eof",
                if partition_eof { "true" } else { "false" },
            )
            // Fail a connection attempt quickly, so the reachability check
            // can report why within its timeout.
            .set(
                "socket.connection.setup.timeout.ms",
                self.timeout.as_millis().to_string(),
            )
            // librdkafka formats no log lines at all; its errors reach the
            // Quiet context, which keeps the last one for our message.
            .set_log_level(RDKafkaLogLevel::Emerg);
        config
            .create_with_context(Quiet::default())
            .map_err(|e| Failure::Usage(format!("cannot create the Kafka client: {e}")))
    }
}

/// A client context that prints nothing: a broker that cannot be reached
/// must be one clear line from us, not a librdkafka log storm. It keeps the
/// last error librdkafka reported, to say why.
#[derive(Default)]
pub struct Quiet {
    last_error: Mutex<Option<String>>,
}

impl Quiet {
    fn last_error(&self) -> Option<String> {
        self.last_error
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

impl ClientContext for Quiet {
    fn log(&self, _level: RDKafkaLogLevel, _fac: &str, _message: &str) {}

    fn error(&self, error: KafkaError, reason: &str) {
        let text = if reason.is_empty() {
            error.to_string()
        } else {
            reason.to_owned()
        };
        *self
            .last_error
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(text);
    }
}

impl ConsumerContext for Quiet {}

/// The consumer every read-only subcommand uses.
pub type Client = BaseConsumer<Quiet>;

/// The cluster's metadata for every topic: the reachability check, done up
/// front so that a broker that is down is one error line with its own exit
/// code, and the list of topics (asking for every topic never creates one,
/// where asking for a named topic may auto-create it).
pub fn metadata(env: &Env, client: &Client) -> Result<Metadata, Failure> {
    use rdkafka::consumer::Consumer as _;
    client.fetch_metadata(None, env.timeout).map_err(|e| {
        // Serve the queued events, so the context sees the connection errors.
        let _ = client.poll(Duration::ZERO);
        let why = client
            .context()
            .last_error()
            .unwrap_or_else(|| e.to_string());
        Failure::Unreachable(format!(
            "cannot reach the brokers at {} within {} s: {why}",
            env.bootstrap,
            env.timeout.as_secs()
        ))
    })
}

/// The partitions of `topic`, or a NotFound failure naming it.
pub fn partitions(env: &Env, metadata: &Metadata, topic: &str) -> Result<Vec<i32>, Failure> {
    let partitions: Vec<i32> = metadata
        .topics()
        .iter()
        .filter(|t| t.name() == topic && t.error().is_none())
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect();
    if partitions.is_empty() {
        return Err(Failure::NotFound(format!(
            "topic {topic:?} does not exist on {}",
            env.bootstrap
        )));
    }
    Ok(partitions)
}

/// `partitions`, or only `only` when given (a NotFound failure when the topic
/// has no such partition).
pub fn select_partition(
    topic: &str,
    partitions: Vec<i32>,
    only: Option<i32>,
) -> Result<Vec<i32>, Failure> {
    match only {
        None => Ok(partitions),
        Some(p) if partitions.contains(&p) => Ok(vec![p]),
        Some(p) => Err(Failure::NotFound(format!(
            "topic {topic:?} has no partition {p} (it has {})",
            partitions.len()
        ))),
    }
}

/// Standard output, line by line, where a closed pipe ends the command
/// quietly: Rust ignores SIGPIPE, so a write to a closed pipe returns
/// `BrokenPipe`, which becomes [`Failure::Closed`] (exit 0, no message).
pub struct Out {
    stdout: std::io::StdoutLock<'static>,
}

impl Out {
    /// Standard output (line buffered, so each line is out when written).
    pub fn new() -> Out {
        Out {
            stdout: std::io::stdout().lock(),
        }
    }

    /// Writes one line.
    pub fn line(&mut self, text: impl fmt::Display) -> Result<(), Failure> {
        writeln!(self.stdout, "{text}").map_err(write_failure)
    }

    /// Flushes what was written (for output not ending in a newline yet).
    pub fn flush(&mut self) -> Result<(), Failure> {
        self.stdout.flush().map_err(write_failure)
    }
}

fn write_failure(e: std::io::Error) -> Failure {
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        Failure::Closed
    } else {
        runtime("cannot write to standard output", e)
    }
}

/// A line on standard error (progress, summaries). Not `eprintln!`, which
/// panics when standard error is closed.
pub fn note(text: impl fmt::Display) {
    let _ = writeln!(std::io::stderr(), "{text}");
}

/// Bytes as text a terminal and a script can take: printable ASCII as is,
/// everything else escaped (`\xNN`, `\n`, `\"`), in double quotes; `null`
/// for no bytes at all. Exact, unlike a lossy UTF-8 conversion.
pub fn escape_bytes(bytes: Option<&[u8]>) -> String {
    let Some(bytes) = bytes else {
        return "null".into();
    };
    let mut out = String::with_capacity(bytes.len() + 2);
    out.push('"');
    for b in bytes {
        out.extend(std::ascii::escape_default(*b).map(char::from));
    }
    out.push('"');
    out
}

/// A runtime to run the library's async calls on (produce, replay, signals).
pub fn runtime_for_async() -> Result<tokio::runtime::Runtime, Failure> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| runtime("cannot start the async runtime", e))
}
