//! `/api/v1/webhooks` (API.md): subscribe a URL to events, list, read, unsubscribe.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};

use super::AdminState;
use super::error::{ApiError, ApiJson};
use crate::clock::UnixMs;
use crate::northbound::{EventKind, WebhookId, WebhookRecord};

pub fn routes() -> Router<AdminState> {
    Router::new().route("/webhooks", post(create).get(list)).route("/webhooks/{webhook_id}", get(show).delete(remove))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateWebhook {
    url: String,
    events: Option<Vec<EventKind>>,
    secret: Option<String>,
}

#[derive(Serialize)]
struct WebhookView {
    webhook_id: String,
    url: String,
    events: Vec<EventKind>,
    /// Whether deliveries are signed; the secret itself is never shown.
    signed: bool,
    created_at: String,
    /// The last outbox event this subscriber has taken.
    delivered_event_id: String,
}

fn view(w: &WebhookRecord, cursor: u64) -> WebhookView {
    WebhookView {
        webhook_id: w.id.0.to_string(),
        url: w.url.clone(),
        events: w.events.clone(),
        signed: w.secret.is_some(),
        created_at: UnixMs(w.created_at).rfc3339(),
        delivered_event_id: cursor.to_string(),
    }
}

async fn create(
    State(state): State<AdminState>,
    ApiJson(body): ApiJson<CreateWebhook>,
) -> Result<(StatusCode, Json<WebhookView>), ApiError> {
    let url = reqwest::Url::parse(&body.url).map_err(|e| ApiError::bad_request(format!("url is not a URL: {e}")))?;
    if !matches!(url.scheme(), "http" | "https") || url.host().is_none() {
        return Err(ApiError::bad_request("url must be an http:// or https:// URL with a host"));
    }
    let mut events = body.events.unwrap_or_else(|| EventKind::ALL.to_vec());
    events.sort_by_key(|k| *k as u8);
    events.dedup();
    if events.is_empty() {
        return Err(ApiError::bad_request("events must name at least one event"));
    }
    if body.secret.as_ref().is_some_and(|s| s.is_empty() || s.len() > 256) {
        return Err(ApiError::bad_request("secret must be 1 to 256 bytes"));
    }
    let hook = state.webhooks.create(url.to_string(), events, body.secret).await?;
    tracing::info!(webhook = hook.id.0, url = hook.url, "webhook created");
    let cursor = state.webhooks.get(hook.id).map_or(0, |(_, c)| c);
    Ok((StatusCode::CREATED, Json(view(&hook, cursor))))
}

fn webhook_id(raw: &str) -> Result<WebhookId, ApiError> {
    raw.parse().map(WebhookId).map_err(|_| ApiError::not_found(format!("webhook {raw} not found")))
}

async fn list(State(state): State<AdminState>) -> Json<serde_json::Value> {
    let hooks: Vec<WebhookView> = state.webhooks.list().iter().map(|(w, c)| view(w, *c)).collect();
    Json(serde_json::json!({ "webhooks": hooks }))
}

async fn show(State(state): State<AdminState>, Path(id): Path<String>) -> Result<Json<WebhookView>, ApiError> {
    let id = webhook_id(&id)?;
    let (w, cursor) =
        state.webhooks.get(id).ok_or_else(|| ApiError::not_found(format!("webhook {} not found", id.0)))?;
    Ok(Json(view(&w, cursor)))
}

async fn remove(State(state): State<AdminState>, Path(id): Path<String>) -> Result<StatusCode, ApiError> {
    let id = webhook_id(&id)?;
    if !state.webhooks.delete(id).await? {
        return Err(ApiError::not_found(format!("webhook {} not found", id.0)));
    }
    tracing::info!(webhook = id.0, "webhook deleted");
    Ok(StatusCode::NO_CONTENT)
}
