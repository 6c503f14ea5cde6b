"""The README's promises that a test can hold it to."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    commands = re.search(r"```bash\n(.*?)```", readme, re.S).group(1)
    test_cmd = commands.split("# 2.")[1].splitlines()[1].strip()
    assert test_cmd.endswith("python -m pytest -q")
    assert test_cmd in (ROOT / ".ci" / "run").read_text()


def test_readme_names_every_module():
    readme = (ROOT / "README.md").read_text()
    for module in (ROOT / "qlora_kit").glob("*.py"):
        if module.name not in ("__init__.py", "__main__.py"):
            assert f"{module.name} " in readme or f"{module.name}:" in readme, module.name
