"""Tiny random llama models for tests: the real code path in seconds, no download.

``build_tiny_model`` trains a small byte-level BPE tokenizer on the given texts, builds a
randomly initialised llama with mlx-lm's own model class and saves both as an mlx-lm model
directory (config.json, model.safetensors, tokenizer.json, tokenizer_config.json) with a
ChatML chat template like SmolLM2's. ``build_for_config`` builds the one ``fixtures/tiny.toml``
runs on. Import it after ``tracer.backend.setup()`` (conftest.py does).
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


# what each family's config needs beyond llama's keys, given the head dimension
ARCHS = {
    "llama": lambda head_dim: {},
    "qwen2": lambda head_dim: {},  # biases on q/k/v
    "qwen3": lambda head_dim: {"head_dim": head_dim},  # RMS norms on q and k
    "gemma2": lambda head_dim: {"head_dim": head_dim, "query_pre_attn_scalar": head_dim,
                                "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0},
}


def train_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE tokenizer (digits split, like SmolLM2) trained on ``texts``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def build_tiny_model(
    out_dir: str | Path,
    texts: list[str],
    vocab_size: int = 512,
    hidden: int = 128,
    layers: int = 4,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int = 256,
    seed: int = 0,
    arch: str = "llama",
    tie: bool = True,
) -> Path:
    """Build and save a tiny random model + tokenizer trained on ``texts``; returns the directory.
    ``arch``: one of :data:`ARCHS` (mlx-lm's own model classes); ``tie``: tied input/output embeddings."""
    import importlib

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = train_tokenizer(texts, vocab_size)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": "<|im_start|>",
                "eos_token": "<|im_end|>",
                "pad_token": "<|endoftext|>",
                "unk_token": "<|endoftext|>",
                "chat_template": CHAT_TEMPLATE,
                "model_max_length": 2048,
            },
            indent=2,
        )
    )
    config = {
        "model_type": arch,
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "intermediate_size": intermediate,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "rms_norm_eps": 1e-5,
        "vocab_size": tok.get_vocab_size(),
        "rope_theta": 10000.0,
        "max_position_embeddings": 2048,
        "tie_word_embeddings": tie,
        "bos_token_id": tok.token_to_id("<|im_start|>"),
        "eos_token_id": tok.token_to_id("<|im_end|>"),
        **ARCHS[arch](hidden // heads),
    }
    (out / "config.json").write_text(json.dumps(config, indent=2))
    mx.random.seed(seed)
    family = importlib.import_module(f"mlx_lm.models.{arch}")
    model = family.Model(family.ModelArgs.from_dict(config))
    weights = dict(tree_flatten(model.parameters()))
    mx.save_safetensors(str(out / "model.safetensors"), weights, metadata={"format": "mlx"})
    return out


def build_for_config(cfg, out_dir: str | Path, arch: str = "llama", tie: bool = True) -> Path:
    """The tiny model of a config (a :class:`tracer.config.Config`): its tokenizer fitted to the
    config's train and eval questions (generated into ``data.out_dir`` when missing), in the chat
    format the model is trained and asked in; its weights seeded by ``run.seed``."""
    from tracer.format import SYSTEM_PROMPT
    from tracer.pipeline.workspace import Workspace

    ws = Workspace.open(cfg)
    ws.ensure_data()
    rows = ws.load_split("train") + ws.load_split("eval")
    texts = [
        f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\n{r['prompt']}<|im_end|>\n"
        f"<|im_start|>assistant\n{r['ref']['trace']}<|im_end|>\n"
        for r in rows
    ]
    return build_tiny_model(out_dir, texts, seed=cfg.run.seed, arch=arch, tie=tie)
