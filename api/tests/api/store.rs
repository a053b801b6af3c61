//! The store on its own, below the services: every audited write goes through one helper
//! that writes the change and its audit row together or not at all, and tenant rows come
//! back typed. Runs on SQLite, and on PostgreSQL when `TENANTRY_TEST_DATABASE_URL` is set
//! (each test in its own schema).

use tenantry_api::Error;
use tenantry_api::store::{
    AuditRecord, AuditRow, NewSignup, SignupOutcome, Store, TenantStatus, Write,
};
use tenantry_proto::phase::TenantPhase;
use tenantry_proto::retention::{Plan, RetentionPolicy};

use crate::common::{Database, T0_MS};

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
        plan: Plan::Standard,
        phase: TenantPhase::Provisioning,
        retention: RetentionPolicy::default(),
        verification: tenantry_api::store::NewVerification {
            token_hash: format!("verification-{n}"),
            expires_at_ms: i64::MAX,
            notice: tenantry_api::mail::notice::Notice::VerifyEmail {
                token_sealed: "not-sealed".into(),
            },
            mail_id: uuid::Uuid::new_v4().to_string(),
            claimed_until_ms: 0,
        },
        message: String::new(),
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

fn policy(max_age_hours: u32, max_count: u32) -> RetentionPolicy {
    RetentionPolicy {
        max_age_hours,
        max_count,
    }
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
            policy(24, 100),
            &record("tenant.retention.set", "t-1"),
            T0_MS + 1,
        )
        .await
        .unwrap();
    store
        .set_suspended(
            "t-1",
            true,
            TenantPhase::Suspended,
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
    // The email is taken: the tenant must not stay behind.
    let mut again = new_signup(3);
    again.email = "owner1@example.com".into();
    let outcome = store
        .create_signup(&again, &record("account.signup", "t-3"))
        .await
        .unwrap();
    assert_eq!(outcome, SignupOutcome::EmailTaken);
    assert!(store.tenant("t-3").await.unwrap().is_none());

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
            policy(24, 100),
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
            policy(24, 100),
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

#[tokio::test]
async fn tenant_rows_round_trip_plan_phase_and_retention() {
    let db = Database::new().await;
    let store = open(&db).await;
    for (n, plan) in (1..).zip(Plan::ALL) {
        let mut s = new_signup(n);
        s.plan = plan;
        s.phase = TenantPhase::ALL[n as usize];
        s.retention = policy(n, 1_000_000);
        let outcome = store
            .create_signup(&s, &record("account.signup", &s.tenant_id))
            .await
            .unwrap();
        assert_eq!(outcome, SignupOutcome::Created);
        let row = store.tenant(&s.tenant_id).await.unwrap().unwrap();
        assert_eq!(
            (row.plan, row.phase, row.retention),
            (plan, TenantPhase::ALL[n as usize], policy(n, 1_000_000))
        );
    }

    // What the database holds are the names the CRD and the CLI use.
    let stored = |column: &'static str| {
        let url = db.url.clone();
        async move {
            use sqlx::{Connection as _, Row as _};
            let mut conn = sqlx::AnyConnection::connect(&url).await.unwrap();
            let row = sqlx::query(sqlx::AssertSqlSafe(format!(
                "SELECT {column} FROM tenants WHERE id = 't-3'"
            )))
            .fetch_one(&mut conn)
            .await
            .unwrap();
            row.try_get::<String, _>(0).unwrap()
        }
    };
    assert_eq!(stored("plan").await, "enterprise");
    assert_eq!(stored("phase").await, "Suspended");

    // Every write path keeps the types: retention, suspension, status, deletion.
    let after = store
        .set_retention("t-1", policy(720, 5), &record("r", "t-1"), T0_MS)
        .await
        .unwrap();
    assert_eq!(after.retention, policy(720, 5));
    assert_eq!(after.plan, Plan::Free);
    let after = store
        .set_suspended(
            "t-1",
            true,
            TenantPhase::Suspended,
            &record("s", "t-1"),
            T0_MS,
        )
        .await
        .unwrap();
    assert_eq!(
        (after.suspended, after.phase),
        (true, TenantPhase::Suspended)
    );
    let status = TenantStatus {
        phase: TenantPhase::Ready,
        endpoint: "https://tenant-1.example.com".into(),
        cert_serial: "0a".into(),
        cert_not_after_ms: T0_MS + 1,
        cert_renewal_ms: T0_MS,
        message: String::new(),
    };
    assert!(
        store
            .set_tenant_status("t-1", &status, T0_MS)
            .await
            .unwrap()
    );
    assert!(
        !store
            .set_tenant_status("t-1", &status, T0_MS)
            .await
            .unwrap()
    );
    assert_eq!(
        store.tenant("t-1").await.unwrap().unwrap().phase,
        TenantPhase::Ready
    );
    store
        .mark_terminating("t-1", &record("d", "t-1"), T0_MS)
        .await
        .unwrap();
    assert!(
        !store
            .set_tenant_status("t-1", &status, T0_MS)
            .await
            .unwrap()
    );
    let (row, role) = store.membership("u-1", "t-1").await.unwrap().unwrap();
    assert_eq!(
        (row.phase, role.as_str()),
        (TenantPhase::Terminating, "owner")
    );
}

#[tokio::test]
async fn a_stored_value_this_version_cannot_read_is_a_clear_error() {
    let db = Database::new().await;
    let store = open(&db).await;
    signup(&store, 1).await;
    signup(&store, 2).await;

    store
        .execute_raw_for_tests("UPDATE tenants SET phase = 'Exploded' WHERE id = 't-1'")
        .await
        .unwrap();
    let err = store.tenant("t-1").await.unwrap_err();
    assert!(
        matches!(
            err,
            Error::InvalidRow {
                column: "phase",
                ..
            }
        ),
        "{err:?}"
    );
    assert_eq!(
        err.to_string(),
        r#"tenants row t-1: phase "Exploded" is not a value this version can read"#
    );
    // Every read of the row says so; none shows the tenant with a made-up phase.
    assert!(store.list_tenants(None, 10).await.is_err());
    assert!(store.membership("u-1", "t-1").await.is_err());
    assert!(store.tenant("t-2").await.unwrap().is_some());
    // The reconcile loop goes on with the rows it can read.
    let readable: Vec<String> = store
        .all_tenants()
        .await
        .unwrap()
        .into_iter()
        .map(|t| t.id)
        .collect();
    assert_eq!(readable, ["t-2"]);

    store
        .execute_raw_for_tests("UPDATE tenants SET plan = 'gold' WHERE id = 't-2'")
        .await
        .unwrap();
    let err = store.tenant("t-2").await.unwrap_err();
    assert_eq!(
        err.to_string(),
        r#"tenants row t-2: plan "gold" is not a value this version can read"#
    );
    store
        .execute_raw_for_tests(
            "UPDATE tenants SET plan = 'free', retention_max_count = -1 WHERE id = 't-2'",
        )
        .await
        .unwrap();
    let err = store.tenant("t-2").await.unwrap_err();
    assert_eq!(
        err.to_string(),
        "tenants row t-2: retention_max_count -1 is not a value this version can read"
    );
}

/// A signup's verification mail written claimed (to be sent by the replica that wrote it)
/// is no poll's to take until the claim runs out; one written unclaimed is due at once.
#[tokio::test]
async fn claimed_verification_mail_waits_for_its_claim_to_run_out() {
    let db = Database::new().await;
    let store = open(&db).await;
    let claim_ms = 120_000;
    let mut claimed = new_signup(1);
    claimed.verification.claimed_until_ms = T0_MS + claim_ms;
    let claimed_id = claimed.verification.mail_id.clone();
    let outcome = store
        .create_signup(&claimed, &record("account.signup", "t-1"))
        .await
        .unwrap();
    assert_eq!(outcome, SignupOutcome::Created);
    signup(&store, 2).await;

    let due: Vec<String> = store
        .due_mail(T0_MS, 50)
        .await
        .unwrap()
        .into_iter()
        .map(|row| row.id)
        .collect();
    assert_eq!(due.len(), 1, "only the unclaimed mail is due: {due:?}");
    assert!(!due.contains(&claimed_id));
    assert!(
        !store
            .claim_mail(&claimed_id, T0_MS + 1, T0_MS + claim_ms)
            .await
            .unwrap(),
        "another worker cannot claim it meanwhile"
    );

    let later = T0_MS + claim_ms;
    let due = store.due_mail(later, 50).await.unwrap();
    assert!(
        due.iter().any(|row| row.id == claimed_id),
        "once the claim ran out (its writer died before sending), any worker sends it"
    );
}

/// Appends race from many connections, through both ways of appending (on PostgreSQL,
/// signup and login append in the same statement as their change; other writes in a
/// transaction): every row lands once, in one unbroken chain.
#[tokio::test]
async fn concurrent_appends_by_every_path_keep_one_chain() {
    let db = Database::new().await;
    let store = Store::connect(&db.url, 8).await.unwrap();
    let mut tasks = Vec::new();
    for worker in 0..8u32 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..6u32 {
                let n = worker * 100 + i;
                signup(&store, n).await;
                store
                    .record_login_success(
                        &format!("u-{n}"),
                        None,
                        &format!("session-{n}"),
                        i64::MAX,
                        "127.0.0.1",
                        &record("account.login", &format!("u-{n}")),
                        T0_MS + 1,
                    )
                    .await
                    .unwrap();
                store
                    .audit(&record("custom", &format!("t-{n}")), T0_MS + 2)
                    .await
                    .unwrap();
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let rows = audit_rows(&store).await;
    assert_eq!(rows.len(), 8 * 6 * 3);
    for (i, row) in rows.iter().enumerate() {
        assert_eq!(row.entry.sequence, i as i64 + 1);
    }
    assert_eq!(store.verify_audit().await.unwrap(), Ok(8 * 6 * 3));
    assert_eq!(store.audit_head_sequence().await.unwrap(), 8 * 6 * 3);
}

/// PostgreSQL: a signup publishes nothing to the replicas' session caches (its user is
/// new, so no replica holds a session of theirs), while a membership added to a user who
/// existed before is published as it always was.
#[tokio::test]
async fn a_signup_is_not_published_to_the_session_caches_but_a_new_membership_is() {
    let Some(db) = Database::postgres().await else {
        eprintln!("skipped: PostgreSQL only (TENANTRY_TEST_DATABASE_URL is unset)");
        return;
    };
    let store = open(&db).await;
    let mut listener = sqlx::postgres::PgListener::connect(&db.url).await.unwrap();
    listener.listen("tenantry_auth").await.unwrap();
    // The channel is the database's, shared by the tests running beside this one in
    // schemas of their own: this test's user ids are its own.
    let (first, second) = (917_301, 917_302);
    signup(&store, first).await;
    signup(&store, second).await;
    store
        .execute_raw_for_tests(&format!(
            "INSERT INTO memberships (user_id, tenant_id, role) VALUES ('u-{second}', 't-{first}', 'member')"
        ))
        .await
        .unwrap();

    // Notifications arrive in commit order: one sent by a signup would come first.
    let mine = [format!("u:u-{first}"), format!("u:u-{second}")];
    let first_of_mine = tokio::time::timeout(std::time::Duration::from_secs(5), async {
        loop {
            let n = listener.recv().await.unwrap();
            if mine.iter().any(|m| m == n.payload()) {
                return n.payload().to_owned();
            }
        }
    })
    .await
    .expect("the new membership was not published");
    assert_eq!(first_of_mine, format!("u:u-{second}"));
}

/// PostgreSQL: a pooled connection whose backend the database ended (a restart, an
/// operator's `pg_terminate_backend`, an idle timeout) is never handed to a call once it
/// has sat idle for a second: the pool pings it first and opens a new one. (A connection
/// back in the pool for less than that is not pinged again: it was pinged as it went back.)
#[tokio::test]
async fn connections_the_database_ended_are_replaced_before_use() {
    use sqlx::Connection as _;
    let Some(db) = Database::postgres().await else {
        eprintln!("skipped: PostgreSQL only (TENANTRY_TEST_DATABASE_URL is unset)");
        return;
    };
    // The database is shared with the tests running beside this one: this store's
    // connections are the ones with this name.
    let app = format!("tenantry-pool-{}", uuid::Uuid::new_v4().simple());
    let store = Store::connect(&format!("{}&application_name={app}", db.url), 4)
        .await
        .unwrap();
    let (a, b, c) = tokio::join!(store.ping(), store.ping(), store.ping());
    assert!(a && b && c);

    sqlx::any::install_default_drivers();
    let mut admin = sqlx::AnyConnection::connect(&db.url).await.unwrap();
    let ended: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE application_name = $1) AS ended",
    )
    .bind(&app)
    .fetch_one(&mut admin)
    .await
    .unwrap();
    assert!(ended >= 1, "no connection of the store's pool was found");

    tokio::time::sleep(std::time::Duration::from_millis(1_500)).await;
    for call in 0..8 {
        assert!(
            store.ping().await,
            "call {call} was handed a connection the database had ended"
        );
    }
}
