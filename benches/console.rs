//! The web console under load: the real `berth agent` following a local config repo of 1,000
//! Pipelines (objects that need no container, so status holds 1,000 objects at once), measured
//! in one run:
//!
//! - **the overview of 1,000 objects**: the server's time from request to the last byte of the
//!   page, median of 20, with a session; beside it the same agent's `/api/v1/status` (the same
//!   objects as JSON, no template) and Python's `http.server` serving the very same HTML bytes from
//!   a file (the floor of one HTTP answer of that size on this machine). The target is ≤ 50 ms;
//! - **100 open consoles following events**: the agent's resident memory before and after 100
//!   `/console/events` streams are opened and a pass's event has reached them all. The target is
//!   ≤ 10 MiB more.
//!
//! Needs `python3`. Run: `cargo bench --bench console`.

#[path = "support/common.rs"]
mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const INSTANCE: &str = "bench-console";
const TOKEN: &str = "bench-console-token";
const OBJECTS: usize = 1000;
const CONSOLES: usize = 100;

/// One request on a fresh connection; the whole answer, head and body.
fn raw(port: u16, request: &str) -> String {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream.write_all(request.as_bytes()).unwrap();
    let mut answer = String::new();
    let _ = stream.read_to_string(&mut answer);
    answer
}

fn cookie<'a>(answer: &'a str, name: &str) -> &'a str {
    answer
        .lines()
        .filter_map(|l| {
            l.strip_prefix("set-cookie: ")
                .or(l.strip_prefix("Set-Cookie: "))
        })
        .find_map(|c| c.strip_prefix(&format!("{name}=")))
        .and_then(|c| c.split(';').next())
        .unwrap_or_else(|| panic!("no {name} cookie in:\n{answer}"))
}

/// Logs in with the API token through the login form; the session cookie's value.
fn log_in(port: u16) -> String {
    let form = raw(
        port,
        "GET /login HTTP/1.1\r\nHost: b\r\nConnection: close\r\n\r\n",
    );
    let login = cookie(&form, "berth_login").to_string();
    let body = format!("csrf={login}&token={TOKEN}");
    let answer = raw(
        port,
        &format!(
            "POST /login HTTP/1.1\r\nHost: b\r\nConnection: close\r\nCookie: berth_login={login}\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        ),
    );
    cookie(&answer, "berth_session").to_string()
}

/// Milliseconds to fetch `path` whole, median of 20, and the last body.
fn timed(port: u16, path: &str, headers: &str) -> (f64, String) {
    let mut times = Vec::new();
    let mut body = String::new();
    for _ in 0..20 {
        let started = Instant::now();
        let answer = raw(
            port,
            &format!("GET {path} HTTP/1.1\r\nHost: b\r\nConnection: close\r\n{headers}\r\n"),
        );
        times.push(started.elapsed().as_secs_f64() * 1000.0);
        body = answer
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default();
    }
    (common::median(times), body)
}

fn main() {
    let work = tempfile::tempdir().unwrap();
    let repo = work.path().join("repo");
    std::fs::create_dir_all(repo.join("pipelines")).unwrap();
    std::fs::write(repo.join("pipelines/README"), "a context folder\n").unwrap();
    for n in 0..OBJECTS {
        std::fs::write(
            repo.join(format!("pipelines/p{n:04}.yaml")),
            format!(
                "apiVersion: berth/v1\nkind: Pipeline\nmetadata: {{name: p{n:04}}}\nspec:\n  context: pipelines\n  image: busybox:latest\n  steps: [{{name: check, run: \"true\"}}]\n"
            ),
        )
        .unwrap();
    }
    common::git(work.path(), &["init", "-q", "-b", "main", "repo"]);
    common::git(&repo, &["add", "-A"]);
    common::git(&repo, &["commit", "-q", "-m", "1,000 pipelines"]);
    let state = work.path().join("agent");
    std::fs::create_dir_all(&state).unwrap();
    let (config, port) = common::agent_config(
        &state,
        INSTANCE,
        repo.to_str().unwrap(),
        ("unused-webhook-secret", TOKEN),
        "",
    );
    let (_agent, pid) = common::start_agent(&config);
    let bearer = format!("Bearer {TOKEN}");
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let listening = TcpStream::connect(("127.0.0.1", port)).is_ok();
        if listening {
            let (code, body) = common::http(
                port,
                "GET",
                "/api/v1/status",
                &[("Authorization", &bearer)],
                b"",
            );
            let objects = serde_json::from_str::<serde_json::Value>(&body)
                .ok()
                .and_then(|s| s["objects"].as_array().map(Vec::len))
                .unwrap_or(0);
            if code == 200 && objects == OBJECTS {
                break;
            }
        }
        assert!(
            Instant::now() < deadline,
            "the agent never listed {OBJECTS} objects"
        );
        std::thread::sleep(Duration::from_millis(500));
    }

    let session = log_in(port);
    let with_session = format!("Cookie: berth_session={session}\r\n");
    let (overview_ms, page) = timed(port, "/", &with_session);
    assert!(
        page.matches("<tr data-name=").count() == OBJECTS,
        "the overview does not list {OBJECTS} objects"
    );
    let (status_ms, _) = timed(
        port,
        "/api/v1/status",
        &format!("Authorization: {bearer}\r\n"),
    );
    let served = work.path().join("served");
    std::fs::create_dir_all(&served).unwrap();
    std::fs::write(served.join("overview.html"), &page).unwrap();
    let python_port = common::free_port();
    let mut python = Command::new("python3")
        .args([
            "-m",
            "http.server",
            &python_port.to_string(),
            "--bind",
            "127.0.0.1",
        ])
        .current_dir(&served)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    while TcpStream::connect(("127.0.0.1", python_port)).is_err() {
        std::thread::sleep(Duration::from_millis(50));
    }
    let (static_ms, _) = timed(python_port, "/overview.html", "");
    let _ = python.kill();
    let _ = python.wait();
    println!(
        "\nthe overview of {OBJECTS} objects, request to last byte (median of 20; target <= 50 ms)"
    );
    println!(
        "  berth console page ({} KiB)               {overview_ms:>8.1} ms",
        page.len() / 1024
    );
    println!("  berth /api/v1/status, the same as JSON      {status_ms:>8.1} ms");
    println!("  python3 http.server, the same bytes from disk {static_ms:>6.1} ms");

    // 100 consoles following events.
    std::thread::sleep(Duration::from_secs(2));
    let before = common::rss_kib(pid, "VmRSS:");
    let mut streams: Vec<TcpStream> = (0..CONSOLES)
        .map(|_| {
            let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
            stream
                .write_all(
                    format!("GET /console/events HTTP/1.1\r\nHost: b\r\n{with_session}\r\n")
                        .as_bytes(),
                )
                .unwrap();
            stream
                .set_read_timeout(Some(Duration::from_secs(60)))
                .unwrap();
            stream
        })
        .collect();
    let (code, _) = common::http(
        port,
        "POST",
        "/api/v1/reconcile",
        &[("Authorization", &bearer)],
        b"",
    );
    assert_eq!(code, 202);
    for stream in &mut streams {
        let mut seen = Vec::new();
        let mut buffer = [0u8; 4096];
        while !String::from_utf8_lossy(&seen).contains("event: pass") {
            let n = stream.read(&mut buffer).expect("an event within a minute");
            assert!(n > 0, "an event stream ended");
            seen.extend_from_slice(&buffer[..n]);
        }
    }
    let after = common::rss_kib(pid, "VmRSS:");
    println!("\n{CONSOLES} consoles following events, each told of a pass (target <= 10 MiB more)");
    println!(
        "  agent RSS {before} KiB before, {after} KiB with them: {:+} KiB",
        after as i64 - before as i64
    );
    drop(streams);
}
