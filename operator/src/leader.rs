//! Leader election on a `coordination.k8s.io/v1` Lease, so that two replicas can run and
//! only one reconciles. The decision is a pure function of the Lease and the clock; the IO
//! is a read followed by a replace guarded by the Lease's resourceVersion.
//!
//! Kept rather than `kube-lease-manager` (the one Lease crate on kube 5): that crate
//! writes the Lease with server-side and strategic-merge patches, which the chart's Role
//! would have to grant (`patch` on the Lease), and runs its own renewal task and timings;
//! this module is about a hundred lines, every decision is unit tested, every call is
//! bounded by the renew period, and the real-cluster suite tests take-over after SIGKILL
//! and hand-over on SIGTERM against it.

use std::time::Duration;

use jiff::{SignedDuration, Timestamp};
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::api::{Api, PostParams};
use tracing::{info, warn};

use crate::error::{Error, Result, is_already_exists, is_conflict};

/// What to do with a Lease.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Nobody holds it (or the holder's time ran out): take it.
    Acquire,
    /// We hold it: renew it.
    Renew,
    /// Someone else holds it and is fresh: wait.
    Wait,
}

/// Decides from the Lease (None when absent) whether `identity` may hold it at `now`.
pub fn decide(lease: Option<&Lease>, identity: &str, now: Timestamp) -> Decision {
    let Some(spec) = lease.and_then(|l| l.spec.as_ref()) else {
        return Decision::Acquire;
    };
    match spec.holder_identity.as_deref() {
        Some(holder) if holder == identity => Decision::Renew,
        None | Some("") => Decision::Acquire,
        Some(_) => {
            let duration =
                SignedDuration::from_secs(i64::from(spec.lease_duration_seconds.unwrap_or(15)));
            let renewed = spec
                .renew_time
                .as_ref()
                .or(spec.acquire_time.as_ref())
                .map(|t| t.0);
            match renewed.and_then(|t| t.checked_add(duration).ok()) {
                Some(expiry) if expiry > now => Decision::Wait,
                _ => Decision::Acquire,
            }
        }
    }
}

/// A Lease-based lock held by one identity.
pub struct LeaseLock {
    api: Api<Lease>,
    name: String,
    identity: String,
    duration: Duration,
}

impl LeaseLock {
    /// A lock on Lease `name` (in the namespace of `api`) for `identity`.
    pub fn new(api: Api<Lease>, name: &str, identity: &str, duration: Duration) -> LeaseLock {
        LeaseLock {
            api,
            name: name.to_owned(),
            identity: identity.to_owned(),
            duration,
        }
    }

    /// How often the holder renews: a third of the lease duration.
    pub fn renew_period(&self) -> Duration {
        (self.duration / 3).max(Duration::from_secs(1))
    }

    /// Tries once to acquire or renew; true while we hold the Lease.
    pub async fn try_hold(&self) -> Result<bool> {
        let now = Timestamp::now();
        let current = self
            .api
            .get_opt(&self.name)
            .await
            .map_err(|e| Error::kube(format!("read Lease {}", self.name), e))?;
        let decision = decide(current.as_ref(), &self.identity, now);
        if decision == Decision::Wait {
            return Ok(false);
        }
        let old = current
            .as_ref()
            .and_then(|l| l.spec.clone())
            .unwrap_or_default();
        let transitions = old.lease_transitions.unwrap_or(0);
        let spec = LeaseSpec {
            holder_identity: Some(self.identity.clone()),
            lease_duration_seconds: Some(i32::try_from(self.duration.as_secs()).unwrap_or(15)),
            acquire_time: if decision == Decision::Renew {
                old.acquire_time.clone()
            } else {
                Some(MicroTime(now))
            },
            renew_time: Some(MicroTime(now)),
            lease_transitions: Some(if decision == Decision::Acquire && current.is_some() {
                transitions.saturating_add(1)
            } else {
                transitions
            }),
            ..LeaseSpec::default()
        };
        let result = match current {
            Some(mut lease) => {
                lease.spec = Some(spec);
                // The resourceVersion in `lease` makes this fail if someone wrote in between.
                self.api
                    .replace(&self.name, &PostParams::default(), &lease)
                    .await
            }
            None => {
                let lease = Lease {
                    metadata: ObjectMeta {
                        name: Some(self.name.clone()),
                        ..ObjectMeta::default()
                    },
                    spec: Some(spec),
                };
                self.api.create(&PostParams::default(), &lease).await
            }
        };
        match result {
            Ok(_) => Ok(true),
            Err(e) if is_conflict(&e) || is_already_exists(&e) => Ok(false),
            Err(e) => Err(Error::kube(format!("write Lease {}", self.name), e)),
        }
    }

    /// Gives the Lease up if this replica holds it, so that another replica takes over at
    /// once instead of after the lease duration (a rolling update stops the old leader).
    pub async fn release(&self) -> Result<()> {
        let current = self
            .api
            .get_opt(&self.name)
            .await
            .map_err(|e| Error::kube(format!("read Lease {}", self.name), e))?;
        let Some(mut lease) = current else {
            return Ok(());
        };
        let Some(spec) = lease.spec.as_mut() else {
            return Ok(());
        };
        if spec.holder_identity.as_deref() != Some(self.identity.as_str()) {
            return Ok(());
        }
        spec.holder_identity = None;
        spec.acquire_time = None;
        spec.renew_time = None;
        match self
            .api
            .replace(&self.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => {
                info!(lease = %self.name, identity = %self.identity, "released leadership");
                Ok(())
            }
            // Someone wrote in between: the Lease is no longer ours to release.
            Err(e) if is_conflict(&e) => Ok(()),
            Err(e) => Err(Error::kube(format!("release Lease {}", self.name), e)),
        }
    }

    /// [`LeaseLock::try_hold`], given up after a renew period: a hung API call must not
    /// keep a leader from noticing that its Lease ran out.
    async fn try_hold_bounded(&self) -> Result<bool> {
        match tokio::time::timeout(self.renew_period(), self.try_hold()).await {
            Ok(result) => result,
            Err(_) => Err(Error::Timeout(self.renew_period())),
        }
    }

    /// Waits until this replica holds the Lease.
    pub async fn acquire(&self) -> Result<()> {
        loop {
            match self.try_hold_bounded().await {
                Ok(true) => {
                    info!(lease = %self.name, identity = %self.identity, "became leader");
                    return Ok(());
                }
                Ok(false) => {}
                Err(e) => warn!(error = %e, "leader election attempt failed"),
            }
            tokio::time::sleep(self.renew_period()).await;
        }
    }

    /// Renews the Lease until it cannot be renewed for a whole lease duration; then
    /// returns [`Error::LeadershipLost`] so the process stops reconciling.
    pub async fn keep(&self) -> Error {
        let mut last_ok = tokio::time::Instant::now();
        loop {
            tokio::time::sleep(self.renew_period()).await;
            match self.try_hold_bounded().await {
                Ok(true) => last_ok = tokio::time::Instant::now(),
                Ok(false) => return Error::LeadershipLost(self.name.clone()),
                Err(e) => warn!(error = %e, "could not renew the Lease"),
            }
            if last_ok.elapsed() >= self.duration {
                return Error::LeadershipLost(self.name.clone());
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use crate::fake_api::FakeApi;

    #[tokio::test]
    async fn a_released_lease_is_taken_over_at_once() {
        let fake = FakeApi::new();
        let api = || Api::<Lease>::namespaced(fake.client(), "tenantry-system");
        let a = LeaseLock::new(api(), "leader", "a", Duration::from_secs(15));
        let b = LeaseLock::new(api(), "leader", "b", Duration::from_secs(15));
        assert!(a.try_hold().await.unwrap());
        assert!(!b.try_hold().await.unwrap(), "a's Lease is fresh");
        // Releasing a Lease someone else holds changes nothing.
        b.release().await.unwrap();
        assert!(!b.try_hold().await.unwrap());
        a.release().await.unwrap();
        assert!(b.try_hold().await.unwrap(), "b takes over without waiting");
        assert!(!a.try_hold().await.unwrap());
    }

    fn lease(holder: Option<&str>, renewed: &str) -> Lease {
        Lease {
            metadata: ObjectMeta::default(),
            spec: Some(LeaseSpec {
                holder_identity: holder.map(String::from),
                lease_duration_seconds: Some(15),
                renew_time: Some(MicroTime(renewed.parse().unwrap())),
                ..LeaseSpec::default()
            }),
        }
    }

    #[test]
    fn decisions() {
        let now: Timestamp = "2026-01-01T00:00:10Z".parse().unwrap();
        assert_eq!(decide(None, "a", now), Decision::Acquire);
        assert_eq!(
            decide(Some(&lease(Some("a"), "2026-01-01T00:00:00Z")), "a", now),
            Decision::Renew
        );
        assert_eq!(
            decide(Some(&lease(Some("b"), "2026-01-01T00:00:00Z")), "a", now),
            Decision::Wait
        );
        assert_eq!(
            decide(Some(&lease(Some("b"), "2025-12-31T23:59:00Z")), "a", now),
            Decision::Acquire
        );
        assert_eq!(
            decide(Some(&lease(None, "2026-01-01T00:00:09Z")), "a", now),
            Decision::Acquire
        );
    }
}
