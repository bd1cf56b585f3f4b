"""Decoded-image cache: each split decoded and resized once into a uint8 .npy per node, memory-mapped by every process.

Layout of a cache folder: NAME.npy (N x 3 x R x R uint8, numpy's format) and NAME.json (the key it was built for,
written last: no JSON, or a JSON with another key, means "not built"). NAME holds a hash of the key, which covers
every file's path, size and mtime, the labels, the resize and the Pillow/torchvision versions, so a changed dataset
or size gets a new cache. One process builds it under an exclusive flock on NAME.lock while the others wait; the
kernel drops the lock when a builder dies, so a waiter then builds it itself instead of hanging. The array is
written under a temporary name, fsynced and renamed into place before the JSON is, so a half-written cache is never
read. Readers open it with mmap: the node keeps one copy in its page cache, whatever the process count.

A folder on a shared file system whose flock is node-local (BeeGFS by default, Lustre with `localflock`) may see
one builder per node at once; each writes its own temporary file, named for its host, pid and a random token, and
the renames put identical arrays in place. A temporary file is removed only when provably stale: this host's with
a dead pid, or untouched for STALE_SECONDS (a builder touches its file after every chunk).
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import secrets
import socket
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import PIL
import torchvision
from tqdm import tqdm

from fgic import augment, images, signals
from fgic.errors import FgicError

FORMAT = "fgic-cache 1"
MODES = ("auto", "on", "off")
MEMORY_SHARE = 0.6  # auto: the arrays may take at most this share of the memory available to us
WAIT_SECONDS = float(os.environ.get("FGIC_CACHE_WAIT_S", 3600))  # the longest wait for another process's build
CHUNK = 32  # images per build task
# A temporary file untouched this long is a dead builder's, whichever host wrote it: its builder touches it after
# every chunk of CHUNK images (seconds apart), so a day leaves room for any clock skew between the hosts and any
# stalled file system, and a dead builder's file, the size of the split, does not stay for ever.
STALE_SECONDS = 24 * 3600
_TEMP = re.compile(r"@(?P<host>[^@]*)@(?P<pid>\d+)@[0-9a-f]+\.tmp$")


def folder(cache_dir: str | None) -> Path:
    """The node's cache folder: --cache-dir, else default_dir()."""
    return Path(cache_dir) if cache_dir else default_dir()


def default_dir() -> Path:
    """$FGIC_CACHE, else a per-user folder in the node-local temporary directory ($TMPDIR or /tmp)."""
    env = os.environ.get("FGIC_CACHE")
    return Path(env) if env else Path(tempfile.gettempdir()) / f"fgic-cache-{os.getuid()}"


def key_of(samples: list[tuple[str, int]], resize: int) -> dict:
    """What a cache depends on: the files (path, size, mtime), their labels and order, the resize, the resize code."""
    h = hashlib.sha256()
    for path, label in samples:
        st = os.stat(path)
        h.update(f"{os.path.abspath(path)}\0{st.st_size}\0{st.st_mtime_ns}\0{label}\n".encode())
    return {"format": FORMAT, "files": h.hexdigest(), "count": len(samples), "resize": resize,
            "pillow": PIL.__version__, "torchvision": torchvision.__version__}


def name_of(root: Path, split: str, key: dict) -> str:
    """DATASET-SPLIT-RESIZEpx-WHERE-WHAT: the dataset folder's name, then hashes of its path and of the key."""
    where = hashlib.sha256(str(Path(root).resolve()).encode()).hexdigest()[:8]
    what = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return f"{Path(root).resolve().name}-{split}-{key['resize']}px-{where}-{what}"


def nbytes(count: int, resize: int) -> int:
    return count * 3 * resize * resize


def open_array(folder: Path, name: str, key: dict) -> np.ndarray | None:
    """The built cache as a read-only memory map, or None when it is missing, unfinished or built for another key."""
    try:
        meta = json.loads((folder / f"{name}.json").read_text())
        if meta != key:
            return None
        arr = np.load(folder / f"{name}.npy", mmap_mode="r")
    except (OSError, ValueError):
        return None
    r = key["resize"]
    return arr if arr.shape == (key["count"], 3, r, r) and arr.dtype == np.uint8 else None


def ensure(folder: Path, root: Path, split: str, samples: list[tuple[str, int]], resize: int, workers: int,
           show: bool = True) -> np.ndarray:
    """The split's cache as a read-only (N, 3, R, R) uint8 memory map, built first if needed (by one process)."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise FgicError(f"--cache-dir {folder}: cannot create it ({exc.strerror}); give a writable folder") from None
    key = key_of(samples, resize)
    name = name_of(root, split, key)
    arr = open_array(folder, name, key)
    if arr is not None:
        return arr
    with _lock(folder / f"{name}.lock", name):
        arr = open_array(folder, name, key)  # another process may have built it while we waited
        if arr is None:
            _build(folder, name, key, samples, resize, workers, show)
            arr = open_array(folder, name, key)
    if arr is None:
        raise FgicError(f"--cache-dir {folder}: {name}.npy was built but does not read back; delete it and retry")
    return arr


class _lock:
    """An exclusive flock, waited for at most WAIT_SECONDS. The holder's pid is written in the file for messages."""

    def __init__(self, path: Path, name: str):
        self.path, self.name = path, name

    def __enter__(self):
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline, said = time.monotonic() + WAIT_SECONDS, False
        while not self._try():
            if not said:
                print(f"fgic: waiting for process {self._holder()} to build the cache {self.name}",
                      file=sys.stderr, flush=True)
                said = True
            if time.monotonic() > deadline:
                os.close(self.fd)
                raise FgicError(f"--cache-dir: waited {WAIT_SECONDS:.0f} s for process {self._holder()} to "
                                f"build {self.path.with_suffix('.npy')}; if it is stuck, stop it, or use --cache "
                                f"off (FGIC_CACHE_WAIT_S sets the wait)")
            time.sleep(0.2)
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"{os.getpid()} on {_host()}\n".encode(), 0)
        return self

    def _try(self) -> bool:
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False
        except OSError as exc:  # ENOLCK, EOPNOTSUPP: some network file systems
            os.close(self.fd)
            raise FgicError(f"--cache-dir {self.path.parent}: its file system does not support file locks "
                            f"({exc.strerror}); use a node-local folder such as /tmp") from None

    def _holder(self) -> str:
        try:
            return self.path.read_text().strip() or "?"
        except OSError:
            return "?"

    def __exit__(self, *exc):
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)


def _build(folder: Path, name: str, key: dict, samples, resize: int, workers: int, show: bool) -> None:
    """Decode and resize every sample into NAME.npy (temp name, fsync, rename), then write NAME.json."""
    _remove_stale(folder, name)
    need = nbytes(len(samples), resize)
    free = _disk_free(folder)
    if free < need:
        raise FgicError(f"--cache-dir {folder}: {need / 1e9:.1f} GB needed for the cache, {free / 1e9:.1f} GB free; "
                        f"point --cache-dir elsewhere or use --cache off")
    tmp = _temp(folder / f"{name}.npy")
    try:
        arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(samples), 3, resize, resize))
        del arr
        paths = [p for p, _ in samples]
        chunks = [(str(tmp), i, paths[i:i + CHUNK], resize) for i in range(0, len(paths), CHUNK)]
        # a bar on a terminal (closed, so ended by a newline, when a bad image stops the build); in a log file or a
        # Slurm log a line before and after instead of tqdm's carriage returns
        terminal = show and sys.stderr.isatty()
        if show and not terminal:
            print(f"fgic: caching {name}: {len(paths)} images", file=sys.stderr, flush=True)
        started = time.perf_counter()
        with tqdm(total=len(paths), desc=f"caching {name}", unit="img", disable=not terminal, dynamic_ncols=True,
                  mininterval=0.5) as bar:
            if workers > 0 and len(chunks) > 1:
                with ProcessPoolExecutor(max_workers=workers, initializer=signals.ignore_stop) as pool:
                    with signals.blocked():  # map submits every chunk, starting the builders (signals.ignore_stop)
                        filled = pool.map(_fill, chunks)
                    for done in filled:
                        bar.update(done)
                        os.utime(tmp)  # alive (see STALE_SECONDS)
            else:
                for chunk in chunks:
                    bar.update(_fill(chunk))
                    os.utime(tmp)
        if show and not terminal:
            print(f"fgic: cached {name} in {time.perf_counter() - started:.1f} s", file=sys.stderr, flush=True)
        _fsync(tmp)
        os.replace(tmp, folder / f"{name}.npy")
        _write_atomic(folder / f"{name}.json", json.dumps(key, sort_keys=True))
        _fsync(folder)
    finally:
        tmp.unlink(missing_ok=True)


def _remove_stale(folder: Path, name: str) -> None:
    """Drop the temporary files of dead builders (_stale) and the caches of older versions of this split (same
    dataset folder and resize, another key). A process still mapping one keeps reading it: unlinking leaves the
    inode."""
    for old in folder.glob(f"{name.rsplit('-', 1)[0]}-*"):
        if old.suffix == ".lock" or (old.suffix == ".tmp" and not _stale(old)):
            continue
        if old.suffix != ".tmp" and old.name.startswith(name + "."):
            continue
        old.unlink(missing_ok=True)


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9.-]", "_", socket.gethostname()) or "localhost"


def _temp(path: Path) -> Path:
    """PATH's temporary name, PATH@HOST@PID@TOKEN.tmp: no other process, on any host sharing the folder, has it."""
    return path.with_name(f"{path.name}@{_host()}@{os.getpid()}@{secrets.token_hex(4)}.tmp")


def _stale(path: Path) -> bool:
    """Whether a temporary file is provably a dead builder's: this host's with a dead pid, or untouched for
    STALE_SECONDS (another host's pid means nothing here; so does an older version's name, without a host)."""
    try:
        if time.time() - path.stat().st_mtime > STALE_SECONDS:
            return True
    except FileNotFoundError:
        return False
    m = _TEMP.search(path.name)
    return bool(m) and m["host"] == _host() and not _alive(int(m["pid"]))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _fill(task) -> int:
    """Build worker: decode and resize a run of images into rows [start, start + n) of the array file."""
    path, start, paths, size = task
    arr = np.load(path, mmap_mode="r+")
    for i, p in enumerate(paths):
        try:
            arr[start + i] = augment.resize(images.load_rgb(p), size).numpy()
        except (OSError, ValueError) as exc:
            raise FgicError(f"{p}: cannot be decoded for the cache ({exc}); replace or remove it, or pass "
                            f"--check-images full --skip-bad-images") from None
    arr.flush()
    return len(paths)


def _write_atomic(path: Path, text: str) -> None:
    tmp = _temp(path)
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _disk_free(folder: Path) -> int:
    st = os.statvfs(folder)
    return st.f_bavail * st.f_frsize


def memory_available() -> tuple[int | None, str]:
    """(bytes this process can still fill, where the figure comes from): MemAvailable, capped by a cgroup limit."""
    found = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found.append((int(line.split()[1]) * 1024, "MemAvailable"))
    except OSError:
        pass
    cg = _cgroup_headroom()
    if cg is not None:
        found.append((cg, "cgroup limit"))
    return min(found) if found else (None, "no memory figure found")


def _cgroup_headroom() -> int | None:
    """cgroup v2 memory.max (or v1 limit_in_bytes) minus the memory used other than the file cache, if limited."""
    try:
        rel = next(line.split(":", 2)[2] for line in Path("/proc/self/cgroup").read_text().splitlines()
                   if line.startswith("0::") or ":memory:" in line)
    except (OSError, StopIteration):
        return None
    for base, limit_f, usage_f in (("/sys/fs/cgroup", "memory.max", "memory.current"),
                                   ("/sys/fs/cgroup/memory", "memory.limit_in_bytes", "memory.usage_in_bytes")):
        for folder in (Path(base + rel), Path(base)):
            try:
                limit = (folder / limit_f).read_text().strip()
                usage = int((folder / usage_f).read_text())
            except (OSError, ValueError):
                continue
            if limit == "max" or int(limit) >= 1 << 60:
                return None
            stat = dict(line.split() for line in (folder / "memory.stat").read_text().splitlines()
                        if len(line.split()) == 2) if (folder / "memory.stat").is_file() else {}
            file_cache = int(stat.get("file", stat.get("cache", 0)))
            return max(0, int(limit) - usage + file_cache)
    return None


def decide(mode: str, need: int, folder: Path) -> tuple[bool, str]:
    """--cache auto|on|off -> (use it, the reason in words)."""
    gb = f"{need / 1e9:.2f} GB"
    if mode == "off":
        return False, "cache off (--cache off): images are decoded and resized every epoch"
    avail, source = memory_available()
    if mode == "on":
        return True, f"cache on (--cache on): {gb} of decoded images in {folder}"
    if avail is None:
        return False, f"cache off: {source} to check that {gb} of decoded images fit in memory (--cache on forces it)"
    if need > MEMORY_SHARE * avail:
        return False, (f"cache off: {gb} of decoded images would exceed {MEMORY_SHARE:.0%} of the {avail / 1e9:.1f} GB "
                       f"available ({source}); --cache on forces it, read from disk when it does not stay in memory")
    return True, (f"cache on: {gb} of decoded images fit in the {avail / 1e9:.1f} GB available ({source}); "
                  f"in {folder} (--cache-dir), shared by this node's processes")
