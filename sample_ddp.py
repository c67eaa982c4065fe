"""Images in seeded chunks, which every figure of sample.py uses, and the FID protocol's images
(`sample.py grid --out-npz`): sharded over the ranks, resumable, and written as the ADM evaluator's
.npz. Images come in chunks of --batch-size, and chunk c draws from a generator seeded by
(--seed, c), so the images depend neither on the number of processes nor on interruptions.

    torchrun --nproc_per_node=8 sample.py grid --ckpt <run>/last.pt --per-class 50 \
        --out-npz samples.npz
"""
import hashlib
import json
import os
import shutil
from dataclasses import asdict

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

import distributed
import fast
import files
from generate import generate


def decode_images(vq, tokens, grid):
    return vq.decode_images(tokens.view(-1, grid, grid)).cpu()  # (B, C, H, W) uint8


def decoder(args):
    """generate, or fast.generate_compiled with --compile."""
    return fast.generate_compiled if args.compile else generate


def sampling_kwargs(args, **overrides):
    kw = dict(order=getattr(args, "order", "random"), steps=getattr(args, "steps", None),
              cfg_scale=args.cfg, temperature=args.temperature, top_k=args.top_k,
              top_p=args.top_p)
    return {**kw, **overrides}


def generate_batched(model, vq, labels, args, known=None, desc="sampling", first_chunk=0, **kw):
    """Tokens and images for every label in chunks of --batch-size. Chunk c draws from its own
    generator seeded (--seed, c), so the images do not depend on how chunks are spread over
    processes. desc None shows no progress bar."""
    decode = decoder(args)
    tokens = []
    for i in tqdm(range(0, len(labels), args.batch_size), desc=desc,
                  disable=args.rank != 0 or desc is None):
        sl = slice(i, i + args.batch_size)
        batch_seed = args.seed * 1_000_003 + first_chunk + i // args.batch_size
        g = torch.Generator(args.device).manual_seed(batch_seed)
        known_here = None if known is None else (known[0][sl], known[1][sl])
        with args.ctx:
            tokens.append(decode(model, labels[sl], known=known_here, generator=g,
                                 **sampling_kwargs(args, **kw)))
    tokens = torch.cat(tokens)
    return tokens, decode_images(vq, tokens, kw.get("grid") or model.config.grid)


def chunk_path(parts, c):
    return os.path.join(parts, f"chunk_{c:05d}.npz")


def sample_to_npz(model, vq, labels, args):
    """Every chunk goes to <out-npz>.parts/ as soon as its rank has made it (nothing is gathered in
    memory); rank 0 then streams the chunks into one npz and removes the parts. Rerunning the same
    command after a crash makes only the chunks still missing; parts made with other settings are
    refused."""
    parts = args.out_npz + ".parts"
    n_chunks = -(-len(labels) // args.batch_size)
    lock = []

    # rank 0: one job per parts folder, the same settings as the chunks on disk, what is left
    def start():
        lock.append(distributed.FolderLock(parts, "parts folder"))
        # the temporaries of a killed run: chunks, and the npz being assembled
        files.remove_temporaries(parts)
        files.remove_stale_temps(args.out_npz)
        check_settings(parts, model, labels, args)
        return [c for c in range(n_chunks) if not os.path.exists(chunk_path(parts, c))]
    try:
        todo = distributed.rank0_decides(start, args.rank)
        if args.rank == 0 and len(todo) < n_chunks:
            print(f"{parts}: {n_chunks - len(todo)} of {n_chunks} chunks already on "
                  f"disk, {len(todo)} to make")
        bar = tqdm(total=n_chunks, initial=n_chunks - len(todo), unit="chunk",
                   desc="sampling", disable=args.rank != 0)
        for c in todo[args.rank::args.world]:  # the missing chunks, shared round-robin by the ranks
            chunk = labels[c * args.batch_size:(c + 1) * args.batch_size].to(args.device)
            images = generate_batched(model, vq, chunk, args, first_chunk=c, desc=None)[1]
            files.save_atomic_npz(chunk_path(parts, c), images=images.permute(0, 2, 3, 1).numpy())
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
    """Everything that decides a chunk's images (not the number of processes), as the flags name it:
    written beside the first chunks, and compared on every rerun."""
    labels_hash = hashlib.sha256(labels.numpy().tobytes()).hexdigest()[:16]
    settings = {
        "--ckpt contents": files.file_fingerprint(args.ckpt),
        "model config": asdict(model.config),
        "--vq-ckpt contents": files.file_fingerprint(args.vq_path),
        "device type": args.device.type,
        "--cfg": args.cfg,
        "--steps": args.steps,
        "--order": args.order,
        "--temperature": args.temperature,
        "--top-k": args.top_k,
        "--top-p": args.top_p,
        "--seed": args.seed,
        "--batch-size": args.batch_size,
        "labels (--classes, --per-class)": labels_hash,
    }
    settings = json.loads(json.dumps(settings))  # tuples as lists, as they come back from the file
    path = os.path.join(parts, "settings.json")
    if not os.path.exists(path):
        return files.write_atomic(lambda f: f.write(json.dumps(settings, indent=1).encode()), path)
    try:
        with open(path) as f:
            recorded = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path} is unreadable ({e}); delete {parts} to start again") from None
    for key in settings:
        if recorded.get(key) != settings[key]:
            raise ValueError(f"{parts} holds chunks made with {key} = {recorded.get(key)}, not "
                             f"{settings[key]}; rerun with the same settings, or delete {parts}")


def assemble(parts, n_chunks, labels, out):
    """Rank 0: the chunks, in order, streamed into one ADM-layout npz (arr_0 uint8 NHWC, arr_1
    labels): one chunk in memory at a time."""
    missing = [c for c in range(n_chunks) if not os.path.exists(chunk_path(parts, c))]
    if missing:
        raise ValueError(f"{parts}: chunk {missing[0]} is missing ({len(missing)} "
                         "in all); rerun the command")
    shape = (len(labels), *files.npz_array(chunk_path(parts, 0), "images").shape[1:])
    pieces = (files.npz_array(chunk_path(parts, c), "images") for c in range(n_chunks))
    files.write_atomic(lambda f: files.write_npz(f,
                                                   {"arr_0": (np.uint8, shape, pieces),
                                                    "arr_1": (np.int64, labels.shape,
                                                              [labels.numpy()])}), out)
