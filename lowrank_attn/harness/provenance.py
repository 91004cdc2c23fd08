"""What every result records about the code and the machine that measured it.

* :func:`git_commit`: the checkout's short commit, ``+dirty`` when tracked files differ from it; None outside a
  git checkout (an installed wheel).
* :func:`machine`: platform, CPUs, torch and its threads, the device (and the GPU's name on CUDA).
* :func:`stamp`: ``{"commit", "machine", "threads"}``, the fields every results row carries.
* :func:`host_info`: :func:`machine`'s facts plus the load on the machine (uptime, load average, the thread
  environment variables), for benchmarks, recorded before and after a timed run.
"""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]  # the checkout holding the package (eval/ scripts run from here)


def git_commit(repo: str | os.PathLike = REPO) -> str | None:
    """Short commit of the checkout at ``repo`` (``+dirty`` with uncommitted changes to tracked files); None when
    ``repo`` is not a git checkout or git cannot be run."""
    repo = Path(repo)
    if not (repo / ".git").exists():
        return None
    try:
        run = dict(cwd=repo, capture_output=True, text=True, timeout=10)
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], **run).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], **run).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (commit + ("+dirty" if dirty else "")) if commit else None


def machine(device: str = "cpu") -> dict:
    """The machine a measurement ran on: platform, CPUs, torch version and threads, device (and GPU name)."""
    import torch

    info = {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "device": str(device)}
    if str(device).startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def stamp(device: str = "cpu") -> dict:
    """``{"commit", "machine", "threads"}``: what every results row records (:class:`ResultsStore` adds the commit
    to rows that lack it)."""
    info = machine(device)
    return {"commit": git_commit(), "machine": info, "threads": info["torch_threads"]}


def host_info() -> dict:
    """Host facts for a benchmark's JSON (``host_start``/``host_end``): platform, CPUs, torch and its threads, the
    thread environment variables, uptime and load average (other jobs' load shows here)."""
    import torch

    try:
        up = subprocess.run(["uptime"], capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        up = None
    return {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
            "MKL_NUM_THREADS": os.environ.get("MKL_NUM_THREADS"), "uptime": up,
            "loadavg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}
