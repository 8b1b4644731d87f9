"""The dual encoder: a vision tower and a text tower, attention-only by default, CLIP loss on top.

Legend: B batch, T tokens, D d_model, H heads, Dh d_head, V vocabulary, E feature width,
L image length (pixels), Tt text length.

    vision:  X = [class_embedding ; W_E[pixels] * s] + W_pos     (CLS prepended, T = 1 + L)
             x = X; for each block: x = x + attn(ln1(x)) [+ mlp(ln2(x))]; pooled = x[:, 0]   (CLS)
    text:    X = W_E[tokens] * s + W_pos                          (causal mask, T = Tt)
             same blocks; pooled = x[b, eot[b]]                    (EOT)
    both:    feature = l2norm(pooled [@ W_proj]);  loss = CLIP(img, txt, logit_scale)

`s` is the embedding scale (1, or sqrt(D) as in the authors' base code). LayerNorm (ln1, ln2,
ln_final) and the MLP exist as options, off by default (the paper's main model has neither).

Parameters are one flat dict with TransformerLens-style names, e.g. `vision.W_E`,
`vision.W_pos`, `vision.class_embedding`, `vision.blocks.0.attn.W_Q` [H, D, Dh],
`text.blocks.0.attn.b_K` [H, Dh], `text.W_proj` [D, E], `logit_scale` (0-d).
Hook names (for `record` / `hooks`) follow TransformerLens, with the tower prefixed, and mean
what they mean there: `vision.hook_embed` [B, T, D] (token part, CLS row included),
`vision.hook_pos_embed` [B, T, D] (W_pos[:T] broadcast over the batch), `vision.blocks.0.hook_resid_pre`,
`vision.blocks.0.attn.hook_q|k|v` [B, T, H, Dh], `vision.blocks.0.attn.hook_attn_scores` [B, H, Tq, Tk]
(after the causal mask: masked keys are -inf), `hook_pattern` [B, H, Tq, Tk],
`vision.blocks.0.attn.hook_z`, `vision.blocks.0.hook_attn_out`, `vision.blocks.0.hook_resid_post`,
`vision.blocks.0.ln1.hook_scale` (1/std, when LayerNorm is on), `vision.hook_pooled`.
Differences from TransformerLens: the tower prefix, and `hook_pooled` (the CLS / EOT row).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass

import numpy as np

from minispatial import data, memory, ops

INITS = ("torch", "clip", "scaled")
EMBED_SCALES = ("none", "sqrt_d")
DTYPES = ("float32", "float64")
TOWERS = ("vision", "text")
ENCODE_CHUNK = 1024       # rows per encoder call when a whole split is encoded (evaluate.py)


@dataclass(frozen=True)
class ModelConfig:
    """Shape and options of the dual encoder. Defaults are the paper's model (docs/paper.md §3).

    The last four fields are derived from the testbed (`RunConfig` fills them in)."""

    d_model: int = 128            # D
    n_heads: int = 4              # H
    d_head: int = 32              # Dh
    vision_layers: int = 1
    text_layers: int = 1          # 2 for left+right captions (paper)
    layernorm: bool = False       # paper appendix option: pre-LN blocks + ln_final
    mlp: bool = False             # paper appendix option: GELU MLP after attention
    d_mlp: int = 512              # F, MLP hidden width
    proj_dim: int = 0             # E; 0 = no projection after pooling (feature = pooled row)
    embed_scale: str = "none"     # "sqrt_d": token embeddings times sqrt(D) (authors' base code)
    init: str = "clip"            # "clip": OpenAI CLIP's scheme (default, chosen by the search in
                                  # reference_runs/); "torch": PyTorch defaults (authors' base code);
                                  # "scaled": normal draws with stds between the two (init_scale)
    init_scale: float = 0.0       # a in [0, 1] of init="scaled": std = std_clip^(1-a) * std_torch^a
    logit_scale_init: float = math.log(1 / 0.07)
    dtype: str = "float32"
    vision_vocab: int = 21        # pixel values 0..n_labels (0 = background)
    text_vocab: int = 30          # PAD, EOT, 8 template words, n_labels labels
    vision_ctx: int = 11          # 1 (CLS) + image_len
    text_ctx: int = 8             # longest caption (7 words) + EOT

    def __post_init__(self):
        ints = {"d_model": 1, "n_heads": 1, "d_head": 1, "vision_layers": 1, "text_layers": 1,
                "d_mlp": 1, "proj_dim": 0, "vision_vocab": 2, "text_vocab": 2, "vision_ctx": 2,
                "text_ctx": 2}
        for name, lo in ints.items():
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < lo:
                raise ValueError(f"ModelConfig.{name}={v!r} is invalid: must be an int >= {lo}")
        for name in ("layernorm", "mlp"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"ModelConfig.{name}={getattr(self, name)!r} is invalid: must be true or false")
        for name, allowed in (("embed_scale", EMBED_SCALES), ("init", INITS), ("dtype", DTYPES)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"ModelConfig.{name}={getattr(self, name)!r} is invalid: must be one of {allowed}")
        v = self.logit_scale_init
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not (0.0 <= v <= math.log(100.0)):
            raise ValueError(f"ModelConfig.logit_scale_init={v!r} is invalid: must be a number in [0, ln 100]")
        v = self.init_scale
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or not 0.0 <= v <= 1.0:
            raise ValueError(f"ModelConfig.init_scale={v!r} is invalid: must be a finite number in [0, 1]")
        # memory: the parameters, their gradients and AdamW moments and one example's activations
        # (the batch is checked where it is known: check_run_memory, `minispatial bench`)
        memory.check_memory(self.memory_subject(), estimate_model_bytes(self, 1),
                         f"the model ({n_params(self):,} parameters; with gradients, AdamW moments "
                         f"and the activations of one example)")

    def memory_subject(self) -> str:
        """'ModelConfig.d_model=4096, ...': the size fields above their defaults (all if none)."""
        grown = [f.name for f in dataclasses.fields(self) if f.name in MEMORY_FIELDS
                 and getattr(self, f.name) > f.default and (f.name != "d_mlp" or self.mlp)]
        return "ModelConfig." + ", ".join(f"{k}={getattr(self, k)!r}" for k in grown or MEMORY_FIELDS)

    def layers(self, tower: str) -> int:
        return self.vision_layers if tower == "vision" else self.text_layers


# --------------------------------------------------------------------------------------------
# memory: estimates for refusing a config that cannot fit, before anything is built

# the fields the model's memory grows with (named when it is too large)
MEMORY_FIELDS = ("d_model", "n_heads", "d_head", "vision_layers", "text_layers", "d_mlp", "proj_dim",
                 "vision_vocab", "text_vocab", "vision_ctx", "text_ctx")


def n_params(cfg: ModelConfig) -> int:
    """Number of parameters, by formula (= the sizes of param_shapes(cfg), tested; a dict of a
    million layers' names would itself take seconds to build)."""
    D, H, Dh, F = cfg.d_model, cfg.n_heads, cfg.d_head, cfg.d_mlp
    block = 4 * H * D * Dh + 3 * H * Dh + D                          # attention
    if cfg.mlp:
        block += 2 * D * F + F + D
    if cfg.layernorm:
        block += 4 * D if cfg.mlp else 2 * D                         # ln1 (and ln2)
    total = 1 + D                                                    # logit scale, CLS embedding
    for vocab, ctx, tower in ((cfg.vision_vocab, cfg.vision_ctx, "vision"), (cfg.text_vocab, cfg.text_ctx, "text")):
        total += (vocab + ctx) * D + cfg.layers(tower) * block
        total += (2 * D if cfg.layernorm else 0) + D * cfg.proj_dim
    return total


def _activation_elems(cfg: ModelConfig, B: int, train: bool) -> int:
    # floats alive at the peak of a step of the dense (NumPy reference) path on a batch of B:
    # per layer the cached q, k, v, z [B, T, H*Dh], pattern [B, H, T, T], residual stream, attention
    # output and LayerNorm / MLP activations (3 [B, T, F]); plus, in the layer being computed, the
    # scores and softmax temporaries (3 [B, H, T, T]), the qkv GEMM's output and the GELU backward's
    # temporaries (6 [B, T, F]); plus the CLIP loss's [B, B] logits, both softmaxes and their
    # gradients. train=False: one tower's forward (evaluation)
    D, H, HD, F = cfg.d_model, cfg.n_heads, cfg.n_heads * cfg.d_head, cfg.d_mlp
    towers = []
    for tower in TOWERS:
        T = cfg.vision_ctx if tower == "vision" else cfg.text_ctx
        layer = 4 * B * T * HD + B * H * T * T + 3 * B * T * D
        layer += (2 * B * T * D if cfg.layernorm else 0) + (3 * B * T * F + B * T * D if cfg.mlp else 0)
        work = 3 * B * H * T * T + 6 * B * T * HD + 3 * B * T * D + (6 * B * T * F if cfg.mlp else 0)
        towers.append((cfg.layers(tower) * layer + 3 * B * T * D, work))
    E = cfg.proj_dim or D
    if not train:
        return max(cache + work for cache, work in towers) + 2 * B * E
    return sum(cache for cache, _ in towers) + max(work for _, work in towers) + 6 * B * B + 8 * B * E


def estimate_model_bytes(cfg: ModelConfig, batch: int, train: bool = True) -> int:
    """Peak memory of training `cfg` on batches of `batch` examples, estimated from the shapes.

    The parameters (7 x: themselves, the flat copy `optim.flatten` makes, the gradients and their
    flat buffer, the two AdamW moments, and the moments' zeros while they are flattened),
    and the activations of one step on the dense NumPy path (the numba fast path needs less):
    they grow with d_model^2 x layers (weights), batch x heads x ctx^2 x layers (attention
    patterns) and batch^2 (the CLIP logits). train=False: the parameters and one tower's forward
    pass (evaluation). Bytes of cfg.dtype; checked against tracemalloc's peak in the tests."""
    item = np.dtype(cfg.dtype).itemsize
    return int(item * (7 * n_params(cfg) + _activation_elems(cfg, int(batch), train)) + (1 << 20))


def _train_cap(data_cfg, sampler: str) -> int:
    # the largest training batch of `sampler` (data.sampler_cap), from the config alone
    return data.split_sizes(data_cfg)["train"] if sampler == "uniform" else data.n_train_scenes(data_cfg)


def estimate_run_bytes(data_cfg, model_cfg: ModelConfig, batch_size: int, sampler: str = "distinct") -> int:
    """Peak memory of `minispatial train` for a TestbedConfig, a ModelConfig and a batch size:
    the testbed, plus the larger of a training step (the batch capped at the distinct training
    scenes, as `data.sample_batch` caps it) and evaluation (one tower's forward on
    ENCODE_CHUNK rows, and the caption bank of every n (2n - 1) caption: its
    features, tokens and strings)."""
    B = min(int(batch_size), _train_cap(data_cfg, sampler))
    n = data_cfg.n_labels
    E = model_cfg.proj_dim or model_cfg.d_model
    bank = n * (2 * n - 1) * (8 * E + 8 * (model_cfg.text_ctx + 1) + 130) + 16 * (n + 1) ** 2
    evaluation = estimate_model_bytes(model_cfg, ENCODE_CHUNK, train=False) + bank
    return data.estimate_testbed_bytes(data_cfg) + max(estimate_model_bytes(model_cfg, B), evaluation)


def check_run_memory(data_cfg, model_cfg: ModelConfig, batch_size: int, sampler: str = "distinct") -> None:
    """ValueError when `estimate_run_bytes` is over the memory limit (memory.memory_limit_bytes):
    naming TrainConfig.batch_size when a batch of 1 would fit, else the testbed's and the
    model's size fields above their defaults."""
    need = estimate_run_bytes(data_cfg, model_cfg, batch_size, sampler)
    if need <= memory.memory_limit_bytes():
        return
    B = min(int(batch_size), _train_cap(data_cfg, sampler))
    if estimate_run_bytes(data_cfg, model_cfg, 1, sampler) <= memory.memory_limit_bytes():
        subject = f"TrainConfig.batch_size={batch_size!r}"
    else:
        grown = [f"{f.name}={getattr(data_cfg, f.name)!r}" for f in dataclasses.fields(data_cfg)
                 if f.name in data.MEMORY_FIELDS and getattr(data_cfg, f.name) > f.default]
        subject = model_cfg.memory_subject() + (" with TestbedConfig." + ", ".join(grown) if grown else "")
    memory.check_memory(subject, need, f"training and evaluation (testbed, model, a batch of {B})")


# --------------------------------------------------------------------------------------------
# parameters

def param_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter's name and shape, in a fixed order (checkpoints and optimizers use it)."""
    D, H, Dh, F = cfg.d_model, cfg.n_heads, cfg.d_head, cfg.d_mlp
    shapes: dict[str, tuple[int, ...]] = {}
    for tower in TOWERS:
        vocab = cfg.vision_vocab if tower == "vision" else cfg.text_vocab
        ctx = cfg.vision_ctx if tower == "vision" else cfg.text_ctx
        shapes[f"{tower}.W_E"] = (vocab, D)
        if tower == "vision":
            shapes["vision.class_embedding"] = (D,)
        shapes[f"{tower}.W_pos"] = (ctx, D)
        for l in range(cfg.layers(tower)):
            b = f"{tower}.blocks.{l}"
            if cfg.layernorm:
                shapes[f"{b}.ln1.w"] = (D,)
                shapes[f"{b}.ln1.b"] = (D,)
            for n in ("Q", "K", "V"):
                shapes[f"{b}.attn.W_{n}"] = (H, D, Dh)
                shapes[f"{b}.attn.b_{n}"] = (H, Dh)
            shapes[f"{b}.attn.W_O"] = (H, Dh, D)
            shapes[f"{b}.attn.b_O"] = (D,)
            if cfg.mlp:
                if cfg.layernorm:
                    shapes[f"{b}.ln2.w"] = (D,)
                    shapes[f"{b}.ln2.b"] = (D,)
                shapes[f"{b}.mlp.W_in"] = (D, F)
                shapes[f"{b}.mlp.b_in"] = (F,)
                shapes[f"{b}.mlp.W_out"] = (F, D)
                shapes[f"{b}.mlp.b_out"] = (D,)
        if cfg.layernorm:
            shapes[f"{tower}.ln_final.w"] = (D,)
            shapes[f"{tower}.ln_final.b"] = (D,)
        if cfg.proj_dim:
            shapes[f"{tower}.W_proj"] = (D, cfg.proj_dim)
    shapes["logit_scale"] = ()
    return shapes


def _torch_fan_in(cfg: ModelConfig, leaf: str) -> int:
    # fan_in of nn.Linear for a weight or bias leaf (W_O / b_O: H*Dh, W_out / b_out: d_mlp, else D)
    return {"W_O": cfg.n_heads * cfg.d_head, "b_O": cfg.n_heads * cfg.d_head,
            "W_out": cfg.d_mlp, "b_out": cfg.d_mlp}.get(leaf, cfg.d_model)


def _clip_std(cfg: ModelConfig, name: str, leaf: str) -> float | None:
    # the "clip" scheme's std of a tensor; None for its zero biases
    D = cfg.d_model
    tower = name.split(".", 1)[0]
    n_layers = cfg.layers(tower) if tower in TOWERS else 1
    return {"W_E": 0.02, "W_pos": 0.01, "class_embedding": D ** -0.5,
            "W_Q": D ** -0.5, "W_K": D ** -0.5, "W_V": D ** -0.5,
            "W_O": D ** -0.5 * (2 * n_layers) ** -0.5, "W_in": (2 * D) ** -0.5,
            "W_out": D ** -0.5 * (2 * n_layers) ** -0.5, "W_proj": D ** -0.5}.get(leaf)


def init_std(cfg: ModelConfig, name: str) -> float | None:
    """The std of init="scaled" for parameter `name` at a = cfg.init_scale (None: not drawn,
    i.e. LayerNorm and logit_scale). Weights: std_clip^(1-a) * std_torch^a, std_torch = 1 for
    embeddings (N(0, 1)) and b/sqrt(3) for linears (U(-b, b), b = 1/sqrt(fan_in)); biases:
    a * b/sqrt(3) (clip's are 0)."""
    leaf = name.rsplit(".", 1)[-1]
    if name == "logit_scale" or leaf in ("w", "b"):
        return None
    a = float(cfg.init_scale)
    torch_std = 1.0 if leaf in ("W_E", "W_pos", "class_embedding") else \
        1.0 / math.sqrt(_torch_fan_in(cfg, leaf)) / math.sqrt(3.0)
    clip_std = _clip_std(cfg, name, leaf)
    if clip_std is None:                                              # a bias
        return a * torch_std
    return clip_std ** (1.0 - a) * torch_std ** a


def init_params(cfg: ModelConfig, seed: int) -> dict[str, np.ndarray]:
    """Fresh parameters. Three documented schemes (`cfg.init`):

    "torch" (the authors' base code used PyTorch defaults): embeddings (W_E, W_pos,
        class_embedding) ~ N(0, 1) like nn.Embedding; every linear weight and bias (attention
        Q/K/V/O, MLP, projection) ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)) like nn.Linear;
        LayerNorm w = 1, b = 0.
    "clip" (OpenAI CLIP; the default: reference_runs/README.md, experiment 4, shows that the
        torch scheme's N(0, 1) embeddings stop held-out labels from generalising): W_E ~ N(0, 0.02), W_pos ~ N(0, 0.01), class_embedding ~ N(0, D^-1/2),
        W_Q/W_K/W_V ~ N(0, D^-1/2), W_O ~ N(0, D^-1/2 (2 L)^-1/2), MLP W_in ~ N(0, (2D)^-1/2),
        W_out ~ N(0, D^-1/2 (2 L)^-1/2), W_proj ~ N(0, D^-1/2), biases 0.
    "scaled" (a = cfg.init_scale in [0, 1]): every weight ~ N(0, std_clip^(1-a) std_torch^a),
        every linear bias ~ N(0, a b/sqrt(3)) (`init_std`), LayerNorm as above. Biases are drawn
        only when a > 0, so a = 0 draws the same stream as "clip" and is bit-identical to it;
        a = 1 has the torch scheme's stds with normal instead of uniform draws.
    logit_scale = cfg.logit_scale_init (ln(1/0.07) by default). Deterministic given seed.
    """
    dt = np.dtype(cfg.dtype)
    rng = np.random.default_rng(seed)
    params: dict[str, np.ndarray] = {}
    for name, shape in param_shapes(cfg).items():
        leaf = name.rsplit(".", 1)[-1]
        if name == "logit_scale":
            arr = np.array(cfg.logit_scale_init)
        elif leaf in ("w",):
            arr = np.ones(shape)
        elif leaf == "b":
            arr = np.zeros(shape)
        elif cfg.init == "torch":
            if leaf in ("W_E", "W_pos", "class_embedding"):
                arr = rng.standard_normal(shape)
            else:
                bound = 1.0 / math.sqrt(_torch_fan_in(cfg, leaf))
                arr = rng.uniform(-bound, bound, size=shape)
        elif cfg.init == "scaled":
            std = init_std(cfg, name)
            arr = np.zeros(shape) if std == 0.0 else rng.normal(0.0, std, size=shape)
        else:  # clip
            std = _clip_std(cfg, name, leaf)
            arr = np.zeros(shape) if std is None else rng.normal(0.0, std, size=shape)
        params[name] = np.array(arr, dtype=dt, order="C")  # (ascontiguousarray would make 0-d 1-d)
    return params


@functools.lru_cache(maxsize=32)
def _shapes_and_dtype(cfg: ModelConfig) -> tuple:
    # check_params runs every step: param_shapes once per config
    return tuple(param_shapes(cfg).items()), np.dtype(cfg.dtype)


def check_params(params: dict, cfg: ModelConfig) -> None:
    """Every expected tensor present with the right shape and dtype; nothing extra."""
    shapes, dt = _shapes_and_dtype(cfg)
    if len(params) != len(shapes) or any(n not in params for n, _ in shapes):
        missing = [n for n, _ in shapes if n not in params]
        extra = [n for n in params if n not in dict(shapes)]
        raise ValueError(f"params do not match the config: missing {missing}, unexpected {extra}")
    for n, s in shapes:
        a = params[n]
        if not isinstance(a, np.ndarray) or a.shape != s or a.dtype != dt:
            got = (a.shape, a.dtype) if isinstance(a, np.ndarray) else type(a).__name__
            raise ValueError(f"param {n} is {got}: expected shape {s} dtype {cfg.dtype}")


# --------------------------------------------------------------------------------------------
# one tower: forward and backward side by side

def embed_scale(cfg: ModelConfig) -> float:
    """s in tok = W_E[ids] * s: sqrt(D) with embed_scale "sqrt_d", else 1."""
    return math.sqrt(cfg.d_model) if cfg.embed_scale == "sqrt_d" else 1.0


def attn_params(params: dict, block: str) -> dict:
    """{"W_Q": ..., "b_O": ...} of the attention of `block` (e.g. "vision.blocks.0")."""
    return {n: params[f"{block}.attn.{n}"] for n in ops.ATTN_PARAMS}


def _hook(hooks, record, name, value):
    return ops.run_hook(hooks, record, name, value)


def tower_forward(params: dict, tower: str, ids, pool_idx, cfg: ModelConfig, hooks=None, record=None,
                  core=None):
    # ids [B, L] pixels (vision) or [B, Tt] tokens (text), pool_idx [B] -> feat [B, E], cache
    # (feat is L2-normalised; E = proj_dim, or D without projection). `core`: the attention core
    # (ops.AttentionCore; default NumPy), `hooks`/`record`: TransformerLens-style hook points.
    s = embed_scale(cfg)
    causal = tower == "text"
    caches = {}
    tok, caches["embed"] = ops.embedding_forward(params[f"{tower}.W_E"], ids)   # [B, Tx, D]
    if s != 1.0:
        tok = tok * s
    if tower == "vision":
        tok, _ = ops.prepend_cls_forward(tok, params["vision.class_embedding"])  # [B, 1+L, D]
    T = tok.shape[1]
    if T > params[f"{tower}.W_pos"].shape[0]:
        raise ValueError(f"{tower} input has {T} positions but the model's context is "
                         f"{params[f'{tower}.W_pos'].shape[0]}")
    tok = _hook(hooks, record, f"{tower}.hook_embed", tok)
    x, caches["pos"] = ops.pos_embedding_forward(tok, params[f"{tower}.W_pos"])   # [B, T, D]
    if hooks is not None or record is not None:                                   # X = E + P, P read
        pos = np.broadcast_to(params[f"{tower}.W_pos"][:T], tok.shape)            # as [B, T, D]
        new = _hook(hooks, record, f"{tower}.hook_pos_embed", pos)
        if new is not pos:
            x = tok + new
    for l in range(cfg.layers(tower)):
        b = f"{tower}.blocks.{l}"
        x = _hook(hooks, record, f"{b}.hook_resid_pre", x)
        h = x
        if cfg.layernorm:
            h, caches[f"{b}.ln1"] = ops.layernorm_forward(x, params[f"{b}.ln1.w"], params[f"{b}.ln1.b"])
            _hook(None, record, f"{b}.ln1.hook_scale", caches[f"{b}.ln1"][1])
        a, caches[f"{b}.attn"] = ops.attention_forward(h, attn_params(params, b), causal, hooks=hooks,
                                                       record=record, prefix=f"{b}.attn.", core=core)
        a = _hook(hooks, record, f"{b}.hook_attn_out", a)
        x = x + a                                                                 # residual
        if cfg.mlp:
            h = x
            if cfg.layernorm:
                h, caches[f"{b}.ln2"] = ops.layernorm_forward(x, params[f"{b}.ln2.w"], params[f"{b}.ln2.b"])
            m, caches[f"{b}.mlp"] = ops.mlp_forward(h, params[f"{b}.mlp.W_in"], params[f"{b}.mlp.b_in"],
                                                    params[f"{b}.mlp.W_out"], params[f"{b}.mlp.b_out"])
            x = x + m
        x = _hook(hooks, record, f"{b}.hook_resid_post", x)
    if cfg.layernorm:
        x, caches["ln_final"] = ops.layernorm_forward(x, params[f"{tower}.ln_final.w"],
                                                      params[f"{tower}.ln_final.b"])
    pooled, caches["pool"] = ops.pool_forward(x, pool_idx)                       # [B, D]
    pooled = _hook(hooks, record, f"{tower}.hook_pooled", pooled)
    if cfg.proj_dim:
        pooled, caches["proj"] = ops.linear_forward(pooled, params[f"{tower}.W_proj"])  # [B, E]
    feat, caches["l2"] = ops.l2norm_forward(pooled)
    return feat, (tower, s, caches)


def tower_backward(dfeat, cache, params: dict, cfg: ModelConfig) -> dict:
    # dfeat [B, E] -> grads {name: array} for this tower's parameters
    tower, s, caches = cache
    g: dict[str, np.ndarray] = {}
    d = ops.l2norm_backward(dfeat, caches["l2"])                       # inverts feat = l2norm(pooled)
    if cfg.proj_dim:
        d, g[f"{tower}.W_proj"], _ = ops.linear_backward(d, caches["proj"])  # inverts pooled @ W_proj
    dx = ops.pool_backward(d, caches["pool"])                          # inverts pooled = x[:, idx]
    if cfg.layernorm:
        dx, g[f"{tower}.ln_final.w"], g[f"{tower}.ln_final.b"] = ops.layernorm_backward(dx, caches["ln_final"])
    for l in reversed(range(cfg.layers(tower))):
        b = f"{tower}.blocks.{l}"
        if cfg.mlp:                                                    # inverts x = x + mlp(ln2(x))
            dh, *gm = ops.mlp_backward(dx, caches[f"{b}.mlp"])
            for n, gv in zip(("W_in", "b_in", "W_out", "b_out"), gm):
                g[f"{b}.mlp.{n}"] = gv
            if cfg.layernorm:
                dh, g[f"{b}.ln2.w"], g[f"{b}.ln2.b"] = ops.layernorm_backward(dh, caches[f"{b}.ln2"])
            dx = dx + dh
        # inverts x = x + attn(ln1(x))
        dh, ga = ops.attention_backward(dx, caches[f"{b}.attn"], attn_params(params, b))
        for n, gv in ga.items():
            g[f"{b}.attn.{n}"] = gv
        if cfg.layernorm:
            dh, g[f"{b}.ln1.w"], g[f"{b}.ln1.b"] = ops.layernorm_backward(dh, caches[f"{b}.ln1"])
        dx = dx + dh
    # inverts X = tok + W_pos[:T]
    dx, g[f"{tower}.W_pos"] = ops.pos_embedding_backward(dx, caches["pos"])
    if tower == "vision":                                              # inverts CLS prepend
        dx, g["vision.class_embedding"] = ops.prepend_cls_backward(dx, None)
    if s != 1.0:                                                       # inverts tok = W_E[ids] * s
        dx = dx * s
    g[f"{tower}.W_E"] = ops.embedding_backward(dx, caches["embed"])
    return g


# --------------------------------------------------------------------------------------------
# public API

def check_inputs(images, tokens, eot, cfg: ModelConfig) -> None:
    """ValueError naming the array when images [B, L], tokens [B, Tt] or eot [B] do not fit the
    model (None skips one)."""
    if images is not None:
        ops.check_array("images", images, ndim=2)
        if images.shape[1] + 1 != cfg.vision_ctx:
            raise ValueError(f"images have length {images.shape[1]}: the model expects "
                             f"{cfg.vision_ctx - 1} pixels (vision_ctx = 1 + image_len)")
    if tokens is not None:
        ops.check_array("tokens", tokens, ndim=2)
        if tokens.shape[1] > cfg.text_ctx:
            raise ValueError(f"tokens have length {tokens.shape[1]}: at most {cfg.text_ctx} allowed")
        ops.check_array("eot", eot, shape=(tokens.shape[0],))
        ops.check_ids("eot", eot, tokens.shape[1])
    if images is not None and tokens is not None and images.shape[0] != tokens.shape[0]:
        raise ValueError(f"images ({images.shape[0]}) and tokens ({tokens.shape[0]}) differ in batch size")


def encode_images(params, images, cfg: ModelConfig, hooks=None, record=None, core=None):
    # images [B, L] int pixel values -> features [B, E], L2-normalised
    check_inputs(images, None, None, cfg)
    cls_idx = np.zeros(images.shape[0], dtype=np.int64)
    return tower_forward(params, "vision", images, cls_idx, cfg, hooks, record, core)[0]


def encode_texts(params, tokens, eot, cfg: ModelConfig, hooks=None, record=None, core=None):
    # tokens [B, Tt] int, eot [B] int -> features [B, E], L2-normalised
    check_inputs(None, tokens, eot, cfg)
    return tower_forward(params, "text", tokens, eot, cfg, hooks, record, core)[0]


def run_with_cache(params, images, tokens, eot, cfg: ModelConfig, hooks=None):
    """Forward both towers recording every hook value: -> (img [B, E], txt [B, E], record)."""
    record: dict[str, np.ndarray] = {}
    img = encode_images(params, images, cfg, hooks, record)
    txt = encode_texts(params, tokens, eot, cfg, hooks, record)
    return img, txt, record


def loss_and_grads(params, images, tokens, eot, cfg: ModelConfig, core=None):
    # images [B, L], tokens [B, Tt], eot [B] -> (loss float, grads {name: array like params})
    """The symmetric CLIP loss of a batch whose i-th image matches its i-th caption, and the
    gradient of that loss for every parameter (hand-written backward, no autograd). This is the
    reference training step; minispatial/fast/ computes the same sums with less work."""
    check_params({n: np.asarray(p) for n, p in params.items()}, cfg)  # (0-d scalars are fine)
    check_inputs(images, tokens, eot, cfg)

    def forward(params, tower, ids, pool_idx, cfg):
        return tower_forward(params, tower, ids, pool_idx, cfg, core=core)

    return two_tower_loss_and_grads(params, images, tokens, eot, cfg, forward, tower_backward)


def two_tower_loss_and_grads(params, images, tokens, eot, cfg: ModelConfig, forward, backward,
                             clip_loss=None):
    # images [B, L], tokens [B, Tt], eot [B] -> (loss, grads); `forward`/`backward` run one tower
    # (tower_forward/tower_backward here, or fast/'s versions: the same sums in another order);
    # `clip_loss(img, txt, logit_scale) -> (loss, dimg, dtxt, dtau)` defaults to ops.clip_loss_*
    cls_idx = np.zeros(images.shape[0], dtype=np.int64)
    img, cache_v = forward(params, "vision", images, cls_idx, cfg)     # [B, E]
    txt, cache_t = forward(params, "text", tokens, eot, cfg)           # [B, E]
    if clip_loss is None:
        loss, cache_l = ops.clip_loss_forward(img, txt, params["logit_scale"])
        dimg, dtxt, dtau = ops.clip_loss_backward(1.0, cache_l)
    else:
        loss, dimg, dtxt, dtau = clip_loss(img, txt, params["logit_scale"])
    grads = {"logit_scale": dtau}
    grads.update(backward(dimg, cache_v, params, cfg))
    grads.update(backward(dtxt, cache_t, params, cfg))
    return float(loss), {n: grads[n] for n in params}


def loss_only(params, images, tokens, eot, cfg: ModelConfig) -> float:
    """The CLIP loss without gradients (evaluation, finite differences)."""
    img = encode_images(params, images, cfg)
    txt = encode_texts(params, tokens, eot, cfg)
    return float(ops.clip_loss_forward(img, txt, params["logit_scale"])[0])

