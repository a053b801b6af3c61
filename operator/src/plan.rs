//! What each plan buys: the namespace's ResourceQuota, its LimitRange defaults and the
//! runtime container's resources. Quantities are written in the canonical form the API
//! server returns, so comparing desired and observed objects stays exact.

use tenantry_proto::retention::Plan;

/// Resource figures of one plan.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PlanLimits {
    /// Quota: sum of CPU requests in the namespace.
    pub quota_requests_cpu: &'static str,
    /// Quota: sum of CPU limits.
    pub quota_limits_cpu: &'static str,
    /// Quota: sum of memory requests.
    pub quota_requests_memory: &'static str,
    /// Quota: sum of memory limits.
    pub quota_limits_memory: &'static str,
    /// Quota: sum of storage requests.
    pub quota_storage: &'static str,
    /// `quota_storage` in bytes, to check `spec.storage.size` against it.
    pub quota_storage_bytes: u64,
    /// Quota: number of pods.
    pub quota_pods: &'static str,
    /// Quota: number of PVCs.
    pub quota_pvcs: &'static str,
    /// LimitRange: default container CPU limit.
    pub default_cpu: &'static str,
    /// LimitRange: default container memory limit.
    pub default_memory: &'static str,
    /// LimitRange: default container CPU request.
    pub default_request_cpu: &'static str,
    /// LimitRange: default container memory request.
    pub default_request_memory: &'static str,
    /// LimitRange: largest container CPU limit.
    pub max_cpu: &'static str,
    /// LimitRange: largest container memory limit.
    pub max_memory: &'static str,
    /// Runtime container: CPU request.
    pub runtime_request_cpu: &'static str,
    /// Runtime container: memory request.
    pub runtime_request_memory: &'static str,
    /// Runtime container: CPU limit.
    pub runtime_limit_cpu: &'static str,
    /// Runtime container: memory limit.
    pub runtime_limit_memory: &'static str,
}

const GI: u64 = 1 << 30;

/// The figures of `plan`.
pub fn plan_limits(plan: Plan) -> PlanLimits {
    match plan {
        Plan::Free => PlanLimits {
            quota_requests_cpu: "1",
            quota_limits_cpu: "2",
            quota_requests_memory: "1Gi",
            quota_limits_memory: "2Gi",
            quota_storage: "5Gi",
            quota_storage_bytes: 5 * GI,
            quota_pods: "4",
            quota_pvcs: "2",
            default_cpu: "250m",
            default_memory: "256Mi",
            default_request_cpu: "50m",
            default_request_memory: "64Mi",
            max_cpu: "1",
            max_memory: "1Gi",
            runtime_request_cpu: "100m",
            runtime_request_memory: "256Mi",
            runtime_limit_cpu: "500m",
            runtime_limit_memory: "512Mi",
        },
        Plan::Standard => PlanLimits {
            quota_requests_cpu: "4",
            quota_limits_cpu: "8",
            quota_requests_memory: "8Gi",
            quota_limits_memory: "16Gi",
            quota_storage: "50Gi",
            quota_storage_bytes: 50 * GI,
            quota_pods: "10",
            quota_pvcs: "4",
            default_cpu: "500m",
            default_memory: "512Mi",
            default_request_cpu: "100m",
            default_request_memory: "128Mi",
            max_cpu: "4",
            max_memory: "8Gi",
            runtime_request_cpu: "500m",
            runtime_request_memory: "1Gi",
            runtime_limit_cpu: "2",
            runtime_limit_memory: "4Gi",
        },
        Plan::Enterprise => PlanLimits {
            quota_requests_cpu: "16",
            quota_limits_cpu: "32",
            quota_requests_memory: "32Gi",
            quota_limits_memory: "64Gi",
            quota_storage: "500Gi",
            quota_storage_bytes: 500 * GI,
            quota_pods: "40",
            quota_pvcs: "8",
            default_cpu: "1",
            default_memory: "1Gi",
            default_request_cpu: "250m",
            default_request_memory: "256Mi",
            max_cpu: "16",
            max_memory: "32Gi",
            runtime_request_cpu: "2",
            runtime_request_memory: "4Gi",
            runtime_limit_cpu: "8",
            runtime_limit_memory: "16Gi",
        },
    }
}

/// Bytes in a volume size written as `<n>Mi`, `<n>Gi` or `<n>Ti` (the CRD's pattern).
pub fn parse_size(size: &str) -> Option<u64> {
    let (digits, unit) = size.split_at(size.len().checked_sub(2)?);
    let shift = match unit {
        "Mi" => 20,
        "Gi" => 30,
        "Ti" => 40,
        _ => return None,
    };
    let n: u64 = digits.parse().ok()?;
    if n == 0 {
        return None;
    }
    n.checked_mul(1u64 << shift)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    /// Parses a CPU quantity in the forms used above (`"250m"`, `"2"`) into millicores.
    fn millicores(q: &str) -> Option<u64> {
        match q.strip_suffix('m') {
            Some(m) => m.parse().ok(),
            None => q.parse::<u64>().ok()?.checked_mul(1000),
        }
    }

    /// Parses a memory quantity in the forms used above (`"256Mi"`, `"4Gi"`) into bytes.
    fn bytes(q: &str) -> Option<u64> {
        parse_size(q)
    }

    #[test]
    fn sizes_parse_in_binary_units() {
        assert_eq!(parse_size("1Gi"), Some(1 << 30));
        assert_eq!(parse_size("512Mi"), Some(512 << 20));
        assert_eq!(parse_size("2Ti"), Some(2 << 40));
        for bad in ["", "Gi", "0Gi", "1G", "1.5Gi", "-1Gi", "1gi"] {
            assert_eq!(parse_size(bad), None, "{bad}");
        }
    }

    #[test]
    fn plans_grow_and_the_runtime_fits_its_quota_twice() {
        let mut last_storage = 0;
        for plan in Plan::ALL {
            let l = plan_limits(plan);
            assert!(l.quota_storage_bytes > last_storage);
            last_storage = l.quota_storage_bytes;
            assert_eq!(bytes(l.quota_storage), Some(l.quota_storage_bytes));
            // Room for the runtime plus one more pod (a Recreate roll-out or a debug pod).
            let cpu = millicores(l.runtime_limit_cpu).unwrap();
            assert!(
                2 * cpu <= millicores(l.quota_limits_cpu).unwrap(),
                "{plan:?}"
            );
            let mem = bytes(l.runtime_limit_memory).unwrap();
            assert!(2 * mem <= bytes(l.quota_limits_memory).unwrap(), "{plan:?}");
            assert!(millicores(l.runtime_request_cpu) <= millicores(l.runtime_limit_cpu));
            // The runtime's limits respect the LimitRange maximum.
            assert!(cpu <= millicores(l.max_cpu).unwrap());
            assert!(mem <= bytes(l.max_memory).unwrap());
            assert!(millicores(l.default_request_cpu) <= millicores(l.default_cpu));
            assert!(bytes(l.default_request_memory) <= bytes(l.default_memory));
        }
    }
}
