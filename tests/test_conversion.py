"""Conversions are exact or refused: HF import refusals checked against transformers' own
behaviour, export as the inverse of import, checkpoint manifests, one-line tool errors.

All in-process on tiny models built by transformers (the logits of imported models are
compared in test_checkpoint_tools.py, which runs the trainer's GPT under torchrun).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from conftest import REPO

from megatron_t2i.checkpoint.convert import import_checkpoint
from megatron_t2i.checkpoint.hf import HFSource, export_hf
from megatron_t2i.checkpoint.integrity import MANIFEST_FILE, read_manifest
from megatron_t2i.checkpoint.io import CheckpointReader
from megatron_t2i.checkpoint.layout import CheckpointError
from megatron_t2i.checkpoint.surgery import resize_vocab
from megatron_t2i.config import ModelConfig
from megatron_t2i.model.keys import model_keys
from megatron_t2i.training import checkpointing
from megatron_t2i.training.loss import present_losses
from megatron_t2i.training.metrics import format_line

transformers = pytest.importorskip("transformers")

VOCAB = 100
IDS = torch.randint(0, VOCAB, (1, 16), generator=torch.Generator().manual_seed(0))


def _config(kind: str = "llama", **overrides):
    base = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                bos_token_id=1, eos_token_id=2, pad_token_id=3, tie_word_embeddings=False)
    base.update(overrides)
    return (transformers.MistralConfig if kind == "mistral" else transformers.LlamaConfig)(**base)


def _save(path: Path, cfg, seed: int = 0):
    torch.manual_seed(seed)
    cls = (transformers.MistralForCausalLM if cfg.model_type == "mistral"
           else transformers.LlamaForCausalLM)
    model = cls(cfg).eval()
    model.save_pretrained(path)
    return model


def _edit_config(path: Path, **changes) -> None:
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg))


def _logits(path: Path) -> torch.Tensor:
    with torch.no_grad():
        return transformers.AutoModelForCausalLM.from_pretrained(path).eval()(IDS).logits


@pytest.fixture(scope="module")
def plain(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("conv") / "plain"
    _save(path, _config())
    return path


# ---- import refuses what it cannot represent ------------------------------------------------

@pytest.mark.parametrize("layout", ["rope_parameters/type", "rope_parameters/rope_type",
                                    "rope_scaling/type", "rope_scaling/rope_type"])
def test_linear_rope_refused_in_every_layout(plain, tmp_path, layout):
    """transformers applies the scaling in each layout (its logits change); import refuses."""
    group, key = layout.split("/")
    path = tmp_path / "linear"
    shutil.copytree(plain, path)
    cfg = json.loads((path / "config.json").read_text())
    cfg.pop("rope_parameters", None)
    cfg[group] = {key: "linear", "factor": 4.0, "rope_theta": 10000.0}
    (path / "config.json").write_text(json.dumps(cfg))
    assert (_logits(path) - _logits(plain)).abs().max() > 1e-3
    with pytest.raises(CheckpointError, match=rf"{group}\.{key}='linear' is not supported"):
        HFSource(path)


def test_mistral_sliding_window_refused(tmp_path):
    windowed = _save(tmp_path / "window", _config("mistral", sliding_window=4))
    full = transformers.MistralForCausalLM(_config("mistral", sliding_window=None)).eval()
    full.load_state_dict(windowed.state_dict())
    with torch.no_grad():  # transformers: the window changes positions from 4 on only
        diff = (windowed(IDS).logits - full(IDS).logits).abs().amax(dim=-1)[0]
    assert diff[:4].max() < 1e-5 and diff[4:].min() > 1e-3
    with pytest.raises(CheckpointError, match="sliding_window=4 is not supported"):
        HFSource(tmp_path / "window")
    _edit_config(tmp_path / "window", sliding_window=None)
    assert HFSource(tmp_path / "window").model.num_query_groups == 2


@pytest.mark.parametrize("change,message", [
    (dict(attention_bias=True), "attention_bias=True is not supported"),
    (dict(partial_rotary_factor=0.5), "partial_rotary_factor=0.5 is not supported"),
    (dict(hidden_act="gelu"), "hidden_act='gelu'"),
    (dict(head_dim=16), "head_dim=16 differs"),
    (dict(pad_token_id=100), r"pad_token_id=100 is outside the vocabulary \[0, 100\)"),
    (dict(eos_token_id=[2, 250]), r"eos_token_id=\[2, 250\] is outside the vocabulary"),
    (dict(bos_token_id=-1), "bos_token_id=-1 is outside"),
])
def test_config_keys_that_change_the_model_are_refused(plain, tmp_path, change, message):
    shutil.copytree(plain, tmp_path / "m")
    _edit_config(tmp_path / "m", **change)
    with pytest.raises(CheckpointError, match=message):
        HFSource(tmp_path / "m")


def _resave(path: Path, src: Path, **tensors) -> None:
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, path)
    state = load_file(src / "model.safetensors")
    state.update(tensors)
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})


@pytest.mark.parametrize("name,rows", [("model.embed_tokens.weight", 90),
                                       ("lm_head.weight", 110)])
def test_vocabulary_tables_of_another_size_refused(plain, tmp_path, name, rows):
    _resave(tmp_path / "m", plain, **{name: torch.zeros(rows, 32)})
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):  # transformers too
        transformers.LlamaForCausalLM.from_pretrained(tmp_path / "m")
    with pytest.raises(CheckpointError,
                       match=rf"model.safetensors: tensor {name} is \[{rows}, 32\], "
                             rf"config.json implies \[100, 32\]"):
        HFSource(tmp_path / "m")


def test_wrong_shape_and_extra_tensors_refused(plain, tmp_path):
    _resave(tmp_path / "q", plain, **{"model.layers.1.self_attn.q_proj.weight":
                                      torch.zeros(16, 32)})
    with pytest.raises(CheckpointError, match=r"layers.1.self_attn.q_proj.weight is "
                                                  r"\[16, 32\], config.json implies \[32, 32\]"):
        HFSource(tmp_path / "q")
    _resave(tmp_path / "b", plain, **{"model.layers.0.self_attn.q_proj.bias": torch.ones(32)})
    with pytest.raises(CheckpointError, match="q_proj.bias .* not part of a plain Llama"):
        HFSource(tmp_path / "b")


def test_openlm_pad_id_outside_the_vocabulary_refused(tmp_path):
    from megatron_t2i.checkpoint.openlm import OpenLMSource

    h, f = 32, 48
    state = {"tok_embeddings.weight": torch.zeros(VOCAB, h), "norm.weight": torch.ones(h),
             "output.weight": torch.zeros(VOCAB, h),
             "layers.0.attention.in_proj.weight": torch.zeros(3 * h, h),
             "layers.0.attention.out_proj.weight": torch.zeros(h, h),
             "layers.0.feed_forward.w12.weight": torch.zeros(2 * f, h),
             "layers.0.feed_forward.w3.weight": torch.zeros(h, f),
             "layers.0.attention_norm.weight": torch.ones(h),
             "layers.0.ffn_norm.weight": torch.ones(h)}
    torch.save({"state_dict": state}, tmp_path / "m.pt")
    src = OpenLMSource(tmp_path / "m.pt", {"n_heads": 4}, pad_id=VOCAB)
    with pytest.raises(CheckpointError, match=r"the pad id 100 is outside the vocabulary"):
        import_checkpoint(src, tmp_path / "out")
    state["layers.0.feed_forward.w3.weight"] = torch.zeros(h, f - 1)
    torch.save({"state_dict": state}, tmp_path / "m.pt")
    with pytest.raises(CheckpointError, match=r"down of layer 0 is \[32, 47\], the "
                                                  r"architecture implies \[32, 48\]"):
        import_checkpoint(OpenLMSource(tmp_path / "m.pt", {"n_heads": 4}), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_model_keys_name_every_role_the_architecture_has():
    """Keys, global shapes and layer stacking as megatron-core's sharded state dict has them;
    a role the architecture lacks (a tied output layer, RMSNorm biases) is absent."""
    layer_norm = model_keys(ModelConfig(num_layers=3, hidden_size=64, ffn_hidden_size=96,
                                        normalization="LayerNorm"), 256)
    shapes = layer_norm.shapes
    assert shapes[layer_norm.key("word_embeddings")] == (256, 64)
    assert shapes[layer_norm.key("output_layer")] == (256, 64)
    assert shapes[layer_norm.key("fc1")] == (3, 192, 64)  # [gate; up] of 3 layers
    assert shapes[layer_norm.key("qkv")] == (3, 192, 64)
    assert {layer_norm.key(r) for r in ("qkv", "fc2", "attn_norm_bias")} <= layer_norm.stacked
    assert layer_norm.key("word_embeddings") not in layer_norm.stacked
    assert len(layer_norm.objects) == 4 * 3  # qkv, proj, fc1, fc2 extra state per layer
    tied = model_keys(ModelConfig(num_layers=3, hidden_size=64,
                                  untie_embeddings_and_output_weights=False), 256)
    assert tied.get("output_layer") is None and tied.get("final_norm_bias") is None
    assert set(tied.shapes) == set(tied.roles.values())


# ---- export is the inverse of import ----------------------------------------------------------

@pytest.mark.parametrize("tied,pad", [(True, None), (False, 3)])
def test_round_trip_is_bit_identical(tmp_path, tied, pad):
    model = _save(tmp_path / "hf", _config(tie_word_embeddings=tied, pad_token_id=pad,
                                           eos_token_id=[2, 5]))
    stats = import_checkpoint(HFSource(tmp_path / "hf"), tmp_path / "imp", divisible_by=32)
    assert stats.extra["layout"].size == VOCAB + (pad is None)  # a <pad> row is added
    export_hf(tmp_path / "imp", tmp_path / "out")
    before = json.loads((tmp_path / "hf/config.json").read_text())
    after = json.loads((tmp_path / "out/config.json").read_text())
    for key in ("vocab_size", "bos_token_id", "eos_token_id", "pad_token_id",
                "tie_word_embeddings", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "rms_norm_eps",
                "max_position_embeddings", "rope_parameters"):
        assert after[key] == before[key], key
    back = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "out")
    mine, theirs = model.state_dict(), back.state_dict()
    assert mine.keys() == theirs.keys()
    for key in mine:
        assert torch.equal(mine[key], theirs[key]), key


def test_export_after_surgery_names_the_added_ids(tmp_path):
    _save(tmp_path / "hf", _config(pad_token_id=None))
    import_checkpoint(HFSource(tmp_path / "hf"), tmp_path / "imp", divisible_by=32)
    resize_vocab(tmp_path / "imp", tmp_path / "grown", 16)
    export_hf(tmp_path / "grown", tmp_path / "out")
    cfg = json.loads((tmp_path / "out/config.json").read_text())
    # 100 text + 16 image + <boi>, <eoi>; the <pad> the import added is dropped again
    assert cfg["vocab_size"] == 118 and cfg["pad_token_id"] is None
    assert cfg["image_token_range"] == [100, 116]
    assert cfg["added_special_token_ids"] == {"<boi>": 116, "<eoi>": 117}
    back = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "out")
    assert back.get_input_embeddings().weight.shape == (118, 32)


# ---- pretrained init checks the architecture --------------------------------------------------

def _meta(**model) -> dict:
    base = dict(num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2,
                ffn_hidden_size=48, untie_embeddings_and_output_weights=True)
    return {"config": {"model": dict(base, **model)}}


@pytest.mark.parametrize("saved_untied,run_untied", [(False, True), (True, False)])
def test_tied_untied_mismatch_refused_both_ways(saved_untied, run_untied):
    run = ModelConfig(**dict(_meta()["config"]["model"],
                             untie_embeddings_and_output_weights=run_untied))
    with pytest.raises(CheckpointError) as err:
        checkpointing.check_architecture(Path("ck"), _meta(
            untie_embeddings_and_output_weights=saved_untied), run)
    want = str(saved_untied).lower()
    assert f"set model.untie_embeddings_and_output_weights={want})" in str(err.value)
    assert "\n" not in str(err.value)
    checkpointing.check_architecture(Path("ck"), _meta(
        untie_embeddings_and_output_weights=run_untied), run)


def test_architecture_check_names_every_differing_key():
    run = ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2,
                      ffn_hidden_size=48)
    with pytest.raises(CheckpointError,
                       match=r"model.num_layers is 4 there, 2 here; model.normalization is "
                             r"\"LayerNorm\" there, \"RMSNorm\" here \(to load it, set "
                             r"model.num_layers=4 model.normalization=\"LayerNorm\"\)"):
        checkpointing.check_architecture(Path("ck"), _meta(num_layers=4,
                                                           normalization="LayerNorm"), run)


# ---- checksums ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def imported(plain, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("imp") / "imp"
    import_checkpoint(HFSource(plain), out, divisible_by=32)
    return out


def _flip_byte_in_a_shard(folder: Path) -> Path:
    shard = max(folder.glob("*.distcp"), key=lambda p: p.stat().st_size)
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    return shard


def test_manifest_lists_every_file(imported):
    folder = imported / "iter_0000000"
    files = read_manifest(folder)
    assert set(files) == {p.name for p in folder.iterdir()} - {MANIFEST_FILE}
    assert all(len(f["hash"]) == 32 for f in files.values())


def test_flipped_byte_refused_on_every_load_path(imported, tmp_path):
    root = tmp_path / "c"
    shutil.copytree(imported, root)
    folder = root / "iter_0000000"
    shard = _flip_byte_in_a_shard(folder)
    message = rf"{shard.name}: contents differ from the checksum recorded at save time"
    with pytest.raises(CheckpointError, match=message):
        CheckpointReader(root)  # inspect, surgery, export, alignment
    for load in (lambda: checkpointing.load_model_weights(folder, [], None, 128),
                 lambda: checkpointing.load_checkpoint(folder, [], None, None, None, 128)):
        with pytest.raises(CheckpointError, match=message):  # trainer and eval
            load()
    from megatron_t2i.eval.loading import load_for_eval

    with pytest.raises(CheckpointError, match=message):  # before any process
        load_for_eval(root)  # group or model exists (evaluation, generation)
    CheckpointReader(root, verify=False)  # hashing skipped: sizes only


def test_truncated_shard_refused_by_size(imported, tmp_path):
    shutil.copytree(imported, tmp_path / "c")
    shard = next((tmp_path / "c/iter_0000000").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match=rf"{shard.name}: \d+ bytes, the "
                                                            r"save recorded \d+ \(truncated"):
        checkpointing.load_model_weights(shard.parent, [], None, 128, verify=False)


def test_checkpoint_without_manifest_loads_with_a_warning(imported, tmp_path, capsys):
    shutil.copytree(imported, tmp_path / "old")
    folder = tmp_path / "old/iter_0000000"
    (folder / MANIFEST_FILE).unlink()
    reader = CheckpointReader(folder)
    assert torch.equal(reader.read("decoder.final_layernorm.weight"),
                       CheckpointReader(imported).read("decoder.final_layernorm.weight"))
    assert "has no manifest.json" in capsys.readouterr().err
    shard = next(folder.glob("*.distcp"))  # the DCP metadata's sizes are still checked
    shard.write_bytes(shard.read_bytes()[:10])
    with pytest.raises(CheckpointError, match=rf"{shard.name}: truncated"):
        checkpointing.load_model_weights(folder, [], None, 128)


# ---- one-line errors in the tools ---------------------------------------------------------

def _convert_tool():
    """tools/convert_checkpoint.py as a module: its main() runs in this process, so a payload
    that escaped would run here."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("convert_tool",
                                                  REPO / "tools/convert_checkpoint.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool


def _evil_pickle(path: Path, marker: Path, payload_key: str) -> None:
    """A torch file whose unpickling would create `marker` (built here, never stored)."""
    import os

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({payload_key: Payload()}, path)


def test_malicious_hf_bin_and_openlm_pt_refused_in_one_line(plain, tmp_path, capsys):
    marker = tmp_path / "MARKER"
    hf = tmp_path / "hf"
    hf.mkdir()
    shutil.copy(plain / "config.json", hf)
    _evil_pickle(hf / "pytorch_model.bin", marker, "model.embed_tokens.weight")
    _evil_pickle(tmp_path / "evil.pt", marker, "tok_embeddings.weight")
    for args in (["import-hf", str(hf), str(tmp_path / "o1")],
                 ["import-openlm", str(tmp_path / "evil.pt"), str(tmp_path / "o2"),
                  "--num-attention-heads", "4"]):
        assert _convert_tool().main(args) == 1
        err = capsys.readouterr().err
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), err
        assert "refused by torch.load(weights_only=True)" in lines[0]
        assert not marker.exists() and not Path(args[2]).exists()


@pytest.mark.parametrize("damage,message", [
    ("config", r"config.json: not valid JSON"),
    ("truncate", r"model.safetensors: not a readable weights file"),
])
def test_tool_errors_name_the_file(plain, tmp_path, capsys, damage, message):
    shutil.copytree(plain, tmp_path / "hf")
    if damage == "config":
        (tmp_path / "hf/config.json").write_text("{not json")
    else:
        f = tmp_path / "hf/model.safetensors"
        f.write_bytes(f.read_bytes()[:100])
    assert _convert_tool().main(["import-hf", str(tmp_path / "hf"), str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    assert re.search(message, err), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # nothing left behind


# ---- losses without tokens --------------------------------------------------------------------

def test_text_only_batch_has_no_image_loss():
    report = present_losses({"loss": 2.0, "loss_text": 2.0, "loss_image": float("nan"),
                             "loss_tokens": 8, "loss_text_tokens": 8, "loss_image_tokens": 0})
    assert "loss_image" not in report and report["loss_image_tokens"] == 0
    assert "image" not in format_line("iter 1", report)
