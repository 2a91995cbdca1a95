//! `/api/v1/products/{pk}/codecs` and `/codec`: a product's codec versions, uploaded after they
//! load and read a sample, tried on stored messages, and made current.

use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::StatusCode;
use axum::routing::{get, post, put};
use axum::{Json, Router};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use serde::Deserialize;

use super::AdminState;
use super::devices::device;
use super::error::{ApiError, ApiJson, blocking};
use crate::codec::engine::Engine;
use crate::codec::fields::Layout;
use crate::codec::script::Budget;
use crate::codec::{CodecError, CodecRecord, DirectoryError, Reading, Source};
use crate::northbound::event::message_view;
use crate::store::MessageId;
use crate::store::records::{DecodeFailure, DecodedRecord};

pub fn routes() -> Router<AdminState> {
    Router::new()
        // Room for the largest script, JSON-escaped, and its sample.
        .route(
            "/products/{product_key}/codecs",
            get(list).post(upload).layer(DefaultBodyLimit::max(4 * MAX_SCRIPT_BYTES)),
        )
        .route("/products/{product_key}/codecs/{version}", get(show))
        .route("/products/{product_key}/codecs/{version}/try", post(try_version))
        .route("/products/{product_key}/codec", put(make_current))
}

/// Huawei's limit for a codec script (seed 003 §4.4).
const MAX_SCRIPT_BYTES: usize = 1 << 20;
/// Stored messages one try decodes at most.
const MAX_TRY: usize = 100;

impl From<DirectoryError> for ApiError {
    fn from(e: DirectoryError) -> ApiError {
        match e {
            e @ DirectoryError::NoVersion(..) => ApiError::not_found(e.to_string()),
            DirectoryError::Store(e) => e.into(),
        }
    }
}

/// A codec that cannot serve: 400, with the script's own message or the layout's problem.
fn invalid(e: CodecError) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, "codec_invalid", e.to_string())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Upload {
    /// A vendor's script; or
    script: Option<String>,
    /// a layout of fields (codec::fields).
    fields: Option<serde_json::Value>,
    /// A device's bytes the codec must read without error before it is kept.
    sample_base64: String,
    /// The custom topic the sample came on; unset: the device's raw data.
    sample_topic: Option<String>,
    /// Make it current at once; unset: only when the product has no current codec.
    current: Option<bool>,
}

fn version_view(r: &CodecRecord, current: Option<u32>) -> serde_json::Value {
    let mut view = serde_json::json!({
        "product_key": r.product_key,
        "version": r.version,
        "style": r.style,
        "transforms": r.transforms,
        "current": current == Some(r.version),
        "created_at": crate::clock::UnixMs(r.created_at).rfc3339(),
        "kind": r.source.kind(),
    });
    if let Source::Script(s) = &r.source {
        view["script_bytes"] = s.len().into();
    }
    view
}

pub(super) fn budget(state: &AdminState) -> Budget {
    Budget::from(&state.registry.config.codec)
}

/// Runs `f` with `source` built, off the async threads (a script's call may take its whole
/// budget).
pub(super) async fn with_codec<T: Send + 'static>(
    source: Source,
    budget: Budget,
    f: impl FnOnce(&mut Engine) -> T + Send + 'static,
) -> Result<Result<T, CodecError>, ApiError> {
    tokio::task::spawn_blocking(move || Engine::build(&source, budget).map(|mut s| f(&mut s)))
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))
}

fn base64_field(name: &str, value: &str) -> Result<Vec<u8>, ApiError> {
    STANDARD.decode(value.trim()).map_err(|e| ApiError::bad_request(format!("{name} is not base64: {e}")))
}

/// The reading a sample gets: on a custom topic, or the device's raw data.
fn sample_reading(topic: &Option<String>) -> Result<(Reading, String), ApiError> {
    match topic {
        Some(t) if !t.starts_with('/') => Err(ApiError::bad_request("sample_topic must start with /")),
        Some(t) => Ok((Reading::Custom, t.clone())),
        None => Ok((Reading::Raw, String::new())),
    }
}

async fn upload(
    State(state): State<AdminState>,
    Path(pk): Path<String>,
    ApiJson(body): ApiJson<Upload>,
) -> Result<(StatusCode, Json<serde_json::Value>), ApiError> {
    let product = state.registry.product(&pk).ok_or_else(|| ApiError::not_found(format!("product {pk} not found")))?;
    let source = match (body.script, body.fields) {
        (Some(script), None) => {
            if script.trim().is_empty() {
                return Err(ApiError::bad_request("script must not be empty"));
            }
            if script.len() > MAX_SCRIPT_BYTES {
                return Err(ApiError::bad_request(format!(
                    "script is {} bytes; at most {MAX_SCRIPT_BYTES} are accepted",
                    script.len()
                )));
            }
            Source::Script(script)
        }
        (None, Some(fields)) => Source::Fields(Layout::parse(&fields).map_err(|e| invalid(CodecError::BadLayout(e)))?),
        _ => return Err(ApiError::bad_request("give either script or fields")),
    };
    let sample = base64_field("sample_base64", &body.sample_base64)?;
    let (reading, topic) = sample_reading(&body.sample_topic)?;
    let checked = with_codec(source.clone(), budget(&state), move |s| {
        let decoded = s.read(reading, &topic, &sample)?;
        Ok::<_, CodecError>((s.style(), s.transforms(), decoded))
    })
    .await?;
    let (style, transforms, decoded) = checked.and_then(|r| r).map_err(invalid)?;
    let codecs = &state.registry.codecs;
    let current = body.current.unwrap_or_else(|| codecs.current(&pk).is_none());
    let writer = state.registry.writer();
    let record = codecs.add(writer, &product.product_key, style, transforms, source, current).await?;
    let mut view = version_view(&record, codecs.versions(&pk).1);
    view["sample"] = serde_json::json!({ "decoded": decoded });
    Ok((StatusCode::CREATED, Json(view)))
}

async fn list(State(state): State<AdminState>, Path(pk): Path<String>) -> Result<Json<serde_json::Value>, ApiError> {
    state.registry.product(&pk).ok_or_else(|| ApiError::not_found(format!("product {pk} not found")))?;
    let (versions, current) = state.registry.codecs.versions(&pk);
    let views: Vec<_> = versions.iter().map(|r| version_view(r, current)).collect();
    Ok(Json(serde_json::json!({ "codecs": views, "current": current })))
}

fn find(state: &AdminState, pk: &str, version: &str) -> Result<std::sync::Arc<CodecRecord>, ApiError> {
    state.registry.product(pk).ok_or_else(|| ApiError::not_found(format!("product {pk} not found")))?;
    let v: u32 = version.parse().map_err(|_| ApiError::bad_request("the codec version must be a number"))?;
    state
        .registry
        .codecs
        .version(pk, v)
        .ok_or_else(|| ApiError::not_found(format!("product {pk} has no codec version {v}")))
}

async fn show(
    State(state): State<AdminState>,
    Path((pk, version)): Path<(String, String)>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let r = find(&state, &pk, &version)?;
    let mut view = version_view(&r, state.registry.codecs.versions(&pk).1);
    match &r.source {
        Source::Script(s) => view["script"] = s.clone().into(),
        Source::Fields(l) => view["fields"] = serde_json::to_value(l).expect("a layout serialises"),
    }
    Ok(Json(view))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Current {
    /// `null`: no codec; uplinks are stored as bytes only.
    version: Option<u32>,
}

async fn make_current(
    State(state): State<AdminState>,
    Path(pk): Path<String>,
    ApiJson(body): ApiJson<Current>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let product = state.registry.product(&pk).ok_or_else(|| ApiError::not_found(format!("product {pk} not found")))?;
    // A version the body names and the product lacks is a bad request: the path's product exists.
    state.registry.codecs.set_current(state.registry.writer(), &product.product_key, body.version).await.map_err(
        |e| match e {
            e @ DirectoryError::NoVersion(..) => ApiError::bad_request(e.to_string()),
            e => e.into(),
        },
    )?;
    Ok(Json(serde_json::json!({ "product_key": pk, "current": body.version })))
}

/// A try on a payload given here, or on a device's stored messages.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Try {
    payload_base64: Option<String>,
    topic: Option<String>,
    device_name: Option<String>,
    after: Option<String>,
    limit: Option<usize>,
}

async fn try_version(
    State(state): State<AdminState>,
    Path((pk, version)): Path<(String, String)>,
    ApiJson(body): ApiJson<Try>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let codec = find(&state, &pk, &version)?;
    let budget = budget(&state);
    let failure = |e: CodecError| DecodeFailure { kind: e.kind().into(), message: e.to_string() };
    match (body.payload_base64, body.device_name) {
        (Some(payload), None) => {
            let payload = base64_field("payload_base64", &payload)?;
            let (reading, topic) = sample_reading(&body.topic)?;
            let outcome = with_codec(codec.source.clone(), budget, move |s| s.read(reading, &topic, &payload)).await?;
            Ok(Json(match outcome.and_then(|r| r) {
                Ok(decoded) => serde_json::json!({ "codec_version": codec.version, "decoded": decoded }),
                Err(e) => serde_json::json!({ "codec_version": codec.version, "decode_error": failure(e) }),
            }))
        }
        (None, Some(dn)) => {
            if body.topic.is_some() {
                return Err(ApiError::bad_request("topic goes with payload_base64: stored messages have their own"));
            }
            let d = device(&state, &pk, &dn)?;
            let limit = match body.limit.unwrap_or(10) {
                l @ 1..=MAX_TRY => l,
                _ => return Err(ApiError::bad_request(format!("limit must be within 1..={MAX_TRY}"))),
            };
            let after = match body.after.as_deref() {
                None | Some("") => None,
                Some(a) => Some(MessageId(a.parse().map_err(|_| ApiError::bad_request("after must be a message id"))?)),
            };
            let store = state.store.clone();
            let (rows, more) = blocking(move || store.messages(d.id, after, limit)).await?;
            let next = if more { rows.last().map(|(id, _)| id.0.to_string()) } else { None };
            let (version, dn) = (codec.version, dn.clone());
            let tried = with_codec(codec.source.clone(), budget, move |s| {
                rows.iter()
                    .map(|(id, m)| {
                        let outcome = match codec.reading(&dn, &m.topic) {
                            Some(reading) => s.read(reading, &m.topic, &m.payload).map_err(|e| {
                                // A stopped runtime is not reused, here as in the decoders.
                                if e.stops_runtime()
                                    && let Ok(fresh) = Engine::build(&codec.source, budget)
                                {
                                    *s = fresh;
                                }
                                failure(e)
                            }),
                            None => Err(DecodeFailure {
                                kind: "not_decoded".into(),
                                message: format!("uplinks on {} are not read by this codec", m.topic),
                            }),
                        };
                        let d = DecodedRecord { received_at: m.received_at, codec_version: version, outcome };
                        message_view(*id, m, Some(&d))
                    })
                    .collect::<Vec<_>>()
            })
            .await?
            .map_err(invalid)?;
            Ok(Json(serde_json::json!({ "messages": tried, "next": next })))
        }
        _ => Err(ApiError::bad_request("give either payload_base64 (with an optional topic) or device_name")),
    }
}
