"""Tests: ours == the reference's numbers, fast paths == slow paths, real commands end to end.

    python -m pytest -q test_randar.py
"""
import json
import os

import pytest
import torch

from randar import KVCache, RandAR, RandARConfig, apply_rope, decoding_schedule, filter_logits, sampling_probs

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "shared", "reference_fixtures.pt")
needs_fixtures = pytest.mark.skipif(not os.path.exists(FIXTURES), reason=f"reference fixtures not found at {FIXTURES}")


@pytest.fixture(scope="module")
def fx():
    return torch.load(FIXTURES, weights_only=True)


def reference_gpt(fx):
    model = RandAR(RandARConfig.from_dict(fx["gpt"]["config"]))
    model.load_state_dict(fx["gpt"]["state_dict"], strict=True)
    return model.eval()


def random_gpt(seed=0, **kw):
    """A tiny model with every weight re-drawn large: the reference init makes all logits 0,
    which would let any fast-path == slow-path comparison pass vacuously."""
    torch.manual_seed(seed)
    cfg = dict(dim=64, n_layer=2, n_head=4, multiple_of=32, vocab_size=32, block_size=16, num_classes=10)
    model = RandAR(RandARConfig(**{**cfg, **kw}))
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if name.endswith("norm.weight") else 0.3 * torch.randn_like(p))
    return model.eval()


# ---- model: reference equivalence ----------------------------------------------------------------

@needs_fixtures
def test_state_dict_matches_reference(fx):
    model = reference_gpt(fx)
    ours = [[k, list(v.shape), str(v.dtype).replace("torch.", "")] for k, v in model.state_dict().items()]
    assert ours == [list(x) for x in fx["gpt"]["state_dict_keys"]]


@needs_fixtures
def test_training_forward_matches_reference(fx):
    model, case = reference_gpt(fx), fx["gpt"]["train_forward"]
    order = case["token_order"]
    logits, loss = model(case["idx"], case["labels"], order=order)
    assert (logits - case["token_logits"]).abs().max() < 1e-4
    assert abs(loss.item() - case["loss"].item()) < 1e-4
    # The same rows under the named orders: row 0 of the fixture is raster.
    logits_raster, _ = model(case["idx"][:1], case["labels"][:1], order="raster")
    assert torch.equal(order[0], torch.arange(16))
    assert (logits_raster - case["token_logits"][:1]).abs().max() < 1e-4
    assert (model.rope - fx["rope"]["freqs_cis_2d"]["table"]).abs().max() < 1e-6


@needs_fixtures
@pytest.mark.parametrize("name", ["seq_nocfg", "seq_cfg", "par6_nocfg", "par6_cfg"])
def test_generation_matches_reference(fx, name):
    model, case = reference_gpt(fx), fx["gpt"]["generate"][name]
    seen = []
    tokens = model.generate(case["labels"], order=case["token_order"], steps=case["num_inference_steps"],
                            cfg=tuple(case["cfg_scales"]), top_k=case["top_k"],
                            callback=lambda step, logits, new: seen.append((logits, new)))
    assert torch.equal(tokens, case["tokens"])
    assert [new.size(1) for _, new in seen] == case["tokens_per_step"]
    for (logits, new), ref in zip(seen, case["steps"], strict=True):
        assert (logits - ref["sample_logits"]).abs().max() < 1e-4
        assert torch.equal(new, ref["sampled"])
    for i, cache in enumerate(model.kv_caches):
        slots = cache.k.size(2)  # the reference pads its cache to a multiple of 8
        assert (cache.k - case["final_kv_cache"][f"layers.{i}.k_cache"][:, :, :slots]).abs().max() < 1e-4
        assert (cache.v - case["final_kv_cache"][f"layers.{i}.v_cache"][:, :, :slots]).abs().max() < 1e-4


@needs_fixtures
def test_schedules_match_reference(fx):
    for key, ref in fx["schedules"].items():
        n, steps = map(int, key.split("_"))
        assert decoding_schedule(n, steps) == ref["tokens_per_step"], key


@needs_fixtures
def test_sampling_filters_match_reference(fx):
    s = fx["sampling"]
    for case in s["filter_cases"]:
        assert torch.equal(filter_logits(s["logits"], case["top_k"], case["top_p"]), case["output"])
    for case in s["sample_cases"]:
        probs = sampling_probs(s["logits"], case["temperature"], case["top_k"], case["top_p"])
        assert (probs - case["probs"]).abs().max() < 1e-6


# ---- model: fast paths against the slow computation ---------------------------------------------

def teacher_forced_kv(model, tokens, labels, order):
    """K/V of every layer from the plain training forward, captured with hooks: [(k, v)] (B, H, 1+2N, hd)."""
    captured, hooks = [], []
    for layer in model.layers:
        hooks.append(layer.attention.wqkv.register_forward_hook(lambda m, i, out: captured.append(out)))
    model(tokens, labels, order=order)
    for h in hooks:
        h.remove()
    B, D, H = labels.size(0), model.config.dim, model.config.n_head
    slot_pos = torch.cat([torch.full((B, 1), -1), order.repeat_interleave(2, dim=1)], dim=1)
    rope = model.rope[slot_pos + 1]
    kv = []
    for out in captured:
        _, k, v = out.split([D, D, D], dim=-1)
        k = apply_rope(k.view(B, -1, H, D // H), rope).transpose(1, 2)
        kv.append((k, v.view(B, -1, H, D // H).transpose(1, 2)))
    return kv


@pytest.mark.parametrize("steps", [16, 11, 6, 3, 1])
@pytest.mark.parametrize("cfg", [(1.0, 1.0), (1.5, 4.0)])
def test_cached_decoding_equals_teacher_forcing(steps, cfg):
    model = random_gpt(seed=steps)
    g = torch.Generator().manual_seed(1)
    labels = torch.tensor([1, 7, 3])
    order = torch.stack([torch.randperm(16, generator=g) for _ in range(3)])
    seen = []
    tokens = model.generate(labels, order=order, steps=steps, cfg=cfg, temperature=1.0, generator=g,
                            callback=lambda step, logits, new: seen.append(logits))
    cond, _ = model(tokens, labels, order=order)
    uncond, _ = model(tokens, torch.full_like(labels, 10), order=order)
    done = 0
    for logits in seen:
        scale = cfg[0] + (cfg[1] - cfg[0]) * done / 16
        slow = uncond + scale * (cond - uncond) if cfg != (1.0, 1.0) else cond
        n = logits.size(1)
        if n == 1 or steps == 16:
            assert (logits - slow[:, done:done + n]).abs().max() < 1e-4
        else:  # later queries of a parallel step see PI tokens, not image tokens (SPEC §4-5): only the first matches
            assert (logits[:, 0] - slow[:, done]).abs().max() < 1e-4
        done += n
    assert done == 16 and len(seen) == len(decoding_schedule(16, steps))
    # The final cache holds the training layout up to the last step's first query slot.
    last_first_query_slot = 2 * (16 - logits.size(1)) + 1
    for cache, (k, v) in zip(model.kv_caches, teacher_forced_kv(model, tokens, labels, order)):
        assert (cache.k[:3, :, :last_first_query_slot + 1] - k[:, :, :last_first_query_slot + 1]).abs().max() < 1e-4
        assert (cache.v[:3, :, :last_first_query_slot + 1] - v[:, :, :last_first_query_slot + 1]).abs().max() < 1e-4


@pytest.mark.parametrize("order", ["random", "raster"])
def test_known_prefix(order):
    model = random_gpt(seed=3)
    g = torch.Generator().manual_seed(0)
    labels = torch.tensor([2, 5])
    positions = torch.stack([torch.randperm(16, generator=g)[:6] for _ in range(2)])
    known_tokens = torch.randint(0, 32, (2, 6), generator=g)
    seen = []
    tokens = model.generate(labels, order=order, known=(positions, known_tokens), generator=g,
                            callback=lambda step, logits, new: seen.append((logits, new)))
    assert torch.equal(tokens.gather(1, positions), known_tokens)
    assert sum(new.size(1) for _, new in seen) == 10
    # Raster order for the rest: every step equals the teacher-forced forward over that order.
    rest = torch.stack([torch.tensor([p for p in range(16) if p not in row]) for row in positions.tolist()])
    gen_order = torch.cat([positions, rest], dim=1)
    if order == "raster":
        slow, _ = model(tokens, labels, order=gen_order)
        for k, (logits, _) in enumerate(seen):
            assert (logits[:, 0] - slow[:, 6 + k]).abs().max() < 1e-4
    # The prefix fed in one call == the same prefix fed one token at a time.
    model.kv_caches = [KVCache(33) for _ in model.layers]
    one_call = model.prefill(labels, gen_order, known_tokens, 1)
    model.kv_caches = [KVCache(33) for _ in model.layers]
    logits = model.prefill(labels, gen_order, known_tokens[:, :0], 1)
    for j in range(6):
        logits = model.decode_step(gen_order, j, known_tokens[:, j:j + 1], 1)
    assert (one_call - logits).abs().max() < 1e-4


def test_parallel_steps_and_seed_reproducibility():
    model = random_gpt(seed=5)
    labels = torch.tensor([0, 9])
    a = model.generate(labels, steps=5, generator=torch.Generator().manual_seed(7))
    b = model.generate(labels, steps=5, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b) and a.shape == (2, 16) and a.min() >= 0 and a.max() < 32


def test_tiny_model_overfits():
    torch.manual_seed(0)
    cfg = RandARConfig(dim=64, n_layer=2, n_head=4, multiple_of=32, vocab_size=32, block_size=16, num_classes=8,
                       token_dropout_p=0, resid_dropout_p=0, ffn_dropout_p=0, class_dropout_prob=0)
    model = RandAR(cfg)
    tokens, labels = torch.randint(0, 32, (8, 16)), torch.arange(8)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    for _ in range(300):
        _, loss = model(tokens, labels, order="random")
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = first or loss.item()
    assert first > 3.0 and loss.item() < 0.5


@pytest.mark.parametrize("kwargs, match", [
    (dict(steps=0), "steps"),
    (dict(steps=-1), "steps"),
    (dict(order="spiral"), "spiral"),
    (dict(order=torch.zeros(2, 16, dtype=torch.long)), "permutation"),
    (dict(temperature=0.0), "temperature"),
    (dict(labels=torch.tensor([0, 10])), "labels"),
    (dict(labels=torch.tensor([-1, 0])), "labels"),
])
def test_generate_rejects_bad_arguments(kwargs, match):
    model = random_gpt()
    kwargs = {"labels": torch.tensor([0, 1]), **kwargs}
    with pytest.raises(ValueError, match=match):
        model.generate(**kwargs)


def test_forward_rejects_bad_tokens_and_orders():
    model = random_gpt()
    with pytest.raises(ValueError, match="tokens"):
        model(torch.zeros(2, 15, dtype=torch.long), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="permutation"):
        model(torch.zeros(2, 16, dtype=torch.long), torch.tensor([0, 1]), order=torch.ones(2, 16, dtype=torch.long))
    assert model.generate(torch.tensor([0]), temperature=0.0, top_k=1).shape == (1, 16)  # greedy is fine


# ---- tokenizer ---------------------------------------------------------------------------------

import hashlib
import http.server
import signal
import subprocess
import sys
import threading
import time

import numpy as np
from PIL import Image

import tokenizer as tok

HERE = os.path.dirname(os.path.abspath(__file__))
FASHION_DIR = "/usr/share/datasets/fashion-mnist"
needs_fashion = pytest.mark.skipif(not os.path.isdir(FASHION_DIR), reason="Debian package dataset-fashion-mnist not installed")


def run(script, *argv, **kw):
    return subprocess.run([sys.executable, os.path.join(HERE, script), *map(str, argv)], capture_output=True,
                          text=True, **kw)


def reference_vq(fx):
    model = tok.VQModel(tok.VQConfig.from_dict(fx["tokenizer"]["config"]))
    model.load_state_dict(fx["tokenizer"]["state_dict"], strict=True)
    return model.eval()


@needs_fixtures
def test_tokenizer_matches_reference(fx):
    model, case = reference_vq(fx), fx["tokenizer"]["case"]
    ours = [[k, list(v.shape), str(v.dtype).replace("torch.", "")] for k, v in model.state_dict().items()]
    assert ours == [list(x) for x in fx["tokenizer"]["state_dict_keys"]]
    with torch.no_grad():
        enc = model.encoder(case["input"])
        z_q, _, idx = model.quantize(model.quant_conv(enc))
        assert (enc - case["encoder_output"]).abs().max() < 1e-4
        assert (z_q - case["quant"]).abs().max() < 1e-4
        assert torch.equal(idx.flatten(1), case["indices"])
        assert (model.decode(idx) - case["decoded"]).abs().max() < 1e-4


@needs_fixtures
def test_tokenizer_training_mode_quantizer_matches_reference(fx):
    ref = fx["tokenizer"]["case"]["train_mode_quantizer"]
    model = tok.VQModel(tok.VQConfig.from_dict({**fx["tokenizer"]["config"], "entropy_loss_ratio": ref["entropy_loss_ratio"]}))
    model.load_state_dict(fx["tokenizer"]["state_dict"], strict=True)
    model.train()
    z_q, losses, _ = model.quantize(fx["tokenizer"]["case"]["pre_quant"])
    assert (z_q - ref["z_q"]).abs().max() < 1e-4
    for ours, theirs in [("vq", "vq_loss"), ("commit", "commit_loss"), ("entropy", "entropy_loss")]:
        assert abs(losses[ours].item() - ref[theirs].item()) < 1e-4
    assert model.quantize.usage() == ref["codebook_usage"]
    assert torch.equal(model.quantize.codebook_used[-128:], ref["codebook_used_last_entries"])


def test_llamagen_vq16_layout():
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
    assert sd["quantize.embedding.weight"] == (16384, 8) and sd["quantize.codebook_used"] == (65536,)
    assert sd["quant_conv.weight"] == (8, 256, 1, 1) and sd["post_quant_conv.weight"] == (256, 8, 1, 1)
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


@needs_fashion
def test_tokenizer_learns_on_real_fashion_mnist(tmp_path):
    torch.manual_seed(0)
    images, labels = tok.fashion_mnist("test")
    assert images.shape == (10000, 1, 32, 32) and images.dtype == torch.uint8 and labels.max() == 9
    x = tok.to_pixels(images[:256])
    model = tok.VQModel(tok.PRESETS["demo"])
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    losses, hits = [], torch.zeros(512)
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
    psnr, usage = tok.evaluate(model.eval(), torch.utils.data.TensorDataset(images[:256], labels[:256]))
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


@needs_fashion
def test_download_checks_md5_and_removes_partial_file(tmp_path):
    real = open(os.path.join(FASHION_DIR, "t10k-labels-idx1-ubyte.gz"), "rb").read()
    server, url = serve(tmp_path, {"t10k-labels-idx1-ubyte.gz": real})
    try:
        dest = str(tmp_path / "labels.gz")
        tok.download(url + "t10k-labels-idx1-ubyte.gz", dest, hashlib.md5(real).hexdigest())
        assert open(dest, "rb").read() == real
        bad = str(tmp_path / "bad.gz")
        with pytest.raises(ValueError, match="checksum mismatch"):
            tok.download(url + "t10k-labels-idx1-ubyte.gz", bad, "0" * 32)
        assert os.listdir(tmp_path) == ["labels.gz"]  # nothing half-written left behind
    finally:
        server.shutdown()


def write_images(folder, n=4, size=(40, 36)):
    for c in ("cat", "dog"):
        os.makedirs(os.path.join(folder, c), exist_ok=True)
        for i in range(n):
            Image.fromarray(np.random.randint(0, 255, (*size, 3), dtype=np.uint8)).save(os.path.join(folder, c, f"{i}.png"))


def test_image_folder(tmp_path):
    write_images(tmp_path)
    ds, num_classes = tok.open_dataset(str(tmp_path), "train", image_size=32)
    x, y = ds[5]
    assert num_classes == 2 and len(ds) == 8 and x.shape == (3, 32, 32) and x.dtype == torch.uint8 and y == 1


def test_tokenizer_cli_errors(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    corrupt = tmp_path / "corrupt"
    write_images(corrupt)
    (corrupt / "dog" / "broken.png").write_bytes(b"not an image")
    good = tmp_path / "good"
    write_images(good)
    cases = [
        (["train", "--data-dir", tmp_path / "nowhere"], "not found"),
        (["train", "--data", empty, "--out-dir", tmp_path / "o1"], "no images found"),
        (["encode", "--data", corrupt, "--ckpt", tmp_path / "missing.pt"], "not found"),
        (["train", "--data", good, "--image-size", 30, "--out-dir", tmp_path / "o2"], "not divisible"),
    ]
    for argv, msg in cases:
        r = run("tokenizer.py", *argv)
        assert r.returncode != 0 and msg in r.stderr and "Traceback" not in r.stderr, (argv, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1
    # A corrupt file is named; a checkpoint of another config is refused; nothing is written.
    torch.manual_seed(0)
    model = tok.VQModel(tok.VQConfig(**{**tok.asdict(tok.PRESETS["demo"]), "in_channels": 3}))
    ckpt = str(tmp_path / "tok.pt")
    torch.save({"model": model.state_dict(), "config": tok.asdict(model.config)}, ckpt)
    r = run("tokenizer.py", "encode", "--data", corrupt, "--ckpt", ckpt, "--out", tmp_path / "t.pt")
    assert r.returncode != 0 and "broken.png" in r.stderr and not os.path.exists(tmp_path / "t.pt")
    torch.save({"model": model.state_dict(), "config": {**tok.asdict(model.config), "ch": 32}}, ckpt)
    r = run("tokenizer.py", "encode", "--data", good, "--ckpt", ckpt, "--out", tmp_path / "t.pt")
    assert r.returncode != 0 and "do not match" in r.stderr and not os.path.exists(tmp_path / "t.pt")


# ---- train.py ----------------------------------------------------------------------------------


def synthetic_run_dir(path, n_train=64, n_test=32):
    """An output folder with a random demo tokenizer and random token files: train.py skips to RandAR."""
    torch.manual_seed(0)
    os.makedirs(path, exist_ok=True)
    vq = tok.VQModel(tok.VQConfig(**{**tok.asdict(tok.PRESETS["demo"]), "codebook_size": 32}))
    torch.save({"model": vq.state_dict(), "config": tok.asdict(vq.config)}, os.path.join(path, "tokenizer.pt"))
    for split, n in (("train", n_train), ("test", n_test)):
        torch.save({"tokens": torch.randint(0, 32, (n, 16)).short(), "labels": torch.randint(0, 10, (n,)),
                    "num_classes": 10, "vocab_size": 32, "tokenizer": "tokenizer.pt"},
                   os.path.join(path, f"tokens_{split}.pt"))
    return str(path)


def tiny_train_args(out_dir, *extra):
    return ["--out-dir", out_dir, "--preset", "tiny", "--batch-size", 8, "--warmup-steps", 2, "--eval-every", 1000,
            "--sample-every", 1000, "--samples-per-class", 1, "--log-every", 1, *extra]


def weights(path):
    return torch.load(os.path.join(path, "last.pt"), weights_only=True)


def test_ddp_two_processes_equal_one_process_on_the_same_global_batch(tmp_path):
    common = ["--steps", 4, "--order", "raster", "--dropout", 0, "--class-dropout", 0, "--lr", 3e-3]
    one, two = synthetic_run_dir(tmp_path / "one"), synthetic_run_dir(tmp_path / "two")
    r = run("train.py", *tiny_train_args(one, *common, "--batch-size", 16))
    assert r.returncode == 0, r.stderr[-2000:]
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        os.path.join(HERE, "train.py"), *map(str, tiny_train_args(two, *common))],
                       capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    a, b = weights(one), weights(two)
    assert len(b["rank_param_checksums"]) == 2 and b["rank_param_checksums"][0] == b["rank_param_checksums"][1]
    assert b["args"]["batch_size"] * 2 == a["args"]["batch_size"]
    for k in a["model"]:
        assert (a["model"][k] - b["model"][k]).abs().max() < 1e-5, k
    loss = [[json.loads(l)["loss"] for l in open(os.path.join(d, "metrics.jsonl")) if '"loss"' in l] for d in (one, two)]
    assert len(loss[0]) == 4 and np.allclose(loss[0], loss[1], atol=1e-5)


def test_resume_after_sigkill_is_exact(tmp_path):
    straight, killed = synthetic_run_dir(tmp_path / "straight"), synthetic_run_dir(tmp_path / "killed")
    args = ["--steps", 120, "--ckpt-every", 10, "--keep", 0]  # random order and dropout: RNG state matters
    assert run("train.py", *tiny_train_args(straight, *args)).returncode == 0
    cmd = [sys.executable, os.path.join(HERE, "train.py"), *map(str, tiny_train_args(killed, *args))]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = os.path.join(killed, "metrics.jsonl")
    while proc.poll() is None:
        if os.path.exists(metrics) and sum(1 for _ in open(metrics)) >= 25:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.005)
    assert proc.wait() == -signal.SIGKILL, "training finished before it could be killed"
    assert weights(killed)["step"] < 120
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0 and "resumed from" in r.stdout, r.stderr[-2000:]
    a, b = weights(straight), weights(killed)
    assert a["step"] == b["step"] == 120
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k


def test_kill_during_checkpoint_write_keeps_previous(tmp_path, monkeypatch):
    path = str(tmp_path / "last.pt")
    tok.save_atomic({"step": 1, "w": torch.ones(3)}, path)

    def dying_save(obj, f):  # writes half a file, then the process "dies"
        open(f, "wb").write(b"PK\x03\x04 partial")
        raise KeyboardInterrupt
    monkeypatch.setattr(tok.torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        tok.save_atomic({"step": 2, "w": torch.zeros(3)}, path)
    assert torch.load(path, weights_only=True)["step"] == 1 and os.listdir(tmp_path) == ["last.pt"]


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    out = synthetic_run_dir(tmp_path / "nan")
    assert run("train.py", *tiny_train_args(out, "--steps", 4, "--ckpt-every", 2)).returncode == 0
    before = open(os.path.join(out, "last.pt"), "rb").read()
    r = run("train.py", *tiny_train_args(out, "--steps", 8, "--ckpt-every", 2, "--lr", "inf"))
    assert r.returncode != 0 and "non-finite loss" in r.stderr and "step 6" in r.stderr, r.stderr[-2000:]
    assert open(os.path.join(out, "last.pt"), "rb").read() == before


@needs_fashion
def test_train_end_to_end_on_real_fashion_mnist(tmp_path):
    out = str(tmp_path / "run")
    r = run("train.py", "--out-dir", out, "--limit", 256, "--tokenizer-steps", 10, "--steps", 6, "--batch-size", 16,
            "--preset", "tiny", "--samples-per-class", 2, "--eval-every", 3, "--val-limit", 64, "--log-every", 1)
    assert r.returncode == 0, r.stderr[-2000:]
    for f in ("tokenizer.pt", "tokens_train.pt", "tokens_test.pt", "last.pt", "samples.png", "metrics.jsonl"):
        assert os.path.exists(os.path.join(out, f)), f
    grid = Image.open(os.path.join(out, "samples.png"))
    assert grid.size == (2 * (32 + 2), 10 * (32 + 2))  # 2 px gaps
    rows = [json.loads(l) for l in open(os.path.join(out, "metrics.jsonl"))]
    assert [r["step"] for r in rows if "val_loss" in r] == [3, 6]
    ckpt = weights(out)
    model = RandAR(RandARConfig.from_dict(ckpt["config"]))
    model.load_state_dict(ckpt["model"], strict=True)
    assert model.config.block_size == 64 and model.config.vocab_size == 512
    r = run("train.py", "--out-dir", out, "--limit", 128, "--steps", 8, "--preset", "tiny")  # other data, same folder
    assert r.returncode != 0 and "was encoded from" in r.stderr and len(r.stderr.strip().splitlines()) == 1


# ---- eval_fid.py -------------------------------------------------------------------------------

import eval_fid


def test_frechet_distance_closed_form():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    d1, d2 = rng.uniform(0.5, 2, 5), rng.uniform(0.5, 2, 5)
    closed = ((mu1 - mu2) ** 2).sum() + (d1 + d2 - 2 * np.sqrt(d1 * d2)).sum()  # diagonal covariances
    assert abs(eval_fid.frechet_distance(mu1, np.diag(d1), mu2, np.diag(d2)) - closed) < 1e-6 * closed
    a, b = rng.normal(size=(5, 5)), rng.normal(size=(5, 5))
    s1, s2 = a @ a.T + np.eye(5), b @ b.T + np.eye(5)
    r = np.linalg.cholesky(s1)  # tr((S1 S2)^1/2) = tr((L^T S2 L)^1/2) for S1 = L L^T: a symmetric root
    w, v = np.linalg.eigh(r.T @ s2 @ r)
    closed = ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(w).sum()
    assert abs(eval_fid.frechet_distance(mu1, s1, mu2, s2) - closed) < 1e-6 * closed
    x = rng.normal(size=(50, 8))
    mu, sigma = x.mean(0), np.cov(x, rowvar=False)
    assert abs(eval_fid.frechet_distance(mu, sigma, mu, sigma)) < 1e-6
    singular = np.zeros((8, 8))  # rank-deficient: handled with the ridge, not NaN
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


def test_inception_layout_matches_pytorch_fid_weights():
    model = eval_fid.FIDInception()
    sd = {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    # torchvision's Inception3 (aux classifier dropped, 1008 classes), as pytorch-fid builds it:
    assert sum(p.numel() for p in model.parameters()) == 23_850_960
    assert sd["Conv2d_1a_3x3.conv.weight"] == (32, 3, 3, 3) and sd["Conv2d_4a_3x3.bn.running_var"] == (192,)
    assert sd["Mixed_5b.branch_pool.conv.weight"] == (32, 192, 1, 1)
    assert sd["Mixed_6e.branch7x7dbl_5.conv.weight"] == (192, 192, 1, 7)
    assert sd["Mixed_7a.branch7x7x3_4.conv.weight"] == (192, 192, 3, 3)
    assert sd["Mixed_7c.branch3x3dbl_3b.conv.weight"] == (384, 384, 3, 1)
    assert sd["fc.weight"] == (1008, 2048) and len([k for k in sd if k.endswith(".conv.weight")]) == 94


def test_eval_fid_cli_npz_and_folder_agree(tmp_path):
    torch.manual_seed(0)
    weights = str(tmp_path / "random_inception.pth")
    torch.save(eval_fid.FIDInception().state_dict(), weights)
    images = np.random.default_rng(0).integers(0, 255, (3, 32, 32, 1), dtype=np.uint8)
    np.savez(tmp_path / "s.npz", arr_0=images, arr_1=np.arange(3))
    folder = tmp_path / "pngs"
    folder.mkdir()
    for i, im in enumerate(images):
        Image.fromarray(im[..., 0]).save(folder / f"{i:05d}.png")
    for src, dst in ((tmp_path / "s.npz", "a.npz"), (folder, "b.npz")):
        r = run("eval_fid.py", src, "--save-stats", tmp_path / dst, "--inception", weights)
        assert r.returncode == 0, r.stderr[-2000:]
    a, b = np.load(tmp_path / "a.npz"), np.load(tmp_path / "b.npz")
    assert a["features"].shape == (3, 2048) and np.allclose(a["features"], b["features"], atol=1e-5)
    r = run("eval_fid.py", tmp_path / "s.npz", tmp_path / "b.npz", "--inception", weights, "--json", tmp_path / "m.json")
    assert r.returncode == 0, r.stderr[-2000:]
    m = json.load(open(tmp_path / "m.json"))
    assert abs(m["fid"]) < 1e-3 and m["precision"] == 1.0 and m["recall"] == 1.0 and m["is_mean"] >= 1.0


def test_eval_fid_cli_errors(tmp_path):
    np.savez(tmp_path / "no_arr0.npz", images=np.zeros((3, 8, 8, 3), np.uint8))
    np.savez(tmp_path / "rank3.npz", arr_0=np.zeros((3, 8, 8), np.uint8))
    np.savez(tmp_path / "one.npz", arr_0=np.zeros((1, 8, 8, 3), np.uint8))
    np.savez(tmp_path / "stats64.npz", mu=np.zeros(64), sigma=np.eye(64))
    np.savez(tmp_path / "stats2048.npz", mu=np.zeros(2048), sigma=np.eye(2048))
    bad_weights = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
    bad_weights.write_bytes(b"not the weights")
    cases = [([tmp_path / "missing.npz", tmp_path / "stats64.npz"], "not found"),
             ([tmp_path / "no_arr0.npz", tmp_path / "stats64.npz"], "arr_0"),
             ([tmp_path / "rank3.npz", tmp_path / "stats64.npz"], "NHWC"),
             ([tmp_path / "one.npz", tmp_path / "stats64.npz"], "at least 2"),
             ([tmp_path / "stats64.npz", tmp_path / "stats2048.npz"], "feature sizes differ"),
             ([tmp_path / "no_arr0.npz", "--save-stats", tmp_path / "x.npz", "--inception", tmp_path / "none.pth"], "arr_0"),
             ([tmp_path / "stats64.npz", "--save-stats", tmp_path / "x.npz"], "stats"),
             ]
    for argv, msg in cases:
        r = run("eval_fid.py", *argv)
        assert r.returncode != 0 and msg in r.stderr and len(r.stderr.strip().splitlines()) == 1, (argv, r.stderr)
    np.savez(tmp_path / "two.npz", arr_0=np.zeros((2, 8, 8, 3), np.uint8))
    r = run("eval_fid.py", tmp_path / "two.npz", tmp_path / "stats2048.npz", "--inception", bad_weights)
    assert r.returncode != 0 and "hash" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


# ---- resolution extrapolation ------------------------------------------------------------------

from randar import rope_table_2d


@needs_fixtures
def test_rope_tables_match_reference_and_extrapolation_mix(fx):
    for key in ("freqs_cis_2d", "freqs_cis_2d_grid8"):
        ref = fx["rope"][key]
        assert (rope_table_2d(ref["grid_size"], ref["head_dim"], ref["base"]) - ref["table"]).abs().max() < 1e-6
    ref = fx["rope"]["freqs_cis_2d_extrapolation"]  # grid 8 from grid 4, boundary 2
    ours = rope_table_2d(8, 16, scale=0.5, ntk_boundary=2)
    raw = rope_table_2d(8, 16)  # raw coordinates on the large grid
    high = [0, 1, 4, 5]  # the two highest frequencies of the row half and of the column half (hd/4 = 4)
    low = [2, 3, 6, 7]
    assert (ours[:, high] - raw[:, high]).abs().max() < 1e-6
    assert (ours[:, high] - ref["table"][:, high]).abs().max() < 1e-5  # same as the reference where both extrapolate
    coords = torch.arange(8) / 2  # interpolated: angle = (c / 2) * f
    f = 10000 ** (-torch.arange(4) * 4 / 16)
    expect = torch.cat([(coords[:, None, None] * f[2:]).expand(8, 8, 2), (coords[None, :, None] * f[2:]).expand(8, 8, 2)], -1)
    assert (ours[1:, low, 0] - torch.cos(expect.reshape(64, 4))).abs().max() < 1e-6
    assert (ours[1:, low, 1] - torch.sin(expect.reshape(64, 4))).abs().max() < 1e-6
    assert ours[0].abs().max() == 0


def test_extrapolated_generation_decodes_every_token_and_keeps_the_base():
    model = random_gpt(seed=11)  # 4x4 training grid
    g = torch.Generator().manual_seed(0)
    labels = torch.tensor([1, 4])
    base = model.generate(labels, generator=g)
    rows = torch.arange(4).repeat_interleave(4) * 2
    cols = torch.arange(4).repeat(4) * 2
    positions = (rows * 8 + cols).expand(2, -1)
    seen = []
    big = model.generate(labels, known=(positions, base), grid=8, steps=10, cfg=(1.0, 3.0), spatial_cfg=(1.0, 2.5),
                         generator=g, callback=lambda s, l, t: seen.append(t))
    assert big.shape == (2, 64) and torch.equal(big.view(2, 8, 8)[:, ::2, ::2].reshape(2, 16), base)
    assert sum(t.size(1) for t in seen) == 48 and len(seen) == 10  # every remaining token decoded, in 10 steps
    assert torch.equal(model.rope, rope_table_2d(4, 16))  # the training table is back


def test_spatial_cfg_at_scale_one_is_plain_decoding():
    model = random_gpt(seed=12)
    positions = torch.tensor([[0, 2, 5, 7, 8, 10, 13, 15]])
    known_tokens = torch.randint(0, 32, (1, 8), generator=torch.Generator().manual_seed(3))
    runs = []
    for spatial in (None, (1.0, 1.0)):
        seen = []
        out = model.generate(torch.tensor([6]), order="raster", known=(positions, known_tokens), spatial_cfg=spatial,
                             steps=4, top_k=1, callback=lambda s, l, t: seen.append(l))  # greedy: no RNG in play
        runs.append((out, seen))
    (a, la), (b, lb) = runs
    assert all((x - y).abs().max() < 1e-4 for x, y in zip(la, lb, strict=True)) and torch.equal(a, b)


# ---- sample.py ---------------------------------------------------------------------------------

import sample


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A RandAR checkpoint trained for 2 steps on synthetic 4x4 tokens, with a random demo tokenizer."""
    out = synthetic_run_dir(tmp_path_factory.mktemp("run"))
    r = run("train.py", *tiny_train_args(out, "--steps", 2))
    assert r.returncode == 0, r.stderr[-2000:]
    return out


def test_sample_cli_png_npz_and_seed(tiny_run, tmp_path):
    outs = []
    for name in ("a", "b"):
        r = run("sample.py", "--ckpt", os.path.join(tiny_run, "last.pt"), "--classes", "1,3", "--num", 3, "--seed", 7,
                "--steps", 5, "--out", tmp_path / f"{name}.png", "--out-npz", tmp_path / f"{name}.npz")
        assert r.returncode == 0, r.stderr[-2000:]
        outs.append(np.load(tmp_path / f"{name}.npz"))
    a, b = outs
    assert a["arr_0"].dtype == np.uint8 and a["arr_0"].shape == (6, 16, 16, 1)  # 4x4 tokens x downsample 4
    assert a["arr_1"].tolist() == [1, 1, 1, 3, 3, 3]
    assert np.array_equal(a["arr_0"], b["arr_0"])
    assert Image.open(tmp_path / "a.png").size[0] > 3 * 16


def test_sample_compare_outpaint_and_extrapolate_write_figures(tiny_run, tmp_path):
    ckpt = os.path.join(tiny_run, "last.pt")
    Image.fromarray(np.random.randint(0, 255, (16, 16), dtype=np.uint8)).save(tmp_path / "in.png")
    for extra in (["--compare", "--classes", "0,1"], ["--outpaint", tmp_path / "in.png", "--sides", "right,top", "--num", 2, "--edit-class", 5],
                  ["--extrapolate", 2, "--classes", "2", "--num", 2, "--extrapolate-steps", 6]):
        out = tmp_path / "fig.png"
        r = run("sample.py", "--ckpt", ckpt, "--out", out, *extra)
        assert r.returncode == 0 and out.exists(), r.stderr[-2000:]
        out.unlink()


def test_inpainting_keeps_known_tokens(tiny_run, tmp_path):
    Image.fromarray(np.random.randint(0, 255, (16, 16), dtype=np.uint8)).save(tmp_path / "in.png")
    args = sample.parse(["--ckpt", os.path.join(tiny_run, "last.pt"), "--inpaint", str(tmp_path / "in.png"),
                         "--mask", "4,0,12,8", "--edit-class", "3", "--num", "3", "--out", str(tmp_path / "o.png")])
    args.device, args.ctx = torch.device("cpu"), torch.no_grad()
    model, vq = sample.load_run(args.ckpt, "cpu")
    tokens, (positions, known_tokens) = sample.edit(model, vq, args)
    assert positions.size(1) == 16 - 4  # 2x2 tokens masked
    assert torch.equal(tokens.gather(1, positions), known_tokens)
    assert os.path.exists(tmp_path / "o.png")


def test_sample_cli_errors(tiny_run, tmp_path):
    ckpt = os.path.join(tiny_run, "last.pt")
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(tmp_path / "img.png")
    Image.fromarray(np.zeros((20, 20), np.uint8)).save(tmp_path / "mask20.png")
    Image.fromarray(np.zeros((24, 24), np.uint8)).save(tmp_path / "img24.png")
    (tmp_path / "text.png").write_text("not an image")
    cases = [(["--ckpt", tmp_path / "none.pt"], "not found"),
             (["--classes", "10"], "class 10"),
             (["--steps", 0], "--steps"),
             (["--steps", 17], "--steps"),
             (["--inpaint", tmp_path / "img.png", "--mask", tmp_path / "mask20.png", "--edit-class", 1], "mask"),
             (["--inpaint", tmp_path / "img24.png", "--mask", "0,0,4,4", "--edit-class", 1], "16x16"),
             (["--inpaint", tmp_path / "text.png", "--mask", "0,0,4,4", "--edit-class", 1], "text.png"),
             (["--inpaint", tmp_path / "img.png", "--mask", "0,0,4,4"], "--edit-class"),
             (["--cfg", "3"], "--cfg")]
    for argv, msg in cases:
        out = tmp_path / "out.png"
        r = run("sample.py", *(["--ckpt", ckpt] if "--ckpt" not in argv else []), *argv, "--out", out)
        assert r.returncode != 0 and msg in r.stderr and len(r.stderr.strip().splitlines()) == 1, (argv, r.stderr)
        assert not out.exists()


def test_bench_runs_on_a_preset_without_checkpoint():
    r = run("sample.py", "--bench", "--preset", "tiny", "--bench-batch", 2, "--repeats", 1, "--device", "cpu")
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [l for l in r.stdout.splitlines() if l.startswith("| 1 ") or l.startswith("| 2 ")]
    assert len(rows) == 2 * 7 and "parallel random, 6 steps" in r.stdout  # 6 = 16 * 88 / 256, rounded
    assert all(l.count("|") == 6 for l in rows) and "| 1.00x |" in r.stdout


def test_llamagen_style_file_without_config_loads_as_vq16(tmp_path):
    torch.manual_seed(0)
    model = tok.VQModel(tok.PRESETS["llamagen-vq16"])
    path = str(tmp_path / "vq_ds16_c2i.pt")
    torch.save({"model": model.state_dict()}, path)  # the published file's layout
    loaded = tok.load_tokenizer(path)
    assert loaded.config == tok.PRESETS["llamagen-vq16"]
    assert torch.equal(loaded.quantize.embedding.weight, model.quantize.embedding.weight)
