//! The agent's HTTP server against hostile clients (issue 8, items 11, 12 and 14): the real
//! `berth agent` binary on loopback, flooded with badly signed bodies, held by clients that send
//! half a request, and called with the bearer scheme written as users write it.
//!
//! The agent follows a git server that does not exist: every pass fails, and only the HTTP server
//! matters. Waits are bounded, and a connection the server still holds after a minute counts as
//! held for ever. One test asserts a time: a kubelet's probe gives up after one second, so a
//! health probe's answer must come within it.

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::sync::{Arc, Barrier};
use std::time::Duration;

use crate::support::agent::{API_TOKEN, Agent};
use crate::support::net::{http, status_code};

/// No git server listens here.
const NOWHERE: &str = "git://127.0.0.1:9/nothing.git";

/// A well-formed GitHub signature that matches no body.
const WRONG_SIGNATURE: &str =
    "sha256=0000000000000000000000000000000000000000000000000000000000000000";

/// Longest wait for the server to answer or close; longer means it holds the client for ever.
const PATIENCE: Duration = Duration::from_secs(60);

/// An agent with `env` set, `extra` appended to its config.
fn agent(name: &str, extra: &str, env: &[(&str, &str)]) -> Agent {
    let mut agent = Agent::configure(name, NOWHERE, "", extra);
    agent
        .env
        .extend(env.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    agent.spawn();
    agent
}

/// Opens a connection and sends `bytes` on it, leaving it open.
fn send(port: u16, bytes: &[u8]) -> TcpStream {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    stream.write_all(bytes).expect("send");
    stream
}

/// A POST's head to a webhook endpoint, declaring a body of `length` bytes.
fn hook_head(provider: &str, headers: &[(&str, &str)], length: usize) -> String {
    let mut head = format!(
        "POST /hooks/{provider} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nContent-Length: {length}\r\n"
    );
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head + "\r\n"
}

/// What the server sent before it closed `stream`; `None` when it still holds the connection
/// after [`PATIENCE`].
fn until_closed(stream: &mut TcpStream) -> Option<String> {
    stream.set_read_timeout(Some(PATIENCE)).unwrap();
    let mut received = Vec::new();
    let mut buffer = [0u8; 4096];
    loop {
        match stream.read(&mut buffer) {
            Ok(0) => break,
            Ok(n) => received.extend_from_slice(&buffer[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return None;
            }
            // A reset after an early answer: what arrived before it counts.
            Err(_) => break,
        }
    }
    Some(String::from_utf8_lossy(&received).into_owned())
}

/// A line of the agent's `/proc/PID/status`, in kB (`VmHWM`, `RssAnon`, …).
fn memory_kb(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|line| line.strip_prefix(&format!("{field}:")))
        .and_then(|value| value.split_whitespace().next())
        .and_then(|kb| kb.parse().ok())
        .unwrap_or_else(|| panic!("no {field} in\n{status}"))
}

/// How many descriptors the agent has open.
fn open_descriptors(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

/// Issue 8, item 14: `Authorization: bearer TOKEN` got 401, though the scheme is
/// case-insensitive (RFC 7235).
#[test]
fn the_bearer_scheme_is_case_insensitive() {
    let agent = agent("bearer", "", &[]);
    let accepted = [
        format!("bearer {API_TOKEN}"),
        format!("BEARER {API_TOKEN}"),
        format!("Bearer    {API_TOKEN}   "),
        format!("bEaReR\t{API_TOKEN}"),
    ];
    for value in &accepted {
        let (code, body) = agent.request("GET", "/api/v1/status", &[("Authorization", value)], b"");
        assert_eq!(code, 200, "{value:?}: {body}");
    }
    let refused = [
        format!("Basic {API_TOKEN}"),
        format!("Bearer{API_TOKEN}"),
        format!("Bearer {API_TOKEN}x"),
        "Bearer".to_string(),
    ];
    for value in &refused {
        let (code, _) = agent.request("GET", "/api/v1/status", &[("Authorization", value)], b"");
        assert_eq!(code, 401, "{value:?}");
    }
}

/// Issue 8, item 11: a delivery with no signature, a malformed one, or a body declared over
/// `webhook.maxBody` was refused only after its whole body was read. Now the headers alone
/// decide: these clients send no body at all and still get their answer.
#[test]
fn what_the_headers_refuse_is_refused_before_the_body_arrives() {
    let agent = agent("hooks-early", "", &[]);
    type Headers<'a> = &'a [(&'a str, &'a str)];
    // Provider, headers, declared length, expected answer.
    let cases: [(&str, Headers, usize, u16); 5] = [
        ("github", &[("X-GitHub-Event", "push")], 4000, 401),
        (
            "github",
            &[("X-Hub-Signature-256", "sha256=not-hex")],
            4000,
            401,
        ),
        ("gitea", &[("X-Gitea-Signature", "00ff")], 4000, 401),
        ("gitlab", &[("X-Gitlab-Token", "guess")], 4000, 401),
        (
            "github",
            &[("X-Hub-Signature-256", WRONG_SIGNATURE)],
            1 << 30,
            413,
        ),
    ];
    for (provider, headers, length, expected) in cases {
        let mut stream = send(agent.port, hook_head(provider, headers, length).as_bytes());
        let answer = until_closed(&mut stream)
            .unwrap_or_else(|| panic!("{provider} {headers:?}: no answer without the body"));
        assert_eq!(
            status_code(&answer),
            expected,
            "{provider} {headers:?}: {answer}"
        );
    }
}

/// Issue 8, item 11, the same class: a body sent in chunks declares no length, so it is cut off
/// as it streams past `webhook.maxBody` (4 KiB in these tests), never read whole. axum's body
/// limit did this before; the guard stays now that hooks read their bodies themselves.
#[test]
fn a_chunked_body_over_the_limit_is_cut_off_as_it_streams() {
    let agent = agent("hooks-chunked", "", &[]);
    let mut stream = send(
        agent.port,
        format!(
            "POST /hooks/github HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nTransfer-Encoding: chunked\r\nX-Hub-Signature-256: {WRONG_SIGNATURE}\r\n\r\n"
        )
        .as_bytes(),
    );
    let chunk = format!("400\r\n{}\r\n", "x".repeat(0x400));
    for _ in 0..5 {
        if stream.write_all(chunk.as_bytes()).is_err() {
            break;
        }
    }
    // No last chunk: the answer must not wait for the end of the body.
    let answer = until_closed(&mut stream).expect("an answer before the body ends");
    assert_eq!(status_code(&answer), 413, "{answer}");
}

/// Issue 8, item 11: concurrent webhook bodies were unbounded. Now at most
/// `webhook.maxConcurrent` are read at once; the next delivery gets 503 with `Retry-After`, and a
/// slot is free again once a delivery is answered.
#[test]
fn webhook_bodies_read_at_once_are_bounded() {
    let agent = agent(
        "hooks-busy",
        "",
        &[
            ("BERTH_WEBHOOK_MAX_CONCURRENT", "2"),
            // Long enough that the held deliveries are not cut off while the test runs.
            ("BERTH_HTTP_BODY_TIMEOUT", "10m"),
        ],
    );
    let signed = [("X-Hub-Signature-256", WRONG_SIGNATURE)];
    let mut held: Vec<TcpStream> = (0..2)
        .map(|_| {
            let mut request = hook_head("github", &signed, 1000).into_bytes();
            request.extend_from_slice(&[b' '; 10]);
            send(agent.port, &request)
        })
        .collect();
    let small = hook_head("github", &signed, 2) + "{}";
    // The held deliveries take their slots as soon as their headers are read.
    let busy = std::cell::RefCell::new(String::new());
    agent.wait_for("a delivery refused as busy", || {
        *busy.borrow_mut() =
            until_closed(&mut send(agent.port, small.as_bytes())).unwrap_or_default();
        status_code(&busy.borrow()) == 503
    });
    let busy = busy.into_inner();
    assert!(
        busy.to_ascii_lowercase().contains("\r\nretry-after: 1\r\n"),
        "{busy}"
    );
    for stream in &mut held {
        stream.write_all(&[b' '; 990]).unwrap();
        let answer = until_closed(stream).expect("an answer once the body is complete");
        assert_eq!(status_code(&answer), 401, "{answer}");
    }
    let answer = until_closed(&mut send(agent.port, small.as_bytes())).unwrap();
    assert_eq!(status_code(&answer), 401, "a slot is free again: {answer}");
    let (_, metrics) = agent.api("GET", "/metrics");
    assert!(
        metrics.contains("berth_webhook_requests_total{provider=\"github\",result=\"busy\"}"),
        "{metrics}"
    );
}

/// Issue 8, item 11: 300 concurrent 1 MB bodies with bad signatures took the agent to 180 MB of
/// RSS. The target is a peak under 64 MiB.
#[test]
fn a_flood_of_badly_signed_megabyte_bodies_stays_under_64_mib() {
    const FLOOD: usize = 300;
    const BODY: usize = 1 << 20;
    let agent = agent(
        "hooks-flood",
        "",
        &[("BERTH_WEBHOOK_MAX_BODY", &BODY.to_string())],
    );
    let pid = agent.pid();
    let mut request =
        hook_head("github", &[("X-Hub-Signature-256", WRONG_SIGNATURE)], BODY).into_bytes();
    request.resize(request.len() + BODY, b'x');
    let request = Arc::new(request);
    let start = Arc::new(Barrier::new(FLOOD));
    let senders: Vec<_> = (0..FLOOD)
        .map(|_| {
            let (request, start, port) = (Arc::clone(&request), Arc::clone(&start), agent.port);
            std::thread::spawn(move || {
                let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connect");
                start.wait();
                // A refusal may come, and the connection close, before the body is sent.
                let _ = stream.write_all(&request);
                status_code(&until_closed(&mut stream).unwrap_or_default())
            })
        })
        .collect();
    let codes: Vec<u16> = senders.into_iter().map(|s| s.join().unwrap()).collect();
    let peak_mib = memory_kb(pid, "VmHWM") / 1024;
    eprintln!(
        "flood: {} answered 401, {} answered 503, {} reset; agent peak RSS {peak_mib} MiB",
        codes.iter().filter(|c| **c == 401).count(),
        codes.iter().filter(|c| **c == 503).count(),
        codes.iter().filter(|c| **c == 0).count(),
    );
    assert!(codes.iter().all(|c| [0, 401, 503].contains(c)), "{codes:?}");
    assert!(peak_mib < 64, "peak RSS {peak_mib} MiB under the flood");
    assert_eq!(agent.request("GET", "/healthz", &[], b"").0, 200);
}

/// Issue 8, item 12: connections that sent half their headers, or nothing, or a body that never
/// ended, stayed open for ever. Now each is cut off by `http.headerTimeout` or
/// `http.bodyTimeout`.
#[test]
fn clients_that_stall_are_cut_off() {
    let agent = agent(
        "slow",
        "",
        &[
            ("BERTH_HTTP_HEADER_TIMEOUT", "1s"),
            ("BERTH_HTTP_BODY_TIMEOUT", "1s"),
        ],
    );
    let mut half_headers = send(
        agent.port,
        b"POST /hooks/github HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Hub-Sig",
    );
    assert!(
        until_closed(&mut half_headers).is_some(),
        "half a request's headers held the connection"
    );
    let mut silent = send(agent.port, b"");
    assert!(
        until_closed(&mut silent).is_some(),
        "a connection that sent nothing was held"
    );
    let mut request =
        hook_head("github", &[("X-Hub-Signature-256", WRONG_SIGNATURE)], 100).into_bytes();
    request.extend_from_slice(&[b' '; 10]);
    let mut trickle = send(agent.port, &request);
    let answer = until_closed(&mut trickle).expect("a body that never ends is cut off");
    assert_eq!(status_code(&answer), 408, "{answer}");
    // An idle kept-alive connection is closed too, after its answer.
    let mut idle = send(
        agent.port,
        b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
    );
    let answer = until_closed(&mut idle).expect("an idle kept-alive connection is closed");
    assert_eq!(status_code(&answer), 200, "{answer}");
}

/// Issue 8, item 12, the same class: each client that sent headers without end could make the
/// agent buffer 400 KiB of them until the header timeout, so 256 of them held 100 MiB. Now a
/// request's headers may take 16 KiB, and such clients are cut off as they pass it.
#[test]
fn headers_without_end_hold_little_memory() {
    const CLIENTS: usize = 200;
    let agent = agent("big-headers", "", &[]);
    let pid = agent.pid();
    let start = Arc::new(Barrier::new(CLIENTS));
    let clients: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let (start, port) = (Arc::clone(&start), agent.port);
            std::thread::spawn(move || {
                let mut stream = send(port, b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n");
                start.wait();
                let line = format!("X-Filler: {}\r\n", "a".repeat(1000));
                for _ in 0..300 {
                    // The server stops reading, and closes, once the headers are too large.
                    if stream.write_all(line.as_bytes()).is_err() {
                        break;
                    }
                }
                until_closed(&mut stream).is_some()
            })
        })
        .collect();
    let closed = clients
        .into_iter()
        .filter_map(|c| c.join().unwrap().then_some(()))
        .count();
    let peak_mib = memory_kb(pid, "VmHWM") / 1024;
    eprintln!("endless headers: {closed} of {CLIENTS} cut off; agent peak RSS {peak_mib} MiB");
    assert_eq!(closed, CLIENTS);
    assert!(peak_mib < 64, "peak RSS {peak_mib} MiB");
}

/// Issue 8, item 12: 3,000 slow clients each held a descriptor, so under a limit of 1,024 open
/// files the agent had none left for git or the engine. Now open connections stay under half the
/// process's file limit (here 64, set with `prlimit`) and the agent serves again once they go.
#[test]
fn open_connections_stay_under_half_the_file_limit() {
    const FILE_LIMIT: usize = 64;
    let mut agent = Agent::configure("fd-cap", NOWHERE, "", "");
    agent
        .env
        .push(("BERTH_HTTP_HEADER_TIMEOUT".into(), "2s".into()));
    agent.launcher = vec![
        "prlimit".into(),
        format!("--nofile={FILE_LIMIT}:{FILE_LIMIT}"),
    ];
    agent.spawn();
    let pid = agent.pid();
    let before = open_descriptors(pid);
    let mut slow = Vec::new();
    let mut most = before;
    for _ in 0..3 * FILE_LIMIT {
        // Clients beyond the accept queue may not connect at all; that is the kernel's choice.
        let Ok(mut stream) =
            TcpStream::connect_timeout(&([127, 0, 0, 1], agent.port).into(), PATIENCE)
        else {
            continue;
        };
        let _ = stream.write_all(b"GET /healthz HTTP/1.1\r\nHost: 127.");
        slow.push(stream);
        most = most.max(open_descriptors(pid));
    }
    for _ in 0..20 {
        most = most.max(open_descriptors(pid));
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        most <= before + FILE_LIMIT / 2,
        "{most} descriptors open, {before} before {} slow clients",
        slow.len()
    );
    drop(slow);
    agent.wait_for("the agent to serve again", || {
        agent.request("GET", "/healthz", &[], b"").0 == 200
    });
    let log = agent.log();
    assert!(log.contains("max_connections=32"), "{log}");
    assert!(!log.contains("Too many open files"), "{log}");
}

/// Issue 19, item 9: with a thousand clients holding `listen` by sending half a request (every
/// slot taken, the rest queued in the kernel), probes on `http.healthListen` are still answered
/// within a second, as a kubelet's probe needs.
#[test]
fn probes_on_the_health_listener_are_answered_within_a_second_under_a_flood() {
    const CLIENTS: usize = 1000;
    let health = crate::support::net::free_port();
    let agent = agent(
        "probes",
        &format!("http: {{healthListen: 127.0.0.1:{health}}}\n"),
        &[],
    );
    let flood: Vec<TcpStream> = (0..CLIENTS)
        .filter_map(|_| {
            let mut stream = TcpStream::connect(("127.0.0.1", agent.port)).ok()?;
            stream.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n").ok()?;
            Some(stream)
        })
        .collect();
    assert!(flood.len() > 500, "only {} clients connected", flood.len());
    for _ in 0..5 {
        let asked = std::time::Instant::now();
        let (code, body) = http(health, "GET", "/healthz", &[], b"");
        let took = asked.elapsed();
        assert_eq!((code, body.as_str()), (200, "ok\n"));
        assert!(took < Duration::from_secs(1), "/healthz took {took:?}");
        // Ready or not (this agent's git server does not exist), it answers at once.
        let asked = std::time::Instant::now();
        let (code, body) = http(health, "GET", "/readyz", &[], b"");
        assert_eq!(code, 503, "{body}");
        assert!(asked.elapsed() < Duration::from_secs(1));
        std::thread::sleep(Duration::from_millis(300));
    }
    // Nothing else is served there.
    assert_eq!(http(health, "GET", "/api/v1/status", &[], b"").0, 404);
    drop(flood);
}
