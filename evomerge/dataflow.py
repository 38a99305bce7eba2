"""Folding data-flow (DFS) input scales into plain checkpoint weights.

Sakana's data-flow merge multiplies the residual stream entering step ``k`` of the layer path by a
scale ``s_k``. For a pre-norm decoder whose sublayers read the stream only through an RMSNorm and
write back through an output projection (Llama, Mistral, Qwen2, Qwen3), the scaled model equals,
up to the norms' epsilon, a plain model whose step-``k`` output projections (attention ``o_proj``
and MLP ``down_proj``, weight and bias) are multiplied by ``1 / c_k`` with ``c_k = s_1 * ... * s_k``:

    by induction the folded stream is z_k = x_k / c_k, where x_k is the scaled model's stream:
    RMSNorm(z_{k-1}) = RMSNorm(s_k x_{k-1}) (RMSNorm is invariant to a positive scale), so each
    sublayer's branch f is unchanged and z_{k-1} + f / c_k = (s_k x_{k-1} + f) / c_k. The final
    norm removes the last 1 / c_L, so the logits agree.

The difference is only where ``eps`` in ``x / sqrt(mean(x^2) + eps)`` is not negligible next to the
stream's mean square (tiny streams). Architectures with post-sublayer norms (Gemma 2/3) or
LayerNorm-with-bias residual paths are refused for non-unit scales.
"""

from __future__ import annotations

from evomerge.errors import MergeError

# model_type -> suffixes (inside a decoder layer) of tensors that write into the residual stream
RESIDUAL_WRITERS: dict[str, tuple[str, ...]] = {
    arch: ("self_attn.o_proj.weight", "self_attn.o_proj.bias", "mlp.down_proj.weight", "mlp.down_proj.bias")
    for arch in ("llama", "mistral", "qwen2", "qwen3")
}


def cumulative_scales(scales: list[float]) -> list[float]:
    """c_k = s_1 * ... * s_k for every step of the path."""
    out, acc = [], 1.0
    for s in scales:
        acc *= s
        out.append(acc)
    return out


def fold_factor(model_type: str, suffix: str, cumulative: float) -> float:
    """Factor by which the tensor ``suffix`` of a layer at cumulative scale ``cumulative`` is multiplied."""
    if cumulative == 1.0:
        return 1.0
    writers = RESIDUAL_WRITERS.get(model_type)
    if writers is None:
        raise MergeError(
            f"cannot fold data-flow scales into a '{model_type}' checkpoint exactly; supported model "
            f"types: {', '.join(sorted(RESIDUAL_WRITERS))} (set every path scale to 1.0 to stack "
            "layers of other architectures)")
    return 1.0 / cumulative if suffix in writers else 1.0
