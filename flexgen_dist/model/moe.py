"""Mixtures of experts: Mixtral (the Llama layer) and Qwen3-MoE (the Qwen3 layer) with a routed
MLP, as transformers 5 computes them.

A router (a linear layer, `mlp.gate.weight`, num_experts x C) scores every token; its softmax
in fp32 picks the num_experts_per_tok best experts, whose weights are renormalised to sum to 1
(Mixtral always, Qwen3-MoE when norm_topk_prob). Each expert is a SwiGLU MLP computed once for
all the tokens routed to it (tokens grouped by expert, its weighted output added back to their
rows), never row by row; experts in increasing order, as transformers adds them. A Qwen3-MoE
layer without a router (mlp_only_layers, decoder_sparse_step) has the dense MLP.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..spec.model import ModelSpec
from .layers import linear
from .llama import LlamaMath
from .qwen3 import Qwen3Math

ROUTER = "mlp.gate.weight"


def route(logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Router logits (N, E) -> the weights (N, k) in fp32 and indices (N, k) of each token's
    top_k experts: softmax in fp32 over all experts, top-k, renormalised if asked."""
    probs = F.softmax(logits.float(), dim=-1)  # (N, E)
    weights, experts = torch.topk(probs, top_k, dim=-1)  # (N, k) each
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, experts


def run_experts(w, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor, names) -> torch.Tensor:
    """x (N, C), each token's expert weights and indices (N, k) -> sum over its experts of
    weight * SwiGLU_expert(x), (N, C) in x's dtype. `names[e]`: expert e's (gate, up, down) keys."""
    N, k = experts.shape
    out = torch.zeros_like(x)  # (N, C)
    flat = experts.reshape(-1)  # (N * k,): token n's choices at n * k ... n * k + k - 1
    order = torch.argsort(flat, stable=True)  # grouped by expert, tokens in order within one
    counts = torch.bincount(flat, minlength=len(names)).tolist()  # one sync per layer
    tokens = order // k  # (N * k,) the token of each routed slot, grouped by expert
    slot_weights = weights.reshape(-1)[order]  # (N * k,)
    start = 0
    for e, count in enumerate(counts):
        if not count:
            continue
        rows = tokens[start:start + count]  # (n,) distinct: top-k picks an expert once per token
        scale = slot_weights[start:start + count, None]  # (n, 1)
        start += count
        gate, up, down = (w[name] for name in names[e])
        h = x[rows]  # (n, C)
        y = linear(F.silu(linear(h, gate)) * linear(h, up), down)  # (n, C)
        out.index_add_(0, rows, (y * scale).to(out.dtype))
    return out


class _Experts:
    """The `mlp` of a mixture-of-experts layer (mixed into the family's math)."""

    # Mixtral multiplies each expert's output by its fp32 weight; Qwen3-MoE rounds the weights to
    # the compute dtype first (transformers' routers differ so; equal in fp32).
    weights_in_fp32 = True

    def _init_experts(self, spec: ModelSpec) -> None:
        self.expert_names = [tuple(f"mlp.experts.{e}.{proj}.weight" for proj in ("gate_proj", "up_proj", "down_proj"))
                             for e in range(spec.num_experts)]

    def mlp(self, w, h: torch.Tensor) -> torch.Tensor:
        """h (B, T, C) -> (B, T, C): the experts each token is routed to; the dense MLP in a layer
        without a router."""
        if ROUTER not in w:
            return super().mlp(w, h)
        s = self.spec
        B, T, C = h.shape
        x = h.reshape(B * T, C)  # (N, C)
        logits = linear(x, w[ROUTER])  # (N, E)
        weights, experts = route(logits, s.num_experts_per_tok, s.norm_topk_prob)
        if not self.weights_in_fp32:
            weights = weights.to(logits.dtype)
        return run_experts(w, x, weights, experts, self.expert_names).reshape(B, T, C)


class MixtralMath(_Experts, LlamaMath):
    def __init__(self, spec: ModelSpec, device: torch.device):
        super().__init__(spec, device)
        self._init_experts(spec)


class Qwen3MoeMath(_Experts, Qwen3Math):
    weights_in_fp32 = False

    def __init__(self, spec: ModelSpec, device: torch.device):
        super().__init__(spec, device)
        self._init_experts(spec)
