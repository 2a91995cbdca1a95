//! The admin HTTP API (API.md): products, devices and their messages under `/api/v1` behind a
//! bearer token, plus `/healthz` and `/metrics` without one.

mod activity;
mod clock;
mod codecs;
mod commands;
mod console;
mod device_file;
mod devices;
mod distribution;
pub mod error;
mod import;
mod ota;
mod packages;
mod products;
mod shadow;
mod trace;
mod webhooks;

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use metrics_exporter_prometheus::PrometheusHandle;
use subtle::ConstantTimeEq;

use crate::registry::Registry;
use error::ApiError;

/// The published API description (kept beside the handlers it describes).
pub const OPENAPI_JSON: &str = include_str!("openapi.json");

#[derive(Clone)]
pub struct AdminState {
    pub registry: Arc<Registry>,
    /// What the admin API reads back (messages, commands, packages, tasks).
    pub store: crate::store::Store,
    pub commands: Arc<crate::downlink::Commands>,
    pub campaign: Arc<crate::ota::campaign::Campaign>,
    pub cluster: Arc<crate::cluster::Cluster>,
    pub webhooks: Arc<crate::northbound::Webhooks>,
    /// The streaming outlets configured.
    pub outlets: Vec<Arc<crate::northbound::outlet::Status>>,
    pub token: Arc<str>,
    pub metrics: Option<PrometheusHandle>,
}

pub fn router(state: AdminState) -> Router {
    let api = Router::new()
        .route("/openapi.json", get(openapi))
        .merge(products::routes())
        .merge(devices::routes())
        .merge(activity::routes())
        .merge(import::routes())
        .merge(codecs::routes())
        .merge(commands::routes())
        .merge(shadow::routes())
        .merge(trace::routes())
        .merge(webhooks::routes())
        .route("/outlets", get(outlets))
        .merge(packages::routes())
        .merge(ota::routes())
        .merge(distribution::routes())
        .merge(clock::routes())
        // Inside the token check: an unknown /api/v1 path without the token is 401, not 404.
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(state.clone(), require_token));
    Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .nest("/api/v1", api)
        .merge(console::routes())
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::extract::DefaultBodyLimit::max(state.registry.config.admin.max_body_bytes))
        .layer(middleware::from_fn(count_responses))
        .with_state(state)
}

/// The streaming outlets and what each has delivered.
async fn outlets(State(state): State<AdminState>) -> Json<serde_json::Value> {
    Json(serde_json::json!({ "outlets": state.outlets.iter().map(|o| o.view()).collect::<Vec<_>>() }))
}

/// Counts answers by status, so refusals (401, 413 over `admin.max_body_bytes`, 429) show.
async fn count_responses(req: Request, next: Next) -> Response {
    let response = next.run(req).await;
    metrics::counter!(crate::telemetry::metric::ADMIN_RESPONSES, "status" => response.status().as_u16().to_string())
        .increment(1);
    response
}

async fn require_token(State(state): State<AdminState>, headers: HeaderMap, req: Request, next: Next) -> Response {
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    match given {
        Some(t) if bool::from(t.as_bytes().ct_eq(state.token.as_bytes())) => next.run(req).await,
        Some(_) => ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", "the bearer token is wrong").into_response(),
        None => ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "missing `Authorization: Bearer <admin token>` header",
        )
        .into_response(),
    }
}

/// Up once the listeners are (the admin API starts after them), down if the store writer died;
/// says whether the store takes writes.
async fn healthz(State(state): State<AdminState>) -> Response {
    let writer = state.registry.writer();
    if writer.is_alive() {
        // Still up with a full disk: it reads, and writes again by itself once space is freed.
        let store = if writer.is_writable() { "writable" } else { "disk_full" };
        Json(serde_json::json!({"status": "ok", "store": store})).into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, Json(serde_json::json!({"status": "store writer stopped"}))).into_response()
    }
}

async fn openapi() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI_JSON)
}

async fn metrics(State(state): State<AdminState>) -> Response {
    state.registry.export_gauges();
    crate::telemetry::export_process_gauges();
    match &state.metrics {
        Some(h) => ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], h.render()).into_response(),
        None => (StatusCode::SERVICE_UNAVAILABLE, "metrics recorder not installed in this process").into_response(),
    }
}

async fn not_found(method: Method, uri: Uri) -> ApiError {
    ApiError::not_found(format!("no resource at {method} {}", uri.path()))
}

async fn method_not_allowed(method: Method, uri: Uri) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        format!("{method} is not allowed on {}", uri.path()),
    )
}
