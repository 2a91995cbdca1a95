//! `/api/v1/products`: create, read, list.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use serde::Deserialize;

use super::AdminState;
use super::error::{ApiError, ApiJson};
use crate::cluster::transfer::ProductTransfer;
use crate::identity::{ProductKey, Secret};
use crate::registry::NewProduct;
use crate::store::records::OtaProtocol;

pub fn routes() -> Router<AdminState> {
    Router::new().route("/products", get(list).post(create)).route("/products/{product_key}", get(show))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateProduct {
    name: String,
    product_key: Option<ProductKey>,
    product_secret: Option<Secret>,
    #[serde(default)]
    dynamic_registration: bool,
    #[serde(default)]
    ota_protocol: OtaProtocol,
    awake_window_s: Option<u32>,
    ack_timeout_ms: Option<u64>,
    max_retransmit: Option<u32>,
    #[serde(default)]
    unsigned_bootstrap: bool,
}

/// The PSM active timer most modules ship with (SPEC §5).
const DEFAULT_AWAKE_WINDOW_S: u32 = 20;

/// The limits on a product's settings, whether an operator or a peer sends them.
pub(super) fn check_settings(
    name: &str,
    awake_window_s: u32,
    ack_timeout_ms: Option<u64>,
    max_retransmit: Option<u32>,
) -> Result<(), ApiError> {
    if name.is_empty() || name.chars().count() > 128 {
        return Err(ApiError::bad_request("name must be 1 to 128 characters"));
    }
    if !(1..=86_400).contains(&awake_window_s) {
        return Err(ApiError::bad_request("awake_window_s must be within 1..=86400"));
    }
    if ack_timeout_ms.is_some_and(|t| !(100..=600_000).contains(&t)) {
        return Err(ApiError::bad_request("ack_timeout_ms must be within 100..=600000"));
    }
    if max_retransmit.is_some_and(|n| n > 20) {
        return Err(ApiError::bad_request("max_retransmit must be at most 20"));
    }
    Ok(())
}

async fn create(
    State(state): State<AdminState>,
    ApiJson(body): ApiJson<CreateProduct>,
) -> Result<(StatusCode, Json<ProductTransfer>), ApiError> {
    let name = body.name.trim().to_string();
    let awake_window_s = body.awake_window_s.unwrap_or(DEFAULT_AWAKE_WINDOW_S);
    check_settings(&name, awake_window_s, body.ack_timeout_ms, body.max_retransmit)?;
    let product = state
        .registry
        .create_product(NewProduct {
            name,
            product_key: body.product_key,
            product_secret: body.product_secret,
            dynamic_registration: body.dynamic_registration,
            ota_protocol: body.ota_protocol,
            awake_window_s,
            ack_timeout_ms: body.ack_timeout_ms,
            max_retransmit: body.max_retransmit,
            unsigned_bootstrap: body.unsigned_bootstrap,
        })
        .await?;
    tracing::info!(product_key = %product.product_key, "product created");
    Ok((StatusCode::CREATED, Json(ProductTransfer::from(&*product))))
}

async fn show(State(state): State<AdminState>, Path(pk): Path<String>) -> Result<Json<ProductTransfer>, ApiError> {
    let product = state.registry.product(&pk).ok_or_else(|| ApiError::not_found(format!("product {pk} not found")))?;
    Ok(Json(ProductTransfer::from(&*product)))
}

async fn list(State(state): State<AdminState>) -> Json<serde_json::Value> {
    let products: Vec<ProductTransfer> =
        state.registry.products().iter().map(|p| ProductTransfer::from(&**p)).collect();
    Json(serde_json::json!({ "products": products }))
}
