//! Images from a registry on loopback: shared pulls, credentials, pulls at
//! start, and the removal of images past the agent's bound.

use super::*;

/// A registry on loopback (Debian's `docker-registry`), killed when dropped.
struct Registry {
    child: std::process::Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Registry {
    /// `None` (after saying why) where `docker-registry` is not installed
    /// and the run does not require it.
    fn start() -> Option<Registry> {
        Registry::start_with(None)
    }

    /// A registry that wants `user` and `password` (htpasswd, bcrypt).
    fn with_login(user: &str, password: &str) -> Option<Registry> {
        Registry::start_with(Some((user, password)))
    }

    fn start_with(login: Option<(&str, &str)>) -> Option<Registry> {
        if Command::new("docker-registry")
            .arg("--version")
            .output()
            .is_err()
        {
            let why = "docker-registry is not installed (apt-get install docker-registry; \
                       scripts/test.sh does this)";
            assert!(
                std::env::var_os("OUTPOST_REQUIRE_DOCKER").is_none(),
                "{why}"
            );
            eprintln!("SKIPPED: {why}");
            return None;
        }
        let dir = tempdir();
        let port = common::free_port();
        let config = dir.path().join("config.yml");
        let mut text = format!(
            "version: 0.1\nstorage:\n  filesystem:\n    rootdirectory: {}\n\
             http:\n  addr: 127.0.0.1:{port}\n",
            dir.path().join("data").display()
        );
        if let Some((user, password)) = login {
            // The registry reads bcrypt entries only.
            let hash = Command::new("python3")
                .args([
                    "-c",
                    "import crypt, sys; print(crypt.crypt(sys.argv[1], crypt.mksalt(crypt.METHOD_BLOWFISH)))",
                    password,
                ])
                .output()
                .expect("python3 makes a bcrypt hash");
            assert!(hash.status.success(), "{hash:?}");
            let htpasswd = dir.path().join("htpasswd");
            std::fs::write(
                &htpasswd,
                format!("{user}:{}", String::from_utf8_lossy(&hash.stdout).trim()),
            )
            .expect("htpasswd");
            text.push_str(&format!(
                "auth:\n  htpasswd:\n    realm: outpost-test\n    path: {}\n",
                htpasswd.display()
            ));
        }
        std::fs::write(&config, text).expect("registry config");
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&config)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start docker-registry");
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "the registry did not start listening"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Some(Registry {
            child,
            port,
            _dir: dir,
        })
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn docker(args: &[&str]) {
    let output = Command::new("docker").args(args).output().expect("docker");
    assert!(
        output.status.success(),
        "docker {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// The test image pushed to `registry` as `name:1`; only the registry has
/// it under that name afterwards (the layers stay, as the test image's).
fn push_test_image(registry: &Registry, name: &str) -> String {
    let image = format!("127.0.0.1:{}/{name}:1", registry.port);
    docker(&["tag", IMAGE, &image]);
    docker(&["push", &image]);
    docker(&["rmi", &image]);
    image
}

/// Images are pulled on demand from a real registry (on loopback): actions
/// that ask for one missing image at once share one pull, and a tag the
/// registry does not have fails the action at once, naming it.
#[tokio::test(flavor = "multi_thread")]
async fn an_image_is_pulled_once_for_actions_that_want_it_at_once() {
    if !docker_ready() {
        return;
    }
    let Some(registry) = Registry::start() else {
        return;
    };
    let image = push_test_image(&registry, "outpost-pull-test");
    let metrics = format!("127.0.0.1:{}", common::free_port());
    let Some(f) = Fleet::ready(As::Root, &["--slots", "3", "--metrics-listen", &metrics]).await
    else {
        return;
    };
    let runs = (0..3).map(|i| {
        let mut client = f.client.clone();
        let spec = in_named(&format!("docker://{image}"), &format!("echo action {i}"));
        async move { client.run(&spec).await }
    });
    for (i, ran) in futures_join_all(runs).await.into_iter().enumerate() {
        ok(&ran);
        assert_eq!(ran.stdout, format!("action {i}\n"));
    }
    assert_eq!(
        agent_metric(
            &metrics,
            "outpost_agent_docker_pulls_total{outcome=\"miss\"}"
        ),
        1.0,
        "one pull for three actions"
    );
    assert_eq!(
        agent_metric(&metrics, "outpost_agent_docker_containers_total"),
        3.0
    );
    let missing = format!("127.0.0.1:{}/outpost-pull-test:no-such-tag", registry.port);
    let mut client = f.client.clone();
    let started = Instant::now();
    let ran = client
        .run(&in_named(&format!("docker://{missing}"), "true"))
        .await;
    refused(&ran, &[&missing]);
    assert!(started.elapsed() < Duration::from_secs(10));
    docker(&["rmi", &image]);
}

/// Runs futures at once and collects their outputs in order.
async fn futures_join_all<F: std::future::Future + Send + 'static>(
    futures: impl Iterator<Item = F>,
) -> Vec<F::Output>
where
    F::Output: Send + 'static,
{
    let handles: Vec<_> = futures.map(tokio::spawn).collect();
    let mut out = Vec::new();
    for h in handles {
        out.push(h.await.expect("join"));
    }
    out
}

/// Actions may run as another user (`dockerUser`) or as root
/// (`dockerRunAsRoot`, where the agent allows it); what they write is
/// collected and removed by the unprivileged agent all the same.
#[tokio::test(flavor = "multi_thread")]
async fn actions_of_another_user_or_root_leave_nothing_the_agent_cannot_remove() {
    let Some(mut f) = Fleet::ready(As::Unprivileged, &["--docker-allow-root", "true"]).await else {
        return;
    };
    let script = "id -u; mkdir -p out/tree/deep && echo made > out/tree/deep/f && \
                  chmod 700 out/tree/deep out/tree && echo file > out/file && chmod 600 out/file";
    for (name, value, uid) in [
        ("dockerUser", "1000:1000", "1000"),
        ("dockerRunAsRoot", "true", "0"),
    ] {
        let mut spec = in_image(script).with_platform(name, value);
        spec.output_paths = vec!["out/tree".into(), "out/file".into()];
        let ran = f.run(&spec).await;
        ok(&ran);
        assert_eq!(ran.stdout.trim(), uid, "{name}={value}");
        let paths: Vec<&str> = ran
            .result
            .output_files
            .iter()
            .map(|o| o.path.as_str())
            .chain(
                ran.result
                    .output_directories
                    .iter()
                    .map(|o| o.path.as_str()),
            )
            .collect();
        assert!(
            paths.contains(&"out/file") && paths.contains(&"out/tree"),
            "{name}={value}: {paths:?}"
        );
    }
    f.no_action_directories_left().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn root_in_a_container_needs_the_agents_permission() {
    let Some(mut f) = Fleet::ready(As::Root, &[]).await else {
        return;
    };
    for (name, value) in [("dockerRunAsRoot", "true"), ("dockerUser", "0:0")] {
        let ran = f.run(&in_image("true").with_platform(name, value)).await;
        refused(&ran, &["docker_allow_root"]);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_command_the_image_lacks_is_the_actions_fault() {
    let Some(mut f) = Fleet::ready(As::Root, &[]).await else {
        return;
    };
    let spec = ActionSpec {
        args: vec!["outpost-no-such-tool".into(), "--version".into()],
        ..ActionSpec::default()
    }
    .with_platform("container-image", &format!("docker://{IMAGE}"));
    let ran = f.run(&spec).await;
    refused(&ran, &["outpost-no-such-tool"]);
    let id = f.agent().id();
    eventually("removing the container", Duration::from_secs(10), || {
        containers_of(&id).is_empty()
    })
    .await;
}

/// Pulls from a registry that wants a login send the credentials
/// `docker_registry_auth` holds for it (a file as `docker login` writes
/// it); without them the action fails at once as its own fault, naming the
/// image and "unauthorized".
#[tokio::test(flavor = "multi_thread")]
async fn a_registry_that_wants_a_login_gets_the_configured_credentials() {
    if !docker_ready() {
        return;
    }
    let Some(registry) = Registry::with_login("outpost", "s3cret-pull") else {
        return;
    };
    let logins = tempdir();
    let client_config = logins.path().to_str().expect("utf-8").to_owned();
    let host = format!("127.0.0.1:{}", registry.port);
    let login = Command::new("docker")
        .args(["--config", &client_config, "login", "--username", "outpost"])
        .args(["--password-stdin", &host])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut child| {
            use std::io::Write;
            child
                .stdin
                .take()
                .expect("stdin")
                .write_all(b"s3cret-pull\n")?;
            child.wait_with_output()
        })
        .expect("docker login");
    assert!(login.status.success(), "{login:?}");
    let image = format!("{host}/outpost-auth-test:1");
    docker(&["tag", IMAGE, &image]);
    docker(&["--config", &client_config, "push", &image]);
    docker(&["rmi", &image]);

    let without = Fleet::ready(As::Root, &[]).await;
    let Some(mut without) = without else {
        return;
    };
    let started = Instant::now();
    let ran = without
        .run(&in_named(&format!("docker://{image}"), "true"))
        .await;
    refused(&ran, &[&image, "unauthorized"]);
    assert!(started.elapsed() < Duration::from_secs(10));
    drop(without);

    let auth_file = logins.path().join("config.json");
    let Some(mut with) = Fleet::ready(
        As::Root,
        &["--docker-registry-auth", auth_file.to_str().expect("utf-8")],
    )
    .await
    else {
        return;
    };
    let ran = with
        .run(&in_named(
            &format!("docker://{image}"),
            "echo pulled with a login",
        ))
        .await;
    ok(&ran);
    assert_eq!(ran.stdout, "pulled with a login\n");
    docker(&["rmi", &image]);
}

/// `docker_images_at_start` are pulled in the background when the agent
/// starts: it registers without waiting for them (one comes from a
/// "registry" that never answers), and a pull that fails is logged with
/// the image and the registry's reason.
#[tokio::test(flavor = "multi_thread")]
async fn images_at_start_are_pulled_in_the_background() {
    if !docker_ready() {
        return;
    }
    let Some(registry) = Registry::start() else {
        return;
    };
    let image = push_test_image(&registry, "outpost-at-start");
    let missing = format!("127.0.0.1:{}/outpost-at-start:no-such-tag", registry.port);
    // Accepts connections and never answers.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").expect("listen");
    let hanging = format!(
        "127.0.0.1:{}/outpost-at-start:1",
        silent.local_addr().expect("addr").port()
    );
    let started = Instant::now();
    let list = format!("{hanging},docker://{image},{missing}");
    let Some(mut f) = Fleet::ready(As::Root, &["--docker-image-at-start", &list]).await else {
        return;
    };
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "registered without waiting for the pulls: {:?}",
        started.elapsed()
    );
    f.agent()
        .wait_for(
            &format!("image {image} from docker_images_at_start is ready"),
            Duration::from_secs(60),
        )
        .await;
    assert!(
        Command::new("docker")
            .args(["image", "inspect", &image])
            .output()
            .expect("docker")
            .status
            .success()
    );
    let failed = format!("image {missing} from docker_images_at_start could not be pulled");
    f.agent().wait_for(&failed, Duration::from_secs(30)).await;
    assert_eq!(
        f.agent()
            .count(&format!("{failed}: cannot pull image {missing}")),
        1
    );
    // An action wanting it finds it there.
    let ran = f
        .run(&in_named(&format!("docker://{image}"), "echo already here"))
        .await;
    ok(&ran);
    docker(&["rmi", &image]);
    drop(silent);
}

/// The size the engine gives `image`.
fn image_size(image: &str) -> u64 {
    let out = Command::new("docker")
        .args(["image", "inspect", "--format", "{{.Size}}", image])
        .output()
        .expect("docker image inspect");
    assert!(out.status.success(), "{out:?}");
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .expect("a size")
}

fn image_exists(image: &str) -> bool {
    Command::new("docker")
        .args(["image", "inspect", image])
        .output()
        .expect("docker")
        .status
        .success()
}

/// An image of the test image and one small file of its own, pushed to
/// `registry` as `name` and removed from the engine.
fn push_variant(registry: &Registry, name: &str) -> String {
    let dir = tempdir();
    std::fs::write(dir.path().join("own"), name.repeat(10_000)).expect("file");
    std::fs::write(
        dir.path().join("Dockerfile"),
        format!("FROM {IMAGE}\nCOPY own /own\n"),
    )
    .expect("Dockerfile");
    let image = format!("127.0.0.1:{}/{name}:1", registry.port);
    docker(&[
        "build",
        "-q",
        "-t",
        &image,
        dir.path().to_str().expect("utf-8"),
    ]);
    docker(&["push", &image]);
    docker(&["rmi", &image]);
    image
}

/// Past `docker_image_cache_size`, the images this agent pulled that no
/// action uses are removed, least recently used first; an image in use
/// stays, and images it did not pull (the test image) are never removed.
#[tokio::test(flavor = "multi_thread")]
async fn images_this_agent_pulled_are_removed_past_the_bound() {
    if !docker_ready() {
        return;
    }
    let Some(registry) = Registry::start() else {
        return;
    };
    let first = push_variant(&registry, "outpost-gc-first");
    let second = push_variant(&registry, "outpost-gc-second");
    // Room for one of them, not for both.
    let bound = image_size(IMAGE) * 3 / 2;
    let metrics = format!("127.0.0.1:{}", common::free_port());
    let Some(f) = Fleet::ready(
        As::Root,
        &[
            "--slots",
            "2",
            "--metrics-listen",
            &metrics,
            "--docker-image-cache-size",
            &bound.to_string(),
            "--docker-image-at-start",
            &first,
        ],
    )
    .await
    else {
        return;
    };
    f.agent()
        .wait_for(
            &format!("image {first} from docker_images_at_start is ready"),
            Duration::from_secs(60),
        )
        .await;
    assert!(image_size(&first) <= bound && image_size(&first) * 2 > bound);
    // The first, least recently used, is in use while the second is
    // pulled and used: the second, once its action is done, is what goes.
    let id = f.agent().id();
    let mut client = f.client.clone();
    let long = in_named(&format!("docker://{first}"), "sleep 12; echo first");
    let running = tokio::spawn(async move { client.run(&long).await });
    eventually(
        "the first image's action starting",
        Duration::from_secs(30),
        || !containers_of(&id).is_empty(),
    )
    .await;
    let mut client = f.client.clone();
    let ran = client
        .run(&in_named(&format!("docker://{second}"), "echo second"))
        .await;
    ok(&ran);
    let ran = running.await.expect("join");
    ok(&ran);
    assert_eq!(ran.stdout, "first\n");
    eventually("removing the second image", Duration::from_secs(20), || {
        !image_exists(&second)
    })
    .await;
    assert!(image_exists(&first), "the image in use stays");
    assert!(image_exists(IMAGE), "an image the agent did not pull stays");
    assert_eq!(
        agent_metric(&metrics, "outpost_agent_docker_images_removed_total"),
        1.0
    );
    docker(&["rmi", &first]);
}
