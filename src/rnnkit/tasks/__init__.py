"""Tasks: each seed pattern in its own module (classify: many-to-one, lm: many-to-many, sort: many-to-one-to-many)."""
