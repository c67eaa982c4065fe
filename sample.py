"""Sample from a trained RandAR: any order, parallel decoding, zero-shot editing, a speed benchmark.

    python sample.py                                    # grid from runs/demo/last.pt, one row per class
    python sample.py --steps 24 --cfg 1,3               # parallel decoding: 24 steps instead of 64
    python sample.py --compare                          # raster vs random vs parallel, one figure
    python sample.py --inpaint img.png --mask 8,8,24,24 --edit-class 3
    python sample.py --outpaint img.png --sides right --extend 8
    python sample.py --bench                            # ms/image: uncached, cached, parallel
    python sample.py --bench --preset L --device cuda   # the paper's size, random weights

Everything generated goes through one function, RandAR.generate (randar.py): the order, the number
of steps and the known tokens (editing, SPEC §6) are its arguments.
"""
import argparse
import os
import statistics
import sys
import time
from contextlib import nullcontext

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

import tokenizer as tok
from randar import PRESETS, KVCache, RandAR, RandARConfig


def load_run(ckpt_path, device):
    """RandAR and its tokenizer, rebuilt from the configs stored in train.py's checkpoint."""
    if not os.path.isfile(ckpt_path):
        raise FileNotFoundError(f"checkpoint not found: {ckpt_path} (run `python train.py` first)")
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    if "config" not in ckpt or "model" not in ckpt:
        raise ValueError(f"{ckpt_path} is not a RandAR checkpoint written by train.py")
    model = RandAR(RandARConfig.from_dict(ckpt["config"]))
    model.load_state_dict(ckpt["model"], strict=True)
    vq_path = ckpt.get("tokenizer", "")
    if not os.path.isfile(vq_path):  # the run folder was moved: look beside the checkpoint
        vq_path = os.path.join(os.path.dirname(ckpt_path), "tokenizer.pt")
    vq = tok.load_tokenizer(vq_path, device)
    if vq.config.codebook_size != model.config.vocab_size:
        raise ValueError(f"tokenizer {vq_path} has {vq.config.codebook_size} codes but the model "
                         f"{model.config.vocab_size}")
    return model.to(device).eval(), vq


def decode_images(vq, tokens, grid):
    return tok.to_uint8(vq.decode(tokens.view(-1, grid, grid)).float()).cpu()  # (B, C, H, W)


def generate_batched(model, vq, labels, args, known=None, desc="sampling", **extra):
    """Tokens and images for every label, in batches of --batch-size, reproducible from --seed."""
    g = torch.Generator(labels.device).manual_seed(args.seed)
    tokens = []
    for i in tqdm(range(0, len(labels), args.batch_size), desc=desc):
        sl = slice(i, i + args.batch_size)
        part_known = None if known is None else (known[0][sl], known[1][sl])
        with args.ctx:
            tokens.append(model.generate(labels[sl], order=args.order, steps=args.steps, cfg=args.cfg,
                                         temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                                         known=part_known, generator=g, **extra))
    tokens = torch.cat(tokens)
    return tokens, decode_images(vq, tokens, extra.get("grid") or model.config.grid)


def save_figure(image, path):
    tok.save_png(image, path)
    print(f"wrote {path}")


# ----------------------------------------------------------------------------------------------
# Zero-shot editing (SPEC §6): known tokens are a teacher-forced prefix.

def load_image(path, size, channels):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"input image not found: {path}")
    try:
        with Image.open(path) as im:
            im = im.convert("L" if channels == 1 else "RGB")
    except Exception as e:
        raise ValueError(f"cannot read input image {path}: {e}") from None
    if im.size != (size, size):
        raise ValueError(f"input image {path} is {im.size[0]}x{im.size[1]}; the model works at {size}x{size}")
    arr = np.asarray(im)
    return torch.from_numpy(arr.reshape(size, size, channels).copy()).permute(2, 0, 1)  # (C, H, W) uint8


def load_mask(spec, size):
    """'x0,y0,x1,y1' (pixels, x1/y1 exclusive) or a mask image of the input's size; True = regenerate."""
    if os.path.isfile(spec):
        with Image.open(spec) as im:
            if im.size != (size, size):
                raise ValueError(f"mask {spec} is {im.size[0]}x{im.size[1]} but the image is {size}x{size}")
            return torch.from_numpy(np.asarray(im.convert("L")) > 127)
    try:
        x0, y0, x1, y1 = (int(v) for v in spec.split(","))
    except ValueError:
        raise ValueError(f"--mask must be a mask image or a box x0,y0,x1,y1, got {spec!r}") from None
    if not (0 <= x0 < x1 <= size and 0 <= y0 < y1 <= size):
        raise ValueError(f"--mask box {spec} does not fit in the {size}x{size} image")
    mask = torch.zeros(size, size, dtype=torch.bool)
    mask[y0:y1, x0:x1] = True
    return mask


def edit(model, vq, args):
    """Inpainting or outpainting: input | mask | several results, one PNG."""
    grid, down = model.config.grid, vq.config.downsample
    size = grid * down
    if args.edit_class is None:
        raise ValueError("editing needs --edit-class C: the class to generate the new region as")
    image = load_image(args.inpaint or args.outpaint, size, vq.config.in_channels)
    if args.inpaint:
        if args.mask is None:
            raise ValueError("--inpaint needs --mask (a mask image or a box x0,y0,x1,y1)")
        mask = load_mask(args.mask, size)
        canvas = image
    else:  # outpaint: shift the kept part away from the new sides, generate the exposed strip
        e = args.extend
        if e <= 0 or e % down or e >= size:
            raise ValueError(f"--extend must be a positive multiple of {down} below {size}, got {e}")
        sides = args.sides.split(",")
        if any(s not in ("left", "right", "top", "bottom") for s in sides):
            raise ValueError(f"--sides must be a comma list of left,right,top,bottom, got {args.sides!r}")
        shift_x = e * (("left" in sides) - ("right" in sides))  # new pixels on the right: content moves left
        shift_y = e * (("top" in sides) - ("bottom" in sides))
        mask = torch.ones(size, size, dtype=torch.bool)  # everything is new but the shifted image
        mask[max(shift_y, 0):size + min(shift_y, 0), max(shift_x, 0):size + min(shift_x, 0)] = False
        canvas = torch.roll(image, (shift_y, shift_x), dims=(1, 2)).masked_fill(mask, 0)
    # A token is regenerated when any pixel of its patch is masked.
    token_mask = F.max_pool2d(mask[None, None].float(), down)[0, 0].bool().flatten()  # (N,)
    tokens = vq.encode(tok.to_pixels(canvas[None].to(args.device)))[0].flatten()
    positions = (~token_mask).nonzero().flatten().to(args.device)
    if len(positions) == model.config.block_size:
        raise ValueError("the mask covers no token: nothing to generate")
    n = args.num
    labels = torch.full((n,), check_classes([args.edit_class], model)[0], device=args.device)
    known = (positions.expand(n, -1), tokens[positions].expand(n, -1))
    tokens, results = generate_batched(model, vq, labels, args, known=known, desc="editing")
    shown_mask = (mask[None].expand_as(image).to(torch.uint8) * 255)
    masked_input = torch.where(mask, torch.full_like(canvas, 128), canvas)
    figure = tok.image_grid(torch.cat([image[None], shown_mask[None], masked_input[None], results]), nrow=n + 3)
    save_figure(figure, args.out)
    return tokens, known


def extrapolate(model, vq, labels, args):
    """Zero-shot resolution extrapolation (SPEC §7): a factor-times larger token grid.

    First an ordinary sample at the training grid g; its tokens become the known tokens at
    positions (f*r, f*c) of the G = f*g grid; the rest is generated in random order with the
    NTK-mixed RoPE table and spatial CFG. Figure: base (upscaled) next to its extrapolation.
    """
    f, g = args.extrapolate, model.config.grid
    if f < 2:
        raise ValueError(f"--extrapolate must be an integer >= 2, got {f}")
    base, base_images = generate_batched(model, vq, labels, args, desc="base")
    G = f * g
    positions = ((torch.arange(g) * f * G)[:, None] + torch.arange(g) * f).flatten().to(labels.device)
    known = (positions.expand(len(labels), -1), base)
    args.order, args.steps = "random", args.extrapolate_steps
    _, big = generate_batched(model, vq, labels, args, known=known, desc="extrapolate", grid=G,
                              spatial_cfg=args.spatial_cfg, ntk_boundary=args.ntk_boundary)
    up = base_images.repeat_interleave(f, dim=2).repeat_interleave(f, dim=3)
    pairs = torch.stack([up, big], dim=1).flatten(0, 1)  # base, extrapolated, base, extrapolated, ...
    save_figure(tok.image_grid(pairs, nrow=2 * args.num), args.out)


# ----------------------------------------------------------------------------------------------
# Speed benchmark

@torch.no_grad()
def uncached_generate(model, labels):
    """One token per step, recomputing the whole sequence every step (the slow baseline)."""
    B, N = labels.size(0), model.config.block_size
    order = model.make_order("random", B)
    generated = torch.zeros(B, N, dtype=torch.long, device=labels.device)
    for k in range(N):
        model.kv_caches = [KVCache(1 + 2 * N) for _ in model.layers]
        logits = model.prefill(labels, order, generated[:, :k], 1)
        generated[:, k] = logits[:, 0].argmax(-1)
    return generated


def bench(model, args):
    N = model.config.block_size
    variants = [("uncached, 1 token/step", lambda l: uncached_generate(model, l)),
                ("cached raster, 1 token/step", lambda l: model.generate(l, order="raster", steps=N)),
                ("cached random, 1 token/step", lambda l: model.generate(l, order="random", steps=N))]
    for s in sorted({N // 2, round(N * 88 / 256), N // 4, N // 8}, reverse=True):
        variants.append((f"parallel random, {s} steps", lambda l, s=s: model.generate(l, order="random", steps=s)))
    sync = torch.cuda.synchronize if args.device.type == "cuda" else (lambda: None)
    rows = []
    for batch in (1, args.bench_batch):
        labels = torch.arange(batch, device=args.device) % model.config.num_classes
        times = {}
        for name, fn in variants:
            with args.ctx:
                fn(labels)  # warm-up, excluded
                runs = []
                for _ in range(args.repeats):
                    sync()
                    t = time.perf_counter()
                    fn(labels)
                    sync()
                    runs.append(time.perf_counter() - t)
            times[name] = statistics.median(runs)
        base = times["cached random, 1 token/step"]
        for name, t in times.items():
            rows.append((batch, name, 1000 * t / batch, batch / t, base / t))
    print(f"\n{model.config.dim}-wide, {model.config.n_layer} layers, N={N} tokens, device {args.device}, "
          f"median of {args.repeats}")
    print("| batch | decoding | ms / image | images / s | speed-up vs cached random |")
    print("|---|---|---|---|---|")
    for batch, name, ms, ips, speedup in rows:
        print(f"| {batch} | {name} | {ms:.2f} | {ips:.1f} | {speedup:.2f}x |")


# ----------------------------------------------------------------------------------------------

def check_classes(classes, model):
    bad = [c for c in classes if not 0 <= c < model.config.num_classes]
    if bad:
        raise ValueError(f"class {bad[0]} is outside the model's range 0..{model.config.num_classes - 1}")
    return classes


def main(args):
    args.device = torch.device(args.device if args.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu")
    args.ctx = torch.autocast("cuda", dtype=torch.bfloat16) if args.device.type == "cuda" else nullcontext()
    args.out = args.out or os.path.join(os.path.dirname(args.ckpt), "sample.png")
    torch.manual_seed(args.seed)
    if args.bench and args.preset:  # random weights: the paper sizes timed without a checkpoint
        model = RandAR(PRESETS[args.preset]).to(args.device).eval()
        return bench(model, args)
    model, vq = load_run(args.ckpt, args.device)
    N = model.config.block_size
    if args.steps is not None and not 1 <= args.steps <= N:
        raise ValueError(f"--steps must be between 1 and {N} (the number of tokens), got {args.steps}")
    if args.bench:
        return bench(model, args)
    if args.inpaint or args.outpaint:
        return edit(model, vq, args)
    classes = check_classes(args.classes or list(range(model.config.num_classes)), model)
    if args.compare:
        labels = torch.tensor(classes, device=args.device)
        names, images = [], []
        for name, order, steps in [("raster", "raster", N), ("random", "random", N)] + \
                [(f"{s} steps", "random", s) for s in (N // 2, N // 4, N // 8)]:
            args.order, args.steps = order, steps
            images.append(generate_batched(model, vq, labels, args, desc=name)[1])
            names.append(name)
        save_figure(tok.image_grid(torch.cat(images), nrow=len(classes), row_labels=names, label_width=56), args.out)
        return
    labels = torch.tensor(classes, device=args.device).repeat_interleave(args.num)
    if args.extrapolate:
        return extrapolate(model, vq, labels, args)
    _, images = generate_batched(model, vq, labels, args)
    save_figure(tok.image_grid(images, nrow=args.num), args.out)
    if args.out_npz:
        tmp = args.out_npz + ".tmp.npz"
        np.savez(tmp, arr_0=images.permute(0, 2, 3, 1).numpy(), arr_1=labels.cpu().numpy())
        os.replace(tmp, args.out_npz)
        print(f"wrote {args.out_npz}")


def get_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default="runs/demo/last.pt")
    p.add_argument("--order", default="random", choices=["random", "raster"])
    p.add_argument("--steps", type=int, default=None, help="decoding steps; fewer than N = parallel decoding")
    p.add_argument("--cfg", default="1,2", help="START,END of the linear CFG schedule")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--classes", default=None, help="comma list (default: all)")
    p.add_argument("--num", type=int, default=8, help="images per class")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default=None, help="PNG to write (default: sample.png beside the checkpoint)")
    p.add_argument("--out-npz", default=None, help="also write images (uint8 NHWC, arr_0) and labels (arr_1)")
    p.add_argument("--compare", action="store_true", help="raster vs random vs parallel in one figure")
    p.add_argument("--inpaint", default=None, help="image to inpaint (needs --mask)")
    p.add_argument("--mask", default=None, help="mask image (white = regenerate) or box x0,y0,x1,y1")
    p.add_argument("--outpaint", default=None, help="image to extend")
    p.add_argument("--sides", default="right", help="comma list of left,right,top,bottom")
    p.add_argument("--extend", type=int, default=8, help="pixels to generate on each outpainted side")
    p.add_argument("--edit-class", type=int, default=None, help="class the edited region is generated as")
    p.add_argument("--extrapolate", type=int, default=None, help="generate at this many times the training grid")
    p.add_argument("--extrapolate-steps", type=int, default=None, help="steps for the extrapolated tokens")
    p.add_argument("--spatial-cfg", default="1,2", help="START,END of the spatial CFG schedule (extrapolation)")
    p.add_argument("--ntk-boundary", type=int, default=2,
                   help="highest RoPE frequencies that keep raw coordinates when extrapolating (reference: 2)")
    p.add_argument("--bench", action="store_true", help="print a decoding speed table")
    p.add_argument("--preset", default=None, choices=PRESETS, help="with --bench: random weights of this size")
    p.add_argument("--bench-batch", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    return p


def parse(argv=None):
    args = get_parser().parse_args(argv)
    for name in ("cfg", "spatial_cfg"):
        try:
            pair = tuple(float(v) for v in getattr(args, name).split(","))
            assert len(pair) == 2
        except (ValueError, AssertionError):
            raise ValueError(f"--{name.replace('_', '-')} must be START,END (two numbers), got "
                             f"{getattr(args, name)!r}") from None
        setattr(args, name, pair)
    args.classes = [int(c) for c in args.classes.split(",")] if args.classes else None
    return args


if __name__ == "__main__":
    try:
        torch.set_num_threads(os.cpu_count() or 1)
        main(parse())
    except (ValueError, FileNotFoundError, OSError) as e:
        sys.exit(f"error: {e}")
