"""CPU setup: the thread count's bounds and the OpenMP wait policy the command starts with."""

from __future__ import annotations

import pytest

from rwkv_cli.cpu import MAX_THREADS, configure_cpu
from rwkv_cli.entry import sleep_while_waiting


@pytest.mark.parametrize("threads", [0, MAX_THREADS + 1, 100_000])
def test_a_thread_count_out_of_bounds_is_refused(threads) -> None:
    with pytest.raises(ValueError, match=f"from 1 to {MAX_THREADS}"):
        configure_cpu(threads)


def test_openmp_threads_sleep_while_waiting_by_default() -> None:
    environ: dict[str, str] = {}
    sleep_while_waiting(environ)
    assert environ == {"OMP_WAIT_POLICY": "PASSIVE"}


@pytest.mark.parametrize("chosen", [{"OMP_WAIT_POLICY": "ACTIVE"}, {"GOMP_SPINCOUNT": "10000"}])
def test_a_wait_policy_the_user_chose_is_kept(chosen) -> None:
    environ = dict(chosen)
    sleep_while_waiting(environ)
    assert environ == chosen
