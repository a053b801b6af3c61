//! What the API benches share: a free port, and waiting for a started server.

use std::time::{Duration, Instant};

use tenantry_client::Trust;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

pub use tenantry_test_support::free_port;

/// Until the gRPC health check at `addr` answers; panics after 30 s.
pub async fn wait_healthy(addr: &str) {
    let start = Instant::now();
    loop {
        if let Ok(ch) = tenantry_client::connect(addr, Trust::default()).await
            && HealthClient::new(ch)
                .check(HealthCheckRequest {
                    service: String::new(),
                })
                .await
                .is_ok()
        {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "server did not start"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
