//! `/api/v1/distribution`: distribution tasks (create, read, per-device results as JSON or CSV,
//! pause, resume, confirm, retry, rollback), and the two endpoints peers call when devices move
//! (`imports`, `releases`).

use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};

use super::AdminState;
use super::error::{ApiError, ApiJson};
use crate::clock::UnixMs;
use crate::cluster::distribution::{Control, DistributionCell, MAX_TASK_DEVICES, NewDistribution};
use crate::cluster::runner;
use crate::cluster::task::{Distribution, DistributionId, DistributionStatus, Gate, OnTimeout, Policy};
use crate::cluster::transfer::{ImportRequest, ImportResponse, ReleaseRequest, ReleaseResponse};
use crate::identity::{DeviceName, InstanceName};

/// A peer sends up to `cluster.import_chunk` devices with their commands in one request.
const MAX_IMPORT_BYTES: usize = 64 << 20;

pub fn routes() -> Router<AdminState> {
    let control =
        |action: Control| post(move |state: State<AdminState>, path: Path<String>| control(state, path, action));
    Router::new()
        .route("/distribution/tasks", get(list).post(create))
        .route("/distribution/tasks/{task_id}", get(show))
        .route("/distribution/tasks/{task_id}/devices", get(devices))
        .route("/distribution/tasks/{task_id}/pause", control(Control::Pause))
        .route("/distribution/tasks/{task_id}/resume", control(Control::Resume))
        .route("/distribution/tasks/{task_id}/confirm", control(Control::Confirm))
        .route("/distribution/tasks/{task_id}/retry", control(Control::Retry))
        .route("/distribution/tasks/{task_id}/cancel", control(Control::Cancel))
        .route("/distribution/tasks/{task_id}/rollback", post(rollback))
        .route("/distribution/imports", post(import).layer(DefaultBodyLimit::max(MAX_IMPORT_BYTES)))
        .route("/distribution/releases", post(release))
}

#[derive(Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
enum PolicyName {
    Specified,
    Nearest,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateTask {
    product_key: String,
    device_names: Option<Vec<DeviceName>>,
    policy: PolicyName,
    instance: Option<InstanceName>,
    batch_size: Option<usize>,
    #[serde(default)]
    gate: Gate,
    batch_timeout_s: Option<u64>,
    #[serde(default)]
    on_timeout: OnTimeout,
}

#[derive(Serialize)]
struct DistributionView {
    task_id: String,
    product_key: String,
    policy: &'static str,
    instance: Option<String>,
    status: DistributionStatus,
    error: Option<String>,
    /// The batch being moved or waited on, from 1.
    batch: u32,
    batches: u32,
    batch_size: usize,
    gate: Gate,
    batch_timeout_s: Option<u64>,
    on_timeout: OnTimeout,
    /// Devices by their status in the task.
    devices: std::collections::BTreeMap<&'static str, usize>,
    created_at: String,
    updated_at: String,
}

fn view(task: &Distribution) -> DistributionView {
    let r = &task.record;
    let (policy, instance) = match &r.policy {
        Policy::Specified(i) => ("specified", Some(i.to_string())),
        Policy::Nearest => ("nearest", None),
    };
    DistributionView {
        task_id: r.id.to_string(),
        product_key: r.product_key.to_string(),
        policy,
        instance,
        status: r.status,
        error: r.error.clone(),
        batch: (r.batch + 1).min(r.batches),
        batches: r.batches,
        batch_size: r.batch_size,
        gate: r.gate,
        batch_timeout_s: r.batch_timeout_s,
        on_timeout: r.on_timeout,
        devices: task.counts(),
        created_at: UnixMs(r.created_at).rfc3339(),
        updated_at: UnixMs(r.updated_at).rfc3339(),
    }
}

/// Runs `work` to its end even if the caller goes away: it changes memory and then the store,
/// and must not stop in between because a client closed its connection.
async fn detached<T: Send + 'static>(work: impl std::future::Future<Output = T> + Send + 'static) -> T {
    tokio::spawn(work).await.unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()))
}

fn task(state: &AdminState, raw: &str) -> Result<Arc<DistributionCell>, ApiError> {
    let not_found = || ApiError::not_found(format!("distribution task {raw} not found"));
    let id: u64 = raw.parse().map_err(|_| not_found())?;
    state.cluster.distribution.task(DistributionId(id)).ok_or_else(not_found)
}

async fn create(
    State(state): State<AdminState>,
    ApiJson(body): ApiJson<CreateTask>,
) -> Result<(StatusCode, Json<DistributionView>), ApiError> {
    let policy = match (body.policy, body.instance) {
        (PolicyName::Specified, Some(i)) => Policy::Specified(i),
        (PolicyName::Specified, None) => return Err(ApiError::bad_request("the specified policy needs `instance`")),
        (PolicyName::Nearest, None) => Policy::Nearest,
        (PolicyName::Nearest, Some(_)) => {
            return Err(ApiError::bad_request("the nearest policy takes no `instance`: cluster.nearest decides"));
        }
    };
    if body.device_names.as_ref().is_some_and(|n| n.is_empty() || n.len() > MAX_TASK_DEVICES) {
        return Err(ApiError::bad_request(format!("device_names must name 1..={MAX_TASK_DEVICES} devices")));
    }
    if body.batch_timeout_s.is_some_and(|t| !(1..=30 * 86_400).contains(&t)) {
        return Err(ApiError::bad_request("batch_timeout_s must be within 1..=2592000"));
    }
    let new = NewDistribution {
        product_key: body.product_key,
        device_names: body.device_names,
        policy,
        batch_size: body.batch_size,
        gate: body.gate,
        batch_timeout_s: body.batch_timeout_s,
        on_timeout: body.on_timeout,
    };
    let cluster = state.cluster.clone();
    let cell = detached(async move { cluster.create_distribution(new).await }).await?;
    let view = view(&cell.lock());
    tracing::info!(
        task = view.task_id,
        product_key = view.product_key,
        policy = view.policy,
        "distribution task created"
    );
    Ok((StatusCode::CREATED, Json(view)))
}

async fn list(State(state): State<AdminState>) -> Json<serde_json::Value> {
    let tasks: Vec<DistributionView> = state.cluster.distribution.tasks().iter().map(|c| view(&c.lock())).collect();
    Json(serde_json::json!({ "tasks": tasks }))
}

async fn show(State(state): State<AdminState>, Path(id): Path<String>) -> Result<Json<DistributionView>, ApiError> {
    Ok(Json(view(&task(&state, &id)?.lock())))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ResultsQuery {
    format: Option<String>,
}

#[derive(Serialize)]
struct EntryView {
    device_name: String,
    status: &'static str,
    batch: u32,
    instance: Option<String>,
    error: Option<String>,
    updated_at: String,
}

/// Per-device results, as JSON or (`?format=csv`) as a CSV file.
async fn devices(
    State(state): State<AdminState>,
    Path(id): Path<String>,
    query: Result<Query<ResultsQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(q) = query?;
    let cell = task(&state, &id)?;
    let rows: Vec<EntryView> = cell
        .lock()
        .entries
        .iter()
        .map(|e| EntryView {
            device_name: e.device_name.to_string(),
            status: e.status.as_str(),
            batch: e.batch + 1,
            instance: e.instance.as_ref().map(ToString::to_string),
            error: e.error.clone(),
            updated_at: UnixMs(e.updated_at).rfc3339(),
        })
        .collect();
    match q.format.as_deref() {
        None | Some("json") => Ok(Json(serde_json::json!({ "devices": rows })).into_response()),
        Some("csv") => {
            let mut out = String::from("device_name,status,batch,instance,error,updated_at\n");
            for r in rows {
                let fields = [
                    r.device_name,
                    r.status.to_string(),
                    r.batch.to_string(),
                    r.instance.unwrap_or_default(),
                    r.error.unwrap_or_default(),
                    r.updated_at,
                ];
                out.push_str(&fields.iter().map(|f| csv_field(f)).collect::<Vec<_>>().join(","));
                out.push('\n');
            }
            let disposition = format!("attachment; filename=\"distribution-{id}.csv\"");
            Ok((
                [
                    (header::CONTENT_TYPE, "text/csv; charset=utf-8".to_string()),
                    (header::CONTENT_DISPOSITION, disposition),
                ],
                out,
            )
                .into_response())
        }
        Some(other) => Err(ApiError::bad_request(format!("format must be json or csv, not {other:?}"))),
    }
}

/// RFC 4180: quoted when it holds a comma, a quote or a line break; quotes doubled.
fn csv_field(f: &str) -> String {
    if f.contains([',', '"', '\n', '\r']) { format!("\"{}\"", f.replace('"', "\"\"")) } else { f.to_string() }
}

async fn control(
    State(state): State<AdminState>,
    Path(id): Path<String>,
    action: Control,
) -> Result<Json<DistributionView>, ApiError> {
    let cell = task(&state, &id)?;
    let (cluster, c) = (state.cluster.clone(), cell.clone());
    detached(async move { cluster.control_distribution(&c, action).await }).await?;
    tracing::info!(task = id, action = action.as_str(), "distribution task controlled");
    Ok(Json(view(&cell.lock())))
}

async fn rollback(
    State(state): State<AdminState>,
    Path(id): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let cell = task(&state, &id)?;
    if cell.lock().record.policy == Policy::Nearest {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "conflict",
            "a nearest task moves each device when it bootstraps; only a specified task can be rolled back",
        ));
    }
    let (cluster, store, c) = (state.cluster.clone(), state.store.clone(), cell.clone());
    let summary = detached(async move { runner::rollback(&cluster, &store, &c).await }).await.map_err(|f| {
        ApiError::new(StatusCode::BAD_GATEWAY, "rollback_failed", format!("rollback stopped: {}", f.message()))
    })?;
    let view = view(&cell.lock());
    Ok(Json(serde_json::json!({ "rolled_back": summary.rolled_back, "stayed": summary.stayed, "task": view })))
}

/// A peer hands devices (and their product) to this instance.
async fn import(
    State(state): State<AdminState>,
    ApiJson(body): ApiJson<ImportRequest>,
) -> Result<Json<ImportResponse>, ApiError> {
    if body.source == state.cluster.peers.name {
        return Err(ApiError::bad_request(format!("source {} is this instance", body.source)));
    }
    check_import(&state, &body)?;
    let source = body.source.clone();
    let (cluster, store) = (state.cluster.clone(), state.store.clone());
    let devices = detached(async move { cluster.import(&store, body).await }).await?;
    tracing::info!(%source, devices = devices.len(), "import from a peer");
    Ok(Json(ImportResponse { devices }))
}

/// What an operator could not have stored through the other endpoints is refused here too.
fn check_import(state: &AdminState, req: &ImportRequest) -> Result<(), ApiError> {
    use base64::Engine;
    let p = &req.product;
    super::products::check_settings(p.name.trim(), p.awake_window_s, p.ack_timeout_ms, p.max_retransmit)?;
    let valid_secret = |s: &crate::identity::Secret| crate::identity::Secret::new(s.expose()).is_ok();
    if !valid_secret(&p.product_secret) {
        return Err(ApiError::bad_request("product.product_secret must be 1 to 128 printable ASCII characters"));
    }
    if req.devices.len() > MAX_TASK_DEVICES {
        return Err(ApiError::bad_request(format!("at most {MAX_TASK_DEVICES} devices per import")));
    }
    let max = state.registry.config.coap.max_payload;
    for d in &req.devices {
        let named = |e: ApiError| ApiError::bad_request(format!("device {}: {}", d.device_name, e.message));
        if !valid_secret(&d.device_secret) {
            return Err(named(ApiError::bad_request("device_secret must be 1 to 128 printable ASCII characters")));
        }
        super::devices::check_psk(d.psk_hex.as_deref()).map_err(named)?;
        super::devices::check_radio(&d.radio).map_err(named)?;
        if d.version.as_ref().is_some_and(|v| v.len() > 16) {
            return Err(named(ApiError::bad_request("version must be at most 16 characters")));
        }
        for c in &d.commands {
            let payload = base64::engine::general_purpose::STANDARD.decode(&c.payload_base64).unwrap_or_default();
            if payload.is_empty() || payload.len() > max || !c.topic.starts_with('/') || c.topic.len() > 256 {
                return Err(named(ApiError::bad_request(format!(
                    "command {}: payload_base64 must decode to 1..={max} bytes and topic start with /",
                    c.id
                ))));
            }
        }
    }
    Ok(())
}

/// A peer takes back devices it moved here that never connected here.
async fn release(
    State(state): State<AdminState>,
    ApiJson(body): ApiJson<ReleaseRequest>,
) -> Result<Json<ReleaseResponse>, ApiError> {
    if state.registry.product(body.product_key.as_str()).is_none() {
        return Err(ApiError::not_found(format!("product {} not found", body.product_key)));
    }
    let (cluster, store) = (state.cluster.clone(), state.store.clone());
    let devices = detached(async move { cluster.release(&store, body).await }).await?;
    Ok(Json(ReleaseResponse { devices }))
}
