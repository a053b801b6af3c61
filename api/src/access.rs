//! Least privilege: the platform roles and their expiring grants, the limits on how long a
//! grant lasts, access reviews (their triggers and decisions), the `ListUsers` filter
//! grammar, and the sweep that expires grants, closes due reviews and starts scheduled
//! ones. Pure rules live here; the SQL is in `store::access`.

use std::time::Duration;

use tenantry_proto::v1;

use crate::clock::duration_ms;
use crate::error::{Error, Result};
use crate::state::AppState;
use crate::store::AuditRecord;

/// Audit actions of roles, users and access reviews (`admin.<what>`).
pub mod actions {
    /// A role granted or renewed.
    pub const ROLE_GRANT: &str = "admin.role.grant";
    /// A role taken away by `RevokeAdmin`.
    pub const ROLE_REVOKE: &str = "admin.role.revoke";
    /// A grant reached its expiry (written once per grant, by the first to see it).
    pub const ROLE_EXPIRED: &str = "admin.role.expired";
    /// Users listed.
    pub const USER_LIST: &str = "admin.user.list";
    /// A user shut out.
    pub const USER_DEACTIVATE: &str = "admin.user.deactivate";
    /// A user let back in.
    pub const USER_REACTIVATE: &str = "admin.user.reactivate";
    /// An access review started (by an admin, the schedule or a role change).
    pub const REVIEW_START: &str = "admin.access_review.start";
    /// Access reviews listed.
    pub const REVIEW_LIST: &str = "admin.access_review.list";
    /// One review's items read.
    pub const REVIEW_SHOW: &str = "admin.access_review.show";
    /// One item decided (by a reviewer, or `expired` at the due time).
    pub const REVIEW_DECIDE: &str = "admin.access_review.decide";
    /// A review closed, with its counts.
    pub const REVIEW_CLOSE: &str = "admin.access_review.close";
}

/// Days a grant lasts when the request does not say.
pub const DEFAULT_GRANT_DAYS: u32 = 90;
/// Days until a role-change review is due.
pub const ROLE_CHANGE_REVIEW_DAYS: u32 = 7;
/// Days until a review is due when the request does not say (also scheduled reviews).
pub const DEFAULT_REVIEW_DAYS: u32 = 14;
/// Longest time a review may stay open.
pub const MAX_REVIEW_DAYS: u32 = 90;
/// How often the server sweeps grants and reviews.
pub const SWEEP_INTERVAL: Duration = Duration::from_secs(60);

const DAY_MS: i64 = 86_400_000;

/// Milliseconds in `days` days.
pub fn days_ms(days: u32) -> i64 {
    i64::from(days) * DAY_MS
}

/// A platform role.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Role {
    /// Every `AdminService` rpc.
    Admin,
    /// The read rpcs only.
    Auditor,
}

impl Role {
    /// Every role, in the order `WhoAmI` lists them.
    pub const ALL: [Role; 2] = [Role::Admin, Role::Auditor];

    /// The stored and displayed name.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Auditor => "auditor",
        }
    }

    /// The role a stored name means.
    pub fn parse(text: &str) -> Option<Role> {
        Role::ALL.into_iter().find(|r| r.as_str() == text)
    }

    /// The role a request names; unset means admin, an unknown number is refused.
    pub fn from_proto(value: i32) -> Result<Role> {
        match v1::AdminRole::try_from(value) {
            Ok(v1::AdminRole::Unspecified | v1::AdminRole::Admin) => Ok(Role::Admin),
            Ok(v1::AdminRole::Auditor) => Ok(Role::Auditor),
            Err(_) => Err(Error::invalid("role", "unknown role")),
        }
    }

    /// The contract's enum.
    pub fn to_proto(self) -> v1::AdminRole {
        match self {
            Role::Admin => v1::AdminRole::Admin,
            Role::Auditor => v1::AdminRole::Auditor,
        }
    }
}

/// What an rpc needs of the caller's roles.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// A read: `admin` or `auditor`.
    Read,
    /// A change: `admin`.
    Write,
}

impl Access {
    /// True when `role` may make calls of this kind.
    pub fn allows(self, role: Role) -> bool {
        match self {
            Access::Read => true,
            Access::Write => role == Role::Admin,
        }
    }
}

/// A role held until `expires_at_ms` (exclusive: at that millisecond it no longer works).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeldRole {
    /// The role.
    pub role: Role,
    /// When it stops working.
    pub expires_at_ms: i64,
}

impl HeldRole {
    /// True while the grant works.
    pub fn live_at(&self, now_ms: i64) -> bool {
        now_ms < self.expires_at_ms
    }
}

/// The lifetime of a grant from the requested days: 0 means [`DEFAULT_GRANT_DAYS`] (or
/// `max_days` when that is lower); more than `max_days` is refused.
pub fn grant_days(requested: u32, max_days: u32) -> Result<u32> {
    match requested {
        0 => Ok(DEFAULT_GRANT_DAYS.min(max_days)),
        n if n <= max_days => Ok(n),
        _ => Err(Error::invalid(
            "expires_in_days",
            format!("must be at most {max_days} (the server's --max-grant-days)"),
        )),
    }
}

/// The days until a review is due: 0 means [`DEFAULT_REVIEW_DAYS`]; at most
/// [`MAX_REVIEW_DAYS`].
pub fn review_days(requested: u32) -> Result<u32> {
    match requested {
        0 => Ok(DEFAULT_REVIEW_DAYS),
        n if n <= MAX_REVIEW_DAYS => Ok(n),
        _ => Err(Error::invalid(
            "due_in_days",
            format!("must be at most {MAX_REVIEW_DAYS}"),
        )),
    }
}

/// Why a review started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    /// `StartAccessReview`.
    Manual,
    /// The `--access-review-interval` came round.
    Scheduled,
    /// `GrantAdmin` gave a role the user did not hold.
    RoleChange,
}

impl Trigger {
    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            Trigger::Manual => "manual",
            Trigger::Scheduled => "scheduled",
            Trigger::RoleChange => "role_change",
        }
    }

    /// The trigger a stored name means.
    pub fn parse(text: &str) -> Option<Trigger> {
        [Trigger::Manual, Trigger::Scheduled, Trigger::RoleChange]
            .into_iter()
            .find(|t| t.as_str() == text)
    }

    /// The contract's enum.
    pub fn to_proto(self) -> v1::AccessReviewTrigger {
        match self {
            Trigger::Manual => v1::AccessReviewTrigger::Manual,
            Trigger::Scheduled => v1::AccessReviewTrigger::Scheduled,
            Trigger::RoleChange => v1::AccessReviewTrigger::RoleChange,
        }
    }
}

/// The decision on a review item.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// The grant stays, extended.
    Keep,
    /// The grant is removed by a reviewer.
    Revoke,
    /// Nobody decided by the due time; the grant was removed.
    Expired,
}

impl Decision {
    /// The stored name (an undecided item stores the empty text).
    pub fn as_str(self) -> &'static str {
        match self {
            Decision::Keep => "keep",
            Decision::Revoke => "revoke",
            Decision::Expired => "expired",
        }
    }

    /// The decision a stored name means; `None` for undecided (or unknown).
    pub fn parse(text: &str) -> Option<Decision> {
        [Decision::Keep, Decision::Revoke, Decision::Expired]
            .into_iter()
            .find(|d| d.as_str() == text)
    }

    /// The contract's enum.
    pub fn to_proto(self) -> v1::AccessReviewDecision {
        match self {
            Decision::Keep => v1::AccessReviewDecision::Keep,
            Decision::Revoke => v1::AccessReviewDecision::Revoke,
            Decision::Expired => v1::AccessReviewDecision::Expired,
        }
    }

    /// What a reviewer may ask for: KEEP or REVOKE only.
    pub fn from_request(value: i32) -> Result<Decision> {
        match v1::AccessReviewDecision::try_from(value) {
            Ok(v1::AccessReviewDecision::Keep) => Ok(Decision::Keep),
            Ok(v1::AccessReviewDecision::Revoke) => Ok(Decision::Revoke),
            _ => Err(Error::invalid(
                "decision",
                "must be ACCESS_REVIEW_DECISION_KEEP or ACCESS_REVIEW_DECISION_REVOKE",
            )),
        }
    }
}

/// `status=` of the `ListUsers` filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatusFilter {
    /// May log in.
    Active,
    /// Deactivated.
    Deactivated,
}

/// `role=` of the `ListUsers` filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RoleFilter {
    /// Holds this role, unexpired.
    Has(Role),
    /// Holds no unexpired role.
    None,
}

/// A parsed `ListUsers` filter: every term present must match.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UserFilter {
    /// The email contains this (lowercase).
    pub email_contains: Option<String>,
    /// The status.
    pub status: Option<StatusFilter>,
    /// The role.
    pub role: Option<RoleFilter>,
}

/// Parses `email=TEXT status=active|deactivated role=admin|auditor|none`, space
/// separated, each term at most once; anything else is `INVALID_ARGUMENT` on `filter`.
pub fn parse_user_filter(text: &str) -> Result<UserFilter> {
    let bad = |why: String| Error::invalid("filter", why);
    if text.len() > 500 {
        return Err(bad("must be at most 500 characters".into()));
    }
    let mut filter = UserFilter::default();
    for term in text.split_whitespace() {
        let Some((key, value)) = term.split_once('=') else {
            return Err(bad(format!(
                "{term:?} is not key=value (email=, status=, role=)"
            )));
        };
        let repeated = || bad(format!("{key}= given twice"));
        match key {
            "email" => {
                if value.is_empty() {
                    return Err(bad("email= needs a text".into()));
                }
                if filter
                    .email_contains
                    .replace(value.to_lowercase())
                    .is_some()
                {
                    return Err(repeated());
                }
            }
            "status" => {
                let status = match value {
                    "active" => StatusFilter::Active,
                    "deactivated" => StatusFilter::Deactivated,
                    _ => return Err(bad("status= must be active or deactivated".into())),
                };
                if filter.status.replace(status).is_some() {
                    return Err(repeated());
                }
            }
            "role" => {
                let role = match value {
                    "none" => RoleFilter::None,
                    other => RoleFilter::Has(
                        Role::parse(other)
                            .ok_or_else(|| bad("role= must be admin, auditor or none".into()))?,
                    ),
                };
                if filter.role.replace(role).is_some() {
                    return Err(repeated());
                }
            }
            _ => {
                return Err(bad(format!(
                    "unknown term {key:?} (email=, status=, role=)"
                )));
            }
        }
    }
    Ok(filter)
}

/// Grants, reviews and the review schedule: what the server's configuration says.
#[derive(Debug, Clone, Copy)]
pub struct AccessPolicy {
    /// The longest grant `GrantAdmin` and a KEEP decision may give, in days.
    pub max_grant_days: u32,
    /// A scheduled review starts this long after the last manual or scheduled one; zero
    /// turns scheduled reviews off.
    pub review_interval: Duration,
}

impl Default for AccessPolicy {
    fn default() -> Self {
        AccessPolicy {
            max_grant_days: DEFAULT_GRANT_DAYS,
            review_interval: Duration::from_secs(90 * 86_400),
        }
    }
}

/// Who does something, for the audit log: a user and their address, or the server itself
/// (empty user id, source `server`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Actor {
    /// The acting user; empty for the server.
    pub user_id: String,
    /// The caller's address.
    pub source: String,
}

impl Actor {
    /// The server acting on its own (expiry, due reviews, the schedule).
    pub fn server() -> Actor {
        Actor {
            user_id: String::new(),
            source: "server".to_owned(),
        }
    }

    /// A successful audit row by this actor.
    pub fn record(&self, action: &'static str, target: &str, detail_json: String) -> AuditRecord {
        AuditRecord {
            action,
            actor_user_id: self.user_id.clone(),
            target: target.to_owned(),
            success: true,
            source: self.source.clone(),
            detail_json,
        }
    }
}

/// What one sweep did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SweepReport {
    /// Grants found expired (and audited) by this sweep.
    pub grants_expired: u32,
    /// Reviews closed at their due time.
    pub reviews_closed: u32,
    /// The scheduled review started, if one was due.
    pub scheduled_review: Option<String>,
}

/// One pass of the access loop: audits and removes every grant past its expiry, revokes
/// the undecided items of every review past its due time and closes it, and starts a
/// scheduled review when the interval has passed. Each step is its own transaction and
/// claims its rows, so replicas (and tests that call this while the loop runs) never do a
/// step twice.
pub async fn sweep(state: &AppState) -> Result<SweepReport> {
    let now = state.now_ms();
    let store = &state.store;
    let mut report = SweepReport::default();
    for grant in store.expired_grants(now).await? {
        if store
            .expire_grant(&grant.user_id, grant.role, grant.expires_at_ms, now)
            .await?
        {
            report.grants_expired += 1;
        }
    }
    for review_id in store.due_reviews(now).await? {
        if store.close_due_review(&review_id, now).await? {
            report.reviews_closed += 1;
        }
    }
    let interval = duration_ms(state.access.review_interval);
    if interval > 0 {
        let id = uuid::Uuid::new_v4().to_string();
        let due = now.saturating_add(days_ms(DEFAULT_REVIEW_DAYS));
        if let Some(review) = store
            .start_scheduled_review(&id, interval, now, due)
            .await?
        {
            tracing::info!(review_id = %review.id, items = review.items, "started the scheduled access review");
            report.scheduled_review = Some(review.id);
        }
    }
    Ok(report)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn grant_days_default_and_cap() {
        assert_eq!(grant_days(0, 90).unwrap(), 90);
        assert_eq!(grant_days(0, 30).unwrap(), 30);
        assert_eq!(grant_days(30, 30).unwrap(), 30);
        assert!(grant_days(31, 30).is_err());
        assert_eq!(grant_days(1, 90).unwrap(), 1);
    }

    #[test]
    fn review_days_default_and_cap() {
        assert_eq!(review_days(0).unwrap(), 14);
        assert_eq!(review_days(90).unwrap(), 90);
        assert!(review_days(91).is_err());
    }

    #[test]
    fn roles_and_decisions_round_trip() {
        for role in Role::ALL {
            assert_eq!(Role::parse(role.as_str()), Some(role));
            assert_eq!(Role::from_proto(role.to_proto().into()).unwrap(), role);
        }
        assert_eq!(Role::from_proto(0).unwrap(), Role::Admin);
        assert!(Role::from_proto(42).is_err());
        assert!(Decision::from_request(0).is_err());
        assert!(
            Decision::from_request(3).is_err(),
            "EXPIRED is the server's"
        );
        for d in [Decision::Keep, Decision::Revoke, Decision::Expired] {
            assert_eq!(Decision::parse(d.as_str()), Some(d));
        }
        assert!(Access::Read.allows(Role::Auditor));
        assert!(!Access::Write.allows(Role::Auditor));
    }

    #[test]
    fn a_grant_stops_working_at_its_expiry() {
        let held = HeldRole {
            role: Role::Admin,
            expires_at_ms: 1_000,
        };
        assert!(held.live_at(999));
        assert!(!held.live_at(1_000));
    }

    #[test]
    fn user_filter_grammar() {
        assert_eq!(parse_user_filter("").unwrap(), UserFilter::default());
        let f = parse_user_filter(" email=ACME  status=deactivated role=none ").unwrap();
        assert_eq!(f.email_contains.as_deref(), Some("acme"));
        assert_eq!(f.status, Some(StatusFilter::Deactivated));
        assert_eq!(f.role, Some(RoleFilter::None));
        assert_eq!(
            parse_user_filter("role=auditor").unwrap().role,
            Some(RoleFilter::Has(Role::Auditor))
        );
        for bad in [
            "name=x",
            "email",
            "email=",
            "status=gone",
            "role=root",
            "role=admin role=auditor",
            "email=a email=b",
        ] {
            assert!(parse_user_filter(bad).is_err(), "{bad:?} was accepted");
        }
    }
}
