#!/usr/bin/python3
"""Soak test: real Bazel and gRPC's C-core client build against a
coordinator and two agents (separate `outpost` processes) while agents are
killed and started again, the coordinator restarts, client streams break
and an agent is drained and undrained. See docs/reliability.md.

Every action is unique to the run (the seed is in its command) and, as
its first and last steps, appends `TAG WORKDIR TIME start|end` to a record
file outside the agents (they run with --isolation none), so the agents'
runs are counted from what the actions themselves wrote; the lease id is
part of the action's working directory.

Run through scripts/soak.sh. Environment: SOAK_SEED (repeat a run),
OUTPOST_BIN (the binary; scripts/soak.sh builds target/debug/outpost),
SOAK_KEEP=1 (keep the scratch directory and its logs).
"""

import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.dont_write_bytecode = True  # no __pycache__ in the source tree
sys.path.insert(0, os.path.join(REPO, "tests"))
import grpc_core_client as core  # noqa: E402

ABANDON_AFTER = 3  # seconds; the long actions run longer than this
BAZEL_RETRIES = 10
CORE_CLIENTS = 2
ROUND_TARGETS = 10
START = time.monotonic()


def elapsed():
    return time.monotonic() - START


def say(text):
    print("[%6.1fs] %s" % (elapsed(), text), flush=True)


class Failures:
    def __init__(self):
        self.lock = threading.Lock()
        self.items = []

    def add(self, text):
        with self.lock:
            self.items.append(text)
        say("FAILURE: " + text)


FAILURES = Failures()


class Disruptions:
    """Agent losses and coordinator restarts, with wall-clock times to
    compare with the actions' own records."""

    def __init__(self):
        self.lock = threading.Lock()
        self.items = []  # (time, kind, agent or None)

    def add(self, kind, agent=None):
        with self.lock:
            self.items.append((time.time(), kind, agent))

    def between(self, start, end, agent):
        """Whether a run on `agent` that started at `start` may have been
        lost before `end`: its agent was killed in between, or the
        coordinator restarted in between or shortly before it started (a
        lease the old coordinator gave may start after it went away)."""
        with self.lock:
            return any(
                (kind == "coordinator" and start - 5 <= t <= end + 0.5)
                or (who == agent and start - 0.5 <= t <= end + 0.5)
                for t, kind, who in self.items
            )


DISRUPTIONS = Disruptions()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_line(path, needle, count=1, within=60.0):
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            with open(path, errors="replace") as f:
                if f.read().count(needle) >= count:
                    return True
        except FileNotFoundError:
            pass
        time.sleep(0.1)
    return False


def spawn(log_path, start, argv, log_filter):
    """Starts a process whose output goes to the end of `log_path`."""
    with open(log_path, "a") as log:
        log.write("=== start %d\n" % start)
        log.flush()
        return subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL, stdout=log, stderr=log,
            env=dict(os.environ, OUTPOST_LOG=log_filter),
        )


class Coordinator:
    def __init__(self, binary, scratch, port):
        self.binary, self.scratch, self.port = binary, scratch, port
        self.data = os.path.join(scratch, "coordinator-data")
        self.log = os.path.join(scratch, "coordinator.log")
        self.proc = None
        self.starts = 0

    @property
    def endpoint(self):
        return "grpc://127.0.0.1:%d" % self.port

    def start(self):
        self.starts += 1
        self.proc = spawn(
            self.log,
            self.starts,
            [
                self.binary, "coordinator",
                "--listen", "127.0.0.1:%d" % self.port,
                "--data-dir", self.data,
                "--abandon-after", "%ds" % ABANDON_AFTER,
                "--shutdown-grace", "2s",
            ],
            "info",
        )
        if not wait_for_line(self.log, "coordinator listening on", self.starts, 60):
            raise SystemExit("the coordinator did not start listening (see %s)" % self.log)

    def restart(self, how):
        """Stops it (SIGTERM or SIGKILL) and starts it again on the same port."""
        DISRUPTIONS.add("coordinator")
        began = time.monotonic()
        if how == "SIGTERM":
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                FAILURES.add("the coordinator did not stop within 20 s of SIGTERM")
                self.proc.kill()
                self.proc.wait()
        else:
            self.proc.kill()
            self.proc.wait()
        DISRUPTIONS.add("coordinator")
        stopped = time.monotonic() - began
        self.start()
        DISRUPTIONS.add("coordinator")
        say("coordinator stopped after %.1f s, listening again after %.1f s" % (stopped, time.monotonic() - began))

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class Agent:
    def __init__(self, binary, scratch, name, coordinator):
        self.binary, self.name, self.coordinator = binary, name, coordinator
        self.work_dir = os.path.join(scratch, name)
        self.log = os.path.join(scratch, name + ".log")
        self.proc = None
        self.starts = 0

    def start(self):
        self.starts += 1
        self.proc = spawn(
            self.log,
            self.starts,
            [
                self.binary, "agent",
                "--coordinator", self.coordinator.endpoint,
                "--work-dir", self.work_dir,
                "--slots", "2",
                "--isolation", "none",
            ],
            "info,outpost_agent=debug",
        )

    def wait_registered(self, count):
        if not wait_for_line(self.log, "registered with the coordinator", count, 60):
            FAILURES.add("%s did not register within 60 s (see %s)" % (self.name, self.log))

    def kill_and_restart(self):
        """kill -9, then start again at once with the same work dir (what a
        service manager's restart does)."""
        DISRUPTIONS.add("agent", self.name)
        self.proc.kill()
        self.proc.wait()
        self.start()
        DISRUPTIONS.add("agent", self.name)

    @property
    def id(self):
        with open(os.path.join(self.work_dir, "agent-id")) as f:
            return f.read().strip()

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def action_script(tag, records, seconds):
    """The shell text of an action: records its start and end around a sleep."""
    return (
        'echo "%s $PWD $(date +%%s.%%N) start" >> %s; sleep %s; '
        'echo "%s $PWD $(date +%%s.%%N) end" >> %s'
    ) % (tag, records, seconds, tag, records)


def duration(rng):
    """Sub-second, several seconds, or longer than abandon_after."""
    kind = rng.random()
    if kind < 0.5:
        return "%.1f" % rng.uniform(0.1, 0.8)
    if kind < 0.8:
        return "%.1f" % rng.uniform(1.5, 2.9)
    return "%.1f" % rng.uniform(ABANDON_AFTER + 1, ABANDON_AFTER + 3)


class Work:
    """What the clients asked for and what they got back."""

    def __init__(self):
        self.lock = threading.Lock()
        self.submitted = set()
        self.completed = set()
        self.counters = {
            "bazel_rounds": 0,
            "core_actions": 0,
            "core_wait_execution": 0,
            "core_executed_again": 0,
            "core_unavailable": 0,
        }

    def submit(self, tag):
        with self.lock:
            self.submitted.add(tag)

    def complete(self, tag):
        with self.lock:
            self.completed.add(tag)

    def count(self, name, n=1):
        with self.lock:
            self.counters[name] += n


WORK = Work()


def bazel_rounds(stop, seed, scratch, coordinator, records):
    """Builds a fresh package of genrules per round until told to stop."""
    workspace = os.path.join(scratch, "workspace")
    source = os.path.join(REPO, "tests", "bazel-workspace")
    os.makedirs(workspace)
    for name in ("WORKSPACE", "third_party"):
        src = os.path.join(source, name)
        if os.path.isdir(src):
            shutil.copytree(src, os.path.join(workspace, name), symlinks=True)
        else:
            shutil.copy(src, workspace)
    with open(os.path.join(workspace, "BUILD"), "w"):
        pass
    os.makedirs(os.path.join(workspace, "soak"))
    rng = random.Random(seed * 7 + 1)
    bazel = [
        "bazel",
        "--output_user_root=" + os.path.join(scratch, "bazel-root"),
        "--max_idle_secs=60",  # gone soon even if the soak is interrupted
    ]
    round_ = 0
    while not stop.is_set():
        round_ += 1
        targets = []
        rules = []
        for i in range(ROUND_TARGETS):
            tag = "s%d-bazel-r%d-%d" % (seed, round_, i)
            seconds = duration(rng)
            script = action_script(tag, records, seconds).replace("$", "$$")
            rules.append(
                'genrule(\n    name = "t%d_%d",\n    outs = ["t%d_%d.txt"],\n'
                '    cmd = %r,\n)\n' % (round_, i, round_, i, script + " && echo %s > $@" % tag)
            )
            targets.append((tag, "t%d_%d" % (round_, i)))
            WORK.submit(tag)
        with open(os.path.join(workspace, "soak", "BUILD"), "w") as f:
            f.write("\n".join(rules))
        out = subprocess.run(
            bazel + [
                "build", "//soak:all",
                "--remote_executor=" + coordinator.endpoint,
                "--remote_retries=%d" % BAZEL_RETRIES,
                "--remote_timeout=600",
                "--jobs=8",
                "--color=no", "--curses=no", "--noshow_progress",
            ],
            cwd=workspace, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        WORK.count("bazel_rounds")
        summary = next((l for l in out.stdout.splitlines() if " processes: " in l), "")
        if out.returncode != 0 or "ERROR" in out.stdout:
            FAILURES.add("bazel round %d failed (exit %d):\n%s" % (round_, out.returncode, out.stdout))
        for tag, target in targets:
            path = os.path.join(workspace, "bazel-bin", "soak", target + ".txt")
            try:
                with open(path) as f:
                    if f.read().strip() == tag:
                        WORK.complete(tag)
            except FileNotFoundError:
                pass
        say("bazel round %d: exit %d; %s" % (round_, out.returncode, summary.strip()))
    subprocess.run(bazel + ["shutdown"], cwd=workspace, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def core_client(stop, seed, number, coordinator, records):
    """Runs actions one after another over gRPC's C core until told to stop;
    some break their Execute stream and come back with WaitExecution."""
    rng = random.Random(seed * 7 + 2 + number)
    client = core.Client("127.0.0.1:%d" % coordinator.port)
    n = 0
    while not stop.is_set():
        n += 1
        tag = "s%d-core%d-%d" % (seed, number, n)
        break_first = rng.random() < 0.4
        WORK.submit(tag)
        try:
            action = client.shell_action(action_script(tag, records, duration(rng)))
            op, counters = client.run(action, break_first=break_first, retry_for=60.0)
        except core.Failed as e:
            FAILURES.add("gRPC core client, %s: %s" % (tag, e))
            continue
        WORK.count("core_actions")
        WORK.count("core_wait_execution", counters["waits"])
        WORK.count("core_executed_again", counters["executes"] - 1)
        WORK.count("core_unavailable", counters["unavailable"])
        if op.error or op.exit_code != 0 or op.status[0] != 0:
            FAILURES.add(
                "gRPC core client, %s: exit %s, status %r, error %r" % (tag, op.exit_code, op.status, op.error)
            )
            continue
        WORK.complete(tag)
    client.close()


def read_records(path, agents):
    """Runs per tag: [(start time, agent name, lease id)], in time order."""
    runs = {}
    try:
        lines = open(path).read().splitlines()
    except FileNotFoundError:
        lines = []
    for line in lines:
        parts = line.split()
        if len(parts) != 4 or parts[3] != "start":
            continue
        tag, cwd, when = parts[0], parts[1], float(parts[2])
        agent = next((a.name for a in agents if cwd.startswith(a.work_dir + "/")), "?")
        lease = re.search(r"/actions/([^/]+)", cwd)
        runs.setdefault(tag, []).append((when, agent, lease.group(1) if lease else "?"))
    for starts in runs.values():
        starts.sort()
    return runs


def main():
    seed = int(os.environ.get("SOAK_SEED") or random.SystemRandom().randrange(1, 1 << 31))
    binary = os.environ.get("OUTPOST_BIN") or os.path.join(REPO, "target", "debug", "outpost")
    say("soak seed %d (repeat with SOAK_SEED=%d scripts/soak.sh)" % (seed, seed))
    rng = random.Random(seed)
    scratch = tempfile.mkdtemp(prefix="outpost-soak-")
    # A copy, so a rebuild during the soak cannot change what restarts run.
    shutil.copy(binary, os.path.join(scratch, "outpost"))
    binary = os.path.join(scratch, "outpost")
    records = os.path.join(scratch, "records")
    coordinator = Coordinator(binary, scratch, free_port())
    agents = [Agent(binary, scratch, name, coordinator) for name in ("agent-a", "agent-b")]
    stop = threading.Event()
    threads = []
    try:
        coordinator.start()
        for agent in agents:
            agent.start()
        for agent in agents:
            agent.wait_registered(1)
        say("coordinator on %s, two agents registered" % coordinator.endpoint)
        threads.append(threading.Thread(target=bazel_rounds, args=(stop, seed, scratch, coordinator, records)))
        for number in range(CORE_CLIENTS):
            threads.append(
                threading.Thread(target=core_client, args=(stop, seed, number, coordinator, records))
            )
        for t in threads:
            t.start()

        # Disrupt only once Bazel's actions run (its server takes a while
        # to start), so every disruption meets work in flight.
        if not wait_for_line(records, "-bazel-", 1, 180):
            FAILURES.add("no Bazel action started within 180 s")
        first, second = rng.sample(agents, 2)
        plan = [
            (rng.uniform(15, 20), "kill -9 and restart " + first.name, first.kill_and_restart),
            (rng.uniform(10, 14), "drain " + second.name, lambda: drain(binary, "drain", second, coordinator)),
            (rng.uniform(8, 10), "undrain " + second.name, lambda: drain(binary, "undrain", second, coordinator)),
            (rng.uniform(8, 12), "restart the coordinator (SIGTERM)", lambda: coordinator.restart("SIGTERM")),
            (rng.uniform(12, 16), "kill -9 and restart " + second.name, second.kill_and_restart),
            (rng.uniform(12, 16), "restart the coordinator (kill -9)", lambda: coordinator.restart("SIGKILL")),
            (rng.uniform(15, 20), "stop submitting work", stop.set),
        ]
        for delay, what, act in plan:
            time.sleep(delay)
            say(what)
            act()
        for t in threads:
            t.join()
        say("all clients finished")
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=600)
        for agent in agents:
            agent.stop()
        coordinator.stop()

    # What the clients saw against what the actions recorded.
    runs = read_records(records, agents)
    submitted, completed = WORK.submitted, WORK.completed
    lost = sorted(submitted - completed)
    retried = []
    twice = []
    for tag, starts in runs.items():
        if len(starts) < 2:
            continue
        retried.append(tag)
        for (t0, agent, lease), (t1, _, _) in zip(starts, starts[1:]):
            if not DISRUPTIONS.between(t0, t1, agent):
                twice.append("%s: lease %s on %s at %.1f, again %.1fs later" % (tag, lease, agent, t0, t1 - t0))
    for name, since, until in DRAINED:
        for tag, starts in runs.items():
            for when, agent, lease in starts:
                # A lease given just before the drain may start a little later.
                if agent == name and since + 5 < when < until:
                    FAILURES.add("%s started on %s (lease %s) while it was drained" % (tag, name, lease))
    never_ran = sorted(t for t in completed if t not in runs)
    for tag in never_ran:
        FAILURES.add("%s completed but no run of it was recorded" % tag)
    for log in [coordinator.log] + [a.log for a in agents]:
        with open(log, errors="replace") as f:
            for line in f:
                if "panicked" in line:
                    FAILURES.add("%s: %s" % (os.path.basename(log), line.strip()))
    attempts = 0
    for agent in agents:
        with open(agent.log, errors="replace") as f:
            attempts += sum(
                1 for line in f if "running an action" in line and not re.search(r"attempt=1\b", line)
            )
    runs_total = sum(len(s) for s in runs.values())
    c = WORK.counters
    print()
    print("soak seed:             %d" % seed)
    print("wall time:             %.0f s" % elapsed())
    print("actions submitted:     %d (%d bazel rounds of %d, %d gRPC core)" % (
        len(submitted), c["bazel_rounds"], ROUND_TARGETS, c["core_actions"]))
    print("actions run:           %d (%d runs)" % (len(runs), runs_total))
    print("retried:               %d (run again after an agent loss or coordinator restart)" % len(retried))
    print("lost:                  %d" % len(lost))
    print("run twice:             %d" % len(twice))
    print("leases past attempt 1: %d (agents' logs)" % attempts)
    print("gRPC core client:      %d WaitExecution, %d executed again after NOT_FOUND, %d UNAVAILABLE retried" % (
        c["core_wait_execution"], c["core_executed_again"], c["core_unavailable"]))
    print("disruptions:           %d agent kills, %d coordinator restarts, 1 drain" % (
        sum(1 for a in agents for _ in range(a.starts - 1)), coordinator.starts - 1))
    for tag in lost:
        print("LOST: %s" % tag)
    for line in twice:
        print("RUN TWICE: %s" % line)
    for line in FAILURES.items:
        print("FAILED: %s" % line.splitlines()[0])
    ok = not lost and not twice and not FAILURES.items
    if os.environ.get("SOAK_KEEP") or not ok:
        print("logs and records kept in %s" % scratch)
    else:
        shutil.rmtree(scratch, ignore_errors=True)
    print("soak %s" % ("passed" if ok else "FAILED"))
    return 0 if ok else 1


DRAINED = []  # (agent name, drained at, undrained at)


def drain(binary, verb, agent, coordinator):
    if verb == "undrain":
        DRAINED[-1] = (agent.name, DRAINED[-1][1], time.time())
    admin(binary, verb, agent, coordinator)
    if verb == "drain":
        DRAINED.append((agent.name, time.time(), float("inf")))


def admin(binary, verb, agent, coordinator):
    out = subprocess.run(
        [binary, verb, agent.id, "--coordinator", coordinator.endpoint],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    if out.returncode != 0:
        FAILURES.add("outpost %s %s failed: %s" % (verb, agent.name, out.stdout.strip()))


if __name__ == "__main__":
    sys.exit(main())
