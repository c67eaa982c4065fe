"""Checkpoints: train.py's own (a plain dict read with weights_only), and the reference's release
files, read without extra dependencies: the weights (.safetensors), the model config in a release's
YAML (`ar_model.params`) and its training recipe as train.py flags. The YAMLs are those of
configs/randar/ in the reference code (docs/algorithm.md §12).

    model, extras = load_model("runs/demo/last.pt")
"""
import json
import math
import os
import pickle
from dataclasses import fields

import torch

from randar import PRESETS, RandAR, RandARConfig


def load_torch_file(path, what):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "Weights only load failed" in str(e):
            reason = "refused: it contains code or objects"
        else:
            reason = "not a checkpoint"
        raise ValueError(f"{path} is not a {what} ({reason})") from None
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, IndexError) as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:80]
        raise ValueError(f"{path} is not a {what} "
                         f"(truncated or not a torch file: {reason})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path} is not a {what} (holds a {type(obj).__name__}, not a dict)")
    return obj


# Keys the reference's model config carries that do not change what the network computes.
REFERENCE_ONLY = ("caption_dim", "model_type", "max_batch_size", "max_seq_len", "position_order",
                  "num_inference_steps", "zero_class_qk", "grad_checkpointing")


def randar_config(params):
    """A RandARConfig from a checkpoint's config dict (ours or the reference's); an unknown key is
    an error."""
    names = {f.name for f in fields(RandARConfig)}
    unknown = set(params) - names - set(REFERENCE_ONLY)
    if unknown:
        raise ValueError(f"unknown RandARConfig keys: {sorted(unknown)}")
    return RandARConfig(**{k: v for k, v in params.items() if k in names})


def load_model(path, config=None, preset=None):
    """RandAR from train.py's checkpoint (config inside; its EMA weights when it kept them) or an
    official .safetensors state dict (config from the YAML `config` or a preset name) -> (model in
    eval mode, the checkpoint's other small entries). The load is strict: the parameter names are
    the reference's."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.endswith(".safetensors"):
        cfg, state, extras = read_release(path, config, preset)
    else:
        cfg, state, extras = read_ours(path)
    model = RandAR(cfg)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ValueError(f"{path}: weights do not match the config "
                         f"({str(e).splitlines()[1].strip()})") from None
    return model.eval(), extras


def read_ours(path):
    """train.py's checkpoint -> (config, the EMA weights if it kept them, else the model's, its
    small entries)."""
    ckpt = load_torch_file(path, "RandAR checkpoint")
    config = ckpt.get("config")
    if not isinstance(config, dict) or "n_layer" not in config or "model" not in ckpt:
        is_tokenizer = "encoder.conv_in.weight" in ckpt.get("model", {})
        what = "a tokenizer checkpoint" if is_tokenizer else "another file"
        raise ValueError(f"{path} is {what}, expected a RandAR checkpoint written by train.py "
                         f"(or an official .safetensors)")
    extras = {k: v for k, v in ckpt.items() if isinstance(v, (str, int, float))}
    extras["data"] = ckpt.get("args", {}).get("data")  # the training data, for figures
    return randar_config(config), ckpt.get("ema", ckpt["model"]), extras


def read_release(path, config, preset):
    """An official .safetensors and its YAML (or a preset name) -> (config, weights, the release's
    number of decoding steps, which is sample.py's default --steps)."""
    if config is None and preset is None:
        raise ValueError(f"{path} carries no config: pass its YAML (--config) or a preset "
                         "(--preset)")
    params = read_official_yaml(config) if config else {}
    cfg = randar_config(params) if config else PRESETS[preset]
    extras = {"num_inference_steps": params.get("num_inference_steps")}
    return cfg, read_safetensors(path), extras


# ----------------------------------------------------------------------------------------------
# The released weights: safetensors is an 8-byte little-endian header length, a JSON header, then
# raw little-endian data.

SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
                      "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32,
                      "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


def read_safetensors(path):
    """{name: tensor} from a .safetensors file; a malformed file is a ValueError naming it."""
    with open(path, "rb") as f:
        data = bytearray(f.read())
    try:
        n = int.from_bytes(data[:8], "little")
        header = json.loads(data[8:8 + n])
        tensors = {}
        base = 8 + n
        for name, info in header.items():
            if name == "__metadata__":
                continue
            dtype = SAFETENSORS_DTYPES[info["dtype"]]
            start, end = info["data_offsets"]
            numel = math.prod(info["shape"])
            if end - start != numel * dtype.itemsize or base + end > len(data):
                raise ValueError(f"tensor {name} runs past the end of the file")
            flat = torch.frombuffer(data, dtype=dtype, count=numel,
                                    offset=base + start) if numel else torch.empty(0, dtype=dtype)
            tensors[name] = flat.reshape(info["shape"])
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not a valid .safetensors file ({e})") from None
    return tensors


def read_yaml(path):
    """A RandAR YAML config -> nested dict, with only as much YAML as those configs use: `key:
    value` lines of plain scalars, blocks by indentation. A `- item` line or a flow value (`[...]`)
    becomes a list; comments go."""
    root = {}
    parents = []  # parents: (indent, the dict of the block a deeper line belongs to)
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.split("#", 1)[0].rstrip()
            if not line:
                continue
            depth = len(line) - len(line.lstrip())
            while parents and parents[-1][0] >= depth:
                parents.pop()
            block = parents[-1][1] if parents else root
            text = line.strip()
            if text.startswith("- "):  # an item of the list the block above opened
                items = block.setdefault("__items__", [])
                items.append(yaml_scalar(text[2:].strip()))
                continue
            key, colon, value = (part.strip() for part in text.partition(":"))
            if not colon:
                raise ValueError(f"{path}:{lineno}: {text!r} is not a 'key: value' line")
            if value:
                block[key] = yaml_scalar(value)
            else:
                block[key] = {}
                parents.append((depth, block[key]))
    return lists_in_place(root)


def lists_in_place(block):
    """A block that holds only `- item` lines is that list."""
    if isinstance(block, dict):
        if set(block) == {"__items__"}:
            return block["__items__"]
        return {k: lists_in_place(v) for k, v in block.items()}
    return block


def read_official_yaml(path):
    """The model's config of a RandAR YAML: its `ar_model:` -> `params:` block, plain scalars
    only."""
    params = read_yaml(path).get("ar_model", {})
    params = params.get("params", {}) if isinstance(params, dict) else {}
    if not isinstance(params, dict) or not params:
        raise ValueError(f"{path} has no ar_model.params block of 'key: value' lines")
    for key, value in params.items():
        if isinstance(value, (dict, list)):
            raise ValueError(f"{path}: ar_model.params.{key} is not a plain 'key: value' (nested "
                             "values are not supported)")
    return params


def yaml_scalar(text):
    try:
        return json.loads(text)  # integers, floats, true, false, null
    except ValueError:
        return {"true": True, "false": False, "none": None,
                "~": None}.get(text.lower(), text.strip("'\""))


# ----------------------------------------------------------------------------------------------
# A release's training recipe: `train.py --config <release>.yaml` stands for flags.

# YAML key -> flag; train.model_config reads the YAML's model (ar_model.params)
RELEASE_FLAGS = {
    "optimizer.lr": "--lr",
    "optimizer.weight_decay": "--weight-decay",
    "optimizer.max_grad_norm": "--clip",
    "optimizer.skip_grad_norm": "--skip-grad-norm",
    "optimizer.skip_grad_iter": "--skip-grad-from",
    "lr_scheduler.warm_up_iters": "--warmup-steps",
    "lr_scheduler.min_lr_ratio": "--min-lr-ratio",
    "max_iters": "--steps",
    "global_batch_size": "--global-batch-size",
    "accelerator.gradient_accumulation_steps": "--grad-accum",
    "ar_model.params.position_order": "--order",
}
# what train.py always does, so a YAML asking for something else is refused
RELEASE_FIXED = {
    "optimizer.beta1": 0.9,
    "optimizer.beta2": 0.95,
    "lr_scheduler.type": "cosine",
    "lr_scheduler.num_cycles": 0.5,
    # bf16 autocast on GPUs (train.py trains in float32 on the CPU, where bf16 is slow)
    "accelerator.mixed_precision": "bf16",
}


def yaml_value(tree, dotted_key):
    for key in dotted_key.split("."):
        if not isinstance(tree, dict) or key not in tree:
            return None
        tree = tree[key]
    return tree


def release_flags(path):
    """{flag: value or None} that a release YAML's training settings stand for. Its scheduler warms
    up from 0. There is no EMA unless the YAML asks for one with its decay (the releases say
    `ema: False`)."""
    tree = read_yaml(path)
    for key, value in RELEASE_FIXED.items():
        found = yaml_value(tree, key)
        if found is not None and found != value:
            raise ValueError(f"{path}: {key} is {found!r}; train.py implements {value!r} only")
    flags = {"--warmup-from-zero": None, "--ema": "0"}
    if tree.get("ema"):
        if tree.get("ema_decay") is None:
            raise ValueError(f"{path}: ema is on but ema_decay is missing; give its decay")
        flags["--ema"] = str(tree["ema_decay"])
    for key, flag in RELEASE_FLAGS.items():
        value = yaml_value(tree, key)
        if value is not None:
            flags[flag] = str(value)
    return flags


def release_argv(path, argv):
    """The flags a release YAML stands for, as a command line to put before argv (so argv overrides
    them); a --batch-size in argv drops the YAML's global batch."""
    flags = release_flags(path)
    if any(a == "--batch-size" or a.startswith("--batch-size=") for a in argv):
        flags.pop("--global-batch-size", None)
    yaml_argv = []
    for flag, value in flags.items():
        yaml_argv.append(flag)
        if value is not None:
            yaml_argv.append(value)
    return yaml_argv


def resolve_batch_size(args, world):
    """--global-batch-size (a release's global_batch_size) -> the per-rank --batch-size."""
    if args.global_batch_size is None:
        return
    ranks_and_steps = world * args.grad_accum
    if args.global_batch_size % ranks_and_steps:
        raise ValueError(f"--global-batch-size {args.global_batch_size} is not divisible by "
                         f"{world} processes x --grad-accum {args.grad_accum}")
    args.batch_size = args.global_batch_size // ranks_and_steps
