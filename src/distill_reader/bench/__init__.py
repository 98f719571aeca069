"""``distill bench``: how close DistillReader runs to its limits, beside the alternatives.

One module per scenario (see ``docs/benchmarks.md``); every figure is a ratio of two rates
measured in the same run. :mod:`.teachers` holds the simulated teachers, :mod:`.harness` what the
scenarios share, :mod:`.commands` the click command.

Internal: not public API (the public surface is what ``distill_reader`` exports; docs/architecture.md).
"""
