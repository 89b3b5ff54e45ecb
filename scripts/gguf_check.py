#!/usr/bin/env python3
"""Compare llmfs's GGUF files with what llama.cpp's convert_hf_to_gguf.py writes.

Makes tiny llama-, mistral- (two tokenizer layouts), qwen2- and qwen3-style models (transformers, random weights, two
layers; and a four-layer llama 256 wide, for real K-quants) with real-format tokenizers (a byte-level BPE trained with `tokenizers`, Llama-3 and
Qwen2 pre-tokenizer regexes; a SentencePiece model trained with `sentencepiece`), runs the
converter vendored in llama-cpp-python 0.3.36's sdist, runs llmfs's writer on the same
directories, and compares with gguf-py's GGUFReader: every key-value (type and value), every
tensor info (name, shape, type, offset), the data of every F16/BF16 file byte for byte (and the
whole file). Prints a table; exits non-zero on any difference.

    python3 scripts/gguf_check.py all WORK --llama-cpp DIR --writer 'target/release/examples/gguf_write'
    python3 scripts/gguf_check.py make WORK --llama-cpp DIR     # models + converter outputs only
    python3 scripts/gguf_check.py compare WORK                   # after writing WORK/*/llmfs-TYPE.gguf
    python3 scripts/gguf_check.py quantized|transformers|llamacpp|llamaquant WORK
    python3 scripts/gguf_check.py finetune WORK BASE OUT          # a fine-tune of WORK/BASE in WORK/OUT
    python3 scripts/gguf_check.py entries WORK MOUNT ENTRY...      # every GGUF file of mounted entries

DIR is the sdist's vendor/llama.cpp (`pip download --no-binary :all: --no-deps
llama-cpp-python==0.3.36`, unpacked), or $LLMFS_LLAMA_CPP. Needs torch, transformers, tokenizers,
sentencepiece and gguf (0.19) importable. F16, BF16 and Q8_0 files are compared with the
converter's byte for byte. Q4_0 / Q4_K_M: `quantized` checks them with gguf-py, and
`llamaquant` (llama-cpp-python importable) against llama.cpp's own quantizer,
llama_model_quantize, run on llmfs's F16 file: every tensor's type and bytes, and the whole
file. `transformers` loads the F16, Q8_0 and Q4_K_M files with transformers' gguf_file and
compares logits; `llamacpp` does the same with llama.cpp; `entries` checks every GGUF file of
mounted entries (a delta, a merge) against their mounted model.safetensors.

The converter is run with three stand-ins, each a property of this harness, not of llmfs:
`gguf.LazyChunkedTensor` (referenced by the converter, missing from its gguf-py's exports);
`get_vocab_base_pre` returns the pre-tokenizer name the model was built with (the converter knows
pre-tokenizers by the hash of a test string's ids, which a freshly trained vocabulary cannot
match); `Metadata.apply_metadata_heuristic` is a no-op (the name-from-directory heuristics
llmfs does not reproduce: llmfs writes general.name as given, here the model's directory name).
"""

import argparse
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

TYPES_FULL = ["F16", "BF16", "Q8_0"]  # compared byte for byte (the converter quantizes Q8_0 itself)
TYPES_HEADER = []  # compared by header (KVs, tensor infos)
TYPES_QUANTIZE = ["Q4_0", "Q4_K_M"]  # llama-quantize on the converter's F16 file, compared by header
MODELS = ["tiny-llama", "tiny-mistral", "tiny-mistral-hf", "tiny-qwen2", "tiny-qwen3", "tiny-llama-256"]
# tiny-llama-256: rows of 256 and 512 (F16, four layers), so llama-quantize's Q4_K_M uses real
# K-quants (Q4_K, Q6_K) rather than the fallbacks the 64-wide models get.
# LLMFS_GGUF_MODELS=A,B: only these (tests/gguf_mount.rs's run on an object store).
if os.environ.get("LLMFS_GGUF_MODELS"):
    MODELS = [m for m in MODELS if m in os.environ["LLMFS_GGUF_MODELS"].split(",")]

LLAMA3_REGEX = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
QWEN2_REGEX = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"


def corpus():
    words = ("the quick brown fox jumps over a lazy dog while llamas and qwens read weights "
             "from files 0123456789 héllo wörld ça va 你好 世界 — tabs\tand\nnewlines, punctuation!?").split(" ")
    lines = []
    for i in range(400):
        lines.append(" ".join(words[(i * 7 + k * 3) % len(words)] for k in range(12)))
    return lines


def bpe_tokenizer(regex, specials, bos):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(ignore_merges=True, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(regex), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus(), trainer)
    if bos:
        bos_id = tok.token_to_id(bos)
        tok.post_processor = processors.Sequence([
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B:1", special_tokens=[(bos, bos_id)]),
        ])
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.add_tokens(["<custom_word>"])  # a user-defined (non-special) added token
    return tok


def save_model(model_cls, config, out, dtype):
    import torch

    torch.manual_seed(0)
    model = model_cls(config).to(dtype)
    model.save_pretrained(out, safe_serialization=True)


def make_llama(d: Path, wide: bool = False):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = bpe_tokenizer(LLAMA3_REGEX, ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"], "<|begin_of_text|>")
    n = tok.get_vocab_size()
    hidden, inter, layers = (256, 512, 4) if wide else (64, 96, 2)
    cfg = LlamaConfig(vocab_size=n + 6, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      rms_norm_eps=1e-5, bos_token_id=0, eos_token_id=1,
                      rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                    "high_freq_factor": 4.0, "original_max_position_embeddings": 128},
                      rope_theta=500000.0)
    save_model(LlamaForCausalLM, cfg, d, torch.float16 if wide else torch.bfloat16)
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>",
        "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 256,
        "chat_template": "{% for m in messages %}<|begin_of_text|>{{ m['role'] }}: {{ m['content'] }}<|eot_id|>{% endfor %}",
    }))
    (d / "generation_config.json").write_text(json.dumps({"bos_token_id": 0, "eos_token_id": [1, 2],
                                                          "do_sample": True, "temperature": 0.6, "top_p": 0.9}))
    return "llama-bpe"


def make_qwen(d: Path, qwen3: bool):
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

    tok = bpe_tokenizer(QWEN2_REGEX, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], None)
    n = tok.get_vocab_size()
    common = dict(vocab_size=n + 3, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  rms_norm_eps=1e-6, tie_word_embeddings=True, rope_theta=1000000.0)
    if qwen3:
        save_model(Qwen3ForCausalLM, Qwen3Config(head_dim=32, **common), d, torch.float32)
    else:
        save_model(Qwen2ForCausalLM, Qwen2Config(**common), d, torch.float16)
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
        "add_prefix_space": False, "tokenizer_class": "PreTrainedTokenizerFast",
        "chat_template": "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}",
    }))
    return "qwen2"


def make_mistral(d: Path):
    import sentencepiece as spm
    import torch
    from transformers import MistralConfig, MistralForCausalLM

    text = d / "corpus.txt"
    text.write_text("\n".join(corpus()))
    spm.SentencePieceTrainer.train(input=str(text), model_prefix=str(d / "tokenizer"), vocab_size=400,
                                   model_type="bpe", byte_fallback=True, user_defined_symbols=["<custom_word>"],
                                   control_symbols=["[INST]", "[/INST]"], bos_id=1, eos_id=2, unk_id=0,
                                   character_coverage=1.0, minloglevel=2)
    text.unlink()
    (d / "tokenizer.vocab").unlink()
    sp = spm.SentencePieceProcessor(model_file=str(d / "tokenizer.model"))
    cfg = MistralConfig(vocab_size=sp.vocab_size() + 4, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=1024,
                        rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, sliding_window=None)
    save_model(MistralForCausalLM, cfg, d, torch.float32)
    (d / "tokenizer_config.json").write_text(json.dumps({
        "add_bos_token": True, "add_eos_token": False,
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "tokenizer_class": "LlamaTokenizer",
        "added_tokens_decoder": {
            "0": {"content": "<unk>", "special": True}, "1": {"content": "<s>", "special": True},
            "2": {"content": "</s>", "special": True}, "3": {"content": "[INST]", "special": True},
        },
        "chat_template": "{{ bos_token }}{% for m in messages %}[INST] {{ m['content'] }} [/INST]{% endfor %}",
    }))
    return "default"


def make_mistral_hf(d: Path, src: Path):
    """tiny-mistral's weights and tokenizer.model with the tokenizer files transformers writes
    (tokenizer.json, tokenizer_config.json without added_tokens_decoder, chat_template.jinja)."""
    import shutil

    from transformers import LlamaTokenizer

    for f in ("config.json", "model.safetensors", "tokenizer.model"):
        shutil.copy(src / f, d / f)
    t = LlamaTokenizer(vocab_file=str(src / "tokenizer.model"), legacy=False)
    t.chat_template = "{{ bos_token }}{% for m in messages %}[INST] {{ m.content }} [/INST]{% endfor %}"
    t.save_pretrained(str(d))
    return "default"


def convert_child(llama_cpp: str, model: str, out: str, outtype: str, pre: str, name: str):
    """Runs inside a child process: the vendored converter with the harness's stand-ins."""
    import runpy

    sys.path.insert(0, llama_cpp)
    sys.path.insert(1, str(Path(llama_cpp) / "gguf-py"))
    import gguf

    if not hasattr(gguf, "LazyChunkedTensor"):
        gguf.LazyChunkedTensor = getattr(gguf.lazy, "LazyChunkedTensor", type("LazyChunkedTensor", (), {}))
    gguf.Metadata.apply_metadata_heuristic = staticmethod(lambda metadata, *a, **k: metadata)
    import conversion.base

    conversion.base.TextModel.get_vocab_base_pre = lambda self, tokenizer: pre
    sys.argv = ["convert_hf_to_gguf.py", model, "--outfile", out, "--outtype", outtype, "--model-name", name]
    runpy.run_path(str(Path(llama_cpp) / "convert_hf_to_gguf.py"), run_name="__main__")


def types(work: Path):
    quantized = all((work / f"{m}.converter-{t}.gguf").is_file() for m in MODELS for t in TYPES_QUANTIZE)
    return TYPES_FULL + TYPES_HEADER + (TYPES_QUANTIZE if quantized else [])


def make(work: Path, llama_cpp: str, quantize: str | None):
    work.mkdir(parents=True, exist_ok=True)
    for name in MODELS:
        d = work / name
        d.mkdir(exist_ok=True)
        if name in ("tiny-llama", "tiny-llama-256"):
            pre = make_llama(d, wide=name == "tiny-llama-256")
        elif name == "tiny-mistral":
            pre = make_mistral(d)
        elif name == "tiny-mistral-hf":
            pre = make_mistral_hf(d, work / "tiny-mistral")
        else:
            pre = make_qwen(d, qwen3=name == "tiny-qwen3")
        for t in TYPES_FULL + TYPES_HEADER:
            out = work / f"{name}.converter-{t}.gguf"
            if out.is_file():
                continue
            cmd = [sys.executable, __file__, "_convert", llama_cpp, str(d), str(out), t.lower(), pre, name]
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode != 0:
                sys.stderr.write(r.stdout[-4000:] + r.stderr[-4000:])
                raise SystemExit(f"converter failed on {name} {t}")
        for t in TYPES_QUANTIZE if quantize else []:
            src, out = work / f"{name}.converter-F16.gguf", work / f"{name}.converter-{t}.gguf"
            r = subprocess.run([quantize, str(src), str(out), t], capture_output=True, text=True)
            if r.returncode != 0:
                sys.stderr.write(r.stdout[-4000:] + r.stderr[-4000:])
                raise SystemExit(f"llama-quantize failed on {name} {t}")


def write_ours(work: Path, writer: str):
    for name in MODELS:
        for t in types(work):
            cmd = shlex.split(writer) + [str(work / name), str(work / f"{name}.llmfs-{t}.gguf"), t, name]
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode != 0:
                sys.stderr.write(r.stdout + r.stderr)
                raise SystemExit(f"llmfs writer failed on {name} {t}")


def field_value(f):
    import numpy as np

    v = f.contents()
    if isinstance(v, np.generic):
        v = v.item()
    return ([int(t) for t in f.types], v)


def compare_one(ref_path: Path, our_path: Path, full: bool):
    from gguf import GGUFReader

    problems = []
    ref, ours = GGUFReader(str(ref_path)), GGUFReader(str(our_path))
    rk = {k: field_value(f) for k, f in ref.fields.items() if not k.startswith("GGUF.")}
    ok = {k: field_value(f) for k, f in ours.fields.items() if not k.startswith("GGUF.")}
    if list(rk) != list(ok):
        problems.append(f"key order/set differs: only converter {sorted(set(rk) - set(ok))}, only llmfs {sorted(set(ok) - set(rk))}")
    kv_equal = sum(1 for k in rk if k in ok and rk[k] == ok[k])
    for k in rk:
        if k in ok and rk[k] != ok[k]:
            a, b = repr(rk[k])[:120], repr(ok[k])[:120]
            problems.append(f"{k}: converter {a} llmfs {b}")
    ti_equal = 0
    data_equal = 0
    data_compared = 0
    rt = {t.name: t for t in ref.tensors}
    for t in ours.tensors:
        r = rt.get(t.name)
        if r is None:
            problems.append(f"tensor {t.name} only in llmfs")
            continue
        a = (list(map(int, r.shape)), int(r.tensor_type), int(r.data_offset))
        b = (list(map(int, t.shape)), int(t.tensor_type), int(t.data_offset))
        if a == b:
            ti_equal += 1
        else:
            problems.append(f"tensor {t.name}: converter {a} llmfs {b}")
        if full or int(t.tensor_type) == 0:
            data_compared += 1
            if r.data.tobytes() == t.data.tobytes():
                data_equal += 1
            else:
                problems.append(f"tensor {t.name}: data differs")
    if [t.name for t in ref.tensors] != [t.name for t in ours.tensors]:
        problems.append("tensor order differs")
    same_file = ref_path.read_bytes() == our_path.read_bytes() if full else None
    if full and not same_file:
        problems.append("files differ")
    row = dict(kv=f"{kv_equal}/{len(rk)}", tensors=f"{ti_equal}/{len(rt)}",
               data=f"{data_equal}/{data_compared}" + ("" if full else " F32"),
               file="identical" if same_file else ("-" if not full else "DIFFERENT"))
    return row, problems


def compare(work: Path) -> int:
    bad = 0
    print(f"{'model':<16} {'type':<6} {'KVs equal':>10} {'tensor infos':>13} {'data equal':>12} {'whole file':>11}  result")
    for name in MODELS:
        for t in types(work):
            ref, ours = work / f"{name}.converter-{t}.gguf", work / f"{name}.llmfs-{t}.gguf"
            row, problems = compare_one(ref, ours, t in TYPES_FULL)
            result = "ok" if not problems else "DIFF"
            bad += bool(problems)
            print(f"{name:<16} {t:<6} {row['kv']:>10} {row['tensors']:>13} {row['data']:>12} {row['file']:>11}  {result}")
            for p in problems[:12]:
                print(f"    {p}")
    print("all equal" if not bad else f"{bad} file(s) differ")
    return 1 if bad else 0


def quantized(work: Path) -> int:
    """llmfs's Q4_0 and Q4_K_M files (no llama-quantize to compare with here): they parse with
    gguf-py, hold the F16 file's key-values but the file type, and each tensor dequantizes
    (gguf-py's own dequantizers) to the F16 file's values within 4-bit error; Q4_0 tensors are
    the bytes gguf-py's numpy quantizer makes of the same values (it matches ggml on finite data).
    """
    import numpy as np
    from gguf import GGUFReader, GGMLQuantizationType as Q
    from gguf.quants import dequantize, quantize

    bad = 0
    print(f"{'model':<16} {'type':<7} {'tensors':>8} {'max rel err':>12} {'types':<30} result")
    for name in MODELS:
        f16 = GGUFReader(str(work / f"{name}.llmfs-F16.gguf"))
        ref = {t.name: dequantize(t.data, t.tensor_type).astype(np.float32) for t in f16.tensors}
        fk = {k: field_value(f) for k, f in f16.fields.items() if not k.startswith("GGUF.")}
        for t in ["Q4_0", "Q4_K_M"]:
            path = work / f"{name}.llmfs-{t}.gguf"
            r = GGUFReader(str(path))
            problems = []
            qk = {k: field_value(f) for k, f in r.fields.items() if not k.startswith("GGUF.")}
            for k in fk:
                if k in ("general.file_type",):
                    continue
                if k not in qk or qk[k] != fk[k]:
                    problems.append(f"{k} differs from the F16 file")
            worst, kinds = 0.0, set()
            for q in r.tensors:
                kinds.add(q.tensor_type.name)
                want = ref[q.name].reshape(-1)
                got = dequantize(q.data, q.tensor_type).astype(np.float32).reshape(-1)
                if got.shape != want.shape:
                    problems.append(f"{q.name}: shape {got.shape} vs {want.shape}")
                    continue
                err = float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))
                worst = max(worst, err)
                if err > 0.25:
                    problems.append(f"{q.name}: relative error {err:.3f}")
                if q.tensor_type == Q.Q4_0:
                    rows = want.reshape(-1, int(q.shape[0]))
                    if quantize(rows, Q.Q4_0).tobytes() != q.data.tobytes():
                        problems.append(f"{q.name}: Q4_0 bytes differ from gguf-py's quantization")
            bad += bool(problems)
            print(f"{name:<16} {t:<7} {len(r.tensors):>8} {worst:>12.4f} {','.join(sorted(kinds)):<30} {'ok' if not problems else 'BAD'}")
            for p in problems[:8]:
                print(f"    {p}")
    return 1 if bad else 0


def llamacpp(work: Path) -> int:
    """llama.cpp itself (llama-cpp-python) opens llmfs's files by mmap, tokenizes as the model's
    HF tokenizer does, and gives transformers' logits (F16 within f16 rounding, Q8_0 and Q4_K_M
    within quantization error)."""
    import numpy as np
    import torch
    from llama_cpp import Llama
    from transformers import AutoModelForCausalLM, AutoTokenizer

    text = "the quick brown fox jumps over a lazy dog"
    bounds = {"F16": 0.02, "Q8_0": 0.05, "Q4_K_M": 0.35}
    bad = 0
    print(f"{'model':<16} {'type':<7} {'tokens':>7} {'logits rel err':>15} result")
    for name in [m for m in ["tiny-llama", "tiny-qwen2", "tiny-llama-256"] if m in MODELS]:
        hf = AutoModelForCausalLM.from_pretrained(str(work / name), dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(str(work / name))
        ids = tok(text, add_special_tokens=True)["input_ids"]
        with torch.no_grad():
            want = hf(torch.tensor([ids])).logits[0, -1].numpy()
        for t, bound in bounds.items():
            llm = Llama(model_path=str(work / f"{name}.llmfs-{t}.gguf"), n_ctx=64, logits_all=True,
                        verbose=False, use_mmap=True, n_threads=2)
            got_ids = llm.tokenize(text.encode(), add_bos=True, special=False)
            llm.eval(got_ids)
            got = np.array(llm.scores[len(got_ids) - 1], dtype=np.float32)
            err = float(np.linalg.norm(got - want) / np.linalg.norm(want))
            same = got_ids == ids
            ok = same and err <= bound
            bad += not ok
            print(f"{name:<16} {t:<7} {'same' if same else 'DIFF':>7} {err:>15.5f} {'ok' if ok else 'BAD'}")
            if not same:
                print(f"    llama.cpp {got_ids} transformers {ids}")
            del llm
    return 1 if bad else 0


# transformers' GGUF loader (transformers 5) builds the config from the GGUF's key-values but
# skips two things these models need: Llama 3's rope scaling (llama.cpp keeps it as the
# rope_freqs tensor, which transformers does not read) and qwen3's head_dim (it maps no
# attention.key_length for qwen3). For those models the config comes from the model's
# directory; the weights always come from the GGUF file.
TRANSFORMERS_CONFIG_FROM_DIR = {
    "tiny-llama": "transformers does not read rope_freqs (Llama 3 rope scaling)",
    "tiny-llama-256": "transformers does not read rope_freqs (Llama 3 rope scaling)",
    "tiny-qwen3": "transformers maps no qwen3 attention.key_length (head_dim 32, not 64/4)",
}
TEST_IDS = [5, 17, 42, 99, 3, 250, 7, 64, 128, 11, 200, 31]


def transformers_check(work: Path) -> int:
    """transformers' `from_pretrained(DIR, gguf_file=...)` loads llmfs's F16, Q8_0 and Q4_K_M
    files (it dequantizes them with gguf-py) and gives the safetensors model's logits: the F16
    file within f32 arithmetic of the safetensors model with its weights rounded to f16, and
    within f16 rounding of the model itself; Q8_0 and Q4_K_M within quantization error. Every
    position's logits of a fixed id sequence are compared (relative L2 error)."""
    import numpy as np
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.utils import logging as tlog

    tlog.set_verbosity_error()
    tlog.disable_progress_bar()
    # Bounds: F16 against the f16-rounded model (only the order of f32 operations differs);
    # F16 against the model itself (f16 rounding of f32/bf16 weights); quantized against the model.
    bounds = {"F16": (1e-5, 2e-3), "Q8_0": (None, 0.03), "Q4_K_M": (None, 0.25)}
    ids = torch.tensor([TEST_IDS])
    bad = 0
    print(f"{'model':<16} {'type':<7} {'config':<7} {'vs f16-rounded':>15} {'vs model':>10} result")
    for name in MODELS:
        model_dir = work / name
        with torch.no_grad():
            hf = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
            want = hf(ids).logits[0].numpy()
            for p in hf.parameters():
                p.copy_(p.half().float())
            want16 = hf(ids).logits[0].numpy()
        del hf
        why = TRANSFORMERS_CONFIG_FROM_DIR.get(name)
        kw = {"config": AutoConfig.from_pretrained(str(model_dir))} if why else {}
        for t, (b16, bound) in bounds.items():
            try:
                m = AutoModelForCausalLM.from_pretrained(str(work), gguf_file=f"{name}.llmfs-{t}.gguf",
                                                         dtype=torch.float32, **kw)
                with torch.no_grad():
                    got = m(ids).logits[0].numpy()
            except Exception as e:  # noqa: BLE001 - reported as a failure of this file
                bad += 1
                print(f"{name:<16} {t:<7} {'dir' if why else 'gguf':<7} {'-':>15} {'-':>10} BAD: {e!r:.300}")
                continue
            e16 = float(np.linalg.norm(got - want16) / np.linalg.norm(want16))
            err = float(np.linalg.norm(got - want) / np.linalg.norm(want))
            ok = err <= bound and (b16 is None or e16 <= b16)
            bad += not ok
            print(f"{name:<16} {t:<7} {'dir' if why else 'gguf':<7} {e16:>15.2e} {err:>10.2e} {'ok' if ok else 'BAD'}")
            del m
        if why:
            print(f"    {name}: config from the directory: {why}")
    return 1 if bad else 0


LLAMA_FTYPES = {"Q8_0": 7, "Q4_0": 2, "Q4_K_M": 15}


def llama_quantize(src: Path, out: Path, t: str):
    """llama.cpp's own quantizer (llama_model_quantize, as llama-quantize runs it; no imatrix)."""
    import ctypes

    import llama_cpp

    p = llama_cpp.llama_model_quantize_default_params()
    p.ftype = LLAMA_FTYPES[t]
    p.nthread = 2
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(out).encode(), ctypes.byref(p))
    if rc != 0:
        raise SystemExit(f"llama_model_quantize {src} -> {t} failed ({rc})")


def compare_with_llama_quantize(f16: Path, ours: Path, out: Path, t: str):
    """Quantizes the F16 file with llama.cpp and compares it with `ours` tensor by tensor:
    (tensors, same type, same bytes, whole file identical, problems, types seen)."""
    from gguf import GGUFReader

    llama_quantize(f16, out, t)
    ref, mine = GGUFReader(str(out)), GGUFReader(str(ours))
    mt = {x.name: x for x in mine.tensors}
    problems, same_type, same_bytes, kinds = [], 0, 0, {}
    for r in ref.tensors:
        m = mt.get(r.name)
        if m is None:
            problems.append(f"{r.name}: not in llmfs's file")
            continue
        kinds[r.tensor_type.name] = kinds.get(r.tensor_type.name, 0) + 1
        if r.tensor_type == m.tensor_type:
            same_type += 1
        else:
            problems.append(f"{r.name}: llama.cpp {r.tensor_type.name}, llmfs {m.tensor_type.name}")
        if r.data.tobytes() == m.data.tobytes():
            same_bytes += 1
        else:
            problems.append(f"{r.name}: bytes differ")
    if len(mt) != len(ref.tensors):
        problems.append(f"{len(mt)} tensors in llmfs's file, {len(ref.tensors)} in llama.cpp's")
    identical = out.read_bytes() == ours.read_bytes()
    out.unlink()
    return len(ref.tensors), same_type, same_bytes, identical, problems, kinds


def llamaquant(work: Path) -> int:
    """llama.cpp's quantizer on the mounted F16 file against the mounted Q8_0, Q4_0 and Q4_K_M
    files, tensor by tensor: the same type and the same bytes for every tensor. Q4_0 and
    Q4_K_M are llama-quantize's output by design, so the whole file must be identical too; the
    Q8_0 file is the converter's (`--outtype q8_0`), whose header orders keys and tensors as
    the converter does, so only its tensors are compared (and, on F16 weights, equal)."""
    bad = 0
    print(f"{'model':<16} {'type':<7} {'same type':>10} {'same bytes':>11} {'whole file':>11}  types")
    for name in MODELS:
        for t in LLAMA_FTYPES:
            n, st, sb, identical, problems, kinds = compare_with_llama_quantize(
                work / f"{name}.llmfs-F16.gguf", work / f"{name}.llmfs-{t}.gguf",
                work / f"{name}.llamaquant-{t}.gguf", t)
            # Q8_0 of f32 weights (tiny-mistral*, tiny-qwen3): the converter quantizes the f32
            # values, llama-quantize the F16 file's f16-rounded ones, so blocks differ there (by
            # design of the two tools); of f16 and bf16 weights (exact in f16 here) they agree.
            tensors_must_match = t != "Q8_0" or name in ("tiny-llama", "tiny-qwen2", "tiny-llama-256")
            ok = st == n and (sb == n or not tensors_must_match) and (identical or t == "Q8_0")
            bad += not ok
            kinds_s = ",".join(f"{k}:{v}" for k, v in sorted(kinds.items()))
            print(f"{name:<16} {t:<7} {st:>4}/{n:<5} {sb:>5}/{n:<5} {'identical' if identical else 'differs':>11}"
                  f"  {kinds_s} {'ok' if ok else 'BAD'}")
            for p in problems[:6] if not ok or t == "Q8_0" else []:
                print(f"    {p}")
    return 1 if bad else 0


def finetune(work: Path, base: str, out: str):
    """A fine-tune of `base` (every weight matrix nudged, norms kept) for the delta and merge
    entries: WORK/OUT, the base's other files copied."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    src, dst = work / base, work / out
    dst.mkdir(exist_ok=True)
    for f in src.iterdir():
        if f.is_file() and f.name != "model.safetensors":
            shutil.copy(f, dst / f.name)
    g = torch.Generator().manual_seed(1)
    ts = load_file(str(src / "model.safetensors"))
    for k, v in ts.items():
        if v.dim() == 2:
            ts[k] = (v.float() + 0.01 * torch.randn(v.shape, generator=g)).to(v.dtype)
    save_file(ts, str(dst / "model.safetensors"), metadata={"format": "pt"})


def expected_tensors(st_path: Path, arch: str, n_head: int, n_kv: int, n_layer: int):
    """The GGUF tensors the converter makes of a safetensors file: GGUF name -> (f32 values in
    ggml row order, whether the converter keeps it F32)."""
    import gguf
    import numpy as np
    from safetensors.torch import load_file

    names = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, arch.upper()), n_layer)
    out = {}
    for k, v in load_file(str(st_path)).items():
        a = v.float().numpy()
        new = names.get_name(k, try_suffixes=(".weight", ".bias"))
        if new is None:
            raise SystemExit(f"{st_path}: no GGUF name for {k}")
        if arch == "llama" and (k.endswith("q_proj.weight") or k.endswith("k_proj.weight")):
            h = n_head if k.endswith("q_proj.weight") else n_kv
            a = a.reshape(h, 2, a.shape[0] // h // 2, *a.shape[1:]).swapaxes(1, 2).reshape(a.shape)
        out[new] = (np.ascontiguousarray(a), a.ndim <= 1 or new.endswith("_norm.weight"))
    return out


def entries(work: Path, mount: Path, names: list[str]) -> int:
    """gguf-py's GGUFReader reads every GGUF file of the entries `names` (a base, a delta, a
    merge ...) at MOUNT, and each tensor holds what the converter (and llama-quantize) would
    make of the entry's model.safetensors as the same mount serves it: F32 tensors equal, F16
    and BF16 the round-to-nearest-even casts, Q8_0/Q4_0/Q5_0 blocks equal gguf-py's quantizer
    (of the f16-rounded values for the llama-quantize types), and K-quant blocks (which gguf-py
    cannot make) dequantizing within 4-bit (Q4_K) / 6-bit (Q6_K) error; with llama_cpp
    importable, each entry's Q4_0 and Q4_K_M files are also identical to llama.cpp's
    quantization of its F16 file."""
    import numpy as np
    from gguf import GGMLQuantizationType as Q
    from gguf import GGUFReader
    from gguf.quants import dequantize, quantize

    try:
        import llama_cpp  # noqa: F401

        with_llama = True
    except ImportError:
        with_llama = False
    k_bounds = {Q.Q4_K: 0.12, Q.Q6_K: 0.03}
    bad = 0
    print(f"{'entry':<22} {'type':<7} {'tensors':>8} {'exact':>6} {'K-quant max err':>16} result")
    for entry in names:
        cfg = json.loads((mount / entry / "config.json").read_text())
        arch = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "llama",
                "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3"}[cfg["architectures"][0]]
        want = expected_tensors(mount / entry / "model.safetensors", arch, cfg["num_attention_heads"],
                                cfg.get("num_key_value_heads", cfg["num_attention_heads"]), cfg["num_hidden_layers"])
        rope = None
        for t in ["F16", "BF16", "Q8_0", "Q4_0", "Q4_K_M"]:
            r = GGUFReader(str(mount / entry / "gguf" / f"{entry}-{t}.gguf"))
            problems, exact, worst = [], 0, 0.0
            for g in r.tensors:
                data = g.data
                if g.name == "rope_freqs.weight":
                    # Computed by the plan (Llama 3 rope scaling): the same in every file.
                    rope = data.tobytes() if rope is None else rope
                    exact += rope == data.tobytes()
                    continue
                if g.name not in want:
                    problems.append(f"{g.name}: not in the safetensors")
                    continue
                v, keep_f32 = want[g.name]
                ty = g.tensor_type
                rows = v.reshape(-1, v.shape[-1]) if v.ndim > 1 else v.reshape(1, -1)
                through_f16 = t in ("Q4_0", "Q4_K_M")
                vq = rows.astype(np.float16).astype(np.float32) if through_f16 else rows
                if keep_f32 != (ty == Q.F32):
                    problems.append(f"{g.name}: {ty.name}")
                if ty == Q.F32:
                    expect = rows.astype(np.float32).tobytes()
                elif ty == Q.F16:
                    expect = rows.astype(np.float16).tobytes()
                elif ty in (Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q5_0, Q.Q5_1, Q.Q4_1):
                    expect = quantize(vq, ty).tobytes()
                else:
                    expect = None
                if expect is not None:
                    if data.tobytes() == expect:
                        exact += 1
                    else:
                        problems.append(f"{g.name} ({ty.name}): bytes differ from the expected")
                    continue
                got = dequantize(data, ty).astype(np.float32).reshape(rows.shape)
                err = float(np.linalg.norm(got - vq) / max(np.linalg.norm(vq), 1e-30))
                worst = max(worst, err)
                if err > k_bounds.get(ty, 0.0):
                    problems.append(f"{g.name} ({ty.name}): relative error {err:.4f}")
            missing = set(want) - {g.name for g in r.tensors}
            if missing:
                problems.append(f"missing {sorted(missing)[:4]}")
            if with_llama and t in ("Q4_0", "Q4_K_M"):
                n, st, sb, identical, p2, _ = compare_with_llama_quantize(
                    mount / entry / "gguf" / f"{entry}-F16.gguf", mount / entry / "gguf" / f"{entry}-{t}.gguf",
                    work / f"{entry}.llamaquant-{t}.gguf", t)
                if not identical:
                    problems.append(f"not llama.cpp's quantization of the F16 file: {st}/{n} types, {sb}/{n} bytes")
                    problems += p2[:4]
            bad += bool(problems)
            print(f"{entry:<22} {t:<7} {len(r.tensors):>8} {exact:>6} {worst:>16.4f} "
                  f"{'ok' if not problems else 'BAD'}{' (= llama.cpp)' if with_llama and t in ('Q4_0', 'Q4_K_M') and not problems else ''}")
            for p in problems[:8]:
                print(f"    {p}")
    return 1 if bad else 0


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "_convert":
        convert_child(*sys.argv[2:8])
        return 0
    if len(sys.argv) > 1 and sys.argv[1] == "finetune":  # finetune WORK BASE OUT
        finetune(Path(sys.argv[2]), sys.argv[3], sys.argv[4])
        return 0
    if len(sys.argv) > 1 and sys.argv[1] == "entries":  # entries WORK MOUNT ENTRY...
        return entries(Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4:])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("cmd", choices=["all", "make", "compare", "quantized", "llamacpp", "transformers", "llamaquant"])
    ap.add_argument("work", type=Path)
    ap.add_argument("--llama-cpp", default=os.environ.get("LLMFS_LLAMA_CPP"))
    ap.add_argument("--llama-quantize", default=os.environ.get("LLMFS_LLAMA_QUANTIZE"),
                    help="llama-quantize built from the same llama.cpp: adds Q4_0 and Q4_K_M (headers)")
    ap.add_argument("--writer", default="target/release/examples/gguf_write")
    a = ap.parse_args()
    if a.cmd in ("all", "make"):
        if not a.llama_cpp or not (Path(a.llama_cpp) / "convert_hf_to_gguf.py").is_file():
            print("SKIPPED: no llama.cpp source (--llama-cpp DIR or $LLMFS_LLAMA_CPP: llama-cpp-python 0.3.36's vendor/llama.cpp)")
            return 0
        make(a.work, a.llama_cpp, a.llama_quantize)
    if a.cmd == "all":
        write_ours(a.work, a.writer)
    if a.cmd in ("all", "compare"):
        return compare(a.work)
    if a.cmd == "quantized":
        return quantized(a.work)
    if a.cmd == "llamacpp":
        return llamacpp(a.work)
    if a.cmd == "transformers":
        return transformers_check(a.work)
    if a.cmd == "llamaquant":
        return llamaquant(a.work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
