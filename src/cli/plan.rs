//! `pdctl validate` and `pdctl plan`.

use comfy_table::{presets, Table};

use super::exit::CliResult;
use super::gpus::GpuArg;
use super::{FileArg, OutputFormat};
use crate::plan::{NamespaceMode, Plan, RuntimePlan};

#[derive(Debug, clap::Args)]
pub struct ValidateArgs {
    #[command(flatten)]
    pub file: FileArg,
}

#[derive(Debug, clap::Args)]
pub struct PlanArgs {
    #[command(flatten)]
    pub file: FileArg,
    #[command(flatten)]
    pub gpu: GpuArg,
    /// `json` prints the full machine-readable form.
    #[arg(short = 'o', long, value_enum, default_value_t)]
    pub output: OutputFormat,
}

pub fn validate(args: ValidateArgs) -> CliResult {
    let path = &args.file.file;
    let loaded = crate::spec::load(path)?;
    crate::plan::check(&loaded)?;
    let s = &loaded.spec;
    println!(
        "{}: ok (project {}: prefill {}×{} GPU, decode {}×{} GPU, {} GPUs in all; proxy {})",
        path.display(),
        loaded.project,
        s.prefill.replicas,
        s.prefill.gpus_per_replica,
        s.decode.replicas,
        s.decode.gpus_per_replica,
        crate::plan::gpus_needed(s),
        s.proxy.listen
    );
    Ok(())
}

pub fn plan(args: PlanArgs) -> CliResult {
    let inventory = args.gpu.inventory()?;
    let plan = crate::plan::plan_file(&args.file.file, inventory.as_ref())?;
    match args.output {
        OutputFormat::Json => println!(
            "{}",
            serde_json::to_string_pretty(&plan).expect("plan serialises")
        ),
        OutputFormat::Table => println!("{}", render(&plan)),
    }
    Ok(())
}

/// The human view: one row per instance, then the notes a user needs to read it right.
pub fn render(plan: &Plan) -> String {
    let engine = match &plan.runtime {
        RuntimePlan::Docker {
            image,
            pull_policy,
            network_mode,
        } => format!(
            "docker: image {image} (pull {}), network {network_mode}",
            serde_json::to_value(pull_policy)
                .ok()
                .and_then(|v| v.as_str().map(String::from))
                .unwrap_or_default()
        ),
        RuntimePlan::Process { command } => format!("process: {}", command.join(" ")),
    };
    let mut out = format!(
        "project {}  model {}  runtime {engine}\nproxy http://{} -> {} prefill, {} decode\n\n",
        plan.project,
        plan.model.served_name,
        plan.proxy.listen,
        plan.instances
            .iter()
            .filter(|i| i.role == crate::plan::Role::Prefill)
            .count(),
        plan.instances
            .iter()
            .filter(|i| i.role == crate::plan::Role::Decode)
            .count(),
    );
    let mut t = Table::new();
    t.load_style(presets::NOTHING);
    t.set_header([
        "INSTANCE", "ROLE", "GPUS", "HTTP", "NIXL", "SHM", "IPC/PID", "COMMAND",
    ]);
    let mut shared_shm = false;
    for i in &plan.instances {
        let gpus: Vec<String> = i.gpus.iter().map(|g| g.index.to_string()).collect();
        let host_shm = i.private_shm_bytes().is_none();
        shared_shm |= host_shm;
        t.add_row([
            i.name.clone(),
            i.role.to_string(),
            if gpus.is_empty() {
                "-".into()
            } else {
                gpus.join(",")
            },
            i.http_port.to_string(),
            i.side_channel_port.to_string(),
            if host_shm {
                "host*".into()
            } else {
                i.shm_size.clone()
            },
            format!("{}/{}", ns(i.ipc_mode), ns(i.pid_mode)),
            shell_words(&i.argv()),
        ]);
    }
    out.push_str(&t.trim_fmt());
    if shared_shm {
        let why = match plan.runtime {
            RuntimePlan::Docker { .. } => "containers with GPUs share the host IPC and PID namespaces so UCX can move KV over CUDA IPC",
            RuntimePlan::Process { .. } => "local processes run in the host namespaces",
        };
        out.push_str(&format!(
            "\n\n* host /dev/shm: {why}; the pool's shm_size does not apply to them."
        ));
    }
    out
}

fn ns(m: NamespaceMode) -> &'static str {
    match m {
        NamespaceMode::Host => "host",
        NamespaceMode::Private => "private",
    }
}

/// argv as a shell would need it typed, so the table can be copy-pasted.
pub fn shell_words(argv: &[String]) -> String {
    argv.iter()
        .map(|a| {
            let plain = !a.is_empty()
                && a.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_./:=,@%+".contains(c));
            if plain {
                a.clone()
            } else {
                format!("'{}'", a.replace('\'', r"'\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::shell_words;

    #[test]
    fn quotes_only_what_needs_it() {
        let argv = ["vllm", "--x", r#"{"a":1}"#, "it's", ""].map(String::from);
        assert_eq!(shell_words(&argv), r#"vllm --x '{"a":1}' 'it'\''s' ''"#);
    }
}
