"""Data-flow (DFS) search, as in Sakana's "Evolutionary Optimization of Model Merging Recipes":
params -> :class:`DataFlowRecipe`.

``M`` source models and ``r`` repetitions give ``T = r * (L_1 + ... + L_M)`` layer slots in the order
(all layers of model 1, all layers of model 2, ...) repeated ``r`` times. Each slot has a continuous
indicator in ``[-1, 1]``; the slot's layer is on the path when its indicator is ``> 0``, in slot
order. An ``M x M`` scale matrix ``W`` gives each path step's input scale: step ``k`` running a
layer of model ``i`` after a layer of model ``j`` (for the first step: after the embeddings of the
``embed`` model) gets ``scale = W[i, j]`` (dimension ``scale.<i>.<j>``), folded into the weights by
:mod:`evomerge.dataflow`.

Constraints:

* ``first_layers: k``: the path always starts with layers ``0..k-1`` of the ``embed`` model, and
  ``last_layers: k``: it always ends with the last ``k`` layers of the ``head`` model. These forced
  layers have no indicator; their slots in the first (last) repetition are dropped.
* ``max_depth: D``: when more than ``D`` layers are on the path, the searched ones with the largest
  indicators are kept (order preserved) so the path has ``D`` steps.
* an empty path is never produced: with no indicator above 0 and no forced layers the slot with
  the largest indicator is used.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from evomerge.recipe import DataFlowRecipe, PathStep
from evomerge.search.dims import Dim

INDICATOR_LOW, INDICATOR_HIGH = -1.0, 1.0


@dataclass(frozen=True)
class DFSSpace:
    models: tuple[tuple[str, str], ...]  # (name, model ref)
    layers: tuple[int, ...]  # layer count of each model
    repeats: int = 1
    embed: int = 0  # index into models
    head: int = 0
    scale: tuple[float, float] | None = (0.5, 2.0)  # None: every scale is 1
    first_layers: int = 0
    last_layers: int = 0
    max_depth: int | None = None
    dtype: str | None = None

    def forced_first(self) -> list[tuple[int, int]]:
        return [(self.embed, i) for i in range(self.first_layers)]

    def forced_last(self) -> list[tuple[int, int]]:
        n = self.layers[self.head]
        return [(self.head, i) for i in range(n - self.last_layers, n)]

    def slots(self) -> list[tuple[int, int, int]]:
        """Searched slots ``(repetition, model index, layer)`` in path order."""
        first, last = set(self.forced_first()), set(self.forced_last())
        out = []
        for rep in range(self.repeats):
            for m, n in enumerate(self.layers):
                for i in range(n):
                    if rep == 0 and (m, i) in first or rep == self.repeats - 1 and (m, i) in last:
                        continue
                    out.append((rep, m, i))
        return out

    def slot_name(self, slot: tuple[int, int, int]) -> str:
        rep, m, i = slot
        return f"ind.r{rep}.{self.models[m][0]}.{i}"

    def scale_name(self, i: int, j: int) -> str:
        return f"scale.{self.models[i][0]}.{self.models[j][0]}"

    def dims(self) -> list[Dim]:
        dims = []
        for slot in self.slots():
            # untuned point: the embed model's own layers once (the source alone)
            on = slot[0] == 0 and slot[1] == self.embed
            dims.append(Dim(self.slot_name(slot), "float", INDICATOR_LOW, INDICATOR_HIGH,
                            default=0.5 if on else -0.5))
        if self.scale is not None:
            for i in range(len(self.models)):
                for j in range(len(self.models)):
                    dims.append(Dim(self.scale_name(i, j), "float", *self.scale, default=1.0))
        return dims

    def path(self, params: dict[str, Any]) -> list[tuple[int, int]]:
        """``(model index, layer)`` of every step of the decoded path."""
        slots = self.slots()
        values = [float(params[self.slot_name(s)]) for s in slots]
        chosen = [k for k, v in enumerate(values) if v > 0]
        head, tail = self.forced_first(), self.forced_last()
        room = None if self.max_depth is None else max(self.max_depth - len(head) - len(tail), 0)
        if room is not None and len(chosen) > room:
            keep = sorted(chosen, key=lambda k: (-values[k], k))[:room]
            chosen = sorted(keep)
        if not chosen and not head and not tail and slots:
            chosen = [max(range(len(slots)), key=lambda k: (values[k], -k))]
        return head + [(slots[k][1], slots[k][2]) for k in chosen] + tail

    def decode(self, params: dict[str, Any]) -> DataFlowRecipe:
        """The recipe of one point of this space (a pure function of ``params``)."""
        steps = []
        prev = self.embed
        for m, i in self.path(params):
            scale = 1.0 if self.scale is None else float(params[self.scale_name(m, prev)])
            steps.append(PathStep(model=self.models[m][1], layer=i, scale=scale))
            prev = m
        return DataFlowRecipe(kind="dataflow", path=steps, embed=self.models[self.embed][1],
                              head=self.models[self.head][1], dtype=self.dtype)

    def default_params(self) -> dict[str, Any]:
        return {d.name: d.default_value() for d in self.dims()}
