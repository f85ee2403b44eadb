"""python -m experiments.bench NAME [options]"""

import importlib
import sys

from experiments.allocator import keep_freed_memory

BENCHES = {"mot": "experiments.bench.mot", "moe": "experiments.bench.moe",
           "ops": "experiments.bench.ops", "train": "experiments.bench.train",
           "ep": "experiments.bench.ep", "data": "experiments.bench.data"}


def main() -> int:
    if len(sys.argv) < 2 or sys.argv[1] not in BENCHES:
        print(f"usage: python -m experiments.bench NAME [options]; NAME one of {sorted(BENCHES)}",
              file=sys.stderr)
        return 2
    print(f"CPU allocator: {keep_freed_memory()} (experiments/allocator.py)")
    return importlib.import_module(BENCHES[sys.argv[1]]).main(sys.argv[2:])


if __name__ == "__main__":
    sys.exit(main())
