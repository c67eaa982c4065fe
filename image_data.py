"""The image data: Fashion-MNIST (IDX files: the Debian package, a folder, or downloaded) and
ImageFolders (one subfolder per class, as ImageNet), read as uint8 images with integer labels. An
ImageFolder is cropped as the releases' data was (ADM's centre crop, docs/algorithm.md §12);
token_cache.py encodes it, with mirrored copies.
"""
import gzip
import hashlib
import math
import os
import socket
import urllib.error

import numpy as np
import torch
from PIL import Image

FASHION_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
FASHION_MD5 = {  # checksums of the official files
    "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
    "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
    "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
}
FASHION_DIRS = ["/usr/share/datasets/fashion-mnist"]  # Debian package dataset-fashion-mnist
FASHION_CLASSES = ("T-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt",
                   "sneaker", "bag", "ankle boot")
FASHION_NUM_CLASSES = len(FASHION_CLASSES)
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def download(url, dest, md5):
    """url -> dest, md5-checked, through torch.hub's downloader; a failure leaves nothing behind and
    is one error."""
    tmp = dest + ".part"
    # torch.hub's downloader sets no timeout: a stalled server must fail, not hang
    socket.setdefaulttimeout(60)
    try:
        torch.hub.download_url_to_file(url, tmp)
        with open(tmp, "rb") as f:
            digest = hashlib.md5(f.read()).hexdigest()
        if digest != md5:
            raise ValueError(f"checksum mismatch for {url}: md5 {digest}, expected {md5}")
        os.replace(tmp, dest)
    except urllib.error.URLError as e:
        raise OSError(f"cannot download {os.path.basename(dest)} from {url} ({e.reason})") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def read_idx(path):
    try:
        with gzip.open(path, "rb") as f:
            data = f.read()
        ndim = data[3]
        shape = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
        if data[:3] != b"\x00\x00\x08" or len(data) != 4 + 4 * ndim + math.prod(shape):
            raise ValueError("bad header")
    except (OSError, EOFError, ValueError, IndexError) as e:
        raise ValueError(f"{path} is not a valid gzipped IDX file ({e})") from None
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(shape)


def fashion_mnist(split, data_dir=None, url=FASHION_URL):
    """uint8 images (N, 1, 32, 32) (28x28 zero-padded by 2) and int64 labels (N,)."""
    prefix = {"train": "train", "test": "t10k"}[split]
    names = [f"{prefix}-images-idx3-ubyte.gz", f"{prefix}-labels-idx1-ubyte.gz"]
    if data_dir is not None and not os.path.isdir(data_dir):
        raise FileNotFoundError(f"data directory not found: {data_dir}")
    search = [data_dir] if data_dir else FASHION_DIRS
    holding_all = (d for d in search if all(os.path.isfile(os.path.join(d, n)) for n in names))
    folder = next(holding_all, None)
    if folder is None:  # download into data_dir, or a user cache
        cache = os.path.join(os.path.expanduser("~"), ".cache", "randar", "fashion-mnist")
        folder = data_dir or cache
        os.makedirs(folder, exist_ok=True)
        for n in names:
            if not os.path.isfile(os.path.join(folder, n)):
                try:
                    download(url + n, os.path.join(folder, n), FASHION_MD5[n])
                except OSError as e:
                    raise OSError(f"{e}; pass --data-dir DIR holding the four Fashion-MNIST IDX "
                                  f".gz files, or install the Debian package dataset-fashion-mnist"
                                  ) from None
    images = read_idx(os.path.join(folder, names[0]))
    labels = read_idx(os.path.join(folder, names[1]))
    if images.ndim != 3 or labels.shape != images.shape[:1]:
        raise ValueError(f"{folder}: images {images.shape} and labels {labels.shape} do not match")
    images = np.pad(images, ((0, 0), (2, 2), (2, 2)))[:, None]
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))


# The algorithm: ADM's centre crop (openai/guided-diffusion, guided_diffusion/image_datasets.py).
def center_crop_adm(image, size):
    """The releases' preprocessing (docs/algorithm.md §12): the centre of the image scaled to a
    short side of size. PIL image -> uint8 array (size, size, C)."""
    # Box-filter halvings while the short side stays at least 2 * size: cheap, and the pixels the
    # releases were trained on went through them.
    while min(image.size) >= 2 * size:
        width, height = image.size
        image = image.resize((width // 2, height // 2), resample=Image.BOX)
    # Then one bicubic resize to a short side of size, each side rounded to the nearest pixel.
    scale = size / min(image.size)
    width, height = (round(side * scale) for side in image.size)
    pixels = np.asarray(image.resize((width, height), resample=Image.BICUBIC))
    top = (height - size) // 2
    left = (width - size) // 2
    return pixels[top:top + size, left:left + size]


class ImageFolder(torch.utils.data.Dataset):
    """root/<class>/<image>: RGB, ADM's centre crop at image_size; labels = sorted class index."""

    def __init__(self, root, image_size):
        if not os.path.isdir(root):
            raise FileNotFoundError(f"data directory not found: {root}")
        self.classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
        self.items = [(os.path.join(root, c, f), i) for i, c in enumerate(self.classes)
                      for f in sorted(os.listdir(os.path.join(root, c)))
                      if f.lower().endswith(IMAGE_EXTS)]
        if not self.items:
            raise ValueError(f"no images found in {root} "
                             f"(expected {root}/<class>/<image>{IMAGE_EXTS})")
        self.image_size = image_size

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        path, label = self.items[i]
        try:
            with Image.open(path) as im:
                im = im.convert("RGB")
        except Exception as e:
            raise ValueError(f"cannot read image {path}: {e}") from None
        array = center_crop_adm(im, self.image_size).copy()
        return torch.from_numpy(array).permute(2, 0, 1), label


def class_names(data, classes):
    """Row labels of sample grids: Fashion-MNIST's names, an ImageFolder's folder names, else
    'class c' (a release, whose data is not recorded)."""
    if data == "fashion-mnist":
        return [FASHION_CLASSES[c] for c in classes]
    if data and os.path.isdir(data):
        folders = sorted(d for d in os.listdir(data) if os.path.isdir(os.path.join(data, d)))
        if len(folders) > max(classes):
            return [folders[c] for c in classes]
    return [f"class {c}" for c in classes]


def open_dataset(data, split="train", data_dir=None, image_size=32):
    """'fashion-mnist' or an ImageFolder path -> (dataset of (uint8 CHW, label), num_classes)."""
    if data == "fashion-mnist":
        if image_size != 32:
            raise ValueError(f"--image-size must be 32 for fashion-mnist, got {image_size}")
        images, labels = fashion_mnist(split, data_dir)
        return torch.utils.data.TensorDataset(images, labels), FASHION_NUM_CLASSES
    # data/<split>/<class>/... (ImageNet calls its held-out split "val"), else data/<class>/...
    sub = next((os.path.join(data, s) for s in [split] + (["val"] if split == "test" else [])
                if os.path.isdir(os.path.join(data, s))), data)
    ds = ImageFolder(sub, image_size)
    return ds, len(ds.classes)


def limited(dataset, limit):
    return torch.utils.data.Subset(dataset, range(min(limit, len(dataset)))) if limit else dataset
