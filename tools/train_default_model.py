"""Train the small Llama model that ships with flexgen_dist (``flexgen_dist/models/default``).

The model exists so that tests, examples and benchmarks have a real, trained Hugging Face
checkpoint to load with no network: its outputs are text, not noise, so a wrong layer, a
misplaced cache entry or a bad dequantization shows up as a change in perplexity and in the
greedy continuations, not only as a change in random numbers.

Everything it learns from ships with Python itself, so the script needs no download:

* the reference documentation in ``pydoc_data.topics`` (one document per topic), and
* the docstrings of the standard library: one document per module (private modules
  included; test suites, scripts and modules that act on import skipped), holding the module
  docstring, then each class, function and method defined there with its signature and
  docstring. A docstring seen before is not repeated. Default values in signatures are shown
  only when they are short literals: others are computed on the machine that runs this and may
  hold paths, addresses or the environment.

Steps
  1. Build the corpus (deterministic order) and hold out about 5% of the documents, chosen by a
     hash of the document name, for evaluation.
  2. Train a byte-level BPE tokenizer (``tokenizers``) and wrap it as a
     ``transformers.PreTrainedTokenizerFast``. ``<|endoftext|>`` is bos, eos and pad.
  3. Train a ``LlamaForCausalLM`` (4 layers, hidden 256, 8 query heads sharing 2 KV heads,
     untied lm_head, 512 positions) with a plain torch loop (AdamW, linear warmup then cosine
     decay, gradient clipping) on the training documents concatenated with eos between them,
     cut into sequences of 256 tokens. The last part of training (``--long-fraction``) uses
     sequences of ``max_position_embeddings`` tokens (same tokens per step) so that every
     position the config advertises has been trained. Training stops cleanly at the time
     budget (``--minutes``); the learning-rate schedule follows the fraction of the budget
     used, so it reaches its minimum when the time is up.
  4. Save model (float16 safetensors), generation config and tokenizer with ``save_pretrained``,
     and the held-out text to ``flexgen_dist/data/heldout.txt`` (UTF-8, documents joined by
     a blank line, one newline at the end). It is capped at ``--max-heldout-chars`` (300,000
     characters): held-out documents past the cap would be dropped from it (and still not
     trained on). Built with Python 3.11.7 it is 233 KB and nothing is dropped.
  5. Reload the saved model from disk (float16 weights computed in float32) and log the
     held-out perplexity and that of an add-one smoothed unigram model. See
     ``heldout_perplexity`` for the exact procedure.

Run (others share the machine, hence ``nice``; about 30 minutes in all on 2 cores):

    nice -n 10 python tools/train_default_model.py --minutes 24

Seeds are fixed, so the corpus, the split and the tokenizer are reproducible on a given
Python version (the corpus is the docs of the Python that runs this; 3.11.7 here). The model is reproducible given the same number of steps
(``--max-steps``); with only a time budget, the step count depends on the machine.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import hashlib
import importlib
import importlib.util
import inspect
import io
import json
import logging
import math
import pkgutil
import random
import sys
import time
import warnings
from pathlib import Path

import torch

log = logging.getLogger("train_default_model")

REPO_ROOT = Path(__file__).resolve().parent.parent
MODEL_DIR = REPO_ROOT / "flexgen_dist" / "models" / "default"
HELDOUT_PATH = REPO_ROOT / "flexgen_dist" / "data" / "heldout.txt"
WORK_DIR = REPO_ROOT / "tools" / "_train_work"

EOS = "<|endoftext|>"
SEED = 1234

# Top-level stdlib modules that are not imported: they act on import (open a browser, print,
# start a GUI, create a venv), are test suites, or duplicate a public module.
SKIP_TOP_LEVEL = {
    "antigravity", "this", "tkinter", "turtle", "turtledemo", "idlelib", "test", "lib2to3",
    "ensurepip", "venv", "pydoc_data", "encodings", "__main__", "__phello__", "msilib",
    "winreg", "winsound", "msvcrt", "nt", "_msi", "xxsubtype", "xxlimited", "xxlimited_35",
}
# Submodule name parts that are never imported (scripts and test suites inside packages).
SKIP_PARTS = {"__main__", "test", "tests", "idle_test"}


# ----------------------------------------------------------------------------------------------
# Corpus
# ----------------------------------------------------------------------------------------------

def pydoc_topic_documents() -> list[tuple[str, str]]:
    """One (name, text) document per topic of the reference documentation, sorted by name."""
    from pydoc_data.topics import topics

    return [(f"topic:{name}", topics[name].strip()) for name in sorted(topics)]


def _stdlib_module_names() -> list[str]:
    """Importable stdlib module names (packages walked recursively), sorted, skips applied."""
    names: list[str] = []
    for top in sorted(sys.stdlib_module_names):
        if top in SKIP_TOP_LEVEL:
            continue
        names.append(top)
        spec = importlib.util.find_spec(top) if _safe_find(top) else None
        if spec is None or not spec.submodule_search_locations:
            continue
        for info in pkgutil.walk_packages(spec.submodule_search_locations, prefix=top + ".",
                                          onerror=lambda _name: None):
            parts = info.name.split(".")
            if any(p in SKIP_PARTS for p in parts[1:]):
                continue
            names.append(info.name)
    return sorted(set(names))


def _safe_find(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def _import_quietly(name: str):
    """Import a module with its output swallowed; None when the import fails in any way."""
    sink = io.StringIO()
    try:
        with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink), \
                warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return importlib.import_module(name)
    except BaseException:  # noqa: BLE001 - SystemExit, ImportError, OSError, ...: skip it
        return None


def _clean(doc: str | None) -> str:
    """Docstring with trailing spaces and blank edges removed ('' for None)."""
    return "\n".join(line.rstrip() for line in (doc or "").splitlines()).strip()


class _Elided:
    """Stands in for a default value that is not shown."""

    def __repr__(self) -> str:
        return "..."


def _safe_default(value) -> bool:
    """Show only short literal defaults. Others are computed on this machine and may hold
    addresses, paths or even the environment (``cgi.parse(environ=os.environ)``)."""
    text = repr(value)
    if len(text) > 24 or "/" in text or "\\" in text:
        return False
    try:
        ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return False
    return True


def _signature(obj) -> str:
    """The call signature as text with unsafe defaults shown as '...', or '' if there is none."""
    try:
        signature = inspect.signature(obj)
    except Exception:  # noqa: BLE001 - builtins whose text signature does not evaluate
        return ""
    params = [p if p.default is p.empty or _safe_default(p.default)
              else p.replace(default=_Elided()) for p in signature.parameters.values()]
    text = str(signature.replace(parameters=params, return_annotation=signature.empty))
    return text if len(text) <= 200 else "(...)"


def _member_entries(module, seen_docs: set[str]) -> list[str]:
    """'qualified.name(signature)\\ndocstring' for public classes, functions and methods defined
    in ``module``, sorted by name. A docstring already used anywhere earlier is skipped."""
    entries: list[str] = []

    def add(qualname: str, obj) -> None:
        doc = _clean(inspect.getdoc(obj))
        if not doc or doc in seen_docs:
            return
        seen_docs.add(doc)
        entries.append(f"{qualname}{_signature(obj)}\n{doc}")

    for name, obj in sorted(vars(module).items()):
        if name.startswith("__") or getattr(obj, "__module__", None) != module.__name__:
            continue
        if inspect.isclass(obj):
            add(f"{module.__name__}.{name}", obj)
            for attr, member in sorted(vars(obj).items()):
                if isinstance(member, (staticmethod, classmethod)):
                    member = member.__func__
                if inspect.isfunction(member) or inspect.ismethoddescriptor(member) \
                        or isinstance(member, property):
                    add(f"{module.__name__}.{name}.{attr}", member)
        elif inspect.isfunction(obj) or inspect.isbuiltin(obj):
            add(f"{module.__name__}.{name}", obj)
    return entries


def stdlib_docstring_documents() -> list[tuple[str, str]]:
    """One (name, text) document per stdlib module that imports cleanly, sorted by name."""
    documents: list[tuple[str, str]] = []
    seen_docs: set[str] = set()
    for name in _stdlib_module_names():
        module = _import_quietly(name)
        if module is None:
            continue
        parts: list[str] = []
        module_doc = _clean(inspect.getdoc(module))
        if module_doc and module_doc not in seen_docs:
            seen_docs.add(module_doc)
            parts.append(f"Module {name}\n\n{module_doc}")
        parts.extend(_member_entries(module, seen_docs))
        if parts:
            documents.append((f"module:{name}", "\n\n".join(parts)))
    return documents


def is_heldout(name: str, percent: int = 5) -> bool:
    """Deterministic ~percent% split by document name (independent of PYTHONHASHSEED)."""
    digest = hashlib.sha256(name.encode("utf-8")).digest()
    return int.from_bytes(digest[:4], "big") % 100 < percent


def build_corpus(max_heldout_chars: int) -> tuple[list[str], list[str]]:
    """Train and held-out documents. Held-out documents beyond ``max_heldout_chars`` (in corpus
    order) are trimmed: dropped from evaluation, and never used for training either."""
    documents = pydoc_topic_documents() + stdlib_docstring_documents()
    documents = [(name, text.replace("\r\n", "\n")) for name, text in documents if text.strip()]
    train = [text for name, text in documents if not is_heldout(name)]
    heldout_all = [text for name, text in documents if is_heldout(name)]
    heldout, used = [], 0
    for text in heldout_all:
        if used + len(text) + 2 > max_heldout_chars:
            continue
        heldout.append(text)
        used += len(text) + 2
    log.info("corpus: %d documents, %d train (%.2f MB), %d held out (%.2f MB); %d held-out "
             "documents (%.2f MB) trimmed to stay under %d characters",
             len(documents), len(train), sum(map(len, train)) / 1e6, len(heldout),
             sum(map(len, heldout)) / 1e6, len(heldout_all) - len(heldout),
             (sum(map(len, heldout_all)) - sum(map(len, heldout))) / 1e6, max_heldout_chars)
    return train, heldout


# ----------------------------------------------------------------------------------------------
# Tokenizer
# ----------------------------------------------------------------------------------------------

def train_tokenizer(train_docs: list[str], vocab_size: int, max_length: int):
    """Byte-level BPE (GPT-2 style pre-tokenization, no prefix space), wrapped for transformers.
    Encoding adds no special tokens; ``<|endoftext|>`` (id 0) is bos, eos and pad."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(train_docs, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=EOS, eos_token=EOS, pad_token=EOS,
        model_max_length=max_length, clean_up_tokenization_spaces=False)


def _portable_tokenizer_config(path: Path) -> None:
    """transformers 5 names the class ``TokenizersBackend``; 4.x only knows the older name,
    which 5.x still accepts as an alias. Write the one both load."""
    config = json.loads(path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    path.write_text(json.dumps(config, indent=2) + "\n")


def encode_documents(tokenizer, docs: list[str]) -> list[list[int]]:
    """Each document encoded alone, no special tokens (the backend directly: same ids, and no
    warning about documents longer than the model's context)."""
    encodings = tokenizer.backend_tokenizer.encode_batch(docs, add_special_tokens=False)
    return [encoding.ids for encoding in encodings]


# ----------------------------------------------------------------------------------------------
# Model and training
# ----------------------------------------------------------------------------------------------

def make_config(args, tokenizer):
    from transformers import LlamaConfig

    eos_id = tokenizer.convert_tokens_to_ids(EOS)
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=8,
        num_key_value_heads=2,  # grouped-query attention: 4 query heads share each KV head
        max_position_embeddings=args.max_positions,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        hidden_act="silu",
        tie_word_embeddings=False,  # separate lm_head: the common Llama layout
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
        initializer_range=0.02,
    )


class Batches:
    """Random non-overlapping windows of a token stream, epoch by epoch, from a seeded RNG."""

    def __init__(self, stream: torch.Tensor, seed: int):
        self.stream = stream
        self.generator = torch.Generator().manual_seed(seed)
        self.order: list[int] = []
        self.seq_len = 0
        self.epochs = 0.0

    def next(self, batch_size: int, seq_len: int) -> torch.Tensor:
        if seq_len != self.seq_len:  # new length: new windows
            self.seq_len, self.order = seq_len, []
        rows = []
        for _ in range(batch_size):
            if not self.order:
                count = len(self.stream) // seq_len
                offset = int(torch.randint(seq_len, (1,), generator=self.generator))
                offset = min(offset, len(self.stream) - count * seq_len)
                starts = torch.randperm(count, generator=self.generator) * seq_len + offset
                self.order = starts.tolist()
            start = self.order.pop()
            rows.append(self.stream[start:start + seq_len])
            self.epochs += seq_len / len(self.stream)
        return torch.stack(rows)  # (B, T)


def learning_rate(progress: float, step: int, args) -> float:
    """Linear warmup over ``warmup_steps``, then cosine from peak to ``min_lr_ratio * peak``
    over the budget (``progress`` in [0, 1])."""
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    return args.lr * (args.min_lr_ratio + (1.0 - args.min_lr_ratio) * cosine)


def train(model, stream: torch.Tensor, args, monitor_windows: list[list[int]]) -> dict:
    """Train in place until the time budget (or ``args.max_steps``) is spent. Every
    ``args.eval_every`` steps the perplexity on ``monitor_windows`` (a few held-out windows) is
    logged, to watch for overfitting; it is not used to choose anything."""
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay},
         {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.95), eps=1e-8)
    batches = Batches(stream, seed=SEED)
    tokens_per_step = args.batch_size * args.seq_len
    budget_s = args.minutes * 60.0
    start = time.monotonic()
    step, smoothed, progress = 0, None, 0.0
    model.train()
    while progress < 1.0:
        progress = (time.monotonic() - start) / budget_s
        if args.max_steps:
            progress = max(progress, step / args.max_steps)
        if progress >= 1.0:
            break
        long_phase = progress >= 1.0 - args.long_fraction
        seq_len = args.max_positions if long_phase else args.seq_len
        batch = batches.next(tokens_per_step // seq_len, seq_len)
        lr = learning_rate(progress, step, args)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        value = loss.item()
        smoothed = value if smoothed is None else 0.95 * smoothed + 0.05 * value
        if step % args.log_every == 0 or step == 1:
            elapsed = time.monotonic() - start
            log.info("step %5d  loss %.4f  (smoothed %.4f)  lr %.2e  grad-norm %.2f  seq %d  "
                     "epochs %.2f  %.0f tok/s  %.1f min", step, value, smoothed, lr,
                     float(grad_norm), seq_len, batches.epochs, step * tokens_per_step / elapsed,
                     elapsed / 60)
        if args.eval_every and step % args.eval_every == 0:
            monitor_ppl, _ = heldout_perplexity(model, monitor_windows)
            model.train()
            log.info("step %5d  held-out monitor perplexity %.2f (%d windows)", step,
                     monitor_ppl, len(monitor_windows))
    elapsed = time.monotonic() - start
    log.info("training done: %d steps, %.1f min, %d tokens (%.2f epochs), final loss %.4f "
             "(smoothed %.4f)", step, elapsed / 60, step * tokens_per_step, batches.epochs,
             value, smoothed)
    return {"steps": step, "minutes": elapsed / 60, "tokens": step * tokens_per_step,
            "epochs": batches.epochs, "final_loss": value, "final_loss_smoothed": smoothed}


# ----------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------

def heldout_windows(tokenizer, text: str, window: int) -> list[list[int]]:
    """The held-out evaluation windows.

    The whole file (``heldout.txt`` read as UTF-8, exactly as written, trailing newline
    included) is encoded as one string with no special tokens (no bos, no eos). The ids are cut
    into consecutive non-overlapping windows of ``window`` tokens (stride = window); the last,
    shorter window is kept when it has at least 2 tokens. Each window is scored on its own,
    from an empty cache: every token of a window but the first is a target, predicted from the
    tokens before it in the same window (this is the transformers perplexity recipe with
    stride = max_length)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    windows = [ids[i:i + window] for i in range(0, len(ids), window)]
    return [w for w in windows if len(w) >= 2]


@torch.no_grad()
def heldout_perplexity(model, windows: list[list[int]]) -> tuple[float, int]:
    """exp(sum of target negative log-likelihoods / number of targets), float32 compute."""
    model.eval()
    total_nll, count = 0.0, 0
    for window in windows:
        input_ids = torch.tensor([window])  # (1, T)
        logits = model(input_ids=input_ids).logits.float()  # (1, T, V)
        logprobs = torch.log_softmax(logits[0, :-1], dim=-1)  # (T-1, V)
        targets = input_ids[0, 1:]  # (T-1,)
        total_nll -= logprobs.gather(1, targets[:, None]).sum().item()
        count += len(window) - 1
    return math.exp(total_nll / count), count


def unigram_perplexity(train_ids: list[list[int]], windows: list[list[int]],
                       vocab_size: int) -> float:
    """Add-one smoothed unigram model: p(t) = (count_train(t) + 1) / (N_train + V), counts over
    the training documents (each encoded alone, no special tokens), scored on the same targets
    as the transformer (every window token but the first)."""
    counts = torch.zeros(vocab_size, dtype=torch.float64)
    for ids in train_ids:
        counts += torch.bincount(torch.tensor(ids, dtype=torch.long), minlength=vocab_size)
    logprob = torch.log((counts + 1.0) / (counts.sum() + vocab_size))
    targets = torch.tensor([t for w in windows for t in w[1:]], dtype=torch.long)
    return math.exp(-logprob[targets].mean().item())


@torch.no_grad()
def greedy_samples(model, tokenizer, prompts: list[str], new_tokens: int = 40) -> list[str]:
    model.eval()
    samples = []
    for prompt in prompts:
        input_ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids
        output = model.generate(input_ids, max_new_tokens=new_tokens, do_sample=False)
        samples.append(tokenizer.decode(output[0], skip_special_tokens=True))
    return samples


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=24.0, help="training time budget")
    p.add_argument("--max-steps", type=int, default=0, help="also stop after this many steps")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--intermediate", type=int, default=688)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--max-positions", type=int, default=512)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--long-fraction", type=float, default=0.15,
                   help="last fraction of the budget trained on max-positions-long sequences")
    p.add_argument("--batch-size", type=int, default=8, help="sequences of seq-len per step")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--min-lr-ratio", type=float, default=0.1)
    p.add_argument("--warmup-steps", type=int, default=50)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--clip", type=float, default=1.0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--eval-every", type=int, default=200,
                   help="log the perplexity of a few held-out windows this often (0: never)")
    p.add_argument("--max-heldout-chars", type=int, default=300_000)
    p.add_argument("--out", type=Path, default=MODEL_DIR)
    p.add_argument("--heldout-out", type=Path, default=HELDOUT_PATH)
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    torch.set_num_threads(args.threads)
    random.seed(SEED)
    torch.manual_seed(SEED)
    t0 = time.monotonic()

    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    train_docs, heldout_docs = build_corpus(args.max_heldout_chars)
    heldout_text = "\n\n".join(heldout_docs) + "\n"
    tokenizer = train_tokenizer(train_docs, args.vocab, args.max_positions)
    eos_id = tokenizer.eos_token_id
    train_ids = encode_documents(tokenizer, train_docs)
    stream = torch.tensor([t for ids in train_ids for t in ids + [eos_id]], dtype=torch.long)
    log.info("tokenizer: %d tokens; train stream %d tokens (%.2f chars/token); %.1f min so far",
             len(tokenizer), len(stream), sum(map(len, train_docs)) / len(stream),
             (time.monotonic() - t0) / 60)

    config = make_config(args, tokenizer)
    model = LlamaForCausalLM(config)
    log.info("model: %d parameters; config %s", sum(p.numel() for p in model.parameters()),
             json.dumps({k: getattr(config, k) for k in (
                 "num_hidden_layers", "hidden_size", "num_attention_heads",
                 "num_key_value_heads", "intermediate_size", "vocab_size",
                 "max_position_embeddings", "tie_word_embeddings")}))
    monitor_windows = heldout_windows(tokenizer, heldout_text, args.seq_len)[::40][:8]
    stats = train(model, stream, args, monitor_windows)

    # Save: float16 weights, generation config, tokenizer; then the held-out text.
    args.out.mkdir(parents=True, exist_ok=True)
    for old in args.out.iterdir():  # stale files of an earlier run (e.g. a different layout)
        if old.is_file():
            old.unlink()
    model.generation_config.update(bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=eos_id,
                                   do_sample=False)
    model.to(torch.float16).save_pretrained(args.out, safe_serialization=True)
    tokenizer.save_pretrained(args.out)
    _portable_tokenizer_config(args.out / "tokenizer_config.json")
    for path in args.out.iterdir():
        path.chmod(0o644)  # safetensors writes 0600; these are package data
    args.heldout_out.parent.mkdir(parents=True, exist_ok=True)
    args.heldout_out.write_text(heldout_text, encoding="utf-8")
    sizes = {p.name: p.stat().st_size for p in sorted(args.out.iterdir())}
    log.info("saved %s: %s (%.2f MB in all); held-out text %s: %d bytes", args.out, sizes,
             sum(sizes.values()) / 1e6, args.heldout_out, args.heldout_out.stat().st_size)

    # Evaluate what was shipped: reload from disk, compute in float32.
    shipped = AutoModelForCausalLM.from_pretrained(args.out, dtype=torch.float32)
    text = args.heldout_out.read_text(encoding="utf-8")
    windows = heldout_windows(tokenizer, text, args.max_positions)
    ppl, targets = heldout_perplexity(shipped, windows)
    unigram = unigram_perplexity(train_ids, windows, len(tokenizer))
    log.info("held-out perplexity %.3f over %d targets (%d windows of <= %d tokens); "
             "unigram (add-one) perplexity %.3f", ppl, targets, len(windows),
             args.max_positions, unigram)
    prompts = ["The list data type", "Return the number of", "This module provides",
               "If the argument is"]
    for sample in greedy_samples(shipped, tokenizer, prompts):
        log.info("sample: %r", sample)
    report = dict(stats, heldout_perplexity=ppl, heldout_targets=targets,
                  unigram_perplexity=unigram, sizes=sizes,
                  total_minutes=(time.monotonic() - t0) / 60)
    WORK_DIR.mkdir(parents=True, exist_ok=True)
    (WORK_DIR / "report.json").write_text(json.dumps(report, indent=2))
    log.info("done in %.1f min", report["total_minutes"])


if __name__ == "__main__":
    main()
