"""A build: the request (request.py), the model formats (formats.py), and the pipeline that loads a model, hands it
to the target's backend and publishes the result (pipeline.py)."""
