//! The application layer: what a caller may do, checked and carried out.
//!
//! Every API dialect (native, and later the Veeam ones) calls these methods with an
//! authenticated [`Caller`]; they check the role, confine the caller to its tenant (another
//! tenant's object is simply not found), validate the input, and either change the inventory or
//! start an operation and return its session at once. Nothing here knows HTTP.

use std::net::IpAddr;

use drover_store::{RefreshOutcome, SessionFilter};
use drover_types::*;
use serde_json::json;

use crate::auth::{self, TokenPair};
use crate::login_guard::{LoginGuard, ThrottlePolicy};
use crate::ops::{self, VmOpParams};
use crate::saga::ContinueOption;
use crate::{Engine, Error, Result};

/// The most session summaries one read returns (about 30 MiB of them at worst).
pub const SESSION_SUMMARIES_MAX: u64 = 100_000;

/// Who is calling, as established from a token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub user_id: UserId,
    pub name: String,
    pub tenant_id: TenantId,
    pub role: Role,
    /// Administrators of the system tenant may manage tenants.
    pub system_tenant: bool,
}

impl Caller {
    pub fn require(&self, needed: Role) -> Result<()> {
        if self.role.allows(needed) {
            Ok(())
        } else {
            Err(Error::Forbidden(format!(
                "this needs the {} role; {} has {}",
                needed.as_str(),
                self.name,
                self.role.as_str()
            )))
        }
    }

    /// Sites, hosts and datastores are the host's resources: only administrators of the system
    /// tenant create, change or delete them, and grant datastores to tenants.
    pub fn require_system_admin(&self) -> Result<()> {
        if self.system_tenant && self.role == Role::Administrator {
            Ok(())
        } else {
            Err(Error::Forbidden(
                "this needs the Administrator role in the system tenant: sites, hosts and datastores are the host's \
                 resources; ask a system administrator to grant your tenant a datastore"
                    .into(),
            ))
        }
    }
}

#[derive(Debug, Clone)]
pub struct NewUser {
    pub name: String,
    pub password: String,
    pub role: Role,
    /// Another tenant than the caller's: only for administrators of the system tenant.
    pub tenant_id: Option<TenantId>,
}

#[derive(Debug, Clone)]
pub struct HostEnrolment {
    pub host_id: HostId,
    /// The one-time token: shown once, never stored (the store keeps its hash).
    pub token: String,
    pub expires_at: drover_types::Timestamp,
    /// Where the agent enrols (the control plane's agent listener).
    pub enrol_url: String,
    /// The command to run on the host.
    pub command: String,
}

/// A host's agent as the control plane sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AgentState {
    /// The agent inside this control plane's process.
    Local,
    /// A `drover agent` that has not enrolled yet.
    NotEnrolled,
    /// Enrolled, not contacted since.
    Enrolled,
    /// The last call to the agent succeeded.
    Connected,
    /// The last call to the agent failed (see the status's `last_error`).
    Unreachable,
}

#[derive(Debug, Clone)]
pub struct HostAgentState {
    pub state: AgentState,
    pub status: drover_types::AgentStatus,
}

impl HostAgentState {
    /// The agent's certificate ends within [`drover_pki::RENEW_BEFORE_DAYS`] (or has ended). The
    /// control plane renews it by itself while the agent is reachable
    /// ([`crate::Engine::renew_due_agent_certificates`]), so this stays true only while it cannot;
    /// an agent whose certificate ended must be enrolled again (`drover agent --enroll URL TOKEN
    /// --re-enroll`).
    pub fn certificate_renewal_due(&self) -> bool {
        crate::agents::certificate_renewal_due(&self.status)
    }
}

#[cfg(test)]
mod host_agent_state_tests {
    use super::*;

    #[test]
    fn a_certificate_is_due_for_renewal_in_its_last_month() {
        let with = |days: i64| HostAgentState {
            state: AgentState::Connected,
            status: drover_types::AgentStatus {
                certificate_expires_at: Some(drover_types::now() + chrono::Duration::days(days)),
                ..Default::default()
            },
        };
        assert!(!with(365).certificate_renewal_due());
        assert!(!with(31).certificate_renewal_due());
        assert!(with(29).certificate_renewal_due());
        assert!(with(-1).certificate_renewal_due(), "an ended one too");
        let never = HostAgentState { state: AgentState::NotEnrolled, status: Default::default() };
        assert!(!never.certificate_renewal_due());
    }
}

#[derive(Debug, Clone)]
pub struct NewHost {
    pub site_id: SiteId,
    pub name: String,
    pub address: String,
}

#[derive(Debug, Clone)]
pub struct NewDatastore {
    pub host_id: HostId,
    pub name: String,
    pub path: String,
}

#[derive(Debug, Clone)]
pub struct NewVm {
    pub name: String,
    pub host_id: HostId,
    pub datastore_id: DatastoreId,
    pub vcpus: u32,
    pub memory_mib: u32,
    pub disks: Vec<VmDisk>,
    /// Network names; MACs are derived from the VM id when not given.
    pub nics: Vec<(String, Option<String>)>,
    pub tags: Vec<Tag>,
    pub boot: VmBoot,
}

/// A libvirt domain of a host to take into the inventory as a VM.
#[derive(Debug, Clone)]
pub struct ImportVm {
    pub host_id: HostId,
    /// The domain's name or UUID.
    pub domain: String,
    /// Where drover keeps the VM's work files on its host; default: the host's only datastore.
    pub datastore_id: Option<DatastoreId>,
    /// The VM's name in drover; default: the domain's.
    pub name: Option<String>,
    pub tags: Vec<Tag>,
}

#[derive(Debug, Clone, Default)]
pub struct VmPatch {
    pub name: Option<String>,
    pub vcpus: Option<u32>,
    pub memory_mib: Option<u32>,
    pub tags: Option<Vec<Tag>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PowerAction {
    PowerOn,
    Shutdown,
    PowerOff,
}

#[derive(Debug, Clone)]
pub struct NewRecoveryLocation {
    pub name: String,
    pub description: String,
    pub host_id: HostId,
    pub datastore_id: DatastoreId,
    pub network_mappings: Vec<NetworkMapping>,
}

#[derive(Debug, Clone)]
pub struct NewReplicationJob {
    pub name: String,
    pub vm_ids: Vec<VmId>,
    pub target_host_id: HostId,
    pub target_datastore_id: DatastoreId,
    pub schedule: Schedule,
    pub retention_points: u32,
    /// Bytes per second; `None` for no limit.
    pub bandwidth_limit: Option<u64>,
    pub consistency: ConsistencyMode,
    /// Source network → target host's network for failover (see
    /// [`ReplicationJob::network_mappings`]).
    pub network_mappings: Vec<NetworkMapping>,
}

/// What an update of a replication job changes (`None`: left as it is).
#[derive(Debug, Clone, Default)]
pub struct ReplicationJobPatch {
    pub name: Option<String>,
    pub schedule: Option<Schedule>,
    pub retention_points: Option<u32>,
    pub enabled: Option<bool>,
    /// `Some(None)` removes the limit.
    pub bandwidth_limit: Option<Option<u64>>,
    pub consistency: Option<ConsistencyMode>,
    /// Replaces the whole table.
    pub network_mappings: Option<Vec<NetworkMapping>>,
}

/// What some plan actions take besides the action.
#[derive(Debug, Clone, Default)]
pub struct PlanActionOptions {
    /// For Continue: how to go on (default: retry the failed step).
    pub continue_option: Option<ContinueOption>,
    /// For Failover: the newest point at or before this time (default: the newest point).
    pub point_date: Option<Timestamp>,
    /// For failback: where to (default: the plan's recovery location).
    pub recovery_location_id: Option<RecoveryLocationId>,
    /// For failback to another location: give the new VMs the original VMs' tags.
    pub restore_tags: bool,
    /// For Failover: a planned failover (production shut down, its last changes replicated).
    pub planned: bool,
}

#[derive(Debug, Clone)]
pub struct PlanInput {
    pub name: String,
    pub description: String,
    pub recovery_location_id: RecoveryLocationId,
    pub groups: Vec<PlanGroup>,
}

#[derive(Clone, Debug)]
pub struct App {
    engine: Engine,
    /// Login throttling, shared by every API (they all log in through [`App::login`]).
    logins: std::sync::Arc<LoginGuard>,
    /// The bound on argon2 work, shared by every API (and every clone of this `App`).
    passwords: auth::PasswordWork,
}

impl App {
    pub fn new(engine: Engine) -> App {
        App::with_throttle(engine, ThrottlePolicy::default())
    }

    pub fn with_throttle(engine: Engine, policy: ThrottlePolicy) -> App {
        App { engine, logins: std::sync::Arc::new(LoginGuard::new(policy)), passwords: auth::PasswordWork::default() }
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    fn store(&self) -> &drover_store::Store {
        self.engine.store()
    }

    // ---------------------------------------------------------------------------------------------
    // Start-up and authentication

    /// On the first start, creates the system tenant and the `admin` user. Returns the password
    /// when it was generated (to be printed once), `None` when it came from the caller or when
    /// users exist already.
    pub async fn bootstrap(&self, admin_password: Option<String>) -> Result<Option<String>> {
        if self.store().user_count().await? > 0 {
            return Ok(None);
        }
        let tenant = match self.store().tenant_system().await? {
            Some(t) => t,
            None => {
                let t = Tenant { id: TenantId::new(), name: "default".into(), is_system: true, created_at: now() };
                self.store().tenant_create(&t).await?;
                t
            }
        };
        let (password, generated) = match admin_password {
            Some(p) if !p.is_empty() => (p, false),
            _ => (auth::random_secret(18), true),
        };
        let user = User {
            id: UserId::new(),
            tenant_id: tenant.id,
            name: "admin".into(),
            role: Role::Administrator,
            created_at: now(),
        };
        self.store().user_create(&user, &self.passwords.hash(&password).await?).await?;
        Ok(generated.then_some(password))
    }

    /// Password login. User names may come as `DOMAIN\USER`; the domain part is ignored.
    /// `from` is the client's address (`None` for in-process callers such as the lab).
    pub async fn login(&self, username: &str, password: &str, from: Option<IpAddr>) -> Result<TokenPair> {
        let name = username.rsplit('\\').next().unwrap_or(username);
        // Throttled attempts are refused before any password work, and not logged one by one
        // (the lockout that started them was).
        if let Err(t) = self.logins.check(name, from, std::time::Instant::now()) {
            let secs = t.retry_after.as_secs_f64().ceil().max(1.0) as u64;
            let whom = if t.address { "this address" } else { "this user from this address" };
            return Err(Error::TooManyRequests {
                message: format!("too many failed logins for {whom}; try again in {secs} s"),
                retry_after_secs: secs,
            });
        }
        let found = self.store().user_by_name(name).await?;
        let ok = {
            // Unknown users cost the time a real check takes, so a probe cannot tell names apart.
            // Through the process's bound on argon2 work (a 503 when its queue is full).
            let hash = found.as_ref().map_or(auth::DUMMY_HASH, |(_, h)| h.as_str());
            self.passwords.verify(password, hash).await?
        };
        let known = found.map(|(u, _)| u);
        let audit = |tenant_id, user_id, action: &str, outcome, detail: String| AuditRecord {
            at: now(),
            tenant_id,
            user_id,
            // What was tried, clipped: a failed login must not be a way to fill the disk.
            user_name: clip(name, 128),
            action: action.to_string(),
            outcome,
            address: from.map(|a| a.to_string()),
            detail,
        };
        let Some(user) = known.clone().filter(|_| ok) else {
            let (tenant, id) = (known.as_ref().map(|u| u.tenant_id), known.as_ref().map(|u| u.id));
            let started = self.logins.failed(name, from, std::time::Instant::now());
            self.audit(audit(tenant, id, "login", AuditOutcome::Refused, "wrong user name or password".into())).await;
            if let Some(l) = started {
                let detail = format!(
                    "{} locked for {} s after {} failed logins",
                    if l.address { "the address" } else { "the user from this address" },
                    l.lock.as_secs(),
                    l.failures
                );
                tracing::warn!(user = name, address = ?from, "{detail}");
                self.audit(audit(tenant, id, "login_lockout", AuditOutcome::Refused, detail)).await;
            }
            return Err(Error::Unauthorized("wrong user name or password".into()));
        };
        self.logins.succeeded(name, from);
        self.audit(audit(Some(user.tenant_id), Some(user.id), "login", AuditOutcome::Success, String::new())).await;
        self.issue_tokens(user.id, uuid::Uuid::new_v4()).await
    }

    /// Records an audit entry. A failure to record is logged, not returned: the audit log must
    /// not turn into a way to break logins or requests.
    pub async fn audit(&self, record: AuditRecord) {
        if let Err(e) = self.store().audit_append(&record).await {
            tracing::error!(error = %e, action = %record.action, "cannot write the audit log");
        }
    }

    /// Records a mutating request an authenticated caller made (the APIs' audit middleware).
    pub async fn audit_request(&self, caller: &Caller, action: String, status: u16, from: Option<IpAddr>) {
        self.audit(AuditRecord {
            at: now(),
            tenant_id: Some(caller.tenant_id),
            user_id: Some(caller.user_id),
            user_name: caller.name.clone(),
            action,
            outcome: AuditOutcome::of_status(status),
            address: from.map(|a| a.to_string()),
            detail: format!("status {status}"),
        })
        .await;
    }

    /// The audit log, newest first: all of it for administrators of the system tenant, their own
    /// tenant's entries for other administrators.
    pub async fn audit_list(&self, caller: &Caller, mut filter: AuditFilter) -> Result<Vec<AuditEntry>> {
        caller.require(Role::Administrator)?;
        if filter.limit == 0 || filter.limit > 1000 {
            return Err(Error::invalid("limit must be between 1 and 1000"));
        }
        if !caller.system_tenant {
            filter.tenant_id = Some(caller.tenant_id);
        }
        self.store().audit_list(&filter).await
    }

    async fn issue_tokens(&self, user: UserId, family: uuid::Uuid) -> Result<TokenPair> {
        let (pair, records) = auth::issue(user, family, now());
        for r in &records {
            self.store().token_insert(r).await?;
        }
        Ok(pair)
    }

    /// Trades a refresh token (once) for a new pair.
    pub async fn refresh(&self, refresh_token: &str) -> Result<TokenPair> {
        match self.store().refresh_token_consume(&auth::token_hash(refresh_token), now()).await? {
            RefreshOutcome::Consumed(rec) => self.issue_tokens(rec.user_id, rec.family).await,
            RefreshOutcome::Reused => Err(Error::Unauthorized(
                "refresh token was already used; the login has been revoked, log in again".into(),
            )),
            RefreshOutcome::Invalid => Err(Error::Unauthorized("refresh token is invalid or expired".into())),
        }
    }

    /// The caller a user is, for in-process use (the lab) and for token checks.
    pub async fn caller_for(&self, user: UserId) -> Result<Caller> {
        let user = self.store().user_get(user).await?;
        let tenant = self.store().tenant_get(user.tenant_id).await?;
        Ok(Caller {
            user_id: user.id,
            name: user.name,
            tenant_id: user.tenant_id,
            role: user.role,
            system_tenant: tenant.is_system,
        })
    }

    /// The caller behind a bearer token.
    pub async fn authenticate(&self, bearer: &str) -> Result<Caller> {
        let rec = self
            .store()
            .access_token_get(&auth::token_hash(bearer), now())
            .await?
            .ok_or_else(|| Error::Unauthorized("access token is invalid or expired".into()))?;
        match self.caller_for(rec.user_id).await {
            Err(Error::NotFound { .. }) => Err(Error::Unauthorized("the token's user no longer exists".into())),
            other => other,
        }
    }

    /// Whether `bearer` is an access token drover issued that has expired (and has not been
    /// purged yet), for a dialect that tells an expired token from an unknown one. Nothing is
    /// revealed to the caller beyond that: the token's user is not looked up.
    pub async fn token_expired(&self, bearer: &str) -> Result<bool> {
        let ever = chrono::DateTime::<chrono::Utc>::UNIX_EPOCH;
        let rec = self.store().access_token_get(&auth::token_hash(bearer), ever).await?;
        Ok(rec.is_some_and(|r| r.expires_at <= now()))
    }

    // ---------------------------------------------------------------------------------------------
    // API clients (the `client_credentials` grant of the Recovery Orchestrator dialect)

    /// The user a client is stored as: `client:<id>`, a name [`App::user_create`] refuses (it
    /// contains ':'), so no person can hold it. Being a user, a client is listed, re-roled and
    /// deleted (revoked) like one.
    pub fn client_user_name(client_id: uuid::Uuid) -> String {
        format!("client:{client_id}")
    }

    /// A new API client of the caller's tenant that acts with `role`. Returns its id and secret;
    /// the secret is shown once and only its argon2 hash is stored, like a password.
    pub async fn client_create(&self, caller: &Caller, role: Role) -> Result<(uuid::Uuid, String)> {
        caller.require(Role::Administrator)?;
        let id = uuid::Uuid::new_v4();
        let secret = auth::random_secret(32);
        let user = User {
            id: UserId(id),
            tenant_id: caller.tenant_id,
            name: Self::client_user_name(id),
            role,
            created_at: now(),
        };
        self.store().user_create(&user, &self.passwords.hash(&secret).await?).await?;
        Ok((id, secret))
    }

    /// Logs a client in with its secret.
    pub async fn client_login(&self, client_id: uuid::Uuid, secret: &str, from: Option<IpAddr>) -> Result<TokenPair> {
        self.login(&Self::client_user_name(client_id), secret, from).await.map_err(|e| match e {
            Error::Unauthorized(_) => Error::Unauthorized("wrong client id or secret".into()),
            e => e,
        })
    }

    // ---------------------------------------------------------------------------------------------
    // Tenants and users

    pub async fn tenant_create(&self, caller: &Caller, name: &str) -> Result<Tenant> {
        caller.require(Role::Administrator)?;
        if !caller.system_tenant {
            return Err(Error::Forbidden("only administrators of the system tenant create tenants".into()));
        }
        validate_name("tenant", name)?;
        let t = Tenant { id: TenantId::new(), name: name.trim().to_string(), is_system: false, created_at: now() };
        self.store().tenant_create(&t).await?;
        Ok(t)
    }

    pub async fn tenant_list(&self, caller: &Caller) -> Result<Vec<Tenant>> {
        if caller.system_tenant && caller.role == Role::Administrator {
            self.store().tenant_list().await
        } else {
            Ok(vec![self.store().tenant_get(caller.tenant_id).await?])
        }
    }

    pub async fn user_create(&self, caller: &Caller, new: NewUser) -> Result<User> {
        caller.require(Role::Administrator)?;
        let tenant_id = match new.tenant_id {
            Some(t) if t != caller.tenant_id => {
                if !caller.system_tenant {
                    return Err(Error::not_found(TenantId::KIND, t));
                }
                self.store().tenant_get(t).await?.id
            }
            _ => caller.tenant_id,
        };
        validate_name("user", &new.name)?;
        if new.name.contains('\\') || new.name.contains(':') {
            return Err(Error::invalid("user name must not contain '\\' or ':'"));
        }
        if new.password.chars().count() < 8 {
            return Err(Error::invalid("password must be at least 8 characters"));
        }
        let user = User { id: UserId::new(), tenant_id, name: new.name, role: new.role, created_at: now() };
        self.store().user_create(&user, &self.passwords.hash(&new.password).await?).await?;
        Ok(user)
    }

    pub async fn user_list(&self, caller: &Caller) -> Result<Vec<User>> {
        caller.require(Role::Administrator)?;
        self.store().user_list(caller.tenant_id).await
    }

    pub async fn user_delete(&self, caller: &Caller, id: UserId) -> Result<()> {
        caller.require(Role::Administrator)?;
        if id == caller.user_id {
            return Err(Error::conflict("you cannot delete your own user"));
        }
        self.store().user_delete(caller.tenant_id, id).await
    }

    // ---------------------------------------------------------------------------------------------
    // Sites, hosts, datastores, recovery locations

    pub async fn site_create(&self, caller: &Caller, name: &str, kind: SiteKind) -> Result<Site> {
        caller.require_system_admin()?;
        validate_name("site", name)?;
        let site =
            Site { id: SiteId::new(), tenant_id: caller.tenant_id, name: name.trim().into(), kind, created_at: now() };
        self.store().object_insert(&site).await?;
        Ok(site)
    }

    pub async fn host_create(&self, caller: &Caller, new: NewHost) -> Result<Host> {
        caller.require_system_admin()?;
        validate_name("host", &new.name)?;
        if new.address.trim().is_empty() {
            return Err(Error::invalid("host address must not be empty (use \"local\" for the built-in agent)"));
        }
        crate::agents::check_host_address(new.address.trim())?;
        self.get::<Site>(caller, new.site_id.0).await?;
        let host = Host {
            id: HostId::new(),
            tenant_id: caller.tenant_id,
            site_id: new.site_id,
            name: new.name.trim().into(),
            address: new.address.trim().into(),
            created_at: now(),
        };
        self.store().object_insert(&host).await?;
        Ok(host)
    }

    /// A datastore: a directory on its host inside one of the host's datastore roots (created,
    /// private to the service, when missing). For a host whose agent is this process (`local`)
    /// the roots are this control plane's (`--datastore-root`); for a `drover agent` they are the
    /// agent's own, which it checks when the datastore is registered with it here (so the agent
    /// must be reachable to create one).
    pub async fn datastore_create(&self, caller: &Caller, new: NewDatastore) -> Result<Datastore> {
        caller.require_system_admin()?;
        validate_name("datastore", &new.name)?;
        let host = self.get::<Host>(caller, new.host_id.0).await?;
        let id = DatastoreId::new();
        let dir = if host.address == "local" {
            let paths = self.engine.config().host_paths.clone();
            let requested = new.path.clone();
            tokio::task::spawn_blocking(move || -> Result<std::path::PathBuf> {
                let dir = paths.datastore_dir(&requested)?;
                crate::host_paths::create_private_dir_all(&dir)
                    .map_err(|e| Error::invalid(format!("cannot make the datastore directory {requested:?}: {e}")))?;
                if !std::fs::metadata(&dir).is_ok_and(|m| m.is_dir()) {
                    return Err(Error::invalid(format!("datastore path {requested:?} is not a directory")));
                }
                Ok(dir)
            })
            .await
            .map_err(|e| Error::internal(format!("datastore check: {e}")))??
        } else {
            let agent = self.engine.agent(&host).await?;
            let path = new.path.trim().to_string();
            agent
                .datastore_ensure(&drover_agent_api::DatastoreSpec { id: id.0, path: path.clone() })
                .await
                .map_err(crate::agent_error)?;
            std::path::PathBuf::from(path)
        };
        let ds = Datastore {
            id,
            tenant_id: caller.tenant_id,
            host_id: host.id,
            name: new.name.trim().into(),
            path: dir.to_string_lossy().into_owned(),
            created_at: now(),
        };
        self.store().object_insert(&ds).await?;
        Ok(ds)
    }

    /// Lets `tenant`'s users place VMs, replicas and recovery locations on a datastore of the
    /// system tenant; they then see it, its host and its site (read-only).
    pub async fn datastore_grant(&self, caller: &Caller, id: DatastoreId, tenant: TenantId) -> Result<Vec<TenantId>> {
        caller.require_system_admin()?;
        // The system tenant is granted nothing (a grant to it is refused below), so what it
        // sees is its own.
        let ds = self.store().object_get::<Datastore>(caller.tenant_id, id.0).await?;
        let target = self.store().tenant_get(tenant).await.map_err(|e| match e {
            Error::NotFound { .. } => Error::invalid(format!("tenant {tenant} does not exist")),
            e => e,
        })?;
        if target.id == caller.tenant_id {
            return Err(Error::invalid("the system tenant has its datastores already; grant them to other tenants"));
        }
        let host = self.store().object_get::<Host>(caller.tenant_id, ds.host_id.0).await?;
        let objects = [("datastore", ds.id.0), ("host", host.id.0), ("site", host.site_id.0)];
        self.store().grant_insert(tenant, ds.id.0, &objects).await?;
        self.store().grant_tenants(ds.id.0).await
    }

    /// Takes a grant back; refused while the tenant still has something on the datastore.
    pub async fn datastore_revoke(&self, caller: &Caller, id: DatastoreId, tenant: TenantId) -> Result<()> {
        caller.require_system_admin()?;
        self.store().object_get::<Datastore>(caller.tenant_id, id.0).await?;
        self.store().grant_delete(tenant, id.0).await
    }

    /// The tenants a datastore is granted to.
    pub async fn datastore_grants(&self, caller: &Caller, id: DatastoreId) -> Result<Vec<TenantId>> {
        caller.require_system_admin()?;
        self.store().object_get::<Datastore>(caller.tenant_id, id.0).await?;
        self.store().grant_tenants(id.0).await
    }

    pub async fn recovery_location_create(
        &self,
        caller: &Caller,
        new: NewRecoveryLocation,
    ) -> Result<RecoveryLocation> {
        caller.require(Role::PlanAuthor)?;
        validate_name("recovery location", &new.name)?;
        if new.name.trim().eq_ignore_ascii_case(RecoveryLocation::ORIGINAL_NAME) {
            return Err(Error::AlreadyExists(format!("{:?} is built in", RecoveryLocation::ORIGINAL_NAME)));
        }
        let ds = self.get::<Datastore>(caller, new.datastore_id.0).await?;
        if ds.host_id != new.host_id {
            return Err(Error::invalid(format!("datastore {} is not on host {}", ds.id, new.host_id)));
        }
        drover_types::validate_network_mappings(&new.network_mappings)?;
        let loc = RecoveryLocation {
            id: RecoveryLocationId::new(),
            tenant_id: caller.tenant_id,
            name: new.name.trim().into(),
            description: new.description,
            kind: RecoveryLocationKind::Restore,
            host_id: Some(new.host_id),
            datastore_id: Some(new.datastore_id),
            network_mappings: new.network_mappings,
            created_at: now(),
        };
        self.store().object_insert(&loc).await?;
        Ok(loc)
    }

    /// Every location of the tenant, the built-in "Original VM Location" first.
    pub async fn recovery_location_list(&self, caller: &Caller) -> Result<Vec<RecoveryLocation>> {
        let mut all = vec![RecoveryLocation::original(caller.tenant_id)];
        all.extend(self.list::<RecoveryLocation>(caller).await?);
        Ok(all)
    }

    pub async fn recovery_location_get(&self, caller: &Caller, id: RecoveryLocationId) -> Result<RecoveryLocation> {
        if id == RecoveryLocationId::ORIGINAL {
            return Ok(RecoveryLocation::original(caller.tenant_id));
        }
        self.get(caller, id.0).await
    }

    pub async fn recovery_location_delete(&self, caller: &Caller, id: RecoveryLocationId) -> Result<()> {
        if id == RecoveryLocationId::ORIGINAL {
            caller.require(Role::PlanAuthor)?;
            return Err(Error::conflict("the Original VM Location is built in and cannot be deleted"));
        }
        self.delete::<RecoveryLocation>(caller, id.0).await
    }

    /// Renames a site, host, datastore, recovery location or replication job; `also` may change
    /// more of the object under the same checks. VMs and plans have their own updates.
    pub async fn update<T, F>(&self, caller: &Caller, id: uuid::Uuid, name: Option<String>, also: F) -> Result<T>
    where
        T: drover_store::Entity,
        F: Fn(&mut T) -> Result<()>,
    {
        caller.require(Role::PlanAuthor)?;
        if is_host_resource(T::KIND) {
            caller.require_system_admin()?;
        }
        if let Some(n) = &name {
            validate_name(T::LABEL, n)?;
        }
        let (obj, ()) = self
            .store()
            .object_modify::<T, _, _>(caller.tenant_id, id, |o| {
                if let Some(n) = &name {
                    o.set_name(n.trim().to_string());
                }
                also(o)
            })
            .await?;
        Ok(obj)
    }

    pub async fn host_update(
        &self,
        caller: &Caller,
        id: HostId,
        name: Option<String>,
        address: Option<String>,
    ) -> Result<Host> {
        if address.as_deref().is_some_and(|a| a.trim().is_empty()) {
            return Err(Error::invalid("host address must not be empty"));
        }
        if let Some(a) = &address {
            crate::agents::check_host_address(a.trim())?;
        }
        self.update::<Host, _>(caller, id.0, name, |h| {
            if let Some(a) = &address {
                h.address = a.trim().to_string();
            }
            Ok(())
        })
        .await
    }

    /// A one-time enrolment token for a host's `drover agent` (system administrators only):
    /// the token (shown once, never stored), when it expires, and the command that enrols the
    /// agent with it. A new token withdraws none; enrolling with one withdraws the host's others.
    pub async fn host_enrolment(&self, caller: &Caller, id: HostId, ttl_secs: Option<u64>) -> Result<HostEnrolment> {
        caller.require_system_admin()?;
        let host = self.get::<Host>(caller, id.0).await?;
        let ttl = match ttl_secs {
            None => crate::agents::DEFAULT_TOKEN_TTL,
            Some(s) if s >= 60 && s <= crate::agents::MAX_TOKEN_TTL.as_secs() => std::time::Duration::from_secs(s),
            Some(s) => {
                return Err(Error::invalid(format!(
                    "ttl_secs {s} is out of range: a token is good for 60 s to {} s",
                    crate::agents::MAX_TOKEN_TTL.as_secs()
                )));
            }
        };
        let (token, expires_at) = self.engine.enrolment_token(&host, ttl).await?;
        let url = self.engine.agent_pki().map(|p| p.enrol_url.clone()).unwrap_or_default();
        let command = format!("drover agent --enroll {url} {token}");
        Ok(HostEnrolment { host_id: host.id, token, expires_at, enrol_url: url, command })
    }

    /// Renews a host's agent certificate now (system administrators only; the control plane
    /// also does it by itself in a certificate's last month): see
    /// [`crate::Engine::renew_agent_certificate`]. Answers the agent's state afterwards.
    pub async fn host_agent_certificate_renew(&self, caller: &Caller, id: HostId) -> Result<HostAgentState> {
        caller.require_system_admin()?;
        let host = self.get::<Host>(caller, id.0).await?;
        self.engine.renew_agent_certificate(&host).await?;
        self.host_agent(caller, id).await
    }

    /// What the control plane knows of a host's agent.
    pub async fn host_agent(&self, caller: &Caller, id: HostId) -> Result<HostAgentState> {
        let host = self.get::<Host>(caller, id.0).await?;
        if host.address == "local" {
            return Ok(HostAgentState { state: AgentState::Local, status: drover_types::AgentStatus::default() });
        }
        let status = self.store().agent_status(host.id).await?;
        let state = match (&status.enrolled_at, &status.last_seen, &status.last_error) {
            (None, _, _) => AgentState::NotEnrolled,
            (_, _, Some(_)) => AgentState::Unreachable,
            (_, Some(_), None) => AgentState::Connected,
            (_, None, None) => AgentState::Enrolled,
        };
        Ok(HostAgentState { state, status })
    }

    pub async fn recovery_location_update(
        &self,
        caller: &Caller,
        id: RecoveryLocationId,
        name: Option<String>,
        description: Option<String>,
        network_mappings: Option<Vec<NetworkMapping>>,
    ) -> Result<RecoveryLocation> {
        caller.require(Role::PlanAuthor)?;
        if id == RecoveryLocationId::ORIGINAL {
            return Err(Error::conflict("the Original VM Location is built in and cannot be edited"));
        }
        if name.as_deref().is_some_and(|n| n.trim().eq_ignore_ascii_case(RecoveryLocation::ORIGINAL_NAME)) {
            return Err(Error::AlreadyExists(format!("{:?} is built in", RecoveryLocation::ORIGINAL_NAME)));
        }
        if let Some(m) = &network_mappings {
            drover_types::validate_network_mappings(m)?;
        }
        self.update::<RecoveryLocation, _>(caller, id.0, name, |l| {
            if let Some(d) = &description {
                l.description = d.clone();
            }
            if let Some(m) = &network_mappings {
                l.network_mappings = m.clone();
            }
            Ok(())
        })
        .await
    }

    pub async fn replication_job_update(
        &self,
        caller: &Caller,
        id: ReplicationJobId,
        patch: ReplicationJobPatch,
    ) -> Result<ReplicationJob> {
        let ReplicationJobPatch {
            name,
            schedule,
            retention_points,
            enabled,
            bandwidth_limit,
            consistency,
            network_mappings,
        } = patch;
        self.update::<ReplicationJob, _>(caller, id.0, name, |j| {
            if let Some(m) = &network_mappings {
                j.network_mappings = m.clone();
            }
            if let Some(c) = consistency {
                j.consistency = c;
            }
            if let Some(b) = bandwidth_limit {
                j.bandwidth_limit = b;
            }
            if let Some(s) = &schedule {
                j.schedule = s.clone();
            }
            if let Some(r) = retention_points {
                j.retention_points = r;
            }
            if let Some(e) = enabled {
                j.enabled = e;
            }
            j.updated_at = now();
            j.validate()
        })
        .await
    }

    pub async fn user_update(
        &self,
        caller: &Caller,
        id: UserId,
        password: Option<String>,
        role: Option<Role>,
    ) -> Result<User> {
        // Everyone may change their own password; everything else is for administrators.
        if id != caller.user_id || role.is_some() {
            caller.require(Role::Administrator)?;
        }
        let user = self.store().user_get(id).await?;
        if user.tenant_id != caller.tenant_id {
            return Err(Error::not_found(UserId::KIND, id));
        }
        // Check everything before changing anything.
        if password.as_ref().is_some_and(|p| p.chars().count() < 8) {
            return Err(Error::invalid("password must be at least 8 characters"));
        }
        if role.is_some_and(|r| id == caller.user_id && r != Role::Administrator) {
            return Err(Error::conflict("you cannot take the Administrator role from yourself"));
        }
        if let Some(r) = role {
            self.store().user_set_role(id, r).await?;
        }
        if let Some(p) = password {
            self.store().user_set_password(id, &self.passwords.hash(&p).await?).await?;
        }
        self.store().user_get(id).await
    }

    // ---------------------------------------------------------------------------------------------
    // Generic reads and deletes of inventory objects

    pub async fn get<T: drover_store::Entity>(&self, caller: &Caller, id: uuid::Uuid) -> Result<T> {
        self.store().object_get::<T>(caller.tenant_id, id).await
    }

    pub async fn list<T: drover_store::Entity>(&self, caller: &Caller) -> Result<Vec<T>> {
        self.store().object_list::<T>(caller.tenant_id).await
    }

    /// Deletes an object nothing refers to. VMs are deleted through [`App::vm_delete`].
    pub async fn delete<T: drover_store::Entity>(&self, caller: &Caller, id: uuid::Uuid) -> Result<()> {
        caller.require(Role::PlanAuthor)?;
        if is_host_resource(T::KIND) {
            caller.require_system_admin()?;
        }
        if T::KIND == "vm" {
            return Err(Error::internal("VMs are deleted by a session"));
        }
        if T::KIND == "plan" {
            let plan: Plan = self.store().object_get(caller.tenant_id, id).await?;
            if !plan.lifecycle.state.is_default() {
                return Err(Error::conflict(format!(
                    "plan {:?} is {}; reset it before deleting it",
                    plan.name,
                    plan.lifecycle.state.display_name()
                )));
            }
        }
        self.store().object_delete::<T>(caller.tenant_id, id).await
    }

    // ---------------------------------------------------------------------------------------------
    // VMs

    /// Records the VM and starts the session that creates its disks.
    pub async fn vm_create(&self, caller: &Caller, new: NewVm) -> Result<(Vm, SessionId)> {
        caller.require(Role::PlanAuthor)?;
        let ds = self.get::<Datastore>(caller, new.datastore_id.0).await?;
        if ds.host_id != new.host_id {
            return Err(Error::invalid(format!("datastore {:?} is not on host {}", ds.name, new.host_id)));
        }
        let host = self.get::<Host>(caller, new.host_id.0).await?;
        let id = VmId::new();
        let nics = new
            .nics
            .iter()
            .enumerate()
            .map(|(i, (network, mac))| VmNic {
                network: network.clone(),
                mac: mac.clone().unwrap_or_else(|| mac_for(id, i)),
            })
            .collect();
        // Imports and boot files come only from the host's import directories. On this control
        // plane's own host what is kept is the resolved path, so a symlink changed later cannot
        // point the VM elsewhere; a `drover agent` checks them against its own import directories
        // each time it uses them (this side only checks they are plain absolute paths).
        let mut new = new;
        let local = host.address == "local";
        for d in &mut new.disks {
            if let Some(src) = &d.import_from {
                d.import_from = Some(self.import_file(local, &format!("disk {:?} import_from", d.name), src).await?);
            }
        }
        for (what, path) in [("boot kernel", &mut new.boot.kernel), ("boot initrd", &mut new.boot.initrd)] {
            if let Some(p) = path {
                *p = self.import_file(local, what, p).await?;
            }
        }
        let t = now();
        let vm = Vm {
            id,
            tenant_id: caller.tenant_id,
            name: new.name.trim().to_string(),
            host_id: new.host_id,
            datastore_id: new.datastore_id,
            vcpus: new.vcpus,
            memory_mib: new.memory_mib,
            disks: new.disks,
            nics,
            tags: new.tags,
            boot: new.boot,
            power_state: VmPowerState::Off,
            provisioned: false,
            libvirt_domain: None,
            guest_addresses: Vec::new(),
            created_at: t,
            updated_at: t,
            hardware: Default::default(),
        };
        vm.validate()?;
        let params = VmOpParams {
            vm_id: id,
            tenant_id: caller.tenant_id,
            disk_dir: ops::disk_dir(&ds, id),
            wait_heartbeat: false,
            datastore_id: Some(ds.id),
        };
        // The VM's record and its create session commit together: no VM is left unprovisioned
        // with no session to provision it.
        let (session, tasks) = vm_session(caller, &vm, SessionKind::VmCreate, &params)?;
        let session_id = session.id;
        self.engine.submit_with_new(session, tasks, &vm).await?;
        Ok((vm, session_id))
    }

    /// The host's libvirt domains, with the ids of those imported (as this tenant's VMs).
    pub async fn host_domains(
        &self,
        caller: &Caller,
        host: HostId,
    ) -> Result<(Vec<drover_agent_api::HostDomain>, Vec<uuid::Uuid>)> {
        caller.require_system_admin()?;
        let host = self.get::<Host>(caller, host.0).await?;
        let domains = self.domains_of(&host).await?;
        let vms: std::collections::HashSet<uuid::Uuid> =
            self.store().object_list::<Vm>(caller.tenant_id).await?.into_iter().map(|v| v.id.0).collect();
        let imported = domains.iter().map(|d| d.uuid).filter(|u| vms.contains(u)).collect();
        Ok((domains, imported))
    }

    /// The networks the host's administrator declared to its agent: what a replication job's
    /// network mapping may name as a target.
    pub async fn host_networks(&self, caller: &Caller, host: HostId) -> Result<Vec<drover_agent_api::HostNetwork>> {
        let host = self.get::<Host>(caller, host.0).await?;
        self.engine.agent(&host).await?.networks().await.map_err(crate::agent_error)
    }

    async fn domains_of(&self, host: &Host) -> Result<Vec<drover_agent_api::HostDomain>> {
        let agent = self.engine.agent(host).await?;
        agent.domains().await.map_err(|e| match e.kind {
            drover_agent_api::ErrorKind::Unsupported => Error::invalid(format!("host {}: {}", host.name, e.message)),
            _ => crate::agent_error(e),
        })
    }

    /// Takes a libvirt domain of a host into the inventory, as it is: its id is the domain's
    /// UUID, its disks, NICs and boot are the domain's. Nothing on the host changes. Only the
    /// system tenant's administrators import (a domain is the host's, not a tenant's).
    pub async fn vm_import(&self, caller: &Caller, import: ImportVm) -> Result<Vm> {
        caller.require_system_admin()?;
        let host = self.get::<Host>(caller, import.host_id.0).await?;
        let ds = match import.datastore_id {
            Some(id) => {
                let ds = self.get::<Datastore>(caller, id.0).await?;
                if ds.host_id != host.id {
                    return Err(Error::invalid(format!("datastore {:?} is not on host {}", ds.name, host.name)));
                }
                ds
            }
            None => {
                let on_host: Vec<Datastore> = self
                    .store()
                    .object_list::<Datastore>(caller.tenant_id)
                    .await?
                    .into_iter()
                    .filter(|d| d.host_id == host.id)
                    .collect();
                match on_host.as_slice() {
                    [one] => one.clone(),
                    [] => {
                        return Err(Error::invalid(format!(
                            "host {} has no datastore: create one first (drover keeps an imported VM's work files there)",
                            host.name
                        )));
                    }
                    _ => {
                        return Err(Error::invalid(format!(
                            "host {} has {} datastores: say which one (datastore_id)",
                            host.name,
                            on_host.len()
                        )));
                    }
                }
            }
        };
        let domains = self.domains_of(&host).await?;
        let wanted = import.domain.trim();
        let Some(d) = domains.iter().find(|d| d.name == wanted || d.uuid.to_string() == wanted.to_ascii_lowercase())
        else {
            let names: Vec<&str> = domains.iter().take(20).map(|d| d.name.as_str()).collect();
            return Err(Error::not_found(
                "libvirt domain",
                format!("{wanted:?} on host {} (it has: {})", host.name, names.join(", ")),
            ));
        };
        if !d.unsupported.is_empty() {
            return Err(Error::invalid(format!(
                "domain {} cannot be protected as it is: {}",
                d.name,
                d.unsupported.join("; ")
            )));
        }
        if let Ok(existing) = self.store().object_get::<Vm>(caller.tenant_id, d.uuid).await {
            return Err(Error::conflict(format!("domain {} is already imported as VM {:?}", d.name, existing.name)));
        }
        let mut disks = Vec::with_capacity(d.disks.len());
        for disk in &d.disks {
            let Some(size_bytes) = disk.size_bytes else {
                return Err(Error::invalid(format!(
                    "domain {}: the size of disk {} cannot be read",
                    d.name, disk.target
                )));
            };
            disks.push(VmDisk { name: disk.target.clone(), size_bytes, import_from: None });
        }
        let mut nics = Vec::with_capacity(d.nics.len());
        for (i, n) in d.nics.iter().enumerate() {
            nics.push(VmNic {
                network: n.source.clone().unwrap_or_else(|| n.kind.clone()),
                mac: n.mac.clone().unwrap_or_else(|| mac_for(VmId(d.uuid), i)),
            });
        }
        let t = now();
        let vm = Vm {
            id: VmId(d.uuid),
            tenant_id: caller.tenant_id,
            name: import.name.as_deref().unwrap_or(&d.name).trim().to_string(),
            host_id: host.id,
            datastore_id: ds.id,
            vcpus: d.vcpus,
            memory_mib: d.memory_mib,
            disks,
            nics,
            tags: import.tags,
            boot: VmBoot {
                kernel: d.kernel.clone(),
                initrd: d.initrd.clone(),
                cmdline: d.cmdline.clone(),
                firmware: match d.firmware {
                    drover_agent_api::Firmware::Bios => Firmware::Bios,
                    drover_agent_api::Firmware::Uefi => Firmware::Uefi,
                },
            },
            power_state: if matches!(
                d.state,
                drover_agent_api::HostDomainState::ShutOff | drover_agent_api::HostDomainState::Crashed
            ) {
                VmPowerState::Off
            } else {
                VmPowerState::Running
            },
            provisioned: true,
            libvirt_domain: Some(d.name.clone()),
            guest_addresses: Vec::new(),
            created_at: t,
            updated_at: t,
            hardware: crate::ops::hardware_of(&d.hardware),
        };
        vm.validate()?;
        self.store().object_insert(&vm).await?;
        tracing::info!(vm = %vm.id, domain = %d.name, host = %host.name, "libvirt domain imported");
        Ok(vm)
    }

    pub async fn vm_update(&self, caller: &Caller, id: VmId, patch: VmPatch) -> Result<Vm> {
        caller.require(Role::PlanAuthor)?;
        let (vm, ()) = self
            .store()
            .object_modify::<Vm, _, _>(caller.tenant_id, id.0, |vm| {
                let hardware = patch.vcpus.is_some() || patch.memory_mib.is_some();
                if hardware && !matches!(vm.power_state, VmPowerState::Off | VmPowerState::Died) {
                    return Err(Error::conflict(format!(
                        "VM {:?} is {:?}; power it off before changing vcpus or memory",
                        vm.name, vm.power_state
                    )));
                }
                if let Some(n) = &patch.name {
                    vm.name = n.trim().to_string();
                }
                if let Some(v) = patch.vcpus {
                    vm.vcpus = v;
                }
                if let Some(m) = patch.memory_mib {
                    vm.memory_mib = m;
                }
                if let Some(t) = &patch.tags {
                    vm.tags = t.clone();
                }
                vm.validate()?;
                vm.updated_at = now();
                Ok(())
            })
            .await?;
        Ok(vm)
    }

    /// Starts a power operation. The VM's state moves at once, so a second request gets 409.
    pub async fn vm_power(&self, caller: &Caller, id: VmId, action: PowerAction) -> Result<SessionId> {
        caller.require(Role::PlanOperator)?;
        let event = match action {
            PowerAction::PowerOn => VmPowerEvent::PowerOnRequested,
            PowerAction::Shutdown | PowerAction::PowerOff => VmPowerEvent::StopRequested,
        };
        let kind = match action {
            PowerAction::PowerOn => SessionKind::VmPowerOn,
            PowerAction::Shutdown => SessionKind::VmShutdown,
            PowerAction::PowerOff => SessionKind::VmPowerOff,
        };
        let vm = self.get::<Vm>(caller, id.0).await?;
        let ds = self.get::<Datastore>(caller, vm.datastore_id.0).await?;
        let params = VmOpParams {
            vm_id: id,
            tenant_id: caller.tenant_id,
            disk_dir: ops::disk_dir(&ds, id),
            wait_heartbeat: action == PowerAction::PowerOn,
            datastore_id: Some(ds.id),
        };
        let (session, tasks) = vm_session(caller, &vm, kind, &params)?;
        let session_id = session.id;
        // The power state's move and the session commit together; the checks run on the version
        // of the record that is written (a concurrent change makes them run again).
        self.engine
            .submit_with::<Vm, _, _>(session, tasks, caller.tenant_id, id.0, |vm| {
                if !vm.provisioned {
                    return Err(Error::conflict(format!("VM {:?} is still being created", vm.name)));
                }
                vm.power_state = vm.power_state.apply(event).map_err(|_| {
                    Error::conflict(format!("VM {:?} is {:?}; cannot {action:?} now", vm.name, vm.power_state))
                })?;
                vm.updated_at = now();
                Ok(())
            })
            .await?;
        Ok(session_id)
    }

    pub async fn vm_delete(&self, caller: &Caller, id: VmId) -> Result<SessionId> {
        caller.require(Role::PlanAuthor)?;
        let vm = self.get::<Vm>(caller, id.0).await?;
        if !matches!(vm.power_state, VmPowerState::Off | VmPowerState::Died) {
            return Err(Error::conflict(format!("VM {:?} is {:?}; power it off first", vm.name, vm.power_state)));
        }
        let busy = self
            .store()
            .session_list(
                caller.tenant_id,
                &SessionFilter {
                    target_id: Some(id.0),
                    state: Some(SessionState::Working),
                    limit: 1,
                    ..Default::default()
                },
            )
            .await?;
        if busy.1 > 0 {
            return Err(Error::conflict(format!("VM {:?} has an operation under way", vm.name)));
        }
        let ds = self.get::<Datastore>(caller, vm.datastore_id.0).await?;
        let params = VmOpParams {
            vm_id: id,
            tenant_id: caller.tenant_id,
            disk_dir: ops::disk_dir(&ds, id),
            wait_heartbeat: false,
            datastore_id: Some(ds.id),
        };
        self.submit_vm_session(caller, &vm, SessionKind::VmDelete, &params).await
    }

    /// A file an import or boot setting names, resolved inside this host's import directories
    /// (`local`), or checked to be a plain absolute path for an agent's host to resolve.
    async fn import_file(&self, local: bool, what: &str, requested: &str) -> Result<String> {
        if !local {
            let path = std::path::Path::new(requested);
            let plain = path.is_absolute()
                && requested.len() <= 4096
                && path
                    .components()
                    .all(|c| matches!(c, std::path::Component::RootDir | std::path::Component::Normal(_)));
            if !plain {
                return Err(Error::invalid(format!(
                    "{what} {requested:?} must be an absolute path without '.' or '..', inside one of the import \
                     directories of the host's agent"
                )));
            }
            return Ok(requested.to_string());
        }
        let paths = self.engine.config().host_paths.clone();
        let (what, requested) = (what.to_string(), requested.to_string());
        let resolved = tokio::task::spawn_blocking(move || paths.import_file(&what, &requested))
            .await
            .map_err(|e| Error::internal(format!("import path check: {e}")))??;
        Ok(resolved.to_string_lossy().into_owned())
    }

    async fn submit_vm_session(
        &self,
        caller: &Caller,
        vm: &Vm,
        kind: SessionKind,
        params: &VmOpParams,
    ) -> Result<SessionId> {
        let (session, tasks) = vm_session(caller, vm, kind, params)?;
        self.engine.submit(session, tasks).await
    }

    // ---------------------------------------------------------------------------------------------
    // Replication jobs

    pub async fn replication_job_create(&self, caller: &Caller, new: NewReplicationJob) -> Result<ReplicationJob> {
        caller.require(Role::PlanAuthor)?;
        let ds = self.get::<Datastore>(caller, new.target_datastore_id.0).await?;
        if ds.host_id != new.target_host_id {
            return Err(Error::invalid(format!("datastore {:?} is not on host {}", ds.name, new.target_host_id)));
        }
        for vm in &new.vm_ids {
            let vm = self.get::<Vm>(caller, vm.0).await?;
            if vm.datastore_id == ds.id {
                return Err(Error::invalid(format!(
                    "VM {:?} lives on the target datastore; replicate it somewhere else",
                    vm.name
                )));
            }
        }
        let t = now();
        let job = ReplicationJob {
            id: ReplicationJobId::new(),
            tenant_id: caller.tenant_id,
            name: new.name.trim().to_string(),
            vm_ids: new.vm_ids,
            target_host_id: new.target_host_id,
            target_datastore_id: new.target_datastore_id,
            schedule: new.schedule,
            retention_points: new.retention_points,
            bandwidth_limit: new.bandwidth_limit,
            consistency: new.consistency,
            network_mappings: new.network_mappings,
            enabled: true,
            created_at: t,
            updated_at: t,
        };
        job.validate()?;
        self.store().object_insert(&job).await?;
        Ok(job)
    }

    /// Starts a run of a replication job now.
    pub async fn replication_job_run(&self, caller: &Caller, id: ReplicationJobId) -> Result<SessionId> {
        caller.require(Role::PlanOperator)?;
        let job = self.get::<ReplicationJob>(caller, id.0).await?;
        if !job.enabled {
            return Err(Error::conflict(format!("replication job {:?} is disabled", job.name)));
        }
        crate::replication::submit(&self.engine, &job).await
    }

    /// A replica's restore points, oldest first.
    pub async fn restore_points(&self, caller: &Caller, replica: ReplicaId) -> Result<Vec<RestorePoint>> {
        self.get::<Replica>(caller, replica.0).await?;
        self.store().restore_points_of(caller.tenant_id, replica).await
    }

    // ---------------------------------------------------------------------------------------------
    // Plans

    async fn plan_check_refs(&self, caller: &Caller, input: &PlanInput) -> Result<()> {
        for g in &input.groups {
            for v in &g.vms {
                self.get::<Vm>(caller, v.vm_id.0).await.map_err(|e| match e {
                    Error::NotFound { .. } => Error::invalid(format!("VM {} does not exist", v.vm_id)),
                    e => e,
                })?;
            }
        }
        self.recovery_location_get(caller, input.recovery_location_id).await.map_err(|e| match e {
            Error::NotFound { .. } => {
                Error::invalid(format!("recovery location {} does not exist", input.recovery_location_id))
            }
            e => e,
        })?;
        Ok(())
    }

    pub async fn plan_create(&self, caller: &Caller, input: PlanInput) -> Result<Plan> {
        caller.require(Role::PlanAuthor)?;
        let t = now();
        let plan = Plan {
            id: PlanId::new(),
            tenant_id: caller.tenant_id,
            name: input.name.trim().to_string(),
            description: input.description.clone(),
            enabled: true,
            lifecycle: PlanLifecycle::default(),
            recovery_location_id: input.recovery_location_id,
            groups: input.groups.clone(),
            created_at: t,
            updated_at: t,
        };
        plan.validate()?;
        self.plan_check_refs(caller, &input).await?;
        self.store().object_insert(&plan).await?;
        Ok(plan)
    }

    /// Replaces a plan's definition. Only while the plan is in a default state (not IN-USE).
    pub async fn plan_update(&self, caller: &Caller, id: PlanId, input: PlanInput) -> Result<Plan> {
        caller.require(Role::PlanAuthor)?;
        // Another tenant's plan is not found, whatever the body says.
        self.get::<Plan>(caller, id.0).await?;
        self.plan_check_refs(caller, &input).await?;
        let (plan, ()) = self
            .store()
            .object_modify::<Plan, _, _>(caller.tenant_id, id.0, |p| {
                if !p.lifecycle.state.is_default() {
                    return Err(Error::conflict(format!(
                        "plan {:?} is IN-USE ({}); reset it before editing",
                        p.name,
                        p.lifecycle.state.display_name()
                    )));
                }
                p.name = input.name.trim().to_string();
                p.description = input.description.clone();
                p.recovery_location_id = input.recovery_location_id;
                p.groups = input.groups.clone();
                p.updated_at = now();
                p.validate()
            })
            .await?;
        Ok(plan)
    }

    pub async fn plan_set_enabled(&self, caller: &Caller, id: PlanId, enabled: bool) -> Result<Plan> {
        caller.require(Role::PlanOperator)?;
        let (plan, ()) = self
            .store()
            .object_modify::<Plan, _, _>(caller.tenant_id, id.0, |p| {
                if p.lifecycle.state.is_running() {
                    return Err(Error::conflict(format!("plan {:?} is running", p.name)));
                }
                p.enabled = enabled;
                p.updated_at = now();
                Ok(())
            })
            .await?;
        Ok(plan)
    }

    /// Changes a plan's description, in any state (it changes nothing a running plan does).
    pub async fn plan_set_description(&self, caller: &Caller, id: PlanId, description: &str) -> Result<Plan> {
        caller.require(Role::PlanAuthor)?;
        let (plan, ()) = self
            .store()
            .object_modify::<Plan, _, _>(caller.tenant_id, id.0, |p| {
                p.description = description.to_string();
                p.updated_at = now();
                p.validate()
            })
            .await?;
        Ok(plan)
    }

    /// Applies a lifecycle request to a plan. Actions that need replicas (failover and the rest)
    /// are refused with 409 until every VM of the plan has a ready replica.
    pub async fn plan_action(
        &self,
        caller: &Caller,
        id: PlanId,
        action: PlanAction,
        opts: PlanActionOptions,
    ) -> Result<(Plan, Option<SessionId>)> {
        caller.require(Role::PlanOperator)?;
        let plan = self.get::<Plan>(caller, id.0).await?;
        if matches!(action, PlanAction::Failover | PlanAction::ReadinessCheck) && !plan.enabled {
            return Err(Error::conflict(format!("plan {:?} is disabled; enable it first", plan.name)));
        }
        // Check the transition before anything else, so an illegal request changes nothing.
        plan.lifecycle.apply(PlanEvent::Requested(action), true)?;
        let running_session = || async {
            let (s, _) = self
                .store()
                .session_list(
                    caller.tenant_id,
                    &SessionFilter { target_id: Some(id.0), limit: 1, ..Default::default() },
                )
                .await?;
            s.into_iter()
                .next()
                .filter(|s| s.state != SessionState::Stopped)
                .ok_or_else(|| Error::conflict(format!("plan {:?} has no session to act on", plan.name)))
        };
        // The plan's move for an action on the running session; the engine commits it together
        // with the session's write.
        let plan_move = crate::PlanMove { tenant: caller.tenant_id, plan: id, action };
        let session = match action {
            PlanAction::Halt => {
                let s = running_session().await?.id;
                self.engine.plan_halt(s, plan_move).await?;
                s
            }
            PlanAction::Continue => {
                let s = running_session().await?.id;
                let option = opts.continue_option.unwrap_or(ContinueOption::RetryFailedStep);
                self.engine.plan_resume(s, option, plan_move).await?;
                s
            }
            PlanAction::Undo if plan.lifecycle.state == PlanState::Halted => {
                let s = running_session().await?.id;
                self.engine.plan_undo(s, plan_move).await?;
                s
            }
            PlanAction::Failover => {
                let missing = self.vms_without_ready_replica(caller, &plan).await?;
                if !missing.is_empty() {
                    return Err(Error::conflict(format!(
                        "failover needs a ready replica of every VM in the plan; none for {}",
                        missing.join(", ")
                    )));
                }
                if opts.planned && opts.point_date.is_some() {
                    return Err(Error::invalid(
                        "a planned failover goes to production's state at the command: it takes no restore point date",
                    ));
                }
                let extra = json!({ "point_date": opts.point_date, "planned": opts.planned, "plan": plan });
                self.plan_submit(caller, &plan, SessionKind::PlanFailover, action, extra).await?
            }
            PlanAction::Undo if plan.lifecycle.state == PlanState::Failover => {
                self.plan_submit(caller, &plan, SessionKind::PlanUndoFailover, action, json!({})).await?
            }
            PlanAction::PermanentFailover => {
                self.plan_submit(caller, &plan, SessionKind::PlanPermanentFailover, action, json!({})).await?
            }
            PlanAction::FailbackToProduction | PlanAction::PrepareToFailback => {
                let location = opts.recovery_location_id.unwrap_or(plan.recovery_location_id);
                if location != RecoveryLocationId::ORIGINAL {
                    self.recovery_location_get(caller, location).await?;
                    if action == PlanAction::PrepareToFailback {
                        return Err(Error::conflict(
                            "prepare-failback syncs into the original VMs; fail back to another location in one step",
                        ));
                    }
                    let extra = json!({ "location": location, "restore_tags": opts.restore_tags });
                    let s = self.plan_submit(caller, &plan, SessionKind::PlanFailback, action, extra).await?;
                    return Ok((self.get::<Plan>(caller, id.0).await?, Some(s)));
                }
                let (kind, sync, switch) = match (action, plan.lifecycle.state) {
                    (PlanAction::PrepareToFailback, _) => (SessionKind::PlanPrepareFailback, true, false),
                    (_, PlanState::PrepareForFailback) => (SessionKind::PlanFailback, false, true),
                    _ => (SessionKind::PlanFailback, true, true),
                };
                self.plan_submit(caller, &plan, kind, action, json!({ "sync": sync, "switch": switch })).await?
            }
            PlanAction::SwitchoverToProduction => {
                let extra = json!({ "sync": false, "switch": true });
                self.plan_submit(caller, &plan, SessionKind::PlanFailback, action, extra).await?
            }
            PlanAction::CommitFailback => {
                self.plan_submit(caller, &plan, SessionKind::PlanCommitFailback, action, json!({})).await?
            }
            PlanAction::Undo if matches!(plan.lifecycle.state, PlanState::Failback | PlanState::PrepareForFailback) => {
                self.plan_submit(caller, &plan, SessionKind::PlanUndoFailback, action, json!({})).await?
            }
            PlanAction::ResetState => {
                let (p, ()) = self
                    .store()
                    .object_modify::<Plan, _, _>(caller.tenant_id, id.0, |p| {
                        p.lifecycle = p.lifecycle.apply(PlanEvent::Requested(PlanAction::ResetState), true)?;
                        p.enabled = false;
                        p.updated_at = now();
                        Ok(())
                    })
                    .await?;
                return Ok((p, None));
            }
            // The check itself is a session; its saga lands the plan in Verified or NotVerified.
            PlanAction::ReadinessCheck => {
                self.plan_submit(caller, &plan, SessionKind::PlanReadinessCheck, action, json!({})).await?
            }
            other => {
                return Err(Error::Unavailable(format!("{other:?} is not available in this version of drover")));
            }
        };
        Ok((self.get::<Plan>(caller, id.0).await?, Some(session)))
    }

    /// A test failover: the plan's VMs boot from their points as throwaway VMs with no uplink,
    /// the plan's steps run, and they are discarded. Neither the plan's state nor the replicas
    /// change.
    pub async fn plan_test_failover(&self, caller: &Caller, id: PlanId, opts: PlanActionOptions) -> Result<SessionId> {
        caller.require(Role::PlanOperator)?;
        let plan = self.get::<Plan>(caller, id.0).await?;
        if plan.lifecycle.state.is_running() {
            return Err(Error::conflict(format!(
                "plan {:?} is busy ({})",
                plan.name,
                plan.lifecycle.state.display_name()
            )));
        }
        let (running, _) = self
            .store()
            .session_list(caller.tenant_id, &SessionFilter { target_id: Some(id.0), limit: 1, ..Default::default() })
            .await?;
        if running.iter().any(|s| s.state != SessionState::Stopped) {
            return Err(Error::conflict(format!("plan {:?} has a session under way", plan.name)));
        }
        let replicas = self.list::<Replica>(caller).await?;
        for vm in plan.vm_ids() {
            if !replicas.iter().any(|r| r.source_vm_id == vm) {
                let name = self.get::<Vm>(caller, vm.0).await.map(|v| v.name).unwrap_or_else(|_| vm.to_string());
                return Err(Error::conflict(format!("test failover needs a replica of every VM; none for {name}")));
            }
        }
        let params =
            json!({ "plan_id": plan.id, "tenant_id": caller.tenant_id, "point_date": opts.point_date, "plan": plan });
        let session = Session::new(
            caller.tenant_id,
            SessionKind::PlanTestFailover,
            plan.name.clone(),
            SessionTarget::Plan(plan.id),
            params,
        );
        let mut tasks = Vec::new();
        for vm_id in plan.vm_ids() {
            let name = self.get::<Vm>(caller, vm_id.0).await.map(|v| v.name).unwrap_or_else(|_| vm_id.to_string());
            tasks.push(session.task(Some(vm_id), name));
        }
        self.engine.submit(session, tasks).await
    }

    async fn vms_without_ready_replica(&self, caller: &Caller, plan: &Plan) -> Result<Vec<String>> {
        let replicas = self.list::<Replica>(caller).await?;
        let mut missing = Vec::new();
        for vm_id in plan.vm_ids() {
            if !replicas.iter().any(|r| r.source_vm_id == vm_id && r.state == ReplicaState::Ready) {
                let name = self.get::<Vm>(caller, vm_id.0).await.map(|v| v.name).unwrap_or_else(|_| vm_id.to_string());
                missing.push(name);
            }
        }
        Ok(missing)
    }

    async fn plan_submit(
        &self,
        caller: &Caller,
        plan: &Plan,
        kind: SessionKind,
        action: PlanAction,
        extra: serde_json::Value,
    ) -> Result<SessionId> {
        let mut params = json!({ "plan_id": plan.id, "tenant_id": caller.tenant_id, "action": action });
        if let (Some(p), Some(e)) = (params.as_object_mut(), extra.as_object()) {
            p.extend(e.clone());
        }
        let session = Session::new(caller.tenant_id, kind, plan.name.clone(), SessionTarget::Plan(plan.id), params);
        let mut tasks = Vec::new();
        for vm_id in plan.vm_ids() {
            let name = self.get::<Vm>(caller, vm_id.0).await.map(|v| v.name).unwrap_or_else(|_| vm_id.to_string());
            tasks.push(session.task(Some(vm_id), name));
        }
        // The plan's move and its session commit together: a concurrent request finds the plan
        // busy and gets 409, and a crash never leaves a move without the session behind it.
        let session_id = session.id;
        self.engine
            .submit_with::<Plan, _, _>(session, tasks, caller.tenant_id, plan.id.0, |p| {
                p.lifecycle = p.lifecycle.apply(PlanEvent::Requested(action), true)?;
                p.updated_at = now();
                Ok(())
            })
            .await?;
        Ok(session_id)
    }

    // ---------------------------------------------------------------------------------------------
    // Sessions

    pub async fn session_list(&self, caller: &Caller, filter: &SessionFilter) -> Result<(Vec<Session>, u64)> {
        if filter.limit == 0 || filter.limit > 1000 {
            return Err(Error::invalid("limit must be between 1 and 1000"));
        }
        self.store().session_list(caller.tenant_id, filter).await
    }

    /// A page of the caller's tenant's sessions as summaries, and how many meet the query in
    /// all; at most [`SESSION_SUMMARIES_MAX`] at once.
    pub async fn session_summaries(&self, caller: &Caller, q: &SessionQuery) -> Result<(Vec<SessionSummary>, u64)> {
        if q.limit == 0 || q.limit > SESSION_SUMMARIES_MAX {
            return Err(Error::invalid(format!("limit must be between 1 and {SESSION_SUMMARIES_MAX}")));
        }
        self.store().session_summaries(caller.tenant_id, q).await
    }

    pub async fn session_get(&self, caller: &Caller, id: SessionId) -> Result<(Session, Vec<Task>)> {
        let s = self.store().session_get(Some(caller.tenant_id), id).await?;
        let tasks = self.store().tasks_of(id).await?;
        Ok((s, tasks))
    }

    pub async fn session_log(
        &self,
        caller: &Caller,
        id: SessionId,
        after_seq: i64,
        limit: u64,
    ) -> Result<Vec<LogEntry>> {
        self.store().session_get(Some(caller.tenant_id), id).await?;
        if limit == 0 || limit > 10_000 {
            return Err(Error::invalid("limit must be between 1 and 10000"));
        }
        self.store().log_list(id, after_seq, limit).await
    }

    /// The saga step records of a session (what each step did, and how it ended), in saga order.
    pub async fn session_steps(&self, caller: &Caller, id: SessionId) -> Result<Vec<StepRecord>> {
        self.store().session_get(Some(caller.tenant_id), id).await?;
        self.store().steps_of(id).await
    }

    /// The restore point each VM task of a (test) failover session booted from, once its boot
    /// step has run: what the EM dialect links a failover task to. Empty for other sessions.
    pub async fn session_boot_points(
        &self,
        caller: &Caller,
        id: SessionId,
    ) -> Result<Vec<(TaskId, ReplicaId, RestorePointId)>> {
        let steps = self.session_steps(caller, id).await?;
        Ok(steps
            .iter()
            .filter(|s| s.name.starts_with("boot:") && s.state != StepState::Failed)
            .filter_map(|s| {
                let (replica, point) = crate::failover::booted_from(&s.output)?;
                Some((s.task_id?, replica, point))
            })
            .collect())
    }

    pub async fn session_halt(&self, caller: &Caller, id: SessionId) -> Result<()> {
        caller.require(Role::PlanOperator)?;
        self.store().session_get(Some(caller.tenant_id), id).await?;
        self.engine.halt(id).await
    }

    pub async fn session_continue(&self, caller: &Caller, id: SessionId, option: ContinueOption) -> Result<()> {
        caller.require(Role::PlanOperator)?;
        self.store().session_get(Some(caller.tenant_id), id).await?;
        self.engine.resume(id, option).await
    }

    pub async fn session_undo(&self, caller: &Caller, id: SessionId) -> Result<()> {
        caller.require(Role::PlanOperator)?;
        self.store().session_get(Some(caller.tenant_id), id).await?;
        self.engine.undo(id).await
    }
}

/// At most `max` characters of `s`, with an ellipsis when it was longer.
fn clip(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((end, _)) => format!("{}…", &s[..end]),
        None => s.to_string(),
    }
}

/// Sites, hosts and datastores: see [`Caller::require_system_admin`].
fn is_host_resource(kind: &str) -> bool {
    matches!(kind, "site" | "host" | "datastore")
}

/// A VM operation's session and its one task.
fn vm_session(caller: &Caller, vm: &Vm, kind: SessionKind, params: &VmOpParams) -> Result<(Session, Vec<Task>)> {
    let params = serde_json::to_value(params).map_err(|e| Error::internal(e.to_string()))?;
    let session = Session::new(caller.tenant_id, kind, vm.name.clone(), SessionTarget::Vm(vm.id), params);
    let task = session.task(Some(vm.id), vm.name.clone());
    Ok((session, vec![task]))
}
