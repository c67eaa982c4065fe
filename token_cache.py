"""The token cache, train.py's first stages. Rank 0 trains the tokenizer when there is none; then
all ranks together encode every image once, on their devices; then training reads the cache.

An ImageFolder's training split is stored as the releases stored theirs (docs/algorithm.md §12).
Each image has the codes of the image itself (`tokens`) and of its mirror image
(`tokens_flipped`), and each read takes one of the two.
"""

import os

import torch
from tqdm import tqdm

import checkpoints
import distributed
import files
import image_data
import tokenizer as tok


def check_enough_images(args, world):
    """Before any work: refuse a training split smaller than one batch of a stage that will run (an
    epoch without a batch would otherwise start the next one forever)."""
    own_tokenizer = os.path.join(args.out_dir, "tokenizer.pt")
    trains_tokenizer = not args.tokenizer_ckpt and not os.path.exists(own_tokenizer)
    if os.path.exists(os.path.join(args.out_dir, "tokens_train.pt")):
        return  # nothing left to read; train.py still checks the token file against the batch
    dataset = image_data.open_dataset(args.data, "train", args.data_dir, args.image_size)[0]
    n = len(image_data.limited(dataset, args.limit))
    if trains_tokenizer and n < args.tokenizer_batch_size:
        raise ValueError(f"{n} training images are fewer than one tokenizer batch "
                         f"({args.tokenizer_batch_size}); lower --tokenizer-batch-size")
    global_batch = args.batch_size * world * args.grad_accum
    if n < global_batch:
        raise ValueError(f"{n} training images are fewer than one global batch ({global_batch} = "
                         f"--batch-size {args.batch_size} x {world} processes x --grad-accum "
                         f"{args.grad_accum}); lower --batch-size")


def prepare_tokens(args, rank, world, device):
    """Tokenizer checkpoint (trained here if missing, on rank 0) and the token files of both splits,
    encoded by all ranks together on their devices (encode_split)."""
    ckpt = args.tokenizer_ckpt or os.path.join(args.out_dir, "tokenizer.pt")
    if args.workers is None:
        # JPEG decoding of an ImageFolder would starve the device; Fashion-MNIST is in memory
        args.workers = 0 if args.data == "fashion-mnist" else min(8, os.cpu_count() or 1)
    data = dict(data=args.data, data_dir=args.data_dir, image_size=args.image_size,
                limit=args.limit)
    if args.tokenizer_ckpt and not os.path.isfile(ckpt):
        raise FileNotFoundError(f"--tokenizer-ckpt not found: {ckpt}")
    if rank == 0 and not os.path.exists(ckpt):
        tok.train_tokenizer(args.out_dir, steps=args.tokenizer_steps,
                            batch_size=args.tokenizer_batch_size, seed=args.seed, device=device,
                            workers=args.workers, **data)
    distributed.barrier()
    caches = {}
    for split in ("train", "test"):
        path = os.path.join(args.out_dir, f"tokens_{split}.pt")
        if not os.path.exists(path):
            encode_split(ckpt, split, path, rank=rank, world=world, device=device,
                         workers=args.workers, **data)
            distributed.barrier()
            if rank == 0 and world > 1:
                join_parts(path, world)
            distributed.barrier()
        caches[split] = load_cache(path, ckpt, split, data)
    return ckpt, caches


def load_cache(path, ckpt, split, data):
    """A token file, refused if made from other inputs (it would silently train on wrong tokens)."""
    cache = checkpoints.load_torch_file(path, "token file")
    wanted = encode_source(ckpt, data["data"], split, data["image_size"], data["limit"])
    if cache.get("source") != wanted:
        raise ValueError(f"{path} was encoded from {cache.get('source')}, not {wanted}; "
                         f"delete it or use another --out-dir")
    return cache


@torch.no_grad()
def encode_dataset(model, dataset, batch_size=256, show_progress=True, workers=0, flipped=False):
    """Token grids of every image -> tokens (M, h*w) int16/int32, labels (M,), and with flipped=True
    the tokens of every image mirrored left-right (else None); on the model's device, with fp32
    weights. On a GPU the convolutions run in TF32 (cuDNN's default; train.py turns it on for
    matmuls too), whose 10-bit mantissas could move a latent to another nearest code."""
    tokens = []
    mirrored = []
    labels = []
    device = model.device
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers,
                                         pin_memory=device.type == "cuda")
    for images, y in tqdm(loader, desc=f"encode on {device}", disable=not show_progress):
        tokens.append(model.encode_images(images).flatten(1).cpu())
        if flipped:
            mirrored.append(model.encode_images(images.flip(-1)).flatten(1).cpu())
        labels.append(torch.as_tensor(y))
    dtype = torch.int16 if model.config.codebook_size <= 32767 else torch.int32
    mirrored = torch.cat(mirrored).to(dtype) if flipped else None
    return torch.cat(tokens).to(dtype), torch.cat(labels), mirrored


def flip_pairs(data, split):
    """Whether a split is stored with mirrored codes: an ImageFolder's training split, as the
    releases'."""
    return data != "fashion-mnist" and split == "train"


def encode_source(ckpt, data, split, image_size, limit):
    """What a token file was made from; train.py refuses a cache made from something else."""
    source = {"data": data, "split": split, "image_size": image_size, "limit": limit,
              "tokenizer": files.file_fingerprint(ckpt)}
    if data != "fashion-mnist":  # how the images were read, so a cache read otherwise is refused
        source.update(crop="adm", flip_pairs=flip_pairs(data, split))
    return source


def encode_split(ckpt, split, out, data="fashion-mnist", data_dir=None, image_size=32, limit=0,
                 rank=0, world=1, device="cpu", workers=0):
    """Encode one split to `out`. Under torchrun each rank encodes a contiguous 1/world of the
    images into its own part file, and rank 0 joins the parts in order (join_parts): the same file
    for any number of ranks."""
    model = tok.load_tokenizer(ckpt, device)
    dataset, num_classes = image_data.open_dataset(data, split, data_dir, image_size)
    dataset = image_data.limited(dataset, limit)
    tok.check_fits(model.config, dataset)
    lo = len(dataset) * rank // world
    hi = len(dataset) * (rank + 1) // world
    my_slice = torch.utils.data.Subset(dataset, range(lo, hi))
    tokens, labels, mirrored = encode_dataset(model, my_slice, show_progress=rank == 0,
                                              workers=workers, flipped=flip_pairs(data, split))
    cache = {"num_classes": num_classes, "vocab_size": model.config.codebook_size,
             "tokenizer": os.path.abspath(ckpt), "tokens": tokens, "labels": labels,
             "source": encode_source(ckpt, data, split, image_size, limit)}
    if mirrored is not None:
        cache["tokens_flipped"] = mirrored
    files.save_atomic(cache, out if world == 1 else f"{out}.part{rank}of{world}")


def join_parts(out, world):
    """Rank 0, after every rank's encode_split: the part files -> one token file, in rank order."""
    names = [f"{out}.part{r}of{world}" for r in range(world)]
    parts = [checkpoints.load_torch_file(n, "token part file") for n in names]
    tensors = [k for k in ("tokens", "tokens_flipped", "labels") if k in parts[0]]
    files.save_atomic({**parts[0], **{k: torch.cat([p[k] for p in parts]) for k in tensors}}, out)
    for n in names:
        os.remove(n)


def flip_coins(cache, seed, epoch):
    """Which images read their mirrored codes this epoch (None when the cache has none). They are
    drawn for all images at once from (seed, epoch) alone, so they are the same for any number of
    processes and after a resume."""
    if "tokens_flipped" not in cache:
        return None
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randint(0, 2, (len(cache["tokens"]),), generator=g).bool()


def batch_tokens(cache, indices, coins):
    """The tokens of the images `indices` (as long), each as is or mirrored by its coin."""
    tokens = cache["tokens"][indices]
    if coins is not None:
        tokens = torch.where(coins[indices, None], cache["tokens_flipped"][indices], tokens)
    return tokens.long()
