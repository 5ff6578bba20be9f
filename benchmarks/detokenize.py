"""Per-token cost of turning the local engine's answer tokens into text, at answer lengths from 256
to 2,048 tokens: the incremental detokenizer the engine uses (salora/detokenize.py, a short
window per token) side by side with decoding the whole answer again for every token (what the engine
did before). On the embedded model's tokenizer (SmolLM2-135M-Instruct), a token stream encoded from
a text of this file's own, as long as needed.

    [OMP_NUM_THREADS=1] .venv/bin/python benchmarks/detokenize.py [--lengths 256,512,1024,2048] [--repeats 5] [--out FILE]

Prints one line per length: the microseconds per token of each, the whole answer's total, and the
ratio; both measured in the same process, interleaved, each the fastest of `--repeats` runs (on a
machine shared with other jobs the fastest run is the one least disturbed by them).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from tqdm import tqdm
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from salora.detokenize import Detokenized
from salora.modeldir import EMBEDDED, resolve_model_dir

PARAGRAPH = ("The gateway streams each answer as it is generated. Größere Antworten kosten mehr: 東京から大阪まで "
             "新幹線で二時間半です。 Ça dépend — 12 € ou 15 €? Emoji too 🙂🚀, and code: `for i in range(3): print(i)`.\n")


def full_decode(tokenizer: PreTrainedTokenizerBase, tokens: list[int]) -> float:
    """Seconds to decode the whole answer again after every token (the text is discarded)."""
    started = time.perf_counter()
    for n in range(1, len(tokens) + 1):
        tokenizer.decode(tokens[:n], skip_special_tokens=True, clean_up_tokenization_spaces=False)
    return time.perf_counter() - started


def incremental(tokenizer: PreTrainedTokenizerBase, tokens: list[int]) -> tuple[float, str]:
    answer = Detokenized()
    started = time.perf_counter()
    for i, token in enumerate(tokens):
        answer.add(tokenizer, token, final=i == len(tokens) - 1)
    return time.perf_counter() - started, answer.text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", default="256,512,1024,2048", help="answer lengths in tokens, comma-separated")
    parser.add_argument("--repeats", type=int, default=5, help="runs per length; the fastest counts")
    parser.add_argument("--out", type=Path, help="also write the results as JSON here")
    args = parser.parse_args()
    lengths = [int(n) for n in args.lengths.split(",")]
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_dir(EMBEDDED))
    ids = tokenizer(PARAGRAPH, add_special_tokens=False)["input_ids"]
    stream = (ids * (max(lengths) // len(ids) + 1))[: max(lengths)]
    load_before = os.getloadavg()[0]
    rows = []
    for n in tqdm(lengths, desc="answer lengths", unit="length"):
        tokens = stream[:n]
        inc_s = full_s = float("inf")
        for _ in range(args.repeats):
            took, text = incremental(tokenizer, tokens)
            inc_s, full_s = min(inc_s, took), min(full_s, full_decode(tokenizer, tokens))
        assert text == tokenizer.decode(tokens, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        rows.append({"tokens": n, "incremental_us_per_token": 1e6 * inc_s / n, "full_us_per_token": 1e6 * full_s / n,
                     "incremental_total_s": inc_s, "full_total_s": full_s})
    print(f"load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after; "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")
    print(f"{'tokens':>7} {'incremental us/token':>21} {'whole decode us/token':>22} {'incremental total s':>20} "
          f"{'whole total s':>14} {'ratio':>6}")
    for r in rows:
        print(f"{r['tokens']:>7} {r['incremental_us_per_token']:>21.1f} {r['full_us_per_token']:>22.1f} "
              f"{r['incremental_total_s']:>20.3f} {r['full_total_s']:>14.3f} "
              f"{r['full_us_per_token'] / r['incremental_us_per_token']:>6.1f}")
    if args.out:
        args.out.write_text(json.dumps({"load_average": [load_before, os.getloadavg()[0]], "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
