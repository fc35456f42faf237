//! The Store facade: the only code in drover that speaks SQL.
//!
//! The engine and the application layer call the methods here; nothing else issues queries.
//! SQLite in WAL mode is the embedded default. Queries use `$N` placeholders and portable SQL so
//! that a PostgreSQL backend can sit behind the same facade (a later issue adds it).
//!
//! Inventory objects (sites, hosts, datastores, VMs, jobs, replicas, plans, recovery locations) are
//! stored as typed JSON documents with their queried columns beside them, see [`Entity`]; sessions,
//! tasks, logs, saga steps, users and tokens have tables of their own because they are filtered,
//! paged and updated field by field.
//!
//! Invariant: every write that must not be half-done (a session with its tasks, an object with its
//! references) happens in one transaction.

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use drover_types::{
    AgentEnrolment, AgentStatus, AuditEntry, AuditFilter, AuditRecord, CompareOp, Error, HostId, LogEntry, LogLevel,
    ReplicaId, RestorePoint, RestorePointDisk, RestorePointId, RestorePointState, Role, Session, SessionCondition,
    SessionId, SessionKind, SessionOrder, SessionQuery, SessionSummary, SessionTarget, StepRecord, StepState, Task,
    TaskId, Tenant, TenantId, Timestamp, User, UserId,
};
use serde::{Serialize, de::DeserializeOwned};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Row, SqlitePool};
use uuid::Uuid;

mod entity;
pub use entity::Entity;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error")]
    Database(#[from] sqlx::Error),
    #[error("migration failed")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("stored value is corrupt: {0}")]
    Corrupt(String),
    #[error(transparent)]
    Domain(#[from] Error),
}

impl From<StoreError> for Error {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Domain(d) => d,
            StoreError::Database(sqlx::Error::Database(db)) if db.is_unique_violation() => {
                Error::AlreadyExists(format!("an object with the same name already exists ({})", db.message()))
            }
            StoreError::Database(sqlx::Error::PoolTimedOut) => Error::Unavailable("the database is busy".into()),
            // Keep the chain in the message: this is what an operator reads in the log.
            other => Error::Internal(drover_types::error_chain(&other)),
        }
    }
}

type StoreResult<T> = std::result::Result<T, StoreError>;
pub type Result<T> = std::result::Result<T, Error>;

pub use drover_types::SessionFilter;

/// A token as stored: only the hash of its value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenRecord {
    pub hash: String,
    pub kind: TokenKind,
    pub user_id: UserId,
    pub family: Uuid,
    pub expires_at: Timestamp,
    pub used_at: Option<Timestamp>,
    pub created_at: Timestamp,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenKind {
    Access,
    Refresh,
}

impl TokenKind {
    fn as_str(self) -> &'static str {
        match self {
            TokenKind::Access => "access",
            TokenKind::Refresh => "refresh",
        }
    }
}

/// What `refresh_token_consume` found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RefreshOutcome {
    /// The token was valid and is now used.
    Consumed(TokenRecord),
    /// The token had been used before: a sign of theft. Its whole family has been revoked.
    Reused,
    /// Unknown or expired.
    Invalid,
}

#[derive(Debug, Clone)]
pub struct Store {
    pool: SqlitePool,
}

fn ms(t: Timestamp) -> i64 {
    t.timestamp_millis()
}

fn from_ms(v: i64) -> StoreResult<Timestamp> {
    chrono::DateTime::from_timestamp_millis(v).ok_or_else(|| StoreError::Corrupt(format!("timestamp {v}")))
}

fn opt_from_ms(v: Option<i64>) -> StoreResult<Option<Timestamp>> {
    v.map(from_ms).transpose()
}

/// Unit enums are stored by their serde name ("Working"), the same name the JSON API shows.
fn enum_str<T: Serialize>(v: &T) -> String {
    match serde_json::to_value(v) {
        Ok(serde_json::Value::String(s)) => s,
        other => format!("{other:?}"),
    }
}

fn enum_parse<T: DeserializeOwned>(s: &str) -> StoreResult<T> {
    serde_json::from_value(serde_json::Value::String(s.to_string()))
        .map_err(|_| StoreError::Corrupt(format!("unknown enum value {s:?}")))
}

fn uuid_parse(s: &str) -> StoreResult<Uuid> {
    Uuid::parse_str(s).map_err(|_| StoreError::Corrupt(format!("bad uuid {s:?}")))
}

fn json_parse<T: DeserializeOwned>(s: &str) -> StoreResult<T> {
    serde_json::from_str(s).map_err(|e| StoreError::Corrupt(format!("bad JSON document: {e}")))
}

/// The domain value of an inventory row.
fn body_of<T: DeserializeOwned>(row: &sqlx::sqlite::SqliteRow) -> Result<T> {
    let body: String = row.try_get("body").map_err(StoreError::from)?;
    Ok(json_parse(&body)?)
}

fn json_str<T: Serialize>(v: &T) -> StoreResult<String> {
    serde_json::to_string(v).map_err(|e| StoreError::Corrupt(format!("cannot encode: {e}")))
}

impl Store {
    /// Opens (creating if needed) the SQLite database at `path` and brings its schema up to date.
    pub async fn open_sqlite(path: &Path) -> Result<Store> {
        let options = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            // FULL: a committed transaction survives a power cut, not only a killed process.
            .synchronous(SqliteSynchronous::Full)
            .foreign_keys(true)
            .busy_timeout(Duration::from_secs(10));
        let pool = SqlitePoolOptions::new()
            .max_connections(8)
            .acquire_timeout(Duration::from_secs(30))
            .connect_with(options)
            .await
            .map_err(StoreError::from)?;
        let store = Store { pool };
        store.migrate().await?;
        Ok(store)
    }

    async fn migrate(&self) -> Result<()> {
        sqlx::migrate!("./migrations/sqlite").run(&self.pool).await.map_err(StoreError::from)?;
        self.backfill_session_names().await
    }

    /// Writes `name_lower` of the sessions stored before migration 0005 (SQL cannot lower-case
    /// as Rust does); a no-op once done.
    async fn backfill_session_names(&self) -> Result<()> {
        let rows = sqlx::query("SELECT id, name FROM sessions WHERE name_lower IS NULL")
            .fetch_all(&self.pool)
            .await
            .map_err(StoreError::from)?;
        if rows.is_empty() {
            return Ok(());
        }
        let mut tx = self.write_tx().await.map_err(StoreError::from)?;
        for r in &rows {
            let (id, name): (String, String) = (r.get("id"), r.get("name"));
            sqlx::query("UPDATE sessions SET name_lower = $1 WHERE id = $2")
                .bind(name.to_lowercase())
                .bind(id)
                .execute(&mut *tx)
                .await
                .map_err(StoreError::from)?;
        }
        tx.commit().await.map_err(StoreError::from)?;
        Ok(())
    }

    /// A write transaction. SQLite's default (deferred) transaction that reads and then writes
    /// fails at once with SQLITE_BUSY when another writer got in between, without waiting;
    /// `BEGIN IMMEDIATE` takes the write lock up front and so honours the busy timeout.
    async fn write_tx(&self) -> std::result::Result<sqlx::Transaction<'static, sqlx::Sqlite>, sqlx::Error> {
        self.pool.begin_with("BEGIN IMMEDIATE").await
    }

    pub fn backend(&self) -> &'static str {
        "sqlite"
    }

    /// Cheap liveness check for health endpoints.
    pub async fn ping(&self) -> Result<()> {
        sqlx::query("SELECT 1").execute(&self.pool).await.map_err(StoreError::from)?;
        Ok(())
    }

    // ---------------------------------------------------------------------------------------------
    // Tenants and users

    pub async fn tenant_create(&self, tenant: &Tenant) -> Result<()> {
        sqlx::query("INSERT INTO tenants (id, name, is_system, created_at) VALUES ($1, $2, $3, $4)")
            .bind(tenant.id.to_string())
            .bind(&tenant.name)
            .bind(tenant.is_system)
            .bind(ms(tenant.created_at))
            .execute(&self.pool)
            .await
            .map_err(|e| unique_as(e, format!("a tenant named {:?} already exists", tenant.name)))?;
        Ok(())
    }

    pub async fn tenant_get(&self, id: TenantId) -> Result<Tenant> {
        let row = sqlx::query("SELECT id, name, is_system, created_at FROM tenants WHERE id = $1")
            .bind(id.to_string())
            .fetch_optional(&self.pool)
            .await
            .map_err(StoreError::from)?
            .ok_or_else(|| Error::not_found(TenantId::KIND, id))?;
        Ok(tenant_from_row(&row)?)
    }

    pub async fn tenant_list(&self) -> Result<Vec<Tenant>> {
        let rows = sqlx::query("SELECT id, name, is_system, created_at FROM tenants ORDER BY created_at, name")
            .fetch_all(&self.pool)
            .await
            .map_err(StoreError::from)?;
        Ok(rows.iter().map(tenant_from_row).collect::<StoreResult<_>>()?)
    }

    pub async fn tenant_system(&self) -> Result<Option<Tenant>> {
        let row = sqlx::query("SELECT id, name, is_system, created_at FROM tenants WHERE is_system = $1")
            .bind(true)
            .fetch_optional(&self.pool)
            .await
            .map_err(StoreError::from)?;
        Ok(row.as_ref().map(tenant_from_row).transpose()?)
    }

    pub async fn user_create(&self, user: &User, password_hash: &str) -> Result<()> {
        sqlx::query(
            "INSERT INTO users (id, tenant_id, name, role, password_hash, created_at) VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(user.id.to_string())
        .bind(user.tenant_id.to_string())
        .bind(&user.name)
        .bind(user.role.as_str())
        .bind(password_hash)
        .bind(ms(user.created_at))
        .execute(&self.pool)
        .await
        .map_err(|e| unique_as(e, format!("a user named {:?} already exists", user.name)))?;
        Ok(())
    }

    pub async fn user_get(&self, id: UserId) -> Result<User> {
        let row = sqlx::query("SELECT id, tenant_id, name, role, created_at FROM users WHERE id = $1")
            .bind(id.to_string())
            .fetch_optional(&self.pool)
            .await
            .map_err(StoreError::from)?
            .ok_or_else(|| Error::not_found(UserId::KIND, id))?;
        Ok(user_from_row(&row)?)
    }

    /// The user and its password hash, for logging in. Names are matched exactly.
    pub async fn user_by_name(&self, name: &str) -> Result<Option<(User, String)>> {
        let row = sqlx::query("SELECT id, tenant_id, name, role, created_at, password_hash FROM users WHERE name = $1")
            .bind(name)
            .fetch_optional(&self.pool)
            .await
            .map_err(StoreError::from)?;
        match row {
            None => Ok(None),
            Some(r) => {
                let hash: String = r.try_get("password_hash").map_err(StoreError::from)?;
                Ok(Some((user_from_row(&r)?, hash)))
            }
        }
    }

    pub async fn user_list(&self, tenant: TenantId) -> Result<Vec<User>> {
        let rows =
            sqlx::query("SELECT id, tenant_id, name, role, created_at FROM users WHERE tenant_id = $1 ORDER BY name")
                .bind(tenant.to_string())
                .fetch_all(&self.pool)
                .await
                .map_err(StoreError::from)?;
        Ok(rows.iter().map(user_from_row).collect::<StoreResult<_>>()?)
    }

    pub async fn user_count(&self) -> Result<u64> {
        let n: i64 =
            sqlx::query_scalar("SELECT COUNT(*) FROM users").fetch_one(&self.pool).await.map_err(StoreError::from)?;
        Ok(n as u64)
    }

    pub async fn user_delete(&self, tenant: TenantId, id: UserId) -> Result<()> {
        let done = sqlx::query("DELETE FROM users WHERE id = $1 AND tenant_id = $2")
            .bind(id.to_string())
            .bind(tenant.to_string())
            .execute(&self.pool)
            .await
            .map_err(StoreError::from)?;
        if done.rows_affected() == 0 {
            return Err(Error::not_found(UserId::KIND, id));
        }
        Ok(())
    }

    pub async fn user_set_role(&self, id: UserId, role: Role) -> Result<()> {
        let done = sqlx::query("UPDATE users SET role = $1 WHERE id = $2")
            .bind(role.as_str())
            .bind(id.to_string())
            .execute(&self.pool)
            .await
            .map_err(StoreError::from)?;
        if done.rows_affected() == 0 {
            return Err(Error::not_found(UserId::KIND, id));
        }
        Ok(())
    }

    pub async fn user_set_password(&self, id: UserId, password_hash: &str) -> Result<()> {
        let mut tx = self.write_tx().await.map_err(StoreError::from)?;
        let done = sqlx::query("UPDATE users SET password_hash = $1 WHERE id = $2")
            .bind(password_hash)
            .bind(id.to_string())
            .execute(&mut *tx)
            .await
            .map_err(StoreError::from)?;
        if done.rows_affected() == 0 {
            return Err(Error::not_found(UserId::KIND, id));
        }
        // A new password ends every login made with the old one.
        sqlx::query("DELETE FROM tokens WHERE user_id = $1")
            .bind(id.to_string())
            .execute(&mut *tx)
            .await
            .map_err(StoreError::from)?;
        tx.commit().await.map_err(StoreError::from)?;
        Ok(())
    }

    // ---------------------------------------------------------------------------------------------
    // Tokens

    pub async fn token_insert(&self, t: &TokenRecord) -> Result<()> {
        sqlx::query(
            "INSERT INTO tokens (hash, kind, user_id, family, expires_at, used_at, created_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(&t.hash)
        .bind(t.kind.as_str())
        .bind(t.user_id.to_string())
        .bind(t.family.to_string())
        .bind(ms(t.expires_at))
        .bind(t.used_at.map(ms))
        .bind(ms(t.created_at))
        .execute(&self.pool)
        .await
        .map_err(StoreError::from)?;
        Ok(())
    }

    /// A valid (unexpired) access token.
    pub async fn access_token_get(&self, hash: &str, now: Timestamp) -> Result<Option<TokenRecord>> {
        let row = sqlx::query(
            "SELECT hash, kind, user_id, family, expires_at, used_at, created_at FROM tokens
             WHERE hash = $1 AND kind = 'access' AND expires_at > $2",
        )
        .bind(hash)
        .bind(ms(now))
        .fetch_optional(&self.pool)
        .await
        .map_err(StoreError::from)?;
        Ok(row.as_ref().map(token_from_row).transpose()?)
    }

    /// Uses a refresh token once. The check and the marking are one conditional UPDATE, so two
    /// concurrent uses cannot both succeed; a second use revokes the whole family.
    pub async fn refresh_token_consume(&self, hash: &str, now: Timestamp) -> Result<RefreshOutcome> {
        let mut tx = self.write_tx().await.map_err(StoreError::from)?;
        let updated = sqlx::query(
            "UPDATE tokens SET used_at = $1 WHERE hash = $2 AND kind = 'refresh' AND used_at IS NULL AND expires_at > $1",
        )
        .bind(ms(now))
        .bind(hash)
        .execute(&mut *tx)
        .await
        .map_err(StoreError::from)?;
        let row = sqlx::query(
            "SELECT hash, kind, user_id, family, expires_at, used_at, created_at FROM tokens WHERE hash = $1 AND kind = 'refresh'",
        )
        .bind(hash)
        .fetch_optional(&mut *tx)
        .await
        .map_err(StoreError::from)?;
        let outcome = match row {
            None => RefreshOutcome::Invalid,
            Some(r) => {
                let rec = token_from_row(&r)?;
                if updated.rows_affected() == 1 {
                    RefreshOutcome::Consumed(rec)
                } else if rec.used_at.is_some() && rec.expires_at > now {
                    sqlx::query("DELETE FROM tokens WHERE family = $1")
                        .bind(rec.family.to_string())
                        .execute(&mut *tx)
                        .await
                        .map_err(StoreError::from)?;
                    RefreshOutcome::Reused
                } else {
                    RefreshOutcome::Invalid
                }
            }
        };
        tx.commit().await.map_err(StoreError::from)?;
        Ok(outcome)
    }

    pub async fn tokens_purge_expired(&self, now: Timestamp) -> Result<u64> {
        let done = sqlx::query("DELETE FROM tokens WHERE expires_at <= $1")
            .bind(ms(now))
            .execute(&self.pool)
            .await
            .map_err(StoreError::from)?;
        Ok(done.rows_affected())
    }

    // ---------------------------------------------------------------------------------------------
    // Inventory

    /// Inserts a new object with its references, in one transaction. Every referenced object must
    /// exist in the same tenant.
    pub async fn object_insert<T: Entity>(&self, obj: &T) -> Result<()> {
        self.object_insert_with(obj, None).await
    }

    /// Inserts a new object and the session that works on it, in one transaction: a crash leaves
    /// both or neither (never an object that waits for a session nobody recorded).
    /// `before_commit` runs inside the transaction, just before it commits (fault injection).
    pub async fn object_insert_with_session<T: Entity>(
        &self,
        obj: &T,
        session: &Session,
        tasks: &[Task],
        before_commit: &(dyn Fn() + Send + Sync),
    ) -> Result<()> {
        self.object_insert_with(obj, Some((&SessionWrite::Insert(session, tasks), before_commit))).await
    }

    async fn object_insert_with<T: Entity>(&self, obj: &T, with: Option<WithSession<'_>>) -> Result<()> {
        let mut tx = self.write_tx().await.map_err(StoreError::from)?;
        check_refs(&mut tx, obj).await?;
        let now = ms(drover_types::now());
        sqlx::query(
            "INSERT INTO inventory (kind, id, tenant_id, name, body, version, created_at, updated_at)
             VALUES ($1, $2, $3, $4, $5, 1, $6, $6)",
        )
        .bind(T::KIND)
        .bind(obj.id().to_string())
        .bind(obj.tenant().to_string())
        .bind(obj.name())
        .bind(json_str(obj)?)
        .bind(now)
        .execute(&mut *tx)
        .await
        .map_err(|e| unique_as(e, format!("a {} named {:?} already exists", T::LABEL, obj.name())))?;
        write_refs(&mut tx, obj).await?;
        if let Some((write, before_commit)) = with {
            session_write(&mut tx, write).await?;
            before_commit();
        }
        tx.commit().await.map_err(StoreError::from)?;
        Ok(())
    }

    /// An object of the tenant, or one granted to it (see [`Store::grant_insert`]).
    pub async fn object_get<T: Entity>(&self, tenant: TenantId, id: Uuid) -> Result<T> {
        let row =
            sqlx::query(&format!("SELECT body FROM inventory WHERE kind = $1 AND id = $2 AND {}", visible_to("$3")))
                .bind(T::KIND)
                .bind(id.to_string())
                .bind(tenant.to_string())
                .fetch_optional(&self.pool)
                .await
                .map_err(StoreError::from)?
                .ok_or_else(|| Error::not_found(T::LABEL, id))?;
        body_of(&row)
    }

    /// Looks an object up in any tenant. Only for the engine's recovery and background work,
    /// never on behalf of a user.
    pub async fn object_get_any_tenant<T: Entity>(&self, id: Uuid) -> Result<T> {
        let row = sqlx::query("SELECT body FROM inventory WHERE kind = $1 AND id = $2")
            .bind(T::KIND)
            .bind(id.to_string())
            .fetch_optional(&self.pool)
            .await
            .map_err(StoreError::from)?
            .ok_or_else(|| Error::not_found(T::LABEL, id))?;
        body_of(&row)
    }

    /// All objects of a kind a tenant has or was granted, by name.
    pub async fn object_list<T: Entity>(&self, tenant: TenantId) -> Result<Vec<T>> {
        let sql = format!("SELECT body FROM inventory WHERE kind = $1 AND {} ORDER BY name", visible_to("$2"));
        let rows = sqlx::query(&sql)
            .bind(T::KIND)
            .bind(tenant.to_string())
            .fetch_all(&self.pool)
            .await
            .map_err(StoreError::from)?;
        rows.iter().map(body_of).collect()
    }

    /// All objects of a kind in every tenant. Only for the engine's background work.
    pub async fn object_list_all<T: Entity>(&self) -> Result<Vec<T>> {
        let rows = sqlx::query("SELECT body FROM inventory WHERE kind = $1 ORDER BY tenant_id, name")
            .bind(T::KIND)
            .fetch_all(&self.pool)
            .await
            .map_err(StoreError::from)?;
        rows.iter().map(body_of).collect()
    }

    /// Reads, changes and writes one object. `change` may refuse with a domain error, which is
    /// returned and changes nothing. A concurrent writer makes the cycle start again.
    pub async fn object_modify<T, F, R>(&self, tenant: TenantId, id: Uuid, change: F) -> Result<(T, R)>
    where
        T: Entity,
        F: FnMut(&mut T) -> Result<R>,
    {
        self.object_modify_with(tenant, id, change, None).await
    }

    /// [`Store::object_modify`] and a write of a session in the same transaction: an object's
    /// move into a state that a session carries out (a plan's `FailoverInProgress`, a VM's
    /// `Starting`) is never stored without that session, nor the session without the move.
    /// A refused `change` or a refused session write changes nothing. `before_commit` runs
    /// inside the transaction, just before it commits (fault injection).
    pub async fn object_modify_with_session<T, F, R>(
        &self,
        tenant: TenantId,
        id: Uuid,
        change: F,
        write: SessionWrite<'_>,
        before_commit: &(dyn Fn() + Send + Sync),
    ) -> Result<(T, R)>
    where
        T: Entity,
        F: FnMut(&mut T) -> Result<R>,
    {
        self.object_modify_with(tenant, id, change, Some((&write, before_commit))).await
    }

    async fn object_modify_with<T, F, R>(
        &self,
        tenant: TenantId,
        id: Uuid,
        mut change: F,
        with: Option<WithSession<'_>>,
    ) -> Result<(T, R)>
    where
        T: Entity,
        F: FnMut(&mut T) -> Result<R>,
    {
        for _ in 0..20 {
            let row = sqlx::query("SELECT body, version FROM inventory WHERE kind = $1 AND id = $2 AND tenant_id = $3")
                .bind(T::KIND)
                .bind(id.to_string())
                .bind(tenant.to_string())
                .fetch_optional(&self.pool)
                .await
                .map_err(StoreError::from)?
                .ok_or_else(|| Error::not_found(T::LABEL, id))?;
            let body: String = row.try_get("body").map_err(StoreError::from)?;
            let version: i64 = row.try_get("version").map_err(StoreError::from)?;
            let mut obj: T = json_parse(&body)?;
            let out = change(&mut obj)?;
            if obj.id() != id || obj.tenant() != tenant {
                return Err(Error::internal("an update may not change an object's id or tenant"));
            }
            let mut tx = self.write_tx().await.map_err(StoreError::from)?;
            check_refs(&mut tx, &obj).await?;
            let done = sqlx::query(
                "UPDATE inventory SET name = $1, body = $2, version = version + 1, updated_at = $3
                 WHERE kind = $4 AND id = $5 AND version = $6",
            )
            .bind(obj.name())
            .bind(json_str(&obj)?)
            .bind(ms(drover_types::now()))
            .bind(T::KIND)
            .bind(id.to_string())
            .bind(version)
            .execute(&mut *tx)
            .await
            .map_err(|e| unique_as(e, format!("a {} named {:?} already exists", T::LABEL, obj.name())))?;
            if done.rows_affected() == 0 {
                tx.rollback().await.map_err(StoreError::from)?;
                tokio_yield().await;
                continue;
            }
            sqlx::query("DELETE FROM inventory_refs WHERE from_kind = $1 AND from_id = $2")
                .bind(T::KIND)
                .bind(id.to_string())
                .execute(&mut *tx)
                .await
                .map_err(StoreError::from)?;
            write_refs(&mut tx, &obj).await?;
            if let Some((write, before_commit)) = with {
                session_write(&mut tx, write).await?;
                before_commit();
            }
            tx.commit().await.map_err(StoreError::from)?;
            return Ok((obj, out));
        }
        Err(Error::Unavailable(format!("{} {id} is being changed by others; try again", T::LABEL)))
    }

    /// `Conflict` when other objects still refer to this one (what a delete would refuse).
    pub async fn object_check_unreferenced<T: Entity>(&self, tenant: TenantId, id: Uuid) -> Result<()> {
        self.object_get::<T>(tenant, id).await?;
        // Read-only: a deferred transaction is enough.
        let mut tx = self.pool.begin().await.map_err(StoreError::from)?;
        refuse_if_referenced::<T>(&mut tx, id).await?;
        tx.rollback().await.map_err(StoreError::from)?;
        Ok(())
    }

    /// Deletes an object nothing refers to.
    pub async fn object_delete<T: Entity>(&self, tenant: TenantId, id: Uuid) -> Result<()> {
        let mut tx = self.write_tx().await.map_err(StoreError::from)?;
        let exists = sqlx::query("SELECT 1 FROM inventory WHERE kind = $1 AND id = $2 AND tenant_id = $3")
            .bind(T::KIND)
            .bind(id.to_string())
            .bind(tenant.to_string())
            .fetch_optional(&mut *tx)
            .await
            .map_err(StoreError::from)?;
        if exists.is_none() {
            return Err(Error::not_found(T::LABEL, id));
        }
        refuse_if_referenced::<T>(&mut tx, id).await?;
        sqlx::query("DELETE FROM inventory_grants WHERE (kind = $1 AND id = $2) OR via_id = $2")
            .bind(T::KIND)
            .bind(id.to_string())
            .execute(&mut *tx)
            .await
            .map_err(StoreError::from)?;
        sqlx::query("DELETE FROM inventory WHERE kind = $1 AND id = $2")
            .bind(T::KIND)
            .bind(id.to_string())
            .execute(&mut *tx)
            .await
            .map_err(StoreError::from)?;
        sqlx::query("DELETE FROM inventory_refs WHERE from_kind = $1 AND from_id = $2")
            .bind(T::KIND)
            .bind(id.to_string())
            .execute(&mut *tx)
            .await
            .map_err(StoreError::from)?;
        tx.commit().await.map_err(StoreError::from)?;
        Ok(())
    }

    // ---------------------------------------------------------------------------------------------
    // The audit log

    /// Appends an entry; returns its position.
    pub async fn audit_append(&self, r: &AuditRecord) -> Result<i64> {
        insert_next_seq("audit log", || {
            sqlx::query_scalar::<_, i64>(
                "INSERT INTO audit_log (seq, at, tenant_id, user_id, user_name, action, outcome, address, detail)
                 SELECT COALESCE(MAX(seq), 0) + 1, $1, $2, $3, $4, $5, $6, $7, $8 FROM audit_log
                 RETURNING seq",
            )
            .bind(ms(r.at))
            .bind(r.tenant_id.map(|t| t.to_string()))
            .bind(r.user_id.map(|u| u.to_string()))
            .bind(&r.user_name)
            .bind(&r.action)
            .bind(enum_str(&r.outcome))
            .bind(&r.address)
            .bind(&r.detail)
            .fetch_one(&self.pool)
        })
        .await
    }

    /// Stores a new enrolment token's record.
    pub async fn enrolment_insert(&self, e: &AgentEnrolment) -> Result<()> {
        sqlx::query(
            "INSERT INTO agent_enrolments (token_hash, host_id, created_at, expires_at, consumed_at)
             VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(&e.token_hash)
        .bind(e.host_id.to_string())
        .bind(ms(e.created_at))
        .bind(ms(e.expires_at))
        .bind(e.consumed_at.map(ms))
        .execute(&self.pool)
        .await
        .map_err(StoreError::from)?;
        Ok(())
    }

    /// The record of the token with this hash, if any.
    pub async fn enrolment_get(&self, token_hash: &str) -> Result<Option<AgentEnrolment>> {
        let row = sqlx::query(
            "SELECT token_hash, host_id, created_at, expires_at, consumed_at FROM agent_enrolments WHERE token_hash = $1",
        )
        .bind(token_hash)
        .fetch_optional(&self.pool)
        .await
        .map_err(StoreError::from)?;
        let Some(row) = row else { return Ok(None) };
        let read = || -> StoreResult<AgentEnrolment> {
            let host: String = row.try_get("host_id")?;
            Ok(AgentEnrolment {
                host_id: HostId(
                    Uuid::from_str(&host).map_err(|e| StoreError::Corrupt(format!("host id {host}: {e}")))?,
                ),
                token_hash: row.try_get("token_hash")?,
                created_at: from_ms(row.try_get("created_at")?)?,
                expires_at: from_ms(row.try_get("expires_at")?)?,
                consumed_at: opt_from_ms(row.try_get("consumed_at")?)?,
            })
        };
        Ok(Some(read()?))
    }

    /// Marks the token used, if it is not yet: `false` when another enrolment used it first.
    /// The host's earlier unused tokens are withdrawn with it, and its agent counts as enrolled.
    pub async fn enrolment_consume(
        &self,
        token_hash: &str,
        host: HostId,
        now: Timestamp,
        certificate_expires_at: Timestamp,
    ) -> Result<bool> {
        let mut tx = self.pool.begin().await.map_err(StoreError::from)?;
        let done = sqlx::query(
            "UPDATE agent_enrolments SET consumed_at = $1 WHERE token_hash = $2 AND host_id = $3 AND consumed_at IS NULL",
        )
        .bind(ms(now))
        .bind(token_hash)
        .bind(host.to_string())
        .execute(&mut *tx)
        .await
        .map_err(StoreError::from)?;
        if done.rows_affected() != 1 {
            return Ok(false);
        }
        sqlx::query("DELETE FROM agent_enrolments WHERE host_id = $1 AND consumed_at IS NULL")
            .bind(host.to_string())
            .execute(&mut *tx)
            .await
            .map_err(StoreError::from)?;
        sqlx::query(
            "INSERT INTO agent_status (host_id, enrolled_at, certificate_expires_at) VALUES ($1, $2, $3)
             ON CONFLICT (host_id) DO UPDATE SET enrolled_at = excluded.enrolled_at,
                 certificate_expires_at = excluded.certificate_expires_at",
        )
        .bind(host.to_string())
        .bind(ms(now))
        .bind(ms(certificate_expires_at))
        .execute(&mut *tx)
        .await
        .map_err(StoreError::from)?;
        tx.commit().await.map_err(StoreError::from)?;
        Ok(true)
    }

    /// Records that a host's agent now presents a certificate that ends at `not_after`.
    pub async fn agent_certificate_renewed(&self, host: HostId, not_after: Timestamp) -> Result<()> {
        sqlx::query(
            "INSERT INTO agent_status (host_id, certificate_expires_at) VALUES ($1, $2)
             ON CONFLICT (host_id) DO UPDATE SET certificate_expires_at = excluded.certificate_expires_at",
        )
        .bind(host.to_string())
        .bind(ms(not_after))
        .execute(&self.pool)
        .await
        .map_err(StoreError::from)?;
        Ok(())
    }

    /// Records the outcome of a call to a host's agent: `error` `None` is a success at `at`.
    pub async fn agent_seen(&self, host: HostId, at: Timestamp, error: Option<&str>) -> Result<()> {
        let query = match error {
            None => {
                "INSERT INTO agent_status (host_id, last_seen) VALUES ($1, $2)
                 ON CONFLICT (host_id) DO UPDATE SET last_seen = excluded.last_seen, last_error = NULL"
            }
            Some(_) => {
                "INSERT INTO agent_status (host_id, last_error) VALUES ($1, $3)
                 ON CONFLICT (host_id) DO UPDATE SET last_error = excluded.last_error"
            }
        };
        sqlx::query(query)
            .bind(host.to_string())
            .bind(ms(at))
            .bind(error)
            .execute(&self.pool)
            .await
            .map_err(StoreError::from)?;
        Ok(())
    }

    /// What is known of a host's agent (all `None` when nothing is).
    pub async fn agent_status(&self, host: HostId) -> Result<AgentStatus> {
        let row = sqlx::query(
            "SELECT enrolled_at, last_seen, last_error, certificate_expires_at FROM agent_status WHERE host_id = $1",
        )
        .bind(host.to_string())
        .fetch_optional(&self.pool)
        .await
        .map_err(StoreError::from)?;
        let Some(row) = row else { return Ok(AgentStatus::default()) };
        let read = || -> StoreResult<AgentStatus> {
            Ok(AgentStatus {
                enrolled_at: opt_from_ms(row.try_get("enrolled_at")?)?,
                last_seen: opt_from_ms(row.try_get("last_seen")?)?,
                last_error: row.try_get("last_error")?,
                certificate_expires_at: opt_from_ms(row.try_get("certificate_expires_at")?)?,
            })
        };
        Ok(read()?)
    }

    /// Deletes the entries recorded before `before`; returns how many.
    pub async fn audit_purge_before(&self, before: Timestamp) -> Result<u64> {
        let done = sqlx::query("DELETE FROM audit_log WHERE at < $1")
            .bind(ms(before))
            .execute(&self.pool)
            .await
            .map_err(StoreError::from)?;
        Ok(done.rows_affected())
    }

    /// Entries newest first.
    pub async fn audit_list(&self, f: &AuditFilter) -> Result<Vec<AuditEntry>> {
        let rows = sqlx::query(
            "SELECT seq, at, tenant_id, user_id, user_name, action, outcome, address, detail FROM audit_log
              WHERE ($1 IS NULL OR tenant_id = $1) AND ($2 IS NULL OR seq < $2) AND ($3 IS NULL OR action = $3)
              ORDER BY seq DESC LIMIT $4",
        )
        .bind(f.tenant_id.map(|t| t.to_string()))
        .bind(f.before_seq)
        .bind(&f.action)
        .bind(f.limit.min(i64::MAX as u64) as i64)
        .fetch_all(&self.pool)
        .await
        .map_err(StoreError::from)?;
        rows.iter()
            .map(|row| -> StoreResult<AuditEntry> {
                let tenant: Option<String> = row.try_get("tenant_id")?;
                let user: Option<String> = row.try_get("user_id")?;
                let outcome: String = row.try_get("outcome")?;
                Ok(AuditEntry {
                    seq: row.try_get("seq")?,
                    record: AuditRecord {
                        at: from_ms(row.try_get("at")?)?,
                        tenant_id: tenant.as_deref().map(uuid_parse).transpose()?.map(TenantId),
                        user_id: user.as_deref().map(uuid_parse).transpose()?.map(UserId),
                        user_name: row.try_get("user_name")?,
                        action: row.try_get("action")?,
                        outcome: enum_parse(&outcome)?,
                        address: row.try_get("address")?,
                        detail: row.try_get("detail")?,
                    },
                })
            })
            .collect::<StoreResult<_>>()
            .map_err(Into::into)
    }

    // ---------------------------------------------------------------------------------------------
    // Grants: host resources of the system tenant lent to other tenants

    /// Grants `tenant` the objects `objects` (kind, id), all through `via` (the object the grant
    /// is about: a datastore, whose host and site come along). Granting twice changes nothing.
    pub async fn grant_insert(&self, tenant: TenantId, via: Uuid, objects: &[(&'static str, Uuid)]) -> Result<()> {
        let mut tx = self.write_tx().await.map_err(StoreError::from)?;
        let now = ms(drover_types::now());
        for (kind, id) in objects {
            sqlx::query(
                "INSERT INTO inventory_grants (kind, id, tenant_id, via_id, created_at) VALUES ($1, $2, $3, $4, $5)
                 ON CONFLICT DO NOTHING",
            )
            .bind(*kind)
            .bind(id.to_string())
            .bind(tenant.to_string())
            .bind(via.to_string())
            .bind(now)
            .execute(&mut *tx)
            .await
            .map_err(StoreError::from)?;
        }
        tx.commit().await.map_err(StoreError::from)?;
        Ok(())
    }

    /// Takes back what [`Store::grant_insert`] granted through `via`. Refused (`Conflict`, nothing
    /// changed) while an object of the tenant still uses something that only this grant shows it.
    pub async fn grant_delete(&self, tenant: TenantId, via: Uuid) -> Result<()> {
        let mut tx = self.write_tx().await.map_err(StoreError::from)?;
        let granted = sqlx::query("SELECT kind, id FROM inventory_grants WHERE via_id = $1 AND tenant_id = $2")
            .bind(via.to_string())
            .bind(tenant.to_string())
            .fetch_all(&mut *tx)
            .await
            .map_err(StoreError::from)?;
        if granted.is_empty() {
            return Err(Error::not_found("grant", format!("of {via} to tenant {tenant}")));
        }
        for row in &granted {
            let kind: String = row.try_get("kind").map_err(StoreError::from)?;
            let id: String = row.try_get("id").map_err(StoreError::from)?;
            let user = sqlx::query(
                "SELECT r.from_kind, i.name FROM inventory_refs r
                   JOIN inventory i ON i.kind = r.from_kind AND i.id = r.from_id
                  WHERE r.to_kind = $1 AND r.to_id = $2 AND i.tenant_id = $3
                    AND NOT EXISTS (SELECT 1 FROM inventory_grants g WHERE g.kind = $1 AND g.id = $2
                                      AND g.tenant_id = $3 AND g.via_id <> $4)
                  ORDER BY i.name LIMIT 1",
            )
            .bind(&kind)
            .bind(&id)
            .bind(tenant.to_string())
            .bind(via.to_string())
            .fetch_optional(&mut *tx)
            .await
            .map_err(StoreError::from)?;
            if let Some(u) = user {
                let from_kind: String = u.try_get("from_kind").map_err(StoreError::from)?;
                let name: String = u.try_get("name").map_err(StoreError::from)?;
                return Err(Error::conflict(format!(
                    "tenant {tenant} still uses {} {id} ({} {name:?}); move or delete that first",
                    entity::label_of(&kind),
                    entity::label_of(&from_kind)
                )));
            }
        }
        sqlx::query("DELETE FROM inventory_grants WHERE via_id = $1 AND tenant_id = $2")
            .bind(via.to_string())
            .bind(tenant.to_string())
            .execute(&mut *tx)
            .await
            .map_err(StoreError::from)?;
        tx.commit().await.map_err(StoreError::from)?;
        Ok(())
    }

    /// The tenants `via` is granted to.
    pub async fn grant_tenants(&self, via: Uuid) -> Result<Vec<TenantId>> {
        let rows = sqlx::query("SELECT DISTINCT tenant_id FROM inventory_grants WHERE via_id = $1 ORDER BY tenant_id")
            .bind(via.to_string())
            .fetch_all(&self.pool)
            .await
            .map_err(StoreError::from)?;
        rows.iter()
            .map(|r| {
                let t: String = r.try_get("tenant_id").map_err(StoreError::from)?;
                Ok(TenantId(uuid_parse(&t)?))
            })
            .collect()
    }

    // ---------------------------------------------------------------------------------------------
    // Sessions, tasks, logs, saga steps

    /// Creates a session with its tasks in one transaction.
    pub async fn session_insert(&self, s: &Session, tasks: &[Task]) -> Result<()> {
        let mut tx = self.write_tx().await.map_err(StoreError::from)?;
        session_insert_rows(&mut tx, s, tasks).await?;
        tx.commit().await.map_err(StoreError::from)?;
        Ok(())
    }

    /// Creates many sessions with their tasks in one transaction (imports, benchmarks and tests
    /// that need a long history fast).
    pub async fn session_insert_many(&self, sessions: &[(Session, Vec<Task>)]) -> Result<()> {
        let mut tx = self.write_tx().await.map_err(StoreError::from)?;
        for (s, tasks) in sessions {
            session_insert_rows(&mut tx, s, tasks).await?;
        }
        tx.commit().await.map_err(StoreError::from)?;
        Ok(())
    }

    /// A page of a tenant's sessions that meet `q`, as summaries (no parameters read), and how
    /// many meet it in all. The condition, the order and the page are all evaluated in SQL.
    pub async fn session_summaries(&self, tenant: TenantId, q: &SessionQuery) -> Result<(Vec<SessionSummary>, u64)> {
        let mut binds = vec![Bind::Text(tenant.to_string())];
        let mut where_clause = "tenant_id = $1".to_string();
        if !q.kinds.is_empty() {
            let list: Vec<String> =
                q.kinds.iter().map(|k| push_bind(&mut binds, Bind::Text(k.as_str().into()))).collect();
            where_clause.push_str(&format!(" AND kind IN ({})", list.join(", ")));
        }
        let condition = condition_sql(&q.condition, &mut binds);
        where_clause.push_str(&format!(" AND {condition}"));
        let newest_first = "created_at DESC, id DESC";
        let order = match q.order {
            None => newest_first.to_string(),
            Some((field, ascending)) => {
                let column = match field {
                    SessionOrder::Id => "id",
                    SessionOrder::NameLowercase => "name_lower",
                    SessionOrder::CreatedAt => "created_at",
                    SessionOrder::EndedAt => "ended_at",
                    SessionOrder::State => STATE_RANK,
                    SessionOrder::Result => RESULT_RANK,
                };
                // NULLs sort first in SQLite, and ascending is what a missing end time needs;
                // PostgreSQL will need NULLS FIRST / LAST spelled out.
                format!("{column} {}, {newest_first}", if ascending { "ASC" } else { "DESC" })
            }
        };
        let count_sql = format!("SELECT COUNT(*) FROM sessions WHERE {where_clause}");
        let page_sql = format!(
            "SELECT id, tenant_id, kind, name, target_kind, target_id, state, result, progress, failure_message,
                    created_at, ended_at
             FROM sessions WHERE {where_clause} ORDER BY {order} LIMIT ${} OFFSET ${}",
            binds.len() + 1,
            binds.len() + 2
        );
        let mut count = sqlx::query_scalar::<_, i64>(&count_sql);
        for b in &binds {
            count = match b {
                Bind::Text(t) => count.bind(t.as_str()),
                Bind::Int(i) => count.bind(*i),
            };
        }
        let total = count.fetch_one(&self.pool).await.map_err(StoreError::from)?;
        let mut page = sqlx::query(&page_sql);
        for b in &binds {
            page = match b {
                Bind::Text(t) => page.bind(t.as_str()),
                Bind::Int(i) => page.bind(*i),
            };
        }
        // Row by row: a row is decoded into its summary and dropped, so a long list costs the
        // summaries only, not every row's buffers as well.
        let mut rows =
            page.bind(q.limit.min(i64::MAX as u64) as i64).bind(q.offset.min(i64::MAX as u64) as i64).fetch(&self.pool);
        let mut summaries = Vec::with_capacity(q.limit.min(total as u64).min(10_000) as usize);
        while let Some(row) = futures::TryStreamExt::try_next(&mut rows).await.map_err(StoreError::from)? {
            summaries.push(summary_from_row(&row)?);
        }
        Ok((summaries, total as u64))
    }

    pub async fn session_get(&self, tenant: Option<TenantId>, id: SessionId) -> Result<Session> {
        let row = sqlx::query(&format!("{SESSION_SELECT} WHERE id = $1 AND ($2 IS NULL OR tenant_id = $2)"))
            .bind(id.to_string())
            .bind(tenant.map(|t| t.to_string()))
            .fetch_optional(&self.pool)
            .await
            .map_err(StoreError::from)?
            .ok_or_else(|| Error::not_found(SessionId::KIND, id))?;
        Ok(session_from_row(&row)?)
    }

    /// A page of a tenant's sessions and the total that match the filter.
    pub async fn session_list(&self, tenant: TenantId, f: &SessionFilter) -> Result<(Vec<Session>, u64)> {
        let where_clause = "WHERE tenant_id = $1 AND ($2 IS NULL OR kind = $2) AND ($3 IS NULL OR state = $3)
             AND ($4 IS NULL OR result = $4) AND ($5 IS NULL OR target_id = $5) AND ($6 IS NULL OR created_at >= $6)";
        let order = if f.oldest_first { "ASC" } else { "DESC" };
        let sql = format!("{SESSION_SELECT} {where_clause} ORDER BY created_at {order}, id {order} LIMIT $7 OFFSET $8");
        let rows = sqlx::query(&sql)
            .bind(tenant.to_string())
            .bind(f.kind.map(|k| k.as_str()))
            .bind(f.state.map(|s| enum_str(&s)))
            .bind(f.result.map(|r| enum_str(&r)))
            .bind(f.target_id.map(|t| t.to_string()))
            .bind(f.created_after.map(ms))
            .bind(f.limit.min(i64::MAX as u64) as i64)
            .bind(f.offset.min(i64::MAX as u64) as i64)
            .fetch_all(&self.pool)
            .await
            .map_err(StoreError::from)?;
        let total: i64 = sqlx::query_scalar(&format!("SELECT COUNT(*) FROM sessions {where_clause}"))
            .bind(tenant.to_string())
            .bind(f.kind.map(|k| k.as_str()))
            .bind(f.state.map(|s| enum_str(&s)))
            .bind(f.result.map(|r| enum_str(&r)))
            .bind(f.target_id.map(|t| t.to_string()))
            .bind(f.created_after.map(ms))
            .fetch_one(&self.pool)
            .await
            .map_err(StoreError::from)?;
        let sessions = rows.iter().map(session_from_row).collect::<StoreResult<_>>()?;
        Ok((sessions, total as u64))
    }

    /// Sessions that are not stopped, oldest first: what the engine resumes on start.
    pub async fn sessions_unfinished(&self) -> Result<Vec<Session>> {
        let rows = sqlx::query(&format!("{SESSION_SELECT} WHERE state <> 'Stopped' ORDER BY created_at"))
            .fetch_all(&self.pool)
            .await
            .map_err(StoreError::from)?;
        Ok(rows.iter().map(session_from_row).collect::<StoreResult<_>>()?)
    }

    /// Writes a session's mutable fields, except `halt_requested`, which only
    /// [`Store::session_request_halt`] and [`Store::session_clear_halt_request`] change (a runner's
    /// copy of the session must not overwrite a halt that a user asked for meanwhile).
    pub async fn session_update(&self, s: &Session) -> Result<()> {
        session_update_row(&self.pool, s).await
    }

    /// Marks a halt request; returns false when the session had already stopped.
    pub async fn session_request_halt(&self, id: SessionId) -> Result<bool> {
        session_request_halt_row(&self.pool, id).await
    }

    pub async fn session_clear_halt_request(&self, id: SessionId) -> Result<()> {
        sqlx::query("UPDATE sessions SET halt_requested = $1 WHERE id = $2")
            .bind(false)
            .bind(id.to_string())
            .execute(&self.pool)
            .await
            .map_err(StoreError::from)?;
        Ok(())
    }

    pub async fn tasks_of(&self, session: SessionId) -> Result<Vec<Task>> {
        let rows = sqlx::query(
            "SELECT id, session_id, vm_id, name, state, result, progress, weight, failure_message, created_at, ended_at
             FROM tasks WHERE session_id = $1 ORDER BY position",
        )
        .bind(session.to_string())
        .fetch_all(&self.pool)
        .await
        .map_err(StoreError::from)?;
        Ok(rows.iter().map(task_from_row).collect::<StoreResult<_>>()?)
    }

    pub async fn task_update(&self, t: &Task) -> Result<()> {
        let done = sqlx::query(
            "UPDATE tasks SET state = $1, result = $2, progress = $3, failure_message = $4, ended_at = $5 WHERE id = $6",
        )
        .bind(enum_str(&t.state))
        .bind(enum_str(&t.result))
        .bind(i64::from(t.progress))
        .bind(&t.failure_message)
        .bind(t.ended_at.map(ms))
        .bind(t.id.to_string())
        .execute(&self.pool)
        .await
        .map_err(StoreError::from)?;
        if done.rows_affected() == 0 {
            return Err(Error::not_found(TaskId::KIND, t.id));
        }
        Ok(())
    }

    /// Appends to a session's log and returns the entry's position.
    pub async fn log_append(
        &self,
        session: SessionId,
        task: Option<TaskId>,
        level: LogLevel,
        message: &str,
    ) -> Result<i64> {
        let at = ms(drover_types::now());
        insert_next_seq("session log", || {
            sqlx::query_scalar::<_, i64>(
                "INSERT INTO session_log (session_id, seq, task_id, at, level, message)
                 SELECT $1, COALESCE(MAX(seq), 0) + 1, $2, $3, $4, $5 FROM session_log WHERE session_id = $1
                 RETURNING seq",
            )
            .bind(session.to_string())
            .bind(task.map(|t| t.to_string()))
            .bind(at)
            .bind(enum_str(&level))
            .bind(message)
            .fetch_one(&self.pool)
        })
        .await
    }

    /// Log entries after `after_seq`, at most `limit`.
    pub async fn log_list(&self, session: SessionId, after_seq: i64, limit: u64) -> Result<Vec<LogEntry>> {
        let rows = sqlx::query(
            "SELECT session_id, seq, task_id, at, level, message FROM session_log
             WHERE session_id = $1 AND seq > $2 ORDER BY seq LIMIT $3",
        )
        .bind(session.to_string())
        .bind(after_seq)
        .bind(limit.min(i64::MAX as u64) as i64)
        .fetch_all(&self.pool)
        .await
        .map_err(StoreError::from)?;
        rows.iter()
            .map(|r| -> StoreResult<LogEntry> {
                Ok(LogEntry {
                    session_id: SessionId(uuid_parse(r.try_get("session_id")?)?),
                    seq: r.try_get("seq")?,
                    task_id: r
                        .try_get::<Option<String>, _>("task_id")?
                        .map(|t| uuid_parse(&t).map(TaskId))
                        .transpose()?,
                    at: from_ms(r.try_get("at")?)?,
                    level: enum_parse(r.try_get("level")?)?,
                    message: r.try_get("message")?,
                })
            })
            .collect::<StoreResult<_>>()
            .map_err(Error::from)
    }

    /// Records a saga step's state. Written before a step runs and after it ends.
    pub async fn step_put(&self, s: &StepRecord) -> Result<()> {
        sqlx::query(
            "INSERT INTO saga_steps (session_id, position, task_id, name, state, attempts, output, error, updated_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
             ON CONFLICT (session_id, position) DO UPDATE SET task_id = excluded.task_id, name = excluded.name,
                 state = excluded.state, attempts = excluded.attempts, output = excluded.output,
                 error = excluded.error, updated_at = excluded.updated_at",
        )
        .bind(s.session_id.to_string())
        .bind(i64::from(s.index))
        .bind(s.task_id.map(|t| t.to_string()))
        .bind(&s.name)
        .bind(enum_str(&s.state))
        .bind(i64::from(s.attempts))
        .bind(json_str(&s.output)?)
        .bind(&s.error)
        .bind(ms(s.updated_at))
        .execute(&self.pool)
        .await
        .map_err(StoreError::from)?;
        Ok(())
    }

    pub async fn steps_of(&self, session: SessionId) -> Result<Vec<StepRecord>> {
        let rows = sqlx::query(
            "SELECT session_id, position, task_id, name, state, attempts, output, error, updated_at
             FROM saga_steps WHERE session_id = $1 ORDER BY position",
        )
        .bind(session.to_string())
        .fetch_all(&self.pool)
        .await
        .map_err(StoreError::from)?;
        rows.iter()
            .map(|r| -> StoreResult<StepRecord> {
                let position: i64 = r.try_get("position")?;
                let attempts: i64 = r.try_get("attempts")?;
                Ok(StepRecord {
                    session_id: SessionId(uuid_parse(r.try_get("session_id")?)?),
                    task_id: r
                        .try_get::<Option<String>, _>("task_id")?
                        .map(|t| uuid_parse(&t).map(TaskId))
                        .transpose()?,
                    index: u32::try_from(position).map_err(|_| StoreError::Corrupt("step position".into()))?,
                    name: r.try_get("name")?,
                    state: enum_parse::<StepState>(r.try_get("state")?)?,
                    attempts: u32::try_from(attempts).map_err(|_| StoreError::Corrupt("step attempts".into()))?,
                    output: json_parse(r.try_get("output")?)?,
                    error: r.try_get("error")?,
                    updated_at: from_ms(r.try_get("updated_at")?)?,
                })
            })
            .collect::<StoreResult<_>>()
            .map_err(Error::from)
    }

    // ---------------------------------------------------------------------------------------------
    // Restore points

    /// Publishes a restore point: from this moment it exists. Its sequence is assigned here, one
    /// more than the replica's newest. Idempotent per session: publishing again from the same
    /// session returns the point already published.
    pub async fn restore_point_publish(&self, tenant: TenantId, point: &RestorePoint) -> Result<RestorePoint> {
        let mut tx = self.write_tx().await.map_err(StoreError::from)?;
        let existing = sqlx::query(&format!("{POINT_SELECT} WHERE replica_id = $1 AND session_id = $2"))
            .bind(point.replica_id.to_string())
            .bind(point.session_id.to_string())
            .fetch_optional(&mut *tx)
            .await
            .map_err(StoreError::from)?;
        if let Some(row) = existing {
            return Ok(point_from_row(&row)?);
        }
        let max: Option<i64> = sqlx::query_scalar("SELECT MAX(sequence) FROM restore_points WHERE replica_id = $1")
            .bind(point.replica_id.to_string())
            .fetch_one(&mut *tx)
            .await
            .map_err(StoreError::from)?;
        let mut stored = point.clone();
        stored.sequence = max.unwrap_or(0) as u64 + 1;
        sqlx::query(
            "INSERT INTO restore_points (id, replica_id, tenant_id, sequence, session_id, state, created_at,
                                         bytes_written, disks, verified, consistency)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
        )
        .bind(stored.id.to_string())
        .bind(stored.replica_id.to_string())
        .bind(tenant.to_string())
        .bind(stored.sequence as i64)
        .bind(stored.session_id.to_string())
        .bind(enum_str(&stored.state))
        .bind(ms(stored.created_at))
        .bind(stored.bytes_written as i64)
        .bind(json_str(&stored.disks)?)
        .bind(stored.verified)
        .bind(json_str(&stored.consistency)?)
        .execute(&mut *tx)
        .await
        .map_err(StoreError::from)?;
        tx.commit().await.map_err(StoreError::from)?;
        Ok(stored)
    }

    /// A replica's points, oldest first.
    pub async fn restore_points_of(&self, tenant: TenantId, replica: ReplicaId) -> Result<Vec<RestorePoint>> {
        let rows = sqlx::query(&format!("{POINT_SELECT} WHERE replica_id = $1 AND tenant_id = $2 ORDER BY sequence"))
            .bind(replica.to_string())
            .bind(tenant.to_string())
            .fetch_all(&self.pool)
            .await
            .map_err(StoreError::from)?;
        Ok(rows.iter().map(point_from_row).collect::<StoreResult<_>>()?)
    }

    pub async fn restore_point_set_state(&self, id: RestorePointId, state: RestorePointState) -> Result<()> {
        let done = sqlx::query("UPDATE restore_points SET state = $1 WHERE id = $2")
            .bind(enum_str(&state))
            .bind(id.to_string())
            .execute(&self.pool)
            .await
            .map_err(StoreError::from)?;
        if done.rows_affected() == 0 {
            return Err(Error::not_found(RestorePointId::KIND, id));
        }
        Ok(())
    }

    pub async fn restore_point_set_verified(&self, id: RestorePointId, verified: bool) -> Result<()> {
        sqlx::query("UPDATE restore_points SET verified = $1 WHERE id = $2")
            .bind(verified)
            .bind(id.to_string())
            .execute(&self.pool)
            .await
            .map_err(StoreError::from)?;
        Ok(())
    }

    /// The end of retention: in one transaction, removes the retiring oldest point and records
    /// the files that now hold the next point.
    pub async fn restore_point_retire(
        &self,
        oldest: RestorePointId,
        next: RestorePointId,
        next_disks: &[RestorePointDisk],
    ) -> Result<()> {
        let mut tx = self.write_tx().await.map_err(StoreError::from)?;
        let state: Option<String> = sqlx::query_scalar("SELECT state FROM restore_points WHERE id = $1")
            .bind(oldest.to_string())
            .fetch_optional(&mut *tx)
            .await
            .map_err(StoreError::from)?;
        match state.as_deref() {
            // Already retired by an earlier run: nothing to do.
            None => return Ok(()),
            Some("Retiring") => {}
            Some(other) => {
                return Err(Error::conflict(format!("restore point {oldest} is {other}, not Retiring")));
            }
        }
        sqlx::query("DELETE FROM restore_points WHERE id = $1")
            .bind(oldest.to_string())
            .execute(&mut *tx)
            .await
            .map_err(StoreError::from)?;
        let done = sqlx::query("UPDATE restore_points SET disks = $1 WHERE id = $2")
            .bind(json_str(&next_disks)?)
            .bind(next.to_string())
            .execute(&mut *tx)
            .await
            .map_err(StoreError::from)?;
        if done.rows_affected() == 0 {
            return Err(Error::not_found(RestorePointId::KIND, next));
        }
        tx.commit().await.map_err(StoreError::from)?;
        Ok(())
    }

    // ---------------------------------------------------------------------------------------------
    // Settings

    pub async fn setting_get(&self, name: &str) -> Result<Option<String>> {
        let v = sqlx::query_scalar("SELECT value FROM settings WHERE name = $1")
            .bind(name)
            .fetch_optional(&self.pool)
            .await
            .map_err(StoreError::from)?;
        Ok(v)
    }

    pub async fn setting_put(&self, name: &str, value: &str) -> Result<()> {
        sqlx::query("INSERT INTO settings (name, value) VALUES ($1, $2) ON CONFLICT (name) DO UPDATE SET value = excluded.value")
            .bind(name)
            .bind(value)
            .execute(&self.pool)
            .await
            .map_err(StoreError::from)?;
        Ok(())
    }
}

async fn tokio_yield() {
    tokio::task::yield_now().await;
}

const POINT_SELECT: &str = "SELECT id, replica_id, sequence, session_id, state, created_at, bytes_written, disks,
    verified, consistency FROM restore_points";

fn point_from_row(r: &sqlx::sqlite::SqliteRow) -> StoreResult<RestorePoint> {
    let sequence: i64 = r.try_get("sequence")?;
    let bytes: i64 = r.try_get("bytes_written")?;
    Ok(RestorePoint {
        id: RestorePointId(uuid_parse(r.try_get("id")?)?),
        replica_id: ReplicaId(uuid_parse(r.try_get("replica_id")?)?),
        sequence: sequence as u64,
        session_id: SessionId(uuid_parse(r.try_get("session_id")?)?),
        state: enum_parse(r.try_get("state")?)?,
        created_at: from_ms(r.try_get("created_at")?)?,
        bytes_written: bytes as u64,
        disks: json_parse(r.try_get("disks")?)?,
        verified: r.try_get("verified")?,
        consistency: match r.try_get::<Option<String>, _>("consistency")? {
            Some(c) => json_parse(&c)?,
            None => drover_types::PointConsistency::default(),
        },
    })
}

const SESSION_SELECT: &str = "SELECT id, tenant_id, kind, name, target_kind, target_id, state, result, progress,
    failure_message, params, halt_requested, halted, created_at, ended_at FROM sessions";

fn unique_as(e: sqlx::Error, message: String) -> StoreError {
    match &e {
        sqlx::Error::Database(db) if db.is_unique_violation() => StoreError::Domain(Error::AlreadyExists(message)),
        _ => StoreError::Database(e),
    }
}

/// `Conflict` naming the objects that still refer to `id`.
async fn refuse_if_referenced<T: Entity>(tx: &mut sqlx::Transaction<'_, sqlx::Sqlite>, id: Uuid) -> Result<()> {
    let users = sqlx::query(
        "SELECT r.from_kind, i.name FROM inventory_refs r JOIN inventory i ON i.kind = r.from_kind AND i.id = r.from_id
             WHERE r.to_kind = $1 AND r.to_id = $2 ORDER BY i.name",
    )
    .bind(T::KIND)
    .bind(id.to_string())
    .fetch_all(&mut **tx)
    .await
    .map_err(StoreError::from)?;
    if !users.is_empty() {
        let names: Vec<String> = users
            .iter()
            .take(5)
            .map(|r| {
                let kind: String = r.get("from_kind");
                let name: String = r.get("name");
                format!("{} {name:?}", entity::label_of(&kind))
            })
            .collect();
        return Err(Error::conflict(format!(
            "{} {id} is still used by {}{}",
            T::LABEL,
            names.join(", "),
            if users.len() > 5 { " and others" } else { "" }
        )));
    }
    Ok(())
}

/// Runs an INSERT that computes its own `seq` (`MAX(seq) + 1` inside the statement, so concurrent
/// appends cannot share one) until it does not collide with a concurrent append.
async fn insert_next_seq<F, Fut>(what: &str, mut insert: F) -> Result<i64>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = std::result::Result<i64, sqlx::Error>>,
{
    for _ in 0..10 {
        match insert().await {
            Ok(seq) => return Ok(seq),
            Err(sqlx::Error::Database(db)) if db.is_unique_violation() => continue,
            Err(e) => return Err(StoreError::from(e).into()),
        }
    }
    Err(Error::Unavailable(format!("the {what} is busy")))
}

/// The condition on `inventory` rows for "the tenant in placeholder `tenant` has it, or was
/// granted it".
fn visible_to(tenant: &str) -> String {
    format!(
        "(tenant_id = {tenant} OR EXISTS (SELECT 1 FROM inventory_grants g
          WHERE g.kind = inventory.kind AND g.id = inventory.id AND g.tenant_id = {tenant}))"
    )
}

async fn check_refs<T: Entity>(tx: &mut sqlx::Transaction<'_, sqlx::Sqlite>, obj: &T) -> Result<()> {
    for (kind, id) in obj.refs() {
        // An object may refer to its own tenant's objects and to those granted to the tenant.
        let found =
            sqlx::query(&format!("SELECT 1 FROM inventory WHERE kind = $1 AND id = $2 AND {}", visible_to("$3")))
                .bind(kind)
                .bind(id.to_string())
                .bind(obj.tenant().to_string())
                .fetch_optional(&mut **tx)
                .await
                .map_err(StoreError::from)?;
        if found.is_none() {
            return Err(Error::invalid(format!("{} {id} does not exist", entity::label_of(kind))));
        }
    }
    Ok(())
}

async fn write_refs<T: Entity>(tx: &mut sqlx::Transaction<'_, sqlx::Sqlite>, obj: &T) -> Result<()> {
    for (kind, id) in obj.refs() {
        sqlx::query(
            "INSERT INTO inventory_refs (from_kind, from_id, to_kind, to_id) VALUES ($1, $2, $3, $4)
             ON CONFLICT DO NOTHING",
        )
        .bind(T::KIND)
        .bind(obj.id().to_string())
        .bind(kind)
        .bind(id.to_string())
        .execute(&mut **tx)
        .await
        .map_err(StoreError::from)?;
    }
    Ok(())
}

/// A write of the sessions table that commits together with an inventory change, see
/// [`Store::object_modify_with_session`].
#[derive(Debug, Clone, Copy)]
pub enum SessionWrite<'a> {
    /// A new session with its tasks, as [`Store::session_insert`] writes them.
    Insert(&'a Session, &'a [Task]),
    /// A session's mutable fields, as [`Store::session_update`] writes them.
    Update(&'a Session),
    /// A halt request, as [`Store::session_request_halt`]; `Conflict` (and nothing written) when
    /// the session has stopped.
    RequestHalt(SessionId),
}

/// What a write of an object carries along: the session write and the fault-injection hook.
type WithSession<'a> = (&'a SessionWrite<'a>, &'a (dyn Fn() + Send + Sync));

async fn session_write(tx: &mut sqlx::Transaction<'_, sqlx::Sqlite>, write: &SessionWrite<'_>) -> Result<()> {
    match *write {
        SessionWrite::Insert(s, tasks) => session_insert_rows(tx, s, tasks).await,
        SessionWrite::Update(s) => session_update_row(&mut **tx, s).await,
        SessionWrite::RequestHalt(id) => {
            if session_request_halt_row(&mut **tx, id).await? {
                Ok(())
            } else {
                Err(Error::conflict(format!("session {id} has already stopped")))
            }
        }
    }
}

async fn session_update_row<'c, E>(ex: E, s: &Session) -> Result<()>
where
    E: sqlx::Executor<'c, Database = sqlx::Sqlite>,
{
    let done = sqlx::query(
        "UPDATE sessions SET state = $1, result = $2, progress = $3, failure_message = $4, params = $5,
                             halted = $6, ended_at = $7 WHERE id = $8",
    )
    .bind(enum_str(&s.state))
    .bind(enum_str(&s.result))
    .bind(i64::from(s.progress))
    .bind(&s.failure_message)
    .bind(json_str(&s.params)?)
    .bind(s.halted)
    .bind(s.ended_at.map(ms))
    .bind(s.id.to_string())
    .execute(ex)
    .await
    .map_err(StoreError::from)?;
    if done.rows_affected() == 0 {
        return Err(Error::not_found(SessionId::KIND, s.id));
    }
    Ok(())
}

async fn session_request_halt_row<'c, E>(ex: E, id: SessionId) -> Result<bool>
where
    E: sqlx::Executor<'c, Database = sqlx::Sqlite>,
{
    let done = sqlx::query("UPDATE sessions SET halt_requested = $1 WHERE id = $2 AND state <> 'Stopped'")
        .bind(true)
        .bind(id.to_string())
        .execute(ex)
        .await
        .map_err(StoreError::from)?;
    Ok(done.rows_affected() == 1)
}

/// The rows of a new session and its tasks, inside the caller's transaction.
async fn session_insert_rows(tx: &mut sqlx::Transaction<'_, sqlx::Sqlite>, s: &Session, tasks: &[Task]) -> Result<()> {
    let (target_kind, target_id) = target_parts(&s.target);
    sqlx::query(
        "INSERT INTO sessions (id, tenant_id, kind, name, target_kind, target_id, state, result, progress,
                               failure_message, params, halt_requested, halted, created_at, ended_at, name_lower)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16)",
    )
    .bind(s.id.to_string())
    .bind(s.tenant_id.to_string())
    .bind(s.kind.as_str())
    .bind(&s.name)
    .bind(target_kind)
    .bind(target_id.to_string())
    .bind(enum_str(&s.state))
    .bind(enum_str(&s.result))
    .bind(i64::from(s.progress))
    .bind(&s.failure_message)
    .bind(json_str(&s.params)?)
    .bind(s.halt_requested)
    .bind(s.halted)
    .bind(ms(s.created_at))
    .bind(s.ended_at.map(ms))
    .bind(s.name.to_lowercase())
    .execute(&mut **tx)
    .await
    .map_err(StoreError::from)?;
    for (position, t) in tasks.iter().enumerate() {
        sqlx::query(
            "INSERT INTO tasks (id, session_id, position, vm_id, name, state, result, progress, weight,
                                failure_message, created_at, ended_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)",
        )
        .bind(t.id.to_string())
        .bind(s.id.to_string())
        .bind(position as i64)
        .bind(t.vm_id.map(|v| v.to_string()))
        .bind(&t.name)
        .bind(enum_str(&t.state))
        .bind(enum_str(&t.result))
        .bind(i64::from(t.progress))
        .bind(i64::from(t.weight))
        .bind(&t.failure_message)
        .bind(ms(t.created_at))
        .bind(t.ended_at.map(ms))
        .execute(&mut **tx)
        .await
        .map_err(StoreError::from)?;
    }
    Ok(())
}

/// A value bound to a placeholder of a query built at run time.
enum Bind {
    Text(String),
    Int(i64),
}

/// Adds a bound value and returns its placeholder.
fn push_bind(binds: &mut Vec<Bind>, b: Bind) -> String {
    binds.push(b);
    format!("${}", binds.len())
}

/// Sessions' states and results ranked in their domain order, for sorting.
const STATE_RANK: &str = "CASE state WHEN 'Starting' THEN 0 WHEN 'Working' THEN 1 WHEN 'Stopping' THEN 2 ELSE 3 END";
const RESULT_RANK: &str = "CASE result WHEN 'None' THEN 0 WHEN 'Success' THEN 1 WHEN 'Warning' THEN 2 ELSE 3 END";

fn op_sql(op: CompareOp) -> &'static str {
    match op {
        CompareOp::Eq => "=",
        CompareOp::Ne => "<>",
        CompareOp::Lt => "<",
        CompareOp::Gt => ">",
        CompareOp::Le => "<=",
        CompareOp::Ge => ">=",
    }
}

/// The SQL of a session condition, its values bound (never spliced into the text).
fn condition_sql(c: &SessionCondition, binds: &mut Vec<Bind>) -> String {
    let join = |parts: &[SessionCondition], binds: &mut Vec<Bind>, sep: &str, empty: &str| {
        if parts.is_empty() {
            return empty.to_string();
        }
        let sql: Vec<String> = parts.iter().map(|p| condition_sql(p, binds)).collect();
        format!("({})", sql.join(sep))
    };
    let names = |list: Vec<String>, column: &str, binds: &mut Vec<Bind>| {
        if list.is_empty() {
            return "1 = 0".to_string();
        }
        let placeholders: Vec<String> = list.into_iter().map(|n| push_bind(binds, Bind::Text(n))).collect();
        format!("{column} IN ({})", placeholders.join(", "))
    };
    match c {
        SessionCondition::And(parts) => join(parts, binds, " AND ", "1 = 1"),
        SessionCondition::Or(parts) => join(parts, binds, " OR ", "1 = 0"),
        SessionCondition::Id(op, v) => format!("id {} {}", op_sql(*op), push_bind(binds, Bind::Text(v.clone()))),
        SessionCondition::NameLowercase(op, v) => {
            format!("name_lower {} {}", op_sql(*op), push_bind(binds, Bind::Text(v.clone())))
        }
        SessionCondition::CreatedAt(op, t) => {
            format!("created_at {} {}", op_sql(*op), push_bind(binds, Bind::Int(ms(*t))))
        }
        // An absent end time equals nothing: only `<>` holds for it.
        SessionCondition::EndedAt(CompareOp::Ne, t) => {
            format!("(ended_at IS NULL OR ended_at <> {})", push_bind(binds, Bind::Int(ms(*t))))
        }
        SessionCondition::EndedAt(op, t) => {
            format!("ended_at {} {}", op_sql(*op), push_bind(binds, Bind::Int(ms(*t))))
        }
        SessionCondition::StateIn(list) => names(list.iter().map(enum_str).collect(), "state", binds),
        SessionCondition::ResultIn(list) => names(list.iter().map(enum_str).collect(), "result", binds),
        SessionCondition::Target(id) => format!("target_id = {}", push_bind(binds, Bind::Text(id.to_string()))),
    }
}

fn target_parts(t: &SessionTarget) -> (&'static str, Uuid) {
    match t {
        SessionTarget::Vm(v) => ("vm", v.0),
        SessionTarget::Plan(p) => ("plan", p.0),
        SessionTarget::ReplicationJob(j) => ("replication_job", j.0),
    }
}

fn tenant_from_row(r: &sqlx::sqlite::SqliteRow) -> StoreResult<Tenant> {
    Ok(Tenant {
        id: TenantId(uuid_parse(r.try_get("id")?)?),
        name: r.try_get("name")?,
        is_system: r.try_get("is_system")?,
        created_at: from_ms(r.try_get("created_at")?)?,
    })
}

fn user_from_row(r: &sqlx::sqlite::SqliteRow) -> StoreResult<User> {
    Ok(User {
        id: UserId(uuid_parse(r.try_get("id")?)?),
        tenant_id: TenantId(uuid_parse(r.try_get("tenant_id")?)?),
        name: r.try_get("name")?,
        role: Role::from_str(r.try_get("role")?).map_err(StoreError::Domain)?,
        created_at: from_ms(r.try_get("created_at")?)?,
    })
}

fn token_from_row(r: &sqlx::sqlite::SqliteRow) -> StoreResult<TokenRecord> {
    let kind: String = r.try_get("kind")?;
    Ok(TokenRecord {
        hash: r.try_get("hash")?,
        kind: if kind == "refresh" { TokenKind::Refresh } else { TokenKind::Access },
        user_id: UserId(uuid_parse(r.try_get("user_id")?)?),
        family: uuid_parse(r.try_get("family")?)?,
        expires_at: from_ms(r.try_get("expires_at")?)?,
        used_at: opt_from_ms(r.try_get("used_at")?)?,
        created_at: from_ms(r.try_get("created_at")?)?,
    })
}

fn target_from_row(r: &sqlx::sqlite::SqliteRow) -> StoreResult<SessionTarget> {
    let target_kind: String = r.try_get("target_kind")?;
    let target_id = uuid_parse(r.try_get("target_id")?)?;
    Ok(match target_kind.as_str() {
        "vm" => SessionTarget::Vm(target_id.into()),
        "plan" => SessionTarget::Plan(target_id.into()),
        "replication_job" => SessionTarget::ReplicationJob(target_id.into()),
        other => return Err(StoreError::Corrupt(format!("session target kind {other:?}"))),
    })
}

fn summary_from_row(r: &sqlx::sqlite::SqliteRow) -> StoreResult<SessionSummary> {
    let progress: i64 = r.try_get("progress")?;
    Ok(SessionSummary {
        id: SessionId(uuid_parse(r.try_get("id")?)?),
        tenant_id: TenantId(uuid_parse(r.try_get("tenant_id")?)?),
        kind: SessionKind::from_str(r.try_get("kind")?).map_err(StoreError::Domain)?,
        name: r.try_get("name")?,
        target: target_from_row(r)?,
        state: enum_parse(r.try_get("state")?)?,
        result: enum_parse(r.try_get("result")?)?,
        progress: progress.clamp(0, 100) as u8,
        failure_message: r.try_get("failure_message")?,
        created_at: from_ms(r.try_get("created_at")?)?,
        ended_at: opt_from_ms(r.try_get("ended_at")?)?,
    })
}

fn session_from_row(r: &sqlx::sqlite::SqliteRow) -> StoreResult<Session> {
    let target = target_from_row(r)?;
    let progress: i64 = r.try_get("progress")?;
    Ok(Session {
        id: SessionId(uuid_parse(r.try_get("id")?)?),
        tenant_id: TenantId(uuid_parse(r.try_get("tenant_id")?)?),
        kind: SessionKind::from_str(r.try_get("kind")?).map_err(StoreError::Domain)?,
        name: r.try_get("name")?,
        target,
        state: enum_parse(r.try_get("state")?)?,
        result: enum_parse(r.try_get("result")?)?,
        progress: progress.clamp(0, 100) as u8,
        failure_message: r.try_get("failure_message")?,
        params: json_parse(r.try_get("params")?)?,
        halt_requested: r.try_get("halt_requested")?,
        halted: r.try_get("halted")?,
        created_at: from_ms(r.try_get("created_at")?)?,
        ended_at: opt_from_ms(r.try_get("ended_at")?)?,
    })
}

fn task_from_row(r: &sqlx::sqlite::SqliteRow) -> StoreResult<Task> {
    let progress: i64 = r.try_get("progress")?;
    let weight: i64 = r.try_get("weight")?;
    Ok(Task {
        id: TaskId(uuid_parse(r.try_get("id")?)?),
        session_id: SessionId(uuid_parse(r.try_get("session_id")?)?),
        vm_id: r.try_get::<Option<String>, _>("vm_id")?.map(|v| uuid_parse(&v).map(Into::into)).transpose()?,
        name: r.try_get("name")?,
        state: enum_parse(r.try_get("state")?)?,
        result: enum_parse(r.try_get("result")?)?,
        progress: progress.clamp(0, 100) as u8,
        weight: u32::try_from(weight).map_err(|_| StoreError::Corrupt("task weight".into()))?,
        failure_message: r.try_get("failure_message")?,
        created_at: from_ms(r.try_get("created_at")?)?,
        ended_at: opt_from_ms(r.try_get("ended_at")?)?,
    })
}

#[cfg(test)]
mod tests;
