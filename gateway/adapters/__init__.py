"""Adapters after upload: safe unpacking, validation against the served base, content-addressed
storage, the persistent registry of their lifecycle states, and the lifecycle itself (canary gate,
hot loading, scheduled re-probes). Nothing here knows about HTTP."""
