"""The OIP client side: transports to teachers and the scheduler that spreads work over them.

Internal: not public API (the public surface is what ``distill_reader`` exports; docs/architecture.md).
"""
