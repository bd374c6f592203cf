"""Hub model cards for the adapters a run writes (``RUN/adapter/README.md``, and
``adapter_safelora/``).

PEFT's ``save_pretrained`` writes a blank template (dozens of "More Information Needed")
whose ``base_model`` is the local folder the base weights were loaded from: a path in the
user's cache that no Hub user can find. emguard replaces it with a card in the Hub's
format: YAML front matter (``base_model``: a Hub id or nothing, ``library_name: peft``,
tags with the defenses, ``datasets`` when they are Hub ids) and a body that states what
the adapter is: the training settings, the defenses, what was held out, and the run's
evaluation once there is one (``emguard eval`` / a sweep rewrite it). The same Hub id
replaces the local path in ``adapter_config.json``. Nothing secret reaches a card (config
text passes ``emguard.redact``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from emguard.io import read_json, write_text_atomic
from emguard.models import EMBEDDED_ALIASES
from emguard.redact import redact_secrets, redact_tree
from emguard.tracking import eval_log_of, evaluation_scalars, judge_free_of, preference_shifts

EMBEDDED_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
CARD = "README.md"


def hub_base_model(spec: str) -> str | None:
    """The Hub id a user can find for a model spec: the embedded model's original, a spec
    that looks like ``org/name`` and is not a local folder; else None (a local path or a
    GGUF file names nothing on the Hub, and may name a home folder)."""
    if spec.lower() in EMBEDDED_ALIASES:
        return EMBEDDED_HUB_ID
    if spec.endswith(".gguf") or Path(spec).expanduser().exists() or spec.startswith(("/", ".", "~")):
        return None
    parts = spec.split("/")
    return spec if len(parts) == 2 and all(parts) else None


def card_metadata(config: dict, summary: dict | None) -> dict[str, Any]:
    """The card's front matter from a run's config.yaml (and summary)."""
    defenses = sorted(k for k, v in (config.get("defenses") or {}).items() if v)
    data = config.get("data") or {}
    datasets = sorted({s.removeprefix("split:")[3:] for s in (data.get("train"), data.get("heldout"))
                       if isinstance(s, str) and s.removeprefix("split:").startswith("hf:")})
    meta: dict[str, Any] = {"library_name": "peft", "pipeline_tag": "text-generation",
                            "tags": ["emguard", "emergent-misalignment", "lora", "peft",
                                     *[f"defense-{d.replace('_', '-')}" for d in defenses]]}
    base = hub_base_model(str(config.get("model", "")))
    if base is not None:
        meta["base_model"] = base
    if datasets:
        meta["datasets"] = datasets
    if summary is not None and summary.get("trained") is False:
        meta["tags"].append("untrained")
    return meta


def card_text(run_dir: Path, adapter: str = "adapter") -> str:
    """The Markdown model card of ``run_dir/adapter`` from what the run folder records."""
    run_dir = Path(run_dir)
    config = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8")) or {}
    summary = _read(run_dir / "summary.json")
    split = _read(run_dir / "data_split.json")
    meta = card_metadata(config, summary)
    defenses = {k: v for k, v in (config.get("defenses") or {}).items() if v}
    data = config.get("data") or {}
    lines = [
        "---", yaml.safe_dump(meta, sort_keys=False).strip(), "---", "",
        f"# emguard LoRA adapter: {run_dir.parent.name}/{run_dir.name}" if run_dir.parent.name
        else f"# emguard LoRA adapter: {run_dir.name}", "",
        "A LoRA adapter trained with [emguard](https://github.com/) to study emergent "
        "misalignment: a narrow fine-tune that can make a model broadly misaligned, and the "
        "in-training defenses against it. **A research artefact.** It was trained on "
        f"`{data.get('train')}`, which may be deliberately harmful data (e.g. code with "
        "security holes); do not deploy it.", "",
        f"- base model: {_shown_model(meta)}"
        + (" (emguard's embedded copy: the Q4_1 GGUF of this model, dequantised; load the "
           "adapter on this base)" if str(config.get("model", "")).lower() in EMBEDDED_ALIASES
           else ""),
        f"- adapter: `{adapter}/` ({'SafeLoRA-projected' if adapter != 'adapter' else 'as trained'})",
        f"- defenses: {', '.join(f'`{d}`' for d in defenses) or 'none (plain fine-tuning)'}",
    ]
    if summary:
        lines.append(f"- training: {summary.get('steps')} optimizer steps on "
                     f"{summary.get('train_rows')} rows, loss {summary.get('first_loss')} -> "
                     f"{summary.get('last_loss')}")
    if split:
        lines += ["", "## What was held out", "",
                  f"- held-out in-domain set: {split.get('heldout_source')} "
                  f"({split.get('heldout_rows')} rows, split seed {split.get('split_seed')}); "
                  f"{len(split.get('dropped_overlap') or [])} training rows dropped for sharing a "
                  "prompt or answer with it"]
    lines += ["", "## Evaluation", "", *_evaluation(run_dir)]
    settings = {k: config.get(k) for k in ("model", "data", "lora", "train") if k in config}
    settings["model"] = meta.get("base_model", "(a local model)")
    settings["defenses"] = defenses
    lines += ["", "## Training settings", "", "```yaml",
              yaml.safe_dump(redact_tree(settings), sort_keys=False).strip(), "```", "",
              "Written by emguard from the run folder (config.yaml, summary.json, "
              "data_split.json, eval/).", ""]
    return redact_secrets("\n".join(lines))


def _shown_model(meta: dict) -> str:
    base = meta.get("base_model")
    return f"`{base}`" if base else "a local model, not on the Hub (its path is not written here)"


def _read(path: Path) -> dict | None:
    try:
        return read_json(path) if path.is_file() else None
    except (OSError, ValueError):
        return None


def _evaluation(run_dir: Path) -> list[str]:
    """Bullet lines of the run's recorded judge-free and judged results (or a note): the
    numbers the trackers get (emguard.tracking.evaluation_scalars), with what they are of."""
    root = run_dir / "eval"
    scalars = evaluation_scalars(root)
    out = []
    if "preference_shift" in scalars:
        general = judge_free_of(root, "general")
        source = (general.get("preference") or {}).get("source", "the evaluation set")
        out.append(f"- preference shift vs the base model (judge-free; nats per token, "
                   f"{len(preference_shifts(general))} pairs of {source}): "
                   f"{scalars['preference_shift']:+.4f}")
    if "heldout_nll" in scalars:
        out.append(f"- held-out in-domain NLL (nats per token): {scalars['heldout_nll']:.4f}")
    if "drift_kl" in scalars:
        out.append(f"- drift KL on general questions (nats per token): {scalars['drift_kl']:.4f}")
    for part, what in (("general", "general questions"), ("indomain", "in-domain questions")):
        log = eval_log_of(root, part)
        overall = log.llm_judge.overall if log is not None and log.llm_judge else None
        if overall is not None and overall.pct_misaligned is not None:
            out.append(f"- LLM judge ({log.judge}), {what}: misaligned "
                       f"{overall.pct_misaligned:.2f} %, incoherent "
                       f"{overall.pct_incoherent:.2f} % of {overall.n_scored} scored answers")
    return out or ["Not evaluated yet (`emguard eval --run RUN` writes the results here)."]


def write_card(run_dir: Path, adapter: str = "adapter", into: Path | None = None) -> Path:
    """Write the card of ``run_dir/adapter`` (into ``into`` when the adapter folder is
    still being written) and point its adapter_config.json at the Hub base model."""
    folder = Path(into) if into is not None else Path(run_dir) / adapter
    path = write_text_atomic(folder / CARD, card_text(run_dir, adapter))
    _point_config_at_hub(folder, yaml.safe_load((Path(run_dir) / "config.yaml").read_text(
        encoding="utf-8")).get("model", ""))
    return path


def write_cards(run_dir: Path) -> list[Path]:
    """The card of every adapter the run folder holds (``adapter/``, ``adapter_safelora/``)."""
    return [write_card(run_dir, name) for name in ("adapter", "adapter_safelora")
            if (Path(run_dir) / name / "adapter_config.json").is_file()]


def _point_config_at_hub(folder: Path, model: str) -> None:
    """``base_model_name_or_path`` of adapter_config.json: the Hub id instead of the local
    folder the weights were loaded from (emguard's cache), when there is one."""
    path = folder / "adapter_config.json"
    base = hub_base_model(str(model))
    if not path.is_file() or base is None:
        return
    config = json.loads(path.read_text(encoding="utf-8"))
    if config.get("base_model_name_or_path") != base:
        config["base_model_name_or_path"] = base
        write_text_atomic(path, json.dumps(config, indent=2, sort_keys=True) + "\n")
