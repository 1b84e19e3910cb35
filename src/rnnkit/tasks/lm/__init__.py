"""The lm task (many-to-many): a character language model trained on any text, and sampling from it.

Characters (one-hot, or a learned embedding) run through a multi-layer RNN whose state is carried from
one chunk of text to the next, are projected to the vocabulary, and are trained to predict the next
character; `generate` samples one character, feeds it and the carried state back in, and repeats.

    rnnkit train lm --data input.txt            any UTF-8 file or folder; --bytes for raw bytes
    rnnkit train lm --data tinyshakespeare      downloaded once into the cache, sha256-checked
    rnnkit train lm                             the Python standard library's source (offline)
    rnnkit generate RUN_DIR --prompt "ROMEO:" --temperature 0.8

data.py: the vocabulary and the corpus; model.py: the network (CharRNN); generate.py: sampling with
the carried state; task.py: the config, batches, loss and evaluation the trainer drives.

Data. The corpus is one text: a file, the files of a folder (recursively, sorted by path, joined as
they are), a named download (`DATASETS`), or, with no `--data`, the `*.py` source of the running
interpreter's standard library (files ordered by the sha256 of their path, the first
`--corpus-bytes` bytes' worth). The vocabulary is every distinct character of the corpus (or the
256 byte values with `--bytes`) and is saved as RUN_DIR/vocab.json. The last `--val-fraction` (10%) of
the text is validation, the first 90% training: nanoGPT's shakespeare_char split, so losses compare.

Model (x: (B, T) token ids; V vocabulary size; E = --embed, 0 = one-hot input of depth V):

    e = Embed(x) or onehot(x)                   (B, T, E)
    o, state = RNN_{cell, layers, hidden}(e, state)    (B, T, H), dropout between layers
    logits = W dropout(o) + b                   (B, T, V)
    loss = mean_t CE(logits_t, x_{t+1})         nats per character; bits = nats / ln 2

`model(x, targets=None, state=None)` returns `LMOutput(logits, loss, state)`: loss is None without
targets, and `state` is always the final recurrent state, so a caller can carry it on.

Training (`--windows stateful`): the training text is cut into B equal rows, each row read left to
right in chunks of T = --seq-len; the detached final state of one step is the initial state of the
next (truncated backpropagation through time), so the model sees contexts far longer than T. Each
pass over the rows starts at a per-epoch offset in [0, T) and from a zero state. `--windows random`
draws B independent windows per step from a zero state instead. Validation runs the whole validation
text the same stateful way and reports the mean loss per character.

Generation runs the prompt once, then one step per character with the carried state: O(length).

>>> import torch
>>> vocab = Vocab.from_text("hello world")
>>> model = CharRNN(len(vocab), LMConfig(hidden=16, layers=1, embed=8))
>>> out = model(torch.tensor([vocab.encode("hello")]))
>>> tuple(out.logits.shape), out.loss
((1, 5, 8), None)
>>> len("".join(generate(model, vocab, prompt="he", length=10, seed=0)))
10
"""

from rnnkit.tasks.lm.data import DATASETS, Decoder, Vocab, read_corpus, split, split_test, stdlib_corpus
from rnnkit.tasks.lm.generate import Sampler, generate, generate_batch, start_ids
from rnnkit.tasks.lm.model import CharRNN, LMOutput, detach_state, state_from_dict, state_to_dict
from rnnkit.tasks.lm.task import LMBatch, LMConfig, LMEvalOptions, LMTask, stream_loss, window_loss

__all__ = [
    "DATASETS",
    "CharRNN",
    "Decoder",
    "LMBatch",
    "LMConfig",
    "LMEvalOptions",
    "LMOutput",
    "LMTask",
    "Sampler",
    "Vocab",
    "detach_state",
    "generate",
    "generate_batch",
    "read_corpus",
    "split",
    "split_test",
    "start_ids",
    "state_from_dict",
    "state_to_dict",
    "stdlib_corpus",
    "stream_loss",
    "window_loss",
]
