//! The relay's persistent state: admin API tokens, enrolled agents and connection definitions.
//!
//! [`Store`] wraps an sqlx [`SqlitePool`]; by default the database is `<data-dir>/airlock.db`
//! (DESIGN.md, "Relay surface": SQLite is the embedded default). The schema lives in
//! `relay/migrations/sqlite/` and is applied on open.
//!
//! Portability: every statement is plain SQL with `$n` placeholders, which both SQLite and
//! PostgreSQL accept through sqlx, and all timestamps are `i64` milliseconds since the Unix epoch
//! (`BIGINT` columns), so a PostgreSQL variant needs only its own migrations folder and pool.
//!
//! Tokens are stored only as hashes ([`crate::token::hash`]). Connection definitions are stored
//! as the JSON of [`ConnectionDefinition`] with every secret sealed under the relay's master key
//! ([`crate::secrets`]: `{"enc": "v1:…"}` in place of the plaintext); every write is one
//! statement, so a definition is never stored half-written. The store is opened with the key
//! ([`Store::open_sqlite`]); [`Store::seal_stored_secrets`] checks at startup that the key opens
//! every stored secret and seals any plaintext left by an older relay.
//!
//! SQLite runs with `secure_delete` on, so the bytes of replaced rows are zeroed rather than left
//! in free pages of the file.

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use std::sync::Arc;

use airlock_shared::model::ConnectionDefinition;
use sqlx::migrate::Migrator;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions};

use crate::secrets::{MasterKey, SecretCipher};

/// File name of the SQLite database inside the data directory.
pub const DATABASE_FILE: &str = "airlock.db";

/// How long a statement waits for a lock held by another connection before failing.
pub const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Maximum number of pooled SQLite connections (WAL allows concurrent readers, one writer).
const MAX_CONNECTIONS: u32 = 8;

static SQLITE_MIGRATOR: Migrator = sqlx::migrate!("./migrations/sqlite");

/// Failure of a [`Store`] operation.
///
/// Messages never contain secrets: neither token values nor connection definition JSON.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A connection with this name already exists.
    #[error("connection '{name}' already exists")]
    Conflict {
        /// The name that is taken.
        name: String,
    },
    /// The database refused or failed a statement, or could not be opened.
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    /// Applying the schema migrations failed (for example a database from a newer relay).
    #[error("database migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// A stored value could not be decoded; the message names the row, never its content.
    #[error("corrupt store: {0}")]
    Corrupt(String),
    /// A stored secret does not open under the master key: the relay runs with another key than
    /// the one that sealed it, or the row was altered. Names the connection and the field, never
    /// the value.
    #[error(
        "connection '{connection}': {source}; is this the master key the secrets were stored \
         with (AIRLOCK_MASTER_KEY, --master-key-file or <data-dir>/master-key)?"
    )]
    Decrypt {
        /// The connection whose secret failed to open.
        connection: String,
        /// Which field, and why.
        source: crate::secrets::OpenError,
    },
    /// Creating the data directory or database file failed.
    #[error("data directory: {0}")]
    Io(#[from] std::io::Error),
}

/// An enrolled agent. JSON: `{"id", "name", "group", "created_at_ms", "revoked_at_ms"}`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct AgentRecord {
    /// Agent id: a UUID v4 in hyphenated lowercase form.
    pub id: String,
    /// Human-readable name given at enrolment.
    pub name: String,
    /// The agent group whose private connections this agent executes.
    pub group: String,
    /// Enrolment time, milliseconds since the Unix epoch.
    pub created_at_ms: i64,
    /// Revocation time, milliseconds since the Unix epoch; `None` while the agent is active.
    pub revoked_at_ms: Option<i64>,
}

type AgentRow = (String, String, String, i64, Option<i64>);

impl From<AgentRow> for AgentRecord {
    fn from((id, name, group, created_at_ms, revoked_at_ms): AgentRow) -> Self {
        AgentRecord {
            id,
            name,
            group,
            created_at_ms,
            revoked_at_ms,
        }
    }
}

const AGENT_COLUMNS: &str = "id, name, agent_group, created_at, revoked_at";

/// Handle to the relay's database. Cheap to clone: clones share one connection pool and cipher.
#[derive(Debug, Clone)]
pub struct Store {
    pool: SqlitePool,
    cipher: Arc<SecretCipher>,
}

impl Store {
    /// Opens (creating if needed) the SQLite database `<data_dir>/airlock.db` and applies
    /// pending migrations. Connection secrets are sealed and opened with `key`.
    ///
    /// Creates `data_dir` (mode 0700 on Unix) and the database file (mode 0600 on Unix, since it
    /// holds connection secrets) when missing. Connections use WAL journaling, a
    /// [`BUSY_TIMEOUT`] of 5 s and enforced foreign keys.
    ///
    /// # Errors
    /// [`StoreError::Io`] when the directory or file cannot be created,
    /// [`StoreError::Database`] when SQLite cannot open the file, [`StoreError::Migrate`] when
    /// the schema cannot be brought up to date.
    pub async fn open_sqlite(data_dir: &Path, key: &MasterKey) -> Result<Store, StoreError> {
        create_private_dir(data_dir)?;
        let path = data_dir.join(DATABASE_FILE);
        create_private_file(&path)?;
        let options = SqliteConnectOptions::new()
            .filename(&path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .busy_timeout(BUSY_TIMEOUT)
            .foreign_keys(true)
            .pragma("secure_delete", "ON");
        let pool = SqlitePoolOptions::new()
            .max_connections(MAX_CONNECTIONS)
            .connect_with(options)
            .await?;
        Store::migrated(pool, key).await
    }

    /// Opens an empty in-memory database with the schema applied and a random master key. For
    /// tests: the data lives as long as the store's single pooled connection, i.e. until the last
    /// clone is dropped.
    ///
    /// # Errors
    /// [`StoreError::Database`] or [`StoreError::Migrate`] (only on SQLite failures).
    pub async fn open_memory() -> Result<Store, StoreError> {
        let options = SqliteConnectOptions::new()
            .in_memory(true)
            .foreign_keys(true);
        // Every SQLite in-memory connection is its own database, so the pool must hold exactly
        // one connection and never retire it.
        let pool = SqlitePoolOptions::new()
            .max_connections(1)
            .min_connections(1)
            .idle_timeout(None)
            .max_lifetime(None)
            .connect_with(options)
            .await?;
        Store::migrated(pool, &MasterKey::generate()).await
    }

    async fn migrated(pool: SqlitePool, key: &MasterKey) -> Result<Store, StoreError> {
        SQLITE_MIGRATOR.run(&pool).await?;
        Ok(Store {
            pool,
            cipher: Arc::new(SecretCipher::new(key)),
        })
    }

    /// Closes every pooled connection, waiting for statements in progress; for shutdown.
    /// Later calls on any clone fail with [`StoreError::Database`].
    pub async fn close(&self) {
        self.pool.close().await;
    }

    // ---- admin tokens ----

    /// Number of admin API tokens; zero on a fresh store (the relay then creates one).
    ///
    /// # Errors
    /// [`StoreError::Database`].
    pub async fn admin_token_count(&self) -> Result<i64, StoreError> {
        let (count,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM admin_tokens")
            .fetch_one(&self.pool)
            .await?;
        Ok(count)
    }

    /// Stores the hash ([`crate::token::hash`]) of a new admin token.
    ///
    /// # Errors
    /// [`StoreError::Database`], including when the same hash is already stored.
    pub async fn insert_admin_token(&self, hash: &str) -> Result<(), StoreError> {
        sqlx::query("INSERT INTO admin_tokens (id, token_hash, created_at) VALUES ($1, $2, $3)")
            .bind(uuid::Uuid::new_v4().to_string())
            .bind(hash)
            .bind(now_ms())
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Hashes of all admin tokens, oldest first.
    ///
    /// # Errors
    /// [`StoreError::Database`].
    pub async fn admin_token_hashes(&self) -> Result<Vec<String>, StoreError> {
        let rows: Vec<(String,)> =
            sqlx::query_as("SELECT token_hash FROM admin_tokens ORDER BY created_at, id")
                .fetch_all(&self.pool)
                .await?;
        Ok(rows.into_iter().map(|(h,)| h).collect())
    }

    // ---- agents ----

    /// Enrols an agent: stores `name`, `group` and the hash of its token under a new UUID v4.
    ///
    /// # Errors
    /// [`StoreError::Database`], including when `token_hash` is already used.
    pub async fn create_agent(
        &self,
        name: &str,
        group: &str,
        token_hash: &str,
    ) -> Result<AgentRecord, StoreError> {
        let record = AgentRecord {
            id: uuid::Uuid::new_v4().to_string(),
            name: name.to_owned(),
            group: group.to_owned(),
            created_at_ms: now_ms(),
            revoked_at_ms: None,
        };
        sqlx::query(
            "INSERT INTO agents (id, name, agent_group, token_hash, created_at, revoked_at) \
             VALUES ($1, $2, $3, $4, $5, NULL)",
        )
        .bind(&record.id)
        .bind(&record.name)
        .bind(&record.group)
        .bind(token_hash)
        .bind(record.created_at_ms)
        .execute(&self.pool)
        .await?;
        Ok(record)
    }

    /// All agents, revoked ones included, in enrolment order (ties broken by id).
    ///
    /// # Errors
    /// [`StoreError::Database`].
    pub async fn list_agents(&self) -> Result<Vec<AgentRecord>, StoreError> {
        let rows: Vec<AgentRow> = sqlx::query_as(&format!(
            "SELECT {AGENT_COLUMNS} FROM agents ORDER BY created_at, id"
        ))
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.into_iter().map(AgentRecord::from).collect())
    }

    /// The active (not revoked) agent whose token hashes to `hash`; `None` when there is none.
    ///
    /// # Errors
    /// [`StoreError::Database`].
    pub async fn agent_by_token_hash(&self, hash: &str) -> Result<Option<AgentRecord>, StoreError> {
        let row: Option<AgentRow> = sqlx::query_as(&format!(
            "SELECT {AGENT_COLUMNS} FROM agents WHERE token_hash = $1 AND revoked_at IS NULL"
        ))
        .bind(hash)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(AgentRecord::from))
    }

    /// The agent with this id, revoked or not; `None` when unknown.
    ///
    /// # Errors
    /// [`StoreError::Database`].
    pub async fn agent(&self, id: &str) -> Result<Option<AgentRecord>, StoreError> {
        let row: Option<AgentRow> =
            sqlx::query_as(&format!("SELECT {AGENT_COLUMNS} FROM agents WHERE id = $1"))
                .bind(id)
                .fetch_optional(&self.pool)
                .await?;
        Ok(row.map(AgentRecord::from))
    }

    /// Revokes an agent: its token stops authenticating. Returns `false` when the id is unknown
    /// or the agent was already revoked (the first revocation time is kept).
    ///
    /// # Errors
    /// [`StoreError::Database`].
    pub async fn revoke_agent(&self, id: &str) -> Result<bool, StoreError> {
        let result =
            sqlx::query("UPDATE agents SET revoked_at = $1 WHERE id = $2 AND revoked_at IS NULL")
                .bind(now_ms())
                .bind(id)
                .execute(&self.pool)
                .await?;
        Ok(result.rows_affected() == 1)
    }

    // ---- connections ----

    /// Stores a new connection definition under `definition.name`. The caller validates it
    /// first ([`ConnectionDefinition::validate`]).
    ///
    /// # Errors
    /// [`StoreError::Conflict`] when a connection of that name exists (detected by the primary
    /// key, so concurrent creators cannot both succeed); [`StoreError::Database`] otherwise.
    pub async fn create_connection(
        &self,
        definition: &ConnectionDefinition,
    ) -> Result<(), StoreError> {
        let json = self.encode_definition(definition)?;
        let now = now_ms();
        let result = sqlx::query(
            "INSERT INTO connections (name, definition, created_at, updated_at) \
             VALUES ($1, $2, $3, $3)",
        )
        .bind(&definition.name)
        .bind(json)
        .bind(now)
        .execute(&self.pool)
        .await;
        match result {
            Ok(_) => Ok(()),
            Err(sqlx::Error::Database(e)) if e.is_unique_violation() => Err(StoreError::Conflict {
                name: definition.name.clone(),
            }),
            Err(e) => Err(e.into()),
        }
    }

    /// The connection definition called `name`; `None` when there is none.
    ///
    /// # Errors
    /// [`StoreError::Corrupt`] when the stored JSON does not parse, [`StoreError::Decrypt`] when a
    /// secret does not open under the master key, [`StoreError::Database`].
    pub async fn connection(&self, name: &str) -> Result<Option<ConnectionDefinition>, StoreError> {
        let row: Option<(String, String)> =
            sqlx::query_as("SELECT name, definition FROM connections WHERE name = $1")
                .bind(name)
                .fetch_optional(&self.pool)
                .await?;
        row.map(|(name, json)| self.decode_definition(&name, &json).map(|(d, _)| d))
            .transpose()
    }

    /// All connection definitions, ordered by name (byte order).
    ///
    /// # Errors
    /// [`StoreError::Corrupt`] when any stored JSON does not parse, [`StoreError::Decrypt`] when a
    /// secret does not open under the master key, [`StoreError::Database`].
    pub async fn list_connections(&self) -> Result<Vec<ConnectionDefinition>, StoreError> {
        let rows: Vec<(String, String)> =
            sqlx::query_as("SELECT name, definition FROM connections ORDER BY name")
                .fetch_all(&self.pool)
                .await?;
        rows.iter()
            .map(|(name, json)| self.decode_definition(name, json).map(|(d, _)| d))
            .collect()
    }

    /// Checks that the master key opens every stored secret, and seals secrets stored in plain
    /// text (rows written before secrets were encrypted, or edited by hand). Returns how many
    /// connections were rewritten. Run once at startup, before serving: a relay started with the
    /// wrong key fails here, naming the connection, instead of on the first request.
    ///
    /// After rewriting, the WAL is checkpointed and truncated, so the plaintext does not linger in
    /// the `-wal` file (`secure_delete` zeroes it in the database file).
    ///
    /// # Errors
    /// [`StoreError::Decrypt`] for the first connection whose secrets do not open,
    /// [`StoreError::Corrupt`], [`StoreError::Database`].
    pub async fn seal_stored_secrets(&self) -> Result<usize, StoreError> {
        let rows: Vec<(String, String)> =
            sqlx::query_as("SELECT name, definition FROM connections ORDER BY name")
                .fetch_all(&self.pool)
                .await?;
        let mut resealed = 0;
        for (name, json) in &rows {
            let (definition, plaintext) = self.decode_definition(name, json)?;
            if !plaintext {
                continue;
            }
            let sealed = self.encode_definition(&definition)?;
            // Only if the row is unchanged since it was read: a concurrent update already sealed.
            sqlx::query(
                "UPDATE connections SET definition = $1 WHERE name = $2 AND definition = $3",
            )
            .bind(sealed)
            .bind(name)
            .bind(json)
            .execute(&self.pool)
            .await?;
            tracing::info!(connection = %name, "sealed secrets stored in plain text");
            resealed += 1;
        }
        if resealed > 0 {
            // In-memory databases have no WAL; the pragma is then a no-op.
            sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)")
                .execute(&self.pool)
                .await?;
        }
        Ok(resealed)
    }

    /// Replaces the definition stored under `definition.name`. Returns `false` (and stores
    /// nothing) when there is no such connection.
    ///
    /// # Errors
    /// [`StoreError::Database`].
    pub async fn update_connection(
        &self,
        definition: &ConnectionDefinition,
    ) -> Result<bool, StoreError> {
        let json = self.encode_definition(definition)?;
        let result =
            sqlx::query("UPDATE connections SET definition = $1, updated_at = $2 WHERE name = $3")
                .bind(json)
                .bind(now_ms())
                .bind(&definition.name)
                .execute(&self.pool)
                .await?;
        Ok(result.rows_affected() == 1)
    }

    /// The JSON stored for `definition`: secrets sealed ([`SecretCipher::seal_definition`]).
    fn encode_definition(&self, definition: &ConnectionDefinition) -> Result<String, StoreError> {
        // serde_json errors may quote values; keep only the category.
        let corrupt = |e: serde_json::Error| {
            StoreError::Corrupt(format!(
                "connection '{}': cannot encode definition ({:?} error)",
                definition.name,
                e.classify()
            ))
        };
        let value = self.cipher.seal_definition(definition).map_err(corrupt)?;
        serde_json::to_string(&value).map_err(corrupt)
    }

    /// The definition stored as `json` for connection `name`, its secrets opened, and whether
    /// some secret was stored in plain text.
    fn decode_definition(
        &self,
        name: &str,
        json: &str,
    ) -> Result<(ConnectionDefinition, bool), StoreError> {
        // serde_json messages can quote the offending value (a secret, possibly), so report only
        // the error category and position.
        let mut value: serde_json::Value = serde_json::from_str(json).map_err(|e| {
            StoreError::Corrupt(format!(
                "connection '{name}': stored definition does not parse \
                 ({:?} error at line {}, column {})",
                e.classify(),
                e.line(),
                e.column()
            ))
        })?;
        let stored = value.clone();
        self.cipher
            .open_value(name, &mut value)
            .map_err(|source| StoreError::Decrypt {
                connection: name.to_owned(),
                source,
            })?;
        let definition: ConnectionDefinition = serde_json::from_value(value).map_err(|e| {
            StoreError::Corrupt(format!(
                "connection '{name}': stored definition does not match the model ({:?} error)",
                e.classify()
            ))
        })?;
        let plaintext = crate::secrets::has_plaintext_secret(&definition, &stored);
        Ok((definition, plaintext))
    }

    /// Deletes the connection called `name`. Returns `false` when there was none.
    ///
    /// # Errors
    /// [`StoreError::Database`].
    pub async fn delete_connection(&self, name: &str) -> Result<bool, StoreError> {
        let result = sqlx::query("DELETE FROM connections WHERE name = $1")
            .bind(name)
            .execute(&self.pool)
            .await?;
        Ok(result.rows_affected() == 1)
    }
}

/// Milliseconds since the Unix epoch; 0 if the clock is before 1970.
fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

#[cfg(unix)]
fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt as _;
    if dir.is_dir() {
        return Ok(());
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

#[cfg(not(unix))]
fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)
}

/// Creates an empty database file readable only by its owner, so that SQLite (which copies the
/// database file's mode to its `-wal` and `-shm` files) never exposes connection secrets.
fn create_private_file(path: &Path) -> std::io::Result<()> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        options.mode(0o600);
    }
    match options.open(path) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use airlock_shared::model::{Auth, Network, Secret, TestRequest, TlsSettings};
    use std::path::PathBuf;

    /// A fresh directory under the system temp dir, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(tag: &str) -> TempDir {
            let path = std::env::temp_dir().join(format!(
                "airlock-store-{tag}-{}-{}",
                std::process::id(),
                uuid::Uuid::new_v4()
            ));
            TempDir(path)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn definition(name: &str, password: &str) -> ConnectionDefinition {
        ConnectionDefinition {
            name: name.into(),
            base_url: "https://jira.corp.example:8443".parse().unwrap(),
            auth: Auth::Basic {
                username: "svc".into(),
                password: Secret::new(password),
            },
            tls: TlsSettings::default(),
            network: Network {
                private: true,
                agent_group: Some("dc1".into()),
            },
            test_request: TestRequest::default(),
            response_timeout_ms: 30_000,
        }
    }

    #[tokio::test]
    async fn admin_tokens() {
        let store = Store::open_memory().await.unwrap();
        assert_eq!(store.admin_token_count().await.unwrap(), 0);
        assert!(store.admin_token_hashes().await.unwrap().is_empty());
        store.insert_admin_token("h1").await.unwrap();
        store.insert_admin_token("h2").await.unwrap();
        assert_eq!(store.admin_token_count().await.unwrap(), 2);
        let mut hashes = store.admin_token_hashes().await.unwrap();
        hashes.sort();
        assert_eq!(hashes, ["h1", "h2"]);
        // The same hash twice is refused by the UNIQUE constraint.
        assert!(matches!(
            store.insert_admin_token("h1").await,
            Err(StoreError::Database(_))
        ));
    }

    #[tokio::test]
    async fn agents_lifecycle() {
        let store = Store::open_memory().await.unwrap();
        let a = store.create_agent("edge-1", "dc1", "hash-a").await.unwrap();
        let b = store.create_agent("edge-2", "dc2", "hash-b").await.unwrap();
        assert_eq!(uuid::Uuid::parse_str(&a.id).unwrap().get_version_num(), 4);
        assert_ne!(a.id, b.id);
        assert_eq!((a.name.as_str(), a.group.as_str()), ("edge-1", "dc1"));
        assert!(
            a.created_at_ms > 1_600_000_000_000,
            "milliseconds: {}",
            a.created_at_ms
        );
        assert_eq!(a.revoked_at_ms, None);

        let listed = store.list_agents().await.unwrap();
        assert_eq!(listed.len(), 2);
        assert!(listed.contains(&a) && listed.contains(&b));
        assert!(listed[0].created_at_ms <= listed[1].created_at_ms);

        assert_eq!(
            store.agent_by_token_hash("hash-a").await.unwrap(),
            Some(a.clone())
        );
        assert_eq!(store.agent_by_token_hash("nope").await.unwrap(), None);
        assert_eq!(store.agent(&b.id).await.unwrap(), Some(b.clone()));
        assert_eq!(store.agent("unknown").await.unwrap(), None);

        assert!(store.revoke_agent(&a.id).await.unwrap());
        let revoked = store.agent(&a.id).await.unwrap().unwrap();
        let first_revocation = revoked.revoked_at_ms.unwrap();
        assert!(first_revocation >= a.created_at_ms);
        // Revoked agents no longer authenticate, but remain listed.
        assert_eq!(store.agent_by_token_hash("hash-a").await.unwrap(), None);
        assert_eq!(store.list_agents().await.unwrap().len(), 2);
        // Second revocation and unknown ids report false and change nothing.
        assert!(!store.revoke_agent(&a.id).await.unwrap());
        assert!(!store.revoke_agent("unknown").await.unwrap());
        assert_eq!(
            store.agent(&a.id).await.unwrap().unwrap().revoked_at_ms,
            Some(first_revocation)
        );
        // The other agent is untouched.
        assert_eq!(store.agent_by_token_hash("hash-b").await.unwrap(), Some(b));

        // Token hashes are unique.
        assert!(matches!(
            store.create_agent("dup", "dc1", "hash-a").await,
            Err(StoreError::Database(_))
        ));
    }

    #[test]
    fn agent_record_json_shape() {
        let record = AgentRecord {
            id: "i".into(),
            name: "n".into(),
            group: "g".into(),
            created_at_ms: 1,
            revoked_at_ms: None,
        };
        assert_eq!(
            serde_json::to_value(&record).unwrap(),
            serde_json::json!({
                "id": "i", "name": "n", "group": "g", "created_at_ms": 1, "revoked_at_ms": null
            })
        );
    }

    #[tokio::test]
    async fn connections_crud() {
        let store = Store::open_memory().await.unwrap();
        assert!(store.list_connections().await.unwrap().is_empty());
        assert_eq!(store.connection("jira").await.unwrap(), None);

        let jira = definition("jira", "pw1");
        store.create_connection(&jira).await.unwrap();
        store
            .create_connection(&definition("abc", "pw0"))
            .await
            .unwrap();
        assert_eq!(store.connection("jira").await.unwrap(), Some(jira.clone()));

        // Conflict names the connection and never carries the definition.
        let err = store
            .create_connection(&definition("jira", "hunter2"))
            .await
            .unwrap_err();
        assert!(
            matches!(&err, StoreError::Conflict { name } if name == "jira"),
            "{err:?}"
        );
        assert!(!format!("{err} {err:?}").contains("hunter2"));
        // The losing create changed nothing.
        assert_eq!(store.connection("jira").await.unwrap(), Some(jira.clone()));

        let names: Vec<String> = store
            .list_connections()
            .await
            .unwrap()
            .into_iter()
            .map(|d| d.name)
            .collect();
        assert_eq!(names, ["abc", "jira"]);

        let mut updated = definition("jira", "pw2");
        updated.network = Network::default();
        assert!(store.update_connection(&updated).await.unwrap());
        assert_eq!(store.connection("jira").await.unwrap(), Some(updated));
        assert!(!store
            .update_connection(&definition("missing", "x"))
            .await
            .unwrap());
        assert_eq!(store.connection("missing").await.unwrap(), None);

        assert!(store.delete_connection("jira").await.unwrap());
        assert!(!store.delete_connection("jira").await.unwrap());
        assert_eq!(store.connection("jira").await.unwrap(), None);
        assert_eq!(store.list_connections().await.unwrap().len(), 1);
    }

    #[tokio::test]
    async fn concurrent_creates_have_one_winner() {
        let dir = TempDir::new("race");
        let store = Store::open_sqlite(&dir.0, &MasterKey::generate())
            .await
            .unwrap();
        let tasks: Vec<_> = (0..8)
            .map(|i| {
                let store = store.clone();
                tokio::spawn(async move {
                    store
                        .create_connection(&definition("same", &format!("pw{i}")))
                        .await
                })
            })
            .collect();
        let mut ok = 0;
        for task in tasks {
            match task.await.unwrap() {
                Ok(()) => ok += 1,
                Err(StoreError::Conflict { name }) => assert_eq!(name, "same"),
                Err(e) => panic!("unexpected {e}"),
            }
        }
        assert_eq!(ok, 1);
        store.close().await;
    }

    #[tokio::test]
    async fn corrupt_json_is_reported_without_content() {
        let store = Store::open_memory().await.unwrap();
        sqlx::query(
            "INSERT INTO connections (name, definition, created_at, updated_at) \
             VALUES ('bad', '{\"name\":\"bad\",\"base_url\":\"hunter2\"}', 0, 0)",
        )
        .execute(&store.pool)
        .await
        .unwrap();
        let err = store.connection("bad").await.unwrap_err();
        assert!(matches!(err, StoreError::Corrupt(_)), "{err:?}");
        let text = format!("{err} {err:?}");
        assert!(text.contains("bad"), "{text}");
        assert!(!text.contains("hunter2"), "{text}");
        assert!(matches!(
            store.list_connections().await,
            Err(StoreError::Corrupt(_))
        ));
    }

    #[tokio::test]
    async fn sqlite_file_persists_across_reopen() {
        let dir = TempDir::new("reopen");
        let data_dir = dir.0.join("nested").join("data");
        let key = MasterKey::generate();
        let store = Store::open_sqlite(&data_dir, &key).await.unwrap();
        let db = data_dir.join(DATABASE_FILE);
        assert!(db.is_file());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = std::fs::metadata(&db).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let (mode,): (String,) = sqlx::query_as("PRAGMA journal_mode")
            .fetch_one(&store.pool)
            .await
            .unwrap();
        assert_eq!(mode.to_ascii_lowercase(), "wal");
        let (fk,): (i64,) = sqlx::query_as("PRAGMA foreign_keys")
            .fetch_one(&store.pool)
            .await
            .unwrap();
        assert_eq!(fk, 1);

        store.insert_admin_token("admin").await.unwrap();
        let agent = store.create_agent("a", "g", "t").await.unwrap();
        store
            .create_connection(&definition("jira", "pw"))
            .await
            .unwrap();
        store.close().await;

        // Reopening runs the migrations again (a no-op) and finds everything.
        let store = Store::open_sqlite(&data_dir, &key).await.unwrap();
        assert_eq!(store.admin_token_hashes().await.unwrap(), ["admin"]);
        assert_eq!(store.agent(&agent.id).await.unwrap(), Some(agent));
        assert_eq!(
            store.connection("jira").await.unwrap(),
            Some(definition("jira", "pw"))
        );
        store.close().await;
    }
    /// Every byte of the SQLite files of `data_dir`, for plaintext searches.
    fn database_bytes(data_dir: &Path) -> Vec<u8> {
        let mut all = Vec::new();
        for suffix in ["", "-wal", "-shm"] {
            let path = data_dir.join(format!("{DATABASE_FILE}{suffix}"));
            if let Ok(bytes) = std::fs::read(&path) {
                all.extend_from_slice(&bytes);
            }
        }
        all
    }

    fn contains(haystack: &[u8], needle: &str) -> bool {
        haystack
            .windows(needle.len())
            .any(|w| w == needle.as_bytes())
    }

    #[tokio::test]
    async fn secrets_are_sealed_on_disk_and_need_the_key() {
        const SECRET: &str = "pw-7f3a9c-never-on-disk";
        let dir = TempDir::new("sealed");
        let key = MasterKey::generate();
        let store = Store::open_sqlite(&dir.0, &key).await.unwrap();
        store
            .create_connection(&definition("jira", SECRET))
            .await
            .unwrap();
        store
            .update_connection(&definition("jira", &format!("{SECRET}-2")))
            .await
            .unwrap();
        let (stored,): (String,) =
            sqlx::query_as("SELECT definition FROM connections WHERE name = 'jira'")
                .fetch_one(&store.pool)
                .await
                .unwrap();
        assert!(!stored.contains(SECRET), "{stored}");
        let stored: serde_json::Value = serde_json::from_str(&stored).unwrap();
        assert!(stored["auth"]["password"]["enc"]
            .as_str()
            .unwrap()
            .starts_with("v1:"));
        assert_eq!(stored["auth"]["username"], "svc");
        assert_eq!(
            store.connection("jira").await.unwrap(),
            Some(definition("jira", &format!("{SECRET}-2")))
        );
        assert_eq!(store.seal_stored_secrets().await.unwrap(), 0);
        assert!(!contains(&database_bytes(&dir.0), SECRET));
        store.close().await;
        assert!(!contains(&database_bytes(&dir.0), SECRET));

        // Another key: every read of the connection fails, naming it but not the value.
        let other = Store::open_sqlite(&dir.0, &MasterKey::generate())
            .await
            .unwrap();
        for err in [
            other.seal_stored_secrets().await.unwrap_err(),
            other.connection("jira").await.unwrap_err(),
            other.list_connections().await.unwrap_err(),
        ] {
            assert!(
                matches!(&err, StoreError::Decrypt { connection, .. } if connection == "jira"),
                "{err:?}"
            );
            let text = format!("{err} {err:?}");
            assert!(
                text.contains("'jira'") && text.contains("/auth/password"),
                "{text}"
            );
            assert!(text.contains("master key"), "{text}");
            assert!(!text.contains(SECRET), "{text}");
        }
        other.close().await;

        // The right key still works.
        let store = Store::open_sqlite(&dir.0, &key).await.unwrap();
        assert_eq!(store.list_connections().await.unwrap().len(), 1);
        store.close().await;
    }

    #[tokio::test]
    async fn plaintext_rows_are_read_and_sealed_at_startup() {
        const SECRET: &str = "legacy-plaintext-4b1d";
        let dir = TempDir::new("legacy");
        let store = Store::open_sqlite(&dir.0, &MasterKey::generate())
            .await
            .unwrap();
        // A row as a relay without encryption wrote it.
        let legacy = serde_json::to_string(&definition("old", SECRET)).unwrap();
        sqlx::query(
            "INSERT INTO connections (name, definition, created_at, updated_at) \
             VALUES ('old', $1, 0, 0)",
        )
        .bind(&legacy)
        .execute(&store.pool)
        .await
        .unwrap();
        store
            .create_connection(&definition("new", "x"))
            .await
            .unwrap();
        assert_eq!(
            store.connection("old").await.unwrap(),
            Some(definition("old", SECRET))
        );
        assert_eq!(store.seal_stored_secrets().await.unwrap(), 1);
        assert_eq!(store.seal_stored_secrets().await.unwrap(), 0);
        assert_eq!(
            store.connection("old").await.unwrap(),
            Some(definition("old", SECRET))
        );
        let (stored,): (String,) =
            sqlx::query_as("SELECT definition FROM connections WHERE name = 'old'")
                .fetch_one(&store.pool)
                .await
                .unwrap();
        assert!(!stored.contains(SECRET), "{stored}");
        store.close().await;
        // secure_delete and the WAL truncation leave no copy of the old row in the files.
        assert!(!contains(&database_bytes(&dir.0), SECRET));
    }

    #[tokio::test]
    async fn swapped_ciphertexts_do_not_open() {
        let store = Store::open_memory().await.unwrap();
        store
            .create_connection(&definition("a", "pa"))
            .await
            .unwrap();
        store
            .create_connection(&definition("b", "pb"))
            .await
            .unwrap();
        // Copy a's sealed row over b's: the name in the associated data no longer matches.
        sqlx::query(
            "UPDATE connections SET definition = \
             (SELECT replace(definition, '\"name\":\"a\"', '\"name\":\"b\"') \
              FROM connections WHERE name = 'a') WHERE name = 'b'",
        )
        .execute(&store.pool)
        .await
        .unwrap();
        let err = store.connection("b").await.unwrap_err();
        assert!(
            matches!(&err, StoreError::Decrypt { connection, .. } if connection == "b"),
            "{err:?}"
        );
        assert_eq!(
            store.connection("a").await.unwrap(),
            Some(definition("a", "pa"))
        );
    }
}
