"""Benchmarks of keisei_fn's model lifecycle against the obvious baselines, measured in one run.

Run ``python -m benchmarks`` (``make bench``); ``--help`` lists the options. Every comparison
runs its variants in interleaved, rotating rounds, so a noisy neighbour slows all of them alike;
a ratio is the median of the per-round ratios, never a ratio of medians from different runs.
Reads are warm-cache: the page cache is not dropped (a shared machine), so load figures are
CPU and memory-bandwidth bound, not disk bound.

Modules: ``timing`` (rounds, medians, paired ratios), ``cases`` (the measurements), ``report``
(Markdown and JSON).
"""
