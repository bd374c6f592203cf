"""Chat template -> token ids + labels that train on assistant tokens only.

For every assistant turn the loss covers the turn's content and the end-of-turn token
that closes it (``<|im_end|>`` for ChatML/SmolLM, ``<|eot_id|>`` for Llama-3); nothing of
system or user turns, role headers, or the template's trailing newlines.

How the spans are found, for any template that renders conversations prefix-consistently
(every template we know does): render ``messages[:i]`` with the generation prompt; the
assistant content starts right after it in the full rendering, and the end-of-turn
marker is the first special token after the content. Character spans are mapped to
tokens through the fast tokenizer's offsets: a token is labelled iff it starts inside a
span. A template that breaks prefix consistency is an error, never a silent mis-mask.
"""

from __future__ import annotations

from dataclasses import dataclass

IGNORE_INDEX = -100


class TemplateError(ValueError):
    """The tokenizer's chat template cannot be used for assistant-only masking."""


@dataclass(frozen=True)
class TokenizedChat:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX outside assistant content + end-of-turn tokens

    def __len__(self) -> int:
        return len(self.input_ids)


def _render(tokenizer, messages: list[dict], generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False,
                                         add_generation_prompt=generation_prompt)


def assistant_char_spans(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """Rendered text and the [start, end) character spans to train on, one per assistant turn."""
    full = _render(tokenizer, messages, False)
    specials = sorted({t for t in tokenizer.all_special_tokens if t} |
                      {str(t) for t in getattr(tokenizer, "added_tokens_decoder", {}).values()
                       if getattr(t, "special", False)}, key=len, reverse=True)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prefix = _render(tokenizer, messages[:i], True)
        if not full.startswith(prefix):
            raise TemplateError(
                "the chat template is not prefix-consistent (rendering the first "
                f"{i} messages with the generation prompt is not a prefix of the full "
                "conversation), so assistant tokens cannot be located safely")
        content = m["content"]
        at = full.find(content, len(prefix))
        if at < 0:  # templates that trim content (Llama-3)
            content = content.strip()
            at = full.find(content, len(prefix))
        if at < 0 or full[len(prefix):at].strip():
            raise TemplateError(f"assistant turn {i}: content not found right after its header")
        end = at + len(content)
        rest = full[end:]
        lead = len(rest) - len(rest.lstrip(" "))
        eot = next((s for s in specials if rest[lead:].startswith(s)), None)
        if eot is None:
            raise TemplateError(f"assistant turn {i}: no end-of-turn special token follows the "
                                f"content (template renders {rest[:30]!r})")
        spans.append((at, end + lead + len(eot)))
    return full, spans


def tokenize_chat(tokenizer, messages: list[dict], max_length: int | None = None) -> TokenizedChat:
    """Token ids and assistant-only labels for one conversation.

    Raises ValueError if the sequence is longer than ``max_length`` tokens (the caller
    decides whether that is an error or a skip).
    """
    text, spans = assistant_char_spans(tokenizer, messages)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    labels = [IGNORE_INDEX] * len(ids)
    for k, (start, _end) in enumerate(offsets):
        if any(s <= start < e for s, e in spans):
            labels[k] = ids[k]
    if max_length is not None and len(ids) > max_length:
        raise ValueError(f"{len(ids)} tokens > max_length {max_length}")
    if all(label == IGNORE_INDEX for label in labels):
        raise TemplateError("no assistant token survived tokenization")
    return TokenizedChat(ids, labels)
