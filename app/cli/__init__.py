"""The `llm-queue-gateway` command line (entry point: app.cli.main:main)."""
