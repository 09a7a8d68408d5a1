"""The engine thread: one thread owns the model and runs continuous batching for the server.

The event loop ``submit`` s requests and gets a :class:`Ticket` each; the request's records (the
library's ``BatchChunk`` s, the last with a finish reason, or a ``BatchFailure``, or an
:class:`EngineStopped`) arrive on the ticket's asyncio queue, put there from the engine thread
with ``loop.call_soon_threadsafe``. Requests wait in a bounded queue while the batch is full (a
full queue refuses more: 503). Between decode steps the thread takes new requests and
cancellations: a cancelled request (its client went away) leaves the batch before the next step.

A request starts from the session its ``BatchRequest`` carries (None: a fresh document: then
from the longest prefix of its prompt in the server's ``PrefixCache``, if it has one).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import queue
import threading
from collections import deque
from dataclasses import dataclass, field

from rwkv_cli.batching.generate import BatchChunk, BatchFailure, BatchRequest, ContinuousBatch
from rwkv_cli.models import Model
from rwkv_cli.serve.errors import Overloaded
from rwkv_cli.settings import DEFAULT_MAX_BATCH
from rwkv_cli.statecache import PrefixCache
from rwkv_cli.tokenizer.base import Tokenizer

logger = logging.getLogger(__name__)

# Requests that may wait for a place beyond a full batch. Each waits for a whole reply of the
# ones before it to finish; past a few batches' worth a client does better to retry later (503).
MAX_WAITING = 64


@dataclass(frozen=True)
class EngineStopped:
    """The last record of a request the engine gave up: the server is stopping (``error``
    None: the reply ends where it is), or the engine failed while it ran (the error, in words)."""

    error: str | None = None


Record = BatchChunk | BatchFailure | EngineStopped  # what a ticket receives


def is_last(record: Record) -> bool:
    """Whether ``record`` is the last its request gets."""
    return not isinstance(record, BatchChunk) or record.chunk.finish_reason is not None


@dataclass
class Ticket:
    """A submitted request: its key, and the queue its records arrive on."""

    key: int
    loop: asyncio.AbstractEventLoop
    records: asyncio.Queue = field(default_factory=asyncio.Queue)

    def deliver(self, record: Record) -> None:
        """Put ``record`` on the queue, from any thread."""
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
            self.loop.call_soon_threadsafe(self.records.put_nowait, record)


class Scheduler:
    """Runs every request of the server through one :class:`ContinuousBatch` on its own thread.

    ``submit`` and ``cancel`` are called from the event loop; everything else about the batch
    happens on the engine thread. ``start`` starts it, ``stop`` asks it to end every request and
    exit (callable from a signal handler), ``close`` also waits for that.
    """

    def __init__(
        self,
        model: Model,
        tokenizer: Tokenizer,
        max_batch: int = DEFAULT_MAX_BATCH,
        max_waiting: int = MAX_WAITING,
        cache: PrefixCache | None = None,
    ) -> None:
        self.model, self.tokenizer, self.cache = model, tokenizer, cache
        self.max_batch, self.max_waiting = max_batch, max_waiting
        self._engine = self._new_engine()
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._keys = itertools.count()
        self._lock = threading.Lock()  # guards the two fields below
        self._queued = 0  # submitted and not in the engine yet
        self._stopping = False
        # The engine thread's own: requests waiting for a place, and those in the engine.
        self._waiting: deque[tuple[Ticket, BatchRequest]] = deque()
        self._tickets: dict[int, Ticket] = {}
        self._thread = threading.Thread(target=self._run, name="rwkv-engine", daemon=True)

    @property
    def active(self) -> int:
        """Requests in the engine now (reading their prompt or decoding)."""
        return len(self._engine)

    def start(self) -> None:
        if not self._thread.is_alive():
            self._thread.start()

    def submit(self, request: BatchRequest) -> Ticket:
        """Queue ``request`` (from the event loop); 503 when the queue is full or stopping."""
        with self._lock:
            if self._stopping:
                raise Overloaded("the server is stopping", code="server_stopping")
            if self._queued >= self.max_waiting:
                raise Overloaded(
                    f"the server is busy: {self._queued} requests wait for a place already; "
                    "try again shortly",
                    code="queue_full",
                )
            self._queued += 1
        ticket = Ticket(next(self._keys), asyncio.get_running_loop())
        self._inbox.put(("submit", ticket, request))
        return ticket

    def cancel(self, ticket: Ticket) -> None:
        """Drop ``ticket``'s request (its client went away): it leaves before the next step."""
        self._inbox.put(("cancel", ticket.key))

    def stop(self) -> None:
        """Refuse new requests and end the running ones where they are; returns at once."""
        with self._lock:
            self._stopping = True
        self._inbox.put(("stop",))

    def close(self) -> None:
        """``stop``, and wait for the engine thread to finish its step and exit."""
        self.stop()
        if self._thread.is_alive():
            self._thread.join()

    # --- the engine thread ---------------------------------------------------------------------

    def _run(self) -> None:
        while self._take_messages():
            try:
                self._admit()
                records = self._engine.step() if self._engine else []
            except Exception as error:  # a bug or a device failure: its requests fail, not us
                logger.exception("the engine failed; its requests end with an error")
                self._end_all(EngineStopped(f"{type(error).__name__}: {error}"), waiting=False)
                self._engine = self._new_engine()
                continue
            for record in records:
                ticket = self._tickets.get(record.index)
                if ticket is not None:
                    ticket.deliver(record)
                    if is_last(record):
                        del self._tickets[record.index]
        self._end_all(EngineStopped(), waiting=True)

    def _new_engine(self) -> ContinuousBatch:
        return ContinuousBatch(self.model, self.tokenizer, self.max_batch, self.cache)

    def _take_messages(self) -> bool:
        """Handle the messages that came in (waiting for one when there is no work); False
        once asked to stop."""
        idle = not self._engine and not self._waiting
        messages = [self._inbox.get()] if idle else []
        with contextlib.suppress(queue.Empty):
            while True:
                messages.append(self._inbox.get_nowait())
        for kind, *arguments in messages:
            if kind == "stop":
                return False
            if kind == "submit":
                self._waiting.append(tuple(arguments))
            else:
                self._drop(*arguments)
        return True

    def _drop(self, key: int) -> None:
        """Cancel request ``key``, waiting or in the engine."""
        for entry in self._waiting:
            if entry[0].key == key:
                self._waiting.remove(entry)
                self._count_out()
                return
        if self._tickets.pop(key, None) is not None:
            self._engine.cancel(key)

    def _admit(self) -> None:
        """Move waiting requests into the engine while it has room."""
        while self._waiting and self._engine.has_room:
            ticket, request = self._waiting.popleft()
            self._count_out()
            self._tickets[ticket.key] = ticket
            failure = self._engine.join(ticket.key, request)
            if failure is not None:
                del self._tickets[ticket.key]
                ticket.deliver(failure)

    def _count_out(self) -> None:
        with self._lock:
            self._queued -= 1

    def _end_all(self, record: EngineStopped, waiting: bool) -> None:
        """Give every request in the engine (and the waiting ones, if ``waiting``) ``record``."""
        ended = list(self._tickets.values())
        self._tickets.clear()
        if waiting:
            ended += [ticket for ticket, _ in self._waiting]
            self._waiting.clear()
        for ticket in ended:
            ticket.deliver(record)
