"""Decoding RandAR: `generate()` first, then what it calls, in the order it runs. randar.py is the
network; fast.py compiles the decode step and times it.

    # tokens [B, N], in the raster layout
    tokens = generate(model, labels, order="random", steps=22, cfg_scale=(1.0, 4.0))

One call covers every way to decode: raster or random order, one token per step or several
(parallel decoding with a KV cache), known tokens first (zero-shot editing), and a larger grid
(resolution extrapolation).
"""
import math
from typing import NamedTuple, Optional

import torch

from randar import as_index_tensor, check_labels, check_order, make_order, rope_table_2d


@torch.no_grad()
def generate(model, labels, order="random", steps=None, cfg_scale=(1.0, 1.0), temperature=1.0,
             top_k=0, top_p=1.0, known=None, generator=None, callback=None, grid=None,
             spatial_cfg_scale=None, ntk_boundary=None, decode_step=None):
    """Sample [B, N] tokens (raster layout) for class labels [B].

    order: 'random' | 'raster' | [B, N] permutation.
    steps: decoding steps. None decodes one token per step; fewer decode several per step, as many
        as the cosine schedule says (parallel decoding).
    cfg_scale: (start, end) of the linear guidance schedule, applied when end > 1, as the reference.
    known: (positions [B, K], tokens [B, K]), fed teacher-forced first and returned unchanged
        (editing).
    grid: decode grid x grid tokens with the NTK-mixed RoPE (resolution extrapolation);
        ntk_boundary None takes default_ntk_boundary.
    spatial_cfg_scale: (start, end) of guidance against a copy with half the known tokens dropped,
        used when both ends exceed 1.
    decode_step: the function that runs one decode step; None runs model.decode_step eagerly
        (fast.generate_compiled passes the compiled one).
    callback(step, logits [B, n, V] after guidance, tokens [B, n]) is called after each step.
    """
    grid = model.config.grid if grid is None else grid
    N = grid * grid
    # the arguments as tensors, bad ones refused in one line (check_generate: end of file)
    labels, order, known = check_generate(model, labels, order, known, N, steps, grid,
                                          ntk_boundary, temperature, top_k, top_p, cfg_scale,
                                          spatial_cfg_scale)
    positions, canvas, is_known = known_canvas(known, labels.size(0), N, model.rope.device)
    order = generation_order(order, positions, is_known, generator)
    K = positions.size(1)
    if K == N:
        return canvas
    schedule = decoding_schedule(N - K, N if steps is None else steps)  # tokens per step
    generated = canvas.gather(1, order)  # [B, N] in generation order; the first K are known
    guidance = guidance_rows(model, labels, K, cfg_scale, spatial_cfg_scale, generator)
    sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
    rope = rope_for_grid(model, grid, ntk_boundary)
    out = decode(model, rope, order, generated, schedule, guidance, sampling, callback,
                 decode_step or model.decode_step)
    return torch.empty_like(out).scatter_(1, order, out)  # back to raster layout


# ----------------------------------------------------------------------------------------------
# Where: the known tokens first, then the order asked for (docs/algorithm.md §7).

def known_canvas(known, B, N, device):
    """known (positions [B, K], tokens [B, K]) or None -> positions [B, K], the canvas [B, N] in
    raster layout with the known tokens in place, and is_known [B, N]."""
    canvas = torch.zeros(B, N, dtype=torch.long, device=device)
    is_known = torch.zeros_like(canvas, dtype=torch.bool)
    if known is None:
        return canvas[:, :0], canvas, is_known
    positions, tokens = known
    canvas.scatter_(1, positions, tokens)
    is_known.scatter_(1, positions, True)
    return positions, canvas, is_known


def generation_order(order, positions, is_known, generator):
    """Known positions first, as given, then the unknown ones in the requested order -> [B, N]. An
    explicit order is used as it is (check_generate made sure it lists the known positions first).
    """
    B, K = positions.shape
    N = is_known.size(1)
    if isinstance(order, torch.Tensor):
        return order
    base = make_order(order, B, N, is_known.device, generator)
    # a stable sort moves the unknown positions to the front and keeps their order
    unknown_first = base.gather(1, is_known.gather(1, base).long().argsort(dim=1, stable=True))
    return torch.cat([positions, unknown_first[:, :N - K]], dim=1)


# ----------------------------------------------------------------------------------------------
# How many per step: the reference's cosine schedule (docs/algorithm.md §5).

def decoding_schedule(n_tokens, steps):
    """Tokens decoded per step: after step i + 1 of `steps`, floor((1 - cos(pi/2 (i + 1) / steps))
    n_tokens + 1) are done, few at first and most late. steps == -1 or >= n_tokens gives one token
    per step. The arithmetic is in double precision, because float32 rounds cos(pi/3) differently
    and the (16, 6) schedule comes out wrong."""
    if steps == -1 or steps >= n_tokens:
        return [1] * n_tokens
    assert steps >= 1, f"steps must be >= 1 (or -1), got {steps}"
    counts = [1]
    done = 1
    while done < n_tokens:
        i = len(counts)  # steps completed so far
        # The angle is multiplied and divided left to right, as the reference does. Dividing
        # (i + 1) / steps first rounds differently and moves some counts (docs/algorithm.md §5).
        angle = math.pi / 2.0 * (i + 1) / steps
        target = min(math.floor((1 - math.cos(angle)) * n_tokens + 1), n_tokens)
        counts.append(min(max(target - done, 1), n_tokens - done))
        done += counts[-1]
    return counts


# ----------------------------------------------------------------------------------------------
# Guidance: row groups decoded together, their logits combined (docs/algorithm.md §6, §7).

class Guidance(NamedTuple):
    """G groups of B rows stacked along the batch, decoded in one order with the same tokens."""
    # [G*B] the class of each row (the null class in the unconditional groups)
    labels: torch.Tensor
    # [G*B, K] known-token embedding multipliers (spatial CFG), or None
    keep: Optional[torch.Tensor]
    # 1: no guidance, 2: [cond; uncond], 3: [cond; uncond; weak context]
    groups: int
    # (start, end) of the CFG scale, and of the spatial scale when groups == 3
    cfg_scale: tuple
    spatial_cfg_scale: Optional[tuple]

    def scales(self, filled):
        """(CFG scale, spatial scale), linear in the filled fraction of the canvas."""
        cfg = self.cfg_scale[0] + (self.cfg_scale[1] - self.cfg_scale[0]) * filled
        if self.groups < 3:
            return cfg, 0.0
        start, end = self.spatial_cfg_scale
        return cfg, start + (end - start) * filled


def guidance_rows(model, labels, K, cfg_scale, spatial_cfg_scale, generator):
    """The row groups. Without guidance, [cond] alone. With CFG, when the final scale exceeds 1,
    [cond; uncond]. With spatial CFG, [cond; uncond; uncond with floor(K/2) of the K known token
    embeddings zeroed per sample, chosen by a random permutation]."""
    null = torch.full_like(labels, model.config.num_classes)
    if cfg_scale[-1] <= 1:
        return Guidance(labels, None, 1, cfg_scale, None)
    if spatial_cfg_scale is None or spatial_cfg_scale[-1] <= 1:
        return Guidance(torch.cat([labels, null]), None, 2, cfg_scale, None)
    B = labels.size(0)
    device = labels.device
    dropped = torch.rand(B, K, device=device, generator=generator).argsort(dim=1)[:, :K // 2]
    weak = torch.ones(B, K, device=device).scatter_(1, dropped, 0.0)
    keep = torch.cat([torch.ones(2 * B, K, device=device), weak])
    return Guidance(torch.cat([labels, null, null]), keep, 3, cfg_scale, spatial_cfg_scale)


# ----------------------------------------------------------------------------------------------
# On a grid larger than training saw, the RoPE table is stretched (docs/algorithm.md §8).

def rope_for_grid(model, grid, ntk_boundary=None):
    """The model's RoPE table, or on a larger grid the NTK-mixed one, whose low frequencies are
    interpolated by g/G."""
    cfg = model.config
    if grid == cfg.grid:
        return model.rope
    head_dim = cfg.dim // cfg.n_head
    if ntk_boundary is None:
        ntk_boundary = default_ntk_boundary(head_dim, cfg.rope_base)
    table = rope_table_2d(grid, head_dim, cfg.rope_base, scale=cfg.grid / grid,
                          ntk_boundary=ntk_boundary)
    return table.to(model.rope.device)


def default_ntk_boundary(head_dim, base):
    """How many of the highest RoPE frequencies keep raw coordinates on a larger grid. It is the
    reference's 2 for the reference's RoPE (base 10000, 16 pairs per axis), as in the released
    models, and 0 for any other, because on the demo's base 10 a boundary of 1 or 2 smears the
    garments (docs/experiments.md (c))."""
    return 2 if base == 10000 and head_dim >= 64 else 0


# ----------------------------------------------------------------------------------------------
# The loop: prefill, then sample and feed until every token is drawn (docs/algorithm.md §4).

def decode(model, rope, order, generated, schedule, guidance, sampling, callback, decode_step):
    """generated [B, N] in generation order, its first K = N - sum(schedule) tokens known -> the
    same with every token drawn."""
    B, N = generated.shape
    G = guidance.groups
    K = N - sum(schedule)
    device = rope.device
    autocast = torch.is_autocast_enabled(device.type)
    dtype = torch.get_autocast_dtype(device.type) if autocast else model.output.weight.dtype
    n_slots = (2 * N + 1 + 7) // 8 * 8  # 1 + 2N slots, rounded up to 8
    model.setup_caches(G * B, n_slots, dtype, device)
    plan = feed_plan(schedule, K, n_slots, device)
    order = order.repeat(G, 1)
    generated = generated.repeat(G, 1)  # [G*B, N]: every group decodes the same tokens
    logits = model.prefill(rope, guidance.labels, order, generated[:, :K], schedule[0],
                           read_length(1 + 2 * K + schedule[0], n_slots), guidance.keep)
    done = K
    for step, n in enumerate(schedule):
        logits = guided_logits(logits, G, *guidance.scales(done / N))
        new = sample(logits, **sampling)  # [B, n], all of the step's queries in one call
        if callback is not None:
            callback(step, logits, new)
        generated[:, done:done + n] = new.repeat(G, 1)
        if step + 1 == len(schedule):
            break  # the last step's tokens are never fed
        logits = decode_step(rope, order, generated, plan[step])
        done += n
    return generated[:B]


# Cache slots are read in multiples of this, so a decode step takes a handful of lengths per image
# rather than one per step (docs/algorithm.md §4).
READ_BUCKET = 64


class Feed(NamedTuple):
    """What one decode step feeds, built on the host before the loop."""
    # [L] the generation index each fed item shows
    gen_index: torch.Tensor
    # [L] True: the PI token of that index; False: its sampled token's embedding
    is_pi: torch.Tensor
    # [L] the cache slot each item is written to
    slots: torch.Tensor
    # [m] the fed items whose logits are read (the next step's predictions)
    queries: torch.Tensor
    # attention reads cache slots [0, read): the filled prefix, rounded up to READ_BUCKET
    read: int


def read_length(end, n_slots):
    return min(n_slots, -(-end // READ_BUCKET) * READ_BUCKET)  # end rounded up to READ_BUCKET


def feed_plan(schedule, known, n_slots, device=None):
    """One Feed per decode step after the prefill. A step that sampled n tokens at generation
    indices q..q+n-1, followed by a step of m queries, feeds [E(q), PI(q+1), E(q+1), ..., E(q+n-1),
    PI(q+n), ..., PI(q+n+m-1)] at slots 2q+2, 2q+3, ... The 2nd..n-th queries, which the last step
    fed at temporary slots, are rewritten at their training slots, so the cache always ends in the
    training layout.

    Example: feed_plan([3, 2], known=4, n_slots=40) gives one Feed. Indices 4, 5, 6 were sampled;
    7 and 8 are next:
        gen_index [4, 5, 5, 6, 6, 7, 8]       E(4) PI(5) E(5) PI(6) E(6) PI(7) PI(8)
        is_pi     [F, T, F, T, F, T, T]
        slots     [10, 11, 12, 13, 14, 15, 16] (index q sits at slots 2q+1 (PI) and 2q+2 (E))
        queries   [5, 6]                       (PI(7), PI(8))
        read      40                           (slots 0..16 rounded up to 64, capped at n_slots)
    The length L = 2n - 1 + m takes only a handful of values in a cosine schedule.
    """
    plan = []
    q = known
    for n, m in zip(schedule[:-1], schedule[1:]):
        gen = [q] + [k for j in range(1, n) for k in (q + j, q + j)] + list(range(q + n, q + n + m))
        is_pi = [False] + [j % 2 == 0 for j in range(2 * n - 2)] + [True] * m
        slots = list(range(2 * q + 2, 2 * q + 2 + len(gen)))
        queries = range(len(gen) - m, len(gen))
        tensors = (torch.tensor(v, device=device) for v in (gen, is_pi, slots, queries))
        plan.append(Feed(*tensors, read=read_length(slots[-1] + 1, n_slots)))
        q += n
    return plan


def guided_logits(logits, groups, scale, spatial_scale=0.0):
    """Logits of the stacked groups -> the guided logits [B, ...] (docs/algorithm.md §6)."""
    if groups == 1:
        return logits
    if groups == 2:
        cond, uncond = logits.chunk(2)
        return uncond + scale * (cond - uncond)
    cond, uncond, weak = logits.chunk(3)
    return weak + scale * (cond - uncond) + spatial_scale * (uncond - weak)


# ----------------------------------------------------------------------------------------------
# Sampling: pure functions on logits (..., V).

def sample(logits, temperature=1.0, top_k=0, top_p=1.0, generator=None):
    """One token per row of logits (..., V), all rows in one multinomial call."""
    probs = sampling_probs(logits.float(), temperature, top_k, top_p)
    flat = torch.multinomial(probs.reshape(-1, probs.size(-1)), 1, generator=generator)
    return flat.reshape(probs.shape[:-1])


def sampling_probs(logits, temperature=1.0, top_k=0, top_p=1.0):
    # The reference floors the temperature at 1e-5; greedy decoding (top_k=1) reaches it here.
    return filter_logits(logits / max(temperature, 1e-5), top_k, top_p).softmax(-1)


def filter_logits(logits, top_k=0, top_p=1.0):
    """Top-k (ties with the k-th kept), then top-p (nucleus); removed entries become -inf."""
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, sorted_idx = torch.sort(logits, dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        # drop a token when the tokens ranked before it already cover p; the top-1 always stays
        drop_sorted = torch.cat([torch.zeros_like(cum[..., :1], dtype=torch.bool),
                                 cum[..., :-1] > top_p], dim=-1)
        # back to vocabulary order
        drop = torch.zeros_like(drop_sorted).scatter(-1, sorted_idx, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


# ----------------------------------------------------------------------------------------------
# Argument checks, one call at the entry point: a bad value is one ValueError that names it.

def check_generate(model, labels, order, known, N, steps, grid, ntk_boundary, temperature,
                   top_k, top_p, cfg_scale, spatial_cfg_scale):
    """generate()'s arguments -> labels, order and known as tensors on the model's device."""
    check_numbers(steps, grid, ntk_boundary, temperature, top_k, top_p, cfg_scale,
                  spatial_cfg_scale)
    device = model.rope.device
    labels = check_labels(labels, model.config.num_classes, device)
    B = labels.size(0)
    order = check_order(order, B, N, device)
    if known is None:
        return labels, order, None
    known = check_known(known, B, N, model.config.vocab_size, device)
    if isinstance(order, torch.Tensor):
        K = known[0].size(1)
        if not torch.equal(order[:, :K].sort(1).values, known[0].sort(1).values):
            raise ValueError("an explicit order must list the known positions first")
    return labels, order, known


def check_numbers(steps, grid, ntk_boundary, temperature, top_k, top_p, cfg_scale,
                  spatial_cfg_scale):
    for name, value in (("steps", steps), ("grid", grid)):
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if ntk_boundary is not None and ntk_boundary < 0:
        raise ValueError(f"ntk_boundary must be >= 0, got {ntk_boundary}")
    if temperature <= 0 and top_k != 1:
        raise ValueError(f"temperature must be > 0 when sampling (top_k != 1), got {temperature}")
    if top_k < 0 or not 0 < top_p <= 1:
        raise ValueError(f"need top_k >= 0 and 0 < top_p <= 1, got top_k={top_k}, top_p={top_p}")
    for name, pair in (("cfg_scale", cfg_scale), ("spatial_cfg_scale", spatial_cfg_scale)):
        if pair is not None and (len(pair) != 2
                                 or not all(isinstance(s, (int, float)) for s in pair)):
            raise ValueError(f"{name} must be a (start, end) pair of numbers, got {pair!r}")


def check_known(known, B, N, vocab_size, device):
    """(positions [B, K], tokens [B, K]) as index tensors, each position in [0, N) at most once
    per row and each token in the vocabulary."""
    positions, tokens = (as_index_tensor(t, f"known {what}", device)
                         for t, what in zip(known, ("positions", "tokens")))
    if positions.shape != tokens.shape or positions.dim() != 2 or positions.size(0) != B:
        raise ValueError(f"known must be (positions [B={B}, K], tokens [B, K]), got shapes "
                         f"{tuple(positions.shape)} and {tuple(tokens.shape)}")
    if positions.numel() and (positions.min() < 0 or positions.max() >= N
                              or tokens.min() < 0 or tokens.max() >= vocab_size):
        raise ValueError(f"known positions must lie in [0, {N}) and tokens in [0, {vocab_size})")
    if (positions.sort(1).values.diff(dim=1) == 0).any():
        raise ValueError("known positions must not repeat within a row")
    return positions, tokens
