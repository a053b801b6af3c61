//! Crypto-shredding: executions written over several simulated days (a manual clock), the
//! raw store copied aside, retention expires the oldest day; the copy's rows of that day
//! then open with no key the instance still holds (nor the key-encryption key), while the
//! newer rows open, and the key store's file holds nothing of the deleted key.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use jiff::{SignedDuration, Timestamp};
use sqlx::Connection as _;
use sqlx::Row as _;
use tenant_runtime::clock::Clock;
use tenant_runtime::crypto::{DataKey, RecordKey, SealedWith, Sealer, Table, sealed_with};
use tenant_runtime::keystore::{KEYS_FILE, Keyring};
use tenant_runtime::metrics::Metrics;
use tenant_runtime::retention;
use tenant_runtime::store::{DB_FILE, NewExecution, Store};
use tenantry_proto::retention::RetentionPolicy;

use crate::common::{contains, metric, open_read_only};

const DAY: Duration = Duration::from_secs(86_400);

fn raw_key_store(data: &std::path::Path) -> Vec<u8> {
    let mut raw = Vec::new();
    for suffix in ["", "-wal", "-shm"] {
        raw.extend(std::fs::read(data.join(format!("{KEYS_FILE}{suffix}"))).unwrap_or_default());
    }
    raw
}

async fn wrapped_entry(data: &std::path::Path, id: u32) -> Vec<u8> {
    let mut conn = open_read_only(&data.join(KEYS_FILE)).await;
    let wrapped: Vec<u8> = sqlx::query_scalar("SELECT wrapped FROM data_keys WHERE id = ?")
        .bind(i64::from(id))
        .fetch_one(&mut conn)
        .await
        .unwrap();
    conn.close().await.unwrap();
    wrapped
}

#[tokio::test]
async fn retention_shreds_the_oldest_day_so_an_earlier_copy_of_its_rows_cannot_be_read() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut kek_bytes = [0u8; 32];
    getrandom::fill(&mut kek_bytes).unwrap();
    let kek = || DataKey::from_bytes(&kek_bytes).unwrap();
    let keys = Keyring::open(&data, "acme", kek(), None, DAY)
        .await
        .unwrap();
    let store = Store::open(&data, keys).await.unwrap();

    let day0: Timestamp = "2026-11-01T00:00:00Z".parse().unwrap();
    let now = Arc::new(AtomicI64::new(day0.as_microsecond()));
    let clock = {
        let now = now.clone();
        Clock::from_fn(move || Timestamp::from_microsecond(now.load(Ordering::SeqCst)).unwrap())
    };
    let at = |day: i64, minutes: i64| {
        day0.checked_add(SignedDuration::from_hours(24 * day) + SignedDuration::from_mins(minutes))
            .unwrap()
    };
    // Three simulated days, twenty executions each, between 12:00 and 15:30.
    let mut written = Vec::new();
    for day in 0..3 {
        for i in 0..20 {
            now.store(
                at(day, 12 * 60 + 10 * i + 1).as_microsecond(),
                Ordering::SeqCst,
            );
            let new = NewExecution {
                workflow_id: format!("wf-{day}"),
                status: "success".into(),
                started_at: at(day, 12 * 60 + 10 * i),
                finished_at: Some(clock.now()),
                data: serde_json::json!({"day": day, "i": i, "note": format!("day-{day}-secret-{i}")}),
            };
            written.push((store.insert_execution(&new).await.unwrap(), day, new.data));
        }
    }
    let periods = store.keys().keys();
    let key_of_day = |day: i64| {
        let start = at(day, 0).as_microsecond();
        periods
            .iter()
            .find(|k| k.period.is_some_and(|p| p.start == start))
            .unwrap()
            .id
    };
    let (oldest, next) = (key_of_day(0), key_of_day(1));
    // Captured before shredding, to look for afterwards.
    let oldest_bytes = store.keys().key_bytes_for_tests(oldest).unwrap();
    let oldest_wrapped = wrapped_entry(&data, oldest).await;
    let next_wrapped = wrapped_entry(&data, next).await;

    // The raw store, copied aside as a backup or a disk image would.
    store.checkpoint().await.unwrap();
    let aside = tempfile::tempdir().unwrap();
    let copy = aside.path().join(DB_FILE);
    std::fs::copy(data.join(DB_FILE), &copy).unwrap();

    // Day 3, 01:00 with a 48-hour policy: day 0 is past the cut-off, day 1 is not.
    now.store(at(3, 60).as_microsecond(), Ordering::SeqCst);
    let metrics = Metrics::new();
    let (_stop_tx, stop) = tokio::sync::watch::channel(false);
    let policy = RetentionPolicy {
        max_age_hours: 48,
        max_count: 10_000,
    };
    let report = retention::prune(&store, policy, clock.now(), 7, &metrics, &stop)
        .await
        .unwrap();
    assert_eq!(
        (report.by_age, report.by_count, report.keys_shredded),
        (20, 0, 1)
    );
    assert_eq!(
        metric(
            &metrics.encode(),
            &["tenant_runtime_data_keys_shredded_total"]
        ),
        1.0
    );
    // A second run has nothing left to shred.
    let again = retention::prune(&store, policy, clock.now(), 7, &metrics, &stop)
        .await
        .unwrap();
    assert_eq!(again.keys_shredded, 0);
    assert!(store.keys().is_retired(oldest));
    assert!(store.keys().key_bytes_for_tests(next).is_some());

    // Every row of day 0 in the copy: no key the instance holds opens it, not as the key
    // it names, not as a version-1 record under any of them, and not the instance itself.
    let held = store.keys().every_key_for_tests();
    assert!(held.len() >= 4, "day 1, day 2, credentials, the KEK");
    assert!(held.iter().any(|k| k.same_as(&kek())));
    let mut conn = open_read_only(&copy).await;
    let rows = sqlx::query("SELECT id, payload FROM executions")
        .fetch_all(&mut conn)
        .await
        .unwrap();
    assert_eq!(rows.len(), 60);
    let (mut unreadable, mut readable) = (0, 0);
    for row in rows {
        let id: String = row.get(0);
        let payload: Vec<u8> = row.get(1);
        let (_, day, expected) = written.iter().find(|(w, _, _)| *w == id).unwrap();
        let Some(SealedWith::Key(named)) = sealed_with(&payload) else {
            panic!("row {id} is not sealed under a data key");
        };
        if *day == 0 {
            assert_eq!(named, oldest);
            for key in &held {
                assert!(
                    RecordKey::new(named, key, "acme")
                        .open(Table::Executions, &id, &payload)
                        .is_err()
                );
                assert!(
                    Sealer::new(key, "acme")
                        .open(Table::Executions, &id, &payload)
                        .is_err()
                );
            }
            assert!(matches!(
                store.keys().open_record(Table::Executions, &id, &payload),
                Err(tenant_runtime::Error::KeyRetired { .. })
            ));
            // The key captured before shredding does open it: the copy is intact, only the
            // key is gone.
            let captured = DataKey::from_bytes(&oldest_bytes).unwrap();
            assert!(
                RecordKey::new(named, &captured, "acme")
                    .open(Table::Executions, &id, &payload)
                    .is_ok()
            );
            unreadable += 1;
        } else {
            let plain = store
                .keys()
                .open_record(Table::Executions, &id, &payload)
                .unwrap();
            assert_eq!(
                &serde_json::from_slice::<serde_json::Value>(&plain).unwrap(),
                expected
            );
            readable += 1;
        }
    }
    assert_eq!((unreadable, readable), (20, 40));
    conn.close().await.unwrap();

    // The key store's files hold neither the deleted key nor its wrapped entry, while the
    // next day's entry is still there (so the scan would see one).
    let raw = raw_key_store(&data);
    assert!(contains(&raw, &next_wrapped), "the scan sees live entries");
    assert!(
        !contains(&raw, &oldest_wrapped),
        "shredded entry left in keys.db"
    );
    assert!(!contains(&raw, &oldest_bytes), "raw key in keys.db");
    // ... and the instance's own store no longer has day 0 either.
    assert_eq!(store.count_executions().await.unwrap(), 40);
    store.close().await;
    store.keys().close().await;
    let raw = raw_key_store(&data);
    assert!(!contains(&raw, &oldest_wrapped));
    // Reopened, the instance still holds everything but day 0's key.
    let keys = Keyring::open(&data, "acme", kek(), None, DAY)
        .await
        .unwrap();
    assert!(keys.is_retired(oldest));
    assert!(keys.key_bytes_for_tests(next).is_some());
    keys.close().await;
}
