use std::fmt;
use std::sync::Arc;

use super::decode::{parse_envelope, unpack_parts_by, Path, RawHist};
use super::decode_hist::{check_hist, parse_hist};
use super::*;
use proptest::prelude::*;
use serde::de::{DeserializeOwned, IgnoredAny};
use serde_json::value::RawValue;
use serde_json::{json, Value};
use time::OffsetDateTime;

fn topic() -> Arc<str> {
    Arc::from("input-topic")
}

fn record<'a>(key: Option<&'a [u8]>, value: Option<&'a [u8]>) -> RawRecord<'a> {
    RawRecord {
        topic: "input-topic",
        partition: 3,
        offset: 1042,
        key,
        value,
    }
}

fn decode(key: Option<&[u8]>, value: &[u8]) -> Result<Option<Message<Value>>, DecodeError> {
    unpack::<Value>(record(key, Some(value)), &topic())
}

/// A history `levels` deep: each level's single ref carries the next level.
fn chain(levels: u32) -> Value {
    let mut hist = Value::Null;
    for level in (1..=levels).rev() {
        hist = json!({
            "svc": format!("svc-{level}"),
            "dt": "2026-11-22T09:34:06+00:00",
            "refs": [{"topic": "t", "partition": 0, "offset": level, "key": "k", "hist": hist}],
        });
    }
    hist
}

#[test]
fn unpacks_a_python_record() {
    let value = br#"{"item": {"n": 1}, "hist": {"svc": "py-svc", "dt": "2026-11-22T09:34:06+00:00",
        "refs": [{"topic": "raw", "partition": 0, "offset": 7, "key": "a", "hist": null}]}}"#;
    let m = decode(Some(b"a"), value).unwrap().unwrap();
    assert_eq!(m.id, "a");
    assert_eq!(m.payload, json!({"n": 1}));
    let own = m.source().unwrap();
    assert_eq!(own.to_string(), "input-topic:3:1042:a");
    let hist = own.hist.as_deref().unwrap();
    assert_eq!(hist.svc, "py-svc");
    assert_eq!(hist.refs[0].to_string(), "raw:0:7:a");
    assert_eq!(
        m.refs.len(),
        1,
        "a consumed message's refs are its own record's ref"
    );
}

#[test]
fn missing_or_null_hist_means_no_history() {
    for value in [&br#"{"item": 1}"#[..], br#"{"hist": null, "item": 1}"#] {
        let m = decode(Some(b"k"), value).unwrap().unwrap();
        assert_eq!(m.payload, json!(1));
        assert_eq!(m.source().unwrap().hist, None);
    }
}

#[test]
fn an_empty_history_object_is_no_history_at_every_level() {
    // The Python wrapper reads `{}` as no history (an empty dict is falsy).
    for top in ["{}", "{ }", "{\n\t}"] {
        let value = format!(r#"{{"item": 1, "hist": {top}}}"#);
        for path in [Path::Fast, Path::Full] {
            let m = unpack_parts_by::<Value>(
                record(Some(b"k"), Some(value.as_bytes())),
                &mut LastHistory::default(),
                path,
            )
            .unwrap()
            .unwrap();
            assert!(m.hist.is_none(), "{top:?} by {path:?}");
        }
        let message = decode(Some(b"k"), value.as_bytes()).unwrap().unwrap();
        assert_eq!(message.source().unwrap().hist, None, "{top:?}");
    }
    let value = br#"{"item": 1, "hist": {"svc": "b", "dt": "2026-11-22T09:34:06+00:00",
        "refs": [{"topic": "raw", "partition": 0, "offset": 7, "key": "a", "hist": {}}]}}"#;
    let m = decode(Some(b"k"), value).unwrap().unwrap();
    let hist = m.source().unwrap().hist.as_deref().unwrap();
    assert_eq!(hist.refs[0].hist, None, "a ref's `{{}}` is no history");
}

#[test]
fn stage_latencies_pass_over_empty_histories_as_the_python_wrapper_does() {
    // As the top history: no stages, a total of 0 (not an error).
    let value = br#"{"item": 1, "hist": {}}"#;
    let m = decode(Some(b"k"), value).unwrap().unwrap();
    let top = stage_latencies("me", m.source().unwrap(), None, at(100)).unwrap();
    assert!(top.stages.is_empty());
    assert_eq!(top.total_seconds, 0.0);
    // As a branch: passed over, the other branch is followed.
    let value = br#"{"item": 1, "hist": {"svc": "b", "dt": "2026-01-01T00:00:40+00:00", "refs": [
        {"topic": "raw", "partition": 0, "offset": 7, "key": "a",
         "hist": {"svc": "a", "dt": "2026-01-01T00:00:10+00:00", "refs": []}},
        {"topic": "raw", "partition": 1, "offset": 8, "key": "z", "hist": {}}]}}"#;
    let m = decode(Some(b"k"), value).unwrap().unwrap();
    let l = stage_latencies("me", m.source().unwrap(), None, at(100)).unwrap();
    assert_eq!(l.stages, vec![("b".into(), 30.0), ("me".into(), 60.0)]);
    assert_eq!(l.total_seconds, 90.0);
}

#[test]
fn unknown_fields_are_ignored_at_every_level() {
    let value = br#"{"extra": [[[[1]]]], "item": "x", "hist": {"svc": "s", "dt": "d", "more": {"a": 1},
        "refs": [{"topic": "t", "partition": 1, "offset": 2, "key": "k", "hist": null, "why": true}]}}"#;
    let m = decode(Some(b"k"), value).unwrap().unwrap();
    let hist = m.source().unwrap().hist.as_deref().unwrap();
    assert_eq!(hist.refs[0].to_string(), "t:1:2:k");
}

#[test]
fn tombstones_are_skipped_not_errors() {
    assert!(unpack::<Value>(record(Some(b"k"), None), &topic())
        .unwrap()
        .is_none());
    assert!(decode(Some(b"k"), b"").unwrap().is_none());
    assert!(
        decode(None, b"").unwrap().is_none(),
        "a tombstone needs no key"
    );
}

#[test]
fn bad_records_are_errors_with_coordinates() {
    type Case<'a> = (Option<&'a [u8]>, &'a [u8], &'a str);
    let cases: [Case; 6] = [
        (None, br#"{"item": 1}"#, "key is null"),
        (Some(b"\xff\xfe"), br#"{"item": 1}"#, "not UTF-8"),
        (Some(b"k"), b"not json", "not JSON"),
        (Some(b"k"), br#"{"hist": null}"#, "not an envelope"),
        (Some(b"k"), br#"[1, 2]"#, "not an envelope"),
        (Some(b"k"), br#"{"item": 1} trailing"#, "not JSON"),
    ];
    for (key, value, expected) in cases {
        let err = decode(key, value).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("input-topic:3:1042"), "{text}");
        assert!(text.contains(expected), "{text} should say {expected}");
    }
}

#[test]
fn a_payload_of_the_wrong_type_is_a_decode_error() {
    #[derive(Debug, serde::Deserialize)]
    #[allow(dead_code)]
    struct Event {
        n: u32,
    }
    let err = unpack::<Event>(
        record(Some(b"k"), Some(br#"{"item": {"n": "one"}}"#)),
        &topic(),
    )
    .unwrap_err();
    assert!(matches!(err.kind, DecodeErrorKind::Payload(_)), "{err}");
    assert!(err.to_string().contains("payload does not match"), "{err}");
}

#[test]
fn a_missing_item_is_an_error_even_for_an_optional_payload() {
    let err = unpack::<Option<u32>>(record(Some(b"k"), Some(br#"{"hist": null}"#)), &topic())
        .unwrap_err();
    assert!(matches!(err.kind, DecodeErrorKind::NotEnvelope(_)), "{err}");
}

#[test]
fn history_of_99_levels_is_kept_and_100_is_cut() {
    for (levels, kept) in [(99, true), (100, false), (250, false)] {
        let value = serde_json::to_vec(&json!({"item": "x", "hist": chain(levels)})).unwrap();
        let m = decode(Some(b"k"), &value).unwrap().unwrap();
        let hist = m.source().unwrap().hist.as_deref();
        assert_eq!(hist.is_some(), kept, "{levels} levels");
        if let Some(h) = hist {
            assert_eq!(h.depth(), levels);
        }
        assert_eq!(m.payload, json!("x"), "the item is delivered either way");
    }
}

#[test]
fn legacy_refs_object_drops_the_history() {
    let value =
        br#"{"item": 1, "hist": {"svc": "s", "dt": "d", "refs": [{"topic": "t", "partition": 0,
        "offset": 1, "key": "k", "hist": {"svc": "old", "dt": "d", "refs": {"topic": "t"}}}]}}"#;
    let m = decode(Some(b"k"), value).unwrap().unwrap();
    assert_eq!(m.source().unwrap().hist, None);
}

#[test]
fn a_very_deep_unknown_field_neither_fails_nor_overflows() {
    let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    let value = format!(
        r#"{{"item": 1, "hist": {{"svc": "s", "dt": "d", "refs": [], "x": {deep}}}, "y": {deep}}}"#
    );
    let m = decode(Some(b"k"), value.as_bytes()).unwrap().unwrap();
    assert_eq!(m.source().unwrap().hist.as_deref().unwrap().svc, "s");
}

#[test]
fn pack_writes_the_wire_format() {
    let input = decode(Some(b"a"), br#"{"item": 1}"#).unwrap().unwrap();
    let out = input.derive(json!({"doubled": 2}));
    let bytes = pack("enricher", "2026-11-22T09:34:06.123456+00:00", &out).unwrap();
    let written: Value = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(
        written,
        json!({
            "item": {"doubled": 2},
            "hist": {"svc": "enricher", "dt": "2026-11-22T09:34:06.123456+00:00",
                     "refs": [{"topic": "input-topic", "partition": 3, "offset": 1042, "key": "a", "hist": null}]}
        })
    );
    assert_eq!(key_of(&out.id), Some(&b"a"[..]));
    assert_eq!(key_of(""), None, "an empty id is a null key");
}

#[test]
fn dt_is_utc_with_microseconds_and_sorts_after_the_python_form() {
    let at = parse_dt("2026-11-22T10:34:06.123456+01:00").unwrap();
    let ours = format_dt(at);
    assert_eq!(ours, "2026-11-22T09:34:06.123456+00:00");
    assert!(ours.as_str() > "2026-11-22T09:34:06+00:00");
    for python in [
        "2026-11-22T09:34:06Z",
        "2026-11-22T09:34:06+00:00",
        "2026-11-22T21:34:06.5+12:00",
    ] {
        assert!(parse_dt(python).is_ok(), "{python}");
    }
}

#[test]
fn batch_ref_text() {
    let mut b = BatchRef::default();
    for (t, p, o) in [
        ("in", 0, 100),
        ("in", 3, 7),
        ("in", 0, 149),
        ("other", 1, 0),
        ("in", 3, 8),
        ("other", 1, 9),
    ] {
        b.add(t, p, o);
    }
    assert_eq!(b.to_string(), "in[0=100:150,3=7:9],other[1=0:10]");
    assert_eq!(b.records(), 6);
    assert_eq!(BatchRef::default().to_string(), "");
}

#[test]
fn latest_only_keeps_each_ids_last_message_in_order() {
    let ids = ["a", "b", "x", "x", "a"];
    let batch: Vec<Message<usize>> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| Message::new(*id, i))
        .collect();
    let kept: Vec<(MessageId, usize)> = latest_only(batch)
        .into_iter()
        .map(|m| (m.id, m.payload))
        .collect();
    assert_eq!(
        kept,
        vec![("b".into(), 1), ("x".into(), 3), ("a".into(), 4)]
    );
}

fn hist(svc: &str, dt: &str, refs: Vec<Ref>) -> Option<History> {
    Some(History::new(Hist {
        svc: svc.into(),
        dt: dt.into(),
        refs,
    }))
}

fn ref_with(hist: Option<History>) -> Ref {
    Ref {
        topic: "t".into(),
        partition: 0,
        offset: 0,
        key: Some("k".into()),
        hist,
    }
}

/// origin (t=0) -> a (t=10) -> a (t=15) -> b (t=40), read by `me` at t=100.
/// A stale side branch (t=5) must not be followed.
fn worked_chain() -> Ref {
    let origin = ref_with(hist("origin", "2026-01-01T00:00:00Z", vec![]));
    let stale = ref_with(hist("side", "2026-01-01T00:00:05Z", vec![]));
    let a1 = ref_with(hist("a", "2026-01-01T00:00:10Z", vec![origin]));
    let a2 = ref_with(hist("a", "2026-01-01T00:00:15+00:00", vec![stale, a1]));
    ref_with(hist("b", "2026-01-01T00:00:40.000000+00:00", vec![a2]))
}

fn at(seconds: i64) -> OffsetDateTime {
    parse_dt("2026-01-01T00:00:00Z").unwrap() + time::Duration::seconds(seconds)
}

#[test]
fn stage_latencies_follow_the_newest_chain_and_merge_repeats() {
    let l = stage_latencies("me", &worked_chain(), None, at(100)).unwrap();
    assert_eq!(
        l.stages,
        vec![("a".into(), 15.0), ("b".into(), 25.0), ("me".into(), 60.0)]
    );
    assert_eq!(l.total_seconds, 100.0);
}

#[test]
fn stage_latencies_from_a_target() {
    let l = stage_latencies("me", &worked_chain(), Some("b"), at(100)).unwrap();
    assert_eq!(l.stages, vec![("b".into(), 25.0), ("me".into(), 60.0)]);
    assert_eq!(l.total_seconds, 85.0);

    let first = stage_latencies("me", &worked_chain(), Some("origin"), at(100)).unwrap();
    assert_eq!(first.stages.len(), 3);

    let never = stage_latencies("me", &worked_chain(), Some("nobody"), at(100)).unwrap();
    assert!(never.stages.is_empty());
    assert_eq!(never.total_seconds, 0.0);

    let no_hist = stage_latencies("me", &ref_with(None), None, at(100)).unwrap();
    assert!(no_hist.stages.is_empty());
}

#[test]
fn a_bad_dt_in_a_history_is_an_error_not_a_panic() {
    let r = ref_with(hist("b", "yesterday", vec![]));
    let err = stage_latencies("me", &r, None, at(1)).unwrap_err();
    assert!(err.to_string().contains("yesterday"));
}

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        // Short decimals round-trip exactly through serde_json's float parser.
        (any::<i32>(), 0u32..6).prop_map(|(m, e)| json!(f64::from(m) / 10f64.powi(e as i32))),
        ".*".prop_map(Value::from),
    ];
    leaf.prop_recursive(4, 64, 8, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..8).prop_map(Value::from),
            prop::collection::btree_map(".*", inner, 0..8)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

fn a_ref() -> impl Strategy<Value = Ref> {
    let leaf = (".*", any::<i32>(), any::<i64>(), proptest::option::of(".*")).prop_map(
        |(topic, partition, offset, key): (String, _, _, Option<String>)| Ref {
            topic: topic.into(),
            partition,
            offset,
            key: key.map(MessageId::from),
            hist: None,
        },
    );
    leaf.prop_recursive(3, 16, 3, |inner| {
        (inner.clone(), ".*", prop::collection::vec(inner, 0..3)).prop_map(|(mut r, svc, refs)| {
            r.hist = hist(&svc, "2026-11-22T09:34:06.000001+00:00", refs);
            r
        })
    })
}

proptest! {
    #[test]
    fn pack_then_unpack_returns_id_payload_and_refs(
        id in ".+",
        payload in json_value(),
        refs in prop::collection::vec(a_ref(), 0..4),
    ) {
        let out = Message::new(id.clone(), payload.clone()).with_refs(refs.clone());
        let dt = format_dt(OffsetDateTime::now_utc());
        let value = pack("svc", &dt, &out).unwrap();
        let back = unpack::<Value>(record(key_of(&out.id), Some(&value)), &topic()).unwrap().unwrap();
        prop_assert_eq!(&back.id, &id);
        prop_assert_eq!(&back.payload, &payload);
        let own = back.source().unwrap();
        let hist = own.hist.as_deref().unwrap();
        prop_assert_eq!(&hist.svc, "svc");
        prop_assert_eq!(&hist.dt, &dt);
        prop_assert_eq!(&hist.refs, &refs);
    }

    #[test]
    fn unpack_never_panics_on_any_bytes(
        key in proptest::option::of(prop::collection::vec(any::<u8>(), 0..16)),
        value in prop::collection::vec(any::<u8>(), 0..256),
    ) {
        let _ = unpack::<Value>(record(key.as_deref(), Some(&value)), &topic());
    }
}

/// History-shaped JSON: mostly the real grammar, sometimes the wrong types.
fn hist_like() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        "[a-z\\\\\"]{0,4}".prop_map(Value::from),
        Just(json!({"topic": "t"})),
    ];
    leaf.prop_recursive(5, 48, 5, |inner| {
        let field = prop::sample::select(vec![
            "svc",
            "dt",
            "refs",
            "topic",
            "partition",
            "offset",
            "key",
            "hist",
            "other",
            "h\\u0069st",
        ]);
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
            prop::collection::btree_map(field.prop_map(String::from), inner, 0..5)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

proptest! {
    /// The cheap check on read and the full parse on first use agree on
    /// every history, so a history that was kept always parses.
    #[test]
    fn the_read_check_accepts_exactly_what_the_parser_accepts(hist in hist_like()) {
        let text = hist.to_string();
        let raw: Box<RawValue> = RawValue::from_string(text).unwrap();
        let checked = check_hist(&raw);
        let parsed = parse_hist(&raw);
        prop_assert_eq!(checked.is_ok(), parsed.is_ok(), "check {:?} parse {:?}", checked.err(), parsed.err());
        // The quick scan only ever vouches for what the parser accepts.
        if super::scan::plainly_valid(raw.get().as_bytes()) {
            prop_assert!(parsed.is_ok(), "scan accepted what the parser refuses: {:?}", parsed.err());
        }
    }

    /// Histories as kafka-batch and the Python wrapper write them pass the
    /// quick scan, so the full check is the exception.
    #[test]
    fn written_histories_pass_the_quick_scan(r in a_ref()) {
        let text = serde_json::to_string(&Hist { svc: "svc".into(), dt: "2026-11-22T09:34:06+00:00".into(), refs: vec![r] }).unwrap();
        prop_assert!(super::scan::plainly_valid(text.as_bytes()), "{}", text);
    }
}

#[test]
fn the_quick_scan_leaves_the_unusual_to_the_full_check() {
    let plain = r#"{"svc": "a", "dt": null, "x": [1, {"y": "}"}], "refs": [{"topic": "t", "partition": -3, "offset": 9223372036854775807, "key": null, "hist": {"svc": "b", "dt": "d", "refs": []}}]}"#;
    assert!(scan::plainly_valid(plain.as_bytes()));
    for escaped in [
        r#"{"svc": "a\"b\\c\/\b\f\n\r\t"}"#,
        r#"{"svc": "caf\u00e9 \u00E9", "refs": [{"key": "\ud83d\ude00"}]}"#,
        r#"{"x": ["\u0000"]}"#,
    ] {
        assert!(scan::plainly_valid(escaped.as_bytes()), "{escaped}");
    }
    for unusual in [
        r#"{"s\u0076c": "a"}"#,
        r#"{"svc": "\ud800"}"#,
        r#"{"svc": "\udc00"}"#,
        r#"{"svc": "\ud800\u0041"}"#,
        r#"{"svc": "\ud800x"}"#,
        r#"{"svc": "\u12"}"#,
        r#"{"svc": "\u12g4"}"#,
        r#"{"svc": "\x"}"#,
        r#"{"svc": "\"}"#,
        r#"{"refs": {"topic": "t"}}"#,
        r#"{"refs": [{"partition": 2147483648}]}"#,
        r#"{"refs": [{"partition": 1.0}]}"#,
        r#"{"refs": [{"offset": -0}]}"#,
        r#"{"refs": [{"offset": 9223372036854775808}]}"#,
        r#"{"refs": [{"topic": 1}]}"#,
        r#"{"refs": [7]}"#,
        r#"{"svc": 1}"#,
        r#"{"refs": "x"}"#,
        r#"[]"#,
    ] {
        assert!(!scan::plainly_valid(unusual.as_bytes()), "{unusual}");
    }
    let mut deep = "null".to_string();
    for _ in 0..MAX_HIST_DEPTH - 1 {
        deep = format!(r#"{{"refs": [{{"hist": {deep}}}]}}"#);
    }
    assert!(
        !scan::plainly_valid(deep.as_bytes()),
        "near the limit the full check decides"
    );
}

#[test]
fn a_derived_message_writes_its_input_history_back_unchanged() {
    // Fields kafka-batch does not know, and Python's spacing, survive a hop.
    let history = r#"{"svc": "py-svc", "dt": "2026-11-22T09:34:06+00:00", "trace": {"id": 7}, "refs": [{"topic": "raw", "partition": 0, "offset": 7, "key": "a", "hist": null}]}"#;
    let value = format!(r#"{{"item": {{"n": 1}}, "hist": {history}}}"#);
    let input = decode(Some(b"a"), value.as_bytes()).unwrap().unwrap();
    let output = input.derive(json!({"n": 2}));
    let packed = pack("me", "2026-11-22T09:35:00.000000+00:00", &output).unwrap();
    let text = String::from_utf8(packed).unwrap();
    assert!(text.contains(history), "{text}");
    // And it still reads as the same history.
    let back = decode(Some(b"a"), text.as_bytes()).unwrap().unwrap();
    let own = back.source().unwrap().hist.as_deref().unwrap();
    assert_eq!(
        own.refs[0].hist.as_deref().map(|h| h.svc.as_str()),
        Some("py-svc")
    );
}

#[test]
fn an_escaped_field_name_cannot_slip_a_deep_history_past_the_guard() {
    let mut hist = "null".to_string();
    for level in 0..120 {
        hist = format!(
            r#"{{"svc": "s{level}", "dt": "d", "refs": [{{"topic": "t", "partition": 0, "offset": 1, "key": "k", "h\u0069st": {hist}}}]}}"#
        );
    }
    let value = format!(r#"{{"item": 1, "hist": {hist}}}"#);
    let m = decode(Some(b"k"), value.as_bytes()).unwrap().unwrap();
    assert_eq!(m.source().unwrap().hist, None, "cut at 100 levels");
}

// The envelope fast path against the full path.
//
// The generators below write envelope text directly (not through
// serde_json), so that it can hold what serde_json never writes: odd
// whitespace, escapes, numbers spelled oddly, duplicate fields, histories
// nested past the limit, and byte edits of all of these.

/// JSON whitespace, sometimes none, sometimes a byte that is not whitespace
/// in JSON (a vertical tab or a form feed).
fn ws_text() -> impl Strategy<Value = String> {
    prop_oneof![
        20 => Just(String::new()),
        4 => Just(" ".to_string()),
        2 => prop::sample::select(vec!["\n", "\t", "\r\n", "  \t"]).prop_map(String::from),
        1 => prop::sample::select(vec!["\u{b}", "\u{c}", "\u{a0}"]).prop_map(String::from),
    ]
}

/// Numbers as written in JSON, some not JSON at all.
fn number_text() -> impl Strategy<Value = String> {
    prop_oneof![
        6 => any::<i64>().prop_map(|n| n.to_string()),
        3 => any::<i32>().prop_map(|n| n.to_string()),
        1 => (any::<i32>(), 0u32..6).prop_map(|(m, e)| (f64::from(m) / 10f64.powi(e as i32)).to_string()),
        2 => prop::sample::select(vec![
            "0", "-0", "1", "-1", "01", "-01", "00", "1.0", "1.", ".5", "+1", "-", "1e5", "1E+2",
            "1e", "1e+", "-1.5e-3", "2147483647", "2147483648", "-2147483648", "-2147483649",
            "9223372036854775807", "9223372036854775808", "-9223372036854775808",
            "-9223372036854775809", "18446744073709551615", "18446744073709551616",
            "123456789012345678901234", "0x10", "1_000", "NaN", "Infinity",
        ])
        .prop_map(String::from),
    ]
}

/// Strings as written in JSON: mostly plain, sometimes odd.
fn string_text() -> impl Strategy<Value = String> {
    prop_oneof![
        16 => "[a-z0-9 :.+-]{0,12}".prop_map(|s| format!("\"{s}\"")),
        4 => odd_string(),
    ]
}

/// Strings with escapes (valid in text or not), control characters,
/// non-ASCII text, or no closing quote.
fn odd_string() -> impl Strategy<Value = String> {
    prop::sample::select(vec![
        r#""a\"b""#,
        r#""a\\b""#,
        r#""\/""#,
        r#""\n\t""#,
        r#""\u0069""#,
        r#""\u00e9""#,
        r#""\ud83d\ude00""#,
        r#""\uD83D\uDE00""#,
        r#""\ud800""#,
        r#""\udc00""#,
        r#""\ud800\u0041""#,
        r#""\ud800\n""#,
        r#""\u00E9\/\b\f\r""#,
        r#""\x""#,
        r#""\u12""#,
        "\"\u{1}\"",
        "\"\t\"",
        "\"\u{7f}\"",
        "\"é\"",
        "\"日本\"",
        "\"unterminated",
        "\"\"",
        r#""h\u0069st""#,
    ])
    .prop_map(String::from)
}

/// A field name: the envelope's and the history's, others, and spellings
/// of them that only match once unescaped.
fn name_text() -> impl Strategy<Value = String> {
    prop_oneof![
        24 => prop::sample::select(vec![
            "item", "hist", "svc", "dt", "refs", "topic", "partition", "offset", "key", "other", "x",
        ])
        .prop_map(|n| format!("\"{n}\"")),
        4 => prop::sample::select(vec![
            r#""h\u0069st""#, r#""\u0069tem""#, r#""it\"em""#, "\"é\"", "\"\u{1}\"", "item", "'hist'",
        ])
        .prop_map(String::from),
    ]
}

/// A field name the history grammar mostly does not know.
fn extra_name() -> impl Strategy<Value = String> {
    prop_oneof![
        8 => prop::sample::select(vec!["other", "x", "trace", ""]).prop_map(|n| format!("\"{n}\"")),
        1 => name_text(),
    ]
}

/// Any JSON-like value as text.
fn value_text() -> impl Strategy<Value = String> {
    let leaf = prop_oneof![
        4 => prop::sample::select(vec!["null", "true", "false"]).prop_map(String::from),
        1 => prop::sample::select(vec!["nul", "tru", "nullx", "True", "", "'a'", "]"]).prop_map(String::from),
        6 => number_text(),
        6 => string_text(),
    ];
    leaf.prop_recursive(4, 32, 5, |inner| {
        prop_oneof![
            (
                prop::collection::vec((ws_text(), inner.clone(), ws_text()), 0..5),
                ws_text()
            )
                .prop_map(|(items, w)| {
                    let items: Vec<String> = items
                        .into_iter()
                        .map(|(a, v, b)| format!("{a}{v}{b}"))
                        .collect();
                    format!("[{w}{}]", items.join(","))
                }),
            (
                prop::collection::vec((name_text(), ws_text(), inner), 0..5),
                ws_text()
            )
                .prop_map(|(fields, w)| {
                    let fields: Vec<String> = fields
                        .into_iter()
                        .map(|(n, w, v)| format!("{n}{w}:{w}{v}"))
                        .collect();
                    format!("{{{w}{}}}", fields.join(","))
                }),
        ]
    })
}

/// An object's text from its fields, in order.
fn object_text(fields: Vec<(String, String)>, w: &str) -> String {
    let fields: Vec<String> = fields
        .into_iter()
        .map(|(name, value)| format!("{w}{name}{w}:{w}{value}{w}"))
        .collect();
    format!("{{{}}}", fields.join(","))
}

/// A history as text: sometimes a plain chain near or past the depth limit,
/// wrapped in a few levels whose fields are mostly the real grammar and
/// sometimes not (wrong types, odd numbers, escapes, legacy `refs`
/// objects, duplicate or reordered fields, odd whitespace).
fn hist_text() -> impl Strategy<Value = String> {
    let scalar = || {
        prop_oneof![
            24 => string_text(),
            4 => Just("null".to_string()),
            1 => number_text(),
            1 => value_text(),
        ]
    };
    let integer = || {
        prop_oneof![
            24 => any::<i32>().prop_map(|n| n.to_string()),
            2 => number_text(),
            1 => value_text(),
        ]
    };
    let level = (
        scalar(),
        scalar(),
        scalar(),
        scalar(),
        integer(),
        integer(),
        prop::collection::vec((extra_name(), value_text()), 0..2),
        0u8..32,
        ws_text(),
    );
    (prop::collection::vec(level, 0..4), 0u32..110, 0u8..24).prop_map(|(levels, depth, tail)| {
        // The innermost history.
        let mut hist = match tail {
            0 => r#"{"svc": "s", "dt": "d", "refs": {"topic": "t"}}"#.to_string(),
            1 => "1".to_string(),
            2 => "[]".to_string(),
            _ => "null".to_string(),
        };
        // A plain chain, sometimes near or past the limit.
        let plain = !(4..=90).contains(&depth);
        if plain {
            for level in 0..depth {
                hist = format!(
                    r#"{{"svc":"s{level}","dt":"2026-11-22T09:34:06+00:00","refs":[{{"topic":"t","partition":0,"offset":{level},"key":"k","hist":{hist}}}]}}"#
                );
            }
        }
        for (svc, dt, topic, key, partition, offset, extra, shape, w) in levels {
            let mut r = vec![
                ("\"topic\"".to_string(), topic),
                ("\"partition\"".to_string(), partition),
                ("\"offset\"".to_string(), offset),
                ("\"key\"".to_string(), key),
                ("\"hist\"".to_string(), hist.clone()),
            ];
            let mut h = vec![("\"svc\"".to_string(), svc), ("\"dt\"".to_string(), dt)];
            h.extend(extra);
            // Reorder, duplicate or drop fields, and vary the refs' shape.
            r.rotate_left(usize::from(shape % 5));
            if shape & 16 != 0 {
                h.push(h[0].clone());
            }
            let refs = match shape % 8 {
                0..=4 => format!("[{}]", object_text(r, &w)),
                5 => format!("[{}, {}]", object_text(r.clone(), &w), object_text(r, "")),
                6 => "[]".to_string(),
                _ => object_text(r, &w),
            };
            h.insert(usize::from(shape) % (h.len() + 1), ("\"refs\"".to_string(), refs));
            hist = object_text(h, &w);
        }
        hist
    })
}

/// An envelope as text: `item`, `hist` and other fields in any order,
/// sometimes twice or missing, then maybe trailing bytes.
fn envelope_text() -> impl Strategy<Value = String> {
    let item = prop_oneof![
        6 => Just(r#"{"title": "t", "rank": 7, "labels": ["a", "b"]}"#.to_string()),
        1 => Just(r#"{"title": "t\u00e9", "rank": 7, "labels": [], "more": {"x": [1, 2.5]}}"#.to_string()),
        1 => Just(r#"{"title": "t", "rank": -1, "labels": []}"#.to_string()),
        3 => value_text(),
    ];
    let field = prop_oneof![
        1 => item.clone().prop_map(|v| ("\"item\"".to_string(), v)),
        2 => hist_text().prop_map(|v| ("\"hist\"".to_string(), v)),
        1 => Just(("\"hist\"".to_string(), "null".to_string())),
        4 => (name_text(), value_text()),
    ];
    let hist = prop_oneof![
        6 => hist_text().prop_map(|v| vec![("\"hist\"".to_string(), v)]),
        1 => Just(vec![]),
    ];
    (
        item,
        (hist, prop::collection::vec(field, 0..2)).prop_map(|(mut h, f)| {
            h.extend(f);
            h
        }),
        any::<prop::sample::Index>(),
        ws_text(),
        prop_oneof![
            12 => Just(""),
            2 => prop::sample::select(vec![" ", "\n"]),
            1 => prop::sample::select(vec!["x", "}", ",", "{}", "\0"]),
        ],
    )
        .prop_map(|(item, mut fields, at, w, trailing)| {
            let at = at.index(fields.len() + 1);
            fields.insert(at, ("\"item\"".to_string(), item));
            format!("{w}{}{w}{trailing}", object_text(fields, &w))
        })
}

/// A plain envelope with one odd value in its history, where a scan that
/// accepts a little too much would show.
fn one_odd_envelope() -> impl Strategy<Value = Vec<u8>> {
    let odd = prop_oneof![2 => odd_string(), 1 => number_text(), 1 => value_text()];
    (odd, 0usize..7).prop_map(|(odd, slot)| {
        let mut slots = [r#""s""#, r#""d""#, r#""t""#, "3", "1042", r#""k""#, "[1]"].map(String::from);
        slots[slot] = odd;
        let [svc, dt, topic, partition, offset, key, extra] = slots;
        format!(
            r#"{{"item":{{"n":1}},"hist":{{"svc":{svc},"dt":{dt},"refs":[{{"topic":{topic},"partition":{partition},"offset":{offset},"key":{key},"hist":null,"x":{extra}}}]}}}}"#
        )
        .into_bytes()
    })
}

/// Envelope bytes: generated text, or that text (or a plain valid
/// envelope) with random byte edits.
fn envelope_bytes() -> impl Strategy<Value = Vec<u8>> {
    let plain = Just(
        r#"{"item":{"title":"t","rank":7,"labels":["a"]},"hist":{"svc":"s","dt":"2026-11-22T09:34:06.123456+00:00","refs":[{"topic":"in","partition":3,"offset":1042,"key":"k","hist":{"svc":"o","dt":"d","refs":[]}}]}}"#
            .to_string(),
    );
    let edits = prop::collection::vec((any::<prop::sample::Index>(), any::<u8>(), 0u8..3), 1..4);
    let written =
        (json_value(), prop::collection::vec(a_ref(), 0..3)).prop_map(|(payload, refs)| {
            let message = Message::new("k", payload).with_refs(refs);
            pack("svc", "2026-11-22T09:34:06.123456+00:00", &message).unwrap()
        });
    prop_oneof![
        1 => written,
        2 => one_odd_envelope(),
        3 => envelope_text().prop_map(String::into_bytes),
        2 => (prop_oneof![plain, envelope_text()], edits).prop_map(|(text, edits)| {
            let mut bytes = text.into_bytes();
            for (at, byte, kind) in edits {
                let i = at.index(bytes.len() + 1);
                match kind {
                    0 if i < bytes.len() => bytes[i] = byte,
                    1 => bytes.insert(i, byte),
                    _ => {
                        if i < bytes.len() {
                            bytes.remove(i);
                        }
                    }
                }
            }
            bytes
        }),
    ]
}

/// A typed payload, so that `item` can fail to decode.
#[derive(Debug, PartialEq, serde::Deserialize)]
struct Typed {
    title: String,
    rank: u32,
    labels: Vec<String>,
}

/// What the fast path says, checked against the full path on the same bytes.
fn fast_agrees_with_full<T>(value: &[u8]) -> Result<bool, TestCaseError>
where
    T: DeserializeOwned + PartialEq + fmt::Debug,
{
    let Some((payload, hist)) = fast::envelope::<T>(value, None) else {
        return Ok(false);
    };
    let full = parse_envelope::<T>(value);
    let Ok((full_payload, full_hist)) = full else {
        return Err(TestCaseError::fail(format!(
            "the fast path read what the full path refuses: {:?}",
            full.err()
        )));
    };
    prop_assert_eq!(&payload, &full_payload);
    prop_assert_eq!(
        hist.as_ref().map(RawHist::text),
        full_hist.map(RawValue::get)
    );
    if let (Some(RawHist::Checked(_)), Some(raw)) = (hist, full_hist) {
        // The parser, serde alone (`check_hist` would ask the scan first).
        prop_assert!(
            parse_hist(raw).is_ok(),
            "the scan accepted a history the parser refuses: {:?}",
            parse_hist(raw).err()
        );
        // What the fast path hands `from_string_unchecked` is one JSON value.
        let reparsed: &RawValue = serde_json::from_str(raw.get()).unwrap();
        prop_assert_eq!(reparsed.get(), raw.get());
    }
    Ok(true)
}

/// `unpack_parts_by` as a comparable value: the key, payload and history
/// text, or the error's full text.
fn outcome<T: DeserializeOwned>(
    value: &[u8],
    path: Path,
) -> Result<Option<(String, T, Option<String>)>, String> {
    outcome_after::<T>(&mut LastHistory::default(), value, path)
}

/// [`outcome`], after the records that left `last`.
fn outcome_after<T: DeserializeOwned>(
    last: &mut LastHistory,
    value: &[u8],
    path: Path,
) -> Result<Option<(String, T, Option<String>)>, String> {
    unpack_parts_by::<T>(record(Some(b"k"), Some(value)), last, path)
        .map(|parts| {
            parts.map(|p| {
                let hist = p
                    .hist
                    .as_ref()
                    .and_then(History::raw_json)
                    .map(String::from);
                (p.key.to_owned(), p.payload, hist)
            })
        })
        .map_err(|e| format!("{e} / {:?}", e.kind))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    /// Whenever the fast path answers, the full path gives the same payload
    /// and history text, and accepts the history.
    #[test]
    fn the_fast_path_agrees_with_the_full_path(value in envelope_bytes()) {
        fast_agrees_with_full::<Value>(&value)?;
        fast_agrees_with_full::<Typed>(&value)?;
        fast_agrees_with_full::<IgnoredAny>(&value).map(|_| ())?;
    }

    /// `unpack` returns exactly what the full path alone returns: the same
    /// message, or the same error.
    #[test]
    fn unpack_returns_what_the_full_path_returns(value in envelope_bytes()) {
        prop_assert_eq!(outcome::<Value>(&value, Path::Fast), outcome::<Value>(&value, Path::Full));
        prop_assert_eq!(outcome::<Typed>(&value, Path::Fast), outcome::<Typed>(&value, Path::Full));
        let fast = unpack::<Value>(record(Some(b"k"), Some(&value)), &topic());
        let mut last = LastHistory::default();
        let full = unpack_parts_by::<Value>(record(Some(b"k"), Some(&value)), &mut last, Path::Full)
            .map(|parts| parts.map(|p| {
                let mut m = Message::consumed(p.payload, &topic(), 3, 1042, 0);
                m.set_source(p.key, p.hist);
                m
            }));
        match (fast, full) {
            (Ok(fast), Ok(full)) => prop_assert_eq!(fast, full),
            (Err(fast), Err(full)) => prop_assert_eq!(fast.to_string(), full.to_string()),
            (fast, full) => prop_assert!(false, "fast {:?} full {:?}", fast, full),
        }
    }

    /// A record read after another, whose history may begin with that
    /// record's history byte for byte (and then go on, or not), reads as it
    /// would alone.
    #[test]
    fn a_repeated_history_reads_as_it_would_alone(
        first in envelope_bytes(),
        second in envelope_bytes(),
        item in json_value(),
        after in prop::sample::select(vec!["", " ", "x", "1", "]", "}", ",", ", \"x\": 1", "\"", ", \"hist\": null"]),
    ) {
        let mut last = LastHistory::default();
        let _ = outcome_after::<Value>(&mut last, &first, Path::Fast);
        let repeated = last.0.as_ref().and_then(History::raw_json).map(|h| {
            format!(r#"{{"item": {item}, "hist": {h}{after}}}"#).into_bytes()
        });
        for value in [Some(second), repeated].into_iter().flatten() {
            let mut again = LastHistory(last.0.clone());
            prop_assert_eq!(
                outcome_after::<Value>(&mut again, &value, Path::Fast),
                outcome::<Value>(&value, Path::Full)
            );
        }
    }

    /// The scan accepts only JSON (so the unchecked raw value is sound) and
    /// only histories the full check accepts, whatever the bytes.
    #[test]
    fn the_scan_accepts_only_json_histories(text in prop_oneof![hist_text(), value_text()], edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..3)) {
        let mut bytes = text.into_bytes();
        for (at, byte) in edits {
            let i = at.index(bytes.len() + 1);
            bytes.insert(i, byte);
        }
        if super::scan::plainly_valid(&bytes) {
            if let Ok(text) = std::str::from_utf8(&bytes) {
                let raw: Result<&RawValue, _> = serde_json::from_str(text);
                prop_assert!(raw.is_ok(), "the scan accepted what is not JSON: {:?}", raw.err());
                // The parser, serde alone (`check_hist` would ask the scan first).
                let parsed = parse_hist(raw.unwrap());
                prop_assert!(parsed.is_ok(), "the scan accepted what the parser refuses: {:?}", parsed.err());
            }
        }
    }
}

/// How the fast path reads an envelope: `Some(true)` with a history it
/// checked, `Some(false)` with one left to `check_hist` or none, `None` when
/// it does not know.
fn fast_route(value: &str) -> Option<bool> {
    fast::envelope::<Value>(value.as_bytes(), None)
        .map(|(_, hist)| matches!(hist, Some(RawHist::Checked(_))))
}

#[test]
fn ordinary_envelopes_take_the_fast_path() {
    for (value, route) in [
        (r#"{"item": 1}"#, Some(false)),
        (r#"{"hist": null, "item": [1, {"a": "b"}]}"#, Some(false)),
        (
            r#" { "x" : [ { } , [ ] , -1.5e+3 , "y" ] , "item" : "é" , "hist" : { "svc" : "s" , "dt" : null , "refs" : null } } "#,
            Some(true),
        ),
        (
            r#"{"item": {"n": 1}, "hist": {"svc": "py-svc", "dt": "2026-11-22T09:34:06+00:00", "refs": [{"topic": "raw", "partition": 0, "offset": 7, "key": "a", "hist": null}]}}"#,
            Some(true),
        ),
        (r#"{"item": 1, "hist": {"svc": "\u00e9"}}"#, Some(true)),
        (r#"{"item": 1, "x": "a\"b"}"#, Some(false)),
        // Histories the scan leaves to the check, the item still read once.
        (r#"{"item": 1, "hist": {"svc": "\ud800"}}"#, Some(false)),
        (r#"{"item": 1, "hist": {"s\u0076c": "a"}}"#, Some(false)),
        (
            r#"{"item": 1, "hist": {"refs": {"topic": "t"}}}"#,
            Some(false),
        ),
        (r#"{"item": 1, "hist": 7}"#, Some(false)),
        // What the full path decides.
        (r#"{"item": 1, "item": 2}"#, None),
        (r#"{"item": 1, "hist": null, "hist": null}"#, None),
        (r#"{"\u0069tem": 1}"#, None),
        (r#"{"item": 1, "x": 01}"#, None),
        (r#"{"item": 1, "hist": {"svc": "a"} x}"#, None),
        (r#"{"item": 1, "hist": {"svc": "\x"}}"#, None),
        (r#"{"item": 1} x"#, None),
        (r#"{"item": 1,}"#, None),
        (r#"{"item": 1 "hist": null}"#, None),
        (r#"{}"#, None),
        ("{\"item\": 1, \"x\": \"\u{1}\"}", None),
    ] {
        assert_eq!(fast_route(value), route, "{value}");
    }
}

#[test]
fn a_payload_nested_to_the_recursion_limit_fails_as_before() {
    // serde_json's limit of 128 counts the envelope object too.
    for levels in [100, 119, 120, 126, 127, 128, 200] {
        let item = format!("{}{}", "[".repeat(levels), "]".repeat(levels));
        let value = format!(r#"{{"item": {item}, "hist": null}}"#);
        assert_eq!(
            outcome::<Value>(value.as_bytes(), Path::Fast),
            outcome::<Value>(value.as_bytes(), Path::Full),
            "{levels} levels"
        );
    }
}

#[test]
fn a_checked_history_is_written_back_as_read() {
    let history = r#"{ "svc" : "s", "dt": "d" , "refs": [ {"topic": "t", "partition": -2147483648, "offset": 0, "key": null, "hist": null, "x": [1e5, true]} ] }"#;
    let value = format!("{{\"item\": 1, \"hist\": \t{history}\n}}");
    let (_, hist) = fast::envelope::<Value>(value.as_bytes(), None).unwrap();
    assert!(matches!(hist, Some(RawHist::Checked(text)) if text == history));
    let m = decode(Some(b"k"), value.as_bytes()).unwrap().unwrap();
    let own = m.source().unwrap().hist.as_ref().unwrap();
    assert_eq!(own.raw_json(), Some(history));
    assert_eq!(own.refs[0].partition, i32::MIN);
}

#[test]
fn a_history_repeated_byte_for_byte_is_not_scanned_again() {
    // A history the scan leaves to `check_hist` (an escaped field name), so
    // that only the shortcut can answer `Checked` for it.
    let history = r#"{"s\u0076c": "a", "dt": "d", "refs": []}"#;
    let value = format!(r#"{{"item": 1, "hist": {history}, "x": 2}}"#);
    let route = |last| match fast::envelope::<Value>(value.as_bytes(), last) {
        Some((_, Some(RawHist::Checked(text)))) => Some(text == history),
        _ => None,
    };
    assert_eq!(route(None), None, "scanned: left to the check");
    assert_eq!(route(Some(history)), Some(true), "repeated: taken as read");
    assert_eq!(route(Some(r#"{"svc": "a"}"#)), None, "another history");

    // Two records with the same history share one.
    let mut last = LastHistory::default();
    let mut read = || {
        unpack_parts_by::<Value>(
            record(Some(b"k"), Some(value.as_bytes())),
            &mut last,
            Path::Fast,
        )
        .unwrap()
        .unwrap()
        .hist
        .unwrap()
    };
    let (first, second) = (read(), read());
    assert!(std::sync::Arc::ptr_eq(&first.0, &second.0));
    assert_eq!(second.svc, "a");
}
