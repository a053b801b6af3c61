//! A full disk, with the real `tenant-runtime` binary: its data directory is a small tmpfs
//! this test mounts (skipped, saying why, where mounting is not permitted). Once the disk
//! is full, writes answer 507 with a clear error and write nothing, reads still work, and
//! writes work again as soon as space is freed; after a restart every record reads back
//! intact and SQLite's integrity check passes.

use std::io::Write as _;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::json;
use tenantry_test_support::{Https, free_port};

use crate::common::{self, Options};

/// Unmounts the tmpfs when the test ends, however it ends.
struct Mount(std::path::PathBuf);

impl Mount {
    /// Mounts a tmpfs of `size` at `dir`; `Err` says why not (no permission, no tool).
    fn tmpfs(dir: &Path, size: &str) -> Result<Mount, String> {
        std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
        let out = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(dir)
            .output()
            .map_err(|e| format!("cannot run mount: {e}"))?;
        if out.status.success() {
            Ok(Mount(dir.to_owned()))
        } else {
            Err(String::from_utf8_lossy(&out.stderr).trim().to_owned())
        }
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// The real binary on `port`, logging to `log`; killed on drop.
struct Runtime(std::process::Child);

impl Runtime {
    async fn start(config: &Path, log: &Path, https: &Https, port: u16) -> Runtime {
        let child = Command::new(env!("CARGO_BIN_EXE_tenant-runtime"))
            .arg("--config")
            .arg(config)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log).unwrap())
            .spawn()
            .unwrap();
        let runtime = Runtime(child);
        for _ in 0..200 {
            if let Ok(mut conn) = https
                .connect(&format!("127.0.0.1:{port}"), "localhost")
                .await
                && conn
                    .send("GET", "/healthz", None, None, Vec::new())
                    .await
                    .is_ok()
            {
                return runtime;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!(
            "tenant-runtime did not start: {}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
    }

    fn stop(mut self) {
        let pid = self.0.id().to_string();
        Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        let status = self.0.wait().unwrap();
        assert!(status.success(), "tenant-runtime exited with {status}");
    }
}

impl Drop for Runtime {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Fills the file system holding `dir` with one file; returns its path.
fn fill(dir: &Path) -> std::path::PathBuf {
    let path = dir.join("filler");
    let mut file = std::fs::File::create(&path).unwrap();
    let chunk = vec![0x5a_u8; 64 * 1024];
    loop {
        match file.write_all(&chunk) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(28) => break,
            Err(e) => panic!("filling the disk: {e}"),
        }
    }
    // Small writes fill what the last chunk could not.
    while file.write_all(&[0x5a]).is_ok() {}
    path
}

fn execution(i: usize, fat: usize) -> serde_json::Value {
    json!({
        "workflow_id": format!("wf-{i}"), "status": "success",
        // Now, so that the retention pruner (14 days by default) keeps it.
        "started_at": jiff::Timestamp::now().to_string(),
        "data": {"i": i, "blob": "x".repeat(fat)},
    })
}

#[tokio::test]
async fn a_full_disk_refuses_writes_keeps_reads_and_recovers() {
    let prepared = common::prepare(&Options::default());
    let root = prepared.dir.path();
    let data_dir = root.join("data");
    let _mount = match Mount::tmpfs(&data_dir, "8m") {
        Ok(m) => m,
        Err(why) => {
            eprintln!("skipped: cannot mount a tmpfs for the data directory ({why})");
            return;
        }
    };
    let port = free_port();
    let config = std::fs::read_to_string(&prepared.config_path)
        .unwrap()
        .replace("127.0.0.1:0", &format!("127.0.0.1:{port}"));
    std::fs::write(&prepared.config_path, config).unwrap();
    let https = Https::new(&prepared.ca.pem());
    let log = root.join("runtime.log");
    let runtime = Runtime::start(&prepared.config_path, &log, &https, port).await;
    let addr = format!("127.0.0.1:{port}");
    let token = prepared
        .signer
        .issue(
            "acme",
            "user-1",
            jiff::Timestamp::now(),
            Duration::from_secs(600),
        )
        .unwrap()
        .0;
    let call = async |method: &str, path: &str, body: Option<serde_json::Value>| {
        let mut conn = https.connect(&addr, "localhost").await.unwrap();
        let (content_type, bytes) = match body {
            Some(v) => (Some("application/json"), serde_json::to_vec(&v).unwrap()),
            None => (None, Vec::new()),
        };
        conn.send(method, path, Some(&token), content_type, bytes)
            .await
            .unwrap()
    };

    let mut stored = Vec::new();
    for i in 0..5 {
        let r = call("POST", "/v1/executions", Some(execution(i, 20_000))).await;
        assert_eq!(r.status, 201, "{}", r.text);
        stored.push((r.json["id"].as_str().unwrap().to_owned(), i));
    }

    let filler = fill(&data_dir);
    let mut refused = 0;
    for i in 100..110 {
        let r = call("POST", "/v1/executions", Some(execution(i, 200_000))).await;
        assert_eq!(r.status, 507, "a write on a full disk: {}", r.text);
        assert_eq!(r.json["error"], "insufficient_storage", "{}", r.text);
        assert!(
            r.json["message"]
                .as_str()
                .unwrap()
                .contains("storage is full"),
            "{}",
            r.text
        );
        refused += 1;
    }
    let r = call(
        "POST",
        "/v1/credentials",
        Some(json!({"name": "crm", "kind": "api_key", "secret": {"k": "x".repeat(100_000)}})),
    )
    .await;
    assert_eq!(r.status, 507, "{}", r.text);
    eprintln!("{refused} execution writes and 1 credential write refused with 507");

    // Reads go on while the disk is full.
    for (id, i) in &stored {
        let r = call("GET", &format!("/v1/executions/{id}"), None).await;
        assert_eq!(r.status, 200, "{}", r.text);
        assert_eq!(r.json["data"]["i"], *i);
    }
    let r = call("GET", "/v1/executions?limit=100", None).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.json["items"].as_array().unwrap().len(), stored.len());

    // Space freed: writes work again, without a restart.
    std::fs::remove_file(filler).unwrap();
    let r = call("POST", "/v1/executions", Some(execution(5, 20_000))).await;
    assert_eq!(r.status, 201, "after freeing space: {}", r.text);
    stored.push((r.json["id"].as_str().unwrap().to_owned(), 5));
    let r = call(
        "POST",
        "/v1/credentials",
        Some(json!({"name": "crm", "kind": "api_key", "secret": {"k": "v"}})),
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.text);

    // Nothing corrupted: after a restart every record reads back, and SQLite agrees.
    runtime.stop();
    let runtime = Runtime::start(&prepared.config_path, &log, &https, port).await;
    let r = call("GET", "/v1/executions?limit=100", None).await;
    assert_eq!(r.json["items"].as_array().unwrap().len(), stored.len());
    for (id, i) in &stored {
        let r = call("GET", &format!("/v1/executions/{id}"), None).await;
        assert_eq!(r.status, 200, "{}", r.text);
        assert_eq!(r.json["data"]["i"], *i);
        assert_eq!(r.json["data"]["blob"].as_str().unwrap().len(), 20_000);
    }
    let r = call("GET", "/v1/credentials", None).await;
    assert_eq!(r.json["items"].as_array().unwrap().len(), 1, "{}", r.text);
    runtime.stop();
    let check = Command::new("sqlite3")
        .arg(data_dir.join(tenant_runtime::store::DB_FILE))
        .arg("PRAGMA integrity_check")
        .output();
    match check {
        Ok(out) if out.status.success() => {
            assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "ok");
        }
        _ => eprintln!("sqlite3 not installed: integrity shown by the reads above only"),
    }
}
