"""One module holds every public exception; the old import paths still work."""

from __future__ import annotations

import inspect

import specfuse
from specfuse import errors


def test_every_public_exception_lives_in_specfuse_errors_and_is_exported() -> None:
    defined = {
        name
        for name, obj in vars(errors).items()
        if inspect.isclass(obj) and issubclass(obj, Exception) and obj.__module__ == "specfuse.errors"
    }
    assert defined == set(errors.__all__)
    for name in defined:
        assert getattr(specfuse, name) is getattr(errors, name), name
        assert name in specfuse.__all__, name


def test_no_other_core_module_defines_a_public_exception() -> None:
    import importlib
    import pkgutil

    for info in pkgutil.walk_packages(specfuse.__path__, "specfuse."):
        if (
            info.name == "specfuse.cli"
            or info.name.endswith(".__main__")
            or ".serve" in info.name
            or "devserver" in info.name
            or "gateway" in info.name
        ):
            continue  # the CLI, the development server and the gateway are programs, not library API
        module = importlib.import_module(info.name)
        for name, obj in vars(module).items():
            if inspect.isclass(obj) and issubclass(obj, Exception) and obj.__module__.startswith("specfuse"):
                assert obj.__module__ == "specfuse.errors", (
                    f"{info.name}.{name} is defined outside specfuse.errors"
                )


def test_every_error_is_a_specfuse_error_and_input_errors_are_value_errors() -> None:
    for name in errors.__all__:
        assert issubclass(getattr(errors, name), errors.SpecfuseError), name
    for name in ("ConfigError", "ContextWindowError", "ToolCallError", "UnknownModelError"):
        assert issubclass(getattr(errors, name), ValueError), name
