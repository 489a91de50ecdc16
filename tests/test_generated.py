"""Generated sources are up to date with their generators."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_wgmma_wrappers_are_generated_from_the_script():
    # csrc/cuda/wgmma_ops.cuh is written by tools/gen_wgmma.py; an edit to either alone fails here
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "gen_wgmma.py"), "--check"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
