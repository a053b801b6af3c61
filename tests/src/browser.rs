//! What the portal tests drive: a real headless Chromium through Debian's `chromedriver`
//! (a small W3C WebDriver client over hyper: the handful of commands the tests use), and a
//! plain HTTP/1.1 client for the security checks that look at raw headers.

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use base64::Engine as _;
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::{Value, json};
use tenantry_test_support::free_port;

/// The Chromium Debian ships, the only browser the tests use.
pub const CHROMIUM: &str = "/usr/bin/chromium";
/// Debian's `chromium-driver`.
pub const CHROMEDRIVER: &str = "/usr/bin/chromedriver";

/// The W3C key of an element reference.
const ELEMENT_KEY: &str = "element-6066-11e4-a52e-4f735466cecf";

/// An HTTP/1.1 answer.
#[derive(Debug)]
pub struct Answer {
    /// The status.
    pub status: u16,
    /// The headers.
    pub headers: http::HeaderMap,
    /// The body as text.
    pub body: String,
}

impl Answer {
    /// A header as text ("" when absent).
    pub fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
    }

    /// The `name=value` part of the `Set-Cookie` header.
    pub fn cookie(&self) -> Option<String> {
        let set = self.headers.get(http::header::SET_COOKIE)?.to_str().ok()?;
        Some(set.split(';').next()?.to_owned())
    }

    /// The value of the hidden `csrf` field of the page.
    pub fn csrf(&self) -> Option<String> {
        let start = self.body.find(r#"name="csrf" value=""#)? + r#"name="csrf" value=""#.len();
        let end = self.body[start..].find('"')?;
        Some(self.body[start..start + end].to_owned())
    }
}

/// A plain HTTP client (no cookie jar: the tests carry the cookie themselves).
#[derive(Clone)]
pub struct Http {
    client: Client<HttpConnector, Full<Bytes>>,
}

impl Default for Http {
    fn default() -> Self {
        Http {
            client: Client::builder(TokioExecutor::new()).build_http(),
        }
    }
}

impl Http {
    /// Sends a request; `form` makes it a urlencoded POST.
    pub async fn send(
        &self,
        method: &str,
        url: &str,
        cookie: Option<&str>,
        form: Option<&[(&str, &str)]>,
    ) -> Answer {
        let mut req = http::Request::builder().method(method).uri(url);
        if let Some(cookie) = cookie {
            req = req.header(http::header::COOKIE, cookie);
        }
        let body = match form {
            Some(fields) => {
                req = req.header(
                    http::header::CONTENT_TYPE,
                    "application/x-www-form-urlencoded",
                );
                fields
                    .iter()
                    .map(|(k, v)| format!("{}={}", encode(k), encode(v)))
                    .collect::<Vec<_>>()
                    .join("&")
            }
            None => String::new(),
        };
        let res = self
            .client
            .request(req.body(Full::new(Bytes::from(body))).unwrap())
            .await
            .unwrap();
        let status = res.status().as_u16();
        let headers = res.headers().clone();
        let body = res.into_body().collect().await.unwrap().to_bytes();
        Answer {
            status,
            headers,
            body: String::from_utf8_lossy(&body).into_owned(),
        }
    }

    /// `GET url`.
    pub async fn get(&self, url: &str, cookie: Option<&str>) -> Answer {
        self.send("GET", url, cookie, None).await
    }

    /// `POST url` with a form.
    pub async fn post(&self, url: &str, cookie: Option<&str>, form: &[(&str, &str)]) -> Answer {
        self.send("POST", url, cookie, Some(form)).await
    }

    /// Waits until `url` answers 200.
    pub async fn wait_ok(&self, url: &str, within: Duration, log: impl Fn() -> String) {
        let deadline = Instant::now() + within;
        loop {
            let req = http::Request::get(url)
                .body(Full::new(Bytes::new()))
                .unwrap();
            if let Ok(res) = self.client.request(req).await
                && res.status() == 200
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{url} never answered; log:\n{}",
                log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Percent-encoding for a form field.
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                char::from(b).to_string()
            }
            b => format!("%{b:02X}"),
        })
        .collect()
}

/// A headless Chromium session through a `chromedriver` this test started; both end
/// when it is dropped.
pub struct Browser {
    driver: tokio::process::Child,
    http: Http,
    base: String,
    _profile: tempfile::TempDir,
}

/// An element on the current page.
#[derive(Debug, Clone)]
pub struct Element(String);

impl Browser {
    /// Starts `chromedriver` and a headless Chromium with a fresh profile, `width` ×
    /// `height` pixels. Fails with what to install when the browser is missing.
    pub async fn start(width: u32, height: u32) -> Browser {
        for (bin, package) in [(CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")] {
            assert!(
                Path::new(bin).is_file(),
                "{bin} is missing: the portal tests need Debian's `{package}` (`apt-get install chromium chromium-driver`, as .ci/run does)"
            );
        }
        let port = free_port();
        let driver = tokio::process::Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let http = Http::default();
        let base = format!("http://127.0.0.1:{port}");
        http.wait_ok(
            &format!("{base}/status"),
            Duration::from_secs(20),
            String::new,
        )
        .await;
        let profile = tempfile::tempdir().unwrap();
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": CHROMIUM,
                "args": [
                    "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                    "--disable-background-networking", "--disable-component-update",
                    "--disable-sync", "--disable-dev-shm-usage",
                    format!("--user-data-dir={}", profile.path().display()),
                    format!("--window-size={width},{height}"),
                ],
            },
        }}});
        let mut browser = Browser {
            driver,
            http,
            base,
            _profile: profile,
        };
        let session = browser.command("POST", "/session", Some(caps)).await;
        let id = session["sessionId"].as_str().unwrap().to_owned();
        browser.base = format!("{}/session/{id}", browser.base);
        browser
    }

    async fn try_command(
        &self,
        method: &str,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value, String> {
        let req = http::Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.base))
            .header(http::header::CONTENT_TYPE, "application/json");
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let res = self
            .http
            .client
            .request(req.body(Full::new(Bytes::from(body))).unwrap())
            .await
            .unwrap();
        let status = res.status();
        let bytes = res.into_body().collect().await.unwrap().to_bytes();
        let value: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        if status.is_success() {
            Ok(value["value"].clone())
        } else {
            Err(format!("WebDriver {method} {path}: {status} {value}"))
        }
    }

    async fn command(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        self.try_command(method, path, body).await.unwrap()
    }

    /// Runs `script` in the page (WebDriver's own channel, which the page's CSP does not
    /// govern) and returns its result.
    pub async fn execute(&self, script: &str, args: Value) -> Value {
        self.command(
            "POST",
            "/execute/sync",
            Some(json!({"script": script, "args": args})),
        )
        .await
    }

    /// Removes an attribute of the element with `data-testid` `id`.
    pub async fn remove_attribute(&self, id: &str, name: &str) {
        self.execute(
            "document.querySelector(`[data-testid=\"${arguments[0]}\"]`).removeAttribute(arguments[1])",
            json!([id, name]),
        )
        .await;
    }

    /// The width of the page's content, in CSS pixels.
    pub async fn scroll_width(&self) -> u64 {
        self.execute("return document.documentElement.scrollWidth", json!([]))
            .await
            .as_u64()
            .unwrap()
    }

    /// The text of `e`, or `None` if it went away (the page reloaded).
    pub async fn try_text(&self, e: &Element) -> Option<String> {
        let v = self
            .try_command("GET", &format!("/element/{}/text", e.0), None)
            .await
            .ok()?;
        v.as_str().map(str::to_owned)
    }

    /// Opens `url` and waits for it to load.
    pub async fn goto(&self, url: &str) {
        self.command("POST", "/url", Some(json!({ "url": url })))
            .await;
    }

    /// The address of the current page.
    pub async fn url(&self) -> String {
        self.command("GET", "/url", None)
            .await
            .as_str()
            .unwrap()
            .to_owned()
    }

    /// Waits up to 10 s for the address to contain `part` (a click's navigation may still
    /// be under way when the click returns); returns the address.
    pub async fn wait_url(&self, part: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let url = self.url().await;
            if url.contains(part) {
                return url;
            }
            assert!(Instant::now() < deadline, "never reached {part}; at {url}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn try_find(&self, css: &str) -> Option<Element> {
        let found = self
            .try_command(
                "POST",
                "/elements",
                Some(json!({"using": "css selector", "value": css})),
            )
            .await
            .ok()?;
        found
            .as_array()?
            .first()
            .map(|e| Element(e[ELEMENT_KEY].as_str().unwrap().to_owned()))
    }

    /// The element with `data-testid` `id`, waiting up to 10 s for it.
    pub async fn by_testid(&self, id: &str) -> Element {
        self.find(&format!("[data-testid=\"{id}\"]")).await
    }

    /// The first element matching `css`, waiting up to 10 s for it.
    pub async fn find(&self, css: &str) -> Element {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(e) = self.try_find(css).await {
                return e;
            }
            assert!(
                Instant::now() < deadline,
                "no element {css} on {}:\n{}",
                self.url().await,
                self.source().await
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Whether an element with `data-testid` `id` is on the page now.
    pub async fn has_testid(&self, id: &str) -> bool {
        self.try_find(&format!("[data-testid=\"{id}\"]"))
            .await
            .is_some()
    }

    /// Every element matching `css` now.
    pub async fn find_all(&self, css: &str) -> Vec<Element> {
        let found = self
            .command(
                "POST",
                "/elements",
                Some(json!({"using": "css selector", "value": css})),
            )
            .await;
        found
            .as_array()
            .unwrap()
            .iter()
            .map(|e| Element(e[ELEMENT_KEY].as_str().unwrap().to_owned()))
            .collect()
    }

    /// The visible text of the element with `data-testid` `id`.
    pub async fn text_of(&self, id: &str) -> String {
        let e = self.by_testid(id).await;
        self.text(&e).await
    }

    /// The visible text of `e`.
    pub async fn text(&self, e: &Element) -> String {
        self.command("GET", &format!("/element/{}/text", e.0), None)
            .await
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }

    /// An attribute of `e` ("" when absent).
    pub async fn attribute(&self, e: &Element, name: &str) -> String {
        self.command("GET", &format!("/element/{}/attribute/{name}", e.0), None)
            .await
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }

    /// A DOM property of `e` (`value` of an input).
    pub async fn property(&self, e: &Element, name: &str) -> Value {
        self.command("GET", &format!("/element/{}/property/{name}", e.0), None)
            .await
    }

    /// Clears the input with `data-testid` `id` and types `text` into it.
    pub async fn fill(&self, id: &str, text: &str) {
        let e = self.by_testid(id).await;
        self.command("POST", &format!("/element/{}/clear", e.0), Some(json!({})))
            .await;
        self.command(
            "POST",
            &format!("/element/{}/value", e.0),
            Some(json!({ "text": text })),
        )
        .await;
    }

    /// Types `keys` (WebDriver key codes allowed) into `e`.
    pub async fn keys(&self, e: &Element, keys: &str) {
        self.command(
            "POST",
            &format!("/element/{}/value", e.0),
            Some(json!({ "text": keys })),
        )
        .await;
    }

    /// Clicks the element with `data-testid` `id` (and waits for a navigation it starts).
    pub async fn click(&self, id: &str) {
        let e = self.by_testid(id).await;
        self.click_element(&e).await;
    }

    /// Clicks `e`.
    pub async fn click_element(&self, e: &Element) {
        self.command("POST", &format!("/element/{}/click", e.0), Some(json!({})))
            .await;
    }

    /// The page's HTML.
    pub async fn source(&self) -> String {
        self.command("GET", "/source", None)
            .await
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }

    /// The browser's cookies (with their `httpOnly`, `sameSite` and `secure` flags).
    pub async fn cookies(&self) -> Vec<Value> {
        self.command("GET", "/cookie", None)
            .await
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    /// Resizes the window.
    pub async fn resize(&self, width: u32, height: u32) {
        self.command(
            "POST",
            "/window/rect",
            Some(json!({"width": width, "height": height})),
        )
        .await;
    }

    /// A PNG of the viewport written to `path`.
    pub async fn screenshot(&self, path: &Path) {
        let b64 = self.command("GET", "/screenshot", None).await;
        let png = base64::engine::general_purpose::STANDARD
            .decode(b64.as_str().unwrap())
            .unwrap();
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).unwrap();
        }
        std::fs::write(path, png).unwrap();
    }

    /// Ends the session and the driver.
    pub async fn quit(mut self) {
        let _ = self.command("DELETE", "", None).await;
        let _ = self.driver.kill().await;
    }
}
