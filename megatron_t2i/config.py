"""Typed configuration: one dataclass per component, YAML files, dotted overrides, validation.

    cfg = load_config("configs/demo.yaml", ["parallel.tensor_model_parallel_size=2"])
    validate(cfg, world_size=4)

Everything is checked before any process group starts: unknown keys (with the closest valid
key), wrong types, and combinations megatron-core cannot run.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import json
import os
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, Optional

import yaml


class ConfigError(ValueError):
    """A configuration that cannot run; the message names the key."""


@dataclasses.dataclass
class ModelConfig:
    num_layers: int = 2
    hidden_size: int = 64
    num_attention_heads: int = 4
    num_query_groups: Optional[int] = None  # None: multi-head attention
    ffn_hidden_size: Optional[int] = None  # None: 4 x hidden (gelu) or 8/3 x hidden (swiglu)
    seq_length: int = 128  # model input length; samples hold seq_length + 1 tokens
    max_position_embeddings: Optional[int] = None  # None: seq_length
    normalization: Literal["RMSNorm", "LayerNorm"] = "RMSNorm"
    norm_epsilon: float = 1e-5
    activation: Literal["swiglu", "gelu"] = "swiglu"
    position_embedding_type: Literal["rope", "learned_absolute"] = "rope"
    rotary_base: int = 10000
    untie_embeddings_and_output_weights: bool = True
    init_method_std: float = 0.02
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    add_bias_linear: bool = False
    make_vocab_size_divisible_by: int = 128
    # "auto": Transformer Engine layers when TE imports on a GPU, else the local spec.
    transformer_impl: Literal["auto", "local", "transformer_engine"] = "auto"
    # Core attention of the local spec: PyTorch SDPA (flash / memory-efficient kernels) or
    # megatron-core's DotProductAttention, which materialises the full score matrix.
    core_attention: Literal["sdpa", "megatron"] = "sdpa"
    # Parameter groups that do not train (megatron_t2i/model/freeze.py): embeddings,
    # output_layer, attention, mlp, norms, transformer (all layers), text_rows (the text rows
    # of the word embeddings and output layer; the image rows train)
    freeze: list[str] = dataclasses.field(default_factory=list)
    # LayerNorm on queries and keys per head (megatron-core's qk_layernorm): against attention
    # logit growth in mixed text-image training (Chameleon, Lumina-mGPT); off in the paper.
    qk_layernorm: bool = False

    @property
    def resolved_ffn_hidden_size(self) -> int:
        """The MLP hidden size the model is built with; the one place this default lives.

        SwiGLU has three matrices instead of two, so its default width is 8/3 x hidden (same
        parameter count as a 4 x hidden GeLU MLP), rounded up to a multiple of 64 so the
        matmuls tile well on tensor cores (4096 -> 10944; LLaMA rounds to 256, giving 11008).
        """
        if self.ffn_hidden_size is not None:
            return self.ffn_hidden_size
        if self.activation == "swiglu":
            return 64 * -(-8 * self.hidden_size // (3 * 64))  # ceil(8h/3) to a multiple of 64
        return 4 * self.hidden_size


@dataclasses.dataclass
class ParallelConfig:
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    virtual_pipeline_model_parallel_size: Optional[int] = None
    sequence_parallel: bool = False
    use_distributed_optimizer: bool = False
    overlap_grad_reduce: bool = False
    overlap_param_gather: bool = False
    distributed_backend: Literal["auto", "nccl", "gloo"] = "auto"
    distributed_timeout_minutes: float = 10.0


@dataclasses.dataclass
class DataConfig:
    # Prefix of a .bin/.idx pair or of a shard set (.shards.json; docs/data-at-scale.md), with
    # its .vocab.json sidecar. None: the embedded synthetic demo corpus, generated on first
    # use under cache_dir.
    data_path: Optional[str] = None
    # Several prefixes blended with weights (one per prefix; empty: in proportion to their
    # sizes). Text-only prefixes (preprocessed in text mode) are packed GPT-style.
    data_paths: list[str] = dataclasses.field(default_factory=list)
    data_weights: list[float] = dataclasses.field(default_factory=list)
    caption_dropout: float = 0.0  # probability of an empty caption (classifier-free guidance)
    cache_dir: str = ".cache/demo_corpus"
    text_vocab_size: int = 128  # ids of the text tokenizer (the layout checks the sidecar)
    image_vocab_size: int = 256  # VQ codebook size
    image_tokens_per_sample: int = 64
    split: str = "90,5,5"  # train, valid, test weights over documents
    # Seed of the document split; None: train.seed. Set it to compare seeds on one fixed
    # validation set (the mini-study does).
    split_seed: Optional[int] = None
    # A prefix used whole as the validation set instead of data_path's valid split (a corpus
    # split by source item into its own files); data.split then usually gives train 100.
    valid_data_path: Optional[str] = None
    loss_on_captions: bool = True
    # synthetic demo corpus
    synthetic_samples: int = 3000
    synthetic_image_size: int = 32
    synthetic_patch_size: int = 4


@dataclasses.dataclass
class OptimConfig:
    optimizer: Literal["adamw"] = "adamw"
    lr: float = 1e-3
    min_lr: float = 1e-4
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    lr_warmup_iters: int = 0
    lr_decay_style: Literal["cosine", "linear", "constant"] = "cosine"
    lr_decay_iters: Optional[int] = None  # None: train.train_iters


@dataclasses.dataclass
class TrainConfig:
    run_dir: str = "runs/demo"
    train_iters: int = 100
    micro_batch_size: int = 4
    global_batch_size: int = 8
    seed: int = 1234
    log_interval: int = 1
    eval_interval: Optional[int] = None  # None: no validation during training
    eval_iters: int = 2
    # Validate also at these iterations (0: before the first step), e.g. log-spaced points.
    eval_at: list[int] = dataclasses.field(default_factory=list)
    exit_interval: Optional[int] = None  # save and exit once iteration % exit_interval == 0
    precision: Literal["fp32", "bf16"] = "fp32"
    fp8: Optional[Literal["hybrid", "e4m3"]] = None  # needs Transformer Engine on a GPU
    recompute_granularity: Optional[Literal["selective", "full"]] = None
    # "megatron": megatron-core's schedules, DDP and optimizer; "deepspeed": the same model at
    # TP = PP = 1 under DeepSpeed ZeRO (section `deepspeed`)
    engine: Literal["megatron", "deepspeed"] = "megatron"
    device: Literal["auto", "cuda", "cpu"] = "auto"
    # A NaN/Inf loss: stop the run with a message (exit 1), or skip that update and go on.
    nan_policy: Literal["stop", "skip"] = "stop"
    # Under nan_policy=skip: this many skipped updates in a row stop the run as `stop` would
    # (a diverged run skips every step from then on and would otherwise end "successfully").
    max_consecutive_skips: int = 10
    # Signals that make the run finish its iteration, save and exit 75 (training/faults.py);
    # empty: leave every signal's default action alone.
    exit_signals: list[str] = dataclasses.field(default_factory=lambda: ["SIGTERM", "SIGUSR1"])
    # Output z-loss weight w: loss += w * mean(logsumexp(logits)^2) over loss tokens
    # (training/loss.py); 0 = off, as in the paper. 1e-4 in Chameleon / Lumina-mGPT.
    z_loss_weight: float = 0.0
    # Decay of an fp32 exponential moving average of the weights (training/ema.py), saved in
    # checkpoints and used for sampling and validation; None = no EMA.
    ema_decay: Optional[float] = None
    # Samples of fixed captions (training/sampling.py): every sample_interval iterations
    # (None: never during training) and at the end (sample_at_end); the captions are
    # sample_captions + the lines of sample_captions_file, else sample_count held-out ones.
    sample_interval: Optional[int] = None
    sample_at_end: bool = True
    sample_captions: list[str] = dataclasses.field(default_factory=list)
    sample_captions_file: Optional[str] = None
    sample_count: int = 16


@dataclasses.dataclass
class DeepSpeedConfig:
    """Read only with train.engine=deepspeed; the DeepSpeed JSON is generated from the config
    (`deepspeed_config` at the end of this module)."""

    zero_stage: int = 1  # 1: optimizer states, 2: + gradients, 3: + parameters sharded over DP
    offload_optimizer: bool = False  # optimizer states and step on the CPU (ZeRO-Offload)
    # A DeepSpeed JSON whose keys are added to the generated config; a key the generated
    # config already sets must agree with it (else the config is refused).
    config_json: Optional[str] = None


@dataclasses.dataclass
class CheckpointConfig:
    save_interval: Optional[int] = None  # None: save only at the end
    save_at: list[int] = dataclasses.field(default_factory=list)  # also save at these iterations
    save_at_end: bool = True
    dir: Optional[str] = None  # None: <train.run_dir>/checkpoints
    resume: bool = True  # resume from <dir>/latest when it exists
    # A checkpoint (root with `latest`, or an iter_N folder) whose model weights initialise a
    # run that has nothing to resume yet: a pretrained LM after vocabulary surgery. Only the
    # model is read; optimizer, schedule and data position start afresh.
    pretrained: Optional[str] = None
    save_optimizer: bool = True
    # Hash every file against the checkpoint's manifest.json before loading (sizes are always
    # checked); false skips the hashing for very large checkpoints on trusted storage.
    verify_checksums: bool = True
    # Write the shards in a background process while training goes on (megatron-core's
    # asynchronous dist_checkpointing save); `latest` moves once every rank has finished.
    async_save: bool = False


@dataclasses.dataclass
class LoggingConfig:
    tensorboard: bool = True
    wandb: bool = False
    wandb_project: str = "megatron_t2i"
    wandb_entity: Optional[str] = None
    wandb_name: Optional[str] = None
    wandb_group: Optional[str] = None
    wandb_tags: list[str] = dataclasses.field(default_factory=list)
    wandb_mode: Literal["offline", "online"] = "offline"
    peak_tflops_per_gpu: float = 989.0  # dense bf16 peak of an H100/H200 SXM


@dataclasses.dataclass
class Config:
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    parallel: ParallelConfig = dataclasses.field(default_factory=ParallelConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    deepspeed: DeepSpeedConfig = dataclasses.field(default_factory=DeepSpeedConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    logging: LoggingConfig = dataclasses.field(default_factory=LoggingConfig)

    @property
    def checkpoint_dir(self) -> Path:
        return Path(self.checkpoint.dir or Path(self.train.run_dir) / "checkpoints")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---- loading -----------------------------------------------------------------------------

def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML file (safe_load) and apply `section.key=value` overrides."""
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            raw = yaml.safe_load(Path(path).read_text()) or {}
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
    for item in overrides:
        section, key, value = _parse_override(item)
        raw.setdefault(section, {})
        if not isinstance(raw[section], dict):
            raise ConfigError(f"{section}: must be a mapping")
        raw[section][key] = value
    return config_from_dict(raw, source=str(path) if path else "<overrides>")


def config_from_dict(raw: dict[str, Any], source: str = "<dict>") -> Config:
    cfg = Config()
    sections = {f.name: f for f in dataclasses.fields(Config)}
    for section, values in raw.items():
        if section not in sections:
            raise ConfigError(f"{source}: unknown section {section!r}{_suggest(section, sections)}")
        if values is None:
            continue
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: section {section!r} must be a mapping")
        target = getattr(cfg, section)
        hints = typing.get_type_hints(type(target))
        for key, value in values.items():
            if key not in hints:
                raise ConfigError(f"{source}: unknown key {section}.{key}"
                                  f"{_suggest(key, hints, prefix=section + '.')}")
            setattr(target, key, _coerce(value, hints[key], f"{section}.{key}"))
    return cfg


def _parse_override(item: str) -> tuple[str, str, Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected section.key=value")
    dotted, text = item.split("=", 1)
    parts = dotted.strip().split(".")
    if len(parts) != 2 or not all(parts):
        raise ConfigError(f"override {item!r}: the key must be section.key, "
                          f"for example parallel.tensor_model_parallel_size=2")
    if not text.strip():
        return parts[0], parts[1], None
    try:
        return parts[0], parts[1], yaml.safe_load(text)
    except yaml.YAMLError as e:
        reason = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"override {parts[0]}.{parts[1]}: {text!r} is not a valid YAML "
                          f"value ({reason}); quote strings that hold YAML syntax") from None


def _suggest(name: str, valid, prefix: str = "") -> str:
    close = difflib.get_close_matches(name, list(valid), n=1, cutoff=0.6)
    return f" (did you mean {prefix}{close[0]}?)" if close else ""


# YAML 1.1 (PyYAML) reads 3e-4, without a dot, as a string; for float keys it is a number.
_EXPONENT_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _coerce(value: Any, hint: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key}: got {value!r}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not one of {list(args)}"
                              f"{_suggest(str(value), [str(a) for a in args])}")
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, args[0], key) for v in value] if args else list(value)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, str) and _EXPONENT_FLOAT.fullmatch(value.strip()):
            value = float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported type {hint}")  # pragma: no cover


# ---- validation --------------------------------------------------------------------------

def world_size_from_env() -> int:
    """The number of processes the launcher started, read before any process group exists."""
    for var in ("WORLD_SIZE", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE"):
        if os.environ.get(var):
            return int(os.environ[var])
    return 1


def transformer_engine_available() -> bool:
    import torch

    return torch.cuda.is_available() and importlib.util.find_spec("transformer_engine") is not None


def uses_transformer_engine(cfg: Config) -> bool:
    if cfg.model.transformer_impl == "local" or _device(cfg) == "cpu":
        return False
    if cfg.model.transformer_impl == "transformer_engine":
        return True
    return transformer_engine_available()


def _device(cfg: Config) -> str:
    from megatron_t2i.platform import resolve_device  # imports torch: only when validating

    return resolve_device(cfg.train.device)


def validate(cfg: Config, world_size: int) -> None:
    """Refuse combinations megatron-core cannot run, naming the keys involved: each section
    checks itself (_SECTION_CHECKS), then the rules that join sections and the world size."""
    for section, check in _SECTION_CHECKS.items():
        _check_ranges(getattr(cfg, section), section)
        check(getattr(cfg, section))
    _check_parallel_layout(cfg, world_size)
    _check_layer_implementation(cfg)
    budget = caption_budget(cfg)
    if budget < 1:
        raise ConfigError(f"model.seq_length={cfg.model.seq_length} leaves no room for a "
                          f"caption: a sample holds [bos] caption [boi] "
                          f"{cfg.data.image_tokens_per_sample} image codes [eoi]")
    if cfg.train.ema_decay is not None and cfg.parallel.overlap_param_gather:
        raise ConfigError("train.ema_decay needs parallel.overlap_param_gather=false (the "
                          "average reads the parameters right after the optimizer step)")
    if cfg.model.freeze and cfg.train.engine != "megatron":
        raise ConfigError("model.freeze is implemented for train.engine=megatron only")
    if cfg.train.engine == "deepspeed":
        _check_deepspeed(cfg, world_size)


# ---- each section on its own -------------------------------------------------------------

def _check_model(m: ModelConfig) -> None:
    _positive(m, "model", ["num_layers", "hidden_size", "num_attention_heads", "seq_length"])
    if m.hidden_size % m.num_attention_heads:
        raise ConfigError(f"model.hidden_size={m.hidden_size} is not divisible by "
                          f"model.num_attention_heads={m.num_attention_heads}")
    if m.max_position_embeddings is not None and m.max_position_embeddings < m.seq_length:
        raise ConfigError("model.max_position_embeddings is smaller than model.seq_length")
    if m.freeze:
        _check_freeze_names(m.freeze, tied_embeddings=not m.untie_embeddings_and_output_weights)


def _check_parallel(p: ParallelConfig) -> None:
    _positive(p, "parallel", ["tensor_model_parallel_size", "pipeline_model_parallel_size"])
    vpp = p.virtual_pipeline_model_parallel_size
    if vpp is not None and (p.pipeline_model_parallel_size < 2 or vpp < 2):
        raise ConfigError("parallel.virtual_pipeline_model_parallel_size needs "
                          "parallel.pipeline_model_parallel_size >= 2 and a value >= 2")
    if p.overlap_param_gather and not p.use_distributed_optimizer:
        raise ConfigError("parallel.overlap_param_gather needs "
                          "parallel.use_distributed_optimizer=true")


def _check_data(d: DataConfig) -> None:
    _positive(d, "data", ["text_vocab_size", "image_tokens_per_sample"])
    split_weights(d.split)
    _check_data_paths(d)


def check_demo_corpus(d: DataConfig) -> None:
    """The synthetic demo corpus's settings (data/demo.py checks them when it is used)."""
    size, patch = d.synthetic_image_size, d.synthetic_patch_size
    if d.synthetic_samples < 1:
        raise ConfigError(f"data.synthetic_samples must be positive, got {d.synthetic_samples}")
    if patch < 1 or size % patch:
        raise ConfigError(f"data.synthetic_image_size={size} is not a multiple of "
                          f"data.synthetic_patch_size={patch}")
    if (size // patch) ** 2 != d.image_tokens_per_sample:
        raise ConfigError(f"data.image_tokens_per_sample={d.image_tokens_per_sample} "
                          f"but {size}px images in {patch}x{patch} patches give "
                          f"{(size // patch) ** 2} codes; set one to match the other")
    if d.image_vocab_size < 1:
        raise ConfigError(f"data.image_vocab_size must be positive, got {d.image_vocab_size}")


def _check_optim(o: OptimConfig) -> None:
    if o.min_lr > o.lr:
        raise ConfigError(f"optim.min_lr={o.min_lr} is above optim.lr={o.lr}")
    # Warmup beyond train.train_iters stays allowed: short benchmark and smoke runs of the
    # recipes (2,000 warmup iterations) stop inside it on purpose.
    if o.lr_decay_iters is not None and o.lr_warmup_iters > o.lr_decay_iters:
        raise ConfigError(f"optim.lr_warmup_iters={o.lr_warmup_iters} is above "
                          f"optim.lr_decay_iters={o.lr_decay_iters}")


def _check_train(t: TrainConfig) -> None:
    _positive(t, "train", ["train_iters", "micro_batch_size", "global_batch_size",
                           "log_interval"])
    _check_training_extras(t)
    _check_exit_signals(t.exit_signals)


def _ranges_only(section: Any) -> None:
    """Sections whose only rules are the numeric ranges of _RANGES."""


_SECTION_CHECKS: dict[str, Any] = {
    "model": _check_model, "parallel": _check_parallel, "data": _check_data,
    "optim": _check_optim, "train": _check_train, "deepspeed": _ranges_only,
    "checkpoint": _ranges_only, "logging": _ranges_only,
}


# ---- rules that join sections ------------------------------------------------------------

def _check_parallel_layout(cfg: Config, world_size: int) -> None:
    """The model and the batch split over tensor, pipeline and data parallel ranks."""
    m, p, t = cfg.model, cfg.parallel, cfg.train
    tp, pp, vpp = (p.tensor_model_parallel_size, p.pipeline_model_parallel_size,
                   p.virtual_pipeline_model_parallel_size)
    if m.num_attention_heads % tp:
        raise ConfigError(f"model.num_attention_heads={m.num_attention_heads} is not divisible "
                          f"by parallel.tensor_model_parallel_size={tp}")
    groups = m.num_query_groups or m.num_attention_heads
    if m.num_attention_heads % groups or groups % tp:
        raise ConfigError(f"model.num_query_groups={groups} must divide "
                          f"model.num_attention_heads and be divisible by "
                          f"parallel.tensor_model_parallel_size={tp}")
    if m.num_layers % (pp * (vpp or 1)):
        raise ConfigError(f"model.num_layers={m.num_layers} is not divisible by "
                          f"parallel.pipeline_model_parallel_size x "
                          f"virtual_pipeline_model_parallel_size = {pp * (vpp or 1)}")
    if world_size % (tp * pp):
        raise ConfigError(f"world size {world_size} is not divisible by "
                          f"tensor_model_parallel_size x pipeline_model_parallel_size = {tp * pp}")
    dp = world_size // (tp * pp)
    if t.global_batch_size % (t.micro_batch_size * dp):
        raise ConfigError(f"train.global_batch_size={t.global_batch_size} is not divisible by "
                          f"train.micro_batch_size x data-parallel size = "
                          f"{t.micro_batch_size} x {dp}")
    microbatches = t.global_batch_size // (t.micro_batch_size * dp)
    if vpp is not None and microbatches % pp:
        raise ConfigError(f"the interleaved schedule needs the number of microbatches "
                          f"({microbatches}) to be a multiple of "
                          f"parallel.pipeline_model_parallel_size={pp}")


def _check_layer_implementation(cfg: Config) -> None:
    """Transformer Engine, sequence parallel, FP8 and the device must fit together."""
    p, t = cfg.parallel, cfg.train
    te = uses_transformer_engine(cfg)
    if p.sequence_parallel and not te:
        raise ConfigError("parallel.sequence_parallel needs Transformer Engine layers "
                          "(megatron-core's local spec uses torch LayerNorm, which cannot); "
                          "set parallel.sequence_parallel=false or install transformer-engine")
    if p.sequence_parallel and p.tensor_model_parallel_size == 1:
        raise ConfigError("parallel.sequence_parallel needs tensor_model_parallel_size > 1")
    if t.fp8 is not None and not te:
        raise ConfigError("train.fp8 needs Transformer Engine on a GPU")
    if cfg.model.transformer_impl == "transformer_engine" and not transformer_engine_available():
        raise ConfigError("model.transformer_impl=transformer_engine but Transformer Engine "
                          "does not import on a CUDA device here")
    if _device(cfg) == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ConfigError("train.device=cuda but no CUDA device is visible")


# Numeric ranges, as intervals ("(" / ")" exclusive, "[" / "]" inclusive); a null value of an
# optional key is not checked. Sizes that must divide each other are checked in validate().
_RANGES: dict[str, str] = {
    "model.num_query_groups": "(0, inf)", "model.ffn_hidden_size": "(0, inf)",
    "model.max_position_embeddings": "(0, inf)", "model.norm_epsilon": "(0, inf)",
    "model.rotary_base": "(0, inf)", "model.init_method_std": "(0, inf)",
    "model.hidden_dropout": "[0, 1)", "model.attention_dropout": "[0, 1)",
    "model.make_vocab_size_divisible_by": "(0, inf)",
    "parallel.distributed_timeout_minutes": "(0, inf)",
    "data.image_vocab_size": "[0, inf)", "data.caption_dropout": "[0, 1)",
    "data.synthetic_samples": "(0, inf)", "data.synthetic_image_size": "(0, inf)",
    "data.synthetic_patch_size": "(0, inf)",
    # lr 0 is allowed: a run that only evaluates a checkpoint, with its weights left as they are
    "optim.lr": "[0, inf)", "optim.min_lr": "[0, inf)", "optim.weight_decay": "[0, inf)",
    "optim.adam_beta1": "[0, 1)", "optim.adam_beta2": "[0, 1)", "optim.adam_eps": "(0, inf)",
    "optim.clip_grad": "[0, inf)", "optim.lr_warmup_iters": "[0, inf)",
    "optim.lr_decay_iters": "(0, inf)",
    "train.eval_interval": "(0, inf)", "train.eval_iters": "(0, inf)",
    "train.exit_interval": "(0, inf)", "train.max_consecutive_skips": "(0, inf)",
    "train.z_loss_weight": "[0, inf)", "train.ema_decay": "(0, 1)",
    "train.sample_interval": "(0, inf)", "train.sample_count": "[0, inf)",
    "checkpoint.save_interval": "(0, inf)", "logging.peak_tflops_per_gpu": "(0, inf)",
}


def _in_interval(value: float, interval: str) -> bool:
    low, high = (float(x) for x in interval[1:-1].split(","))
    above = value >= low if interval[0] == "[" else value > low
    below = value <= high if interval[-1] == "]" else value < high
    return above and below


def _check_ranges(values: Any, section: str) -> None:
    for key, interval in _RANGES.items():
        if key.split(".")[0] != section:
            continue
        value = getattr(values, key.split(".")[1])
        if value is not None and not _in_interval(value, interval):
            raise ConfigError(f"{key}={value} is outside {interval}")


def _check_data_paths(d: DataConfig) -> None:
    if d.data_path is not None and d.data_paths:
        raise ConfigError("set data.data_path (one prefix) or data.data_paths (a blend), "
                          "not both")
    if d.data_weights and len(d.data_weights) != len(d.data_paths):
        raise ConfigError(f"data.data_weights has {len(d.data_weights)} weights for "
                          f"{len(d.data_paths)} data.data_paths")
    if any(w <= 0 for w in d.data_weights):
        raise ConfigError(f"data.data_weights must be positive, got {d.data_weights}")


def _check_training_extras(t: TrainConfig) -> None:
    if t.engine == "deepspeed" and (t.z_loss_weight or t.ema_decay is not None):
        raise ConfigError("train.z_loss_weight and train.ema_decay are implemented for "
                          "train.engine=megatron only")


# Parameter groups model.freeze may name (megatron_t2i/model/freeze.py applies them).
FREEZE_GROUPS = ("embeddings", "output_layer", "attention", "mlp", "norms", "transformer",
                 "text_rows")


def _check_freeze_names(names: list[str], tied_embeddings: bool) -> None:
    """Refuse unknown names (with the closest valid one) and combinations that cannot mean
    what they say."""
    for name in names:
        if name not in FREEZE_GROUPS:
            close = difflib.get_close_matches(name, FREEZE_GROUPS, n=1, cutoff=0.5)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise ConfigError(f"model.freeze: unknown group {name!r}{hint}; valid groups: "
                              f"{list(FREEZE_GROUPS)}")
    if len(set(names)) != len(names):
        raise ConfigError(f"model.freeze: {list(names)} names a group twice")
    if tied_embeddings and ("embeddings" in names) != ("output_layer" in names):
        raise ConfigError("model.freeze: with tied embeddings "
                          "(model.untie_embeddings_and_output_weights=false) the output layer "
                          "is the word-embedding table: freeze 'embeddings' and "
                          "'output_layer' together or neither")
    whole = {"embeddings", "output_layer", "transformer"}
    if whole <= set(names) or {"embeddings", "output_layer", "attention", "mlp",
                               "norms"} <= set(names):
        raise ConfigError(f"model.freeze: {list(names)} freezes every parameter; "
                          f"nothing would train")


def _check_exit_signals(names: list[str]) -> None:
    import signal

    for name in names:
        if name.strip().upper() not in signal.Signals.__members__:
            raise ConfigError(f"train.exit_signals: {name!r} is not a signal name "
                              f"(for example SIGTERM, SIGUSR1)")
        if name.strip().upper() in ("SIGKILL", "SIGSTOP"):
            raise ConfigError(f"train.exit_signals: {name} cannot be caught")


def caption_budget(cfg: Config) -> int:
    """Caption tokens that fit: seq_length + 1 = 1 + caption + 1 + image + 1."""
    return cfg.model.seq_length + 1 - 3 - cfg.data.image_tokens_per_sample


def split_weights(split: str) -> list[float]:
    """data.split ("90,5,5") as train/valid/test weights; refuses malformed values."""
    try:
        weights = [float(x) for x in split.split(",")]
    except ValueError:
        raise ConfigError(f"data.split={split!r}: expected three comma-separated weights") from None
    if len(weights) != 3 or any(w < 0 for w in weights) or weights[0] <= 0:
        raise ConfigError(f"data.split={split!r}: expected three weights >= 0, train > 0")
    return weights


def _positive(values: Any, section: str, names: list[str]) -> None:
    for name in names:
        value = getattr(values, name)
        if value <= 0:
            raise ConfigError(f"{section}.{name} must be positive, got {value}")


def save_resolved(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


# ---- the DeepSpeed section -----------------------------------------------------------------
# DeepSpeed's JSON config is generated from this config (train.engine=deepspeed):
#
#     ds = deepspeed_config(cfg, world_size=8, on_cuda=True)  # what deepspeed.initialize gets
#
# Every setting the project's config owns is written from it: batch sizes and accumulation
# (train.*), clipping (optim.clip_grad), precision (train.precision), ZeRO stage and offload
# (deepspeed.*). A user JSON (deepspeed.config_json) adds what the project has no key for
# (bucket sizes, overlap_comm, ...); where it sets a key the generated config also sets, the
# values must agree, so the two can never silently disagree. The optimizer (torch AdamW with
# megatron-core's parameter groups) and the LR schedule (megatron-core's) are the engine's own,
# so the JSON may not bring "optimizer" or "scheduler" sections. It lives with the config (no
# torch, no deepspeed) because validation builds it, before any process group starts.

# Which project key owns each generated DeepSpeed key (for the refusal messages).
_OWNERS = {
    "train_batch_size": "train.global_batch_size",
    "train_micro_batch_size_per_gpu": "train.micro_batch_size",
    "gradient_accumulation_steps": "train.global_batch_size / (train.micro_batch_size x DP)",
    "gradient_clipping": "optim.clip_grad",
    "bf16.enabled": "train.precision",
    "communication_data_type": "train.precision",
    "zero_optimization.stage": "deepspeed.zero_stage",
    "zero_optimization.offload_optimizer.device": "deepspeed.offload_optimizer",
    "zero_force_ds_cpu_optimizer": "the engine's optimizer (torch AdamW)",
}
# The engine brings these itself.
_REFUSED_SECTIONS = {
    "optimizer": "the optimizer is torch AdamW with megatron-core's parameter groups; "
                 "set optim.* instead",
    "scheduler": "the LR schedule is megatron-core's OptimizerParamScheduler; "
                 "set optim.lr, optim.lr_warmup_iters, optim.lr_decay_style instead",
}
# Defaults the user JSON may change: the trainer logs every step itself.
_DEFAULTS = {"steps_per_print": 2**31 - 1}


def generated_config(cfg: Config, world_size: int) -> dict[str, Any]:
    """The keys the project's config owns. DP = world size (the engine runs TP = PP = 1)."""
    t = cfg.train
    gas = t.global_batch_size // (t.micro_batch_size * world_size)
    bf16 = t.precision == "bf16"
    ds: dict[str, Any] = {
        "train_batch_size": t.global_batch_size,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": gas,
        "gradient_clipping": cfg.optim.clip_grad,
        "bf16": {"enabled": bf16},
        "zero_optimization": {
            "stage": cfg.deepspeed.zero_stage,
            "offload_optimizer": {"device": "cpu" if cfg.deepspeed.offload_optimizer
                                  else "none"},
        },
        # a torch optimizer may run the offloaded step (DeepSpeedCPUAdam would JIT-compile)
        "zero_force_ds_cpu_optimizer": False,
    }
    if bf16:
        # as the megatron engine (grad_reduce_in_fp32): gradients are reduced in fp32
        ds["communication_data_type"] = "fp32"
    return ds


def deepspeed_config(cfg: Config, world_size: int, on_cuda: bool) -> dict[str, Any]:
    """The generated config plus the user JSON's additions; refuses disagreements."""
    ds = _merge(dict(_DEFAULTS), generated_config(cfg, world_size), path="", source=None)
    user = read_user_json(cfg.deepspeed.config_json)
    if not user:
        return ds
    source = cfg.deepspeed.config_json
    for section, why in _REFUSED_SECTIONS.items():
        if section in user:
            raise ConfigError(f"{source}: section {section!r} is not accepted: {why}")
    fp16 = user.get("fp16", {})
    if isinstance(fp16, dict) and fp16.get("enabled") not in (None, False, "auto"):
        if not on_cuda:
            raise ConfigError(f"{source}: fp16.enabled=true, but DeepSpeed cannot run fp16 on "
                              f"the CPU; use train.precision=bf16 or fp32")
        if cfg.train.precision != "fp32":
            raise ConfigError(f"{source}: fp16.enabled=true disagrees with "
                              f"train.precision={cfg.train.precision}")
    for key in [k for k, v in _DEFAULTS.items() if k in user]:
        ds[key] = user[key]
    return _merge(ds, {k: v for k, v in user.items() if k not in _DEFAULTS}, path="",
                  source=source)


def read_user_json(path: str | None) -> dict[str, Any]:
    if path is None:
        return {}
    try:
        raw = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"deepspeed.config_json: file not found: {path}") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"deepspeed.config_json: {path} is not valid JSON: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"deepspeed.config_json: {path} must hold a JSON object")
    return raw


def _merge(base: dict[str, Any], extra: dict[str, Any], path: str,
           source: str | None) -> dict[str, Any]:
    """base + extra; a leaf both set must be equal (source names the user JSON)."""
    out = dict(base)
    for key, value in extra.items():
        dotted = f"{path}{key}"
        if key not in out:
            out[key] = value
        elif isinstance(out[key], dict) and isinstance(value, dict):
            out[key] = _merge(out[key], value, dotted + ".", source)
        elif out[key] != value and value != "auto":
            owner = _OWNERS.get(dotted, "the project's config")
            raise ConfigError(f"{source}: {dotted}={value!r} disagrees with the value "
                              f"{out[key]!r} generated from {owner}; remove it from the JSON")
    return out


def _check_deepspeed(cfg: Config, world_size: int) -> None:
    """Refuse what the DeepSpeed engine cannot run, naming the keys involved."""
    p, t = cfg.parallel, cfg.train
    for key in ("tensor_model_parallel_size", "pipeline_model_parallel_size"):
        if getattr(p, key) != 1:
            raise ConfigError(f"train.engine=deepspeed runs the model without tensor or "
                              f"pipeline parallelism (ZeRO shards over data parallel); got "
                              f"parallel.{key}={getattr(p, key)}: use train.engine=megatron "
                              f"for TP / PP")
    if p.virtual_pipeline_model_parallel_size is not None:
        raise ConfigError("train.engine=deepspeed has no pipeline schedule: unset "
                          "parallel.virtual_pipeline_model_parallel_size")
    for key in ("use_distributed_optimizer", "overlap_grad_reduce", "overlap_param_gather"):
        if getattr(p, key):
            raise ConfigError(f"parallel.{key} belongs to the megatron engine; with "
                              f"train.engine=deepspeed, ZeRO shards the optimizer "
                              f"(deepspeed.zero_stage) and DeepSpeed overlaps communication "
                              f"(zero_optimization.overlap_comm in deepspeed.config_json)")
    if cfg.deepspeed.zero_stage not in (1, 2, 3):
        raise ConfigError(f"deepspeed.zero_stage={cfg.deepspeed.zero_stage}: expected 1, 2 "
                          f"or 3")
    if t.fp8 is not None:
        raise ConfigError("train.fp8 needs the megatron engine (Transformer Engine recipes); "
                          "unset it with train.engine=deepspeed")
    if t.nan_policy != "stop":
        raise ConfigError("train.nan_policy=skip needs the megatron engine: DeepSpeed applies "
                          "the update inside engine.step(); use train.nan_policy=stop")
    if not cfg.checkpoint.save_optimizer:
        raise ConfigError("checkpoint.save_optimizer=false cannot work with "
                          "train.engine=deepspeed: ZeRO checkpoints keep the model's fp32 "
                          "weights in the optimizer partitions")
    if cfg.checkpoint.async_save:
        raise ConfigError("checkpoint.async_save=true needs the megatron engine "
                          "(dist_checkpointing); unset it with train.engine=deepspeed")
    deepspeed_config(cfg, world_size, on_cuda=_device(cfg) == "cuda")
