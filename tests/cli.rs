//! The `kafka-batch` command, tested as a user runs it: the built binary
//! against an embedded broker started in this process, checking standard
//! output, standard error and exit codes.
//!
//! `cargo test --features cli --test cli`
#![cfg(feature = "cli")]

mod common;
#[path = "cli/run.rs"]
mod run;

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Read};
use std::process::Stdio;

use common::*;
use kafka_batch::envelope::format_dt;
use kafka_batch::settings::FailurePolicy;
use kafka_batch::testing::EmbeddedBroker;
use kafka_batch::{Consumer, Hist, Message, Ref};
use run::*;
use serde_json::{json, Value};
use time::OffsetDateTime;

#[test]
fn every_subcommand_has_help_and_usage_errors_exit_2() {
    for sub in [
        &["--help"][..],
        &["broker", "--help"],
        &["tail", "--help"],
        &["lag", "--help"],
        &["dead", "--help"],
        &["dead", "list", "--help"],
        &["dead", "replay", "--help"],
        &["produce", "--help"],
    ] {
        let help = run(sub);
        help.assert_ok();
        assert!(
            help.stdout.contains("Exit codes:"),
            "{sub:?}: {}",
            help.stdout
        );
        assert!(help.stdout.contains("3  cannot reach the brokers"));
    }
    assert_eq!(run(&["tail"]).code(), Some(2));
    assert_eq!(run(&["tail", "t", "--from", "sideways"]).code(), Some(2));
    assert_eq!(run(&["broker", "events"]).code(), Some(2));
}

#[test]
fn tail_prints_one_line_per_envelope_and_its_options_select() {
    let broker = broker_with("events", 2);
    produce_to(&broker, "events", &[(0, 0), (0, 1), (0, 2), (1, 3), (1, 4)]);

    let all = run(&at(&broker, &["tail", "events"]));
    all.assert_ok();
    let lines: BTreeSet<&str> = all.lines().into_iter().collect();
    let expected: BTreeSet<&str> = [
        r#"events:0:0 m0 {"n":0}"#,
        r#"events:0:1 m1 {"n":1}"#,
        r#"events:0:2 m2 {"n":2}"#,
        r#"events:1:0 m3 {"n":3}"#,
        r#"events:1:1 m4 {"n":4}"#,
    ]
    .into();
    assert_eq!(lines, expected, "stderr: {}", all.stderr);
    assert_eq!(all.lines().len(), 5);

    let counted = run(&at(&broker, &["tail", "events", "--count", "2"]));
    assert_eq!(counted.assert_ok().lines().len(), 2);

    let last = run(&at(&broker, &["tail", "events", "--from", "-1"]));
    let lines: BTreeSet<&str> = last.assert_ok().lines().into_iter().collect();
    assert_eq!(
        lines,
        [r#"events:0:2 m2 {"n":2}"#, r#"events:1:1 m4 {"n":4}"#].into()
    );

    let one = run(&at(&broker, &["tail", "events", "--partition", "1"]));
    assert_eq!(
        one.assert_ok().lines(),
        [r#"events:1:0 m3 {"n":3}"#, r#"events:1:1 m4 {"n":4}"#]
    );

    // Nothing was written after an hour from now: @TIME starts at each end.
    // (librdkafka's mock cluster answers every by-time lookup with "none",
    // so finding the first record after a past time needs a real broker.)
    let later = format!(
        "@{}",
        format_dt(OffsetDateTime::now_utc() + time::Duration::hours(1))
    );
    let none = run(&at(&broker, &["tail", "events", "--from", &later]));
    assert_eq!(none.assert_ok().lines().len(), 0);
    let bad_time = run(&at(&broker, &["tail", "events", "--from", "@yesterday"]));
    assert_eq!(bad_time.code(), Some(2));

    let json = run(&at(
        &broker,
        &["tail", "events", "--json", "--partition", "0"],
    ));
    json.assert_ok();
    let objects: Vec<Value> = json
        .lines()
        .iter()
        .map(|l| serde_json::from_str(l).expect("each line is JSON"))
        .collect();
    assert_eq!(objects.len(), 3);
    for (i, o) in objects.iter().enumerate() {
        assert_eq!(o["topic"], "events");
        assert_eq!(o["partition"], 0);
        assert_eq!(o["offset"], i);
        assert_eq!(o["id"], format!("m{i}"));
        assert_eq!(o["payload"], json!({ "n": i }));
        assert_eq!(o["hist"]["svc"], "test-origin");
    }

    let missing = run(&at(&broker, &["tail", "events", "--partition", "7"]));
    assert_eq!(missing.code(), Some(4));
    assert_eq!(missing.stderr_lines().len(), 1, "{}", missing.stderr);
}

#[test]
fn tail_provenance_shows_each_hop_and_the_stage_latencies() {
    let broker = broker_with("enriched", 1);
    let origin = Hist {
        svc: "test-origin".into(),
        dt: format_dt(OffsetDateTime::now_utc() - time::Duration::seconds(2)),
        refs: vec![],
    };
    let derived = Message::new("m1", json!({"big": true})).with_refs(vec![Ref {
        topic: "events".into(),
        partition: 3,
        offset: 42,
        key: Some("m1".into()),
        hist: Some(origin.into()),
    }]);
    let value = envelope("test-enricher", &derived);
    broker
        .produce_raw("enriched", &[(0, Some(b"m1"), Some(&value))])
        .expect("produced");

    let text = run(&at(&broker, &["tail", "enriched", "--provenance"]));
    let lines = text.assert_ok().lines();
    assert_eq!(lines[0], r#"enriched:0:0 m1 {"big":true}"#);
    assert!(
        lines[1].trim_start().starts_with("test-enricher at "),
        "{lines:?}"
    );
    assert!(lines[1].ends_with(" enriched:0:0"), "{lines:?}");
    assert!(
        lines[2].trim_start().starts_with("<- test-origin at "),
        "{lines:?}"
    );
    assert!(lines[2].ends_with(" events:3:42"), "{lines:?}");
    assert!(lines[3].contains("stages: test-enricher "), "{lines:?}");
    assert!(lines[3].contains("total "), "{lines:?}");

    let json = run(&at(
        &broker,
        &["tail", "enriched", "--json", "--provenance"],
    ));
    let object: Value = serde_json::from_str(json.assert_ok().lines()[0]).expect("JSON");
    let hops = object["provenance"]["hops"].as_array().expect("hops");
    assert_eq!(hops.len(), 2);
    assert_eq!(hops[1]["svc"], "test-origin");
    assert_eq!(hops[1]["topic"], "events");
    assert_eq!(object["provenance"]["stages"][0][0], "test-enricher");
}

#[test]
fn records_that_are_not_envelopes_are_shown_raw_with_their_error() {
    let broker = broker_with("mixed", 1);
    let good = envelope("test-origin", &Message::new("ok", json!(1)));
    let no_key = envelope("test-origin", &Message::new("x", json!(2)));
    broker
        .produce_raw(
            "mixed",
            &[
                (0, Some(b"k1"), Some(b"not json")),
                (0, Some(b"k2"), Some(br#"{"no":"item"}"#)),
                (0, None, Some(&no_key)),
                (0, Some(b"k4"), None),
                (0, Some(b"\xff\x00"), Some(b"\xfe\nbinary")),
                (0, Some(b"ok"), Some(&good)),
            ],
        )
        .expect("produced");
    let out = run(&at(&broker, &["tail", "mixed"]));
    let lines = out.assert_ok().lines();
    assert_eq!(out.stderr, "", "no error for records shown raw");
    assert_eq!(lines.len(), 6, "{lines:?}");
    assert!(lines[0].starts_with(r#"mixed:0:0 ! key="k1" value="not json" error: "#));
    assert!(lines[0].contains("not JSON"), "{}", lines[0]);
    assert!(lines[1].contains("not an envelope"), "{}", lines[1]);
    assert!(
        lines[2].starts_with("mixed:0:2 ! key=null value="),
        "{}",
        lines[2]
    );
    assert!(lines[2].contains("key is null"), "{}", lines[2]);
    assert!(lines[3].contains("value=null") && lines[3].contains("tombstone"));
    assert!(
        lines[4].starts_with(r#"mixed:0:4 ! key="\xff\x00" value="\xfe\nbinary""#),
        "{}",
        lines[4]
    );
    assert_eq!(lines[5], "mixed:0:5 ok 1");

    let json = run(&at(&broker, &["tail", "mixed", "--json"]));
    for line in json.assert_ok().lines() {
        serde_json::from_str::<Value>(line).expect("raw records are JSON lines too");
    }
}

#[test]
fn a_topic_that_does_not_exist_is_one_clear_line_and_exit_4() {
    let broker = EmbeddedBroker::start().expect("broker");
    for args in [
        &["tail", "nope"][..],
        &["lag", "g", "nope"],
        &["dead", "list", "nope"],
        &["produce", "nope"],
    ] {
        let out = run(&at(&broker, args));
        assert_eq!(out.code(), Some(4), "{args:?}: {}", out.stderr);
        assert_eq!(out.stderr_lines().len(), 1, "{args:?}: {}", out.stderr);
        assert!(out.stderr.contains(r#"topic "nope" does not exist"#));
    }
}

#[test]
fn an_unreachable_broker_is_one_line_and_exit_3() {
    // A port that was free a moment ago and has no listener now.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("address")
        .port();
    let servers = format!("127.0.0.1:{port}");
    for args in [
        &["tail", "t"][..],
        &["lag", "g"],
        &["dead", "list", "t.dead"],
    ] {
        let mut all = vec!["--bootstrap-servers", servers.as_str(), "--timeout", "3"];
        all.extend_from_slice(args);
        let out = run(&all);
        assert_eq!(out.code(), Some(3), "{args:?}: {}", out.stderr);
        assert_eq!(out.stderr_lines().len(), 1, "{args:?}: {}", out.stderr);
        assert!(
            out.stderr.starts_with(&format!(
                "kafka-batch: cannot reach the brokers at {servers}"
            )),
            "{}",
            out.stderr
        );
        assert_eq!(out.stdout, "");
    }
    // The default timeout (10 s) too, fed from standard input.
    let out = run_with_input(&["--bootstrap-servers", &servers, "produce", "t"], "{}\n");
    assert_eq!(out.code(), Some(3), "{}", out.stderr);
    assert_eq!(out.stderr_lines().len(), 1, "{}", out.stderr);
}

#[test]
fn a_closed_stdout_ends_tail_quietly_with_exit_0() {
    let broker = broker_with("big", 1);
    // Far more than a pipe buffer holds, so tail is still writing when the pipe closes.
    let records: Vec<(i32, usize)> = (0..20_000).map(|i| (0, i)).collect();
    produce_to(&broker, "big", &records);
    let mut child = command(&at(&broker, &["tail", "big"]))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starts");
    let mut stdout = BufReader::new(child.stdout.take().expect("piped"));
    let mut first = String::new();
    stdout.read_line(&mut first).expect("one line");
    assert_eq!(first, "big:0:0 m0 {\"n\":0}\n");
    drop(stdout);
    let mut stderr = child.stderr.take().expect("piped");
    let run = finish(child);
    let mut errors = String::new();
    let _ = stderr.read_to_string(&mut errors);
    assert!(run.status.success(), "exit {:?}", run.status);
    assert_eq!(errors, "", "a closed pipe is not an error");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lag_shows_committed_log_end_and_lag_before_and_after_a_commit() {
    let broker = broker_with("orders", 2);
    broker.create_topic("other", 1).expect("topic");
    produce_to(&broker, "orders", &[(0, 0), (0, 1), (0, 2), (1, 3), (1, 4)]);
    produce_to(&broker, "other", &[(0, 9)]);

    let before = run(&at(&broker, &["lag", "g", "orders"]));
    let rows: Vec<Vec<&str>> = before
        .assert_ok()
        .lines()
        .iter()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(
        rows[0],
        ["TOPIC", "PARTITION", "COMMITTED", "LOG-END", "LAG"]
    );
    assert_eq!(rows[1], ["orders", "0", "-", "3", "-"]);
    assert_eq!(rows[2], ["orders", "1", "-", "2", "-"]);
    assert_eq!(rows[3], ["TOTAL", "0", "0", "0"]);

    collect_batches(&consumer_settings(&broker, "g", "orders", 100, 100), 5).await;
    produce_to(&broker, "orders", &[(0, 5), (0, 6)]);

    for args in [&["lag", "g", "orders"][..], &["lag", "g"]] {
        let after = run(&at(&broker, args));
        let rows: Vec<Vec<&str>> = after
            .assert_ok()
            .lines()
            .iter()
            .map(|l| l.split_whitespace().collect())
            .collect();
        assert_eq!(
            rows.len(),
            4,
            "{args:?}: only orders, where g committed: {rows:?}"
        );
        assert_eq!(rows[1], ["orders", "0", "3", "5", "2"]);
        assert_eq!(rows[2], ["orders", "1", "2", "2", "0"]);
        assert_eq!(rows[3], ["TOTAL", "5", "7", "2"]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_list_shows_the_failure_headers_and_replay_writes_them_back() {
    let broker = broker_with("orders", 1);
    broker.create_topic("orders.dead", 1).expect("topic");
    broker.create_topic("orders.fixed", 1).expect("topic");
    produce_to(&broker, "orders", &[(0, 0), (0, 1), (0, 2)]);
    let mut settings = consumer_settings(&broker, "g", "orders", 100, 100);
    settings.failure.policies = vec![FailurePolicy::DeadLetter];
    settings.failure.dead_letter.topic = "orders.dead".into();
    let consumer = Consumer::new(&settings).expect("consumer");
    let handle = consumer.handle();
    let process = consumer.process(async |_batch: Vec<Message<Value>>| {
        Err::<(), _>(std::io::Error::other("downstream is down"))
    });
    let stopper = async {
        wait_until("3 dead letters", LIMIT, || {
            handle.stats().dead_lettered == 3
        })
        .await;
        handle.shutdown();
    };
    let (result, ()) = within(LIMIT, async { tokio::join!(process, stopper) }).await;
    result.expect("the consumer stops cleanly");

    let list = run(&at(&broker, &["dead", "list", "orders.dead"]));
    let lines = list.assert_ok().lines();
    assert_eq!(lines.len(), 3, "{lines:?}");
    for (i, line) in lines.iter().enumerate() {
        assert!(
            line.starts_with(&format!(
                "orders.dead:0:{i} key=\"m{i}\" source=orders:0:{i} attempts="
            )),
            "{line}"
        );
        assert!(line.contains(" reason=handler "), "{line}");
        assert!(line.contains(" failed_at=20"), "{line}");
        assert!(line.ends_with(r#"error="downstream is down""#), "{line}");
    }

    let dry = run(&at(
        &broker,
        &["dead", "replay", "orders.dead", "--dry-run"],
    ));
    let lines = dry.assert_ok().lines();
    assert_eq!(lines.len(), 3);
    assert!(lines
        .iter()
        .all(|l| l.starts_with("would replay to orders: ")));
    assert_eq!(
        log_ends(&broker, "orders", 1),
        [3],
        "a dry run writes nothing"
    );

    let some = run(&at(
        &broker,
        &[
            "dead",
            "replay",
            "orders.dead",
            "--from",
            "1",
            "--to",
            "orders.fixed",
        ],
    ));
    assert_eq!(
        some.assert_ok().lines()[0],
        "replayed 2 records (orders.fixed=2)"
    );
    let fixed = run(&at(&broker, &["tail", "orders.fixed"]));
    assert_eq!(
        fixed.assert_ok().lines(),
        [
            r#"orders.fixed:0:0 m1 {"n":1}"#,
            r#"orders.fixed:0:1 m2 {"n":2}"#
        ]
    );

    let back = run(&at(&broker, &["dead", "replay", "orders.dead"]));
    assert_eq!(back.assert_ok().lines()[0], "replayed 3 records (orders=3)");
    assert_eq!(log_ends(&broker, "orders", 1), [6]);
}

#[test]
fn produce_packs_stdin_lines_and_tail_shows_them_with_their_ids() {
    let broker = broker_with("events", 1);
    let input = "{\"id\": \"e1\", \"title\": \"Concert\"}\n\n{\"id\": 7}\n{\"title\": \"no id\"}\n";
    let out = run_with_input(
        &at(
            &broker,
            &[
                "produce",
                "events",
                "--id-field",
                "id",
                "--service",
                "loader",
            ],
        ),
        input,
    );
    out.assert_ok();
    assert_eq!(out.stderr_lines(), ["delivered 3 records to events"]);

    let tail = run(&at(&broker, &["tail", "events", "--json"]));
    let objects: Vec<Value> = tail
        .assert_ok()
        .lines()
        .iter()
        .map(|l| serde_json::from_str(l).expect("JSON"))
        .collect();
    assert_eq!(objects.len(), 3);
    assert_eq!(objects[0]["id"], "e1");
    assert_eq!(
        objects[0]["payload"],
        json!({"id": "e1", "title": "Concert"})
    );
    assert_eq!(objects[1]["id"], "7");
    let fresh = objects[2]["id"].as_str().expect("an id");
    assert!(!fresh.is_empty() && fresh != "e1" && fresh != "7");
    assert!(objects.iter().all(|o| o["hist"]["svc"] == "loader"));

    // A line that is not JSON: what came before is produced, then it stops.
    let bad = run_with_input(
        &at(&broker, &["produce", "events", "--id-field", "id"]),
        "{\"id\": \"ok\"}\nnot json\n{\"id\": \"after\"}\n",
    );
    assert_eq!(bad.code(), Some(1));
    assert!(bad.stderr.contains("line 2 is not JSON"), "{}", bad.stderr);
    let ids: Vec<String> = run(&at(&broker, &["tail", "events", "--json"]))
        .lines()
        .iter()
        .map(|l| serde_json::from_str::<Value>(l).expect("JSON")["id"].to_string())
        .collect();
    assert_eq!(ids.len(), 4, "{ids:?}");
    assert_eq!(ids[3], "\"ok\"");
}

#[test]
fn broker_prints_its_address_serves_clients_and_stops_on_sigterm() {
    let mut child = command(&["broker", "jobs:3"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("starts");
    let mut stdout = BufReader::new(child.stdout.take().expect("piped"));
    let mut address = String::new();
    stdout.read_line(&mut address).expect("the first line");
    let address = address.trim().to_owned();
    assert!(address.starts_with("127.0.0.1:"), "{address:?}");

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let producer = kafka_batch::Producer::new(&kafka_batch::ProducerSettings::new(&address))
            .expect("producer");
        producer
            .produce_batch("jobs", &[Message::new("j1", json!({"job": 1}))])
            .await
            .expect("delivered");
    });
    let read: Vec<Message<Value>> =
        kafka_batch::testing::read_messages(&address, "jobs", 1, LIMIT).expect("read back");
    assert_eq!(read.len(), 1);
    assert_eq!(read[0].id, "j1");
    let tail = run(&["--bootstrap-servers", &address, "tail", "jobs"]);
    assert_eq!(tail.assert_ok().lines().len(), 1);

    // SAFETY: kill(2) on the pid of a child we started and still own.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
    let run = finish(child);
    assert!(run.status.success(), "exit {:?}", run.status);
}

#[test]
fn tail_follow_waits_for_new_records_until_its_count() {
    let broker = broker_with("live", 2);
    produce_to(&broker, "live", &[(0, 0)]);
    let child = command(&at(&broker, &["tail", "live", "--follow", "--count", "3"]))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starts");
    // Written while tail runs (or before it assigns: it starts at the
    // beginning it saw, so either way it must wait for the third).
    produce_to(&broker, "live", &[(1, 1), (0, 2)]);
    let run = finish(child);
    let lines: BTreeSet<&str> = run.assert_ok().lines().into_iter().collect();
    assert_eq!(
        lines,
        [
            r#"live:0:0 m0 {"n":0}"#,
            r#"live:1:0 m1 {"n":1}"#,
            r#"live:0:1 m2 {"n":2}"#
        ]
        .into()
    );
}
