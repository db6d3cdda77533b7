"""The CPU compatibility layer: installed only on the CPU platform, fully undone, and enough
for megatron-core's CUDA-addressed code (device arguments, type strings, the RNG tracker)."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest
import torch
from conftest import world_of_one
from megatron.core import parallel_state, tensor_parallel
from megatron.core.tensor_parallel import random as mrandom

from megatron_t2i.config import ConfigError, load_config, validate
from megatron_t2i.platform import (
    Platform,
    cpu_compat_active,
    install_cpu_compat,
    resolve_backend,
    resolve_device,
    select_platform,
    uninstall_cpu_compat,
)

uninstall_cpu_compat()  # whatever ran before, take the originals from a clean torch.cuda
CUDA_NAMES = ("current_device", "set_device", "device_count", "synchronize", "get_rng_state",
              "set_rng_state", "manual_seed", "manual_seed_all", "Stream", "Event",
              "current_stream", "stream", "empty_cache", "memory_allocated")
ORIGINAL_CUDA = {name: getattr(torch.cuda, name) for name in CUDA_NAMES}
ORIGINAL_MEGATRON = {name: getattr(mrandom, name)
                     for name in ("_get_cuda_rng_state", "_set_cuda_rng_state")}
HAS_CUDA = torch.cuda.is_available()


@pytest.fixture(autouse=True)
def no_layer_left_behind() -> Iterator[None]:
    uninstall_cpu_compat()
    yield
    uninstall_cpu_compat()


def _assert_originals_restored() -> None:
    assert not cpu_compat_active()
    for name, original in ORIGINAL_CUDA.items():
        assert getattr(torch.cuda, name) is original, f"torch.cuda.{name} not restored"
    for name, original in ORIGINAL_MEGATRON.items():
        assert getattr(mrandom, name) is original, f"megatron {name} not restored"
    assert torch.empty(2).type() == "torch.FloatTensor"  # the function mode is gone too


# ---- the CPU platform --------------------------------------------------------------------

def test_cpu_platform_installs_the_layer() -> None:
    platform = select_platform("cpu")
    assert platform == Platform(device_type="cpu", backend="gloo")
    assert platform.device() == torch.device("cpu")
    assert cpu_compat_active()
    assert torch.cuda.current_device is not ORIGINAL_CUDA["current_device"]
    assert torch.cuda.current_device() == 0
    assert mrandom._get_cuda_rng_state is not ORIGINAL_MEGATRON["_get_cuda_rng_state"]


def test_cuda_addressed_tensor_code_runs_on_cpu() -> None:
    select_platform("cpu")
    t = torch.zeros(2, device="cuda")
    assert t.device.type == "cpu"
    assert torch.ones(3, device=torch.device("cuda", 0)).device.type == "cpu"
    assert torch.empty(1, device=torch.cuda.current_device()).device.type == "cpu"
    assert t.cuda() is t
    assert t.to("cuda").device.type == "cpu"
    assert t.to(device="cuda:0", dtype=torch.float64).dtype == torch.float64
    assert torch.empty(2).type() == "torch.cuda.FloatTensor"
    assert torch.empty(2, dtype=torch.bfloat16).type() == "torch.cuda.BFloat16Tensor"
    assert torch.empty(2, dtype=torch.float16).type() == "torch.cuda.HalfTensor"
    assert torch.empty(2, dtype=torch.int64).type() == "torch.LongTensor"  # others unchanged
    assert t.pin_memory() is t


def test_cuda_runtime_calls_are_inert() -> None:
    select_platform("cpu")
    torch.cuda.synchronize()
    torch.cuda.set_device(0)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        stream.wait_stream(torch.cuda.current_stream())
    event = torch.cuda.Event(enable_timing=True)
    event.record()
    assert event.query() and event.elapsed_time(event) == 0.0
    assert torch.cuda.device_count() == 1 and torch.cuda.memory_allocated() == 0


def test_cuda_rng_calls_drive_the_cpu_generator() -> None:
    select_platform("cpu")
    torch.cuda.manual_seed(7)
    a = torch.rand(4)
    state = torch.cuda.get_rng_state()
    b = torch.rand(4)
    torch.cuda.set_rng_state(state)
    assert torch.equal(torch.rand(4), b)
    torch.manual_seed(7)
    assert torch.equal(torch.rand(4), a)


# ---- undoing it --------------------------------------------------------------------------

def test_uninstall_restores_originals_and_mode() -> None:
    select_platform("cpu")
    uninstall_cpu_compat()
    _assert_originals_restored()


@pytest.mark.skipif(HAS_CUDA, reason="needs a machine without CUDA")
def test_after_uninstall_cuda_tensors_fail_as_usual() -> None:
    select_platform("cpu")
    torch.zeros(1, device="cuda")
    uninstall_cpu_compat()
    with pytest.raises((RuntimeError, AssertionError)):
        torch.zeros(1, device="cuda")


def test_install_is_idempotent() -> None:
    install_cpu_compat()
    install_cpu_compat()
    select_platform("cpu")
    uninstall_cpu_compat()  # one uninstall undoes everything, no second mode left on the stack
    _assert_originals_restored()
    uninstall_cpu_compat()  # and a second is harmless
    _assert_originals_restored()


def test_megatron_core_without_the_private_rng_names_is_refused_untouched(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # A release outside the supported range that renamed what the layer replaces.
    monkeypatch.delattr(mrandom, "_set_cuda_rng_state")
    with pytest.raises(RuntimeError, match=r"_set_cuda_rng_state.*>=0\.16\.1,<0\.20"):
        select_platform("cpu")
    assert not cpu_compat_active()
    assert torch.cuda.current_device is ORIGINAL_CUDA["current_device"]
    assert torch.empty(2).type() == "torch.FloatTensor"


def test_installed_megatron_core_is_in_the_declared_range() -> None:
    # The range pyproject declares is the one CI tests at both ends (.ci/run).
    from pathlib import Path

    import megatron.core
    from packaging.requirements import Requirement

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
    deps = tomllib.loads(pyproject.read_text())["project"]["dependencies"]
    (spec,) = [Requirement(d).specifier for d in deps if Requirement(d).name == "megatron-core"]
    assert str(spec) == "<0.20,>=0.16.1"
    assert spec.contains(megatron.core.__version__)


def test_checkpoint_without_common_pt_is_refused_in_one_line_before_0_17(tmp_path) -> None:
    # megatron-core 0.17+ writes no common.pt; 0.16.x would fail deep in its loader. Runs on
    # both ends of the range in CI (.ci/smoke_oldest).
    import megatron.core
    from packaging.version import Version

    from megatron_t2i.checkpoint.layout import CheckpointError, check_core_format

    if Version(megatron.core.__version__) >= Version("0.17"):
        check_core_format(tmp_path)  # its own format: nothing to refuse
    else:
        with pytest.raises(CheckpointError, match=r"0\.17 or later .* no common\.pt"):
            check_core_format(tmp_path)
    (tmp_path / "common.pt").write_bytes(b"")
    check_core_format(tmp_path)  # a common.pt checkpoint loads on every supported version


def test_unknown_device_is_refused_without_installing() -> None:
    with pytest.raises(ValueError, match="tpu"):
        select_platform("tpu")
    assert not cpu_compat_active()


# ---- the CUDA platform: never the layer -------------------------------------------------

@pytest.mark.skipif(HAS_CUDA, reason="needs a machine without CUDA")
def test_cuda_without_a_device_raises_and_leaves_no_layer() -> None:
    with pytest.raises(RuntimeError, match="no CUDA device"):
        select_platform("cuda")
    assert not cpu_compat_active()


@pytest.mark.skipif(HAS_CUDA, reason="needs a machine without CUDA")
def test_cuda_after_cpu_uninstalls_before_raising() -> None:
    select_platform("cpu")
    assert cpu_compat_active()
    with pytest.raises(RuntimeError, match="no CUDA device"):
        select_platform("cuda")
    _assert_originals_restored()


def test_auto_with_cuda_chooses_cuda_and_no_layer(monkeypatch: pytest.MonkeyPatch) -> None:
    select_platform("cpu")  # a CPU run earlier in the process must not leak into a CUDA one
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert select_platform("auto") == Platform(device_type="cuda", backend="nccl")
    _assert_originals_restored()
    assert select_platform("cuda", backend="gloo") == Platform("cuda", "gloo")
    assert not cpu_compat_active()


@pytest.mark.skipif(HAS_CUDA, reason="needs a machine without CUDA")
def test_auto_without_cuda_chooses_cpu() -> None:
    assert select_platform("auto") == Platform(device_type="cpu", backend="gloo")
    assert cpu_compat_active()


@pytest.mark.parametrize("cuda_visible", [True, False])
def test_auto_device_and_backend_are_one_decision(cuda_visible, tmp_path, monkeypatch) -> None:
    """Config validation (device checks, the DeepSpeed JSON) and the platform read "auto"
    the same way, from resolve_device: a user JSON asking for fp16 is refused on the CPU only.
    """
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda_visible)
    device = "cuda" if cuda_visible else "cpu"
    assert resolve_device("auto") == device
    assert resolve_backend("auto", "auto") == ("nccl" if cuda_visible else "gloo")
    assert resolve_backend("gloo", "cuda") == "gloo"
    with pytest.raises(ValueError, match="tpu"):
        resolve_device("tpu")
    user_json = tmp_path / "ds.json"
    user_json.write_text('{"fp16": {"enabled": true}}')
    cfg = load_config(None, ["train.engine=deepspeed", "data.image_tokens_per_sample=16",
                             f"deepspeed.config_json={user_json}"])
    if cuda_visible:
        validate(cfg, world_size=1)
    else:
        with pytest.raises(ConfigError, match="cannot run fp16 on the CPU"):
            validate(cfg, world_size=1)


# ---- megatron-core's RNG tracker on the CPU ----------------------------------------------

@pytest.fixture
def single_process_group() -> Iterator[None]:
    """A world of one with gloo (model_parallel_cuda_manual_seed asks for the TP rank)."""
    with world_of_one():
        yield


def test_rng_tracker_forks_reproducible_cpu_streams(single_process_group: None,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    assert parallel_state.get_tensor_model_parallel_rank() == 0
    caplog.set_level(logging.ERROR)  # the tracker notes that the "CPU" state moved: it is ours
    tracker = tensor_parallel.get_cuda_rng_tracker()

    def draws() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        tensor_parallel.model_parallel_cuda_manual_seed(123)
        with tracker.fork():
            first = torch.rand(8, device="cuda")
        default = torch.rand(8)  # the fork left the default stream where it was
        with tracker.fork():
            second = torch.rand(8)
        return first, second, default

    first, second, default = draws()
    assert first.device.type == "cpu"
    again = draws()
    for a, b in zip((first, second, default), again):
        assert torch.equal(a, b)
    assert not torch.equal(first, default)
    assert not torch.equal(first, second)  # the forked stream advances between forks
    # default stream = data-parallel seed; forked stream = seed + 2718 + TP rank
    torch.manual_seed(123)
    assert torch.equal(default, torch.rand(8))
    torch.manual_seed(123 + 2718)
    assert torch.equal(first, torch.rand(8)) and torch.equal(second, torch.rand(8))
