"""CUDA + NCCL when GPUs are present; CPU + gloo otherwise.

megatron-core (0.16.1 to 0.19.x, the supported range) assumes CUDA in a handful of places
(listed in docs/platform.md):
the RNG tracker, `torch.cuda.current_device()`, hard-coded `device="cuda"` / `.cuda()` in the
pipeline schedules and p2p code, `torch.cuda.synchronize`, streams and events in DDP, and
`Tensor.type()` string checks in grad clipping and the optimizers.

On the CPU platform, `install_cpu_compat()` makes that code run unmodified:
- a `TorchFunctionMode` maps every CUDA device argument to the CPU, makes `.cuda()` a no-op
  and answers `Tensor.type()` with the CUDA type name megatron-core expects;
- `torch.cuda.*` functions megatron-core calls are replaced with CPU equivalents (RNG state of
  the CPU generator, no-op synchronize, inert streams and events);
- megatron-core's private CUDA RNG getters/setters read and write the CPU generator, so the
  RNG tracker keeps its named states there.
Everything replaced is remembered and put back by `uninstall_cpu_compat()`. It is never
installed on the CUDA platform. The two private megatron-core names it replaces are the same,
with the same signatures, in 0.16.1 and 0.19.2; a release without them is refused in one line.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

_CUDA_TYPE_NAMES = {
    "torch.FloatTensor": "torch.cuda.FloatTensor",
    "torch.HalfTensor": "torch.cuda.HalfTensor",
    "torch.BFloat16Tensor": "torch.cuda.BFloat16Tensor",
}


@dataclasses.dataclass(frozen=True)
class Platform:
    device_type: str  # "cuda" | "cpu"
    backend: str  # "nccl" | "gloo"

    @property
    def is_cuda(self) -> bool:
        return self.device_type == "cuda"

    def device(self) -> torch.device:
        if self.is_cuda:
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")


def megatron_core_release() -> str:
    """The installed megatron-core release, from its package metadata (nothing imported)."""
    from importlib.metadata import version

    return version("megatron-core")


def megatron_core_0_17_or_later() -> bool:
    """megatron-core 0.17 changed two things this project relies on: an asynchronous save
    uses NVIDIA Resiliency Extension's writer unless megatron-core's own is asked for, and a
    checkpoint's common state lives inside the torch_dist files (0.16 reads only common.pt).
    docs/platform.md."""
    from packaging.version import Version

    return Version(megatron_core_release()) >= Version("0.17")


def resolve_device(device: str = "auto") -> str:
    """"auto" -> "cuda" when a CUDA device is visible, else "cpu"; the one place it is
    decided (config validation, the DeepSpeed JSON and the platform all ask here)."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cuda", "cpu"):
        raise ValueError(f"device={device!r}: expected auto, cuda or cpu")
    return device


def resolve_backend(backend: str, device: str) -> str:
    """"auto" -> NCCL on CUDA, gloo on the CPU; an explicit backend is kept."""
    if backend != "auto":
        return backend
    return "nccl" if resolve_device(device) == "cuda" else "gloo"


def select_platform(device: str = "auto", backend: str = "auto") -> Platform:
    """Choose the platform, and on the CPU install the compatibility layer."""
    device = resolve_device(device)
    if device == "cuda":
        # Before any refusal: the layer must never outlive a request for the CUDA platform.
        uninstall_cpu_compat()
        if not torch.cuda.is_available():
            raise RuntimeError("device=cuda was asked for but no CUDA device is visible")
    else:
        install_cpu_compat()
    return Platform(device_type=device, backend=resolve_backend(backend, device))


# ---- the compatibility layer --------------------------------------------------------------

def _is_cuda_device(value: Any) -> bool:
    if isinstance(value, torch.device):
        return value.type == "cuda"
    if isinstance(value, str):
        return value.startswith("cuda")
    return isinstance(value, int) and not isinstance(value, bool)


class _CudaToCpuMode(TorchFunctionMode):
    """Runs CUDA-addressed tensor code on the CPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return _CUDA_TYPE_NAMES.get(name, name)
        if func is torch.Tensor.to:
            args = tuple("cpu" if i > 0 and _is_cuda_device(a) else a
                         for i, a in enumerate(args))
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs["device"] = "cpu"
        if func is torch.Tensor.pin_memory:
            return args[0]
        return func(*args, **kwargs)


class _InertStream:
    """Stands in for torch.cuda.Stream / Event: on the CPU everything is already in order."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __getattr__(self, name: str) -> Callable[..., Any]:
        return lambda *a, **k: None

    def __enter__(self) -> _InertStream:
        return self

    def __exit__(self, *exc: Any) -> None:
        return None

    def query(self) -> bool:
        return True

    def elapsed_time(self, other: Any) -> float:
        return 0.0


@contextlib.contextmanager
def _null_context(*args: Any, **kwargs: Any):
    yield


def _cuda_replacements() -> dict[str, Any]:
    return {
        "current_device": lambda: 0,
        "set_device": lambda *a, **k: None,
        "device_count": lambda: 1,
        "synchronize": lambda *a, **k: None,
        "empty_cache": lambda: None,
        "get_rng_state": lambda device="cuda": torch.get_rng_state(),
        "set_rng_state": lambda state, device="cuda": torch.set_rng_state(state),
        "manual_seed": lambda seed: torch.random.default_generator.manual_seed(int(seed)),
        "manual_seed_all": lambda seed: torch.random.default_generator.manual_seed(int(seed)),
        "Stream": _InertStream,
        "Event": _InertStream,
        "current_stream": lambda *a, **k: _InertStream(),
        "default_stream": lambda *a, **k: _InertStream(),
        "stream": _null_context,
        "memory_allocated": lambda *a, **k: 0,
        "max_memory_allocated": lambda *a, **k: 0,
        "memory_reserved": lambda *a, **k: 0,
    }


# The private megatron-core functions the layer replaces (megatron.core.tensor_parallel.random).
MEGATRON_PRIVATE_NAMES = ("_get_cuda_rng_state", "_set_cuda_rng_state")


def _megatron_replacements() -> list[tuple[Any, str, Any]]:
    import megatron.core
    from megatron.core.tensor_parallel import random as mrandom

    missing = [name for name in MEGATRON_PRIVATE_NAMES if not hasattr(mrandom, name)]
    if missing:
        # Checked before anything is patched, so a refusal leaves torch.cuda untouched.
        raise RuntimeError(
            f"CPU platform: megatron-core {megatron.core.__version__} has no "
            f"megatron.core.tensor_parallel.random.{', '.join(missing)}; the CPU layer "
            "supports megatron-core >=0.16.1,<0.20 (docs/platform.md)")

    def get_state(device: Any = "cuda", clone: bool = False, graph_safe: bool = False):
        return torch.get_rng_state()

    def set_state(new_state: torch.Tensor, device: int = -1, graph_safe: bool = False):
        torch.set_rng_state(new_state)

    return [(mrandom, "_get_cuda_rng_state", get_state),
            (mrandom, "_set_cuda_rng_state", set_state)]


@dataclasses.dataclass
class _Installed:
    mode: _CudaToCpuMode
    saved: list[tuple[Any, str, Any]]


_installed: _Installed | None = None


def install_cpu_compat() -> None:
    """Idempotent. Only ever called by `select_platform` for the CPU platform."""
    global _installed
    if _installed is not None:
        return
    saved = []
    targets = _megatron_replacements()  # first: it may refuse the installed megatron-core
    targets += [(torch.cuda, name, fn) for name, fn in _cuda_replacements().items()]
    for module, name, replacement in targets:
        saved.append((module, name, getattr(module, name)))
        setattr(module, name, replacement)
    mode = _CudaToCpuMode()
    mode.__enter__()
    _installed = _Installed(mode=mode, saved=saved)


def uninstall_cpu_compat() -> None:
    global _installed
    if _installed is None:
        return
    _installed.mode.__exit__(None, None, None)
    for module, name, original in reversed(_installed.saved):
        setattr(module, name, original)
    _installed = None


def cpu_compat_active() -> bool:
    return _installed is not None
