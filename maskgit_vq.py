"""MaskGIT's VQGAN tokenizer: the tokenizer of the third RandAR release (0.3B, FID 2.47).

    256x256 pixels in [0, 1] -> encoder (no attention, average-pool down)
    -> nearest of 1024 plain codes (Euclidean, 256-d, no normalisation, no quant convs)
    -> decoder (nearest-neighbour up + 3x3 conv)

Module names are those of `maskgit-vqgan-imagenet-f16-256.bin` (Hugging Face `fun-research/TiTok`),
so the file loads strictly; tokenizer.load_tokenizer recognises it. The file holds no config: every
size is read off the weights' shapes (MaskGITConfig.from_state_dict). Conventions:
docs/algorithm.md §10.
"""
import re
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class MaskGITConfig:
    hidden_channels: int = 128
    channel_mult: tuple = (1, 1, 2, 2, 4)  # one level each; the last has no pooling
    num_res_blocks: int = 2
    z_channels: int = 256                  # also the codes' width
    num_embeddings: int = 1024
    in_channels: int = 3

    @property
    def codebook_size(self):
        return self.num_embeddings

    @property
    def downsample(self):
        return 2 ** (len(self.channel_mult) - 1)

    @classmethod
    def from_state_dict(cls, state):
        """The sizes a state dict of this architecture was built with (releases carry no config)."""
        hidden, in_channels = state["encoder.conv_in.weight"].shape[:2]
        levels = 1 + max(index_in(state, r"encoder\.down\.(\d+)\."))
        blocks = 1 + max(index_in(state, r"encoder\.down\.0\.block\.(\d+)\."))
        widths = [state[f"encoder.down.{i}.block.0.conv2.weight"].shape[0] for i in range(levels)]
        num_embeddings, z_channels = state["quantize.embedding.weight"].shape
        return cls(hidden_channels=hidden, channel_mult=tuple(w // hidden for w in widths),
                   num_res_blocks=blocks, z_channels=z_channels, num_embeddings=num_embeddings,
                   in_channels=in_channels)


def index_in(state, pattern):
    """The integers a state dict's names hold at the pattern's group, e.g. every level's index."""
    return {int(m.group(1)) for name in state if (m := re.match(pattern, name))}


def Norm(channels):
    return nn.GroupNorm(32, channels, eps=1e-6)


def Conv(c_in, c_out, kernel_size, bias=True):
    # TensorFlow's "same" padding: with stride 1 and an odd kernel, kernel_size // 2 on every side
    return nn.Conv2d(c_in, c_out, kernel_size, padding=kernel_size // 2, bias=bias)


class ResnetBlock(nn.Module):
    """Bias-free convolutions. Where the width changes, the shortcut is a 1x1 convolution of the
    block's *output*, not of its input: the released weights were trained so (shapes out x out)."""

    def __init__(self, c_in, c_out):
        super().__init__()
        self.norm1 = Norm(c_in)
        self.conv1 = Conv(c_in, c_out, 3, bias=False)
        self.norm2 = Norm(c_out)
        self.conv2 = Conv(c_out, c_out, 3, bias=False)
        if c_in != c_out:
            self.nin_shortcut = Conv(c_out, c_out, 1, bias=False)

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        shortcut = self.nin_shortcut(h) if hasattr(self, "nin_shortcut") else x
        return h + shortcut


class Level(nn.Module):
    """One resolution's ResnetBlocks (`block`); in the decoder, the convolution after upsampling."""

    def __init__(self, c_in, c_out, num_blocks, upsample=False):
        super().__init__()
        widths = [c_in] + [c_out] * num_blocks
        self.block = nn.ModuleList(ResnetBlock(widths[j], c_out) for j in range(num_blocks))
        if upsample:
            self.upsample_conv = Conv(c_out, c_out, 3)

    def forward(self, x):
        for block in self.block:
            x = block(x)
        if hasattr(self, "upsample_conv"):
            x = self.upsample_conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        return x


def middle(width, num_blocks):
    return nn.ModuleList(ResnetBlock(width, width) for _ in range(num_blocks))


class Encoder(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        widths = [cfg.hidden_channels * m for m in cfg.channel_mult]
        inputs = [cfg.hidden_channels] + widths[:-1]
        self.conv_in = Conv(cfg.in_channels, cfg.hidden_channels, 3, bias=False)
        self.down = nn.ModuleList(Level(c_in, c_out, cfg.num_res_blocks)
                                  for c_in, c_out in zip(inputs, widths))
        self.mid = middle(widths[-1], cfg.num_res_blocks)
        self.norm_out = Norm(widths[-1])
        self.conv_out = Conv(widths[-1], cfg.z_channels, 1)

    def forward(self, x):
        x = self.conv_in(x)
        for i, level in enumerate(self.down):
            x = level(x)
            if i < len(self.down) - 1:
                x = F.avg_pool2d(x, 2)
        for block in self.mid:
            x = block(x)
        return self.conv_out(F.silu(self.norm_out(x)))


class Decoder(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        widths = [cfg.hidden_channels * m for m in cfg.channel_mult]
        inputs = widths[1:] + widths[-1:]  # up.i reads up.(i+1)'s output; the deepest, the middle's
        self.conv_in = Conv(cfg.z_channels, widths[-1], 3)
        self.mid = middle(widths[-1], cfg.num_res_blocks)
        # up.0 is the full resolution and runs last (the release's numbering)
        self.up = nn.ModuleList(Level(inputs[i], widths[i], cfg.num_res_blocks, upsample=i > 0)
                                for i in range(len(widths)))
        self.norm_out = Norm(widths[0])
        self.conv_out = Conv(widths[0], cfg.in_channels, 3)

    def forward(self, z):
        x = self.conv_in(z)
        for block in self.mid:
            x = block(x)
        for level in reversed(self.up):
            x = level(x)
        return self.conv_out(F.silu(self.norm_out(x)))


class Quantizer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.embedding = nn.Embedding(cfg.num_embeddings, cfg.z_channels)

    def forward(self, z):
        """z (B, C, h, w) -> index of the nearest code in Euclidean distance, (B, h, w)."""
        B, C, h, w = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, C)
        codes = self.embedding.weight
        dist = flat.pow(2).sum(1, keepdim=True) + codes.pow(2).sum(1) - 2 * flat @ codes.t()
        return dist.argmin(dim=1).view(B, h, w)


class MaskGITVQ(nn.Module):
    """Encode and decode only (the release is frozen: no training losses here)."""

    def __init__(self, cfg: MaskGITConfig):
        super().__init__()
        self.config = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quantize = Quantizer(cfg)

    @property
    def device(self):
        return self.quantize.embedding.weight.device

    @torch.no_grad()
    def encode(self, pixels):
        """pixels (B, 3, H, W) in [0, 1] -> code indices (B, H/16, W/16)."""
        return self.quantize(self.encoder(pixels))

    @torch.no_grad()
    def decode(self, indices):
        """indices (B, h, w) -> pixels (B, 3, 16h, 16w), clamped to [0, 1]."""
        z = self.quantize.embedding(indices).permute(0, 3, 1, 2)
        return self.decoder(z).clamp(0, 1)

    def encode_images(self, images_uint8):
        return self.encode(images_uint8.to(self.device).float() / 255)

    def decode_images(self, indices):
        # x * 255 truncated, not rounded: the reference's uint8 (docs/algorithm.md §10)
        return (self.decode(indices).float() * 255).clamp(0, 255).to(torch.uint8)
