"""`plan_placement`: the one place that picks a tier for every tensor of a rank (pure Python).

For a rank's units, a `Policy`, the dtypes, the workload and the engine's buffer settings it
makes the `Placement` (placement.py):

- weights: within a unit, split by cumulative size (FlexGen's rule: a tensor goes where the
  midpoint of its cumulative size falls). A head tied to the input embedding (one checkpoint
  tensor) uses the table's, on the table's tier: no second copy, and no load where the table is
  resident. A matrix is compressed (at its compressed bytes) when the policy compresses weights
  or when the checkpoint holds it as groups already (`ModelSpec.stored_groups`: a GGUF's);
- KV caches: the 2 x num_gpu_batches tensors of a layer are split by count;
- activations: per GPU batch;
- then the working buffers those need (working.py).

A slot holds one decoder layer, not the largest unit: the embedding tables are never loaded
(each step gathers the rows of its tokens from the table's tier), and the head's output
projection, when it is larger than a decoder layer's slot, is streamed through the slot a chunk
of vocabulary rows at a time (`WeightPlace.chunk_rows`).

`FoldedRank`: a rank's units with identical decoder layers folded into one, so the search can plan
fast. Planning all 80 layers of a rank takes tens of milliseconds, and the search plans thousands of
candidates. Every decoder layer of a model has the same shapes, and a policy puts each of them
on the same tiers, so one representative stands for all of them: the placement of the
representatives (`FoldedRank.plan`) with each layer's bytes counted `repeats` times gives the
whole rank's bytes EXACTLY (`FoldedRank.bytes_per_tier`; working buffers are maxima over layers,
equal for equal layers), and the cost model prices it with the same `repeats`.
tests/test_search.py checks both against the unfolded placement.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

from .compression import CompressionConfig, compressed_cache_nbytes, compressed_nbytes
from ..spec.layout import HEAD_PROJECTION, Unit, UnitKind, is_lookup
from .placement import ActPlace, Buffers, CachePlace, Dtypes, Placement, WeightPlace, Workload, staged
from .policy import Policy
from ..spec.model import ModelSpec
from .tiers import SlotPiece, Tier, choose_tiers, compressed_parts, dtype_bytes, pack, slot_bytes
from .working import Dims, working_buffers


def plan_placement(spec: ModelSpec, units, policy: Policy, *, dtypes: Dtypes, workload: Workload, buffers: Buffers) -> Placement:
    """The placement of a rank holding `units` of the model `spec` (see the module docstring)."""
    units = tuple(units)
    compute, storage = dtype_bytes(dtypes.compute), dtype_bytes(dtypes.storage)
    config = policy.compression
    weights: dict[int, tuple[WeightPlace, ...]] = {}
    held: dict[str, WeightPlace] = {}  # checkpoint key -> the first weight holding it
    stored = spec.stored_groups.keys if spec.stored_groups is not None else frozenset()
    for unit in units:
        tiers = choose_tiers([ws.numel for ws in unit.weights], policy.percents("w"))
        places = []
        for ws, tier in zip(unit.weights, tiers):
            first = held.get(ws.key)
            if first is not None:
                # A head tied to the input embedding: the table's tensor, wherever that is (no
                # second copy, no load where the table is resident). Following the table, not the
                # nearer of the two, keeps bytes falling as the percents fall (the fitting steps).
                places.append(dataclasses.replace(first, layer_idx=unit.layer_idx, name=ws.name, gathered=False, shared=True))
                continue
            # biases, norms and routers stay as they are; weights the checkpoint holds as groups stay groups
            compressed = len(ws.shape) >= 2 and ((policy.compress_weight and not ws.exact) or ws.key in stored)
            if compressed:
                nbytes = compressed_nbytes(ws.shape, config)
            else:
                nbytes = ws.numel * (compute if tier is Tier.GPU else storage)
            places.append(WeightPlace(unit.layer_idx, ws.name, ws.shape, tier, nbytes, compressed,
                                      gathered=is_lookup(unit.kind, ws.name), expert=ws.expert is not None))
            held.setdefault(ws.key, places[-1])
        weights[unit.layer_idx] = tuple(places)
    layouts = _weight_slot_layouts(units, weights, dtypes, config, buffers)
    weights = {layer_idx: tuple(_chunked(w, layouts[layer_idx]) for w in places) for layer_idx, places in weights.items()}
    spec_dims = Dims.of(spec)
    gbs, num_batches = policy.gpu_batch_size, policy.num_gpu_batches
    cache_shape = (workload.seq_len, gbs, spec.num_kv_heads, spec.head_dim)
    cache_itemsize = dtype_bytes(policy.cache_dtype or dtypes.compute)
    if policy.compress_cache:
        k_each, v_each = (compressed_cache_nbytes(which, cache_shape, config, cache_itemsize) for which in ("k", "v"))
    else:
        k_each = v_each = workload.seq_len * gbs * spec_dims.kv_dim * cache_itemsize
    cache_tiers = choose_tiers([1] * (2 * num_batches), policy.percents("cache"))
    caches = {}
    for unit in units:
        if not unit.has_cache:
            continue
        for batch_idx in range(num_batches):
            k_tier, v_tier = cache_tiers[2 * batch_idx], cache_tiers[2 * batch_idx + 1]
            caches[(unit.layer_idx, batch_idx)] = CachePlace(
                unit.layer_idx, batch_idx, k_tier, v_tier, k_each, v_each,
                in_place=_attends_in_place(k_tier, v_tier, policy, buffers), compressed=policy.compress_cache,
            )
    act_each = gbs * workload.prompt_len * spec_dims.hidden * compute
    acts = tuple(
        ActPlace(batch_idx, tier, act_each)
        for batch_idx, tier in enumerate(choose_tiers([1] * num_batches, policy.percents("act")))
    )
    placement = Placement(policy, dtypes, workload, buffers, weights, layouts, caches, acts, (), spec, units)
    # the buffers follow from where everything else is (working.py reads the placement without them)
    return dataclasses.replace(placement, working=working_buffers(placement, spec_dims, compute))


def _weight_slot_layouts(units, weights: dict[int, tuple[WeightPlace, ...]], dtypes: Dtypes,
                         config: CompressionConfig, buffers: Buffers) -> dict[int, tuple[SlotPiece, ...]]:
    """Every unit's slot layout. Decoder layers first: the largest of theirs is the slot, and the
    head's output projection gets as many vocabulary rows as fit beside the head's other pieces
    (all of them when the head fits; the whole head on a rank without decoder layers)."""
    layouts = {unit.layer_idx: _weight_slot_layout(weights[unit.layer_idx], dtypes, config, buffers)
               for unit in units if unit.kind is not UnitKind.HEAD}
    budget = max((slot_bytes(layouts[u.layer_idx]) for u in units if u.kind is UnitKind.BLOCK), default=0)
    for unit in units:
        if unit.kind is UnitKind.HEAD:
            places = weights[unit.layer_idx]
            whole = _weight_slot_layout(places, dtypes, config, buffers)
            streams = any(w.name == HEAD_PROJECTION and not w.resident for w in places)
            rows = _head_rows(places, dtypes, config, buffers, budget) if streams and slot_bytes(whole) > budget > 0 else None
            layouts[unit.layer_idx] = whole if rows is None else _weight_slot_layout(places, dtypes, config, buffers, rows)
    return layouts


def _head_rows(places, dtypes: Dtypes, config: CompressionConfig, buffers: Buffers, budget: int) -> int:
    """The most rows of the head's output projection whose slot fits `budget` (at least one)."""
    streamed = next(w for w in places if w.name == HEAD_PROJECTION)
    lo, hi = 1, streamed.shape[0]  # the slot grows with the rows: bisect for the largest that fits
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if slot_bytes(_weight_slot_layout(places, dtypes, config, buffers, mid)) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _chunked(w: WeightPlace, layout: tuple[SlotPiece, ...]) -> WeightPlace:
    """`w` with its chunk rows when its slot piece holds fewer rows than it has."""
    for piece in layout:
        if piece.name == w.name and piece.part == "value" and piece.shape[0] < w.shape[0]:
            return dataclasses.replace(w, chunk_rows=piece.shape[0])
    return w


def _weight_slot_layout(places, dtypes: Dtypes, config: CompressionConfig, buffers: Buffers,
                        head_rows: int | None = None) -> tuple[SlotPiece, ...]:
    """Where a layer's loaded weights go in a slot: every non-resident weight in the compute
    dtype, preceded by staging for the compressed bytes of those not already in device memory.
    Embedding tables take no room (gathered by rows); with `head_rows`, the head's output
    projection takes that many rows (a chunk)."""
    pieces = []
    loaded = [(w, (head_rows, *w.shape[1:]) if head_rows is not None and w.name == HEAD_PROJECTION else w.shape)
              for w in places if not w.gathered]
    for w, shape in loaded:
        if w.compressed and staged(w.tier, buffers):
            pieces += compressed_parts(w.name, shape, config)
    for w, shape in loaded:
        if not w.resident:
            pieces.append((w.name, "value", shape, dtypes.compute))
    return pack(pieces)[0]


def _attends_in_place(k_tier: Tier, v_tier: Tier, policy: Policy, buffers: Buffers) -> bool:
    """Decode attention reads the cache where it lives: device memory (both tiers on a machine
    without a GPU), or host memory with CPU attention. A 16-bit or compressed cache is converted
    piece by piece as attention reads it, never copied whole."""
    on_device = {Tier.GPU} if buffers.separate_gpu else {Tier.GPU, Tier.CPU}
    if k_tier in on_device and v_tier in on_device:
        return True
    return policy.cpu_cache_compute and k_tier is Tier.CPU and v_tier is Tier.CPU


# --- a rank with identical layers folded ------------------------------------------------------------


def _shape_key(unit: Unit) -> tuple:
    return unit.kind, tuple((ws.name, ws.shape) for ws in unit.weights)


@dataclass(frozen=True)
class FoldedRank:
    spec: ModelSpec
    units: tuple[Unit, ...]  # the rank's units, all of them
    representatives: tuple[Unit, ...]  # the first of each run of identical units
    repeats: dict[int, int]  # representative's layer_idx -> units it stands for

    @classmethod
    def of(cls, spec: ModelSpec, units: Sequence[Unit]) -> "FoldedRank":
        """Fold runs of consecutive identical units (a rank's decoder layers)."""
        units = tuple(units)
        if not units:
            raise ValueError("a rank holds at least one unit")
        reps, repeats = [], {}
        for unit in units:
            if reps and _shape_key(reps[-1]) == _shape_key(unit):
                repeats[reps[-1].layer_idx] += 1
            else:
                reps.append(unit)
                repeats[unit.layer_idx] = 1
        return cls(spec, units, tuple(reps), repeats)

    @property
    def num_layers(self) -> int:
        return len(self.units)

    def plan(self, policy: Policy, *, dtypes: Dtypes, workload: Workload, buffers: Buffers) -> Placement:
        """The placement of the representatives (price it with `repeats`)."""
        return plan_placement(self.spec, self.representatives, policy, dtypes=dtypes, workload=workload, buffers=buffers)

    def plan_all(self, policy: Policy, *, dtypes: Dtypes, workload: Workload, buffers: Buffers) -> Placement:
        """The placement of every unit, as the engine will use it."""
        return plan_placement(self.spec, self.units, policy, dtypes=dtypes, workload=workload, buffers=buffers)

    def bytes_per_tier(self, folded: Placement) -> dict[Tier, int]:
        """The whole rank's `bytes_per_tier()` from the placement of its representatives."""
        out = folded.bytes_per_tier()
        for unit in self.representatives:
            extra = self.repeats[unit.layer_idx] - 1
            if extra == 0:
                continue
            for w in folded.weights[unit.layer_idx]:
                out[w.tier] += extra * folded.weight_footprint(w)
            if unit.has_cache:
                for batch_idx in range(folded.policy.num_gpu_batches):
                    c = folded.caches[(unit.layer_idx, batch_idx)]
                    for which in ("k", "v"):
                        out[c.tier(which)] += extra * folded.cache_footprint(c, which) * folded.blocks_in_flight
        return out
