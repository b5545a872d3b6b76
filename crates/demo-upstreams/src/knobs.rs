//! Latency and fault-injection knobs, readable lock-free on every request.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::Api;

/// How a demo server misbehaves. Applied to every non-control request, in this order:
/// sleep `latency_ms`, then drop the connection with probability `drop_rate`, else answer 500
/// `{"error":"INTERNAL","message":"injected failure"}` with probability `error_rate`.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Knobs {
    /// Added latency before each response, in milliseconds (a tokio sleep).
    #[serde(default)]
    pub latency_ms: u64,
    /// Probability in `[0, 1]` of answering 500 instead of the real response.
    #[serde(default)]
    pub error_rate: f64,
    /// Probability in `[0, 1]` of closing the connection without writing any response bytes.
    #[serde(default)]
    pub drop_rate: f64,
}

impl Knobs {
    /// The knobs that make each API behave like the real one: the CLV calculator takes ~200 ms
    /// per call (the real one measured ~210 ms); the others answer at once.
    pub fn default_for(api: Api) -> Knobs {
        match api {
            Api::Clv => Knobs {
                latency_ms: 200,
                ..Knobs::default()
            },
            _ => Knobs::default(),
        }
    }

    /// The latency as a [`Duration`].
    pub fn latency(&self) -> Duration {
        Duration::from_millis(self.latency_ms)
    }

    /// Checks that both rates are finite probabilities.
    pub fn validate(&self) -> Result<(), String> {
        for (name, rate) in [
            ("error_rate", self.error_rate),
            ("drop_rate", self.drop_rate),
        ] {
            if !(0.0..=1.0).contains(&rate) {
                return Err(format!(
                    "{name} must be a number between 0 and 1, got {rate}"
                ));
            }
        }
        Ok(())
    }

    /// The same knobs with both rates clamped into `[0, 1]` (NaN becomes 0).
    pub fn clamped(mut self) -> Knobs {
        self.error_rate = clamp_rate(self.error_rate);
        self.drop_rate = clamp_rate(self.drop_rate);
        self
    }
}

fn clamp_rate(rate: f64) -> f64 {
    if rate.is_nan() {
        0.0
    } else {
        rate.clamp(0.0, 1.0)
    }
}

/// A partial update of [`Knobs`], as accepted by `PUT /__knobs`: absent fields keep their value.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KnobsPatch {
    /// New latency in milliseconds.
    pub latency_ms: Option<u64>,
    /// New error rate.
    pub error_rate: Option<f64>,
    /// New drop rate.
    pub drop_rate: Option<f64>,
}

impl KnobsPatch {
    /// Applies the patch on top of `base`.
    pub fn apply(&self, base: Knobs) -> Knobs {
        Knobs {
            latency_ms: self.latency_ms.unwrap_or(base.latency_ms),
            error_rate: self.error_rate.unwrap_or(base.error_rate),
            drop_rate: self.drop_rate.unwrap_or(base.drop_rate),
        }
    }
}

/// Knobs shared between the server's tasks: three atomics, so reading them costs no lock.
#[derive(Debug, Default)]
pub(crate) struct SharedKnobs {
    latency_ms: AtomicU64,
    error_rate_bits: AtomicU64,
    drop_rate_bits: AtomicU64,
}

impl SharedKnobs {
    pub(crate) fn new(knobs: Knobs) -> Self {
        let shared = SharedKnobs::default();
        shared.set(knobs);
        shared
    }

    pub(crate) fn get(&self) -> Knobs {
        Knobs {
            latency_ms: self.latency_ms.load(Ordering::Relaxed),
            error_rate: f64::from_bits(self.error_rate_bits.load(Ordering::Relaxed)),
            drop_rate: f64::from_bits(self.drop_rate_bits.load(Ordering::Relaxed)),
        }
    }

    /// Stores `knobs`, rates clamped into `[0, 1]`.
    pub(crate) fn set(&self, knobs: Knobs) {
        let knobs = knobs.clamped();
        self.latency_ms.store(knobs.latency_ms, Ordering::Relaxed);
        self.error_rate_bits
            .store(knobs.error_rate.to_bits(), Ordering::Relaxed);
        self.drop_rate_bits
            .store(knobs.drop_rate.to_bits(), Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_per_api() {
        assert_eq!(Knobs::default_for(Api::Clv).latency_ms, 200);
        for api in [Api::Restaurants, Api::Voucher, Api::Orders, Api::Campaigns] {
            assert_eq!(Knobs::default_for(api), Knobs::default());
        }
    }

    #[test]
    fn partial_json_and_patch() {
        let knobs: Knobs = serde_json::from_str(r#"{"latency_ms":5}"#).unwrap();
        assert_eq!(
            knobs,
            Knobs {
                latency_ms: 5,
                ..Knobs::default()
            }
        );
        let patch: KnobsPatch = serde_json::from_str(r#"{"drop_rate":0.5}"#).unwrap();
        let patched = patch.apply(knobs);
        assert_eq!(patched.latency_ms, 5);
        assert_eq!(patched.drop_rate, 0.5);
        assert!(serde_json::from_str::<KnobsPatch>(r#"{"latency":5}"#).is_err());
    }

    #[test]
    fn validation_and_clamping() {
        let bad = Knobs {
            error_rate: 1.5,
            drop_rate: f64::NAN,
            ..Knobs::default()
        };
        assert!(bad.validate().is_err());
        let shared = SharedKnobs::new(bad);
        assert_eq!(shared.get().error_rate, 1.0);
        assert_eq!(shared.get().drop_rate, 0.0);
    }
}
