//! Records as they were read, kept to be written unchanged to the retry or
//! dead-letter topic, and their headers read and written as raw bytes.
//!
//! Headers go through librdkafka's C API directly: rdkafka's `Headers::get`
//! panics on a header name that is not UTF-8, and a record on a topic is
//! input we do not control.

use std::ffi::CStr;
use std::sync::Arc;

use rdkafka::message::{BorrowedHeaders, BorrowedMessage, OwnedHeaders};
use rdkafka::Message as _;
use rdkafka_sys as rdsys;

/// One header: name and value bytes as they were on the record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct RawHeader {
    pub key: Vec<u8>,
    pub value: Option<Vec<u8>>,
}

/// Every header of a consumed record, in order.
pub(crate) fn read_headers(message: &BorrowedMessage<'_>) -> Vec<RawHeader> {
    let Some(headers) = message.headers() else {
        return Vec::new();
    };
    // rdkafka's BorrowedHeaders is a view of librdkafka's headers object;
    // its address is that object's (rdkafka converts it the same way).
    let native = headers as *const BorrowedHeaders as *const rdsys::rd_kafka_headers_t;
    let count = unsafe { rdsys::rd_kafka_header_cnt(native) };
    let mut out = Vec::with_capacity(count);
    for index in 0..count {
        let mut name = std::ptr::null();
        let mut value = std::ptr::null();
        let mut size = 0;
        let err = unsafe {
            rdsys::rd_kafka_header_get_all(native, index, &mut name, &mut value, &mut size)
        };
        if err != rdsys::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR || name.is_null() {
            continue;
        }
        // librdkafka keeps names NUL-terminated; the value has its size.
        let key = unsafe { CStr::from_ptr(name) }.to_bytes().to_vec();
        let value = (!value.is_null())
            .then(|| unsafe { std::slice::from_raw_parts(value as *const u8, size) }.to_vec());
        out.push(RawHeader { key, value });
    }
    out
}

/// Headers to produce: `headers` (less kafka-batch's own when `strip_ours`),
/// then `added`.
pub(crate) fn owned_headers(
    headers: &[RawHeader],
    strip_ours: bool,
    added: &[(&str, String)],
) -> OwnedHeaders {
    let owned = OwnedHeaders::new_with_capacity(headers.len() + added.len());
    let native = owned.as_borrowed() as *const BorrowedHeaders as *mut rdsys::rd_kafka_headers_t;
    let ours = super::headers::PREFIX.as_bytes();
    let kept = headers
        .iter()
        .filter(|h| !(strip_ours && h.key.starts_with(ours)))
        .map(|h| (h.key.as_slice(), h.value.as_deref()));
    let new = added
        .iter()
        .map(|(k, v)| (k.as_bytes(), Some(v.as_bytes())));
    for (key, value) in kept.chain(new) {
        let (value_ptr, value_len) = match value {
            Some(v) => (v.as_ptr() as *const std::ffi::c_void, v.len() as isize),
            None => (std::ptr::null(), 0),
        };
        // Adding to a headers object we own cannot fail (librdkafka only
        // refuses read-only headers); the name is passed with its length, so
        // any bytes are kept.
        unsafe {
            rdsys::rd_kafka_header_add(
                native,
                key.as_ptr() as *const std::ffi::c_char,
                key.len() as isize,
                value_ptr,
                value_len,
            )
        };
    }
    owned
}

/// A consumed record, copied so it can be written elsewhere unchanged.
#[derive(Clone, Debug)]
pub(crate) struct KeptRecord {
    pub topic: Arc<str>,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
    pub headers: Vec<RawHeader>,
}

impl KeptRecord {
    pub fn copy(message: &BorrowedMessage<'_>, topic: &Arc<str>) -> KeptRecord {
        KeptRecord {
            topic: Arc::clone(topic),
            partition: message.partition(),
            offset: message.offset(),
            key: message.key().map(<[u8]>::to_vec),
            value: message.payload().map(<[u8]>::to_vec),
            headers: read_headers(message),
        }
    }

    /// The record's coordinates and key, as logs show a ref.
    pub fn describe(&self) -> String {
        let key = self
            .key
            .as_deref()
            .map_or_else(|| "<null key>".into(), String::from_utf8_lossy);
        format!("{}:{}:{}:{}", self.topic, self.partition, self.offset, key)
    }
}

/// What kafka-batch's failure headers say of a record it writes to a retry,
/// delayed or dead topic (see [`super::headers`]).
pub(crate) struct FailureHeaders<'a> {
    /// Where the record was first consumed: topic, partition, offset.
    pub source: Option<(&'a str, i32, i64)>,
    pub group: &'a str,
    pub service: &'a str,
    pub attempts: u32,
    pub reason: &'a str,
    pub error: &'a str,
    pub failed_at: &'a str,
    /// For a retry record: the retries used, and when it is due (Unix ms).
    pub retry: Option<(u32, i64)>,
}

impl FailureHeaders<'_> {
    /// The headers as name and value, in the order they are written.
    pub fn pairs(&self) -> Vec<(&'static str, String)> {
        use super::headers;
        let mut added = Vec::with_capacity(11);
        if let Some((topic, partition, offset)) = self.source {
            added.extend([
                (headers::SOURCE_TOPIC, topic.to_owned()),
                (headers::SOURCE_PARTITION, partition.to_string()),
                (headers::SOURCE_OFFSET, offset.to_string()),
            ]);
        }
        added.extend([
            (headers::GROUP, self.group.to_owned()),
            (headers::SERVICE, self.service.to_owned()),
            (headers::ATTEMPTS, self.attempts.to_string()),
            (headers::REASON, self.reason.to_owned()),
            (headers::ERROR, self.error.to_owned()),
            (headers::FAILED_AT, self.failed_at.to_owned()),
        ]);
        if let Some((retries, due_ms)) = self.retry {
            added.push((headers::RETRIES, retries.to_string()));
            added.push((headers::DUE_MS, due_ms.to_string()));
        }
        added
    }
}
