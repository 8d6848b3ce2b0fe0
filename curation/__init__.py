"""Video curation: raw footage -> single-shot clips -> scores -> filtered training shards."""

from curation import compat as _compat

# torchvision (pulled in by open_clip and easyocr) needs its ops defined before import on
# CPU torch; the hook does that on first import of torchvision, and costs nothing otherwise.
_compat.install_import_hook()
