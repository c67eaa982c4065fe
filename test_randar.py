"""The claims a learner reads beside the core (randar.py, generate.py): our numbers equal the
reference's, cached and parallel decoding equal the teacher-forced forward, and the two files run
with torch alone.

    python -m pytest -q test_randar.py

The reference's golden outputs live in fixtures/ (docs/algorithm.md §11), so a clone checks itself.
The model's tests come first, then decoding's. The other test files are named for what they test.
"""
import hashlib
import json
import math
import os
import subprocess
import sys
from dataclasses import asdict

import pytest
import torch

import checkpoints
import generate as gen
import randar
from conftest import FIXTURES, HERE, TINY, caches, random_gpt, reference_gpt
from generate import decoding_schedule, feed_plan, filter_logits, generate, sampling_probs
from randar import RandAR, RandARConfig, apply_rope, rope_table_2d

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
    model, _ = checkpoints.load_model(os.path.join(FIXTURES, "randar_tiny_official.safetensors"),
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
    """fixtures/schedules.json, made by the reference's own schedule function (docs/algorithm.md
    §11), holds per N the SHA-256 of its schedules for steps 1..N, each comma-joined, joined by
    ';'."""
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
    labels, keep, groups, *_ = gen.guidance_rows(model, torch.tensor([1, 2, 3]), prefix.size(1),
                                                 (1.0, 3.0), (1.0, 2.5),
                                                 torch.Generator().manual_seed(0))
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
    _, _, is_known = gen.known_canvas((positions, known_tokens), 2, 16, model.rope.device)
    used_order = gen.generation_order(order, positions, is_known, replay)
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


CORE_ALONE = """
import importlib.abc
import sys
import warnings


class Blocked(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"{name} is blocked")


sys.meta_path.insert(0, Blocked())
warnings.filterwarnings("ignore", "Failed to initialize NumPy")
import torch
from generate import generate
from randar import RandAR, RandARConfig

torch.manual_seed(0)
model = RandAR(RandARConfig(dim=32, n_layer=1, n_head=2, multiple_of=32, num_classes=4,
                            vocab_size=16, block_size=16))
tokens = torch.randint(0, 16, (2, 16))
_, loss = model(tokens, torch.tensor([0, 3]))
loss.backward()
model.eval()
labels = torch.tensor([1, 2])
known = (torch.tensor([[0, 5], [3, 4]]), torch.tensor([[7, 8], [9, 10]]))
for kw in (dict(order="raster"), dict(order="random", steps=5), dict(cfg_scale=(1.0, 3.0)),
           dict(steps=4, known=known)):
    out = generate(model, labels, **kw)
    assert out.shape == (2, 16) and 0 <= out.min() and out.max() < 16, kw
print("core alone: ok")
"""


def test_the_core_runs_with_torch_alone(tmp_path):
    """randar.py and generate.py copied into an empty folder, with numpy and every other module of
    ours blocked: a model builds, trains a step and decodes in every way."""
    for name in ("randar.py", "generate.py"):
        (tmp_path / name).write_text(open(os.path.join(HERE, name)).read())
    ours = sorted(n[:-3] for n in os.listdir(HERE) if n.endswith(".py"))
    blocked = set(ours) - {"randar", "generate"} | {"numpy", "PIL", "scipy", "tqdm"}
    script = f"BLOCKED = {sorted(blocked)!r}\n" + CORE_ALONE
    r = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True,
                       text=True, env={**os.environ, "PYTHONPATH": ""})
    assert r.returncode == 0, r.stderr[-2000:]
    assert "core alone: ok" in r.stdout
