"""Checkpoints from anywhere never run code: crafted copies of a genuine checkpoint are refused.

Each crafted file holds a pickle that, when unpickled, first creates a marker file and then
returns the genuine data, so an unsafe loader would load it and go on as if nothing happened.
Every load path must stop with exit status 1 and one line naming the file, before the payload
can run. The payloads are built here, from a checkpoint the trainer writes once per module.
"""

from __future__ import annotations

import dataclasses
import io
import operator
import pickle
import shutil
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, run_train, train_env

from megatron_t2i.checkpoint.integrity import write_manifest
from megatron_t2i.checkpoint.layout import CheckpointError
from megatron_t2i.checkpoint.trust import UntrustedCheckpoint, check_before_load

sys.path.insert(0, str(REPO / "tools"))
EXTRA_STATE = "decoder.layers.mlp.linear_fc1._extra_state"


class _RunsCode:
    """Unpickling this creates the marker file: the stand-in for any code an attacker runs."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').close()",)


class _Crafted:
    """Unpickles as `genuine`, after running the payload: the load looks normal."""

    def __init__(self, marker: Path, genuine) -> None:
        self.marker, self.genuine = marker, genuine

    def __reduce__(self):
        return operator.itemgetter(1), ((_RunsCode(self.marker), self.genuine),)


def craft_metadata(folder: Path, marker: Path) -> Path:
    path = folder / ".metadata"
    genuine = pickle.loads(path.read_bytes())  # our own genuine file
    path.write_bytes(pickle.dumps(_Crafted(marker, genuine)))
    return path


def craft_object(folder: Path, marker: Path, fqn: str = EXTRA_STATE) -> Path:
    """A layer's `_extra_state` (loaded by every path) replaced by a crafted one: the new
    bytes are appended to its data file and the metadata points there."""
    md_path = folder / ".metadata"
    metadata = pickle.loads(md_path.read_bytes())
    index = next(k for k in metadata.storage_data if k.fqn.startswith(fqn))
    info = metadata.storage_data[index]
    data = folder / info.relative_path
    raw = data.read_bytes()[info.offset:info.offset + info.length]
    genuine = torch.load(io.BytesIO(raw), weights_only=True)
    crafted = io.BytesIO()
    torch.save(_Crafted(marker, genuine), crafted)
    offset = data.stat().st_size
    with open(data, "ab") as f:
        f.write(crafted.getvalue())
    metadata.storage_data[index] = dataclasses.replace(info, offset=offset,
                                                       length=len(crafted.getvalue()))
    md_path.write_bytes(pickle.dumps(metadata))
    return data


def craft_torch_file(path: Path, marker: Path) -> Path:
    """`common.pt` or a DeepSpeed state file, re-saved with the payload around its content."""
    genuine = torch.load(path, weights_only=False)  # our own genuine file
    torch.save(_Crafted(marker, genuine), path)
    return path


def craft_common(folder: Path, marker: Path) -> Path:
    """The common state: `common.pt` (megatron-core 0.16), else the `common_state` sharded
    object megatron-core 0.17+ keeps inside the DCP files instead."""
    if (folder / "common.pt").is_file():
        return craft_torch_file(folder / "common.pt", marker)
    return craft_object(folder, marker, fqn="common_state")


CRAFT = {
    "metadata": craft_metadata,
    "object": craft_object,
    "common": craft_common,
}


@pytest.fixture(scope="module")
def genuine(tmp_path_factory, corpus_dir) -> Path:
    """A run folder holding one genuine checkpoint (one process, one step)."""
    run_dir = tmp_path_factory.mktemp("genuine")
    run_train(run_dir, corpus_dir, overrides=["train.train_iters=1",
                                              "checkpoint.save_interval=1"])
    return run_dir


def crafted_copy(genuine: Path, tmp_path: Path, payload: str) -> tuple[Path, Path, Path]:
    """(run folder, the crafted file, marker) for a copy of the genuine run."""
    run_dir = tmp_path / "run"
    shutil.copytree(genuine, run_dir)
    marker = tmp_path / "payload-ran"
    folder = run_dir / "checkpoints" / "iter_0000001"
    crafted = CRAFT[payload](folder, marker)
    write_manifest(folder)  # whoever crafts the files can rewrite the checksums too
    return run_dir, crafted, marker


def assert_refused(rc: int, stderr: str, crafted: Path, marker: Path) -> None:
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert rc == 1, stderr[-3000:]
    assert len(errors) == 1 and "Traceback" not in stderr, stderr[-3000:]
    assert str(crafted) in errors[0] and "refused" in errors[0], errors[0]
    assert not marker.exists()


def test_the_payloads_are_live(genuine, tmp_path):
    """Without the checks, the libraries' own loaders run the payload and load normally."""
    run_dir, crafted, marker = crafted_copy(genuine, tmp_path, "metadata")
    from torch.distributed.checkpoint import FileSystemReader

    FileSystemReader(str(crafted.parent)).read_metadata()
    assert marker.exists()
    marker.unlink()
    if (crafted.parent / "common.pt").is_file():  # megatron-core 0.16 (0.17+: an object)
        craft_torch_file(crafted.parent / "common.pt", marker)
        assert isinstance(torch.load(crafted.parent / "common.pt", weights_only=False), dict)
        assert marker.exists()


def test_genuine_and_surgery_output_pass(genuine, tmp_path):
    """The trainer's checkpoint and a tool's output (written by checkpoint/io.py) pass the
    gate; the objects a tool copies reach its output unchanged."""
    import resize_vocab

    from megatron_t2i.checkpoint.io import CheckpointReader

    check_before_load(genuine / "checkpoints" / "iter_0000001")
    assert resize_vocab.main([str(genuine / "checkpoints"), str(tmp_path / "out"),
                              "--image-size", "300"]) == 0
    source, out = CheckpointReader(genuine / "checkpoints"), CheckpointReader(tmp_path / "out")
    keys = [k for k in source.object_keys() if "_extra_state" in k]
    assert keys and all(out.read_object_bytes(k) == source.read_object_bytes(k) for k in keys)


@pytest.mark.parametrize("payload", sorted(CRAFT))
def test_the_gate_names_file_and_class(genuine, tmp_path, payload):
    run_dir, crafted, marker = crafted_copy(genuine, tmp_path, payload)
    folder = run_dir / "checkpoints" / "iter_0000001"
    with pytest.raises(UntrustedCheckpoint, match="operator.itemgetter") as refused:
        check_before_load(folder)
    assert str(crafted) in str(refused.value) and "\n" not in str(refused.value)
    with pytest.raises(CheckpointError, match="refused"):  # the trainer's error type
        check_before_load(folder)
    assert not marker.exists()


def _inspect(ckpt: Path, out: Path) -> int:
    import inspect_checkpoint

    return inspect_checkpoint.main([str(ckpt)])


def _resize(ckpt: Path, out: Path) -> int:
    import resize_vocab

    return resize_vocab.main([str(ckpt), str(out), "--image-size", "300"])


def _export_hf(ckpt: Path, out: Path) -> int:
    import convert_checkpoint

    return convert_checkpoint.main(["export-hf", str(ckpt), str(out)])


def _align(ckpt: Path, out: Path) -> int:
    import contrastive_align

    return contrastive_align.main(["--text-embeddings", str(ckpt), "--data", str(out / "x"),
                                   "--out", str(out)])


def _perplexity(ckpt: Path, out: Path) -> int:
    import eval_perplexity

    return eval_perplexity.main(["--checkpoint", str(ckpt), "--max-samples", "2"])


def _generate(ckpt: Path, out: Path) -> int:
    import generate_images

    return generate_images.main(["--checkpoint", str(ckpt), "--caption", "a", "--out", str(out)])


TOOLS = {"inspect": _inspect, "resize_vocab": _resize, "export_hf": _export_hf,
         "contrastive_align": _align, "eval_perplexity": _perplexity,
         "generate_images": _generate}


@pytest.mark.parametrize("payload", sorted(CRAFT))
@pytest.mark.parametrize("tool", sorted(TOOLS))
def test_tools_refuse_crafted_checkpoints(genuine, tmp_path, capsys, tool, payload):
    run_dir, crafted, marker = crafted_copy(genuine, tmp_path, payload)
    out = tmp_path / "out"
    rc = TOOLS[tool](run_dir / "checkpoints", out)
    assert_refused(rc, capsys.readouterr().err, crafted, marker)
    assert not out.exists()  # resize and export wrote nothing


@pytest.mark.parametrize("how, payload", [("resume", "metadata"), ("pretrained", "object")])
def test_training_refuses_crafted_checkpoints(genuine, tmp_path, corpus_dir, how, payload):
    run_dir, crafted, marker = crafted_copy(genuine, tmp_path, payload)
    if how == "resume":
        proc = run_train(run_dir, corpus_dir, check=False,
                         overrides=["train.train_iters=2", "checkpoint.save_interval=1"])
    else:
        proc = run_train(tmp_path / "fresh", corpus_dir, check=False, overrides=[
            "train.train_iters=2", f"checkpoint.pretrained={run_dir / 'checkpoints'}"])
    assert_refused(proc.returncode, proc.stderr, crafted, marker)


@pytest.mark.slow
def test_deepspeed_resume_refuses_crafted_model_states(tmp_path, corpus_dir):
    pytest.importorskip("deepspeed")
    run_dir = tmp_path / "run"
    env = train_env(TORCH_EXTENSIONS_DIR=str(tmp_path / "ext"))
    engine = ["train.engine=deepspeed", "deepspeed.zero_stage=1"]
    run_train(run_dir, corpus_dir, env=env,
              overrides=engine + ["train.train_iters=1", "checkpoint.save_interval=1"])
    folder = run_dir / "checkpoints" / "iter_0000001"
    check_before_load(folder)  # genuine ZeRO files pass the allowlist
    marker = tmp_path / "payload-ran"
    optim_copy = tmp_path / "optim"  # the optimizer state is checked too
    shutil.copytree(folder, optim_copy)
    optim = craft_torch_file(optim_copy / "zero_pp_rank_0_mp_rank_00_optim_states.pt", marker)
    write_manifest(optim_copy)  # whoever crafts the files can rewrite the checksums too
    with pytest.raises(UntrustedCheckpoint) as refused:
        check_before_load(optim_copy, dcp=False)
    assert str(optim) in str(refused.value) and not marker.exists()
    crafted = craft_torch_file(folder / "mp_rank_00_model_states.pt", marker)
    write_manifest(folder)  # whoever crafts the files can rewrite the checksums too
    proc = run_train(run_dir, corpus_dir, env=env, check=False,
                     overrides=engine + ["train.train_iters=2", "checkpoint.save_interval=1"])
    assert_refused(proc.returncode, proc.stderr, crafted, marker)
