//! Retention enforcement: deletes executions older than `max_age_hours` (age counted
//! from `finished_at`, or `started_at` while unfinished) and beyond the newest
//! `max_count` (newest by `started_at`, then id).
//!
//! Then crypto-shredding: an execution data key whose whole period is past the age
//! cut-off, and under which no execution is left, is deleted from the key store (see
//! `keystore`), so copies of those rows made earlier (backups, disk images) cannot be
//! decrypted any more.
//!
//! Deletion goes in batches of a bounded size, one short transaction each, with a pause
//! between batches: a backlog of millions never holds the write lock for long, never
//! loads more than one batch of ids, and requests keep being served while it drains.

use std::time::Duration;

use jiff::{SignedDuration, Timestamp};
use tenantry_proto::retention::RetentionPolicy;
use tokio::sync::watch;

use crate::clock::Clock;
use crate::error::Result;
use crate::metrics::Metrics;
use crate::store::Store;

/// Pause between two delete batches, so other writers get the lock.
const BATCH_PAUSE: Duration = Duration::from_millis(1);

/// Executions whose age time is before this are expired at `now`.
pub fn age_cutoff(now: Timestamp, max_age_hours: u32) -> Timestamp {
    let age = SignedDuration::from_hours(i64::from(max_age_hours));
    now.checked_sub(age).unwrap_or(Timestamp::MIN)
}

/// What one prune run deleted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PruneReport {
    /// Deleted for being older than `max_age_hours`.
    pub by_age: u64,
    /// Deleted for being beyond the newest `max_count`.
    pub by_count: u64,
    /// Execution data keys deleted (crypto-shredded).
    pub keys_shredded: u64,
}

/// Applies `policy` at `now`, `batch` rows per transaction, counting into `metrics`.
/// Stops early (with what it did so far) when `stop` turns true.
pub async fn prune(
    store: &Store,
    policy: RetentionPolicy,
    now: Timestamp,
    batch: u32,
    metrics: &Metrics,
    stop: &watch::Receiver<bool>,
) -> Result<PruneReport> {
    let batch = batch.max(1);
    let mut report = PruneReport::default();
    let cutoff = age_cutoff(now, policy.max_age_hours);
    loop {
        let n = store.prune_aged_batch(cutoff, batch).await?;
        report.by_age += n;
        metrics.add_pruned("age", n);
        if n < u64::from(batch) || *stop.borrow() {
            break;
        }
        tokio::time::sleep(BATCH_PAUSE).await;
    }
    // The boundary is fixed once: executions inserted while this runs are newer than
    // it unless their start time is older, in which case the policy drops them anyway.
    if let Some(boundary) = store.count_boundary(policy.max_count).await? {
        loop {
            let n = store.prune_from_batch(&boundary, batch).await?;
            report.by_count += n;
            metrics.add_pruned("count", n);
            if n < u64::from(batch) || *stop.borrow() {
                break;
            }
            tokio::time::sleep(BATCH_PAUSE).await;
        }
    }
    if !*stop.borrow() {
        report.keys_shredded = shred_expired_keys(store, cutoff, metrics).await?;
    }
    Ok(report)
}

/// Deletes every execution data key whose period ended at or before `cutoff` and under
/// which no execution is left; returns how many. Such a period's rows are all past the
/// cut-off, so the age pass has deleted them; a row inserted meanwhile into that period
/// (an execution reported late) is caught by the check, made while no insert is between
/// choosing its key and committing.
pub async fn shred_expired_keys(
    store: &Store,
    cutoff: Timestamp,
    metrics: &Metrics,
) -> Result<u64> {
    let keys = store.keys();
    let mut shredded = 0;
    for (id, period) in keys.expired_keys(cutoff.as_microsecond()) {
        let _exclusive = keys.exclusive().await;
        if store
            .has_executions_aged_between(period.start, period.end)
            .await?
        {
            continue;
        }
        keys.retire(id).await?;
        shredded += 1;
        metrics.data_keys_shredded.inc();
        tracing::info!(
            key_id = id,
            period_start = %Timestamp::from_microsecond(period.start).unwrap_or(Timestamp::MIN),
            "execution data key deleted: the period's executions are expired"
        );
    }
    metrics.observe_keys(keys);
    Ok(shredded)
}

/// Runs [`prune`] now, every `interval`, and right after each policy change, until `stop`
/// turns true.
pub async fn run_pruner(
    store: Store,
    clock: Clock,
    mut policy: watch::Receiver<RetentionPolicy>,
    interval: Duration,
    batch: u32,
    metrics: std::sync::Arc<Metrics>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let current = *policy.borrow_and_update();
        match prune(&store, current, clock.now(), batch, &metrics, &stop).await {
            Ok(report) => {
                metrics.prune_runs.inc();
                if report != PruneReport::default() {
                    tracing::info!(
                        by_age = report.by_age,
                        by_count = report.by_count,
                        keys_shredded = report.keys_shredded,
                        "pruned executions"
                    );
                }
            }
            Err(e) => {
                metrics.prune_failures.inc();
                tracing::error!(error = %e, "retention prune failed; retrying at the next interval");
            }
        }
        tokio::select! {
            () = tokio::time::sleep(interval) => {}
            changed = policy.changed() => {
                if changed.is_err() {
                    return;
                }
            }
            _ = stop.wait_for(|s| *s) => return,
        }
        if *stop.borrow() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;

    #[test]
    fn cutoff_is_max_age_before_now() {
        let now = Timestamp::from_second(1_000_000).unwrap();
        assert_eq!(age_cutoff(now, 1).as_second(), 1_000_000 - 3600);
        assert_eq!(age_cutoff(now, 720).as_second(), 1_000_000 - 720 * 3600);
        assert_eq!(age_cutoff(Timestamp::MIN, 1), Timestamp::MIN);
    }
}
