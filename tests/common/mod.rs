//! Shared helpers for the end-to-end tests: start the real `outpost`
//! binary as a separate process and talk to it over gRPC.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use bytes::Bytes;
use outpost_proto::bytestream::{self, byte_stream_client::ByteStreamClient};
use outpost_proto::digest::{Digest, Function};
use outpost_proto::reapi::{
    self, action_cache_client::ActionCacheClient, capabilities_client::CapabilitiesClient,
    content_addressable_storage_client::ContentAddressableStorageClient,
};
use outpost_proto::resource::{self, Compressor};
/// A channel that sends a bearer token when it has one (the agent's own).
pub type Channel = outpost_proto::client::Transport;

pub const OUTPOST: &str = env!("CARGO_BIN_EXE_outpost");

/// A coordinator process; killed when dropped.
pub struct Coordinator {
    child: Child,
    pub addr: SocketAddr,
    pub data_dir: PathBuf,
}

impl Coordinator {
    /// Starts `outpost coordinator` on a free loopback port.
    pub fn start(data_dir: &Path, extra: &[&str]) -> Coordinator {
        Coordinator::start_with(Command::new(OUTPOST), data_dir, extra)
    }

    /// Starts it on a given address (to restart on the same port).
    pub fn start_at(data_dir: &Path, listen: &str, extra: &[&str]) -> Coordinator {
        let mut args = vec!["--listen", listen];
        args.extend_from_slice(extra);
        Coordinator::start_inner(Command::new(OUTPOST), data_dir, &args)
    }

    /// Starts it through a prepared command (e.g. a wrapper like `unshare`
    /// whose last argument will be the outpost binary).
    pub fn start_with(cmd: Command, data_dir: &Path, extra: &[&str]) -> Coordinator {
        let mut args = vec!["--listen", "127.0.0.1:0"];
        args.extend_from_slice(extra);
        Coordinator::start_inner(cmd, data_dir, &args)
    }

    fn start_inner(mut cmd: Command, data_dir: &Path, extra: &[&str]) -> Coordinator {
        cmd.args(["coordinator", "--data-dir"])
            .arg(data_dir)
            .args(extra)
            .env("OUTPOST_LOG", "info,outpost_coordinator=debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("start the outpost binary");
        let stderr = child.stderr.take().expect("stderr is piped");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("[coordinator] {line}");
                if let Some(rest) = line.split("coordinator listening on ").nth(1) {
                    let addr = rest
                        .split_whitespace()
                        .next()
                        .unwrap_or_default()
                        .to_owned();
                    let _ = tx.send(addr);
                }
            }
        });
        let addr = match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(addr) => addr.parse().expect("a socket address in the log"),
            Err(_) => {
                let _ = child.kill();
                panic!("the coordinator did not start listening within 30s (see its log above)");
            }
        };
        Coordinator {
            child,
            addr,
            data_dir: data_dir.to_owned(),
        }
    }

    pub fn endpoint(&self) -> String {
        format!("grpc://{}", self.addr)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub async fn client(&self) -> Client {
        Client::connect(&format!("http://{}", self.addr)).await
    }

    /// kill -9.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then wait (off the async runtime, so clients in this
    /// process can still answer the server's goodbye) for a clean exit.
    pub async fn stop(mut self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("signal");
        let mut child = std::mem::replace(
            &mut self.child,
            Command::new("true").spawn().expect("spawn true"),
        );
        let status = tokio::task::spawn_blocking(move || child.wait())
            .await
            .expect("join")
            .expect("wait");
        assert!(status.success(), "coordinator exited with {status}");
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Coordinator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An agent process; killed when dropped. Its log lines are kept.
pub struct Agent {
    child: Child,
    pub work_dir: PathBuf,
    log: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl Agent {
    pub fn start(coordinator: &str, work_dir: &Path, extra: &[&str]) -> Agent {
        Agent::start_with(Command::new(OUTPOST), coordinator, work_dir, extra)
    }

    /// Starts the agent with `cmd`, which ends up running `outpost` with
    /// the arguments appended (e.g. a wrapper that drops privileges).
    pub fn start_with(
        mut cmd: Command,
        coordinator: &str,
        work_dir: &Path,
        extra: &[&str],
    ) -> Agent {
        let mut child = cmd
            .args(["agent", "--coordinator", coordinator, "--work-dir"])
            .arg(work_dir)
            .args(extra)
            .env("OUTPOST_LOG", "info,outpost_agent=debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start the outpost agent");
        let stderr = child.stderr.take().expect("stderr is piped");
        let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = std::sync::Arc::clone(&log);
        let name = work_dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("[agent {name}] {line}");
                sink.lock().expect("log lock").push(line);
            }
        });
        Agent {
            child,
            work_dir: work_dir.to_owned(),
            log,
        }
    }

    /// Log lines containing `needle`.
    pub fn count(&self, needle: &str) -> usize {
        self.log
            .lock()
            .expect("log lock")
            .iter()
            .filter(|l| l.contains(needle))
            .count()
    }

    /// Waits until a log line contains `needle`.
    pub async fn wait_for(&self, needle: &str, within: Duration) {
        let deadline = std::time::Instant::now() + within;
        while self.count(needle) == 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "agent never logged {needle:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The id it registers with.
    pub fn id(&self) -> String {
        std::fs::read_to_string(self.work_dir.join("agent-id"))
            .expect("the agent wrote its id")
            .trim()
            .to_owned()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then wait for it to drain and exit.
    pub async fn stop(mut self) -> std::process::ExitStatus {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("signal");
        let mut child = std::mem::replace(
            &mut self.child,
            Command::new("true").spawn().expect("spawn true"),
        );
        tokio::task::spawn_blocking(move || child.wait())
            .await
            .expect("join")
            .expect("wait")
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A free loopback port (bound and released; fine for tests).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// REAPI clients on one channel.
#[derive(Clone)]
pub struct Client {
    pub cas: ContentAddressableStorageClient<Channel>,
    pub bytestream: ByteStreamClient<Channel>,
    pub ac: ActionCacheClient<Channel>,
    pub capabilities: CapabilitiesClient<Channel>,
    pub execution: reapi::execution_client::ExecutionClient<Channel>,
    pub operations: outpost_proto::longrunning::operations_client::OperationsClient<Channel>,
}

impl Client {
    pub async fn connect(uri: &str) -> Client {
        Client::connect_as(uri, None).await
    }

    /// Connects sending `authorization: Bearer TOKEN` on every call.
    pub async fn connect_as(uri: &str, token: Option<&str>) -> Client {
        let channel = tonic::transport::Channel::from_shared(uri.to_owned())
            .expect("uri")
            .connect()
            .await
            .expect("connect to the coordinator");
        Client::over(Channel::new(
            channel,
            outpost_proto::client::Bearer::new(token).expect("an ASCII token"),
        ))
    }

    /// Connects as `dial` says (TLS, client certificate, token file);
    /// the error, with its causes, when the connection cannot be made.
    pub async fn dial(dial: &outpost_proto::client::Dial) -> Result<Client, String> {
        let endpoint = dial.endpoint().map_err(|e| e.to_string())?;
        let channel = endpoint
            .connect()
            .await
            .map_err(|e| outpost_proto::client::error_chain(&e))?;
        Ok(Client::over(Channel::new(
            channel,
            dial.bearer().map_err(|e| e.to_string())?,
        )))
    }

    pub fn over(channel: Channel) -> Client {
        let max = 64 << 20;
        Client {
            cas: ContentAddressableStorageClient::new(channel.clone())
                .max_decoding_message_size(max)
                .max_encoding_message_size(max),
            bytestream: ByteStreamClient::new(channel.clone()).max_decoding_message_size(max),
            ac: ActionCacheClient::new(channel.clone()),
            capabilities: CapabilitiesClient::new(channel.clone()),
            execution: reapi::execution_client::ExecutionClient::new(channel.clone()),
            operations: outpost_proto::longrunning::operations_client::OperationsClient::new(
                channel,
            ),
        }
    }

    pub async fn find_missing(&mut self, digests: &[Digest]) -> Vec<reapi::Digest> {
        let function = digests.first().map_or(Function::Sha256, |d| d.function);
        self.cas
            .find_missing_blobs(reapi::FindMissingBlobsRequest {
                instance_name: String::new(),
                blob_digests: digests.iter().map(Digest::to_proto).collect(),
                digest_function: function.to_proto() as i32,
            })
            .await
            .expect("FindMissingBlobs")
            .into_inner()
            .missing_blob_digests
    }

    /// Uploads with ByteStream in `chunk`-sized messages.
    pub async fn write(
        &mut self,
        name: String,
        data: Bytes,
        chunk: usize,
    ) -> Result<bytestream::WriteResponse, tonic::Status> {
        let requests = write_requests(name, data, 0, chunk, true);
        self.bytestream
            .write(tokio_stream::iter(requests))
            .await
            .map(|r| r.into_inner())
    }

    pub async fn upload(&mut self, digest: &Digest, data: Bytes) {
        let name = resource::write_name("", &upload_id(), digest, Compressor::Identity);
        let r = self.write(name, data, 1 << 20).await.expect("upload");
        assert_eq!(r.committed_size, digest.size as i64);
    }

    /// Reads with ByteStream; the whole result.
    pub async fn read(
        &mut self,
        name: String,
        offset: i64,
        limit: i64,
    ) -> Result<Vec<u8>, tonic::Status> {
        let mut stream = self
            .bytestream
            .read(bytestream::ReadRequest {
                resource_name: name,
                read_offset: offset,
                read_limit: limit,
            })
            .await?
            .into_inner();
        let mut out = Vec::new();
        while let Some(msg) = stream.message().await? {
            out.extend_from_slice(&msg.data);
        }
        Ok(out)
    }

    pub async fn download(&mut self, digest: &Digest) -> Result<Vec<u8>, tonic::Status> {
        self.read(resource::read_name("", digest, Compressor::Identity), 0, 0)
            .await
    }
}

/// python3 with gRPC's C core (python3-grpcio), or None (after saying
/// why) where it is missing and the run does not require it.
pub fn grpc_core_python() -> Option<&'static str> {
    let python = "/usr/bin/python3";
    let has_grpc = Command::new(python)
        .args(["-c", "import grpc"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !has_grpc {
        let why = "python3-grpcio is not installed (apt-get install python3-grpcio; scripts/test.sh does this)";
        assert!(
            std::env::var_os("OUTPOST_REQUIRE_GRPCIO").is_none(),
            "{why}"
        );
        eprintln!("SKIPPED: {why}");
        return None;
    }
    Some(python)
}

/// Write messages for `data` starting at `offset`.
pub fn write_requests(
    name: String,
    data: Bytes,
    offset: i64,
    chunk: usize,
    finish: bool,
) -> Vec<bytestream::WriteRequest> {
    let mut requests = Vec::new();
    let mut at = 0usize;
    loop {
        let end = (at + chunk).min(data.len());
        let last = end == data.len();
        requests.push(bytestream::WriteRequest {
            resource_name: if at == 0 { name.clone() } else { String::new() },
            write_offset: offset + at as i64,
            finish_write: last && finish,
            data: data.slice(at..end),
        });
        if last {
            return requests;
        }
        at = end;
    }
}

pub fn upload_id() -> String {
    format!("{:032x}", rand_u128())
}

fn rand_u128() -> u128 {
    use std::hash::{BuildHasher, Hasher};
    let a = std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish();
    let b = std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish();
    (u128::from(a) << 64) | u128::from(b)
}

/// Deterministic pseudo-random bytes (incompressible enough for tests).
pub fn blob(seed: u64, len: usize) -> (Digest, Bytes) {
    blob_with(Function::Sha256, seed, len)
}

pub fn blob_with(function: Function, seed: u64, len: usize) -> (Digest, Bytes) {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut data = Vec::with_capacity(len + 8);
    while data.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        data.extend_from_slice(&x.to_le_bytes());
    }
    data.truncate(len);
    (function.digest_of(&data), Bytes::from(data))
}

pub fn zstd(data: &[u8]) -> Bytes {
    Bytes::from(zstd::bulk::compress(data, 3).expect("compress"))
}

/// A temp directory that survives for the test.
pub fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("outpost-test-")
        .tempdir()
        .expect("tempdir")
}

/// Every file below `dir`, recursively.
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in entries.flatten() {
        let path = e.path();
        if path.is_dir() {
            out.extend(files_under(&path));
        } else {
            out.push(path);
        }
    }
    out
}
mod actions;
pub mod pki;

pub use actions::*;

/// A coordinator (with `args`) and one agent with `slots` running actions
/// unisolated (`--isolation none`, so tests may watch them from the host),
/// connected; the agent's work dir is `DIR/agent`.
pub async fn fleet(args: &[&str], slots: &str) -> (tempfile::TempDir, Coordinator, Agent, Client) {
    let dir = tempdir();
    let server = Coordinator::start(&dir.path().join("data"), args);
    let agent = Agent::start(
        &server.endpoint(),
        &dir.path().join("agent"),
        &["--slots", slots, "--isolation", "none"],
    );
    let mut client = server.client().await;
    wait_for_fleet(&mut client).await;
    (dir, server, agent, client)
}

/// Waits until a trivial action runs, i.e. an agent is connected.
pub async fn wait_for_fleet(client: &mut Client) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let probe = client.upload_action(&ActionSpec::shell("true")).await;
        if let Ok((_, r)) = client.execute(&probe, true).await
            && r.status.as_ref().is_none_or(|s| s.code == 0)
        {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no agent connected within 30s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// `GET path` over plain HTTP/1.1: the status code and the body.
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .expect("send");
    let mut reply = String::new();
    stream.read_to_string(&mut reply).await.expect("read");
    let status = reply
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("an HTTP status");
    let body = reply
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// Runs `bazel ARGS` in `workspace` with its output under `output_root`;
/// whether it succeeded, and what it printed (stdout then stderr).
pub fn bazel(workspace: &Path, output_root: &Path, args: &[&str]) -> (bool, String) {
    let output = Command::new("bazel")
        .arg(format!("--output_user_root={}", output_root.display()))
        .args(args)
        .current_dir(workspace)
        .output()
        .expect("run bazel");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), text)
}

/// Whether a Docker engine answers, with the local toolchain image `image`
/// (`scripts/test-image.sh` builds it when missing). Without an engine the
/// caller's tests say so loudly and pass, unless `OUTPOST_REQUIRE_DOCKER=1`
/// (as `scripts/test.sh` sets), where this fails.
pub fn docker_with_image(image: &str) -> bool {
    let required = std::env::var("OUTPOST_REQUIRE_DOCKER").is_ok_and(|v| v == "1");
    let engine = Command::new("docker")
        .args(["version", "--format", "{{.Server.APIVersion}}"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !engine {
        assert!(
            !required,
            "OUTPOST_REQUIRE_DOCKER=1 but no Docker engine answers"
        );
        eprintln!("SKIPPED: no Docker engine answers here; the Docker tests did not run");
        return false;
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/test-image.sh");
    let status = docker_image_build(Command::new(&script).arg(image));
    assert!(status, "scripts/test-image.sh could not build {image}");
    true
}

/// Runs an image build, one at a time across test processes.
pub fn docker_image_build(cmd: &mut Command) -> bool {
    let lock = std::fs::File::create("/tmp/outpost-test-image.lock").expect("lock file");
    let _held = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusive)
        .expect("lock the image build");
    cmd.status().is_ok_and(|s| s.success())
}
