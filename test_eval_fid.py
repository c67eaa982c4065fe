"""Tests of eval_fid.py and inception.py: ADM's metrics, the Inception network, the scorer."""
import argparse
import importlib.util
import json
import os
from dataclasses import asdict

import numpy as np
import pytest
import torch

import eval_fid
import flags
import image_data
import inception
from conftest import (
    FIXTURES,
    HERE,
    cli,
    random_gpt,
    run,
)

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
    # ADM's chunks: in order, the short last one kept. 15 images in chunks of 10: the first spread
    # over 10 classes (IS 10), the last 5 over 5 (IS 5). Ten splits of N // 10 would give 1, the
    # remainder dropped 10.
    logits = np.full((15, 1008), -1e4)
    logits[np.arange(15), np.r_[np.arange(10), np.arange(5)]] = 1e4
    mean, std = eval_fid.inception_score(logits, split_size=10)
    assert abs(mean - 7.5) < 1e-6 and abs(std - 2.5) < 1e-6


def test_precision_recall_in_blocks_equals_the_full_distance_matrix():
    """ADM's precision and recall in blocks of 64 against one block of everything; the scorer's
    float64 radii in row chunks against the full cdist."""
    rng = np.random.default_rng(2)
    real = torch.tensor(rng.normal(size=(700, 8)), dtype=torch.float32)
    fake = torch.tensor(rng.normal(size=(600, 8)) + 0.3, dtype=torch.float32)
    full = eval_fid.adm_squared_distances(real, fake)  # (reals, fakes)
    real_radii = eval_fid.adm_squared_distances(real, real).kthvalue(4, dim=1).values
    assert torch.equal(eval_fid.adm_radii(real, 3, block=64), real_radii)
    inside = (full <= real_radii[:, None]).any(0).double().mean().item()
    precision, recall = eval_fid.precision_recall(real, fake)
    assert precision == inside and 0.2 < precision < 1.0 and 0.2 < recall < 1.0
    assert eval_fid.precision_recall(real, fake, block=64) == (precision, recall)
    real64 = real.double()
    full_radii = torch.cdist(real64, real64).kthvalue(4, dim=1).values
    assert torch.allclose(eval_fid._radii(real64, 3, batch=64), full_radii)


def test_adm_distances_are_float16_with_a_float32_fallback_per_block():
    """Squared distances rounded as float16 arithmetic rounds them; a block where float16
    overflows (squared norms past 65,504) is computed again, whole, in float32."""
    u = torch.tensor([[3.0, 4.0], [100.1, 0.0]])
    v = torch.tensor([[0.0, 0.0], [1.0, 2.0]])
    d = eval_fid.adm_squared_distances(u, v)
    assert d.dtype == torch.float32 and torch.equal(d, d.half().float())
    # float16 rounds 100.1 to 100.125, and its square (10025.0) to a multiple of 8
    assert d[1, 0] == 10024.0
    far = torch.cat([u, torch.tensor([[300.0, 0.0]])])
    d = eval_fid.adm_squared_distances(far, v)
    assert d[1, 0] == pytest.approx(100.1 ** 2, rel=1e-6)  # the whole block in float32
    assert d[2, 0] == 90000.0 and d[0, 1] == 8.0  # |(3, 4) - (1, 2)|^2


def test_adm_metrics_match_adm_evaluators_own_results():
    """fixtures/adm_metrics.npz (../shared/adm_fixtures/README.md): ADM's evaluator's own FID,
    Inception Score and precision / recall on seeded inputs, and sFID's flattening order."""
    ref = np.load(os.path.join(FIXTURES, "adm_metrics.npz"))
    for a, b, value in (("fid_a", "fid_b", "fid_value"),
                        ("fid_singular_a", "fid_singular_b", "fid_singular_value")):
        stats = [(x.mean(0), np.cov(x, rowvar=False)) for x in (ref[b], ref[a])]
        fid = eval_fid.frechet_distance(*stats[0], *stats[1])
        assert abs(fid - ref[value]) <= 1e-6 * ref[value], value
    logits = ref["is_features"].astype(np.float32) @ ref["is_weight"].astype(np.float32)
    for split_size in (50, 5000):  # chunks of 50, 50 and 20; one chunk of 120
        expected = ref[f"is_split{split_size}"]
        assert abs(eval_fid.inception_score(logits, split_size)[0] - expected) <= 1e-6 * expected
    real, fake = (torch.from_numpy(ref[name].astype(np.float32))
                  for name in ("pr_ref", "pr_sample"))
    precision, recall = eval_fid.precision_recall(real, fake)
    assert abs(precision - ref["pr_precision"]) <= 0.01 and abs(recall - ref["pr_recall"]) <= 0.01
    for feats, name in ((real, "pr_ref_radii"), (fake, "pr_sample_radii")):
        ours, adm = eval_fid.adm_radii(feats), torch.from_numpy(ref[name])
        # TensorFlow's float16 kernels round differently from torch's: within 2 float16 steps
        # (measured: 72% and 66% equal, the rest 1 or 2 steps off); float32 would match none
        assert ((ours - adm).abs() <= 2.5e-3 * adm).all() and (ours == adm).double().mean() > 0.5
    nhwc = torch.from_numpy(ref["sfid_layout_nhwc"])
    # the module's NCHW tensor, with channels past the 7 that sFID keeps
    nchw = torch.cat([nhwc, -torch.ones(2, 3, 3, 5)], 3).permute(0, 3, 1, 2)
    assert torch.equal(inception.spatial_features(nchw), torch.from_numpy(ref["sfid_layout_flat"]))


def test_inception_logits_leave_out_the_fc_bias():
    torch.manual_seed(0)
    model = inception.FIDInception().eval()
    with torch.no_grad():
        model.fc.bias.fill_(5.0)
        feats, logits, _ = model(torch.randint(0, 255, (2, 3, 75, 75), dtype=torch.uint8))
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
    # sFID's mixed_6/conv: the TF graph's mixed_6/conv/conv2d_params is [1, 1, 768, 192]
    assert sd["Mixed_6d.branch1x1.conv.weight"] == (192, 768, 1, 1)
    assert sd["Mixed_7a.branch7x7x3_4.conv.weight"] == (192, 192, 3, 3)
    assert sd["Mixed_7c.branch3x3dbl_3b.conv.weight"] == (384, 384, 3, 1)
    assert sd["fc.weight"] == (1008,
                               2048) and len([k for k in sd if k.endswith(".conv.weight")]) == 94


def test_eval_fid_cli_on_two_npz_and_an_adm_batch(tmp_path, capsys):
    """`python eval_fid.py` (the script's smoke run) on an npz against itself: FID and sFID from the
    reference's images, and the output says so. Then ADM's protocol on a synthetic ADM batch: FID
    and sFID against its stored mu / sigma and mu_s / sigma_s, precision and recall against its
    images."""
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
    # ADM's chunks of 5,000: one chunk of 4 identical images, IS 1
    assert m["is_mean"] == pytest.approx(1.0) and m["is_std"] == 0.0
    assert abs(m["sfid"]) < 1e-3
    assert m["fid_statistics"] == m["sfid_statistics"] == "computed from the 4 images of s.npz"
    assert "stores no mu / sigma" in r.stdout and "stores no mu_s / sigma_s" in r.stdout
    feats, _, spatial = eval_fid.inception_outputs(inception.load_inception(weights), images)
    assert spatial.shape == (4, 17 * 17 * 7)
    mu = np.linspace(-1, 1, 2048)
    sigma = np.diag(np.linspace(0.5, 2, 2048))
    mu_s = np.linspace(0, 1, 2023)
    sigma_s = np.diag(np.linspace(0.5, 2, 2023))
    np.savez(tmp_path / "adm.npz", arr_0=images, mu=mu, sigma=sigma, mu_s=mu_s, sigma_s=sigma_s)
    assert cli("eval_fid.py", tmp_path / "s.npz", tmp_path / "adm.npz", "--inception", weights,
               "--json", tmp_path / "adm.json") is None
    adm = json.load(open(tmp_path / "adm.json"))
    for metric, x, m_ref, s_ref in (("fid", feats, mu, sigma), ("sfid", spatial, mu_s, sigma_s)):
        expected = eval_fid.frechet_distance(x.mean(0), np.cov(x, rowvar=False), m_ref, s_ref)
        # not the ~0 of its own images
        assert abs(adm[metric] - expected) <= 1e-6 * expected and expected > 100, metric
    assert adm["fid_statistics"] == "mu/sigma stored in adm.npz"
    assert adm["sfid_statistics"] == "mu_s/sigma_s stored in adm.npz"
    assert adm["precision"] == 1.0 and adm["recall"] == 1.0  # the images: the samples' own
    np.savez(tmp_path / "half.npz", arr_0=images, mu=mu)
    assert "only one of 'mu' and 'sigma'" in cli("eval_fid.py", tmp_path / "s.npz",
                                                 tmp_path / "half.npz", "--inception", weights)
    np.savez(tmp_path / "bad_s.npz", arr_0=images, mu_s=mu, sigma_s=sigma)
    message = cli("eval_fid.py", tmp_path / "s.npz", tmp_path / "bad_s.npz", "--inception", weights)
    assert "bad_s.npz: mu_s / sigma_s must be finite 2023" in message and "\n" not in message


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
        flags.run(eval_fid.main, eval_fid.get_parser().parse_args(argv + [str(tmp_path)]))
    assert f"output {tmp_path} is a directory" in str(stop.value)
    monkeypatch.setattr(inception, "load_inception", lambda *a: inception.FIDInception().eval())
    out = tmp_path / "new" / "deeper" / "fid.json"
    flags.run(eval_fid.main, eval_fid.get_parser().parse_args(argv + [str(out)]))
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
    # the test split's radii, kept per classifier, against radii computed afresh
    ref = eval_fid.fashion_reference(quick_fashion_classifier)
    fake = eval_fid.classifier_outputs(quick_fashion_classifier, real)[0] / ref["unit"]
    fake = torch.from_numpy(fake)
    precision = eval_fid._coverage(fake, ref["real"], eval_fid._radii(ref["real"], 3))
    recall = eval_fid._coverage(ref["real"], fake, eval_fid._radii(fake, 3))
    assert (precision, recall) == (scores["precision"], scores["recall"])


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
    """exp(mean KL(p(y|x) || p(y))) per chunk of 12 images in order (the 25th alone in the last),
    softmax over the logits as given, mean and std over the chunks."""
    logits = np.random.default_rng(0).normal(size=(25, 1008)) * 3
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    scores = []
    for part in (p[:12], p[12:24], p[24:]):
        kl = (part * (np.log(part) - np.log(part.mean(0)))).sum(1)
        scores.append(np.exp(kl.mean()))
    mean, std = eval_fid.inception_score(logits, split_size=12)
    assert abs(mean - np.mean(scores)) < 1e-9 and abs(std - np.std(scores)) < 1e-9
    assert scores[2] == pytest.approx(1.0) and mean > 1.3  # random logits: far from 1 per chunk


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
    mean of Mixed_7c; the logits, without the fc bias; sFID's features, TF's mixed_6/conv (the 1x1
    branch, which Mixed_6d concatenates first), 7 channels position by position. (pytorch-fid, the
    reference the issue named, needs a torchvision; none that installs here loads against a CPU
    torch.)"""
    torch.manual_seed(0)
    model = inception.FIDInception().eval()
    torch.nn.init.ones_(model.fc.bias)
    seen = {}
    model.Conv2d_1a_3x3.register_forward_pre_hook(lambda m, a: seen.update(input=a[0]))
    model.Mixed_7c.register_forward_hook(lambda m, a, out: seen.update(mixed_7c=out))
    model.Mixed_6d.register_forward_hook(lambda m, a, out: seen.update(mixed_6d=out))
    images = torch.randint(0, 256, (2, 3, 299, 299), dtype=torch.uint8)
    with torch.no_grad():
        features, logits, spatial = model(images)
    scaled = (images.numpy().astype(np.float64) - 128) / 128
    assert np.abs(seen["input"].numpy() - scaled).max() < 1e-6
    pooled = seen["mixed_7c"].double().numpy().mean(axis=(2, 3))
    assert np.abs(features.double().numpy() - pooled).max() < 1e-5
    no_bias = pooled @ model.fc.weight.detach().double().numpy().T
    assert np.abs(logits.double().numpy() - no_bias).max() < 1e-3
    branch = seen["mixed_6d"][:, :7].numpy().transpose(0, 2, 3, 1).reshape(2, -1)
    assert spatial.shape == (2, 17 * 17 * 7) and np.array_equal(spatial.numpy(), branch)
    x = torch.randn(2, 3, 5, 6, dtype=torch.float64)
    expected = avg_pool_ignoring_padding(x.numpy())
    assert np.abs(inception.avg_pool_tf(x).numpy() - expected).max() < 1e-12


def test_inception_at_256_px_sees_the_tf_resize_in_full_float32(monkeypatch):
    """At ADM's 256 px, where the resize is not the identity, the first convolution sees
    (resize_like_tensorflow(x) - 128) / 128; the forward runs with TF32 off (cuDNN's default is on)
    and leaves the settings as it found them."""
    model = inception.FIDInception().eval()
    seen = {}

    def look(module, args):
        tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        seen.update(input=args[0], tf32=tf32)

    model.Conv2d_1a_3x3.register_forward_pre_hook(look)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", True)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    images = torch.randint(0, 256, (2, 3, 256, 256), dtype=torch.uint8)
    with torch.no_grad():
        spatial = model(images)[2]
    assert seen["tf32"] == (False, False)
    assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    expected = (inception.resize_like_tensorflow(images.float(), (299, 299)) - 128) / 128
    assert torch.equal(seen["input"], expected)
    half_pixel = torch.nn.functional.interpolate(images.float(), size=(299, 299), mode="bilinear")
    assert (seen["input"] - (half_pixel - 128) / 128).abs().max() > 0.1
    assert spatial.shape == (2, 17 * 17 * 7)
