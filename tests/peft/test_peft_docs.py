"""docs/peft.md: the usage snippet runs as written."""

import os
import re
from pathlib import Path

DOC = Path(__file__).resolve().parents[2] / "docs" / "peft.md"


def _snippets() -> list[str]:
    return re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)


def test_peft_doc_snippet_runs(tmp_path):
    code = _snippets()[0]
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        namespace: dict = {}
        exec(compile(code, str(DOC), "exec"), namespace)
    finally:
        os.chdir(cwd)
    assert (tmp_path / "pica-adapter" / "adapter_model.safetensors").is_file()
    assert type(namespace["merged"]).__name__ == "LlamaForCausalLM"


def test_peft_doc_moe_snippet_runs():
    """The target_parameters snippet: expert roles adapted, one shared M per role."""
    (code,) = [c for c in _snippets() if "target_parameters" in c]
    namespace: dict = {}
    exec(compile(code, str(DOC), "exec"), namespace)
    groups = {n.rpartition(".")[2] for n, p in namespace["moe"].named_parameters() if p.requires_grad}
    assert {g for g in groups if "experts" in g} == {
        "mlp-experts-gate_proj-48x32", "mlp-experts-up_proj-48x32", "mlp-experts-down_proj-32x48"}
