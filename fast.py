"""Fast decoding: generate() with its decode step compiled, and the benchmark that times it
(`python sample.py bench`). generate.py is the plain algorithm; this file is the one place that
knows about the compiler.

    tokens = generate_compiled(model, labels, steps=88, cfg_scale=(1.0, 4.0))

On a GPU the step runs as CUDA graphs. On the CPU inductor freezes the weights into the graph,
traces the attention written out so that it fuses (docs/experiments.md (g) measures this choice),
and calls the graph through a C++ wrapper.
"""
import contextlib
import itertools
import math
import statistics
import time
import weakref
from unittest import mock

import torch
import torch.nn.functional as F

from generate import generate
from randar import RandAR

# model -> (its compiled decode_step, its weights' (address, version) when compiled)
COMPILED = weakref.WeakKeyDictionary()


def generate_compiled(model, labels, **kwargs):
    """generate() with model.decode_step compiled; the same tokens as the eager call."""
    step = compiled_decode_step(model)
    on_cpu = model.rope.device.type == "cpu"
    with written_out_and_frozen() if on_cpu else contextlib.nullcontext():
        return generate(model, labels, decode_step=step, **kwargs)


def compiled_decode_step(model):
    """model.decode_step through torch.compile, compiled once per model. Steps keep their exact
    lengths, which take a handful of values per schedule (docs/algorithm.md §4)."""
    if any(p.is_inference() for p in model.parameters()):
        raise ValueError("compiled decoding needs weights made outside torch.inference_mode(), "
                         "whose in-place changes can be tracked (make the model under "
                         "torch.no_grad() instead)")
    # A tensor's _version counts its in-place writes, so loading new weights changes it.
    weights = [(p.data_ptr(), p._version) for p in model.parameters()]
    compiled, compiled_with = COMPILED.get(model, (None, weights))
    if weights != compiled_with:
        # Frozen graphs hold the old weights. Dynamo keys its graphs by code, so this drops the
        # graphs of every model's decode_step.
        torch._dynamo.reset_code(RandAR.decode_step.__code__)
    if compiled is None:
        # Every model shares decode_step's code; past dynamo's recompile limit (8 by default) it
        # would silently run eagerly.
        dynamo_config = torch._dynamo.config
        dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, 64)
        on_cpu = model.rope.device.type == "cpu"
        how = dict(options={"cpp_wrapper": True}) if on_cpu else dict(mode="reduce-overhead")
        compiled = torch.compile(model.decode_step, **how)
    COMPILED[model] = (compiled, weights)

    def step(*args):
        # A CUDA graph's output is overwritten by its next replay, so the loop gets a copy.
        return compiled(*args).clone()
    return step


def written_out_attention(q, k, v, attn_mask, is_causal=False, dropout_p=0.0, enable_gqa=False):
    """softmax(q k^T / sqrt(hd) + mask) v for a decode step (q [B, H, T, hd], k, v [B, Hkv, S, hd],
    attn_mask [T, S]). It computes what scaled_dot_product_attention computes there, written out so
    that inductor fuses it on the CPU. A decode step always passes a mask, so is_causal and
    dropout_p are never set; grouped heads are read off the shapes."""
    B, H, T, hd = q.shape
    # query heads grouped by the key head they share
    q = q.view(B, k.size(1), H // k.size(1), T, hd)
    scores = (q @ k[:, :, None].transpose(-1, -2)) * hd ** -0.5
    weights = scores.masked_fill(~attn_mask, float("-inf")).softmax(-1)
    return (weights @ v[:, :, None]).view(B, H, T, hd)


@contextlib.contextmanager
def written_out_and_frozen():
    """Around compiled decoding on the CPU: when dynamo compiles the step, inductor freezes the
    weights and traces the written-out attention in place of torch's kernel. The eager prefill
    inside the same call runs the written-out attention too, which computes the same thing."""
    from torch._inductor import config
    sdpa_written_out = mock.patch.object(F, "scaled_dot_product_attention", written_out_attention)
    with config.patch(freezing=True), sdpa_written_out:
        yield


# ----------------------------------------------------------------------------------------------
# The benchmark (`python sample.py bench`): what compiling and parallel decoding buy.

def benchmark(model, sizes=(64, 256), batches=(1, 32), cfg_scale=(1.0, 4.0), compile=False,
              repeats=3, context=None):
    """Markdown rows: ms and images / s of eager and compiled decoding, one token per step and the
    paper's 88-of-256 ratio, for each size N and batch; peak GPU memory. Each number is the median
    of interleaved rounds after a warm-up, so noise slows every row alike."""
    context = context or contextlib.nullcontext()
    device = model.rope.device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    rows = ["| N | batch | decoding | steps | ms / image | images / s |",
            "|---|---|---|---|---|---|"]
    for N, batch in itertools.product(sizes, batches):
        labels = torch.arange(batch, device=device) % model.config.num_classes
        decodings = [False, True] if compile else [False]
        kinds = list(itertools.product(decodings, (N, round(N * 88 / 256))))
        times = {kind: [] for kind in kinds}
        for _ in range(repeats + 1):
            for compiled, steps in kinds:
                decode = generate_compiled if compiled else generate
                sync()
                start = time.perf_counter()
                with context:
                    decode(model, labels, steps=steps, grid=math.isqrt(N), cfg_scale=cfg_scale)
                sync()
                times[compiled, steps].append(time.perf_counter() - start)
        for (compiled, steps), t in times.items():
            seconds = statistics.median(t[1:]) / batch  # the first round warmed up (and compiled)
            how = "compiled" if compiled else "eager"
            per_step = "1 token/step" if steps == N else "parallel"
            rows.append(f"| {N} | {batch} | {how}, {per_step} | {steps} | "
                        f"{1000 * seconds:.2f} | {1 / seconds:.1f} |")
    if device.type == "cuda":
        rows.append(f"peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
    return rows
