"""``python -m onnxcompress`` runs the CLI."""

from .cli import run

run()
