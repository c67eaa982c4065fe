"""Tests: ours == the reference's numbers, fast paths == slow paths, real commands end to end.

    python -m pytest -q test_randar.py

The reference's golden outputs live in fixtures/ (see docs/algorithm.md §11): a clone checks itself.
Sections follow the code: the model, decoding (the reference's numbers; fast paths against the slow
computation), tokenizer, train.py, sampling and the FID protocol, eval_fid.py, every script's
command line and the code base. Commands run in this process through each script's `cli`; child
processes only where the process boundary is the point (kills, torchrun, timeouts, locks) and once
per script.
"""
import argparse
import hashlib
import http.server
import importlib.util
import itertools
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import asdict

import numpy as np
import pytest
import torch
from PIL import Image

import common
import eval_fid
import generate as gen
import image_data
import inception
import randar
import release
import sample
import sampling
import token_cache
import tokenizer as tok
import train
from generate import decoding_schedule, feed_plan, filter_logits, generate, sampling_probs
from randar import RandAR, RandARConfig, apply_rope, rope_table_2d

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURES = os.path.join(HERE, "fixtures")
SCRIPTS = {"train.py": train, "sample.py": sample, "eval_fid.py": eval_fid}


def cli(script, *argv):
    """A script's command line, run in this process through its entry function `cli`: None when it
    succeeds, else its exit message, which must be one line without a traceback."""
    try:
        SCRIPTS[script].cli([str(a) for a in argv])
    except SystemExit as stop:
        message = str(stop.code)
        assert stop.code not in (0, None), message
        assert "\n" not in message, message
        assert "Traceback" not in message, message
        return message
    return None


def run(script, *argv, **kw):
    """`python script.py argv` in a child process: for what needs the process boundary (kills,
    torchrun) and one smoke run per script."""
    return subprocess.run([sys.executable, os.path.join(HERE, script), *map(str, argv)],
                          capture_output=True, text=True, **kw)


@pytest.fixture(scope="module")
def fx():
    return torch.load(os.path.join(FIXTURES, "reference_fixtures.pt"), weights_only=True)


def reference_gpt(fx):
    model = RandAR(RandARConfig.from_dict(fx["gpt"]["config"]))
    model.load_state_dict(fx["gpt"]["state_dict"], strict=True)
    return model.eval()


# 4x4 tokens
TINY = dict(dim=64, n_layer=2, n_head=4, multiple_of=32, vocab_size=32, block_size=16,
            num_classes=10)


def random_gpt(seed=0, **kw):
    """A tiny model with every weight re-drawn large: the reference init makes all logits 0,
    which would let any fast-path == slow-path comparison pass vacuously."""
    torch.manual_seed(seed)
    model = RandAR(RandARConfig(**{**TINY, **kw}))
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if name.endswith("norm.weight")
                    else 0.3 * torch.randn_like(p))
    return model.eval()


def caches(model):
    return [(layer.attention.kv_cache.k.clone(),
             layer.attention.kv_cache.v.clone()) for layer in model.layers]


# ---- model (randar.py): the reference's numbers, the training forward, the features --------------

def test_state_dict_matches_reference(fx):
    model = reference_gpt(fx)
    ours = [[k, list(v.shape),
             str(v.dtype).replace("torch.", "")] for k, v in model.state_dict().items()]
    assert ours == [list(x) for x in fx["gpt"]["state_dict_keys"]]


def test_training_forward_matches_reference(fx):
    model = reference_gpt(fx)
    case = fx["gpt"]["train_forward"]
    order = case["token_order"]
    logits, loss = model(case["idx"], case["labels"], order=order)
    assert (logits - case["token_logits"]).abs().max() < 1e-4
    assert abs(loss.item() - case["loss"].item()) < 1e-4
    # Row 0 of the fixture is in raster order: the named order gives the same logits.
    logits_raster, _ = model(case["idx"][:1], case["labels"][:1], order="raster")
    assert (logits_raster - case["token_logits"][:1]).abs().max() < 1e-4
    assert (model.rope - fx["rope"]["freqs_cis_2d"]["table"]).abs().max() < 1e-6


def test_official_safetensors_and_yaml_give_the_reference_logits():
    """The released format (safetensors + YAML), through the loader sample.py uses."""
    model, _ = randar.load_model(os.path.join(FIXTURES, "randar_tiny_official.safetensors"),
                                 config=os.path.join(FIXTURES, "randar_tiny_official.yaml"))
    expected = torch.load(os.path.join(FIXTURES,
                                       "randar_tiny_official_expected.pt"), weights_only=True)
    logits, _ = model(expected["tokens"], expected["labels"], order=expected["order"])
    assert (logits - expected["logits"]).abs().max() <= 1e-5


def test_rope_tables_match_reference_and_extrapolation_mix(fx):
    for key in ("freqs_cis_2d", "freqs_cis_2d_grid8"):
        ref = fx["rope"][key]
        assert (rope_table_2d(ref["grid_size"], ref["head_dim"],
                              ref["base"]) - ref["table"]).abs().max() < 1e-6
    ref = fx["rope"]["freqs_cis_2d_extrapolation"]  # grid 8 from grid 4, boundary 2
    ours = rope_table_2d(8, 16, scale=0.5, ntk_boundary=2)
    raw = rope_table_2d(8, 16)  # raw coordinates on the large grid
    # the two highest frequencies of the row half and of the column half (hd/4 = 4)
    high = [0, 1, 4, 5]
    low = [2, 3, 6, 7]
    assert (ours[:, high] - raw[:, high]).abs().max() < 1e-6
    # same as the reference where both extrapolate
    assert (ours[:, high] - ref["table"][:, high]).abs().max() < 1e-5
    coords = torch.arange(8) / 2  # interpolated: angle = (c / 2) * f
    f = 10000 ** (-torch.arange(4) * 4 / 16)
    expect = torch.cat([(coords[:, None, None] * f[2:]).expand(8, 8, 2),
                        (coords[None, :, None] * f[2:]).expand(8, 8, 2)], -1)
    assert (ours[1:, low, 0] - torch.cos(expect.reshape(64, 4))).abs().max() < 1e-6
    assert (ours[1:, low, 1] - torch.sin(expect.reshape(64, 4))).abs().max() < 1e-6
    assert ours[0].abs().max() == 0


@pytest.mark.parametrize("field, value",
                         [("n_kv_head", 8), ("n_kv_head", 3), ("dim", 72), ("multiple_of", 0),
                          ("n_layer", 0), ("rope_base", 0.0),
                          ("rope_base", -1.0), ("block_size", 15)])
def test_config_rejects_impossible_values(field, value):
    with pytest.raises(ValueError, match=f"{field}={value}"):
        RandARConfig(**{**asdict(randar.PRESETS["tiny"]), field: value})


def test_forward_rejects_bad_tokens_and_orders():
    model = random_gpt()
    with pytest.raises(ValueError, match="tokens"):
        model(torch.zeros(2, 15, dtype=torch.long), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="permutation"):
        model(torch.zeros(2, 16, dtype=torch.long), torch.tensor([0, 1]),
              order=torch.ones(2, 16, dtype=torch.long))


def test_a_tiny_model_overfits_a_small_batch():
    torch.manual_seed(0)
    cfg = RandARConfig(**{**TINY, "num_classes": 8}, token_dropout_p=0, resid_dropout_p=0,
                       ffn_dropout_p=0, class_dropout_prob=0)
    model = RandAR(cfg)
    tokens = torch.randint(0, 32, (8, 16))
    labels = torch.arange(8)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(300):
        _, loss = model(tokens, labels, order="random")
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5  # from log(32) = 3.47 at the zero-initialised head


def test_bidirectional_features_see_every_token_and_causal_ones_only_the_past():
    model = random_gpt(seed=14)
    tokens = torch.randint(0, 32, (2, 16), generator=torch.Generator().manual_seed(0))
    changed = {}
    for kind in ("bidirectional", "causal"):
        base = model.features(tokens, kind=kind)
        assert base.shape == (2, 16, 64)
        for p in (0, 7, 15):
            other = tokens.clone()
            other[:, p] = (other[:, p] + 1) % 32
            moved = (model.features(other, kind=kind) - base).abs().amax(dim=(0, 2))  # [16]
            changed[kind, p] = moved > 1e-4
    for p in (0, 7, 15):
        assert changed["bidirectional", p].all()  # every position's feature saw the changed token
        # only later ones did
        assert changed["causal", p][p:].all() and not changed["causal", p][:p].any()
    # The label is an input too: null class by default, so the features are not told the answer.


def test_label_dropout_draws_the_null_class_at_its_rate_and_only_in_training():
    """CFG's unconditional branch is trained by label dropout: the null class at
    class_dropout_prob, within a 5-sigma binomial bound over 200,000 labels; never in eval mode."""
    torch.manual_seed(0)
    embedder = randar.LabelEmbedder(RandARConfig(**TINY, class_dropout_prob=0.1)).train()
    labels = torch.randint(0, 10, (200_000,))
    null = embedder.embedding_table.weight[10]
    with torch.no_grad():
        rate = (embedder(labels) == null).all(1).double().mean().item()
        assert abs(rate - 0.1) < 5 * math.sqrt(0.1 * 0.9 / len(labels)), rate
        assert not (embedder.eval()(labels) == null).all(1).any()


def test_drop_path_drops_whole_samples_at_its_rate_and_keeps_the_mean():
    block = randar.Block(RandARConfig(**TINY), drop_path=0.3).train()
    torch.manual_seed(0)
    x = torch.ones(200_000, 1, 1)
    out = block._drop_path(x)
    dropped = (out == 0).double().mean().item()
    assert abs(dropped - 0.3) < 5 * math.sqrt(0.3 * 0.7 / len(x)), dropped
    assert torch.allclose(out[out != 0], torch.tensor(1 / 0.7))  # the kept ones rescaled
    assert torch.equal(block.eval()._drop_path(x), x)


# ---- decoding (generate.py): the reference's tokens, fast paths against the slow computation -----

@pytest.mark.parametrize("name", ["seq_nocfg", "seq_cfg", "par6_nocfg", "par6_cfg"])
def test_generation_matches_reference(fx, name):
    model = reference_gpt(fx)
    case = fx["gpt"]["generate"][name]
    seen = []
    final = []
    tokens = generate(model, case["labels"], order=case["token_order"],
                      steps=case["num_inference_steps"], cfg_scale=tuple(case["cfg_scales"]),
                      top_k=case["top_k"],
                      callback=lambda step, logits, new: (seen.append((logits, new)),
                                                          final.append(caches(model))))
    assert torch.equal(tokens, case["tokens"])
    assert [new.size(1) for _, new in seen] == case["tokens_per_step"]
    for (logits, new), ref in zip(seen, case["steps"], strict=True):
        assert (logits - ref["sample_logits"]).abs().max() < 1e-4
        assert torch.equal(new, ref["sampled"])
    # the last step's tokens are never fed: this is the final cache
    for i, (k, v) in enumerate(final[-1]):
        ref_k = case["final_kv_cache"][f"layers.{i}.k_cache"]
        ref_v = case["final_kv_cache"][f"layers.{i}.v_cache"]
        assert (k[:, :, :33] - ref_k[:, :, :33]).abs().max() < 1e-4
        assert (v[:, :, :33] - ref_v[:, :, :33]).abs().max() < 1e-4


def test_schedules_match_reference(fx):
    assert len(fx["schedules"]) == 14
    for key, ref in fx["schedules"].items():
        n, steps = map(int, key.split("_"))
        assert decoding_schedule(n, steps) == ref["tokens_per_step"], key


def test_schedules_match_the_references_own_function_for_every_n_below_300():
    """fixtures/schedules.json (from the reference's function,
    ../shared/release_fixtures/README.md): per N, the SHA-256 of its schedules for steps 1..N, each
    comma-joined, joined by ';'."""
    ref = json.load(open(os.path.join(FIXTURES, "schedules.json")))
    def schedule_hash(n):
        schedules = (",".join(map(str, decoding_schedule(n, steps))) for steps in range(1, n + 1))
        return hashlib.sha256(";".join(schedules).encode()).hexdigest()
    wrong = [n for n in range(1, 300) if schedule_hash(n) != ref["hashes"][str(n)]]
    assert not wrong, wrong
    for key, counts in ref["examples"].items():  # 1024,88: the 2x extrapolation grid
        assert decoding_schedule(*map(int, key.split(","))) == counts, key


def test_the_schedule_angle_is_evaluated_left_to_right():
    """N = 52, 39 steps, after step 26: pi/2 * 26 / 39 gives 27.000000000000007 tokens, pi/2 * (26 /
    39) gives 26.999999999999993: floor lands on 27 in the reference's order, 26 in the other."""
    left_to_right = (1 - math.cos(math.pi / 2.0 * 26 / 39)) * 52 + 1
    ratio_first = (1 - math.cos(math.pi / 2.0 * (26 / 39))) * 52 + 1
    assert left_to_right == 27.000000000000007 and ratio_first == 26.999999999999993
    assert sum(decoding_schedule(52, 39)[:26]) == 27


def test_schedules_decode_every_token_once_in_the_steps_asked():
    for n in (4, 16, 64, 100, 256):
        for steps in range(1, n):  # the first step always holds one token: one step asked gives two
            counts = decoding_schedule(n, steps)
            assert sum(counts) == n and min(counts) >= 1, (n, steps)
            assert len(counts) == max(steps, 2), (n, steps)


def test_sampling_filters_match_reference(fx):
    s = fx["sampling"]
    for case in s["filter_cases"]:
        assert torch.equal(filter_logits(s["logits"], case["top_k"], case["top_p"]), case["output"])
    for case in s["sample_cases"]:
        probs = sampling_probs(s["logits"], case["temperature"], case["top_k"], case["top_p"])
        assert (probs - case["probs"]).abs().max() < 1e-6


@pytest.mark.parametrize("cfg_scale, spatial, groups",
                         [((1.0, 1.0), None, 1), ((3.0, 1.0), None, 1), ((0.5, 0.5), None, 1),
                          ((2.0, 0.5), None, 1), ((1.0, 1.5), None, 2), ((1.0, 3.0), (1.0, 1.0), 2),
                          ((1.0, 3.0), (3.0, 0.9), 2), ((1.0, 1.0), (1.0, 3.0), 1),
                          ((1.0, 3.0), (1.0, 2.5), 3)])
def test_guidance_is_applied_iff_the_final_scale_exceeds_one(cfg_scale, spatial, groups):
    """The reference's rule: CFG iff cfg[-1] > 1; the spatial triple batch iff both final scales >
    1."""
    model = random_gpt(seed=4)
    labels = torch.tensor([2, 5])
    positions = torch.tensor([[0, 3, 5, 9], [1, 2, 8, 15]])
    known = (positions, torch.randint(0, 32, (2, 4), generator=torch.Generator().manual_seed(0)))
    generate(model, labels, known=known, cfg_scale=cfg_scale,
             spatial_cfg_scale=spatial, steps=4, top_k=1)
    assert model.layers[0].attention.kv_cache.k.size(0) == 2 * groups


def test_spatial_guidance_zeroes_exactly_half_of_the_context_embeddings():
    model = random_gpt(seed=6)
    prefix = torch.randint(0, 32, (3, 7))
    labels, keep, groups, *_ = gen.guidance_rows(model, torch.tensor([1, 2, 3]), prefix, (1.0, 3.0),
                                                 (1.0, 2.5), torch.Generator().manual_seed(0))
    assert groups == 3 and labels.tolist() == [1, 2, 3, 10, 10, 10, 10, 10, 10]
    # floor(7 / 2) per sample
    assert keep[:6].eq(1).all() and keep[6:].eq(0).sum(1).tolist() == [3, 3, 3]
    assert len({tuple(r) for r in keep[6:].tolist()}) > 1  # drawn per sample
    # "Zeroed" is the embedding, not token id 0: a dropped context pair differs from feeding token
    # 0.
    positions = torch.arange(7).expand(1, 7)
    x_zero, _ = model.pairs(positions, prefix[:1], model.rope, keep=torch.zeros(1, 7))
    x_tok0, _ = model.pairs(positions, torch.zeros(1, 7, dtype=torch.long), model.rope)
    assert x_zero[:, 1::2].abs().max() == 0 and x_tok0[:, 1::2].abs().max() > 0


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
    assert (gen.written_out_attention(q, k, v, attn_mask=mask) - want).abs().max() < 1e-5


def teacher_forced_kv(model, tokens, labels, order):
    """K/V of every layer from the plain training forward, captured with hooks: [(k, v)] (B, H,
    1+2N, hd)."""
    captured = []
    hooks = []
    for layer in model.layers:
        hook = layer.attention.wqkv.register_forward_hook(lambda m, i, out: captured.append(out))
        hooks.append(hook)
    model(tokens, labels, order=order)
    for h in hooks:
        h.remove()
    B = labels.size(0)
    D = model.config.dim
    H = model.config.n_head
    slot_pos = torch.cat([torch.full((B, 1), -1), order.repeat_interleave(2, dim=1)], dim=1)
    rope = model.rope[slot_pos + 1]
    kv = []
    for out in captured:
        _, k, v = out.split([D, D, D], dim=-1)
        k = apply_rope(k.view(B, -1, H, D // H), rope).transpose(1, 2)
        kv.append((k, v.view(B, -1, H, D // H).transpose(1, 2)))
    return kv


@pytest.mark.parametrize("steps", [16, 11, 6, 3, 1])
@pytest.mark.parametrize("cfg_scale", [(1.0, 1.0), (1.5, 4.0)])
def test_cached_decoding_equals_teacher_forcing(steps, cfg_scale):
    model = random_gpt(seed=steps)
    g = torch.Generator().manual_seed(1)
    labels = torch.tensor([1, 7, 3])
    order = torch.stack([torch.randperm(16, generator=g) for _ in range(3)])
    seen = []
    final = []
    tokens = generate(model, labels, order=order, steps=steps, cfg_scale=cfg_scale, temperature=1.0,
                      generator=g,
                      callback=lambda step, logits, new: (seen.append(logits),
                                                          final.append(caches(model))))
    cond, _ = model(tokens, labels, order=order)
    uncond, _ = model(tokens, torch.full_like(labels, 10), order=order)
    done = 0
    for logits in seen:
        scale = cfg_scale[0] + (cfg_scale[1] - cfg_scale[0]) * done / 16
        slow = uncond + scale * (cond - uncond) if cfg_scale[1] > 1 else cond
        n = logits.size(1)
        if n == 1 or steps == 16:
            assert (logits - slow[:, done:done + n]).abs().max() < 1e-4
        # later queries of a parallel step see PI tokens, not image tokens (docs/algorithm.md §4):
        # only the first matches
        else:
            assert (logits[:, 0] - slow[:, done]).abs().max() < 1e-4
        done += n
    assert done == 16 and len(seen) == len(decoding_schedule(16, steps))
    # The final cache holds the training layout up to the last step's first query slot.
    end = 2 * (16 - seen[-1].size(1)) + 2
    for (ck, cv), (k, v) in zip(final[-1], teacher_forced_kv(model, tokens, labels, order)):
        assert (ck[:3, :, :end] - k[:, :, :end]).abs().max() < 1e-4
        assert (cv[:3, :, :end] - v[:, :, :end]).abs().max() < 1e-4


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
        out = generate(model_compiled_once, **kw, compile=compiled,
                       generator=torch.Generator().manual_seed(3),
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
        return generate(model, labels, steps=steps, grid=16, cfg_scale=(1.0, 4.0),
                        compile=compiled, generator=torch.Generator().manual_seed(3))
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
        return generate(model, labels, steps=3, cfg_scale=(1.0, 3.0), compile=compiled,
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
        generate(model, torch.tensor([1]), steps=4, compile=True)


@pytest.mark.parametrize("kw",
                         [dict(), dict(steps=5), dict(steps=6, cfg_scale=(1.0, 3.0)),
                          dict(steps=4, known=True), dict(steps=20, grid=8, cfg_scale=(1.0, 3.0))])
def test_reading_the_filled_prefix_equals_reading_the_whole_cache(kw, monkeypatch):
    """Attention reads the cache up to the filled prefix rounded up to READ_BUCKET slots; with an
    8-slot bucket reads stop short of the cache's end, and the logits match a read of every slot to
    1e-5 of the largest (CFG scales the rounding of its two halves)."""
    model = random_gpt(seed=9)
    kw = {"labels": torch.tensor([1, 4]), **kw}
    if kw.get("known"):
        kw["known"] = (torch.tensor([[0, 5, 9], [15, 2, 3]]), torch.tensor([[1, 2, 3], [4, 5, 6]]))
    runs = []
    reads = []
    real_update = randar.KVCache.update
    monkeypatch.setattr(randar.KVCache, "update", lambda c, *a, read: reads.append(read)
                        or real_update(c, *a, read=read))
    for bucket in (8, 10 ** 9):
        monkeypatch.setattr(gen, "READ_BUCKET", bucket)
        seen = []
        out = generate(model, **kw, generator=torch.Generator().manual_seed(2),
                             callback=lambda s, logits, new: seen.append(logits))
        runs.append((out, seen))
    (a, la), (b, lb) = runs
    n_slots = model.layers[0].attention.kv_cache.k.size(2)
    assert min(reads) < n_slots and max(reads) == n_slots
    assert torch.equal(a, b) and all((x - y).abs().max() <= 1e-5 * max(1.0, x.abs().max())
                                     for x, y in zip(la, lb, strict=True))


def test_an_empty_known_prefix_given_as_lists_is_accepted():
    """K = 0 known tokens, as Python lists (torch reads [] as float): plain decoding."""
    model = random_gpt(seed=4)
    a = generate(model, [2], known=([[]], [[]]), steps=4,
                 generator=torch.Generator().manual_seed(0))
    b = generate(model, [2], steps=4, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b)


def test_decode_step_has_no_host_synchronisation():
    """The static step must run on tensors alone: trace it on the meta device, where any .item(),
    int(tensor) or data-dependent shape would raise."""
    model = random_gpt(seed=2).to("meta")
    schedule = decoding_schedule(16, 5)
    model.setup_caches(2, 40, torch.float32, "meta")
    plan = feed_plan(schedule, 0, 40, "meta")
    order = torch.empty(2, 16, dtype=torch.long, device="meta")
    generated = torch.empty(2, 16, dtype=torch.long, device="meta")
    for step, m in zip(plan, schedule[1:], strict=True):
        logits = model.decode_step(model.rope, order, generated, step)
        assert logits.shape == (2, m, 32)


def test_feed_plan_rewrites_queries_at_their_training_slots():
    """The worked example of feed_plan's docstring."""
    feed, = feed_plan([3, 2], known=4, n_slots=40)
    # 3 tokens sampled at generation indices 4, 5, 6; then 2 queries (7, 8)
    assert feed.gen_index.tolist() == [4, 5, 5, 6, 6, 7, 8]
    assert feed.is_pi.tolist() == [False, True, False, True, False, True, True]
    assert feed.slots.tolist() == [10, 11, 12, 13, 14, 15, 16] and feed.queries.tolist() == [5, 6]
    assert feed.read == 40 and feed_plan([3, 2], known=4, n_slots=200)[0].read == 64


@pytest.mark.parametrize("order", ["random", "raster"])
def test_a_known_prefix_is_kept_and_decodes_like_teacher_forcing(order):
    model = random_gpt(seed=3)
    g = torch.Generator().manual_seed(0)
    labels = torch.tensor([2, 5])
    positions = torch.stack([torch.randperm(16, generator=g)[:6] for _ in range(2)])
    known_tokens = torch.randint(0, 32, (2, 6), generator=g)
    seen = []
    # the order generate draws: its generator's first use (known positions, then the rest)
    replay = torch.Generator().set_state(g.get_state())
    _, _, is_known = gen.known_canvas(model, (positions, known_tokens), 2, 16)
    used_order = gen.generation_order(model, order, positions, is_known, replay)
    tokens = generate(model, labels, order=order, known=(positions, known_tokens), generator=g,
                      callback=lambda step, logits, new: seen.append((logits, new)))
    assert torch.equal(tokens.gather(1, positions), known_tokens)
    assert sum(new.size(1) for _, new in seen) == 10
    assert torch.equal(used_order[:, :6], positions)
    rest = torch.stack([torch.tensor([p for p in range(16) if p not in row])
                        for row in positions.tolist()])
    assert torch.equal(used_order[:, 6:], rest) == (order == "raster")
    # Every step, in either order, equals the teacher-forced forward over the order used.
    slow, _ = model(tokens, labels, order=used_order)
    for k, (logits, _) in enumerate(seen):
        assert (logits[:, 0] - slow[:, 6 + k]).abs().max() < 1e-4
    # The prefix fed in one call == the same prefix fed one token at a time.
    gen_order = torch.cat([positions, rest], dim=1)
    model.setup_caches(2, 40, torch.float32, "cpu")
    one_call = model.prefill(model.rope, labels, gen_order, known_tokens, 1, 40)
    logits = model.prefill(model.rope, labels, gen_order, known_tokens[:, :0], 1, 40)
    generated = torch.zeros(2, 16, dtype=torch.long)
    generated[:, :6] = known_tokens
    for step in feed_plan([1] * 7, 0, 40)[:6]:
        logits = model.decode_step(model.rope, gen_order, generated, step)
    assert (one_call - logits).abs().max() < 1e-4


def test_same_generator_same_tokens_and_generators_differ():
    model = random_gpt(seed=5)
    labels = torch.tensor([0, 9])
    a = generate(model, labels, steps=5, generator=torch.Generator().manual_seed(7))
    b = generate(model, labels, steps=5, generator=torch.Generator().manual_seed(7))
    c = generate(model, labels, steps=5, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("kwargs, match", [
    (dict(steps=0), "steps"),
    (dict(steps=-1), "steps"),
    (dict(steps=2.5), "steps"),
    (dict(order="spiral"), "spiral"),
    (dict(order=torch.zeros(2, 16, dtype=torch.long)), "permutation"),
    (dict(temperature=0.0), "temperature"),
    (dict(labels=torch.tensor([0, 10])), "labels"),
    (dict(labels=torch.tensor([-1, 0])), "labels"),
    (dict(labels=torch.tensor([True, False])), "labels"),
    (dict(labels=torch.tensor([1.0, 2.0])), "labels"),
    (dict(cfg_scale=(1.0, 2.0, 3.0)), "cfg_scale"),
    (dict(cfg_scale=(2.0,)), "cfg_scale"),
    (dict(known=(torch.tensor([[0.0, 1.0]] * 2), torch.tensor([[1, 2]] * 2))), "known positions"),
    (dict(known=(torch.tensor([[0, 1]] * 2), torch.tensor([[1.5, 2.0]] * 2))), "known tokens"),
    (dict(grid=8, ntk_boundary=-1), "ntk_boundary"),
    (dict(grid=0), "grid"),
])
def test_generate_rejects_bad_arguments(kwargs, match):
    model = random_gpt()
    kwargs = {"labels": torch.tensor([0, 1]), **kwargs}
    with pytest.raises(ValueError, match=match):
        generate(model, **kwargs)


def test_greedy_decoding_needs_no_temperature_and_draws_nothing_random():
    """top_k 1 with temperature 0: the same tokens whatever the random state, and they are the
    argmax."""
    model = random_gpt()
    seen = []
    greedy = [generate(model, torch.tensor([0]), order="raster", temperature=0.0, top_k=1,
                       generator=torch.Generator().manual_seed(seed),
                       callback=lambda step, logits, new: seen.append((logits, new)))
              for seed in (0, 1)]
    assert torch.equal(*greedy) and all(torch.equal(new, logits.argmax(-1)) for logits, new in seen)


def test_grouped_query_attention_decodes_like_teacher_forcing():
    model = random_gpt(seed=13, n_kv_head=2)
    labels = torch.tensor([4])
    order = torch.randperm(16, generator=torch.Generator().manual_seed(2))[None]
    seen = []
    tokens = generate(model, labels, order=order,
                      callback=lambda step, logits, new: seen.append(logits))
    slow, _ = model(tokens, labels, order=order)
    assert (torch.cat(seen, 1) - slow).abs().max() < 1e-4 and slow.std() > 0.1


def test_extrapolated_generation_decodes_every_token_and_keeps_the_base():
    model = random_gpt(seed=11)  # 4x4 training grid
    g = torch.Generator().manual_seed(0)
    labels = torch.tensor([1, 4])
    base = generate(model, labels, generator=g)
    rows = torch.arange(4).repeat_interleave(4) * 2
    cols = torch.arange(4).repeat(4) * 2
    positions = (rows * 8 + cols).expand(2, -1)
    seen = []
    big = generate(model, labels, known=(positions, base), grid=8, steps=10, cfg_scale=(1.0, 3.0),
                   spatial_cfg_scale=(1.0, 2.5), generator=g,
                   callback=lambda step, logits, new: seen.append(new))
    assert big.shape == (2, 64) and torch.equal(big.view(2, 8, 8)[:, ::2, ::2].reshape(2, 16), base)
    # every remaining token decoded, in 10 steps
    assert sum(t.size(1) for t in seen) == 48 and len(seen) == 10
    assert torch.equal(model.rope, rope_table_2d(4, 16))  # the training table is back


def test_ntk_boundary_default_is_the_references_for_its_rope_and_zero_otherwise():
    """The released models (base 10000, head dim 64) get the reference's 2, the demo 0; generate()
    uses it."""
    for name, boundary in (("L", 2), ("XL", 2), ("XXL", 2), ("demo", 0)):
        cfg = randar.PRESETS[name]
        assert gen.default_ntk_boundary(cfg.dim // cfg.n_head, cfg.rope_base) == boundary, name
    model = random_gpt(rope_base=10.0)
    runs = [generate(model, torch.tensor([1, 2]), grid=8, steps=12, ntk_boundary=b,
                           generator=torch.Generator().manual_seed(0)) for b in (None, 0, 2)]
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])


def test_spatial_cfg_at_scale_one_is_plain_decoding():
    model = random_gpt(seed=12)
    positions = torch.tensor([[0, 2, 5, 7, 8, 10, 13, 15]])
    known_tokens = torch.randint(0, 32, (1, 8), generator=torch.Generator().manual_seed(3))
    runs = []
    for spatial in (None, (3.0, 1.0)):  # the final spatial scale is 1: no spatial guidance
        seen = []
        # greedy: no RNG in play
        out = generate(model, torch.tensor([6]), order="raster", known=(positions, known_tokens),
                       spatial_cfg_scale=spatial, steps=4, top_k=1,
                       callback=lambda step, logits, new: seen.append(logits))
        runs.append((out, seen))
    (a, la), (b, lb) = runs
    assert all((x - y).abs().max() < 1e-4 for x, y in zip(la, lb,
                                                          strict=True)) and torch.equal(a, b)


def test_guidance_combines_the_groups_as_the_formula_says():
    """docs/algorithm.md §6, §8, expanded by hand: s·cond + (s_sp − s)·uncond + (1 − s_sp)·weak is
    weak + s·(cond − uncond) + s_sp·(uncond − weak); CFG alone: uncond + s·(cond − uncond); the
    scales move linearly from start to end with the filled fraction."""
    g = torch.Generator().manual_seed(0)
    cond, uncond, weak = torch.randn(3, 4, 2, 32, generator=g, dtype=torch.float64).unbind(0)
    s = 3.0
    s_sp = 1.7
    expanded = s * cond + (s_sp - s) * uncond + (1 - s_sp) * weak
    spatial = gen.guided_logits(torch.cat([cond, uncond, weak]), 3, s, s_sp)
    assert (spatial - expanded).abs().max() < 1e-12
    plain = gen.guided_logits(torch.cat([cond, uncond]), 2, s)
    assert (plain - (s * cond + (1 - s) * uncond)).abs().max() < 1e-12
    assert torch.equal(gen.guided_logits(cond, 1, s), cond)
    guidance = gen.Guidance(torch.zeros(3), None, 3, (1.0, 4.0), (1.0, 2.0))
    assert guidance.scales(0.0) == (1.0, 1.0)
    assert guidance.scales(0.5) == (2.5, 1.5)
    assert guidance.scales(1.0) == (4.0, 2.0)


# ---- tokenizer.py --------------------------------------------------------------------------------

def save_tokenizer(model, path, **config_changes):
    """A tokenizer checkpoint as tokenizer.py writes one (config_changes: a config that does not
    match)."""
    torch.save({"model": model.state_dict(),
                "config": {**asdict(model.config), **config_changes}}, path)


def reference_vq(fx):
    model = tok.VQModel(tok.VQConfig.from_dict(fx["tokenizer"]["config"]))
    model.load_state_dict(fx["tokenizer"]["state_dict"], strict=True)
    return model.eval()


def test_tokenizer_matches_reference(fx):
    model = reference_vq(fx)
    case = fx["tokenizer"]["case"]
    ours = [[k, list(v.shape),
             str(v.dtype).replace("torch.", "")] for k, v in model.state_dict().items()]
    assert ours == [list(x) for x in fx["tokenizer"]["state_dict_keys"]]
    with torch.no_grad():
        enc = model.encoder(case["input"])
        z_q, _, idx = model.quantize(model.quant_conv(enc))
        assert (enc - case["encoder_output"]).abs().max() < 1e-4
        assert (z_q - case["quant"]).abs().max() < 1e-4
        assert torch.equal(idx.flatten(1), case["indices"])
        assert (model.decode(idx) - case["decoded"]).abs().max() < 1e-4


def test_tokenizer_training_mode_quantizer_matches_reference(fx):
    ref = fx["tokenizer"]["case"]["train_mode_quantizer"]
    model = tok.VQModel(tok.VQConfig.from_dict({**fx["tokenizer"]["config"],
                                                "entropy_loss_ratio": ref["entropy_loss_ratio"]}))
    model.load_state_dict(fx["tokenizer"]["state_dict"], strict=True)
    model.train()
    z_q, losses, _ = model.quantize(fx["tokenizer"]["case"]["pre_quant"])
    assert (z_q - ref["z_q"]).abs().max() < 1e-4
    for ours, theirs in [("vq", "vq_loss"), ("commit", "commit_loss"), ("entropy", "entropy_loss")]:
        assert abs(losses[ours].item() - ref[theirs].item()) < 1e-4
    assert model.quantize.usage() == ref["codebook_usage"]
    assert torch.equal(model.quantize.codebook_used[-128:], ref["codebook_used_last_entries"])


def test_llamagen_vq16_preset_has_the_published_layout():
    with torch.device("meta"):
        model = tok.VQModel(tok.PRESETS["llamagen-vq16"])
    sd = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert sd["encoder.conv_in.weight"] == (128, 3, 3, 3)
    assert sd["encoder.conv_blocks.3.downsample.conv.weight"] == (256, 256, 3, 3)
    assert "encoder.conv_blocks.4.downsample.conv.weight" not in sd
    assert sd["encoder.conv_blocks.4.attn.1.q.weight"] == (512, 512, 1, 1)
    assert sd["encoder.conv_out.weight"] == (256, 512, 3, 3)
    assert sd["decoder.conv_blocks.0.attn.2.proj_out.weight"] == (512, 512, 1, 1)
    assert sd["decoder.conv_blocks.1.res.0.nin_shortcut.weight"] == (256, 512, 1, 1)
    assert sd["decoder.conv_blocks.3.res.0.nin_shortcut.weight"] == (128, 256, 1, 1)
    assert sd["quantize.embedding.weight"] == (16384, 8) and sd["quantize.codebook_used"] == (65536,
                                                                                              )
    assert sd["quant_conv.weight"] == (8, 256, 1,
                                       1) and sd["post_quant_conv.weight"] == (256, 8, 1, 1)
    assert model.config.downsample == 16
    assert 71_000_000 < sum(p.numel() for p in model.parameters()) < 73_000_000  # VQ-16 is ~72M


def test_decode_of_encode_is_the_forward_reconstruction():
    torch.manual_seed(0)
    model = tok.VQModel(tok.PRESETS["demo"]).eval()
    x = torch.rand(3, 1, 32, 32) * 2 - 1
    idx = model.encode(x)
    assert idx.shape == (3, 8, 8) and torch.equal(idx, model.encode(x))
    with torch.no_grad():
        recon, _, idx2 = model(x)
    assert torch.equal(idx, idx2) and (model.decode(idx) - recon).abs().max() < 1e-5


def test_tokenizer_learns_on_real_fashion_mnist(tmp_path):
    torch.manual_seed(0)
    images, labels = image_data.fashion_mnist("test")
    assert images.shape == (10000, 1, 32, 32) and images.dtype == torch.uint8 and labels.max() == 9
    x = tok.to_pixels(images[:256])
    model = tok.VQModel(tok.PRESETS["demo"])
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    losses = []
    hits = torch.zeros(512)
    for step in range(40):
        batch = x[torch.randint(0, 256, (32,))]
        recon, q, idx = model(batch)
        loss = torch.nn.functional.mse_loss(recon, batch)
        opt.zero_grad()
        (loss + sum(q.values())).backward()
        opt.step()
        losses.append(loss.item())
        hits += torch.bincount(idx.flatten(), minlength=512)
        if step % 10 == 9:
            tok.reinit_dead_codes(model, hits, batch)
            hits.zero_()
    assert np.mean(losses[-10:]) < 0.5 * np.mean(losses[:5])
    psnr, usage = tok.evaluate(model.eval(),
                               torch.utils.data.TensorDataset(images[:256], labels[:256]))
    assert psnr > 12 and usage > 10


def serve(directory, files):
    """A throwaway HTTP server on 127.0.0.1 serving {name: bytes}."""
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = files.get(self.path.lstrip("/"))
            self.send_response(200 if body is not None else 404)
            self.send_header("Content-Length", str(len(body or b"")))
            self.end_headers()
            self.wfile.write(body or b"")

        def log_message(self, *a):
            pass
    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_port}/"


def test_download_checks_md5_and_removes_partial_file(tmp_path):
    real = bytes(range(256)) * 64  # any payload: the download checks bytes, not their meaning
    server, url = serve(tmp_path, {"t10k-labels-idx1-ubyte.gz": real})
    try:
        dest = str(tmp_path / "labels.gz")
        common.download(url + "t10k-labels-idx1-ubyte.gz", dest, hashlib.md5(real).hexdigest())
        assert open(dest, "rb").read() == real
        bad = str(tmp_path / "bad.gz")
        with pytest.raises(ValueError, match="checksum mismatch"):
            common.download(url + "t10k-labels-idx1-ubyte.gz", bad, "0" * 32)
        assert os.listdir(tmp_path) == ["labels.gz"]  # nothing half-written left behind
    finally:
        server.shutdown()


def refusing_url():
    """http://127.0.0.1:PORT/ where nothing listens: every download is refused, as on an offline
    machine."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/"


def test_offline_downloads_name_the_way_out(tmp_path, monkeypatch):
    data_dir = tmp_path / "fashion"
    data_dir.mkdir()
    with pytest.raises(OSError, match="--data-dir .* dataset-fashion-mnist"):
        image_data.fashion_mnist("test", str(data_dir), url=refusing_url())
    monkeypatch.setattr(inception, "WEIGHTS_URL",
                        refusing_url() + "pt_inception-2015-12-05-6726825d.pth")
    hub = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path / "hub"))
    try:
        with pytest.raises(OSError, match="pass --inception PATH"):
            inception.load_inception()
    finally:
        torch.hub.set_dir(hub)
    assert os.listdir(data_dir) == []
    assert not any(files for _, _, files in os.walk(tmp_path / "hub"))


def test_tokenizer_training_is_bitwise_reproducible_with_threads(tmp_path, capsys):
    """The tokenizer stage twice on 2 threads (run-to-run differences would come from multi-threaded
    reductions): the same weights; it reports its held-out PSNR and codebook usage."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for out in ("0", "1"):
            tok.train_tokenizer(str(tmp_path / out), limit=128, steps=6, batch_size=32,
                                reinit_every=4, image_every=100)
    finally:
        torch.set_num_threads(threads)
    runs = [torch.load(tmp_path / r / "tokenizer.pt",
                       weights_only=True)["model"] for r in ("0", "1")]
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
    assert re.search(r"held-out images: PSNR \d+\.\d+ dB, \d+\.\d% of the 512 codes used",
                     capsys.readouterr().out)


def write_images(folder, n=4, size=(40, 36)):
    for c in ("cat", "dog"):
        os.makedirs(os.path.join(folder, c), exist_ok=True)
        for i in range(n):
            pixels = np.random.randint(0, 255, (*size, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(os.path.join(folder, c, f"{i}.png"))


def test_an_image_folder_gives_classes_from_subfolders(tmp_path):
    write_images(tmp_path)
    ds, num_classes = image_data.open_dataset(str(tmp_path), "train", image_size=32)
    x, y = ds[5]
    assert num_classes == 2
    assert len(ds) == 8
    assert x.shape == (3, 32, 32)
    assert x.dtype == torch.uint8
    assert y == 1


def test_tokenizer_stage_errors_are_one_line(tmp_path):
    """Bad data for the tokenizer stage of train.py: one line naming it, no tokenizer written."""
    empty = tmp_path / "empty"
    empty.mkdir()
    corrupt = tmp_path / "corrupt"
    write_images(corrupt)
    (corrupt / "dog" / "broken.png").write_bytes(b"not an image")
    good = tmp_path / "good"
    write_images(good)
    tiny = ["--preset", "tiny", "--tokenizer-steps", 2, "--tokenizer-batch-size", 2,
            "--steps", 1, "--batch-size", 2]
    cases = [
        (["--data-dir", tmp_path / "nowhere", "--out-dir", tmp_path / "o0"], "not found"),
        (["--data", empty, "--out-dir", tmp_path / "o1"], "no images found"),
        (["--data", good, "--image-size", 30, "--out-dir", tmp_path / "o2"], "not divisible"),
    ]
    for argv, msg in cases:
        message = cli("train.py", *argv, *tiny)
        assert message and msg in message, (argv, message)
        assert not (tmp_path / "o1" / "tokenizer.pt").exists()
        assert not (tmp_path / "o2" / "tokenizer.pt").exists()
    # A corrupt file is named; a checkpoint of another config is refused.
    torch.manual_seed(0)
    model = tok.VQModel(tok.VQConfig(**{**asdict(tok.PRESETS["demo"]), "in_channels": 3}))
    ckpt = str(tmp_path / "tok.pt")
    save_tokenizer(model, ckpt)
    assert "broken.png" in cli("train.py", "--data", corrupt, "--tokenizer-ckpt", ckpt,
                               "--out-dir", tmp_path / "o3", *tiny)
    save_tokenizer(model, ckpt, ch=32)
    assert "do not match" in cli("train.py", "--data", good, "--tokenizer-ckpt", ckpt,
                                 "--out-dir", tmp_path / "o4", *tiny)


def test_a_folder_smaller_than_a_batch_is_refused_at_once_by_both_stages(tmp_path):
    """10 images: each stage's batch is refused before any work, naming the count, the batch and its
    flag; with both batches lowered the folder trains to last.pt."""
    write_images(tmp_path / "ten", n=5)
    data = tmp_path / "ten"
    out = tmp_path / "run"
    message = cli("train.py", "--data", data, "--out-dir", out, "--preset", "tiny")
    assert message == ("error: 10 training images are fewer than one tokenizer batch (64); "
                       "lower --tokenizer-batch-size")
    message = cli("train.py", "--data", data, "--out-dir", out, "--preset", "tiny",
                  "--tokenizer-batch-size", 4)
    assert message.startswith("error: 10 training images are fewer than one global "
                              "batch (32 = --batch-size 32")
    assert message.endswith("lower --batch-size") and not os.path.exists(out / "tokenizer.pt")
    small = ["--tokenizer-batch-size", 4, "--batch-size", 4, "--tokenizer-steps", 3, "--steps", 3,
             "--image-size", 16, "--val-limit", 8, "--samples-per-class", 1]
    assert cli("train.py", "--data", data, "--out-dir", out, "--preset", "tiny", *small) is None
    assert weights(out)["step"] == 3


def test_repeating_a_loader_that_gives_no_batch_is_an_error_not_a_spin():
    dataset = torch.utils.data.TensorDataset(torch.zeros(3))
    empty = torch.utils.data.DataLoader(dataset, batch_size=4, drop_last=True)
    with pytest.raises(ValueError, match="a whole epoch gave no batch"):
        next(common.repeat_epochs(empty, "data"))
    two_per_epoch = torch.utils.data.DataLoader(dataset, batch_size=1, drop_last=True)
    assert len(list(itertools.islice(common.repeat_epochs(two_per_epoch, "data"), 7))) == 7


def test_a_text_file_named_png_is_refused_with_its_name(tmp_path):
    write_images(tmp_path / "seventy", n=35, size=(20, 20))
    (tmp_path / "seventy" / "dog" / "notes.png").write_text("not an image: a text file renamed")
    message = cli("train.py", "--data", tmp_path / "seventy", "--out-dir", tmp_path / "run",
                  "--preset", "tiny", "--image-size", 16, "--tokenizer-steps", 2, "--batch-size", 4)
    assert "notes.png" in message, message


@pytest.fixture(scope="module")
def maskgit_fx():
    """The reference tokenizer's code on random weights at a small configuration
    (fixtures/maskgit_fixture.pt)."""
    return torch.load(os.path.join(FIXTURES, "maskgit_fixture.pt"), weights_only=True)


def test_maskgit_tokenizer_matches_reference(maskgit_fx, tmp_path):
    """Saved the release's way (a bare state dict), read back strictly by load_tokenizer with its
    sizes read off the shapes; encoder output, codes, [0, 1] pixels and the truncating uint8 as the
    reference's."""
    path = str(tmp_path / "maskgit-vqgan-tiny.bin")
    torch.save(maskgit_fx["state_dict"], path)
    vq = tok.load_tokenizer(path)
    ref_config = maskgit_fx["config"]
    assert vq.config.channel_mult == tuple(ref_config["channel_mult"])
    assert vq.config.num_embeddings == ref_config["num_embeddings"] == vq.config.codebook_size
    images = maskgit_fx["images"]
    assert (vq.encoder(images) - maskgit_fx["z"]).abs().max() <= 1e-5
    assert torch.equal(vq.encode(images).flatten(1), maskgit_fx["codes"])
    codes = maskgit_fx["codes"].view(2, 4, 4)
    # float32 convolutions round differently across torch releases (1.03e-5 on torch 2.7.1)
    decoded = vq.decode(codes)
    assert (decoded - maskgit_fx["decoded"]).abs().max() <= 5e-5
    uint8 = vq.decode_images(codes).permute(0, 2, 3, 1)
    assert torch.equal(uint8, (decoded * 255).to(torch.uint8).permute(0, 2, 3, 1))  # truncated
    # the reference's uint8 wherever that last-bit difference cannot cross an integer (clamped
    # 0 or 255, or pixels well inside a level)
    scaled = maskgit_fx["decoded"].permute(0, 2, 3, 1) * 255
    clear = ((scaled - scaled.round()).abs() > 0.02) | (scaled == 0) | (scaled == 255)
    assert clear.float().mean() > 0.9
    assert torch.equal(uint8[clear], maskgit_fx["uint8"][clear])
    uint8 = (images * 255).round().to(torch.uint8)  # what sample.py's editing feeds: uint8 in
    assert torch.equal(vq.encode_images(uint8), vq.encode(uint8.float() / 255))
    broken = {k: v for k, v in maskgit_fx["state_dict"].items() if not k.startswith("quantize")}
    torch.save(broken, tmp_path / "broken.bin")
    with pytest.raises(ValueError,
                       match="looks like MaskGIT-VQ weights but lacks 'quantize.embedding.weight'"):
        tok.load_tokenizer(str(tmp_path / "broken.bin"))
    torch.save({**maskgit_fx["state_dict"],
                "decoder.extra": torch.zeros(1)}, tmp_path / "extra.bin")
    with pytest.raises(ValueError, match="do not match"):
        tok.load_tokenizer(str(tmp_path / "extra.bin"))


def test_maskgit_release_layout_loads_strictly(maskgit_fx):
    """The full release's names and shapes (54.5 M parameters), as a strict load of its file needs
    them."""
    from maskgit_vq import MaskGITConfig, MaskGITVQ
    state = MaskGITVQ(MaskGITConfig()).state_dict()
    release = {k: list(v) for k, v in maskgit_fx["release_keys"].items()}
    assert {k: list(v.shape) for k, v in state.items()} == release
    assert sum(v.numel() for v in state.values()) == maskgit_fx["meta"]["release_params"]
    assert MaskGITConfig.from_state_dict(state) == MaskGITConfig()


def test_maskgit_release_end_to_end_sample_npz_fid(maskgit_fx, tmp_path):
    """The third release's commands in miniature: a tiny RandAR in the release format, a tiny
    MaskGIT-VQ saved the release's way; sample.py -> npz -> eval_fid.py."""
    from maskgit_vq import MaskGITConfig, MaskGITVQ
    torch.manual_seed(0)
    cfg = MaskGITConfig.from_state_dict(maskgit_fx["state_dict"])
    # the tiny release's vocabulary
    vq = MaskGITVQ(MaskGITConfig(**{**asdict(cfg), "num_embeddings": 32}))
    torch.save(vq.state_dict(), tmp_path / "maskgit-tiny.bin")
    official = ["--ckpt", os.path.join(FIXTURES, "randar_tiny_official.safetensors"),
                "--config", os.path.join(FIXTURES, "randar_tiny_official.yaml")]
    assert cli("sample.py", "grid", *official, "--vq-ckpt", tmp_path / "maskgit-tiny.bin",
               "--per-class", 1, "--out-npz", tmp_path / "s.npz", "--out",
               tmp_path / "s.png") is None
    samples = np.load(tmp_path / "s.npz")["arr_0"]
    assert samples.shape == (10, 64, 64, 3) and samples.dtype == np.uint8 and samples.std() > 0
    weights_path = str(tmp_path / "random_inception.pth")
    torch.save(inception.FIDInception().state_dict(), weights_path)
    assert cli("eval_fid.py", tmp_path / "s.npz", tmp_path / "s.npz", "--inception", weights_path,
               "--json", tmp_path / "m.json") is None
    assert abs(json.load(open(tmp_path / "m.json"))["fid"]) < 1e-3


def test_llamagen_style_file_without_config_loads_as_vq16(tmp_path):
    torch.manual_seed(0)
    model = tok.VQModel(tok.PRESETS["llamagen-vq16"])
    path = str(tmp_path / "vq_ds16_c2i.pt")
    torch.save({"model": model.state_dict()}, path)  # the published file's layout
    loaded = tok.load_tokenizer(path)
    assert loaded.config == tok.PRESETS["llamagen-vq16"]
    assert torch.equal(loaded.quantize.embedding.weight, model.quantize.embedding.weight)


# ---- train.py ------------------------------------------------------------------------------------

def synthetic_run_dir(path, n_train=64, n_test=32):
    """An output folder with a random demo tokenizer and random token files: train.py skips to
    RandAR."""
    torch.manual_seed(0)
    os.makedirs(path, exist_ok=True)
    vq = tok.VQModel(tok.VQConfig(**{**asdict(tok.PRESETS["demo"]), "codebook_size": 32}))
    vq_path = os.path.join(path, "tokenizer.pt")
    save_tokenizer(vq, vq_path)
    for split, n in (("train", n_train), ("test", n_test)):
        # what train.py's defaults ask for
        source = token_cache.encode_source(vq_path, "fashion-mnist", split, 32, 0)
        torch.save({"tokens": torch.randint(0, 32, (n, 16)).short(),
                    "labels": torch.randint(0, 10, (n,)), "num_classes": 10, "vocab_size": 32,
                    "tokenizer": vq_path, "source": source},
                   os.path.join(path, f"tokens_{split}.pt"))
    return str(path)


def torchrun(script, *argv):
    """script under `torchrun --nproc_per_node=2`, one thread per process (2 cores)."""
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node=2", os.path.join(HERE, script), *map(str, argv)],
                          capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def tiny_train_args(out_dir, *extra):
    return ["--out-dir", out_dir, "--preset", "tiny", "--batch-size", 8, "--warmup-steps", 2,
            "--eval-every", 1000, "--sample-every", 1000, "--samples-per-class", 1,
            "--log-every", 1, *extra]


def weights(path):
    return torch.load(os.path.join(path, "last.pt"), weights_only=True)


DDP_ARGS = ["--steps", 8, "--ckpt-every", 2, "--order", "raster", "--dropout", 0,
            "--class-dropout", 0, "--lr", 3e-3]


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    """An uninterrupted 2-process training run (torchrun, gloo)."""
    out = synthetic_run_dir(tmp_path_factory.mktemp("ddp"))
    r = torchrun("train.py", *tiny_train_args(out, *DDP_ARGS))
    assert r.returncode == 0, r.stderr[-2000:]
    return out


def losses(run):
    return [json.loads(line)["loss"] for line in open(os.path.join(run, "metrics.jsonl"))
            if '"loss"' in line]


def test_ddp_and_gradient_accumulation_equal_one_process_on_the_same_global_batch(
        ddp_run, tmp_path):
    """A global batch of 16 as 1 process x 16, 2 processes x 8 (ddp_run), and 2 processes x 4 x 2
    micro-batches (--grad-accum 2: DDP's no_sync on the first): the same 16 samples per step, so
    the same loss curve and weights, up to float summation order (1e-5, not bitwise)."""
    one = synthetic_run_dir(tmp_path / "one")
    assert cli("train.py", *tiny_train_args(one, *DDP_ARGS, "--batch-size", 16)) is None
    accumulated = synthetic_run_dir(tmp_path / "accumulated")
    r = torchrun("train.py", *tiny_train_args(accumulated, *DDP_ARGS, "--batch-size", 4,
                                              "--grad-accum", 2))
    assert r.returncode == 0, r.stderr[-2000:]
    a = weights(one)
    for run in (ddp_run, accumulated):
        b = weights(run)
        assert len(b["rank_param_checksums"]) == 2
        assert b["rank_param_checksums"][0] == b["rank_param_checksums"][1]
        for k in a["model"]:
            assert (a["model"][k] - b["model"][k]).abs().max() < 1e-5, (run, k)
        assert len(losses(run)) == 8 and np.allclose(losses(one), losses(run), atol=1e-5), run


def child_pids(parent):
    """{RANK: pid} of the processes whose parent is `parent` (torchrun's workers)."""
    found = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[1]) != parent:
                continue
            env = open(f"/proc/{pid}/environ", "rb").read().decode(errors="replace").split("\0")
            found[int(dict(kv.split("=", 1) for kv in env if "=" in kv)["RANK"])] = int(pid)
        except (OSError, KeyError, ValueError, IndexError):
            pass
    return found


def test_a_rank_killed_mid_training_restarts_from_last_checkpoint_identically(ddp_run, tmp_path):
    """torchrun --max-restarts=1, rank 1 SIGKILLed between the step-4 and step-6 checkpoints: the
    group restarts, resumes from last.pt and ends with the uninterrupted run's weights. The test
    paces rank 0: metrics.jsonl is a FIFO that rank 0 opens for each record (--log-every 1) and the
    test reads; after step 5's record (so after the step-4 checkpoint) it stops reading, which holds
    rank 0 at step 6's record, before the step-6 checkpoint, on any machine."""
    out = synthetic_run_dir(tmp_path / "killed")
    metrics = os.path.join(out, "metrics.jsonl")
    os.mkfifo(metrics)
    records = []
    held = threading.Event()
    go_on = threading.Event()
    finished = threading.Event()

    def read_records():  # one open of the FIFO per record rank 0 writes
        while not finished.is_set():
            with open(metrics) as f:
                records.extend(json.loads(line) for line in f)
            if records and records[-1].get("step") == 5 and not held.is_set():
                held.set()
                go_on.wait()
    reader = threading.Thread(target=read_records, daemon=True)
    reader.start()
    agent = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone",
                              "--nproc_per_node=2", "--max-restarts=1",
                              os.path.join(HERE, "train.py"),
                              *map(str, tiny_train_args(out, *DDP_ARGS))], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
    while not held.wait(timeout=0.05):
        assert agent.poll() is None, agent.communicate()[1][-2000:]
    assert weights(out)["step"] == 4  # rank 0 waits at step 6's record: no step-6 checkpoint yet
    workers = child_pids(agent.pid)
    os.kill(workers[1], signal.SIGKILL)
    while os.path.exists(f"/proc/{workers[0]}"):  # the agent stops rank 0 before it restarts both
        assert agent.poll() is None, agent.communicate()[1][-2000:]
        time.sleep(0.05)
    go_on.set()
    stdout, err = agent.communicate(timeout=600)
    finished.set()
    os.close(os.open(metrics, os.O_WRONLY | os.O_NONBLOCK))  # the reader's last open returns
    reader.join(timeout=10)
    assert agent.returncode == 0, err[-3000:]
    assert "resumed from" in stdout and "at step 4" in stdout, stdout[-3000:]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4, 5, 5, 6, 7, 8]
    assert not [f for f in os.listdir(out) if ".tmp" in f]
    a = weights(ddp_run)
    b = weights(out)
    assert a["step"] == b["step"] == 8
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k


def test_a_stalled_rank_makes_the_others_stop_after_the_timeout(tmp_path):
    """Two ranks started by hand (no torchrun agent to clean up): rank 1 is frozen (SIGSTOP)
    mid-training; rank 0 gives up at its next collective after --dist-timeout and exits with one
    line, not a hang."""
    out = synthetic_run_dir(tmp_path / "run")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in (0, 1):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port), "RANK": str(rank),
               "LOCAL_RANK": str(rank), "WORLD_SIZE": "2"}
        argv = tiny_train_args(out, "--steps", 100000, "--ckpt-every", 2, "--dist-timeout", 5)
        procs.append(subprocess.Popen([sys.executable, os.path.join(HERE, "train.py"),
                                       *map(str, argv)], env=env,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    try:
        while not os.path.exists(os.path.join(out, "last.pt")):  # training is under way
            assert procs[0].poll() is None, procs[0].communicate()[1][-2000:]
            time.sleep(0.01)
        os.kill(procs[1].pid, signal.SIGSTOP)
        _, err = procs[0].communicate(timeout=300)
    finally:
        for p in procs:
            p.kill()
            p.wait()
    lines = re.findall(r"error: [^\r\n]*", err)  # (the line may follow tqdm's bar)
    assert procs[0].returncode == 1, err[-2000:]
    assert len(lines) == 1, err[-2000:]
    assert "collective operation failed" in lines[0], err[-2000:]
    assert "Traceback" not in err


def test_a_training_step_leaves_no_autograd_history_on_the_ema_weights(tmp_path):
    """The EMA update runs without autograd: a graph chained through every step would grow without
    end."""
    out = synthetic_run_dir(tmp_path / "run")
    args = train.get_parser().parse_args(list(map(str, tiny_train_args(out))))
    data = torch.load(os.path.join(out, "tokens_train.pt"), weights_only=True)
    run = train.Run(train.model_config(args, data), args, torch.device("cpu"), 0, 1,
                    os.path.join(out, "tokenizer.pt"))
    before = [p.clone() for p in run.ema.parameters()]
    for _ in range(2):
        run.train_step([(data["tokens"][:8].long(), data["labels"][:8])],
                       torch.enable_grad(), torch.zeros(()))
    assert all(p.grad_fn is None and not p.requires_grad for p in run.ema.parameters())
    # the EMA did move
    assert any(not torch.equal(a, p) for a, p in zip(before, run.ema.parameters()))


def test_a_full_disk_during_a_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch):
    """The checkpoint's temporary file is made a link to /dev/full just before the write: every
    write fails with the kernel's ENOSPC, as on a full disk. last.pt stays the previous checkpoint,
    the temporary is gone, and the run stops with one line naming the file and the reason."""
    out = synthetic_run_dir(tmp_path / "run")
    args = list(map(str, tiny_train_args(out, "--ckpt-every", 2)))
    common.run(train.main, train.get_parser().parse_args(args + ["--steps", "2"]))
    before = open(os.path.join(out, "last.pt"), "rb").read()
    save_atomic = common.save_atomic

    def save_onto_a_full_disk(obj, path):
        os.symlink("/dev/full", common.temp_path(path))
        save_atomic(obj, path)
    monkeypatch.setattr(common, "save_atomic", save_onto_a_full_disk)
    with pytest.raises(SystemExit) as stop:
        common.run(train.main, train.get_parser().parse_args(args + ["--steps", "4"]))
    message = str(stop.value)
    assert f"cannot write {os.path.join(out, 'last.pt')}: No space left on device" in message
    assert "\n" not in str(stop.value) and not [f for f in os.listdir(out) if ".tmp" in f]
    assert open(os.path.join(out, "last.pt"), "rb").read() == before and weights(out)["step"] == 2


def test_a_second_run_in_the_same_folder_is_refused_and_a_stale_lock_taken_over(tmp_path):
    out = synthetic_run_dir(tmp_path / "run")
    argv = list(map(str, tiny_train_args(out, "--steps", 2)))
    holder = common.FolderLock(out, "--out-dir")  # another job holds the folder
    with pytest.raises(SystemExit) as stop:
        common.run(train.main, train.get_parser().parse_args(argv))
    assert f"--out-dir {out} is in use by pid {os.getpid()} on host" in str(stop.value), stop.value
    assert not os.path.exists(os.path.join(out, "last.pt"))
    holder.file.close()  # its process dies: the kernel drops the lock, the file stays behind
    assert "pid" in open(os.path.join(out, "lock")).read()
    common.run(train.main, train.get_parser().parse_args(argv))
    assert weights(out)["step"] == 2 and not os.path.exists(os.path.join(out, "lock"))


def test_tokenizer_stages_run_on_the_device_they_are_given(tmp_path, monkeypatch):
    """Tokenizer training and encoding receive the rank's device: every model move and every batch
    of pixels goes to it. ("cpu:0" stands for a GPU here: the same CPU, but a device no default
    would produce.)"""
    moves = []
    batches = []
    to = tok.VQModel.to

    def move(self, device):  # the model reports the device it was moved to, as a GPU model would
        moves.append(torch.device(device))
        self.moved_to = torch.device(device)
        return to(self, device)
    monkeypatch.setattr(tok.VQModel, "to", move)
    monkeypatch.setattr(tok.VQModel, "device", property(lambda self: self.moved_to))
    to_pixels = tok.to_pixels
    def recording_to_pixels(images, device=None):
        batches.append(device)
        return to_pixels(images, device)
    monkeypatch.setattr(tok, "to_pixels", recording_to_pixels)
    args = train.get_parser().parse_args(["--out-dir", str(tmp_path), "--limit", "64",
                                          "--tokenizer-steps", "2"])
    args.workers = 0
    token_cache.prepare_tokens(args, 0, 1, torch.device("cpu", 0))
    # training, then encoding of two splits
    assert len(moves) == 3 and set(moves) == {torch.device("cpu", 0)}
    assert len(batches) >= 4 and set(batches) == {torch.device("cpu", 0)}


def test_encoding_with_loader_workers_gives_the_same_tokens(tmp_path):
    write_images(tmp_path, n=5, size=(20, 18))
    dataset, _ = image_data.open_dataset(str(tmp_path), "train", image_size=16)
    torch.manual_seed(0)
    vq = tok.VQModel(tok.VQConfig(**{**asdict(tok.PRESETS["demo"]), "in_channels": 3})).eval()
    a, a_labels, _ = token_cache.encode_dataset(vq, dataset, batch_size=4, workers=0)
    b, b_labels, _ = token_cache.encode_dataset(vq, dataset, batch_size=4, workers=2)
    assert torch.equal(a, b) and torch.equal(a_labels, b_labels) and a.shape == (10, 16)


def kill_when(cmd, condition):
    """Start cmd, SIGKILL it as soon as condition() holds; True if it was killed (not finished
    first)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while proc.poll() is None and not condition():
        time.sleep(0.005)
    proc.kill()
    return proc.wait() == -signal.SIGKILL


def assert_same_weights(a, b):
    assert a["step"] == b["step"]
    for part in ("model", "ema"):
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)


def test_resume_after_sigkill_is_exact(tmp_path):
    straight = synthetic_run_dir(tmp_path / "straight")
    killed = synthetic_run_dir(tmp_path / "killed")
    args = ["--steps", 30, "--ckpt-every", 5]  # random order and dropout: RNG state matters
    assert cli("train.py", *tiny_train_args(straight, *args)) is None
    cmd = [sys.executable, os.path.join(HERE, "train.py"),
           *map(str, tiny_train_args(killed, *args))]
    metrics = os.path.join(killed, "metrics.jsonl")
    assert kill_when(cmd, lambda: os.path.exists(metrics) and sum(1 for _ in open(metrics)) >= 12)
    assert weights(killed)["step"] < 30
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0 and "resumed from" in r.stdout, r.stderr[-2000:]
    assert_same_weights(weights(straight), weights(killed))


def test_resume_is_exact_after_a_kill_at_every_stage(fashion_run, tmp_path):
    """One run killed between and inside the stages (tokenizer, encoding, first checkpoint,
    training), rerun after each kill: it ends with the weights of the uninterrupted run
    (fashion_run), bit for bit."""
    command = fashion_command
    out = tmp_path / "killed"
    stages = {"after the tokenizer": lambda: (out / "tokenizer.pt").exists(),
              "during encoding": lambda: (out / "tokens_train.pt").exists(),
              "before the first checkpoint": lambda: (out / "tokens_test.pt").exists(),
              "during training": lambda: (out / "metrics.jsonl").exists()
              and len((out / "metrics.jsonl").read_text()) > 200}
    for name, reached in stages.items():
        assert kill_when(command(out), reached), f"finished before the kill {name}"
    r = subprocess.run(command(out), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert_same_weights(weights(fashion_run), weights(out))


def test_sigkill_during_checkpoint_write_keeps_previous(tmp_path):
    """A real SIGKILL in the middle of writing last.pt: the old file stays loadable, and the next
    run of train.py in the folder removes the dead process's temporary file."""
    out = synthetic_run_dir(tmp_path / "run")
    assert cli("train.py", *tiny_train_args(out, "--steps", 2)) is None
    before = weights(out)
    # 256 MB: a long write
    writer = ("import torch, common; big = {'model': torch.randn(64, 1 << 20)}; "
              f"common.save_atomic(big, {os.path.join(out, 'last.pt')!r})")
    cmd = [sys.executable, "-c", writer]
    def temporaries():
        return [f for f in os.listdir(out) if ".tmp" in f]

    def mid_write():  # a temporary with at least 1 MB written
        found = temporaries()
        return found and os.path.getsize(os.path.join(out, found[0])) >= (1 << 20)
    proc = subprocess.Popen(cmd, cwd=HERE)
    while proc.poll() is None and not mid_write():
        time.sleep(0.001)
    proc.kill()
    proc.wait()
    assert temporaries(), "the kill landed outside a write"
    assert weights(out)["step"] == before["step"]  # still the old, complete file
    assert cli("train.py", *tiny_train_args(out, "--steps", 2)) is None and not temporaries()


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    out = synthetic_run_dir(tmp_path / "nan")
    assert cli("train.py", *tiny_train_args(out, "--steps", 4, "--ckpt-every", 2)) is None
    before = open(os.path.join(out, "last.pt"), "rb").read()
    message = cli("train.py", *tiny_train_args(out, "--steps", 8, "--ckpt-every", 2, "--lr", "inf"))
    assert "non-finite loss" in message and "by step 6" in message, message
    assert open(os.path.join(out, "last.pt"), "rb").read() == before


def test_token_cache_made_with_another_tokenizer_is_refused(tmp_path):
    out = synthetic_run_dir(tmp_path / "run")
    # new random weights
    other = tok.VQModel(tok.VQConfig(**{**asdict(tok.PRESETS["demo"]), "codebook_size": 32}))
    save_tokenizer(other, os.path.join(out, "tokenizer.pt"))
    message = cli("train.py", *tiny_train_args(out, "--steps", 2))
    assert "was encoded from" in message and "'tokenizer'" in message, message
    assert not os.path.exists(os.path.join(out, "last.pt"))


def fashion_command(out):
    """A small run on real data through every stage, in seconds (the end-to-end and kill tests)."""
    return [sys.executable, os.path.join(HERE, "train.py"), "--out-dir", str(out), "--limit", "256",
            "--tokenizer-steps", "4", "--steps", "8", "--batch-size", "16", "--preset", "tiny",
            "--val-limit", "32", "--ckpt-every", "2", "--eval-every", "4", "--samples-per-class",
            "2", "--log-every", "1"]


@pytest.fixture(scope="module")
def fashion_run(tmp_path_factory):
    """fashion_command's run, in this process (the kill test's reruns are child processes)."""
    out = tmp_path_factory.mktemp("fashion") / "run"
    assert cli("train.py", *fashion_command(out)[2:]) is None
    return str(out)


def test_train_end_to_end_on_real_fashion_mnist(fashion_run):
    out = fashion_run
    for f in ("tokenizer.pt", "tokens_train.pt", "tokens_test.pt", "last.pt",
              "samples.png", "metrics.jsonl"):
        assert os.path.exists(os.path.join(out, f)), f
    grid = Image.open(os.path.join(out, "samples.png"))
    # 2 per class x 10 classes, shown at 2x, 2 px gaps, after a column of class names (6 px a
    # character of the longest, "T-shirt/top", and 8)
    assert grid.size == (6 * 11 + 8 + 2 * (64 + 2), 10 * (64 + 2))
    names = np.asarray(grid.convert("L"))[:, :6 * 11 + 8]
    assert all(names[r * 66:(r + 1) * 66].min() < 100 for r in range(10))  # each row is named
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert [r["step"] for r in rows if "val_loss" in r] == [4, 8]
    ckpt = weights(out)
    model = RandAR(RandARConfig.from_dict(ckpt["config"]))
    model.load_state_dict(ckpt["model"], strict=True)
    assert model.config.block_size == 64 and model.config.vocab_size == 512
    # other data, same folder
    message = cli("train.py", "--out-dir", out, "--limit", 128, "--steps", 8, "--preset", "tiny")
    assert "was encoded from" in message, message


def test_miniature_imagenet_through_torchrun(tmp_path):
    """The paper-scale path in miniature: 1000 classes of RGB images, 2 processes for training
    (tokenizer, rank-split encoding, DDP) and for sampling; the npz does not depend on the number of
    processes (eval_fid reads such an npz against an ADM batch in its own tests)."""
    data = tmp_path / "imagenet"
    rng = np.random.default_rng(0)
    for c in range(1000):
        (data / f"n{c:05d}").mkdir(parents=True)
        for i in range(2):
            Image.fromarray(rng.integers(0, 255, (20, 18, 3),
                                         dtype=np.uint8)).save(data / f"n{c:05d}" / f"{i}.png")
    out = str(tmp_path / "run")
    r = torchrun("train.py", "--data", data, "--image-size", 16, "--out-dir", out, "--preset",
                 "tiny", "--tokenizer-steps", 3, "--steps", 2, "--batch-size", 8, "--val-limit", 32,
                 "--samples-per-class", 1)
    assert r.returncode == 0, r.stderr[-3000:]
    tokens = torch.load(os.path.join(out, "tokens_train.pt"), weights_only=True)
    assert tokens["tokens"].shape == (2000, 16)
    assert tokens["labels"].tolist() == [c for c in range(1000) for _ in (0, 1)]
    # the per-rank parts were joined and removed
    assert not [f for f in os.listdir(out) if ".part" in f]
    # 10 of 1000 classes, named by their folders ("n00000": 6 px a character, and 8)
    size = Image.open(os.path.join(out, "samples.png")).size
    assert size == (6 * 6 + 8 + 1 * (32 + 2), 10 * (32 + 2))
    classes = list(range(0, 1000, 4))  # a label range as wide as ImageNet's, 250 images
    sample_args = ["grid", "--ckpt", os.path.join(out, "last.pt"), "--per-class", 1, "--steps", 5,
                   "--batch-size", 16, "--seed", 3, "--classes", ",".join(map(str, classes))]
    r = torchrun("sample.py", *sample_args, "--out-npz", tmp_path / "two.npz")
    assert r.returncode == 0, r.stderr[-3000:]
    assert cli("sample.py", *sample_args, "--out-npz", tmp_path / "one.npz") is None
    one = np.load(tmp_path / "one.npz")
    two = np.load(tmp_path / "two.npz")
    assert two["arr_0"].shape == (250, 16, 16, 3) and two["arr_1"].tolist() == classes
    assert np.array_equal(one["arr_0"], two["arr_0"])
    assert len(np.unique(two["arr_0"].reshape(250, -1), axis=0)) > 225


# The release YAML's structure (configs/randar/randar_l_0.3b_llamagen.yaml of the reference): its
# training settings, and a model the size of the L release.
RELEASE_YAML = """\
accelerator:
  gradient_accumulation_steps: 1 # to support global_batch_size=1024
  mixed_precision: bf16
optimizer:
  lr: {lr}
  weight_decay: 0.05
  beta1: 0.9
  beta2: 0.95
  max_grad_norm: 1.0
  skip_grad_iter: {skip_iter}
  skip_grad_norm: 10
lr_scheduler:
  type: cosine
  warm_up_iters: {warmup}
  min_lr_ratio: 0.05
  num_cycles: 0.5
max_iters: {iters}
global_batch_size: {batch}
ema: False
vq_ckpt: vq_ds16_c2i.pt
ar_model:
  target: RandAR.model.randar_gpt.RandARTransformer
  params:
    n_layer: {n_layer}
    n_head: {n_head}
    dim: {dim}
    multiple_of: {multiple_of}
    model_type: c2i
    vocab_size: {vocab}
    block_size: {tokens}
    num_classes: {classes}
    cls_token_num: 1
    resid_dropout_p: 0.1
    ffn_dropout_p: 0.1
    token_dropout_p: 0.1
    drop_path_rate: 0.0
    position_order: random
    num_inference_steps: 88
"""
L_RELEASE = dict(lr=0.0004, skip_iter=100, warmup=50000, iters=360000, batch=1024, n_layer=24,
                 n_head=16, dim=1024, multiple_of=256, vocab=16384, tokens=256, classes=1000)


@pytest.fixture(scope="module")
def recipe_fx():
    """ADM's centre crop and the reference scheduler's multipliers (fixtures/recipe_fixture.pt)."""
    return torch.load(os.path.join(FIXTURES, "recipe_fixture.pt"), weights_only=True)


def test_adm_centre_crop_matches_reference(recipe_fx):
    for case in recipe_fx["crops"]:  # the last three take the halving path
        out = image_data.center_crop_adm(Image.fromarray(case["input"].numpy()), case["size"])
        assert np.array_equal(out, case["output"].numpy()), tuple(case["input"].shape)


def test_a_release_yaml_gives_the_release_recipe_and_flags_override_it(recipe_fx, tmp_path):
    """`train.py --config` on the L release's YAML: 360k steps, global batch 1024, no EMA, the
    gradient-skip rule, and the reference scheduler's multipliers at its sample iterations (within
    1e-12)."""
    path = tmp_path / "randar_l_0.3b_llamagen.yaml"
    path.write_text(RELEASE_YAML.format(**L_RELEASE))
    args = train.parse_args(["--config", str(path)])
    assert (args.steps, args.global_batch_size, args.ema, args.lr,
            args.grad_accum) == (360000, 1024, 0, 4e-4, 1)
    assert (args.skip_grad_norm, args.skip_grad_from, args.clip,
            args.weight_decay) == (10, 100, 1.0, 0.05)
    ref = recipe_fx["lr_release"]
    assert (args.warmup_steps, args.min_lr_ratio, args.steps) == (ref["warmup"],
                                                                  ref["min_lr_ratio"], ref["total"])
    for i, multiplier in zip(ref["iterations"], ref["multipliers"]):
        assert abs(train.learning_rate(i, args) / args.lr - multiplier) <= 1e-12, i
    release.resolve_batch_size(args, world=8)
    assert args.batch_size == 128
    args = train.parse_args(["--config", str(path), "--steps", "10",
                             "--batch-size", "4", "--ema", "0.99"])
    assert (args.steps, args.global_batch_size, args.batch_size, args.ema) == (10, None, 4, 0.99)
    config = randar.RandARConfig.from_dict(release.read_official_yaml(path))
    assert asdict(config) == asdict(randar.PRESETS["L"])
    path.write_text(RELEASE_YAML.format(**L_RELEASE).replace("type: cosine", "type: constant"))
    assert "lr_scheduler.type is 'constant'" in cli("train.py", "--config", path)
    path.write_text(RELEASE_YAML.format(**{**L_RELEASE, "iters": -5}))
    message = cli("train.py", "--config", path)
    assert str(path) in message and "--steps" in message and "'-5'" in message


def test_the_release_recipe_in_miniature(recipe_fx, tmp_path):
    """The README's ImageNet command with a release YAML's structure and small numbers: a synthetic
    ImageFolder (ADM crops, codes of each image and of its mirror image), a tiny model from the
    YAML, no EMA, and the reference scheduler's multipliers logged at every step."""
    rng = np.random.default_rng(0)
    for c in range(4):
        # the first is halved before the resize
        for i, size in enumerate([(40, 34), (20, 24), (16, 19)] * 2):
            (tmp_path / "data" / f"n{c}").mkdir(parents=True, exist_ok=True)
            pixels = rng.integers(0, 255, (*size, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / "data" / f"n{c}" / f"{i}.png")
    mini = dict(lr=0.003, skip_iter=5, warmup=10, iters=100, batch=8, n_layer=2, n_head=4, dim=64,
                multiple_of=32, vocab=512, tokens=16, classes=4)
    (tmp_path / "mini.yaml").write_text(RELEASE_YAML.format(**mini))
    out = tmp_path / "run"
    assert cli("train.py", "--config", tmp_path / "mini.yaml", "--data", tmp_path / "data",
               "--image-size", 16, "--out-dir", out, "--tokenizer-steps", 3,
               "--tokenizer-batch-size", 8, "--log-every", 1, "--samples-per-class", 1,
               "--val-limit", 8) is None
    ckpt = weights(out)
    assert ckpt["step"] == 100 and "ema" not in ckpt and ckpt["args"]["batch_size"] == 8
    yaml_config = release.read_official_yaml(tmp_path / "mini.yaml")
    assert RandARConfig.from_dict(ckpt["config"]) == RandARConfig.from_dict(yaml_config)
    lrs = [r["lr"] for r in map(json.loads, open(out / "metrics.jsonl")) if "lr" in r]
    expected = [0.003 * m for m in recipe_fx["lr_miniature"]["multipliers"][:100]]
    assert len(lrs) == 100 and max(abs(a - b) for a, b in zip(lrs, expected)) <= 1e-15
    cache = torch.load(out / "tokens_train.pt", weights_only=True)
    assert cache["tokens"].shape == cache["tokens_flipped"].shape == (24, 16)
    assert "tokens_flipped" not in torch.load(out / "tokens_test.pt", weights_only=True)
    vq = tok.load_tokenizer(out / "tokenizer.pt")
    image = image_data.open_dataset(str(tmp_path / "data"), "train", image_size=16)[0][0][0]
    assert torch.equal(vq.encode_images(image[None].flip(-1)).flatten(),
                       cache["tokens_flipped"][0].long())


def test_flip_coins_depend_on_seed_and_epoch_alone():
    cache = {"tokens": torch.zeros(1000, 4, dtype=torch.int16),
             "tokens_flipped": torch.ones(1000, 4, dtype=torch.int16)}
    coins = token_cache.flip_coins(cache, seed=0, epoch=3)
    assert torch.equal(coins,
                       token_cache.flip_coins(cache, seed=0, epoch=3)) and 400 < coins.sum() < 600
    assert not torch.equal(coins, token_cache.flip_coins(cache, seed=0, epoch=4))
    indices = torch.tensor([5, 7, 900])
    assert torch.equal(token_cache.batch_tokens(cache, indices, coins)[:, 0], coins[indices].long())
    assert token_cache.flip_coins({"tokens": cache["tokens"]}, 0, 3) is None


def test_the_gradient_skip_rule_stops_updates_from_its_step_on(tmp_path):
    """Threshold ~0 from step 3: steps 0-2 update, every later step is skipped (the weights and the
    optimizer stay as they were), and the count survives a resume."""
    out = synthetic_run_dir(tmp_path / "run")
    rule = ["--skip-grad-norm", 1e-9, "--skip-grad-from", 3]
    assert cli("train.py", *tiny_train_args(out, "--steps", 3, *rule)) is None
    before = weights(out)
    assert cli("train.py", *tiny_train_args(out, "--steps", 6, *rule)) is None
    after = weights(out)
    assert (before["skipped_steps"], after["skipped_steps"], after["step"]) == (0, 3, 6)
    assert all(torch.equal(before["model"][k], after["model"][k]) for k in before["model"])
    first = before["optimizer"]["state"][0]
    assert torch.equal(first["exp_avg"], after["optimizer"]["state"][0]["exp_avg"])


def test_the_learning_rate_follows_its_closed_form_and_the_log_shows_it(ddp_run):
    """Warm-up (i + 1)/W, or i/W for the releases' --warmup-from-zero, then a half cosine from lr to
    min_lr_ratio·lr at the last step; the lr each record logs is the one of its update (record
    step s: update s − 1)."""
    args = argparse.Namespace(lr=1e-3, warmup_steps=10, steps=110, min_lr_ratio=0.1,
                              warmup_from_zero=False)
    cosine = {10: 1.0, 35: (1 + math.sqrt(0.5)) / 2, 60: 0.5, 85: (1 - math.sqrt(0.5)) / 2, 110: 0}
    expected = {0: 1e-4, 4: 5e-4, 9: 1e-3}
    expected.update({i: 1e-3 * (0.1 + 0.9 * c) for i, c in cosine.items()})
    for step, lr in expected.items():
        assert abs(train.learning_rate(step, args) - lr) < 1e-15, step
    args.warmup_from_zero = True
    assert [train.learning_rate(i, args) for i in (0, 5, 10)] == [0.0, 5e-4, 1e-3]
    logged = [json.loads(line) for line in open(os.path.join(ddp_run, "metrics.jsonl"))]
    logged = {r["step"]: r["lr"] for r in logged if "lr" in r}
    assert sorted(logged) == list(range(1, 9))
    for step, lr in logged.items():  # DDP_ARGS: lr 3e-3, warm-up 2, 8 steps, min_lr_ratio 0.1
        update = step - 1
        if update < 2:
            closed = 3e-3 * (update + 1) / 2
        else:
            closed = 3e-3 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (update - 2) / 6)))
        assert abs(lr - closed) < 1e-15, (step, lr, closed)


def test_one_ema_update_is_the_closed_form_and_ema_0_keeps_none(tmp_path):
    """ema ← d·ema + (1 − d)·model with d = min(--ema, (1 + t)/(10 + t)); --ema 0: no EMA, none in
    the checkpoint; load_model returns the EMA weights when a checkpoint has them."""
    model = random_gpt(seed=1)
    ema = random_gpt(seed=2)
    for step, decay in ((5, 6 / 15), (100_000, 0.999)):
        before = [p.clone() for p in ema.parameters()]
        args = argparse.Namespace(ema=0.999)
        run = argparse.Namespace(model=model, ema=ema, step=step, args=args)
        train.Run.update_ema(run)
        for old, new, target in zip(before, ema.parameters(), model.parameters()):
            assert (new - (decay * old + (1 - decay) * target)).abs().max() < 1e-6
    args = train.get_parser().parse_args(["--ema", "0", "--out-dir", str(tmp_path)])
    run = train.Run(RandARConfig(**TINY), args, torch.device("cpu"), 0, 1, "tokenizer.pt")
    assert run.ema is None
    run.save()
    ckpt = torch.load(tmp_path / "last.pt", weights_only=True)
    assert "ema" not in ckpt
    ckpt["ema"] = random_gpt(seed=3).state_dict()
    torch.save(ckpt, tmp_path / "with_ema.pt")
    loaded = randar.load_model(str(tmp_path / "with_ema.pt"))[0]
    for name, p in loaded.state_dict().items():
        assert torch.equal(p, ckpt["ema"][name]), name


# ---- sampling and the FID protocol (sample.py) ---------------------------------------------------

@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A RandAR checkpoint trained for 2 steps on synthetic 4x4 tokens, with a random demo
    tokenizer."""
    out = synthetic_run_dir(tmp_path_factory.mktemp("run"))
    assert cli("train.py", *tiny_train_args(out, "--steps", 2)) is None
    return out


def test_sample_command_writes_png_and_npz_and_a_seed_fixes_them(tiny_run, tmp_path):
    """`python sample.py` (the script's smoke run) and the same command in this process: one seed,
    one result."""
    argv = ["--ckpt", os.path.join(tiny_run, "last.pt"), "--classes", "1,3", "--per-class", 3,
            "--seed", 7, "--steps", 5]
    r = run("sample.py", *argv, "--out", tmp_path / "a.png", "--out-npz", tmp_path / "a.npz")
    assert r.returncode == 0, r.stderr[-2000:]
    assert cli("sample.py", *argv, "--out", tmp_path / "b.png", "--out-npz",
               tmp_path / "b.npz") is None
    outs = [np.load(tmp_path / f"{name}.npz") for name in ("a", "b")]
    a, b = outs
    # 4x4 tokens x downsample 4
    assert a["arr_0"].dtype == np.uint8 and a["arr_0"].shape == (6, 16, 16, 1)
    assert a["arr_1"].tolist() == [1, 1, 1, 3, 3, 3]
    assert np.array_equal(a["arr_0"], b["arr_0"]) and a["arr_0"].std() > 0
    # 4x upscaled by default, after the class names ("trouser", "dress": 6 px a character, and 8)
    assert Image.open(tmp_path / "a.png").size == (6 * 7 + 8 + 3 * (4 * 16 + 2), 2 * (4 * 16 + 2))


def test_sampling_killed_during_assembly_resumes_to_the_same_bytes(tiny_run, tmp_path, capsys):
    """The FID sampler writes each chunk as it is made; a SIGKILL during the final assembly (held
    there: one chunk file is a FIFO, whose open blocks) leaves the other chunks, which the rerun of
    the same command reuses, making only the missing one; the npz is byte-identical to an
    uninterrupted run's. Parts made with other settings are refused; a parts folder in use by
    another job is refused."""
    argv = ["grid", "--ckpt", os.path.join(tiny_run, "last.pt"), "--classes", "1,3", "--per-class",
            "5", "--batch-size", "2", "--steps", "5", "--seed", "2"]
    common.run(sample.main, sample.parse(argv + ["--out-npz", str(tmp_path / "straight.npz")]))
    out = tmp_path / "resumed.npz"
    parts = tmp_path / "resumed.npz.parts"
    os.makedirs(parts)
    os.mkfifo(parts / "chunk_00002.npz")  # "already made": skipped by sampling, blocks the assembly
    proc = subprocess.Popen([sys.executable, os.path.join(HERE, "sample.py"), *argv, "--out-npz",
                             str(out)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    # opened before the chunks are read; the FIFO,
    assembling = tmp_path / f"resumed.tmp{proc.pid}.npz"
    while not assembling.exists():  # which no one writes, then holds the assembly until the kill
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        time.sleep(0.01)
    proc.kill()
    proc.wait()
    os.remove(parts / "chunk_00002.npz")
    assert not out.exists() and sorted(f for f in os.listdir(parts) if f.startswith("chunk_0")) == \
        [f"chunk_0000{c}.npz" for c in (0, 1, 3, 4)]
    assert [f for f in os.listdir(tmp_path) if ".tmp" in f]  # the killed assembly's temporary npz
    with pytest.raises(SystemExit) as stop:  # other settings: refused, nothing touched
        common.run(sample.main, sample.parse(argv + ["--out-npz", str(out), "--cfg", "1,3"]))
    assert "made with --cfg = [1.0, 4.0], not [1.0, 3.0]" in str(stop.value), stop.value
    holder = common.FolderLock(str(parts), "parts folder")  # another job at work on the same parts
    with pytest.raises(SystemExit) as stop:
        common.run(sample.main, sample.parse(argv + ["--out-npz", str(out)]))
    # 4 chunks, settings, lock
    assert "is in use by pid" in str(stop.value) and len(os.listdir(parts)) == 6, stop.value
    holder.release()
    capsys.readouterr()
    common.run(sample.main, sample.parse(argv + ["--out-npz", str(out)]))
    assert "4 of 5 chunks already on disk, 1 to make" in capsys.readouterr().out
    assert out.read_bytes() == (tmp_path / "straight.npz").read_bytes()
    assert not parts.exists() and not [f for f in os.listdir(tmp_path) if ".tmp" in f]
    assert np.load(out)["arr_1"].tolist() == [1] * 5 + [3] * 5


def test_assembly_holds_one_chunk_at_a_time(tmp_path):
    """40 chunks of 100 RGB 32x32 images (12 MB in all) -> one npz, with a peak of traced memory
    under a tenth of that; the result equals the chunks concatenated."""
    import tracemalloc
    rng = np.random.default_rng(0)
    chunks = [rng.integers(0, 255, (100, 32, 32, 3), dtype=np.uint8) for _ in range(40)]
    for c, images in enumerate(chunks):
        common.save_atomic_npz(sampling.chunk_path(str(tmp_path), c), images=images)
    labels = torch.arange(4000) % 10
    whole = np.concatenate(chunks)
    del chunks
    tracemalloc.start()
    sampling.assemble(str(tmp_path), 40, labels, str(tmp_path / "all.npz"))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < whole.nbytes / 10, peak
    assert np.array_equal(np.load(tmp_path / "all.npz")["arr_0"], whole)
    assert np.array_equal(np.load(tmp_path / "all.npz")["arr_1"], labels.numpy())


def test_npz_images_are_read_memory_mapped_and_unchanged(tmp_path):
    images = np.random.default_rng(0).integers(0, 255, (7, 9, 8, 3), dtype=np.uint8)
    common.save_atomic_npz(tmp_path / "ours.npz", arr_0=images)
    np.savez(tmp_path / "numpy.npz", arr_0=images)
    np.savez_compressed(tmp_path / "compressed.npz", arr_0=images)
    for name, mapped in (("ours", True), ("numpy", True), ("compressed", False)):
        read = eval_fid.load_images(str(tmp_path / f"{name}.npz"))
        assert isinstance(read, np.memmap) == mapped and np.array_equal(read, images), name


def test_sample_figures_and_animation_have_their_layout(tiny_run, tmp_path):
    ckpt = os.path.join(tiny_run, "last.pt")
    Image.fromarray(np.random.randint(0, 255, (16, 16), dtype=np.uint8)).save(tmp_path / "in.png")
    outpaint = [tmp_path / "in.png", "--sides", "right,top", "--results", 2, "--edit-class", 5]
    for command, extra, size in [("compare", ["--classes", "0,1"], (56 + 2 * 66, 6 * 66)),
                                 ("outpaint", outpaint, (5 * 66, 12 + 66))]:
        out = tmp_path / f"{command}.png"
        assert cli("sample.py", command, "--ckpt", ckpt, "--out", out, *extra) is None
        assert Image.open(out).size == size, command
    assert cli("sample.py", "animate", "--ckpt", ckpt, "--class", 3, "--out",
               tmp_path / "a.gif") is None
    gif = Image.open(tmp_path / "a.gif")
    # raster and random take 16 steps, parallel 6 (= 16 * 88 / 256) and 4: the longest panel sets
    # the length
    # image_grid's layout: 2 px apart, a label line
    assert gif.n_frames == 16 and gif.size == (4 * 66, 12 + 66)
    gif.seek(0)
    first = np.asarray(gif.convert("L"))[12:]
    assert (first == 128).mean() > 0.8  # one token decoded per panel, the rest grey
    gif.seek(gif.n_frames - 1)
    assert (np.asarray(gif.convert("L"))[12:] == 128).mean() < 0.5


def test_sample_command_line_errors_are_one_line_and_write_nothing(tiny_run, tmp_path):
    ckpt = os.path.join(tiny_run, "last.pt")
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(tmp_path / "img.png")
    Image.fromarray(np.zeros((20, 20), np.uint8)).save(tmp_path / "mask20.png")
    Image.fromarray(np.zeros((24, 24), np.uint8)).save(tmp_path / "img24.png")
    (tmp_path / "text.png").write_text("not an image")
    # (more bad files: the table test below)
    cases = [(["--ckpt", tmp_path / "none.pt"], "not found"),
             (["--classes", "10"], "class 10"),
             (["--per-class", 0], "--per-class"),
             (["--steps", 17], "--steps"),
             # a flag that would be ignored is refused
             (["compare", "--order", "raster"], "--order"),
             (["inpaint", tmp_path / "img.png", "--mask", tmp_path / "mask20.png",
               "--edit-class", 1], "mask"),
             (["inpaint", tmp_path / "img24.png", "--mask", "0,0,4,4", "--edit-class", 1],
              "16x16"),
             (["inpaint", tmp_path / "text.png", "--mask", "0,0,4,4", "--edit-class", 1],
              "text.png"),
             (["inpaint", tmp_path / "img.png", "--mask", "0,0,4,4"], "--edit-class"),
             (["--cfg", "3"], "--cfg"),
             (["--ckpt", os.path.join(tiny_run, "tokenizer.pt")], "is a tokenizer checkpoint")]
    for argv, msg in cases:
        out = tmp_path / "out.png"
        command = [argv[0]] if argv[0] in sample.COMMANDS else []
        message = cli("sample.py", *command, *(["--ckpt", ckpt] if "--ckpt" not in argv else []),
                      *argv[len(command):], "--out", out)
        assert message and msg in message, (argv, message)
        assert not out.exists()


def test_sample_runs_on_the_official_checkpoint_format(tiny_run, tmp_path, capsys):
    """A user's command on released-format weights (.safetensors + YAML), with a tokenizer of the
    same vocabulary."""
    official = ["--ckpt", os.path.join(FIXTURES, "randar_tiny_official.safetensors"), "--config",
                os.path.join(FIXTURES, "randar_tiny_official.yaml"), "--vq-ckpt",
                os.path.join(tiny_run, "tokenizer.pt")]
    assert cli("sample.py", "grid", *official, "--per-class", 2, "--steps", 6, "--out",
               tmp_path / "g.png", "--out-npz", tmp_path / "g.npz") is None
    assert np.load(tmp_path / "g.npz")["arr_0"].shape == (20, 16, 16, 1)
    capsys.readouterr()
    assert cli("sample.py", "bench", *official[:4], "--bench-batch", 2, "--repeats",
               1, "--sizes", 16) is None
    assert "64-wide, 2 layers" in capsys.readouterr().out


def test_bench_measures_every_size_batch_and_decoding(capsys):
    """Random weights of a preset; the model's own N = 16 and N = 64 on an extrapolation grid; one
    row per (size, batch, decoding) with the paper's 88-of-256 step ratio (timings: the command's
    business, not a test's)."""
    common.run(sample.main,
               sample.parse(["bench", "--preset", "tiny", "--sizes", "16,64", "--bench-batch", "2",
                             "--repeats", "1", "--device", "cpu"]))
    out = capsys.readouterr().out
    rows = [[c.strip() for c in line.split("|")[1:-1]] for line in out.splitlines()
            if re.match(r"\| \d+ \|", line)]
    assert [(int(n), int(b), d, int(s)) for n, b, d, s, *_ in rows] == [
        (N, batch, f"eager, {kind}", steps) for N in (16, 64) for batch in (1, 2)
        for kind, steps in (("1 token/step", N), ("parallel", round(N * 88 / 256)))]
    assert all(float(ms) > 0 for *_, ms, _ in rows)


def loaded(command, *argv):
    """sample.py's args, model and tokenizer for a command, as main() sets them up."""
    args = sample.parse([command, *map(str, argv)])
    sample.setup(args)
    model, vq = sample.load_run(args)
    return args, model, vq


def test_editing_keeps_the_input_where_it_should(tiny_run, tmp_path):
    """inpaint: the known tokens are the input's own codes outside the mask, and the results keep
    them; outpaint: the kept part moves away from the new side by --extend pixels (the figure's
    third panel), the known tokens are the columns it covers; extrapolate: the base tokens sit at
    the even rows and columns of the doubled grid."""
    ckpt = os.path.join(tiny_run, "last.pt")
    image = np.random.default_rng(0).integers(0, 255, (16, 16), dtype=np.uint8)
    Image.fromarray(image).save(tmp_path / "in.png")
    args, model, vq = loaded("inpaint", tmp_path / "in.png", "--ckpt", ckpt, "--mask", "4,0,12,8",
                             "--edit-class", 3, "--results", 3, "--out", tmp_path / "i.png")
    tokens, (positions, known_tokens) = sample.edit(model, vq, args)
    masked = {1, 2, 5, 6}  # the box covers token columns 1-2 of token rows 0-1 (4 px a token)
    assert positions[0].tolist() == [p for p in range(16) if p not in masked]
    codes = vq.encode_images(torch.from_numpy(image)[None, None])[0].flatten()
    assert torch.equal(known_tokens[0], codes[positions[0]])
    assert torch.equal(tokens.gather(1, positions), known_tokens)
    args, model, vq = loaded("outpaint", tmp_path / "in.png", "--ckpt", ckpt, "--sides", "right",
                             "--extend", 4, "--edit-class", 5, "--results", 2, "--scale", 1,
                             "--out", tmp_path / "o.png")
    tokens, (positions, known_tokens) = sample.edit(model, vq, args)
    assert positions[0].tolist() == [p for p in range(16) if p % 4 != 3]
    assert torch.equal(tokens.gather(1, positions), known_tokens)
    kept = np.asarray(Image.open(tmp_path / "o.png"))[12:28, 2 * 18:2 * 18 + 16]  # third panel
    assert np.array_equal(kept[:, :12], image[:, 4:])  # moved 4 px left
    assert (kept[:, 12:] == 128).all()  # the new strip, shown grey
    args, model, vq = loaded("extrapolate", "--ckpt", ckpt, "--classes", 2, "--per-class", 2,
                             "--extrapolate-steps", 6, "--out", tmp_path / "e.png")
    base, big = sample.extrapolate(model, vq, args)
    assert Image.open(tmp_path / "e.png").size == (4 * 130, 12 + 130)  # base | extrapolated, x2
    assert big.shape == (2, 64)
    assert torch.equal(big.view(2, 8, 8)[:, ::2, ::2], base.view(2, 4, 4))


def test_compare_rows_are_the_decodings_they_name(tiny_run, tmp_path):
    """Row names give the decoding and its steps; the raster and random rows are what generate()
    makes with that order and the first chunk's seed."""
    args, model, vq = loaded("compare", "--ckpt", os.path.join(tiny_run, "last.pt"), "--classes",
                             "0,1", "--out", tmp_path / "c.png")
    names, tokens = sample.compare(model, vq, args)
    assert names == ["raster\n16 steps", "random\n16 steps", "parallel\n8 steps",
                     "parallel\n6 steps", "parallel\n4 steps", "parallel\n2 steps"]
    labels = torch.tensor([0, 1])
    for row, order in ((0, "raster"), (1, "random")):
        direct = generate(model, labels, order=order, steps=16, cfg_scale=args.cfg,
                          generator=torch.Generator().manual_seed(0))
        assert torch.equal(tokens[row], direct), order


def test_a_release_yaml_sets_the_default_number_of_steps(tiny_run, tmp_path, monkeypatch):
    """Without --steps, a release decodes in its YAML's num_inference_steps (6 in the tiny
    release's): every generate() call runs 6 steps; --steps 5 overrides it."""
    official = ["--ckpt", os.path.join(FIXTURES, "randar_tiny_official.safetensors"),
                "--config", os.path.join(FIXTURES, "randar_tiny_official.yaml"),
                "--vq-ckpt", os.path.join(tiny_run, "tokenizer.pt")]
    steps_run = []

    def counting_generate(*args, **kwargs):
        calls = []
        out = generate(*args, **kwargs, callback=lambda step, logits, new: calls.append(step))
        steps_run.append(len(calls))
        return out
    monkeypatch.setattr(sampling, "generate", counting_generate)
    for extra, steps in (([], 6), (["--steps", 5], 5)):
        steps_run.clear()
        args, model, vq = loaded("grid", *official, "--classes", "0,1", "--per-class", 1, *extra,
                                 "--out", tmp_path / "g.png")
        assert args.steps == steps
        sample.grid(model, vq, args)
        assert steps_run and set(steps_run) == {steps}, (extra, steps_run)


def test_sample_grids_name_their_rows(tmp_path):
    assert image_data.class_names("fashion-mnist", [0, 9]) == ["T-shirt/top", "ankle boot"]
    for folder in ("dog", "cat"):
        (tmp_path / folder).mkdir()
    assert image_data.class_names(str(tmp_path), [1, 0]) == ["dog", "cat"]
    assert image_data.class_names(None, [3, 250]) == ["class 3", "class 250"]
    names = [f"class {c}" for c in (0, 1)]
    grid = common.image_grid(torch.zeros(4, 1, 8, 8, dtype=torch.uint8) + 255, nrow=2,
                             row_labels=names)
    assert grid.size == (6 * 7 + 8 + 2 * 10, 2 * 10)
    assert np.asarray(grid)[:, :50].min() < 100  # the names are drawn (antialiased)


# ---- eval_fid.py: FID, precision / recall, the Fashion-MNIST scorer; the linear probe
# (docs/figures.py)

def test_frechet_distance_matches_the_closed_form():
    rng = np.random.default_rng(0)
    mu1 = rng.normal(size=5)
    mu2 = rng.normal(size=5)
    d1 = rng.uniform(0.5, 2, 5)
    d2 = rng.uniform(0.5, 2, 5)
    # diagonal covariances
    closed = ((mu1 - mu2) ** 2).sum() + (d1 + d2 - 2 * np.sqrt(d1 * d2)).sum()
    assert abs(eval_fid.frechet_distance(mu1, np.diag(d1), mu2,
                                         np.diag(d2)) - closed) < 1e-6 * closed
    a = rng.normal(size=(5, 5))
    b = rng.normal(size=(5, 5))
    s1 = a @ a.T + np.eye(5)
    s2 = b @ b.T + np.eye(5)
    # tr((S1 S2)^1/2) = tr((L^T S2 L)^1/2) for S1 = L L^T: a symmetric root
    r = np.linalg.cholesky(s1)
    w, v = np.linalg.eigh(r.T @ s2 @ r)
    closed = ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(w).sum()
    assert abs(eval_fid.frechet_distance(mu1, s1, mu2, s2) - closed) < 1e-6 * closed
    x = rng.normal(size=(50, 8))
    mu = x.mean(0)
    sigma = np.cov(x, rowvar=False)
    assert abs(eval_fid.frechet_distance(mu, sigma, mu, sigma)) < 1e-6
    singular = np.zeros((8, 8))  # rank-deficient: exact, not NaN
    assert np.isfinite(eval_fid.frechet_distance(mu, singular, mu, singular))


def test_precision_recall_and_inception_score_known_answers():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(200, 16))
    assert eval_fid.precision_recall(x, x) == (1.0, 1.0)
    assert eval_fid.precision_recall(x, x + 100.0) == (0.0, 0.0)
    assert abs(eval_fid.inception_score(np.zeros((100, 1008)))[0] - 1.0) < 1e-9
    confident = np.full((1000, 1008), -1e4)
    confident[np.arange(1000), np.arange(1000) % 10] = 1e4  # evenly spread over 10 classes
    mean, std = eval_fid.inception_score(confident)
    assert abs(mean - 10.0) < 1e-6 and std < 1e-6
    # Published split convention: 10 splits of N // 10 images, the remainder left out (N = 15: 10
    # splits of 1).
    logits = np.zeros((15, 1008))
    logits[10:, 0] = 50.0  # the last 5 images are in no split: every split holds one image, IS = 1
    assert abs(eval_fid.inception_score(logits)[0] - 1.0) < 1e-9
    with pytest.raises(ValueError, match="at least 10"):
        eval_fid.inception_score(logits[:9])


def test_precision_recall_in_chunks_equals_the_full_distance_matrix():
    rng = np.random.default_rng(2)
    real = torch.tensor(rng.normal(size=(700, 8)))
    fake = torch.tensor(rng.normal(size=(600, 8)) + 0.3)
    full_radii = torch.cdist(real, real).kthvalue(4, dim=1).values
    assert torch.allclose(eval_fid._radii(real, 3, batch=64), full_radii)
    inside = (torch.cdist(fake, real) <= full_radii[None]).any(1).double().mean().item()
    precision, recall = eval_fid.precision_recall(real, fake)
    assert precision == inside and 0.2 < precision < 1.0 and 0.2 < recall < 1.0


def test_inception_logits_leave_out_the_fc_bias():
    torch.manual_seed(0)
    model = inception.FIDInception().eval()
    with torch.no_grad():
        model.fc.bias.fill_(5.0)
        feats, logits = model(torch.randint(0, 255, (2, 3, 75, 75), dtype=torch.uint8))
    assert torch.allclose(logits, feats @ model.fc.weight.t())


def test_inception_layout_matches_pytorch_fid_weights():
    model = inception.FIDInception()
    sd = {k: tuple(v.shape) for k, v in model.state_dict().items()
          if not k.endswith("num_batches_tracked")}
    # torchvision's Inception3 (aux classifier dropped, 1008 classes), as pytorch-fid builds it:
    assert sum(p.numel() for p in model.parameters()) == 23_850_960
    assert sd["Conv2d_1a_3x3.conv.weight"] == (32, 3, 3,
                                               3) and sd["Conv2d_4a_3x3.bn.running_var"] == (192,)
    assert sd["Mixed_5b.branch_pool.conv.weight"] == (32, 192, 1, 1)
    assert sd["Mixed_6e.branch7x7dbl_5.conv.weight"] == (192, 192, 1, 7)
    assert sd["Mixed_7a.branch7x7x3_4.conv.weight"] == (192, 192, 3, 3)
    assert sd["Mixed_7c.branch3x3dbl_3b.conv.weight"] == (384, 384, 3, 1)
    assert sd["fc.weight"] == (1008,
                               2048) and len([k for k in sd if k.endswith(".conv.weight")]) == 94


def test_eval_fid_cli_on_two_npz_and_an_adm_batch(tmp_path, capsys):
    """`python eval_fid.py` (the script's smoke run) on an npz against itself: FID from the
    reference's images, and the output says so. Then ADM's protocol on a synthetic ADM batch: FID
    against its stored mu / sigma, precision and recall against its images."""
    torch.manual_seed(0)
    weights = str(tmp_path / "random_inception.pth")
    torch.save(inception.FIDInception().state_dict(), weights)
    images = np.random.default_rng(0).integers(0, 255, (4, 32, 32, 1), dtype=np.uint8)
    np.savez(tmp_path / "s.npz", arr_0=images, arr_1=np.arange(4))
    r = run("eval_fid.py", tmp_path / "s.npz", tmp_path / "s.npz", "--inception", weights, "--json",
            tmp_path / "m.json", "--batch-size", 4)
    assert r.returncode == 0, r.stderr[-2000:]
    m = json.load(open(tmp_path / "m.json"))
    assert abs(m["fid"]) < 1e-3
    assert m["precision"] == 1.0
    assert m["recall"] == 1.0
    assert "is_mean" not in m  # fewer images than the Inception Score's 10 splits: left out
    assert m["fid_statistics"] == "computed from the 4 images of s.npz"
    assert "stores no mu / sigma" in r.stdout
    feats = eval_fid.inception_outputs(inception.load_inception(weights), images)[0]
    mu = np.linspace(-1, 1, 2048)
    sigma = np.diag(np.linspace(0.5, 2, 2048))
    np.savez(tmp_path / "adm.npz", arr_0=images, mu=mu, sigma=sigma)
    assert cli("eval_fid.py", tmp_path / "s.npz", tmp_path / "adm.npz", "--inception", weights,
               "--json", tmp_path / "adm.json") is None
    adm = json.load(open(tmp_path / "adm.json"))
    expected = eval_fid.frechet_distance(feats.mean(0), np.cov(feats, rowvar=False), mu, sigma)
    # not the ~0 of its own images
    assert abs(adm["fid"] - expected) <= 1e-6 * expected and expected > 100
    assert adm["fid_statistics"] == "mu/sigma stored in adm.npz"
    assert adm["precision"] == 1.0 and adm["recall"] == 1.0  # the images: the samples' own
    np.savez(tmp_path / "half.npz", arr_0=images, mu=mu)
    assert "only one of 'mu' and 'sigma'" in cli("eval_fid.py", tmp_path / "s.npz",
                                                 tmp_path / "half.npz", "--inception", weights)


def test_inception_resize_is_tensorflows_legacy_bilinear():
    """fixtures/tf_resize_fixture.npz, made by TensorFlow's own op
    (fixtures/make_tf_resize_fixture.py): bit for bit; F.interpolate's half-pixel centres would be
    far off."""
    ref = np.load(os.path.join(FIXTURES, "tf_resize_fixture.npz"))
    for case in ("up", "down", "odd"):
        x = torch.from_numpy(ref[f"{case}_input"]).permute(0, 3, 1, 2).float()
        expected = torch.from_numpy(ref[f"{case}_output"]).permute(0, 3, 1, 2)
        assert torch.equal(inception.resize_like_tensorflow(x, expected.shape[2:]), expected), case
    x = torch.from_numpy(ref["up_input"]).permute(0, 3, 1, 2).float()
    half_pixel = torch.nn.functional.interpolate(x, size=(299, 299),
                                                 mode="bilinear", align_corners=False)
    assert (half_pixel - torch.from_numpy(ref["up_output"]).permute(0, 3, 1, 2)).abs().max() > 10


def test_eval_fid_command_line_errors_are_one_line(tmp_path):
    np.savez(tmp_path / "no_arr0.npz", images=np.zeros((3, 8, 8, 3), np.uint8))
    np.savez(tmp_path / "rank3.npz", arr_0=np.zeros((3, 8, 8), np.uint8))
    np.savez(tmp_path / "one.npz", arr_0=np.zeros((1, 8, 8, 3), np.uint8))
    # statistics only: no images
    np.savez(tmp_path / "stats.npz", mu=np.zeros(2048), sigma=np.eye(2048))
    np.savez(tmp_path / "two.npz", arr_0=np.zeros((2, 8, 8, 3), np.uint8))
    (tmp_path / "random.npz").write_bytes(os.urandom(300))
    bad_weights = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
    bad_weights.write_bytes(b"not the weights")
    # the inputs are refused before the weights are looked at
    no_weights = ["--inception", tmp_path / "none.pth"]
    cases = [([tmp_path / "missing.npz", tmp_path / "two.npz"], "not found"),
             ([tmp_path / "no_arr0.npz", tmp_path / "two.npz"], "arr_0"),
             ([tmp_path / "two.npz", tmp_path / "stats.npz"], "stats.npz has no 'arr_0'"),
             ([tmp_path / "rank3.npz", tmp_path / "two.npz"], "NHWC"),
             ([tmp_path / "one.npz", tmp_path / "two.npz"], "at least 2"),
             ([tmp_path / "random.npz", tmp_path / "two.npz"], "random.npz is not a readable .npz"),
             ([tmp_path / "two.npz"], "ref"),
             ([tmp_path / "two.npz", tmp_path / "two.npz", "--inception", bad_weights],
              "cannot load Inception weights")]
    for argv, msg in cases:
        message = cli("eval_fid.py", *argv, *(no_weights if "--inception" not in argv else []))
        assert message and msg in message and "\n" not in message, (argv, message)


def test_eval_fid_output_paths_are_checked_before_the_work(tmp_path, monkeypatch):
    """--json into a folder that does not exist yet is created; into an existing folder (a path that
    cannot be written) it is refused before Inception is even loaded, not after tens of minutes."""
    np.savez(tmp_path / "images.npz", arr_0=np.zeros((4, 8, 8, 3), np.uint8))
    argv = [str(tmp_path / "images.npz")] * 2 + ["--json"]
    monkeypatch.setattr(inception, "load_inception", lambda *a: pytest.fail("the work started"))
    with pytest.raises(SystemExit) as stop:
        common.run(eval_fid.main, eval_fid.get_parser().parse_args(argv + [str(tmp_path)]))
    assert f"output {tmp_path} is a directory" in str(stop.value)
    monkeypatch.setattr(inception, "load_inception", lambda *a: inception.FIDInception().eval())
    out = tmp_path / "new" / "deeper" / "fid.json"
    common.run(eval_fid.main, eval_fid.get_parser().parse_args(argv + [str(out)]))
    assert json.loads(out.read_text())["fid"] == pytest.approx(0.0, abs=1e-6)


@pytest.fixture(scope="module")
def quick_fashion_classifier():
    """The scorer's network, trained briefly (the real one trains 1500 steps on first use)."""
    return eval_fid.train_fashion_classifier(steps=150).eval()


def test_fashion_scorer_rates_real_images_high_shuffled_labels_low_and_noise_far(
        quick_fashion_classifier):
    """Real training images score high; with shuffled labels they lose class consistency; uniform
    noise lies far."""
    images, labels = image_data.fashion_mnist("train")
    real = images[:2000]
    labels = labels[:2000]
    scores = eval_fid.fashion_scores(quick_fashion_classifier, real, labels)
    shuffled = eval_fid.fashion_scores(quick_fashion_classifier, real, labels[torch.randperm(2000)])
    noise = eval_fid.fashion_scores(quick_fashion_classifier,
                                    torch.randint(0, 256, real.shape, dtype=torch.uint8), labels)
    assert scores["class_consistency"] >= 0.7 and shuffled["class_consistency"] <= 0.3
    assert noise["fid"] >= 20 * scores["fid"] and scores["precision"] > noise["precision"]
    # the test split's reference, kept per classifier, against one computed afresh
    ref = eval_fid.fashion_reference(quick_fashion_classifier)
    fake = eval_fid.classifier_outputs(quick_fashion_classifier, real)[0] / ref["unit"]
    fresh = eval_fid.precision_recall(ref["real"].numpy(), fake)
    assert fresh == (scores["precision"], scores["recall"])


def test_fashion_scorer_command_reads_28_and_32_pixel_npz_and_writes_its_keys(
        quick_fashion_classifier, tmp_path, monkeypatch):
    """`eval_fid.py S.npz fashion-mnist --json OUT`: the classifier cached on first use (here the
    quick one), 28x28 images padded as the demo's 32x32 canvas, exactly the four keys; an npz
    without labels is one line."""
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setattr(eval_fid, "train_fashion_classifier",
                        lambda data_dir=None: quick_fashion_classifier)
    images, labels = image_data.fashion_mnist("test")
    results = []
    for crop in (2, 0):  # 28x28, then 32x32
        x = images[:300, 0, crop:32 - crop, crop:32 - crop, None].numpy()
        np.savez(tmp_path / "s.npz", x, labels[:300].numpy())
        assert cli("eval_fid.py", tmp_path / "s.npz", "fashion-mnist", "--json",
                   tmp_path / "m.json") is None
        results.append(json.load(open(tmp_path / "m.json")))
    assert list(results[0]) == ["class_consistency", "fid", "precision",
                                "recall"] and results[0] == results[1]
    assert os.path.isfile(tmp_path / "hub" / "checkpoints" / "randar_fashion_classifier.pt")
    np.savez(tmp_path / "nolabels.npz", images[:10, 0, :, :, None].numpy())
    assert "arr_1" in cli("eval_fid.py", tmp_path / "nolabels.npz", "fashion-mnist")


def test_linear_probe_reads_the_arrangement_a_bag_of_codes_cannot_see(tmp_path):
    """Two classes made of the same codes in opposite arrangements (ascending / descending in raster
    order): a bag of codebook indices sees equal counts and stays near chance; features from the
    model see where each code sits and separate them."""
    model = random_gpt(seed=12)
    torch.save({"model": model.state_dict(), "config": asdict(model.config)}, tmp_path / "last.pt")
    g = torch.Generator().manual_seed(0)
    for split in ("train", "test"):
        codes = torch.randint(0, 32, (200, 16), generator=g).sort(1).values
        labels = torch.arange(200) % 2
        tokens = torch.where(labels[:, None] == 1, codes.flip(1), codes)
        torch.save({"tokens": tokens.short(), "labels": labels}, tmp_path / f"tokens_{split}.pt")
    probe = docs_figures().probe(argparse.Namespace(ckpt=str(tmp_path / "last.pt"), images=200))
    accuracy = {name: 100 * acc for name, acc in probe.items()}
    bag = accuracy["bag of codebook indices"]
    assert bag < 65, accuracy
    assert accuracy["bidirectional features"] > bag + 20, accuracy
    assert accuracy["causal features"] > bag + 20, accuracy


def test_linear_probe_separates_separable_classes():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(600, 5, generator=g, dtype=torch.float64)
    y = (x @ torch.tensor([1.0, -2.0, 0.5, 0.0, 0.0], dtype=torch.float64) > 0).long()
    assert docs_figures().linear_probe(x[:500], y[:500], x[500:], y[500:]) > 0.95
    # labels unrelated to x
    assert docs_figures().linear_probe(x[:500], y[:500].flip(0), x[500:], y[500:]) < 0.7


def docs_figures():
    """docs/figures.py, the script of docs/experiments.md's measurements, as a module."""
    spec = importlib.util.spec_from_file_location("docs_figures",
                                                  os.path.join(HERE, "docs", "figures.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_inception_score_matches_its_formula_written_in_numpy():
    """exp(mean KL(p(y|x) || p(y))) per split of N // splits images (the 25th left out), softmax
    over the logits as given, mean and std over the splits."""
    logits = np.random.default_rng(0).normal(size=(25, 1008)) * 3
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    scores = []
    for part in (p[:12], p[12:24]):
        kl = (part * (np.log(part) - np.log(part.mean(0)))).sum(1)
        scores.append(np.exp(kl.mean()))
    mean, std = eval_fid.inception_score(logits, splits=2)
    assert abs(mean - np.mean(scores)) < 1e-9 and abs(std - np.std(scores)) < 1e-9
    assert mean > 1.5  # random logits: far from the score of one image per split


def avg_pool_ignoring_padding(x):
    """3x3, stride 1: the mean of the neighbours inside the image, written out."""
    out = np.zeros_like(x)
    H, W = x.shape[-2:]
    for i in range(H):
        for j in range(W):
            window = x[..., max(i - 1, 0):i + 2, max(j - 1, 0):j + 2]
            out[..., i, j] = window.mean(axis=(-2, -1))
    return out


def test_fid_inception_input_pools_and_logits_are_the_tf_graphs():
    """What a published FID depends on beside the resize (tested against TensorFlow itself), each
    against a computation written out here: uint8 pixels scaled by the graph's Sub 128 and Mul
    1/128; TensorFlow's 3x3 average pool, which ignores the padding; the 2048 features, the spatial
    mean of Mixed_7c; the logits, without the fc bias. (pytorch-fid, the reference the issue named,
    needs a torchvision; none that installs here loads against a CPU torch.)"""
    torch.manual_seed(0)
    model = inception.FIDInception().eval()
    torch.nn.init.ones_(model.fc.bias)
    seen = {}
    model.Conv2d_1a_3x3.register_forward_pre_hook(lambda m, a: seen.update(input=a[0]))
    model.Mixed_7c.register_forward_hook(lambda m, a, out: seen.update(mixed_7c=out))
    images = torch.randint(0, 256, (2, 3, 299, 299), dtype=torch.uint8)
    with torch.no_grad():
        features, logits = model(images)
    scaled = (images.numpy().astype(np.float64) - 128) / 128
    assert np.abs(seen["input"].numpy() - scaled).max() < 1e-6
    pooled = seen["mixed_7c"].double().numpy().mean(axis=(2, 3))
    assert np.abs(features.double().numpy() - pooled).max() < 1e-5
    no_bias = pooled @ model.fc.weight.detach().double().numpy().T
    assert np.abs(logits.double().numpy() - no_bias).max() < 1e-3
    x = torch.randn(2, 3, 5, 6, dtype=torch.float64)
    expected = avg_pool_ignoring_padding(x.numpy())
    assert np.abs(inception.avg_pool_tf(x).numpy() - expected).max() < 1e-12


# ---- every script's command line, and the code base ----------------------------------------------

class Hostile:
    """Pickles to a call of os.system: a loader that ran it would create the file PWNED."""
    def __reduce__(self):
        return os.system, ("touch PWNED",)


def test_every_bad_file_and_argument_is_one_clear_line(tiny_run, tmp_path):
    """command -> expected fragment: exit status != 0, one line, no traceback, nothing new written,
    no code run."""
    ckpt = os.path.join(tiny_run, "last.pt")
    vq = os.path.join(tiny_run, "tokenizer.pt")
    bad = tmp_path / "bad"
    bad.mkdir()
    good_bytes = open(ckpt, "rb").read()
    (bad / "truncated.pt").write_bytes(good_bytes[:len(good_bytes) // 2])
    (bad / "empty.pt").write_bytes(b"")
    torch.save({"model": Hostile()}, bad / "hostile.pt")
    release = open(os.path.join(FIXTURES, "randar_tiny_official.safetensors"), "rb").read()
    (bad / "truncated.npz").write_bytes(release[:500])
    (bad / "random.safetensors").write_bytes(os.urandom(64))
    (bad / "nested.yaml").write_text("ar_model:\n  params:\n    n_layer:\n      - 2\n")
    np.savez(bad / "ok.npz", arr_0=np.zeros((4, 8, 8, 3), np.uint8))
    sample_out = ["--out", tmp_path / "out" / "x.png"]
    cases = [(["sample.py", "grid", "--ckpt", bad / "truncated.pt", *sample_out],
              "truncated.pt is not a RandAR checkpoint (truncated"),
             (["sample.py", "grid", "--ckpt", bad / "empty.pt", *sample_out],
              "empty.pt is not a RandAR checkpoint"),
             (["sample.py", "grid", "--ckpt", bad / "hostile.pt", *sample_out],
              "refused: it contains code"),
             (["sample.py", "grid", "--ckpt", vq, *sample_out],
              "is a tokenizer checkpoint, expected a RandAR"),
             (["sample.py", "grid", "--ckpt", ckpt, "--vq-ckpt", bad / "hostile.pt", *sample_out],
              "refused: it contains code"),
             (["sample.py", "grid", "--ckpt", ckpt, "--vq-ckpt", ckpt, *sample_out],
              "is a RandAR checkpoint, expected a tokenizer"),
             (["sample.py", "grid", "--ckpt", bad / "random.safetensors", "--preset", "tiny",
               *sample_out], "not a valid .safetensors"),
             (["sample.py", "grid", "--ckpt",
               os.path.join(FIXTURES, "randar_tiny_official.safetensors"), *sample_out],
              "--config"),
             (["sample.py", "grid", "--ckpt",
               os.path.join(FIXTURES, "randar_tiny_official.safetensors"), "--config",
               bad / "nested.yaml", *sample_out], "nested value"),
             (["sample.py", "grid", "--ckpt", ckpt, "--out", tmp_path], "is a directory"),
             (["sample.py", "grid", "--ckpt", ckpt, "--out-npz", tmp_path], "is a directory"),
             (["train.py", "--out-dir", tmp_path / "t", "--tokenizer-ckpt", bad / "hostile.pt"],
              "refused: it contains code"),
             (["train.py", "--out-dir", tmp_path / "t", "--tokenizer-ckpt", bad / "truncated.pt"],
              "truncated"), (["train.py", "--limit", -1], "--limit"),
             (["train.py", "--image-size", 0], "--image-size"),
             (["train.py", "--out-dir", tiny_run, "--resume", bad / "hostile.pt"],
              "refused: it contains code"),
             (["train.py", "--out-dir", tmp_path / "new", "--resume", bad / "missing.pt"],
              "--resume checkpoint not found"),
             (["train.py", "--out-dir", tmp_path / "new", "--batch-size", 0], "--batch-size"),
             (["train.py", "--out-dir", tmp_path / "new", "--grad-accum", 0], "--grad-accum"),
             (["train.py", "--out-dir", tmp_path / "new", "--ckpt-every", 0], "--ckpt-every"),
             (["train.py", "--out-dir", tmp_path / "new", "--steps", -5], "--steps"),
             (["train.py", "--out-dir", tmp_path / "new", "--data", tmp_path / "nowhere"],
              "--data folder not found"),
             (["eval_fid.py", bad / "truncated.npz", bad / "ok.npz"],
              "truncated.npz is not a readable .npz"),
             (["eval_fid.py", bad / "ok.npz", bad / "ok.npz", "--inception",
               bad / "hostile.pt"], "hostile.pt"),]
    for argv, fragment in cases:
        before = sorted(os.listdir(tiny_run))
        message = cli(*argv)
        assert message and fragment in message, (argv, message)
        assert sorted(os.listdir(tiny_run)) == before and not os.path.exists(tmp_path / "out"), argv
        assert not os.path.exists(tmp_path / "new"), argv  # failed before any work, nothing created
    assert not os.path.exists(os.path.join(HERE, "PWNED")) and not os.path.exists("PWNED")
    assert not [f for f in os.listdir(tmp_path) if ".tmp" in f]


@pytest.mark.parametrize("script, argv, fragment",
                         [("train", ["--lr", "-1"], "--lr"), ("train", ["--lr", "nan"], "--lr"),
                          ("train", ["--ema", "1.5"], "--ema"),
                          ("train", ["--min-lr-ratio", "2"], "--min-lr-ratio"),
                          ("train", ["--dropout", "1"], "--dropout"),
                          ("train", ["--class-dropout", "-0.1"], "--class-dropout"),
                          ("train", ["--clip", "0"], "--clip"),
                          ("train", ["--weight-decay", "-1"], "--weight-decay"),
                          ("train", ["--tokenizer-steps", "0"], "--tokenizer-steps"),
                          ("sample", ["--top-p", "0"], "--top-p"),
                          ("sample", ["--top-k", "-1"], "--top-k"),
                          ("sample", ["--temperature", "nan"], "--temperature"),
                          ("sample", ["--temperature", "0"], "--top-k 1"),
                          ("sample", ["--cfg", "1,nan"], "--cfg"),
                          ("sample", ["extrapolate", "--factor", "1"], "--factor"),])
def test_impossible_numbers_are_refused_at_parse_time(script, argv, fragment):
    parse = {"train": train.get_parser().parse_args, "sample": sample.parse}
    with pytest.raises(SystemExit) as e:
        parse[script](argv)
    assert fragment in str(e.value.code) and "\n" not in str(e.value.code)


def docstring_commands(module):
    """The `python X.py ...` / `torchrun ... X.py ...` lines of a script's docstring -> [argv after
    the script name]: continuation lines joined, comments and [optional] brackets dropped."""
    script = module.__name__ + ".py"
    text = re.sub(r"\\\n\s*", " ", module.__doc__)
    commands = []
    for line in text.splitlines():
        words = line.split("#")[0].replace("[", "").replace("]", "").split()
        if script in words and words[0] in ("python", "torchrun"):
            commands.append(words[words.index(script) + 1:])
    return commands


@pytest.mark.parametrize("script", ["train.py", "sample.py", "eval_fid.py"])
def test_every_docstring_command_parses(script):
    """The usage lines at the top of each script name only flags its parser knows."""
    module = SCRIPTS[script]
    commands = docstring_commands(module)
    assert commands, script
    parse = sample.parse if module is sample else module.get_parser().parse_args
    for argv in commands:
        parse(argv)


def test_the_gpu_check_runs_on_the_cpu_in_miniature(tmp_path):
    """.ci/gpu_check runs only where a GPU is lent; its dry run makes every call it makes, on the
    CPU, shrunk and with nothing compiled (so it claims no compiled == eager), with the interpreter
    it is given: a `python` or `torchrun` found on PATH would fail it."""
    for name in ("python", "torchrun"):
        (tmp_path / name).write_text("#!/bin/sh\nexit 97\n")
        (tmp_path / name).chmod(0o755)
    env = {**os.environ, "GPU_CHECK_DRY_RUN": "1", "PYTHON": sys.executable,
           "PATH": f"{tmp_path}:{os.environ['PATH']}"}
    r = subprocess.run(["bash", os.path.join(HERE, ".ci", "gpu_check")], capture_output=True,
                       text=True, env=env)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "16 steps: eager decoding ran twice, same tokens (dry run: nothing compiled)" in r.stdout
    assert "compiled == eager" not in r.stdout
    assert r.stdout.rstrip().endswith("GPU check passed")


MODULES = ("common", "eval_fid", "generate", "image_data", "inception", "maskgit_vq", "randar",
           "release", "sample", "sampling", "token_cache", "tokenizer", "train")


def import_circle(graph):
    """A list of modules that import each other in a circle (first == last), or None; graph:
    {module: imports}."""
    def visit(module, path):
        if module in path:
            return path[path.index(module):] + [module]
        return next((c for m in graph.get(module, ()) if (c := visit(m, path + [module]))), None)
    return next((c for m in graph if (c := visit(m, []))), None)


DOCUMENTS = ("README.md", "docs/algorithm.md", "docs/experiments.md")


def section_headings(doc):
    """The sections a citation can name: `## §N` (algorithm.md), `## (letter)` (experiments.md)."""
    text = open(os.path.join(HERE, doc)).read()
    return set(re.findall(r"^## (§\d+|\([a-z]\))", text, re.M))


def test_every_cross_reference_resolves():
    """A citation of docs/algorithm.md names a `§` section that exists (one, a range, or a list),
    one of docs/experiments.md a lettered section that exists, read across line breaks; a docs/
    file named anywhere exists; code never cites a doc without its section."""
    headings = {doc: section_headings(doc) for doc in DOCUMENTS[1:]}
    sources = [f"{m}.py" for m in MODULES]
    sources += ["test_randar.py", "docs/figures.py", ".ci/gpu_check", *DOCUMENTS]
    cited = 0
    for source in sources:
        text = open(os.path.join(HERE, source)).read()
        text = re.sub(r"\s*\n\s*(#\s*)?", " ", text)  # comments and docstrings wrap citations
        for doc, ref in re.findall(r"(docs/\w+\.md) (§\d+(?:(?:-|, §)\d+)*|\([a-z]\))", text):
            numbers = [int(n) for n in re.findall(r"\d+", ref)]
            if "-" in ref:
                numbers = list(range(numbers[0], numbers[1] + 1))
            wanted = [f"§{n}" for n in numbers] if ref.startswith("§") else [ref]
            for section in wanted:
                assert section in headings[doc], f"{source} cites {doc} {section}: no such section"
                cited += 1
        for path in set(re.findall(r"\bdocs/[\w./-]+\.(?:md|png|gif|py)", text)):
            assert os.path.exists(os.path.join(HERE, path)), f"{source} names {path}: missing"
        if source.endswith(".py") and source != "test_randar.py":
            for after in re.findall(r"docs/(?:algorithm|experiments)\.md(.{0,2})", text):
                assert after in (" §", " (", "'s", "`", "` "), (source, after)
    assert cited > 30


def test_the_code_stays_a_size_a_reader_can_hold():
    """Imports run one way with common.py at the bottom (imports anywhere in a file count); every
    script at most 500 lines; functions at most 50; the model class at most 150 lines, and nothing
    of the compiler in the model file."""
    import ast
    graph = {}
    long = []
    lines = {}
    for name in MODULES:
        text = open(os.path.join(HERE, f"{name}.py")).read()
        tree = ast.parse(text)
        lines[name] = text.count("\n")
        imported = {a.name.split(".")[0] for n in ast.walk(tree)
                    if isinstance(n, ast.Import) for a in n.names}
        imported |= {n.module.split(".")[0] for n in ast.walk(tree)
                     if isinstance(n, ast.ImportFrom) and n.module}
        graph[name] = sorted(imported & set(MODULES))
        long += [(name, n.name) for n in ast.walk(tree)
                 if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
                 and n.end_lineno - n.lineno + 1 > 50]
        if name == "randar":
            assert not re.search(r"_dynamo|_inductor|is_compiling", text)
            model_class = next(n for n in tree.body
                               if isinstance(n, ast.ClassDef) and n.name == "RandAR")
            assert model_class.end_lineno - model_class.lineno + 1 <= 150
    assert import_circle(graph) is None, import_circle(graph)
    assert graph["common"] == [], graph["common"]
    # the check can fail: sample imports randar
    circle = import_circle({**graph, "randar": ["sample"]})
    assert circle and circle[0] == circle[-1] and {"randar", "sample"} <= set(circle), circle
    assert not long, long
    assert max(lines.values()) <= 500, lines
