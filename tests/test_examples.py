"""The examples on the CPU, scaled down: the main job's correctness check and the graphs / compile demo.

Each runs in this process through its ``main(argv)`` (one import of torch and diffusers for
all), forced to the CPU with ``--cpu`` so that a GPU machine checks the same path; the entry
points themselves run as subprocesses with ``--help``. torch runs on one thread here: on a
shared 2-core machine two OpenMP threads can wait on each other for 40x the work's time.
"""
from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys

import pytest
import torch

from deepspeed_diffusers_attn import txt2img

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load_example(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", os.path.join(ROOT, "examples", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _differences(text: str) -> list[float]:
    return [float(x) for x in re.findall(r"max pixel difference[^:]*: ([0-9.]+) / 255", text)]


def test_txt2img_cpu_is_a_correctness_check(tmp_path, capsys, one_thread):
    out = tmp_path / "out"
    example = _load_example("txt2img")
    assert example.main is txt2img.main  # the example runs the package's code, not a copy
    rc = txt2img.main(["--cpu", "--size", "64", "--steps", "2", "--out", str(out)])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert txt2img.CPU_HEADLINE in text
    assert "speedup" not in text.lower()
    assert "PASS" in text and "not a benchmark" in text
    (diff,) = _differences(text)
    assert diff <= txt2img.CPU_TOLERANCE
    assert sorted(os.listdir(out)) == ["cpu_check.png", "patched.png", "stock.png"]
    from PIL import Image

    for name in ("stock.png", "patched.png"):
        assert Image.open(out / name).size == (64, 64)
    assert Image.open(out / "cpu_check.png").size[0] > 64


def test_graphs_and_compile_cpu(capsys, one_thread):
    example = _load_example("graphs_and_compile")
    try:
        rc = example.main(["--cpu", "--size", "64", "--steps", "2"])
    finally:
        torch._dynamo.reset()
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "skipped: CUDA graphs need a GPU" in text
    assert 'torch.compile(pipe.unet, fullgraph=True, backend="aot_eager")' in text
    assert "speedup" not in text.lower()
    (diff,) = _differences(text)
    assert diff < 1.0


@pytest.mark.parametrize("command", [
    [sys.executable, "-m", "deepspeed_diffusers_attn", "--help"],
    [sys.executable, os.path.join("examples", "txt2img.py"), "--help"],
    [sys.executable, os.path.join("examples", "graphs_and_compile.py"), "--help"],
    [sys.executable, os.path.join("examples", "lora.py"), "--help"],
    [sys.executable, os.path.join("examples", "dit.py"), "--help"],
], ids=["python -m", "examples/txt2img.py", "examples/graphs_and_compile.py", "examples/lora.py", "examples/dit.py"])
def test_entry_points_help(command):
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: python ") and "--steps" in done.stdout and "--cpu" in done.stdout


def test_lora_example_switches_adapters_on_a_patched_pipeline(capsys, one_thread):
    pytest.importorskip("peft")
    rc = _load_example("lora").main(["--cpu", "--size", "64", "--steps", "2", "--rank", "4"])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "0 declined" in text and "PASS" in text
    diffs = [float(x) for x in re.findall(r"max pixel difference vs stock ([0-9.]+) / 255", text)]
    assert len(diffs) == 4 and max(diffs) <= 1.0
    moved = float(re.search(r"adapters move the stock image by ([0-9.]+) / 255", text).group(1))
    assert moved > 1.0, "the adapters should change the image, or the comparison shows nothing"


def test_dit_example_cpu_checks_sd3_flux_and_wan(tmp_path, capsys, one_thread):
    from deepspeed_diffusers_attn import dit_example

    assert _load_example("dit").main is dit_example.main  # the example runs the package's code
    rc = dit_example.main(["--cpu", "--out", str(tmp_path)])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "not a speed comparison" in text and "speedup" not in text.lower()
    for title in ("SD3-medium (StableDiffusion3Pipeline)", "Flux.1-dev (FluxPipeline)",
                  "Wan2.1-T2V-1.3B (WanPipeline), 64x64, 5 frames"):
        assert title in text
    diffs = _differences(text)
    assert len(diffs) == 3 and max(diffs) <= dit_example.CPU_TOLERANCE
    assert text.count("PASS") == 4  # one per model and the summary
    assert text.count("patch(pipe): ") == 3  # each model's report: counts per component and family
    from PIL import Image

    for key in ("sd3", "flux", "wan"):
        for run in ("stock", "patched"):
            assert Image.open(tmp_path / f"{key}_{run}.png").size == (64, 64)
