"""Resume an interrupted run: the second call continues the first exactly where it stopped.

    python examples/resume_run.py [--quick]

The first call is cut short by a time budget, as Ctrl-C or a SIGTERM from a scheduler would cut it
(each saves a checkpoint and returns). Calling fit again with the same model, data and out, and
resume=True, restores the weights, optimizer, random streams and data position, and logs the same
losses a run that was never interrupted would have logged.
"""
import argparse
import tempfile

import torch
from torch import nn

import rnnkit

parser = argparse.ArgumentParser()
parser.add_argument("--quick", action="store_true")
args = parser.parse_args()

torch.manual_seed(0)
x = torch.randn(2048, 30, 4)
y = (x[..., 0].cumsum(1)[:, -1] > 0).long()        # the sign of a running sum: two classes
steps, out = (40 if args.quick else 600), tempfile.mkdtemp() + "/run"


def make_model():
    torch.manual_seed(1)
    return nn.Sequential(rnnkit.GRU(4, 32, batch_first=True), SelectLast(), nn.Linear(32, 2))


class SelectLast(nn.Module):
    def forward(self, out):                          # the GRU's (output, state) -> last step's output
        return out[0][:, -1]


train, val = (x[:1792], y[:1792]), (x[1792:], y[1792:])
_, first = rnnkit.fit(make_model(), train, val=val, loss="cross_entropy", metrics=["accuracy"], steps=steps,
                      time_budget=0.5, out=out, threads=1)
print(f"first call stopped by {first['stopped_by']} at step {first['step']}")
# the same call with resume=True; the time budget of the first call is lifted (None: no limit)
model, summary = rnnkit.fit(make_model(), train, val=val, loss="cross_entropy", metrics=["accuracy"], steps=steps,
                            out=out, resume=True, time_budget=None, threads=1)
print(f"resumed and finished at step {summary['step']}: validation accuracy {summary['val']['accuracy']:.3f}")
