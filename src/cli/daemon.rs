//! `pdctl up | down | status | logs | scale`: argument parsing and human output; the work is
//! the daemon module's.

use std::ffi::OsString;
use std::io::Write;
use std::path::{Path, PathBuf};

use comfy_table::{presets, Table};
use futures_util::StreamExt;

use super::exit::{CliError, CliResult};
use super::gpus::GpuArg;
use super::progress::{self, Ui};
use super::{FileArg, OutputFormat};
use crate::daemon::api::{self, StatusReport};
use crate::daemon::down::Down;
use crate::daemon::{self, detach, ClientError, Deployment, Scale, StateDir, Up};
use crate::plan;
use crate::spec::{self, LoadedSpec};

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

fn already_running(state: &StateDir, project: &str, file: &Path) -> CliError {
    let pid = state
        .holder_pid()
        .map(|p| format!(" (pid {p})"))
        .unwrap_or_default();
    CliError::failure(anyhow::anyhow!(
        "project {project} is already running{pid}; `pdctl status -f {f}` shows it, `pdctl down -f {f}` stops it",
        f = file.display()
    ))
}

pub fn up(args: UpArgs) -> CliResult {
    let file = &args.file.file;
    let inventory = args.gpu.inventory()?;
    let dep = Deployment::load(file, inventory.as_ref())?;
    let project = dep.project().to_string();
    let state = StateDir::for_project(&project);
    let Some(lock) = state.take_lock()? else {
        return Err(already_running(&state, &project, file));
    };
    let scale = state.scale();
    if scale != Scale::default() {
        eprintln!(
            "note: keeping the replica counts set with `pdctl scale` ({}); `pdctl down` resets them",
            describe(scale)
        );
    }
    // Validate the scaled plan before forking, so errors reach the user's terminal.
    dep.plan(scale)?;
    if args.detach && !args.daemon_child {
        drop(lock);
        return up_detached(&args, &state, file);
    }
    let up = Up {
        dep,
        scale,
        state,
        lock,
        observer: Box::new(Ui::new(!args.daemon_child)),
    };
    Ok(tokio_rt().block_on(daemon::run(up))?)
}

/// Re-runs `up` as a background daemon and waits until it reports every engine ready.
fn up_detached(args: &UpArgs, state: &StateDir, file: &Path) -> CliResult {
    let exe = std::env::current_exe().unwrap_or_else(|_| PathBuf::from("pdctl"));
    let mut child_args: Vec<OsString> = vec![
        "up".into(),
        "--file".into(),
        file.into(),
        "--daemon-child".into(),
    ];
    if let Some(g) = &args.gpu.gpus {
        child_args.extend(["--gpus".into(), g.into()]);
    }
    let mut child = detach::spawn(&exe, &child_args, state)?;
    let mut last = String::new();
    let ready = tokio_rt().block_on(child.wait_ready(state, |r| {
        let line = progress_line(r);
        if line != last {
            eprintln!("{line}");
            last = line;
        }
    }))?;
    println!("{}", progress::banner(&ready));
    println!(
        "daemon pid {} (log: {}); `pdctl status -f {f}`, `pdctl down -f {f}`",
        ready.pid,
        child.log().display(),
        f = file.display()
    );
    Ok(())
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

pub fn down(args: DownArgs) -> CliResult {
    let l = spec::load(&args.file.file)?;
    let state = StateDir::for_project(&l.project);
    let done = tokio_rt().block_on(daemon::down::down(&l, &state, || {
        eprintln!("{}: stopping (proxy drains, then engines stop)", l.project)
    }))?;
    match done {
        Down::Stopped => println!("{}: down", l.project),
        Down::CleanedUp { leftovers: 0 } => println!("{}: not running; nothing to do", l.project),
        Down::CleanedUp { leftovers } => println!(
            "{}: down ({leftovers} leftover engines stopped and removed)",
            l.project
        ),
    }
    Ok(())
}

/// A `ClientError::NotRunning` as `status` and `scale` report it (exit status 3).
fn not_running(e: ClientError, notice: impl FnOnce() -> String) -> CliError {
    match e {
        ClientError::NotRunning { .. } => CliError::not_running(notice()),
        e => e.into(),
    }
}

pub fn status(args: StatusArgs) -> CliResult {
    let l = spec::load(&args.file.file)?;
    let state = StateDir::for_project(&l.project);
    let report: StatusReport = tokio_rt()
        .block_on(api::status(&state.socket()))
        .map_err(|e| not_running(e, || format!("{} is not running", l.project)))?;
    match args.output {
        OutputFormat::Json => println!(
            "{}",
            serde_json::to_string_pretty(&report).expect("status serialises")
        ),
        OutputFormat::Table => println!("{}", table(&report)),
    }
    Ok(())
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

pub fn logs(args: LogsArgs) -> CliResult {
    let l: LoadedSpec = spec::load(&args.file)?;
    let state = StateDir::for_project(&l.project);
    let name = plan::full_instance_name(&l.project, &args.instance);
    tokio_rt().block_on(async {
        let runtime = daemon::connect_runtime(&plan::runtime_plan(&l.spec), &state, &[]).await?;
        let mut stream = runtime.logs(&name, args.tail, args.follow);
        let mut out = std::io::stdout();
        while let Some(chunk) = stream.next().await {
            // A closed stdout (`| head`) ends the command quietly.
            if out.write_all(&chunk?).and_then(|_| out.flush()).is_err() {
                break;
            }
        }
        Ok::<(), CliError>(())
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

pub fn scale(args: ScaleArgs) -> CliResult {
    let l = spec::load(&args.file.file)?;
    let want = parse_scale(&args.replicas).map_err(CliError::invalid)?;
    let state = StateDir::for_project(&l.project);
    let r = tokio_rt()
        .block_on(api::scale(&state.socket(), want))
        .map_err(|e| {
            not_running(e, || {
                format!(
                    "{} is not running; change replicas in the file and `pdctl up`",
                    l.project
                )
            })
        })?;
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
    Ok(())
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
