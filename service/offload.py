"""The one way work leaves the event loop: `offload` runs a blocking call in a thread pool, in the context
(`contextvars`) of the request it serves, so that records logged there carry the request's id."""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Callable
from concurrent.futures import Executor
from typing import Any, TypeVar

T = TypeVar("T")


async def offload(
    executor: Executor | None,
    function: Callable[..., T],
    *args: Any,
    context: contextvars.Context | None = None,
) -> T:
    """`function(*args)` on `executor` (None: the event loop's default pool), awaited.

    It runs in `context` when given (a context no other thread is in, e.g. a queued request's own copy),
    else in a copy of the caller's.
    """
    if context is None:
        context = contextvars.copy_context()
    return await asyncio.get_running_loop().run_in_executor(executor, context.run, function, *args)
