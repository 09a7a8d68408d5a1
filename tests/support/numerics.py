"""How tests compare tensors and recurrent states: one relative error, one state comparison."""

from __future__ import annotations

from rwkv_cli.kernels.selftest import relative_error
from rwkv_cli.state import State

__all__ = ["assert_states_close", "relative_error"]

# RWKV-4's ``att.pp`` is an exponent (the state's running maximum): it is compared by its absolute
# difference, this many times the relative tolerance, not relative to its size.
EXPONENT_TOLERANCE_FACTOR = 10


def assert_states_close(actual: State, expected: State, tolerance: float) -> None:
    """Assert that ``actual`` has the same named tensors as ``expected``, of the same dtypes, each
    within ``tolerance`` of it by ``relative_error``; a tolerance of 0 asks for equal tensors."""
    named_actual, named_expected = actual.named_tensors(), expected.named_tensors()
    assert named_actual.keys() == named_expected.keys()
    for name, tensor in named_actual.items():
        want = named_expected[name]
        assert tensor.dtype == want.dtype, f"{name}: {tensor.dtype}, not {want.dtype}"
        if tolerance == 0:
            assert tensor.equal(want), name
        elif name.endswith(".pp"):
            difference = (tensor - want).abs().max().item()
            assert difference <= tolerance * EXPONENT_TOLERANCE_FACTOR, f"{name}: {difference:.2e}"
        else:
            error = relative_error(tensor, want)
            assert error <= tolerance, f"{name}: relative error {error:.2e}"
