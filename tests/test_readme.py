"""The README as a new user reads it: its marked commands run (utils/check_readme.py) and its figures say the
machine and the date they were measured on."""
import subprocess
import sys

from tests.http_client import ROOT
from utils.check_readme import checked_blocks, unsourced_figures

CHECK_TIMEOUT_S = 600  # the whole check: seconds on a quiet machine, far more on a loaded one

SAMPLE = """Intro, 7.7 min on a quiet AMD EPYC, 2026-12-04.

<!-- check: --ckpt-dir -->
```bash
./setup.sh
python inference.py --ckpt-dir /tmp/tiny
```

```bash
never run
```

## Speed

A step takes 107-121 ms.

<!-- check -->
```python
print("hi")
```
"""


def test_markers_choose_the_blocks_and_lines_that_run():
    blocks = checked_blocks(SAMPLE)
    assert [(b.line, b.language, b.code) for b in blocks] == [
        (5, "bash", "python inference.py --ckpt-dir /tmp/tiny"), (19, "python", 'print("hi")')]


def test_a_figure_without_machine_and_date_is_named():
    assert unsourced_figures(SAMPLE) == ["## Speed: figures (107-121 ms) without a CPU/GPU and a date"]


def test_readme_commands_run_and_figures_are_sourced():
    done = subprocess.run([sys.executable, "-m", "utils.check_readme"], cwd=ROOT, capture_output=True, text=True,
                          timeout=CHECK_TIMEOUT_S)
    assert done.returncode == 0 and done.stdout == "", done.stdout + done.stderr
    assert done.stderr.count(": ok in ") >= 4, done.stderr  # the first screen's, the Python API's, two SDK snippets
