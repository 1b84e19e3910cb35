"""The kernel table: which loop over time each cell kind has, in Python and in C++.

``KERNELS`` maps a built-in cell's ``combine`` to its hand-written Python kernel and ``CPP`` each of
those to its C++ twin. Keyed on the function, not the class, so a subclass that rewrites
``combine`` gets the generic kernel, never a wrong built-in one. Any other cell that changes only
``combine`` gets ``GENERIC`` (autograd inside), or ``compiled.CompiledKernel`` where its
``combine`` compiles; a cell that changes more (its own ``step``, a projection, parameters of its
own) has no kernel and runs ``scan_reference``. The routing table (core/routing.py) picks among
these; the kernels themselves import nothing from here.
"""

from __future__ import annotations

from rnnkit.core.cells.gru import GRUCell
from rnnkit.core.cells.lstm import LSTMCell
from rnnkit.core.cells.rnn import RNNCell
from rnnkit.core.cells.slstm import SLSTMCell
from rnnkit.core.gates import only_combine_customised
from rnnkit.core.kernels.base import Kernel
from rnnkit.core.kernels.cpp_loops import CppGRU, CppLSTM, CppRNN
from rnnkit.core.kernels.generic import GenericKernel
from rnnkit.core.kernels.python_loops import PythonGRU, PythonLSTM, PythonRNN
from rnnkit.core.kernels.slstm import CppSLSTM

KERNELS: dict = {LSTMCell.combine: PythonLSTM(), GRUCell.combine: PythonGRU(), RNNCell.combine: PythonRNN()}
GENERIC = GenericKernel()
# a built-in cell's combine -> its kernel with the loop in C++ (CPU, float32/float64, where built)
CPP: dict = {LSTMCell.combine: CppLSTM(), GRUCell.combine: CppGRU(), RNNCell.combine: CppRNN()}
# built-in cells that change more than combine (the sLSTM's block-diagonal recurrent product) and have
# a C++ loop of their own: a stack of exactly this class takes it where the C++ loops run
OWN_LOOPS: dict = {SLSTMCell: CppSLSTM()}
CPP.update({cls.combine: kernel for cls, kernel in OWN_LOOPS.items()})


def own_loops(cells) -> Kernel | None:
    """The C++ kernel of a stack of one ``OWN_LOOPS`` class (exactly that class, every cell), else ``None``."""
    kind = type(cells[0])
    return OWN_LOOPS.get(kind) if all(type(c) is kind for c in cells) else None


def kernel_for(cell) -> Kernel | None:
    """The Python kernel for ``cell`` (``GENERIC`` for a user's ``combine``), or ``None`` if it must run
    through ``scan_reference``.

    A cell qualifies when it customises only ``combine`` (the GatedCell contract); one that
    rewrites ``step``, ``split`` or a projection changes what a step means, and one with parameters
    of its own would get no gradient for them here, so both keep the reference loop.
    """
    if not only_combine_customised(cell):
        return None
    return KERNELS.get(type(cell).combine, GENERIC)
