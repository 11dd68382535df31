//! Validation speed: berth against Python `jsonschema` + PyYAML (C loader), side by side.
//!
//! Generates 10,000 descriptors (one file each, the three kinds mixed), then times:
//! - berth's loader in this process (parse, schema check, semantic checks), best of 5;
//! - its peak RSS, measured in a child process that only loads;
//! - `benches/support/validate.py` on the same files against the same `schema/` files, and its
//!   peak RSS.
//!
//! Run: `pip install pyyaml jsonschema && cargo bench --bench validate` (`BERTH_BENCH_N` sets the count).

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use berth::descriptor::{self, LoadOptions};

fn generate(dir: &Path, count: usize) {
    std::fs::create_dir_all(dir.join("deploy")).unwrap();
    // One Deployment as people write them, reading the staging's tag and an override.
    std::fs::write(
        dir.join("deploy/app.yaml"),
        "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: app\nspec:\n  replicas: 1\n  selector:\n    matchLabels: {app: app}\n  template:\n    metadata:\n      labels: {app: app}\n    spec:\n      containers:\n        - name: app\n          image: app:${tag}\n          env:\n            - {name: LOG_LEVEL, value: \"${overrides.LOG_LEVEL}\"}\n          ports: [{containerPort: 8080}]\n",
    )
    .unwrap();
    for i in 0..count {
        let text = match i % 10 {
            0..=5 => format!(
                "apiVersion: berth/v1\nkind: Challenge\nmetadata:\n  name: chal-{i}\n  labels: {{track: web}}\nspec:\n  image: busybox:latest\n  command: [httpd, -f, -p, \"8080\"]\n  ports:\n    - {{container: 8080, host: {port}}}\n  env: {{LOG_LEVEL: info, MODE: prod}}\n  secretEnv:\n    FLAG: {{env: FLAG_{i}}}\n  resources: {{cpus: 0.5, memory: 64Mi, pids: 64}}\n  healthcheck:\n    http: {{port: 8080, path: /}}\n    interval: 10s\n  info: {{category: web, points: 100}}\n",
                port = 10000 + i
            ),
            6..=7 => format!(
                "apiVersion: berth/v1\nkind: Pipeline\nmetadata:\n  name: pipe-{i}\nspec:\n  source: {{url: \"https://example.org/app.git\", ref: main}}\n  triggers:\n    push: {{branches: [main]}}\n    schedule: \"*/15 * * * *\"\n  image: busybox:latest\n  steps:\n    - {{name: test, run: make test}}\n    - {{name: build, run: make, env: {{CC: gcc}}}}\n  timeout: 15m\n  produces: \"app-{i}:{{commit}}\"\n"
            ),
            _ => format!(
                "apiVersion: berth/v1\nkind: Staging\nmetadata:\n  name: stage-{i}\nspec:\n  namespace: stage-{i}\n  tag: v{i}\n  manifests: deploy\n  overrides:\n    app: {{LOG_LEVEL: debug}}\n    secret: {{DB: {{file: /etc/berth/db}}}}\n  ttl: 14d\n"
            ),
        };
        let folder = dir.join(format!("d{:02}", i % 100));
        std::fs::create_dir_all(&folder).unwrap();
        std::fs::write(folder.join(format!("desc-{i}.yaml")), text).unwrap();
    }
}

/// The options `berth validate` loads with: problems found, no descriptor kept whole.
fn validating() -> LoadOptions {
    LoadOptions {
        keep_descriptors: false,
        ..LoadOptions::default()
    }
}

fn peak_rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

fn main() {
    if let Ok(dir) = std::env::var("BERTH_BENCH_CHILD_LOAD") {
        let loaded = descriptor::load(Path::new(&dir), &validating()).unwrap();
        assert!(loaded.is_valid());
        println!("{}", peak_rss_kib().unwrap_or(0));
        return;
    }
    let count: usize = std::env::var("BERTH_BENCH_N")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(10_000);
    let dir = tempfile::tempdir().unwrap();
    generate(dir.path(), count);

    let mut best = Duration::MAX;
    for _ in 0..5 {
        let start = Instant::now();
        let loaded = descriptor::load(dir.path(), &validating()).unwrap();
        best = best.min(start.elapsed());
        assert!(loaded.is_valid(), "{:?}", &loaded.problems[..1]);
        assert_eq!(loaded.valid.values().sum::<usize>(), count);
    }
    let child = Command::new(std::env::current_exe().unwrap())
        .env("BERTH_BENCH_CHILD_LOAD", dir.path())
        .output()
        .unwrap();
    let rss: u64 = String::from_utf8_lossy(&child.stdout)
        .trim()
        .parse()
        .unwrap_or(0);

    println!("validate {count} descriptors");
    println!(
        "  berth (in process, best of 5)   {:>9.1} ms   peak RSS {:.1} MiB",
        ms(best),
        rss as f64 / 1024.0
    );

    let schema = Path::new(env!("CARGO_MANIFEST_DIR")).join("schema");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/support/validate.py");
    let start = Instant::now();
    let python = Command::new("python3")
        .arg(&script)
        .arg(&schema)
        .arg(dir.path())
        .output();
    let elapsed = start.elapsed();
    match python {
        Ok(output) if output.status.success() => {
            let stdout = String::from_utf8_lossy(&output.stdout);
            let mut figures = stdout
                .split_whitespace()
                .map(|f| f.parse().unwrap_or(f64::NAN));
            let inner: f64 = figures.next().unwrap_or(f64::NAN);
            let python_rss_kib: f64 = figures.next().unwrap_or(f64::NAN);
            println!(
                "  python jsonschema + PyYAML C    {:>9.1} ms   peak RSS {:.1} MiB ({:.1} ms with interpreter start)",
                inner,
                python_rss_kib / 1024.0,
                ms(elapsed)
            );
            println!(
                "  speed-up                        {:>9.1}x",
                inner / ms(best)
            );
        }
        Ok(output) => println!(
            "  python: failed: {}",
            String::from_utf8_lossy(&output.stderr)
                .lines()
                .last()
                .unwrap_or("")
        ),
        Err(error) => println!("  python: not run: {error}"),
    }
}

fn ms(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}
