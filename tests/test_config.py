"""Typed configuration: safe YAML, dotted overrides, key suggestions, validation, shipped recipes."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from megatron_t2i.config import (
    Config,
    ConfigError,
    config_from_dict,
    load_config,
    save_resolved,
    transformer_engine_available,
    validate,
    world_size_from_env,
)

REPO = Path(__file__).resolve().parents[1]
SHIPPED = sorted((REPO / "configs").glob("*.yaml"))
WORLD_VARS = ("WORLD_SIZE", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE")


NO_TE = pytest.mark.skipif(transformer_engine_available(),
                           reason="Transformer Engine is usable here")


def _cfg(*overrides: str) -> Config:
    return load_config(None, list(overrides))


def _refused(world_size: int, *overrides: str) -> str:
    """The message of the ConfigError that validate() raises for these overrides."""
    cfg = _cfg(*overrides)
    with pytest.raises(ConfigError) as e:
        validate(cfg, world_size)
    return str(e.value)


# ---- YAML files --------------------------------------------------------------------------

def test_yaml_python_object_tag_is_refused_not_executed(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    recipe = tmp_path / "evil.yaml"
    recipe.write_text(f'model: !!python/object/apply:os.system ["touch {marker}"]\n')
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(recipe)
    assert not marker.exists()


def test_yaml_file_values_are_typed(tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model:\n  num_layers: 6\noptim:\n  lr: 2.0e-4\ntrain:\n  fp8: null\n")
    cfg = load_config(recipe)
    assert cfg.model.num_layers == 6 and cfg.optim.lr == pytest.approx(2e-4)
    assert cfg.model.hidden_size == Config().model.hidden_size  # untouched keys keep defaults


@pytest.mark.parametrize("text, match", [
    ("- just\n- a list\n", "top level must be a mapping"),
    ("model: [1, 2]\n", "section 'model' must be a mapping"),
    ("model: {num_layers: [unclosed\n", "not valid YAML"),
])
def test_malformed_yaml_files(tmp_path: Path, text: str, match: str) -> None:
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(text)
    with pytest.raises(ConfigError, match=match):
        load_config(recipe)


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "absent.yaml")


# ---- overrides ---------------------------------------------------------------------------

def test_overrides_are_yaml_scalars() -> None:
    cfg = _cfg("model.num_layers=8", "optim.lr=3.0e-3", "optim.min_lr=3e-5",
               "model.untie_embeddings_and_output_weights=false", "train.eval_interval=null",
               "logging.wandb_tags=[a, b]", "parallel.distributed_timeout_minutes=5",
               "data.split=80,10,10")
    assert cfg.model.num_layers == 8 and type(cfg.model.num_layers) is int
    assert cfg.optim.lr == pytest.approx(3e-3)
    # PyYAML reads "3e-5" (no dot) as a string; a float key still takes it as a number.
    assert cfg.optim.min_lr == pytest.approx(3e-5) and type(cfg.optim.min_lr) is float
    assert cfg.model.untie_embeddings_and_output_weights is False
    assert cfg.train.eval_interval is None
    assert cfg.logging.wandb_tags == ["a", "b"]
    # an int given for a float key becomes a float
    assert cfg.parallel.distributed_timeout_minutes == 5.0
    assert type(cfg.parallel.distributed_timeout_minutes) is float
    assert cfg.data.split == "80,10,10"


def test_overrides_win_over_the_file(tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model:\n  num_layers: 6\n")
    assert load_config(recipe, ["model.num_layers=2"]).model.num_layers == 2


@pytest.mark.parametrize("item", ["model.num_layers", "num_layers=2", "model.a.b=1", ".x=1"])
def test_malformed_override(item: str) -> None:
    with pytest.raises(ConfigError, match="override"):
        _cfg(item)


def test_unknown_key_suggests_the_closest_valid_key() -> None:
    with pytest.raises(ConfigError) as e:
        _cfg("parallel.tensor_model_paralel_size=2")
    assert "parallel.tensor_model_paralel_size" in str(e.value)
    assert "did you mean parallel.tensor_model_parallel_size" in str(e.value)


def test_unknown_key_in_a_file_suggests_too(tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text("train:\n  micro_batchsize: 2\n")
    with pytest.raises(ConfigError, match=r"train\.micro_batchsize.*train\.micro_batch_size"):
        load_config(recipe)


def test_unknown_section_suggests_the_closest_section() -> None:
    with pytest.raises(ConfigError) as e:
        _cfg("paralel.tensor_model_parallel_size=2")
    assert "'paralel'" in str(e.value) and "did you mean parallel" in str(e.value)


def test_unrelated_unknown_key_has_no_suggestion() -> None:
    with pytest.raises(ConfigError) as e:
        _cfg("model.zzzzzz=1")
    assert "model.zzzzzz" in str(e.value) and "did you mean" not in str(e.value)


@pytest.mark.parametrize("item, key", [
    ("model.num_layers=four", "model.num_layers"),  # string for int
    ("model.num_layers=2.5", "model.num_layers"),  # float for int
    ("model.num_layers=true", "model.num_layers"),  # bool is not an int
    ("model.untie_embeddings_and_output_weights=1", "model.untie_embeddings_and_output_weights"),
    ("model.normalization=BatchNorm", "model.normalization"),  # outside the Literal
    ("train.fp8=e5m2", "train.fp8"),  # Optional[Literal]
    ("model.num_query_groups=two", "model.num_query_groups"),  # Optional[int]
    ("optim.lr=fast", "optim.lr"),
    ("optim.lr=true", "optim.lr"),
    ("data.split=[90, 5, 5]", "data.split"),  # list for str
    ("logging.wandb_tags=solo", "logging.wandb_tags"),  # str for list
])
def test_wrong_type_names_the_key(item: str, key: str) -> None:
    with pytest.raises(ConfigError) as e:
        _cfg(item)
    assert str(e.value).startswith(key + ":"), str(e.value)


def test_literal_typo_suggests_the_valid_choice() -> None:
    with pytest.raises(ConfigError, match=r"model\.activation.*did you mean swiglu"):
        _cfg("model.activation=swiglue")


def test_none_is_refused_for_a_non_optional_key() -> None:
    with pytest.raises(ConfigError, match="model.num_layers"):
        config_from_dict({"model": {"num_layers": None}})


# ---- validation --------------------------------------------------------------------------

def test_defaults_and_demo_validate() -> None:
    validate(Config(), world_size=1)
    validate(load_config(REPO / "configs/demo.yaml"), world_size=2)  # two data-parallel ranks


def test_heads_not_divisible_by_tp() -> None:
    msg = _refused(3, "parallel.tensor_model_parallel_size=3")
    assert "model.num_attention_heads=4" in msg
    assert "parallel.tensor_model_parallel_size=3" in msg


def test_hidden_not_divisible_by_heads() -> None:
    msg = _refused(1, "model.hidden_size=66")
    assert "model.hidden_size=66" in msg and "model.num_attention_heads" in msg


@pytest.mark.parametrize("overrides, world", [
    (("model.num_query_groups=3",), 1),  # does not divide 4 heads
    (("model.num_query_groups=1", "parallel.tensor_model_parallel_size=2"), 2),  # 1 % TP
])
def test_query_groups(overrides: tuple[str, ...], world: int) -> None:
    msg = _refused(world, *overrides)
    assert "model.num_query_groups" in msg and "model.num_attention_heads" in msg
    assert "parallel.tensor_model_parallel_size" in msg


def test_grouped_query_attention_that_fits_is_accepted() -> None:
    validate(_cfg("model.num_query_groups=2", "parallel.tensor_model_parallel_size=2"), 2)


@pytest.mark.parametrize("overrides", [
    ("model.num_layers=3", "parallel.pipeline_model_parallel_size=2"),
    ("model.num_layers=2", "parallel.pipeline_model_parallel_size=2",
     "parallel.virtual_pipeline_model_parallel_size=2"),
])
def test_layers_not_divisible_by_pp_times_vpp(overrides: tuple[str, ...]) -> None:
    msg = _refused(2, *overrides)
    assert "model.num_layers" in msg and "parallel.pipeline_model_parallel_size" in msg
    assert "virtual_pipeline_model_parallel_size" in msg


@pytest.mark.parametrize("overrides", [
    ("model.num_layers=4", "parallel.virtual_pipeline_model_parallel_size=2"),  # PP = 1
    ("model.num_layers=4", "parallel.pipeline_model_parallel_size=2",
     "parallel.virtual_pipeline_model_parallel_size=1"),
])
def test_vpp_needs_pp(overrides: tuple[str, ...]) -> None:
    msg = _refused(2, *overrides)
    assert "parallel.virtual_pipeline_model_parallel_size" in msg
    assert "parallel.pipeline_model_parallel_size" in msg


def test_world_size_not_divisible_by_tp_times_pp() -> None:
    msg = _refused(3, "parallel.tensor_model_parallel_size=2")
    assert "world size 3" in msg
    assert "tensor_model_parallel_size" in msg and "pipeline_model_parallel_size" in msg


def test_global_batch_not_divisible_by_micro_batch_times_dp() -> None:
    # 4 data-parallel ranks x 4 samples do not divide 8
    msg = _refused(4, "train.micro_batch_size=4", "train.global_batch_size=8")
    assert "train.global_batch_size=8" in msg and "train.micro_batch_size" in msg
    assert "4 x 4" in msg
    validate(_cfg("train.micro_batch_size=2", "train.global_batch_size=8"), 4)


def test_interleaved_schedule_needs_microbatches_multiple_of_pp() -> None:
    pipeline = ("model.num_layers=4", "parallel.pipeline_model_parallel_size=2",
                "parallel.virtual_pipeline_model_parallel_size=2", "train.micro_batch_size=4")
    msg = _refused(2, *pipeline, "train.global_batch_size=12")  # 3 microbatches
    assert "microbatches (3)" in msg and "parallel.pipeline_model_parallel_size=2" in msg
    validate(_cfg(*pipeline, "train.global_batch_size=8"), 2)  # 2 microbatches run


@NO_TE
def test_sequence_parallel_without_transformer_engine() -> None:
    msg = _refused(2, "parallel.tensor_model_parallel_size=2", "parallel.sequence_parallel=true")
    assert "parallel.sequence_parallel" in msg and "Transformer Engine" in msg


@NO_TE
def test_fp8_without_transformer_engine() -> None:
    msg = _refused(1, "train.fp8=hybrid")
    assert "train.fp8" in msg and "Transformer Engine" in msg


@NO_TE
def test_transformer_engine_impl_refused_without_it() -> None:
    msg = _refused(1, "model.transformer_impl=transformer_engine")
    assert "model.transformer_impl" in msg


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_device_refused_without_cuda() -> None:
    assert "train.device=cuda" in _refused(1, "train.device=cuda")


def test_overlap_param_gather_needs_distributed_optimizer() -> None:
    msg = _refused(1, "parallel.overlap_param_gather=true")
    assert "parallel.overlap_param_gather" in msg and "parallel.use_distributed_optimizer" in msg
    validate(_cfg("parallel.overlap_param_gather=true",
                  "parallel.use_distributed_optimizer=true"), 1)


def test_seq_length_too_short_for_the_image_tokens() -> None:
    # seq_length + 1 = [bos] + caption + [boi] + 64 codes + [eoi]: 67 leaves one caption token
    msg = _refused(1, "model.seq_length=66", "data.image_tokens_per_sample=64")
    assert "model.seq_length=66" in msg and "64 image codes" in msg
    validate(_cfg("model.seq_length=67", "data.image_tokens_per_sample=64"), 1)


def test_max_position_embeddings_below_seq_length() -> None:
    msg = _refused(1, "model.max_position_embeddings=64")
    assert "model.max_position_embeddings" in msg and "model.seq_length" in msg


@pytest.mark.parametrize("split", ["90,5", "a,b,c", "0,5,5", "90,-5,15", "90,5,5,0"])
def test_bad_data_split(split: str) -> None:
    assert "data.split" in _refused(1, f"data.split={split}")


@pytest.mark.parametrize("key", ["model.num_layers", "train.micro_batch_size",
                                 "parallel.tensor_model_parallel_size"])
def test_non_positive_sizes(key: str) -> None:
    assert f"{key} must be positive" in _refused(1, f"{key}=0")


# ---- world size from the launcher ---------------------------------------------------------

@pytest.mark.parametrize("var", ["WORLD_SIZE", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"])
def test_world_size_from_env(monkeypatch: pytest.MonkeyPatch, var: str) -> None:
    for v in WORLD_VARS:
        monkeypatch.delenv(v, raising=False)
    assert world_size_from_env() == 1
    monkeypatch.setenv(var, "8")
    assert world_size_from_env() == 8


def test_world_size_prefers_torchrun_and_skips_empty(monkeypatch: pytest.MonkeyPatch) -> None:
    for v in WORLD_VARS:
        monkeypatch.delenv(v, raising=False)
    monkeypatch.setenv("SLURM_NTASKS", "16")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert world_size_from_env() == 4
    monkeypatch.setenv("WORLD_SIZE", "")
    assert world_size_from_env() == 16


# ---- resolved config round trip and shipped recipes --------------------------------------

def test_save_resolved_round_trip(tmp_path: Path) -> None:
    cfg = _cfg("model.num_query_groups=2", "optim.lr=3e-4", "optim.adam_eps=1e-8",
               "logging.wandb_tags=[demo, t2i]", "train.fp8=hybrid", "checkpoint.dir=/x/ckpt",
               "data.split=98,1,1", "train.eval_interval=null")
    path = tmp_path / "resolved.yaml"
    save_resolved(cfg, path)
    back = load_config(path)
    assert back == cfg
    assert back != Config()  # the comparison above can tell configs apart


@pytest.mark.parametrize("recipe", SHIPPED, ids=[p.name for p in SHIPPED])
def test_shipped_configs_load_and_validate(recipe: Path) -> None:
    cfg = load_config(recipe)
    p = cfg.parallel
    try:
        validate(cfg, world_size=p.tensor_model_parallel_size * p.pipeline_model_parallel_size)
    except ConfigError as e:
        if "Transformer Engine" in str(e) or "CUDA" in str(e):
            pytest.skip(f"{recipe.name} needs a GPU feature absent here: {e}")
        raise


def test_shipped_configs_exist() -> None:
    assert REPO / "configs" / "demo.yaml" in SHIPPED


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cli_typo_exits_2_before_any_process_group(tmp_path: Path) -> None:
    # A world of two with no second rank: a process group started here would wait for it
    # (minutes) instead of returning at once.
    env = {k: v for k, v in os.environ.items() if k not in WORLD_VARS}
    env.update(WORLD_SIZE="2", RANK="0", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(_free_port()), PYTHONWARNINGS="ignore")
    run_dir = tmp_path / "run"
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "megatron_t2i.train", "--config", "configs/demo.yaml",
         "parallel.tensor_model_paralel_size=2", f"train.run_dir={run_dir}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "parallel.tensor_model_parallel_size" in proc.stderr
    assert "config error" in proc.stderr
    assert time.monotonic() - start < 20
    assert not run_dir.exists()
