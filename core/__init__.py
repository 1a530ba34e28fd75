"""The ground floor: what every package may import (threat-model notation, devices, safe files).

Nothing here imports another package of this project except ``errors``; ``core.files`` does not
import torch, so light tools (the generated-data converter) stay light.
"""
