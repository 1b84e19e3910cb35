"""The fast loops over time behind ``Recurrent``, one concept per module.

- ``base``: the kernel contract, buffers, masks, batched weight gradients (imports no kernel);
- ``python_loops``: the built-in cells' loops in torch ops;
- ``cpp_loops``: the same loops in C++ (native.cpp), and the loops that project their input;
- ``compiled``: a user's cell with ``combine`` compiled (core/pointwise.py), in C++;
- ``generic``: any other gated cell, backward through time by autograd;
- ``dispatch``: the autograd Function that runs any kernel (``fused_scan``);
- ``table``: which cell gets which kernel;
- ``vendor``: a whole built-in stack through torch's own fused kernels (oneDNN, cuDNN);
- ``slstm``: the sLSTM's C++ loop (its block-diagonal recurrent weights);
- ``state_noise``: zoneout and recurrent dropout, the masks the loops apply inside the recurrence.

Which of them a layer call runs is decided in one place, core/routing.py.
"""
