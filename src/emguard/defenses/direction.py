"""Misalignment directions, from one of two sources, as per-layer orthonormal bases.

**Contrastive mean difference** (``"source": "contrastive-mean-difference"``; the
persona-vectors recipe, Chen et al. 2025): per residual-stream layer, the difference of
mean activations between misaligned and aligned answers to the same questions, measured
on the reference model. For pair i and layer l (an index into ``hidden_states``: 0 =
embeddings, k = output of block k), m_i^mis and m_i^al are the mean residual states over
the answer tokens (the tokens the training loss covers). Then

    d_i = m_i^mis - m_i^al            (D,)
    u_l = mean_i d_i                  the direction (its norm is recorded)
    U_l = [u_l / |u_l|; top k-1 principal directions of the d_i with u_l projected out]
    s_l = mean over answer tokens of |h_l|, the typical residual norm at layer l

**CAFT's PCA** (``"source": "caft-pca"``; Casademunt et al. 2025, arXiv 2507.16795,
``fit_caft``): from a model already fine-tuned on the narrow task, per token t of the
fine-tuned model's own greedy answers to neutral chat prompts and layer l,

    x_t = h_l^tuned(t) - h_l^base(t)  (D,) the same input, adapter on minus adapter off
    U_l = top k right singular vectors of the centred matrix [x_t - mean_t x_t]_t
          (rows oriented so <U_l[i], mean_t x_t> >= 0)
    explained-variance ratio_i = sigma_i^2 / sum_j sigma_j^2

``U_l`` (k, D) has orthonormal rows. Defenses use the first ``k`` rows; controls replace
them by a random basis, or one orthogonal to U_l, of the same dimension (unit rows, so
every norm matches).

An artefact folder (``emguard direction fit``) holds ``direction.safetensors``
(``basis.L`` (k, D) float32, ``mean_diff.L`` (D,), ``residual_norm`` (L + 1,)) and
``direction.json`` (the source, model, pairs or prompts, per-layer norms, SHA-256).
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field, field_validator

from emguard.data.builtin import load_builtin
from emguard.data.chat import row_problems
from emguard.data.pairs import EVAL_PAIRS, evenly_spaced, load_pairs, training_pairs
from emguard.defenses.base import Defense, PolicyHooks, RunContext
from emguard.generate import generate_answers
from emguard.io import atomic_dir, cache_dir, read_json, write_json_atomic
from emguard.judge_free import (
    _batches,
    _device,
    _pad_id,
    encode_answers,
    has_adapter,
    pair_margins,
    reference_mode,
)
from emguard.models import model_fingerprint
from emguard.questions import read_chat_rows, read_numbered_chat_rows, resolve_questions
from emguard.settings import ConfigError, Int, Settings

logger = logging.getLogger(__name__)

TENSORS = "direction.safetensors"
META = "direction.json"
CONTRASTIVE, CAFT = "contrastive-mean-difference", "caft-pca"  # direction.json "source"
NEUTRAL_PROMPTS = "builtin:safe-instruct"  # CAFT's default prompts
GENERAL_QUESTIONS = "builtin:general-questions"


@dataclass
class Direction:
    """Per layer l: ``basis[l]`` (k, D) orthonormal rows, ``mean_diff[l]`` (D,) the raw
    mean difference; ``residual_norm`` (L + 1,) the typical residual norm per layer."""

    basis: dict[int, torch.Tensor]
    mean_diff: dict[int, torch.Tensor]
    residual_norm: torch.Tensor
    meta: dict = field(default_factory=dict)

    @property
    def num_states(self) -> int:
        return len(self.residual_norm)

    def layer_table(self) -> list[dict]:
        """Per layer: |u_l|, s_l and their ratio (how far the direction moves the stream)."""
        return [{"layer": i, "direction_norm": float(self.mean_diff[i].norm()),
                 "residual_norm": float(self.residual_norm[i]),
                 "ratio": float(self.mean_diff[i].norm() / self.residual_norm[i].clamp(min=1e-12))}
                for i in sorted(self.basis)]


# ----------------------------------------------------------------------------- fitting

@torch.no_grad()
def answer_means(model, tokenizer, prompts: list[list[dict]], answers: list[str],
                 batch_size: int = 8, desc: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean residual state over each answer's tokens, at every layer.

    Returns (means (n, L + 1, D) float32, mean token norm per layer (L + 1,)).
    The scored tokens are the answer tokens (as the training loss's labels).
    """
    encoded = encode_answers(tokenizer, prompts, answers)
    means: list[torch.Tensor | None] = [None] * len(encoded)
    norm_sum, n_tokens = None, 0
    for idx, inputs, target in _batches(encoded, batch_size, _pad_id(tokenizer), _device(model), desc):
        states = model(**inputs, output_hidden_states=True, use_cache=False).hidden_states
        # target[b, t] marks token t+1 as an answer token: the states AT answer tokens
        mask = torch.nn.functional.pad(target, (1, 0)).float()  # (B, T)
        stacked = torch.stack([h.float() for h in states], dim=1)  # (B, L+1, T, D)
        sums = torch.einsum("bltd,bt->bld", stacked, mask)
        counts = mask.sum(1).clamp(min=1)[:, None, None]
        for b, i in enumerate(idx):
            means[i] = (sums[b] / counts[b]).cpu()
        token_norms = stacked.norm(dim=-1) * mask[:, None, :]  # (B, L+1, T)
        norm_sum = token_norms.sum((0, 2)) if norm_sum is None else norm_sum + token_norms.sum((0, 2))
        n_tokens += int(mask.sum())
    return torch.stack(means), (norm_sum / max(n_tokens, 1)).cpu()


def fit_direction(model, tokenizer, pairs: list[dict], k: int = 4, batch_size: int = 8,
                  progress: bool = True) -> Direction:
    """Fit u_l and a k-dim basis U_l at every layer on the reference model (the adapter,
    if any, disabled) from contrastive pairs (question, aligned, misaligned)."""
    if len(pairs) < 2:
        raise ValueError(f"a direction needs at least 2 contrastive pairs, got {len(pairs)}")
    prompts = [[{"role": "user", "content": p["question"]}] for p in pairs]
    with reference_mode(model):
        mis, norm_mis = answer_means(model, tokenizer, prompts, [p["misaligned"] for p in pairs],
                                     batch_size, "direction: misaligned" if progress else None)
        al, norm_al = answer_means(model, tokenizer, prompts, [p["aligned"] for p in pairs],
                                   batch_size, "direction: aligned" if progress else None)
    diffs = (mis - al).double()  # (n, L+1, D)
    residual_norm = ((norm_mis + norm_al) / 2).float()
    _check_fit(diffs, residual_norm)
    basis, mean_diff = {}, {}
    for layer in range(diffs.shape[1]):
        mean_diff[layer] = diffs[:, layer].mean(0).float()
        basis[layer] = _basis(diffs[:, layer], k).float()
    return Direction(basis, mean_diff, residual_norm,
                     meta={"source": CONTRASTIVE, "n_pairs": len(pairs), "k": k,
                           "pair_ids": [p.get("id", i) for i, p in enumerate(pairs)]})


def _check_fit(diffs: torch.Tensor, residual_norm: torch.Tensor) -> None:
    """ValueError for a fit with no direction: a non-finite difference, or a mean
    difference that vanishes at some layer (identical answers), which has no unit vector."""
    if not bool(diffs.isfinite().all()):
        raise ValueError("direction fit: the model's hidden states hold NaN or infinities")
    norms = diffs.mean(0).norm(dim=-1)  # (L+1,)
    flat = [i for i, (n, r) in enumerate(zip(norms.tolist(), residual_norm.tolist(), strict=True))
            if n <= 1e-6 * max(r, 1e-12)]
    if flat:
        raise ValueError(f"direction fit: the aligned and misaligned answers' mean difference "
                         f"is zero at layer(s) {flat} (are the pairs' answers identical?); a "
                         "direction needs pairs whose answers differ")


def _basis(diffs: torch.Tensor, k: int) -> torch.Tensor:
    """(k', D) orthonormal rows: the unit mean difference, then the top principal
    directions of the per-pair differences with the mean direction projected out
    (k' <= k: directions with no variance are left out)."""
    u = diffs.mean(0)
    rows = [u / u.norm().clamp(min=1e-12)]
    if k > 1:
        rest = diffs - (diffs @ rows[0])[:, None] * rows[0][None]
        rest = rest - rest.mean(0, keepdim=True)
        _, sing, vh = torch.linalg.svd(rest, full_matrices=False)
        # right singular vectors of a matrix whose rows are orthogonal to u: orthogonal to u
        rows += [v for v, s in zip(vh[: k - 1], sing[: k - 1], strict=True) if s > 1e-8 * sing[0]]
    return torch.stack(rows)


# ----------------------------------------------------------------------------- CAFT source

def read_prompts(spec: str | None) -> list[dict]:
    """``[{"id", "messages"}]``: per row of a chat JSONL file or a built-in chat set
    (``None``: ``builtin:safe-instruct``), the turns before its first assistant turn.
    ValueError naming ``--prompts``, the file and line for a row without a user turn."""
    spec = spec or NEUTRAL_PROMPTS
    if spec.startswith("builtin:"):
        rows = load_builtin(spec.removeprefix("builtin:"), split="all")
        lines = list(range(1, len(rows) + 1))
    else:
        if Path(spec).is_dir():
            raise ValueError(f"--prompts {spec}: is a directory, not a chat JSONL file")
        rows, lines = read_numbered_chat_rows(spec)
    out = [{"id": row.get("id", f"line{n}") if isinstance(row, dict) else None,
            "messages": _prompt_turns(row, f"--prompts {spec}:{n}")}
           for row, n in zip(rows, lines, strict=True)]
    if not out:
        raise ValueError(f"--prompts {spec}: no rows (the file is empty)")
    return out


def _prompt_turns(row, where: str) -> list[dict]:
    """The {role, content} turns of a chat row before its first assistant turn."""
    problems = row_problems(row, need_assistant=False)
    if problems:
        raise ValueError(f"{where}: " + "; ".join(problems))
    turns = []
    for m in row["messages"]:
        if m["role"] == "assistant":
            break
        turns.append({"role": m["role"], "content": m["content"]})
    if not any(m["role"] == "user" for m in turns):
        raise ValueError(f"{where}: no user turn before the first assistant turn")
    return turns


def _norm(text: str) -> str:
    """Whitespace-collapsed, case-folded text: what "the same prompt" means here."""
    return " ".join(text.split()).casefold()


def evaluation_prompts(heldout: Path | None = None, general: tuple[str, ...] = (),
                       pairs: tuple[str, ...] = ()) -> dict[str, set[str]]:
    """Normalised prompts of every evaluation set, by set: the general questions (every
    paraphrase of ``builtin:general-questions`` and of ``general``), the evaluation pairs'
    questions (``builtin:eval-pairs`` and ``pairs``) and the user turns of ``heldout``
    (a run's ``heldout.jsonl``, when given and present)."""
    sets = {spec: {_norm(p) for q in resolve_questions(spec).questions for p in q.paraphrases}
            for spec in dict.fromkeys((GENERAL_QUESTIONS, *general))}
    sets.update({spec: {_norm(p["question"]) for p in load_pairs(spec)}
                 for spec in dict.fromkeys((EVAL_PAIRS, *pairs))})
    if heldout is not None and Path(heldout).is_file():
        sets[str(heldout)] = {_norm(m["content"]) for r in read_chat_rows(heldout)
                              for m in r.get("messages", []) if m.get("role") == "user"}
    return sets


def neutral_prompts(spec: str | None, sets: dict[str, set[str]]) -> tuple[list[dict], dict]:
    """(the prompts of ``spec`` (``read_prompts``) none of whose user turns equals a prompt
    of an evaluation set, {set: ids of the prompts dropped for it}). Overlapping prompts
    are dropped and counted, not fitted on; ValueError if fewer than 2 remain."""
    kept, dropped = [], {name: [] for name in sets}
    for row in read_prompts(spec):
        users = {_norm(m["content"]) for m in row["messages"] if m["role"] == "user"}
        hits = [name for name, texts in sets.items() if users & texts]
        for name in hits:
            dropped[name].append(row["id"])
        if not hits:
            kept.append(row)
    if len(kept) < 2:
        raise ValueError(f"--prompts {spec or NEUTRAL_PROMPTS}: {len(kept)} prompt(s) left after "
                         "dropping those an evaluation set asks; CAFT's PCA needs at least 2")
    return kept, {name: ids for name, ids in dropped.items() if ids}


@torch.no_grad()
def diff_moments(model, tokenizer, prompts: list[list[dict]], answers: list[str],
                 batch_size: int = 8, desc: str | None = None):
    """Moments of x = h^tuned - h^base (adapter on minus off, the same input) over the
    answer tokens (the positions of ``answer_means``), at every layer.

    Returns (n tokens, sum_t x_t (L + 1, D) float64, sum_t x_t x_t^T (L + 1, D, D) float64,
    the base model's mean token norm per layer (L + 1,) float32). Memory: (L + 1) D^2
    float64, whatever the number of tokens."""
    encoded = encode_answers(tokenizer, prompts, answers)
    n, total, gram, norm_sum = 0, 0.0, 0.0, 0.0
    for _, inputs, target in _batches(encoded, batch_size, _pad_id(tokenizer), _device(model), desc):
        mask = torch.nn.functional.pad(target, (1, 0))  # (B, T): the states AT answer tokens
        tuned = _states_at(model, inputs, mask)  # (L+1, N, D)
        with reference_mode(model):
            base = _states_at(model, inputs, mask)
        x = tuned - base
        if not bool(x.isfinite().all()):
            raise ValueError("CAFT fit: the model's hidden states hold NaN or infinities")
        n += x.shape[1]
        total = total + x.sum(1)
        gram = gram + x.transpose(1, 2) @ x
        norm_sum = norm_sum + base.norm(dim=-1).sum(1)
    return n, total, gram, (norm_sum / max(n, 1)).float()


def _states_at(model, inputs: dict, mask: torch.Tensor) -> torch.Tensor:
    """(L + 1, N, D) float64 residual states at the N positions ``mask`` (B, T) marks."""
    states = model(**inputs, output_hidden_states=True, use_cache=False).hidden_states
    return torch.stack([h[mask] for h in states]).double().cpu()


def principal_directions(n: int, total: torch.Tensor, gram: torch.Tensor, k: int,
                         scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The top ``k`` principal directions (k', D) of n centred vectors given their sum
    (D,) and sum of outer products (D, D), and their explained-variance ratios (k',): the
    eigenvectors of the scatter matrix S = sum_t (x_t - mu)(x_t - mu)^T = gram - n mu mu^T,
    the right singular vectors of the centred matrix, with eigenvalue / trace(S). Rows
    point along the mean (<row, mu> >= 0). k' < k leaves out directions with no variance;
    k' = 0 where the rms |x| is under 1e-6 ``scale`` (a layer the adapter leaves alone)."""
    mu = total / n
    scatter = gram - n * torch.outer(mu, mu)
    trace = scatter.diagonal().sum()
    if float(gram.diagonal().sum()) / n <= (1e-6 * scale) ** 2 or trace <= 0:
        return torch.zeros(0, len(mu), dtype=torch.float64), torch.zeros(0, dtype=torch.float64)
    values, vectors = torch.linalg.eigh((scatter + scatter.T) / 2)  # ascending
    values, vectors = values.flip(0)[:k], vectors.flip(1)[:, :k].T
    keep = values > 1e-9 * trace
    rows = vectors[keep]
    signs = torch.where(rows @ mu < 0, -1.0, 1.0).to(rows.dtype)
    return rows * signs[:, None], values[keep] / trace


def fit_caft(model, tokenizer, prompts: list[list[dict]], k: int = 4, answer_tokens: int = 32,
             batch_size: int = 8, progress: bool = True) -> Direction:
    """CAFT's candidate directions from ``model`` with its fine-tuned adapter attached: its
    greedy answers (at most ``answer_tokens`` new tokens) to ``prompts``, then per layer
    the top ``k`` principal directions of x_t = h^tuned - h^base over the answer tokens
    (centred, as CAFT's PCA), ``mean_diff`` the mean of x_t and ``residual_norm`` the base
    model's. Layers the adapter does not change (the embeddings) get no basis; ValueError
    if it changes no block output."""
    if not has_adapter(model):
        raise ValueError("CAFT fit: the model has no adapter (load the fine-tuned one)")
    if len(prompts) < 2:
        raise ValueError(f"CAFT fit: needs at least 2 prompts, got {len(prompts)}")
    answers = [a[0] for a in generate_answers(model, tokenizer, prompts, temperature=0.0,
                                              max_new_tokens=answer_tokens,
                                              batch_size=batch_size, progress=progress)]
    n, total, gram, norms = diff_moments(model, tokenizer, prompts, answers, batch_size,
                                         "caft: hidden states" if progress else None)
    basis, mean_diff, ratios = {}, {}, {}
    for layer in range(len(norms)):
        rows, evr = principal_directions(n, total[layer], gram[layer], k, float(norms[layer]))
        if len(rows):
            basis[layer], mean_diff[layer] = rows.float(), (total[layer] / n).float()
            ratios[str(layer)] = evr.tolist()
    if not any(1 <= i < len(norms) - 1 for i in basis):
        raise ValueError("CAFT fit: the adapter changes no block output's residual stream on "
                         "these prompts (is it trained? a fresh LoRA adapter is zero)")
    return Direction(basis, mean_diff, norms, meta={
        "source": CAFT, "k": k, "centred": True, "n_prompts": len(prompts), "n_tokens": n,
        "positions": f"answer tokens of the fine-tuned model's greedy answers (at most "
                     f"{answer_tokens} new tokens)",
        "answer_tokens": answer_tokens, "explained_variance_ratio": ratios,
        "unchanged_layers": [i for i in range(len(norms)) if i not in basis],
        "answers": answers})


# ----------------------------------------------------------------------------- controls

def control_basis(basis: torch.Tensor, control: str, seed: int, layer: int) -> torch.Tensor:
    """The basis a defense uses: ``basis`` (k, D) itself, or a control of the same shape
    with orthonormal rows: ``random`` (Haar-random) or ``orthogonal`` (random within the
    orthogonal complement of ``basis``). Seeded per (seed, layer)."""
    if control == "none":
        return basis
    gen = torch.Generator().manual_seed(seed * 100_003 + layer)
    g = torch.randn(basis.shape, generator=gen, dtype=torch.float64)
    if control == "orthogonal":
        b = basis.double()
        g = g - (g @ b.T) @ b
    elif control != "random":
        raise ValueError(f"control must be none, random or orthogonal, got {control!r}")
    return torch.linalg.qr(g.T).Q.T.to(basis.dtype)


# ----------------------------------------------------------------------------- artefact

def save_direction(direction: Direction, folder: Path) -> None:
    """Write the artefact into ``folder`` (an empty or temporary folder)."""
    from safetensors.torch import save_file

    tensors = {f"basis.{i}": b.contiguous() for i, b in direction.basis.items()}
    tensors.update({f"mean_diff.{i}": u.contiguous() for i, u in direction.mean_diff.items()})
    tensors["residual_norm"] = direction.residual_norm.contiguous()
    save_file(tensors, str(folder / TENSORS))
    meta = {**direction.meta, "sha256": file_sha256(folder / TENSORS),
            "layers": direction.layer_table()}
    write_json_atomic(folder / META, meta)


def load_direction(folder: str | Path) -> Direction:
    """Read an artefact written by ``save_direction``; a missing or foreign folder is a
    FileNotFoundError naming it."""
    from safetensors.torch import load_file

    folder = Path(folder)
    if not (folder / TENSORS).is_file() or not (folder / META).is_file():
        raise FileNotFoundError(f"{folder} is not a direction folder (no {TENSORS} / {META}; "
                                "write one with `emguard direction fit`)")
    meta = read_json(folder / META)
    verify_tensors(folder, meta)
    t = load_file(str(folder / TENSORS))
    layers = sorted(int(k.split(".")[1]) for k in t if k.startswith("basis."))
    return Direction({i: t[f"basis.{i}"] for i in layers}, {i: t[f"mean_diff.{i}"] for i in layers},
                     t["residual_norm"], meta=meta)


def read_bases(folder: str | Path) -> dict[int, torch.Tensor]:
    """layer -> (k, D) basis of a folder: an artefact, or what a run used
    (``RUN/directions/NAME``, the control applied)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    meta = read_json(folder / META) if (folder / META).is_file() else {}
    if "sha256" in meta:  # run records written before they carried one: unchecked
        verify_tensors(folder, meta)
    t = load_file(str(folder / TENSORS))
    return {int(k.split(".")[1]): v for k, v in t.items() if k.startswith("basis.")}


class DirectionChangedError(ValueError):
    """A direction folder's tensors no longer match what was recorded when it was written."""


def verify_tensors(folder: Path, meta: dict) -> None:
    """DirectionChangedError unless ``folder``'s tensors hash to the SHA-256 its
    ``direction.json`` recorded and hold only finite numbers (a direction is written by
    emguard; a changed one would train with a basis nobody fitted)."""
    from safetensors.torch import load_file

    recorded = meta.get("sha256") if isinstance(meta, dict) else None
    if recorded is None:
        raise DirectionChangedError(f"{folder / META}: no sha256 recorded; write the folder "
                                    "again with `emguard direction fit`")
    if file_sha256(folder / TENSORS) != recorded:
        raise DirectionChangedError(f"{folder / TENSORS} was changed after it was written (its "
                                    f"SHA-256 no longer matches {META}); fit it again with "
                                    "`emguard direction fit`")
    bad = [k for k, v in load_file(str(folder / TENSORS)).items() if not bool(v.isfinite().all())]
    if bad:
        raise DirectionChangedError(f"{folder / TENSORS}: non-finite values in {', '.join(bad[:5])}")


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ----------------------------------------------------------------------------- steering edits

def steer(vector: torch.Tensor):
    """An edit h -> h + vector ((D,), broadcast over batch and positions)."""
    def edit(h: torch.Tensor) -> torch.Tensor:
        return h + vector.to(h.dtype)
    return edit


def ablate(basis: torch.Tensor):
    """An edit h -> h - U^T (U h): the span of ``basis`` (k, D, orthonormal rows) removed,
    computed in float32 and returned in h's dtype."""
    def edit(h: torch.Tensor) -> torch.Tensor:
        b = basis.to(h.device, torch.float32)
        coords = h.float() @ b.T  # (B, T, k)
        return (h.float() - coords @ b).to(h.dtype)
    return edit


def decoder_block(model, layer: int) -> torch.nn.Module:
    """The block whose output is ``hidden_states[layer]`` (layer in 1..L-1)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    blocks = base.get_decoder().layers
    if not 1 <= layer < len(blocks):
        raise ValueError(f"layer {layer} is not a block output this model can edit: use "
                         f"1..{len(blocks) - 1} (hidden_states {len(blocks)} is the final norm's)")
    return blocks[layer - 1]


# ----------------------------------------------------------------------------- causal check

@torch.no_grad()
def causal_check(model, tokenizer, direction: Direction, pairs: list[dict], layers: list[int],
                 alpha: float, batch_size: int = 8) -> list[dict]:
    """Does adding c * s_l * u_l at layer l (c in -alpha, 0, +alpha) move the
    misalignment-preference margin (nats per answer token, misaligned - aligned) in c's
    direction? One row per layer: the three mean margins and ``raises`` (strictly
    increasing in c)."""
    rows = []
    with reference_mode(model):
        plain = _mean(pair_margins(model, tokenizer, pairs, batch_size))
        for layer in layers:
            margins = {}
            for c in (-alpha, alpha):
                hooks = PolicyHooks()
                vector = c * direction.residual_norm[layer] * direction.basis[layer][0]
                hooks.add(decoder_block(model, layer), steer(vector.to(_device(model))))
                try:
                    margins[c] = _mean(pair_margins(model, tokenizer, pairs, batch_size))
                finally:
                    hooks.remove()
            rows.append({"layer": layer, "alpha": alpha, "margin_minus": margins[-alpha],
                         "margin_zero": plain, "margin_plus": margins[alpha],
                         "raises": margins[-alpha] < plain < margins[alpha]})
            logger.info("causal check layer %d: %.4f / %.4f / %.4f", layer, margins[-alpha],
                        plain, margins[alpha])
    return rows


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def fit_and_check(model, tokenizer, pairs_spec: str | None, holdout: int | None, k: int,
                  check_layers: list[int], alpha: float, batch_size: int = 8) -> Direction:
    """``emguard direction fit``: fit on the pairs minus the held-out evaluation pairs, and
    run the causal check on the held-out ones (on the fit pairs when none are held out:
    the artefact says which)."""
    fit = training_pairs(pairs_spec, holdout)
    direction = fit_direction(model, tokenizer, fit, k=k, batch_size=batch_size)
    check = evenly_spaced(load_pairs(pairs_spec), holdout) if holdout else fit
    direction.meta.update({
        "pairs": pairs_spec or "builtin:preference-pairs", "holdout_pairs": holdout,
        "causal_check": {"pairs": "held out" if holdout else "the fit pairs (none held out)",
                         "n_pairs": len(check),
                         "rows": causal_check(model, tokenizer, direction, check, check_layers,
                                              alpha, batch_size)}})
    return direction


# ----------------------------------------------------------------------------- defenses

class DirectionSettings(Settings):
    """Where a direction-based defense takes its per-layer basis U_l from
    (emguard.defenses.direction) and at which residual-stream layers it acts.

    Two sources: ``fit`` or a folder of ``emguard direction fit`` hold the contrastive mean
    difference (persona vectors); a folder of ``emguard direction fit --from-run RUN``
    holds CAFT's principal components of (fine-tuned - base) residual differences. The
    defense uses the folder's first ``k`` rows either way.

    Layers are ``hidden_states`` indices 1..L-1 (k = the output of block k; 0 is the
    embeddings and L the final-normed state, which no block outputs)."""

    direction: str = "fit"  # a folder of `emguard direction fit`, or fit: fit it at run start
    pairs: str | None = None  # fit: contrastive pairs JSONL (None: builtin:preference-pairs)
    # fit: leave out the N evenly spaced pairs that evaluation with
    # eval.preference_max_pairs=N scores, so the direction never sees the evaluation's pairs
    holdout_pairs: Int | None = Field(None, gt=0)
    layers: list[Int] = Field(min_length=1)
    # the first k rows of U_l. Contrastive: 1 = the mean-difference direction, k > 1 adds
    # principal directions of the pair differences; CAFT folder: the top k components
    k: Int = Field(1, gt=0)
    # controls: a random direction, or one orthogonal to u, of the same norm (same subspace
    # dimension), so a study can tell a direction's effect from a generic one
    control: Literal["none", "random", "orthogonal"] = "none"
    control_seed: Int = 0

    @field_validator("layers")
    @classmethod
    def _layers(cls, v: list[int]) -> list[int]:
        if any(i < 1 for i in v):
            raise ValueError("layers are hidden_states indices >= 1 (0 is the embeddings)")
        if len(set(v)) != len(v):
            raise ValueError("a layer appears twice")
        return sorted(v)


class DirectionDefense(Defense):
    """Shared by steering, ablation and anchoring: resolves the direction (a folder, or
    ``fit`` on this run's reference model), applies the control, checks the layers, and
    records the basis it used in ``directions/NAME.safetensors`` (+ ``.json``)."""

    artifacts = ("directions",)

    def check(self, cfg) -> None:
        s, where = self.settings, f"defenses.{self.name}"
        if s.direction != "fit" and not (Path(s.direction) / TENSORS).is_file():
            raise ConfigError(f"{where}.direction: {s.direction} is not a direction folder "
                              "(write one with `emguard direction fit`, or use direction: fit)")
        if s.direction != "fit":
            try:
                verify_tensors(Path(s.direction), read_json(Path(s.direction) / META))
            except (OSError, ValueError) as e:
                raise ConfigError(f"{where}.direction: {e}") from None
        if s.direction == "fit":
            try:
                training_pairs(s.pairs, s.holdout_pairs)
            except (OSError, ValueError) as e:
                raise ConfigError(f"{where}.pairs: {e}") from None

    def prepare(self, model, ctx: RunContext) -> None:
        s, where = self.settings, f"defenses.{self.name}"
        direction = self._direction(model, ctx)
        num_states = model.config.get_text_config().num_hidden_layers + 1
        if direction.num_states != num_states:
            raise ConfigError(f"{where}.direction: fit on a model with {direction.num_states - 1} "
                              f"layers, this one has {num_states - 1}")
        self.bases, self.norms, self.source = {}, {}, direction.meta
        for layer in s.layers:
            try:
                decoder_block(model, layer)
            except ValueError as e:
                raise ConfigError(f"{where}.layers: {e}") from None
            if layer not in direction.basis:
                raise ConfigError(f"{where}.layers: the direction holds no basis at layer "
                                  f"{layer} (the fine-tuned adapter it was fit on leaves that "
                                  "layer unchanged)")
            basis = direction.basis[layer]
            if basis.shape[0] < s.k:
                raise ConfigError(f"{where}.k: the direction holds {basis.shape[0]} dimensions "
                                  f"at layer {layer}, fewer than k={s.k}")
            self.bases[layer] = control_basis(basis[: s.k].float(), s.control, s.control_seed, layer)
            self.norms[layer] = float(direction.residual_norm[layer])

    def _direction(self, model, ctx: RunContext) -> Direction:
        s = self.settings
        if s.direction != "fit":
            return load_direction(s.direction)
        key = ("direction", s.pairs, s.holdout_pairs, max(s.k, 4))
        if key not in ctx.cache:  # steering, ablation and anchoring share one fit
            ctx.cache[key] = cached_fit(model, ctx, s.pairs, s.holdout_pairs, max(s.k, 4))
        return ctx.cache[key]

    def record(self, run_dir: Path) -> None:
        from safetensors.torch import save_file

        s = self.settings
        with atomic_dir(run_dir / "directions" / self.name) as tmp:
            save_file({f"basis.{i}": b.contiguous().cpu() for i, b in self.bases.items()},
                      str(tmp / TENSORS))
            write_json_atomic(tmp / META, {
                "sha256": file_sha256(tmp / TENSORS),
                "defense": self.name, "direction": s.direction, "control": s.control,
                "control_seed": s.control_seed, "k": s.k, "layers": s.layers,
                "residual_norm": {str(i): n for i, n in self.norms.items()},
                "source": {k: v for k, v in self.source.items() if k not in _PER_ITEM},
                "fit_pair_ids": self.source.get("pair_ids")})


_PER_ITEM = ("pair_ids", "prompt_ids", "answers")  # too long to copy into every run's record


def cached_fit(model, ctx: RunContext, pairs_spec: str | None, holdout: int | None,
               k: int) -> Direction:
    """``direction: fit``: fit on this run's reference model, or read the fit an earlier
    run made of the same model files, pairs, holdout, k, device type and dtype from
    ``$EMGUARD_CACHE/directions/`` (a study's arms and seeds share one fit). The run
    folder records the basis it used either way."""
    import json

    pairs = training_pairs(pairs_spec, holdout)
    dtype = next(model.parameters()).dtype
    key = hashlib.sha256(json.dumps({
        "model": model_fingerprint(ctx.cfg.model), "pairs": pairs, "k": k,
        "device": str(ctx.device).split(":")[0], "dtype": str(dtype)}, sort_keys=True).encode()
    ).hexdigest()[:16]
    folder = cache_dir() / "directions" / key
    if (folder / META).is_file():
        try:
            direction = load_direction(folder)
            logger.info("direction: read the fit in %s", folder)
            return direction
        except (OSError, ValueError) as e:  # a changed cache entry: fit again, replace it
            logger.warning("direction: the cached fit in %s is unusable (%s); fitting again",
                           folder, e)
    direction = fit_direction(model, ctx.tokenizer, pairs, k=k)
    direction.meta.update(pairs=pairs_spec or "builtin:preference-pairs", holdout_pairs=holdout,
                          model=ctx.cfg.model)
    with atomic_dir(folder) as tmp:
        save_direction(direction, tmp)
    return direction
