"""One device for the whole run (DESIGN §9): chosen once, passed down, never a silent CPU fallback.

``device: auto | cpu | cuda | cuda:N`` (top level of a run config; ``pretrain.device`` follows it
unless set). :func:`resolve_device` turns the spec into a ``torch.device`` at run time — ``auto`` is
the first GPU when torch sees one, else the CPU — and refuses a CUDA spec on a machine without CUDA
in one line naming the knob. :func:`configure` sets the deterministic flags on a GPU (cuBLAS
workspace, cuDNN without autotuning, no TF32, ``torch.use_deterministic_algorithms`` with
``warn_only``): same device, same config and seed, same numbers. CPU and GPU numbers differ in the
last digits (other kernels); every seeded random stream is drawn on the CPU and moved, so the draws
themselves are the same on both (:func:`pfedpg.seeding.normal_like`).

``amp: bf16`` (CUDA only) autocasts the frozen backbone's forward and backward
(:class:`pfedpg.models.PromptedViT`); prompts, heads, the server step, clipping and DP noise stay
float32.
"""
from __future__ import annotations

import contextlib
import os
import re
from typing import Any, Callable

import torch

from pfedpg.errors import ConfigError

AMP_MODES = ("bf16",)
_SPEC = re.compile(r"^(auto|cpu|cuda)(?::(\d+))?$")


def check_device_spec(spec: object, where: str = "device") -> str:
    """The spec's syntax, at config load (no CUDA query: a config may be checked on another machine)."""
    m = _SPEC.match(spec) if isinstance(spec, str) else None
    if m is None or (m.group(2) is not None and m.group(1) != "cuda"):
        raise ConfigError(f"{where}={spec!r} is not one of auto, cpu, cuda, cuda:N")
    return spec


def check_amp(amp: object, device: str, where: str = "amp") -> None:
    if amp is None:
        return
    if amp not in AMP_MODES:
        raise ConfigError(f"{where}={amp!r} is not one of {', '.join(AMP_MODES)} (or null: float32 throughout)")
    if device == "cpu":
        raise ConfigError(f"{where}: {amp} autocasts on CUDA only; drop {where} on device: cpu")


def resolve_device(spec: str, *, amp: str | None = None, where: str = "device") -> torch.device:
    """The ``torch.device`` a spec names on this machine, or a one-line ConfigError."""
    check_device_spec(spec, where)
    if spec == "auto":
        device = torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    elif spec == "cpu":
        device = torch.device("cpu")
    else:
        if not torch.cuda.is_available():
            raise ConfigError(f"{where}={spec} but torch sees no CUDA device here; set {where}: cpu (or auto)")
        index = int(spec.split(":")[1]) if ":" in spec else 0
        count = torch.cuda.device_count()
        if index >= count:
            raise ConfigError(f"{where}={spec} but this machine has {count} CUDA device(s) (cuda:0..cuda:{count - 1}); "
                              f"set {where} to one of them, or auto")
        device = torch.device("cuda", index)
    if amp is not None and device.type != "cuda":
        raise ConfigError(f"amp: {amp} autocasts on CUDA only, and {where}={spec} is the CPU on this machine; drop amp "
                          "(null) or run on a GPU")
    return device


def configure(device: torch.device, *, deterministic: bool = True) -> None:
    """Deterministic kernels on a GPU (a no-op on the CPU, whose kernels here are deterministic for
    a fixed thread count). Call before the run's first CUDA work."""
    if device.type != "cuda":
        return
    if deterministic:
        # cuBLAS reads this when it creates its handle: before the first matmul of the process.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
        # warn_only: an op without a deterministic kernel warns (once) instead of ending the run.
        torch.use_deterministic_algorithms(True, warn_only=True)
    else:
        torch.backends.cudnn.benchmark = True
    torch.cuda.set_device(device)


def autocast(device: torch.device, amp: str | None):
    """The backbone's autocast context: bfloat16 on CUDA with ``amp: bf16``, else nothing."""
    if amp == "bf16" and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def describe(device: torch.device) -> dict[str, object]:
    """What env.json and summary.json record of the device a run used."""
    out: dict[str, object] = {"device": str(device)}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        out.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda)
    return out


def is_out_of_memory(error: BaseException) -> str | None:
    """``"device"`` or ``"host"`` when ``error`` is an allocation failure, else None."""
    if isinstance(error, torch.cuda.OutOfMemoryError):
        return "device"
    if isinstance(error, MemoryError):
        return "host"
    text = str(error)
    if isinstance(error, RuntimeError):
        if "CUDA out of memory" in text or "CUBLAS_STATUS_ALLOC_FAILED" in text:
            return "device"
        if "DefaultCPUAllocator: can't allocate memory" in text or "not enough memory" in text:
            return "host"
    return None


def out_of_memory_error(kind: str, device: str, error: BaseException) -> ConfigError:
    """The one line an allocation failure becomes, naming the knobs to turn."""
    first = (str(error).strip().splitlines() or [type(error).__name__])[0]
    first = re.sub(r"\s+", " ", first)[:160]
    where = "GPU memory" if kind == "device" else "host (CPU) memory"
    knobs = ("lower client.batch_size or client.eval_batch_size, data.image_size, or set amp: bf16"
             if kind == "device" else
             "lower client.batch_size or client.eval_batch_size, data.image_size or data.storage_size, or "
             "data.max_train_per_client")
    alt = "; or run on another device (device: ...)" if kind == "device" else ""
    return ConfigError(f"out of {where} on {device} ({first}); {knobs}{alt} — "
                       "`pfedpg-eval plan` shows what a config needs")


@contextlib.contextmanager
def out_of_memory_as_error(device: str, *, on_error: Callable[[], str | None] | None = None):
    """An allocation failure inside the block becomes the one-line :func:`out_of_memory_error`;
    ``on_error`` runs first (clean-up) and may return a note for the message."""
    try:
        yield
    except (RuntimeError, MemoryError) as e:
        kind = is_out_of_memory(e)
        if kind is None:
            raise
        note = on_error() if on_error is not None else None
        raise ConfigError(f"{out_of_memory_error(kind, device, e)}{f' ({note})' if note else ''}") from None


def to_cpu(obj: Any) -> Any:
    """Every tensor in a nest of dicts, lists and tuples, copied to the CPU."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_cpu(v) for v in obj)
    return obj
