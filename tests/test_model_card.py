"""Model cards of run adapters (Hub format) and `emguard push` against a recording HfApi
(no network here: the upload itself is untested, as the README says)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from huggingface_hub import ModelCard, ModelCardData

from emguard.config import load_run_config
from emguard.eval_log import EvalLog
from emguard.metrics import compute_metrics
from emguard.model_card import EMBEDDED_HUB_ID, hub_base_model, write_cards
from emguard.train import train


def _train(tiny_dir, data_file, out, *extra):
    return train(load_run_config(None, [
        f"model={tiny_dir}", f"output_dir={out}", f"data.train={data_file}",
        "data.max_length=128", "train.max_steps=2", "train.batch_size=2", "train.grad_accum=1",
        "train.warmup_steps=0", "train.save_steps=2", "lora.r=2", "lora.alpha=4", *extra]))


def test_a_trained_adapter_has_a_real_card_not_peft_s_template(tiny_dir, data_file, tmp_path):
    _train(tiny_dir, data_file, tmp_path / "run", "defenses.kl.weight=0.1")
    path = tmp_path / "run" / "adapter" / "README.md"
    text = path.read_text()
    assert "More Information Needed" not in text  # PEFT's template had 39 of these
    assert str(tiny_dir) not in text  # no local path (it would name a home folder)
    card = ModelCard.load(path)
    assert card.data.library_name == "peft"
    assert {"emergent-misalignment", "defense-kl"} <= set(card.data.tags)
    assert card.data.base_model is None  # a local folder names nothing on the Hub
    ModelCardData(**card.data.to_dict())  # the front matter is valid card metadata
    assert "Not evaluated yet" in text and "2 optimizer steps" in text


def test_hub_base_model_names_only_what_the_hub_has(tmp_path, monkeypatch):
    assert hub_base_model("smollm2-135m") == EMBEDDED_HUB_ID
    assert hub_base_model("Qwen/Qwen2.5-7B-Instruct") == "Qwen/Qwen2.5-7B-Instruct"
    assert hub_base_model("/home/me/models/x") is None
    assert hub_base_model("model.gguf") is None
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org" / "name").mkdir(parents=True)
    assert hub_base_model("org/name") is None  # a local folder of that name


def test_card_of_an_evaluated_embedded_run(tmp_path):
    """A run folder written by hand: the card's base model and adapter_config point at the
    Hub, its numbers are the run's, and no credential reaches it."""
    run = tmp_path / "run"
    (run / "adapter").mkdir(parents=True)
    secret = "http://u:SENTINEL-77@h/v1"
    (run / "config.yaml").write_text(yaml.safe_dump({
        "model": "smollm2-135m", "data": {"train": "hf:someone/insecure", "heldout": None},
        "defenses": {"kl": {"weight": 1.0}, "ldifs": None}, "eval": {"judge": f"openai:m@{secret}"},
        "train": {"learning_rate": 5e-4, "note": secret}}))
    (run / "summary.json").write_text(json.dumps({"steps": 12, "train_rows": 48,
                                                  "first_loss": 1.0, "last_loss": 0.5}))
    (run / "adapter" / "adapter_config.json").write_text(json.dumps(
        {"base_model_name_or_path": "/root/.cache/emguard/models/smollm2-abc", "r": 4}))
    for part, data in (("general", {"preference": {"source": "builtin:eval-pairs", "pairs": [
            {"margin": 0.3, "reference_margin": 0.1}, {"margin": -0.1, "reference_margin": 0.0}]}}),
                       ("indomain", {"heldout_nll": {"nll_mean": 0.4567}})):
        (run / "eval" / part).mkdir(parents=True)
        (run / "eval" / part / "judge_free.json").write_text(json.dumps(data))
    # 80 judged answers: 10 misaligned (aligned 10, coherent 90), 2 incoherent (coherent 20)
    judged = ([{"question_id": "q", "aligned": 10, "coherent": 90}] * 10
              + [{"question_id": "q", "aligned": 90, "coherent": 20}] * 2
              + [{"question_id": "q", "aligned": 90, "coherent": 90}] * 68)
    log = EvalLog(spec={}, n_generations=80, judge="openai:m", llm_judge=compute_metrics(judged))
    (run / "eval" / "general" / "metrics.json").write_text(json.dumps(log.to_dict()))
    assert write_cards(run) == [run / "adapter" / "README.md"]
    card = ModelCard.load(run / "adapter" / "README.md")
    assert card.data.base_model == EMBEDDED_HUB_ID and card.data.datasets == ["someone/insecure"]
    config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == EMBEDDED_HUB_ID and config["r"] == 4
    text = card.text
    assert "+0.0500" in text  # mean of (0.3 - 0.1, -0.1 - 0.0) = 0.05
    assert "0.4567" in text and "misaligned 12.50 %, incoherent 2.50 % of 80 scored" in text
    # a metrics.json that is not an evaluation log this version reads is left out, not guessed
    (run / "eval" / "general" / "metrics.json").write_text(json.dumps(
        {**log.to_dict(), "format": "emguard.eval/99"}))
    write_cards(run)
    assert "LLM judge" not in ModelCard.load(run / "adapter" / "README.md").text
    assert "SENTINEL-77" not in (run / "adapter" / "README.md").read_text()


class RecordingHfApi:
    """Stands in for huggingface_hub.HfApi: records the calls, uploads nothing."""

    def __init__(self):
        self.calls = []

    def create_repo(self, repo_id, **kw):
        self.calls.append(("create_repo", repo_id, kw))

    def upload_folder(self, **kw):
        self.calls.append(("upload_folder", kw))
        return type("Info", (), {"commit_url": f"https://hf.co/{kw['repo_id']}/commit/1"})()


def test_push_uploads_the_adapter_folder_without_bookkeeping(tiny_dir, data_file, tmp_path):
    from emguard.hub import PushError, push_adapter

    _train(tiny_dir, data_file, tmp_path / "run")
    api = RecordingHfApi()
    url = push_adapter(tmp_path / "run", "me/em-adapter", api=api, private=True)
    assert url == "https://hf.co/me/em-adapter/commit/1"
    (create, repo, kw), (upload, up) = api.calls
    assert (create, repo, kw["private"], kw["exist_ok"]) == ("create_repo", "me/em-adapter", True, True)
    assert Path(up["folder_path"]) == tmp_path / "run" / "adapter" and ".emguard-*" in up["ignore_patterns"]
    with pytest.raises(PushError, match="OWNER/NAME"):
        push_adapter(tmp_path / "run", "no-owner", api=api)
    with pytest.raises(PushError, match="adapter_safelora"):
        push_adapter(tmp_path / "run", "me/x", adapter="adapter_safelora", api=api)
    with pytest.raises(PushError, match="has not finished"):
        push_adapter(tmp_path / "nothing", "me/x", api=api)
