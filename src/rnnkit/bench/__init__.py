"""Benchmark rnnkit's layers against torch.nn in one process: ``python -m rnnkit.bench``.

Each measurement alternates torch and rnnkit (swapping who goes first every repeat) so drift of a
shared machine hits both, and reports the median of the repeats (the preset's count, 5 for the full
grid, or as many as fill half a second, up to 100, where calls are short). Speed ratio = torch time /
rnnkit time (above 1: rnnkit is faster); beside it, the middle half (first to third quartile) of the
ratios of each repeat's two calls, which ran next to each other: where it straddles 1, the point is a
draw on this machine. GFLOP/s counts the matmuls of the math
(``2 B T G H (I + H)`` per layer forward, three times that for forward+backward, where the input's
gradient is taken too, as for a layer inside a model) and the fraction
of peak divides by a 2048^3 matmul measured in the same run, at its start and its end (the higher
of the two; each the fastest of torch's BLAS,
oneDNN's matmul and rnnkit's own; on the development machine the last two are about 1.2x the first).

Grid: LSTM/GRU/RNN x batch {1, 32, 64} x hidden {128, 512} x T {64, 256}, input 128, float32,
training (forward+backward) and inference (forward, no_grad); per-token stepping of a 3-layer
512-wide LSTM and GRU at batch 1 (and, in the full run, at 8 and 64); a user-written LSTM cell
(its ``combine`` compiled, else the generic fused kernel) against the built-in one (hand-written
kernel), same FLOPs: training and inference at B=32, H=512, T=64, and stepping 3 x 512 at batch 1
(``--quick``: H=256).

As a torch.nn user meets them: at the grid's T = 64 points (the smoke run: its one point, the
LSTM), torch.nn's layer at its defaults (time-major input) against rnnkit's batch-first layer,
rnnkit's class at torch.nn's defaults (time-major, the same initial weights) and ``rnnkit.convert``
of a torch.nn model, the four alternated; each rnnkit way's time over the batch-first one's says
what the layout costs (``--layouts-only`` runs these rows alone).

Each row names the route rnnkit's call took (``rnnkit.explain``, core/routing.py); ``--route NAME``
runs rnnkit's side through one route (``rnnkit.routing.force``) to measure it alone.
"""

from rnnkit.bench.run import main, run_benchmark

__all__ = ["main", "run_benchmark"]
