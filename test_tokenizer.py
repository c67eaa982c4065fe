"""Tests of the tokenizers (tokenizer.py, maskgit_vq.py) and the image data."""
import hashlib
import http.server
import itertools
import json
import os
import re
import threading
from dataclasses import asdict

import numpy as np
import pytest
import torch

import image_data
import inception
import tokenizer as tok
from conftest import (
    FIXTURES,
    cli,
    save_tokenizer,
    weights,
    write_images,
)


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
        image_data.download(url + "t10k-labels-idx1-ubyte.gz", dest, hashlib.md5(real).hexdigest())
        assert open(dest, "rb").read() == real
        bad = str(tmp_path / "bad.gz")
        with pytest.raises(ValueError, match="checksum mismatch"):
            image_data.download(url + "t10k-labels-idx1-ubyte.gz", bad, "0" * 32)
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
        next(tok.repeat_epochs(empty, "data"))
    two_per_epoch = torch.utils.data.DataLoader(dataset, batch_size=1, drop_last=True)
    assert len(list(itertools.islice(tok.repeat_epochs(two_per_epoch, "data"), 7))) == 7


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
