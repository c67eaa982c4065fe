"""Decoding RandAR, in the order it runs: which positions, how many per step, what each step feeds,
guidance, sampling, the loop, compiling it, and its benchmark (`python sample.py bench`). randar.py
is the network.

    # tokens [B, N], in the raster layout
    tokens = generate(model, labels, order="random", steps=22, cfg_scale=(1.0, 4.0))

One call does it all: raster or random order, one token per step or several (parallel decoding
with a KV cache), known tokens first (zero-shot editing), a larger grid (resolution extrapolation).
"""
import contextlib
import itertools
import math
import statistics
import time
import weakref
from typing import NamedTuple, Optional
from unittest import mock

import torch
import torch.nn.functional as F

from randar import RandAR, as_index_tensor, check_labels, make_order, rope_table_2d

# ----------------------------------------------------------------------------------------------
# 1. Where: the known tokens first, then the order asked for (docs/algorithm.md §7), on a grid whose
# RoPE table may be a larger one than training saw (§8).

def known_canvas(model, known, B, N):
    """known (positions [B, K], tokens [B, K]) -> positions, canvas [B, N] (raster), is_known [B,
    N]."""
    dev = model.rope.device
    canvas = torch.zeros(B, N, dtype=torch.long, device=dev)
    is_known = torch.zeros_like(canvas, dtype=torch.bool)
    if known is None:
        return canvas[:, :0], canvas, is_known
    positions, tokens = (as_index_tensor(t, f"known {w}", dev)
                         for t, w in zip(known, ("positions", "tokens")))
    if positions.shape != tokens.shape or positions.dim() != 2 or positions.size(0) != B:
        raise ValueError(f"known must be (positions [B={B}, K], tokens [B, K]), got shapes "
                         f"{tuple(positions.shape)} and {tuple(tokens.shape)}")
    if positions.numel() and (positions.min() < 0 or positions.max() >= N
                              or tokens.min() < 0 or tokens.max() >= model.config.vocab_size):
        raise ValueError(f"known positions must lie in [0, {N}) and tokens in [0, "
                         f"{model.config.vocab_size})")
    canvas.scatter_(1, positions, tokens)
    is_known.scatter_(1, positions, True)
    if (is_known.sum(1) != positions.size(1)).any():
        raise ValueError("known positions must not repeat within a row")
    return positions, canvas, is_known


def generation_order(model, order, positions, is_known, generator):
    """Known positions first, as given, then the unknown ones in the requested order -> [B, N]."""
    B, K = positions.shape
    N = is_known.size(1)
    if not isinstance(order, str):
        order = make_order(order, B, N, model.rope.device)
        if not is_known.gather(1, order[:, :K]).all():
            raise ValueError("an explicit order must list the known positions first")
        return order
    base = make_order(order, B, N, model.rope.device, generator)
    unknown_first = base.gather(1, is_known.gather(1, base).long().argsort(dim=1, stable=True))
    return torch.cat([positions, unknown_first[:, :N - K]], dim=1)


def default_ntk_boundary(head_dim, base):
    """How many of the highest RoPE frequencies keep raw coordinates on a larger grid
    (docs/algorithm.md §8): the reference's 2 for its RoPE (base 10000, 16 pairs per axis), as the
    released models; 0 for any other (on the demo, base 10, 1 and 2 smear the garments:
    docs/experiments.md (c))."""
    return 2 if base == 10000 and head_dim >= 64 else 0


def rope_for_grid(model, grid, ntk_boundary=None):
    """The model's RoPE table, or on a larger grid the NTK-mixed one, low frequencies interpolated
    by g/G."""
    cfg = model.config
    if grid == cfg.grid:
        return model.rope
    head_dim = cfg.dim // cfg.n_head
    boundary = default_ntk_boundary(head_dim,
                                    cfg.rope_base) if ntk_boundary is None else ntk_boundary
    table = rope_table_2d(grid, head_dim, cfg.rope_base,
                          scale=cfg.grid / grid, ntk_boundary=boundary)
    return table.to(model.rope.device)


# ----------------------------------------------------------------------------------------------
# 2. How many per step: the reference's cosine schedule (docs/algorithm.md §5).

def decoding_schedule(n_tokens, steps):
    """Tokens decoded per step: after step i + 1 of `steps`, floor((1 - cos(pi/2 (i + 1) / steps))
    n_tokens + 1) are done (few first, most late). steps == -1 or >= n_tokens: one token per step.
    In double precision: float32 rounds cos(pi/3) differently and the (16, 6) schedule comes out
    wrong."""
    if steps == -1 or steps >= n_tokens:
        return [1] * n_tokens
    if steps < 1:
        raise ValueError(f"steps must be >= 1 (or -1), got {steps}")
    counts = [1]
    done = 1
    while done < n_tokens:
        i = len(counts)  # steps completed so far
        # the angle multiplied and divided left to right, as the reference: (i + 1) / steps first
        # rounds differently and moves some step counts (N = 52, 39 steps: 26.99999... instead of
        # 27.00000...1)
        angle = math.pi / 2.0 * (i + 1) / steps
        target = min(math.floor((1 - math.cos(angle)) * n_tokens + 1), n_tokens)
        counts.append(min(max(target - done, 1), n_tokens - done))
        done += counts[-1]
    return counts


# ----------------------------------------------------------------------------------------------
# 3. What each step feeds, planned before the loop (docs/algorithm.md §4).

# cache slots are read in multiples of this: a handful of lengths per image, not one per step
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
    PI(q+n), ..., PI(q+n+m-1)] at slots 2q+2, 2q+3, ...: the 2nd..n-th queries, fed last step at
    temporary slots, are rewritten at their training slots, so the cache always ends in the training
    layout.

    Example: feed_plan([3, 2], known=4, n_slots=40) -> one Feed. Indices 4, 5, 6 were sampled, 7 and
    8 are next:
        gen_index [4, 5, 5, 6, 6, 7, 8]       E(4) PI(5) E(5) PI(6) E(6) PI(7) PI(8)
        is_pi     [F, T, F, T, F, T, T]
        slots     [10, 11, 12, 13, 14, 15, 16] (index q sits at slots 2q+1 (PI) and 2q+2 (E))
        queries   [5, 6]                       (PI(7), PI(8))
        read      40                           (slots 0..16 rounded up to 64, capped at n_slots)
    L = 2n - 1 + m takes only a handful of values in a cosine schedule.
    """
    plan = []
    q = known
    for n, m in zip(schedule[:-1], schedule[1:]):
        gen = [q] + [k for j in range(1, n) for k in (q + j, q + j)] + list(range(q + n, q + n + m))
        is_pi = [False] + [j % 2 == 0 for j in range(2 * n - 2)] + [True] * m
        slots = list(range(2 * q + 2, 2 * q + 2 + len(gen)))
        tensors = (torch.tensor(v, device=device) for v in (gen, is_pi, slots,
                                                            range(len(gen) - m, len(gen))))
        plan.append(Feed(*tensors, read=read_length(slots[-1] + 1, n_slots)))
        q += n
    return plan


# ----------------------------------------------------------------------------------------------
# 4. Guidance: row groups decoded together, their logits combined (docs/algorithm.md §6, §8).

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


def guidance_rows(model, labels, prefix, cfg_scale, spatial_cfg_scale, generator):
    """[cond], CFG [cond; uncond] when the final scale exceeds 1, or spatial CFG [cond; uncond;
    uncond with exactly floor(K/2) of the K known token embeddings zeroed per sample, drawn by a
    permutation]."""
    null = torch.full_like(labels, model.config.num_classes)
    if cfg_scale[-1] <= 1:
        return Guidance(labels, None, 1, cfg_scale, None)
    if spatial_cfg_scale is None or spatial_cfg_scale[-1] <= 1:
        return Guidance(torch.cat([labels, null]), None, 2, cfg_scale, None)
    B, K = prefix.shape
    dropped = torch.rand(B, K, device=prefix.device, generator=generator).argsort(dim=1)[:, :K // 2]
    weak = torch.ones(B, K, device=prefix.device).scatter_(1, dropped, 0.0)
    keep = torch.cat([torch.ones(2 * B, K, device=prefix.device), weak])
    return Guidance(torch.cat([labels, null, null]), keep, 3, cfg_scale, spatial_cfg_scale)


def guided_logits(logits, groups, scale, spatial_scale=0.0):
    """Logits of the stacked groups -> the guided logits [B, ...]."""
    if groups == 1:
        return logits
    if groups == 2:
        cond, uncond = logits.chunk(2)
        return uncond + scale * (cond - uncond)
    cond, uncond, weak = logits.chunk(3)
    return weak + scale * (cond - uncond) + spatial_scale * (uncond - weak)


# ----------------------------------------------------------------------------------------------
# 5. Sampling: pure functions on logits (..., V).

def filter_logits(logits, top_k=0, top_p=1.0):
    """Top-k (ties with the k-th kept) then top-p (nucleus); removed entries become -inf."""
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, sorted_idx = torch.sort(logits, dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        # drop a token when the tokens ranked before it already cover p; the top-1 always stays
        drop_sorted = torch.cat([torch.zeros_like(cum[..., :1], dtype=torch.bool),
                                 cum[..., :-1] > top_p], dim=-1)
        # back to vocab order
        drop = torch.zeros_like(drop_sorted).scatter(-1, sorted_idx, drop_sorted)
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


# ----------------------------------------------------------------------------------------------
# 6. The loop.

def check_sampling(steps, grid, temperature, top_k, top_p, cfg_scale, spatial_cfg_scale):
    for name, value in (("steps", steps), ("grid", grid)):
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if temperature <= 0 and top_k != 1:
        raise ValueError(f"temperature must be > 0 when sampling (top_k != 1), got {temperature}")
    if top_k < 0 or not 0 < top_p <= 1:
        raise ValueError(f"need top_k >= 0 and 0 < top_p <= 1, got top_k={top_k}, top_p={top_p}")
    for name, pair in (("cfg_scale", cfg_scale), ("spatial_cfg_scale", spatial_cfg_scale)):
        if pair is not None and (len(pair) != 2
                                 or not all(isinstance(s, (int, float)) for s in pair)):
            raise ValueError(f"{name} must be a (start, end) pair of numbers, got {pair!r}")


@torch.no_grad()
def generate(model, labels, order="random", steps=None, cfg_scale=(1.0, 1.0), temperature=1.0,
             top_k=0, top_p=1.0, known=None, generator=None, callback=None, grid=None,
             spatial_cfg_scale=None, ntk_boundary=None, compile=False):
    """Sample [B, N] tokens (raster layout) for class labels [B].

    order: 'random' | 'raster' | [B, N] permutation. steps: decoding steps (None: one token per
    step; fewer: parallel decoding, tokens per step from the cosine schedule). cfg_scale: (start,
    end) of the linear guidance schedule, applied iff end > 1 (as the reference). known: (positions
    [B, K], tokens [B, K]) fed teacher-forced first, returned unchanged (editing). grid: grid x grid
    tokens with the NTK-mixed RoPE (resolution extrapolation; ntk_boundary None:
    default_ntk_boundary); spatial_cfg_scale: (start, end) of guidance against a copy with half the
    known tokens dropped, used iff both ends > 1. compile: the decode step runs through
    torch.compile. callback(step, logits [B, n, V] after guidance, tokens [B, n]).
    """
    check_sampling(steps, grid, temperature, top_k, top_p, cfg_scale, spatial_cfg_scale)
    grid = model.config.grid if grid is None else grid
    N = grid * grid
    labels = check_labels(labels, model.config.num_classes, model.rope.device)
    positions, canvas, is_known = known_canvas(model, known, labels.size(0), N)
    order = generation_order(model, order, positions, is_known, generator)
    if positions.size(1) == N:
        return canvas
    per_step = decoding_schedule(N - positions.size(1), N if steps is None else steps)
    generated = canvas.gather(1, order)  # [B, N] in generation order; the first K are known
    guidance = guidance_rows(model, labels, generated[:, :positions.size(1)], cfg_scale,
                             spatial_cfg_scale, generator)
    out = decode(model, rope_for_grid(model, grid, ntk_boundary), order, generated, per_step,
                 guidance, callback, compile,
                 dict(temperature=temperature, top_k=top_k, top_p=top_p, generator=generator))
    return torch.empty_like(out).scatter_(1, order, out)  # back to raster layout


def decode(model, rope, order, generated, schedule, guidance, callback, compile, sampling):
    """Prefill, then sample and feed until every token is drawn; generated [B, N] in generation
    order."""
    B, N = generated.shape
    G = guidance.groups
    K = N - sum(schedule)
    device = rope.device
    autocast = torch.is_autocast_enabled(device.type)
    dtype = torch.get_autocast_dtype(device.type) if autocast else model.output.weight.dtype
    n_slots = (2 * N + 1 + 7) // 8 * 8  # 1 + 2N slots, rounded up to 8
    model.setup_caches(G * B, n_slots, dtype, device)
    plan = feed_plan(schedule, K, n_slots, device)
    step_fn, step_context = compiled_decode_step(model) if compile else (model.decode_step,
                                                                         contextlib.nullcontext())
    order = order.repeat(G, 1)
    generated = generated.repeat(G, 1)  # [G*B, N]: every group decodes the same tokens
    logits = model.prefill(rope, guidance.labels, order, generated[:, :K], schedule[0],
                           read_length(1 + 2 * K + schedule[0], n_slots), guidance.keep)
    done = K
    with step_context:
        for step, n in enumerate(schedule):
            logits = guided_logits(logits, G, *guidance.scales(done / N))
            new = sample(logits, **sampling)  # [B, n], all queries in one call
            if callback is not None:
                callback(step, logits, new)
            generated[:, done:done + n] = new.repeat(G, 1)
            if step + 1 == len(schedule):
                break  # the last step's tokens are never fed
            logits = step_fn(rope, order, generated, plan[step])
            if compile:
                logits = logits.clone()  # CUDA-graph outputs are overwritten by the next replay
            done += n
    return generated[:B]


# ----------------------------------------------------------------------------------------------
# 7. Compiling the decode step: the one place that knows about the compiler
# (docs/experiments.md (g)).

# model -> (its compiled decode_step, its weights' (address, version))
COMPILED = weakref.WeakKeyDictionary()


def written_out_attention(q, k, v, attn_mask, is_causal=False, dropout_p=0.0, enable_gqa=False):
    """softmax(q k^T / sqrt(hd) + mask) v for a decode step (q [B, H, T, hd], k, v [B, Hkv, S, hd],
    attn_mask [T, S]): what scaled_dot_product_attention computes there, written so that inductor
    fuses it on the CPU."""
    B, H, T, hd = q.shape
    # query heads grouped by the key head they share
    q = q.view(B, k.size(1), H // k.size(1), T, hd)
    scores = (q @ k[:, :, None].transpose(-1, -2)) * hd ** -0.5
    weights = scores.masked_fill(~attn_mask, float("-inf")).softmax(-1)
    return (weights @ v[:, :, None]).view(B, H, T, hd)


def compiled_decode_step(model):
    """(model.decode_step through torch.compile, the context to call it in). GPU: CUDA graphs; CPU:
    weights frozen into the graphs, prepacked; the attention written out; a C++ wrapper. Steps keep
    their lengths."""
    if any(p.is_inference() for p in model.parameters()):
        raise ValueError("compile=True needs weights made outside torch.inference_mode(), whose "
                         "in-place changes can be tracked (make the model under "
                         "torch.no_grad() instead)")
    # _version counts in-place writes
    weights = [(p.data_ptr(), p._version) for p in model.parameters()]
    step, compiled_with = COMPILED.get(model, (None, weights))
    # frozen graphs hold the old weights: drop decode_step's graphs (every model's)
    if weights != compiled_with:
        torch._dynamo.reset_code(RandAR.decode_step.__code__)
    cpu = model.rope.device.type == "cpu"
    # every model shares decode_step's code: past dynamo's recompile limit (8) it would run eager
    if step is None:
        dynamo_config = torch._dynamo.config
        dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, 64)
        how = dict(options={"cpp_wrapper": True}) if cpu else dict(mode="reduce-overhead")
        step = torch.compile(model.decode_step, **how)
    COMPILED[model] = (step, weights)
    return step, written_out_and_frozen() if cpu else contextlib.nullcontext()


@contextlib.contextmanager
def written_out_and_frozen():
    """Around the compiled CPU step (read when dynamo compiles): inductor freezes the weights, and
    traces the written-out attention in place of torch's kernel (at batch 32 and 88 steps, 1.4x as
    fast as under the math SDPA backend: docs/experiments.md (g))."""
    from torch._inductor import config
    sdpa_written_out = mock.patch.object(F, "scaled_dot_product_attention", written_out_attention)
    with config.patch(freezing=True), sdpa_written_out:
        yield


# ----------------------------------------------------------------------------------------------
# 8. The benchmark (`python sample.py bench`): what compiling and parallel decoding buy.

def benchmark(model, sizes=(64, 256), batches=(1, 32), cfg_scale=(1.0, 4.0), compile=False,
              repeats=3, context=None):
    """Markdown rows: ms and images / s of eager / compiled decoding, one token per step / the
    paper's 88-of-256 ratio, per size N and batch; peak GPU memory. Medians of interleaved rounds
    after a warm-up: noise slows every row."""
    context = context or contextlib.nullcontext()
    device = model.rope.device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    rows = ["| N | batch | decoding | steps | ms / image | images / s |",
            "|---|---|---|---|---|---|"]
    for N, batch in itertools.product(sizes, batches):
        labels = torch.arange(batch, device=device) % model.config.num_classes
        kinds = list(itertools.product([False] + [True] * compile, (N, round(N * 88 / 256))))
        times = {kind: [] for kind in kinds}
        for _ in range(repeats + 1):
            for compiled, steps in kinds:
                sync()
                start = time.perf_counter()
                with context:
                    generate(model, labels, steps=steps, grid=math.isqrt(N),
                             cfg_scale=cfg_scale, compile=compiled)
                sync()
                times[compiled, steps].append(time.perf_counter() - start)
        for (compiled, steps), t in times.items():
            seconds = statistics.median(t[1:]) / batch  # the first round warmed up (and compiled)
            how = "compiled" if compiled else "eager"
            per_step = "1 token/step" if steps == N else "parallel"
            kind = f"{how}, {per_step}"
            rows.append(f"| {N} | {batch} | {kind} | {steps} | "
                        f"{1000 * seconds:.2f} | {1 / seconds:.1f} |")
    if device.type == "cuda":
        rows.append(f"peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
    return rows
