"""The worker's HTTP dialects: one module per API, thin adapters over one generation path.

Rules for this package:
- Every dialect (OpenAI chat completions and completions, OpenAI Responses, Anthropic
  Messages, llama-server's native routes) turns its request into the same internal request
  (``engine.ChatMessage`` list, ``engine.Sampling``, ``engine.ToolRequest``), prepares it
  with ``Runner.prepare`` and generates it with ``Runner.run``/``Runner.turn`` (``run.py``):
  sampling, tools, grammar, stop strings, usage and the tool-call rules (no markup leaks,
  the repeat stop) live there or in the engine, so a fix lands once.
- A dialect module owns only its schema, its answer's shape and its stream's events.
- Nothing here imports llama_cpp (the engine package does).
"""
