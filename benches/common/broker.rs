//! The embedded broker in a child process of the bench itself, so that its
//! CPU is not counted as the consumer's.

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, Stdio};

use anyhow::Context;
use kafka_batch::testing::EmbeddedBroker;

/// When this process is the broker child (`BENCH_SERVE_BROKER` set): serves
/// the topics of `BENCH_TOPICS` with `BENCH_PARTITIONS` partitions (default
/// 64; a topic written `name:n` gets `n`), prints the bootstrap address and
/// runs until its stdin closes. Returns `false` in the bench process itself.
pub fn serve_if_child() -> anyhow::Result<bool> {
    if std::env::var_os("BENCH_SERVE_BROKER").is_none() {
        return Ok(false);
    }
    let partitions: i32 = std::env::var("BENCH_PARTITIONS")
        .ok()
        .and_then(|p| p.parse().ok())
        .unwrap_or(64);
    let broker = EmbeddedBroker::start()?;
    for topic in std::env::var("BENCH_TOPICS")
        .unwrap_or_default()
        .split(',')
        .filter(|t| !t.is_empty())
    {
        match topic.split_once(':') {
            Some((name, n)) => broker.create_topic(name, n.parse().context("partitions")?)?,
            None => broker.create_topic(topic, partitions)?,
        }
    }
    println!("{}", broker.bootstrap_servers());
    let _ = std::io::stdin().read_to_end(&mut Vec::new());
    Ok(true)
}

/// Starts the broker child with `topics`; returns its bootstrap address and
/// the child (it stops when the child's stdin closes, with the `Child`).
pub fn start(topics: &[&str]) -> anyhow::Result<(String, Child)> {
    let mut child = Command::new(std::env::current_exe()?)
        .env("BENCH_SERVE_BROKER", "1")
        .env("BENCH_TOPICS", topics.join(","))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()?;
    let stdout = child.stdout.take().context("broker stdout")?;
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line)?;
    Ok((line.trim().to_owned(), child))
}
