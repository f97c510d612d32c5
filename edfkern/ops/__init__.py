"""Public ops, one family per file (``dae.py``, ``gradcam.py``, ``cpd.py``, ``covariance.py``, ``features.py``).

Each file reads top-down, with one naming scheme for the three layers of an op, e.g. DAE:

1. the public function, with its docstring (shapes): ``dae_``, exported by ``edfkern``;
2. the registered op ``torch.ops.edfkern.dae_``, Python object ``_dae__op`` (``_<op>_op``),
   with its fake ``_<op>_fake`` and, where it has one, its autograd formula
   ``_<op>_autograd`` / ``_<op>_setup``; it checks its own arguments (it may be called directly);
3. the backend kernel it runs, ``kernel("dae_", device)``: a plain function of the selected
   backend (edfkern/_dispatch.py; the contract is in edfkern/reference/__init__.py);

then the argument checks. docs/design.md ("Registration: one layer") says why.
"""
