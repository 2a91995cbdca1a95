//! Commands that arrive through a streaming engine. Each is handed to the admin API's own handler
//! (`POST /api/v1/products/{pk}/devices/{dn}/commands`, in process), so a command sent over NATS
//! or MQTT is checked, queued and answered exactly as one sent over HTTP: the answer is the admin
//! API's body and status, its errors included (a device that lives on another instance is
//! `409 device_elsewhere`, naming the instance).

use std::sync::Arc;

use axum::body::Body;
use axum::http::{Method, Request, header};
use bytes::Bytes;
use tower::ServiceExt;

use crate::identity::{DeviceName, ProductKey};
use crate::telemetry::metric;

/// The admin API, as the outlets call it.
#[derive(Clone)]
pub struct AdminCommands {
    router: axum::Router,
    token: Arc<str>,
}

/// What the admin API answered.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub body: Bytes,
}

/// The most of an answer read back (a command view is a few hundred bytes).
const MAX_ANSWER: usize = 64 * 1024;

impl AdminCommands {
    pub fn new(router: axum::Router, token: Arc<str>) -> AdminCommands {
        AdminCommands { router, token }
    }

    /// Creates a command for `pk`/`dn` from `body` (the admin API's JSON), as `outlet` received it.
    pub async fn create(&self, outlet: &'static str, pk: &str, dn: &str, body: Bytes) -> Answer {
        let answer = self.call(pk, dn, body).await;
        metrics::counter!(metric::OUTLET_COMMANDS, "outlet" => outlet, "status" => answer.status.to_string())
            .increment(1);
        answer
    }

    async fn call(&self, pk: &str, dn: &str, body: Bytes) -> Answer {
        // Only a valid name can be a path segment, and no device has an invalid one.
        if ProductKey::new(pk).is_err() || DeviceName::new(dn).is_err() {
            return error(404, "not_found", &format!("device {pk}/{dn} not found"));
        }
        let request = Request::builder()
            .method(Method::POST)
            .uri(format!("/api/v1/products/{pk}/devices/{dn}/commands"))
            .header(header::AUTHORIZATION, format!("Bearer {}", self.token))
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from(body));
        let Ok(request) = request else {
            return error(404, "not_found", &format!("device {pk}/{dn} not found"));
        };
        let response = match self.router.clone().oneshot(request).await {
            Ok(r) => r,
            Err(never) => match never {},
        };
        let status = response.status().as_u16();
        match axum::body::to_bytes(response.into_body(), MAX_ANSWER).await {
            Ok(body) => Answer { status, body },
            Err(e) => error(500, "internal", &format!("cannot read the answer: {e}")),
        }
    }
}

/// An answer in the admin API's error shape.
fn error(status: u16, code: &str, message: &str) -> Answer {
    let body = serde_json::json!({"error": {"code": code, "message": message}});
    Answer { status, body: Bytes::from(body.to_string()) }
}
