"""SaLoRA Gateway: a multi-tenant, OpenAI-compatible server for LoRA adapters on a shared base.

Layers, bottom up: engines (generation) and stores (tenants) know nothing of HTTP; the routers under
`gateway/openai` and `gateway/admin` translate HTTP to them; `gateway.app.create_app` wires it all.
"""
