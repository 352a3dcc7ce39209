import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def isolated_search_path(monkeypatch, tmp_path_factory):
    """Tests see only the shipped cluster profiles, whatever the machine's user config holds."""
    monkeypatch.delenv("MOE_LAUNCH_CLUSTERS", raising=False)
    monkeypatch.delenv("MOE_LAUNCH_RUNS", raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path_factory.mktemp("xdg")))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.getbasetemp() / "xdg-cache"))  # compiled templates


def _git_status() -> str | None:
    try:
        res = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=all"],
                             capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return res.stdout if res.returncode == 0 else None


@pytest.fixture(scope="session", autouse=True)
def working_tree_left_as_found():
    """Tests write only into temporary directories: the checkout's git status is the same after the suite."""
    before = None if os.environ.get("UPDATE_GOLDEN") else _git_status()  # updating goldens changes the tree on purpose
    yield
    after = _git_status()
    if before is not None and after is not None and after != before:
        new = sorted(set(after.splitlines()) - set(before.splitlines()))
        pytest.fail(f"the test suite changed the working tree: {new or after.splitlines()}", pytrace=False)


def run_launch(*args, cwd=None, env=None, timeout=60):
    """Run the real `launch` command in a subprocess (as a user would)."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "launcher.cli", *args], cwd=cwd or ROOT, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


# ----------------------------------------------------------------------------- training runs on CPU/gloo
# Short runs of the smoke recipe through the real `launch --cluster cpuN` (torchrun, gloo). Runs that more
# than one test file needs are trained once per session (the `trained` fixture).
FAST = ["train.max_steps=4", "train.global_batch_size=8", "train.micro_batch_size=2", "data.seq_length=64",
        "train.log_interval=1", "checkpoint.interval=1000", "train.warmup_steps=1", "train.lr=1e-3"]


@pytest.fixture(scope="session")
def cpu_env(tmp_path_factory):
    """(environment, base directory): cluster profiles cpu1/cpu2/cpu4 (local executor, N CPU processes)."""
    base = tmp_path_factory.mktemp("cpu-runs")
    profiles = base / "profiles"
    profiles.mkdir()
    for n in (1, 2, 4):
        (profiles / f"cpu{n}.yaml").write_text(
            f"name: cpu{n}\nexecutor: local\ndevice: cpu\nnodes: 1\ngpus_per_node: {n}\n"
            "gpu: {type: cpu, memory_gb: 8, peak_tflops: 1.0, assumed_mfu: 0.1}\nenv: {OMP_NUM_THREADS: '1'}\n")
    return {**os.environ, "MOE_LAUNCH_CLUSTERS": str(profiles), "MOE_LAUNCH_DATA_CACHE": str(base / "data"),
            "XDG_CONFIG_HOME": str(base / "xdg"), "XDG_CACHE_HOME": str(base / "xdg-cache")}, base


def launch_cmd(runs, procs, *overrides):
    return [sys.executable, "-m", "launcher.cli", "smoke", "--cluster", f"cpu{procs}", "--runs-dir", str(runs), *FAST, *overrides]


def train(env, runs, procs, *overrides, expect=0):
    res = subprocess.run(launch_cmd(runs, procs, *overrides), cwd=ROOT, env=env[0], capture_output=True, text=True, timeout=300)
    assert res.returncode == expect, res.stdout[-3000:] + res.stderr[-3000:]
    (run,) = [p for p in sorted(Path(runs).iterdir(), key=os.path.getmtime) if not p.name.startswith(".")][-1:]
    return run, res


@pytest.fixture(scope="session")
def trained(cpu_env):
    """trained(name, procs, *overrides) -> run directory, trained once per session for the same arguments."""
    cache: dict = {}

    def get(name: str, procs: int, *overrides: str) -> Path:
        key = (name, procs, overrides)
        if key not in cache:
            assert name not in {k[0] for k in cache}, f"run name {name} reused with other arguments"
            cache[key] = train(cpu_env, cpu_env[1] / name, procs, *overrides)[0]
        return cache[key]

    return get


def wait_for_run_steps(run_root: Path, steps: int, proc, timeout: float = 120) -> Path:
    """The run directory under ``run_root`` once its metrics.jsonl has ``steps`` records (``proc``, the launch, still running)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        for m in run_root.glob("*/metrics.jsonl"):
            if len(m.read_text().splitlines()) >= steps:
                return m.parent
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    raise AssertionError("training did not reach the step in time")
