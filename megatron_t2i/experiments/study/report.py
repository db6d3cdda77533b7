"""The mini-study's results: summary.json, report.md and the figures, from the runs' files.

Curves are validation losses (nats/token) and perplexities against real tokens seen: the sum
of each step's non-padding target tokens, from the trainer's per-step `loss_tokens`. Every
verdict is computed here from the paired per-seed differences by stats.verdict; nothing in
the report is written by hand except the words around the numbers.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from megatron_t2i.experiments.study import stats
from megatron_t2i.experiments.study.data import StudyData
from megatron_t2i.experiments.study.pipeline import (
    Scale,
    Step,
    StepTime,
    arms,
    forgetting_iterations,
    run_name,
)
from megatron_t2i.training.loss import REPORT_KEYS

FIGURES = {
    "fig3_loss.png": "Overall validation loss, text-to-image, seed bands (the paper's Figure 3)",
    "fig4_perplexity.png": "Image- and caption-token perplexity from step 0 (Figure 4)",
    "table1_forgetting.png": "Held-out English loss along text-to-image training (Table 1)",
    "fig6_unconditional.png": "Unconditional image-token loss, pretrained, random, frozen "
                              "(Figure 6)",
    "fig7_alignment.png": "Contrastive alignment to the LM's table and to a random table, and "
                          "held-out retrieval (Figure 7)",
    "forest.png": "Every paired difference with its 95% interval",
}
LABELS = {"t2i_pretrained": "pretrained LM", "t2i_random": "random init",
          "t2i_shuffled": "LM on shuffled words", "t2i_pretrained_c64": "pretrained, 64 codes",
          "t2i_random_c64": "random, 64 codes", "uncond_pretrained": "pretrained LM",
          "uncond_random": "random init", "uncond_frozen_attention": "pretrained, frozen attention",
          "uncond_frozen_mlp": "pretrained, frozen MLP",
          "uncond_frozen_transformer": "pretrained, frozen transformer"}
RETRIEVAL_CANDIDATES = 100


def write_report(out: Path, data: StudyData, scale: Scale, steps: list[Step],
                 times: dict[str, StepTime], wall_seconds: float) -> dict[str, Any]:
    """`times`: wall and CPU seconds of each step ("data": the data preparation)."""
    summary = build_summary(out, data, scale, steps, times, wall_seconds)
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    draw_figures(summary, out)
    (out / "report.md").write_text(render_report(summary))
    print(f"[mini-study] wrote {out / 'report.md'}, {out / 'summary.json'} and "
          f"{len(FIGURES)} figures in {wall_seconds:.0f}s", flush=True)
    return summary


# ---- reading the runs ---------------------------------------------------------------------

def read_curve(run_dir: Path) -> dict[str, list[float]]:
    """Validation losses at each evaluated iteration, with the real tokens seen by then."""
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()
               if x.strip()]
    train = {r["iteration"]: r.get("loss_tokens", 0.0) for r in records
             if r.get("split", "train") == "train"}
    seen = np.cumsum([train.get(i, 0.0) for i in range(max(train, default=0) + 1)])
    valid = [r for r in records if r.get("split") == "valid"]
    return {"iteration": [r["iteration"] for r in valid],
            "tokens": [float(seen[r["iteration"]]) for r in valid],
            **{k: [r.get(k, math.nan) for r in valid]
               for k in REPORT_KEYS}}


def _curves(out: Path, scale: Scale) -> dict[str, dict[int, dict[str, list[float]]]]:
    return {arm.name: {s: read_curve(out / "runs" / run_name(arm.name, s)) for s in scale.seeds}
            for arm in arms(scale)}


def _value(curves: dict, arm: str, key: str, at: str = "final") -> dict[int, float]:
    """Per seed: the final value, the step-0 value, or the mean over the points after 0."""
    pick = {"final": lambda v: v[-1], "start": lambda v: v[0],
            "curve": lambda v: float(np.mean(v[1:]))}[at]
    return {s: float(pick(c[key])) for s, c in curves[arm].items()}


def _eval(out: Path, name: str) -> dict[str, Any]:
    return json.loads((out / "eval" / f"{name}.json").read_text())


def _english(report: dict) -> tuple[float, np.ndarray, np.ndarray]:
    """Held-out English loss (nats/token), per-window losses, per-item choice correctness."""
    t = report["text_perplexity"]
    windows = np.asarray(t["window_loss_sums"]) / np.maximum(1, np.asarray(t["window_tokens"]))
    task = next(iter(report["tasks"].values()))
    return float(t["loss"]), windows, np.asarray(task["correct"], dtype=np.float64)


# ---- findings -----------------------------------------------------------------------------

def _finding(claims: list[tuple[str, stats.Claim]], parts: dict[str, stats.Estimate]
             ) -> dict[str, Any]:
    verdicts = {part: stats.verdict(claim, parts[part]) for part, claim in claims}
    main = claims[-1][0]
    est = parts[main]
    return {"verdict": stats.combine(list(verdicts.values())), "difference": est.difference,
            "ci_low": est.ci_low, "ci_high": est.ci_high, "method": est.method,
            "margin": claims[-1][1].margin,
            "parts": {part: {"claim": claim.text, "kind": claim.kind, "verdict": verdicts[part],
                             **parts[part].to_dict()} for part, claim in claims}}


def compute_findings(out: Path, scale: Scale) -> tuple[dict, dict, dict]:
    """The six findings of the paper, the extra comparisons, and the LM quality gate."""
    curves = _curves(out, scale)
    seeds = scale.seeds
    lm = _english(_eval(out, "eval_lm"))
    last = scale.t2i_iters
    english = {s: _english(_eval(out, f"eval_{run_name('t2i_pretrained', s)}_it{last}"))
               for s in seeds}

    def pair(a: str, b: str, key: str, at: str = "final") -> stats.Estimate:
        return stats.estimate(_value(curves, a, key, at), _value(curves, b, key, at))

    def forgetting(english_after: dict) -> stats.Estimate:
        return stats.estimate({s: lm[0] for s in english_after},
                              {s: v[0] for s, v in english_after.items()},
                              {s: lm[1] for s in english_after},
                              {s: v[1] for s, v in english_after.items()})

    align = {kind: {s: _alignment(out, kind, s) for s in seeds} for kind in ("lm", "random")}
    c = stats.CLAIMS
    findings = {
        "fig3": _finding(c["fig3"], {"final": pair("t2i_random", "t2i_pretrained", "loss")}),
        "fig4_image": _finding(c["fig4_image"], {
            "curve": pair("t2i_random", "t2i_pretrained", "loss_image", "curve")}),
        "fig4_text": _finding(c["fig4_text"], {
            "start": pair("t2i_random", "t2i_pretrained", "loss_text", "start"),
            "final": pair("t2i_random", "t2i_pretrained", "loss_text")}),
        "table1": _finding(c["table1"], {"final": forgetting(english)}),
        "fig6": _finding(c["fig6"], {
            "final": pair("uncond_random", "uncond_pretrained", "loss_image")}),
        "fig7": _finding(c["fig7"], {"final": stats.estimate(
            {s: v["final_loss"] for s, v in align["random"].items()},
            {s: v["final_loss"] for s, v in align["lm"].items()})}),
    }
    extra = _extra_findings(out, scale, curves, lm, english, align, pair, forgetting)
    gate = _quality_gate(out, lm)
    return findings, extra, gate


def _extra_findings(out: Path, scale: Scale, curves: dict, lm: tuple, english: dict,
                    align: dict, pair, forgetting) -> dict[str, Any]:
    """Comparisons beyond the six findings: frozen arms, the controls, forgetting over time."""
    seeds, m = scale.seeds, stats.MARGIN_NATS
    extra: dict[str, Any] = {}
    for arm in arms(scale):
        if arm.frozen:
            extra[f"fig6_{arm.name}_vs_unfrozen"] = _finding(
                [("final", stats.Claim("greater", m, f"Fig. 6: freezing the {arm.frozen[0]} "
                                       f"hurts (final image loss, frozen - unfrozen > 0)"))],
                {"final": pair("uncond_pretrained", arm.name, "loss_image")})
    for it in forgetting_iterations(scale.t2i_iters)[:-1]:
        after = {s: _english(_eval(out, f"eval_{run_name('t2i_pretrained', s)}_it{it}"))
                 for s in seeds}
        extra[f"table1_at_iteration_{it}"] = _finding(
            [("final", stats.Claim("greater", m, f"Table 1: English loss after {it} of "
                                   f"{scale.t2i_iters} T2I iterations - before > 0"))],
            {"final": forgetting(after)})
    choice = stats.estimate({s: float(lm[2].mean()) for s in seeds},
                            {s: float(english[s][2].mean()) for s in seeds},
                            {s: lm[2] for s in seeds}, {s: english[s][2] for s in seeds})
    extra["table1_choice_accuracy"] = _finding(
        [("final", stats.Claim("less", 0.02, "Table 1: WordNet multiple-choice accuracy after "
                               "T2I training - before < 0"))], {"final": choice})
    c64 = {s: _english(_eval(out, f"eval_{run_name('t2i_pretrained_c64', s)}_it"
                                  f"{scale.t2i_iters}")) for s in seeds}
    extra["ratio_forgetting_256_vs_64_codes"] = _finding(
        [("final", stats.Claim("greater", m, "Ratio explanation: 256 codes per image make the "
                               "LM forget more English than 64 (loss after, 256 - 64 > 0)"))],
        {"final": stats.estimate({s: v[0] for s, v in c64.items()},
                                 {s: v[0] for s, v in english.items()},
                                 {s: v[1] for s, v in c64.items()},
                                 {s: v[1] for s, v in english.items()})})
    extra["fig3_c64"] = _finding(stats.CLAIMS["fig3"], {
        "final": pair("t2i_random_c64", "t2i_pretrained_c64", "loss")})
    extra["control_shuffled_vs_random"] = _finding(
        [("final", stats.Claim("equivalent", m, "Control: an LM of shuffled words (a warm "
                               "start without language) vs random init, final loss"))],
        {"final": pair("t2i_random", "t2i_shuffled", "loss")})
    extra["control_language_vs_shuffled"] = _finding(
        [("final", stats.Claim("equivalent", m, "Control: the LM of real English vs the LM of "
                               "shuffled words, final loss (language beyond a warm start)"))],
        {"final": pair("t2i_shuffled", "t2i_pretrained", "loss")})
    extra["fig7_retrieval"] = _finding(
        [("final", stats.Claim("not_greater", 0.02, "Fig. 7: held-out image-caption retrieval "
                               "after alignment to the LM's table is no better than after "
                               "alignment to a random table (accuracy, LM - random)"))],
        {"final": stats.estimate(
            {s: v["retrieval"] for s, v in align["random"].items()},
            {s: v["retrieval"] for s, v in align["lm"].items()},
            {s: v["retrieval_items"] for s, v in align["random"].items()},
            {s: v["retrieval_items"] for s, v in align["lm"].items()})})
    return extra


def _quality_gate(out: Path, lm: tuple) -> dict[str, Any]:
    """The pretrained LM knows some English: held-out perplexity below a unigram model's and
    multiple-choice accuracy above chance (95% bootstrap interval over items)."""
    facts = json.loads((out / "data" / "params.json").read_text())["facts"]
    unigram = facts["unigram_held_out_ppl"]
    mean, lo, hi = stats.bootstrap_interval(lm[2] - 0.25)
    ppl = math.exp(lm[0])
    return {"held_out_ppl": ppl, "unigram_ppl": unigram, "ppl_below_unigram": ppl < unigram,
            "choice_items": int(lm[2].size), "choice_accuracy": float(lm[2].mean()),
            "choice_ci": [0.25 + lo, 0.25 + hi], "choice_above_chance": lo > 0,
            "passed": bool(ppl < unigram and lo > 0)}


def _alignment(out: Path, kind: str, seed: int) -> dict[str, Any]:
    folder = out / "align" / run_name(f"align_{kind}", seed)
    records = [json.loads(x) for x in (folder / "alignment_metrics.jsonl").read_text()
               .splitlines() if x.strip()]
    table = out / "runs" / "lm" / "checkpoints" if kind == "lm" else \
        out / "align" / f"random_table_s{seed}.safetensors"
    correct = retrieval(folder / "image_rows.safetensors", table,
                        str(out / "data" / "tokens" / "t2i_c256_valid"))
    return {"final_loss": records[-1]["loss"], "steps": [r["step"] for r in records],
            "loss": [r["loss"] for r in records], "retrieval": float(correct.mean()),
            "retrieval_items": correct}


def retrieval(rows_path: Path, table_path: Path, valid_prefix: str,
              candidates: int = RETRIEVAL_CANDIDATES) -> np.ndarray:
    """Held-out image -> caption retrieval with the aligned rows: for each image, is the
    nearest of `candidates` captions (its own and the next ones) its own caption? One 0/1
    per held-out image; chance is 1/candidates (identical captions count as right)."""
    import torch
    import torch.nn.functional as F
    from safetensors.torch import load_file

    from megatron_t2i.experiments.alignment.contrastive import load_text_embeddings, read_pairs

    rows = next(iter(load_file(str(rows_path)).values())).float()
    table = load_text_embeddings(table_path)
    pairs = read_pairs(valid_prefix)
    table = table[:pairs.layout.text_size]
    image = F.normalize(rows[pairs.codes].mean(1), dim=-1)
    w = pairs.caption_mask.float().unsqueeze(-1)
    caption = F.normalize((table[pairs.captions] * w).sum(1) / w.sum(1).clamp(min=1), dim=-1)
    n = len(pairs)
    correct = np.zeros(n)
    for i in range(n):
        idx = torch.arange(i, i + min(candidates, n)) % n
        best = int(idx[torch.argmax(caption[idx] @ image[i])])
        correct[i] = float(torch.equal(pairs.captions[best], pairs.captions[i]))
    return correct


# ---- summary ------------------------------------------------------------------------------

def build_summary(out: Path, data: StudyData, scale: Scale, steps: list[Step],
                  times: dict[str, StepTime], wall_seconds: float) -> dict[str, Any]:
    findings, extra, gate = compute_findings(out, scale)
    tok = data.facts["tokenizer"]["c256"]
    curves = _curves(out, scale)
    return {
        "mode": scale.name, "corpus": data.facts["corpus"],
        "seeds": len(scale.seeds),
        "split_duplicates": data.facts["split_duplicates"],
        "image_to_text_targets": data.facts["image_to_text_targets"],
        "findings": findings,
        "tokenizer": {"reconstruction_mse": tok["reconstruction_mse"],
                      "codebook_perplexity": tok["codebook_perplexity"],
                      "dead_codes": tok.get("dead_codes"), "per_codes": data.facts["tokenizer"]},
        "margin_nats": stats.MARGIN_NATS,
        "interval_methods": "t over seeds (>= 3 seeds); bootstrap over evaluation items "
                            "where fewer seeds and per-item values exist",
        "extra_findings": extra, "quality_gate": gate,
        "wall_seconds": round(wall_seconds, 1),
        "scale": {"seeds": list(scale.seeds), "lm_iters": scale.lm_iters,
                  "t2i_iters": scale.t2i_iters, "eval_points": scale.eval_points,
                  "align_steps": scale.align_steps, "frozen": list(scale.frozen)},
        "data": data.facts,
        "curves": {arm: {str(s): c for s, c in per_seed.items()}
                   for arm, per_seed in curves.items()},
        "curves_lm_tokens": read_curve(out / "runs" / "lm")["tokens"][-1],
        "forgetting": _forgetting_table(out, scale),
        "alignment": {kind: {str(s): {k: v for k, v in _alignment(out, kind, s).items()
                                      if k != "retrieval_items"} for s in scale.seeds}
                      for kind in ("lm", "random")},
        "step_seconds": {k: round(t.wall, 1) for k, t in times.items()},
        "step_cpu_seconds": {k: round(t.cpu, 1) for k, t in times.items()},
        "budget": budget(times, data.facts.get("build_cpu_seconds", {})),
        "commands": {s.name: " ".join(s.command) for s in steps},
    }


def _forgetting_table(out: Path, scale: Scale) -> dict[str, Any]:
    rows: dict[str, Any] = {"lm": _forgetting_row(_eval(out, "eval_lm"))}
    for s in scale.seeds:
        for it in forgetting_iterations(scale.t2i_iters):
            name = f"{run_name('t2i_pretrained', s)}_it{it}"
            rows[name] = _forgetting_row(_eval(out, f"eval_{name}"))
    return rows


def _forgetting_row(report: dict) -> dict[str, Any]:
    loss, windows, correct = _english(report)
    return {"held_out_loss": loss, "held_out_ppl": math.exp(loss), "windows": int(windows.size),
            "choice_accuracy": float(correct.mean()),
            "completions": report.get("completions", [])}


# ---- figures ------------------------------------------------------------------------------

def draw_figures(summary: dict[str, Any], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    c = summary["curves"]
    paths = []
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for arm in ("t2i_pretrained", "t2i_random", "t2i_shuffled"):
        _band(ax, c[arm], "loss", LABELS[arm])
    _axes(ax, "text-to-image: validation loss (all targets)", "loss (nats/token)")
    paths.append(_save(plt, fig, out / "fig3_loss.png"))

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for arm in ("t2i_pretrained", "t2i_random", "t2i_shuffled"):
        _band(left, c[arm], "loss_image", LABELS[arm], exp=True)
        _band(right, c[arm], "loss_text", LABELS[arm], exp=True)
    _axes(left, "image-token perplexity", "perplexity", log=True)
    _axes(right, "caption-token perplexity", "perplexity", log=True)
    paths.append(_save(plt, fig, out / "fig4_perplexity.png"))

    paths.append(_forgetting_figure(plt, summary, out / "table1_forgetting.png"))

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for arm in c:
        if arm.startswith("uncond"):
            _band(ax, c[arm], "loss_image", LABELS[arm])
    _axes(ax, "unconditional: image-token validation loss", "loss (nats/token)")
    paths.append(_save(plt, fig, out / "fig6_unconditional.png"))

    paths.append(_alignment_figure(plt, summary, out / "fig7_alignment.png"))
    paths.append(_forest(plt, summary, out / "forest.png"))
    return paths


def _band(ax, per_seed: dict, key: str, label: str, exp: bool = False) -> None:
    """Mean over seeds with the min-max band; x: real tokens (symlog keeps step 0)."""
    runs = list(per_seed.values())
    n = min(len(r[key]) for r in runs)
    x = np.mean([r["tokens"][:n] for r in runs], axis=0)
    y = np.asarray([r[key][:n] for r in runs], dtype=np.float64)
    y = np.exp(y) if exp else y
    line, = ax.plot(x, y.mean(0), marker="o", markersize=3, linewidth=1.3, label=label)
    ax.fill_between(x, y.min(0), y.max(0), color=line.get_color(), alpha=0.2)


def _axes(ax, title: str, ylabel: str, log: bool = False) -> None:
    ax.set_xscale("symlog", linthresh=1e3)
    if log:
        ax.set_yscale("log")
    ax.set_xlabel("real (non-padding) training tokens seen")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize="small")


def _forgetting_figure(plt, summary: dict, path: Path) -> Path:
    rows, iters = summary["forgetting"], summary["scale"]["t2i_iters"]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for s in summary["scale"]["seeds"]:
        points = [(0.0, rows["lm"]["held_out_loss"])]
        points += [(int(k.rsplit("_it", 1)[1]) / iters, r["held_out_loss"])
                   for k, r in rows.items() if k.startswith(f"t2i_pretrained_s{s}_it")]
        ax.plot(*zip(*sorted(points)), marker="o", label=f"seed {s}")
    ax.set_xlabel("fraction of text-to-image training")
    ax.set_ylabel("held-out English loss (nats/token)")
    ax.set_title("forgetting: the pretrained LM along T2I training")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return _save(plt, fig, path)


def _alignment_figure(plt, summary: dict, path: Path) -> Path:
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    means = {}
    for kind, label in (("lm", "LM text table"), ("random", "random table")):
        for s, r in summary["alignment"][kind].items():
            left.plot(r["steps"], r["loss"], linewidth=1, label=f"{label}, seed {s}")
        means[label] = [r["retrieval"] for r in summary["alignment"][kind].values()]
    left.set_xlabel("alignment step")
    left.set_ylabel("contrastive loss")
    left.set_title("alignment of image codes")
    left.legend(fontsize="small")
    left.grid(alpha=0.3)
    for i, values in enumerate(means.values()):
        right.bar(i, np.mean(values), color=f"C{i}")
        right.scatter([i] * len(values), values, color="black", zorder=3)
    right.axhline(1 / RETRIEVAL_CANDIDATES, color="grey", linestyle="--", label="chance")
    right.set_xticks(range(len(means)), list(means))
    right.set_ylabel(f"held-out retrieval accuracy (1 of {RETRIEVAL_CANDIDATES})")
    right.legend(fontsize="small")
    return _save(plt, fig, path)


def _forest(plt, summary: dict, path: Path) -> Path:
    items = [(k, v) for k, v in {**summary["findings"], **summary["extra_findings"]}.items()]
    rows = [(f"{k}:{part}", p) for k, v in items for part, p in v["parts"].items()]
    fig, ax = plt.subplots(figsize=(8, 0.38 * len(rows) + 1.2))
    colors = {"reproduced": "C2", "contradicted": "C3", "inconclusive": "C7"}
    for i, (_, p) in enumerate(rows):
        lo, hi = (max(p["ci_low"], -5.0), min(p["ci_high"], 5.0))  # clip infinite intervals
        ax.plot([lo, hi], [i, i], color=colors[p["verdict"]], linewidth=2)
        ax.plot(p["difference"], i, "o", color=colors[p["verdict"]])
    ax.axvline(0, color="black", linewidth=0.8)
    for x in (-summary["margin_nats"], summary["margin_nats"]):
        ax.axvline(x, color="grey", linestyle=":", linewidth=0.8)
    ax.set_yticks(range(len(rows)), [n for n, _ in rows], fontsize="small")
    ax.invert_yaxis()
    ax.set_xlabel("paired difference (b - a) with 95% interval; dotted: equivalence margin")
    ax.set_title("every paired difference (green reproduced, red contradicted, grey "
                 "inconclusive)", fontsize="small")
    return _save(plt, fig, path)


def _save(plt, fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---- budget -------------------------------------------------------------------------------

STAGES = (  # (stage, step-name prefixes), the first match wins
    ("LM pretraining (LM, shuffled-words LM)", ("lm",)),
    ("vocabulary surgery", ("grow",)),
    ("text-to-image, 64 codes (ablation)", ("t2i_pretrained_c64", "t2i_random_c64")),
    ("text-to-image", ("t2i_",)),
    ("unconditional (with frozen)", ("uncond_",)),
    ("alignment (LM and random table)", ("random_table", "align_")),
    ("forgetting evaluations", ("eval_",)),
)


def stage_of(step: str) -> str:
    if step == "data":
        return "data preparation"
    return next((name for name, prefixes in STAGES if step.startswith(prefixes)), "other")


def budget(times: dict[str, StepTime], data_laps: dict[str, float]) -> dict[str, Any]:
    """CPU seconds per stage, and the wall time they imply on two idle cores: the data
    preparation runs on every core, then the steps two at a time (one thread each), so
    about the total / 2 when both cores stay busy (a lower bound: the last steps of the
    graph, and waits on a step's needs, leave a core idle)."""
    stages: dict[str, dict[str, float]] = {}
    for name, t in times.items():
        row = stages.setdefault(stage_of(name), {"steps": 0, "cpu_seconds": 0.0,
                                                 "wall_seconds": 0.0})
        row["steps"] += 1
        row["cpu_seconds"] = round(row["cpu_seconds"] + t.cpu, 1)
        row["wall_seconds"] = round(row["wall_seconds"] + t.wall, 1)
    data_cpu = times["data"].cpu if "data" in times else 0.0
    steps_cpu = sum(t.cpu for k, t in times.items() if k != "data")
    return {"stages": stages, "data_stages_when_built": data_laps,
            "cpu_seconds": round(data_cpu + steps_cpu, 1),
            "two_idle_cores_estimate_seconds": round((data_cpu + steps_cpu) / 2, 1),
            "reused_steps": sorted(k for k, t in times.items() if t.wall == 0.0)}


def _budget_lines(summary: dict) -> list[str]:
    b = summary["budget"]
    lines = ["## Budget (CPU seconds per stage)", "",
             "| stage | steps | CPU s | wall s (summed over steps) |", "|---|---|---|---|"]
    lines += [f"| {k} | {r['steps']} | {r['cpu_seconds']:.0f} | {r['wall_seconds']:.0f} |"
              for k, r in b["stages"].items()]
    lines += [f"| - {k} (when built) | | {v:.0f} | |"
              for k, v in b["data_stages_when_built"].items()]
    lines += ["", f"Total {b['cpu_seconds']:.0f} CPU s (the steps' processes and this one's "
              f"data preparation; the report's own statistics and figures not included). On "
              f"two idle cores that is about {b['two_idle_cores_estimate_seconds'] / 60:.1f} "
              f"min if both cores stay busy (the data preparation on both, then two steps at "
              f"a time; a lower bound)."
              + (f" Reused from an earlier run (0 s): {len(b['reused_steps'])} steps."
                 if b["reused_steps"] else ""), ""]
    return lines


# ---- report.md ----------------------------------------------------------------------------

def render_report(summary: dict[str, Any]) -> str:
    d, g, t = summary["data"], summary["quality_gate"], summary["tokenizer"]
    control = " (POSITIVE CONTROL: synthetic shapes whose captions decide the image)" \
        if summary["corpus"] == "shapes" else ""
    lines = [
        f"# Mini-study: pre-trained language models and auto-regressive text-to-image "
        f"({summary['mode']} mode){control}", "",
        f"Wall time {summary['wall_seconds'] / 60:.1f} min; {summary['seeds']} seeds per "
        f"compared arm; {summary['split_duplicates']} documents shared between splits. "
        f"Image tokenizer: reconstruction MSE {t['reconstruction_mse']:.4f}, codebook "
        f"perplexity {t['codebook_perplexity']:.1f} of 256. Image:text target ratio "
        f"{d.get('image_to_text_targets')}:1 at 256 codes per image, "
        f"{d.get('image_to_text_targets_c64')}:1 at 64 (mean caption "
        f"{d.get('mean_caption_tokens')} tokens, {d.get('caption_tokens_per_word')} per word; "
        f"the paper's: about 30:1).", "",
        "## Verdicts (computed)", "",
        f"Differences are b - a in nats/token unless named otherwise (accuracy, contrastive "
        f"loss); equivalence margin +-{summary['margin_nats']} nats/token by TOST; intervals "
        f"95%: {summary['interval_methods']}.", "",
        "| finding | claim | verdict | difference | 95% interval | interval from |",
        "|---|---|---|---|---|---|",
    ]
    for name, f in {**summary["findings"], **summary["extra_findings"]}.items():
        for part, p in f["parts"].items():
            lines.append(f"| {name} ({part}) | {p['claim']} | **{p['verdict']}** | "
                         f"{p['difference']:+.4f} | [{p['ci_low']:+.4f}, {p['ci_high']:+.4f}] "
                         f"| {p['method']} |")
    lines += ["", "Overall verdicts: " + ", ".join(
        f"{k} **{v['verdict']}**" for k, v in summary["findings"].items()) + ".", "",
        "## The pretrained LM's quality gate", "",
        f"Held-out English perplexity {g['held_out_ppl']:.1f} vs a unigram model's "
        f"{g['unigram_ppl']:.1f}; WordNet multiple choice ({g['choice_items']} items, chance "
        f"0.25): accuracy {g['choice_accuracy']:.3f} [{g['choice_ci'][0]:.3f}, "
        f"{g['choice_ci'][1]:.3f}]. Gate {'passed' if g['passed'] else 'NOT passed'}.", "",
        "Caption words in the LM's text (occurrences): "
        + ", ".join(f"{w} {n}" for w, n in d.get("caption_words_in_lm_text", {}).items())
        + ".", ""]
    lines += _limits(summary)
    lines += [f"![{caption}]({name})\n\n*{caption}.*\n" for name, caption in FIGURES.items()]
    lines += _forgetting_lines(summary)
    lines += _budget_lines(summary)
    lines += ["## Steps", "", "| step | wall s | CPU s |", "|---|---|---|"]
    lines += [f"| {k} | {v:.0f} | {summary['step_cpu_seconds'][k]:.0f} |"
              for k, v in summary["step_seconds"].items()]
    lines += ["", "The commands of every step are in summary.json (`commands`).", ""]
    return "\n".join(lines) + "\n"


def _limits(summary: dict) -> list[str]:
    """What this scale can and cannot show, from the measured sizes."""
    c = summary["curves"]
    lm_tokens = summary["curves_lm_tokens"]
    t2i = np.mean([r["tokens"][-1] for r in c["t2i_pretrained"].values()])
    return ["## What this scale can show", "",
            f"- Text-to-image training sees {t2i:,.0f} real tokens, "
            f"{100 * t2i / max(lm_tokens, 1):.0f}% of the LM's own pretraining tokens "
            f"({lm_tokens:,.0f}); the paper's is about 6%. Forgetting and the fading caption "
            f"advantage are measured at this other ratio, not the paper's.",
            f"- {summary['seeds']} seeds per arm: a t interval over {summary['seeds']} seeds "
            f"has {summary['seeds'] - 1} degree(s) of freedom, so equivalence within "
            f"+-{summary['margin_nats']} nats can rarely be shown; inconclusive verdicts say "
            f"the data cannot decide, not that the arms are the same.",
            "- A 4-layer, 128-wide GPT and a small VQ autoencoder: the paper's 1B model and "
            "MoVQGAN codes differ in kind as well as size.", ""]


def _forgetting_lines(summary: dict) -> list[str]:
    rows = summary["forgetting"]
    lines = ["## Forgetting (Table 1)", "",
             "| model | held-out English perplexity | WordNet choice accuracy |", "|---|---|---|"]
    lines += [f"| {k} | {r['held_out_ppl']:.1f} | {r['choice_accuracy']:.3f} |"
              for k, r in rows.items()]
    first = summary["scale"]["seeds"][0]
    last = f"t2i_pretrained_s{first}_it{summary['scale']['t2i_iters']}"
    lines += ["", f"Greedy completions, the LM before and after text-to-image training "
              f"(seed {first}):", "", "| prompt | before | after |", "|---|---|---|"]
    for b, a in zip(rows["lm"]["completions"], rows[last]["completions"]):
        lines.append(f"| {_cell(b['prompt'])} | {_cell(b['completion'])} | "
                     f"{_cell(a['completion'])} |")
    return lines + [""]


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ").strip() or "(nothing)"
