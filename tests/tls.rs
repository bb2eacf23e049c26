//! TLS on the coordinator with a test CA: agents, clients and the admin CLI
//! verify it; certificates rotate on reload; mutual TLS keeps out clients
//! without a certificate from the right CA.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::pki::{Ca, Issued};
use common::{ActionSpec, Agent, Client, Coordinator, OUTPOST, tempdir};
use outpost_proto::client::Dial;

fn path(p: &Path) -> String {
    p.display().to_string()
}

/// A coordinator serving TLS with `server`'s certificate.
fn start_tls(dir: &Path, server: &Issued, extra: &[&str]) -> Coordinator {
    let (cert, key) = (path(&server.cert), path(&server.key));
    let mut args = vec!["--tls-cert", &cert, "--tls-key", &key];
    args.extend_from_slice(extra);
    Coordinator::start(&dir.join("data"), &args)
}

/// An agent (no sandbox) dialing `address` with these TLS flags.
fn tls_agent(address: &str, dir: &Path, tls: &[&str]) -> Agent {
    let mut args = vec!["--isolation", "none"];
    args.extend_from_slice(tls);
    Agent::start(address, &dir.join("agent"), &args)
}

fn tls_address(coordinator: &Coordinator) -> String {
    format!("grpcs://127.0.0.1:{}", coordinator.addr.port())
}

fn dial(address: &str, ca: &Path) -> Dial {
    Dial {
        ca: Some(ca.to_owned()),
        ..Dial::new(address)
    }
}

/// Runs `echo` remotely; panics unless it comes back with its output.
async fn run_an_action(client: &mut Client, word: &str) {
    let mut spec = ActionSpec::shell(&format!("echo {word} > out.txt"));
    spec.output_paths = vec!["out.txt".into()];
    let action = client.upload_action(&spec).await;
    let (_, response) = client.execute(&action, true).await.expect("execute");
    let result = response.result.expect("a result");
    assert_eq!(result.exit_code, 0, "{result:?}");
    let file = result.output_files.first().expect("out.txt came back");
    let digest = outpost_proto::digest::Digest::from_proto(
        file.digest.as_ref().expect("digest"),
        outpost_proto::digest::Function::Sha256,
    )
    .expect("valid digest");
    let bytes = client.download(&digest).await.expect("download");
    assert_eq!(String::from_utf8_lossy(&bytes).trim(), word);
}

/// A call that must fail; returns what the failure said.
async fn refused(dial: &Dial) -> String {
    match Client::dial(dial).await {
        Err(e) => e,
        Ok(mut client) => match client
            .capabilities
            .get_capabilities(outpost_proto::reapi::GetCapabilitiesRequest::default())
            .await
        {
            Ok(_) => panic!("{} let a call through", dial.address),
            Err(status) => format!("{status:?}"),
        },
    }
}

fn admin(args: &[&str]) -> (bool, String) {
    let out = Command::new(OUTPOST).args(args).output().expect("outpost");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn sighup(pid: u32) {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGHUP,
    )
    .expect("SIGHUP");
}

#[tokio::test]
async fn agents_and_clients_verify_the_coordinator_and_certificates_rotate_on_reload() {
    let dir = tempdir();
    let d = dir.path();
    let first = Ca::new(d, "first");
    let server = first.server(d, "server");
    let coordinator = start_tls(d, &server, &[]);
    let address = tls_address(&coordinator);
    let agent = tls_agent(&address, d, &["--tls-ca", &path(&first.pem)]);
    agent
        .wait_for("registered with the coordinator", Duration::from_secs(30))
        .await;

    let mut client = Client::dial(&dial(&address, &first.pem))
        .await
        .expect("a client that trusts the CA connects");
    run_an_action(&mut client, "over-tls").await;

    // Plain gRPC to the TLS port, and TLS with another CA, get nowhere.
    let said = refused(&Dial::new(format!("grpc://{}", coordinator.addr))).await;
    eprintln!("plain gRPC to the TLS port: {said}");
    let stranger = Ca::new(d, "stranger");
    let said = refused(&dial(&address, &stranger.pem)).await;
    assert!(
        said.contains("UnknownIssuer") || said.contains("certificate"),
        "{said}"
    );

    // The admin CLI speaks TLS too, and says why it cannot when it cannot.
    let (ok, said) = admin(&[
        "fleet",
        "--coordinator",
        &address,
        "--ca",
        &path(&first.pem),
    ]);
    assert!(ok && said.contains(&agent.id()), "{said}");
    let (ok, said) = admin(&["fleet", "--coordinator", &address]);
    assert!(!ok && said.contains("certificate"), "{said}");
    let (ok, said) = admin(&[
        "fleet",
        "--coordinator",
        &format!("grpc://{}", coordinator.addr),
        "--ca",
        &path(&first.pem),
    ]);
    assert!(!ok && said.contains("use grpcs://"), "{said}");

    // Rotate: a certificate from another CA replaces the files in place.
    let second = Ca::new(d, "second");
    second.server(d, "server");
    sighup(coordinator.pid());
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut fresh = loop {
        if let Ok(mut c) = Client::dial(&dial(&address, &second.pem)).await
            && c.capabilities
                .get_capabilities(outpost_proto::reapi::GetCapabilitiesRequest::default())
                .await
                .is_ok()
        {
            break c;
        }
        assert!(
            Instant::now() < deadline,
            "the new certificate was never served"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let said = refused(&dial(&address, &first.pem)).await;
    assert!(
        said.contains("certificate") || said.contains("Unknown"),
        "{said}"
    );
    // The agent's connection, made before, carries on.
    run_an_action(&mut fresh, "after-rotation").await;
    assert_eq!(agent.count("registered with the coordinator"), 1);

    // A broken key file at reload changes nothing.
    std::fs::write(&server.key, "-----BEGIN PRIVATE KEY-----\nbroken\n").expect("write");
    sighup(coordinator.pid());
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut again = Client::dial(&dial(&address, &second.pem))
        .await
        .expect("the rotated certificate is still served");
    run_an_action(&mut again, "after-a-bad-reload").await;
}

#[tokio::test]
async fn mutual_tls_admits_only_certificates_from_the_client_ca() {
    let dir = tempdir();
    let d = dir.path();
    let servers = Ca::new(d, "servers");
    let server = servers.server(d, "server");
    let clients = Ca::new(d, "clients");
    let coordinator = start_tls(d, &server, &["--tls-client-ca", &path(&clients.pem)]);
    let address = tls_address(&coordinator);

    // No certificate, or one from another CA: refused.
    let said = refused(&dial(&address, &servers.pem)).await;
    eprintln!("without a client certificate: {said}");
    let outsider = Ca::new(d, "outsider").client(d, "outsider");
    let said = refused(&Dial {
        cert: Some(outsider.cert.clone()),
        key: Some(outsider.key.clone()),
        ..dial(&address, &servers.pem)
    })
    .await;
    eprintln!("with a certificate from another CA: {said}");

    let agent_cert = clients.client(d, "agent");
    let agent = tls_agent(
        &address,
        d,
        &[
            "--tls-ca",
            &path(&servers.pem),
            "--tls-cert",
            &path(&agent_cert.cert),
            "--tls-key",
            &path(&agent_cert.key),
        ],
    );
    agent
        .wait_for("registered with the coordinator", Duration::from_secs(30))
        .await;
    let builder = clients.client(d, "builder");
    let mut client = Client::dial(&Dial {
        cert: Some(builder.cert),
        key: Some(builder.key),
        ..dial(&address, &servers.pem)
    })
    .await
    .expect("a client with a certificate connects");
    run_an_action(&mut client, "mutual").await;
}

#[test]
fn bad_tls_settings_are_refused_at_start() {
    let dir = tempdir();
    let d = dir.path();
    let ca = Ca::new(d, "ca");
    let server = ca.server(d, "server");
    let other = ca.server(d, "other");
    let start = |args: &[&str]| {
        let out = Command::new(OUTPOST)
            .args(["coordinator", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(d.join("data"))
            .args(args)
            .output()
            .expect("outpost");
        assert!(!out.status.success(), "{args:?} started");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let (cert, key) = (path(&server.cert), path(&server.key));
    let said = start(&["--tls-cert", &cert]);
    assert!(said.contains("--tls-key"), "{said}");
    let said = start(&["--tls-cert", &cert, "--tls-key", &path(&other.key)]);
    assert!(said.contains("does not go with"), "{said}");
    let said = start(&["--tls-cert", &key, "--tls-key", &key]);
    assert!(said.contains("holds no PEM certificate"), "{said}");
    let said = start(&["--tls-client-ca", &path(&ca.pem)]);
    assert!(said.contains("tls_client_ca needs TLS"), "{said}");

    let out = Command::new(OUTPOST)
        .args([
            "agent",
            "--coordinator",
            "grpc://127.0.0.1:1",
            "--ca",
            &cert,
        ])
        .arg("--work-dir")
        .arg(d.join("agent"))
        .output()
        .expect("outpost agent");
    assert!(!out.status.success());
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(said.contains("use grpcs://127.0.0.1:1"), "{said}");
}

/// gRPC's C core (python3-grpcio): another TLS and HTTP/2 stack than the
/// one Outpost is built on. It checks health, then calls Capabilities with
/// a client certificate and a token, without the token, and without the
/// certificate, printing one line per call.
const GRPC_CORE_CLIENT: &str = r#"
import sys, grpc
address, ca, cert, key, token = sys.argv[1:6]
read = lambda p: open(p, "rb").read()
def call(method, with_cert, with_token):
    creds = grpc.ssl_channel_credentials(
        root_certificates=read(ca),
        private_key=read(key) if with_cert else None,
        certificate_chain=read(cert) if with_cert else None)
    with grpc.secure_channel(address, creds) as channel:
        rpc = channel.unary_unary(method)
        metadata = [("authorization", "Bearer " + token)] if with_token else []
        try:
            reply = rpc(b"", timeout=10, metadata=metadata)
            return "OK %d bytes" % len(reply)
        except grpc.RpcError as e:
            return "%s %s" % (e.code().name, e.details())
print("health:", call("/grpc.health.v1.Health/Check", True, False))
print("capabilities:", call("/build.bazel.remote.execution.v2.Capabilities/GetCapabilities", True, True))
print("no token:", call("/build.bazel.remote.execution.v2.Capabilities/GetCapabilities", True, False))
print("no certificate:", call("/grpc.health.v1.Health/Check", False, True))
"#;

#[test]
fn grpc_core_clients_speak_tls_and_mutual_tls_with_tokens() {
    let Some(python) = common::grpc_core_python() else {
        return;
    };
    let dir = tempdir();
    let d = dir.path();
    let servers = Ca::new(d, "servers");
    let server = servers.server(d, "server");
    let clients = Ca::new(d, "clients");
    let client = clients.client(d, "python");
    let token = "python-client-token-01";
    std::fs::write(d.join("client-tokens"), format!("{token}\n")).expect("write");
    let coordinator = start_tls(
        d,
        &server,
        &[
            "--tls-client-ca",
            &path(&clients.pem),
            "--client-tokens",
            &path(&d.join("client-tokens")),
        ],
    );
    let out = Command::new(python)
        .args(["-c", GRPC_CORE_CLIENT])
        .arg(format!("127.0.0.1:{}", coordinator.addr.port()))
        .args([
            path(&servers.pem),
            path(&client.cert),
            path(&client.key),
            token.to_owned(),
        ])
        .output()
        .expect("python3");
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    eprintln!("{said}{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success());
    let line = |prefix: &str| {
        said.lines()
            .find_map(|l| l.strip_prefix(prefix))
            .unwrap_or_else(|| panic!("no {prefix:?} line in {said}"))
            .trim()
            .to_owned()
    };
    assert_eq!(line("health:"), "OK 2 bytes", "SERVING is two bytes");
    assert!(line("capabilities:").starts_with("OK "), "{said}");
    assert!(line("no token:").starts_with("UNAUTHENTICATED "), "{said}");
    assert!(line("no certificate:").starts_with("UNAVAILABLE"), "{said}");
}
