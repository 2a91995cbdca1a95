//! `/api/v1/packages` (API.md): upload a firmware or software package, read it back.

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use serde::Deserialize;
use sha2::{Digest, Sha256};

use super::AdminState;
use super::error::{ApiError, blocking};
use crate::clock::UnixMs;
use crate::identity::ProductKey;
use crate::ota::package::{self, DEFAULT_CHUNK_SIZE, MAX_CHUNKS, PackageId, PackageKind, PackageRecord};
use crate::ota::pcp::Version;
use crate::ota::stored;

/// The largest package PCP can carry: 65,535 chunks of 500 bytes.
const MAX_PACKAGE_BYTES: usize = MAX_CHUNKS * 500;

pub fn routes() -> Router<AdminState> {
    Router::new()
        .route("/packages", get(list).post(upload).layer(DefaultBodyLimit::max(MAX_PACKAGE_BYTES)))
        .route("/packages/{package_id}", get(show))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Upload {
    product_key: String,
    version: String,
    #[serde(rename = "type")]
    kind: PackageKind,
    chunk_size: Option<u16>,
    /// Comma-separated.
    source_versions: Option<String>,
}

/// A package as API.md shows it (ids are strings there).
#[derive(serde::Serialize)]
struct PackageView {
    package_id: String,
    #[serde(flatten)]
    record: PackageRecord,
}

impl From<PackageRecord> for PackageView {
    fn from(record: PackageRecord) -> PackageView {
        PackageView { package_id: record.id.0.to_string(), record }
    }
}

fn version(field: &str, v: &str) -> Result<String, ApiError> {
    Version::new(v)
        .map(|v| v.to_string())
        .map_err(|_| ApiError::bad_request(format!("{field} {v:?} must be 1 to 16 printable ASCII characters")))
}

async fn upload(
    State(state): State<AdminState>,
    query: Result<Query<Upload>, axum::extract::rejection::QueryRejection>,
    body: Bytes,
) -> Result<(StatusCode, Json<PackageView>), ApiError> {
    let Query(q) = query?;
    let pk = ProductKey::new(&q.product_key).map_err(|e| ApiError::bad_request(format!("product_key: {e}")))?;
    if state.registry.product(pk.as_str()).is_none() {
        return Err(ApiError::not_found(format!("product {pk} not found")));
    }
    let target = version("version", &q.version)?;
    let chunk_size = q.chunk_size.unwrap_or(DEFAULT_CHUNK_SIZE);
    if !(32..=500).contains(&chunk_size) {
        return Err(ApiError::bad_request("chunk_size must be within 32..=500"));
    }
    let source_versions = match q.source_versions.as_deref() {
        None | Some("") => Vec::new(),
        Some(list) => list.split(',').map(|v| version("source_versions", v.trim())).collect::<Result<_, _>>()?,
    };
    if body.is_empty() {
        return Err(ApiError::bad_request("the body (the package bytes) is empty"));
    }
    let chunk_count = body.len().div_ceil(chunk_size as usize);
    if chunk_count > MAX_CHUNKS {
        return Err(ApiError::bad_request(format!(
            "a package of {} bytes needs {chunk_count} chunks of {chunk_size}; PCP numbers at most {MAX_CHUNKS}",
            body.len()
        )));
    }
    let record = PackageRecord {
        id: PackageId(rand::random::<u64>() >> 1),
        product_key: pk,
        version: target,
        kind: q.kind,
        size: body.len() as u64,
        chunk_size,
        chunk_count: chunk_count as u16,
        source_versions,
        sha256: hex::encode(Sha256::digest(&body)),
        created_at: UnixMs::now().0,
    };
    let chunks: Vec<Vec<u8>> = package::chunks(&body, chunk_size).map(<[u8]>::to_vec).collect();
    state.registry.writer().commit(stored::put_package(&record, &chunks)).await?;
    tracing::info!(package = record.id.0, product_key = %record.product_key, version = record.version, size = record.size, "package stored");
    Ok((StatusCode::CREATED, Json(record.into())))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    product_key: Option<String>,
}

/// Packages, newest first; of one product if asked.
async fn list(
    State(state): State<AdminState>,
    query: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let Query(q) = query?;
    if let Some(pk) = &q.product_key
        && state.registry.product(pk).is_none()
    {
        return Err(ApiError::not_found(format!("product {pk} not found")));
    }
    let store = state.store.clone();
    let mut records = blocking(move || stored::packages(&store)).await?;
    records.retain(|r| q.product_key.as_deref().is_none_or(|pk| r.product_key.as_str() == pk));
    records.sort_by_key(|r| std::cmp::Reverse((r.created_at, r.id.0)));
    let views: Vec<PackageView> = records.into_iter().map(PackageView::from).collect();
    Ok(Json(serde_json::json!({ "packages": views })))
}

async fn show(State(state): State<AdminState>, Path(id): Path<String>) -> Result<Json<PackageView>, ApiError> {
    let not_found = || ApiError::not_found(format!("package {id} not found"));
    let pid = PackageId(id.parse().map_err(|_| not_found())?);
    let store = state.store.clone();
    let record = blocking(move || stored::package(&store, pid)).await?;
    Ok(Json(record.ok_or_else(not_found)?.into()))
}
