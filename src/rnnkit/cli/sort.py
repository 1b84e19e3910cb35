"""The sort part of `rnnkit predict RUN_DIR [NUMBER ...]`: print a trained sorter's output.

With numbers on the command line, prints one line. Without, reads one sequence per line from stdin
(numbers separated by spaces or commas) and prints one output line per input line, as each line
arrives. Numbers in the output are separated by single spaces. A bad line (not UTF-8, not a number, an
integer outside [0, V), longer than the model accepts, empty) stops with a message naming it, exit
code 2; blank lines at the very end of the input are ignored, as they are in `rnnkit eval RUN --data FILE`.
`--beam K` (default: the run's) decodes with a beam of K.

    $ echo "5 3 9, 1" | rnnkit predict runs/sort-ptr
    1 3 5 9
"""

from __future__ import annotations

from rnnkit.cli.predict import Predictor
from rnnkit.cli.stdin import stdin_lines


def predict(loaded, numbers: list[str] | None, options: None) -> int:
    from rnnkit.tasks.sort.task import sequence_lines

    task, model = loaded.task, loaded.model
    if numbers:
        print(task.sort_line(model, " ".join(numbers), "command line"))
        return 0
    for number, line in sequence_lines(stdin_lines()):
        print(task.sort_line(model, line, f"line {number}"), flush=True)
    return 0


PREDICTOR = Predictor("numbers of one sequence to sort (default: one sequence per line from stdin)", predict)
