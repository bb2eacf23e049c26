//! `Capabilities`: what this server honestly supports.

use outpost_proto::build::bazel::semver::SemVer;
use outpost_proto::digest::{Function, SUPPORTED};
use outpost_proto::reapi::{self, capabilities_server::Capabilities};
use tonic::{Request, Response, Status};

use super::Context;

pub struct CapabilitiesService {
    ctx: Context,
}

impl CapabilitiesService {
    pub fn new(ctx: Context) -> Self {
        CapabilitiesService { ctx }
    }
}

fn version(minor: i32) -> Option<SemVer> {
    Some(SemVer {
        major: 2,
        minor,
        patch: 0,
        prerelease: String::new(),
    })
}

#[tonic::async_trait]
impl Capabilities for CapabilitiesService {
    async fn get_capabilities(
        &self,
        _request: Request<reapi::GetCapabilitiesRequest>,
    ) -> Result<Response<reapi::ServerCapabilities>, Status> {
        let functions: Vec<i32> = SUPPORTED.iter().map(|f| f.to_proto() as i32).collect();
        let zstd = reapi::compressor::Value::Zstd as i32;
        Ok(Response::new(reapi::ServerCapabilities {
            cache_capabilities: Some(reapi::CacheCapabilities {
                digest_functions: functions.clone(),
                action_cache_update_capabilities: Some(reapi::ActionCacheUpdateCapabilities {
                    update_enabled: true,
                }),
                cache_priority_capabilities: None,
                max_batch_total_size_bytes: i64::try_from(self.ctx.max_batch_size)
                    .expect("validated to at most 64MiB"),
                // Stored verbatim; the cache does not resolve symlinks.
                symlink_absolute_path_strategy:
                    reapi::symlink_absolute_path_strategy::Value::Allowed as i32,
                supported_compressors: vec![zstd],
                supported_batch_update_compressors: vec![zstd],
                max_cas_blob_size_bytes: i64::try_from(self.ctx.cas.max_blob_size())
                    .unwrap_or(i64::MAX),
            }),
            execution_capabilities: Some(reapi::ExecutionCapabilities {
                digest_function: Function::Sha256.to_proto() as i32,
                exec_enabled: true,
                execution_priority_capabilities: Some(reapi::PriorityCapabilities {
                    priorities: vec![reapi::priority_capabilities::PriorityRange {
                        min_priority: i32::MIN,
                        max_priority: i32::MAX,
                    }],
                }),
                supported_node_properties: Vec::new(),
                digest_functions: functions,
            }),
            deprecated_api_version: version(0),
            low_api_version: version(0),
            high_api_version: version(3),
        }))
    }
}
