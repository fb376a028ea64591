// figment::Jail fixes the closures' error type (figment::Error, which is large).
#![allow(clippy::result_large_err)]

use super::*;
use figment::Jail;

fn load_in(jail: &mut Jail, toml: &str) -> Result<Settings, SettingsError> {
    jail.create_file("settings.toml", toml)
        .expect("write the test's TOML file");
    Settings::load_file("settings.toml")
}

fn message(result: Result<Settings, SettingsError>) -> String {
    match result {
        Ok(s) => panic!("expected an error, got {s:?}"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn config_default_toml_holds_exactly_the_defaults() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/config/default.toml");
    let from_file: Settings = Figment::from(Toml::file_exact(path))
        .extract()
        .expect("config/default.toml parses as Settings");
    assert_eq!(
        from_file,
        Settings::default(),
        "config/default.toml drifted from the code's defaults"
    );
}

#[test]
fn toml_then_env_then_code() {
    Jail::expect_with(|jail| {
        jail.set_env("KAFKA_BATCH_CONSUMER__BATCH_SIZE", "42");
        jail.set_env("KAFKA_BATCH_CONSUMER__TOPICS", "a, b");
        jail.create_file(
            "settings.toml",
            r#"
            service = "enricher"
            bootstrap_servers = "file:9092"
            [consumer]
            group_id = "g"
            batch_size = 7
            batch_timeout_ms = 250
            topics = ["from-file"]
            "#,
        )?;
        let figment = Settings::figment_for(Some(Path::new("settings.toml")))
            .merge(("consumer.latest_only", true));
        let s = Settings::from_figment(figment).expect("valid settings");
        assert_eq!(s.consumer.batch_size, 42, "env beats the file");
        assert_eq!(
            s.consumer.batch_timeout_ms, 250,
            "the file beats the defaults"
        );
        assert_eq!(
            s.consumer.topics,
            vec!["a", "b"],
            "a comma-separated list from env"
        );
        assert!(s.consumer.latest_only, "code beats everything");
        assert_eq!(
            s.consumer.bootstrap_servers, "file:9092",
            "inherited from the top level"
        );
        assert_eq!(s.consumer.service, "enricher");
        assert_eq!(s.producer.service, "enricher");
        Ok(())
    });
}

#[test]
fn librdkafka_properties_pass_through_from_toml_and_env() {
    Jail::expect_with(|jail| {
        jail.set_env("KAFKA_BATCH_CONSUMER__KAFKA__FETCH_MAX_BYTES", "2097152");
        jail.set_env("KAFKA_BATCH_KAFKA__SECURITY_PROTOCOL", "ssl");
        let s = load_in(
            jail,
            r#"
            bootstrap_servers = "b:9092"
            [kafka]
            "client.id" = "from-top"
            [consumer]
            group_id = "g"
            topics = ["t"]
            [consumer.kafka]
            "client.id" = "consumer-wins"
            "queued.min.messages" = 1000
            "check.crcs" = true
            [producer.kafka]
            "linger.ms" = 20
            "#,
        )
        .expect("valid settings");
        let c = &s.consumer.kafka;
        assert_eq!(
            c.get("fetch.max.bytes"),
            Some("2097152"),
            "dots written as _ in env"
        );
        assert_eq!(
            c.get("security.protocol"),
            Some("ssl"),
            "top-level env for both clients"
        );
        assert_eq!(c.get("client.id"), Some("consumer-wins"));
        assert_eq!(
            c.get("queued.min.messages"),
            Some("1000"),
            "numbers become text"
        );
        assert_eq!(c.get("check.crcs"), Some("true"));
        assert_eq!(s.producer.kafka.get("client.id"), Some("from-top"));
        assert_eq!(s.producer.kafka.get("linger.ms"), Some("20"));
        assert_eq!(s.producer.kafka.get("security.protocol"), Some("ssl"));

        let config = s.consumer.client_config().expect("consumer config");
        assert_eq!(config.get("fetch.max.bytes"), Some("2097152"));
        // librdkafka commits on an interval, and only what kafka-batch stored.
        assert_eq!(config.get("enable.auto.commit"), Some("true"));
        assert_eq!(config.get("auto.commit.interval.ms"), Some("1000"));
        assert_eq!(config.get("enable.auto.offset.store"), Some("false"));
        assert_eq!(config.get("auto.offset.reset"), Some("latest"));
        assert_eq!(config.get("group.id"), Some("g"));
        let config = s.producer.client_config().expect("producer config");
        assert_eq!(config.get("acks"), Some("all"));
        assert_eq!(config.get("compression.type"), Some("snappy"));
        Ok(())
    });
}

#[test]
fn unknown_setting_names_are_rejected() {
    Jail::expect_with(|jail| {
        let text = message(load_in(jail, "[consumer]\nbach_size = 10\n"));
        assert!(text.contains("bach_size"), "{text}");
        Ok(())
    });
    Jail::expect_with(|jail| {
        jail.set_env("KAFKA_BATCH_CONSUMER__BATCHSIZE", "10");
        let text = message(load_in(jail, ""));
        assert!(text.contains("batchsize"), "{text}");
        Ok(())
    });
}

#[test]
fn auto_commit_is_refused_with_the_reason() {
    Jail::expect_with(|jail| {
        let text = message(load_in(
            jail,
            "[consumer.kafka]\n\"enable.auto.commit\" = true\n",
        ));
        assert!(text.contains("enable.auto.commit"), "{text}");
        assert!(text.contains("never handled"), "{text}");
        Ok(())
    });
    Jail::expect_with(|jail| {
        jail.set_env("KAFKA_BATCH_KAFKA__ENABLE_AUTO_COMMIT", "true");
        let text = message(load_in(jail, ""));
        assert!(text.contains("enable.auto.commit"), "{text}");
        Ok(())
    });
}

#[test]
fn the_commit_interval_is_a_setting_of_its_own() {
    Jail::expect_with(|jail| {
        let text = message(load_in(
            jail,
            "[consumer.kafka]\n\"auto.commit.interval.ms\" = 100\n",
        ));
        assert!(text.contains("consumer.commit_interval_ms"), "{text}");
        Ok(())
    });
    Jail::expect_with(|jail| {
        jail.set_env("KAFKA_BATCH_CONSUMER__COMMIT_INTERVAL_MS", "0");
        let s = load_in(
            jail,
            "[consumer]\ngroup_id = \"g\"\ntopics = [\"t\"]\nbootstrap_servers = \"b:9092\"\n",
        )
        .expect("the settings load");
        assert_eq!(s.consumer.commit_interval_ms, 0);
        let config = s.consumer.client_config().expect("consumer config");
        // 0: every commit is made by the poller, one by one.
        assert_eq!(config.get("enable.auto.commit"), Some("false"));
        Ok(())
    });
    Jail::expect_with(|jail| {
        let text = message(load_in(
            jail,
            "[consumer]\ncommit_interval_ms = 100000000\n",
        ));
        assert!(text.contains("consumer.commit_interval_ms"), "{text}");
        Ok(())
    });
}

#[test]
fn zero_sizes_are_refused() {
    for setting in [
        "batch_size",
        "batch_timeout_ms",
        "max_batch_bytes",
        "prefetch_batches",
        "concurrency",
        "clients",
    ] {
        Jail::expect_with(|jail| {
            let text = message(load_in(jail, &format!("[consumer]\n{setting} = 0\n")));
            assert!(text.contains(&format!("consumer.{setting}")), "{text}");
            assert!(text.contains("at least 1"), "{text}");
            Ok(())
        });
    }
}

#[test]
fn a_consumer_needs_brokers_a_group_and_topics() {
    let ok = ConsumerSettings::new("b:9092", "g", &["t"]);
    assert!(ok.validate().is_ok());
    let cases = [
        (
            ConsumerSettings::new("", "g", &["t"]),
            "consumer.bootstrap_servers",
        ),
        (
            ConsumerSettings::new("b:9092", "", &["t"]),
            "consumer.group_id",
        ),
        (ConsumerSettings::new("b:9092", "g", &[]), "consumer.topics"),
    ];
    for (settings, expected) in cases {
        let text = settings.validate().expect_err(expected).to_string();
        assert!(text.contains(expected), "{text}");
        assert!(
            text.contains("KAFKA_BATCH_"),
            "the error says how to fix it: {text}"
        );
    }
}

#[test]
fn a_missing_config_file_is_an_error_but_no_default_file_is_fine() {
    Jail::expect_with(|jail| {
        jail.set_env("KAFKA_BATCH_CONFIG", "nope.toml");
        let text = message(Settings::load());
        assert!(text.contains("nope.toml"), "{text}");
        Ok(())
    });
    Jail::expect_with(|_| {
        let mut defaults = Settings::default();
        defaults.resolve();
        assert_eq!(Settings::load().expect("defaults"), defaults);
        Ok(())
    });
}

#[test]
fn reserved_properties_name_their_setting() {
    let mut s = ConsumerSettings::new("b:9092", "g", &["t"]);
    s.kafka.set("group.id", "other");
    let text = s.validate().expect_err("group.id is reserved").to_string();
    assert!(
        text.contains("consumer_group") || text.contains("consumer.group_id"),
        "{text}"
    );
}

#[test]
fn a_revoke_timeout_that_would_outlast_max_poll_interval_is_refused() {
    let mut s = ConsumerSettings::new("b:9092", "g", &["t"]);
    s.kafka.set("max.poll.interval.ms", "20000");
    let text = s
        .validate()
        .expect_err("30 s revoke wait > 20 s poll interval")
        .to_string();
    assert!(
        text.contains("consumer.revoke_timeout_ms") && text.contains("evicted"),
        "{text}"
    );
    s.revoke_timeout_ms = 10_000;
    assert!(s.validate().is_ok());
}

#[test]
fn the_failure_chain_loads_from_toml_and_env() {
    Jail::expect_with(|jail| {
        jail.set_env(
            "KAFKA_BATCH_CONSUMER__FAILURE__POLICIES",
            "retry, retry_topic, dead_letter",
        );
        jail.set_env("KAFKA_BATCH_CONSUMER__FAILURE__RETRY__RETRIES", "5");
        let s = load_in(
            jail,
            r#"
            bootstrap_servers = "b:9092"
            [consumer]
            group_id = "g"
            topics = ["events"]
            [consumer.failure]
            policies = ["skip"]
            [consumer.failure.retry]
            backoff_ms = 250
            [consumer.failure.retry_topic]
            topic = "events.retry"
            [consumer.failure.dead_letter]
            topic = "events.dead"
            [consumer.failure.kafka]
            "linger.ms" = 5
            "#,
        )
        .expect("valid settings");
        let f = &s.consumer.failure;
        assert_eq!(
            f.policies,
            [
                FailurePolicy::Retry,
                FailurePolicy::RetryTopic,
                FailurePolicy::DeadLetter
            ],
            "env beats the file"
        );
        assert_eq!((f.retry.retries, f.retry.backoff_ms), (5, 250));
        assert_eq!(s.consumer.subscription(), ["events", "events.retry"]);
        let producer = s.consumer.failure_producer_config().expect("config");
        assert_eq!(producer.get("linger.ms"), Some("5"));
        assert_eq!(producer.get("acks"), Some("all"));
        assert_eq!(
            producer.get("fetch.max.bytes"),
            None,
            "consumer-only properties are left out"
        );
        Ok(())
    });
}

#[test]
fn a_failure_chain_that_cannot_work_is_refused_with_the_fix() {
    use FailurePolicy::*;
    let check = |policies: &[FailurePolicy], edit: &dyn Fn(&mut ConsumerSettings)| {
        let mut s = ConsumerSettings::new("b:9092", "g", &["events"]);
        s.failure.policies = policies.to_vec();
        s.failure.dead_letter.topic = "events.dead".into();
        s.failure.retry_topic.topic = "events.retry".into();
        edit(&mut s);
        s.validate().map_err(|e| e.to_string())
    };
    let none = &|_: &mut ConsumerSettings| {};
    assert!(check(&[Retry, RetryTopic, DeadLetter], none).is_ok());
    assert!(check(&[Skip, Retry], none)
        .unwrap_err()
        .contains("end the chain"));
    assert!(check(&[Retry, Retry], none).unwrap_err().contains("twice"));
    assert!(check(&[], none).unwrap_err().contains("is empty"));
    let no_topic = check(&[DeadLetter], &|s| s.failure.dead_letter.topic.clear()).unwrap_err();
    assert!(
        no_topic.contains("consumer.failure.dead_letter.topic"),
        "{no_topic}"
    );
    let reads_itself = check(&[RetryTopic, DeadLetter], &|s| {
        s.failure.retry_topic.topic = "events".into()
    })
    .unwrap_err();
    assert!(
        reads_itself.contains("one of consumer.topics"),
        "{reads_itself}"
    );
    let loop_back = check(&[DeadLetter], &|s| {
        s.failure.dead_letter.topic = "events".into()
    })
    .unwrap_err();
    assert!(loop_back.contains("consumed again"), "{loop_back}");
    let jitter = check(&[Retry], &|s| s.failure.retry.jitter = 1.5).unwrap_err();
    assert!(jitter.contains("consumer.failure.retry.jitter"), "{jitter}");
    let shrinking = check(&[Retry], &|s| s.failure.retry.backoff_multiplier = 0.5).unwrap_err();
    assert!(shrinking.contains("backoff_multiplier"), "{shrinking}");
    let zero = check(&[RetryTopic, Fail], &|s| s.failure.retry_topic.retries = 0).unwrap_err();
    assert!(
        zero.contains("consumer.failure.retry_topic.retries"),
        "{zero}"
    );
    Jail::expect_with(|jail| {
        let err = message(load_in(
            jail,
            "[consumer.failure]\npolicies = [\"retry\", \"dead_letters\"]\n",
        ));
        assert!(
            err.contains("unknown failure policy \"dead_letters\""),
            "{err}"
        );
        Ok(())
    });
}

#[test]
fn the_metrics_table_loads_from_toml_and_env_and_reaches_the_consumer() {
    Jail::expect_with(|jail| {
        jail.set_env("KAFKA_BATCH_METRICS__LAG", "true");
        let s = load_in(
            jail,
            r#"
            bootstrap_servers = "b:9092"
            [consumer]
            group_id = "g"
            topics = ["t"]
            [metrics]
            librdkafka_statistics = true
            "#,
        )
        .expect("valid settings");
        let expected = MetricsSettings {
            prometheus_listen: String::new(),
            lag: true,
            librdkafka_statistics: true,
        };
        assert_eq!(s.metrics, expected, "the file, then env");
        assert_eq!(s.consumer.metrics, expected, "filled from the top level");
        let config = s.consumer.client_config().expect("consumer config");
        assert_eq!(
            config.get("statistics.interval.ms"),
            Some("5000"),
            "statistics on at the default interval"
        );
        Ok(())
    });
    Jail::expect_with(|jail| {
        let text = message(load_in(jail, "[metrics]\nprometheus_listn = \"x\"\n"));
        assert!(text.contains("prometheus_listn"), "{text}");
        Ok(())
    });
}

#[test]
fn statistics_are_off_unless_a_metric_needs_them_and_the_users_interval_wins() {
    let mut s = ConsumerSettings::new("b:9092", "g", &["t"]);
    let interval = |s: &ConsumerSettings| {
        s.client_config()
            .expect("config")
            .get("statistics.interval.ms")
            .map(str::to_owned)
    };
    assert_eq!(interval(&s), None, "librdkafka's default: off");
    s.metrics.lag = true;
    assert_eq!(interval(&s).as_deref(), Some("5000"));
    s.kafka.set("statistics.interval.ms", "200");
    assert_eq!(interval(&s).as_deref(), Some("200"), "the user's own wins");
    s.kafka.set("statistics.interval.ms", "0");
    assert_eq!(interval(&s).as_deref(), Some("0"), "even to turn them off");
}

#[cfg(not(feature = "prometheus"))]
#[test]
fn a_prometheus_endpoint_without_the_feature_is_refused() {
    Jail::expect_with(|jail| {
        jail.set_env("KAFKA_BATCH_METRICS__PROMETHEUS_LISTEN", "127.0.0.1:9464");
        let text = message(load_in(jail, ""));
        assert!(text.contains("metrics.prometheus_listen"), "{text}");
        assert!(text.contains("features = [\"prometheus\"]"), "{text}");
        Ok(())
    });
    let mut s = ConsumerSettings::new("b:9092", "g", &["t"]);
    s.metrics.prometheus_listen = "127.0.0.1:9464".into();
    let text = s.validate().expect_err("no feature").to_string();
    assert!(text.contains("`prometheus` cargo feature"), "{text}");
}

#[cfg(feature = "prometheus")]
#[test]
fn a_prometheus_address_loads_from_toml_and_must_parse() {
    Jail::expect_with(|jail| {
        let s = load_in(jail, "[metrics]\nprometheus_listen = \"127.0.0.1:9464\"\n")
            .expect("valid settings");
        assert_eq!(s.consumer.metrics.prometheus_listen, "127.0.0.1:9464");
        assert_eq!(
            s.metrics.prometheus_addr().expect("parses"),
            Some(([127, 0, 0, 1], 9464).into())
        );
        assert!(s.metrics.wants_statistics(), "the endpoint implies lag");
        Ok(())
    });
    Jail::expect_with(|jail| {
        jail.set_env("KAFKA_BATCH_METRICS__PROMETHEUS_LISTEN", "localhost");
        let text = message(load_in(jail, ""));
        assert!(
            text.contains("metrics.prometheus_listen") && text.contains("port"),
            "{text}"
        );
        Ok(())
    });
}

#[test]
fn lanes_are_read_from_the_file_and_the_environment() {
    Jail::expect_with(|jail| {
        jail.set_env("KAFKA_BATCH_CONSUMER__ORDERING", "unordered");
        let s = load_in(
            jail,
            "[consumer]\nconcurrency = 8\nordering = \"partition\"\nmax_in_flight_records = 2000\n",
        )
        .expect("valid settings");
        assert_eq!(s.consumer.concurrency, 8);
        assert_eq!(
            s.consumer.ordering,
            crate::settings::HandlingOrder::Unordered
        );
        assert_eq!(s.consumer.max_in_flight_records, 2000);
        Ok(())
    });
}

#[test]
fn an_unknown_ordering_names_the_choices() {
    Jail::expect_with(|jail| {
        let text = message(load_in(jail, "[consumer]\nordering = \"by_key\"\n"));
        assert!(
            text.contains("partition") && text.contains("unordered"),
            "{text}"
        );
        Ok(())
    });
}

#[test]
fn an_in_flight_cap_below_the_batch_size_is_refused() {
    Jail::expect_with(|jail| {
        let text = message(load_in(
            jail,
            "[consumer]\nbatch_size = 1000\nmax_in_flight_records = 999\n",
        ));
        assert!(text.contains("consumer.max_in_flight_records"), "{text}");
        assert!(text.contains("batch_size"), "{text}");
        Ok(())
    });
}

#[test]
fn the_jobs_table_from_toml_and_env_with_names_after_the_queue() {
    Jail::expect_with(|jail| {
        jail.set_env("KAFKA_BATCH_JOBS__CONCURRENCY", "32");
        let s = load_in(
            jail,
            r#"
            [jobs]
            queue = "mail"
            dead_topic = "mail.graveyard"
            "#,
        )
        .expect("valid");
        assert_eq!(s.jobs.concurrency, 32, "env beats the file");
        assert_eq!(s.jobs.active(), "mail.jobs");
        assert_eq!(s.jobs.delayed(), "mail.delayed");
        assert_eq!(s.jobs.dead(), "mail.graveyard", "a name set is kept");
        assert_eq!(s.jobs.group(), "mail.workers");
        assert_eq!(s.jobs.results(), None);
        Ok(())
    });
    Jail::expect_with(|jail| {
        let same = message(load_in(
            jail,
            "[jobs]\nqueue = \"q\"\ndelayed_topic = \"q.jobs\"\n",
        ));
        assert!(same.contains("must differ"), "{same}");
        let none = message(load_in(jail, "[jobs]\nconcurrency = 0\n"));
        assert!(
            none.contains("jobs.concurrency") && none.contains("1 or more"),
            "{none}"
        );
        let results = message(load_in(jail, "[jobs]\nresults_topic = \"default.dead\"\n"));
        assert!(results.contains("jobs.results_topic"), "{results}");
        Ok(())
    });
}
