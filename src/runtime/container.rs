//! The Docker container an instance runs as, from the plan alone (pure: no Docker needed).
//! The Docker runtime creates exactly this; the equivalence test compares it with the export.

use std::collections::HashMap;

use bollard::models::{
    ContainerCreateBody, DeviceRequest, HostConfig, Mount, MountType, PortBinding, RestartPolicy,
    RestartPolicyNameEnum,
};

use crate::plan::{Instance, NamespaceMode};

fn namespace(mode: NamespaceMode) -> String {
    match mode {
        NamespaceMode::Host => "host".into(),
        NamespaceMode::Private => "private".into(),
    }
}

pub fn container_body(instance: &Instance, image: &str, network_mode: &str) -> ContainerCreateBody {
    let host_network = network_mode == "host";
    let ports: Vec<u16> = vec![instance.http_port, instance.side_channel_port];
    let gpus = (!instance.gpus.is_empty()).then(|| {
        // Explicit device ids: never a bare capabilities request, which would expose every GPU.
        vec![DeviceRequest {
            driver: Some("nvidia".into()),
            device_ids: Some(instance.gpus.iter().map(|g| g.index.to_string()).collect()),
            capabilities: Some(vec![vec!["gpu".into()]]),
            ..Default::default()
        }]
    });
    let ipc_mode = namespace(instance.ipc_mode);
    // One /dev/shm mechanism only: a sized private namespace, or the host's (no size applies).
    let shm_size =
        (instance.ipc_mode == NamespaceMode::Private).then_some(instance.shm_size_bytes as i64);
    ContainerCreateBody {
        image: Some(instance.image.clone().unwrap_or_else(|| image.to_string())),
        entrypoint: Some(instance.argv[..1].to_vec()),
        cmd: Some(instance.argv[1..].to_vec()),
        env: Some(
            instance
                .env
                .iter()
                .map(|e| format!("{}={}", e.name, e.value))
                .collect(),
        ),
        labels: Some(instance.labels.clone().into_iter().collect()),
        exposed_ports: Some(ports.iter().map(|p| format!("{p}/tcp")).collect()),
        stop_signal: Some(instance.stop_signal.clone()),
        stop_timeout: Some(i64::from(instance.stop_grace_seconds)),
        host_config: Some(HostConfig {
            device_requests: gpus,
            shm_size,
            ipc_mode: Some(ipc_mode),
            pid_mode: Some(namespace(instance.pid_mode)),
            network_mode: Some(network_mode.to_string()),
            port_bindings: (!host_network).then(|| {
                ports
                    .iter()
                    .map(|p| {
                        let binding = PortBinding {
                            host_ip: Some("127.0.0.1".into()),
                            host_port: Some(p.to_string()),
                        };
                        (format!("{p}/tcp"), Some(vec![binding]))
                    })
                    .collect::<HashMap<_, _>>()
            }),
            mounts: Some(
                instance
                    .mounts
                    .iter()
                    .map(|m| Mount {
                        target: Some(m.target.display().to_string()),
                        source: Some(m.source.display().to_string()),
                        typ: Some(MountType::BIND),
                        read_only: Some(m.read_only),
                        ..Default::default()
                    })
                    .collect(),
            ),
            // pdctl supervises restarts itself (Docker never restarts an unhealthy container).
            restart_policy: Some(RestartPolicy {
                name: Some(RestartPolicyNameEnum::NO),
                maximum_retry_count: None,
            }),
            privileged: Some(false),
            init: Some(true),
            ..Default::default()
        }),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn instance() -> Instance {
        serde_json::from_value(crate::export::tests::instance_json()).unwrap()
    }

    #[test]
    fn gpus_by_explicit_id_and_host_shm_without_size() {
        let body = container_body(&instance(), "img", "host");
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
        let mut i = instance();
        i.ipc_mode = NamespaceMode::Private;
        i.gpus.clear();
        let host = container_body(&i, "img", "bridge").host_config.unwrap();
        assert_eq!(host.shm_size, Some(2 << 30));
        assert!(host.device_requests.is_none());
        let bindings = host.port_bindings.unwrap();
        let b = bindings["8200/tcp"].as_ref().unwrap();
        assert_eq!(b[0].host_ip.as_deref(), Some("127.0.0.1"));
    }
}
