//! The library's one error type. Variants name the step that failed and keep its cause;
//! none of them ever carries key material.

/// Result with the operator's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can fail in the operator library.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A Kubernetes API call failed.
    #[error("kubernetes API call failed while trying to {action}")]
    Kube {
        /// What the operator was doing, e.g. `apply Deployment tenant-a/tenant-runtime`.
        action: String,
        /// The client error.
        #[source]
        source: kube::Error,
    },
    /// An object lacks a field that the API server always sets (name, uid...).
    #[error("object is missing {0}")]
    MissingField(&'static str),
    /// Making, issuing or reading a certificate failed.
    #[error("certificate operation failed")]
    Pki(#[from] tenantry_pki::Error),
    /// The operating system's random number generator failed.
    #[error("could not read random bytes")]
    Random(#[source] getrandom::Error),
    /// Serializing an object to JSON failed.
    #[error("could not serialize {what} to JSON")]
    Json {
        /// What was serialized.
        what: &'static str,
        /// The serde error.
        #[source]
        source: serde_json::Error,
    },
    /// Serializing a document to YAML failed.
    #[error("could not serialize {what} to YAML")]
    Yaml {
        /// What was serialized.
        what: &'static str,
        /// The serde error.
        #[source]
        source: serde_yaml::Error,
    },
    /// The `Tenant` CRD is not installed in the cluster.
    #[error(
        "the CustomResourceDefinition {crd} is not installed (or does not serve {version}); \
         install it with `tenantry-operator crd | kubectl apply -f -` or the Helm chart"
    )]
    CrdNotInstalled {
        /// CRD name.
        crd: &'static str,
        /// Version the operator needs.
        version: &'static str,
    },
    /// The operator's CA Secret exists but does not hold a usable CA.
    #[error("the CA Secret {0} is malformed; fix or delete it so a new CA is made")]
    CaSecretMalformed(String),
    /// Leadership was lost (another replica holds the Lease).
    #[error("lost the leader-election Lease {0}")]
    LeadershipLost(String),
    /// A watch cache was dropped before its first list completed.
    #[error("the watch cache of {0} stopped before it was filled")]
    CacheNotReady(&'static str),
    /// A reconcile took longer than the reconcile timeout and was abandoned.
    #[error("the reconcile did not finish within {0:?}")]
    Timeout(std::time::Duration),
    /// Binding or serving the admin port failed.
    #[error("admin server failed")]
    Admin(#[source] std::io::Error),
}

impl Error {
    /// Wraps a client error with what the operator was doing.
    pub fn kube(action: impl Into<String>, source: kube::Error) -> Self {
        Error::Kube {
            action: action.into(),
            source,
        }
    }

    /// A short label for metrics.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Kube { .. } => "kube",
            Error::MissingField(_) => "missing_field",
            Error::Pki(_) => "pki",
            Error::Random(_) => "random",
            Error::Json { .. } | Error::Yaml { .. } => "serialize",
            Error::CrdNotInstalled { .. } => "crd",
            Error::CaSecretMalformed(_) => "ca",
            Error::LeadershipLost(_) => "leader",
            Error::Admin(_) => "admin",
            Error::CacheNotReady(_) => "cache",
            Error::Timeout(_) => "timeout",
        }
    }
}

/// True when `err` is an API "404 Not Found".
pub fn is_not_found(err: &kube::Error) -> bool {
    matches!(err, kube::Error::Api(status) if status.is_not_found())
}

/// True when `err` is an API "409 AlreadyExists".
pub fn is_already_exists(err: &kube::Error) -> bool {
    matches!(err, kube::Error::Api(status) if status.is_already_exists())
}

/// True when `err` is an API "409 Conflict" (a stale resourceVersion).
pub fn is_conflict(err: &kube::Error) -> bool {
    matches!(err, kube::Error::Api(status) if status.is_conflict() || status.code == 409)
}
