"""Load tests for the gateway: a fake OpenAI-compatible upstream, a load generator, the side-by-side
benchmark against the upstream directly and LiteLLM's proxy, and a soak test. See docs/performance.md."""
