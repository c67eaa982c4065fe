"""What the command lines share: a bad argument or an expected failure is one line `error: ...`,
never a traceback; number flags are checked when parsed.
"""
import argparse
import math
import os
import sys

import torch
import torch.distributed as dist

# The guidance schedule (start, end) of sample.py and of train.py's sample grid, the demo's best
# (docs/experiments.md (f)).
DEFAULT_CFG = (1.0, 4.0)


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad argument is one line naming it (no usage dump), exit status 2."""

    def __init__(self, **kw):
        super().__init__(formatter_class=argparse.RawDescriptionHelpFormatter, **kw)

    def error(self, message):
        sys.exit(f"error: {self.prog.split()[-1] if ' ' in self.prog else self.prog}: {message}")


def in_range(kind, low, high=math.inf, open_low=False, open_high=False):
    """An argparse type: an int or float in [low, high] (an end excluded when open_*); NaN never
    passes."""
    def check(text):
        try:
            value = kind(text)
        except ValueError:
            value = math.nan
        if not ((low < value if open_low else low <= value)
                and (value < high if open_high else value <= high)):
            span = f"{'(' if open_low else '['}{low}, {high}{')' if open_high else ']'}"
            noun = "an integer" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"must be {noun} in {span}, got {text!r}")
        return value
    return check


positive_int = in_range(int, 1)
non_negative_int = in_range(int, 0)
positive_number = in_range(float, 0, open_low=True)
non_negative_number = in_range(float, 0)
probability = in_range(float, 0, 1, open_high=True)


def run(main, args, errors=(ValueError, FileNotFoundError, OSError)):
    """A script's entry point. It uses the threads the environment sets (torchrun sets them per
    worker), else every core. An expected failure, or under torchrun a failed collective (a rank
    died or stalled), ends the script with one line `error: ...` and status 1."""
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(os.cpu_count() or 1)
    try:
        main(args)
    except errors as e:
        message = str(e)
        # raised in a DataLoader worker: keep the original error's line
        if "Original Traceback" in message:
            message = message.strip().splitlines()[-1].split(": ", 1)[-1]
        sys.exit(f"error: {message}")
    except RuntimeError as e:
        if not dist.is_initialized():
            raise
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        print(f"error: rank {dist.get_rank()}: a collective operation failed; another rank died or "
              f"stalled past the process-group timeout ({first})", file=sys.stderr, flush=True)
        sys.stdout.flush()
        # the process group cannot be shut down cleanly with a peer gone: do not wait on it
        os._exit(1)
