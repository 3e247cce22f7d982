"""The command-line entry points (anomaly-train, -predict, -export, -distill-teacher, -check-data).

Importing the package registers the config resolvers that the shipped configs use."""

from anomaly.cli.runtime import register_resolvers

register_resolvers()
