//! Tenant status: conditions that keep `lastTransitionTime` unless their status really
//! changes, the phase derived from them, and the Events a status change deserves.

use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

use tenantry_kube::crd::{TenantPhase, TenantStatus};

/// Condition types, in the order they appear in the status.
pub mod types {
    /// The namespace exists and is active.
    pub const NAMESPACE_READY: &str = "NamespaceReady";
    /// The default-deny and allow policies are in place.
    pub const NETWORK_ISOLATED: &str = "NetworkIsolated";
    /// The data volume is on an encrypted StorageClass and the data key exists.
    pub const STORAGE_ENCRYPTED: &str = "StorageEncrypted";
    /// A valid certificate from the operator CA is in the TLS Secret.
    pub const CERTIFICATE_READY: &str = "CertificateReady";
    /// The runtime Deployment is available.
    pub const RUNTIME_READY: &str = "RuntimeReady";
    /// Everything above is True.
    pub const READY: &str = "Ready";
    /// With `spec.backup`: True when the newest backup is older than twice the interval,
    /// none was reported, or backups cannot be taken. Not part of Ready: a tenant whose
    /// backups lag still serves.
    pub const BACKUP_STALE: &str = "BackupStale";
}

/// Condition reasons that need a person: they make the tenant Degraded and emit a Warning.
pub mod reasons {
    /// The StorageClass is not marked encrypted.
    pub const STORAGE_CLASS_NOT_ENCRYPTED: &str = "StorageClassNotEncrypted";
    /// The tenant names no StorageClass and the operator has no default.
    pub const NO_STORAGE_CLASS: &str = "NoStorageClass";
    /// The data-key Secret is not 32 bytes.
    pub const DATA_KEY_INVALID: &str = "DataKeyInvalid";
    /// The data-key Secret vanished while the volume holds data encrypted with it.
    pub const DATA_KEY_MISSING: &str = "DataKeyMissing";
    /// The operator has no token public key to give the runtime.
    pub const TOKEN_PUBLIC_KEY_MISSING: &str = "TokenPublicKeyMissing";
    /// The spec fails a check the schema could not make.
    pub const INVALID_SPEC: &str = "InvalidSpec";

    /// Every reason above.
    pub const PERMANENT: [&str; 6] = [
        STORAGE_CLASS_NOT_ENCRYPTED,
        NO_STORAGE_CLASS,
        DATA_KEY_INVALID,
        DATA_KEY_MISSING,
        TOKEN_PUBLIC_KEY_MISSING,
        INVALID_SPEC,
    ];
}

/// A condition the reconciler computed, before transition times are applied.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Observed {
    /// Condition type.
    pub type_: &'static str,
    /// True or False.
    pub ok: bool,
    /// CamelCase reason.
    pub reason: String,
    /// Human-readable detail.
    pub message: String,
}

impl Observed {
    /// A True condition.
    pub fn yes(type_: &'static str, reason: &str, message: impl Into<String>) -> Observed {
        Observed {
            type_,
            ok: true,
            reason: reason.to_owned(),
            message: message.into(),
        }
    }

    /// A False condition.
    pub fn no(type_: &'static str, reason: &str, message: impl Into<String>) -> Observed {
        Observed {
            type_,
            ok: false,
            reason: reason.to_owned(),
            message: message.into(),
        }
    }
}

/// Turns observed conditions into API conditions, keeping the previous
/// `lastTransitionTime` of every condition whose status did not change.
pub fn merge_conditions(
    previous: &[Condition],
    observed: &[Observed],
    generation: Option<i64>,
    now: Timestamp,
) -> Vec<Condition> {
    observed
        .iter()
        .map(|o| {
            let status = if o.ok { "True" } else { "False" };
            let last_transition_time = previous
                .iter()
                .find(|p| p.type_ == o.type_ && p.status == status)
                .map(|p| p.last_transition_time.clone())
                .unwrap_or(Time(now));
            Condition {
                type_: o.type_.to_owned(),
                status: status.to_owned(),
                reason: o.reason.clone(),
                message: o.message.clone(),
                observed_generation: generation,
                last_transition_time,
            }
        })
        .collect()
}

/// The `Ready` condition and phase that follow from the other conditions.
pub fn summarize(observed: &[Observed], suspended: bool) -> (Observed, TenantPhase) {
    if let Some(bad) = observed
        .iter()
        .find(|o| !o.ok && reasons::PERMANENT.contains(&o.reason.as_str()))
    {
        return (
            Observed::no(types::READY, &bad.reason, bad.message.clone()),
            TenantPhase::Degraded,
        );
    }
    if suspended {
        return (
            Observed::no(
                types::READY,
                "Suspended",
                "the tenant is suspended; data is kept",
            ),
            TenantPhase::Suspended,
        );
    }
    match observed.iter().find(|o| !o.ok) {
        Some(pending) => (
            Observed::no(
                types::READY,
                &format!("{}False", pending.type_),
                pending.message.clone(),
            ),
            TenantPhase::Provisioning,
        ),
        None => (
            Observed::yes(types::READY, "Ready", "the instance is serving"),
            TenantPhase::Ready,
        ),
    }
}

/// An Event the reconciler should publish for a status change.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transition {
    /// Warning rather than Normal.
    pub warning: bool,
    /// CamelCase reason.
    pub reason: String,
    /// Human-readable note.
    pub note: String,
}

/// Events for the difference between two statuses: phase changes (except the first
/// Provisioning), and each condition newly failing for a reason that needs a person.
pub fn transitions(old: Option<&TenantStatus>, new: &TenantStatus) -> Vec<Transition> {
    let mut out = vec![];
    let old_phase = old.and_then(|s| s.phase);
    if let Some(phase) = new.phase
        && old_phase != Some(phase)
        && !(old_phase.is_none() && phase == TenantPhase::Provisioning)
    {
        out.push(Transition {
            warning: phase == TenantPhase::Degraded,
            reason: phase.as_str().to_owned(),
            note: {
                let why = new
                    .conditions
                    .iter()
                    .find(|c| c.type_ == types::READY)
                    .map(|c| c.message.as_str())
                    .unwrap_or("");
                format!(
                    "phase {} -> {}: {why}",
                    old_phase.map_or("none", TenantPhase::as_str),
                    phase.as_str()
                )
            },
        });
    }
    for c in &new.conditions {
        // Backups falling behind: a Warning when the condition turns True or its reason
        // changes.
        if c.type_ == types::BACKUP_STALE && c.status == "True" {
            let was = old.and_then(|s| s.conditions.iter().find(|p| p.type_ == c.type_));
            if !was.is_some_and(|p| p.status == c.status && p.reason == c.reason) {
                out.push(Transition {
                    warning: true,
                    reason: c.reason.clone(),
                    note: c.message.clone(),
                });
            }
            continue;
        }
        if c.type_ == types::READY
            || c.status != "False"
            || !reasons::PERMANENT.contains(&c.reason.as_str())
        {
            continue;
        }
        let was = old.and_then(|s| s.conditions.iter().find(|p| p.type_ == c.type_));
        if was.is_some_and(|p| p.status == c.status && p.reason == c.reason) {
            continue;
        }
        out.push(Transition {
            warning: true,
            reason: c.reason.clone(),
            note: c.message.clone(),
        });
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    fn t(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    #[test]
    fn transition_time_moves_only_when_status_changes() {
        let first = merge_conditions(
            &[],
            &[Observed::no(
                types::RUNTIME_READY,
                "Progressing",
                "starting",
            )],
            Some(1),
            t("2026-01-01T00:00:00Z"),
        );
        // Same status, new message: time kept.
        let second = merge_conditions(
            &first,
            &[Observed::no(
                types::RUNTIME_READY,
                "Progressing",
                "still starting",
            )],
            Some(2),
            t("2026-01-01T00:05:00Z"),
        );
        assert_eq!(
            second[0].last_transition_time,
            Time(t("2026-01-01T00:00:00Z"))
        );
        assert_eq!(second[0].message, "still starting");
        assert_eq!(second[0].observed_generation, Some(2));
        // Status flips: time moves.
        let third = merge_conditions(
            &second,
            &[Observed::yes(types::RUNTIME_READY, "Available", "up")],
            Some(2),
            t("2026-01-01T00:10:00Z"),
        );
        assert_eq!(
            third[0].last_transition_time,
            Time(t("2026-01-01T00:10:00Z"))
        );
        assert_eq!(third[0].status, "True");
    }

    #[test]
    fn phase_follows_conditions() {
        let all_ok = vec![
            Observed::yes(types::NAMESPACE_READY, "Active", ""),
            Observed::yes(types::RUNTIME_READY, "Available", ""),
        ];
        assert_eq!(summarize(&all_ok, false).1, TenantPhase::Ready);
        assert_eq!(summarize(&all_ok, true).1, TenantPhase::Suspended);
        let pending = vec![Observed::no(types::RUNTIME_READY, "Progressing", "")];
        let (ready, phase) = summarize(&pending, false);
        assert_eq!(phase, TenantPhase::Provisioning);
        assert_eq!(ready.reason, "RuntimeReadyFalse");
        let broken = vec![Observed::no(
            types::STORAGE_ENCRYPTED,
            reasons::STORAGE_CLASS_NOT_ENCRYPTED,
            "plain",
        )];
        let (ready, phase) = summarize(&broken, true);
        assert_eq!(phase, TenantPhase::Degraded);
        assert_eq!(ready.reason, reasons::STORAGE_CLASS_NOT_ENCRYPTED);
    }

    #[test]
    fn events_fire_on_transitions_only() {
        let cond = |status: &str, reason: &str| Condition {
            type_: types::STORAGE_ENCRYPTED.into(),
            status: status.into(),
            reason: reason.into(),
            message: "m".into(),
            observed_generation: None,
            last_transition_time: Time(Timestamp::UNIX_EPOCH),
        };
        let provisioning = TenantStatus {
            phase: Some(TenantPhase::Provisioning),
            ..TenantStatus::default()
        };
        assert!(transitions(None, &provisioning).is_empty());
        let degraded = TenantStatus {
            phase: Some(TenantPhase::Degraded),
            conditions: vec![cond("False", reasons::STORAGE_CLASS_NOT_ENCRYPTED)],
            ..TenantStatus::default()
        };
        let ev = transitions(Some(&provisioning), &degraded);
        assert_eq!(ev.len(), 2);
        assert!(ev.iter().all(|e| e.warning));
        assert_eq!(ev[1].reason, reasons::STORAGE_CLASS_NOT_ENCRYPTED);
        // Nothing changed: no event.
        assert!(transitions(Some(&degraded), &degraded).is_empty());
        let ready = TenantStatus {
            phase: Some(TenantPhase::Ready),
            ..TenantStatus::default()
        };
        let ev = transitions(Some(&degraded), &ready);
        assert_eq!(ev.len(), 1);
        assert!(!ev[0].warning);
        assert_eq!(ev[0].reason, "Ready");
    }
}
