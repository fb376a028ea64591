//! Stage latencies computed from a consumed message's history, as `WIRE.md`
//! defines them.

use time::OffsetDateTime;

use super::{parse_dt, Hist, Ref};

/// How long each service stage took, from a consumed message's history.
#[derive(Clone, Debug, PartialEq)]
pub struct StageLatencies {
    /// Each stage after the origin, in order, with its length in seconds.
    pub stages: Vec<(String, f64)>,
    /// Seconds from the origin's finish to now.
    pub total_seconds: f64,
}

/// A history time that could not be parsed.
#[derive(Debug, thiserror::Error)]
#[error("history of service {svc:?} has a `dt` that is not RFC 3339: {dt:?}")]
pub struct LatencyError {
    /// The service whose history entry was bad.
    pub svc: String,
    /// The text found.
    pub dt: String,
}

/// Stage latencies from a consumed message's ref, as `WIRE.md` defines them
/// and as the Python wrapper's `calc_ref_latencies` computes them.
///
/// The chain follows, at each level, the ref whose `hist.dt` is newest (the
/// last of equals); consecutive entries of one service merge into one stage;
/// `this_svc` is appended with `now`. With `target`, timing starts at the
/// service before the target; a chain that never passes the target gives no
/// stages and a total of 0. A history that is null, missing or `{}` is no
/// history: as a ref's branch it is passed over, as the top history it gives
/// no stages and a total of 0.
///
/// The wrapper picks the newest branch by sorting `dt` as text; this
/// compares the times. For the `+00:00` forms both sides write, whole
/// seconds (Python) or microseconds (kafka-batch), the two agree.
///
/// ```
/// use kafka_batch::envelope::{stage_latencies, unpack};
/// use std::sync::Arc;
/// use time::{format_description::well_known::Rfc3339, OffsetDateTime};
///
/// // A record packed by "enricher" from one that "loader" packed 2 s before.
/// let value = br#"{"item": 1, "hist": {"svc": "enricher", "dt": "2026-11-22T09:00:02+00:00",
///   "refs": [{"topic": "raw", "partition": 0, "offset": 7, "key": "a",
///             "hist": {"svc": "loader", "dt": "2026-11-22T09:00:00+00:00", "refs": []}},
///            {"topic": "raw", "partition": 1, "offset": 9, "key": "b", "hist": {}}]}}"#;
/// let record = kafka_batch::envelope::RawRecord {
///     topic: "enriched", partition: 0, offset: 3, key: Some(b"a"), value: Some(value),
/// };
/// let message = unpack::<serde_json::Value>(record, &Arc::from("enriched"))?.expect("not a tombstone");
/// let source = message.source().expect("a consumed message has its ref");
/// let now = OffsetDateTime::parse("2026-11-22T09:00:05+00:00", &Rfc3339)?;
/// let latencies = stage_latencies("writer", source, None, now)?;
/// // The `{}` branch is passed over: loader is the origin.
/// assert_eq!(latencies.stages, [("enricher".to_string(), 2.0), ("writer".to_string(), 3.0)]);
/// assert_eq!(latencies.total_seconds, 5.0);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn stage_latencies(
    this_svc: &str,
    source: &Ref,
    target: Option<&str>,
    now: OffsetDateTime,
) -> Result<StageLatencies, LatencyError> {
    let none = StageLatencies {
        stages: Vec::new(),
        total_seconds: 0.0,
    };
    let Some(mut hist) = source.hist.as_deref() else {
        return Ok(none);
    };
    let parse = |h: &Hist| {
        parse_dt(&h.dt).map_err(|_| LatencyError {
            svc: h.svc.clone(),
            dt: h.dt.clone(),
        })
    };
    // Walk back from the newest record to the origin.
    let mut timings: Vec<(&str, OffsetDateTime)> = Vec::new();
    loop {
        timings.push((&hist.svc, parse(hist)?));
        let mut previous: Option<(&Hist, OffsetDateTime)> = None;
        for h in hist.refs.iter().filter_map(|r| r.hist.as_deref()) {
            let dt = parse(h)?;
            if previous.is_none_or(|(_, best)| dt >= best) {
                previous = Some((h, dt));
            }
        }
        match previous {
            Some((h, _)) => hist = h,
            None => break,
        }
    }
    timings.reverse();
    if let Some(target) = target {
        match timings.iter().position(|(svc, _)| *svc == target) {
            None => return Ok(none),
            Some(0) => {}
            Some(i) => {
                timings.drain(..i - 1);
            }
        }
    }
    timings.push((this_svc, now));
    let seconds = |from: OffsetDateTime, to: OffsetDateTime| (to - from).as_seconds_f64();
    let (_, origin_end) = timings[0];
    let mut stages = Vec::new();
    let mut start = origin_end;
    let (mut svc, mut end) = timings[1];
    for &(next_svc, next_end) in &timings[2..] {
        if next_svc == svc {
            end = next_end;
        } else {
            stages.push((svc.to_owned(), seconds(start, end)));
            svc = next_svc;
            start = end;
            end = next_end;
        }
    }
    stages.push((svc.to_owned(), seconds(start, end)));
    Ok(StageLatencies {
        stages,
        total_seconds: seconds(origin_end, now),
    })
}
