"""Random-initialised causal LMs of real shapes, for benchmarks and the GPU device check.

No hub access is needed: the architecture comes from a config built here and the
tokenizer from the embedded SmolLM2 model (or a folder exported from it with
``export_tokenizer``), so a machine without network can measure at Qwen2.5-7B shapes.
The tokenizer's ids (< 49152) are all valid in the larger vocabularies.
"""

from __future__ import annotations

from pathlib import Path

# Qwen2.5 shapes from their published config.json files; "tiny" for CPU tests.
SHAPES: dict[str, dict] = {
    "qwen2.5-7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                       num_attention_heads=28, num_key_value_heads=4, vocab_size=152064,
                       tie_word_embeddings=False),
    "qwen2.5-1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                         num_attention_heads=12, num_key_value_heads=2, vocab_size=151936,
                         tie_word_embeddings=True),
    "qwen2.5-0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2, vocab_size=151936,
                         tie_word_embeddings=True),
    # SmolLM2-135M's sizes (its config.json) on the Qwen2 architecture: the embedded model's
    # cost with weights that never emit end-of-turn, so every answer runs to full length
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
                         tie_word_embeddings=True),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=6,
                 num_attention_heads=4, num_key_value_heads=2, vocab_size=49152,
                 tie_word_embeddings=False),
}


def shape_config(shape: str, tokenizer=None):
    """A ``Qwen2Config`` of the named shape (special token ids from ``tokenizer``)."""
    from transformers import Qwen2Config

    if shape not in SHAPES:
        raise SystemExit(f"unknown shape {shape!r}; choose one of {', '.join(SHAPES)}")
    ids = {}
    if tokenizer is not None:
        ids = dict(pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                   bos_token_id=tokenizer.bos_token_id)
    return Qwen2Config(**SHAPES[shape], max_position_embeddings=4096, rope_theta=1e6, **ids)


def random_model(shape: str, dtype, device: str, tokenizer=None, seed: int = 0):
    """A randomly initialised model of ``shape``, created directly on ``device``."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(shape_config(shape, tokenizer), dtype=dtype)
    return model


def embedded_tokenizer(tokenizer_dir: str | Path | None = None):
    """The embedded SmolLM2 tokenizer (chat template included), or one exported from it."""
    from transformers import AutoTokenizer

    if tokenizer_dir is not None:
        return AutoTokenizer.from_pretrained(str(tokenizer_dir))
    from emguard.models import load_tokenizer

    return load_tokenizer("smollm2-135m")


def export_tokenizer(out: str | Path) -> Path:
    """Save the embedded tokenizer into ``out`` (a few MB) to carry to a machine without it."""
    out = Path(out)
    embedded_tokenizer().save_pretrained(out)
    return out


def save_random_model(out: str | Path, shape: str, dtype, device: str,
                      tokenizer_dir: str | Path | None = None) -> Path:
    """Write a random model of ``shape`` + the embedded tokenizer as a normal HF folder."""
    out = Path(out)
    tokenizer = embedded_tokenizer(tokenizer_dir)
    model = random_model(shape, dtype, device, tokenizer)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    del model
    return out
