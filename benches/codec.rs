//! Envelope pack and unpack against plain serde_json on the same documents.
//!
//! `cargo bench --bench codec`

use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use kafka_batch::envelope::{format_dt, pack, unpack, Hist, Message, RawRecord, Ref};

mod common;
use common::{Event, PlainEnvelope};

fn event(text_len: usize) -> Event {
    Event {
        title: "t".repeat(text_len),
        category: "concerts".into(),
        lat: -36.8485,
        lon: 174.7633,
        rank: 72,
        labels: vec!["music".into(), "outdoor".into()],
    }
}

fn history(depth: usize) -> Vec<Ref> {
    let mut refs = Vec::new();
    for level in 0..depth {
        refs = vec![Ref {
            topic: "events".into(),
            partition: 3,
            offset: 1000 + level as i64,
            key: Some("evt-1".into()),
            hist: Some(
                Hist {
                    svc: format!("svc-{level}"),
                    dt: "2026-11-22T09:34:06.123456+00:00".into(),
                    refs,
                }
                .into(),
            ),
        }];
    }
    refs
}

fn codec(c: &mut Criterion) {
    let dt = format_dt(time::OffsetDateTime::now_utc());
    let topic: Arc<str> = Arc::from("events");
    for (name, text, depth) in [("small", 20, 1), ("2kb", 1900, 1), ("deep-history", 20, 50)] {
        let message = Message::new("evt-1", event(text)).with_refs(history(depth));
        let bytes = pack("bench", &dt, &message).expect("packs");
        let mut group = c.benchmark_group(name);
        group.throughput(Throughput::Bytes(bytes.len() as u64));
        group.bench_function("pack", |b| {
            b.iter(|| pack("bench", &dt, &message).expect("packs"))
        });
        // Like the baseline, each iteration drops what it decoded (holding
        // the outputs, as `iter_batched` does, measures the allocator's
        // bulk frees and page faults instead of the decoder).
        group.bench_function("unpack", |b| {
            b.iter(|| {
                let record = RawRecord {
                    topic: "events",
                    partition: 0,
                    offset: 1,
                    key: Some(b"evt-1"),
                    value: Some(&bytes),
                };
                unpack::<Event>(record, &topic).expect("unpacks")
            })
        });
        group.bench_function("serde_json baseline", |b| {
            b.iter(|| serde_json::from_slice::<PlainEnvelope<Event>>(&bytes).expect("parses"))
        });
        group.finish();
    }
}

criterion_group!(benches, codec);
criterion_main!(benches);
