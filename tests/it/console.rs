//! The web console in a real browser: Debian's headless `chromium`, driven through
//! `chromedriver` (WebDriver) by fantoccini, against the real agent following a git daemon and
//! applying to the real Docker Engine. Screenshots of each page go to
//! `target/console-screenshots/` for people to look at.
//!
//! Without `chromium` and `chromedriver` these tests skip loudly, unless `BERTH_REQUIRE_BROWSER=1`
//! (set by `.ci/run`, which installs them), which makes them fail instead.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder, Locator};

use crate::support::agent::{API_TOKEN, Agent, VIEWER_TOKEN, applied};
use crate::support::engine::engine;
use crate::support::gitserver::{GitDaemon, Origin};
use crate::support::net::free_port;
use crate::support::net::http_with_head;
use crate::support::util::{challenge, crate_root};

/// `chromedriver` on a port of its own, stopped when this goes.
struct Driver {
    child: Child,
    port: u16,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// chromedriver, when it and chromium are installed; else `None`, after a loud message (or a
/// failure under `BERTH_REQUIRE_BROWSER=1`).
fn driver() -> Option<Driver> {
    let installed = ["/usr/bin/chromium", "/usr/bin/chromedriver"]
        .iter()
        .all(|p| Path::new(p).exists());
    if !installed {
        assert!(
            std::env::var("BERTH_REQUIRE_BROWSER").as_deref() != Ok("1"),
            "BERTH_REQUIRE_BROWSER=1 but chromium and chromedriver are not installed (apt-get install chromium chromium-driver)"
        );
        eprintln!(
            "\n*** SKIPPED: no chromium and chromedriver; install Debian's chromium and chromium-driver, or set BERTH_REQUIRE_BROWSER=1 to make this a failure ***\n"
        );
        return None;
    }
    let port = free_port();
    let child = Command::new("/usr/bin/chromedriver")
        .arg(format!("--port={port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("chromedriver starts");
    let started = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "chromedriver never listened"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    Some(Driver { child, port })
}

/// A headless browser session of `driver`.
async fn browser(driver: &Driver) -> Client {
    let mut capabilities = serde_json::Map::new();
    capabilities.insert(
        "goog:chromeOptions".into(),
        serde_json::json!({
            "binary": "/usr/bin/chromium",
            "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1280,900"],
        }),
    );
    let connector = hyper_util::client::legacy::connect::HttpConnector::new();
    ClientBuilder::new(connector)
        .capabilities(capabilities)
        .connect(&format!("http://127.0.0.1:{}", driver.port))
        .await
        .expect("a browser session")
}

fn screenshots() -> PathBuf {
    let folder = crate_root().join("target/console-screenshots");
    std::fs::create_dir_all(&folder).unwrap();
    folder
}

async fn screenshot(browser: &Client, name: &str) {
    let png = browser.screenshot().await.expect("a screenshot");
    std::fs::write(screenshots().join(format!("{name}.png")), png).unwrap();
}

/// Logs in with `token` through the login form.
async fn log_in(browser: &Client, base: &str, token: &str) {
    browser.goto(&format!("{base}/")).await.unwrap();
    let url = browser.current_url().await.unwrap();
    assert!(url.path() == "/login", "not sent to log in: {url}");
    browser
        .find(Locator::Id("token"))
        .await
        .unwrap()
        .send_keys(token)
        .await
        .unwrap();
    click(browser, "form.login button").await;
}

/// Clicks the element `css` finds. A live update can swap the page's `main` between the find and
/// the click (each pass's event refreshes it), leaving the element found stale and the click not
/// made: it is found again in the new `main` and clicked there, as a user would click again.
async fn click(browser: &Client, css: &str) {
    for _ in 0..5 {
        let element = browser
            .find(Locator::Css(css))
            .await
            .unwrap_or_else(|e| panic!("no {css}: {e}"));
        match element.click().await {
            Ok(()) => return,
            Err(fantoccini::error::CmdError::Standard(e))
                if e.error == fantoccini::error::ErrorStatus::StaleElementReference =>
            {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("cannot click {css}: {e}"),
        }
    }
    panic!("{css} was replaced by a live update each of 5 times it was clicked");
}

/// How long a page may take to show what a step led to. It is patience, not a speed claim: what
/// makes "live" true is that the page was never reloaded (checked through a window variable),
/// and a loaded 2-core CI machine with chromium, the agent and the engine on it can be slow.
const PAGE_PATIENCE: Duration = Duration::from_secs(60);

/// Waits until `check` holds of the page's text, without reloading it. A page caught between
/// two versions of its `main` (a live update swapping it) is read again.
async fn until_page(browser: &Client, what: &str, check: impl Fn(&str) -> bool) {
    let started = Instant::now();
    loop {
        let text = match browser.find(Locator::Css("main")).await {
            Ok(main) => main.text().await.unwrap_or_default(),
            Err(_) => String::new(),
        };
        if check(&text) {
            return;
        }
        assert!(
            started.elapsed() < PAGE_PATIENCE,
            "{what}: not within {PAGE_PATIENCE:?}; the page says:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Makes `origin` refuse pushes to `main`, as a protected branch does: the hook to remove.
fn protect_main(origin: &Origin) -> PathBuf {
    let hook = origin.bare().join("hooks/pre-receive");
    std::fs::write(
        &hook,
        "#!/bin/sh\nwhile read old new ref; do [ \"$ref\" = refs/heads/main ] && { echo 'main is protected' >&2; exit 1; }; done\nexit 0\n",
    )
    .unwrap();
    std::fs::set_permissions(&hook, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    hook
}

#[test]
fn the_console_logs_in_shows_objects_follows_passes_and_logs_live_escapes_everything_and_a_viewer_only_reads()
 {
    let Some(instance) = engine() else { return };
    let Some(driver) = driver() else { return };
    let origin = Origin::new(&[
        (
            "web.yaml",
            &challenge(
                "web",
                "  command: [sh, -c, 'exec sleep 3600']\n  info: {description: \"<script>window.berthInfo=1</script>\"}\n",
            ),
        ),
        (
            "pipelines/ticks.yaml",
            "apiVersion: berth/v1\nkind: Pipeline\nmetadata: {name: ticks}\nspec:\n  context: pipelines\n  image: busybox:latest\n  steps:\n    - {name: tick, run: \"echo '<script>window.berthLog=1</script>'; for i in 1 2 3 4 5 6; do echo tick-$i; sleep 1; done\"}\n",
        ),
    ]);
    let revision = origin.bare_git(&["rev-parse", "main"]);
    let daemon = GitDaemon::start(&origin);
    let agent = Agent::start(&instance, &daemon.url(), "");
    agent.wait_for("the first pass", || applied(&origin, &revision));
    let base = format!("http://127.0.0.1:{}", agent.port);

    // Without a session every page sends to the login form; its answers carry the walls.
    let (code, head, _) = http_with_head(agent.port, "GET", "/", &[], b"");
    assert_eq!(code, 303, "{head}");
    let (code, head, body) = http_with_head(agent.port, "GET", "/login", &[], b"");
    assert_eq!(code, 200);
    let head = head.to_ascii_lowercase();
    for wanted in [
        "content-security-policy: default-src 'self'; frame-ancestors 'none'",
        "x-content-type-options: nosniff",
        "referrer-policy: same-origin",
        "set-cookie: berth_login=",
        "httponly; samesite=strict",
    ] {
        assert!(head.contains(wanted), "{wanted} missing: {head}");
    }
    assert!(!body.contains("<script>"), "an inline script: {body}");
    // A login without the form's token is refused, even with the right API token.
    let (code, _, _) = http_with_head(
        agent.port,
        "POST",
        "/login",
        &[("Content-Type", "application/x-www-form-urlencoded")],
        format!("token={API_TOKEN}").as_bytes(),
    );
    assert_eq!(code, 401);

    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let browser = browser(&driver).await;
        browser.goto(&format!("{base}/login")).await.unwrap();
        screenshot(&browser, "login").await;
        log_in(&browser, &base, API_TOKEN).await;
        until_page(&browser, "the object listed", |text| {
            text.contains("web") && text.contains("Running") && text.contains("applied")
        })
        .await;
        screenshot(&browser, "overview").await;

        // A push shows with no reload: the page follows passes as they end.
        browser
            .execute("window.berthNotReloaded = true;", vec![])
            .await
            .unwrap();
        let second = origin.commit(
            &[(
                "second.yaml",
                Some(&challenge("second", "  command: [sh, -c, 'exec sleep 3600']\n")),
            )],
            "a second challenge",
        );
        agent.reconcile();
        agent.wait_for("the second pass", || applied(&origin, &second));
        until_page(&browser, "the new object shown live", |text| {
            text.contains("second")
        })
        .await;
        let kept = browser
            .execute("return window.berthNotReloaded === true;", vec![])
            .await
            .unwrap();
        assert_eq!(kept, serde_json::json!(true), "the page was reloaded");

        // A rejected revision's problems are shown at their place, as text: markup in them
        // neither renders nor runs.
        let payload = "<img src=x onerror=\"window.berthXss=1\">";
        let bad = origin.commit(
            &[(
                "bad.yaml",
                Some(&format!(
                    "apiVersion: berth/v1\nkind: Challenge\nmetadata: {{name: '{payload}'}}\nspec: {{image: busybox:latest}}\n"
                )),
            )],
            "<script>window.berthCommit=1</script> a bad name",
        );
        agent.reconcile();
        agent.wait_for("the bad revision rejected", || {
            let (_, status) = agent.api("GET", "/api/v1/status");
            status.contains(&bad) && status.contains("\"rejected\"")
        });
        until_page(&browser, "the problem shown", |text| {
            text.contains("bad.yaml:3:") && text.contains("<img src=x")
        })
        .await;
        let injected = browser
            .execute(
                "return [document.querySelectorAll('main img, main script').length, window.berthXss === undefined, window.berthInfo === undefined, window.berthCommit === undefined];",
                vec![],
            )
            .await
            .unwrap();
        assert_eq!(injected, serde_json::json!([0, true, true, true]));
        screenshot(&browser, "rejected").await;

        // An object's page.
        browser.goto(&format!("{base}/objects/Challenge/web")).await.unwrap();
        until_page(&browser, "the object's page", |text| {
            text.contains("Challenge/web") && text.contains("Parts")
        })
        .await;
        screenshot(&browser, "object").await;
        browser.goto(&format!("{base}/instances")).await.unwrap();
        screenshot(&browser, "instances").await;

        // A pipeline run asked for with its button, and its log followed as it is written, with
        // no reload; markup in the log is text.
        browser.goto(&format!("{base}/objects/Pipeline/ticks")).await.unwrap();
        click(&browser, "form.action button").await;
        until_page(&browser, "the run's page", |text| {
            text.contains("Run #") && text.contains("tick-1")
        })
        .await;
        assert!(
            browser.current_url().await.unwrap().path().starts_with("/runs/"),
            "not on the run's page"
        );
        browser
            .execute("window.berthNotReloaded = true;", vec![])
            .await
            .unwrap();
        until_page(&browser, "the log followed", |text| {
            text.contains("tick-4")
        })
        .await;
        screenshot(&browser, "run").await;
        until_page(&browser, "the run ended", |text| {
            text.contains("tick-6") && text.contains("succeeded")
        })
        .await;
        let page = browser
            .execute(
                "return [window.berthNotReloaded === true, window.berthLog === undefined, document.querySelectorAll('main script').length];",
                vec![],
            )
            .await
            .unwrap();
        assert_eq!(page, serde_json::json!([true, true, 0]));
        browser.goto(&format!("{base}/runs")).await.unwrap();
        screenshot(&browser, "runs").await;

        // The bad file goes again.
        let fixed = origin.commit(&[("bad.yaml", None)], "the bad name goes");
        agent.reconcile();
        agent.wait_for("the fixed revision applied", || applied(&origin, &fixed));

        // Stopping a challenge is a commit on the followed branch that adds only its state line,
        // by the agent, naming who asked; the next pass applies it.
        browser.goto(&format!("{base}/objects/Challenge/web")).await.unwrap();
        click(&browser, "button[name=state][value=stopped]").await;
        until_page(&browser, "the change committed", |text| {
            text.contains("Committed") && text.contains("the next pass applies it")
        })
        .await;
        screenshot(&browser, "committed").await;
        let diff = origin.bare_git(&["show", "--format=%an <%ae>%n%B", "main"]);
        assert!(diff.contains("Requested-by: the console's operator"), "{diff}");
        let changed: Vec<&str> = diff
            .lines()
            .filter(|l| (l.starts_with('+') || l.starts_with('-')) && !l.starts_with("+++") && !l.starts_with("---"))
            .collect();
        assert_eq!(changed, ["+  state: stopped"], "{diff}");
        browser.goto(&format!("{base}/")).await.unwrap();
        until_page(&browser, "the challenge stopped", |text| {
            text.lines().any(|l| l.contains("web") && l.contains("Stopped"))
        })
        .await;

        // The object's phases, and the whole history, come from the status branch's log.
        browser.goto(&format!("{base}/objects/Challenge/web")).await.unwrap();
        until_page(&browser, "the phase history", |text| {
            text.contains("Phase history") && text.contains("Stopped") && text.contains("Running")
        })
        .await;
        browser.goto(&format!("{base}/history")).await.unwrap();
        until_page(&browser, "the status log", |text| {
            text.contains("berth: status of") && text.contains("status/challenge/web.yaml")
        })
        .await;
        screenshot(&browser, "history").await;

        // A protected branch refuses the push: the commit goes to a branch of its own, and the
        // console says to open a pull request.
        let hook = protect_main(&origin);
        browser.goto(&format!("{base}/objects/Challenge/web")).await.unwrap();
        click(&browser, "button[name=state][value=running]").await;
        until_page(&browser, "the pull request asked for", |text| {
            text.contains("Open a pull request") && text.contains("berth/console/challenge-web-")
        })
        .await;
        let branches = origin.bare_git(&["branch", "--list", "berth/console/*"]);
        assert!(branches.contains("berth/console/challenge-web-"), "{branches}");
        std::fs::remove_file(&hook).unwrap();

        // A viewer reads, has no buttons but logging out, and every action is refused.
        click(&browser, "form.logout button").await;
        log_in(&browser, &base, VIEWER_TOKEN).await;
        until_page(&browser, "the viewer's overview", |text| {
            text.contains("second")
        })
        .await;
        let role = browser
            .find(Locator::Css(".role"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert_eq!(role, "signed in as viewer");
        browser.goto(&format!("{base}/objects/Challenge/web")).await.unwrap();
        let buttons = browser.find_all(Locator::Css("main button")).await.unwrap();
        assert!(buttons.is_empty(), "a viewer is shown buttons");
        let refused = browser
            .execute_async(
                "const done = arguments[arguments.length - 1];
                 const csrf = document.querySelector('form.logout input[name=csrf]').value;
                 fetch('/instances/0123456789abcdef/kill', {method: 'POST', credentials: 'same-origin',
                   headers: {'Content-Type': 'application/x-www-form-urlencoded'}, body: 'csrf=' + csrf})
                   .then(r => done(r.status));",
                vec![],
            )
            .await
            .unwrap();
        assert_eq!(refused, serde_json::json!(403));
        screenshot(&browser, "viewer").await;
        browser.close().await.unwrap();
    });
}

/// A QA person's stagings page on the real cluster: where each staging lives, what it runs and
/// where it answers; Stop and Archive are commits of the `state:` line alone, naming the person,
/// that the next pass applies; a protected branch gets a pull request's link.
#[test]
fn a_staging_is_stopped_and_archived_from_the_console_by_commits_and_a_protected_branch_gets_a_pull_request()
 {
    let Some(cluster) = crate::support::cluster::cluster() else {
        return;
    };
    let Some(driver) = driver() else { return };
    let name = cluster.instance.name.clone();
    let ns = format!("{name}-qa");
    let port = crate::support::cluster::node_port(&name);
    let manifests = format!(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: web}}\nspec:\n  replicas: 1\n  selector: {{matchLabels: {{app: web}}}}\n  template:\n    metadata: {{labels: {{app: web}}}}\n    spec:\n      terminationGracePeriodSeconds: 1\n      containers:\n        - name: web\n          image: busybox:${{tag}}\n          imagePullPolicy: IfNotPresent\n          command: [sh, -c, 'echo qa-login > /tmp/index.html; exec httpd -f -p 8080 -h /tmp']\n          readinessProbe: {{tcpSocket: {{port: 8080}}, periodSeconds: 1}}\n---\napiVersion: v1\nkind: Service\nmetadata: {{name: web}}\nspec:\n  type: NodePort\n  selector: {{app: web}}\n  ports: [{{port: 80, targetPort: 8080, nodePort: {port}}}]\n---\napiVersion: networking.k8s.io/v1\nkind: Ingress\nmetadata: {{name: web}}\nspec:\n  rules:\n    - host: qa-login.example.test\n      http:\n        paths:\n          - {{path: /, pathType: Prefix, backend: {{service: {{name: web, port: {{number: 80}}}}}}}}\n"
    );
    let descriptor = format!(
        "# The login feature, for QA.\napiVersion: berth/v1\nkind: Staging\nmetadata: {{name: qa-login}}\nspec:\n  namespace: {ns}   # its own namespace\n  tag: latest\n  manifests: qa\n"
    );
    let origin = Origin::new(&[("qa.yaml", &descriptor), ("qa/web.yaml", &manifests)]);
    let revision = origin.bare_git(&["rev-parse", "main"]);
    let daemon = GitDaemon::start(&origin);
    let web_url = "https://git.example.test/ops/stagings";
    let agent = Agent::start_with(
        &name,
        &daemon.url(),
        &format!("  webUrl: {web_url}\n"),
        &format!("kube: {{kubeconfig: {}}}\n", cluster.kubeconfig.display()),
    );
    agent.wait_for("the first pass", || applied(&origin, &revision));
    assert_eq!(crate::support::cluster::fetch(port), "qa-login");
    let base = format!("http://127.0.0.1:{}", agent.port);
    let changed_lines = |diff: &str| -> Vec<String> {
        diff.lines()
            .filter(|l| {
                (l.starts_with('+') || l.starts_with('-'))
                    && !l.starts_with("+++")
                    && !l.starts_with("---")
            })
            .map(str::to_string)
            .collect()
    };

    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let browser = browser(&driver).await;
        browser.goto(&format!("{base}/login")).await.unwrap();
        browser
            .find(Locator::Id("name"))
            .await
            .unwrap()
            .send_keys("Ada QA")
            .await
            .unwrap();
        browser
            .find(Locator::Id("token"))
            .await
            .unwrap()
            .send_keys(API_TOKEN)
            .await
            .unwrap();
        click(&browser, "form.login button").await;
        browser.goto(&format!("{base}/stagings")).await.unwrap();
        until_page(&browser, "the staging listed", |text| {
            text.contains("qa-login")
                && text.contains(&ns)
                && text.contains("busybox:latest")
                && text.contains(&format!("{port}/tcp"))
                && text.contains("Running")
        })
        .await;
        let link = browser
            .find(Locator::Css("table.stagings a[href^='http://qa-login']"))
            .await
            .expect("the Ingress's URL is a link")
            .attr("href")
            .await
            .unwrap();
        assert_eq!(link.as_deref(), Some("http://qa-login.example.test/"));
        screenshot(&browser, "stagings").await;

        // Stop: a commit of the state line alone, naming who asked; the pass scales it down.
        click(&browser, "tr[data-name=qa-login] button[value=stopped]").await;
        until_page(&browser, "the stop committed", |text| {
            text.contains("Committed") && text.contains("the next pass applies it")
        })
        .await;
        let diff = origin.bare_git(&["show", "--format=%B", "main"]);
        assert!(
            diff.contains("Requested-by: Ada QA, as the console's operator"),
            "{diff}"
        );
        assert_eq!(changed_lines(&diff), ["+  state: stopped"], "{diff}");
        browser.goto(&format!("{base}/stagings")).await.unwrap();
        until_page(&browser, "the staging stopped", |text| {
            text.lines()
                .any(|l| l.contains("qa-login") && l.contains("Stopped"))
        })
        .await;
        assert_eq!(cluster.get(&ns, "deployment/web", "{.spec.replicas}"), "0");

        // Archive from stopped: the line changes in place, comments and layout kept.
        click(&browser, "tr[data-name=qa-login] button[value=archived]").await;
        until_page(&browser, "the archive committed", |text| {
            text.contains("Committed")
        })
        .await;
        let diff = origin.bare_git(&["show", "--format=%B", "main"]);
        assert_eq!(
            changed_lines(&diff),
            ["-  state: stopped", "+  state: archived"],
            "{diff}"
        );
        let file = origin.bare_git(&["show", "main:qa.yaml"]);
        assert!(file.starts_with("# The login feature, for QA.\n"), "{file}");
        assert!(
            file.contains(&format!("namespace: {ns}   # its own namespace")),
            "{file}"
        );
        browser.goto(&format!("{base}/stagings")).await.unwrap();
        until_page(&browser, "the staging archived", |text| {
            text.lines()
                .any(|l| l.contains("qa-login") && l.contains("Archived"))
        })
        .await;
        screenshot(&browser, "stagings-archived").await;

        // A protected branch: the restore goes to a branch of its own, and the page links to
        // opening a pull request from it in the repo's web view.
        let hook = protect_main(&origin);
        click(&browser, "tr[data-name=qa-login] button[value=running]").await;
        until_page(&browser, "the pull request asked for", |text| {
            text.contains("Open a pull request from berth/console/staging-qa-login-")
        })
        .await;
        let pull = browser
            .find(Locator::Css("a.onward"))
            .await
            .unwrap()
            .attr("href")
            .await
            .unwrap()
            .unwrap_or_default();
        assert!(
            pull.starts_with(&format!(
                "{web_url}/compare/main...berth/console/staging-qa-login-"
            )) && pull.ends_with("?expand=1"),
            "{pull}"
        );
        screenshot(&browser, "pull-request").await;
        std::fs::remove_file(&hook).unwrap();
        browser.close().await.unwrap();
    });
}
