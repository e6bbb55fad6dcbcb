"""``python -m infinitehip`` is the ``infinitehip`` command."""
from .cli import main

main()
