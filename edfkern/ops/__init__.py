"""Public ops, one family per file: checks, backend dispatch and ``torch.library`` registration.

Each file reads top-down: the registered ``edfkern::`` custom ops (which look the
kernel up in the backend registry at run time), their fake implementations,
their autograd formulas, and last the public function users call.
"""
