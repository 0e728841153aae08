"""`specfuse gateway`: the fused model behind an OpenAI-compatible HTTP API.

Modules, one job each: :mod:`schemas` (the OpenAI wire shapes),
:mod:`errors` (OpenAI-shaped errors), :mod:`translate` (requests onto the
core's API and tool-call policy, results back), :mod:`metrics` (Prometheus),
:mod:`app` (the routes), :mod:`command` (the CLI). Needs the `gateway` extra.
Deployment: docs/gateway.md.
"""

from specfuse.gateway.app import GatewayOptions, create_app
from specfuse.gateway.command import register

__all__ = ["GatewayOptions", "create_app", "register"]
