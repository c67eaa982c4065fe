"""What every script shares: checkpoints read safely (weights_only), outputs written atomically (a
crash never leaves a half-written file), streamed .npz files, one job per folder, one-line
command-line errors.
"""
import argparse
import datetime
import fcntl
import hashlib
import math
import os
import pickle
import re
import socket
import sys
import urllib.error
import zipfile

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image, ImageDraw

# ----------------------------------------------------------------------------------------------
# Reading checkpoints: ours (torch.save'd dicts) and the released RandAR format.

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


# ----------------------------------------------------------------------------------------------
# Writing outputs: images and files.

def image_grid(images_uint8, nrow, row_labels=(), pad=2, scale=1, col_labels=()):
    """(B, C, H, W) uint8 -> PIL image, nrow images per row, optional text labels left of the rows
    (in a column as wide as the longest) and above the columns; scale > 1 enlarges every image
    (nearest) so small images stay readable."""
    label_width = row_label_width(row_labels) if row_labels else 0
    if scale > 1:
        images_uint8 = images_uint8.repeat_interleave(scale, dim=2).repeat_interleave(scale, dim=3)
    B, C, H, W = images_uint8.shape
    top = 12 if col_labels else 0  # a line of text
    size = (label_width + nrow * (W + pad), top + math.ceil(B / nrow) * (H + pad))
    canvas = Image.new("L" if C == 1 else "RGB", size, 255)
    for i, im in enumerate(images_uint8):
        arr = im.permute(1, 2, 0).cpu().numpy()
        canvas.paste(Image.fromarray(arr[..., 0] if C == 1 else arr),
                     (label_width + (i % nrow) * (W + pad), top + (i // nrow) * (H + pad)))
    draw = ImageDraw.Draw(canvas)
    for r, text in enumerate(row_labels):  # centred on the row, a text line being ~11 px high
        y = top + r * (H + pad) + H // 2 - 6 * (text.count("\n") + 1)
        draw.text((2, y), text, fill=0)
    for c, text in enumerate(col_labels):
        draw.text((label_width + c * (W + pad) + 2, 0), text, fill=0)
    return canvas


def row_label_width(labels):
    """Pixels for row labels in PIL's default font (about 6 px a character) and a margin."""
    return 6 * max((len(line) for text in labels for line in text.split("\n")), default=0) + 8


def check_output(path):
    """Refuse, before the work rather than after it, an output that is a folder or cannot be
    created."""
    if os.path.isdir(path):
        raise IsADirectoryError(f"output {path} is a directory, expected a file name")
    folder = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(folder):
        folder = os.path.dirname(folder)
    if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
        raise PermissionError(f"output {path} cannot be written ({folder} "
                              "is not a writable folder)")


def temp_path(path):
    """A temporary name beside path (same folder: the final rename is atomic); the folder is
    created."""
    check_output(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    root, ext = os.path.splitext(path)
    return f"{root}.tmp{os.getpid()}{ext}"


def remove_stale_temps(path):
    """The temporaries of path that write_atomic leaves when its process is killed mid-write. Only
    for a path no other live process writes (the caller holds its folder's lock)."""
    folder = os.path.dirname(os.path.abspath(path))
    root, ext = os.path.splitext(os.path.basename(path))
    for name in os.listdir(folder) if os.path.isdir(folder) else []:
        if re.fullmatch(re.escape(root) + r"\.tmp\d+" + re.escape(ext), name):
            os.remove(os.path.join(folder, name))


class WriteErrors:
    """A file that keeps the OSError of a failed write: torch.save's RuntimeError would hide why
    (disk full)."""

    def __init__(self, f):
        self.f = f
        self.error = None

    def write(self, data):
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def __getattr__(self, name):
        return getattr(self.f, name)


def write_atomic(write, path):
    """write(file object) into a temporary file, flushed to disk, then renamed onto path: a crash or
    a failed write (disk full, quota) leaves the old file intact, no temporary behind, and one
    OSError naming the path."""
    tmp = temp_path(path)
    recorded = None
    try:
        with open(tmp, "wb") as f:
            recorded = WriteErrors(f)
            write(recorded)
            f.flush()
            # a full disk can surface only here; the rename must not come first
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        cause = (recorded and recorded.error) or e
        if not isinstance(cause, OSError):
            raise
        raise OSError(f"cannot write {path}: {cause.strerror or cause} (any previous "
                      f"{os.path.basename(path)} is intact)") from None
    finally:
        if os.path.lexists(tmp):
            os.remove(tmp)


def save_png(image, path):
    """An image, in the format its extension names (PNG when it names none Pillow knows)."""
    kind = Image.registered_extensions().get(os.path.splitext(path)[1].lower(), "PNG")
    write_atomic(lambda f: image.save(f, format=kind), path)


def save_atomic(obj, path):
    write_atomic(lambda f: torch.save(obj, f), path)


def file_fingerprint(path, block=1 << 20):
    """Size and SHA-256 of the first and last MiB: cheap for a 1 GB checkpoint, changes when it is
    replaced."""
    size = os.path.getsize(path)
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        digest.update(f.read(block))
        f.seek(max(size - block, 0))
        digest.update(f.read(block))
    return f"{size}:{digest.hexdigest()[:16]}"


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


# ----------------------------------------------------------------------------------------------
# .npz files (a zip of uncompressed .npy members, as np.savez writes them), streamed both ways so
# that 50,000 images never need to be in memory at once.

def write_npz(f, members):
    """members: {name: (dtype, shape, iterable of arrays whose rows fill shape in order)} -> an .npz
    in the open file f. Fixed timestamps: the same arrays always give the same bytes."""
    with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        for name, (dtype, shape, pieces) in members.items():
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            with zf.open(info, "w", force_zip64=True) as out:
                header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
                          "fortran_order": False, "shape": tuple(shape)}
                np.lib.format.write_array_header_1_0(out, header)
                written = 0
                for piece in pieces:
                    piece = np.ascontiguousarray(piece, dtype=dtype)
                    out.write(piece.data)
                    written += piece.size
                if written != math.prod(shape):
                    raise ValueError(f"npz member {name}: got {written} values "
                                     f"for shape {tuple(shape)}")


def save_atomic_npz(path, **arrays):
    arrays = {k: np.asarray(v) for k, v in arrays.items()}
    write_atomic(lambda f: write_npz(f,
                                     {k: (a.dtype, a.shape, [a]) for k, a in arrays.items()}), path)


def npz_names(path):
    """The array names in an .npz, without reading any of them."""
    try:
        with zipfile.ZipFile(path) as zf:
            return [n[:-4] for n in zf.namelist() if n.endswith(".npy")]
    except (OSError, zipfile.BadZipFile) as e:
        cause = f"{type(e).__name__}: {str(e)[:80]}"
        raise ValueError(f"{path} is not a readable .npz ({cause})") from None


def npz_array(path, name):
    """One array of an .npz: memory-mapped when the member is stored uncompressed (np.savez,
    write_npz), else read whole (np.savez_compressed)."""
    try:
        with zipfile.ZipFile(path) as zf:
            info = zf.getinfo(f"{name}.npy")
        if info.compress_type != zipfile.ZIP_STORED:
            with np.load(path) as data:
                return data[name]
        # the member's data starts after its local header (30 bytes + name + extra)
        with open(path, "rb") as f:
            f.seek(info.header_offset)
            local = f.read(30)
            f.seek(info.header_offset + 30 + int.from_bytes(local[26:28], "little") +
                   int.from_bytes(local[28:30], "little"))
            # a newer version: KeyError, one line
            read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                           (2, 0): np.lib.format.read_array_header_2_0}[np.lib.format.read_magic(f)]
            shape, fortran, dtype = read_header(f)
            offset = f.tell()
        if math.prod(shape) == 0:
            return np.empty(shape, dtype)
        return np.memmap(path, dtype, "r", offset, shape, "F" if fortran else "C")
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as e:
        cause = f"{type(e).__name__}: {str(e)[:80]}"
        raise ValueError(f"{path}: cannot read array {name!r} ({cause})") from None


def repeat_epochs(loader, what):
    """The batches of loader, epoch after epoch, for a loop that stops after a number of steps. An
    epoch that yields no batch (a dataset smaller than one batch, with drop_last) is an error, not
    an endless loop."""
    while True:
        yielded = False
        for batch in loader:
            yielded = True
            yield batch
        if not yielded:
            raise ValueError(f"{what}: a whole epoch gave no batch ({len(loader.dataset)} items, "
                             f"batch size {loader.batch_size}, incomplete batches dropped)")


# ----------------------------------------------------------------------------------------------
# Long jobs: one job per output folder, and every rank told what rank 0 decided.

class FolderLock:
    """`<folder>/lock`, flock-held while the job runs and naming its pid and host: a second job is
    refused in one line; the kernel drops a dead process's flock, so the next job takes the folder
    over."""

    def __init__(self, folder, what):
        os.makedirs(folder, exist_ok=True)
        self.path = os.path.join(folder, "lock")
        while True:
            self.file = open(self.path, "a+")
            try:
                fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                self.file.seek(0)
                holder = self.file.read().strip() or "another process"
                self.file.close()
                raise OSError(f"{what} {folder} is in use by {holder} (lock file {self.path}); "
                              "wait for it to finish or use another folder") from None
            held = os.fstat(self.file.fileno()).st_ino
            if os.path.exists(self.path) and os.stat(self.path).st_ino == held:
                break
            self.file.close()  # the holder removed the file as we opened it: lock the new one
        self.file.truncate(0)  # (append mode: the write lands at the new end)
        self.file.write(f"pid {os.getpid()} on host {socket.gethostname()}")
        self.file.flush()

    def release(self):
        """Remove the lock file, then drop the lock (a finished job leaves nothing behind)."""
        if not self.file.closed:
            if os.path.exists(self.path):
                os.remove(self.path)
            self.file.close()


def setup_distributed(device="auto", timeout_s=1800):
    """(rank, world size, device): one process on `device` ('auto': the GPU if any), or under
    torchrun its process group (nccl / gloo) and the rank's GPU. A collective waiting past timeout_s
    (a rank died) fails, not hangs."""
    if "RANK" not in os.environ:
        return 0, 1, torch.device(("cuda" if torch.cuda.is_available() else "cpu")
                                  if device == "auto" else device)
    rank = int(os.environ["RANK"])
    world = int(os.environ["WORLD_SIZE"])
    timeout = datetime.timedelta(seconds=timeout_s)
    # torchrun hosts the store
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                          is_master=not agent_store and rank == 0, timeout=timeout)
    # a group restarted by --max-restarts must not read the addresses its dead predecessors left in
    # the store
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    store = dist.PrefixStore(f"randar/attempt_{attempt}", store)
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", store=store, rank=rank,
                            world_size=world, timeout=timeout)
    if not torch.cuda.is_available():
        return rank, world, torch.device("cpu")
    torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    return rank, world, torch.device("cuda", int(os.environ["LOCAL_RANK"]))


def barrier():
    if dist.is_initialized():
        dist.barrier()


def gather(obj, world):
    """One object per rank, in rank order."""
    objs = [obj] * world
    if dist.is_initialized():
        dist.all_gather_object(objs, obj)
    return objs


def rank0_decides(fn, rank):
    """fn() on rank 0, its result (or its error) given to every rank, so no rank goes on alone."""
    result = [None, None]
    if rank == 0:
        try:
            result[0] = fn()
        except (ValueError, OSError) as e:
            result[1] = e
    if dist.is_initialized():
        dist.broadcast_object_list(result, src=0)
    if result[1] is not None:
        raise result[1]
    return result[0]


# ----------------------------------------------------------------------------------------------
# Command lines

# The guidance schedule (start, end) of sample.py and of train.py's grid: on the demo model 1->4
# beat 1->3 (docs/experiments.md (f)).
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
    """A script's entry point: the threads the environment set (torchrun: per worker), else every
    core; an expected failure, or under torchrun a failed collective (a rank died or stalled), is
    one line `error: ...`, status 1."""
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
