"""Adaptive batching: concurrent requests for one model version are merged into one onnxruntime run.

Why it is exact. The graphs served normalize with frozen statistics, `y = gamma*(x - moving_mean)/
sqrt(moving_var + eps) + beta`, so each sample's output depends on that sample alone: running requests
`x1: (n1, *s)`, `x2: (n2, *s)`, ... as one `concatenate([x1, x2, ...]): (n1 + n2 + ..., *s)` and slicing the
outputs back at the offsets `0, n1, n1 + n2, ...` gives every request what it would have got alone (the
service's tests check it bit for bit). A model that normalized with batch statistics would mix its requests'
samples, which is why such models are refused at load.

How. One queue per model version, shape signature and outputs asked for, on the event loop. A request
joins the queue of its `merge_key`; a collector task takes what is queued, at most `max_batch_size`
samples and at most `max_batch_elements` input elements (the server's `BN_SERVE_MAX_BATCH_ELEMENTS`,
which bounds the memory one merged run takes: its concatenated inputs and its outputs), runs it once and
resolves each request's future with its slice; what does not fit waits for the next run. No latency is
added at low load: a lone request runs at once. Queued, it costs a future, a task and a turn of the
event loop, in which requests that arrived together join it (the collector yields to the loop once before
its first run). With `max_batch_delay_us` 0 (the default) that turn is only paid while it buys something:
once a queued request found no companion in its turn, the next `PROBE_EVERY` requests of its model that
find nothing queued or running run directly, without a future, a task or a turn of the loop, and the one
after them queues again to look; as soon as a turn brings companions, requests queue again. Under
concurrent load, once more than one is queued, the collector waits for the batch to fill for at most
`max_batch_delay_us` after the oldest request arrived; meanwhile, requests arriving during a run queue up
and go in the next one, so batches grow with the load by themselves.

Errors stay with their request. Invalid requests are refused by `InferenceCore.prepare` before they queue.
When a merged run fails, each of its requests is run again alone, so each gets its own answer or error.

Per-model settings. `DIR/<name>/config.json` beside the version directories overrides the server's
defaults for that model, e.g. `{"max_batch_size": 64, "max_batch_delay_us": 500}`; either key may be left
out. `max_batch_size` 1 turns merging off for the model. The file is read and validated when the model
loads (`read_policy`): a bad one refuses the load, and the policy is part of the loaded model.

Context. Each request's runs happen in its own context (`contextvars`): a run alone in the request's, a
merged run in the first request's with `service.log.batch_request_ids` naming every request in it, so
that a record logged during a run, on the event loop or in the pool, carries the ids of its requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import itertools
import json
import logging
from collections import deque
from collections.abc import Callable, Hashable, Iterator
from concurrent.futures import Executor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
from numpy.typing import NDArray

from service.errors import ModelLoadError, ServiceError
from service.log import batch_request_ids, request_id
from service.offload import offload
from service.repository import ModelVersion
from service.symlinks import check_inside

if TYPE_CHECKING:
    from service.inference import InferenceCore, InferResponse, PreparedRequest
    from service.model import LoadedModel

log = logging.getLogger("bn_serve")

CONFIG_FILE = "config.json"
# Runs on at most this many input elements go on the event loop itself: for them, handing the run to a
# thread and back (two context switches; measured in benchmarks/README.md) costs more than the run.
INLINE_MAX_ELEMENTS = 16 * 1024

# With no batching delay, a request queued alone (its turn of the loop brought no companion) lets this many
# lone requests of its model run at once before one queues again to look for companions.
PROBE_EVERY = 32

T = TypeVar("T")


@dataclass(frozen=True)
class BatchPolicy:
    """How requests for one model are merged: at most `max_batch_size` samples (axis 0) per run, waiting
    at most `max_batch_delay_us` for a batch to fill once more than one request is queued."""

    max_batch_size: int = 1
    max_batch_delay_us: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.max_batch_size, bool) or not isinstance(self.max_batch_size, int):
            raise TypeError(f"max_batch_size must be an integer, got {self.max_batch_size!r}")
        if isinstance(self.max_batch_delay_us, bool) or not isinstance(self.max_batch_delay_us, int):
            raise TypeError(f"max_batch_delay_us must be an integer, got {self.max_batch_delay_us!r}")
        if self.max_batch_size < 1:
            raise ValueError(
                f"max_batch_size must be at least 1 (1 turns batching off), got {self.max_batch_size}"
            )
        if self.max_batch_delay_us < 0:
            raise ValueError(f"max_batch_delay_us must be at least 0, got {self.max_batch_delay_us}")

    @property
    def enabled(self) -> bool:
        return self.max_batch_size > 1


def model_directory(entry: ModelVersion) -> Path | None:
    """`DIR/<name>` of a repository entry (`DIR/<name>/<version>/model.onnx`); None for a single file."""
    return entry.model_directory


def read_policy(
    model_dir: Path | None,
    default: BatchPolicy,
    name: str | None = None,
    *,
    follow_symlinks: bool = False,
) -> BatchPolicy:
    """The policy of the model in `model_dir` (named `name`): `default` overridden by its `config.json`.

    Read once, when the model loads. Raises `ModelLoadError` for a file that is not a JSON object of known,
    valid keys: a typo must not silently leave batching at the server's default. The message names the
    model's `config.json`, never its path on the server, and never quotes the file: it may be a link to a
    file that is not the operator's to show (`service.symlinks`).
    """
    if model_dir is None:
        return default
    path = model_dir / CONFIG_FILE
    what = f"{name or model_dir.name}/{CONFIG_FILE}"
    if path.is_symlink() or path.exists():
        check_inside(path, model_dir.parent, follow_symlinks=follow_symlinks)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return default
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        raise ModelLoadError(f"cannot read {what}: {reason}") from None
    try:
        document = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ModelLoadError(f"{what} is not valid JSON: {exc}") from None
    known = ("max_batch_size", "max_batch_delay_us")
    if not isinstance(document, dict) or set(document) - set(known):
        raise ModelLoadError(f"{what} must be a JSON object with keys among {', '.join(known)}")
    values = {key: document.get(key, getattr(default, key)) for key in known}
    try:
        return BatchPolicy(**values)
    except (TypeError, ValueError):
        raise ModelLoadError(
            f"{what}: max_batch_size must be an integer of at least 1, max_batch_delay_us one of at least 0"
        ) from None


def merge_key(prepared: PreparedRequest) -> Hashable | None:
    """What requests must share to run together, or None when this one cannot be merged.

    Mergeable: every model input has a dynamic axis 0 and every fed array the same size on it. The key is
    the session, the outputs asked for, and each input's name, dtype and non-batch dimensions.
    """
    if not prepared.model.session.batchable:
        return None
    signature = []
    batch = None
    for name, array in prepared.feeds.items():
        if array.ndim == 0 or (batch is not None and array.shape[0] != batch):
            return None
        batch = array.shape[0]
        signature.append((name, array.dtype.str, array.shape[1:]))
    return id(prepared.model), tuple(prepared.output_names), tuple(signature)


def batch_size(prepared: PreparedRequest) -> int:
    """Samples in the request: axis 0 of its inputs (they agree once `merge_key` is not None)."""
    return int(next(iter(prepared.feeds.values())).shape[0])


def input_elements(prepared: PreparedRequest) -> int:
    """Tensor elements of the request's inputs, all together."""
    feeds = prepared.feeds
    if len(feeds) == 1:
        return int(next(iter(feeds.values())).size)
    return sum(array.size for array in feeds.values())


@dataclass
class _Pending:
    prepared: PreparedRequest
    samples: int
    elements: int
    future: asyncio.Future[InferResponse]
    arrived: float
    context: contextvars.Context  # the request's, copied when it queued: its runs happen in it


@dataclass
class _Queue:
    policy: BatchPolicy
    items: deque[_Pending] = field(default_factory=deque)
    samples: int = 0
    elements: int = 0
    collecting: bool = False
    filled: asyncio.Event | None = None  # set while the collector waits for the batch to fill


class Batcher:
    """Runs prepared requests on `core`: merged per `merge_key` where the model's policy allows, else alone.

    Each loaded model carries its policy (the server's, overridden by its `config.json`); `policy`, when
    given, applies to every model instead (to compare policies on one core). Used from the event loop's
    thread only. A merged run holds at most `max_batch_elements` input elements (None: no bound beyond
    `max_batch_size`); a request that reaches it runs alone. Runs of more than `inline_max_elements` input
    elements go to `executor` (onnxruntime releases the GIL there); smaller ones run on the loop.
    """

    def __init__(
        self,
        core: InferenceCore,
        executor: Executor,
        policy: BatchPolicy | None = None,
        *,
        max_batch_elements: int | None = None,
        inline_max_elements: int = INLINE_MAX_ELEMENTS,
    ) -> None:
        if max_batch_elements is not None and max_batch_elements < 1:
            raise ValueError(f"max_batch_elements must be at least 1 or None, got {max_batch_elements}")
        self._core = core
        self._max_batch_elements = max_batch_elements
        self._executor = executor
        self._policy = policy
        self._inline_max_elements = inline_max_elements
        self._queues: dict[Hashable, _Queue] = {}
        self._tasks: set[asyncio.Task[None]] = set()  # strong references: the loop keeps only weak ones
        # Requests of each loaded model (by `id`: held models stay alive) queued or running, merged or not.
        self._held: dict[int, int] = {}
        # Per loaded model (by `id`), lone requests left to run at once: set when a queued request found no
        # companion in its turn of the loop, cleared when one did (see `infer`).
        self._direct: dict[int, int] = {}
        self.direct_runs = 0  # requests run at once, without queueing
        self.runs = 0  # onnxruntime runs made, merged or alone: requests / runs is the mean merge

    def policy_of(self, model: LoadedModel) -> BatchPolicy:
        """The policy `model`'s requests merge by: the batcher's own when it has one, else the model's."""
        return self._policy or model.policy

    async def infer(self, prepared: PreparedRequest) -> InferResponse:
        """`prepared`'s response, from a merged run when one is possible; raises as `InferenceCore.run`."""
        model = prepared.model
        policy = self._policy or model.policy
        if not policy.enabled:
            return await self._alone(prepared)
        held = self._held.get(id(model), 0)
        direct = self._direct.get(id(model), 0)
        if held == 0 and direct and policy.max_batch_delay_us == 0:
            # Nothing of this model is queued or running, the policy holds no request back, and the last
            # queued request found no companion: the request runs at once (on the loop when small: no
            # future, no task, no turn of the loop). One that arrives while this run is in the pool finds
            # it held and queues. Every `PROBE_EVERY`th goes through the queue again, to see whether
            # requests arrive together once more.
            self._direct[id(model)] = direct - 1
            self.direct_runs += 1
            self._held[id(model)] = 1
            try:
                return await self._alone(prepared)
            finally:
                self._release(id(model))
        key = merge_key(prepared)
        if key is None:
            return await self._alone(prepared)
        samples = batch_size(prepared)
        elements = input_elements(prepared)
        if samples >= policy.max_batch_size or self._full(elements):
            return await self._alone(prepared)  # nothing could join it
        loop = asyncio.get_running_loop()
        queue = self._queues.get(key)
        if queue is None:
            queue = self._queues[key] = _Queue(policy)
        context = contextvars.copy_context()
        pending = _Pending(prepared, samples, elements, loop.create_future(), loop.time(), context)
        queue.items.append(pending)
        queue.samples += samples
        queue.elements += elements
        if not queue.collecting:
            queue.collecting = True
            task = loop.create_task(self._collect(key, queue))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        elif queue.filled is not None and (
            queue.samples >= policy.max_batch_size or self._full(queue.elements)
        ):
            queue.filled.set()
        self._held[id(model)] = held + 1
        try:
            return await pending.future
        finally:
            self._release(id(model))

    def runs_alone(self, prepared: PreparedRequest) -> bool:
        """Whether nothing could ever join `prepared` in a merged run (its policy merges nothing, its
        inputs do not merge, or it fills a run by itself): `infer` runs it alone whatever is queued. Reads
        no state of the queues: callable from any thread."""
        policy = self._policy or prepared.model.policy
        if not policy.enabled or merge_key(prepared) is None:
            return True
        return batch_size(prepared) >= policy.max_batch_size or self._full(input_elements(prepared))

    @contextlib.contextmanager
    def running_alone(self, model: LoadedModel) -> Iterator[bool]:
        """Whether a request of `model` arriving now runs alone at once, as `infer` would run it: its
        policy merges nothing, or nothing of the model is queued or running, the policy holds no request
        back and the last queued one found no companion. While the block runs, such a request counts as
        running (a request arriving meanwhile queues, as behind any lone run) and, unless the block raises,
        as one run. For a caller that runs the request itself: a large one, decoded and run in one trip to
        the pool (`service.infer_route`)."""
        policy = self._policy or model.policy
        if not policy.enabled:
            yield True
            self.runs += 1
            return
        key = id(model)
        direct = self._direct.get(key, 0)
        if key in self._held or not direct or policy.max_batch_delay_us:
            yield False
            return
        self._direct[key] = direct - 1
        self._held[key] = 1
        try:
            yield True
        finally:
            self._release(key)
        self.direct_runs += 1
        self.runs += 1

    def _release(self, model_id: int) -> None:
        """One request of the model `model_id` (an `id`, valid while it is held) is answered."""
        left = self._held[model_id] - 1
        if left:
            self._held[model_id] = left
        else:
            del self._held[model_id]

    async def _collect(self, key: Hashable, queue: _Queue) -> None:
        policy = queue.policy
        try:
            # One turn of the loop: requests that arrived in the same read share the first run.
            await asyncio.sleep(0)
            while queue.items:
                if (
                    len(queue.items) > 1
                    and queue.samples < policy.max_batch_size
                    and not self._full(queue.elements)
                    and policy.max_batch_delay_us
                ):
                    await self._wait_to_fill(queue)
                batch = self._take(queue)
                if policy.max_batch_delay_us == 0:
                    # Merging found a companion, or nothing came with the request: lone ones run at once.
                    alone = len(batch) == 1 and not queue.items
                    self._direct[id(batch[0].prepared.model)] = PROBE_EVERY if alone else 0
                await self._run_batch(batch)
        except BaseException as exc:  # the collector itself failed: no queued request may hang on it
            for pending in queue.items:
                if pending.future.done():
                    continue
                if isinstance(exc, Exception):
                    pending.future.set_exception(exc)
                else:
                    pending.future.cancel()
            queue.items.clear()
            raise
        finally:
            queue.collecting = False
            if self._queues.get(key) is queue and not queue.items:
                del self._queues[key]

    async def _wait_to_fill(self, queue: _Queue) -> None:
        loop = asyncio.get_running_loop()
        remaining = queue.items[0].arrived + queue.policy.max_batch_delay_us * 1e-6 - loop.time()
        if remaining <= 0:
            return
        queue.filled = asyncio.Event()
        try:
            await asyncio.wait_for(queue.filled.wait(), remaining)
        except TimeoutError:
            pass
        finally:
            queue.filled = None

    def _full(self, elements: int) -> bool:
        """Whether `elements` input elements fill a merged run: nothing more may join them."""
        return self._max_batch_elements is not None and elements >= self._max_batch_elements

    def _take(self, queue: _Queue) -> list[_Pending]:
        """The oldest requests whose samples and elements fit in one run (always at least one), in arrival
        order; the rest wait for the next run."""
        batch = [queue.items.popleft()]
        total, elements = batch[0].samples, batch[0].elements
        limit = self._max_batch_elements
        while queue.items:
            head = queue.items[0]
            if total + head.samples > queue.policy.max_batch_size or (
                limit is not None and elements + head.elements > limit
            ):
                break
            batch.append(queue.items.popleft())
            total += head.samples
            elements += head.elements
        queue.samples -= total
        queue.elements -= elements
        return batch

    async def _run_batch(self, batch: list[_Pending]) -> None:
        # A client that went away cancelled its future: its samples are not computed for nobody.
        live = [p for p in batch if not p.future.done()]
        if len(live) == 1:
            await self._settle(live[0])
            return
        if not live:
            return
        first = live[0].prepared
        feeds = {name: np.concatenate([p.prepared.feeds[name] for p in live]) for name in first.feeds}
        context = live[0].context.copy()
        context.run(batch_request_ids.set, tuple(p.context.get(request_id) for p in live))
        try:
            outputs = await self._call(
                sum(p.elements for p in live),
                context,
                self._core.run,
                first.model,
                first.output_names,
                feeds,
                len(live),
            )
            parts = split_outputs(outputs, [p.samples for p in live])
        except Exception as exc:  # any failure of the merged run: each request is retried alone
            context.run(
                log.warning, "a merged run of %d requests failed (%s); running each alone", len(live), exc
            )
            for pending in live:
                await self._settle(pending)
            return
        for pending, part in zip(live, parts, strict=True):
            if not pending.future.done():
                pending.future.set_result(pending.prepared.response(part))

    async def _settle(self, pending: _Pending) -> None:
        try:
            response = await self._alone(pending.prepared, pending.context)
        except Exception as exc:  # handed to the one request it concerns
            if not pending.future.done():
                pending.future.set_exception(exc)
            return
        if not pending.future.done():
            pending.future.set_result(response)

    async def _alone(
        self, prepared: PreparedRequest, context: contextvars.Context | None = None
    ) -> InferResponse:
        """`prepared` run alone, in `context` (None: the caller's, the request's own task)."""
        elements = input_elements(prepared)
        if elements <= self._inline_max_elements and context is None:
            self.runs += 1
            return prepared.response(self._core.run(prepared.model, prepared.output_names, prepared.feeds))
        outputs = await self._call(
            elements, context, self._core.run, prepared.model, prepared.output_names, prepared.feeds
        )
        return prepared.response(outputs)

    async def _call(
        self, elements: int, context: contextvars.Context | None, function: Callable[..., T], *args: Any
    ) -> T:
        self.runs += 1
        if elements <= self._inline_max_elements:
            return function(*args) if context is None else context.run(function, *args)
        return await offload(self._executor, function, *args, context=context)


def split_outputs(outputs: list[NDArray[Any]], sizes: list[int]) -> list[list[NDArray[Any]]]:
    """Each request's slice of every output, at the offsets of `sizes` along axis 0.

    Raises `ServiceError` when an output does not have one row per merged sample (a model whose outputs are
    not per-sample cannot be split; its requests are then run alone).
    """
    total = sum(sizes)
    for array in outputs:
        if array.ndim == 0 or array.shape[0] != total:
            raise ServiceError(f"an output of shape {list(array.shape)} has no row per sample of {total}")
    offsets = np.cumsum([0, *sizes]).tolist()
    return [[array[start:stop] for array in outputs] for start, stop in itertools.pairwise(offsets)]
