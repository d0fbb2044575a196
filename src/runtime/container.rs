//! The Docker container an instance runs as, from the plan alone (pure: no Docker needed).
//! The Docker runtime creates exactly this; the export's equivalence test compares it with
//! the Kubernetes pod.

use std::collections::HashMap;

use bollard::models::{
    ContainerCreateBody, DeviceRequest, HostConfig, Mount, MountType, PortBinding, RestartPolicy,
    RestartPolicyNameEnum,
};

use crate::plan::{Instance, NamespaceMode, HOST_NETWORK_MODE};

/// The container spec for `inst`: a pure rendering of the plan (unit-tested below).
pub fn container_body(inst: &Instance, image: &str, network_mode: &str) -> ContainerCreateBody {
    let host_network = network_mode == HOST_NETWORK_MODE;
    let ports = [inst.http_port, inst.side_channel_port];
    let port_key = |p: u16| format!("{p}/tcp");
    let device_requests = (!inst.gpus.is_empty()).then(|| {
        vec![DeviceRequest {
            driver: Some("nvidia".into()),
            // Explicit NVML indices (the toolkit's numbering too), never `count`: the daemon rejects both together, and a bare
            // capabilities request would hand the container every GPU.
            device_ids: Some(inst.gpus.iter().map(|g| g.index.to_string()).collect()),
            capabilities: Some(vec![vec!["gpu".into()]]),
            ..Default::default()
        }]
    });
    let ns = |m: NamespaceMode| match m {
        NamespaceMode::Host => "host".to_string(),
        NamespaceMode::Private => "private".to_string(),
    };
    let shm_size = inst.private_shm_bytes().map(|b| b as i64);
    let mounts: Vec<Mount> = inst
        .mounts
        .iter()
        .map(|m| Mount {
            target: Some(m.target.display().to_string()),
            source: Some(m.source.display().to_string()),
            typ: Some(MountType::BIND),
            read_only: Some(m.read_only),
            ..Default::default()
        })
        .collect();
    let port_bindings = (!host_network).then(|| {
        ports
            .iter()
            .map(|&p| {
                (
                    port_key(p),
                    Some(vec![PortBinding {
                        host_ip: Some("127.0.0.1".into()),
                        host_port: Some(p.to_string()),
                    }]),
                )
            })
            .collect::<HashMap<_, _>>()
    });
    let argv = inst.argv();
    ContainerCreateBody {
        image: Some(inst.image.clone().unwrap_or_else(|| image.to_string())),
        entrypoint: argv.first().map(|a| vec![a.clone()]),
        cmd: Some(argv.iter().skip(1).cloned().collect()),
        env: Some(
            inst.env()
                .iter()
                .map(|e| format!("{}={}", e.name, e.value))
                .collect(),
        ),
        labels: Some(inst.labels.clone().into_iter().collect()),
        // Documentation only under host networking, where the engine binds its planned ports.
        exposed_ports: Some(ports.iter().map(|&p| port_key(p)).collect()),
        stop_signal: Some(inst.stop_signal.clone()),
        stop_timeout: Some(inst.stop_grace_seconds as i64),
        host_config: Some(HostConfig {
            device_requests,
            shm_size,
            ipc_mode: Some(ns(inst.ipc_mode)),
            // Docker's PidMode has no "private" (it rejects it): empty is the private default.
            pid_mode: Some(ns(inst.pid_mode)).filter(|m| m == "host"),
            network_mode: Some(network_mode.to_string()),
            port_bindings,
            mounts: (!mounts.is_empty()).then_some(mounts),
            privileged: Some(false),
            // A real PID 1 (docker-init) forwards the stop signal and reaps engine children.
            init: Some(true),
            // pdctl supervises: Docker never restarts a running-but-unhealthy container.
            restart_policy: Some(RestartPolicy {
                name: Some(RestartPolicyNameEnum::NO),
                maximum_retry_count: None,
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::testing::instance;
    use crate::plan::{EnvVar, GpuAssignment, Mount as PlanMount, Role};

    /// A replica on one GPU sharing the host's IPC and PID namespaces.
    fn on_gpu(project: &str, role: Role, gpu: u32, uuid: &str) -> Instance {
        let mut inst = instance(project, role, 0, "h1");
        inst.gpus = vec![GpuAssignment {
            index: gpu,
            uuid: uuid.into(),
        }];
        inst.ipc_mode = NamespaceMode::Host;
        inst.pid_mode = NamespaceMode::Host;
        inst
    }

    /// A decode replica on GPU 1 with 2 GiB of shm planned.
    fn gpu_instance() -> Instance {
        let mut inst = on_gpu("t", Role::Decode, 1, "GPU-1");
        inst.shm_size_bytes = 2 << 30;
        inst
    }

    #[test]
    fn gpus_by_explicit_id_and_host_shm_without_size() {
        let body = container_body(&gpu_instance(), "img", "host");
        let host = body.host_config.unwrap();
        let request = &host.device_requests.unwrap()[0];
        assert_eq!(request.device_ids.as_deref(), Some(&["1".to_string()][..]));
        assert_eq!(request.count, None, "count and device_ids conflict");
        assert_eq!(host.ipc_mode.as_deref(), Some("host"));
        assert_eq!(host.shm_size, None);
        assert!(
            host.port_bindings.is_none(),
            "host network: ports come from argv"
        );
        assert_eq!(host.privileged, Some(false));
        assert_eq!(body.entrypoint.unwrap(), ["vllm"]);
    }

    #[test]
    fn private_ipc_gets_the_planned_shm_and_bridge_gets_loopback_ports() {
        let mut i = gpu_instance();
        i.ipc_mode = NamespaceMode::Private;
        i.gpus.clear();
        let host = container_body(&i, "img", "bridge").host_config.unwrap();
        assert_eq!(host.shm_size, Some(2 << 30));
        assert!(host.device_requests.is_none());
        let bindings = host.port_bindings.unwrap();
        let b = bindings["8200/tcp"].as_ref().unwrap();
        assert_eq!(b[0].host_ip.as_deref(), Some("127.0.0.1"));
    }

    #[test]
    fn gpu_container_shares_host_ipc_and_pid_and_names_its_devices() {
        let mut inst = on_gpu("p", Role::Prefill, 2, "GPU-abc");
        inst.mounts = vec![PlanMount {
            source: "/srv/m".into(),
            target: "/mnt/models".into(),
            read_only: true,
        }];
        let body = container_body(&inst, "img", "host");
        let hc = body.host_config.unwrap();
        let dr = &hc.device_requests.unwrap()[0];
        assert_eq!(dr.device_ids.as_deref(), Some(&["2".to_string()][..]));
        assert_eq!(dr.count, None);
        assert_eq!(dr.capabilities, Some(vec![vec!["gpu".to_string()]]));
        assert_eq!(
            hc.shm_size, None,
            "host IPC: the host's /dev/shm, no shm_size"
        );
        assert_eq!(hc.ipc_mode.as_deref(), Some("host"));
        assert_eq!(hc.pid_mode.as_deref(), Some("host"));
        assert_eq!(hc.port_bindings, None);
        assert_eq!(hc.privileged, Some(false));
        assert_eq!(hc.tmpfs, None);
        let m = &hc.mounts.unwrap()[0];
        assert_eq!(m.read_only, Some(true));
        assert_eq!(m.target.as_deref(), Some("/mnt/models"));
    }

    #[test]
    fn cpu_container_gets_private_shm_of_planned_size_and_loopback_ports() {
        let mut inst = instance("p", Role::Decode, 1, "h1");
        inst.engine.env = vec![EnvVar::new("A", "b=c")];
        let body = container_body(&inst, "img", "bridge");
        assert_eq!(body.entrypoint, Some(vec!["vllm".to_string()]));
        assert_eq!(body.cmd.as_ref().unwrap()[0], "serve");
        assert_eq!(
            body.env,
            Some(vec![
                "VLLM_NIXL_SIDE_CHANNEL_HOST=127.0.0.1".to_string(),
                format!("VLLM_NIXL_SIDE_CHANNEL_PORT={}", inst.side_channel_port),
                "A=b=c".to_string()
            ])
        );
        assert_eq!(
            body.labels
                .as_ref()
                .unwrap()
                .get(crate::plan::label::SPEC_HASH)
                .map(String::as_str),
            Some("h1")
        );
        let hc = body.host_config.unwrap();
        assert_eq!(
            hc.device_requests, None,
            "no GPUs: no device request at all"
        );
        assert_eq!(hc.shm_size, Some(1 << 30));
        assert_eq!(hc.ipc_mode.as_deref(), Some("private"));
        assert_eq!(hc.pid_mode, None);
        let pb = hc.port_bindings.unwrap();
        let b = &pb[&format!("{}/tcp", inst.http_port)].as_ref().unwrap()[0];
        assert_eq!(b.host_ip.as_deref(), Some("127.0.0.1"));
        assert_eq!(
            hc.restart_policy.unwrap().name,
            Some(RestartPolicyNameEnum::NO)
        );
        assert_eq!(body.stop_signal.as_deref(), Some("SIGTERM"));
    }
}
