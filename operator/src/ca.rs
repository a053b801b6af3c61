//! The operator CA and its rotation.
//!
//! The CA lives in the Secret `tenantry-ca` in the operator namespace: `tls.crt` and
//! `tls.key` are the issuing CA. A rotation (a new value of the Secret's annotation
//! `tenantry.dev/rotate`, or of `--rotate-ca`) makes a new CA: `tls.crt` and `tls.key`
//! become it, the old certificate moves to `previous.crt` and the old private key is
//! overwritten (nothing is issued with it again), and the start time and the handled value
//! are recorded as annotations. During this overlap every tenant's `ca.crt` is the bundle
//! of both CAs, and each tenant's leaf is re-issued by the new CA at its own time in
//! `--ca-rotation-window` ([`tenantry_pki::reissue_time`]), never in the same write that
//! first brings the bundle. Once the window has passed and every leaf in the watch cache is
//! from the new CA, `previous.crt` is removed and the bundles go back to the new CA alone.
//!
//! The whole state is in the Secret, so a new leader (or a restarted one) carries on where
//! the last one stopped. Only the leader runs [`step`]: it runs beside the controller.

use std::time::Duration;

use jiff::Timestamp;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, Patch, PatchParams};
use kube::{Resource as _, ResourceExt as _};
use secrecy::{ExposeSecret as _, SecretString};
use serde_json::{Value, json};
use tracing::{info, warn};

use crate::controller::Context;
use crate::error::{Error, Result};
use crate::status::Transition;
use tenantry_kube::names;
use tenantry_pki::{self as pki, CertificateAuthority};

/// How often the leader looks again, after the window, for leaves still from the previous
/// CA.
pub const RECHECK: Duration = Duration::from_secs(10);

/// How long a re-issued leaf may take to be served: the kubelet's sync of the Secret volume
/// (about a minute) plus the runtime's reload poll. The previous CA leaves the bundles only
/// when every leaf from the new CA is older than this (or than the window, when shorter),
/// so no client that follows the bundle meets a leaf it does not trust.
pub const SERVE_GRACE: Duration = Duration::from_secs(120);

/// The operator CA as the controller uses it: the issuing CA and, during a rotation, the
/// previous CA's certificate.
#[derive(Debug)]
pub struct CaState {
    issuing: CertificateAuthority,
    fingerprint: String,
    previous: Option<(String, String)>,
    started: Option<Timestamp>,
    bundle: String,
    annotation: Option<String>,
    handled: Option<String>,
    flag_handled: Option<String>,
}

/// Which CA of a [`CaState`] signed a leaf.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Signer {
    /// The issuing CA.
    Current,
    /// The previous CA, during a rotation.
    Previous,
}

/// What a rotation request asks to record as handled.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    /// The annotation's new value.
    pub annotation: Option<String>,
    /// `--rotate-ca`'s new value.
    pub flag: Option<String>,
}

impl Request {
    /// The value(s), for messages.
    fn describe(&self) -> String {
        let mut parts = vec![];
        if let Some(v) = &self.annotation {
            parts.push(format!("{}={v}", names::ROTATE_CA_ANNOTATION));
        }
        if let Some(v) = &self.flag {
            parts.push(format!("--rotate-ca={v}"));
        }
        parts.join(" and ")
    }
}

/// What the CA manager does next.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// Make a new CA.
    Rotate(Request),
    /// Drop the previous CA.
    Retire,
    /// Nothing now; look again after this long, or (None) on the next change.
    Wait(Option<Duration>),
}

fn text(secret: &Secret, key: &str) -> Option<String> {
    secret
        .data
        .as_ref()?
        .get(key)
        .and_then(|b| String::from_utf8(b.0.clone()).ok())
}

impl CaState {
    /// A CA with no rotation in progress.
    pub fn new(issuing: CertificateAuthority) -> Result<CaState> {
        let fingerprint = issuing.fingerprint()?;
        let bundle = pki::bundle(&[issuing.cert_pem()]);
        Ok(CaState {
            issuing,
            fingerprint,
            previous: None,
            started: None,
            bundle,
            annotation: None,
            handled: None,
            flag_handled: None,
        })
    }

    /// Reads the CA Secret. The error says what is wrong, never with key material.
    pub fn from_secret(secret: &Secret) -> std::result::Result<CaState, &'static str> {
        let cert = text(secret, "tls.crt").ok_or("tls.crt is missing")?;
        let key = text(secret, "tls.key").ok_or("tls.key is missing")?;
        let issuing = CertificateAuthority::from_pem(&cert, &SecretString::from(key))
            .map_err(|_| "tls.crt and tls.key are not a CA certificate and its key")?;
        let mut state = CaState::new(issuing).map_err(|_| "tls.crt does not parse")?;
        let annotations = secret.annotations();
        if let Some(previous) = text(secret, names::CA_PREVIOUS_KEY) {
            let previous = pki::split_bundle(&previous)
                .ok()
                .and_then(|mut certs| (certs.len() == 1).then(|| certs.remove(0)))
                .ok_or("previous.crt is not one certificate")?;
            let fp = pki::fingerprint(&previous).map_err(|_| "previous.crt does not parse")?;
            state.bundle = pki::bundle(&[state.issuing.cert_pem(), previous.as_str()]);
            state.previous = Some((previous, fp));
            // A missing or garbled start: the window is over, re-issue at once.
            state.started = Some(
                annotations
                    .get(names::CA_ROTATION_STARTED_ANNOTATION)
                    .and_then(|t| t.parse().ok())
                    .unwrap_or(Timestamp::UNIX_EPOCH),
            );
        }
        state.annotation = annotations.get(names::ROTATE_CA_ANNOTATION).cloned();
        state.handled = annotations
            .get(names::CA_ROTATION_HANDLED_ANNOTATION)
            .cloned();
        state.flag_handled = annotations
            .get(names::CA_ROTATION_FLAG_HANDLED_ANNOTATION)
            .cloned();
        Ok(state)
    }

    /// The CA that issues leaves.
    pub fn issuing(&self) -> &CertificateAuthority {
        &self.issuing
    }

    /// SHA-256 fingerprint of the issuing CA.
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// SHA-256 fingerprint of the previous CA, during a rotation.
    pub fn previous_fingerprint(&self) -> Option<&str> {
        self.previous.as_ref().map(|(_, fp)| fp.as_str())
    }

    /// The trust bundle every tenant's `ca.crt` holds: the issuing CA, then the previous one
    /// during a rotation.
    pub fn bundle(&self) -> &str {
        &self.bundle
    }

    /// When the rotation in progress started.
    pub fn started(&self) -> Option<Timestamp> {
        self.started
    }

    /// Which CA signed `cert_pem`, if one of them did.
    pub fn signer(&self, cert_pem: &str) -> Option<Signer> {
        if self.issuing.signed(cert_pem) {
            return Some(Signer::Current);
        }
        match &self.previous {
            Some((previous, _)) if pki::signed_by(previous, cert_pem) => Some(Signer::Previous),
            _ => None,
        }
    }

    /// The fingerprint of the CA that `signer` names.
    pub fn fingerprint_of(&self, signer: Signer) -> &str {
        match signer {
            Signer::Current => &self.fingerprint,
            Signer::Previous => self.previous_fingerprint().unwrap_or(&self.fingerprint),
        }
    }

    /// When the leaf of tenant `name`, still from the previous CA, is re-issued.
    pub fn reissue_at(&self, name: &str, window: Duration) -> Timestamp {
        match self.started {
            Some(start) => pki::reissue_time(start, window, name),
            None => Timestamp::UNIX_EPOCH,
        }
    }

    /// Whether this and `other` are the same CA state as far as tenants are concerned.
    pub fn same(&self, other: &CaState) -> bool {
        self.bundle == other.bundle && self.started == other.started
    }

    /// A rotation asked for and not handled yet, by the annotation or by `flag`.
    pub fn requested(&self, flag: Option<&str>) -> Option<Request> {
        let annotation = self
            .annotation
            .as_ref()
            .filter(|v| !v.is_empty() && Some(*v) != self.handled.as_ref())
            .cloned();
        let flag = flag
            .filter(|v| Some(*v) != self.flag_handled.as_deref())
            .map(str::to_owned);
        (annotation.is_some() || flag.is_some()).then_some(Request { annotation, flag })
    }
}

/// The pure decision: rotate when asked and no rotation is in progress (a request during
/// one waits for it to end: the CA before the previous one may still sign leaves); retire
/// when the window has passed and no leaf is from the previous CA any more.
pub fn next_step(
    state: &CaState,
    flag: Option<&str>,
    window: Duration,
    now: Timestamp,
    leaves_from_previous: usize,
) -> Step {
    let Some(started) = state.started else {
        return match state.requested(flag) {
            Some(request) => Step::Rotate(request),
            None => Step::Wait(None),
        };
    };
    let end = started
        .checked_add(jiff::SignedDuration::try_from(window).unwrap_or_default())
        .unwrap_or(started);
    if now < end {
        let left = Duration::try_from(end.duration_since(now)).unwrap_or(RECHECK);
        return Step::Wait(Some(left.max(Duration::from_secs(1))));
    }
    if leaves_from_previous > 0 {
        return Step::Wait(Some(RECHECK));
    }
    Step::Retire
}

/// Tenant TLS Secrets in the watch cache whose leaf is not from the issuing CA, or is but
/// so new (issued within the grace) that its runtime may still serve the old one.
fn leaves_from_previous(ctx: &Context, state: &CaState, now: Timestamp) -> usize {
    let grace = jiff::SignedDuration::try_from(SERVE_GRACE.min(ctx.settings.ca_rotation_window))
        .unwrap_or_default();
    let settled = |cert: &str| {
        pki::parse_certificate(cert)
            .ok()
            .and_then(|info| info.not_before.checked_add(grace).ok())
            .is_some_and(|served_by| served_by <= now)
    };
    ctx.caches
        .secrets
        .entries()
        .into_iter()
        .filter(|(key, _)| key.name == names::TLS_SECRET)
        .filter(|(_, entry)| {
            let cert = entry
                .decode::<Secret>()
                .ok()
                .and_then(|s| text(&s, "tls.crt"));
            !cert.is_some_and(|c| state.signer(&c) == Some(Signer::Current) && settled(&c))
        })
        .count()
}

fn bytes(s: &str) -> Result<Value> {
    serde_json::to_value(ByteString(s.as_bytes().to_vec())).map_err(|source| Error::Json {
        what: "a Secret value",
        source,
    })
}

/// One step of the CA manager for the CA Secret as last seen. Returns the Secret as it
/// wrote it (the new state, before the watch shows it) and when to look again.
pub async fn step(
    ctx: &Context,
    api: &Api<Secret>,
    secret: &Secret,
) -> Result<(Option<Secret>, Option<Duration>)> {
    let name = secret.name_any();
    let label = format!("{}/{name}", ctx.settings.operator_namespace);
    let state = match CaState::from_secret(secret) {
        Ok(state) => state,
        Err(why) => {
            warn!(secret = %label, why, "the CA Secret is malformed; keeping the CA in memory");
            return Ok((None, None));
        }
    };
    let now = ctx.now();
    let window = ctx.settings.ca_rotation_window;
    let stale = if state.started.is_some() {
        leaves_from_previous(ctx, &state, now)
    } else {
        0
    };
    let flag = ctx.settings.rotate_ca.as_deref();
    let reference = secret.object_ref(&());
    match next_step(&state, flag, window, now, stale) {
        Step::Wait(after) => {
            if state.started.is_some() && state.requested(flag).is_some() {
                info!(secret = %label, "a CA rotation is asked for during one in progress; it starts when this one ends");
            }
            if stale > 0 && after == Some(RECHECK) {
                info!(
                    secret = %label,
                    leaves = stale,
                    "the CA rotation window has passed; waiting for the last leaves from the previous CA to be re-issued"
                );
            }
            Ok((None, after))
        }
        Step::Rotate(request) => {
            let new = CertificateAuthority::generate(names::CA_COMMON_NAME, now)?;
            let new_fp = new.fingerprint()?;
            let mut annotations = serde_json::Map::new();
            annotations.insert(
                names::CA_ROTATION_STARTED_ANNOTATION.into(),
                json!(now.to_string()),
            );
            if let Some(v) = &request.annotation {
                annotations.insert(names::CA_ROTATION_HANDLED_ANNOTATION.into(), json!(v));
            }
            if let Some(v) = &request.flag {
                annotations.insert(names::CA_ROTATION_FLAG_HANDLED_ANNOTATION.into(), json!(v));
            }
            // Guarded by the resourceVersion: two leaders in a row never both rotate. The
            // old key is overwritten here: nothing is issued with it again.
            let patch = json!({
                "metadata": {
                    "resourceVersion": secret.resource_version(),
                    "annotations": annotations,
                },
                "data": {
                    "tls.crt": bytes(new.cert_pem())?,
                    "tls.key": bytes(new.key_pem().expose_secret())?,
                    names::CA_PREVIOUS_KEY: bytes(state.issuing.cert_pem())?,
                },
            });
            let written = api
                .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
                .map_err(|e| Error::kube(format!("rotate the CA in Secret {label}"), e))?;
            ctx.metrics.wrote();
            let t = Transition {
                warning: false,
                reason: "CARotationStarted".to_owned(),
                note: format!(
                    "new CA {new_fp} (was {}) for {}; every tenant certificate is re-issued by it within {}, then the previous CA leaves the trust bundles",
                    state.fingerprint,
                    request.describe(),
                    humanize(window),
                ),
            };
            info!(secret = %label, "{}", t.note);
            ctx.publish(&reference, &t).await;
            Ok((Some(written), Some(window.max(Duration::from_secs(1)))))
        }
        Step::Retire => {
            let patch = json!({
                "metadata": {
                    "resourceVersion": secret.resource_version(),
                    "annotations": { names::CA_ROTATION_STARTED_ANNOTATION: null },
                },
                "data": { names::CA_PREVIOUS_KEY: null },
            });
            let written = api
                .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
                .map_err(|e| Error::kube(format!("retire the previous CA in Secret {label}"), e))?;
            ctx.metrics.wrote();
            let t = Transition {
                warning: false,
                reason: "CARetired".to_owned(),
                note: format!(
                    "previous CA {} retired: every tenant certificate is issued by {}, and the trust bundles hold it alone",
                    state.previous_fingerprint().unwrap_or_default(),
                    state.fingerprint,
                ),
            };
            info!(secret = %label, "{}", t.note);
            ctx.publish(&reference, &t).await;
            // A rotation asked for meanwhile starts on the next look.
            Ok((Some(written), Some(Duration::from_secs(1))))
        }
    }
}

/// `1h`, `90s`: a window as the flag takes it.
fn humanize(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        s if s % 3600 == 0 && s > 0 => format!("{}h", s / 3600),
        s if s % 60 == 0 && s > 0 => format!("{}m", s / 60),
        s => format!("{s}s"),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn at(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    fn secret(
        ca: &CertificateAuthority,
        previous: Option<&str>,
        annotations: &[(&str, &str)],
    ) -> Secret {
        let mut data = BTreeMap::from([
            ("tls.crt".to_owned(), ByteString(ca.cert_pem().into())),
            (
                "tls.key".to_owned(),
                ByteString(ca.key_pem().expose_secret().as_bytes().to_vec()),
            ),
        ]);
        if let Some(p) = previous {
            data.insert(names::CA_PREVIOUS_KEY.into(), ByteString(p.into()));
        }
        let mut s = Secret {
            data: Some(data),
            ..Secret::default()
        };
        s.metadata.annotations = Some(
            annotations
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
        );
        s
    }

    #[test]
    fn a_secret_without_previous_is_one_ca_and_one_bundle() {
        let ca = CertificateAuthority::generate("a", at("2026-01-01T00:00:00Z")).unwrap();
        let state = CaState::from_secret(&secret(&ca, None, &[])).unwrap();
        assert_eq!(state.bundle(), pki::bundle(&[ca.cert_pem()]));
        assert_eq!(state.fingerprint(), ca.fingerprint().unwrap());
        assert_eq!(state.started(), None);
        assert_eq!(state.previous_fingerprint(), None);
        assert_eq!(state.requested(None), None);
    }

    #[test]
    fn during_a_rotation_the_bundle_holds_both_and_leaves_are_told_apart() {
        let now = at("2026-01-01T00:00:00Z");
        let old = CertificateAuthority::generate("old", now).unwrap();
        let new = CertificateAuthority::generate("new", now).unwrap();
        let state = CaState::from_secret(&secret(
            &new,
            Some(old.cert_pem()),
            &[(
                names::CA_ROTATION_STARTED_ANNOTATION,
                "2026-01-01T00:00:00Z",
            )],
        ))
        .unwrap();
        assert_eq!(
            pki::split_bundle(state.bundle()).unwrap(),
            [
                pki::bundle(&[new.cert_pem()]),
                pki::bundle(&[old.cert_pem()])
            ]
        );
        let request = pki::LeafRequest {
            dns_names: vec!["a.example".into()],
            ip_addresses: vec![],
            validity: Duration::from_secs(3600),
            now,
        };
        let from_old = old.issue_leaf(&request).unwrap();
        let from_new = new.issue_leaf(&request).unwrap();
        let stranger = CertificateAuthority::generate("x", now).unwrap();
        assert_eq!(state.signer(&from_new.cert_pem), Some(Signer::Current));
        assert_eq!(state.signer(&from_old.cert_pem), Some(Signer::Previous));
        assert_eq!(
            state.signer(&stranger.issue_leaf(&request).unwrap().cert_pem),
            None
        );
        assert_eq!(
            state.fingerprint_of(Signer::Previous),
            old.fingerprint().unwrap()
        );
        let hour = Duration::from_secs(3600);
        let t = state.reissue_at("acme", hour);
        assert!(t >= now && t < at("2026-01-01T01:00:00Z"));
        // Without a start the window counts as over.
        let unstarted = CaState::from_secret(&secret(&new, Some(old.cert_pem()), &[])).unwrap();
        assert!(unstarted.reissue_at("acme", hour) < now);
        // A bundle in previous.crt, or garbage, is refused.
        let both = pki::bundle(&[old.cert_pem(), stranger.cert_pem()]);
        assert!(CaState::from_secret(&secret(&new, Some(&both), &[])).is_err());
        assert!(CaState::from_secret(&secret(&new, Some("junk"), &[])).is_err());
        // A key that is not the certificate's.
        let mut mixed = secret(&new, None, &[]);
        mixed.data.as_mut().unwrap().insert(
            "tls.key".into(),
            ByteString(old.key_pem().expose_secret().as_bytes().to_vec()),
        );
        let err = CaState::from_secret(&mixed).unwrap_err();
        assert!(!err.contains("PRIVATE"));
    }

    #[test]
    fn each_new_value_rotates_once_and_a_request_during_a_rotation_waits() {
        let now = at("2026-01-01T00:00:00Z");
        let hour = Duration::from_secs(3600);
        let ca = CertificateAuthority::generate("a", now).unwrap();
        let old = CertificateAuthority::generate("old", now).unwrap();
        let asked =
            CaState::from_secret(&secret(&ca, None, &[(names::ROTATE_CA_ANNOTATION, "one")]))
                .unwrap();
        assert_eq!(
            next_step(&asked, None, hour, now, 0),
            Step::Rotate(Request {
                annotation: Some("one".into()),
                flag: None
            })
        );
        let handled = CaState::from_secret(&secret(
            &ca,
            None,
            &[
                (names::ROTATE_CA_ANNOTATION, "one"),
                (names::CA_ROTATION_HANDLED_ANNOTATION, "one"),
                (names::CA_ROTATION_FLAG_HANDLED_ANNOTATION, "f1"),
            ],
        ))
        .unwrap();
        assert_eq!(next_step(&handled, None, hour, now, 0), Step::Wait(None));
        assert_eq!(
            next_step(&handled, Some("f1"), hour, now, 0),
            Step::Wait(None)
        );
        assert_eq!(
            next_step(&handled, Some("f2"), hour, now, 0),
            Step::Rotate(Request {
                annotation: None,
                flag: Some("f2".into())
            })
        );
        // In the overlap: a new value waits; the window runs; then leaves decide.
        let overlap = CaState::from_secret(&secret(
            &ca,
            Some(old.cert_pem()),
            &[
                (names::ROTATE_CA_ANNOTATION, "two"),
                (names::CA_ROTATION_HANDLED_ANNOTATION, "one"),
                (
                    names::CA_ROTATION_STARTED_ANNOTATION,
                    "2026-01-01T00:00:00Z",
                ),
            ],
        ))
        .unwrap();
        let half = at("2026-01-01T00:30:00Z");
        assert_eq!(
            next_step(&overlap, None, hour, half, 0),
            Step::Wait(Some(Duration::from_secs(1800)))
        );
        let after = at("2026-01-01T01:00:00Z");
        assert_eq!(
            next_step(&overlap, None, hour, after, 2),
            Step::Wait(Some(RECHECK))
        );
        assert_eq!(next_step(&overlap, None, hour, after, 0), Step::Retire);
    }

    #[test]
    fn windows_read_like_the_flag() {
        assert_eq!(humanize(Duration::from_secs(3600)), "1h");
        assert_eq!(humanize(Duration::from_secs(120)), "2m");
        assert_eq!(humanize(Duration::from_secs(90)), "90s");
    }
}
