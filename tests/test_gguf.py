"""GGUF files (llama.cpp's format) as models: `--model FILE.gguf` equals transformers'
`AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)` token for token (fp32, CPU).

The files are written with the gguf package from the tiny random checkpoints (tests/tiny_gguf.py,
as llama.cpp's converter writes them): F32, F16, Q8_0, Q4_1, Q4_0 and a mix of Q4_1 layers with a
Q8_0 head. The Q4_0 / Q4_1 / Q8_0 matrices stay compressed (our groups, exactly: every weight equals
transformers' loaded parameter bit for bit), in memory and on disk, and the planner counts them at
their compressed size. Damaged files, an unsupported architecture and a folder of two files are
one line, exit 2. Each reference path is checked to be unambiguous (conftest.MIN_MARGIN).
"""

from __future__ import annotations

import functools
import os
import sys

import pytest
import torch

pytest.importorskip("gguf")

from conftest import MIN_MARGIN  # noqa: E402
from flexgen_dist import LLM, Policy, Runtime  # noqa: E402
from flexgen_dist.errors import UserError  # noqa: E402
from flexgen_dist.api.model_source import ModelSource  # noqa: E402
from flexgen_dist.model.gguf import _gguf_config  # noqa: E402
from flexgen_dist.planning.compression import CompressionConfig, compressed_nbytes  # noqa: E402
from flexgen_dist.spec.gguf import read_gguf_header  # noqa: E402
from flexgen_dist.spec.layout import model_units  # noqa: E402
from flexgen_dist.storage.quantize import dequantize  # noqa: E402
import tiny_gguf  # noqa: E402
import tiny_models  # noqa: E402

_ON_DEVICE = dict(w_gpu_percent=100, w_cpu_percent=0, cache_gpu_percent=100, cache_cpu_percent=0,
                  act_gpu_percent=100, act_cpu_percent=0)
_WEIGHTS_ON_DISK = dict(_ON_DEVICE, w_gpu_percent=0, w_cpu_percent=0)
_FP32 = Runtime(device="cpu", compute_dtype="float32")
# GGUF file name -> (matrix type, other tensors' types by GGUF name)
FILES = {
    "F32": ("F32", None),
    "F16": ("F16", None),
    "Q8_0": ("Q8_0", None),
    "Q4_1": ("Q4_1", None),
    "Q4_0": ("Q4_0", None),
    # Q4_1 layers and embedding (kept as 4-bit groups) with a Q8_0 head (dequantized: one width is kept)
    "Q4_1-Q8_0-head": ("Q4_1", {"output.weight": "Q8_0"}),
}


@pytest.fixture(scope="session")
def gguf_files(tiny_models_cache, tmp_path_factory):
    """`get(kind, arch="llama", head_dim=None, **written)`: the folder holding `model.gguf` of
    FILES[kind], written once from the tiny `arch` checkpoint (of that head_dim when given) with
    tiny_gguf.write_gguf's other options (architecture, name)."""
    root = tmp_path_factory.mktemp("gguf")

    @functools.lru_cache(maxsize=None)
    def get(kind: str, arch: str = "llama", head_dim: int | None = None, **written):
        folder = root / "-".join([arch, kind] + [f"{k}={v}" for k, v in sorted(written.items())])
        folder.mkdir()
        matrix_type, types = FILES[kind]
        hf_dir = tiny_models_cache.get(arch, **({"head_dim": head_dim} if head_dim else {}))
        tiny_gguf.write_gguf(hf_dir, folder / "model.gguf", matrix_type, types=types, **written)
        return folder

    return get


@functools.lru_cache(maxsize=None)
def _reference_model(folder: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, gguf_file="model.gguf", dtype=torch.float32).eval()


@functools.lru_cache(maxsize=None)
def _reference(folder: str, prompt: tuple[int, ...], max_new_tokens: int) -> tuple[tuple[int, ...], float]:
    """transformers' greedy tokens of one prompt on the GGUF file, and the smallest top1 - top2 gap."""
    model = _reference_model(folder)
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=max_new_tokens,
                             pad_token_id=tiny_models.PAD_ID, eos_token_id=tiny_models.EOS_ID, output_logits=True,
                             return_dict_in_generate=True)
    gaps = [float(logits[0].topk(2).values.diff().abs()) for logits in out.logits]
    return tuple(out.sequences[0, ids.shape[1]:].tolist()), min(gaps)


def _prompts(folder, lengths, max_new_tokens: int, seed: int = 0) -> list[list[int]]:
    """Random token prompts whose reference path on the file is unambiguous."""
    gen = torch.Generator().manual_seed(seed)
    prompts = []
    for length in lengths:
        for _ in range(50):
            prompt = torch.randint(tiny_models.FIRST_FREE_ID, tiny_models.VOCAB_SIZE, (length,), generator=gen).tolist()
            if _reference(str(folder), tuple(prompt), max_new_tokens)[1] >= MIN_MARGIN:
                prompts.append(prompt)
                break
        else:
            raise RuntimeError(f"no prompt of length {length} with a clear greedy path on {folder}")
    return prompts


def _assert_matches(folder, policy: dict | None, offload_dir, runtime: Runtime = _FP32, lengths=(5, 9, 9, 14),
                    max_new_tokens: int = 10, model=None) -> LLM:
    prompts = _prompts(folder, lengths, max_new_tokens)
    with LLM(str(model or folder / "model.gguf"), policy=Policy(gpu_batch_size=2, num_gpu_batches=2, **policy)
             if policy is not None else None, offload_dir=str(offload_dir), runtime=runtime) as llm:
        result = llm.generate(prompts, max_new_tokens=max_new_tokens, do_sample=False)
    for prompt, out in zip(prompts, result.outputs):
        want = list(_reference(str(folder), tuple(prompt), max_new_tokens)[0])
        assert list(out.output_ids) == want, f"prompt {prompt}: engine {list(out.output_ids)} != transformers {want}"
    return llm


@pytest.mark.parametrize("name", list(FILES))
def test_weights_equal_transformers(name, gguf_files):
    """Every weight as we hold it (kept groups dequantized) is transformers' parameter bit for bit:
    q/k rows unpermuted as transformers does, Q4_0 / Q4_1 / Q8_0 blocks as exact groups."""
    folder = gguf_files(name)
    source = ModelSource.from_gguf(folder / "model.gguf")
    params = dict(_reference_model(str(folder)).named_parameters())
    groups = source.spec.stored_groups
    config = CompressionConfig(bits=groups.bits, group_size=32) if groups is not None else None
    kept = 0
    for ws in (ws for unit in model_units(source.spec) for ws in unit.weights):
        grouped = source.weights.grouped(ws, config) if config is not None else None
        mine = dequantize(grouped) if grouped is not None else source.weights.get(ws).float()
        kept += grouped is not None
        assert torch.equal(mine, params[ws.key]), f"{name}: {ws.key} differs from transformers'"
    # 2 layers of 7 matrices, the embedding and the head; the mixed file's Q8_0 head is not kept
    assert kept == {"F32": 0, "F16": 0, "Q4_1-Q8_0-head": 15}.get(name, 16)
    source.weights.close()


@pytest.mark.parametrize("name", ["F32", "F16", "Q8_0", "Q4_1", "Q4_0"])
def test_greedy_matches_transformers_in_memory(name, gguf_files, tmp_path):
    _assert_matches(gguf_files(name), _ON_DEVICE, tmp_path)


@pytest.mark.parametrize("name", ["F32", "Q8_0", "Q4_1"])
def test_greedy_matches_transformers_weights_on_disk(name, gguf_files, tmp_path):
    """Weights written once into the offload folder (groups as the file holds them) and reused."""
    folder = gguf_files(name)
    _assert_matches(folder, _WEIGHTS_ON_DISK, tmp_path)
    files = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in tmp_path.rglob("*.bin")}
    suffix = ".data.bin" if name != "F32" else ".weight.bin"
    assert any(n.endswith(suffix) for n in files), sorted(files)
    held = [open(p, "rb") for p in tmp_path.rglob("*.bin")]  # their inodes cannot be reused meanwhile
    try:
        _assert_matches(folder, _WEIGHTS_ON_DISK, tmp_path)
    finally:
        for f in held:
            f.close()
    again = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in tmp_path.rglob("*.bin")}
    assert again == files, "the second run rewrote files of an unchanged GGUF"


def test_mixed_widths_keep_one_and_dequantize_the_other(gguf_files, tmp_path):
    """Q4_1 matrices stay 4-bit groups; the Q8_0 head is dequantized (float32 storage: exact)."""
    llm = _assert_matches(gguf_files("Q4_1-Q8_0-head"), dict(_ON_DEVICE, w_gpu_percent=50, w_cpu_percent=50),
                          tmp_path, runtime=Runtime(device="cpu", compute_dtype="float32", storage_dtype="float32"))
    places = {w.name: w for places in llm.placement.weights.values() for w in places}
    assert not places["lm_head.weight"].compressed and places["self_attn.q_proj.weight"].compressed


def test_planner_counts_groups_at_their_size(gguf_files, tmp_path):
    """The planner's own policy (none given) runs the kept groups compressed, and every kept
    weight is planned at its compressed bytes (4-bit groups of 32), the norms as they are."""
    llm = _assert_matches(gguf_files("Q4_1"), None, tmp_path)
    assert llm.policy.compression.bits == 4 and llm.policy.compression.group_size == 32
    for places in llm.placement.weights.values():
        for w in places:
            if len(w.shape) == 2 and not w.shared:
                assert w.compressed and w.nbytes == compressed_nbytes(w.shape, llm.policy.compression), w
            else:
                assert not w.compressed, w


def test_other_llama_shapes_and_families(gguf_files, tmp_path):
    """A tied head (no output.weight), Mistral (written as llama, as llama.cpp does: transformers
    reads it as llama unless its general.name is exactly "mistral"), Qwen2 (biases, rows not
    permuted) and Qwen3 (q/k norms; head_dim 128, the only one transformers reads from a GGUF's
    qwen3 metadata): greedy tokens equal transformers'."""
    cases = [gguf_files("Q8_0", "llama-tied"),
             gguf_files("F32", "mistral", architecture="llama", name="Mistral 7B"),
             gguf_files("Q8_0", "qwen2"),
             gguf_files("F16", "qwen3", head_dim=128)]
    for folder in cases:
        _assert_matches(folder, _ON_DEVICE, tmp_path / folder.name)


def test_config_is_transformers_reading(gguf_files):
    """Our config of the metadata is the dict transformers' load_gguf_checkpoint makes of it."""
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    for folder in (gguf_files("Q8_0"), gguf_files("Q8_0", "llama-tied"),
                   gguf_files("F32", "mistral", architecture="llama", name="mistral"), gguf_files("Q8_0", "qwen2")):
        path = folder / "model.gguf"
        assert _gguf_config(read_gguf_header(path)) == load_gguf_checkpoint(str(path))["config"], path


def test_cli_text_prompt_and_a_folder_of_one_file(gguf_files, cli, tmp_path):
    """--model FILE.gguf (in memory) and --model FOLDER (one .gguf, no config.json; the weights on
    disk): the tokenizer from the file's metadata, the same ids and text as transformers'
    tokenizer and model."""
    from transformers import AutoTokenizer

    folder = gguf_files("Q8_0")
    tokenizer = AutoTokenizer.from_pretrained(str(folder), gguf_file="model.gguf")
    text = "the head of the house"
    ids = tokenizer(text)["input_ids"]
    assert tiny_gguf.MERGED in ids  # the merge "h e" is used
    want, margin = _reference(str(folder), tuple(ids), 6)
    assert margin >= MIN_MARGIN
    on_disk = ("--percent", 0, 0, 100, 0, 100, 0, "--offload-dir", tmp_path)
    for model, placement in ((folder / "model.gguf", ()), (folder, on_disk)):
        code, out, err = cli("--model", model, "--prompt", text, "--gen-len", 6, "--device", "cpu",
                             "--compute-dtype", "float32", "--no-warmup", "--quiet", *placement)
        assert code == 0, err
        assert tokenizer.decode(list(want), skip_special_tokens=True) in out, out


def _one_line(code: int, err: str, fragment: str) -> None:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert "Traceback" not in err, err
    assert code == 2 and len(lines) == 1 and fragment in lines[0], err


def test_damaged_files_are_one_line(gguf_files, tmp_path, cli):
    data = (gguf_files("Q8_0") / "model.gguf").read_bytes()
    cases = {"truncated.gguf": (data[: len(data) - 100], "is truncated: tensor"),
             "header.gguf": (data[:300], "ends inside its header"),
             "magic.gguf": (b"GGUX" + data[4:], "is not a GGUF file"),
             "empty.gguf": (b"", "is not a GGUF file")}
    for name, (content, fragment) in cases.items():
        path = tmp_path / name
        path.write_bytes(content)
        code, _, err = cli("--model", path, "--prompt", "x", "--gen-len", 2, "--device", "cpu", "--no-warmup")
        _one_line(code, err, fragment)


def test_unsupported_architecture_and_two_files_are_one_line(gguf_files, tmp_path, cli):
    import gguf
    import numpy as np

    falcon = tmp_path / "falcon.gguf"
    writer = gguf.GGUFWriter(str(falcon), "falcon")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((8, 32), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    code, _, err = cli("--model", falcon, "--prompt", "x", "--gen-len", 2, "--device", "cpu", "--no-warmup")
    _one_line(code, err, "architecture 'falcon', which is not supported")
    two = tmp_path / "two"
    two.mkdir()
    for name in ("a.gguf", "b.gguf"):
        os.link(gguf_files("Q8_0") / "model.gguf", two / name)
    code, _, err = cli("--model", two, "--prompt", "x", "--gen-len", 2, "--device", "cpu", "--no-warmup")
    _one_line(code, err, "holds 2 GGUF files")


def test_hf_folders_run_without_the_gguf_package(llama_dir, tmp_path, monkeypatch):
    """gguf is imported only for a GGUF file: without the package a Hugging Face folder runs, and
    a GGUF file is one line saying what to install."""
    monkeypatch.setitem(sys.modules, "gguf", None)  # `import gguf` raises ImportError
    with LLM(str(llama_dir), policy=Policy(), runtime=_FP32) as llm:
        assert llm.generate([[5, 6, 7]], max_new_tokens=2).outputs[0].output_ids
    path = tmp_path / "x.gguf"
    path.write_bytes(b"GGUF" + bytes(40))
    with pytest.raises(UserError, match="needs the gguf package; pip install gguf"):
        ModelSource.from_path(path)


@pytest.mark.parametrize(("ggml_type", "scale", "fragment"), [(8, float("nan"), "NaN or Inf"),
                                                              (8, 600.0, "scales beyond 511.75"),
                                                              (2, 9000.0, "scales beyond 8188")])
def test_corrupt_block_scales_are_refused(ggml_type, scale, fragment):
    """A block scale that is NaN, or whose minimum (-128 d, -8 d) overflows float16, is one line."""
    from flexgen_dist.storage.gguf_blocks import KEPT, to_groups

    _, bits, block_bytes, _ = KEPT[ggml_type]
    raw = torch.zeros(2, block_bytes, dtype=torch.uint8)  # 2 rows of one block
    raw[1, :2] = torch.tensor([scale], dtype=torch.float16).view(torch.uint8)
    with pytest.raises(UserError, match=fragment):
        to_groups(raw, ggml_type, (2, 32), CompressionConfig(bits=bits, group_size=32), "tensor 'x'")
