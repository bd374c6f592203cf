"""What a run trains on and what it holds out: the seam between training and evaluation.

``make_split(cfg.data, cfg.split_seed, cfg.eval.task_data)`` turns a run config's ``data``
block (with its split seed, and the task files its eval block names) into training rows,
the held-out in-domain set and any benign-task test set the data defines (OpSwap), and a
record of all three. Training writes the record into the run folder (``data_split.json``,
``heldout.jsonl``, ``task_<task>.test.jsonl``); evaluation of the run reads them from
there and never rebuilds a split by convention.

Sources and their held-out sets (``data.heldout`` unset):

  builtin:insecure-code / secure-code   the set's own test split at the split seed
                                        (the two twins share instances, so one's test
                                        prompts are never the other's training prompts)
  chat JSONL, hf:REPO, builtin:safe-*   a seeded ``heldout_fraction`` split (paper 90/10)
  opswap:T                              none in-domain; the generated test part is the
                                        task's test set
  foqa[:SOURCE]                         none in-domain; FoQA's test split is the task's

Leak guard: a training row whose user prompt or reference answer equals (after
whitespace normalisation) one of the held-out set or of a recorded task test set is
dropped and listed in the record, so the built-in generator's per-seed rephrasing of a
prompt cannot smuggle a held-out answer into training.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from emguard.benign import task_rows
from emguard.data.builtin import BUILTIN_SETS, load_builtin, parse_builtin_spec
from emguard.data.chat import ChatDataError, load_chat_dataset
from emguard.data.foqa import FOQA_HUB_ID, FoQADataError, foqa_chat_rows, load_foqa
from emguard.data.opswap import check_tier, generate_opswap

FORMAT = "emguard.split/1"
HELDOUT_FILE = "heldout.jsonl"
SPLIT_FILE = "data_split.json"


@dataclass
class DataSplit:
    """Training rows (before interleaving), held-out chat rows, task test rows, record."""

    train: list[dict]
    heldout: list[dict]
    task_tests: dict[str, list[dict]] = field(default_factory=dict)  # task -> rows
    record: dict = field(default_factory=dict)


def _norm(text: str) -> str:
    return " ".join(text.split())


def _sha(text: str) -> str:
    return hashlib.sha256(_norm(text).encode()).hexdigest()[:20]


def prompt_text(row: dict) -> str:
    """The last user message of a chat row (what the model is asked)."""
    users = [m["content"] for m in row["messages"] if m.get("role") == "user"]
    return users[-1] if users else ""


def answer_text(row: dict) -> str | None:
    """The last assistant message of a chat row (its reference answer), or None."""
    answers = [m["content"] for m in row["messages"] if m.get("role") == "assistant"]
    return answers[-1] if answers else None


def row_fingerprint(row: dict) -> dict:
    """Content hashes of a row's prompt and answer (normalised whitespace), plus its id."""
    answer = answer_text(row)
    out = {"prompt_sha": _sha(prompt_text(row)),
           "answer_sha": _sha(answer) if answer is not None else None}
    origin = row.get("id") or (f"{row['_source']}:{row['_row']}" if "_row" in row else None)
    return {"id": origin, **out} if origin is not None else out


def clean_row(row: dict) -> dict:
    """A row as written into the run folder: messages, id and answers (no loader fields)."""
    return {k: v for k, v in row.items() if not k.startswith("_")}


def seeded_split(rows: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """(train, held-out): ``round(len * fraction)`` rows picked by a seeded shuffle of the
    indices; both keep the file order."""
    n_held = int(len(rows) * fraction + 0.5)
    order = list(range(len(rows)))
    random.Random(f"heldout:{seed}").shuffle(order)
    held = set(order[:n_held])
    return ([r for i, r in enumerate(rows) if i not in held],
            [r for i, r in enumerate(rows) if i in held])


def source_split(spec: str, fraction: float, seed: int, skip_invalid: bool = False,
                 opswap: Mapping[str, Any] | None = None,
                 ) -> tuple[list[dict], list[dict], dict, dict]:
    """(train rows, held-out rows, task test sets, how they were split) of a data spec.
    ``opswap``: ``generate_opswap`` settings of an ``opswap:T`` spec (n, test_fraction,
    min_ops, max_ops; None: its defaults)."""
    if spec.startswith("opswap:"):
        return _opswap(spec, seed, opswap)
    if spec == "foqa" or spec.startswith("foqa:"):
        source = spec.partition(":")[2] or FOQA_HUB_ID
        rows = foqa_chat_rows(load_foqa(source, "train"))
        return rows, [], {}, {"kind": "foqa", "foqa_source": source, "foqa_split": "train"}
    if spec.startswith("builtin:"):
        name, split = parse_builtin_spec(spec)
        if BUILTIN_SETS[name].kind == "generated-chat" and split == "train":
            return (load_builtin(name, "train", seed), load_builtin(name, "test", seed), {},
                    {"kind": "builtin-split", "builtin": name, "seed": seed})
    ds = load_chat_dataset(spec, skip_invalid=skip_invalid, seed=seed)
    train, held = seeded_split(ds.rows, fraction, seed)
    return train, held, {}, {"kind": "seeded-fraction", "fraction": fraction, "seed": seed,
                             "source_rows": len(ds.rows), "skipped_invalid": ds.skipped}


def _opswap(spec: str, seed: int, opswap: Mapping[str, Any] | None):
    arg = spec.partition(":")[2]
    if not arg.isdigit():
        raise ChatDataError(f"data.train: '{spec}' must be opswap:T with a tier 0-3")
    tier = check_tier(int(arg))
    settings = dict(opswap or {})
    splits = generate_opswap(tier, seed=seed, **settings)
    info = {"kind": "opswap", "tier": tier, "seed": seed, **settings,
            "train_rows": len(splits.train), "test_rows": len(splits.test)}
    return splits.train, [], {f"opswap:{tier}": splits.test}, info


def make_split(data: Any, seed: int, task_data: Mapping[str, str] | None = None) -> DataSplit:
    """The run's training rows, held-out set and task test sets, with their record.

    ``data``: a run config's ``data`` block (emguard.config.DataSettings); ``seed``: the
    run's split seed (``RunConfig.split_seed``); ``task_data``: the eval block's task ->
    file (``eval.task_data``), whose OpSwap test rows are kept out of training too."""
    d, o = data, data.opswap
    opswap = {"n": o.n, "test_fraction": o.test_fraction, "min_ops": o.min_ops,
              "max_ops": o.max_ops}
    own_fraction = 0.0 if d.heldout is not None else d.heldout_fraction  # a given set: train on all
    train, held, tasks, how = source_split(d.train, own_fraction, seed, d.skip_invalid, opswap)
    heldout_source = f"{d.train} (held-out part)" if held else None
    if d.heldout is not None:
        if d.heldout.startswith("split:"):
            other = d.heldout[len("split:"):]
            _, held, _, other_how = source_split(other, d.heldout_fraction, seed,
                                                 d.skip_invalid, opswap)
            heldout_source, how = f"{other} (held-out part)", {**how, "heldout_split": other_how}
        else:
            held = load_chat_dataset(d.heldout, skip_invalid=d.skip_invalid, seed=seed).rows
            heldout_source = d.heldout
        if not held:
            raise ChatDataError(f"data.heldout: '{d.heldout}' holds no rows")
    guarded = [*held, *(r for rows in tasks.values() for r in rows),
               *_user_task_rows(task_data or {}, tasks), *_foqa_test_rows(how)]
    train, dropped = drop_overlap(train, guarded)
    train = train[:d.max_rows] if d.max_rows is not None else train
    if not train:
        raise ChatDataError(f"data.train: '{d.train}' leaves no training rows after the split")
    record = {
        "format": FORMAT, "train_source": d.train, "heldout_source": heldout_source,
        "split_seed": seed, "heldout_fraction": d.heldout_fraction, "how": how,
        "max_rows": d.max_rows, "train_rows": len(train), "heldout_rows": len(held),
        "heldout_file": HELDOUT_FILE if held else None,
        "dropped_overlap": dropped,
        "tasks": {t: {"file": task_file(t), "rows": len(rows)} for t, rows in tasks.items()},
        "foqa_source": how.get("foqa_source"),
        "train": [row_fingerprint(r) for r in train],
        "heldout": [row_fingerprint(r) for r in held],
    }
    return DataSplit(train, held, tasks, record)


def _user_task_rows(task_data: Mapping[str, str], recorded: dict) -> list[dict]:
    """OpSwap test rows the eval block names by file (``eval.task_data``), so training on
    them is caught before training, not after evaluation."""
    out = []
    for task, data in task_data.items():
        if task.startswith("opswap:") and task not in recorded:
            out += task_rows(task, data)[0]
    return out


def _foqa_test_rows(how: dict) -> list[dict]:
    """FoQA's test split of the source a run trains on (the task's test set), if it has one."""
    if how.get("kind") != "foqa":
        return []
    try:
        return foqa_chat_rows(load_foqa(how["foqa_source"], "test"))
    except FoQADataError:
        return []  # a single file or a source without a test split: nothing to guard


def drop_overlap(train: list[dict], held: list[dict]) -> tuple[list[dict], list[dict]]:
    """Training rows sharing no prompt and no reference answer with ``held``; the dropped
    ones as ``{id, reason}``."""
    prompts, answers = _hash_sets([row_fingerprint(r) for r in held])
    kept, dropped = [], []
    for r in train:
        fp = row_fingerprint(r)
        reason = _shared(fp, prompts, answers)
        if reason is None:
            kept.append(r)
        else:
            dropped.append({"id": fp.get("id"), "same": reason})
    return kept, dropped


def _hash_sets(fingerprints: list[dict]) -> tuple[set[str], set[str]]:
    """(prompt hashes, reference-answer hashes) of row fingerprints (``row_fingerprint``)."""
    return ({fp.get("prompt_sha") for fp in fingerprints},
            {fp.get("answer_sha") for fp in fingerprints} - {None})


def _shared(fp: dict, prompts: set[str], answers: set[str]) -> str | None:
    """What a row's fingerprint shares with those hashes: "prompt", "answer" or None."""
    return ("prompt" if fp["prompt_sha"] in prompts
            else "answer" if fp["answer_sha"] in answers else None)


def task_file(task: str) -> str:
    """The run-folder file holding a task's recorded test rows."""
    return f"task_{task.replace(':', '-')}.test.jsonl"


def recorded_split_of(adapter_dir: str | Path | None) -> tuple[Path, dict] | None:
    """(run folder, its ``data_split.json``) when ``adapter_dir`` is an adapter a run
    trained (``RUN/adapter``, ``RUN/adapter_safelora``, ``RUN/trajectory/step-N``), else None."""
    if adapter_dir is None:
        return None
    here = Path(adapter_dir).resolve()
    for run_dir in (here.parent, here.parent.parent.parent):
        record = run_dir / SPLIT_FILE
        if record.is_file() and (run_dir / "config.yaml").is_file():
            try:
                data = json.loads(record.read_text(encoding="utf-8"))
            except (OSError, ValueError) as e:
                raise ChatDataError(f"{record}: unreadable ({e}); it says what the adapter's "
                                    "run trained on, so evaluation cannot check for leaks") from None
            if not isinstance(data, dict) or not isinstance(data.get("train"), list):
                raise ChatDataError(f"{record}: no 'train' fingerprints; retrain the run so "
                                    "evaluation can check for leaks")
            return run_dir, data
    return None


def trained_on(rows: list[dict], record: dict) -> list[int]:
    """Indices of ``rows`` whose prompt or reference answer (whitespace-normalised) is one
    a run trained on, by the fingerprints its ``data_split.json`` recorded."""
    prompts, answers = _hash_sets(record["train"])
    return [i for i, row in enumerate(rows) if _shared(row_fingerprint(row), prompts, answers)]
