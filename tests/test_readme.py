"""The README's snippets run, and its quick start is what CI runs."""

import importlib.util
import pathlib
import re

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def _blocks(lang):
    return re.findall(rf"```{lang}\n(.*?)```", README.read_text(), flags=re.S)


def test_python_examples_run():
    blocks = _blocks("python")
    assert blocks, "README has no python example"
    for code in blocks:
        if "import torch" in code and importlib.util.find_spec("torch") is None:
            continue  # the PyTorch section needs the torch extra
        exec(compile(code, str(README), "exec"), {})


def quick_start_commands():
    text = README.read_text()
    section = text.split("## Quick start", 1)[1]
    block = re.search(r"```sh\n(.*?)```", section, flags=re.S).group(1)
    return [line for line in block.splitlines() if line.strip()]


def test_quick_start_is_two_commands_bench_then_tests():
    first, second = quick_start_commands()
    assert "gpuconv bench" in first
    assert second == "python -m pytest"
