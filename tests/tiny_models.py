"""Tiny random Hugging Face checkpoints for the equivalence tests.

`make_tiny_model(arch, path)` builds a model from a config with
`AutoModelForCausalLM.from_config` in fp32, makes its greedy choices clear (see below) and saves
it with `save_pretrained` (safetensors), so every test loads a real HF checkpoint from disk.

Why the weights are changed after init: a randomly initialised model (std 0.02) gives nearly
uniform logits, so a greedy choice can hinge on the 6th digit and flip under a different but
equally correct summation order. With small layer weights the residual stream is mostly the
current token's embedding, so a tied head answers "the same token again" forever; and OPT's
ReLU MLPs add one common direction to every token until all prompts continue alike. So we
(1) shrink the token (and OPT position) embeddings: the layers dominate the residual stream,
(2) init the layers with a large std: attention and MLPs make a real difference,
(3) randomise biases and norm weights (transformers inits them to 0 and 1: an engine that
    dropped them would pass), centre OPT's fc2 outputs,
(4) zero the head row of EOS (outputs run to max_new_tokens; `with_eos` makes EOS reachable),
(5) scale the head (or, when tied, the op before it) to logits of std LOGIT_STD = 10.

`greedy_margin` measures the result: the smallest top1 - top2 logit gap over the greedy steps
of one prompt. Seen with the defaults (seed 0; 40 random prompts of lengths 3..20, 16 new tokens;
per-prompt margin min / 10th percentile / median; prompts under 5e-3):

    llama              0.0079 / 0.041 / 0.21   0/40      (distinct tokens of 16: min 10, median 15)
    llama-rope-llama3  0.0024 / 0.009 / 0.12   2/40      (10, 14)
    llama-rope-linear  0.0101 / 0.060 / 0.25   0/40      (6, 14)
    llama-tied         0.0015 / 0.039 / 0.17   1/40      (9, 15)
    mistral            0.0044 / 0.026 / 0.12   1/40      (10, 15)
    qwen2              0.0144 / 0.037 / 0.12   0/40      (9, 15)
    opt                0.0066 / 0.035 / 0.12   0/40      (8, 12)
    opt350m            0.0093 / 0.059 / 0.16   0/40      (2, 7)

Two correct fp32 computations of the same logits (transformers' incremental decode vs a full
forward vs a left-padded batch) differed by at most ~3e-4, so the tests use only prompts whose
margin is >= 5e-3 (conftest.unambiguous_prompts), which rejects a few per cent of draws. Changing
only the first of 12 prompt tokens changed the 16-token continuation for 20 of 20 prompts on
every arch: the far context (the KV cache) matters.
"""

from __future__ import annotations

import json
import pathlib
import shutil

import torch

# Every model uses these ids, so prompts drawn from [FIRST_FREE_ID, VOCAB_SIZE) never contain a
# special token.
VOCAB_SIZE = 320
PAD_ID = 0
BOS_ID = 1
EOS_ID = 2
FIRST_FREE_ID = 4
MAX_POSITIONS = 128

ARCHS = (
    "llama",
    "llama-rope-llama3",
    "llama-rope-linear",
    "llama-tied",
    "mistral",
    "qwen2",
    "opt",
    "opt350m",
)

# Families added later (tests/test_families_2026.py), built the same way; kept out of ARCHS so the
# matrices over ARCHS stay as they were.
ARCHS_2026 = (
    "qwen3",
    "qwen3-tied-bias",
    "phi3",
    "phi3-partial-window",
)

# Mixtures of experts (tests/test_moe.py), built the same way, kept out of the matrices above too.
ARCHS_MOE = (
    "mixtral",
    "qwen3-moe",
    "qwen3-moe-dense-unnormed",
)

# Gemma 3 (tests/test_gemma3.py), built the same way, kept out of the matrices above too.
ARCHS_GEMMA3 = (
    "gemma3",
    "gemma3-linear-softcap",
)
ALL_ARCHS = ARCHS + ARCHS_2026 + ARCHS_MOE + ARCHS_GEMMA3

# Scales applied after `from_config` (see the module docstring). Found by trying: these give
# varied continuations that depend on the context (not only on the last token).
INIT_STD = 0.2
OPT_INIT_STD = 0.25
OPT350M_INIT_STD = 0.15
EMBED_STD = 0.05
POST_LN_EMBED_STD = 1.0  # post-LN (opt350m): raw embeddings must hold their own against biases
LOGIT_STD = 10.0
BIAS_STD = 0.2

_LLAMA_LIKE = dict(
    vocab_size=VOCAB_SIZE,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,  # GQA: 2 query heads per kv head
    max_position_embeddings=MAX_POSITIONS,
    rms_norm_eps=1e-6,
    initializer_range=INIT_STD,
    pad_token_id=PAD_ID,
    bos_token_id=BOS_ID,
    eos_token_id=EOS_ID,
    tie_word_embeddings=False,
)

_OPT = dict(
    vocab_size=VOCAB_SIZE,
    hidden_size=64,
    ffn_dim=128,
    num_hidden_layers=3,
    num_attention_heads=4,
    max_position_embeddings=MAX_POSITIONS,
    word_embed_proj_dim=64,
    do_layer_norm_before=True,
    init_std=OPT_INIT_STD,
    dropout=0.0,
    attention_dropout=0.0,
    pad_token_id=1,  # as in the real OPT checkpoints
    bos_token_id=EOS_ID,
    eos_token_id=EOS_ID,
    tie_word_embeddings=True,
)


# Six layers, local (a window of 6, shorter than the test sequences, and a rope base of 100) and
# global (rope base 10000) interleaved; a softmax scale of query_pre_attn_scalar 8 ** -0.5 (not
# head_dim 16's); the head tied to the embedding, as Gemma 3's.
_GEMMA3 = dict(
    _LLAMA_LIKE,
    num_hidden_layers=6,
    head_dim=16,
    sliding_window=6,
    query_pre_attn_scalar=8,
    layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention", "full_attention",
                 "sliding_attention"],
    rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
                     "full_attention": {"rope_type": "default", "rope_theta": 10000.0}},
    tie_word_embeddings=True,
)


def tiny_config(arch: str, **config_overrides):
    """The transformers config of a tiny `arch` model (see ARCHS)."""
    from transformers import AutoConfig

    if arch == "llama":
        model_type, kwargs = "llama", dict(_LLAMA_LIKE)
    elif arch == "llama-rope-llama3":
        # original_max_position_embeddings=32 puts the 8 rotary frequencies of head_dim 16 in
        # all three llama3 regimes: kept (wavelength < 8), smoothed (8..32), divided (> 32).
        model_type, kwargs = "llama", dict(_LLAMA_LIKE, rope_scaling={
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 32})
    elif arch == "llama-rope-linear":
        model_type, kwargs = "llama", dict(_LLAMA_LIKE, rope_scaling={
            "rope_type": "linear", "factor": 2.0})
    elif arch == "llama-tied":
        model_type, kwargs = "llama", dict(_LLAMA_LIKE, tie_word_embeddings=True)
    elif arch == "mistral":
        # The window is larger than every test sequence: plain causal attention, as transformers
        # computes it for these lengths.
        model_type, kwargs = "mistral", dict(_LLAMA_LIKE, sliding_window=96)
    elif arch == "qwen2":
        # q/k/v biases are Qwen2's default (o_proj and the MLP have none).
        model_type, kwargs = "qwen2", dict(_LLAMA_LIKE, use_sliding_window=False)
    elif arch == "qwen3":
        # head_dim 32, not hidden_size / heads = 16: Qwen3 sets it on its own.
        model_type, kwargs = "qwen3", dict(_LLAMA_LIKE, head_dim=32)
    elif arch == "qwen3-tied-bias":
        # Tied head, biases on q/k/v and o_proj (attention_bias), head_dim 8.
        model_type, kwargs = "qwen3", dict(_LLAMA_LIKE, head_dim=8, attention_bias=True, tie_word_embeddings=True)
    elif arch == "phi3":
        model_type, kwargs = "phi3", dict(_LLAMA_LIKE)
    elif arch == "phi3-partial-window":
        # RoPE on half of each head (as Phi-4-mini: 0.75), and a window shorter than the test
        # sequences (Phi-3-mini's is 2047).
        model_type, kwargs = "phi3", dict(_LLAMA_LIKE, partial_rotary_factor=0.5, sliding_window=8)
    elif arch == "mixtral":
        # 8 experts of width 128 (intermediate_size), each token routed to 2 (Mixtral-8x7B's).
        model_type, kwargs = "mixtral", dict(_LLAMA_LIKE, num_local_experts=8, num_experts_per_tok=2)
    elif arch == "qwen3-moe":
        # 8 experts of width 32, 3 per token, their weights renormalised (Qwen3-30B-A3B's
        # norm_topk_prob); head_dim 32 of its own, as Qwen3's.
        model_type, kwargs = "qwen3_moe", dict(_LLAMA_LIKE, head_dim=32, num_experts=8, num_experts_per_tok=3,
                                               moe_intermediate_size=32, norm_topk_prob=True)
    elif arch == "qwen3-moe-dense-unnormed":
        # Three layers, the first a dense MLP of width 128 (mlp_only_layers), the top-2 weights
        # of 4 experts not renormalised (norm_topk_prob false, transformers' default).
        model_type, kwargs = "qwen3_moe", dict(_LLAMA_LIKE, num_hidden_layers=3, head_dim=16, num_experts=4,
                                               num_experts_per_tok=2, moe_intermediate_size=48,
                                               norm_topk_prob=False, mlp_only_layers=[0])
    elif arch == "gemma3":
        model_type, kwargs = "gemma3_text", dict(_GEMMA3)
    elif arch == "gemma3-linear-softcap":
        # Linear rope scaling on the global layers (Gemma 3 4B's, factor 8 there), the final logits
        # softcapped at 20 (Gemma 2's was 30), an untied head.
        model_type, kwargs = "gemma3_text", dict(_GEMMA3, final_logit_softcapping=20.0, tie_word_embeddings=False,
                                                 rope_parameters={
                                                     "sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
                                                     "full_attention": {"rope_type": "linear", "factor": 4.0,
                                                                        "rope_theta": 10000.0}})
    elif arch == "opt":
        model_type, kwargs = "opt", dict(_OPT)
    elif arch == "opt350m":
        # Post-LN layers, no final layer norm, embeddings of width 32 projected in and out.
        model_type, kwargs = "opt", dict(_OPT, do_layer_norm_before=False, word_embed_proj_dim=32,
                                  init_std=OPT350M_INIT_STD)
    else:
        raise ValueError(f"unknown tiny arch {arch!r}; choose one of {ALL_ARCHS}")
    kwargs.update(config_overrides)
    return AutoConfig.for_model(model_type, **kwargs)


def _sharpen(model, config, seed: int) -> None:
    """Rescale a freshly initialised model so its greedy choices are clear (module docstring)."""
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        embeddings = [model.get_input_embeddings().weight]
        positions = getattr(model.model.decoder, "embed_positions", None) if hasattr(
            model.model, "decoder") else None
        if positions is not None:  # OPT's learned positions: small like the tokens
            embeddings.append(positions.weight)
        post_ln = config.model_type == "opt" and not config.do_layer_norm_before
        embed_std = POST_LN_EMBED_STD if post_ln else EMBED_STD
        for embed in embeddings:
            embed.copy_(torch.randn(embed.shape, generator=gen) * embed_std)
        if config.pad_token_id is not None:
            embeddings[0][config.pad_token_id].zero_()
        # Norm weights around 1 rather than exactly 1, so a kernel that drops them shows.
        for name, param in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                param.copy_(torch.rand(param.shape, generator=gen) + 0.5)
        # Random biases, so an engine that drops one shows (transformers inits them to 0).
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.copy_(torch.randn(param.shape, generator=gen) * BIAS_STD)
        probe = torch.randint(FIRST_FREE_ID, config.vocab_size, (4, 16), generator=gen)
        if config.model_type == "opt":
            _center_relu_mlps(model, probe)
        # EOS never wins on its own (its head row is zero): outputs run to max_new_tokens
        # unless a test makes another token the EOS (`with_eos`).
        model.get_output_embeddings().weight[config.eos_token_id].zero_()
        # Logits are linear in the head (untied) or in the last op before it (tied): scale that
        # op so the logits have std LOGIT_STD on a probe prompt.
        std = model(probe).logits.std().item()
        if config.model_type == "gemma3_text" and config.tie_word_embeddings:
            norm = model.model.norm.weight  # Gemma's norm scales by 1 + weight: the logits are linear in that
            norm.copy_((1 + norm) * (LOGIT_STD / std) - 1)
        else:
            for param in _last_linear_op(model, config):
                param.mul_(LOGIT_STD / std)


def _center_relu_mlps(model, probe) -> None:
    """Give every fc2 the bias that makes its output zero-mean on `probe`.

    A ReLU's output is positive, so fc2 adds the same direction to every token; three such
    layers and every prompt continues with the same token. Layer by layer, as each fix changes
    the inputs of the next.
    """
    for layer in model.model.decoder.layers:
        seen = []
        hook = layer.fc2.register_forward_hook(lambda mod, args, out: seen.append(out))
        model(probe)
        hook.remove()
        layer.fc2.bias.sub_(seen[0].reshape(-1, seen[0].shape[-1]).mean(dim=0))


def _last_linear_op(model, config) -> list:
    """Parameters that the logits are linear in, without touching the input embeddings."""
    if not config.tie_word_embeddings:
        return [model.get_output_embeddings().weight]
    if config.model_type == "opt":
        decoder = model.model.decoder
        if decoder.project_out is not None:
            return [decoder.project_out.weight]
        return [decoder.final_layer_norm.weight, decoder.final_layer_norm.bias]
    return [model.model.norm.weight]


def make_tiny_model(arch: str, path, *, seed: int = 0, make_sharded: bool = False,
                    tokenizer: bool = False, **config_overrides) -> pathlib.Path:
    """Build a tiny random `arch` model (fp32) and save it as an HF checkpoint under `path`.

    make_sharded: save in several safetensors shards with `model.safetensors.index.json`.
    tokenizer: also save a byte-level tokenizer (one token per byte, ids 4..259, no BOS added).
    config_overrides: passed to the config (e.g. `num_hidden_layers=3`). The head row of the
    config's EOS is zeroed, so to make a reachable token the EOS use `with_eos` on a built model.
    """
    from transformers import AutoModelForCausalLM

    path = pathlib.Path(path)
    config = tiny_config(arch, **config_overrides)
    # Each arch draws its own weights: llama and mistral would otherwise be the same model.
    arch_seed = seed * 1000 + ALL_ARCHS.index(arch)
    torch.manual_seed(arch_seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _sharpen(model, config, arch_seed)
    model.eval()
    model.generation_config.pad_token_id = config.pad_token_id
    model.generation_config.eos_token_id = config.eos_token_id
    model.generation_config.bos_token_id = config.bos_token_id
    shard = "40KB" if make_sharded else "100MB"
    model.save_pretrained(path, safe_serialization=True, max_shard_size=shard)
    if tokenizer:
        make_byte_tokenizer(config).save_pretrained(path)
    return path


def with_eos(src, dst, eos_token_id: int) -> pathlib.Path:
    """Copy the checkpoint `src` to `dst` with another EOS id (in config and generation config)."""
    src, dst = pathlib.Path(src), pathlib.Path(dst)
    shutil.copytree(src, dst)
    for name in ("config.json", "generation_config.json"):
        file = dst / name
        if file.exists():
            data = json.loads(file.read_text())
            data["eos_token_id"] = eos_token_id
            file.write_text(json.dumps(data, indent=2))
    return dst


def make_byte_tokenizer(config):
    """A byte-level tokenizer: byte b is token FIRST_FREE_ID + b; no merges, no BOS added."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()  # the 256 printable stand-ins for bytes
    alphabet.sort(key=lambda ch: _byte_of(ch))
    vocab = {"<pad>": PAD_ID, "<s>": BOS_ID, "</s>": EOS_ID, "<unk>": 3}
    vocab.update({ch: FIRST_FREE_ID + i for i, ch in enumerate(alphabet)})
    assert max(vocab.values()) < config.vocab_size
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    special = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    if config.model_type == "opt":
        special["pad_token"] = "<s>"  # OPT's pad id is 1
    return PreTrainedTokenizerFast(tokenizer_object=tok, **special)


def _byte_of(ch: str) -> int:
    """The byte that ByteLevel's printable character `ch` stands for (GPT-2's table)."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    if ord(ch) in printable:
        return ord(ch)
    others = [b for b in range(256) if b not in printable]
    return others[ord(ch) - 256]


def random_prompts(lengths, *, seed: int = 0, vocab_size: int = VOCAB_SIZE) -> list[list[int]]:
    """Token-id prompts of the given lengths, free of special ids, reproducible from `seed`."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(FIRST_FREE_ID, vocab_size, (n,), generator=gen).tolist()
            for n in lengths]


@torch.no_grad()
def greedy_trace(model, input_ids, max_new_tokens: int) -> tuple[list[int], list[float]]:
    """Greedy new tokens of one prompt, and at each step the gap top1 - top2 of the logits."""
    ids = torch.as_tensor(input_ids, dtype=torch.long).reshape(1, -1)
    config = model.generation_config
    out = model.generate(
        ids, attention_mask=torch.ones_like(ids), do_sample=False,
        max_new_tokens=max_new_tokens, output_logits=True, return_dict_in_generate=True,
        pad_token_id=config.pad_token_id, eos_token_id=config.eos_token_id)
    tokens = out.sequences[0, ids.shape[1]:].tolist()
    gaps = []
    for step_logits in out.logits[: len(tokens)]:  # (1, vocab) each
        top2 = step_logits[0].float().topk(2).values
        gaps.append(float(top2[0] - top2[1]))
    return tokens, gaps


def greedy_margin(model, input_ids, max_new_tokens: int) -> float:
    """The smallest gap top1 - top2 of the logits over the greedy steps of one prompt."""
    return min(greedy_trace(model, input_ids, max_new_tokens)[1])
