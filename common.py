"""What every script shares: reading checkpoints safely, writing outputs atomically, one-line CLI errors.

Every checkpoint is read through load_torch_file (weights_only: no pickled code ever runs), so a
truncated, foreign or hostile file is one clear error that names it; every output goes through
write_atomic, so a crash never leaves a half-written file; every command line reports a bad
argument or input as one line naming it, and exits non-zero.
"""
import argparse
import json
import math
import os
import pickle
import sys

import numpy as np
import torch
from PIL import Image, ImageDraw

from randar import PRESETS, RandAR, RandARConfig


# ----------------------------------------------------------------------------------------------
# Reading checkpoints: ours (torch.save'd dicts) and the released RandAR format.

def load_torch_file(path, what):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        reason = "refused: it contains code or objects" if "Weights only load failed" in str(e) else "not a checkpoint"
        raise ValueError(f"{path} is not a {what} ({reason})") from None
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, IndexError) as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:80]
        raise ValueError(f"{path} is not a {what} (truncated or not a torch file: {reason})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path} is not a {what} (holds a {type(obj).__name__}, not a dict)")
    return obj


# Released checkpoints: the official `.safetensors` state dict + its YAML config, read without extra
# dependencies (safetensors: 8-byte little-endian header length, JSON header, raw little-endian data).

SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}


def read_safetensors(path):
    """{name: tensor} from a .safetensors file; a malformed file is a ValueError naming it."""
    with open(path, "rb") as f:
        data = bytearray(f.read())
    try:
        n = int.from_bytes(data[:8], "little")
        header = json.loads(data[8:8 + n])
        tensors, base = {}, 8 + n
        for name, info in header.items():
            if name == "__metadata__":
                continue
            dtype, (start, end) = SAFETENSORS_DTYPES[info["dtype"]], info["data_offsets"]
            numel = math.prod(info["shape"])
            if end - start != numel * dtype.itemsize or base + end > len(data):
                raise ValueError(f"tensor {name} runs past the end of the file")
            flat = torch.frombuffer(data, dtype=dtype, count=numel, offset=base + start) if numel else \
                torch.empty(0, dtype=dtype)
            tensors[name] = flat.reshape(info["shape"])
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not a valid .safetensors file ({e})") from None
    return tensors


def read_official_yaml(path):
    """The `key: value` lines of the `ar_model:` -> `params:` block of a RandAR YAML config -> dict.
    Only as much YAML as those configs use: plain scalars, indentation for nesting."""
    params, parents = {}, []  # parents: (indent, key) of the blocks enclosing the current line
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.split("#", 1)[0].rstrip()
            if not line:
                continue
            depth = len(line) - len(line.lstrip())
            key, _, value = (part.strip() for part in line.partition(":"))
            while parents and parents[-1][0] >= depth:
                parents.pop()
            if [k for _, k in parents] == ["ar_model", "params"]:
                if not value or key.startswith("-"):
                    raise ValueError(f"{path}:{lineno}: nested value under ar_model.params ({line.strip()!r}) "
                                     f"is not supported")
                params[key] = yaml_scalar(value)
            elif not value:
                parents.append((depth, key))
    if not params:
        raise ValueError(f"{path} has no ar_model.params block of 'key: value' lines")
    return params


def yaml_scalar(text):
    constants = {"true": True, "false": False, "none": None, "null": None, "~": None}
    if text.lower() in constants:
        return constants[text.lower()]
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    if text[0] in "[{&*!|>":
        raise ValueError(f"unsupported YAML value {text!r} (only plain scalars are read)")
    return text.strip("'\"")


def load_model(path, config=None, preset=None):
    """RandAR from train.py's checkpoint (config inside) or an official .safetensors state dict (config
    from the YAML `config` or a preset name) -> (model, the checkpoint's other small entries).
    Strict load: the parameter names are the reference's."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.endswith(".safetensors"):
        if config is None and preset is None:
            raise ValueError(f"{path} carries no config: pass its YAML (--config) or a preset (--preset)")
        cfg = RandARConfig.from_dict(read_official_yaml(config)) if config else PRESETS[preset]
        state, extras = read_safetensors(path), {}
    else:
        ckpt = load_torch_file(path, "RandAR checkpoint")
        if not isinstance(ckpt.get("config"), dict) or "n_layer" not in ckpt["config"] or "model" not in ckpt:
            what = "a tokenizer checkpoint" if "encoder.conv_in.weight" in ckpt.get("model", {}) else "another file"
            raise ValueError(f"{path} is {what}, expected a RandAR checkpoint written by train.py "
                             f"(or an official .safetensors)")
        # train.py's EMA weights when it kept them (for sampling), else the trained weights
        cfg, state = RandARConfig.from_dict(ckpt["config"]), ckpt.get("ema", ckpt["model"])
        extras = {k: v for k, v in ckpt.items() if isinstance(v, (str, int, float))}
    model = RandAR(cfg)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ValueError(f"{path}: weights do not match the config ({str(e).splitlines()[1].strip()})") from None
    return model.eval(), extras


# ----------------------------------------------------------------------------------------------
# Writing outputs: images and files.

def image_grid(images_uint8, nrow, row_labels=(), label_width=0, pad=2, scale=1):
    """(B, C, H, W) uint8 -> PIL image, nrow images per row, optional text labels left of the rows;
    scale > 1 enlarges every image (nearest) so small images stay readable."""
    if scale > 1:
        images_uint8 = images_uint8.repeat_interleave(scale, dim=2).repeat_interleave(scale, dim=3)
    B, C, H, W = images_uint8.shape
    rows = math.ceil(B / nrow)
    canvas = Image.new("L" if C == 1 else "RGB", (label_width + nrow * (W + pad), rows * (H + pad)), 255)
    for i, im in enumerate(images_uint8):
        arr = im.permute(1, 2, 0).cpu().numpy()
        canvas.paste(Image.fromarray(arr[..., 0] if C == 1 else arr),
                     (label_width + (i % nrow) * (W + pad), (i // nrow) * (H + pad)))
    draw = ImageDraw.Draw(canvas)
    for r, text in enumerate(row_labels):
        draw.text((2, r * (H + pad) + H // 2 - 5), text, fill=0)
    return canvas


def temp_path(path):
    """A temporary name beside path (same folder: the final rename is atomic); the folder is created."""
    if os.path.isdir(path):
        raise IsADirectoryError(f"output {path} is a directory, expected a file name")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    root, ext = os.path.splitext(path)
    return f"{root}.tmp{os.getpid()}{ext}"


def write_atomic(write, path):
    """write(tmp) then rename: a crash mid-write leaves the old file intact and no temporary behind."""
    tmp = temp_path(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_png(image, path):
    write_atomic(image.save, path)


def save_atomic(obj, path):
    write_atomic(lambda tmp: torch.save(obj, tmp), path)


def save_atomic_npz(path, **arrays):
    def write(tmp):
        with open(tmp, "wb") as f:  # a file object: np.savez would append ".npz" to a bare name
            np.savez(f, **arrays)
    write_atomic(write, path)


# ----------------------------------------------------------------------------------------------
# Command lines

# The guidance schedule (start, end) of sample.py and of train.py's grid: on the demo model 1->4 beat
# 1->3 on class consistency, FD and precision at equal recall (README, sample quality).
DEFAULT_CFG = (1.0, 4.0)


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad argument is one line naming it (no usage dump), exit status 2."""

    def __init__(self, **kw):
        super().__init__(formatter_class=argparse.RawDescriptionHelpFormatter, **kw)

    def error(self, message):
        sys.exit(f"error: {self.prog.split()[-1] if ' ' in self.prog else self.prog}: {message}")


def int_at_least(low):
    def check(text):
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < low:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {text!r}")
        return value
    return check


positive_int, non_negative_int = int_at_least(1), int_at_least(0)


def number_in(low, high, open_low=False, open_high=False):
    """An argparse type for a float in [low, high] (an end excluded when open_*); NaN never passes."""
    def check(text):
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not ((low < value if open_low else low <= value) and (value < high if open_high else value <= high)):
            span = f"{'(' if open_low else '['}{low}, {high}{')' if open_high else ']'}"
            raise argparse.ArgumentTypeError(f"must be a number in {span}, got {text!r}")
        return value
    return check


positive_number, non_negative_number = number_in(0, math.inf, open_low=True), number_in(0, math.inf)
probability = number_in(0, 1, open_high=True)


def run(main, args, errors=(ValueError, FileNotFoundError, OSError)):
    """A script's entry point: the thread count the environment set (torchrun sets one per worker) or
    every core, and any expected failure as one line `error: ...` with exit status 1."""
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(os.cpu_count() or 1)
    try:
        main(args)
    except errors as e:
        sys.exit(f"error: {e}")
