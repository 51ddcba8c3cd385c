"""report.py: the Pareto plot, written without touching the user's matplotlib state."""
import subprocess
import sys


def test_pareto_plot_is_a_png_and_leaves_the_matplotlib_backend_alone(tmp_path):
    # a fresh interpreter: the user picked a backend; plotting must neither switch it nor open pyplot figures
    code = f"""
import matplotlib
matplotlib.use("svg")
import torch
from types import SimpleNamespace
from slug_fast.report import plot_pareto
names = ["a.weight", "b.weight", "c.weight"]
stats = SimpleNamespace(names=names, index=names.index, alignment=torch.tensor([0.1, 0.0, 0.5], dtype=torch.float64),
                        importance=torch.tensor([2.0, 1.0, 3.0], dtype=torch.float64))
path = plot_pareto(stats, stats.names, ["a.weight", "b.weight"], ["a.weight"], {str(tmp_path / 'p.png')!r}, "t")
import sys
print(matplotlib.get_backend(), "matplotlib.pyplot" in sys.modules, open(path, "rb").read(8) == b"\\x89PNG\\r\\n\\x1a\\n")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["svg", "False", "True"]
