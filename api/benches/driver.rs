//! The `Any` driver against the native ones (not a test): the query behind `GetTenant` (a
//! tenant joined with the caller's membership, by primary keys) through
//! `sqlx::AnyPool` and through `sqlx::SqlitePool` / `sqlx::PgPool` on the same database,
//! side by side in one run, at 1, 8 and 32 tasks, and the pool size's effect at 32.
//!
//! `cargo bench -p tenantry-api --bench driver`; with `TENANTRY_BENCH_DATABASE_URL`
//! (a PostgreSQL server), PostgreSQL too, on a fresh database dropped at the end.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use sqlx::Row as _;

const TENANTS: usize = 1000;
const QUERIES: usize = 20_000;
const TASKS: [usize; 3] = [1, 8, 32];

const SCHEMA: [&str; 2] = [
    "CREATE TABLE tenants (id TEXT PRIMARY KEY, name TEXT NOT NULL, owner_user_id TEXT NOT NULL, \
     plan TEXT NOT NULL, phase TEXT NOT NULL, suspended BIGINT NOT NULL, \
     retention_max_age_hours BIGINT NOT NULL, retention_max_count BIGINT NOT NULL, \
     endpoint TEXT NOT NULL, cert_serial TEXT NOT NULL, cert_not_after_ms BIGINT NOT NULL, \
     cert_renewal_ms BIGINT NOT NULL, message TEXT NOT NULL, created_at_ms BIGINT NOT NULL)",
    "CREATE TABLE memberships (user_id TEXT NOT NULL, tenant_id TEXT NOT NULL, \
     role TEXT NOT NULL, PRIMARY KEY (user_id, tenant_id))",
];

const QUERY: &str = "SELECT t.id, t.name, t.owner_user_id, t.plan, t.phase, t.suspended, \
     t.retention_max_age_hours, t.retention_max_count, t.endpoint, t.cert_serial, \
     t.cert_not_after_ms, t.cert_renewal_ms, t.message, t.created_at_ms, m.role \
     FROM tenants t JOIN memberships m ON m.tenant_id = t.id WHERE m.user_id = $1 AND t.id = $2";

/// Reads the row the way the store does: every column by name.
macro_rules! read_row {
    ($row:expr) => {{
        let row = $row;
        let id: String = row.try_get("id").unwrap();
        let _: String = row.try_get("name").unwrap();
        let _: String = row.try_get("owner_user_id").unwrap();
        let _: String = row.try_get("plan").unwrap();
        let _: String = row.try_get("phase").unwrap();
        let _: i64 = row.try_get("suspended").unwrap();
        let _: i64 = row.try_get("retention_max_age_hours").unwrap();
        let _: i64 = row.try_get("retention_max_count").unwrap();
        let _: String = row.try_get("endpoint").unwrap();
        let _: String = row.try_get("cert_serial").unwrap();
        let _: i64 = row.try_get("cert_not_after_ms").unwrap();
        let _: i64 = row.try_get("cert_renewal_ms").unwrap();
        let _: String = row.try_get("message").unwrap();
        let _: i64 = row.try_get("created_at_ms").unwrap();
        let _: String = row.try_get("role").unwrap();
        id
    }};
}

/// `QUERIES` lookups spread over `tasks`; queries per second.
async fn rate<F, Fut>(tasks: usize, lookup: F) -> f64
where
    F: Fn(String, String) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = String> + Send,
{
    let lookup = Arc::new(lookup);
    let next = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let mut handles = Vec::new();
    for _ in 0..tasks {
        let (lookup, next) = (Arc::clone(&lookup), Arc::clone(&next));
        handles.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= QUERIES {
                    return;
                }
                let n = (i * 7919) % TENANTS;
                let id = lookup(format!("u{n}"), format!("t{n}")).await;
                assert_eq!(id, format!("t{n}"));
            }
        }));
    }
    for h in handles {
        h.await.unwrap();
    }
    QUERIES as f64 / start.elapsed().as_secs_f64()
}

/// Queries per second of `QUERIES` lookups through a pool built by `$options` (the
/// `PoolOptions` of one driver), with `$size` connections and `$tasks` tasks.
macro_rules! pool_rate {
    ($options:expr, $url:expr, $size:expr, $tasks:expr) => {{
        let pool = $options.max_connections($size).connect($url).await.unwrap();
        rate($tasks, move |user, tenant| {
            let pool = pool.clone();
            async move {
                let row = sqlx::query(QUERY)
                    .bind(user)
                    .bind(tenant)
                    .fetch_one(&pool)
                    .await
                    .unwrap();
                read_row!(row)
            }
        })
        .await
    }};
}

async fn fill(url: &str) {
    let pool = sqlx::any::AnyPoolOptions::new()
        .max_connections(1)
        .connect(url)
        .await
        .unwrap();
    for ddl in SCHEMA {
        sqlx::query(ddl).execute(&pool).await.unwrap();
    }
    let mut tx = pool.begin().await.unwrap();
    for n in 0..TENANTS {
        sqlx::query(
            "INSERT INTO tenants VALUES ($1, $2, $3, 'pro', 'ready', 0, 720, 10000, \
             $4, 'abcdef', 1, 2, '', 3)",
        )
        .bind(format!("t{n}"))
        .bind(format!("name-{n}"))
        .bind(format!("u{n}"))
        .bind(format!("https://127.0.0.1:{}", 20_000 + n))
        .execute(&mut *tx)
        .await
        .unwrap();
        sqlx::query("INSERT INTO memberships VALUES ($1, $2, 'owner')")
            .bind(format!("u{n}"))
            .bind(format!("t{n}"))
            .execute(&mut *tx)
            .await
            .unwrap();
    }
    tx.commit().await.unwrap();
    pool.close().await;
}

fn psql(url: &str, sql: &str) {
    let out = std::process::Command::new("psql")
        .args([url, "-qAt", "-c", sql])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::main]
async fn main() {
    sqlx::any::install_default_drivers();
    let dir = tempfile::tempdir().unwrap();
    let sqlite = format!("sqlite://{}/driver.db?mode=rwc", dir.path().display());
    fill(&sqlite).await;
    println!(
        "GetTenant's query, {QUERIES} lookups over {TENANTS} tenants ({} cores); queries/s",
        std::thread::available_parallelism().map_or(0, std::num::NonZero::get),
    );
    println!("| backend | tasks | pool | Any | native | native ÷ Any |");
    println!("|---|---|---|---|---|---|");
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get() as u32);
    let sizes = |tasks: usize| {
        if tasks == 32 {
            vec![cores, 10, 32]
        } else {
            vec![10]
        }
    };
    for tasks in TASKS {
        for pool in sizes(tasks) {
            let any = pool_rate!(sqlx::any::AnyPoolOptions::new(), &sqlite, pool, tasks);
            let native = pool_rate!(sqlx::sqlite::SqlitePoolOptions::new(), &sqlite, pool, tasks);
            println!(
                "| SQLite | {tasks} | {pool} | {any:.0} | {native:.0} | {:.2} |",
                native / any
            );
        }
    }
    if let Some(base) = std::env::var("TENANTRY_BENCH_DATABASE_URL")
        .ok()
        .filter(|u| !u.is_empty())
    {
        let name = format!("driver_{}", std::process::id());
        psql(&base, &format!("CREATE DATABASE {name}"));
        let (head, _) = base.rsplit_once('/').unwrap();
        let url = format!("{head}/{name}");
        fill(&url).await;
        for tasks in TASKS {
            for pool in sizes(tasks) {
                let any = pool_rate!(sqlx::any::AnyPoolOptions::new(), &url, pool, tasks);
                let native = pool_rate!(sqlx::postgres::PgPoolOptions::new(), &url, pool, tasks);
                println!(
                    "| PostgreSQL | {tasks} | {pool} | {any:.0} | {native:.0} | {:.2} |",
                    native / any
                );
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        psql(&base, &format!("DROP DATABASE {name} WITH (FORCE)"));
    }
}
