"""emguard: LoRA fine-tuning under in-training defenses against emergent misalignment.

The library mirrors the CLI:
    emguard.config.load_run_config / RunConfig       run configs (YAML + dotted overrides)
    emguard.train.train                              emguard train
    emguard.defenses.safelora.apply_safelora         emguard safelora
    emguard.evaluate.run_eval / judge_generations    emguard eval / emguard judge
    emguard.judge.make_judge                         openai:MODEL | local:MODEL judges
    emguard.judge_free                               drift KL, preference, NLL, bandit share
    emguard.data.chat.load_chat_dataset              chat JSONL / hf: / builtin: data
    emguard.data.opswap.generate_opswap              emguard data opswap
    emguard.demo.run_demo                            emguard demo

Submodules import torch/transformers lazily where they can, so ``import emguard`` is cheap.
"""

__version__ = "0.1.0"
