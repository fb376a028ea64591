//! The queue's topics on the broker: creating them (`JobQueue::init`),
//! what waits on them, and the dead topic read back.

use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer as _};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::ClientConfig;

use super::stats::Waiting;
use crate::error::Error;
use crate::offsets::TopicPartition;
use crate::settings::{JobsSettings, Settings};

/// How long a metadata, offsets or admin request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// What [`JobQueue::init`](super::JobQueue::init) found and did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct InitReport {
    /// Topics it created.
    pub created: Vec<String>,
    /// Topics that were there already (left as they are).
    pub existing: Vec<String>,
}

impl std::fmt::Display for InitReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let list = |names: &[String]| {
            if names.is_empty() {
                "none".to_owned()
            } else {
                names.join(", ")
            }
        };
        write!(
            f,
            "created {}; already there: {}",
            list(&self.created),
            list(&self.existing)
        )
    }
}

/// A client configuration for the queue's own requests: the brokers and
/// the `kafka` table both clients share.
pub(crate) fn client_config(settings: &Settings) -> ClientConfig {
    let mut config = ClientConfig::new();
    for (k, v) in settings.kafka.iter() {
        config.set(k, v);
    }
    config.set("bootstrap.servers", &settings.producer.bootstrap_servers);
    config
}

/// The queue's topics: active, delayed, dead, and results when set.
pub(crate) fn names(jobs: &JobsSettings) -> Vec<String> {
    let mut topics = vec![jobs.active(), jobs.delayed(), jobs.dead()];
    topics.extend(jobs.results().map(str::to_owned));
    topics
}

/// Creates the topics that are missing, through the Admin API.
pub(crate) async fn init(settings: &Settings) -> Result<InitReport, Error> {
    let wanted = names(&settings.jobs);
    let config = client_config(settings);
    let probe = config.clone();
    // All topics' metadata, not the wanted ones by name: asking for a topic
    // by name lets a broker with auto-creation create it with its defaults.
    let present = tokio::task::spawn_blocking(move || -> Result<Vec<String>, Error> {
        let client: BaseConsumer = probe.create()?;
        let metadata = client.fetch_metadata(None, REQUEST_TIMEOUT)?;
        Ok(metadata
            .topics()
            .iter()
            .filter(|t| t.error().is_none())
            .map(|t| t.name().to_owned())
            .collect())
    })
    .await
    .map_err(|e| Error::Internal(format!("the metadata request's task failed: {e}")))??;
    let (existing, missing): (Vec<String>, Vec<String>) =
        wanted.into_iter().partition(|t| present.contains(t));
    let mut report = InitReport {
        created: Vec::new(),
        existing,
    };
    if missing.is_empty() {
        return Ok(report);
    }
    let admin: AdminClient<DefaultClientContext> = config.create()?;
    let jobs = &settings.jobs;
    let new: Vec<NewTopic<'_>> = missing
        .iter()
        .map(|name| {
            NewTopic::new(
                name,
                jobs.partitions,
                TopicReplication::Fixed(jobs.replication_factor),
            )
        })
        .collect();
    let options = AdminOptions::new()
        .operation_timeout(Some(REQUEST_TIMEOUT))
        .request_timeout(Some(REQUEST_TIMEOUT));
    let results = admin.create_topics(&new, &options).await.map_err(|e| {
        Error::Broker(format!(
            "cannot create the job topics {missing:?}: {e}; create them yourself \
             (librdkafka's mock cluster, the embedded broker, has no CreateTopics: \
             use EmbeddedBroker::create_topic), then call init again"
        ))
    })?;
    for result in results {
        match result {
            Ok(name) => report.created.push(name),
            // Created meanwhile by another worker's init: that is what we wanted.
            Err((name, RDKafkaErrorCode::TopicAlreadyExists)) => report.existing.push(name),
            Err((name, code)) => {
                return Err(Error::Broker(format!(
                    "cannot create job topic {name:?}: {code}; check the broker's \
                     permissions and `jobs.partitions` / `jobs.replication_factor` \
                     (created so far: {:?})",
                    report.created
                )))
            }
        }
    }
    tracing::info!(queue = %jobs.queue, %report, "job topics ready");
    Ok(report)
}

/// The worker group's lag on the active and delayed topics.
pub(crate) async fn waiting(settings: &Settings) -> Result<Waiting, Error> {
    let mut config = client_config(settings);
    config
        .set("group.id", settings.jobs.group())
        .set("enable.auto.commit", "false");
    let topics = [settings.jobs.active(), settings.jobs.delayed()];
    tokio::task::spawn_blocking(move || -> Result<Waiting, Error> {
        let client: BaseConsumer = config.create()?;
        let metadata = client.fetch_metadata(None, REQUEST_TIMEOUT)?;
        let mut lags = [0i64; 2];
        for (lag, topic) in lags.iter_mut().zip(&topics) {
            let partitions = crate::consumer::partitions_of(&metadata, topic)?
                .iter()
                .map(|p| TopicPartition::new(topic, p.partition))
                .collect();
            *lag = crate::consumer::partition_lags(&client, partitions)?
                .iter()
                .map(|l| l.lag)
                .sum();
        }
        Ok(Waiting {
            active: lags[0],
            delayed: lags[1],
        })
    })
    .await
    .map_err(|e| Error::Internal(format!("the lag request's task failed: {e}")))?
}
