"""emguard: LoRA fine-tuning under in-training defenses against emergent misalignment.

Public API (mirrors the CLI):
    load_run_config, RunConfig      -- emguard.config
    load_model, attach_lora         -- emguard.models
    load_chat_dataset               -- emguard.data.chat
    train                           -- emguard.train
"""

__version__ = "0.1.0"
