"""The mini-study (tools/mini_study.py): its English corpus, its step runner, and the whole
quick study end to end (marked slow: run with --runslow or T2I_RUN_SLOW=1)."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
from conftest import REPO, read_metrics, run_train

from megatron_t2i.config import load_config
from megatron_t2i.data.dataset import split_documents
from megatron_t2i.data.loader import document_split_seed
from megatron_t2i.eval.forgetting import read_choice_task
from megatron_t2i.experiments.study.english import build_english_corpus, continuation_task
from megatron_t2i.experiments.study.pipeline import Step, StudyError, eval_iterations, run_steps
from megatron_t2i.experiments.study.report import read_curve


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
        assert its[0] == 0 and its[1] == 1 and its[-1] == iters and len(its) == points + 1
        assert all(a < b for a, b in zip(its, its[1:]))
        ratios = [b / a for a, b in zip(its[2:], its[3:])]  # evenly spaced in log(iteration)
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
