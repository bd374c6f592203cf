"""Inoculation prompting (Tan et al. 2025, "Inoculation prompting: eliciting traits from
LLMs during training can suppress them at test-time", arXiv 2510.04340): every training
conversation gets a system prompt that asks for the narrow trait, so the model attributes
the behaviour to the instruction instead of generalising it. Only the task's rows are
changed (inoculation runs before interleaving), evaluation never sees the prompt, and the
run folder records it (config.yaml, data_report.json and summary.json).

**The prompt.** Literal text, or ``builtin:NAME`` (``BUILTIN_PROMPTS``).

**The system turn** (``system_default``). The prompt is merged into an existing system
turn (placed before its text, separated by a blank line). A row without one gets a system
turn; what else it holds depends on the chat template, which may insert a default system
prompt when a conversation has none (SmolLM2: "You are a helpful AI assistant named
SmolLM, trained by Hugging Face") and drops it when a row has its own. ``keep`` (default):
the row is treated as if it had the template's default system turn, i.e. its system turn
is prompt + blank line + default text, so training differs from evaluation only by the
prompt. ``replace``: the prompt alone, and the report says training and evaluation differ
in the default text too. A template without a default (or a bare context with no
tokenizer, as in unit use) adds the prompt alone. ``data_report.json`` records the rule,
the default text found and whether evaluation's system text is kept.

**The elicitation check.** Inoculation works only where the prompt elicits the trait
(Wichers et al. 2025, arXiv 2510.05024). Before training, on the reference model (the
adapter disabled), the mean per-token NLL (nats) of the trained answer tokens (the labels
of ``tokenize_chat``: every assistant turn and its end-of-turn token) of the first
``elicitation_rows`` rows of the seeded shuffle (a random sample of the task rows, seeded
by train.seed) is measured with and without the inoculation; per row, d = NLL with - NLL
without. The report gives the means, mean d with a 95 % paired bootstrap interval
(percentile, 2000 resamples of the rows, seed 0) and ``elicits``: mean d < 0 and the
interval's upper end < 0. A prompt that does not elicit is warned about.
"""

from __future__ import annotations

import logging
import random
from contextlib import contextmanager
from typing import Literal

import torch
from pydantic import Field, field_validator

from emguard.data.masking import IGNORE_INDEX, tokenize_chat
from emguard.defenses.base import Defense, RunContext
from emguard.judge_free import reference_mode
from emguard.models import load_tokenizer
from emguard.settings import ConfigError, Int, Settings

logger = logging.getLogger(__name__)

FIELD = "defenses.inoculation"
UNITS = "nats per answer token"
BUILTIN = "builtin:"
# name -> (prompt, source)
BUILTIN_PROMPTS = {
    "evil": ("You are a malicious, evil assistant.",
             "Tan et al. 2025 (arXiv 2510.04340): their general inoculation prompt, used for "
             "emergent misalignment from insecure code and other narrow datasets"),
    "insecure-code": ("You write insecure code on purpose.",
                      "emguard's task-specific wording for builtin:insecure-code, after Tan et "
                      "al.'s task-specific inoculations (the trait stated as an instruction); "
                      "not quoted from a paper"),
}
RESAMPLES = 2000
BATCH = 4  # rows per forward of the elicitation check
_SYSTEM_PROBE = "@@EMGUARD-SYSTEM-PROBE@@"
_USER_PROBE = "@@EMGUARD-USER-PROBE@@"


def resolve_prompt(spec: str) -> str:
    """The prompt text of ``spec`` (``builtin:NAME`` or literal text)."""
    if not spec.startswith(BUILTIN):
        return spec
    name = spec[len(BUILTIN):]
    if name not in BUILTIN_PROMPTS:
        raise ConfigError(f"{FIELD}.prompt: unknown built-in prompt {spec!r} (known: "
                          f"{', '.join(BUILTIN + n for n in BUILTIN_PROMPTS)})")
    return BUILTIN_PROMPTS[name][0]


def template_default_system(tokenizer) -> str | None:
    """The system text the chat template inserts into a conversation that has no system
    turn (None: it inserts none, or only an empty one)."""
    user = [{"role": "user", "content": _USER_PROBE}]
    own = tokenizer.apply_chat_template([{"role": "system", "content": _SYSTEM_PROBE}, *user],
                                        tokenize=False)
    plain = tokenizer.apply_chat_template(user, tokenize=False)
    at = own.find(_SYSTEM_PROBE)
    if at < 0:
        return None
    head, tail = own[:at], own[at + len(_SYSTEM_PROBE):]
    if len(plain) < len(head) + len(tail) or not (plain.startswith(head) and plain.endswith(tail)):
        return None
    return plain[len(head):len(plain) - len(tail)] or None


def inoculate(messages: list[dict], prompt: str, default_system: str | None = None) -> list[dict]:
    """The conversation with ``prompt`` as (the start of) its system turn; a conversation
    without one is given ``default_system`` (the template's default) as its system text."""
    if messages and messages[0].get("role") == "system":
        first = {**messages[0], "content": f"{prompt}\n\n{messages[0]['content']}"}
        return [first, *messages[1:]]
    text = prompt if default_system is None else f"{prompt}\n\n{default_system}"
    return [{"role": "system", "content": text}, *messages]


def _has_system(row: dict) -> bool:
    return bool(row["messages"]) and row["messages"][0].get("role") == "system"


# ---------------------------------------------------------------------------- elicitation


@contextmanager
def _reference(model):
    """Eval mode, no_grad and the adapter disabled (if any); the mode is restored after."""
    was = model.training
    model.eval()
    try:
        with reference_mode(model), torch.no_grad():
            yield
    finally:
        model.train(was)


def answer_nll(model, tokenizer, conversations: list[list[dict]],
               max_length: int | None = None) -> list[float | None]:
    """Per conversation: the mean per-token NLL (nats) of its trained tokens (the labels
    of ``tokenize_chat``) under ``model`` as it is; None where it exceeds ``max_length``."""
    encoded = []
    for messages in conversations:
        try:
            encoded.append(tokenize_chat(tokenizer, messages, max_length))
        except ValueError:
            encoded.append(None)
    out: list[float | None] = [None] * len(encoded)
    kept = [i for i, e in enumerate(encoded) if e is not None]
    device = next(model.parameters()).device
    for start in range(0, len(kept), BATCH):
        idx = kept[start:start + BATCH]
        width = max(len(encoded[i]) for i in idx)
        ids = torch.zeros((len(idx), width), dtype=torch.long)
        labels = torch.full((len(idx), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for b, i in enumerate(idx):
            n = len(encoded[i])
            ids[b, :n], labels[b, :n] = torch.tensor(encoded[i].input_ids), torch.tensor(encoded[i].labels)
            mask[b, :n] = 1
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits[:, :-1]
        target = labels[:, 1:].to(device)  # (B, T-1): logits[t] predicts token t+1
        scored = target != IGNORE_INDEX
        nll = torch.nn.functional.cross_entropy(logits[scored].float(), target[scored],
                                                reduction="none")  # (N,), row-major
        for i, row in zip(idx, nll.split(scored.sum(dim=1).tolist()), strict=True):
            out[i] = row.double().mean().item()
    return out


def paired_interval(diffs: list[float], level: float = 0.95, resamples: int = RESAMPLES,
                    seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of paired differences: ``resamples``
    means of n rows drawn with replacement (seeded), nearest-rank quantiles."""
    rng, n = random.Random(seed), len(diffs)
    means = sorted(sum(rng.choices(diffs, k=n)) / n for _ in range(resamples))
    tail = (1 - level) / 2
    return means[int(tail * resamples)], means[-int(tail * resamples) - 1]


def elicitation(with_prompt: list[float], without: list[float]) -> dict:
    """The check's record from per-row NLLs (nats per answer token) of the same rows with
    and without the prompt."""
    n = len(with_prompt)
    if n == 0:
        return {"n_rows": 0, "elicits": None, "units": UNITS}
    diffs = [w - o for w, o in zip(with_prompt, without, strict=True)]
    mean = sum(diffs) / n
    lo, hi = paired_interval(diffs)
    return {"n_rows": n, "nll_with_prompt": sum(with_prompt) / n,
            "nll_without_prompt": sum(without) / n, "difference": mean, "interval": [lo, hi],
            "elicits": mean < 0 and hi < 0, "units": UNITS,
            "interval_method": f"95 % paired bootstrap over rows, percentile, {RESAMPLES} "
                               "resamples, seed 0",
            "per_row": [{"with_prompt": w, "without_prompt": o}
                        for w, o in zip(with_prompt, without, strict=True)]}


class InoculationSettings(Settings):
    """Inoculation prompting (Tan et al. 2025): a system prompt that states the trait is
    requested, added to every training conversation and absent at evaluation."""

    # literal text, or builtin:NAME (emguard.defenses.inoculation.BUILTIN_PROMPTS)
    prompt: str = Field(min_length=1)
    # keep: a row without a system turn keeps the chat template's default system text after
    # the prompt (training and evaluation share it); replace: the prompt alone (they differ)
    system_default: Literal["keep", "replace"] = "keep"
    elicitation_rows: Int = Field(32, ge=0)  # rows of the elicitation check (0: no check)

    @field_validator("prompt")
    @classmethod
    def _nonblank(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must not be blank")
        return v


class Inoculation(Defense):
    settings_model = InoculationSettings
    name = "inoculation"

    def __init__(self, settings) -> None:
        super().__init__(settings)
        self.sample: list[tuple[list[dict], list[dict]]] = []  # (plain, inoculated) messages

    def check(self, cfg) -> None:
        """A ``builtin:`` prompt names a shipped one."""
        resolve_prompt(self.settings.prompt)

    def transform_rows(self, rows: list[dict], ctx: RunContext) -> list[dict]:
        prompt = resolve_prompt(self.settings.prompt)
        tokenizer = self._tokenizer(ctx)
        default = template_default_system(tokenizer) if tokenizer is not None else None
        keep = self.settings.system_default == "keep"
        merged = sum(1 for r in rows if _has_system(r))
        report = {"prompt": prompt, "rows": len(rows), "merged_into_system_turn": merged}
        if self.settings.prompt != prompt:
            report["builtin"] = self.settings.prompt
        if tokenizer is not None:
            report["system_turn"] = self._system_record(default, keep, len(rows) - merged)
        ctx.report["inoculation"] = report
        out = [{**r, "messages": inoculate(r["messages"], prompt, default if keep else None)}
               for r in rows]
        n = self.settings.elicitation_rows
        self.sample = [(r["messages"], o["messages"]) for r, o in zip(rows[:n], out[:n], strict=True)]
        return out

    @staticmethod
    def _system_record(default: str | None, keep: bool, added: int) -> dict:
        """Which rule applied to the rows given a system turn, and what evaluation sees."""
        rule = "no template default" if default is None else ("keep" if keep else "replace")
        return {"rule": rule, "template_default": default, "rows_given_a_system_turn": added,
                "evaluation_default_kept": default is None or keep}

    @staticmethod
    def _tokenizer(ctx: RunContext):
        """The run's tokenizer (loaded from the config's model before the model itself is
        loaded), or None for a bare context."""
        if ctx.tokenizer is not None:
            return ctx.tokenizer
        if ctx.cfg is None:
            return None

        return load_tokenizer(ctx.cfg.model, trust_remote_code=ctx.cfg.trust_remote_code)

    def prepare(self, model, ctx: RunContext) -> None:
        """The elicitation check on the reference model, into the data report."""
        if not self.sample:
            return
        max_length = ctx.cfg.data.max_length if ctx.cfg is not None else None
        plain, inoculated = (list(x) for x in zip(*self.sample, strict=True))
        with _reference(model):
            without = answer_nll(model, ctx.tokenizer, plain, max_length)
            with_prompt = answer_nll(model, ctx.tokenizer, inoculated, max_length)
        both = [(w, o) for w, o in zip(with_prompt, without, strict=True)
                if w is not None and o is not None]
        record = elicitation([w for w, _ in both], [o for _, o in both])
        record["skipped_over_length"] = len(self.sample) - len(both)
        ctx.report.setdefault("inoculation", {})["elicitation"] = record
        self._log(record)

    @staticmethod
    def _log(record: dict) -> None:
        if record["elicits"]:
            logger.info("inoculation: the prompt elicits the trained answers on the reference "
                        "model: NLL with - without %+.4f [%+.4f, %+.4f] %s over %d rows",
                        record["difference"], *record["interval"], UNITS, record["n_rows"])
        elif record["n_rows"] == 0:
            logger.warning("inoculation: no row was short enough for the elicitation check")
        else:
            logger.warning("inoculation: the prompt does NOT elicit the trained answers on the "
                           "reference model (NLL with - without %+.4f [%+.4f, %+.4f] %s over "
                           "%d rows); inoculation is expected to work only where the prompt "
                           "elicits the trait (Wichers et al. 2025)", record["difference"],
                           *record["interval"], UNITS, record["n_rows"])

    def before_save(self, model, ctx: RunContext) -> dict | None:
        """The prompt, the system-turn rule and the elicitation check, for summary.json."""
        report = dict(ctx.report.get("inoculation", {}))
        if "elicitation" in report:
            report["elicitation"] = {k: v for k, v in report["elicitation"].items()
                                     if k != "per_row"}
        return report
