//! An embedded Kafka broker for tests and examples: librdkafka's own mock
//! cluster, a real Kafka-protocol server on loopback, inside the process.
//!
//! ```no_run
//! use kafka_batch::testing::EmbeddedBroker;
//! use kafka_batch::{Consumer, Message, Producer};
//! use serde_json::json;
//!
//! # async fn run() -> Result<(), kafka_batch::Error> {
//! let broker = EmbeddedBroker::start()?;
//! broker.create_topic("events", 2)?;
//! let producer = Producer::new(&broker.producer_settings())?;
//! producer.produce_batch("events", &[Message::new("a", json!(1))]).await?;
//!
//! let consumer = Consumer::new(&broker.consumer_settings("my-group", &["events"]))?;
//! let handle = consumer.handle();
//! consumer
//!     .process(async |batch: Vec<Message>| {
//!         assert_eq!(batch[0].payload, json!(1));
//!         handle.shutdown();
//!         Ok::<_, std::convert::Infallible>(())
//!     })
//!     .await?;
//! assert_eq!(broker.committed_offsets("my-group", "events")?.values().sum::<i64>(), 1);
//! # Ok(()) }
//! ```
//!
//! Mind the mock cluster's limits: it keeps about 5 MiB (or 100,000 message
//! sets) per partition and silently deletes older data, so spread large runs
//! over enough partitions. Its group-join delay is set to 0 here (the broker
//! default is 3 s).
//!
//! The mock cluster is neither `Send` nor `Sync`, so it lives on a thread of
//! its own; [`EmbeddedBroker`] talks to that thread and can be shared freely.

use std::collections::BTreeMap;
use std::ffi::{CStr, CString};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer as _};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer as _};
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use rdkafka_sys as sys;
use serde::de::DeserializeOwned;

use crate::envelope::{unpack, Message};
use crate::error::Error;
use crate::settings::{ConsumerSettings, ProducerSettings};

/// A record for [`EmbeddedBroker::produce_raw`]: `(partition, key, value)`,
/// where `None` is a null key or value (a null value is a tombstone).
pub type RawProduce<'a> = (i32, Option<&'a [u8]>, Option<&'a [u8]>);

mod requests;

pub use requests::Request;

/// What the broker thread owns: the cluster, and what it injected.
struct Cluster {
    ptr: *mut sys::rd_kafka_mock_cluster_t,
    ledger: requests::Ledger,
}

type Job = Box<dyn FnOnce(&mut Cluster) + Send>;

enum Command {
    Run(Job),
    Stop,
}

/// librdkafka's mock cluster on loopback, on a thread of its own.
///
/// Dropping it stops the cluster; clients still connected see the brokers go away.
pub struct EmbeddedBroker {
    bootstrap: String,
    commands: mpsc::Sender<Command>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for EmbeddedBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedBroker")
            .field("bootstrap", &self.bootstrap)
            .finish()
    }
}

impl EmbeddedBroker {
    /// Starts a one-broker cluster.
    pub fn start() -> Result<EmbeddedBroker, Error> {
        EmbeddedBroker::start_with_brokers(1)
    }

    /// Starts a cluster of `brokers` brokers (ids 1 to `brokers`).
    pub fn start_with_brokers(brokers: i32) -> Result<EmbeddedBroker, Error> {
        let (commands, inbox) = mpsc::channel::<Command>();
        let (ready_tx, ready_rx) = mpsc::channel::<Result<String, Error>>();
        let thread = std::thread::Builder::new()
            .name("kafka-batch-embedded-broker".into())
            .spawn(move || serve(brokers, inbox, ready_tx))
            .map_err(|e| Error::Broker(format!("cannot start its thread: {e}")))?;
        let bootstrap = ready_rx
            .recv()
            .map_err(|_| Error::Broker("its thread ended before it started".into()))??;
        tracing::info!(%bootstrap, brokers, "embedded broker started");
        Ok(EmbeddedBroker {
            bootstrap,
            commands,
            thread: Some(thread),
        })
    }

    /// The `bootstrap.servers` list of the cluster (loopback addresses).
    pub fn bootstrap_servers(&self) -> &str {
        &self.bootstrap
    }

    /// Runs `f` on the broker thread and returns its result.
    fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Cluster) -> T + Send + 'static,
    ) -> Result<T, Error> {
        let stopped = || Error::Broker("it has stopped".into());
        let (reply_tx, reply_rx) = mpsc::channel();
        self.commands
            .send(Command::Run(Box::new(move |cluster| {
                let _ = reply_tx.send(f(cluster));
            })))
            .map_err(|_| stopped())?;
        reply_rx.recv().map_err(|_| stopped())
    }

    /// Runs one mock-cluster call on the broker thread; its error code becomes the result.
    fn call(
        &self,
        what: &str,
        f: impl FnOnce(*mut sys::rd_kafka_mock_cluster_t) -> RDKafkaRespErr + Send + 'static,
    ) -> Result<(), Error> {
        match self.run(move |cluster| f(cluster.ptr))? {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR_NO_ERROR => Ok(()),
            err => Err(Error::Broker(format!("{what} failed: {err:?}"))),
        }
    }

    /// Creates a topic with `partitions` partitions.
    pub fn create_topic(&self, name: &str, partitions: i32) -> Result<(), Error> {
        let topic = CString::new(name)
            .map_err(|_| Error::Broker(format!("topic name {name:?} holds a NUL byte")))?;
        // SAFETY: the pointer is the live cluster, on its own thread; the name outlives the call.
        self.call(&format!("creating topic {name}"), move |c| unsafe {
            sys::rd_kafka_mock_topic_create(c, topic.as_ptr(), partitions, 1)
        })
    }

    /// Makes the next requests of kind `api` fail with `errors`, one each, in
    /// order, whichever broker they reach (after errors injected earlier for
    /// `api` that no request has taken yet).
    ///
    /// Call [`track_requests`](Self::track_requests) first to be able to
    /// tell, with [`pending_request_errors`](Self::pending_request_errors),
    /// whether they were answered.
    pub fn request_errors(
        &self,
        api: RDKafkaApiKey,
        errors: &[RDKafkaRespErr],
    ) -> Result<(), Error> {
        let errors = errors.to_vec();
        self.run(move |cluster| cluster.ledger.push(cluster.ptr, api as i16, &errors))
    }

    /// Starts recording every request the cluster receives, forgetting any
    /// recorded before (and so what was known of errors injected before).
    ///
    /// ```no_run
    /// use kafka_batch::testing::EmbeddedBroker;
    /// use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
    ///
    /// # fn run() -> Result<(), kafka_batch::Error> {
    /// let broker = EmbeddedBroker::start()?;
    /// broker.track_requests()?;
    /// broker.request_errors(
    ///     RDKafkaApiKey::Fetch,
    ///     &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_LEADER_FOR_PARTITION],
    /// )?;
    /// // ... run a consumer against the broker, then:
    /// assert_eq!(broker.pending_request_errors(RDKafkaApiKey::Fetch)?, 0);
    /// let fetches = broker
    ///     .requests()?
    ///     .iter()
    ///     .filter(|r| r.is(RDKafkaApiKey::Fetch))
    ///     .count();
    /// assert!(fetches >= 1);
    /// # Ok(()) }
    /// ```
    pub fn track_requests(&self) -> Result<(), Error> {
        self.run(|cluster| cluster.ledger.start(cluster.ptr))
    }

    /// Every request received since [`track_requests`](Self::track_requests),
    /// oldest first (empty when requests are not tracked).
    ///
    /// Requests are recorded on arrival, before the broker handles them, and
    /// kept until the broker is dropped or tracking restarts: a broker that
    /// serves clients for hours should not track.
    pub fn requests(&self) -> Result<Vec<Request>, Error> {
        self.run(|cluster| requests::tracked(cluster.ptr))
    }

    /// At most how many of the errors injected for `api` with
    /// [`request_errors`](Self::request_errors) have not been answered to a
    /// request yet: 0 means each one was, every error written into the
    /// response of a request of `api` that arrived after it was injected.
    ///
    /// The count errs only upwards (a request that arrives while errors are
    /// being injected is taken to have come first). An error if errors for
    /// `api` were injected while requests were not tracked.
    pub fn pending_request_errors(&self, api: RDKafkaApiKey) -> Result<usize, Error> {
        self.run(move |cluster| {
            let requests = requests::tracked(cluster.ptr);
            // Every request in the list has been handled once this returns.
            requests::barrier(cluster.ptr)?;
            cluster.ledger.pending(api as i16, &requests)
        })?
    }

    /// Takes broker `id` down (its connections close, it accepts none).
    pub fn broker_down(&self, id: i32) -> Result<(), Error> {
        // SAFETY: as in create_topic.
        self.call("taking a broker down", move |c| unsafe {
            sys::rd_kafka_mock_broker_set_down(c, id)
        })
    }

    /// Brings broker `id` back up.
    pub fn broker_up(&self, id: i32) -> Result<(), Error> {
        // SAFETY: as in create_topic.
        self.call("bringing a broker up", move |c| unsafe {
            sys::rd_kafka_mock_broker_set_up(c, id)
        })
    }

    /// Delays every response of broker `id` by `rtt`.
    pub fn round_trip_time(&self, id: i32, rtt: Duration) -> Result<(), Error> {
        let ms = i32::try_from(rtt.as_millis()).unwrap_or(i32::MAX);
        // SAFETY: as in create_topic.
        self.call("setting a round-trip time", move |c| unsafe {
            sys::rd_kafka_mock_broker_set_rtt(c, id, ms)
        })
    }

    /// Consumer settings for this cluster, starting at the earliest offset
    /// (tests usually produce first), with every other value at its default.
    pub fn consumer_settings(&self, group_id: &str, topics: &[&str]) -> ConsumerSettings {
        let mut settings = ConsumerSettings::new(&self.bootstrap, group_id, topics);
        settings.kafka.set("auto.offset.reset", "earliest");
        settings
    }

    /// Producer settings for this cluster.
    pub fn producer_settings(&self) -> ProducerSettings {
        ProducerSettings::new(&self.bootstrap)
    }

    /// The offsets group `group_id` has committed for `topic` (see [`committed_offsets`]).
    pub fn committed_offsets(
        &self,
        group_id: &str,
        topic: &str,
    ) -> Result<BTreeMap<i32, i64>, Error> {
        committed_offsets(&self.bootstrap, group_id, topic)
    }

    /// Reads messages of `topic` from the beginning (see [`read_messages`]).
    pub fn read_messages<T: DeserializeOwned>(
        &self,
        topic: &str,
        count: usize,
        timeout: Duration,
    ) -> Result<Vec<Message<T>>, Error> {
        read_messages(&self.bootstrap, topic, count, timeout)
    }

    /// Produces raw records (no envelope), for tests of bad input and
    /// tombstones. Blocking; waits for every delivery, and fails naming the
    /// first record the broker refused, if any.
    pub fn produce_raw(&self, topic: &str, records: &[RawProduce<'_>]) -> Result<(), Error> {
        let producer: BaseProducer<Deliveries> = self
            .client_config()
            .create_with_context(Deliveries::default())?;
        for (partition, key, value) in records {
            let mut record: BaseRecord<'_, [u8], [u8]> =
                BaseRecord::to(topic).partition(*partition);
            record.key = *key;
            record.payload = *value;
            producer.send(record).map_err(|(e, _)| e)?;
        }
        producer.flush(Duration::from_secs(30))?;
        producer.context().outcome()
    }

    /// Produces one raw record with headers given as raw (name, value)
    /// bytes, any bytes, for tests of bad input. Blocking; waits for the
    /// delivery, and fails if the broker refused it.
    pub fn produce_with_headers(
        &self,
        topic: &str,
        record: RawProduce<'_>,
        headers: &[(&[u8], Option<&[u8]>)],
    ) -> Result<(), Error> {
        let producer: BaseProducer<Deliveries> = self
            .client_config()
            .create_with_context(Deliveries::default())?;
        let raw: Vec<crate::failure::record::RawHeader> = headers
            .iter()
            .map(|(k, v)| crate::failure::record::RawHeader {
                key: k.to_vec(),
                value: v.map(<[u8]>::to_vec),
            })
            .collect();
        let (partition, key, value) = record;
        let mut out: BaseRecord<'_, [u8], [u8]> = BaseRecord::to(topic)
            .partition(partition)
            .headers(crate::failure::record::owned_headers(&raw, false, &[]));
        out.key = key;
        out.payload = value;
        producer.send(out).map_err(|(e, _)| e)?;
        producer.flush(Duration::from_secs(30))?;
        producer.context().outcome()
    }

    fn client_config(&self) -> ClientConfig {
        client_config(&self.bootstrap)
    }
}

/// Delivery reports of a test producer: a record the broker refused (after
/// librdkafka's retries) is an error of the call that produced it, never a
/// record silently missing from the test's input.
#[derive(Default)]
struct Deliveries {
    failed: std::sync::Mutex<Vec<String>>,
}

impl rdkafka::ClientContext for Deliveries {}

impl rdkafka::producer::ProducerContext for Deliveries {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &rdkafka::message::DeliveryResult<'_>, _: ()) {
        if let Err((error, message)) = result {
            use rdkafka::Message as _;
            self.failed
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .push(format!(
                    "{}[{}]: {error}",
                    message.topic(),
                    message.partition()
                ));
        }
    }
}

impl Deliveries {
    fn outcome(&self) -> Result<(), Error> {
        let failed = self
            .failed
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match failed.first() {
            None => Ok(()),
            Some(first) => Err(Error::Broker(format!(
                "{} record(s) were not delivered, the first to {first}",
                failed.len()
            ))),
        }
    }
}

fn client_config(bootstrap: &str) -> ClientConfig {
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", bootstrap);
    config
}

/// The offsets group `group_id` has committed for `topic` on the cluster at
/// `bootstrap`, by partition (partitions with no commit are left out).
/// Blocking. Works against any cluster, not only an embedded one.
pub fn committed_offsets(
    bootstrap: &str,
    group_id: &str,
    topic: &str,
) -> Result<BTreeMap<i32, i64>, Error> {
    let consumer: BaseConsumer = client_config(bootstrap)
        .set("group.id", group_id)
        .create()?;
    let mut tpl = TopicPartitionList::new();
    for partition in partitions_of(&consumer, topic)? {
        tpl.add_partition(topic, partition);
    }
    let committed = consumer.committed_offsets(tpl, Duration::from_secs(10))?;
    Ok(committed
        .elements()
        .iter()
        .filter_map(|e| match e.offset() {
            Offset::Offset(o) => Some((e.partition(), o)),
            _ => None,
        })
        .collect())
}

/// Reads `topic` on the cluster at `bootstrap` from the beginning of every
/// partition until `count` messages were decoded or `timeout` passed,
/// outside any group (nothing is committed). Blocking.
///
/// Tombstones are skipped; a record that cannot be decoded is an error.
pub fn read_messages<T: DeserializeOwned>(
    bootstrap: &str,
    topic: &str,
    count: usize,
    timeout: Duration,
) -> Result<Vec<Message<T>>, Error> {
    let consumer: BaseConsumer = client_config(bootstrap)
        .set("group.id", "kafka-batch-reader")
        .set("enable.auto.commit", "false")
        .create()?;
    let mut tpl = TopicPartitionList::new();
    for partition in partitions_of(&consumer, topic)? {
        tpl.add_partition_offset(topic, partition, Offset::Beginning)?;
    }
    consumer.assign(&tpl)?;
    let topic_name: Arc<str> = Arc::from(topic);
    let deadline = Instant::now() + timeout;
    let mut out = Vec::with_capacity(count);
    while out.len() < count && Instant::now() < deadline {
        match consumer.poll(Duration::from_millis(100)) {
            None => {}
            Some(Err(e)) => return Err(e.into()),
            Some(Ok(m)) => {
                if let Some(message) = unpack(crate::consumer::raw_record(&m), &topic_name)? {
                    out.push(message);
                }
            }
        }
    }
    Ok(out)
}

fn partitions_of(consumer: &BaseConsumer, topic: &str) -> Result<Vec<i32>, Error> {
    let metadata = consumer.fetch_metadata(Some(topic), Duration::from_secs(10))?;
    let partitions: Vec<i32> = metadata
        .topics()
        .iter()
        .filter(|t| t.name() == topic)
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect();
    if partitions.is_empty() {
        return Err(Error::Broker(format!(
            "topic {topic:?} has no partitions (create it first)"
        )));
    }
    Ok(partitions)
}

impl Drop for EmbeddedBroker {
    fn drop(&mut self) {
        let _ = self.commands.send(Command::Stop);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The broker thread: owns the cluster and the client handle it hangs on.
fn serve(brokers: i32, inbox: mpsc::Receiver<Command>, ready: mpsc::Sender<Result<String, Error>>) {
    let client: BaseProducer = match ClientConfig::new().create() {
        Ok(c) => c,
        Err(e) => {
            let _ = ready.send(Err(e.into()));
            return;
        }
    };
    // SAFETY: the client handle is valid and outlives the cluster (destroyed below, before it).
    let cluster = unsafe { sys::rd_kafka_mock_cluster_new(client.client().native_ptr(), brokers) };
    if cluster.is_null() {
        let _ = ready.send(Err(Error::Broker(
            "librdkafka could not create the mock cluster".into(),
        )));
        return;
    }
    // SAFETY: `cluster` is valid until destroyed at the end of this function.
    let bootstrap = unsafe {
        sys::rd_kafka_mock_group_initial_rebalance_delay_ms(cluster, 0);
        CStr::from_ptr(sys::rd_kafka_mock_cluster_bootstraps(cluster))
            .to_string_lossy()
            .into_owned()
    };
    if ready.send(Ok(bootstrap)).is_ok() {
        let mut state = Cluster {
            ptr: cluster,
            ledger: requests::Ledger::default(),
        };
        while let Ok(Command::Run(job)) = inbox.recv() {
            job(&mut state);
        }
    }
    // SAFETY: no call runs any more; the cluster is destroyed once.
    unsafe { sys::rd_kafka_mock_cluster_destroy(cluster) };
    drop(client);
}
