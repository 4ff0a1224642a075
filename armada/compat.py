"""Every difference between the two transformers stacks armada supports, in one place.

armada runs on transformers 5.x (with huggingface_hub 1.x/2.x) and on transformers 4.57.x (with huggingface_hub
0.x, where optimum-onnx 0.1.0 still holds users). Code elsewhere asks this module instead of testing versions
itself, so dropping 4.57 later is one change here. (Modeling files cannot import armada — they travel as remote
code — and keep the few branches they need beside the line that needs them, each marked `# transformers 4.57`.)
"""

from importlib import metadata

from packaging.version import Version

TRANSFORMERS_VERSION = Version(metadata.version("transformers"))
HUB_VERSION = Version(metadata.version("huggingface_hub"))
TRANSFORMERS_V5 = TRANSFORMERS_VERSION.major >= 5
