"""LoRA adapters: put on a model (fresh or from a saved adapter), saved in mlx-lm's format
(``adapters.safetensors`` + ``adapter_config.json``), and checkpointed with the optimizer state
and the run's progress, swapped in atomically so that a resume finds the last good one.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from tracer import __version__
from tracer.config import LoraConfig
from tracer.errors import TracerError
from tracer.runs import CHECKPOINTS, read_json


def add_lora(model: nn.Module, lora: LoraConfig | dict) -> None:
    """Freeze the model and put LoRA adapters on the configured projections.

    ``lora`` is our :class:`LoraConfig` or an mlx-lm adapter config dict (``num_layers`` +
    ``lora_parameters``, as read from an ``adapter_config.json``).
    """
    from mlx_lm.tuner.utils import linear_to_lora_layers

    cfg = lora_config(lora, model) if isinstance(lora, LoraConfig) else lora
    model.freeze()
    num_layers = len(model.layers) if cfg["num_layers"] < 0 else min(cfg["num_layers"], len(model.layers))
    linear_to_lora_layers(model, num_layers, cfg["lora_parameters"])


def lora_config(lora: LoraConfig, model: nn.Module) -> dict:
    """mlx-lm's adapter_config fields for our LoRA settings."""
    return {
        "fine_tune_type": "lora",
        "num_layers": len(model.layers) if lora.num_layers < 0 else lora.num_layers,
        "lora_parameters": {"rank": lora.rank, "scale": lora.alpha / lora.rank, "dropout": lora.dropout,
                            "keys": list(lora.keys)},
    }


def read_adapter_config(path: str | Path) -> dict:
    p = Path(path) / "adapter_config.json"
    if not p.is_file():
        raise TracerError(f"{path}: not an adapter directory (adapter_config.json missing)")
    return read_json(p)


def attach_lora(model: nn.Module, lora: LoraConfig, seed: int, init_adapter: str | None = None) -> dict:
    """Seed MLX's generator with ``seed``, then put LoRA on ``model``: initialised from it, or with
    ``init_adapter``'s weights and settings. Returns the adapter config saved with it."""
    mx.random.seed(seed)
    if init_adapter:
        adapter_cfg = {k: v for k, v in read_adapter_config(init_adapter).items()
                       if k in ("fine_tune_type", "num_layers", "lora_parameters")}
        add_lora(model, adapter_cfg)
        model.load_weights(str(Path(init_adapter) / "adapters.safetensors"), strict=False)
    else:
        adapter_cfg = lora_config(lora, model)
        add_lora(model, adapter_cfg)
    return adapter_cfg


def adapter_weights(model: nn.Module) -> dict[str, mx.array]:
    return dict(tree_flatten(model.trainable_parameters()))


def _write_adapter(model: nn.Module, out: Path, config: dict, base_model: str) -> None:
    tmp = out / ".adapters.tmp.safetensors"
    mx.save_safetensors(str(tmp), adapter_weights(model))
    os.replace(tmp, out / "adapters.safetensors")
    meta = dict(config, base_model=base_model, tracer_version=__version__)
    tmp_cfg = out / ".adapter_config.tmp.json"
    tmp_cfg.write_text(json.dumps(meta, indent=2))
    os.replace(tmp_cfg, out / "adapter_config.json")


def _cannot_write(where: Path, exc: Exception, kept: str) -> TracerError:
    reason = getattr(exc, "strerror", None) or str(exc).strip() or type(exc).__name__
    return TracerError(f"cannot write {where}: {reason}; {kept}")


def save_adapter(model: nn.Module, out_dir: str | Path, config: LoraConfig | dict, base_model: str) -> Path:
    """Write adapters.safetensors (trainable LoRA weights only) + adapter_config.json (mlx-lm format).
    A failed write (a full disk) removes its temporary files and raises TracerError."""
    if isinstance(config, LoraConfig):
        config = lora_config(config, model)
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        _write_adapter(model, out, config, base_model)
    except (OSError, RuntimeError) as exc:  # MLX reports a failed write as RuntimeError
        for name in (".adapters.tmp.safetensors", ".adapter_config.tmp.json"):
            (out / name).unlink(missing_ok=True)
        raise _cannot_write(out, exc, "files already there are unchanged") from None
    return out




def save_checkpoint(model: nn.Module, optimizer, out_dir: Path, config: dict, base_model: str,
                    state: dict) -> Path:
    """``out_dir/checkpoint``: adapter, optimizer state and progress, swapped in atomically; the one
    it replaces stays as ``checkpoint.prev``, to resume from if the newer one is damaged. A failed
    write (a full disk) removes the partial checkpoint and raises TracerError."""
    final, prev, tmp = (out_dir / n for n in ("checkpoint", "checkpoint.prev", "checkpoint.tmp"))
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        _write_adapter(model, tmp, config, base_model)
        mx.save_safetensors(str(tmp / "optimizer.safetensors"), dict(tree_flatten(optimizer.state)))
        (tmp / "state.json").write_text(json.dumps(state, indent=2))
    except (OSError, RuntimeError) as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise _cannot_write(final, exc, "the last good checkpoint is intact") from None
    if final.exists():
        shutil.rmtree(prev, ignore_errors=True)
        final.rename(prev)
    tmp.rename(final)
    shutil.rmtree(out_dir / "checkpoint.old", ignore_errors=True)
    return final


def _read_checkpoint(ckpt: Path) -> tuple[dict, dict, dict]:
    """(adapter weights, optimizer arrays, state) of a checkpoint, all read and checked."""
    state = json.loads((ckpt / "state.json").read_text())
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise ValueError("state.json has no step")
    adapter, opt = mx.load(str(ckpt / "adapters.safetensors")), mx.load(str(ckpt / "optimizer.safetensors"))
    mx.eval(list(adapter.values()), list(opt.values()))
    return adapter, opt, state


def load_checkpoint(model: nn.Module, optimizer, out_dir: Path, log=None) -> dict:
    """Load the newest readable checkpoint of ``out_dir`` into ``model`` and ``optimizer``; returns
    its state. A damaged newest one (a truncated file) falls back to the previous one, said through
    ``log``; none readable raises TracerError naming why."""
    damaged = []
    for name in CHECKPOINTS:
        ckpt = out_dir / name
        if not ckpt.is_dir():
            continue
        try:
            adapter, opt, state = _read_checkpoint(ckpt)
        except (OSError, ValueError, RuntimeError) as exc:  # json's errors are ValueErrors
            damaged.append(f"{ckpt} is damaged ({str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__})")
            continue
        model.load_weights(list(adapter.items()), strict=False)
        optimizer.state = tree_unflatten(list(opt.items()))
        if damaged and log:
            log(f"{damaged[0]}; resuming from {ckpt.name} at step {state['step']}")
        return state
    if damaged:
        raise TracerError(f"{'; '.join(damaged)}; no checkpoint to resume from")
    raise TracerError(f"{out_dir}: no checkpoint to resume from")
