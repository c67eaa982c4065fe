"""FID, Inception Score, precision and recall with the FID Inception-v3 of the standard tools, and
the demo's own Fashion-MNIST scorer.

    # each file: arr_0, NHWC uint8 (ADM's layout)
    python eval_fid.py SAMPLES.npz REF.npz --json metrics.json
    # the demo's scorer, offline (arr_1: labels)
    python eval_fid.py SAMPLES.npz fashion-mnist --json out.json

ADM's protocol (the one behind ADM's, DiT's, LlamaGen's and RandAR's numbers): FID against the mu /
sigma a reference .npz stores (ADM's VIRTUAL_imagenet256_labeled.npz: the whole ImageNet training
set), precision and recall against its arr_0 images; a reference without stored statistics gets them
computed from its images, and the output says which. The network is Inception-v3 as TensorFlow's FID
graph (the layout and weights file of `pytorch-fid`, `pt_inception-2015-12-05-6726825d.pth`): uint8
pixels resized to 299x299 by TensorFlow's legacy bilinear resize, then (x - 128) / 128; 2048-d pool
features for FID / precision / recall, its 1008 logits for the Inception Score. Precision and recall
follow Kynkaanniemi et al. with k = 3, as the ADM evaluator does. The network: inception.py.
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


def stored_statistics(path):
    """(mu, sigma) stored in a reference .npz, or None. ADM's reference batches store them, computed
    over the whole ImageNet training set: the FID the papers report is against those; the batch's
    10,000 images serve only precision and recall."""
    names = files.npz_names(path)
    if "mu" not in names and "sigma" not in names:
        return None
    if not {"mu", "sigma"} <= set(names):
        raise ValueError(f"{path} stores only one of 'mu' and 'sigma'")
    mu, sigma = (np.asarray(files.npz_array(path, name), np.float64) for name in ("mu", "sigma"))
    if mu.shape != (2048,) or sigma.shape != (2048, 2048) or not (np.isfinite(mu).all()
                                                                  and np.isfinite(sigma).all()):
        raise ValueError(f"{path}: mu / sigma must be finite 2048 and 2048x2048 Inception "
                         f"statistics, got {mu.shape} and {sigma.shape}")
    return mu, sigma


@torch.no_grad()
def inception_outputs(model, images, batch_size=50, device="cpu"):
    """Pool features (N, 2048) float64 and logits (N, 1008), batched, with a progress bar."""
    all_features = []
    all_logits = []
    for i in tqdm(range(0, len(images), batch_size), desc="inception"):
        # a writable copy
        x = torch.from_numpy(np.array(images[i:i + batch_size])).permute(0, 3, 1, 2).to(device)
        if x.size(1) == 1:
            x = x.expand(-1, 3, -1, -1)  # grayscale -> RGB
        features, logits = model(x)
        all_features.append(features.double().cpu())
        all_logits.append(logits.double().cpu())
    return torch.cat(all_features).numpy(), torch.cat(all_logits).numpy()


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


def inception_score(logits, splits=10):
    """exp(E_x KL(p(y|x) || p(y))), mean and std over splits. The published convention (TensorFlow's
    original, the ADM evaluator, torch-fidelity): softmax over the 1008 logits *without* the fc
    bias, splits of N // splits images each (a remainder is left out)."""
    p = torch.from_numpy(np.asarray(logits, np.float64)).softmax(-1)
    size = len(p) // splits
    if size == 0:
        raise ValueError(f"the Inception Score needs at least {splits} images, got {len(p)}")
    scores = []
    for part in p[:size * splits].split(size):
        log_marginal = part.mean(0, keepdim=True).clamp_min(1e-30).log()
        kl = (part * (part.clamp_min(1e-30).log() - log_marginal)).sum(1)
        scores.append(kl.mean().exp().item())
    return float(np.mean(scores)), float(np.std(scores))


def _radii(feats, k, batch=256):
    """Distance of each point to its k-th nearest neighbour, in row chunks: O(batch * N) memory."""
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


def precision_recall(real, fake, k=3):
    """Improved precision (fakes inside the real manifold) and recall (reals inside the fake
    manifold)."""
    real = torch.as_tensor(real, dtype=torch.float64)
    fake = torch.as_tensor(fake, dtype=torch.float64)
    return _coverage(fake, real, _radii(real, k)), _coverage(real, fake, _radii(fake, k))


# ----------------------------------------------------------------------------------------------
# The demo's own scorer (`eval_fid.py SAMPLES fashion-mnist`), offline: a small classifier the
# project trains on Fashion-MNIST's training split is the feature network, its test split the
# reference.

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
    precision = _coverage(fake, ref["real"], ref["radii"])  # as precision_recall(real, fake)
    recall = _coverage(ref["real"], fake, _radii(fake, k))
    consistency = float((logits.argmax(1) == np.asarray(labels)).mean())
    return {"class_consistency": consistency, "fid": fd, "precision": precision, "recall": recall}


def fashion_classifier(data_dir=None):
    """The classifier cached in the torch hub folder (trained there on first use)."""
    cached = os.path.join(torch.hub.get_dir(), "checkpoints", "randar_fashion_classifier.pt")
    if not os.path.isfile(cached):
        files.save_atomic({"model": train_fashion_classifier(data_dir).state_dict()}, cached)
    model = FashionNet()
    model.load_state_dict(checkpoints.load_torch_file(cached,
                                                 "Fashion-MNIST classifier")["model"], strict=True)
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
    stored = stored_statistics(args.ref)
    model = inception.load_inception(args.inception, args.device)
    f1, logits = inception_outputs(model, images[0], args.batch_size, args.device)
    f2, _ = inception_outputs(model, images[1], args.batch_size, args.device)
    if stored is None:
        print(f"note: {args.ref} stores no mu / sigma: the FID reference statistics are computed "
              f"from its {len(f2)} images (not comparable with published FIDs)")
    mu2, sigma2 = stored or (f2.mean(0), np.cov(f2, rowvar=False))
    results = {"fid": frechet_distance(f1.mean(0), np.cov(f1, rowvar=False), mu2, sigma2),
               "fid_statistics": f"mu/sigma stored in {os.path.basename(args.ref)}" if stored else
               f"computed from the {len(f2)} images of {os.path.basename(args.ref)}"}
    if len(logits) >= 10:
        results["is_mean"], results["is_std"] = inception_score(logits)
    results["precision"], results["recall"] = precision_recall(f2, f1)
    report(results, args.json)


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
