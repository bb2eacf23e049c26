//! Hostile actions, each tried on a root and on an unprivileged agent.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use bytes::Bytes;
use outpost_proto::digest::Function;

use crate::common::{self, ActionSpec, Agent, Coordinator, OUTPOST, tempdir};
use crate::fleet::*;

async fn writes_outside_outputs_are_refused(user: As) {
    let mut f = Fleet::start(user, &[]).await;
    let host_dir = f.dir.path().join("host-only");
    std::fs::create_dir(&host_dir).expect("mkdir");
    let mut spec = script(&format!(
        "t usr 'echo x > /usr/outpost-evil'
t etc 'echo x > /etc/outpost-evil'
t root 'echo x > /outpost-evil'
t host-dir 'echo x > {host}/evil'
t input 'echo x >> input.txt'
t input-chmod 'chmod u+w input.txt && echo x >> input.txt'
t input-remove 'rm input.txt'
t input-dir 'echo x > src/new.c'
t src 'echo x >> src/a.c'
mkdir -p out && echo result > out/result.txt && echo output: written
echo x > /tmp/scratch && echo tmp: written",
        host = host_dir.display()
    ));
    spec.inputs = vec![
        ("input.txt".into(), Bytes::from_static(b"original\n")),
        ("src/a.c".into(), Bytes::from_static(b"int a;\n")),
    ];
    spec.output_paths = vec!["out/result.txt".into()];
    let ran = f
        .refuses(
            spec,
            &[
                "usr",
                "etc",
                "root",
                "host-dir",
                "input",
                "input-chmod",
                "input-remove",
                "input-dir",
                "src",
            ],
        )
        .await;
    assert_eq!(ran.result.exit_code, 0, "{}", ran.stderr);
    assert!(ran.stdout.contains("output: written"), "{}", ran.stdout);
    assert!(ran.stdout.contains("tmp: written"), "{}", ran.stdout);
    assert_eq!(ran.result.output_files.len(), 1, "the declared output");
    for p in ["/usr/outpost-evil", "/etc/outpost-evil", "/outpost-evil"] {
        assert!(!Path::new(p).exists(), "{p} was written on the host");
    }
    assert!(!host_dir.join("evil").exists());
    // The agent's cached copies of the inputs are intact.
    let mut check = ActionSpec::shell("cat input.txt src/a.c");
    check.inputs = vec![
        ("input.txt".into(), Bytes::from_static(b"original\n")),
        ("src/a.c".into(), Bytes::from_static(b"int a;\n")),
    ];
    let again = f.run(&check).await;
    assert_eq!(again.stdout, "original\nint a;\n");
}

async fn the_agents_secrets_are_out_of_sight(user: As) {
    let mut f = Fleet::start(user, &[]).await;
    let work_dir = f.work_dir();
    std::fs::write(work_dir.join("secret-token"), "SECRET").expect("write");
    let config = f.dir.path().join("agent.yaml");
    std::fs::write(&config, "log: info # SECRET\n").expect("write");
    let agent_pid = f.agent.pid();
    let spec = script(&format!(
        "t work-dir 'ls {w}'
t agent-id 'cat {w}/agent-id'
t token 'cat {w}/secret-token'
t config 'cat {config}'
t agent-environ 'cat /proc/{agent_pid}/environ'
t agent-proc 'ls /proc/{agent_pid}/root/'
t shadow 'cat /etc/shadow'
t ssl-private 'ls /etc/ssl/private'
t home 'ls /root/.cargo'
t env 'env | grep -q OUTPOST'
t coordinator-in-env 'env | grep -q 127.0.0.1'",
        w = work_dir.display(),
        config = config.display()
    ));
    f.refuses(
        spec,
        &[
            "work-dir",
            "agent-id",
            "token",
            "config",
            "agent-environ",
            "agent-proc",
            "shadow",
            "ssl-private",
            "home",
            "env",
            "coordinator-in-env",
        ],
    )
    .await;
}

async fn other_actions_inputs_are_invisible(user: As) {
    let mut f = Fleet::start(user, &["--slots", "2"]).await;
    let marker = format!("secret-{}", rand::random::<u64>());
    let mut first = ActionSpec::shell("sleep 10");
    first.inputs = vec![("secret.txt".into(), Bytes::from(marker.clone()))];
    let action = f.client.upload_action(&first).await;
    let (_, _stream) = f.client.start_execute(&action).await;
    // Wait until it runs: its directory exists on the host.
    let actions = f.work_dir().join("actions");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !std::fs::read_dir(&actions).is_ok_and(|mut d| d.next().is_some()) {
        assert!(Instant::now() < deadline, "the first action never started");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let spec = script(&format!(
        "t actions-dir 'ls {a}'
t other-root 'cat {a}/*/root/secret.txt'
t find 'find / -name secret.txt -not -path \"/proc/*\" 2>/dev/null | grep -q .'
t grep-tmp 'grep -rqs {marker} /tmp /execroot /dev/shm'
t parent 'ls /execroot/.. | grep -q actions'",
        a = actions.display()
    ));
    f.refuses(
        spec,
        &["actions-dir", "other-root", "find", "grep-tmp", "parent"],
    )
    .await;
}

async fn loopback_services_on_the_host_are_unreachable(user: As) {
    let mut f = Fleet::start(user, &[]).await;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    listener.set_nonblocking(true).expect("nonblocking");
    let coordinator_port = f._server.addr.port();
    let spec = script(&format!(
        "t tcp 'bash -c \"echo hi > /dev/tcp/127.0.0.1/{port}\"'
t coordinator 'bash -c \"echo hi > /dev/tcp/127.0.0.1/{coordinator_port}\"'
t dns 'getent hosts example.com'
bash -c 'echo > /dev/tcp/127.0.0.1/1' 2>&1 | grep -q refused && echo own-loopback: up"
    ));
    let ran = f.refuses(spec, &["tcp", "coordinator", "dns"]).await;
    assert!(
        ran.stdout.contains("own-loopback: up"),
        "the sandbox's own loopback works: {}",
        ran.stdout
    );
    assert!(
        listener.accept().is_err(),
        "the host's service was reached from the sandbox"
    );
}

async fn network_is_given_only_on_request_where_allowed(user: As) {
    let mut f = Fleet::start(user, &["--allow-network", "true"]).await;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let connect = format!("bash -c 'echo hi > /dev/tcp/127.0.0.1/{port}' && echo connected");
    let closed = f.run(&ActionSpec::shell(&connect)).await;
    assert!(
        !closed.stdout.contains("connected"),
        "no network unless asked"
    );
    let open = f
        .run(&ActionSpec::shell(&connect).with_platform("dockerNetwork", "bridge"))
        .await;
    assert!(
        open.stdout.contains("connected"),
        "dockerNetwork=bridge on an agent that allows it: {}",
        open.stderr
    );
    listener.accept().expect("the host's service was reached");
}

async fn agent_processes_cannot_be_signalled_or_traced(user: As) {
    let mut f = Fleet::start(user, &[]).await;
    let agent_pid = f.agent.pid();
    let ptrace = |pid: &str| {
        format!(
            "python3 -c \"import ctypes,sys; r=ctypes.CDLL(None,use_errno=True).ptrace(16,{pid},0,0); sys.exit(0 if r==0 else 1)\""
        )
    };
    let spec = script(&format!(
        "t kill-agent 'kill -9 {agent_pid}'
t ptrace-agent '{}'
t ptrace-sandbox-init '{}'
t see-agent 'ps ax | grep -v grep | grep -q \"outpost agent\"'
t foreign-session 'test \"$(cut -d\" \" -f6 /proc/self/stat)\" != 1'
kill -9 -1; echo after-kill-all",
        ptrace(&agent_pid.to_string()).replace('\'', "'\\''"),
        ptrace("1").replace('\'', "'\\''"),
    ));
    f.refuses(
        spec,
        &[
            "kill-agent",
            "ptrace-agent",
            "ptrace-sandbox-init",
            "see-agent",
            "foreign-session",
        ],
    )
    .await;
    assert!(alive(agent_pid), "the agent was killed");
    let after = f.run(&ActionSpec::shell("echo still-serving")).await;
    assert_eq!(after.stdout, "still-serving\n");
}

async fn a_fork_bomb_is_contained(user: As) {
    let mut f = Fleet::start(user, &["--action-pids-limit", "64"]).await;
    let marker = format!("bomb-{}", rand::random::<u64>());
    let mut spec = ActionSpec::shell(&format!("f() {{ f | f & }}; f; sleep 100 # {marker}"));
    spec.timeout = Some(Duration::from_secs(4));
    let started = Instant::now();
    let ran = f.run(&spec).await;
    let took = started.elapsed();
    let context = format!(
        "after {took:?}: status {:?}, exit code {}, message {:?}\nstdout: {}\nstderr: {}",
        ran.response.status, ran.result.exit_code, ran.response.message, ran.stdout, ran.stderr
    );
    // The bomb may fill its pids limit so fast that the shell cannot fork
    // `sleep` and exits at once, or the action may run into its timeout:
    // either way it is contained, and what must hold is checked below.
    let code = ran.response.status.as_ref().map_or(0, |s| s.code);
    let timed_out = code == tonic::Code::DeadlineExceeded as i32;
    let failed = code == tonic::Code::Ok as i32 && ran.result.exit_code != 0;
    assert!(
        timed_out || failed,
        "neither a timeout nor a failed exit: {context}"
    );
    let meta = ran.result.execution_metadata.clone().unwrap_or_default();
    let ran_for = meta
        .execution_start_timestamp
        .zip(meta.execution_completed_timestamp)
        .map(|(a, b)| {
            Duration::from_secs_f64(
                (b.seconds - a.seconds) as f64 + f64::from(b.nanos - a.nanos) / 1e9,
            )
        })
        .expect("the result has the execution's timestamps");
    assert!(
        ran_for < Duration::from_secs(4 + 5),
        "the action ran for {ran_for:?}, past its 4 s timeout: {context}"
    );
    assert!(took < Duration::from_secs(30), "{context}");
    all_gone(&marker, "the bomb outlived its action").await;
    let after = f.run(&ActionSpec::shell("echo still-serving")).await;
    assert_eq!(
        after.stdout, "still-serving\n",
        "the agent after the bomb: status {:?}, stderr {}",
        after.response.status, after.stderr
    );
}

async fn a_memory_hog_is_killed_and_reported_as_oom(user: As) {
    let mut f = Fleet::start(user, &["--action-memory-limit", "64MiB"]).await;
    let ran = f
        .run(&ActionSpec::shell(
            "head -c 400000000 /dev/zero | tail > /dev/null",
        ))
        .await;
    assert_ne!(ran.result.exit_code, 0);
    assert!(
        ran.response.message.contains("out of memory"),
        "ExecuteResponse.message: {:?}",
        ran.response.message
    );
    assert!(
        ran.stderr
            .contains("outpost: the action was killed for running out of memory"),
        "stderr: {}",
        ran.stderr
    );
    let fine = f
        .run(&ActionSpec::shell(
            "head -c 1000000 /dev/zero | tail | wc -c",
        ))
        .await;
    assert_eq!(
        fine.result.exit_code, 0,
        "a small action under the limit: {}",
        fine.stderr
    );
    assert!(fine.response.message.is_empty());
}

async fn daemons_die_with_their_action(user: As) {
    let mut f = Fleet::start(user, &[]).await;
    let marker = format!("daemon-{}", rand::random::<u64>());
    let ran = f
        .run(&ActionSpec::shell(&format!(
            "setsid sh -c 'sleep 300 # {marker}' & (nohup sleep 300 # {marker}
) & sleep 0.2; echo started"
        )))
        .await;
    assert_eq!(ran.stdout, "started\n");
    all_gone(&marker, "daemons outlived their action").await;
}

async fn symlinks_in_the_input_tree_stay_inside(user: As) {
    let mut f = Fleet::start(user, &[]).await;
    let work_dir = f.work_dir();
    let mut spec = script(&format!(
        "t shadow 'cat shadow'
t agent-id 'cat agent-id'
t up 'ls up/ | grep -q OUTPOST-AGENT-WORK-DIR'
t up-actions 'ls up{w}'
ln -s {w}/agent-id leak",
        w = work_dir.display()
    ));
    spec.symlinks = vec![
        ("shadow".into(), "/etc/shadow".into()),
        (
            "agent-id".into(),
            format!("{}/agent-id", work_dir.display()),
        ),
        ("up".into(), "../../../../../../..".into()),
    ];
    spec.output_paths = vec!["leak".into()];
    let ran = f
        .refuses(spec, &["shadow", "agent-id", "up", "up-actions"])
        .await;
    // The output symlink comes back as a symlink, never as what it names.
    assert!(ran.result.output_files.is_empty());
    assert_eq!(ran.result.output_symlinks.len(), 1);
}

/// The status and message of a run the agent refused as the action's fault.
fn refused_as_bad_input(ran: &Ran, what: &str) -> String {
    let status = ran.response.status.clone().unwrap_or_default();
    assert_eq!(
        status.code,
        tonic::Code::InvalidArgument as i32,
        "{what}: {status:?}\nstderr: {}",
        ran.stderr
    );
    status.message
}

async fn nothing_is_made_on_the_host_through_input_symlinks(user: As) {
    let mut f = Fleet::start(user, &[]).await;
    let host = f.dir.path().join("host-target");
    std::fs::create_dir(&host).expect("mkdir");
    // Writable by either agent: only the agent's care keeps it empty.
    chown_tree(&host);
    let link = vec![("l".to_owned(), host.display().to_string())];

    let mut output = ActionSpec::shell("true");
    output.symlinks = link.clone();
    output.output_paths = vec!["l/x/y".into()];
    let ran = f.run(&output).await;
    let message = refused_as_bad_input(&ran, "an output under a symlink");
    assert!(message.contains("symlink"), "{message}");

    let mut workdir = ActionSpec::shell("echo x > here");
    workdir.symlinks = link.clone();
    workdir.working_directory = "l/w".into();
    let ran = f.run(&workdir).await;
    refused_as_bad_input(&ran, "a working directory under a symlink");
    workdir.working_directory = "l".into();
    let ran = f.run(&workdir).await;
    refused_as_bad_input(&ran, "a working directory that is a symlink");

    let made: Vec<_> = std::fs::read_dir(&host)
        .expect("list")
        .flatten()
        .map(|e| e.path())
        .collect();
    assert!(made.is_empty(), "made on the host: {made:?}");

    // Pointed at the agent's own cache, where a later action's input goes.
    let data = Bytes::from(format!("a later input {}\n", rand::random::<u64>()));
    let d = Function::Sha256.digest_of(&data);
    let entry = format!("{}-{}-{}", d.function, d.hash_hex(), d.size);
    let cache = f.work_dir().join("cache");
    let mut poison = ActionSpec::shell("true");
    poison.symlinks = vec![("c".into(), cache.display().to_string())];
    poison.output_paths = vec![format!("c/{entry}/x")];
    let ran = f.run(&poison).await;
    refused_as_bad_input(&ran, "an output under a symlink to the cache");
    assert!(!cache.join(&entry).exists(), "made in the agent's cache");
    let mut later = ActionSpec::shell("cat in.txt");
    later.inputs = vec![("in.txt".into(), data.clone())];
    let ran = f.run(&later).await;
    assert_eq!(ran.result.exit_code, 0, "{}", ran.stderr);
    assert_eq!(ran.stdout.as_bytes(), &data[..]);
}

async fn descriptors_the_agent_inherited_do_not_reach_actions(user: As) {
    let mut f = Fleet::start_after(user, &[], "exec 7</ 8</etc/os-release;").await;
    let spec = script(
        "t dir-fd 'test -e /proc/self/fd/7'
t file-fd 'cat <&8'
t host-root 'cd /proc/self/fd/7 && ls run'
t any-fd 'ls /proc/self/fd | grep -qvx \"[0-3]\"'
ls /proc/self/fd | tr '\\n' ' '",
    );
    let ran = f
        .refuses(spec, &["dir-fd", "file-fd", "host-root", "any-fd"])
        .await;
    assert_eq!(ran.result.exit_code, 0, "{}", ran.stderr);
}

async fn set_uid_files_reach_no_other_host_user(user: As) {
    let mut f = Fleet::start(user, &[]).await;
    let mut spec = script(
        "cp /bin/sh suid-sh && chmod 4755 suid-sh
cp /bin/sh /tmp/suid-tmp && chmod 4755 /tmp/suid-tmp
chmod 4755 /proc/self/fd/1
t execroot-suid 'grep \" /execroot \" /proc/self/mountinfo | grep -qv nosuid'
t tmp-suid 'grep \" /tmp \" /proc/self/mountinfo | grep -qv nosuid'
touch ready; sleep 3",
    );
    spec.output_paths = vec!["suid-sh".into()];
    let action = f.client.upload_action(&spec).await;
    let (stream, _) = f.client.start_execute(&action).await;
    let work_dir = f.work_dir();
    let deadline = Instant::now() + Duration::from_secs(20);
    let ready = loop {
        if let Some(p) = find_named(&work_dir.join("actions"), "ready").pop() {
            break p;
        }
        assert!(Instant::now() < deadline, "the action never got ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let root = ready.parent().expect("the action's root");
    let suid = root.join("suid-sh");
    let meta = std::fs::metadata(&suid).expect("the action's set-uid file");
    assert_ne!(meta.permissions().mode() & 0o4000, 0, "made set-uid");
    for (what, path) in [
        ("the set-uid output", suid.clone()),
        ("the action's stdout", root.with_file_name("stdout")),
        ("the work dir", work_dir.join("agent-id")),
    ] {
        assert!(
            !as_other_user(&format!("stat '{}'", path.display())),
            "another host user reaches {what} at {}",
            path.display()
        );
    }
    assert!(
        find_named(&work_dir, "suid-tmp").is_empty(),
        "the action's /tmp is on the host"
    );
    let (_, response) = common::follow(stream).await.expect("the action's response");
    let result = response.result.clone().unwrap_or_default();
    let stdout = f.output(result.stdout_digest.as_ref()).await;
    assert!(
        stdout.contains("execroot-suid: refused") && stdout.contains("tmp-suid: refused"),
        "{stdout}"
    );
    assert!(!stdout.contains("ESCAPED"), "{stdout}");
    assert_eq!(result.output_files.len(), 1, "{response:?}");
    let mode = result.output_files[0]
        .node_properties
        .as_ref()
        .and_then(|p| p.unix_mode)
        .unwrap_or(0);
    assert_eq!(mode & 0o6000, 0, "a set-uid bit in the result");
}

/// A Python helper for system calls a shell cannot make.
const SYSCALLS_PY: &str = r#"import ctypes, os, socket, sys
NR = {
    "x86_64": {"add_key": 248, "keyctl": 250, "io_uring_setup": 425},
    "aarch64": {"add_key": 217, "keyctl": 219, "io_uring_setup": 425},
}[os.uname().machine]
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
params = ctypes.create_string_buffer(256)
call = sys.argv[1]
if call == "vsock":
    socket.socket(40, socket.SOCK_STREAM)
    sys.exit(0)
args = {
    "add_key": (b"user", b"outpost", b"v", 1, ctypes.c_long(-3)),
    "keyctl": (0, ctypes.c_long(-4), 0),
    "io_uring_setup": (1, params),
}[call]
sys.exit(0 if libc.syscall(NR[call], *args) >= 0 else 1)
"#;

async fn host_kernel_state_is_out_of_reach(user: As) {
    let mut f = Fleet::start(user, &[]).await;
    let mut spec = script(
        "t proc-keys 'grep -q . /proc/keys'
t add-key 'python3 sys.py add_key'
t user-keyring 'python3 sys.py keyctl'
t io-uring 'python3 sys.py io_uring_setup'
t nested-userns 'unshare --user true'
t vsock 'python3 sys.py vsock'
t core 'test \"$(ulimit -c)\" != 0'
t core-hard 'ulimit -c unlimited'
t prlimit-init 'prlimit --pid 1 --nofile=16:16'
t cmdline 'grep -q . /proc/cmdline'
t locks 'grep -q . /proc/locks'
t timer-list 'grep -q . /proc/timer_list'
t vmallocinfo 'grep -q . /proc/vmallocinfo'
t slabinfo 'grep -q . /proc/slabinfo'
t kpageflags 'test -n \"$(head -c 8 /proc/kpageflags)\"'
t boot-id 'grep -q . /proc/sys/kernel/random/boot_id'
t cgroup-path 'grep -q outpost /proc/self/cgroup'
python3 sys.py nothing-at-all 2>/dev/null; ulimit -n 64 && echo own-limits: ok",
    );
    spec.inputs = vec![("sys.py".into(), Bytes::from_static(SYSCALLS_PY.as_bytes()))];
    let ran = f
        .refuses(
            spec,
            &[
                "proc-keys",
                "add-key",
                "user-keyring",
                "io-uring",
                "nested-userns",
                "vsock",
                "core",
                "core-hard",
                "prlimit-init",
                "cmdline",
                "locks",
                "timer-list",
                "vmallocinfo",
                "slabinfo",
                "kpageflags",
                "boot-id",
                "cgroup-path",
            ],
        )
        .await;
    assert!(ran.stdout.contains("own-limits: ok"), "{}", ran.stdout);
}

async fn a_full_tmp_fails_only_its_action(user: As) {
    let mut f = Fleet::start(user, &["--action-tmp-size", "8MiB", "--slots", "2"]).await;
    let ran = f
        .run(&ActionSpec::shell(
            "head -c 4000000 /dev/zero > /tmp/fits && echo fits
head -c 4000000 /dev/zero > /dev/shm/fits && echo shm-fits
head -c 20000000 /dev/zero > /tmp/big",
        ))
        .await;
    assert_eq!(ran.response.status.as_ref().map_or(0, |s| s.code), 0);
    assert_ne!(ran.result.exit_code, 0, "wrote past /tmp's size");
    assert!(ran.stdout.contains("fits\nshm-fits\n"), "{}", ran.stdout);
    assert!(
        ran.stderr.contains("No space left on device"),
        "{}",
        ran.stderr
    );
    let work_dir = f.work_dir();
    let big = find_named(&work_dir, "big");
    assert!(big.is_empty(), "/tmp is on the agent's disk: {big:?}");
    let after = f
        .run(&ActionSpec::shell("echo x > /tmp/small && cat /tmp/small"))
        .await;
    assert_eq!(after.stdout, "x\n", "{}", after.stderr);
}

macro_rules! both {
    ($($name:ident),* $(,)?) => {
        mod as_root {
            $(
                #[tokio::test]
                async fn $name() {
                    super::$name(super::As::Root).await
                }
            )*
        }
        mod unprivileged {
            $(
                #[tokio::test]
                async fn $name() {
                    super::$name(super::As::Unprivileged).await
                }
            )*
        }
    };
}

both!(
    writes_outside_outputs_are_refused,
    the_agents_secrets_are_out_of_sight,
    other_actions_inputs_are_invisible,
    loopback_services_on_the_host_are_unreachable,
    network_is_given_only_on_request_where_allowed,
    agent_processes_cannot_be_signalled_or_traced,
    a_fork_bomb_is_contained,
    a_memory_hog_is_killed_and_reported_as_oom,
    daemons_die_with_their_action,
    symlinks_in_the_input_tree_stay_inside,
    nothing_is_made_on_the_host_through_input_symlinks,
    descriptors_the_agent_inherited_do_not_reach_actions,
    set_uid_files_reach_no_other_host_user,
    host_kernel_state_is_out_of_reach,
    a_full_tmp_fails_only_its_action,
);

/// An unprivileged agent with no cgroup of its own falls back to rlimits,
/// which do not bound an action's memory: it says so at start-up, and
/// `outpost fleet` says so too.
#[tokio::test]
async fn an_agent_without_cgroups_says_memory_is_not_enforced() {
    let dir = tempdir();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let server = Coordinator::start(&dir.path().join("data"), &[]);
    let work_dir = dir.path().join("agent");
    std::fs::create_dir(&work_dir).expect("work dir");
    chown_tree(&work_dir);
    let mut cmd = Command::new("setpriv");
    cmd.args([
        &format!("--reuid={NOBODY}"),
        &format!("--regid={NOBODY}"),
        "--clear-groups",
        OUTPOST,
    ]);
    let agent = Agent::start_with(cmd, &server.endpoint(), &work_dir, &[]);
    agent
        .wait_for("registered with the coordinator", Duration::from_secs(30))
        .await;
    assert_eq!(agent.count("memory is not enforced: no cgroup"), 1);
    assert!(agent.count("limits=rlimits only (memory not enforced)") >= 1);
    let fleet = Command::new(OUTPOST)
        .args(["fleet", "--coordinator", &server.endpoint()])
        .output()
        .expect("outpost fleet");
    let fleet = String::from_utf8_lossy(&fleet.stdout);
    assert!(
        fleet.contains(&format!(
            "note: {} does not enforce action memory limits",
            agent.id()
        )),
        "{fleet}"
    );
}

/// What a shell would give a command, the sandbox gives too: the default
/// SIGPIPE (so `yes | head` ends quietly), exactly the action's environment,
/// and its program looked up on the action's own PATH.
#[tokio::test]
async fn actions_run_as_they_would_in_a_shell() {
    let mut f = Fleet::start(As::Root, &[]).await;
    let mut spec = ActionSpec::shell(
        "yes | head -n 1; mkdir -p bin; printf '#!/bin/sh\necho found on PATH\n' > bin/tool; \
         chmod +x bin/tool; PATH=\"$PWD/bin:$PATH\" tool; env | sort | grep -v '^PWD=\\|^SHLVL=\\|^_='",
    );
    spec.env = vec![
        ("PATH".into(), "/usr/bin:/bin".into()),
        ("ONLY".into(), "this".into()),
    ];
    let ran = f.run(&spec).await;
    assert_eq!(ran.result.exit_code, 0, "stderr: {}", ran.stderr);
    assert_eq!(ran.stderr, "", "yes must end by SIGPIPE, silently");
    assert_eq!(
        ran.stdout,
        "y\nfound on PATH\nONLY=this\nPATH=/usr/bin:/bin\n"
    );
}

/// Without user namespaces the agent refuses to start rather than run
/// actions unisolated, and says what to do; `--isolation none` is the
/// explicit way out.
#[tokio::test]
async fn an_agent_that_cannot_sandbox_refuses_to_start() {
    let dir = tempdir();
    let server = Coordinator::start(&dir.path().join("data"), &[]);
    let endpoint = server.endpoint();
    let work_dir = dir.path().join("agent-linux-sandbox");
    let run = move |isolation: &str| {
        Command::new("unshare")
            .args(["--user", "--map-root-user", "sh", "-c"])
            .arg("echo 0 > /proc/sys/user/max_user_namespaces && exec \"$0\" \"$@\"")
            .arg(OUTPOST)
            .args(["agent", "--coordinator", &endpoint, "--work-dir"])
            .arg(&work_dir)
            .args(["--isolation", isolation])
            .output()
    };
    let out = tokio::task::spawn_blocking(move || run("linux-sandbox"))
        .await
        .expect("join")
        .expect("run");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("isolation linux-sandbox does not work on this host")
            && stderr.contains("--isolation none"),
        "{stderr}"
    );
    let mut cmd = Command::new("unshare");
    cmd.args(["--user", "--map-root-user", "sh", "-c"])
        .arg("echo 0 > /proc/sys/user/max_user_namespaces && exec \"$0\" \"$@\"")
        .arg(OUTPOST);
    let agent = Agent::start_with(
        cmd,
        &server.endpoint(),
        &dir.path().join("agent-none"),
        &["--isolation", "none"],
    );
    agent
        .wait_for("registered with the coordinator", Duration::from_secs(30))
        .await;
}
