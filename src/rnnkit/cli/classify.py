"""The classify part of `rnnkit predict RUN_DIR [TEXT ...] [--json]`: the class of each text.

With no TEXT, reads one text per line from stdin. Prints one line per text: the label name, or with
`--json` one object `{"label": ..., "probabilities": {name: p, ...}}`.

    rnnkit predict runs/classify-... "Stocks fall as oil hits a record"        -> Business
    printf 'Stocks fall\\nNew chip is out\\n' | rnnkit predict RUN_DIR --json
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from rnnkit.cli.predict import Predictor
from rnnkit.cli.stdin import stdin_lines
from rnnkit.common.errors import UsageError
from rnnkit.tasks.base import option


@dataclass(frozen=True)
class ClassifyPredictOptions:
    json: bool = option(False, "print one JSON object per text: the label and the class probabilities")


def predict(loaded, texts: list[str] | None, options: ClassifyPredictOptions) -> int:
    where = "argument" if texts else "stdin, line"
    texts = texts if texts else list(stdin_lines())
    for number, text in enumerate(texts, start=1):
        if not text.strip():
            raise UsageError(f"{where} {number}: empty text")
    if not texts:
        return 0
    task = loaded.task
    probabilities = task.predict(loaded.model, texts)
    for row in probabilities.tolist():
        label = task.names[max(range(len(row)), key=row.__getitem__)]
        if options.json:
            print(json.dumps({"label": label, "probabilities": dict(zip(task.names, row))}))
        else:
            print(label)
    return 0


PREDICTOR = Predictor("texts to classify (default: one text per line from stdin)", predict, ClassifyPredictOptions)
