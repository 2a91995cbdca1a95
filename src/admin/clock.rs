//! `POST /api/v1/clock/advance`: moves the server's wall clock forward, so a test can get past an
//! awake window or an expiry without waiting for it. Served only with `admin.clock_control`.

use axum::extract::State;
use axum::routing::post;
use axum::{Json, Router};
use serde::Deserialize;

use super::AdminState;
use super::error::{ApiError, ApiJson};

/// Most one call moves the clock: 30 days, past any awake window, status threshold or default
/// expiry.
const MAX_ADVANCE_MS: u64 = 2_592_000_000;

pub fn routes() -> Router<AdminState> {
    Router::new().route("/clock/advance", post(advance))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Advance {
    milliseconds: u64,
}

async fn advance(
    State(state): State<AdminState>,
    ApiJson(body): ApiJson<Advance>,
) -> Result<Json<serde_json::Value>, ApiError> {
    if !state.registry.config.admin.clock_control {
        return Err(ApiError::not_found("the clock is not movable here (admin.clock_control is off)"));
    }
    if body.milliseconds == 0 || body.milliseconds > MAX_ADVANCE_MS {
        return Err(ApiError::bad_request(format!("milliseconds must be 1 to {MAX_ADVANCE_MS}")));
    }
    let now = crate::clock::advance(std::time::Duration::from_millis(body.milliseconds));
    tracing::warn!(by_ms = body.milliseconds, now = %now.rfc3339(), "wall clock moved forward");
    Ok(Json(serde_json::json!({ "now": now.rfc3339() })))
}
