//! Metrics through the `metrics` facade and the per-batch tracing span.
//! One test per binary: both install process-wide recorders.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use kafka_batch::{Consumer, Error, Message};
use metrics_util::debugging::{DebugValue, DebuggingRecorder};
use tracing::field::{Field, Visit};
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::Layer;

/// Records the `batch` field of every `kafka_batch` span.
#[derive(Clone, Default)]
struct BatchSpans(Arc<Mutex<Vec<String>>>);

impl<S: tracing::Subscriber> Layer<S> for BatchSpans {
    fn on_new_span(
        &self,
        attrs: &tracing::span::Attributes<'_>,
        _: &tracing::span::Id,
        _: Context<'_, S>,
    ) {
        struct BatchField<'a>(&'a mut Option<String>);
        impl Visit for BatchField<'_> {
            fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
                if field.name() == "batch" {
                    *self.0 = Some(format!("{value:?}"));
                }
            }
        }
        if attrs.metadata().name() == "kafka_batch" {
            let mut batch = None;
            attrs.record(&mut BatchField(&mut batch));
            self.0.lock().unwrap().extend(batch);
        }
    }
}

/// Records each `info` event of the library: its message and its fields.
#[derive(Clone, Default)]
struct InfoLines(Arc<Mutex<Vec<String>>>);

impl<S: tracing::Subscriber> Layer<S> for InfoLines {
    fn on_event(&self, event: &tracing::Event<'_>, _: Context<'_, S>) {
        struct Line<'a>(&'a mut String);
        impl Visit for Line<'_> {
            fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
                if field.name() == "message" {
                    self.0.insert_str(0, &format!("{value:?}"));
                } else {
                    self.0.push_str(&format!(" {}={value:?}", field.name()));
                }
            }
        }
        let metadata = event.metadata();
        if *metadata.level() == tracing::Level::INFO && metadata.target().starts_with("kafka_batch")
        {
            let mut line = String::new();
            event.record(&mut Line(&mut line));
            self.0.lock().unwrap().push(line);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_are_counted_timed_and_traced() {
    let spans = BatchSpans::default();
    let info = InfoLines::default();
    tracing::subscriber::set_global_default(
        tracing_subscriber::registry()
            .with(spans.clone())
            .with(info.clone()),
    )
    .unwrap();
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    recorder.install().unwrap();

    let broker = kafka_batch::testing::EmbeddedBroker::start().unwrap();
    broker.create_topic("observed", 1).unwrap();
    produce_numbered(&broker, "observed", 0..12).await;
    broker
        .produce_raw("observed", &[(0, Some(b"t"), None)])
        .unwrap();
    let mut settings = consumer_settings(&broker, "g", "observed", 6, 300);
    settings.service = "my-svc".into();
    let consumer = Consumer::new(&settings).unwrap();
    let handle = consumer.handle();
    let seen = AtomicUsize::new(0);
    within(
        Duration::from_secs(60),
        consumer.process(async |batch: Vec<Message>| {
            let seen = seen.fetch_add(batch.len(), Ordering::SeqCst) + batch.len();
            if seen == 12 {
                handle.shutdown();
            }
            Ok::<_, Error>(())
        }),
    )
    .await
    .unwrap();

    let metrics: Vec<(String, Vec<String>, DebugValue)> = snapshotter
        .snapshot()
        .into_vec()
        .into_iter()
        .map(|(key, _, _, value)| {
            let labels = key
                .key()
                .labels()
                .map(|l| format!("{}={}", l.key(), l.value()))
                .collect();
            (key.key().name().to_owned(), labels, value)
        })
        .collect();
    let counter = |name: &str, label: Option<&str>| -> u64 {
        metrics
            .iter()
            .filter(|(n, labels, _)| {
                n == name && label.is_none_or(|l| labels.iter().any(|x| x == l))
            })
            .map(|(_, _, v)| match v {
                DebugValue::Counter(c) => *c,
                _ => 0,
            })
            .sum()
    };
    assert_eq!(
        counter("my_svc_kafka_process_count", None),
        12,
        "{metrics:?}"
    );
    assert_eq!(counter("kafka_batch_batches_total", Some("outcome=ok")), 2);
    assert_eq!(
        counter(
            "kafka_batch_skipped_records_total",
            Some("reason=tombstone")
        ),
        1
    );
    // Outcomes that arrive together are committed together: at least one commit,
    // exactly as many as the consumer counted, and the broker has them.
    let commits = counter("kafka_batch_commits_total", None);
    assert!(commits >= 1);
    assert_eq!(commits, handle.stats().commits);
    let committed =
        tokio::task::block_in_place(|| broker.committed_offsets("g", "observed")).unwrap();
    assert!(committed[&0] >= 12, "{committed:?}");
    assert!(counter("kafka_batch_rebalances_total", Some("kind=assign")) >= 1);
    let histogram_samples = metrics
        .iter()
        .find(|(n, _, _)| n == "my_svc_kafka_process_seconds")
        .map(|(_, _, v)| match v {
            DebugValue::Histogram(samples) => samples.len(),
            _ => 0,
        });
    assert_eq!(histogram_samples, Some(2), "one timing per batch");

    let spans = spans.0.lock().unwrap().clone();
    assert_eq!(
        spans,
        vec!["observed[0=0:6]", "observed[0=6:12]"],
        "one span per batch, naming its offsets"
    );

    // What an operator sees at `info`: the start with its settings, the
    // partitions, the first commit, and the stop with what was committed last.
    let info = info.0.lock().unwrap().clone();
    let expected = [
        "consumer started: joining the group",
        "partitions assigned",
        "first offsets committed",
        "consumer stopping: leaving the group",
        "consumer closed",
    ];
    let mut at = 0;
    for want in expected {
        let found = info[at..].iter().position(|line| line.starts_with(want));
        let Some(i) = found else {
            panic!("no `{want}` line after {:?}: {info:#?}", expected.first());
        };
        at += i + 1;
    }
    let started = info
        .iter()
        .find(|l| l.starts_with("consumer started"))
        .unwrap();
    assert!(
        started.contains("group=g") && started.contains("topics=observed"),
        "{started}"
    );
    let stopping = info
        .iter()
        .find(|l| l.starts_with("consumer stopping"))
        .unwrap();
    assert!(
        stopping.contains(&format!("last_committed=observed[0]={}", committed[&0])),
        "the last commit, as the broker has it: {stopping}"
    );
}
