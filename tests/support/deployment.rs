//! A deployment under test for the daemon end-to-end tests (process and Docker runtimes): a
//! pools.toml in a temp state directory on reserved loopback ports, run by the real `pdctl`, and
//! always taken down when the test ends; plus the lifecycle scenario both runtimes go through.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::{http, poll, ports};

/// One deployment under test. Dropping it runs `pdctl down`, pass or fail.
pub struct Deployment {
    pub dir: tempfile::TempDir,
    pub file: PathBuf,
    pub project: String,
    pub proxy_port: u16,
    pub decode_base: u16,
}

impl Deployment {
    /// `runtime` is the `[runtime]` table body; probes are short so scenarios take seconds.
    pub fn new(tag: &str, runtime: &str, prefill: u32, decode: u32) -> Self {
        Self::with_decode_extra(tag, runtime, prefill, decode, "")
    }

    /// `decode_extra`: more `[decode]` keys (TOML lines).
    pub fn with_decode_extra(
        tag: &str,
        runtime: &str,
        prefill: u32,
        decode: u32,
        decode_extra: &str,
    ) -> Self {
        let dir = tempfile::tempdir().unwrap();
        // Unique per test run: Docker containers are global, names must not collide.
        let project = format!("t{}-{tag}", std::process::id());
        // One spare port per pool, for a replica added by `scale`.
        let proxy_port = ports::reserve(1);
        let prefill_base = ports::reserve(prefill as u16 + 1);
        let decode_base = ports::reserve(decode as u16 + 1);
        let kv_p = ports::reserve(prefill as u16 + 1);
        let kv_d = ports::reserve(decode as u16 + 1);
        let pool = |replicas: u32, http: u16, kv: u16| {
            format!(
                "replicas = {replicas}\ngpus_per_replica = 0\nhttp_port_base = {http}\nside_channel_port_base = {kv}\nshm_size = \"128Mi\"\nstop_grace_seconds = 3\nprobes.startup.period_seconds = 1\nprobes.liveness.period_seconds = 1\nprobes.liveness.failure_threshold = 3\n"
            )
        };
        let text = format!(
            "project = \"{project}\"\n\n[model]\nname = \"sim-model\"\npath = \"{model}\"\n\n[runtime]\n{runtime}\n\n[prefill]\n{p}\n[decode]\n{d}{decode_extra}\n[proxy]\nlisten = \"127.0.0.1:{proxy_port}\"\n",
            model = dir.path().display(),
            p = pool(prefill, prefill_base, kv_p),
            d = pool(decode, decode_base, kv_d),
        );
        let file = dir.path().join("pools.toml");
        std::fs::write(&file, text).unwrap();
        Deployment {
            dir,
            file,
            project,
            proxy_port,
            decode_base,
        }
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_pdctl"));
        c.args(args)
            .env("PDCTL_STATE_DIR", self.state_dir())
            .env("PDCTL_LOG", "info");
        c
    }

    /// Runs `pdctl <sub> -f FILE <extra>` to completion.
    pub fn run(&self, sub: &str, extra: &[&str]) -> Output {
        let file = self.file.display().to_string();
        let mut args = vec![sub];
        if sub == "logs" {
            args.extend(["--file", &file]);
        } else {
            args.extend(["-f", &file]);
        }
        args.extend(extra);
        self.cmd(&args).output().expect("pdctl runs")
    }

    /// `pdctl up -f FILE` in the foreground, as a child the test signals itself.
    pub fn spawn_up(&self, stdout: std::process::Stdio) -> std::process::Child {
        let file = self.file.display().to_string();
        self.cmd(&["up", "-f", &file])
            .stdout(stdout)
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap()
    }

    pub fn up_detached(&self) -> Output {
        let out = self.run("up", &["-d"]);
        assert!(
            out.status.success(),
            "up -d failed: {}\n{}\ndaemon log:\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.daemon_log()
        );
        out
    }

    pub fn daemon_log(&self) -> String {
        std::fs::read_to_string(self.state_dir().join(&self.project).join("daemon.log"))
            .unwrap_or_default()
    }

    pub fn status(&self) -> Value {
        let out = self.run("status", &["-o", "json"]);
        assert!(
            out.status.success(),
            "status failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("status JSON")
    }

    pub fn instance(&self, name_suffix: &str) -> Value {
        let s = self.status();
        s["instances"]
            .as_array()
            .unwrap()
            .iter()
            .find(|i| i["instance"].as_str().unwrap().ends_with(name_suffix))
            .cloned()
            .unwrap_or_else(|| panic!("no instance {name_suffix} in {s}"))
    }

    /// Polls `status` until `pred` holds (bounded, so a broken daemon fails the test).
    pub fn wait_status(&self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let mut last = Value::Null;
        // Every poll starts a `pdctl status` process: not more often than ten times a second.
        let held = poll(Duration::from_secs(60), Duration::from_millis(100), || {
            last = self.status();
            pred(&last)
        });
        assert!(
            held,
            "timed out waiting for {what}; last status {last:#}\ndaemon log:\n{}",
            self.daemon_log()
        );
        last
    }

    pub fn completion(&self) -> (u16, String) {
        let reply = http::request(
            self.proxy_port,
            "POST",
            "/v1/completions",
            &[],
            r#"{"model":"sim-model","prompt":"The quick brown fox jumps over the lazy dog, twice.","max_tokens":4}"#,
        );
        (reply.status, reply.body)
    }
}

impl Drop for Deployment {
    fn drop(&mut self) {
        let _ = self.run("down", &[]);
    }
}

pub fn all_ready(s: &Value) -> bool {
    let list = s["instances"].as_array().unwrap();
    !list.is_empty() && list.iter().all(|i| i["ready"] == true)
}

pub fn ids(s: &Value) -> Vec<String> {
    s["instances"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["id"].as_str().unwrap_or("").to_string())
        .collect()
}

/// The value of metric `name` on the engine listening on `port`.
pub fn metric(port: u16, name: &str) -> f64 {
    super::metric(&http::get(port, "/metrics").body, name)
}

/// SIGKILLs the daemon whose `status -o json` is `status` and waits until it is gone.
pub fn kill_daemon(status: &Value) {
    let pid = status["pid"]
        .as_u64()
        .expect("status names the daemon's pid")
        .to_string();
    assert!(Command::new("kill")
        .args(["-9", &pid])
        .status()
        .unwrap()
        .success());
    let gone = poll(Duration::from_secs(10), Duration::from_millis(20), || {
        !proc_alive(&pid)
    });
    assert!(gone, "daemon {pid} still alive 10 s after SIGKILL");
}

pub fn proc_alive(pid: &str) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .unwrap_or_default()
            .contains(") Z")
}

/// The scenario both runtimes go through. `kill` kills one engine from outside (SIGKILL);
/// `gone` says whether no engine with these ids is left.
pub fn lifecycle(d: &Deployment, kill: &dyn Fn(&str), gone: &dyn Fn(&[String]) -> bool) {
    let t0 = Instant::now();
    let out = d.up_detached();
    eprintln!("MEASURED up -d to all ready: {:?}", t0.elapsed());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("OpenAI endpoint: http://127.0.0.1:"),
        "{stdout}"
    );
    assert!(stdout.contains("curl "), "{stdout}");
    let s = d.status();
    assert!(all_ready(&s), "{s:#}");
    assert_eq!(s["instances"].as_array().unwrap().len(), 3);

    // A second daemon for the same project is refused.
    let again = d.run("up", &["-d"]);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("already running"));

    // P/D through the proxy, with a real KV pull by a decode.
    let (code, body) = d.completion();
    assert_eq!(code, 200, "{body}");
    let pulls: f64 = (0..2)
        .map(|i| metric(d.decode_base + i, "pdctl_sim_kv_pulls_ok_total"))
        .sum();
    let failed: f64 = (0..2)
        .map(|i| metric(d.decode_base + i, "pdctl_sim_kv_pulls_failed_total"))
        .sum();
    assert_eq!((pulls, failed), (1.0, 0.0));

    // Kill a decode: out of routing, the other decode keeps serving, then it comes back.
    let victim = d.instance("decode-0");
    let t_kill = Instant::now();
    kill(victim["id"].as_str().unwrap());
    d.wait_status("decode-0 to leave readiness", |s| {
        s["instances"]
            .as_array()
            .unwrap()
            .iter()
            .any(|i| i["instance"].as_str().unwrap().ends_with("decode-0") && i["ready"] == false)
    });
    for _ in 0..3 {
        let (code, body) = d.completion();
        assert_eq!(code, 200, "served by the other decode: {body}");
    }
    let s = d.wait_status("decode-0 restarted and ready", |s| {
        all_ready(s)
            && s["instances"].as_array().unwrap().iter().any(|i| {
                i["instance"].as_str().unwrap().ends_with("decode-0") && i["restarts"] == 1
            })
    });
    eprintln!("MEASURED kill to ready again: {:?}", t_kill.elapsed());
    let row = d.instance("decode-0");
    assert!(row["last_exit"].as_str().unwrap().contains("137"), "{row}");
    let before = ids(&s);

    // SIGKILL the daemon, start it again: it adopts the running engines.
    kill_daemon(&s);
    let t_adopt = Instant::now();
    d.up_detached();
    eprintln!(
        "MEASURED daemon restart to ready (adoption): {:?}",
        t_adopt.elapsed()
    );
    let s = d.status();
    assert_eq!(
        ids(&s),
        before,
        "same engines, none restarted or duplicated"
    );
    assert!(s["instances"]
        .as_array()
        .unwrap()
        .iter()
        .all(|i| i["restarts"] == 0));
    let (code, _) = d.completion();
    assert_eq!(code, 200);

    // Scale down: decode-1 drains and goes away.
    let out = d.run("scale", &["decode=1"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("replicas = 1"));
    d.wait_status("decode-1 removed", |s| {
        s["instances"].as_array().unwrap().len() == 2 && all_ready(s)
    });

    let logs = d.run("logs", &["prefill-0", "--tail", "5"]);
    assert!(logs.status.success());
    assert!(String::from_utf8_lossy(&logs.stdout).contains("listening"));

    // Down leaves nothing; a second down is a no-op.
    let t_down = Instant::now();
    let out = d.run("down", &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("MEASURED down: {:?}", t_down.elapsed());
    assert!(gone(&before), "engines left after down");
    let out = d.run("down", &[]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("nothing to do"));
    let st = d.run("status", &[]);
    assert_eq!(st.status.code(), Some(3));
}
