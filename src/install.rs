//! `outpost agent|coordinator install` and `uninstall`: a service for the
//! host's service manager, rendered from the templates in `packaging/` —
//! a systemd unit on Linux, a launchd property list on macOS — with its
//! config file, state directory and service user, then enabled and
//! started. `--print` shows every file and command and changes nothing.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use clap::{Args, ValueEnum};

const AGENT_UNIT: &str = include_str!("../packaging/systemd/outpost-agent.service");
const COORDINATOR_UNIT: &str = include_str!("../packaging/systemd/outpost-coordinator.service");
const AGENT_PLIST: &str = include_str!("../packaging/launchd/dev.outpost.agent.plist");
const COORDINATOR_PLIST: &str = include_str!("../packaging/launchd/dev.outpost.coordinator.plist");

/// The system user services run as under systemd.
const SERVICE_USER: &str = "outpost";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Agent,
    Coordinator,
}

impl Role {
    fn name(self) -> &'static str {
        match self {
            Role::Agent => "agent",
            Role::Coordinator => "coordinator",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Manager {
    Systemd,
    Launchd,
}

/// Where a service goes.
#[derive(Args, Clone, Debug)]
pub struct Target {
    /// Show what would be written and run; change nothing.
    #[arg(long)]
    pub print: bool,
    /// The service manager [default: systemd on Linux, launchd on macOS].
    #[arg(long, value_enum)]
    pub manager: Option<Manager>,
    /// launchd: a LaunchDaemon for the whole machine rather than a
    /// LaunchAgent for the current user.
    #[arg(long)]
    pub system: bool,
}

#[derive(Args, Clone, Debug)]
pub struct Options {
    #[command(flatten)]
    pub target: Target,
    /// The binary the service runs [default: this one].
    #[arg(long)]
    pub binary: Option<PathBuf>,
    /// Replace an existing config file that holds other settings.
    #[arg(long)]
    pub force: bool,
}

impl Target {
    fn manager(&self) -> Manager {
        self.manager.unwrap_or(if cfg!(target_os = "macos") {
            Manager::Launchd
        } else {
            Manager::Systemd
        })
    }
}

/// Where one role's service, config and state live.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Paths {
    pub manager: Manager,
    pub role: Role,
    /// The unit or property list.
    pub service: PathBuf,
    pub config: PathBuf,
    pub state_dir: PathBuf,
    /// launchd only: where stdout and stderr go.
    pub log_dir: PathBuf,
    /// launchd: the job label; systemd: the unit name.
    pub name: String,
    /// The user the service runs as (systemd), or none (launchd: the
    /// installing user, or root for a LaunchDaemon).
    pub user: Option<String>,
    /// launchd: `gui/UID` or `system`.
    pub domain: String,
}

impl Paths {
    pub fn of(role: Role, target: &Target) -> anyhow::Result<Paths> {
        let r = role.name();
        Ok(match target.manager() {
            Manager::Systemd => {
                if target.system {
                    bail!("--system is for launchd; systemd services are always system-wide");
                }
                Paths {
                    manager: Manager::Systemd,
                    role,
                    service: format!("/etc/systemd/system/outpost-{r}.service").into(),
                    config: format!("/etc/outpost/{r}.yaml").into(),
                    state_dir: format!("/var/lib/outpost/{r}").into(),
                    log_dir: PathBuf::new(),
                    name: format!("outpost-{r}.service"),
                    user: Some(SERVICE_USER.to_owned()),
                    domain: String::new(),
                }
            }
            Manager::Launchd if target.system => Paths {
                manager: Manager::Launchd,
                role,
                service: format!("/Library/LaunchDaemons/dev.outpost.{r}.plist").into(),
                config: format!("/usr/local/etc/outpost/{r}.yaml").into(),
                state_dir: format!("/usr/local/var/outpost/{r}").into(),
                log_dir: "/usr/local/var/log/outpost".into(),
                name: format!("dev.outpost.{r}"),
                user: None,
                domain: "system".to_owned(),
            },
            Manager::Launchd => {
                let home = std::env::var_os("HOME")
                    .map(PathBuf::from)
                    .filter(|h| h.is_absolute())
                    .context("HOME is not set to an absolute path")?;
                let support = home.join("Library/Application Support/Outpost");
                Paths {
                    manager: Manager::Launchd,
                    role,
                    service: home.join(format!("Library/LaunchAgents/dev.outpost.{r}.plist")),
                    config: support.join(format!("{r}.yaml")),
                    state_dir: support.join(r),
                    log_dir: home.join("Library/Logs/Outpost"),
                    name: format!("dev.outpost.{r}"),
                    user: None,
                    domain: format!("gui/{}", nix::unistd::geteuid()),
                }
            }
        })
    }
}

/// One thing install or uninstall does.
#[derive(Debug)]
pub enum Step {
    Write {
        path: PathBuf,
        contents: String,
        mode: u32,
    },
    MakeDir {
        path: PathBuf,
        owner: Option<String>,
    },
    Remove(PathBuf),
    Run {
        argv: Vec<String>,
        /// Failing is expected sometimes (stopping what is not running).
        may_fail: bool,
    },
}

/// What install or uninstall does, in order, and what to tell the user.
#[derive(Debug, Default)]
pub struct Plan {
    pub steps: Vec<Step>,
    pub notes: Vec<String>,
}

fn run(argv: &[&str]) -> Step {
    Step::Run {
        argv: argv.iter().map(|s| (*s).to_owned()).collect(),
        may_fail: false,
    }
}

/// A command whose failure is expected and ignored (stopping what may not
/// be running).
fn run_may_fail(argv: &[&str]) -> Step {
    Step::Run {
        argv: argv.iter().map(|s| (*s).to_owned()).collect(),
        may_fail: true,
    }
}

fn display(p: &Path) -> String {
    p.display().to_string()
}

/// Renders the service file for `paths` running `binary`.
pub fn render(paths: &Paths, binary: &Path) -> anyhow::Result<String> {
    let binary = display(binary);
    let config = display(&paths.config);
    let state_dir = display(&paths.state_dir);
    match paths.manager {
        Manager::Systemd => {
            let template = match paths.role {
                Role::Agent => AGENT_UNIT,
                Role::Coordinator => COORDINATOR_UNIT,
            };
            let user = paths.user.clone().unwrap_or_else(|| "root".to_owned());
            let values = [
                ("binary", binary.as_str()),
                ("config", &config),
                ("user", &user),
                ("group", &user),
                ("state_dir", &state_dir),
            ];
            for (name, value) in &values {
                unit_safe(name, value)?;
            }
            Ok(fill(template, &values))
        }
        Manager::Launchd => {
            let template = match paths.role {
                Role::Agent => AGENT_PLIST,
                Role::Coordinator => COORDINATOR_PLIST,
            };
            let log_dir = display(&paths.log_dir);
            let values = [
                ("label", paths.name.as_str()),
                ("binary", &binary),
                ("config", &config),
                ("state_dir", &state_dir),
                ("log_dir", &log_dir),
            ];
            let mut plist = plist::Value::from_reader_xml(template.as_bytes())
                .context("the launchd template does not parse")?;
            fill_plist(&mut plist, &values);
            let mut out = Vec::new();
            plist
                .to_writer_xml(&mut out)
                .context("writing the property list")?;
            let mut text = String::from_utf8(out).context("the property list is not UTF-8")?;
            text.push('\n');
            Ok(text)
        }
    }
}

fn fill(template: &str, values: &[(&str, &str)]) -> String {
    let mut out = template.to_owned();
    for (name, value) in values {
        out = out.replace(&format!("{{{{{name}}}}}"), value);
    }
    out
}

fn fill_plist(value: &mut plist::Value, values: &[(&str, &str)]) {
    match value {
        plist::Value::String(s) => *s = fill(s, values),
        plist::Value::Array(items) => items.iter_mut().for_each(|v| fill_plist(v, values)),
        plist::Value::Dictionary(d) => {
            for (_, v) in d.iter_mut() {
                fill_plist(v, values);
            }
        }
        _ => {}
    }
}

/// Refuses values systemd would split or expand (`ExecStart=` splits at
/// spaces, `%` starts a specifier, `$` a variable).
fn unit_safe(name: &str, value: &str) -> anyhow::Result<()> {
    let bad = |c: char| c.is_whitespace() || c.is_control() || "\"'\\%$;".contains(c);
    if value.is_empty() || value.contains(bad) {
        bail!(
            "the {name} {value:?} cannot go into a systemd unit: it must not be empty or hold \
             spaces, quotes, backslashes, %, $ or ;"
        );
    }
    Ok(())
}

/// The steps that install `paths`'s service with `config_yaml` as its
/// config file. `existing` is the config file's current content, if any.
pub fn install(
    paths: &Paths,
    binary: &Path,
    config_yaml: &str,
    existing: Option<&str>,
    force: bool,
    user_exists: bool,
) -> anyhow::Result<Plan> {
    let mut plan = Plan::default();
    let service = render(paths, binary)?;
    let header = format!(
        "# Written by `outpost {} install`; reload with `{}` after editing.\n",
        paths.role.name(),
        match paths.manager {
            Manager::Systemd => format!("systemctl reload {}", paths.name),
            Manager::Launchd => format!("launchctl kill HUP {}/{}", paths.domain, paths.name),
        }
    );
    let config = format!("{header}{config_yaml}");
    match existing {
        Some(old) if old == config => plan
            .notes
            .push(format!("{} is unchanged", paths.config.display())),
        Some(_) if !force => bail!(
            "{} already exists with other settings; edit it (and reload the service), or run \
             install again with --force to replace it with these",
            paths.config.display()
        ),
        _ => {}
    }
    if paths.manager == Manager::Systemd && !user_exists {
        plan.steps.push(run(&[
            "useradd",
            "--system",
            "--user-group",
            "--home-dir",
            "/var/lib/outpost",
            "--shell",
            "/usr/sbin/nologin",
            SERVICE_USER,
        ]));
    }
    if existing != Some(config.as_str()) {
        plan.steps.push(Step::Write {
            path: paths.config.clone(),
            contents: config,
            mode: 0o644,
        });
    }
    plan.steps.push(Step::MakeDir {
        path: paths.state_dir.clone(),
        owner: paths.user.clone(),
    });
    if paths.manager == Manager::Launchd {
        plan.steps.push(Step::MakeDir {
            path: paths.log_dir.clone(),
            owner: None,
        });
    }
    plan.steps.push(Step::Write {
        path: paths.service.clone(),
        contents: service,
        mode: 0o644,
    });
    let service = display(&paths.service);
    match paths.manager {
        Manager::Systemd => {
            plan.steps.push(run(&["systemctl", "daemon-reload"]));
            plan.steps
                .push(run(&["systemctl", "enable", "--now", &paths.name]));
            plan.notes.push(format!(
                "logs: journalctl -u {}; status: systemctl status {}",
                paths.name, paths.name
            ));
        }
        Manager::Launchd => {
            // A loaded job must be booted out before it can be bootstrapped again.
            plan.steps.push(run_may_fail(&[
                "launchctl",
                "bootout",
                &format!("{}/{}", paths.domain, paths.name),
            ]));
            plan.steps
                .push(run(&["launchctl", "bootstrap", &paths.domain, &service]));
            plan.notes.push(format!(
                "logs: {}/{}.log; status: launchctl print {}/{}",
                paths.log_dir.display(),
                paths.role.name(),
                paths.domain,
                paths.name
            ));
        }
    }
    Ok(plan)
}

/// The steps that stop and remove `paths`'s service; config and state stay.
pub fn uninstall(paths: &Paths) -> Plan {
    let mut plan = Plan::default();
    match paths.manager {
        Manager::Systemd => {
            plan.steps.push(run_may_fail(&[
                "systemctl",
                "disable",
                "--now",
                &paths.name,
            ]));
            plan.steps.push(Step::Remove(paths.service.clone()));
            plan.steps.push(run(&["systemctl", "daemon-reload"]));
        }
        Manager::Launchd => {
            plan.steps.push(run_may_fail(&[
                "launchctl",
                "bootout",
                &format!("{}/{}", paths.domain, paths.name),
            ]));
            plan.steps.push(Step::Remove(paths.service.clone()));
        }
    }
    plan.notes.push(format!(
        "kept {} and {}; remove them to forget this {}",
        paths.config.display(),
        paths.state_dir.display(),
        paths.role.name()
    ));
    plan
}

impl Plan {
    /// Every step as text: files in full, commands as a shell would read them.
    pub fn describe(&self) -> String {
        let mut out = String::new();
        for step in &self.steps {
            match step {
                Step::Write {
                    path,
                    contents,
                    mode,
                } => {
                    let _ = writeln!(out, "==> write {} (mode {mode:o})", path.display());
                    out.push_str(contents);
                    if !contents.ends_with('\n') {
                        out.push('\n');
                    }
                }
                Step::MakeDir { path, owner } => {
                    let owner = owner
                        .as_ref()
                        .map(|o| format!(" -o {o} -g {o}"))
                        .unwrap_or_default();
                    let _ = writeln!(out, "==> run: install -d -m 750{owner} {}", quote(path));
                }
                Step::Remove(path) => {
                    let _ = writeln!(out, "==> run: rm -f {}", quote(path));
                }
                Step::Run { argv, may_fail } => {
                    let line: Vec<String> = argv.iter().map(|a| quote(Path::new(a))).collect();
                    let tail = if *may_fail { " || true" } else { "" };
                    let _ = writeln!(out, "==> run: {}{tail}", line.join(" "));
                }
            }
        }
        for note in &self.notes {
            let _ = writeln!(out, "# {note}");
        }
        out
    }

    /// Does every step in order; stops at the first that fails.
    pub fn apply(&self) -> anyhow::Result<()> {
        for step in &self.steps {
            match step {
                Step::Write {
                    path,
                    contents,
                    mode,
                } => write_file(path, contents, *mode)
                    .with_context(|| format!("writing {}", path.display()))?,
                Step::MakeDir { path, owner } => make_dir(path, owner.as_deref())
                    .with_context(|| format!("making {}", path.display()))?,
                Step::Remove(path) => match std::fs::remove_file(path) {
                    Ok(()) => println!("removed {}", path.display()),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => {
                        return Err(e).with_context(|| format!("removing {}", path.display()));
                    }
                },
                Step::Run { argv, may_fail } => {
                    let status = std::process::Command::new(&argv[0])
                        .args(&argv[1..])
                        .status()
                        .with_context(|| format!("running {}", argv[0]))?;
                    if !status.success() && !may_fail {
                        bail!("`{}` failed ({status})", argv.join(" "));
                    }
                }
            }
        }
        for note in &self.notes {
            println!("{note}");
        }
        Ok(())
    }
}

fn quote(p: &Path) -> String {
    let s = p.display().to_string();
    if s.chars()
        .all(|c| c.is_ascii_alphanumeric() || "/._-=:+@".contains(c))
    {
        s
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

fn write_file(path: &Path, contents: &str, mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension("outpost-new");
    std::fs::write(&tmp, contents)?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))?;
    std::fs::rename(&tmp, path)?;
    println!("wrote {}", path.display());
    Ok(())
}

fn make_dir(path: &Path, owner: Option<&str>) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o750))?;
    if let Some(name) = owner {
        let user =
            nix::unistd::User::from_name(name)?.with_context(|| format!("no user {name}"))?;
        nix::unistd::chown(path, Some(user.uid), Some(user.gid))?;
    }
    Ok(())
}

/// Refuses to apply what cannot work here, before changing anything.
pub fn check_host(paths: &Paths) -> anyhow::Result<()> {
    let root = nix::unistd::geteuid().is_root();
    match paths.manager {
        Manager::Systemd => {
            if !cfg!(os_linux) || !Path::new("/run/systemd/system").is_dir() {
                bail!(
                    "systemd is not running on this host (no /run/systemd/system); \
                     --print shows the unit and the steps to do by other means"
                );
            }
            if !root {
                bail!("installing a systemd service needs root: run it with sudo, or use --print");
            }
        }
        Manager::Launchd => {
            if !cfg!(target_os = "macos") {
                bail!("launchd runs on macOS only; --print shows the property list");
            }
            if paths.domain == "system" && !root {
                bail!("a LaunchDaemon (--system) needs root: run it with sudo, or use --print");
            }
        }
    }
    Ok(())
}

/// Whether the systemd service user exists.
pub fn service_user_exists() -> bool {
    matches!(nix::unistd::User::from_name(SERVICE_USER), Ok(Some(_)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use expect_test::expect_file;

    fn paths(role: Role, manager: Manager) -> Paths {
        let r = role.name();
        Paths {
            manager,
            role,
            service: PathBuf::from(format!("/svc/{r}")),
            config: PathBuf::from(format!("/etc/outpost/{r}.yaml")),
            state_dir: PathBuf::from(format!("/var/lib/outpost/{r}")),
            log_dir: PathBuf::from("/Users/ci/Library/Logs/Outpost"),
            name: format!("dev.outpost.{r}"),
            user: (manager == Manager::Systemd).then(|| "outpost".to_owned()),
            domain: "gui/501".to_owned(),
        }
    }

    #[test]
    fn renderings_are_pinned() {
        let bin = Path::new("/usr/bin/outpost");
        let r = |role, manager| render(&paths(role, manager), bin).expect("render");
        expect_file!["../tests/snapshots/outpost-agent.service"]
            .assert_eq(&r(Role::Agent, Manager::Systemd));
        expect_file!["../tests/snapshots/outpost-coordinator.service"]
            .assert_eq(&r(Role::Coordinator, Manager::Systemd));
        expect_file!["../tests/snapshots/dev.outpost.agent.plist"]
            .assert_eq(&r(Role::Agent, Manager::Launchd));
        expect_file!["../tests/snapshots/dev.outpost.coordinator.plist"]
            .assert_eq(&r(Role::Coordinator, Manager::Launchd));
    }

    #[test]
    fn values_systemd_would_misread_are_refused() {
        let mut p = paths(Role::Agent, Manager::Systemd);
        p.config = PathBuf::from("/etc/my outpost/agent.yaml");
        let e = render(&p, Path::new("/usr/bin/outpost")).expect_err("refused");
        assert!(
            e.to_string().contains("cannot go into a systemd unit"),
            "{e}"
        );
        // launchd takes any path: the plist writer escapes it.
        let mut p = paths(Role::Agent, Manager::Launchd);
        p.config = PathBuf::from("/Users/a b/<&>.yaml");
        let text = render(&p, Path::new("/usr/bin/outpost")).expect("render");
        assert!(text.contains("/Users/a b/&lt;&amp;&gt;.yaml"), "{text}");
    }

    #[test]
    fn a_config_with_other_settings_is_kept_unless_forced() {
        let p = paths(Role::Agent, Manager::Systemd);
        let bin = Path::new("/usr/bin/outpost");
        let e = install(&p, bin, "log: info\n", Some("log: debug\n"), false, true)
            .expect_err("refused");
        assert!(e.to_string().contains("--force"), "{e}");
        let plan = install(&p, bin, "log: info\n", Some("log: debug\n"), true, true).expect("plan");
        assert!(
            plan.describe()
                .contains("==> write /etc/outpost/agent.yaml")
        );
        // No service user yet: it is made first.
        let plan = install(&p, bin, "log: info\n", None, false, false).expect("plan");
        assert!(matches!(&plan.steps[0], Step::Run { argv, .. } if argv[0] == "useradd"));
    }
}
