//! An in-memory fake of the Kubernetes API server, for reconcile tests and the benchmark.
//!
//! It understands what the reconciler sends: GET, POST, DELETE, server-side apply and JSON
//! merge patches (with resourceVersion preconditions) on single objects, and status
//! subresources. It records every request, can check them against an expected sequence,
//! and can fill the reconciler's watch caches from what it stores.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use http::{Method, Request, Response, StatusCode};
use kube::Client;
use kube::client::Body;
use kube::runtime::reflector::store::Writer;
use kube::runtime::watcher;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

use crate::controller::CacheWriters;

#[derive(Default)]
struct State {
    objects: BTreeMap<String, Value>,
    log: Vec<String>,
    version: u64,
    expected: VecDeque<String>,
    checking: bool,
    mismatches: Vec<String>,
}

/// The fake API server. Clones share state.
#[derive(Clone, Default)]
pub struct FakeApi {
    state: Arc<Mutex<State>>,
}

fn status(code: u16, reason: &str, message: &str) -> (u16, Value) {
    (
        code,
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
               "message": message, "reason": reason, "code": code}),
    )
}

/// RFC 7386 JSON merge patch.
fn merge_patch(target: &mut Value, patch: &Value) {
    match patch {
        Value::Object(p) => {
            if !target.is_object() {
                *target = json!({});
            }
            if let Value::Object(t) = target {
                for (k, v) in p {
                    if v.is_null() {
                        t.remove(k);
                    } else {
                        merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
                    }
                }
            }
        }
        other => *target = other.clone(),
    }
}

impl FakeApi {
    /// An empty fake.
    pub fn new() -> FakeApi {
        FakeApi::default()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A poisoned lock only means another test thread panicked; the data is still usable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A client whose requests this fake answers.
    pub fn client(&self) -> Client {
        let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let fake = self.clone();
        tokio::spawn(async move {
            while let Some((request, respond)) = handle.next_request().await {
                let (parts, body) = request.into_parts();
                let bytes = body.collect_bytes().await.unwrap_or_default();
                let content_type = parts
                    .headers
                    .get(http::header::CONTENT_TYPE)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .to_owned();
                let (code, value) =
                    fake.handle(&parts.method, parts.uri.path(), &content_type, &bytes);
                let mut response = Response::new(Body::from(value.to_string().into_bytes()));
                *response.status_mut() =
                    StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
                respond.send_response(response);
            }
        });
        Client::new(service, "default")
    }

    /// From now on, every request must match the next entry (`"METHOD /path"`, no query;
    /// a trailing `*` matches any suffix).
    pub fn expect(&self, requests: &[&str]) {
        let mut s = self.lock();
        s.checking = true;
        s.expected = requests.iter().map(|r| (*r).to_owned()).collect();
        s.mismatches.clear();
    }

    /// Checks that the requests since [`FakeApi::expect`] were exactly the expected ones.
    pub fn verify(&self) -> Result<(), String> {
        let mut s = self.lock();
        let mut problems = s.mismatches.clone();
        if !s.expected.is_empty() {
            problems.push(format!("expected but not received: {:?}", s.expected));
        }
        s.checking = false;
        s.expected.clear();
        s.mismatches.clear();
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems.join("\n"))
        }
    }

    /// Every request so far, as `"METHOD /path"`.
    pub fn log(&self) -> Vec<String> {
        self.lock().log.clone()
    }

    /// Forgets the request log.
    pub fn clear_log(&self) {
        self.lock().log.clear();
    }

    /// Requests other than GET so far.
    pub fn writes(&self) -> usize {
        self.lock()
            .log
            .iter()
            .filter(|l| !l.starts_with("GET "))
            .count()
    }

    /// The object stored at `path`.
    pub fn get(&self, path: &str) -> Option<Value> {
        self.lock().objects.get(path).cloned()
    }

    /// Stores `value` at `path` (as if another client had written it).
    pub fn put(&self, path: &str, mut value: Value) {
        let mut s = self.lock();
        s.version += 1;
        value["metadata"]["resourceVersion"] = json!(s.version.to_string());
        s.objects.insert(path.to_owned(), value);
    }

    /// Changes the object at `path` in place (as a controller or a person would).
    pub fn edit(&self, path: &str, f: impl FnOnce(&mut Value)) {
        let mut s = self.lock();
        s.version += 1;
        let version = s.version;
        if let Some(v) = s.objects.get_mut(path) {
            f(v);
            v["metadata"]["resourceVersion"] = json!(version.to_string());
        }
    }

    /// Removes the object at `path`.
    pub fn remove(&self, path: &str) {
        self.lock().objects.remove(path);
    }

    /// Finishes the deletion of namespace `ns`: it and everything in it disappear.
    pub fn finish_namespace_deletion(&self, ns: &str) {
        let inner = format!("/namespaces/{ns}/");
        let own = format!("/api/v1/namespaces/{ns}");
        self.lock()
            .objects
            .retain(|k, _| k != &own && !k.contains(&inner));
    }

    /// Stored objects of `kind`.
    pub fn objects_of_kind(&self, kind: &str) -> Vec<Value> {
        self.lock()
            .objects
            .values()
            .filter(|v| v["kind"] == kind)
            .cloned()
            .collect()
    }

    /// Lists every stored object into the caches, as a fresh watch would.
    pub fn sync_caches(&self, w: &mut CacheWriters) {
        fn fill<K>(fake: &FakeApi, writer: &mut Writer<K>, kind: &str)
        where
            K: kube::Resource<DynamicType = ()> + Clone + DeserializeOwned,
        {
            writer.apply_watcher_event(&watcher::Event::Init);
            for v in fake.objects_of_kind(kind) {
                if let Ok(obj) = serde_json::from_value::<K>(v) {
                    writer.apply_watcher_event(&watcher::Event::InitApply(obj));
                }
            }
            writer.apply_watcher_event(&watcher::Event::InitDone);
        }
        fill(self, &mut w.namespaces, "Namespace");
        fill(self, &mut w.policies, "NetworkPolicy");
        fill(self, &mut w.quotas, "ResourceQuota");
        fill(self, &mut w.limit_ranges, "LimitRange");
        fill(self, &mut w.service_accounts, "ServiceAccount");
        fill(self, &mut w.secrets, "Secret");
        fill(self, &mut w.config_maps, "ConfigMap");
        fill(self, &mut w.pvcs, "PersistentVolumeClaim");
        fill(self, &mut w.deployments, "Deployment");
        fill(self, &mut w.services, "Service");
        fill(self, &mut w.storage_classes, "StorageClass");
    }

    /// Answers one request.
    pub fn handle(
        &self,
        method: &Method,
        path: &str,
        content_type: &str,
        body: &[u8],
    ) -> (u16, Value) {
        let mut s = self.lock();
        let line = format!("{method} {path}");
        s.log.push(line.clone());
        if s.checking {
            match s.expected.pop_front() {
                Some(want)
                    if want == line
                        || want
                            .strip_suffix('*')
                            .is_some_and(|pre| line.starts_with(pre)) => {}
                Some(want) => s.mismatches.push(format!("expected {want}, got {line}")),
                None => s.mismatches.push(format!("unexpected {line}")),
            }
        }
        let body: Value = if body.is_empty() {
            Value::Null
        } else {
            match serde_json::from_slice(body) {
                Ok(v) => v,
                Err(_) => return status(400, "BadRequest", "body is not JSON"),
            }
        };
        s.version += 1;
        let version = s.version.to_string();
        let (key, subresource) = match path.strip_suffix("/status") {
            Some(k) if s.objects.contains_key(k) => (k.to_owned(), true),
            _ => (path.to_owned(), false),
        };
        match *method {
            Method::GET => match s.objects.get(&key) {
                Some(v) => (200, v.clone()),
                None => status(404, "NotFound", &format!("{key} not found")),
            },
            Method::POST => {
                let Some(name) = body["metadata"]["name"].as_str() else {
                    return status(422, "Invalid", "metadata.name is required");
                };
                let key = format!("{path}/{name}");
                if s.objects.contains_key(&key) {
                    return status(409, "AlreadyExists", &format!("{key} already exists"));
                }
                let mut obj = body.clone();
                obj["metadata"]["uid"] = json!(format!("uid-{version}"));
                obj["metadata"]["resourceVersion"] = json!(version);
                s.objects.insert(key, obj.clone());
                (201, obj)
            }
            Method::PUT => {
                let Some(current) = s.objects.get(&key) else {
                    return status(404, "NotFound", &format!("{key} not found"));
                };
                if body["metadata"]["resourceVersion"] != current["metadata"]["resourceVersion"] {
                    return status(409, "Conflict", "the object has been modified");
                }
                let mut obj = body.clone();
                obj["metadata"]["resourceVersion"] = json!(version);
                s.objects.insert(key, obj.clone());
                (200, obj)
            }
            Method::DELETE => {
                let Some(current) = s.objects.get(&key).cloned() else {
                    return status(404, "NotFound", &format!("{key} not found"));
                };
                if current["kind"] == "Namespace" {
                    // Namespaces terminate first; see finish_namespace_deletion.
                    let mut obj = current;
                    obj["metadata"]["deletionTimestamp"] = json!("2026-01-01T00:00:00Z");
                    obj["status"] = json!({"phase": "Terminating"});
                    s.objects.insert(key, obj.clone());
                    return (200, obj);
                }
                s.objects.remove(&key);
                (
                    200,
                    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success"}),
                )
            }
            Method::PATCH => {
                let apply = content_type.starts_with("application/apply-patch");
                let current = s.objects.get(&key).cloned();
                let obj = match (apply, current, subresource) {
                    (_, None, true) | (false, None, false) => {
                        return status(404, "NotFound", &format!("{key} not found"));
                    }
                    (_, Some(mut obj), true) => {
                        obj["status"] = body["status"].clone();
                        obj
                    }
                    (true, None, false) => {
                        let mut obj = body.clone();
                        obj["metadata"]["uid"] = json!(format!("uid-{version}"));
                        obj["metadata"]["generation"] = json!(1);
                        obj["metadata"]["creationTimestamp"] = json!("2026-01-01T00:00:00Z");
                        if obj["kind"] == "Namespace" {
                            obj["status"] = json!({"phase": "Active"});
                        }
                        obj
                    }
                    (true, Some(mut obj), false) => {
                        let before = obj.clone();
                        if let Value::Object(fields) = &body {
                            for (k, v) in fields {
                                if k == "metadata" {
                                    for m in ["labels", "annotations", "ownerReferences"] {
                                        if !v[m].is_null() {
                                            obj["metadata"][m] = v[m].clone();
                                        }
                                    }
                                } else if k != "status" {
                                    obj[k] = v.clone();
                                }
                            }
                        }
                        if before["spec"] != obj["spec"] {
                            let g = obj["metadata"]["generation"].as_i64().unwrap_or(0);
                            obj["metadata"]["generation"] = json!(g + 1);
                        }
                        obj
                    }
                    (false, Some(mut obj), false) => {
                        let want = &body["metadata"]["resourceVersion"];
                        if !want.is_null() && *want != obj["metadata"]["resourceVersion"] {
                            return status(409, "Conflict", "the object has been modified");
                        }
                        let mut patch = body.clone();
                        if let Some(m) = patch["metadata"].as_object_mut() {
                            m.remove("resourceVersion");
                        }
                        merge_patch(&mut obj, &patch);
                        obj
                    }
                };
                let mut obj = obj;
                obj["metadata"]["resourceVersion"] = json!(version);
                let released = !obj["metadata"]["deletionTimestamp"].is_null()
                    && obj["metadata"]["finalizers"]
                        .as_array()
                        .is_none_or(|f| f.is_empty());
                if released {
                    // The last finalizer is gone: the API server deletes the object.
                    s.objects.remove(&key);
                } else {
                    s.objects.insert(key, obj.clone());
                }
                (200, obj)
            }
            _ => status(405, "MethodNotAllowed", "unsupported"),
        }
    }
}
