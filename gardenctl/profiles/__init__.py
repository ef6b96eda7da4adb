"""Learned memory profiles: model (keys and values), store (SQLite), sizing (pure), learn."""
