"""mkdocs hook: publish the generated benchmark reports as pages of the site.

``benchmarks/run.py`` writes ``RESULTS.md`` and its plots outside ``docs/`` (``benchmarks/`` for the
default budget, ``benchmarks/decisive/`` for the decisive run); this hook adds each report and the
images it links to the site, so the docs show the latest runs without a copy that could go stale.
"""

import re
from pathlib import Path

from mkdocs.structure.files import File

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
#: (folder of a report, its folder on the site)
REPORTS = ((BENCHMARKS, "benchmark-results"), (BENCHMARKS / "decisive", "decisive-results"))
IMAGE = re.compile(r"!\[[^\]]*\]\(([^)\s]+\.png)\)")


def on_files(files, config):
    for folder, site_folder in REPORTS:
        report = folder / "RESULTS.md"
        if not report.is_file():
            raise FileNotFoundError(f"{report} is missing: run `python benchmarks/run.py` to generate the report.")
        for name in ["RESULTS.md", *IMAGE.findall(report.read_text())]:
            source = folder / name
            if not source.is_file():
                raise FileNotFoundError(f"{report} links {name}, which is missing: regenerate the report.")
            files.append(File.generated(config, f"{site_folder}/{name}", abs_src_path=str(source)))
    return files
