"""Adapter lifecycle settings (the `lifecycle:` section of the gateway config)."""

from __future__ import annotations

from pydantic import BaseModel, Field


class LifecycleConfig(BaseModel):
    model_config = {"extra": "forbid"}

    max_upload_bytes: int = Field(default=256 << 20, gt=0)  # the whole request body
    max_unpacked_bytes: int = Field(default=1 << 30, gt=0)  # all files of an upload after unpacking
    max_members: int = Field(default=64, gt=0)  # files and directories in one archive
    max_rank: int = Field(default=64, gt=0)  # the largest LoRA rank the engine serves (vLLM's --max-lora-rank)
    reprobe_interval_s: float = Field(default=3600.0, ge=0)  # live adapters probed again this often; 0: never
    retry_interval_s: float = Field(default=60.0, gt=0)  # a canary run that errored is retried after this
    pull_failing: bool = False  # a live adapter failing a re-probe is retired, not only flagged
    canary_lease_s: float = Field(default=30.0, gt=0)  # a replica's hold on a canary run; renewed every third of it
