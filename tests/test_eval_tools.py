"""The evaluation tools on a tiny trained checkpoint: perplexity against the trainer's own
validation loss (under PP=2), forgetting (text perplexity, completions, multiple choice),
KV-cache and tensor-parallel decoding, image generation and caption fidelity."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO, read_metrics, train_env
from PIL import Image


def run_tool(args: list[str], nproc: int = 1, timeout: float = 240) -> str:
    launcher = [sys.executable] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        f"--nproc_per_node={nproc}"]
    proc = subprocess.run([*launcher, *args], cwd=REPO, env=train_env(), capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, f"{args[0]} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc.stdout


def test_perplexity_under_pp2_is_the_trainers_validation_loss(eval_checkpoint, tmp_path):
    out = tmp_path / "ppl.json"
    # the trainer's evaluation reads eval_iters x global batch = 16 validation samples in order
    run_tool(["tools/eval_perplexity.py", "--checkpoint", str(eval_checkpoint / "checkpoints"),
              "--pp", "2", "--max-samples", "16", "--out", str(out)], nproc=2)
    valid = json.loads(out.read_text())["valid"]
    logged = read_metrics(eval_checkpoint, split="valid")[-1]
    for key in ("loss", "loss_text", "loss_image"):
        assert valid[key] == pytest.approx(logged[key], rel=1e-5), key
    assert valid["ppl_image"] == pytest.approx(np.exp(logged["loss_image"]), rel=1e-5)
    assert valid["loss_text_tokens"] > 0 and valid["loss_image_tokens"] > 0


def test_forgetting_report(eval_checkpoint, tmp_path):
    heldout = tmp_path / "heldout.txt"
    heldout.write_text("a red circle at the top left\n\nthe theory of relativity\n")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle at the\nthe theory of\n")
    endings = [["left", "banana split"], ["the centre", "blue"]]
    hs = [{"ctx": "a red circle at the top", "endings": endings[0], "label": 0},
          {"ctx": "a blue square at", "endings": endings[1], "label": 0}]
    hs_reversed = [dict(r, endings=r["endings"][::-1], label=1) for r in hs]
    arc = [{"question": {"stem": "Which colour is the circle?",
                         "choices": [{"text": t, "label": c} for t, c in
                                     zip(["red", "blue", "green"], "ABC")]},
            "answerKey": "B"}]
    piqa = [{"goal": "draw a circle", "sol1": "a red circle", "sol2": "a square", "label": 1}]
    tasks = []
    for name, records in (("hellaswag", hs), ("hellaswag_reversed", hs_reversed),
                          ("arc", arc), ("piqa", piqa)):
        tasks += ["--task", str(tmp_path / f"{name}.jsonl")]
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    out, completions = tmp_path / "forgetting.json", tmp_path / "completions.jsonl"
    run_tool(["tools/eval_forgetting.py", "--checkpoint", str(eval_checkpoint / "checkpoints"),
              "--text-file", str(heldout), "--prompts", str(prompts), "--completions-out",
              str(completions), "--max-new-tokens", "5", *tasks, "--out", str(out)])
    report = json.loads(out.read_text())
    text = report["text_perplexity"]
    assert text["loss_image"] is None and text["loss_text_tokens"] > 10
    assert text["ppl"] == pytest.approx(np.exp(text["loss"]))
    scores = report["tasks"]
    assert set(scores) == {"hellaswag", "hellaswag_reversed", "arc", "piqa"}
    # scoring is by likelihood of each choice: where the answer sits must not matter
    assert scores["hellaswag"] == scores["hellaswag_reversed"]
    assert all(0 <= s["acc"] <= 1 and 0 <= s["acc_norm"] <= 1 for s in scores.values())
    lines = [json.loads(x) for x in completions.read_text().splitlines()]
    assert [x["prompt"] for x in lines] == ["a red circle at the", "the theory of"]
    assert lines == report["completions"]


def test_choices_scored_in_length_buckets_match_one_padded_length(eval_checkpoint, tmp_path):
    # under PP=2 the stages must form the same buckets, or the schedule's shapes disagree
    out = tmp_path / "buckets.json"
    run_tool([str(REPO / "tests/scripts/eval_choice_buckets.py"),
              str(eval_checkpoint / "checkpoints"), "2", str(out)], nproc=2)
    scores = json.loads(out.read_text())
    assert len(set(scores["lengths"])) > 5  # several buckets of different lengths
    np.testing.assert_allclose(scores["bucketed"], scores["padded"], rtol=1e-5, atol=1e-4)
    assert np.all(np.asarray(scores["bucketed"]) < 0)


def _decode(checkpoint, tmp_path, tp: int) -> dict:
    out = tmp_path / f"decode_tp{tp}.json"
    run_tool([str(REPO / "tests/scripts/eval_decode.py"), str(checkpoint), str(tp), str(out)],
             nproc=tp)
    return json.loads(out.read_text())


def test_kv_cache_and_tensor_parallel_decoding_agree(eval_checkpoint, tmp_path):
    checkpoint = eval_checkpoint / "checkpoints"
    tp1, tp2 = _decode(checkpoint, tmp_path, 1), _decode(checkpoint, tmp_path, 2)
    for run in (tp1, tp2):  # the KV cache changes nothing but speed
        assert run["cache"] == run["recompute"]
    # every TP rank sees the gathered vocabulary: the same logits, the same tokens
    np.testing.assert_allclose(tp2["prefill_logits"], tp1["prefill_logits"], atol=1e-4)
    assert np.array(tp1["prefill_logits"]).shape == (3, 512)  # the padded vocabulary
    assert tp2["cache"]["greedy"] == tp1["cache"]["greedy"]
    assert tp2["cache"]["completions"] == tp1["cache"]["completions"]
    assert tp2["cache"]["guided"] == tp1["cache"]["guided"]  # seeded draws, drawn on TP rank 0
    codes = np.array(tp1["cache"]["guided"])
    assert codes.shape == (3, 64) and codes.min() >= 0 and codes.max() < 256


def test_generate_images_and_caption_fidelity(eval_checkpoint, tmp_path):
    out = tmp_path / "samples"
    captions = ["a red circle at the top left", "a blue square at the centre"]
    run_tool(["tools/generate_images.py", "--checkpoint", str(eval_checkpoint / "checkpoints"),
              *sum((["--caption", c] for c in captions), []), "--guidance-scale", "3",
              "--temperature", "0.9", "--top-k", "50", "--top-p", "0.95", "--seed", "3",
              "--out", str(out)])
    with np.load(out / "samples.npz") as f:
        assert f["images"].shape == (2, 32, 32, 3) and f["images"].dtype == np.uint8
        assert f["codes"].shape == (2, 64)
        assert [str(c) for c in f["captions"]] == captions
    grid = Image.open(out / "grid.png")
    assert grid.width >= 2 * 32 and grid.height > 32
    assert sorted(p.name for p in (out / "images").iterdir()) == ["00000.png", "00001.png"]
    report = json.loads(run_tool(["tools/caption_fidelity.py", "--samples",
                                  str(out / "samples.npz")]))
    assert report["num_images"] == 2
    assert all(0 <= report[k] <= 1 for k in ("exact", "count", "position", "shape", "colour"))


def test_completions_refuse_pipeline_parallel(eval_checkpoint):
    from megatron_t2i.eval.forgetting import evaluate_forgetting

    with pytest.raises(ValueError, match="pipeline_model_parallel_size=1"):
        evaluate_forgetting(eval_checkpoint / "checkpoints", pp=2, prompts_file="prompts.txt")


def test_a_layout_the_processes_cannot_hold_is_refused(eval_checkpoint):
    from megatron_t2i.checkpoint.layout import read_meta, resolve_folder
    from megatron_t2i.config import ConfigError
    from megatron_t2i.eval.loading import eval_config

    meta = read_meta(resolve_folder(eval_checkpoint / "checkpoints"))
    with pytest.raises(ConfigError, match="TP=2 x PP=1 with 1 processes"):
        eval_config(meta, tp=2, pp=1)
    assert eval_config(meta, tp=1, pp=1).parallel.tensor_model_parallel_size == 1
