//! An in-memory fake of the Kubernetes API server, for reconcile tests and the benchmark.
//!
//! It understands what the reconciler and the API's provisioner send: GET, POST, DELETE,
//! server-side apply and JSON merge patches (with resourceVersion preconditions) on single
//! objects, status subresources, and LIST and WATCH of collections (with equality label
//! selectors and `metadata.name` field selectors). It records every request, can check them
//! against an expected sequence, and can fill the reconciler's watch caches from what it
//! stores. Like the real API server, DELETE of an object with finalizers only marks it.

use std::collections::{BTreeMap, VecDeque};
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use futures::{Stream, StreamExt};
use http::{Method, Request, Response, StatusCode};
use http_body::Frame;
use http_body_util::StreamBody;
use k8s_openapi::api::rbac::v1::PolicyRule;
use kube::Client;
use kube::client::Body;
use kube::runtime::watcher;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use tokio::sync::watch;

use crate::cache::{Cache, Caches};

/// One change, as a watch reports it.
struct Change {
    version: u64,
    kind: &'static str,
    key: String,
    object: Value,
}

#[derive(Default)]
struct State {
    objects: BTreeMap<String, Value>,
    changes: Vec<Change>,
    log: Vec<String>,
    version: u64,
    expected: VecDeque<String>,
    checking: bool,
    mismatches: Vec<String>,
    failing_writes: Option<u16>,
    unserved: Vec<String>,
    accesses: Vec<Access>,
    defaulting: Option<Defaulting>,
    list_delay: Option<(String, std::time::Duration)>,
    hanging: Vec<String>,
}

/// What the fake does to every object written, as an API server's defaulting and
/// normalisation would.
type Defaulting = Arc<dyn Fn(&mut Value) + Send + Sync>;

impl State {
    fn log_request(&mut self, line: String) {
        self.accesses.extend(Access::of(&line));
        self.log.push(line);
    }

    fn record(&mut self, kind: &'static str, key: &str, object: &Value) {
        self.changes.push(Change {
            version: self.version,
            kind,
            key: key.to_owned(),
            object: object.clone(),
        });
    }
}

/// The fake API server. Clones share state.
#[derive(Clone)]
pub struct FakeApi {
    state: Arc<Mutex<State>>,
    // Bumped after every change, to wake open watches.
    ticks: Arc<watch::Sender<u64>>,
}

impl Default for FakeApi {
    fn default() -> Self {
        FakeApi {
            state: Arc::default(),
            ticks: Arc::new(watch::Sender::new(0)),
        }
    }
}

type Chunks = Pin<Box<dyn Stream<Item = Result<Frame<Bytes>, Infallible>> + Send>>;
/// Response bodies: whole for most answers, a never-ending stream for watches.
type FakeBody = StreamBody<Chunks>;

fn whole(value: &Value) -> FakeBody {
    let bytes = Bytes::from(value.to_string().into_bytes());
    StreamBody::new(futures::stream::once(async move { Ok(Frame::data(bytes)) }).boxed())
}

/// Where a request path points: `/api/v1` or `/apis/<group>/<version>`, then
/// `[namespaces/<ns>/]<resource>[/<name>[/<subresource>]]`.
#[derive(Debug, PartialEq, Eq)]
struct Location {
    base: String,
    namespace: Option<String>,
    resource: String,
    name: Option<String>,
    subresource: Option<String>,
}

fn locate(path: &str) -> Option<Location> {
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let (base, rest) = match parts.as_slice() {
        ["api", v, rest @ ..] => (format!("/api/{v}"), rest),
        ["apis", g, v, rest @ ..] => (format!("/apis/{g}/{v}"), rest),
        _ => return None,
    };
    let (namespace, rest) = match rest {
        ["namespaces", ns, rest @ ..] if !rest.is_empty() => (Some((*ns).to_owned()), rest),
        _ => (None, rest),
    };
    let owned = |s: &&str| (*s).to_owned();
    match rest {
        [resource, more @ ..] if more.len() <= 2 => Some(Location {
            base,
            namespace,
            resource: (*resource).to_owned(),
            name: more.first().map(owned),
            subresource: more.get(1).map(owned),
        }),
        _ => None,
    }
}

/// Decodes `%XX` escapes (selectors arrive URL-encoded).
fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(b)) => {
                out.push(b);
                i += 3;
            }
            (b'+', _) => {
                out.push(b' ');
                i += 1;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The parameters of a collection read.
#[derive(Debug, Default)]
struct Query {
    watch: bool,
    dry_run: bool,
    resource_version: u64,
    labels: Vec<(String, Option<String>)>,
    name: Option<String>,
}

impl Query {
    fn parse(query: &str) -> Query {
        let mut q = Query::default();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let v = percent_decode(v);
            match k {
                "watch" => q.watch = v == "true" || v == "1",
                "dryRun" => q.dry_run = v == "All",
                "resourceVersion" => q.resource_version = v.parse().unwrap_or(0),
                "labelSelector" => {
                    q.labels = v
                        .split(',')
                        .filter(|t| !t.is_empty())
                        .map(|t| match t.split_once('=') {
                            Some((k, v)) => {
                                (k.trim_end_matches('=').to_owned(), Some(v.to_owned()))
                            }
                            None => (t.to_owned(), None),
                        })
                        .collect();
                }
                "fieldSelector" => {
                    q.name = v.strip_prefix("metadata.name=").map(str::to_owned);
                }
                _ => {}
            }
        }
        q
    }

    /// Whether the object stored at `key` belongs to the collection at `list` and matches.
    fn selects(&self, list: &Location, key: &str, object: &Value) -> bool {
        let Some(at) = locate(key) else { return false };
        let in_collection = at.base == list.base
            && at.resource == list.resource
            && at.name.is_some()
            && at.subresource.is_none()
            && (list.namespace.is_none() || list.namespace == at.namespace);
        let labels = &object["metadata"]["labels"];
        in_collection
            && self
                .name
                .as_deref()
                .is_none_or(|n| at.name.as_deref() == Some(n))
            && self.labels.iter().all(|(k, v)| match v {
                Some(v) => labels[k].as_str() == Some(v),
                None => !labels[k].is_null(),
            })
    }
}

fn status(code: u16, reason: &str, message: &str) -> (u16, Value) {
    (
        code,
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
               "message": message, "reason": reason, "code": code}),
    )
}

/// One request as RBAC sees it: verb, API group, resource (with `/subresource`),
/// namespace and object name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Access {
    /// `get`, `list`, `watch`, `create`, `update`, `patch` or `delete`.
    pub verb: String,
    /// API group; empty for the core group.
    pub group: String,
    /// Resource, e.g. `tenants/status`.
    pub resource: String,
    /// Namespace of a namespaced request.
    pub namespace: Option<String>,
    /// Object name, when the request names one.
    pub name: Option<String>,
}

impl Access {
    /// The access of a log line (`"METHOD /path"`).
    fn of(line: &str) -> Option<Access> {
        let (method, path) = line.split_once(' ')?;
        let at = locate(path)?;
        let verb = match method {
            "GET" => "get",
            "LIST" => "list",
            "WATCH" => "watch",
            "POST" => "create",
            "PUT" => "update",
            "PATCH" => "patch",
            "DELETE" => "delete",
            _ => return None,
        };
        let group = at
            .base
            .strip_prefix("/apis/")
            .and_then(|gv| gv.split('/').next())
            .unwrap_or("")
            .to_owned();
        let resource = match &at.subresource {
            Some(sub) => format!("{}/{sub}", at.resource),
            None => at.resource.clone(),
        };
        Some(Access {
            verb: verb.to_owned(),
            group,
            resource,
            namespace: at.namespace,
            name: at.name,
        })
    }

    /// Whether one of `rules` allows this access.
    pub fn allowed_by(&self, rules: &[PolicyRule]) -> bool {
        let has = |list: &Option<Vec<String>>, want: &str| {
            list.as_ref()
                .is_some_and(|l| l.iter().any(|x| x == want || x == "*"))
        };
        rules.iter().any(|r| {
            has(&r.api_groups, &self.group)
                && has(&r.resources, &self.resource)
                && r.verbs.iter().any(|v| *v == self.verb || v == "*")
                && match &r.resource_names {
                    Some(names) if !names.is_empty() => {
                        self.name.as_ref().is_some_and(|n| names.contains(n))
                    }
                    _ => true,
                }
        })
    }
}

/// Every (group, resource, verb) that `rules` grant and no access in `accesses` used:
/// rights a least-privilege role should not have.
pub fn unused_grants(rules: &[PolicyRule], accesses: &[Access]) -> Vec<String> {
    let mut unused = Vec::new();
    for rule in rules {
        for group in rule.api_groups.iter().flatten() {
            for resource in rule.resources.iter().flatten() {
                for verb in &rule.verbs {
                    let used = accesses.iter().any(|a| {
                        a.group == *group
                            && a.resource == *resource
                            && a.verb == *verb
                            && a.allowed_by(std::slice::from_ref(rule))
                    });
                    if !used {
                        unused.push(format!("{verb} {group}/{resource}"));
                    }
                }
            }
        }
    }
    unused
}

/// Whether `obj` is being deleted and has no finalizer left, so the API server removes it.
fn released(obj: &Value) -> bool {
    !obj["metadata"]["deletionTimestamp"].is_null()
        && obj["metadata"]["finalizers"]
            .as_array()
            .is_none_or(|f| f.is_empty())
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
        let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<FakeBody>>();
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
                let path = parts.uri.path().to_owned();
                let query = Query::parse(parts.uri.query().unwrap_or(""));
                let collection = locate(&path).filter(|l| l.name.is_none());
                if fake.hangs(&path) {
                    // Never answered, like a request to an API server that stopped
                    // responding; the client sees it pending until it gives up.
                    tokio::spawn(async move {
                        let _respond = respond;
                        std::future::pending::<()>().await;
                    });
                    continue;
                }
                if !query.watch
                    && collection.is_some()
                    && let Some(delay) = fake.list_delay(&path)
                {
                    tokio::time::sleep(delay).await;
                }
                let (code, body) = match collection {
                    Some(list) if parts.method == Method::GET => {
                        fake.read_collection(&path, &list, query)
                    }
                    _ => {
                        let (code, value) =
                            fake.handle(&parts.method, &path, query.dry_run, &content_type, &bytes);
                        (code, whole(&value))
                    }
                };
                fake.ticks.send_modify(|t| *t += 1);
                let mut response = Response::new(body);
                *response.status_mut() =
                    StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
                respond.send_response(response);
            }
        });
        Client::new(service, "default")
    }

    /// Answers a LIST, or opens a WATCH that streams every later change to the collection.
    fn read_collection(&self, path: &str, list: &Location, query: Query) -> (u16, FakeBody) {
        let mut s = self.lock();
        let verb = if query.watch { "WATCH" } else { "LIST" };
        s.log_request(format!("{verb} {path}"));
        if let Some(prefix) = s.unserved.iter().find(|p| path.starts_with(p.as_str())) {
            let (code, value) = status(
                404,
                "NotFound",
                &format!("the server could not find the requested resource ({prefix})"),
            );
            return (code, whole(&value));
        }
        if !query.watch {
            let items: Vec<Value> = s
                .objects
                .iter()
                .filter(|(k, v)| query.selects(list, k, v))
                .map(|(_, v)| v.clone())
                .collect();
            let list = json!({"kind": "List", "apiVersion": "v1",
                "metadata": {"resourceVersion": s.version.to_string()}, "items": items});
            return (200, whole(&list));
        }
        let list = Location {
            base: list.base.clone(),
            namespace: list.namespace.clone(),
            resource: list.resource.clone(),
            name: None,
            subresource: None,
        };
        let fake = self.clone();
        let ticks = self.ticks.subscribe();
        let after = query.resource_version;
        let events = futures::stream::unfold(
            (fake, ticks, after, list, query),
            |(fake, mut ticks, mut after, list, query)| async move {
                loop {
                    ticks.borrow_and_update();
                    let chunk: Vec<u8> = {
                        let s = fake.lock();
                        let mut out = Vec::new();
                        let since = after;
                        for c in s.changes.iter().filter(|c| c.version > since) {
                            after = c.version;
                            if query.selects(&list, &c.key, &c.object) {
                                out.extend(
                                    json!({"type": c.kind, "object": c.object})
                                        .to_string()
                                        .into_bytes(),
                                );
                                out.push(b'\n');
                            }
                        }
                        out
                    };
                    if !chunk.is_empty() {
                        let frame: Result<Frame<Bytes>, Infallible> =
                            Ok(Frame::data(Bytes::from(chunk)));
                        return Some((frame, (fake, ticks, after, list, query)));
                    }
                    if ticks.changed().await.is_err() {
                        return None;
                    }
                }
            },
        );
        (200, StreamBody::new(events.boxed()))
    }

    /// From now on every object written passes through `f`, as the real API server's
    /// defaulting and quantity normalisation would change it.
    pub fn set_defaulting(&self, f: impl Fn(&mut Value) + Send + Sync + 'static) {
        self.lock().defaulting = Some(Arc::new(f));
    }

    /// Delays the answer to every LIST under `prefix` by `delay`, as a slow first list of a
    /// large collection would.
    pub fn delay_lists(&self, prefix: &str, delay: std::time::Duration) {
        self.lock().list_delay = Some((prefix.to_owned(), delay));
    }

    fn list_delay(&self, path: &str) -> Option<std::time::Duration> {
        self.lock()
            .list_delay
            .as_ref()
            .filter(|(p, _)| path.starts_with(p.as_str()))
            .map(|(_, d)| *d)
    }

    /// Never answers requests to paths starting with `prefix` (a hung API server).
    pub fn hang(&self, prefix: &str) {
        self.lock().hanging.push(prefix.to_owned());
    }

    fn hangs(&self, path: &str) -> bool {
        let mut s = self.lock();
        let hang = s.hanging.iter().any(|p| path.starts_with(p.as_str()));
        if hang {
            s.log_request(format!("HUNG {path}"));
        }
        hang
    }

    /// While set, every write (anything but a read) fails with `code`, as during an outage
    /// or an admission webhook that refuses.
    pub fn fail_writes(&self, code: Option<u16>) {
        self.lock().failing_writes = code;
    }

    /// Answers 404 to collection reads under `prefix`, as an API server does for a resource
    /// it does not serve (a CRD that is not installed).
    pub fn unserve(&self, prefix: &str) {
        self.lock().unserved.push(prefix.to_owned());
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

    /// What RBAC authorized for every request so far, in order.
    pub fn accesses(&self) -> Vec<Access> {
        self.lock().accesses.clone()
    }

    /// Requests other than reads (GET, LIST, WATCH) so far.
    pub fn writes(&self) -> usize {
        self.lock()
            .log
            .iter()
            .filter(|l| {
                !["GET ", "LIST ", "WATCH ", "DRY-RUN ", "HUNG "]
                    .iter()
                    .any(|r| l.starts_with(r))
            })
            .count()
    }

    /// The object stored at `path`.
    pub fn get(&self, path: &str) -> Option<Value> {
        self.lock().objects.get(path).cloned()
    }

    /// Stores `value` at `path` (as if another client had written it).
    pub fn put(&self, path: &str, mut value: Value) {
        {
            let mut s = self.lock();
            s.version += 1;
            value["metadata"]["resourceVersion"] = json!(s.version.to_string());
            let kind = if s.objects.contains_key(path) {
                "MODIFIED"
            } else {
                "ADDED"
            };
            s.record(kind, path, &value);
            s.objects.insert(path.to_owned(), value);
        }
        self.ticks.send_modify(|t| *t += 1);
    }

    /// Changes the object at `path` in place (as a controller or a person would).
    /// A change that empties `metadata.finalizers` of an object being deleted removes it,
    /// as the API server would.
    pub fn edit(&self, path: &str, f: impl FnOnce(&mut Value)) {
        {
            let mut s = self.lock();
            s.version += 1;
            let version = s.version;
            let Some(mut v) = s.objects.get(path).cloned() else {
                return;
            };
            f(&mut v);
            v["metadata"]["resourceVersion"] = json!(version.to_string());
            if released(&v) {
                s.objects.remove(path);
                s.record("DELETED", path, &v);
            } else {
                s.record("MODIFIED", path, &v);
                s.objects.insert(path.to_owned(), v);
            }
        }
        self.ticks.send_modify(|t| *t += 1);
    }

    /// Removes the object at `path`.
    pub fn remove(&self, path: &str) {
        {
            let mut s = self.lock();
            s.version += 1;
            if let Some(v) = s.objects.remove(path) {
                s.record("DELETED", path, &v);
            }
        }
        self.ticks.send_modify(|t| *t += 1);
    }

    /// Finishes the deletion of namespace `ns`: it and everything in it disappear.
    pub fn finish_namespace_deletion(&self, ns: &str) {
        {
            let inner = format!("/namespaces/{ns}/");
            let own = format!("/api/v1/namespaces/{ns}");
            let mut s = self.lock();
            s.version += 1;
            let gone: Vec<String> = s
                .objects
                .keys()
                .filter(|k| *k == &own || k.contains(&inner))
                .cloned()
                .collect();
            for key in gone {
                if let Some(v) = s.objects.remove(&key) {
                    s.record("DELETED", &key, &v);
                }
            }
        }
        self.ticks.send_modify(|t| *t += 1);
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
    pub fn sync_caches(&self, caches: &Caches) {
        fn fill<K>(fake: &FakeApi, cache: &Cache<K>, kind: &str)
        where
            K: kube::Resource<DynamicType = ()> + Clone + DeserializeOwned + serde::Serialize,
        {
            let _ = cache.handle(&watcher::Event::Init);
            for v in fake.objects_of_kind(kind) {
                if let Ok(obj) = serde_json::from_value::<K>(v) {
                    let _ = cache.handle(&watcher::Event::InitApply(obj));
                }
            }
            let _ = cache.handle(&watcher::Event::InitDone);
        }
        fill(self, &caches.namespaces, "Namespace");
        fill(self, &caches.policies, "NetworkPolicy");
        fill(self, &caches.quotas, "ResourceQuota");
        fill(self, &caches.limit_ranges, "LimitRange");
        fill(self, &caches.service_accounts, "ServiceAccount");
        fill(self, &caches.secrets, "Secret");
        fill(self, &caches.config_maps, "ConfigMap");
        fill(self, &caches.pvcs, "PersistentVolumeClaim");
        fill(self, &caches.deployments, "Deployment");
        fill(self, &caches.services, "Service");
        fill(self, &caches.storage_classes, "StorageClass");
    }

    /// Answers one request.
    pub fn handle(
        &self,
        method: &Method,
        path: &str,
        dry_run: bool,
        content_type: &str,
        body: &[u8],
    ) -> (u16, Value) {
        let mut s = self.lock();
        let line = if dry_run {
            format!("DRY-RUN {method} {path}")
        } else {
            format!("{method} {path}")
        };
        s.log_request(line.clone());
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
        if let Some(code) = s.failing_writes.filter(|_| *method != Method::GET) {
            return status(
                code,
                "ServiceUnavailable",
                "the server is unable to handle the request",
            );
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
                s.record("ADDED", &key, &obj);
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
                s.record("MODIFIED", &key, &obj);
                s.objects.insert(key, obj.clone());
                (200, obj)
            }
            Method::DELETE => {
                let Some(current) = s.objects.get(&key).cloned() else {
                    return status(404, "NotFound", &format!("{key} not found"));
                };
                let finalizers = current["metadata"]["finalizers"]
                    .as_array()
                    .is_some_and(|f| !f.is_empty());
                if current["kind"] == "Namespace" || finalizers {
                    // Namespaces terminate first (see finish_namespace_deletion); objects
                    // with finalizers wait until the last one is removed.
                    let mut obj = current;
                    if obj["metadata"]["deletionTimestamp"].is_null() {
                        obj["metadata"]["deletionTimestamp"] = json!("2026-01-01T00:00:00Z");
                        obj["metadata"]["resourceVersion"] = json!(version);
                        if obj["kind"] == "Namespace" {
                            obj["status"] = json!({"phase": "Terminating"});
                        }
                        s.record("MODIFIED", &key, &obj);
                        s.objects.insert(key, obj.clone());
                    }
                    return (200, obj);
                }
                s.objects.remove(&key);
                s.record("DELETED", &key, &current);
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
                        // An apply that creates is also authorized as a create.
                        s.accesses.extend(Access::of(&line).map(|a| Access {
                            verb: "create".into(),
                            ..a
                        }));
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
                if let Some(defaulting) = s.defaulting.clone() {
                    defaulting(&mut obj);
                }
                let unchanged = s.objects.get(&key).is_some_and(|current| {
                    let mut before = current.clone();
                    before["metadata"]["resourceVersion"] = Value::Null;
                    let mut after = obj.clone();
                    after["metadata"]["resourceVersion"] = Value::Null;
                    before == after
                });
                if dry_run || unchanged {
                    // Like the real API server: nothing is stored, the version stays.
                    s.version -= 1;
                    if let Some(current) = s.objects.get(&key) {
                        obj["metadata"]["resourceVersion"] =
                            current["metadata"]["resourceVersion"].clone();
                    }
                    return (200, obj);
                }
                obj["metadata"]["resourceVersion"] = json!(version);
                if released(&obj) {
                    // The last finalizer is gone: the API server deletes the object.
                    s.objects.remove(&key);
                    s.record("DELETED", &key, &obj);
                } else {
                    let kind = if s.objects.contains_key(&key) {
                        "MODIFIED"
                    } else {
                        "ADDED"
                    };
                    s.record(kind, &key, &obj);
                    s.objects.insert(key, obj.clone());
                }
                (200, obj)
            }
            _ => status(405, "MethodNotAllowed", "unsupported"),
        }
    }
}
