-- Example replicated table. Rules: the primary key columns are NOT NULL, and every NOT NULL
-- column has a DEFAULT. Changes must be additive (new tables, new columns with a default).
CREATE TABLE hosts (id INTEGER PRIMARY KEY, name TEXT NOT NULL DEFAULT '', zone TEXT);
