//! `/api/v1/products/{pk}/devices[...]`: devices and the uplinks they sent.

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};

use super::AdminState;
use super::error::{ApiError, ApiJson, blocking};
use crate::clock::UnixMs;
use crate::identity::Home;
use crate::identity::{DeviceName, NodeId, ProductKey, Secret};
use crate::northbound::event::message_view;
use crate::registry::search::{Filter, SCAN_LIMIT};
use crate::registry::{Device, DevicePatch, NewDevice, Status};
use crate::store::records::Radio;
use crate::store::{MessageId, StoreError};

pub fn routes() -> Router<AdminState> {
    Router::new()
        .route("/products/{product_key}/devices", get(list).post(create))
        .route("/products/{product_key}/devices/{device_name}", get(show).patch(update).delete(remove))
        .route("/products/{product_key}/devices/{device_name}/messages", get(messages))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateDevice {
    device_name: Option<DeviceName>,
    device_secret: Option<Secret>,
    node_id: Option<NodeId>,
    psk_hex: Option<String>,
}

#[derive(Serialize)]
struct DeviceCreated {
    product_key: String,
    device_name: String,
    device_secret: String,
    node_id: Option<String>,
}

#[derive(Serialize)]
pub struct DeviceView {
    product_key: String,
    device_name: String,
    node_id: Option<String>,
    status: Status,
    enabled: bool,
    last_seen: Option<String>,
    address: Option<String>,
    version: Option<String>,
    radio: Radio,
    /// Where it is served: here, or leaving for / moved to another instance.
    home: Home,
    /// Its LwM2M registration, while it has one (absent otherwise).
    #[serde(skip_serializing_if = "Option::is_none")]
    registration: Option<RegistrationView>,
    /// Its Huawei observe relation on `/t/d`, while it has one (absent otherwise).
    #[serde(skip_serializing_if = "Option::is_none")]
    observe: Option<ObserveView>,
}

#[derive(Serialize)]
struct ObserveView {
    token_hex: String,
}

#[derive(Serialize)]
struct RegistrationView {
    lwm2m_version: String,
    lifetime_s: u32,
    queue_mode: bool,
    objects: Vec<String>,
    updated_at: String,
}

fn view(d: &Device, state: &AdminState) -> DeviceView {
    let s = d.state();
    DeviceView {
        product_key: d.product_key.to_string(),
        device_name: d.device_name.to_string(),
        node_id: d.node_id.as_ref().map(ToString::to_string),
        status: s.status(UnixMs::now(), &state.registry.config.device),
        enabled: s.enabled,
        last_seen: s.last_seen.map(UnixMs::rfc3339),
        address: s.address.map(|a| a.to_string()),
        version: s.version.clone(),
        radio: s.radio.clone(),
        home: s.home.clone(),
        registration: s.registration.as_ref().map(|r| RegistrationView {
            lwm2m_version: r.version.clone(),
            lifetime_s: r.lifetime_s,
            queue_mode: r.queue,
            objects: r.objects.clone(),
            updated_at: UnixMs(r.updated_at).rfc3339(),
        }),
        observe: s.observe.map(|t| ObserveView { token_hex: hex::encode(t.0) }),
    }
}

pub(super) fn device(state: &AdminState, pk: &str, dn: &str) -> Result<std::sync::Arc<Device>, ApiError> {
    if state.registry.product(pk).is_none() {
        return Err(ApiError::not_found(format!("product {pk} not found")));
    }
    state.registry.device(pk, dn).ok_or_else(|| ApiError::not_found(format!("device {dn} not found in product {pk}")))
}

async fn create(
    State(state): State<AdminState>,
    Path(pk): Path<String>,
    ApiJson(body): ApiJson<CreateDevice>,
) -> Result<(StatusCode, Json<DeviceCreated>), ApiError> {
    let pk = ProductKey::new(pk).map_err(|e| ApiError::not_found(e.to_string()))?;
    check_psk(body.psk_hex.as_deref())?;
    let d = state
        .registry
        .create_device(
            &pk,
            NewDevice {
                device_name: body.device_name,
                device_secret: body.device_secret,
                node_id: body.node_id,
                psk_hex: body.psk_hex.map(|p| p.to_ascii_lowercase()),
            },
        )
        .await?;
    tracing::info!(product_key = %d.product_key, device_name = %d.device_name, "device created");
    Ok((
        StatusCode::CREATED,
        Json(DeviceCreated {
            product_key: d.product_key.to_string(),
            device_name: d.device_name.to_string(),
            device_secret: d.secret.expose().to_string(),
            node_id: d.node_id.as_ref().map(ToString::to_string),
        }),
    ))
}

async fn show(
    State(state): State<AdminState>,
    Path((pk, dn)): Path<(String, String)>,
) -> Result<Json<DeviceView>, ApiError> {
    let d = device(&state, &pk, &dn)?;
    Ok(Json(view(&d, &state)))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UpdateDevice {
    enabled: Option<bool>,
    radio: Option<RadioBody>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RadioBody {
    rsrp: Option<f64>,
    sinr: Option<f64>,
    cell_id: Option<String>,
}

pub(super) fn check_psk(psk_hex: Option<&str>) -> Result<(), ApiError> {
    if psk_hex.is_some_and(|psk| !hex::decode(psk).is_ok_and(|b| (1..=64).contains(&b.len()))) {
        return Err(ApiError::bad_request("psk_hex must be 1 to 64 bytes written as hex"));
    }
    Ok(())
}

pub(super) fn check_radio(r: &Radio) -> Result<(), ApiError> {
    if r.rsrp.is_some_and(|v| !(-160.0..=0.0).contains(&v)) {
        return Err(ApiError::bad_request("radio.rsrp must be within -160..=0 dBm"));
    }
    if r.sinr.is_some_and(|v| !(-30.0..=50.0).contains(&v)) {
        return Err(ApiError::bad_request("radio.sinr must be within -30..=50 dB"));
    }
    if r.cell_id.as_ref().is_some_and(|c| c.is_empty() || c.len() > 64) {
        return Err(ApiError::bad_request("radio.cell_id must be 1 to 64 characters"));
    }
    Ok(())
}

async fn update(
    State(state): State<AdminState>,
    Path((pk, dn)): Path<(String, String)>,
    ApiJson(body): ApiJson<UpdateDevice>,
) -> Result<Json<DeviceView>, ApiError> {
    device(&state, &pk, &dn)?;
    let radio = match body.radio {
        Some(r) => {
            let radio = Radio { rsrp: r.rsrp, sinr: r.sinr, cell_id: r.cell_id };
            check_radio(&radio)?;
            Some(radio)
        }
        None => None,
    };
    let d = state.registry.update_device(&pk, &dn, DevicePatch { enabled: body.enabled, radio }).await?;
    Ok(Json(view(&d, &state)))
}

async fn remove(
    State(state): State<AdminState>,
    Path((pk, dn)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    let d = device(&state, &pk, &dn)?;
    let held = (state.commands.deleting(&state.store, d.id)?, &*state.campaign);
    state.registry.delete_device(&d, &held).await?;
    tracing::info!(product_key = pk, device_name = dn, "device deleted");
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Page {
    after: Option<String>,
    limit: Option<usize>,
}

const DEFAULT_PAGE: usize = 100;
const MAX_PAGE: usize = 1000;

fn page_limit(limit: Option<usize>) -> Result<usize, ApiError> {
    match limit.unwrap_or(DEFAULT_PAGE) {
        l @ 1..=MAX_PAGE => Ok(l),
        _ => Err(ApiError::bad_request(format!("limit must be within 1..={MAX_PAGE}"))),
    }
}

/// `GET .../devices`: a page of a product's devices in name order, filtered.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DeviceQuery {
    after: Option<String>,
    limit: Option<usize>,
    /// Comma-separated statuses, any of which matches.
    status: Option<String>,
    seen_after: Option<String>,
    seen_before: Option<String>,
    version: Option<String>,
    cell_id: Option<String>,
    /// Part of the device name.
    name: Option<String>,
}

impl DeviceQuery {
    fn filter(&self) -> Result<Filter, ApiError> {
        let time = |name: &str, value: &Option<String>| {
            value
                .as_deref()
                .map(|v| {
                    UnixMs::parse_rfc3339(v).ok_or_else(|| {
                        ApiError::bad_request(format!("{name} must be an RFC 3339 time such as 2026-11-23T09:30:40Z"))
                    })
                })
                .transpose()
        };
        let status = match self.status.as_deref() {
            None => Vec::new(),
            Some(list) => list
                .split(',')
                .map(|name| {
                    Status::deserialize(serde::de::value::StrDeserializer::<serde::de::value::Error>::new(name.trim()))
                        .map_err(|_| {
                            ApiError::bad_request(format!(
                                "status {name:?} is not one of inactive, online, abnormal, offline"
                            ))
                        })
                })
                .collect::<Result<_, _>>()?,
        };
        Ok(Filter {
            status,
            seen_after: time("seen_after", &self.seen_after)?,
            seen_before: time("seen_before", &self.seen_before)?,
            version: self.version.clone(),
            cell_id: self.cell_id.clone(),
            name_contains: self.name.clone().filter(|n| !n.is_empty()),
        })
    }
}

async fn list(
    State(state): State<AdminState>,
    Path(pk): Path<String>,
    query: Result<Query<DeviceQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let Query(query) = query?;
    let limit = page_limit(query.limit)?;
    let filter = query.filter()?;
    if state.registry.product(&pk).is_none() {
        return Err(ApiError::not_found(format!("product {pk} not found")));
    }
    let page = state.registry.search(&pk, &filter, query.after.as_deref(), limit, SCAN_LIMIT);
    let views: Vec<DeviceView> = page.devices.iter().map(|d| view(d, &state)).collect();
    Ok(Json(serde_json::json!({ "devices": views, "next": page.next.map(|n| n.to_string()) })))
}

async fn messages(
    State(state): State<AdminState>,
    Path((pk, dn)): Path<(String, String)>,
    query: Result<Query<Page>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let Query(page) = query?;
    let limit = page_limit(page.limit)?;
    let after = match page.after.as_deref() {
        None | Some("") => None,
        Some(a) => Some(MessageId(a.parse().map_err(|_| ApiError::bad_request("after must be a cursor from `next`"))?)),
    };
    let d = device(&state, &pk, &dn)?;
    let store = state.store.clone();
    let (messages, next) = blocking(move || {
        let (rows, more) = store.messages(d.id, after, limit)?;
        let next = if more { rows.last().map(|(id, _)| id.0.to_string()) } else { None };
        let views = rows
            .iter()
            .map(|(id, m)| Ok(message_view(*id, m, store.decoded(d.id, *id)?.as_ref())))
            .collect::<Result<Vec<_>, StoreError>>()?;
        Ok::<_, StoreError>((views, next))
    })
    .await?;
    Ok(Json(serde_json::json!({ "messages": messages, "next": next })))
}
