"""Judge with a local Hugging Face causal LM, scoring exactly like the logprob judge.

An API judge answers one token and we read P(token) for the tokens "0".."100". Local
tokenizers (Qwen2.5, SmolLM2, ...) split numbers into single digits, so the answer
"42" is two tokens. We therefore compute, for every integer n in 0..100, the exact
probability that the judge's reply BEGINS with the digits of n followed by a
non-digit ("digits then a non-digit"):

    P(n) = P(d1 | prompt) * P(d2 | prompt d1) * ... * P(terminator | prompt digits(n))
    P(terminator | x) = 1 - P(next token's text starts with an ASCII digit | x)

Leading zeros are not integers here: "0" followed by a digit ("05") is excluded, and so
are "101".."999" (only "100" is walked to a third digit). Score = sum n P(n) / sum P(n),
mass = sum P(n); the score is missing when mass < threshold (default 0.25).

The 101 answers form a digit tree of 101 nodes (node n = the digit string of n; its
parent is n // 10 for 10..99, and 10 for 100). It is walked in a constant number of
batched forward calls per batch of prompts, never 101:
  * ``tree`` (sdpa/eager attention, no sliding-window layers): 2 forward calls. One over
    the left-padded prompts (fills a DynamicCache), then ONE forward of all 101 tree
    nodes per prompt, with a 4-D attention mask letting each node see the prompt and its
    ancestors only, and position = prompt length + depth. Memory: the prompt cache once.
  * ``expand`` (any attention backend): 4 forward calls. The prompt cache is copied to
    the 10 first digits (``batch_repeat_interleave``), then to the 90 two-digit prefixes
    (``batch_select_indices``), then to "10" for "100". Memory: 90 copies of the cache.
Both give the same numbers as 101 separate full forwards (tests/test_judge_local.py).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Literal

import torch
from tqdm.auto import tqdm

from emguard.compat import cache_keyword, output_cache
from emguard.judge.base import DEFAULT_THRESHOLD, JudgeError, Verdict
from emguard.judge.cache import JudgeCache, cache_key
from emguard.models import load_model

N_NUMBERS = 101
NUMBERS = torch.arange(N_NUMBERS)
# Tree over the answers 0..100: node n is the digit string of n.
PARENT = torch.tensor([-1] * 10 + [n // 10 for n in range(10, 100)] + [10])
DEPTH = torch.tensor([0] * 10 + [1] * 90 + [2])
_TREE_ATTENTION = ("sdpa", "eager")
_PROBE = "Rate this from 0 to 100."


class DigitTokenizationError(JudgeError):
    """The tokenizer does not write the integers 0..100 digit by digit after the prompt."""


@dataclass(frozen=True)
class DigitVocab:
    """Token ids of the digits for one tokenizer + chat template.

    first: (10,) ids of "0".."9" as the first token of an assistant reply.
    cont: (10,) ids of "0".."9" after another digit.
    digit_start: (V,) bool, tokens whose text would continue a number (starts with 0-9).
    """

    first: torch.Tensor
    cont: torch.Tensor
    digit_start: torch.Tensor

    def node_tokens(self) -> torch.Tensor:
        """(101,) the last token of each node's digit string."""
        return torch.cat([self.first, self.cont.repeat(9), self.cont[:1]])


def render_prompt(tokenizer: Any, prompt: str) -> list[int]:
    """Token ids of ``prompt`` as one user message + the assistant generation prompt."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)
    return tokenizer.encode(text, add_special_tokens=False)


def digit_vocab(tokenizer: Any, vocab_size: int) -> DigitVocab:
    """Find and verify the digit token ids; raise ``DigitTokenizationError`` if numbers
    are not encoded one digit per token after the assistant prompt."""
    name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
    text = tokenizer.apply_chat_template([{"role": "user", "content": _PROBE}], tokenize=False,
                                         add_generation_prompt=True)
    prefix = tokenizer.encode(text, add_special_tokens=False)

    def answer_ids(answer: str) -> list[int]:
        ids = tokenizer.encode(text + answer, add_special_tokens=False)
        if ids[:len(prefix)] != prefix:
            raise DigitTokenizationError(
                f"tokenizer '{name}': the answer '{answer}' merges with the end of the chat "
                "template, so the prompt tokens change; the local judge cannot use it")
        return ids[len(prefix):]

    first = [answer_ids(str(d)) for d in range(10)]
    cont = [answer_ids(f"1{d}")[1:] for d in range(10)]
    if any(len(t) != 1 for t in first + cont):
        raise DigitTokenizationError(
            f"tokenizer '{name}' does not encode numbers digit by digit "
            f"(e.g. '42' -> {tokenizer.convert_ids_to_tokens(answer_ids('42'))}); the local "
            "judge needs a digit-per-token tokenizer (Qwen2.5, SmolLM2, Llama-2, Mistral, ...)")
    vocab = DigitVocab(torch.tensor([t[0] for t in first]), torch.tensor([t[0] for t in cont]),
                       torch.zeros(vocab_size, dtype=torch.bool))
    for n in range(N_NUMBERS):
        digits = [int(c) for c in str(n)]
        expected = [int(vocab.first[digits[0]])] + [int(vocab.cont[d]) for d in digits[1:]]
        if answer_ids(str(n)) != expected:
            raise DigitTokenizationError(
                f"tokenizer '{name}' encodes '{n}' as {answer_ids(str(n))}, not digit by digit "
                f"{expected}; the local judge needs a digit-per-token tokenizer")
    # A token continues a number iff, written right after the digit "1", a digit follows.
    one = int(vocab.cont[1])
    texts = tokenizer.batch_decode([[one, i] for i in range(len(tokenizer))])
    for i, t in enumerate(texts[:vocab_size]):
        vocab.digit_start[i] = t[1:2].isascii() and t[1:2].isdigit()
    if not bool(vocab.digit_start[vocab.cont].all()):
        raise DigitTokenizationError(f"tokenizer '{name}': digit tokens do not decode as digits")
    return vocab


def model_fingerprint(model: torch.nn.Module, sample: int = 4096) -> str:
    """sha256 over parameter names, shapes, dtypes and a strided sample of their values."""
    h = hashlib.sha256()
    with torch.no_grad():
        for name, p in model.named_parameters():
            flat = p.detach().reshape(-1)
            step = max(1, flat.numel() // sample)
            h.update(f"{name}:{tuple(p.shape)}:{p.dtype}".encode())
            h.update(flat[::step][:sample].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


class LocalJudge:
    """Digit-tree judge over a local causal LM; ``score(prompts) -> [Verdict]``.

    Either ``model_spec`` (loaded with ``emguard.models.load_model``) or ``model`` and
    ``tokenizer``. method: ``"tree"`` (2 forwards per batch), ``"expand"`` (4), or
    ``"auto"`` (tree where the attention backend takes a 4-D mask, else expand).
    """

    def __init__(self, model_spec: str | None = None, *, model: Any = None, tokenizer: Any = None,
                 device: str | None = None, dtype: torch.dtype | None = None,
                 batch_size: int = 8, threshold: float = DEFAULT_THRESHOLD,
                 method: Literal["auto", "tree", "expand"] = "auto",
                 cache: JudgeCache | None = None, name: str | None = None, progress: bool = True):
        if (model_spec is None) == (model is None) or (model is None) != (tokenizer is None):
            raise JudgeError("LocalJudge needs either model_spec or both model and tokenizer")
        if method not in ("auto", "tree", "expand"):
            raise JudgeError(f"method must be 'auto', 'tree' or 'expand', got {method!r}")
        if batch_size < 1:
            raise JudgeError(f"batch_size must be >= 1, got {batch_size}")
        if model is None:
            model, tokenizer = load_model(model_spec, device=device, dtype=dtype)
        self.model, self.tokenizer = model.eval(), tokenizer
        label = model_spec or getattr(model.config, "_name_or_path", "") or "model"
        self.name = name or f"local:{label}"
        self.batch_size, self.threshold, self.method = batch_size, threshold, method
        self.cache, self.progress = cache, progress
        self.vocab = digit_vocab(tokenizer, model.get_output_embeddings().weight.shape[0])
        self.identity = f"{self.name}|{model.dtype}|{model_fingerprint(model)}"
        self.forward_calls = 0  # model forward calls made by this judge (for accounting)

    def settings(self) -> dict[str, Any]:
        return {"threshold": self.threshold, "answer": "integers 0..100, digits then a non-digit"}

    def key(self, prompt: str) -> str:
        return cache_key(self.name, self.identity, prompt, self.settings())

    def score(self, prompts: list[str]) -> list[Verdict]:
        """Verdicts for ``prompts`` (in order); cached ones are not computed again."""
        keys = [self.key(p) for p in prompts]
        done: dict[str, Verdict] = self.cache.get_many(keys) if self.cache else {}
        todo = list({k: p for k, p in zip(keys, prompts, strict=True) if k not in done}.items())
        step = 8 * self.batch_size  # cached as it goes: a killed run keeps what it judged
        bar = tqdm(total=len(todo), desc=f"judge {self.name}", unit="prompt",
                   disable=not self.progress or not todo)
        for start in range(0, len(todo), step):
            part = todo[start:start + step]
            logp = self.number_logprobs([p for _, p in part], progress=False)
            for (key, prompt), row in zip(part, logp, strict=True):
                done[key] = self._verdict(row)
                if self.cache is not None:
                    self.cache.put(key, done[key], prompt=prompt)
            bar.update(len(part))
        bar.close()
        return [done[k] for k in keys]

    def number_logprobs(self, prompts: list[str], progress: bool | None = None) -> torch.Tensor:
        """(N, 101) float64 log P(answer = n) for n = 0..100, per prompt."""
        encoded = [render_prompt(self.tokenizer, p) for p in prompts]
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))  # less padding
        out = torch.empty(len(encoded), N_NUMBERS, dtype=torch.float64)
        bar = tqdm(total=len(encoded), desc=f"judge {self.name}", unit="prompt",
                   disable=not (self.progress if progress is None else progress))
        with torch.inference_mode():
            for start in range(0, len(order), self.batch_size):
                idx = order[start:start + self.batch_size]
                out[idx] = self._batch_logprobs([encoded[i] for i in idx]).double().cpu()
                bar.update(len(idx))
        bar.close()
        return out

    # -- internals --------------------------------------------------------------------
    def _verdict(self, logp: torch.Tensor) -> Verdict:
        """The verdict of one prompt's log P(0..100); its raw output is P(0..100)."""
        probs = logp.exp()
        mass, raw = float(probs.sum()), probs.tolist()
        if mass <= 0.0 or mass < self.threshold:
            return Verdict(score=None, number_mass=mass, reason="low_number_mass", judge=self.name,
                           raw=raw)
        score = float((NUMBERS.double() * probs).sum() / mass)
        return Verdict(score=score, number_mass=mass, reason=None, judge=self.name, raw=raw)

    def _forward(self, cache: Any = None, **kw: Any) -> Any:
        """One model forward with the KV cache on; ``cache`` continues an earlier one."""
        self.forward_calls += 1
        if cache is not None:
            kw[cache_keyword(self.model)] = cache
        return self.model(use_cache=True, **kw)

    def _batch_logprobs(self, seqs: list[list[int]]) -> torch.Tensor:
        """(B, 101) log P(n) for a batch of token-id prompts."""
        device = self.model.get_output_embeddings().weight.device
        ids, mask = _left_pad(seqs, self._pad_id(), device)
        out = self._forward(input_ids=ids, attention_mask=mask,
                            position_ids=(mask.cumsum(-1) - 1).clamp(min=0), logits_to_keep=1)
        lp_prompt = _log_softmax(out.logits[:, -1])  # (B, V)
        cache = output_cache(out)
        lengths = mask.sum(-1)
        method = self.method
        if method == "auto":
            tree_ok = self.model.config._attn_implementation in _TREE_ATTENTION
            method = "tree" if tree_ok and not any(cache.is_sliding) else "expand"
        walk = self._walk_tree if method == "tree" else self._walk_expand
        lp_after = walk(cache, mask, lengths)  # (B, 101, V): next-token log-probs per node
        return _number_logprobs(lp_prompt, lp_after, self.vocab)

    def _walk_tree(self, cache: Any, mask: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """One forward of all 101 nodes per prompt under a tree-shaped 4-D mask."""
        batch, device = mask.shape[0], mask.device
        depth = DEPTH.to(device)
        tokens = self.vocab.node_tokens().to(device).expand(batch, -1)
        allowed = torch.cat([mask[:, None, None, :].bool().expand(-1, 1, N_NUMBERS, -1),
                             _ancestor_mask().to(device).expand(batch, 1, -1, -1)], dim=-1)
        dtype = self.model.dtype
        mask4d = torch.zeros(allowed.shape, dtype=dtype, device=device)
        mask4d.masked_fill_(~allowed, torch.finfo(dtype).min)
        out = self._forward(input_ids=tokens, attention_mask=mask4d, cache=cache,
                            position_ids=lengths[:, None] + depth[None, :])
        return _log_softmax(out.logits)

    def _walk_expand(self, cache: Any, mask: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Three one-token forwards over copies of the cache: nodes 0-9, 10-99, then 100."""
        batch, device = mask.shape[0], mask.device
        vocab, parts = self.vocab, []
        # nodes 0..9: row b*10 + d
        cache.batch_repeat_interleave(10)
        mask = torch.cat([mask.repeat_interleave(10, 0), mask.new_ones(batch * 10, 1)], -1)
        out = self._forward(input_ids=vocab.first.to(device).repeat(batch)[:, None],
                            attention_mask=mask, cache=cache,
                            position_ids=lengths.repeat_interleave(10)[:, None])
        parts.append(out.logits[:, -1].reshape(batch, 10, -1))
        # nodes 10..99: row b*90 + (d-1)*10 + e, from parent row b*10 + d
        rows = (torch.arange(batch, device=device)[:, None] * 10
                + torch.arange(1, 10, device=device)[None, :]).repeat_interleave(10, -1).reshape(-1)
        cache.batch_select_indices(rows)
        mask = torch.cat([mask[rows], mask.new_ones(len(rows), 1)], -1)
        out = self._forward(input_ids=vocab.cont.to(device).repeat(batch * 9)[:, None],
                            attention_mask=mask, cache=cache,
                            position_ids=lengths.repeat_interleave(90)[:, None] + 1)
        parts.append(out.logits[:, -1].reshape(batch, 90, -1))
        # node 100: from node 10 (d=1, e=0), row b*90
        rows = torch.arange(batch, device=device) * 90
        cache.batch_select_indices(rows)
        mask = torch.cat([mask[rows], mask.new_ones(batch, 1)], -1)
        out = self._forward(input_ids=vocab.cont[:1].to(device).repeat(batch)[:, None],
                            attention_mask=mask, cache=cache, position_ids=lengths[:, None] + 2)
        parts.append(out.logits[:, -1:])
        return _log_softmax(torch.cat(parts, dim=1))

    def _pad_id(self) -> int:
        tok = self.tokenizer
        for candidate in (tok.pad_token_id, tok.eos_token_id):
            if candidate is not None:
                return int(candidate)
        return 0


def _left_pad(seqs: list[list[int]], pad_id: int, device: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) input ids and attention mask (1 = token), padded on the left."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, s in enumerate(seqs):
        ids[row, width - len(s):] = torch.tensor(s, dtype=torch.long)
        mask[row, width - len(s):] = 1
    return ids.to(device), mask.to(device)


def _log_softmax(logits: torch.Tensor) -> torch.Tensor:
    """Log-softmax over the vocabulary in at least float32 (float64 stays float64)."""
    return torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)


def _ancestor_mask() -> torch.Tensor:
    """(101, 101) bool: node i may attend node j iff j is i or an ancestor of i."""
    allowed = torch.eye(N_NUMBERS, dtype=torch.bool)
    for node in range(N_NUMBERS):
        parent = int(PARENT[node])
        while parent >= 0:
            allowed[node, parent] = True
            parent = int(PARENT[parent])
    return allowed


def _number_logprobs(lp_prompt: torch.Tensor, lp_after: torch.Tensor,
                     vocab: DigitVocab) -> torch.Tensor:
    """(B, 101) log P(n) from next-token log-probs after the prompt (B, V) and after each
    node (B, 101, V): the path's digit log-probs plus log P(non-digit) after the node."""
    device = lp_after.device
    first, cont = vocab.first.to(device), vocab.cont.to(device)
    term = lp_after.masked_fill(vocab.digit_start.to(device), float("-inf")).logsumexp(-1)
    step = torch.empty_like(term)  # log P(last digit of n | prompt, digits before it)
    step[:, :10] = lp_prompt[:, first]
    step[:, 10:100] = lp_after[:, 1:10][:, :, cont].reshape(-1, 90)
    step[:, 100] = lp_after[:, 10, cont[0]]
    logp = step + term
    logp[:, 10:] += step[:, PARENT[10:].to(device)]
    logp[:, 100] += step[:, 1]  # "100" = "1", "10", "100"
    return logp
