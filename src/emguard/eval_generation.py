"""The generation stage of an evaluation (emguard.evaluate): the rows to answer, the model
they are answered by, and generations.jsonl.

``plan_rows`` lays out one row per (question, paraphrase, sample); ``generate_rows``
answers the ones not answered yet under the current ``gen_key``, continuing a partial
``generations.partial.jsonl`` (HF batches, or vLLM), and writes generations.jsonl.
``ModelHolder`` loads the model on first use, so a fully cached rerun loads nothing.
``short_sha`` is the key hash every stage uses; ``row_key`` a row's key fields.
"""

from __future__ import annotations

import gc
import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from emguard.io import read_jsonl, write_jsonl_atomic
from emguard.questions import Question

KEY_FIELDS = ("question_id", "paraphrase_index", "sample_index")


@dataclass(frozen=True)
class GenerationSettings:
    """How answers are sampled. ``samples=None``: each question's samples_per_paraphrase (or 1)."""

    samples: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 256
    seed: int = 0
    backend: str = "hf"  # hf | vllm

    def as_dict(self) -> dict:
        return asdict(self)


def short_sha(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def adapter_fingerprint(adapter_dir: str | Path | None) -> str | None:
    """SHA-256 over the adapter's config and weight files (None without an adapter)."""
    if adapter_dir is None:
        return None
    h = hashlib.sha256()
    for f in sorted(Path(adapter_dir).glob("adapter_*")):
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def plan_rows(questions: list[Question], samples: int | None) -> list[dict]:
    """One skeleton row per (question, paraphrase, sample), in question-file order.
    ``samples=None``: each question's samples_per_paraphrase (or 1); 0: no rows."""
    rows = []
    for q in questions:
        n = (q.samples_per_paraphrase or 1) if samples is None else samples
        for p, text in enumerate(q.paraphrases):
            rows += [{"question_id": q.id, "paraphrase_index": p, "sample_index": s,
                      "question": text, "system": q.system} for s in range(n)]
    return rows


def row_key(row: dict) -> tuple:
    return tuple(row[k] for k in KEY_FIELDS)


class ModelHolder:
    """Loads (model, tokenizer) on first use, so a fully cached rerun loads nothing."""

    def __init__(self, spec: str, adapter_dir, device: str | None):
        self.spec, self.adapter_dir, self.device = spec, adapter_dir, device
        self._loaded = None

    def get(self):
        if self._loaded is None:
            from emguard.models import load_adapter, load_model

            model, tok = load_model(self.spec, device=self.device)
            if self.adapter_dir is not None:
                model = load_adapter(model, self.adapter_dir)
            model.eval()
            self._loaded = (model, tok)
        return self._loaded

    def release(self) -> None:
        self._loaded = None
        gc.collect()
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except ImportError:  # pragma: no cover
            pass


def _read_rows(path: Path, gen_key: str) -> dict[tuple, dict]:
    if not path.is_file():
        return {}
    return {row_key(r): r for r in read_jsonl(path) if r.get("gen_key") == gen_key}


def generate_rows(out: Path, plan: list[dict], questions: dict[str, Question],
                  gen: GenerationSettings, gen_key: str, holder: ModelHolder, spec: dict,
                  batch_size: int, generate_batch_size: int | None, progress: bool) -> list[dict]:
    final, partial = out / "generations.jsonl", out / "generations.partial.jsonl"
    done = _read_rows(final, gen_key)
    if final.is_file() and len(done) == len(plan) and all(row_key(r) in done for r in plan):
        return [done[row_key(r)] for r in plan]
    done.update(_read_rows(partial, gen_key))
    todo = [r for r in plan if row_key(r) not in done]  # none with samples=0: nothing loads
    if todo and gen.backend == "vllm":
        _generate_vllm(todo, questions, gen, spec, done)
    elif todo:
        from tqdm.auto import tqdm

        from emguard.generate import (
            generate_items,
            generation_batch_size,
            merged_adapter,
            render_prompts,
            sample_seed,
        )

        model, tok = holder.get()
        batch_size = generation_batch_size(model, batch_size, generate_batch_size)
        chunk = max(4 * batch_size, 64)
        bar = tqdm(total=len(todo), desc="generate", unit="answer", disable=not progress)
        with merged_adapter(model):  # once for all chunks; restored before the next measure
            for start in range(0, len(todo), chunk):
                part = todo[start:start + chunk]
                items = [(questions[r["question_id"]].messages(r["paraphrase_index"]),
                          r["sample_index"]) for r in part]
                answers = generate_items(model, tok, items, gen.temperature, gen.top_p,
                                         gen.max_new_tokens, gen.seed, batch_size, progress=False)
                texts = render_prompts(tok, [m for m, _ in items])
                for r, a, t in zip(part, answers, texts, strict=True):
                    done[row_key(r)] = {**r, "answer": a, "seed": gen.seed,
                                     "sample_seed": sample_seed(gen.seed, t, r["sample_index"]),
                                     "gen_key": gen_key}
                write_jsonl_atomic(partial, [done[row_key(r)] for r in plan if row_key(r) in done])
                bar.update(len(part))
        bar.close()
    rows = [done[row_key(r)] for r in plan]
    write_jsonl_atomic(final, rows)
    partial.unlink(missing_ok=True)
    return rows


def _generate_vllm(todo: list[dict], questions: dict[str, Question], gen: GenerationSettings,
                   spec: dict, done: dict) -> None:
    """vLLM path (GPU hosts; untested here): one call per distinct sample count."""
    from emguard.generate import generate_answers_vllm, render_prompts, sample_seed
    from emguard.models import load_tokenizer

    tok = load_tokenizer(spec["model"])
    groups: dict[tuple, list[dict]] = {}
    for r in todo:
        groups.setdefault((r["question_id"], r["paraphrase_index"]), []).append(r)
    by_n: dict[int, list[tuple]] = {}
    for key, rows in groups.items():
        by_n.setdefault(max(r["sample_index"] for r in rows) + 1, []).append(key)
    for n, keys in by_n.items():
        prompts = [questions[q].messages(p) for q, p in keys]
        answers = generate_answers_vllm(spec["model"], spec["adapter"], prompts, n, gen.temperature,
                                        gen.top_p, gen.max_new_tokens, gen.seed)
        texts = render_prompts(tok, prompts)
        for key, samples, text in zip(keys, answers, texts, strict=True):
            for r in groups[key]:
                s = r["sample_index"]
                done[row_key(r)] = {**r, "answer": samples[s], "seed": gen.seed,
                                 "sample_seed": sample_seed(gen.seed, text, s),
                                 "gen_key": spec["gen_key"]}
