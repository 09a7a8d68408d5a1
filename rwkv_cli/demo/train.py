"""Train the demo model: a small RWKV-7 on the King James Bible, on a CPU, from one command.

    python -m rwkv_cli.demo.train                 # rebuilds rwkv_cli/data/demo/ (about 25 min)
    python -m rwkv_cli.demo.train --out DIR --steps 20   # a quick try elsewhere

Steps: read the text with Debian's ``bible`` program (or ``--text FILE``, its saved output; see
:mod:`rwkv_cli.demo.corpus`); hold out every 50th chapter; train a byte-level BPE tokenizer on the
rest with the ``tokenizers`` library (id 0 is ``<|endoftext|>``, which also separates the books);
initialise an RWKV-7 in the official checkpoint layout the way BlinkDL's RWKV-LM trainer does
(``RWKV-v7/train_temp/src/model.py``); and train it with AdamW on random windows of the training
text. The model is rwkv-cli's own inference code: every step builds ``RWKV7.from_tensors`` around
float32 leaf tensors and backpropagates through ``sequence_logits``, so what is trained is exactly
what runs. Everything is seeded and deterministic algorithms are on, so the same text, options,
torch version and thread count give the same files, bit for bit.

Writes ``demo.safetensors`` (bf16, official key names, the run's settings and results in its
metadata), ``tokenizer.json`` and ``heldout.txt`` (the start of the held-out text, for the tests).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import tokenizers
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tokenizers import decoders, models, pre_tokenizers, trainers

from rwkv_cli.demo import CHECKPOINT_FILE, HELDOUT_FILE, demo_dir
from rwkv_cli.demo.corpus import (
    book_texts,
    is_recorded_text,
    parse_bible,
    read_bible,
    split,
)
from rwkv_cli.models.rwkv7 import RWKV7
from rwkv_cli.tokenizer.bpe import BUNDLED_TOKENIZER_FILE

END_OF_TEXT = "<|endoftext|>"  # id 0: rwkv-cli's end-of-text id for every vocabulary
HELDOUT_SAMPLE_BYTES = 4096  # heldout.txt: the first held-out chapters, cut at a verse


@dataclass(frozen=True)
class TrainConfig:
    """The model's shape and the training run; the defaults made the shipped demo model."""

    n_layer: int = 6
    n_embd: int = 192
    head_size: int = 64
    vocab_size: int = 2048
    lora: int = 32  # width of all four LoRAs (decay, in-context rate, value residual, gate)
    ctx_len: int = 512  # tokens per training window
    batch: int = 4  # windows per step (gradients accumulated one window at a time)
    steps: int = 1500  # 3.1M tokens, 2.6 epochs: about 25 minutes on 2 CPU cores
    lr: float = 3e-3
    lr_final: float = 1e-4
    warmup: int = 50
    weight_decay: float = 0.01  # on the weight matrices only, as in RWKV-LM
    seed: int = 20250101
    eval_every: int = 250

    @property
    def tokens_per_step(self) -> int:
        return self.batch * self.ctx_len


# --- tokenizer ---------------------------------------------------------------------------------


def train_tokenizer(texts: Sequence[str], vocab_size: int) -> tokenizers.Tokenizer:
    """A GPT-2-style byte-level BPE: every byte is a token, so any text can be encoded."""
    tokenizer = tokenizers.Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[END_OF_TEXT],  # first, so it gets id 0
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    if tokenizer.token_to_id(END_OF_TEXT) != 0 or tokenizer.get_vocab_size() != vocab_size:
        raise RuntimeError("the trained tokenizer does not have the expected layout")
    return tokenizer


def token_stream(tokenizer: tokenizers.Tokenizer, texts: Sequence[str]) -> torch.Tensor:
    """All texts as one (N,) stream, each preceded by end-of-text (which thus separates them)."""
    ids: list[int] = []
    for encoding in tokenizer.encode_batch(list(texts)):
        ids += [0, *encoding.ids]
    return torch.tensor(ids, dtype=torch.long)


# --- the model ---------------------------------------------------------------------------------


def init_tensors(config: TrainConfig, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """A float32 RWKV-7 state dict in the official layout, initialised like BlinkDL's trainer.

    Token-shift mixes ramp over the channels, more strongly in early layers; decay biases spread
    from fast to slow over the channels with a zigzag within each head; the layers' output
    matrices (att.output, ffn.value) start at zero so every block starts as the identity; the
    first LoRA matrices start at zero and the second ones small and orthogonal; the embedding is
    tiny (ln0 normalises it) and the head orthogonal.
    """
    c, n, lora = config.n_embd, config.head_size, config.lora
    if c % n:
        raise ValueError(f"n_embd {c} is not a multiple of head_size {n}")

    def orthogonal(rows: int, columns: int, gain: float) -> torch.Tensor:
        weight = torch.empty(rows, columns)
        if gain == 0:
            return weight.zero_()
        gain *= math.sqrt(rows / columns) if rows > columns else 1.0
        return torch.nn.init.orthogonal_(weight, gain=gain, generator=generator)

    channel = torch.arange(c, dtype=torch.float32)
    ramp = channel / c  # 0 -> almost 1
    linear = channel / (c - 1) - 0.5  # -0.5 -> 0.5
    within_head = ((channel % n) - (n - 1) / 2) / ((n - 1) / 2)  # -1 -> 1 in every head
    zigzag = within_head * within_head.abs()
    vocab = config.vocab_size
    head_gain = 0.5 * math.sqrt(vocab / c) if vocab > c else 0.5
    tensors = {
        "emb.weight": torch.empty(vocab, c).uniform_(-1e-4, 1e-4, generator=generator),
        "blocks.0.ln0.weight": torch.ones(c),
        "blocks.0.ln0.bias": torch.zeros(c),
        "ln_out.weight": torch.ones(c),
        "ln_out.bias": torch.zeros(c),
        "head.weight": orthogonal(vocab, c, head_gain),
    }
    for layer in range(config.n_layer):
        first_to_last = layer / max(config.n_layer - 1, 1)  # 0 -> 1
        fading = 1.0 - layer / config.n_layer  # 1 -> almost 0
        decay = -6 + 6 * (channel / (c - 1)) ** (1 + first_to_last**0.3)

        def mix(power: float, fading: float = fading) -> torch.Tensor:
            return (1.0 - ramp ** (power * fading)).view(1, 1, c)

        p = f"blocks.{layer}."
        tensors.update(
            {
                p + "ln1.weight": torch.ones(c),
                p + "ln1.bias": torch.zeros(c),
                p + "ln2.weight": torch.ones(c),
                p + "ln2.bias": torch.zeros(c),
                p + "att.x_r": mix(0.2),
                p + "att.x_w": mix(0.9),
                p + "att.x_k": mix(0.7),
                p + "att.x_v": mix(0.7),
                p + "att.x_a": mix(0.9),
                p + "att.x_g": mix(0.2),
                p + "att.w0": (decay + 0.5 + 2.5 * zigzag).view(1, 1, c),
                p + "att.a0": (-0.19 + 0.3 * zigzag + 0.4 * linear).view(1, 1, c),
                p + "att.v0": (0.73 - 0.4 * linear).view(1, 1, c),
                **{p + f"att.{kind}1": torch.zeros(c, lora) for kind in "wavg"},
                **{p + f"att.{kind}2": orthogonal(lora, c, 0.1) for kind in "wavg"},
                p + "att.k_k": (0.71 - 0.1 * linear).view(1, 1, c),
                p + "att.k_a": torch.full((1, 1, c), 1.02),
                p + "att.r_k": torch.full((c // n, n), -0.04),
                p + "att.receptance.weight": orthogonal(c, c, 1.0),
                p + "att.key.weight": orthogonal(c, c, 0.1),
                p + "att.value.weight": orthogonal(c, c, 1.0),
                p + "att.output.weight": orthogonal(c, c, 0.0),
                p + "att.ln_x.weight": torch.full((c,), ((1 + layer) / config.n_layer) ** 0.7),
                p + "att.ln_x.bias": torch.zeros(c),
                p + "ffn.x_k": mix(1.0, fading**4),
                p + "ffn.key.weight": orthogonal(4 * c, c, 1.0),
                p + "ffn.value.weight": orthogonal(c, 4 * c, 0.0),
            }
        )
    return tensors


def window_loss(params: dict[str, torch.Tensor], window: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of predicting window[1:] from window[:-1], through rwkv-cli's RWKV-7."""
    logits, _ = RWKV7.from_tensors(params).sequence_logits(window[:-1].tolist())  # (T, V)
    return F.cross_entropy(logits, window[1:])


@torch.no_grad()
def mean_loss(params: dict[str, torch.Tensor], sequences: Sequence[torch.Tensor]) -> float:
    """Cross-entropy per predicted token over whole sequences, each read from a fresh state."""
    model = RWKV7.from_tensors(params)
    total, count = 0.0, 0
    for tokens in sequences:
        logits, _ = model.sequence_logits(tokens[:-1].tolist())
        total += F.cross_entropy(logits, tokens[1:], reduction="sum").item()
        count += len(tokens) - 1
    return total / count


# --- training ----------------------------------------------------------------------------------


def make_optimizer(params: dict[str, torch.Tensor], config: TrainConfig) -> torch.optim.AdamW:
    """AdamW as in RWKV-LM: weight decay on weight matrices only, twice the rate for att.w0."""
    decayed = [t for name, t in params.items() if name.endswith(".weight") and t.dim() == 2]
    doubled = [t for name, t in params.items() if name.endswith(".att.w0")]
    chosen = {id(t) for t in decayed + doubled}
    rest = [t for t in params.values() if id(t) not in chosen]
    groups = [
        {"params": decayed, "weight_decay": config.weight_decay, "lr_scale": 1.0},
        {"params": doubled, "weight_decay": 0.0, "lr_scale": 2.0},
        {"params": rest, "weight_decay": 0.0, "lr_scale": 1.0},
    ]
    return torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.99), eps=1e-8)


def learning_rate(step: int, config: TrainConfig) -> float:
    """Linear warm-up, then a cosine from ``lr`` down to ``lr_final``."""
    if step < config.warmup:
        return config.lr * (step + 1) / config.warmup
    progress = (step - config.warmup) / max(config.steps - config.warmup, 1)
    cosine = 0.5 * (1 + math.cos(math.pi * progress))  # 1 -> 0
    return config.lr_final + (config.lr - config.lr_final) * cosine


def train(
    params: dict[str, torch.Tensor],
    stream: torch.Tensor,
    heldout: Sequence[torch.Tensor],
    config: TrainConfig,
    generator: torch.Generator,
) -> dict[str, float]:
    """Train ``params`` in place on random windows of ``stream``; returns the time taken and
    the speed. Prints progress, and the held-out loss every ``eval_every`` steps."""
    optimizer = make_optimizer(params, config)
    last_start = len(stream) - config.ctx_len - 1
    started, recent = time.perf_counter(), []
    for step in range(config.steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, config) * group["lr_scale"]
        starts = torch.randint(0, last_start + 1, (config.batch,), generator=generator).tolist()
        windows = [stream[start : start + config.ctx_len + 1] for start in starts]
        recent.append(train_step(params, optimizer, windows))
        done = step + 1
        if done % 10 == 0 or done == config.steps:
            elapsed = time.perf_counter() - started
            print(
                f"step {done:5d}/{config.steps}  loss {sum(recent) / len(recent):.3f}  "
                f"lr {learning_rate(step, config):.2e}  "
                f"{done * config.tokens_per_step / elapsed:,.0f} tokens/s  {elapsed / 60:.1f} min",
                flush=True,
            )
            recent = []
        if done % config.eval_every == 0 and done != config.steps:
            print(f"  held-out loss {mean_loss(params, heldout):.3f}", flush=True)
    elapsed = time.perf_counter() - started
    return {
        "train_seconds": round(elapsed, 1),
        "tokens_per_second": round(config.steps * config.tokens_per_step / elapsed, 1),
    }


def train_step(
    params: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    windows: Sequence[torch.Tensor],
) -> float:
    """One optimizer step on the mean loss of ``windows`` (backpropagated one window at a time,
    which keeps memory small); returns that loss. Gradients are clipped to norm 1."""
    optimizer.zero_grad(set_to_none=True)
    total = 0.0
    for window in windows:
        loss = window_loss(params, window)
        (loss / len(windows)).backward()
        total += loss.item()
    torch.nn.utils.clip_grad_norm_(list(params.values()), max_norm=1.0)
    optimizer.step()
    return total / len(windows)


# --- the whole run -----------------------------------------------------------------------------


def heldout_sample(texts: Sequence[str], limit: int = HELDOUT_SAMPLE_BYTES) -> str:
    """The start of the held-out text, at most ``limit`` bytes, ending after a whole verse."""
    text = "".join(texts)
    cut = text.encode("utf-8")[:limit].decode("utf-8", errors="ignore")
    return cut[: cut.rfind("\n\n") + 2]


@dataclass(frozen=True)
class Corpus:
    """The text as the run uses it."""

    tokenizer: tokenizers.Tokenizer
    stream: torch.Tensor  # (N,) the training books, each preceded by end-of-text
    heldout: list[torch.Tensor]  # each held-out chapter, preceded by end-of-text
    sample: str  # the start of the held-out text, shipped as heldout.txt


def load_corpus(config: TrainConfig, text_file: Path | None) -> Corpus:
    """Read and split the text, train the tokenizer on the training part, tokenize both parts."""
    text = read_bible(text_file)
    if not is_recorded_text(text):
        print("note: this text differs from the one the shipped model was trained on")
    training, heldout = split(parse_bible(text))
    books = book_texts(training)
    chapters = [chapter.text() for chapter in heldout]
    tokenizer = train_tokenizer(books, config.vocab_size)
    corpus = Corpus(
        tokenizer,
        token_stream(tokenizer, books),
        [token_stream(tokenizer, [chapter]) for chapter in chapters],
        heldout_sample(chapters),
    )
    print(
        f"{len(training)} chapters ({len(corpus.stream):,} tokens) to train on, "
        f"{len(heldout)} held out ({sum(map(len, corpus.heldout)):,} tokens)"
    )
    return corpus


def final_losses(
    params: dict[str, torch.Tensor],
    corpus: Corpus,
    config: TrainConfig,
    generator: torch.Generator,
) -> dict[str, float]:
    """Losses on 64 random training windows, all held-out chapters, and heldout.txt."""
    last_start = len(corpus.stream) - config.ctx_len - 1
    starts = torch.randint(0, last_start, (64,), generator=generator).tolist()
    windows = [corpus.stream[start : start + config.ctx_len + 1] for start in starts]
    return {
        "train_loss": mean_loss(params, windows),
        "heldout_loss": mean_loss(params, corpus.heldout),
        "heldout_sample_loss": mean_loss(params, [token_stream(corpus.tokenizer, [corpus.sample])]),
    }


def write_outputs(
    out_dir: Path,
    tensors: dict[str, torch.Tensor],
    corpus: Corpus,
    config: TrainConfig,
    losses: dict[str, float],
) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    metadata = {  # no timings: the same run writes the same weights and metadata
        "description": "rwkv-cli demo model: RWKV-7 trained on the King James Bible (KJV)",
        "training": json.dumps(dataclasses.asdict(config)),
        "environment": json.dumps({"torch": torch.__version__, "threads": torch.get_num_threads()}),
        "results": json.dumps({name: round(value, 4) for name, value in losses.items()}),
    }
    save_file(tensors, out_dir / CHECKPOINT_FILE, metadata=metadata)
    corpus.tokenizer.save(str(out_dir / BUNDLED_TOKENIZER_FILE))
    (out_dir / HELDOUT_FILE).write_text(corpus.sample, encoding="utf-8")
    print(f"wrote {CHECKPOINT_FILE}, {BUNDLED_TOKENIZER_FILE} and {HELDOUT_FILE} to {out_dir}")


def run(config: TrainConfig, out_dir: Path, text_file: Path | None) -> dict[str, float]:
    """The whole run; returns the final losses."""
    torch.manual_seed(config.seed)  # nothing should draw from it, but in case something does
    generator = torch.Generator().manual_seed(config.seed)
    corpus = load_corpus(config, text_file)
    params = init_tensors(config, generator)
    for tensor in params.values():
        tensor.requires_grad_(True)
    size = sum(t.numel() for t in params.values())
    print(
        f"RWKV-7 L{config.n_layer} D{config.n_embd}, vocabulary {config.vocab_size}: "
        f"{size:,} parameters; {config.steps} steps of {config.tokens_per_step} tokens "
        f"({config.steps * config.tokens_per_step / len(corpus.stream):.1f} epochs)"
    )
    speed = train(params, corpus.stream, corpus.heldout, config, generator)
    minutes, tokens_per_second = speed["train_seconds"] / 60, speed["tokens_per_second"]
    print(f"trained in {minutes:.1f} min, {tokens_per_second:,.0f} tokens/s")

    # What ships is bf16, so the losses reported are those of the rounded weights.
    shipped = {name: t.detach().to(torch.bfloat16).contiguous() for name, t in params.items()}
    losses = final_losses({n: t.float() for n, t in shipped.items()}, corpus, config, generator)
    for name, loss in losses.items():
        label = name.removesuffix("_loss").replace("_", " ")
        print(f"{label} loss {loss:.4f}, perplexity {math.exp(loss):.2f}")
    write_outputs(out_dir, shipped, corpus, config, losses)
    return losses


def main(argv: Sequence[str] | None = None) -> None:
    defaults = TrainConfig()
    parser = argparse.ArgumentParser(
        prog="python -m rwkv_cli.demo.train", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--out", type=Path, default=demo_dir(), help="output folder")
    parser.add_argument("--text", type=Path, help="the saved output of `bible` (see corpus.py)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    for field in dataclasses.fields(TrainConfig):
        parser.add_argument(
            "--" + field.name.replace("_", "-"),
            type=type(getattr(defaults, field.name)),
            default=getattr(defaults, field.name),
        )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    # Bit-for-bit repeatable runs (same torch version and thread count): with several threads,
    # some backward passes accumulate in a varying order unless told not to.
    torch.use_deterministic_algorithms(True)
    config = TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)})
    run(config, args.out, args.text)


if __name__ == "__main__":
    main()
