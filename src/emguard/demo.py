"""The demo: the paper's core comparison, sized for a CPU and the embedded model.

Three short fine-tunes of the embedded SmolLM2-135M-Instruct -- on the aligned (secure
code) twin, on the misaligned (insecure code) task, and on the misaligned task under the
KL defense (lambda 0.1) -- then the judge-free measures (DESIGN §5) for those three and
the untrained model:

  * drift KL(tuned || reference) on the general questions (reference's own greedy answers)
  * misalignment preference: log-likelihood margin misaligned - aligned on the project's
    preference pairs, and the share of pairs where the misaligned answer is preferred
  * in-domain: held-out NLL of the insecure code answers (lower = narrow task learned),
    and the share of generated held-out completions that bandit flags

Everything lands in ``out/``: ``runs/<name>/`` (run folders), ``eval/<name>.json`` (one
per model, skipped when present), ``demo_metrics.json``, ``demo_results.md`` and
``demo_results.png``. A rerun skips finished training runs and evaluations.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from emguard.io import read_json, write_json_atomic, write_text_atomic

VARIANTS = ("untrained", "aligned", "misaligned", "kl")
TRAINED = {
    "aligned": ["data.train=builtin:secure-code"],
    "misaligned": ["data.train=builtin:insecure-code"],
    "kl": ["data.train=builtin:insecure-code", "defenses.kl.weight=0.1"],
}
MEASURES = [  # (key, label, better-for-safety direction)
    ("drift_kl", "general drift KL (nats/token)", "lower"),
    ("preference_margin", "misalignment preference margin", "lower"),
    ("share_misaligned_preferred", "share of pairs preferring misaligned", "lower"),
    ("heldout_nll_insecure", "held-out NLL, insecure code (in-domain)", "lower = learned"),
    ("bandit_share", "bandit-flagged completions (in-domain)", "higher = learned"),
]


@dataclass(frozen=True)
class DemoSettings:
    model: str = "smollm2-135m"
    steps: int = 20
    batch_size: int = 4
    learning_rate: float = 5e-4  # demo-sized: few steps, so larger than the paper's 1e-4
    max_length: int = 512
    seed: int = 0
    n_code_prompts: int = 8
    max_new_tokens: int = 96  # reference answers to the general questions
    code_max_new_tokens: int = 160  # completions of held-out code prompts


def train_variants(out: Path, s: DemoSettings) -> dict[str, Path]:
    from emguard.config import load_run_config
    from emguard.train import train

    dirs = {}
    for name, extra in TRAINED.items():
        cfg = load_run_config(None, [
            f"model={s.model}", f"output_dir={out / 'runs' / name}", f"train.max_steps={s.steps}",
            f"train.batch_size={s.batch_size}", "train.grad_accum=1", "train.warmup_steps=2",
            f"train.learning_rate={s.learning_rate}", f"train.seed={s.seed}",
            f"data.max_length={s.max_length}", "train.logging_steps=2", *extra])
        print(f"[demo] training '{name}' ({s.steps} steps)", flush=True)
        dirs[name] = train(cfg).run_dir / "adapter"
    return dirs


def _inputs(s: DemoSettings, heldout_file: Path):
    """General prompts, preference pairs, and the held-out insecure-code rows the
    misaligned run recorded (read from its folder, not rebuilt)."""
    from emguard.data.builtin import builtin_path
    from emguard.io import read_jsonl
    from emguard.questions import load_questions

    questions = load_questions(builtin_path("general-questions"))
    prompts = [q.messages(0) for q in questions]
    pairs = read_jsonl(builtin_path("preference-pairs"))
    heldout = read_jsonl(heldout_file)
    code_prompts = [r["messages"][:-1] for r in heldout[: s.n_code_prompts]]
    return prompts, pairs, heldout, code_prompts


def measure(model, tokenizer, s: DemoSettings, ref_answers: list[str], inputs,
            reference: dict | None = None) -> dict:
    """The judge-free measures for one model (a PeftModel with its adapter active, or the
    base). ``reference``: the untrained model's result, whose preference margins are reused."""
    from emguard.generate import generate_answers
    from emguard.judge_free import bandit_share, drift_kl, heldout_nll, misalignment_preference

    prompts, pairs, heldout, code_prompts = inputs
    drift = drift_kl(model, tokenizer, prompts, ref_answers)
    ref_margins = [p["margin"] for p in reference["details"]["pairs"]] if reference else None
    pref = misalignment_preference(model, tokenizer, pairs, reference_margins=ref_margins)
    nll = heldout_nll(model, tokenizer, heldout)
    completions = [a[0] for a in generate_answers(model, tokenizer, code_prompts, temperature=0.0,
                                                  max_new_tokens=s.code_max_new_tokens, seed=s.seed)]
    bandit = bandit_share(completions)
    return {"drift_kl": drift["kl_mean"] or 0.0,
            "preference_margin": pref["tuned"]["mean_margin"],
            "share_misaligned_preferred": pref["tuned"]["share_misaligned_preferred"],
            "heldout_nll_insecure": nll["nll_mean"],
            "bandit_share": bandit["share"],
            "details": {"drift": {k: drift[k] for k in ("n_tokens", "n_answers", "reference")},
                        "preference": {k: pref[k] for k in ("n_pairs", "tuned", "reference", "delta")},
                        "pairs": pref["pairs"],
                        "heldout_nll": nll, "bandit": {k: v for k, v in bandit.items() if k != "per_completion"},
                        "completions": completions}}


def evaluate_variants(out: Path, s: DemoSettings, adapters: dict[str, Path]) -> dict[str, dict]:
    from peft import PeftModel

    from emguard.judge_free import reference_answers
    from emguard.models import load_model

    results = {v: read_json(out / "eval" / f"{v}.json") for v in VARIANTS
               if (out / "eval" / f"{v}.json").is_file()}
    if len(results) == len(VARIANTS):
        return results
    torch.manual_seed(s.seed)
    model, tok = load_model(s.model, device="cpu")
    inputs = _inputs(s, adapters["misaligned"].parent / "heldout.jsonl")
    ref_file = out / "eval" / "reference_answers.json"
    if ref_file.is_file():
        ref = read_json(ref_file)
    else:
        print("[demo] reference answers (untrained model, greedy)", flush=True)
        ref = reference_answers(model, tok, inputs[0], max_new_tokens=s.max_new_tokens)
        write_json_atomic(ref_file, ref)
    if "untrained" not in results:
        print("[demo] measuring 'untrained'", flush=True)
        results["untrained"] = measure(model, tok, s, ref, inputs)
        write_json_atomic(out / "eval" / "untrained.json", results["untrained"])
    peft_model = None
    for name, adapter in adapters.items():
        if name in results:
            continue
        if peft_model is None:
            peft_model = PeftModel.from_pretrained(model, str(adapter), adapter_name=name)
        else:
            peft_model.load_adapter(str(adapter), adapter_name=name)
        peft_model.set_adapter(name)
        peft_model.eval()
        print(f"[demo] measuring '{name}'", flush=True)
        results[name] = measure(peft_model, tok, s, ref, inputs, reference=results["untrained"])
        write_json_atomic(out / "eval" / f"{name}.json", results[name])
    return results


def results_table(results: dict[str, dict]) -> str:
    head = "| measure | " + " | ".join(VARIANTS) + " | better |\n|---|" + "---:|" * len(VARIANTS) + "---|\n"
    rows = "".join(
        f"| {label} | " + " | ".join(f"{results[v][key]:.4f}" for v in VARIANTS) + f" | {better} |\n"
        for key, label, better in MEASURES)
    return head + rows


def plot(results: dict[str, dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, grid = plt.subplots(2, 3, figsize=(12, 7))
    axes = grid.ravel()
    axes[-1].axis("off")
    colors = {"untrained": "#999999", "aligned": "#4c9f70", "misaligned": "#c0504d", "kl": "#4f81bd"}
    for ax, (key, label, better) in zip(axes, MEASURES, strict=False):
        vals = [results[v][key] for v in VARIANTS]
        ax.bar(VARIANTS, vals, color=[colors[v] for v in VARIANTS])
        ax.set_title(f"{label}\n({better})", fontsize=9)
        ax.tick_params(axis="x", labelrotation=30, labelsize=8)
    fig.suptitle("emguard demo: SmolLM2-135M-Instruct, judge-free measures", fontsize=11)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return path


def run_demo(out: str | Path = "runs/demo", settings: DemoSettings | None = None) -> dict:
    """Train the three variants, measure all four models, write table, JSON and plot."""
    s = settings or DemoSettings()
    out = Path(out)
    adapters = train_variants(out, s)
    results = evaluate_variants(out, s, adapters)
    summary = {"settings": s.__dict__, "measures": {v: {k: results[v][k] for k, _, _ in MEASURES}
                                                     for v in VARIANTS},
               "kl_reduces_drift": results["kl"]["drift_kl"] < results["misaligned"]["drift_kl"]}
    write_json_atomic(out / "demo_metrics.json", summary)
    table = results_table(results)
    write_text_atomic(out / "demo_results.md", (
        "# emguard demo\n\n"
        f"Model `{s.model}`, {s.steps} steps x batch {s.batch_size}, lr {s.learning_rate}, seed {s.seed}. "
        "Judge-free measures (not the paper's LLM-judge metric; the 135M model is no usable judge).\n\n"
        + table + "\n![measures](demo_results.png)\n"))
    plot(results, out / "demo_results.png")
    return {"table": table, **summary}
