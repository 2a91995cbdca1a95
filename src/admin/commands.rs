//! Commands (API.md): queued per device, read back by id or per device, canceled while PENDING.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde::Deserialize;

use super::AdminState;
use super::codecs::{budget, with_codec};
use super::devices::device;
use super::error::{ApiError, ApiJson};
use crate::codec::{Style, command};
use crate::downlink::{CommandError, NewCommand};
use crate::downlink::{CommandId, CommandView, JsonCommand, SendStrategy};

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
    payload_base64: Option<String>,
    /// For a product with a codec: encoded by its current version.
    payload_json: Option<serde_json::Value>,
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
    let id = state.commands.new_id();
    let (payload, json, topic) = match (body.payload_base64, body.payload_json) {
        (Some(b64), None) => {
            let payload = STANDARD
                .decode(b64.trim())
                .map_err(|e| ApiError::bad_request(format!("payload_base64 is not base64: {e}")))?;
            (payload, None, body.topic)
        }
        (None, Some(app)) => {
            let (payload, json) = encode(&state, &pk, id, &app).await?;
            // Alibaba's codec writes the device's raw data, which goes down on its down_raw topic.
            let raw_topic = (json.style == Style::Alibaba).then(|| format!("/sys/{pk}/{dn}/thing/model/down_raw"));
            (payload, Some(json.command), body.topic.or(raw_topic))
        }
        (Some(_), Some(_)) => return Err(ApiError::bad_request("give payload_base64 or payload_json, not both")),
        (None, None) => return Err(ApiError::bad_request("payload_base64 or payload_json is required")),
    };
    let max = state.registry.config.coap.max_payload;
    if payload.is_empty() || payload.len() > max {
        let what = if json.is_some() { "the codec's encoding of payload_json" } else { "payload_base64" };
        return Err(ApiError::bad_request(format!("{what} must be 1..={max} bytes, not {}", payload.len())));
    }
    let strategy = body.send_strategy;
    let new = NewCommand { id, payload, json, strategy, expire_s: body.expire_time, topic };
    let command = state.commands.create(&d, new).await?;
    tracing::info!(product_key = pk, device_name = dn, command = %command.id, status = command.status.as_str(), "command created");
    Ok((StatusCode::CREATED, Json(command.into())))
}

struct Encoded {
    style: Style,
    command: JsonCommand,
}

/// `app`, a JSON command for product `pk` as command `id`, in the bytes its current codec writes.
async fn encode(
    state: &AdminState,
    pk: &str,
    id: CommandId,
    app: &serde_json::Value,
) -> Result<(Vec<u8>, Encoded), ApiError> {
    let codec = state.registry.codecs.current(pk).ok_or_else(|| {
        ApiError::bad_request(format!("product {pk} has no codec to encode payload_json: give payload_base64"))
    })?;
    let message = command::outgoing(codec.style, id.0, app).map_err(ApiError::bad_request)?;
    let given = message.clone();
    let written = with_codec(codec.source.clone(), budget(state), move |s| s.write(&given)).await?;
    let payload = written.and_then(|r| r).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "encode_failed",
            format!("codec version {} cannot encode payload_json: {e}", codec.version),
        )
    })?;
    let command = JsonCommand { codec_version: codec.version, message, answer: None };
    Ok((payload, Encoded { style: codec.style, command }))
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
