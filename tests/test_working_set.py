"""A working set of one decoder layer (issue 19, item 3): weight slots are as large as a decoder
layer, not the largest unit; the embedding gathers the rows of a step's tokens from the table's
tier; a head larger than a decoder layer is streamed through the slot a chunk of vocabulary rows
at a time, with the same tokens as transformers."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import flexgen_dist
from conftest import hf_greedy, unambiguous_prompts
from planner_cases import llama_spec
from flexgen_dist import LLM, Policy, Runtime
from flexgen_dist.model.layers import embedding, logits
from flexgen_dist.planning.compression import CompressionConfig
from flexgen_dist.spec.layout import HEAD_PROJECTION, UnitKind, model_units
from flexgen_dist.planning.place import plan_placement
from flexgen_dist.planning.placement import Buffers, Dtypes, Tier, Workload
from flexgen_dist.spec.model import ModelSpec
from flexgen_dist.planning.tiers import slot_bytes
from flexgen_dist.storage import tiers as storage_tiers
from flexgen_dist.storage.quantize import compressed_in_memory, compressed_on_disk
from flexgen_dist.storage.quantize import dequantize, empty_quantized, quantize
from flexgen_dist.storage.rows import RowTable, StreamedRows
from flexgen_dist.storage.tiers import DiskIO, DiskReader, DiskTensor, MemoryTensor

ON_DISK = dict(w_gpu_percent=0, w_cpu_percent=0, cache_gpu_percent=0, cache_cpu_percent=0,
               act_gpu_percent=0, act_cpu_percent=0)
DEFAULT_MODEL = Path(flexgen_dist.__file__).parent / "models" / "default"
OPT_1_3B = dict(model_type="opt", hidden_size=2048, num_attention_heads=32, ffn_dim=8192, num_hidden_layers=24,
                vocab_size=50272, max_position_embeddings=2048)
SPECS = {"default": lambda: ModelSpec.from_config(json.loads((DEFAULT_MODEL / "config.json").read_text())),
         "opt-1.3b": lambda: ModelSpec.from_config(OPT_1_3B)}
MACHINES = {"cpu": (Dtypes("float32", "float16"), False), "gpu": (Dtypes("float16", "float16"), True)}


def smallest_plan(spec: ModelSpec, machine: str, **switches):
    dtypes, separate = MACHINES[machine]
    policy = Policy(gpu_batch_size=1, num_gpu_batches=1, **ON_DISK, **switches)
    return plan_placement(spec, model_units(spec), policy, dtypes=dtypes, workload=Workload(64, 32),
                          buffers=Buffers(separate_gpu=separate))


def decoder_layer_bytes(spec: ModelSpec, compute_bytes: int) -> int:
    """One decoder layer's weights in the compute dtype, counted from the spec."""
    block = next(u for u in model_units(spec) if u.kind is UnitKind.BLOCK)
    return block.numel * compute_bytes


@pytest.mark.parametrize("machine", list(MACHINES))
@pytest.mark.parametrize("name", list(SPECS))
def test_smallest_plan_needs_one_decoder_layer_and_the_scratch(name, machine):
    spec = SPECS[name]()
    plan = smallest_plan(spec, machine)
    layer = decoder_layer_bytes(spec, 4 if machine == "cpu" else 2)
    slots = plan.buffer("weight slots")
    # each slot holds one decoder layer (pieces aligned), not the embedding table or the head
    assert slots.nbytes_each == slot_bytes(plan.slot_layouts[1])
    assert layer <= slots.nbytes_each < layer * 1.01
    scratch = sum(b.nbytes for b in plan.working if b.tier is Tier.GPU and b.name != "weight slots")
    gpu = plan.bytes_per_tier()[Tier.GPU]
    assert gpu < 1.2 * (slots.count * layer + scratch), (gpu, layer, scratch)
    # the head is streamed a chunk at a time (the tables are larger than a layer in both models)
    head = {w.name: w for w in plan.weights[spec.num_layers + 1]}[HEAD_PROJECTION]
    assert head.chunk_rows is not None and head.chunk_rows < spec.vocab_size
    assert all(w.gathered for w in plan.weights[0] if w.name.startswith("embed_"))


@pytest.mark.parametrize("machine", list(MACHINES))
def test_compressed_smallest_plan_slot_is_one_compressed_decoder_layer(machine):
    spec = SPECS["opt-1.3b"]()
    plan = smallest_plan(spec, machine, compress_weight=True, compress_cache=True)
    assert plan.buffer("weight slots").nbytes_each == slot_bytes(plan.slot_layouts[1])
    assert not plan.slot_layouts[0]  # the embedding tables are gathered: nothing is loaded
    head = plan.slot_layouts[spec.num_layers + 1]
    assert slot_bytes(head) <= slot_bytes(plan.slot_layouts[1])
    assert {piece.part for piece in head if piece.name == HEAD_PROJECTION} == {"data", "scale", "mins", "value"}


def test_a_head_that_fits_a_decoder_layer_is_loaded_whole():
    spec = llama_spec()  # vocab 1024 x 128: smaller than a decoder layer
    plan = plan_placement(spec, model_units(spec), Policy(w_gpu_percent=0, w_cpu_percent=100),
                          dtypes=Dtypes("float32", "float16"), workload=Workload(8, 4), buffers=Buffers(separate_gpu=False))
    assert all(w.chunk_rows is None for places in plan.weights.values() for w in places)
    head = {piece.name: piece for piece in plan.slot_layouts[spec.num_layers + 1]}
    assert head[HEAD_PROJECTION].shape == (spec.vocab_size, spec.hidden_size)


# --- the engine ---------------------------------------------------------------------------------


def _wide_vocab(tiny_models_cache, arch: str):
    """A tiny model whose head (vocab 2048) is larger than a decoder layer: the head streams."""
    return tiny_models_cache.get(arch, vocab_size=2048)


STREAMED = {  # policies whose head is streamed: weights on disk, on the host, mixed; batches zig-zag
    "disk": dict(w_gpu_percent=0, w_cpu_percent=0, gpu_batch_size=2, num_gpu_batches=3),
    "cpu": dict(w_gpu_percent=0, w_cpu_percent=100, gpu_batch_size=2, num_gpu_batches=2),
    "mixed": dict(w_gpu_percent=20, w_cpu_percent=30, gpu_batch_size=3, num_gpu_batches=2),
}


@pytest.mark.parametrize("arch", ["llama", "llama-tied", "opt", "opt350m"])
@pytest.mark.parametrize("where", list(STREAMED))
def test_streamed_head_and_gathered_embedding_match_transformers(arch, where, tiny_models_cache, tmp_path):
    model = _wide_vocab(tiny_models_cache, arch)
    prompts = unambiguous_prompts(model, (5, 9, 12, 7, 3, 10), 6, seed=3)
    with LLM(str(model), policy=Policy(**STREAMED[where]), offload_dir=tmp_path, runtime=Runtime(device="cpu")) as llm:
        head = {w.name: w for w in llm.placement.weights[max(llm.placement.weights)]}[HEAD_PROJECTION]
        assert head.chunk_rows is not None and -(-2048 // head.chunk_rows) >= 2
        result = llm.generate(prompts, max_new_tokens=6, do_sample=False)
    for prompt, out in zip(prompts, result.outputs):
        assert list(out.output_ids) == hf_greedy(model, prompt, 6)


def test_embedding_reads_only_the_rows_of_the_step_tokens(llama_dir, tmp_path, monkeypatch):
    """A disk table: every byte read from its file is a row of a token the step embeds, each
    distinct token of a (step, GPU batch) read once; the table is never read whole."""
    read: dict[str, int] = {}
    real_pread = storage_tiers._pread_all

    def counting_pread(path, buf, offset, io):
        got = real_pread(path, buf, offset, io)
        read[Path(path).name] = read.get(Path(path).name, 0) + got
        return got

    gathered = []  # distinct ids of each gather
    real_gather = RowTable.gather

    def counting_gather(self, ids):
        gathered.append(len(torch.unique(ids)))
        return real_gather(self, ids)

    monkeypatch.setattr(storage_tiers, "_pread_all", counting_pread)
    monkeypatch.setattr(RowTable, "gather", counting_gather)
    prompts = [[7, 7, 9, 300, 8], [12, 13, 14], [5, 5, 5, 5]]
    runtime = Runtime(device="cpu", disk_io=DiskIO(threads=2, direct=False, chunk_bytes=64 << 10))
    with LLM(str(llama_dir), policy=Policy(gpu_batch_size=2, num_gpu_batches=2, **ON_DISK), offload_dir=tmp_path,
             runtime=runtime) as llm:
        table = llm.weights.tensors[0]["embed_tokens.weight"]
        assert isinstance(table, DiskTensor)
        llm.generate(prompts, max_new_tokens=4, ignore_eos=True)
    files = [name for name in read if name.startswith(table.path.name)]
    assert files == [table.path.name]
    assert len(gathered) == 2 * 4  # two GPU batches, four steps
    assert read[table.path.name] == sum(gathered) * table.row_bytes
    assert read[table.path.name] < table.nbytes


# --- the storage and the layer math, unit by unit ------------------------------------------------


def _reader(tmp_path) -> DiskReader:
    return DiskReader(DiskIO(threads=2, chunk_bytes=4096), buffer_bytes=4096 * 3)


@pytest.mark.parametrize("where", ["memory", "disk", "compressed-memory", "compressed-disk"])
def test_gather_and_stream_equal_the_whole_tensor(where, tmp_path):
    torch.manual_seed(0)
    weight = torch.randn(300, 64)
    config = CompressionConfig(bits=4, group_size=32)
    reader = _reader(tmp_path)
    if where == "memory":
        src = MemoryTensor(weight.half(), Tier.CPU)
        whole = weight.half().float()
    elif where == "disk":
        src = DiskTensor(tmp_path / "w.bin", weight.shape, torch.float16, reader)
        src.write(slice(None), weight.half())
        whole = weight.half().float()
    else:
        q = quantize(weight, config)
        whole = dequantize(q)
        if where == "compressed-memory":
            src = compressed_in_memory((q.data, q.scale, q.mins), weight.shape, config, Tier.CPU)
        else:
            src = compressed_on_disk(tmp_path / "w", weight.shape, config, reader)
            src.write(slice(None), weight)
    ids = torch.tensor([[5, 299, 5, 0], [17, 18, 19, 5]])
    table = RowTable(src, torch.device("cpu"), torch.float32)
    assert torch.equal(embedding(ids, table), F.embedding(ids, whole))
    x = torch.randn(2, 3, 64)
    chunk = 70  # 5 chunks, the last shorter
    staging = empty_quantized((chunk, 64), config) if where.startswith("compressed") else None
    streamed = StreamedRows(src, torch.empty(chunk, 64), staging)
    streamed.fill(0)
    reads = []  # chunks read into the buffer
    real_fill = StreamedRows.fill
    streamed.fill = lambda c: (reads.append(c) if streamed.held != c else None) or real_fill(streamed, c)
    want = F.linear(x, whole).float()
    for _ in range(3):  # three GPU batches: each starts with the chunk the last one left
        assert torch.equal(logits(x, streamed), want)
    assert reads == [1, 2, 3, 4, 3, 2, 1, 0, 1, 2, 3, 4]
    reader.close()


def test_a_tied_head_is_held_once_where_the_table_is():
    """OPT ties its head to the input embedding: one checkpoint tensor. With the table resident the
    head uses it (no second copy, nothing staged); on a slower tier of its own it would be counted
    twice and loaded every step."""
    tied = SPECS["opt-1.3b"]()
    untied = ModelSpec.from_config({**OPT_1_3B, "tie_word_embeddings": False})
    dtypes, separate = MACHINES["cpu"]

    def plan(spec, gpu_percent):
        policy = Policy(gpu_batch_size=4, num_gpu_batches=1, w_gpu_percent=gpu_percent, w_cpu_percent=0)
        return plan_placement(spec, model_units(spec), policy, dtypes=dtypes, workload=Workload(64, 32),
                              buffers=Buffers(separate_gpu=separate))

    head_bytes = tied.vocab_size * tied.hidden_size * 4
    everything = plan(tied, 100)
    assert plan(untied, 100).weight_bytes()[Tier.GPU] - everything.weight_bytes()[Tier.GPU] == head_bytes
    # Half on the gpu tier: the table is resident, the head's own share would be on disk; it follows the table.
    half = plan(tied, 50)
    places = {w.name: w for w in half.weights[max(half.weights)]}
    assert places[HEAD_PROJECTION].tier is Tier.GPU and places[HEAD_PROJECTION].shared
    assert not any(piece.name == HEAD_PROJECTION for piece in half.slot_layouts[max(half.weights)])
    assert half.weight_bytes()[Tier.DISK] < plan(untied, 50).weight_bytes()[Tier.DISK] - head_bytes // 4
    # On disk both read one file, counted once.
    on_disk = plan(tied, 0)
    assert plan(untied, 0).weight_bytes()[Tier.DISK] - on_disk.weight_bytes()[Tier.DISK] == tied.vocab_size * tied.hidden_size * 2


@pytest.mark.parametrize("arch", ["llama-tied", "opt"])
@pytest.mark.parametrize("w_gpu_percent", [50, 0])
def test_a_tied_head_uses_the_tables_tensor_with_the_same_tokens(arch, w_gpu_percent, tiny_models_cache, tmp_path):
    model = _wide_vocab(tiny_models_cache, arch)
    prompts = unambiguous_prompts(model, (5, 9, 12, 7), 6, seed=4)
    policy = Policy(gpu_batch_size=2, num_gpu_batches=2, w_gpu_percent=w_gpu_percent, w_cpu_percent=0)
    with LLM(str(model), policy=policy, offload_dir=tmp_path, runtime=Runtime(device="cpu")) as llm:
        head_layer = max(llm.placement.weights)
        head = {w.name: w for w in llm.placement.weights[head_layer]}[HEAD_PROJECTION]
        assert head.shared
        assert llm.weights.tensors[head_layer][HEAD_PROJECTION] is llm.weights.tensors[0]["embed_tokens.weight"]
        result = llm.generate(prompts, max_new_tokens=6, do_sample=False)
    for prompt, out in zip(prompts, result.outputs):
        assert list(out.output_ids) == hf_greedy(model, prompt, 6)
