"""The README's ```python examples run as written, and it opens with the two commands."""
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_blocks_run():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) >= 3
    for code in blocks:
        exec(compile(code, str(README), "exec"), {})


def test_readme_opens_with_bench_and_test_commands():
    text = README.read_text()
    cmds = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    assert "python -m edfkern.bench" in cmds[0]
    assert "python -m pytest tests" in cmds[1]
    ci = (README.parent / ".ci" / "run").read_text()
    test_cmd = [ln for ln in cmds[1].splitlines() if not ln.startswith("#")][0].strip()
    assert test_cmd in ci, "CI must run the README's test command verbatim"
