"""The sorting model: an RNN encoder and one of four decoders, from a bare state hand-off to pointers.

Encoder: embed each number (integers: a table of V learned vectors, one per token, plus with
`int_value` a linear map of the magnitude x/V; floats: a linear map of the value), run a
`num_layers`-deep, optionally bidirectional recurrent layer over them:

    e_j = embed(x_j)                      (B, N, E)
    o_j, s = encoder(e_1..e_N)            o: (B, N, D*H); s: final state, torch layout (L*D, B, H)

The decoder is a stack of L cells of width D*H (the two directions' states side by side), so the
encoder's final state hands off layer by layer with no extra parameters. Decoders (DECODERS):

    state-only the plain many-to-one-to-many model: the hand-off is all the decoder gets, its inputs
               are zeros, y_t = W h_t over V tokens. Everything must pass through one state vector.
    teacher    the same, with the previous output token as the next input (teacher forcing in
               training: the true previous token).
    attention  Luong, Pham & Manning 2015 global attention with input feeding and the additive
               ("concat", Bahdanau, Cho & Bengio 2015) score:
                   h_t = cell([emb(y_{t-1}); h~_{t-1}], s_{t-1})
                   a_tj = softmax_j v^T tanh(W_k o_j + W_q h_t);  c_t = sum_j a_tj o_j
                   h~_t = tanh(W_c [c_t; h_t]);  y_t = W_s h~_t over V tokens
    pointer    Vinyals, Fortunato & Jaitly 2015 Pointer Networks: the output is a position, not a value,
               over keys k_j = [o_j; e_j] (the encoder output and, as a skip, the embedded value):
                   h_t = cell(k_{p_{t-1}}, s_{t-1})           (k_{p_0} a learned start vector)
                   u_tj = v^T tanh(W_k k_j + W_q h_t), -inf where j was already chosen
                   p_t = argmax_j u_tj
               so every output is a permutation of the input, for any N and for floats.

Every decoder speaks one step contract, used by teacher-forced training, greedy and beam search alike:

    state = decoder.start(memory)                      memory: the encoder's Memory
    logits, state = decoder.step(prev, state, memory)  prev (B,) the previous choice, -1 at t = 0;
                                                       logits (B, C): C = V tokens, or N positions

`state` is a NamedTuple of tensors (or tuples of them) with the batch first, so beam search can
reorder it with one index.

>>> import torch
>>> from rnnkit.tasks.sort.model import SortModel
>>> model = SortModel(decoder="pointer", vocab=16, floats=False, embed=8, hidden=8, num_layers=1)
>>> x = torch.tensor([[3, 1, 2]])
>>> logits, loss = model(x, order=x.argsort(dim=1))
>>> tuple(logits.shape), loss.shape
((1, 3, 3), torch.Size([]))
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from rnnkit.core import HiddenState, Recurrent
from rnnkit.tasks.cell_spec import resolve_cell
from rnnkit.tasks.regularisers import RegulariserOptions, regularised, unwrapped


class Memory(NamedTuple):
    """What the encoder hands the decoder; every tensor has the batch first."""

    inputs: Tensor  # (B, N) the numbers being sorted (long tokens or floats)
    embedded: Tensor  # (B, N, E) e_j
    outputs: Tensor  # (B, N, D*H) o_j
    state: tuple  # per decoder layer, a cell state NamedTuple of (B, D*H) tensors


def map_tensors(fn, obj: Any) -> Any:
    """Apply `fn` to every tensor in a (nested) tuple / NamedTuple, keeping the structure."""
    if isinstance(obj, Tensor):
        return fn(obj)
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return type(obj)(*(map_tensors(fn, x) for x in obj))
    if isinstance(obj, tuple):
        return tuple(map_tensors(fn, x) for x in obj)
    return obj


class CellStack(nn.Module):
    """L cells, each feeding the next: one decoder step through all layers."""

    def __init__(self, cell: str, input_size: int, hidden_size: int, num_layers: int):
        super().__init__()
        self.cells = nn.ModuleList(
            resolve_cell(cell)(input_size if layer == 0 else hidden_size, hidden_size) for layer in range(num_layers)
        )

    def forward(self, x: Tensor, states: tuple) -> tuple[Tensor, tuple]:
        new_states = []
        for cell, state in zip(self.cells, states):
            x, state = cell.advance(x, state)  # (B, H)
            new_states.append(state)
        return x, tuple(new_states)


class Additive(nn.Module):
    """The additive score v^T tanh(W_k k_j + W_q q) (Bahdanau et al. 2015), keys projected once."""

    def __init__(self, key_size: int, query_size: int, size: int):
        super().__init__()
        self.key = nn.Linear(key_size, size, bias=False)
        self.query = nn.Linear(query_size, size)
        self.v = nn.Linear(size, 1, bias=False)

    def forward(self, projected_keys: Tensor, query: Tensor) -> Tensor:
        """projected_keys (B, N, A) = self.key(keys), query (B, Q) -> scores (B, N)."""
        return self.v(torch.tanh(projected_keys + self.query(query)[:, None, :])).squeeze(-1)


# ---- decoders ------------------------------------------------------------------------------------
class CellsState(NamedTuple):
    cells: tuple  # per layer cell state


class StateOnlyDecoder(nn.Module):
    """The encoder's final state is all it gets: zero inputs, a V-way output per step."""

    def __init__(self, cell: str, vocab: int, embed: int, width: int, num_layers: int, key_size: int, attn: int):
        super().__init__()
        self.embed_size = embed
        self.cells = CellStack(cell, embed, width, num_layers)
        self.out = nn.Linear(width, vocab)

    def start(self, memory: Memory) -> CellsState:
        return CellsState(memory.state)

    def step(self, prev: Tensor, state: CellsState, memory: Memory) -> tuple[Tensor, CellsState]:
        x = memory.outputs.new_zeros(prev.shape[0], self.embed_size)  # no input: the state carries everything
        h, cells = self.cells(x, state.cells)
        return self.out(h), CellsState(cells)


class TeacherDecoder(nn.Module):
    """The previous output token is the next input; token V stands for "start"."""

    def __init__(self, cell: str, vocab: int, embed: int, width: int, num_layers: int, key_size: int, attn: int):
        super().__init__()
        self.vocab = vocab
        self.embed = nn.Embedding(vocab + 1, embed)
        self.cells = CellStack(cell, embed, width, num_layers)
        self.out = nn.Linear(width, vocab)

    def start(self, memory: Memory) -> CellsState:
        return CellsState(memory.state)

    def step(self, prev: Tensor, state: CellsState, memory: Memory) -> tuple[Tensor, CellsState]:
        x = self.embed(torch.where(prev < 0, self.vocab, prev))  # (B, E)
        h, cells = self.cells(x, state.cells)
        return self.out(h), CellsState(cells)


class AttentionState(NamedTuple):
    cells: tuple  # per layer cell state
    feed: Tensor  # (B, W) h~_{t-1}, fed back as input (Luong's input feeding)
    keys: Tensor  # (B, N, A) W_k o_j, projected once in start()


class AttentionDecoder(nn.Module):
    """Luong global attention with input feeding and the additive score over the encoder outputs."""

    def __init__(self, cell: str, vocab: int, embed: int, width: int, num_layers: int, key_size: int, attn: int):
        super().__init__()
        self.vocab = vocab
        self.embed = nn.Embedding(vocab + 1, embed)
        self.cells = CellStack(cell, embed + width, width, num_layers)
        self.score = Additive(width, width, attn)
        self.combine = nn.Linear(2 * width, width)
        self.out = nn.Linear(width, vocab)

    def start(self, memory: Memory) -> AttentionState:
        B, _, W = memory.outputs.shape
        return AttentionState(memory.state, memory.outputs.new_zeros(B, W), self.score.key(memory.outputs))

    def step(self, prev: Tensor, state: AttentionState, memory: Memory) -> tuple[Tensor, AttentionState]:
        x = torch.cat([self.embed(torch.where(prev < 0, self.vocab, prev)), state.feed], dim=1)  # (B, E+W)
        h, cells = self.cells(x, state.cells)
        weights = torch.softmax(self.score(state.keys, h), dim=1)  # (B, N)
        context = torch.bmm(weights[:, None, :], memory.outputs).squeeze(1)  # (B, W)
        feed = torch.tanh(self.combine(torch.cat([context, h], dim=1)))  # (B, W)
        return self.out(feed), AttentionState(cells, feed, state.keys)


class PointerState(NamedTuple):
    cells: tuple  # per layer cell state
    chosen: Tensor  # (B, N) bool, positions already output
    keys: Tensor  # (B, N, K) k_j = [o_j; e_j]
    projected: Tensor  # (B, N, A) W_k k_j, projected once in start()


class PointerDecoder(nn.Module):
    """Pointer Network decoder: a distribution over input positions, chosen positions masked."""

    def __init__(self, cell: str, vocab: int, embed: int, width: int, num_layers: int, key_size: int, attn: int):
        super().__init__()
        self.first = nn.Parameter(torch.zeros(key_size))
        self.cells = CellStack(cell, key_size, width, num_layers)
        self.score = Additive(key_size, width, attn)

    def start(self, memory: Memory) -> PointerState:
        keys = torch.cat([memory.outputs, memory.embedded], dim=2)  # (B, N, K)
        chosen = torch.zeros(memory.inputs.shape, dtype=torch.bool, device=keys.device)
        return PointerState(memory.state, chosen, keys, self.score.key(keys))

    def step(self, prev: Tensor, state: PointerState, memory: Memory) -> tuple[Tensor, PointerState]:
        B = prev.shape[0]
        started = (prev >= 0)[:, None]  # (B, 1)
        index = prev.clamp(min=0)
        # the position just chosen, compared against arange(N) rather than one_hot(index, N): one_hot's
        # class count is a plain int, which would fix N in an exported program (torch.export, ONNX)
        positions = torch.arange(state.chosen.shape[1], device=prev.device)  # (N,)
        chosen = state.chosen | ((positions == index[:, None]) & started)  # (B, N)
        x = torch.where(started, state.keys[torch.arange(B, device=prev.device), index], self.first)  # (B, K)
        h, cells = self.cells(x, state.cells)
        logits = self.score(state.projected, h).masked_fill(chosen, float("-inf"))  # (B, N)
        return logits, PointerState(cells, chosen, state.keys, state.projected)


DECODERS: dict[str, type[nn.Module]] = {
    "state-only": StateOnlyDecoder,
    "teacher": TeacherDecoder,
    "attention": AttentionDecoder,
    "pointer": PointerDecoder,
}
POINTS = {"pointer"}  # decoders whose choices are input positions rather than token values


# ---- the whole model -----------------------------------------------------------------------------
class SortModel(nn.Module):
    """Encoder + decoder. `forward` returns (logits, loss): teacher-forced with targets, greedy without.
    Beam search (search.py) drives `encode` and `decoder.start/step` itself."""

    def __init__(
        self,
        decoder: str,
        vocab: int,
        floats: bool,
        embed: int = 64,
        hidden: int = 128,
        num_layers: int = 1,
        bidirectional: bool = True,
        cell: str = "lstm",
        attn: int = 64,
        int_value: bool = False,
        regularisers: RegulariserOptions | None = None,
    ):
        super().__init__()
        if decoder not in DECODERS:
            raise ValueError(f"decoder must be one of {', '.join(DECODERS)}, got {decoder!r}")
        if floats and decoder not in POINTS:
            raise ValueError(
                f"floats need a pointing decoder ({', '.join(sorted(POINTS))}): the {decoder!r} "
                f"decoder emits one of V integer tokens, and real numbers have no vocabulary"
            )
        self.decoder_name = decoder
        self.points = decoder in POINTS
        self.floats = floats
        self.num_layers = num_layers
        D = 2 if bidirectional else 1
        width = D * hidden
        self.vocab = vocab
        self.embed = nn.Linear(1, embed) if floats else nn.Embedding(vocab, embed)
        # integers as numbers too: a magnitude channel makes "smaller than" one linear feature to learn
        self.value = nn.Linear(1, embed, bias=False) if int_value and not floats else None
        encoder = Recurrent(
            resolve_cell(cell), embed, hidden, num_layers=num_layers, batch_first=True, bidirectional=bidirectional
        )
        # the regularisers on the encoder alone: the decoder runs one step at a time, where a mask drawn
        # once per sequence would be drawn again at every step
        self.encoder = regularised(encoder, regularisers or RegulariserOptions())
        self.decoder = DECODERS[decoder](cell, vocab, embed, width, num_layers, key_size=width + embed, attn=attn)

    def encode(self, inputs: Tensor) -> Memory:
        """inputs (B, N) -> Memory for the decoder."""
        embedded = self.embed(inputs[..., None].float()) if self.floats else self.embed(inputs)  # (B, N, E)
        if self.value is not None:
            embedded = embedded + self.value(inputs[..., None].float() / self.vocab)
        outputs, state = self.encoder(embedded)  # (B, N, D*H)
        if isinstance(state, Tensor):  # single-field states (GRU, RNN) come back as a bare h
            state = HiddenState(state)
        D = unwrapped(self.encoder).num_directions
        # rows layer*D + direction -> per layer one state of width D*H, the directions side by side
        per_layer = tuple(
            type(state)(*(torch.cat([part[layer * D + d] for d in range(D)], dim=1) for part in state))
            for layer in range(self.num_layers)
        )
        return Memory(inputs, embedded, outputs, per_layer)

    def targets_of(self, inputs: Tensor, order: Tensor) -> Tensor:
        """What each step should choose: input positions for a pointer, else the sorted tokens (B, N)."""
        return order if self.points else inputs.gather(1, order)

    def forward(self, inputs: Tensor, order: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """inputs (B, N) -> (logits (B, N, C), loss). With `order` (the stable argsort of `inputs`) the
        decoder is teacher-forced and loss is the mean cross-entropy per output element; without it the
        decoder feeds back its own greedy choices and loss is None. For a pointer, equal values are
        interchangeable: the loss is -log of the probability of all still-unchosen positions that hold
        the right value."""
        B, N = inputs.shape
        targets = self.targets_of(inputs, order) if order is not None else None  # (B, N)
        memory = self.encode(inputs)
        state = self.decoder.start(memory)
        prev = torch.full((B,), -1, dtype=torch.long, device=inputs.device)
        steps = []
        for t in range(N):
            logits, state = self.decoder.step(prev, state, memory)  # (B, C)
            steps.append(logits)
            prev = targets[:, t] if targets is not None else logits.argmax(dim=1)
        logits = torch.stack(steps, dim=1)  # (B, N, C)
        if order is None:
            return logits, None
        if self.points:
            sorted_values = inputs.gather(1, order)  # (B, N)
            right_value = inputs[:, None, :] == sorted_values[:, :, None]  # (B, N steps, N positions)
            logp = torch.log_softmax(logits, dim=2)
            loss = -torch.logsumexp(logp.masked_fill(~right_value, float("-inf")), dim=2).mean()
        else:
            loss = F.cross_entropy(logits.reshape(B * N, -1), targets.reshape(B * N))
        return logits, loss
