r"""Train RandAR on pre-extracted VQ tokens: one command from nothing to samples.

    python train.py                      # Fashion-MNIST demo on a laptop CPU
    # the L release's recipe
    torchrun --nproc_per_node=8 train.py --config randar_l_0.3b_llamagen.yaml \
        --data /path/to/imagenet --image-size 256 --tokenizer-ckpt vq_ds16_c2i.pt

With no tokenizer checkpoint in --out-dir, the small tokenizer is trained first (tokenizer.py). The
dataset is then encoded to tokens once and cached in --out-dir (token_cache.py). Then RandAR trains
in random order (docs/algorithm.md §3) and writes a sample grid (one row per class), the validation
loss, metrics and checkpoints. A release's YAML (--config) sets the model and the training recipe
(docs/algorithm.md §12). Rerunning the same command resumes exactly where it stopped. Under
torchrun, DistributedDataParallel is used (gloo on the CPU, nccl on GPUs), and every file and log
line comes from rank 0.
"""
import copy
import json
import math
import os
import re
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, replace

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import checkpoints
import distributed
import files
import flags
import image_data
import token_cache
import tokenizer as tok
from generate import generate
from image_grid import image_grid
from randar import PRESETS, RandAR


def main(args):
    rank, world, device = distributed.setup_distributed(timeout_s=args.dist_timeout)
    check_args(args, rank, world)
    # one job per folder: two would overwrite each other's checkpoints
    lock = distributed.lock_folder(args.out_dir, "--out-dir", rank)
    try:
        train(args, rank, world, device)
    finally:
        if lock is not None:
            lock.release()
    if dist.is_initialized():
        dist.destroy_process_group()


def train(args, rank, world, device):
    """Set-up, then the loop; every rank runs it."""
    # ---- set-up: the token cache, the model, its optimizer, a checkpoint to resume -------------
    is_main = rank == 0
    seed = args.seed * world + rank  # per-rank seed
    torch.manual_seed(seed)
    ctx = precision_context(device)
    last = os.path.join(args.out_dir, "last.pt")
    resume, ckpt = find_checkpoint(args, last, is_main)
    if is_main:
        print_header(args, world, device, seed)
    vq_path, data = token_cache.prepare_tokens(args, rank, world, device)
    torch.manual_seed(seed)  # the model's init does not depend on which stages ran before
    cfg = model_config(args, data["train"])
    model, ema, opt = make_model(cfg, args, device)
    # model holds the weights that are saved; ddp wraps it under torchrun to all-reduce gradients;
    # forward is what the loop calls, ddp compiled with --compile.
    ddp = wrap_ddp(model, world, device)
    forward = torch.compile(ddp, dynamic=False) if args.compile else ddp
    step, epoch, batch_in_epoch, skipped = restore(ckpt, resume, cfg, model, ema, opt, is_main)
    vq = tok.load_tokenizer(vq_path, device) if is_main else None
    restore_random_state(ckpt, rank, world, device)  # after every init that draws random numbers
    labels = data["train"]["labels"]
    sampler, per_epoch = make_sampler(len(labels), args, rank, world)
    log = Log(args, step, is_main, world, device, data["train"]["tokens"].size(1))
    epoch_indices = None  # the epoch's sample indices, read at the first step and each new epoch

    # ---- the loop: one optimizer step over --grad-accum micro-batches per rank -----------------
    while step < args.steps:
        if epoch_indices is None or batch_in_epoch == 0:
            epoch_indices, flips = epoch_batches(sampler, epoch, per_epoch, data["train"], args)
        lr = set_learning_rate(opt, step, args)
        # this rank's share of the step: --grad-accum micro-batches of --batch-size images
        batches = [(token_cache.batch_tokens(data["train"], indices, flips).to(device),
                    labels[indices].to(device)) for indices in epoch_indices[batch_in_epoch]]
        for i, (x, y) in enumerate(batches):
            # DDP all-reduces the gradients on the last micro-batch only (one process has no DDP)
            sync = i == len(batches) - 1 or world == 1
            with (nullcontext() if sync else ddp.no_sync()), ctx:
                _, loss = forward(x, y, order=args.order)
            (loss / len(batches)).backward()
            log.add_loss(loss.detach() / len(batches))
        # The log shows the total norm before clipping. The skip rule sums per-tensor norms after.
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        if skips_update(model, step, args):
            skipped += 1
        else:
            opt.step()
            update_ema(ema, model, step, args.ema)
        opt.zero_grad(set_to_none=True)
        step += 1
        batch_in_epoch += 1
        if batch_in_epoch == per_epoch:  # the epoch is used up; the next step starts a new one
            epoch += 1
            batch_in_epoch = 0

        # ---- the loss, validation, samples and the checkpoint, each at its interval and at the end
        # The loss is also read before each checkpoint, so that a NaN stops the run before it is
        # saved.
        if due(step, args.log_every, args.steps) or due(step, args.ckpt_every, args.steps):
            log.train(step, lr, grad_norm, last)
        if due(step, args.eval_every, args.steps):
            val = validation_loss(ema or model, data["test"], args, rank, world, device, ctx)
            log.validation(step, val)
        if is_main and due(step, args.sample_every, args.steps):
            save_samples(ema or model, vq, args, device, ctx)
        if due(step, args.ckpt_every, args.steps):
            position = {"step": step, "data_position": {"epoch": epoch, "batch": batch_in_epoch},
                        "skipped_steps": skipped}
            save_checkpoint(model, opt, ema, position, vq_path, last, args, rank, world, device)
        distributed.barrier()  # the other ranks wait while rank 0 writes samples and checkpoints
    log.close(step, skipped, last)


def due(step, every, last_step):
    """Whether an action every `every` steps (0: never) is due after `step`; all are due at the
    last step."""
    return (every and step % every == 0) or step == last_step


# ----------------------------------------------------------------------------------------------
# Set-up

def check_args(args, rank, world):
    """What can fail before the expensive stages, checked first; --global-batch-size becomes the
    per-rank --batch-size here."""
    if args.data != "fashion-mnist" and not os.path.isdir(args.data):
        raise FileNotFoundError(f"--data folder not found: {args.data}")
    if args.resume and not os.path.isfile(args.resume):
        raise FileNotFoundError(f"--resume checkpoint not found: {args.resume}")
    checkpoints.resolve_batch_size(args, world)
    # rank 0 alone reads the data (it may download it); every rank gets its answer
    distributed.rank0_decides(lambda: token_cache.check_enough_images(args, world), rank)


def find_checkpoint(args, last, is_main):
    """(path, contents) of the checkpoint to resume from: --resume, else <out-dir>/last.pt, else
    (None, None). Rank 0 removes the temporary files a killed run left in --out-dir."""
    resume = args.resume or (last if os.path.exists(last) else None)
    ckpt = checkpoints.load_torch_file(resume, "RandAR checkpoint") if resume else None
    needed = {"model", "optimizer", "config", "rng", "step", "data_position", "skipped_steps"}
    if ckpt is not None and not needed <= set(ckpt):
        raise ValueError(f"{resume} is not a checkpoint written by train.py (cannot resume from "
                         "it)")
    if is_main:
        files.remove_temporaries(args.out_dir)
    return resume, ckpt


def print_header(args, world, device, seed):
    model_name = args.config or f"'{args.preset}'"
    global_batch = args.batch_size * world * args.grad_accum
    print(f"RandAR {model_name} on {args.data}, order={args.order}, {args.steps} steps, global "
          f"batch {global_batch} ({world} x {args.batch_size} x {args.grad_accum}), device "
          f"{device}; rank seed {seed}; writing to {args.out_dir}/")


def model_config(args, token_file):
    """The preset sized to the token cache (vocabulary, tokens per image, classes), or a release
    YAML's model, which must fit the cache; then the flags' overrides."""
    sizes = dict(vocab_size=token_file["vocab_size"], block_size=token_file["tokens"].size(1),
                 num_classes=token_file["num_classes"])
    if args.config is None:
        cfg = replace(PRESETS[args.preset], **sizes)
    else:
        cfg = checkpoints.randar_config(checkpoints.read_official_yaml(args.config))
        for name, size in sizes.items():
            if getattr(cfg, name) != size:
                raise ValueError(f"{args.config}: ar_model.params.{name} is {getattr(cfg, name)}, "
                                 f"but the token files have {size} (another "
                                 "tokenizer or image size?)")
    if args.dropout is not None:
        cfg = replace(cfg, token_dropout_p=args.dropout, resid_dropout_p=args.dropout,
                      ffn_dropout_p=args.dropout)
    if args.class_dropout is not None:
        cfg = replace(cfg, class_dropout_prob=args.class_dropout)
    return cfg


def precision_context(device):
    """bf16 autocast and TF32 matmuls on GPUs; float32 on the CPU."""
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def make_model(cfg, args, device):
    """The model in training mode, its EMA (None with --ema 0) and AdamW, which decays matrices and
    embeddings but not norm weights."""
    model = RandAR(cfg).to(device).train()
    # The weights' exponential moving average samples and validates: averaging the last few hundred
    # steps removes much of the optimizer's noise, which a short run is full of.
    ema = copy.deepcopy(model).eval().requires_grad_(False) if args.ema else None
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr,
                            betas=(0.9, 0.95), fused=device.type == "cuda")
    return model, ema, opt


def wrap_ddp(model, world, device):
    if world == 1:
        return model
    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)


def restore(ckpt, path, cfg, model, ema, opt, is_main):
    """A checkpoint's weights and optimizer state -> where training stands: (step, epoch, batch in
    the epoch, updates skipped); a fresh start without one."""
    if ckpt is None:
        return 0, 0, 0, 0
    if checkpoints.randar_config(ckpt["config"]) != cfg:
        raise ValueError(f"{path} was trained with another config; use a new --out-dir")
    model.load_state_dict(ckpt["model"], strict=True)
    if ema is not None:
        if "ema" not in ckpt:
            raise ValueError(f"{path} holds no EMA weights; resume with --ema 0")
        ema.load_state_dict(ckpt["ema"], strict=True)
    opt.load_state_dict(ckpt["optimizer"])
    if is_main:
        print(f"resumed from {path} at step {ckpt['step']}")
    position = ckpt["data_position"]
    return ckpt["step"], position["epoch"], position["batch"], ckpt["skipped_steps"]


def restore_random_state(ckpt, rank, world, device):
    """With the same number of processes, every rank continues its own random stream."""
    if ckpt is None or len(ckpt["rng"]) != world:
        return
    torch.set_rng_state(ckpt["rng"][rank]["cpu"])
    if device.type == "cuda":
        torch.cuda.set_rng_state(ckpt["rng"][rank]["cuda"])


def make_sampler(n_images, args, rank, world):
    """The rank's share of each epoch's shuffle, and the optimizer steps an epoch holds."""
    sampler = torch.utils.data.DistributedSampler(range(n_images), num_replicas=world, rank=rank,
                                                  shuffle=True, seed=args.seed, drop_last=True)
    per_epoch = len(sampler) // (args.batch_size * args.grad_accum)
    if per_epoch == 0:
        raise ValueError(f"{n_images} training images are fewer than one global batch "
                         f"({args.batch_size * world * args.grad_accum}); lower --batch-size")
    return sampler, per_epoch


# ----------------------------------------------------------------------------------------------
# One step's parts

def epoch_batches(sampler, epoch, per_epoch, token_file, args):
    """This rank's share of the epoch's shuffle as sample indices [per_epoch, grad_accum, batch],
    and the epoch's flips (which of an image's two code sets each read takes)."""
    sampler.set_epoch(epoch)
    used = per_epoch * args.grad_accum * args.batch_size
    indices = torch.tensor(list(sampler)[:used]).view(per_epoch, args.grad_accum, args.batch_size)
    return indices, token_cache.flip_coins(token_file, args.seed, epoch)


def learning_rate(step, args):
    """Linear warm-up, then cosine decay to min_lr_ratio * lr. The demo's warm-up counts the step
    being taken; the releases' scheduler counts the steps done, so its first step has lr 0
    (--warmup-from-zero)."""
    if step < args.warmup_steps:
        steps_counted = step if args.warmup_from_zero else step + 1
        return args.lr * steps_counted / args.warmup_steps
    progress = (step - args.warmup_steps) / max(1, args.steps - args.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * progress))
    return args.lr * (args.min_lr_ratio + (1 - args.min_lr_ratio) * cosine)


def set_learning_rate(opt, step, args):
    lr = learning_rate(step, args)
    for group in opt.param_groups:
        group["lr"] = lr
    return lr


def skips_update(model, step, args):
    """The releases' gradient-skip rule (docs/algorithm.md §12): from step --skip-grad-from on, no
    update when the sum of the per-tensor gradient norms after clipping reaches --skip-grad-norm.
    It reads that sum on the host, a synchronisation per step, so only when the rule is on."""
    if not args.skip_grad_norm or step < args.skip_grad_from:
        return False
    norms = torch._foreach_norm([p.grad for p in model.parameters() if p.grad is not None])
    return torch.stack(norms).double().sum().item() >= args.skip_grad_norm


@torch.no_grad()  # else every update would join an ever longer autograd graph
def update_ema(ema, model, step, max_decay):
    """ema <- d ema + (1 - d) model (nothing when ema is None). The decay ramps up as
    (1 + t) / (10 + t) to max_decay, so the average does not hold on to the init; a short run ends
    before the ramp reaches --ema."""
    if ema is None:
        return
    decay = min(max_decay, (1 + step) / (10 + step))
    torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1 - decay)


# ----------------------------------------------------------------------------------------------
# Validation, samples, the log

@torch.no_grad()
def validation_loss(model, data, args, rank, world, device, ctx):
    """Mean nats per token on held-out tokens, in the training order (fixed random orders)."""
    model.eval()
    tokens = data["tokens"][:args.val_limit].long()
    labels = data["labels"][:args.val_limit]
    g = torch.Generator().manual_seed(1234)  # the same orders at every evaluation
    orders = torch.rand(tokens.shape, generator=g).argsort(1) if args.order == "random" else None
    total = count = 0.0
    for i in range(rank * args.batch_size, len(tokens), world * args.batch_size):
        sl = slice(i, i + args.batch_size)
        order = "raster" if orders is None else orders[sl].to(device)
        with ctx:
            _, loss = model(tokens[sl].to(device), labels[sl].to(device), order=order)
        total += loss.item() * len(tokens[sl])
        count += len(tokens[sl])
    t = torch.tensor([total, count], dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t)
    model.train()
    return (t[0] / t[1]).item()


@torch.no_grad()
def save_samples(model, vq, args, device, ctx):
    """<out-dir>/samples.png: one row per class for at most 10 classes spread over the label range
    (ImageNet: 10 of 1000), --samples-per-class images each, generated in batches of --batch-size
    so that memory stays bounded."""
    model.eval()
    num_classes = model.config.num_classes
    classes = torch.linspace(0, num_classes - 1, min(num_classes, 10)).round().long()
    labels = classes.repeat_interleave(args.samples_per_class).to(device)
    g = torch.Generator(device).manual_seed(args.seed)
    tokens = []
    for i in range(0, len(labels), args.batch_size):
        with ctx:
            tokens.append(generate(model, labels[i:i + args.batch_size], order=args.order,
                                   cfg_scale=(flags.DEFAULT_CFG[0], args.cfg), generator=g))
    model.free_caches()
    grid = model.config.grid
    images = vq.decode_images(torch.cat(tokens).view(-1, grid, grid)).cpu()
    names = image_data.class_names(args.data, classes.tolist())
    figure = image_grid(images, nrow=args.samples_per_class, scale=2, row_labels=names)
    files.save_png(figure, os.path.join(args.out_dir, "samples.png"))
    model.train()


def save_checkpoint(model, opt, ema, position, vq_path, path, args, rank, world, device):
    """Rank 0 writes a plain dict with every rank's random state, so that a resumed run goes on
    exactly as an uninterrupted one."""
    rng = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state()
    rngs = distributed.gather(rng, world)
    if rank != 0:
        return
    ckpt = {"model": model.state_dict(), "optimizer": opt.state_dict(), **position,
            "scheduler": {"lr": args.lr, "warmup_steps": args.warmup_steps,
                          "total_steps": args.steps, "min_lr_ratio": args.min_lr_ratio},
            "config": asdict(model.config), "rng": rngs,
            "tokenizer": os.path.abspath(vq_path), "args": vars(args)}
    if ema is not None:
        ckpt["ema"] = ema.state_dict()
    files.save_atomic(ckpt, path)


class Log:
    """The training loss, summed on the device and read by the host once per window; rank 0's
    progress bar and metrics.jsonl."""

    def __init__(self, args, step, is_main, world, device, tokens_per_image):
        self.args = args
        self.is_main = is_main
        self.world = world
        self.tokens_per_step = args.batch_size * world * args.grad_accum * tokens_per_image
        self.window_loss = torch.zeros((), dtype=torch.float64, device=device)
        self.logged_step = step
        self.t_last = time.time()
        self.bar = tqdm(total=args.steps, initial=step, desc="randar", disable=not is_main)

    def add_loss(self, loss):
        """A micro-batch's share of a step's loss, added on the device (no host synchronisation)."""
        self.window_loss += loss.double()

    def train(self, step, lr, grad_norm, last):
        """The mean loss over the ranks and the steps since the last call; a non-finite one stops
        the run before it reaches a checkpoint."""
        steps = step - self.logged_step
        self.logged_step = step
        if self.world > 1:
            dist.all_reduce(self.window_loss)
        loss = self.window_loss.item() / steps / self.world
        if not math.isfinite(loss):
            good = f"last good checkpoint {last}" if os.path.exists(last) else "no checkpoint yet"
            raise FloatingPointError(f"non-finite loss ({loss}) by step {step} (checked every "
                                     f"--log-every steps); {good}")
        self.window_loss.zero_()
        if self.is_main:
            now = time.time()
            tok_s = steps * self.tokens_per_step / max(now - self.t_last, 1e-9)
            self.bar.update(steps)
            self.bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}", tok_s=f"{tok_s:.0f}")
            self.write({"step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm.item(),
                        "tokens_per_s": tok_s, "time": now})
            self.t_last = now

    def validation(self, step, val):
        if self.is_main:
            self.write({"step": step, "val_loss": val})
            self.bar.write(f"step {step}: val loss {val:.4f} nats/token")

    def write(self, record):
        with open(os.path.join(self.args.out_dir, "metrics.jsonl"), "a") as f:
            f.write(json.dumps(record) + "\n")

    def close(self, step, skipped, last):
        self.bar.close()
        if self.is_main:
            rule = f" ({skipped} skipped by the gradient-skip rule)" if self.args.skip_grad_norm \
                else ""
            samples = os.path.join(self.args.out_dir, "samples.png")
            print(f"done: {step} steps{rule}; checkpoint {last}, samples {samples}")


# ----------------------------------------------------------------------------------------------
# The command line

def parse_args(argv):
    """The command line; with --config, the release YAML's flags go first, so the command line
    overrides them (a --batch-size given replaces the YAML's global batch)."""
    parser = get_parser()
    args = parser.parse_args(argv)
    if args.config is None:
        return args
    if not os.path.isfile(args.config):
        parser.error(f"--config not found: {args.config}")
    try:
        yaml_argv = checkpoints.release_argv(args.config, argv)
        parser.parse_args(yaml_argv)  # the YAML's values, checked as the flags would be
    except (ValueError, OSError, SystemExit) as e:
        reason = re.sub(r"^error: [^:]*: ", "", str(getattr(e, "code", e)))  # the parser's prefix
        sys.exit(f"error: {reason}" if reason.startswith(args.config)
                 else f"error: {args.config}: {reason}")
    return parser.parse_args(yaml_argv + argv)


def get_parser():
    p = flags.ArgumentParser(description=__doc__)
    add_model_and_data_flags(p.add_argument_group("model and data"))
    add_optimization_flags(p.add_argument_group("optimization"))
    add_run_flags(p.add_argument_group("logging, samples, checkpoints, processes"))
    return p


def add_model_and_data_flags(p):
    p.add_argument("--out-dir", default="runs/demo")
    p.add_argument("--preset", default="demo", choices=PRESETS)
    p.add_argument("--config", default=None, help="a release's YAML: its model, optimizer, "
                   "schedule, batch, steps, EMA switch and gradient-skip rule; "
                   "flags given here override it")
    p.add_argument("--order", default="random", choices=["random", "raster"],
                   help="raster: the LlamaGen baseline")
    p.add_argument("--data", default="fashion-mnist", help="'fashion-mnist' or an ImageFolder path")
    p.add_argument("--data-dir", default=None, help="folder of the Fashion-MNIST IDX .gz files")
    p.add_argument("--image-size", type=flags.positive_int, default=32)
    p.add_argument("--limit", type=flags.non_negative_int, default=0,
                   help="use only the first N images of each split")
    p.add_argument("--tokenizer-ckpt", default=None,
                   help="default: <out-dir>/tokenizer.pt, trained if missing")
    p.add_argument("--tokenizer-steps", type=flags.positive_int, default=600)
    p.add_argument("--tokenizer-batch-size", type=flags.positive_int, default=64)


def add_optimization_flags(p):
    # The demo's defaults: for the same images and CPU time, more and smaller steps trained a
    # better model (docs/experiments.md (f)).
    p.add_argument("--steps", type=flags.positive_int, default=2000)
    p.add_argument("--batch-size", type=flags.positive_int, default=32,
                   help="per rank and micro-step")
    p.add_argument("--grad-accum", type=flags.positive_int, default=1)
    p.add_argument("--global-batch-size", type=flags.positive_int, default=None,
                   help="sets --batch-size to this / (processes x --grad-accum)")
    p.add_argument("--lr", type=flags.positive_number, default=3e-3)
    p.add_argument("--min-lr-ratio", type=flags.in_range(float, 0, 1), default=0.1)
    p.add_argument("--warmup-steps", type=flags.non_negative_int, default=200)
    p.add_argument("--warmup-from-zero", action="store_true",
                   help="the releases' warm-up: lr 0 at the first step")
    p.add_argument("--weight-decay", type=flags.non_negative_number, default=0.05)
    p.add_argument("--clip", type=flags.positive_number, default=1.0)
    p.add_argument("--skip-grad-norm", type=flags.non_negative_number, default=0, help="skip an "
                   "update whose summed per-tensor gradient norms reach this (0: never)")
    p.add_argument("--skip-grad-from", type=flags.non_negative_int, default=0,
                   help="... from this step on")
    p.add_argument("--ema", type=flags.probability, default=0.999,
                   help="EMA decay of the sampling weights (0: off)")
    p.add_argument("--dropout", type=flags.probability, default=None,
                   help="override token/residual/FFN dropout")
    p.add_argument("--class-dropout", type=flags.probability, default=None,
                   help="override label dropout (CFG)")


def add_run_flags(p):
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the model (on CPU: needs a C compiler)")
    p.add_argument("--workers", type=flags.non_negative_int, default=None,
                   help="DataLoader processes reading images")
    p.add_argument("--dist-timeout", type=flags.positive_number, default=1800,
                   help="seconds to wait for other ranks")
    p.add_argument("--resume", default=None,
                   help="checkpoint to resume (default: <out-dir>/last.pt if present)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=flags.positive_int, default=10)
    p.add_argument("--eval-every", type=flags.positive_int, default=500)
    p.add_argument("--val-limit", type=flags.positive_int, default=2000,
                   help="held-out images for the validation loss")
    p.add_argument("--sample-every", type=flags.non_negative_int, default=0,
                   help="0: only at the end")
    p.add_argument("--samples-per-class", type=flags.positive_int, default=10)
    p.add_argument("--cfg", type=flags.non_negative_number, default=flags.DEFAULT_CFG[1],
                   help="final CFG of samples")
    p.add_argument("--ckpt-every", type=flags.positive_int, default=200)


def cli(argv=None):
    """The command line (argv: sys.argv[1:] when None); every expected failure is one line and exit
    status 1."""
    argv = sys.argv[1:] if argv is None else list(argv)
    flags.run(main, parse_args(argv),
               errors=(ValueError, FileNotFoundError, FloatingPointError, OSError))


if __name__ == "__main__":
    cli()
