"""Tests of sample.py and the FID protocol's sharded npz."""
import os
import re
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

import distributed
import eval_fid
import files
import flags
import image_data
import image_grid
import sample
import sample_ddp
from conftest import FIXTURES, HERE, cli, loaded, run
from generate import generate


def test_sample_command_writes_png_and_npz_and_a_seed_fixes_them(tiny_run, tmp_path):
    """`python sample.py` (the script's smoke run) and the same command in this process: one seed,
    one result."""
    argv = ["--ckpt", os.path.join(tiny_run, "last.pt"), "--classes", "1,3", "--per-class", 3,
            "--seed", 7, "--steps", 5]
    r = run("sample.py", *argv, "--out", tmp_path / "a.png", "--out-npz", tmp_path / "a.npz")
    assert r.returncode == 0, r.stderr[-2000:]
    assert cli("sample.py", *argv, "--out", tmp_path / "b.png", "--out-npz",
               tmp_path / "b.npz") is None
    outs = [np.load(tmp_path / f"{name}.npz") for name in ("a", "b")]
    a, b = outs
    # 4x4 tokens x downsample 4
    assert a["arr_0"].dtype == np.uint8 and a["arr_0"].shape == (6, 16, 16, 1)
    assert a["arr_1"].tolist() == [1, 1, 1, 3, 3, 3]
    assert np.array_equal(a["arr_0"], b["arr_0"]) and a["arr_0"].std() > 0
    # 4x upscaled by default, after the class names ("trouser", "dress": 6 px a character, and 8)
    assert Image.open(tmp_path / "a.png").size == (6 * 7 + 8 + 3 * (4 * 16 + 2), 2 * (4 * 16 + 2))


def test_sampling_killed_during_assembly_resumes_to_the_same_bytes(tiny_run, tmp_path, capsys):
    """The FID sampler writes each chunk as it is made; a SIGKILL during the final assembly (held
    there: one chunk file is a FIFO, whose open blocks) leaves the other chunks, which the rerun of
    the same command reuses, making only the missing one; the npz is byte-identical to an
    uninterrupted run's. Parts made with other settings are refused; a parts folder in use by
    another job is refused."""
    argv = ["grid", "--ckpt", os.path.join(tiny_run, "last.pt"), "--classes", "1,3", "--per-class",
            "5", "--batch-size", "2", "--steps", "5", "--seed", "2"]
    flags.run(sample.main, sample.parse(argv + ["--out-npz", str(tmp_path / "straight.npz")]))
    out = tmp_path / "resumed.npz"
    parts = tmp_path / "resumed.npz.parts"
    os.makedirs(parts)
    os.mkfifo(parts / "chunk_00002.npz")  # "already made": skipped by sampling, blocks the assembly
    proc = subprocess.Popen([sys.executable, os.path.join(HERE, "sample.py"), *argv, "--out-npz",
                             str(out)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    # opened before the chunks are read; the FIFO,
    assembling = tmp_path / f"resumed.tmp{proc.pid}.npz"
    while not assembling.exists():  # which no one writes, then holds the assembly until the kill
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        time.sleep(0.01)
    proc.kill()
    proc.wait()
    os.remove(parts / "chunk_00002.npz")
    assert not out.exists() and sorted(f for f in os.listdir(parts) if f.startswith("chunk_0")) == \
        [f"chunk_0000{c}.npz" for c in (0, 1, 3, 4)]
    assert [f for f in os.listdir(tmp_path) if ".tmp" in f]  # the killed assembly's temporary npz
    with pytest.raises(SystemExit) as stop:  # other settings: refused, nothing touched
        flags.run(sample.main, sample.parse(argv + ["--out-npz", str(out), "--cfg", "1,3"]))
    assert "made with --cfg = [1.0, 4.0], not [1.0, 3.0]" in str(stop.value), stop.value
    # another job at work on the same parts
    holder = distributed.FolderLock(str(parts), "parts folder")
    with pytest.raises(SystemExit) as stop:
        flags.run(sample.main, sample.parse(argv + ["--out-npz", str(out)]))
    # 4 chunks, settings, lock
    assert "is in use by pid" in str(stop.value) and len(os.listdir(parts)) == 6, stop.value
    holder.release()
    capsys.readouterr()
    flags.run(sample.main, sample.parse(argv + ["--out-npz", str(out)]))
    assert "4 of 5 chunks already on disk, 1 to make" in capsys.readouterr().out
    assert out.read_bytes() == (tmp_path / "straight.npz").read_bytes()
    assert not parts.exists() and not [f for f in os.listdir(tmp_path) if ".tmp" in f]
    assert np.load(out)["arr_1"].tolist() == [1] * 5 + [3] * 5


def test_assembly_holds_one_chunk_at_a_time(tmp_path):
    """40 chunks of 100 RGB 32x32 images (12 MB in all) -> one npz, with a peak of traced memory
    under a tenth of that; the result equals the chunks concatenated."""
    import tracemalloc
    rng = np.random.default_rng(0)
    chunks = [rng.integers(0, 255, (100, 32, 32, 3), dtype=np.uint8) for _ in range(40)]
    for c, images in enumerate(chunks):
        files.save_atomic_npz(sample_ddp.chunk_path(str(tmp_path), c), images=images)
    labels = torch.arange(4000) % 10
    whole = np.concatenate(chunks)
    del chunks
    tracemalloc.start()
    sample_ddp.assemble(str(tmp_path), 40, labels, str(tmp_path / "all.npz"))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < whole.nbytes / 10, peak
    assert np.array_equal(np.load(tmp_path / "all.npz")["arr_0"], whole)
    assert np.array_equal(np.load(tmp_path / "all.npz")["arr_1"], labels.numpy())


def test_npz_images_are_read_memory_mapped_and_unchanged(tmp_path):
    images = np.random.default_rng(0).integers(0, 255, (7, 9, 8, 3), dtype=np.uint8)
    files.save_atomic_npz(tmp_path / "ours.npz", arr_0=images)
    np.savez(tmp_path / "numpy.npz", arr_0=images)
    np.savez_compressed(tmp_path / "compressed.npz", arr_0=images)
    for name, mapped in (("ours", True), ("numpy", True), ("compressed", False)):
        read = eval_fid.load_images(str(tmp_path / f"{name}.npz"))
        assert isinstance(read, np.memmap) == mapped and np.array_equal(read, images), name


def test_sample_figures_and_animation_have_their_layout(tiny_run, tmp_path):
    ckpt = os.path.join(tiny_run, "last.pt")
    Image.fromarray(np.random.randint(0, 255, (16, 16), dtype=np.uint8)).save(tmp_path / "in.png")
    outpaint = [tmp_path / "in.png", "--sides", "right,top", "--results", 2, "--edit-class", 5]
    for command, extra, size in [("compare", ["--classes", "0,1"], (56 + 2 * 66, 6 * 66)),
                                 ("outpaint", outpaint, (5 * 66, 12 + 66))]:
        out = tmp_path / f"{command}.png"
        assert cli("sample.py", command, "--ckpt", ckpt, "--out", out, *extra) is None
        assert Image.open(out).size == size, command
    assert cli("sample.py", "animate", "--ckpt", ckpt, "--class", 3, "--out",
               tmp_path / "a.gif") is None
    gif = Image.open(tmp_path / "a.gif")
    # raster and random take 16 steps, parallel 6 (= 16 * 88 / 256) and 4: the longest panel sets
    # the length
    # image_grid's layout: 2 px apart, a label line
    assert gif.n_frames == 16 and gif.size == (4 * 66, 12 + 66)
    gif.seek(0)
    first = np.asarray(gif.convert("L"))[12:]
    assert (first == 128).mean() > 0.8  # one token decoded per panel, the rest grey
    gif.seek(gif.n_frames - 1)
    assert (np.asarray(gif.convert("L"))[12:] == 128).mean() < 0.5


def test_sample_command_line_errors_are_one_line_and_write_nothing(tiny_run, tmp_path):
    ckpt = os.path.join(tiny_run, "last.pt")
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(tmp_path / "img.png")
    Image.fromarray(np.zeros((20, 20), np.uint8)).save(tmp_path / "mask20.png")
    Image.fromarray(np.zeros((24, 24), np.uint8)).save(tmp_path / "img24.png")
    (tmp_path / "text.png").write_text("not an image")
    # (more bad files: the table test below)
    cases = [(["--ckpt", tmp_path / "none.pt"], "not found"),
             (["--classes", "10"], "class 10"),
             (["--per-class", 0], "--per-class"),
             (["--steps", 17], "--steps"),
             # a flag that would be ignored is refused
             (["compare", "--order", "raster"], "--order"),
             (["inpaint", tmp_path / "img.png", "--mask", tmp_path / "mask20.png",
               "--edit-class", 1], "mask"),
             (["inpaint", tmp_path / "img24.png", "--mask", "0,0,4,4", "--edit-class", 1],
              "16x16"),
             (["inpaint", tmp_path / "text.png", "--mask", "0,0,4,4", "--edit-class", 1],
              "text.png"),
             (["inpaint", tmp_path / "img.png", "--mask", "0,0,4,4"], "--edit-class"),
             (["--cfg", "3"], "--cfg"),
             (["--ckpt", os.path.join(tiny_run, "tokenizer.pt")], "is a tokenizer checkpoint")]
    for argv, msg in cases:
        out = tmp_path / "out.png"
        command = [argv[0]] if argv[0] in sample.COMMANDS else []
        message = cli("sample.py", *command, *(["--ckpt", ckpt] if "--ckpt" not in argv else []),
                      *argv[len(command):], "--out", out)
        assert message and msg in message, (argv, message)
        assert not out.exists()


def test_sample_runs_on_the_official_checkpoint_format(tiny_run, tmp_path, capsys):
    """A user's command on released-format weights (.safetensors + YAML), with a tokenizer of the
    same vocabulary."""
    official = ["--ckpt", os.path.join(FIXTURES, "randar_tiny_official.safetensors"), "--config",
                os.path.join(FIXTURES, "randar_tiny_official.yaml"), "--vq-ckpt",
                os.path.join(tiny_run, "tokenizer.pt")]
    assert cli("sample.py", "grid", *official, "--per-class", 2, "--steps", 6, "--out",
               tmp_path / "g.png", "--out-npz", tmp_path / "g.npz") is None
    assert np.load(tmp_path / "g.npz")["arr_0"].shape == (20, 16, 16, 1)
    capsys.readouterr()
    assert cli("sample.py", "bench", *official[:4], "--bench-batch", 2, "--repeats",
               1, "--sizes", 16) is None
    assert "64-wide, 2 layers" in capsys.readouterr().out


def test_bench_measures_every_size_batch_and_decoding(capsys):
    """Random weights of a preset; the model's own N = 16 and N = 64 on an extrapolation grid; one
    row per (size, batch, decoding) with the paper's 88-of-256 step ratio (timings: the command's
    business, not a test's)."""
    flags.run(sample.main,
               sample.parse(["bench", "--preset", "tiny", "--sizes", "16,64", "--bench-batch", "2",
                             "--repeats", "1", "--device", "cpu"]))
    out = capsys.readouterr().out
    rows = [[c.strip() for c in line.split("|")[1:-1]] for line in out.splitlines()
            if re.match(r"\| \d+ \|", line)]
    assert [(int(n), int(b), d, int(s)) for n, b, d, s, *_ in rows] == [
        (N, batch, f"eager, {kind}", steps) for N in (16, 64) for batch in (1, 2)
        for kind, steps in (("1 token/step", N), ("parallel", round(N * 88 / 256)))]
    assert all(float(ms) > 0 for *_, ms, _ in rows)


def test_editing_keeps_the_input_where_it_should(tiny_run, tmp_path):
    """inpaint: the known tokens are the input's own codes outside the mask, and the results keep
    them; outpaint: the kept part moves away from the new side by --extend pixels (the figure's
    third panel), the known tokens are the columns it covers; extrapolate: the base tokens sit at
    the even rows and columns of the doubled grid."""
    ckpt = os.path.join(tiny_run, "last.pt")
    image = np.random.default_rng(0).integers(0, 255, (16, 16), dtype=np.uint8)
    Image.fromarray(image).save(tmp_path / "in.png")
    args, model, vq = loaded("inpaint", tmp_path / "in.png", "--ckpt", ckpt, "--mask", "4,0,12,8",
                             "--edit-class", 3, "--results", 3, "--out", tmp_path / "i.png")
    tokens, (positions, known_tokens) = sample.edit(model, vq, args)
    masked = {1, 2, 5, 6}  # the box covers token columns 1-2 of token rows 0-1 (4 px a token)
    assert positions[0].tolist() == [p for p in range(16) if p not in masked]
    codes = vq.encode_images(torch.from_numpy(image)[None, None])[0].flatten()
    assert torch.equal(known_tokens[0], codes[positions[0]])
    assert torch.equal(tokens.gather(1, positions), known_tokens)
    args, model, vq = loaded("outpaint", tmp_path / "in.png", "--ckpt", ckpt, "--sides", "right",
                             "--extend", 4, "--edit-class", 5, "--results", 2, "--scale", 1,
                             "--out", tmp_path / "o.png")
    tokens, (positions, known_tokens) = sample.edit(model, vq, args)
    assert positions[0].tolist() == [p for p in range(16) if p % 4 != 3]
    assert torch.equal(tokens.gather(1, positions), known_tokens)
    kept = np.asarray(Image.open(tmp_path / "o.png"))[12:28, 2 * 18:2 * 18 + 16]  # third panel
    assert np.array_equal(kept[:, :12], image[:, 4:])  # moved 4 px left
    assert (kept[:, 12:] == 128).all()  # the new strip, shown grey
    args, model, vq = loaded("extrapolate", "--ckpt", ckpt, "--classes", 2, "--per-class", 2,
                             "--extrapolate-steps", 6, "--out", tmp_path / "e.png")
    base, big = sample.extrapolate(model, vq, args)
    assert Image.open(tmp_path / "e.png").size == (4 * 130, 12 + 130)  # base | extrapolated, x2
    assert big.shape == (2, 64)
    assert torch.equal(big.view(2, 8, 8)[:, ::2, ::2], base.view(2, 4, 4))


def test_compare_rows_are_the_decodings_they_name(tiny_run, tmp_path):
    """Row names give the decoding and its steps; the raster and random rows are what generate()
    makes with that order and the first chunk's seed."""
    args, model, vq = loaded("compare", "--ckpt", os.path.join(tiny_run, "last.pt"), "--classes",
                             "0,1", "--out", tmp_path / "c.png")
    names, tokens = sample.compare(model, vq, args)
    assert names == ["raster\n16 steps", "random\n16 steps", "parallel\n8 steps",
                     "parallel\n6 steps", "parallel\n4 steps", "parallel\n2 steps"]
    labels = torch.tensor([0, 1])
    for row, order in ((0, "raster"), (1, "random")):
        direct = generate(model, labels, order=order, steps=16, cfg_scale=args.cfg,
                          generator=torch.Generator().manual_seed(0))
        assert torch.equal(tokens[row], direct), order


def test_a_release_yaml_sets_the_default_number_of_steps(tiny_run, tmp_path, monkeypatch):
    """Without --steps, a release decodes in its YAML's num_inference_steps (6 in the tiny
    release's): every generate() call runs 6 steps; --steps 5 overrides it."""
    official = ["--ckpt", os.path.join(FIXTURES, "randar_tiny_official.safetensors"),
                "--config", os.path.join(FIXTURES, "randar_tiny_official.yaml"),
                "--vq-ckpt", os.path.join(tiny_run, "tokenizer.pt")]
    steps_run = []

    def counting_generate(*args, **kwargs):
        calls = []
        out = generate(*args, **kwargs, callback=lambda step, logits, new: calls.append(step))
        steps_run.append(len(calls))
        return out
    monkeypatch.setattr(sample_ddp, "generate", counting_generate)
    for extra, steps in (([], 6), (["--steps", 5], 5)):
        steps_run.clear()
        args, model, vq = loaded("grid", *official, "--classes", "0,1", "--per-class", 1, *extra,
                                 "--out", tmp_path / "g.png")
        assert args.steps == steps
        sample.grid(model, vq, args)
        assert steps_run and set(steps_run) == {steps}, (extra, steps_run)


def test_sample_grids_name_their_rows(tmp_path):
    assert image_data.class_names("fashion-mnist", [0, 9]) == ["T-shirt/top", "ankle boot"]
    for folder in ("dog", "cat"):
        (tmp_path / folder).mkdir()
    assert image_data.class_names(str(tmp_path), [1, 0]) == ["dog", "cat"]
    assert image_data.class_names(None, [3, 250]) == ["class 3", "class 250"]
    names = [f"class {c}" for c in (0, 1)]
    grid = image_grid.image_grid(torch.zeros(4, 1, 8, 8, dtype=torch.uint8) + 255, nrow=2,
                             row_labels=names)
    assert grid.size == (6 * 7 + 8 + 2 * 10, 2 * 10)
    assert np.asarray(grid)[:, :50].min() < 100  # the names are drawn (antialiased)
