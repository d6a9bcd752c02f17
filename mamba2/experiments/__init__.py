"""The paper's experiments at small scale, each one command (``mamba2 experiment NAME --out DIR``):

- :mod:`~mamba2.experiments.mqar`: multi-query associative recall (Dao & Gu 2024, §9.1, Fig. 8).

Each experiment is a grid of independent runs (:mod:`~mamba2.experiments.grid`): a run appends one JSON line to a
results file as it ends, so a grid can be split into parts run separately (``--part i/n``), interrupted and
continued, and the parts' files merged into one table, JSON and plot.
"""
