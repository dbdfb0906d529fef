"""Layer math in plain torch: norms, rotary embeddings, masked attention.

Every function takes tensors already on the compute device in the compute dtype; where a
tensor lives and how it got there is the engine's business.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..planning.placement import ATTENTION_QUERY_CHUNK
from ..spec.model import ModelSpec


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # As transformers' LlamaRMSNorm: normalise in fp32, scale in the input dtype.
    dtype = x.dtype
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(dtype)


def gemma_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # As transformers' Gemma3RMSNorm: normalise and scale by (1 + weight) in fp32, then round.
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return (x32 * (1.0 + weight.float())).to(x.dtype)


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def rope_inv_freq(spec: ModelSpec) -> torch.Tensor:
    """Inverse frequencies (rotary_dim / 2,) in fp32, with linear or llama3 scaling applied."""
    dim = spec.rotary_dim
    inv_freq = 1.0 / (spec.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scaling = spec.rope_scaling
    if scaling is None:
        return inv_freq
    factor = float(scaling["factor"])
    if scaling["rope_type"] == "linear":
        return inv_freq / factor
    # llama3: long wavelengths scaled down by `factor`, short ones kept, a smooth ramp between.
    low_ff = float(scaling["low_freq_factor"])
    high_ff = float(scaling["high_freq_factor"])
    old_len = float(scaling["original_max_position_embeddings"])
    low_freq_wavelen = old_len / low_ff
    high_freq_wavelen = old_len / high_ff
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low_ff) / (high_ff - low_ff)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype):
    """cos, sin of shape (B, 1, T, rotary_dim) for integer positions (B, T)."""
    freqs = positions.float()[:, :, None] * inv_freq.to(positions.device)[None, None, :]  # (B, T, rd/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, rd)
    return emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (..., hd) rotated by cos, sin (..., rotary_dim): a partial rotary embedding (Phi-3's
    partial_rotary_factor) rotates the first rotary_dim dims and passes the rest through."""
    rotary = cos.shape[-1]
    if rotary < x.shape[-1]:
        return torch.cat((apply_rope(x[..., :rotary], cos, sin), x[..., rotary:]), dim=-1)
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


# Queries per attention call in the prefill: bounds the score matrix the math backend may build
# (queries x keys x heads x batch x 4 bytes) whatever the prompt length; the placement counts it.
QUERY_CHUNK = ATTENTION_QUERY_CHUNK


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
    """Masked attention with grouped-query heads.

    q: (B, nh, T, hd); k, v: (B, nkv, S, hd); mask: bool (B, 1, T, S), True = may attend.
    Returns (B, T, nh * hd).

    Each kv head serves g = nh // nkv query heads (transformers' repeat_kv order: query head
    i * g + j reads kv head i). Instead of repeating k and v (a copy of the cache) or SDPA's
    `enable_gqa` (which sends masked calls to the slow math backend on CUDA), the g query heads
    of a kv head become g x T queries of one head: (B, nkv, g * T, hd) against (B, nkv, S, hd),
    the mask repeated along them. Long prompts are split into chunks of queries so no score
    matrix grows with the square of the prompt.
    """
    B, nh, T, hd = q.shape
    nkv = k.shape[1]
    g = nh // nkv
    if T > QUERY_CHUNK:
        parts = [attention(q[:, :, i : i + QUERY_CHUNK], k, v, mask[:, :, i : i + QUERY_CHUNK], scale)
                 for i in range(0, T, QUERY_CHUNK)]
        return torch.cat(parts, dim=1)
    if g > 1:
        q = q.reshape(B, nkv, g * T, hd)  # (B, nkv, g * T, hd): query head i * g + j at rows j * T ...
        mask = mask.expand(B, 1, T, mask.shape[-1]).repeat(1, 1, g, 1)  # (B, 1, g * T, S)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)  # (B, nkv, g * T, hd)
    # reshape, not view: CUDA's kernels return this with other strides than the CPU's
    return _ungrouped(out, nh, T)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    return F.linear(x, weight, bias)


def embedding(ids: torch.Tensor, table) -> torch.Tensor:
    """ids (B, T) -> (B, T, width). `table`: a tensor, or a table that reads only the rows asked
    for from where it lives (storage/rows.py RowTable)."""
    if isinstance(table, torch.Tensor):
        return F.embedding(ids, table)
    return table.gather(ids)


def logits(x: torch.Tensor, weight) -> torch.Tensor:
    """x (B, T, C) -> fp32 logits (B, T, V). `weight`: the (V, C) projection, or one streamed a
    chunk of vocabulary rows at a time (storage/rows.py StreamedRows): the logits are written
    chunk by chunk, each chunk's computed as the whole projection would."""
    if isinstance(weight, torch.Tensor):
        return linear(x, weight).float()
    B, T, _ = x.shape
    out = torch.empty((B, T, weight.shape[0]), dtype=torch.float32, device=x.device)
    for start, stop, rows in weight.chunks():
        out[:, :, start:stop] = linear(x, rows)  # (B, T, stop - start), converted to fp32
    return out


def _grouped(q: torch.Tensor, nkv: int) -> torch.Tensor:
    """q (B, nh, T, hd) -> (B, nkv, g * T, hd) in fp32: the g query heads of a kv head in a row."""
    B, nh, T, hd = q.shape
    return q.float().reshape(B, nkv, (nh // nkv) * T, hd)


def _ungrouped(out: torch.Tensor, nh: int, T: int) -> torch.Tensor:
    """(B, nkv, g * T, hd) -> (B, T, nh * hd)."""
    B, _, _, hd = out.shape
    return out.reshape(B, nh, T, hd).transpose(1, 2).reshape(B, T, nh * hd)


def chunked_attention(q: torch.Tensor, read_kv, length: int, mask: torch.Tensor, scale: float, chunk: int = 256) -> torch.Tensor:
    """Attention over a cache read piece by piece (16-bit or quantized storage converted as it
    is read), merged with a running softmax, so no fp32 copy of the whole cache ever exists.

    q: (B, nh, T, hd); read_kv(start, stop) -> k, v of those positions, v (B, nkv, n, hd) in
    fp32, k the same or a function of the grouped queries (B, nkv, gT, hd) giving their raw
    scores (B, nkv, gT, n) (keys stored in another layout: storage/kivi.py); mask: bool
    (B, 1, T, length). Returns (B, T, nh * hd) in fp32."""
    B, nh, T, hd = q.shape
    qg = None
    best = total = acc = None
    for start in range(0, length, chunk):
        stop = min(length, start + chunk)
        k, v = read_kv(start, stop)  # (B, nkv, n, hd)
        if qg is None:
            qg = _grouped(q.to(v.device), v.shape[1])  # (B, nkv, gT, hd)
            g = nh // v.shape[1]
        scores = (k(qg) if callable(k) else qg @ k.transpose(-1, -2)) * scale  # (B, nkv, gT, n)
        allowed = mask[..., start:stop].to(v.device).expand(B, 1, T, stop - start).repeat(1, 1, g, 1)  # (B, 1, gT, n)
        scores.masked_fill_(~allowed, float("-inf"))
        peak = scores.amax(-1, keepdim=True)  # (B, nkv, gT, 1)
        new_best = peak if best is None else torch.maximum(best, peak)
        # A query whose keys so far are all masked (a padding row, a long left pad) has a best of
        # -inf: subtract 0 instead, so its weights are exp(-inf) = 0, not exp(-inf + inf) = NaN.
        shift = new_best.masked_fill(new_best == float("-inf"), 0.0)
        weights = (scores - shift).exp_()
        if best is None:
            total, acc = weights.sum(-1, keepdim=True), weights @ v
        else:
            rescale = (best - shift).exp_()  # 0 where nothing was allowed before
            total = total * rescale + weights.sum(-1, keepdim=True)
            acc = acc * rescale + weights @ v
        best = new_best
    return _ungrouped(acc / total, nh, T)


def sparse_attention(q: torch.Tensor, scores_of, length: int, mask: torch.Tensor, scale: float, keep: float,
                     values_at, v_new: torch.Tensor) -> torch.Tensor:
    """Decode attention that uses the values of only the `keep` fraction of past positions with
    the largest weights per head, plus the new token's (FlexGen's sparse attention: weights come
    from the softmax over every position and are not renormalised).

    q: (B, nh, 1, hd); scores_of(qg) -> raw scores (B, nkv, g, length) for the grouped fp32
    queries; values_at(positions (B, nh, k) long) -> (B, nh, k, hd) fp32 values read from the
    value cache's tier; v_new: (B, nkv, 1, hd), the value at position length - 1.
    Returns (B, 1, nh * hd) in fp32."""
    B, nh, T, hd = q.shape
    nkv = v_new.shape[1]
    qg = _grouped(q, nkv)  # (B, nkv, g, hd)
    scores = scores_of(qg) * scale  # (B, nkv, g, length)
    scores.masked_fill_(~mask.to(scores.device).expand(B, 1, T, length), float("-inf"))
    weights = scores.softmax(-1).reshape(B, nh, length)  # query head i * g + j
    k = max(1, int(keep * (length - 1)))
    top_weights, top_positions = weights[..., :-1].topk(min(k, length - 1), dim=-1)  # (B, nh, k)
    out = (top_weights.unsqueeze(-2) @ values_at(top_positions)).squeeze(-2)  # (B, nh, hd)
    current = v_new.float().repeat_interleave(nh // nkv, dim=1)[:, :, 0]  # (B, nh, hd)
    out = out + weights[..., -1:] * current.to(out.device)
    return out.reshape(B, 1, nh * hd)
