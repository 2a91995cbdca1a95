//! `/api/v1/products/{pk}/devices/{dn}/shadow`: a device's shadow read, and its desired state set
//! or deleted by key, under the version check and the limits of seeds 002 and 004.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{Map, Value};

use super::AdminState;
use super::devices::device;
use super::error::{ApiError, ApiJson};
use crate::clock::UnixMs;
use crate::shadow::document::{Section, ShadowError};

pub fn routes() -> Router<AdminState> {
    Router::new().route("/products/{product_key}/devices/{device_name}/shadow", get(show).put(set_desired))
}

impl From<ShadowError> for ApiError {
    fn from(e: ShadowError) -> ApiError {
        let message = format!("{e} (shadow error {})", e.vendor_code());
        match e {
            ShadowError::VersionConflict { .. } => ApiError::new(StatusCode::CONFLICT, "version_conflict", message),
            _ => ApiError::new(StatusCode::BAD_REQUEST, "shadow_invalid", message),
        }
    }
}

async fn show(
    State(state): State<AdminState>,
    Path((pk, dn)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    let d = device(&state, &pk, &dn)?;
    Ok(Json(crate::shadow::get(&state.store, d.id)?.view()))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SetDesired {
    state: DesiredOnly,
    /// Greater than the shadow's; unset: the next one.
    version: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DesiredOnly {
    /// Keys to set; a key set to `null` is deleted; `null` for the whole clears it.
    desired: Option<Map<String, Value>>,
}

async fn set_desired(
    State(state): State<AdminState>,
    Path((pk, dn)): Path<(String, String)>,
    ApiJson(body): ApiJson<SetDesired>,
) -> Result<Json<Value>, ApiError> {
    let d = device(&state, &pk, &dn)?;
    let desired = body.state.desired;
    let version = body.version;
    let registry = &state.registry;
    let changed = registry
        .shadows
        .change(&state.store, registry.writer(), d.id, |s| {
            s.update(Section::Desired, &desired, version, UnixMs::now().0)
        })
        .await??;
    tracing::info!(product_key = pk, device_name = dn, version = changed.version(), "shadow desired state set");
    Ok(Json(changed.view()))
}
