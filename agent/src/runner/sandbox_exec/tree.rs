//! Killing everything an action started, where the kernel offers no
//! subreaper (macOS): processes are followed through the process table.
//!
//! The action starts as the leader of its own process group. While it runs,
//! a [`Family`] is refreshed from `ps` every [`POLL`]: every process whose
//! parent is in the family, or that is in the action's group, joins it, so
//! a daemon that double-forks or calls `setsid` is remembered by pid after
//! its parent exits and it is re-parented to launchd. A remembered pid that
//! leaves the table is forgotten (its pid may be reused).
//!
//! To end the action, [`Family::kill_all`] stops every member (SIGSTOP, so
//! none forks while being hunted), reads the table again until no new
//! member appears, kills them all (SIGKILL), and repeats until none is
//! left. The limit: a process that is started, re-parented and left
//! behind between two polls, outside the action's group, escapes; docs
//! say so. All of it is plain code over `ps` output and signals, run on
//! Linux in the tests.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// How often the family is refreshed while the action runs.
pub const POLL: Duration = Duration::from_millis(250);

/// One row of the process table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Row {
    pub pid: i32,
    pub ppid: i32,
    pub pgid: i32,
    /// Exited but not reaped: nothing to kill.
    pub zombie: bool,
}

/// The arguments of the `ps` that [`parse`] reads (BSD and procps alike).
pub const PS_ARGS: &[&str] = &["-A", "-o", "pid=,ppid=,pgid=,stat="];

/// Reads `ps -A -o pid=,ppid=,pgid=,stat=`; lines that are not four such
/// fields are skipped.
pub fn parse(text: &str) -> Vec<Row> {
    text.lines()
        .filter_map(|line| {
            let mut f = line.split_whitespace();
            let pid = f.next()?.parse().ok()?;
            let ppid = f.next()?.parse().ok()?;
            let pgid = f.next()?.parse().ok()?;
            let stat = f.next()?;
            Some(Row {
                pid,
                ppid,
                pgid,
                zombie: stat.starts_with('Z'),
            })
        })
        .collect()
}

/// The process table now, through `ps`.
pub fn table() -> std::io::Result<Vec<Row>> {
    let out = std::process::Command::new("ps")
        .args(PS_ARGS)
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .output()?;
    if !out.status.success() {
        return Err(std::io::Error::other(format!(
            "ps exited with {}",
            out.status
        )));
    }
    Ok(parse(&String::from_utf8_lossy(&out.stdout)))
}

/// The processes of one action.
#[derive(Clone, Debug)]
pub struct Family {
    /// The action's first process, leader of its group.
    leader: i32,
    /// Members seen alive at the last refresh.
    members: BTreeSet<i32>,
}

impl Family {
    pub fn new(leader: i32) -> Family {
        Family {
            leader,
            members: BTreeSet::from([leader]),
        }
    }

    /// The members now alive.
    #[cfg(test)]
    pub fn members(&self) -> &BTreeSet<i32> {
        &self.members
    }

    /// Takes in a fresh table: members that left it are forgotten; every
    /// live process in the action's group, or whose parent is a member, is
    /// one (to a fixed point, so a whole new subtree joins at once).
    pub fn refresh(&mut self, rows: &[Row]) {
        let live: BTreeMap<i32, &Row> = rows
            .iter()
            .filter(|r| !r.zombie)
            .map(|r| (r.pid, r))
            .collect();
        self.members.retain(|pid| live.contains_key(pid));
        loop {
            let before = self.members.len();
            for row in live.values() {
                if row.pgid == self.leader || self.members.contains(&row.ppid) {
                    self.members.insert(row.pid);
                }
            }
            if self.members.len() == before {
                return;
            }
        }
    }

    /// Kills every member until none is alive, reading the table with
    /// `list`; gives up after `rounds` rounds (a table that cannot be read,
    /// or processes that will not die), saying which remain.
    pub fn kill_all(
        &mut self,
        mut list: impl FnMut() -> std::io::Result<Vec<Row>>,
        rounds: usize,
    ) -> Result<(), String> {
        for _ in 0..rounds {
            let rows = list().map_err(|e| format!("cannot read the process table: {e}"))?;
            self.refresh(&rows);
            if self.members.is_empty() {
                return Ok(());
            }
            // Freeze, then look again until the family stops growing.
            loop {
                self.signal(Signal::SIGSTOP);
                let before = self.members.clone();
                let rows = list().map_err(|e| format!("cannot read the process table: {e}"))?;
                self.refresh(&rows);
                if self.members.is_subset(&before) {
                    break;
                }
            }
            self.signal(Signal::SIGKILL);
            // Stopped processes die of SIGKILL; nothing else is needed, but
            // a continue wakes any a race left stopped.
            self.signal(Signal::SIGCONT);
            std::thread::sleep(Duration::from_millis(10));
        }
        let rows = list().map_err(|e| format!("cannot read the process table: {e}"))?;
        self.refresh(&rows);
        if self.members.is_empty() {
            Ok(())
        } else {
            Err(format!(
                "processes of the action survived {rounds} rounds of SIGKILL: {:?}",
                self.members
            ))
        }
    }

    fn signal(&self, signal: Signal) {
        let _ = nix::sys::signal::killpg(Pid::from_raw(self.leader), signal);
        for pid in &self.members {
            let _ = kill(Pid::from_raw(*pid), signal);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ps_output_is_read_in_both_formats() {
        // macOS (BSD ps) right-aligns, procps too; stat differs.
        let bsd = "    1     0     1 Ss  \n  412     1   412 S   \n 9001   412  9001 Z   \n";
        let rows = parse(bsd);
        assert_eq!(rows.len(), 3);
        assert_eq!(
            rows[1],
            Row {
                pid: 412,
                ppid: 1,
                pgid: 412,
                zombie: false
            }
        );
        assert!(rows[2].zombie);
        assert!(parse("  PID  PPID  PGID STAT\ngarbage\n").is_empty());
    }

    fn row(pid: i32, ppid: i32, pgid: i32) -> Row {
        Row {
            pid,
            ppid,
            pgid,
            zombie: false,
        }
    }

    #[test]
    fn the_family_follows_children_groups_and_orphans() {
        let mut f = Family::new(100);
        // A child in the group, a grandchild that left the group (setsid),
        // and a stranger.
        f.refresh(&[
            row(100, 1, 100),
            row(101, 100, 100),
            row(102, 101, 102),
            row(7, 1, 7),
        ]);
        assert_eq!(
            f.members().iter().copied().collect::<Vec<_>>(),
            [100, 101, 102]
        );
        // Its parents exit: 102 is re-parented to launchd, still a member.
        f.refresh(&[row(102, 1, 102), row(7, 1, 7)]);
        assert_eq!(f.members().iter().copied().collect::<Vec<_>>(), [102]);
        // A child of the orphan joins; a zombie does not count.
        let mut zombie = row(104, 102, 102);
        zombie.zombie = true;
        f.refresh(&[row(102, 1, 102), row(103, 102, 103), zombie, row(7, 1, 7)]);
        assert_eq!(f.members().iter().copied().collect::<Vec<_>>(), [102, 103]);
        // Gone from the table: forgotten, so a reused pid is not killed.
        f.refresh(&[row(7, 1, 7)]);
        assert!(f.members().is_empty());
        f.refresh(&[row(102, 1, 102)]);
        assert!(f.members().is_empty());
    }

    /// A real tree on this host: a child, a grandchild that calls setsid
    /// and outlives its parent (re-parented), all killed, none left.
    #[test]
    fn everything_the_action_started_is_killed() {
        use std::os::unix::process::CommandExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let pids = dir.path().join("pids");
        let script = format!(
            "sleep 300 & echo $! >> {p}; \
             (setsid sh -c 'sleep 300 & echo $! >> {p}; echo $$ >> {p}; wait' & sleep 0.5) ; \
             sleep 300",
            p = pids.display()
        );
        let mut child = std::process::Command::new("sh")
            .args(["-c", &script])
            .process_group(0)
            .spawn()
            .expect("sh");
        let leader = i32::try_from(child.id()).expect("pid");
        let mut family = Family::new(leader);
        // Follow it as the backend does until the whole tree is up.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let started = loop {
            family.refresh(&table().expect("ps"));
            let written: Vec<i32> = std::fs::read_to_string(&pids)
                .unwrap_or_default()
                .lines()
                .filter_map(|l| l.trim().parse().ok())
                .collect();
            if written.len() == 3 && written.iter().all(|p| family.members().contains(p)) {
                break written;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the tree did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        // Its parent exits: the setsid one is re-parented outside the
        // family and out of its group, and still a member.
        let orphan = started[2];
        loop {
            let rows = table().expect("ps");
            family.refresh(&rows);
            assert!(family.members().contains(&orphan), "the orphan was lost");
            let parent = rows.iter().find(|r| r.pid == orphan).map(|r| r.ppid);
            if parent.is_some_and(|p| !family.members().contains(&p)) {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "never re-parented");
            std::thread::sleep(Duration::from_millis(20));
        }
        family.kill_all(table, 20).expect("all killed");
        let _ = child.wait();
        let rows = table().expect("ps");
        for pid in started.iter().chain([&leader]) {
            assert!(
                !rows.iter().any(|r| r.pid == *pid && !r.zombie),
                "{pid} survived"
            );
        }
    }
}
