"""Remakes docs/experiments.md (a), (b), (c) and (d) and the README's reference rows, from runs a
reader can make (`python train.py`); (e)-(g) name the commit or the command behind their tables.

    python docs/figures.py losses          # (a): runs/demo against runs/raster (--order raster)
    python docs/figures.py steps           # (b): quality against decoding steps, 2 seeds
    python docs/figures.py steps --run runs/long
    python docs/figures.py editing         # (c): inpainting, class editing, extrapolation, scored
    python docs/figures.py probe           # (d): linear probe, bi-directional vs causal features
    python docs/figures.py references      # reference rows: reconstructions, real images, noise

Each point of `steps` is two commands, printed as they run and skipped when their output exists
(so an interrupted study resumes): `sample.py grid` writes 5,000 samples (500 per class, CFG 1->4),
`eval_fid.py ... fashion-mnist` scores them; files go to RUN/study/, charts to docs/steps_*.png.
Charts are drawn with PIL (no plotting library is a dependency). The probe reads the token files
train.py leaves beside the checkpoint.
"""
import argparse
import json
import os
import subprocess
import sys

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from tqdm import tqdm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import checkpoints  # noqa: E402
import eval_fid  # noqa: E402
import image_data  # noqa: E402
import tokenizer as tok  # noqa: E402
from checkpoints import load_model  # noqa: E402
from generate import generate  # noqa: E402

STEPS = (8, 16, 22, 64)
SEEDS = (0, 1)
COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40)]


def scores(run, steps, seed):
    """One point's scores (file names as the order study of commit 72a4e5d wrote them, so its files
    are reused)."""
    stem = os.path.join(run, "study", f"random_cosine_{steps}_seed{seed}")
    if not os.path.exists(stem + ".json"):
        if not os.path.exists(stem + ".npz"):
            command(["sample.py", "grid", "--ckpt", os.path.join(run, "last.pt"), "--per-class",
                     "500", "--batch-size", "500", "--steps", str(steps), "--seed", str(seed),
                     "--out-npz", stem + ".npz"])
        command(["eval_fid.py", stem + ".npz", "fashion-mnist", "--json", stem + ".json"])
    with open(stem + ".json") as f:
        return json.load(f)


def command(argv):
    print("$ python " + " ".join(argv), flush=True)
    subprocess.run([sys.executable] + argv, cwd=ROOT, check=True)


def chart(series, path, x_label, y_label, x_values, title,
          note="line: mean of 2 seeds\nband: their range"):
    """Lines with their seed spread shaded: series = [(name, colour, [(low, high) per x])]."""
    W, H = 640, 400  # the canvas
    left, right, top, bottom = 70, 170, 50, 50  # margins around the plot
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    low = min(v for _, _, ys in series for y in ys for v in y)
    high = max(v for _, _, ys in series for y in ys for v in y)
    lo = low - 0.05 * (high - low)
    hi = high + 0.05 * (high - low)

    def px(i):  # x values evenly spaced, as categories
        return left + i * (W - left - right) / (len(x_values) - 1)

    def py(v):
        return top + (hi - v) / (hi - lo) * (H - top - bottom)
    d.rectangle([left, top, W - right, H - bottom], outline="black")
    for i, x in enumerate(x_values):
        d.line([px(i), H - bottom, px(i), H - bottom + 5], fill="black")
        d.text((px(i) - 6, H - bottom + 8), str(x), fill="black")
    for k in range(5):
        v = lo + k * (hi - lo) / 4
        d.line([left - 5, py(v), left, py(v)], fill="black")
        d.text((left - 45, py(v) - 6), f"{v:.3g}", fill="black")
    d.text(((left + W - right) / 2 - 60, H - 22), x_label, fill="black")
    d.text((8, top - 20), y_label, fill="black")
    d.text((8, 6), title, fill="black")
    for n, (name, colour, ys) in enumerate(series):
        band = [(px(i), py(h)) for i, (_, h) in enumerate(ys)]
        band += [(px(i), py(low_y)) for i, (low_y, _) in reversed(list(enumerate(ys)))]
        img.paste(Image.new("RGB", img.size, colour), mask=polygon_mask(img.size, band, 60))
        mean = [(px(i), py((low_y + high_y) / 2)) for i, (low_y, high_y) in enumerate(ys)]
        d.line(mean, fill=colour, width=2)
        d.line([W - right + 15, top + 10 + 18 * n, W - right + 35,
                top + 10 + 18 * n], fill=colour, width=2)
        d.text((W - right + 40, top + 4 + 18 * n), name, fill="black")
    d.text((W - right + 15, top + 10 + 18 * len(series)), note, fill="black")
    img.save(path)


def polygon_mask(size, points, alpha):
    mask = Image.new("L", size, 0)
    ImageDraw.Draw(mask).polygon(points, fill=alpha)
    return mask


def steps(args):
    """(b): random order, the cosine schedule, at 8 ... 64 steps, two sampling seeds each."""
    run = os.path.join(ROOT, args.run)
    os.makedirs(os.path.join(run, "study"), exist_ok=True)
    table = {n: [scores(run, n, seed) for seed in SEEDS] for n in STEPS}
    keys = ("class_consistency", "fid", "precision", "recall")
    print("| steps | " + " | ".join(keys) + " |\n|---|---|---|---|---|")
    for n, (a, b) in table.items():
        print(f"| {n} | " + " | ".join(f"{a[k]:.3f} / {b[k]:.3f}" for k in keys) + " |")
    name = os.path.basename(os.path.normpath(args.run))
    suffix = "" if name == "demo" else "_" + name
    for key, label in [("fid", "FD (Fashion-MNIST scorer), lower is better"),
                       ("class_consistency", "class consistency, higher is better")]:
        series = [("random + cosine", COLOURS[0],
                   [sorted(r[key] for r in table[n]) for n in STEPS])]
        chart(series, os.path.join(ROOT, "docs", f"steps_{key}{suffix}.png"),
              "decoding steps (64 tokens)", label, STEPS,
              f"{args.run}: 5,000 samples per point, CFG 1->4")


# Linear probe of RandAR's features (docs/algorithm.md §9): how much of the class a frozen model's
# features hold, read by a linear classifier trained on the train split, scored on the test split.

def linear_probe(train_x, train_y, test_x, test_y, weight_decay=1e-4):
    """Multinomial logistic regression on standardised features (full batch, L-BFGS) -> test
    accuracy."""
    mean = train_x.mean(0)
    std = train_x.std(0) + 1e-6
    x = (train_x - mean) / std
    xt = (test_x - mean) / std
    w = torch.zeros(x.size(1), int(train_y.max()) + 1, dtype=x.dtype, requires_grad=True)
    b = torch.zeros(w.size(1), dtype=x.dtype, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=300, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(x @ w + b, train_y) + weight_decay * w.pow(2).sum()
        loss.backward()
        return loss
    opt.step(closure)
    return ((xt @ w + b).argmax(1) == test_y).double().mean().item()


@torch.no_grad()
def probe(args):
    """Accuracy of a linear classifier on mean-pooled bi-directional and causal features, and on a
    bag of codebook indices, for the token files train.py wrote beside the checkpoint."""
    model = load_model(os.path.join(ROOT, args.ckpt))[0]
    folder = os.path.dirname(os.path.join(ROOT, args.ckpt))
    splits = {s: checkpoints.load_torch_file(os.path.join(folder, f"tokens_{s}.pt"), "token file")
              for s in ("train", "test")}
    data = {s: (d["tokens"][:args.images].long(), d["labels"][:args.images])
            for s, d in splits.items()}
    vocab = model.config.vocab_size
    bag = {s: F.one_hot(t, vocab).double().mean(1) for s, (t, _) in data.items()}
    results = {"bag of codebook indices": linear_probe(bag["train"], data["train"][1],
                                                       bag["test"], data["test"][1])}
    for kind in ("bidirectional", "causal"):
        feats = {}
        for s, (t, _) in data.items():
            batches = tqdm(range(0, len(t), 256), desc=f"{kind} {s}")
            feats[s] = torch.cat([model.features(t[i:i + 256], kind=kind).mean(1).double()
                                  for i in batches])
        results[f"{kind} features"] = linear_probe(feats["train"], data["train"][1],
                                                   feats["test"], data["test"][1])
    for name, acc in results.items():
        print(f"linear probe, {name}: {100 * acc:.2f}% test accuracy")
    return results


def losses(args):
    """(a): validation loss against training steps of a random-order and a raster-order run
    (metrics.jsonl)."""
    curves = {}
    for name, run in (("random order", args.random), ("raster order", args.raster)):
        with open(os.path.join(ROOT, run, "metrics.jsonl")) as f:
            curves[name] = {r["step"]: r["val_loss"] for r in map(json.loads, f) if "val_loss" in r}
    steps = sorted(set.intersection(*(set(c) for c in curves.values())))
    print("| order | " + " | ".join(map(str, steps)) + " steps |")
    print("|---" * (len(steps) + 1) + "|")
    for name, curve in curves.items():
        print(f"| {name} | " + " | ".join(f"{curve[s]:.3f}" for s in steps) + " |")
    series = [(name, c, [(curve[s], curve[s]) for s in steps])
              for (name, curve), c in zip(curves.items(), COLOURS)]
    chart(series, os.path.join(ROOT, "docs", "random_vs_raster.png"), "training steps (batch 32)",
          "validation loss, nats/token (own order)", steps, f"{args.random} vs {args.raster}",
          note="one run each:\ntraining is\ndeterministic")


@torch.no_grad()
def editing(args):
    """Class consistency (the scorer's classifier) of 1,000 edited test images, and of 200
    extrapolated samples pooled back to 32x32: inpainting keeps each image's top half (4 of 8 token
    rows) and regenerates the bottom as its own class or as the next one (class editing);
    extrapolation as `sample.py extrapolate`."""
    torch.manual_seed(0)
    model = load_model(os.path.join(ROOT, args.ckpt))[0]
    vq = tok.load_tokenizer(os.path.join(ROOT, args.vq_ckpt))
    classifier = eval_fid.fashion_classifier()
    images, labels = (t[:1000] for t in image_data.fashion_mnist("test"))
    tokens = torch.cat([vq.encode_images(images[i:i + 250]).flatten(1)
                        for i in range(0, 1000, 250)])
    top = torch.arange(32).expand(1000, -1)  # token rows 0-3 of the 8x8 grid

    def consistency(images, labels):
        predicted = eval_fid.classifier_outputs(classifier, images)[1].argmax(1)
        return (predicted == labels.numpy()).mean()

    def pixels(tokens, grid):
        return vq.decode_images(tokens.view(-1, grid, grid))

    g = torch.Generator().manual_seed(0)
    print(f"| images (1,000) | class consistency |\n|---|---|\n| the test images themselves | "
          f"{consistency(images, labels):.3f} |")
    for name, target in (("inpainted, own class", labels),
                         ("inpainted as the next class", (labels + 1) % 10)):
        out = generate(model, target, known=(top, tokens[:, :32]),
                       cfg_scale=(1.0, 4.0), generator=g)
        print(f"| bottom half {name} | {consistency(pixels(out, 8), target):.3f} |")
    # extrapolation: 200 samples (a 16x16 grid costs 4x the tokens, 16x the attention)
    labels = torch.arange(200) % 10
    base = generate(model, labels, cfg_scale=(1.0, 4.0), generator=g)
    known = ((torch.arange(8) * 2 * 16)[:, None] + torch.arange(8) * 2).flatten().expand(200, -1)
    big = torch.cat([generate(model, labels[i:i + 50], known=(known[i:i + 50], base[i:i + 50]),
                              grid=16, cfg_scale=(1.0, 4.0), spatial_cfg_scale=(1.0, 2.0),
                              generator=g) for i in range(0, 200, 50)])
    print(f"| 200 samples (base, 8x8 tokens) | {consistency(pixels(base, 8), labels):.3f} |")
    small = F.avg_pool2d(pixels(big, 16).float(), 2).round().to(torch.uint8)
    print("| the same extrapolated to 16x16 tokens, pooled to 32x32 | "
          f"{consistency(small, labels):.3f} |")


@torch.no_grad()
def references(args):
    """The scorer on images that are not samples: the tokenizer's reconstructions of 5,000 test
    images, 5,000 real training images with their labels and shuffled, uniform noise."""
    vq = tok.load_tokenizer(os.path.join(ROOT, args.vq_ckpt))
    classifier = eval_fid.fashion_classifier()
    test, test_labels = image_data.fashion_mnist("test")
    train, train_labels = image_data.fashion_mnist("train")
    recon = torch.cat([vq.decode_images(vq.encode_images(test[i:i + 500]))
                       for i in range(0, 5000, 500)])
    shuffled = train_labels[:5000][torch.randperm(5000, generator=torch.Generator().manual_seed(0))]
    noise = torch.randint(0, 256, (5000, 1, 32, 32), dtype=torch.uint8,
                          generator=torch.Generator().manual_seed(0))
    print("| images | class consistency | FD | precision | recall |\n|---|---|---|---|---|")
    rows = [("reconstructions of 5,000 test images", recon, test_labels[:5000]),
            ("5,000 real training images", train[:5000], train_labels[:5000]),
            ("the same, labels shuffled", train[:5000], shuffled),
            ("uniform noise", noise, train_labels[:5000])]
    for name, images, labels in rows:
        r = eval_fid.fashion_scores(classifier, images, labels)
        print(f"| {name} | {r['class_consistency']:.3f} | {r['fid']:.3f} | "
              f"{r['precision']:.3f} | {r['recall']:.3f} |")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="figure", required=True)
    steps_args = sub.add_parser("steps", help="(b) quality against decoding steps")
    steps_args.add_argument("--run", default="runs/demo")
    probe_args = sub.add_parser("probe", help="(d) linear probe of the default run's features")
    probe_args.add_argument("--ckpt", default="runs/demo/last.pt")
    probe_args.add_argument("--images", type=int, default=5000, help="images per split")
    for name, help in (("editing", "(c) editing and extrapolation, scored"),
                       ("references", "reference rows")):
        files = sub.add_parser(name, help=help)
        files.add_argument("--ckpt", default="runs/demo/last.pt")
        files.add_argument("--vq-ckpt", default="runs/demo/tokenizer.pt")
    runs = sub.add_parser("losses", help="(a) random vs raster order: validation loss")
    runs.add_argument("--random", default="runs/demo")
    runs.add_argument("--raster", default="runs/raster")
    args = p.parse_args()
    {"steps": steps, "probe": probe, "editing": editing, "references": references,
     "losses": losses}[args.figure](args)
