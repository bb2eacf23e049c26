//! `root-filesystem=input-root`: the action's `/` is its input root (a
//! whole sysroot, as BuildStream sends), with the sandbox's own `/proc`,
//! `/dev` and `/tmp` and no host path; only agents with `linux-sandbox`
//! offer it.

use std::process::Command;

use bytes::Bytes;

use crate::common::{ActionSpec, Agent, Coordinator, tempdir};
use crate::fleet::*;

/// A sysroot holding only the host's `/bin/sh` and the libraries it loads
/// (from `ldd`), at their host paths, and a marker file.
fn shell_sysroot() -> Vec<(String, Bytes)> {
    let ldd = Command::new("ldd").arg("/bin/sh").output().expect("ldd");
    let mut files = vec!["/bin/sh".to_owned()];
    for line in String::from_utf8_lossy(&ldd.stdout).lines() {
        // `libc.so.6 => /lib/.../libc.so.6 (0x...)` or `/lib64/ld-... (0x...)`.
        let path = line
            .split("=>")
            .last()
            .and_then(|rest| rest.split_whitespace().next())
            .filter(|p| p.starts_with('/'));
        files.extend(path.map(str::to_owned));
    }
    let mut inputs: Vec<(String, Bytes)> = files
        .iter()
        .map(|f| {
            let data = std::fs::read(f).unwrap_or_else(|e| panic!("reading {f}: {e}"));
            (f.trim_start_matches('/').to_owned(), Bytes::from(data))
        })
        .collect();
    inputs.push(("etc/sysroot-marker".into(), Bytes::from_static(b"staged\n")));
    inputs
}

/// Uses shell built-ins only: the sysroot has no other program.
const PROBE: &str = r#"[ -e /etc/sysroot-marker ] && echo marker: visible
[ -e /usr/bin/python3 ] || echo host-toolchain: absent
[ -e /proc/self/status ] && echo proc: mounted
[ -c /dev/null ] && echo dev-null: present
echo x > /tmp/t && echo tmp: writable
echo x > /etc/evil 2>/dev/null || echo input: read-only
echo "$PWD"
mkdir -p ../../install 2>/dev/null; echo built > ../../install/result && echo install: written"#;

#[tokio::test]
async fn the_input_root_is_the_actions_root() {
    let mut f = Fleet::start(As::Root, &[]).await;
    let mut spec = ActionSpec::shell(PROBE);
    spec.platform = vec![("root-filesystem".into(), "input-root".into())];
    spec.inputs = shell_sysroot();
    spec.working_directory = "build/dir".into();
    // Climbs out of the working directory, as BuildStream's install root does.
    spec.output_paths = vec!["../../install/result".into()];
    let ran = f.run(&spec).await;
    assert_eq!(ran.result.exit_code, 0, "stderr: {}", ran.stderr);
    for line in [
        "marker: visible",
        "host-toolchain: absent",
        "proc: mounted",
        "dev-null: present",
        "tmp: writable",
        "input: read-only",
        "/build/dir",
        "install: written",
    ] {
        assert!(
            ran.stdout.lines().any(|l| l == line),
            "{line:?} missing from:\n{}\nstderr: {}",
            ran.stdout,
            ran.stderr
        );
    }
    let result = ran
        .result
        .output_files
        .first()
        .expect("the climbing output");
    assert_eq!(result.path, "../../install/result");
    let d = outpost_proto::digest::Digest::from_proto(
        result.digest.as_ref().expect("digest"),
        outpost_proto::digest::Function::Sha256,
    )
    .expect("digest");
    assert_eq!(
        &f.client.download(&d).await.expect("download")[..],
        b"built\n"
    );
}

/// An agent without `linux-sandbox` never gets such an action: it would
/// run the sysroot's commands against the host's `/bin/sh`. With no agent
/// that offers it, the action fails at once, naming the property.
#[tokio::test]
async fn only_sandboxing_agents_get_input_root_actions() {
    let dir = tempdir();
    let server = Coordinator::start(&dir.path().join("data"), &["--startup-grace", "0s"]);
    let agent = Agent::start(
        &server.endpoint(),
        &dir.path().join("agent"),
        &["--isolation", "none"],
    );
    agent
        .wait_for(
            "registered with the coordinator",
            std::time::Duration::from_secs(30),
        )
        .await;
    let mut client = server.client().await;
    let mut spec = ActionSpec::shell("echo ran on the host");
    spec.platform = vec![("root-filesystem".into(), "input-root".into())];
    let action = client.upload_action(&spec).await;
    let err = client
        .execute(&action, true)
        .await
        .expect_err("no agent can run it");
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err}");
    assert!(
        err.message().contains("root-filesystem=input-root"),
        "{err}"
    );
}
