"""`slowllama bench` with the pipeline's depths changed: how many files are read ahead, how many writes queue.

    python benchmarks/pipeline_knobs.py LOOKAHEAD WRITE_QUEUE [VERIFY 0|1] -- BENCH ARGS...

An experiment behind RESULTS.md's choice of the defaults (2 and 2); bench itself keeps them fixed.
"""

import sys

import slowllama.commands.bench as bench
from slowllama.cli import main

lookahead, write_queue, *rest = sys.argv[1:sys.argv.index("--")]
verify = rest[0] != "0" if rest else True
original = bench.make_engine


def make_engine(store, settings, **kw):
    store.verify = verify
    if kw.get("lookahead"):
        kw["lookahead"] = int(lookahead)
    if kw.get("write_queue"):
        kw["write_queue"] = int(write_queue)
    return original(store, settings, **kw)


bench.make_engine = make_engine
sys.exit(main(["bench", *sys.argv[sys.argv.index("--") + 1:]]))
