"""Public ops, one family per file (``dae.py``, ``gradcam.py``, ``cpd.py``, ``covariance.py``, ``features.py``).

Each file reads top-down, with one naming scheme for the three layers of an op, e.g. DAE:

1. the public function, with its docstring (shapes): ``dae_``, exported by ``edfkern``;
2. the registered op ``torch.ops.edfkern.dae_``, Python object ``_dae__op`` (``_<op>_op``),
   with its fake ``_<op>_fake`` and, where it has one, its autograd formula
   ``_<op>_autograd`` / ``_<op>_setup``. It is the one place that checks the tensors, for the public
   function and direct callers alike; the public function only turns Python-level arguments into
   the op's form (scalars, labels into CSR groups, ``(N, 1, h, w)`` into ``(N, h, w)``);
3. the backend kernel it runs, ``kernel("dae_", device)``: a plain function of the selected
   backend (edfkern/_dispatch.py; the contract is in edfkern/reference/__init__.py);

then the argument rules. With an initialised ``process_group`` the public function routes to the
multi-rank path of :mod:`edfkern.distributed`, which sits below this package and never calls back
into it; the backward formulas both paths share are plain functions in :mod:`edfkern._grads`.
docs/design.md ("Registration: one layer") says why.
"""
