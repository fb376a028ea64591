//! The Prometheus endpoint, scraped over HTTP while a consumer runs on the
//! embedded broker. One test in its own binary: the endpoint installs the
//! process's global metrics recorder.
#![cfg(feature = "prometheus")]

mod common;

use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use kafka_batch::{Consumer, Error, Message};

const SERVICE: &str = "prom-test";
const TOPIC: &str = "scraped";

/// One sample of the text format: `name{label="value",...} value`.
#[derive(Debug)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// A loopback address with a port that was free a moment ago.
fn free_addr() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").expect("a free port");
    listener.local_addr().expect("its address")
}

/// `GET /metrics` with an HTTP client, as Prometheus would: the body of a
/// 200 response.
fn scrape(addr: SocketAddr) -> String {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(10)))
        .build()
        .into();
    let mut response = agent
        .get(&format!("http://{addr}/metrics"))
        .call()
        .expect("GET /metrics answers");
    assert_eq!(response.status(), 200);
    response.body_mut().read_to_string().expect("a text body")
}

fn parse(text: &str) -> Vec<Sample> {
    text.lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|line| {
            let (series, value) = line.rsplit_once(' ').expect("series and value");
            let value = value.parse().expect("a number");
            let (name, labels) = match series.split_once('{') {
                None => (series, BTreeMap::new()),
                Some((name, labels)) => {
                    let labels = labels
                        .trim_end_matches('}')
                        .split("\",")
                        .filter(|l| !l.is_empty())
                        .map(|l| {
                            let (k, v) = l.split_once('=').expect("label=value");
                            (k.to_owned(), v.trim_matches('"').to_owned())
                        })
                        .collect();
                    (name, labels)
                }
            };
            Sample {
                name: name.to_owned(),
                labels,
                value,
            }
        })
        .collect()
}

/// The value of the series `name` whose labels include `labels`.
fn value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    samples
        .iter()
        .find(|s| {
            s.name == name
                && labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|s| s.value)
}

/// Scrapes until `condition` holds; panics with the last scrape after `limit`.
fn scrape_until(
    addr: SocketAddr,
    what: &str,
    limit: Duration,
    condition: impl Fn(&[Sample]) -> bool,
) -> Vec<Sample> {
    let deadline = Instant::now() + limit;
    loop {
        let text = scrape(addr);
        let samples = parse(&text);
        if condition(&samples) {
            return samples;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting until {what}; last scrape:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn lag(samples: &[Sample]) -> Option<f64> {
    value(
        samples,
        "kafka_batch_lag",
        &[("service", SERVICE), ("topic", TOPIC), ("partition", "0")],
    )
}

fn in_flight(samples: &[Sample]) -> (Option<f64>, Option<f64>) {
    let svc = [("service", SERVICE)];
    (
        value(samples, "kafka_batch_in_flight_batches", &svc),
        value(samples, "kafka_batch_in_flight_records", &svc),
    )
}

/// What the scraper sees while the second batch is held in the handler,
/// and after it is let go.
fn scrape_through_the_run(addr: SocketAddr, release: &AtomicBool) {
    let limit = Duration::from_secs(60);
    // The first batch (0..5) is committed; the second (5..10) waits in the
    // handler until the lag was seen.
    let held = scrape_until(addr, "lag is seen while a batch waits", limit, |s| {
        lag(s).is_some_and(|l| l > 0.0) && in_flight(s) == (Some(1.0), Some(5.0))
    });
    assert_eq!(lag(&held), Some(5.0), "log end 10 minus committed 5");
    for s in held.iter().filter(|s| s.name == "kafka_batch_lag") {
        let keys: Vec<&str> = s.labels.keys().map(String::as_str).collect();
        assert_eq!(keys, ["partition", "service", "topic"], "{s:?}");
    }
    let svc = [("service", SERVICE)];
    // The first batch was timed under both names, and committed.
    assert_eq!(
        value(&held, "kafka_batch_handler_seconds_count", &svc),
        Some(1.0)
    );
    assert_eq!(
        value(&held, "prom_test_kafka_process_seconds_count", &[]),
        Some(1.0)
    );
    assert!(value(&held, "kafka_batch_commits_total", &svc).is_some_and(|c| c >= 1.0));
    assert!(value(&held, "kafka_batch_librdkafka_replyq", &svc).is_some());
    assert_eq!(
        value(&held, "kafka_batch_paused", &svc).map(|_| ()),
        Some(())
    );
    assert!(
        held.iter().any(
            |s| s.name == "kafka_batch_librdkafka_broker_rtt_avg_seconds"
                && s.labels.contains_key("broker")
        ),
        "{held:?}"
    );
    let partition = [("topic", TOPIC), ("partition", "0"), ("service", SERVICE)];
    assert!(value(&held, "kafka_batch_librdkafka_fetchq_messages", &partition).is_some());

    release.store(true, Ordering::Release);
    scrape_until(
        addr,
        "the lag falls to 0 once everything is committed",
        limit,
        |s| lag(s) == Some(0.0) && in_flight(s) == (Some(0.0), Some(0.0)),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_endpoint_serves_lag_in_flight_and_librdkafka_figures_while_the_consumer_runs() {
    let broker = broker_with(TOPIC, 1);
    produce_numbered(&broker, TOPIC, 0..10).await;
    let addr = free_addr();
    // Batches cut on size only: 0..5 and 5..10.
    let mut settings = consumer_settings(&broker, "g", TOPIC, 5, 10_000);
    settings.service = SERVICE.into();
    settings.metrics.prometheus_listen = addr.to_string();
    settings.metrics.librdkafka_statistics = true;
    settings.kafka.set("statistics.interval.ms", "200");

    // A port taken: a clear error naming the setting, and nothing installed.
    let taken = TcpListener::bind("127.0.0.1:0").expect("a port to hold");
    let mut refused = settings.clone();
    refused.metrics.prometheus_listen = taken.local_addr().expect("its address").to_string();
    let error = Consumer::new(&refused)
        .expect_err("the port is taken")
        .to_string();
    assert!(
        error.contains("metrics.prometheus_listen") && error.contains("cannot listen"),
        "{error}"
    );

    let consumer = Consumer::new(&settings).expect("the consumer, and its endpoint");
    // Once per process: the same address again is fine, a second endpoint is not.
    drop(Consumer::new(&settings).expect("a second consumer on the same endpoint"));
    let again = kafka_batch::metrics::serve_prometheus(addr)
        .expect_err("a second endpoint")
        .to_string();
    assert!(again.contains("already serves"), "{again}");
    let elsewhere = Consumer::new(&refused)
        .expect_err("one endpoint per process")
        .to_string();
    assert!(
        elsewhere.contains("metrics.prometheus_listen") && elsewhere.contains("already serves"),
        "{elsewhere}"
    );
    drop(taken);

    let handle = consumer.handle();
    let release = Arc::new(AtomicBool::new(false));
    let handled = AtomicUsize::new(0);
    let scraper = {
        let release = Arc::clone(&release);
        let handle = handle.clone();
        async move {
            let scraping = Arc::clone(&release);
            let scraped =
                tokio::task::spawn_blocking(move || scrape_through_the_run(addr, &scraping)).await;
            // Whatever the scraper found, the held batch is let go and the
            // consumer stops, so that a failed check reports itself.
            release.store(true, Ordering::Release);
            handle.shutdown();
            scraped
        }
    };
    let handler = async |batch: Vec<Message>| {
        if batch.iter().any(|m| n_of(m) >= 5) {
            while !release.load(Ordering::Acquire) {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        handled.fetch_add(batch.len(), Ordering::Relaxed);
        Ok::<_, Error>(())
    };
    let (processed, scraped) = within(Duration::from_secs(120), async {
        tokio::join!(consumer.process(handler), scraper)
    })
    .await;
    if let Err(e) = scraped {
        std::panic::resume_unwind(e.into_panic());
    }
    processed.expect("process returns Ok after shutdown");
    assert_eq!(handled.load(Ordering::Relaxed), 10);
    assert_eq!(committed(&broker, "g", TOPIC).await[&0], 10);
}
