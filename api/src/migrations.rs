//! The database schema, as ordered migrations embedded in the binary. Each has a SQLite and
//! a PostgreSQL text; both use only portable types (TEXT, BIGINT) so that one set of
//! queries serves both, except for the append-only triggers on the audit log.

/// One schema step.
pub struct Migration {
    /// Applied in ascending order; recorded in `schema_migrations`.
    pub version: i64,
    /// What it does.
    pub description: &'static str,
    /// The SQLite text.
    pub sqlite: &'static str,
    /// The PostgreSQL text.
    pub postgres: &'static str,
}

const V1_TABLES: &str = r#"
CREATE TABLE users (
    id TEXT PRIMARY KEY,
    email TEXT NOT NULL UNIQUE,
    password_hash TEXT NOT NULL,
    is_admin BIGINT NOT NULL DEFAULT 0,
    created_at_ms BIGINT NOT NULL,
    login_failures BIGINT NOT NULL DEFAULT 0,
    login_lockouts BIGINT NOT NULL DEFAULT 0,
    login_locked_until_ms BIGINT NOT NULL DEFAULT 0,
    mfa_failures BIGINT NOT NULL DEFAULT 0,
    mfa_lockouts BIGINT NOT NULL DEFAULT 0,
    mfa_locked_until_ms BIGINT NOT NULL DEFAULT 0,
    totp_secret_sealed TEXT,
    totp_pending_sealed TEXT,
    totp_last_step BIGINT NOT NULL DEFAULT 0
);
CREATE TABLE tenants (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    owner_user_id TEXT NOT NULL REFERENCES users(id),
    plan TEXT NOT NULL,
    phase TEXT NOT NULL,
    suspended BIGINT NOT NULL DEFAULT 0,
    retention_max_age_hours BIGINT NOT NULL,
    retention_max_count BIGINT NOT NULL,
    endpoint TEXT NOT NULL DEFAULT '',
    cert_serial TEXT NOT NULL DEFAULT '',
    cert_not_after_ms BIGINT NOT NULL DEFAULT 0,
    cert_renewal_ms BIGINT NOT NULL DEFAULT 0,
    message TEXT NOT NULL DEFAULT '',
    created_at_ms BIGINT NOT NULL,
    updated_at_ms BIGINT NOT NULL
);
CREATE INDEX tenants_created ON tenants (created_at_ms, id);
CREATE TABLE memberships (
    user_id TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    tenant_id TEXT NOT NULL REFERENCES tenants(id) ON DELETE CASCADE,
    role TEXT NOT NULL,
    PRIMARY KEY (user_id, tenant_id)
);
CREATE INDEX memberships_tenant ON memberships (tenant_id);
CREATE TABLE sessions (
    token_hash TEXT PRIMARY KEY,
    user_id TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    created_at_ms BIGINT NOT NULL,
    last_seen_ms BIGINT NOT NULL,
    expires_at_ms BIGINT NOT NULL,
    mfa_verified_at_ms BIGINT,
    source TEXT NOT NULL DEFAULT ''
);
CREATE INDEX sessions_user ON sessions (user_id);
CREATE INDEX sessions_expiry ON sessions (expires_at_ms);
CREATE TABLE recovery_codes (
    user_id TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    code_hash TEXT NOT NULL,
    used_at_ms BIGINT,
    PRIMARY KEY (user_id, code_hash)
);
CREATE TABLE audit_events (
    sequence BIGINT PRIMARY KEY,
    at_ms BIGINT NOT NULL,
    action TEXT NOT NULL,
    actor_user_id TEXT NOT NULL,
    target TEXT NOT NULL,
    outcome TEXT NOT NULL,
    source TEXT NOT NULL,
    detail_json TEXT NOT NULL,
    prev_hash TEXT NOT NULL,
    hash TEXT NOT NULL
);
CREATE TABLE audit_head (
    id BIGINT PRIMARY KEY,
    sequence BIGINT NOT NULL,
    hash TEXT NOT NULL
);
INSERT INTO audit_head (id, sequence, hash)
    VALUES (1, 0, '0000000000000000000000000000000000000000000000000000000000000000');
"#;

const V2_SQLITE_APPEND_ONLY: &str = r#"
CREATE TRIGGER audit_events_no_update BEFORE UPDATE ON audit_events
BEGIN SELECT RAISE(ABORT, 'audit_events is append-only'); END;
CREATE TRIGGER audit_events_no_delete BEFORE DELETE ON audit_events
BEGIN SELECT RAISE(ABORT, 'audit_events is append-only'); END;
"#;

const V2_POSTGRES_APPEND_ONLY: &str = r#"
CREATE FUNCTION tenantry_audit_append_only() RETURNS trigger LANGUAGE plpgsql AS $fn$
BEGIN
    RAISE EXCEPTION 'audit_events is append-only';
END
$fn$;
CREATE TRIGGER audit_events_no_change BEFORE UPDATE OR DELETE ON audit_events
    FOR EACH ROW EXECUTE FUNCTION tenantry_audit_append_only();
CREATE TRIGGER audit_events_no_truncate BEFORE TRUNCATE ON audit_events
    FOR EACH STATEMENT EXECUTE FUNCTION tenantry_audit_append_only();
"#;

/// Roles with an expiry, access reviews, and the user fields an access review needs. The
/// old `users.is_admin` flag becomes an `admin` grant that expires 90 days after the
/// migration runs (granted by nobody, like the bootstrap admin), then the flag is dropped.
/// `$now` is the backend's "now" in Unix milliseconds.
macro_rules! v3_roles_and_reviews {
    ($now:literal) => {
        concat!(
            r#"
CREATE TABLE role_grants (
    user_id TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    role TEXT NOT NULL,
    granted_by TEXT NOT NULL DEFAULT '',
    granted_at_ms BIGINT NOT NULL,
    expires_at_ms BIGINT NOT NULL,
    PRIMARY KEY (user_id, role)
);
CREATE INDEX role_grants_expiry ON role_grants (expires_at_ms);
INSERT INTO role_grants (user_id, role, granted_by, granted_at_ms, expires_at_ms)
    SELECT id, 'admin', '', "#,
            $now,
            ", ",
            $now,
            r#" + 7776000000 FROM users WHERE is_admin <> 0;
ALTER TABLE users DROP COLUMN is_admin;
ALTER TABLE users ADD COLUMN last_login_at_ms BIGINT;
ALTER TABLE users ADD COLUMN deactivated_at_ms BIGINT;
ALTER TABLE users ADD COLUMN deactivation_reason TEXT NOT NULL DEFAULT '';
CREATE INDEX users_created ON users (created_at_ms, id);
CREATE TABLE access_reviews (
    id TEXT PRIMARY KEY,
    trigger_kind TEXT NOT NULL,
    started_by TEXT NOT NULL DEFAULT '',
    started_at_ms BIGINT NOT NULL,
    due_at_ms BIGINT NOT NULL,
    closed_at_ms BIGINT
);
CREATE INDEX access_reviews_started ON access_reviews (started_at_ms, id);
CREATE INDEX access_reviews_due ON access_reviews (closed_at_ms, due_at_ms);
CREATE TABLE access_review_items (
    review_id TEXT NOT NULL REFERENCES access_reviews(id) ON DELETE CASCADE,
    user_id TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    role TEXT NOT NULL,
    granted_by TEXT NOT NULL DEFAULT '',
    granted_at_ms BIGINT NOT NULL,
    expires_at_ms BIGINT NOT NULL,
    decision TEXT NOT NULL DEFAULT '',
    decided_by TEXT NOT NULL DEFAULT '',
    decided_at_ms BIGINT,
    note TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (review_id, user_id, role)
);
CREATE INDEX audit_events_at ON audit_events (at_ms);
CREATE INDEX audit_events_actor ON audit_events (actor_user_id, sequence);
CREATE INDEX audit_events_target ON audit_events (target, sequence);
"#
        )
    };
}

/// Failure counters of login attempts for emails without an account, keyed by the
/// SHA-256 of the normalized email, so that unknown emails lock exactly like accounts do
/// (otherwise the lockout itself tells which emails have an account).
const V4_UNKNOWN_EMAIL_LOCKOUT: &str = r#"
CREATE TABLE unknown_email_failures (
    email_hash TEXT PRIMARY KEY,
    failures BIGINT NOT NULL DEFAULT 0,
    lockouts BIGINT NOT NULL DEFAULT 0,
    locked_until_ms BIGINT NOT NULL DEFAULT 0,
    updated_at_ms BIGINT NOT NULL
);
CREATE INDEX unknown_email_failures_updated ON unknown_email_failures (updated_at_ms);
"#;

/// SQLite: every change that can revoke or alter a cached session (see
/// `store::session_cache`) leaves the user's id in `auth_changes`, which each replica's cache
/// reads after its own writes and polls for other processes' writes. `last_seen_ms` and the
/// failure counters are not such changes and fire nothing.
const V5_SQLITE_AUTH_CHANGES: &str = r#"
CREATE TABLE auth_changes (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    user_id TEXT NOT NULL,
    at_ms BIGINT NOT NULL
);
CREATE TRIGGER auth_changes_session_delete AFTER DELETE ON sessions
BEGIN INSERT INTO auth_changes (user_id, at_ms) VALUES (OLD.user_id, CAST((julianday('now') - 2440587.5) * 86400000 AS BIGINT)); END;
CREATE TRIGGER auth_changes_session_update AFTER UPDATE OF user_id, expires_at_ms, mfa_verified_at_ms ON sessions
WHEN OLD.user_id IS NOT NEW.user_id OR OLD.expires_at_ms IS NOT NEW.expires_at_ms OR OLD.mfa_verified_at_ms IS NOT NEW.mfa_verified_at_ms
BEGIN INSERT INTO auth_changes (user_id, at_ms) VALUES (OLD.user_id, CAST((julianday('now') - 2440587.5) * 86400000 AS BIGINT)); END;
CREATE TRIGGER auth_changes_user_update AFTER UPDATE OF email, password_hash, totp_secret_sealed, deactivated_at_ms ON users
WHEN OLD.email IS NOT NEW.email OR OLD.password_hash IS NOT NEW.password_hash OR OLD.totp_secret_sealed IS NOT NEW.totp_secret_sealed OR OLD.deactivated_at_ms IS NOT NEW.deactivated_at_ms
BEGIN INSERT INTO auth_changes (user_id, at_ms) VALUES (OLD.id, CAST((julianday('now') - 2440587.5) * 86400000 AS BIGINT)); END;
CREATE TRIGGER auth_changes_user_delete AFTER DELETE ON users
BEGIN INSERT INTO auth_changes (user_id, at_ms) VALUES (OLD.id, CAST((julianday('now') - 2440587.5) * 86400000 AS BIGINT)); END;
CREATE TRIGGER auth_changes_membership_insert AFTER INSERT ON memberships
BEGIN INSERT INTO auth_changes (user_id, at_ms) VALUES (NEW.user_id, CAST((julianday('now') - 2440587.5) * 86400000 AS BIGINT)); END;
CREATE TRIGGER auth_changes_membership_update AFTER UPDATE ON memberships
BEGIN INSERT INTO auth_changes (user_id, at_ms) VALUES (OLD.user_id, CAST((julianday('now') - 2440587.5) * 86400000 AS BIGINT)); INSERT INTO auth_changes (user_id, at_ms) VALUES (NEW.user_id, CAST((julianday('now') - 2440587.5) * 86400000 AS BIGINT)); END;
CREATE TRIGGER auth_changes_membership_delete AFTER DELETE ON memberships
BEGIN INSERT INTO auth_changes (user_id, at_ms) VALUES (OLD.user_id, CAST((julianday('now') - 2440587.5) * 86400000 AS BIGINT)); END;
CREATE TRIGGER auth_changes_grant_insert AFTER INSERT ON role_grants
BEGIN INSERT INTO auth_changes (user_id, at_ms) VALUES (NEW.user_id, CAST((julianday('now') - 2440587.5) * 86400000 AS BIGINT)); END;
CREATE TRIGGER auth_changes_grant_update AFTER UPDATE ON role_grants
BEGIN INSERT INTO auth_changes (user_id, at_ms) VALUES (OLD.user_id, CAST((julianday('now') - 2440587.5) * 86400000 AS BIGINT)); INSERT INTO auth_changes (user_id, at_ms) VALUES (NEW.user_id, CAST((julianday('now') - 2440587.5) * 86400000 AS BIGINT)); END;
CREATE TRIGGER auth_changes_grant_delete AFTER DELETE ON role_grants
BEGIN INSERT INTO auth_changes (user_id, at_ms) VALUES (OLD.user_id, CAST((julianday('now') - 2440587.5) * 86400000 AS BIGINT)); END;
"#;

/// The PostgreSQL trigger function that publishes a change (migration 5), made by `$create`
/// (`CREATE` or `CREATE OR REPLACE`), with `$skip` run first (migration 10: what is not
/// published).
macro_rules! postgres_auth_changed_fn {
    ($create:literal, $skip:literal) => {
        concat!(
            "\n",
            $create,
            r#" FUNCTION tenantry_auth_changed() RETURNS trigger LANGUAGE plpgsql AS $fn$
DECLARE
    uid TEXT;
    seen TEXT;
BEGIN
    IF TG_OP = 'DELETE' THEN
        uid := to_jsonb(OLD) ->> TG_ARGV[0];
    ELSE
        uid := to_jsonb(NEW) ->> TG_ARGV[0];
    END IF;
"#,
            $skip,
            r#"    PERFORM pg_notify('tenantry_auth', 'u:' || uid);
    seen := COALESCE(current_setting('tenantry.auth_changed', true), '');
    IF seen <> '*' THEN
        IF length(seen) > 65536 THEN
            seen := '*';
        ELSE
            seen := seen || uid || ',';
        END IF;
        PERFORM set_config('tenantry.auth_changed', seen, true);
    END IF;
    RETURN NULL;
END
$fn$;
"#
        )
    };
}

/// PostgreSQL: the same changes as [`V5_SQLITE_AUTH_CHANGES`] are sent on the
/// `tenantry_auth` channel (`u:<user id>`, delivered at commit to every replica's listener)
/// and collected in the transaction-local setting `tenantry.auth_changed`, which the writing
/// replica reads before it commits so its own cache forgets them at once. Past 64 KiB the
/// setting becomes `*` (forget everything) rather than growing without bound.
const V5_POSTGRES_AUTH_CHANGES: &str = concat!(
    postgres_auth_changed_fn!("CREATE", ""),
    r#"CREATE TRIGGER auth_changes_session_delete AFTER DELETE ON sessions
    FOR EACH ROW EXECUTE FUNCTION tenantry_auth_changed('user_id');
CREATE TRIGGER auth_changes_session_update AFTER UPDATE OF user_id, expires_at_ms, mfa_verified_at_ms ON sessions
    FOR EACH ROW WHEN (OLD.user_id IS DISTINCT FROM NEW.user_id OR OLD.expires_at_ms IS DISTINCT FROM NEW.expires_at_ms OR OLD.mfa_verified_at_ms IS DISTINCT FROM NEW.mfa_verified_at_ms)
    EXECUTE FUNCTION tenantry_auth_changed('user_id');
CREATE TRIGGER auth_changes_user_update AFTER UPDATE OF email, password_hash, totp_secret_sealed, deactivated_at_ms ON users
    FOR EACH ROW WHEN (OLD.email IS DISTINCT FROM NEW.email OR OLD.password_hash IS DISTINCT FROM NEW.password_hash OR OLD.totp_secret_sealed IS DISTINCT FROM NEW.totp_secret_sealed OR OLD.deactivated_at_ms IS DISTINCT FROM NEW.deactivated_at_ms)
    EXECUTE FUNCTION tenantry_auth_changed('id');
CREATE TRIGGER auth_changes_user_delete AFTER DELETE ON users
    FOR EACH ROW EXECUTE FUNCTION tenantry_auth_changed('id');
CREATE TRIGGER auth_changes_membership AFTER INSERT OR UPDATE OR DELETE ON memberships
    FOR EACH ROW EXECUTE FUNCTION tenantry_auth_changed('user_id');
CREATE TRIGGER auth_changes_grant AFTER INSERT OR UPDATE OR DELETE ON role_grants
    FOR EACH ROW EXECUTE FUNCTION tenantry_auth_changed('user_id');
"#
);

/// Email: verification of the address (tokens stored as SHA-256 only), the transactional
/// outbox of mail, and the Degraded-instance notices. Users who signed up before
/// verification existed count as verified from their signup.
macro_rules! v6_email {
    ($verified_trigger:literal) => {
        concat!(
            r#"
ALTER TABLE users ADD COLUMN email_verified_at_ms BIGINT;
UPDATE users SET email_verified_at_ms = created_at_ms;
CREATE TABLE email_verifications (
    token_hash TEXT PRIMARY KEY,
    user_id TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    created_at_ms BIGINT NOT NULL,
    expires_at_ms BIGINT NOT NULL,
    used_at_ms BIGINT
);
CREATE INDEX email_verifications_user ON email_verifications (user_id, created_at_ms);
CREATE TABLE mail_outbox (
    id TEXT PRIMARY KEY,
    user_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    notice_json TEXT NOT NULL,
    created_at_ms BIGINT NOT NULL,
    attempts BIGINT NOT NULL DEFAULT 0,
    next_attempt_at_ms BIGINT NOT NULL,
    claimed_until_ms BIGINT NOT NULL DEFAULT 0,
    sent_at_ms BIGINT,
    last_error TEXT NOT NULL DEFAULT ''
);
CREATE INDEX mail_outbox_due ON mail_outbox (sent_at_ms, next_attempt_at_ms);
CREATE TABLE tenant_health_notices (
    tenant_id TEXT PRIMARY KEY REFERENCES tenants(id) ON DELETE CASCADE,
    degraded_since_ms BIGINT NOT NULL,
    notified_at_ms BIGINT
);
"#,
            $verified_trigger
        )
    };
}

/// Tenants waiting for their owner's verification get a phase of their own (they were
/// `Pending`, told apart by a join on the owner).
const V7_AWAITING_VERIFICATION: &str = r#"
UPDATE tenants SET phase = 'AwaitingVerification'
WHERE phase = 'Pending' AND owner_user_id IN (SELECT id FROM users WHERE email_verified_at_ms IS NULL);
"#;

/// The ring's state (key ids only, never key material) and the servers' reports; and the
/// trigger that publishes user changes to the session caches now fires when TOTP is
/// turned on or off, not when a rotation re-seals the secret (sessions only know whether
/// a user has TOTP).
macro_rules! v8_master_keys {
    ($trigger:literal) => {
        concat!(
            r#"
CREATE TABLE master_keys (
    key_id TEXT PRIMARY KEY,
    added_at_ms BIGINT NOT NULL,
    primary_since_ms BIGINT
);
CREATE TABLE master_key_holders (
    server_id TEXT PRIMARY KEY,
    host TEXT NOT NULL,
    key_ids TEXT NOT NULL,
    primary_key_id TEXT NOT NULL,
    seen_at_ms BIGINT NOT NULL,
    expires_at_ms BIGINT NOT NULL
);
"#,
            $trigger
        )
    };
}

const V8_SQLITE_MASTER_KEYS: &str = v8_master_keys!(
    "DROP TRIGGER auth_changes_user_update;
CREATE TRIGGER auth_changes_user_update AFTER UPDATE OF email, password_hash, totp_secret_sealed, deactivated_at_ms ON users
WHEN OLD.email IS NOT NEW.email OR OLD.password_hash IS NOT NEW.password_hash OR (OLD.totp_secret_sealed IS NULL) IS NOT (NEW.totp_secret_sealed IS NULL) OR OLD.deactivated_at_ms IS NOT NEW.deactivated_at_ms
BEGIN INSERT INTO auth_changes (user_id, at_ms) VALUES (OLD.id, CAST((julianday('now') - 2440587.5) * 86400000 AS BIGINT)); END;
"
);

const V8_POSTGRES_MASTER_KEYS: &str = v8_master_keys!(
    "DROP TRIGGER auth_changes_user_update ON users;
CREATE TRIGGER auth_changes_user_update AFTER UPDATE OF email, password_hash, totp_secret_sealed, deactivated_at_ms ON users
    FOR EACH ROW WHEN (OLD.email IS DISTINCT FROM NEW.email OR OLD.password_hash IS DISTINCT FROM NEW.password_hash OR (OLD.totp_secret_sealed IS NULL) IS DISTINCT FROM (NEW.totp_secret_sealed IS NULL) OR OLD.deactivated_at_ms IS DISTINCT FROM NEW.deactivated_at_ms)
    EXECUTE FUNCTION tenantry_auth_changed('id');
"
);

/// The instance-token signing key ring (`store::token_keys`): the key file's key becomes
/// its first row when the API starts on an empty ring.
const V9_TOKEN_KEYS: &str = r#"
CREATE TABLE token_keys (
    kid TEXT PRIMARY KEY,
    public_pem TEXT NOT NULL,
    private_sealed TEXT,
    created_at_ms BIGINT NOT NULL,
    signs_from_ms BIGINT NOT NULL,
    retires_at_ms BIGINT
);
"#;

/// PostgreSQL: a user's first membership, written by the signup statement that creates the
/// user, is published no more. No replica can hold a session of a user who did not exist
/// before the transaction, so the `NOTIFY` (a wake-up of every replica's listener, per
/// signup) told nobody anything. The signup says which user it creates in the
/// transaction-local setting `tenantry.new_user`; any other membership is published as
/// before. SQLite's trigger only appends a row to `auth_changes`, in the signup's own
/// transaction, and stays.
const V10_POSTGRES_NEW_USER_QUIET: &str = postgres_auth_changed_fn!(
    "CREATE OR REPLACE",
    "    IF TG_OP = 'INSERT' AND uid = current_setting('tenantry.new_user', true) THEN
        RETURN NULL;
    END IF;
"
);

/// Every migration, in order.
pub const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        description: "users, tenants, memberships, sessions, recovery codes, audit log",
        sqlite: V1_TABLES,
        postgres: V1_TABLES,
    },
    Migration {
        version: 2,
        description: "audit log is append-only",
        sqlite: V2_SQLITE_APPEND_ONLY,
        postgres: V2_POSTGRES_APPEND_ONLY,
    },
    Migration {
        version: 3,
        description: "role grants with expiry (from users.is_admin), access reviews, user status and last login",
        sqlite: v3_roles_and_reviews!("CAST((julianday('now') - 2440587.5) * 86400000 AS BIGINT)"),
        postgres: v3_roles_and_reviews!("CAST(EXTRACT(EPOCH FROM now()) * 1000 AS BIGINT)"),
    },
    Migration {
        version: 4,
        description: "lockout counters for unknown emails",
        sqlite: V4_UNKNOWN_EMAIL_LOCKOUT,
        postgres: V4_UNKNOWN_EMAIL_LOCKOUT,
    },
    Migration {
        version: 5,
        description: "changes that revoke or alter a session are published to every replica's session cache",
        sqlite: V5_SQLITE_AUTH_CHANGES,
        postgres: V5_POSTGRES_AUTH_CHANGES,
    },
    Migration {
        version: 6,
        description: "email verification tokens, the mail outbox, Degraded-instance notices",
        // `WhoAmI.email_verified` comes from the session cache: verifying forgets the
        // user's cached sessions like the other user changes of migration 5.
        sqlite: v6_email!(
            "CREATE TRIGGER auth_changes_user_verified AFTER UPDATE OF email_verified_at_ms ON users
WHEN OLD.email_verified_at_ms IS NOT NEW.email_verified_at_ms
BEGIN INSERT INTO auth_changes (user_id, at_ms) VALUES (OLD.id, CAST((julianday('now') - 2440587.5) * 86400000 AS BIGINT)); END;
"
        ),
        postgres: v6_email!(
            "CREATE TRIGGER auth_changes_user_verified AFTER UPDATE OF email_verified_at_ms ON users
    FOR EACH ROW WHEN (OLD.email_verified_at_ms IS DISTINCT FROM NEW.email_verified_at_ms)
    EXECUTE FUNCTION tenantry_auth_changed('id');
"
        ),
    },
    Migration {
        version: 7,
        description: "tenants waiting for their owner's email verification are AwaitingVerification",
        sqlite: V7_AWAITING_VERIFICATION,
        postgres: V7_AWAITING_VERIFICATION,
    },
    Migration {
        version: 8,
        description: "master key rings: the primary key, the keys each server holds; re-sealing a TOTP secret is not an auth change",
        sqlite: V8_SQLITE_MASTER_KEYS,
        postgres: V8_POSTGRES_MASTER_KEYS,
    },
    Migration {
        version: 9,
        description: "the instance-token signing key ring",
        sqlite: V9_TOKEN_KEYS,
        postgres: V9_TOKEN_KEYS,
    },
    Migration {
        version: 10,
        description: "a new user's first membership is not published to the session caches (PostgreSQL)",
        sqlite: "-- PostgreSQL only",
        postgres: V10_POSTGRES_NEW_USER_QUIET,
    },
];

#[cfg(test)]
mod tests {
    use super::*;

    /// Migration 5 keeps the function it has always made; only 10 skips a new user.
    #[test]
    fn the_publishing_function_changes_only_in_migration_10() {
        assert!(V5_POSTGRES_AUTH_CHANGES.starts_with(
            "\nCREATE FUNCTION tenantry_auth_changed() RETURNS trigger LANGUAGE plpgsql AS $fn$\n"
        ));
        assert!(
            V5_POSTGRES_AUTH_CHANGES
                .contains("END IF;\n    PERFORM pg_notify('tenantry_auth', 'u:' || uid);")
        );
        assert!(!V5_POSTGRES_AUTH_CHANGES.contains("tenantry.new_user"));
        assert!(V10_POSTGRES_NEW_USER_QUIET.starts_with("\nCREATE OR REPLACE FUNCTION"));
        assert!(V10_POSTGRES_NEW_USER_QUIET.contains(
            "current_setting('tenantry.new_user', true) THEN\n        RETURN NULL;\n    END IF;\n    PERFORM pg_notify"
        ));
    }

    #[test]
    fn versions_ascend_without_gaps() {
        for (i, m) in MIGRATIONS.iter().enumerate() {
            assert_eq!(m.version, i as i64 + 1, "{}", m.description);
        }
    }
}
