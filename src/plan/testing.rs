//! Hand-built instances for unit tests of the layers above the plan (runtime, health,
//! reconcile, export), so none of them needs another's fixtures.

use std::collections::BTreeMap;

use super::*;

pub fn instance(project: &str, role: Role, index: u32, hash: &str) -> Instance {
    let name = instance_name(project, role, index);
    let port = match role {
        Role::Prefill => 8100,
        Role::Decode => 8200,
    } + index as u16;
    let probe = Probe {
        path: "/health".into(),
        port,
        initial_delay_seconds: 0,
        period_seconds: 1,
        timeout_seconds: 1,
        failure_threshold: 3,
        success_threshold: 1,
    };
    let mut inst = Instance {
        name,
        role,
        index,
        gpus: vec![],
        http_port: port,
        side_channel_port: port - 2500,
        listen_host: None,
        image: Some("pdctl-sim:dev".into()),
        gpu_count: 0,
        engine: Engine {
            command: vec!["vllm".into()],
            model: "m".into(),
            args: vec![],
            env: vec![],
        },
        mounts: vec![],
        shm_size: "1Gi".into(),
        shm_size_bytes: 1 << 30,
        ipc_mode: NamespaceMode::Private,
        pid_mode: NamespaceMode::Private,
        probes: Probes {
            startup: probe.clone(),
            readiness: probe.clone(),
            liveness: probe,
        },
        labels: BTreeMap::new(),
        restart_policy: RestartPolicy::Always,
        stop_signal: "SIGTERM".into(),
        stop_grace_seconds: 5,
        spec_hash: hash.into(),
    };
    inst.labels = labels(project, &inst);
    inst
}

/// A plan around hand-built instances: project `t`, a Hugging Face model `m`, default proxy.
pub fn plan(runtime: RuntimePlan, instances: Vec<Instance>) -> Plan {
    Plan {
        schema_version: PLAN_SCHEMA_VERSION,
        project: "t".into(),
        source: "t.toml".into(),
        model: ModelPlan {
            served_name: "m".into(),
            source: ModelSource::HuggingFace {
                id: "m".into(),
                cache_dir: "/cache".into(),
            },
        },
        runtime,
        proxy: Default::default(),
        instances,
    }
}
