"""How a chunk's tensors travel: in the gRPC message, or through a system shared-memory region when the server is on
the same host and the payload is large."""

from __future__ import annotations

import logging
import uuid

import numpy as np

from clients._request import Chunk
from fusionrank.contract.tensors import infer_input, infer_inputs

log = logging.getLogger(__name__)


class ShmRegion:
    """A system shared-memory region holding one chunk's inputs, created, filled and destroyed per call."""

    def __init__(self, chunk: Chunk):
        from tritonclient.utils import serialize_byte_tensor
        from tritonclient.utils import shared_memory as shm

        self._shm = shm
        parts, self.placement, offset = [], {}, 0
        self.name = f"fusionrank-{uuid.uuid4().hex[:16]}"
        self.key = f"/{self.name}"
        for name, array in chunk.arrays.items():
            part = serialize_byte_tensor(array) if array.dtype == np.object_ else array
            size = len(part.item()) if part.dtype == np.object_ else part.nbytes
            parts.append(part)
            self.placement[name] = (self.name, offset, size)
            offset += size
        self.byte_size = max(offset, 1)
        self.handle = shm.create_shared_memory_region(self.name, self.key, self.byte_size)
        try:
            shm.set_shared_memory_region(self.handle, parts)
        except BaseException:
            self.destroy()
            raise

    def destroy(self) -> None:
        """Unmap and unlink the region (unregister it from the server first)."""
        self._shm.destroy_shared_memory_region(self.handle)


def chunk_inputs(module, chunk: Chunk, shm: ShmRegion | None = None) -> list:
    """The chunk's `InferInput`s for `module` (`tritonclient.grpc` or `.aio`): data inline, or pointing into `shm`."""
    if shm is None:
        return infer_inputs(module, chunk.arrays)
    inputs = []
    for name, array in chunk.arrays.items():
        tensor = infer_input(module, name, array, with_data=False)
        region, offset, size = shm.placement[name]
        tensor.set_shared_memory(region, size, offset)
        inputs.append(tensor)
    return inputs


def release(client, shm: ShmRegion | None, headers: dict[str, str] | None = None) -> None:
    """Unregister and destroy a call's shared-memory region, if it had one (sync tritonclient); `headers` carry
    the admin key servers restrict shared memory with."""
    if shm is not None:
        quietly(client.unregister_system_shared_memory, shm.name, headers)
        shm.destroy()


async def release_async(client, shm: ShmRegion | None, headers: dict[str, str] | None = None) -> None:
    """`release` for a `tritonclient.grpc.aio` client."""
    if shm is not None:
        await quietly_async(client.unregister_system_shared_memory, shm.name, headers)
        shm.destroy()


def quietly(fn, *args) -> None:
    """Call a clean-up function, logging instead of raising its error."""
    # Clean-up after a failed call (unregistering shared memory on a server that went away, closing a broken
    # channel) must not hide the call's own error, so any exception is logged and dropped.
    try:
        fn(*args)
    except Exception:
        log.debug("clean-up call %s failed", getattr(fn, "__name__", fn), exc_info=True)


async def quietly_async(fn, *args) -> None:
    """`quietly` for a coroutine function."""
    try:
        await fn(*args)
    except Exception:  # see quietly
        log.debug("clean-up call %s failed", getattr(fn, "__name__", fn), exc_info=True)
