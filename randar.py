"""RandAR: a decoder-only autoregressive image model that generates VQ tokens in any order.

Pang et al., "RandAR: Decoder-only Autoregressive Visual Generation in Random Orders", CVPR 2025.
The network is a LLaMA-style GPT (as in LlamaGen). What makes it RandAR is one extra input: before each
image token the model sees a *position instruction* token PI(p), a learned vector rotated by the 2D RoPE
of the position p it must predict next (docs/algorithm.md §3). Trained on random orders, the same weights
decode in raster or random order, several tokens per step with a KV cache (§4-5), or around known
tokens (zero-shot editing, §7).

Sequence layout for an image of N tokens generated in order pi (one slot per column):

    slot:   0       1         2            3         4                2N-1          2N
    token:  CLS(y)  PI(pi_0)  E(t[pi_0])   PI(pi_1)  E(t[pi_1])  ...  PI(pi_{N-1})  E(t[pi_{N-1}])
    rope:   zero    pi_0      pi_0         pi_1      pi_1        ...  pi_{N-1}      pi_{N-1}
    target:         t[pi_0]                t[pi_1]               ...  t[pi_{N-1}]

Usage:
    from randar import RandAR, PRESETS
    model = RandAR(PRESETS["demo"])
    logits, loss = model(tokens, labels, order="random")                  # training
    tokens = model.generate(labels, steps=16, cfg_scale=(1.0, 3.0))        # [B, N], raster layout
"""
import contextlib
import math
from dataclasses import dataclass, fields
from typing import NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class RandARConfig:
    dim: int = 1024                  # width D
    n_layer: int = 24
    n_head: int = 16
    n_kv_head: Optional[int] = None  # None = n_head (RandAR never uses grouped-query attention)
    multiple_of: int = 256           # FFN hidden width is rounded up to a multiple of this
    ffn_dim_multiplier: Optional[float] = None
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    initializer_range: float = 0.02
    token_dropout_p: float = 0.1     # dropout on image-token embeddings only
    attn_dropout_p: float = 0.0
    resid_dropout_p: float = 0.1     # after the attention output projection
    ffn_dropout_p: float = 0.1       # after the FFN output projection
    drop_path_rate: float = 0.0      # stochastic depth, linearly increasing over layers
    num_classes: int = 1000          # class index num_classes is the null class used for CFG
    class_dropout_prob: float = 0.1  # label -> null class during training, so CFG has something to subtract
    vocab_size: int = 16384          # VQ codebook size
    cls_token_num: int = 1           # one class token (the only value the layout supports)
    block_size: int = 256            # N, image tokens per image; must be a square grid

    # Keys the reference config carries that do not change what the network computes.
    REFERENCE_ONLY = ("caption_dim", "model_type", "max_batch_size", "max_seq_len", "position_order",
                      "num_inference_steps", "zero_class_qk", "grad_checkpointing")

    def __post_init__(self):
        kv = self.n_kv_head or self.n_head
        checks = [("n_layer", self.n_layer >= 1), ("n_head", self.n_head >= 1),
                  ("dim", self.dim >= 1 and self.dim % self.n_head == 0 and self.dim // self.n_head % 4 == 0),
                  ("n_kv_head", 1 <= kv <= self.n_head and self.n_head % kv == 0),
                  ("multiple_of", self.multiple_of >= 1), ("rope_base", self.rope_base > 0),
                  ("num_classes", self.num_classes >= 1), ("vocab_size", self.vocab_size >= 1),
                  ("cls_token_num", self.cls_token_num == 1),
                  ("block_size", self.block_size >= 1 and math.isqrt(self.block_size) ** 2 == self.block_size)]
        for name, ok in checks:
            if not ok:
                raise ValueError(f"RandARConfig.{name}={getattr(self, name)!r} is invalid (n_head={self.n_head}: head "
                                 f"dim dim/n_head a multiple of 4, n_kv_head dividing n_head, block_size a square, "
                                 f"counts positive, cls_token_num 1)")

    @classmethod
    def from_dict(cls, d):
        """Build from a checkpoint's config dict (ours or the reference's); unknown keys are an error."""
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names - set(cls.REFERENCE_ONLY)
        if unknown:
            raise ValueError(f"unknown RandARConfig keys: {sorted(unknown)}")
        return cls(**{k: v for k, v in d.items() if k in names})

    @property
    def grid(self):
        return math.isqrt(self.block_size)


PRESETS = {
    # For tests: the reference fixtures' size.
    "tiny": RandARConfig(dim=64, n_layer=2, n_head=4, multiple_of=32, num_classes=10, vocab_size=32, block_size=16),
    # Fashion-MNIST demo: 8x8 tokens from the small tokenizer, trains on 2 CPU cores in minutes. No dropout: a
    # short run is far from overfitting. RoPE base 10, not 10000: on an 8-wide grid base 10000 leaves half of
    # a head's frequencies nearly still across the image, and a PI token is only its rotation; base 10
    # spreads them over 1 to 0.13 rad per position (docs/experiments.md, RoPE base).
    "demo": RandARConfig(dim=128, n_layer=4, n_head=4, multiple_of=64, num_classes=10, vocab_size=512,
                         block_size=64, rope_base=10.0, token_dropout_p=0.0, resid_dropout_p=0.0, ffn_dropout_p=0.0),
    # The paper's ImageNet 256x256 models on LlamaGen's VQ-16 (16x16 tokens, 16384 codes).
    "L": RandARConfig(dim=1024, n_layer=24, n_head=16),
    "XL": RandARConfig(dim=1280, n_layer=36, n_head=20),
    "XXL": RandARConfig(dim=1536, n_layer=48, n_head=24),
}


# ----------------------------------------------------------------------------------------------
# 2D rotary position embedding (docs/algorithm.md §2). A head vector is read as hd/2 consecutive
# pairs; the first hd/4 pairs rotate with the row, the next hd/4 with the column.

def rope_table_2d(grid, head_dim, base=10000.0, scale=1.0, ntk_boundary=0):
    """(1 + grid^2, head_dim/2, 2) table of (cos, sin); row 0 is the class token and is all zeros.

    Resolution extrapolation (docs/algorithm.md §8, NTK-style): with scale < 1 the coordinates of all but
    the `ntk_boundary` highest frequencies (per half: rows, columns) are multiplied by `scale`
    (interpolated); the highest ones keep the raw coordinate (extrapolated), so fine detail keeps
    the rotation speed it was trained with while the coarse layout stays inside the trained range.
    """
    if ntk_boundary < 0:
        raise ValueError(f"ntk_boundary must be >= 0, got {ntk_boundary}")
    freqs = base ** (-torch.arange(0, head_dim // 4, dtype=torch.float32) * 4 / head_dim)
    coord_scale = torch.full_like(freqs, scale)
    coord_scale[:ntk_boundary] = 1.0  # f_0 is the highest frequency
    coord = torch.arange(grid, dtype=torch.float32)[:, None] * coord_scale  # (g, hd/4)
    angles_1d = coord * freqs
    rows = angles_1d[:, None, :].expand(grid, grid, -1)  # (g, g, hd/4)
    cols = angles_1d[None, :, :].expand(grid, grid, -1)
    angles = torch.cat([rows, cols], dim=-1).reshape(grid * grid, head_dim // 2)
    table = torch.stack([torch.cos(angles), torch.sin(angles)], dim=-1)
    # Zero (not identity) for the class token: its q and k vanish, so every query scores it at
    # exactly 0 while its value still flows. The published weights were trained this way.
    return torch.cat([torch.zeros(1, head_dim // 2, 2), table])


def default_ntk_boundary(head_dim, base):
    """How many of the highest RoPE frequencies keep raw coordinates when extrapolating (docs/algorithm.md §8).
    The reference's 2 was chosen for its RoPE (base 10000, 16 frequency pairs per axis): the released models
    get it. Any other RoPE gets 0, every frequency interpolated, so the known tokens sit at exactly their
    training angles; on the demo (base 10, 8 pairs) 1 and 2 smear the garments (docs/experiments.md, (c))."""
    return 2 if base == 10000 and head_dim >= 64 else 0


def apply_rope(x, rope):
    """x (B, T, H, hd), rope (B, T, hd/2, 2) -> x rotated pairwise, computed in float32."""
    xp = x.float().reshape(*x.shape[:-1], x.size(-1) // 2, 2)  # (B, T, H, hd/2, 2)
    cos, sin = rope[:, :, None, :, 0], rope[:, :, None, :, 1]
    a, b = xp[..., 0], xp[..., 1]
    out = torch.stack([a * cos - b * sin, b * cos + a * sin], dim=-1)
    return out.flatten(3).type_as(x)


# ----------------------------------------------------------------------------------------------
# Sampling helpers: pure functions on logits (..., V).

def filter_logits(logits, top_k=0, top_p=1.0):
    """Top-k (ties with the k-th kept) then top-p (nucleus); removed entries become -inf."""
    if top_k > 0:
        k = min(top_k, logits.size(-1))
        kth = torch.topk(logits, k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, sorted_idx = torch.sort(logits, dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        # drop a token when the tokens ranked before it already cover p; the top-1 always stays
        drop_sorted = torch.cat([torch.zeros_like(cum[..., :1], dtype=torch.bool), cum[..., :-1] > top_p], dim=-1)
        drop = torch.zeros_like(drop_sorted).scatter(-1, sorted_idx, drop_sorted)  # back to vocab order
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sampling_probs(logits, temperature=1.0, top_k=0, top_p=1.0):
    # The reference floors the temperature instead of rejecting 0; generate() validates it instead.
    return filter_logits(logits / max(temperature, 1e-5), top_k, top_p).softmax(-1)


def sample(logits, temperature=1.0, top_k=0, top_p=1.0, generator=None):
    """One token per row of logits (..., V), all rows in one multinomial call."""
    probs = sampling_probs(logits.float(), temperature, top_k, top_p)
    flat = torch.multinomial(probs.reshape(-1, probs.size(-1)), 1, generator=generator)
    return flat.reshape(probs.shape[:-1])


def guided_logits(logits, groups, scale, spatial_scale=0.0):
    """Classifier-free guidance on rows stacked [cond; uncond] (groups 2) or [cond; uncond; weak]
    (groups 3, spatial guidance against a copy with half of the context dropped), docs/algorithm.md §6, §8."""
    if groups == 1:
        return logits
    if groups == 2:
        cond, uncond = logits.chunk(2)
        return uncond + scale * (cond - uncond)
    cond, uncond, weak = logits.chunk(3)
    return weak + scale * (cond - uncond) + spatial_scale * (uncond - weak)


def decoding_schedule(n_tokens, steps):
    """Tokens decoded per step for parallel decoding: the reference's cosine rule (docs/algorithm.md §5).
    steps == -1 or steps >= n_tokens: one token per step. In double precision: float32 rounds
    cos(pi/3) differently and the (16, 6) schedule comes out wrong."""
    if steps == -1 or steps >= n_tokens:
        return [1] * n_tokens
    if steps < 1:
        raise ValueError(f"steps must be >= 1 (or -1), got {steps}")
    counts, done = [1], 1
    while done < n_tokens:
        i = len(counts)  # steps completed so far
        target = min(math.floor((1 - math.cos(math.pi / 2 * (i + 1) / steps)) * n_tokens + 1), n_tokens)
        counts.append(min(max(target - done, 1), n_tokens - done))
        done += counts[-1]
    return counts


READ_BUCKET = 64  # cache slots are read in multiples of this: a handful of lengths per image, not one per step


class Feed(NamedTuple):
    """What one decode step feeds (docs/algorithm.md §4), built on the host before the loop."""
    gen_index: torch.Tensor  # [L] the generation index each fed item shows
    is_pi: torch.Tensor      # [L] True: the PI token of that index; False: its sampled token's embedding
    slots: torch.Tensor      # [L] the cache slot each item is written to
    queries: torch.Tensor    # [m] the fed items whose logits are read (the next step's predictions)
    read: int                # attention reads cache slots [0, read): the filled prefix, rounded up to READ_BUCKET


def read_length(end, n_slots):
    return min(n_slots, -(-end // READ_BUCKET) * READ_BUCKET)


def feed_plan(schedule, known, n_slots, device=None):
    """One Feed per decode step after the prefill. A step that sampled n tokens at generation indices
    q..q+n-1, followed by a step of m queries, feeds [E(q), PI(q+1), E(q+1), ..., E(q+n-1), PI(q+n), ...,
    PI(q+n+m-1)] at slots 2q+2, 2q+3, ...: the 2nd..n-th queries, fed last step at temporary slots, are
    rewritten at their training slots, so the cache always ends in the training layout.

    Example: feed_plan([3, 2], known=4, n_slots=40) -> one Feed. Indices 4, 5, 6 were sampled, 7 and 8 are next:
        gen_index [4, 5, 5, 6, 6, 7, 8]       E(4) PI(5) E(5) PI(6) E(6) PI(7) PI(8)
        is_pi     [F, T, F, T, F, T, T]
        slots     [10, 11, 12, 13, 14, 15, 16] (index q sits at slots 2q+1 (PI) and 2q+2 (E))
        queries   [5, 6]                       (PI(7), PI(8)); read 40: slots 0..16 rounded up to 64, capped at n_slots
    L = 2n - 1 + m takes only a handful of values in a cosine schedule.
    """
    plan, q = [], known
    for n, m in zip(schedule[:-1], schedule[1:]):
        gen = [q] + [k for j in range(1, n) for k in (q + j, q + j)] + list(range(q + n, q + n + m))
        is_pi = [False] + [j % 2 == 0 for j in range(2 * n - 2)] + [True] * m
        slots = list(range(2 * q + 2, 2 * q + 2 + len(gen)))
        tensors = (torch.tensor(v, device=device) for v in (gen, is_pi, slots, range(len(gen) - m, len(gen))))
        plan.append(Feed(*tensors, read=read_length(slots[-1] + 1, n_slots)))
        q += n
    return plan


# ----------------------------------------------------------------------------------------------
# The transformer

class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class KVCache(nn.Module):
    """Per-layer key/value slots (B, H, S, hd), allocated once at full size and written by index (parallel
    decoding rewrites some slots: no special case). Non-persistent buffers, never in the state dict."""
    def __init__(self, batch, heads, slots, head_dim, dtype, device):
        super().__init__()
        shape = (batch, heads, slots, head_dim)
        # zeros, not empty: masked slots still enter attention as 0 * value, and NaN garbage would leak
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, slots, k, v, read):
        """Write k, v [B, H, T, hd] at slots [T] of the first B rows; return those rows' first `read` slots.
        The write indexes the whole buffer: written through a view, the compiled step would copy it."""
        B = k.size(0)
        rows = torch.arange(B, device=k.device)[:, None]  # (B, 1) with slots (T,): the result is (B, T, H, hd)
        self.k[rows, :, slots] = k.transpose(1, 2)
        self.v[rows, :, slots] = v.transpose(1, 2)
        return self.k[:B, :, :read], self.v[:B, :, :read]


def written_out_attention(q, k, v, mask):
    """softmax(q k^T / sqrt(hd) + mask) v for q [B, H, T, hd], k, v [B, Hkv, S, hd], mask [T, S]: what
    scaled_dot_product_attention computes. The compiled decode step uses it on the CPU: inductor fuses the
    mask and softmax around two matrix products, faster there than the flash kernel on a few query rows."""
    B, H, T, hd = q.shape
    q = q.view(B, k.size(1), H // k.size(1), T, hd)  # query heads grouped by the key head they share
    scores = (q @ k[:, :, None].transpose(-1, -2)) * hd ** -0.5
    y = scores.masked_fill(~mask, float("-inf")).softmax(-1) @ v[:, :, None]
    return y.view(B, H, T, hd)


class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head or cfg.n_head, cfg.dim // cfg.n_head
        self.wqkv = nn.Linear(cfg.dim, (self.n_head + 2 * self.n_kv_head) * self.head_dim, bias=False)
        self.wo = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.attn_dropout_p = cfg.attn_dropout_p
        self.resid_dropout = nn.Dropout(cfg.resid_dropout_p)
        self.kv_cache = None  # a KVCache while decoding (RandAR.setup_caches)

    def forward(self, x, rope, slots=None, mask=None):
        B, T, C = x.shape
        hd, kv_size = self.head_dim, self.n_kv_head * self.head_dim
        qk, v = self.wqkv(x).split([C + kv_size, kv_size], dim=-1)
        qk = apply_rope(qk.view(B, T, self.n_head + self.n_kv_head, hd), rope)  # q and k rotated in one call
        q, k = qk.transpose(1, 2).split([self.n_head, self.n_kv_head], dim=1)  # (B, H, T, hd), (B, Hkv, T, hd)
        v = v.view(B, T, self.n_kv_head, hd).transpose(1, 2)
        if slots is not None:  # decoding: write this feed's slots, attend over the slots the mask covers
            k, v = self.kv_cache.update(slots, k, v, read=mask.size(-1))
        dropout = self.attn_dropout_p if self.training else 0.0
        if slots is not None and x.device.type == "cpu" and torch.compiler.is_compiling():
            y = written_out_attention(q, k, v, mask)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=slots is None, dropout_p=dropout,
                                               enable_gqa=self.n_kv_head != self.n_head)  # grouped-query attention
        return self.resid_dropout(self.wo(y.transpose(1, 2).reshape(B, T, C)))


class FeedForward(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        hidden = int(2 * 4 * cfg.dim / 3)
        if cfg.ffn_dim_multiplier is not None:
            hidden = int(cfg.ffn_dim_multiplier * hidden)
        hidden = cfg.multiple_of * math.ceil(hidden / cfg.multiple_of)
        self.w1, self.w3 = nn.Linear(cfg.dim, hidden, bias=False), nn.Linear(cfg.dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, cfg.dim, bias=False)
        self.ffn_dropout = nn.Dropout(cfg.ffn_dropout_p)

    def forward(self, x):
        return self.ffn_dropout(self.w2(F.silu(self.w1(x)) * self.w3(x)))  # SwiGLU


class Block(nn.Module):
    def __init__(self, cfg, drop_path):
        super().__init__()
        self.attention, self.feed_forward = Attention(cfg), FeedForward(cfg)
        self.attention_norm, self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps), RMSNorm(cfg.dim, cfg.norm_eps)
        self.drop_path = drop_path

    def _drop_path(self, x):
        # Stochastic depth: drop the whole residual branch for some samples, rescale the rest.
        if not self.training or self.drop_path == 0.0:
            return x
        keep = x.new_empty(x.size(0), 1, 1).bernoulli_(1 - self.drop_path)
        return x * keep / (1 - self.drop_path)

    def forward(self, x, rope, slots=None, mask=None):
        h = x + self._drop_path(self.attention(self.attention_norm(x), rope, slots, mask))
        return h + self._drop_path(self.feed_forward(self.ffn_norm(h)))


class LabelEmbedder(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.num_classes, self.dropout_prob = cfg.num_classes, cfg.class_dropout_prob
        self.embedding_table = nn.Embedding(cfg.num_classes + 1, cfg.dim)  # last row: null class

    def forward(self, labels):
        if self.training and self.dropout_prob > 0:  # label dropout trains the null class for CFG
            drop = torch.rand(labels.shape, device=labels.device) < self.dropout_prob
            labels = torch.where(drop, self.num_classes, labels)
        return self.embedding_table(labels)


def as_index_tensor(value, name, device):
    """Integer tensor on device; floats and booleans are refused instead of truncated."""
    t = torch.as_tensor(value, device=device)
    if t.numel() == 0:  # an empty list is a valid index list (torch reads [] as float)
        return t.long()
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise ValueError(f"{name} must be an integer tensor, got dtype {t.dtype}")
    return t.long()


def check_sampling(steps, grid, temperature, top_k, top_p, cfg_scale, spatial_cfg_scale):
    for name, value in (("steps", steps), ("grid", grid)):
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if temperature <= 0 and top_k != 1:
        raise ValueError(f"temperature must be > 0 when sampling (top_k != 1), got {temperature}")
    if top_k < 0 or not 0 < top_p <= 1:
        raise ValueError(f"need top_k >= 0 and 0 < top_p <= 1, got top_k={top_k}, top_p={top_p}")
    for name, pair in (("cfg_scale", cfg_scale), ("spatial_cfg_scale", spatial_cfg_scale)):
        if pair is not None and (len(pair) != 2 or not all(isinstance(s, (int, float)) for s in pair)):
            raise ValueError(f"{name} must be a (start, end) pair of numbers, got {pair!r}")


class Guidance(NamedTuple):
    """The rows decoded together (docs/algorithm.md §6): G groups of B stacked along the batch."""
    labels: torch.Tensor            # [G*B] the class of each row (the null class in the unconditional groups)
    keep: Optional[torch.Tensor]    # [G*B, K] known-token embedding multipliers (spatial CFG), or None
    groups: int                     # 1: no guidance, 2: [cond; uncond], 3: [cond; uncond; weak context]
    cfg_scale: tuple                # (start, end)
    spatial_cfg_scale: Optional[tuple]

    def scales(self, filled):
        """(CFG scale, spatial scale), linear in the filled fraction of the canvas."""
        cfg = self.cfg_scale[0] + (self.cfg_scale[1] - self.cfg_scale[0]) * filled
        if self.groups < 3:
            return cfg, 0.0
        return cfg, self.spatial_cfg_scale[0] + (self.spatial_cfg_scale[1] - self.spatial_cfg_scale[0]) * filled


class RandAR(nn.Module):
    def __init__(self, cfg: RandARConfig):
        super().__init__()
        self.config = cfg
        self.pos_instruct_embeddings = nn.Parameter(torch.zeros(1, cfg.dim))
        self.cls_embedding = LabelEmbedder(cfg)
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.token_dropout = nn.Dropout(cfg.token_dropout_p)
        rates = torch.linspace(0, cfg.drop_path_rate, cfg.n_layer).tolist()
        self.layers = nn.ModuleList(Block(cfg, r) for r in rates)
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.register_buffer("rope", rope_table_2d(cfg.grid, cfg.dim // cfg.n_head, cfg.rope_base), persistent=False)
        self.compiled_step = None  # torch.compile(self.decode_step), made on the first generate(compile=True)
        self.compiled_weights = None  # (address, version) of each parameter when compiled_step last ran
        self.reset_parameters()

    def reset_parameters(self):
        """The reference init: N(0, 0.02^2) for linears and embeddings, zero output head."""
        std = self.config.initializer_range
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=std)  # RMSNorm weights start at one
        nn.init.normal_(self.pos_instruct_embeddings, std=std)
        nn.init.zeros_(self.output.weight)

    # ---- building the interleaved sequence --------------------------------------------------

    def position_instructions(self, positions, rope):
        """PI tokens for raster positions [B, T] -> [B, T, D]: the learned vector, per head, rotated by RoPE."""
        B, T = positions.shape
        H = self.config.n_head
        pi = self.pos_instruct_embeddings.view(1, 1, H, -1).expand(B, T, H, self.config.dim // H)
        return apply_rope(pi, rope[positions + 1]).reshape(B, T, self.config.dim)

    def pairs(self, positions, tokens, rope, keep=None):
        """[PI(p_0), E(t_0), PI(p_1), E(t_1), ...] -> x [B, 2T, D] and its RoPE rows [B, 2T, hd/2, 2].
        keep [B, T]: multiplies the token embeddings (0 drops a context token for spatial CFG)."""
        B, T = positions.shape
        img = self.token_dropout(self.tok_embeddings(tokens))
        if keep is not None:
            img = img * keep[..., None].to(img.dtype)
        x = torch.stack([self.position_instructions(positions, rope), img], dim=2).reshape(B, 2 * T, img.size(-1))
        return x, rope[positions.repeat_interleave(2, dim=1) + 1]  # both tokens of a pair sit at p_j

    def transformer(self, x, rope, slots=None, read=None, n_layers=None):
        """Hidden states of all fed items. slots None: plain causal attention over x (training).
        slots [T]: decoding, each item writes its K/V to the caches of setup_caches at its slot and
        attends to every cache slot up to its own; only the first `read` slots are read (all of them
        when None), which must cover every slot written so far."""
        mask = None
        if slots is not None:
            read = self.layers[0].attention.kv_cache.k.size(2) if read is None else read
            mask = torch.arange(read, device=x.device) <= slots[:, None]  # (T, read)
        for layer in self.layers[:n_layers]:
            x = layer(x, rope, slots, mask)
        return x

    def head(self, h):
        return self.output(self.norm(h)).float()

    # ---- training -----------------------------------------------------------------------------

    def make_order(self, order, B, N, generator=None):
        """'random' | 'raster' | a [B, N] permutation tensor -> [B, N] on the model's device."""
        dev = self.rope.device
        if isinstance(order, str):
            if order == "random":  # an independent permutation per sample, drawn on the device
                return torch.rand(B, N, device=dev, generator=generator).argsort(dim=1)
            if order == "raster":
                return torch.arange(N, device=dev).expand(B, N)
            raise ValueError(f"order must be 'random', 'raster' or a [B, N] permutation, got {order!r}")
        order = as_index_tensor(order, "order", dev)
        if order.shape != (B, N) or not torch.equal(order.sort(dim=1).values, torch.arange(N, device=dev).expand(B, N)):
            raise ValueError(f"order must be a [B={B}, N={N}] tensor holding a permutation of 0..{N - 1} "
                             f"per row, got shape {tuple(order.shape)}")
        return order

    def check_labels(self, labels, allow_null=False):
        labels = as_index_tensor(labels, "labels", self.rope.device)
        top = self.config.num_classes + int(allow_null)
        if labels.dim() != 1:
            raise ValueError(f"labels must be a 1-D integer tensor, got shape {tuple(labels.shape)}")
        if labels.numel() and (labels.min() < 0 or labels.max() >= top):
            bad = labels[(labels < 0) | (labels >= top)]
            raise ValueError(f"labels must lie in [0, {top}), got {bad[:4].tolist()}")
        return labels

    def forward(self, tokens, labels, order=None):
        """Teacher-forced training forward. tokens [B, N] in raster layout, labels [B] (the null class
        num_classes allowed: the unconditional model). Returns logits [B, N, V] in generation order (row k
        predicts t[order[k]]) and the mean cross-entropy over all N predictions, read at the PI slots 1, 3, ..."""
        labels = self.check_labels(labels, allow_null=True)
        B, N = labels.size(0), self.config.block_size
        if tokens.shape != (B, N):
            raise ValueError(f"tokens must have shape [B={B}, N={N}], got {tuple(tokens.shape)}")
        order = self.make_order("random" if order is None else order, B, N)
        targets = tokens.gather(1, order)  # [B, N] tokens in generation order
        pairs, pair_rope = self.pairs(order, targets, self.rope)
        x = torch.cat([self.cls_embedding(labels)[:, None], pairs], dim=1)  # [B, 1 + 2N, D]
        rope = torch.cat([self.rope[:1].expand(B, 1, -1, -1), pair_rope], dim=1)
        logits = self.head(self.transformer(x, rope)[:, 1::2])  # read at the PI slots -> [B, N, V]
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1))
        return logits, loss

    # ---- generation with a KV cache (docs/algorithm.md §4-7) -------------------------------------

    def setup_caches(self, batch, slots, dtype, device):
        """K/V caches for at least `batch` rows and `slots` slots, owned by the model until free_caches().
        Kept while they are big enough (a call uses their first rows and slots), so that a compiled step
        keeps seeing the same tensors: CUDA graphs read fixed memory, and frozen CPU graphs are guarded on
        the buffers themselves. Slots a call reads but has not written are masked."""
        old = self.layers[0].attention.kv_cache
        if old is not None and (old.k.dtype, old.k.device) == (dtype, device):
            if old.k.size(0) >= batch and old.k.size(2) >= slots:
                return
            batch, slots = max(batch, old.k.size(0)), max(slots, old.k.size(2))  # grow, never shrink
        hd = self.config.dim // self.config.n_head
        for layer in self.layers:
            att = layer.attention
            att.kv_cache = KVCache(batch, att.n_kv_head, slots, hd, dtype, device)

    def free_caches(self):
        for layer in self.layers:
            layer.attention.kv_cache = None

    def prefill(self, rope, labels, order, known_tokens, n_queries, keep=None):
        """First feed: [CLS, PI(k_0), E(t_0), ..., PI(k_K-1), E(t_K-1), PI(u_0), ..., PI(u_m-1)] at slots 0...
        known_tokens [B, K] are the first K tokens of `order` (K may be 0); the last n_queries fed
        items are the PIs of the first unknown positions. Returns their logits [B, n_queries, V]."""
        B, K = known_tokens.shape
        pairs, pair_rope = self.pairs(order[:, :K], known_tokens, rope, keep)
        queries = order[:, K:K + n_queries]
        x = torch.cat([self.cls_embedding(labels)[:, None], pairs, self.position_instructions(queries, rope)], 1)
        x_rope = torch.cat([rope[:1].expand(B, 1, -1, -1), pair_rope, rope[queries + 1]], 1)
        slots = torch.arange(x.size(1), device=x.device)
        read = read_length(x.size(1), self.layers[0].attention.kv_cache.k.size(2))
        return self.head(self.transformer(x, x_rope, slots, read)[:, -n_queries:])

    def decode_step(self, rope, order, generated, feed: Feed):
        """One decode step (a Feed of feed_plan); generated [B, N] holds the tokens in generation order
        (only indices already sampled are read). Shapes set by the schedule alone, no host
        synchronisation: this is the function torch.compile sees. Returns logits [B, m, V] at the query items."""
        positions = order[:, feed.gen_index]  # (B, L) raster position each fed item belongs to
        x = torch.where(feed.is_pi[:, None], self.position_instructions(positions, rope),
                        self.tok_embeddings(generated[:, feed.gen_index]))
        return self.head(self.transformer(x, rope[positions + 1], feed.slots, feed.read)[:, feed.queries])

    @torch.no_grad()
    def generate(self, labels, order="random", steps=None, cfg_scale=(1.0, 1.0), temperature=1.0, top_k=0,
                 top_p=1.0, known=None, generator=None, callback=None, grid=None, spatial_cfg_scale=None,
                 ntk_boundary=None, compile=False):
        """Sample [B, N] tokens (raster layout) for class labels [B].

        order: 'random' | 'raster' | [B, N] permutation. steps: decoding steps (None: one token per step;
        fewer: parallel decoding, cosine schedule). cfg_scale: (start, end) of the linear guidance schedule,
        applied iff end > 1 (as the reference). known: (positions [B, K], tokens [B, K]) fed teacher-forced
        first, returned unchanged (editing). grid: grid x grid tokens with the NTK-mixed RoPE (resolution
        extrapolation, docs/algorithm.md §8; ntk_boundary None: default_ntk_boundary); spatial_cfg_scale:
        (start, end) of guidance against a copy with half the known tokens dropped, used iff both ends > 1. compile: the decode step runs through
        torch.compile (CUDA graphs on GPU). callback(step, logits [B, n, V] after guidance, tokens [B, n]).
        """
        check_sampling(steps, grid, temperature, top_k, top_p, cfg_scale, spatial_cfg_scale)
        grid = self.config.grid if grid is None else grid
        N, labels = grid * grid, self.check_labels(labels)
        rope = self.rope
        if grid != self.config.grid:  # low frequencies interpolated by exactly g/G (docs/algorithm.md §8)
            head_dim = self.config.dim // self.config.n_head
            if ntk_boundary is None:
                ntk_boundary = default_ntk_boundary(head_dim, self.config.rope_base)
            rope = rope_table_2d(grid, head_dim, self.config.rope_base, scale=self.config.grid / grid,
                                 ntk_boundary=ntk_boundary).to(rope.device)
        positions, canvas, is_known = self._known_canvas(known, labels.size(0), N)
        order = self._generation_order(order, positions, is_known, N, generator)
        if positions.size(1) == N:
            return canvas
        schedule = decoding_schedule(N - positions.size(1), N if steps is None else steps)
        generated = canvas.gather(1, order)  # [B, N] in generation order; the first K are known
        guidance = self._guidance(labels, generated[:, :positions.size(1)], cfg_scale, spatial_cfg_scale, generator)
        out = self._decode(rope, order, generated, schedule, guidance, callback, compile,
                           dict(temperature=temperature, top_k=top_k, top_p=top_p, generator=generator))
        return torch.empty_like(out).scatter_(1, order, out)  # back to raster layout

    def _known_canvas(self, known, B, N):
        """known (positions [B, K], tokens [B, K]) -> positions, canvas [B, N] (raster), is_known [B, N]."""
        dev = self.rope.device
        canvas = torch.zeros(B, N, dtype=torch.long, device=dev)
        is_known = torch.zeros_like(canvas, dtype=torch.bool)
        if known is None:
            return canvas[:, :0], canvas, is_known
        positions, tokens = (as_index_tensor(t, f"known {w}", dev) for t, w in zip(known, ("positions", "tokens")))
        if positions.shape != tokens.shape or positions.dim() != 2 or positions.size(0) != B:
            raise ValueError(f"known must be (positions [B={B}, K], tokens [B, K]), got shapes "
                             f"{tuple(positions.shape)} and {tuple(tokens.shape)}")
        if positions.numel() and (positions.min() < 0 or positions.max() >= N
                                  or tokens.min() < 0 or tokens.max() >= self.config.vocab_size):
            raise ValueError(f"known positions must lie in [0, {N}) and tokens in [0, {self.config.vocab_size})")
        canvas.scatter_(1, positions, tokens)
        is_known.scatter_(1, positions, True)
        if (is_known.sum(1) != positions.size(1)).any():
            raise ValueError("known positions must not repeat within a row")
        return positions, canvas, is_known

    def _generation_order(self, order, positions, is_known, N, generator):
        """Known positions first, as given (docs/algorithm.md §7), then the unknown ones in the requested order."""
        B, K = positions.shape
        if not isinstance(order, str):
            order = self.make_order(order, B, N)
            if not is_known.gather(1, order[:, :K]).all():
                raise ValueError("an explicit order must list the known positions first")
            return order
        base = self.make_order(order, B, N, generator)
        unknown_first = base.gather(1, is_known.gather(1, base).long().argsort(dim=1, stable=True))
        return torch.cat([positions, unknown_first[:, :N - K]], dim=1)

    def _guidance(self, labels, prefix, cfg_scale, spatial_cfg_scale, generator):
        """Groups of rows stacked along the batch, decoded in one order with the same tokens: [cond], CFG
        [cond; uncond], or spatial CFG [cond; uncond; uncond with exactly floor(K/2) context token embeddings
        zeroed per sample, drawn by a permutation] (the reference)."""
        null = torch.full_like(labels, self.config.num_classes)
        if cfg_scale[-1] <= 1:
            return Guidance(labels, None, 1, cfg_scale, None)
        if spatial_cfg_scale is None or spatial_cfg_scale[-1] <= 1:
            return Guidance(torch.cat([labels, null]), None, 2, cfg_scale, None)
        B, K = prefix.shape
        dropped = torch.rand(B, K, device=prefix.device, generator=generator).argsort(dim=1)[:, :K // 2]
        weak = torch.ones(B, K, device=prefix.device).scatter_(1, dropped, 0.0)
        keep = torch.cat([torch.ones(2 * B, K, device=prefix.device), weak])
        return Guidance(torch.cat([labels, null, null]), keep, 3, cfg_scale, spatial_cfg_scale)

    def _step_function(self, compile, device_type):
        """(decode_step or its torch.compile'd version, the context to call it in). The compiled step is made
        once and reused by later calls (CUDA graphs on GPU) while the weights stay as they were."""
        if not compile:
            return self.decode_step, contextlib.nullcontext()
        if any(p.is_inference() for p in self.parameters()):
            raise ValueError("compile=True needs weights made outside torch.inference_mode(), whose in-place "
                             "changes can be tracked (make the model under torch.no_grad() instead)")
        weights = [(p.data_ptr(), p._version) for p in self.parameters()]  # _version counts in-place writes
        if self.compiled_step is not None and weights != self.compiled_weights:
            # The CPU graphs hold the weights they were compiled with as constants: drop decode_step's graphs
            # (every model's; the others recompile when next used), and nothing else that was compiled.
            torch._dynamo.reset_code(RandAR.decode_step.__code__)
        self.compiled_weights = weights
        if self.compiled_step is None:
            # Steps keep their exact shapes: dynamo compiles the first as is and, on the next new length or
            # read, one graph with symbolic sizes (automatic dynamic shapes); CUDA graphs are recorded per
            # (length, read) pair, a handful per schedule. Padding every step to the longest would feed up to
            # 1.7x more rows. On the CPU, freezing turns the weights into constants, stored in the layout the
            # matrix-product library reads fastest, and a C++ wrapper around the generated kernels cuts the
            # per-step overhead; on a GPU CUDA graphs do that job (docs/experiments.md, decoding speed).
            how = dict(mode="reduce-overhead") if device_type == "cuda" else dict(options={"cpp_wrapper": True})
            # Every model shares decode_step's code object, and dynamo's recompile limit (8) counts the graphs
            # of all of them: past it a second model (another size) would silently run eager.
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
            self.compiled_step = torch.compile(self.decode_step, **how)
        if device_type == "cuda":
            return self.compiled_step, contextlib.nullcontext()
        from torch._inductor import config  # freezing is read when dynamo compiles: inside the decoding loop
        return self.compiled_step, config.patch(freezing=True)

    def _decode(self, rope, order, generated, schedule, guidance, callback, compile, sampling):
        """The decoding loop (docs/algorithm.md §4): prefill, then sample / feed until every token is drawn."""
        B, N = generated.shape
        K, G = N - sum(schedule), guidance.groups
        dtype = torch.get_autocast_dtype(rope.device.type) if torch.is_autocast_enabled(rope.device.type) \
            else self.output.weight.dtype
        n_slots = (2 * N + 1 + 7) // 8 * 8  # 1 + 2N slots, rounded up to 8
        self.setup_caches(G * B, n_slots, dtype, rope.device)
        plan = feed_plan(schedule, K, n_slots, rope.device)
        step_fn, step_context = self._step_function(compile, rope.device.type)
        stacked_order, stacked_generated = order.repeat(G, 1), generated.repeat(G, 1)  # [G*B, N]
        logits = self.prefill(rope, guidance.labels, stacked_order, stacked_generated[:, :K], schedule[0],
                              guidance.keep)
        done = K
        with step_context:
            for step, n in enumerate(schedule):
                logits = guided_logits(logits, G, *guidance.scales(done / N))
                new = sample(logits, **sampling)  # [B, n], all queries in one call
                if callback is not None:
                    callback(step, logits, new)
                stacked_generated[:, done:done + n] = new.repeat(G, 1)
                if step + 1 == len(schedule):
                    break  # the last step's tokens are never fed
                logits = step_fn(rope, stacked_order, stacked_generated, plan[step])
                if compile:
                    logits = logits.clone()  # CUDA-graph outputs are overwritten by the next replay
                done += n
        return stacked_generated[:B]  # the groups hold the same tokens
