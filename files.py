"""Files written so that a crash loses nothing: each output goes to a temporary file that is
renamed onto its name only once complete. Also .npz files streamed both ways, so that 50,000 images
never need to be in memory at once.
"""
import hashlib
import math
import os
import re
import zipfile

import numpy as np
import torch
from PIL import Image


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


def remove_temporaries(folder):
    """Every temporary that write_atomic left in folder when its process was killed mid-write.
    Only for a folder no other live process writes (the caller holds its lock)."""
    for name in os.listdir(folder):
        if re.search(r"\.tmp\d+(\.\w+)?$", name):
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


# ----------------------------------------------------------------------------------------------
# .npz files: a zip of uncompressed .npy members, as np.savez writes them.

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
