//! `POST /api/v1/products/{pk}/imports` and `GET /api/v1/products/{pk}/export`: a product's
//! devices created from a file as one, and written out as one (secrets only when asked).

use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use bytes::Bytes;
use serde::Deserialize;

use super::AdminState;
use super::device_file::{self, COLUMNS, Format, Line, Problems};
use super::error::ApiError;
use crate::identity::ProductKey;
use crate::registry::bulk::BulkError;
use crate::store::records::Radio;

/// Room for a full file of long rows.
const MAX_FILE_BYTES: usize = 64 << 20;

pub fn routes() -> Router<AdminState> {
    Router::new()
        .route("/products/{product_key}/imports", post(import).layer(DefaultBodyLimit::max(MAX_FILE_BYTES)))
        .route("/products/{product_key}/export", get(export))
}

fn refused(problems: Problems) -> ApiError {
    let n = problems.0.len();
    ApiError::new(
        StatusCode::BAD_REQUEST,
        "import_invalid",
        format!("{n} row{} refused; nothing was created: {problems}", if n == 1 { " is" } else { "s are" }),
    )
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ImportQuery {
    /// `csv`: the created devices and their secrets as a CSV file; unset: JSON.
    format: Option<Format>,
}

async fn import(
    State(state): State<AdminState>,
    Path(pk): Path<String>,
    query: Result<Query<ImportQuery>, axum::extract::rejection::QueryRejection>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let Query(query) = query?;
    let pk = ProductKey::new(pk).map_err(|e| ApiError::not_found(e.to_string()))?;
    if state.registry.product(pk.as_str()).is_none() {
        return Err(ApiError::not_found(format!("product {pk} not found")));
    }
    let rows = device_file::read(&body).map_err(refused)?;
    let rows = rows.into_iter().map(|r| (r.line, r.device, Radio { cell_id: r.cell_id, ..Radio::default() })).collect();
    let created = state.registry.create_devices(&pk, rows).await.map_err(|e| match e {
        BulkError::Rows(clashes) => refused(Problems(clashes)),
        BulkError::Registry(e) => e.into(),
    })?;
    tracing::info!(product_key = %pk, devices = created.len(), "devices imported");
    let lines: Vec<Line> = created
        .iter()
        .map(|d| Line {
            device_name: Some(d.device_name.to_string()),
            device_secret: Some(d.secret.expose().to_string()),
            node_id: d.node_id.as_ref().map(ToString::to_string),
            ..Line::default()
        })
        .collect();
    Ok(match query.format {
        Some(format) => {
            let file = device_file::write(format, &["device_name", "device_secret", "node_id"], &lines);
            (StatusCode::CREATED, file_headers(format, &format!("{pk}-secrets")), file).into_response()
        }
        None => {
            let body = serde_json::json!({"product_key": pk, "created": lines.len(), "devices": lines});
            (StatusCode::CREATED, Json(body)).into_response()
        }
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ExportQuery {
    /// `csv` (the default) or `ndjson`.
    format: Option<Format>,
    /// Include each device's secret and PSK.
    secrets: Option<bool>,
}

async fn export(
    State(state): State<AdminState>,
    Path(pk): Path<String>,
    query: Result<Query<ExportQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(query) = query?;
    if state.registry.product(&pk).is_none() {
        return Err(ApiError::not_found(format!("product {pk} not found")));
    }
    let secrets = query.secrets.unwrap_or(false);
    let format = query.format.unwrap_or(Format::Csv);
    let lines: Vec<Line> = state
        .registry
        .devices_of(&pk)
        .iter()
        .map(|d| Line {
            device_name: Some(d.device_name.to_string()),
            device_secret: secrets.then(|| d.secret.expose().to_string()),
            node_id: d.node_id.as_ref().map(ToString::to_string),
            psk_hex: d.psk_hex.clone().filter(|_| secrets),
            cell_id: d.state().radio.cell_id.clone(),
        })
        .collect();
    let columns: Vec<&str> =
        COLUMNS.iter().copied().filter(|c| secrets || !matches!(*c, "device_secret" | "psk_hex")).collect();
    if secrets {
        tracing::info!(product_key = pk, devices = lines.len(), "devices exported with their secrets");
    }
    let file = device_file::write(format, &columns, &lines);
    Ok((StatusCode::OK, file_headers(format, &format!("{pk}-devices")), file).into_response())
}

fn file_headers(format: Format, name: &str) -> [(header::HeaderName, String); 2] {
    let ext = match format {
        Format::Csv => "csv",
        Format::Ndjson => "ndjson",
    };
    [
        (header::CONTENT_TYPE, format.content_type().to_string()),
        (header::CONTENT_DISPOSITION, format!("attachment; filename=\"{name}.{ext}\"")),
    ]
}
