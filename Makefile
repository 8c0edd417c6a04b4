.PHONY: setup test demo

setup:
	bash scripts/setup_env.sh

test: setup
	.venv/bin/python -m pytest -q

demo: setup
	.venv/bin/python examples/main_job.py
