"""The mini-study: the paper's experiments, small enough for a CPU, as one command.

    run_study(Path("runs/mini_study"), quick=True)     # python tools/mini_study.py --quick

Every step is a command a user would type (the trainer, tools/resize_vocab.py,
tools/contrastive_align.py, tools/eval_forgetting.py), run as a subprocess with its log in
`<out>/logs/<step>.log`; steps whose inputs are ready run side by side (`jobs` at a time,
the cores shared out between them). The steps:

    lm                  pretrain the small LM on English prose (configs/mini_study/lm.yaml)
    grow                vocabulary surgery: + 256 image codes, <boi>, <eoi> (init normal)
    align, grow_aligned contrastive alignment of the image codes to the LM's text table;
                        surgery with those rows (init file)
    t2i_pretrained, t2i_random, t2i_aligned                          Figures 3 and 4
    uncond_pretrained, uncond_random, uncond_frozen_{attention,mlp,transformer}   Figure 6
    eval_lm, eval_t2i_pretrained, eval_t2i_random                    Table 1 (forgetting)

then report.py writes report.md, summary.json and the figures.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import subprocess
import sys
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from pathlib import Path

from megatron_t2i.study.data import CODEBOOK_SIZE, StudyData, prepare_study_data

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "configs" / "mini_study"


class StudyError(RuntimeError):
    """A step of the study failed; the message names it, its command and its log."""


@dataclasses.dataclass(frozen=True)
class Scale:
    """How much of everything: the quick mode (under 10 minutes on two cores) or the full."""
    name: str
    english_chars: int | None  # None: every prose paragraph of the stdlib's docstrings
    pairs: int
    lm_iters: int
    t2i_iters: int
    eval_points: int  # validations per run
    align_steps: int
    text_vocab_size: int = 1024


QUICK = Scale("quick", english_chars=None, pairs=4000, lm_iters=200, t2i_iters=100,
              eval_points=10, align_steps=150)
FULL = Scale("full", english_chars=None, pairs=4000, lm_iters=1500, t2i_iters=600,
             eval_points=20, align_steps=1000)


@dataclasses.dataclass(frozen=True)
class Step:
    name: str
    command: tuple[str, ...]
    needs: tuple[str, ...] = ()
    outputs: str = ""  # the folder or file the step writes (reused if the step is done)


T2I_RUNS = {  # run name -> (token files, start, frozen groups)
    "t2i_pretrained": ("t2i", "grow", ()),
    "t2i_random": ("t2i", None, ()),
    "t2i_aligned": ("t2i", "grow_aligned", ()),
    "uncond_pretrained": ("uncond", "grow", ()),
    "uncond_random": ("uncond", None, ()),
    "uncond_frozen_attention": ("uncond", "grow", ("attention",)),
    "uncond_frozen_mlp": ("uncond", "grow", ("mlp",)),
    "uncond_frozen_transformer": ("uncond", "grow", ("transformer",)),
}
FORGETTING = {"eval_lm": "grow", "eval_t2i_pretrained": "t2i_pretrained",
              "eval_t2i_random": "t2i_random"}


def plan(out: Path, data: StudyData, scale: Scale) -> list[Step]:
    """The study's steps, in the order they are started when their inputs are ready (the
    longest chain first)."""
    py = sys.executable
    train = (py, "-m", "megatron_t2i.train")
    ckpt = {"grow": out / "checkpoints" / "lm_t2i",
            "grow_aligned": out / "checkpoints" / "lm_t2i_aligned",
            **{name: out / "runs" / name / "checkpoints" for name in T2I_RUNS}}
    lm_ckpt = out / "runs" / "lm" / "checkpoints"
    grow = (py, str(REPO / "tools" / "resize_vocab.py"), str(lm_ckpt))
    steps = [
        Step("lm", (*train, "--config", str(CONFIGS / "lm.yaml"),
                    *_schedule(out / "runs" / "lm", scale.lm_iters, scale),
                    f"data.data_path={data.text_prefix}"), outputs=str(lm_ckpt)),
        Step("grow", (*grow, str(ckpt["grow"]), "--image-size", str(CODEBOOK_SIZE),
                      "--init", "normal", "--overwrite"), ("lm",), str(ckpt["grow"])),
        Step("align", (py, str(REPO / "tools" / "contrastive_align.py"), "--text-embeddings",
                       str(lm_ckpt), "--data", data.t2i_prefix, "--out", str(out / "align"),
                       "--text-tokenizer", str(data.text_tokenizer), "--steps",
                       str(scale.align_steps), "--batch-size", "256", "--log-interval", "5"),
             ("lm",), str(out / "align" / "image_rows.safetensors")),
        Step("grow_aligned", (*grow, str(ckpt["grow_aligned"]), "--image-size",
                              str(CODEBOOK_SIZE), "--init", "file", "--init-file",
                              str(out / "align" / "image_rows.safetensors"), "--overwrite"),
             ("align",), str(ckpt["grow_aligned"])),
    ]
    prefixes = {"t2i": data.t2i_prefix, "uncond": data.uncond_prefix}
    for name, (tokens, start, frozen) in T2I_RUNS.items():
        overrides = [*_schedule(out / "runs" / name, scale.t2i_iters, scale),
                     f"data.data_path={prefixes[tokens]}", f"model.freeze=[{','.join(frozen)}]"]
        if start is not None:
            overrides.append(f"checkpoint.pretrained={ckpt[start]}")
        steps.append(Step(name, (*train, "--config", str(CONFIGS / "t2i.yaml"), *overrides),
                          (start,) if start else (), str(ckpt[name])))
    for name, source in FORGETTING.items():
        steps.append(Step(name, (
            py, str(REPO / "tools" / "eval_forgetting.py"), "--checkpoint", str(ckpt[source]),
            "--text-file", str(data.held_out), "--prompts", str(data.prompts),
            "--task", str(data.choice_task), "--text-tokenizer", str(data.text_tokenizer),
            "--max-new-tokens", "20", "--micro-batch-size", "16",
            "--out", str(out / "eval" / f"{name}.json")), (source,),
            str(out / "eval" / f"{name}.json")))
    order = ["lm", "grow", "align", "grow_aligned", "eval_lm", "t2i_pretrained",
             "t2i_aligned", "eval_t2i_pretrained", "t2i_random", "uncond_random",
             "eval_t2i_random"]
    return sorted(steps, key=lambda s: order.index(s.name) if s.name in order else len(order))


def _schedule(run_dir: Path, iters: int, scale: Scale) -> list[str]:
    every = max(1, iters // scale.eval_points)
    return [f"train.run_dir={run_dir}", f"train.train_iters={iters}",
            f"train.eval_interval={every}", f"train.log_interval={max(1, every // 2)}",
            f"optim.lr_warmup_iters={max(1, iters // 20)}"]


def run_steps(steps: list[Step], out: Path, jobs: int, resume: bool = True) -> dict[str, float]:
    """Run every step once its needs are done, `jobs` at a time; returns seconds per step.
    With `resume`, a step whose output already exists (from an earlier call) is skipped."""
    threads = max(1, (os.cpu_count() or 1) // jobs)
    known = {s.name for s in steps}
    for step in steps:
        if set(step.needs) - known:
            raise StudyError(f"step {step.name} needs {sorted(set(step.needs) - known)}, "
                             f"which no step makes")
    done: dict[str, float] = {}
    pending = list(steps)
    running: dict[Future, Step] = {}
    for folder in ("logs", "eval", "checkpoints"):
        (out / folder).mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        while pending or running:
            ready = [s for s in pending if all(n in done for n in s.needs)]
            if not ready and not running:
                raise StudyError(f"steps {[s.name for s in pending]} wait on each other")
            for step in ready:
                if len(running) >= jobs:
                    break
                pending.remove(step)
                if resume and step.outputs and _finished(step):
                    print(f"[mini-study] reuse {step.name} ({step.outputs})", flush=True)
                    done[step.name] = 0.0
                else:
                    running[pool.submit(_run_step, step, out, threads)] = step
            if not running:
                continue  # reused steps may have made others ready
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                step = running.pop(future)
                done[step.name] = future.result()  # re-raises a StudyError
    return done


def _finished(step: Step) -> bool:
    path = Path(step.outputs)
    return (path / "latest").is_file() if path.suffix == "" else path.is_file()


def _run_step(step: Step, out: Path, threads: int) -> float:
    log = out / "logs" / f"{step.name}.log"
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONWARNINGS="ignore")
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT",
                "SLURM_PROCID", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE"):
        env.pop(var, None)  # every step is one process of its own
    print(f"[mini-study] start {step.name}", flush=True)
    start = time.perf_counter()
    with open(log, "w") as f:
        f.write("$ " + " ".join(step.command) + "\n\n")
        f.flush()
        rc = subprocess.run(step.command, cwd=REPO, env=env, stdout=f,
                            stderr=subprocess.STDOUT).returncode
    seconds = time.perf_counter() - start
    if rc != 0:
        tail = "".join(log.read_text().splitlines(keepends=True)[-25:])
        raise StudyError(f"step {step.name} failed (exit status {rc}) after {seconds:.0f}s; "
                         f"log {log}:\n{tail}")
    print(f"[mini-study] done  {step.name} ({seconds:.0f}s)", flush=True)
    return seconds


def run_study(out: Path, quick: bool = False, jobs: int | None = None,
              resume: bool = True) -> dict:
    """Data, every run, and the report; returns the summary (also in out/summary.json)."""
    from megatron_t2i.study.report import write_report

    if importlib.util.find_spec("matplotlib") is None:  # the figures, at the very end
        raise StudyError("the mini-study draws its figures with matplotlib: "
                         "pip install 'megatron_t2i[plot]'")
    scale = QUICK if quick else FULL
    jobs = jobs or max(1, min(4, os.cpu_count() or 1))
    start = time.perf_counter()
    print(f"[mini-study] {scale.name} mode, {jobs} steps at a time, output {out}", flush=True)
    data = prepare_study_data(out / "data", scale.english_chars, scale.pairs,
                              scale.text_vocab_size)
    print(f"[mini-study] data ready ({time.perf_counter() - start:.0f}s)", flush=True)
    steps = plan(out, data, scale)
    seconds = run_steps(steps, out, jobs, resume)
    return write_report(out, data, scale, steps, seconds, time.perf_counter() - start)
