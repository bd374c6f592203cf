"""Sample answers to chat prompts: batched Hugging Face ``generate`` or vLLM.

Determinism: every (prompt, sample index) pair draws its tokens from its own
``torch.Generator``, seeded by :func:`sample_seed` from the run seed, the rendered
prompt text and the sample index. HF ``generate`` runs in greedy mode and a logits
processor does the sampling row by row, so an answer does not depend on which other
prompts share its batch, on the batch size, or on the order of the prompt list. The
one caveat is floating point: left padding changes attention sums in the last bits,
which can flip a draw that sits exactly on a probability boundary (rare in fp32,
less rare in bf16).

Only ``temperature`` and ``top_p`` shape the sampling distribution: the model's own
generation defaults (top-k, repetition penalty, ...) are overridden, matching the
paper's sampling (temperature 1, top-p 1). An answer is the text before the first
end-of-turn / eos token, special tokens dropped.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import (
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopPLogitsWarper,
)

from emguard.models import model_dir

Messages = list[dict]


def sample_seed(seed: int, prompt_text: str, sample_index: int) -> int:
    """The 63-bit seed of one (prompt, sample) draw; stable across runs and machines."""
    digest = hashlib.sha256(f"{seed}\x00{sample_index}\x00{prompt_text}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & (2**63 - 1)


def render_prompts(tokenizer, prompts: list[Messages]) -> list[str]:
    """Chat-template each message list with the assistant generation prompt appended."""
    return [tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=False)
            for p in prompts]


class _RowSampler(LogitsProcessor):
    """Sample each row's next token with that row's own generator; return a one-hot mask.

    Used with greedy decoding: argmax of the returned scores is the sampled token.
    Scores are (B, V) float32; temperature and top-p are applied by HF's warpers.
    Inverse-transform sampling: one uniform draw per row and step, located in the row's
    cumulative distribution (float64) - exact, and batched over rows. The uniforms come
    from one CPU ``torch.Generator`` per row, seeded by its sample_seed, all drawn at the
    first step: (max_new_tokens, B) float64, which is the same stream as one draw per step
    (tests/test_generate.py checks this against a per-step sampler) but costs B generator
    calls per batch instead of B per step. CPU generators make the draws independent of
    the device.
    """

    def __init__(self, seeds: list[int], temperature: float, top_p: float, max_new_tokens: int):
        self.seeds, self.max_new_tokens = seeds, max_new_tokens
        self.uniforms: torch.Tensor | None = None  # (max_new_tokens, B) float64
        self.step = 0
        warpers = [TemperatureLogitsWarper(float(temperature))]
        if top_p < 1.0:
            warpers.append(TopPLogitsWarper(float(top_p)))
        self.warpers = LogitsProcessorList(warpers)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.uniforms is None:
            self.uniforms = torch.stack([  # (max_new_tokens, B): one contiguous row per step
                torch.rand(self.max_new_tokens, generator=torch.Generator().manual_seed(s),
                           dtype=torch.float64) for s in self.seeds], dim=1).to(scores.device)
        u = self.uniforms[self.step]
        self.step += 1
        probs = self.warpers(input_ids, scores).softmax(dim=-1).double()
        cdf = probs.cumsum(dim=-1)
        cdf /= cdf[:, -1:].clone()
        # first index whose cdf exceeds u: never a zero-probability token
        picks = torch.searchsorted(cdf, u[:, None], right=True).clamp_(max=scores.shape[-1] - 1)
        onehot = torch.full_like(scores, float("-inf"))
        return onehot.scatter_(1, picks, 0.0)


def _mergeable_lora_layers(model) -> list:
    """The LoRA layers of ``model`` whose delta can be folded into a plain float weight and
    restored exactly; empty when there is nothing to merge (no adapter, adapters disabled -
    e.g. inside ``disable_adapter()`` for reference answers - already merged, or a layer type
    this cannot restore, such as a quantised base)."""
    from peft.tuners.lora import LoraLayer

    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    plain = (torch.nn.Linear, torch.nn.Embedding)
    if not layers or any(m.disable_adapters or m.merged or not m.active_adapters
                         or not isinstance(m.get_base_layer(), plain)
                         or not m.get_base_layer().weight.dtype.is_floating_point for m in layers):
        return []
    return layers


@contextmanager
def merged_adapter(model) -> Iterator[bool]:
    """Fold the active LoRA adapter into the base weights for the duration of the block.

    Decoding with W + s*B@A in one matmul instead of W x + s*B(A x) is several times faster
    for batched generation (issue 13: 538 vs 163 tokens/s for a 0.5B model on an H200).
    On exit the base weights are restored bit-exactly from a host copy (unmerging by
    subtraction would leave rounding error in bf16), so measures computed afterwards on the
    same model see exactly the weights they saw before. Yields whether anything was merged.
    Host memory: one copy of the adapted weight matrices.
    """
    layers = _mergeable_lora_layers(model)
    saved = [{name: t.detach().to("cpu", copy=True)  # weight, and the bias a LoRA bias merges into
              for name, t in m.get_base_layer().named_parameters(recurse=False)} for m in layers]
    try:
        for m in layers:
            m.merge(adapter_names=list(m.active_adapters))
        yield bool(layers)
    finally:
        for m, originals in zip(layers, saved, strict=True):
            if m.merged:
                m.unmerge()
            base = m.get_base_layer()
            with torch.no_grad():
                for name, value in originals.items():
                    getattr(base, name).copy_(value)


GPU_GENERATION_BATCH = 64  # issue 13, H200, 0.5B: batch 64 3.1x the answers/s of batch 16


def generation_batch_size(model, batch_size: int, override: int | None = None) -> int:
    """Answers decoded together: ``override`` if given, else ``batch_size`` on CPU and at
    least :data:`GPU_GENERATION_BATCH` on a GPU, where a decode step costs about the same for
    16 rows as for 64. Answers do not depend on it (see the module doc)."""
    if override is not None:
        return override
    on_gpu = next(model.parameters()).device.type == "cuda"
    return max(batch_size, GPU_GENERATION_BATCH) if on_gpu else batch_size


def _eos_ids(model, tokenizer) -> list[int]:
    ids = getattr(model.generation_config, "eos_token_id", None)
    ids = [ids] if isinstance(ids, int) else list(ids or [])
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


def _decode(tokenizer, row: torch.Tensor, eos_ids: list[int]) -> str:
    tokens = row.tolist()
    for i, t in enumerate(tokens):
        if t in eos_ids:
            tokens = tokens[:i]
            break
    return tokenizer.decode(tokens, skip_special_tokens=True)


def _generate_batch(model, tokenizer, texts: list[str], seeds: list[int] | None,
                    temperature: float, top_p: float, max_new_tokens: int) -> list[str]:
    """Generate one answer per text (left-padded batch); ``seeds=None`` means greedy."""
    device = next(model.parameters()).device
    enc = tokenizer(texts, add_special_tokens=False, padding=True, padding_side="left",
                    return_tensors="pt").to(device)
    eos_ids = _eos_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
    config = GenerationConfig(do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=eos_ids,
                              pad_token_id=pad_id, repetition_penalty=1.0, num_beams=1,
                              temperature=1.0, top_p=1.0, top_k=50)  # neutral: override model defaults
    processors = LogitsProcessorList()
    if seeds is not None:
        processors.append(_RowSampler(seeds, temperature, top_p, max_new_tokens))
    with torch.inference_mode():
        out = model.generate(**enc, generation_config=config, logits_processor=processors)
    new = out[:, enc["input_ids"].shape[1]:]  # (B, <= max_new_tokens)
    return [_decode(tokenizer, row, eos_ids) for row in new]


def generate_items(model, tokenizer, items: list[tuple[Messages, int]], temperature: float = 1.0,
                   top_p: float = 1.0, max_new_tokens: int = 256, seed: int = 0,
                   batch_size: int = 16, progress: bool = True, merge: bool = True) -> list[str]:
    """One answer per ``(messages, sample_index)`` item, in item order.

    ``temperature == 0`` is greedy decoding (seed and sample index then play no role).
    Items are batched longest-prompt-first; results do not depend on the batching.
    ``merge``: decode with the LoRA adapter folded into the weights (:func:`merged_adapter`;
    same answers up to floating-point rounding, restored exactly afterwards).
    """
    if temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1, got {temperature}, {top_p}")
    texts = render_prompts(tokenizer, [m for m, _ in items])
    greedy = temperature == 0
    seeds = [sample_seed(seed, t, s) for t, (_, s) in zip(texts, items, strict=True)]
    lengths = [len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
    order = sorted(range(len(items)), key=lambda i: -lengths[i])
    answers: list[str] = [""] * len(items)
    bar = tqdm(total=len(items), desc="generate", unit="answer", disable=not progress)
    with merged_adapter(model) if merge else nullcontext():
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            outs = _generate_batch(model, tokenizer, [texts[i] for i in chunk],
                                   None if greedy else [seeds[i] for i in chunk],
                                   temperature, top_p, max_new_tokens)
            for i, answer in zip(chunk, outs, strict=True):
                answers[i] = answer
            bar.update(len(chunk))
    bar.close()
    return answers


def generate_answers(model, tokenizer, prompts: list[Messages], n_samples: int = 1,
                     temperature: float = 1.0, top_p: float = 1.0, max_new_tokens: int = 256,
                     seed: int = 0, batch_size: int = 16, progress: bool = True,
                     merge: bool = True) -> list[list[str]]:
    """``n_samples`` answers for each chat prompt: result[i][s] answers prompts[i], sample s.

    Greedy decoding (``temperature == 0``) generates each prompt once and repeats the
    answer ``n_samples`` times. ``merge``: see :func:`generate_items`.
    """
    if n_samples < 1:
        raise ValueError(f"n_samples must be >= 1, got {n_samples}")
    draws = 1 if temperature == 0 else n_samples
    items = [(p, s) for p in prompts for s in range(draws)]
    flat = generate_items(model, tokenizer, items, temperature, top_p, max_new_tokens, seed,
                          batch_size, progress, merge)
    per_prompt = [flat[i * draws:(i + 1) * draws] for i in range(len(prompts))]
    return [answers * (n_samples // draws) for answers in per_prompt]


def generate_answers_vllm(model_spec: str, adapter_dir: str | Path | None, prompts: list[Messages],
                          n_samples: int = 1, temperature: float = 1.0, top_p: float = 1.0,
                          max_new_tokens: int = 256, seed: int = 0,
                          **llm_kwargs) -> list[list[str]]:
    """Same contract as :func:`generate_answers`, generated by vLLM (GPU hosts).

    The LoRA adapter is served with ``enable_lora`` + ``LoRARequest``; each (prompt,
    sample) request carries its own :func:`sample_seed`, so results are deterministic
    for a seed (but differ from the HF backend's, whose random streams differ).
    Untested in this project's CI: vllm is not installed on the CPU machines.
    ``llm_kwargs`` go to ``vllm.LLM`` (e.g. ``gpu_memory_utilization``, ``tensor_parallel_size``).
    """
    try:
        from vllm import LLM, SamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.lora.request import LoRARequest
    except ImportError as e:
        raise ImportError("the vLLM generation backend needs vllm: pip install emguard[gpu]",
                          name=e.name) from e

    lora = None
    if adapter_dir is not None:
        rank = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())["r"]
        llm_kwargs = {"enable_lora": True, "max_lora_rank": max(rank, 8), **llm_kwargs}
        lora = LoRARequest("emguard-adapter", 1, str(Path(adapter_dir).resolve()))
    llm = LLM(model=model_dir(model_spec), seed=seed, **llm_kwargs)
    tokenizer = llm.get_tokenizer()
    texts = render_prompts(tokenizer, prompts)
    draws = 1 if temperature == 0 else n_samples
    requests, params = [], []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        for s in range(draws):
            requests.append(TokensPrompt(prompt_token_ids=ids))
            params.append(SamplingParams(n=1, temperature=temperature, top_p=top_p,
                                         max_tokens=max_new_tokens, seed=sample_seed(seed, text, s),
                                         skip_special_tokens=True))
    outputs = llm.generate(requests, params, lora_request=lora, use_tqdm=True)
    flat = [o.outputs[0].text for o in outputs]
    return [flat[i * draws:(i + 1) * draws] * (n_samples // draws) for i in range(len(prompts))]
