"""`specfuse serve`: a local model behind TGI-, vLLM- or SGLang-style HTTP APIs, for tests and laptops.

Users of the library never import this package; it exists so that the
remote backends can be exercised against real HTTP servers on loopback
without GPUs. It reproduces the real servers' defaults and quirks that
specfuse depends on, each citing the upstream source it imitates.
"""

from specfuse.devserver.context import ServeOptions
from specfuse.devserver.server import PROTOCOLS, add_arguments, build_app, main, register, run

__all__ = ["PROTOCOLS", "ServeOptions", "add_arguments", "build_app", "main", "register", "run"]
