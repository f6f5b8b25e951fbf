"""The metadata: SQL connections (SQLite, PostgreSQL), the schema and its migrations, and every query."""
