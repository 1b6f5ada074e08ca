"""State that must outlive a process: a relational store behind one small interface (SQLite in the cache
folder by default, PostgreSQL for several pods), its schema migrated with Alembic."""
