"""RandAR: a decoder-only autoregressive image model that generates VQ tokens in any order.

Pang et al., "RandAR: Decoder-only Autoregressive Visual Generation in Random Orders", CVPR 2025.
The network is a LLaMA-style GPT (as in LlamaGen). What makes it RandAR is one extra input: before
each image token the model sees a *position instruction* token PI(p), a learned vector rotated by
the 2D RoPE of the position p it must predict next (SPEC §3). Trained on random orders, the
same weights then decode in raster order, random order, several tokens per step with a KV cache
(SPEC §4-5), or around known tokens (zero-shot inpainting / outpainting, SPEC §6).

Sequence layout for an image of N tokens generated in order pi (one slot per column):

    slot:   0       1         2            3         4                2N-1          2N
    token:  CLS(y)  PI(pi_0)  E(t[pi_0])   PI(pi_1)  E(t[pi_1])  ...  PI(pi_{N-1})  E(t[pi_{N-1}])
    rope:   zero    pi_0      pi_0         pi_1      pi_1        ...  pi_{N-1}      pi_{N-1}
    target:         t[pi_0]                t[pi_1]               ...  t[pi_{N-1}]

Usage:
    from randar import RandAR, RandARConfig, PRESETS
    model = RandAR(PRESETS["demo"])
    logits, loss = model(tokens, labels, order="random")        # training
    images_tokens = model.generate(labels, steps=16, cfg=(1.0, 3.0))   # [B, N] raster layout
"""
import math
from dataclasses import dataclass, fields
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
    class_dropout_prob: float = 0.1  # label -> null class during training, so CFG has something to subtract
    vocab_size: int = 16384          # VQ codebook size
    cls_token_num: int = 1           # one class token (the only value the layout supports)
    block_size: int = 256            # N, image tokens per image; must be a square grid

    # Keys the reference config carries that do not change what the network computes.
    REFERENCE_ONLY = ("caption_dim", "model_type", "max_batch_size", "max_seq_len", "position_order",
                      "num_inference_steps", "zero_class_qk", "grad_checkpointing")

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
    # Fashion-MNIST demo: 8x8 tokens from the small tokenizer, trains on 2 CPU cores in minutes.
    "demo": RandARConfig(dim=128, n_layer=4, n_head=4, multiple_of=64, num_classes=10,
                         vocab_size=512, block_size=64),
    # The paper's ImageNet 256x256 models on LlamaGen's VQ-16 (16x16 tokens, 16384 codes), SPEC §8.
    "L": RandARConfig(dim=1024, n_layer=24, n_head=16),
    "XL": RandARConfig(dim=1280, n_layer=36, n_head=20),
    "XXL": RandARConfig(dim=1536, n_layer=48, n_head=24),
}


# ----------------------------------------------------------------------------------------------
# 2D rotary position embedding (SPEC §2-3). A head vector is read as hd/2 consecutive pairs; the
# first hd/4 pairs rotate with the row, the next hd/4 with the column.

def rope_table_2d(grid, head_dim, base=10000.0, scale=1.0, ntk_boundary=0):
    """(1 + grid^2, head_dim/2, 2) table of (cos, sin); row 0 is the class token and is all zeros.

    Resolution extrapolation (SPEC §7, NTK-style): with scale < 1 the coordinates of all but
    the `ntk_boundary` highest frequencies (per half: rows, columns) are multiplied by `scale`
    (interpolated); the highest ones keep the raw coordinate (extrapolated), so fine detail keeps
    the rotation speed it was trained with while the coarse layout stays inside the trained range.
    """
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
        drop_sorted = torch.zeros_like(cum, dtype=torch.bool)
        drop_sorted[..., 1:] = cum[..., :-1] > top_p
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


def decoding_schedule(n_tokens, steps):
    """Tokens decoded per step for parallel decoding: the reference's cosine rule (SPEC §4-5).

    steps == -1 or steps >= n_tokens means one token per step. Computed in double precision:
    float32 rounds cos(pi/3) differently and the (16, 6) schedule comes out wrong.
    """
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


class KVCache:
    """Per-layer key/value slots (B, H, S, hd), allocated on the first write, written by index.

    Parallel decoding writes several slots per step and later overwrites some of them (SPEC §4-5),
    which index writes handle with no special case. A plain object, so never in the state dict.
    """

    def __init__(self, max_slots):
        self.max_slots, self.k, self.v = max_slots, None, None

    def update(self, input_pos, k, v):
        if self.k is None:
            B, H, _, hd = k.shape
            self.k = k.new_zeros(B, H, self.max_slots, hd)
            self.v = v.new_zeros(B, H, self.max_slots, hd)
        self.k[:, :, input_pos] = k
        self.v[:, :, input_pos] = v
        end = int(input_pos[-1]) + 1  # slots past the newest one are masked anyway
        return self.k[:, :, :end], self.v[:, :, :end]


class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.n_head = cfg.n_head
        self.n_kv_head = cfg.n_kv_head or cfg.n_head
        self.head_dim = cfg.dim // cfg.n_head
        self.wqkv = nn.Linear(cfg.dim, (self.n_head + 2 * self.n_kv_head) * self.head_dim, bias=False)
        self.wo = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.attn_dropout_p = cfg.attn_dropout_p
        self.resid_dropout = nn.Dropout(cfg.resid_dropout_p)

    def forward(self, x, rope, cache=None, input_pos=None):
        B, T, C = x.shape
        hd, kv_size = self.head_dim, self.n_kv_head * self.head_dim
        q, k, v = self.wqkv(x).split([C, kv_size, kv_size], dim=-1)
        q = apply_rope(q.view(B, T, self.n_head, hd), rope).transpose(1, 2)  # (B, H, T, hd)
        k = apply_rope(k.view(B, T, self.n_kv_head, hd), rope).transpose(1, 2)
        v = v.view(B, T, self.n_kv_head, hd).transpose(1, 2)
        if cache is None:  # training: plain causal attention over the whole sequence
            mask, causal = None, True
        else:  # decoding: the token at slot s sees cache slots 0..s
            k, v = cache.update(input_pos, k, v)
            mask = torch.arange(k.size(2), device=x.device)[None, :] <= input_pos[:, None]
            causal = False
        if self.n_kv_head != self.n_head:
            k = k.repeat_interleave(self.n_head // self.n_kv_head, dim=1)
            v = v.repeat_interleave(self.n_head // self.n_kv_head, dim=1)
        dropout = self.attn_dropout_p if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, dropout_p=dropout)
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

    def forward(self, x, rope, cache=None, input_pos=None):
        h = x + self._drop_path(self.attention(self.attention_norm(x), rope, cache, input_pos))
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


class RandAR(nn.Module):
    def __init__(self, cfg: RandARConfig):
        super().__init__()
        if cfg.cls_token_num != 1 or cfg.grid ** 2 != cfg.block_size or cfg.dim % cfg.n_head:
            raise ValueError(f"unsupported config: cls_token_num={cfg.cls_token_num} (must be 1), "
                             f"block_size={cfg.block_size} (must be square), dim={cfg.dim} % n_head={cfg.n_head}")
        self.config = cfg
        self.pos_instruct_embeddings = nn.Parameter(torch.zeros(1, cfg.dim))
        self.cls_embedding = LabelEmbedder(cfg)
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.token_dropout = nn.Dropout(cfg.token_dropout_p)
        rates = torch.linspace(0, cfg.drop_path_rate, cfg.n_layer).tolist()
        self.layers = nn.ModuleList(Block(cfg, r) for r in rates)
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.register_buffer("rope", rope_table_2d(cfg.grid, cfg.dim // cfg.n_head, cfg.rope_base),
                             persistent=False)
        self.kv_caches = None  # set by generate(); left in place afterwards for inspection
        self.reset_parameters()

    def reset_parameters(self):
        """The reference init: N(0, 0.02^2) for linears and embeddings, zero output head."""
        std = self.config.initializer_range
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=std)
            elif isinstance(m, RMSNorm):
                nn.init.ones_(m.weight)
        nn.init.normal_(self.pos_instruct_embeddings, std=std)
        nn.init.zeros_(self.output.weight)

    # ---- building the interleaved sequence --------------------------------------------------

    def position_instructions(self, positions):
        """PI tokens for raster positions [B, T] -> [B, T, D]: the learned vector, per head, rotated by RoPE."""
        B, T = positions.shape
        H = self.config.n_head
        pi = self.pos_instruct_embeddings.view(1, 1, H, -1).expand(B, T, H, self.config.dim // H)
        return apply_rope(pi, self.rope[positions + 1]).reshape(B, T, self.config.dim)

    def pairs(self, positions, tokens):
        """[PI(p_0), E(t_0), PI(p_1), E(t_1), ...] -> x [B, 2T, D] and its RoPE entries [B, 2T, hd/2, 2]."""
        B, T = positions.shape
        img = self.token_dropout(self.tok_embeddings(tokens))
        x = torch.stack([self.position_instructions(positions), img], dim=2).reshape(B, 2 * T, self.config.dim)
        slot_pos = positions.repeat_interleave(2, dim=1)  # both tokens of a pair sit at p_j
        return x, self.rope[slot_pos + 1]

    def _transformer(self, x, rope, input_pos=None):
        """Hidden states of all fed slots; the output head is applied only where logits are read."""
        caches = self.kv_caches if input_pos is not None else [None] * len(self.layers)
        for layer, cache in zip(self.layers, caches):
            x = layer(x, rope, cache, input_pos)
        return x

    def head(self, h):
        return self.output(self.norm(h)).float()

    # ---- training -----------------------------------------------------------------------------

    def make_order(self, order, B, generator=None):
        """'random' | 'raster' | a [B, N] permutation tensor -> [B, N] on the model's device."""
        N, dev = self.rope.size(0) - 1, self.rope.device  # the grid being generated
        if isinstance(order, str):
            if order == "random":  # an independent permutation per sample (SPEC §2-3)
                return torch.rand(B, N, device=dev, generator=generator).argsort(dim=1)
            if order == "raster":
                return torch.arange(N, device=dev).expand(B, N)
            raise ValueError(f"order must be 'random', 'raster' or a [B, N] permutation, got {order!r}")
        order = torch.as_tensor(order, device=dev)
        if order.shape != (B, N) or not torch.equal(order.sort(dim=1).values.cpu(),
                                                    torch.arange(N).expand(B, N)):
            raise ValueError(f"order must be a [B={B}, N={N}] tensor holding a permutation of 0..{N - 1} "
                             f"per row, got shape {tuple(order.shape)}")
        return order.long()

    def check_labels(self, labels, allow_null=False):
        labels = torch.as_tensor(labels, device=self.rope.device)
        top = self.config.num_classes + int(allow_null)
        if labels.dim() != 1 or labels.dtype.is_floating_point:
            raise ValueError(f"labels must be a 1-D integer tensor, got shape {tuple(labels.shape)} {labels.dtype}")
        if labels.numel() and (labels.min() < 0 or labels.max() >= top):
            raise ValueError(f"labels must lie in [0, {top}), got {labels.tolist()}")
        return labels.long()

    def forward(self, tokens, labels, order=None):
        """Teacher-forced training forward. tokens [B, N] in raster layout, labels [B].

        Returns logits [B, N, V] in generation order (row k predicts t[order[k]]) and the mean
        cross-entropy over all N predictions, read at the PI slots 1, 3, 5, ...
        Label num_classes (the null class) is allowed here: it gives the unconditional model.
        """
        labels = self.check_labels(labels, allow_null=True)
        B, N = labels.size(0), self.config.block_size
        if tokens.shape != (B, N):
            raise ValueError(f"tokens must have shape [B={B}, N={N}], got {tuple(tokens.shape)}")
        order = self.make_order("random" if order is None else order, B)
        targets = tokens.gather(1, order)  # [B, N] tokens in generation order
        pairs, pair_rope = self.pairs(order, targets)
        x = torch.cat([self.cls_embedding(labels)[:, None], pairs], dim=1)  # [B, 1 + 2N, D]
        rope = torch.cat([self.rope[:1].expand(B, 1, -1, -1), pair_rope], dim=1)
        logits = self.head(self._transformer(x, rope)[:, 1::2])  # read at the PI slots -> [B, N, V]
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1))
        return logits, loss

    # ---- generation with a KV cache (SPEC §4-5) -------------------------------------------------

    def prefill(self, labels, order, known_tokens, n_queries):
        """First feed: [CLS, PI(k_0), E(t_0), ..., PI(k_K-1), E(t_K-1), PI(u_0), ..., PI(u_n-1)].

        known_tokens [B, K] are the first K tokens of `order` (K may be 0); the last n_queries fed
        tokens are the PIs of the first unknown positions. Returns their logits [B, n_queries, V].
        """
        B, K = known_tokens.shape
        pairs, pair_rope = self.pairs(order[:, :K], known_tokens)
        queries = order[:, K:K + n_queries]
        x = torch.cat([self.cls_embedding(labels)[:, None], pairs, self.position_instructions(queries)], 1)
        rope = torch.cat([self.rope[:1].expand(B, 1, -1, -1), pair_rope, self.rope[queries + 1]], 1)
        input_pos = torch.arange(x.size(1), device=x.device)
        return self.head(self._transformer(x, rope, input_pos)[:, -n_queries:])

    def decode_step(self, order, done, new_tokens, n_queries):
        """Feed the tokens just sampled and ask for the next n_queries positions.

        `done` tokens were decoded before the step that sampled new_tokens [B, n]. Feed (SPEC §4-5):
        [E(tok_done), PI(p_done+1), E(tok_done+1), ..., E(tok_done+n-1), PI(u_0), ..., PI(u_m-1)]
        at slots 2*done+2 onwards: the step's first query already sits at its training slot
        2*done+1, and the other queries, fed as temporary PIs last step, are overwritten here.
        """
        n = new_tokens.size(1)
        pairs, pair_rope = self.pairs(order[:, done:done + n], new_tokens)
        queries = order[:, done + n:done + n + n_queries]
        x = torch.cat([pairs[:, 1:], self.position_instructions(queries)], 1)  # [B, 2n-1+m, D]
        rope = torch.cat([pair_rope[:, 1:], self.rope[queries + 1]], 1)
        input_pos = torch.arange(2 * done + 2, 2 * done + 2 + x.size(1), device=x.device)
        return self.head(self._transformer(x, rope, input_pos)[:, -n_queries:])

    @torch.no_grad()
    def generate(self, labels, order="random", steps=None, cfg=(1.0, 1.0), temperature=1.0, top_k=0,
                 top_p=1.0, known=None, generator=None, callback=None, grid=None, spatial_cfg=None,
                 ntk_boundary=2):
        """Sample [B, N] tokens (raster layout) for class labels [B].

        order: 'random' | 'raster' | [B, N] permutation. steps: decoding steps (None or N: one token
        per step; fewer: parallel decoding with the cosine schedule). cfg: (start, end) scales of
        the linear CFG schedule. known: (positions [B, K], tokens [B, K]) fed teacher-forced first
        and returned unchanged (inpainting / outpainting, SPEC §6). callback(step, logits [B, n, V]
        after CFG, tokens [B, n]) is called after each step (used by the tests).
        grid: generate a grid x grid image (N = grid^2) with the NTK-mixed RoPE table when it differs
        from the training grid (resolution extrapolation, SPEC §7); spatial_cfg: (start, end) scales
        of the "spatial" guidance against a copy whose known tokens are half dropped (needs known);
        ntk_boundary: how many of the highest frequencies keep raw coordinates (the reference: 2).
        """
        if grid is None or grid == self.config.grid:
            return self._generate(labels, order, steps, cfg, temperature, top_k, top_p, known, generator,
                                  callback, spatial_cfg)
        if not isinstance(grid, int) or grid < 1:
            raise ValueError(f"grid must be a positive integer, got {grid!r}")
        # Interpolate low frequencies by exactly g/G: a token at (2r, 2c) of a 2x grid then gets the
        # angles (r, c) it had in training. (The reference compresses by (G/2-1)/(G-1), slightly off.)
        cfg_ = self.config
        train_rope = self.rope
        self.rope = rope_table_2d(grid, cfg_.dim // cfg_.n_head, cfg_.rope_base, scale=cfg_.grid / grid,
                                  ntk_boundary=ntk_boundary).to(train_rope.device)
        try:
            return self._generate(labels, order, steps, cfg, temperature, top_k, top_p, known, generator,
                                  callback, spatial_cfg)
        finally:
            self.rope = train_rope

    def _generate(self, labels, order, steps, cfg, temperature, top_k, top_p, known, generator, callback,
                  spatial_cfg):
        N = self.rope.size(0) - 1
        labels = self.check_labels(labels)
        B, dev = labels.size(0), labels.device
        steps = N if steps is None else steps
        if not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
        if temperature <= 0 and top_k != 1:
            raise ValueError(f"temperature must be > 0 when sampling (top_k != 1), got {temperature}")
        if top_k < 0 or not 0 < top_p <= 1:
            raise ValueError(f"need top_k >= 0 and 0 < top_p <= 1, got top_k={top_k}, top_p={top_p}")
        if spatial_cfg is not None and known is None:
            raise ValueError("spatial_cfg needs known tokens (the low-resolution context)")

        # Canvas of known tokens and the generation order: known positions first (SPEC §6).
        canvas = torch.zeros(B, N, dtype=torch.long, device=dev)
        is_known = torch.zeros(B, N, dtype=torch.bool, device=dev)
        positions = torch.zeros(B, 0, dtype=torch.long, device=dev)
        if known is not None:
            positions, tokens = (torch.as_tensor(t, device=dev).long() for t in known)
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
        K = positions.size(1)
        if isinstance(order, str):
            # known positions first as given, then the unknown ones in the requested order
            base = self.make_order(order, B, generator)
            unknown_first = base.gather(1, is_known.gather(1, base).long().argsort(dim=1, stable=True))
            order = torch.cat([positions, unknown_first[:, :N - K]], dim=1)
        else:
            order = self.make_order(order, B)
            if not is_known.gather(1, order[:, :K]).all():
                raise ValueError("an explicit order must list the known positions first")
        if K == N:
            return canvas
        generated = canvas.gather(1, order)  # [B, N] in generation order; first K are known

        # Guidance by batch stacking, all row groups in the same order with the same sampled tokens:
        # [cond] ; CFG: [cond; uncond] ; spatial CFG (SPEC §7): [cond; uncond; uncond, half the context dropped]
        null = torch.full_like(labels, self.config.num_classes)
        groups = 3 if spatial_cfg is not None else 2 if tuple(cfg) != (1.0, 1.0) else 1
        rows_labels = torch.cat([labels, null, null][:groups])
        prefix = generated[:, :K]
        rows_prefix = [prefix, prefix][:groups]
        if groups == 3:  # "zeroed": half of the context tokens replaced by token 0
            rows_prefix.append(prefix.masked_fill(torch.rand(prefix.shape, device=dev, generator=generator) < 0.5, 0))
        rows_prefix = torch.cat(rows_prefix)
        rows_order = order.repeat(groups, 1)

        def guide(logits, done):  # scales follow a linear schedule over the filled fraction of the canvas
            if groups == 1:
                return logits
            s = cfg[0] + (cfg[1] - cfg[0]) * done / N
            if groups == 2:
                cond, uncond = logits.chunk(2)
                return uncond + s * (cond - uncond)
            cond, uncond, weak = logits.chunk(3)
            s_sp = spatial_cfg[0] + (spatial_cfg[1] - spatial_cfg[0]) * done / N
            return weak + s * (cond - uncond) + s_sp * (uncond - weak)

        schedule = decoding_schedule(N - K, steps)
        self.kv_caches = [KVCache(1 + 2 * N) for _ in self.layers]  # one allocation per call
        logits = self.prefill(rows_labels, rows_order, rows_prefix, schedule[0])
        done = K
        for step, n in enumerate(schedule):
            logits = guide(logits, done)
            new = sample(logits, temperature, top_k, top_p, generator)  # [B, n], one call
            if callback is not None:
                callback(step, logits, new)
            generated[:, done:done + n] = new
            if step + 1 == len(schedule):
                break  # the last step's tokens are never fed
            logits = self.decode_step(rows_order, done, new.repeat(groups, 1), schedule[step + 1])
            done += n
        return torch.empty_like(generated).scatter_(1, order, generated)  # back to raster layout
