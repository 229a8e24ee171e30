"""docs/peft.md: the usage snippet runs as written."""

import os
import re
from pathlib import Path

DOC = Path(__file__).resolve().parents[2] / "docs" / "peft.md"


def test_peft_doc_snippet_runs(tmp_path):
    (code,) = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        namespace: dict = {}
        exec(compile(code, str(DOC), "exec"), namespace)
    finally:
        os.chdir(cwd)
    assert (tmp_path / "pica-adapter" / "adapter_model.safetensors").is_file()
    assert type(namespace["merged"]).__name__ == "LlamaForCausalLM"
