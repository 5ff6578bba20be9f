"""SaLoRA: safety-preserving low-rank adaptation (arXiv 2501.01765), as a library.

Every adapter update is kept orthogonal to the model's safety features (a fixed projection
computed from harmful prompts and the model's own refusals). The paper projects the update's
output and starts from a task-aware initialisation; this project's default guards its input side
instead, from a standard LoRA start (docs/safety-study.md). See DESIGN notes in the README for the
exact math.
"""

from salora.errors import SaLoRAError

__all__ = ["SaLoRAError"]
__version__ = "0.1.0"
