"""Weight formats (``--dtype``): the compiled matrix-vector kernel against torch for every format,
int8 quantization, and the accuracy each format costs a trained model (the demo model, read token
by token so every step goes through the one-token kernels).

Measured when these bounds were set (256 held-out tokens): fp32 perplexity 15.212; bf16 15.212
(the demo's weights are bf16 already), fp16 15.212, int8 15.206, int4 15.358; top-1 agreement
with fp32: 100%, 100%, 100%, 99.6%, 93.8%. The bounds allow 1% of perplexity and 97% agreement
for int8, 3% and 90% for int4 (a model of 192 channels; peers report that small models lose
most below 8 bits).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from rwkv_cli.bench import weight_bytes
from rwkv_cli.demo import HELDOUT_FILE, demo_dir
from rwkv_cli.device import DTYPES
from rwkv_cli.kernels import build, cpu_ops
from rwkv_cli.kernels.decode import SMALL_BATCH_ROWS
from rwkv_cli.kernels.linear import (
    INT4,
    INT4_GROUP,
    NARROW_GEMV_ROWS,
    QuantizedMatrix,
    linear,
    quantize_int4,
    quantize_int8,
)
from rwkv_cli.kernels.selftest import GEMV_ROWS, TORCH_REFERENCES, wkv_inputs
from rwkv_cli.loading.open import open_model
from rwkv_cli.models import MODEL_CLASSES
from rwkv_cli.settings import ModelRequest
from tests.support.fixtures import legacy_tensors, rwkv4_tensors, rwkv7_tensors
from tests.support.numerics import relative_error

SHAPES = [(37, 45), (768, 768), (3072, 768), (768, 3072)]  # (out, in); odd sizes hit the tails
HELDOUT_TOKENS = 256
PERPLEXITY_TOLERANCE = {"fp32": 0.0, "bf16": 0.005, "fp16": 0.005, "int8": 0.01, "int4": 0.03}
AGREEMENT = {"fp32": 1.0, "bf16": 0.99, "fp16": 0.99, "int8": 0.97, "int4": 0.90}


@pytest.fixture(scope="module")
def ops() -> cpu_ops.CpuKernels:
    return cpu_ops.CpuKernels(build.load_extension(cpu_ops.EXTENSION))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows", GEMV_ROWS)
def test_gemv_equals_torch_for_float_weights(ops, shape, dtype, rows) -> None:
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(shape, generator=generator).to(dtype)
    x = torch.randn(rows, shape[1], generator=generator)
    expected = F.linear(x.double(), weight.double())
    assert relative_error(ops.gemv(x, weight, None).double(), expected) < 1e-6


@pytest.mark.parametrize(
    ("quantize", "shape"),
    [(quantize_int8, shape) for shape in SHAPES]
    + [(quantize_int4, shape) for shape in [(37, 64), (768, 768), (3072, 768), (101, 3072)]],
)
@pytest.mark.parametrize("rows", GEMV_ROWS)
def test_gemv_equals_torch_for_quantized_weights(ops, quantize, shape, rows) -> None:
    generator = torch.Generator().manual_seed(1)
    quantized = quantize(torch.randn(shape, generator=generator))
    x = torch.randn(rows, shape[1], generator=generator)
    expected = F.linear(x.double(), quantized.dequantize(torch.float64))
    actual = ops.gemv(x, quantized.values, quantized.scale).double()
    assert relative_error(actual, expected) < 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int8, INT4])
def test_gemv_gives_each_row_the_same_bits_alone_as_in_a_batch(ops, dtype) -> None:
    """A sequence decoded in a batch gets the projections it gets alone, not just close ones."""
    generator = torch.Generator().manual_seed(4)
    columns = 3 * INT4_GROUP if dtype == INT4 else 203  # odd sizes: every tail is taken
    weight = torch.randn(101, columns, generator=generator)
    quantize = {torch.int8: quantize_int8, INT4: quantize_int4}.get(dtype)
    if quantize is None:
        values, scale = weight.to(dtype), None
    else:
        quantized = quantize(weight)
        values, scale = quantized.values, quantized.scale
    x = torch.randn(17, columns, generator=generator)
    together = ops.gemv(x, values, scale)
    alone = torch.cat([ops.gemv(row.unsqueeze(0), values, scale) for row in x])
    assert torch.equal(together, alone)


def test_gemv_rejects_bad_arguments(ops) -> None:
    x = torch.randn(1, 8)
    with pytest.raises(ValueError, match="need a scale"):
        ops.gemv(x, torch.zeros(4, 8, dtype=torch.int8), None)
    with pytest.raises(ValueError, match="int4 rows must be a multiple of 64"):
        ops.gemv(x, torch.zeros(4, 4, dtype=torch.uint8), torch.ones(4))
    with pytest.raises(ValueError, match="scale must be float32 with 8 elements"):
        ops.gemv(torch.randn(1, 128), torch.zeros(4, 64, dtype=torch.uint8), torch.ones(4))
    with pytest.raises(ValueError, match="with in = 8"):
        ops.gemv(x, torch.zeros(4, 9), None)
    with pytest.raises(ValueError, match="float32, bfloat16, float16, int8 or int4"):
        ops.gemv(x, torch.zeros(4, 8, dtype=torch.float64), None)
    with pytest.raises(ValueError, match="contiguous"):
        ops.gemv(x, torch.zeros(8, 4).t(), None)
    with pytest.raises(ValueError, match="scale must be float32 with 4 elements"):
        ops.gemv(x, torch.zeros(4, 8, dtype=torch.int8), torch.ones(3))


def test_the_cpu_kernels_refuse_what_they_cannot_read(ops) -> None:
    """Checked before any pointer reaches C: a wrong size would read or write out of bounds."""
    state, r, w, k, v, u = wkv_inputs("5", tokens=2, heads=2, head_size=8)
    with pytest.raises(ValueError, match="u must be float32 with 16 elements"):
        ops.wkv5(state, r, w, k, v, u[:1])
    with pytest.raises(ValueError, match="state must be float32"):
        ops.wkv5(state.double(), r, w, k, v, u)
    aa, bb, pp, w4, u4, k4, v4 = wkv_inputs("4", tokens=2, heads=1, head_size=8)
    with pytest.raises(ValueError, match="k and v must be"):
        ops.wkv4(aa, bb, pp, w4, u4, k4, v4[:1])
    with pytest.raises(ValueError, match="pp must be float32 with 8 elements"):
        ops.wkv4(aa, bb, pp[:4], w4, u4, k4, v4)


def test_int8_quantization_error_is_at_most_half_a_step() -> None:
    weight = torch.randn(64, 100, generator=torch.Generator().manual_seed(2))
    weight[3] = 0  # an all-zero row must not divide by zero
    quantized = quantize_int8(weight)
    assert quantized.values.dtype == torch.int8 and quantized.values.abs().max() <= 127
    error = (quantized.dequantize() - weight).abs()
    assert (error <= quantized.scale.unsqueeze(1) / 2 + 1e-7).all()
    assert torch.equal(quantized.dequantize()[3], torch.zeros(100))


def test_int4_quantization_error_is_at_most_half_a_step_of_its_group() -> None:
    weight = torch.randn(8, 4 * INT4_GROUP, generator=torch.Generator().manual_seed(7))
    weight[2, :INT4_GROUP] = 0  # an all-zero group must not divide by zero
    quantized = quantize_int4(weight)
    assert quantized.values.dtype == torch.uint8 and quantized.values.shape == (8, 2 * INT4_GROUP)
    assert quantized.scale.shape == (8, 4) and quantized.shape == weight.shape
    error = (quantized.dequantize() - weight).abs()
    step = quantized.scale.repeat_interleave(INT4_GROUP, dim=1)
    assert (error <= step / 2 + 1e-7).all()
    assert torch.equal(quantized.dequantize()[2, :INT4_GROUP], torch.zeros(INT4_GROUP))


def test_int4_packs_two_weights_a_byte_low_nibble_first() -> None:
    """The layout the kernel reads: nibble = q + 8, weight 2j low and 2j + 1 high in byte j."""
    weight = torch.zeros(1, INT4_GROUP)
    weight[0, :4] = torch.tensor([7.0, -7.0, 1.0, 0.0])  # scale 1: q is the weight itself
    quantized = quantize_int4(weight)
    assert quantized.scale.tolist() == [[1.0]]
    assert quantized.values[0, :2].tolist() == [(1 << 4) | 15, (8 << 4) | 9]
    assert quantized.values[0, 2:].eq((8 << 4) | 8).all()
    with pytest.raises(ValueError, match="multiple of 64 weights, not 100"):
        quantize_int4(torch.zeros(2, 100))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int8])
def test_linear_gives_the_same_with_and_without_the_compiled_kernel(dtype) -> None:
    generator = torch.Generator().manual_seed(3)
    weight = torch.randn(300, 200, generator=generator)
    weight = quantize_int8(weight) if dtype == torch.int8 else weight.to(dtype)
    x = torch.randn(200, generator=generator)
    with torch.inference_mode():
        compiled = linear(x, weight)
        build.set_kernel_choice("torch")
        try:
            plain = linear(x, weight)
        finally:
            build.set_kernel_choice("auto")
    assert compiled.shape == plain.shape == (300,)
    assert relative_error(compiled, plain) < 1e-6


@pytest.mark.parametrize(
    ("x_shape", "kernel_for"),  # whether float32 weights, and narrow ones, take the kernel
    [
        ((200,), (True, True)),  # one token
        ((1, 200), (True, True)),
        ((5, 1, 200), (True, True)),  # one token of each of 5 sequences (forward_batch)
        ((16, 200), (True, True)),  # the head over 16 sequences' last tokens
        ((SMALL_BATCH_ROWS + 1, 1, 200), (False, True)),  # float32: a GEMM
        ((NARROW_GEMV_ROWS, 200), (False, True)),  # a short prompt
        ((NARROW_GEMV_ROWS + 1, 200), (False, False)),  # a prefill chunk: a GEMM
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int8])
def test_linear_takes_the_small_batch_kernel_for_a_few_rows(
    monkeypatch, x_shape, kernel_for, dtype
) -> None:
    """Up to 16 rows with float32 weights, up to 64 with narrow ones (widening them costs)."""
    takes_kernel = kernel_for[dtype != torch.float32]
    calls = []
    gemv = cpu_ops.CpuKernels.gemv

    def spy(self, x, weight, scale=None):
        calls.append(x.shape)
        return gemv(self, x, weight, scale)

    monkeypatch.setattr(cpu_ops.CpuKernels, "gemv", spy)
    generator = torch.Generator().manual_seed(5)
    weight = torch.randn(30, 200, generator=generator)
    weight = quantize_int8(weight) if dtype == torch.int8 else weight.to(dtype)
    x = torch.randn(x_shape, generator=generator)
    with torch.inference_mode():
        y = linear(x, weight)
    rows = x.numel() // 200
    assert calls == ([(rows, 200)] if takes_kernel else [])
    assert y.shape == (*x_shape[:-1], 30)
    expected = F.linear(x.double(), _dense(weight).double())
    assert relative_error(y.double(), expected) < 1e-6


def _dense(weight: torch.Tensor | QuantizedMatrix) -> torch.Tensor:
    return weight.dequantize() if isinstance(weight, QuantizedMatrix) else weight.float()


CHECKPOINTS = {
    "4": lambda: rwkv4_tensors(),
    "5.2": lambda: legacy_tensors("5.2"),
    "6": lambda: legacy_tensors("6"),
    "7": lambda: rwkv7_tensors(),
}


@pytest.mark.parametrize("generation", CHECKPOINTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.int8])
def test_compiled_kernels_give_what_the_torch_path_gives(generation, dtype) -> None:
    """A prefill (many tokens) then decoding (one at a time), with and without them."""
    model_class = MODEL_CLASSES[generation]
    model = model_class.from_prepared(
        model_class.prepare(CHECKPOINTS[generation](), dtype), torch.float32
    )

    def run() -> torch.Tensor:
        step, state = model.forward([5, 17, 300, 2, 99, 1000, 7])
        logits = [step]
        for token in (4, 40, 400):
            step, state = model.forward([token], state)
            logits.append(step)
        return torch.stack(logits)

    compiled = run()
    build.set_kernel_choice("torch")
    try:
        plain = run()
    finally:
        build.set_kernel_choice("auto")
    assert relative_error(compiled, plain) < 1e-5


@pytest.fixture(scope="module")
def heldout_logits() -> dict:
    """Per weight format: the demo model's logits after each held-out token, read one by one."""
    results = {}
    for name, dtype in DTYPES.items():
        loaded = open_model(ModelRequest("demo", dtype=dtype))
        text = (demo_dir() / HELDOUT_FILE).read_text(encoding="utf-8")
        tokens = [loaded.tokenizer.eos_id, *loaded.tokenizer.encode(text)][: HELDOUT_TOKENS + 1]
        state, logits = None, []
        for token in tokens[:-1]:
            step, state = loaded.model.forward([token], state)
            logits.append(step)
        assert loaded.model.weight_dtype == dtype
        results[name] = (torch.stack(logits), torch.tensor(tokens[1:]))
    return results


@pytest.mark.parametrize("name", list(DTYPES))
def test_weight_format_accuracy_on_heldout_text(heldout_logits, name) -> None:
    reference, targets = heldout_logits["fp32"]
    logits, _ = heldout_logits[name]
    perplexity = math.exp(F.cross_entropy(logits, targets).item())
    reference_perplexity = math.exp(F.cross_entropy(reference, targets).item())
    assert abs(perplexity / reference_perplexity - 1) <= PERPLEXITY_TOLERANCE[name]
    agreement = (logits.argmax(-1) == reference.argmax(-1)).float().mean().item()
    assert agreement >= AGREEMENT[name]


def test_int8_model_stores_quantized_projections_and_float32_vectors() -> None:
    model_class = MODEL_CLASSES["7"]
    prepared = model_class.prepare(rwkv7_tensors(), torch.int8)
    assert prepared["blocks.0.att.key.weight"].dtype == torch.int8
    assert prepared["blocks.0.att.key.weight.scale"].dtype == torch.float32
    assert prepared["head.weight"].dtype == torch.int8
    assert prepared["emb.weight"].dtype == torch.float32
    assert prepared["blocks.0.att.w1"].dtype == torch.float32  # LoRAs are small: kept exact
    model = model_class.from_prepared(prepared)
    assert isinstance(model.head, QuantizedMatrix) and model.dtype == torch.float32
    assert model.weight_dtype == torch.int8


def test_int4_model_quantizes_projections_and_keeps_an_int8_head() -> None:
    model_class = MODEL_CLASSES["7"]
    prepared = model_class.prepare(rwkv7_tensors(n_embd=128), INT4)
    key = prepared["blocks.0.att.key.weight"]
    assert key.dtype == torch.uint8 and key.shape == (128, 64)
    assert prepared["blocks.0.att.key.weight.scale"].shape == (128, 2)
    assert prepared["head.weight"].dtype == torch.int8  # its errors reach every logit
    assert prepared["blocks.0.att.w1"].dtype == torch.float32
    model = model_class.from_prepared(prepared)
    assert model.weight_dtype == INT4 and model.head.dtype == torch.int8


@pytest.mark.parametrize("tokens", [1, 7, 64, 150])
def test_compiled_wkv_recurrences_equal_the_sequential_references(ops, tokens) -> None:
    """RWKV-4 and 5/6 on the CPU, including decays of exactly 0 and 1 for RWKV-5/6."""
    for generation, compiled in (("4", ops.wkv4), ("5", ops.wkv5)):
        inputs = wkv_inputs(generation, tokens, heads=3, head_size=64, seed=tokens)
        if generation == "5":
            state, r, w, k, v, u = inputs
            w = w.clone()
            w[:, 0, :8], w[:, 1, :8] = 0.0, 1.0
            inputs = (state, r, w, k, v, u)
        expected = TORCH_REFERENCES[generation](*(x.double() for x in inputs))
        for got, want in zip(compiled(*inputs), expected, strict=True):
            assert torch.isfinite(got).all()
            assert relative_error(got.double(), want) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int8, INT4])
def test_bench_counts_every_weight_once(dtype) -> None:
    """What the model holds: as stored, but small tensors widened to the activations' type."""
    model_class = MODEL_CLASSES["7"]
    prepared = model_class.prepare(rwkv7_tensors(), dtype)
    model = model_class.from_prepared(prepared, torch.float32)
    held = [model_class._for_compute(name, t, torch.float32) for name, t in prepared.items()]
    assert weight_bytes(model) == sum(tensor.numel() * tensor.element_size() for tensor in held)
