//! The signup portal in a real browser: `tenantry-api dev` (which starts the real
//! `tenantry-portal`) driven through headless Chromium, as a person would use it, and the
//! portal's security properties checked on the wire: CSRF, cookie flags, headers, tenant
//! isolation and its logs at TRACE.
//!
//! The journey writes a screenshot of each page to `target/<profile>/portal-screenshots/`,
//! or to `docs/portal/` (shown in docs/portal.md) with `TENANTRY_BLESS=1`.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use tenantry_test_support::{PASSWORD, free_port};
use tenantry_tests::browser::{Browser, Http};
use tenantry_tests::{bin, next_step, totp_now};

/// A running `tenantry-api dev` with its portal.
struct Dev {
    child: tokio::process::Child,
    log: PathBuf,
    portal: String,
    api_port: u16,
    data_dir: PathBuf,
    _dir: tempfile::TempDir,
}

impl Dev {
    /// Starts dev with the portal on a free port; `portal_log` is the portal's filter.
    async fn start(portal_log: &str) -> Dev {
        let dir = tempfile::tempdir().unwrap();
        let data_dir = dir.path().join("data");
        let log = dir.path().join("dev.log");
        let api_port = free_port();
        let portal_port = free_port();
        let child = tokio::process::Command::new(bin("tenantry-api"))
            .args(["dev", "--data-dir"])
            .arg(&data_dir)
            .args(["--listen", &format!("127.0.0.1:{api_port}")])
            .args(["--portal-listen", &format!("127.0.0.1:{portal_port}")])
            .args(["--argon2-memory-kib", "1024", "--argon2-iterations", "1"])
            .env("TENANTRY_LOG", "info")
            .env("TENANTRY_PORTAL_LOG", portal_log)
            .stdout(Stdio::null())
            .stderr(Stdio::from(std::fs::File::create(&log).unwrap()))
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let dev = Dev {
            child,
            log,
            portal: format!("http://127.0.0.1:{portal_port}"),
            api_port,
            data_dir,
            _dir: dir,
        };
        Http::default()
            .wait_ok(
                &format!("{}/healthz", dev.portal),
                Duration::from_secs(30),
                || dev.log(),
            )
            .await;
        dev
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.portal)
    }

    async fn stop(mut self) -> String {
        let pid = self.child.id().unwrap();
        std::process::Command::new("kill")
            .args(["-INT", &pid.to_string()])
            .status()
            .unwrap();
        let status = tokio::time::timeout(Duration::from_secs(30), self.child.wait())
            .await
            .unwrap()
            .unwrap();
        assert!(
            status.success(),
            "dev exited with {status}:\n{}",
            self.log()
        );
        self.log()
    }
}

/// Where the journey's screenshots go.
fn screenshot_dir() -> PathBuf {
    if std::env::var_os("TENANTRY_BLESS").is_some() {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .unwrap()
            .join("docs/portal")
    } else {
        bin("tenantry-api")
            .parent()
            .unwrap()
            .join("portal-screenshots")
    }
}

/// Waits until the element `id` shows `text` (the dashboard reloads itself meanwhile).
async fn wait_for_text(b: &Browser, id: &str, text: &str, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        // The page may be reloading: look again instead of holding on to an element.
        if b.has_testid(id).await {
            let e = b.by_testid(id).await;
            let value = b.try_text(&e).await;
            if value.as_deref() == Some(text) {
                return;
            }
        }
        assert!(
            Instant::now() < deadline,
            "{id} never showed {text:?}; page:\n{}",
            b.source().await
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

async fn sign_in(b: &Browser, dev: &Dev, email: &str, password: &str) {
    b.goto(&dev.url("/login")).await;
    b.fill("login-email", email).await;
    b.fill("login-password", password).await;
    b.click("login-submit").await;
}

async fn sign_out(b: &Browser, dev: &Dev) {
    b.goto(&dev.url("/account")).await;
    b.click("logout").await;
    b.wait_url("/login?signed_out=1").await;
    assert_eq!(b.text_of("notice").await, "Signed out.");
}

/// The journey of the issue, in one browser: sign up → Ready with its endpoint → sign out
/// → sign in → enroll TOTP from the shown secret → sign out → sign in with a TOTP code →
/// change retention → five wrong passwords show the lockout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_person_signs_up_and_uses_the_portal_in_a_real_browser() {
    let dev = Dev::start("info").await;
    let shots = screenshot_dir();
    let b = Browser::start(1024, 800).await;
    let email = "dana@example.com";

    // Sign up.
    b.goto(&dev.url("/signup")).await;
    assert!(b.text_of("password-rules").await.contains("12 to 256"));
    b.fill("signup-email", email).await;
    b.fill("signup-password", PASSWORD).await;
    b.fill("signup-tenant", "dana-co").await;
    b.click_element(
        &b.find("[data-testid=\"signup-plan\"] option[value=\"standard\"]")
            .await,
    )
    .await;
    b.screenshot(&shots.join("signup.png")).await;
    b.click("signup-submit").await;

    // The instance waits for the verified address; the banner offers a new link.
    assert_eq!(b.text_of("tenant-name").await, "dana-co");
    assert_eq!(b.text_of("tenant-phase").await, "Awaiting verification");
    assert!(b.text_of("tenant-message").await.contains("verify"));
    assert!(b.has_testid("resend-verification").await);
    // The link from the (DKIM-signed) mail in dev's outbox verifies it.
    let outbox = dev.data_dir.join("outbox");
    let mut link = None;
    for _ in 0..100 {
        link = tenantry_test_support::verification_link(
            &tenantry_test_support::read_mail(&outbox),
            email,
        );
        if link.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let link = link.expect("a verification mail in dev's outbox");
    assert!(link.starts_with(&dev.url("/verify-email?token=")), "{link}");
    b.goto(&link).await;
    assert_eq!(b.text_of("notice").await, "Email address verified.");
    assert!(!b.has_testid("resend-verification").await);

    // The dashboard follows the instance until it is Ready, without a click.
    wait_for_text(&b, "tenant-phase", "Ready", Duration::from_secs(90)).await;
    let endpoint = b.by_testid("tenant-endpoint").await;
    let href = b.attribute(&endpoint, "href").await;
    assert!(href.starts_with("https://127.0.0.1:"), "{href}");
    assert_eq!(b.text(&endpoint).await, href);
    let expiry = b.text_of("tenant-cert-expiry").await;
    assert!(expiry.ends_with("UTC"), "{expiry}");
    assert!(
        b.text_of("retention-max-age-cap")
            .await
            .contains("504 hours")
    );
    b.screenshot(&shots.join("dashboard.png")).await;

    // The session lives in an HttpOnly, SameSite=Strict cookie only.
    let cookies = b.cookies().await;
    assert_eq!(cookies.len(), 1, "{cookies:?}");
    assert_eq!(cookies[0]["name"], "tenantry_portal");
    assert_eq!(cookies[0]["httpOnly"], true);
    assert_eq!(cookies[0]["sameSite"], "Strict");

    // Sign out, sign in again.
    b.goto(&dev.url("/account")).await;
    assert_eq!(b.text_of("account-email").await, email);
    b.screenshot(&shots.join("account.png")).await;
    sign_out(&b, &dev).await;
    b.screenshot(&shots.join("login.png")).await;
    // By keyboard alone: type the email, Tab to the password, Enter submits.
    b.goto(&dev.url("/login")).await;
    let email_field = b.by_testid("login-email").await;
    b.keys(&email_field, &format!("{email}\u{E004}{PASSWORD}\u{E007}"))
        .await;
    assert_eq!(b.text_of("tenant-name").await, "dana-co");

    // Enroll TOTP from the secret the page shows, next to its QR code.
    b.goto(&dev.url("/mfa")).await;
    b.click("mfa-enroll").await;
    let secret = b.text_of("mfa-secret").await;
    let qr = b.find("[data-testid=\"mfa-qr\"] svg").await;
    assert!(!b.attribute(&qr, "viewBox").await.is_empty());
    b.screenshot(&shots.join("mfa-enroll.png")).await;
    let enrolled_with = totp_now(&secret);
    b.fill("mfa-confirm-code", &enrolled_with).await;
    b.click("mfa-confirm").await;
    // The list is on the next page: wait for it before counting.
    b.by_testid("recovery-codes").await;
    let codes = b.find_all("[data-testid=\"recovery-codes\"] li").await;
    assert_eq!(codes.len(), 10);
    let recovery = b.text(&codes[0]).await;
    let download = b.by_testid("recovery-codes-download").await;
    assert!(
        b.attribute(&download, "href")
            .await
            .starts_with("data:text/plain")
    );
    b.screenshot(&shots.join("recovery-codes.png")).await;
    sign_out(&b, &dev).await;

    // Signing in now asks for the second factor; a TOTP code lets the person in.
    sign_in(&b, &dev, email, PASSWORD).await;
    b.wait_url("/login/mfa").await;
    b.screenshot(&shots.join("login-mfa.png")).await;
    // Each code is accepted once: wait for the next one.
    let mut code = totp_now(&secret);
    if code == enrolled_with {
        next_step().await;
        code = totp_now(&secret);
    }
    b.fill("mfa-code", &code).await;
    b.click("mfa-submit").await;
    assert_eq!(b.text_of("tenant-name").await, "dana-co");

    // Change retention; the form shows the new policy.
    b.fill("retention-max-age-hours", "100").await;
    b.fill("retention-max-count", "500").await;
    b.click("retention-save").await;
    assert_eq!(b.text_of("notice").await, "Retention saved.");
    let age = b.by_testid("retention-max-age-hours").await;
    assert_eq!(b.property(&age, "value").await, "100");
    let count = b.by_testid("retention-max-count").await;
    assert_eq!(b.property(&count, "value").await, "500");
    // Above the plan's cap: the API's reason, in `error`.
    b.fill("retention-max-age-hours", "600").await;
    // The browser's own range check would stop the form; remove it to reach the server.
    b.remove_attribute("retention-max-age-hours", "max").await;
    b.click("retention-save").await;
    let error = b.text_of("error").await;
    assert!(error.contains("max_age_hours"), "{error}");
    assert_eq!(
        b.attribute(&b.by_testid("error").await, "role").await,
        "alert"
    );

    // Two-factor turns off with the password and a code; the page then offers
    // enrollment again.
    b.goto(&dev.url("/mfa")).await;
    assert!(b.has_testid("mfa-enrolled").await);
    b.fill("mfa-remove-password", PASSWORD).await;
    b.fill("mfa-remove-code", &recovery).await;
    b.click("mfa-remove").await;
    assert_eq!(
        b.text_of("notice").await,
        "Two-factor authentication is off."
    );
    assert!(b.has_testid("mfa-enroll").await);
    assert!(!b.has_testid("mfa-enrolled").await);
    sign_out(&b, &dev).await;

    // Five wrong passwords lock the account; the page says when to try again, and even
    // the right password is refused until then.
    for attempt in 1..=5 {
        sign_in(&b, &dev, email, "wrong-password-123").await;
        let error = b.text_of("error").await;
        if attempt < 5 {
            assert_eq!(error, "invalid email or password", "attempt {attempt}");
        }
    }
    sign_in(&b, &dev, email, PASSWORD).await;
    let error = b.text_of("error").await;
    assert!(error.contains("Try again in"), "{error}");
    assert!(error.contains("UTC"), "{error}");
    b.screenshot(&shots.join("lockout.png")).await;

    // Narrow screens: the signup page at 320 px wide needs no sideways scrolling.
    b.resize(320, 700).await;
    b.goto(&dev.url("/signup")).await;
    assert!(
        b.scroll_width().await <= 320,
        "the page is wider than 320 px"
    );
    b.screenshot(&shots.join("signup-320.png")).await;

    b.quit().await;
    dev.stop().await;
}

/// Signs up through the portal's form with a fresh visit; returns the signed-in cookie and
/// the new tenant's id.
async fn signup_over_http(http: &Http, dev: &Dev, email: &str, tenant: &str) -> (String, String) {
    let page = http.get(&dev.url("/signup"), None).await;
    let (cookie, csrf) = (page.cookie().unwrap(), page.csrf().unwrap());
    let done = http
        .post(
            &dev.url("/signup"),
            Some(&cookie),
            &[
                ("csrf", &csrf),
                ("email", email),
                ("password", PASSWORD),
                ("tenant", tenant),
                ("plan", "free"),
            ],
        )
        .await;
    assert_eq!(done.status, 303, "{}", done.body);
    let tenant_id = done
        .header("location")
        .strip_prefix("/?tenant=")
        .unwrap()
        .to_owned();
    (done.cookie().unwrap(), tenant_id)
}

/// Erin's signup form with `csrf` as its token.
fn erin_fields(csrf: &str) -> Vec<(&str, &str)> {
    vec![
        ("csrf", csrf),
        ("email", "erin@example.com"),
        ("password", PASSWORD),
        ("tenant", "erin-co"),
        ("plan", "free"),
    ]
}

/// CSRF, cookie flags, headers, tenant isolation and the logs, checked on the wire against
/// the real binaries, the portal logging at TRACE.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_portal_refuses_forged_forms_keeps_tenants_apart_and_logs_no_secrets() {
    let dev = Dev::start("trace").await;
    let http = Http::default();
    // dev says where to go.
    // (The portal may answer its health check before dev has printed the line.)
    let opened = format!("signup portal: open {} to sign up", dev.portal);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !dev.log().contains(&opened) && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(dev.log().contains(&opened), "{}", dev.log());

    // Every response: a strict CSP, nosniff, no referrer, no framing, no caching.
    let page = http.get(&dev.url("/signup"), None).await;
    assert_eq!(page.status, 200);
    for answer in [&page, &http.get(&dev.url("/no-such-page"), None).await] {
        let csp = answer.header("content-security-policy");
        assert!(csp.contains("default-src 'self'"), "{csp}");
        assert!(csp.contains("frame-ancestors 'none'"), "{csp}");
        assert!(
            !csp.contains("unsafe-inline") && !csp.contains("unsafe-eval"),
            "{csp}"
        );
        assert_eq!(answer.header("x-content-type-options"), "nosniff");
        assert_eq!(answer.header("referrer-policy"), "no-referrer");
        assert_eq!(answer.header("x-frame-options"), "DENY");
    }
    assert_eq!(page.header("cache-control"), "no-store");
    assert!(!page.body.contains("<script"), "no inline script");
    // The cookie: HttpOnly, SameSite=Strict, not Secure on an http:// portal.
    let set = page.header("set-cookie");
    assert!(
        set.contains("; HttpOnly") && set.contains("; SameSite=Strict"),
        "{set}"
    );
    assert!(set.contains("; Path=/") && !set.contains("Secure"), "{set}");

    // A POST without this visit's CSRF token is refused and changes nothing.
    let (cookie, csrf) = (page.cookie().unwrap(), page.csrf().unwrap());
    let other = http.get(&dev.url("/signup"), None).await;
    let other_csrf = other.csrf().unwrap();
    let signup = dev.url("/signup");
    for (what, cookie, form) in [
        (
            "no token",
            Some(cookie.as_str()),
            erin_fields("")[1..].to_vec(),
        ),
        ("an empty token", Some(cookie.as_str()), erin_fields("")),
        (
            "a wrong token",
            Some(cookie.as_str()),
            erin_fields("forged"),
        ),
        (
            "another visit's token",
            Some(cookie.as_str()),
            erin_fields(&other_csrf),
        ),
        ("no cookie", None, erin_fields(&csrf)),
    ] {
        let refused = http.post(&signup, cookie, &form).await;
        assert_eq!(refused.status, 403, "{what}: {}", refused.body);
        assert!(refused.body.contains(r#"data-testid="error""#), "{what}");
    }
    // ... and each refusal created nothing: the same signup with the token goes through.
    let (erin, erin_tenant) = signup_over_http(&http, &dev, "erin@example.com", "erin-co").await;
    let (frank, frank_tenant) =
        signup_over_http(&http, &dev, "frank@example.com", "frank-co").await;

    // Another tenant's id gives exactly the page a missing one gives.
    let missing_id = "00000000-0000-4000-8000-000000000000";
    let theirs = http
        .get(&dev.url(&format!("/?tenant={frank_tenant}")), Some(&erin))
        .await;
    let missing = http
        .get(&dev.url(&format!("/?tenant={missing_id}")), Some(&erin))
        .await;
    assert_eq!(theirs.status, 404);
    assert_eq!(
        (theirs.status, &theirs.body),
        (missing.status, &missing.body)
    );
    let own = http
        .get(&dev.url(&format!("/?tenant={erin_tenant}")), Some(&erin))
        .await;
    assert_eq!(own.status, 200);
    let erin_csrf = own.csrf().unwrap();
    let set_retention = |tenant: String| {
        let (http, url, erin, csrf) = (
            http.clone(),
            dev.url("/retention"),
            erin.clone(),
            erin_csrf.clone(),
        );
        async move {
            http.post(
                &url,
                Some(&erin),
                &[
                    ("csrf", &csrf),
                    ("tenant_id", &tenant),
                    ("max_age_hours", "1"),
                    ("max_count", "1"),
                ],
            )
            .await
        }
    };
    let theirs = set_retention(frank_tenant.clone()).await;
    let missing = set_retention(missing_id.to_owned()).await;
    assert_eq!(theirs.status, 404);
    assert_eq!(
        (theirs.status, &theirs.body),
        (missing.status, &missing.body)
    );
    let franks = http.get(&dev.url("/"), Some(&frank)).await;
    assert!(
        franks.body.contains(r#"value="336""#),
        "Frank's retention is untouched"
    );

    // The cookie is Secure (and HSTS is sent) when the public URL is https.
    let port = free_port();
    let mut secure = tokio::process::Command::new(bin("tenantry-portal"))
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .args(["--api", &format!("http://127.0.0.1:{}", dev.api_port)])
        .arg("--cookie-key-file")
        .arg(dev.data_dir.join("portal-cookie.key"))
        .args(["--public-url", "https://portal.example"])
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let base = format!("http://127.0.0.1:{port}");
    http.wait_ok(
        &format!("{base}/healthz"),
        Duration::from_secs(20),
        String::new,
    )
    .await;
    let page = http.get(&format!("{base}/login"), None).await;
    assert!(
        page.header("set-cookie").ends_with("; Secure"),
        "{}",
        page.header("set-cookie")
    );
    assert!(
        page.header("strict-transport-security")
            .starts_with("max-age=")
    );
    secure.kill().await.unwrap();

    // The logs at TRACE hold neither the password, nor the API session token inside the
    // cookie, nor the cookie or the CSRF token.
    let key =
        tenantry_portal::session::CookieKey::load(&dev.data_dir.join("portal-cookie.key")).unwrap();
    let sealed = erin.strip_prefix("tenantry_portal=").unwrap().to_owned();
    let session =
        tenantry_portal::session::Session::open(&key, &sealed, jiff::Timestamp::now().as_second())
            .unwrap();
    use secrecy::ExposeSecret as _;
    let token = session.token.as_ref().unwrap().expose_secret().to_owned();
    let log = dev.stop().await;
    assert!(log.contains("TRACE"), "the portal logged at TRACE");
    for (what, secret) in [
        ("password", PASSWORD),
        ("session token", token.as_str()),
        ("cookie", sealed.as_str()),
        ("CSRF token", erin_csrf.as_str()),
    ] {
        assert!(!log.contains(secret), "the {what} is in the log");
    }
}

/// SIGKILL of `tenantry-api dev` (no cleanup at all) still stops its portal within 5 s:
/// the portal holds the read end of a pipe whose write end died with the API
/// (`--exit-on-stdin-close`), so nothing is left holding the portal's port.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_dev_takes_its_portal_with_it() {
    let mut dev = Dev::start("info").await;
    let portal = dev.portal.trim_start_matches("http://").to_owned();
    assert!(tokio::net::TcpStream::connect(&portal).await.is_ok());
    dev.child.start_kill().unwrap();
    dev.child.wait().await.unwrap();
    let killed = Instant::now();
    while tokio::net::TcpStream::connect(&portal).await.is_ok() {
        assert!(
            killed.elapsed() < Duration::from_secs(5),
            "the portal still listens on {portal} 5 s after dev was killed:\n{}",
            dev.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!("portal gone {:?} after the SIGKILL", killed.elapsed());
    assert!(
        dev.log().contains("standard input closed"),
        "the portal said why it stopped:\n{}",
        dev.log()
    );
}
