//! Retention: the pruner deletes exactly the executions past `max_age_hours` (aged from
//! `finished_at`, or `started_at` while unfinished) and beyond the newest `max_count`,
//! right after a policy change in the config file and on its interval, in batches; counts
//! go to `/metrics`.

use std::collections::BTreeSet;
use std::time::Duration;

use jiff::{SignedDuration, Timestamp};
use serde_json::json;
use tenantry_proto::retention::RetentionPolicy;
use tenantry_test_support::eventually;

use crate::common::{Instance, Options, POLL, metric};

fn ago(hours: f64) -> String {
    let d = SignedDuration::from_secs_f64(hours * 3600.0);
    Timestamp::now().checked_sub(d).unwrap().to_string()
}

async fn add(app: &Instance, name: &str, started: String, finished: Option<String>) {
    let r = app
        .call(
            "POST",
            "/v1/executions",
            Some(json!({
                "workflow_id": name, "status": "success",
                "started_at": started, "finished_at": finished, "data": {"name": name},
            })),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.text);
}

async fn names(app: &Instance) -> BTreeSet<String> {
    let r = app.call("GET", "/v1/executions?limit=500", None).await;
    assert_eq!(r.status, 200);
    r.json["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["workflow_id"].as_str().unwrap().to_owned())
        .collect()
}

fn set(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| (*s).to_owned()).collect()
}

#[tokio::test]
async fn policy_changes_prune_exactly_the_expired_and_the_excess() {
    let app = Instance::start_with(Options {
        retention: RetentionPolicy {
            max_age_hours: 720,
            max_count: 1_000_000,
        },
        // Small batches, so the age pass needs several of them.
        prune_batch_size: 2,
        ..Options::default()
    })
    .await;
    add(&app, "old-finished", ago(50.0), Some(ago(49.0))).await;
    add(&app, "old-running", ago(30.0), None).await;
    add(
        &app,
        "started-old-finished-recently",
        ago(30.0),
        Some(ago(1.0)),
    )
    .await;
    add(&app, "recent", ago(10.0), Some(ago(9.0))).await;
    add(&app, "running", ago(2.0), None).await;
    for i in 0..5 {
        add(
            &app,
            &format!("ancient-{i}"),
            ago(100.0 + f64::from(i)),
            Some(ago(99.0)),
        )
        .await;
    }
    assert_eq!(names(&app).await.len(), 10);

    app.set_retention(RetentionPolicy {
        max_age_hours: 24,
        max_count: 1_000_000,
    });
    let expected = set(&["started-old-finished-recently", "recent", "running"]);
    assert!(
        eventually(Duration::from_secs(10), POLL, || async {
            names(&app).await == expected
        })
        .await,
        "left: {:?}",
        names(&app).await
    );

    // Keep only the newest two by start time.
    app.set_retention(RetentionPolicy {
        max_age_hours: 24,
        max_count: 2,
    });
    let expected = set(&["recent", "running"]);
    assert!(
        eventually(Duration::from_secs(10), POLL, || async {
            names(&app).await == expected
        })
        .await,
        "left: {:?}",
        names(&app).await
    );

    let exposition = app.call_as("GET", "/metrics", None, None).await.text;
    assert_eq!(
        metric(&exposition, &["pruned_executions_total", "reason=\"age\""]),
        7.0,
        "{exposition}"
    );
    assert_eq!(
        metric(
            &exposition,
            &["pruned_executions_total", "reason=\"count\""]
        ),
        1.0,
        "{exposition}"
    );
    assert!(
        metric(&exposition, &["tenant_runtime_prune_runs_total"]) >= 3.0,
        "{exposition}"
    );
    assert_eq!(
        metric(&exposition, &["tenant_runtime_stored_executions "]),
        2.0,
        "{exposition}"
    );

    // An invalid policy is refused and the running one kept.
    std::fs::write(&app.config_path, "tenant_id: acme\nretention: nonsense\n").unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    add(&app, "newest", ago(0.5), None).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        names(&app).await.len(),
        3,
        "nothing pruned without a valid policy change"
    );
    app.stop().await.unwrap();
}

#[tokio::test]
async fn the_interval_prunes_what_expires_while_running() {
    let app = Instance::start_with(Options {
        retention: RetentionPolicy {
            max_age_hours: 1,
            max_count: 1000,
        },
        prune_interval: Duration::from_millis(200),
        ..Options::default()
    })
    .await;
    // Expires about 1.5 s from now, with no policy change to trigger a prune.
    let almost = Timestamp::now()
        .checked_sub(SignedDuration::from_secs(3600) - SignedDuration::from_millis(1500))
        .unwrap()
        .to_string();
    add(&app, "about-to-expire", ago(2.0), Some(almost)).await;
    add(&app, "fresh", ago(0.1), None).await;
    assert_eq!(names(&app).await, set(&["about-to-expire", "fresh"]));
    assert!(
        eventually(Duration::from_secs(10), POLL, || async {
            names(&app).await == set(&["fresh"])
        })
        .await,
        "left: {:?}",
        names(&app).await
    );
    app.stop().await.unwrap();
}
