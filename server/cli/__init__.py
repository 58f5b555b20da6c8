"""The service's subcommands of `tinymlaas` (serve, worker, agent, demo, and the API client commands).

Registered through the `tinymlaas.commands` entry point (`server.cli:register`): the core CLI never imports
the server. One module per resource, as in server/api.
"""

from __future__ import annotations

from . import builds, devices, models, rollouts, serve, tenants


def register(sub) -> None:
    for module in (serve, devices, tenants, models, builds, rollouts):  # the order `tinymlaas --help` lists them
        module.register(sub)
