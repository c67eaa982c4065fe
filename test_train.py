"""Tests of the training loop (train.py): DDP, resume, faults, the release recipe."""
import argparse
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import asdict

import numpy as np
import pytest
import torch
from PIL import Image

import checkpoints
import distributed
import files
import flags
import image_data
import randar
import token_cache
import tokenizer as tok
import train
from conftest import (
    FIXTURES,
    HERE,
    cli,
    losses,
    random_gpt,
    save_tokenizer,
    synthetic_run_dir,
    tiny_train_args,
    weights,
    write_images,
)
from randar import RandAR


def torchrun(script, *argv):
    """script under `torchrun --nproc_per_node=2`, one thread per process (2 cores)."""
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node=2", os.path.join(HERE, script), *map(str, argv)],
                          capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


DDP_ARGS = ["--steps", 8, "--ckpt-every", 2, "--order", "raster", "--dropout", 0,
            "--class-dropout", 0, "--lr", 3e-3]


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    """An uninterrupted 2-process training run (torchrun, gloo)."""
    out = synthetic_run_dir(tmp_path_factory.mktemp("ddp"))
    r = torchrun("train.py", *tiny_train_args(out, *DDP_ARGS))
    assert r.returncode == 0, r.stderr[-2000:]
    return out


def test_ddp_and_gradient_accumulation_equal_one_process_on_the_same_global_batch(
        ddp_run, tmp_path):
    """A global batch of 16 as 1 process x 16, 2 processes x 8 (ddp_run), and 2 processes x 4 x 2
    micro-batches (--grad-accum 2: DDP's no_sync on the first): the same 16 samples per step, so
    the same loss curve and weights, up to float summation order (1e-5, not bitwise)."""
    one = synthetic_run_dir(tmp_path / "one")
    assert cli("train.py", *tiny_train_args(one, *DDP_ARGS, "--batch-size", 16)) is None
    accumulated = synthetic_run_dir(tmp_path / "accumulated")
    r = torchrun("train.py", *tiny_train_args(accumulated, *DDP_ARGS, "--batch-size", 4,
                                              "--grad-accum", 2))
    assert r.returncode == 0, r.stderr[-2000:]
    a = weights(one)
    for run in (ddp_run, accumulated):
        b = weights(run)
        for k in a["model"]:
            assert (a["model"][k] - b["model"][k]).abs().max() < 1e-5, (run, k)
        assert len(losses(run)) == 8 and np.allclose(losses(one), losses(run), atol=1e-5), run


def child_pids(parent):
    """{RANK: pid} of the processes whose parent is `parent` (torchrun's workers)."""
    found = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[1]) != parent:
                continue
            env = open(f"/proc/{pid}/environ", "rb").read().decode(errors="replace").split("\0")
            found[int(dict(kv.split("=", 1) for kv in env if "=" in kv)["RANK"])] = int(pid)
        except (OSError, KeyError, ValueError, IndexError):
            pass
    return found


def test_a_rank_killed_mid_training_restarts_from_last_checkpoint_identically(ddp_run, tmp_path):
    """torchrun --max-restarts=1, rank 1 SIGKILLed between the step-4 and step-6 checkpoints: the
    group restarts, resumes from last.pt and ends with the uninterrupted run's weights. The test
    paces rank 0: metrics.jsonl is a FIFO that rank 0 opens for each record (--log-every 1) and the
    test reads; after step 5's record (so after the step-4 checkpoint) it stops reading, which holds
    rank 0 at step 6's record, before the step-6 checkpoint, on any machine."""
    out = synthetic_run_dir(tmp_path / "killed")
    metrics = os.path.join(out, "metrics.jsonl")
    os.mkfifo(metrics)
    records = []
    held = threading.Event()
    go_on = threading.Event()
    finished = threading.Event()

    def read_records():  # one open of the FIFO per record rank 0 writes
        while not finished.is_set():
            with open(metrics) as f:
                records.extend(json.loads(line) for line in f)
            if records and records[-1].get("step") == 5 and not held.is_set():
                held.set()
                go_on.wait()
    reader = threading.Thread(target=read_records, daemon=True)
    reader.start()
    agent = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone",
                              "--nproc_per_node=2", "--max-restarts=1",
                              os.path.join(HERE, "train.py"),
                              *map(str, tiny_train_args(out, *DDP_ARGS))], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
    while not held.wait(timeout=0.05):
        assert agent.poll() is None, agent.communicate()[1][-2000:]
    assert weights(out)["step"] == 4  # rank 0 waits at step 6's record: no step-6 checkpoint yet
    workers = child_pids(agent.pid)
    os.kill(workers[1], signal.SIGKILL)
    while os.path.exists(f"/proc/{workers[0]}"):  # the agent stops rank 0 before it restarts both
        assert agent.poll() is None, agent.communicate()[1][-2000:]
        time.sleep(0.05)
    go_on.set()
    stdout, err = agent.communicate(timeout=600)
    finished.set()
    os.close(os.open(metrics, os.O_WRONLY | os.O_NONBLOCK))  # the reader's last open returns
    reader.join(timeout=10)
    assert agent.returncode == 0, err[-3000:]
    assert "resumed from" in stdout and "at step 4" in stdout, stdout[-3000:]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4, 5, 5, 6, 7, 8]
    assert not [f for f in os.listdir(out) if ".tmp" in f]
    a = weights(ddp_run)
    b = weights(out)
    assert a["step"] == b["step"] == 8
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k


def test_a_stalled_rank_makes_the_others_stop_after_the_timeout(tmp_path):
    """Two ranks started by hand (no torchrun agent to clean up): rank 1 is frozen (SIGSTOP)
    mid-training; rank 0 gives up at its next collective after --dist-timeout and exits with one
    line, not a hang."""
    out = synthetic_run_dir(tmp_path / "run")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in (0, 1):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port), "RANK": str(rank),
               "LOCAL_RANK": str(rank), "WORLD_SIZE": "2"}
        argv = tiny_train_args(out, "--steps", 100000, "--ckpt-every", 2, "--dist-timeout", 5)
        procs.append(subprocess.Popen([sys.executable, os.path.join(HERE, "train.py"),
                                       *map(str, argv)], env=env,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    try:
        while not os.path.exists(os.path.join(out, "last.pt")):  # training is under way
            assert procs[0].poll() is None, procs[0].communicate()[1][-2000:]
            time.sleep(0.01)
        os.kill(procs[1].pid, signal.SIGSTOP)
        _, err = procs[0].communicate(timeout=300)
    finally:
        for p in procs:
            p.kill()
            p.wait()
    lines = re.findall(r"error: [^\r\n]*", err)  # (the line may follow tqdm's bar)
    assert procs[0].returncode == 1, err[-2000:]
    assert len(lines) == 1, err[-2000:]
    assert "collective operation failed" in lines[0], err[-2000:]
    assert "Traceback" not in err


def test_an_ema_update_leaves_no_autograd_history_on_the_ema_weights():
    """The EMA update runs without autograd: a graph chained through every step would grow without
    end."""
    model = random_gpt(seed=1).train()
    ema = random_gpt(seed=2).requires_grad_(False)
    before = [p.clone() for p in ema.parameters()]
    tokens = torch.randint(0, 32, (4, 16), generator=torch.Generator().manual_seed(0))
    for step in range(2):
        _, loss = model(tokens, torch.tensor([0, 1, 2, 3]))
        loss.backward()
        train.update_ema(ema, model, step, 0.999)
    assert all(p.grad_fn is None and not p.requires_grad for p in ema.parameters())
    # the EMA did move
    assert any(not torch.equal(a, p) for a, p in zip(before, ema.parameters()))


def test_a_full_disk_during_a_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch):
    """The checkpoint's temporary file is made a link to /dev/full just before the write: every
    write fails with the kernel's ENOSPC, as on a full disk. last.pt stays the previous checkpoint,
    the temporary is gone, and the run stops with one line naming the file and the reason."""
    out = synthetic_run_dir(tmp_path / "run")
    args = list(map(str, tiny_train_args(out, "--ckpt-every", 2)))
    flags.run(train.main, train.get_parser().parse_args(args + ["--steps", "2"]))
    before = open(os.path.join(out, "last.pt"), "rb").read()
    save_atomic = files.save_atomic

    def save_onto_a_full_disk(obj, path):
        os.symlink("/dev/full", files.temp_path(path))
        save_atomic(obj, path)
    monkeypatch.setattr(files, "save_atomic", save_onto_a_full_disk)
    with pytest.raises(SystemExit) as stop:
        flags.run(train.main, train.get_parser().parse_args(args + ["--steps", "4"]))
    message = str(stop.value)
    assert f"cannot write {os.path.join(out, 'last.pt')}: No space left on device" in message
    assert "\n" not in str(stop.value) and not [f for f in os.listdir(out) if ".tmp" in f]
    assert open(os.path.join(out, "last.pt"), "rb").read() == before and weights(out)["step"] == 2


def test_a_second_run_in_the_same_folder_is_refused_and_a_stale_lock_taken_over(tmp_path):
    out = synthetic_run_dir(tmp_path / "run")
    argv = list(map(str, tiny_train_args(out, "--steps", 2)))
    holder = distributed.FolderLock(out, "--out-dir")  # another job holds the folder
    with pytest.raises(SystemExit) as stop:
        flags.run(train.main, train.get_parser().parse_args(argv))
    assert f"--out-dir {out} is in use by pid {os.getpid()} on host" in str(stop.value), stop.value
    assert not os.path.exists(os.path.join(out, "last.pt"))
    holder.file.close()  # its process dies: the kernel drops the lock, the file stays behind
    assert "pid" in open(os.path.join(out, "lock")).read()
    flags.run(train.main, train.get_parser().parse_args(argv))
    assert weights(out)["step"] == 2 and not os.path.exists(os.path.join(out, "lock"))


def test_tokenizer_stages_run_on_the_device_they_are_given(tmp_path, monkeypatch):
    """Tokenizer training and encoding receive the rank's device: every model move and every batch
    of pixels goes to it. ("cpu:0" stands for a GPU here: the same CPU, but a device no default
    would produce.)"""
    moves = []
    batches = []
    to = tok.VQModel.to

    def move(self, device):  # the model reports the device it was moved to, as a GPU model would
        moves.append(torch.device(device))
        self.moved_to = torch.device(device)
        return to(self, device)
    monkeypatch.setattr(tok.VQModel, "to", move)
    monkeypatch.setattr(tok.VQModel, "device", property(lambda self: self.moved_to))
    to_pixels = tok.to_pixels
    def recording_to_pixels(images, device=None):
        batches.append(device)
        return to_pixels(images, device)
    monkeypatch.setattr(tok, "to_pixels", recording_to_pixels)
    args = train.get_parser().parse_args(["--out-dir", str(tmp_path), "--limit", "64",
                                          "--tokenizer-steps", "2"])
    args.workers = 0
    token_cache.prepare_tokens(args, 0, 1, torch.device("cpu", 0))
    # training, then encoding of two splits
    assert len(moves) == 3 and set(moves) == {torch.device("cpu", 0)}
    assert len(batches) >= 4 and set(batches) == {torch.device("cpu", 0)}


def test_encoding_with_loader_workers_gives_the_same_tokens(tmp_path):
    write_images(tmp_path, n=5, size=(20, 18))
    dataset, _ = image_data.open_dataset(str(tmp_path), "train", image_size=16)
    torch.manual_seed(0)
    vq = tok.VQModel(tok.VQConfig(**{**asdict(tok.PRESETS["demo"]), "in_channels": 3})).eval()
    a, a_labels, _ = token_cache.encode_dataset(vq, dataset, batch_size=4, workers=0)
    b, b_labels, _ = token_cache.encode_dataset(vq, dataset, batch_size=4, workers=2)
    assert torch.equal(a, b) and torch.equal(a_labels, b_labels) and a.shape == (10, 16)


def kill_when(cmd, condition):
    """Start cmd, SIGKILL it as soon as condition() holds; True if it was killed (not finished
    first)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while proc.poll() is None and not condition():
        time.sleep(0.005)
    proc.kill()
    return proc.wait() == -signal.SIGKILL


def assert_same_weights(a, b):
    assert a["step"] == b["step"]
    for part in ("model", "ema"):
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)


def test_resume_after_sigkill_is_exact(tmp_path):
    straight = synthetic_run_dir(tmp_path / "straight")
    killed = synthetic_run_dir(tmp_path / "killed")
    args = ["--steps", 30, "--ckpt-every", 5]  # random order and dropout: RNG state matters
    assert cli("train.py", *tiny_train_args(straight, *args)) is None
    cmd = [sys.executable, os.path.join(HERE, "train.py"),
           *map(str, tiny_train_args(killed, *args))]
    metrics = os.path.join(killed, "metrics.jsonl")
    assert kill_when(cmd, lambda: os.path.exists(metrics) and sum(1 for _ in open(metrics)) >= 12)
    assert weights(killed)["step"] < 30
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0 and "resumed from" in r.stdout, r.stderr[-2000:]
    assert_same_weights(weights(straight), weights(killed))


def test_resume_is_exact_after_a_kill_at_every_stage(fashion_run, tmp_path):
    """One run killed between and inside the stages (tokenizer, encoding, first checkpoint,
    training), rerun after each kill: it ends with the weights of the uninterrupted run
    (fashion_run), bit for bit."""
    command = fashion_command
    out = tmp_path / "killed"
    stages = {"after the tokenizer": lambda: (out / "tokenizer.pt").exists(),
              "during encoding": lambda: (out / "tokens_train.pt").exists(),
              "before the first checkpoint": lambda: (out / "tokens_test.pt").exists(),
              "during training": lambda: (out / "metrics.jsonl").exists()
              and len((out / "metrics.jsonl").read_text()) > 200}
    for name, reached in stages.items():
        assert kill_when(command(out), reached), f"finished before the kill {name}"
    r = subprocess.run(command(out), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert_same_weights(weights(fashion_run), weights(out))


def test_sigkill_during_checkpoint_write_keeps_previous(tmp_path):
    """A real SIGKILL in the middle of writing last.pt: the old file stays loadable, and the next
    run of train.py in the folder removes the dead process's temporary file."""
    out = synthetic_run_dir(tmp_path / "run")
    assert cli("train.py", *tiny_train_args(out, "--steps", 2)) is None
    before = weights(out)
    # 256 MB: a long write
    writer = ("import torch, files; big = {'model': torch.randn(64, 1 << 20)}; "
              f"files.save_atomic(big, {os.path.join(out, 'last.pt')!r})")
    cmd = [sys.executable, "-c", writer]
    def temporaries():
        return [f for f in os.listdir(out) if ".tmp" in f]

    def mid_write():  # a temporary with at least 1 MB written
        found = temporaries()
        return found and os.path.getsize(os.path.join(out, found[0])) >= (1 << 20)
    proc = subprocess.Popen(cmd, cwd=HERE)
    while proc.poll() is None and not mid_write():
        time.sleep(0.001)
    proc.kill()
    proc.wait()
    assert temporaries(), "the kill landed outside a write"
    assert weights(out)["step"] == before["step"]  # still the old, complete file
    assert cli("train.py", *tiny_train_args(out, "--steps", 2)) is None and not temporaries()


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    out = synthetic_run_dir(tmp_path / "nan")
    assert cli("train.py", *tiny_train_args(out, "--steps", 4, "--ckpt-every", 2)) is None
    before = open(os.path.join(out, "last.pt"), "rb").read()
    message = cli("train.py", *tiny_train_args(out, "--steps", 8, "--ckpt-every", 2, "--lr", "inf"))
    assert "non-finite loss" in message and "by step 6" in message, message
    assert open(os.path.join(out, "last.pt"), "rb").read() == before


def test_token_cache_made_with_another_tokenizer_is_refused(tmp_path):
    out = synthetic_run_dir(tmp_path / "run")
    # new random weights
    other = tok.VQModel(tok.VQConfig(**{**asdict(tok.PRESETS["demo"]), "codebook_size": 32}))
    save_tokenizer(other, os.path.join(out, "tokenizer.pt"))
    message = cli("train.py", *tiny_train_args(out, "--steps", 2))
    assert "was encoded from" in message and "'tokenizer'" in message, message
    assert not os.path.exists(os.path.join(out, "last.pt"))


def fashion_command(out):
    """A small run on real data through every stage, in seconds (the end-to-end and kill tests)."""
    return [sys.executable, os.path.join(HERE, "train.py"), "--out-dir", str(out), "--limit", "256",
            "--tokenizer-steps", "4", "--steps", "8", "--batch-size", "16", "--preset", "tiny",
            "--val-limit", "32", "--ckpt-every", "2", "--eval-every", "4", "--samples-per-class",
            "2", "--log-every", "1"]


@pytest.fixture(scope="module")
def fashion_run(tmp_path_factory):
    """fashion_command's run, in this process (the kill test's reruns are child processes)."""
    out = tmp_path_factory.mktemp("fashion") / "run"
    assert cli("train.py", *fashion_command(out)[2:]) is None
    return str(out)


def test_train_end_to_end_on_real_fashion_mnist(fashion_run):
    out = fashion_run
    for f in ("tokenizer.pt", "tokens_train.pt", "tokens_test.pt", "last.pt",
              "samples.png", "metrics.jsonl"):
        assert os.path.exists(os.path.join(out, f)), f
    grid = Image.open(os.path.join(out, "samples.png"))
    # 2 per class x 10 classes, shown at 2x, 2 px gaps, after a column of class names (6 px a
    # character of the longest, "T-shirt/top", and 8)
    assert grid.size == (6 * 11 + 8 + 2 * (64 + 2), 10 * (64 + 2))
    names = np.asarray(grid.convert("L"))[:, :6 * 11 + 8]
    assert all(names[r * 66:(r + 1) * 66].min() < 100 for r in range(10))  # each row is named
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert [r["step"] for r in rows if "val_loss" in r] == [4, 8]
    ckpt = weights(out)
    model = RandAR(checkpoints.randar_config(ckpt["config"]))
    model.load_state_dict(ckpt["model"], strict=True)
    assert model.config.block_size == 64 and model.config.vocab_size == 512
    # other data, same folder
    message = cli("train.py", "--out-dir", out, "--limit", 128, "--steps", 8, "--preset", "tiny")
    assert "was encoded from" in message, message


def test_miniature_imagenet_through_torchrun(tmp_path):
    """The paper-scale path in miniature: 1000 classes of RGB images, 2 processes for training
    (tokenizer, rank-split encoding, DDP) and for sampling; the npz does not depend on the number of
    processes (eval_fid reads such an npz against an ADM batch in its own tests)."""
    data = tmp_path / "imagenet"
    rng = np.random.default_rng(0)
    for c in range(1000):
        (data / f"n{c:05d}").mkdir(parents=True)
        for i in range(2):
            Image.fromarray(rng.integers(0, 255, (20, 18, 3),
                                         dtype=np.uint8)).save(data / f"n{c:05d}" / f"{i}.png")
    out = str(tmp_path / "run")
    r = torchrun("train.py", "--data", data, "--image-size", 16, "--out-dir", out, "--preset",
                 "tiny", "--tokenizer-steps", 3, "--steps", 2, "--batch-size", 8, "--val-limit", 32,
                 "--samples-per-class", 1)
    assert r.returncode == 0, r.stderr[-3000:]
    tokens = torch.load(os.path.join(out, "tokens_train.pt"), weights_only=True)
    assert tokens["tokens"].shape == (2000, 16)
    assert tokens["labels"].tolist() == [c for c in range(1000) for _ in (0, 1)]
    # the per-rank parts were joined and removed
    assert not [f for f in os.listdir(out) if ".part" in f]
    # 10 of 1000 classes, named by their folders ("n00000": 6 px a character, and 8)
    size = Image.open(os.path.join(out, "samples.png")).size
    assert size == (6 * 6 + 8 + 1 * (32 + 2), 10 * (32 + 2))
    classes = list(range(0, 1000, 4))  # a label range as wide as ImageNet's, 250 images
    sample_args = ["grid", "--ckpt", os.path.join(out, "last.pt"), "--per-class", 1, "--steps", 5,
                   "--batch-size", 16, "--seed", 3, "--classes", ",".join(map(str, classes))]
    r = torchrun("sample.py", *sample_args, "--out-npz", tmp_path / "two.npz")
    assert r.returncode == 0, r.stderr[-3000:]
    assert cli("sample.py", *sample_args, "--out-npz", tmp_path / "one.npz") is None
    one = np.load(tmp_path / "one.npz")
    two = np.load(tmp_path / "two.npz")
    assert two["arr_0"].shape == (250, 16, 16, 3) and two["arr_1"].tolist() == classes
    assert np.array_equal(one["arr_0"], two["arr_0"])
    assert len(np.unique(two["arr_0"].reshape(250, -1), axis=0)) > 225


# The release YAML's structure (configs/randar/randar_l_0.3b_llamagen.yaml of the reference): its
# training settings, and a model the size of the L checkpoints.
RELEASE_YAML = """\
accelerator:
  gradient_accumulation_steps: 1 # to support global_batch_size=1024
  mixed_precision: bf16
optimizer:
  lr: {lr}
  weight_decay: 0.05
  beta1: 0.9
  beta2: 0.95
  max_grad_norm: 1.0
  skip_grad_iter: {skip_iter}
  skip_grad_norm: 10
lr_scheduler:
  type: cosine
  warm_up_iters: {warmup}
  min_lr_ratio: 0.05
  num_cycles: 0.5
max_iters: {iters}
global_batch_size: {batch}
ema: False
vq_ckpt: vq_ds16_c2i.pt
ar_model:
  target: RandAR.model.randar_gpt.RandARTransformer
  params:
    n_layer: {n_layer}
    n_head: {n_head}
    dim: {dim}
    multiple_of: {multiple_of}
    model_type: c2i
    vocab_size: {vocab}
    block_size: {tokens}
    num_classes: {classes}
    cls_token_num: 1
    resid_dropout_p: 0.1
    ffn_dropout_p: 0.1
    token_dropout_p: 0.1
    drop_path_rate: 0.0
    position_order: random
    num_inference_steps: 88
"""
L_RELEASE = dict(lr=0.0004, skip_iter=100, warmup=50000, iters=360000, batch=1024, n_layer=24,
                 n_head=16, dim=1024, multiple_of=256, vocab=16384, tokens=256, classes=1000)


@pytest.fixture(scope="module")
def recipe_fx():
    """ADM's centre crop and the reference scheduler's multipliers (fixtures/recipe_fixture.pt)."""
    return torch.load(os.path.join(FIXTURES, "recipe_fixture.pt"), weights_only=True)


def test_adm_centre_crop_matches_reference(recipe_fx):
    for case in recipe_fx["crops"]:  # the last three take the halving path
        out = image_data.center_crop_adm(Image.fromarray(case["input"].numpy()), case["size"])
        assert np.array_equal(out, case["output"].numpy()), tuple(case["input"].shape)


def test_a_release_yaml_gives_the_release_recipe_and_flags_override_it(recipe_fx, tmp_path):
    """`train.py --config` on the L release's YAML: 360k steps, global batch 1024, no EMA, the
    gradient-skip rule, and the reference scheduler's multipliers at its sample iterations (within
    1e-12)."""
    path = tmp_path / "randar_l_0.3b_llamagen.yaml"
    path.write_text(RELEASE_YAML.format(**L_RELEASE))
    args = train.parse_args(["--config", str(path)])
    assert (args.steps, args.global_batch_size, args.ema, args.lr,
            args.grad_accum) == (360000, 1024, 0, 4e-4, 1)
    assert (args.skip_grad_norm, args.skip_grad_from, args.clip,
            args.weight_decay) == (10, 100, 1.0, 0.05)
    ref = recipe_fx["lr_release"]
    assert (args.warmup_steps, args.min_lr_ratio, args.steps) == (ref["warmup"],
                                                                  ref["min_lr_ratio"], ref["total"])
    for i, multiplier in zip(ref["iterations"], ref["multipliers"]):
        assert abs(train.learning_rate(i, args) / args.lr - multiplier) <= 1e-12, i
    checkpoints.resolve_batch_size(args, world=8)
    assert args.batch_size == 128
    args = train.parse_args(["--config", str(path), "--steps", "10",
                             "--batch-size", "4", "--ema", "0.99"])
    assert (args.steps, args.global_batch_size, args.batch_size, args.ema) == (10, None, 4, 0.99)
    config = checkpoints.randar_config(checkpoints.read_official_yaml(path))
    assert asdict(config) == asdict(randar.PRESETS["L"])
    path.write_text(RELEASE_YAML.format(**L_RELEASE).replace("type: cosine", "type: constant"))
    assert "lr_scheduler.type is 'constant'" in cli("train.py", "--config", path)
    path.write_text(RELEASE_YAML.format(**{**L_RELEASE, "iters": -5}))
    message = cli("train.py", "--config", path)
    assert str(path) in message and "--steps" in message and "'-5'" in message


def test_a_release_yaml_sets_order_and_ema_and_refuses_another_precision(tmp_path):
    """The YAML keys that change the recipe: position_order becomes --order, ema with ema_decay
    becomes --ema, and a mixed precision other than bf16 is refused in one line."""
    path = tmp_path / "release.yaml"
    release = RELEASE_YAML.format(**L_RELEASE)
    path.write_text(release.replace("position_order: random", "position_order: raster"))
    assert train.parse_args(["--config", str(path)]).order == "raster"
    path.write_text(release.replace("position_order: random", "position_order: spiral"))
    message = cli("train.py", "--config", path)
    assert str(path) in message and "--order" in message and "spiral" in message
    path.write_text(release.replace("ema: False", "ema: True\nema_decay: 0.9999"))
    assert train.parse_args(["--config", str(path)]).ema == 0.9999
    path.write_text(release.replace("ema: False", "ema: True"))
    assert "ema_decay is missing" in cli("train.py", "--config", path)
    path.write_text(release.replace("mixed_precision: bf16", "mixed_precision: fp16"))
    assert "accelerator.mixed_precision is 'fp16'" in cli("train.py", "--config", path)


def test_the_release_recipe_in_miniature(recipe_fx, tmp_path):
    """The README's ImageNet command with a release YAML's structure and small numbers: a synthetic
    ImageFolder (ADM crops, codes of each image and of its mirror image), a tiny model from the
    YAML, no EMA, and the reference scheduler's multipliers logged at every step."""
    rng = np.random.default_rng(0)
    for c in range(4):
        # the first is halved before the resize
        for i, size in enumerate([(40, 34), (20, 24), (16, 19)] * 2):
            (tmp_path / "data" / f"n{c}").mkdir(parents=True, exist_ok=True)
            pixels = rng.integers(0, 255, (*size, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / "data" / f"n{c}" / f"{i}.png")
    mini = dict(lr=0.003, skip_iter=5, warmup=10, iters=100, batch=8, n_layer=2, n_head=4, dim=64,
                multiple_of=32, vocab=512, tokens=16, classes=4)
    (tmp_path / "mini.yaml").write_text(RELEASE_YAML.format(**mini))
    out = tmp_path / "run"
    assert cli("train.py", "--config", tmp_path / "mini.yaml", "--data", tmp_path / "data",
               "--image-size", 16, "--out-dir", out, "--tokenizer-steps", 3,
               "--tokenizer-batch-size", 8, "--log-every", 1, "--samples-per-class", 1,
               "--val-limit", 8) is None
    ckpt = weights(out)
    assert ckpt["step"] == 100 and "ema" not in ckpt and ckpt["args"]["batch_size"] == 8
    yaml_config = checkpoints.read_official_yaml(tmp_path / "mini.yaml")
    assert checkpoints.randar_config(ckpt["config"]) == checkpoints.randar_config(yaml_config)
    lrs = [r["lr"] for r in map(json.loads, open(out / "metrics.jsonl")) if "lr" in r]
    expected = [0.003 * m for m in recipe_fx["lr_miniature"]["multipliers"][:100]]
    assert len(lrs) == 100 and max(abs(a - b) for a, b in zip(lrs, expected)) <= 1e-15
    cache = torch.load(out / "tokens_train.pt", weights_only=True)
    assert cache["tokens"].shape == cache["tokens_flipped"].shape == (24, 16)
    assert "tokens_flipped" not in torch.load(out / "tokens_test.pt", weights_only=True)
    vq = tok.load_tokenizer(out / "tokenizer.pt")
    image = image_data.open_dataset(str(tmp_path / "data"), "train", image_size=16)[0][0][0]
    assert torch.equal(vq.encode_images(image[None].flip(-1)).flatten(),
                       cache["tokens_flipped"][0].long())


def test_flip_coins_depend_on_seed_and_epoch_alone():
    cache = {"tokens": torch.zeros(1000, 4, dtype=torch.int16),
             "tokens_flipped": torch.ones(1000, 4, dtype=torch.int16)}
    coins = token_cache.flip_coins(cache, seed=0, epoch=3)
    assert torch.equal(coins,
                       token_cache.flip_coins(cache, seed=0, epoch=3)) and 400 < coins.sum() < 600
    assert not torch.equal(coins, token_cache.flip_coins(cache, seed=0, epoch=4))
    indices = torch.tensor([5, 7, 900])
    assert torch.equal(token_cache.batch_tokens(cache, indices, coins)[:, 0], coins[indices].long())
    assert token_cache.flip_coins({"tokens": cache["tokens"]}, 0, 3) is None


def test_the_gradient_skip_rule_stops_updates_from_its_step_on(tmp_path):
    """Threshold ~0 from step 3: steps 0-2 update, every later step is skipped (the weights and the
    optimizer stay as they were), and the count survives a resume."""
    out = synthetic_run_dir(tmp_path / "run")
    rule = ["--skip-grad-norm", 1e-9, "--skip-grad-from", 3]
    assert cli("train.py", *tiny_train_args(out, "--steps", 3, *rule)) is None
    before = weights(out)
    assert cli("train.py", *tiny_train_args(out, "--steps", 6, *rule)) is None
    after = weights(out)
    assert (before["skipped_steps"], after["skipped_steps"], after["step"]) == (0, 3, 6)
    assert all(torch.equal(before["model"][k], after["model"][k]) for k in before["model"])
    first = before["optimizer"]["state"][0]
    assert torch.equal(first["exp_avg"], after["optimizer"]["state"][0]["exp_avg"])


def test_the_learning_rate_follows_its_closed_form_and_the_log_shows_it(ddp_run):
    """Warm-up (i + 1)/W, or i/W for the releases' --warmup-from-zero, then a half cosine from lr to
    min_lr_ratio·lr at the last step; the lr each record logs is the one of its update (record
    step s: update s − 1)."""
    args = argparse.Namespace(lr=1e-3, warmup_steps=10, steps=110, min_lr_ratio=0.1,
                              warmup_from_zero=False)
    cosine = {10: 1.0, 35: (1 + math.sqrt(0.5)) / 2, 60: 0.5, 85: (1 - math.sqrt(0.5)) / 2, 110: 0}
    expected = {0: 1e-4, 4: 5e-4, 9: 1e-3}
    expected.update({i: 1e-3 * (0.1 + 0.9 * c) for i, c in cosine.items()})
    for step, lr in expected.items():
        assert abs(train.learning_rate(step, args) - lr) < 1e-15, step
    args.warmup_from_zero = True
    assert [train.learning_rate(i, args) for i in (0, 5, 10)] == [0.0, 5e-4, 1e-3]
    logged = [json.loads(line) for line in open(os.path.join(ddp_run, "metrics.jsonl"))]
    logged = {r["step"]: r["lr"] for r in logged if "lr" in r}
    assert sorted(logged) == list(range(1, 9))
    for step, lr in logged.items():  # DDP_ARGS: lr 3e-3, warm-up 2, 8 steps, min_lr_ratio 0.1
        update = step - 1
        if update < 2:
            closed = 3e-3 * (update + 1) / 2
        else:
            closed = 3e-3 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (update - 2) / 6)))
        assert abs(lr - closed) < 1e-15, (step, lr, closed)


def test_one_ema_update_is_the_closed_form_and_ema_0_keeps_none(tmp_path):
    """ema <- d ema + (1 - d) model with d = min(--ema, (1 + t)/(10 + t)); --ema 0: no EMA, none in
    the checkpoint; load_model returns the EMA weights when a checkpoint has them."""
    model = random_gpt(seed=1)
    ema = random_gpt(seed=2)
    for step, decay in ((5, 6 / 15), (100_000, 0.999)):
        before = [p.clone() for p in ema.parameters()]
        train.update_ema(ema, model, step, 0.999)
        for old, new, target in zip(before, ema.parameters(), model.parameters()):
            assert (new - (decay * old + (1 - decay) * target)).abs().max() < 1e-6
    out = synthetic_run_dir(tmp_path / "run")
    assert cli("train.py", *tiny_train_args(out, "--steps", 2, "--ema", 0)) is None
    ckpt = torch.load(os.path.join(out, "last.pt"), weights_only=True)
    assert "ema" not in ckpt
    ckpt["ema"] = random_gpt(seed=3).state_dict()
    ckpt["config"] = asdict(random_gpt(seed=3).config)
    ckpt["model"] = random_gpt(seed=4).state_dict()
    torch.save(ckpt, tmp_path / "with_ema.pt")
    loaded = checkpoints.load_model(str(tmp_path / "with_ema.pt"))[0]
    for name, p in loaded.state_dict().items():
        assert torch.equal(p, ckpt["ema"][name]), name
