"""Cluster profiles: where jobs run. Loaded from ``clusters/*.yaml`` along a search path.

Search order for ``--cluster NAME`` (first match wins; a path to a .yaml file is used as is):
  1. each directory in ``$MOE_LAUNCH_CLUSTERS`` (separated by ``:``)
  2. ``./clusters`` in the working directory
  3. ``$XDG_CONFIG_HOME/moe-launch/clusters`` (default ``~/.config/moe-launch/clusters``)
  4. the profiles shipped with moe-launch
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

from launcher import config_io, paths
from launcher.errors import UserError
from launcher.tracking import Tracking


@dataclass
class Gpu:
    type: str = "H100-80GB"
    memory_gb: float = 80.0  # per GPU (per process on a cpu profile)
    peak_tflops: float = 989.0  # dense bf16 peak per GPU, for MFU and time estimates
    assumed_mfu: float = 0.35  # used to estimate step time before a run


@dataclass
class Interconnect:
    """Achievable bandwidth per GPU (GB/s, one direction) and per-collective latency, for the planner's
    communication model (launcher.comm). `launch bench comm` measures them into a measured overlay."""

    intra_node_gbps: float = 360.0  # NVLink 4 (H100 SXM): ~450 GB/s peak per GPU
    inter_node_gbps: float = 40.0  # one 400 Gb/s NIC per GPU: 50 GB/s peak
    latency_us: float = 10.0
    measured: Optional[str] = None  # set from the measured overlay: when and by which run (never written by hand)


@dataclass
class Slurm:
    partition: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    time: str = "04:00:00"  # job time limit, Slurm format
    exclusive: bool = True
    cpus_per_task: Optional[int] = None  # CPUs of the one task per node that runs torchrun
    mem: Optional[str] = None  # e.g. "0" (all of the node's memory) or "200G"
    constraint: Optional[str] = None
    extra_flags: List[str] = field(default_factory=list)  # more #SBATCH flags, e.g. "--reservation=r1"
    signal_seconds: int = 300  # SIGUSR2 this long before the time limit: checkpoint and requeue (0: no signal)
    max_requeues: int = 3  # retry budget for preemption / time limit / node failure
    rdzv_timeout: int = 300  # seconds torchrun waits for all nodes to join
    rdzv_host: Optional[str] = None  # rendezvous address; default: the head node's NodeAddr from scontrol
    array_throttle: Optional[int] = None  # a sweep's job array runs at most this many points at once (None: no limit)


@dataclass
class Container:
    image: Optional[str] = None  # run inside this image (pyxis/enroot: srun --container-image)
    mounts: List[str] = field(default_factory=list)  # "src:dst[:flags]"


@dataclass
class ClusterProfile:
    name: str = "cluster"
    description: str = ""
    executor: str = "slurm"  # slurm | local (torchrun on this machine)
    device: str = "cuda"  # cuda | cpu
    nodes: int = 1
    gpus_per_node: int = 8  # on a cpu profile: processes per node
    gpu: Gpu = field(default_factory=Gpu)
    interconnect: Interconnect = field(default_factory=Interconnect)
    slurm: Slurm = field(default_factory=Slurm)
    container: Container = field(default_factory=Container)
    env: Dict[str, str] = field(default_factory=dict, metadata={"multiline": True})  # exported in the job, byte for byte
    setup: List[str] = field(default_factory=list)  # shell lines run before the job (shell code by design)
    runs_dir: Optional[str] = None  # where run directories go (shared filesystem); default ./runs
    python: Optional[str] = None  # interpreter on the nodes; default: the one running launch ("python" in a container)
    tracking: Tracking = field(default_factory=Tracking)  # the site's tracker defaults (recipe settings win)

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node

    def shape(self) -> str:
        nodes = f"{self.nodes} node{'s' * (self.nodes != 1)}"
        if self.device == "cpu":
            return f"{nodes} x {self.gpus_per_node} CPU processes"
        return f"{nodes} x {self.gpus_per_node} {self.gpu.type} = {self.world_size} GPUs"

    def describe(self) -> str:
        return f"{self.name} ({self.shape()})"


# sbatch parses #SBATCH lines itself (no shell quoting there): values must stick to a safe set.
SBATCH_SAFE = re.compile(r"^[A-Za-z0-9_.,:+=@/%-]+$")
SBATCH_FLAG = re.compile(r"^--[a-z][a-z0-9-]*(=[A-Za-z0-9_.,:+=@/%-]+)?$")
SBATCH_SAFE_CHARS = "letters, digits and _ . , : + = @ / % -"


def check_sbatch_value(value: object, field: str) -> str:
    text = str(value)
    if not SBATCH_SAFE.match(text):
        raise UserError(f"{text!r} cannot go on an #SBATCH line; use {SBATCH_SAFE_CHARS}", field)
    return text


def check_slurm_fields(profile: "ClusterProfile", where: str) -> None:
    s = profile.slurm
    for key in ("partition", "account", "qos", "time", "mem", "constraint"):
        if getattr(s, key) is not None:
            check_sbatch_value(getattr(s, key), f"{where}slurm.{key}")
    for i, flag in enumerate(s.extra_flags):
        if not SBATCH_FLAG.match(flag):
            raise UserError(f"{flag!r} is not a single --flag or --flag=value with {SBATCH_SAFE_CHARS}", f"{where}slurm.extra_flags[{i}]")


def search_dirs() -> list[Path]:
    dirs = [Path(d) for d in os.environ.get("MOE_LAUNCH_CLUSTERS", "").split(os.pathsep) if d]
    dirs.append(Path.cwd() / "clusters")
    config_home = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    dirs.append(config_home / "moe-launch" / "clusters")
    dirs.append(paths.data_dir("clusters"))
    return dirs


def find_profile(name: str) -> Path:
    if name.endswith((".yaml", ".yml")) or os.sep in name:
        path = Path(name)
        if not path.is_file():
            raise UserError(f"no such file {name!r}", "--cluster")
        return path
    for d in search_dirs():
        for ext in (".yaml", ".yml"):
            if (d / f"{name}{ext}").is_file():
                return d / f"{name}{ext}"
    raise UserError(f"unknown cluster {name!r}; known: {', '.join(available()) or 'none'} (search path: $MOE_LAUNCH_CLUSTERS, ./clusters, ~/.config/moe-launch/clusters, shipped)", "--cluster")


def available() -> list[str]:
    """Profile names on the search path, first occurrence wins, sorted."""
    names: dict[str, Path] = {}
    for d in search_dirs():
        if d.is_dir():
            for p in sorted(d.glob("*.y*ml")):
                names.setdefault(p.stem, p)
    return sorted(names)


def load_profile(name: str) -> tuple[ClusterProfile, Path]:
    """Load and type-check a profile by name or path; errors name the file and the key."""
    path = find_profile(name)
    from launcher.validate import check_profile

    profile = config_io.load_yaml_into(ClusterProfile, path)
    check_profile(profile, path)
    check_slurm_fields(profile, f"{path}: ")
    return with_measured(profile), path


def measured_path(name: str) -> Path:
    """Where `launch bench comm` writes a profile's measured interconnect: beside the user's profiles, in a
    folder of its own (not on the profile search path; the profile file itself is never rewritten)."""
    config_home = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return config_home / "moe-launch" / "measured" / f"{name}.yaml"


def with_measured(profile: ClusterProfile) -> ClusterProfile:
    """The profile with its measured interconnect figures, where `launch bench comm` has measured them."""
    import dataclasses

    path = measured_path(profile.name)
    if not path.is_file():
        return profile
    import yaml

    try:
        data = (yaml.safe_load(path.read_text()) or {}).get("interconnect") or {}
    except yaml.YAMLError as exc:
        raise UserError(f"not valid YAML ({exc}); delete it or run `launch bench comm` again", str(path)) from None
    known = {k: float(v) for k, v in data.items() if k in ("intra_node_gbps", "inter_node_gbps", "latency_us") and v}
    if not known:
        return profile
    net = dataclasses.replace(profile.interconnect, **known, measured=str(data.get("measured") or path))
    return dataclasses.replace(profile, interconnect=net)
