"""The mini-study: the paper's experiments, small enough for a CPU, as one command.

    python tools/mini_study.py --quick    (run.py: run_study: data, these steps, the report)

Every step is a command a user would type (the trainer, tools/resize_vocab.py,
tools/contrastive_align.py, tools/eval_forgetting.py), run as a subprocess with its log in
`<out>/logs/<step>.log`; steps whose inputs are ready run side by side (`jobs` at a time,
the cores shared out between them). The steps:

    lm, lm_shuffled     pretrain the small LM on English (and on the same words shuffled)
    grow, grow_shuffled vocabulary surgery: + 256 image codes, <boi>, <eoi>
    per seed s (runs/<arm>/s<s>):
      t2i_pretrained, t2i_random                           Figures 3, 4; Table 1
      t2i_shuffled                                         control: warm start vs language
      t2i_pretrained_c64, t2i_random_c64                   control: 64 vs 256 codes per image
      uncond_pretrained, uncond_random, uncond_frozen_*    Figure 6
      align_lm, align_random (+ random_table)              Figure 7 and its control
      eval_*: forgetting at 5%, 25% and 100% of text-to-image training (Table 1)

Every arm of a compared pair runs with the same seeds; validation is on a fixed held-out
file at step 0 and at log-spaced iterations; report.py then computes the verdicts.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import NamedTuple

import numpy as np

from megatron_t2i.experiments.study.data import (
    CODEBOOK_SIZE,
    DataScale,
    StudyData,
)

REPO = Path(__file__).resolve().parents[3]
CONFIGS = REPO / "configs" / "mini_study"
FORGETTING_POINTS = (0.05, 0.25, 1.0)  # fractions of text-to-image training
TEXT_WINDOW = 128  # held-out English windows: the LM's sequence length, for every model


class StudyError(RuntimeError):
    """A step of the study failed; the message names it, its command and its log."""


@dataclasses.dataclass(frozen=True)
class Scale:
    """How much of everything: the quick mode (under 10 minutes on two idle cores) or full."""
    name: str
    data: DataScale
    seeds: tuple[int, ...]
    lm_iters: int
    t2i_iters: int
    eval_points: int  # log-spaced validations per run, besides step 0
    align_steps: int
    frozen: tuple[str, ...]  # model.freeze groups of the unconditional frozen arms


# Text-to-image runs are most of the CPU time (docs/mini_study.md): their length is what the
# budgets cut, which also brings text-to-image tokens closer to the paper's small share of the
# LM's own pretraining tokens (about 6%; here 21% in quick mode, 18% in full).
QUICK = Scale("quick", DataScale("fashion", {"train": 2000, "valid": 200, "test": 200},
                                 300_000, vqvae_steps=300),
              seeds=(1, 2), lm_iters=150, t2i_iters=30, eval_points=6, align_steps=150,
              frozen=("transformer",))
FULL = Scale("full", DataScale("fashion", {"train": 6000, "valid": 500, "test": 500},
                               3_000_000, vqvae_steps=1500),
             seeds=(1, 2, 3), lm_iters=1200, t2i_iters=200, eval_points=10, align_steps=600,
             frozen=("attention", "mlp", "transformer"))


@dataclasses.dataclass(frozen=True)
class Arm:
    """One kind of text-to-image or unconditional run (run once per seed)."""
    name: str
    tokens: str  # "t2i" or "uncond"
    start: str | None  # the grown checkpoint step it starts from; None: random init
    codes: int = 256
    frozen: tuple[str, ...] = ()


def arms(scale: Scale) -> list[Arm]:
    return [Arm("t2i_pretrained", "t2i", "grow"), Arm("t2i_random", "t2i", None),
            Arm("t2i_shuffled", "t2i", "grow_shuffled"),
            Arm("t2i_pretrained_c64", "t2i", "grow", codes=64),
            Arm("t2i_random_c64", "t2i", None, codes=64),
            Arm("uncond_pretrained", "uncond", "grow"), Arm("uncond_random", "uncond", None),
            *[Arm(f"uncond_frozen_{g}", "uncond", "grow", frozen=(g,)) for g in scale.frozen]]


class StepTime(NamedTuple):
    wall: float  # seconds
    cpu: float  # CPU seconds (user + system) of the step's process and its children


@dataclasses.dataclass(frozen=True)
class Step:
    name: str
    command: tuple[str, ...]
    needs: tuple[str, ...] = ()
    outputs: str = ""  # the folder or file the step writes (reused if the step is done)


def eval_iterations(iters: int, points: int) -> list[int]:
    """Step 0 and `points` log-spaced iterations from 2 up to the last one. Not 1: the first
    iteration's learning rate is 0 (megatron-core's warmup starts at init_lr 0 and rises after
    each step), so a validation there repeats step 0."""
    spaced = np.unique(np.round(np.geomspace(2, iters, points)).astype(int))
    return [0, *[int(i) for i in spaced]]


def forgetting_iterations(iters: int) -> list[int]:
    return sorted({max(1, round(f * iters)) for f in FORGETTING_POINTS})


def run_name(arm: str, seed: int) -> str:
    return f"{arm}_s{seed}"


def plan(out: Path, data: StudyData, scale: Scale) -> list[Step]:
    """The study's steps, in the order they are started when their inputs are ready."""
    py = sys.executable
    steps = _lm_steps(out, data, scale, py)
    for seed in scale.seeds:
        for arm in arms(scale):
            steps.append(_arm_step(out, data, scale, arm, seed, py))
        steps += _align_steps(out, data, scale, seed, py)
        steps += _forgetting_steps(out, data, scale, seed, py)
    steps.append(_eval_step(out, data, py, "eval_lm", "grow", checkpoint(out, "grow")))
    first = ["lm", "grow", "eval_lm", "lm_shuffled", "grow_shuffled"]
    return sorted(steps, key=lambda s: first.index(s.name) if s.name in first else len(first))


def checkpoint(out: Path, step: str) -> Path:
    """The checkpoint root a step writes."""
    if step in ("grow", "grow_shuffled"):
        return out / "checkpoints" / ("lm_t2i" if step == "grow" else "lm_shuffled_t2i")
    return out / "runs" / step / "checkpoints"


def _lm_steps(out: Path, data: StudyData, scale: Scale, py: str) -> list[Step]:
    steps = []
    for lm, prefix, grow in (("lm", data.text_prefix, "grow"),
                             ("lm_shuffled", data.shuffled_prefix, "grow_shuffled")):
        ckpt = checkpoint(out, lm)
        steps.append(Step(lm, (py, "-m", "megatron_t2i.train", "--config",
                               str(CONFIGS / "lm.yaml"),
                               *_schedule(out / "runs" / lm, scale.lm_iters, scale),
                               f"data.data_path={prefix}"), outputs=str(ckpt)))
        steps.append(Step(grow, (py, str(REPO / "tools" / "resize_vocab.py"), str(ckpt),
                                 str(checkpoint(out, grow)), "--image-size", str(CODEBOOK_SIZE),
                                 "--init", "normal", "--overwrite"), (lm,),
                          str(checkpoint(out, grow))))
    return steps


def _arm_step(out: Path, data: StudyData, scale: Scale, arm: Arm, seed: int, py: str) -> Step:
    name = run_name(arm.name, seed)
    prefix = data.t2i if arm.tokens == "t2i" else lambda _codes, split: data.uncond(split)
    # [bos] caption <boi> codes <eoi>: room for the longest caption, no more (padding costs)
    caption_room = data.facts["max_caption_tokens"] if arm.tokens == "t2i" else 0
    overrides = [*_schedule(out / "runs" / name, scale.t2i_iters, scale),
                 f"train.seed={seed}", f"data.data_path={prefix(arm.codes, 'train')}",
                 f"data.valid_data_path={prefix(arm.codes, 'valid')}", "data.split=100,0,0",
                 f"data.image_tokens_per_sample={arm.codes}",
                 f"model.seq_length={arm.codes + 3 + caption_room}",
                 f"model.freeze=[{','.join(arm.frozen)}]", "checkpoint.save_optimizer=false"]
    if arm.name.startswith("t2i_pretrained"):  # forgetting is measured along the way
        overrides.append(f"checkpoint.save_at=[{','.join(map(str, forgetting_iterations(scale.t2i_iters)))}]")
    if arm.start is not None:
        overrides.append(f"checkpoint.pretrained={checkpoint(out, arm.start)}")
    return Step(name, (py, "-m", "megatron_t2i.train", "--config", str(CONFIGS / "t2i.yaml"),
                       *overrides), (arm.start,) if arm.start else (),
                str(checkpoint(out, name)))


def _schedule(run_dir: Path, iters: int, scale: Scale) -> list[str]:
    points = eval_iterations(iters, scale.eval_points)
    # log_interval 1: every step's count of real (non-padding) target tokens is logged, the
    # study's x axis
    return [f"train.run_dir={run_dir}", f"train.train_iters={iters}",
            "train.eval_interval=null", f"train.eval_at=[{','.join(map(str, points))}]",
            "train.log_interval=1", f"optim.lr_warmup_iters={max(1, iters // 20)}"]


def _align_steps(out: Path, data: StudyData, scale: Scale, seed: int, py: str) -> list[Step]:
    """Contrastive alignment of the image codes to the LM's text table, and (the control) to
    a random table of the same shape, mean and spread."""
    table = out / "align" / f"random_table_s{seed}.safetensors"
    make = ("from megatron_t2i.experiments.study.pipeline import write_random_table; import sys; "
            "write_random_table(sys.argv[1], sys.argv[2], int(sys.argv[3]))")
    steps = [Step(f"random_table_s{seed}", (py, "-c", make, str(checkpoint(out, "lm")),
                                            str(table), str(seed)), ("lm",), str(table))]
    for name, source, need in (("align_lm", checkpoint(out, "lm"), "lm"),
                               ("align_random", table, f"random_table_s{seed}")):
        folder = out / "align" / run_name(name, seed)
        steps.append(Step(run_name(name, seed), (
            py, str(REPO / "tools" / "contrastive_align.py"), "--text-embeddings", str(source),
            "--data", data.t2i(256, "train"), "--out", str(folder), "--text-tokenizer",
            str(data.text_tokenizer), "--steps", str(scale.align_steps), "--batch-size", "256",
            "--log-interval", "10", "--seed", str(seed)), (need,),
            str(folder / "image_rows.safetensors")))
    return steps


def write_random_table(lm_checkpoint: str, path: str, seed: int) -> None:
    """A Gaussian table with the LM text table's shape, mean and standard deviation."""
    import torch
    from safetensors.torch import save_file

    from megatron_t2i.experiments.alignment.contrastive import load_text_embeddings

    table = load_text_embeddings(lm_checkpoint)
    gen = torch.Generator().manual_seed(10_000 + seed)
    random = torch.randn(table.shape, generator=gen) * table.std() + table.mean()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file({"table": random.contiguous()}, path)


def _forgetting_steps(out: Path, data: StudyData, scale: Scale, seed: int,
                      py: str) -> list[Step]:
    steps = []
    for arm in ("t2i_pretrained", "t2i_pretrained_c64"):
        run = run_name(arm, seed)
        points = forgetting_iterations(scale.t2i_iters) if arm == "t2i_pretrained" \
            else [scale.t2i_iters]
        for it in points:
            steps.append(_eval_step(out, data, py, f"eval_{run}_it{it}", run,
                                    checkpoint(out, run) / f"iter_{it:07d}"))
    return steps


def _eval_step(out: Path, data: StudyData, py: str, name: str, needs: str,
               ckpt: Path) -> Step:
    return Step(name, (
        py, str(REPO / "tools" / "eval_forgetting.py"), "--checkpoint", str(ckpt),
        "--text-file", str(data.held_out), "--prompts", str(data.prompts),
        "--task", str(data.choice_task), "--text-tokenizer", str(data.text_tokenizer),
        "--max-new-tokens", "16", "--micro-batch-size", "32", "--per-item",
        "--text-window", str(TEXT_WINDOW),
        "--out", str(out / "eval" / f"{name}.json")), (needs,),
        str(out / "eval" / f"{name}.json"))


def run_steps(steps: list[Step], out: Path, jobs: int,
              resume: bool = True) -> dict[str, StepTime]:
    """Run every step once its needs are done, `jobs` at a time; returns each step's wall and
    CPU seconds. With `resume`, a step whose output already exists (from an earlier call) is
    skipped (and costs 0 s)."""
    threads = max(1, (os.cpu_count() or 1) // jobs)
    known = {s.name for s in steps}
    for step in steps:
        if set(step.needs) - known:
            raise StudyError(f"step {step.name} needs {sorted(set(step.needs) - known)}, "
                             f"which no step makes")
    done: dict[str, StepTime] = {}
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
                    done[step.name] = StepTime(0.0, 0.0)
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


def _run_step(step: Step, out: Path, threads: int) -> StepTime:
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
        proc = subprocess.Popen(step.command, cwd=REPO, env=env, stdout=f,
                                stderr=subprocess.STDOUT)
        # wait4: this child's own CPU time (with its waited-for children), whatever else runs
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = rc = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - start
    if rc != 0:
        tail = "".join(log.read_text().splitlines(keepends=True)[-25:])
        raise StudyError(f"step {step.name} failed (exit status {rc}) after {seconds:.0f}s; "
                         f"log {log}:\n{tail}")
    cpu = usage.ru_utime + usage.ru_stime
    print(f"[mini-study] done  {step.name} ({seconds:.0f}s, {cpu:.0f} CPU s)", flush=True)
    return StepTime(seconds, cpu)
