"""Ships the top-level configs/ folder inside the package as ``anomaly.configs`` (wheel and editable
installs alike), so that an installed anomaly-train finds its configs. Metadata is in pyproject.toml."""

from setuptools import find_namespace_packages, find_packages, setup

CONFIG_PACKAGES = [
    "anomaly.configs",
    *(f"anomaly.configs.{name}" for name in find_namespace_packages("configs")),
]

setup(
    packages=[*find_packages(include=["anomaly", "anomaly.*"]), *CONFIG_PACKAGES],
    package_dir={"anomaly.configs": "configs"},
    package_data={"anomaly": ["*.yaml"], **{package: ["*.yaml"] for package in CONFIG_PACKAGES}},
)
