//! Commands (API.md): queued per device, read back by id or per device, canceled while PENDING.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde::Deserialize;

use super::AdminState;
use super::devices::device;
use super::error::{ApiError, ApiJson};
use crate::downlink::{CommandError, NewCommand};
use crate::downlink::{CommandId, CommandView, SendStrategy};

pub fn routes() -> Router<AdminState> {
    Router::new()
        .route("/products/{product_key}/devices/{device_name}/commands", get(list).post(create))
        .route("/commands/{command_id}", get(show).delete(cancel))
}

/// The longest expiry a command may ask for.
const MAX_EXPIRE_S: u64 = 30 * 86_400;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateCommand {
    payload_base64: String,
    #[serde(default)]
    send_strategy: SendStrategy,
    expire_time: Option<u64>,
    /// The topic an Alibaba device receives it on.
    topic: Option<String>,
}

impl From<CommandError> for ApiError {
    fn from(e: CommandError) -> ApiError {
        match e {
            CommandError::NotFound(what) => ApiError::not_found(format!("{what} not found")),
            CommandError::Full(e) => {
                ApiError::new(StatusCode::TOO_MANY_REQUESTS, "too_many_pending_commands", e.to_string())
            }
            CommandError::NotPending(e) => ApiError::new(StatusCode::CONFLICT, "not_pending", e.to_string()),
            e @ CommandError::Elsewhere(..) => ApiError::new(StatusCode::CONFLICT, "device_elsewhere", e.to_string()),
            CommandError::Store(e) => e.into(),
        }
    }
}

async fn create(
    State(state): State<AdminState>,
    Path((pk, dn)): Path<(String, String)>,
    ApiJson(body): ApiJson<CreateCommand>,
) -> Result<(StatusCode, Json<CommandView>), ApiError> {
    let payload = STANDARD
        .decode(body.payload_base64.trim())
        .map_err(|e| ApiError::bad_request(format!("payload_base64 is not base64: {e}")))?;
    let max = state.registry.config.coap.max_payload;
    if payload.is_empty() || payload.len() > max {
        return Err(ApiError::bad_request(format!("payload_base64 must decode to 1..={max} bytes")));
    }
    if body.expire_time.is_some_and(|t| !(1..=MAX_EXPIRE_S).contains(&t)) {
        return Err(ApiError::bad_request(format!("expire_time must be within 1..={MAX_EXPIRE_S} seconds")));
    }
    if let Some(t) = &body.topic {
        let ok = t.starts_with('/')
            && t.len() <= 256
            && t.split('/').skip(1).all(|s| !s.is_empty())
            && !t.bytes().any(|b| b < 0x20);
        if !ok {
            return Err(ApiError::bad_request("topic must be /-separated non-empty levels, at most 256 bytes"));
        }
    }
    let d = device(&state, &pk, &dn)?;
    let new = NewCommand { payload, strategy: body.send_strategy, expire_s: body.expire_time, topic: body.topic };
    let command = state.commands.create(&d, new).await?;
    tracing::info!(product_key = pk, device_name = dn, command = %command.id, status = command.status.as_str(), "command created");
    Ok((StatusCode::CREATED, Json(command.into())))
}

fn command_id(raw: &str) -> Result<CommandId, ApiError> {
    raw.parse().map_err(|_| ApiError::not_found(format!("command {raw} not found")))
}

async fn show(State(state): State<AdminState>, Path(id): Path<String>) -> Result<Json<CommandView>, ApiError> {
    let id = command_id(&id)?;
    let command =
        state.commands.get(&state.store, id)?.ok_or_else(|| ApiError::not_found(format!("command {id} not found")))?;
    Ok(Json(command.into()))
}

async fn list(
    State(state): State<AdminState>,
    Path((pk, dn)): Path<(String, String)>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let d = device(&state, &pk, &dn)?;
    let commands: Vec<CommandView> = state.commands.of(&state.store, &d)?.into_iter().map(CommandView::from).collect();
    Ok(Json(serde_json::json!({ "commands": commands })))
}

async fn cancel(State(state): State<AdminState>, Path(id): Path<String>) -> Result<Json<CommandView>, ApiError> {
    let id = command_id(&id)?;
    let command = state.commands.cancel(&state.store, id).await?;
    tracing::info!(command = %id, "command canceled");
    Ok(Json(command.into()))
}
