"""Checkpoint tools: HF / OpenLM import and HF export, vocabulary surgery, inspect, safety.

The logits come from the trainer's own model (tests/scripts/ckpt_model.py under torchrun, TP
over gloo); the source checkpoints of the surgery are saved by the trainer's save_checkpoint.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, read_metrics, run_train, train_env

from megatron_t2i.checkpoint.convert import import_checkpoint
from megatron_t2i.checkpoint.hf import HFSource, export_hf
from megatron_t2i.checkpoint.inspect import describe, format_report
from megatron_t2i.checkpoint.integrity import write_manifest
from megatron_t2i.checkpoint.io import (
    CheckpointReader,
    Chunk,
    TensorSpec,
    layer_chunks,
    write_checkpoint,
)
from megatron_t2i.checkpoint.layout import CheckpointError, staged_output
from megatron_t2i.checkpoint.openlm import OpenLMSource
from megatron_t2i.checkpoint.surgery import resize_vocab
from megatron_t2i.config import ModelConfig
from megatron_t2i.model.keys import model_keys, vocab_table_keys
from megatron_t2i.vocab import VocabLayout

transformers = pytest.importorskip("transformers")

SCRIPT = REPO / "tests/scripts/ckpt_model.py"
EMBED, OUTPUT = vocab_table_keys()
FC1 = model_keys(ModelConfig()).key("fc1")
# the demo corpus's text tokenizer: 128 ids, bos 1, eos 2, pad 3
TEXT = VocabLayout(text_size=128, image_size=0, bos_id=1, eod_id=2, added_specials=(),
                   text_pad_id=3)
MODEL = ["model.num_layers=4", "model.hidden_size=64", "model.num_attention_heads=4",
         "model.seq_length=80", "model.make_vocab_size_divisible_by=48"]
IMAGE = 256  # the demo's codebook, so the result trains on the demo corpus


def _torchrun(*args: str, timeout: float = 240) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(SCRIPT), *args]
    proc = subprocess.run(cmd, cwd=REPO, env=train_env(), capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]


def _tiny_llama(path: Path, kv_heads: int, seed: int, rope_theta: float):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=100, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=kv_heads, rms_norm_eps=1e-6,
        rope_theta=rope_theta, max_position_embeddings=64, bos_token_id=1, eos_token_id=2,
        pad_token_id=3, tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # norms away from one, so a misplaced norm weight shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    model.save_pretrained(path)
    return model


def _openlm_file(model, path: Path) -> None:
    """The same weights under OpenLM's names (fused in_proj and w12), as open_lm saves."""
    sd = model.state_dict()
    out = {"tok_embeddings.weight": sd["model.embed_tokens.weight"],
           "norm.weight": sd["model.norm.weight"], "output.weight": sd["lm_head.weight"]}
    for i in range(model.config.num_hidden_layers):
        p = f"model.layers.{i}."
        out[f"layers.{i}.attention.in_proj.weight"] = torch.cat(
            [sd[p + f"self_attn.{n}_proj.weight"] for n in "qkv"])
        out[f"layers.{i}.attention.out_proj.weight"] = sd[p + "self_attn.o_proj.weight"]
        out[f"layers.{i}.feed_forward.w12.weight"] = torch.cat(
            [sd[p + "mlp.gate_proj.weight"], sd[p + "mlp.up_proj.weight"]])
        out[f"layers.{i}.feed_forward.w3.weight"] = sd[p + "mlp.down_proj.weight"]
        out[f"layers.{i}.attention_norm.weight"] = sd[p + "input_layernorm.weight"]
        out[f"layers.{i}.ffn_norm.weight"] = sd[p + "post_attention_layernorm.weight"]
    torch.save({"epoch": 1, "state_dict": {f"module.{k}": v for k, v in out.items()}}, path)


def _tree_digest(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        h.update(str(p.relative_to(folder)).encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """Everything the tests look at, built with two torchrun launches."""
    d = tmp_path_factory.mktemp("ckpt_tools")
    w = {"dir": d}
    w["llama"] = _tiny_llama(d / "hf", kv_heads=2, seed=0, rope_theta=500000.0)
    # OpenLM: every head its own key/value, RoPE base 10000
    mha = _tiny_llama(d / "hf_mha", kv_heads=4, seed=1, rope_theta=10000.0)
    w["mha"] = mha
    _openlm_file(mha, d / "openlm.pt")
    import_checkpoint(HFSource(d / "hf"), d / "imp1", tensor_parallel=1, divisible_by=32)
    import_checkpoint(HFSource(d / "hf"), d / "imp2", tensor_parallel=2, divisible_by=32)
    import_checkpoint(OpenLMSource(d / "openlm.pt", {"n_heads": 4, "norm_eps": 1e-6},
                                   norm="rms_norm", bos_id=1, eod_id=2, pad_id=3),
                      d / "openlm", tensor_parallel=2, divisible_by=32)
    export_hf(d / "imp2", d / "exported")
    # Mistral without a sliding window is a Llama: imported exactly
    torch.manual_seed(2)
    w["mistral"] = transformers.MistralForCausalLM(transformers.MistralConfig(
        vocab_size=100, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=64,
        sliding_window=None, bos_token_id=1, eos_token_id=2, pad_token_id=None)).eval()
    w["mistral"].save_pretrained(d / "hf_mistral")
    import_checkpoint(HFSource(d / "hf_mistral"), d / "mistral", divisible_by=32)

    TEXT.save(d / "text_layout.json")
    _torchrun("make", str(d / "text_layout.json"), f"{d / 'src2'}:2,{d / 'src1'}:1", *MODEL)
    w["src_digest"] = _tree_digest(d / "src2")
    image_rows = torch.randn(IMAGE, 64, generator=torch.Generator().manual_seed(3))
    torch.save({"word_embeddings": image_rows}, d / "rows.pt")
    w["file_rows"] = image_rows
    resize_vocab(d / "src2", d / "r21", IMAGE, tensor_parallel=1, init="normal")
    resize_vocab(d / "src1", d / "r12", IMAGE, tensor_parallel=2, init="mean_std",
                 keep_optimizer=True)
    resize_vocab(d / "src2", d / "r24", IMAGE, tensor_parallel=4, init="file",
                 init_file=d / "rows.pt")

    ids = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(1))
    torch.save(ids, d / "ids.pt")
    w["ids"] = ids
    jobs = ["imp1:1", "imp2:2", "openlm:1", "mistral:1", "src2:2", "r21:1", "src1:1", "r12:2",
            "r24:2"]
    _torchrun("logits", str(d / "logits.pt"), str(d / "ids.pt"), *[f"{d / j}" for j in jobs])
    w["logits"] = {Path(k).name: v for k, v in torch.load(d / "logits.pt").items()}
    return w


# ---- import / export ---------------------------------------------------------------------------

@pytest.mark.parametrize("job", ["imp1:1", "imp2:2"])
def test_hf_import_gives_hf_logits(work, job):
    with torch.no_grad():
        ref = work["llama"](work["ids"]).logits
    ours = work["logits"][job]
    assert ours.shape[-1] == 128  # 100 ids padded to a multiple of 32 x TP
    torch.testing.assert_close(ours[..., :100], ref, atol=1e-5, rtol=0)


def test_openlm_import_gives_same_logits(work):
    with torch.no_grad():
        ref = work["mha"](work["ids"]).logits
    torch.testing.assert_close(work["logits"]["openlm:1"][..., :100], ref, atol=1e-5, rtol=0)


def test_mistral_without_window_gives_hf_logits(work):
    with torch.no_grad():
        ref = work["mistral"](work["ids"]).logits
    ours = work["logits"]["mistral:1"]
    assert ours.shape[-1] == 128  # 100 ids + <pad> (the config has no pad id), padded
    torch.testing.assert_close(ours[..., :100], ref, atol=1e-5, rtol=0)


def test_hf_export_round_trips(work):
    back = transformers.LlamaForCausalLM.from_pretrained(work["dir"] / "exported")
    mine, theirs = work["llama"].state_dict(), back.state_dict()
    assert mine.keys() == theirs.keys()
    for key in mine:
        assert torch.equal(mine[key], theirs[key]), key
    assert back.config.rms_norm_eps == 1e-6
    assert back.config.rope_parameters["rope_theta"] == 500000.0


def test_imported_checkpoint_meta(work):
    meta = CheckpointReader(work["dir"] / "imp2").meta
    assert meta["vocab"]["text_size"] == 100 and meta["padded_vocab_size"] == 128
    m = meta["config"]["model"]
    assert (m["num_query_groups"], m["norm_epsilon"], m["rotary_base"]) == (2, 1e-6, 500000)
    assert meta["has_optimizer"] is False and meta["iteration"] == 0


def test_key_names_are_the_trainers(work):
    """model/keys.py's names and global shapes are exactly what the trainer's save wrote (TP=2
    and TP=1), and an import of the same architecture writes the same keys."""
    for name in ("src1", "src2"):
        reader = CheckpointReader(work["dir"] / name)
        model = ModelConfig(**{k: v for k, v in reader.meta["config"]["model"].items()
                               if k in ModelConfig.__dataclass_fields__})
        keys = model_keys(model, reader.meta["padded_vocab_size"])
        saved = {k: reader.spec(k).shape for k in reader.tensor_keys()
                 if not k.startswith("optimizer")}
        assert saved == keys.shapes, name
        assert set(keys.objects) <= set(reader.object_keys()), name
        assert EMBED in saved and OUTPUT in saved and keys.key("fc1") == FC1
    imported = CheckpointReader(work["dir"] / "imp2")
    keys = model_keys(ModelConfig(**{k: v for k, v in imported.meta["config"]["model"].items()
                                     if k in ModelConfig.__dataclass_fields__}), 128)
    assert set(imported.tensor_keys()) == set(keys.shapes)
    assert set(imported.object_keys()) == set(keys.objects)


# ---- surgery -----------------------------------------------------------------------------------

@pytest.mark.parametrize("before,after,padded", [("src2:2", "r21:1", 432), ("src1:1", "r12:2", 480),
                                                 ("src2:2", "r24:2", 576)])
def test_surgery_keeps_text_logits(work, before, after, padded):
    old, new = work["logits"][before], work["logits"][after]
    assert new.shape[-1] == padded  # 386 ids padded to a multiple of 48 x TP
    torch.testing.assert_close(new[..., :128], old[..., :128], atol=1e-5, rtol=0)
    targets = work["ids"][:, 1:].reshape(-1)

    def ce(logits):
        return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                 targets)

    assert abs(ce(new[..., :128]) - ce(old[..., :128])) < 1e-5  # loss over the text ids
    # the full loss moves only by the probability mass the non-text rows take
    mass = (new.logsumexp(-1) - new[..., :128].logsumexp(-1))[:, :-1].mean()
    assert abs(ce(new) - ce(new[..., :128]) - mass) < 1e-5


def test_surgery_tables(work):
    d = work["dir"]
    src = CheckpointReader(d / "src2")
    layout = VocabLayout.from_dict(CheckpointReader(d / "r21").meta["vocab"])
    assert (layout.image_start, layout.boi_id, layout.eoi_id, layout.size) == (128, 384, 385, 386)
    for out, padded in (("r21", 432), ("r24", 576)):
        reader = CheckpointReader(d / out)
        assert reader.meta["padded_vocab_size"] == padded
        for key in (EMBED, OUTPUT):
            old, new = src.read(key), reader.read(key)
            assert new.shape == (padded, 64)
            assert torch.equal(new[:128], old[:128])  # text rows bit-identical
            assert not new[386:].any()  # old padding rows gone, new padding zero
    normal = CheckpointReader(d / "r21").read(EMBED)[128:386]
    assert abs(normal.std().item() - 0.02) < 0.002 and abs(normal.mean().item()) < 0.002
    from_file = CheckpointReader(d / "r24").read(EMBED)
    assert torch.equal(from_file[128:384], work["file_rows"])
    src1_out = CheckpointReader(d / "src1").read(OUTPUT)[:128]
    mean_std = CheckpointReader(d / "r12").read(OUTPUT)[128:386]
    tol = 5 * src1_out.std(0).max() / math.sqrt(258)
    assert (mean_std.mean(0) - src1_out.mean(0)).abs().max() < tol


def test_surgery_optimizer_dropped_or_grown(work):
    d = work["dir"]
    dropped = describe(d / "r21")
    assert not dropped["has_optimizer"] and not CheckpointReader(d / "r21").meta["has_optimizer"]
    grown, src = CheckpointReader(d / "r12"), CheckpointReader(d / "src1")
    assert grown.meta["has_optimizer"]
    for key in (f"optimizer.state.exp_avg.{EMBED}", f"optimizer.state.exp_avg_sq.{OUTPUT}"):
        old, new = src.read(key), grown.read(key)
        assert torch.equal(new[:128], old[:128]) and not new[128:].any()


def test_surgery_result_trains(work, corpus_dir, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(work["dir"] / "r12", ckpt)
    proc = run_train(tmp_path / "run", corpus_dir, nproc=2,
                     overrides=["parallel.tensor_model_parallel_size=2",
                                f"checkpoint.dir={ckpt}"])
    assert "resumed from" in proc.stdout
    records = read_metrics(tmp_path / "run")
    assert [r["iteration"] for r in records] == [2, 3]
    assert all(math.isfinite(r["loss"]) and r["loss_image_tokens"] > 0 for r in records)


def test_pretrained_of_another_tying_refused_in_one_line(work, corpus_dir, tmp_path):
    """An untied checkpoint given to a tied run: one line naming the key and the fix (it
    used to run and silently drop the trained output layer; the reverse was a KeyError)."""
    proc = run_train(tmp_path / "run", corpus_dir, check=False,
                     overrides=[f"checkpoint.pretrained={work['dir'] / 'r21'}",
                                "model.untie_embeddings_and_output_weights=false"])
    assert proc.returncode == 1, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: checkpoint ") and "Traceback" not in proc.stderr
    assert "model.untie_embeddings_and_output_weights is true there, false here" in last
    assert "(to load it, set model.untie_embeddings_and_output_weights=true)" in last


def test_surgery_streams_the_sources_chunks(work):
    """The trainer stores each layer's TP slice as its own chunk; surgery copies every chunk
    as it is (that is what keeps its memory to the vocabulary tables), so the output reads
    back bit-identical, whole and chunk by chunk."""
    src, out = CheckpointReader(work["dir"] / "src2"), CheckpointReader(work["dir"] / "r21")
    assert len(src.chunks(FC1)) == 4 * 4  # 4 layers x [gate; up] halves x TP=2
    for key in src.tensor_keys():
        if key.startswith("optimizer") or key in (EMBED, OUTPUT):
            continue
        assert out.chunks(key) == src.chunks(key), key
        full = out.read(key)
        assert torch.equal(full, src.read(key)), key
        for chunk in out.chunks(key):
            assert torch.equal(out.read(key, chunk), full[chunk.index()]), (key, chunk)
    region = Chunk((1, 10, 3), (2, 300, 50))  # across stored chunks
    assert torch.equal(src.read(FC1, region), src.read(FC1)[region.index()])
    with pytest.raises(CheckpointError, match="cannot read the region"):
        src.read(FC1, Chunk((3, 0, 0), (2, 384, 64)))


def _megatron_load(folder: Path, split_factories: bool = False,
                   rng: bool = False) -> tuple[dict, dict]:
    """What megatron-core's own dist_checkpointing.load gives the trainer's model (TP=1, in
    this process): every model tensor and extra state, the RNG object and the common state;
    and the sharded state dict it loaded (`split_factories`: the SwiGLU fc1 as its pieces)."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedObject, apply_factories

    from megatron_t2i.config import Config
    from megatron_t2i.model.gpt import build_model_chunks

    meta = json.loads((folder / "meta.json").read_text())
    cfg = Config()
    cfg.model = ModelConfig(**{k: v for k, v in meta["config"]["model"].items()
                               if k in ModelConfig.__dataclass_fields__})
    chunk = build_model_chunks(cfg, meta["padded_vocab_size"], on_cuda=False)[0]
    sharded = {"model": chunk.sharded_state_dict()}
    if split_factories:
        apply_factories(sharded)
    if rng:  # saved at TP=1, PP=1
        sharded["rng_state"] = ShardedObject("rng_state", None, (1, 1), (0, 0), replica_id=0)
    plan = copy.copy(sharded["model"])
    return dist_checkpointing.load(sharded, str(folder)), plan


def _assert_same(a, b, where: str = "") -> None:
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for k in a:
            _assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b), where
    else:
        assert a == b, where


def _assert_read_as(plan, loaded, reader: CheckpointReader, seen: set) -> None:
    """Each loaded piece equals the region of its key that our reader reads."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    if isinstance(plan, dict):
        for k in plan:
            _assert_read_as(plan[k], loaded[k], reader, seen)
    elif isinstance(plan, (list, tuple)):
        for p, v in zip(plan, loaded):
            _assert_read_as(p, v, reader, seen)
    elif isinstance(plan, ShardedTensor):
        region = Chunk(tuple(plan.global_offset),
                       (1,) * plan.prepend_axis_num + tuple(plan.local_shape))
        want = reader.read(plan.key, region).reshape(plan.local_shape)
        assert torch.equal(loaded, want), (reader.folder, plan.key, region)
        seen.add(plan.key)


def test_megatron_core_reads_the_streaming_writer_as_its_own(work, tmp_path):
    """checkpoint/io.py's writer is a second writer of dist_checkpointing's torch_dist format:
    a trainer checkpoint rewritten by it (every tensor chunk and object as stored) loads
    through megatron-core's own dist_checkpointing.load bit-identically to the original, all
    keys; the import's and the surgery's outputs load as our reader reads them, all keys."""
    from conftest import world_of_one

    d = work["dir"]
    src = CheckpointReader(d / "src1")
    entries = {k: src.spec(k) for k in src.tensor_keys()}
    entries.update({k: src.read_object_bytes(k) for k in src.object_keys()})
    copied = tmp_path / "iter_0000001"
    write_checkpoint(copied, entries, None, src.common(), src.meta, produce_chunk=src.read)
    with world_of_one():
        original = _megatron_load(src.folder, rng=True)[0]
        _assert_same(original, _megatron_load(copied, rng=True)[0])
        assert original["iteration"] == 1 and "rng_state" in original
        for name in ("imp1", "r21"):
            reader = CheckpointReader(d / name)
            loaded, plan = _megatron_load(reader.folder, split_factories=True)
            seen: set[str] = set()
            _assert_read_as(plan, loaded["model"], reader, seen)
            assert seen == set(reader.tensor_keys()), name


def test_written_checkpoints_are_layer_chunked(work, tmp_path):
    """write_checkpoint stores layer-stacked tensors one layer per chunk (as the trainer
    does), asking a whole-tensor producer once per tensor; imports are written so too."""
    assert len(CheckpointReader(work["dir"] / "imp2").chunks(FC1)) == 2  # 2 layers
    tensors = {FC1: torch.randn(3, 8, 4), EMBED: torch.randn(16, 4)}
    calls = []

    def produce(key):
        calls.append(key)
        return tensors[key]

    entries = {FC1: TensorSpec((3, 8, 4), torch.float32, layer_chunks((3, 8, 4))),
               EMBED: TensorSpec((16, 4), torch.float32)}
    write_checkpoint(tmp_path / "iter_0000000", entries, produce, {}, {"iteration": 0})
    reader = CheckpointReader(tmp_path / "iter_0000000")
    assert calls == [FC1, EMBED]
    assert reader.chunks(FC1) == [((i, 0, 0), (1, 8, 4)) for i in range(3)]
    assert reader.chunks(EMBED) == [((0, 0), (16, 4))]
    for key, tensor in tensors.items():
        assert torch.equal(reader.read(key), tensor)
    assert torch.equal(reader.read(FC1, Chunk((2, 0, 0), (1, 8, 4))), tensors[FC1][2:])


def test_source_is_never_modified(work):
    assert _tree_digest(work["dir"] / "src2") == work["src_digest"]


def test_inspect_reports_everything(work, capsys):
    info = describe(work["dir"] / "r12")
    assert info["iteration"] == 1 and info["padded_vocab_size"] == 480
    shapes = {t["key"]: tuple(t["shape"]) for t in info["tensors"]}
    assert shapes[EMBED] == (480, 64) and shapes[OUTPUT] == (480, 64)
    text = format_report(info)
    assert "optimizer state: yes" in text and "<boi> [384, 385)" in text
    sys.path.insert(0, str(REPO / "tools"))
    import inspect_checkpoint

    assert inspect_checkpoint.main([str(work["dir"] / "src2")]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith(EMBED))
    assert row.split()[-1] == "2"  # two shards: saved at TP=2


# ---- errors and safety ---------------------------------------------------------------------------

def test_existing_target_refused_without_overwrite(work, tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    with pytest.raises(CheckpointError, match="already exists; pass --overwrite"):
        resize_vocab(work["dir"] / "src2", target, IMAGE)
    stats = resize_vocab(work["dir"] / "src2", target, IMAGE, overwrite=True)
    assert stats.tensors == 9 and (target / "latest").read_text().strip() == "1"


def test_output_inside_source_refused(work):
    with pytest.raises(CheckpointError, match="overlaps the source"):
        resize_vocab(work["dir"] / "src2", work["dir"] / "src2" / "grown", IMAGE)


def test_failed_write_leaves_nothing(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(RuntimeError, match="killed"):
        with staged_output(target) as tmp:
            (tmp / "half_written").write_text("x")
            raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []


def _copy(work, tmp_path, name="r21") -> Path:
    dst = tmp_path / name
    shutil.copytree(work["dir"] / name, dst)
    return dst / "iter_0000001"


def test_missing_shard(work, tmp_path):
    folder = _copy(work, tmp_path)
    next(folder.glob("*.distcp")).unlink()
    with pytest.raises(CheckpointError, match=r"__.*\.distcp: missing \(listed in "
                                                  r".*manifest.json\)"):
        resize_vocab(folder, tmp_path / "out", IMAGE)


def test_layout_mismatch(work, tmp_path):
    folder = _copy(work, tmp_path)
    meta = json.loads((folder / "meta.json").read_text())
    meta["padded_vocab_size"] = 512
    (folder / "meta.json").write_text(json.dumps(meta))
    write_manifest(folder)  # as if saved so: the manifest alone would refuse an edited file
    with pytest.raises(CheckpointError, match="layout mismatch: meta.json says 512"):
        resize_vocab(folder, tmp_path / "out", IMAGE)


@pytest.mark.parametrize("kwargs,message", [
    (dict(padded_vocab_size=100), "shrink below the 128 text ids"),
    (dict(padded_vocab_size=300), "cannot hold the layout's 386 ids"),
    (dict(padded_vocab_size=433, tensor_parallel=2), "not divisible by tensor_model_parallel"),
    (dict(image_size=16), "shrinking to 16 would drop trained rows"),
    (dict(init="file"), "needs --init-file"),
])
def test_bad_targets(work, tmp_path, kwargs, message):
    kwargs = {"image_size": IMAGE, **kwargs}
    with pytest.raises(CheckpointError, match=message):
        resize_vocab(work["dir"] / "r21", tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()


def test_init_file_of_wrong_shape(work, tmp_path):
    torch.save({"word_embeddings": torch.zeros(10, 64)}, tmp_path / "rows.pt")
    with pytest.raises(CheckpointError, match=r"'word_embeddings' is \(10, 64\).*\[256, 64\]"):
        resize_vocab(work["dir"] / "src2", tmp_path / "out", IMAGE, init="file",
                     init_file=tmp_path / "rows.pt")


def test_not_a_checkpoint(tmp_path):
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("hello")
    with pytest.raises(CheckpointError, match="is not a checkpoint"):
        describe(tmp_path / "junk")
    with pytest.raises(CheckpointError, match="no config.json"):
        HFSource(tmp_path / "junk")
    with pytest.raises(CheckpointError, match="not an OpenLM checkpoint"):
        torch.save({"state_dict": {"x": torch.zeros(1)}}, tmp_path / "x.pt")
        OpenLMSource(tmp_path / "x.pt", {"n_heads": 4})


def test_tool_reports_errors_plainly(work, tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "tools/resize_vocab.py"),
                           str(tmp_path / "nowhere"), str(tmp_path / "out")],
                          capture_output=True, text=True, env=train_env())
    assert proc.returncode == 1 and "error:" in proc.stderr and "no such checkpoint" in proc.stderr
