"""``python -m peft_talora.training ...``: train and save an adapter (see :mod:`peft_talora.training.cli`)."""

import sys

from .cli import main

main(sys.argv[1:])
