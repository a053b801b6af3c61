//! The store on its own, below the services: every audited write goes through one helper
//! that writes the change and its audit row together or not at all. Runs on SQLite, and on
//! PostgreSQL when `TENANTRY_TEST_DATABASE_URL` is set (each test in its own schema).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::{Database, T0_MS};
use tenantry_api::Error;
use tenantry_api::store::{AuditRecord, AuditRow, NewSignup, SignupOutcome, Store, Write};

async fn open(db: &Database) -> Store {
    Store::connect(&db.url, 4).await.unwrap()
}

fn record(action: &'static str, target: &str) -> AuditRecord {
    AuditRecord {
        action,
        actor_user_id: "u-1".into(),
        target: target.into(),
        success: true,
        source: "127.0.0.1".into(),
        detail_json: String::new(),
    }
}

fn new_signup(n: u32) -> NewSignup {
    NewSignup {
        user_id: format!("u-{n}"),
        email: format!("owner{n}@example.com"),
        password_hash: "not-a-real-hash".into(),
        tenant_id: format!("t-{n}"),
        tenant_name: format!("tenant-{n}"),
        plan: "standard".into(),
        phase: "Provisioning".into(),
        retention_max_age_hours: 336,
        retention_max_count: 10_000,
        now_ms: T0_MS,
    }
}

/// Signs up user `u-n` with tenant `t-n`.
async fn signup(store: &Store, n: u32) {
    let outcome = store
        .create_signup(&new_signup(n), &record("account.signup", &format!("t-{n}")))
        .await
        .unwrap();
    assert_eq!(outcome, SignupOutcome::Created);
}

async fn audit_rows(store: &Store) -> Vec<AuditRow> {
    store.list_audit(0, 1_000).await.unwrap()
}

#[tokio::test]
async fn each_audited_write_appends_exactly_one_chained_row() {
    let db = Database::new().await;
    let store = open(&db).await;
    signup(&store, 1).await;
    assert_eq!(audit_rows(&store).await.len(), 1);

    store
        .set_retention(
            "t-1",
            24,
            100,
            &record("tenant.retention.set", "t-1"),
            T0_MS + 1,
        )
        .await
        .unwrap();
    store
        .set_suspended(
            "t-1",
            true,
            "Suspended",
            &record("admin.tenant.suspend", "t-1"),
            T0_MS + 2,
        )
        .await
        .unwrap();
    let written = store
        .commit_audited([&record("custom", "t-1")], T0_MS + 3, async |tx| {
            sqlx::query("UPDATE tenants SET message = 'custom' WHERE id = 't-1'")
                .execute(&mut *tx)
                .await?;
            Ok(Write::Commit(7))
        })
        .await
        .unwrap();
    assert_eq!(written, 7);
    assert_eq!(
        store.tenant("t-1").await.unwrap().unwrap().message,
        "custom"
    );

    let rows = audit_rows(&store).await;
    let actions: Vec<&str> = rows.iter().map(|r| r.entry.action.as_str()).collect();
    assert_eq!(
        actions,
        [
            "account.signup",
            "tenant.retention.set",
            "admin.tenant.suspend",
            "custom"
        ]
    );
    for (i, row) in rows.iter().enumerate() {
        assert_eq!(row.entry.sequence, i as i64 + 1);
        if i > 0 {
            assert_eq!(row.prev_hash, rows[i - 1].hash, "row {} is chained", i + 1);
        }
    }
    assert_eq!(rows[3].entry.at_ms, T0_MS + 3);
    assert_eq!(store.verify_audit().await.unwrap(), Ok(4));
}

#[tokio::test]
async fn a_write_the_change_declines_is_neither_kept_nor_audited() {
    let db = Database::new().await;
    let store = open(&db).await;
    signup(&store, 1).await;

    // The tenant name is taken: the user row written first must not stay behind.
    let mut again = new_signup(2);
    again.tenant_name = "tenant-1".into();
    let outcome = store
        .create_signup(&again, &record("account.signup", "t-2"))
        .await
        .unwrap();
    assert_eq!(outcome, SignupOutcome::TenantNameTaken);
    assert!(store.user_by_id("u-2").await.unwrap().is_none());

    let kept = store
        .commit_audited([&record("custom", "t-1")], T0_MS, async |tx| {
            sqlx::query("UPDATE tenants SET message = 'declined' WHERE id = 't-1'")
                .execute(&mut *tx)
                .await?;
            Ok(Write::Rollback("declined"))
        })
        .await
        .unwrap();
    assert_eq!(kept, "declined");
    assert_eq!(store.tenant("t-1").await.unwrap().unwrap().message, "");
    assert_eq!(audit_rows(&store).await.len(), 1);
}

#[tokio::test]
async fn a_failed_change_rolls_back_and_is_not_audited() {
    let db = Database::new().await;
    let store = open(&db).await;
    signup(&store, 1).await;

    let failed = store
        .commit_audited([&record("custom", "t-1")], T0_MS, async |tx| {
            sqlx::query("UPDATE tenants SET message = 'half done' WHERE id = 't-1'")
                .execute(&mut *tx)
                .await?;
            Err::<Write<()>, _>(Error::NotFound("tenant"))
        })
        .await;
    assert!(
        matches!(failed, Err(Error::NotFound("tenant"))),
        "{failed:?}"
    );
    assert_eq!(store.tenant("t-1").await.unwrap().unwrap().message, "");

    let missing = store
        .set_retention(
            "t-404",
            24,
            100,
            &record("tenant.retention.set", "t-404"),
            T0_MS,
        )
        .await;
    assert!(
        matches!(missing, Err(Error::NotFound("tenant"))),
        "{missing:?}"
    );
    assert_eq!(audit_rows(&store).await.len(), 1);
    assert_eq!(store.verify_audit().await.unwrap(), Ok(1));
}

#[tokio::test]
async fn a_failed_audit_append_rolls_back_the_change() {
    let db = Database::new().await;
    let store = open(&db).await;
    signup(&store, 1).await;
    let before = store.tenant("t-1").await.unwrap().unwrap();

    // Without its head row the chain cannot be extended, so every append fails.
    store
        .execute_raw_for_tests("DELETE FROM audit_head")
        .await
        .unwrap();
    let failed = store
        .set_retention(
            "t-1",
            24,
            100,
            &record("tenant.retention.set", "t-1"),
            T0_MS + 1,
        )
        .await;
    assert!(failed.is_err(), "{failed:?}");
    assert_eq!(store.tenant("t-1").await.unwrap().unwrap(), before);
    let failed = store
        .set_password(
            "u-1",
            "another-hash",
            &record("account.password", "u-1"),
            T0_MS + 1,
        )
        .await;
    assert!(failed.is_err(), "{failed:?}");
    assert_eq!(
        store
            .user_by_id("u-1")
            .await
            .unwrap()
            .unwrap()
            .password_hash,
        "not-a-real-hash"
    );
    let rows = audit_rows(&store).await;
    assert_eq!(rows.len(), 1, "only the signup is recorded");
}
