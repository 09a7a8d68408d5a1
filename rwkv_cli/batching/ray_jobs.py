"""Batch jobs on a Ray cluster, through Ray Data: what ``rwkv batch --ray`` runs.

The driver (this process) reads and checks the input lines as a local run does
(``jobs.read_jobs``: error records for lines that cannot run, ids finished earlier skipped, seeds
from ``line_seed``) and sends the lines that can run as a Ray Dataset. ``map_batches`` hands its
blocks to a pool of :class:`BlockRunner` workers: each opens the model once, then runs every
block it gets through one batch (``jobs.run_jobs``, the local run's engine) and returns the lines'
records. The driver yields each block's records as the block finishes, so lines come in no fixed
order; written through ``jobs.RecordFile``, they make a run that resumes as a local one does (an
interrupted run loses only the blocks still running).

Workers open the model the driver opened, pinned: the same file (its absolute path, which every
node must be able to read, or the Hub file at the commit the driver found, which every node must
have in its cache or be able to download), the same tokenizer, weight type and kernels. The
shared starting session (``--state``) travels to each worker once, not with every line.

Ray is an optional dependency (``pip install 'rwkv-cli[ray]'``), imported when a run starts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import logging
import math
import pickle
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from rwkv_cli.batching.jobs import Job, error_record, run_jobs
from rwkv_cli.cpu import configure_cpu
from rwkv_cli.errors import MissingExtraError, RwkvCliError
from rwkv_cli.generation import Session
from rwkv_cli.loading.loaded import LoadedModel
from rwkv_cli.loading.open import open_model
from rwkv_cli.settings import DEFAULT_MAX_BATCH, MAX_THREADS, ModelRequest

RAY_EXTRA = "rwkv-cli[ray]"
# Lines per block, in batches: a block a few batches long keeps its batch full while its lines
# finish at different times; longer blocks would leave fewer to share between workers, and an
# interrupted run loses the blocks still running.
BATCHES_PER_BLOCK = 4
# The parts of the shared session that jobs refer to, sent to each worker once.
_SHARED_PARTS = ("state", "logits", "counts")


@dataclass(frozen=True)
class RayCluster:
    """Where and how wide a run goes. ``address`` None connects as ``ray.init()`` does: to
    ``RAY_ADDRESS`` if set, else to a local instance (started if there is none). ``workers`` None
    starts one per ``cpus_per_worker`` CPUs of the cluster, and no more than there are blocks.
    Each worker runs the model on the CPUs Ray gives it (one GPU of its own on a GPU device)."""

    address: str | None = None
    workers: int | None = None
    cpus_per_worker: int = 1


def import_ray() -> ModuleType:
    """Ray, with Ray Data; a missing install says which extra brings it."""
    try:
        import ray
        import ray.data  # the part used here: not in a bare `pip install ray`
    except ImportError as error:
        raise MissingExtraError(
            f"running on Ray needs Ray Data, which is not installed ({error.name or error})",
            hint=f"pip install '{RAY_EXTRA}'",
        ) from error
    return ray


def worker_request(request: ModelRequest, loaded: LoadedModel) -> ModelRequest:
    """``request`` pinned to what the driver opened: the same file (a Hub file at the commit
    found, else the absolute path) and tokenizer. Ray shows each GPU worker only its own GPU,
    as ``cuda``."""
    found = loaded.provenance
    device = "cuda" if str(request.device).startswith("cuda") else request.device
    return dataclasses.replace(
        request,
        spec=found.hub_spec or str(found.path),
        revision=found.revision,
        device=device,
        tokenizer=loaded.tokenizer.name,
    )


def run_jobs_on_ray(
    jobs: Iterable[Job],
    request: ModelRequest,
    shared: Session | None = None,
    max_batch: int = DEFAULT_MAX_BATCH,
    cluster: RayCluster = RayCluster(),  # frozen: one default shared is never changed
) -> Iterator[dict[str, Any]]:
    """Run ``jobs`` on Ray workers that open ``request`` (see ``worker_request``), each line
    after ``shared`` as its request says; yield every line's record, those of lines that cannot
    run first, the others a block at a time as blocks finish. Connects as ``cluster`` says,
    unless this process is connected already; a connection made here ends with the run."""
    ray = import_ray()
    runnable = []
    for job in jobs:
        if job.request is None:
            yield error_record(job.id, job.line, job.error)
        else:
            runnable.append(job)
    if not runnable:
        return
    with _connected(ray, cluster.address):
        records = _records_dataset(ray, runnable, request, shared, max_batch, cluster)
        try:
            for block in records.iter_batches(batch_size=None, batch_format="numpy"):
                for text in block["record"]:
                    yield json.loads(text)
        except ray.exceptions.RayError as error:
            raise _worker_failure(error) from error


def _worker_failure(error: Exception) -> RwkvCliError:
    """A worker's failure in one line: Ray's text of it ends with the worker's own exception,
    ``module.Class: message``, and the message is kept."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    last = lines[-1] if lines else type(error).__name__
    name, _, message = last.partition(": ")
    return RwkvCliError(
        f"a Ray worker failed: {message if message and ' ' not in name else last}",
        hint="each worker opens the model itself: give a path every node can read, or a Hub "
        "model every node has in its cache or can download",
    )


@contextlib.contextmanager
def _connected(ray: ModuleType, address: str | None) -> Iterator[None]:
    """Connected to Ray for the block: to ``address``, unless connected already."""
    if ray.is_initialized():
        yield
        return
    try:
        ray.init(address=address, logging_level="WARNING", log_to_driver=False)
    except (ConnectionError, RuntimeError, ValueError) as error:
        where = address or "RAY_ADDRESS or a local instance"
        raise RwkvCliError(
            f"cannot connect to Ray at {where}: {str(error).splitlines()[0]}",
            hint="start a cluster with `ray start --head`, or check the address",
        ) from error
    _quiet_ray_data(ray)
    try:
        yield
    finally:
        ray.shutdown()


def _quiet_ray_data(ray: ModuleType) -> None:
    """Ray Data's progress bars and INFO lines off: they would break into the run's own bar
    (and the note that its bars are off with them, a warning)."""
    ray.data.DataContext.get_current().enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.ERROR)


def _records_dataset(
    ray: ModuleType,
    jobs: list[Job],
    request: ModelRequest,
    shared: Session | None,
    max_batch: int,
    cluster: RayCluster,
) -> Any:
    """The lazy Dataset of the jobs' records (a JSON text each), in blocks of lines."""
    gpus = 1 if str(request.device).startswith("cuda") else 0
    _check_room(ray, cluster.cpus_per_worker, gpus)
    room = int(ray.cluster_resources().get("CPU", 1)) // cluster.cpus_per_worker
    workers = cluster.workers or max(1, room)
    block_lines, blocks = block_plan(len(jobs), workers, max_batch)
    items = [{"job": pack_job(job, shared)} for job in jobs]
    return ray.data.from_items(items, override_num_blocks=blocks).map_batches(
        BlockRunner,
        batch_size=block_lines,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=min(workers, blocks)),
        fn_constructor_kwargs={"request": request, "shared": shared, "max_batch": max_batch},
        num_cpus=cluster.cpus_per_worker,
        num_gpus=gpus,
    )


def block_plan(lines: int, workers: int, max_batch: int) -> tuple[int, int]:
    """Lines per block and blocks, for ``lines`` (at least one): blocks of ``BATCHES_PER_BLOCK``
    batches, or smaller where there are fewer lines per worker, so that every worker gets some."""
    block_lines = min(BATCHES_PER_BLOCK * max_batch, math.ceil(lines / workers))
    return block_lines, math.ceil(lines / block_lines)


def _check_room(ray: ModuleType, cpus: int, gpus: int) -> None:
    """Fail now where no node of the cluster has room for a worker, which Ray would wait for."""
    nodes = [node["Resources"] for node in ray.nodes() if node["Alive"]]
    if not any(node.get("CPU", 0) >= cpus and node.get("GPU", 0) >= gpus for node in nodes):
        largest = max((int(node.get("CPU", 0)) for node in nodes), default=0)
        need = f"{cpus} CPUs" + (" and a GPU" if gpus else "")
        raise RwkvCliError(
            f"no node of the Ray cluster has {need} for a worker (the largest has {largest} CPUs)",
            hint="ask for fewer CPUs per worker (--ray-cpus), or add a node that has them",
        )


class BlockRunner:
    """A Ray Data worker: opens the model once, then runs each block of jobs it is given through
    one batch, returning a JSON record per line."""

    def __init__(self, request: ModelRequest, shared: Session | None, max_batch: int) -> None:
        import ray

        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1)
        configure_cpu(min(max(1, int(cpus)), MAX_THREADS))
        self.loaded = open_model(request)
        self.shared, self.max_batch = shared, max_batch

    def __call__(self, block: dict[str, Any]) -> dict[str, list[str]]:
        jobs = (unpack_job(data, self.shared) for data in block["job"])
        records = run_jobs(self.loaded, jobs, self.max_batch)
        return {"record": [json.dumps(record, ensure_ascii=False) for record in records]}


def pack_job(job: Job, shared: Session | None) -> bytes:
    """``job`` pickled, with the parts of ``shared`` it refers to left out (by name)."""
    buffer = io.BytesIO()
    _JobPickler(buffer, shared).dump(job)
    return buffer.getvalue()


def unpack_job(data: bytes, shared: Session | None) -> Job:
    """The job ``pack_job`` pickled, referring to the parts of ``shared`` again."""
    return _JobUnpickler(io.BytesIO(data), shared).load()


class _JobPickler(pickle.Pickler):
    def __init__(self, file: io.BytesIO, shared: Session | None) -> None:
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        parts = {name: getattr(shared, name, None) for name in _SHARED_PARTS}
        self.names = {id(part): name for name, part in parts.items() if part is not None}

    def persistent_id(self, obj: object) -> str | None:
        return self.names.get(id(obj))


class _JobUnpickler(pickle.Unpickler):
    def __init__(self, file: io.BytesIO, shared: Session | None) -> None:
        super().__init__(file)
        self.shared = shared

    def persistent_load(self, pid: str) -> object:
        return getattr(self.shared, pid)
