"""Tests of every script's command line and of the code base as a whole."""
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

import sample
import train
from conftest import FIXTURES, HERE, SCRIPTS, cli

# ---- every script's command line, and the code base ----------------------------------------------


class Hostile:
    """Pickles to a call of os.system: a loader that ran it would create the file PWNED."""
    def __reduce__(self):
        return os.system, ("touch PWNED",)


def test_every_bad_file_and_argument_is_one_clear_line(tiny_run, tmp_path):
    """command -> expected fragment: exit status != 0, one line, no traceback, nothing new written,
    no code run."""
    ckpt = os.path.join(tiny_run, "last.pt")
    vq = os.path.join(tiny_run, "tokenizer.pt")
    bad = tmp_path / "bad"
    bad.mkdir()
    good_bytes = open(ckpt, "rb").read()
    (bad / "truncated.pt").write_bytes(good_bytes[:len(good_bytes) // 2])
    (bad / "empty.pt").write_bytes(b"")
    torch.save({"model": Hostile()}, bad / "hostile.pt")
    release = open(os.path.join(FIXTURES, "randar_tiny_official.safetensors"), "rb").read()
    (bad / "truncated.npz").write_bytes(release[:500])
    (bad / "random.safetensors").write_bytes(os.urandom(64))
    (bad / "nested.yaml").write_text("ar_model:\n  params:\n    n_layer:\n      - 2\n")
    np.savez(bad / "ok.npz", arr_0=np.zeros((4, 8, 8, 3), np.uint8))
    sample_out = ["--out", tmp_path / "out" / "x.png"]
    cases = [(["sample.py", "grid", "--ckpt", bad / "truncated.pt", *sample_out],
              "truncated.pt is not a RandAR checkpoint (truncated"),
             (["sample.py", "grid", "--ckpt", bad / "empty.pt", *sample_out],
              "empty.pt is not a RandAR checkpoint"),
             (["sample.py", "grid", "--ckpt", bad / "hostile.pt", *sample_out],
              "refused: it contains code"),
             (["sample.py", "grid", "--ckpt", vq, *sample_out],
              "is a tokenizer checkpoint, expected a RandAR"),
             (["sample.py", "grid", "--ckpt", ckpt, "--vq-ckpt", bad / "hostile.pt", *sample_out],
              "refused: it contains code"),
             (["sample.py", "grid", "--ckpt", ckpt, "--vq-ckpt", ckpt, *sample_out],
              "is a RandAR checkpoint, expected a tokenizer"),
             (["sample.py", "grid", "--ckpt", bad / "random.safetensors", "--preset", "tiny",
               *sample_out], "not a valid .safetensors"),
             (["sample.py", "grid", "--ckpt",
               os.path.join(FIXTURES, "randar_tiny_official.safetensors"), *sample_out],
              "--config"),
             (["sample.py", "grid", "--ckpt",
               os.path.join(FIXTURES, "randar_tiny_official.safetensors"), "--config",
               bad / "nested.yaml", *sample_out], "nested value"),
             (["sample.py", "grid", "--ckpt", ckpt, "--out", tmp_path], "is a directory"),
             (["sample.py", "grid", "--ckpt", ckpt, "--out-npz", tmp_path], "is a directory"),
             (["train.py", "--out-dir", tmp_path / "t", "--tokenizer-ckpt", bad / "hostile.pt"],
              "refused: it contains code"),
             (["train.py", "--out-dir", tmp_path / "t", "--tokenizer-ckpt", bad / "truncated.pt"],
              "truncated"), (["train.py", "--limit", -1], "--limit"),
             (["train.py", "--image-size", 0], "--image-size"),
             (["train.py", "--out-dir", tiny_run, "--resume", bad / "hostile.pt"],
              "refused: it contains code"),
             (["train.py", "--out-dir", tmp_path / "new", "--resume", bad / "missing.pt"],
              "--resume checkpoint not found"),
             (["train.py", "--out-dir", tmp_path / "new", "--batch-size", 0], "--batch-size"),
             (["train.py", "--out-dir", tmp_path / "new", "--grad-accum", 0], "--grad-accum"),
             (["train.py", "--out-dir", tmp_path / "new", "--ckpt-every", 0], "--ckpt-every"),
             (["train.py", "--out-dir", tmp_path / "new", "--steps", -5], "--steps"),
             (["train.py", "--out-dir", tmp_path / "new", "--data", tmp_path / "nowhere"],
              "--data folder not found"),
             (["eval_fid.py", bad / "truncated.npz", bad / "ok.npz"],
              "truncated.npz is not a readable .npz"),
             (["eval_fid.py", bad / "ok.npz", bad / "ok.npz", "--inception",
               bad / "hostile.pt"], "hostile.pt"),]
    for argv, fragment in cases:
        before = sorted(os.listdir(tiny_run))
        message = cli(*argv)
        assert message and fragment in message, (argv, message)
        assert sorted(os.listdir(tiny_run)) == before and not os.path.exists(tmp_path / "out"), argv
        assert not os.path.exists(tmp_path / "new"), argv  # failed before any work, nothing created
    assert not os.path.exists(os.path.join(HERE, "PWNED")) and not os.path.exists("PWNED")
    assert not [f for f in os.listdir(tmp_path) if ".tmp" in f]


@pytest.mark.parametrize("script, argv, fragment",
                         [("train", ["--lr", "-1"], "--lr"), ("train", ["--lr", "nan"], "--lr"),
                          ("train", ["--ema", "1.5"], "--ema"),
                          ("train", ["--min-lr-ratio", "2"], "--min-lr-ratio"),
                          ("train", ["--dropout", "1"], "--dropout"),
                          ("train", ["--class-dropout", "-0.1"], "--class-dropout"),
                          ("train", ["--clip", "0"], "--clip"),
                          ("train", ["--weight-decay", "-1"], "--weight-decay"),
                          ("train", ["--tokenizer-steps", "0"], "--tokenizer-steps"),
                          ("sample", ["--top-p", "0"], "--top-p"),
                          ("sample", ["--top-k", "-1"], "--top-k"),
                          ("sample", ["--temperature", "nan"], "--temperature"),
                          ("sample", ["--temperature", "0"], "--top-k 1"),
                          ("sample", ["--cfg", "1,nan"], "--cfg"),
                          ("sample", ["extrapolate", "--factor", "1"], "--factor"),])
def test_impossible_numbers_are_refused_at_parse_time(script, argv, fragment):
    parse = {"train": train.get_parser().parse_args, "sample": sample.parse}
    with pytest.raises(SystemExit) as e:
        parse[script](argv)
    assert fragment in str(e.value.code) and "\n" not in str(e.value.code)


def docstring_commands(module):
    """The `python X.py ...` / `torchrun ... X.py ...` lines of a script's docstring -> [argv after
    the script name]: continuation lines joined, comments and [optional] brackets dropped."""
    script = module.__name__ + ".py"
    text = re.sub(r"\\\n\s*", " ", module.__doc__)
    commands = []
    for line in text.splitlines():
        words = line.split("#")[0].replace("[", "").replace("]", "").split()
        if script in words and words[0] in ("python", "torchrun"):
            commands.append(words[words.index(script) + 1:])
    return commands


@pytest.mark.parametrize("script", ["train.py", "sample.py", "eval_fid.py"])
def test_every_docstring_command_parses(script):
    """The usage lines at the top of each script name only flags its parser knows."""
    module = SCRIPTS[script]
    commands = docstring_commands(module)
    assert commands, script
    parse = sample.parse if module is sample else module.get_parser().parse_args
    for argv in commands:
        parse(argv)


def test_the_gpu_check_runs_on_the_cpu_in_miniature(tmp_path):
    """.ci/gpu_check runs only where a GPU is lent; its dry run makes every call it makes, on the
    CPU, shrunk and with nothing compiled (so it claims no compiled == eager), with the interpreter
    it is given: a `python` or `torchrun` found on PATH would fail it."""
    for name in ("python", "torchrun"):
        (tmp_path / name).write_text("#!/bin/sh\nexit 97\n")
        (tmp_path / name).chmod(0o755)
    env = {**os.environ, "GPU_CHECK_DRY_RUN": "1", "PYTHON": sys.executable,
           "PATH": f"{tmp_path}:{os.environ['PATH']}"}
    r = subprocess.run(["bash", os.path.join(HERE, ".ci", "gpu_check")], capture_output=True,
                       text=True, env=env)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "16 steps: eager decoding ran twice, same tokens (dry run: nothing compiled)" in r.stdout
    assert "compiled == eager" not in r.stdout
    assert r.stdout.rstrip().endswith("GPU check passed")


MODULES = tuple(sorted(name[:-3] for name in os.listdir(HERE)
                      if name.endswith(".py") and not name.startswith(("test_", "conftest"))))


def import_circle(graph):
    """A list of modules that import each other in a circle (first == last), or None; graph:
    {module: imports}."""
    def visit(module, path):
        if module in path:
            return path[path.index(module):] + [module]
        return next((c for m in graph.get(module, ()) if (c := visit(m, path + [module]))), None)
    return next((c for m in graph if (c := visit(m, []))), None)


DOCUMENTS = ("README.md", "docs/algorithm.md", "docs/experiments.md")


def section_headings(doc):
    """The sections a citation can name: `## §N` (algorithm.md), `## (letter)` (experiments.md)."""
    text = open(os.path.join(HERE, doc)).read()
    return set(re.findall(r"^## (§\d+|\([a-z]\))", text, re.M))


def test_every_cross_reference_resolves():
    """A citation of docs/algorithm.md names a `§` section that exists (one, a range, or a list),
    one of docs/experiments.md a lettered section that exists, read across line breaks; a docs/
    file named anywhere exists; code never cites a doc without its section."""
    headings = {doc: section_headings(doc) for doc in DOCUMENTS[1:]}
    sources = [f"{m}.py" for m in MODULES]
    sources += ["docs/figures.py", ".ci/gpu_check", *DOCUMENTS]
    cited = 0
    for source in sources:
        text = open(os.path.join(HERE, source)).read()
        text = re.sub(r"\s*\n\s*(#\s*)?", " ", text)  # comments and docstrings wrap citations
        for doc, ref in re.findall(r"(docs/\w+\.md) (§\d+(?:(?:-|, §)\d+)*|\([a-z]\))", text):
            numbers = [int(n) for n in re.findall(r"\d+", ref)]
            if "-" in ref:
                numbers = list(range(numbers[0], numbers[1] + 1))
            wanted = [f"§{n}" for n in numbers] if ref.startswith("§") else [ref]
            for section in wanted:
                assert section in headings[doc], f"{source} cites {doc} {section}: no such section"
                cited += 1
        for path in set(re.findall(r"\bdocs/[\w./-]+\.(?:md|png|gif|py)", text)):
            assert os.path.exists(os.path.join(HERE, path)), f"{source} names {path}: missing"
        if source.endswith(".py"):
            for after in re.findall(r"docs/(?:algorithm|experiments)\.md(.{0,2})", text):
                assert after in (" §", " (", "'s", "`", "` "), (source, after)
    assert cited > 30


def test_imports_run_one_way():
    """No two modules import each other, directly or in a circle (imports anywhere in a file
    count), so each file can be read after the ones it imports."""
    import ast
    graph = {}
    for name in MODULES:
        tree = ast.parse(open(os.path.join(HERE, f"{name}.py")).read())
        imported = {a.name.split(".")[0] for n in ast.walk(tree)
                    if isinstance(n, ast.Import) for a in n.names}
        imported |= {n.module.split(".")[0] for n in ast.walk(tree)
                     if isinstance(n, ast.ImportFrom) and n.module}
        graph[name] = sorted(imported & set(MODULES))
    assert import_circle(graph) is None, import_circle(graph)
    assert graph["randar"] == [] and graph["generate"] == ["randar"], graph
    # the check can fail: sample imports randar
    circle = import_circle({**graph, "randar": ["sample"]})
    assert circle and circle[0] == circle[-1] and {"randar", "sample"} <= set(circle), circle
