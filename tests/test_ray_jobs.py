"""Batch jobs on Ray (``batching.ray_jobs``, ``rwkv batch --ray``) against a local Ray instance
on the demo model: the same records as a local run, resumed runs, the shared session sent once,
and the one-line error without Ray installed."""

from __future__ import annotations

import json
import pickle
import sys
from pathlib import Path

import pytest

from rwkv_cli.batching.jobs import JobDefaults, read_jobs, run_jobs
from rwkv_cli.batching.ray_jobs import (
    RayCluster,
    block_plan,
    pack_job,
    run_jobs_on_ray,
    unpack_job,
    worker_request,
)
from rwkv_cli.errors import RwkvCliError
from rwkv_cli.generation import prefill
from rwkv_cli.loading.loaded import LoadedModel
from rwkv_cli.loading.open import open_model
from rwkv_cli.settings import ModelRequest
from rwkv_cli.templates import TEMPLATES
from tests.support.cli_in_process import rwkv_in_process
from tests.support.cli_runner import assert_one_line_error
from tests.support.generation import GREEDY

LINES = [
    {"id": "a", "prompt": "Once upon a time"},
    {"id": "b", "prompt": "The cat"},
    '{"id": "broken", "prompt": ',
    {"id": "c", "prompt": "And the LORD said", "max_tokens": 5},
    {"id": "d", "prompt": "In the beginning", "temperature": -1},
    {"id": "e", "prompt": "The"},
    {
        "id": "m",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hello"},
        ],
    },
]
GREEDY_OPTIONS = ("-m", "demo", "-n", "8", "--temperature", "0", "--max-batch", "2")
# Ray's own settings for a test instance: no usage reports, no token written to the home folder.
RAY_TEST_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}


@pytest.fixture(scope="module")
def local_ray():
    """A Ray instance of this machine's 2 CPUs, for the module's tests."""
    ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'rwkv-cli[ray]')")
    with pytest.MonkeyPatch.context() as patch:
        for name, value in RAY_TEST_ENV.items():
            patch.setenv(name, value)
        # Other Ray processes' log lines, forwarded to this one's stderr, would land in the
        # stderr of an rwkv command run in process; rwkv batch --ray turns them off too.
        ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING", log_to_driver=False)
        try:
            yield ray
        finally:
            ray.shutdown()


@pytest.fixture(scope="module")
def demo() -> LoadedModel:
    return open_model("demo")


def _raw(*lines: dict | str) -> list[bytes]:
    return [(line if isinstance(line, str) else json.dumps(line)).encode() for line in lines]


def _sorted(records) -> list[dict]:
    return sorted(records, key=lambda record: (json.dumps(record["id"]), record.get("line", 0)))


def test_records_on_ray_are_those_of_a_local_run(local_ray, demo) -> None:
    shared = prefill(demo.model, demo.tokenizer.encode("A story."))
    defaults = JobDefaults(GREEDY, 8, TEMPLATES["world"], session=shared)
    request = worker_request(ModelRequest("demo"), demo)
    on_ray = run_jobs_on_ray(read_jobs(_raw(*LINES), demo, defaults), request, shared, 2)
    here = run_jobs(demo, read_jobs(_raw(*LINES), demo, defaults), 2)
    records, expected = _sorted(on_ray), _sorted(here)
    assert records == expected
    assert [record["id"] for record in records if "error" in record] == ["d", None]
    assert sum("text" in record for record in records) == 5


@pytest.mark.parametrize(
    ("lines", "workers", "max_batch", "plan"),
    [
        (1000, 2, 16, (64, 16)),  # blocks of 4 batches
        (100, 8, 16, (13, 8)),  # fewer lines than that per worker: a block each
        (5, 2, 2, (3, 2)),
        (1, 4, 16, (1, 1)),  # one line: one block (and one worker)
    ],
)
def test_blocks_are_a_few_batches_long_and_every_worker_gets_one(
    lines, workers, max_batch, plan
) -> None:
    assert block_plan(lines, workers, max_batch) == plan


def test_a_worker_no_node_has_room_for_is_an_error_not_a_wait(local_ray, demo) -> None:
    jobs = read_jobs(_raw(LINES[0]), demo, JobDefaults(GREEDY, 3, TEMPLATES["world"]))
    request = worker_request(ModelRequest("demo"), demo)
    with pytest.raises(RwkvCliError, match="no node of the Ray cluster has 3 CPUs") as error:
        list(run_jobs_on_ray(jobs, request, cluster=RayCluster(cpus_per_worker=3)))
    assert "the largest has 2 CPUs" in error.value.message


def test_a_worker_that_cannot_open_the_model_is_a_one_line_error(local_ray, demo) -> None:
    jobs = read_jobs(_raw(LINES[0]), demo, JobDefaults(GREEDY, 3, TEMPLATES["world"]))
    elsewhere = ModelRequest("/no/such/folder/model.pth")  # as on a node without the file
    with pytest.raises(RwkvCliError) as error:
        list(run_jobs_on_ray(jobs, elsewhere))
    assert error.value.message == "a Ray worker failed: no such file: /no/such/folder/model.pth"


def test_rwkv_batch_on_ray_resumes_and_writes_what_a_local_run_writes(local_ray, tmp_path) -> None:
    source = tmp_path / "in.jsonl"
    source.write_bytes(b"\n".join(_raw(*LINES)) + b"\n")
    here, on_ray = tmp_path / "here.jsonl", tmp_path / "ray.jsonl"
    local = rwkv_in_process("batch", source, "-o", here, *GREEDY_OPTIONS)
    assert_one_line_error(local, 1, "2 of 7 lines failed")
    earlier = [
        {"id": "a", "text": "kept", "finish_reason": "length"},
        {"id": "b", "line": 2, "error": {"message": "failed before"}},
    ]
    on_ray.write_text("".join(json.dumps(record) + "\n" for record in earlier))
    result = rwkv_in_process("batch", source, "-o", on_ray, *GREEDY_OPTIONS, "--ray")
    assert_one_line_error(result, 1, "2 of 6 lines failed")
    records = [json.loads(line) for line in on_ray.read_text().splitlines()]
    assert records[:2] == earlier  # finished lines stay; failed ones are tried again
    expected = [json.loads(line) for line in here.read_text().splitlines()]
    assert _sorted(records[2:]) == _sorted(r for r in expected if r["id"] != "a")


def test_the_shared_session_is_sent_once_not_with_every_line(demo) -> None:
    shared = prefill(demo.model, demo.tokenizer.encode("A long shared prompt " * 8))
    defaults = JobDefaults(GREEDY, 8, TEMPLATES["world"], session=shared)
    jobs = list(read_jobs(_raw(LINES[0], LINES[-1]), demo, defaults))
    for job in jobs:  # a prompt shares the session; messages share it without penalty counts
        packed = pack_job(job, shared)
        assert len(packed) < len(pickle.dumps(job)) / 10
        back = unpack_job(packed, shared)
        assert back == job
        assert back.request.session.state is shared.state
        assert back.request.session.logits is shared.logits


def test_workers_open_the_file_and_tokenizer_the_driver_opened(demo) -> None:
    pinned = worker_request(ModelRequest("demo", dtype="fp32"), demo)
    assert Path(pinned.spec).is_absolute() and Path(pinned.spec) == demo.provenance.path
    assert (pinned.device, pinned.dtype, pinned.revision) == ("cpu", "fp32", None)
    assert open_model(pinned).tokenizer.name == demo.tokenizer.name
    on_gpu = worker_request(ModelRequest("demo", device="cuda:1"), demo)
    assert on_gpu.device == "cuda"  # Ray shows a worker its own GPU only, as the first


def test_without_ray_the_ray_option_is_a_one_line_error_naming_the_extra(
    tmp_path, monkeypatch
) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` fails, as without it installed
    source = tmp_path / "in.jsonl"
    source.write_bytes(b"\n".join(_raw(*LINES)) + b"\n")
    output = tmp_path / "out.jsonl"
    result = rwkv_in_process("batch", source, "-o", output, "-m", "demo", "--ray")
    assert_one_line_error(result, 1, "needs Ray Data, which is not installed")
    assert result.stderr.decode().splitlines()[1] == "Hint: pip install 'rwkv-cli[ray]'"
    assert not output.exists()  # refused before any work
    help_text = rwkv_in_process("batch", "--help")
    assert help_text.returncode == 0 and "--ray-address" in help_text.stdout.decode()


def test_ray_options_without_ray_are_usage_errors(tmp_path) -> None:
    source = tmp_path / "in.jsonl"
    source.write_bytes(b"\n".join(_raw(*LINES)) + b"\n")
    result = rwkv_in_process("batch", source, "-o", tmp_path / "o.jsonl", "--ray-workers", "2")
    assert_one_line_error(result, 2, "--ray-workers", "add --ray")
