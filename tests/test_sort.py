"""The sort task: data, the four decoders, greedy and beam search, learning (issue 7)."""

from __future__ import annotations

import pytest
import torch

from rnnkit.common.errors import UsageError
from rnnkit.tasks.sort import DECODERS, SortConfig, SortModel, SortTask, data
from rnnkit.tasks.sort.data import make_batch
from rnnkit.tasks.sort.search import beam_search, decode, greedy

TINY = dict(embed=8, hidden=8, attn=8)


def tiny_model(decoder: str, vocab: int = 8, floats: bool = False, int_value: bool = False) -> SortModel:
    return SortModel(decoder, vocab, floats, int_value=int_value, **TINY).eval()


def test_train_batches_are_a_pure_function_of_the_step():
    task = SortTask(SortConfig(min_len=2, max_len=9, batch_size=4), run_dir="unused")
    a, b = task.train_batch(7, 0, 1), task.train_batch(7, 0, 1)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert torch.equal(a.targets, a.inputs.gather(1, a.order))
    assert bool((a.targets[:, 1:] >= a.targets[:, :-1]).all())
    lengths = {task.train_batch(step, 0, 1).inputs.shape for step in range(30)}
    assert {shape[0] for shape in lengths} == {4} and len(lengths) > 1  # one length per step, not always the same
    assert all(2 <= shape[1] <= 9 for shape in lengths)
    fixed = SortTask(SortConfig(min_len=5, max_len=5, batch_size=4), run_dir="unused")
    step7, step8 = fixed.train_batch(7, 0, 1), fixed.train_batch(8, 0, 1)
    assert step7.inputs.shape == step8.inputs.shape == (4, 5)
    assert not torch.equal(step7.inputs, step8.inputs)  # another step, other numbers
    ranks = [fixed.train_batch(7, rank, 2).inputs for rank in (0, 1)]
    assert [r.shape for r in ranks] == [(2, 5), (2, 5)] and not torch.equal(*ranks)  # each process its own rows


def test_test_sets_are_fixed_and_independent_of_the_data_seed():
    one = SortTask(SortConfig(data_seed=1, eval_size=5), "unused")._test_set(6)
    two = SortTask(SortConfig(data_seed=2, eval_size=5), "unused")._test_set(6)
    assert torch.equal(one.inputs, two.inputs)
    floats = data.test_set(6, 5, vocab=128, floats=True).inputs
    assert floats.dtype == torch.float32 and float(floats.min()) >= 0 and float(floats.max()) < 1


@pytest.mark.parametrize("int_value", [False, True])
@pytest.mark.parametrize("decoder", list(DECODERS))
def test_every_decoder_gives_logits_and_a_finite_loss(decoder, int_value):
    model = tiny_model(decoder, int_value=int_value)
    x = torch.randint(0, 8, (3, 5))
    logits, loss = model(x, x.argsort(dim=1, stable=True))
    classes = 5 if decoder == "pointer" else 8
    assert logits.shape == (3, 5, classes) and torch.isfinite(loss)
    logits, loss = model(x)
    assert logits.shape == (3, 5, classes) and loss is None


@pytest.mark.parametrize("decoder", list(DECODERS))
def test_beam_of_one_equals_greedy(decoder):
    model = tiny_model(decoder)
    x = torch.randint(0, 8, (6, 7))
    with torch.no_grad():
        assert torch.equal(beam_search(model, x, 1), greedy(model, x))


@pytest.mark.parametrize("decoder", list(DECODERS))
def test_wider_beams_find_outputs_at_least_as_likely_as_greedy(decoder):
    model = tiny_model(decoder)
    x = torch.randint(0, 8, (8, 6))

    def log_prob(choices):  # log p(choices | x), feeding the choices back as the decoder's inputs
        logits, _ = model_choices(model, x, choices)
        return torch.log_softmax(logits, dim=2).gather(2, choices[..., None]).squeeze(2).sum(dim=1)

    with torch.no_grad():
        assert bool((log_prob(beam_search(model, x, 4)) >= log_prob(greedy(model, x)) - 1e-5).all())


def model_choices(model: SortModel, x: torch.Tensor, choices: torch.Tensor):
    memory = model.encode(x)
    state = model.decoder.start(memory)
    prev = torch.full((x.shape[0],), -1, dtype=torch.long)
    steps = []
    for t in range(x.shape[1]):
        logits, state = model.decoder.step(prev, state, memory)
        steps.append(logits)
        prev = choices[:, t]
    return torch.stack(steps, dim=1), None


@pytest.mark.parametrize("beam", [1, 3])
def test_pointer_outputs_are_permutations_of_the_input(beam):
    ints = torch.randint(0, 4, (16, 9))  # many repeated values
    out = decode(tiny_model("pointer", vocab=4), ints, beam)
    assert torch.equal(out.sort(dim=1).values, ints.sort(dim=1).values)
    floats = torch.rand(16, 9)
    out = decode(tiny_model("pointer", floats=True), floats, beam)
    assert torch.equal(out.sort(dim=1).values, floats.sort(dim=1).values)


def test_beam_wider_than_the_choices_is_fine():
    x = torch.tensor([[2, 1]])
    assert sorted(decode(tiny_model("pointer"), x, beam=5)[0].tolist()) == [1, 2]


def test_pointer_loss_treats_equal_values_as_interchangeable():
    model = tiny_model("pointer")
    x = torch.tensor([[3, 3, 1]])
    _, loss_a = model(x, torch.tensor([[2, 0, 1]]))
    _, loss_b = model(x, torch.tensor([[2, 1, 0]]))
    assert torch.allclose(loss_a, loss_b)


@pytest.mark.parametrize("decoder", ["pointer", "attention"])
def test_a_tiny_problem_is_learned_exactly(decoder):
    torch.manual_seed(0)
    model = SortModel(decoder, vocab=8, floats=False, embed=16, hidden=32, attn=16)
    batch = make_batch(torch.randint(0, 8, (16, 4), generator=torch.Generator().manual_seed(0)))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for step in range(300):
        _, loss = model(batch.inputs, batch.order)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 20 == 19 and torch.equal(decode(model.eval(), batch.inputs), batch.targets):
            break
        model.train()
    assert torch.equal(decode(model.eval(), batch.inputs), batch.targets), f"loss {float(loss):.4f} at step {step}"


def test_floats_need_the_pointer_decoder():
    with pytest.raises(UsageError, match="--floats needs --decoder pointer"):
        SortConfig(floats=True, decoder="state-only")


@pytest.mark.parametrize(
    "flags, message",
    [
        (dict(hidden=0), "--hidden must be at least 1, got 0"),
        (dict(min_len=300, max_len=300), "need --min-len <= --max-len <= --max-input-len, got 300, 300, 256"),
        (dict(min_len=5, max_len=3), "need --min-len <= --max-len <= --max-input-len, got 5, 3, 256"),
        (dict(cell="nowhere_module:Cell"), "--cell nowhere_module:Cell: cannot import nowhere_module"),
    ],
)
def test_bad_config_is_a_usage_error(flags, message):
    with pytest.raises(UsageError, match=message):
        SortConfig(**flags)


def test_a_config_of_an_earlier_version_loads_with_its_model():
    from rnnkit.engine.config import from_saved

    old = {"n": None, "n_min": 2, "n_max": 6, "max_n": 256, "decoder": "seed", "vocab": 128, "embed": 8}
    config = from_saved(SortConfig, old)
    assert (config.min_len, config.max_len, config.max_input_len) == (2, 6, 256)
    assert (config.decoder, config.int_value) == ("state-only", False)  # int_value's default was False
    assert from_saved(SortConfig, {"n": 9, "int_value": True}).lengths == (9, 9)
    assert SortConfig().int_value  # the magnitude channel is now on by default
