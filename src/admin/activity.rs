//! `/api/v1/products/{pk}/activity`: a product's devices by status and its uplinks per minute,
//! what the console's fleet page shows.

use axum::extract::{Path, Query, State};
use axum::routing::get;
use axum::{Json, Router};
use serde::Deserialize;

use super::AdminState;
use super::error::ApiError;
use crate::clock::UnixMs;
use crate::registry::activity::MINUTES;

pub fn routes() -> Router<AdminState> {
    Router::new().route("/products/{product_key}/activity", get(show))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Window {
    minutes: Option<u32>,
}

const DEFAULT_MINUTES: u32 = 180;

async fn show(
    State(state): State<AdminState>,
    Path(pk): Path<String>,
    query: Result<Query<Window>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let Query(window) = query?;
    let minutes = window.minutes.unwrap_or(DEFAULT_MINUTES);
    if !(1..=MINUTES).contains(&minutes) {
        return Err(ApiError::bad_request(format!("minutes must be within 1..={MINUTES}")));
    }
    let product = state.registry.product(&pk).ok_or_else(|| ApiError::not_found(format!("product {pk} not found")))?;
    let census = state.registry.census(&pk);
    let series: Vec<serde_json::Value> = state
        .registry
        .activity
        .recent(&product.product_key, minutes, UnixMs::now())
        .into_iter()
        .map(|(m, count)| serde_json::json!({ "minute": m.start().rfc3339(), "count": count }))
        .collect();
    Ok(Json(serde_json::json!({
        "product_key": pk,
        "total": census.total(),
        "counts": census,
        "uplinks_per_minute": series,
    })))
}
