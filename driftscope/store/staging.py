"""Pinned host memory that GPU tensors are copied into on their way to the writer thread.

One pinned buffer, allocated once, replaces a ``torch.empty(..., pin_memory=True)`` per tensor: its size bounds
the host memory that queued tensors hold, and no tensor waits for the CUDA host allocator.
"""
from __future__ import annotations

import collections
import threading

ALIGN = 4096  # slots start on page boundaries: float16 views need even offsets, DMA prefers pages


class PinnedRing:
    """A pinned buffer of ``capacity`` bytes, lent out in slots in the order tensors are queued.

    The writer thread writes tensors in queue order, so slots come back in the order they were taken and a
    ring suffices: ``take`` places the next slot after the newest one (at the start when the end is too short)
    and blocks while the writer still holds those bytes; ``give`` returns a slot once its bytes are written.
    """

    def __init__(self, capacity: int, pinned: bool = True):
        self.capacity, self.pinned = capacity, pinned  # pinned=False: ordinary memory, for tests without CUDA
        self._buf = None  # pinned at the first take: a run without GPU tensors pins nothing
        self._slots: collections.deque[list] = collections.deque()  # [start, end, given back], oldest first
        self._cond = threading.Condition()

    def take(self, nbytes: int):
        """(slot, a pinned uint8 tensor of ``nbytes``); 0 < nbytes <= capacity. Blocks until the bytes are free."""
        import torch

        assert 0 < nbytes <= self.capacity, (nbytes, self.capacity)
        with self._cond:
            if self._buf is None:
                self._buf = torch.empty(self.capacity, dtype=torch.uint8, pin_memory=self.pinned)
            while (start := self._place(nbytes)) is None:
                self._cond.wait()
            slot = [start, start + nbytes, False]
            self._slots.append(slot)
            return slot, self._buf[start:start + nbytes]

    def give(self, slot: list) -> None:
        with self._cond:
            slot[2] = True
            while self._slots and self._slots[0][2]:
                self._slots.popleft()
            self._cond.notify_all()

    def free(self) -> None:
        """Drops the pinned buffer once the writer is done with it; a later take pins a new one."""
        with self._cond:
            self._buf, self._slots = None, collections.deque()

    def _place(self, nbytes: int) -> int | None:
        """Where a slot of ``nbytes`` fits now, or None."""
        if not self._slots:
            return 0
        oldest, newest = self._slots[0], self._slots[-1]
        head = -(-newest[1] // ALIGN) * ALIGN
        if newest[0] >= oldest[0]:  # not wrapped: free are [head, capacity) and [0, oldest)
            if head + nbytes <= self.capacity:
                return head
            return 0 if nbytes <= oldest[0] else None
        return head if head + nbytes <= oldest[0] else None  # wrapped: free is [head, oldest)
