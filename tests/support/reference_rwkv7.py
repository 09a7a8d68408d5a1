"""A naive float64 RWKV-7, one token at a time, straight from the formulas (the test oracle).

Deliberately independent of rwkv_cli: it reads the raw checkpoint tensors and loops over tokens
and heads with explicit matrix algebra (docs/DESIGN.md section 4).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _get(tensors: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    return tensors[name].double().squeeze()


def reference_forward(
    tensors: dict[str, torch.Tensor], tokens: list[int]
) -> tuple[torch.Tensor, list[dict[str, torch.Tensor]]]:
    """All-token logits (T, V) and the final per-layer state (att_shift, att_wkv, ffn_shift)."""
    emb = _get(tensors, "emb.weight")
    n_embd = emb.shape[1]
    n_layer = 1 + max(int(name.split(".")[1]) for name in tensors if name.startswith("blocks."))
    n_head, head_size = tensors["blocks.0.att.r_k"].shape

    def layer_norm(x: torch.Tensor, prefix: str) -> torch.Tensor:
        return F.layer_norm(
            x, (n_embd,), _get(tensors, prefix + ".weight"), _get(tensors, prefix + ".bias")
        )

    states = [
        {
            "att_shift": torch.zeros(n_embd, dtype=torch.float64),
            "att_wkv": torch.zeros(n_head, head_size, head_size, dtype=torch.float64),
            "ffn_shift": torch.zeros(n_embd, dtype=torch.float64),
        }
        for _ in range(n_layer)
    ]
    all_logits = []
    for token in tokens:
        x = layer_norm(emb[token], "blocks.0.ln0")
        v_first = None
        for layer in range(n_layer):
            p = f"blocks.{layer}.att."
            g = lambda name, p=p: _get(tensors, p + name)  # noqa: E731
            xa_in = layer_norm(x, f"blocks.{layer}.ln1")
            prev = states[layer]["att_shift"]
            states[layer]["att_shift"] = xa_in
            mix = {m: xa_in + (prev - xa_in) * g("x_" + m) for m in "rwkvag"}
            r = g("receptance.weight") @ mix["r"]
            k = g("key.weight") @ mix["k"]
            v = g("value.weight") @ mix["v"]
            w = torch.exp(
                -math.exp(-0.5) * torch.sigmoid(g("w0") + torch.tanh(mix["w"] @ g("w1")) @ g("w2"))
            )
            a = torch.sigmoid(g("a0") + (mix["a"] @ g("a1")) @ g("a2"))
            gate = torch.sigmoid(mix["g"] @ g("g1")) @ g("g2")
            kk = k * g("k_k")
            k = k * (1 + (a - 1) * g("k_a"))
            if layer == 0:
                v_first = v
            else:
                v = v + (v_first - v) * torch.sigmoid(g("v0") + (mix["v"] @ g("v1")) @ g("v2"))
            out = torch.zeros(n_embd, dtype=torch.float64)
            r_k = _get(tensors, p + "r_k").reshape(n_head, head_size)
            for h in range(n_head):
                sl = slice(h * head_size, (h + 1) * head_size)
                kappa = kk[sl] / max(kk[sl].norm().item(), 1e-12)
                s = states[layer]["att_wkv"][h]
                s = (
                    s @ torch.diag(w[sl])
                    - torch.outer(s @ kappa, kappa * a[sl])
                    + torch.outer(v[sl], k[sl])
                )
                states[layer]["att_wkv"][h] = s
                y = s @ r[sl]
                y = (y - y.mean()) / torch.sqrt(y.var(unbiased=False) + 64e-5)
                y = y * g("ln_x.weight")[sl] + g("ln_x.bias")[sl]
                out[sl] = y + (r[sl] * k[sl] * r_k[h]).sum() * v[sl]
            x = x + g("output.weight") @ (out * gate)

            f = f"blocks.{layer}.ffn."
            xf_in = layer_norm(x, f"blocks.{layer}.ln2")
            prev = states[layer]["ffn_shift"]
            states[layer]["ffn_shift"] = xf_in
            xk = xf_in + (prev - xf_in) * _get(tensors, f + "x_k")
            hidden = torch.relu(_get(tensors, f + "key.weight") @ xk) ** 2
            x = x + _get(tensors, f + "value.weight") @ hidden
        all_logits.append(_get(tensors, "head.weight") @ layer_norm(x, "ln_out"))
    return torch.stack(all_logits), states
