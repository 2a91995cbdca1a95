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
use crate::northbound::EventKind;
use crate::shadow::document::{Section, ShadowError, Stamps};
use crate::shadow::{Change, Owner};

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
    Ok(Json(crate::shadow::get(&state.store, d.id)?.view(Stamps::Millis)))
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
    let desired = [(Section::Desired, body.state.desired)];
    let version = body.version;
    let now = UnixMs::now();
    let owner = Owner { id: d.id, product_key: d.product_key.clone(), device_name: d.device_name.clone() };
    let announce = state.registry.wanted().wants(EventKind::Shadow);
    let change = Change::new(owner, now, announce, move |s| s.update(&desired, version, now.0));
    let changed = change.commit(state.registry.writer()).await??;
    tracing::info!(product_key = pk, device_name = dn, version = changed.version(), "shadow desired state set");
    Ok(Json(changed.view(Stamps::Millis)))
}
