"""The file names of the project's artefacts, with no heavy import: the torch-free gateway reads them too."""

CHECKPOINT_CONFIG = "salora_config.json"  # a `salora train` checkpoint's metadata
SALORA_WEIGHTS = "salora_adapter.safetensors"  # a SaLoRA checkpoint's factors
PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
