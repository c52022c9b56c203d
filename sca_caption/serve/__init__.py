"""The captioning service: ``python -m sca_caption.serve`` (FastAPI on uvicorn), a JSON API and a
web page over the caption CLI's loader and decoding step, with micro-batching. See ``app``."""
