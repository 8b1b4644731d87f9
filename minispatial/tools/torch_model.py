"""An independent PyTorch (eager, CPU) implementation of the paper's dual encoder, for benchmarks.

Only `minispatial bench --torch` uses it: tools/bench.py imports this module inside
`load_torch_model`, so nothing else in the package ever imports torch (PyTorch is not a
dependency). It is written from the paper (docs/paper.md §3), not translated from minispatial's
hand-written backward: autograd does the gradients, torch.optim.AdamW the update.

Legend: B batch, T tokens, D d_model, H heads, Dh d_head, E feature width.

    vision: X = [cls ; s W_E[pixels]] + W_pos,  bidirectional attention, feature = CLS row
    text:   X = s W_E[tokens] + W_pos,          causal attention,        feature = EOT row
    block:  x = x + attn(x)   (attention only: no LayerNorm, no MLP), per layer
    loss:   logits = exp(logit_scale) * img @ txt^T;  (CE(rows) + CE(columns)) / 2

Parameters carry minispatial's names and shapes (`vision.blocks.0.attn.W_Q` [H, D, Dh], ...),
so `from_minispatial(params, cfg)` copies a minispatial parameter dict in and
`grads_as_numpy()` hands gradients back under the same names.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F


class DualEncoder(torch.nn.Module):
    def __init__(self, params: dict, cfg):
        # params {name: numpy array} (minispatial layout), cfg: minispatial ModelConfig
        super().__init__()
        if cfg.layernorm or cfg.mlp:
            raise ValueError("torch_model implements the attention-only model (layernorm=False, mlp=False)")
        self.cfg = cfg
        self.names = list(params)
        self.p = torch.nn.ParameterDict({n.replace(".", "__"): torch.nn.Parameter(torch.from_numpy(np.array(a)))
                                         for n, a in params.items()})
        self.scale = math.sqrt(cfg.d_model) if cfg.embed_scale == "sqrt_d" else 1.0

    def w(self, name: str) -> torch.Tensor:
        return self.p[name.replace(".", "__")]

    def attention(self, x, block: str, causal: bool):
        # x [B, T, D] -> [B, T, D]
        B, T, D = x.shape
        q = torch.einsum("btd,hde->bhte", x, self.w(f"{block}.attn.W_Q")) + self.w(f"{block}.attn.b_Q")[None, :, None]
        k = torch.einsum("btd,hde->bhte", x, self.w(f"{block}.attn.W_K")) + self.w(f"{block}.attn.b_K")[None, :, None]
        v = torch.einsum("btd,hde->bhte", x, self.w(f"{block}.attn.W_V")) + self.w(f"{block}.attn.b_V")[None, :, None]
        scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])          # [B, H, T, T]
        if causal:
            mask = torch.ones(T, T, dtype=torch.bool).triu(1)
            scores = scores.masked_fill(mask, float("-inf"))
        z = scores.softmax(dim=-1) @ v                                      # [B, H, T, Dh]
        return torch.einsum("bhte,hed->btd", z, self.w(f"{block}.attn.W_O")) + self.w(f"{block}.attn.b_O")

    def encode(self, tower: str, ids, pool):
        # ids [B, L] long, pool [B] long -> feature [B, E], unit rows
        x = self.w(f"{tower}.W_E")[ids] * self.scale
        if tower == "vision":
            cls = self.w("vision.class_embedding").expand(x.shape[0], 1, -1)
            x = torch.cat([cls, x], dim=1)
        x = x + self.w(f"{tower}.W_pos")[: x.shape[1]]
        for l in range(self.cfg.layers(tower)):
            x = x + self.attention(x, f"{tower}.blocks.{l}", causal=(tower == "text"))
        pooled = x[torch.arange(x.shape[0]), pool]
        if self.cfg.proj_dim:
            pooled = pooled @ self.w(f"{tower}.W_proj")
        return F.normalize(pooled, dim=-1)

    def forward(self, images, tokens, eot):
        # images [B, L], tokens [B, Tt], eot [B] (long tensors) -> loss (0-d)
        img = self.encode("vision", images, torch.zeros_like(eot))
        txt = self.encode("text", tokens, eot)
        logits = self.w("logit_scale").exp() * img @ txt.T
        target = torch.arange(logits.shape[0])
        return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))

    def grads_as_numpy(self) -> dict:
        return {n: self.w(n).grad.detach().numpy().copy() for n in self.names}


def from_minispatial(params: dict, cfg) -> DualEncoder:
    return DualEncoder(params, cfg)


def as_tensors(images, tokens, eot):
    return (torch.from_numpy(np.asarray(images, dtype=np.int64)), torch.from_numpy(np.asarray(tokens, dtype=np.int64)),
            torch.from_numpy(np.asarray(eot, dtype=np.int64)))


def loss_and_grads(params: dict, images, tokens, eot, cfg):
    """The same contract as minispatial.model.loss_and_grads, through autograd."""
    m = DualEncoder(params, cfg)
    loss = m(*as_tensors(images, tokens, eot))
    loss.backward()
    return float(loss.detach()), m.grads_as_numpy()


def make_trainer(params: dict, cfg, lr: float = 1e-3, betas=(0.9, 0.98), eps: float = 1e-6,
                 weight_decay: float = 0.0, threads: int = 2):
    """-> step(images, tokens, eot) doing one training step: forward, backward, AdamW, clamp of
    the logit scale to [0, ln 100] (as minispatial's trainer does)."""
    torch.set_num_threads(threads)
    m = DualEncoder(params, cfg)
    opt = torch.optim.AdamW(m.parameters(), lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    ls = m.w("logit_scale")

    def step(images, tokens, eot) -> float:
        opt.zero_grad(set_to_none=True)
        loss = m(images, tokens, eot)
        loss.backward()
        opt.step()
        with torch.no_grad():
            ls.clamp_(0.0, math.log(100.0))
        return float(loss.detach())

    return step
