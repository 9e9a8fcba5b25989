-- Airlock relay store, initial schema.
-- Portable SQL (TEXT and BIGINT only; SQLite gives BIGINT integer affinity), so a PostgreSQL
-- copy of these migrations can be identical. Timestamps are milliseconds since the Unix epoch.

CREATE TABLE admin_tokens (
    id         TEXT PRIMARY KEY,
    token_hash TEXT UNIQUE NOT NULL,  -- hex SHA-256 of the token; the token itself is never stored
    created_at BIGINT NOT NULL
);

CREATE TABLE agents (
    id          TEXT PRIMARY KEY,     -- UUID v4
    name        TEXT NOT NULL,
    agent_group TEXT NOT NULL,
    token_hash  TEXT UNIQUE NOT NULL, -- hex SHA-256 of the agent token
    created_at  BIGINT NOT NULL,
    revoked_at  BIGINT NULL
);

CREATE INDEX agents_created_at ON agents (created_at);

CREATE TABLE connections (
    name       TEXT PRIMARY KEY,
    definition TEXT NOT NULL,         -- JSON of airlock_shared::model::ConnectionDefinition
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);
