"""INTEGRATION.md runs as written.

The guide's fences follow one convention, which this file enforces:

* ```` ```python ````: an **after** block. Every one runs, in the order of the file, in one shared
  namespace (a later block may use the names an earlier one defines, starting with the stand-ins
  of section 0). A new section's blocks are picked up with no change here.
* ```` ```python before ````: a **before** block, the authors' released code (EDF, IID, ...) cut to
  the lines that matter. Never run: it needs the authors' repositories and data. Its first line is a
  comment naming the source file and function, e.g. ``# EDF, distill/edf_distill.py, main``.
* Any other fence whose info string starts with ``py`` (``py``, ``python3``, ``python after`` ...) is
  an error, so that no block is skipped by a typo. Other languages (``bash``, none) are not read.

Each block must be small: the test fails a block that runs longer than ``BLOCK_LIMIT_S`` (generous,
for a loaded 2-core CI machine; the blocks take well under a second each here).
"""
from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
import torch

import edfkern

GUIDE = Path(__file__).resolve().parents[1] / "INTEGRATION.md"
BLOCK_LIMIT_S = 60.0
FENCE = re.compile(r"^```([^\n`]*)\n(.*?)^```[ \t]*$", flags=re.S | re.M)


def guide_blocks() -> list[tuple[str, str, str, int]]:
    """``(info, code, heading, line)`` for every fenced block of the guide, in order."""
    text = GUIDE.read_text(encoding="utf-8")
    blocks = []
    for m in FENCE.finditer(text):
        before = text[:m.start()]
        headings = re.findall(r"^#{1,4} (.+)$", FENCE.sub("", before), flags=re.M)  # not a comment in a block
        blocks.append((m.group(1).strip(), m.group(2), headings[-1] if headings else "(top)",
                       before.count("\n") + 1))
    return blocks


def test_guide_fences_follow_the_convention():
    blocks = guide_blocks()
    bad = [(line, info) for info, _, _, line in blocks
           if info.lower().startswith("py") and info not in ("python", "python before")]
    assert not bad, f"INTEGRATION.md: unknown python fence(s) (use 'python' or 'python before'): {bad}"
    after = [b for b in blocks if b[0] == "python"]
    before = [b for b in blocks if b[0] == "python before"]
    assert len(after) >= 10 and len(before) >= 5, (len(after), len(before))
    for info, code, heading, line in before:
        first = code.splitlines()[0] if code.strip() else ""
        assert re.match(r"# .*\S+\.py, \S", first), (
            f"INTEGRATION.md line {line} ({heading}): a 'python before' block starts with a comment naming "
            f"its source file and function, e.g. '# EDF, distill/edf_distill.py, main'; got {first!r}")


def test_every_after_block_runs_in_order():
    namespace: dict = {"__name__": "integration_guide"}
    ran = 0
    for info, code, heading, line in guide_blocks():
        if info != "python":
            continue
        t0 = time.perf_counter()
        try:
            exec(compile(code, f"INTEGRATION.md:{line}", "exec"), namespace)
        except Exception as e:
            raise AssertionError(f"INTEGRATION.md block at line {line} ({heading}) failed: "
                                 f"{type(e).__name__}: {e}\n{code}") from e
        took = time.perf_counter() - t0
        assert took < BLOCK_LIMIT_S, (f"INTEGRATION.md block at line {line} ({heading}) took {took:.1f} s; "
                                      f"keep each block under a few seconds on CPU")
        ran += 1
    assert ran >= 10


# ----------------------------------------------------------------------------- the guide's claims about EDF


def edf_cpd_block(student, target, start, loss_threshold, num_params):
    """EDF's released CPD block (distill/edf_distill.py, main), as the guide quotes it (the accumulators
    take the inputs' dtype here; EDF's are float32, as its parameters)."""
    param_loss = torch.tensor(0.0, dtype=student.dtype)
    param_dist = torch.tensor(0.0, dtype=student.dtype)
    param_losses = torch.nn.functional.mse_loss(student, target, reduction="none")
    param_dists = torch.nn.functional.mse_loss(start, target, reduction="none")
    _, loss_indices = torch.sort(param_losses)
    threshold = int(loss_threshold * len(param_losses))
    keep_indices = loss_indices[threshold:]
    param_loss += param_losses[keep_indices].sum()
    param_dist += param_dists[keep_indices].sum()
    param_loss /= num_params
    param_dist /= num_params
    param_loss /= param_dist
    return param_loss


@pytest.mark.parametrize("op", ["cpd_trajectory_loss", "cpd_keep_mask"])
@pytest.mark.parametrize("ratio", [1.0, 1, 1.5])
def test_drop_ratio_of_one_names_edfs_silent_skip(op, ratio):
    """EDF's default loss_threshold is 1.0 (utils/cfg.py): its block then returns NaN, and its gate
    ``grand_loss <= args.threshold`` never steps. edfkern refuses it, and says what EDF would do."""
    s, t, s0 = torch.randn(50), torch.randn(50), torch.randn(50)
    loss = edf_cpd_block(s, t, s0, ratio, 50)
    assert torch.isnan(loss) and not bool(loss <= 1.0) and not bool(loss <= 1.5)
    with pytest.raises(ValueError) as info:
        if op == "cpd_trajectory_loss":
            edfkern.cpd_trajectory_loss(s, t, s0, drop_ratio=ratio)
        else:
            edfkern.cpd_keep_mask(s, ratio)
    msg = str(info.value)
    assert msg.startswith(f"drop_ratio must be < 1.0, got {float(ratio)}")
    for part in ("loss_threshold", "1.0 in utils/cfg.py", "silently skip the update", "NaN", "never updated"):
        assert part in msg, (part, msg)


def test_drop_ratio_check_has_one_home():
    """The sharded loss checks drop_ratio with the same function as the op, so it gives the same message."""
    import edfkern.distributed as ED
    v = torch.randn(4)
    for ratio in (1.5, -0.1):
        messages = []
        for call in (lambda: edfkern.cpd_trajectory_loss(v, v, v, drop_ratio=ratio),
                     lambda: ED.cpd_trajectory_loss(v, v, v, drop_ratio=ratio, process_group=None)):
            with pytest.raises(ValueError) as info:
                call()
            messages.append(str(info.value))
        assert messages[0] == messages[1], messages
    assert ">= 0.0" in messages[0]


def test_edf_block_matches_cpd_loss_below_one():
    """At the configs' ratios, the released block and ``cpd_trajectory_loss`` agree (no ties here)."""
    g = torch.Generator().manual_seed(0)
    s, t, s0 = (torch.randn(1000, generator=g, dtype=torch.float64) for _ in range(3))
    for ratio in (0.0, 0.25, 0.375, 0.5):
        want = edf_cpd_block(s, t, s0, ratio, 1000)
        got = edfkern.cpd_trajectory_loss(s, t, s0, drop_ratio=ratio)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
