"""The matrix products of the fast step, as data: the one list that the fast path's docs and the
benchmark's FLOP count (`fast_flops`) use.

Legend: B batch, T tokens, D d_model, H heads, Dh d_head, HD = H*Dh, E feature width, V' rows
of the token table (vocabulary, + CLS for vision), VT = V' + T, U distinct pooled queries (1 for
vision, the distinct (EOT token, position) pairs for text), K = sum_b n_b the keys the pooled rows
attend to (B*T for vision; sum of eot + 1 for text).

Each entry is (what, n, m, k, p): n products [m, k] x [k, p], 2·n·m·k·p FLOPs (a multiply-add is
2). Exp, the softmaxes, the kernels' adds, the L2 norm and AdamW are not counted (not matrix
products). The names are those of one_layer.py and last_layer.py, whose comments say where each
product is computed.
"""

from __future__ import annotations

import numpy as np


def n_queries(tower: str, tokens, eot) -> int:
    """U: the distinct pooled queries of a batch (vision: the CLS query; text: one per distinct
    (EOT token, EOT position) pair)."""
    if tower == "vision":
        return 1
    eot = np.asarray(eot)
    return len(set(zip(tokens[np.arange(tokens.shape[0]), eot].tolist(), eot.tolist())))


def one_layer_products(cfg, tower: str, B: int, T: int, U: int) -> list[tuple[str, int, int, int, int]]:
    """The products of one_layer.py (rewrites 2 + 3) for a one-layer tower, forward then backward."""
    D, H, Dh = cfg.d_model, cfg.n_heads, cfg.d_head
    HD = H * Dh
    Vp = cfg.vision_vocab + 1 if tower == "vision" else cfg.text_vocab          # + CLS for vision
    VT = Vp + T
    HV, HU = H * VT, H * U
    return [
        ("q = X_u W_Q", 1, U, D, HD),
        ("Qt_h = W_K,h q_h", H, D, Dh, U),
        ("[Vtab | S^T] = AP [W_V | Qt]", 1, VT, D, HD + HU),
        ("O_h = Vtab_h W_O,h", H, VT, Dh, D),
        ("pooled = C @ O", 1, B, HV + U, D),
        ("dC = dpool O^T", 1, B, D, HV),
        ("dO = C^T dpool", 1, HV + U, B, D),
        ("dW_O,h = Vtab_h^T dO_h", H, Dh, VT, D),
        ("dVtab_h = dO_h W_O,h^T", H, VT, D, Dh),
        ("dW_V,h = AP^T dVtab_h", H, D, VT, Dh),
        ("dQt = dS AP", 1, HU, VT, D),
        ("dq_h = dQt_h W_K,h", H, U, D, Dh),
        ("dW_K,h = dQt_h^T q_h", H, D, U, Dh),
        ("dW_Q = X_u^T dq", 1, D, U, HD),
        ("dX_u += dq W_Q^T", 1, U, HD, D),
        ("dAP^T = [W_V | Qt] [dVtab | dS^T]^T", 1, D, HD + HU, VT),
    ]


def dense_layer_products(cfg, B: int, T: int) -> list[tuple[str, int, int, int, int]]:
    """The products of one dense attention layer (ops.attention_forward/backward; the numba core
    computes the scores and pattern @ v in loops, counted here as products)."""
    D, H, Dh = cfg.d_model, cfg.n_heads, cfg.d_head
    HD, N = H * Dh, B * T
    return [
        ("qkv = x W_qkv", 1, N, D, 3 * HD),
        ("scores = q k^T", B * H, T, Dh, T),
        ("z = pattern v", B * H, T, T, Dh),
        ("out = z W_O", 1, N, HD, D),
        ("dW_O = z^T dout", 1, HD, N, D),
        ("dz = dout W_O^T", 1, N, D, HD),
        ("dpattern = dz v^T", B * H, T, Dh, T),
        ("dv = pattern^T dz", B * H, T, T, Dh),
        ("dq = dscores k", B * H, T, T, Dh),
        ("dk = dscores^T q", B * H, T, T, Dh),
        ("dW_qkv = x^T dqkv", 1, D, N, 3 * HD),
        ("dx = dqkv W_qkv^T", 1, N, 3 * HD, D),
    ]


def last_layer_products(cfg, B: int, T: int, K: int) -> list[tuple[str, int, int, int, int]]:
    """The products of last_layer.py's rewrite 1 (the last layer of a multi-layer tower, for the
    pooled rows; K keys in all)."""
    D, H, Dh = cfg.d_model, cfg.n_heads, cfg.d_head
    HD = H * Dh
    return [
        ("kv = x W_[K|V]", 1, B * T, D, 2 * HD),
        ("q = x_pool W_Q", 1, B, D, HD),
        ("scores = q . k over n_b keys", H, 1, Dh, K),
        ("z = pattern v", H, 1, K, Dh),
        ("pooled += z W_O", 1, B, HD, D),
        ("dW_O = z^T dpool", 1, HD, B, D),
        ("dz = dpool W_O^T", 1, B, D, HD),
        ("dpattern = dz . v", H, 1, Dh, K),
        ("dv = pattern dz", H, K, 1, Dh),
        ("dq = dscores k", H, 1, K, Dh),
        ("dk = dscores q", H, K, 1, Dh),
        ("dW_[K|V] = x^T dkv", 1, D, B * T, 2 * HD),
        ("dx = dkv W_[K|V]^T", 1, B * T, 2 * HD, D),
        ("dW_Q = x_pool^T dq", 1, D, B, HD),
        ("dx_pool += dq W_Q^T", 1, B, HD, D),
    ]


def step_products(cfg, tokens, eot) -> list[tuple[str, int, int, int, int]]:
    """Every matrix product of the fast step (step.py) on this batch: both towers (one_layer.py
    for a one-layer tower; the dense layers and last_layer.py otherwise), the projection and the
    loss's logit products. ValueError for LayerNorm/MLP configs (the fast step runs the reference
    model there: see the benchmark's naive count)."""
    if cfg.layernorm or cfg.mlp:
        raise ValueError("step_products: LayerNorm/MLP configs are not rewritten by the fast step")
    B, Tt = tokens.shape
    D, E = cfg.d_model, cfg.proj_dim or cfg.d_model
    eot = np.asarray(eot)
    out = []
    for tower, T in (("vision", cfg.vision_ctx), ("text", Tt)):
        L = cfg.layers(tower)
        if L == 1:
            prods = one_layer_products(cfg, tower, B, T, n_queries(tower, tokens, eot))
        else:
            K = B * T if tower == "vision" else int(np.sum(eot + 1))
            prods = [(f"layer {l}: {w}", n, m, k, p) for l in range(L - 1)
                     for w, n, m, k, p in dense_layer_products(cfg, B, T)]
            prods += [(f"layer {L - 1}: {w}", n, m, k, p) for w, n, m, k, p in last_layer_products(cfg, B, T, K)]
        out += [(f"{tower}: {w}", n, m, k, p) for w, n, m, k, p in prods]
        if cfg.proj_dim:
            out += [(f"{tower}: projection", 1, B, D, E), (f"{tower}: d W_proj", 1, D, B, E),
                    (f"{tower}: d pooled", 1, B, E, D)]
    out += [("logits = img txt^T", 1, B, E, B), ("d img = G txt", 1, B, B, E), ("d txt = G^T img", 1, B, B, E)]
    return out


def fast_flops(cfg, tokens, eot) -> float:
    """FLOPs of the fast step's matrix products on this batch: the sum over `step_products`."""
    return float(sum(2 * n * m * k * p for _, n, m, k, p in step_products(cfg, tokens, eot)))
