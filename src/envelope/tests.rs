use super::*;
use proptest::prelude::*;
use serde_json::{json, Value};

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
    let kept: Vec<(String, usize)> = latest_only(batch)
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
        |(topic, partition, offset, key)| Ref {
            topic,
            partition,
            offset,
            key,
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
        if !text.contains('\\') {
            prop_assert!(super::scan::plainly_valid(text.as_bytes()), "{}", text);
        }
    }
}

#[test]
fn the_quick_scan_leaves_the_unusual_to_the_full_check() {
    let plain = r#"{"svc": "a", "dt": null, "x": [1, {"y": "}"}], "refs": [{"topic": "t", "partition": -3, "offset": 9223372036854775807, "key": null, "hist": {"svc": "b", "dt": "d", "refs": []}}]}"#;
    assert!(scan::plainly_valid(plain.as_bytes()));
    for unusual in [
        r#"{"svc": "a\"b"}"#,
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
