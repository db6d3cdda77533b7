"""Data that Debian packages ship (Fashion-MNIST, WordNet, fortunes), installed when missing.

    path = ensure_debian_data("wordnet-base", Path("/usr/share/wordnet/data.noun"))

Returns `path` when it exists; otherwise, as root with apt-get available, installs the package
(the way tools/slurm_local_cluster.sh installs Slurm) and checks again. When the data cannot
be had it raises `MissingData` whose message is one line saying what is missing and how to
get it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path


class MissingData(RuntimeError):
    """A data package is absent and could not be installed here."""


def ensure_debian_data(package: str, path: Path) -> Path:
    if path.exists():
        return path
    why = _install(package)
    if path.exists():
        return path
    raise MissingData(f"{path} not found: it comes with the Debian package {package!r} "
                      f"({why}); install it with `apt-get install {package}` as root")


def _install(package: str) -> str:
    """Try apt-get as root; returns why the file may still be missing."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "not root, so it was not installed automatically"
    if shutil.which("apt-get") is None:
        return "there is no apt-get here"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    command = ["apt-get", "install", "-y", "-qq", "--no-install-recommends", package]
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:  # the package lists may be missing or stale: refresh once
        subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True)
        done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return f"apt-get install failed: {last}"
    return "installed, but the file is not where expected"
