"""Draw docs/experiments.md's two charts with Pillow (no plotting library):

    python docs/figures.py --runs random=runs/demo raster=runs/raster   # validation loss -> docs/random_vs_raster.png
    python docs/figures.py --steps docs/steps_quality.json    # FD and class consistency vs steps -> docs/steps_quality.png

--runs reads each run's metrics.jsonl (the val_loss lines train.py writes); --steps reads a JSON list of
{"steps": S, "fd": F, "class_consistency": C} measured with a sample scorer (docs/experiments.md, (b)).
"""
import argparse
import math
import json
import os

from PIL import Image, ImageDraw

COLOURS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189)]


def chart(series, title, xlabel, ylabel, size=(520, 340), log_x=False):
    """series: [(name, [(x, y), ...])] -> a PIL line chart with axes, ticks and a legend."""
    W, H = size
    left, right, top, bottom = 60, 20, 30, 45
    xs = [x for _, pts in series for x, _ in pts]
    ys = [y for _, pts in series for _, y in pts]
    fx = (lambda v: math.log2(v)) if log_x else (lambda v: v)
    x0, x1 = fx(min(xs)), fx(max(xs))
    pad = 0.08 * (max(ys) - min(ys) or 1)
    y0, y1 = min(ys) - pad, max(ys) + pad
    to_px = lambda x, y: (left + (fx(x) - x0) / (x1 - x0 or 1) * (W - left - right),
                          H - bottom - (y - y0) / (y1 - y0) * (H - top - bottom))
    im = Image.new("RGB", size, (255, 255, 255))
    d = ImageDraw.Draw(im)
    d.rectangle([left, top, W - right, H - bottom], outline=(0, 0, 0))
    for x in sorted(set(xs)):
        px, _ = to_px(x, y0)
        d.line([px, H - bottom, px, H - bottom + 4], fill=(0, 0, 0))
        d.text((px - 8, H - bottom + 6), f"{x:g}", fill=(0, 0, 0))
    for i in range(5):
        y = y0 + (y1 - y0) * i / 4
        _, py = to_px(xs[0], y)
        d.line([left - 4, py, left, py], fill=(0, 0, 0))
        d.text((4, py - 5), f"{y:.2f}", fill=(0, 0, 0))
    for k, (name, pts) in enumerate(series):
        colour = COLOURS[k % len(COLOURS)]
        pixels = [to_px(x, y) for x, y in pts]
        d.line(pixels, fill=colour, width=2)
        for px, py in pixels:
            d.ellipse([px - 3, py - 3, px + 3, py + 3], fill=colour)
        d.text((W - right - 150, top + 6 + 14 * k), f"-- {name}", fill=colour)
    d.text((left, 8), title, fill=(0, 0, 0))
    d.text(((W - len(xlabel) * 6) // 2, H - 16), xlabel, fill=(0, 0, 0))
    d.text((left + 4, top + 4), ylabel, fill=(90, 90, 90))
    return im


def validation_curve(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", nargs="+", default=[], help="NAME=FOLDER of train.py runs (or FOLDER: named after it)")
    p.add_argument("--steps", default=None, help="JSON of sample quality per number of decoding steps")
    p.add_argument("--out-dir", default=os.path.dirname(os.path.abspath(__file__)))
    args = p.parse_args()
    if args.runs:
        named = [r.split("=", 1) if "=" in r else (os.path.basename(os.path.normpath(r)), r) for r in args.runs]
        series = [(name, validation_curve(folder)) for name, folder in named]
        chart(series, "validation loss (nats/token) vs RandAR step", "step", "").save(
            os.path.join(args.out_dir, "random_vs_raster.png"))
    if args.steps:
        with open(args.steps) as f:
            rows = sorted(json.load(f), key=lambda r: r["steps"])
        fd = chart([("FD", [(r["steps"], r["fd"]) for r in rows])], "FD vs decoding steps (N = 64)",
                   "decoding steps (log scale)", "", log_x=True)
        cc = chart([("class consistency", [(r["steps"], r["class_consistency"]) for r in rows])],
                   "class consistency vs decoding steps", "decoding steps (log scale)", "", log_x=True)
        both = Image.new("RGB", (fd.width + cc.width, fd.height), (255, 255, 255))
        both.paste(fd, (0, 0))
        both.paste(cc, (fd.width, 0))
        both.save(os.path.join(args.out_dir, "steps_quality.png"))


if __name__ == "__main__":
    main()
