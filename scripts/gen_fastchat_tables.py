#!/usr/bin/env python3
"""Generate llmfs's FastChat tables (adapters + conversation templates) from fschat itself.

Why: `src/adapter/` must pick the same conversation template as FastChat's
`get_conversation_template(model_path)` and render the same prompt as
`Conversation.get_prompt()`. Copying 88 adapters and 83 templates by hand invites typos,
so this script reads them out of the released package and writes:

- src/adapter/fastchat_tables.rs (checked in, marked generated): every conversation
  template's fields, and every model adapter (in registration order) as data: its
  `match()` and its `get_default_conv_template()` translated from their Python source
  (ast) into a small condition language (`src/adapter/rules.rs` evaluates it);
- tests/data/fastchat_model_names.json: for every name in fschat's `model_info` registry
  and a list of Hugging Face repo ids (at least one per adapter), the adapter and template
  FastChat picks (`get_model_adapter`, `get_conversation_template`);
- tests/data/fastchat_prompts.json: for every template, `get_prompt()` of 3-turn
  conversations with a custom, an empty and the default system message, and with the
  assistant's last turn open.

The translation is checked before anything is written: the translated rules, evaluated
here in Python by the same semantics the Rust evaluator has, must give FastChat's own
answer for every recorded name. A construct the translator does not know (a later
FastChat's new kind of `match()`) stops the script with the line it could not read.

Two adapters and templates are not in fschat 0.2.36 but in FastChat's main branch:
Llama3Adapter/`llama-3` and GemmaAdapter/`gemma` (llmfs carried them before this table).
They are defined below with main's code and appended after all of 0.2.36's adapters, so
they only claim names 0.2.36 leaves to BaseModelAdapter; the expectations record both
FastChat 0.2.36's answer and llmfs's.

Usage (installs fschat into a venv of its own unless `fastchat` is importable already):

    python3 scripts/gen_fastchat_tables.py            # regenerate the three files
    python3 scripts/gen_fastchat_tables.py --check    # fail if they are not up to date

The venv (default /tmp/fschat-venv, `--venv DIR`) is made with --system-site-packages
(fastchat.model imports torch and transformers at module level) and gets
`pip install psutil requests` and `pip install --no-deps fschat==0.2.36 accelerate`: the
rest of fschat's dependencies serve its web servers, not these modules.
"""

import argparse
import ast
import dataclasses
import inspect
import json
import os
import re
import subprocess
import sys
import textwrap

FSCHAT_VERSION = "0.2.36"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RS_OUT = os.path.join(ROOT, "src/adapter/fastchat_tables.rs")
NAMES_OUT = os.path.join(ROOT, "tests/data/fastchat_model_names.json")
PROMPTS_OUT = os.path.join(ROOT, "tests/data/fastchat_prompts.json")


def ensure_fastchat(venv_dir):
    """Re-run this script inside a venv that has fschat==FSCHAT_VERSION, making it once."""
    try:
        import fastchat

        if fastchat.__version__ == FSCHAT_VERSION:
            return
    except ImportError:
        pass
    if os.environ.get("LLMFS_GEN_IN_VENV"):
        sys.exit(f"fschat=={FSCHAT_VERSION} is not importable even inside {venv_dir}")
    python = os.path.join(venv_dir, "bin", "python")
    if not os.path.exists(python):
        subprocess.check_call([sys.executable, "-m", "venv", "--system-site-packages", venv_dir])
    pip = [python, "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    subprocess.check_call(pip + ["psutil", "requests"])
    subprocess.check_call(pip + ["--no-deps", f"fschat=={FSCHAT_VERSION}", "accelerate"])
    env = dict(os.environ, LLMFS_GEN_IN_VENV="1")
    os.execve(python, [python, os.path.abspath(__file__)] + sys.argv[1:], env)


# --------------------------------------------------------------------------------------
# FastChat main's additions (Llama3 and Gemma): adapters, templates, get_prompt branches.
# --------------------------------------------------------------------------------------

LATER_STYLES = {"LLAMA3": 1000, "GEMMA": 1001}


def later_additions():
    """(adapter classes, Conversation objects) from FastChat main, in its own code."""
    from fastchat.conversation import Conversation
    from fastchat.model.model_adapter import BaseModelAdapter

    class LaterConversation(Conversation):
        def get_prompt(self) -> str:
            system_prompt = self.system_template.format(system_message=self.system_message)
            if self.sep_style == LATER_STYLES["LLAMA3"]:
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
            if self.sep_style == LATER_STYLES["GEMMA"]:
                # FastChat main, SeparatorStyle.GEMMA branch (the system message is unused).
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

    templates = [
        LaterConversation(
            name="llama-3",
            system_template="<|start_header_id|>system<|end_header_id|>\n\n{system_message}<|eot_id|>",
            roles=("user", "assistant"),
            sep_style=LATER_STYLES["LLAMA3"],
            sep="",
            stop_str="<|eot_id|>",
            stop_token_ids=[128001, 128009],
        ),
        LaterConversation(
            name="gemma",
            system_message="",
            roles=("user", "model"),
            sep_style=LATER_STYLES["GEMMA"],
            sep="<end_of_turn>\n",
            stop_str="<end_of_turn>",
        ),
    ]
    by_name = {t.name: t for t in templates}

    def later_template(name):
        return by_name[name].copy()

    class Llama3Adapter(BaseModelAdapter):
        """The model adapter for Llama-3 (e.g., meta-llama/Meta-Llama-3-8B-Instruct)"""

        def match(self, model_path: str):
            return "llama-3" in model_path.lower()

        def get_default_conv_template(self, model_path: str):
            return later_template("llama-3")

    class GemmaAdapter(BaseModelAdapter):
        """The model adapter for google/gemma"""

        def match(self, model_path: str):
            return "gemma" in model_path.lower()

        def get_default_conv_template(self, model_path: str):
            return later_template("gemma")

    return [Llama3Adapter, GemmaAdapter], templates


# --------------------------------------------------------------------------------------
# Translating match() / get_default_conv_template() into conditions.
#
# A condition is JSON-like: ["true"], ["false"], ["contains", subject, s], ["eq", s],
# ["regex", subject, [[atom...], ...]], ["and", [c...]], ["or", [c...]], ["not", c].
# Subjects: "raw" (the path as given), "lower" (.lower()), "leaf"
# (remove_parent_directory_name), "leaf_lower". An atom is [[lo, hi], ...], plus: bool.
# --------------------------------------------------------------------------------------


class Untranslatable(Exception):
    pass


def fail(node, src, why):
    line = src.splitlines()[node.lineno - 1].strip() if hasattr(node, "lineno") else ""
    raise Untranslatable(f"{why}: `{line}`")


def parse_regex(pattern, node, src):
    """A regex of literal alternatives, escapes, classes and `+`, as alternatives of atoms."""
    alts, cur, i = [], [], 0
    while i < len(pattern):
        c = pattern[i]
        if c == "|":
            alts.append(cur)
            cur = []
        elif c in "()":
            pass  # groups only group here: nothing inside them alternates (checked below)
        elif c == "\\":
            i += 1
            if pattern[i].isalnum():
                fail(node, src, f"regex escape \\{pattern[i]} not supported")
            cur.append([[[pattern[i], pattern[i]]], False])
        elif c == "[":
            j = pattern.index("]", i)
            body, ranges, k = pattern[i + 1 : j], [], 0
            if body.startswith("^"):
                fail(node, src, "negated regex class not supported")
            while k < len(body):
                if k + 2 < len(body) and body[k + 1] == "-":
                    ranges.append([body[k], body[k + 2]])
                    k += 3
                else:
                    ranges.append([body[k], body[k]])
                    k += 1
            cur.append([ranges, False])
            i = j
        elif c == "+":
            if not cur:
                fail(node, src, "regex + without an atom")
            cur[-1][1] = True
        elif c in ".*?{}^$":
            fail(node, src, f"regex operator {c} not supported")
        else:
            cur.append([[[c, c]], False])
        i += 1
    alts.append(cur)
    if "|" in pattern and "(" in pattern:
        fail(node, src, "regex groups with alternation not supported")
    return alts


def lower_alts(alts):
    """re.I over a lowercased subject: every letter of the pattern lowercased."""
    out = []
    for alt in alts:
        atoms = []
        for ranges, plus in alt:
            for lo, hi in ranges:
                if lo != hi and (lo.isalpha() or hi.isalpha()):
                    raise Untranslatable("re.I over a letter range")
            atoms.append([[[lo.lower(), hi.lower()] for lo, hi in ranges], plus])
        out.append(atoms)
    return out


class Translator:
    def __init__(self, src, module_globals):
        self.src = src
        self.globals = module_globals
        self.subject = "raw"  # what the name `model_path` holds now

    def subj(self, node):
        """The subject an expression denotes, or None."""
        if isinstance(node, ast.Name) and node.id == "model_path":
            return self.subject
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "lower"
            and not node.args
        ):
            inner = self.subj(node.func.value)
            if inner is not None:
                return {"raw": "lower", "lower": "lower", "leaf": "leaf_lower", "leaf_lower": "leaf_lower"}[inner]
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "remove_parent_directory_name":
            inner = self.subj(node.args[0])
            if inner == "raw":
                return "leaf"
            if inner == "lower":
                return "leaf_lower"
        return None

    def strings(self, node):
        """A constant string sequence (literal list/tuple or a module-level constant)."""
        if isinstance(node, (ast.List, ast.Tuple)):
            vals = [e.value for e in node.elts if isinstance(e, ast.Constant) and isinstance(e.value, str)]
            if len(vals) == len(node.elts):
                return vals
        if isinstance(node, ast.Name) and node.id in self.globals:
            val = self.globals[node.id]
            if isinstance(val, (list, tuple)) and all(isinstance(v, str) for v in val):
                return list(val)
        return None

    def cond(self, node):
        src = self.src
        if isinstance(node, ast.Constant) and isinstance(node.value, bool):
            return ["true"] if node.value else ["false"]
        if isinstance(node, ast.BoolOp):
            op = "and" if isinstance(node.op, ast.And) else "or"
            return [op, [self.cond(v) for v in node.values]]
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
            return ["not", self.cond(node.operand)]
        if isinstance(node, ast.Compare) and len(node.ops) == 1:
            left, op, right = node.left, node.ops[0], node.comparators[0]
            if isinstance(op, (ast.In, ast.NotIn)) and isinstance(left, ast.Constant) and isinstance(left.value, str):
                s = self.subj(right)
                if s is None:
                    fail(node, src, "`in` over something that is not the model path")
                c = ["contains", s, left.value]
                return c if isinstance(op, ast.In) else ["not", c]
            if isinstance(op, ast.In) and self.subj(left) == "raw":
                vals = self.strings(right)
                if vals is None:
                    fail(node, src, "`model_path in` a non-constant")
                return ["or", [["eq", v] for v in vals]]
            if isinstance(op, ast.Eq) and self.subj(left) == "raw" and isinstance(right, ast.Constant):
                return ["eq", right.value]
            fail(node, src, "comparison not supported")
        if isinstance(node, ast.Call):
            f = node.func
            if isinstance(f, ast.Name) and f.id == "bool" and len(node.args) == 1:
                return self.cond(node.args[0])
            if isinstance(f, ast.Name) and f.id == "any" and isinstance(node.args[0], ast.GeneratorExp):
                gen = node.args[0]
                comp = gen.generators[0]
                vals = self.strings(comp.iter)
                elt = gen.elt
                if (
                    vals is not None
                    and len(gen.generators) == 1
                    and isinstance(elt, ast.Compare)
                    and isinstance(elt.ops[0], ast.In)
                    and isinstance(elt.left, ast.Name)
                    and elt.left.id == comp.target.id
                ):
                    s = self.subj(elt.comparators[0])
                    if s is not None:
                        return ["or", [["contains", s, v] for v in vals]]
                fail(node, src, "any() form not supported")
            if isinstance(f, ast.Attribute) and f.attr == "search" and getattr(f.value, "id", "") == "re":
                pattern = node.args[0].value
                s = self.subj(node.args[1])
                flags = node.args[2:] + [k.value for k in node.keywords if k.arg == "flags"]
                ignore_case = any(getattr(a, "attr", "") in ("I", "IGNORECASE") for a in flags)
                if s is None or (flags and not ignore_case):
                    fail(node, src, "re.search form not supported")
                alts = parse_regex(pattern, node, src)
                if ignore_case:
                    s = {"raw": "lower", "lower": "lower", "leaf": "leaf_lower", "leaf_lower": "leaf_lower"}[s]
                    alts = lower_alts(alts)
                if all(not plus and len(r) == 1 and r[0][0] == r[0][1] for alt in alts for r, plus in alt):
                    return ["or", [["contains", s, "".join(r[0][0] for r, _ in alt)] for alt in alts]]
                return ["regex", s, alts]
            if isinstance(f, ast.Attribute) and f.attr == "exists":
                # PeftModelAdapter's `os.path.exists(model_path/adapter_config.json)`: a file
                # check a name cannot answer. llmfs matches on the name alone.
                return ["false"]
        fail(node, src, "expression not supported")

    def template(self, node):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in ("get_conv_template", "later_template")
            and isinstance(node.args[0], ast.Constant)
        ):
            return node.args[0].value
        fail(node, self.src, "template expression not supported")

    def decisions(self, stmts, value, guard=None):
        """A function body as a first-match list of (condition, value)."""
        out = []
        for st in stmts:
            if isinstance(st, ast.Expr) and isinstance(st.value, ast.Constant):
                continue  # docstring
            if isinstance(st, ast.Expr) and isinstance(st.value, ast.Call) and getattr(st.value.func, "id", "") == "print":
                continue  # MPTAdapter's warning
            if (
                isinstance(st, ast.Assign)
                and len(st.targets) == 1
                and getattr(st.targets[0], "id", "") == "model_path"
            ):
                s = self.subj(st.value)
                if s is None:
                    fail(st, self.src, "assignment not supported")
                self.subject = s
                continue
            if isinstance(st, ast.Return):
                out.append((["true"], value(st.value)))
                return out
            if isinstance(st, ast.If):
                c = self.cond(st.test)
                saved = self.subject
                body = self.decisions(st.body, value)
                self.subject = saved
                out += [(and_(c, bc), v) for bc, v in body]
                if st.orelse:
                    rest = self.decisions(st.orelse, value)
                    self.subject = saved
                    out += [(and_(["not", c], bc), v) for bc, v in rest]
                    if body and body[-1][0] == ["true"] and rest and rest[-1][0] == ["true"]:
                        # Both branches return: reaching the else's last return means `c`
                        # failed, so it is unconditional and nothing after the `if` runs.
                        out[-1] = (["true"], out[-1][1])
                        return out
                continue
            fail(st, self.src, "statement not supported")
        return out


def and_(a, b):
    if b == ["true"]:
        return a
    if a == ["true"]:
        return b
    return ["and", [a, b]]


def method_source(cls, name):
    for klass in cls.__mro__:
        if name in vars(klass):
            return klass, textwrap.dedent(inspect.getsource(vars(klass)[name]))
    raise KeyError(name)


def translate_adapter(cls, module_globals):
    _, msrc = method_source(cls, "match")
    fn = ast.parse(msrc).body[0]
    tr = Translator(msrc, module_globals)
    dec = tr.decisions(fn.body, tr.cond)
    # Fold the first-match list of booleans into one condition.
    match = ["false"]
    for c, v in reversed(dec):
        match = ["or", [c, match]] if v == ["true"] else ["and", [["not", c], match]] if v == ["false"] else ["or", [["and", [c, v]], ["and", [["not", c], match]]]]
    match = simplify(match)
    owner, tsrc = method_source(cls, "get_default_conv_template")
    if cls.__name__ == "PeftModelAdapter":
        templates = None  # the base model's template, read from adapter_config.json
    else:
        fn = ast.parse(tsrc).body[0]
        tr = Translator(tsrc, module_globals)
        templates = [(simplify(c), t) for c, t in tr.decisions(fn.body, tr.template)]
        if not templates or templates[-1][0] != ["true"]:
            raise Untranslatable(f"{cls.__name__}: get_default_conv_template may not return")
    return match, templates


def simplify(c):
    op = c[0]
    if op in ("and", "or"):
        kids = []
        for k in map(simplify, c[1]):
            if k[0] == op:
                kids += k[1]
            else:
                kids.append(k)
        unit, zero = (["true"], ["false"]) if op == "and" else (["false"], ["true"])
        if zero in kids:
            return zero
        kids = [k for k in kids if k != unit]
        if not kids:
            return unit
        return kids[0] if len(kids) == 1 else [op, kids]
    if op == "not":
        k = simplify(c[1])
        if k[0] == "not":
            return k[1]
        if k in (["true"], ["false"]):
            return ["false"] if k == ["true"] else ["true"]
        return ["not", k]
    return c


# The Python twin of src/adapter/rules.rs: used to prove the translation before writing it.


def subject_of(path, s):
    if s == "raw":
        return path
    if s == "lower":
        return path.lower()
    leaf = path[:-1] if path.endswith("/") else path
    leaf = leaf.split("/")[-1]
    return leaf if s == "leaf" else leaf.lower()


def regex_at(atoms, text, pos):
    if not atoms:
        return True
    (ranges, plus), rest = atoms[0], atoms[1:]
    n = 0
    while pos + n < len(text) and any(lo <= text[pos + n] <= hi for lo, hi in ranges):
        n += 1
        if not plus:
            break
    while n >= 1:
        if regex_at(rest, text, pos + n):
            return True
        n -= 1
    return False


def holds(c, path):
    op = c[0]
    if op == "true":
        return True
    if op == "false":
        return False
    if op == "contains":
        return c[2] in subject_of(path, c[1])
    if op == "eq":
        return path == c[1]
    if op == "regex":
        text = subject_of(path, c[1])
        return any(regex_at(alt, text, p) for alt in c[2] for p in range(len(text) + 1))
    if op == "and":
        return all(holds(k, path) for k in c[1])
    if op == "or":
        return any(holds(k, path) for k in c[1])
    if op == "not":
        return not holds(c[1], path)
    raise ValueError(c)


def pick(adapters, model_path):
    """get_model_adapter + get_default_conv_template over translated adapters."""
    base = os.path.basename(os.path.normpath(model_path))
    chosen = None
    for a in adapters:
        if a["name"] != "BaseModelAdapter" and holds(a["match"], base):
            chosen = a
            break
    if chosen is None:
        chosen = next(a for a in adapters if holds(a["match"], model_path))
    if chosen["templates"] is None:
        return chosen["name"], None  # PeftModelAdapter: the base model's
    return chosen["name"], next(t for c, t in chosen["templates"] if holds(c, model_path))


# --------------------------------------------------------------------------------------
# Names to check: model_info plus Hugging Face repo ids (at least one per adapter).
# --------------------------------------------------------------------------------------

# Open models' repo ids, chosen so that every adapter is claimed by at least one
# (the script fails when one is not); several per adapter where its template depends on
# the name (Vicuna v0, WizardLM sizes, MPT variants, Aquila, Airoboros, ...).
HF_REPO_IDS = [
    "peft-lora/llama-7b-peft", "CarperAI/stable-vicuna-13b-delta", "TheBloke/stable-vicuna-13B-HF",
    "lmsys/vicuna-7b-v1.5", "lmsys/vicuna-13b-v1.3", "lmsys/vicuna-7b-v0", "eachadea/vicuna-13b-1.1",
    "lmsys/vicuna-7b-v1.5-16k", "jondurbin/airoboros-7b", "jondurbin/airoboros-l2-70b-2.2.1",
    "jondurbin/airoboros-l2-13b-3.0", "jondurbin/airoboros-33b-gpt4-1.4", "jondurbin/spicyboros-7b-2.2",
    "jondurbin/airoboros-mpt-30b-gpt4-1p4-five-epochs", "jondurbin/airoboros-c34b-3.1.2",
    "lmsys/longchat-7b-16k", "lmsys/longchat-13b-16k", "lmsys/fastchat-t5-3b-v1.0", "google/flan-t5-xl",
    "google/flan-ul2", "Salesforce/codet5p-6b", "young-geng/koala", "TheBloke/koala-13B-HF",
    "chavinlo/alpaca-native", "tatsu-lab/alpaca-7b-wdiff", "THUDM/chatglm-6b", "THUDM/chatglm2-6b",
    "THUDM/chatglm3-6b", "THUDM/codegeex2-6b", "databricks/dolly-v2-12b", "databricks/dolly-v2-3b",
    "OpenAssistant/oasst-sft-4-pythia-12b-epoch-3.5", "OpenAssistant/oasst-sft-7-llama-30b-xor",
    "OpenAssistant/oasst-rlhf-2-llama-30b-7k-steps-xor", "openchat/openchat_3.5", "openchat/openchat-3.5-0106",
    "berkeley-nest/Starling-LM-7B-alpha", "Nexusflow/Starling-LM-7B-beta", "tenyx/TenyxChat-7B-v1",
    "EleutherAI/pythia-12b", "EleutherAI/pythia-1.4b-deduped", "stabilityai/stablelm-tuned-alpha-7b",
    "stabilityai/stablelm-zephyr-3b", "project-baize/baize-v2-7b", "project-baize/baize-v2-13b",
    "BlinkDL/rwkv-4-raven", "RWKV/rwkv-4-169m-pile", "OpenBuddy/openbuddy-7b-v1.1-bf16-enc",
    "OpenBuddy/openbuddy-mistral-7b-v13.1", "FreedomIntelligence/phoenix-inst-chat-7b",
    "FreedomIntelligence/ReaLM-7b", "mosaicml/mpt-7b-chat", "mosaicml/mpt-30b-chat",
    "mosaicml/mpt-30b-instruct", "mosaicml/mpt-7b", "Neutralzz/BiLLa-7B-SFT",
    "togethercomputer/RedPajama-INCITE-7B-Chat", "togethercomputer/RedPajama-INCITE-Chat-3B-v1",
    "h2oai/h2ogpt-gm-oasst1-en-2048-open-llama-7b", "h2oai/h2ogpt-4096-llama2-13b-chat",
    "LMFlow/Full-Robin-7b-v2", "OptimalScale/robin-13b-v2-delta", "nomic-ai/gpt4all-13b-snoozy",
    "WizardLM/WizardLM-13B-V1.2", "WizardLM/WizardLM-70B-V1.0", "WizardLM/WizardLM-7B-V1.0",
    "openaccess-ai-collective/manticore-13b-chat-pyg", "timdettmers/guanaco-33b-merged",
    "TheBloke/guanaco-65B-HF", "camel-ai/CAMEL-13B-Combined-Data", "lcw99/polyglot-ko-12.8b-chang-instruct-chat",
    "allenai/tulu-30b", "allenai/tulu-2-dpo-70b", "tiiuae/falcon-180B-chat", "tiiuae/falcon-40b",
    "tiiuae/falcon-7b-instruct", "TigerResearch/tigerbot-7b-sft", "TigerResearch/tigerbot-70b-chat",
    "baichuan-inc/Baichuan-7B", "baichuan-inc/Baichuan-13B-Chat", "baichuan-inc/Baichuan2-13B-Chat",
    "Salesforce/xgen-7b-8k-inst", "NousResearch/Nous-Hermes-13b", "NousResearch/Nous-Hermes-Llama2-13b",
    "internlm/internlm-chat-7b", "internlm/internlm2-chat-20b", "HuggingFaceH4/starchat-beta",
    "HuggingFaceH4/starchat2-15b-v0.1", "mistralai/Mistral-7B-Instruct-v0.2", "mistralai/Mixtral-8x7B-Instruct-v0.1",
    "meta-llama/Llama-2-7b-chat-hf", "meta-llama/Llama-2-70b-chat-hf", "XuanYuanAI/CuteGPT-13B",
    "Open-Orca/OpenOrca-Platypus2-13B", "Open-Orca/Mistral-7B-OpenOrca", "ehartford/dolphin-2.2.1-mistral-7b",
    "cognitivecomputations/dolphin-2.6-mistral-7b", "teknium/OpenHermes-2.5-Mistral-7B",
    "teknium/OpenHermes-2-Mistral-7B", "NousResearch/Nous-Hermes-2-Mixtral-8x7B-DPO",
    "NousResearch/Nous-Hermes-2-Mixtral-8x7B-SFT", "WizardLM/WizardCoder-Python-34B-V1.0",
    "WizardLM/WizardCoder-15B-V1.0", "Qwen/Qwen-7B-Chat", "Qwen/Qwen-14B-Chat", "Qwen/Qwen1.5-72B-Chat",
    "BAAI/AquilaChat-7B", "BAAI/AquilaChat2-7B", "BAAI/AquilaChat2-34B", "BAAI/AquilaChat2-34B-16K",
    "BAAI/bge-large-en-v1.5", "intfloat/e5-large-v2", "FlagAlpha/Llama2-Chinese-13b-Chat",
    "ymcui/chinese-alpaca-2-7b", "hfl/chinese-alpaca-2-13b", "bofenghuang/vigogne-2-7b-chat",
    "bofenghuang/vigogne-2-7b-instruct", "bofenghuang/vigostral-7b-chat", "VMware/open-llama-7b-open-instruct",
    "FreedomIntelligence/ReaLM-7b-v1", "Phind/Phind-CodeLlama-34B-v2", "codellama/CodeLlama-7b-Instruct-hf",
    "codellama/CodeLlama-34b-hf", "lcw99/llama2-ko-chang-instruct-chat", "HuggingFaceH4/zephyr-7b-beta",
    "HuggingFaceH4/zephyr-7b-alpha", "argilla/notus-7b-v1", "rishiraj/CatPPT", "rishiraj/CatPPT-base",
    "TinyLlama/TinyLlama-1.1B-Chat-v1.0", "Xwin-LM/Xwin-LM-70B-V0.1", "Xwin-LM/Xwin-LM-13B-V0.2",
    "OpenLemur/lemur-70b-chat-v1", "PygmalionAI/mythalion-13b", "PygmalionAI/pygmalion-2-13b",
    "PygmalionAI/metharme-1.3b", "microsoft/Orca-2-7b", "microsoft/Orca-2-13b", "xDAN-AI/xDAN-L1-Chat-RL-v1",
    "01-ai/Yi-34B-Chat", "01-ai/Yi-6B-Chat", "deepseek-ai/deepseek-coder-33b-instruct",
    "deepseek-ai/deepseek-coder-6.7b-instruct", "deepseek-ai/deepseek-llm-67b-chat",
    "deepseek-ai/deepseek-llm-7b-chat", "IEITYuan/Yuan2-2B-hf", "IEITYuan/Yuan2-102B-hf",
    "meta-math/MetaMath-7B-V1.0", "meta-math/MetaMath-Mistral-7B", "jondurbin/bagel-dpo-34b-v0.2",
    "jondurbin/bagel-7b-v0.1", "upstage/SOLAR-10.7B-Instruct-v1.0", "nvidia/Llama2-70B-SteerLM-Chat",
    "liuhaotian/llava-v1.5-7b", "liuhaotian/llava-v1.5-13b", "IEITYuan/Yuan-2-2B", "gpt2", "facebook/opt-1.3b",
    "bigscience/bloom-7b1", "EleutherAI/gpt-j-6b", "meta-llama/Meta-Llama-3-8B-Instruct",
    "meta-llama/Meta-Llama-3-70B-Instruct", "google/gemma-7b-it", "google/gemma-2b-it",
    # Local paths: the basename decides first, then the full path.
    "/models/vicuna-7b-v1.5/", "/store/llama-2-7b-chat/snapshot-1", "/models/vicuna-store/zephyr-7b-beta",
    "/data/wizardlm-13b/weights",
    # API models FastChat knows by exact name.
    "bard", "azure-gpt-4", "azure-gpt-35-turbo",
]

# Adapters no name can reach: an adapter registered earlier claims every name they match.
SHADOWED = {
    "Lamma2ChineseAlpacaAdapter": "AlpacaAdapter, registered earlier, claims every name containing 'alpaca'",
}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--venv", default="/tmp/fschat-venv")
    ap.add_argument("--check", action="store_true", help="fail if the checked-in files differ")
    args = ap.parse_args()
    ensure_fastchat(args.venv)

    import fastchat.conversation as fconv
    import fastchat.model.model_adapter as fma
    from fastchat.model.model_registry import model_info

    later_adapters, later_templates = later_additions()

    # ---- adapters -------------------------------------------------------------------
    classes = [type(a) for a in fma.model_adapters]
    assert classes[-1] is fma.BaseModelAdapter, "BaseModelAdapter registers last"
    all_classes = classes[:-1] + later_adapters + classes[-1:]
    origin = {c: "fschat " + FSCHAT_VERSION for c in classes}
    origin.update({c: "FastChat main" for c in later_adapters})
    module_globals = vars(fma)
    adapters = []
    for cls in all_classes:
        match, templates = translate_adapter(cls, module_globals)
        adapters.append(
            {
                "name": cls.__name__,
                "family": family_name(cls.__name__),
                "origin": origin[cls],
                "doc": ((cls.__doc__ or "").strip().splitlines() or [""])[0].strip(),
                "match": match,
                "templates": templates,
            }
        )
    fams = [a["family"] for a in adapters]
    assert len(set(fams)) == len(fams), "family names are unique"

    # ---- templates ------------------------------------------------------------------
    conv_list = list(fconv.conv_templates.values()) + later_templates
    later_names = {t.name for t in later_templates}
    style_names = {v: k for k, v in LATER_STYLES.items()}
    style_names.update({s.value: s.name for s in fconv.SeparatorStyle})

    # ---- names: FastChat's answers and the translation's --------------------------------
    later_by_name = [a for a in adapters if a["origin"] == "FastChat main"]
    fastchat_only = [a for a in adapters if a["origin"] != "FastChat main"]
    names = [(n, "model_info") for n in model_info] + [(n, "hf") for n in HF_REPO_IDS]
    records, problems, claimed = [], [], set()
    for name, source in names:
        fa = type(fma.get_model_adapter(name)).__name__
        sys.stdout, real_stdout = sys.stderr, sys.stdout  # MPTAdapter prints a warning
        try:
            ft = fma.get_conversation_template(name).name
        except ImportError:
            # PeftModelAdapter: FastChat reads the base model's name from the adapter's
            # adapter_config.json (with peft, over the network); a name alone has none.
            assert fa == "PeftModelAdapter", name
            ft = None
        finally:
            sys.stdout = real_stdout
        a, t = pick(adapters, name)
        fa2, ft2 = pick(fastchat_only, name)
        if (fa2, ft2) != (fa, ft):
            problems.append(f"{name}: FastChat says {fa}/{ft}, the translation {fa2}/{ft2}")
        if a in [x["name"] for x in later_by_name]:
            # What FastChat main's adapter would say, run as Python.
            cls = next(c for c in later_adapters if c.__name__ == a)
            assert cls().get_default_conv_template(name).name == t
        claimed.add(a)
        records.append({"name": name, "source": source, "fastchat_adapter": fa, "fastchat_template": ft, "adapter": a, "template": t})
    unclaimed = [a["name"] for a in adapters if a["name"] not in claimed and a["name"] not in SHADOWED]
    if problems:
        sys.exit("translation disagrees with FastChat:\n" + "\n".join(problems))
    if unclaimed:
        sys.exit("no recorded name is claimed by: " + ", ".join(unclaimed))

    # ---- prompts ----------------------------------------------------------------------
    prompts = {conv.name: [prompt(conv, system, turns) for _, system, turns in CASES] for conv in conv_list}
    conversations = [
        {"case": label, "system": system, "messages": [{"role": r, "content": m} for r, m in turns]}
        for label, system, turns in CASES
    ]

    rs = render_rust(adapters, conv_list, later_names, style_names)
    names_json = json.dumps({"fschat": FSCHAT_VERSION, "names": records}, indent=1, ensure_ascii=False) + "\n"
    prompts_json = json.dumps({"fschat": FSCHAT_VERSION, "conversations": conversations, "prompts": prompts}, indent=1, ensure_ascii=False) + "\n"
    outputs = [(RS_OUT, rs), (NAMES_OUT, names_json), (PROMPTS_OUT, prompts_json)]
    if args.check:
        stale = [p for p, text in outputs if not os.path.exists(p) or open(p, encoding="utf-8").read() != text]
        if stale:
            sys.exit("out of date (run scripts/gen_fastchat_tables.py): " + ", ".join(stale))
        print("up to date")
        return
    for path, text in outputs:
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
    same = sum(r["template"] == r["fastchat_template"] for r in records if r["source"] == "model_info")
    total = sum(r["source"] == "model_info" for r in records)
    print(f"{len(adapters)} adapters, {len(conv_list)} templates, {len(records)} names; "
          f"model_info: {same}/{total} pick FastChat {FSCHAT_VERSION}'s template")


def family_name(cls_name):
    """llmfs's short family name for an adapter class: `VicunaAdapter` → `vicuna`."""
    if cls_name == "BaseModelAdapter":
        return "unknown"  # what llmfs has always called FastChat's fallback
    stem = cls_name[: -len("Adapter")] if cls_name.endswith("Adapter") else cls_name
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "-", stem).lower()


# The conversations every template is rendered with. Contents exercise what the styles
# treat specially: blank lines and CRLF (RWKV folds them), edge whitespace (LLAMA3 strips
# it), quotes/braces/backslashes (Jinja literals), non-ASCII, and a message ending in
# "n" (YUAN2's `rstrip("<n>")` eats it).
TURNS = [
    ("user", "Hello! Who are you?"),
    ("assistant", "I am a helpful model.\n\nAsk me anything."),
    ("user", "  Say {x} and 'quotes' \"too\", \\back\\slash.\r\n"),
    ("assistant", "Sure: {x}, 'quotes' and \"too\" — ünïcödé ✓ "),
    ("user", "Thanks, now a list:\n- a\n- b"),
    ("assistant", "Here it is\n- a\n- b\n\nDone, human"),
]
SYSTEM = "You are a careful assistant. Answer in {lang}.\nBe brief."


CASES = [
    ("custom system, 3 turns", SYSTEM, TURNS),
    ("default system, 3 turns", None, TURNS),
    ("empty system, 3 turns", "", TURNS),
    ("custom system, last turn open", SYSTEM, TURNS[:5] + [("assistant", None)]),
    ("default system, last turn open", None, TURNS[:5] + [("assistant", None)]),
    ("default system, one open turn", None, [("user", "Hi"), ("assistant", None)]),
    ("default system, no messages", None, []),
]


def prompt(conv, system, turns):
    """get_prompt() after set_system_message (unless None) and one append per turn; None
    for the templates FastChat has no text prompt for (sep_style None: API models)."""
    c = conv.copy()
    if system is not None:
        c.set_system_message(system)
    for role, content in turns:
        c.append_message(c.roles[0] if role == "user" else c.roles[1], content)
    if conv.sep_style is None:
        return None
    return c.get_prompt()


# --------------------------------------------------------------------------------------
# Rust output.
# --------------------------------------------------------------------------------------


def rs_str(s):
    out = ['"']
    for ch in s:
        if ch == "\\":
            out.append("\\\\")
        elif ch == '"':
            out.append('\\"')
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\r":
            out.append("\\r")
        elif ch == "\t":
            out.append("\\t")
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append("\\u{%x}" % ord(ch))
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def rs_char(c):
    return "'\\''" if c == "'" else "'\\\\'" if c == "\\" else f"'{c}'"


SUBJECTS = {"raw": "Raw", "lower": "Lower", "leaf": "Leaf", "leaf_lower": "LeafLower"}


def rs_cond(c):
    op = c[0]
    if op == "true":
        return "Cond::True"
    if op == "false":
        return "Cond::False"
    if op == "contains":
        return f"Cond::Contains(Subject::{SUBJECTS[c[1]]}, {rs_str(c[2])})"
    if op == "eq":
        return f"Cond::Eq({rs_str(c[1])})"
    if op == "regex":
        alts = ", ".join(
            "&[" + ", ".join(
                "Atom { ranges: &[" + ", ".join(f"({rs_char(lo)}, {rs_char(hi)})" for lo, hi in r) + f"], plus: {str(p).lower()} }}"
                for r, p in alt
            ) + "]"
            for alt in c[2]
        )
        return f"Cond::Regex(Subject::{SUBJECTS[c[1]]}, &[{alts}])"
    if op in ("and", "or"):
        return f"Cond::{op.capitalize()}(&[{', '.join(rs_cond(k) for k in c[1])}])"
    if op == "not":
        return f"Cond::Not(&{rs_cond(c[1])})"
    raise ValueError(c)


def style_variant(name):
    if name is None:
        return "SepStyle::NoPrompt"
    return "SepStyle::" + "".join(p.capitalize() for p in name.split("_"))


def render_rust(adapters, convs, later_names, style_names):
    L = []
    w = L.append
    w("// @generated by scripts/gen_fastchat_tables.py from fschat " + FSCHAT_VERSION + " (and, where marked,")
    w("// FastChat main). Do not edit: change the script and run it again.")
    w("")
    w("//! FastChat's conversation templates and model adapters as data (see scripts/gen_fastchat_tables.py).")
    w("//!")
    w("//! One file, though over the ~800-line mark, on purpose: it is generated and data only (the")
    w("//! tables, no logic), written whole by the script and compared whole by its `--check`.")
    w("")
    w("use super::conversation::{Conversation, SepStyle};")
    w("use super::rules::{Adapter, Atom, Cond, Subject};")
    w("")
    w("/// Every conversation template of fastchat/conversation.py, in registration order.")
    w("pub(crate) static TEMPLATES: &[Conversation] = &[")
    for c in convs:
        style = style_names.get(int(c.sep_style)) if c.sep_style is not None else None
        examples = []
        for role, text in c.messages[: c.offset]:
            examples.append(f"({list(c.roles).index(role)}, {rs_str(text)})")
        assert len(c.messages) == c.offset, c.name
        stops = c.stop_str if isinstance(c.stop_str, list) else [] if c.stop_str is None else [c.stop_str]
        w("    Conversation {")
        w(f"        name: {rs_str(c.name)},")
        if c.name in later_names:
            w("        origin: \"FastChat main\",")
        else:
            w(f"        origin: \"fschat {FSCHAT_VERSION}\",")
        w(f"        system_template: {rs_str(c.system_template)},")
        w(f"        system_message: {rs_str(c.system_message)},")
        w(f"        roles: &[{', '.join(rs_str(r) for r in c.roles)}],")
        w(f"        examples: &[{', '.join(examples)}],")
        w(f"        sep_style: {style_variant(style)},")
        w(f"        sep: {rs_str(c.sep or '')},")
        w(f"        sep2: {rs_str(c.sep2 or '')},")
        w(f"        stop_str: &[{', '.join(rs_str(s) for s in stops)}],")
        w(f"        stop_token_ids: &[{', '.join(str(i) for i in (c.stop_token_ids or []))}],")
        w("    },")
    w("];")
    w("")
    w("/// Every model adapter of fastchat/model/model_adapter.py in registration order (the first")
    w("/// match wins), FastChat main's Llama3/Gemma adapters just before BaseModelAdapter.")
    w("pub(crate) static ADAPTERS: &[Adapter] = &[")
    for a in adapters:
        if a["doc"]:
            w(f"    // {a['doc']}")
        w("    Adapter {")
        w(f"        name: {rs_str(a['name'])},")
        w(f"        family: {rs_str(a['family'])},")
        w(f"        origin: {rs_str(a['origin'])},")
        w(f"        matches: {rs_cond(a['match'])},")
        if a["templates"] is None:
            w("        templates: None,")
        else:
            w("        templates: Some(&[" + ", ".join(f"({rs_cond(c)}, {rs_str(t)})" for c, t in a["templates"]) + "]),")
        w("    },")
    w("];")
    return "\n".join(L) + "\n"


if __name__ == "__main__":
    main()
