"""How the class label enters the denoiser.

A method is two things, and nothing else about the model may differ between methods:

* ``prepare_conditioning(time_emb, class_emb) -> emb``: combines the ``[B, D]`` timestep and class
  embeddings into the ``[B, D]`` vector that every ResBlock receives (the "time path"; diffusers
  adds it as a per-channel bias after each ResBlock's first conv).
* ``ClassConditioner(channels, cond_dim)``: a module with ``forward(h, class_emb) -> h'`` applied
  after every down block, after the mid block and after every up block (the "post-block path").

``D = cond_dim = 4 * block_out_channels[0]``. The pair right below is the method ``custom``:
edit it to try an idea (``python custom_train.py --method custom``; its runs are named after a hash of
its code, so an edited idea never reuses the last one's results). To keep several ideas side by side,
put each pair in a file of its own and pass the path (``--method ideas/class_gain.py``); to give an
idea a name, write its function and class further down and add one line to ``METHODS`` at the bottom.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn


# --------------------------------------------------------------------------------------------
# The method you edit: `custom`. It starts as concat-film (class added to time, no post-block
# module), the simplest baseline.
# --------------------------------------------------------------------------------------------

def prepare_conditioning(time_emb: torch.Tensor, class_emb: torch.Tensor) -> torch.Tensor:
    """[B, D] time embedding and [B, D] class embedding -> the [B, D] ResBlock embedding."""
    return time_emb + class_emb


class ClassConditioner(nn.Module):
    """Runs after every down/mid/up block: ``h`` [B, C, H, W] -> [B, C, H, W]."""

    def __init__(self, channels: int, cond_dim: int):
        super().__init__()

    def forward(self, h: torch.Tensor, class_emb: torch.Tensor) -> torch.Tensor:
        return h


# --------------------------------------------------------------------------------------------
# Shared utilities (the protocol's building blocks; methods may use them).
# --------------------------------------------------------------------------------------------

def zero_module(module: nn.Module) -> nn.Module:
    """Zero every parameter, so a residual branch ending in ``module`` starts as the identity."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def num_groups(channels: int, max_groups: int = 32) -> int:
    """GroupNorm group count: 32 at every real scale (channels >= 64, multiples of 32); fewer for
    the narrow ``tiny`` test backbone, where 32 groups would not divide the channels."""
    return math.gcd(max_groups, channels)


class CrossAttentionLayer(nn.Module):
    """Cross-attention from the feature map to a context (the class embedding as one token).

    GroupNorm on ``h``; q from ``h``, k and v from the context; scaled dot-product attention;
    zero-initialised output projection; residual add. With a single context token the softmax is
    identically 1, so this reduces to a learned per-class vector added at every position.
    """

    def __init__(self, channels: int, context_dim: int, num_heads: int = 4):
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"channels={channels} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.norm = nn.GroupNorm(num_groups(channels), channels)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(context_dim, channels)
        self.to_v = nn.Linear(context_dim, channels)
        self.to_out = zero_module(nn.Linear(channels, channels))

    def forward(self, h: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, c, height, width = h.shape
        if context.dim() == 2:  # [B, D] -> one token [B, 1, D]
            context = context[:, None, :]
        x = self.norm(h).flatten(2).transpose(1, 2)  # [B, HW, C]

        def heads(t):  # [B, L, C] -> [B, heads, L, C / heads]
            return t.unflatten(-1, (self.num_heads, -1)).transpose(1, 2)

        q, k, v = heads(self.to_q(x)), heads(self.to_k(context)), heads(self.to_v(context))
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)
        out = self.to_out(out).transpose(1, 2).reshape(b, c, height, width)
        return h + out


class AdaLNBlock(nn.Module):
    """Adaptive LayerNorm with a gate (AdaLN-Zero): ``x + gate * ((1 + scale) * norm(x) + shift - x)``.

    ``norm`` is GroupNorm(1, C) computed in fp32; scale, shift and gate come from a
    zero-initialised ``SiLU -> Linear(cond_dim, 3C)``, so the block starts as the identity.
    """

    def __init__(self, channels: int, cond_dim: int):
        super().__init__()
        self.norm = nn.GroupNorm(1, channels)
        self.modulation = nn.Sequential(nn.SiLU(), zero_module(nn.Linear(cond_dim, 3 * channels)))

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        scale, shift, gate = self.modulation(cond)[:, :, None, None].chunk(3, dim=1)
        normed = F.group_norm(x.float(), 1, self.norm.weight.float(), self.norm.bias.float(),
                              self.norm.eps).to(x.dtype)
        return x + gate * ((1 + scale) * normed + shift - x)


# --------------------------------------------------------------------------------------------
# Time-path functions and post-block modules of the named methods.
# --------------------------------------------------------------------------------------------

def add_class_to_time(time_emb: torch.Tensor, class_emb: torch.Tensor) -> torch.Tensor:
    """The class reaches every ResBlock as part of the additive time bias."""
    return time_emb + class_emb


def time_only(time_emb: torch.Tensor, class_emb: torch.Tensor) -> torch.Tensor:
    """The time path stays unconditional; the class enters only through the post-block modules."""
    return time_emb


class NoConditioner(nn.Module):
    """The identity: no post-block class injection (and no parameters)."""

    def __init__(self, channels: int, cond_dim: int):
        super().__init__()

    def forward(self, h: torch.Tensor, class_emb: torch.Tensor) -> torch.Tensor:
        return h


class GroupNormFiLMBranch(nn.Module):
    """The best published attempt: ``h + zero_conv1x1(SiLU((1 + gamma(c)) * GroupNorm32(h) + beta(c)))``,
    gamma and beta from a zero-initialised Linear on SiLU(class_emb)."""

    def __init__(self, channels: int, cond_dim: int):
        super().__init__()
        self.norm = nn.GroupNorm(num_groups(channels), channels)
        self.film = nn.Sequential(nn.SiLU(), zero_module(nn.Linear(cond_dim, 2 * channels)))
        self.out = zero_module(nn.Conv2d(channels, channels, 1))

    def forward(self, h: torch.Tensor, class_emb: torch.Tensor) -> torch.Tensor:
        gamma, beta = self.film(class_emb)[:, :, None, None].chunk(2, dim=1)
        return h + self.out(F.silu((1 + gamma) * self.norm(h) + beta))


class ClassFiLM(nn.Module):
    """Ours: a bounded per-class FiLM of the block output, ``h * (1 + tanh(gamma(c))) + beta(c)``.

    Why: the time path can only add a per-channel bias inside each ResBlock, and cross-attention
    over one token is a per-class added vector; neither can scale features by class. AdaLN-Zero and
    the GroupNorm branch can, but they start with a zero gate / zero output conv, so at
    initialisation their modulation receives no gradient and is learned second-order (after the
    gate opens). Here gamma and beta come from one zero-initialised Linear on SiLU(class_emb): the
    module is exactly the identity at init, yet gamma and beta get a gradient from step 1. No
    normalisation, so the block's activation statistics pass through untouched; tanh bounds the gain
    to (0, 2) so nine stacked modulations cannot blow up (the failure of the self-gated attempt).
    Parameters: D x 2C + 2C per site, a fraction of cross-attention's.
    """

    def __init__(self, channels: int, cond_dim: int):
        super().__init__()
        self.film = nn.Sequential(nn.SiLU(), zero_module(nn.Linear(cond_dim, 2 * channels)))

    def forward(self, h: torch.Tensor, class_emb: torch.Tensor) -> torch.Tensor:
        gamma, beta = self.film(class_emb)[:, :, None, None].chunk(2, dim=1)
        return h * (1 + torch.tanh(gamma)) + beta


class ClassTokenCrossAttention(CrossAttentionLayer):
    """Ours: cross-attention to several class tokens, ``token_i = class_emb * s_i`` (i = 1..TOKENS).

    Why: with a single class token the softmax is identically 1, so the cross-attn baseline adds
    the same per-class vector at every position and its query never learns (docs/protocol.md). With
    several tokens per class the softmax is over TOKENS keys, so each position picks its own mix of
    class vectors from its content (a stroke pixel and a background pixel can receive different
    class information). The tokens are the class embedding scaled elementwise by TOKENS learned
    vectors (random init, so the keys differ from step 1): TOKENS x D parameters per site on top of
    cross-attention's. The output projection is zero-initialised: the identity at init.
    """

    TOKENS = 4

    def __init__(self, channels: int, context_dim: int, num_heads: int = 4):
        super().__init__(channels, context_dim, num_heads)
        self.token_scales = nn.Parameter(torch.randn(self.TOKENS, context_dim))

    def forward(self, h: torch.Tensor, class_emb: torch.Tensor) -> torch.Tensor:
        return super().forward(h, class_emb[:, None, :] * self.token_scales)  # [B, TOKENS, D]


class ClassTokensWithGain(nn.Module):
    """Ours: ClassTokenCrossAttention followed by a bounded per-class channel gain ``1 + tanh(g(c))``.

    Why: at 5x the demo learning rate every method without a learnable gain after each block
    (concat-film, cross-attn, concat-film+class-tokens) collapsed to the trivial predictor (the stress
    runs in docs/experiments.md), while
    the ClassFiLM methods, whose gain can shrink a block's output within a few steps, trained on.
    g is a zero-initialised Linear on SiLU(class_emb): the identity at init, trained from step 1.
    """

    def __init__(self, channels: int, cond_dim: int):
        super().__init__()
        self.tokens = ClassTokenCrossAttention(channels, cond_dim)
        self.gain = nn.Sequential(nn.SiLU(), zero_module(nn.Linear(cond_dim, channels)))

    def forward(self, h: torch.Tensor, class_emb: torch.Tensor) -> torch.Tensor:
        return self.tokens(h, class_emb) * (1 + torch.tanh(self.gain(class_emb)))[:, :, None, None]


class JointAttentionWithGain(nn.Module):
    """Ours: self-attention over the block's positions plus one class token, then the bounded gain.

    Why: with one class token, cross-attention's softmax is identically 1 (a constant per-class
    vector at every position, the query never trained). Put the class token in the same softmax as
    the feature map's positions (in-context conditioning, as in DiT's in-context variant) and each
    position decides from its content how much class it takes versus what the rest of the image
    says; the block also gains global spatial mixing at every resolution, which the backbone has
    only in one down block, one up block and the mid block. The class token is the class embedding
    projected to C channels and then treated exactly like a position (same k/v projections), so it
    costs D x C per site on top of self-attention. Zero-initialised output projection, and the
    zero-initialised gain ``1 + tanh(g(c))`` of ClassTokensWithGain (the stabiliser at 5x lr): the
    identity at init.
    """

    def __init__(self, channels: int, cond_dim: int, num_heads: int = 4):
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"channels={channels} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.norm = nn.GroupNorm(num_groups(channels), channels)
        self.class_token = nn.Linear(cond_dim, channels)
        self.to_qkv = nn.Linear(channels, 3 * channels)
        self.to_out = zero_module(nn.Linear(channels, channels))
        self.gain = nn.Sequential(nn.SiLU(), zero_module(nn.Linear(cond_dim, channels)))

    def forward(self, h: torch.Tensor, class_emb: torch.Tensor) -> torch.Tensor:
        b, c, height, width = h.shape
        positions = self.norm(h).flatten(2).transpose(1, 2)  # [B, HW, C]
        tokens = torch.cat([positions, self.class_token(class_emb)[:, None, :]], dim=1)  # [B, HW+1, C]
        q, k, v = (t.unflatten(-1, (self.num_heads, -1)).transpose(1, 2)
                   for t in self.to_qkv(tokens).chunk(3, dim=-1))
        out = F.scaled_dot_product_attention(q[:, :, :-1], k, v).transpose(1, 2).flatten(2)  # queries: positions only
        h = h + self.to_out(out).transpose(1, 2).reshape(b, c, height, width)
        return h * (1 + torch.tanh(self.gain(class_emb)))[:, :, None, None]


class ClassContentGate(nn.Module):
    """Ours: a per-channel gain chosen jointly by the class and the block's pooled content,
    ``h * (1 + tanh(W2 SiLU(W1 [LayerNorm(mean_HW(h)), c])))`` (a class-conditioned squeeze-excitation).

    Why: every baseline's class signal is independent of what the block currently sees (a bias in
    the time path, one attention vector per class, an AdaLN scale per class). Here the class and the
    image's global content decide together which channels to keep: "this is meant to be a 7 and the
    features say 1-like stroke" can damp the wrong channels. W2 is zero-initialised: the identity at
    init, W1 trained from the first step through W2's gradient; tanh bounds the gain to (0, 2), the
    stabiliser of the class-film methods at 5x lr. The pooled channel means are normalised across
    channels (a GroupNorm before pooling would make every channel's mean its bias).
    """

    def __init__(self, channels: int, cond_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(channels)
        self.squeeze = nn.Linear(channels + cond_dim, channels)
        self.excite = zero_module(nn.Linear(channels, channels))

    def forward(self, h: torch.Tensor, class_emb: torch.Tensor) -> torch.Tensor:
        pooled = self.norm(h.mean(dim=(2, 3)))  # [B, C]
        g = self.excite(F.silu(self.squeeze(torch.cat([pooled, class_emb], dim=1))))
        return h * (1 + torch.tanh(g))[:, :, None, None]


def add_unit_rms_class_to_time(time_emb: torch.Tensor, class_emb: torch.Tensor) -> torch.Tensor:
    """Ours: add the class embedding rescaled to the time embedding's RMS, per sample.

    Why: ``nn.Embedding`` starts at N(0, 1), so at initialisation the class term dominates the
    sum with the time embedding (whose scale the tuned time MLP sets); the ResBlocks then see a
    noisy timestep. Matching the RMS makes the two terms equal partners at every step of training,
    whatever the embedding's scale drifts to; only its direction is learned. No parameters.
    """
    scale = time_emb.pow(2).mean(1, keepdim=True).sqrt() / class_emb.pow(2).mean(1, keepdim=True).add(1e-12).sqrt()
    return time_emb + class_emb * scale


# --------------------------------------------------------------------------------------------
# The registry: one line per method.
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Method:
    prepare_conditioning: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    conditioner: Callable[[int, int], nn.Module]
    summary: str


METHODS: dict[str, Method] = {
    "custom": Method(prepare_conditioning, ClassConditioner,
                     "yours: the editable prepare_conditioning / ClassConditioner at the top of conditioning.py"),
    # The protocol's baselines.
    "concat-film": Method(add_class_to_time, NoConditioner,
                          "baseline: class embedding added to the time embedding; no post-block module"),
    "cross-attn": Method(time_only, CrossAttentionLayer,
                         "baseline: time path unconditional; zero-init cross-attention to the class token after every block"),
    "adanorm": Method(time_only, AdaLNBlock,
                      "baseline: time path unconditional; zero-init AdaLN (scale, shift, gate) after every block"),
    # The published attempts (docs/protocol.md): the bar, beside the baselines.
    "gn-film-branch": Method(time_only, GroupNormFiLMBranch,
                             "published: zero-init conv1x1 branch on SiLU(GroupNorm FiLM) after every block; "
                             "time path unconditional"),
    "concat-film+cross-attn": Method(add_class_to_time, CrossAttentionLayer,
                                     "published: concat-film's time path plus cross-attn's post-block layer"),
    # Our candidates (the reasoning is in the docstrings of ClassFiLM, add_unit_rms_class_to_time and
    # ClassTokenCrossAttention); how they fared: docs/experiments.md.
    "class-film": Method(time_only, ClassFiLM,
                         "ours: zero-init bounded FiLM h*(1+tanh(g(c)))+b(c) after every block; time path unconditional"),
    "concat-class-film": Method(add_class_to_time, ClassFiLM,
                                "ours: concat-film's time path plus the zero-init bounded class FiLM after every block"),
    "rms-concat-film": Method(add_unit_rms_class_to_time, NoConditioner,
                              "ours: class embedding rescaled to the time embedding's RMS, added to it; no post-block module"),
    "concat-film+class-tokens": Method(add_class_to_time, ClassTokenCrossAttention,
                                       "ours: concat-film's time path plus zero-init cross-attention to 4 class tokens after every block"),
    "concat-film+class-tokens+gain": Method(add_class_to_time, ClassTokensWithGain,
                                            "ours: concat-film+class-tokens with a zero-init bounded class gain after the attention"),
    "concat-film+joint-attn+gain": Method(add_class_to_time, JointAttentionWithGain,
                                          "ours: concat-film's time path plus zero-init self-attention over positions and one class "
                                          "token, then the bounded class gain, after every block"),
    "concat-film+content-gate": Method(add_class_to_time, ClassContentGate,
                                       "ours: concat-film's time path plus a zero-init bounded channel gain from the class and "
                                       "the block's pooled content after every block"),
}

BASELINES = ("concat-film", "cross-attn", "adanorm")
PUBLISHED = ("gn-film-branch", "concat-film+cross-attn")
