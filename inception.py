"""The FID Inception-v3: TensorFlow's FID graph (the one ADM's evaluator and the published numbers
use) in torch, with the module names and weights file of `pytorch-fid`
(`pt_inception-2015-12-05-6726825d.pth`). uint8 pixels are resized to 299x299 by TensorFlow's legacy
bilinear resize, then (x - 128) / 128; out come 2048-d pool features, 1008 logits without the fc
bias and sFID's 2,023 spatial features, all in full float32 (docs/algorithm.md §12). eval_fid.py
computes the metrics with them.
"""
import contextlib
import itertools
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
               "pt_inception-2015-12-05-6726825d.pth")
# ADM's sFID keeps the first 7 of the 192 channels of TensorFlow's mixed_6/conv
SPATIAL_CHANNELS = 7


# ----------------------------------------------------------------------------------------------
# Inception-v3, FID variant. Module names are those of the weights file (torchvision's layout).

class BasicConv2d(nn.Module):
    def __init__(self, c_in, c_out, kernel_size, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel_size, stride, padding, bias=False)
        self.bn = nn.BatchNorm2d(c_out, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def avg_pool_tf(x):
    # TensorFlow's 3x3 average pool ignores the zero padding; torch's default counts it.
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


def chain(module, prefix, x):
    """x through module.<prefix>1, <prefix>2, ... in turn."""
    for i in itertools.count(1):
        if not hasattr(module, f"{prefix}{i}"):
            return x
        x = getattr(module, f"{prefix}{i}")(x)


class InceptionA(nn.Module):
    def __init__(self, c_in, pool_features):
        super().__init__()
        self.branch1x1 = BasicConv2d(c_in, 64, 1)
        self.branch5x5_1 = BasicConv2d(c_in, 48, 1)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(c_in, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(c_in, pool_features, 1)

    def forward(self, x):
        return torch.cat([self.branch1x1(x), chain(self, "branch5x5_", x),
                          chain(self, "branch3x3dbl_", x), self.branch_pool(avg_pool_tf(x))], 1)


class InceptionB(nn.Module):  # grid reduction 35 -> 17
    def __init__(self, c_in):
        super().__init__()
        self.branch3x3 = BasicConv2d(c_in, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(c_in, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x):
        return torch.cat([self.branch3x3(x), chain(self, "branch3x3dbl_", x),
                          F.max_pool2d(x, 3, stride=2)], 1)


class InceptionC(nn.Module):  # factorised 7x7 convolutions
    def __init__(self, c_in, c7):
        super().__init__()
        row = dict(kernel_size=(1, 7), padding=(0, 3))
        col = dict(kernel_size=(7, 1), padding=(3, 0))
        self.branch1x1 = BasicConv2d(c_in, 192, 1)
        self.branch7x7_1 = BasicConv2d(c_in, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, **row)
        self.branch7x7_3 = BasicConv2d(c7, 192, **col)
        self.branch7x7dbl_1 = BasicConv2d(c_in, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, **col)
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, **row)
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, **col)
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, **row)
        self.branch_pool = BasicConv2d(c_in, 192, 1)

    def forward(self, x):
        return torch.cat([self.branch1x1(x), chain(self, "branch7x7_", x),
                          chain(self, "branch7x7dbl_", x), self.branch_pool(avg_pool_tf(x))], 1)


class InceptionD(nn.Module):  # grid reduction 17 -> 8
    def __init__(self, c_in):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(c_in, 192, 1)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(c_in, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x):
        pool = F.max_pool2d(x, 3, stride=2)
        return torch.cat([chain(self, "branch3x3_", x), chain(self, "branch7x7x3_", x), pool], 1)


class InceptionE(nn.Module):
    def __init__(self, c_in, max_pool):
        super().__init__()
        # the FID network's last block max-pools here (a quirk of the TF graph)
        self.max_pool = max_pool
        self.branch1x1 = BasicConv2d(c_in, 320, 1)
        self.branch3x3_1 = BasicConv2d(c_in, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(c_in, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(c_in, 192, 1)

    def forward(self, x):
        b3 = self.branch3x3_1(x)
        d = chain(self, "branch3x3dbl_", x)
        pool = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else avg_pool_tf(x)
        return torch.cat([self.branch1x1(x), self.branch3x3_2a(b3), self.branch3x3_2b(b3),
                          self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d),
                          self.branch_pool(pool)], 1)


def resize_like_tensorflow(x, size):
    """Bilinear resize as TensorFlow 1's legacy op, the one inside the FID Inception graph: output
    pixel i reads the input at i * (in / out), in float32 (no half-pixel centres, unlike
    F.interpolate's align_corners=False). x (B, C, H, W) float -> (B, C, size[0], size[1]); checked
    against TensorFlow in the tests."""
    for dim, out in ((3, size[1]), (2, size[0])):  # along rows first, then columns, as TensorFlow
        n = x.size(dim)
        step = torch.tensor(n / out, dtype=torch.float32)
        src = torch.arange(out, dtype=torch.float32, device=x.device) * step
        low = src.floor()
        frac = (src - low).view([-1 if d == dim else 1 for d in range(4)])
        index = low.long()
        a = x.index_select(dim, index)
        b = x.index_select(dim, (index + 1).clamp(max=n - 1))
        x = a + (b - a) * frac
    return x


@contextlib.contextmanager
def full_float32():
    """TF32 off for CUDA matmuls and cuDNN convolutions, the previous settings restored afterwards.
    cuDNN's convolutions default to TF32, which keeps 10 of float32's 23 mantissa bits of their
    inputs: the features, and every metric on them, would depend on the GPU's generation."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def spatial_features(x):
    """sFID's features from Mixed_6d's 1x1 branch (B, 192, 17, 17): ADM keeps its first 7 channels
    and flattens each image in TensorFlow's NHWC order -> (B, 17 * 17 * 7 = 2023)."""
    return x[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).flatten(1)


class FIDInception(nn.Module):
    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b = InceptionA(192, 32)
        self.Mixed_5c = InceptionA(256, 64)
        self.Mixed_5d = InceptionA(288, 64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, 128)
        self.Mixed_6c = InceptionC(768, 160)
        self.Mixed_6d = InceptionC(768, 160)
        self.Mixed_6e = InceptionC(768, 192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, max_pool=False)
        self.Mixed_7c = InceptionE(2048, max_pool=True)
        # the TF graph's 1008-way classifier, used for the Inception Score
        self.fc = nn.Linear(2048, 1008)

    def forward(self, images):
        """images (B, 3, H, W) uint8 -> pool features (B, 2048), logits (B, 1008), spatial
        features (B, 2023)."""
        with full_float32():
            return self.float32_forward(images)

    def float32_forward(self, images):
        # the TF graph's Sub, Mul
        x = (resize_like_tensorflow(images.float(), (299, 299)) - 128) / 128
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(F.max_pool2d(x, 3, stride=2)))
        x = F.max_pool2d(x, 3, stride=2)
        for name in ("5b", "5c", "5d", "6a", "6b", "6c"):
            x = getattr(self, f"Mixed_{name}")(x)
        # ADM's sFID reads the graph's mixed_6/conv: the graph numbers its blocks mixed, mixed_1,
        # ..., mixed_10 (Mixed_5b ... Mixed_7c), and its weights mixed_6/conv/conv2d_params are
        # this 1x1 branch's (torch-fidelity's converter, convert_inception_weights.py). Computed
        # once more beside the block, which concatenates it: a 1x1 convolution, cheap.
        spatial = spatial_features(self.Mixed_6d.branch1x1(x))
        for name in ("6d", "6e", "7a", "7b", "7c"):
            x = getattr(self, f"Mixed_{name}")(x)
        features = x.mean(dim=(2, 3))
        # logits without the bias, as the IS convention
        return features, features @ self.fc.weight.t(), spatial


def load_inception(path=None, device="cpu"):
    """Weights from path, else downloaded once into the torch hub cache (hash-checked), strictly
    loaded."""
    if path is None:
        path = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(WEIGHTS_URL))
        if not os.path.exists(path):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            # a hash mismatch (RuntimeError) or no connection: the partial file is already gone
            try:
                torch.hub.download_url_to_file(WEIGHTS_URL, path,
                                               hash_prefix=os.path.basename(path)[-12:-4])
            except (RuntimeError, OSError) as e:
                raise OSError(f"cannot download the Inception weights from {WEIGHTS_URL} "
                              f"({getattr(e, 'reason', e)}); fetch the file elsewhere "
                              "and pass --inception PATH") from None
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Inception weights not found: {path}")
    model = FIDInception()
    try:
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=True)
    except Exception as e:
        first_line = str(e).splitlines()[0]
        raise ValueError(f"cannot load Inception weights {path}: {first_line}") from None
    return model.to(device).eval()
