"""A run's identity: the fields that decide what it trains, and the SHA-256 a study names
its folder by (``s{seed}-{sha[:8]}``).

Equal identities train the same adapter, so a study skips a run whose folder already holds
it. What a run is evaluated with (``eval``), where it is written (``output_dir``) and where
its numbers are shown (``train.report_to`` and the other tracking keys) play no part. Each
rule below that drops a field keeps the names of folders recorded before the field existed
(the pinned hashes in tests/test_defenses.py hold them).
"""

from __future__ import annotations

import hashlib
import json

from emguard.config import RunConfig
from emguard.defenses.registry import DEFENSES

TRACKING_KEYS = ("report_to", "run_name", "run_group", "run_tags")


def training_identity(cfg: RunConfig) -> dict:
    """The fields that decide what a run trains (everything but ``eval`` and where it is
    written): equal identities train the same adapter."""
    identity = cfg.model_dump(mode="json", exclude={"eval", "output_dir"})
    for name, defense in DEFENSES.items():  # later defenses count only when on
        if not defense.identity_when_off and identity["defenses"].get(name) is None:
            identity["defenses"].pop(name, None)  # absent: registered after cfg was built
    if not identity["train"]["trajectory_steps"]:  # added later: runs keep their names
        del identity["train"]["trajectory_steps"]
    for key in TRACKING_KEYS:  # where numbers are shown, not what is trained
        del identity["train"][key]
    return identity


def config_sha256(cfg: RunConfig, untrained: bool = False) -> str:
    """SHA-256 of the training identity (canonical JSON), the name a study gives a run.
    ``untrained``: the untrained baseline of that config, which is not the trained run
    (trained runs' hashes are as they always were)."""
    identity = training_identity(cfg)
    if untrained:
        identity = {"untrained": True, **identity}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()
