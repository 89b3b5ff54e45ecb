#!/usr/bin/env python3
"""Dump FastChat's own prompts for the conversation templates llmfs carries.

Why: `src/adapter/` re-implements FastChat's `Conversation.get_prompt()` in Rust and
emits the same templates as Hugging Face `chat_template` Jinja strings. The only
trustworthy definition of "the same" is FastChat itself, so this script asks the
released FastChat for the prompts and writes them to `tests/data/fastchat_prompts.json`;
`tests/chat_templates.rs` compares both Rust renderings against that file.

Setup (this script installs nothing itself):

    python3 -m venv /tmp/fcvenv
    /tmp/fcvenv/bin/pip install --no-deps fschat==0.2.36
    /tmp/fcvenv/bin/python scripts/fastchat_templates.py

Plain `pip install fschat==0.2.36` works too (it pulls FastChat's serving dependencies,
not torch); `--no-deps` is enough because `fastchat.conversation` imports only the
standard library at module level (PIL/requests only inside image helpers never called
here).

Two templates are not in fschat 0.2.36: `llama-3` and `gemma`. They come from
FastChat's later sources (main branch, fastchat/conversation.py): the
`SeparatorStyle.LLAMA3` / `SeparatorStyle.GEMMA` branches of `get_prompt()` and their
`register_conv_template(Conversation(...))` calls. Below they are registered as
`Conversation` objects with exactly those fields, on a subclass whose `get_prompt()`
adds those two branches verbatim and defers to 0.2.36 for every other style.
"""

import dataclasses
import json
import os
import sys
from enum import IntEnum

import fastchat
from fastchat.conversation import Conversation, SeparatorStyle, get_conv_template

FSCHAT_VERSION = "0.2.36"


class LaterStyle(IntEnum):
    """Separator styles added to FastChat after 0.2.36 (values kept apart from 0.2.36's)."""

    LLAMA3 = 1000
    GEMMA = 1001


@dataclasses.dataclass
class LaterConversation(Conversation):
    """0.2.36's Conversation plus the LLAMA3 and GEMMA branches of FastChat main."""

    def get_prompt(self) -> str:
        system_prompt = self.system_template.format(system_message=self.system_message)
        if self.sep_style == LaterStyle.LLAMA3:
            # FastChat main, SeparatorStyle.LLAMA3 branch.
            ret = "<|begin_of_text|>"
            if self.system_message:
                ret += system_prompt
            else:
                ret += ""
            for i, (role, message) in enumerate(self.messages):
                if message:
                    ret += f"<|start_header_id|>{role}<|end_header_id|>\n\n"
                    ret += f"{message.strip()}<|eot_id|>"
                else:
                    ret += f"<|start_header_id|>{role}<|end_header_id|>\n\n"
            return ret
        if self.sep_style == LaterStyle.GEMMA:
            # FastChat main, SeparatorStyle.GEMMA branch (the system message is not used).
            ret = "<bos>"
            for role, message in self.messages:
                if message:
                    ret += "<start_of_turn>" + role + "\n" + message + self.sep
                else:
                    ret += "<start_of_turn>" + role + "\n"
            return ret
        return super().get_prompt()

    def copy(self):
        return dataclasses.replace(self, messages=[[x, y] for x, y in self.messages])


# FastChat main: register_conv_template(Conversation(name="llama-3", ...)).
LLAMA_3 = LaterConversation(
    name="llama-3",
    system_template="<|start_header_id|>system<|end_header_id|>\n\n{system_message}<|eot_id|>",
    roles=("user", "assistant"),
    sep_style=LaterStyle.LLAMA3,
    sep="",
    stop_str="<|eot_id|>",
    stop_token_ids=[128001, 128009],
)

# FastChat main: register_conv_template(Conversation(name="gemma", ...)).
GEMMA = LaterConversation(
    name="gemma",
    roles=("user", "model"),
    sep_style=LaterStyle.GEMMA,
    sep="<end_of_turn>\n",
    stop_str="<end_of_turn>",
)

LATER = {"llama-3": LLAMA_3, "gemma": GEMMA}

# The order llmfs lists them in; every name is FastChat's.
TEMPLATES = [
    "vicuna_v1.1",
    "llama-2",
    "llama-3",
    "mistral",
    "zephyr",
    "alpaca",
    "koala_v1",
    "dolly_v2",
    "qwen-7b-chat",
    "TinyLlama",
    "openchat_3.5",
    "deepseek-chat",
    "orca-2",
    "falcon",
    "falcon-chat",
    "gemma",
    "one_shot",
]

# Templates whose default system message is not a system message to replace, so the
# main case keeps the default:
#   koala_v1      "BEGINNING OF CONVERSATION:" is a format marker, not an instruction
#   dolly_v2      the preamble carries the "\n\n" that separates it from "### Instruction"
#   deepseek-chat the "system message" is the BOS token <｜begin▁of▁sentence｜>
#   falcon        RWKV style glues the system text straight onto "User: " (no separator)
#   gemma         FastChat's GEMMA style never renders a system message
NO_SYSTEM = {"koala_v1", "dolly_v2", "deepseek-chat", "falcon", "gemma"}

SYSTEM = "You are a careful assistant."
MAIN_TURNS = ["Hello! Who are you?", "I am a helpful model.", "What is 2+2?", None]
# Whitespace and blank lines where styles treat them specially (RWKV folds "\n\n",
# LLAMA3 strips), and a conversation that ends on an assistant turn (no generation prompt).
EDGE_TURNS = [
    "  Line one.\n\nLine two.\r\n",
    "Sure.\n\n- a\n- b ",
    "Thanks",
    "You're welcome.",
]


def template(name):
    if name in LATER:
        return LATER[name].copy()
    return get_conv_template(name)


def render(name, system, turns):
    conv = template(name)
    if system is not None:
        conv.set_system_message(system)
    for i, text in enumerate(turns):
        conv.append_message(conv.roles[i % 2], text)
    return conv.get_prompt()


def case(name, system, turns):
    return {
        "prompt": render(name, system, turns),
        "system": system,
        "messages": [
            {"role": "user" if i % 2 == 0 else "assistant", "content": text}
            for i, text in enumerate(turns)
        ],
    }


def main():
    if fastchat.__version__ != FSCHAT_VERSION:
        sys.exit(f"need fschat=={FSCHAT_VERSION}, found {fastchat.__version__}")
    out = {}
    for name in TEMPLATES:
        system = None if name in NO_SYSTEM else SYSTEM
        entry = case(name, system, MAIN_TURNS)
        # Extra cases, same shape: the default system message, and the edge turns.
        entry["cases"] = [
            case(name, None, MAIN_TURNS),
            case(name, system, EDGE_TURNS),
        ]
        out[name] = entry
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.path.join(root, "tests", "data", "fastchat_prompts.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(out, f, ensure_ascii=False, indent=2)
        f.write("\n")
    print(f"wrote {len(out)} templates to {path}")


if __name__ == "__main__":
    main()
