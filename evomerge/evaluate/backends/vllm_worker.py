"""The worker extension the ``vllm`` backend installs in every vLLM worker (``worker_extension_cls``).

Kept free of module-level vLLM imports: vLLM imports it by qualified name inside each worker.
"""

from __future__ import annotations


def pack(name: str, tensor) -> tuple[str, str, list[int], bytes]:
    """A tensor as plain values (name, dtype, shape, bytes): what crosses a process boundary intact
    through vLLM's RPC serialization (for workers in other processes: ``tensor_parallel_size > 1``)."""
    import torch

    t = tensor.detach().contiguous().cpu()
    return name, str(t.dtype).removeprefix("torch."), list(t.shape), t.view(torch.uint8).numpy().tobytes()


def unpack(item):
    """(name, tensor) from :func:`pack`'s values, or the pair itself when it is already a tensor."""
    if len(item) == 2:
        return item[0], item[1]
    import torch

    name, dtype, shape, data = item
    return name, torch.frombuffer(bytearray(data), dtype=torch.uint8).view(getattr(torch, dtype)).reshape(shape)


class EvomergeWorkerExtension:
    """Mixed into vLLM's worker class; its methods are called by name with ``LLM.collective_rpc``."""

    def evomerge_load_weights(self, tensors) -> int:
        """Replace this worker's weights with ``tensors`` ((checkpoint name, tensor) pairs, or
        :func:`pack`'s values from another process) through vLLM's in-place reload (the weights are
        repacked for the kernels as at load time; each tensor-parallel rank keeps its shard)."""
        self.reload_weights(weights_iterator=(unpack(item) for item in tensors))  # type: ignore[attr-defined]
        return len(tensors)
