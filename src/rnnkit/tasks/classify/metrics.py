"""The classify task's metrics: the confusion matrix, accuracy, macro F1 and each class's precision,
recall and F1, and the confusion matrix as text and as a figure.

>>> import torch
>>> cm = confusion_matrix(torch.tensor([0, 0, 1, 1]), torch.tensor([0, 1, 1, 1]), 2)
>>> cm.tolist(), class_metrics(cm, ["a", "b"])["accuracy"]
([[1, 1], [0, 2]], 0.75)
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from rnnkit.common.files import atomic_write


def confusion_matrix(y: Tensor, predicted: Tensor, num_classes: int) -> Tensor:
    """(K, K) counts: row = true class, column = predicted class."""
    return torch.bincount(y * num_classes + predicted, minlength=num_classes**2).reshape(num_classes, num_classes)


def class_metrics(confusion: Tensor, names: list[str]) -> dict[str, float]:
    """accuracy, macro F1 and precision / recall / F1 of each class from a confusion matrix."""
    cm = confusion.double()
    tp = cm.diag()
    precision = tp / cm.sum(0).clamp(min=1)
    recall = tp / cm.sum(1).clamp(min=1)
    f1 = 2 * precision * recall / (precision + recall).clamp(min=1e-12)
    out = {"accuracy": float(tp.sum() / cm.sum()), "macro_f1": float(f1.mean())}
    for i, name in enumerate(names):
        out[f"precision[{name}]"] = float(precision[i])
        out[f"recall[{name}]"] = float(recall[i])
        out[f"f1[{name}]"] = float(f1[i])
    return out


def confusion_text(confusion: Tensor, names: list[str]) -> str:
    width = max(max(len(n) for n in names), len(str(int(confusion.max()))), 6)
    head = "true \\ predicted".ljust(width + 2) + " ".join(n.rjust(width) for n in names)
    rows = [
        names[i].ljust(width + 2) + " ".join(str(int(v)).rjust(width) for v in confusion[i]) for i in range(len(names))
    ]
    return "\n".join([head, *rows]) + "\n"


def plot_confusion(confusion: Tensor, names: list[str], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cm = confusion.numpy()
    fig, ax = plt.subplots(figsize=(1.2 * len(names) + 2.5, 1.0 * len(names) + 2))
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=9)
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            ax.text(
                j, i, str(cm[i, j]), ha="center", va="center", color="white" if cm[i, j] > cm.max() / 2 else "black"
            )
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)
