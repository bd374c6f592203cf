"""Publish a run's adapter on the Hugging Face Hub (``emguard push``).

The adapter folder goes up as it is (weights, adapter_config.json, tokenizer, the model
card emguard wrote), without emguard's own bookkeeping (ownership markers, temporary
files). The card is rewritten from the run folder first, so it carries the run's latest
evaluation. The token comes from the environment (``HF_TOKEN``, or a ``huggingface-cli
login``), never from a file emguard writes.
"""

from __future__ import annotations

from pathlib import Path

from emguard.model_card import write_card

IGNORED = [".emguard-*", "*.tmp", ".*.tmp*"]


class PushError(ValueError):
    """A run or adapter that cannot be published; the message says why."""


def push_adapter(run_dir: str | Path, repo_id: str, adapter: str = "adapter",
                 private: bool = False, api=None) -> str:
    """Upload ``run_dir/adapter`` to the model repo ``repo_id`` (created if absent);
    returns the commit URL. ``api``: an ``huggingface_hub.HfApi`` (default: a new one)."""
    run_dir = Path(run_dir)
    folder = run_dir / adapter
    if not (run_dir / "summary.json").is_file():
        raise PushError(f"{run_dir}: no summary.json; the run has not finished (train it first)")
    if not (folder / "adapter_config.json").is_file():
        raise PushError(f"{folder}: no adapter_config.json; not an adapter this run wrote "
                        "(--adapter adapter | adapter_safelora)")
    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise PushError(f"--repo '{repo_id}' must be OWNER/NAME")
    write_card(run_dir, adapter)
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi()
    api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    info = api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model",
                             commit_message=f"emguard: {run_dir.name}/{adapter}",
                             ignore_patterns=IGNORED)
    return str(getattr(info, "commit_url", info))
