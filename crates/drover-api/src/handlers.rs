//! The native API's handlers. Each one parses, calls the application layer, and renders; none
//! touches the store or the engine directly.

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::http::header::CONTENT_TYPE;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use drover_engine::app::{
    NewDatastore, NewHost, NewRecoveryLocation, NewReplicationJob, NewUser, PowerAction, VmPatch,
};
use drover_engine::saga::ContinueOption;
use drover_types::SessionFilter;
use drover_types::{self as d, Error};
use futures::Stream;
use uuid::Uuid;

use crate::error::{ApiResult, ErrorBody, Json, Path, Query};
use crate::views::*;
use crate::{ApiState, Auth};

fn list<T, V: From<T>>(items: Vec<T>) -> Json<Page<V>> {
    let items: Vec<V> = items.into_iter().map(V::from).collect();
    Json(Page { total: items.len() as u64, items })
}

fn created<T: serde::Serialize>(v: T) -> Response {
    (StatusCode::CREATED, axum::Json(v)).into_response()
}

fn accepted(session: d::SessionId) -> Response {
    (StatusCode::ACCEPTED, axum::Json(Accepted { session_id: session.0 })).into_response()
}

// ------------------------------------------------------------------------------------------------
// Token

/// Logs in (`grant_type=password`) or trades a refresh token (`grant_type=refresh_token`).
#[utoipa::path(post, path = "/v1/token", tag = "auth",
    request_body(content = TokenRequest, content_type = "application/x-www-form-urlencoded"),
    responses((status = 200, body = TokenResponse), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 429, body = ErrorBody, description = "Too many failed logins for this user from this address, or from this address: try again after Retry-After seconds.",
            headers(("Retry-After" = u64, description = "Seconds to wait before trying again."))),
        (status = 503, body = ErrorBody, description = "Too many password checks are waiting; try again after Retry-After seconds.",
            headers(("Retry-After" = u64, description = "Seconds to wait before trying again.")))))]
pub async fn token(
    State(st): State<ApiState>,
    crate::ClientAddr(from): crate::ClientAddr,
    req: axum::extract::Request,
) -> ApiResult<Json<TokenResponse>> {
    let is_json = req
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    let body: TokenRequest = if is_json {
        let axum::Json(b) =
            axum::Json::<TokenRequest>::from_request(req, &()).await.map_err(crate::error::ApiError::from)?;
        b
    } else {
        let axum::Form(b) = axum::Form::<TokenRequest>::from_request(req, &())
            .await
            .map_err(|r| Error::invalid(format!("bad token request: {}", r.body_text())))?;
        b
    };
    let pair = match body.grant_type.as_str() {
        "password" => {
            let (Some(u), Some(p)) = (body.username.as_deref(), body.password.as_deref()) else {
                return Err(Error::invalid("grant_type=password needs username and password").into());
            };
            st.app.login(u, p, from).await?
        }
        "refresh_token" => {
            let Some(r) = body.refresh_token.as_deref() else {
                return Err(Error::invalid("grant_type=refresh_token needs refresh_token").into());
            };
            st.app.refresh(r).await?
        }
        other => {
            return Err(
                Error::invalid(format!("unsupported grant_type {other:?}: use password or refresh_token")).into()
            );
        }
    };
    Ok(Json(pair.into()))
}

use axum::extract::FromRequest as _;

// ------------------------------------------------------------------------------------------------
// Tenants and users

#[utoipa::path(get, path = "/v1/tenants", tag = "admin", security(("bearer" = [])),
    responses((status = 200, body = Page<TenantView>)))]
pub async fn tenants_list(State(st): State<ApiState>, Auth(c): Auth) -> ApiResult<Json<Page<TenantView>>> {
    Ok(list(st.app.tenant_list(&c).await?))
}

#[utoipa::path(post, path = "/v1/tenants", tag = "admin", security(("bearer" = [])), request_body = CreateTenant,
    responses((status = 201, body = TenantView), (status = 403, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn tenants_create(
    State(st): State<ApiState>,
    Auth(c): Auth,
    Json(b): Json<CreateTenant>,
) -> ApiResult<Response> {
    Ok(created(TenantView::from(st.app.tenant_create(&c, &b.name).await?)))
}

#[utoipa::path(get, path = "/v1/users", tag = "admin", security(("bearer" = [])),
    responses((status = 200, body = Page<UserView>), (status = 403, body = ErrorBody)))]
pub async fn users_list(State(st): State<ApiState>, Auth(c): Auth) -> ApiResult<Json<Page<UserView>>> {
    Ok(list(st.app.user_list(&c).await?))
}

#[utoipa::path(post, path = "/v1/users", tag = "admin", security(("bearer" = [])), request_body = CreateUser,
    responses((status = 201, body = UserView), (status = 400, body = ErrorBody), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn users_create(State(st): State<ApiState>, Auth(c): Auth, Json(b): Json<CreateUser>) -> ApiResult<Response> {
    let role: d::Role = b.role.parse()?;
    let user = st
        .app
        .user_create(&c, NewUser { name: b.name, password: b.password, role, tenant_id: b.tenant_id.map(Into::into) })
        .await?;
    Ok(created(UserView::from(user)))
}

#[utoipa::path(delete, path = "/v1/users/{id}", tag = "admin", security(("bearer" = [])),
    responses((status = 204), (status = 404, body = ErrorBody), (status = 403, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn users_delete(State(st): State<ApiState>, Auth(c): Auth, Path(id): Path<Uuid>) -> ApiResult<StatusCode> {
    st.app.user_delete(&c, id.into()).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(patch, path = "/v1/users/{id}", tag = "admin", security(("bearer" = [])), request_body = PatchUser,
    responses((status = 200, body = UserView), (status = 400, body = ErrorBody), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn users_patch(
    State(st): State<ApiState>,
    Auth(c): Auth,
    Path(id): Path<Uuid>,
    Json(b): Json<PatchUser>,
) -> ApiResult<Json<UserView>> {
    let role = b.role.as_deref().map(str::parse).transpose()?;
    Ok(Json(st.app.user_update(&c, id.into(), b.password, role).await?.into()))
}

// ------------------------------------------------------------------------------------------------
// Sites, hosts, datastores

#[utoipa::path(patch, path = "/v1/sites/{id}", tag = "inventory", security(("bearer" = [])), request_body = PatchName,
    responses((status = 200, body = SiteView), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody), (status = 403, body = ErrorBody)))]
pub async fn sites_patch(
    State(st): State<ApiState>,
    Auth(c): Auth,
    Path(id): Path<Uuid>,
    Json(b): Json<PatchName>,
) -> ApiResult<Json<SiteView>> {
    Ok(Json(st.app.update::<d::Site, _>(&c, id, b.name, |_| Ok(())).await?.into()))
}

#[utoipa::path(patch, path = "/v1/hosts/{id}", tag = "inventory", security(("bearer" = [])), request_body = PatchHost,
    responses((status = 200, body = HostView), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody), (status = 403, body = ErrorBody)))]
pub async fn hosts_patch(
    State(st): State<ApiState>,
    Auth(c): Auth,
    Path(id): Path<Uuid>,
    Json(b): Json<PatchHost>,
) -> ApiResult<Json<HostView>> {
    let host = st.app.host_update(&c, id.into(), b.name, b.address).await?;
    Ok(Json(host.into()))
}

#[utoipa::path(patch, path = "/v1/datastores/{id}", tag = "inventory", security(("bearer" = [])), request_body = PatchName,
    responses((status = 200, body = DatastoreView), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody), (status = 403, body = ErrorBody)))]
pub async fn datastores_patch(
    State(st): State<ApiState>,
    Auth(c): Auth,
    Path(id): Path<Uuid>,
    Json(b): Json<PatchName>,
) -> ApiResult<Json<DatastoreView>> {
    Ok(Json(st.app.update::<d::Datastore, _>(&c, id, b.name, |_| Ok(())).await?.into()))
}

#[utoipa::path(patch, path = "/v1/recovery-locations/{id}", tag = "plans", security(("bearer" = [])),
    request_body = PatchRecoveryLocation,
    responses((status = 200, body = RecoveryLocationView), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody), (status = 403, body = ErrorBody)))]
pub async fn locations_patch(
    State(st): State<ApiState>,
    Auth(c): Auth,
    Path(id): Path<Uuid>,
    Json(b): Json<PatchRecoveryLocation>,
) -> ApiResult<Json<RecoveryLocationView>> {
    let loc =
        st.app.recovery_location_update(&c, id.into(), b.name, b.description, b.network_mappings.map(mappings)).await?;
    Ok(Json(loc.into()))
}

#[utoipa::path(patch, path = "/v1/replication-jobs/{id}", tag = "replication", security(("bearer" = [])),
    request_body = PatchReplicationJob,
    responses((status = 200, body = ReplicationJobView), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody), (status = 403, body = ErrorBody)))]
pub async fn jobs_patch(
    State(st): State<ApiState>,
    Auth(c): Auth,
    Path(id): Path<Uuid>,
    Json(b): Json<PatchReplicationJob>,
) -> ApiResult<Json<ReplicationJobView>> {
    let job = st
        .app
        .replication_job_update(
            &c,
            id.into(),
            drover_engine::app::ReplicationJobPatch {
                name: b.name,
                schedule: b.schedule.map(Into::into),
                retention_points: b.retention_points,
                enabled: b.enabled,
                bandwidth_limit: b.bandwidth_limit.map(|b| (b > 0).then_some(b)),
                consistency: b.consistency,
                network_mappings: b.network_mappings.map(mappings),
            },
        )
        .await?;
    Ok(Json(job.into()))
}

#[utoipa::path(get, path = "/v1/sites", tag = "inventory", security(("bearer" = [])), responses((status = 200, body = Page<SiteView>)))]
pub async fn sites_list(State(st): State<ApiState>, Auth(c): Auth) -> ApiResult<Json<Page<SiteView>>> {
    Ok(list(st.app.list::<d::Site>(&c).await?))
}

#[utoipa::path(post, path = "/v1/sites", tag = "inventory", security(("bearer" = [])), request_body = CreateSite,
    responses((status = 201, body = SiteView), (status = 400, body = ErrorBody), (status = 409, body = ErrorBody), (status = 403, body = ErrorBody)))]
pub async fn sites_create(State(st): State<ApiState>, Auth(c): Auth, Json(b): Json<CreateSite>) -> ApiResult<Response> {
    Ok(created(SiteView::from(st.app.site_create(&c, &b.name, b.kind).await?)))
}

#[utoipa::path(get, path = "/v1/sites/{id}", tag = "inventory", security(("bearer" = [])),
    responses((status = 200, body = SiteView), (status = 404, body = ErrorBody)))]
pub async fn sites_get(State(st): State<ApiState>, Auth(c): Auth, Path(id): Path<Uuid>) -> ApiResult<Json<SiteView>> {
    Ok(Json(st.app.get::<d::Site>(&c, id).await?.into()))
}

#[utoipa::path(delete, path = "/v1/sites/{id}", tag = "inventory", security(("bearer" = [])),
    responses((status = 204), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody), (status = 403, body = ErrorBody)))]
pub async fn sites_delete(State(st): State<ApiState>, Auth(c): Auth, Path(id): Path<Uuid>) -> ApiResult<StatusCode> {
    st.app.delete::<d::Site>(&c, id).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(get, path = "/v1/hosts", tag = "inventory", security(("bearer" = [])), responses((status = 200, body = Page<HostView>)))]
pub async fn hosts_list(State(st): State<ApiState>, Auth(c): Auth) -> ApiResult<Json<Page<HostView>>> {
    Ok(list(st.app.list::<d::Host>(&c).await?))
}

#[utoipa::path(post, path = "/v1/hosts", tag = "inventory", security(("bearer" = [])), request_body = CreateHost,
    responses((status = 201, body = HostView), (status = 400, body = ErrorBody), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn hosts_create(State(st): State<ApiState>, Auth(c): Auth, Json(b): Json<CreateHost>) -> ApiResult<Response> {
    let h = st.app.host_create(&c, NewHost { site_id: b.site_id.into(), name: b.name, address: b.address }).await?;
    Ok(created(HostView::from(h)))
}

#[utoipa::path(get, path = "/v1/hosts/{id}", tag = "inventory", security(("bearer" = [])),
    responses((status = 200, body = HostView), (status = 404, body = ErrorBody)))]
pub async fn hosts_get(State(st): State<ApiState>, Auth(c): Auth, Path(id): Path<Uuid>) -> ApiResult<Json<HostView>> {
    Ok(Json(st.app.get::<d::Host>(&c, id).await?.into()))
}

#[utoipa::path(post, path = "/v1/hosts/{id}/enrolment", tag = "inventory", security(("bearer" = [])), request_body(content = EnrolmentRequest, description = "Optional: how long the token is good for."),
    responses((status = 201, body = EnrolmentView, description = "A one-time token for the host's `drover agent --enroll`: shown once."),
        (status = 400, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody, description = "The host is `local`, or this control plane has no agent listener."), (status = 403, body = ErrorBody)))]
pub async fn hosts_enrolment(
    State(st): State<ApiState>,
    Auth(c): Auth,
    Path(id): Path<Uuid>,
    body: axum::body::Bytes,
) -> ApiResult<(StatusCode, Json<EnrolmentView>)> {
    // The body is optional: none, or `{"ttl_secs": n}`.
    let ttl = if body.iter().all(u8::is_ascii_whitespace) {
        None
    } else {
        serde_json::from_slice::<EnrolmentRequest>(&body)
            .map_err(|e| Error::invalid(format!("bad request body: {e}")))?
            .ttl_secs
    };
    let e = st.app.host_enrolment(&c, id.into(), ttl).await?;
    Ok((StatusCode::CREATED, Json(e.into())))
}

#[utoipa::path(get, path = "/v1/hosts/{id}/agent", tag = "inventory", security(("bearer" = [])),
    responses((status = 200, body = AgentView), (status = 404, body = ErrorBody)))]
pub async fn hosts_agent(
    State(st): State<ApiState>,
    Auth(c): Auth,
    Path(id): Path<Uuid>,
) -> ApiResult<Json<AgentView>> {
    Ok(Json(st.app.host_agent(&c, id.into()).await?.into()))
}

#[utoipa::path(post, path = "/v1/hosts/{id}/agent/certificate", tag = "inventory", security(("bearer" = [])),
    responses((status = 200, body = AgentView, description = "The agent presents a new certificate, from a new key; the view says when it ends. The control plane also renews every agent's certificate by itself in its last month."),
        (status = 404, body = ErrorBody), (status = 409, body = ErrorBody, description = "The host is `local`, its agent has not enrolled, or this control plane has no agent listener."),
        (status = 503, body = ErrorBody, description = "The agent cannot be reached."), (status = 403, body = ErrorBody)))]
pub async fn hosts_agent_certificate(
    State(st): State<ApiState>,
    Auth(c): Auth,
    Path(id): Path<Uuid>,
) -> ApiResult<Json<AgentView>> {
    Ok(Json(st.app.host_agent_certificate_renew(&c, id.into()).await?.into()))
}

#[utoipa::path(delete, path = "/v1/hosts/{id}", tag = "inventory", security(("bearer" = [])),
    responses((status = 204), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody), (status = 403, body = ErrorBody)))]
pub async fn hosts_delete(State(st): State<ApiState>, Auth(c): Auth, Path(id): Path<Uuid>) -> ApiResult<StatusCode> {
    st.app.delete::<d::Host>(&c, id).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(get, path = "/v1/datastores", tag = "inventory", security(("bearer" = [])),
    responses((status = 200, body = Page<DatastoreView>)))]
pub async fn datastores_list(State(st): State<ApiState>, Auth(c): Auth) -> ApiResult<Json<Page<DatastoreView>>> {
    Ok(list(st.app.list::<d::Datastore>(&c).await?))
}

#[utoipa::path(post, path = "/v1/datastores", tag = "inventory", security(("bearer" = [])), request_body = CreateDatastore,
    responses((status = 201, body = DatastoreView), (status = 400, body = ErrorBody), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn datastores_create(
    State(st): State<ApiState>,
    Auth(c): Auth,
    Json(b): Json<CreateDatastore>,
) -> ApiResult<Response> {
    let x = st.app.datastore_create(&c, NewDatastore { host_id: b.host_id.into(), name: b.name, path: b.path }).await?;
    Ok(created(DatastoreView::from(x)))
}

#[utoipa::path(get, path = "/v1/datastores/{id}", tag = "inventory", security(("bearer" = [])),
    responses((status = 200, body = DatastoreView), (status = 404, body = ErrorBody)))]
pub async fn datastores_get(
    State(st): State<ApiState>,
    Auth(c): Auth,
    Path(id): Path<Uuid>,
) -> ApiResult<Json<DatastoreView>> {
    Ok(Json(st.app.get::<d::Datastore>(&c, id).await?.into()))
}

#[utoipa::path(delete, path = "/v1/datastores/{id}", tag = "inventory", security(("bearer" = [])),
    responses((status = 204), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody), (status = 403, body = ErrorBody)))]
pub async fn datastores_delete(
    State(st): State<ApiState>,
    Auth(c): Auth,
    Path(id): Path<Uuid>,
) -> ApiResult<StatusCode> {
    st.app.delete::<d::Datastore>(&c, id).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Grants a tenant a datastore of the system tenant (system administrators only). Its users then
/// see the datastore, its host and its site, and may place VMs, replicas and recovery locations on it.
#[utoipa::path(post, path = "/v1/datastores/{id}/grants", tag = "inventory", security(("bearer" = [])), request_body = GrantDatastore,
    responses((status = 200, body = DatastoreGrants), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn datastores_grant(
    State(st): State<ApiState>,
    Auth(c): Auth,
    Path(id): Path<Uuid>,
    Json(b): Json<GrantDatastore>,
) -> ApiResult<Json<DatastoreGrants>> {
    let tenants = st.app.datastore_grant(&c, id.into(), b.tenant_id.into()).await?;
    Ok(Json(DatastoreGrants { datastore_id: id, tenant_ids: tenants.into_iter().map(|t| t.0).collect() }))
}

#[utoipa::path(get, path = "/v1/datastores/{id}/grants", tag = "inventory", security(("bearer" = [])),
    responses((status = 200, body = DatastoreGrants), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody)))]
pub async fn datastores_grants(
    State(st): State<ApiState>,
    Auth(c): Auth,
    Path(id): Path<Uuid>,
) -> ApiResult<Json<DatastoreGrants>> {
    let tenants = st.app.datastore_grants(&c, id.into()).await?;
    Ok(Json(DatastoreGrants { datastore_id: id, tenant_ids: tenants.into_iter().map(|t| t.0).collect() }))
}

/// Takes a grant back; refused (409) while the tenant still has something on the datastore.
#[utoipa::path(delete, path = "/v1/datastores/{id}/grants/{tenant_id}", tag = "inventory", security(("bearer" = [])),
    responses((status = 204), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn datastores_revoke(
    State(st): State<ApiState>,
    Auth(c): Auth,
    Path((id, tenant)): Path<(Uuid, Uuid)>,
) -> ApiResult<StatusCode> {
    st.app.datastore_revoke(&c, id.into(), tenant.into()).await?;
    Ok(StatusCode::NO_CONTENT)
}

// ------------------------------------------------------------------------------------------------
// VMs

#[utoipa::path(get, path = "/v1/vms", tag = "vms", security(("bearer" = [])), responses((status = 200, body = Page<VmView>)))]
pub async fn vms_list(State(st): State<ApiState>, Auth(c): Auth) -> ApiResult<Json<Page<VmView>>> {
    Ok(list(st.app.list::<d::Vm>(&c).await?))
}

/// Records the VM and starts the session that creates its disks.
#[utoipa::path(post, path = "/v1/vms", tag = "vms", security(("bearer" = [])), request_body = CreateVm,
    responses((status = 202, body = Accepted), (status = 400, body = ErrorBody), (status = 409, body = ErrorBody), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn vms_create(State(st): State<ApiState>, Auth(c): Auth, Json(b): Json<CreateVm>) -> ApiResult<Response> {
    let (vm, session) = st.app.vm_create(&c, b.into_new_vm()?).await?;
    let mut resp = accepted(session);
    if let Ok(v) = axum::http::HeaderValue::from_str(&format!("/v1/vms/{}", vm.id)) {
        resp.headers_mut().insert(axum::http::header::LOCATION, v);
    }
    Ok(resp)
}

/// Takes a libvirt domain of a host into the inventory as a VM, as it is (its id is the domain's
/// UUID). Nothing on the host changes. System administrators only.
#[utoipa::path(post, path = "/v1/vms/import", tag = "vms", security(("bearer" = [])), request_body = ImportVm,
    responses((status = 201, body = VmView), (status = 400, body = ErrorBody, description = "The domain cannot be protected as it is, or the host's agent has no libvirt."),
        (status = 403, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody, description = "The domain is already imported."),
        (status = 503, body = ErrorBody, description = "The host's agent cannot be reached.")))]
pub async fn vms_import(State(st): State<ApiState>, Auth(c): Auth, Json(b): Json<ImportVm>) -> ApiResult<Response> {
    let import = drover_engine::app::ImportVm {
        host_id: b.host_id.into(),
        domain: b.domain,
        datastore_id: b.datastore_id.map(Into::into),
        name: b.name,
        tags: parse_tags(&b.tags)?,
    };
    let vm = st.app.vm_import(&c, import).await?;
    let mut resp = (StatusCode::CREATED, Json(VmView::from(vm.clone()))).into_response();
    if let Ok(v) = axum::http::HeaderValue::from_str(&format!("/v1/vms/{}", vm.id)) {
        resp.headers_mut().insert(axum::http::header::LOCATION, v);
    }
    Ok(resp)
}

/// The host's libvirt domains as its agent sees them, with what stops drover from protecting
/// each and the VM each is imported as. System administrators only.
#[utoipa::path(get, path = "/v1/hosts/{id}/domains", tag = "inventory", security(("bearer" = [])),
    responses((status = 200, body = Vec<HostDomainView>), (status = 400, body = ErrorBody, description = "The host's agent has no libvirt."),
        (status = 403, body = ErrorBody), (status = 404, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub async fn hosts_domains(
    State(st): State<ApiState>,
    Auth(c): Auth,
    Path(id): Path<Uuid>,
) -> ApiResult<Json<Vec<HostDomainView>>> {
    let (domains, imported) = st.app.host_domains(&c, id.into()).await?;
    Ok(Json(
        domains
            .into_iter()
            .map(|d| {
                let imported_as = imported.contains(&d.uuid).then_some(d.uuid);
                HostDomainView::new(d, imported_as)
            })
            .collect(),
    ))
}

/// The networks VMs may be connected to on the host, as its administrator declared them to its
/// agent (`--network NAME=TARGET`), each with whether it is there now: what a replication job's
/// network mapping may name.
#[utoipa::path(get, path = "/v1/hosts/{id}/networks", tag = "inventory", security(("bearer" = [])),
    responses((status = 200, body = Vec<HostNetworkView>), (status = 404, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub async fn hosts_networks(
    State(st): State<ApiState>,
    Auth(c): Auth,
    Path(id): Path<Uuid>,
) -> ApiResult<Json<Vec<HostNetworkView>>> {
    Ok(Json(st.app.host_networks(&c, id.into()).await?.into_iter().map(Into::into).collect()))
}

#[utoipa::path(get, path = "/v1/vms/{id}", tag = "vms", security(("bearer" = [])),
    responses((status = 200, body = VmView), (status = 404, body = ErrorBody)))]
pub async fn vms_get(State(st): State<ApiState>, Auth(c): Auth, Path(id): Path<Uuid>) -> ApiResult<Json<VmView>> {
    Ok(Json(st.app.get::<d::Vm>(&c, id).await?.into()))
}

#[utoipa::path(patch, path = "/v1/vms/{id}", tag = "vms", security(("bearer" = [])), request_body = PatchVm,
    responses((status = 200, body = VmView), (status = 400, body = ErrorBody), (status = 409, body = ErrorBody), (status = 403, body = ErrorBody)))]
pub async fn vms_patch(
    State(st): State<ApiState>,
    Auth(c): Auth,
    Path(id): Path<Uuid>,
    Json(b): Json<PatchVm>,
) -> ApiResult<Json<VmView>> {
    let tags = b.tags.as_deref().map(parse_tags).transpose()?;
    let patch = VmPatch { name: b.name, vcpus: b.vcpus, memory_mib: b.memory_mib, tags };
    Ok(Json(st.app.vm_update(&c, id.into(), patch).await?.into()))
}

/// Deletes a VM that is off: its disks, its runtime files, then its record. A running VM is a 409.
#[utoipa::path(delete, path = "/v1/vms/{id}", tag = "vms", security(("bearer" = [])),
    responses((status = 202, body = Accepted), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody), (status = 403, body = ErrorBody)))]
pub async fn vms_delete(State(st): State<ApiState>, Auth(c): Auth, Path(id): Path<Uuid>) -> ApiResult<Response> {
    Ok(accepted(st.app.vm_delete(&c, id.into()).await?))
}

async fn power(st: ApiState, c: drover_engine::app::Caller, id: Uuid, action: PowerAction) -> ApiResult<Response> {
    Ok(accepted(st.app.vm_power(&c, id.into(), action).await?))
}

#[utoipa::path(post, path = "/v1/vms/{id}/power-on", tag = "vms", security(("bearer" = [])),
    responses((status = 202, body = Accepted), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody), (status = 403, body = ErrorBody)))]
pub async fn vms_power_on(State(st): State<ApiState>, Auth(c): Auth, Path(id): Path<Uuid>) -> ApiResult<Response> {
    power(st, c, id, PowerAction::PowerOn).await
}

/// Graceful shutdown (ACPI), then power off after the configured timeout.
#[utoipa::path(post, path = "/v1/vms/{id}/shutdown", tag = "vms", security(("bearer" = [])),
    responses((status = 202, body = Accepted), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody), (status = 403, body = ErrorBody)))]
pub async fn vms_shutdown(State(st): State<ApiState>, Auth(c): Auth, Path(id): Path<Uuid>) -> ApiResult<Response> {
    power(st, c, id, PowerAction::Shutdown).await
}

#[utoipa::path(post, path = "/v1/vms/{id}/power-off", tag = "vms", security(("bearer" = [])),
    responses((status = 202, body = Accepted), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody), (status = 403, body = ErrorBody)))]
pub async fn vms_power_off(State(st): State<ApiState>, Auth(c): Auth, Path(id): Path<Uuid>) -> ApiResult<Response> {
    power(st, c, id, PowerAction::PowerOff).await
}

// ------------------------------------------------------------------------------------------------
// Replication jobs and recovery locations

#[utoipa::path(get, path = "/v1/replication-jobs", tag = "replication", security(("bearer" = [])),
    responses((status = 200, body = Page<ReplicationJobView>)))]
pub async fn jobs_list(State(st): State<ApiState>, Auth(c): Auth) -> ApiResult<Json<Page<ReplicationJobView>>> {
    Ok(list(st.app.list::<d::ReplicationJob>(&c).await?))
}

#[utoipa::path(post, path = "/v1/replication-jobs", tag = "replication", security(("bearer" = [])),
    request_body = CreateReplicationJob,
    responses((status = 201, body = ReplicationJobView), (status = 400, body = ErrorBody), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn jobs_create(
    State(st): State<ApiState>,
    Auth(c): Auth,
    Json(b): Json<CreateReplicationJob>,
) -> ApiResult<Response> {
    let job = st
        .app
        .replication_job_create(
            &c,
            NewReplicationJob {
                name: b.name,
                vm_ids: b.vm_ids.into_iter().map(Into::into).collect(),
                target_host_id: b.target_host_id.into(),
                target_datastore_id: b.target_datastore_id.into(),
                schedule: b.schedule.into(),
                retention_points: b.retention_points,
                bandwidth_limit: b.bandwidth_limit.filter(|b| *b > 0),
                consistency: b.consistency,
                network_mappings: mappings(b.network_mappings),
            },
        )
        .await?;
    Ok(created(ReplicationJobView::from(job)))
}

#[utoipa::path(get, path = "/v1/replication-jobs/{id}", tag = "replication", security(("bearer" = [])),
    responses((status = 200, body = ReplicationJobView), (status = 404, body = ErrorBody)))]
pub async fn jobs_get(
    State(st): State<ApiState>,
    Auth(c): Auth,
    Path(id): Path<Uuid>,
) -> ApiResult<Json<ReplicationJobView>> {
    Ok(Json(st.app.get::<d::ReplicationJob>(&c, id).await?.into()))
}

#[utoipa::path(delete, path = "/v1/replication-jobs/{id}", tag = "replication", security(("bearer" = [])),
    responses((status = 204), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody), (status = 403, body = ErrorBody)))]
pub async fn jobs_delete(State(st): State<ApiState>, Auth(c): Auth, Path(id): Path<Uuid>) -> ApiResult<StatusCode> {
    st.app.delete::<d::ReplicationJob>(&c, id).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Runs the job now; the run is a session with a task per VM.
#[utoipa::path(post, path = "/v1/replication-jobs/{id}/run", tag = "replication", security(("bearer" = [])),
    responses((status = 202, body = Accepted), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody), (status = 403, body = ErrorBody)))]
pub async fn jobs_run(State(st): State<ApiState>, Auth(c): Auth, Path(id): Path<Uuid>) -> ApiResult<Response> {
    Ok(accepted(st.app.replication_job_run(&c, id.into()).await?))
}

/// Replicas appear with the first replication run of their job.
#[utoipa::path(get, path = "/v1/replicas", tag = "replication", security(("bearer" = [])),
    responses((status = 200, body = Page<ReplicaView>)))]
pub async fn replicas_list(State(st): State<ApiState>, Auth(c): Auth) -> ApiResult<Json<Page<ReplicaView>>> {
    Ok(list(st.app.list::<d::Replica>(&c).await?))
}

#[utoipa::path(get, path = "/v1/replicas/{id}", tag = "replication", security(("bearer" = [])),
    responses((status = 200, body = ReplicaView), (status = 404, body = ErrorBody)))]
pub async fn replicas_get(
    State(st): State<ApiState>,
    Auth(c): Auth,
    Path(id): Path<Uuid>,
) -> ApiResult<Json<ReplicaView>> {
    Ok(Json(st.app.get::<d::Replica>(&c, id).await?.into()))
}

/// A replica's restore points, oldest first.
#[utoipa::path(get, path = "/v1/replicas/{id}/restore-points", tag = "replication", security(("bearer" = [])),
    responses((status = 200, body = Page<RestorePointView>), (status = 404, body = ErrorBody)))]
pub async fn replicas_points(
    State(st): State<ApiState>,
    Auth(c): Auth,
    Path(id): Path<Uuid>,
) -> ApiResult<Json<Page<RestorePointView>>> {
    Ok(list(st.app.restore_points(&c, id.into()).await?))
}

#[utoipa::path(get, path = "/v1/recovery-locations", tag = "plans", security(("bearer" = [])),
    responses((status = 200, body = Page<RecoveryLocationView>)))]
pub async fn locations_list(State(st): State<ApiState>, Auth(c): Auth) -> ApiResult<Json<Page<RecoveryLocationView>>> {
    Ok(list(st.app.recovery_location_list(&c).await?))
}

#[utoipa::path(post, path = "/v1/recovery-locations", tag = "plans", security(("bearer" = [])),
    request_body = CreateRecoveryLocation,
    responses((status = 201, body = RecoveryLocationView), (status = 400, body = ErrorBody), (status = 409, body = ErrorBody), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn locations_create(
    State(st): State<ApiState>,
    Auth(c): Auth,
    Json(b): Json<CreateRecoveryLocation>,
) -> ApiResult<Response> {
    let loc = st
        .app
        .recovery_location_create(
            &c,
            NewRecoveryLocation {
                name: b.name,
                description: b.description,
                host_id: b.host_id.into(),
                datastore_id: b.datastore_id.into(),
                network_mappings: mappings(b.network_mappings),
            },
        )
        .await?;
    Ok(created(RecoveryLocationView::from(loc)))
}

#[utoipa::path(get, path = "/v1/recovery-locations/{id}", tag = "plans", security(("bearer" = [])),
    responses((status = 200, body = RecoveryLocationView), (status = 404, body = ErrorBody)))]
pub async fn locations_get(
    State(st): State<ApiState>,
    Auth(c): Auth,
    Path(id): Path<Uuid>,
) -> ApiResult<Json<RecoveryLocationView>> {
    Ok(Json(st.app.recovery_location_get(&c, id.into()).await?.into()))
}

#[utoipa::path(delete, path = "/v1/recovery-locations/{id}", tag = "plans", security(("bearer" = [])),
    responses((status = 204), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody), (status = 403, body = ErrorBody)))]
pub async fn locations_delete(
    State(st): State<ApiState>,
    Auth(c): Auth,
    Path(id): Path<Uuid>,
) -> ApiResult<StatusCode> {
    st.app.recovery_location_delete(&c, id.into()).await?;
    Ok(StatusCode::NO_CONTENT)
}

// ------------------------------------------------------------------------------------------------
// Plans

#[utoipa::path(get, path = "/v1/plans", tag = "plans", security(("bearer" = [])), responses((status = 200, body = Page<PlanView>)))]
pub async fn plans_list(State(st): State<ApiState>, Auth(c): Auth) -> ApiResult<Json<Page<PlanView>>> {
    Ok(list(st.app.list::<d::Plan>(&c).await?))
}

#[utoipa::path(post, path = "/v1/plans", tag = "plans", security(("bearer" = [])), request_body = PlanBody,
    responses((status = 201, body = PlanView), (status = 400, body = ErrorBody), (status = 409, body = ErrorBody), (status = 403, body = ErrorBody)))]
pub async fn plans_create(State(st): State<ApiState>, Auth(c): Auth, Json(b): Json<PlanBody>) -> ApiResult<Response> {
    Ok(created(PlanView::from(st.app.plan_create(&c, b.into_input()).await?)))
}

#[utoipa::path(get, path = "/v1/plans/{id}", tag = "plans", security(("bearer" = [])),
    responses((status = 200, body = PlanView), (status = 404, body = ErrorBody)))]
pub async fn plans_get(State(st): State<ApiState>, Auth(c): Auth, Path(id): Path<Uuid>) -> ApiResult<Json<PlanView>> {
    Ok(Json(st.app.get::<d::Plan>(&c, id).await?.into()))
}

/// Replaces the plan's definition; only while it is not IN-USE.
#[utoipa::path(put, path = "/v1/plans/{id}", tag = "plans", security(("bearer" = [])), request_body = PlanBody,
    responses((status = 200, body = PlanView), (status = 400, body = ErrorBody), (status = 409, body = ErrorBody), (status = 403, body = ErrorBody)))]
pub async fn plans_put(
    State(st): State<ApiState>,
    Auth(c): Auth,
    Path(id): Path<Uuid>,
    Json(b): Json<PlanBody>,
) -> ApiResult<Json<PlanView>> {
    Ok(Json(st.app.plan_update(&c, id.into(), b.into_input()).await?.into()))
}

#[utoipa::path(delete, path = "/v1/plans/{id}", tag = "plans", security(("bearer" = [])),
    responses((status = 204), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody), (status = 403, body = ErrorBody)))]
pub async fn plans_delete(State(st): State<ApiState>, Auth(c): Auth, Path(id): Path<Uuid>) -> ApiResult<StatusCode> {
    st.app.delete::<d::Plan>(&c, id).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Runs a plan action: `enable`, `disable`, `readiness-check`, `failover`, `test-failover`, `permanent-failover`,
/// `prepare-failback`, `failback`, `switchover`, `commit-failback`, `undo`, `halt`, `continue`
/// (body: `ContinueBody`), `reset`. Returns the plan as it is once the action is accepted, with
/// the session the action started or acted on.
#[utoipa::path(post, path = "/v1/plans/{id}/{action}", tag = "plans", security(("bearer" = [])),
    params(("id" = Uuid, Path), ("action" = inline(PlanActionName), Path)),
    request_body(content = Option<PlanActionBody>),
    responses((status = 200, body = PlanActionView), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody), (status = 403, body = ErrorBody)))]
pub async fn plans_action(
    State(st): State<ApiState>,
    Auth(c): Auth,
    Path((id, action)): Path<(Uuid, String)>,
    body: axum::body::Bytes,
) -> ApiResult<Json<PlanActionView>> {
    let id: d::PlanId = id.into();
    let no_session = |p: d::Plan| Json(PlanActionView { plan: p.into(), session_id: None });
    let action = match action.as_str() {
        "enable" => return Ok(no_session(st.app.plan_set_enabled(&c, id, true).await?)),
        "test-failover" => {
            let b = action_body(&body)?;
            let opts = drover_engine::app::PlanActionOptions { point_date: b.restore_point_date, ..Default::default() };
            let session = st.app.plan_test_failover(&c, id, opts).await?;
            let plan = st.app.get::<d::Plan>(&c, id.0).await?;
            return Ok(Json(PlanActionView { plan: plan.into(), session_id: Some(session.0) }));
        }
        "disable" => return Ok(no_session(st.app.plan_set_enabled(&c, id, false).await?)),
        "readiness-check" => d::PlanAction::ReadinessCheck,
        "failover" => d::PlanAction::Failover,
        "permanent-failover" => d::PlanAction::PermanentFailover,
        "prepare-failback" => d::PlanAction::PrepareToFailback,
        "failback" => d::PlanAction::FailbackToProduction,
        "switchover" => d::PlanAction::SwitchoverToProduction,
        "commit-failback" => d::PlanAction::CommitFailback,
        "undo" => d::PlanAction::Undo,
        "halt" => d::PlanAction::Halt,
        "continue" => d::PlanAction::Continue,
        "reset" => d::PlanAction::ResetState,
        other => return Err(Error::not_found("plan action", other).into()),
    };
    let b = action_body(&body)?;
    let opts = drover_engine::app::PlanActionOptions {
        continue_option: b.option,
        point_date: b.restore_point_date,
        recovery_location_id: b.recovery_location_id.map(Into::into),
        restore_tags: b.restore_tags,
        planned: b.planned,
    };
    let (plan, session) = st.app.plan_action(&c, id, action, opts).await?;
    Ok(Json(PlanActionView { plan: plan.into(), session_id: session.map(|s| s.0) }))
}

/// A network mapping table as the engine takes it.
fn mappings(body: Vec<NetworkMappingBody>) -> Vec<d::NetworkMapping> {
    body.into_iter().map(|m| d::NetworkMapping { from: m.from, to: m.to }).collect()
}

/// A plan action's optional body: none, or `null` (the document's body is optional and nullable),
/// is the default.
fn action_body(body: &[u8]) -> d::Result<PlanActionBody> {
    if body.is_empty() {
        return Ok(PlanActionBody::default());
    }
    let b: Option<PlanActionBody> =
        serde_json::from_slice(body).map_err(|e| Error::invalid(format!("bad request body: {e}")))?;
    Ok(b.unwrap_or_default())
}

// ------------------------------------------------------------------------------------------------
// Sessions

fn parse_enum<T: serde::de::DeserializeOwned>(what: &str, v: &str) -> d::Result<T> {
    serde_json::from_value(serde_json::Value::String(v.to_string()))
        .map_err(|_| Error::invalid(format!("unknown {what} {v:?}")))
}

/// The audit log, newest first (administrators: the system tenant's see every tenant's entries,
/// others their own tenant's).
#[utoipa::path(get, path = "/v1/audit", tag = "auth", security(("bearer" = [])), params(AuditQuery),
    responses((status = 200, body = Page<AuditView>), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody)))]
pub async fn audit_list(
    State(st): State<ApiState>,
    Auth(c): Auth,
    Query(q): Query<AuditQuery>,
) -> ApiResult<Json<Page<AuditView>>> {
    let filter =
        d::AuditFilter { tenant_id: None, before_seq: q.before_seq, action: q.action, limit: q.limit.unwrap_or(100) };
    Ok(list(st.app.audit_list(&c, filter).await?))
}

#[utoipa::path(get, path = "/v1/sessions", tag = "sessions", security(("bearer" = [])), params(SessionQuery),
    responses((status = 200, body = Page<SessionView>), (status = 400, body = ErrorBody)))]
pub async fn sessions_list(
    State(st): State<ApiState>,
    Auth(c): Auth,
    Query(q): Query<SessionQuery>,
) -> ApiResult<Json<Page<SessionView>>> {
    let filter = SessionFilter {
        kind: q.kind.as_deref().map(str::parse).transpose()?,
        state: q.state.as_deref().map(|s| parse_enum("state", s)).transpose()?,
        result: q.result.as_deref().map(|s| parse_enum("result", s)).transpose()?,
        target_id: q.target_id,
        created_after: q.since,
        oldest_first: match q.order.as_deref() {
            None | Some("newest") => false,
            Some("oldest") => true,
            Some(o) => return Err(Error::invalid(format!("order must be newest or oldest, not {o:?}")).into()),
        },
        offset: q.offset,
        limit: q.limit.unwrap_or(100),
    };
    let (items, total) = st.app.session_list(&c, &filter).await?;
    Ok(Json(Page { total, items: items.into_iter().map(SessionView::from).collect() }))
}

#[utoipa::path(get, path = "/v1/sessions/{id}", tag = "sessions", security(("bearer" = [])),
    responses((status = 200, body = SessionView), (status = 404, body = ErrorBody)))]
pub async fn sessions_get(
    State(st): State<ApiState>,
    Auth(c): Auth,
    Path(id): Path<Uuid>,
) -> ApiResult<Json<SessionView>> {
    let (s, tasks) = st.app.session_get(&c, id.into()).await?;
    let mut v = SessionView::from(s);
    v.tasks = Some(tasks.into_iter().map(TaskView::from).collect());
    Ok(Json(v))
}

#[utoipa::path(get, path = "/v1/sessions/{id}/log", tag = "sessions", security(("bearer" = [])), params(LogQuery),
    responses((status = 200, body = Page<LogEntryView>), (status = 404, body = ErrorBody)))]
pub async fn sessions_log(
    State(st): State<ApiState>,
    Auth(c): Auth,
    Path(id): Path<Uuid>,
    Query(q): Query<LogQuery>,
) -> ApiResult<Json<Page<LogEntryView>>> {
    Ok(list(st.app.session_log(&c, id.into(), q.after, q.limit.unwrap_or(1000)).await?))
}

/// Live progress: a `session` event (the session with its tasks) whenever it changes and a `log`
/// event per log line, until the session stops or halts.
#[utoipa::path(get, path = "/v1/sessions/{id}/events", tag = "sessions", security(("bearer" = [])),
    responses((status = 200, description = "text/event-stream"), (status = 404, body = ErrorBody)))]
pub async fn sessions_events(
    State(st): State<ApiState>,
    Auth(c): Auth,
    Path(id): Path<Uuid>,
) -> ApiResult<Sse<impl Stream<Item = Result<Event, Infallible>>>> {
    let id: d::SessionId = id.into();
    st.app.session_get(&c, id).await?;
    let mut rx = st.app.engine().subscribe();
    let app = st.app.clone();
    let stream = async_stream(move |tx| async move {
        let mut last_seq = 0i64;
        let mut last_sent: Option<String> = None;
        loop {
            let Ok((s, tasks)) = app.session_get(&c, id).await else { break };
            if let Ok(entries) = app.session_log(&c, id, last_seq, 1000).await {
                for e in entries {
                    last_seq = e.seq;
                    let data = serde_json::to_string(&LogEntryView::from(e)).unwrap_or_default();
                    if tx.send(Event::default().event("log").data(data)).await.is_err() {
                        return;
                    }
                }
            }
            let done = s.state == d::SessionState::Stopped || s.halted;
            let mut v = SessionView::from(s);
            v.tasks = Some(tasks.into_iter().map(TaskView::from).collect());
            let data = serde_json::to_string(&v).unwrap_or_default();
            if last_sent.as_deref() != Some(&data) {
                if tx.send(Event::default().event("session").data(data.clone())).await.is_err() {
                    return;
                }
                last_sent = Some(data);
            }
            if done {
                break;
            }
            // Wake on a change of this session, or every second in case one was missed.
            let _ = tokio::time::timeout(Duration::from_secs(1), async {
                loop {
                    match rx.recv().await {
                        Ok(ch) if ch.session_id == id => break,
                        Ok(_) => continue,
                        Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => break,
                        Err(_) => {
                            futures::future::pending::<()>().await;
                        }
                    }
                }
            })
            .await;
        }
    });
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()))
}

/// A stream fed by a task through a channel (no macro crate needed for one generator).
fn async_stream<F, Fut>(f: F) -> impl Stream<Item = Result<Event, Infallible>>
where
    F: FnOnce(tokio::sync::mpsc::Sender<Event>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(f(tx));
    futures::StreamExt::map(tokio_stream::wrappers::ReceiverStream::new(rx), Ok)
}

#[utoipa::path(post, path = "/v1/sessions/{id}/halt", tag = "sessions", security(("bearer" = [])),
    responses((status = 202), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody), (status = 403, body = ErrorBody)))]
pub async fn sessions_halt(State(st): State<ApiState>, Auth(c): Auth, Path(id): Path<Uuid>) -> ApiResult<StatusCode> {
    st.app.session_halt(&c, id.into()).await?;
    Ok(StatusCode::ACCEPTED)
}

#[utoipa::path(post, path = "/v1/sessions/{id}/continue", tag = "sessions", security(("bearer" = [])),
    request_body = ContinueBody,
    responses((status = 202), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody), (status = 403, body = ErrorBody)))]
pub async fn sessions_continue(
    State(st): State<ApiState>,
    Auth(c): Auth,
    Path(id): Path<Uuid>,
    Json(b): Json<ContinueBody>,
) -> ApiResult<StatusCode> {
    st.app.session_continue(&c, id.into(), b.option.unwrap_or(ContinueOption::RetryFailedStep)).await?;
    Ok(StatusCode::ACCEPTED)
}

#[utoipa::path(post, path = "/v1/sessions/{id}/undo", tag = "sessions", security(("bearer" = [])),
    responses((status = 202), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody), (status = 403, body = ErrorBody)))]
pub async fn sessions_undo(State(st): State<ApiState>, Auth(c): Auth, Path(id): Path<Uuid>) -> ApiResult<StatusCode> {
    st.app.session_undo(&c, id.into()).await?;
    Ok(StatusCode::ACCEPTED)
}
