r"""Train RandAR on pre-extracted VQ tokens: one command from nothing to samples.

    python train.py                      # Fashion-MNIST demo on a laptop CPU
    # the L release's recipe
    torchrun --nproc_per_node=8 train.py --config randar_l_0.3b_llamagen.yaml \
        --data /path/to/imagenet --image-size 256 --tokenizer-ckpt vq_ds16_c2i.pt

With no tokenizer checkpoint in --out-dir, the small tokenizer is trained first; the dataset is
encoded to tokens once (cached in --out-dir; token_cache.py); then RandAR trains in random order
(docs/algorithm.md §3), writing a sample grid (one row per class), validation loss, metrics and
checkpoints. A release's YAML (--config) sets the model and the training recipe
(docs/algorithm.md §12). Re-running the same command resumes exactly where it stopped. Under
torchrun, DistributedDataParallel is used (gloo on CPU, nccl on GPU); every file and log line comes
from rank 0.
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

import common
import release
import sampling
import token_cache
import tokenizer as tok
from randar import PRESETS, RandAR, RandARConfig

# ----------------------------------------------------------------------------------------------
# Evaluation and samples

@torch.no_grad()
def validation_loss(model, data, args, device, ctx):
    """Mean nats per token on held-out tokens, in the training order (fixed random orders)."""
    model.eval()
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    tokens = data["tokens"][:args.val_limit].long()
    labels = data["labels"][:args.val_limit]
    g = torch.Generator().manual_seed(1234)  # the same orders at every evaluation
    orders = "raster"
    if args.order == "random":
        orders = torch.rand(tokens.shape, generator=g).argsort(1)
    total = count = 0.0
    for i in range(rank * args.batch_size, len(tokens), world * args.batch_size):
        sl = slice(i, i + args.batch_size)
        order = orders[sl].to(device) if args.order == "random" else "raster"
        with ctx:
            _, loss = model(tokens[sl].to(device), labels[sl].to(device), order=order)
        total += loss.item() * len(tokens[sl])
        count += len(tokens[sl])
    t = torch.tensor([total, count], dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t)
    model.train()
    return (t[0] / t[1]).item()


# ----------------------------------------------------------------------------------------------

def main(args):
    rank, world, device = common.setup_distributed(timeout_s=args.dist_timeout)
    # Everything that can fail before the expensive stages is checked first.
    if args.data != "fashion-mnist" and not os.path.isdir(args.data):
        raise FileNotFoundError(f"--data folder not found: {args.data}")
    if args.resume and not os.path.isfile(args.resume):
        raise FileNotFoundError(f"--resume checkpoint not found: {args.resume}")
    release.resolve_batch_size(args, world)
    # rank 0 alone reads the data (it may download it); every rank gets its answer
    common.rank0_decides(lambda: token_cache.check_enough_images(args, world), rank)
    lock = []  # one job per folder: two would overwrite each other's checkpoints
    common.rank0_decides(lambda: lock.append(common.FolderLock(args.out_dir, "--out-dir")), rank)
    try:
        run_training(args, rank, world, device)
    finally:
        if lock:
            lock[0].release()
    if dist.is_initialized():
        dist.destroy_process_group()


def run_training(args, rank, world, device):
    """The stages, top to bottom: token cache (prepare_tokens), model, then RandAR training from
    scratch or from the last checkpoint, with validation, samples and checkpoints along the way."""
    is_main = rank == 0
    seed = args.seed * world + rank  # per-rank seed
    torch.manual_seed(seed)
    # GPU matmuls in TF32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    ctx = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    resume, ckpt = find_checkpoint(args, is_main)
    global_batch = args.batch_size * world * args.grad_accum
    if is_main:
        model_name = args.config or f"'{args.preset}'"
        print(f"RandAR {model_name} on {args.data}, order={args.order}, {args.steps} steps, global "
              f"batch {global_batch} ({world} x {args.batch_size} x {args.grad_accum}), device "
              f"{device}; rank seed {seed}; writing to {args.out_dir}/")
    vq_path, data = token_cache.prepare_tokens(args, rank, world, device)
    # the model's init and dropout stream do not depend on which stages ran before
    torch.manual_seed(seed)
    run = Run(model_config(args, data["train"]), args, device, rank, world, vq_path)
    if resume:
        run.restore(ckpt, resume)
    vq = tok.load_tokenizer(vq_path, device) if is_main else None
    if resume:  # after every init that draws random numbers
        run.restore_random_state(ckpt)
    tokens = data["train"]["tokens"]
    sampler = torch.utils.data.DistributedSampler(range(len(tokens)), num_replicas=world, rank=rank,
                                                  shuffle=True, seed=args.seed, drop_last=True)
    per_epoch = len(sampler) // (args.batch_size * args.grad_accum)
    if per_epoch == 0:
        raise ValueError(f"{len(tokens)} training images are fewer than one global batch "
                         f"({global_batch}); lower --batch-size")
    log = Log(args, is_main, world, global_batch * tokens.size(1), run.step, device)
    train_epochs(run, data, sampler, per_epoch, log, vq, ctx)
    log.bar.close()
    if is_main:
        skipped = ""
        if args.skip_grad_norm:
            skipped = f" ({run.skipped} skipped by the gradient-skip rule)"
        samples = os.path.join(args.out_dir, "samples.png")
        print(f"done: {run.step} steps{skipped}; checkpoint {run.last}, samples {samples}")


def train_epochs(run, data, sampler, per_epoch, log, vq, ctx):
    """Steps until --steps, epoch after epoch; run.epoch and run.batch_in_epoch say where a resumed
    run goes on."""
    args = run.args
    labels = data["train"]["labels"]
    while run.step < args.steps:
        sampler.set_epoch(run.epoch)  # a new shuffle per epoch, the same on every rank
        used = per_epoch * args.grad_accum * args.batch_size
        # [micro-batches, batch]
        indices = torch.tensor(list(sampler)[:used]).view(-1, args.batch_size)
        coins = token_cache.flip_coins(data["train"], args.seed, run.epoch)
        while run.batch_in_epoch < per_epoch and run.step < args.steps:
            first = run.batch_in_epoch * args.grad_accum
            micro = indices[first:first + args.grad_accum]
            batches = [(token_cache.batch_tokens(data["train"], i, coins).to(run.device),
                        labels[i].to(run.device)) for i in micro]
            lr, grad_norm = run.train_step(batches, ctx, log.window_loss)
            log.after_step(run.step, lr, grad_norm, run.last)
            evaluate_and_save(run, log, data["test"], vq, ctx)
        if run.batch_in_epoch >= per_epoch:
            run.epoch += 1
            run.batch_in_epoch = 0


def evaluate_and_save(run, log, test_tokens, vq, ctx):
    """After a step: the validation loss, the sample grid (rank 0) and the checkpoint, each at its
    interval and after the last step."""
    args = run.args
    device = run.device
    last = run.step == run.args.steps
    if run.step % args.eval_every == 0 or last:
        loss = validation_loss(run.ema or run.model, test_tokens, args, device, ctx)
        log.validation(run.step, loss)
    if run.rank == 0 and ((args.sample_every and run.step % args.sample_every == 0) or last):
        samples = os.path.join(args.out_dir, "samples.png")
        sampling.sample_grid(run.ema or run.model, vq, samples, args, device, ctx)
    if run.step % args.ckpt_every == 0 or last:
        run.save()
    common.barrier()


def find_checkpoint(args, is_main):
    """(path, contents) of the checkpoint to resume from: --resume, else <out-dir>/last.pt, else
    (None, None); rank 0 removes the temporary files a killed process left."""
    last = os.path.join(args.out_dir, "last.pt")
    resume = args.resume or (last if os.path.exists(last) else None)
    ckpt = common.load_torch_file(resume, "RandAR checkpoint") if resume else None
    if ckpt is not None and not {"model", "optimizer", "config", "rng", "step"} <= set(ckpt):
        raise ValueError(f"{resume} is not a checkpoint written by "
                         "train.py (cannot resume from it)")
    if is_main:
        for name in os.listdir(args.out_dir):
            if re.search(r"\.tmp\d+(\.\w+)?$", name):
                os.remove(os.path.join(args.out_dir, name))
    return resume, ckpt


def model_config(args, token_file):
    """The preset sized to the token cache (vocabulary, tokens per image, classes), or a release
    YAML's model, which must fit the cache; then the flags' overrides."""
    sizes = dict(vocab_size=token_file["vocab_size"], block_size=token_file["tokens"].size(1),
                 num_classes=token_file["num_classes"])
    if args.config is None:
        cfg = replace(PRESETS[args.preset], **sizes)
    else:
        cfg = RandARConfig.from_dict(release.read_official_yaml(args.config))
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


class Run:
    """The model being trained, its EMA, its optimizer and where training stands: what a checkpoint
    holds."""

    def __init__(self, cfg, args, device, rank, world, vq_path):
        self.cfg = cfg
        self.args = args
        self.device = device
        self.rank = rank
        self.world = world
        self.vq_path = vq_path
        self.last = os.path.join(args.out_dir, "last.pt")
        self.step = self.epoch = self.batch_in_epoch = self.skipped = 0
        self.model = RandAR(cfg).to(device)
        # Exponential moving average of the weights, for sampling and validation: averaging the last
        # few hundred steps' weights removes much of the optimizer's noise, which a short run is
        # full of.
        self.ema = copy.deepcopy(self.model).eval().requires_grad_(False) if args.ema else None
        decay = [p for p in self.model.parameters() if p.dim() >= 2]  # matrices and embeddings
        no_decay = [p for p in self.model.parameters() if p.dim() < 2]  # norm weights
        self.opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                                      {"params": no_decay, "weight_decay": 0.0}], lr=args.lr,
                                     betas=(0.9, 0.95), fused=device.type == "cuda")
        self.ddp = self.model
        if world > 1:
            device_ids = [device.index] if device.type == "cuda" else None
            self.ddp = DDP(self.model, device_ids=device_ids)
        self.forward = torch.compile(self.ddp, dynamic=False) if args.compile else self.ddp
        self.ddp.train()

    def restore(self, ckpt, path):
        if RandARConfig.from_dict(ckpt["config"]) != self.cfg:
            raise ValueError(f"{path} was trained with another config; use a new --out-dir")
        self.model.load_state_dict(ckpt["model"], strict=True)
        if self.ema is not None:
            if "ema" not in ckpt:
                raise ValueError(f"{path} holds no EMA weights; resume with --ema 0")
            self.ema.load_state_dict(ckpt["ema"], strict=True)
        self.opt.load_state_dict(ckpt["optimizer"])
        self.step = ckpt["step"]
        self.epoch = ckpt["data_position"]["epoch"]
        self.batch_in_epoch = ckpt["data_position"]["batch"]
        self.skipped = ckpt.get("skipped_steps", 0)
        if self.rank == 0:
            print(f"resumed from {path} at step {self.step}")

    def restore_random_state(self, ckpt):
        # same world size: every rank continues its own random stream
        if len(ckpt["rng"]) == self.world:
            torch.set_rng_state(ckpt["rng"][self.rank]["cpu"])
            if self.device.type == "cuda":
                torch.cuda.set_rng_state(ckpt["rng"][self.rank]["cuda"])

    def train_step(self, micro_batches, ctx, window_loss):
        """One optimizer step over the (tokens, labels) micro-batches; their mean loss is added to
        window_loss on the device (no host synchronisation). Returns (lr, gradient norm)."""
        args = self.args
        lr = learning_rate(self.step, self.args)
        for group in self.opt.param_groups:
            group["lr"] = lr
        for i, (x, y) in enumerate(micro_batches):
            # DDP all-reduces on the last micro-batch only
            sync = i == len(micro_batches) - 1 or self.world == 1
            with (nullcontext() if sync else self.ddp.no_sync()), ctx:
                _, loss = self.forward(x, y, order=args.order)
            (loss / len(micro_batches)).backward()
            window_loss += loss.detach().double() / len(micro_batches)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), args.clip)
        if self.skips_update():
            self.skipped += 1
        else:
            self.opt.step()
            self.update_ema()
        self.opt.zero_grad(set_to_none=True)
        self.step += 1
        self.batch_in_epoch += 1
        return lr, grad_norm

    def skips_update(self):
        """The releases' gradient-skip rule (docs/algorithm.md §12): from step --skip-grad-from on,
        no update when the sum of the per-tensor gradient norms after clipping reaches
        --skip-grad-norm. Reads that sum on the host (a synchronisation per step), so only when the
        rule is on."""
        if not self.args.skip_grad_norm or self.step < self.args.skip_grad_from:
            return False
        norms = torch._foreach_norm([p.grad for p in self.model.parameters() if p.grad is not None])
        return torch.stack(norms).double().sum().item() >= self.args.skip_grad_norm

    def update_ema(self):
        # The EMA decay ramps up as (1+t)/(10+t), so the average does not hold on to the init; a
        # short run ends before the ramp reaches --ema.
        if self.ema is not None:
            decay = min(self.args.ema, (1 + self.step) / (10 + self.step))
            with torch.no_grad():  # (else every update would join an ever longer autograd graph)
                torch._foreach_lerp_(list(self.ema.parameters()),
                                     list(self.model.parameters()), 1 - decay)

    def save(self):
        """last.pt, written by rank 0 with every rank's random state."""
        rng = {"cpu": torch.get_rng_state(),
               **({"cuda": torch.cuda.get_rng_state()} if self.device.type == "cuda" else {})}
        rngs = common.gather(rng, self.world)
        checksum = sum(p.double().sum().item() for p in self.model.parameters())
        checks = common.gather(checksum, self.world)  # DDP: all equal
        if self.rank != 0:
            return
        args = self.args
        ckpt = {"model": self.model.state_dict(), "optimizer": self.opt.state_dict(),
                "step": self.step,
                **({"ema": self.ema.state_dict()} if self.ema is not None else {}),
                "scheduler": {"lr": args.lr, "warmup_steps": args.warmup_steps,
                              "total_steps": args.steps, "min_lr_ratio": args.min_lr_ratio},
                "config": asdict(self.cfg), "rng": rngs, "rank_param_checksums": checks,
                "data_position": {"epoch": self.epoch, "batch": self.batch_in_epoch},
                "skipped_steps": self.skipped,
                "tokenizer": os.path.abspath(self.vq_path), "args": vars(args)}
        common.save_atomic(ckpt, self.last)


class Log:
    """The training loss, summed on the device and read by the host only every --log-every steps and
    before every checkpoint (never save NaNs); progress bar and metrics.jsonl on rank 0."""

    def __init__(self, args, is_main, world, tokens_per_step, step, device):
        self.args = args
        self.is_main = is_main
        self.world = world
        self.tokens_per_step = tokens_per_step
        self.window_loss = torch.zeros((), dtype=torch.float64, device=device)
        self.window_steps = 0
        self.t_last = time.time()
        self.bar = tqdm(total=args.steps, initial=step, desc="randar", disable=not is_main)

    def after_step(self, step, lr, grad_norm, last):
        args = self.args
        self.window_steps += 1
        if not (step % args.log_every == 0 or step % args.ckpt_every == 0 or step == args.steps):
            return
        if self.world > 1:  # the mean over ranks, before rank 0 logs it
            dist.all_reduce(self.window_loss)
        loss = self.window_loss.item() / self.window_steps / self.world
        if not math.isfinite(loss):
            if os.path.exists(last):
                last_good = f"last good checkpoint {last}"
            else:
                last_good = "no checkpoint written yet"
            raise FloatingPointError(f"non-finite loss ({loss}) by step {step} (checked every "
                                     f"--log-every steps); {last_good}")
        if self.is_main:
            now = time.time()
            tok_s = self.window_steps * self.tokens_per_step / max(now - self.t_last, 1e-9)
            self.bar.update(self.window_steps)
            self.bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}", tok_s=f"{tok_s:.0f}")
            self.write({"step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm.item(),
                        "tokens_per_s": tok_s, "time": now})
            self.t_last = now
        self.window_loss.zero_()
        self.window_steps = 0

    def validation(self, step, val):
        if self.is_main:
            self.write({"step": step, "val_loss": val})
            self.bar.write(f"step {step}: val loss {val:.4f} nats/token")

    def write(self, record):
        with open(os.path.join(self.args.out_dir, "metrics.jsonl"), "a") as f:
            f.write(json.dumps(record) + "\n")


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
        yaml_argv = release.release_argv(args.config, argv)
        parser.parse_args(yaml_argv)  # the YAML's values, checked as the flags would be
    except (ValueError, OSError, SystemExit) as e:
        reason = re.sub(r"^error: [^:]*: ", "", str(getattr(e, "code", e)))  # the parser's prefix
        sys.exit(f"error: {reason}" if reason.startswith(args.config)
                 else f"error: {args.config}: {reason}")
    return parser.parse_args(yaml_argv + argv)


def get_parser():
    p = common.ArgumentParser(description=__doc__)
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
    p.add_argument("--image-size", type=common.positive_int, default=32)
    p.add_argument("--limit", type=common.non_negative_int, default=0,
                   help="use only the first N images of each split")
    p.add_argument("--tokenizer-ckpt", default=None,
                   help="default: <out-dir>/tokenizer.pt, trained if missing")
    p.add_argument("--tokenizer-steps", type=common.positive_int, default=600)
    p.add_argument("--tokenizer-batch-size", type=common.positive_int, default=64)


def add_optimization_flags(p):
    # The demo's defaults: 2000 steps at batch 32, not 1000 at 64 -- the same images and CPU time,
    # twice the updates, a little better (docs/experiments.md (f)).
    p.add_argument("--steps", type=common.positive_int, default=2000)
    p.add_argument("--batch-size", type=common.positive_int, default=32,
                   help="per rank and micro-step")
    p.add_argument("--grad-accum", type=common.positive_int, default=1)
    p.add_argument("--global-batch-size", type=common.positive_int, default=None,
                   help="sets --batch-size to this / (processes x --grad-accum)")
    p.add_argument("--lr", type=common.positive_number, default=3e-3)
    p.add_argument("--min-lr-ratio", type=common.in_range(float, 0, 1), default=0.1)
    p.add_argument("--warmup-steps", type=common.non_negative_int, default=200)
    p.add_argument("--warmup-from-zero", action="store_true",
                   help="the releases' warm-up: lr 0 at the first step")
    p.add_argument("--weight-decay", type=common.non_negative_number, default=0.05)
    p.add_argument("--clip", type=common.positive_number, default=1.0)
    p.add_argument("--skip-grad-norm", type=common.non_negative_number, default=0, help="skip an "
                   "update whose summed per-tensor gradient norms reach this (0: never)")
    p.add_argument("--skip-grad-from", type=common.non_negative_int, default=0,
                   help="... from this step on")
    p.add_argument("--ema", type=common.probability, default=0.999,
                   help="EMA decay of the sampling weights (0: off)")
    p.add_argument("--dropout", type=common.probability, default=None,
                   help="override token/residual/FFN dropout")
    p.add_argument("--class-dropout", type=common.probability, default=None,
                   help="override label dropout (CFG)")


def add_run_flags(p):
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the model (on CPU: needs a C compiler)")
    p.add_argument("--workers", type=common.non_negative_int, default=None,
                   help="DataLoader processes reading images")
    p.add_argument("--dist-timeout", type=common.positive_number, default=1800,
                   help="seconds to wait for other ranks")
    p.add_argument("--resume", default=None,
                   help="checkpoint to resume (default: <out-dir>/last.pt if present)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=common.positive_int, default=10)
    p.add_argument("--eval-every", type=common.positive_int, default=500)
    p.add_argument("--val-limit", type=common.positive_int, default=2000,
                   help="held-out images for the validation loss")
    p.add_argument("--sample-every", type=common.non_negative_int, default=0,
                   help="0: only at the end")
    p.add_argument("--samples-per-class", type=common.positive_int, default=10)
    p.add_argument("--cfg", type=common.non_negative_number, default=common.DEFAULT_CFG[1],
                   help="final CFG of samples")
    p.add_argument("--ckpt-every", type=common.positive_int, default=200)


def cli(argv=None):
    """The command line (argv: sys.argv[1:] when None); every expected failure is one line and exit
    status 1."""
    argv = sys.argv[1:] if argv is None else list(argv)
    common.run(main, parse_args(argv),
               errors=(ValueError, FileNotFoundError, FloatingPointError, OSError))


if __name__ == "__main__":
    cli()
