"""Check a checkpoint against its config before any weight is placed, from the headers alone.

`scan_checkpoint` finds every tensor of a folder (one model.safetensors, or the shards of
model.safetensors.index.json) and checks each file's header (safetensors_header.py) and that the
index and the shards agree. `match_units` then holds the tensors to what the config implies
(`spec.layout.model_units`): every expected tensor present, of a floating-point dtype, with
the expected shape, and nothing else. A config with fewer layers than the weights would
otherwise run with the extra layers silently ignored.

Tensors allowed beyond the expected ones (they are read by nobody, as in transformers):
- `*.rotary_emb.inv_freq`: a buffer older transformers saved; RoPE is recomputed from the config.
- `lm_head.weight` when the head is tied to the input embedding (tie_word_embeddings): transformers
  ties it and ignores the stored copy, so do we.

A mixture of experts' checkpoint may hold each layer's experts per expert (the published ones and
transformers' save_pretrained) or stacked, as transformers 5 holds them in memory and loads them
(`mlp.experts.gate_up_proj` (E, 2I, C), `mlp.experts.down_proj` (E, C, I), Mixtral's router as
`mlp.gate`): `unstack_experts` names each expert's projection in a stacked tensor by its
per-expert key, a run of the stacked tensor's bytes read in place.

`check_finite` is the one check that needs the data: it runs on each tensor as it is read.
"""

from __future__ import annotations

import json
import re
from pathlib import Path, PurePath
from typing import Sequence

import torch

from ..errors import UserError, file_error
from ..spec.layout import Unit, UnitKind
from .safetensors_header import TensorEntry, read_header

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")
_HARMLESS = re.compile(r"(^|\.)rotary_emb\.inv_freq$")
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")
_REDO = "re-download the checkpoint or re-save it with save_pretrained"


def validate_checkpoint(model_dir: str | Path, units: Sequence[Unit]) -> None:
    """Refuse (one-line UserError) a checkpoint whose files are damaged or whose tensors do not
    match `units`, the whole model's units (`model_units(spec)`, not one pipeline stage's).
    Reads only the files' headers."""
    match_units(unstack_experts(scan_checkpoint(model_dir), units, Path(model_dir)), units, Path(model_dir))


_ITEMSIZE = {"F16": 2, "BF16": 2, "F32": 4, "F64": 8}
# An expert's projection -> (the stacked tensor holding it, which half of gate_up_proj; None: all)
_STACKED_PART = {"gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1), "down_proj": ("down_proj", None)}
_EXPERT_NAME = re.compile(r"mlp\.experts\.\d+\.(\w+)\.weight")


def unstack_experts(tensors: dict[str, TensorEntry], units: Sequence[Unit], model_dir: Path) -> dict[str, TensorEntry]:
    """`tensors` with the experts of a checkpoint that holds them stacked (see the module
    docstring) under the per-expert keys of `units`, each a slice of its stacked tensor's bytes,
    and Mixtral's router under its key; unchanged for a checkpoint that holds them per expert."""
    out = dict(tensors)
    for unit in units:
        experts = [ws for ws in unit.weights if ws.expert is not None]
        if not experts or resolve_key(experts[0].key, tensors) is not None:
            continue
        count = 1 + max(ws.expert for ws in experts)
        layer = experts[0].key[: experts[0].key.index("layers.")] + f"layers.{unit.layer_idx - 1}.mlp."
        router = next(ws for ws in unit.weights if ws.name == "mlp.gate.weight")
        stacked = {}
        for part in ("gate_up_proj", "down_proj"):
            name = resolve_key(layer + "experts." + part, tensors)
            if name is None:
                return out  # neither layout: match_units names the missing per-expert tensor
            stacked[part] = out.pop(name)
        if resolve_key(router.key, tensors) is None and (name := resolve_key(layer + "gate.weight", tensors)):
            out[router.key] = out.pop(name)  # Mixtral's block_sparse_moe.gate, as transformers 5 names it
        for ws in experts:
            part, half = _STACKED_PART[_EXPERT_NAME.fullmatch(ws.name).group(1)]
            entry = stacked[part]
            rows, cols = ws.shape
            want = (count, rows * (2 if half is not None else 1), cols)
            if entry.shape != want or entry.dtype not in _ITEMSIZE:
                expected = f"shape {want}" if entry.shape != want else f"one of {', '.join(_ITEMSIZE)}"
                found = f"shape {entry.shape}" if entry.shape != want else entry.dtype
                raise UserError(
                    f"tensor {entry.name!r} in {str(entry.path)!r} has {found}, config.json implies {expected} "
                    f"({count} experts stacked): the config and the weights do not belong together"
                )
            size = rows * cols * _ITEMSIZE[entry.dtype]
            at = entry.offset + size * (ws.expert * (2 if half is not None else 1) + (half or 0))
            out[ws.key] = TensorEntry(entry.name, entry.path, entry.dtype, ws.shape, at, size)
    return out


def scan_checkpoint(model_dir: str | Path) -> dict[str, TensorEntry]:
    """Every tensor of the folder's safetensors weights, by checkpoint key, headers checked."""
    model_dir = Path(model_dir)
    index, single = model_dir / INDEX_NAME, model_dir / SINGLE_NAME
    if index.is_file():
        return _scan_sharded(index)
    if single.is_file():
        return read_header(single)
    hint = ""
    if any(model_dir.glob("*.bin")) or any(model_dir.glob("*.pt")):
        hint = " (convert .bin checkpoints with save_pretrained(safe_serialization=True))"
    raise UserError(f"no weights in {str(model_dir)!r}: expected {SINGLE_NAME} or {INDEX_NAME}{hint}")


def _scan_sharded(index: Path) -> dict[str, TensorEntry]:
    weight_map = _read_index(index)
    headers: dict[str, dict[str, TensorEntry]] = {}
    for key, shard in weight_map.items():
        if shard not in headers:
            path = index.parent / shard
            if not path.is_file():
                raise UserError(
                    f"{str(index)!r} names shard {shard!r} (for {key!r}) but {str(path)!r} is missing; {_REDO}"
                )
            headers[shard] = read_header(path)
        if key not in headers[shard]:
            raise UserError(
                f"{str(index)!r} maps {key!r} to {shard!r}, but that shard has no such tensor: "
                f"the index and the shards do not belong together; {_REDO}"
            )
    tensors = {}
    for shard, entries in headers.items():
        for key, entry in entries.items():
            if weight_map.get(key) != shard:
                listed = f"lists it in {weight_map[key]!r}" if key in weight_map else "does not list it"
                raise UserError(
                    f"shard {shard!r} holds {key!r} but {str(index)!r} {listed}: the index and the shards do "
                    f"not belong together; {_REDO}"
                )
            tensors[key] = entry
    return tensors


def _read_index(index: Path) -> dict[str, str]:
    try:
        text = index.read_bytes().decode("utf-8")
        data = json.loads(text)
    except OSError as exc:
        raise file_error(exc, index, "read") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{str(index)!r} is not valid JSON ({exc}); {_REDO}") from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise UserError(
            f"{str(index)!r} is not a safetensors index: expected {{\"weight_map\": {{tensor name: shard file}}}}; "
            f"{_REDO}"
        )
    for key, shard in weight_map.items():
        if PurePath(shard).name != shard or shard in ("", ".", ".."):
            raise UserError(
                f"{str(index)!r} maps {key!r} to {shard!r}: a shard must be a file name in the model folder; {_REDO}"
            )
    return weight_map


def resolve_key(key: str, tensors: dict) -> str | None:
    """The checkpoint's name for expected key `key`: some checkpoints were saved from the base
    model, without the leading "model." prefix."""
    for candidate in (key, key.removeprefix("model.")):
        if candidate in tensors:
            return candidate
    return None


def match_units(tensors: dict[str, TensorEntry], units: Sequence[Unit], model_dir: Path) -> None:
    """Every tensor of `units` in `tensors` with its shape and a float dtype, and nothing more."""
    num_layers = sum(unit.kind is UnitKind.BLOCK for unit in units)
    _check_layer_count(tensors, units, num_layers, model_dir)
    used: set[str] = set()
    for unit in units:
        for ws in unit.weights:
            name = resolve_key(ws.key, tensors)
            if name is None:
                raise UserError(
                    f"checkpoint {str(model_dir)!r} has no tensor {ws.key!r} (shape {ws.shape}) that its "
                    "config.json implies: the weights are incomplete or of another architecture; "
                    "use the config.json that came with these weights"
                )
            entry = tensors[name]
            if entry.dtype not in FLOAT_DTYPES:
                raise UserError(
                    f"tensor {name!r} in {str(entry.path)!r} is {entry.dtype}, not a floating-point type "
                    f"({', '.join(FLOAT_DTYPES)}): quantized checkpoints are not supported; use the fp16/bf16/fp32 one"
                )
            if entry.shape != ws.shape:
                raise UserError(
                    f"tensor {name!r} in {str(entry.path)!r} has shape {entry.shape}, config.json implies "
                    f"{ws.shape}: the config and the weights do not belong together"
                )
            used.add(name)
    tied = not any(ws.key == "lm_head.weight" for unit in units for ws in unit.weights)
    for name, entry in tensors.items():
        if name in used or _HARMLESS.search(name) or (tied and name == "lm_head.weight"):
            continue
        raise UserError(
            f"tensor {name!r} in {str(entry.path)!r} is not part of the model its config.json describes: "
            "the config and the weights do not belong together; use the config.json that came with these weights"
        )


def _check_layer_count(tensors: dict[str, TensorEntry], units: Sequence[Unit], num_layers: int,
                       model_dir: Path) -> None:
    """The decoder layers the weights hold against num_hidden_layers, with the count to set."""
    layer_of = {}
    for name in tensors:
        found = _LAYER.search(name)
        if found and not _HARMLESS.search(name):
            layer_of.setdefault(int(found.group(1)), name)
    if not layer_of:
        return  # no layer tensors at all: the missing-tensor message says which is expected
    stored = max(layer_of) + 1
    if stored > num_layers:
        extra = min(idx for idx in layer_of if idx >= num_layers)
        raise UserError(
            f"the checkpoint in {str(model_dir)!r} has {stored} decoder layers (it holds {layer_of[extra]!r}) but "
            f"its config.json says "
            f"num_hidden_layers = {num_layers}; set num_hidden_layers to {stored} in config.json, or use the "
            "config.json that came with these weights"
        )
    missing = [idx for idx in range(num_layers) if idx not in layer_of]
    if missing:
        block = next(u for u in units if u.kind is UnitKind.BLOCK and u.layer_idx == missing[0] + 1)
        fix = (f"set num_hidden_layers to {stored} if the weights are complete, or re-download them"
               if missing[0] >= stored else "the weights are incomplete; re-download them")
        raise UserError(
            f"config.json says num_hidden_layers = {num_layers} but the checkpoint in {str(model_dir)!r} has no "
            f"tensors of layer "
            f"{missing[0]} (e.g. {block.weights[0].key!r}); {fix}"
        )


def check_finite(name: str, tensor: torch.Tensor, where: str = "the checkpoint") -> None:
    """Refuse a tensor holding NaN or Inf: it would give silent all-zero or garbage output.

    One pass of `aminmax` (NaN propagates to both ends, an Inf is the min or the max), about the
    cost of copying the tensor once; counting and locating the bad values only when there are some.
    """
    if tensor.numel() == 0 or not tensor.is_floating_point():
        return
    low, high = torch.aminmax(tensor)
    if bool(torch.isfinite(low)) and bool(torch.isfinite(high)):
        return
    nan = int(torch.isnan(tensor).sum())
    inf = int(torch.isinf(tensor).sum())
    first = tuple(int(i) for i in torch.nonzero(~torch.isfinite(tensor))[0])
    counts = " and ".join(f"{n} {kind} value{'s' * (n > 1)}" for n, kind in ((nan, "NaN"), (inf, "Inf")) if n)
    raise UserError(
        f"{name} has {counts} (of {tensor.numel()}, the first at index {first}) in {where}: the checkpoint "
        f"is corrupt; {_REDO} from a good copy"
    )
