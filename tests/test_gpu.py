"""The GPU path: what CPU CI cannot run (marked `gpu`, skipped without CUDA), and the CPU side of
the prepared GPU check (tools/gpu_check.sh, megatron_t2i/experiments/bench/gpu_check.py).

On CUDA: the demo config in bf16 with SDPA core attention (loss falls, memory figures in the
metrics, a checkpoint resumes), the Transformer Engine spec and an FP8 recipe when TE imports,
NCCL process groups (2 ranks with 2 GPUs, else 1), megatron-core's fused SwiGLU kernel.
Every run goes through the public entry point (`python -m megatron_t2i.train`).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, read_metrics, run_train, train_env

from megatron_t2i.config import load_config
from megatron_t2i.experiments.bench import gpu_check

HAS_TE = importlib.util.find_spec("transformer_engine") is not None
CUDA_BF16 = ["train.device=cuda", "train.precision=bf16"]
SDPA = [*CUDA_BF16, "model.transformer_impl=local", "model.core_attention=sdpa"]
SIX = ["train.train_iters=6"]


def _losses(records: list[dict], iterations: list[int]) -> list[float]:
    by_iter = {r["iteration"]: r for r in records}
    return [by_iter[i]["loss"] for i in iterations]


# ---- on CUDA ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def gpu_uninterrupted(tmp_path_factory, corpus_dir) -> list[dict]:
    run_dir = tmp_path_factory.mktemp("gpu_uninterrupted")
    run_train(run_dir, corpus_dir, overrides=SDPA + SIX)
    return read_metrics(run_dir)


@pytest.mark.gpu
def test_demo_bf16_sdpa_loss_falls_with_memory_figures(tmp_path, corpus_dir):
    run_train(tmp_path, corpus_dir, overrides=SDPA + ["train.train_iters=40"])
    records = read_metrics(tmp_path)
    losses = [r["loss"] for r in records]
    assert [r["iteration"] for r in records] == list(range(1, 41))
    assert all(math.isfinite(x) for x in losses), losses
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5, losses
    # memory figures are logged only on the CUDA platform: their presence proves where it ran
    for r in records:
        assert 0 < r["memory_gib"] <= r["max_memory_gib"], r


@pytest.mark.gpu
def test_bf16_checkpoint_resumes(tmp_path, corpus_dir, gpu_uninterrupted):
    run_train(tmp_path, corpus_dir, overrides=SDPA + SIX + ["train.exit_interval=3"])
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "3"
    proc = run_train(tmp_path, corpus_dir, overrides=SDPA + SIX)  # the same command again
    assert "resumed from" in proc.stdout
    resumed = read_metrics(tmp_path)
    assert [r["iteration"] for r in resumed] == [1, 2, 3, 4, 5, 6]
    assert [r["lr"] for r in resumed[3:]] == [r["lr"] for r in gpu_uninterrupted[3:]]
    assert resumed[-1]["consumed_samples"] == gpu_uninterrupted[-1]["consumed_samples"]
    # Iterations 4-6 see restored weights, optimizer moments, schedule and data position. On
    # CUDA two identical runs may already differ in the last bits (SDPA's fused backward
    # kernels are not guaranteed deterministic), so the bound is that noise's size; a lost
    # optimizer state or data position moves these losses by percents.
    for mine, ref in zip(_losses(resumed, [4, 5, 6]), _losses(gpu_uninterrupted, [4, 5, 6])):
        assert mine == pytest.approx(ref, rel=1e-3), (mine, ref)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_two_rank_nccl_tensor_parallel_training(tmp_path, corpus_dir, gpu_uninterrupted):
    run_train(tmp_path, corpus_dir, nproc=2,
              overrides=SDPA + SIX + ["parallel.tensor_model_parallel_size=2"])
    for mine, ref in zip(_losses(read_metrics(tmp_path), [1, 6]),
                         _losses(gpu_uninterrupted, [1, 6])):
        assert mine == pytest.approx(ref, rel=2e-2), (mine, ref)


@pytest.mark.gpu
def test_nccl_process_groups():
    """2 ranks when 2 GPUs are visible, else the 1-rank NCCL init: the CUDA platform's default
    backend is NCCL and megatron-core's tensor-parallel group all-reduces CUDA tensors."""
    n = 2 if torch.cuda.device_count() >= 2 else 1
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={n}", str(REPO / "tests/scripts/nccl_groups.py"), str(n)]
    env = train_env(PYTHONPATH=os.pathsep.join(filter(None, [str(REPO),
                                                             os.environ.get("PYTHONPATH")])))
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("OK rank=") == n, proc.stdout


@pytest.mark.gpu
def test_fused_swiglu_matches_the_unfused_formula():
    """The kernel the CUDA config selects (bias_activation_fusion) against silu(a) * b in
    float64, forward and backward, on fresh random bf16 inputs."""
    from megatron.core.fusions.fused_bias_swiglu import bias_swiglu_impl

    x = torch.randn(80, 4, 2 * 192, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    out = bias_swiglu_impl(x, None)
    ref_x = x.detach().double().requires_grad_(True)
    a, b = ref_x.chunk(2, dim=-1)
    ref = torch.nn.functional.silu(a) * b
    grad = torch.randn_like(ref)
    out.backward(grad.to(out.dtype))
    ref.backward(grad)
    assert out.shape == (80, 4, 192)
    for got, want in ((out, ref), (x.grad, ref_x.grad)):
        err = (got.double() - want).norm() / want.norm()
        assert err < 1e-2, float(err)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_TE, reason="Transformer Engine does not import")
def test_transformer_engine_spec_and_fp8_recipe(tmp_path, corpus_dir):
    from megatron_t2i.config import uses_transformer_engine
    from megatron_t2i.model.gpt import layer_spec

    cfg = load_config(str(REPO / "configs/demo.yaml"), ["train.device=cuda"])
    assert uses_transformer_engine(cfg)  # transformer_impl=auto picks TE where it imports
    qkv = layer_spec(cfg).submodules.self_attention.submodules.linear_qkv
    assert "transformer_engine" in qkv.__module__, qkv
    te = [*CUDA_BF16, "model.transformer_impl=transformer_engine", "train.train_iters=3"]
    run_train(tmp_path / "bf16", corpus_dir, overrides=te)
    run_train(tmp_path / "fp8", corpus_dir, overrides=te + ["train.fp8=hybrid"])
    bf16, fp8 = (_losses(read_metrics(tmp_path / k), [1, 2, 3]) for k in ("bf16", "fp8"))
    assert all(math.isfinite(x) for x in bf16 + fp8), (bf16, fp8)
    # FP8 GEMMs round differently from bf16 ones: equal losses would mean the recipe was off
    assert fp8[0] != bf16[0] and fp8[0] == pytest.approx(bf16[0], rel=5e-2), (fp8, bf16)


# ---- on the CPU: the CUDA configuration and the GPU check's machinery -----------------------

@pytest.mark.parametrize("config", ["configs/demo.yaml", "configs/openlm_1b_t2i.yaml"])
def test_cuda_config_takes_the_fused_swiglu_path(config):
    from megatron_t2i.model.gpt import transformer_config

    cfg = load_config(str(REPO / config), [])
    assert transformer_config(cfg, on_cuda=True).bias_activation_fusion
    assert not transformer_config(cfg, on_cuda=False).bias_activation_fusion


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without CUDA")
def test_gpu_check_without_cuda_measures_nothing(tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    (wheels / "absent_pkg-1.0-py3-none-any.whl").write_bytes(b"")  # never installed here
    proc = subprocess.run(["bash", str(REPO / "tools/gpu_check.sh"), str(tmp_path / "out"),
                           str(wheels)], env=dict(os.environ, PYTHON=sys.executable),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [gpu_check.NO_CUDA]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["status"] == "no_cuda" and summary["steps"] == {}
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["summary.json"]


def test_gpu_check_usage_error(tmp_path):
    proc = subprocess.run(["bash", str(REPO / "tools/gpu_check.sh")], capture_output=True,
                          text=True, timeout=30)
    assert proc.returncode == 2 and "usage: tools/gpu_check.sh OUTDIR" in proc.stderr


def test_wheels_never_replace_what_the_machine_has(tmp_path):
    names = ["torch-2.11.0-cp312-cp312-manylinux_2_28_x86_64.whl",
             "megatron_core-0.16.1-cp312-cp312-manylinux_2_28_x86_64.whl",
             "transformer_engine-2.10.0-py3-none-manylinux_2_28_x86_64.whl",
             "nvidia_nccl_cu13-2.28.3-py3-none-manylinux_2_28_x86_64.whl",
             "Absent.Pkg_X-1.0-py3-none-any.whl"]
    for name in names:
        (tmp_path / name).write_bytes(b"")
    chosen, kept = gpu_check.wheels_to_install(tmp_path)
    assert [w.name for w in chosen] == ["Absent.Pkg_X-1.0-py3-none-any.whl"]
    assert len(kept) == 4 and any(k.startswith("torch ") for k in kept)
    assert gpu_check.wheel_distribution(tmp_path / names[-1]) == "absent-pkg-x"
    with pytest.raises(ValueError, match="not a wheel file name"):
        gpu_check.wheel_distribution(Path("megatron_core-0.16.1.tar.gz"))


def _step(code: str, timeout: float) -> gpu_check.Step:
    return gpu_check.Step("s", [sys.executable, "-c", code], timeout, "s.log")


def test_run_step_status_timeout_and_budget(tmp_path):
    env = dict(os.environ)
    ok = gpu_check.run_step(_step("print('hi')", 30), tmp_path, env, budget_left=100)
    assert ok["status"] == "ok" and "hi" in (tmp_path / "s.log").read_text()
    failed = gpu_check.run_step(_step("raise SystemExit(3)", 30), tmp_path, env, 100)
    assert (failed["status"], failed["returncode"]) == ("failed", 3)
    slow = gpu_check.run_step(_step("import time; time.sleep(60)", 30), tmp_path, env,
                              budget_left=5.1)  # the budget, not the step's timeout, ends it
    assert slow["status"] == "timeout" and slow["wall_s"] < 20
    spent = gpu_check.run_step(_step("print('never')", 30), tmp_path, env, budget_left=2)
    assert spent["status"] == "skipped" and "never" not in (tmp_path / "s.log").read_text()


def test_result_parsers():
    # the benchmark's own statistics, so the field names are the ones it prints
    from megatron_t2i.experiments.bench.throughput import step_statistics
    from megatron_t2i.training.metrics import Throughput

    assert gpu_check.parse_pytest_summary(
        "....\n= 5 passed, 2 skipped, 1 failed, 3 deselected in 41.2s =\n") == {
        "passed": 5, "skipped": 2, "failed": 1, "deselected": 3}
    assert gpu_check.parse_pytest_summary("collection crashed") == {}
    rates = Throughput(tokens_per_iteration=69632, flops_per_iteration=6.2e14, world_size=1,
                       peak_tflops_per_gpu=989.0)
    ours, peer = step_statistics([1.0, 1.2, 1.1], rates), step_statistics([1.4, 1.5], rates)
    line = json.dumps({**ours, "micro_batch_size": 8, "peer": peer,
                       "tokens_per_sec_vs_peer": ours["tokens_per_sec"] / peer["tokens_per_sec"]})
    parsed = gpu_check.parse_json_lines(f"[rank0] log line\n{line}\n{{broken\n")
    assert len(parsed) == 1
    row = gpu_check.bench_figures(parsed[0])
    assert row["tokens_per_sec"] == pytest.approx(69632 / 1.1)
    assert row["peer_tokens_per_sec"] == pytest.approx(69632 / 1.45)
    assert row["micro_batch_size"] == 8 and row["peak_memory_gib"] is None
    movq = "MoVQGAN 270M (270.1M params) on NVIDIA H200\n  encode_images_per_s: 812.50\n" \
           "  decode_images_per_s: 301.25\n"
    assert gpu_check.parse_movqgan(movq) == {"encode_images_per_s": 812.5,
                                             "decode_images_per_s": 301.25}


def test_demo_figures_from_a_real_run(eval_checkpoint):
    records = read_metrics(eval_checkpoint)
    figures = gpu_check.demo_figures(eval_checkpoint)
    assert figures["iterations"] == records[-1]["iteration"] == 6
    assert (figures["first_loss"], figures["last_loss"]) == (records[0]["loss"],
                                                             records[-1]["loss"])
    assert figures["memory_gib"] is None  # the CPU platform logs no device memory
    assert gpu_check.demo_figures(Path("/nonexistent")) == {}


def test_planned_commands_name_real_configs_and_keys(tmp_path):
    """Every config-driven step of the check loads and validates (on the CPU here, so a key
    misspelt in the plan fails now, not in a lent GPU minute); every file it runs exists."""
    from megatron_t2i.config import validate

    steps = gpu_check.plan("python", [], tmp_path / "site", tmp_path / "demo")
    assert [s.name for s in steps] == ["gpu_tests", "demo", "movqgan_encode",
                                       "bench_throughput_mb8", "bench_throughput_mb4",
                                       "bench_throughput_mb16"]
    for step in steps:
        for arg in step.argv:
            if arg.endswith((".py", ".yaml")):
                assert (REPO / arg).is_file(), (step.name, arg)
        if "--config" in step.argv:
            path = step.argv[step.argv.index("--config") + 1]
            overrides = [a for a in step.argv if "=" in a and not a.startswith("-")]
            validate(load_config(str(REPO / path), [*overrides, "train.device=cpu"]), 1)
    assert sum(s.timeout for s in steps) <= 600  # with install: the 9-minute budget cuts in


def test_check_writes_each_steps_status_figures_and_time(tmp_path, monkeypatch):
    """The check's flow past the CUDA probe (which is the one thing replaced here): steps run
    in order, a step's figures come from its own part of a shared log, the summary holds
    status, figures and wall time of each, and a failed step makes the exit status 1."""
    line = json.dumps({"tokens_per_sec": 1000.0, "micro_batch_size": 4})
    steps = [gpu_check.Step("bench_throughput_mb4", [sys.executable, "-c", f"print('{line}')"],
                            30, "bench.log"),
             gpu_check.Step("bench_throughput_mb8", [sys.executable, "-c", "raise SystemExit(1)"],
                            30, "bench.log")]
    monkeypatch.setattr(gpu_check, "cuda_device", lambda: "a GPU")
    monkeypatch.setattr(gpu_check, "plan", lambda *args: steps)
    assert gpu_check.check(tmp_path, None, budget_s=60) == 1
    summary = json.loads((tmp_path / "summary.json").read_text())
    first, second = (summary["steps"][s.name] for s in steps)
    assert (summary["status"], summary["device"]) == ("incomplete", "a GPU")
    assert first["status"] == "ok" and first["figures"]["tokens_per_sec"] == 1000.0
    assert second["status"] == "failed" and second["figures"] == {}  # not the first's line
    assert all(r["wall_s"] >= 0 and r["log"] == "bench.log" for r in (first, second))


@pytest.mark.parametrize("spec", ["torch==2.11.0", "transformer_engine[pytorch]", "nvidia-nccl-cu13"])
def test_gpu_wheels_never_fetches_the_machines_own_builds(tmp_path, spec):
    proc = subprocess.run(["bash", str(REPO / "tools/gpu_wheels.sh"), str(tmp_path / "w"), spec],
                          env=dict(os.environ, PYTHON=sys.executable), capture_output=True,
                          text=True, timeout=30)
    assert proc.returncode == 2 and "never a wheel" in proc.stderr, proc.stderr
    assert not (tmp_path / "w").exists()  # refused before anything was downloaded
