"""run_all_scales.sh --slurm against a real single-node SLURM cluster that this file starts (munge, slurmctld,
slurmd; everything in a temp folder, stopped by pid and removed afterwards; skipped with the reason where it
cannot start). Tiny digits runs on the CPU: a SLURM sweep gives the local sweep's table, a requeued or warned
task resumes bit-identically, a failed task is named with its log, a 2-process torchrun task under srun matches
one process, a cancelled task stays cancelled, each scale's array asks for its resources. These are marked
`slurm` (CI runs them as a second step: pytest -m slurm); the option checks at the end need no cluster."""
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

import custom_train
from conftest import ROOT
from test_distributed import COMMON, max_diff, mean_diff
from test_scripts import stub_env

SLURM_BINARIES = ["munged", "slurmctld", "slurmd", "sbatch", "srun", "scontrol", "squeue", "scancel", "sinfo"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cannot_start() -> str | None:
    """Why a local cluster cannot start here, or None."""
    if os.geteuid() != 0:
        return "the SLURM tests start munged and slurmd, which need root"
    missing = [b for b in SLURM_BINARIES if not shutil.which(b, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")]
    if missing:
        return f"SLURM is not installed (missing {', '.join(missing)}; apt-get install slurmctld slurmd slurm-client munge)"
    if not Path("/etc/munge/munge.key").exists():
        return "no /etc/munge/munge.key (the munge package creates it)"
    try:
        pwd.getpwnam("munge")
    except KeyError:
        return "no munge user (the munge package creates it)"
    return None


class LocalSlurm:
    """A one-node SLURM cluster in a temp folder: its own munged socket and ports, so it touches nothing of the
    machine's (no systemd, no cgroups: proctrack/linuxproc, task/none). `env` is the clients' environment.
    stop() cancels the jobs, ends each daemon by its pid, ends any process left of this cluster's jobs (found
    by this cluster's SLURM_CONF in its environment, then by pid) and removes the folder."""

    def __init__(self):
        self.dir = Path(tempfile.mkdtemp(prefix="slurm-test-"))
        self.dir.chmod(0o755)  # munged runs as the munge user and must reach its socket folder
        self.procs: dict[str, subprocess.Popen] = {}
        self.conf = self.dir / "slurm.conf"
        sbin = ":/usr/sbin:/sbin"
        self.env = dict(os.environ, SLURM_CONF=str(self.conf), PATH=os.environ.get("PATH", "") + sbin)

    def start(self) -> "LocalSlurm":
        d = self.dir
        munge = d / "munge"
        munge.mkdir(mode=0o755)  # clients (root, job users) need to reach the socket
        shutil.chown(munge, "munge", "munge")
        self.procs["munged"] = subprocess.Popen(
            ["munged", "--foreground", f"--socket={munge}/munge.socket", f"--pid-file={munge}/munged.pid",
             f"--log-file={munge}/munged.log", f"--seed-file={munge}/munged.seed"],
            user="munge", env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for sub in ("state", "spool", "log"):
            (d / sub).mkdir()
        mem_mb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20
        host = "localhost"  # the node's name, which torchrun's rendezvous must resolve: whatever the machine is called
        self.conf.write_text("\n".join([
            "ClusterName=testcluster", "SlurmctldHost=localhost", "SlurmUser=root", "SlurmdUser=root",
            f"SlurmctldPort={free_port()}", f"SlurmdPort={free_port()}",
            # a requeued job waits for its old credential to expire before it runs again (default 120 s)
            "AuthType=auth/munge", f"AuthInfo=socket={munge}/munge.socket,cred_expire=5",
            "CredType=cred/munge",
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "JobAcctGatherType=jobacct_gather/none",
            "SwitchType=switch/none", "MpiDefault=none", "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU",
            # the scheduler looks at pending jobs every second (requeued ones become eligible with no event)
            "SchedulerParameters=sched_interval=1,bf_interval=1", "ReturnToService=2", "MailProg=/bin/true", "KillWait=10",
            f"StateSaveLocation={d}/state", f"SlurmdSpoolDir={d}/spool",
            f"SlurmctldPidFile={d}/slurmctld.pid", f"SlurmdPidFile={d}/slurmd.pid",
            f"SlurmctldLogFile={d}/log/slurmctld.log", f"SlurmdLogFile={d}/log/slurmd.log",
            # two GPUs that are not there (gres.conf names /dev/null and /dev/zero): GPU jobs are accepted and scheduled
            "GresTypes=gpu",
            # at least 2 CPUs, whatever the machine has (config_overrides: slurmd believes this file), for the 2-process task
            "SlurmdParameters=config_overrides",
            f"NodeName={host} NodeAddr=127.0.0.1 CPUs={max(2, os.cpu_count())} RealMemory={max(mem_mb * 3 // 4, 16384)} Gres=gpu:2 "
            "State=UNKNOWN",
            f"PartitionName=test Nodes={host} Default=YES MaxTime=INFINITE State=UP", ""]))
        (d / "gres.conf").write_text(f"NodeName={host} Name=gpu File=/dev/null\nNodeName={host} Name=gpu File=/dev/zero\n")
        self._wait_for(lambda: (munge / "munge.socket").exists(), "munged's socket")
        self.procs["slurmctld"] = subprocess.Popen(["slurmctld", "-D", "-i"], env=self.env,
                                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.procs["slurmd"] = subprocess.Popen(["slurmd", "-D", "-N", host], env=self.env,
                                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self._wait_for(lambda: self.run("sinfo", "-h", "-o", "%T", check=False).stdout.strip() == "idle", "an idle node")
        return self

    def _wait_for(self, ready, what: str, timeout: float = 30) -> None:
        end = time.monotonic() + timeout
        while not ready():
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited with {proc.returncode} while waiting for {what}{self._log_tails()}")
            if time.monotonic() > end:
                raise RuntimeError(f"no {what} after {timeout} s{self._log_tails()}")
            time.sleep(0.2)

    def _log_tails(self) -> str:
        """The daemons' last log lines, for a start that failed (the folder is removed afterwards)."""
        tails = []
        for log in [self.dir / "munge/munged.log", *sorted((self.dir / "log").glob("*.log"))]:
            if log.exists():
                tails.append(f"\n--- {log.name}:\n" + "\n".join(log.read_text(errors="replace").splitlines()[-15:]))
        return "".join(tails)

    def run(self, *cmd, check=True, timeout=60) -> subprocess.CompletedProcess:
        return subprocess.run(cmd, env=self.env, capture_output=True, text=True, check=check, timeout=timeout)

    def jobs(self) -> list[str]:
        return self.run("squeue", "-h", "-o", "%i", check=False).stdout.split()

    def job_processes(self) -> list[int]:
        """Processes started by this cluster (slurmstepd and job processes): they carry its SLURM_CONF."""
        mark = f"SLURM_CONF={self.conf}".encode()
        pids = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and int(entry.name) != os.getpid():
                try:
                    if mark in (entry / "environ").read_bytes().split(b"\0"):
                        pids.append(int(entry.name))
                except OSError:
                    pass
        return pids

    def stop(self) -> None:
        try:
            if "slurmd" in self.procs and self.procs["slurmd"].poll() is None:
                for job in self.jobs():
                    self.run("scancel", "--full", job, check=False)
                end = time.monotonic() + 20
                while self.jobs() and time.monotonic() < end:
                    time.sleep(0.5)
        finally:
            for name in ("slurmd", "slurmctld", "munged"):
                proc = self.procs.get(name)
                if proc is None:
                    continue
                proc.terminate()
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            for pid in self.job_processes():
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self):
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc):
        self.stop()


def alive(pid: int) -> bool:
    """Whether a process exists and is not a zombie (a dead process that its parent has not reaped yet)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


# The tests that need the cluster; the option checks at the end do not.
slurm = pytest.mark.slurm

# Tiny digits runs scored by heldout_loss alone (the cheapest metric): 40 steps leave time to signal a task
# mid-run (SLURM delivers a signal within a second; 38 steps take several here), with a log line (and so a
# chance to stop) every 2 steps.
STEPS = 40
TRAIN = ["--steps", str(STEPS), "--batch-size", "8", "--fid", "off", "--ddim-steps", "2", "--grid-per-class", "1",
         "--heldout-draws", "2", "--label-draws", "0", "--log-every", "2"]
METHODS = ["concat-film", "adanorm"]


@slurm
def test_the_cluster_is_stopped_by_pid_and_leaves_nothing_behind_when_a_test_fails():
    """First in this file, so that it runs before the shared cluster starts. A second cluster with a job
    running; the test body fails; afterwards no daemon and no job process is left, and the folder is gone."""
    reason = cannot_start()
    if reason:
        pytest.skip(reason)
    cluster = LocalSlurm()
    with pytest.raises(RuntimeError, match="the test failed"):
        with cluster:
            daemons = {name: proc.pid for name, proc in cluster.procs.items()}
            job = cluster.run("sbatch", "--parsable", f"--output={cluster.dir}/sleep.out", "--wrap", "sleep 300").stdout.strip()
            deadline = time.monotonic() + 30
            while cluster.run("squeue", "-h", "-j", job, "-o", "%T").stdout.strip() != "RUNNING":
                assert time.monotonic() < deadline, "the job did not start"
                time.sleep(0.2)
            while not any(b"sleep\x00300" in cmdline(p) for p in cluster.job_processes() if alive(p)):
                assert time.monotonic() < deadline, "the job's process did not appear"
                time.sleep(0.2)
            job_pids = cluster.job_processes()  # slurmstepd and the job's shell and sleep
            raise RuntimeError("the test failed")
    assert sorted(daemons) == ["munged", "slurmctld", "slurmd"] and len(job_pids) >= 2
    assert [pid for pid in [*daemons.values(), *job_pids] if alive(pid)] == []
    assert not cluster.dir.exists()


@pytest.fixture(scope="module")
def slurm_cluster():
    reason = cannot_start()
    if reason:
        pytest.skip(reason)
    with LocalSlurm() as c:
        yield c


@pytest.fixture
def cluster(slurm_cluster):
    """The shared cluster, its queue emptied after each test (a failed test's jobs would hold up the next)."""
    yield slurm_cluster
    for job in slurm_cluster.jobs():
        slurm_cluster.run("scancel", "--full", job, check=False)


def sweep(env: dict, out_dir: Path, *args, timeout=600) -> subprocess.CompletedProcess:
    """run_all_scales.sh ARGS into OUT_DIR, one thread per run (bit-identity needs the same count), squeue every second."""
    env = dict(env, OUT_DIR=str(out_dir), PYTHON=sys.executable, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", WAIT_POLL="1")
    return subprocess.run(["bash", str(ROOT / "run_all_scales.sh"), *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


def table(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("|")]


def sweep_dir(out_dir: Path) -> Path:
    (d,) = (out_dir / "slurm").iterdir()
    return d


def wait_until_gone(cluster, timeout=300) -> None:
    deadline = time.monotonic() + timeout
    while cluster.jobs():
        assert time.monotonic() < deadline, f"jobs still queued after {timeout} s: {cluster.jobs()}"
        time.sleep(0.5)


def assert_same_run(a: Path, b: Path) -> None:
    """Bit-identical runs: the final scores, every logged loss, and the weights and EMA of the checkpoint."""
    ra, rb = (json.loads((d / "results.json").read_text()) for d in (a, b))
    for key in ("steps", "heldout_loss", "cpu_threads"):
        assert ra[key] == rb[key], key
    losses = [[r["loss"] for r in map(json.loads, (d / "log.jsonl").read_text().splitlines()) if "loss" in r]
              for d in (a, b)]
    assert losses[0] == losses[1] and len(losses[0]) == STEPS // 2
    ca, cb = (torch.load(d / "checkpoint.pt", weights_only=False) for d in (a, b))
    for part in ("model", "ema"):
        assert ca[part].keys() == cb[part].keys()
        assert all(torch.equal(ca[part][k], cb[part][k]) for k in ca[part]), part


@pytest.fixture(scope="module")
def local_sweep(tmp_path_factory):
    """The reference: the same sweep on this machine, one thread per run (--jobs = cores: 1 thread each)."""
    out = tmp_path_factory.mktemp("local")
    proc = sweep(os.environ, out, "--proxy", "--jobs", str(os.cpu_count()), "--seeds", "2", *METHODS, "--", *TRAIN)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc


@slurm
def test_a_slurm_sweep_gives_the_local_sweeps_table(cluster, local_sweep, tmp_path):
    local, local_proc = local_sweep
    proc = sweep(cluster.env, tmp_path, "--slurm", "--wait", "--proxy", "--seeds", "2", *METHODS, "--", *TRAIN)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "submitted array job" in proc.stdout and "4 run(s) at scale tiny" in proc.stdout
    assert table(proc.stdout) == table(local_proc.stdout) and len(table(proc.stdout)) == 4  # header, rule, 2 methods
    assert (tmp_path / "comparison.md").read_text() == (local / "comparison.md").read_text()
    for method in METHODS:
        for seed in (42, 43):
            assert_same_run(tmp_path / f"digits-tiny-{method}-s{seed}", local / f"digits-tiny-{method}-s{seed}")
    assert table((sweep_dir(tmp_path) / "report.out").read_text()) == table(local_proc.stdout)  # the table job's


@slurm
def test_a_requeued_task_and_a_warned_task_resume_bit_identically(cluster, local_sweep, tmp_path):
    """Task 0 is requeued from outside (`scontrol requeue`: SIGTERM, then SLURM requeues it); task 1 gets the
    time-limit warning (SIGUSR1 to the batch shell) and requeues itself. Both resume from their checkpoint."""
    local, _ = local_sweep
    proc = sweep(cluster.env, tmp_path, "--slurm", "--proxy", *METHODS, "--", *TRAIN)
    assert proc.returncode == 0, proc.stderr[-3000:]
    array = (sweep_dir(tmp_path) / "tiny.job").read_text().strip()
    assert f"submitted array job {array}: 2 run(s)" in proc.stdout
    interrupt = {0: ["scontrol", "requeue", f"{array}_0"], 1: ["scancel", "--signal=USR1", "--batch", f"{array}_1"]}
    deadline = time.monotonic() + 300
    while interrupt:  # each task as soon as it is training (its first log line)
        for index in list(interrupt):
            log = tmp_path / f"digits-tiny-{METHODS[index]}-s42/log.jsonl"
            if log.exists() and '"loss"' in log.read_text():
                cluster.run(*interrupt.pop(index))
        assert time.monotonic() < deadline and cluster.jobs(), "the tasks did not start training"
        time.sleep(0.1)
    wait_until_gone(cluster)
    for method, signal_name in zip(METHODS, ("SIGTERM", "SIGUSR1")):
        log = (tmp_path / f"logs/{method}-tiny-s42.log").read_text()
        assert f"got {signal_name}" in log and "attempt 2" in log, log[-3000:]
        (step,) = [int(line.split("preempted at step ")[1].split(":")[0]) for line in log.splitlines()
                   if "preempted at step" in line]
        assert 0 < step < STEPS and f"resumed {tmp_path / f'digits-tiny-{method}-s42'} at step {step}" in log
        assert ("requeueing" in log) == (signal_name == "SIGUSR1")  # after SIGTERM SLURM requeues it by itself
        assert_same_run(tmp_path / f"digits-tiny-{method}-s42", local / f"digits-tiny-{method}-s42")
    assert "failed runs" not in (sweep_dir(tmp_path) / "report.out").read_text()


BROKEN_METHOD = '''import torch


def prepare_conditioning(time_emb, class_emb):
    return time_emb + class_emb


class ClassConditioner(torch.nn.Module):
    def __init__(self, channels, cond_dim):
        raise RuntimeError("this idea is broken")
'''


@slurm
def test_a_failed_task_is_named_with_its_log_and_the_others_finish(cluster, local_sweep, tmp_path):
    """A method that raises, beside a run that finished before (copied from the local sweep): that task does
    nothing, the broken one is named with its log by the waiting command and by the table job."""
    local, _ = local_sweep
    shutil.copytree(local / "digits-tiny-concat-film-s42", tmp_path / "runs/digits-tiny-concat-film-s42")
    finished = (tmp_path / "runs/digits-tiny-concat-film-s42/results.json").stat().st_mtime_ns
    broken = tmp_path / "broken.py"
    broken.write_text(BROKEN_METHOD)
    proc = sweep(cluster.env, tmp_path / "runs", "--slurm", "--wait", "--proxy", "concat-film", str(broken), "--", *TRAIN)
    assert proc.returncode == 1
    log = tmp_path / "runs/logs" / f"{str(broken).replace('/', '_')}-tiny-s42.log"
    failure = [f"failed runs: {broken}/tiny/s42", f"  {broken}/tiny/s42: exit 1; log {log}"]
    assert proc.stderr.splitlines()[-2:] == failure, proc.stderr[-3000:]
    assert "this idea is broken" in log.read_text()
    assert (sweep_dir(tmp_path / "runs") / "report.out").read_text().splitlines()[-2:] == failure
    concat_log = (tmp_path / "runs/logs/concat-film-tiny-s42.log").read_text()
    assert "finished with these options and code; nothing to do" in concat_log and "=== exit 0" in concat_log
    assert (tmp_path / "runs/digits-tiny-concat-film-s42/results.json").stat().st_mtime_ns == finished
    assert table(proc.stdout)[2].startswith("| concat-film | 1 |")


@slurm
def test_a_two_process_torchrun_task_under_srun_matches_one_process(cluster, tmp_path, cifar_dir):
    """As tests/test_distributed.py::test_two_processes_match_one, with the two gloo processes started by srun and
    torchrun (c10d rendezvous on the allocation's first node) in a SLURM task."""
    args = COMMON + ["--data-dir", str(cifar_dir), "--ema-decay", "0.5"]
    custom_train.main(args + ["--out-dir", str(tmp_path / "one")])
    proc = sweep(dict(cluster.env, SCALES="tiny"), tmp_path / "two", "--slurm", "--wait", "--torchrun",
                 "--gpus-per-node", "2", "adanorm", "--", *args)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "--cpus-per-task=2" in proc.stdout and "--gres" not in proc.stdout  # tiny: a CPU run, 2 processes
    one = torch.load(tmp_path / "one/tiny-adanorm-s42/checkpoint.pt", weights_only=False)
    two = torch.load(tmp_path / "two/tiny-adanorm-s42/checkpoint.pt", weights_only=False)
    torch.manual_seed(42)
    initial = custom_train.build_model("tiny", "adanorm").state_dict()
    for part in ("model", "ema"):
        assert max_diff(one[part], two[part]) < 1e-4, part
        assert mean_diff(one[part], two[part]) < 1e-6, part
        assert mean_diff(one[part], initial) > 100 * 1e-6, part  # trained
    losses = [[r["loss"] for r in map(json.loads, (tmp_path / d / "tiny-adanorm-s42/log.jsonl").read_text().splitlines())
               if "loss" in r] for d in ("one", "two")]
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    assert json.loads((tmp_path / "two/tiny-adanorm-s42/results.json").read_text())["world_size"] == 2


STOPPING_PYTHON = """#!/usr/bin/env bash
# Stands in for python: a training run that, like custom_train.py, stops with status 3 on SIGTERM.
if [[ "$1" == custom_train.py ]]; then
  trap 'echo stopping; exit 3' TERM
  echo training
  sleep 120 & wait
  exit 0
fi
exec "$REAL_PYTHON" "$@"
"""


@slurm
def test_a_cancelled_task_is_not_requeued(cluster, tmp_path):
    """scancel sends SIGTERM, and the training stops with status 3 as on a warning; the task must not requeue
    itself then (the user wants it gone). The table job names the run as stopped, not requeued."""
    stub = tmp_path / "python"
    stub.write_text(STOPPING_PYTHON)
    stub.chmod(0o755)
    env = dict(cluster.env, PYTHON=str(stub), REAL_PYTHON=sys.executable, OUT_DIR=str(tmp_path / "runs"))
    proc = subprocess.run(["bash", str(ROOT / "run_all_scales.sh"), "--slurm", "--proxy", "adanorm"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    array = (sweep_dir(tmp_path / "runs") / "tiny.job").read_text().strip()
    log = tmp_path / "runs/logs/adanorm-tiny-s42.log"
    deadline = time.monotonic() + 60
    while not (log.exists() and "training" in log.read_text()):
        assert time.monotonic() < deadline, "the task did not start"
        time.sleep(0.1)
    cluster.run("scancel", f"{array}_0")
    wait_until_gone(cluster, timeout=60)  # a requeued task would train again for 120 s
    text = log.read_text()
    assert "got SIGTERM" in text and "=== exit 3" in text and "requeueing" not in text and "attempt 2" not in text
    assert (sweep_dir(tmp_path / "runs") / "report.out").read_text().splitlines()[-1] == (
        "  adanorm/tiny/s42: exit 3 (stopped on a signal, checkpoint written, not requeued: submit the sweep again "
        f"to resume); log {log}")


@slurm
def test_each_scale_is_an_array_with_its_resources_and_the_users_args_come_last(cluster, tmp_path):
    """Two GPU scales (the cluster's two GPUs are stand-ins, and so is python: tests/test_scripts.py's stub
    records each launch and writes a result): an array per scale with that scale's GPU, CPUs, memory and time,
    --slurm-args after them (so they win), --throttle 1 (one task of each array at a time), and a table job
    after both arrays that writes the usual table."""
    env = dict(stub_env(tmp_path), SLURM_CONF=cluster.env["SLURM_CONF"], PATH=cluster.env["PATH"],
               SCALES="small medium", WAIT_POLL="1")
    proc = subprocess.run(["bash", str(ROOT / "run_all_scales.sh"), "--slurm", "--seeds", "2", "--throttle", "1",
                           "--slurm-args", "-p test --cpus-per-task=1 --mem=1G", "adanorm", "--", "--steps", "9"],
                          env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    submitted = [line for line in proc.stdout.splitlines() if line.startswith("submitted array job")]
    defaults = {"small": "--cpus-per-task=8 --mem=32G --time=12:00:00 --gres=gpu:1",
                "medium": "--cpus-per-task=8 --mem=32G --time=24:00:00 --gres=gpu:1"}
    assert [line.split(": ", 1)[1] for line in submitted] == [
        f"2 run(s) at scale {scale}, --nodes=1 --ntasks-per-node=1 {defaults[scale]}" for scale in ("small", "medium")]
    arrays = [line.split()[3].rstrip(":") for line in submitted]
    for array, time_limit in zip(arrays, ("12:00:00", "1-00:00:00")):
        fields = dict(f.split("=", 1) for f in cluster.run("scontrol", "show", "job", "-o", array).stdout.split("\n")[0].split()
                      if "=" in f)
        assert (fields["TimeLimit"], fields["TresPerNode"], fields["MinCPUsNode"], fields["MinMemoryNode"],
                fields["Partition"], fields["ArrayTaskThrottle"]) == (time_limit, "gres:gpu:1", "1", "1G", "test", "1")
    wait_until_gone(cluster)
    launches = [line.split(" ", 3) for line in (tmp_path / "launches.txt").read_text().splitlines()]
    assert len(launches) == 4
    for *_, args in launches:
        assert "--device cuda" in args and "--resume" in args and args.endswith("--steps 9")
    for scale in ("small", "medium"):  # throttled: one task of each array at a time
        spans = sorted((float(start), float(end)) for start, end, _, args in launches if f"--scale {scale}" in args)
        assert len(spans) == 2 and spans[0][1] <= spans[1][0]
    report = (sweep_dir(tmp_path / "runs") / "report.out").read_text()
    assert "| adanorm | 12.50 ± 0.71 (n=2) | 12.50 ± 0.71 (n=2) |" in report  # best_fid 12 and 13 from the stub


@pytest.mark.parametrize("args,message", [
    (["--wait"], "error: --wait is for SLURM sweeps (--slurm)"),
    (["--throttle", "2"], "error: --throttle is for SLURM sweeps (--slurm)"),
    (["--slurm-args", "-p gpu"], "error: --slurm-args is for SLURM sweeps (--slurm)"),
    (["--torchrun", "--gpus", "0,1", "--gpus-per-node", "2"], "error: --gpus-per-node is for SLURM sweeps (--slurm)"),
    (["--slurm", "--throttle", "0"], "error: --throttle needs a positive integer, got '0'"),
    (["--slurm", "--nodes", "x"], "error: --nodes needs a positive integer, got 'x'"),
    (["--slurm", "--slurm-args"], 'error: --slurm-args needs sbatch options in one argument, like "-p gpu -A lab"'),
    (["--slurm", "--gpus", "0,1"], "error: --gpus is for local runs; with --slurm SLURM hands out the GPUs "
                                   "(--torchrun --gpus-per-node N for several per run)"),
    (["--slurm", "--jobs", "2"], "error: --jobs is for local CPU runs; with --slurm every run is a task of its own "
                                 "(--throttle N: at most N at once)"),
    (["--slurm", "--nodes", "2"], "error: --nodes and --gpus-per-node are for --torchrun runs (a run spread over several "
                                  "processes)"),
    (["--slurm", "--torchrun"], "error: --slurm --torchrun needs --gpus-per-node N (processes per node, one per GPU)"),
    (["--slurm-report", "nowhere"], "error: --slurm-report needs a sweep folder made by --slurm, got 'nowhere'"),
])
def test_bad_slurm_options(tmp_path, args, message):
    """Needs no cluster: refused before anything is submitted, with one line and status 2."""
    proc = subprocess.run(["bash", str(ROOT / "run_all_scales.sh"), *args], env=stub_env(tmp_path),
                          capture_output=True, text=True, timeout=60)
    assert (proc.returncode, proc.stderr.strip()) == (2, message)
    assert not (tmp_path / "runs").exists() and not (tmp_path / "launches.txt").exists()


def test_help_documents_the_slurm_options():
    proc = subprocess.run(["bash", str(ROOT / "run_all_scales.sh"), "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and not proc.stdout.startswith("!") and "set -uo" not in proc.stdout
    for flag in ("--slurm ", "--slurm-args", "--wait", "--throttle", "--torchrun --gpus-per-node", "--nodes", "WAIT_POLL"):
        assert flag in proc.stdout, flag
