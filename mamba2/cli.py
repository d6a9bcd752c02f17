"""The ``mamba2`` command: ``train``, ``generate``, ``eval``, ``convert`` and ``serve`` subcommands
(``mamba2 <command> --help``)."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, NoReturn, Sequence

from mamba2.errors import (UserError, interrupt_for, interrupted_status, interrupts_seen, last_interrupt,
                           recording_interrupt)
from mamba2.interop.formats import DTYPE_NAMES

DEFAULT_PRESET = "small"
DEFAULT_OUT = "runs/demo"
DEFAULT_PROMPT = "def "
DEFAULT_SAMPLE_TOKENS = 300

EPILOG_TRAIN = """\
examples:
  mamba2 train                                  # demo: ~3 min on 2 CPU cores, then prints a sample
  mamba2 train --resume --steps 2000            # continue that run to step 2000 (same data order)
  mamba2 train --corpus notes/ --out runs/notes --preset tiny --steps 300
  mamba2 train --corpus data.jsonl --tokenizer tokenizer.json --preset 130m --config overrides.json

Corpus formats: a folder (every UTF-8 text file below it; binary files skipped), a .jsonl file (one document
per line, in its "text" field), any other text file (one document), or "stdlib" (this Python's standard
library source, tests excluded). About 2% of the documents (chosen by a hash of their names) are held out
for evaluation. Checkpoints are written atomically to --out, with a loss curve (loss_curve.png).
"""

EPILOG_SERVE = """\
examples:
  mamba2 serve --checkpoint runs/demo --port 8000
  curl -s localhost:8000/v1/completions -H 'Content-Type: application/json' \\
       -d '{"prompt": "def ", "max_tokens": 50, "temperature": 0}'
"""


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors, like every other mamba2 error."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def _positive_int(s: str) -> int:
    v = int(s)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be ≥ 1, got {v}")
    return v


def _nonneg_int(s: str) -> int:
    v = int(s)
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be ≥ 0, got {v}")
    return v


def _top_k(s: str) -> int:
    """--top-k: k ≥ 1, or 0 / -1 (vLLM's and the server's "off") for no cut (SamplingParams reads -1 as 0)."""
    v = int(s)
    if v < -1:
        raise argparse.ArgumentTypeError(f"must be ≥ 1, or 0 or -1 for off, got {v}")
    return v


def _port(s: str) -> int:
    v = int(s)
    if not 0 <= v <= 65535:
        raise argparse.ArgumentTypeError(f"must be in [0, 65535], got {v}")
    return v


_positive_int.__name__ = "positive integer"  # argparse names the type in "invalid <type> value: 'x'"
_nonneg_int.__name__ = "non-negative integer"
_port.__name__ = "port number"
_top_k.__name__ = "integer"


def build_parser() -> argparse.ArgumentParser:
    from mamba2.train_config import TRAIN_DTYPES, TrainConfig

    d = TrainConfig()
    parser = _Parser(prog="mamba2", description="Mamba-2 language models from scratch: train, generate, evaluate.",
                     epilog="Run 'mamba2 <command> --help' for the options of each command.")
    from mamba2 import __version__
    parser.add_argument("--version", action="version", version=f"mamba2 {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="{train,generate,eval,convert,serve,experiment}", required=True)
    fmt = argparse.RawDescriptionHelpFormatter

    t = sub.add_parser("train", help="train a model (or continue one with --resume)", epilog=EPILOG_TRAIN,
                       formatter_class=fmt, description="Train a Mamba-2 language model on a text corpus.")
    t.add_argument("--corpus", help="text file, folder, .jsonl file or 'stdlib' (default: stdlib; with --resume: "
                                    "the run's corpus)")
    t.add_argument("--preset", help=f"model size: tiny, small, base-cpu, 130m, 370m, 780m, 1.3b, 2.7b "
                                    f"(default: {DEFAULT_PRESET}, ~0.5M parameters, fits the 3-minute demo)")
    t.add_argument("--arch", choices=["mamba2", "mamba1", "transformer++", "hybrid"],
                   help="architecture built at that size: mamba2, mamba1, transformer++ (attention + SwiGLU, "
                        "half the preset's layers) or hybrid (Mamba-2 with ~10%% attention layers) (default: mamba2)")
    t.add_argument("--layout", help="explicit layer layout, e.g. 'mamba2*3,attention+mlp' (kinds: mamba2, mamba1, "
                                    "attention; '+mlp' adds a SwiGLU MLP, which needs --d-intermediate)")
    t.add_argument("--d-intermediate", type=_positive_int, help="hidden size of the SwiGLU MLPs (default: none)")
    t.add_argument("--config", metavar="JSON", help="JSON file of Mamba2Config fields overriding the preset, "
                                                    'e.g. {"n_layer": 6, "d_state": 64}')
    t.add_argument("--tokenizer", help="'bytes' (256 UTF-8 byte tokens) or a tokenizer.json path "
                                       "(default: bytes); the model's vocab_size follows it unless --config sets it")
    t.add_argument("--seq-len", type=_positive_int, help=f"tokens per training row (default: {d.seq_len})")
    t.add_argument("--batch-size", type=_positive_int, help=f"rows per batch (default: {d.batch_size})")
    t.add_argument("--steps", type=_positive_int,
                   help=f"total optimizer steps (default: {d.steps}); with --resume, another value moves the end "
                        "of the run: the learning rate goes on from its current value and decays by cosine to the "
                        "new end (no jump, warmup is not repeated)")
    t.add_argument("--lr", type=float, help=f"peak learning rate of AdamW (default: {d.lr:g})")
    t.add_argument("--warmup", type=_nonneg_int, help=f"linear warmup steps before cosine decay (default: {d.warmup})")
    t.add_argument("--grad-accum", type=_positive_int, help=f"batches per optimizer step (default: {d.grad_accum})")
    t.add_argument("--eval-every", type=_nonneg_int,
                   help=f"held-out evaluation every N steps, 0 = only at the start and the end "
                        f"(default: {d.eval_every})")
    t.add_argument("--keep-best", action=argparse.BooleanOptionalAction,
                   help="also save the model of the evaluation with the lowest held-out loss so far to "
                        "<out>/best (a model directory for generate/eval; needs --eval-every > 0) (default: on)")
    t.add_argument("--save-every", type=_nonneg_int,
                   help=f"checkpoint every N steps, 0 = only at the end (default: {d.save_every})")
    t.add_argument("--max-minutes", type=float, help="stop after this many minutes of training, then evaluate, "
                                                      "save and sample (default: no limit; this invocation only, "
                                                      "a later --resume is not limited unless it says so)")
    t.add_argument("--seed", type=int, help=f"seed of the initial weights and data order (default: {d.seed})")
    t.add_argument("--out", default=DEFAULT_OUT, help=f"checkpoint directory (default: {DEFAULT_OUT})")
    t.add_argument("--resume", action="store_true", help="continue the run saved in --out (its settings are "
                                                         "kept unless given again; --steps can extend it)")
    t.add_argument("--overwrite", action="store_true", help="replace an existing checkpoint in --out")
    t.add_argument("--size-check", action=argparse.BooleanOptionalAction, default=True,
                   help="estimate peak memory and step time before training and refuse a run that cannot fit in "
                        "this machine's memory (default: on)")
    t.add_argument("--init-from", metavar="DIR",
                   help="fine-tune: start from the config, weights and tokenizer of a model directory (ours, "
                        "official mamba_ssm or transformers; download hub models first), with fine-tuning "
                        f"defaults --lr {FINETUNE_DEFAULTS['lr']:g} --warmup {FINETUNE_DEFAULTS['warmup']} "
                        "unless given")
    t.add_argument("--lora-rank", type=_positive_int,
                   help="with --init-from: train low-rank adapters of this rank (through peft) instead of every "
                        "weight; checkpoints hold the merged weights; fine-tuning default --lr "
                        f"{LORA_DEFAULTS['lr']:g} (default: off, every weight trains)")
    t.add_argument("--lora-alpha", type=float, help="LoRA scale numerator: adapters are scaled by alpha/rank "
                                                    "(default: 2 x rank)")
    t.add_argument("--lora-targets", metavar="NAMES",
                   help="comma-separated names of the linear layers that get adapters (default: in_proj,out_proj)")
    t.add_argument("--lora-dropout", type=float, help="dropout on the adapters' input (default: 0)")
    t.add_argument("--save-adapter", action="store_true",
                   help="also write the adapter alone in peft's format to <out>/adapter at each save")
    t.add_argument("--tensorboard", nargs="?", const="", metavar="DIR",
                   help="also log the metrics to TensorBoard (needs the tensorboard package) in DIR (default: "
                        "<folder of --out>/tensorboard/<name of --out>, e.g. runs/tensorboard/demo for --out "
                        "runs/demo, so 'tensorboard --logdir runs/tensorboard' compares runs; a --resume keeps "
                        "the run's folder)")
    t.add_argument("--export", action="append", choices=["official", "hf"], metavar="FORMAT",
                   help="also write the final model as <out>-official (mamba_ssm) or <out>-hf (transformers); "
                        "repeatable; a --resume repeats the run's exports unless given again")
    t.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda if available, else cpu)")
    t.add_argument("--dtype", choices=TRAIN_DTYPES,
                   help="compute dtype under autocast (weights and optimizer stay float32): auto = bfloat16 on "
                        "CUDA, float32 on CPU; float16 adds loss scaling (default: auto)")
    t.add_argument("--tp", type=_positive_int, default=1,
                   help="tensor-parallel ranks: Mamba-2 heads split over them (launch with torchrun; default: 1)")
    t.add_argument("--cp", type=_positive_int, default=1,
                   help="context-parallel ranks: each row's tokens split over them, states passed between them "
                        "(launch with torchrun; default: 1). The other torchrun ranks are data parallel (FSDP2)")
    t.add_argument("--sample", action=argparse.BooleanOptionalAction,
                   help="print text generated from --prompt after training (default: on; a --resume keeps the "
                        "run's choice, as it keeps --prompt and --sample-tokens)")
    t.add_argument("--prompt", help=f"prompt of that sample (default: {DEFAULT_PROMPT!r})")
    t.add_argument("--sample-tokens", type=_nonneg_int,
                   help=f"new tokens in that sample (default: {DEFAULT_SAMPLE_TOKENS})")
    t.set_defaults(func=cmd_train)

    g = sub.add_parser("generate", help="continue prompts with a trained model", formatter_class=fmt,
                       description="Generate text from a checkpoint. With one prompt the text is streamed as it "
                                   "is generated; with several (repeat --prompt) they run as one batch.",
                       epilog="example:\n  mamba2 generate --prompt 'def main(' --prompt 'class ' --temperature 0.7")
    g.add_argument("--checkpoint", default=DEFAULT_OUT, help=f"checkpoint directory (default: {DEFAULT_OUT})")
    g.add_argument("--prompt", action=_InOrder, dest="prompts",
                   help=f"text to continue, '-' reads stdin; repeat for a batch (prompts and --prompt-file files "
                        f"in command-line order) (default: {DEFAULT_PROMPT!r})")
    g.add_argument("--max-new-tokens", type=_nonneg_int, default=200, help="tokens to add per prompt (default: 200)")
    g.add_argument("--temperature", type=float, default=0.8,
                   help="sampling temperature, 0 = greedy (default: 0.8)")
    g.add_argument("--top-k", type=_top_k, help="sample only among the k most likely tokens (default, 0 and -1: "
                                               "off)")
    g.add_argument("--top-p", type=float, help="nucleus sampling: smallest set of tokens with this total "
                                               "probability, in (0, 1] (default: off)")
    g.add_argument("--min-p", type=float, help="drop tokens less likely than this times the most likely one, in "
                                               "[0, 1] (default: off)")
    g.add_argument("--repetition-penalty", type=float, default=1.0,
                   help="> 1 discourages tokens already in the prompt or output (default: 1, off)")
    g.add_argument("--stop", action="append", metavar="STRING",
                   help="end a prompt's text before this string; repeatable")
    g.add_argument("--prompt-file", action=_InOrder, dest="prompts", metavar="PATH",
                   help="a prompt read from a UTF-8 text file; repeatable")
    g.add_argument("--dtype", choices=DTYPE_NAMES, default="float32",
                   help="weights' dtype (default: float32; bfloat16 is the fast choice on a GPU)")
    g.add_argument("--quiet", action="store_true", help="do not print tokens/s to stderr at the end")
    g.add_argument("--interactive", action="store_true",
                   help="read turns from stdin, one line each, and continue the conversation after each: the "
                        "model's state is kept between turns, so a turn costs only its own tokens (--prompt, if "
                        "given, starts the conversation); Ctrl-D ends")
    g.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0; prompt i uses seed + i)")
    g.add_argument("--device", help="cpu, cuda, ... (default: cuda if available, else cpu)")
    g.set_defaults(func=cmd_generate)

    e = sub.add_parser("eval", help="held-out loss, perplexity and bits per byte of a checkpoint",
                       formatter_class=fmt, description="Evaluate a checkpoint: mean cross-entropy (nats/token), "
                       "perplexity, and bits per byte (comparable across tokenizers).")
    e.add_argument("--checkpoint", default=DEFAULT_OUT, help=f"checkpoint directory (default: {DEFAULT_OUT})")
    e.add_argument("--corpus", help="corpus to evaluate on (default: the corpus the checkpoint was trained on)")
    e.add_argument("--split", choices=("val", "all"),
                   help="val: the held-out ~2%% of documents (default); all: every document of the corpus")
    e.add_argument("--seq-len", type=_positive_int, help="tokens per row (default: the training seq-len, or 256)")
    e.add_argument("--batch-size", type=_positive_int, default=8, help="rows per batch (default: 8)")
    e.add_argument("--max-tokens", type=_positive_int, help="read at most this many tokens (default: all)")
    e.add_argument("--device", help="cpu, cuda, ... (default: cuda if available, else cpu)")
    e.add_argument("--dtype", choices=DTYPE_NAMES, default="float32",
                   help="weights' dtype (default: float32; on a GPU the forward runs under bf16 autocast anyway)")
    e.add_argument("--tasks", help="comma-separated lm-evaluation-harness tasks to run instead of the corpus "
                                   "evaluation (needs lm_eval installed); local task YAMLs via --include-path")
    e.add_argument("--include-path", help="folder of lm-eval task YAML files (with --tasks)")
    e.add_argument("--limit", type=_positive_int, help="with --tasks: at most this many examples per task")
    e.set_defaults(func=cmd_eval)

    from mamba2.interop.convert import add_convert_command
    add_convert_command(sub)

    s = sub.add_parser("serve", help="serve a checkpoint over HTTP (OpenAI completions API)", formatter_class=fmt,
                       description="Serve a checkpoint with continuous batching behind an OpenAI-compatible HTTP "
                                   "API: POST /v1/completions (streaming too), GET /v1/models, GET /health. "
                                   "SIGINT or SIGTERM stops it (running requests get --shutdown-timeout to finish).",
                       epilog=EPILOG_SERVE)
    s.add_argument("--checkpoint", default=DEFAULT_OUT, help=f"checkpoint directory (default: {DEFAULT_OUT})")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1; 0.0.0.0: all)")
    s.add_argument("--port", type=_port, default=8000, help="port (default: 8000; 0 picks a free one)")
    s.add_argument("--device", help="cpu, cuda, ... (default: cuda if available, else cpu)")
    s.add_argument("--dtype", choices=DTYPE_NAMES, default="float32",
                   help="weights' dtype (default: float32; bfloat16 is the fast choice on a GPU)")
    s.add_argument("--max-batch", type=_positive_int, default=8,
                   help="requests decoded together at most; more wait in the queue (default: 8)")
    s.add_argument("--max-len", type=_positive_int, default=4096,
                   help="prompt + max_tokens per request at most (default: 4096)")
    s.add_argument("--max-tokens-limit", type=_positive_int,
                   help="max_tokens a request may ask for at most (default: --max-len - 1, which leaves room for "
                        "a one-token prompt)")
    s.add_argument("--max-queue", type=_positive_int, default=256,
                   help="requests waiting or running at most; more are answered 503 (default: 256)")
    s.add_argument("--request-timeout", type=float, default=600.0,
                   help="seconds a request may take before it is aborted and answered 504 (408 while its body is "
                        "still arriving) (default: 600)")
    s.add_argument("--max-body-mb", type=float, default=8.0,
                   help="request bodies larger than this many MiB are answered 413, unread when their "
                        "Content-Length says so (default: 8)")
    s.add_argument("--shutdown-timeout", type=float, default=10.0,
                   help="seconds running requests get to finish after SIGINT/SIGTERM (default: 10)")
    s.add_argument("--model-name", help="the model's name in the API (default: the checkpoint directory's name)")
    s.add_argument("--prefix", action=_InOrder, dest="prefixes", metavar="TEXT",
                   help="a prompt prefix (system prompt, few-shot header) whose state is computed once at start: "
                        "requests whose prompt starts with its tokens prefill only the rest; repeatable")
    s.add_argument("--prefix-file", action=_InOrder, dest="prefixes", metavar="PATH",
                   help="a prefix read from a UTF-8 text file; repeatable")
    s.set_defaults(func=cmd_serve)

    from mamba2.experiments.command import add_experiment_command
    add_experiment_command(sub)
    return parser


# ---------------------------------------------------------------------------------------------- helpers
def _device(name: str | None):
    from mamba2.devices import resolve_device

    return resolve_device(name)


def _read_json(path: str) -> dict[str, Any]:
    try:
        obj = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UserError(f"config file not found: {path}") from None
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror}") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(obj, dict):
        raise UserError(f"{path}: expected a JSON object of config fields")
    return obj


def _model_config(preset: str, overrides: dict[str, Any], tokenizer, arch: str = "mamba2"):
    from mamba2.models import Mamba2Config

    known = {f.name for f in dataclasses.fields(Mamba2Config)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise UserError(f"unknown config fields {unknown}; known: {', '.join(sorted(known))}")
    given = overrides.get("vocab_size")
    if isinstance(given, int) and not isinstance(given, bool) and 0 < given < tokenizer.vocab_size:
        # refused before the corpus is read: its ids would be checked only after loading it
        raise UserError(f"vocab_size {given} (--config) is below the tokenizer's {tokenizer.vocab_size} ids: "
                        f"give at least {tokenizer.vocab_size}, or leave vocab_size out to follow the tokenizer")
    overrides = {"vocab_size": tokenizer.vocab_size, **overrides}
    try:
        return Mamba2Config.preset(preset, arch=arch, **overrides)
    except (ValueError, TypeError) as e:
        raise UserError(str(e)) from None


def _config_from_args(args, tokenizer):
    """The model config that train's --preset/--config/--arch/--layout/--d-intermediate describe."""
    overrides = _read_json(args.config) if args.config else {}
    if args.layout is not None and args.arch not in (None, "mamba2"):
        raise UserError(f"--arch {args.arch} and --layout both choose the layers: give only one")
    if args.layout is not None:
        from mamba2.layout import parse_layout
        try:
            overrides.setdefault("n_layer", len(parse_layout(args.layout, None)))
        except ValueError as e:
            raise UserError(str(e)) from None
        overrides["layout"] = args.layout
    if args.d_intermediate is not None:
        overrides["d_intermediate"] = args.d_intermediate
    return _model_config(args.preset or DEFAULT_PRESET, overrides, tokenizer, args.arch or "mamba2")


class _InOrder(argparse.Action):
    """Appends ``(flag, value)`` to one list that a text flag and its file flag share (``--prompt`` and
    ``--prompt-file``): the texts keep their command-line order, and with it their seeds."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, [*(getattr(namespace, self.dest, None) or []), (option_string, values)])


def _texts(sources: list[tuple[str, str]] | None, stdin_flag: str | None = None) -> list[str]:
    """The texts of ``(flag, value)`` pairs (:class:`_InOrder`), in order: a ``--…-file`` flag's file read as
    UTF-8, with \\r\\n and \\r read as \\n (as a text file is); ``stdin_flag``'s value ``-``: stdin's bytes, kept as
    they are (surrogateescape: the byte tokenizer encodes them back); any other value: itself. Unlike argv and
    stdin, a file must be valid UTF-8 (one that is not is most likely the wrong file, a binary) and not empty.

    Raises:
        UserError: a file that cannot be read, is empty or is not valid UTF-8 (with the offset of its first invalid
            byte), named with its flag; stdin asked for twice, closed or empty.
    """
    texts, stdin_read = [], False
    for flag, value in sources or []:
        if flag == stdin_flag and value == "-":
            if stdin_read:
                raise UserError(f"{flag} - reads stdin, which can be read once: give it at most once")
            stdin_read = True
            if sys.stdin is None:
                raise UserError(f"{flag} - reads the prompt from stdin, which is closed: pipe some text in")
            stdin = getattr(sys.stdin, "buffer", None)
            text = stdin.read().decode("utf-8", "surrogateescape") if stdin is not None else sys.stdin.read()
            if not text:
                raise UserError(f"{flag} - reads the prompt from stdin, which was empty: pipe some text in")
            texts.append(text)
            continue
        if not flag.endswith("-file"):
            texts.append(value)
            continue
        try:
            data = Path(value).read_bytes()
        except OSError as e:
            raise UserError(f"cannot read {flag} {value}: {e.strerror}") from None
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise UserError(f"{flag} {value} is not valid UTF-8 text: byte 0x{data[e.start]:02x} at offset {e.start} "
                            f"(is it a binary file?)") from None
        if not text:
            raise UserError(f"{flag} {value} is empty: give a file with some text")
        texts.append(text.replace("\r\n", "\n").replace("\r", "\n"))
    return texts


def _encode_prompt(text: str, tokenizer, vocab_size: int) -> list[int]:
    try:
        ids = tokenizer.encode(text)
    except UnicodeEncodeError:
        raise UserError("the prompt is not valid UTF-8: this checkpoint's tokenizer takes text only (the byte "
                        "tokenizer takes any bytes)") from None
    if not ids:
        raise UserError("empty prompt: give --prompt some text to continue")
    bad = [i for i in ids if i >= vocab_size]
    if bad:
        raise UserError(f"token id {bad[0]} is outside the model's vocabulary (vocab_size={vocab_size})")
    return ids


def _sampling_params(tokenizer, *, max_new_tokens: int, temperature: float, top_k, top_p, seed: int, min_p,
                     repetition_penalty: float):
    """The engine's SamplingParams for generate's flags (stopping at the tokenizer's EOS).

    Raises:
        UserError: a value SamplingParams refuses, named by its flag (``--top-p must be …``).
    """
    from mamba2.serving import SamplingParams

    eos = tokenizer.eos_token_id
    try:
        return SamplingParams(max_tokens=max_new_tokens, temperature=temperature, top_k=top_k or 0,
                              top_p=1.0 if top_p is None else top_p, min_p=min_p or 0.0,
                              repetition_penalty=repetition_penalty, seed=seed,
                              stop_token_ids=() if eos is None else (eos,))
    except ValueError as e:                           # "top_p must be …" names the flag --top-p
        name, rest = str(e).split(" ", 1)
        raise UserError(f"--{name.replace('_', '-')} {rest}") from None


PREFILL_PIECE = 8192
"""Tokens per prefill forward when a long prompt's prefill shows progress (a multiple of every chunk_size)."""


def _prefill_with_progress(engine, ids: list[int]):
    """For a prompt over two :data:`PREFILL_PIECE` s (a minute or more on a CPU): prefill all but its last piece
    in pieces as engine prefixes, with a progress bar on stderr, and return the last prefix (the request
    prefills the rest); None for a shorter prompt."""
    if len(ids) <= 2 * PREFILL_PIECE:
        return None
    from tqdm.auto import tqdm

    prefix, ends = None, range(PREFILL_PIECE, len(ids), PREFILL_PIECE)
    with tqdm(total=ends[-1], unit="tok", desc="prefill", file=sys.stderr, leave=False) as bar:
        for end in ends:
            prefix = engine.make_prefix(ids[:end], after=prefix)
            bar.update(end - bar.n)
    return prefix


def _sample(model, config, tokenizer, prompts: list[str], *, max_new_tokens: int, temperature: float,
            top_k: int | None, top_p: float | None, seed: int, min_p: float | None = None,
            repetition_penalty: float = 1.0, stops: tuple[str, ...] = (), stats: bool = False,
            ids: list[list[int]] | None = None) -> None:
    """Continue each prompt on the serving engine (docs/design.md §7): one prompt is streamed, several run as
    one batch; text stops at the first of ``stops``; ``stats`` prints tokens and tokens/s to stderr. ``ids``: the
    prompts already encoded (:func:`_encode_prompt`), or None to encode them here."""
    import time

    from mamba2.serving import Engine
    from mamba2.serving.text import TextStream

    base = _sampling_params(tokenizer, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                            top_p=top_p, seed=seed, min_p=min_p, repetition_penalty=repetition_penalty)
    params = [dataclasses.replace(base, seed=seed + i) for i in range(len(prompts))]
    if ids is None:
        ids = [_encode_prompt(p, tokenizer, config.vocab_size) for p in prompts]
    stops = [st for st in stops if st]
    engine = Engine(model, max_batch=len(ids), max_len=max(len(i) for i in ids) + max_new_tokens,
                    vocab_size=tokenizer.vocab_size)
    one = len(prompts) == 1
    start = time.perf_counter()
    try:
        prefix = _prefill_with_progress(engine, ids[0]) if one and stats and max_new_tokens > 0 else None
        rids = [engine.add_request(i, q, stream=one or bool(stops), prefix=prefix) for i, q in zip(ids, params)]
    except ValueError as e:
        raise UserError(str(e)) from None
    texts = {r: TextStream(tokenizer, stops, skip_ids=base.stop_token_ids) for r in rids}   # EOS is not text
    if one:
        sys.stdout.write(prompts[0].encode("utf-8", "surrogateescape").decode("utf-8", "replace"))
    first = None                 # when the first tokens came: the prefill ends there, decoding starts
    n = 0
    while engine.has_work():
        outputs = engine.step()
        if first is None and outputs:
            first = time.perf_counter()
        for out in outputs:
            text = texts[out.request_id]
            n += len(out.new_tokens)
            released = text.add(out.new_tokens)
            if one:
                sys.stdout.write(released)
                sys.stdout.flush()
            if text.stopped:
                engine.abort(out.request_id)
    elapsed = time.perf_counter() - start
    if one:
        print(texts[rids[0]].finish(), flush=True)
    else:
        for i, (p, r) in enumerate(zip(prompts, rids)):
            print(f"=== prompt {i + 1} ===\n{p}{texts[r].text}")
    if stats:
        if one:                  # streamed: the first token's arrival ends the prefill
            ttft = (first or start + elapsed) - start
            decode_s = elapsed - ttft
            speed = f"first token after {ttft:.2f} s (prefill)" + (
                f", then {(n - 1) / decode_s:.1f} tokens/s decoding" if n > 1 and decode_s > 0 else "")
        else:                    # a batch's tokens come back when each row ends: one rate, prefill included
            speed = f"{n / max(elapsed, 1e-9):.1f} tokens/s, prefill included"
        print(f"[{n} new tokens in {elapsed:.2f} s: {speed}; {len(prompts)} prompt(s), "
              f"{str(next(model.parameters()).dtype).replace('torch.', '')} on {next(model.parameters()).device}]",
              file=sys.stderr)


# ---------------------------------------------------------------------------------------------- commands
def cmd_train(args: argparse.Namespace) -> int:
    device = _device(args.device)
    parallel = _start_parallel(args, device)
    if parallel is not None:
        device = parallel.device
        if not parallel.main:                  # one rank speaks; errors still reach stderr from every rank
            sys.stdout = open(os.devnull, "w")
    returned = False            # _train returns on every rank at the same point: done, or a stop they agreed on
    try:
        with contextlib.ExitStack() as held:      # the lock on --out (_lock_out) until the command ends
            rc = _train(args, device, parallel, held)
        returned = True
        return rc
    except _AgreedStop:         # raised by every rank at the same point: they close together
        returned = True
        raise
    except RuntimeError as e:
        from mamba2.distributed.runtime import lost_peer

        if parallel is None or not lost_peer(e):
            raise
        raise UserError(f"rank {parallel.rank}: another rank of the run is gone (killed or failed: see its log), "
                        f"so this one stops too; --resume continues from the last checkpoint "
                        f"[{' '.join(str(e).split())[:300]}]") from e
    finally:
        if parallel is not None:
            parallel.close(together=returned)


def _check_size(params: int, config, cfg, device) -> None:
    """Print the estimate of :mod:`mamba2.sizing` when it matters; refuse a run that cannot fit.

    Raises:
        UserError: the estimated peak memory exceeds what the device has (naming both and what to change).
    """
    import torch

    from mamba2.sizing import estimate_training
    from mamba2.training import compute_dtype

    est = estimate_training(config, params, cfg.batch_size, cfg.seq_len, torch.device(device),
                            torch.finfo(compute_dtype(cfg, torch.device(device))).bits // 8)
    if not est.fits and est.model_bytes > est.available_bytes:
        raise UserError(f"this model does not fit: its weights, gradients and AdamW state alone (16 bytes per "
                        f"parameter) need ~{est.model_bytes / 2**30:.1f} GiB of {est.available_bytes / 2**30:.1f} "
                        f"GiB available; choose a smaller --preset (--no-size-check runs it anyway)")
    if not est.fits:
        raise UserError(f"this run would not fit: estimated {est}. Use a smaller --batch-size or --seq-len "
                        f"(activations grow with both), a smaller --preset, or --grad-accum to keep the batch; "
                        f"--no-size-check runs it anyway")
    if est.tight or est.step_s > 1 or est.peak_bytes > 2 * 2**30:
        print(f"estimated: {est}" + (" (tight: close other programs or use a smaller --batch-size)"
                                     if est.tight else ""))


def _pretrained(path: str):
    """(model, config, tokenizer) of a model directory for ``--init-from``.

    Raises:
        UserError: what the loader refuses, or a directory without a tokenizer.
    """
    from mamba2.interop import load

    loaded = load(path)
    if loaded.tokenizer is None:
        raise UserError(f"{path} has no tokenizer (tokenizer.json or tokenizer_spec.json): fine-tuning needs the "
                        f"model's own; copy its tokenizer.json into {path}")
    print(f"initialised from {path} ({loaded.format} format)")
    return loaded.model, loaded.config, loaded.tokenizer


def _refuse_foreign_in_run(out: Path) -> None:
    """``train --overwrite`` replaces ``out`` whole: refuse (UserError naming them) entries that neither a model
    directory nor a training run holds (a nested model, a ``.git``, a file of the user's)."""
    from mamba2.interop.export import refuse_foreign_entries
    from mamba2.interop.formats import TRAINER_STATE
    from mamba2.lora import ADAPTER_DIR
    from mamba2.metrics import METRICS_FILE
    from mamba2.training import BEST_DIR, LOSS_CURVE_FILE, SHARDED_DIR

    refuse_foreign_entries(out, what="checkpoint", also=frozenset(
        {TRAINER_STATE, METRICS_FILE, LOSS_CURVE_FILE, BEST_DIR, SHARDED_DIR, ADAPTER_DIR}))


def _export_target(out: Path, fmt: str, replace: str) -> Path:
    """Where ``--export fmt`` writes: ``<out>-<fmt>`` beside the checkpoint.

    ``replace``: ``"yes"`` (--overwrite, or the export itself), ``"own"`` (--resume: an existing model directory in
    ``fmt``'s format is taken for this run's earlier export) or ``"no"`` (a new run).

    Raises:
        UserError: the path holds something that is not a model directory, a training run or a model directory
            with other entries (none is ever overwritten), or an existing directory that ``replace`` does not
            allow replacing.
    """
    from mamba2 import fsutil
    from mamba2.interop.export import refuse_to_replace
    from mamba2.interop.formats import dir_format, is_model_dir

    target = out.parent / f"{out.name}-{fmt}"
    refuse_to_replace(target)
    if replace != "yes" and target.is_dir() and any(target.iterdir()) and (
            replace == "no" or dir_format(target) != fmt):
        raise UserError(f"--export {fmt} would replace {target}, which exists"
                        + ("" if replace == "no" else f" and is not a model directory in the {fmt} format") +
                        ": pass --overwrite to replace it, or choose another --out")
    fsutil.check_writable(target, is_valid=is_model_dir, overwrite=True, what="model directory")
    return target


def _start_parallel(args: argparse.Namespace, device):
    """The distributed run this process belongs to (``torchrun``), or None for a one-process run."""
    from mamba2.distributed.runtime import Parallel, launched

    if not launched():
        if args.tp > 1 or args.cp > 1:
            raise UserError(f"--tp {args.tp} --cp {args.cp} needs several processes: launch with torchrun, e.g. "
                            f"torchrun --nproc_per_node {args.tp * args.cp} -m mamba2 train --tp {args.tp} "
                            f"--cp {args.cp} ...")
        return None
    try:
        return Parallel.start(device, tp=args.tp, cp=args.cp)
    except ValueError as e:
        raise UserError(str(e)) from None


FINETUNE_DEFAULTS = {"lr": 3e-4, "warmup": 10}
"""Training defaults that ``--init-from`` puts in place of the from-scratch ones (a released model needs a lower
peak rate and little warmup)."""
LORA_DEFAULTS = {"lr": 1e-3}
"""With ``--lora-rank``: adapters start at zero and train alone, and take a higher rate than full fine-tuning."""


class _AgreedStop(UserError):
    """A refusal every rank of a distributed run raises at the same point (after agreeing on it)."""


def _lock_out(out: Path, parallel, held: contextlib.ExitStack, resume: bool) -> None:
    """Refuse a second process training into ``out`` (``mamba2.fsutil.locked``: ``.<name>.lock`` beside it, held
    in ``held``), before anything is read or written there.

    Distributed: only rank 0 writes into ``out`` (the other ranks write their shards into the temporary directory
    it makes), so only rank 0 takes the lock, and every rank raises its refusal together (:class:`_AgreedStop`).
    The folders the lock makes for ``out``'s parent are removed again when the command ends if they are still
    empty (a run refused after the lock leaves no empty ``runs/`` behind).

    Raises:
        UserError: another process holds the lock, or ``out``'s parent cannot be made (naming it).
    """
    from mamba2 import fsutil

    refused = None
    if parallel is None or parallel.main:
        busy = (lambda lock: f"another process is training into {out} ({lock} is locked): wait for it to end or "
                             f"choose another --out")
        parent = fsutil.lock_path(out).parent               # where a link --out leads, as the lock is taken there
        made = [d for d in (parent, *parent.parents) if not d.exists()]          # innermost first
        held.callback(_remove_empty, made)       # after the lock file is gone (the stack unwinds in reverse)
        try:      # a resume whose folder's parent is missing finds no checkpoint: no parent made for that
            held.enter_context(fsutil.locked(out, busy=busy, what="checkpoint", create_parent=not resume))
        except UserError as e:
            if parallel is None:
                raise
            refused = str(e)
    if parallel is not None and (refused := parallel.broadcast(refused)) is not None:
        raise _AgreedStop(refused)


def _remove_empty(folders: list[Path]) -> None:
    """Remove ``folders`` (innermost first) while they are empty; the first one that is not (or is gone) stops it."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return


def _train(args: argparse.Namespace, device, parallel, held: contextlib.ExitStack) -> int:
    import torch

    from mamba2 import checkpoints
    from mamba2.data import STDLIB, corpus_spec, load_corpus
    from mamba2.interop.formats import TRAINER_STATE
    from mamba2.tokenizer import load_tokenizer, same_tokenizer
    from mamba2.train_config import TrainConfig
    from mamba2.training import SHARDED_DIR, Trainer

    out = Path(args.out)
    given = {k: getattr(args, k) for k in ("steps", "batch_size", "seq_len", "grad_accum", "lr", "warmup",
                                            "eval_every", "save_every", "max_minutes", "seed", "keep_best",
                                            "dtype", "lora_rank", "lora_alpha", "lora_dropout")}
    if args.lora_targets is not None:
        given["lora_targets"] = tuple(t.strip() for t in args.lora_targets.split(",") if t.strip())
    if args.save_adapter:
        given["save_adapter"] = True
    given = {k: v for k, v in given.items() if v is not None}
    lora_flags = [f for f in ("lora_rank", "lora_alpha", "lora_targets", "lora_dropout") if f in given]
    tensorboard = None
    if args.tensorboard is not None:
        from mamba2.metrics import require_tensorboard
        tensorboard = Path(args.tensorboard) if args.tensorboard else out.parent / "tensorboard" / out.name
        require_tensorboard(tensorboard)       # before anything is loaded
    state = None
    model_flags = [f for f in ("preset", "config", "arch", "layout", "d_intermediate") if getattr(args, f) is not None]
    if args.save_adapter and not args.resume and "lora_rank" not in given:
        raise UserError("--save-adapter writes a LoRA run's adapter: give --lora-rank too")
    if lora_flags and not args.resume and "lora_rank" not in given:
        raise UserError(f"--{lora_flags[0].replace('_', '-')} sets up LoRA adapters: give --lora-rank too")
    if "lora_rank" in given and not args.resume and args.init_from is None:
        raise UserError("--lora-rank fine-tunes a model you have: give it with --init-from DIR")
    if args.resume and args.overwrite:
        raise UserError("--resume continues the run in --out and --overwrite replaces it: give one of them")
    if args.init_from is not None and (args.resume or model_flags or args.tokenizer is not None):
        bad = "--resume" if args.resume else "--tokenizer" if args.tokenizer is not None else \
            "--" + model_flags[0].replace("_", "-")
        raise UserError(f"--init-from takes the model and its tokenizer from {args.init_from}: leave out {bad}")
    _lock_out(out, parallel, held, args.resume)     # before a load puts back a backup or a save is tried
    if args.resume:
        model, config, tokenizer, state = checkpoints.load(out, device=device)
        if args.tokenizer is not None and not same_tokenizer(load_tokenizer(args.tokenizer), tokenizer):
            raise UserError(f"--tokenizer cannot change when resuming: the run in {out} keeps its own, and "
                            f"{args.tokenizer} is another; leave --tokenizer out")
        if state is None or "train_config" not in state:
            raise UserError(f"cannot resume {out}: it has no {TRAINER_STATE} (saved without training state)")
        if "optimizer" not in state and not (out / SHARDED_DIR).is_dir():
            raise UserError(f"cannot resume {out}: it holds no optimizer state (a best/ copy keeps the weights only); "
                            f"resume the run's own folder, or fine-tune from this one with --init-from {out}")
        # the saved data position counts batches of the run's batch size and seq_len, drawn in its seed's order
        for k in ("batch_size", "seq_len", "seed"):
            if k in given and k in state["train_config"] and given[k] != state["train_config"][k]:
                raise UserError(f"--{k.replace('_', '-')} cannot change when resuming: the run in {out} reads its "
                                f"data with {k} {state['train_config'][k]} and its data position counts those "
                                f"batches; give {state['train_config'][k]} or leave it out")
        if given.get("steps", state.get("step", 0)) < state.get("step", 0):
            raise UserError(f"--steps {given['steps']} is below step {state['step']}, where the run in {out} "
                            f"stands: give a larger --steps to train further (a resumed run never goes back)")
        if model_flags:   # re-stating the run's own model settings is fine; changing them is not
            wanted, saved = _config_from_args(args, tokenizer).to_dict(), config.to_dict()
            diff = sorted(k for k in saved if wanted.get(k) != saved[k])
            if diff:
                flags = ", ".join("--" + f.replace("_", "-") for f in model_flags)
                base = "" if args.preset is not None else \
                    f" (they describe a model from the default --preset {DEFAULT_PRESET}, as --preset is not given)"
                raise UserError(f"{flags} would change the model of the run in {out} ({', '.join(diff)}){base}; "
                                f"a resumed run keeps its own: leave them out")
        if args.save_adapter and not state["train_config"].get("lora_rank"):
            raise UserError(f"--save-adapter writes a LoRA run's adapter: the run in {out} trains every weight, "
                            "with no adapters")
        if lora_flags:
            why = ("keeps its adapters' settings" if state["train_config"].get("lora_rank")
                   else "trains every weight, with no adapters")
            raise UserError(f"--{lora_flags[0].replace('_', '-')} cannot change when resuming: the run in {out} {why}")
        if tensorboard is None and state.get("tensorboard"):
            from mamba2.metrics import require_tensorboard
            tensorboard = Path(state["tensorboard"])
            require_tensorboard(tensorboard)
        # a time budget belongs to one invocation: a resume without --max-minutes runs to --steps
        kept = {k: v for k, v in state["train_config"].items() if k != "max_minutes"}
        cfg = TrainConfig.from_dict({**kept, **given})
        corpus = args.corpus if args.corpus is not None else state.get("corpus", STDLIB)
    else:
        checkpoints.ensure_writable(out)   # refuses a directory that is not a checkpoint
        if checkpoints.is_checkpoint(out) and not args.overwrite:
            raise UserError(f"{out} already exists (--resume to continue it, --overwrite to replace it, "
                            "or choose another --out)")
        if args.overwrite:
            _refuse_foreign_in_run(out)
        corpus = args.corpus if args.corpus is not None else STDLIB
        if args.init_from is not None:
            model, config, tokenizer = _pretrained(args.init_from)
            defaults = {**FINETUNE_DEFAULTS, **(LORA_DEFAULTS if "lora_rank" in given else {})}
            defaults = {k: v for k, v in defaults.items() if k not in given}
            if defaults:
                print("fine-tuning defaults: " + " ".join(f"--{k} {v:g}" for k, v in defaults.items()))
            cfg = TrainConfig(**{**defaults, **given})
            torch.manual_seed(cfg.init_seed)
        else:
            tokenizer = load_tokenizer(args.tokenizer or "bytes")
            config = _config_from_args(args, tokenizer)
            cfg = TrainConfig(**given)
            from mamba2.models import Mamba2LM

            if args.size_check and parallel is None:       # before a preset too large allocates its weights
                with torch.device("meta"):
                    _check_size(Mamba2LM(config).num_parameters(), config, cfg, device)
            torch.manual_seed(cfg.init_seed)
            model = Mamba2LM(config)
    earlier = state.get("options", {}) if state is not None else {}     # a resumed run's own choices
    options = {"export": list(dict.fromkeys(args.export)) if args.export else earlier.get("export", []),
               "sample": args.sample if args.sample is not None else earlier.get("sample", True),
               "prompt": args.prompt if args.prompt is not None else earlier.get("prompt", DEFAULT_PROMPT),
               "sample_tokens": (args.sample_tokens if args.sample_tokens is not None
                                 else earlier.get("sample_tokens", DEFAULT_SAMPLE_TOKENS))}
    args.export, args.sample, args.prompt, args.sample_tokens = (options[k] for k in ("export", "sample", "prompt",
                                                                                      "sample_tokens"))
    if args.export:
        from mamba2.interop.export import model_writer

        for fmt in args.export:      # a model the format cannot hold, or a target in the way, fails now
            model_writer(model, format=fmt, tokenizer=tokenizer)
            _export_target(out, fmt, replace="yes" if args.overwrite else "own" if args.resume else "no")

    if args.sample and args.sample_tokens > 0:
        _encode_prompt(args.prompt, tokenizer, config.vocab_size)  # a bad prompt fails now, not after training
    if args.size_check and parallel is None and (args.resume or args.init_from is not None):
        _check_size(model.num_parameters(), config, cfg, device)
    t0 = time.perf_counter()
    train_stream, val_stream = load_corpus(corpus, tokenizer)
    print(f"corpus {corpus}: {train_stream.n_docs:,} documents / {len(train_stream.tokens):,} tokens for training, "
          f"{val_stream.n_docs:,} / {len(val_stream.tokens):,} held out ({time.perf_counter() - t0:.1f}s)")
    from mamba2.training import compute_dtype

    compute = str(compute_dtype(cfg, torch.device(device))).replace("torch.", "")
    print(f"model: {model.num_parameters():,} parameters ({config.n_layer} layers, d_model {config.d_model}, "
          f"d_state {config.d_state}, vocab {config.vocab_size}) on {device} ({compute} compute); "
          f"{cfg.steps} steps of {cfg.batch_size * cfg.grad_accum} x {cfg.seq_len} tokens")
    if parallel is not None:
        d = parallel.dims
        print(f"distributed: {d.world_size} ranks = {d.dp} data x {d.cp} context x {d.tp} tensor parallel "
              f"(FSDP2 over {d.dp * d.cp})")
    try:
        trainer = Trainer(model, config, tokenizer, train_stream, val_stream, cfg, out_dir=out, device=device,
                          state=state, corpus=corpus_spec(corpus), parallel=parallel, tensorboard=tensorboard,
                          options=options)
    except ValueError as e:     # a model or batch the mesh cannot split: the same message on every rank
        raise UserError(str(e)) from None
    if tensorboard is not None and (parallel is None or parallel.main):
        print(f"TensorBoard: {tensorboard} (tensorboard --logdir {tensorboard.parent})")
    if cfg.lora_rank:
        from mamba2 import lora
        print(f"LoRA rank {cfg.lora_rank} on {','.join(cfg.lora_targets)}: {lora.describe(trainer.model)}")
    if args.resume:
        print(f"resuming {out} at step {trainer.step} of {cfg.steps}" +
              ("" if trainer.step < cfg.steps else " (already done: pass a larger --steps to train more)"))
    try:
        trainer.fit()
    except KeyboardInterrupt as e:
        if parallel is None or parallel.main:
            again = "mamba2 train" if parallel is None else "torchrun ... -m mamba2 train"
            print(f"\ninterrupted at step {trainer.step}; checkpoint saved in {out} "
                  f"(continue with: {again} --resume --out {out})", file=sys.stderr)
        return interrupted_status(e)
    if trainer.eval_history[trainer.eval_from:]:       # the losses of one held-out set (this corpus's)
        (_, first, *_), (_, last, _, bpb) = trainer.eval_history[trainer.eval_from], trainer.eval_history[-1]
        print(f"held-out loss {first:.3f} -> {last:.3f} nats/token ({bpb:.3f} bits/byte) "
              f"after {trainer.step} steps, {trainer.elapsed_s / 60:.1f} min")
    print(f"checkpoint: {out}  (loss curve: {out / 'loss_curve.png'})")
    if trainer.best is not None and trainer.best[1] < float("inf"):     # inf: none yet on this corpus
        print(f"best held-out loss {trainer.best[1]:.3f} at step {trainer.best[0]}: {out / 'best'}")
    final = trainer.plain_model()
    if parallel is None or parallel.main:
        for fmt in args.export or ():
            from mamba2.interop import save_pretrained
            path = save_pretrained(final, _export_target(out, fmt, replace="yes"), format=fmt, tokenizer=tokenizer,
                                   overwrite=True)
            print(f"exported ({fmt}): {path}")
    if args.sample and args.sample_tokens > 0:
        model = final.to(device) if final is not None else None
        if parallel is None or parallel.main:
            print(f"--- sample ({args.sample_tokens} tokens, temperature 0.8) ---")
            _sample(model, config, tokenizer, [args.prompt], max_new_tokens=args.sample_tokens,
                    temperature=0.8, top_k=None, top_p=None, seed=cfg.seed % 2 ** 63)  # the sampler takes [0, 2**63)
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    import torch

    if any(stop == "" for stop in args.stop or ()):
        raise UserError("--stop '' would stop before the first token: give a non-empty string")

    from mamba2.interop import load

    if args.interactive and ("--prompt", "-") in (args.prompts or []):
        raise UserError("--interactive reads the turns from stdin: --prompt - cannot read it too (use "
                        "--prompt-file for an opening text)")
    prompts = _texts(args.prompts, stdin_flag="--prompt")
    if args.interactive and len(prompts) > 1:
        raise UserError("--interactive continues one conversation: give at most one --prompt")
    dtype = getattr(torch, args.dtype)
    try:
        loaded = load(args.checkpoint, device=_device(args.device), dtype=dtype)  # ours, official or HF format
    except (MemoryError, RuntimeError) as e:  # torch reports a failed CPU allocation as a RuntimeError
        if not _out_of_memory(e):
            raise
        raise UserError(f"out of memory while loading the model ({' '.join(str(e).split())[:200]}): use "
                        f"--dtype bfloat16 or a smaller model") from None
    try:
        model, config, tokenizer = loaded.model, loaded.config, loaded.tokenizer
        if tokenizer is None:
            raise UserError(f"{args.checkpoint} has no tokenizer (tokenizer.json or tokenizer_spec.json): add one "
                            "with 'mamba2 convert SRC DST --to mamba2 --tokenizer tokenizer.json'")
        kw = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                  top_p=args.top_p, seed=args.seed, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
                  stops=tuple(args.stop or ()))
        if args.interactive:
            _check_generate_length(model, config, [], args.max_new_tokens, interactive=True)
            return _chat(model, config, tokenizer, prompts[0] if prompts else "", **kw)
        prompts = prompts or [DEFAULT_PROMPT]
        ids = [_encode_prompt(p, tokenizer, config.vocab_size) for p in prompts]
        _check_generate_length(model, config, ids, args.max_new_tokens)
        _sample(model, config, tokenizer, prompts, stats=not args.quiet, ids=ids, **kw)
    except (MemoryError, RuntimeError) as e:  # torch reports a failed CPU allocation as a RuntimeError
        if not _out_of_memory(e):
            raise
        raise UserError(f"out of memory ({' '.join(str(e).split())[:200]}): use a smaller --max-new-tokens (a "
                        f"model with attention layers keeps keys and values for prompt + new tokens), fewer or "
                        f"shorter prompts, --dtype bfloat16 or a smaller model") from None
    return 0


KV_NOTE_BYTES = 1 << 30
"""``generate`` says on stderr how much memory the decoding state takes when it reserves more than this (models
with attention layers reserve keys and values for prompt + ``--max-new-tokens`` positions per prompt up front)."""


def _out_of_memory(e: BaseException) -> bool:
    """Whether ``e`` is a failed allocation (torch reports one on the CPU as a RuntimeError)."""
    return isinstance(e, MemoryError) or "out of memory" in str(e) or "allocate memory" in str(e)


def _size(n: float) -> str:
    """``n`` bytes in GiB, or in MiB below 1 GiB (``1.5 GiB``, ``12.0 MiB``)."""
    return f"{n / 2**30:,.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def _check_generate_length(model, config, ids: list[list[int]], max_new_tokens: int, *,
                           interactive: bool = False) -> None:
    """Refuse up front a ``--max-new-tokens`` whose decoding state cannot fit, and say on stderr what a large one
    reserves. A Mamba layer's state does not grow with the length: only attention layers' keys and values, which
    the engine reserves for the longest prompt + ``max_new_tokens`` positions of every prompt (``ids``: the
    encoded prompts); ``--interactive`` reserves :data:`CHAT_MAX_LEN` positions, which a turn must fit in.

    Raises:
        UserError: with ``interactive``, max_new_tokens above CHAT_MAX_LEN for a model with attention layers;
            otherwise a decoding state larger than the memory the device has free (naming both).
    """
    import torch

    from mamba2.sizing import available_memory

    if not any(s.mixer == "attention" for s in config.layer_specs):
        return
    if interactive:
        if max_new_tokens > CHAT_MAX_LEN:
            raise UserError(f"--max-new-tokens {max_new_tokens} does not fit in an --interactive conversation, "
                            f"which holds at most {CHAT_MAX_LEN:,} tokens for a model with attention layers")
        return
    device = next(model.parameters()).device
    rows = len(ids) + (device.type == "cuda")          # the engine's scratch row for CUDA graphs
    max_len = max(len(i) for i in ids) + max_new_tokens

    def state_bytes(positions: int) -> int:        # on the meta device: shapes only, nothing is allocated
        state = model.empty_cache(rows, device="meta", max_len=positions)
        return sum(t.numel() * t.element_size() for layer in state.layers for t in vars(layer).values()
                   if isinstance(t, torch.Tensor))

    one = state_bytes(1)                     # in Python integers: no tensor of an absurd length is ever shaped
    need = one + (max_len - 1) * (state_bytes(2) - one)
    free = available_memory(device)
    what = (f"{_size(need)} of decoding state: the attention layers' keys and values for {len(ids)} "
            f"prompt(s) × {max_len:,} positions (the longest prompt + --max-new-tokens {max_new_tokens})")
    if free is not None and need > free:
        raise UserError(f"generating would need {what}, more than the {_size(free)} free on {device}: use "
                        f"a smaller --max-new-tokens or fewer prompts")
    if need > KV_NOTE_BYTES:
        print(f"[reserving {what}]", file=sys.stderr)


CHAT_MAX_LEN = 1 << 16
"""Longest conversation ``generate --interactive`` holds for a model with attention layers (their keys and values
grow with it; a Mamba-2 state does not)."""


def _chat(model, config, tokenizer, opening: str, *, max_new_tokens: int, temperature: float, top_k, top_p,
          seed: int, min_p, repetition_penalty: float, stops: tuple[str, ...]) -> int:
    """``generate --interactive``: each stdin line (plus a newline) is appended to the conversation and the model
    continues it; the state after the conversation so far is an engine prefix extended turn by turn."""
    from mamba2.serving import Engine
    from mamba2.serving.text import TextStream

    params = _sampling_params(tokenizer, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                              top_p=top_p, seed=seed, min_p=min_p, repetition_penalty=repetition_penalty)
    engine = Engine(model, max_batch=1, max_len=CHAT_MAX_LEN, vocab_size=tokenizer.vocab_size)
    prefix = None
    state_mb = sum(t.numel() * t.element_size() for layer in engine.make_prefix([0]).cache.layers
                   for t in vars(layer).values() if hasattr(t, "numel")) / 2**20
    size = (f"{state_mb:.2f} MB now; the attention layers' keys and values grow with the conversation, up to "
            f"{CHAT_MAX_LEN:,} tokens" if engine.has_attention else f"{state_mb:.2f} MB whatever its length")
    print(f"[interactive: one line per turn, Ctrl-D ends; the conversation's state is kept between turns "
          f"({size}), so a turn costs only its own tokens]", file=sys.stderr)
    tty = sys.stdin.isatty()
    turn = 0
    while True:
        if turn == 0 and opening:        # the opening text is the first turn, answered like the others
            text_in = opening
            sys.stdout.write(opening)
        else:
            try:
                line = input("> " if tty else "")
            except EOFError:
                return 0
            if not tty:
                sys.stdout.write(line + "\n")
            text_in = line + "\n"
        ids = list(prefix.ids if prefix is not None else ()) + _encode_prompt(text_in, tokenizer, config.vocab_size)
        params_turn = dataclasses.replace(params, seed=seed + turn)
        try:
            engine.add_request(ids, params_turn, prefix=prefix, stream=True)
        except ValueError as e:      # an attention model's conversation past CHAT_MAX_LEN
            raise UserError(f"the conversation cannot go on: {e}") from None
        text = TextStream(tokenizer, stops, skip_ids=params.stop_token_ids)
        while engine.has_work():
            for out in engine.step():
                sys.stdout.write(text.add(out.new_tokens))
                sys.stdout.flush()
                if text.stopped:
                    engine.abort(out.request_id)
        sys.stdout.write(text.finish() + "\n")
        sys.stdout.flush()
        shown = tokenizer.encode(text.text + "\n")   # the reply as shown: cut at a stop string, no EOS, a newline
        try:
            prefix = engine.make_prefix(ids + shown, after=prefix)
        except ValueError as e:
            raise UserError(f"the conversation cannot go on: {e}") from None
        turn += 1


def cmd_eval(args: argparse.Namespace) -> int:
    import math

    import torch

    from mamba2.checkpoints import read_trainer_state
    from mamba2.data import STDLIB, load_corpus, load_documents, tokenize
    from mamba2.evaluation import evaluate
    from mamba2.interop import load

    tasks = None if args.tasks is None else [t.strip() for t in args.tasks.split(",") if t.strip()]
    if tasks == []:
        raise UserError(f"--tasks {args.tasks!r} names no task: give comma-separated lm-eval task names")
    mine = ((("--corpus", args.corpus), ("--seq-len", args.seq_len), ("--max-tokens", args.max_tokens),
             ("--split", args.split)) if tasks is not None else
            (("--limit", args.limit), ("--include-path", args.include_path)))
    stray = [flag for flag, value in mine if value is not None]
    if stray:
        raise UserError(f"{' and '.join(stray)} {'does' if len(stray) == 1 else 'do'} not apply "
                        + ("to --tasks (lm-eval reads its own data; --limit bounds the examples)" if tasks is not None
                           else "without --tasks (the corpus evaluation reads at most --max-tokens tokens)"))
    device = _device(args.device)
    if tasks is not None:
        return _eval_tasks(args, tasks, device)
    split = args.split or "val"
    loaded = load(args.checkpoint, device=device, dtype=getattr(torch, args.dtype))   # ours, official or hf format
    model, config, tokenizer = loaded.model, loaded.config, loaded.tokenizer
    if tokenizer is None:
        raise UserError(f"{args.checkpoint} has no tokenizer (tokenizer.json or tokenizer_spec.json)")
    state = read_trainer_state(args.checkpoint) or {}    # a training run's corpus and seq_len, if any
    corpus = args.corpus if args.corpus is not None else state.get("corpus", STDLIB)
    seq_len = args.seq_len or state.get("train_config", {}).get("seq_len", 256)
    if split == "val":
        stream = load_corpus(corpus, tokenizer)[1]
    else:
        stream = tokenize(load_documents(corpus), tokenizer)
    stream.check_vocab(config.vocab_size)
    result = evaluate(model, stream, batch_size=args.batch_size, seq_len=seq_len, max_tokens=args.max_tokens,
                      device=device)
    if result.tokens == 0:
        hint = "a larger corpus" if split == "all" else "--split all or a larger corpus"
        raise UserError(f"nothing to evaluate: the {split} split of {corpus} has fewer than 2 tokens (try {hint})")
    if not math.isfinite(result.loss):   # load() refuses non-finite weights, but activations can still overflow
        raise UserError(f"{args.checkpoint} on {corpus} ({split}): the loss is {result.loss}: the model "
                        "computes non-finite logits on this data")
    window = ("--seq-len" if args.seq_len else "the run's --seq-len" if "train_config" in state else
              "the default; --seq-len sets it")
    print(f"{args.checkpoint} on {corpus} ({split}, rows of {seq_len} tokens: {window}): {result}")
    cap = state.get("train_config", {}).get("eval_tokens")
    if cap and split == "val" and args.max_tokens is None and args.corpus is None and result.tokens > cap:
        print(f"(training's held-out figures read the first {cap:,} tokens of this split: --max-tokens {cap} "
              "gives the same number)")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    import torch

    from mamba2.interop import load
    from mamba2.serving import Engine
    from mamba2.serving.server import ServerSettings, create_app, listen, run

    stops = interrupts_seen()

    for flag in ("request_timeout", "shutdown_timeout"):
        value = getattr(args, flag)
        if not value > 0 or value == float("inf"):
            raise UserError(f"--{flag.replace('_', '-')} must be a finite number of seconds > 0, got {value}")
    if not 0 < args.max_body_mb < float("inf"):
        raise UserError(f"--max-body-mb must be a finite number of MiB > 0, got {args.max_body_mb}")
    if args.max_queue < args.max_batch:
        raise UserError(f"--max-queue {args.max_queue} is below --max-batch {args.max_batch}: the queue counts running "
                        f"requests too, so at most {args.max_queue} could ever run; raise --max-queue or lower "
                        f"--max-batch")
    if args.model_name is not None and not args.model_name.strip():
        raise UserError("--model-name is empty: give the name clients send as 'model', or leave it out (the "
                        "checkpoint directory's name)")
    if args.max_tokens_limit is not None and args.max_tokens_limit >= args.max_len:
        raise UserError(f"--max-tokens-limit {args.max_tokens_limit} is not below --max-len {args.max_len}, which "
                        f"bounds prompt + max_tokens and a prompt has at least one token: give a limit up to "
                        f"{args.max_len - 1}, or raise --max-len")
    device = _device(args.device)
    dtype = getattr(torch, args.dtype)
    loaded = load(args.checkpoint, device=device, dtype=dtype)  # ours, official or transformers format
    if loaded.tokenizer is None:
        raise UserError(f"{args.checkpoint} has no tokenizer (tokenizer.json or tokenizer_spec.json): add one with "
                        "'mamba2 convert SRC DST --to mamba2 --tokenizer tokenizer.json'")
    name = args.model_name or Path(args.checkpoint).resolve().name
    settings = ServerSettings(model_name=name, max_len=args.max_len,
                              max_tokens_limit=args.max_tokens_limit or args.max_len - 1, max_queue=args.max_queue,
                              request_timeout=args.request_timeout,
                              max_body_bytes=max(1, int(args.max_body_mb * 2 ** 20)))
    texts = _texts(args.prefixes)
    engine = Engine(loaded.model, max_batch=args.max_batch, max_len=args.max_len,
                    vocab_size=loaded.tokenizer.vocab_size)
    prefixes = []
    for text in texts:
        if not text:
            raise UserError("an empty --prefix (or --prefix-file) has no state to keep: leave it out")
        ids = _encode_prompt(text, loaded.tokenizer, loaded.config.vocab_size)
        if len(ids) >= args.max_len:
            raise UserError(f"a --prefix of {len(ids)} tokens leaves no room under --max-len {args.max_len}")
        prefixes.append(engine.make_prefix(ids))
    engine.warm_up()
    if interrupts_seen() > stops:     # a stop while loading that some library code caught and dropped
        raise interrupt_for(last_interrupt())
    try:
        sock = listen(args.host, args.port)
    except OSError as e:
        raise UserError(f"cannot listen on {args.host}:{args.port}: {e.strerror or e}") from None
    host, port = sock.getsockname()[:2]
    url = f"http://{f'[{host}]' if ':' in host else host}:{port}"

    def ready() -> None:
        print(f"serving {args.checkpoint} as {name!r} on {url} ({args.dtype} on {device}, max batch {args.max_batch}, "
              f"max len {args.max_len}; Ctrl-C stops)", flush=True)

    if prefixes:
        print(f"prefix states: {', '.join(f'{len(p.ids)} tokens' for p in prefixes)}", flush=True)
    run(create_app(engine, loaded.tokenizer, settings, on_ready=ready, prefixes=tuple(prefixes)), sock,
        shutdown_timeout=args.shutdown_timeout)
    print("stopped", flush=True)
    return 0


def _eval_tasks(args: argparse.Namespace, tasks: list[str], device) -> int:
    try:
        from mamba2.lm_eval_adapter import evaluate_tasks
    except ImportError:
        raise UserError("--tasks needs the lm-evaluation-harness: pip install lm_eval==0.4.13") from None
    results = evaluate_tasks(args.checkpoint, tasks, include_path=args.include_path,
                             include_defaults=args.include_path is None, limit=args.limit,
                             batch_size=args.batch_size, device=str(device), dtype=args.dtype)
    for task, metrics in results["results"].items():
        shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float))
        print(f"{task}: {shown}")
    return 0


def run() -> NoReturn:
    """The process entry point (the ``mamba2`` command and ``python -m mamba2``): exits with :func:`main`'s status.
    Once the command has ended, SIGINT and SIGTERM are ignored while the interpreter shuts down (about a second
    after torch), so that a stop arriving then does not turn a finished command's status into 130 or 143."""
    import signal

    try:
        status = main()
    except KeyboardInterrupt:            # a stop in the instant between main's end and the line below
        status = 130
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    sys.exit(status)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``mamba2`` command (called by :func:`run`); returns the exit status (2 for user errors, 130 after Ctrl-C, 143 after
    SIGTERM; ``serve`` takes those signals as its stop and returns 0 once it has shut down cleanly, as uvicorn and
    gunicorn do)."""
    import signal
    import threading

    # Ctrl-C and SIGTERM (a scheduler's stop) end any command with one line and status 130 / 143, also while torch
    # is being imported, where a stop can surface as another error from a module left half-imported
    defaults = {signal.SIGINT: signal.default_int_handler, signal.SIGTERM: signal.SIG_DFL}
    ours = [sig for sig, default in defaults.items() if threading.current_thread() is threading.main_thread()
            and signal.getsignal(sig) is default]                 # an ignored signal stays ignored
    for sig in ours:
        signal.signal(sig, recording_interrupt)
    seen = interrupts_seen()
    try:
        return _run(argv, seen)
    except Exception:
        if interrupts_seen() == seen:
            raise
        print("\ninterrupted", file=sys.stderr)
        return interrupted_status(interrupt_for(last_interrupt()))
    finally:
        for sig in ours:
            signal.signal(sig, defaults[sig])


def _run(argv: Sequence[str] | None, stops: int) -> int:
    """Parse ``argv`` and run its command, errors meant for the user said in one line (see :func:`main`;
    ``stops``: :func:`~mamba2.errors.interrupts_seen` before)."""
    try:
        args = build_parser().parse_args(argv)
        import torch  # noqa: F401  (every command needs it: imported here, where a Ctrl-C is checked for)

        # torch's import swallows a KeyboardInterrupt raised while it initialises numpy (it only warns): act on it
        if interrupts_seen() > stops:
            raise interrupt_for(last_interrupt())
        return args.func(args)
    except UserError as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        print("\ninterrupted", file=sys.stderr)
        return interrupted_status(e)
    except BrokenPipeError:
        sys.stderr.close()  # output piped into e.g. `head`: stop quietly
        return 0
    except (MemoryError, RuntimeError) as e:  # torch reports a failed CPU allocation as a RuntimeError
        if not _out_of_memory(e):
            raise
        print(f"error: out of memory ({' '.join(str(e).split())[:200]}): use a smaller --batch-size, --seq-len or "
              f"model", file=sys.stderr)
        return 2
