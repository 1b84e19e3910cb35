"""`rnnkit generate` (sample from a trained language model) and `rnnkit demo` (train one in minutes).

    rnnkit generate RUN_DIR --prompt "ROMEO:" --length 500 --temperature 0.8 --seed 1
    rnnkit demo                       train an lm on the Python standard library for ~3 minutes
    rnnkit demo --time-budget 60      a quicker look

`generate` writes the prompt, then each character as soon as it is made (stdout is flushed per
character). With --num-samples K the K samples are drawn as one batch; the first streams live and the
others follow, each after a `--- sample k ---` line.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass

from rnnkit.cli.command import Command
from rnnkit.cli.flags import add_dataclass_flags, given_fields
from rnnkit.cli.runs import add_run_flags, load_selected_run
from rnnkit.common.errors import UsageError
from rnnkit.engine.config import from_dict
from rnnkit.tasks.base import option


# ---- generate -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GenerateOptions:
    prompt: str = option("", "text the samples continue (empty: the start of a line)", metavar="TEXT")
    length: int = option(500, "characters to generate")
    temperature: float = option(0.8, "softmax temperature; 0 = greedy")
    top_k: int | None = option(None, "sample only among the K likeliest characters", metavar="K")
    top_p: float | None = option(
        None, "sample only among the likeliest characters whose probability reaches P", metavar="P"
    )
    seed: int | None = option(None, "random seed; the same seed gives the same text")
    num_samples: int = option(1, "samples to draw, as one batch")


def add_generate_arguments(parser: argparse.ArgumentParser, argv: list[str]) -> None:
    parser.add_argument("run_dir", help="run directory of a trained language model (rnnkit train lm)")
    add_dataclass_flags(parser, GenerateOptions, "sampling")
    add_run_flags(parser)


def run_generate(args: argparse.Namespace) -> int:
    from rnnkit.tasks.lm import generate_batch, start_ids

    loaded = load_selected_run(args)
    if loaded.info.task != "lm":
        raise UsageError(f"{loaded.info.path} is a {loaded.info.task!r} run, not a language model (lm) run")
    g = from_dict(GenerateOptions, given_fields(args, GenerateOptions), source="flags")
    vocab = loaded.task.vocab
    start_ids(vocab, g.prompt)  # a bad prompt character fails here, before anything is printed
    stream = generate_batch(
        loaded.model, vocab, g.prompt, g.length, g.temperature, g.top_k, g.top_p, g.seed, g.num_samples
    )
    out = sys.stdout
    rest: list[list[str]] = [[] for _ in range(g.num_samples - 1)]
    out.write(g.prompt)
    out.flush()
    for pieces in stream:
        out.write(pieces[0])
        out.flush()
        for buffer, piece in zip(rest, pieces[1:]):
            buffer.append(piece)
    out.write("\n")
    for k, buffer in enumerate(rest, 2):
        out.write(f"--- sample {k} ---\n{g.prompt}{''.join(buffer)}\n")
    out.flush()
    return 0


GENERATE = Command(add_generate_arguments, run_generate)


# ---- demo -----------------------------------------------------------------------------------------
# The demo: `rnnkit train lm`'s model and training defaults (GRU 2 x 256, 64 rows x 32 chars per step);
# evaluation on 60k characters keeps each evaluation to a few seconds.
DEMO_TASK = dict(eval_chars=60_000, sample_chars=300)
DEMO_TRAIN = dict(eval_every=200, log_every=10)  # lr and warmup: LMTask.train_defaults
DEMO_TIME_BUDGET = 180.0  # seconds: long enough for recognisable Python, short enough to watch
# optimizer steps per second planned for (the cosine schedule ends there): measured on a shared 2-core
# CPU, about 9 with the C++ step loops and 4-5 with the Python ones, less a margin for evaluation and
# slower machines; a faster machine ends early, a slower one by time
STEPS_PER_SECOND = {"C++": 8, "Python": 4}


def default_threads() -> int:
    """Half the cores, at most 4: small recurrent steps gain little from more threads, and on a busy
    machine extra OpenMP threads wait on each other (measured: 1 thread was 2-8x faster than 2 on a
    shared 2-core machine)."""
    return max(1, min(4, (os.cpu_count() or 2) // 2))


def add_demo_arguments(parser: argparse.ArgumentParser, argv: list[str]) -> None:
    from rnnkit.engine.trainer import RunConfig, TrainConfig
    from rnnkit.tasks.lm import LMConfig

    add_dataclass_flags(
        parser,
        TrainConfig,
        only=("time_budget", "steps", "threads"),
        defaults={
            "time_budget": DEMO_TIME_BUDGET,
            "steps": f"what a 2-core CPU does in --time-budget, {STEPS_PER_SECOND['C++']} per second with rnnkit's "
            f"C++ step loops, {STEPS_PER_SECOND['Python']} without",
            "threads": f"half the cores, at most 4; here {default_threads()}",
        },
    )
    add_dataclass_flags(parser, RunConfig, only=("out",), defaults={"out": "runs/lm-<timestamp>"})
    add_dataclass_flags(parser, LMConfig, only=("data",))


def run_demo(args: argparse.Namespace) -> int:
    from rnnkit.core import native
    from rnnkit.engine.rundir import default_run_dir
    from rnnkit.engine.trainer import RunConfig, TrainConfig, train
    from rnnkit.tasks.lm import LMConfig

    given = given_fields(args, TrainConfig)
    time_budget = given.get("time_budget", DEMO_TIME_BUDGET)
    if time_budget is None or time_budget <= 0:
        raise UsageError(f"--time-budget must be positive seconds, got {time_budget}")
    run_dir = given_fields(args, RunConfig).get("out") or str(default_run_dir("lm"))
    data = given_fields(args, LMConfig).get("data")
    corpus = data or "the Python standard library's source code (offline, bundled with Python)"
    print(
        f"rnnkit demo: a character language model (2-layer GRU of 256) trained on {corpus} for at most "
        f"{time_budget:g} s; a sample is printed at each evaluation.",
        file=sys.stderr,
        flush=True,
    )
    task_flags = dict(DEMO_TASK, data=data)
    rate = STEPS_PER_SECOND["C++" if native.ops() is not None else "Python"]
    steps = given.get("steps") or max(1, int(time_budget * rate))
    train_flags = dict(
        DEMO_TRAIN, time_budget=time_budget, steps=steps, threads=given.get("threads") or default_threads()
    )
    code = train("lm", task_flags, train_flags, RunConfig(out=run_dir))
    if code != 0:
        return code
    print(
        f"""
Run directory: {run_dir}  (curves.png, metrics.jsonl, checkpoints/, vocab.json)

Sample from it:      rnnkit generate {run_dir} --prompt "def " --length 400 --temperature 0.7
Train it longer:     rnnkit train lm --resume {run_dir} --steps {steps * 3} --time-budget 600
Evaluate it:         rnnkit eval {run_dir}
Shakespeare instead: rnnkit train lm --data tinyshakespeare --time-budget 600
The other tasks:     rnnkit train classify --time-budget 600      (AG News topics, many-to-one)
                     rnnkit train sort --time-budget 300          (sorting sequences, many-to-one-to-many)""",
        flush=True,
    )
    return 0


DEMO = Command(add_demo_arguments, run_demo)
