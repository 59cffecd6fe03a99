"""`tiblocal serve`: the model as a local service, an OpenAI-compatible API and a chat page.

``slots`` batches parallel requests into one llama.cpp context; ``api`` holds the endpoints' logic in OpenAI's shapes;
``app`` routes them and guards the door; ``run`` is the verb; ``web/`` is the chat page, served at ``/``.
"""
