"""SafeLoRA (Hsu et al. 2024; paper §3, eqs. 1-3): a post-hoc projection of a trained LoRA
adapter, adapter directory in -> adapter directory out.

For every LoRA layer with delta ``W = s * B @ A`` (``B`` (d_out, r), ``A`` (r, d_in), ``s`` the
PEFT scale) on the base weight ``theta`` (d_out, d_in):

    V  = theta_aligned - theta_unaligned                      (eq. 1, weights only, never biases)
    C  = V V^T / ||V||_F^2                                    (eq. 2, never materialised)
    W <- C W   iff   cos_F(W, C W) = <W, C W>_F / (||W||_F ||C W||_F) < tau   (eq. 3, strict)

``C W = V (V^T W) / ||V||^2 = s * [V (V^T B) / ||V||^2] @ A``, so only ``B`` changes:
``B' = V (V^T B) / ||V||^2`` (d_out, r). The cosine needs no (d_out, d_in) matrix either; with
the r x r Gram matrices ``G_A = A A^T``, ``G_B = B^T B``, ``P = V^T B`` (d_in, r):

    ||W||^2    = s^2 tr(G_B G_A)
    <W, C W>   = ||V^T W||^2 / ||V||^2 = s^2 tr(P^T P G_A) / ||V||^2
    ||C W||^2  = s^2 tr(B'^T B' G_A)

(``s`` cancels in the cosine; it only enters the reported norms.)

The alignment vector comes from either
  * a model pair (paper): ``aligned`` = instruct checkpoint, ``unaligned`` = base checkpoint; or
  * an adapter: ``aligned`` = instruct, ``unaligned`` = instruct + a misaligned LoRA adapter, so
    ``V = -s_m B_m A_m``, kept in low-rank form (for models shipped without a base).

Edge cases (each recorded in the report's ``reason`` column):
  * ``W = 0`` (e.g. ``B = 0``): cosine undefined -> NaN (null in JSON), layer left alone.
  * ``V = 0`` (identical weights, or a layer the misaligned adapter does not touch): cosine
    undefined -> NaN, layer left alone.
  * ``W != 0`` but ``C W = 0`` (W orthogonal to V's column space): cosine taken as 0 (the limit
    ``torch.nn.functional.cosine_similarity`` also returns), so it is projected for tau > 0.

Differences from the reference code of Hsu et al. (github.com/IBM/SafeLoRA): it divides by
``||V||_F`` (not squared) and projects when ``cos <= tau``; we follow the paper's eqs. 2-3.
The cosine, hence which layers are projected, does not depend on C's normalisation.

Memory: one layer at a time; base weights are read lazily with ``safetensors.safe_open``
(across shards via ``model.safetensors.index.json``); math in float32 (r x r algebra in
float64); the output keeps the input dtype.
"""

from __future__ import annotations

import math
import re
import shutil
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from difflib import get_close_matches
from pathlib import Path
from typing import Any

import torch
from pydantic import Field
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from emguard.defenses.base import Defense, RunContext
from emguard.io import provenance, read_json, write_json_atomic
from emguard.models import ModelLoadError, is_adapter_dir, model_dir, resolve_model_source
from emguard.ownership import SAFELORA, FolderConflictError, check_claim, claim
from emguard.settings import ConfigError, Settings

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
REPORT_NAME = "safelora_report.json"
PEFT_PREFIX = "base_model.model."
_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<ab>[AB])\.(?P<param>weight|bias)$")
_UNSUPPORTED_KEYS = ("lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector")


class SafeLoRAError(ValueError):
    """Bad SafeLoRA input; the message names the file, tensor or field."""


@dataclass(frozen=True)
class SafeLoRAConfig:
    """Run-config block ``defenses.safelora``: call ``apply_safelora(adapter, out, **asdict(cfg))``.

    aligned: model spec of the aligned (instruct) model.
    unaligned: model spec of the base model, or a misaligned adapter directory trained on ``aligned``.
    tau: projection threshold on the Frobenius cosine, in [0, 1] (paper: 0.3).
    """

    aligned: str
    unaligned: str
    tau: float = 0.3

    def __post_init__(self):
        _check_tau(self.tau)
        for name in ("aligned", "unaligned"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise SafeLoRAError(f"defenses.safelora.{name}: expected a non-empty model spec")


def _check_tau(tau: float) -> None:
    if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not 0.0 <= tau <= 1.0:
        raise SafeLoRAError(f"tau must be a number in [0, 1] (cos_F lies in [0, 1]); got {tau!r}")


# ----------------------------------------------------------------------------- the math


@dataclass(frozen=True)
class LowRankDelta:
    """An alignment vector ``V = scale * B @ A`` kept factored: B (d_out, r_m), A (r_m, d_in), float32."""

    B: torch.Tensor
    A: torch.Tensor
    scale: float

    @property
    def shape(self) -> tuple[int, int]:
        return (self.B.shape[0], self.A.shape[1])

    def t_matmul(self, X: torch.Tensor) -> torch.Tensor:
        """V^T X for X (d_out, k) -> (d_in, k)."""
        return self.scale * (self.A.T @ (self.B.T @ X))

    def matmul(self, Y: torch.Tensor) -> torch.Tensor:
        """V Y for Y (d_in, k) -> (d_out, k)."""
        return self.scale * (self.B @ (self.A @ Y))

    def sq_norm(self) -> float:
        """||V||_F^2 = scale^2 tr((B^T B)(A A^T)), from r_m x r_m matrices."""
        B, A = self.B.double(), self.A.double()
        return self.scale**2 * _trace_product(B.T @ B, A @ A.T)


@dataclass(frozen=True)
class _DenseDelta:
    V: torch.Tensor  # (d_out, d_in) float32

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.V.shape)

    def t_matmul(self, X: torch.Tensor) -> torch.Tensor:
        return self.V.T @ X

    def matmul(self, Y: torch.Tensor) -> torch.Tensor:
        return self.V @ Y

    def sq_norm(self) -> float:
        return sq_frobenius(self.V)


def sq_frobenius(X: torch.Tensor, block: int = 2**20) -> float:
    """||X||_F^2 (X 2-D) accumulated in float64, ~``block`` elements at a time (8 MiB extra).

    A float32 ``torch.linalg.vector_norm`` over a whole 18944 x 3584 matrix is ~1 % low on CPU
    (torch 2.13, one thread): its accumulator loses the small terms.
    """
    rows = max(1, block // max(1, X.shape[-1]))
    return sum(float(torch.linalg.vector_norm(part, dtype=torch.float64)) ** 2
               for part in X.split(rows))


def _trace_product(X: torch.Tensor, Y: torch.Tensor) -> float:
    """tr(X @ Y) for square X, Y without forming the product."""
    return float((X * Y.T).sum())


@dataclass(frozen=True)
class _LayerMath:
    B_new: torch.Tensor
    cosine: float
    projected: bool
    reason: str
    norm_delta: float  # ||W||_F (scale included)
    norm_projected: float  # ||C W||_F, NaN when not computed
    norm_alignment: float  # ||V||_F


def _project(A: torch.Tensor, B: torch.Tensor, V: torch.Tensor | LowRankDelta, scale: float,
             tau: float) -> _LayerMath:
    """The factored SafeLoRA step for one layer (see module docstring for the algebra)."""
    r, d_in = A.shape
    d_out = B.shape[0]
    op = V if isinstance(V, LowRankDelta) else _DenseDelta(V.to(torch.float32))
    if B.shape != (d_out, r) or tuple(op.shape) != (d_out, d_in):
        raise SafeLoRAError(f"shape mismatch: A {tuple(A.shape)}, B {tuple(B.shape)}, "
                            f"V {tuple(op.shape)}; expected A (r, d_in), B (d_out, r), V (d_out, d_in)")
    A64, B32 = A.double(), B.to(torch.float32)
    B64 = B32.double()
    G_A = A64 @ A64.T
    w_sq = _trace_product(B64.T @ B64, G_A)  # ||B A||_F^2
    v_sq = op.sq_norm()
    norm_w, norm_v = abs(scale) * math.sqrt(max(w_sq, 0.0)), math.sqrt(max(v_sq, 0.0))
    if w_sq == 0.0:
        return _LayerMath(B, math.nan, False, "zero_delta", norm_w, math.nan, norm_v)
    if v_sq == 0.0:
        return _LayerMath(B, math.nan, False, "zero_alignment", norm_w, math.nan, norm_v)
    P = op.t_matmul(B32)  # V^T B (d_in, r)
    B_proj = op.matmul(P) / v_sq  # B' (d_out, r)
    P64, Bp64 = P.double(), B_proj.double()
    inner = _trace_product(P64.T @ P64, G_A) / v_sq  # <BA, C BA>
    cw_sq = _trace_product(Bp64.T @ Bp64, G_A)  # ||C BA||^2
    cosine = 0.0 if cw_sq == 0.0 else inner / math.sqrt(w_sq * cw_sq)
    projected = cosine < tau
    B_new = B_proj.to(B.dtype) if projected else B
    reason = "cos<tau" if projected else "cos>=tau"
    return _LayerMath(B_new, cosine, projected, reason, norm_w, abs(scale) * math.sqrt(cw_sq), norm_v)


def project_lora_pair(A: torch.Tensor, B: torch.Tensor, V: torch.Tensor | LowRankDelta,
                      scale: float, tau: float) -> tuple[torch.Tensor, float, bool]:
    """SafeLoRA for one LoRA layer: replace ``W = scale * B @ A`` by ``C W`` iff cos_F(W, C W) < tau.

    A: (r, d_in) lora_A weight. B: (d_out, r) lora_B weight. V: (d_out, d_in) alignment vector
    (dense tensor, or a ``LowRankDelta``). scale: PEFT scaling (alpha/r, or alpha/sqrt(r) for
    rs-LoRA). Returns ``(B_new (d_out, r) in B's dtype, cosine, projected)``; ``B_new`` is ``B``
    itself when not projected. cosine is NaN when W = 0 or V = 0 (then never projected).
    """
    out = _project(A, B, V, scale, tau)
    return out.B_new, out.cosine, out.projected


# ----------------------------------------------------------------------------- reading inputs


def read_adapter(adapter_dir: str | Path) -> tuple[dict, dict[str, torch.Tensor], dict | None]:
    """(adapter_config, tensors in file order, safetensors metadata) of a PEFT LoRA adapter dir."""
    adapter_dir = Path(adapter_dir)
    if not adapter_dir.is_dir():
        raise SafeLoRAError(f"adapter directory '{adapter_dir}' does not exist")
    config_path, weights_path = adapter_dir / ADAPTER_CONFIG, adapter_dir / ADAPTER_WEIGHTS
    for path in (config_path, weights_path):
        if not path.is_file():
            raise SafeLoRAError(f"'{path}' is missing: expected a PEFT LoRA adapter saved with "
                                "save_pretrained(..., safe_serialization=True)")
    config = read_json(config_path)
    _check_adapter_config(config, config_path)
    with safe_open(weights_path, framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        metadata = f.metadata()
    return config, tensors, metadata


def _check_adapter_config(config: dict, path: Path) -> None:
    if config.get("peft_type") != "LORA":
        raise SafeLoRAError(f"{path}: peft_type is {config.get('peft_type')!r}; SafeLoRA needs 'LORA'")
    for key in ("r", "lora_alpha"):
        if not isinstance(config.get(key), (int, float)) or config[key] <= 0:
            raise SafeLoRAError(f"{path}: field '{key}' must be a positive number")
    for key, why in (("use_dora", "DoRA rescales the merged weight"),
                     ("fan_in_fan_out", "Conv1D weights are stored transposed"),
                     ("target_parameters", "LoRA on raw parameters has a different key layout")):
        if config.get(key):
            raise SafeLoRAError(f"{path}: field '{key}' is set; not supported ({why})")


def lora_scale(config: dict, module_key: str, r: int) -> float:
    """PEFT's scale for ``module_key`` (e.g. 'model.layers.0.self_attn.q_proj'), with
    rank_pattern / alpha_pattern resolved as PEFT does; ``r`` is the tensors' rank (checked)."""
    from peft.utils.other import get_pattern_key

    rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    r_cfg = rank_pattern.get(get_pattern_key(rank_pattern.keys(), module_key), config["r"])
    alpha = alpha_pattern.get(get_pattern_key(alpha_pattern.keys(), module_key), config["lora_alpha"])
    if r_cfg != r:
        raise SafeLoRAError(f"layer '{module_key}': tensors have rank {r} but adapter_config.json "
                            f"gives r={r_cfg} (r / rank_pattern)")
    return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


def group_lora_keys(keys: list[str]) -> tuple[dict[str, tuple[str, str]], list[str]]:
    """Pair adapter keys per layer: ``{module_key: (lora_A key, lora_B key)}`` plus the keys copied
    unchanged (LoRA biases, modules_to_save, ...). module_key drops PEFT's 'base_model.model.'.
    A key seen twice, a half pair or an unsupported LoRA variant is an error."""
    halves: dict[str, dict[str, str]] = {}
    passthrough, seen = [], set()
    for key in keys:
        if key in seen:
            raise SafeLoRAError(f"adapter tensor '{key}' appears twice")
        seen.add(key)
        if any(part in key for part in _UNSUPPORTED_KEYS):
            raise SafeLoRAError(f"adapter tensor '{key}': embedding LoRA / DoRA is not supported")
        match = _LORA_KEY.match(key)
        if match is None or match["param"] == "bias":  # biases are never projected (eq. 1: weights)
            passthrough.append(key)
            continue
        if not match["module"].startswith(PEFT_PREFIX):
            raise SafeLoRAError(f"adapter tensor '{key}' lacks PEFT's '{PEFT_PREFIX}' prefix")
        module = match["module"][len(PEFT_PREFIX):]
        halves.setdefault(module, {})[match["ab"]] = key
    pairs = {}
    for module, half in halves.items():
        if set(half) != {"A", "B"}:
            missing = "lora_B" if "A" in half else "lora_A"
            raise SafeLoRAError(f"layer '{module}' has no {missing}.weight tensor in the adapter")
        pairs[module] = (half["A"], half["B"])
    return pairs, passthrough


def checkpoint_dir(spec: str) -> Path:
    """Local directory holding the *.safetensors of a model spec (hub ids via the HF cache)."""
    path = model_dir(spec)
    if Path(path).is_dir():
        return Path(path)
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(path, allow_patterns=["*.safetensors", "*.json"]))
    except Exception as e:  # noqa: BLE001 - hub errors come in many classes; re-raised with context
        raise SafeLoRAError(f"could not fetch safetensors weights of '{spec}': {e}") from e


class SafetensorsCheckpoint:
    """Lazy read-only view of a (possibly sharded) safetensors checkpoint, one tensor at a time.
    Use as a context manager; never modify a returned tensor in place (safe_open may share it)."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self._stack = ExitStack()
        self._handles: dict[str, Any] = {}
        self.weight_map = self._weight_map()

    def _weight_map(self) -> dict[str, str]:
        index = self.directory / "model.safetensors.index.json"
        if index.is_file():
            weight_map = read_json(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise SafeLoRAError(f"{index}: no 'weight_map' object")
            for shard in sorted(set(weight_map.values())):
                if not (self.directory / shard).is_file():
                    raise SafeLoRAError(f"{index} names shard '{shard}', which does not exist")
            return weight_map
        files = sorted(self.directory.glob("*.safetensors"))
        if not files:
            raise SafeLoRAError(f"no *.safetensors weights in '{self.directory}'")
        weight_map = {}
        for path in files:
            for key in self._handle(path.name).keys():
                weight_map[key] = path.name
        return weight_map

    def _handle(self, shard: str):
        if shard not in self._handles:
            self._handles[shard] = self._stack.enter_context(
                safe_open(self.directory / shard, framework="pt"))
        return self._handles[shard]

    def _shard(self, name: str) -> str:
        if name not in self.weight_map:
            close = get_close_matches(name, list(self.weight_map), n=3)
            raise SafeLoRAError(f"tensor '{name}' not found in checkpoint '{self.directory}'"
                                + (f" (close names: {close})" if close else ""))
        return self.weight_map[name]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handle(self._shard(name)).get_slice(name).get_shape())

    def get(self, name: str) -> torch.Tensor:
        return self._handle(self._shard(name)).get_tensor(name)

    def __enter__(self) -> SafetensorsCheckpoint:
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()


def _checked_shape(ckpt: SafetensorsCheckpoint, name: str, shape: tuple[int, int], role: str):
    got = ckpt.shape(name)
    if got != shape:
        raise SafeLoRAError(f"shape mismatch for tensor '{name}': {role} checkpoint "
                            f"'{ckpt.directory}' has {got}, the LoRA layer needs {shape} (d_out, d_in)")


class _ModelPairAlignment:
    """V = theta_aligned - theta_unaligned from two checkpoints (paper: instruct - base)."""

    def __init__(self, aligned: str, unaligned: str):
        self.specs = (aligned, unaligned)
        self.aligned = SafetensorsCheckpoint(checkpoint_dir(aligned))
        self.unaligned = SafetensorsCheckpoint(checkpoint_dir(unaligned))

    def delta(self, weight_name: str, shape: tuple[int, int]) -> torch.Tensor:
        _checked_shape(self.aligned, weight_name, shape, "aligned")
        _checked_shape(self.unaligned, weight_name, shape, "unaligned")
        V = self.aligned.get(weight_name).to(torch.float32, copy=True)
        V.sub_(self.unaligned.get(weight_name))
        return V

    def describe(self) -> dict:
        return {"kind": "model_pair", "formula": "V = W_aligned - W_unaligned (eq. 1, weights only)",
                "aligned": self.specs[0], "aligned_dir": str(self.aligned.directory),
                "unaligned": self.specs[1], "unaligned_dir": str(self.unaligned.directory)}

    def close(self) -> None:
        self.aligned.__exit__()
        self.unaligned.__exit__()


class _AdapterAlignment:
    """V = W_aligned - (W_aligned + s_m B_m A_m) = -s_m B_m A_m, from a misaligned adapter trained
    on the aligned model; V stays low-rank. Layers the adapter does not touch have V = 0."""

    def __init__(self, aligned: str, adapter_dir: str):
        self.specs = (aligned, adapter_dir)
        self.aligned = SafetensorsCheckpoint(checkpoint_dir(aligned))
        self.config, self.tensors, _ = read_adapter(adapter_dir)
        self.pairs, _ = group_lora_keys(list(self.tensors))

    def delta(self, weight_name: str, shape: tuple[int, int]) -> LowRankDelta | None:
        _checked_shape(self.aligned, weight_name, shape, "aligned")
        module = weight_name.removesuffix(".weight")
        if module not in self.pairs:
            return None
        a_key, b_key = self.pairs[module]
        A_m, B_m = self.tensors[a_key].to(torch.float32), self.tensors[b_key].to(torch.float32)
        r_m = A_m.shape[0]
        if A_m.shape != (r_m, shape[1]) or B_m.shape != (shape[0], r_m):
            raise SafeLoRAError(f"shape mismatch in misaligned adapter '{self.specs[1]}': "
                                f"'{a_key}' {tuple(A_m.shape)}, '{b_key}' {tuple(B_m.shape)}; "
                                f"layer is {shape} (d_out, d_in)")
        return LowRankDelta(B_m, A_m, -lora_scale(self.config, module, r_m))

    def describe(self) -> dict:
        return {"kind": "misaligned_adapter",
                "formula": "V = W_aligned - (W_aligned + s_m B_m A_m) = -s_m B_m A_m (low-rank)",
                "aligned": self.specs[0], "aligned_dir": str(self.aligned.directory),
                "unaligned_adapter": str(self.specs[1]),
                "adapter_r": self.config["r"], "adapter_lora_alpha": self.config["lora_alpha"],
                "adapter_use_rslora": bool(self.config.get("use_rslora"))}

    def close(self) -> None:
        self.aligned.__exit__()


def _open_alignment(aligned: str, unaligned: str) -> _ModelPairAlignment | _AdapterAlignment:
    if is_adapter_dir(unaligned):
        return _AdapterAlignment(aligned, unaligned)
    return _ModelPairAlignment(aligned, unaligned)


# ----------------------------------------------------------------------------- the report


@dataclass(frozen=True)
class LayerResult:
    """One report row. name: base-model module key; norms are Frobenius norms."""

    name: str
    shape: tuple[int, int]  # (d_out, d_in)
    r: int
    scale: float
    cosine: float  # NaN when undefined (reason zero_delta / zero_alignment)
    projected: bool
    reason: str  # cos<tau | cos>=tau | zero_delta | zero_alignment
    norm_delta: float  # ||scale B A||
    norm_projected: float  # ||C scale B A||
    norm_alignment: float  # ||V||
    norm_B: float
    norm_B_new: float


@dataclass
class SafeLoRAReport:
    tau: float
    adapter_in: str
    adapter_out: str
    alignment: dict
    layers: list[LayerResult] = field(default_factory=list)
    unchanged_tensors: list[str] = field(default_factory=list)

    @property
    def n_projected(self) -> int:
        return sum(layer.projected for layer in self.layers)

    @property
    def share_projected(self) -> float:
        return self.n_projected / len(self.layers) if self.layers else math.nan

    def to_dict(self) -> dict:
        return {"method": "safelora", "tau": self.tau,
                "rule": "project iff cos_F(W, C W) < tau (strict); C = V V^T / ||V||_F^2",
                "adapter_in": self.adapter_in, "adapter_out": self.adapter_out,
                "alignment": self.alignment, "n_layers": len(self.layers),
                "n_projected": self.n_projected, "share_projected": self.share_projected,
                "layers": [asdict(layer) for layer in self.layers],
                "unchanged_tensors": self.unchanged_tensors, "provenance": provenance()}


# ----------------------------------------------------------------------------- the pipeline


def apply_safelora(adapter_dir: str | Path, out_dir: str | Path, *, aligned: str, unaligned: str,
                   tau: float = 0.3, progress: bool = True) -> SafeLoRAReport:
    """Project a PEFT LoRA adapter with SafeLoRA and write a new adapter directory.

    adapter_dir: trained adapter (adapter_config.json + adapter_model.safetensors).
    out_dir: output adapter dir (must differ from adapter_dir), written atomically, with
        ``safelora_report.json`` beside the weights. aligned / unaligned: see ``SafeLoRAConfig``.
    Only lora_B weights change; every other tensor and file is copied unchanged.
    Raises SafeLoRAError (bad adapter, missing tensor, shape mismatch) or ModelLoadError.
    """
    _check_tau(tau)
    adapter_dir, out_dir = Path(adapter_dir), Path(out_dir)
    check_output_dir(adapter_dir, out_dir)
    config, tensors, metadata = read_adapter(adapter_dir)
    pairs, passthrough = group_lora_keys(list(tensors))
    if not pairs:
        raise SafeLoRAError(f"'{adapter_dir / ADAPTER_WEIGHTS}' holds no lora_A/lora_B weights")
    source = _open_alignment(aligned, unaligned)
    try:
        report = SafeLoRAReport(tau=tau, adapter_in=str(adapter_dir), adapter_out=str(out_dir),
                                alignment=source.describe(), unchanged_tensors=passthrough)
        out_tensors = dict(tensors)
        done: set[str] = set()
        for module, (a_key, b_key) in tqdm(pairs.items(), desc="safelora", unit="layer",
                                           disable=not progress):
            if module in done:  # cannot happen with group_lora_keys; guards against double projection
                raise SafeLoRAError(f"layer '{module}' would be projected twice")
            done.add(module)
            row, out_tensors[b_key] = _project_layer(module, tensors[a_key], tensors[b_key],
                                                     config, source, tau)
            report.layers.append(row)
    finally:
        source.close()
    _write_adapter(adapter_dir, out_dir, out_tensors, metadata, report)
    return report


def _project_layer(module: str, A: torch.Tensor, B: torch.Tensor, config: dict, source,
                   tau: float) -> tuple[LayerResult, torch.Tensor]:
    if A.ndim != 2 or B.ndim != 2 or A.shape[0] != B.shape[1]:
        raise SafeLoRAError(f"layer '{module}': lora_A {tuple(A.shape)} and lora_B "
                            f"{tuple(B.shape)} are not (r, d_in) and (d_out, r)")
    r, shape = A.shape[0], (B.shape[0], A.shape[1])
    scale = lora_scale(config, module, r)
    V = source.delta(module + ".weight", shape)
    if V is None:  # the misaligned adapter does not touch this layer: V = 0, recorded as such
        V = LowRankDelta(torch.zeros(shape[0], 1), torch.zeros(1, shape[1]), 0.0)
    out = _project(A, B, V, scale, tau)
    row = LayerResult(name=module, shape=shape, r=r, scale=scale, cosine=out.cosine,
                      projected=out.projected, reason=out.reason, norm_delta=out.norm_delta,
                      norm_projected=out.norm_projected, norm_alignment=out.norm_alignment,
                      norm_B=math.sqrt(sq_frobenius(B)),
                      norm_B_new=math.sqrt(sq_frobenius(out.B_new)))
    return row, out.B_new.contiguous()


def check_output_dir(adapter_dir: Path, out_dir: Path) -> None:
    """Refuse an output folder that would replace the input adapter, a folder holding it,
    or a folder emguard did not write as a SafeLoRA adapter (it is replaced as a whole)."""
    _check_apart(adapter_dir, out_dir)
    try:
        check_claim(out_dir, SAFELORA, OUT_WHAT)
    except FolderConflictError as e:
        raise SafeLoRAError(str(e)) from None


OUT_WHAT = "the projected adapter (--out)"  # what --out is for, in a refusal


def _check_apart(adapter_dir: Path, out_dir: Path) -> None:
    """Refuse an output folder that is the input adapter or holds it."""
    adapter, out = adapter_dir.resolve(), out_dir.resolve()
    if out == adapter:
        raise SafeLoRAError(f"--out must differ from the input adapter '{adapter_dir}'")
    if out in adapter.parents:
        raise SafeLoRAError(f"--out '{out_dir}' holds the input adapter '{adapter_dir}' and would "
                            "be replaced by the output; choose a new folder, e.g. "
                            f"'{adapter_dir.parent / 'adapter_safelora'}'")


def _write_adapter(adapter_dir: Path, out_dir: Path, tensors: dict[str, torch.Tensor],
                   metadata: dict | None, report: SafeLoRAReport) -> None:
    with claim(out_dir, SAFELORA, what=OUT_WHAT, wait=60,
               marker={"adapter_in": str(adapter_dir), "tau": report.tau}) as claimed:
        _check_apart(adapter_dir, out_dir)  # again, under the lock: it may have changed
        tmp = claimed.path  # replaces out_dir when the block ends
        for path in sorted(adapter_dir.iterdir()):
            if path.is_file() and path.name not in (ADAPTER_WEIGHTS, REPORT_NAME, SAFELORA.marker):
                shutil.copy2(path, tmp / path.name)
        save_file(tensors, str(tmp / ADAPTER_WEIGHTS), metadata=metadata)
        write_json_atomic(tmp / REPORT_NAME, report.to_dict())


class SafeLoRASettings(Settings):
    """Post-hoc projection of the trained adapter (paper eqs. 1-3)."""

    tau: float = Field(0.3, ge=0, le=1)
    aligned: str | None = None  # model spec; default: the run's base model
    unaligned: str  # model spec (base model) or adapter directory (instruct + misaligned adapter)


class SafeLoRA(Defense):
    """Post-training step: project the trained adapter into ``adapter_safelora/``."""

    settings_model = SafeLoRASettings

    name = "safelora"
    artifacts = ("adapter_safelora",)
    identity_when_off = True

    def check(self, cfg) -> None:
        """Resolve the aligned/unaligned sources now, not after hours of training."""
        s = self.settings
        for field_name, spec in (("aligned", s.aligned or cfg.model), ("unaligned", s.unaligned)):
            if is_adapter_dir(spec):
                continue  # an adapter directory (instruct + misaligned adapter)
            try:
                resolve_model_source(spec)
            except ModelLoadError as e:
                raise ConfigError(f"defenses.safelora.{field_name}: {e}") from None

    def after_training(self, ctx: RunContext) -> dict:
        s, run_dir = self.settings, ctx.run_dir
        report = apply_safelora(run_dir / "adapter", run_dir / "adapter_safelora",
                                aligned=s.aligned or ctx.cfg.model, unaligned=s.unaligned, tau=s.tau)
        return {"adapter": "adapter_safelora", "tau": s.tau,
                "share_projected": getattr(report, "share_projected", None)}
