"""One prepared GPU check: install what the machine lacks, run the GPU tests, the demo on CUDA,
the 1B throughput sweep against the Hugging Face peer and the MoVQGAN encode benchmark, each
under its own timeout and all inside one time budget; write `OUTDIR/summary.json` and one log
per step into OUTDIR.

    tools/gpu_check.sh OUTDIR [WHEELS]      # the shell entry point (docs/gpu.md)

Without a CUDA device it measures nothing: the summary says so and the exit status is 1.
The steps run as subprocesses through the public entry points (pytest, `python -m
megatron_t2i.train`, tools/*), so an engine rewrite behind them does not break this check.
Only the standard library, torch and megatron_t2i.files are imported here: the wheels are not
installed yet.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.metadata
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from megatron_t2i.files import write_text_atomic

REPO = Path(__file__).resolve().parents[3]
NO_CUDA = "no CUDA device: nothing measured"
# A wheel of one of these is never installed over what the machine has: its CUDA builds match
# each other (a container's torch, TE and megatron-core), and a plain PyPI wheel would not.
NEVER_REPLACE = ("torch", "transformer-engine", "megatron-core")
# The sweep of docs/performance.md: global batch 64, micro batches 4, 8 and 16; the config's own
# micro batch (8) first, so a budget cut short loses the least telling row.
SWEEP_MICRO_BATCHES = (8, 4, 16)
BENCH_GLOBAL_BATCH = 64


@dataclasses.dataclass
class Step:
    """One command of the check, its timeout (seconds) and the log file it writes."""

    name: str
    argv: list[str]
    timeout: float
    log: str


# ---- wheels ----------------------------------------------------------------------------------

def wheel_distribution(path: Path) -> str:
    """The normalised distribution name of a wheel file (PEP 427: NAME-VERSION-...whl)."""
    if path.suffix != ".whl" or path.name.count("-") < 4:
        raise ValueError(f"{path}: not a wheel file name (NAME-VERSION-PY-ABI-PLATFORM.whl)")
    return normalise(path.name.split("-", 1)[0])


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def installed(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def wheels_to_install(folder: Path) -> tuple[list[Path], list[str]]:
    """The wheels whose distribution is missing here, and a note for each one left out: what
    the machine already has (torch, TE and megatron-core above all) is kept as it is."""
    chosen, kept = [], []
    for wheel in sorted(folder.glob("*.whl")):
        name = wheel_distribution(wheel)
        have = installed(name)
        if have is not None:
            kept.append(f"{name} {have} already installed: {wheel.name} not installed")
        elif name in NEVER_REPLACE or name.startswith("nvidia-"):
            kept.append(f"{name}: never installed from the wheel folder ({wheel.name})")
        else:
            chosen.append(wheel)
    return chosen, kept


# ---- running one step ------------------------------------------------------------------------

def run_step(step: Step, outdir: Path, env: dict[str, str], budget_left: float) -> dict[str, Any]:
    """Run one step, its output into OUTDIR/<log>; killed (its whole process group) at its
    timeout or when the check's budget runs out, whichever comes first."""
    timeout = min(step.timeout, budget_left)
    record: dict[str, Any] = {"command": " ".join(step.argv), "log": step.log,
                              "timeout_s": round(timeout, 1)}
    if timeout < 5:
        return {**record, "status": "skipped", "reason": "the check's time budget is spent",
                "wall_s": 0.0}
    start = time.monotonic()
    with open(outdir / step.log, "a") as log:
        log.write(f"$ {record['command']}\n")
        log.flush()
        proc = subprocess.Popen(step.argv, cwd=REPO, env=env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            returncode = proc.wait(timeout=timeout)
            status = "ok" if returncode == 0 else "failed"
        except subprocess.TimeoutExpired:
            status = "timeout"
        # the step's whole process group: torchrun's ranks, and checkpoint writer processes
        # that can outlive their rank, must not run on into the next step's timing
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        returncode = proc.wait()
    return {**record, "status": status, "returncode": returncode,
            "wall_s": round(time.monotonic() - start, 1)}


# ---- reading results -------------------------------------------------------------------------

def parse_pytest_summary(text: str) -> dict[str, int]:
    """Counts from pytest's last summary line ("3 passed, 1 skipped, 1 failed in 9.1s")."""
    lines = [ln for ln in text.splitlines() if re.search(r"\d+ (passed|failed|error|skipped)", ln)]
    if not lines:
        return {}
    return {kind: int(n) for n, kind in re.findall(
        r"(\d+) (passed|failed|errors?|skipped|deselected|xfailed|xpassed)", lines[-1])}


def parse_json_lines(text: str) -> list[dict[str, Any]]:
    """Every line of the text that is a JSON object (bench_throughput prints one per run)."""
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("{") and line.endswith("}"):
            try:
                value = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(value, dict):
                out.append(value)
    return out


BENCH_FIELDS = ("micro_batch_size", "global_batch_size", "tokens_per_sec", "tflops_per_gpu",
                "mfu", "peak_memory_gib", "step_time_p10_s", "step_time_median_s",
                "step_time_p90_s", "last_loss", "transformer_impl", "core_attention", "device",
                "tokens_per_sec_vs_peer")


def bench_figures(result: dict[str, Any]) -> dict[str, Any]:
    """The figures of docs/performance.md's GPU table from one bench_throughput JSON line."""
    row = {k: result.get(k) for k in BENCH_FIELDS}
    peer = result.get("peer") or {}
    row["peer_tokens_per_sec"] = peer.get("tokens_per_sec")
    row["peer_peak_memory_gib"] = peer.get("peak_memory_gib")
    return row


def parse_movqgan(text: str) -> dict[str, float]:
    """The "  encode_images_per_s: 123.45" lines tools/bench_movqgan.py prints."""
    return {k: float(v) for k, v in re.findall(r"^\s+(\w+_per_s): ([\d.]+)$", text, re.M)}


def demo_figures(run_dir: Path) -> dict[str, Any]:
    """First and last logged training loss of the demo run, and its memory and speed."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return {}
    records = [r for r in parse_json_lines(path.read_text()) if r.get("split", "train") == "train"]
    if not records:
        return {}
    first, last = records[0], records[-1]
    return {"iterations": last.get("iteration"), "first_loss": first.get("loss"),
            "last_loss": last.get("loss"), "tokens_per_sec": last.get("tokens_per_sec"),
            "memory_gib": last.get("memory_gib"), "max_memory_gib": last.get("max_memory_gib")}


# ---- the plan --------------------------------------------------------------------------------

def plan(python: str, wheels: list[Path], site: Path, demo_dir: Path) -> list[Step]:
    """The steps in order, each with its own timeout. The timeouts are upper bounds: together
    they exceed the 9-minute budget, which ends (or skips) whatever comes last."""
    steps = []
    if wheels:
        steps.append(Step("install", [python, "-m", "pip", "install", "-q", "--no-index",
                                      "--no-deps", "--no-compile", "--target", str(site),
                                      *map(str, wheels)], 90, "install.log"))
    # one module that fails to import must not cost the other's tests
    steps.append(Step("gpu_tests", [python, "-m", "pytest", "-q", "-rs", "-m", "gpu",
                                    "-p", "no:cacheprovider", "--continue-on-collection-errors",
                                    "tests/test_gpu.py", "tests/test_movqgan.py"], 150,
                      "gpu_tests.log"))
    steps.append(Step("demo", [python, "-m", "megatron_t2i.train", "--config",
                               "configs/demo.yaml", "train.device=cuda", "train.precision=bf16",
                               "train.train_iters=500", "checkpoint.save_interval=500",
                               f"train.run_dir={demo_dir}",
                               f"data.cache_dir={demo_dir / 'corpus'}"], 100, "demo.log"))
    steps.append(Step("movqgan_encode", [python, "tools/bench_movqgan.py", "--preset", "270M",
                                         "--batch", "64", "--device", "cuda"], 60,
                      "movqgan.log"))
    for mb in SWEEP_MICRO_BATCHES:
        steps.append(Step(f"bench_throughput_mb{mb}", [
            python, "tools/bench_throughput.py", "--config", "configs/openlm_1b_t2i.yaml",
            "--iters", "10", "--warmup", "3", "--peer", "hf",
            # device=cuda: a machine whose CUDA fails must not time a 1B model on its CPU
            "--run-dir", str(demo_dir.parent / "bench"), "train.device=cuda",
            "train.precision=bf16", "parallel.tensor_model_parallel_size=1",
            f"train.global_batch_size={BENCH_GLOBAL_BATCH}", f"train.micro_batch_size={mb}"],
            85, "bench_throughput.log"))
    return steps


def figures(step: Step, text: str, demo_dir: Path) -> dict[str, Any]:
    """What a finished step measured, read from its part of the log (or the demo's metrics)."""
    if step.name == "gpu_tests":
        return parse_pytest_summary(text)
    if step.name == "demo":
        return demo_figures(demo_dir)
    if step.name.startswith("bench_throughput"):
        lines = parse_json_lines(text)
        return bench_figures(lines[-1]) if lines else {}
    if step.name == "movqgan_encode":
        return parse_movqgan(text)
    return {}


# ---- the check -------------------------------------------------------------------------------

def cuda_device() -> str | None:
    """The name of CUDA device 0, or None when torch sees none (or is not installed)."""
    try:
        import torch
    except ImportError:
        return None
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


def write_summary(outdir: Path, summary: dict[str, Any]) -> Path:
    path = outdir / "summary.json"
    write_text_atomic(path, json.dumps(summary, indent=2) + "\n")
    return path


def check(outdir: Path, wheel_dir: Path | None, budget_s: float) -> int:
    outdir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    summary: dict[str, Any] = {"date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                               "budget_s": budget_s, "python": sys.version.split()[0],
                               "versions": {n: installed(n) for n in
                                            ("torch", *NEVER_REPLACE[1:], "transformers")}}
    device = cuda_device()
    if device is None:
        summary.update(status="no_cuda", message=NO_CUDA, steps={})
        write_summary(outdir, summary)
        print(NO_CUDA, file=sys.stderr)
        return 1
    summary["device"] = device
    wheels, kept = wheels_to_install(wheel_dir) if wheel_dir else ([], [])
    summary["wheels"] = {"folder": str(wheel_dir) if wheel_dir else None,
                         "installed": [w.name for w in wheels], "kept": kept}
    work = Path(tempfile.mkdtemp(prefix="t2i_gpu_check_"))
    site, demo_dir = work / "site", work / "demo"
    summary["work_dir"] = str(work)  # the installed wheels and the demo run, left for a look
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), str(REPO)]),
               PYTHONUNBUFFERED="1", PYTHONWARNINGS="ignore", WANDB_MODE="offline")
    summary["steps"] = {}
    for step in plan(sys.executable, wheels, site, demo_dir):
        left = budget_s - (time.monotonic() - started)
        log = outdir / step.log
        offset = log.stat().st_size if log.exists() else 0  # the sweep shares one log
        record = run_step(step, outdir, env, left)
        if record["status"] != "skipped":
            with open(log, "rb") as f:
                f.seek(offset)
                text = f.read().decode(errors="replace")
            record["figures"] = figures(step, text, demo_dir)
        summary["steps"][step.name] = record
        write_summary(outdir, summary)  # a check cut short still leaves what it measured
        print(f"{step.name}: {record['status']} ({record['wall_s']} s)", flush=True)
    statuses = [r["status"] for r in summary["steps"].values()]
    summary["status"] = "ok" if all(s == "ok" for s in statuses) else "incomplete"
    summary["wall_s"] = round(time.monotonic() - started, 1)
    print(f"summary: {write_summary(outdir, summary)} ({summary['status']})")
    return 0 if summary["status"] == "ok" else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gpu_check", description=__doc__.split("\n")[0])
    parser.add_argument("outdir", type=Path, help="summary.json and the logs go here")
    parser.add_argument("wheels", type=Path, nargs="?", default=None,
                        help="a folder of wheels for what the machine lacks (tools/gpu_wheels.sh)")
    parser.add_argument("--budget-s", type=float, default=540.0,
                        help="the whole check's time limit (default 9 minutes)")
    args = parser.parse_args(argv)
    if args.wheels is not None and not args.wheels.is_dir():
        print(f"error: wheel folder {args.wheels} does not exist", file=sys.stderr)
        return 1
    return check(args.outdir, args.wheels, args.budget_s)


if __name__ == "__main__":
    sys.exit(main())
