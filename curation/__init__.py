"""Video curation: raw footage -> single-shot clips -> scores -> filtered training shards."""

# The driver of `curate run` takes the C heap as Arrow's allocator, chosen before pyarrow
# loads (curation/arrow_pool.py).
from curation import arrow_pool

arrow_pool.choose()
# Importing the stages installs the torchvision compatibility hook (stages/compat.py) before
# anything here can import torchvision. It loads pyarrow.
import stages  # noqa: E402,F401
import pyarrow  # noqa: E402,F401

arrow_pool.restore()
