"""Tests of fast.py: the compiled decode step gives the eager tokens, and the benchmark runs."""
import itertools

import pytest
import torch

import fast
from conftest import TINY, random_gpt
from generate import generate
from randar import RandAR, RandARConfig


@pytest.mark.parametrize("heads, kv_heads, T, S", [(4, 4, 3, 40), (8, 2, 5, 17), (2, 1, 1, 9)])
def test_written_out_attention_equals_sdpa(heads, kv_heads, T, S):
    """The compiled CPU step's attention against torch's, with a decoding mask (each query row sees
    the slots up to its own) and grouped-query heads."""
    g = torch.Generator().manual_seed(heads + T)
    q, k, v = (torch.randn(2, h, n, 16, generator=g) for h, n in ((heads, T),
                                                                  (kv_heads, S), (kv_heads, S)))
    mask = torch.arange(S) <= torch.randint(0, S, (T,), generator=g)[:, None]
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                                            enable_gqa=heads != kv_heads)
    assert (fast.written_out_attention(q, k, v, attn_mask=mask) - want).abs().max() < 1e-5


@pytest.fixture(scope="module")
def model_compiled_once():
    """One tiny model whose decode step goes through torch.compile (inductor on CPU) once for the
    module; one layer, since compiling (C++ builds) dominates these tests' time and every layer
    runs the same code."""
    return random_gpt(seed=8, n_layer=1)


@pytest.mark.parametrize("kw", [dict(steps=3, cfg_scale=(1.0, 3.0)),
                                dict(steps=7, grid=8, known=True, spatial_cfg_scale=(1.0, 2.0))])
def test_compiled_decoding_gives_the_eager_tokens(model_compiled_once, kw):
    """The real compiled step (reused across cases: new lengths and cache sizes recompile) against
    eager: same generator, same tokens, logits within 1e-5 of the largest (N = 256 and one token per
    step: the next test)."""
    kw = {"labels": torch.tensor([3, 6]), **kw}
    if kw.get("known"):
        positions = torch.tensor([[0, 2, 8, 10], [5, 6, 9, 12]]) * (2 if kw.get("grid") else 1)
        kw["known"] = (positions,
                       torch.randint(0, 32, (2, 4), generator=torch.Generator().manual_seed(1)))
    runs = []
    for compiled in (False, True):
        seen = []
        decode = fast.generate_compiled if compiled else generate
        out = decode(model_compiled_once, **kw, generator=torch.Generator().manual_seed(3),
                     callback=lambda step, logits, new: seen.append(logits))
        runs.append((out, seen))
    (a, la), (b, lb) = runs
    assert torch.equal(a, b) and len(la) == len(lb)
    # relative: CFG 4 scales
    assert all((x - y).abs().max() <= 1e-5 * max(1.0, x.abs().max()) for x, y in zip(la, lb))


def test_compiled_decoding_needs_no_new_graphs_for_new_schedules():
    """At N = 256 (a 16x16 grid) with CFG, the paper's 88 steps and one token per step, at batch 2
    and 1: the compiled tokens equal the eager ones, from 2 to 8 graphs (some: a model whose graphs
    went past dynamo's recompile limit would run eager, unseen); after them any other schedule at
    those batches runs on the graphs it has (automatic dynamic shapes; cache reads come in
    READ_BUCKET steps; the caches are kept, not reallocated for the smaller batch). A width no other
    test compiles, so that no graph is reused."""
    from torch._dynamo.utils import counters
    model = random_gpt(seed=8, dim=32, n_layer=1)
    batches = (torch.tensor([3, 6]), torch.tensor([4]))
    def draw(labels, steps, compiled):
        decode = fast.generate_compiled if compiled else generate
        return decode(model, labels, steps=steps, grid=16, cfg_scale=(1.0, 4.0),
                      generator=torch.Generator().manual_seed(3))
    before = counters["stats"]["unique_graphs"]
    for steps, labels in itertools.product((88, None), batches):
        assert torch.equal(draw(labels, steps, True), draw(labels, steps, False))
    warm = counters["stats"]["unique_graphs"]
    assert 2 <= warm - before <= 8
    for steps, labels in itertools.product((40, 7), batches):
        draw(labels, steps, True)
    assert counters["stats"]["unique_graphs"] == warm


def test_compiled_decoding_follows_weights_loaded_after_compiling(model_compiled_once):
    """On the CPU the compiled step holds the weights as constants (freezing): weights loaded into
    the model afterwards must reach it (same generator: the eager tokens of the new weights). The
    shared model's last test (it keeps the new weights), on the first case's shapes: only the new
    weights compile."""
    model = model_compiled_once
    labels = torch.tensor([3, 6])
    def draw(compiled):
        decode = fast.generate_compiled if compiled else generate
        return decode(model, labels, steps=3, cfg_scale=(1.0, 3.0),
                      generator=torch.Generator().manual_seed(0))
    old_tokens = draw(True)
    model.load_state_dict(random_gpt(seed=10, n_layer=1).state_dict())
    new_tokens = draw(False)
    assert not torch.equal(new_tokens, old_tokens) and torch.equal(draw(True), new_tokens)


def test_compiling_refuses_weights_made_in_inference_mode():
    """Inference tensors keep no version counter: a change to them could not reach the frozen
    graphs."""
    with torch.inference_mode():
        model = RandAR(RandARConfig(**TINY)).eval()
    assert generate(model, torch.tensor([1]), steps=4).shape == (1, 16)  # eager needs no tracking
    with pytest.raises(ValueError, match="inference_mode"):
        fast.generate_compiled(model, torch.tensor([1]), steps=4)
