"""Run-time switches for edfkern.

``allow_tf32``
    Covariance differences are small numbers and TF32 rounding (10-bit mantissa)
    hides them, so every matrix product in edfkern runs in full IEEE fp32 unless
    the caller opts in with ``edfkern.config.allow_tf32 = True``.
"""

allow_tf32: bool = False
