"""model.freeze: frozen parameters do not change, get no optimizer state, and the logged
parameter counts say what trains (single process, TP=2, PP=2, and through the CLI with a save
and a resume)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, TINY, read_metrics, run_train, train_env

from megatron_t2i.checkpoint.io import CheckpointReader
from megatron_t2i.config import ConfigError, load_config, validate

SCRIPT = REPO / "tests/scripts/freeze_steps.py"
HIDDEN, PADDED_VOCAB, TEXT_VOCAB = 64, 512, 128  # the tiny config: 128 text + 256 image ids
TABLE = HIDDEN * PADDED_VOCAB  # one vocabulary-sized table


def run_steps(tmp_path: Path, corpus: Path, settings: list[str], nproc: int = 1,
              overrides: tuple[str, ...] = ()) -> list[dict]:
    args = [str(SCRIPT), "--config", str(REPO / "configs/demo.yaml"),
            *(f"--freeze={s}" for s in settings), *TINY, f"train.run_dir={tmp_path}",
            f"data.cache_dir={corpus}", *overrides]
    cmd = [sys.executable, *args] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        f"--nproc_per_node={nproc}", *args]
    proc = subprocess.run(cmd, cwd=REPO, env=train_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return [json.loads((tmp_path / (s or "none") / f"result.rank{rank}.json").read_text())
            for s in settings for rank in range(nproc)]


def counts(run_dir: Path, setting: str) -> dict:
    return json.loads((run_dir / (setting or "none") / "parameters.json").read_text())


def test_every_group_freezes_alone_single_process(tmp_path, corpus_dir):
    settings = ["", "embeddings", "output_layer", "attention", "mlp", "norms", "transformer",
                "text_rows", "attention,mlp,text_rows"]
    run_steps(tmp_path, corpus_dir, settings)
    total = counts(tmp_path, "")["total"]
    assert counts(tmp_path, "")["frozen"] == 0 and counts(tmp_path, "")["trainable"] == total
    frozen = {s: counts(tmp_path, s)["frozen"] for s in settings}
    groups = counts(tmp_path, "")["groups"]
    assert frozen["embeddings"] == frozen["output_layer"] == TABLE
    assert frozen["text_rows"] == 2 * TEXT_VOCAB * HIDDEN
    assert frozen["transformer"] == total - 2 * TABLE  # only embeddings and output layer train
    for group in ("attention", "mlp", "norms"):
        assert frozen[group] == groups[group]["trainable"] > 0
    assert frozen["attention,mlp,text_rows"] == (groups["attention"]["trainable"]
                                                + groups["mlp"]["trainable"]
                                                + 2 * TEXT_VOCAB * HIDDEN)
    for s in settings:
        c = counts(tmp_path, s)
        assert c["trainable"] + c["frozen"] == total and c["freeze"] == [g for g in s.split(",")
                                                                          if g]


def test_text_rows_under_tensor_parallel(tmp_path, corpus_dir):
    """Each TP rank holds half the vocabulary: rank 0 the text rows, rank 1 none."""
    results = run_steps(tmp_path, corpus_dir, ["text_rows"], nproc=2,
                        overrides=("parallel.tensor_model_parallel_size=2",))
    rows = {r["rank"]: r["frozen_rows"] for r in results}
    assert rows[0] == {"embedding.word_embeddings.weight": [0, TEXT_VOCAB],
                       "output_layer.weight": [0, TEXT_VOCAB]}
    assert rows[1] == {}
    c = counts(tmp_path, "text_rows")
    assert c["frozen"] == 2 * TEXT_VOCAB * HIDDEN
    assert c["groups"]["norms"]["trainable"] > 0


def test_pipeline_stage_with_nothing_to_train(tmp_path, corpus_dir):
    """PP=2, only the output layer trains: the first stage holds no trainable parameter."""
    results = run_steps(tmp_path, corpus_dir, ["embeddings,transformer"], nproc=2,
                        overrides=("parallel.pipeline_model_parallel_size=2",))
    by_rank = {r["rank"]: r for r in results}
    assert by_rank[0]["trainable_params"] == 0 and by_rank[0]["optimizer_states"] == 0
    assert by_rank[1]["trainable_params"] == 1  # output_layer.weight
    c = counts(tmp_path, "embeddings,transformer")
    assert c["trainable"] == TABLE and c["groups"]["output_layer"]["trainable"] == TABLE


def test_frozen_run_saves_and_resumes(tmp_path, corpus_dir):
    """Through the CLI: frozen tensors are equal in every saved checkpoint, trained ones are
    not, and a resumed run loads the optimizer state of the trainable parameters only."""
    freeze = ["model.freeze=[attention,text_rows]"]  # saves at the end of each run
    run_train(tmp_path, corpus_dir, overrides=[*freeze, "train.train_iters=1"])
    resumed = run_train(tmp_path, corpus_dir, overrides=[*freeze, "train.train_iters=3"])
    assert "resumed from" in resumed.stdout
    assert [r["iteration"] for r in read_metrics(tmp_path)] == [1, 2, 3]
    first = CheckpointReader(tmp_path / "checkpoints/iter_0000001")
    last = CheckpointReader(tmp_path / "checkpoints/iter_0000003")
    qkv = "decoder.layers.self_attention.linear_qkv.weight"
    assert torch.equal(first.read(qkv), last.read(qkv))
    fc1 = "decoder.layers.mlp.linear_fc1.weight"
    assert not torch.equal(first.read(fc1), last.read(fc1))
    for key in ("embedding.word_embeddings.weight", "output_layer.weight"):
        a, b = first.read(key), last.read(key)
        assert torch.equal(a[:TEXT_VOCAB], b[:TEXT_VOCAB]), key
        assert not torch.equal(a[TEXT_VOCAB:], b[TEXT_VOCAB:]), key


@pytest.mark.parametrize("freeze, message", [
    ("[attn]", "unknown group 'attn' (did you mean attention?)"),
    ("[mlp, mlp]", "names a group twice"),
    ("[embeddings, output_layer, transformer]", "nothing would train"),
])
def test_bad_freeze_refused(freeze, message):
    cfg = load_config(REPO / "configs/demo.yaml", [f"model.freeze={freeze}"])
    with pytest.raises(ConfigError, match=re.escape(message)):
        validate(cfg, world_size=1)


def test_tied_embeddings_freeze_together():
    cfg = load_config(REPO / "configs/demo.yaml", [
        "model.freeze=[embeddings]", "model.untie_embeddings_and_output_weights=false"])
    with pytest.raises(ConfigError, match="freeze 'embeddings' and 'output_layer' together"):
        validate(cfg, world_size=1)

