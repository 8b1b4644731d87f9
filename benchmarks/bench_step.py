"""Time a minispatial training step (both backends, optionally PyTorch): see minispatial/bench.py.

    python benchmarks/bench_step.py [--batch 64,128,512] [--repeat N] [--torch] [--json] [--extras] [--profile]
"""

import sys

from minispatial.bench import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
