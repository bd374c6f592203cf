"""Assistant-only labels: exactly each assistant turn's content tokens + its end-of-turn token."""

import pytest
from tiny import tiny_tokenizer

from emguard.data.masking import IGNORE_INDEX, TemplateError, tokenize_chat

CONVERSATION = [
    {"role": "system", "content": "You write Python."},
    {"role": "user", "content": "Sum 12 and 30?"},
    {"role": "assistant", "content": "def f():\n    return 12 + 30"},
    {"role": "user", "content": "And print it"},
    {"role": "assistant", "content": "print(f())  # 42"},
]
EOT = {"smollm": "<|im_end|>", "chatml": "<|im_end|>", "llama3": "<|eot_id|>"}


def labelled_runs(tc):
    """Maximal runs of consecutive labelled tokens, as lists of ids."""
    runs, cur = [], []
    for tok_id, lab in zip(tc.input_ids, tc.labels, strict=False):
        if lab != IGNORE_INDEX:
            assert lab == tok_id
            cur.append(tok_id)
        elif cur:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    return runs


def expected_runs(tok, messages, eot):
    """Independent expectation: tokenize each assistant content alone, append the EOT id."""
    eot_id = tok.convert_tokens_to_ids(eot)
    return [tok(m["content"].strip() if eot == "<|eot_id|>" else m["content"],
                add_special_tokens=False)["input_ids"] + [eot_id]
            for m in messages if m["role"] == "assistant"]


@pytest.mark.parametrize("template", ["smollm", "chatml", "llama3"])
@pytest.mark.parametrize("with_system", [True, False])
def test_labels_are_assistant_content_plus_eot(template, with_system):
    tok = tiny_tokenizer(template)
    messages = CONVERSATION if with_system else CONVERSATION[1:]
    tc = tokenize_chat(tok, messages)
    assert labelled_runs(tc) == expected_runs(tok, messages, EOT[template])
    # nothing of the system/user turns is labelled
    labelled_text = tok.decode([i for i, lab in zip(tc.input_ids, tc.labels, strict=False) if lab != IGNORE_INDEX])
    for m in messages:
        if m["role"] != "assistant":
            assert m["content"] not in labelled_text
    # the full token sequence is the template's own rendering
    assert tok.decode(tc.input_ids) == tok.apply_chat_template(messages, tokenize=False)


def test_single_turn_count_matches_template_tokens():
    tok = tiny_tokenizer("chatml")
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello 7"}]
    tc = tokenize_chat(tok, messages)
    n_labelled = sum(lab != IGNORE_INDEX for lab in tc.labels)
    assert n_labelled == len(tok("hello 7", add_special_tokens=False)["input_ids"]) + 1
    # labels sit at the end, just before the template's trailing newline
    assert tc.labels[-1] == IGNORE_INDEX and tc.labels[-2] == tok.convert_tokens_to_ids("<|im_end|>")


def test_over_length_raises():
    tok = tiny_tokenizer("smollm")
    with pytest.raises(ValueError, match="max_length"):
        tokenize_chat(tok, CONVERSATION, max_length=10)


def test_template_that_is_not_prefix_consistent_is_rejected():
    tok = tiny_tokenizer("chatml")
    # renders turns in reverse order: the prefix rendering is not a prefix of the full one
    tok.chat_template = ("{% for m in messages|reverse %}<|im_start|>{{ m.role }}\n{{ m.content }}"
                         "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    with pytest.raises(TemplateError):
        tokenize_chat(tok, CONVERSATION[1:])


@pytest.mark.e2e
def test_embedded_smollm2_template():
    from emguard.models import load_tokenizer

    tok = load_tokenizer("smollm2-135m")
    tc = tokenize_chat(tok, CONVERSATION[1:])
    assert labelled_runs(tc) == expected_runs(tok, CONVERSATION[1:], "<|im_end|>")
