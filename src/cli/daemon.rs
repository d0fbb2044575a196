//! `pdctl up | down | status | logs | scale`: argument parsing, human output, exit codes.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::time::Duration;

use comfy_table::{presets, Table};
use futures_util::StreamExt;
use http::Method;

use super::gpus::GpuArg;
use super::{FileArg, OutputFormat};
use crate::daemon::api::{self, ClientError, StatusReport};
use crate::daemon::{stop_all, Deployment, Scale, StateDir, Up};
use crate::plan::PullPolicy;
use crate::runtime::{DockerRuntime, ProcessRuntime, Runtime};
use crate::spec::{self, LoadedSpec, RuntimeKind};

#[derive(Debug, clap::Args)]
pub struct UpArgs {
    #[command(flatten)]
    pub file: FileArg,
    #[command(flatten)]
    pub gpu: GpuArg,
    /// Detach: run the daemon in the background and return once every engine is ready.
    #[arg(short = 'd', long)]
    pub detach: bool,
    /// Internal: this process is the detached daemon `up -d` started.
    #[arg(long, hide = true)]
    pub daemon_child: bool,
}

#[derive(Debug, clap::Args)]
pub struct DownArgs {
    #[command(flatten)]
    pub file: FileArg,
}

#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    #[command(flatten)]
    pub file: FileArg,
    /// `json` lists every instance with role, state, readiness, restarts, last exit, id.
    #[arg(short = 'o', long, value_enum, default_value_t)]
    pub output: OutputFormat,
}

#[derive(Debug, clap::Args)]
pub struct LogsArgs {
    /// The deployment file (`-f` means --follow here, as in docker/kubectl logs).
    #[arg(long = "file", value_name = "FILE", default_value = "pools.toml")]
    pub file: PathBuf,
    /// `pdctl-<project>-decode-0`, or just `decode-0`.
    pub instance: String,
    /// Keep printing new output.
    #[arg(short = 'f', long)]
    pub follow: bool,
    /// Only the last N lines.
    #[arg(long, value_name = "N")]
    pub tail: Option<usize>,
}

#[derive(Debug, clap::Args)]
pub struct ScaleArgs {
    #[command(flatten)]
    pub file: FileArg,
    /// `prefill=N` and/or `decode=M`.
    #[arg(required = true, value_name = "ROLE=N")]
    pub replicas: Vec<String>,
}

fn tokio_rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime starts")
}

fn load_spec(path: &Path) -> Result<LoadedSpec, ExitCode> {
    spec::load(path).map_err(|e| {
        eprintln!("{e}");
        ExitCode::from(2)
    })
}

fn already_running(state: &StateDir, project: &str, file: &Path) -> ExitCode {
    let pid = state
        .holder_pid()
        .map(|p| format!(" (pid {p})"))
        .unwrap_or_default();
    eprintln!(
        "error: project {project} is already running{pid}; `pdctl status -f {f}` shows it, `pdctl down -f {f}` stops it",
        f = file.display()
    );
    ExitCode::FAILURE
}

pub fn up(args: UpArgs) -> ExitCode {
    let file = &args.file.file;
    let inventory = match args.gpu.inventory() {
        Ok(i) => i,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let dep = match Deployment::load(file, inventory.as_ref()) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(e.exit_code());
        }
    };
    let project = dep.project().to_string();
    let state = StateDir::for_project(&project);
    let lock = match state.try_lock() {
        Ok(Some(l)) => l,
        Ok(None) => return already_running(&state, &project, file),
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let scale = state.scale();
    if scale != Scale::default() {
        eprintln!(
            "note: keeping the replica counts set with `pdctl scale` ({}); `pdctl down` resets them",
            describe(scale)
        );
    }
    // Validate the scaled plan before forking, so errors reach the user's terminal.
    if let Err(e) = dep.plan(scale) {
        eprintln!("{e}");
        return ExitCode::from(e.exit_code());
    }
    if args.detach && !args.daemon_child {
        drop(lock);
        return detach(&args, &state, file);
    }
    let up = Up {
        dep,
        scale,
        state,
        lock,
        interactive: !args.daemon_child,
    };
    match tokio_rt().block_on(crate::daemon::run(up)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Re-runs `up` in the background (own process group, output to the state directory's
/// daemon.log) and waits until it reports every engine ready, or dies.
fn detach(args: &UpArgs, state: &StateDir, file: &Path) -> ExitCode {
    let exe = std::env::current_exe().unwrap_or_else(|_| PathBuf::from("pdctl"));
    let log_path = state.log();
    let log = match std::fs::File::create(&log_path) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("error: cannot create {}: {e}", log_path.display());
            return ExitCode::FAILURE;
        }
    };
    let mut cmd = std::process::Command::new(exe);
    cmd.arg("up").arg("--file").arg(file).arg("--daemon-child");
    if let Some(g) = &args.gpu.gpus {
        cmd.arg("--gpus").arg(g);
    }
    use std::os::unix::process::CommandExt;
    let child = cmd
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log handle clones"))
        .stderr(log)
        .process_group(0)
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: cannot start the daemon: {e}");
            return ExitCode::FAILURE;
        }
    };
    let rt = tokio_rt();
    let mut last = String::new();
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            let log = std::fs::read_to_string(&log_path).unwrap_or_default();
            eprintln!("error: the daemon exited during startup ({status}); its log:\n{log}");
            return ExitCode::FAILURE;
        }
        if let Ok(r) = rt.block_on(api::call::<StatusReport>(
            &state.socket(),
            Method::GET,
            "/v1/status",
            None,
        )) {
            let line = progress_line(&r);
            if line != last {
                eprintln!("{line}");
                last = line;
            }
            if r.all_ready() {
                println!("{}", crate::daemon::ui::banner(&r));
                println!(
                    "daemon pid {} (log: {}); `pdctl status -f {f}`, `pdctl down -f {f}`",
                    r.pid,
                    log_path.display(),
                    f = file.display()
                );
                return ExitCode::SUCCESS;
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn progress_line(r: &StatusReport) -> String {
    let parts: Vec<String> = r
        .instances
        .iter()
        .map(|i| format!("{} {}", i.instance, i.state))
        .collect();
    parts.join(", ")
}

fn describe(s: Scale) -> String {
    let mut v = Vec::new();
    if let Some(n) = s.prefill {
        v.push(format!("prefill={n}"));
    }
    if let Some(n) = s.decode {
        v.push(format!("decode={n}"));
    }
    v.join(" ")
}

/// A runtime good enough to list, stop, remove and read logs (no pulls).
async fn runtime_of(l: &LoadedSpec, state: &StateDir) -> Result<Box<dyn Runtime>, String> {
    match l.spec.runtime.kind {
        RuntimeKind::Docker => {
            let net = l.spec.runtime.network_mode.as_deref().unwrap_or("host");
            DockerRuntime::connect(PullPolicy::Never, net)
                .await
                .map(|d| Box::new(d) as Box<dyn Runtime>)
                .map_err(|e| e.to_string())
        }
        RuntimeKind::Process => ProcessRuntime::new(&state.dir)
            .map(|p| Box::new(p) as Box<dyn Runtime>)
            .map_err(|e| e.to_string()),
    }
}

pub fn down(args: DownArgs) -> ExitCode {
    let l = match load_spec(&args.file.file) {
        Ok(l) => l,
        Err(c) => return c,
    };
    let state = StateDir::for_project(&l.project);
    let rt = tokio_rt();
    let asked = rt.block_on(api::call::<serde_json::Value>(
        &state.socket(),
        Method::POST,
        "/v1/down",
        None,
    ));
    match asked {
        Ok(_) => {
            eprintln!("{}: stopping (proxy drains, then engines stop)", l.project);
            // The daemon releases the lock as its very last step.
            loop {
                match state.try_lock() {
                    Ok(Some(_)) => break,
                    Ok(None) => std::thread::sleep(Duration::from_millis(100)),
                    Err(e) => {
                        eprintln!("error: {e}");
                        return ExitCode::FAILURE;
                    }
                }
            }
            println!("{}: down", l.project);
            ExitCode::SUCCESS
        }
        Err(ClientError::NotRunning { .. }) => {
            // No daemon (never started, or killed): clean up what it may have left behind.
            let _lock = match state.try_lock() {
                Ok(Some(lock)) => lock,
                Ok(None) => {
                    eprintln!(
                        "error: the daemon of {} (pid {:?}) holds the lock but does not answer on {}",
                        l.project,
                        state.holder_pid(),
                        state.socket().display()
                    );
                    return ExitCode::FAILURE;
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::FAILURE;
                }
            };
            let result = rt.block_on(async {
                let runtime = runtime_of(&l, &state).await?;
                stop_all(runtime.as_ref(), &l.project, Duration::from_secs(30))
                    .await
                    .map_err(|e| e.to_string())
            });
            let _ = std::fs::remove_file(state.socket());
            state.clear_scale();
            match result {
                Ok(0) => println!("{}: not running; nothing to do", l.project),
                Ok(n) => println!(
                    "{}: down ({n} leftover engines stopped and removed)",
                    l.project
                ),
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::FAILURE;
                }
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn fetch_status(state: &StateDir, project: &str) -> Result<StatusReport, ExitCode> {
    tokio_rt()
        .block_on(api::call(&state.socket(), Method::GET, "/v1/status", None))
        .map_err(|e| match e {
            ClientError::NotRunning { .. } => {
                eprintln!("{project} is not running");
                ExitCode::from(3)
            }
            e => {
                eprintln!("error: {e}");
                ExitCode::FAILURE
            }
        })
}

pub fn status(args: StatusArgs) -> ExitCode {
    let l = match load_spec(&args.file.file) {
        Ok(l) => l,
        Err(c) => return c,
    };
    let report = match fetch_status(&StateDir::for_project(&l.project), &l.project) {
        Ok(r) => r,
        Err(c) => return c,
    };
    match args.output {
        OutputFormat::Json => println!(
            "{}",
            serde_json::to_string_pretty(&report).expect("status serialises")
        ),
        OutputFormat::Table => println!("{}", table(&report)),
    }
    ExitCode::SUCCESS
}

pub fn table(r: &StatusReport) -> String {
    let mut t = Table::new();
    t.load_style(presets::NOTHING);
    t.set_header([
        "INSTANCE",
        "ROLE",
        "STATE",
        "READY",
        "RESTARTS",
        "LAST EXIT",
        "ID",
    ]);
    for i in &r.instances {
        t.add_row([
            i.instance.clone(),
            i.role.map(|r| r.to_string()).unwrap_or_else(|| "-".into()),
            i.state.clone(),
            if i.ready { "yes" } else { "no" }.into(),
            i.restarts.to_string(),
            i.last_exit.clone().unwrap_or_else(|| "-".into()),
            i.id.clone().unwrap_or_else(|| "-".into()),
        ]);
    }
    format!(
        "project {}  runtime {}  endpoint {}/v1  daemon pid {}\n\n{}",
        r.project,
        r.runtime,
        r.endpoint,
        r.pid,
        t.trim_fmt()
    )
}

pub fn logs(args: LogsArgs) -> ExitCode {
    let l = match load_spec(&args.file) {
        Ok(l) => l,
        Err(c) => return c,
    };
    let state = StateDir::for_project(&l.project);
    let name = if args.instance.starts_with("pdctl-") {
        args.instance.clone()
    } else {
        format!("pdctl-{}-{}", l.project, args.instance)
    };
    tokio_rt().block_on(async {
        let runtime = match runtime_of(&l, &state).await {
            Ok(r) => r,
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::FAILURE;
            }
        };
        let mut stream = runtime.logs(&name, args.tail, args.follow);
        let mut out = std::io::stdout();
        while let Some(chunk) = stream.next().await {
            match chunk {
                Ok(b) => {
                    if out.write_all(&b).and_then(|_| out.flush()).is_err() {
                        return ExitCode::SUCCESS;
                    }
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::FAILURE;
                }
            }
        }
        ExitCode::SUCCESS
    })
}

/// `prefill=2 decode=1` → [`Scale`].
pub fn parse_scale(args: &[String]) -> Result<Scale, String> {
    let mut s = Scale::default();
    for a in args {
        let (role, n) = a
            .split_once('=')
            .ok_or_else(|| format!("`{a}`: expected ROLE=N, e.g. decode=2"))?;
        let n: u32 = n
            .parse()
            .map_err(|_| format!("`{a}`: {n:?} is not a replica count"))?;
        match role {
            "prefill" => s.prefill = Some(n),
            "decode" => s.decode = Some(n),
            _ => return Err(format!("`{a}`: the roles are prefill and decode")),
        }
    }
    Ok(s)
}

pub fn scale(args: ScaleArgs) -> ExitCode {
    let l = match load_spec(&args.file.file) {
        Ok(l) => l,
        Err(c) => return c,
    };
    let want = match parse_scale(&args.replicas) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let state = StateDir::for_project(&l.project);
    let body = serde_json::to_vec(&want).expect("scale serialises");
    let r = tokio_rt().block_on(api::call::<StatusReport>(
        &state.socket(),
        Method::POST,
        "/v1/scale",
        Some(body),
    ));
    match r {
        Ok(r) => {
            println!(
                "{}: prefill {} decode {} (the daemon keeps this until `pdctl down`)",
                r.project, r.prefill_replicas, r.decode_replicas
            );
            let f = args.file.file.display();
            println!("to keep it, set in {f}:");
            if want.prefill.is_some() {
                println!("  [prefill]\n  replicas = {}", r.prefill_replicas);
            }
            if want.decode.is_some() {
                println!("  [decode]\n  replicas = {}", r.decode_replicas);
            }
            ExitCode::SUCCESS
        }
        Err(ClientError::NotRunning { .. }) => {
            eprintln!(
                "{} is not running; change replicas in the file and `pdctl up`",
                l.project
            );
            ExitCode::from(3)
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scale_arguments_parse_and_reject_typos() {
        let a = |v: &[&str]| parse_scale(&v.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        assert_eq!(
            a(&["prefill=2", "decode=0"]),
            Ok(Scale {
                prefill: Some(2),
                decode: Some(0)
            })
        );
        assert!(a(&["decoder=1"])
            .unwrap_err()
            .contains("prefill and decode"));
        assert!(a(&["decode=x"]).is_err());
        assert!(a(&["decode"]).is_err());
    }
}
