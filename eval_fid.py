"""FID, sFID, Inception Score, precision and recall as ADM's evaluator computes them, with the FID
Inception-v3 of the standard tools; and the demo's own Fashion-MNIST scorer.

    # each file: arr_0, NHWC uint8 (ADM's layout)
    python eval_fid.py SAMPLES.npz REF.npz --json metrics.json
    # the demo's scorer, offline (arr_1: labels)
    python eval_fid.py SAMPLES.npz fashion-mnist --json out.json

ADM's protocol (ADM's evaluator, openai/guided-diffusion evaluations/evaluator.py: the one behind
ADM's, DiT's, LlamaGen's and RandAR's numbers): FID and sFID against the mu / sigma and mu_s /
sigma_s a reference .npz stores (ADM's VIRTUAL_imagenet256_labeled.npz: the whole ImageNet training
set), precision and recall against its arr_0 images; a reference without stored statistics gets them
computed from its images, and the output says which. The network is Inception-v3 as TensorFlow's FID
graph (the layout and weights file of `pytorch-fid`, `pt_inception-2015-12-05-6726825d.pth`): uint8
pixels resized to 299x299 by TensorFlow's legacy bilinear resize, then (x - 128) / 128; 2048-d pool
features for FID / precision / recall, 2,023 spatial features of mixed_6/conv for sFID, its 1008
logits for the Inception Score (chunks of 5,000 images in order). Precision and recall follow
Kynkaanniemi et al. with k = 3 on squared distances in float16, as ADM's evaluator does. The
network: inception.py.
"""
import json
import math
import os
import weakref

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import checkpoints
import files
import flags
import image_data
import inception

# sFID's features per image: 17 x 17 positions x the first 7 channels of mixed_6/conv
SPATIAL_SIZE = 17 * 17 * inception.SPATIAL_CHANNELS
# ADM's blocks of rows and columns for pairwise distances: its float32 fallback is decided per block
ADM_BLOCK = 10_000

# ----------------------------------------------------------------------------------------------
# Inputs


def load_images(path):
    """An .npz's arr_0 (uint8 NHWC, C = 1 or 3: what sample.py writes and the ADM evaluator reads),
    memory-mapped: Inception reads it a batch at a time."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"not found: {path}")
    names = files.npz_names(path)
    if "arr_0" not in names:
        raise ValueError(f"{path} has no 'arr_0' array (found: {sorted(names)})")
    images = files.npz_array(path, "arr_0")
    shaped = images.ndim == 4 and images.shape[-1] in (1, 3)
    if not shaped or images.dtype != np.uint8 or len(images) < 2:
        raise ValueError(f"{path}: arr_0 must be at least 2 uint8 NHWC images with 1 or 3 "
                         f"channels, got {images.dtype} {images.shape}")
    return images


# metric -> the names of its statistics in a reference .npz, and its feature size
STATISTICS = {"fid": ("mu", "sigma", 2048), "sfid": ("mu_s", "sigma_s", SPATIAL_SIZE)}


def stored_statistics(path, metric="fid"):
    """(mu, sigma) of a metric stored in a reference .npz, or None. ADM's reference batches store
    them, computed over the whole ImageNet training set: the FID and sFID the papers report are
    against those; the batch's 10,000 images serve only precision and recall."""
    mean, cov, size = STATISTICS[metric]
    names = files.npz_names(path)
    if mean not in names and cov not in names:
        return None
    if not {mean, cov} <= set(names):
        raise ValueError(f"{path} stores only one of '{mean}' and '{cov}'")
    mu, sigma = (np.asarray(files.npz_array(path, name), np.float64) for name in (mean, cov))
    if mu.shape != (size,) or sigma.shape != (size, size) or not (np.isfinite(mu).all()
                                                                  and np.isfinite(sigma).all()):
        raise ValueError(f"{path}: {mean} / {cov} must be finite {size} and {size}x{size} "
                         f"Inception statistics, got {mu.shape} and {sigma.shape}")
    return mu, sigma


@torch.no_grad()
def inception_outputs(model, images, batch_size=50, device="cpu"):
    """Pool features (N, 2048), logits (N, 1008) and spatial features (N, 2023), float64, batched,
    with a progress bar."""
    batches = []
    for i in tqdm(range(0, len(images), batch_size), desc="inception"):
        # a writable copy
        x = torch.from_numpy(np.array(images[i:i + batch_size])).permute(0, 3, 1, 2).to(device)
        if x.size(1) == 1:
            x = x.expand(-1, 3, -1, -1)  # grayscale -> RGB
        batches.append([out.double().cpu() for out in model(x)])
    return tuple(torch.cat(outputs).numpy() for outputs in zip(*batches))


# ----------------------------------------------------------------------------------------------
# Metrics

def frechet_distance(mu1, sigma1, mu2, sigma2):
    """|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^1/2). The eigenvalues of S1 S2 are those of the
    symmetric S1^1/2 S2 S1^1/2, so the trace is two symmetric eigendecompositions: exact for
    singular covariances, where scipy's sqrtm of the product (the standard code's) needs a ridge,
    and 5x faster at 2048-d."""
    mu1, mu2, sigma1, sigma2 = (np.atleast_1d(np.asarray(a, np.float64))
                                for a in (mu1, mu2, sigma1, sigma2))
    sigma1 = np.atleast_2d(sigma1)
    sigma2 = np.atleast_2d(sigma2)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"feature sizes differ: {mu1.shape} vs {mu2.shape}")
    w, v = np.linalg.eigh(sigma1)
    root1 = (v * np.sqrt(w.clip(min=0))) @ v.T
    trace_covmean = np.sqrt(np.linalg.eigvalsh(root1 @ sigma2 @ root1).clip(min=0)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_covmean)


def inception_score(logits, split_size=5000):
    """exp(E_x KL(p(y|x) || p(y))), mean and std over chunks. ADM's evaluator: softmax over the 1008
    logits *without* the fc bias, chunks of split_size images in order, a short last chunk kept
    (at N = 50,000: 10 chunks of 5,000)."""
    p = torch.from_numpy(np.asarray(logits, np.float64)).softmax(-1)
    scores = []
    for part in p.split(split_size):
        log_marginal = part.mean(0, keepdim=True).clamp_min(1e-30).log()
        kl = (part * (part.clamp_min(1e-30).log() - log_marginal)).sum(1)
        scores.append(kl.mean().exp().item())
    return float(np.mean(scores)), float(np.std(scores))


def adm_squared_distances(u, v):
    """Pairwise squared distances as ADM's evaluator computes them: |u|^2 - 2 u.v + |v|^2 clipped at
    0, in float16, and the whole block again in float32 if any value is not finite (overflow past
    65,504). Returned as float32 (len(u), len(v))."""
    d = _squared_distances(u.half(), v.half())
    if not d.isfinite().all():
        d = _squared_distances(u.float(), v.float())
    return d.float()


def _squared_distances(u, v):
    # the same order of operations as ADM's, since float16 rounds every step
    return ((u * u).sum(1)[:, None] - 2 * (u @ v.T) + (v * v).sum(1)[None]).clamp_min(0)


def adm_radii(feats, k=3, block=ADM_BLOCK):
    """Each point's squared distance to its k-th nearest neighbour: the (k+1)-th smallest in its
    row, its own (about 0) included; rows in blocks, each against the columns block by block
    (block x N float32 at a time, as ADM's evaluator holds)."""
    k = min(k, len(feats) - 1)  # tiny sets: the farthest other point
    radii = []
    for i in range(0, len(feats), block):
        rows = [adm_squared_distances(feats[i:i + block], feats[j:j + block])
                for j in range(0, len(feats), block)]
        radii.append(torch.cat(rows, 1).kthvalue(k + 1, dim=1).values)
    return torch.cat(radii)


def precision_recall(real, fake, k=3, block=ADM_BLOCK):
    """Improved precision (fakes inside some real ball) and recall (reals inside some fake ball),
    balls of k-NN radii, as ADM's evaluator (its ManifoldEstimator): float16 squared distances,
    each block with the reals as rows, `<=`."""
    real, fake = (torch.as_tensor(np.asarray(x, np.float32)) for x in (real, fake))
    real_radii, fake_radii = adm_radii(real, k, block), adm_radii(fake, k, block)
    fake_inside = torch.zeros(len(fake), dtype=torch.bool)
    real_inside = torch.zeros(len(real), dtype=torch.bool)
    for i in range(0, len(real), block):
        for j in range(0, len(fake), block):
            d = adm_squared_distances(real[i:i + block], fake[j:j + block])
            fake_inside[j:j + block] |= (d <= real_radii[i:i + block, None]).any(0)
            real_inside[i:i + block] |= (d <= fake_radii[None, j:j + block]).any(1)
    return fake_inside.double().mean().item(), real_inside.double().mean().item()


# ----------------------------------------------------------------------------------------------
# The demo's own scorer (`eval_fid.py SAMPLES fashion-mnist`), offline: a small classifier the
# project trains on Fashion-MNIST's training split is the feature network, its test split the
# reference.

def _radii(feats, k, batch=256):
    """Distance of each point to its k-th nearest neighbour, in row chunks: O(batch * N) memory.
    The scorer's precision and recall keep float64 Euclidean distances, with which its documented
    numbers were measured."""
    k = min(k, len(feats) - 1)  # tiny sets: the farthest other point
    # the (k+1)-th smallest distance, since each point's own distance (0) is among them
    return torch.cat([torch.cdist(feats[i:i + batch], feats).kthvalue(k + 1, dim=1).values
                      for i in range(0, len(feats), batch)])


def _coverage(points, centres, radii, batch=256):
    """Fraction of points inside at least one ball (centre, radius)."""
    inside = 0
    for i in range(0, len(points), batch):
        d = torch.cdist(points[i:i + batch], centres)
        inside += (d <= radii[None]).any(1).sum().item()
    return inside / len(points)


class FashionNet(nn.Module):
    """Grey 32x32 (28x28 padded) -> 128-d features and 10 class logits: small enough to train on 2
    CPU cores."""
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 32, 5, 2, 2), nn.ReLU(),        # 32 x 16 x 16
                                      nn.Conv2d(32, 64, 3, 2, 1), nn.ReLU(),       # 64 x 8 x 8
                                      nn.Conv2d(64, 128, 3, 2, 1), nn.ReLU(),      # 128 x 4 x 4
                                      nn.Flatten(), nn.Linear(2048, 128), nn.ReLU())
        self.head = nn.Linear(128, 10)

    def forward(self, images):
        """images (B, 1, 32, 32) uint8 -> features (B, 128), logits (B, 10)."""
        f = self.features(images.float() / 127.5 - 1)
        return f, self.head(f)


def train_fashion_classifier(data_dir=None, steps=1500, batch_size=128, seed=0):
    """Trained on the training split, seeded: the same machine gives the same network."""
    torch.manual_seed(seed)
    images, labels = image_data.fashion_mnist("train", data_dir)
    test = image_data.fashion_mnist("test", data_dir)
    model = FashionNet()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    for step, i in enumerate(tqdm(torch.randint(0, len(images), (steps, batch_size)),
                                  desc="Fashion-MNIST classifier")):
        for group in opt.param_groups:
            group["lr"] = 2e-3 * 0.5 * (1 + math.cos(math.pi * step / steps))
        loss = F.cross_entropy(model(images[i])[1], labels[i])
        opt.zero_grad()
        loss.backward()
        opt.step()
    accuracy = (classifier_outputs(model.eval(), test[0])[1].argmax(1) == test[1].numpy()).mean()
    print(f"Fashion-MNIST classifier: {100 * accuracy:.2f}% test accuracy")
    return model


@torch.no_grad()
def classifier_outputs(model, images, batch_size=500):
    """uint8 images, (N, 1, H, W) or NHWC with H, W 28 or 32 -> features (N, 128) float64, logits
    (N, 10)."""
    # memory maps: read-only
    images = images.clone() if torch.is_tensor(images) else torch.from_numpy(np.array(images))
    images = images.permute(0, 3, 1, 2) if images.dim() == 4 and images.shape[-1] == 1 else images
    if images.shape[1:] not in ((1, 28, 28), (1, 32, 32)):
        raise ValueError("the Fashion-MNIST scorer takes grey 28x28 or 32x32 images, got "
                         f"shape {tuple(images.shape)}")
    images = F.pad(images, (2, 2, 2, 2)) if images.size(-1) == 28 else images
    outs = [model(images[i:i + batch_size]) for i in range(0, len(images), batch_size)]
    features = torch.cat([f for f, _ in outs]).double().numpy()
    logits = torch.cat([logit for _, logit in outs]).numpy()
    return features, logits


# classifier -> {(data_dir, k): its test-split reference}, kept while the classifier lives
REFERENCES = weakref.WeakKeyDictionary()


def fashion_reference(model, data_dir=None, k=3):
    """The test split's features in the unit of their mean std (FD in that unit is free of the
    network's arbitrary scale), their mean, covariance and k-NN radii: computed once per classifier
    and data folder, since every scoring call compares against them."""
    cached = REFERENCES.setdefault(model, {})
    if (data_dir, k) not in cached:
        ref = classifier_outputs(model, image_data.fashion_mnist("test", data_dir)[0])[0]
        sigma = np.cov(ref, rowvar=False)
        unit = np.sqrt(np.trace(sigma) / ref.shape[1])
        ref = ref / unit
        real = torch.as_tensor(ref, dtype=torch.float64)
        cached[data_dir, k] = {"unit": unit, "mu": ref.mean(0), "sigma": sigma / unit**2,
                               "real": real, "radii": _radii(real, k)}
    return cached[data_dir, k]


def fashion_scores(model, images, labels, data_dir=None, k=3):
    """class_consistency (the classifier's accuracy against the labels), and FD, precision, recall
    of the images' features against the test split's (FD in units of the test features' mean
    variance)."""
    feats, logits = classifier_outputs(model, images)
    ref = fashion_reference(model, data_dir, k)
    feats = feats / ref["unit"]
    fd = frechet_distance(feats.mean(0), np.cov(feats, rowvar=False), ref["mu"], ref["sigma"])
    fake = torch.as_tensor(feats, dtype=torch.float64)
    precision = _coverage(fake, ref["real"], ref["radii"])
    recall = _coverage(ref["real"], fake, _radii(fake, k))
    consistency = float((logits.argmax(1) == np.asarray(labels)).mean())
    return {"class_consistency": consistency, "fid": fd, "precision": precision, "recall": recall}


def fashion_classifier(data_dir=None):
    """The classifier cached in the torch hub folder (trained there on first use)."""
    cached = os.path.join(torch.hub.get_dir(), "checkpoints", "randar_fashion_classifier.pt")
    if not os.path.isfile(cached):
        files.save_atomic({"model": train_fashion_classifier(data_dir).state_dict()}, cached)
    model = FashionNet()
    state = checkpoints.load_torch_file(cached, "Fashion-MNIST classifier")["model"]
    model.load_state_dict(state, strict=True)
    return model.eval()


def main(args):
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.json:
        files.check_output(args.json)
    if args.ref == "fashion-mnist":
        if "arr_1" not in files.npz_names(args.samples):
            raise ValueError(f"{args.samples} has no 'arr_1' (labels): the "
                             "Fashion-MNIST scorer needs them")
        return report(fashion_scores(fashion_classifier(args.data_dir), load_images(args.samples),
                                     files.npz_array(args.samples, "arr_1"),
                                     args.data_dir), args.json)
    # both checked before Inception loads
    images = [load_images(path) for path in (args.samples, args.ref)]
    stored = {metric: stored_statistics(args.ref, metric) for metric in STATISTICS}
    model = inception.load_inception(args.inception, args.device)
    pool, logits, spatial = inception_outputs(model, images[0], args.batch_size, args.device)
    ref_pool, _, ref_spatial = inception_outputs(model, images[1], args.batch_size, args.device)
    results = {**distance_to_reference("fid", pool, ref_pool, stored["fid"], args.ref),
               **distance_to_reference("sfid", spatial, ref_spatial, stored["sfid"], args.ref)}
    results["is_mean"], results["is_std"] = inception_score(logits)
    results["precision"], results["recall"] = precision_recall(ref_pool, pool)
    report(results, args.json)


def distance_to_reference(metric, feats, ref_feats, stored, ref_path):
    """{metric: the Frechet distance from the features' statistics to the reference's stored ones
    (else its features'), metric_statistics: which of the two}."""
    mean, cov, _ = STATISTICS[metric]
    name = os.path.basename(ref_path)
    if stored is None:
        print(f"note: {ref_path} stores no {mean} / {cov}: its {metric} statistics are computed "
              f"from its {len(ref_feats)} images (not comparable with published numbers)")
    mu, sigma = stored or (ref_feats.mean(0), np.cov(ref_feats, rowvar=False))
    source = (f"{mean}/{cov} stored in {name}" if stored else
              f"computed from the {len(ref_feats)} images of {name}")
    distance = frechet_distance(feats.mean(0), np.cov(feats, rowvar=False), mu, sigma)
    return {metric: distance, f"{metric}_statistics": source}


def report(results, json_path):
    for name, v in results.items():
        print(f"{name}: {v:.4f}" if isinstance(v, float) else f"{name}: {v}")
    if json_path:
        files.write_atomic(lambda f: f.write(json.dumps(results, indent=2).encode()), json_path)


def get_parser():
    p = flags.ArgumentParser(description=__doc__)
    p.add_argument("samples", help="images to score: .npz, arr_0 uint8 NHWC (and arr_1 "
                   "labels for fashion-mnist)")
    p.add_argument("ref", help="reference images, the same layout (ADM's reference batches "
                   "are), or 'fashion-mnist'")
    p.add_argument("--data-dir", default=None,
                   help="folder of the Fashion-MNIST IDX .gz files (the scorer's data)")
    p.add_argument("--inception", default=None,
                   help="weights file (default: download into the torch hub cache)")
    p.add_argument("--json", default=None, help="also write the metrics here")
    p.add_argument("--batch-size", type=flags.positive_int, default=50)
    p.add_argument("--device", default="auto")
    return p


def cli(argv=None):
    """The command line (argv: sys.argv[1:] when None); every expected failure is one line and exit
    status 1."""
    flags.run(main, get_parser().parse_args(argv))


if __name__ == "__main__":
    cli()
