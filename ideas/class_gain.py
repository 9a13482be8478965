"""concat-film's time path plus a bounded per-class channel gain after every block: h * (1 + tanh(g(c))).

An example of a method kept in its own file (`python custom_train.py --method ideas/class_gain.py`).
Why: the time path can only add a per-channel bias inside each ResBlock; a gain lets the class scale a
block's features, and a gain alone (no added bias, unlike class-film) isolates that. g is a
zero-initialised Linear on SiLU(class_emb), so the method starts as concat-film exactly and is trained
from the first step; tanh bounds the gain to (0, 2).
"""
import torch
from torch import nn

from conditioning import add_class_to_time as prepare_conditioning  # noqa: F401  (the time path: t + c)
from conditioning import zero_module


class ClassConditioner(nn.Module):
    def __init__(self, channels: int, cond_dim: int):
        super().__init__()
        self.gain = nn.Sequential(nn.SiLU(), zero_module(nn.Linear(cond_dim, channels)))

    def forward(self, h: torch.Tensor, class_emb: torch.Tensor) -> torch.Tensor:
        return h * (1 + torch.tanh(self.gain(class_emb)))[:, :, None, None]
