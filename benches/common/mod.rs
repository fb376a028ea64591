//! What both benchmarks measure with: the payload type, and the plain
//! serde_json decode that is the baseline for the envelope's unpack.

use serde::{Deserialize, Serialize};

/// The payload of every benchmark record.
#[derive(Clone, Serialize, Deserialize)]
pub struct Event {
    pub title: String,
    pub category: String,
    pub lat: f64,
    pub lon: f64,
    pub rank: u32,
    pub labels: Vec<String>,
}

/// The baseline: the same bytes into the same payload type, history skipped.
/// (Decoding is what is measured; not every bench reads the fields.)
#[derive(Deserialize)]
#[allow(dead_code)]
pub struct PlainEnvelope<T> {
    pub item: T,
    hist: serde::de::IgnoredAny,
}
