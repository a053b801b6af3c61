//! The hash-chained audit log: appending inside a write transaction, listing, and verifying
//! the chain.

use sqlx::any::AnyRow;
use sqlx::{AnyConnection, Row};

use super::{AnyQuery, Arg, Store, Write, bind_all};
use crate::audit::{self, AuditEntry, ChainVerifier};
use crate::error::Result;

/// A new audit row, before it is chained.
#[derive(Debug, Clone, Default)]
pub struct AuditRecord {
    /// What happened.
    pub action: &'static str,
    /// The acting user, empty when unknown.
    pub actor_user_id: String,
    /// What it was about.
    pub target: String,
    /// Whether it succeeded.
    pub success: bool,
    /// The caller's address.
    pub source: String,
    /// Extra non-secret JSON.
    pub detail_json: String,
}

/// Which audit rows `ListAuditEvents` wants; every field set must match.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuditFilter {
    /// At or after this time (Unix ms).
    pub since_ms: Option<i64>,
    /// Before this time (Unix ms).
    pub until_ms: Option<i64>,
    /// The action starts with this.
    pub action_prefix: Option<String>,
    /// By this user.
    pub actor_user_id: Option<String>,
    /// About this target, exactly.
    pub target: Option<String>,
    /// At or before this sequence: the head when a listing began, so that a listing ends
    /// even though every page adds an audit event of its own.
    pub through_sequence: Option<i64>,
}

/// A stored audit row.
#[derive(Debug, Clone)]
pub struct AuditRow {
    /// The chained content.
    pub entry: AuditEntry,
    /// Hash of the previous row.
    pub prev_hash: String,
    /// This row's hash.
    pub hash: String,
}

fn audit_from_row(row: &AnyRow) -> Result<AuditRow> {
    Ok(AuditRow {
        entry: AuditEntry {
            sequence: row.try_get("sequence")?,
            at_ms: row.try_get("at_ms")?,
            action: row.try_get("action")?,
            actor_user_id: row.try_get("actor_user_id")?,
            target: row.try_get("target")?,
            outcome: row.try_get("outcome")?,
            source: row.try_get("source")?,
            detail_json: row.try_get("detail_json")?,
        },
        prev_hash: row.try_get("prev_hash")?,
        hash: row.try_get("hash")?,
    })
}

impl Store {
    /// Appends one audit row on its own.
    pub async fn audit(&self, record: &AuditRecord, now_ms: i64) -> Result<()> {
        self.commit_audited([record], now_ms, async |_| Ok(Write::Commit(())))
            .await
    }

    /// A page of audit rows after `after_sequence`.
    pub async fn list_audit(&self, after_sequence: i64, limit: u32) -> Result<Vec<AuditRow>> {
        let rows = sqlx::query(
            "SELECT sequence, at_ms, action, actor_user_id, target, outcome, source, detail_json, prev_hash, hash \
             FROM audit_events WHERE sequence > $1 ORDER BY sequence LIMIT $2",
        )
        .bind(after_sequence)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(audit_from_row).collect()
    }

    /// Sequence of the newest audit event (0 when there is none).
    pub async fn audit_head_sequence(&self) -> Result<i64> {
        Ok(
            sqlx::query_scalar("SELECT sequence FROM audit_head WHERE id = 1")
                .fetch_one(&self.pool)
                .await?,
        )
    }

    /// A page of audit rows after `after_sequence` that match `filter`, in sequence order
    /// (so the last row's sequence is the next page's cursor, filter or not).
    pub async fn list_audit_filtered(
        &self,
        filter: &AuditFilter,
        after_sequence: i64,
        limit: u32,
    ) -> Result<Vec<AuditRow>> {
        let mut args = vec![Arg::Int(after_sequence)];
        let mut sql = String::from(
            "SELECT sequence, at_ms, action, actor_user_id, target, outcome, source, detail_json, prev_hash, hash \
             FROM audit_events WHERE sequence > $1",
        );
        let mut clause = |args: &mut Vec<Arg>, arg: Arg, text: &dyn Fn(usize) -> String| {
            args.push(arg);
            sql.push_str(&text(args.len()));
        };
        if let Some(since) = filter.since_ms {
            clause(&mut args, Arg::Int(since), &|n| {
                format!(" AND at_ms >= ${n}")
            });
        }
        if let Some(until) = filter.until_ms {
            clause(&mut args, Arg::Int(until), &|n| {
                format!(" AND at_ms < ${n}")
            });
        }
        if let Some(prefix) = &filter.action_prefix {
            // substr, not LIKE: exact and case-sensitive on both backends, no escaping.
            let len = i64::try_from(prefix.chars().count()).unwrap_or(i64::MAX);
            clause(&mut args, Arg::Int(len), &|n| {
                format!(" AND substr(action, 1, CAST(${n} AS INTEGER))")
            });
            clause(&mut args, Arg::Text(prefix.clone()), &|n| {
                format!(" = ${n}")
            });
        }
        if let Some(actor) = &filter.actor_user_id {
            clause(&mut args, Arg::Text(actor.clone()), &|n| {
                format!(" AND actor_user_id = ${n}")
            });
        }
        if let Some(target) = &filter.target {
            clause(&mut args, Arg::Text(target.clone()), &|n| {
                format!(" AND target = ${n}")
            });
        }
        if let Some(through) = filter.through_sequence {
            clause(&mut args, Arg::Int(through), &|n| {
                format!(" AND sequence <= ${n}")
            });
        }
        clause(&mut args, Arg::Int(i64::from(limit)), &|n| {
            format!(" ORDER BY sequence LIMIT ${n}")
        });
        let query = bind_all(sql, args);
        let rows = query.fetch_all(&self.pool).await?;
        rows.iter().map(audit_from_row).collect()
    }

    /// Recomputes the whole chain, page by page. `Ok(Ok(checked))` when intact,
    /// `Ok(Err(first_bad_sequence))` otherwise.
    pub async fn verify_audit(&self) -> Result<Result<u64, i64>> {
        let mut verifier = ChainVerifier::new();
        let mut after = 0;
        loop {
            let page = self.list_audit(after, 1_000).await?;
            let Some(last) = page.last() else { break };
            after = last.entry.sequence;
            for row in &page {
                if let Err(bad) = verifier.check(&row.entry, &row.prev_hash, &row.hash) {
                    return Ok(Err(bad));
                }
            }
        }
        let head = sqlx::query("SELECT sequence, hash FROM audit_head WHERE id = 1")
            .fetch_one(&self.pool)
            .await?;
        Ok(verifier.finish(
            head.try_get("sequence")?,
            &head.try_get::<String, _>("hash")?,
        ))
    }
}

/// The row `record` becomes at `sequence`.
fn entry_of(record: &AuditRecord, now_ms: i64, sequence: i64) -> AuditEntry {
    AuditEntry {
        sequence,
        at_ms: now_ms,
        action: record.action.to_owned(),
        actor_user_id: record.actor_user_id.clone(),
        target: record.target.clone(),
        outcome: if record.success {
            audit::SUCCESS
        } else {
            audit::FAILURE
        }
        .to_owned(),
        source: record.source.clone(),
        detail_json: if record.detail_json.is_empty() {
            "{}".to_owned()
        } else {
            record.detail_json.clone()
        },
    }
}

/// PostgreSQL: one data-modifying statement that makes a change (`change_ctes`, the
/// `name AS (…)` parts of a `WITH`, using the parameters before `first`) and appends its
/// audit row, run on its own: one round trip and PostgreSQL's own commit, where a
/// transaction takes five (`BEGIN`, the change, two for the append, `COMMIT`). Bind the
/// append's parameters with [`bind_postgres_append`] after the change's.
///
/// The append locks the head row (`FOR UPDATE`, which under read committed waits for a
/// concurrent append and then reads the row it committed), chains the event after it, and
/// hashes in SQL what [`audit::chain_hash`] hashes: the previous hash and the sequence,
/// each length-prefixed, then [`audit::chain_tail`] of the other fields, computed here.
/// The head's lock is held only until that statement's own commit.
///
/// Only for changes that alter no cached session (the triggers that list such changes run
/// at the end of the statement, after anything it could return) and audit records that
/// queue no notice (checked in debug builds by [`bind_postgres_append`]).
pub(super) fn postgres_statement(change_ctes: &str, first: usize) -> String {
    let p = |i: usize| first + i;
    format!(
        "WITH {change_ctes}, \
         audit_prev AS (SELECT sequence + 1 AS sequence, hash FROM audit_head WHERE id = 1 FOR UPDATE), \
         audit_event AS (INSERT INTO audit_events (sequence, at_ms, action, actor_user_id, target, outcome, source, detail_json, prev_hash, hash) \
           SELECT sequence, ${}::bigint, ${}::text, ${}::text, ${}::text, ${}::text, ${}::text, ${}::text, hash, \
             encode(sha256(int8send(octet_length(hash)::bigint) || convert_to(hash, 'UTF8') \
               || int8send(8::bigint) || int8send(sequence) || ${}::bytea), 'hex') \
           FROM audit_prev RETURNING sequence, hash) \
         UPDATE audit_head SET sequence = audit_event.sequence, hash = audit_event.hash \
         FROM audit_event WHERE audit_head.id = 1",
        p(0),
        p(1),
        p(2),
        p(3),
        p(4),
        p(5),
        p(6),
        p(7),
    )
}

/// Binds the append's eight parameters of [`postgres_statement`] for `record` at `now_ms`.
pub(super) fn bind_postgres_append(query: AnyQuery, record: &AuditRecord, now_ms: i64) -> AnyQuery {
    debug_assert!(
        crate::mail::notice::notice_for(record).is_none(),
        "{} queues a notice: append it in a transaction",
        record.action
    );
    let entry = entry_of(record, now_ms, 0);
    let tail = audit::chain_tail(&entry);
    query
        .bind(entry.at_ms)
        .bind(entry.action)
        .bind(entry.actor_user_id)
        .bind(entry.target)
        .bind(entry.outcome)
        .bind(entry.source)
        .bind(entry.detail_json)
        .bind(tail)
}

/// Appends `record` to the chain inside the caller's transaction. Bumping the head row
/// first takes its write lock, so concurrent appends (across API replicas too) serialize.
pub(super) async fn append_audit(
    conn: &mut AnyConnection,
    record: &AuditRecord,
    now_ms: i64,
) -> Result<()> {
    append_audit_reading_changes(conn, record, now_ms, i64::MAX).await?;
    Ok(())
}

/// [`append_audit`], which also reads, in its last statement (no round trip of its own),
/// what the transaction has changed so far of sessions and access, for
/// [`Store::commit`](super::Store): on PostgreSQL the transaction's `tenantry.auth_changed`
/// list; on SQLite `<newest seq> <user id>,<user id>…` of the `auth_changes` rows after
/// `since` (`0 ` when there are none).
pub(super) async fn append_audit_reading_changes(
    conn: &mut AnyConnection,
    record: &AuditRecord,
    now_ms: i64,
    since: i64,
) -> Result<String> {
    let head = sqlx::query(
        "UPDATE audit_head SET sequence = sequence + 1 WHERE id = 1 RETURNING sequence, hash",
    )
    .fetch_one(&mut *conn)
    .await?;
    let prev_hash: String = head.try_get("hash")?;
    let entry = entry_of(record, now_ms, head.try_get("sequence")?);
    // The notice an event causes is queued with the event, in its transaction: recorded
    // and notified together, or neither.
    if let Some((user_id, notice)) = crate::mail::notice::notice_for(record) {
        super::mail::enqueue(conn, &user_id, &notice, now_ms).await?;
    }
    let hash = audit::chain_hash(&prev_hash, &entry);
    let event = |sql| {
        sqlx::query(sql)
            .bind(entry.sequence)
            .bind(entry.at_ms)
            .bind(&entry.action)
            .bind(&entry.actor_user_id)
            .bind(&entry.target)
            .bind(&entry.outcome)
            .bind(&entry.source)
            .bind(&entry.detail_json)
            .bind(&prev_hash)
            .bind(&hash)
    };
    let changed: String = if conn.backend_name() == "PostgreSQL" {
        // The event and the head's new hash in one statement.
        event(
            "WITH event AS (INSERT INTO audit_events (sequence, at_ms, action, actor_user_id, target, outcome, source, detail_json, prev_hash, hash) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)) \
             UPDATE audit_head SET hash = $10 WHERE id = 1 \
             RETURNING COALESCE(current_setting('tenantry.auth_changed', true), '')",
        )
        .fetch_one(&mut *conn)
        .await?
        .try_get(0)?
    } else {
        // The event and the head's new hash in one call of two statements (run together on
        // SQLite's worker thread; the parameters are numbered across both). `fetch_all`, as
        // sqlx's one-row fetch answers from the first statement's result alone.
        let rows = event(
            "INSERT INTO audit_events (sequence, at_ms, action, actor_user_id, target, outcome, source, detail_json, prev_hash, hash) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10); \
             UPDATE audit_head SET hash = $10 WHERE id = 1 \
             RETURNING (SELECT COALESCE(MAX(seq), 0) || ' ' || COALESCE(group_concat(user_id, ','), '') \
             FROM auth_changes WHERE seq > $11)",
        )
        .bind(since)
        .fetch_all(&mut *conn)
        .await?;
        match rows.as_slice() {
            [row] => row.try_get(0)?,
            _ => return Err(sqlx::Error::RowNotFound.into()),
        }
    };
    Ok(changed)
}
