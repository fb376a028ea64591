//! The failure chain as plain data: what to do next with a failed record,
//! given the steps it went through so far. No Kafka client here.

use std::time::Duration;

use crate::settings::{Backoff, FailurePolicy, FailureSettings};

/// Where a record stands in the failure chain.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct ChainState {
    /// The chain step it is at (0 for a record never failed).
    pub step: usize,
    /// Retries used at that step.
    pub used: u32,
    /// Times it was handed to a handler, the failed delivery included.
    pub attempts: u32,
}

/// What to do with a failed record.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum Action {
    /// Deliver it again in place after `wait`; `state` is its new standing.
    Retry { wait: Duration, state: ChainState },
    /// Produce it to the retry topic, due after `wait`.
    RetryTopic { wait: Duration, state: ChainState },
    /// Produce it to the dead-letter topic.
    DeadLetter,
    /// Commit past it.
    Skip,
    /// Stop the consumer.
    Fail,
}

/// The failure chain of one consumer.
#[derive(Clone, Debug)]
pub(crate) struct Chain {
    steps: Vec<FailurePolicy>,
    retry: (u32, Backoff),
    retry_topic: (u32, Backoff),
}

impl Chain {
    pub fn new(settings: &FailureSettings) -> Chain {
        Chain {
            steps: settings.policies.clone(),
            retry: (settings.retry.retries, settings.retry.backoff()),
            retry_topic: (settings.retry_topic.retries, settings.retry_topic.backoff()),
        }
    }

    /// True for the default chain, `["fail"]`: a failure stops the consumer,
    /// so nothing of each message needs keeping.
    pub fn is_fail_only(&self) -> bool {
        self.steps == [FailurePolicy::Fail]
    }

    /// True when failed records must be kept as they were read, to be
    /// written to the retry or dead-letter topic.
    pub fn keeps_records(&self) -> bool {
        self.steps
            .iter()
            .any(|s| matches!(s, FailurePolicy::RetryTopic | FailurePolicy::DeadLetter))
    }

    /// The step index of `policy`, if the chain has it.
    pub fn step_of(&self, policy: FailurePolicy) -> Option<usize> {
        self.steps.iter().position(|s| *s == policy)
    }

    /// The next action for a record that failed while at `state`.
    /// `retryable` is false for records that can never succeed (undecodable
    /// bytes), which skip the retry steps. `unit` is a random number in
    /// `[0, 1)` for the jitter.
    pub fn decide(&self, state: ChainState, retryable: bool, unit: f64) -> Action {
        let mut step = state.step;
        let mut used = state.used;
        while let Some(policy) = self.steps.get(step) {
            let budget = match policy {
                FailurePolicy::Retry => Some(self.retry),
                FailurePolicy::RetryTopic => Some(self.retry_topic),
                FailurePolicy::DeadLetter => return Action::DeadLetter,
                FailurePolicy::Skip => return Action::Skip,
                FailurePolicy::Fail => return Action::Fail,
            };
            if let Some((retries, backoff)) = budget {
                if retryable && used < retries {
                    let retry = used + 1;
                    let wait = backoff.wait(retry, unit);
                    let state = ChainState {
                        step,
                        used: retry,
                        attempts: state.attempts,
                    };
                    return if *policy == FailurePolicy::Retry {
                        Action::Retry { wait, state }
                    } else {
                        Action::RetryTopic { wait, state }
                    };
                }
            }
            step += 1;
            used = 0;
        }
        // A chain that ends with a retry step ends with fail.
        Action::Fail
    }
}

/// A random number in `[0, 1)` for jitter (no dependency needed for this).
pub(crate) fn unit_random() -> f64 {
    (random_u64() >> 11) as f64 / (1u64 << 53) as f64
}

/// 64 random bits, from the standard library's randomly seeded hasher
/// over a process-wide counter (never the same twice in a process).
pub(crate) fn random_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    hasher.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn chain(policies: &[FailurePolicy]) -> Chain {
        let mut settings = FailureSettings {
            policies: policies.to_vec(),
            ..FailureSettings::default()
        };
        settings.retry.retries = 2;
        settings.retry.backoff_ms = 100;
        settings.retry.jitter = 0.0;
        settings.retry_topic.retries = 2;
        settings.retry_topic.backoff_ms = 1000;
        settings.retry_topic.jitter = 0.0;
        Chain::new(&settings)
    }

    /// Follows one record that always fails through the chain.
    fn walk(chain: &Chain, retryable: bool) -> Vec<String> {
        let mut state = ChainState::default();
        let mut seen = Vec::new();
        loop {
            match chain.decide(state, retryable, 0.5) {
                Action::Retry { wait, state: next } => {
                    seen.push(format!("retry after {}ms", wait.as_millis()));
                    state = next;
                }
                Action::RetryTopic { wait, state: next } => {
                    seen.push(format!("retry_topic after {}ms", wait.as_millis()));
                    state = next;
                }
                end => {
                    seen.push(format!("{end:?}"));
                    return seen;
                }
            }
        }
    }

    use FailurePolicy::*;

    #[test]
    fn retries_back_off_then_fall_through_to_the_next_step() {
        assert_eq!(
            walk(&chain(&[Retry, RetryTopic, DeadLetter]), true),
            [
                "retry after 100ms",
                "retry after 200ms",
                "retry_topic after 1000ms",
                "retry_topic after 3000ms",
                "DeadLetter"
            ]
        );
        assert_eq!(walk(&chain(&[Retry]), true).last().unwrap(), "Fail");
        assert_eq!(walk(&chain(&[Skip]), true), ["Skip"]);
        assert_eq!(walk(&chain(&[Fail]), true), ["Fail"]);
    }

    #[test]
    fn undecodable_records_skip_the_retry_steps() {
        assert_eq!(
            walk(&chain(&[Retry, RetryTopic, DeadLetter]), false),
            ["DeadLetter"]
        );
        assert_eq!(walk(&chain(&[Retry]), false), ["Fail"]);
    }

    #[test]
    fn attempts_count_every_delivery() {
        let c = chain(&[Retry, DeadLetter]);
        let failed_once = ChainState {
            attempts: 1,
            ..ChainState::default()
        };
        let Action::Retry { state, .. } = c.decide(failed_once, true, 0.0) else {
            panic!("a first failure is retried");
        };
        assert_eq!((state.step, state.used, state.attempts), (0, 1, 1));
    }

    proptest! {
        #[test]
        fn jittered_waits_stay_within_the_spread_and_the_maximum(
            initial in 0u64..100_000, multiplier in 1.0f64..10.0, max in 0u64..1_000_000,
            jitter in 0.0f64..=1.0, retry in 1u32..100, unit in 0.0f64..1.0,
        ) {
            let backoff = Backoff {
                initial: Duration::from_millis(initial.min(max)),
                multiplier,
                max: Duration::from_millis(max),
                jitter,
            };
            let nominal = backoff.nominal(retry).as_secs_f64();
            let wait = backoff.wait(retry, unit).as_secs_f64();
            prop_assert!(wait <= max as f64 / 1000.0 + 1e-9);
            prop_assert!(wait >= nominal * (1.0 - jitter) - 1e-9);
            prop_assert!(wait <= nominal * (1.0 + jitter) + 1e-9);
            prop_assert!(backoff.nominal(retry + 1) >= backoff.nominal(retry));
        }
    }

    #[test]
    fn the_random_unit_is_in_range_and_varies() {
        let draws: Vec<f64> = (0..100).map(|_| unit_random()).collect();
        assert!(draws.iter().all(|u| (0.0..1.0).contains(u)));
        assert!(draws.windows(2).any(|w| w[0] != w[1]));
    }
}
