//! Sessions: login, the per-request lookup, logout and revocation, and the purge of expired
//! sessions.

use std::time::Duration;

use sqlx::Row;

use super::audit::AuditRecord;
use super::session_cache::{
    FLUSH_INTERVAL, HEARTBEAT_INTERVAL, LISTENER_STALE, SQLITE_POLL, SessionCache,
};
use super::{Arg, Backend, Store, Write, bind_all};
use crate::access::{HeldRole, Role};
use crate::error::{Error, Result};

/// A live session joined with its user.
#[derive(Debug, Clone)]
pub struct SessionRow {
    /// SHA-256 of the token.
    pub token_hash: String,
    /// The user.
    pub user_id: String,
    /// The user's email.
    pub email: String,
    /// The user's role grants, expired ones included (the caller compares with now).
    pub roles: Vec<HeldRole>,
    /// The user has a confirmed TOTP secret.
    pub mfa_enrolled: bool,
    /// The user has verified their email address.
    pub email_verified: bool,
    /// Last use.
    pub last_seen_ms: i64,
    /// Absolute expiry.
    pub expires_at_ms: i64,
    /// When this session verified a second factor.
    pub mfa_verified_at_ms: Option<i64>,
    /// The user's tenants, sorted.
    pub tenant_ids: Vec<String>,
}

// A deactivated user has no sessions; the join refuses one anyway, should one survive.
const SESSION_SQL_SQLITE: &str = "SELECT s.token_hash, s.user_id, u.email, \
    CASE WHEN u.totp_secret_sealed IS NULL THEN 0 ELSE 1 END AS mfa_enrolled, \
    CASE WHEN u.email_verified_at_ms IS NULL THEN 0 ELSE 1 END AS email_verified, \
    s.last_seen_ms, s.expires_at_ms, s.mfa_verified_at_ms, \
    (SELECT group_concat(m.tenant_id, ',') FROM memberships m WHERE m.user_id = s.user_id) AS tenant_ids, \
    (SELECT group_concat(g.role || ':' || g.expires_at_ms, ',') FROM role_grants g WHERE g.user_id = s.user_id) AS roles \
    FROM sessions s JOIN users u ON u.id = s.user_id \
    WHERE s.token_hash = $1 AND u.deactivated_at_ms IS NULL";

const SESSION_SQL_POSTGRES: &str = "SELECT s.token_hash, s.user_id, u.email, \
    CASE WHEN u.totp_secret_sealed IS NULL THEN 0 ELSE 1 END::BIGINT AS mfa_enrolled, \
    CASE WHEN u.email_verified_at_ms IS NULL THEN 0 ELSE 1 END::BIGINT AS email_verified, \
    s.last_seen_ms, s.expires_at_ms, s.mfa_verified_at_ms, \
    (SELECT string_agg(m.tenant_id, ',') FROM memberships m WHERE m.user_id = s.user_id) AS tenant_ids, \
    (SELECT string_agg(g.role || ':' || g.expires_at_ms::TEXT, ',') FROM role_grants g WHERE g.user_id = s.user_id) AS roles \
    FROM sessions s JOIN users u ON u.id = s.user_id \
    WHERE s.token_hash = $1 AND u.deactivated_at_ms IS NULL";

/// Reads `role:expires_at_ms,…`; a role this version does not know grants nothing.
fn parse_roles(text: Option<String>) -> Vec<HeldRole> {
    let mut roles: Vec<HeldRole> = text
        .unwrap_or_default()
        .split(',')
        .filter_map(|pair| {
            let (role, ms) = pair.split_once(':')?;
            Some(HeldRole {
                role: Role::parse(role)?,
                expires_at_ms: ms.parse().ok()?,
            })
        })
        .collect();
    roles.sort_by_key(|r| r.role);
    roles
}

impl Store {
    /// Resets password-failure counters, optionally stores a rehashed password, creates the
    /// session, and audits the login, in one transaction.
    #[allow(clippy::too_many_arguments)]
    pub async fn record_login_success(
        &self,
        user_id: &str,
        new_hash: Option<&str>,
        token_hash: &str,
        expires_at_ms: i64,
        source: &str,
        audit: &AuditRecord,
        now_ms: i64,
    ) -> Result<()> {
        // Both in one call, with the same parameters: on PostgreSQL one statement, on
        // SQLite two run together on its worker thread (parameters numbered across both).
        const BOTH_POSTGRES: &str = "WITH new_session AS (INSERT INTO sessions (token_hash, user_id, \
             created_at_ms, last_seen_ms, expires_at_ms, source) VALUES ($4, $2, $3, $3, $5, $6)) \
             UPDATE users SET login_failures = 0, login_lockouts = 0, login_locked_until_ms = 0, \
             password_hash = COALESCE($1, password_hash), last_login_at_ms = $3 WHERE id = $2";
        const BOTH_SQLITE: &str = "UPDATE users SET login_failures = 0, login_lockouts = 0, \
             login_locked_until_ms = 0, password_hash = COALESCE($1, password_hash), \
             last_login_at_ms = $3 WHERE id = $2; \
             INSERT INTO sessions (token_hash, user_id, created_at_ms, last_seen_ms, expires_at_ms, \
             source) VALUES ($4, $2, $3, $3, $5, $6)";
        // PostgreSQL without a rehash: the two and the audit row in one statement, run on
        // its own (a round trip instead of five). It changes no cached session: the new one
        // is not cached yet, and it sets none of the user's columns whose change revokes one.
        // A rehash changes the password hash, which the triggers report as such a change,
        // so it takes the transaction below, which reads that report before it commits.
        static WITH_AUDIT_POSTGRES: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
            super::audit::postgres_statement(
                "new_session AS (INSERT INTO sessions (token_hash, user_id, created_at_ms, \
                   last_seen_ms, expires_at_ms, source) VALUES ($3, $1, $2, $2, $4, $5)), \
                 login AS (UPDATE users SET login_failures = 0, login_lockouts = 0, \
                   login_locked_until_ms = 0, last_login_at_ms = $2 WHERE id = $1)",
                6,
            )
        });
        let both = match self.backend {
            Backend::Postgres if new_hash.is_none() => {
                let query = sqlx::query(WITH_AUDIT_POSTGRES.as_str())
                    .bind(user_id.to_owned())
                    .bind(now_ms)
                    .bind(token_hash.to_owned())
                    .bind(expires_at_ms)
                    .bind(source.to_owned());
                super::audit::bind_postgres_append(query, audit, now_ms)
                    .execute(&self.pool)
                    .await?;
                return Ok(());
            }
            Backend::Postgres => BOTH_POSTGRES,
            Backend::Sqlite => BOTH_SQLITE,
        };
        self.commit_audited([audit], now_ms, async |tx| {
            sqlx::query(both)
                .bind(new_hash)
                .bind(user_id)
                .bind(now_ms)
                .bind(token_hash)
                .bind(expires_at_ms)
                .bind(source)
                .execute(&mut *tx)
                .await?;
            Ok(Write::Commit(()))
        })
        .await
    }

    /// The session with this token hash, joined with its user.
    pub async fn session(&self, token_hash: &str) -> Result<Option<SessionRow>> {
        // One round trip per authenticated request: the caller's tenants come along.
        let sql = match self.backend {
            Backend::Sqlite => SESSION_SQL_SQLITE,
            Backend::Postgres => SESSION_SQL_POSTGRES,
        };
        let row = sqlx::query(sql)
            .bind(token_hash)
            .fetch_optional(&self.pool)
            .await?;
        let Some(row) = row else { return Ok(None) };
        let tenant_ids: Option<String> = row.try_get("tenant_ids")?;
        let mut tenant_ids: Vec<String> = tenant_ids
            .unwrap_or_default()
            .split(',')
            .filter(|id| !id.is_empty())
            .map(str::to_owned)
            .collect();
        tenant_ids.sort();
        Ok(Some(SessionRow {
            token_hash: row.try_get("token_hash")?,
            user_id: row.try_get("user_id")?,
            email: row.try_get("email")?,
            roles: parse_roles(row.try_get("roles")?),
            mfa_enrolled: row.try_get::<i64, _>("mfa_enrolled")? != 0,
            email_verified: row.try_get::<i64, _>("email_verified")? != 0,
            last_seen_ms: row.try_get("last_seen_ms")?,
            expires_at_ms: row.try_get("expires_at_ms")?,
            mfa_verified_at_ms: row.try_get("mfa_verified_at_ms")?,
            tenant_ids,
        }))
    }

    /// Records use of a session.
    pub async fn touch_session(&self, token_hash: &str, now_ms: i64) -> Result<()> {
        sqlx::query(
            "UPDATE sessions SET last_seen_ms = $1 WHERE token_hash = $2 AND last_seen_ms < $1",
        )
        .bind(now_ms)
        .bind(token_hash)
        .execute(&mut *self.writer().await?)
        .await?;
        Ok(())
    }

    /// Ends one session; audits it when a record is given.
    pub async fn delete_session(
        &self,
        token_hash: &str,
        audit: Option<&AuditRecord>,
        now_ms: i64,
    ) -> Result<()> {
        self.commit_audited(audit, now_ms, async |tx| {
            sqlx::query("DELETE FROM sessions WHERE token_hash = $1")
                .bind(token_hash)
                .execute(&mut *tx)
                .await?;
            Ok(Write::Commit(()))
        })
        .await
    }

    /// Ends every session of a user; returns how many.
    pub async fn delete_user_sessions(
        &self,
        user_id: &str,
        audit: &AuditRecord,
        now_ms: i64,
    ) -> Result<u64> {
        self.commit_audited([audit], now_ms, async |tx| {
            let exists: Option<String> = sqlx::query_scalar("SELECT id FROM users WHERE id = $1")
                .bind(user_id)
                .fetch_optional(&mut *tx)
                .await?;
            if exists.is_none() {
                return Err(Error::NotFound("user"));
            }
            let done = sqlx::query("DELETE FROM sessions WHERE user_id = $1")
                .bind(user_id)
                .execute(&mut *tx)
                .await?;
            Ok(Write::Commit(done.rows_affected()))
        })
        .await
    }

    /// Deletes sessions past their absolute expiry or idle since before `idle_before_ms`.
    pub async fn purge_sessions(&self, now_ms: i64, idle_before_ms: i64) -> Result<u64> {
        let done =
            sqlx::query("DELETE FROM sessions WHERE expires_at_ms <= $1 OR last_seen_ms < $2")
                .bind(now_ms)
                .bind(idle_before_ms)
                .execute(&mut *self.writer().await?)
                .await?;
        Ok(done.rows_affected())
    }
}

/// The PostgreSQL channel the revocation triggers notify (migration 5).
pub const AUTH_CHANNEL: &str = "tenantry_auth";
/// `application_name` of the revocation listener's connection (operators and tests find
/// its backend by it).
pub const LISTENER_APPLICATION_NAME: &str = "tenantry-auth-listener";

impl Store {
    /// This replica's session cache.
    pub fn session_cache(&self) -> &SessionCache {
        &self.cache
    }

    /// SQLite: forgets the sessions of every `auth_changes` row this replica has not
    /// applied yet.
    pub(super) async fn apply_auth_changes(&self) -> Result<()> {
        let mut last = self.auth_seq.lock().await;
        let rows: Vec<(i64, String)> =
            sqlx::query_as("SELECT seq, user_id FROM auth_changes WHERE seq > $1 ORDER BY seq")
                .bind(*last)
                .fetch_all(&self.pool)
                .await?;
        if let Some((seq, _)) = rows.last() {
            self.cache
                .forget_users(rows.iter().map(|(_, user)| user.as_str()));
            *last = *seq;
        }
        Ok(())
    }

    /// Writes `last_seen_ms` of the sessions used since it was last written (at least
    /// `granularity_ms` later; every unwritten use with 0), in batches; returns how many.
    pub async fn flush_last_seen(&self, granularity_ms: i64) -> Result<usize> {
        let pending = self.cache.take_pending(granularity_ms);
        let mut written = 0;
        for chunk in pending.chunks(100) {
            let mut sql = String::from("UPDATE sessions SET last_seen_ms = ");
            sql.push_str(match self.backend {
                Backend::Sqlite => "max(last_seen_ms, CASE token_hash",
                Backend::Postgres => "GREATEST(last_seen_ms, CASE token_hash",
            });
            let mut args = Vec::with_capacity(chunk.len() * 3);
            for (hash, used) in chunk {
                let n = args.len();
                sql.push_str(&format!(" WHEN ${} THEN ${}", n + 1, n + 2));
                args.push(Arg::Text(hash.clone()));
                args.push(Arg::Int(*used));
            }
            sql.push_str(" ELSE last_seen_ms END) WHERE token_hash IN (");
            for (i, (hash, _)) in chunk.iter().enumerate() {
                if i > 0 {
                    sql.push_str(", ");
                }
                sql.push_str(&format!("${}", args.len() + 1));
                args.push(Arg::Text(hash.clone()));
            }
            sql.push(')');
            if let Err(e) = bind_all(sql, args)
                .execute(&mut *self.writer().await?)
                .await
            {
                // Tried again with the next batch.
                for (hash, used) in chunk {
                    self.cache.keep_unwritten(hash, *used);
                }
                return Err(e.into());
            }
            self.cache.written(chunk);
            written += chunk.len();
        }
        Ok(written)
    }

    /// Runs the session cache until dropped: turns it on, keeps it in step with the
    /// database (the revocation listener on PostgreSQL, the `auth_changes` poll on SQLite)
    /// and writes `last_seen_ms` every [`FLUSH_INTERVAL`]. Returns only if the cache cannot
    /// start (it then stays off and every call reads the database).
    pub async fn run_session_cache(&self, granularity_ms: i64) {
        let flush = async {
            loop {
                tokio::time::sleep(FLUSH_INTERVAL).await;
                if let Err(e) = self.flush_last_seen(granularity_ms).await {
                    tracing::warn!(error = %e, "could not record session use");
                }
            }
        };
        match self.backend {
            Backend::Sqlite => {
                let start: Result<i64> =
                    sqlx::query_scalar("SELECT COALESCE(MAX(seq), 0) FROM auth_changes")
                        .fetch_one(&self.pool)
                        .await
                        .map_err(Error::from);
                match start {
                    Ok(seq) => *self.auth_seq.lock().await = seq,
                    Err(e) => {
                        tracing::error!(error = %e, "session cache off: cannot read auth_changes");
                        return;
                    }
                }
                self.cache.enable();
                tokio::join!(self.poll_auth_changes(), flush);
            }
            Backend::Postgres => {
                self.cache.enable();
                let nonce = uuid::Uuid::new_v4().simple().to_string();
                tokio::join!(self.listen(&nonce), self.heartbeat(&nonce), flush);
            }
        }
    }

    async fn poll_auth_changes(&self) {
        let mut pruned = std::time::Instant::now();
        loop {
            tokio::time::sleep(SQLITE_POLL).await;
            if let Err(e) = self.apply_auth_changes().await {
                tracing::warn!(error = %e, "could not read session changes; emptying the session cache");
                self.cache.forget_all();
            }
            if pruned.elapsed() >= Duration::from_secs(60) {
                pruned = std::time::Instant::now();
                // Every replica has long read rows this old (they poll four times a second).
                let prune = async {
                    sqlx::query(
                        "DELETE FROM auth_changes WHERE at_ms < CAST((julianday('now') - 2440587.5) * 86400000 AS BIGINT) - 600000",
                    )
                    .execute(&mut *self.writer().await?)
                    .await?;
                    Ok::<_, Error>(())
                };
                if let Err(e) = prune.await {
                    tracing::warn!(error = %e, "could not prune auth_changes");
                }
            }
        }
    }

    /// Sends this replica a heartbeat through PostgreSQL every [`HEARTBEAT_INTERVAL`],
    /// carrying its send time.
    async fn heartbeat(&self, nonce: &str) {
        let channel = heartbeat_channel(nonce);
        loop {
            let sent = self.cache.clock_ns();
            let done = sqlx::query("SELECT pg_notify($1, $2)")
                .bind(&channel)
                .bind(sent.to_string())
                .execute(&self.pool)
                .await;
            if let Err(e) = done {
                tracing::debug!(error = %e, "session cache heartbeat not sent");
            }
            tokio::time::sleep(HEARTBEAT_INTERVAL).await;
        }
    }

    /// The revocation listener: connects, listens, empties the cache (the resync), then
    /// applies notifications; on a lost, failed or silent connection it stops trusting the
    /// cache (calls read the database) and starts over.
    async fn listen(&self, nonce: &str) {
        let heartbeat = heartbeat_channel(nonce);
        loop {
            let mut listener = match self.connect_listener(&heartbeat).await {
                Ok(l) => l,
                Err(e) => {
                    tracing::warn!(error = %e, "session cache: cannot start the revocation listener; sessions are read from the database");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                }
            };
            // Changes made while nobody listened are unknown: start empty.
            self.cache.forget_all();
            tracing::info!("session cache: revocation listener connected; cache emptied (resync)");
            let mut echoed = tokio::time::Instant::now();
            let reason = loop {
                let next = tokio::select! {
                    next = listener.try_recv() => next,
                    () = tokio::time::sleep_until(echoed + LISTENER_STALE) => {
                        break "no heartbeat came back".to_owned()
                    }
                };
                match next {
                    Ok(Some(n)) if n.channel() == heartbeat => {
                        if let Ok(sent) = n.payload().parse::<u64>() {
                            self.cache.heartbeat_echoed(sent);
                            echoed = tokio::time::Instant::now();
                        }
                    }
                    Ok(Some(n)) => match n.payload().strip_prefix("u:") {
                        Some(user) => self.cache.forget_users([user]),
                        None => self.cache.forget_all(),
                    },
                    Ok(None) => break "connection lost".to_owned(),
                    Err(e) => break e.to_string(),
                }
            };
            self.cache.distrust();
            tracing::warn!(
                reason = %reason,
                "session cache: revocation listener lost; sessions are read from the database until it reconnects"
            );
            drop(listener);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn connect_listener(&self, heartbeat: &str) -> Result<sqlx::postgres::PgListener> {
        use secrecy::ExposeSecret as _;
        use std::str::FromStr as _;
        let options = sqlx::postgres::PgConnectOptions::from_str(self.url.expose_secret())
            .map_err(|e| Error::Config(format!("invalid database URL: {e}")))?
            .application_name(LISTENER_APPLICATION_NAME);
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(1)
            .max_lifetime(None)
            .idle_timeout(None)
            .acquire_timeout(Duration::from_secs(5))
            .connect_with(options)
            .await?;
        let mut listener = sqlx::postgres::PgListener::connect_with(&pool).await?;
        // A lost connection is ours to handle (distrust, resync), not to be hidden.
        listener.eager_reconnect(false);
        listener.listen_all([AUTH_CHANNEL, heartbeat]).await?;
        Ok(listener)
    }
}

/// The channel only this replica listens on for its heartbeat.
fn heartbeat_channel(nonce: &str) -> String {
    format!("tenantry_hb_{nonce}")
}
