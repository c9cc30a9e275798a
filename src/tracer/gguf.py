"""GGUF → mlx-lm conversion: a llama GGUF file (quantized or not) becomes a float32 Hugging Face
layout model directory (``model.safetensors``, ``config.json``, the tokenizer's files) that
``mlx_lm.load`` reads. MLX reads the GGUF tensors and metadata; the tokenizer is rebuilt with
``tokenizers`` from the vocabulary and merges in the metadata.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Callable

import mlx.core as mx

from tracer.errors import TracerError

Progress = Callable[[str, int, int], None]  # (step, done, total)

_TENSOR_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_norm": "input_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "ffn_norm": "post_attention_layernorm",
}


def permute(w: mx.array, n_heads: int) -> mx.array:
    """llama.cpp's q/k row permutation (HF half-split RoPE → interleaved RoPE), per head."""
    rows = w.shape[0]
    return w.reshape(n_heads, 2, rows // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute(w: mx.array, n_heads: int) -> mx.array:
    """Inverse of :func:`permute`: GGUF q/k rows back to the Hugging Face layout."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _scalar(meta: dict, key: str, default=None):
    v = meta.get(key, default)
    if v is None:
        raise TracerError(f"GGUF metadata lacks '{key}'")
    return v.item() if isinstance(v, mx.array) else v


def _gguf_tensor(weights: dict, name: str) -> mx.array:
    w = weights[name + ".weight"]
    scales = weights.get(name + ".scales")
    if scales is not None:
        biases = weights[name + ".biases"]
        group = 32  # GGUF block size of all legacy Q4_0/Q4_1/Q8_0 types MLX reads
        in_dim = scales.shape[-1] * group
        bits = w.shape[-1] * 32 // in_dim
        w = mx.dequantize(w, scales, biases, group_size=group, bits=bits)
    return w.astype(mx.float32)


def _gguf_tokenizer(meta: dict):
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    tokens = list(meta["tokenizer.ggml.tokens"])
    merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    types = meta.get("tokenizer.ggml.token_type")
    types = types.tolist() if isinstance(types, mx.array) else [1] * len(tokens)
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True),
         pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    special = [t for t, ty in zip(tokens, types) if ty == 3]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    return tok, special


def convert_gguf(gguf_path: str | Path, out_dir: str | Path, progress: Progress | None = None,
                 hf_id: str | None = None) -> Path:
    """Convert a llama GGUF file into a float32 HF-layout mlx-lm model directory."""
    gguf_path, out = Path(gguf_path), Path(out_dir)
    try:
        weights, meta = mx.load(str(gguf_path), return_metadata=True)
    except Exception as e:
        raise TracerError(f"{gguf_path}: cannot read GGUF file ({str(e).splitlines()[0]})") from None
    arch = _scalar(meta, "general.architecture", "?")
    if arch != "llama":
        raise TracerError(f"{gguf_path}: unsupported GGUF architecture '{arch}' (only llama)")
    n_heads = int(_scalar(meta, "llama.attention.head_count"))
    n_kv = int(_scalar(meta, "llama.attention.head_count_kv", n_heads))
    n_layers = int(_scalar(meta, "llama.block_count"))
    out.mkdir(parents=True, exist_ok=True)
    hf = _hf_weights(weights, n_heads, n_kv, progress)
    if "model.embed_tokens.weight" not in hf:
        raise TracerError(f"{gguf_path}: GGUF has no token_embd tensor")
    mx.save_safetensors(str(out / "model.safetensors"), hf, metadata={"format": "mlx"})
    config = _hf_config(meta, n_heads, n_kv, n_layers, tied="lm_head.weight" not in hf)
    config["source"] = {"gguf": gguf_path.name, "hf_id": hf_id}
    (out / "config.json").write_text(json.dumps(config, indent=2))
    ids = {k: config[f"{k}_token_id"] for k in ("bos", "eos", "pad")}
    (out / "generation_config.json").write_text(json.dumps({f"{k}_token_id": v for k, v in ids.items()}, indent=2))
    _write_tokenizer(out, meta, config, unk=int(_scalar(meta, "tokenizer.ggml.unknown_token_id", 0)))
    return out


def _hf_weights(weights: dict, n_heads: int, n_kv: int, progress: Progress | None) -> dict[str, mx.array]:
    """The GGUF tensors dequantized to float32 under their HF names, q/k rows back in the HF RoPE layout."""
    names = sorted({k.rsplit(".", 1)[0] for k in weights})
    hf: dict[str, mx.array] = {}
    for i, name in enumerate(names):
        w = _gguf_tensor(weights, name)
        if name == "token_embd":
            key = "model.embed_tokens.weight"
        elif name == "output_norm":
            key = "model.norm.weight"
        elif name == "output":
            key = "lm_head.weight"
        else:
            m = re.fullmatch(r"blk\.(\d+)\.(\w+)", name)
            if not m or m.group(2) not in _TENSOR_NAMES:
                continue  # e.g. rope_freqs: recomputed by mlx-lm
            part = m.group(2)
            if part == "attn_q":
                w = unpermute(w, n_heads)
            elif part == "attn_k":
                w = unpermute(w, n_kv)
            key = f"model.layers.{m.group(1)}.{_TENSOR_NAMES[part]}.weight"
        hf[key] = w
        mx.eval(w)
        if progress:
            progress("convert", i + 1, len(names))
    return hf


def _hf_config(meta: dict, n_heads: int, n_kv: int, n_layers: int, tied: bool) -> dict:
    """The HF ``config.json`` of a llama GGUF's metadata (``source`` is added by the caller)."""
    eos = int(_scalar(meta, "tokenizer.ggml.eos_token_id", 2))
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": int(_scalar(meta, "llama.embedding_length")),
        "num_hidden_layers": n_layers,
        "intermediate_size": int(_scalar(meta, "llama.feed_forward_length")),
        "num_attention_heads": n_heads,
        "num_key_value_heads": n_kv,
        "rms_norm_eps": float(f"{_scalar(meta, 'llama.attention.layer_norm_rms_epsilon', 1e-5):.6g}"),
        "vocab_size": int(_scalar(meta, "llama.vocab_size", len(meta["tokenizer.ggml.tokens"]))),
        "rope_theta": float(_scalar(meta, "llama.rope.freq_base", 10000.0)),
        "max_position_embeddings": int(_scalar(meta, "llama.context_length", 2048)),
        "tie_word_embeddings": tied,
        "rope_traditional": False,
        "bos_token_id": int(_scalar(meta, "tokenizer.ggml.bos_token_id", 1)),
        "eos_token_id": eos,
        "pad_token_id": int(_scalar(meta, "tokenizer.ggml.padding_token_id", eos)),
        "torch_dtype": "float32",
    }


def _write_tokenizer(out: Path, meta: dict, config: dict, unk: int) -> None:
    """``tokenizer.json``, ``tokenizer_config.json`` (with the GGUF's chat template) and
    ``special_tokens_map.json``."""
    tokens = meta["tokenizer.ggml.tokens"]
    tok, special = _gguf_tokenizer(meta)
    tok.save(str(out / "tokenizer.json"))
    specials = {"bos_token": tokens[config["bos_token_id"]], "eos_token": tokens[config["eos_token_id"]],
                "pad_token": tokens[config["pad_token_id"]], "unk_token": tokens[unk]}
    extra = [t for t in special if t not in specials.values()]
    tok_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **specials,
        "additional_special_tokens": extra,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": config["max_position_embeddings"],
    }
    if "tokenizer.chat_template" in meta:
        tok_config["chat_template"] = meta["tokenizer.chat_template"]
    (out / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2))
    (out / "special_tokens_map.json").write_text(
        json.dumps({**specials, "additional_special_tokens": extra}, indent=2)
    )
