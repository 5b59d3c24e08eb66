"""The HTTP API (`embedq serve`): a FastAPI app that writes jobs and reads the store, as the
producer does; it never loads a model."""
