//! `/api/v1/products/{pk}/devices/{dn}/trace`: start, read and stop a device's message trace
//! (`coap::trace`).

use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::routing::put;
use axum::{Json, Router};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde::Deserialize;

use super::AdminState;
use super::devices::device;
use super::error::{ApiError, ApiJson};
use crate::clock::UnixMs;
use crate::coap::trace::{Entry, MAX_DATAGRAM, MAX_DURATION_S, MAX_ENTRIES, Trace};
use crate::registry::Device;

pub fn routes() -> Router<AdminState> {
    Router::new().route("/products/{product_key}/devices/{device_name}/trace", put(start).get(show).delete(stop))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Start {
    duration_s: u64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct After {
    after: Option<u64>,
}

fn not_traced(d: &Device) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not_traced",
        format!("device {} of product {} is not being traced", d.device_name, d.product_key),
    )
}

fn view(d: &Device, t: &Trace) -> serde_json::Value {
    serde_json::json!({
        "product_key": d.product_key.as_str(),
        "device_name": d.device_name.as_str(),
        "started_at": t.started.rfc3339(),
        "until": t.until.rfc3339(),
        "max_entries": MAX_ENTRIES,
        "max_bytes_per_entry": MAX_DATAGRAM,
        "dropped": t.dropped,
        "entries": t.entries.iter().map(entry).collect::<Vec<_>>(),
    })
}

fn entry(e: &Entry) -> serde_json::Value {
    let d = e.decode();
    serde_json::json!({
        "seq": e.seq,
        "time": e.at.rfc3339(),
        "direction": e.direction,
        "port": e.port,
        "peer": e.peer.to_string(),
        "authenticated": e.authenticated,
        "type": d.mtype,
        "code": d.code,
        "code_name": d.code_name,
        "message_id": d.message_id,
        "token_hex": d.token_hex,
        "options": d.options,
        "payload_base64": STANDARD.encode(&d.payload),
        // The whole payload's, when only the start of the message was kept.
        "payload_size": d.payload.len() + (e.size - e.datagram.len()),
        // Only the first MAX_DATAGRAM bytes of the message are kept.
        "payload_truncated": e.size > e.datagram.len(),
        "size": e.size,
        "malformed": d.malformed,
        "outcome": e.outcome,
        "answers": e.answers,
        "elapsed_ms": e.elapsed.map(|t| t.as_micros() as f64 / 1000.0),
    })
}

async fn start(
    State(state): State<AdminState>,
    Path((pk, dn)): Path<(String, String)>,
    ApiJson(body): ApiJson<Start>,
) -> Result<Json<serde_json::Value>, ApiError> {
    if !(1..=MAX_DURATION_S).contains(&body.duration_s) {
        return Err(ApiError::bad_request(format!("duration_s must be within 1..={MAX_DURATION_S}")));
    }
    let d = device(&state, &pk, &dn)?;
    let address = d.state().address;
    let trace = state
        .registry
        .tracer
        .start(d.id, address, UnixMs::now(), Duration::from_secs(body.duration_s))
        .map_err(|e| ApiError::new(StatusCode::TOO_MANY_REQUESTS, "too_many_traces", e.to_string()))?;
    tracing::info!(product_key = pk, device_name = dn, until = %trace.until.rfc3339(), "message trace started");
    Ok(Json(view(&d, &trace)))
}

async fn show(
    State(state): State<AdminState>,
    Path((pk, dn)): Path<(String, String)>,
    query: Result<Query<After>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let Query(after) = query?;
    let d = device(&state, &pk, &dn)?;
    let trace =
        state.registry.tracer.read(d.id, after.after.unwrap_or(0), UnixMs::now()).ok_or_else(|| not_traced(&d))?;
    Ok(Json(view(&d, &trace)))
}

async fn stop(State(state): State<AdminState>, Path((pk, dn)): Path<(String, String)>) -> Result<StatusCode, ApiError> {
    let d = device(&state, &pk, &dn)?;
    if !state.registry.tracer.stop(d.id) {
        return Err(not_traced(&d));
    }
    tracing::info!(product_key = pk, device_name = dn, "message trace stopped");
    Ok(StatusCode::NO_CONTENT)
}
