"""Run BlinkDL's official ``rwkv`` package (a test-only oracle) on RWKV-4/5/6 checkpoints.

The package picks its model class from environment variables read once, at import:
``RWKV_V7_ON=1`` (set by the RWKV-7 oracle tests) replaces the RWKV-4/5/6 class for the whole
process. So this runs as a process of its own, with the switches cleared::

    python tests/support/official_worker.py JOBS.pt RESULTS.pt

JOBS.pt is a ``torch.save``d list of dicts: ``model`` (path without ``.pth``, which the package
appends), ``tokens`` (the prompt ids), ``continuation`` (greedy tokens to generate), and
optionally ``tokenizer`` (a tokenizers JSON file) with ``texts`` to encode and decode through the
package's PIPELINE. RESULTS.pt gets one dict per job: ``logits`` after the prompt, ``state`` (the
package's flat list), ``greedy`` ids, ``version``, and ``encoded``/``decoded`` for the texts.
"""

from __future__ import annotations

import os
import sys


def official_environment() -> dict[str, str]:
    """This process's environment with the official package's switches set for RWKV-4/5/6."""
    env = {name: value for name, value in os.environ.items() if not name.startswith("RWKV_")}
    return env | {"RWKV_JIT_ON": "0", "RWKV_CUDA_ON": "0"}


def _run(job: dict) -> dict:
    import torch
    from rwkv.model import RWKV
    from rwkv.utils import PIPELINE

    model = RWKV(job["model"], "cpu fp32", verbose=False)
    logits, state = model.forward(list(job["tokens"]), None)
    result = {
        "logits": logits.clone(),
        "state": [tensor.clone() for tensor in state],
        "version": float(model.version),
    }
    greedy = []
    for _ in range(job.get("continuation", 0)):
        token = int(torch.argmax(logits))
        greedy.append(token)
        logits, state = model.forward([token], state)
    result["greedy"] = greedy
    if "tokenizer" in job:
        pipeline = PIPELINE(model, job["tokenizer"])
        result["encoded"] = [pipeline.encode(text) for text in job["texts"]]
        result["decoded"] = [pipeline.decode(ids) for ids in result["encoded"]]
    return result


def main(jobs_path: str, results_path: str) -> None:
    if os.environ.get("RWKV_V7_ON") == "1":
        raise SystemExit("run with official_environment(): RWKV_V7_ON hides the RWKV-4/5/6 class")
    import torch

    jobs = torch.load(jobs_path, weights_only=True)
    torch.save([_run(job) for job in jobs], results_path)


if __name__ == "__main__":
    main(*sys.argv[1:])
