"""The README's quickstart runs as written (on the real SmolLM2-135M)."""

import os
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_blocks():
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_starts_with_the_two_commands():
    first_block = re.search(r"```bash\n(.*?)```", README.read_text(), flags=re.S).group(1)
    assert first_block.splitlines()[0].startswith("make demo")
    assert first_block.splitlines()[1].startswith("make test")


@pytest.mark.slow
def test_quickstart_runs(tmp_path):
    (code,) = _python_blocks()
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        namespace: dict = {}
        exec(compile(code, "README.md", "exec"), namespace)
    finally:
        os.chdir(cwd)
    assert (tmp_path / "my-adapter" / "pica_adapter.safetensors").is_file()
    plain = namespace["plain"]
    assert type(plain).__name__ == "LlamaForCausalLM"
    assert not any(type(m).__name__ == "PiCaLinear" for m in plain.modules())
