"""One validated configuration tree, loaded from TOML.

Every knob has a type, a default and a one-line description (``Field(description=...)``).
The defaults are the closed-book RL recipe (``configs/default_rsft.toml`` only names its run), so a
preset lists just what differs from them (``configs/default.toml``, the faster SFT recipe, is
one). Unknown keys and wrong types are errors that name the file and the key.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Optional

try:  # Python 3.11+
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the tomli backport (a dependency there)
    import tomli as tomllib

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from tracer.errors import TracerError
from tracer.format import SYSTEM_PROMPT


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, strict=True)


class DataConfig(Section):
    kg: str = Field("data/kg.json", description="Knowledge graph: tracer's JSON, or a .tsv/.csv file of head, relation, tail rows.")
    types: Optional[str] = Field(
        None, description="Entity types for the KG: a .tsv/.csv file of entity, type rows (default: the JSON's, or inferred from relations).",
    )
    system_prompt: str = Field(
        SYSTEM_PROMPT, min_length=1,
        description="System message of every chat (training, eval, sampling); name your own graph's domain here.",
    )
    out_dir: str = Field("data", description="Directory the generated JSONL splits are written to.")
    seed: int = Field(1234, description="Seed for question generation.")
    train_hops: list[int] = Field([1, 2, 3], description="Hop lengths of training questions.")
    eval_hops: list[int] = Field([4, 5], description="Hop lengths of held-out eval and RSFT-pool questions.")
    eval_size: int = Field(300, ge=1, description="Number of held-out eval questions.")
    rsft_size: int = Field(600, ge=0, description="Number of RSFT-pool questions (4-5 hops, disjoint from eval).")
    train_per_hop: dict[str, int] = Field(
        {"2": 900, "3": 900}, description="Training questions per hop length above 1 (1-hop count follows from coverage)."
    )
    min_edge_coverage: int = Field(3, ge=0, description="Each KG edge appears in at least this many training paths.")
    context: Literal["closed", "facts"] = Field("closed", description="'closed': question + options; 'facts': also list KG facts.")
    max_facts: int = Field(12, ge=1, description="Facts listed per prompt in 'facts' mode (gold edges + distractor edges).")
    counterfactual: float = Field(
        0.0, ge=0, le=1,
        description="'facts' mode: add renamed copies of this share of training questions, whose facts contradict the KG.",
    )
    counterfactual_from: Literal["start", "any_hop"] = Field(
        "start",
        description="Renamed copies: 'start' renames every entity; 'any_hop' keeps the chain up to a random hop real and "
                    "renames the rest (answer included) to names the row does not use, so memory fails mid-chain.",
    )
    counterfactual_pool: float = Field(
        0.0, ge=0, le=1,
        description="'facts' mode: follow this share of RSFT-pool questions by a renamed copy (sampled and rewarded like them).",
    )
    exclude: list[str] = Field(
        [], description="Question JSONL files whose paths no generated question may take (e.g. another data directory's eval and rsft splits, for a fresh RSFT pool)."
    )
    shuffled_eval: bool = Field(True, description="Also write eval_shuffled.jsonl (options permuted) for robustness.")
    letter_tolerance: float = Field(0.03, ge=0, le=0.25, description="Allowed deviation of each answer letter from 25%.")
    option_tags: bool = Field(
        False, description="Write options as `perf (A)` and end reference traces with the answer's tag, so the "
        "model copies the letter after the entity it traced to instead of looking it up.",
    )
    trace: Literal["path", "frontier"] = Field(
        "path", description="Reference traces: 'path' (one path to the answer) or 'frontier' (every entity each hop "
        "reaches: exact where a pair has several targets, and longer).",
    )

    @model_validator(mode="after")
    def _check_counterfactual(self) -> "DataConfig":
        for name in ("counterfactual", "counterfactual_pool"):
            if getattr(self, name) and self.context != "facts":
                raise ValueError(f"{name}: renamed questions need the facts in the prompt (context = 'facts')")
            if getattr(self, name) and self.trace == "frontier":
                raise ValueError(f"{name}: renamed questions have path traces only (trace = 'path')")
        return self


class ModelConfig(Section):
    path: str = Field(
        "smollm2-135m-instruct",
        description="Offline alias, local mlx-lm/HF model directory, .gguf file, or Hugging Face hub id.",
    )
    cache_dir: str = Field("~/.cache/tracer", description="Where pulled and converted models are kept.")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        "auto", description="Compute precision; 'auto' = float32 on CPU, bfloat16 on GPU."
    )


class LoraConfig(Section):
    rank: int = Field(16, ge=1, description="LoRA rank.")
    alpha: float = Field(320.0, gt=0, description="LoRA alpha; updates are scaled by alpha / rank (mlx-lm's 'scale').")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the LoRA input.")
    num_layers: int = Field(-1, ge=-1, description="Number of last transformer layers to adapt (-1 = all).")
    keys: list[str] = Field(
        ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
         "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"],
        description="Projections that receive LoRA adapters.",
    )

    @field_validator("num_layers")
    @classmethod
    def _check_num_layers(cls, v: int) -> int:
        if v == 0:
            raise ValueError("0 adapts no layer; use a count >= 1, or -1 for all")
        return v


class TrainConfig(Section):
    iters: int = Field(600, ge=1, description="Optimizer steps.")
    batch_size: int = Field(16, ge=1, description="Sequences per step.")
    learning_rate: float = Field(3e-4, gt=0, description="Peak AdamW learning rate.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    warmup: int = Field(20, ge=0, description="Linear warmup steps.")
    schedule: Literal["cosine", "linear", "constant"] = Field("cosine", description="Decay after warmup.")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="Decay target as a fraction of the peak, reached at the last step.")
    grad_clip: float = Field(1.0, ge=0, description="Global gradient-norm clip (0 = off).")
    max_seq_len: int = Field(512, ge=8, description="Longer examples are truncated.")
    val_every: int = Field(100, ge=0, description="Validation loss every N steps (0 = off).")
    val_size: int = Field(64, ge=0, description="Held-back training examples used for validation loss.")
    save_every: int = Field(100, ge=1, description="Checkpoint every N steps.")
    curriculum: bool = Field(False, description="Order training from 1-hop to 3-hop instead of shuffling.")
    share_prefix: bool = Field(True, description="Run a batch's common prompt prefix once, not once per row.")
    compile: bool = Field(
        True,
        description="On CPU with g++: each step one compiled graph with polynomial-exp SiLU/softmax/log-sum-exp (faster than MLX's element-wise exp); batches padded to widths of 8, loss positions of 32.",
    )
    answer_weight: float = Field(
        1.0, ge=0,
        description="Loss weight of the answer letter's token against 1 for every other completion token (1 = plain mean; the training loss shown is the weighted mean).",
    )
    seed: int = Field(0, description="Seed for LoRA init, data order and dropout.")


class SFTConfig(TrainConfig):
    iters: int = Field(720, ge=1, description="Optimizer steps (720 x 16 is about 5 passes over the training questions: enough to recall their facts).")
    warmup: int = Field(30, ge=0, description="Linear warmup steps.")
    val_every: int = Field(120, ge=0, description="Validation loss every N steps (0 = off).")
    save_every: int = Field(60, ge=1, description="Checkpoint every N steps.")


class RSFTConfig(TrainConfig):
    iters: int = Field(40, ge=1, description="Optimizer steps per RSFT round.")
    learning_rate: float = Field(1e-4, gt=0, description="Peak AdamW learning rate.")
    warmup: int = Field(4, ge=0, description="Linear warmup steps.")
    val_every: int = Field(0, ge=0, description="Validation loss every N steps (0 = off).")
    rounds: int = Field(6, ge=1, description="Sample → filter → fine-tune rounds, each from the latest adapter (many short rounds).")
    k_samples: int = Field(4, ge=1, description="Completions sampled per question.")
    first_samples: int = Field(
        0, ge=0,
        description="Sample this many per question first, the rest of k_samples only where they hold fewer than keep_top winners (0 = all at once).",
    )
    temperature: float = Field(0.8, ge=0, description="Sampling temperature.")
    top_p: float = Field(0.95, gt=0, le=1, description="Nucleus sampling threshold.")
    keep_top: int = Field(1, ge=1, description="Winners kept per question.")
    min_reward: float = Field(
        1.5,
        description="A sample must reach this reward to be kept (1.5 = right answer and every gold-path entity named; "
                    "lower keeps right answers from traces cut short, which teaches stopping early).",
    )
    require_correct: bool = Field(True, description="Keep only samples whose answer is correct.")
    max_questions: int = Field(0, ge=0, description="Sample at most this many RSFT-pool questions per round (0 = all).")
    rotate: bool = Field(
        True, description="With max_questions: each round takes the next questions of the pool (wrapping), not the first ones again."
    )
    max_tokens: int = Field(96, ge=1, description="Token budget per sampled completion (a 5-hop trace and its answer fit).")
    replay: float = Field(0.5, ge=0, description="SFT examples mixed in per winner, to keep earlier skills.")

    @model_validator(mode="after")
    def _check_first_samples(self) -> "RSFTConfig":
        if self.first_samples and self.first_samples >= self.k_samples:
            raise ValueError(f"first_samples: must be below k_samples ({self.k_samples}), or 0 to sample all at once")
        return self


class GRPOConfig(TrainConfig):
    """GRPO settings. Of the inherited fields, val_every, val_size, max_seq_len, curriculum,
    answer_weight and compile are unused (no validation loss; steps are not compiled)."""

    iters: int = Field(150, ge=1, description="GRPO steps, each one round of sample, score and update.")
    batch_questions: int = Field(16, ge=1, description="Questions drawn from the pool per step (B).")
    group_size: int = Field(
        2, ge=2, description="Completions sampled per question (G), compared within their group (the paper uses 2).")
    batch_size: int = Field(
        16, ge=1, description="Completions per forward/backward pass of the update (gradients summed over all B x G).")
    sample_batch_size: int = Field(32, ge=1, description="Completions decoded together when sampling.")
    temperature: float = Field(
        1.0, gt=0, description="Sampling temperature (1 samples the very policy the loss is computed for).")
    top_p: float = Field(
        1.0, gt=0, le=1,
        description="Nucleus sampling threshold (below 1 samples away from the policy the loss assumes).")
    max_tokens: int = Field(
        96, ge=1, description="Token budget per sampled completion (a 5-hop trace and its answer fit).")
    beta: float = Field(
        0.05, ge=0,
        description="Weight of the KL penalty to the starting adapter (k3 estimator; 0 = off, no reference pass).")
    eps_low: float = Field(0.2, ge=0, lt=1, description="The ratio is clipped below at 1 - eps_low.")
    eps_high: float = Field(
        0.2, ge=0, description="The ratio is clipped above at 1 + eps_high (DAPO raises it above eps_low).")
    advantage_scale: Literal["std", "none"] = Field(
        "std", description="'std': (r - group mean) / group std (GRPO); 'none': r - group mean (Dr.GRPO).")
    learning_rate: float = Field(
        1e-5, gt=0,
        description="Peak AdamW learning rate: a little above the paper's 8e-6, as LoRA moves fewer weights; "
                    "far below RSFT's, as a policy gradient from B x G samples is noisy.")
    warmup: int = Field(0, ge=0, description="Linear warmup steps.")
    schedule: Literal["cosine", "linear", "constant"] = Field("constant", description="Decay after warmup.")
    val_every: int = Field(0, ge=0, description="Unused: GRPO has no validation loss.")
    save_every: int = Field(25, ge=1, description="Checkpoint every N steps.")
    seed: int = Field(0, description="Seed for LoRA init, the questions drawn and the sampling.")


class ConsolidateConfig(TrainConfig):
    iters: int = Field(150, ge=1, description="Optimizer steps of the consolidation pass.")
    learning_rate: float = Field(1e-4, gt=0, description="Peak AdamW learning rate.")
    warmup: int = Field(10, ge=0, description="Linear warmup steps.")
    val_every: int = Field(0, ge=0, description="Validation loss every N steps (0 = off).")
    save_every: int = Field(50, ge=1, description="Checkpoint every N steps.")
    hops: list[int] = Field([1], description="Hop lengths of the training questions rehearsed beside the winners.")


class EvalConfig(Section):
    max_examples: int = Field(0, ge=0, description="Evaluate at most this many questions (0 = all).")
    max_tokens: int = Field(96, ge=1, description="Token budget per completion (a 5-hop trace and its answer fit).")
    batch_size: int = Field(32, ge=1, description="Prompts generated together.")
    workers: int = Field(0, ge=0, description="Generation processes for eval and RSFT sampling (0 = auto: one per core on CPU, at most 2).")
    shuffled: bool = Field(True, description="Also evaluate eval_shuffled.jsonl and report shuffle agreement.")
    seed: int = Field(0, description="Seed for generation (greedy decoding ignores it).")


class RewardConfig(Section):
    correct: float = Field(1.0, description="Correctness score of a right answer.")
    incorrect: float = Field(-2.0, description="Correctness score of a wrong answer.")
    invalid: float = Field(-2.0, description="Total reward of an unparseable completion.")
    w_correct: float = Field(1.0, description="Weight of correctness in the total.")
    w_path: float = Field(0.5, description="Weight of path reward in the total.")
    min_hits: int = Field(2, ge=0, description="Trace nodes on the question's chain (its start included) before path reward counts.")
    max_path_reward: float = Field(1.0, description="Cap on the path reward.")
    path_scale: float = Field(1.0, description="Path reward = path_scale x path coverage (+ hit_bonus), capped at max_path_reward.")
    hit_bonus: float = Field(0.0, description="Added to the path reward when at least min_hits trace nodes are on the chain.")
    gate_coverage: bool = Field(True, description="Path reward only with at least min_hits nodes on the chain (false: coverage always counts).")
    repetition_factor: bool = Field(False, description="Multiply the path reward by the paper's token-repetition factor of the trace.")
    repeat_max: int = Field(2, ge=1, description="An entity named more often than this is spam.")
    spam_penalty: float = Field(0.5, ge=0, description="Penalty subtracted when any entity is spammed.")


class RunConfig(Section):
    name: str = Field("run", description="Run name; the run directory is <runs_dir>/<name>.")
    runs_dir: str = Field("data/runs", description="Parent directory of run directories.")
    phases: list[Literal["base", "sft", "rsft", "grpo", "consolidate"]] = Field(
        ["base", "sft", "rsft", "consolidate"], description="Pipeline phases `tracer run` executes, in order."
    )
    seed: int = Field(1234, description="Master seed recorded in meta.json.")

    @field_validator("name")
    @classmethod
    def _one_component(cls, v: str) -> str:
        if v in ("", ".", "..") or "/" in v or "\\" in v:
            raise ValueError("expected a directory name (not empty, '.' or '..', no path separators)")
        return v


class Config(Section):
    data: DataConfig = Field(default_factory=DataConfig, description="Question generation.")
    model: ModelConfig = Field(default_factory=ModelConfig, description="Base model.")
    lora: LoraConfig = Field(default_factory=LoraConfig, description="LoRA adapters.")
    sft: SFTConfig = Field(default_factory=SFTConfig, description="Supervised fine-tuning on reference traces.")
    rsft: RSFTConfig = Field(default_factory=RSFTConfig, description="Rejection-sampling fine-tuning.")
    grpo: GRPOConfig = Field(default_factory=GRPOConfig, description="GRPO: policy-gradient RL with the KG reward.")
    consolidate: ConsolidateConfig = Field(
        default_factory=ConsolidateConfig,
        description="One SFT pass after RSFT on the last round's winners plus short training questions.",
    )
    eval: EvalConfig = Field(default_factory=EvalConfig, description="Evaluation.")
    reward: RewardConfig = Field(default_factory=RewardConfig, description="KG reward weights.")
    run: RunConfig = Field(default_factory=RunConfig, description="Pipeline run.")

    @model_validator(mode="after")
    def _check_hops(self) -> "Config":
        if not self.data.train_hops or min(self.data.train_hops) < 1:
            raise ValueError("data.train_hops: expected hop lengths >= 1")
        if not self.data.eval_hops or min(self.data.eval_hops) < 1:
            raise ValueError("data.eval_hops: expected hop lengths >= 1")
        phases = self.run.phases
        if "rsft" in phases and ("sft" not in phases or phases.index("sft") > phases.index("rsft")):
            raise ValueError("run.phases: 'rsft' starts from the run's SFT adapter, so 'sft' must come before it")
        if "grpo" in phases and ("sft" not in phases or phases.index("sft") > phases.index("grpo")):
            raise ValueError("run.phases: 'grpo' starts from the run's SFT adapter, so 'sft' must come before it")
        if "consolidate" in phases and ("rsft" not in phases or phases.index("rsft") > phases.index("consolidate")):
            raise ValueError("run.phases: 'consolidate' trains on RSFT winners, so 'rsft' must come before it")
        return self


def _describe_error(err: dict[str, Any]) -> str:
    loc = ".".join(str(p) for p in err["loc"])
    if err["type"] == "extra_forbidden":
        return f"{loc}: unknown key"
    msg = err["msg"].removeprefix("Value error, ")
    got = err.get("input")
    if isinstance(got, (str, int, float, bool)) and err["type"] != "missing":
        msg = f"{msg}, got {got!r}"
    return f"{loc}: {msg}" if loc else msg


def config_from_dict(data: dict[str, Any], source: str = "<config>") -> Config:
    """Validate a plain dict; errors name the source and the key."""
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        errs = e.errors()
        more = f" (+{len(errs) - 1} more)" if len(errs) > 1 else ""
        raise TracerError(f"{source}: {_describe_error(errs[0])}{more}") from None


def load_config(path: str | Path | None) -> Config:
    """Load a TOML config; ``None`` gives the defaults."""
    if path is None:
        return Config()
    p = Path(path)
    if not p.is_file():
        raise TracerError(f"{p}: no such config file")
    try:
        data = tomllib.loads(p.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise TracerError(f"{p}: invalid TOML: {e}") from None
    except UnicodeDecodeError:
        raise TracerError(f"{p}: not a UTF-8 text file") from None
    return config_from_dict(data, str(p))


def override(cfg: Config, **dotted: Any) -> Config:
    """Return a copy with ``section__key=value`` overrides applied (``None`` values are skipped)."""
    data = cfg.model_dump()
    for key, value in dotted.items():
        if value is None:
            continue
        section, name = key.split("__", 1)
        data[section][name] = value
    return config_from_dict(data, "command line")


def to_toml(cfg: Config) -> str:
    """Serialise the resolved config as TOML (for run directories)."""
    lines: list[str] = []
    for section, values in cfg.model_dump().items():
        lines.append(f"[{section}]")
        for key, value in values.items():
            if value is not None:  # TOML has no null: an unset optional key is left out
                lines.append(f"{key} = {_toml_value(value)}")
        lines.append("")
    return "\n".join(lines)


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f'"{k}" = {_toml_value(x)}' for k, x in v.items()) + " }"
    raise TypeError(f"cannot write {type(v).__name__} as TOML")
