"""Alembic migrations; the same revisions run on PostgreSQL and SQLite."""
