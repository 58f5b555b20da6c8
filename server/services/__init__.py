"""What the API and the MQTT coordinator do, over the database: the server's one place for fleet logic.

The web layer and the coordinator translate requests and messages into these calls; the decisions
themselves (rollout stages, image checks, compilation) are the core's. One module per resource, as in
server/api; import a name from the module that defines it.
"""
