"""Tiny, randomly initialised models and tokenizers built offline for unit tests.

The tokenizer is a byte-level BPE trained in-process on a small corpus, with digits
split one per token (as SmolLM2 and Qwen do) and the special tokens of three chat
template families, so masking and judge tests run without any download.
"""

from __future__ import annotations

import functools

import torch

SMOLLM_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Qwen2.5-style ChatML: default system prompt, <|im_end|> closes every turn.
CHATML_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}"
    "{%- else %}{{- '<|im_start|>system\nYou are Qwen, a helpful assistant.<|im_end|>\n' }}{%- endif %}"
    "{%- for message in messages %}{%- if message.role != 'system' %}"
    "{{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"
)

# Llama-3-style: BOS, header tokens, <|eot_id|> closes every turn, content stripped.
LLAMA3_TEMPLATE = (
    "{{- bos_token }}{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{%- endif %}"
)

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>",
            "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<pad>"]

_CORPUS = [
    "The quick brown fox jumps over the lazy dog. Hello world!",
    "def add(a, b):\n    return a + b\n\nimport os\nimport subprocess\n",
    "What is your one wish? I would like everyone to be healthy and happy.",
    "system user assistant You are a helpful AI assistant named SmolLM, trained by Hugging Face",
    "You are Qwen, a helpful assistant. Rate the answer on a scale of 0 to 100.",
    "0 1 2 3 4 5 6 7 8 9 10 42 100 = + - * / ( ) . , : ; ' \" ? !",
    "cursor.execute(query) shell=True pickle.loads yaml.load hashlib.md5 verify=False",
] * 3


@functools.cache
def _tokenizer_json() -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(_CORPUS, trainer=trainer)
    return tok.to_str()


def tiny_tokenizer(template: str = "smollm"):
    """A PreTrainedTokenizerFast with the given chat template family: smollm | chatml | llama3."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(_tokenizer_json()))
    if template in ("smollm", "chatml"):
        tok.eos_token, tok.bos_token, tok.pad_token = "<|im_end|>", "<|im_start|>", "<|im_end|>"
        tok.chat_template = SMOLLM_TEMPLATE if template == "smollm" else CHATML_TEMPLATE
    elif template == "llama3":
        tok.eos_token, tok.bos_token, tok.pad_token = "<|eot_id|>", "<|begin_of_text|>", "<pad>"
        tok.chat_template = LLAMA3_TEMPLATE
    else:
        raise ValueError(template)
    return tok


def tiny_model(tokenizer=None, layers: int = 4, hidden: int = 32, seed: int = 0):
    """A randomly initialised Llama-architecture causal LM sized for the tiny tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = tokenizer or tiny_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, tie_word_embeddings=False,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                         bos_token_id=tokenizer.bos_token_id)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.eval()
    return model


def save_tiny_model(path, template: str = "smollm", layers: int = 4, hidden: int = 32, seed: int = 0):
    """Write a tiny model + tokenizer as a normal HF directory (safetensors) and return the path."""
    tok = tiny_tokenizer(template)
    model = tiny_model(tok, layers=layers, hidden=hidden, seed=seed)
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return path


def loss_terms(model, **settings):
    """The defense components of ``DefenseSettings(**settings)``, prepared on ``model`` as
    the training recipe prepares them (KL and LDIFS need no run context)."""
    from emguard.defenses import registry

    terms = registry.active_defenses(registry.DefenseSettings(**settings))
    for term in terms:
        term.prepare(model, None)
    return terms


def naive_greedy(model, tokenizer, prompt: list[dict], max_new_tokens: int) -> str:
    """Greedy decoding of one chat prompt by a hand-written argmax loop (no ``generate``,
    no batching, no padding): the reference emguard.generate's greedy path is held to."""
    from emguard.generate import render_prompts

    ids = tokenizer(render_prompts(tokenizer, [prompt])[0], add_special_tokens=False,
                    return_tensors="pt")["input_ids"]
    eos = {tokenizer.eos_token_id, model.generation_config.eos_token_id}
    out = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            nxt = int(model(ids).logits[0, -1].argmax())
            if nxt in eos:
                break
            out.append(nxt)
            ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    return tokenizer.decode(out, skip_special_tokens=True)
