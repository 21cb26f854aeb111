"""Root conftest: loads the gemma-fuzz pytest plugin when the package is not installed.

When the project is pip-installed, the plugin arrives through its `pytest11` entry point; loading
it a second time here would be an error, so this only covers running from a plain checkout."""
from importlib.metadata import entry_points

if not any(ep.name == "gemma_fuzz" for ep in entry_points(group="pytest11")):
    pytest_plugins = ["fuzz.pytest_plugin"]
