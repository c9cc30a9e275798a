"""Export an adapter as a standalone mlx-lm model directory, with a model card.

The LoRA update is merged into the base weights (:func:`tracer.model.fuse_lora`) and the result
is saved by mlx-lm, so ``mlx_lm.generate --model DIR`` runs it without tracer. The card
(``README.md``) states where the model came from: base model, graph, held-out metrics with their
95% interval, whether training saw eval questions, and the command that made it.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any

from tracer.errors import TracerError
from tracer.format import SYSTEM_PROMPT
from tracer.runs import read_json


TRACES = {"path": "Its traces follow one path through the graph.",
          "frontier": "Its traces list every entity each hop reaches (frontier traces)."}


def run_of(adapter: str | Path) -> tuple[Path | None, str]:
    """The run directory an adapter was trained in (``<run>/models/<phase>``) and its phase name;
    (None, name) for an adapter outside a run."""
    a = Path(adapter).resolve()
    run = a.parent.parent
    return (run if (run / "meta.json").is_file() and a.parent.name == "models" else None), a.name


def card_facts(adapter: str | Path) -> dict[str, Any]:
    """What the card says, read from the adapter and the run around it (plain data)."""
    acfg = read_json(Path(adapter) / "adapter_config.json")
    run, phase = run_of(adapter)
    facts: dict[str, Any] = {"base_model": acfg.get("base_model", "unknown"), "phase": phase,
                             "contaminated": bool(acfg.get("contaminated", False)),
                             "system_prompt": acfg.get("system_prompt", SYSTEM_PROMPT),
                             "option_tags": bool(acfg.get("option_tags", False))}
    if run is not None:
        meta = read_json(run / "meta.json")
        metrics = read_json(run / "metrics.json", default={"phases": {}})
        facts.update(run=str(run), contaminated=facts["contaminated"] or bool(meta.get("contaminated")),
                     command=meta.get("command") or f"tracer run {run / 'config.toml'}",
                     metrics=(metrics.get("phases") or {}).get(phase))
        config = run / "config.toml"
        if config.is_file():
            from tracer.config import load_config

            data = load_config(config).data
            facts.update(kg=data.kg, context=data.context, trace=data.trace)
    return facts


def model_card(facts: dict[str, Any]) -> str:
    """The README.md of an exported model."""
    lines = [f"# tracer: {facts['phase']} adapter on {facts['base_model']}", "",
             "A small language model fine-tuned with tracer to answer multi-hop questions over a "
             "knowledge graph in the format `TRACE: <entity -relation-> entity ...>` / `ANSWER: <A|B|C|D>`.", "",
             f"- base model: `{facts['base_model']}` (LoRA merged into the weights)",
             f"- graph: `{facts.get('kg', 'unknown')}` ({facts.get('context', 'closed')}-book prompts)",
             f"- trained on eval questions: {'**yes (contaminated: its scores are not held out)**' if facts['contaminated'] else 'no'}",
             f"- made by: `{facts.get('command', 'unknown')}`"]
    m = facts.get("metrics")
    if m:
        lo, hi = m["accuracy_ci"]
        lines += ["", "## Held-out evaluation", "",
                  "| questions | accuracy (95% CI) | path coverage | reward | format |", "|---:|---|---:|---:|---:|",
                  f"| {m['n']} | {100 * m['accuracy']:.1f}% [{100 * lo:.1f}–{100 * hi:.1f}] | "
                  f"{100 * m['path_coverage']:.1f}% | {m['reward']:+.2f} | {100 * m['format_rate']:.1f}% |",
                  "", "One run is one draw; see the run directory for per-hop figures and episodes."]
    system = facts["system_prompt"]
    options = ("written `Name (A)`, and the trace writes the answer with its tag (letter tags)" if facts["option_tags"]
               else "written `A) Name`")
    lines += ["", "## Use", "", "tracer prompts with this system message:", "", f"> {system}", "",
              f"The question's options are {options}.", *([TRACES[facts["trace"]]] if "trace" in facts else []), "",
              "```bash", f'mlx_lm.generate --model DIR --system-prompt {shlex.quote(system)} --prompt "..."', "```", ""]
    return "\n".join(lines)


def export(spec: str, adapter: str, out_dir: str | Path, cache_dir: str = "~/.cache/tracer",
           dtype: str = "auto") -> Path:
    """Write the fused model (mlx-lm layout) and its card to ``out_dir``, which must not exist."""
    from mlx_lm.utils import save

    from tracer import model as models

    out = Path(out_dir)
    if out.exists():
        raise TracerError(f"{out}: already exists; choose a new directory")
    facts = card_facts(adapter)
    model, tokenizer = models.load(spec, cache_dir, adapter=adapter, dtype=dtype)
    if models.fuse_lora(model) == 0:
        raise TracerError(f"{adapter}: no LoRA layer to merge (quantized base weights cannot take it)")
    path = models.resolve(spec, cache_dir)
    config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    save(out, str(path), model, tokenizer, config, donate_model=False)
    (out / "README.md").write_text(model_card(facts), encoding="utf-8")
    return out
