"""Tasks: each model pattern in its own package, split the same way (data, model, task).

classify: many-to-one (a class per text); lm: many-to-many (a character language model); sort:
many-to-one-to-many (a sequence in, the same numbers sorted out). base.py holds the Task contract the
trainer drives and the TASKS registry; download.py the one downloadable-file type every data set uses.
"""
