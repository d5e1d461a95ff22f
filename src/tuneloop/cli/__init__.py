"""Command-line interface (typer): the only place that reads argv and prints."""
