"""The notebooks run top to bottom (with a small budget)."""
import os

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# notebook -> (text its outputs must show, plots it must write)
EXPECTED = {
    "quickstart.ipynb": (["W3A8 Evol-Q", "calibration loss"], ["quickstart_fitness.png"]),
    "loss_landscape.ipynb": (["roughness", "infonce rough", "W3A8 qkv"],
                             ["landscape_qkv_w3a8.png", "landscape_qkv_basis_w3a8.png",
                              "landscape_qkv_2d_w3a8.png"]),
    "pretrained_cnn.ipynb": (["efficientnet_lite0 full precision", "W6A6 Evol-Q"],
                             ["pretrained_cnn_fitness.png"]),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_notebook_executes(name, tmp_path, monkeypatch):
  monkeypatch.setenv("EVOLQ_QUICK", "1")
  nb = nbformat.read(os.path.join(ROOT, "notebooks", name), as_version=4)
  NotebookClient(nb, timeout=900, kernel_name="python3",
                 resources={"metadata": {"path": str(tmp_path)}}).execute()
  outputs = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                    for o in c.get("outputs", []))
  texts, plots = EXPECTED[name]
  for text in texts:
    assert text in outputs
  for plot in plots:
    assert (tmp_path / plot).stat().st_size > 1000
