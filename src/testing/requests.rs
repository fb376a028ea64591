//! Request tracking on the mock cluster, and the ledger that says whether
//! the request errors injected with [`EmbeddedBroker::request_errors`] were
//! answered to clients.
//!
//! How librdkafka (2.12) spends an injected error: every request the mock
//! cluster receives is first appended to its tracked-request list, then, in
//! the same call on the mock thread, handed to the handler of its API; each
//! handler of the APIs faulted here (Produce, Fetch, OffsetCommit,
//! JoinGroup, SyncGroup, Heartbeat, ...) takes the next error of that API's
//! cluster-level stack before it answers (a stack is first in, first out).
//! So a request of the API that was tracked after a push, and whose handler
//! has run, took one of the errors if any was left.
//!
//! [`EmbeddedBroker::request_errors`]: super::EmbeddedBroker::request_errors

use std::collections::BTreeSet;

use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
use rdkafka_sys as sys;

use crate::error::Error;

/// One request the embedded cluster received (see
/// [`EmbeddedBroker::requests`](super::EmbeddedBroker::requests)).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// The Kafka protocol API key (0 Produce, 1 Fetch, ...).
    pub api_key: i16,
    /// The id of the broker it was sent to.
    pub broker: i32,
    /// When the broker received it: librdkafka's monotonic clock, in
    /// microseconds (comparable only with other requests' times).
    pub micros: i64,
}

impl Request {
    /// Whether this is a request of `api`.
    ///
    /// ```
    /// use kafka_batch::testing::Request;
    /// use rdkafka::types::RDKafkaApiKey;
    ///
    /// let fetch = Request { api_key: 1, broker: 1, micros: 0 };
    /// assert!(fetch.is(RDKafkaApiKey::Fetch));
    /// assert!(!fetch.is(RDKafkaApiKey::Produce));
    /// ```
    pub fn is(&self, api: RDKafkaApiKey) -> bool {
        self.api_key == api as i16
    }
}

/// What the broker thread knows of the errors it injected.
#[derive(Debug, Default)]
pub(super) struct Ledger {
    tracking: bool,
    /// `(api, mark, count)`: `count` errors pushed for `api` when `mark`
    /// requests had been tracked (every request at index `mark` or later
    /// arrived after the push).
    pushes: Vec<(i16, usize, usize)>,
    /// APIs with errors pushed while requests were not tracked.
    untracked: BTreeSet<i16>,
}

impl Ledger {
    /// Starts (or restarts) tracking: librdkafka clears its list, so the
    /// marks of earlier pushes mean nothing any more.
    pub(super) fn start(&mut self, cluster: *mut sys::rd_kafka_mock_cluster_t) {
        // SAFETY: `cluster` is the live cluster, used on its own thread.
        unsafe { sys::rd_kafka_mock_start_request_tracking(cluster) };
        self.tracking = true;
        self.untracked
            .extend(self.pushes.drain(..).map(|(api, _, _)| api));
    }

    /// Pushes `errors` for `api` onto the cluster's stack and notes them.
    pub(super) fn push(
        &mut self,
        cluster: *mut sys::rd_kafka_mock_cluster_t,
        api: i16,
        errors: &[RDKafkaRespErr],
    ) {
        // SAFETY: as in `start`; `errors` outlives the call, which copies it.
        unsafe {
            sys::rd_kafka_mock_push_request_errors_array(
                cluster,
                api,
                errors.len(),
                errors.as_ptr(),
            )
        };
        if self.tracking {
            // Read after the push: a request counted here may have taken one
            // of these errors, and is then wrongly thought to have come
            // before them, which can only make the count of pending errors
            // larger than it is.
            let mark = tracked(cluster).len();
            self.pushes.push((api, mark, errors.len()));
        } else {
            self.untracked.insert(api);
        }
    }

    /// How many errors injected for `api` may still be on the stack, from
    /// `requests`, every one of which has been handled.
    pub(super) fn pending(&self, api: i16, requests: &[Request]) -> Result<usize, Error> {
        if self.untracked.contains(&api) {
            return Err(Error::Broker(format!(
                "errors for API {api} were injected while requests were not tracked (call track_requests first)"
            )));
        }
        let mut pushes = self.pushes.iter().filter(|(a, _, _)| *a == api).peekable();
        let mut pending = 0;
        for (index, request) in requests.iter().enumerate() {
            while let Some((_, _, count)) = pushes.next_if(|(_, mark, _)| *mark <= index) {
                pending += count;
            }
            if request.api_key == api {
                pending = usize::saturating_sub(pending, 1);
            }
        }
        Ok(pending + pushes.map(|(_, _, count)| count).sum::<usize>())
    }
}

/// The requests tracked so far, oldest first.
pub(super) fn tracked(cluster: *mut sys::rd_kafka_mock_cluster_t) -> Vec<Request> {
    let mut count = 0usize;
    // SAFETY: `cluster` is the live cluster, used on its own thread; the
    // array returned holds `count` valid requests (or is null when there are
    // none), each read once and all freed once, below.
    unsafe {
        let array = sys::rd_kafka_mock_get_requests(cluster, &mut count);
        if array.is_null() {
            return Vec::new();
        }
        let requests = std::slice::from_raw_parts(array, count)
            .iter()
            .map(|&r| Request {
                api_key: sys::rd_kafka_mock_request_api_key(r),
                broker: sys::rd_kafka_mock_request_id(r),
                micros: sys::rd_kafka_mock_request_timestamp(r),
            })
            .collect();
        sys::rd_kafka_mock_request_destroy_array(array, count);
        requests
    }
}

/// Waits until the mock thread is between two requests: it serves this
/// command (an RTT for a broker id that never exists, which changes
/// nothing) only then, so every request tracked before it has been handled.
pub(super) fn barrier(cluster: *mut sys::rd_kafka_mock_cluster_t) -> Result<(), Error> {
    // SAFETY: as in `tracked`.
    match unsafe { sys::rd_kafka_mock_broker_set_rtt(cluster, i32::MIN, 0) } {
        RDKafkaRespErr::RD_KAFKA_RESP_ERR_BROKER_NOT_AVAILABLE => Ok(()),
        other => Err(Error::Broker(format!(
            "the mock thread barrier answered {other:?}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(api_key: i16) -> Request {
        Request {
            api_key,
            broker: 1,
            micros: 0,
        }
    }

    fn ledger(pushes: &[(i16, usize, usize)]) -> Ledger {
        Ledger {
            tracking: true,
            pushes: pushes.to_vec(),
            untracked: BTreeSet::new(),
        }
    }

    #[test]
    fn only_requests_of_the_api_after_a_push_take_its_errors() {
        // Two Fetch (1) errors pushed after request 1.
        let l = ledger(&[(1, 2, 2)]);
        let before = [request(1), request(1)];
        assert_eq!(l.pending(1, &before).unwrap(), 2);
        let one_after = [request(1), request(1), request(3), request(1)];
        assert_eq!(l.pending(1, &one_after).unwrap(), 1);
        let two_after = [request(1), request(1), request(1), request(0), request(1)];
        assert_eq!(l.pending(1, &two_after).unwrap(), 0);
        assert_eq!(
            l.pending(0, &two_after).unwrap(),
            0,
            "nothing pushed for Produce"
        );
    }

    #[test]
    fn later_pushes_queue_behind_earlier_ones() {
        // JoinGroup (11): 2 errors at the start, 1 more after request 3.
        let l = ledger(&[(11, 0, 2), (11, 3, 1)]);
        let requests = [request(11), request(11), request(11), request(11)];
        assert_eq!(l.pending(11, &requests).unwrap(), 0);
        assert_eq!(l.pending(11, &requests[..3]).unwrap(), 1);
        assert_eq!(l.pending(11, &requests[..1]).unwrap(), 2);
    }

    #[test]
    fn errors_injected_untracked_cannot_be_proven() {
        let mut l = ledger(&[]);
        l.untracked.insert(12);
        assert!(l.pending(12, &[request(12)]).is_err());
        assert_eq!(l.pending(1, &[]).unwrap(), 0);
    }
}
