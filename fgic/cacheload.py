"""Reading the decoded-image cache: a dataset over it and a loader that gathers whole training batches with threads."""
from __future__ import annotations

import copy
import itertools
import queue
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from fgic import augment
from fgic.batch import Batch
from fgic.keyed import KeyedImages


class CachedImageFolder(KeyedImages):
    """A KeyedImageFolder's samples served from the decoded-image cache (fgic.cache), with the same items.

    Training batches come from CachedBatches: the resized uint8 images, the labels, drop keys and each sample's
    (top, left, flip) from augment.sample_params; `to_device` crops and flips them where the batch trains (one gather
    on a GPU). Items (`dataset[key]`, the test split's loader) are made on the host, exactly as KeyedImageFolder's; so
    are the training items when augment.Extra adds per-image policies or mixing (its torch generator is not
    thread-safe, and a partner doubles the reads), served by loader worker processes then."""

    def __init__(self, folder: KeyedImages, array: np.ndarray):
        vars(self).update(vars(folder))  # its samples (bad images left out), classes, sizes, seed and views
        self.path, self.array = array.filename, array

    def __getstate__(self):  # loader workers map the file themselves; the pages are never pickled
        return {**self.__dict__, "array": None}

    def rows(self) -> np.ndarray:
        if self.array is None:
            self.array = np.load(self.path, mmap_mode="r")
        return self.array

    @property
    def device_crops(self) -> bool:
        """Whether training batches are cropped and flipped where they train (CachedBatches), not item by item."""
        return self.train and not (self.views.extra.per_image or self.views.extra.mixing)

    def image(self, index: int) -> torch.Tensor:
        return torch.from_numpy(np.array(self.rows()[index]))

    def params(self, keys) -> torch.Tensor:
        """(top, left, flip) of each (epoch, index) key, as an int16 (B, 3) tensor."""
        return torch.tensor([augment.sample_params(self.seed, e, i, self.size, self.crop, self.padding)
                             for e, i in keys], dtype=torch.int16)


class CachedBatches:
    """Training batches (Batch: uint8 resized images, labels, drop keys, crop/flip params) gathered whole from the
    cache's memory map by `threads` threads (numpy copies release the GIL), `depth` batches ahead of the consumer: no
    worker processes, no per-item collation, and one host copy per image. In place of a DataLoader: it has `dataset`,
    `sampler` (a TrainSampler; its set_epoch applies) and len(). `epochs()` chains epochs with one producer.

    With `pin` (training on a GPU) each batch lives in pinned memory from torch's caching host allocator, which
    hands a block out again only once the copies from it have finished. Without it, the batches cycle through
    depth + 2 buffers: a batch stays valid until the consumer has taken the next one (fgic crops it at once)."""

    def __init__(self, dataset: CachedImageFolder, sampler, batch_size: int, threads: int, pin: bool, depth: int = 3):
        self.dataset, self.sampler, self.batch_size = dataset, sampler, batch_size
        self.threads, self.pin, self.depth = max(1, threads), pin, depth
        self._ring: list[torch.Tensor] = []

    def __len__(self) -> int:
        return len(self.sampler) // self.batch_size

    def __iter__(self):
        """The batches of the sampler's current epoch."""
        yield from self._consume(self._chunks(list(self.sampler)))

    def epochs(self, first: int = 0):
        """The batches of epochs first, first + 1, ... without end, from one producer thread, so the next epoch's
        first batches are gathered while this one's last are consumed (a benchmark's steady state; training
        iterates epoch by epoch, an evaluation between them). Each epoch's keys are the sampler's, as set_epoch(e)
        then iter would give them; the sampler itself is left as it is."""
        sampler = copy.copy(self.sampler)

        def chunks():
            for epoch in itertools.count(first):
                sampler.set_epoch(epoch)
                batches = self._chunks(list(sampler))
                if not batches:  # else the producer would search for a batch forever
                    raise ValueError(f"an epoch of {len(sampler)} samples holds no batch of {self.batch_size}")
                yield from batches
        yield from self._consume(chunks())

    def _chunks(self, keys: list) -> list:
        """Whole batches of `keys`; the last partial one is dropped (drop_last, as the DataLoader's)."""
        return [keys[i:i + self.batch_size] for i in range(0, len(keys) // self.batch_size * self.batch_size,
                                                             self.batch_size)]

    def _consume(self, chunks):
        ready: queue.Queue = queue.Queue(maxsize=self.depth)
        stop = threading.Event()
        producer = threading.Thread(target=self._produce, args=(chunks, ready, stop), daemon=True,
                                    name="fgic-cache-batches")
        producer.start()
        try:
            while (item := ready.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()
            while producer.is_alive():  # unblock a producer waiting for room, then let it see `stop`
                try:
                    ready.get(timeout=0.05)
                except queue.Empty:
                    pass
            producer.join()

    def _produce(self, chunks, ready: queue.Queue, stop: threading.Event) -> None:
        try:
            with ThreadPoolExecutor(self.threads, thread_name_prefix="fgic-gather") as pool:
                for n, chunk in enumerate(chunks):
                    if stop.is_set():
                        return
                    ready.put(self._gather(chunk, self._buffer(n), pool))
        except BaseException as exc:  # handed to the consumer, raised there
            ready.put(exc)
            return
        ready.put(None)

    def _buffer(self, n: int) -> torch.Tensor:
        shape = (self.batch_size, 3, self.dataset.size, self.dataset.size)
        if self.pin:
            return torch.empty(shape, dtype=torch.uint8, pin_memory=True)
        if len(self._ring) < self.depth + 2:
            self._ring.append(torch.empty(shape, dtype=torch.uint8))
        return self._ring[n % (self.depth + 2)]

    def _gather(self, keys, images: torch.Tensor, pool: ThreadPoolExecutor):
        rows, out = self.dataset.rows(), images.numpy()
        index = [i for _, i in keys]

        def copy(part: range) -> None:
            for j in part:
                out[j] = rows[index[j]]
        list(pool.map(copy, [range(t, len(index), self.threads) for t in range(self.threads)]))
        labels, params = torch.tensor([self.dataset.samples[i][1] for i in index]), self.dataset.params(keys)
        drops = torch.tensor([augment.drop_key(self.dataset.seed, e, i) for e, i in keys])
        if self.pin:
            labels, drops, params = (t.pin_memory() for t in (labels, drops, params))
        return Batch(images, labels, drops, params=params)
