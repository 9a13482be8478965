"""How the class label enters the denoiser.

A method is two things, and nothing else about the model may differ between methods:

* ``prepare_conditioning(time_emb, class_emb) -> emb``: combines the ``[B, D]`` timestep and class
  embeddings into the ``[B, D]`` vector that every ResBlock receives (the "time path"; diffusers
  adds it as a per-channel bias after each ResBlock's first conv).
* ``ClassConditioner(channels, cond_dim)``: a module with ``forward(h, class_emb) -> h'`` applied
  after every down block, after the mid block and after every up block (the "post-block path").

``D = cond_dim = 4 * block_out_channels[0]``. The pair right below is the method ``custom``:
edit it to try an idea (``python custom_train.py --method custom``). To keep an idea, give it a
name: write its function and class further down and add one line to ``METHODS`` at the bottom.
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
    "concat-film": Method(add_class_to_time, NoConditioner,
                          "baseline: class embedding added to the time embedding; no post-block module"),
    "cross-attn": Method(time_only, CrossAttentionLayer,
                         "baseline: time path unconditional; zero-init cross-attention to the class token after every block"),
    "adanorm": Method(time_only, AdaLNBlock,
                      "baseline: time path unconditional; zero-init AdaLN (scale, shift, gate) after every block"),
}

BASELINES = ("concat-film", "cross-attn", "adanorm")
