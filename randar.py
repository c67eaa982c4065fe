"""RandAR, the network: a decoder-only transformer over VQ tokens that can be told, token by token,
where to go.

Pang et al., "RandAR: Decoder-only Autoregressive Visual Generation in Random Orders", CVPR 2025.
A LLaMA-style GPT (as in LlamaGen) with one extra input: before each image token the model sees
a *position instruction* token PI(p), a learned vector rotated by the 2D RoPE of the position p it
must predict next (docs/algorithm.md §3). Trained on random orders, the same weights decode in any
order. This file is the network: the training forward, the KV cache, and the cached forward
(prefill and one decode step) that generate.py's decoding loop drives. The argument checks sit at
the end.

Sequence layout for an image of N tokens generated in order pi (one slot per column):

    slot:   0       1         2            3         4                2N-1          2N
    token:  CLS(y)  PI(pi_0)  E(t[pi_0])   PI(pi_1)  E(t[pi_1])  ...  PI(pi_{N-1})  E(t[pi_{N-1}])
    rope:   zero    pi_0      pi_0         pi_1      pi_1        ...  pi_{N-1}      pi_{N-1}
    target:         t[pi_0]                t[pi_1]               ...  t[pi_{N-1}]

    model = RandAR(PRESETS["demo"])
    logits, loss = model(tokens, labels, order="random")   # training
"""
import math
from dataclasses import dataclass
from typing import Optional

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
    # label -> null class during training, so CFG has something to subtract
    class_dropout_prob: float = 0.1
    vocab_size: int = 16384          # VQ codebook size
    cls_token_num: int = 1           # one class token (the only value the layout supports)
    block_size: int = 256            # N, image tokens per image; must be a square grid

    def __post_init__(self):
        kv = self.n_kv_head or self.n_head
        # one ValueError naming the field, instead of a shape error deep in the network
        checks = [("n_layer", self.n_layer >= 1), ("n_head", self.n_head >= 1),
                  ("dim", self.dim >= 1 and self.dim % self.n_head == 0
                   and self.dim // self.n_head % 4 == 0),
                  ("n_kv_head", 1 <= kv <= self.n_head and self.n_head % kv == 0),
                  ("multiple_of", self.multiple_of >= 1), ("rope_base", self.rope_base > 0),
                  ("num_classes", self.num_classes >= 1), ("vocab_size", self.vocab_size >= 1),
                  ("cls_token_num", self.cls_token_num == 1),
                  ("block_size", self.block_size >= 1
                   and math.isqrt(self.block_size) ** 2 == self.block_size)]
        for name, ok in checks:
            if not ok:
                raise ValueError(f"RandARConfig.{name}={getattr(self, name)!r} is invalid "
                                 f"(n_head={self.n_head}: head dim dim/n_head a multiple of 4, "
                                 "n_kv_head dividing n_head, block_size a square, counts "
                                 "positive, cls_token_num 1)")

    @property
    def grid(self):
        return math.isqrt(self.block_size)


PRESETS = {
    # For tests: the reference fixtures' size.
    "tiny": RandARConfig(dim=64, n_layer=2, n_head=4, multiple_of=32, num_classes=10, vocab_size=32,
                         block_size=16),
    # Fashion-MNIST demo: 8x8 tokens from the small tokenizer, trains on 2 CPU cores in minutes. No
    # dropout: a short run is far from overfitting. RoPE base 10, not 10000: on an 8-wide grid base
    # 10000 leaves half of a head's frequencies nearly still across the image, and a PI token is
    # only its rotation; base 10 spreads them over 1 to 0.13 rad per position
    # (docs/experiments.md (f)).
    "demo": RandARConfig(dim=128, n_layer=4, n_head=4, multiple_of=64, num_classes=10,
                         vocab_size=512, block_size=64, rope_base=10.0, token_dropout_p=0.0,
                         resid_dropout_p=0.0, ffn_dropout_p=0.0),
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
    Resolution extrapolation (docs/algorithm.md §8, NTK-style): scale < 1 interpolates the
    coordinates of all but the `ntk_boundary` highest frequencies of each half, which keep the raw
    coordinate (fine detail keeps its speed)."""
    assert ntk_boundary >= 0, f"ntk_boundary must be >= 0, got {ntk_boundary}"
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


def apply_rope(x, rope):
    """x (B, T, H, hd), rope (B, T, hd/2, 2) -> x rotated pairwise, computed in float32."""
    xp = x.float().reshape(*x.shape[:-1], x.size(-1) // 2, 2)  # (B, T, H, hd/2, 2)
    cos = rope[:, :, None, :, 0]
    sin = rope[:, :, None, :, 1]
    a = xp[..., 0]
    b = xp[..., 1]
    out = torch.stack([a * cos - b * sin, b * cos + a * sin], dim=-1)
    return out.flatten(3).type_as(x)


# ----------------------------------------------------------------------------------------------
# The transformer

class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1,
                                                keepdim=True) + self.eps)).type_as(x) * self.weight


class KVCache(nn.Module):
    """Per-layer key/value slots (B, H, S, hd), written by row and slot index. Parallel decoding
    rewrites some slots (docs/algorithm.md §4), and index writes need no special case for it. The
    buffers are not persistent, so they never enter the state dict."""
    def __init__(self, batch, heads, slots, head_dim, dtype, device):
        super().__init__()
        shape = (batch, heads, slots, head_dim)
        # Zeros, not empty: masked slots still enter attention as 0 * value, and NaN garbage would
        # leak through.
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, slots, k, v, read):
        """Write k, v [B, H, T, hd] at slots [T] of the first B rows; return those rows' first
        `read` slots. Indexing the whole buffer (not a [:B] view) keeps a compiled step from copying
        it."""
        # (B, 1) with slots (T,): the result is (B, T, H, hd)
        rows = torch.arange(k.size(0), device=k.device)[:, None]
        self.k[rows, :, slots] = k.transpose(1, 2)
        self.v[rows, :, slots] = v.transpose(1, 2)
        return self.k[:k.size(0), :, :read], self.v[:k.size(0), :, :read]


class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.n_head = cfg.n_head
        self.n_kv_head = cfg.n_kv_head or cfg.n_head
        self.head_dim = cfg.dim // cfg.n_head
        self.wqkv = nn.Linear(cfg.dim,
                              (self.n_head + 2 * self.n_kv_head) * self.head_dim, bias=False)
        self.wo = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.attn_dropout_p = cfg.attn_dropout_p
        self.resid_dropout = nn.Dropout(cfg.resid_dropout_p)
        self.kv_cache = None  # a KVCache while decoding (RandAR.setup_caches)

    def forward(self, x, rope, slots=None, mask=None):
        B, T, C = x.shape
        hd = self.head_dim
        kv_size = self.n_kv_head * self.head_dim
        qk, v = self.wqkv(x).split([C + kv_size, kv_size], dim=-1)
        # q and k rotated in one call
        qk = apply_rope(qk.view(B, T, self.n_head + self.n_kv_head, hd), rope)
        # (B, H, T, hd), (B, Hkv, T, hd)
        q, k = qk.transpose(1, 2).split([self.n_head, self.n_kv_head], dim=1)
        v = v.view(B, T, self.n_kv_head, hd).transpose(1, 2)
        # decoding: write this feed's slots, attend over the slots the mask covers
        if slots is not None:
            k, v = self.kv_cache.update(slots, k, v, read=mask.size(-1))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=slots is None,
                                           dropout_p=self.attn_dropout_p if self.training else 0.0,
                                           # grouped-query attention
                                           enable_gqa=self.n_kv_head != self.n_head)
        return self.resid_dropout(self.wo(y.transpose(1, 2).reshape(B, T, C)))


class FeedForward(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        hidden = int(2 * 4 * cfg.dim / 3)
        if cfg.ffn_dim_multiplier is not None:
            hidden = int(cfg.ffn_dim_multiplier * hidden)
        hidden = cfg.multiple_of * math.ceil(hidden / cfg.multiple_of)
        self.w1 = nn.Linear(cfg.dim, hidden, bias=False)
        self.w3 = nn.Linear(cfg.dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, cfg.dim, bias=False)
        self.ffn_dropout = nn.Dropout(cfg.ffn_dropout_p)

    def forward(self, x):
        return self.ffn_dropout(self.w2(F.silu(self.w1(x)) * self.w3(x)))  # SwiGLU


class Block(nn.Module):
    def __init__(self, cfg, drop_path):
        super().__init__()
        self.attention = Attention(cfg)
        self.feed_forward = FeedForward(cfg)
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
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
        self.num_classes = cfg.num_classes
        self.dropout_prob = cfg.class_dropout_prob
        self.embedding_table = nn.Embedding(cfg.num_classes + 1, cfg.dim)  # last row: null class

    def forward(self, labels):
        if self.training and self.dropout_prob > 0:  # label dropout trains the null class for CFG
            drop = torch.rand(labels.shape, device=labels.device) < self.dropout_prob
            labels = torch.where(drop, self.num_classes, labels)
        return self.embedding_table(labels)


def make_order(order, B, N, device, generator=None):
    """'random' | 'raster' | a [B, N] permutation (checked by check_order) -> [B, N] on device
    (docs/algorithm.md §3)."""
    if isinstance(order, torch.Tensor):
        return order
    if order == "raster":
        return torch.arange(N, device=device).expand(B, N)
    # an independent permutation per sample, drawn on the device
    return torch.rand(B, N, device=device, generator=generator).argsort(dim=1)


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
        rope = rope_table_2d(cfg.grid, cfg.dim // cfg.n_head, cfg.rope_base)
        self.register_buffer("rope", rope, persistent=False)
        self.reset_parameters()

    def reset_parameters(self):
        """The reference init: N(0, 0.02^2) for linears and embeddings, zero output head."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):  # (RMSNorm weights start at one)
                nn.init.normal_(m.weight, std=self.config.initializer_range)
        nn.init.normal_(self.pos_instruct_embeddings, std=self.config.initializer_range)
        nn.init.zeros_(self.output.weight)

    # ---- the interleaved sequence (docs/algorithm.md §3) ----------------------------------------

    def position_instructions(self, positions, rope):
        """PI tokens for raster positions [B, T] -> [B, T, D]: the learned vector, RoPE-rotated."""
        B, T = positions.shape
        H = self.config.n_head
        pi = self.pos_instruct_embeddings.view(1, 1, H, -1).expand(B, T, H, self.config.dim // H)
        return apply_rope(pi, rope[positions + 1]).reshape(B, T, self.config.dim)

    def pairs(self, positions, tokens, rope, keep=None):
        """[PI(p_0), E(t_0), PI(p_1), E(t_1), ...] -> x [B, 2T, D] and its RoPE rows [B, 2T, hd/2,
        2]. keep [B, T]: multiplies the token embeddings (0 drops a context token for spatial
        CFG)."""
        B, T = positions.shape
        img = self.token_dropout(self.tok_embeddings(tokens))
        if keep is not None:
            img = img * keep[..., None].to(img.dtype)
        pi = self.position_instructions(positions, rope)
        x = torch.stack([pi, img], dim=2).reshape(B, 2 * T, img.size(-1))
        # both tokens of a pair sit at p_j
        return x, rope[positions.repeat_interleave(2, dim=1) + 1]

    def with_class_token(self, labels, x, x_rope):
        """CLS(y) in front of x [B, T, D]; the class token's zero RoPE row in front of x_rope."""
        cls_rope = self.rope[:1].expand(labels.size(0), 1, -1, -1)
        x = torch.cat([self.cls_embedding(labels)[:, None], x], 1)
        return x, torch.cat([cls_rope, x_rope], 1)

    def transformer(self, x, rope, slots=None, read=None):
        """Hidden states of all fed items. slots None: plain causal attention over x (training).
        slots [T]: decoding, each item writes its K/V at its cache slot and attends to every slot up
        to its own, reading only the first `read` slots (which cover every slot written so far)."""
        # (T, read)
        mask = None if slots is None else torch.arange(read, device=x.device) <= slots[:, None]
        for layer in self.layers:
            x = layer(x, rope, slots, mask)
        return x

    def head(self, h):
        return self.output(self.norm(h)).float()

    # ---- training (docs/algorithm.md §3) ---------------------------------------------------------

    def forward(self, tokens, labels, order=None):
        """Teacher-forced training forward. tokens [B, N] are in raster layout; labels [B] may hold
        the null class num_classes, which trains the unconditional model. Returns logits [B, N, V]
        in generation order (row k predicts t[order[k]]) and the mean cross-entropy over all N
        predictions, read at the PI slots 1, 3, ... The arguments are checked at the end of the
        file (check_forward)."""
        labels, order = check_forward(self.config, tokens, labels, order, self.rope.device)
        B, N = tokens.shape
        order = make_order(order, B, N, self.rope.device)
        targets = tokens.gather(1, order)  # [B, N] tokens in generation order
        x, rope = self.with_class_token(labels, *self.pairs(order, targets, self.rope))  # [B, 1+2N]
        logits = self.head(self.transformer(x, rope)[:, 1::2])  # read at the PI slots -> [B, N, V]
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1))
        return logits, loss

    # ---- the cached forward that generate.py drives (docs/algorithm.md §4) ----------------------

    def setup_caches(self, batch, slots, dtype, device):
        """K/V caches for at least `batch` rows and `slots` slots. They grow but never shrink until
        free_caches(), and smaller calls use the first rows and slots, so a compiled step sees the
        same buffers at every call."""
        old = self.layers[0].attention.kv_cache
        if old is not None and (old.k.dtype, old.k.device) == (dtype, device):
            if old.k.size(0) >= batch and old.k.size(2) >= slots:
                return
            batch = max(batch, old.k.size(0))
            slots = max(slots, old.k.size(2))
        for layer in self.layers:
            att = layer.attention
            att.kv_cache = KVCache(batch, att.n_kv_head, slots, att.head_dim, dtype, device)

    def free_caches(self):
        for layer in self.layers:
            layer.attention.kv_cache = None

    def prefill(self, rope, labels, order, known_tokens, n_queries, read, keep=None):
        """First feed: [CLS, PI(k_0), E(t_0), ..., PI(k_K-1), E(t_K-1), PI(u_0), ..., PI(u_m-1)] at
        slots 0... known_tokens [B, K] are the first K tokens of `order` (K may be 0); the last
        n_queries fed items are the PIs of the first unknown positions, whose logits [B, n_queries,
        V] it returns."""
        K = known_tokens.size(1)
        pairs, pair_rope = self.pairs(order[:, :K], known_tokens, rope, keep)
        queries = order[:, K:K + n_queries]
        queries_pi = self.position_instructions(queries, rope)
        x, x_rope = self.with_class_token(labels, torch.cat([pairs, queries_pi], 1),
                                          torch.cat([pair_rope, rope[queries + 1]], 1))
        slots = torch.arange(x.size(1), device=x.device)
        return self.head(self.transformer(x, x_rope, slots, read)[:, -n_queries:])

    def decode_step(self, rope, order, generated, feed):
        """One decode step, planned by generate.feed_plan. The feed names, for each of its L items,
        the generation index it shows (gen_index), whether it is that index's PI token or its
        sampled token (is_pi) and its cache slot (slots); queries are the items whose logits are
        read, and read is how many cache slots attention reads. generated [B, N] holds the tokens
        in generation order; only indices already sampled are read. Every shape comes from the
        schedule and nothing is read back to the host, so this is the function torch.compile
        sees. Returns logits [B, m, V] at the feed's queries."""
        positions = order[:, feed.gen_index]  # (B, L) raster position each fed item belongs to
        x = torch.where(feed.is_pi[:, None], self.position_instructions(positions, rope),
                        self.tok_embeddings(generated[:, feed.gen_index]))
        h = self.transformer(x, rope[positions + 1], feed.slots, feed.read)
        return self.head(h[:, feed.queries])

    # ---- bi-directional features (docs/algorithm.md §9) ------------------------------------------

    @torch.no_grad()
    def features(self, tokens, kind="bidirectional"):
        """Per-position features [B, N, D] of images given as tokens [B, N] (raster layout), after
        the last block and the final norm, under the null class, so the features are not told the
        answer. 'bidirectional' feeds the whole image [CLS, PI(0), E(t_0), ..., PI(N-1), E(t_N-1)],
        then PI(p) for every p again, and reads that second pass, which has seen every token.
        'causal' feeds one raster pass and reads it at E(t_p)."""
        B, N = tokens.shape
        assert kind in ("bidirectional", "causal"), f"unknown kind of features {kind!r}"
        assert N == self.config.block_size, f"tokens must be [B, {self.config.block_size}]"
        labels = torch.full((B,), self.config.num_classes, device=tokens.device)
        order = torch.arange(N, device=tokens.device).expand(B, N)
        x, rope = self.pairs(order, tokens, self.rope)
        if kind == "bidirectional":  # second pass: PI(0) ... PI(N-1)
            x = torch.cat([x, self.position_instructions(order, self.rope)], 1)
            rope = torch.cat([rope, self.rope[order + 1]], 1)
        h = self.norm(self.transformer(*self.with_class_token(labels, x, rope)))
        return h[:, 1 + 2 * N:] if kind == "bidirectional" else h[:, 2:1 + 2 * N:2]


# ----------------------------------------------------------------------------------------------
# Argument checks, one call per entry point: a bad value is one ValueError that names it, instead
# of a shape error deep inside the math.

def check_forward(cfg, tokens, labels, order, device):
    """The training forward's tokens [B, N], labels (the null class allowed) and order (None:
    random) -> labels and order as tensors."""
    labels = check_labels(labels, cfg.num_classes, device, allow_null=True)
    B = labels.size(0)
    N = cfg.block_size
    if tokens.shape != (B, N):
        raise ValueError(f"tokens must have shape [B={B}, N={N}], got {tuple(tokens.shape)}")
    return labels, check_order("random" if order is None else order, B, N, device)


def as_index_tensor(value, name, device):
    """Integer tensor on device; floats and booleans are refused instead of truncated."""
    t = torch.as_tensor(value, device=device)
    if t.numel() == 0:  # an empty list is a valid index list (torch reads [] as float)
        return t.long()
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise ValueError(f"{name} must be an integer tensor, got dtype {t.dtype}")
    return t.long()


def check_order(order, B, N, device):
    """'random', 'raster', or an index tensor [B, N] holding a permutation of 0..N-1 per row."""
    if isinstance(order, str):
        if order in ("random", "raster"):
            return order
        raise ValueError(f"order must be 'random', 'raster' or a [B, N] permutation, got {order!r}")
    order = as_index_tensor(order, "order", device)
    if order.shape != (B, N) or not torch.equal(order.sort(dim=1).values,
                                                torch.arange(N, device=device).expand(B, N)):
        raise ValueError(f"order must be a [B={B}, N={N}] tensor holding a permutation of "
                         f"0..{N - 1} per row, got shape {tuple(order.shape)}")
    return order


def check_labels(labels, num_classes, device, allow_null=False):
    """Class labels [B] as an index tensor on device, in [0, num_classes) (+ null if allow_null)."""
    labels = as_index_tensor(labels, "labels", device)
    top = num_classes + int(allow_null)
    if labels.dim() != 1:
        raise ValueError(f"labels must be a 1-D integer tensor, got shape {tuple(labels.shape)}")
    if labels.numel() and (labels.min() < 0 or labels.max() >= top):
        bad = labels[(labels < 0) | (labels >= top)]
        raise ValueError(f"labels must lie in [0, {top}), got {bad[:4].tolist()}")
    return labels
