"""Video curation: raw footage -> single-shot clips -> scores -> filtered training shards."""

# Importing the stages installs the torchvision compatibility hook (stages/compat.py) before
# anything here can import torchvision.
import stages  # noqa: F401
