"""The classify task (many-to-one): labelled text in, one class per text out, read byte by byte.

The text's bytes (all 256 values of UTF-8; bytes >= 128 are symbols of their own) run through a
bidirectional RNN with each text's true length, so padding is never read as text; each direction's
outputs are pooled (`--pooling`), projected to `--e-dim` (128), added, and projected to the classes.

    rnnkit train classify --data ag_news/                    folder with train.csv, test.csv, classes.txt
    rnnkit eval RUN_DIR --data ag_news/test.csv              accuracy, per-class P/R/F1, confusion.png
    echo "Stocks fall as oil hits a record" | rnnkit predict RUN_DIR

data.py: CSV rows, labels, the validation split, the AG News download; model.py: the network
(ByteClassifier); metrics.py: confusion matrix, accuracy, F1; task.py: the config and the Task.

Data. A CSV row is `label,text[,text...]` (AG News: `"3","title","description"`); see data.py for
labels, class names and the validation split. Without `--data` the AG News CSVs are downloaded once
into the cache (`$RNNKIT_CACHE`, default ~/.cache/rnnkit) and checked against their published checksums.

Model. The defaults are what reached the best AG News accuracy per CPU minute (docs/tasks/classify.md):
a learned byte embedding plus hashed byte 2-4-gram and word embeddings, 8 bytes per step, one
bidirectional GRU layer of 128, mean pooling, dropout 0.2, feature dropout 0.6, and beside it a
bag-of-words model (`--bag`), at most 8 passes under a time budget (`--max-epochs`). The classic
character-level model of earlier versions is `--input onehot --ngrams 1 --no-words --patch 1
--cell lstm --hidden 512 --layers 3 --pooling ends --dropout 0`.

    x (B, T) bytes -> input vectors (B, T, V)     one-hot (V = 256) or a learned embedding of each byte,
                                                  plus hashed embeddings of the 2..ngrams bytes ending there
                                                  and of the word so far (`--words`) and the pair
                                                  (previous word, word so far) (`--word-pairs`), all summed
                                                  (`--feature-dropout` drops whole hashed vectors in training)
                   -> (B, T/patch, patch*V)       `--patch` consecutive bytes per RNN step (1 = one byte)
                   -> bidirectional RNN (B, S, 2H) with each text's true length
    ends:      f = out[b, len_b - 1, :H], g = out[b, 0, H:]
    max/mean:  f, g = max or mean over each text's valid steps of the forward / backward halves
    logits = W_c (W_f f + W_g g) + b                              (B, classes)
    --bag:     bag = W_b mean(E[w] for each word and word pair w of the text) + b_b
               loss = CE(logits) + CE(bag); prediction log_softmax(logits) + log_softmax(bag)

>>> import torch
>>> model = ByteClassifier(ClassifyConfig(hidden=8, e_dim=8), num_classes=3)
>>> logits, loss = model(torch.randint(0, 256, (2, 12)), torch.tensor([12, 5]), torch.tensor([0, 2]))
>>> tuple(logits.shape), loss.dim()
((2, 3), 0)
"""

from rnnkit.tasks.classify.data import (
    AG_NEWS,
    AG_NEWS_CLASSES,
    CLASSES_FILE,
    DataFiles,
    Rows,
    Split,
    ag_news,
    class_names_for,
    data_files,
    encode,
    in_validation,
    label_indices,
    read_rows,
    to_split,
)
from rnnkit.tasks.classify.metrics import class_metrics, confusion_matrix, confusion_text, plot_confusion
from rnnkit.tasks.classify.model import VOCAB, ByteClassifier, masked_pool, ngram_ids, word_ids
from rnnkit.tasks.classify.task import LABELS_FILE, ClassifyConfig, ClassifyEvalOptions, ClassifyTask

__all__ = [
    "AG_NEWS",
    "AG_NEWS_CLASSES",
    "CLASSES_FILE",
    "LABELS_FILE",
    "VOCAB",
    "ByteClassifier",
    "ClassifyConfig",
    "ClassifyEvalOptions",
    "ClassifyTask",
    "DataFiles",
    "Rows",
    "Split",
    "ag_news",
    "class_metrics",
    "class_names_for",
    "confusion_matrix",
    "confusion_text",
    "data_files",
    "encode",
    "in_validation",
    "label_indices",
    "masked_pool",
    "ngram_ids",
    "plot_confusion",
    "read_rows",
    "to_split",
    "word_ids",
]
