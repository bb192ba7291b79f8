"""An OpenAI-compatible HTTP API over the swarm (``corolla api``), with Prometheus metrics.

``create_app(engine)`` builds the FastAPI app; ``Engine`` holds the tokenizer and one distributed
model and runs each request's generation in its own thread and inference session. Importing this
package loads neither torch nor FastAPI: import the submodules."""
