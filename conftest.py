"""Helpers and fixtures shared by the test files: running a script's command line, the reference
fixtures, tiny models and runs."""
import json
import os
import subprocess
import sys
from dataclasses import asdict

import numpy as np
import pytest
import torch
from PIL import Image

import checkpoints
import eval_fid
import sample
import token_cache
import tokenizer as tok
import train
from randar import RandAR, RandARConfig

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURES = os.path.join(HERE, "fixtures")
SCRIPTS = {"train.py": train, "sample.py": sample, "eval_fid.py": eval_fid}


def cli(script, *argv):
    """A script's command line, run in this process through its entry function `cli`: None when it
    succeeds, else its exit message, which must be one line without a traceback."""
    try:
        SCRIPTS[script].cli([str(a) for a in argv])
    except SystemExit as stop:
        message = str(stop.code)
        assert stop.code not in (0, None), message
        assert "\n" not in message, message
        assert "Traceback" not in message, message
        return message
    return None


def run(script, *argv, **kw):
    """`python script.py argv` in a child process: for what needs the process boundary (kills,
    torchrun) and one smoke run per script."""
    return subprocess.run([sys.executable, os.path.join(HERE, script), *map(str, argv)],
                          capture_output=True, text=True, **kw)


@pytest.fixture(scope="session")
def fx():
    return torch.load(os.path.join(FIXTURES, "reference_fixtures.pt"), weights_only=True)


def reference_gpt(fx):
    model = RandAR(checkpoints.randar_config(fx["gpt"]["config"]))
    model.load_state_dict(fx["gpt"]["state_dict"], strict=True)
    return model.eval()


# 4x4 tokens
TINY = dict(dim=64, n_layer=2, n_head=4, multiple_of=32, vocab_size=32, block_size=16,
            num_classes=10)


def random_gpt(seed=0, **kw):
    """A tiny model with every weight re-drawn large: the reference init makes all logits 0,
    which would let any fast-path == slow-path comparison pass vacuously."""
    torch.manual_seed(seed)
    model = RandAR(RandARConfig(**{**TINY, **kw}))
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if name.endswith("norm.weight")
                    else 0.3 * torch.randn_like(p))
    return model.eval()


def caches(model):
    return [(layer.attention.kv_cache.k.clone(),
             layer.attention.kv_cache.v.clone()) for layer in model.layers]


# ---- tokenizer.py --------------------------------------------------------------------------------

def save_tokenizer(model, path, **config_changes):
    """A tokenizer checkpoint as tokenizer.py writes one (config_changes: a config that does not
    match)."""
    torch.save({"model": model.state_dict(),
                "config": {**asdict(model.config), **config_changes}}, path)


def write_images(folder, n=4, size=(40, 36)):
    for c in ("cat", "dog"):
        os.makedirs(os.path.join(folder, c), exist_ok=True)
        for i in range(n):
            pixels = np.random.randint(0, 255, (*size, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(os.path.join(folder, c, f"{i}.png"))


# ---- train.py ------------------------------------------------------------------------------------

def synthetic_run_dir(path, n_train=64, n_test=32):
    """An output folder with a random demo tokenizer and random token files: train.py skips to
    RandAR."""
    torch.manual_seed(0)
    os.makedirs(path, exist_ok=True)
    vq = tok.VQModel(tok.VQConfig(**{**asdict(tok.PRESETS["demo"]), "codebook_size": 32}))
    vq_path = os.path.join(path, "tokenizer.pt")
    save_tokenizer(vq, vq_path)
    for split, n in (("train", n_train), ("test", n_test)):
        # what train.py's defaults ask for
        source = token_cache.encode_source(vq_path, "fashion-mnist", split, 32, 0)
        torch.save({"tokens": torch.randint(0, 32, (n, 16)).short(),
                    "labels": torch.randint(0, 10, (n,)), "num_classes": 10, "vocab_size": 32,
                    "tokenizer": vq_path, "source": source},
                   os.path.join(path, f"tokens_{split}.pt"))
    return str(path)


def tiny_train_args(out_dir, *extra):
    return ["--out-dir", out_dir, "--preset", "tiny", "--batch-size", 8, "--warmup-steps", 2,
            "--eval-every", 1000, "--sample-every", 1000, "--samples-per-class", 1,
            "--log-every", 1, *extra]


def weights(path):
    return torch.load(os.path.join(path, "last.pt"), weights_only=True)


def losses(run):
    return [json.loads(line)["loss"] for line in open(os.path.join(run, "metrics.jsonl"))
            if '"loss"' in line]


# ---- sampling and the FID protocol (sample.py) ---------------------------------------------------

@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """A RandAR checkpoint trained for 2 steps on synthetic 4x4 tokens, with a random demo
    tokenizer."""
    out = synthetic_run_dir(tmp_path_factory.mktemp("run"))
    assert cli("train.py", *tiny_train_args(out, "--steps", 2)) is None
    return out


def loaded(command, *argv):
    """sample.py's args, model and tokenizer for a command, as main() sets them up."""
    args = sample.parse([command, *map(str, argv)])
    sample.setup(args)
    model, vq = sample.load_run(args)
    return args, model, vq
