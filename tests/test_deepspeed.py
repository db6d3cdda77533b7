"""The deepspeed engine (ZeRO 1/2/3) against the megatron engine, on two CPU processes (gloo).

Both engines build the same model from the same seed and read the same global batches, and the
DeepSpeed step is scaled to the megatron engine's per-token mean over the global batch: the
losses may differ only by floating-point reduction order.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import socket
import subprocess
import sys

import pytest
from conftest import REPO, TINY, read_metrics, run_train, train_env

from megatron_t2i.config import ConfigError, deepspeed_config, load_config, validate
from megatron_t2i.train import main

pytest.importorskip("deepspeed")

# two microbatches per rank and step (gradient accumulation), validation at the end
COMMON = ["train.micro_batch_size=2", "train.train_iters=5", "train.eval_interval=5"]
STAGES = {
    "zero1": ["deepspeed.zero_stage=1"],
    "zero2_offload": ["deepspeed.zero_stage=2", "deepspeed.offload_optimizer=true"],
    "zero3": ["deepspeed.zero_stage=3"],
}
LOSSES = ("loss", "loss_text", "loss_image")


@pytest.fixture(scope="module")
def megatron_dp2(tmp_path_factory, corpus_dir):
    run_dir = tmp_path_factory.mktemp("megatron_dp2")
    run_train(run_dir, corpus_dir, nproc=2, overrides=COMMON)
    return run_dir


@pytest.fixture(scope="module")
def deepspeed_run(tmp_path_factory, corpus_dir):
    """Runs of the deepspeed engine by STAGES name, each trained once per module."""
    runs = {}

    def get(name: str):
        if name not in runs:
            run_dir = tmp_path_factory.mktemp(name)
            extensions = run_dir / "torch_extensions"
            run_train(run_dir, corpus_dir, nproc=2,
                      overrides=COMMON + ["train.engine=deepspeed"] + STAGES[name],
                      env=train_env(TORCH_EXTENSIONS_DIR=str(extensions)))
            # no op was JIT-compiled (the CPU shm all-reduce would take ~35 s)
            assert not extensions.exists() or not any(extensions.iterdir())
            runs[name] = run_dir
        return runs[name]

    return get


@pytest.mark.parametrize("name", list(STAGES))
def test_zero_stage_matches_megatron_engine(name, deepspeed_run, megatron_dp2):
    run_dir = deepspeed_run(name)
    got, ref = read_metrics(run_dir), read_metrics(megatron_dp2)
    assert [r["iteration"] for r in got] == [1, 2, 3, 4, 5]
    assert set(got[0]) == set(ref[0])  # the same metric names
    for key in LOSSES:
        assert got[0][key] == pytest.approx(ref[0][key], abs=1e-5), key
        for mine, theirs in zip(got, ref):
            assert mine[key] == pytest.approx(theirs[key], abs=1e-3), (key, mine["iteration"])
    assert got[0]["grad_norm"] == pytest.approx(ref[0]["grad_norm"], rel=1e-4)
    for key in ("lr", "consumed_samples", "loss_tokens", "loss_image_tokens"):
        assert [r[key] for r in got] == pytest.approx([r[key] for r in ref], rel=1e-9), key
    valid, valid_ref = read_metrics(run_dir, "valid"), read_metrics(megatron_dp2, "valid")
    assert valid[0]["loss"] == pytest.approx(valid_ref[0]["loss"], abs=1e-3)
    ckpt = run_dir / "checkpoints"
    assert (ckpt / "latest").read_text().strip() == "5"
    meta = json.loads((ckpt / "iter_0000005" / "meta.json").read_text())
    assert meta["engine"] == "deepspeed" and meta["zero_stage"] == int(STAGES[name][0][-1])
    assert meta["parallel"]["data_parallel_size"] == 2 and meta["consumed_samples"] == 40


def test_zero3_save_and_exact_resume(tmp_path, corpus_dir, deepspeed_run):
    overrides = COMMON + ["train.engine=deepspeed"] + STAGES["zero3"]
    run_train(tmp_path, corpus_dir, nproc=2, overrides=overrides + ["train.exit_interval=2"])
    ckpt = tmp_path / "checkpoints"
    assert (ckpt / "latest").read_text().strip() == "2"
    assert sorted(p.name for p in (ckpt / "iter_0000002").glob("*optim_states.pt")) == [
        "zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    proc = run_train(tmp_path, corpus_dir, nproc=2, overrides=overrides)  # the same command
    assert "resumed from" in proc.stdout and "iter_0000002" in proc.stdout
    resumed, uninterrupted = read_metrics(tmp_path), read_metrics(deepspeed_run("zero3"))
    assert [r["iteration"] for r in resumed] == [1, 2, 3, 4, 5]
    # bit-for-bit on the CPU: weights, ZeRO optimizer partitions, LR schedule, data position
    for key in LOSSES + ("lr", "grad_norm", "consumed_samples"):
        assert [r[key] for r in resumed[2:]] == [r[key] for r in uninterrupted[2:]], key
    assert read_metrics(tmp_path, "valid")[-1]["loss"] == \
        read_metrics(deepspeed_run("zero3"), "valid")[-1]["loss"]
    assert not (ckpt / "iter_0000005.tmp").exists()


@pytest.mark.parametrize("saved,engine", [("deepspeed", "megatron"), ("megatron", "deepspeed")])
def test_engines_refuse_each_others_checkpoints(saved, engine, tmp_path, corpus_dir,
                                                deepspeed_run, megatron_dp2):
    source = deepspeed_run("zero1") if saved == "deepspeed" else megatron_dp2
    shutil.copytree(source / "checkpoints", tmp_path / "checkpoints")
    proc = run_train(tmp_path, corpus_dir, check=False,  # one process
                     overrides=COMMON + ["train.train_iters=6", f"train.engine={engine}"])
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert f"written by the {saved} engine" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_deepspeed_launcher_bf16(tmp_path, corpus_dir):
    """DeepSpeed's own launcher (it appends --local_rank=N to each process's arguments) on this
    node; bf16. (A hostfile, even of localhost alone, makes it reach the hosts over ssh.)"""
    env = train_env(NPROC="2", PYTHON=sys.executable, MASTER_PORT=str(_free_port()))
    cmd = ["bash", str(REPO / "launch/deepspeed_local.sh"), "--config",
           str(REPO / "configs/demo.yaml"), *TINY, f"train.run_dir={tmp_path / 'run'}",
           f"data.cache_dir={corpus_dir}", "train.precision=bf16", "deepspeed.zero_stage=2"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    got = read_metrics(tmp_path / "run")
    assert [r["iteration"] for r in got] == [1, 2, 3]
    assert all(math.isfinite(r["loss"]) for r in got)
    assert got[-1]["loss"] < got[0]["loss"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


# ---- configuration: generated DeepSpeed JSON and refusals (no processes) ----------------------

def _cfg(tmp_path, overrides, user_json=None):
    extra = []
    if user_json is not None:
        path = tmp_path / "ds.json"
        path.write_text(user_json if isinstance(user_json, str) else json.dumps(user_json))
        extra = [f"deepspeed.config_json={path}"]
    return load_config(REPO / "configs/demo.yaml", ["train.engine=deepspeed", "train.device=cpu",
                                                    *overrides, *extra])


def test_generated_config_follows_the_project_config(tmp_path):
    cfg = _cfg(tmp_path, ["train.micro_batch_size=2", "train.global_batch_size=16",
                          "train.precision=bf16", "optim.clip_grad=0.5",
                          "deepspeed.zero_stage=3", "deepspeed.offload_optimizer=true"],
               {"zero_optimization": {"overlap_comm": True, "stage": 3},
                "steps_per_print": 10})
    validate(cfg, world_size=2)
    ds = deepspeed_config(cfg, world_size=2, on_cuda=False)
    assert ds["train_batch_size"] == 16 and ds["train_micro_batch_size_per_gpu"] == 2
    assert ds["gradient_accumulation_steps"] == 4 and ds["gradient_clipping"] == 0.5
    assert ds["bf16"] == {"enabled": True}
    assert ds["zero_optimization"] == {"stage": 3, "offload_optimizer": {"device": "cpu"},
                                       "overlap_comm": True}
    assert ds["steps_per_print"] == 10  # a default the user JSON may change
    assert "optimizer" not in ds and "scheduler" not in ds


REFUSED = {
    "tensor_parallel": (["parallel.tensor_model_parallel_size=2"], None,
                        "without tensor or pipeline parallelism"),
    "pipeline_parallel": (["parallel.pipeline_model_parallel_size=2"], None,
                          "parallel.pipeline_model_parallel_size=2"),
    "virtual_pipeline": (["parallel.pipeline_model_parallel_size=2",
                          "parallel.virtual_pipeline_model_parallel_size=2"], None,
                         "pipeline_model_parallel_size=2"),
    "distributed_optimizer": (["parallel.use_distributed_optimizer=true"], None,
                              "belongs to the megatron engine"),
    "zero_stage": (["deepspeed.zero_stage=0"], None, "expected 1, 2 or 3"),
    "no_optimizer_in_checkpoints": (["checkpoint.save_optimizer=false"], None,
                                    "optimizer partitions"),
    "nan_policy_skip": (["train.nan_policy=skip"], None, "train.nan_policy=skip needs the "
                                                          "megatron engine"),
    "freeze": (["model.freeze=[attention]"], None, "model.freeze"),
    "async_save": (["checkpoint.async_save=true"], None,
                   "checkpoint.async_save=true needs the megatron engine"),
    "fp16_on_cpu": ([], {"fp16": {"enabled": True}}, "cannot run fp16 on the CPU"),
    "disagreeing_key": ([], {"gradient_clipping": 0.5},
                        "gradient_clipping=0.5 disagrees with the value 1.0 generated from "
                        "optim.clip_grad"),
    "disagreeing_stage": ([], {"zero_optimization": {"stage": 2}},
                          "deepspeed.zero_stage"),
    "optimizer_section": ([], {"optimizer": {"type": "Adam"}}, "set optim.* instead"),
    "scheduler_section": ([], {"scheduler": {"type": "WarmupLR"}}, "OptimizerParamScheduler"),
    "json_not_an_object": ([], "[1, 2]", "must hold a JSON object"),
    "json_invalid": ([], "{not json", "is not valid JSON"),
}


@pytest.mark.parametrize("name", list(REFUSED))
def test_refused_combinations(name, tmp_path):
    overrides, user_json, message = REFUSED[name]
    world = 4 if len(overrides) > 1 else 2
    with pytest.raises(ConfigError, match=re.escape(message)):
        validate(_cfg(tmp_path, overrides, user_json), world_size=world)


def test_refusal_exits_with_status_2_before_any_process_group(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    code = main(["--config", str(REPO / "configs/demo.yaml"), "train.engine=deepspeed",
                 f"train.run_dir={tmp_path}", "parallel.tensor_model_parallel_size=2"])
    assert code == 2
    err = capsys.readouterr().err
    assert "train.engine=deepspeed" in err and "tensor_model_parallel_size=2" in err
    assert not any(tmp_path.iterdir())  # refused before the run directory was made
