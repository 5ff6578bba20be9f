from __future__ import annotations

import re
from datetime import datetime
from typing import Literal

from pydantic import BaseModel, Field, field_validator

from gateway.settings import NAME_PATTERN
from gateway.tenants import Tenant


class TenantCreate(BaseModel):
    model_config = {"extra": "forbid", "strict": True}

    name: str = Field(pattern=NAME_PATTERN)
    adapters: list[str] = Field(default=["*"], description='adapter names the tenant may call, or ["*"] for all')
    rpm: int | None = Field(default=None, gt=0, description="requests per minute; none: unlimited")
    tpm: int | None = Field(default=None, gt=0, description="tokens per minute; none: unlimited")

    @field_validator("adapters")
    @classmethod
    def _names(cls, v: list[str]) -> list[str]:
        bad = [a for a in v if a != "*" and not re.match(NAME_PATTERN, a)]
        if bad:
            raise ValueError(f"not adapter names: {bad}")
        return v


class TenantInfo(BaseModel):
    name: str
    adapters: list[str]
    rpm: int | None
    tpm: int | None
    created_at: datetime | None

    @classmethod
    def of(cls, tenant: Tenant) -> TenantInfo:
        return cls(name=tenant.name, adapters=sorted(tenant.adapters), rpm=tenant.rpm, tpm=tenant.tpm,
                   created_at=tenant.created_at)


class TenantWithKey(TenantInfo):
    key: str = Field(description="the API key: shown this once, only its hash is stored")


class TenantDeleted(BaseModel):
    name: str
    deleted: Literal[True] = True


class TenantList(BaseModel):
    object: str = "list"
    data: list[TenantInfo]
