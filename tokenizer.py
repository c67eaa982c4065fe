"""A small VQ tokenizer: LlamaGen's VQGAN-family autoencoder, and its training.

Pixels in [-1, 1] go through the encoder, a 1x1 conv to a low-dimensional latent, the nearest
l2-normalised code and the decoder. Module names follow LlamaGen, so its published VQ-16 weights
(`vq_ds16_c2i.pt`, state dict under "model") load strictly into the `llamagen-vq16` preset. The
file has no command of its own. `python train.py` trains the tokenizer as its first stage
(train_tokenizer, which reports PSNR and codebook usage on the held-out split); token_cache.py then
encodes the dataset to tokens before RandAR trains on them.
"""
import math
import os
import time
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from checkpoints import load_torch_file
from files import save_atomic, save_png
from image_data import limited, open_dataset
from image_grid import image_grid
from maskgit_vq import MaskGITConfig, MaskGITVQ


@dataclass
class VQConfig:
    in_channels: int = 3             # 1 for grayscale data; decoder outputs the same number
    ch: int = 128                    # base width (the reference hard-codes 128)
    ch_mult: tuple = (1, 1, 2, 2, 4)  # width multipliers per level; downsample = 2^(levels-1)
    num_res_blocks: int = 2
    z_channels: int = 256
    codebook_size: int = 16384
    codebook_embed_dim: int = 8      # low-dimensional, l2-normalised codes (better usage, LlamaGen)
    commit_loss_beta: float = 0.25
    entropy_loss_ratio: float = 0.0
    dropout: float = 0.0
    groupnorm_groups: int = 32

    @property
    def downsample(self):
        return 2 ** (len(self.ch_mult) - 1)

    @classmethod
    def from_dict(cls, d):
        """Ours, or the reference's names (encoder_ch_mult / decoder_ch_mult / dropout_p /
        out_channels)."""
        d = {{"encoder_ch_mult": "ch_mult", "dropout_p": "dropout"}.get(k,
                                                                        k): v for k, v in d.items()}
        if list(d.get("decoder_ch_mult", d["ch_mult"])) != list(d["ch_mult"]) or \
                d.get("out_channels", d["in_channels"]) != d["in_channels"]:
            raise ValueError("the tokenizer config's decoder must mirror its "
                             "encoder (ch_mult, channels)")
        names = {f.name for f in fields(cls)}
        return cls(**{k: tuple(v) if k == "ch_mult" else v for k, v in d.items() if k in names})


PRESETS = {
    # Fashion-MNIST padded to 32x32, downsample 4 -> 8x8 = 64 tokens.
    "demo": VQConfig(in_channels=1, ch=16, ch_mult=(1, 2, 4), num_res_blocks=1, z_channels=64,
                     codebook_size=512, groupnorm_groups=8),
    # LlamaGen VQ-16 (ImageNet 256x256 -> 16x16 tokens), the tokenizer of the RandAR paper.
    "llamagen-vq16": VQConfig(),
}


# ----------------------------------------------------------------------------------------------
# The autoencoder

def Norm(cfg, channels):
    return nn.GroupNorm(cfg.groupnorm_groups, channels, eps=1e-6)


class ResnetBlock(nn.Module):
    def __init__(self, cfg, c_in, c_out):
        super().__init__()
        self.norm1 = Norm(cfg, c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2 = Norm(cfg, c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.dropout = nn.Dropout(cfg.dropout)
        if c_in != c_out:
            self.nin_shortcut = nn.Conv2d(c_in, c_out, 1)

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return (self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W positions of a feature map."""

    def __init__(self, cfg, c):
        super().__init__()
        self.norm = Norm(cfg, c)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(c, c, 1) for _ in range(4))

    def forward(self, x):
        B, C, H, W = x.shape
        h = self.norm(x)
        q, k, v = (conv(h).reshape(B, 1, C, H * W).transpose(2, 3)
                   for conv in (self.q, self.k, self.v))
        h = F.scaled_dot_product_attention(q, k, v)  # (B, 1, HW, C), scale C^-1/2
        return x + self.proj_out(h.transpose(2, 3).reshape(B, C, H, W))


class Downsample(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=2)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # pad right/bottom only, as the reference


class Upsample(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """One resolution: ResnetBlocks (each optionally followed by an AttnBlock), then a resampler."""

    def __init__(self, cfg, c_in, c_out, n_res, attn, down=False, up=False):
        super().__init__()
        self.res = nn.ModuleList(ResnetBlock(cfg, c_in if j == 0 else c_out,
                                             c_out) for j in range(n_res))
        self.attn = nn.ModuleList(AttnBlock(cfg, c_out) for _ in range(n_res if attn else 0))
        if down:
            self.downsample = Downsample(c_out)
        if up:
            self.upsample = Upsample(c_out)

    def forward(self, x):
        for j, res in enumerate(self.res):
            x = res(x)
            if len(self.attn):
                x = self.attn[j](x)
        if hasattr(self, "downsample"):
            x = self.downsample(x)
        if hasattr(self, "upsample"):
            x = self.upsample(x)
        return x


def middle(cfg, c):
    return nn.ModuleList([ResnetBlock(cfg, c, c), AttnBlock(cfg, c), ResnetBlock(cfg, c, c)])


class Encoder(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        widths = [cfg.ch * m for m in cfg.ch_mult]
        last = len(widths) - 1
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        self.conv_blocks = nn.ModuleList(Level(cfg, ([cfg.ch] + widths)[i], widths[i],
                                               cfg.num_res_blocks, attn=i == last,
                                               down=i < last) for i in range(len(widths)))
        self.mid = middle(cfg, widths[-1])
        self.norm_out = Norm(cfg, widths[-1])
        self.conv_out = nn.Conv2d(widths[-1], cfg.z_channels, 3, padding=1)

    def forward(self, x):
        x = self.conv_in(x)
        for block in list(self.conv_blocks) + list(self.mid):
            x = block(x)
        return self.conv_out(F.silu(self.norm_out(x)))


class Decoder(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        widths = [cfg.ch * m for m in reversed(cfg.ch_mult)]  # conv_blocks.0 is the deepest level
        last = len(widths) - 1
        self.conv_in = nn.Conv2d(cfg.z_channels, widths[0], 3, padding=1)
        self.mid = middle(cfg, widths[0])
        self.conv_blocks = nn.ModuleList(Level(cfg, ([widths[0]] + widths)[i], widths[i],
                                               cfg.num_res_blocks + 1, attn=i == 0,
                                               up=i < last) for i in range(len(widths)))
        self.norm_out = Norm(cfg, widths[-1])
        self.conv_out = nn.Conv2d(widths[-1], cfg.in_channels, 3, padding=1)

    def forward(self, z):
        x = self.conv_in(z)
        for block in list(self.mid) + list(self.conv_blocks):
            x = block(x)
        return self.conv_out(F.silu(self.norm_out(x)))  # no tanh, as the reference


class VectorQuantizer(nn.Module):
    USAGE_LOG = 65536  # length of the reference's FIFO log of recent code indices

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.embedding = nn.Embedding(cfg.codebook_size, cfg.codebook_embed_dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / cfg.codebook_size, 1.0 / cfg.codebook_size)
        self.register_buffer("codebook_used", torch.zeros(self.USAGE_LOG))

    def codebook(self):
        return F.normalize(self.embedding.weight, dim=-1)  # normalised at every call

    def forward(self, z):
        """z (B, C, h, w) -> straight-through z_q (B, C, h, w), losses dict, indices (B, h, w)."""
        B, C, h, w = z.shape
        z = F.normalize(z.permute(0, 2, 3, 1).reshape(-1, C), dim=-1)  # (B*h*w, C)
        codes = self.codebook()
        dist = z.pow(2).sum(1, keepdim=True) + codes.pow(2).sum(1) - 2 * z @ codes.t()
        idx = dist.argmin(dim=1)  # first index on ties
        # F.embedding, not codes[idx]: on CPU the backward of indexing accumulates with threads in a
        # varying order (last-bit differences between runs); the embedding backward is deterministic
        z_q = F.embedding(idx, codes)
        losses = {}
        if self.training:
            losses["vq"] = (z_q - z.detach()).pow(2).mean()
            losses["commit"] = self.cfg.commit_loss_beta * (z_q.detach() - z).pow(2).mean()
            if self.cfg.entropy_loss_ratio > 0:
                losses["entropy"] = self.cfg.entropy_loss_ratio * entropy_loss(-dist)
            n = min(idx.numel(), self.USAGE_LOG)
            self.codebook_used.copy_(torch.cat([self.codebook_used[n:], idx[-n:].float()]))
            z_q = z + (z_q - z).detach()  # straight-through gradient to the encoder
        z_q = z_q.view(B, h, w, C).permute(0, 3, 1, 2)
        return z_q, losses, idx.view(B, h, w)

    def usage(self):
        """Fraction of codes among the last USAGE_LOG indices (the reference's measure)."""
        return self.codebook_used.unique().numel() / self.cfg.codebook_size


def entropy_loss(affinity, temperature=0.01):
    """Per-sample entropy minus the entropy of the mean assignment (LlamaGen's optional loss)."""
    probs = (affinity / temperature).softmax(-1)
    sample_entropy = -(probs * (affinity / temperature + 1e-5).log_softmax(-1)).sum(-1).mean()
    mean_probs = probs.mean(0)
    return sample_entropy + (mean_probs * (mean_probs + 1e-5).log()).sum()


class VQModel(nn.Module):
    def __init__(self, cfg: VQConfig):
        super().__init__()
        self.config = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quantize = VectorQuantizer(cfg)
        self.quant_conv = nn.Conv2d(cfg.z_channels, cfg.codebook_embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(cfg.codebook_embed_dim, cfg.z_channels, 1)

    def forward(self, images):
        """images (B, C, H, W) in [-1, 1] -> reconstruction, quantizer losses, indices (B, h, w)."""
        z_q, losses, idx = self.quantize(self.quant_conv(self.encoder(images)))
        return self.decoder(self.post_quant_conv(z_q)), losses, idx

    @property
    def device(self):
        return self.quant_conv.weight.device

    @torch.no_grad()
    def encode(self, images):
        return self.quantize(self.quant_conv(self.encoder(images)))[2]

    @torch.no_grad()
    def decode(self, indices):
        """indices (B, h, w) -> images (B, C, H, W), roughly in [-1, 1]."""
        z_q = self.quantize.codebook()[indices].permute(0, 3, 1, 2)  # permute, not reshape
        return self.decoder(self.post_quant_conv(z_q))

    # uint8 in and out, as every tokenizer here does (maskgit_vq.MaskGITVQ has its own pixel range)
    def encode_images(self, images_uint8):
        return self.encode(to_pixels(images_uint8, self.device))

    def decode_images(self, indices):
        return to_uint8(self.decode(indices).float())


def load_tokenizer(path, device="cpu"):
    """Rebuild the tokenizer from a checkpoint written by train.py's first stage, LlamaGen's
    vq_ds16_c2i.pt, or MaskGIT's released state dict (strict load)."""
    ckpt = load_torch_file(path, "tokenizer checkpoint")
    # MaskGIT-VQ: a bare state dict, sizes from its shapes
    if "encoder.down.0.block.0.conv1.weight" in ckpt:
        try:
            cfg = MaskGITConfig.from_state_dict(ckpt)
        except (KeyError, AttributeError, IndexError, ValueError) as e:
            raise ValueError(f"{path} looks like MaskGIT-VQ weights but lacks {e}") from None
        return load_strict(MaskGITVQ(cfg), ckpt, path, device)
    state = ckpt.get("model")
    if not isinstance(state, dict) or "encoder.conv_in.weight" not in state:
        is_randar = isinstance(state, dict) and "tok_embeddings.weight" in state
        what = "a RandAR checkpoint" if is_randar else "another file"
        raise ValueError(f"{path} is {what}, expected a tokenizer checkpoint")
    # LlamaGen's published vq_ds16_c2i.pt holds only {"model": ...}: it is the llamagen-vq16 preset.
    cfg = VQConfig.from_dict(ckpt["config"]) if "config" in ckpt else PRESETS["llamagen-vq16"]
    return load_strict(VQModel(cfg), state, path, device)


def load_strict(model, state, path, device):
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first_line = str(e).splitlines()[0]
        raise ValueError(f"{path}: weights do not match its config ({first_line})") from None
    return model.to(device).eval()


# ----------------------------------------------------------------------------------------------
# Pixels, as this tokenizer reads and writes them

def to_pixels(images_uint8, device=None):
    """uint8 images -> floats in [-1, 1] on `device` (moved as uint8: a quarter of the bytes)."""
    return images_uint8.to(device, non_blocking=True).float() / 127.5 - 1.0


def to_uint8(pixels):
    return ((pixels.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


# ----------------------------------------------------------------------------------------------
# Training (train.py's first stage)

def train_tokenizer(out_dir, data="fashion-mnist", data_dir=None, image_size=32, limit=0,
                    preset="demo", steps=600, batch_size=64, lr=2e-3, reinit_every=200,
                    image_every=500, seed=0, device="cpu", workers=0):
    """Train the VQ autoencoder (MSE + VQ losses) on `device` and write <out_dir>/tokenizer.pt;
    returns its path. `workers` DataLoader processes decode the images (ImageFolder) while the model
    trains."""
    torch.manual_seed(seed)
    dataset = limited(open_dataset(data, "train", data_dir, image_size)[0], limit)
    cfg = PRESETS[preset]
    if data != "fashion-mnist" and cfg.in_channels != 3:
        cfg = VQConfig(**{**asdict(cfg), "in_channels": 3})
    check_fits(cfg, dataset)
    ckpt_path = os.path.join(out_dir, "tokenizer.pt")
    model = VQModel(cfg).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=lr, betas=(0.9, 0.95))
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True,
                                         drop_last=True, num_workers=workers,
                                         persistent_workers=workers > 0)
    print(f"training tokenizer '{preset}' on {data} ({len(dataset)} images) for {steps} steps "
          f"on {device} -> {ckpt_path}")
    fixed = next(iter(torch.utils.data.DataLoader(dataset, batch_size=8)))[0]
    code_hits = torch.zeros(cfg.codebook_size, device=device)
    t0 = time.time()
    batches = repeat_epochs(loader, "the tokenizer's training data")  # epoch after epoch
    for step in (bar := tqdm(range(steps), desc="tokenizer")):
        x = to_pixels(next(batches)[0], device)
        warmup = min(1.0, (step + 1) / 100)  # 100 warm-up steps, cosine to 0
        for group in opt.param_groups:
            group["lr"] = lr * warmup * 0.5 * (1 + math.cos(math.pi * step / steps))
        model.train()
        recon, losses, idx = model(x)
        rec_loss = F.mse_loss(recon, x)
        opt.zero_grad(set_to_none=True)
        (rec_loss + sum(losses.values())).backward()
        opt.step()
        code_hits += torch.bincount(idx.flatten(), minlength=cfg.codebook_size)
        if (step + 1) % reinit_every == 0 and step + 1 < 0.8 * steps:
            reinit_dead_codes(model, code_hits, x)  # (and restarts the count)
        if (step + 1) % 10 == 0:  # reading the loss waits for the device: not at every step
            bar.set_postfix(rec=f"{rec_loss.item():.4f}", usage=f"{model.quantize.usage():.2f}")
        if (step + 1) % image_every == 0 or step + 1 == steps:
            save_reconstructions(model, fixed, os.path.join(out_dir, "tokenizer_recon.png"))
    bar.close()
    save_atomic({"model": model.state_dict(), "config": asdict(cfg), "step": steps, "data": data,
                 "image_size": image_size}, ckpt_path)
    test_images = limited(open_dataset(data, "test", data_dir, image_size)[0], limit)
    psnr, usage = evaluate(model, test_images, workers=workers)
    print(f"done in {time.time() - t0:.0f}s, wrote {ckpt_path}; held-out images: PSNR {psnr:.2f} "
          f"dB, {usage:.1f}% of the {cfg.codebook_size} codes used")
    return ckpt_path


def repeat_epochs(loader, what):
    """The batches of loader, epoch after epoch, for a loop that stops after a number of steps. An
    epoch that yields no batch (a dataset smaller than one batch, with drop_last) is an error, not
    an endless loop."""
    while True:
        yielded = False
        for batch in loader:
            yielded = True
            yield batch
        if not yielded:
            raise ValueError(f"{what}: a whole epoch gave no batch ({len(loader.dataset)} items, "
                             f"batch size {loader.batch_size}, incomplete batches dropped)")


@torch.no_grad()
def reinit_dead_codes(model, code_hits, x):
    """Codes unused since the last call get the latents of random recent inputs, so usage stays
    high."""
    dead = (code_hits == 0).nonzero().flatten()
    code_hits.zero_()
    if len(dead) == 0:
        return
    z = model.quant_conv(model.encoder(x)).permute(0, 2, 3, 1)
    z = z.reshape(-1, model.config.codebook_embed_dim)
    pick = torch.randint(0, z.size(0), (len(dead),)).to(z.device)
    model.quantize.embedding.weight[dead] = F.normalize(z[pick], dim=-1)


@torch.no_grad()
def save_reconstructions(model, images, path):
    model.eval()
    recon = model.decode_images(model.encode_images(images)).cpu()
    # originals above recons
    save_png(image_grid(torch.cat([images, recon]), nrow=len(images)), path)


# ----------------------------------------------------------------------------------------------
# Checks and evaluation

def check_fits(cfg, dataset):
    C, H, W = dataset[0][0].shape
    if C != cfg.in_channels:
        raise ValueError(f"images have {C} channels but the tokenizer takes {cfg.in_channels}")
    if H % cfg.downsample or W % cfg.downsample:
        raise ValueError(f"image size {H}x{W} is not divisible by the "
                         f"downsample factor {cfg.downsample}")


@torch.no_grad()
def evaluate(model, dataset, batch_size=256, workers=0):
    """PSNR (dB, on uint8 pixels) and % of codes used on a dataset, on the model's device."""
    device = model.device
    model = model.eval()
    mse = 0.0
    count = 0
    used = torch.zeros(model.config.codebook_size, dtype=torch.bool, device=device)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers)
    for images, _ in tqdm(loader, desc="eval"):
        idx = model.encode_images(images)
        recon = model.decode_images(idx).float().cpu()
        mse += (recon - images.float()).pow(2).mean(dim=(1, 2, 3)).sum().item()
        count += len(images)
        used[idx.unique()] = True
    return 10 * math.log10(255 ** 2 / (mse / count)), 100.0 * used.float().mean().item()
