"""The documentation site builds with ``mkdocs build --strict`` (API pages from the docstrings)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_docs_build_strict(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    api = (tmp_path / "site" / "api" / "index.html").read_text()
    assert "set_training_stage" in api and "build_trainer" in api  # generated from the docstrings
    results = (tmp_path / "site" / "benchmark-results" / "RESULTS" / "index.html").read_text()
    assert "Targets" in results and "TA-LoRA" in results  # the generated report is a page of the site
    for plot in ("quality.png", "ablations.png", "speed.png"):
        assert (tmp_path / "site" / "benchmark-results" / plot).stat().st_size > 0
        assert f'src="../{plot}"' in results
    decisive = (tmp_path / "site" / "decisive-results" / "RESULTS" / "index.html").read_text()
    assert "Quality: unseen tasks" in decisive  # the decisive run's report too, with its plots
    for plot in ("quality.png", "curves.png"):
        assert (tmp_path / "site" / "decisive-results" / plot).stat().st_size > 0
