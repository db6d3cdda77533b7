"""The throughput benchmark: its JSON line, its arithmetic, the HF peer's architecture, and
the FLOPs formula checked against the peer's real matmul weights at the 1B config."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
from conftest import REPO, train_env

from megatron_t2i.config import load_config
from megatron_t2i.experiments.bench.hf_peer import PeerUnsupported, build_llama, peer_differences
from megatron_t2i.experiments.bench.throughput import SyntheticT2IDataset, main, synthetic_layout
from megatron_t2i.training.flops import flops_per_iteration

TINY = ["model.num_layers=2", "model.hidden_size=64", "model.num_attention_heads=4",
        "model.num_query_groups=2", "model.seq_length=80", "data.image_tokens_per_sample=64",
        "train.micro_batch_size=2", "train.global_batch_size=4", "optim.lr_warmup_iters=0"]
FIELDS = ("tokens_per_sec", "tflops_per_gpu", "mfu", "peak_memory_gib", "peak_memory_kind",
          "step_time_median_s", "step_time_p10_s", "step_time_p90_s", "step_times_s",
          "parameters", "last_loss")


def run_bench(tmp_path, *args: str, nproc: int = 1) -> subprocess.CompletedProcess:
    launch = ([sys.executable] if nproc == 1 else
              [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={nproc}"])
    cmd = [*launch, str(REPO / "tools/bench_throughput.py"), "--config",
           str(REPO / "configs/demo.yaml"), "--run-dir", str(tmp_path / "run"), *args, *TINY]
    proc = subprocess.run(cmd, cwd=REPO, env=train_env(), capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def test_demo_bench_with_hf_peer_prints_one_consistent_json_line(tmp_path):
    proc = run_bench(tmp_path, "--iters", "2", "--warmup", "1", "--peer", "hf")
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1, proc.stdout  # the trainer's own prints went to stderr
    out = json.loads(lines[0])
    cfg = load_config(REPO / "configs/demo.yaml", TINY)

    assert out["tokens_per_iteration"] == 4 * 80
    assert out["flops_per_iteration"] == flops_per_iteration(cfg.model, 512, 80, 4)
    for side in (out, out["peer"]):
        assert set(FIELDS) <= set(side)
        median = side["step_time_median_s"]
        assert len(side["step_times_s"]) == 2
        assert side["step_time_p10_s"] <= median <= side["step_time_p90_s"]
        assert side["tokens_per_sec"] == pytest.approx(out["tokens_per_iteration"] / median)
        assert side["tflops_per_gpu"] == pytest.approx(
            out["flops_per_iteration"] / median / out["world_size"] / 1e12)
        assert side["mfu"] == pytest.approx(side["tflops_per_gpu"] / out["peak_tflops_per_gpu"])
        assert side["peak_memory_gib"] > 0
        # same objective on the same random tokens: both start near ln(padded vocabulary)
        assert abs(side["last_loss"] - math.log(512)) < 0.5
    assert out["peer"]["parameters"] == out["parameters"]  # same architecture, padded vocab
    assert out["peer"]["differences"] == []
    assert out["tokens_per_sec_vs_peer"] == pytest.approx(
        out["tokens_per_sec"] / out["peer"]["tokens_per_sec"])
    assert out["data"] == "synthetic" and out["num_microbatches"] == 2


def test_engine_bench_under_torchrun_two_processes(tmp_path):
    proc = run_bench(tmp_path, "--iters", "1", "--warmup", "0", nproc=2)
    out = json.loads(proc.stdout.strip())  # rank 0 alone prints
    assert out["world_size"] == 2 and out["num_microbatches"] == 1
    assert out["tflops_per_gpu"] == pytest.approx(
        out["flops_per_iteration"] / out["step_time_median_s"] / 2 / 1e12)
    assert "peer" not in out


def test_peer_is_refused_under_a_multi_process_launch(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["--config", str(REPO / "configs/demo.yaml"), "--peer", "hf"]) == 2
    assert "launch without torchrun" in capsys.readouterr().err


def test_peer_refuses_what_llama_cannot_express():
    cfg = load_config(None, ["model.activation=gelu"])
    with pytest.raises(PeerUnsupported, match="model.activation"):
        peer_differences(cfg.model)
    cfg = load_config(None, ["model.position_embedding_type=learned_absolute"])
    with pytest.raises(PeerUnsupported, match="position_embedding_type"):
        peer_differences(cfg.model)
    assert main(["--config", str(REPO / "configs/demo.yaml"), "--peer", "hf",
                 "model.activation=gelu"]) == 2


def test_1b_peer_and_flops_formula_agree_on_the_matmul_weights():
    """6 FLOPs per matmul weight per token (fwd + bwd) plus the attention terms: the formula
    of training/flops.py against the weights of the LlamaForCausalLM built from the 1B config."""
    cfg = load_config(REPO / "configs/openlm_1b_t2i.yaml")
    m, padded = cfg.model, synthetic_layout(cfg).padded_size(128, 1)
    assert padded == 66_944
    notes = peer_differences(m)
    assert len(notes) == 1 and notes[0].startswith("normalization: ours LayerNorm")
    peer = build_llama(m, padded, torch.bfloat16, "meta")
    h, f, L, V = m.hidden_size, m.resolved_ffn_hidden_size, m.num_layers, padded
    per_layer = 4 * h * h + 3 * h * f + 2 * h  # q, k, v, o; gate, up, down; two RMSNorms
    assert sum(p.numel() for p in peer.parameters()) == 2 * V * h + L * per_layer + h
    matmul_weights = sum(mod.weight.numel() for mod in peer.modules()
                         if isinstance(mod, torch.nn.Linear))  # lm_head in, embedding out
    s, batch = m.seq_length, 8
    tokens = batch * s
    attention = 3 * L * 4 * tokens * s * h  # QK^T and AV, forward + backward
    assert flops_per_iteration(m, padded, s, batch) == 6 * matmul_weights * tokens + attention
    # full recomputation repeats the layers' forward (not the logits')
    layer_weights = matmul_weights - V * h
    assert (flops_per_iteration(m, padded, s, batch, recompute_full=True)
            - flops_per_iteration(m, padded, s, batch)) == 2 * layer_weights * tokens + attention / 3


def test_synthetic_samples_have_the_1b_shapes_and_ranges():
    cfg = load_config(REPO / "configs/openlm_1b_t2i.yaml")
    layout = synthetic_layout(cfg)
    data = SyntheticT2IDataset(layout, 1088, 1024, num_samples=16, seed=3)
    item = data[5]
    assert data.caption_tokens == 62  # 1 + 62 + 1 + 1024 + 1 = 1,089 ids per sample
    tokens, labels = item["tokens"], item["labels"]
    assert tokens.shape == labels.shape == (1088,)
    assert torch.equal(tokens[1:], labels[:-1])
    assert tokens[0] == layout.bos_id and tokens[63] == layout.boi_id
    assert labels[-1] == layout.eoi_id
    assert ((tokens[1:63] >= 0) & (tokens[1:63] < layout.text_size)).all()
    codes = tokens[64:]
    assert ((codes >= layout.image_start) & (codes < layout.specials_start)).all()
    assert item["modality"].sum() == 1024 + 1  # targets after <boi>: the codes and <eoi>
    assert item["loss_mask"].sum() == 1088
    assert torch.equal(data[5]["tokens"], tokens)  # deterministic per index
