"""The mini-study (tools/mini_study.py): its English corpus, its step runner, and the whole
quick study end to end (marked slow: run with --runslow or T2I_RUN_SLOW=1)."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
from conftest import REPO, read_metrics, run_train

from megatron_t2i.config import load_config, validate
from megatron_t2i.data.dataset import split_documents
from megatron_t2i.data.loader import document_split_seed
from megatron_t2i.eval.forgetting import read_choice_task
from megatron_t2i.experiments.study import fashion
from megatron_t2i.experiments.study.data import (
    CODES,
    TEXT_VOCAB_SIZE,
    caption_token_counts,
    image_to_text_ratio,
)
from megatron_t2i.experiments.study.debian import MissingData
from megatron_t2i.experiments.study.english import build_english_corpus, continuation_task
from megatron_t2i.experiments.study.pipeline import (
    QUICK,
    Step,
    StepTime,
    StudyError,
    eval_iterations,
    run_steps,
)
from megatron_t2i.experiments.study.report import budget, read_curve
from megatron_t2i.tokenizers.text import SentencePieceTokenizer


def test_english_corpus_is_deterministic_prose():
    first = build_english_corpus(max_chars=150_000)
    again = build_english_corpus(max_chars=150_000)
    assert first == again
    assert first.chars >= 150_000 and len(first.train) > 300 and first.held_out
    assert not set(first.train) & set(first.held_out)
    for paragraph in first.train + first.held_out:
        assert ">>>" not in paragraph and "\n" not in paragraph
        assert paragraph[0].isupper() and len(paragraph.split()) >= 8


def test_continuation_task_is_a_readable_choice_task(tmp_path):
    corpus = build_english_corpus(max_chars=150_000)
    items = continuation_task(corpus.held_out + corpus.train[:200], count=20, seed=3)
    assert items == continuation_task(corpus.held_out + corpus.train[:200], count=20, seed=3)
    path = tmp_path / "task.jsonl"
    path.write_text("".join(json.dumps(i) + "\n" for i in items))
    parsed = read_choice_task(path)  # the forgetting evaluation's own reader
    assert len(parsed) == 20 and all(len(p.choices) == 4 for p in parsed)
    for p in parsed:
        whole = f"{p.context} {p.choices[p.answer]}"
        assert whole in corpus.held_out + corpus.train[:200]


def test_the_study_split_does_not_change_with_train_seed():
    splits = []
    for seed in (1, 2, 1234):
        cfg = load_config(REPO / "configs/mini_study/lm.yaml", [f"train.seed={seed}"])
        assert cfg.data.split_seed is not None  # the study's configs fix it
        splits.append(split_documents(500, cfg.data.split, document_split_seed(cfg)))
    for train, valid, test in splits:
        assert not (set(train) & set(valid) or set(train) & set(test) or set(valid) & set(test))
        assert len(train) + len(valid) + len(test) == 500
    for other in splits[1:]:
        assert all((x == y).all() for x, y in zip(splits[0], other))
    # without data.split_seed the split follows train.seed (the trainer's default)
    a, b = (load_config(None, [f"train.seed={s}"]) for s in (1, 2))
    assert not (split_documents(500, "90,5,5", document_split_seed(a))[1]
                == split_documents(500, "90,5,5", document_split_seed(b))[1]).all()


def test_the_study_configs_validate():
    # the LM is text-only (data.image_vocab_size 0): the trainer must accept it
    for name in ("lm.yaml", "t2i.yaml"):
        validate(load_config(REPO / "configs/mini_study" / name), world_size=1)


def test_validation_at_step_zero_and_listed_iterations(tmp_path, corpus_dir):
    run = tmp_path / "run"
    run_train(run, corpus_dir, overrides=["train.train_iters=3", "train.eval_at=[0,2]",
                                          "checkpoint.save_at=[1]", "data.split_seed=0"])
    assert [r["iteration"] for r in read_metrics(run, "valid")] == [0, 2]
    train = read_metrics(run)
    assert all(0 < r["loss_tokens"] <= 8 * 80 for r in train)  # real (non-padding) targets
    curve = read_curve(run)  # the study's x axis: real tokens seen before each validation
    assert curve["iteration"] == [0, 2]
    assert curve["tokens"] == [0.0, sum(r["loss_tokens"] for r in train[:2])]
    assert sorted(p.name for p in (run / "checkpoints").glob("iter_*")) == \
        ["iter_0000001", "iter_0000003"]


def test_image_to_text_target_ratio_is_at_least_twenty(tmp_path):
    """The quick mode's captions (mosaics drawn the same way, fewer of them) under its text
    tokenizer (TEXT_VOCAB_SIZE pieces on its English): 256 codes per caption token >= 20."""
    try:
        fashion.build_mosaic_corpus(tmp_path / "mosaics", counts={"train": 400, "valid": 40,
                                                                  "test": 40}, seed=1234)
    except MissingData as e:  # not root and no package: nothing to measure
        pytest.skip(str(e))
    corpus = build_english_corpus(QUICK.data.english_chars)
    tokenizer = SentencePieceTokenizer.train(corpus.train, TEXT_VOCAB_SIZE, tmp_path / "text")
    lengths = caption_token_counts(tmp_path / "mosaics" / "train.jsonl", tokenizer)
    assert image_to_text_ratio(CODES[0], lengths["mean"]) >= 20, lengths
    assert lengths["per_word"] < 1.3, lengths  # caption words are (nearly) whole tokens
    assert CODES[0] + 3 + lengths["max"] <= 300  # the sequence the study sets stays short


def test_budget_sums_cpu_per_stage_and_estimates_two_cores():
    times = {"data": (100.0, 90.0), "lm": (50.0, 40.0), "lm_shuffled": (50.0, 40.0),
             "t2i_random_s1": (30.0, 20.0), "t2i_random_c64_s1": (10.0, 8.0),
             "eval_lm": (0.0, 0.0)}
    b = budget({k: StepTime(*v) for k, v in times.items()},
               {"data: image corpus": 12.0})
    assert b["stages"]["LM pretraining (LM, shuffled-words LM)"] == \
        {"steps": 2, "cpu_seconds": 80.0, "wall_seconds": 100.0}
    assert b["stages"]["text-to-image"]["cpu_seconds"] == 20.0
    assert b["stages"]["text-to-image, 64 codes (ablation)"]["cpu_seconds"] == 8.0
    assert b["cpu_seconds"] == 198.0
    assert b["two_idle_cores_estimate_seconds"] == 198.0 / 2
    assert b["reused_steps"] == ["eval_lm"]


def _py(code: str) -> tuple[str, ...]:
    return (sys.executable, "-c", code)


def test_steps_run_after_their_needs_and_failures_name_the_step(tmp_path):
    order = tmp_path / "order.txt"
    write = "import sys; open(sys.argv[1], 'a').write(sys.argv[2] + '\\n')"
    steps = [Step("c", (*_py(write), str(order), "c"), needs=("a", "b")),
             Step("a", (*_py(write), str(order), "a")),
             Step("b", (*_py(write), str(order), "b"), needs=("a",))]
    seconds = run_steps(steps, tmp_path, jobs=2)
    assert set(seconds) == {"a", "b", "c"}
    assert all(t.wall > 0 and t.cpu > 0 for t in seconds.values())  # each child's own CPU
    assert order.read_text().split() == ["a", "b", "c"]
    broken = [Step("ok", _py("print('fine')")),
              Step("bad", _py("import sys; print('the cause'); sys.exit(3)"), needs=("ok",))]
    with pytest.raises(StudyError, match=r"step bad failed \(exit status 3\)(.|\n)*the cause"):
        run_steps(broken, tmp_path, jobs=2)
    with pytest.raises(StudyError, match="needs"):
        run_steps([Step("x", _py("pass"), needs=("missing",))], tmp_path, jobs=1)


def test_evaluation_points_are_step_zero_and_log_spaced():
    for iters, points in ((60, 6), (300, 10)):
        its = eval_iterations(iters, points)
        # not iteration 1: it trains at lr 0 (warmup from 0) and would repeat step 0
        assert its[0] == 0 and its[1] == 2 and its[-1] == iters and len(its) == points + 1
        assert all(a < b for a, b in zip(its, its[1:]))
        ratios = [b / a for a, b in zip(its[1:], its[2:])]  # evenly spaced in log(iteration)
        assert max(ratios) / min(ratios) < 1.5


@pytest.mark.slow
def test_quick_mini_study_computes_every_verdict(tmp_path):
    from megatron_t2i.experiments.study.report import FIGURES

    out = tmp_path / "study"
    proc = subprocess.run([sys.executable, "tools/mini_study.py", "--quick", "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=3600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["seeds"] >= 2 and summary["split_duplicates"] == 0
    assert set(summary["findings"]) == {"fig3", "fig4_image", "fig4_text", "table1", "fig6",
                                        "fig7"}
    for name, finding in summary["findings"].items():
        assert finding["verdict"] in {"reproduced", "contradicted", "inconclusive"}, name
        assert finding["ci_low"] <= finding["difference"] <= finding["ci_high"], name
    tokenizer = summary["tokenizer"]
    assert 0 <= tokenizer["reconstruction_mse"] < 0.1 and tokenizer["codebook_perplexity"] > 1
    for arm, per_seed in summary["curves"].items():
        for curve in per_seed.values():
            assert curve["iteration"][0] == 0 and curve["tokens"][0] == 0, arm
            assert all(math.isfinite(v) for v in curve["loss"]), arm
    assert summary["quality_gate"]["choice_items"] >= 400
    for figure in FIGURES:
        assert (out / figure).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", figure
    report = (out / "report.md").read_text()
    assert "## Verdicts (computed)" in report and "## Forgetting (Table 1)" in report
