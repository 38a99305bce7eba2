"""The worker extension the ``vllm`` backend installs in every vLLM worker (``worker_extension_cls``).

Kept free of module-level vLLM imports: vLLM imports it by qualified name inside each worker.
"""

from __future__ import annotations


class EvomergeWorkerExtension:
    """Mixed into vLLM's worker class; its methods are called by name with ``LLM.collective_rpc``."""

    def evomerge_load_weights(self, tensors) -> int:
        """Replace this worker's weights with ``tensors`` ((checkpoint name, tensor) pairs) through
        vLLM's in-place reload (the weights are repacked for the kernels as at load time)."""
        self.reload_weights(weights_iterator=iter(tensors))  # type: ignore[attr-defined]
        return len(tensors)
