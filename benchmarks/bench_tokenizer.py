"""Time rwkv-cli's World tokenizer against the official one (``rwkv`` package, TRIE_TOKENIZER).

Run: ``python benchmarks/bench_tokenizer.py [--megabytes 1.0] [--repeats 3]``. Builds about 1 MB of
mostly English text with some code, CJK and emoji, checks that both tokenizers agree on it, then
prints the vocabulary load time and the encode/decode throughput of each, best of ``--repeats``.
"""

from __future__ import annotations

import argparse
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rwkv_cli.tokenizer.world import VOCAB_FILE, WorldTokenizer

PROSE = [
    "The committee met on Tuesday to review the budget for the coming year.",
    "Most of the discussion focused on whether the new library should open on weekends.",
    "According to the report, visitor numbers rose by 12.5% after the renovation in 2021.",
    "Nobody expected the experiment to work the first time, and it didn't.",
    "She packed a notebook, two pencils, and a thermos of coffee before heading out.",
    "In the morning the fog lifted slowly from the valley, revealing the old stone bridge.",
    "Recurrent networks keep a fixed-size state, so memory use does not grow with context.",
    "If you have questions, please contact the help desk at support@example.org.",
    "He argued, somewhat unconvincingly, that the delay was caused by the weather.",
    "The results (see Table 3) suggest a strong correlation between sleep and recall.",
    "What would happen if every household reduced its water consumption by a tenth?",
    "Prices for fresh vegetables vary widely between the northern and southern markets.",
]
CODE = (
    "\n```python\n"
    "def moving_average(values: list[float], window: int = 3) -> list[float]:\n"
    "    if window <= 0:\n"
    '        raise ValueError("window must be positive")\n'
    "    return [sum(values[i : i + window]) / window for i in range(len(values) - window + 1)]\n"
    "```\n\n"
)
OTHER_SCRIPTS = [
    "他说：“我们明天再讨论这个问题。” ",
    "今日はとても良い天気ですね。 ",
    "감사합니다, 다음에 또 만나요. ",
    "Great job 👍🏽🎉 see you soon 👨‍👩‍👧 ",
]


def build_text(megabytes: float, seed: int = 0) -> str:
    """Shuffled English sentences in paragraphs, with code or another script now and then."""
    rng = random.Random(seed)
    target = int(megabytes * 1_000_000)
    pieces: list[str] = []
    size = 0
    while size < target:
        paragraph = " ".join(rng.sample(PROSE, k=rng.randint(3, 7))) + "\n\n"
        roll = rng.random()
        if roll < 0.08:
            paragraph += CODE
        elif roll < 0.16:
            paragraph += rng.choice(OTHER_SCRIPTS) + "\n\n"
        pieces.append(paragraph)
        size += len(paragraph.encode("utf-8"))
    return "".join(pieces)


def best_time(function: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    """The fastest of ``repeats`` calls, in seconds, and the last result."""
    best = float("inf")
    result = None
    for _ in range(repeats):
        start = time.perf_counter()
        result = function()
        best = min(best, time.perf_counter() - start)
    return best, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--megabytes", type=float, default=1.0, help="size of the test text")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs; the best is shown")
    args = parser.parse_args()

    try:
        from rwkv import rwkv_tokenizer
    except ImportError:
        raise SystemExit(
            "The official `rwkv` package is needed: pip install rwkv==0.8.32"
        ) from None

    text = build_text(args.megabytes)
    megabytes = len(text.encode("utf-8")) / 1e6
    ours_vocab = Path(__file__).parents[1] / "rwkv_cli" / "data" / VOCAB_FILE
    official_vocab = Path(rwkv_tokenizer.__file__).with_name(VOCAB_FILE)

    # Ours first: loading while the official tokenizer's large trie is alive makes the garbage
    # collector slower for everybody.
    ours_load, ours = best_time(lambda: WorldTokenizer.from_file(ours_vocab), 1)
    official_load, official = best_time(
        lambda: rwkv_tokenizer.TRIE_TOKENIZER(str(official_vocab)), 1
    )

    ours_encode, ids = best_time(lambda: ours.encode(text), args.repeats)
    official_encode, official_ids = best_time(lambda: official.encode(text), args.repeats)
    if ids != official_ids:
        raise SystemExit("The tokenizers disagree on the benchmark text; timings are meaningless.")
    ours_decode, decoded = best_time(lambda: ours.decode(ids), args.repeats)
    official_decode, _ = best_time(lambda: official.decode(ids), args.repeats)
    if decoded != text:
        raise SystemExit("Decoding did not give the benchmark text back.")

    print(
        f"text: {megabytes:.2f} MB, {len(ids):,} tokens ({megabytes * 1e6 / len(ids):.2f} B/token)"
    )
    print(f"{'':8} {'rwkv-cli':>12} {'official':>12} {'speed-up':>9}")
    print(
        f"{'load':8} {ours_load:>11.3f}s {official_load:>11.3f}s {official_load / ours_load:>8.1f}x"
    )
    for label, ours_time, official_time in [
        ("encode", ours_encode, official_encode),
        ("decode", ours_decode, official_decode),
    ]:
        print(
            f"{label:8} {megabytes / ours_time:>7.1f} MB/s {megabytes / official_time:>7.1f} MB/s "
            f"{official_time / ours_time:>8.1f}x"
        )


if __name__ == "__main__":
    main()
