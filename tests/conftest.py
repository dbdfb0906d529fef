"""Shared fixtures: tiny HF checkpoints built once per session, and transformers references.

Nothing here touches the network: HF_HUB_OFFLINE is set before transformers is imported, and
every model is built from a config (tests/tiny_models.py) and loaded from a local folder.
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import functools  # noqa: E402
import json  # noqa: E402
import pathlib  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

import tiny_models  # noqa: E402

# The models are tiny: one intra-op thread is fastest, and on a shared machine several threads
# per matmul spin against the other jobs (the equivalence file took 85 s with 2, 8 s with 1).
torch.set_num_threads(int(os.environ.get("FLEXGEN_TEST_THREADS", "1")))

# Smallest top1 - top2 logit gap allowed on a reference greedy path. The tiny models' logits
# have std ~10; differences between two correct fp32 computations of them (incremental decode vs
# full forward vs a left-padded batch in transformers itself) were at most ~3e-4, so 5e-3 leaves
# a factor > 15. A reference below it is ambiguous: the test's fault, not the engine's.
MIN_MARGIN = 5e-3


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    for item in items:
        if item.get_closest_marker("cuda") is not None:  # the marker, not any keyword named cuda
            item.add_marker(skip)


# ---------------------------------------------------------------- tiny checkpoints


class TinyModels:
    """Tiny checkpoints by arch name, each built on first use into one session folder."""

    def __init__(self, root: pathlib.Path):
        self.root = root
        self._dirs: dict[tuple, pathlib.Path] = {}

    def get(self, arch: str, **options) -> pathlib.Path:
        """The checkpoint folder of `arch` (options as for `tiny_models.make_tiny_model`)."""
        key = (arch, tuple(sorted(options.items())))
        if key not in self._dirs:
            name = "-".join([arch] + [f"{k}={v}" for k, v in key[1]])
            self._dirs[key] = tiny_models.make_tiny_model(arch, self.root / name, **options)
        return self._dirs[key]

    __getitem__ = get


@pytest.fixture(scope="session")
def tiny_models_cache(tmp_path_factory) -> TinyModels:
    return TinyModels(tmp_path_factory.mktemp("tiny_models"))


def _arch_fixture(arch: str):
    @pytest.fixture(scope="session")
    def fixture(tiny_models_cache) -> pathlib.Path:
        return tiny_models_cache[arch]

    fixture.__doc__ = f"Folder of the tiny {arch!r} checkpoint (built once per session)."
    return fixture


# One session fixture per arch: `llama_dir`, `llama_rope_llama3_dir`, ..., `opt350m_dir`.
for _arch in tiny_models.ARCHS:
    globals()[_arch.replace("-", "_") + "_dir"] = _arch_fixture(_arch)


# ---------------------------------------------------------------- transformers references


@functools.lru_cache(maxsize=None)
def hf_model(model_dir: str):
    """The transformers model of a folder: fp32, CPU, eval mode; loaded once per folder."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return model.to("cpu").eval()


def _special_ids(model_dir: str) -> tuple[int | None, int | list[int] | None]:
    """(pad, eos) as the checkpoint's config.json says them (with_eos rewrites that file)."""
    config = json.loads((pathlib.Path(model_dir) / "config.json").read_text())
    eos = config.get("eos_token_id")
    pad = config.get("pad_token_id")
    if pad is None:
        pad = eos[0] if isinstance(eos, list) else eos
    return pad, eos


@functools.lru_cache(maxsize=None)
def _hf_trace(model_dir: str, prompt_ids: tuple[int, ...], max_new_tokens: int):
    model = hf_model(model_dir)
    pad, eos = _special_ids(model_dir)
    ids = torch.tensor([prompt_ids], dtype=torch.long)  # (1, T): one prompt, no padding
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=max_new_tokens,
            pad_token_id=pad,
            eos_token_id=eos,
            output_logits=True,
            return_dict_in_generate=True,
        )
    tokens = out.sequences[0, ids.shape[1]:].tolist()
    gaps = []
    for step_logits in out.logits[: len(tokens)]:  # (1, vocab) per step
        top2 = step_logits[0].topk(2).values
        gaps.append(float(top2[0] - top2[1]))
    return tuple(tokens), tuple(gaps)


def hf_trace(model_dir, prompt_ids, max_new_tokens: int) -> tuple[list[int], list[float]]:
    """Greedy new tokens of one prompt alone under transformers, and the top1 - top2 logit gap
    at every step. Cached per (folder, prompt, max_new_tokens)."""
    tokens, gaps = _hf_trace(str(model_dir), tuple(int(t) for t in prompt_ids), int(max_new_tokens))
    return list(tokens), list(gaps)


def hf_greedy(model_dir, prompt_ids, max_new_tokens: int, *, check_margin: bool = True) -> list[int]:
    """The new tokens of transformers' greedy `generate` for ONE prompt alone (no padding):
    fp32, CPU; stops after EOS like transformers (the EOS token is included)."""
    tokens, gaps = hf_trace(model_dir, prompt_ids, max_new_tokens)
    if check_margin and gaps and min(gaps) < MIN_MARGIN:
        step = gaps.index(min(gaps))
        pytest.fail(
            f"test fixture problem: the reference greedy path of prompt {list(prompt_ids)} on "
            f"{pathlib.Path(model_dir).name} is ambiguous at step {step} (top1 - top2 = "
            f"{min(gaps):.2e} < {MIN_MARGIN}); draw the prompt with `unambiguous_prompts`"
        )
    return tokens


def unambiguous_prompts(model_dir, lengths, max_new_tokens: int, *, seed: int = 0) -> list[list[int]]:
    """Random token-id prompts of the given lengths whose reference greedy path (under
    transformers, `max_new_tokens` steps) never has a top1 - top2 gap below MIN_MARGIN.
    Reproducible from `seed`; a prompt that fails is replaced by the next draw."""
    gen = torch.Generator().manual_seed(seed)
    prompts = []
    for length in lengths:
        for _ in range(50):
            ids = torch.randint(tiny_models.FIRST_FREE_ID, tiny_models.VOCAB_SIZE, (length,), generator=gen)
            prompt = ids.tolist()
            if min(hf_trace(model_dir, prompt, max_new_tokens)[1]) >= MIN_MARGIN:
                prompts.append(prompt)
                break
        else:
            raise RuntimeError(f"no prompt of length {length} with a clear greedy path on {model_dir}")
    return prompts


@pytest.fixture(name="hf_greedy", scope="session")
def _hf_greedy_fixture():
    """`hf_greedy(model_dir, prompt_ids, max_new_tokens) -> list[int]` (see the function)."""
    return hf_greedy


@pytest.fixture(name="unambiguous_prompts", scope="session")
def _unambiguous_prompts_fixture():
    """`unambiguous_prompts(model_dir, lengths, max_new_tokens, seed=0)` (see the function)."""
    return unambiguous_prompts


@pytest.fixture
def cli(capsys):
    """python -m flexgen_dist.run in this process: call(*args) -> (exit code, stdout, stderr)."""
    import logging

    from flexgen_dist.run import main

    def call(*args):
        code = main([str(a) for a in args])
        out, err = capsys.readouterr()
        return code, out, err

    yield call
    root = logging.getLogger()  # the command installs a handler on the captured stderr: drop it
    for handler in list(root.handlers):
        if getattr(handler, "_flexgen_dist", False):
            root.removeHandler(handler)
