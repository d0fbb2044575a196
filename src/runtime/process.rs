//! The process runtime: engines as local child processes, one process group each, output to a
//! log file in the state directory, and a record file per instance (pid, start time, spec
//! hash, labels) so that a restarted daemon adopts what is still running and can tell a live
//! engine from a recycled pid.

use std::collections::BTreeMap;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::BoxFuture;
use futures_util::stream::BoxStream;
use futures_util::{FutureExt, StreamExt};
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

use super::{ExitInfo, Observed, Progress, RunState, Runtime, RuntimeError, RuntimeEvent};
use crate::plan::{label, merge_env, EnvVar, Instance};

/// What the state directory remembers about one instance.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Record {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub spec_hash: String,
    /// The instance's stop signal, so that `stop`, which gets only a name, sends the right
    /// one. Absent in records written before it was kept: SIGTERM then.
    #[serde(default)]
    pub stop_signal: Option<String>,
    pub pid: Option<u32>,
    /// `/proc/<pid>/stat` field 22: with the pid, identifies the process across pid reuse.
    pub start_ticks: Option<u64>,
    /// Known only for children of this daemon.
    pub exit_code: Option<i64>,
}

pub struct ProcessRuntime {
    dir: PathBuf,
    events: broadcast::Sender<RuntimeEvent>,
    /// Serialises read-modify-write of records: without it, the reaper of an old process
    /// could write its exit back over the record of the process that replaced it.
    records: Arc<Mutex<()>>,
    /// Variables of the daemon's own environment engines must not inherit (the proxy's API key).
    withheld_env: Vec<String>,
}

impl ProcessRuntime {
    /// `dir` is the project's state directory; records and logs go below it.
    pub fn new(dir: &Path) -> Result<Self, RuntimeError> {
        for sub in ["instances", "logs"] {
            std::fs::create_dir_all(dir.join(sub)).map_err(|source| RuntimeError::Process {
                op: "prepare the state directory for",
                name: dir.display().to_string(),
                source,
            })?;
        }
        Ok(ProcessRuntime {
            dir: dir.to_path_buf(),
            events: broadcast::channel(64).0,
            records: Arc::new(Mutex::new(())),
            withheld_env: Vec::new(),
        })
    }

    /// Engines start without these variables of the daemon's environment.
    pub fn withholding(mut self, names: &[String]) -> Self {
        self.withheld_env = names.to_vec();
        self
    }

    fn record_path(&self, name: &str) -> PathBuf {
        self.dir.join("instances").join(format!("{name}.json"))
    }

    pub fn log_path(&self, name: &str) -> PathBuf {
        self.dir.join("logs").join(format!("{name}.log"))
    }

    fn read(&self, name: &str) -> Option<Record> {
        let text = std::fs::read_to_string(self.record_path(name)).ok()?;
        serde_json::from_str(&text).ok()
    }

    fn write(&self, rec: &Record) -> Result<(), RuntimeError> {
        let path = self.record_path(&rec.name);
        let tmp = path.with_extension("tmp");
        let io = |source| RuntimeError::Process {
            op: "record",
            name: rec.name.clone(),
            source,
        };
        std::fs::write(&tmp, serde_json::to_vec(rec).expect("record serialises")).map_err(io)?;
        std::fs::rename(&tmp, &path).map_err(io)
    }

    fn alive(rec: &Record) -> bool {
        match (rec.pid, rec.start_ticks) {
            (Some(pid), Some(ticks)) => proc_start_ticks(pid) == Some(ticks),
            _ => false,
        }
    }
}

/// The start time of a live (not zombie) process, from `/proc/<pid>/stat`.
pub fn proc_start_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may contain spaces and parentheses: fields start after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    if matches!(fields.first(), Some(&"Z") | Some(&"X")) {
        return None;
    }
    fields.get(19)?.parse().ok()
}

fn signal_group(pid: u32, sig: i32) {
    // process_group(0) made the engine the leader of group `pid`: this reaches its workers too.
    // SAFETY: kill(2) has no memory effects; a stale group only yields ESRCH.
    unsafe {
        libc::kill(-(pid as i32), sig);
    }
}

/// The live (not zombie) processes of process group `pgid`, from `/proc`.
fn group_members(pgid: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
                return false;
            };
            let Some(close) = stat.rfind(')') else {
                return false;
            };
            // After the command name: state, ppid, pgrp.
            let fields: Vec<&str> = stat[close + 1..].split_whitespace().take(3).collect();
            !matches!(fields.first(), Some(&"Z") | Some(&"X"))
                && fields.get(2).and_then(|g| g.parse::<u32>().ok()) == Some(pgid)
        })
        .collect()
}

/// Whether the process group that `rec`'s engine led still has members that are ours. vLLM's
/// EngineCore and workers outlive a SIGKILLed API server in its group, holding the engine's
/// ports. While any member lives, the kernel keeps the group's id from being handed out again,
/// so the members of a group whose leader is gone are the engine's orphans; a live process with
/// the leader's pid but another start time means the id was reused and the group is not ours.
fn owned_group(rec: &Record) -> Option<u32> {
    let pid = rec.pid?;
    match proc_start_ticks(pid) {
        Some(ticks) if Some(ticks) != rec.start_ticks => None,
        _ => (!group_members(pid).is_empty()).then_some(pid),
    }
}

/// Signals the group with `sig`, gives it `grace` to exit, then SIGKILLs whatever is left and
/// waits (bounded) until the group is empty, so that its ports are free when this returns.
async fn end_group(pgid: u32, sig: i32, grace: Duration) {
    signal_group(pgid, sig);
    let deadline = tokio::time::Instant::now() + grace;
    while !group_members(pgid).is_empty() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    signal_group(pgid, libc::SIGKILL);
    // A process in uninterruptible sleep ignores even SIGKILL for a while; don't hang on it.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !group_members(pgid).is_empty() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn signal_number(name: &str) -> i32 {
    match name.trim_start_matches("SIG") {
        "INT" => libc::SIGINT,
        "KILL" => libc::SIGKILL,
        "QUIT" => libc::SIGQUIT,
        "HUP" => libc::SIGHUP,
        _ => libc::SIGTERM,
    }
}

/// The env of a process on this host: the plan's host bindings and the process runtime's own,
/// GPU pinning by `CUDA_VISIBLE_DEVICES` (empty without GPUs: a CPU engine sees none), then the
/// engine's env.
pub fn env(inst: &Instance) -> Vec<EnvVar> {
    let ids: Vec<String> = inst.gpus.iter().map(|g| g.index.to_string()).collect();
    let mut bindings = inst.host_env();
    bindings.extend([
        // NVML indices are PCI bus order; CUDA's default order is "fastest first".
        EnvVar::new("CUDA_DEVICE_ORDER", "PCI_BUS_ID"),
        EnvVar::new("CUDA_VISIBLE_DEVICES", ids.join(",")),
    ]);
    merge_env(bindings, &inst.engine.env)
}

/// argv[0] `pdctl` means this very executable (the plan writes `["pdctl", "sim", ...]`).
fn program(argv0: &str) -> PathBuf {
    if argv0 == "pdctl" {
        if let Ok(exe) = std::env::current_exe() {
            return exe;
        }
    }
    PathBuf::from(argv0)
}

impl Runtime for ProcessRuntime {
    fn kind(&self) -> &'static str {
        "process"
    }

    fn ensure_image<'a>(
        &'a self,
        inst: &'a Instance,
        _progress: Progress<'a>,
    ) -> BoxFuture<'a, Result<(), RuntimeError>> {
        async move {
            if inst.engine.command.is_empty() {
                return Err(RuntimeError::EmptyArgv {
                    name: inst.name.clone(),
                });
            }
            Ok(())
        }
        .boxed()
    }

    fn create<'a>(&'a self, inst: &'a Instance) -> BoxFuture<'a, Result<String, RuntimeError>> {
        async move {
            let _records = self.records.lock().unwrap_or_else(|p| p.into_inner());
            self.write(&Record {
                name: inst.name.clone(),
                labels: inst.labels.clone(),
                spec_hash: inst.spec_hash.clone(),
                stop_signal: Some(inst.stop_signal.clone()),
                ..Record::default()
            })?;
            Ok(inst.name.clone())
        }
        .boxed()
    }

    fn start<'a>(&'a self, inst: &'a Instance) -> BoxFuture<'a, Result<(), RuntimeError>> {
        async move {
            let name = inst.name.clone();
            let io = |op| {
                let name = name.clone();
                move |source| RuntimeError::Process { op, name, source }
            };
            let previous = {
                let _records = self.records.lock().unwrap_or_else(|p| p.into_inner());
                match self.read(&name) {
                    Some(r) if Self::alive(&r) => return Ok(()),
                    r => r,
                }
            };
            // What a previous run left in its group (its leader killed) still holds the
            // engine's ports: the new engine would die on "address in use" until it is gone.
            if let Some(pgid) = previous.as_ref().and_then(owned_group) {
                tracing::warn!(instance = %name, pgid, "ending the previous run's leftover processes");
                end_group(pgid, libc::SIGKILL, Duration::ZERO).await;
            }
            let _records = self.records.lock().unwrap_or_else(|p| p.into_inner());
            let argv = inst.argv();
            let (argv0, args) = argv
                .split_first()
                .ok_or(RuntimeError::EmptyArgv { name: name.clone() })?;
            let log = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(self.log_path(&name))
                .map_err(io("open the log of"))?;
            let mut cmd = tokio::process::Command::new(program(argv0));
            for name in &self.withheld_env {
                cmd.env_remove(name);
            }
            cmd.args(args)
                .envs(env(inst).iter().map(|e| (&e.name, &e.value)))
                .stdin(Stdio::null())
                .stdout(log.try_clone().map_err(io("open the log of"))?)
                .stderr(log)
                // Its own group: Ctrl-C at the terminal reaches only the daemon, which stops
                // engines gracefully, and a SIGKILLed daemon leaves them running for adoption.
                .process_group(0);
            // SAFETY: the closure only calls async-signal-safe functions between fork and exec.
            unsafe {
                cmd.pre_exec(|| {
                    reset_signals();
                    Ok(())
                });
            }
            let mut child = cmd.spawn().map_err(io("start"))?;
            let pid = child.id().unwrap_or_default();
            let rec = Record {
                name: name.clone(),
                labels: inst.labels.clone(),
                spec_hash: inst.spec_hash.clone(),
                stop_signal: Some(inst.stop_signal.clone()),
                pid: Some(pid),
                start_ticks: proc_start_ticks(pid),
                exit_code: None,
            };
            self.write(&rec)?;
            let record_path = self.record_path(&name);
            let events = self.events.clone();
            let records = self.records.clone();
            tokio::spawn(async move {
                use std::os::unix::process::ExitStatusExt;
                let Ok(status) = child.wait().await else {
                    return;
                };
                let code = status
                    .code()
                    .map(i64::from)
                    .or_else(|| status.signal().map(|s| 128 + i64::from(s)));
                // Only if the record still describes this process (not a newer start).
                let guard = records.lock().unwrap_or_else(|p| p.into_inner());
                if let Ok(text) = std::fs::read_to_string(&record_path) {
                    if let Ok(mut r) = serde_json::from_str::<Record>(&text) {
                        if r.pid == Some(pid) {
                            r.exit_code = code;
                            // Atomically: `list` reads records without the lock.
                            let tmp = record_path.with_extension("tmp");
                            let bytes = serde_json::to_vec(&r).unwrap_or_default();
                            if std::fs::write(&tmp, bytes).is_ok() {
                                let _ = std::fs::rename(&tmp, &record_path);
                            }
                        }
                    }
                }
                drop(guard);
                let _ = events.send(RuntimeEvent {
                    name,
                    action: "die".into(),
                });
            });
            Ok(())
        }
        .boxed()
    }

    fn stop<'a>(
        &'a self,
        name: &'a str,
        grace: Duration,
    ) -> BoxFuture<'a, Result<(), RuntimeError>> {
        async move {
            let Some(rec) = self.read(name) else {
                return Ok(());
            };
            // Not only while the leader lives: a dead leader's workers linger in its group.
            let Some(pgid) = owned_group(&rec) else {
                return Ok(());
            };
            let sig = rec
                .stop_signal
                .as_deref()
                .map_or(libc::SIGTERM, signal_number);
            end_group(pgid, sig, grace).await;
            Ok(())
        }
        .boxed()
    }

    fn remove<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<(), RuntimeError>> {
        async move {
            self.stop(name, Duration::ZERO).await?;
            let _ = std::fs::remove_file(self.record_path(name));
            let _ = std::fs::remove_file(self.log_path(name));
            Ok(())
        }
        .boxed()
    }

    fn list<'a>(&'a self, project: &'a str) -> BoxFuture<'a, Result<Vec<Observed>, RuntimeError>> {
        async move {
            let dir = self.dir.join("instances");
            let entries = std::fs::read_dir(&dir).map_err(|source| RuntimeError::Process {
                op: "list",
                name: dir.display().to_string(),
                source,
            })?;
            let mut out = Vec::new();
            for entry in entries.flatten() {
                let path = entry.path();
                if path.extension().and_then(|e| e.to_str()) != Some("json") {
                    continue;
                }
                let Some(rec) = std::fs::read_to_string(&path)
                    .ok()
                    .and_then(|t| serde_json::from_str::<Record>(&t).ok())
                else {
                    continue;
                };
                if rec.labels.get(label::PROJECT).map(String::as_str) != Some(project) {
                    continue;
                }
                let (state, exit) = match rec.pid {
                    None => (RunState::Created, None),
                    Some(_) if Self::alive(&rec) => (RunState::Running, None),
                    Some(_) => (
                        RunState::Exited,
                        Some(ExitInfo {
                            code: rec.exit_code,
                            oom_killed: false,
                        }),
                    ),
                };
                out.push(Observed {
                    id: rec.pid.map(|p| p.to_string()).unwrap_or_default(),
                    role: label::role(&rec.labels),
                    name: rec.name,
                    spec_hash: rec.spec_hash,
                    labels: rec.labels,
                    state,
                    exit,
                });
            }
            out.sort_by(|a, b| a.name.cmp(&b.name));
            Ok(out)
        }
        .boxed()
    }

    fn logs(
        &self,
        name: &str,
        tail: Option<usize>,
        follow: bool,
    ) -> BoxStream<'static, Result<Bytes, RuntimeError>> {
        let path = self.log_path(name);
        let name = name.to_string();
        let first = (|| -> std::io::Result<(Bytes, u64)> {
            let mut f = std::fs::File::open(&path)?;
            let mut all = Vec::new();
            f.read_to_end(&mut all)?;
            let len = all.len() as u64;
            Ok((Bytes::from(tail_lines(&all, tail).to_vec()), len))
        })();
        let (head, offset) = match first {
            Ok(x) => x,
            Err(source) => {
                let err = RuntimeError::Process {
                    op: "read logs of",
                    name,
                    source,
                };
                return futures_util::stream::once(async move { Err(err) }).boxed();
            }
        };
        let head = futures_util::stream::once(async move { Ok(head) });
        if !follow {
            return head.boxed();
        }
        let more = futures_util::stream::unfold((path, offset), |(path, mut offset)| async move {
            loop {
                tokio::time::sleep(Duration::from_millis(200)).await;
                let Ok(mut f) = std::fs::File::open(&path) else {
                    return None;
                };
                let len = f.metadata().map(|m| m.len()).unwrap_or(0);
                if len < offset {
                    offset = 0;
                }
                if len > offset && f.seek(SeekFrom::Start(offset)).is_ok() {
                    let mut buf = Vec::new();
                    if f.read_to_end(&mut buf).is_ok() {
                        offset += buf.len() as u64;
                        return Some((Ok(Bytes::from(buf)), (path, offset)));
                    }
                }
            }
        });
        head.chain(more).boxed()
    }

    fn events(&self, _project: &str) -> BoxStream<'static, RuntimeEvent> {
        let rx = self.events.subscribe();
        futures_util::stream::unfold(rx, |mut rx| async move {
            loop {
                match rx.recv().await {
                    Ok(e) => return Some((e, rx)),
                    Err(broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(broadcast::error::RecvError::Closed) => return None,
                }
            }
        })
        .boxed()
    }
}

/// The last `n` lines of `buf` (all of it for `None`).
pub fn tail_lines(buf: &[u8], n: Option<usize>) -> &[u8] {
    let Some(n) = n else { return buf };
    let body = buf.strip_suffix(b"\n").unwrap_or(buf);
    let mut seen = 0;
    for (i, b) in body.iter().enumerate().rev() {
        if *b == b'\n' {
            seen += 1;
            if seen == n {
                return &buf[i + 1..];
            }
        }
    }
    if n == 0 {
        &buf[buf.len()..]
    } else {
        buf
    }
}

/// A daemon started from a script's `cmd &` ignores SIGINT and SIGQUIT, and an engine would
/// inherit that and could never be stopped with its own stop signal: every engine starts with
/// default signal handling and nothing blocked.
fn reset_signals() {
    // SAFETY: signal(2) and sigprocmask(2) are async-signal-safe; called between fork and exec.
    unsafe {
        for signal in [
            libc::SIGINT,
            libc::SIGQUIT,
            libc::SIGTERM,
            libc::SIGHUP,
            libc::SIGPIPE,
        ] {
            libc::signal(signal, libc::SIG_DFL);
        }
        let mut none: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut none);
        libc::sigprocmask(libc::SIG_SETMASK, &none, std::ptr::null_mut());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tail_keeps_the_last_lines() {
        assert_eq!(tail_lines(b"a\nb\nc\n", Some(2)), b"b\nc\n");
        assert_eq!(tail_lines(b"a\nb\nc", Some(1)), b"c");
        assert_eq!(tail_lines(b"a\nb\n", Some(5)), b"a\nb\n");
        assert_eq!(tail_lines(b"a\nb\n", None), b"a\nb\n");
        assert_eq!(tail_lines(b"a\nb\n", Some(0)), b"");
    }

    #[test]
    fn own_start_time_is_readable_and_bogus_pids_are_dead() {
        assert!(proc_start_ticks(std::process::id()).is_some());
        assert!(proc_start_ticks(u32::MAX - 1).is_none());
    }

    /// An instance whose leader shell starts a worker in its group and writes the worker's pid.
    fn leader_with_worker(dir: &Path) -> (Instance, PathBuf) {
        let pid_file = dir.join("worker.pid");
        let mut inst = crate::plan::testing::instance("t", crate::plan::Role::Decode, 0, "h");
        let script = format!("sleep 300 & echo $! > {}; wait", pid_file.display());
        inst.engine.command = ["sh".into(), "-c".into(), script].to_vec();
        (inst, pid_file)
    }

    async fn worker_pid(pid_file: &Path) -> u32 {
        loop {
            if let Some(pid) = std::fs::read_to_string(pid_file)
                .ok()
                .and_then(|t| t.trim().parse().ok())
            {
                return pid;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    async fn kill_leader(rt: &ProcessRuntime, name: &str) {
        let leader = rt.read(name).unwrap().pid.unwrap();
        unsafe { libc::kill(leader as i32, libc::SIGKILL) };
        while rt.list("t").await.unwrap()[0].state != RunState::Exited {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// A started engine whose leader was SIGKILLed while its worker lives on in the group.
    async fn worker_of_a_killed_leader(dir: &Path) -> (ProcessRuntime, Instance, PathBuf, u32) {
        let rt = ProcessRuntime::new(&dir.join("state")).unwrap();
        let (inst, pid_file) = leader_with_worker(dir);
        rt.create(&inst).await.unwrap();
        rt.start(&inst).await.unwrap();
        let worker = worker_pid(&pid_file).await;
        kill_leader(&rt, &inst.name).await;
        (rt, inst, pid_file, worker)
    }

    #[tokio::test]
    async fn stop_ends_the_workers_of_a_killed_leader() {
        let dir = tempfile::tempdir().unwrap();
        let (rt, inst, _, worker) = worker_of_a_killed_leader(dir.path()).await;
        assert!(
            proc_start_ticks(worker).is_some(),
            "the worker outlives its leader"
        );
        rt.stop(&inst.name, Duration::from_secs(5)).await.unwrap();
        assert!(
            proc_start_ticks(worker).is_none(),
            "stop left the orphan worker"
        );
    }

    #[tokio::test]
    async fn start_clears_what_a_killed_leader_left_in_its_group() {
        let dir = tempfile::tempdir().unwrap();
        let (rt, inst, pid_file, worker) = worker_of_a_killed_leader(dir.path()).await;
        std::fs::remove_file(&pid_file).unwrap();
        rt.start(&inst).await.unwrap();
        assert!(
            proc_start_ticks(worker).is_none(),
            "the old worker survived a restart"
        );
        let second = worker_pid(&pid_file).await;
        assert_ne!(second, worker);
        rt.remove(&inst.name).await.unwrap();
        assert!(proc_start_ticks(second).is_none());
    }

    #[tokio::test]
    async fn start_stop_and_list_a_process_group() {
        let dir = tempfile::tempdir().unwrap();
        let rt = ProcessRuntime::new(dir.path()).unwrap();
        let mut inst = crate::plan::testing::instance("t", crate::plan::Role::Decode, 0, "h");
        inst.engine.command = ["sh", "-c", "echo hello; sleep 30 & sleep 30"]
            .map(String::from)
            .to_vec();
        rt.create(&inst).await.unwrap();
        assert_eq!(rt.list("t").await.unwrap()[0].state, RunState::Created);
        rt.start(&inst).await.unwrap();
        let seen = rt.list("t").await.unwrap();
        assert_eq!(seen[0].state, RunState::Running);
        assert_eq!(seen[0].spec_hash, "h");
        // The shell runs on its own schedule: wait for its output rather than guess a time.
        while std::fs::read(rt.log_path(&inst.name))
            .unwrap_or_default()
            .is_empty()
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        rt.stop(&inst.name, Duration::from_secs(5)).await.unwrap();
        let seen = rt.list("t").await.unwrap();
        assert_eq!(seen[0].state, RunState::Exited);
        let logs: Vec<_> = rt.logs(&inst.name, Some(10), false).collect().await;
        assert_eq!(logs[0].as_ref().unwrap().as_ref(), b"hello\n");
        rt.remove(&inst.name).await.unwrap();
        assert!(rt.list("t").await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn engines_do_not_inherit_withheld_variables() {
        std::env::set_var("PDCTL_TEST_WITHHELD_KEY", "s3cret");
        std::env::set_var("PDCTL_TEST_INHERITED", "yes");
        let dir = tempfile::tempdir().unwrap();
        let rt = ProcessRuntime::new(dir.path())
            .unwrap()
            .withholding(&["PDCTL_TEST_WITHHELD_KEY".into()]);
        let mut inst = crate::plan::testing::instance("w", crate::plan::Role::Decode, 0, "h");
        let script = "echo key=$PDCTL_TEST_WITHHELD_KEY inherited=$PDCTL_TEST_INHERITED";
        inst.engine.command = ["sh", "-c", script].map(String::from).to_vec();
        rt.create(&inst).await.unwrap();
        rt.start(&inst).await.unwrap();
        let log = loop {
            let log = std::fs::read_to_string(rt.log_path(&inst.name)).unwrap_or_default();
            if log.ends_with('\n') {
                break log;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        assert_eq!(log, "key= inherited=yes\n");
        rt.remove(&inst.name).await.unwrap();
    }

    #[test]
    fn processes_pin_their_gpus_in_pci_bus_order() {
        let mut inst = crate::plan::testing::instance("t", crate::plan::Role::Decode, 0, "h");
        inst.gpus = [1, 2]
            .map(|index| crate::plan::GpuAssignment {
                index,
                uuid: format!("GPU-{index}"),
            })
            .to_vec();
        inst.engine.env = vec![EnvVar::new("CUDA_DEVICE_ORDER", "FASTEST_FIRST")];
        let env = env(&inst);
        let get = |name: &str| {
            env.iter()
                .find(|e| e.name == name)
                .map(|e| e.value.as_str())
        };
        assert_eq!(get("CUDA_VISIBLE_DEVICES"), Some("1,2"));
        assert_eq!(
            get("CUDA_DEVICE_ORDER"),
            Some("FASTEST_FIRST"),
            "the pool's env wins"
        );
        assert_eq!(get("VLLM_NIXL_SIDE_CHANNEL_PORT"), Some("5700"));
        inst.gpus.clear();
        assert_eq!(
            super::env(&inst)
                .iter()
                .find(|e| e.name == "CUDA_VISIBLE_DEVICES")
                .map(|e| e.value.as_str()),
            Some(""),
            "a CPU engine sees no GPU"
        );
    }

    #[tokio::test]
    async fn stop_sends_the_instances_stop_signal() {
        let dir = tempfile::tempdir().unwrap();
        let rt = ProcessRuntime::new(dir.path()).unwrap();
        let mut inst = crate::plan::testing::instance("t", crate::plan::Role::Prefill, 0, "h");
        inst.stop_signal = "SIGINT".into();
        // The engine says which signal ended it.
        let script = "trap 'echo got INT; exit 0' INT; trap 'echo got TERM; exit 0' TERM; \
                      echo up; while :; do sleep 0.05; done";
        inst.engine.command = ["sh", "-c", script].map(String::from).to_vec();
        rt.create(&inst).await.unwrap();
        rt.start(&inst).await.unwrap();
        while !String::from_utf8_lossy(&std::fs::read(rt.log_path(&inst.name)).unwrap_or_default())
            .contains("up")
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        rt.stop(&inst.name, Duration::from_secs(5)).await.unwrap();
        let log = std::fs::read_to_string(rt.log_path(&inst.name)).unwrap();
        assert!(
            log.contains("got INT"),
            "stopped with another signal: {log:?}"
        );
        rt.remove(&inst.name).await.unwrap();
    }
}
