"""Fuzz the TFLite importer: mutate bytes of a real model and check that every outcome is a model or a
`TFLiteImportError` (never an IndexError, struct.error or flatbuffers traceback).

    python benchmarks/fuzz_tflite.py --seconds 120 [--file PATH] [--seed 0]

Prints one JSON line: iterations, outcomes by kind, and the first few unexpected exceptions (with the mutation that
caused each, so it can be replayed). Exits 1 if any unexpected exception occurred.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
import traceback
from pathlib import Path

from deeplab.convert.tflite import load_tflite
from deeplab.convert.tflite_file import TFLiteImportError

DEFAULT_FILE = (
    Path(__file__).resolve().parents[1].parent / "shared/models/deeplabv3-mnv2-dm05-voc/deeplabv3_257_mv_gpu.tflite"
)
# The converter writes the tables (tensors, ops, options) before and after the weight data; most bytes are weights,
# so mutations aim at the first and last 32 KiB half of the time to reach the parser's structure.
STRUCTURE_BYTES = 32 * 1024


def mutate(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    n = len(data)
    region = rng.random()
    if region < 0.25:
        pos = rng.randrange(min(n, STRUCTURE_BYTES))
    elif region < 0.5:
        pos = rng.randrange(max(0, n - STRUCTURE_BYTES), n)
    else:
        pos = rng.randrange(n)
    kind = rng.choice(["flip", "overwrite", "int32", "truncate", "delete", "insert"])
    buf = bytearray(data)
    if kind == "flip":
        buf[pos] ^= 1 << rng.randrange(8)
    elif kind == "overwrite":
        length = rng.randint(1, 16)
        buf[pos : pos + length] = bytes(rng.randrange(256) for _ in range(length))[: n - pos]
    elif kind == "int32":  # boundary values where flatbuffers keeps offsets and lengths
        value = rng.choice([b"\x00\x00\x00\x00", b"\xff\xff\xff\xff", b"\xff\xff\xff\x7f", b"\x00\x00\x00\x80"])
        buf[pos : pos + 4] = value[: n - pos]
    elif kind == "truncate":
        del buf[pos:]
    elif kind == "delete":
        del buf[pos : pos + rng.randint(1, 8)]
    else:
        buf[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
    return bytes(buf), f"{kind}@{pos}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="time budget")
    parser.add_argument("--file", type=Path, default=DEFAULT_FILE, help="a valid .tflite to mutate")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if not args.file.is_file():
        print(json.dumps({"error": f"{args.file} not found; pass --file"}))
        return 2
    data = args.file.read_bytes()
    rng = random.Random(args.seed)
    counts = {"iterations": 0, "loaded": 0, "import_error": 0, "unexpected": 0}
    examples: list[dict[str, str]] = []
    deadline = time.monotonic() + args.seconds
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "fuzzed.tflite"
        while time.monotonic() < deadline:
            mutated, how = mutate(data, rng)
            path.write_bytes(mutated)
            counts["iterations"] += 1
            try:
                load_tflite(path)
                counts["loaded"] += 1
            except TFLiteImportError:
                counts["import_error"] += 1
            except Exception as e:  # noqa: BLE001 - exactly what the fuzzer hunts for
                counts["unexpected"] += 1
                if len(examples) < 5:
                    examples.append(
                        {"mutation": how, "error": f"{type(e).__name__}: {e}", "where": traceback.format_exc(limit=-2)}
                    )
    print(json.dumps({**counts, "seconds": args.seconds, "seed": args.seed, "unexpected_examples": examples}))
    return 1 if counts["unexpected"] else 0


if __name__ == "__main__":
    sys.exit(main())
