"""Several processes at once: the torchrun process group, rank 0's decisions shared with every rank,
and one job per output folder.
"""
import datetime
import fcntl
import os
import socket

import torch
import torch.distributed as dist


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
    """Runs fn() on rank 0 and gives its result, or its error, to every rank, so that no rank goes
    on alone."""
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


class FolderLock:
    """`<folder>/lock`, held with flock while the job runs, names the job's pid and host. A second
    job is refused in one line. The kernel drops a dead process's flock, so the next job takes the
    folder over."""

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


def lock_folder(folder, what, rank):
    """Rank 0 takes the folder's FolderLock and returns it (other ranks get None); when it cannot,
    every rank raises its error."""
    lock = []
    rank0_decides(lambda: lock.append(FolderLock(folder, what)), rank)
    return lock[0] if lock else None
