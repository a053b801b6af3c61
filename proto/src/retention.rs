//! Retention policy: the defaults, the hard cap and the per-plan caps, shared by the API,
//! the operator and the runtime so that all three agree on what is valid.

use serde::{Deserialize, Serialize};

/// Executions kept by default: 14 days.
pub const DEFAULT_MAX_AGE_HOURS: u32 = 14 * 24;
/// Newest executions kept by default.
pub const DEFAULT_MAX_COUNT: u32 = 10_000;
/// No tenant keeps execution data longer than 30 days.
pub const HARD_CAP_MAX_AGE_HOURS: u32 = 30 * 24;
/// The most executions any policy may keep.
pub const MAX_MAX_COUNT: u32 = 1_000_000;

/// A tenant's plan; it sets quotas and how long its owner may keep data.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Plan {
    /// Smallest quota; retention up to the 14-day default.
    #[default]
    Free,
    /// Retention up to 21 days.
    Standard,
    /// Up to the hard cap.
    Enterprise,
}

impl Plan {
    /// Every plan, smallest first.
    pub const ALL: [Plan; 3] = [Plan::Free, Plan::Standard, Plan::Enterprise];

    /// The name used in the database, the CRD and the CLI.
    pub fn as_str(self) -> &'static str {
        match self {
            Plan::Free => "free",
            Plan::Standard => "standard",
            Plan::Enterprise => "enterprise",
        }
    }

    /// Parses [`Plan::as_str`]'s output.
    pub fn parse(s: &str) -> Option<Plan> {
        Plan::ALL.into_iter().find(|p| p.as_str() == s)
    }

    /// The longest `max_age_hours` a tenant owner on this plan may set.
    pub fn max_age_hours_cap(self) -> u32 {
        match self {
            Plan::Free => DEFAULT_MAX_AGE_HOURS,
            Plan::Standard => 21 * 24,
            Plan::Enterprise => HARD_CAP_MAX_AGE_HOURS,
        }
    }
}

/// How long execution data is kept.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RetentionPolicy {
    /// Executions older than this are deleted.
    pub max_age_hours: u32,
    /// Only the newest this many executions are kept.
    pub max_count: u32,
}

impl Default for RetentionPolicy {
    fn default() -> Self {
        RetentionPolicy {
            max_age_hours: DEFAULT_MAX_AGE_HOURS,
            max_count: DEFAULT_MAX_COUNT,
        }
    }
}

/// Why a retention policy is refused; names the field at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RetentionError {
    /// `max_age_hours` is 0 or above the cap that applies.
    #[error("max_age_hours must be between 1 and {cap}, got {got}")]
    MaxAge {
        /// The value given.
        got: u32,
        /// The cap that applies to the caller.
        cap: u32,
    },
    /// `max_count` is 0 or above [`MAX_MAX_COUNT`].
    #[error("max_count must be between 1 and {MAX_MAX_COUNT}, got {got}")]
    MaxCount {
        /// The value given.
        got: u32,
    },
}

impl RetentionError {
    /// The request field this error is about.
    pub fn field(&self) -> &'static str {
        match self {
            RetentionError::MaxAge { .. } => "max_age_hours",
            RetentionError::MaxCount { .. } => "max_count",
        }
    }
}

impl RetentionPolicy {
    /// Checks the policy against `max_age_cap` hours (a plan's cap, or the hard cap for
    /// admins; never above [`HARD_CAP_MAX_AGE_HOURS`]).
    pub fn validate(&self, max_age_cap: u32) -> Result<(), RetentionError> {
        let cap = max_age_cap.min(HARD_CAP_MAX_AGE_HOURS);
        if self.max_age_hours == 0 || self.max_age_hours > cap {
            return Err(RetentionError::MaxAge {
                got: self.max_age_hours,
                cap,
            });
        }
        if self.max_count == 0 || self.max_count > MAX_MAX_COUNT {
            return Err(RetentionError::MaxCount {
                got: self.max_count,
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_is_fourteen_days_and_ten_thousand() {
        let p = RetentionPolicy::default();
        assert_eq!(p.max_age_hours, 336);
        assert_eq!(p.max_count, 10_000);
        assert!(p.validate(HARD_CAP_MAX_AGE_HOURS).is_ok());
    }

    #[test]
    fn caps_apply_per_plan_and_never_exceed_hard_cap() {
        let p = RetentionPolicy {
            max_age_hours: 400,
            max_count: 1,
        };
        assert_eq!(
            p.validate(Plan::Free.max_age_hours_cap()),
            Err(RetentionError::MaxAge { got: 400, cap: 336 })
        );
        assert!(
            RetentionPolicy::default()
                .validate(Plan::Free.max_age_hours_cap())
                .is_ok()
        );
        assert!(p.validate(Plan::Standard.max_age_hours_cap()).is_ok());
        let too_long = RetentionPolicy {
            max_age_hours: 721,
            max_count: 1,
        };
        assert_eq!(
            too_long.validate(10_000).map_err(|e| e.field()),
            Err("max_age_hours")
        );
        assert!(
            RetentionPolicy {
                max_age_hours: 720,
                max_count: 1
            }
            .validate(720)
            .is_ok()
        );
    }

    #[test]
    fn zero_and_huge_values_are_refused() {
        let zero_age = RetentionPolicy {
            max_age_hours: 0,
            max_count: 5,
        };
        assert_eq!(
            zero_age.validate(720).map_err(|e| e.field()),
            Err("max_age_hours")
        );
        let zero_count = RetentionPolicy {
            max_age_hours: 5,
            max_count: 0,
        };
        assert_eq!(
            zero_count.validate(720).map_err(|e| e.field()),
            Err("max_count")
        );
        let huge = RetentionPolicy {
            max_age_hours: 5,
            max_count: MAX_MAX_COUNT + 1,
        };
        assert_eq!(huge.validate(720).map_err(|e| e.field()), Err("max_count"));
    }

    #[test]
    fn plan_names_round_trip() {
        for plan in Plan::ALL {
            assert_eq!(Plan::parse(plan.as_str()), Some(plan));
        }
        assert_eq!(Plan::parse("gold"), None);
    }
}
