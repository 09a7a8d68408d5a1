"""Batch jobs: JSON lines in, one JSON record out per line, as ``rwkv batch`` runs them.

Each input line is ``{"id": ..., "prompt": "..."}`` or ``{"id": ..., "messages": [{"role": ...,
"content": ...}, ...]}`` (written out with a chat template, as ``rwkv chat`` writes its turns),
with optional fields that override the run's defaults: ``max_tokens``, the sampling parameters,
``seed`` and ``stop`` (a string or a list). ``read_jobs`` turns lines into :class:`Job` s,
``run_jobs`` generates them through one batch (``generate_batch``) and yields a record per line
as it finishes: ``{"id", "text", "finish_reason", "prompt_tokens", "completion_tokens"}``, or
``{"id", "line", "error": {"message"}}`` for a line that could not be run.

A line without a seed under a run seed gets ``line_seed(run seed, id)``: the same line gives the
same text in every run, whatever its position and whatever else is in the batch.

:class:`RecordFile` appends each record as one whole line (one ``os.write`` to a file opened for
appending), so a run that is interrupted or killed leaves only whole lines; ``finished_ids``
reads them back, and a rerun skips the ids already finished (lines that failed are tried again).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import sys
from collections.abc import Callable, Collection, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rwkv_cli.batching.generate import BatchFailure, BatchRequest, BatchResult, generate_batch
from rwkv_cli.chat import reply_request
from rwkv_cli.errors import InvalidInputError, RwkvCliError, WriteError
from rwkv_cli.fileio import lock_now
from rwkv_cli.generation import Session
from rwkv_cli.loading.loaded import LoadedModel
from rwkv_cli.settings import DEFAULT_MAX_BATCH, MAX_SEED, SamplingParams
from rwkv_cli.templates import Template
from rwkv_cli.textio import OutputClosedError

SAMPLING_FIELDS = tuple(field.name for field in dataclasses.fields(SamplingParams))
LINE_FIELDS = ("id", "prompt", "messages", "max_tokens", "seed", "stop", *SAMPLING_FIELDS)
ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class JobDefaults:
    """What a line does not set itself: the run's options, the shared starting session (e.g. a
    system prompt read once) and the template that writes out ``messages``."""

    params: SamplingParams
    max_tokens: int
    template: Template
    stop: tuple[str, ...] = ()
    seed: int | None = None  # the run's seed: a line without one gets line_seed(seed, id)
    session: Session | None = None
    think: bool = False


@dataclass(frozen=True)
class Job:
    """One input line: a request to run, or the reason it cannot run (``error``)."""

    line: int  # 1-based line number in the input
    id: str | int | None  # None where the line gave no usable id
    request: BatchRequest | None = None
    error: str | None = None


class _LineError(ValueError):
    """What is wrong with an input line (its error record's message)."""


def id_key(value: str | int) -> str:
    """An id as a set key: ``1`` and ``"1"`` are different ids."""
    return json.dumps(value)


def line_seed(run_seed: int, line_id: str | int) -> int:
    """The seed of a line that gives none, under the run's seed: the first 8 bytes of
    SHA-256("<run seed>:<id as JSON>"), so it depends on the id only, not on the line's place."""
    digest = hashlib.sha256(f"{run_seed}:{id_key(line_id)}".encode()).digest()
    return int.from_bytes(digest[:8], "big")  # 0 ... 2**64 - 1 = MAX_SEED


def read_jobs(
    lines: Iterable[bytes],
    loaded: LoadedModel,
    defaults: JobDefaults,
    skip: Collection[str] = frozenset(),
) -> Iterator[Job]:
    """A job per non-blank input line, lazily; lines whose id is in ``skip`` (``id_key``s of
    records already finished) are left out. A later line with an id seen before is an error."""
    seen: set[str] = set()
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        line_id = None
        try:
            fields = _parse(raw)
            line_id = _checked_id(fields)
            key = id_key(line_id)
            if key in seen:
                raise _LineError(f"duplicate id {key}: an earlier line has it")
            seen.add(key)
            if key in skip:
                continue
            yield Job(number, line_id, request=_request(fields, loaded, defaults))
        except (_LineError, RwkvCliError) as error:
            yield Job(number, line_id, error=str(error))


def _parse(raw: bytes) -> dict[str, Any]:
    try:
        fields = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise _LineError("the line is not UTF-8 text") from None
    except json.JSONDecodeError as error:
        raise _LineError(f"not JSON: {error.msg} (column {error.colno})") from None
    if not isinstance(fields, dict):
        raise _LineError('not a JSON object: give {"id": ..., "prompt": ...}')
    try:  # JSON may spell a lone surrogate (\ud800), which no text holds
        json.dumps(fields, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise _LineError("a string holds a lone surrogate escape (\\ud800 to \\udfff)") from None
    return fields


def _checked_id(fields: dict[str, Any]) -> str | int:
    line_id = fields.get("id")
    if isinstance(line_id, bool) or not isinstance(line_id, (str, int)):
        raise _LineError('"id" must be a string or an integer')
    return line_id


def _request(fields: dict[str, Any], loaded: LoadedModel, defaults: JobDefaults) -> BatchRequest:
    """The request a line asks for, its fields over ``defaults``."""
    unknown = sorted(set(fields) - set(LINE_FIELDS))
    if unknown:
        raise _LineError(f"unknown field(s) {', '.join(unknown)}; known: {', '.join(LINE_FIELDS)}")
    if ("prompt" in fields) == ("messages" in fields):
        raise _LineError('give either "prompt" or "messages"')
    sampling = {name: fields[name] for name in SAMPLING_FIELDS if name in fields}
    params = dataclasses.replace(defaults.params, **sampling).validated()
    stop = (*defaults.stop, *_stops(fields.get("stop", [])))
    common = {
        "max_tokens": _integer(fields, "max_tokens", defaults.max_tokens, 0, None),
        "params": params,
        "seed": _seed(fields, defaults.seed, fields["id"]),
    }
    if "prompt" in fields:
        if not isinstance(fields["prompt"], str):
            raise _LineError('"prompt" must be a string')
        return BatchRequest(fields["prompt"], stop=stop, session=defaults.session, **common)
    return reply_request(
        loaded.tokenizer,
        defaults.template,
        _messages(fields["messages"]),
        think=defaults.think,
        session=defaults.session,
        stop=stop,
        **common,
    )


def _integer(fields: dict[str, Any], name: str, default: int | None, low: int, high: int | None):
    value = fields.get(name, default)
    if name in fields and (
        isinstance(value, bool)
        or not isinstance(value, int)
        or value < low
        or (high is not None and value > high)
    ):
        top = "" if high is None else f" to {high}"
        raise _LineError(f'"{name}" must be an integer from {low}{top}, got {value!r}')
    return value


def _seed(fields: dict[str, Any], run_seed: int | None, line_id: str | int) -> int | None:
    if "seed" in fields:
        return _integer(fields, "seed", None, 0, MAX_SEED)
    return None if run_seed is None else line_seed(run_seed, line_id)


def _stops(value: Any) -> tuple[str, ...]:
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(stop, str) and stop for stop in stops):
        raise _LineError('"stop" must be a non-empty string or a list of them')
    return tuple(stops)


def _messages(value: Any) -> list[tuple[str, str]]:
    if not isinstance(value, list) or not value:
        raise _LineError('"messages" must be a non-empty list of {"role", "content"} objects')
    messages = []
    for index, message in enumerate(value):
        if not isinstance(message, dict) or set(message) != {"role", "content"}:
            raise _LineError(f'message {index + 1} must be an object with "role" and "content"')
        role, content = message["role"], message["content"]
        if role not in ROLES or not isinstance(content, str):
            raise _LineError(
                f"message {index + 1}: the role is one of {', '.join(ROLES)}, the content a string"
            )
        if role == "system" and index > 0:
            raise _LineError("a system message can only come first")
        messages.append((role, content))
    if messages[-1][0] != "user":
        raise _LineError("the last message must be the user's: the reply follows it")
    return messages


@dataclass
class BatchSummary:
    """How a run went: lines finished and failed (error records), tokens generated."""

    finished: int = 0
    failed: int = 0
    completion_tokens: int = 0


def run_jobs(
    loaded: LoadedModel, jobs: Iterable[Job], max_batch: int = DEFAULT_MAX_BATCH
) -> Iterator[dict[str, Any]]:
    """Run ``jobs`` through one batch; yield each line's record as it finishes, so in the order
    they finish (a line that cannot run has its error record yielded with the next result, or
    at the end; one that fails while it runs, as it fails)."""
    running: list[Job] = []
    failed: list[dict[str, Any]] = []

    def requests() -> Iterator[BatchRequest]:
        for job in jobs:
            if job.request is None:
                failed.append(error_record(job.id, job.line, job.error))
            else:
                running.append(job)
                yield job.request

    for result in generate_batch(loaded.model, loaded.tokenizer, requests(), max_batch):
        yield from _drain(failed)
        job = running[result.index]
        if isinstance(result, BatchFailure):
            yield error_record(job.id, job.line, result.error.message)
        else:
            yield result_record(job.id, result)
    yield from _drain(failed)


def _drain(records: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    while records:
        yield records.pop(0)


def result_record(line_id: str | int, result: BatchResult) -> dict[str, Any]:
    return {
        "id": line_id,
        "text": result.text,
        "finish_reason": result.finish_reason,
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": result.completion_tokens,
    }


def error_record(line_id: str | int | None, line: int, message: str) -> dict[str, Any]:
    return {"id": line_id, "line": line, "error": {"message": message}}


def finished_ids(path: Path) -> set[str]:
    """The ``id_key``s of the records finished in an earlier run's output (none if there is no
    such file). A last line without its newline (a write cut by a crash) is removed, so that
    appended records start on a line of their own."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return set()
    except OSError as error:
        raise InvalidInputError(f"cannot read {path}: {error.strerror or error}") from error
    whole = data[: data.rfind(b"\n") + 1]
    if len(whole) < len(data):
        os.truncate(path, len(whole))
    done = set()
    for number, raw in enumerate(whole.splitlines(), start=1):
        try:
            record = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError):
            record = None
        if not isinstance(record, dict) or "id" not in record:
            raise InvalidInputError(
                f"{path} is not the output of rwkv batch: line {number} is not a record",
                hint="name a new output file, or the output of an earlier run to resume it",
            )
        if "error" not in record:
            done.add(id_key(record["id"]))
    return done


class RecordFile:
    """Records appended to a file (or written to a stream's descriptor) as whole lines."""

    def __init__(self, descriptor: int, name: str, owned: bool) -> None:
        self.descriptor, self.name, self._owned = descriptor, name, owned

    @classmethod
    def append_to(cls, path: Path) -> RecordFile:
        """``path`` opened to append to, locked: two runs never write one output at once."""
        try:
            descriptor = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        except OSError as error:
            raise WriteError(f"cannot write {path}: {error.strerror or error}") from error
        if not lock_now(descriptor):
            os.close(descriptor)
            raise WriteError(
                f"another run is writing {path}",
                hint="wait for it to end (a rerun then skips what it finished), or choose "
                "another output file",
            )
        return cls(descriptor, str(path), owned=True)

    def write(self, record: dict[str, Any]) -> None:
        """Append ``record`` as one line: a file gets it in one write, whole or not at all."""
        line = (json.dumps(record, ensure_ascii=False) + "\n").encode()
        try:
            while line:  # a pipe may take a long line in parts; a file takes it at once
                line = line[os.write(self.descriptor, line) :]
        except BrokenPipeError:
            raise OutputClosedError from None
        except OSError as error:
            raise WriteError(f"cannot write {self.name}: {error.strerror or error}") from error

    def close(self) -> None:
        """Make the records durable (a file), and close what this object opened."""
        if self._owned:
            try:
                os.fsync(self.descriptor)
            finally:
                os.close(self.descriptor)


def write_records(
    records: Iterable[dict[str, Any]],
    output: RecordFile,
    on_record: Callable[[dict[str, Any]], None] | None = None,
) -> BatchSummary:
    """Write every record to ``output`` as it comes; count finished and failed lines."""
    summary = BatchSummary()
    for record in records:
        output.write(record)
        if "error" in record:
            summary.failed += 1
        else:
            summary.finished += 1
            summary.completion_tokens += record["completion_tokens"]
        if on_record is not None:
            on_record(record)
    return summary


@contextlib.contextmanager
def input_lines(path: Path) -> Iterator[Iterator[bytes]]:
    """The lines of the input file (``-``: stdin), read as they are needed."""
    if str(path) == "-":
        yield iter(sys.stdin.buffer)
        return
    try:
        handle = path.open("rb")
    except OSError as error:
        raise InvalidInputError(
            f"cannot read {path}: {error.strerror or error}",
            hint="name a JSON-lines file, or - for stdin",
        ) from error
    with handle:
        yield iter(handle)


def count_lines(path: Path) -> int | None:
    """The non-blank lines of the input file, for a progress bar (None for stdin)."""
    if str(path) == "-":
        return None
    with path.open("rb") as handle:
        return sum(1 for line in handle if line.strip())


@contextlib.contextmanager
def output_records(path: Path) -> Iterator[tuple[RecordFile, set[str]]]:
    """The output to append records to and the ids it has finished already (``-``: stdout,
    which starts empty). It is closed, and made durable, however the block ends."""
    if str(path) == "-":
        sys.stdout.flush()
        output, done = RecordFile(sys.stdout.fileno(), "stdout", owned=False), set()
    else:
        output = RecordFile.append_to(path)  # locked first: no other run appends as we read
        try:
            done = finished_ids(path)
        except BaseException:
            output.close()
            raise
    try:
        yield output, done
    finally:
        output.close()
