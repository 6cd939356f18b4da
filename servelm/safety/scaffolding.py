"""Chat-template scaffolding in a raw prompt: the markers that frame turns, not what the turns say.

A ``/v1/completions`` prompt is the caller's own text, and it is often a conversation the client
rendered itself: ``<|im_start|>user\\nHi<|im_end|>\\n<|im_start|>assistant\\n`` (vLLM's documented
recipe, lm-evaluation-harness ``--apply_chat_template``), ``### Instruction: ... ### Response:``
(Alpaca), ``user: Hi\\nassistant:`` (LlamaIndex's ``messages_to_prompt``). There the markers are
the expected input, not a forged system turn (the caller writes the whole prompt; it has no
system turn to fake), so the input guard scans the text between them: :func:`strip_scaffolding`.
The text of every turn is kept, system turns included, so an injection written inside a turn is
still scanned whatever role label it hides behind.
"""
from __future__ import annotations

import re

# Turn markers of the common chat templates (ChatML, Llama 2/3, Mistral, Phi-3, Gemma, Alpaca-style);
# the served model's own special tokens are added by the caller.
COMMON_MARKERS = (
    "<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
    "<|endoftext|>", "<s>", "</s>", "[INST]", "[/INST]", "<<SYS>>", "<</SYS>>", "<|user|>", "<|assistant|>",
    "<|system|>", "<|end|>", "<start_of_turn>", "<end_of_turn>", "<|bos|>", "<|eos|>",
)
_ROLES = r"system|developer|user|human|assistant|ai|bot|gpt|model|tool|function|instruction|input|response|context"
# A role label that opens a line: "user:", "### Instruction:", "[assistant]", "Human:" ...
_LABEL = re.compile(rf"^[ \t]*(?:#{{1,4}}[ \t]*)?\[?(?:{_ROLES})\]?[ \t]*:[ \t]*", re.IGNORECASE | re.MULTILINE)
# A bare role word right after a marker (ChatML's "<|im_start|>user\n", Llama 3's header): only at a turn start.
_BARE = re.compile(rf"^[ \t]*(?:#{{1,4}}[ \t]*)?(?:{_ROLES})[ \t]*$", re.IGNORECASE)
_BREAK = "\x00"


def strip_scaffolding(text: str, markers: tuple[str, ...] | list[str] = ()) -> str:
    """Returns ``text`` without turn markers and role labels, each turn's text on its own lines.

    ``markers`` adds the served model's special tokens to :data:`COMMON_MARKERS`. Text without any
    scaffolding comes back unchanged."""
    found = sorted({m for m in (*COMMON_MARKERS, *markers) if m and m in text}, key=len, reverse=True)
    if found:
        text = re.sub("|".join(map(re.escape, found)), "\n" + _BREAK, text)
    text = _LABEL.sub("", text)
    turns = []
    for turn in text.split(_BREAK):
        first, nl, rest = turn.lstrip("\n").partition("\n")
        turns.append(rest if _BARE.match(first) else turn)
    return "\n".join(t.strip("\n") for t in turns if t.strip())
