"""CLI: thin layer that parses flags into config dataclasses and calls the tasks and the engine."""
