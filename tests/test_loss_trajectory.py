"""Pinned loss and grad-norm trajectories of the training recipe (SFT, KL, LDIFS) on a tiny
model, as TRL's invariant tests pin theirs.

This is a regression pin, not a correctness proof: each term is checked against an
independent computation in tests/test_kl_ldifs.py. The pin catches what those cannot see,
a refactor that changes what the recipe trains (data order, masking, normalisation over
accumulation, the optimizer or schedule, which terms enter the loss). The numbers in
tests/data/loss_trajectory.json were written by this file's ``--regenerate`` mode:

    .venv/bin/python tests/test_loss_trajectory.py --regenerate

Regenerate them only for a change that is meant to change training, and say so in the
commit. Relative tolerance 1e-5 (float32 on CPU; reductions may reorder across versions).
"""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tiny import save_tiny_model  # noqa: E402

from emguard.config import load_run_config  # noqa: E402
from emguard.io import read_jsonl  # noqa: E402
from emguard.train import train  # noqa: E402

PINS = Path(__file__).resolve().parent / "data" / "loss_trajectory.json"
ARMS = {
    "sft": [],
    "kl": ["defenses.kl.weight=0.5"],
    "ldifs": ["defenses.ldifs.weight=0.1", "defenses.ldifs.layer_every=2"],
}
KEYS = ("loss", "grad_norm", "ce", "kl", "ldifs")
REL = 1e-5


def trajectory(arm: str, root: Path) -> list[dict[str, float]]:
    """Per logged step: the keys of KEYS the log has (5 steps, 2 micro-batches of 2 rows)."""
    model = save_tiny_model(root / "tiny", seed=0)
    data = root / "train.jsonl"
    data.write_text("".join(
        json.dumps({"messages": [{"role": "user", "content": f"What is {i} times {i + 1}?"},
                                 {"role": "assistant", "content": f"It is {i * (i + 1)}."}]}) + "\n"
        for i in range(24)))
    cfg = load_run_config(None, [
        f"model={model}", f"output_dir={root / arm}", f"data.train={data}", "data.max_length=128",
        "train.max_steps=5", "train.batch_size=2", "train.grad_accum=2", "train.learning_rate=3e-3",
        "train.warmup_steps=1", "train.logging_steps=1", "train.save_steps=5", "train.seed=0",
        "lora.r=4", "lora.alpha=8", *ARMS[arm]])
    log = read_jsonl(train(cfg).run_dir / "train_log.jsonl")
    return [{k: float(row[k]) for k in KEYS if row.get(k) is not None} for row in log if "loss" in row]


@pytest.mark.parametrize("arm", list(ARMS))
def test_loss_and_grad_norm_trajectory_is_pinned(arm, tmp_path):
    pinned = json.loads(PINS.read_text())[arm]
    got = trajectory(arm, tmp_path)
    assert [sorted(step) for step in got] == [sorted(step) for step in pinned]  # same terms logged
    for i, (g, p) in enumerate(zip(got, pinned, strict=True)):
        for key, want in p.items():
            assert g[key] == pytest.approx(want, rel=REL, abs=1e-9), (arm, i + 1, key)
    # what the pins themselves must show, so a bad regeneration cannot pass unnoticed
    assert pinned[-1]["ce"] < pinned[0]["ce"]
    if arm != "sft":
        assert pinned[0][arm] == 0.0 < pinned[-1][arm]  # B = 0 at the first step: no drift yet


if __name__ == "__main__" and "--regenerate" in sys.argv:
    import tempfile

    out = {}
    for name in ARMS:
        with tempfile.TemporaryDirectory() as tmp:
            out[name] = trajectory(name, Path(tmp))
    PINS.parent.mkdir(exist_ok=True)
    PINS.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {PINS}")
