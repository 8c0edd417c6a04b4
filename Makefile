.PHONY: setup lint format test demo

setup:
	bash scripts/setup_env.sh

lint: setup
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .

format: setup
	.venv/bin/ruff check --fix .
	.venv/bin/ruff format .

test: lint
	.venv/bin/python -m pytest -q

demo: setup
	.venv/bin/python examples/main_job.py
