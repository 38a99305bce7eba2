"""Running a resident candidate's jobs (:mod:`evomerge.resident.planning`) on their backends.

Every ``native`` job of the candidate goes to the native CPU kernel in one call (largest first: its
work items are taken in job order); the torch jobs follow, largest first (on CPU, interleaving tiny
kernels such as norms with large ones measured 1.6x slower over a whole model than running the tiny
ones last: OpenMP thread wake-ups). Returns which backend wrote each output tensor.
"""

from __future__ import annotations

import torch

from evomerge.errors import MergeError
from evomerge.methods import native
from evomerge.methods.backends import merge, run_linear, run_plan
from evomerge.resident.kernels import get_kernel


def _native_job(j) -> "native.NativeJob | None":
    if j.kind == "task_vector":
        return native.task_vector_job(j.out, j.inputs[0], list(j.inputs[1:]), j.plan)
    return native.linear_job(j.out, list(j.inputs), list(j.values))


def _device_scalars(jobs: list, device: torch.device) -> None:
    """SLERP coefficients (0-d host tensors) onto ``device`` in one copy."""
    slerps = [j for j in jobs if j.kind == "slerp"]
    if not slerps or device.type == "cpu":
        return
    moved = torch.stack([c for j in slerps for c in j.values]).pin_memory().to(device, non_blocking=True)
    for k, j in enumerate(slerps):
        j.values = (moved[2 * k], moved[2 * k + 1])


def run_jobs(jobs: list, sources, *, check_finite: bool) -> dict[str, str]:
    """Run ``jobs`` (targets on ``sources.device``); returns ``{output tensor: backend}``. A
    :class:`MergeError` naming the tensor when a merged value is not finite (with ``check_finite``)."""
    flags: list[tuple[str, torch.Tensor | bool]] = []
    batch = []
    for j in jobs:
        if j.backend == "native":
            nj = _native_job(j)
            if nj is not None:
                batch.append((j, nj))
                continue
            j.backend = "torch"  # the variant did not build (warned once): the eager kernels, same bits
    if batch:
        batch.sort(key=lambda t: -t[1].numel)
        flags += zip([j.name for j, _ in batch], native.run([nj for _, nj in batch]))
    rest = sorted((j for j in jobs if j.backend != "native"), key=lambda j: -j.out.numel())
    _device_scalars(rest, sources.device)
    with torch.no_grad():
        for j in rest:
            if j.kind == "copy":
                j.out.copy_(j.inputs[0])
            elif j.kind == "task_vector":
                flags.append((j.name, run_plan(j.plan, j.out, j.inputs[0], j.inputs[1:], j.backend)))
            elif j.kind == "linear":
                flags.append((j.name, run_linear(j.out, j.inputs, j.values, j.backend)))
            elif j.kind in ("slerp", "scale"):
                flags.append((j.name, get_kernel(j.kind, j.backend)(j.out, *j.inputs, *j.values)))
            elif j.kind == "reference":
                flags.append((j.name, _run_reference(j, sources.device)))
            else:  # compute: OutputTensor.compute on the resident inputs (raises if not finite)
                ot = j.call
                j.out.copy_(ot.compute(sources.device, inputs=[sources.tensor(r) for r in ot.refs()]).reshape(-1))
    if check_finite and flags:
        ok = torch.stack([torch.as_tensor(f).reshape(()) for _, f in flags])
        if not bool(ok.all()):
            bad = next(name for (name, _), f in zip(flags, ok.tolist()) if not f)
            raise MergeError(f"the merge produced non-finite values for tensor '{bad}'; check the "
                             "recipe's weights and densities")
    return {j.name: j.backend for j in jobs}


def _run_reference(j, device: torch.device) -> torch.Tensor:
    """The method's registered kernel on the resident tensors; the job reports the backend it chose."""
    spec, xs, base, params, seed = j.call
    gen = None
    if spec.stochastic:
        gen = torch.Generator(device=device)
        gen.manual_seed(seed)
    result = merge(spec, xs, base, generator=gen, **params)
    j.backend = result.backend
    j.out.copy_(result.tensor.view(-1))
    return torch.isfinite(result.tensor).all()
