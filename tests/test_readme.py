"""The README's commands work as written.

Every fenced ```bash / ```sh / ```console and ```python block of README.md runs on this CPU machine and exits
with status 0, unless an HTML comment right before it says why not::

    <!-- readme-test: skip: needs a GPU -->
    ```bash
    python recipes/resnet50_imagenet.py --devices 8
    ```

A skip must state its reason; every other ``readme-test`` comment is an error, as is one that does not sit
right before a block. Shell blocks run as one ``bash -e`` script from the repository root; paths under
``lightning_logs/`` in them are moved into a temporary folder, so the repository is left as it was. Python
blocks run as a script inside that temporary folder. The environment is the Makefile's offline one:
``OMP_NUM_THREADS=1``, ``WANDB_MODE=offline``, ``HF_HUB_OFFLINE=1``, this virtualenv's ``bin`` first on ``PATH``.
The blocks run in README order, so a block may use what an earlier one wrote (``dsf-compare`` on the
quick-start runs).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
SHELL = {"bash", "sh", "shell", "console"}
PYTHON = {"python", "py", "python3"}
#: at least this many blocks must actually run (the README's runnable commands, not just its skips)
MIN_RUN = 8
MARKER = re.compile(r"<!--\s*readme-test:(.*?)-->", re.S)
FENCE = re.compile(r"^(?P<indent>\s*)(?P<fence>`{3,}|~{3,})\s*(?P<lang>[\w+.-]*)")
#: ``lightning_logs/...`` as a path of its own (not inside another path)
OUTPUT = re.compile(r"(?<![\w./-])lightning_logs/")


@dataclass
class Block:
    line: int  # 1-based line of the opening fence
    lang: str
    code: str
    skip: str | None  # the reason, or None: the block runs

    @property
    def runs(self) -> bool:
        return self.skip is None and (self.lang in SHELL or self.lang in PYTHON)

    def __str__(self) -> str:
        return f"README.md:{self.line} ```{self.lang}"


def parse(text: str) -> list[Block]:
    """The fenced blocks of ``text`` with their ``readme-test`` markers; ``ValueError`` for a bad marker."""
    lines = text.splitlines()
    blocks: list[Block] = []
    used: set[int] = set()  # lines of markers that belong to a block
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        fence, lang = m["fence"], m["lang"].lower()
        end = next((j for j in range(i + 1, len(lines)) if lines[j].strip().startswith(fence)
                    and set(lines[j].strip()) == {fence[0]}), None)
        if end is None:
            raise ValueError(f"README.md:{i + 1}: unclosed code block")
        skip = None
        before = i - 1
        while before >= 0 and not lines[before].strip():
            before -= 1
        marker = MARKER.fullmatch(lines[before].strip()) if before >= 0 else None
        if marker:
            used.add(before)
            kind, _, reason = marker[1].strip().partition(":")
            if kind.strip() != "skip":
                raise ValueError(f"README.md:{before + 1}: unknown readme-test marker {marker[0]!r}; "
                                 f"the only one is '<!-- readme-test: skip: REASON -->'")
            skip = reason.strip()
            if not skip:
                raise ValueError(f"README.md:{before + 1}: a skipped block must say why: {marker[0]!r}")
        blocks.append(Block(i + 1, lang, "\n".join(lines[i + 1:end]) + "\n", skip))
        i = end + 1
    stray = [n + 1 for n, line in enumerate(lines) if "readme-test" in line and n not in used
             and MARKER.search(line)]
    if stray:
        raise ValueError(f"README.md lines {stray}: readme-test markers that are not right before a code block")
    return blocks


def shell_script(block: Block, out: Path) -> str:
    """The block as a bash script: ``console`` blocks keep their ``$ `` lines (and continuations); paths under
    ``lightning_logs/`` are moved under ``out``."""
    code = block.code
    if block.lang == "console":
        kept, going = [], False
        for line in code.splitlines():
            if line.startswith("$ ") or going:
                kept.append(line[2:] if line.startswith("$ ") and not going else line)
                going = line.rstrip().endswith("\\")
        code = "\n".join(kept) + "\n"
    return "set -euo pipefail\n" + OUTPUT.sub(f"{out}/lightning_logs/", code)


def environment() -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", WANDB_MODE="offline", HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", WANDB_SILENT="true", PYTHONUNBUFFERED="1")
    env.pop("WANDB_API_KEY", None)  # never online from a test
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


def blocks() -> list[Block]:
    return parse(README.read_text())


# ------------------------------------------------------------------------------------------------
def test_every_block_runs_or_says_why_not():
    found = blocks()
    skipped = [b for b in found if b.skip is not None]
    assert all(b.skip.strip() for b in skipped)
    runnable = [b for b in found if b.runs]
    assert len(runnable) >= MIN_RUN, f"only {len(runnable)} README blocks run: {[str(b) for b in runnable]}"
    # the slow ones stay out of this test, each with its reason
    for command in ("make demo", "make test"):
        assert not any(re.search(rf"^\s*{command}\b", b.code, re.M) for b in runnable), command
        assert any(re.search(rf"^\s*{command}\b", b.code, re.M) for b in skipped), f"{command} is not in the README"
    # every runnable shell block writes under lightning_logs/ only (moved to a temporary folder)
    for b in runnable:
        if b.lang in SHELL:
            assert "--output-dir" not in b.code or re.search(r"--output-dir\s+lightning_logs/", b.code), b


def test_markers_are_checked():
    ok = parse("<!-- readme-test: skip: needs a GPU -->\n```bash\nnvidia-smi\n```\n\n```python\nprint(1)\n```\n")
    assert [(b.skip, b.runs) for b in ok] == [("needs a GPU", False), (None, True)]
    with pytest.raises(ValueError, match="must say why"):
        parse("<!-- readme-test: skip: -->\n```bash\ntrue\n```\n")
    with pytest.raises(ValueError, match="unknown readme-test marker"):
        parse("<!-- readme-test: skp: typo -->\n```bash\ntrue\n```\n")
    with pytest.raises(ValueError, match="not right before a code block"):
        parse("<!-- readme-test: skip: lost -->\n\ntext\n\n```bash\ntrue\n```\n")
    script = shell_script(Block(1, "console", "$ ls lightning_logs/a \\\n    --x\noutput\n", None), Path("/t"))
    assert script.splitlines()[1:] == ["ls /t/lightning_logs/a \\", "    --x"]


@pytest.mark.slow
def test_readme_commands_work(tmp_path):
    """Runs every runnable block in README order (about 2 minutes on 2 busy CPU cores, one thread)."""
    runnable = [b for b in blocks() if b.runs]
    tops = {m for b in runnable if b.lang in SHELL for m in re.findall(r"(?<![\w./-])lightning_logs/([\w.-]+)", b.code)}
    existed = {t for t in tops if (ROOT / "lightning_logs" / t).exists()}
    env, times = environment(), []
    for b in runnable:
        start = time.perf_counter()
        if b.lang in SHELL:
            proc = subprocess.run(["bash", "-c", shell_script(b, tmp_path)], cwd=ROOT, env=env, capture_output=True,
                                  text=True, timeout=600)
        else:
            script = tmp_path / f"readme_block_{b.line}.py"
            script.write_text(b.code)
            proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True,
                                  text=True, timeout=600)
        times.append(f"{b}: {time.perf_counter() - start:.1f}s")
        assert proc.returncode == 0, (f"{b} failed with exit status {proc.returncode}:\n{b.code}\n--- stdout\n"
                                      f"{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-5000:]}")
    print("\n".join(times))
    leaked = [t for t in tops - existed if (ROOT / "lightning_logs" / t).exists()]
    assert not leaked, f"README commands wrote into the repository: lightning_logs/{leaked}"
