//! On an agent running as root, every sandboxed action is a host user of
//! its own (`sandbox_uid_base`): never root, never a user another running
//! action has, so per-user kernel limits are not shared.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::common::{self, ActionSpec};
use crate::fleet::*;

/// `EMFILE`: too many open files (here: inotify instances of one user).
const EMFILE: i32 = 24;

/// The defaults: group 990000, users 990001 and up.
const BASE: u32 = 990_000;

/// Waits until `count` files named `name` exist under the agent's actions.
async fn wait_for_files(work_dir: &Path, name: &str, count: usize) -> Vec<PathBuf> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let found = find_named(&work_dir.join("actions"), name);
        if found.len() >= count {
            return found;
        }
        assert!(
            Instant::now() < deadline,
            "only {} of {count} actions got ready: {found:?}",
            found.len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Two actions running at once on a root agent: each runs as its own
/// unprivileged host user, its files are that user's, and no other host
/// user can enter the agent's directories.
#[tokio::test]
async fn each_running_action_is_a_host_user_of_its_own() {
    let mut f = Fleet::start(As::Root, &["--slots", "2"]).await;
    let mut streams = Vec::new();
    for name in ["first", "second"] {
        let spec = ActionSpec::shell(&format!(
            "echo {name} > /dev/null; id -u; id -g; touch owned; touch ready; sleep 3"
        ));
        let action = f.client.upload_action(&spec).await;
        streams.push(f.client.start_execute(&action).await.0);
    }
    let work_dir = f.work_dir();
    let ready = wait_for_files(&work_dir, "ready", 2).await;
    let mut owners = Vec::new();
    for r in &ready {
        let meta = std::fs::metadata(r.with_file_name("owned")).expect("the action's file");
        assert!(
            meta.uid() > BASE && meta.uid() <= BASE + 1000,
            "an action's file is owned by uid {}, not a sandbox user",
            meta.uid()
        );
        assert_eq!(meta.gid(), BASE, "the sandbox group");
        owners.push(meta.uid());
    }
    assert_ne!(owners[0], owners[1], "two running actions share a user");
    for dir in [work_dir.clone(), work_dir.join("actions")] {
        let meta = std::fs::metadata(&dir).expect("stat");
        assert_eq!(
            (meta.permissions().mode() & 0o777, meta.uid(), meta.gid()),
            (0o710, 0, BASE),
            "{} must be open to the sandbox group only",
            dir.display()
        );
    }
    assert!(
        !as_other_user(&format!("ls '{}'", ready[0].display())),
        "another host user reaches an action's files"
    );
    let mut said = Vec::new();
    for stream in streams {
        let (_, response) = common::follow(stream).await.expect("the response");
        let result = response.result.clone().unwrap_or_default();
        assert_eq!(result.exit_code, 0, "{response:?}");
        said.push(f.output(result.stdout_digest.as_ref()).await);
    }
    for uid in owners {
        assert!(
            said.contains(&format!("{uid}\n{BASE}\n")),
            "no action said it ran as {uid}:{BASE}: {said:?}"
        );
    }
}

/// Opens inotify instances until the kernel refuses; prints how many and
/// the errno, then holds them.
const FLOOD_PY: &str = r#"import ctypes, sys, time, pathlib
libc = ctypes.CDLL(None, use_errno=True)
held = []
while True:
    fd = libc.inotify_init()
    if fd < 0:
        break
    held.append(fd)
print("flooded", len(held), ctypes.get_errno(), flush=True)
pathlib.Path("ready").touch()
time.sleep(float(sys.argv[1]))
"#;

/// Exits 0 when an inotify instance can be made.
const ONE_INOTIFY_PY: &str =
    "import ctypes, sys; sys.exit(0 if ctypes.CDLL(None).inotify_init() >= 0 else 1)";

/// An action that takes every inotify instance its user may have leaves
/// the host's root, and an action running beside it, theirs: the kernel
/// counts them per user, and the two actions are different users.
#[tokio::test]
async fn an_inotify_flood_reaches_no_other_action_nor_root() {
    let limit: usize = std::fs::read_to_string("/proc/sys/fs/inotify/max_user_instances")
        .expect("max_user_instances")
        .trim()
        .parse()
        .expect("a number");
    let mut f = Fleet::start(As::Root, &["--slots", "2"]).await;
    let mut flood = ActionSpec::shell("python3 flood.py 4");
    flood.inputs = vec![("flood.py".into(), FLOOD_PY.as_bytes().to_vec().into())];
    let action = f.client.upload_action(&flood).await;
    let (stream, _) = f.client.start_execute(&action).await;
    wait_for_files(&f.work_dir(), "ready", 1).await;

    let host = std::process::Command::new("python3")
        .args(["-c", ONE_INOTIFY_PY])
        .status()
        .expect("python3 on the host");
    assert!(
        host.success(),
        "the host's root cannot make an inotify instance"
    );
    let beside = f
        .run(&ActionSpec::shell(&format!(
            "python3 -c '{ONE_INOTIFY_PY}'"
        )))
        .await;
    assert_eq!(
        beside.result.exit_code, 0,
        "an action beside the flood cannot make an inotify instance: {}",
        beside.stderr
    );

    let (_, response) = common::follow(stream).await.expect("the flood's response");
    let result = response.result.clone().unwrap_or_default();
    let said = f.output(result.stdout_digest.as_ref()).await;
    let fields: Vec<&str> = said.split_whitespace().collect();
    assert_eq!(fields.first(), Some(&"flooded"), "{said}");
    let (got, errno): (usize, i32) = (
        fields[1].parse().expect("count"),
        fields[2].parse().expect("errno"),
    );
    assert_eq!(errno, EMFILE, "the flood ended for another reason");
    assert!(
        got + 8 >= limit,
        "the flood got {got} of its user's {limit}: it shares a count with others"
    );
}

/// Whether `path` is a mount point in this process's mount namespace.
fn mounted(path: &Path) -> bool {
    let info = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    let path = path.to_string_lossy();
    info.lines()
        .any(|l| l.split(' ').nth(4) == Some(path.as_ref()))
}

/// A root agent whose work directory lies under a directory other users
/// may not enter (here a 0700 temporary directory, as `/root` is) still
/// runs sandboxed actions as their own users: it binds the work directory
/// at `/run/outpost/ID` for them, and removes the bind when it stops.
#[tokio::test]
async fn a_work_dir_in_a_private_directory_is_reached_through_a_bind() {
    let dir = common::tempdir();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).expect("chmod");
    let server = common::Coordinator::start(&dir.path().join("data"), &[]);
    let agent = common::Agent::start(&server.endpoint(), &dir.path().join("agent"), &[]);
    agent
        .wait_for("registered with the coordinator", Duration::from_secs(30))
        .await;
    let bind = Path::new("/run/outpost").join(agent.id());
    assert!(mounted(&bind), "no bind at {}", bind.display());
    let mut client = server.client().await;
    let action = client
        .upload_action(&ActionSpec::shell("id -u; echo made > out.txt"))
        .await;
    let (_, response) = client.execute(&action, true).await.expect("execute");
    let result = response.result.unwrap_or_default();
    assert_eq!(result.exit_code, 0, "{:?}", response.message);
    let digest = outpost_proto::digest::Digest::from_proto(
        result.stdout_digest.as_ref().expect("stdout"),
        outpost_proto::digest::Function::Sha256,
    )
    .expect("digest");
    let uid: u32 = String::from_utf8_lossy(&client.download(&digest).await.expect("stdout"))
        .trim()
        .parse()
        .expect("a uid");
    assert!(uid > BASE, "ran as {uid}");
    agent.stop().await;
    assert!(!mounted(&bind), "the bind outlived the agent");
}
