//! Bad input never panics: arbitrary bytes as key, value and headers go
//! through the decoder the consumer uses (envelope unpacking into a typed
//! and an untyped payload, and the failure-header parser of retry records).
//!
//! The number of cases comes from `KAFKA_BATCH_FUZZ_CASES` (default 10,000);
//! `scripts/test.sh` runs it with 1,000,000 in release mode.

use std::sync::Arc;

use kafka_batch::envelope::{pack, unpack, RawRecord};
use kafka_batch::failure::{headers, FailureInfo};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use serde::Deserialize;
use serde_json::Value;

#[derive(Debug, Deserialize)]
#[allow(dead_code)]
struct Typed {
    n: u64,
    title: Option<String>,
    tags: Vec<String>,
}

/// A valid envelope, with a history, that mutations start from.
const VALID: &str = r#"{"item": {"n": 7, "title": "Concert", "tags": ["a", "b"]}, "hist": {"svc": "loader", "dt": "2024-05-01T10:00:00.000000Z", "refs": [{"topic": "raw", "partition": 1, "offset": 42, "key": "k", "hist": {"svc": "origin", "dt": "2024-05-01T09:59:59.000000Z", "refs": []}}]}}"#;

/// Arbitrary JSON documents, nested a few levels.
fn json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<f64>()
            .prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
        ".{0,12}".prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 32, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map(
                prop_oneof![
                    Just("item".to_string()),
                    Just("hist".to_string()),
                    Just("refs".to_string()),
                    ".{0,6}".prop_map(String::from)
                ],
                inner,
                0..6
            )
            .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// A value: random bytes, a random JSON document (often envelope-shaped),
/// or a valid envelope with random edits.
fn value() -> impl Strategy<Value = Option<Vec<u8>>> {
    let edits = prop::collection::vec((any::<prop::sample::Index>(), any::<u8>(), 0u8..3), 0..8);
    prop_oneof![
        1 => Just(None),
        3 => prop::collection::vec(any::<u8>(), 0..300).prop_map(Some),
        3 => json().prop_map(|v| Some(v.to_string().into_bytes())),
        3 => (json(), json()).prop_map(|(item, hist)| Some(
            serde_json::json!({"item": item, "hist": hist}).to_string().into_bytes()
        )),
        4 => edits.prop_map(|edits| {
            let mut bytes = VALID.as_bytes().to_vec();
            for (at, byte, kind) in edits {
                let i = at.index(bytes.len().max(1));
                match kind {
                    0 if i < bytes.len() => bytes[i] = byte,
                    1 => bytes.insert(i.min(bytes.len()), byte),
                    _ => bytes.truncate(i),
                }
            }
            Some(bytes)
        }),
    ]
}

fn key() -> impl Strategy<Value = Option<Vec<u8>>> {
    prop_oneof![
        1 => Just(None),
        2 => prop::collection::vec(any::<u8>(), 0..24).prop_map(Some),
        2 => "[a-z0-9-]{1,12}".prop_map(|s| Some(s.into_bytes())),
    ]
}

type Header = (Vec<u8>, Option<Vec<u8>>);

/// Headers: random names and values, and kafka-batch's own names with
/// random values.
fn headers() -> impl Strategy<Value = Vec<Header>> {
    let ours = prop::sample::select(vec![
        headers::ATTEMPTS,
        headers::RETRIES,
        headers::DUE_MS,
        headers::SOURCE_TOPIC,
        headers::SOURCE_PARTITION,
        headers::SOURCE_OFFSET,
        headers::REASON,
        headers::ERROR,
    ])
    .prop_map(|n| n.as_bytes().to_vec());
    let name = prop_oneof![prop::collection::vec(any::<u8>(), 0..20), ours];
    let value = prop::option::of(prop_oneof![
        prop::collection::vec(any::<u8>(), 0..20),
        any::<i64>().prop_map(|n| n.to_string().into_bytes()),
    ]);
    prop::collection::vec((name, value), 0..6)
}

#[test]
fn arbitrary_keys_values_and_headers_never_panic_the_decoder() {
    let cases: u32 = std::env::var("KAFKA_BATCH_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    let mut runner = TestRunner::new(Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    });
    let topic: Arc<str> = Arc::from("fuzzed");
    let decoded = std::cell::Cell::new(0u64);
    let refused = std::cell::Cell::new(0u64);
    runner
        .run(
            &(key(), value(), headers(), 0i64..1 << 40),
            |(key, value, headers, offset)| {
                let record = RawRecord {
                    topic: "fuzzed",
                    partition: 3,
                    offset,
                    key: key.as_deref(),
                    value: value.as_deref(),
                };
                let info = FailureInfo::from_headers(
                    headers.iter().map(|(k, v)| (k.as_slice(), v.as_deref())),
                );
                if info.source_topic.is_some() {
                    prop_assert!(headers
                        .iter()
                        .any(|(k, _)| k == headers::SOURCE_TOPIC.as_bytes()));
                }
                let _ = unpack::<Typed>(record, &topic);
                match unpack::<Value>(record, &topic) {
                    Ok(None) => prop_assert!(
                        value.as_deref().is_none_or(<[u8]>::is_empty),
                        "only an empty value is a tombstone"
                    ),
                    Ok(Some(message)) => {
                        decoded.set(decoded.get() + 1);
                        prop_assert_eq!(Some(message.id.as_bytes()), key.as_deref());
                        let origin = message.origin().expect("a consumed message has an origin");
                        prop_assert_eq!((origin.partition, origin.offset), (3, offset));
                        // What was read can be written again.
                        let repacked = pack("svc", "2024-05-01T10:00:00.000000Z", &message)
                            .expect("a decoded payload packs again");
                        let again = unpack::<Value>(
                            RawRecord {
                                value: Some(&repacked),
                                ..record
                            },
                            &topic,
                        )
                        .expect("a packed message unpacks")
                        .expect("not a tombstone");
                        prop_assert_eq!(again.payload, message.payload);
                    }
                    Err(error) => {
                        refused.set(refused.get() + 1);
                        let text = error.to_string();
                        prop_assert!(
                            text.contains(&format!("fuzzed:3:{offset}")),
                            "the error names where: {}",
                            text
                        );
                    }
                }
                Ok(())
            },
        )
        .unwrap_or_else(|e| panic!("{e}"));
    let (decoded, refused) = (decoded.get(), refused.get());
    eprintln!("{cases} cases: {decoded} decoded, {refused} refused with an error, 0 panics");
    assert!(decoded > 0 && refused > 0, "the inputs reach both outcomes");
}
