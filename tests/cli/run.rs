//! Running the `kafka-batch` binary from the tests, and the records they start from.

use std::io::Write;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use kafka_batch::envelope::{format_dt, pack};
use kafka_batch::testing::EmbeddedBroker;
use kafka_batch::Message;
use rdkafka::consumer::{BaseConsumer, Consumer as _};
use rdkafka::ClientConfig;
use serde_json::{json, Value};
use time::OffsetDateTime;

/// Every run of the binary must end within this (a hang fails the test).
pub const LIMIT: Duration = Duration::from_secs(120);

/// What a finished run left.
pub struct Run {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    pub fn lines(&self) -> Vec<&str> {
        self.stdout.lines().collect()
    }

    pub fn stderr_lines(&self) -> Vec<&str> {
        self.stderr.lines().collect()
    }

    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }

    #[track_caller]
    pub fn assert_ok(&self) -> &Run {
        assert!(
            self.status.success(),
            "exit {:?}\nstdout:\n{}\nstderr:\n{}",
            self.status,
            self.stdout,
            self.stderr
        );
        self
    }
}

/// The command with no settings from this environment: no KAFKA_BATCH_*
/// variables, and a working directory without a config/ file.
pub fn command(args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kafka-batch"));
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("KAFKA_BATCH_") {
            cmd.env_remove(name);
        }
    }
    cmd.current_dir(env!("CARGO_TARGET_TMPDIR")).args(args);
    cmd
}

/// Runs the command with `stdin` as its input, waiting up to LIMIT.
pub fn run_with_input(args: &[&str], stdin: &str) -> Run {
    let mut child = command(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the binary starts");
    let mut input = child.stdin.take().expect("stdin piped");
    let text = stdin.to_owned();
    // A thread of its own, so a child that stops reading cannot block the test.
    let writer = std::thread::spawn(move || {
        let _ = input.write_all(text.as_bytes());
    });
    let run = finish(child);
    let _ = writer.join();
    run
}

pub fn run(args: &[&str]) -> Run {
    run_with_input(args, "")
}

/// Waits for the child (reading its outputs), killing it after LIMIT.
pub fn finish(child: Child) -> Run {
    let pid = child.id() as i32;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(LIMIT) {
        Ok(output) => {
            let output = output.expect("the child's output");
            Run {
                status: output.status,
                stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
                stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
            }
        }
        Err(_) => {
            // SAFETY: kill(2) on the pid of a child we started and still own.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            panic!("kafka-batch did not finish within {LIMIT:?}");
        }
    }
}

/// `--bootstrap-servers ADDR` then `args`.
pub fn at<'a>(broker: &'a EmbeddedBroker, args: &[&'a str]) -> Vec<&'a str> {
    let mut all = vec!["--bootstrap-servers", broker.bootstrap_servers()];
    all.extend_from_slice(args);
    all
}

/// An envelope packed by `svc`, as the library writes it.
pub fn envelope(svc: &str, message: &Message<Value>) -> Vec<u8> {
    pack(svc, &format_dt(OffsetDateTime::now_utc()), message).expect("packs")
}

/// Produces `{"n": i}` messages with ids `m{i}` to chosen partitions.
pub fn produce_to(broker: &EmbeddedBroker, topic: &str, records: &[(i32, usize)]) {
    let values: Vec<(i32, String, Vec<u8>)> = records
        .iter()
        .map(|&(p, i)| {
            let id = format!("m{i}");
            let value = envelope("test-origin", &Message::new(id.as_str(), json!({ "n": i })));
            (p, id, value)
        })
        .collect();
    let raw: Vec<_> = values
        .iter()
        .map(|(p, id, v)| (*p, Some(id.as_bytes()), Some(v.as_slice())))
        .collect();
    broker.produce_raw(topic, &raw).expect("produced");
}

/// The high watermark of each partition of `topic`.
pub fn log_ends(broker: &EmbeddedBroker, topic: &str, partitions: i32) -> Vec<i64> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", broker.bootstrap_servers())
        .create()
        .expect("client");
    (0..partitions)
        .map(|p| {
            consumer
                .fetch_watermarks(topic, p, Duration::from_secs(30))
                .expect("watermarks")
                .1
        })
        .collect()
}
