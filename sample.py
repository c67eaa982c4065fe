r"""Sample from a trained RandAR: the figures, zero-shot editing, the FID protocol's images, the
benchmark.

    python sample.py                         # grid from runs/demo/last.pt, one row per class
    python sample.py grid --steps 22         # parallel decoding: 22 steps instead of 64
    python sample.py compare                 # raster vs random vs parallel, one figure
    python sample.py animate --class 7       # GIF: raster / random / parallel, step by step
    python sample.py inpaint img.png --mask 8,8,24,24 --edit-class 3
    python sample.py outpaint img.png --sides right --extend 8 --edit-class 9
    python sample.py extrapolate --factor 2  # 2x larger token grid, zero-shot
    python sample.py bench --preset demo --compile   # ms/image: eager / compiled, 1 or many/step
    torchrun --nproc_per_node=8 sample.py grid \
        --ckpt randar_0.7b_llamagen_360k_bs_1024_lr_0.0004.safetensors \
        --config randar_xl_0.7b_llamagen.yaml --vq-ckpt vq_ds16_c2i.pt \
        --per-class 50 --out-npz samples.npz

Every image comes from generate.generate (fast.generate_compiled with --compile): the order, the
number of steps and the known tokens (editing, docs/algorithm.md §7) are its arguments. With
--out-npz, grid writes the FID protocol's images through sample_ddp.py.
"""
import argparse
import itertools
import math
import os
import sys
from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image

import distributed
import fast
import files
import flags
import image_data
import tokenizer as tok
from checkpoints import load_model
from image_grid import image_grid
from randar import PRESETS, RandAR, make_order
from sample_ddp import decode_images, decoder, generate_batched, sample_to_npz, sampling_kwargs


def load_run(args):
    """RandAR (train.py checkpoint, or official .safetensors + --config/--preset) and its tokenizer.
    A release's YAML names its number of decoding steps: the default of --steps."""
    model, extras = load_model(args.ckpt, args.config, args.preset)
    args.data = extras.get("data")  # names the rows of figures
    if getattr(args, "steps", 0) is None:
        args.steps = extras.get("num_inference_steps")
    vq_path = args.vq_ckpt or os.path.join(os.path.dirname(args.ckpt), "tokenizer.pt")
    # the run's tokenizer, wherever train.py found it
    if args.vq_ckpt is None and not os.path.isfile(vq_path):
        vq_path = extras.get("tokenizer", vq_path)
    vq = tok.load_tokenizer(vq_path, args.device)
    args.vq_path = vq_path
    if vq.config.codebook_size != model.config.vocab_size:
        raise ValueError(f"tokenizer {vq_path} has {vq.config.codebook_size} codes but the model "
                         f"{model.config.vocab_size}")
    return model.to(args.device).eval(), vq


def save_figure(image, path):
    files.save_png(image, path)
    print(f"wrote {path}")


def check_classes(classes, model):
    classes = classes or list(range(model.config.num_classes))
    bad = [c for c in classes if not 0 <= c < model.config.num_classes]
    if bad:
        raise ValueError(f"class {bad[0]} is outside the model's range "
                         f"0..{model.config.num_classes - 1}")
    return classes


# ----------------------------------------------------------------------------------------------
# Figures. Images come in chunks of --batch-size, chunk c seeded by (--seed, c), so a figure shows
# the same images as the npz of the same command.

def grid(model, vq, args):
    classes = check_classes(args.classes, model)
    labels = torch.tensor(classes).repeat_interleave(args.per_class)
    if args.out_npz:
        sample_to_npz(model, vq, labels, args)
        if args.rank != 0 or not args.out:
            return
        images = torch.from_numpy(np.array(files.npz_array(args.out_npz, "arr_0")))
        images = images.permute(0, 3, 1, 2)
    # a figure only: rank 0 makes it alone (the same images as any split into chunks)
    elif args.rank == 0:
        images = generate_batched(model, vq, labels.to(args.device), args)[1]
    else:
        return
    names = image_data.class_names(args.data, classes)
    figure = image_grid(images, nrow=args.per_class, scale=args.scale, row_labels=names)
    save_figure(figure, args.out or default_out(args))


def default_out(args, ext="png"):
    folder = os.path.dirname(args.ckpt)
    return os.path.join(folder, f"{args.command}.{ext}"
                        if args.command != "grid" else f"sample.{ext}")


def compare(model, vq, args):
    """One row per decoding, named by its order and steps: raster and random order one token per
    step, then parallel decoding in fewer and fewer steps. Returns the rows' names and tokens."""
    labels = torch.tensor(check_classes(args.classes, model), device=args.device)
    N = model.config.block_size
    rows = [("raster", "raster", N), ("random", "random", N)]
    rows += [("parallel", "random", s) for s in (N // 2, round(N * 88 / 256), N // 4, N // 8)]
    names = []
    tokens = []
    images = []
    for kind, order, steps in rows:
        names.append(f"{kind}\n{steps} steps")
        row_tokens, row_images = generate_batched(model, vq, labels, args, desc=f"{kind} {steps}",
                                                  order=order, steps=steps)
        tokens.append(row_tokens)
        images.append(row_images)
    figure = image_grid(torch.cat(images), nrow=len(labels), row_labels=names, scale=args.scale)
    save_figure(figure, args.out or default_out(args))
    return names, tokens


# ----------------------------------------------------------------------------------------------
# Decoding, animated: one GIF frame per step, undecoded tokens grey.

def animate(model, vq, args):
    N = model.config.block_size
    grid_size = model.config.grid
    down = vq.config.downsample
    label = torch.tensor(check_classes([args.class_], model), device=args.device)
    movies = []
    for kind, steps in [("raster", N), ("random", N),
                        ("random", round(N * 88 / 256)), ("random", N // 4)]:
        g = torch.Generator(args.device).manual_seed(args.seed)
        # drawn here: every frame knows which positions are filled
        order = make_order(kind, 1, N, args.device, g)
        counts = []
        decode = decoder(args)
        with args.ctx:
            tokens = decode(model, label, generator=g,
                            callback=lambda step, logits, new: counts.append(new.size(1)),
                            **sampling_kwargs(args, order=order, steps=steps))
        movie = []
        filled = torch.zeros(N, dtype=torch.bool, device=args.device)
        for done in itertools.accumulate(counts):
            filled[order[0, :done]] = True
            # undecoded tokens as code 0 ...
            image = decode_images(vq, tokens * filled, grid_size)[0]
            mask = filled.view(grid_size, grid_size)
            mask = mask.repeat_interleave(down, 0).repeat_interleave(down, 1).cpu()
            # ... then painted grey
            movie.append(torch.where(mask, image, torch.full_like(image, 128)))
        movies.append((f"{kind} {len(counts)} steps", movie))
    write_gif(movies, args.out or default_out(args, "gif"), args.scale)


def write_gif(movies, path, scale):
    """The movies side by side, one frame per step of the longest; a finished movie holds its last
    frame."""
    names, movies = zip(*movies)
    frames = [image_grid(torch.stack([m[min(t, len(m) - 1)] for m in movies]), nrow=len(movies),
                         scale=scale, col_labels=names) for t in range(max(map(len, movies)))]
    durations = [150] * (len(frames) - 1) + [1500]  # hold the finished images a moment
    files.write_atomic(lambda f: frames[0].save(f, format="GIF", save_all=True,
                                                 append_images=frames[1:],
                                                 duration=durations, loop=0), path)
    print(f"wrote {path} ({len(frames)} frames)")


# ----------------------------------------------------------------------------------------------
# Zero-shot editing (docs/algorithm.md §7): known tokens are a teacher-forced prefix.

def load_image(path, size, channels):
    try:
        with Image.open(path) as im:
            im = im.convert("L" if channels == 1 else "RGB")
    except FileNotFoundError:
        raise FileNotFoundError(f"input image not found: {path}") from None
    except Exception as e:
        raise ValueError(f"cannot read input image {path}: {e}") from None
    if im.size != (size, size):
        raise ValueError(f"input image {path} is {im.size[0]}x{im.size[1]}; the "
                         f"model works at {size}x{size}")
    # (C, H, W)
    return torch.from_numpy(np.asarray(im).reshape(size, size, channels).copy()).permute(2, 0, 1)


def load_mask(spec, size):
    """'x0,y0,x1,y1' (pixels, x1/y1 exclusive) or a mask image of the input's size; True =
    regenerate."""
    if os.path.isfile(spec):
        with Image.open(spec) as im:
            if im.size != (size, size):
                raise ValueError(f"mask {spec} is {im.size[0]}x{im.size[1]} but "
                                 f"the image is {size}x{size}")
            return torch.from_numpy(np.asarray(im.convert("L")) > 127)
    try:
        x0, y0, x1, y1 = (int(v) for v in spec.split(","))
    except ValueError:
        raise ValueError(f"--mask must be a mask image or a box x0,y0,x1,y1, "
                         f"got {spec!r}") from None
    if not (0 <= x0 < x1 <= size and 0 <= y0 < y1 <= size):
        raise ValueError(f"--mask box {spec} does not fit in the {size}x{size} image")
    mask = torch.zeros(size, size, dtype=torch.bool)
    mask[y0:y1, x0:x1] = True
    return mask


def edit(model, vq, args):
    """Inpainting or outpainting: input | mask | masked input | several results, one PNG."""
    grid_size = model.config.grid
    down = vq.config.downsample
    size = grid_size * down
    image = load_image(args.image, size, vq.config.in_channels)
    if args.command == "inpaint":
        mask = load_mask(args.mask, size)
        canvas = image
    else:  # outpaint: shift the kept part away from the new sides, generate the exposed strip
        e = args.extend
        if e % down or e >= size:
            raise ValueError("--extend must be a positive multiple of "
                             f"{down} below {size}, got {e}")
        # new pixels on the right: content moves left
        shift_x = e * (("left" in args.sides) - ("right" in args.sides))
        shift_y = e * (("top" in args.sides) - ("bottom" in args.sides))
        mask = torch.ones(size, size, dtype=torch.bool)  # everything is new but the shifted image
        mask[max(shift_y, 0):size + min(shift_y, 0), max(shift_x, 0):size + min(shift_x, 0)] = False
        canvas = torch.roll(image, (shift_y, shift_x), dims=(1, 2)).masked_fill(mask, 0)
    # A token is regenerated when any pixel of its patch is masked.
    token_mask = F.max_pool2d(mask[None, None].float(), down)[0, 0].bool().flatten()  # (N,)
    tokens = vq.encode_images(canvas[None])[0].flatten()
    positions = (~token_mask).nonzero().flatten().to(args.device)
    if len(positions) == model.config.block_size:
        raise ValueError("the mask covers no token: nothing to generate")
    n = args.results
    labels = torch.full((n,), check_classes([args.edit_class], model)[0], device=args.device)
    known = (positions.expand(n, -1), tokens[positions].expand(n, -1))
    tokens, results = generate_batched(model, vq, labels, args, known=known, desc="editing")
    shown_mask = mask[None].expand_as(image).to(torch.uint8) * 255
    masked_input = torch.where(mask, torch.full_like(canvas, 128), canvas)
    panels = torch.cat([image[None], shown_mask[None], masked_input[None], results])
    # outpaint shifts the input
    kept = "kept" if args.command == "inpaint" else f"kept, moved {args.extend} px"
    names = ["original", "mask", kept] + [f"result {i + 1}" for i in range(n)]
    figure = image_grid(panels, nrow=n + 3, scale=args.scale, col_labels=names)
    save_figure(figure, args.out or default_out(args))
    return tokens, known


def extrapolate(model, vq, args):
    """Zero-shot resolution extrapolation (docs/algorithm.md §8): a sample at the training grid g
    gives the known tokens at (f*r, f*c) of the G = f*g grid; the rest is generated in random order
    with the NTK-mixed RoPE and spatial CFG. Figure: each base (upscaled) next to its
    extrapolation. Returns the base tokens [B, g*g] and the extrapolated ones [B, G*G]."""
    f = args.factor
    g = model.config.grid
    classes = torch.tensor(check_classes(args.classes, model), device=args.device)
    labels = classes.repeat_interleave(args.per_class)
    base, base_images = generate_batched(model, vq, labels, args, desc="base")
    G = f * g
    positions = ((torch.arange(g) * f * G)[:, None] + torch.arange(g) * f).flatten().to(args.device)
    known = (positions.expand(len(labels), -1), base)
    big_tokens, big = generate_batched(model, vq, labels, args, known=known, desc="extrapolate",
                                       grid=G, order="random", steps=args.extrapolate_steps,
                                       spatial_cfg_scale=args.spatial_cfg,
                                       ntk_boundary=args.ntk_boundary)
    up = base_images.repeat_interleave(f, dim=2).repeat_interleave(f, dim=3)
    # base, extrapolated, base, extrapolated, ...
    pairs = torch.stack([up, big], dim=1).flatten(0, 1)
    names = ["base", "extrapolated"] * args.per_class
    figure = image_grid(pairs, nrow=2 * args.per_class, scale=args.scale, col_labels=names)
    save_figure(figure, args.out or default_out(args))
    return base, big_tokens


# ----------------------------------------------------------------------------------------------
# The command line

def setup(args):
    """Device, autocast, and torchrun's rank / world size (grid is the only command that splits
    work)."""
    if "RANK" in os.environ and args.command != "grid":
        raise ValueError(f"only `sample.py grid` runs under torchrun, not {args.command!r}")
    args.rank, args.world, args.device = distributed.setup_distributed(args.device)
    if args.device.type == "cuda":
        args.ctx = torch.autocast("cuda", dtype=torch.bfloat16)
    else:
        args.ctx = nullcontext()


def main(args):
    # before any work, not after
    for out in (getattr(args, "out", None), getattr(args, "out_npz", None)):
        if out:
            files.check_output(out)
    setup(args)
    torch.manual_seed(args.seed)
    try:
        random_weights = args.command == "bench" and args.preset
        args.ckpt = args.ckpt or (None if random_weights else "runs/demo/last.pt")
        # no tokenizer needed; --preset without --ckpt: random weights of that size
        if args.command == "bench":
            if args.ckpt is None:
                model = RandAR(PRESETS[args.preset])
            else:
                model = load_model(args.ckpt, args.config, args.preset)[0]
            print(f"{model.config.dim}-wide, {model.config.n_layer} layers, device "
                  f"{args.device}, CFG {args.cfg}")
            print("\n".join(fast.benchmark(model.to(args.device).eval(), args.sizes,
                                           (1, args.bench_batch), args.cfg, args.compile,
                                           args.repeats, args.ctx)))
            return
        model, vq = load_run(args)
        if getattr(args, "steps", None) is not None and args.steps > model.config.block_size:
            raise ValueError(f"--steps must be between 1 and {model.config.block_size} (the number "
                             f"of tokens), got {args.steps}")
        {"grid": grid, "compare": compare, "animate": animate, "inpaint": edit, "outpaint": edit,
         "extrapolate": extrapolate}[args.command](model, vq, args)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def comma_list(kind, what, check=lambda values: True):
    """An argparse type: a comma list of `kind` values that pass `check`, else one line naming
    `what`."""
    def parse(text):
        try:
            values = [kind(v) for v in text.split(",")]
        except ValueError:
            values = None
        if not values or not check(values):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
        return values
    return parse


number_pair = comma_list(float, "START,END (two numbers)",
                         lambda v: len(v) == 2 and all(map(math.isfinite, v)))
class_list = comma_list(int, "a comma list of class indices")
square_list = comma_list(int, "a comma list of square token counts (64,256)",
                         lambda v: all(n > 0 and math.isqrt(n) ** 2 == n for n in v))
side_list = comma_list(str, "a comma list of left,right,top,bottom",
                       lambda v: set(v) <= {"left", "right", "top", "bottom"})
COMMANDS = ("grid", "compare", "animate", "inpaint", "outpaint", "extrapolate", "bench")


def get_parser():
    """One subcommand per figure or job; each takes the flags of the groups it belongs to."""
    p = flags.ArgumentParser(description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    parsers = {name: sub.add_parser(name) for name in COMMANDS}

    def add(names, *flag, **kw):
        for name in names.split():
            parsers[name].add_argument(*flag, **kw)
    add_model_flags(add)
    add_image_flags(add)
    add_editing_flags(add)
    return p


def add_model_flags(add):
    """Flags of every command (the model, the device) and of bench."""
    every = " ".join(COMMANDS)
    add(every, "--ckpt", default=None,
        help="train.py checkpoint or official .safetensors (default runs/demo/last.pt)")
    add(every, "--config", default=None, help="official YAML config of a .safetensors checkpoint")
    add(every, "--preset", default=None, choices=PRESETS,
        help="config of a .safetensors (bench: random weights)")
    add(every, "--device", default="auto")
    add(every, "--seed", type=int, default=0)
    add(every, "--compile", action="store_true",
        help="torch.compile the decode step (bench: add compiled rows)")
    add(every, "--cfg", type=number_pair, default=flags.DEFAULT_CFG,
        help="START,END of the linear CFG schedule")
    add("bench", "--bench-batch", type=flags.positive_int, default=32,
        help="the batch measured beside batch 1")
    add("bench", "--repeats", type=flags.positive_int, default=3)
    add("bench", "--sizes", type=square_list, default=[64, 256],
        help="tokens N per image (squares; any grid size)")


def add_image_flags(add):
    """Flags of the commands that decode images."""
    images = "grid compare animate inpaint outpaint extrapolate"
    add(images, "--vq-ckpt", default=None, help="tokenizer: train.py's, vq_ds16_c2i.pt or "
        "MaskGIT's .bin (default: tokenizer.pt beside --ckpt)")
    add(images, "--out", default=None, help="figure to write (default: beside the checkpoint)")
    add(images, "--scale", type=flags.positive_int, default=4,
        help="pixel upscaling of figures (nearest)")
    add(images, "--temperature", type=flags.non_negative_number, default=1.0)
    add(images, "--top-k", type=flags.non_negative_int, default=0)
    add(images, "--top-p", type=flags.in_range(float, 0, 1, open_low=True), default=1.0)
    add(images, "--batch-size", type=flags.positive_int, default=100,
        help="images per generate() call")
    add("grid inpaint outpaint extrapolate", "--order", default="random",
        choices=["random", "raster"])
    add("grid inpaint outpaint extrapolate", "--steps", type=flags.positive_int, default=None,
        help="decoding steps, fewer than N: parallel (default: N, or a release "
        "YAML's num_inference_steps)")
    add("grid extrapolate", "--per-class", type=flags.positive_int, default=8,
        help="images per class")
    add("grid compare extrapolate", "--classes", type=class_list, default=None,
        help="comma list (default: all)")
    add("grid", "--out-npz", default=None,
        help="write images (uint8 NHWC, arr_0) and labels (arr_1)")
    add("animate", "--class", dest="class_", type=int, default=0, help="class to decode")


def add_editing_flags(add):
    add("inpaint outpaint", "image", help="input image at the model's resolution")
    add("inpaint outpaint", "--edit-class", type=int, required=True,
        help="class the new region is generated as")
    add("inpaint outpaint", "--results", type=flags.positive_int, default=6,
        help="edited images to generate")
    add("inpaint", "--mask", required=True,
        help="mask image (white = regenerate) or box x0,y0,x1,y1")
    add("outpaint", "--sides", default=["right"], type=side_list,
        help="comma list of left,right,top,bottom")
    add("outpaint", "--extend", type=flags.positive_int, default=8,
        help="pixels to generate on each new side")
    add("extrapolate", "--factor", type=flags.in_range(int, 2), default=2,
        help="times the training grid")
    add("extrapolate", "--extrapolate-steps", type=flags.positive_int, default=None,
        help="steps for the new tokens")
    add("extrapolate", "--spatial-cfg", type=number_pair, default=(1.0, 2.0),
        help="START,END of spatial CFG")
    add("extrapolate", "--ntk-boundary", type=flags.non_negative_int, default=None, help="highest "
        "RoPE frequencies that keep raw coordinates (default: generate.default_ntk_boundary)")


def parse(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] not in COMMANDS + ("-h", "--help"):
        argv = ["grid"] + argv  # `python sample.py [flags]` is the grid command
    p = get_parser()
    args = p.parse_args(argv)
    if getattr(args, "temperature", 1) == 0 and args.top_k != 1:
        p.error("--temperature 0 needs --top-k 1 (greedy decoding); "
                "sampling needs a temperature > 0")
    return args


def cli(argv=None):
    """The command line (argv: sys.argv[1:] when None); every expected failure is one line and exit
    status 1."""
    flags.run(main, parse(argv))


if __name__ == "__main__":
    cli()
