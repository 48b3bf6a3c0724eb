"""One module per suite; each has ``cases(smoke: bool, device: str) -> list[benchmarks.measure.Case]``
(and ``ISOLATED = True`` when it must run in a process of its own). benchmarks/run.py lists them."""
