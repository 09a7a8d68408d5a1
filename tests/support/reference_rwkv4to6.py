"""A naive float64 RWKV-4, 5.x and 6, one token at a time, straight from the formulas (the oracle).

Deliberately independent of rwkv_cli: it reads the raw checkpoint tensors, loops over tokens and
heads with explicit vectors and matrices, and writes WKV the textbook way. RWKV-4 keeps the plain
numerator and denominator (no running maximum: float64 and the fixture's small keys cannot
overflow). RWKV-5/6 keep each head's state indexed [key, value], as in the papers, so comparing
it with rwkv_cli's [value, key] state also checks that layout. Formulas: docs/DESIGN.md section
4 and the RWKV-5/6 paper ("Eagle and Finch", arXiv 2404.05892).
"""

from __future__ import annotations

import math

import torch

GROUP_NORM_EPS = 64e-5
LAYER_NORM_EPS = 1e-5


def _layer_norm(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float
) -> torch.Tensor:
    centred = x - x.mean()
    return centred / math.sqrt((centred**2).mean().item() + eps) * weight + bias


def _sigmoid(x: torch.Tensor) -> torch.Tensor:
    return 1 / (1 + torch.exp(-x))


def reference_forward(
    tensors: dict[str, torch.Tensor], tokens: list[int], generation: str
) -> tuple[torch.Tensor, list[dict[str, torch.Tensor]]]:
    """All-token logits (T, V) and the final per-layer state.

    The state holds ``att_shift`` and ``ffn_shift``, and ``num``/``den`` (RWKV-4) or ``kv``
    (RWKV-5/6, (H, N_key, N_value)).
    """
    w = {name: tensor.double() for name, tensor in tensors.items()}

    def get(name: str) -> torch.Tensor:
        return w[name].squeeze()

    def norm(x: torch.Tensor, prefix: str) -> torch.Tensor:
        return _layer_norm(x, get(prefix + ".weight"), get(prefix + ".bias"), LAYER_NORM_EPS)

    n_embd = w["emb.weight"].shape[1]
    n_layer = 1 + max(int(name.split(".")[1]) for name in w if name.startswith("blocks."))
    if generation == "4":
        n_head = 0
    else:
        heads_of = "blocks.0.att.time_faaaa" if generation == "6" else "blocks.0.att.time_decay"
        n_head = w[heads_of].shape[0]
    states = [_empty_state(generation, n_embd, n_head) for _ in range(n_layer)]
    all_logits = []
    for token in tokens:
        x = norm(w["emb.weight"][token], "blocks.0.ln0")
        for layer in range(n_layer):
            state = states[layer]
            xa = norm(x, f"blocks.{layer}.ln1")
            prev, state["att_shift"] = state["att_shift"], xa
            att = f"blocks.{layer}.att."
            if generation == "4":
                x = x + _time_mix_v4(lambda n, p=att: get(p + n), xa, prev, state)
            else:
                x = x + _time_mix_v5_v6(lambda n, p=att: get(p + n), xa, prev, state, generation)
            xf = norm(x, f"blocks.{layer}.ln2")
            prev, state["ffn_shift"] = state["ffn_shift"], xf
            ffn = f"blocks.{layer}.ffn."
            if generation == "6":  # x + (x_prev - x)·μ
                xk = xf + (prev - xf) * get(ffn + "time_maa_k")
                xr = xf + (prev - xf) * get(ffn + "time_maa_r")
            else:  # x·μ + x_prev·(1 - μ)
                xk = xf * get(ffn + "time_mix_k") + prev * (1 - get(ffn + "time_mix_k"))
                xr = xf * get(ffn + "time_mix_r") + prev * (1 - get(ffn + "time_mix_r"))
            hidden = torch.relu(get(ffn + "key.weight") @ xk) ** 2
            r = _sigmoid(get(ffn + "receptance.weight") @ xr)
            x = x + r * (get(ffn + "value.weight") @ hidden)
        all_logits.append(get("head.weight") @ norm(x, "ln_out"))
    return torch.stack(all_logits), states


def _empty_state(generation: str, n_embd: int, n_head: int) -> dict[str, torch.Tensor]:
    zeros = torch.zeros(n_embd, dtype=torch.float64)
    state = {"att_shift": zeros.clone(), "ffn_shift": zeros.clone()}
    if generation == "4":
        state |= {"num": zeros.clone(), "den": zeros.clone()}
    else:
        size = n_embd // n_head
        state["kv"] = torch.zeros(n_head, size, size, dtype=torch.float64)
    return state


def _time_mix_v4(get, x: torch.Tensor, prev: torch.Tensor, state: dict) -> torch.Tensor:
    """wkv_t = (Σ_{i<t} e^{-(t-1-i)e^decay + k_i} v_i + e^{first + k_t} v_t) / (same without v)."""
    mixed = {m: x * get(f"time_mix_{m}") + prev * (1 - get(f"time_mix_{m}")) for m in "kvr"}
    k = get("key.weight") @ mixed["k"]
    v = get("value.weight") @ mixed["v"]
    r = _sigmoid(get("receptance.weight") @ mixed["r"])
    now = torch.exp(get("time_first") + k)
    wkv = (state["num"] + now * v) / (state["den"] + now)
    decay = torch.exp(-torch.exp(get("time_decay")))
    state["num"] = decay * state["num"] + torch.exp(k) * v
    state["den"] = decay * state["den"] + torch.exp(k)
    return get("output.weight") @ (r * wkv)


def _time_mix_v5_v6(
    get, x: torch.Tensor, prev: torch.Tensor, state: dict, generation: str
) -> torch.Tensor:
    n_embd = x.shape[0]
    n_head = state["kv"].shape[0]
    size = n_embd // n_head
    if generation == "6":
        base = x + (prev - x) * get("time_maa_x")
        lora = torch.tanh(base @ get("time_maa_w1")).view(5, -1)  # one row per mixed input
        offsets = {m: lora[i] @ get("time_maa_w2")[i] for i, m in enumerate("wkvrg")}
        mixed = {m: x + (prev - x) * (get(f"time_maa_{m}") + offsets[m]) for m in "wkvrg"}
        decay_logit = get("time_decay") + torch.tanh(mixed["w"] @ get("time_decay_w1")) @ get(
            "time_decay_w2"
        )
        decay = torch.exp(-torch.exp(decay_logit)).view(n_head, size)
        bonus = get("time_faaaa").view(n_head, size)
    else:
        mixes = "kvrg" if generation != "5.0" else "kvr"
        mixed = {m: x * get(f"time_mix_{m}") + prev * (1 - get(f"time_mix_{m}")) for m in mixes}
        decay = torch.exp(-torch.exp(get("time_decay"))).reshape(n_head, -1).expand(n_head, size)
        # 5.0 stores the log of the bonus
        bonus = torch.exp(get("time_first")) if generation == "5.0" else get("time_faaaa")
        bonus = bonus.reshape(n_head, -1).expand(n_head, size)
    r = get("receptance.weight") @ mixed["r"]
    k = get("key.weight") @ mixed["k"]
    v = get("value.weight") @ mixed["v"]
    out = torch.zeros(n_embd, dtype=torch.float64)
    for h in range(n_head):
        part = slice(h * size, (h + 1) * size)
        kv = torch.outer(k[part], v[part])  # (N_key, N_value)
        s = state["kv"][h]
        y = r[part] @ (torch.diag(bonus[h]) @ kv + s)
        state["kv"][h] = kv + torch.diag(decay[h]) @ s
        out[part] = _layer_norm(y, get("ln_x.weight")[part], get("ln_x.bias")[part], GROUP_NORM_EPS)
    if "g" in mixed:
        gate = get("gate.weight") @ mixed["g"]
        out = out * gate * _sigmoid(gate)  # silu
    return get("output.weight") @ out
