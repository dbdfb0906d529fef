"""A GGUF file (llama.cpp, Ollama, LM Studio) as a model: which file a `--model` path names
(`gguf_file`), its configuration as transformers' GGUF loader reads it (`read_config`), and its
tensors as the weights (`GGUFSource`). api/model_source.py imports this module only for a path
that is not a Hugging Face folder: a run of a safetensors checkpoint loads no GGUF code.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Sequence

import torch

from ..errors import UserError, file_error
from ..spec.gguf import ARCHITECTURES, FLOAT_TYPES, GGUFArray, GGUFHeader, GGUFTensor, is_gguf, read_gguf_header
from ..spec.layout import Unit, WeightSpec
from ..spec.model import StoredGroups
from .checkpoint import SAMPLE_BYTES
from .validate import check_finite

log = logging.getLogger(__name__)


def read_config(path: Path) -> tuple[GGUFHeader, dict]:
    """The file's header, every tensor checked against its size, and the config dict of its metadata."""
    header = read_gguf_header(path)
    if header.architecture not in ARCHITECTURES:
        raise UserError(f"{str(path)!r} is a GGUF model of architecture {header.architecture!r}, which is not "
                        f"supported for GGUF files; supported: {', '.join(ARCHITECTURES)} (llama includes Mistral)")
    return header, _gguf_config(header)


def gguf_file(path: Path) -> Path | None:
    """The GGUF file `path` names: itself, or the one .gguf file of a folder without config.json
    (a folder with several is refused, naming them); None for anything else."""
    if path.is_file():
        return path if path.suffix.lower() == ".gguf" or is_gguf(path) else None
    if not path.is_dir() or (path / "config.json").exists():
        return None
    found = sorted(p for p in path.iterdir() if p.suffix.lower() == ".gguf" and p.is_file())
    if len(found) > 1:
        raise UserError(f"{str(path)!r} holds {len(found)} GGUF files ({', '.join(p.name for p in found[:4])}"
                        f"{', ...' if len(found) > 4 else ''}); pass the one to run: --model {found[0]}")
    return found[0] if found else None


def _gguf_config(header) -> dict:
    """The config dict transformers' GGUF loader makes of the file's metadata (its
    load_gguf_checkpoint, read here from the parsed header: transformers' own reader builds an
    object per vocabulary entry, seconds on a large one). tests/test_gguf.py holds the two equal."""
    from transformers import integrations

    mapping = integrations.GGUF_CONFIG_MAPPING
    defaults = getattr(integrations, "GGUF_CONFIG_DEFAULTS_MAPPING", {})
    architecture, meta = header.architecture, header.metadata
    names = [meta["general.name"]] if "general.name" in meta else []
    updated = "mistral" if "llama" in architecture and "mistral" in names else architecture  # transformers' rule
    config = {"tie_word_embeddings": "output.weight" not in header.tensors}
    for key, value in defaults.get(updated, defaults.get(architecture) or {}).items():
        config.setdefault(key, value)
    for gguf_key, value in meta.items():
        prefix, _, name = gguf_key.replace(architecture, updated).partition(".")
        target = mapping.get(prefix, {}).get(name, -1)
        if target == -1 or target is None:
            continue
        if isinstance(value, GGUFArray):
            raise UserError(f"{str(header.path)!r}: metadata {gguf_key!r} is an array; this runtime reads it as one "
                            "value (a model of another kind?)")
        config[target] = value.replace(architecture, updated) if isinstance(value, str) else value
    tokens = meta.get("tokenizer.ggml.tokens")
    if "vocab_size" not in config and isinstance(tokens, GGUFArray):
        config["vocab_size"] = tokens.count
    return config


class GGUFSource:
    """Tensors of a GGUF file (llama.cpp's format, its header checked by spec/gguf.py) under the
    checkpoint keys of `units`.

    Every unit weight is matched to its tensor by gguf's own name map, as transformers' loader maps
    them, and its shape and type are checked before anything is read. A llama file stores the q and
    k projections with their rows permuted for llama.cpp's rope; `heads` (transformers' reading of
    the file: attention heads, kv heads; None: not a llama file, or a count missing) puts them back
    as transformers does (its LlamaTensorProcessor). The Q4_0, Q4_1 and Q8_0 matrices of one width
    (4 or 8 bits: the one with more bytes when the file has both) are handed out as quantized
    groups, exactly (`grouped`, storage/gguf_blocks.py; `stored_groups` says which); every other
    tensor as values (`get`): plain floats as stored, any other type dequantized by the gguf
    package (float32).
    Bytes are read with plain file reads, one tensor at a time.
    """

    def __init__(self, header: GGUFHeader, units: Sequence[Unit], num_layers: int, heads: tuple[int, int] | None):
        from ..storage.gguf_blocks import GROUP_SIZE, KEPT

        self.header, self.path = header, header.path
        names = _gguf_names(header.architecture, num_layers)
        self._tensors: dict[str, GGUFTensor] = {}  # checkpoint key -> its tensor
        self._rows: dict[str, torch.Tensor] = {}  # checkpoint key -> the rows in transformers' order
        for ws in (ws for unit in units for ws in unit.weights if ws.key not in self._tensors):
            self._tensors[ws.key] = tensor = self._match(ws, names)
            if heads is not None and (".attn_q." in tensor.name or ".attn_k." in tensor.name):
                self._rows[ws.key] = _unpermuted_rows(tensor, *heads, where=self._where(tensor))
        unused = sorted(set(header.tensors) - {t.name for t in self._tensors.values()})
        if "rope_freqs.weight" in unused:
            log.warning("%s: its rope_freqs (llama 3's rope scaling) is not applied, as transformers' GGUF loader "
                        "does not apply it: long contexts differ from llama.cpp's", self.path)
        if unused:
            log.info("%s: tensors left unused (as transformers leaves them): %s", self.path, ", ".join(unused))
        matrices = {key: t for key, t in self._tensors.items() if len(t.shape) >= 2 and t.ggml_type in KEPT}
        width = {}
        for t in matrices.values():
            width[KEPT[t.ggml_type][1]] = width.get(KEPT[t.ggml_type][1], 0) + t.nbytes
        bits = max(width, key=width.get) if width else None
        self._kept = {key: t for key, t in matrices.items() if KEPT[t.ggml_type][1] == bits}
        self.stored_groups = StoredGroups(bits, GROUP_SIZE, frozenset(self._kept)) if self._kept else None
        types = {t.ggml_type for t in self._tensors.values()}
        dequantized = any(key not in self._kept and t.ggml_type not in FLOAT_TYPES for key, t in self._tensors.items())
        # The dtype of every value not kept as groups: the file's 16-bit floats, or 16 bits for
        # dequantized blocks; float32 only when nothing is 16-bit (an F32 file, or all groups and F32 norms).
        self.dtype = ("bfloat16" if 30 in types else "float16" if 1 in types or dequantized else "float32")
        self._fd: int | None = None

    def _where(self, tensor: GGUFTensor) -> str:
        return f"{str(self.path)!r}: tensor {tensor.name!r}"

    def _match(self, ws: WeightSpec, names) -> GGUFTensor:
        base, _, suffix = ws.key.rpartition(".")
        mapped = names.get_name(base)
        wanted = f"{mapped}.{suffix}" if mapped is not None else ws.key
        tensor = self.header.tensors.get(wanted)
        if tensor is None:
            raise UserError(f"{str(self.path)!r} has no tensor {wanted!r} ({ws.key}, shape {ws.shape}) that its "
                            "metadata implies; the file is incomplete or not of this architecture")
        if tensor.shape != ws.shape:
            raise UserError(f"{self._where(tensor)} has shape {tensor.shape}; the configuration transformers reads "
                            f"from its metadata implies {ws.shape}")
        if tensor.type_name.startswith("I") and tensor.type_name[1:].isdigit():  # I8 .. I64: integers, not weights
            raise UserError(f"{self._where(tensor)} holds integers ({tensor.type_name}), not weights")
        return tensor

    def fingerprint(self) -> str:
        """Changes when the file changes (name, size, modification time, header)."""
        try:
            st = os.stat(self.path)
        except OSError as exc:
            raise file_error(exc, self.path, "stat") from None
        about = f"{self.path.name}:{st.st_size}:{st.st_mtime_ns}:{self.header.digest}"
        return hashlib.sha256(about.encode()).hexdigest()

    def content_digest(self) -> str:
        """Each tensor's name, type and shape and a sample of its bytes (CheckpointSource's)."""
        h = hashlib.sha256()
        for key in sorted(self._tensors):
            t = self._tensors[key]
            h.update(f"{key}:{t.type_name}:{t.shape}\n".encode())
            for at in sorted({0, max(0, t.nbytes // 2 - SAMPLE_BYTES // 2), max(0, t.nbytes - SAMPLE_BYTES)}):
                h.update(self._read(t, at, min(SAMPLE_BYTES, t.nbytes - at)).numpy().tobytes())
        return h.hexdigest()

    def weight_files(self) -> set[Path]:
        return {self.path}

    def get(self, ws: WeightSpec) -> torch.Tensor:
        from ..storage.gguf_blocks import to_values

        t = self._tensors[ws.key]
        raw = self._rows_of(ws.key, t) if len(t.shape) >= 2 or t.ggml_type in FLOAT_TYPES else self._read(t)
        tensor = to_values(raw, t.ggml_type, t.type_name, t.shape)
        check_finite(ws.key, tensor, repr(str(self.path)))
        return tensor

    def grouped(self, ws: WeightSpec, config) -> object | None:
        """The weight as a storage.quantize.QuantizedTensor of `config`, exactly as the file holds it;
        None when it is not kept as groups (or `config` is not its bits and groups of 32)."""
        from ..storage.gguf_blocks import KEPT, GROUP_SIZE, to_groups

        t = self._kept.get(ws.key)
        if t is None or (config.bits, config.group_size, config.group_dim) != (KEPT[t.ggml_type][1], GROUP_SIZE, -1):
            return None
        return to_groups(self._rows_of(ws.key, t), t.ggml_type, t.shape, config, self._where(t))

    def _rows_of(self, key: str, t: GGUFTensor) -> torch.Tensor:
        """The tensor's bytes as (rows, bytes per row), rows in transformers' order."""
        raw = self._read(t).reshape(t.shape[0], -1)
        rows = self._rows.get(key)
        return raw if rows is None else raw.index_select(0, rows)

    def _read(self, t: GGUFTensor, at: int = 0, count: int | None = None) -> torch.Tensor:
        """`count` bytes (default: all) of the tensor from byte `at`, as a uint8 tensor."""
        count = t.nbytes - at if count is None else count
        out = torch.empty(count, dtype=torch.uint8)
        view = memoryview(out.numpy())
        try:
            if self._fd is None:
                self._fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
            done = 0
            while done < count:  # one read returns at most ~2 GiB on Linux
                got = os.preadv(self._fd, [view[done:]], t.offset + at + done)
                if not got:
                    raise UserError(f"{str(self.path)!r} ended inside tensor {t.name!r}: the file was truncated after "
                                    "it was checked; download it again")
                done += got
        except OSError as exc:
            raise file_error(exc, self.path, "read") from None
        return out

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _gguf_names(architecture: str, num_layers: int):
    """gguf's map from transformers' module names to the file's (as transformers' loader uses it)."""
    import gguf

    arch = next(a for a, name in gguf.MODEL_ARCH_NAMES.items() if name == architecture)
    return gguf.get_tensor_name_map(arch, num_layers)


def _unpermuted_rows(tensor: GGUFTensor, num_heads: int, num_kv_heads: int, where: str) -> torch.Tensor:
    """The row order transformers gives a llama file's q or k projection: per head, the rows
    (head_dim / 2, 2) llama.cpp interleaved for its rope, transposed back."""
    heads = num_kv_heads if ".attn_k." in tensor.name and num_kv_heads != num_heads else num_heads
    rows = tensor.shape[0]
    if rows % (2 * heads):
        raise UserError(f"{where} has {rows} rows, which {heads} heads cannot split; the file is damaged")
    return torch.arange(rows).reshape(heads, rows // heads // 2, 2).transpose(1, 2).reshape(rows)
