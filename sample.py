r"""Sample from a trained RandAR: the figures, zero-shot editing, the FID protocol's images, the benchmark.

    python sample.py                                   # grid from runs/demo/last.pt, one row per class
    python sample.py grid --steps 22                   # parallel decoding: 22 steps instead of 64
    python sample.py compare                           # raster vs random vs parallel, one figure
    python sample.py animate --class 7                 # GIF: raster / random / parallel decoding, step by step
    python sample.py inpaint img.png --mask 8,8,24,24 --edit-class 3
    python sample.py outpaint img.png --sides right --extend 8 --edit-class 9
    python sample.py extrapolate --factor 2            # 2x larger token grid, zero-shot
    python sample.py bench --preset demo --compile     # ms/image: eager / compiled, 1 token/step / parallel
    torchrun --nproc_per_node=8 sample.py grid --ckpt randar_0.7b_llamagen_360k_bs_1024_lr_0.0004.safetensors \
        --config randar_xl_0.7b_llamagen.yaml --vq-ckpt vq_ds16_c2i.pt --per-class 50 --out-npz samples.npz

Every image comes from generate.generate: the order, the number of steps and the known tokens (editing,
docs/algorithm.md §7) are its arguments. Sections: loading, the FID protocol's sampler, figures, editing, commands.
"""
import argparse
import hashlib
import itertools
import json
import math
import os
import shutil
import sys
from contextlib import nullcontext
from dataclasses import asdict

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

import common
import tokenizer as tok
from generate import benchmark, generate
from randar import PRESETS, RandAR, load_model, make_order


def load_run(args):
    """RandAR (train.py checkpoint, or official .safetensors + --config/--preset) and its tokenizer. A release's
    YAML names its number of decoding steps: the default of --steps."""
    model, extras = load_model(args.ckpt, args.config, args.preset)
    if getattr(args, "steps", 0) is None:
        args.steps = extras.get("num_inference_steps")
    vq_path = args.vq_ckpt or os.path.join(os.path.dirname(args.ckpt), "tokenizer.pt")
    if args.vq_ckpt is None and not os.path.isfile(vq_path):  # the run's tokenizer, wherever train.py found it
        vq_path = extras.get("tokenizer", vq_path)
    vq, args.vq_path = tok.load_tokenizer(vq_path, args.device), vq_path
    if vq.config.codebook_size != model.config.vocab_size:
        raise ValueError(f"tokenizer {vq_path} has {vq.config.codebook_size} codes but the model "
                         f"{model.config.vocab_size}")
    return model.to(args.device).eval(), vq


def decode_images(vq, tokens, grid):
    return vq.decode_images(tokens.view(-1, grid, grid)).cpu()  # (B, C, H, W) uint8


def sampling_kwargs(args, **overrides):
    kw = dict(order=getattr(args, "order", "random"), steps=getattr(args, "steps", None), cfg_scale=args.cfg,
              temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, compile=args.compile)
    return {**kw, **overrides}


def generate_batched(model, vq, labels, args, known=None, desc="sampling", first_chunk=0, **kw):
    """Tokens and images for every label in chunks of --batch-size. Chunk c draws from its own generator
    seeded (--seed, c): the images do not depend on how chunks are spread over processes. desc None:
    no progress bar."""
    tokens = []
    for i in tqdm(range(0, len(labels), args.batch_size), desc=desc, disable=args.rank != 0 or desc is None):
        sl = slice(i, i + args.batch_size)
        g = torch.Generator(args.device).manual_seed(args.seed * 1_000_003 + first_chunk + i // args.batch_size)
        with args.ctx:
            tokens.append(generate(model, labels[sl], known=None if known is None else (known[0][sl], known[1][sl]),
                                   generator=g, **sampling_kwargs(args, **kw)))
    tokens = torch.cat(tokens)
    return tokens, decode_images(vq, tokens, kw.get("grid") or model.config.grid)


def save_figure(image, path):
    common.save_png(image, path)
    print(f"wrote {path}")


def check_classes(classes, model):
    classes = classes or list(range(model.config.num_classes))
    bad = [c for c in classes if not 0 <= c < model.config.num_classes]
    if bad:
        raise ValueError(f"class {bad[0]} is outside the model's range 0..{model.config.num_classes - 1}")
    return classes


# ----------------------------------------------------------------------------------------------
# grid / npz: the FID protocol's sampler. Images come in chunks of --batch-size, chunk c seeded by
# (--seed, c), so the result does not depend on the number of processes or on interruptions.

def grid(model, vq, args):
    labels = torch.tensor(check_classes(args.classes, model)).repeat_interleave(args.per_class)
    if args.out_npz:
        sample_to_npz(model, vq, labels, args)
        if args.rank != 0 or not args.out:
            return
        images = torch.from_numpy(np.array(common.npz_array(args.out_npz, "arr_0"))).permute(0, 3, 1, 2)
    elif args.rank == 0:  # a figure only: rank 0 makes it alone (the same images as any split into chunks)
        images = generate_batched(model, vq, labels.to(args.device), args)[1]
    else:
        return
    save_figure(common.image_grid(images, nrow=args.per_class, scale=args.scale), args.out or default_out(args))


def chunk_path(parts, c):
    return os.path.join(parts, f"chunk_{c:05d}.npz")


def sample_to_npz(model, vq, labels, args):
    """Every chunk goes to <out-npz>.parts/ as soon as its rank has made it (nothing is gathered in memory);
    rank 0 then streams the chunks into one npz and removes the parts. Rerunning the same command after a
    crash makes only the chunks still missing; parts made with other settings are refused."""
    parts, n_chunks = args.out_npz + ".parts", -(-len(labels) // args.batch_size)
    lock = []

    def start():  # rank 0: one job per parts folder, the same settings as the chunks on disk, what is left
        lock.append(common.FolderLock(parts, "parts folder"))
        for name in os.listdir(parts):  # temporaries of a killed run: chunks, and the npz being assembled
            if ".tmp" in name:
                os.remove(os.path.join(parts, name))
        common.remove_stale_temps(args.out_npz)
        check_settings(parts, model, labels, args)
        return [c for c in range(n_chunks) if not os.path.exists(chunk_path(parts, c))]
    try:
        todo = common.rank0_decides(start, args.rank)
        if args.rank == 0 and len(todo) < n_chunks:
            print(f"{parts}: {n_chunks - len(todo)} of {n_chunks} chunks already on disk, {len(todo)} to make")
        bar = tqdm(total=n_chunks, initial=n_chunks - len(todo), unit="chunk", desc="sampling", disable=args.rank != 0)
        for c in todo[args.rank::args.world]:  # the missing chunks, shared round-robin by the ranks
            chunk = labels[c * args.batch_size:(c + 1) * args.batch_size].to(args.device)
            images = generate_batched(model, vq, chunk, args, first_chunk=c, desc=None)[1]
            common.save_atomic_npz(chunk_path(parts, c), images=images.permute(0, 2, 3, 1).numpy())
            bar.update(min(args.world, n_chunks - bar.n))  # the other ranks make theirs alongside
        bar.close()
        if args.world > 1:
            dist.barrier()  # every chunk is on disk
        if args.rank == 0:
            assemble(parts, n_chunks, labels, args.out_npz)
            shutil.rmtree(parts)
            print(f"wrote {len(labels)} images to {args.out_npz}")
    finally:
        if lock:
            lock[0].release()


def check_settings(parts, model, labels, args):
    """Everything that decides a chunk's images (not the number of processes), as the flags name it: written
    beside the first chunks, and compared on every rerun."""
    settings = {"--ckpt contents": common.file_fingerprint(args.ckpt),
                "model config": asdict(model.config), "--vq-ckpt contents": common.file_fingerprint(args.vq_path),
                "device type": args.device.type, "--cfg": args.cfg, "--steps": args.steps, "--order": args.order,
                "--temperature": args.temperature, "--top-k": args.top_k, "--top-p": args.top_p,
                "--seed": args.seed, "--batch-size": args.batch_size, "labels (--classes, --per-class)":
                hashlib.sha256(labels.numpy().tobytes()).hexdigest()[:16]}
    settings = json.loads(json.dumps(settings))  # tuples as lists, as they come back from the file
    path = os.path.join(parts, "settings.json")
    if not os.path.exists(path):
        return common.write_atomic(lambda f: f.write(json.dumps(settings, indent=1).encode()), path)
    try:
        with open(path) as f:
            recorded = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path} is unreadable ({e}); delete {parts} to start again") from None
    for key in settings:
        if recorded.get(key) != settings[key]:
            raise ValueError(f"{parts} holds chunks made with {key} = {recorded.get(key)}, not {settings[key]}; "
                             f"rerun with the same settings, or delete {parts}")


def assemble(parts, n_chunks, labels, out):
    """Rank 0: the chunks, in order, streamed into one ADM-layout npz (arr_0 uint8 NHWC, arr_1 labels):
    one chunk in memory at a time."""
    missing = [c for c in range(n_chunks) if not os.path.exists(chunk_path(parts, c))]
    if missing:
        raise ValueError(f"{parts}: chunk {missing[0]} is missing ({len(missing)} in all); rerun the command")
    shape = (len(labels), *common.npz_array(chunk_path(parts, 0), "images").shape[1:])
    pieces = (common.npz_array(chunk_path(parts, c), "images") for c in range(n_chunks))
    common.write_atomic(lambda f: common.write_npz(f, {"arr_0": (np.uint8, shape, pieces),
                                                       "arr_1": (np.int64, labels.shape, [labels.numpy()])}), out)


def default_out(args, ext="png"):
    folder = os.path.dirname(args.ckpt)
    return os.path.join(folder, f"{args.command}.{ext}" if args.command != "grid" else f"sample.{ext}")


def compare(model, vq, args):
    """One row per decoding: raster, random, then parallel with fewer and fewer steps."""
    labels, N = torch.tensor(check_classes(args.classes, model), device=args.device), model.config.block_size
    names, images = [], []
    for name, order, steps in [("raster", "raster", N), ("random", "random", N)] + \
            [(f"{s} steps", "random", s) for s in (N // 2, round(N * 88 / 256), N // 4, N // 8)]:
        images.append(generate_batched(model, vq, labels, args, desc=name, order=order, steps=steps)[1])
        names.append(name)
    save_figure(common.image_grid(torch.cat(images), nrow=len(labels), row_labels=names, label_width=56,
                                  scale=args.scale), args.out or default_out(args))


# ----------------------------------------------------------------------------------------------
# Decoding, animated: one GIF frame per step, undecoded tokens grey.

def animate(model, vq, args):
    N, grid_size, down = model.config.block_size, model.config.grid, vq.config.downsample
    label = torch.tensor(check_classes([args.class_], model), device=args.device)
    movies = []
    for kind, steps in [("raster", N), ("random", N), ("random", round(N * 88 / 256)), ("random", N // 4)]:
        g = torch.Generator(args.device).manual_seed(args.seed)
        order = make_order(kind, 1, N, args.device, g)  # drawn here: every frame knows which positions are filled
        counts = []
        with args.ctx:
            tokens = generate(model, label, generator=g, callback=lambda s, logits, new: counts.append(new.size(1)),
                              **sampling_kwargs(args, order=order, steps=steps))
        movie, filled = [], torch.zeros(N, dtype=torch.bool, device=args.device)
        for done in itertools.accumulate(counts):
            filled[order[0, :done]] = True
            image = decode_images(vq, tokens * filled, grid_size)[0]  # undecoded tokens as code 0 ...
            mask = filled.view(grid_size, grid_size).repeat_interleave(down, 0).repeat_interleave(down, 1).cpu()
            movie.append(torch.where(mask, image, torch.full_like(image, 128)))  # ... then painted grey
        movies.append((f"{kind} {len(counts)} steps", movie))
    write_gif(movies, args.out or default_out(args, "gif"), args.scale)


def write_gif(movies, path, scale):
    """The movies side by side, one frame per step of the longest; a finished movie holds its last frame."""
    names, movies = zip(*movies)
    frames = [common.image_grid(torch.stack([m[min(t, len(m) - 1)] for m in movies]), nrow=len(movies), scale=scale,
                                col_labels=names) for t in range(max(map(len, movies)))]
    durations = [150] * (len(frames) - 1) + [1500]  # hold the finished images a moment
    common.write_atomic(lambda f: frames[0].save(f, format="GIF", save_all=True, append_images=frames[1:],
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
        raise ValueError(f"input image {path} is {im.size[0]}x{im.size[1]}; the model works at {size}x{size}")
    return torch.from_numpy(np.asarray(im).reshape(size, size, channels).copy()).permute(2, 0, 1)  # (C, H, W)


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
    """Inpainting or outpainting: input | mask | masked input | several results, one PNG."""
    grid_size, down = model.config.grid, vq.config.downsample
    size = grid_size * down
    image = load_image(args.image, size, vq.config.in_channels)
    if args.command == "inpaint":
        mask, canvas = load_mask(args.mask, size), image
    else:  # outpaint: shift the kept part away from the new sides, generate the exposed strip
        e = args.extend
        if e % down or e >= size:
            raise ValueError(f"--extend must be a positive multiple of {down} below {size}, got {e}")
        shift_x = e * (("left" in args.sides) - ("right" in args.sides))  # new pixels on the right: content moves left
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
    kept = "kept" if args.command == "inpaint" else f"kept, moved {args.extend} px"  # outpaint shifts the input
    figure = common.image_grid(panels, nrow=n + 3, scale=args.scale, col_labels=["original", "mask", kept] +
                               [f"result {i + 1}" for i in range(n)])
    save_figure(figure, args.out or default_out(args))
    return tokens, known


def extrapolate(model, vq, args):
    """Zero-shot resolution extrapolation (docs/algorithm.md §8): a sample at the training grid g gives the known
    tokens at (f*r, f*c) of the G = f*g grid; the rest is generated in random order with the NTK-mixed RoPE and
    spatial CFG. Figure: each base (upscaled) next to its extrapolation."""
    f, g = args.factor, model.config.grid
    labels = torch.tensor(check_classes(args.classes, model), device=args.device).repeat_interleave(args.per_class)
    base, base_images = generate_batched(model, vq, labels, args, desc="base")
    G = f * g
    positions = ((torch.arange(g) * f * G)[:, None] + torch.arange(g) * f).flatten().to(args.device)
    _, big = generate_batched(model, vq, labels, args, known=(positions.expand(len(labels), -1), base),
                              desc="extrapolate", grid=G, order="random", steps=args.extrapolate_steps,
                              spatial_cfg_scale=args.spatial_cfg, ntk_boundary=args.ntk_boundary)
    up = base_images.repeat_interleave(f, dim=2).repeat_interleave(f, dim=3)
    pairs = torch.stack([up, big], dim=1).flatten(0, 1)  # base, extrapolated, base, extrapolated, ...
    save_figure(common.image_grid(pairs, nrow=2 * args.per_class, scale=args.scale,
                                  col_labels=["base", "extrapolated"] * args.per_class), args.out or default_out(args))


# ----------------------------------------------------------------------------------------------
# The command line

def setup(args):
    """Device, autocast, and torchrun's rank / world size (grid is the only command that splits work)."""
    if "RANK" in os.environ and args.command != "grid":
        raise ValueError(f"only `sample.py grid` runs under torchrun, not {args.command!r}")
    args.rank, args.world, args.device = common.setup_distributed(args.device)
    args.ctx = torch.autocast("cuda", dtype=torch.bfloat16) if args.device.type == "cuda" else nullcontext()


def main(args):
    for out in (getattr(args, "out", None), getattr(args, "out_npz", None)):  # before any work, not after
        if out:
            common.check_output(out)
    setup(args)
    torch.manual_seed(args.seed)
    try:
        args.ckpt = args.ckpt or (None if args.command == "bench" and args.preset else "runs/demo/last.pt")
        if args.command == "bench":  # no tokenizer needed; --preset without --ckpt: random weights of that size
            model = RandAR(PRESETS[args.preset]) if args.ckpt is None else load_model(args.ckpt, args.config, args.preset)[0]
            print(f"{model.config.dim}-wide, {model.config.n_layer} layers, device {args.device}, CFG {args.cfg}")
            print("\n".join(benchmark(model.to(args.device).eval(), args.sizes, (1, args.bench_batch), args.cfg,
                                      args.compile, args.repeats, args.ctx)))
            return
        model, vq = load_run(args)
        if getattr(args, "steps", None) is not None and args.steps > model.config.block_size:
            raise ValueError(f"--steps must be between 1 and {model.config.block_size} (the number of tokens), "
                             f"got {args.steps}")
        {"grid": grid, "compare": compare, "animate": animate, "inpaint": edit, "outpaint": edit,
         "extrapolate": extrapolate}[args.command](model, vq, args)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def comma_list(kind, what, check=lambda values: True):
    """An argparse type: a comma list of `kind` values that pass `check`, else one line naming `what`."""
    def parse(text):
        try:
            values = [kind(v) for v in text.split(",")]
        except ValueError:
            values = None
        if not values or not check(values):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
        return values
    return parse


number_pair = comma_list(float, "START,END (two numbers)", lambda v: len(v) == 2 and all(map(math.isfinite, v)))
class_list = comma_list(int, "a comma list of class indices")
square_list = comma_list(int, "a comma list of square token counts (64,256)", lambda v: all(n > 0 and math.isqrt(n) ** 2 == n for n in v))
side_list = comma_list(str, "a comma list of left,right,top,bottom", lambda v: set(v) <= {"left", "right", "top", "bottom"})
COMMANDS = ("grid", "compare", "animate", "inpaint", "outpaint", "extrapolate", "bench")


def get_parser():
    """One subcommand per figure or job; each takes the flags of the groups it belongs to."""
    p = common.ArgumentParser(description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    flags = {name: sub.add_parser(name) for name in COMMANDS}
    def add(names, *flag, **kw):
        for name in names.split():
            flags[name].add_argument(*flag, **kw)
    every, images = " ".join(COMMANDS), "grid compare animate inpaint outpaint extrapolate"
    add(every, "--ckpt", default=None, help="train.py checkpoint or official .safetensors (default runs/demo/last.pt)")
    add(every, "--config", default=None, help="official YAML config of a .safetensors checkpoint")
    add(every, "--preset", default=None, choices=PRESETS, help="config of a .safetensors (bench: random weights)")
    add(every, "--device", default="auto")
    add(every, "--seed", type=int, default=0)
    add(every, "--compile", action="store_true", help="torch.compile the decode step (bench: add compiled rows)")
    add(every, "--cfg", type=number_pair, default=common.DEFAULT_CFG, help="START,END of the linear CFG schedule")
    add("bench", "--bench-batch", type=common.positive_int, default=32, help="the batch measured beside batch 1")
    add("bench", "--repeats", type=common.positive_int, default=3)
    add("bench", "--sizes", type=square_list, default=[64, 256], help="tokens N per image (squares; any grid size)")
    add(images, "--vq-ckpt", default=None,
        help="tokenizer: train.py's, vq_ds16_c2i.pt or MaskGIT's .bin (default: tokenizer.pt beside --ckpt)")
    add(images, "--out", default=None, help="figure to write (default: beside the checkpoint)")
    add(images, "--scale", type=common.positive_int, default=4, help="pixel upscaling of figures (nearest)")
    add(images, "--temperature", type=common.non_negative_number, default=1.0)
    add(images, "--top-k", type=common.non_negative_int, default=0)
    add(images, "--top-p", type=common.in_range(float, 0, 1, open_low=True), default=1.0)
    add(images, "--batch-size", type=common.positive_int, default=100, help="images per generate() call")
    add("grid inpaint outpaint extrapolate", "--order", default="random", choices=["random", "raster"])
    add("grid inpaint outpaint extrapolate", "--steps", type=common.positive_int, default=None,
        help="decoding steps, fewer than N: parallel (default: N, or a release YAML's num_inference_steps)")
    add("grid extrapolate", "--per-class", type=common.positive_int, default=8, help="images per class")
    add("grid compare extrapolate", "--classes", type=class_list, default=None, help="comma list (default: all)")
    add("grid", "--out-npz", default=None, help="write images (uint8 NHWC, arr_0) and labels (arr_1)")
    add("animate", "--class", dest="class_", type=int, default=0, help="class to decode")
    add("inpaint outpaint", "image", help="input image at the model's resolution")
    add("inpaint outpaint", "--edit-class", type=int, required=True, help="class the new region is generated as")
    add("inpaint outpaint", "--results", type=common.positive_int, default=6, help="edited images to generate")
    add("inpaint", "--mask", required=True, help="mask image (white = regenerate) or box x0,y0,x1,y1")
    add("outpaint", "--sides", default=["right"], type=side_list, help="comma list of left,right,top,bottom")
    add("outpaint", "--extend", type=common.positive_int, default=8, help="pixels to generate on each new side")
    add("extrapolate", "--factor", type=common.in_range(int, 2), default=2, help="times the training grid")
    add("extrapolate", "--extrapolate-steps", type=common.positive_int, default=None, help="steps for the new tokens")
    add("extrapolate", "--spatial-cfg", type=number_pair, default=(1.0, 2.0), help="START,END of spatial CFG")
    add("extrapolate", "--ntk-boundary", type=common.non_negative_int, default=None,
        help="highest RoPE frequencies that keep raw coordinates (default: generate.default_ntk_boundary)")
    return p


def parse(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] not in COMMANDS + ("-h", "--help"):
        argv = ["grid"] + argv  # `python sample.py [flags]` is the grid command
    p = get_parser()
    args = p.parse_args(argv)
    if getattr(args, "temperature", 1) == 0 and args.top_k != 1:
        p.error("--temperature 0 needs --top-k 1 (greedy decoding); sampling needs a temperature > 0")
    return args


def cli(argv=None):
    """The command line (argv: sys.argv[1:] when None); every expected failure is one line and exit status 1."""
    common.run(main, parse(argv))


if __name__ == "__main__":
    cli()
