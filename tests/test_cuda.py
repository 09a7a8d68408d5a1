"""The CUDA kernels and the GPU path, on a GPU (``pytest -m cuda``; skipped without one).

Kernels against the torch path and a float64 oracle for every generation, input type, head size
and length, and for batches of sequences; the torch path on the GPU; whole models on the GPU
against the CPU and against BlinkDL's official package with its own CUDA kernels
(``RWKV_CUDA_ON=1``); one-token graphs, of one sequence and per batch-size bucket, against the
eager step; state files made on the GPU resumed on the CPU; the command line with
``--device cuda`` and ``rwkv doctor``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rwkv_cli import sampling
from rwkv_cli.batching.states import stack_states
from rwkv_cli.device import DTYPES, use_own_stream
from rwkv_cli.generation import generate, prefill
from rwkv_cli.kernels import cuda
from rwkv_cli.kernels.build import load_extension, set_kernel_choice
from rwkv_cli.kernels.selftest import (
    INPUT_DTYPES,
    TORCH_REFERENCES,
    compare_with_torch,
    cuda_self_test,
    wkv_inputs,
)
from rwkv_cli.kernels.wkv4 import wkv4
from rwkv_cli.kernels.wkv5 import wkv5, wkv5_chunked
from rwkv_cli.kernels.wkv7 import wkv7, wkv7_chunked
from rwkv_cli.models import MODEL_CLASSES, decode_graph
from rwkv_cli.sampling import SamplingParams, make_generator, sample_token, sampling_distribution
from rwkv_cli.tokenizer.world import load_world_tokenizer
from tests.support.batch_runs import joins_and_leaves
from tests.support.cli_runner import rwkv
from tests.support.fixtures import GENERATIONS, generation_tensors, write_pth
from tests.support.numerics import assert_states_close, relative_error
from tests.support.state_roundtrip import save_and_resume
from tests.support.wkv_oracles import ORACLES, as_oracle_state, batched_wkv_inputs

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

GPU = "cuda"
WRAPPERS = {"4": cuda.wkv4, "5": cuda.wkv5, "7": cuda.wkv7}
GREEDY = SamplingParams(temperature=0)
PROMPT = [0, 33, 261, 11, 17, 17, 17, 250, 2, 1000, 4000, 5, 6, 7, 8, 9, 10, 300, 12]


@pytest.fixture(scope="module", autouse=True)
def compiled() -> None:
    """The kernels must build on a GPU machine: a build failure fails these tests."""
    load_extension(cuda.EXTENSION)


def test_self_test_passes() -> None:
    assert "match the torch path" in cuda_self_test()


@pytest.mark.parametrize("dtype", INPUT_DTYPES, ids=str)
@pytest.mark.parametrize("tokens", [1, 16, 64, 100, 300])  # chunk multiples and not
@pytest.mark.parametrize("generation", ["4", "5", "7"])
def test_kernels_match_the_torch_path_and_the_float64_oracle(generation, tokens, dtype) -> None:
    inputs = wkv_inputs(generation, tokens, heads=4, dtype=dtype, device=GPU, seed=tokens)
    actual = WRAPPERS[generation](*inputs)
    assert all(x.is_cuda and x.dtype == torch.float32 for x in actual)
    expected = TORCH_REFERENCES[generation](*inputs)
    for got, want in zip(actual, expected, strict=True):
        assert relative_error(got, want) < 1e-5
    oracle = ORACLES[generation](*inputs)  # reads the same rounded inputs
    for got, want in zip(as_oracle_state(generation, actual), oracle, strict=True):
        assert relative_error(got, want) < 1e-5


@pytest.mark.parametrize("head_size", cuda.HEAD_SIZES)
@pytest.mark.parametrize("generation", ["5", "7"])
def test_every_compiled_head_size(generation, head_size) -> None:
    inputs = wkv_inputs(generation, 37, heads=3, head_size=head_size, device=GPU)
    for got, want in zip(WRAPPERS[generation](*inputs), ORACLES[generation](*inputs), strict=True):
        assert relative_error(got, want) < 1e-5


@pytest.mark.parametrize("dtype", INPUT_DTYPES, ids=str)
@pytest.mark.parametrize("tokens", [1, 64])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("generation", ["4", "5", "7"])
def test_a_batch_gives_every_sequence_its_own_run(generation, batch, tokens, dtype) -> None:
    batched, sequences = batched_wkv_inputs(generation, batch, tokens, heads=4, dtype=dtype)
    actual = WRAPPERS[generation](*(x.to(GPU) for x in batched))
    for row, inputs in enumerate(sequences):
        alone = WRAPPERS[generation](*(x.to(GPU) for x in inputs))
        for got, want in zip(actual, alone, strict=True):
            assert torch.equal(got[row], want)  # the same arithmetic, at other addresses
        rows = as_oracle_state(generation, [x[row] for x in actual])
        for got, want in zip(rows, ORACLES[generation](*inputs), strict=True):
            assert relative_error(got, want) < 1e-5


@pytest.mark.parametrize("chunk_len", [1, 6, 7, 64, 128])
@pytest.mark.parametrize("generation", ["5", "7"])
def test_the_torch_path_runs_on_the_gpu(generation, chunk_len) -> None:
    """The fallback when the kernels do not build: the chunked torch paths, on the GPU."""
    inputs = wkv_inputs(generation, 200, heads=4, device=GPU)
    chunked = wkv5_chunked if generation == "5" else wkv7_chunked
    y, state = chunked(*inputs, chunk_len=chunk_len)
    assert y.is_cuda and state.is_cuda
    expected_y, expected_state = ORACLES[generation](*inputs)
    assert relative_error(y, expected_y) < 1e-5
    assert relative_error(state, expected_state) < 1e-5


DISPATCHERS = {"4": wkv4, "5": wkv5, "7": wkv7}


def test_the_dispatchers_follow_the_kernel_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    for generation, wrapper in WRAPPERS.items():
        record = lambda *a, _f=wrapper, _g=generation: calls.append(_g) or _f(*a)  # noqa: E731
        monkeypatch.setattr(cuda, wrapper.__name__, record)
    inputs = {generation: wkv_inputs(generation, 9, device=GPU) for generation in DISPATCHERS}
    try:
        set_kernel_choice("torch")
        torch_ys = [DISPATCHERS[g](*inputs[g])[0] for g in DISPATCHERS]
        assert calls == []
        set_kernel_choice("auto")
        compiled_ys = [DISPATCHERS[g](*inputs[g])[0] for g in DISPATCHERS]
        assert calls == list(DISPATCHERS)
    finally:
        set_kernel_choice("auto")
    for compiled_y, torch_y in zip(compiled_ys, torch_ys, strict=True):
        assert relative_error(compiled_y, torch_y) < 1e-5
    with torch.enable_grad():  # the kernels are forward-only: gradients take the torch path
        state, r, *rest = inputs["7"]
        r = r.clone().requires_grad_()
        wkv7(state, r, *rest)[0].sum().backward()
    assert r.grad is not None and calls == list(DISPATCHERS)


def test_a_wrong_device_or_type_is_a_clear_error() -> None:
    ops = torch.ops.rwkv_cli
    state, r, w, k, v, u = wkv_inputs("5", 4, device=GPU)
    with pytest.raises(RuntimeError, match="wkv5_cuda: k must be on a CUDA device"):
        ops.wkv5_cuda(state, r, w, k.cpu(), v, u)
    with pytest.raises(RuntimeError, match="wkv5_cuda: w must be float32"):
        ops.wkv5_cuda(state, r, w.half(), k, v, u)
    with pytest.raises(RuntimeError, match=r"wkv5_cuda: k is .*Half.* but the other token"):
        ops.wkv5_cuda(state, r, w, k.half(), v, u)
    with pytest.raises(RuntimeError, match="wkv5_cuda: r must be contiguous"):
        ops.wkv5_cuda(state, r.transpose(0, 1).contiguous().transpose(0, 1), w, k, v, u)
    with pytest.raises(RuntimeError, match=r"wkv5_cuda: r must be \(T, H, N\) or \(B, T, H, N\)"):
        ops.wkv5_cuda(state, r[0], w[0], k[0], v[0], u)
    batched = (x.unsqueeze(0) for x in (r, w, k, v))  # a batch of one, but an unbatched state
    with pytest.raises(RuntimeError, match=r"state has shape \[2, 64, 64\], expected \[1, 2,"):
        ops.wkv5_cuda(state, *batched, u)


def _model(generation: str, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    tensors = generation_tensors(generation)
    return MODEL_CLASSES[generation].from_tensors(tensors, dtype=dtype).to(device)


@pytest.mark.parametrize(
    ("dtype", "tolerance"), [(torch.float32, 1e-4), (torch.float16, 1e-2), (torch.bfloat16, 3e-2)]
)
@pytest.mark.parametrize("generation", GENERATIONS)
def test_gpu_forward_equals_cpu_forward(generation, dtype, tolerance) -> None:
    cpu = _model(generation)
    gpu = _model(generation, dtype, GPU)
    expected, cpu_state = cpu.forward(PROMPT)
    logits, state = gpu.forward(PROMPT)
    assert logits.is_cuda and state.layers[0].att_shift.is_cuda
    assert relative_error(logits, expected) < tolerance
    expected, _ = cpu.forward([42], cpu_state)
    logits, _ = gpu.forward([42], state)  # decode: one token
    assert relative_error(logits, expected) < tolerance


@pytest.mark.parametrize("generation", GENERATIONS)
def test_a_state_saved_on_the_gpu_resumes_on_the_cpu(generation, tmp_path: Path) -> None:
    gpu, cpu = _model(generation, device=GPU), _model(generation)
    path = tmp_path / "gpu.rwkvstate"
    session, saved, resumed = save_and_resume(gpu, cpu, PROMPT, path)
    assert resumed.state.layers[0].att_shift.device.type == "cpu"
    expected, _ = gpu.forward([42], session.state)
    logits, _ = cpu.forward([42], resumed.state)
    assert relative_error(logits, expected) < 1e-4
    on_gpu = saved.session_for(gpu, "world")  # and back onto the GPU
    assert on_gpu.state.layers[0].att_shift.is_cuda


@pytest.mark.parametrize(
    "params",
    [GREEDY, SamplingParams(temperature=0, presence_penalty=0.5, frequency_penalty=0.5)],
    ids=["greedy", "penalties"],
)
def test_generation_on_the_gpu_matches_the_cpu(params) -> None:
    tokenizer = load_world_tokenizer()

    def complete(model) -> str:
        sampler = make_generator(0)[0]
        return generate(
            model, tokenizer, "The quick", params=params, generator=sampler, max_tokens=24
        )

    assert complete(_model("7", device=GPU)) == complete(_model("7"))


# Sampling settings, and what one draw reads back from the GPU: (copies, values). The top
# logit comes back with the candidates, which are 1 (greedy), k, the 64 most probable when
# the nucleus is among them, or more only as far as a wide nucleus needs.
SAMPLERS = {
    "greedy": (GREEDY, 1, 1 + 1),
    "top-p": (SamplingParams(temperature=1.0, top_p=0.85), 1, 1 + 2 * 64),
    "top-k": (SamplingParams(temperature=0.7, top_p=1.0, top_k=20), 1, 1 + 2 * 20),
    # 47571 tokens in the nucleus: top-64, 512 and 4096 fall short, then a full sort
    "wide top-p": (
        SamplingParams(temperature=2.0, top_p=0.999),
        4,
        4 + 2 * (64 + 512 + 4096 + 65536),
    ),
    "no filter": (SamplingParams(temperature=1.0, top_p=1.0), 1, 1 + 65536),
}


@pytest.mark.parametrize("name", SAMPLERS)
def test_sampling_gpu_logits_draws_what_the_cpu_draws(name, monkeypatch) -> None:
    """The work over the vocabulary runs on the GPU; the draw, on the caller's CPU generator,
    gives the same tokens for the same seed, and only the candidates are read back."""
    params, copies, values = SAMPLERS[name]
    logits = torch.randn(65536, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    logits = (logits * 5).float()
    reads = []
    read_back = sampling._read_back
    monkeypatch.setattr(sampling, "_read_back", lambda *t: reads.append(t) or read_back(*t))
    on_gpu = [sample_token(logits.to(GPU), params, make_generator(7)[0]) for _ in range(3)]
    assert len(reads) == 3 * copies
    assert sum(tensor.numel() for call in reads for tensor in call) == 3 * values
    on_cpu = [sample_token(logits, params, make_generator(7)[0]) for _ in range(3)]
    assert on_gpu == on_cpu
    probs, ids = sampling_distribution(logits.to(GPU), params)
    assert probs.device.type == ids.device.type == "cpu"

    def dense(probs: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return torch.zeros(65536).index_put_((ids,), probs)  # near-ties come in any order

    expected = dense(*sampling_distribution(logits, params))
    assert torch.allclose(dense(probs, ids), expected, atol=1e-5)


def _greedy_steps(model, state, steps: int = 6):
    """Logits and states of ``steps`` greedy one-token steps after ``state``."""
    logits, states, token = [], [], 42
    for _ in range(steps):
        step_logits, state = model.forward([token], state)
        logits.append(step_logits)
        states.append(state)
        token = int(torch.argmax(step_logits))
    return logits, states


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("generation", GENERATIONS)
def test_one_token_graphs_equal_the_plain_step(generation, dtype, monkeypatch) -> None:
    model = _model(generation, dtype, GPU)
    _, prompt_state = model.forward(PROMPT)
    monkeypatch.setenv(decode_graph.ENVIRONMENT_SWITCH, "0")
    expected_logits, expected_states = _greedy_steps(model, prompt_state)
    assert model._graphs == {}
    monkeypatch.delenv(decode_graph.ENVIRONMENT_SWITCH)
    logits, states = _greedy_steps(model, prompt_state)
    assert isinstance(model._graphs["auto", None], decode_graph.OneTokenGraph)
    for got, want in zip(logits, expected_logits, strict=True):
        assert relative_error(got, want) < 1e-5
    for got, want in zip(states, expected_states, strict=True):  # every step's state kept intact
        assert got.packed is not None
        assert_states_close(got, want, 1e-5)


def test_a_graph_resumes_from_any_earlier_state() -> None:
    """States are immutable: stepping again from an older one (a rollback, a branch) gives what
    it gave the first time, and leaves later states alone."""
    model = _model("7", torch.float16, GPU)
    _, start = model.forward(PROMPT)
    first, after_first = model.forward([7], start)
    second, after_second = model.forward([8], after_first)
    saved = [tensor.clone() for tensor in after_second.tensors()]
    again, _ = model.forward([8], after_first)  # from a state that is not the latest
    assert torch.equal(again, second)
    from_start, _ = model.forward([7], start)  # from an unpacked state
    assert torch.equal(from_start, first)
    fresh, _ = model.forward([7])  # from the zero state
    expected, _ = model.step_ids(torch.tensor([7], device=GPU), None)
    assert relative_error(fresh, expected) < 1e-5
    for tensor, before in zip(after_second.tensors(), saved, strict=True):
        assert torch.equal(tensor, before)


def test_graphs_are_kept_per_kernel_choice() -> None:
    model = _model("6", torch.float16, GPU)
    _, state = model.forward([1])
    try:
        set_kernel_choice("torch")
        torch_path, _ = model.forward([2], state)
    finally:
        set_kernel_choice("auto")
    compiled, _ = model.forward([2], state)
    assert set(model._graphs) == {("auto", None), ("torch", None)}
    assert relative_error(compiled, torch_path) < 1e-2


def _batch_steps(model, state, steps: int = 4):
    """Logits and states of ``steps`` batched one-token steps (fixed tokens) after ``state``."""
    sequences = state.layers[0].att_shift.shape[0]
    logits, states = [], []
    for step in range(steps):
        tokens = [40 + (7 * row + 3 * step) % 50 for row in range(sequences)]
        step_logits, state = model.forward_batch(tokens, state)
        logits.append(step_logits)
        states.append(state)
    return logits, states


@pytest.mark.parametrize("sequences", [1, 3, 5])
@pytest.mark.parametrize("generation", GENERATIONS)
def test_batch_graphs_equal_the_eager_batched_step(generation, sequences, monkeypatch) -> None:
    """A batch of B replays the graph of its bucket, padded: the same logits and states as the
    eager step, up to the rounding of products over another number of rows."""
    model = _model(generation, device=GPU)
    prompts = [PROMPT[: 5 + 3 * row] for row in range(sequences)]
    state = stack_states([model.forward(prompt)[1] for prompt in prompts])
    before = [tensor.clone() for tensor in state.tensors()]
    monkeypatch.setenv(decode_graph.ENVIRONMENT_SWITCH, "0")
    expected_logits, expected_states = _batch_steps(model, state)
    assert model._graphs == {}
    monkeypatch.delenv(decode_graph.ENVIRONMENT_SWITCH)
    logits, states = _batch_steps(model, state)
    bucket = decode_graph.batch_bucket(sequences)
    assert set(model._graphs) == {("auto", bucket)}
    assert isinstance(model._graphs["auto", bucket], decode_graph.OneTokenGraph)
    for got, want in zip(logits, expected_logits, strict=True):
        assert got.shape == (sequences, model.vocab_size)
        assert relative_error(got, want) < 1e-5
    for got, want in zip(states, expected_states, strict=True):  # every step's state kept intact
        assert_states_close(got, want, 1e-5)
    for tensor, original in zip(state.tensors(), before, strict=True):  # the input untouched
        assert torch.equal(tensor, original)


@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float32, 1e-5), (torch.float16, 1e-2)])
def test_batch_graphs_follow_joins_and_leaves(dtype, tolerance, monkeypatch) -> None:
    """Sequences joining and leaving move the batch between bucket graphs, each captured once;
    every step and every state a sequence leaves with are those of the eager run."""
    model = _model("7", dtype, GPU)
    monkeypatch.setenv(decode_graph.ENVIRONMENT_SWITCH, "0")
    expected = joins_and_leaves(model)
    monkeypatch.delenv(decode_graph.ENVIRONMENT_SWITCH)
    actual = joins_and_leaves(model)
    assert set(model._graphs) == {("auto", rows) for rows in (None, 2, 4, 8)}
    for got, want in zip(actual, expected, strict=True):
        assert relative_error(got, want) < tolerance


@pytest.fixture
def own_stream():
    """What commands do (loading.open.open_model): all GPU work on one stream of rwkv-cli's own."""
    previous = torch.cuda.current_stream()
    use_own_stream(torch.device(GPU, torch.cuda.current_device()))
    yield torch.cuda.current_stream()
    torch.cuda.set_stream(previous)


def test_graphs_are_captured_on_the_commands_own_stream(own_stream) -> None:
    """One stream for loading, prefill and graphs: cuBLAS keeps one workspace, not two."""
    assert own_stream != torch.cuda.default_stream()
    model = _model("7", torch.float16, GPU)
    _, state = model.forward(PROMPT)
    logits, new_state = model.forward([5], state)
    assert isinstance(model._graphs["auto", None], decode_graph.OneTokenGraph)
    assert decode_graph._capture_stream(model.device) == own_stream
    expected, expected_state = model.step_ids(torch.tensor([5], device=GPU), state)  # no graph
    assert relative_error(logits, expected) < 1e-5
    assert_states_close(new_state, expected_state, 1e-5)


def test_a_graph_that_cannot_be_captured_warns_once_and_decoding_goes_on(monkeypatch) -> None:
    def fail(self, model, rows=None) -> None:
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(decode_graph.OneTokenGraph, "__init__", fail)
    model = _model("7", torch.float16, GPU)
    _, state = model.forward(PROMPT)
    with pytest.warns(UserWarning, match="could not capture a CUDA graph.*not permitted"):
        logits, state = model.forward([3], state)
    model.forward([4], state)  # no second warning: the failure is remembered
    assert model._graphs == {("auto", None): None}
    expected, _ = _model("7").forward([*PROMPT, 3])
    assert relative_error(logits, expected) < 1e-2


def test_a_graph_state_saves_and_resumes_on_the_cpu(tmp_path: Path) -> None:
    gpu, cpu = _model("7", device=GPU), _model("7")
    start = prefill(gpu, PROMPT)
    path = tmp_path / "graph.rwkvstate"
    session, _, resumed = save_and_resume(gpu, cpu, [6], path, start)  # one token: a graph step
    assert session.state.packed is not None
    expected, _ = gpu.forward([42], session.state)
    logits, _ = cpu.forward([42], resumed.state)
    assert relative_error(logits, expected) < 1e-4


OFFICIAL_GPU = r"""
import json, os, sys
import torch
import rwkv.model as official

path, strategy, tokens, out = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), sys.argv[4]
cls = official.RWKV_x070 if os.environ["RWKV_V7_ON"] == "1" else official.RWKV
model = cls(path, strategy)
logits, state = model.forward(tokens, None)
after, _ = model.forward([42], state)
torch.save({"prompt": logits.float().cpu(), "next": after.float().cpu()}, out)
"""


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
@pytest.mark.parametrize("generation", ["4", "5.2", "6", "7"])
def test_matches_the_official_cuda_kernels(generation, dtype, tmp_path: Path) -> None:
    """BlinkDL's package with RWKV_CUDA_ON=1 and strategy 'cuda fp16/bf16', same checkpoint."""
    tensors = generation_tensors(generation)
    checkpoint = write_pth(tmp_path / "model.pth", tensors)
    env = {name: value for name, value in os.environ.items() if not name.startswith("RWKV_")}
    env |= {"RWKV_V7_ON": "1" if generation == "7" else "0", "RWKV_JIT_ON": "0"}
    env |= {"RWKV_CUDA_ON": "1", "RWKV_CLI_HOME": str(tmp_path / "home")}
    strategy = f"cuda {dtype}"
    out = tmp_path / "official.pt"
    command = [sys.executable, "-c", OFFICIAL_GPU, str(checkpoint.with_suffix(""))]
    command += [strategy, json.dumps(PROMPT), str(out)]
    ran = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert ran.returncode == 0, ran.stderr[-3000:]
    official = torch.load(out)

    ours = MODEL_CLASSES[generation].from_tensors(tensors, dtype=DTYPES[dtype]).to(GPU)
    logits, state = ours.forward(PROMPT)
    assert relative_error(logits, official["prompt"]) < 3e-2
    logits, _ = ours.forward([42], state)
    assert relative_error(logits, official["next"]) < 3e-2


def test_cli_on_the_gpu(rwkv7_pth) -> None:
    args = ("generate", "Hello", "-m", rwkv7_pth, "-n", "12", "--temperature", "0")
    on_gpu = rwkv(*args, "--device", "cuda", "--dtype", "fp32", "--verbose")
    on_cpu = rwkv(*args)
    assert on_gpu.returncode == 0, on_gpu.stderr
    assert on_gpu.stdout == on_cpu.stdout
    assert "cuda:0 fp32" in on_gpu.stderr.decode()
    half = rwkv("--kernel", "compiled", *args, "--device", "cuda")
    assert half.returncode == 0, half.stderr


def test_doctor_on_the_gpu() -> None:
    result = rwkv("doctor")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "CUDA kernels   ok: " in result.stdout.decode()


def test_self_test_comparison_on_the_gpu_torch_path() -> None:
    """The comparison itself runs on the GPU with the torch twins standing in for kernels."""
    assert compare_with_torch(TORCH_REFERENCES, device=GPU) == 0.0
