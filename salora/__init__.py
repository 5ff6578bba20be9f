"""SaLoRA: safety-preserving low-rank adaptation (arXiv 2501.01765), as a library.

Every adapter update is kept orthogonal to the model's safety features (a fixed projection
computed from harmful prompts and the model's own refusals), and the adapter starts from a
task-aware initialisation. See DESIGN notes in the README for the exact math.
"""

from salora.errors import SaLoRAError

__all__ = ["SaLoRAError"]
__version__ = "0.1.0"
