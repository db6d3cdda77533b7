"""The paper's recipes (configs/recipes/*.yaml): each loads, validates at the world size it
states, says its token budget and starting checkpoint truthfully, keeps the 1B model of
configs/openlm_1b_t2i.yaml, and is the job of slurm/recipes.sbatch that its header names."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from conftest import REPO

from megatron_t2i.config import load_config, validate

RECIPES = sorted((REPO / "configs" / "recipes").glob("*.yaml"))
EXPERIMENTS = {  # the list: name -> (data, starts pretrained, frozen groups)
    "t2i_pretrained": ("hqitp_t2i", "openlm_1b_t2i", []),
    "t2i_random": ("hqitp_t2i", None, []),
    "uncond_pretrained": ("hqitp_uncond", "openlm_1b_t2i", []),
    "uncond_random": ("hqitp_uncond", None, []),
    "uncond_frozen_attention": ("hqitp_uncond", "openlm_1b_t2i", ["attention"]),
    "uncond_frozen_mlp": ("hqitp_uncond", "openlm_1b_t2i", ["mlp"]),
    "uncond_frozen_transformer": ("hqitp_uncond", "openlm_1b_t2i", ["transformer"]),
    "t2i_aligned": ("hqitp_t2i", "openlm_1b_t2i_aligned", []),
}


def header(path: Path) -> dict[str, str]:
    """The `# Key: value` lines of a recipe's leading comment (continuations joined)."""
    fields: dict[str, str] = {}
    key = None
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        m = re.match(r"#\s*([A-Z][A-Za-z ]+):\s*(.*)", line)
        if m and not line.startswith("#  "):
            key = m.group(1)
            fields[key] = m.group(2)
        elif key is not None and line.strip("# "):
            fields[key] += " " + line.strip("# ")
    return fields


def test_every_experiment_has_a_recipe():
    assert sorted(p.stem for p in RECIPES) == sorted(EXPERIMENTS)


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_validates_at_its_world_size(path):
    world = header(path)["World size"]
    gpus = int(re.match(r"(\d+) GPUs", world).group(1))
    cfg = load_config(path)
    validate(cfg, gpus)  # no recipe uses a Transformer-Engine-only setting: nothing to skip
    dp = gpus // (cfg.parallel.tensor_model_parallel_size
                  * cfg.parallel.pipeline_model_parallel_size)
    assert f"DP {dp}" in world
    assert f"{cfg.train.global_batch_size // (cfg.train.micro_batch_size * dp)} microbatches" \
        in world


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_states_its_budget_and_start(path):
    fields = header(path)
    cfg = load_config(path)
    m = re.match(r"(\d+)B tokens = ([\d,]+) iterations x ([\d,]+) samples x ([\d,]+) positions",
                 fields["Token budget"])
    assert m, fields["Token budget"]
    iters, batch, positions = (int(g.replace(",", "")) for g in m.groups()[1:])
    assert (iters, batch, positions) == (cfg.train.train_iters, cfg.train.global_batch_size,
                                         cfg.model.seq_length)
    assert iters * batch * positions == pytest.approx(int(m.group(1)) * 1e9, rel=0.01)
    start = fields["Starts from"]
    if cfg.checkpoint.pretrained is None:
        assert start.startswith("random init")
    else:
        assert start.startswith(cfg.checkpoint.pretrained + ":")
    assert fields["Data"].startswith(cfg.data.data_path + ":")


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_is_the_experiment_it_names(path):
    data, start, frozen = EXPERIMENTS[path.stem]
    cfg = load_config(path)
    assert Path(cfg.data.data_path).name == data
    assert (Path(cfg.checkpoint.pretrained).name if cfg.checkpoint.pretrained else None) == start
    assert cfg.model.freeze == frozen
    assert cfg.train.run_dir == f"runs/paper/{path.stem}"


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_keeps_the_paper_model_and_optimizer(path):
    base = load_config(REPO / "configs" / "openlm_1b_t2i.yaml").to_dict()
    cfg = load_config(path).to_dict()
    cfg["model"]["freeze"] = []
    for section in ("model", "parallel", "optim"):
        assert cfg[section] == base[section], section
    for key in ("train_iters", "global_batch_size", "micro_batch_size", "precision", "seed"):
        assert cfg["train"][key] == base["train"][key], key


def test_slurm_array_runs_each_recipe_its_header_names():
    script = (REPO / "slurm" / "recipes.sbatch").read_text()
    listed = re.search(r"RECIPES=\(([^)]*)\)", script).group(1).split()
    assert sorted(listed) == sorted(p.stem for p in RECIPES)
    assert f"--array=0-{len(listed) - 1}" in script
    for path in RECIPES:
        assert f"--array={listed.index(path.stem)} slurm/recipes.sbatch" in \
            header(path)["Command"], path.name
