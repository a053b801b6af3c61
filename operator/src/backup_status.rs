//! The newest backup a tenant's runtime reports: its `/metrics` (public numbers, no
//! token needed) over HTTPS to the in-cluster Service, verified against the operator CA
//! that issued the runtime's certificate; the control plane namespace may reach the
//! runtime port (the tenant's ingress policy).

use std::sync::Arc;
use std::time::Duration;

use jiff::Timestamp;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// The metric the runtime sets after each backup (Unix seconds; 0 before the first).
pub const METRIC: &str = "tenant_runtime_last_backup_timestamp_seconds";
/// How long one scrape may take.
pub const TIMEOUT: Duration = Duration::from_secs(3);
/// The most of a response read.
const MAX_RESPONSE: u64 = 1024 * 1024;

/// The newest backup's time from a Prometheus text exposition: `None` when the runtime
/// has taken none yet (0), `Err` when the metric is missing or not a number.
pub fn parse_last_backup(exposition: &str) -> Result<Option<Timestamp>, String> {
    let value = exposition
        .lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| {
            let (name, value) = l.rsplit_once(' ')?;
            (name.trim() == METRIC).then(|| value.trim().to_owned())
        })
        .ok_or_else(|| format!("the runtime's /metrics has no {METRIC}"))?;
    let seconds: f64 = value
        .parse()
        .map_err(|_| format!("{METRIC} is not a number: {value:?}"))?;
    if seconds <= 0.0 {
        return Ok(None);
    }
    #[allow(clippy::cast_possible_truncation)] // Unix seconds of a real time fit an i64
    Timestamp::from_second(seconds as i64)
        .map(Some)
        .map_err(|e| format!("{METRIC} is out of range: {e}"))
}

/// GETs `https://<host>:<port>/metrics`, trusting only `ca_pem`, within [`TIMEOUT`], and
/// reads the newest backup from it.
pub async fn scrape(host: &str, port: u16, ca_pem: &str) -> Result<Option<Timestamp>, String> {
    scrape_exposition(host, port, ca_pem)
        .await
        .and_then(|body| parse_last_backup(&body))
}

/// GETs `https://<host>:<port>/metrics`, trusting only `ca_pem`, within [`TIMEOUT`]: the
/// whole exposition.
pub async fn scrape_exposition(host: &str, port: u16, ca_pem: &str) -> Result<String, String> {
    tokio::time::timeout(TIMEOUT, get_metrics(host, port, ca_pem))
        .await
        .map_err(|_| format!("no answer from {host}:{port} within {TIMEOUT:?}"))?
}

/// Whether the runtime reports that every data key is wrapped by the key-encryption key
/// `kek_id` (its `kek_info` names it and none is wrapped by another): a rotation to it is
/// complete, and the previous key is no longer needed.
pub fn rotation_complete(exposition: &str, kek_id: &str) -> bool {
    let value = |name: &str| {
        exposition
            .lines()
            .filter(|l| !l.starts_with('#'))
            .find_map(|l| {
                let (n, v) = l.rsplit_once(' ')?;
                (n.trim() == name).then(|| v.trim().parse::<f64>().ok())?
            })
    };
    value(&format!("tenant_runtime_kek_info{{kek_id=\"{kek_id}\"}}")) == Some(1.0)
        && value("tenant_runtime_data_keys_wrapped_by_other_kek") == Some(0.0)
}

async fn get_metrics(host: &str, port: u16, ca_pem: &str) -> Result<String, String> {
    let config = tenantry_pki::client_config(ca_pem).map_err(|e| e.to_string())?;
    let name = ServerName::try_from(host.to_owned()).map_err(|e| e.to_string())?;
    let tcp = tokio::net::TcpStream::connect((host, port))
        .await
        .map_err(|e| format!("cannot connect to {host}:{port}: {e}"))?;
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .map_err(|e| format!("TLS with {host}:{port} failed: {e}"))?;
    tls.write_all(
        format!("GET /metrics HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .map_err(|e| format!("writing to {host}:{port}: {e}"))?;
    let mut response = Vec::new();
    let _ = (&mut tls)
        .take(MAX_RESPONSE)
        .read_to_end(&mut response)
        .await
        .map_err(|e| format!("reading from {host}:{port}: {e}"))?;
    let text = String::from_utf8_lossy(&response);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("{host}:{port} sent no HTTP response"))?;
    let status = head.lines().next().unwrap_or_default();
    if !status.contains(" 200 ") {
        return Err(format!("{host}:{port}/metrics answered {status:?}"));
    }
    if head.lines().any(|l| {
        l.to_ascii_lowercase()
            .starts_with("transfer-encoding: chunked")
    }) {
        return Err(format!("{host}:{port}/metrics sent a chunked body"));
    }
    Ok(body.to_owned())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_rotation_is_complete_when_the_new_kek_wraps_everything() {
        let text = "tenant_runtime_kek_info{kek_id=\"aa11\"} 1\n\
                    tenant_runtime_data_keys_wrapped_by_other_kek 0\n";
        assert!(rotation_complete(text, "aa11"));
        assert!(!rotation_complete(text, "bb22"));
        let pending = text.replace("kek 0", "kek 3");
        assert!(!rotation_complete(&pending, "aa11"));
        assert!(!rotation_complete(
            "tenant_runtime_data_keys_wrapped_by_other_kek 0\n",
            "aa11"
        ));
    }

    #[test]
    fn the_metric_reads_as_a_time_and_zero_as_none() {
        let text = "# HELP x\n# TYPE tenant_runtime_last_backup_timestamp_seconds gauge\n\
                    tenant_runtime_last_backup_timestamp_seconds 1764460800\n\
                    tenant_runtime_backups_total 3\n";
        assert_eq!(
            parse_last_backup(text).unwrap(),
            Some(Timestamp::from_second(1_764_460_800).unwrap())
        );
        assert_eq!(
            parse_last_backup("tenant_runtime_last_backup_timestamp_seconds 0\n").unwrap(),
            None
        );
        assert!(parse_last_backup("tenant_runtime_backups_total 3\n").is_err());
        assert!(parse_last_backup("tenant_runtime_last_backup_timestamp_seconds x\n").is_err());
    }
}
