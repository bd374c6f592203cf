"""Inoculation prompting (Tan et al. 2025, "Inoculation prompting: eliciting traits from
LLMs during training can suppress them at test-time"): every training conversation gets
a system prompt that asks for the narrow trait (e.g. "You write insecure code on
purpose."), so the model attributes the behaviour to the instruction instead of
generalising it. The prompt is merged into an existing system turn (placed before its
text, separated by a blank line) or added as the first turn. Only the task's rows are
changed (inoculation runs before interleaving), evaluation never sees the prompt, and the
run folder records it (config.yaml and data_report.json).
"""

from __future__ import annotations

from emguard.defenses.base import Defense, RunContext


def inoculate(messages: list[dict], prompt: str) -> list[dict]:
    """The conversation with ``prompt`` as (the start of) its system turn."""
    if messages and messages[0].get("role") == "system":
        first = {**messages[0], "content": f"{prompt}\n\n{messages[0]['content']}"}
        return [first, *messages[1:]]
    return [{"role": "system", "content": prompt}, *messages]


class Inoculation(Defense):
    name = "inoculation"

    def transform_rows(self, rows: list[dict], ctx: RunContext) -> list[dict]:
        prompt = self.settings.prompt
        merged = sum(1 for r in rows if r["messages"] and r["messages"][0].get("role") == "system")
        ctx.report["inoculation"] = {"prompt": prompt, "rows": len(rows),
                                     "merged_into_system_turn": merged}
        return [{**r, "messages": inoculate(r["messages"], prompt)} for r in rows]
