"""mkdocs hook: publish the generated benchmark report as a page of the site.

``benchmarks/run.py`` writes ``benchmarks/RESULTS.md`` and its plots outside ``docs/``; this hook
adds them to the site under ``benchmark-results/`` (the page and the images it links), so the
docs show the latest run without a copy that could go stale.
"""

from pathlib import Path

from mkdocs.structure.files import File

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
PUBLISHED = ("RESULTS.md", "quality.png", "ablations.png", "speed.png")
OPTIONAL = ("curves.png",)  # only runs with validation-loss curves (--eval-every, --lr-grid) draw it
SITE_FOLDER = "benchmark-results"


def on_files(files, config):
    for name in PUBLISHED:
        source = BENCHMARKS / name
        if not source.is_file():
            raise FileNotFoundError(f"{source} is missing: run `python benchmarks/run.py` to generate the report.")
        files.append(File.generated(config, f"{SITE_FOLDER}/{name}", abs_src_path=str(source)))
    for name in OPTIONAL:
        if (BENCHMARKS / name).is_file():
            files.append(File.generated(config, f"{SITE_FOLDER}/{name}", abs_src_path=str(BENCHMARKS / name)))
    return files
