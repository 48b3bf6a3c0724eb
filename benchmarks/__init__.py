"""spu_kernels' benchmarks: ``python -m benchmarks.run`` (the runner), ``python -m benchmarks.report``
(RESULTS.md and plots from the CSVs), ``python -m benchmarks.gpu_report`` (``make gpu-report``)."""
