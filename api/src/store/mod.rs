//! The database: SQLite (embedded, the default) or PostgreSQL, through sqlx's `Any` driver
//! with portable SQL. Every query lives in this module and its children, one per aggregate;
//! services never write SQL.
//!
//! SQLite has one writer at a time. Within a process, writers queue in order on an async
//! gate ([`Store::write_turn`]) and so never meet SQLite's lock, whose busy handler sleeps
//! 1, 2, 5, 10… ms between tries (a writer could sleep past the moment the lock came
//! free). Write transactions still start with `BEGIN IMMEDIATE`, and the busy timeout
//! still covers writers in other processes (the one-off commands).

mod access;
mod audit;
pub mod backup;
mod mail;
mod master_keys;
mod mfa;
pub mod session_cache;
mod sessions;
mod tenants;
mod token_keys;
mod users;

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use secrecy::SecretString;

use sqlx::any::{AnyConnectOptions, AnyPoolOptions};
use sqlx::{AnyConnection, AnyPool, Transaction};

use crate::error::{Error, Result};

pub use access::{
    Deactivated, GrantOutcome, GrantRow, ItemDecision, NewGrant, ReviewItemRow, ReviewRow,
    UserWithRoles,
};
pub use audit::{AuditFilter, AuditRecord, AuditRow};
pub use mail::{NewVerification, OutboxRow};
pub use master_keys::{KeyHolder, SealedColumn, SealedRow};
pub use sessions::{AUTH_CHANNEL, LISTENER_APPLICATION_NAME, SessionRow};
pub use tenants::{TenantRow, TenantStatus};
pub use token_keys::{AddedKey, TokenKeyRow};
pub use users::{Factor, NewSignup, SignupOutcome, UserRow};

/// Which database is behind the pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// Embedded SQLite.
    Sqlite,
    /// PostgreSQL.
    Postgres,
}

impl Backend {
    /// The backend a database URL names; anything but SQLite or PostgreSQL is refused.
    pub fn of_url(url: &str) -> Result<Backend> {
        if url.starts_with("sqlite:") {
            Ok(Backend::Sqlite)
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Ok(Backend::Postgres)
        } else {
            Err(Error::Config(
                "database URL must start with sqlite:// or postgres://".into(),
            ))
        }
    }
}

/// The database handle; cheap to clone.
#[derive(Clone, Debug)]
pub struct Store {
    pool: AnyPool,
    backend: Backend,
    /// Sessions of authenticated calls; see [`session_cache`].
    cache: Arc<session_cache::SessionCache>,
    /// For the revocation listener's own connection (PostgreSQL).
    url: Arc<SecretString>,
    /// The last `auth_changes` row this replica has applied (SQLite).
    auth_seq: Arc<tokio::sync::Mutex<i64>>,
    /// The in-process writer queue (SQLite); see the module's documentation.
    write_gate: Arc<tokio::sync::Mutex<()>>,
}

/// A write transaction, holding this process's writer turn on SQLite until it ends.
pub(crate) struct WriteTx {
    tx: Transaction<'static, sqlx::Any>,
    _turn: Option<tokio::sync::OwnedMutexGuard<()>>,
}

impl WriteTx {
    async fn commit(self) -> Result<()> {
        Ok(self.tx.commit().await?)
    }

    async fn rollback(self) -> Result<()> {
        Ok(self.tx.rollback().await?)
    }
}

impl std::ops::Deref for WriteTx {
    type Target = AnyConnection;
    fn deref(&self) -> &Self::Target {
        &self.tx
    }
}

impl std::ops::DerefMut for WriteTx {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.tx
    }
}

/// A pooled connection for one write statement; see [`Store::writer`].
pub(crate) struct WriteConn {
    conn: sqlx::pool::PoolConnection<sqlx::Any>,
    _turn: Option<tokio::sync::OwnedMutexGuard<()>>,
}

impl std::ops::Deref for WriteConn {
    type Target = AnyConnection;
    fn deref(&self) -> &Self::Target {
        &self.conn
    }
}

impl std::ops::DerefMut for WriteConn {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.conn
    }
}

/// What the change run by [`Store::commit_audited`] decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Write<T> {
    /// The change is made: append the audit rows, commit, and return the value.
    Commit(T),
    /// Nothing is to be kept or recorded (a name is taken, a precondition no longer holds):
    /// roll back without auditing, and return the value.
    Rollback(T),
}

/// A unique violation becomes a [`Write::Rollback`] with `taken`; any other error stays one.
fn rollback_if_taken<T>(e: sqlx::Error, taken: T) -> Result<Write<T>> {
    match e {
        sqlx::Error::Database(db) if db.is_unique_violation() => Ok(Write::Rollback(taken)),
        other => Err(other.into()),
    }
}

/// How long a pooled connection may sit idle and still be handed out without a ping (it
/// was pinged when it went back to the pool).
const RECHECK_IDLE: Duration = Duration::from_secs(1);

/// A query with its SQL text owned, so it can be handed around before it runs.
type AnyQuery = sqlx::query::Query<'static, sqlx::Any, sqlx::any::AnyArguments>;

fn dyn_sql(sql: String) -> sqlx::AssertSqlSafe<String> {
    sqlx::AssertSqlSafe(sql)
}

/// A bind value of a query built at run time.
enum Arg {
    Text(String),
    Int(i64),
}

/// A query whose text was built at run time (placeholders only, never values), with its
/// binds in placeholder order.
fn bind_all(sql: String, args: Vec<Arg>) -> AnyQuery {
    let mut query = sqlx::query(dyn_sql(sql));
    for arg in args {
        query = match arg {
            Arg::Text(t) => query.bind(t),
            Arg::Int(n) => query.bind(n),
        };
    }
    query
}

impl Store {
    /// Connects to `url` (`sqlite://PATH` or `postgres://…`), creating a SQLite file if
    /// missing, and applies pending migrations.
    pub async fn connect(url: &str, max_connections: u32) -> Result<Store> {
        sqlx::any::install_default_drivers();
        let backend = Backend::of_url(url)?;
        let url = match backend {
            Backend::Sqlite if !url.contains("mode=") => {
                let sep = if url.contains('?') { '&' } else { '?' };
                format!("{url}{sep}mode=rwc")
            }
            _ => url.to_owned(),
        };
        let options = AnyConnectOptions::from_str(&url)
            .map_err(|e| Error::Config(format!("invalid database URL: {e}")))?;
        let mut pool_options = AnyPoolOptions::new()
            .max_connections(max_connections.max(1))
            .acquire_timeout(Duration::from_secs(5))
            // sqlx pings every connection as it goes back to the pool, and by default once
            // more as it is taken out: a round trip to the database (and, on PostgreSQL, a
            // wake-up of its backend) before each call's first statement. Only a connection
            // that sat idle for a while is pinged again before use, as connection pools
            // commonly do (HikariCP skips the check within 500 ms of the last use).
            .test_before_acquire(false)
            .before_acquire(|conn, meta| {
                Box::pin(async move {
                    if meta.idle_for >= RECHECK_IDLE {
                        sqlx::Connection::ping(conn).await?;
                    }
                    Ok(true)
                })
            });
        if backend == Backend::Sqlite {
            pool_options = pool_options.after_connect(|conn, _meta| {
                Box::pin(async move {
                    sqlx::raw_sql(
                        "PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL; \
                         PRAGMA foreign_keys = ON; PRAGMA busy_timeout = 10000;",
                    )
                    .execute(conn)
                    .await?;
                    Ok(())
                })
            });
        }
        let pool = pool_options
            .connect_with(options)
            .await
            .map_err(Error::Unavailable)?;
        let store = Store {
            pool,
            backend,
            cache: Arc::new(session_cache::SessionCache::new(
                backend == Backend::Postgres,
            )),
            url: Arc::new(SecretString::from(url)),
            auth_seq: Arc::new(tokio::sync::Mutex::new(0)),
            write_gate: Arc::new(tokio::sync::Mutex::new(())),
        };
        store.migrate().await?;
        Ok(store)
    }

    /// The database URL (a secret: it may hold a password).
    pub fn url(&self) -> SecretString {
        self.url.as_ref().clone()
    }

    /// Which database this is.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Closes the pool.
    pub async fn close(&self) {
        self.pool.close().await;
    }

    /// This process's turn to write: on SQLite, writers wait here, in order, rather than
    /// on the database's lock; on PostgreSQL there is no turn to take.
    async fn write_turn(&self) -> Option<tokio::sync::OwnedMutexGuard<()>> {
        match self.backend {
            Backend::Sqlite => Some(Arc::clone(&self.write_gate).lock_owned().await),
            Backend::Postgres => None,
        }
    }

    async fn begin_write(&self) -> Result<WriteTx> {
        let turn = self.write_turn().await;
        let tx = match self.backend {
            Backend::Sqlite => self.pool.begin_with("BEGIN IMMEDIATE").await?,
            Backend::Postgres => self.pool.begin().await?,
        };
        Ok(WriteTx { tx, _turn: turn })
    }

    /// A connection for one write statement outside a transaction, holding this process's
    /// writer turn on SQLite until it is dropped (at the end of the statement that uses it).
    async fn writer(&self) -> Result<WriteConn> {
        let turn = self.write_turn().await;
        let conn = self.pool.acquire().await?;
        Ok(WriteConn { conn, _turn: turn })
    }

    /// Every audited write: runs `change` in a write transaction, then appends `audits` to
    /// the chain (in order, each one row) and commits. The change and its audit rows are
    /// written together or not at all: when the change or an append fails, nothing is
    /// committed and the error is returned; when the change answers [`Write::Rollback`],
    /// nothing is committed or audited.
    ///
    /// The store's aggregates use it for each audited write; it is public for the store's
    /// own tests, not for services (they never write SQL).
    pub async fn commit_audited<'a, T>(
        &self,
        audits: impl IntoIterator<Item = &'a AuditRecord>,
        now_ms: i64,
        change: impl AsyncFnOnce(&mut AnyConnection) -> Result<Write<T>>,
    ) -> Result<T> {
        // Read before the transaction holds a connection (the lock's holder may need one).
        let since = match self.backend {
            Backend::Sqlite => *self.auth_seq.lock().await,
            Backend::Postgres => 0,
        };
        let mut tx = self.begin_write().await?;
        // On an error the transaction is rolled back here, before the connection goes back
        // to the pool: a dropped transaction only queues its ROLLBACK for the connection's
        // next use, and until then it holds its locks (an idle pool connection kept a
        // failed audit append's row lock, and a schema drop waited on it for good).
        let written = match change(&mut *tx).await {
            Ok(written) => written,
            Err(e) => return Err(rolled_back(tx, e).await),
        };
        match written {
            Write::Commit(value) => {
                let mut changed = None;
                for record in audits {
                    match audit::append_audit_reading_changes(&mut tx, record, now_ms, since).await
                    {
                        Ok(c) => changed = Some(c),
                        Err(e) => return Err(rolled_back(tx, e).await),
                    }
                }
                self.commit(tx, changed).await?;
                Ok(value)
            }
            Write::Rollback(value) => {
                tx.rollback().await?;
                Ok(value)
            }
        }
    }

    /// Commits a write transaction; the sessions it changed leave this replica's cache
    /// before this returns (other replicas hear of them through the database).
    ///
    /// `changed` is what the transaction's last audit append read of those changes (see
    /// [`audit::append_audit_reading_changes`]); without it, they are read here.
    async fn commit(&self, mut tx: WriteTx, changed: Option<String>) -> Result<()> {
        if !self.cache.enabled() {
            tx.commit().await?;
            return Ok(());
        }
        match self.backend {
            Backend::Postgres => {
                let changed =
                    match changed {
                        Some(changed) => changed,
                        None => sqlx::query_scalar(
                            "SELECT COALESCE(current_setting('tenantry.auth_changed', true), '')",
                        )
                        .fetch_one(&mut *tx)
                        .await?,
                    };
                tx.commit().await?;
                if !changed.is_empty() {
                    self.cache.forget_listed(&changed);
                }
            }
            Backend::Sqlite => {
                tx.commit().await?;
                // The changes the transaction saw after those this replica had applied.
                if let Some((newest, users)) = changed.as_deref().and_then(|c| c.split_once(' '))
                    && let Ok(newest) = newest.parse::<i64>()
                {
                    let mut last = self.auth_seq.lock().await;
                    if newest > *last {
                        self.cache.forget_users(users.split(','));
                        *last = newest;
                    }
                    return Ok(());
                }
                if let Err(e) = self.apply_auth_changes().await {
                    tracing::warn!(error = %e, "could not read session changes; emptying the session cache");
                    self.cache.forget_all();
                }
            }
        }
        Ok(())
    }

    async fn migrate(&self) -> Result<()> {
        let mut tx = self.begin_write().await?;
        if self.backend == Backend::Postgres {
            // Several API replicas may start at once; one migrates, the others wait.
            sqlx::query("SELECT pg_advisory_xact_lock(7355608201)")
                .execute(&mut *tx)
                .await?;
        }
        let applied = backup::schema_version(&mut tx, self.backend).await?;
        backup::migrate_in(
            &mut tx,
            self.backend,
            applied,
            backup::current_schema_version(),
            crate::clock::Clock::now_ms(&crate::clock::SystemClock),
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// True when the database answers.
    pub async fn ping(&self) -> bool {
        sqlx::query("SELECT 1").execute(&self.pool).await.is_ok()
    }

    /// Runs raw SQL; for tests that play an attacker with database access.
    #[doc(hidden)]
    pub async fn execute_raw_for_tests(&self, sql: &str) -> Result<()> {
        sqlx::raw_sql(dyn_sql(sql.to_owned()))
            .execute(&self.pool)
            .await?;
        // Whatever it changed, this replica reads it from the database from now on.
        self.cache.forget_all();
        Ok(())
    }
}

/// Rolls `tx` back now and returns `error` (what the caller answers); a failed rollback is
/// logged, and the connection is then closed by the pool rather than reused.
async fn rolled_back(tx: WriteTx, error: Error) -> Error {
    if let Err(e) = tx.rollback().await {
        tracing::warn!(error = %e, "could not roll back a failed write");
    }
    error
}
