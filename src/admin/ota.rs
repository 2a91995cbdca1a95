//! `/api/v1/ota/tasks` (API.md): start a package on a list of devices, follow each device's
//! upgrade, stop the task.

use std::collections::HashSet;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;

use super::AdminState;
use super::devices::device;
use super::error::{ApiError, ApiJson, blocking};
use crate::ota::campaign::TaskView;
use crate::ota::package::PackageId;
use crate::ota::task::{MAX_RETRIES, MAX_RETRY_INTERVAL_MIN, UpgradeTaskId};
use crate::ota::upgrade::Retry;
use crate::store::records::OtaProtocol;

pub fn routes() -> Router<AdminState> {
    Router::new()
        .route("/ota/tasks", get(list).post(create))
        .route("/ota/cells", get(cells))
        .route("/ota/tasks/{task_id}", get(show))
        .route("/ota/tasks/{task_id}/stop", post(stop))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateTask {
    package_id: String,
    devices: Vec<DeviceRef>,
    retry: Option<RetryBody>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DeviceRef {
    product_key: String,
    device_name: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RetryBody {
    count: u8,
    interval_minutes: u64,
}

async fn create(
    State(state): State<AdminState>,
    ApiJson(body): ApiJson<CreateTask>,
) -> Result<(StatusCode, Json<TaskView>), ApiError> {
    let registry = &state.registry;
    let retry = match body.retry {
        None => Retry::default(),
        Some(r) if r.count > MAX_RETRIES || r.interval_minutes > MAX_RETRY_INTERVAL_MIN => {
            return Err(ApiError::bad_request(format!(
                "retry.count must be at most {MAX_RETRIES} and retry.interval_minutes at most {MAX_RETRY_INTERVAL_MIN}"
            )));
        }
        Some(r) => Retry { count: r.count, interval_ms: r.interval_minutes * 60_000 },
    };
    let max = registry.config.ota.max_task_devices;
    if body.devices.is_empty() || body.devices.len() > max {
        return Err(ApiError::bad_request(format!("devices must list 1..={max} devices")));
    }
    let package_not_found = || ApiError::not_found(format!("package {} not found", body.package_id));
    let package_id = PackageId(body.package_id.parse().map_err(|_| package_not_found())?);
    let package = crate::ota::stored::package(&state.store, package_id)?.ok_or_else(package_not_found)?;
    let product = registry
        .product(package.product_key.as_str())
        .ok_or_else(|| ApiError::not_found(format!("product {} not found", package.product_key)))?;
    if product.ota_protocol == OtaProtocol::None {
        return Err(ApiError::bad_request(format!(
            "product {} has no upgrade protocol (its ota_protocol is none)",
            product.product_key
        )));
    }
    let mut seen = HashSet::new();
    let mut devices = Vec::with_capacity(body.devices.len());
    for r in &body.devices {
        if r.product_key != package.product_key.as_str() {
            return Err(ApiError::bad_request(format!(
                "device {}/{} is not of product {}, which package {} is for",
                r.product_key, r.device_name, package.product_key, body.package_id
            )));
        }
        let d = device(&state, &r.product_key, &r.device_name)?;
        if !seen.insert(d.id) {
            return Err(ApiError::bad_request(format!("device {}/{} is listed twice", r.product_key, r.device_name)));
        }
        devices.push(d);
    }
    let store = state.store.clone();
    let (package, chunks) = blocking(move || {
        let chunks = crate::ota::stored::chunks(&store, &package)?;
        Ok::<_, crate::store::StoreError>((package, chunks))
    })
    .await?;
    let id = state.campaign.create_task(package, chunks, devices, retry).await?;
    Ok((StatusCode::CREATED, Json(view(&state, id).await?)))
}

fn task_id(raw: &str) -> Result<UpgradeTaskId, ApiError> {
    raw.parse().map(UpgradeTaskId).map_err(|_| ApiError::not_found(format!("task {raw} not found")))
}

/// Reads every device's upgrade, off the async threads (a task may name many devices).
async fn view(state: &AdminState, id: UpgradeTaskId) -> Result<TaskView, ApiError> {
    let (campaign, store) = (state.campaign.clone(), state.store.clone());
    let view = blocking(move || campaign.task_view(&store, id)).await?;
    view.ok_or_else(|| ApiError::not_found(format!("task {id} not found")))
}

async fn show(State(state): State<AdminState>, Path(id): Path<String>) -> Result<Json<TaskView>, ApiError> {
    Ok(Json(view(&state, task_id(&id)?).await?))
}

async fn stop(State(state): State<AdminState>, Path(id): Path<String>) -> Result<Json<TaskView>, ApiError> {
    let id = task_id(&id)?;
    state.campaign.stop_task(id).await?;
    Ok(Json(view(&state, id).await?))
}

/// Every task with its counts, newest first (without each device's upgrade).
async fn list(State(state): State<AdminState>) -> Result<Json<serde_json::Value>, ApiError> {
    let (campaign, store) = (state.campaign.clone(), state.store.clone());
    let tasks = blocking(move || {
        let views = campaign.task_ids().into_iter().map(|id| campaign.task_view(&store, id));
        views.filter_map(Result::transpose).map(|v| v.map(|v| v.task)).collect::<Result<Vec<_>, _>>()
    })
    .await?;
    Ok(Json(serde_json::json!({ "tasks": tasks })))
}

/// The cells' download budgets: what is in use against the limit, and who waits.
async fn cells(State(state): State<AdminState>) -> Json<serde_json::Value> {
    use crate::ota::coverage::{CELL_UNITS, Coverage};
    Json(serde_json::json!({
        "cell_units": CELL_UNITS,
        "limits": {
            "level_0": Coverage::Level(0).limit(),
            "level_1": Coverage::Level(1).limit(),
            "level_2": Coverage::Level(2).limit(),
            "cell_only": Coverage::CellOnly.limit(),
        },
        "cells": state.campaign.cells(),
    }))
}
