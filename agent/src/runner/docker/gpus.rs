//! GPUs in containers: the engine is asked for exactly the assigned
//! devices (a device request for the `nvidia` driver, by UUID), which only
//! an engine with the NVIDIA runtime can honour. Without it the action is
//! refused with what the engine has and how to add it, never started
//! without its GPUs.

use bollard::models::{DeviceRequest, SystemInfo};

use crate::error::Error;

/// The runtime the NVIDIA Container Toolkit registers with the engine.
const NVIDIA_RUNTIME: &str = "nvidia";

/// Whether the engine can give containers GPUs: `Err` lists the runtimes
/// it has instead.
pub(super) fn nvidia_runtime(info: &SystemInfo) -> Result<(), String> {
    let mut runtimes: Vec<&str> = info
        .runtimes
        .iter()
        .flatten()
        .map(|(name, _)| name.as_str())
        .collect();
    runtimes.sort_unstable();
    if runtimes.contains(&NVIDIA_RUNTIME) || info.default_runtime.as_deref() == Some(NVIDIA_RUNTIME)
    {
        Ok(())
    } else {
        Err(runtimes.join(", "))
    }
}

/// The device request for the assigned devices (`visible`: their UUIDs,
/// see `runner::gpu::Exposure`); none when the action was given none.
pub(super) fn device_requests(visible: &[String]) -> Option<Vec<DeviceRequest>> {
    (!visible.is_empty()).then(|| {
        vec![DeviceRequest {
            driver: Some(NVIDIA_RUNTIME.to_owned()),
            device_ids: Some(visible.to_vec()),
            capabilities: Some(vec![vec!["gpu".to_owned()]]),
            ..Default::default()
        }]
    })
}

/// The action was given GPUs this engine cannot pass to a container: the
/// agent's fault (it runs elsewhere), saying what to install.
pub(super) fn no_runtime(socket: &std::path::Path, runtimes: &str) -> Error {
    Error::Retryable(format!(
        "this action was given GPUs, but the Docker engine at {} has no NVIDIA runtime \
         (its runtimes: {runtimes}); install the NVIDIA Container Toolkit and run \
         `nvidia-ctk runtime configure --runtime=docker`, then restart the engine, or run \
         GPU actions with workload-isolation-type=linux-sandbox",
        socket.display()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::collections::HashMap;

    #[test]
    fn the_assigned_devices_are_requested_by_uuid() {
        assert_eq!(device_requests(&[]), None);
        let uuid = "GPU-5a9a6a1e-8f5c-2a3d-0c39-2d2f1e7f7d4b".to_owned();
        let requests = device_requests(std::slice::from_ref(&uuid)).expect("a request");
        assert_eq!(requests.len(), 1);
        assert_eq!(requests[0].driver.as_deref(), Some("nvidia"));
        assert_eq!(requests[0].device_ids, Some(vec![uuid]));
        // By id, never "all": a count would give the container every GPU.
        assert_eq!(requests[0].count, None);
    }

    #[test]
    fn an_engine_with_the_nvidia_runtime_is_recognised() {
        let info = SystemInfo {
            runtimes: Some(HashMap::from([
                ("runc".to_owned(), Default::default()),
                ("nvidia".to_owned(), Default::default()),
            ])),
            ..Default::default()
        };
        assert_eq!(nvidia_runtime(&info), Ok(()));
    }

    /// Against this machine's engine, which has no NVIDIA runtime: the
    /// error names what it has and what to install.
    #[tokio::test]
    async fn an_engine_without_the_nvidia_runtime_refuses_gpu_actions_clearly() {
        let socket = std::path::Path::new("/var/run/docker.sock");
        let engine = bollard::Docker::connect_with_unix(
            "/var/run/docker.sock",
            30,
            bollard::API_DEFAULT_VERSION,
        )
        .expect("the Docker engine's socket (this test needs the engine running)");
        let info = engine
            .info()
            .await
            .expect("docker info from the engine (this test needs the engine running)");
        let runtimes = nvidia_runtime(&info).expect_err("this machine has no NVIDIA runtime");
        assert!(runtimes.contains("runc"), "{runtimes}");
        let err = no_runtime(socket, &runtimes);
        assert!(matches!(err, Error::Retryable(_)));
        let message = err.to_string();
        assert!(
            message.contains("has no NVIDIA runtime")
                && message.contains("runc")
                && message.contains("nvidia-ctk runtime configure"),
            "{message}"
        );
    }
}
