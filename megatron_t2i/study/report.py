"""The mini-study's results: summary.json, report.md and the figures, from the runs' files.

Curves are validation perplexities (exp of the validation losses the trainer logs) against
tokens seen = iteration x global batch x sequence length, the paper's x axis. Every series
named in `SERIES` is in summary.json, so a test can check the study measured everything.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import yaml

from megatron_t2i.study.data import StudyData
from megatron_t2i.study.pipeline import FORGETTING, T2I_RUNS, Scale, Step
from megatron_t2i.training.plots import load_run, series

CURVES = {  # run -> the validation perplexities it reports
    "lm": ("text",),
    **{name: ("image", "text") if tokens == "t2i" else ("image",)
       for name, (tokens, _, _) in T2I_RUNS.items()},
}
SERIES = [f"{run}/valid_ppl_{kind}" for run, kinds in CURVES.items() for kind in kinds] + \
    ["alignment/loss", "alignment/temperature"]
FIGURES = {
    "image_perplexity.png": "Image-token perplexity, text-to-image (the paper's Figures 3, 4)",
    "text_perplexity.png": "Caption-token perplexity, text-to-image (Figure 4, right)",
    "unconditional.png": "Image-token perplexity, unconditional and frozen (Figure 6)",
    "alignment.png": "Contrastive alignment: loss and temperature (Figure 7)",
}
LABELS = {"t2i_pretrained": "pretrained LM", "t2i_random": "random init",
          "t2i_aligned": "pretrained LM, aligned image rows",
          "uncond_pretrained": "pretrained LM", "uncond_random": "random init",
          "uncond_frozen_attention": "pretrained, frozen attention",
          "uncond_frozen_mlp": "pretrained, frozen MLP",
          "uncond_frozen_transformer": "pretrained, frozen transformer"}


def write_report(out: Path, data: StudyData, scale: Scale, steps: list[Step],
                 step_seconds: dict[str, float], wall_seconds: float) -> dict[str, Any]:
    summary = build_summary(out, data, scale, steps, step_seconds, wall_seconds)
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    draw_figures(summary, out)
    (out / "report.md").write_text(render_report(summary))
    print(f"[mini-study] wrote {out / 'report.md'}, {out / 'summary.json'} and "
          f"{len(FIGURES)} figures in {wall_seconds:.0f}s", flush=True)
    return summary


# ---- summary ------------------------------------------------------------------------------

def build_summary(out: Path, data: StudyData, scale: Scale, steps: list[Step],
                  step_seconds: dict[str, float], wall_seconds: float) -> dict[str, Any]:
    series_: dict[str, dict[str, list[float]]] = {}
    final: dict[str, dict[str, float]] = {}
    for run, kinds in CURVES.items():
        run_dir = out / "runs" / run
        per_iteration = _tokens_per_iteration(run_dir)
        for kind in kinds:
            key = "loss_text" if kind == "text" else "loss_image"
            iterations, losses = series(load_run(run_dir), f"valid/{key}")
            name = f"{run}/valid_ppl_{kind}"
            series_[name] = {"tokens": [i * per_iteration for i in iterations],
                             "values": [math.exp(v) for v in losses]}
            final.setdefault(run, {})[f"valid_ppl_{kind}"] = series_[name]["values"][-1]
    align = _read_jsonl(out / "align" / "alignment_metrics.jsonl")
    series_["alignment/loss"] = {"steps": [r["step"] for r in align],
                                 "values": [r["loss"] for r in align]}
    series_["alignment/temperature"] = {"steps": [r["step"] for r in align],
                                        "values": [r["temperature"] for r in align]}
    nearest = json.loads((out / "align" / "nearest_text_tokens.json").read_text())
    return {
        "mode": scale.name, "wall_seconds": round(wall_seconds, 1),
        "scale": {k: v for k, v in vars(scale).items()},
        "data": data.facts,
        "series": series_, "final": final,
        "forgetting": {name: _forgetting(out / "eval" / f"{name}.json") for name in FORGETTING},
        "alignment": {"final_loss": align[-1]["loss"], "final_temperature":
                      align[-1]["temperature"], "nearest_text_tokens": nearest["summary"],
                      "examples": _nearest_examples(nearest)},
        "step_seconds": {k: round(v, 1) for k, v in step_seconds.items()},
        "commands": {s.name: " ".join(s.command) for s in steps},
    }


def _tokens_per_iteration(run_dir: Path) -> int:
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    return cfg["train"]["global_batch_size"] * cfg["model"]["seq_length"]


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _forgetting(path: Path) -> dict[str, Any]:
    report = json.loads(path.read_text())
    task = next(iter(report.get("tasks", {}).values()), {})
    return {"checkpoint": report["checkpoint"],
            "held_out_ppl": report["text_perplexity"]["ppl"],
            "continuation_acc": task.get("acc"), "continuation_acc_norm": task.get("acc_norm"),
            "completions": report.get("completions", [])}


def _nearest_examples(nearest: dict, count: int = 8) -> list[dict]:
    """The first codes the data uses, each with its five nearest text tokens."""
    codes = [c for c in nearest.get("codes", []) if c.get("seen_in_data", True)][:count]
    return [{"code": c["code"], "cosine": c["nearest"][0]["cosine"],
             "tokens": [n["token"] if n["token"] is not None else n["id"]
                        for n in c["nearest"][:5]]} for c in codes]


# ---- figures ------------------------------------------------------------------------------

def draw_figures(summary: dict[str, Any], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = summary["series"]
    t2i = ["t2i_pretrained", "t2i_random", "t2i_aligned"]
    uncond = [n for n in T2I_RUNS if n.startswith("uncond")]
    paths = [
        _curves(plt, out / "image_perplexity.png", s, [f"{r}/valid_ppl_image" for r in t2i],
                "text-to-image: image-token perplexity"),
        _curves(plt, out / "text_perplexity.png", s, [f"{r}/valid_ppl_text" for r in t2i],
                "text-to-image: caption-token perplexity"),
        _curves(plt, out / "unconditional.png", s, [f"{r}/valid_ppl_image" for r in uncond],
                "unconditional: image-token perplexity"),
    ]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, key, title in ((left, "alignment/loss", "contrastive loss"),
                           (right, "alignment/temperature", "temperature")):
        ax.plot(s[key]["steps"], s[key]["values"], linewidth=1.3)
        ax.set_title(title)
        ax.set_xlabel("alignment step")
        ax.grid(alpha=0.3)
    paths.append(_save(plt, fig, out / "alignment.png"))
    return paths


def _curves(plt, path: Path, s: dict, names: list[str], title: str) -> Path:
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name in names:
        run = name.split("/")[0]
        ax.plot(s[name]["tokens"], s[name]["values"], marker="o", markersize=3,
                linewidth=1.3, label=LABELS[run])
    ax.set_yscale("log")
    ax.set_xlabel("training tokens seen")
    ax.set_ylabel("validation perplexity")
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize="small")
    return _save(plt, fig, path)


def _save(plt, fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---- report.md ----------------------------------------------------------------------------

def render_report(summary: dict[str, Any]) -> str:
    d, f, a = summary["data"], summary["final"], summary["alignment"]
    lines = [
        f"# Mini-study: pre-trained language models and auto-regressive text-to-image "
        f"({summary['mode']} mode)",
        "",
        f"Wall time {summary['wall_seconds'] / 60:.1f} min. A {d['english_train_paragraphs']:,}"
        f"-paragraph English corpus (the docstrings of Python's standard library, "
        f"{d['english_text_tokens']:,} tokens) pretrains a 4-layer GPT; vocabulary surgery "
        f"adds 256 image codes; then text-to-image and unconditional runs on {d['pairs']:,} "
        f"synthetic image-caption pairs start from it or from random weights. "
        f"Perplexities are on the validation split, against tokens seen.",
        "",
        "## Final validation perplexities",
        "",
        "| run | image tokens | caption tokens |",
        "|---|---|---|",
    ]
    for run in ["lm", *T2I_RUNS]:
        values = f[run]
        lines.append(f"| {run} | {_num(values.get('valid_ppl_image'))} | "
                     f"{_num(values.get('valid_ppl_text'))} |")
    lines += ["", "(`lm`: perplexity of held-out English prose at the end of pretraining.)", ""]
    lines += _reading(summary)
    lines += [f"![{caption}]({name})\n\n*{caption}.*\n" for name, caption in FIGURES.items()]
    lines += _forgetting_section(summary["forgetting"])
    nearest = a["nearest_text_tokens"]
    lines += ["## Contrastive alignment (Figure 7)", "",
              f"Final loss {a['final_loss']:.3f}, temperature {a['final_temperature']:.4f}. "
              f"Nearest text token of each image code: {nearest.get('distinct_top1_tokens')} "
              f"distinct tokens over {nearest.get('image_codes')} codes, mean best cosine "
              f"{nearest.get('mean_top1_cosine')}; most often nearest: "
              f"{', '.join(repr(m['token'] or m['id']) for m in nearest.get('most_common_top1', [])[:8])}.",
              "", "| image code | best cosine | nearest text tokens |", "|---|---|---|"]
    lines += [f"| {e['code']} | {e['cosine']:.3f} | {', '.join(map(repr, e['tokens']))} |"
              for e in a["examples"]]
    lines += ["", "## Steps", "", "| step | seconds | command |", "|---|---|---|"]
    lines += [f"| {name} | {summary['step_seconds'].get(name, 0):.0f} | `{cmd}` |"
              for name, cmd in summary["commands"].items()]
    return "\n".join(lines) + "\n"


def _reading(summary: dict[str, Any]) -> list[str]:
    """The numbers the paper's claims are about, next to what the paper saw at 1B scale."""
    s, f = summary["series"], summary["forgetting"]

    def first_last(name: str) -> str:
        v = s[name]["values"]
        return f"{_num(v[0])} -> {_num(v[-1])}"

    return [
        "## Against the paper", "",
        f"- Image tokens, text-to-image (paper: pretrained and random init track each other): "
        f"pretrained {first_last('t2i_pretrained/valid_ppl_image')}, random "
        f"{first_last('t2i_random/valid_ppl_image')}, aligned "
        f"{first_last('t2i_aligned/valid_ppl_image')} (first -> last validation).",
        f"- Caption tokens (paper: the pretrained model starts far lower; the gap closes "
        f"quickly): pretrained {first_last('t2i_pretrained/valid_ppl_text')}, random "
        f"{first_last('t2i_random/valid_ppl_text')}.",
        "- Unconditional (paper: random init ends at least as low; freezing hurts): "
        + ", ".join(f"{LABELS[r]} {_num(s[f'{r}/valid_ppl_image']['values'][-1])}"
                    for r in T2I_RUNS if r.startswith("uncond")) + ".",
        f"- Forgetting (paper: the LM's English collapses): held-out English perplexity "
        f"{_num(f['eval_lm']['held_out_ppl'])} before, "
        f"{_num(f['eval_t2i_pretrained']['held_out_ppl'])} after text-to-image training "
        f"(random-init reference {_num(f['eval_t2i_random']['held_out_ppl'])}).",
        "",
        f"A {summary['mode']}-mode study is small and short: it shows the experiments run "
        f"and what they measure; its numbers are not the paper's.",
        "",
    ]


def _forgetting_section(forgetting: dict[str, Any]) -> list[str]:
    titles = {"eval_lm": "the pretrained LM (grown vocabulary)",
              "eval_t2i_pretrained": "after text-to-image training from it",
              "eval_t2i_random": "text-to-image from random init (reference)"}
    lines = ["## Forgetting (Table 1)", "",
             "| model | held-out English perplexity | continuation choice acc (4-way) |",
             "|---|---|---|"]
    for name, r in forgetting.items():
        lines.append(f"| {titles[name]} | {_num(r['held_out_ppl'])} | "
                     f"{_num(r['continuation_acc'])} |")
    lines += ["", "Greedy completions:", "", "| prompt | " + " | ".join(
        titles[n] for n in forgetting) + " |", "|---" * (len(forgetting) + 1) + "|"]
    prompts = [c["prompt"] for c in next(iter(forgetting.values()))["completions"]]
    for i, prompt in enumerate(prompts):
        cells = [_cell(r["completions"][i]["completion"]) for r in forgetting.values()]
        lines.append(f"| {_cell(prompt)} | " + " | ".join(cells) + " |")
    return lines + [""]


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ").strip() or "(nothing)"


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:,.3g}" if value < 10 else f"{value:,.1f}"
